//! A record's version history as both APIs show it
//! (`GET …/records/{collection}/{key}/history`): newest first, each version
//! with its number, when it was applied, its stamp, who made it and why, and
//! the permitted fields it changed.

use std::collections::BTreeMap;

use fieldsync_shared::history::{Cause, HistoryEntry};
use fieldsync_shared::{AgentId, CollectionName, RecordKey, Value};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::format_ms;

/// Most versions one answer lists (a record keeps at most 1,000).
pub const MAX_LIMIT: usize = 1000;

/// `?limit=N`: the newest N versions (default 100).
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

impl HistoryQuery {
    /// The limit asked for, or why it is refused.
    pub fn limit(&self) -> Result<usize, String> {
        match self.limit {
            None => Ok(100),
            Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            Some(n) => Err(format!("limit {n} is outside 1..={MAX_LIMIT}")),
        }
    }
}

/// A record's versions, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryOut {
    /// The agent whose record it is (on the hub only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    pub collection: String,
    pub key: String,
    pub versions: Vec<VersionOut>,
}

impl HistoryOut {
    /// The answer for one record (`agent` on the hub only) and its versions,
    /// as its store lists them (number, entry; newest first).
    pub fn of(
        agent: Option<&AgentId>,
        collection: &CollectionName,
        key: &RecordKey,
        versions: &[(u64, HistoryEntry)],
    ) -> Self {
        Self {
            agent: agent.map(ToString::to_string),
            collection: collection.to_string(),
            key: key.to_string(),
            versions: versions
                .iter()
                .map(|(n, e)| VersionOut::of(*n, e))
                .collect(),
        }
    }
}

/// One version of a record.
#[derive(Debug, Serialize, ToSchema)]
pub struct VersionOut {
    /// The version's number: what `rollback` takes. Numbers grow over the
    /// whole store, so a record's are increasing but not consecutive.
    #[schema(minimum = 1)]
    pub version: u64,
    /// When this replica applied it (RFC 3339, its clock).
    pub at: String,
    /// The hybrid-logical-clock stamp of the change's latest write.
    pub stamp: StampOut,
    /// Who made the change: an agent id, or `@name` for the hub.
    pub origin: String,
    /// An agent id, or the operator's name.
    pub by: String,
    /// `local`, `agent`, `resync`, `operator`, `resolve`, `rollback` or `hub`.
    #[schema(example = "operator")]
    pub cause: &'static str,
    /// For a rollback: the version it restored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollback_to: Option<u64>,
    /// Each changed field's value before and after (`null`: absent).
    pub changed: BTreeMap<String, ChangedOut>,
}

/// A hybrid-logical-clock stamp.
#[derive(Debug, Serialize, ToSchema)]
pub struct StampOut {
    /// Milliseconds since the Unix epoch.
    pub wall_ms: u64,
    pub logical: u32,
}

/// One field's value before and after a version.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChangedOut {
    #[schema(value_type = Object)]
    pub before: Value,
    #[schema(value_type = Object)]
    pub after: Value,
}

/// The name a cause is shown by.
pub fn cause_name(cause: &Cause) -> &'static str {
    match cause {
        Cause::Local => "local",
        Cause::Agent => "agent",
        Cause::Resync => "resync",
        Cause::Operator => "operator",
        Cause::Resolve => "resolve",
        Cause::Rollback { .. } => "rollback",
        Cause::Hub => "hub",
        _ => "other",
    }
}

impl VersionOut {
    pub fn of(version: u64, entry: &HistoryEntry) -> Self {
        Self {
            version,
            at: format_ms(entry.at_ms),
            stamp: StampOut {
                wall_ms: entry.version.stamp.wall_ms,
                logical: entry.version.stamp.logical,
            },
            origin: entry.version.origin.to_string(),
            by: entry.writer.by.clone(),
            cause: cause_name(&entry.writer.cause),
            rollback_to: match entry.writer.cause {
                Cause::Rollback { to } => Some(to),
                _ => None,
            },
            changed: entry
                .changed
                .iter()
                .map(|(name, diff)| {
                    let json = |v: &Option<Value>| v.clone().unwrap_or(Value::Null);
                    let out = ChangedOut {
                        before: json(&diff.before),
                        after: json(&diff.after),
                    };
                    (name.to_string(), out)
                })
                .collect(),
        }
    }
}
