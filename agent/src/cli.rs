//! The command line: `run` starts the agent; `put`, `get`, `delete` and `status`
//! are clients of a running agent's local API.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use serde_json::{Map, Value};

/// Fieldsync edge agent: keeps records in a local store and syncs only the
/// fields its policy permits to the hub.
#[derive(Debug, Parser)]
#[command(name = "fieldsync-agent", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: open the store and serve the local API.
    Run {
        /// The agent's config file (TOML).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Write fields of a record (a partial update).
    ///
    /// Each FIELD=VALUE sets one field. VALUE is read as JSON when it parses
    /// (3, true, null, "x", [1,2], {"a":1}), otherwise as a string; `null`
    /// deletes the field. Example: put patients p1 initials=JD ward=3
    Put {
        #[command(flatten)]
        record: RecordArg,
        /// One or more FIELD=VALUE pairs.
        #[arg(required = true, value_name = "FIELD=VALUE")]
        fields: Vec<String>,
        #[command(flatten)]
        api: ApiArg,
    },
    /// Print a record as JSON.
    Get {
        #[command(flatten)]
        record: RecordArg,
        #[command(flatten)]
        api: ApiArg,
    },
    /// Delete a record.
    Delete {
        #[command(flatten)]
        record: RecordArg,
        #[command(flatten)]
        api: ApiArg,
    },
    /// Print the agent's status: id, hub link, outbox.
    Status {
        #[command(flatten)]
        api: ApiArg,
    },
}

/// Which record.
#[derive(Debug, clap::Args)]
pub struct RecordArg {
    /// Collection name, e.g. patients.
    pub collection: String,
    /// Record key within the collection.
    pub key: String,
}

#[derive(Debug, clap::Args)]
pub struct ApiArg {
    /// Base URL of the agent's local API.
    #[arg(
        long,
        env = "FIELDSYNC_API",
        default_value = "http://127.0.0.1:7070",
        value_name = "URL"
    )]
    pub api: String,
}

/// Turns `FIELD=VALUE` arguments into a JSON object.
pub fn parse_fields(pairs: &[String]) -> Result<Map<String, Value>, String> {
    let mut map = Map::new();
    for pair in pairs {
        let (name, raw) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} is not FIELD=VALUE"))?;
        if name.is_empty() {
            return Err(format!("{pair:?} has an empty field name"));
        }
        let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()));
        if map.insert(name.to_owned(), value).is_some() {
            return Err(format!("field {name:?} is given twice"));
        }
    }
    Ok(map)
}

/// The URL of a record on the API at `base`, with each segment percent-encoded.
pub fn record_url(base: &str, collection: &str, key: &str) -> Result<reqwest::Url, String> {
    let mut url = reqwest::Url::parse(base).map_err(|e| format!("--api {base:?}: {e}"))?;
    url.path_segments_mut()
        .map_err(|_| format!("--api {base:?} cannot be a base URL"))?
        .pop_if_empty()
        .extend(["v1", "records", collection, key]);
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_are_json_when_they_parse_else_strings() {
        let args: Vec<String> = [
            "initials=JD",
            "ssn=123-45-6789",
            "ward=3",
            "ok=true",
            "tags=[1,2]",
            "note=a=b",
            "gone=null",
            "s=\"3\"",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let m = parse_fields(&args).unwrap();
        assert_eq!(
            Value::Object(m),
            json!({"initials": "JD", "ssn": "123-45-6789", "ward": 3, "ok": true, "tags": [1, 2], "note": "a=b", "gone": null, "s": "3"})
        );
    }

    #[test]
    fn malformed_pairs_are_refused() {
        assert!(parse_fields(&["novalue".into()])
            .unwrap_err()
            .contains("FIELD=VALUE"));
        assert!(parse_fields(&["=1".into()])
            .unwrap_err()
            .contains("empty field name"));
        assert!(parse_fields(&["a=1".into(), "a=2".into()])
            .unwrap_err()
            .contains("twice"));
    }

    #[test]
    fn urls_encode_segments() {
        let u = record_url("http://127.0.0.1:7070", "patients", "room 1/a").unwrap();
        assert_eq!(
            u.as_str(),
            "http://127.0.0.1:7070/v1/records/patients/room%201%2Fa"
        );
        assert!(record_url("not a url", "c", "k").is_err());
    }
}
