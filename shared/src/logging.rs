//! The log output both programs share, in one home so the agent's and the
//! hub's lines look alike: `[log] format = "text"` (the default, for people)
//! or `"json"` (one JSON object per line, for log shippers), always on
//! stderr, filtered by `RUST_LOG` (default `info`).
//!
//! A JSON line carries [`JSON_FIELDS`] — `timestamp` (RFC 3339, UTC), `level`
//! (`ERROR` .. `TRACE`), `target` (the module that logged), `message` — and
//! the event's own fields beside them (`agent`, `error`, `collection`,
//! `fields`, ...). No line carries a field value of a record
//! (ARCHITECTURE.md, "default-deny egress").

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// The top-level fields of every JSON line, whatever the event.
pub const JSON_FIELDS: [&str; 4] = ["timestamp", "level", "target", "message"];

/// How log lines are written (`[log] format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum LogFormat {
    /// Human-readable lines (colour when stderr is a terminal).
    #[default]
    Text,
    /// One JSON object per line with the fields [`JSON_FIELDS`] and the
    /// event's own.
    Json,
}

impl LogFormat {
    /// The values `[log] format` accepts, for error messages.
    pub const CHOICES: &'static str = "\"text\" or \"json\"";

    /// `text` or `json`.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("{other:?} is not {}", Self::CHOICES)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoggingError {
    #[error("logging was already set up in this process")]
    AlreadySet,
}

static ACTIVE: OnceLock<LogFormat> = OnceLock::new();

/// Sets up the process's logging in `format`, to stderr. Call once, as soon
/// as the configuration is read: lines before it (a configuration error)
/// are plain text.
pub fn init(format: LogFormat) -> Result<(), LoggingError> {
    let ansi = format == LogFormat::Text && std::io::stderr().is_terminal();
    subscriber(format, ansi, std::io::stderr)
        .try_init()
        .map_err(|_| LoggingError::AlreadySet)?;
    let _ = ACTIVE.set(format);
    Ok(())
}

/// The format [`init`] set up, if it ran.
pub fn active() -> Option<LogFormat> {
    ACTIVE.get().copied()
}

/// The subscriber [`init`] installs, writing to `writer` (tests pass a buffer).
pub fn subscriber<W>(
    format: LogFormat,
    ansi: bool,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync + 'static>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.with_ansi(ansi).finish()),
        // Flattened: the event's fields sit beside `message`; no span
        // fields (the programs open no spans), so the shape stays stable.
        LogFormat::Json => Box::new(
            builder
                .with_ansi(false)
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .finish(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(format: LogFormat, log: impl FnOnce()) -> String {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = subscriber(format, false, move || writer.clone());
        tracing::subscriber::with_default(subscriber, log);
        let bytes = buffer.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn json_lines_are_one_object_each_with_the_documented_fields() {
        let text = logged(LogFormat::Json, || {
            tracing::warn!(agent = "gw-1", count = 3, "two\nlines");
            tracing::info!("plain");
        });
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        for field in JSON_FIELDS {
            assert!(first.get(field).is_some(), "{field} missing in {first}");
        }
        assert_eq!(first["level"], "WARN");
        assert_eq!(first["message"], "two\nlines");
        assert_eq!(first["agent"], "gw-1");
        assert_eq!(first["count"], 3);
        assert_eq!(first["target"], "fieldsync_shared::logging::tests");
        let second: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        let keys: Vec<&String> = second.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), JSON_FIELDS.len(), "{second}");
    }

    #[test]
    fn text_is_the_default_and_not_json() {
        assert_eq!(LogFormat::default(), LogFormat::Text);
        let text = logged(LogFormat::Text, || tracing::info!(agent = "gw-1", "hello"));
        assert!(
            text.contains("hello") && text.contains("agent=\"gw-1\""),
            "{text}"
        );
        assert!(serde_json::from_str::<serde_json::Value>(text.trim()).is_err());
    }

    #[test]
    fn formats_parse_by_name() {
        assert_eq!(LogFormat::parse("json"), Ok(LogFormat::Json));
        assert_eq!(LogFormat::parse("text"), Ok(LogFormat::Text));
        let e = LogFormat::parse("JSON").unwrap_err();
        assert!(e.contains("\"JSON\"") && e.contains("\"json\""), "{e}");
    }
}
