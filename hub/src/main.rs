//! The `fieldsync-hub` binary: parses the command line and runs the hub, one
//! of the development PKI commands (`certs init`, `certs issue`), or a client
//! command of a running hub's operator API (`agents`, `get`, `put`,
//! `broadcast`, `webhooks`).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fieldsync_hub::config::HubConfig;
use fieldsync_hub::pki::{self, OnExisting};
use fieldsync_shared::logging::{self, LogFormat};
use fieldsync_shared::AgentId;

/// Fieldsync hub: agents sync their records to it over mutually authenticated
/// TLS MQTT; operators read and write fleet data through its HTTP API.
#[derive(Debug, Parser)]
#[command(name = "fieldsync-hub", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the hub with a configuration file.
    Run {
        /// The hub's TOML configuration; relative paths in it resolve against its folder.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Make development certificates: a fleet CA, the hub's certificate, agents' certificates.
    ///
    /// For development and tests. Private keys are written with mode 0600 and
    /// existing files are never replaced without --force.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// The agents the hub knows: a table, or one agent in full.
    Agents {
        #[command(subcommand)]
        command: Option<AgentsCommand>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Print the hub's copy of an agent's record.
    Get {
        agent: String,
        collection: String,
        key: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Queue a write down to an agent (a partial update; delivered when it is connected).
    ///
    /// Each FIELD=VALUE sets one field. VALUE is read as JSON when it parses
    /// (3, true, null, "x", [1,2]), otherwise as a string; `null` deletes the
    /// field. Example: put gw-1 settings s1 mode=eco threshold=30
    Put {
        agent: String,
        collection: String,
        key: String,
        #[arg(required = true, value_name = "FIELD=VALUE")]
        fields: Vec<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Queue the same write to every agent whose labels match a selector now.
    ///
    /// Agents labelled into the group later do not get it. Example:
    /// broadcast --selector site=berlin settings s1 mode=eco
    Broadcast {
        /// Which agents, e.g. `site=berlin,model!=gw2` (see the README).
        #[arg(long)]
        selector: String,
        collection: String,
        key: String,
        #[arg(required = true, value_name = "FIELD=VALUE")]
        fields: Vec<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Manage webhook endpoints.
    Webhooks {
        #[command(subcommand)]
        command: WebhooksCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// How client commands reach the operator API.
#[derive(Debug, clap::Args)]
struct ApiArgs {
    /// Base URL of the hub's operator API.
    #[arg(
        long,
        global = true,
        env = "FIELDSYNC_HUB_API",
        default_value = "http://127.0.0.1:8080",
        value_name = "URL"
    )]
    api: String,
    /// File whose first line is the operator token (else FIELDSYNC_TOKEN).
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum AgentsCommand {
    /// One line per agent (the default).
    List,
    /// One agent's row in full.
    Show { id: String },
    /// Replace an agent's labels (none given: clear them).
    Label {
        id: String,
        #[arg(value_name = "LABEL=VALUE")]
        labels: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum WebhooksCommand {
    /// One line per endpoint.
    List,
    /// Register an endpoint; prints its id and signing secret (shown only now).
    Create {
        /// Where events are posted (https, or http to loopback).
        #[arg(long)]
        url: String,
        /// An event type to send (repeatable; all when absent).
        #[arg(long = "event", value_name = "TYPE")]
        events: Vec<String>,
        /// A collection whose events to send (repeatable; all when absent).
        #[arg(long = "collection", value_name = "NAME")]
        collections: Vec<String>,
        /// Agent id pattern, `*` for any run of characters.
        #[arg(long, value_name = "PATTERN")]
        agents: Option<String>,
    },
    /// Delete an endpoint.
    Delete { id: String },
    /// An endpoint's newest delivery attempts.
    Deliveries { id: String },
    /// Re-send every event from a time on (RFC 3339).
    Replay {
        id: String,
        #[arg(long, value_name = "RFC3339")]
        since: String,
    },
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Create a dev CA and a hub certificate signed by it: ca.pem ca.key hub.pem hub.key.
    ///
    /// The hub certificate is valid for localhost, 127.0.0.1 and ::1, plus the
    /// names and addresses given with --dns and --ip.
    Init {
        /// Directory to write into (created with mode 0700 if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// An extra DNS name agents use to reach the hub (repeatable).
        #[arg(long = "dns", value_name = "NAME")]
        dns: Vec<String>,
        /// An extra IP address agents use to reach the hub (repeatable).
        #[arg(long = "ip", value_name = "ADDR")]
        ips: Vec<IpAddr>,
        /// Replace files that already exist.
        #[arg(long)]
        force: bool,
    },
    /// Issue an agent's client certificate, signed by the dev CA: ID.pem ID.key.
    ///
    /// The certificate's subject CN is the agent id; the hub takes the agent's
    /// identity from it.
    Issue {
        /// Directory holding the CA's ca.pem and ca.key (from `certs init`).
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        /// The agent id: ASCII letters and digits, then also '.', '_' and '-' (at most 64).
        #[arg(long, value_name = "ID")]
        agent: AgentId,
        /// Directory to write into (created with mode 0700 if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Replace files that already exist.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => run(&config),
        Command::Certs { command } => certs(command),
        other => client(other),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let line = report(&e);
            // Once the log format is set, a fatal error is a log line like
            // every other (one JSON object with `[log] format = "json"`).
            match logging::active() {
                Some(LogFormat::Json) => tracing::error!(error = %line, "fieldsync-hub stopped"),
                _ => eprintln!("fieldsync-hub: {line}"),
            }
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line. Our error types already print their
/// cause's text, so a cause is added only when the message so far lacks it.
fn report(error: &anyhow::Error) -> String {
    let mut line = error.to_string();
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

/// A client command: one request (or two) to the operator API, printed as a
/// table or, with `--json`, as the API's JSON.
fn client(command: Command) -> anyhow::Result<()> {
    use fieldsync_hub::client::{self, Client, ClientError};
    use reqwest::Method;
    let api = match &command {
        Command::Agents { api, .. }
        | Command::Get { api, .. }
        | Command::Put { api, .. }
        | Command::Broadcast { api, .. }
        | Command::Webhooks { api, .. } => api,
        _ => unreachable!("only client commands come here"),
    };
    let token = client::token(
        api.token_file.as_deref(),
        std::env::var("FIELDSYNC_TOKEN").ok(),
    )?;
    let c = Client::new(&api.api, token)?;
    let json = api.json;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let text = runtime.block_on(async {
        let out = match &command {
            Command::Agents {
                command: Some(AgentsCommand::Label { id, labels }),
                ..
            } => {
                let labels = client::label_args(labels).map_err(ClientError::Usage)?;
                let path = ["v1", "agents", id, "labels"];
                let body = c.call(Method::PUT, &path, Some(&labels)).await?;
                if json {
                    body.to_string()
                } else {
                    format!("labels of {id}: {}", client::labels_text(&body["labels"]))
                }
            }
            Command::Agents { command, .. } => {
                let body = c.call(Method::GET, &["v1", "agents"], None).await?;
                match command {
                    None | Some(AgentsCommand::List) if json => body.to_string(),
                    None | Some(AgentsCommand::List) => client::agents_table(&body),
                    Some(AgentsCommand::Label { .. }) => unreachable!("handled above"),
                    Some(AgentsCommand::Show { id }) => {
                        let row = body["agents"]
                            .as_array()
                            .and_then(|a| a.iter().find(|r| r["id"] == id.as_str()))
                            .cloned()
                            .ok_or_else(|| {
                                ClientError::Usage(format!("the hub knows no agent {id:?}"))
                            })?;
                        if json {
                            row.to_string()
                        } else {
                            client::fields_list(&row)
                        }
                    }
                }
            }
            Command::Get {
                agent,
                collection,
                key,
                ..
            } => {
                let path = ["v1", "agents", agent, "records", collection, key];
                let body = c.call(Method::GET, &path, None).await?;
                if json {
                    body.to_string()
                } else {
                    client::fields_list(&body["fields"])
                }
            }
            Command::Put {
                agent,
                collection,
                key,
                fields,
                ..
            } => {
                let fields = fieldsync_shared::record::parse_field_args(fields)
                    .map_err(ClientError::Usage)?;
                let path = ["v1", "agents", agent, "records", collection, key];
                let body = c
                    .call(Method::PUT, &path, Some(&serde_json::Value::Object(fields)))
                    .await?;
                if json {
                    body.to_string()
                } else {
                    format!(
                        "queued for {agent} at seq {} (agent connected: {})",
                        body["queued_seq"], body["agent_connected"]
                    )
                }
            }
            Command::Broadcast {
                selector,
                collection,
                key,
                fields,
                ..
            } => {
                let fields = fieldsync_shared::record::parse_field_args(fields)
                    .map_err(ClientError::Usage)?;
                let body = serde_json::json!({
                    "selector": selector,
                    "writes": [{"collection": collection, "key": key, "fields": fields}],
                });
                let body = c.call(Method::POST, &["v1", "broadcast"], Some(&body)).await?;
                if json {
                    body.to_string()
                } else {
                    client::broadcast_text(&body)
                }
            }
            Command::Webhooks { command, .. } => match command {
                WebhooksCommand::List => {
                    let body = c.call(Method::GET, &["v1", "webhooks"], None).await?;
                    if json {
                        body.to_string()
                    } else {
                        client::webhooks_table(&body)
                    }
                }
                WebhooksCommand::Create {
                    url,
                    events,
                    collections,
                    agents,
                } => {
                    let body = client::new_webhook(url, events, collections, agents.as_deref());
                    let made = c.call(Method::POST, &["v1", "webhooks"], Some(&body)).await?;
                    if json {
                        made.to_string()
                    } else {
                        format!(
                            "created {}\nsecret {} (shown only now: store it where the receiver checks signatures)",
                            made["id"].as_str().unwrap_or_default(),
                            made["secret"].as_str().unwrap_or_default()
                        )
                    }
                }
                WebhooksCommand::Delete { id } => {
                    c.call(Method::DELETE, &["v1", "webhooks", id], None).await?;
                    if json {
                        serde_json::json!({"deleted": id}).to_string()
                    } else {
                        format!("deleted {id}")
                    }
                }
                WebhooksCommand::Deliveries { id } => {
                    let body = c
                        .call(Method::GET, &["v1", "webhooks", id, "deliveries"], None)
                        .await?;
                    if json {
                        body.to_string()
                    } else {
                        client::deliveries_table(&body)
                    }
                }
                WebhooksCommand::Replay { id, since } => {
                    let body = serde_json::json!({ "since": since });
                    let answer = c
                        .call(Method::POST, &["v1", "webhooks", id, "replay"], Some(&body))
                        .await?;
                    if json {
                        answer.to_string()
                    } else {
                        format!("replaying {id} from seq {}", answer["from_seq"])
                    }
                }
            },
            _ => unreachable!("only client commands come here"),
        };
        anyhow::Ok(out)
    })?;
    println!("{text}");
    Ok(())
}

/// `fieldsync-hub run`: starts the hub from the configuration file at `config`
/// and serves until SIGINT or SIGTERM. Logging starts once the configuration
/// is read, in its `[log] format`, so every log line has that format; an
/// error in the configuration itself is printed as plain text.
fn run(config: &Path) -> anyhow::Result<()> {
    let config = HubConfig::load(config)?;
    logging::init(config.log)?;
    raise_open_files_limit(&config.mqtt);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(fieldsync_hub::run(config, shutdown_signal()))?;
    Ok(())
}

/// Each connection holds one descriptor (its socket), and connections not yet
/// authenticated have a budget of their own, so a shell's soft limit of 1,024
/// would cap the hub near 1,000 agents: take the whole hard limit, and warn if
/// even that is short of what the `[mqtt]` budgets need.
fn raise_open_files_limit(mqtt: &fieldsync_hub::config::MqttConfig) {
    let needed = (mqtt.max_connections + mqtt.max_pending) as u64 + 512;
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < needed => tracing::warn!(
            limit,
            needed,
            "open-files limit is below what mqtt.max_connections needs; raise the hard limit (ulimit -Hn, LimitNOFILE)"
        ),
        Ok(limit) => tracing::debug!(limit, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutting down");
}

fn certs(command: CertsCommand) -> anyhow::Result<()> {
    let on_existing = |force: bool| {
        if force {
            OnExisting::Overwrite
        } else {
            OnExisting::Refuse
        }
    };
    let written = match command {
        CertsCommand::Init {
            out,
            dns,
            ips,
            force,
        } => {
            let files = pki::init(&out, &dns, &ips, on_existing(force))?;
            vec![files.ca.cert, files.ca.key, files.hub.cert, files.hub.key]
        }
        CertsCommand::Issue {
            ca_dir,
            agent,
            out,
            force,
        } => {
            let files = pki::issue_agent(&ca_dir, &agent, &out, on_existing(force))?;
            vec![files.cert, files.key]
        }
    };
    for path in written {
        println!("wrote {}", path.display());
    }
    Ok(())
}
