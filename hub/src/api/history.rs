//! `GET …/records/{collection}/{key}/history` and `POST …/rollback`: the
//! versions the hub keeps of an agent's record, and a rollback to one of
//! them — the fields as they were at that version, written as a **new**
//! operator write that the hub stamps after everything it holds (and that
//! has seen every concurrent value), queued and synced like any other (202)
//! and recorded in history as a rollback.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use fieldsync_http::history::{HistoryOut, HistoryQuery, MAX_LIMIT};
use fieldsync_http::{json_body, ErrorBody};
use fieldsync_shared::history::{state_at, Cause, Writer};
use fieldsync_shared::rules::compare_values;
use fieldsync_shared::{FieldName, MergeRule, Policy, Value};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::{
    address, blocking, check_fits, check_policy, enqueue_one_by, Address, ApiError, ApiState,
    DownWrite, RecordPath,
};
use crate::store::{HubStore, OPERATOR};

/// The versions the hub keeps of one of an agent's records, newest first.
#[utoipa::path(get, path = "/v1/agents/{agent}/records/{collection}/{key}/history", tag = "records",
    params(RecordPath, HistoryQuery),
    responses(
        (status = 200, description = "The record's versions (none when it has no history)", body = HistoryOut),
        (status = 400, description = "An invalid agent id, collection name, key or limit", body = ErrorBody),
    ))]
pub(super) async fn history<S: HubStore>(
    State(state): State<Arc<ApiState<S>>>,
    path: Address,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Json<HistoryOut>, ApiError> {
    let (agent, collection, key) = address(path)?;
    let Query(q) = query?;
    let limit = q.limit().map_err(|m| ApiError::bad("invalid_query", m))?;
    let (a, c, k) = (agent.clone(), collection.clone(), key.clone());
    let versions = blocking(&state.store, move |s| s.history(&a, &c, &k, limit)).await?;
    Ok(Json(HistoryOut::of(
        Some(&agent),
        &collection,
        &key,
        &versions,
    )))
}

/// The version to restore.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RollbackBody {
    /// A version number from the record's history.
    #[schema(minimum = 1)]
    version: u64,
}

/// What a rollback wrote.
#[derive(Serialize, ToSchema)]
pub(super) struct RolledBack {
    agent: String,
    collection: String,
    key: String,
    /// The version restored.
    version: u64,
    /// The fields the rollback writes (those that differ from the version).
    fields: Vec<String>,
    /// Its last sequence number in the agent's downstream queue (absent when
    /// the record already is as it was: nothing is written).
    #[serde(skip_serializing_if = "Option::is_none")]
    queued_seq: Option<u64>,
    agent_connected: bool,
}

/// Restores one of an agent's records to a version from its history, as a
/// new operator write that wins over every version the hub has seen.
#[utoipa::path(post, path = "/v1/agents/{agent}/records/{collection}/{key}/rollback", tag = "records",
    params(RecordPath),
    request_body(content = RollbackBody),
    responses(
        (status = 202, description = "The rollback is queued durably", body = RolledBack),
        (status = 200, description = "The record already is as it was at that version; nothing written", body = RolledBack),
        (status = 400, description = "Invalid JSON, names or version", body = ErrorBody),
        (status = 422, description = "A value breaks its collection's schema (the field and its rule are named); nothing written", body = ErrorBody),
        (status = 403, description = "The policy does not let these fields flow down", body = ErrorBody),
        (status = 404, description = "The record has no such version (unknown, or dropped by the history's bounds)", body = ErrorBody),
        (status = 409, description = "The write could not win against the hub's copy", body = ErrorBody),
        (status = 413, description = "The body or the change is too large", body = ErrorBody),
    ))]
pub(super) async fn rollback<S: HubStore>(
    State(state): State<Arc<ApiState<S>>>,
    path: Address,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<RolledBack>), ApiError> {
    let (agent, collection, key) = address(path)?;
    let RollbackBody { version } = json_body(body)?;
    let (a, c, k) = (agent.clone(), collection.clone(), key.clone());
    let (record, versions) = blocking(&state.store, move |s| {
        Ok((s.record(&a, &c, &k)?, s.history(&a, &c, &k, MAX_LIMIT)?))
    })
    .await?;
    let at = versions.iter().position(|(n, _)| *n == version).ok_or_else(|| {
        ApiError::not_found(
            "version_not_found",
            format!("record \"{key}\" in collection \"{collection}\" of agent \"{agent}\" has no version {version} in the hub's history"),
        )
    })?;
    let record = record.unwrap_or_default();
    let now: BTreeMap<FieldName, Value> = record
        .visible()
        .map(|(f, v)| (f.clone(), v.clone()))
        .collect();
    let target = state_at(now.clone(), versions[..at].iter().map(|(_, e)| e));
    let writes = rollback_writes(&state.policy, &collection, &now, &target)?;
    let fields: BTreeSet<String> = writes
        .iter()
        .flat_map(|w| w.fields.iter().map(|(f, _)| f.to_string()))
        .collect();
    let out = |queued_seq| RolledBack {
        agent: agent.to_string(),
        collection: collection.to_string(),
        key: key.to_string(),
        version,
        fields: fields.iter().cloned().collect(),
        queued_seq,
        agent_connected: state.connections.is_connected(&agent),
    };
    if writes.is_empty() {
        return Ok((StatusCode::OK, Json(out(None))));
    }
    let writes: Vec<DownWrite> = writes
        .into_iter()
        .map(|w| DownWrite {
            collection: collection.clone(),
            key: key.clone(),
            fields: w.fields,
        })
        .collect();
    for w in &writes {
        check_policy(&state.policy, w)?;
        check_fits(&state.origin, w)?;
    }
    let writer = Writer::new(OPERATOR, Cause::Rollback { to: version });
    let queued = enqueue_one_by(&state, &agent, writes, writer).await?;
    tracing::info!(%agent, %collection, version, fields = fields.len(), "rollback queued");
    Ok((StatusCode::ACCEPTED, Json(out(Some(queued.0)))))
}

/// The fields of one write of a rollback, in order.
struct Patch {
    fields: Vec<(FieldName, Option<Value>)>,
}

/// The writes that take a record from `now` to `target` under each field's
/// rule: a counter moves by the difference (`$inc`); a `max` or `min` field
/// that must become less extreme is cleared first and set by a second write
/// (a value alone could not lower a high-water mark); every other field is
/// set, or deleted where the version did not have it.
fn rollback_writes(
    policy: &Policy,
    collection: &fieldsync_shared::CollectionName,
    now: &BTreeMap<FieldName, Value>,
    target: &BTreeMap<FieldName, Value>,
) -> Result<Vec<Patch>, ApiError> {
    let mut first = Vec::new();
    let mut second = Vec::new();
    let names: BTreeSet<&FieldName> = now.keys().chain(target.keys()).collect();
    for name in names {
        let (held, want) = (now.get(name), target.get(name));
        if held == want {
            continue;
        }
        let merge = policy.field_rule(collection, name).merge;
        match (merge, want) {
            (MergeRule::Counter, Some(want)) => {
                let (Some(want), held) = (want.as_i64(), held.and_then(Value::as_i64).unwrap_or(0))
                else {
                    continue;
                };
                let delta = want.checked_sub(held).ok_or_else(|| {
                    ApiError::new(
                        StatusCode::CONFLICT,
                        "cannot_roll_back",
                        format!("counter \"{name}\" cannot move by more than 2^63 in one write"),
                    )
                })?;
                first.push((name.clone(), Some(json!({ "$inc": delta }))));
            }
            (MergeRule::Max | MergeRule::Min, Some(want)) => {
                let extreme = if merge == MergeRule::Max {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Less
                };
                let more_extreme = held.is_none_or(|h| compare_values(want, h) == extreme);
                if more_extreme {
                    first.push((name.clone(), Some(want.clone())));
                } else {
                    first.push((name.clone(), None));
                    second.push((name.clone(), Some(want.clone())));
                }
            }
            (_, want) => first.push((name.clone(), want.cloned())),
        }
    }
    Ok([first, second]
        .into_iter()
        .filter(|f| !f.is_empty())
        .map(|fields| Patch { fields })
        .collect())
}
