//! The command line: `run` starts the agent; `put`, `get`, `delete` and `status`
//! are clients of a running agent's local API.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

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

/// `FIELD=VALUE` arguments as a JSON object (shared with the hub's CLI).
pub use fieldsync_shared::record::parse_field_args as parse_fields;

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
