//! The HTTP contract of both programs, against a real hub and a real agent:
//! each serves its OpenAPI document at `/v1/openapi.json` (without a token),
//! and it is the committed `docs/openapi/*.json`; every documented
//! operation answers (no unknown route). With `FIELDSYNC_SCHEMATHESIS`
//! naming the schemathesis CLI (`st`, from PyPI), schemathesis fuzzes both
//! APIs from their documents for a fixed number of examples per operation
//! and must find no 5xx and no answer that breaks the document.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fieldsync_e2e::durability::{http, Fleet};
use fieldsync_e2e::fleet::TOKEN;
use fieldsync_e2e::output_within;
use reqwest::StatusCode;
use serde_json::Value;

const SCHEMATHESIS_ENV: &str = "FIELDSYNC_SCHEMATHESIS";
/// Examples per operation (`FIELDSYNC_SCHEMATHESIS_EXAMPLES` overrides).
const DEFAULT_EXAMPLES: &str = "40";
/// Longest one schemathesis run may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(900);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn committed(name: &str) -> anyhow::Result<Value> {
    let path = workspace().join("docs/openapi").join(name);
    Ok(serde_json::from_str(&std::fs::read_to_string(&path)?)?)
}

async fn served(base: &str) -> anyhow::Result<Value> {
    let r = http().get(format!("{base}/v1/openapi.json")).send().await?;
    anyhow::ensure!(r.status() == StatusCode::OK, "{}", r.status());
    Ok(r.json().await?)
}

/// Calls every documented operation with its path parameters filled in and
/// checks the answer is not the router's "no such route" or "method not
/// allowed".
async fn every_operation_is_routed(base: &str, doc: &Value) -> anyhow::Result<()> {
    let client = http();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        let concrete = path
            .replace("{agent}", "gw-x")
            .replace("{collection}", "settings")
            .replace("{key}", "k")
            .replace("{id}", "wh_none");
        for method in item.as_object().into_iter().flatten().map(|(m, _)| m) {
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes())?;
            let r = client
                .request(method.clone(), format!("{base}{concrete}"))
                .bearer_auth(TOKEN)
                .body("{}")
                .timeout(Duration::from_secs(10))
                .send()
                .await?;
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            assert!(
                !body.contains("\"no_route\"") && status != StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path} is documented but not routed: {status} {body}"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_programs_serve_their_committed_documents_and_route_every_operation(
) -> anyhow::Result<()> {
    let fleet = Fleet::start()?;
    let (agent, _api) = fleet.linked_agent("gw-contract").await?;
    let hub_base = fleet.hub.api_url().to_owned();
    let hub_doc = served(&hub_base).await?;
    assert_eq!(
        hub_doc,
        committed("hub.json")?,
        "the hub serves docs/openapi/hub.json"
    );
    assert!(
        hub_doc["components"]["securitySchemes"]["bearer"].is_object(),
        "the hub documents its bearer token"
    );
    let agent_doc = served(agent.base_url()).await?;
    assert_eq!(
        agent_doc,
        committed("agent.json")?,
        "the agent serves docs/openapi/agent.json"
    );
    every_operation_is_routed(&hub_base, &hub_doc).await?;
    every_operation_is_routed(agent.base_url(), &agent_doc).await?;
    Ok(())
}

/// One schemathesis run against `base`; fails with its output unless it
/// exits 0.
fn schemathesis(st: &str, base: &str, token: Option<&str>, report: &Path) -> anyhow::Result<()> {
    let examples = std::env::var("FIELDSYNC_SCHEMATHESIS_EXAMPLES")
        .unwrap_or_else(|_| DEFAULT_EXAMPLES.to_owned());
    let mut cmd = Command::new(st);
    cmd.arg("run")
        .arg(format!("{base}/v1/openapi.json"))
        .args(["--checks", "all"])
        // Not checked: object-level authorization needs two principals (the
        // hub has one operator token until scoped tokens arrive), and
        // "positive data acceptance" would demand that every schema-valid
        // request succeed, which JSON Schema cannot promise here: name limits
        // are in bytes, not characters, and the policy refuses (403) fields
        // and collections it does not permit, by design.
        .args([
            "--exclude-checks",
            "object_level_authorization,positive_data_acceptance",
        ])
        .args(["--max-examples", &examples])
        .args(["--seed", "20261202"])
        .args(["--request-timeout", "30"])
        .args(["--workers", "2"])
        .arg("--no-color")
        .args(["--generation-database", "none"])
        .arg("--report-dir")
        .arg(report)
        .args(["--report", "junit"]);
    if let Some(token) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    let out = output_within(cmd, RUN_TIMEOUT)?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    anyhow::ensure!(
        out.status.success(),
        "schemathesis against {base} failed:\n{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_answer_off_the_document() -> anyhow::Result<()> {
    let Some(st) = std::env::var(SCHEMATHESIS_ENV)
        .ok()
        .filter(|s| !s.is_empty())
    else {
        println!("skipped: {SCHEMATHESIS_ENV} is not set (the path or name of the schemathesis CLI, `st`)");
        return Ok(());
    };
    let fleet = Fleet::start()?;
    let (agent, _api) = fleet.linked_agent("gw-contract").await?;
    let report = workspace().join("target/schemathesis");
    std::fs::create_dir_all(&report)?;
    let hub_base = fleet.hub.api_url().to_owned();
    let agent_base = agent.base_url().to_owned();
    let st2 = st.clone();
    let (hub_report, agent_report) = (report.join("hub"), report.join("agent"));
    tokio::task::spawn_blocking(move || schemathesis(&st2, &hub_base, Some(TOKEN), &hub_report))
        .await??;
    tokio::task::spawn_blocking(move || schemathesis(&st, &agent_base, None, &agent_report))
        .await??;
    assert!(
        fleet
            .hub
            .stderr_log()
            .lines()
            .all(|l| !l.contains("panicked")),
        "the hub did not panic"
    );
    assert!(
        agent.stderr_log().lines().all(|l| !l.contains("panicked")),
        "the agent did not panic"
    );
    Ok(())
}
