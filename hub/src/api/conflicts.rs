//! `GET /v1/conflicts` and `POST /v1/conflicts/{id}/resolve`: fields whose
//! merge rule keeps concurrent writes (`review`, or `prefer` where the rule
//! decided) and that hold more than one, and their resolution — an operator
//! write of the chosen value that has seen every candidate, so it supersedes
//! them all on both sides and syncs like any other (202).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use fieldsync_http::conflicts::{conflicts_of, parse_conflict_id, ConflictOut};
use fieldsync_http::{json_body, ErrorBody, Name};
use fieldsync_shared::{AgentId, CollectionName, Value};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{blocking, enqueue_one_by, invalid_name, ApiError, ApiState, DownWrite, Queued};
use crate::store::{HubStore, OPERATOR};
use fieldsync_shared::history::{Cause, Writer};

/// Most conflicts one list answers.
const LIST_LIMIT: usize = 1000;

/// `GET /v1/conflicts?agent=&collection=`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct ConflictsQuery {
    /// Only this agent's records.
    #[param(value_type = Option<Name>, inline)]
    agent: Option<String>,
    /// Only this collection.
    #[param(value_type = Option<Name>, inline)]
    collection: Option<String>,
}

/// The conflicts found, in record order.
#[derive(Serialize, ToSchema)]
pub(super) struct ConflictList {
    conflicts: Vec<ConflictOut>,
    /// More records hold conflicts than one answer lists.
    truncated: bool,
}

/// Fields with concurrent values on record, of every agent or one, of every
/// collection or one (at most 1000 records' worth).
#[utoipa::path(get, path = "/v1/conflicts", tag = "records",
    params(ConflictsQuery),
    responses(
        (status = 200, description = "The conflicts", body = ConflictList),
        (status = 400, description = "An invalid agent id, collection name or parameter", body = ErrorBody),
    ))]
pub(super) async fn list<S: HubStore>(
    State(state): State<Arc<ApiState<S>>>,
    query: Result<Query<ConflictsQuery>, QueryRejection>,
) -> Result<Json<ConflictList>, ApiError> {
    let Query(q) = query?;
    let agent = q
        .agent
        .map(|a| AgentId::new(a).map_err(invalid_name))
        .transpose()?;
    let collection = q
        .collection
        .map(|c| CollectionName::new(c).map_err(invalid_name))
        .transpose()?;
    let records = blocking(&state.store, move |s| {
        s.conflicted(agent.as_ref(), collection.as_ref(), LIST_LIMIT + 1)
    })
    .await?;
    let truncated = records.len() > LIST_LIMIT;
    let conflicts = records
        .iter()
        .take(LIST_LIMIT)
        .flat_map(|(agent, change)| conflicts_of(Some(agent), change))
        .collect();
    Ok(Json(ConflictList {
        conflicts,
        truncated,
    }))
}

/// How to resolve: a value, or the latest candidate of one side.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct Resolution {
    /// The value to keep (any JSON; `null` deletes the field).
    #[schema(value_type = Option<Object>)]
    #[serde(default, deserialize_with = "present")]
    value: Option<Value>,
    /// Keep the latest candidate written by this side.
    keep: Option<Keep>,
}

/// `value: null` is a value (a delete), not an absent member.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

#[derive(Deserialize, ToSchema, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(super) enum Keep {
    Hub,
    Agent,
}

/// The conflict a resolution names.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub(super) struct ConflictPath {
    /// A conflict's `id` from `GET /v1/conflicts`.
    id: String,
}

/// Resolves a conflict: writes the chosen value as an operator write that
/// has seen every candidate, so it replaces them all on both sides.
#[utoipa::path(post, path = "/v1/conflicts/{id}/resolve", tag = "records",
    params(ConflictPath),
    request_body(content = Resolution),
    responses(
        (status = 202, description = "The resolution is queued durably", body = Queued),
        (status = 400, description = "Invalid JSON, or not exactly one of value and keep", body = ErrorBody),
        (status = 422, description = "A value breaks its collection's schema (the field and its rule are named); nothing written", body = ErrorBody),
        (status = 403, description = "The policy does not let this field flow down", body = ErrorBody),
        (status = 404, description = "No such conflict (unknown, or already resolved)", body = ErrorBody),
        (status = 409, description = "No candidate of that side, or the write could not win", body = ErrorBody),
        (status = 413, description = "The body or the change is too large", body = ErrorBody),
    ))]
pub(super) async fn resolve<S: HubStore>(
    State(state): State<Arc<ApiState<S>>>,
    path: Result<Path<ConflictPath>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Queued>), ApiError> {
    let Path(ConflictPath { id }) = path?;
    let resolution: Resolution = json_body(body)?;
    let not_found = || {
        ApiError::not_found(
            "conflict_not_found",
            "no such conflict (it may be resolved already)",
        )
    };
    let (agent, collection, key, field) = parse_conflict_id(&id).ok_or_else(not_found)?;
    let (a, c, k) = (agent.clone(), collection.clone(), key.clone());
    let record = blocking(&state.store, move |s| s.record(&a, &c, &k))
        .await?
        .ok_or_else(not_found)?;
    let held = record
        .fields
        .get(&field)
        .filter(|f| f.candidates().len() > 1)
        .ok_or_else(not_found)?;
    let value = match (resolution.value, resolution.keep) {
        (Some(value), None) => value,
        (None, Some(keep)) => {
            let side = match keep {
                Keep::Hub => fieldsync_shared::Side::Hub,
                Keep::Agent => fieldsync_shared::Side::Agent,
            };
            let chosen = held
                .candidates()
                .iter()
                .rev()
                .find(|(v, _)| fieldsync_shared::Side::of(&v.origin) == side)
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::CONFLICT,
                        "no_such_candidate",
                        "no candidate was written by that side",
                    )
                })?;
            match &chosen.1 {
                fieldsync_shared::FieldValue::Set(v) => v.clone(),
                fieldsync_shared::FieldValue::Deleted => Value::Null,
            }
        }
        _ => {
            return Err(ApiError::bad(
                "invalid_body",
                "give exactly one of \"value\" and \"keep\"",
            ))
        }
    };
    let write = DownWrite {
        collection,
        key,
        fields: vec![(field, (!value.is_null()).then_some(value))],
    };
    super::check_policy(&state.policy, &write)?;
    super::check_fits(&state.origin, &write)?;
    let (collection, key) = (write.collection.clone(), write.key.clone());
    let writer = Writer::new(OPERATOR, Cause::Resolve);
    let queued = enqueue_one_by(&state, &agent, vec![write], writer).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Queued {
            agent: agent.to_string(),
            collection: collection.to_string(),
            key: key.to_string(),
            queued_seq: queued.0,
            agent_connected: state.connections.is_connected(&agent),
        }),
    ))
}
