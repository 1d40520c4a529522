//! The `fieldsync-hub` binary: parses the command line and runs the hub or one
//! of the development PKI commands (`certs init`, `certs issue`).

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
