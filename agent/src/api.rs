//! The agent's local HTTP API (JSON): what applications on the device use to
//! write and read records, the agent's status, and `GET /metrics` for
//! Prometheus. Every error is a JSON body
//! `{"error": {"code": "...", "message": "..."}}` with a fitting status, and a
//! rejected request changes nothing.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fieldsync_http::conflicts::{conflicts_of, ConflictOut};
use fieldsync_http::history::{HistoryOut, HistoryQuery};
use fieldsync_http::{json_body, openapi_route, with_fallbacks, ErrorBody, FieldPatch, Key, Name};
use fieldsync_shared::record::{parse_patch, PatchError};
use fieldsync_shared::wire::{write_fits, MAX_CHANGE_BYTES};
use fieldsync_shared::{
    AgentId, CollectionName, Edit, FieldName, Incarnation, Origin, Policy, RecordKey, Seq, Value,
};
use prometheus_client::encoding::prometheus_text;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

pub use fieldsync_http::ApiError;

use crate::link::LinkStatus;
use crate::metrics::{self, Sources, StoreReadings};
use crate::store::{RecordView, Store, WriteOp, WriteOutcome};
use crate::writer::{CorrectedClock, WriteError, Writer};

/// Most writes one batch request may carry.
pub const MAX_BATCH_WRITES: usize = 1000;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub agent_id: AgentId,
    pub store: Store,
    pub writer: Writer,
    /// Whether the hub link is up (always false until the link exists).
    pub incarnation: Incarnation,
    pub link: Arc<LinkStatus>,
    pub clock: CorrectedClock,
    pub hub_configured: bool,
    /// The policy, for its merge rules.
    pub policy: Arc<Policy>,
}

/// The API's routes. Every route is in [`ApiDoc`] (a test checks both ways).
pub fn router(state: ApiState, max_body_bytes: usize) -> Router {
    let routes = Router::new()
        .route(
            "/v1/records/{collection}/{key}",
            get(get_record).put(put_record).delete(delete_record),
        )
        .route("/v1/records/{collection}/{key}/history", get(history))
        .route("/v1/batch", post(batch))
        .route("/v1/status", get(status))
        .route("/v1/outbox", get(outbox))
        .route("/v1/conflicts", get(conflicts))
        .route("/v1/progress", get(progress))
        .route("/v1/health", get(health))
        .route("/metrics", get(prometheus))
        .merge(openapi_route(&ApiDoc::openapi()));
    with_fallbacks(routes)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// The local API's OpenAPI document (`GET /v1/openapi.json`, committed as
/// `docs/openapi/agent.json`).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Fieldsync agent local API",
        description = "What applications on the device use: write and read records (every field is stored; only the fields the policy permits are synced), the agent's status and outbox, and metrics. Errors are `{\"error\": {\"code\", \"message\"}}`; a refused request changes nothing."
    ),
    paths(put_record, get_record, delete_record, history, batch, conflicts, status, outbox, progress, health, prometheus),
    tags((name = "records"), (name = "status"))
)]
pub struct ApiDoc;

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Closed => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the agent is shutting down",
            ),
            e => Self::internal(e),
        }
    }
}

type Address = Result<Path<(String, String)>, PathRejection>;

/// The path of a record.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // read through `Address`; here for the document
struct RecordPath {
    #[param(value_type = Name, inline)]
    collection: String,
    /// Any text without control characters, at most 256 bytes.
    #[param(value_type = Key, inline)]
    key: String,
}

fn invalid_name(e: fieldsync_shared::IdError) -> ApiError {
    ApiError::bad("invalid_name", e.to_string())
}

fn address(path: Address) -> Result<(CollectionName, RecordKey), ApiError> {
    let Path((collection, key)) = path?;
    let collection = CollectionName::new(collection).map_err(invalid_name)?;
    let key = RecordKey::new(key).map_err(invalid_name)?;
    Ok((collection, key))
}

/// Validates a partial update (see [`parse_patch`]).
fn fields_of(body: Value) -> Result<Vec<(FieldName, Option<Value>)>, ApiError> {
    parse_patch(body).map_err(|e| {
        let code = match e {
            PatchError::FieldName(_) => "invalid_name",
            _ => "invalid_body",
        };
        ApiError::bad(code, e.to_string())
    })
}

/// Refuses a patch that does not fit its fields' merge rules (a value for a
/// counter, an increment for anything else: 400) or breaks the collection's
/// schema (422); nothing is written.
fn check_rules(
    state: &ApiState,
    collection: &CollectionName,
    fields: &[(FieldName, Option<Value>)],
) -> Result<(), ApiError> {
    let edits = Edit::of_fields(fields, |f| state.policy.field_rule(collection, f))
        .map_err(|e| ApiError::bad("invalid_edit", e.to_string()))?;
    state
        .policy
        .check_edits(collection, &edits)
        .map_err(|v| ApiError::schema(collection, &v))
}

/// Refuses a write whose change could not travel in one message (it would
/// block the outbox behind it).
fn check_fits(
    state: &ApiState,
    collection: &CollectionName,
    key: &RecordKey,
    fields: &[(FieldName, Option<Value>)],
) -> Result<(), ApiError> {
    if write_fits(collection, key, fields, &Origin::agent(&state.agent_id)) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "change_too_large",
        format!("one write may encode to at most {MAX_CHANGE_BYTES} bytes; split it"),
    ))
}

/// A partial update: sets the given fields (null deletes one), creating the
/// record if needed, in one durable transaction; answers the stored record.
#[utoipa::path(put, path = "/v1/records/{collection}/{key}", tag = "records", params(RecordPath),
    request_body(content = FieldPatch),
    responses(
        (status = 200, description = "The record as stored", body = RecordView),
        (status = 400, description = "Invalid JSON, names or fields", body = ErrorBody),
        (status = 422, description = "A value breaks its collection's schema (the field and its rule are named); nothing written", body = ErrorBody),
        (status = 413, description = "The body or the change is too large", body = ErrorBody),
        (status = 503, description = "The agent is shutting down", body = ErrorBody),
    ))]
async fn put_record(
    State(state): State<ApiState>,
    path: Address,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<RecordView>, ApiError> {
    let (collection, key) = address(path)?;
    let fields = fields_of(json_body(body)?)?;
    check_rules(&state, &collection, &fields)?;
    check_fits(&state, &collection, &key, &fields)?;
    let op = WriteOp::Put {
        collection,
        key,
        fields,
    };
    match single(state.writer.write(vec![op]).await?)? {
        WriteOutcome::Stored(view) => Ok(Json(view)),
        other => Err(ApiError::internal(format!("unexpected outcome {other:?}"))),
    }
}

fn single(mut outcomes: Vec<WriteOutcome>) -> Result<WriteOutcome, ApiError> {
    outcomes
        .pop()
        .ok_or_else(|| ApiError::internal("write returned no outcome"))
}

fn not_found(collection: &CollectionName, key: &RecordKey) -> ApiError {
    ApiError::not_found(
        "not_found",
        format!("no record \"{key}\" in collection \"{collection}\""),
    )
}

/// A record's visible fields.
#[utoipa::path(get, path = "/v1/records/{collection}/{key}", tag = "records", params(RecordPath),
    responses(
        (status = 200, description = "The record", body = RecordView),
        (status = 400, description = "An invalid collection name or key", body = ErrorBody),
        (status = 404, description = "No such record", body = ErrorBody),
    ))]
async fn get_record(
    State(state): State<ApiState>,
    path: Address,
) -> Result<Json<RecordView>, ApiError> {
    let (collection, key) = address(path)?;
    let (c, k) = (collection.clone(), key.clone());
    let found = read(&state.store, move |s| s.get(&c, &k)).await?;
    found.map(Json).ok_or_else(|| not_found(&collection, &key))
}

/// The versions this agent keeps of a record, newest first: its own writes
/// and what came from the hub, with the permitted fields each changed
/// (fields the policy keeps on the device are not recorded).
#[utoipa::path(get, path = "/v1/records/{collection}/{key}/history", tag = "records",
    params(RecordPath, HistoryQuery),
    responses(
        (status = 200, description = "The record's versions (none when it has no history)", body = HistoryOut),
        (status = 400, description = "An invalid collection name, key or limit", body = ErrorBody),
    ))]
async fn history(
    State(state): State<ApiState>,
    path: Address,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Json<HistoryOut>, ApiError> {
    let (collection, key) = address(path)?;
    let Query(q) = query?;
    let limit = q.limit().map_err(|m| ApiError::bad("invalid_query", m))?;
    let (c, k) = (collection.clone(), key.clone());
    let versions = read(&state.store, move |s| s.history(&c, &k, limit)).await?;
    Ok(Json(HistoryOut::of(None, &collection, &key, &versions)))
}

/// A delete's outcome.
#[derive(Serialize, ToSchema)]
struct Deleted {
    #[schema(value_type = String)]
    collection: CollectionName,
    #[schema(value_type = String)]
    key: RecordKey,
    /// Whether a record was there to delete.
    deleted: bool,
}

/// Deletes a record (synced as a delete where the policy lets the
/// collection flow).
#[utoipa::path(delete, path = "/v1/records/{collection}/{key}", tag = "records", params(RecordPath),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 400, description = "An invalid collection name or key", body = ErrorBody),
        (status = 404, description = "No such record", body = ErrorBody),
        (status = 503, description = "The agent is shutting down", body = ErrorBody),
    ))]
async fn delete_record(
    State(state): State<ApiState>,
    path: Address,
) -> Result<Json<Deleted>, ApiError> {
    let (collection, key) = address(path)?;
    let op = WriteOp::Delete {
        collection: collection.clone(),
        key: key.clone(),
    };
    match single(state.writer.write(vec![op]).await?)? {
        WriteOutcome::Deleted => Ok(Json(Deleted {
            collection,
            key,
            deleted: true,
        })),
        _ => Err(not_found(&collection, &key)),
    }
}

/// One write of a batch request.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct BatchWrite {
    #[schema(value_type = Name, inline)]
    collection: String,
    #[schema(value_type = Key, inline)]
    key: String,
    /// Fields to set, as in `PUT`.
    #[serde(default)]
    #[schema(value_type = Option<FieldPatch>)]
    fields: Option<Value>,
    /// `true` deletes the record instead.
    #[serde(default)]
    delete: bool,
}

/// `POST /v1/batch`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    /// 1 to 1000 writes, each with either `fields` or `"delete": true`.
    writes: Vec<BatchWrite>,
}

/// One write's outcome: the stored record, or a delete's.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
enum BatchResult {
    Stored(RecordView),
    Deleted(Deleted),
}

/// Every write's outcome, in order.
#[derive(Serialize, ToSchema)]
struct BatchResults {
    results: Vec<BatchResult>,
}

/// Many writes in one atomic, durable transaction: all or none.
#[utoipa::path(post, path = "/v1/batch", tag = "records",
    request_body = BatchBody,
    responses(
        (status = 200, description = "Every write stored", body = BatchResults),
        (status = 400, description = "Invalid JSON, names or fields; nothing stored", body = ErrorBody),
        (status = 422, description = "A value breaks its collection's schema (the field and its rule are named); nothing written", body = ErrorBody),
        (status = 413, description = "The body or a change is too large; nothing stored", body = ErrorBody),
        (status = 503, description = "The agent is shutting down", body = ErrorBody),
    ))]
async fn batch(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<BatchResults>, ApiError> {
    let body: BatchBody = json_body(body)?;
    if body.writes.is_empty() || body.writes.len() > MAX_BATCH_WRITES {
        return Err(ApiError::bad(
            "invalid_body",
            format!(
                "a batch holds 1 to {MAX_BATCH_WRITES} writes; got {}",
                body.writes.len()
            ),
        ));
    }
    let mut ops = Vec::with_capacity(body.writes.len());
    for (i, w) in body.writes.into_iter().enumerate() {
        let at = |e: ApiError| e.within(format_args!("writes[{i}]"));
        let collection = CollectionName::new(w.collection).map_err(|e| at(invalid_name(e)))?;
        let key = RecordKey::new(w.key).map_err(|e| at(invalid_name(e)))?;
        ops.push(match (w.fields, w.delete) {
            (None, true) => WriteOp::Delete { collection, key },
            (Some(fields), false) => {
                let fields = fields_of(fields).map_err(at)?;
                check_rules(&state, &collection, &fields).map_err(at)?;
                check_fits(&state, &collection, &key, &fields).map_err(at)?;
                WriteOp::Put {
                    collection,
                    key,
                    fields,
                }
            }
            _ => {
                return Err(at(ApiError::bad(
                    "invalid_body",
                    "each write has either \"fields\" or \"delete\": true",
                )))
            }
        });
    }
    let addresses: Vec<_> = ops
        .iter()
        .map(|op| match op {
            WriteOp::Put {
                collection, key, ..
            }
            | WriteOp::Delete { collection, key } => (collection.clone(), key.clone()),
        })
        .collect();
    let outcomes = state.writer.write(ops).await?;
    let results = outcomes
        .into_iter()
        .zip(addresses)
        .map(|(outcome, (collection, key))| match outcome {
            WriteOutcome::Stored(view) => BatchResult::Stored(view),
            WriteOutcome::Deleted | WriteOutcome::NotFound => BatchResult::Deleted(Deleted {
                deleted: matches!(outcome, WriteOutcome::Deleted),
                collection,
                key,
            }),
        })
        .collect();
    Ok(Json(BatchResults { results }))
}

/// Runs a blocking store read off the async threads.
async fn read<T: Send + 'static>(
    store: &Store,
    f: impl FnOnce(&Store) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)
}

/// Entries shown in `GET /v1/status`.
const STATUS_PREVIEW: usize = 10;

/// An outbox entry by names only (no values).
#[derive(Serialize, ToSchema)]
struct PreviewEntry {
    seq: u64,
    #[schema(value_type = String)]
    collection: CollectionName,
    #[schema(value_type = String)]
    key: RecordKey,
    /// The names of the fields the entry carries.
    #[schema(value_type = Vec<String>)]
    fields: Vec<FieldName>,
    record_deleted: bool,
}

/// The agent's identity, link and outbox.
#[derive(Serialize, ToSchema)]
struct Status {
    #[schema(value_type = String)]
    agent_id: AgentId,
    /// Whether the link to the hub is up.
    connected: bool,
    hub_configured: bool,
    /// This store's identity; a new one after a wipe.
    incarnation: String,
    /// Outbox entries not yet acknowledged by the hub.
    outbox_pending: u64,
    /// The first few pending entries.
    outbox_preview: Vec<PreviewEntry>,
    outbox_last_seq: u64,
    outbox_acked_seq: u64,
    down_applied_seq: u64,
    hub_incarnation: Option<String>,
    /// The correction applied to the device clock (hub minus device).
    clock_offset_ms: i64,
    resyncs: u64,
    resyncs_sent: u64,
    resyncs_received: u64,
    resync_running: bool,
    /// Hellos the hub refused because of this device's clock.
    clock_refused: u64,
    /// The hub refused this store's identity (another store claims it).
    identity_conflict: bool,
    /// The hub refused the link because this agent's merge rules (the
    /// policy's `merge` and `prefer` tables) are not the hub's.
    rules_mismatch: bool,
    /// Changes the hub applied without field values that break its schema
    /// (since this agent started).
    schema_refused: u64,
    /// Downstream field values this agent refused for breaking its schema
    /// (since it started).
    schema_refused_down: u64,
}

/// Identity, link state, and what waits in the outbox (the first few
/// entries by collection, key and field names).
#[utoipa::path(get, path = "/v1/status", tag = "status",
    responses((status = 200, description = "The agent's status", body = Status)))]
async fn status(State(state): State<ApiState>) -> Result<Json<Status>, ApiError> {
    let (pending, first, bounds, down, resyncs_received) = read(&state.store, |s| {
        Ok((
            s.outbox_len()?,
            s.outbox_entries(Seq(0), STATUS_PREVIEW)?,
            s.outbox_bounds()?,
            s.down_cursor()?,
            s.resyncs()?,
        ))
    })
    .await?;
    let link = &state.link;
    let resyncs_sent = link.resyncs_sent.load(Ordering::Relaxed);
    let outbox_preview = first
        .into_iter()
        .map(|(seq, change)| PreviewEntry {
            seq: seq.0,
            fields: change.state.fields.keys().cloned().collect(),
            record_deleted: change.state.deleted.is_some(),
            collection: change.collection,
            key: change.key,
        })
        .collect();
    Ok(Json(Status {
        agent_id: state.agent_id.clone(),
        connected: link.connected.load(Ordering::Relaxed),
        hub_configured: state.hub_configured,
        incarnation: state.incarnation.to_string(),
        outbox_pending: pending,
        outbox_preview,
        outbox_last_seq: bounds.last.0,
        outbox_acked_seq: bounds
            .acked
            .seq
            .0
            .max(link.acked_seq.load(Ordering::Relaxed)),
        down_applied_seq: down.at.seq.0,
        hub_incarnation: down.source.map(|i| i.to_string()),
        clock_offset_ms: state.clock.offset_ms(),
        resyncs: resyncs_sent + resyncs_received,
        resyncs_sent,
        resyncs_received,
        resync_running: link.resyncing.load(Ordering::Relaxed),
        clock_refused: link.clock_refused.load(Ordering::Relaxed),
        identity_conflict: link.identity_refused.load(Ordering::Relaxed),
        rules_mismatch: link.rules_refused.load(Ordering::Relaxed),
        schema_refused: link.schema_refused.load(Ordering::Relaxed),
        schema_refused_down: link.schema_refused_down.load(Ordering::Relaxed),
    }))
}

/// `{"status": "ok"}`.
#[derive(Serialize, ToSchema)]
struct HealthBody {
    #[schema(example = "ok")]
    status: &'static str,
}

/// Whether the agent answers.
#[utoipa::path(get, path = "/v1/health", tag = "status",
    responses((status = 200, description = "The agent answers", body = HealthBody)))]
async fn health() -> Json<HealthBody> {
    Json(HealthBody { status: "ok" })
}

/// The agent's metrics in the Prometheus text format (0.0.4), see
/// [`crate::metrics`].
#[utoipa::path(get, path = "/metrics", tag = "status",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4", body = String, content_type = "text/plain")))]
async fn prometheus(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let store = read(&state.store, |s| {
        let history = s.history_stats()?;
        Ok(StoreReadings {
            outbox_pending: s.outbox_len()?,
            resyncs_received: s.resyncs()?,
            history_bytes: history.bytes,
            history_dropped: history.dropped,
        })
    })
    .await?;
    let text = metrics::encode(&Sources {
        stats: state.writer.stats(),
        link: &state.link,
        clock_offset_ms: state.clock.offset_ms(),
        queued: state.writer.queued(),
        store,
    })
    .map_err(ApiError::internal)?;
    Ok((
        [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
        text,
    )
        .into_response())
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct OutboxQuery {
    /// Entries after this sequence number (default 0).
    #[serde(default)]
    after: u64,
    /// Most entries (1 to 1000, default 100).
    #[serde(default = "default_outbox_limit")]
    limit: usize,
}

fn default_outbox_limit() -> usize {
    100
}

/// One pending outbox entry, as it will be sent.
#[derive(Serialize, ToSchema)]
struct OutboxEntry {
    seq: u64,
    /// The change: collection, key and the permitted fields with their
    /// versions.
    #[schema(value_type = Object)]
    change: fieldsync_shared::Change,
}

/// Pending outbox entries.
#[derive(Serialize, ToSchema)]
struct OutboxPage {
    entries: Vec<OutboxEntry>,
}

/// Pending outbox entries in full, exactly as they will be sent (permitted
/// fields only), for inspection.
#[utoipa::path(get, path = "/v1/outbox", tag = "status", params(OutboxQuery),
    responses(
        (status = 200, description = "Pending entries in order", body = OutboxPage),
        (status = 400, description = "A malformed query", body = ErrorBody),
    ))]
async fn outbox(
    State(state): State<ApiState>,
    query: Result<Query<OutboxQuery>, QueryRejection>,
) -> Result<Json<OutboxPage>, ApiError> {
    let Query(q) = query?;
    let limit = q.limit.clamp(1, 1000);
    let after = q.after.saturating_add(1);
    let entries = read(&state.store, move |s| s.outbox_entries(Seq(after), limit)).await?;
    let entries = entries
        .into_iter()
        .map(|(seq, change)| OutboxEntry { seq: seq.0, change })
        .collect();
    Ok(Json(OutboxPage { entries }))
}

/// Most records' conflicts one list answers.
const CONFLICTS_LIMIT: usize = 1000;

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ConflictsQuery {
    /// Only this collection.
    #[param(value_type = Option<Name>, inline)]
    collection: Option<String>,
}

/// The conflicts found, in record order.
#[derive(Serialize, ToSchema)]
struct ConflictList {
    conflicts: Vec<ConflictOut>,
    /// More records hold conflicts than one answer lists.
    truncated: bool,
}

/// Fields with concurrent values on record (merge rule `review`, or `prefer`
/// where the rule decided), read-only: a conflict is resolved on the hub
/// (`POST /v1/conflicts/{id}/resolve`, same id), or by a local write made
/// after seeing the candidates.
#[utoipa::path(get, path = "/v1/conflicts", tag = "records", params(ConflictsQuery),
    responses(
        (status = 200, description = "The conflicts", body = ConflictList),
        (status = 400, description = "An invalid collection name or parameter", body = ErrorBody),
    ))]
async fn conflicts(
    State(state): State<ApiState>,
    query: Result<Query<ConflictsQuery>, QueryRejection>,
) -> Result<Json<ConflictList>, ApiError> {
    let Query(q) = query?;
    let collection = q
        .collection
        .map(|c| CollectionName::new(c).map_err(invalid_name))
        .transpose()?;
    let records = read(&state.store, move |s| {
        s.conflicted(collection.as_ref(), CONFLICTS_LIMIT + 1)
    })
    .await?;
    let truncated = records.len() > CONFLICTS_LIMIT;
    let agent = &state.agent_id;
    let conflicts = records
        .iter()
        .take(CONFLICTS_LIMIT)
        .flat_map(|change| conflicts_of(Some(agent), change))
        .collect();
    Ok(Json(ConflictList {
        conflicts,
        truncated,
    }))
}

/// Longest `GET /v1/progress` wait.
pub const MAX_PROGRESS_WAIT_MS: u64 = 60_000;

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ProgressQuery {
    /// Answer once the hub has acknowledged an outbox entry after this
    /// sequence number (e.g. the `outbox_last_seq` after your write).
    acked_after: Option<u64>,
    /// Answer once a downstream entry after this sequence number is applied.
    applied_after: Option<u64>,
    /// Longest wait in milliseconds (0 to 60000, default 0: answer now).
    #[serde(default)]
    wait_ms: u64,
}

/// How far the two directions have come.
#[derive(Serialize, ToSchema)]
struct Progress {
    /// The highest outbox entry the hub acknowledged (after its durable
    /// commit).
    outbox_acked_seq: u64,
    /// The highest downstream entry applied here.
    down_applied_seq: u64,
    /// The last outbox entry written.
    outbox_last_seq: u64,
    /// Whether a condition asked for holds (false: the wait ran out).
    reached: bool,
}

/// The sync cursors, at once or as soon as the hub has acknowledged an
/// outbox entry after `acked_after` (or a downstream entry after
/// `applied_after` is applied): a long-poll for "my write reached the hub".
#[utoipa::path(get, path = "/v1/progress", tag = "status", params(ProgressQuery),
    responses(
        (status = 200, description = "The cursors now", body = Progress),
        (status = 400, description = "A malformed query", body = ErrorBody),
    ))]
async fn progress(
    State(state): State<ApiState>,
    query: Result<Query<ProgressQuery>, QueryRejection>,
) -> Result<Json<Progress>, ApiError> {
    let Query(q) = query?;
    if q.wait_ms > MAX_PROGRESS_WAIT_MS {
        return Err(ApiError::bad(
            "invalid_query",
            format!("wait_ms is at most {MAX_PROGRESS_WAIT_MS}"),
        ));
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(q.wait_ms);
    // Subscribed before the first read, so no progress between the read and
    // the wait goes unseen.
    let mut moved = state.link.progress.subscribe();
    loop {
        moved.borrow_and_update();
        let (bounds, down) =
            read(&state.store, |s| Ok((s.outbox_bounds()?, s.down_cursor()?))).await?;
        let now = Progress {
            outbox_acked_seq: bounds
                .acked
                .seq
                .0
                .max(state.link.acked_seq.load(Ordering::Relaxed)),
            down_applied_seq: down.at.seq.0,
            outbox_last_seq: bounds.last.0,
            reached: false,
        };
        let reached = q.acked_after.is_some_and(|n| now.outbox_acked_seq > n)
            || q.applied_after.is_some_and(|n| now.down_applied_seq > n);
        if reached {
            return Ok(Json(Progress { reached, ..now }));
        }
        // A wait that is over answers now: the timer would add up to its
        // 1 ms tick.
        if tokio::time::Instant::now() >= deadline
            || !matches!(
                tokio::time::timeout_at(deadline, moved.changed()).await,
                Ok(Ok(()))
            )
        {
            return Ok(Json(now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_covers_every_route_and_its_committed_copy_is_current() {
        let committed =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi/agent.json");
        fieldsync_http::check_document(&ApiDoc::openapi(), &[include_str!("api.rs")], &committed)
            .unwrap();
    }
}
