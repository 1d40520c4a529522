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
use fieldsync_shared::record::{parse_patch, PatchError};
use fieldsync_shared::wire::{write_fits, MAX_CHANGE_BYTES};
use fieldsync_shared::{
    AgentId, CollectionName, FieldName, Incarnation, Origin, RecordKey, Seq, Value,
};
use prometheus_client::encoding::prometheus_text;
use serde::Deserialize;
use serde_json::json;

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
}

/// The API's routes.
pub fn router(state: ApiState, max_body_bytes: usize) -> Router {
    Router::new()
        .route(
            "/v1/records/{collection}/{key}",
            get(get_record).put(put_record).delete(delete_record),
        )
        .route("/v1/batch", post(batch))
        .route("/v1/status", get(status))
        .route("/v1/outbox", get(outbox))
        .route("/metrics", get(prometheus))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no_route", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method",
            )
        })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// An error answer.
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
            "internal error; see the agent's log",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        Self::bad("invalid_path", e.body_text())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(e: BytesRejection) -> Self {
        let status = e.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "payload_too_large"
        } else {
            "invalid_body"
        };
        Self::new(status, code, e.body_text())
    }
}

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

fn address(path: Address) -> Result<(CollectionName, RecordKey), ApiError> {
    let Path((collection, key)) = path?;
    let collection = CollectionName::new(collection)
        .map_err(|e| ApiError::bad("invalid_name", e.to_string()))?;
    let key = RecordKey::new(key).map_err(|e| ApiError::bad("invalid_name", e.to_string()))?;
    Ok((collection, key))
}

fn parse_json<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad("invalid_json", format!("invalid JSON: {e}")))
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

async fn put_record(
    State(state): State<ApiState>,
    path: Address,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<RecordView>, ApiError> {
    let (collection, key) = address(path)?;
    let fields = fields_of(parse_json(body)?)?;
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
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no record \"{key}\" in collection \"{collection}\""),
    )
}

async fn get_record(
    State(state): State<ApiState>,
    path: Address,
) -> Result<Json<RecordView>, ApiError> {
    let (collection, key) = address(path)?;
    let (c, k) = (collection.clone(), key.clone());
    let found = read(&state.store, move |s| s.get(&c, &k)).await?;
    found.map(Json).ok_or_else(|| not_found(&collection, &key))
}

async fn delete_record(
    State(state): State<ApiState>,
    path: Address,
) -> Result<Json<Value>, ApiError> {
    let (collection, key) = address(path)?;
    let op = WriteOp::Delete {
        collection: collection.clone(),
        key: key.clone(),
    };
    match single(state.writer.write(vec![op]).await?)? {
        WriteOutcome::Deleted => Ok(Json(
            json!({"collection": collection, "key": key, "deleted": true}),
        )),
        _ => Err(not_found(&collection, &key)),
    }
}

/// One write of a batch request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchWrite {
    collection: String,
    key: String,
    /// Fields to set (null deletes a field), as in `PUT`.
    #[serde(default)]
    fields: Option<Value>,
    /// `true` deletes the record instead.
    #[serde(default)]
    delete: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    writes: Vec<BatchWrite>,
}

/// `POST /v1/batch`: many writes in one atomic, durable transaction.
async fn batch(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body: BatchBody = parse_json(body)?;
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
        let at = |e: ApiError| ApiError {
            message: format!("writes[{i}]: {}", e.message),
            ..e
        };
        let collection = CollectionName::new(w.collection)
            .map_err(|e| at(ApiError::bad("invalid_name", e.to_string())))?;
        let key =
            RecordKey::new(w.key).map_err(|e| at(ApiError::bad("invalid_name", e.to_string())))?;
        ops.push(match (w.fields, w.delete) {
            (None, true) => WriteOp::Delete { collection, key },
            (Some(fields), false) => {
                let fields = fields_of(fields).map_err(at)?;
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
    let results: Vec<Value> = outcomes
        .into_iter()
        .zip(addresses)
        .map(|(outcome, (collection, key))| match outcome {
            WriteOutcome::Stored(view) => json!(view),
            WriteOutcome::Deleted => json!({"collection": collection, "key": key, "deleted": true}),
            WriteOutcome::NotFound => {
                json!({"collection": collection, "key": key, "deleted": false})
            }
        })
        .collect();
    Ok(Json(json!({ "results": results })))
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

/// `GET /v1/status`: identity, link state, and what waits in the outbox (the
/// first few entries by collection, key and field names).
async fn status(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
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
    let preview: Vec<Value> = first
        .iter()
        .map(|(seq, change)| {
            json!({
                "seq": seq,
                "collection": change.collection,
                "key": change.key,
                "fields": change.state.fields.keys().collect::<Vec<_>>(),
                "record_deleted": change.state.deleted.is_some(),
            })
        })
        .collect();
    Ok(Json(json!({
        "agent_id": state.agent_id,
        "connected": link.connected.load(Ordering::Relaxed),
        "hub_configured": state.hub_configured,
        "incarnation": state.incarnation.to_string(),
        "outbox_pending": pending,
        "outbox_preview": preview,
        "outbox_last_seq": bounds.last,
        "outbox_acked_seq": bounds.acked.seq.0.max(link.acked_seq.load(Ordering::Relaxed)),
        "down_applied_seq": down.at.seq,
        "hub_incarnation": down.source.map(|i| i.to_string()),
        "clock_offset_ms": state.clock.offset_ms(),
        "resyncs": resyncs_sent + resyncs_received,
        "resyncs_sent": resyncs_sent,
        "resyncs_received": resyncs_received,
        "resync_running": link.resyncing.load(Ordering::Relaxed),
        "clock_refused": link.clock_refused.load(Ordering::Relaxed),
        "identity_conflict": link.identity_refused.load(Ordering::Relaxed),
    })))
}

/// `GET /metrics`: the agent's metrics in the Prometheus text format (0.0.4),
/// see [`crate::metrics`].
async fn prometheus(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let store = read(&state.store, |s| {
        Ok(StoreReadings {
            outbox_pending: s.outbox_len()?,
            resyncs_received: s.resyncs()?,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutboxQuery {
    #[serde(default)]
    after: u64,
    #[serde(default = "default_outbox_limit")]
    limit: usize,
}

fn default_outbox_limit() -> usize {
    100
}

/// `GET /v1/outbox?after=SEQ&limit=N`: pending outbox entries in full, exactly
/// as they will be sent (permitted fields only), for inspection.
async fn outbox(
    State(state): State<ApiState>,
    query: Result<Query<OutboxQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad("invalid_query", e.body_text()))?;
    let limit = q.limit.clamp(1, 1000);
    let entries = read(&state.store, move |s| {
        s.outbox_entries(Seq(q.after + 1), limit)
    })
    .await?;
    let entries: Vec<Value> = entries
        .into_iter()
        .map(|(seq, change)| json!({"seq": seq, "change": change}))
        .collect();
    Ok(Json(json!({ "entries": entries })))
}
