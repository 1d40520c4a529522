//! HTTP glue shared by the agent's local API and the hub's operator API: the
//! one JSON error answer (`{"error": {"code", "message"}}`) and how axum's
//! request rejections map onto it, the fallbacks for unknown routes and
//! methods, and the OpenAPI document's serving and drift checks.

pub mod conflicts;
pub mod history;

use std::collections::BTreeSet;
use std::path::Path;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Serialize;
use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, Schema, SchemaType, Type};
use utoipa::openapi::{OpenApi, RefOr};
use utoipa::{PartialSchema, ToSchema};

/// The pattern of agent ids and collection names (see `fieldsync_shared::id`).
pub const NAME_PATTERN: &str = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$";
/// The pattern of record keys and field names: text without control
/// characters (their length limit is in bytes: 256 for keys, 128 for field
/// names).
pub const TEXT_PATTERN: &str = r"^[^\x00-\x1f\x7f-\x9f]+$";

/// Milliseconds since the Unix epoch as RFC 3339 (UTC, milliseconds): how
/// both APIs write times.
pub fn format_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

/// An agent id or a collection name in the OpenAPI documents.
pub struct Name;

impl PartialSchema for Name {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(SchemaType::Type(Type::String))
            .pattern(Some(NAME_PATTERN))
            .into()
    }
}

impl ToSchema for Name {}

/// A record key in the OpenAPI documents: text without control characters,
/// at most 256 bytes.
pub struct Key;

impl PartialSchema for Key {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(SchemaType::Type(Type::String))
            .description(Some(
                "Any text without control characters, at most 256 bytes",
            ))
            .min_length(Some(1))
            .max_length(Some(256))
            .pattern(Some(TEXT_PATTERN))
            .into()
    }
}

impl ToSchema for Key {}

/// A partial update's body in the OpenAPI documents: at least one field
/// name (text without control characters, at most 128 bytes) to any JSON
/// value; null deletes the field.
pub struct FieldPatch;

impl PartialSchema for FieldPatch {
    fn schema() -> RefOr<Schema> {
        let name = ObjectBuilder::new()
            .schema_type(SchemaType::Type(Type::String))
            .min_length(Some(1))
            .max_length(Some(128))
            .pattern(Some(TEXT_PATTERN));
        ObjectBuilder::new()
            .schema_type(SchemaType::Type(Type::Object))
            .description(Some(
                "Fields to set: at least one field name to any JSON value; null deletes the field",
            ))
            .min_properties(Some(1))
            .property_names(Some(name))
            .additional_properties(Some(AdditionalProperties::FreeForm(true)))
            .into()
    }
}

impl ToSchema for FieldPatch {}

/// An error answer: a status and `{"error": {"code", "message"}}`. The
/// message names what was wrong with the request, never a field's value.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable (`invalid_json`, `not_found`, ...).
    pub code: String,
    /// For people; may change between versions.
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// A 400.
    pub fn bad(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// A 422 `schema_violation`: a value breaks its collection's schema
    /// (the message names the field and its rule, never the value).
    pub fn schema(
        collection: &fieldsync_shared::CollectionName,
        violation: &fieldsync_shared::schema::Violation,
    ) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "schema_violation",
            format!("collection \"{collection}\": {violation}"),
        )
    }

    /// A 404.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    /// A 500 whose cause goes to the log, not to the client.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the program's log",
        )
    }

    /// The same error with `context: ` before its message (which write of a
    /// batch, for instance).
    pub fn within(self, context: impl std::fmt::Display) -> Self {
        Self {
            message: format!("{context}: {}", self.message),
            ..self
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        Self::bad("invalid_path", e.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        Self::bad("invalid_query", e.body_text())
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

/// Parses a JSON request body (any content type: the body decides); a body
/// that is not valid JSON or not of the shape `T` is a 400 `invalid_json`.
pub fn json_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad("invalid_json", format!("invalid JSON: {e}")))
}

/// Adds the JSON answers for an unknown route (404 `no_route`) and for a
/// method the route does not take (405 `method_not_allowed`, with `Allow`).
pub fn with_fallbacks<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    router
        .fallback(|| async { ApiError::not_found("no_route", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method",
            )
        })
}

/// The route that serves `doc` as `GET /v1/openapi.json`, serialized once.
pub fn openapi_route<S: Clone + Send + Sync + 'static>(doc: &OpenApi) -> Router<S> {
    let body = Bytes::from(doc.to_pretty_json().unwrap_or_default());
    Router::new().route(
        "/v1/openapi.json",
        axum::routing::get(move || {
            let body = body.clone();
            async move { ([(header::CONTENT_TYPE, "application/json")], body) }
        }),
    )
}

/// The committed copy of a program's OpenAPI document must be what the code
/// generates. With `FIELDSYNC_BLESS=1` in the environment it is rewritten
/// instead (then commit the change).
pub fn check_committed(doc: &OpenApi, committed: &Path) -> Result<(), String> {
    let generated = doc.to_pretty_json().map_err(|e| e.to_string())? + "\n";
    if std::env::var_os("FIELDSYNC_BLESS").is_some() {
        return std::fs::write(committed, generated).map_err(|e| e.to_string());
    }
    let on_disk = std::fs::read_to_string(committed)
        .map_err(|e| format!("cannot read {}: {e}", committed.display()))?;
    if on_disk == generated {
        Ok(())
    } else {
        Err(format!(
            "{} is not what the code generates; run the test with FIELDSYNC_BLESS=1 and commit the file",
            committed.display()
        ))
    }
}

/// The paths a router's source registers with `.route("PATH", ...)`, for the
/// check that every route is in the OpenAPI document and every documented
/// path is routed.
pub fn routed_paths(sources: &[&str]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for source in sources {
        let mut rest = *source;
        while let Some(at) = rest.find(".route(") {
            rest = &rest[at + ".route(".len()..];
            let trimmed = rest.trim_start();
            if let Some(literal) = trimmed.strip_prefix('"') {
                if let Some(end) = literal.find('"') {
                    out.insert(literal[..end].to_owned());
                }
            }
        }
    }
    out
}

/// The paths `doc` documents.
pub fn documented_paths(doc: &OpenApi) -> BTreeSet<String> {
    doc.paths.paths.keys().cloned().collect()
}

/// A program's document against its code: every path its router's source
/// registers (`router_sources`, `/v1/openapi.json` aside) is documented and
/// every documented path is routed, and the committed copy is current (see
/// [`check_committed`]).
pub fn check_document(
    doc: &OpenApi,
    router_sources: &[&str],
    committed: &Path,
) -> Result<(), String> {
    let routed = routed_paths(router_sources);
    let documented = documented_paths(doc);
    if routed != documented {
        return Err(format!(
            "routed but not documented: {:?}; documented but not routed: {:?}",
            routed.difference(&documented).collect::<Vec<_>>(),
            documented.difference(&routed).collect::<Vec<_>>()
        ));
    }
    check_committed(doc, committed)
}

/// Compares secrets without leaking where they differ through timing.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_read_from_source_text() {
        let source = r#"Router::new()
            .route("/v1/a", get(a))
            .route(
                "/v1/b/{id}",
                get(b),
            )
            .merge(other) // .route(not_a_literal)
        "#;
        let paths: Vec<_> = routed_paths(&[source]).into_iter().collect();
        assert_eq!(paths, ["/v1/a", "/v1/b/{id}"]);
    }

    #[test]
    fn secrets_compare_equal_only_when_equal() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
