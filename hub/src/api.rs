//! The operator API (JSON over HTTP, `Authorization: Bearer TOKEN`): the fleet's
//! agents, the hub's copy of their records, and downstream writes, which are
//! queued durably and accepted (202) whether or not the agent is connected;
//! the change feed ([`feed`]), the webhook endpoints ([`hooks`]), and the
//! hub's metrics, as JSON and for Prometheus (`GET /metrics`).

mod feed;
mod hooks;

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fieldsync_shared::hlc::system_now_ms;
use fieldsync_shared::record::{parse_patch, PatchError};
use fieldsync_shared::wire::{write_fits, MAX_CHANGE_BYTES};
use fieldsync_shared::{
    AgentId, Change, CollectionName, FieldName, Flow, Hlc, Origin, Policy, RecordKey, RecordState,
    Seq, Value, Version,
};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::sync::mpsc;

use crate::engine::EngineEvent;
use crate::events::format_ms;
use crate::front_door::Connections;
use crate::health::FleetHealth;
use crate::metrics::Metrics;
use crate::store::{HubStore, StoreError};
use crate::webhooks::Dispatcher;

/// Largest request body.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// What the handlers share.
pub struct ApiState<S: HubStore> {
    pub store: Arc<S>,
    pub policy: Arc<Policy>,
    pub hlc: Arc<Mutex<Hlc>>,
    pub origin: Origin,
    pub connections: Arc<Connections>,
    pub events: mpsc::UnboundedSender<EngineEvent>,
    pub metrics: Arc<Metrics>,
    /// What `GET /metrics` encodes (see [`crate::metrics::registry`]).
    pub prometheus: Registry,
    pub token: String,
    pub webhooks: Arc<Dispatcher<S>>,
    /// `[webhooks] allow_http`.
    pub webhook_allow_http: bool,
    /// Agents' sync health.
    pub health: Arc<FleetHealth>,
}

/// The API's routes.
pub fn router<S: HubStore>(state: Arc<ApiState<S>>) -> Router {
    let authed = Router::new()
        .route("/v1/agents", get(list_agents::<S>))
        .route(
            "/v1/agents/{agent}/records/{collection}/{key}",
            get(get_record::<S>).put(put_record::<S>),
        )
        .route("/v1/agents/{agent}/batch", post(batch::<S>))
        .route("/v1/metrics", get(metrics::<S>))
        .route("/v1/changes", get(feed::changes::<S>))
        .route(
            "/v1/webhooks",
            get(hooks::list::<S>).post(hooks::create::<S>),
        )
        .route(
            "/v1/webhooks/{id}",
            get(hooks::show::<S>).delete(hooks::delete::<S>),
        )
        .route("/v1/webhooks/{id}/deliveries", get(hooks::deliveries::<S>))
        .route("/v1/webhooks/{id}/replay", post(hooks::replay::<S>))
        .route("/metrics", get(prometheus::<S>))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            require_token::<S>,
        ));
    Router::new()
        .route(
            "/v1/health",
            get(|| async { Json(json!({"status": "ok"})) }),
        )
        .merge(authed)
        .merge(crate::ui::router())
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no_route", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// An error answer: `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the hub's log",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response()
    }
}

async fn require_token<S: HubStore>(
    State(state): State<Arc<ApiState<S>>>,
    request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(t) if constant_time_eq(t.as_bytes(), state.token.as_bytes()) => {
            next.run(request).await
        }
        _ => {
            let mut response = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong bearer token",
            )
            .into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            response
        }
    }
}

async fn blocking<S: HubStore, T: Send + 'static>(
    store: &Arc<S>,
    f: impl FnOnce(&S) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)
}

/// `GET /v1/agents`: every agent the hub knows, with link state and queue size.
async fn list_agents<S: HubStore>(
    State(state): State<Arc<ApiState<S>>>,
) -> Result<Json<Value>, ApiError> {
    let rows = blocking(&state.store, |s| s.agents()).await?;
    let now = system_now_ms();
    let agents: Vec<Value> = rows
        .into_iter()
        .map(|(id, row)| {
            let connected = state.connections.is_connected(&id);
            let (sync_state, health) = state.health.state(&id, connected, now);
            let report = health.and_then(|h| h.report.map(|r| (r, h.report_at_ms)));
            json!({
                "id": id,
                "connected": connected,
                "state": sync_state,
                "outbox_pending": report.map(|(r, _)| r.outbox_pending),
                "outbox_bytes": report.map(|(r, _)| r.outbox_bytes),
                "oldest_pending_ms": report.and_then(|(r, _)| r.oldest_pending_ms),
                "drain_per_s": report.map(|(r, _)| r.drain_per_s),
                "agent_clock_offset_ms": report.map(|(r, _)| r.clock_offset_ms),
                "health_reported": report.map(|(_, at)| format_ms(at)),
                "last_seen": row.last_seen_ms.map(format_ms),
                "queue_pending": row.queue_pending(),
                "up_applied": row.up_applied,
                "changes_applied": row.changes_applied,
                "incarnation": row.identity.current.map(|i| i.to_string()),
                "clock_skew_ms": row.clock_skew_ms,
                "resyncs": row.resyncs,
                "identity_conflicts": row.identity_conflicts,
            })
        })
        .collect();
    Ok(Json(json!({ "agents": agents })))
}

type Address = Result<Path<(String, String, String)>, PathRejection>;

fn address(path: Address) -> Result<(AgentId, CollectionName, RecordKey), ApiError> {
    let Path((agent, collection, key)) =
        path.map_err(|e| ApiError::bad("invalid_path", e.body_text()))?;
    let name = |e: fieldsync_shared::IdError| ApiError::bad("invalid_name", e.to_string());
    Ok((
        AgentId::new(agent).map_err(name)?,
        CollectionName::new(collection).map_err(name)?,
        RecordKey::new(key).map_err(name)?,
    ))
}

fn view(
    agent: &AgentId,
    collection: &CollectionName,
    key: &RecordKey,
    state: &RecordState,
) -> Value {
    let fields: serde_json::Map<String, Value> = state
        .visible()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    json!({"agent": agent, "collection": collection, "key": key, "fields": fields})
}

/// `GET /v1/agents/{agent}/records/{collection}/{key}`: the hub's copy.
async fn get_record<S: HubStore>(
    State(state): State<Arc<ApiState<S>>>,
    path: Address,
) -> Result<Json<Value>, ApiError> {
    let (agent, collection, key) = address(path)?;
    let (a, c, k) = (agent.clone(), collection.clone(), key.clone());
    let found = blocking(&state.store, move |s| s.record(&a, &c, &k)).await?;
    match found.filter(RecordState::exists) {
        Some(record) => Ok(Json(view(&agent, &collection, &key, &record))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("the hub has no record \"{key}\" in collection \"{collection}\" of agent \"{agent}\""),
        )),
    }
}

/// One validated downstream write.
struct DownWrite {
    collection: CollectionName,
    key: RecordKey,
    fields: Vec<(FieldName, Option<Value>)>,
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        let status = e.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "payload_too_large"
        } else {
            "invalid_body"
        };
        ApiError::new(status, code, e.body_text())
    })
}

fn patch_of(body: Value) -> Result<Vec<(FieldName, Option<Value>)>, ApiError> {
    parse_patch(body).map_err(|e| match e {
        PatchError::FieldName(_) => ApiError::bad("invalid_name", e.to_string()),
        e => ApiError::bad("invalid_body", e.to_string()),
    })
}

/// Refuses a write whose change could not travel in one message (it would
/// block the agent's queue behind it).
fn check_fits(origin: &Origin, write: &DownWrite) -> Result<(), ApiError> {
    if write_fits(&write.collection, &write.key, &write.fields, origin) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "change_too_large",
        format!("one write may encode to at most {MAX_CHANGE_BYTES} bytes; split it"),
    ))
}

/// The policy decides first: a refused write changes nothing.
fn check_policy(policy: &Policy, write: &DownWrite) -> Result<(), ApiError> {
    let collection = &write.collection;
    if !policy.allows_collection(Flow::Down, collection) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "policy_denied",
            format!("the policy does not let collection \"{collection}\" flow down to agents"),
        ));
    }
    let denied: Vec<&str> = write
        .fields
        .iter()
        .filter(|(f, _)| !policy.permits(Flow::Down, collection, f))
        .map(|(f, _)| f.as_str())
        .collect();
    if !denied.is_empty() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "policy_denied",
            format!(
                "the policy does not let these fields flow down: {}",
                denied.join(", ")
            ),
        ));
    }
    Ok(())
}

/// A write that cannot win against the hub's copy.
struct Lose {
    collection: CollectionName,
    key: RecordKey,
}

/// Stamps `writes` with the hub clock and queues them for `agent` in one
/// durable transaction; returns the last queued sequence number. Refuses
/// (409, nothing queued) a batch in which any write could not win.
async fn enqueue<S: HubStore>(
    state: &ApiState<S>,
    agent: &AgentId,
    writes: Vec<DownWrite>,
) -> Result<Seq, ApiError> {
    let count = writes.len() as u64;
    let hlc = state.hlc.clone();
    let origin = state.origin.clone();
    let a = agent.clone();
    let queued = blocking(&state.store, move |store| {
        // The clock lock spans stamping and the commit that persists it, so the
        // persisted clock state only moves forward.
        let mut clock = hlc.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = system_now_ms();
        // Stamps observed from agents live only in memory until this commit;
        // the hub's copy of each record bounds them, so an operator write
        // sorts after what the hub already holds — unless that copy holds a
        // stamp beyond the clock's drift bound, which the clock refuses to
        // follow: such a write could not win, so it is refused (409) rather
        // than accepted and silently lost.
        let mut copies = Vec::with_capacity(writes.len());
        for w in &writes {
            let copy = store.record(&a, &w.collection, &w.key)?;
            if let Some(v) = copy.as_ref().and_then(RecordState::max_version) {
                let _ = clock.observe(v.stamp, now);
            }
            copies.push(copy);
        }
        let mut changes = Vec::with_capacity(writes.len());
        for (w, copy) in writes.into_iter().zip(&copies) {
            let version = Version {
                stamp: clock.tick(now),
                origin: origin.clone(),
            };
            if let Some(copy) = copy {
                let beaten = copy.deleted.iter().any(|d| d >= &version)
                    || w.fields.iter().any(|(f, _)| {
                        copy.fields.get(f).is_some_and(|held| held.version >= version)
                    });
                if beaten {
                    return Ok(Err(Lose {
                        collection: w.collection,
                        key: w.key,
                    }));
                }
            }
            let state = RecordState::default().write(w.fields, &version);
            changes.push(Change {
                collection: w.collection,
                key: w.key,
                state,
            });
        }
        store
            .enqueue_downstream(&a, &changes, clock.last(), now)
            .map(Ok)
    })
    .await?
    .map_err(|lose| {
        Metrics::inc(&state.metrics.operator_writes_refused);
        ApiError::new(
            StatusCode::CONFLICT,
            "write_would_lose",
            format!(
                "record \"{}\" in collection \"{}\" holds a version stamped beyond the hub clock's drift bound (a device clock ahead); this write could not win, so nothing was queued",
                lose.key, lose.collection
            ),
        )
    })?;
    Metrics::add(&state.metrics.downstream_changes_queued, count);
    let _ = state.events.send(EngineEvent::Enqueued {
        agent: agent.clone(),
        last: queued,
    });
    Ok(queued)
}

/// `PUT /v1/agents/{agent}/records/{collection}/{key}`: a downstream write,
/// checked against the policy, queued durably, delivered when the agent is
/// connected. Answers 202 with the queue position.
async fn put_record<S: HubStore>(
    State(state): State<Arc<ApiState<S>>>,
    path: Address,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let (agent, collection, key) = address(path)?;
    let body: Value = serde_json::from_slice(&body_bytes(body)?)
        .map_err(|e| ApiError::bad("invalid_json", format!("invalid JSON: {e}")))?;
    let write = DownWrite {
        collection,
        key,
        fields: patch_of(body)?,
    };
    check_policy(&state.policy, &write)?;
    check_fits(&state.origin, &write)?;
    let (collection, key) = (write.collection.clone(), write.key.clone());
    let queued = enqueue(&state, &agent, vec![write]).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "agent": agent,
            "collection": collection,
            "key": key,
            "queued_seq": queued,
            "agent_connected": state.connections.is_connected(&agent),
        })),
    ))
}

/// Most writes in one operator batch.
pub const MAX_BATCH_WRITES: usize = 1000;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchWrite {
    collection: String,
    key: String,
    fields: Value,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    writes: Vec<BatchWrite>,
}

/// `POST /v1/agents/{agent}/batch`: many downstream writes, all checked before
/// any is queued, queued in order in one durable transaction. Answers 202 with
/// the last queue position.
async fn batch<S: HubStore>(
    State(state): State<Arc<ApiState<S>>>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Path(agent) = path.map_err(|e| ApiError::bad("invalid_path", e.body_text()))?;
    let agent = AgentId::new(agent).map_err(|e| ApiError::bad("invalid_name", e.to_string()))?;
    let body: BatchBody = serde_json::from_slice(&body_bytes(body)?)
        .map_err(|e| ApiError::bad("invalid_json", format!("invalid JSON: {e}")))?;
    if body.writes.is_empty() || body.writes.len() > MAX_BATCH_WRITES {
        return Err(ApiError::bad(
            "invalid_body",
            format!(
                "a batch holds 1 to {MAX_BATCH_WRITES} writes; got {}",
                body.writes.len()
            ),
        ));
    }
    let mut writes = Vec::with_capacity(body.writes.len());
    for (i, w) in body.writes.into_iter().enumerate() {
        let at = |e: ApiError| ApiError {
            message: format!("writes[{i}]: {}", e.message),
            ..e
        };
        let name = |e: fieldsync_shared::IdError| at(ApiError::bad("invalid_name", e.to_string()));
        let write = DownWrite {
            collection: CollectionName::new(w.collection).map_err(name)?,
            key: RecordKey::new(w.key).map_err(name)?,
            fields: patch_of(w.fields).map_err(at)?,
        };
        check_policy(&state.policy, &write).map_err(at)?;
        check_fits(&state.origin, &write).map_err(at)?;
        writes.push(write);
    }
    let count = writes.len();
    let queued = enqueue(&state, &agent, writes).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "agent": agent,
            "queued": count,
            "last_seq": queued,
            "agent_connected": state.connections.is_connected(&agent),
        })),
    ))
}

async fn metrics<S: HubStore>(State(state): State<Arc<ApiState<S>>>) -> Json<Value> {
    let mut snapshot = json!(state.metrics.snapshot());
    snapshot["agents_connected"] = json!(state.connections.count());
    let connections = &state.connections;
    snapshot["agents_stalled"] = json!(state
        .health
        .stalled(|a| connections.is_connected(a), system_now_ms()));
    Json(snapshot)
}

/// `GET /metrics`: everything in [`crate::metrics`] in the Prometheus text
/// format (0.0.4), behind the operator token like every route but health.
async fn prometheus<S: HubStore>(
    State(state): State<Arc<ApiState<S>>>,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    prometheus_text::encode(&mut text, &state.prometheus).map_err(ApiError::internal)?;
    Ok((
        [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
        text,
    )
        .into_response())
}

/// Compares secrets without leaking where they differ through timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
