//! The hub's event log: what happened, in commit order, for the change feed
//! (`GET /v1/changes`) and the webhooks (`/v1/webhooks`). A `record.changed`
//! event is written by the store in the same transaction as the change it
//! describes, so there is none for an uncommitted change and none is lost in
//! a crash; link events (`agent.connected`, `agent.disconnected`,
//! `agent.stalled`) and `policy.denied` are written without an fsync of their own and become
//! visible with the next durable commit (at most about a second later).
//!
//! An event's position is its sequence number in the log. A cursor names the
//! position and the event's commit time, `SEQ-MS`, so that a cursor from
//! before a restore of the hub's store (whose log then reuses sequence
//! numbers for other events) is recognised and refused rather than followed
//! into someone else's events.
//!
//! **Architecture invariant:** the feed and the webhooks only ever read
//! events up to the store's durable head: nothing they hand out can vanish
//! in a crash and be replaced by another event at the same position.

use std::collections::BTreeMap;

use fieldsync_shared::{
    AgentId, CollectionName, FieldName, FieldValue, RecordKey, RecordState, Value, Version,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// One entry of the event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Hub wall time of the commit, in ms since the Unix epoch.
    pub at_ms: u64,
    pub kind: EventKind,
}

/// What an event says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EventKind {
    /// A committed change altered the hub's copy of a record.
    RecordChanged(RecordChanged),
    /// An agent linked (its hello was accepted).
    AgentConnected { agent: AgentId },
    /// A linked agent's connection ended (not a takeover by its own newer
    /// connection).
    AgentDisconnected { agent: AgentId },
    /// A connected agent reports a backlog and the hub applied nothing of
    /// its upstream for `[health] stall_after_ms`.
    AgentStalled { agent: AgentId, outbox_pending: u64 },
    /// The hub dropped fields (or a whole collection) an agent sent that the
    /// hub's policy does not permit upstream. Names only, never values.
    PolicyDenied {
        agent: AgentId,
        collection: CollectionName,
        fields: Vec<FieldName>,
        whole_collection: bool,
    },
    /// The hub dropped field values an agent sent that break the hub's
    /// schema (the rest of the change applied). Names only, never values.
    SchemaRefused {
        agent: AgentId,
        collection: CollectionName,
        key: RecordKey,
        fields: Vec<FieldName>,
    },
}

/// The event types a webhook can subscribe to, as named on the wire.
pub const EVENT_TYPES: &[&str] = &[
    "record.changed",
    "agent.connected",
    "agent.disconnected",
    "agent.stalled",
    "policy.denied",
    "schema.refused",
];

/// What one change did to one record: the permitted fields it set (`None`:
/// deleted) and whether it deleted the record, at `version`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordChanged {
    pub agent: AgentId,
    pub collection: CollectionName,
    pub key: RecordKey,
    pub fields: BTreeMap<FieldName, Option<Value>>,
    pub deleted: bool,
    /// The newest version among what changed.
    pub version: Version,
}

/// The versions a record held, before a change was merged into it, of the
/// fields that change writes (all [`RecordChanged::of`] needs, so that the
/// hot path clones no values).
#[derive(Debug, Clone, PartialEq)]
pub struct Prior {
    fields: Vec<Option<Version>>,
    deleted: Option<Version>,
}

impl Prior {
    pub fn of(before: &RecordState, change: &RecordState) -> Self {
        Self {
            fields: change
                .fields
                .keys()
                .map(|name| before.fields.get(name).map(|f| f.version.clone()))
                .collect(),
            deleted: before.deleted.clone(),
        }
    }
}

impl RecordChanged {
    /// What merging `change` into a record (which held `prior` before and
    /// holds `after` now) changed, or `None` if it changed nothing (a
    /// duplicate, or only writes older than what the record held).
    pub fn of(
        agent: &AgentId,
        collection: &CollectionName,
        key: &RecordKey,
        prior: &Prior,
        after: &RecordState,
        change: &RecordState,
    ) -> Option<Self> {
        let mut fields = BTreeMap::new();
        let mut version: Option<&Version> = None;
        for ((name, incoming), was) in change.fields.iter().zip(&prior.fields) {
            let kept = after.fields.get(name) == Some(incoming);
            if kept && was.as_ref() != Some(&incoming.version) {
                let value = match &incoming.value {
                    FieldValue::Set(v) => Some(v.clone()),
                    FieldValue::Deleted => None,
                };
                fields.insert(name.clone(), value);
                version = version.max(Some(&incoming.version));
            }
        }
        let deleted = change.deleted.is_some()
            && after.deleted == change.deleted
            && prior.deleted != change.deleted;
        if deleted {
            version = version.max(change.deleted.as_ref());
        }
        let version = version?.clone();
        Some(Self {
            agent: agent.clone(),
            collection: collection.clone(),
            key: key.clone(),
            fields,
            deleted,
            version,
        })
    }
}

impl Event {
    /// The event's type as named on the wire.
    pub fn type_name(&self) -> &'static str {
        match &self.kind {
            EventKind::RecordChanged(_) => "record.changed",
            EventKind::AgentConnected { .. } => "agent.connected",
            EventKind::AgentDisconnected { .. } => "agent.disconnected",
            EventKind::AgentStalled { .. } => "agent.stalled",
            EventKind::PolicyDenied { .. } => "policy.denied",
            EventKind::SchemaRefused { .. } => "schema.refused",
        }
    }

    /// The agent the event is about.
    pub fn agent(&self) -> &AgentId {
        match &self.kind {
            EventKind::RecordChanged(c) => &c.agent,
            EventKind::AgentConnected { agent }
            | EventKind::AgentDisconnected { agent }
            | EventKind::AgentStalled { agent, .. }
            | EventKind::PolicyDenied { agent, .. }
            | EventKind::SchemaRefused { agent, .. } => agent,
        }
    }

    /// The collection the event is about, if it is about one.
    pub fn collection(&self) -> Option<&CollectionName> {
        match &self.kind {
            EventKind::RecordChanged(c) => Some(&c.collection),
            EventKind::PolicyDenied { collection, .. }
            | EventKind::SchemaRefused { collection, .. } => Some(collection),
            _ => None,
        }
    }

    /// The message's unique id (Standard Webhooks' `webhook-id`): the same
    /// for every delivery of this event, so receivers can deduplicate.
    pub fn id(&self, seq: u64) -> String {
        format!("evt_{seq}_{}", self.at_ms)
    }

    /// The event as sent: `{"type", "timestamp", "data"}` (the Standard
    /// Webhooks payload shape); `data.cursor` resumes the change feed after it.
    pub fn to_json(&self, seq: u64) -> Value {
        let cursor = Cursor {
            seq,
            at_ms: self.at_ms,
        }
        .to_string();
        let data = match &self.kind {
            EventKind::RecordChanged(c) => json!({
                "cursor": cursor,
                "agent": c.agent,
                "collection": c.collection,
                "key": c.key,
                "fields": c.fields,
                "deleted": c.deleted,
                "version": format!("{}.{}", c.version.stamp.wall_ms, c.version.stamp.logical),
                "origin": if c.version.origin.as_str().starts_with('@') { "operator" } else { "agent" },
                "writer": c.version.origin,
            }),
            EventKind::AgentConnected { agent } | EventKind::AgentDisconnected { agent } => {
                json!({"cursor": cursor, "agent": agent})
            }
            EventKind::AgentStalled {
                agent,
                outbox_pending,
            } => json!({"cursor": cursor, "agent": agent, "outbox_pending": outbox_pending}),
            EventKind::PolicyDenied {
                agent,
                collection,
                fields,
                whole_collection,
            } => json!({
                "cursor": cursor,
                "agent": agent,
                "collection": collection,
                "fields": fields,
                "whole_collection": whole_collection,
            }),
            EventKind::SchemaRefused {
                agent,
                collection,
                key,
                fields,
            } => json!({
                "cursor": cursor,
                "agent": agent,
                "collection": collection,
                "key": key,
                "fields": fields,
            }),
        };
        json!({
            "id": self.id(seq),
            "type": self.type_name(),
            "timestamp": format_ms(self.at_ms),
            "data": data,
        })
    }
}

pub use fieldsync_http::format_ms;

/// A position in the event log: after the event `seq`, committed at `at_ms`.
/// `0-0` is before the first event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub seq: u64,
    pub at_ms: u64,
}

impl Cursor {
    pub const START: Cursor = Cursor { seq: 0, at_ms: 0 };
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.seq, self.at_ms)
    }
}

impl std::str::FromStr for Cursor {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        if s == "0" {
            return Ok(Cursor::START);
        }
        let (seq, at) = s.split_once('-').ok_or(())?;
        Ok(Cursor {
            seq: seq.parse().map_err(|_| ())?,
            at_ms: at.parse().map_err(|_| ())?,
        })
    }
}

/// Where the readable log starts and ends: events `oldest..=head` are
/// stored and durable (`oldest > head` when none is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EventBounds {
    pub oldest: u64,
    pub head: u64,
}

/// Whether `id` matches `pattern`, where `*` stands for any run of
/// characters (`gw-*`, `*-berlin`, `*`).
pub fn glob_match(pattern: &str, id: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = id.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Which events a reader wants: by type, agent id pattern and collection
/// (an empty list: any).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventFilter {
    pub types: Vec<String>,
    pub agents: Vec<String>,
    pub collections: Vec<String>,
}

impl EventFilter {
    pub fn matches(&self, event: &Event) -> bool {
        let type_ok = self.types.is_empty() || self.types.iter().any(|t| t == event.type_name());
        let agent = event.agent().as_str();
        let agent_ok = self.agents.is_empty() || self.agents.iter().any(|p| glob_match(p, agent));
        let collection_ok = self.collections.is_empty()
            || event
                .collection()
                .is_some_and(|c| self.collections.iter().any(|w| w == c.as_str()));
        type_ok && agent_ok && collection_ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fieldsync_shared::{Merge, Origin, Stamp};

    fn v(ms: u64, origin: &str) -> Version {
        Version {
            stamp: Stamp::new(ms, 0),
            origin: Origin::new(origin).unwrap(),
        }
    }

    fn f(name: &str) -> FieldName {
        FieldName::new(name).unwrap()
    }

    #[test]
    fn globs() {
        for (p, id, want) in [
            ("*", "gw-1", true),
            ("gw-*", "gw-1", true),
            ("gw-*", "hub", false),
            ("*-1", "gw-1", true),
            ("g*1", "gw-1", true),
            ("g*w*1", "gw-1", true),
            ("gw-1", "gw-1", true),
            ("gw-1", "gw-12", false),
            ("a*a", "a", false),
            ("", "", true),
        ] {
            assert_eq!(glob_match(p, id), want, "{p} vs {id}");
        }
    }

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let c = Cursor {
            seq: 42,
            at_ms: 1_700_000_000_000,
        };
        assert_eq!(c.to_string().parse::<Cursor>(), Ok(c));
        assert_eq!("0".parse::<Cursor>(), Ok(Cursor::START));
        for bad in ["", "x", "1", "1-", "-1", "1-2-3", "a-b"] {
            assert!(bad.parse::<Cursor>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_change_reports_only_what_it_changed() {
        let agent = AgentId::new("gw-1").unwrap();
        let c = CollectionName::new("t").unwrap();
        let k = RecordKey::new("k").unwrap();
        let mut before = RecordState::default();
        let _ = before.write([(f("a"), Some(json!(1)))], &v(10, "gw-1"));
        let _ = before.write([(f("b"), Some(json!(2)))], &v(20, "gw-1"));
        // One newer write (a), one older (b, loses), one delete (c).
        let mut change = RecordState::default();
        let _ = change.write([(f("a"), Some(json!(5)))], &v(30, "gw-1"));
        let mut older = RecordState::default();
        let _ = older.write([(f("b"), Some(json!(9)))], &v(5, "gw-1"));
        change.merge(&older);
        let mut del = RecordState::default();
        let _ = del.write([(f("c"), None)], &v(31, "gw-1"));
        change.merge(&del);
        let prior = Prior::of(&before, &change);
        let mut after = before.clone();
        after.merge(&change);
        let got = RecordChanged::of(&agent, &c, &k, &prior, &after, &change).unwrap();
        assert_eq!(
            got.fields,
            BTreeMap::from([(f("a"), Some(json!(5))), (f("c"), None)])
        );
        assert!(!got.deleted);
        assert_eq!(got.version, v(31, "gw-1"));
        // The same change again changes nothing.
        let prior = Prior::of(&after, &change);
        let mut again = after.clone();
        again.merge(&change);
        assert_eq!(
            RecordChanged::of(&agent, &c, &k, &prior, &again, &change),
            None
        );
    }

    #[test]
    fn filters_match_type_agent_and_collection() {
        let agent = AgentId::new("gw-1").unwrap();
        let e = Event {
            at_ms: 1,
            kind: EventKind::AgentConnected { agent },
        };
        let mut filter = EventFilter::default();
        assert!(filter.matches(&e));
        filter.types = vec!["record.changed".into()];
        assert!(!filter.matches(&e));
        filter.types = vec!["agent.connected".into()];
        filter.agents = vec!["gw-*".into()];
        assert!(filter.matches(&e));
        // A collection filter passes only events about a matching collection.
        filter.collections = vec!["t".into()];
        assert!(!filter.matches(&e));
    }
}
