//! The `fieldsync-agent` binary: parses the command line and runs the agent or a
//! client command against a running agent's local API.

use std::process::ExitCode;

use anyhow::{anyhow, Context};
use clap::Parser;
use fieldsync_agent::cli::{parse_fields, record_url, Cli, Command};
use fieldsync_agent::config::AgentConfig;
use fieldsync_shared::logging::{self, LogFormat};
use serde_json::Value;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => run(&config),
        client => tokio_runtime().and_then(|rt| rt.block_on(client_command(client))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let line = report(&e);
            // Once the log format is set, a fatal error is a log line like
            // every other (one JSON object with `[log] format = "json"`).
            match logging::active() {
                Some(LogFormat::Json) => tracing::error!(error = %line, "fieldsync-agent stopped"),
                _ => eprintln!("fieldsync-agent: {line}"),
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

fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// `fieldsync-agent run`. Logging starts once the configuration is read, in
/// its `[log] format`, so every log line has that format; an error in the
/// configuration itself is printed as plain text.
fn run(config_path: &std::path::Path) -> anyhow::Result<()> {
    let config = AgentConfig::load(config_path)?;
    logging::init(config.log)?;
    tokio_runtime()?.block_on(fieldsync_agent::run(config, shutdown_signal()))?;
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}

async fn client_command(command: Command) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let (request, base) = match &command {
        Command::Put {
            record,
            fields,
            api,
        } => {
            let body = parse_fields(fields).map_err(|e| anyhow!(e))?;
            let url =
                record_url(&api.api, &record.collection, &record.key).map_err(|e| anyhow!(e))?;
            (http.put(url).json(&body), &api.api)
        }
        Command::Get { record, api } => {
            let url =
                record_url(&api.api, &record.collection, &record.key).map_err(|e| anyhow!(e))?;
            (http.get(url), &api.api)
        }
        Command::Delete { record, api } => {
            let url =
                record_url(&api.api, &record.collection, &record.key).map_err(|e| anyhow!(e))?;
            (http.delete(url), &api.api)
        }
        Command::Status { api } => {
            let url = format!("{}/v1/status", api.api.trim_end_matches('/'));
            (http.get(url), &api.api)
        }
        Command::Run { .. } => unreachable!("handled in main"),
    };
    let response = request.send().await.with_context(|| {
        format!("cannot reach the agent at {base} (is `fieldsync-agent run` running? see --api)")
    })?;
    let status = response.status();
    let body: Value = response.json().await.with_context(|| {
        format!("the agent at {base} answered {status} with a body that is not JSON")
    })?;
    if status.is_success() {
        println!("{}", serde_json::to_string_pretty(&body)?);
        Ok(())
    } else {
        let message = body["error"]["message"].as_str().unwrap_or("(no message)");
        Err(anyhow!("{status}: {message}"))
    }
}
