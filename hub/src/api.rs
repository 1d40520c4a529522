//! The operator API (JSON over HTTP, `Authorization: Bearer TOKEN`): the fleet's
//! agents, the hub's copy of their records, and downstream writes, which are
//! queued durably and accepted (202) whether or not the agent is connected;
//! the change feed ([`feed`]), the webhook endpoints ([`hooks`]), and the
//! hub's metrics, as JSON and for Prometheus (`GET /metrics`).

mod conflicts;
mod feed;
mod history;
mod hooks;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use fieldsync_http::{
    constant_time_eq, json_body, openapi_route, with_fallbacks, ErrorBody, FieldPatch, Key, Name,
};
use fieldsync_shared::history::{Cause, Writer};
use fieldsync_shared::hlc::system_now_ms;
use fieldsync_shared::record::{parse_patch, Edit, PatchError};
use fieldsync_shared::wire::{write_fits, MAX_CHANGE_BYTES};
use fieldsync_shared::FieldRule;
use fieldsync_shared::{
    AgentId, Change, CollectionName, FieldName, Flow, Hlc, Origin, Policy, RecordKey, RecordState,
    Seq, Value, Version,
};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, Ref, ResponseBuilder};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};

pub use fieldsync_http::ApiError;

use crate::engine::EngineEvent;
use crate::events::format_ms;
use crate::front_door::Connections;
use crate::health::{FleetHealth, SyncState};
use crate::labels::{self, Labels, Selector};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::store::{HubStore, StoreError, OPERATOR};
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

/// The API's routes. Every route is in [`ApiDoc`] (a test checks both ways).
pub fn router<S: HubStore>(state: Arc<ApiState<S>>) -> Router {
    let authed = Router::new()
        .route("/v1/agents", get(list_agents::<S>))
        .route(
            "/v1/agents/{agent}/records/{collection}/{key}",
            get(get_record::<S>).put(put_record::<S>),
        )
        .route(
            "/v1/agents/{agent}/records/{collection}/{key}/history",
            get(history::history::<S>),
        )
        .route(
            "/v1/agents/{agent}/records/{collection}/{key}/rollback",
            post(history::rollback::<S>),
        )
        .route("/v1/agents/{agent}/batch", post(batch::<S>))
        .route("/v1/agents/{agent}/labels", put(put_labels::<S>))
        .route("/v1/broadcast", post(broadcast::<S>))
        .route("/v1/conflicts", get(conflicts::list::<S>))
        .route("/v1/conflicts/{id}/resolve", post(conflicts::resolve::<S>))
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
    let open = Router::new().route("/v1/health", get(health));
    with_fallbacks(
        open.merge(openapi_route(&ApiDoc::openapi()))
            .merge(authed)
            .merge(crate::ui::router()),
    )
    .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
    .with_state(state)
}

/// The operator API's OpenAPI document (`GET /v1/openapi.json`, committed as
/// `docs/openapi/hub.json`).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Fieldsync hub operator API",
        description = "The fleet's agents, the hub's copy of their records, downstream writes, labels and broadcasts, the change feed, webhooks and metrics. Every route but /v1/health and /v1/openapi.json takes `Authorization: Bearer TOKEN`. Errors are `{\"error\": {\"code\", \"message\"}}`."
    ),
    paths(
        health,
        list_agents,
        get_record,
        put_record,
        history::history,
        history::rollback,
        batch,
        put_labels,
        broadcast,
        conflicts::list,
        conflicts::resolve,
        metrics,
        feed::changes,
        hooks::list,
        hooks::create,
        hooks::show,
        hooks::delete,
        hooks::deliveries,
        hooks::replay,
        prometheus,
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags((name = "fleet"), (name = "records"), (name = "feed"), (name = "webhooks"), (name = "metrics"))
)]
pub struct ApiDoc;

/// Declares the bearer token scheme, and its 401 answer on every operation
/// that needs the token (all but those marked `security(())`).
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        let unauthorized = ResponseBuilder::new()
            .description("Missing or wrong token")
            .content(
                "application/json",
                Content::new(Some(Ref::from_schema_name("ErrorBody"))),
            )
            .build();
        for item in doc.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
            ];
            for op in operations.into_iter().flatten() {
                let public = op
                    .security
                    .as_ref()
                    .is_some_and(|s| s.contains(&SecurityRequirement::default()));
                if !public {
                    op.responses
                        .responses
                        .insert("401".into(), unauthorized.clone().into());
                }
            }
        }
    }
}

/// `{"status": "ok"}`.
#[derive(Serialize, ToSchema)]
struct HealthBody {
    #[schema(example = "ok")]
    status: &'static str,
}

/// Whether the hub answers (no token needed).
#[utoipa::path(get, path = "/v1/health", tag = "fleet", security(()),
    responses((status = 200, description = "The hub answers", body = HealthBody)))]
async fn health() -> Json<HealthBody> {
    Json(HealthBody { status: "ok" })
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

/// `GET /v1/agents?selector=`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct AgentsQuery {
    /// Only agents whose labels match, e.g. `site=berlin,model!=gw2`.
    #[param(example = "site=berlin")]
    selector: Option<String>,
}

/// The fleet.
#[derive(Serialize, ToSchema)]
struct AgentList {
    agents: Vec<AgentView>,
}

/// One agent: link, sync health (from its last report), queues and labels.
#[derive(Serialize, ToSchema)]
struct AgentView {
    id: String,
    connected: bool,
    state: SyncState,
    /// Outbox entries the agent has not had acknowledged (last report).
    outbox_pending: Option<u64>,
    outbox_bytes: Option<u64>,
    /// Age of the agent's oldest pending entry.
    oldest_pending_ms: Option<u64>,
    /// Entries acknowledged per second over the agent's last report interval.
    drain_per_s: Option<f64>,
    /// The correction the agent applies to its device clock.
    agent_clock_offset_ms: Option<i64>,
    /// When the last health report came (RFC 3339).
    health_reported: Option<String>,
    /// The agent's last applied batch or hello (RFC 3339).
    last_seen: Option<String>,
    /// Downstream entries waiting for the agent.
    queue_pending: u64,
    up_applied: u64,
    changes_applied: u64,
    incarnation: Option<String>,
    /// The agent's clock minus the hub's at its last hello.
    clock_skew_ms: Option<i64>,
    resyncs: u64,
    identity_conflicts: u64,
    labels: Labels,
    /// The serial (hex) of the certificate the agent last connected with since
    /// the hub started.
    serial: Option<String>,
    /// That certificate's expiry (RFC 3339).
    not_after: Option<String>,
}

/// Every agent the hub knows, with link state, sync health and queue size.
#[utoipa::path(get, path = "/v1/agents", tag = "fleet", params(AgentsQuery),
    responses(
        (status = 200, description = "The agents, ordered by id", body = AgentList),
        (status = 400, description = "A malformed selector", body = ErrorBody),
    ))]
async fn list_agents<S: HubStore>(
    State(state): State<Arc<ApiState<S>>>,
    query: Result<Query<AgentsQuery>, QueryRejection>,
) -> Result<Json<AgentList>, ApiError> {
    let Query(q) = query?;
    let selector = q
        .selector
        .map(|text| {
            Selector::parse(&text).map_err(|e| ApiError::bad("invalid_selector", e.to_string()))
        })
        .transpose()?;
    let rows = blocking(&state.store, |s| s.agents()).await?;
    let now = system_now_ms();
    let agents = rows
        .into_iter()
        .filter(|(_, row)| selector.as_ref().is_none_or(|s| s.matches(&row.labels)))
        .map(|(id, row)| {
            let connected = state.connections.is_connected(&id);
            let (sync_state, health) = state.health.state(&id, connected, now);
            let report = health.and_then(|h| h.report.map(|r| (r, h.report_at_ms)));
            let certificate = state.connections.certificate(&id);
            AgentView {
                connected,
                state: sync_state,
                outbox_pending: report.map(|(r, _)| r.outbox_pending),
                outbox_bytes: report.map(|(r, _)| r.outbox_bytes),
                oldest_pending_ms: report.and_then(|(r, _)| r.oldest_pending_ms),
                drain_per_s: report.map(|(r, _)| r.drain_per_s),
                agent_clock_offset_ms: report.map(|(r, _)| r.clock_offset_ms),
                health_reported: report.map(|(_, at)| format_ms(at)),
                last_seen: row.last_seen_ms.map(format_ms),
                queue_pending: row.queue_pending(),
                up_applied: row.up_applied.0,
                changes_applied: row.changes_applied,
                incarnation: row.identity.current.map(|i| i.to_string()),
                clock_skew_ms: row.clock_skew_ms,
                resyncs: row.resyncs,
                identity_conflicts: row.identity_conflicts,
                labels: row.labels,
                serial: certificate.as_ref().map(|c| c.serial.clone()),
                not_after: certificate.map(|c| format_ms(c.not_after_s.max(0) as u64 * 1000)),
                id: id.to_string(),
            }
        })
        .collect();
    Ok(Json(AgentList { agents }))
}

/// The path of one of an agent's records.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // read through `Address`; here for the document
struct RecordPath {
    /// The agent's id (its certificate's common name).
    #[param(value_type = Name, inline)]
    agent: String,
    #[param(value_type = Name, inline)]
    collection: String,
    /// Any text without control characters, at most 256 bytes.
    #[param(value_type = Key, inline)]
    key: String,
}

/// The path of an agent.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // read through `Path<String>`; here for the document
struct AgentPath {
    #[param(value_type = Name, inline)]
    agent: String,
}

type Address = Result<Path<(String, String, String)>, PathRejection>;

fn address(path: Address) -> Result<(AgentId, CollectionName, RecordKey), ApiError> {
    let Path((agent, collection, key)) = path?;
    Ok((
        agent_id(agent)?,
        CollectionName::new(collection).map_err(invalid_name)?,
        RecordKey::new(key).map_err(invalid_name)?,
    ))
}

fn invalid_name(e: fieldsync_shared::IdError) -> ApiError {
    ApiError::bad("invalid_name", e.to_string())
}

fn agent_id(text: String) -> Result<AgentId, ApiError> {
    AgentId::new(text).map_err(invalid_name)
}

/// The hub's copy of a record: its visible (permitted) fields.
#[derive(Serialize, ToSchema)]
struct RecordOut {
    agent: String,
    collection: String,
    key: String,
    /// Field name to value (any JSON).
    #[schema(value_type = Object)]
    fields: serde_json::Map<String, Value>,
    /// Fields with concurrent values on record (merge rule `review`, or a
    /// `prefer` rule that decided): field name to every candidate value.
    /// Absent when there are none.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(value_type = Option<Object>)]
    conflicts: BTreeMap<FieldName, Vec<Value>>,
}

fn view(
    agent: &AgentId,
    collection: &CollectionName,
    key: &RecordKey,
    state: &RecordState,
) -> RecordOut {
    RecordOut {
        agent: agent.to_string(),
        collection: collection.to_string(),
        key: key.to_string(),
        fields: state
            .visible()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        conflicts: state.conflicts(),
    }
}

/// The hub's copy of one of an agent's records.
#[utoipa::path(get, path = "/v1/agents/{agent}/records/{collection}/{key}", tag = "records",
    params(RecordPath),
    responses(
        (status = 200, description = "The hub's copy", body = RecordOut),
        (status = 400, description = "An invalid agent id, collection name or key", body = ErrorBody),
        (status = 404, description = "The hub has no such record", body = ErrorBody),
    ))]
async fn get_record<S: HubStore>(
    State(state): State<Arc<ApiState<S>>>,
    path: Address,
) -> Result<Json<RecordOut>, ApiError> {
    let (agent, collection, key) = address(path)?;
    let (a, c, k) = (agent.clone(), collection.clone(), key.clone());
    let found = blocking(&state.store, move |s| s.record(&a, &c, &k)).await?;
    match found.filter(RecordState::exists) {
        Some(record) => Ok(Json(view(&agent, &collection, &key, &record))),
        None => Err(ApiError::not_found(
            "not_found",
            format!("the hub has no record \"{key}\" in collection \"{collection}\" of agent \"{agent}\""),
        )),
    }
}

/// One validated downstream write.
#[derive(Clone)]
pub(crate) struct DownWrite {
    collection: CollectionName,
    key: RecordKey,
    fields: Vec<(FieldName, Option<Value>)>,
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
    edits_of(policy, write).map(drop)
}

/// The write's edits under its fields' merge rules: 400 when one does not
/// fit (a value for a counter, an increment for anything else), 422 when a
/// value breaks the collection's schema.
fn edits_of(policy: &Policy, write: &DownWrite) -> Result<Vec<(FieldName, Edit)>, ApiError> {
    let edits = Edit::of_fields(&write.fields, |f| policy.field_rule(&write.collection, f))
        .map_err(|e| ApiError::bad("invalid_edit", e.to_string()))?;
    policy
        .check_edits(&write.collection, &edits)
        .map_err(|v| ApiError::schema(&write.collection, &v))?;
    Ok(edits)
}

/// A write that cannot win against the hub's copy.
#[derive(Debug, Clone)]
struct Lose {
    agent: AgentId,
    collection: CollectionName,
    key: RecordKey,
}

/// What [`enqueue`] did for each agent, in order.
type Enqueued = Vec<(AgentId, Result<Seq, Lose>)>;

/// Stamps each agent's writes with the hub clock and queues them, for all the
/// agents in one durable transaction. An agent whose writes include one that
/// could not win gets none of them (its `Lose` says which); the others are
/// queued.
async fn enqueue<S: HubStore>(
    state: &ApiState<S>,
    batches: Vec<(AgentId, Vec<DownWrite>)>,
    writer: Writer,
) -> Result<Enqueued, ApiError> {
    let hlc = state.hlc.clone();
    let origin = state.origin.clone();
    let policy = state.policy.clone();
    let batches = batches
        .into_iter()
        .map(|(agent, writes)| {
            let writes = writes
                .into_iter()
                .map(|w| Ok((edits_of(&policy, &w)?, w)))
                .collect::<Result<Vec<_>, ApiError>>()?;
            Ok((agent, writes))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let outcome = blocking(&state.store, move |store| {
        let incarnation = store.incarnation()?.0;
        // The clock lock spans stamping and the commit that persists it, so the
        // persisted clock state only moves forward.
        let mut clock = hlc.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = system_now_ms();
        let mut outcome = Vec::with_capacity(batches.len());
        let mut queues = Vec::with_capacity(batches.len());
        for (agent, writes) in batches {
            // Stamps observed from agents live only in memory until this
            // commit; the hub's copy of each record bounds them, so an
            // operator write sorts after what the hub already holds — unless
            // that copy holds a stamp beyond the clock's drift bound, which
            // the clock refuses to follow: such a write could not win, so it
            // is refused (409) rather than accepted and silently lost.
            // Each record's copy, read once and carried through the writes
            // to it, so two writes to one record in one call build on each
            // other (two increments count twice).
            let mut copies: HashMap<(CollectionName, RecordKey), RecordState> = HashMap::new();
            for (_, w) in &writes {
                let at = (w.collection.clone(), w.key.clone());
                if copies.contains_key(&at) {
                    continue;
                }
                let copy = store
                    .record(&agent, &w.collection, &w.key)?
                    .unwrap_or_default();
                if let Some(v) = copy.max_version() {
                    let _ = clock.observe(v.stamp, now);
                }
                copies.insert(at, copy);
            }
            let mut changes = Vec::with_capacity(writes.len());
            let mut lost = None;
            for (edits, w) in writes {
                let version = Version {
                    stamp: clock.tick(now),
                    origin: origin.clone(),
                };
                let copy = copies
                    .entry((w.collection.clone(), w.key.clone()))
                    .or_default();
                let rule_of = |f: &FieldName| policy.field_rule(&w.collection, f);
                // A plain field whose copy holds a later stamp would not
                // take the write; a ruled field takes it by its rule (a
                // counter always counts; review and prefer know what the
                // write had seen).
                let beaten = copy.deleted.iter().any(|d| d >= &version)
                    || w.fields.iter().any(|(f, _)| {
                        rule_of(f) == FieldRule::LWW
                            && copy
                                .fields
                                .get(f)
                                .is_some_and(|held| held.version >= version)
                    });
                if beaten {
                    lost = Some(Lose {
                        agent: agent.clone(),
                        collection: w.collection,
                        key: w.key,
                    });
                    break;
                }
                let Ok(state) = copy.edit(edits, &version, incarnation, rule_of) else {
                    unreachable!("edits_of checked every edit against the same policy")
                };
                if state.is_empty() {
                    // A max or min write that does not move the extreme.
                    continue;
                }
                changes.push(Change {
                    collection: w.collection,
                    key: w.key,
                    state,
                });
            }
            match lost {
                Some(lose) => outcome.push((agent, Err(lose))),
                None => {
                    outcome.push((agent.clone(), Ok(Seq(0))));
                    queues.push((agent, changes));
                }
            }
        }
        if !queues.is_empty() {
            let lasts = store.enqueue_downstream_group(&queues, &writer, clock.last(), now)?;
            let mut lasts = lasts.into_iter();
            for (_, result) in outcome.iter_mut() {
                if let Ok(seq) = result {
                    *seq = lasts.next().unwrap_or_default();
                }
            }
        }
        Ok(outcome)
    })
    .await?;
    for (agent, result) in &outcome {
        match result {
            Ok(last) => {
                let _ = state.events.send(EngineEvent::Enqueued {
                    agent: agent.clone(),
                    last: *last,
                });
            }
            Err(_) => Metrics::inc(&state.metrics.operator_writes_refused),
        }
    }
    Ok(outcome)
}

/// [`enqueue`] for one agent, whose writes are all queued or none (409), as
/// an operator's writes.
async fn enqueue_one<S: HubStore>(
    state: &ApiState<S>,
    agent: &AgentId,
    writes: Vec<DownWrite>,
) -> Result<Seq, ApiError> {
    enqueue_one_by(state, agent, writes, Writer::new(OPERATOR, Cause::Operator)).await
}

/// [`enqueue_one`] by `writer` (what the versions it makes are recorded as).
async fn enqueue_one_by<S: HubStore>(
    state: &ApiState<S>,
    agent: &AgentId,
    writes: Vec<DownWrite>,
    writer: Writer,
) -> Result<Seq, ApiError> {
    let count = writes.len() as u64;
    let mut outcome = enqueue(state, vec![(agent.clone(), writes)], writer).await?;
    match outcome.pop().map(|(_, r)| r) {
        Some(Ok(last)) => {
            Metrics::add(&state.metrics.downstream_changes_queued, count);
            Ok(last)
        }
        Some(Err(lose)) => Err(would_lose(&lose)),
        None => Err(ApiError::internal("enqueue answered nothing")),
    }
}

fn would_lose(lose: &Lose) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "write_would_lose",
        format!(
            "record \"{}\" in collection \"{}\" holds a version stamped beyond the hub clock's drift bound (a device clock ahead); this write could not win, so nothing was queued",
            lose.key, lose.collection
        ),
    )
}

/// A downstream write's place in the agent's queue.
#[derive(Serialize, ToSchema)]
pub(crate) struct Queued {
    agent: String,
    collection: String,
    key: String,
    /// The write's sequence number in the agent's downstream queue.
    queued_seq: u64,
    agent_connected: bool,
}

/// A downstream write: checked against the policy, queued durably, delivered
/// when the agent is connected (202 whether or not it is now).
#[utoipa::path(put, path = "/v1/agents/{agent}/records/{collection}/{key}", tag = "records",
    params(RecordPath),
    request_body(content = FieldPatch),
    responses(
        (status = 202, description = "Queued durably", body = Queued),
        (status = 400, description = "Invalid JSON, names or fields", body = ErrorBody),
        (status = 422, description = "A value breaks its collection's schema (the field and its rule are named); nothing written", body = ErrorBody),
        (status = 403, description = "The policy does not let these fields flow down", body = ErrorBody),
        (status = 409, description = "The write could not win against the hub's copy", body = ErrorBody),
        (status = 413, description = "The body or the change is too large", body = ErrorBody),
    ))]
async fn put_record<S: HubStore>(
    State(state): State<Arc<ApiState<S>>>,
    path: Address,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Queued>), ApiError> {
    let (agent, collection, key) = address(path)?;
    let write = DownWrite {
        collection,
        key,
        fields: patch_of(json_body(body)?)?,
    };
    check_policy(&state.policy, &write)?;
    check_fits(&state.origin, &write)?;
    let (collection, key) = (write.collection.clone(), write.key.clone());
    let queued = enqueue_one(&state, &agent, vec![write]).await?;
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

/// Most writes in one operator batch or broadcast.
pub const MAX_BATCH_WRITES: usize = 1000;

/// One write of a batch or broadcast.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct BatchWrite {
    #[schema(value_type = Name, inline)]
    collection: String,
    #[schema(value_type = Key, inline)]
    key: String,
    #[schema(value_type = FieldPatch)]
    fields: Value,
}

/// `POST /v1/agents/{agent}/batch`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    /// 1 to 1000 writes, queued in this order.
    writes: Vec<BatchWrite>,
}

/// Validates 1 to [`MAX_BATCH_WRITES`] writes: names, policy and size.
fn down_writes(
    state: &ApiState<impl HubStore>,
    writes: Vec<BatchWrite>,
) -> Result<Vec<DownWrite>, ApiError> {
    if writes.is_empty() || writes.len() > MAX_BATCH_WRITES {
        return Err(ApiError::bad(
            "invalid_body",
            format!(
                "a batch holds 1 to {MAX_BATCH_WRITES} writes; got {}",
                writes.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(writes.len());
    for (i, w) in writes.into_iter().enumerate() {
        let at = |e: ApiError| e.within(format_args!("writes[{i}]"));
        let write = DownWrite {
            collection: CollectionName::new(w.collection).map_err(|e| at(invalid_name(e)))?,
            key: RecordKey::new(w.key).map_err(|e| at(invalid_name(e)))?,
            fields: patch_of(w.fields).map_err(at)?,
        };
        check_policy(&state.policy, &write).map_err(at)?;
        check_fits(&state.origin, &write).map_err(at)?;
        out.push(write);
    }
    Ok(out)
}

/// A batch's place in the agent's queue.
#[derive(Serialize, ToSchema)]
struct BatchQueued {
    agent: String,
    /// Writes queued.
    queued: usize,
    /// The last write's sequence number in the agent's downstream queue.
    last_seq: u64,
    agent_connected: bool,
}

/// Many downstream writes to one agent, all checked before any is queued,
/// queued in order in one durable transaction.
#[utoipa::path(post, path = "/v1/agents/{agent}/batch", tag = "records",
    params(AgentPath),
    request_body = BatchBody,
    responses(
        (status = 202, description = "All queued durably", body = BatchQueued),
        (status = 400, description = "Invalid JSON, names or fields; nothing queued", body = ErrorBody),
        (status = 422, description = "A value breaks its collection's schema (the field and its rule are named); nothing written", body = ErrorBody),
        (status = 403, description = "The policy refuses a write; nothing queued", body = ErrorBody),
        (status = 409, description = "A write could not win; nothing queued", body = ErrorBody),
        (status = 413, description = "The body or a change is too large", body = ErrorBody),
    ))]
async fn batch<S: HubStore>(
    State(state): State<Arc<ApiState<S>>>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<BatchQueued>), ApiError> {
    let Path(agent) = path?;
    let agent = agent_id(agent)?;
    let body: BatchBody = json_body(body)?;
    let writes = down_writes(&state, body.writes)?;
    let count = writes.len();
    let queued = enqueue_one(&state, &agent, writes).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(BatchQueued {
            agent: agent.to_string(),
            queued: count,
            last_seq: queued.0,
            agent_connected: state.connections.is_connected(&agent),
        }),
    ))
}

/// An agent's labels.
#[derive(Serialize, ToSchema)]
struct AgentLabels {
    agent: String,
    labels: Labels,
}

/// Replaces an agent's labels (a JSON object of label to value; `{}` clears
/// them). Keys: 1 to 63 of letters, digits and `-_./`, starting with a letter
/// or digit; values: 0 to 63 of letters, digits and `-_.`; at most 32.
#[utoipa::path(put, path = "/v1/agents/{agent}/labels", tag = "fleet",
    params(AgentPath),
    request_body(content = HashMap<String, String>, description = "Label to value", example = json!({"site": "berlin", "model": "gw3"})),
    responses(
        (status = 200, description = "The agent's labels now", body = AgentLabels),
        (status = 400, description = "Invalid labels; nothing changed", body = ErrorBody),
        (status = 404, description = "The hub has never heard of this agent", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
    ))]
async fn put_labels<S: HubStore>(
    State(state): State<Arc<ApiState<S>>>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<AgentLabels>, ApiError> {
    let Path(agent) = path?;
    let agent = agent_id(agent)?;
    let labels: Labels = json_body(body)?;
    labels::validate(&labels).map_err(|e| ApiError::bad("invalid_labels", e.to_string()))?;
    let (a, l) = (agent.clone(), labels.clone());
    if !blocking(&state.store, move |s| s.set_labels(&a, &l)).await? {
        return Err(ApiError::not_found(
            "unknown_agent",
            format!("the hub has never heard of agent \"{agent}\"; it needs to connect once first"),
        ));
    }
    Ok(Json(AgentLabels {
        agent: agent.to_string(),
        labels,
    }))
}

/// `POST /v1/broadcast`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct BroadcastBody {
    /// Which agents: a label selector such as `site=berlin,model!=gw2`.
    #[schema(example = "site=berlin")]
    selector: String,
    /// 1 to 1000 writes queued to every selected agent, in this order.
    writes: Vec<BatchWrite>,
}

/// What a broadcast queued.
#[derive(Serialize, ToSchema)]
struct BroadcastOut {
    /// The selector as parsed.
    selector: String,
    /// Agents the selector matched.
    agents: usize,
    /// Agents the writes were queued to.
    queued_agents: usize,
    /// Writes queued in all (writes × queued agents).
    queued: u64,
    /// Agents that got none of the writes, and why.
    refused: Vec<BroadcastRefusal>,
}

/// An agent a broadcast could not be queued to.
#[derive(Serialize, ToSchema)]
struct BroadcastRefusal {
    agent: String,
    collection: String,
    key: String,
    /// `write_would_lose`: the hub's copy holds a version stamped beyond the
    /// clock's drift bound.
    code: &'static str,
}

/// Agents in one broadcast transaction: each chunk of agents is queued in
/// one durable transaction of at most about this many writes.
pub const BROADCAST_CHUNK_WRITES: usize = 2000;

/// Queues the same writes to every agent whose labels match the selector
/// now; an agent labelled later does not get this broadcast. Each chunk of
/// agents is one durable transaction.
#[utoipa::path(post, path = "/v1/broadcast", tag = "fleet",
    request_body = BroadcastBody,
    responses(
        (status = 202, description = "Queued durably to every selected agent but the refused ones", body = BroadcastOut),
        (status = 400, description = "Invalid JSON, selector, names or fields; nothing queued", body = ErrorBody),
        (status = 422, description = "A value breaks its collection's schema (the field and its rule are named); nothing written", body = ErrorBody),
        (status = 403, description = "The policy refuses a write; nothing queued", body = ErrorBody),
        (status = 413, description = "The body or a change is too large", body = ErrorBody),
    ))]
async fn broadcast<S: HubStore>(
    State(state): State<Arc<ApiState<S>>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<BroadcastOut>), ApiError> {
    let body: BroadcastBody = json_body(body)?;
    let selector = Selector::parse(&body.selector)
        .map_err(|e| ApiError::bad("invalid_selector", e.to_string()))?;
    let writes = down_writes(&state, body.writes)?;
    let agents: Vec<AgentId> = blocking(&state.store, |s| s.agents())
        .await?
        .into_iter()
        .filter(|(_, row)| selector.matches(&row.labels))
        .map(|(id, _)| id)
        .collect();
    let per_chunk = (BROADCAST_CHUNK_WRITES / writes.len()).max(1);
    let mut out = BroadcastOut {
        selector: selector.to_string(),
        agents: agents.len(),
        queued_agents: 0,
        queued: 0,
        refused: Vec::new(),
    };
    for chunk in agents.chunks(per_chunk) {
        let batches = chunk
            .iter()
            .map(|agent| (agent.clone(), writes.clone()))
            .collect();
        let writer = Writer::new(OPERATOR, Cause::Operator);
        for (_, result) in enqueue(&state, batches, writer).await? {
            match result {
                Ok(_) => {
                    out.queued_agents += 1;
                    out.queued += writes.len() as u64;
                }
                Err(lose) => out.refused.push(BroadcastRefusal {
                    agent: lose.agent.to_string(),
                    collection: lose.collection.to_string(),
                    key: lose.key.to_string(),
                    code: "write_would_lose",
                }),
            }
        }
    }
    Metrics::add(&state.metrics.downstream_changes_queued, out.queued);
    tracing::info!(selector = %out.selector, agents = out.agents, queued = out.queued, refused = out.refused.len(), "broadcast queued");
    Ok((StatusCode::ACCEPTED, Json(out)))
}

/// The hub's counters, and the agents connected and stalled now.
#[derive(Serialize, ToSchema)]
struct MetricsBody {
    #[serde(flatten)]
    counters: MetricsSnapshot,
    agents_connected: usize,
    agents_stalled: usize,
}

/// The hub's counters as JSON (`GET /metrics` has everything, for Prometheus).
#[utoipa::path(get, path = "/v1/metrics", tag = "metrics",
    responses(
        (status = 200, description = "Counters since the hub started", body = MetricsBody),
    ))]
async fn metrics<S: HubStore>(State(state): State<Arc<ApiState<S>>>) -> Json<MetricsBody> {
    let connections = &state.connections;
    Json(MetricsBody {
        counters: state.metrics.snapshot(),
        agents_connected: connections.count(),
        agents_stalled: state
            .health
            .stalled(|a| connections.is_connected(a), system_now_ms()),
    })
}

/// Everything in the hub's metrics in the Prometheus text format (0.0.4).
#[utoipa::path(get, path = "/metrics", tag = "metrics",
    responses(
        (status = 200, description = "Prometheus text exposition format 0.0.4", body = String, content_type = "text/plain"),
    ))]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_covers_every_route_and_its_committed_copy_is_current() {
        let committed =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi/hub.json");
        fieldsync_http::check_document(&ApiDoc::openapi(), &[include_str!("api.rs")], &committed)
            .unwrap();
    }
}
