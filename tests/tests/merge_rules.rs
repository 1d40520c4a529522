//! Per-field merge rules end to end, with a real hub and a real agent (mTLS,
//! redb on both sides, SIGKILLs for the outages): increments made on both
//! sides while they cannot reach each other all count; `max` keeps the
//! maximum; `prefer = hub` gives a concurrent operator write the win over a
//! device write with a later clock, while a device write made after seeing
//! the operator's value wins; `review` keeps both concurrent values, shown on
//! both sides, until a write resolves them; edits that do not fit a rule are
//! refused by both APIs and change nothing.

use fieldsync_e2e::durability::{http, poll, Fleet, Write, SYNC_TIMEOUT};
use fieldsync_e2e::{AgentSetup, TempAgent};
use reqwest::StatusCode;
use serde_json::{json, Value};

const POLICY: &str = r#"
[collections.thermostat]
direction = "both"
sync = ["setpoint", "runtime_s", "peak_temp", "limit_max", "dose"]
merge = { runtime_s = "counter", peak_temp = "max", dose = "review" }
prefer = { limit_max = "hub" }
"#;

const AGENT: &str = "gw-rules";
const KEY: &str = "t1";

fn write(fields: Value) -> Write {
    Write::new("thermostat", KEY, fields)
}

/// The agent's whole answer for the record (fields and conflicts).
async fn agent_record(agent: &TempAgent) -> anyhow::Result<Value> {
    let r = http()
        .get(agent.url(&format!("/v1/records/thermostat/{KEY}")))
        .send()
        .await?;
    anyhow::ensure!(
        r.status() == StatusCode::OK,
        "agent answered {}",
        r.status()
    );
    Ok(r.json().await?)
}

/// The hub's whole answer for its copy of the record.
async fn hub_record(fleet: &Fleet) -> anyhow::Result<Value> {
    let (status, body) = fleet
        .hub
        .operator()
        .get(&format!("/v1/agents/{AGENT}/records/thermostat/{KEY}"))
        .await?;
    anyhow::ensure!(status == StatusCode::OK, "hub answered {status}: {body}");
    Ok(body)
}

/// Waits until both sides show `field` = `want`.
async fn both_show(
    fleet: &Fleet,
    agent: &TempAgent,
    field: &str,
    want: Value,
) -> anyhow::Result<()> {
    poll(
        &format!("{field} = {want} on both sides"),
        SYNC_TIMEOUT,
        || async {
            let (a, h) = (agent_record(agent).await?, hub_record(fleet).await?);
            Ok(
                if a["fields"][field] == want && h["fields"][field] == want {
                    Ok(())
                } else {
                    Err(format!("agent {a}, hub {h}"))
                },
            )
        },
    )
    .await
}

async fn agent_put(agent: &TempAgent, fields: Value) -> anyhow::Result<(StatusCode, Value)> {
    let r = http()
        .put(agent.url(&format!("/v1/records/thermostat/{KEY}")))
        .json(&fields)
        .send()
        .await?;
    let status = r.status();
    Ok((status, r.json().await.unwrap_or(Value::Null)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn increments_on_both_sides_during_outages_all_count() -> anyhow::Result<()> {
    let mut fleet = Fleet::start_with_policy(POLICY)?;
    let (mut agent, _api) = fleet.linked_agent(AGENT).await?;
    agent_put(&agent, json!({"runtime_s": {"$inc": 5}})).await?;
    both_show(&fleet, &agent, "runtime_s", json!(5)).await?;

    // The hub goes down; the device keeps counting.
    fleet.hub.kill();
    for n in [3, 4] {
        let (status, body) = agent_put(&agent, json!({"runtime_s": {"$inc": n}})).await?;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // The device goes down; the hub comes back and the operator adjusts.
    agent.kill();
    fleet.hub.restart()?;
    let op = fleet.operator();
    op.put_accepted(AGENT, &write(json!({"runtime_s": {"$inc": 10}})))
        .await?;
    op.put_accepted(AGENT, &write(json!({"runtime_s": {"$inc": -1}})))
        .await?;
    // Both come back together: every increment counts, once.
    agent.restart()?;
    both_show(&fleet, &agent, "runtime_s", json!(5 + 3 + 4 + 10 - 1)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_prefer_and_review_decide_as_the_policy_says() -> anyhow::Result<()> {
    let mut fleet = Fleet::start_with_policy(POLICY)?;
    let (mut agent, _api) = fleet.linked_agent(AGENT).await?;

    // max: the lower operator value does not replace the device's peak.
    agent_put(&agent, json!({"peak_temp": 71.5, "setpoint": 20})).await?;
    both_show(&fleet, &agent, "peak_temp", json!(71.5)).await?;
    fleet
        .operator()
        .put_accepted(AGENT, &write(json!({"peak_temp": 40})))
        .await?;
    agent_put(&agent, json!({"setpoint": 21})).await?;
    both_show(&fleet, &agent, "setpoint", json!(21)).await?;
    assert_eq!(
        agent_record(&agent).await?["fields"]["peak_temp"],
        json!(71.5)
    );
    assert_eq!(
        hub_record(&fleet).await?["fields"]["peak_temp"],
        json!(71.5)
    );

    // Concurrent writes: the operator's first (agent down), then the
    // device's (hub down), later by the clock and without having seen it.
    agent.kill();
    let op = fleet.operator();
    op.put_accepted(AGENT, &write(json!({"limit_max": 60, "dose": "10 mg"})))
        .await?;
    fleet.hub.kill();
    agent.restart()?;
    let (status, body) = agent_put(&agent, json!({"limit_max": 90, "dose": "5 mg"})).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["fields"]["limit_max"],
        json!(90),
        "the device sees its own write"
    );
    fleet.hub.restart()?;
    // prefer = hub: the operator's value wins on both sides.
    both_show(&fleet, &agent, "limit_max", json!(60)).await?;
    // review: both values are kept and shown on both sides.
    poll(
        "both dose candidates on both sides",
        SYNC_TIMEOUT,
        || async {
            let (a, h) = (agent_record(&agent).await?, hub_record(&fleet).await?);
            let sorted = |v: &Value| {
                let mut c: Vec<String> = v["conflicts"]["dose"]
                    .as_array()
                    .map(|a| a.iter().map(Value::to_string).collect())
                    .unwrap_or_default();
                c.sort();
                c
            };
            let want = ["\"10 mg\"", "\"5 mg\""];
            Ok(if sorted(&a) == want && sorted(&h) == want {
                Ok(())
            } else {
                Err(format!("agent {a}, hub {h}"))
            })
        },
    )
    .await?;

    // Both conflicts are listed on both sides, with one id for each field.
    let hub_op = fleet.hub.operator();
    let (status, listed) = hub_op.get(&format!("/v1/conflicts?agent={AGENT}")).await?;
    assert_eq!(status, StatusCode::OK, "{listed}");
    let on_agent: Value = http()
        .get(agent.url("/v1/conflicts?collection=thermostat"))
        .send()
        .await?
        .json()
        .await?;
    let rules = |list: &Value| -> Vec<(String, String)> {
        let mut r: Vec<(String, String)> = list["conflicts"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| {
                        (
                            c["field"].as_str().unwrap_or("").to_owned(),
                            c["rule"].as_str().unwrap_or("").to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        r.sort();
        r
    };
    let want = [
        ("dose".to_owned(), "review".to_owned()),
        ("limit_max".to_owned(), "prefer".to_owned()),
    ];
    assert_eq!(rules(&listed), want, "{listed}");
    assert_eq!(rules(&on_agent), want, "{on_agent}");
    let dose = listed["conflicts"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["field"] == "dose"))
        .cloned()
        .unwrap_or_default();
    let id = dose["id"].as_str().unwrap_or_default().to_owned();
    assert!(on_agent["conflicts"]
        .as_array()
        .is_some_and(|a| a.iter().any(|c| c["id"] == id.as_str())));
    assert_eq!(
        dose["candidates"].as_array().map(Vec::len),
        Some(2),
        "{dose}"
    );

    // A device write made after it received the operator's value wins
    // (causality, not role), and a person resolves the review by the API.
    let (status, _) = agent_put(&agent, json!({"limit_max": 75})).await?;
    assert_eq!(status, StatusCode::OK);
    both_show(&fleet, &agent, "limit_max", json!(75)).await?;
    let resolve = format!("/v1/conflicts/{id}/resolve");
    let (status, body) = hub_op
        .post(&resolve, &json!({"value": 1, "keep": "hub"}))
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = hub_op
        .post("/v1/conflicts/bm9uZQ/resolve", &json!({"keep": "hub"}))
        .await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = hub_op.post(&resolve, &json!({"keep": "agent"})).await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    both_show(&fleet, &agent, "dose", json!("5 mg")).await?;
    let (status, body) = hub_op.post(&resolve, &json!({"keep": "agent"})).await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "resolved already: {body}");
    let (a, h) = (agent_record(&agent).await?, hub_record(&fleet).await?);
    assert!(a.get("conflicts").is_none(), "resolved on the agent: {a}");
    assert!(h.get("conflicts").is_none(), "resolved on the hub: {h}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_that_do_not_fit_a_rule_are_refused_by_both_apis() -> anyhow::Result<()> {
    let fleet = Fleet::start_with_policy(POLICY)?;
    let (agent, _api) = fleet.linked_agent(AGENT).await?;
    agent_put(&agent, json!({"runtime_s": {"$inc": 2}, "setpoint": 19})).await?;
    both_show(&fleet, &agent, "runtime_s", json!(2)).await?;
    let before = (agent_record(&agent).await?, hub_record(&fleet).await?);
    let op = fleet.operator();
    for (fields, says) in [
        (json!({"runtime_s": 5, "setpoint": 30}), "counter"),
        (json!({"setpoint": {"$inc": 1}}), "not a counter"),
        (json!({"runtime_s": {"$inc": 1.5}}), "integer"),
    ] {
        let (status, body) = agent_put(&agent, fields.clone()).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "agent: {fields} -> {body}");
        assert_eq!(body["error"]["code"], "invalid_edit", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains(says),
            "{body}"
        );
        let (status, body) = op.put(AGENT, &write(fields.clone())).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "hub: {fields} -> {body}");
        assert_eq!(body["error"]["code"], "invalid_edit", "{body}");
    }
    // Nothing changed, on either side (a later write shows the link is up).
    agent_put(&agent, json!({"peak_temp": 1})).await?;
    both_show(&fleet, &agent, "peak_temp", json!(1)).await?;
    let (a, h) = (agent_record(&agent).await?, hub_record(&fleet).await?);
    assert_eq!(a["fields"]["setpoint"], before.0["fields"]["setpoint"]);
    assert_eq!(a["fields"]["runtime_s"], json!(2));
    assert_eq!(h["fields"]["setpoint"], before.1["fields"]["setpoint"]);
    assert_eq!(h["fields"]["runtime_s"], json!(2));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_other_rules_is_refused_and_says_why() -> anyhow::Result<()> {
    let fleet = Fleet::start_with_policy(POLICY)?;
    let id = "gw-rules-other";
    fleet.pki.issue(id)?;
    // The same collections and fields, but peak_temp merges by min here.
    let other = POLICY.replace("peak_temp = \"max\"", "peak_temp = \"min\"");
    let agent = TempAgent::start_with(AgentSetup {
        link: Some(fleet.pki.link(id, &fleet.hub.mqtt_url())),
        id: Some(id.to_owned()),
        policy: Some(other),
        ..AgentSetup::default()
    })?;
    let api = fieldsync_e2e::durability::AgentApi::of(&agent);
    fieldsync_e2e::durability::wait_status(&api, "the rules refusal", |s| {
        s["rules_mismatch"] == true && s["connected"] == false
    })
    .await?;
    // Its writes stay queued, and nothing of them reached the hub.
    let (status, _) = agent_put(&agent, json!({"setpoint": 18})).await?;
    assert_eq!(status, StatusCode::OK);
    assert!(api.status_u64("outbox_pending").await? >= 1);
    let (status, _) = fleet
        .hub
        .operator()
        .get(&format!("/v1/agents/{id}/records/thermostat/{KEY}"))
        .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    poll("the hub's log names the mismatch", SYNC_TIMEOUT, || async {
        let log = fleet.hub.stderr_log();
        Ok(if log.contains("merge rules are not the hub's") {
            Ok(())
        } else {
            Err("not yet".to_owned())
        })
    })
    .await?;
    assert!(
        agent.stderr_log().contains("merge rules"),
        "{}",
        agent.stderr_log()
    );
    Ok(())
}
