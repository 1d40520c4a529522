//! The one-command demo: a dev PKI, a hub and two agents on a temporary folder;
//! a record whose local-only fields stay on the device; an agent taken offline
//! while the operator queues changes for it; the agent back and the changes
//! delivered. Exits 0 when everything it shows held, and cleans up.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{ensure, Context};
use fieldsync_e2e::eventually;
use fieldsync_e2e::fleet::{Pki, TempHub, FLEET_POLICY};
use reqwest::StatusCode;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fieldsync-demo: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(demo()) {
        Ok(()) => {
            println!(
                "\nDemo complete: every step held. Processes stopped, temporary files removed."
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\nfieldsync-demo FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn step(n: u32, text: &str) {
    println!("\n== {n}. {text}");
}

fn show(label: &str, value: &Value) {
    println!("   {label}: {value}");
}

async fn demo() -> anyhow::Result<()> {
    println!("Fieldsync demo (building the binaries if needed) ...");
    let bins = fieldsync_e2e::bin_dir();
    let dir = tempfile::Builder::new()
        .prefix("fieldsync-demo-")
        .tempdir()?;
    let http = reqwest::Client::new();

    step(
        1,
        "A dev PKI: fleet CA, hub certificate, one certificate per agent",
    );
    let pki = Pki::create(&dir.path().join("pki"))?;
    for agent in ["gw-north", "gw-south"] {
        pki.issue(agent)?;
    }
    println!(
        "   fieldsync-hub certs init/issue wrote {}",
        pki.dir().display()
    );
    println!("   binaries: {}", bins.display());

    step(
        2,
        "Start the hub (embedded broker behind its mTLS front door) and two agents",
    );
    let hub = TempHub::start(dir.path(), &pki, FLEET_POLICY)?;
    println!(
        "   hub: mqtt {}  operator API {}",
        hub.mqtt_url(),
        hub.api_url()
    );
    let mut north = hub.agent(&pki, "gw-north", None)?;
    let south = hub.agent(&pki, "gw-south", None)?;
    println!(
        "   gw-north API {}   gw-south API {}",
        north.base_url(),
        south.base_url()
    );
    println!(
        "   policy: patients up [initials, ward, heart_rate]; settings both [mode, threshold]"
    );

    step(
        3,
        "gw-north writes a patient record with permitted and local-only fields",
    );
    let record = json!({"initials": "JD", "ward": 3, "ssn": "123-45-6789", "notes": "allergic to penicillin"});
    let stored: Value = http
        .put(north.url("/v1/records/patients/p1"))
        .json(&record)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    show("gw-north local copy", &stored["fields"]);

    let at_hub = eventually("the hub to receive p1", WAIT, || async {
        hub.record("gw-north", "patients", "p1")
            .await
            .ok()
            .flatten()
    })
    .await?;
    show("hub copy", &at_hub);
    ensure!(
        at_hub == json!({"initials": "JD", "ward": 3}),
        "the hub holds {at_hub}"
    );
    let hub_bytes = read_all(&dir.path().join("hub-data"))?;
    for secret in ["123-45-6789", "penicillin"] {
        ensure!(
            !contains(&hub_bytes, secret.as_bytes()),
            "{secret:?} reached the hub's files"
        );
    }
    println!("   ssn and notes stayed on the device: not in the hub's copy, not in its data files");

    step(4, "gw-north goes offline (SIGKILL, like a power cut)");
    north.kill();
    let row = eventually("the hub to see gw-north disconnected", WAIT, || async {
        hub.agent_row("gw-north")
            .await
            .ok()
            .flatten()
            .filter(|r| r["connected"] == false)
    })
    .await?;
    show("hub's view of gw-north", &row);

    step(
        5,
        "The operator writes settings for gw-north while it is away",
    );
    for (key, body) in [
        ("s1", json!({"mode": "eco"})),
        ("s2", json!({"threshold": 40})),
        ("s1", json!({"mode": "away"})),
    ] {
        let (status, answer) = hub
            .put(
                &format!("/v1/agents/gw-north/records/settings/{key}"),
                &body,
            )
            .await?;
        ensure!(
            status == StatusCode::ACCEPTED,
            "operator PUT answered {status}: {answer}"
        );
        println!(
            "   PUT settings/{key} {body} -> {status}, queued_seq {}",
            answer["queued_seq"]
        );
    }
    let row = hub
        .agent_row("gw-north")
        .await?
        .context("the hub forgot gw-north")?;
    show("queued for gw-north", &row["queue_pending"]);
    ensure!(
        row["queue_pending"] == 3,
        "expected 3 queued changes, got {row}"
    );

    step(
        6,
        "gw-north comes back: the queued changes arrive, in order",
    );
    north.restart()?;
    eventually("gw-north's queue to drain", WAIT, || async {
        hub.agent_row("gw-north")
            .await
            .ok()
            .flatten()
            .filter(|r| r["queue_pending"] == 0 && r["connected"] == true)
    })
    .await?;
    for key in ["s1", "s2"] {
        let local: Value = http
            .get(north.url(&format!("/v1/records/settings/{key}")))
            .send()
            .await?
            .json()
            .await?;
        show(&format!("gw-north settings/{key}"), &local["fields"]);
    }
    let s1: Value = http
        .get(north.url("/v1/records/settings/s1"))
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        s1["fields"] == json!({"mode": "away"}),
        "settings/s1 on gw-north is {s1}"
    );

    step(
        7,
        "gw-south saw none of it: each agent has only its own data",
    );
    let status = http
        .get(south.url("/v1/records/settings/s1"))
        .send()
        .await?
        .status();
    println!("   gw-south GET settings/s1 -> {status}");
    ensure!(
        status == StatusCode::NOT_FOUND,
        "gw-south has gw-north's settings"
    );
    let (_, agents) = hub.get("/v1/agents").await?;
    show("hub GET /v1/agents", &agents["agents"]);
    Ok(())
}

/// Every byte of every file under `dir`.
fn read_all(dir: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            bytes.extend(read_all(&path)?);
        } else {
            bytes.extend(std::fs::read(&path)?);
        }
    }
    Ok(bytes)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
