//! `/v1/webhooks`: operators manage webhook endpoints, see their delivery
//! attempts and replay events (see [`crate::webhooks`] for delivery).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use fieldsync_shared::hlc::system_now_ms;
use fieldsync_shared::{AgentId, CollectionName, Value};
use serde::Deserialize;
use serde_json::json;

use super::{blocking, body_bytes, ApiError, ApiState};
use crate::events::{format_ms, EventFilter, EVENT_TYPES};
use crate::store::HubStore;
use crate::webhooks::{check_url, new_id, new_secret, Endpoint, Progress};

/// Most endpoints one hub delivers to.
pub const MAX_ENDPOINTS: usize = 100;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NewEndpoint {
    url: String,
    /// Event types; all when absent.
    #[serde(default)]
    events: Vec<String>,
    /// Collections; all when absent.
    #[serde(default)]
    collections: Vec<String>,
    /// Agent id pattern (`*` is any run of characters); all when absent.
    agents: Option<String>,
}

fn view(e: &Endpoint) -> Value {
    let p = &e.progress;
    json!({
        "id": e.id,
        "url": e.url,
        "events": e.filter.types,
        "collections": e.filter.collections,
        "agents": e.filter.agents.first().cloned().unwrap_or_else(|| "*".into()),
        "created": format_ms(e.created_ms),
        "enabled": p.disabled.is_none(),
        "disabled_reason": p.disabled,
        "delivered_through": p.cursor,
        "failures": p.failures,
        "next_attempt": (p.next_attempt_ms > 0).then(|| format_ms(p.next_attempt_ms)),
    })
}

fn id_of(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(id) = path.map_err(|e| ApiError::bad("invalid_path", e.body_text()))?;
    Ok(id)
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no webhook endpoint {id:?}"),
    )
}

/// `POST /v1/webhooks`: a new endpoint; answers its id and signing secret
/// (shown only here). It gets events committed from now on.
pub(super) async fn create<S: HubStore>(
    State(state): State<Arc<ApiState<S>>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body: NewEndpoint = serde_json::from_slice(&body_bytes(body)?)
        .map_err(|e| ApiError::bad("invalid_json", format!("invalid JSON: {e}")))?;
    check_url(&body.url, state.webhook_allow_http)
        .map_err(|e| ApiError::bad("invalid_url", e.to_string()))?;
    if let Some(t) = body
        .events
        .iter()
        .find(|t| !EVENT_TYPES.contains(&t.as_str()))
    {
        return Err(ApiError::bad(
            "invalid_event_type",
            format!(
                "unknown event type {t:?}; known: {}",
                EVENT_TYPES.join(", ")
            ),
        ));
    }
    for c in &body.collections {
        CollectionName::new(c.as_str())
            .map_err(|e| ApiError::bad("invalid_name", e.to_string()))?;
    }
    let agents = match body.agents.as_deref() {
        None | Some("*") => Vec::new(),
        Some(pattern) => {
            // A pattern is an agent id in which `*` may stand for any run.
            AgentId::new(pattern.replace('*', "x"))
                .map_err(|e| ApiError::bad("invalid_pattern", e.to_string()))?;
            vec![pattern.to_owned()]
        }
    };
    let now = system_now_ms();
    let endpoint = Endpoint {
        id: new_id(),
        url: body.url,
        filter: EventFilter {
            types: body.events,
            agents,
            collections: body.collections,
        },
        secret: new_secret(),
        created_ms: now,
        epoch: 0,
        progress: Progress::default(),
    };
    let stored = endpoint.clone();
    let created = blocking(&state.store, move |s| {
        if s.webhooks()?.len() >= MAX_ENDPOINTS {
            return Ok(false);
        }
        // From the head on: events committed before the endpoint existed
        // are not sent (a replay sends them).
        let mut e = stored;
        e.progress.cursor = s.event_bounds()?.head;
        s.put_webhook(&e)?;
        Ok(true)
    })
    .await?;
    if !created {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "too_many_endpoints",
            format!("the hub delivers to at most {MAX_ENDPOINTS} endpoints; delete one first"),
        ));
    }
    state.webhooks.changed(&endpoint.id);
    let mut answer = view(&endpoint);
    answer["secret"] = json!(endpoint.secret);
    Ok((StatusCode::CREATED, Json(answer)))
}

/// `GET /v1/webhooks`: every endpoint (without secrets).
pub(super) async fn list<S: HubStore>(
    State(state): State<Arc<ApiState<S>>>,
) -> Result<Json<Value>, ApiError> {
    let all = blocking(&state.store, |s| s.webhooks()).await?;
    Ok(Json(json!({
        "webhooks": all.iter().map(view).collect::<Vec<_>>()
    })))
}

/// `GET /v1/webhooks/{id}`.
pub(super) async fn show<S: HubStore>(
    State(state): State<Arc<ApiState<S>>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = id_of(path)?;
    let key = id.clone();
    let found = blocking(&state.store, move |s| s.webhook(&key)).await?;
    found.map(|e| Json(view(&e))).ok_or_else(|| not_found(&id))
}

/// `DELETE /v1/webhooks/{id}`.
pub(super) async fn delete<S: HubStore>(
    State(state): State<Arc<ApiState<S>>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let id = id_of(path)?;
    let key = id.clone();
    if !blocking(&state.store, move |s| s.delete_webhook(&key)).await? {
        return Err(not_found(&id));
    }
    state.webhooks.removed(&id);
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeliveriesQuery {
    limit: Option<usize>,
}

/// `GET /v1/webhooks/{id}/deliveries`: attempts, newest first.
pub(super) async fn deliveries<S: HubStore>(
    State(state): State<Arc<ApiState<S>>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<DeliveriesQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = id_of(path)?;
    let Query(q) = query.map_err(|e| ApiError::bad("invalid_query", e.body_text()))?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let key = id.clone();
    let found = blocking(&state.store, move |s| {
        Ok(match s.webhook(&key)? {
            Some(_) => Some(s.webhook_attempts(&key, limit)?),
            None => None,
        })
    })
    .await?;
    let attempts = found.ok_or_else(|| not_found(&id))?;
    let items: Vec<Value> = attempts
        .iter()
        .map(|a| {
            json!({
                "event_id": a.event_id,
                "event_type": a.event_type,
                "seq": a.seq,
                "at": format_ms(a.at_ms),
                "attempt": a.attempt,
                "status": a.status,
                "error": a.error,
                "duration_ms": a.duration_ms,
                "outcome": a.outcome,
            })
        })
        .collect();
    Ok(Json(json!({ "deliveries": items })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReplayBody {
    /// RFC 3339: re-send every event committed at or after this time.
    since: String,
}

/// `POST /v1/webhooks/{id}/replay`: re-sends, in order, every event the log
/// still holds from `since` on (with their original ids), then goes on with
/// new ones; re-enables a disabled endpoint.
pub(super) async fn replay<S: HubStore>(
    State(state): State<Arc<ApiState<S>>>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id = id_of(path)?;
    let body: ReplayBody = serde_json::from_slice(&body_bytes(body)?)
        .map_err(|e| ApiError::bad("invalid_json", format!("invalid JSON: {e}")))?;
    let since = humantime::parse_rfc3339_weak(&body.since)
        .map_err(|e| ApiError::bad("invalid_time", format!("since: {e}")))?;
    let since_ms = since
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let key = id.clone();
    let rewound = blocking(&state.store, move |s| {
        if s.webhook(&key)?.is_none() {
            return Ok(None);
        }
        let from = first_at_or_after(s, since_ms)?;
        let rewound = s.rewind_webhook(&key, from.saturating_sub(1))?;
        Ok(rewound.map(|e| (e, from)))
    })
    .await?;
    let (endpoint, from) = rewound.ok_or_else(|| not_found(&id))?;
    state.webhooks.changed(&id);
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"id": endpoint.id, "from_seq": from, "enabled": true})),
    ))
}

/// The first event of the log committed at or after `since_ms` (the head
/// plus one if none): a binary search, as commit times grow with the log
/// (a hub wall clock stepped back makes it approximate by that step).
fn first_at_or_after<S: HubStore>(
    store: &S,
    since_ms: u64,
) -> Result<u64, crate::store::StoreError> {
    let bounds = store.event_bounds()?;
    let (mut lo, mut hi) = (bounds.oldest, bounds.head + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match store.event(mid)? {
            Some(e) if e.at_ms < since_ms => lo = mid + 1,
            Some(_) => hi = mid,
            // Trimmed meanwhile: everything below is gone too.
            None => lo = mid + 1,
        }
    }
    Ok(lo)
}
