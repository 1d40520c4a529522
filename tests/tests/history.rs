//! Version history and rollback end to end, with a real hub and a real agent
//! (mTLS, redb on both sides): both sides list a record's versions with who
//! made each and what it changed (never a field the policy keeps on the
//! device); a rollback to an earlier version is a new operator write that
//! restores every rule's field on both sides — a counter by the difference, a
//! high-water mark lowered — and is itself a version on both; a device write
//! made while the rollback waited is merged with it like any concurrent
//! write; each record keeps only its bound; bad requests change nothing.

use fieldsync_e2e::durability::{http, poll, Fleet, Write, SYNC_TIMEOUT};
use fieldsync_e2e::fleet::TOKEN;
use fieldsync_e2e::TempAgent;
use reqwest::StatusCode;
use serde_json::{json, Value};

const POLICY: &str = r#"
[collections.thermostat]
direction = "both"
sync = ["setpoint", "mode", "runtime_s", "peak_temp"]
merge = { runtime_s = "counter", peak_temp = "max" }
history = 4
"#;

const AGENT: &str = "gw-history";
const KEY: &str = "t1";

fn record_path() -> String {
    format!("/v1/agents/{AGENT}/records/thermostat/{KEY}")
}

async fn agent_get(agent: &TempAgent, path: &str) -> anyhow::Result<(StatusCode, Value)> {
    let r = http().get(agent.url(path)).send().await?;
    let status = r.status();
    Ok((status, r.json().await?))
}

async fn agent_put(agent: &TempAgent, fields: Value) -> anyhow::Result<()> {
    let r = http()
        .put(agent.url(&format!("/v1/records/thermostat/{KEY}")))
        .json(&fields)
        .send()
        .await?;
    anyhow::ensure!(
        r.status() == StatusCode::OK,
        "agent answered {}",
        r.status()
    );
    Ok(())
}

/// Waits until both sides show exactly `want` (the record's fields).
async fn both_show(fleet: &Fleet, agent: &TempAgent, want: &Value) -> anyhow::Result<()> {
    let op = fleet.hub.operator();
    poll(&format!("{want} on both sides"), SYNC_TIMEOUT, || async {
        let (_, a) = agent_get(agent, &format!("/v1/records/thermostat/{KEY}")).await?;
        let (_, h) = op.get(&record_path()).await?;
        Ok(if &a["fields"] == want && &h["fields"] == want {
            Ok(())
        } else {
            Err(format!("agent {a}, hub {h}"))
        })
    })
    .await
}

async fn hub_versions(fleet: &Fleet) -> anyhow::Result<Vec<Value>> {
    let (status, body) = fleet
        .hub
        .operator()
        .get(&format!("{}/history", record_path()))
        .await?;
    anyhow::ensure!(
        status == StatusCode::OK,
        "hub history answered {status}: {body}"
    );
    Ok(body["versions"].as_array().cloned().unwrap_or_default())
}

async fn agent_versions(agent: &TempAgent) -> anyhow::Result<Vec<Value>> {
    let (status, body) = agent_get(agent, &format!("/v1/records/thermostat/{KEY}/history")).await?;
    anyhow::ensure!(
        status == StatusCode::OK,
        "agent history answered {status}: {body}"
    );
    Ok(body["versions"].as_array().cloned().unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_lists_versions_and_a_rollback_restores_one_on_both_sides() -> anyhow::Result<()> {
    let fleet = Fleet::start_with_policy(POLICY)?;
    let (agent, _api) = fleet.linked_agent(AGENT).await?;
    let op = fleet.hub.operator();

    // The device's good state (and a field that never leaves it).
    agent_put(
        &agent,
        json!({"setpoint": 20, "mode": "eco", "runtime_s": {"$inc": 5}, "peak_temp": 30, "note": "secret"}),
    )
    .await?;
    let good = json!({"setpoint": 20, "mode": "eco", "runtime_s": 5, "peak_temp": 30});
    poll("the hub has the device's write", SYNC_TIMEOUT, || async {
        let (_, h) = op.get(&record_path()).await?;
        Ok(if h["fields"] == good {
            Ok(())
        } else {
            Err(h.to_string())
        })
    })
    .await?;

    // A mistaken bulk update from an operator.
    let bad = Write::new(
        "thermostat",
        KEY,
        json!({"setpoint": 99, "mode": "away", "runtime_s": {"$inc": 100}, "peak_temp": 90}),
    );
    fleet.operator().put_accepted(AGENT, &bad).await?;
    let bad_state = json!({"setpoint": 99, "mode": "away", "runtime_s": 105, "peak_temp": 90});
    both_show_with_note(&fleet, &agent, &bad_state).await?;

    // The hub's history: the operator's version, then the device's.
    let versions = hub_versions(&fleet).await?;
    assert_eq!(versions.len(), 2, "{versions:?}");
    let (newest, device) = (&versions[0], &versions[1]);
    assert_eq!(newest["cause"], "operator");
    assert_eq!(newest["by"], "operator");
    assert_eq!(
        newest["changed"]["setpoint"],
        json!({"before": 20, "after": 99})
    );
    assert_eq!(
        newest["changed"]["runtime_s"],
        json!({"before": 5, "after": 105})
    );
    assert_eq!(device["cause"], "agent");
    assert_eq!(device["by"], AGENT);
    assert_eq!(device["origin"], AGENT);
    assert_eq!(
        device["changed"]["mode"],
        json!({"before": null, "after": "eco"})
    );
    assert!(newest["version"].as_u64() > device["version"].as_u64());
    // The agent's: its own write (without the local-only field), then the hub's.
    let local = agent_versions(&agent).await?;
    assert_eq!(local.len(), 2, "{local:?}");
    assert_eq!(local[1]["cause"], "local");
    assert!(local[1]["changed"].get("note").is_none(), "{local:?}");
    assert_eq!(local[1]["changed"]["setpoint"]["after"], 20);
    assert_eq!(local[0]["cause"], "hub");
    assert_eq!(
        local[0]["changed"]["peak_temp"],
        json!({"before": 30, "after": 90})
    );

    // Roll back to the device's version.
    let to = device["version"].as_u64().unwrap();
    let (status, body) = op
        .post(
            &format!("{}/rollback", record_path()),
            &json!({"version": to}),
        )
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(
        body["fields"],
        json!(["mode", "peak_temp", "runtime_s", "setpoint"])
    );
    both_show_with_note(&fleet, &agent, &good).await?;

    // The rollback is versions on both sides: lowering the high-water mark
    // takes a second write (clear, then set), so it is two versions, both
    // marked as the rollback on the hub.
    let versions = hub_versions(&fleet).await?;
    assert_eq!(versions.len(), 4, "{versions:?}");
    for v in &versions[..2] {
        assert_eq!(v["cause"], "rollback", "{v}");
        assert_eq!(v["rollback_to"], to, "{v}");
        assert_eq!(v["by"], "operator", "{v}");
    }
    let (set, cleared) = (&versions[0], &versions[1]);
    assert_eq!(
        cleared["changed"]["setpoint"],
        json!({"before": 99, "after": 20})
    );
    assert_eq!(
        cleared["changed"]["runtime_s"],
        json!({"before": 105, "after": 5})
    );
    assert_eq!(
        cleared["changed"]["peak_temp"],
        json!({"before": 90, "after": null})
    );
    assert_eq!(
        set["changed"]["peak_temp"],
        json!({"before": null, "after": 30})
    );
    let local = agent_versions(&agent).await?;
    assert_eq!(local.len(), 4, "{local:?}");
    assert!(local[..2].iter().all(|v| v["cause"] == "hub"), "{local:?}");
    assert_eq!(
        local[1]["changed"]["setpoint"],
        json!({"before": 99, "after": 20})
    );
    assert_eq!(
        local[0]["changed"]["peak_temp"],
        json!({"before": null, "after": 30})
    );

    // Rolling back to where the record already is writes nothing.
    let (status, body) = op
        .post(
            &format!("{}/rollback", record_path()),
            &json!({"version": to}),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["fields"], json!([]));

    // Bad requests: a clear error, nothing written.
    let before = hub_versions(&fleet).await?;
    for (body, status, code) in [
        (
            json!({"version": 999_999}),
            StatusCode::NOT_FOUND,
            "version_not_found",
        ),
        (
            json!({"version": "one"}),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (json!({}), StatusCode::BAD_REQUEST, "invalid_json"),
    ] {
        let (got, answer) = op
            .post(&format!("{}/rollback", record_path()), &body)
            .await?;
        assert_eq!(got, status, "{body}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{answer}");
    }
    let (got, answer) = op
        .get(&format!("{}/history?limit=0", record_path()))
        .await?;
    assert_eq!(got, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(hub_versions(&fleet).await?, before);

    // Each record keeps its bound (4 versions here), on both sides.
    for n in 0..5 {
        agent_put(&agent, json!({"setpoint": 30 + n})).await?;
    }
    let mut last = good.clone();
    last["setpoint"] = json!(34);
    both_show_with_note(&fleet, &agent, &last).await?;
    let versions = hub_versions(&fleet).await?;
    assert_eq!(versions.len(), 4, "{versions:?}");
    assert_eq!(versions[0]["changed"]["setpoint"]["after"], 34);
    assert_eq!(agent_versions(&agent).await?.len(), 4);
    // The rollback's version is gone now: rolling back to it is refused.
    let (got, _) = op
        .post(
            &format!("{}/rollback", record_path()),
            &json!({"version": to}),
        )
        .await?;
    assert_eq!(got, StatusCode::NOT_FOUND);
    // Both count what the bounds dropped: 9 versions made, 4 kept.
    let hub_text = scrape(&format!("{}/metrics", fleet.hub.api_url()), Some(TOKEN)).await?;
    assert_eq!(
        sample(&hub_text, "fieldsync_hub_history_dropped_total"),
        Some(5.0)
    );
    assert!(
        sample(&hub_text, "fieldsync_hub_history_bytes") > Some(0.0),
        "{hub_text}"
    );
    let agent_text = scrape(&agent.url("/metrics"), None).await?;
    assert_eq!(
        sample(&agent_text, "fieldsync_agent_history_dropped_total"),
        Some(5.0)
    );
    assert!(sample(&agent_text, "fieldsync_agent_history_bytes") > Some(0.0));
    Ok(())
}

/// The text of a `GET /metrics`.
async fn scrape(url: &str, token: Option<&str>) -> anyhow::Result<String> {
    let mut request = http().get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let r = request.send().await?;
    anyhow::ensure!(
        r.status() == StatusCode::OK,
        "{url} answered {}",
        r.status()
    );
    Ok(r.text().await?)
}

/// The value of an unlabelled sample in a Prometheus exposition.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .find_map(|v| v.trim().parse().ok())
}

/// [`both_show`] where the agent also holds its local-only `note`.
async fn both_show_with_note(fleet: &Fleet, agent: &TempAgent, want: &Value) -> anyhow::Result<()> {
    let op = fleet.hub.operator();
    let mut local = want.clone();
    local["note"] = json!("secret");
    poll(&format!("{want} on both sides"), SYNC_TIMEOUT, || async {
        let (_, a) = agent_get(agent, &format!("/v1/records/thermostat/{KEY}")).await?;
        let (_, h) = op.get(&record_path()).await?;
        Ok(if a["fields"] == local && &h["fields"] == want {
            Ok(())
        } else {
            Err(format!("agent {a}, hub {h}"))
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_write_concurrent_with_a_rollback_merges_by_its_rule() -> anyhow::Result<()> {
    let mut fleet = Fleet::start_with_policy(POLICY)?;
    let (mut agent, _api) = fleet.linked_agent(AGENT).await?;
    let op = fleet.hub.operator();
    agent_put(&agent, json!({"setpoint": 20, "runtime_s": {"$inc": 5}})).await?;
    both_show(&fleet, &agent, &json!({"setpoint": 20, "runtime_s": 5})).await?;
    fleet
        .operator()
        .put_accepted(
            AGENT,
            &Write::new(
                "thermostat",
                KEY,
                json!({"setpoint": 99, "runtime_s": {"$inc": 100}}),
            ),
        )
        .await?;
    both_show(&fleet, &agent, &json!({"setpoint": 99, "runtime_s": 105})).await?;
    let versions = hub_versions(&fleet).await?;
    let to = versions[1]["version"].as_u64().unwrap();

    // The device goes offline and keeps counting; the operator rolls back
    // meanwhile (queued for it).
    agent.kill();
    let (status, body) = op
        .post(
            &format!("{}/rollback", record_path()),
            &json!({"version": to}),
        )
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["agent_connected"], false);
    // The hub goes down too; the device comes back and counts on.
    fleet.hub.kill();
    agent.restart()?;
    agent_put(&agent, json!({"runtime_s": {"$inc": 7}})).await?;
    fleet.hub.restart()?;
    // The counter's rollback is a -100 that the device's concurrent +7
    // adds to; the setpoint is the rollback's.
    both_show(&fleet, &agent, &json!({"setpoint": 20, "runtime_s": 12})).await?;
    Ok(())
}
