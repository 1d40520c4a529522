//! `GET /v1/changes`: the change feed, for systems that pull. It answers
//! with committed record changes (the event log's `record.changed` events,
//! permitted fields only: the hub holds no other) in commit order and a
//! cursor to resume from — as a page, a long-poll (`wait=30s`), or
//! Server-Sent Events (`Accept: text/event-stream`, resumable with
//! `Last-Event-ID`). Cursors survive hub restarts.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use fieldsync_http::ErrorBody;
use fieldsync_shared::Value;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use utoipa::{IntoParams, ToSchema};

use super::{blocking, ApiError, ApiState};
use crate::events::{Cursor, Event, EventFilter};
use crate::store::HubStore;

/// Changes per page by default, and at most.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;
/// Events read per store read while looking for matches.
const SCAN: usize = 1000;
/// Longest long-poll.
const MAX_WAIT: Duration = Duration::from_secs(300);

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct ChangesQuery {
    /// `0` (the start of the log, the default), `now` (its head), or a
    /// cursor (`SEQ-MS`) the feed gave. `Last-Event-ID` wins over it.
    #[param(example = "0")]
    since: Option<String>,
    /// Comma-separated agent ids or patterns (`gw-*`).
    agents: Option<String>,
    /// Comma-separated collection names.
    collections: Option<String>,
    /// Changes per page, 1 to 1000 (default 100).
    limit: Option<usize>,
    /// Long-poll: wait up to this long (`30s`, `500ms`; at most 5 min) for a
    /// change.
    wait: Option<String>,
}

/// A page of the feed.
#[derive(Serialize, ToSchema)]
pub(super) struct ChangePage {
    /// `record.changed` events in commit order: `{id, type, timestamp, data:
    /// {cursor, agent, collection, key, fields, version, origin, ...}}`.
    #[schema(value_type = Vec<Object>)]
    changes: Vec<Value>,
    /// The cursor to resume from (`since=`).
    next: String,
}

fn list(text: Option<&str>) -> Vec<String> {
    text.map(|t| {
        t.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    })
    .unwrap_or_default()
}

/// Where a reader asked to start, checked against the log.
async fn start<S: HubStore>(state: &ApiState<S>, since: Option<&str>) -> Result<Cursor, ApiError> {
    let bounds = blocking(&state.store, |s| s.event_bounds()).await?;
    let cursor = match since {
        None => Cursor::START,
        Some("now") => {
            let seq = bounds.head;
            let found = blocking(&state.store, move |s| s.event(seq)).await?;
            let at_ms = found.map_or(0, |e| e.at_ms);
            return Ok(Cursor { seq, at_ms });
        }
        Some(text) => text.parse::<Cursor>().map_err(|()| {
            ApiError::bad(
                "invalid_cursor",
                "since must be 0, now, or a cursor the feed gave (SEQ-MS)",
            )
        })?,
    };
    if cursor.seq == 0 {
        return Ok(Cursor::START);
    }
    if cursor.seq > bounds.head {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "cursor_ahead",
            format!("this cursor is past the hub's change log (head {}): was the hub's store restored from an older copy? Changes made since that copy are gone from the log; resume from 0 or now", bounds.head),
        ));
    }
    if cursor.seq + 1 < bounds.oldest {
        return Err(ApiError::new(
            StatusCode::GONE,
            "cursor_expired",
            format!(
                "changes after this cursor were dropped from the log (its retention); the oldest kept is {}: resume from 0 and reconcile",
                bounds.oldest
            ),
        ));
    }
    if cursor.seq >= bounds.oldest {
        let seq = cursor.seq;
        let found = blocking(&state.store, move |s| s.event(seq)).await?;
        if found.map(|e| e.at_ms) != Some(cursor.at_ms) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "cursor_unknown",
                "the hub's change log holds another event at this cursor's position: its store was restored from an older copy; resume from 0 or now",
            ));
        }
    }
    Ok(cursor)
}

/// Up to `limit` matching events after `after`, and the cursor to resume
/// from (past what was scanned, matching or not).
async fn page<S: HubStore>(
    state: &ApiState<S>,
    after: Cursor,
    filter: &EventFilter,
    limit: usize,
) -> Result<(Vec<(u64, Event)>, Cursor), ApiError> {
    let from = after.seq;
    let read = blocking(&state.store, move |s| s.events_after(from, SCAN)).await?;
    let mut next = after;
    let mut out = Vec::new();
    for (seq, event) in read {
        if out.len() == limit {
            break;
        }
        next = Cursor {
            seq,
            at_ms: event.at_ms,
        };
        if filter.matches(&event) {
            out.push((seq, event));
        }
    }
    Ok((out, next))
}

/// Committed record changes in commit order, and the cursor to resume from:
/// a page, a long-poll (`wait=`), or Server-Sent Events (`Accept:
/// text/event-stream`; each event's id is its cursor, for `Last-Event-ID`).
#[utoipa::path(get, path = "/v1/changes", tag = "feed", params(ChangesQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "An SSE client's resume cursor")),
    responses(
        (status = 200, description = "A page of changes (or an event stream)", content(
            (ChangePage = "application/json"),
            (String = "text/event-stream"),
        )),
        (status = 400, description = "A malformed query or cursor", body = ErrorBody),
        (status = 409, description = "The cursor is not in this hub's log (a restored store)", body = ErrorBody),
        (status = 410, description = "The changes after the cursor were dropped by retention", body = ErrorBody),
        (status = 503, description = "The hub is stopping", body = ErrorBody),
    ))]
pub(super) async fn changes<S: HubStore>(
    State(state): State<Arc<ApiState<S>>>,
    headers: HeaderMap,
    query: Result<Query<ChangesQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let filter = EventFilter {
        types: vec!["record.changed".into()],
        agents: list(q.agents.as_deref()),
        collections: list(q.collections.as_deref()),
    };
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad(
            "invalid_query",
            format!("limit must be 1..={MAX_LIMIT}"),
        ));
    }
    let wait = match q.wait.as_deref() {
        None => Duration::ZERO,
        Some(text) => humantime::parse_duration(text)
            .ok()
            .filter(|d| *d <= MAX_WAIT)
            .ok_or_else(|| {
                ApiError::bad(
                    "invalid_query",
                    format!("wait must be a duration such as 30s, at most {MAX_WAIT:?}"),
                )
            })?,
    };
    let sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let since = last_event_id.as_deref().or(q.since.as_deref());
    let after = start(&state, since).await?;
    if sse {
        return Ok(stream(state, after, filter).into_response());
    }
    let deadline = Instant::now() + wait;
    let mut head = state.store.watch_events();
    let mut at = after;
    loop {
        head.borrow_and_update();
        let (found, next) = page(&state, at, &filter, limit).await?;
        let moved = next != at;
        at = next;
        if !found.is_empty() || Instant::now() >= deadline {
            let changes = found.iter().map(|(seq, e)| e.to_json(*seq)).collect();
            let page = ChangePage {
                changes,
                next: at.to_string(),
            };
            return Ok(Json(page).into_response());
        }
        if !moved {
            // At the head: wait for the log to grow, or the deadline.
            let more = tokio::time::timeout_at(deadline, head.changed()).await;
            if matches!(more, Ok(Err(_))) {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting_down",
                    "the hub is stopping",
                ));
            }
        }
    }
}

/// The feed as Server-Sent Events: each change is an event whose id is its
/// cursor, so a reconnecting client resumes with `Last-Event-ID`.
fn stream<S: HubStore>(
    state: Arc<ApiState<S>>,
    after: Cursor,
    filter: EventFilter,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let head = state.store.watch_events();
    let pending: std::collections::VecDeque<SseEvent> = Default::default();
    let init = (state, after, filter, head, pending);
    let events = futures_util::stream::unfold(
        init,
        |(state, mut at, filter, mut head, mut pending)| async move {
            loop {
                if let Some(e) = pending.pop_front() {
                    return Some((Ok(e), (state, at, filter, head, pending)));
                }
                head.borrow_and_update();
                let Ok((found, next)) = page(&state, at, &filter, MAX_LIMIT).await else {
                    // The store failed: end the stream; the client resumes.
                    return None;
                };
                for (seq, event) in &found {
                    let cursor = Cursor {
                        seq: *seq,
                        at_ms: event.at_ms,
                    };
                    let data = serde_json::to_string(&event.to_json(*seq)).unwrap_or_default();
                    pending.push_back(
                        SseEvent::default()
                            .id(cursor.to_string())
                            .event(event.type_name())
                            .data(data),
                    );
                }
                let moved = next != at;
                at = next;
                if pending.is_empty() && !moved && head.changed().await.is_err() {
                    return None;
                }
            }
        },
    );
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
