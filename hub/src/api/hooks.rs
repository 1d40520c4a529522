//! `/v1/webhooks`: operators manage webhook endpoints, see their delivery
//! attempts and replay events (see [`crate::webhooks`] for delivery).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use fieldsync_http::{json_body, ErrorBody};
use fieldsync_shared::hlc::system_now_ms;
use fieldsync_shared::{AgentId, CollectionName};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{blocking, ApiError, ApiState};
use crate::events::{format_ms, EventFilter, EVENT_TYPES};
use crate::store::HubStore;
use crate::webhooks::{check_url, new_id, new_secret, Endpoint, Outcome, Progress};

/// Most endpoints one hub delivers to.
pub const MAX_ENDPOINTS: usize = 100;

/// A new endpoint.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewEndpoint {
    /// `https://...` (or `http://` to a loopback address, or anywhere with
    /// `[webhooks] allow_http`); never link-local or metadata addresses.
    #[schema(example = "https://example.com/fieldsync")]
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

/// A webhook endpoint and its delivery progress.
#[derive(Serialize, ToSchema)]
pub(super) struct EndpointView {
    id: String,
    url: String,
    /// Event types sent; empty means all.
    events: Vec<String>,
    /// Collections whose changes are sent; empty means all.
    collections: Vec<String>,
    /// Agent id pattern (`*` is any run of characters).
    agents: String,
    /// RFC 3339.
    created: String,
    enabled: bool,
    /// Why the endpoint was disabled (a 410 answer, or attempts given up).
    disabled_reason: Option<String>,
    /// The event log position delivered through.
    delivered_through: u64,
    /// Failed attempts in a row.
    failures: u32,
    /// When the next retry goes (RFC 3339).
    next_attempt: Option<String>,
    /// The signing secret (`whsec_...`): only in the answer that creates the
    /// endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
}

fn view(e: &Endpoint) -> EndpointView {
    let p = &e.progress;
    EndpointView {
        id: e.id.clone(),
        url: e.url.clone(),
        events: e.filter.types.clone(),
        collections: e.filter.collections.clone(),
        agents: e
            .filter
            .agents
            .first()
            .cloned()
            .unwrap_or_else(|| "*".into()),
        created: format_ms(e.created_ms),
        enabled: p.disabled.is_none(),
        disabled_reason: p.disabled.clone(),
        delivered_through: p.cursor,
        failures: p.failures,
        next_attempt: (p.next_attempt_ms > 0).then(|| format_ms(p.next_attempt_ms)),
        secret: None,
    }
}

/// The path of one endpoint.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // read through `Path<String>`; here for the document
pub(super) struct EndpointPath {
    /// The endpoint's id (`wh_...`).
    id: String,
}

fn id_of(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(id) = path?;
    Ok(id)
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found("not_found", format!("no webhook endpoint {id:?}"))
}

/// A new endpoint; answers its id and signing secret (shown only here). It
/// gets events committed from now on.
#[utoipa::path(post, path = "/v1/webhooks", tag = "webhooks",
    request_body = NewEndpoint,
    responses(
        (status = 201, description = "Created; the answer holds the secret", body = EndpointView),
        (status = 400, description = "Invalid JSON, URL, event type, collection or pattern", body = ErrorBody),
        (status = 409, description = "The hub has the most endpoints it delivers to", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
    ))]
pub(super) async fn create<S: HubStore>(
    State(state): State<Arc<ApiState<S>>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<EndpointView>), ApiError> {
    let body: NewEndpoint = json_body(body)?;
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
        CollectionName::new(c.as_str()).map_err(super::invalid_name)?;
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
    answer.secret = Some(endpoint.secret);
    Ok((StatusCode::CREATED, Json(answer)))
}

/// The endpoints.
#[derive(Serialize, ToSchema)]
pub(super) struct EndpointList {
    webhooks: Vec<EndpointView>,
}

/// Every endpoint (without secrets).
#[utoipa::path(get, path = "/v1/webhooks", tag = "webhooks",
    responses(
        (status = 200, description = "Every endpoint", body = EndpointList),
    ))]
pub(super) async fn list<S: HubStore>(
    State(state): State<Arc<ApiState<S>>>,
) -> Result<Json<EndpointList>, ApiError> {
    let all = blocking(&state.store, |s| s.webhooks()).await?;
    Ok(Json(EndpointList {
        webhooks: all.iter().map(view).collect(),
    }))
}

/// One endpoint (without its secret).
#[utoipa::path(get, path = "/v1/webhooks/{id}", tag = "webhooks", params(EndpointPath),
    responses(
        (status = 200, description = "The endpoint", body = EndpointView),
        (status = 404, description = "No such endpoint", body = ErrorBody),
    ))]
pub(super) async fn show<S: HubStore>(
    State(state): State<Arc<ApiState<S>>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<EndpointView>, ApiError> {
    let id = id_of(path)?;
    let key = id.clone();
    let found = blocking(&state.store, move |s| s.webhook(&key)).await?;
    found.map(|e| Json(view(&e))).ok_or_else(|| not_found(&id))
}

/// Deletes an endpoint; nothing more is sent to it.
#[utoipa::path(delete, path = "/v1/webhooks/{id}", tag = "webhooks", params(EndpointPath),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such endpoint", body = ErrorBody),
    ))]
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

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct DeliveriesQuery {
    /// Most attempts to show (1 to 1000, default 100).
    limit: Option<usize>,
}

/// One delivery attempt.
#[derive(Serialize, ToSchema)]
pub(super) struct AttemptView {
    event_id: String,
    event_type: String,
    /// The event's position in the log.
    seq: u64,
    /// RFC 3339.
    at: String,
    /// 1 for the first attempt of this event.
    attempt: u32,
    /// The receiver's HTTP status, if it answered.
    status: Option<u16>,
    /// Why the attempt failed, if it did.
    error: Option<String>,
    duration_ms: u64,
    outcome: Outcome,
}

/// Delivery attempts.
#[derive(Serialize, ToSchema)]
pub(super) struct AttemptList {
    deliveries: Vec<AttemptView>,
}

/// An endpoint's delivery attempts, newest first (the last 1000 are kept).
#[utoipa::path(get, path = "/v1/webhooks/{id}/deliveries", tag = "webhooks", params(EndpointPath, DeliveriesQuery),
    responses(
        (status = 200, description = "Attempts, newest first", body = AttemptList),
        (status = 400, description = "A malformed query", body = ErrorBody),
        (status = 404, description = "No such endpoint", body = ErrorBody),
    ))]
pub(super) async fn deliveries<S: HubStore>(
    State(state): State<Arc<ApiState<S>>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<DeliveriesQuery>, QueryRejection>,
) -> Result<Json<AttemptList>, ApiError> {
    let id = id_of(path)?;
    let Query(q) = query?;
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
    let deliveries = attempts
        .into_iter()
        .map(|a| AttemptView {
            at: format_ms(a.at_ms),
            event_id: a.event_id,
            event_type: a.event_type,
            seq: a.seq,
            attempt: a.attempt,
            status: a.status,
            error: a.error,
            duration_ms: a.duration_ms,
            outcome: a.outcome,
        })
        .collect();
    Ok(Json(AttemptList { deliveries }))
}

/// `POST /v1/webhooks/{id}/replay`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ReplayBody {
    /// RFC 3339: re-send every event committed at or after this time.
    #[schema(example = "2026-12-01T00:00:00Z")]
    since: String,
}

/// Where a replay starts.
#[derive(Serialize, ToSchema)]
pub(super) struct Replaying {
    id: String,
    /// The first event log position re-sent.
    from_seq: u64,
    enabled: bool,
}

/// Re-sends, in order, every event the log still holds from `since` on (with
/// their original ids), then goes on with new ones; re-enables a disabled
/// endpoint.
#[utoipa::path(post, path = "/v1/webhooks/{id}/replay", tag = "webhooks", params(EndpointPath),
    request_body = ReplayBody,
    responses(
        (status = 202, description = "Replaying", body = Replaying),
        (status = 400, description = "Invalid JSON or time", body = ErrorBody),
        (status = 404, description = "No such endpoint", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
    ))]
pub(super) async fn replay<S: HubStore>(
    State(state): State<Arc<ApiState<S>>>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Replaying>), ApiError> {
    let id = id_of(path)?;
    let body: ReplayBody = json_body(body)?;
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
        Json(Replaying {
            id: endpoint.id,
            from_seq: from,
            enabled: true,
        }),
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
