//! The hub's client commands (`agents`, `get`, `put`, `webhooks`): a small
//! client of the operator API, and how its answers are shown — tables for
//! people, the API's JSON with `--json` for scripts. The token comes from
//! `--token-file` or `FIELDSYNC_TOKEN`, never from the command line (where
//! other users could read it in the process list).

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("no operator token: pass --token-file FILE or set FIELDSYNC_TOKEN")]
    NoToken,
    #[error("--token-file {path}: {message}")]
    TokenFile { path: String, message: String },
    #[error("--api {api:?}: {message}")]
    Api { api: String, message: String },
    #[error("cannot reach the hub at {api}: {message}")]
    Unreachable { api: String, message: String },
    /// The API refused the request: its status, code and message.
    #[error("the hub answered {status}: {message} ({code})")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    #[error("{0}")]
    Usage(String),
}

/// The token: the first line of `file`, else `FIELDSYNC_TOKEN`.
pub fn token(file: Option<&Path>, env: Option<String>) -> Result<String, ClientError> {
    let token = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| ClientError::TokenFile {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            text.lines().next().unwrap_or("").trim().to_owned()
        }
        None => env.unwrap_or_default().trim().to_owned(),
    };
    if token.is_empty() {
        return Err(ClientError::NoToken);
    }
    Ok(token)
}

/// A client of one hub's operator API.
pub struct Client {
    http: reqwest::Client,
    base: reqwest::Url,
    api: String,
    token: String,
}

impl Client {
    pub fn new(api: &str, token: String) -> Result<Self, ClientError> {
        let bad = |message: String| ClientError::Api {
            api: api.to_owned(),
            message,
        };
        let base = reqwest::Url::parse(api).map_err(|e| bad(e.to_string()))?;
        if base.cannot_be_a_base() || !matches!(base.scheme(), "http" | "https") {
            return Err(bad("not an http(s) base URL".into()));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            http,
            base,
            api: api.to_owned(),
            token,
        })
    }

    /// The URL of `segments` under the API (each percent-encoded).
    fn url(&self, segments: &[&str]) -> reqwest::Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// Sends a request; the answer's JSON (`null` for an empty body), or the
    /// API's error.
    pub async fn call(
        &self,
        method: reqwest::Method,
        segments: &[&str],
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let mut request = self
            .http
            .request(method, self.url(segments))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| ClientError::Unreachable {
            api: self.api.clone(),
            message: e.to_string(),
        })?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let value: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if !status.is_success() {
            let error = &value["error"];
            return Err(ClientError::Refused {
                status: status.as_u16(),
                code: error["code"].as_str().unwrap_or("unknown").to_owned(),
                message: error["message"].as_str().unwrap_or("no message").to_owned(),
            });
        }
        Ok(value)
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Rows as a table with a header; columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        padded.join("  ").trim_end().to_owned()
    };
    let mut out = vec![line(header.to_vec())];
    for row in rows {
        out.push(line(row.iter().map(String::as_str).collect()));
    }
    out.join("\n")
}

/// `agents list`: one line per agent.
pub fn agents_table(body: &Value) -> String {
    let rows: Vec<Vec<String>> = body["agents"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    let mut row: Vec<String> = [
                        "id",
                        "state",
                        "connected",
                        "last_seen",
                        "queue_pending",
                        "outbox_pending",
                        "clock_skew_ms",
                    ]
                    .iter()
                    .map(|k| cell(&r[*k]))
                    .collect();
                    row.push(labels_text(&r["labels"]));
                    row
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &[
            "ID",
            "STATE",
            "CONNECTED",
            "LAST SEEN",
            "QUEUED DOWN",
            "OUTBOX",
            "CLOCK SKEW MS",
            "LABELS",
        ],
        &rows,
    )
}

/// One object as `key: value` lines, keys in their order.
pub fn fields_list(object: &Value) -> String {
    object
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}: {}", cell(v)))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// `webhooks list`: one line per endpoint.
pub fn webhooks_table(body: &Value) -> String {
    let rows: Vec<Vec<String>> = body["webhooks"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    let events = e["events"]
                        .as_array()
                        .filter(|l| !l.is_empty())
                        .map_or("all".into(), |l| {
                            l.iter().map(cell).collect::<Vec<_>>().join(",")
                        });
                    vec![
                        cell(&e["id"]),
                        cell(&e["url"]),
                        events,
                        cell(&e["enabled"]),
                        cell(&e["delivered_through"]),
                        cell(&e["failures"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &["ID", "URL", "EVENTS", "ENABLED", "THROUGH", "FAILURES"],
        &rows,
    )
}

/// `webhooks deliveries`: one line per attempt.
pub fn deliveries_table(body: &Value) -> String {
    let rows: Vec<Vec<String>> = body["deliveries"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|d| {
                    [
                        "at",
                        "event_id",
                        "event_type",
                        "attempt",
                        "status",
                        "outcome",
                        "error",
                    ]
                    .iter()
                    .map(|k| cell(&d[*k]))
                    .collect()
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &[
            "AT", "EVENT", "TYPE", "ATTEMPT", "STATUS", "OUTCOME", "ERROR",
        ],
        &rows,
    )
}

/// The body of `POST /v1/webhooks` from the command's options.
pub fn new_webhook(
    url: &str,
    events: &[String],
    collections: &[String],
    agents: Option<&str>,
) -> Value {
    let mut body = json!({"url": url, "events": events, "collections": collections});
    if let Some(a) = agents {
        body["agents"] = json!(a);
    }
    body
}

/// `LABEL=VALUE` arguments as the labels object (values are text).
pub fn label_args(args: &[String]) -> Result<Value, String> {
    let mut labels = serde_json::Map::new();
    for arg in args {
        let (key, value) = arg
            .split_once('=')
            .ok_or_else(|| format!("{arg:?} is not LABEL=VALUE"))?;
        if labels
            .insert(key.to_owned(), Value::String(value.to_owned()))
            .is_some()
        {
            return Err(format!("label {key:?} is given twice"));
        }
    }
    Ok(Value::Object(labels))
}

/// Labels as `k=v, k=v` (or `none`).
pub fn labels_text(labels: &Value) -> String {
    let pairs: Vec<String> = labels
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    if pairs.is_empty() {
        "none".to_owned()
    } else {
        pairs.join(", ")
    }
}

/// What a broadcast queued, for people.
pub fn broadcast_text(body: &Value) -> String {
    let mut out = format!(
        "{selector}: {matched} agents matched, queued to {queued_agents} ({queued} writes)",
        selector = body["selector"].as_str().unwrap_or_default(),
        matched = body["agents"],
        queued_agents = body["queued_agents"],
        queued = body["queued"],
    );
    for r in body["refused"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "\nrefused {}: {} {}/{}",
            r["agent"].as_str().unwrap_or_default(),
            r["code"].as_str().unwrap_or_default(),
            r["collection"].as_str().unwrap_or_default(),
            r["key"].as_str().unwrap_or_default(),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_columns_and_show_missing_values_as_dashes() {
        let body = json!({"agents": [
            {"id": "gw-1", "state": "idle", "connected": true, "last_seen": "2026-12-01T00:00:00.000Z",
             "queue_pending": 0, "outbox_pending": 0, "clock_skew_ms": -3},
            {"id": "gateway-long-name", "state": "offline", "connected": false, "last_seen": null,
             "queue_pending": 12, "outbox_pending": null, "clock_skew_ms": null},
        ]});
        let text = agents_table(&body);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ID                 STATE"), "{text}");
        assert!(
            lines[2].starts_with("gateway-long-name  offline  false"),
            "{text}"
        );
        assert!(lines[2].contains(" -"), "{text}");
    }

    #[test]
    fn the_token_comes_from_the_file_first_then_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-file-0123456789\nignored\n").unwrap();
        assert_eq!(
            token(Some(&file), Some("env".into())).unwrap(),
            "from-file-0123456789"
        );
        assert_eq!(
            token(None, Some(" env-token ".into())).unwrap(),
            "env-token"
        );
        assert!(matches!(token(None, None), Err(ClientError::NoToken)));
        assert!(matches!(
            token(Some(&dir.path().join("missing")), None),
            Err(ClientError::TokenFile { .. })
        ));
    }

    #[test]
    fn urls_are_checked_and_segments_encoded() {
        assert!(Client::new("not a url", "t".into()).is_err());
        assert!(Client::new("ftp://x/", "t".into()).is_err());
        let c = Client::new("http://127.0.0.1:8080/", "t".into()).unwrap();
        assert_eq!(
            c.url(&["v1", "agents", "gw 1/x"]).as_str(),
            "http://127.0.0.1:8080/v1/agents/gw%201%2Fx"
        );
    }
}
