//! Data quality rules (a collection's `schema` in the policy) end to end, with
//! the real hub and agents over mTLS and redb on both sides: a write that
//! breaks a rule gets 422 naming the field and its rule on both APIs and
//! changes nothing; a raw upstream change that breaks the hub's rules loses
//! just that field's value (never stored, counted, the sender told, the value
//! never logged); and where an agent's rules and the hub's differ, each
//! receiver refuses what breaks its own and the other side is told.

use std::time::Duration;

use fieldsync_e2e::durability::{http, poll, Fleet, SYNC_TIMEOUT};
use fieldsync_e2e::fleet::TOKEN;
use fieldsync_e2e::raw_mqtt::{mtls_config, RawMqtt};
use fieldsync_e2e::{AgentSetup, TempAgent};
use fieldsync_shared::hlc::system_now_ms;
use fieldsync_shared::wire::{up_topic, Batch, Entry, ErrorCode, Message};
use fieldsync_shared::{
    AgentId, Change, CollectionName, FieldName, FieldState, FieldValue, Incarnation, Origin,
    RecordKey, RecordState, Seq, Stamp, Version,
};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// The hub's rules (and, unless a test says otherwise, the agents').
const POLICY: &str = r#"
[collections.thermostat]
direction = "both"
sync = ["setpoint", "mode", "label"]
schema = { setpoint = { type = "number", min = 5, max = 35 }, mode = ["eco", "away"], label = "string" }
"#;

const ANSWER: Duration = Duration::from_secs(10);

async fn agent_send(
    agent: &TempAgent,
    method: reqwest::Method,
    path: &str,
    body: &Value,
) -> anyhow::Result<(StatusCode, Value)> {
    let r = http()
        .request(method, agent.url(path))
        .json(body)
        .send()
        .await?;
    let status = r.status();
    Ok((status, r.json().await?))
}

async fn agent_status(agent: &TempAgent) -> anyhow::Result<Value> {
    Ok(http()
        .get(agent.url("/v1/status"))
        .send()
        .await?
        .json()
        .await?)
}

/// Asserts a 422 `schema_violation` whose message names `field` and `rule`.
fn assert_refused(answer: &(StatusCode, Value), field: &str, rule: &str) {
    let (status, body) = answer;
    assert_eq!(*status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["code"], "schema_violation", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("field \"{field}\"")) && message.contains(rule),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_breaks_the_schema_gets_422_naming_the_field_on_both_apis(
) -> anyhow::Result<()> {
    let fleet = Fleet::start_with_policy(POLICY)?;
    let (agent, _api) = fleet.linked_agent("gw-schema").await?;
    let op = fleet.hub.operator();
    let put = reqwest::Method::PUT;
    let post = reqwest::Method::POST;

    // The agent's API: each kind of rule, a single write and a batch.
    let record = "/v1/records/thermostat/t1";
    for (body, field, rule) in [
        (
            json!({"setpoint": 99}),
            "setpoint",
            "a number, from 5 to 35",
        ),
        (json!({"setpoint": "21"}), "setpoint", "a number"),
        (json!({"mode": "turbo"}), "mode", r#"one of "eco", "away""#),
        (json!({"label": 7, "mode": "eco"}), "label", "a string"),
    ] {
        let answer = agent_send(&agent, put.clone(), record, &body).await?;
        assert_refused(&answer, field, rule);
    }
    let batch = json!({"writes": [
        {"collection": "thermostat", "key": "t2", "fields": {"setpoint": 20}},
        {"collection": "thermostat", "key": "t3", "fields": {"setpoint": 1}},
    ]});
    let answer = agent_send(&agent, post.clone(), "/v1/batch", &batch).await?;
    assert_refused(&answer, "setpoint", "from 5 to 35");
    assert!(answer.1["error"]["message"]
        .as_str()
        .unwrap()
        .contains("writes[1]"));
    // Nothing of it was stored or queued.
    for key in ["t1", "t2", "t3"] {
        let r = http()
            .get(agent.url(&format!("/v1/records/thermostat/{key}")))
            .send()
            .await?;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{key}");
    }
    assert_eq!(agent_status(&agent).await?["outbox_last_seq"], 0);

    // A write within the rules goes through and syncs (a delete always may).
    let ok = json!({"setpoint": 21.5, "mode": "eco", "label": "hall"});
    let answer = agent_send(&agent, put.clone(), record, &ok).await?;
    assert_eq!(answer.0, StatusCode::OK, "{}", answer.1);
    let hub_record = "/v1/agents/gw-schema/records/thermostat/t1";
    poll("the valid write reaches the hub", SYNC_TIMEOUT, || async {
        let (_, h) = op.get(hub_record).await?;
        Ok(if h["fields"] == ok {
            Ok(())
        } else {
            Err(h.to_string())
        })
    })
    .await?;

    // The operator's API: a write, a batch and a broadcast, all refused
    // before anything is queued.
    let queued_before = fleet.hub.agent_row("gw-schema").await?.unwrap()["queue_pending"].clone();
    let answer = op.put(hub_record, &json!({"mode": "off"})).await?;
    assert_refused(&answer, "mode", r#"one of "eco", "away""#);
    let answer = op
        .post(
            "/v1/agents/gw-schema/batch",
            &json!({"writes": [
                {"collection": "thermostat", "key": "t1", "fields": {"label": "ok"}},
                {"collection": "thermostat", "key": "t1", "fields": {"setpoint": 40}},
            ]}),
        )
        .await?;
    assert_refused(&answer, "setpoint", "from 5 to 35");
    let (status, body) = op
        .put("/v1/agents/gw-schema/labels", &json!({"site": "lab"}))
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let answer = op
        .post(
            "/v1/broadcast",
            &json!({"selector": "site=lab", "writes": [
                {"collection": "thermostat", "key": "t1", "fields": {"label": ["x"]}},
            ]}),
        )
        .await?;
    assert_refused(&answer, "label", "a string");
    let row = fleet.hub.agent_row("gw-schema").await?.unwrap();
    assert_eq!(row["queue_pending"], queued_before, "nothing queued: {row}");
    let (_, h) = op.get(hub_record).await?;
    assert_eq!(h["fields"], ok);

    // And one within the rules is accepted and reaches the agent.
    let (status, body) = op.put(hub_record, &json!({"mode": "away"})).await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    poll(
        "the operator's write reaches the agent",
        SYNC_TIMEOUT,
        || async {
            let (_, a) = agent_send(&agent, reqwest::Method::GET, record, &Value::Null).await?;
            Ok(if a["fields"]["mode"] == "away" {
                Ok(())
            } else {
                Err(a.to_string())
            })
        },
    )
    .await?;
    Ok(())
}

/// A change writing `fields` to `thermostat/key`, stamped now by `agent`.
fn change(agent: &AgentId, key: &str, fields: &[(&str, Value)]) -> Change {
    let version = Version {
        stamp: Stamp::new(system_now_ms(), 0),
        origin: Origin::agent(agent),
    };
    let mut state = RecordState::default();
    for (field, value) in fields {
        state.fields.insert(
            FieldName::new(*field).unwrap(),
            FieldState::plain(version.clone(), FieldValue::Set(value.clone())),
        );
    }
    Change {
        collection: CollectionName::new("thermostat").unwrap(),
        key: RecordKey::new(key).unwrap(),
        state,
    }
}

async fn hub_counter(fleet: &Fleet, name: &str) -> anyhow::Result<u64> {
    let (_, m) = fleet.hub.operator().get("/v1/metrics").await?;
    m[name]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no counter {name}: {m}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_upstream_change_that_breaks_the_hubs_schema_is_refused_counted_and_told(
) -> anyhow::Result<()> {
    let fleet = Fleet::start_with_policy(POLICY)?;
    let id = AgentId::new("gw-raw").unwrap();
    tokio::task::block_in_place(|| fleet.pki.issue("gw-raw"))?;
    let config = mtls_config(
        &fleet.pki.ca(),
        &fleet.pki.cert("gw-raw"),
        &fleet.pki.key("gw-raw"),
    )?;
    let mut raw = RawMqtt::open(fleet.hub.mqtt_addr(), config, "gw-raw", ANSWER).await?;
    let incarnation = Incarnation(system_now_ms() ^ 0x5c4e_0000_0000_0000);
    let welcome = raw.say_hello(&id, incarnation, ANSWER).await?;
    let after = raw.finish_link(&id, incarnation, &welcome, ANSWER).await?;

    // Entry 1 breaks two rules and keeps one; entry 2 breaks nothing.
    let canary = "CANARY-SCHEMA-5e1f";
    let first = after.0 + 1;
    let entries = vec![
        Entry {
            seq: Seq(first),
            change: change(
                &id,
                "t1",
                &[
                    ("setpoint", json!(canary)),
                    ("mode", json!("eco")),
                    ("label", json!(1)),
                ],
            ),
        },
        Entry {
            seq: Seq(first + 1),
            change: change(&id, "t2", &[("setpoint", json!(20))]),
        },
    ];
    let batch = Message::Batch(Batch {
        first: Seq(first),
        last: Seq(first + 1),
        check: 0,
        entries,
    });
    raw.publish_msg(&up_topic(&id), batch).await?;

    // The batch is acknowledged (the rest applied), then the sender is told
    // what was refused: the record, the fields and their rules, no value.
    let mut acked = false;
    let mut told = None;
    while !(acked && told.is_some()) {
        match raw.next_non_time(ANSWER).await? {
            Message::Ack(a) => {
                assert_eq!(a.upto, Seq(first + 1));
                acked = true;
            }
            Message::Error(e) => {
                assert_eq!(e.code, ErrorCode::SchemaRefused, "{e:?}");
                told = Some(e.message);
            }
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
    let told = told.unwrap();
    assert!(told.starts_with("thermostat/t1: "), "{told}");
    assert!(
        told.contains("field \"setpoint\" must be a number, from 5 to 35"),
        "{told}"
    );
    assert!(told.contains("field \"label\" must be a string"), "{told}");
    assert!(!told.contains(canary), "{told}");

    // Never stored; the valid parts are.
    let op = fleet.hub.operator();
    let (status, t1) = op.get("/v1/agents/gw-raw/records/thermostat/t1").await?;
    assert_eq!(status, StatusCode::OK, "{t1}");
    assert_eq!(t1["fields"], json!({"mode": "eco"}));
    let (_, t2) = op.get("/v1/agents/gw-raw/records/thermostat/t2").await?;
    assert_eq!(t2["fields"], json!({"setpoint": 20}));
    // Counted (JSON and Prometheus), logged by name only.
    assert_eq!(hub_counter(&fleet, "schema_refused_fields").await?, 2);
    let text = http()
        .get(format!("{}/metrics", fleet.hub.api_url()))
        .bearer_auth(TOKEN)
        .send()
        .await?
        .text()
        .await?;
    assert!(
        text.contains("fieldsync_hub_schema_refused_fields_total 2"),
        "{text}"
    );
    let log = fleet.hub.stderr_log();
    assert!(log.contains("break the hub's schema"), "{log}");
    assert!(!log.contains(canary), "the value was logged:\n{log}");
    Ok(())
}

/// An agent whose rules differ from the hub's: it lets `setpoint` be
/// anything and `mode` only "eco".
const LOOSER_AND_STRICTER: &str = r#"
[collections.thermostat]
direction = "both"
sync = ["setpoint", "mode", "label"]
schema = { mode = ["eco"] }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_agent_and_hub_rules_differ_each_receiver_refuses_and_the_sender_is_told(
) -> anyhow::Result<()> {
    let fleet = Fleet::start_with_policy(POLICY)?;
    tokio::task::block_in_place(|| fleet.pki.issue("gw-diff"))?;
    let agent = tokio::task::block_in_place(|| {
        TempAgent::start_with(AgentSetup {
            link: Some(fleet.pki.link("gw-diff", &fleet.hub.mqtt_url())),
            id: Some("gw-diff".into()),
            policy: Some(LOOSER_AND_STRICTER.into()),
            ..AgentSetup::default()
        })
    })?;
    poll("the agent links", SYNC_TIMEOUT, || async {
        let s = agent_status(&agent).await?;
        Ok(if s["connected"] == true && s["resync_running"] == false {
            Ok(())
        } else {
            Err(s.to_string())
        })
    })
    .await?;
    let op = fleet.hub.operator();
    let hub_record = "/v1/agents/gw-diff/records/thermostat/t1";

    // Upstream: the agent accepts setpoint 99; the hub refuses that value,
    // applies the rest, acknowledges, and tells the agent.
    let (status, body) = agent_send(
        &agent,
        reqwest::Method::PUT,
        "/v1/records/thermostat/t1",
        &json!({"setpoint": 99, "mode": "eco"}),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    poll(
        "the agent is told and its outbox drains",
        SYNC_TIMEOUT,
        || async {
            let s = agent_status(&agent).await?;
            Ok(if s["schema_refused"] == 1 && s["outbox_pending"] == 0 {
                Ok(())
            } else {
                Err(s.to_string())
            })
        },
    )
    .await?;
    let (_, h) = op.get(hub_record).await?;
    assert_eq!(
        h["fields"],
        json!({"mode": "eco"}),
        "never stored on the hub"
    );
    assert_eq!(hub_counter(&fleet, "schema_refused_fields").await?, 1);
    assert!(agent
        .stderr_log()
        .contains("the hub refused field values that break its schema"));

    // Downstream: the hub accepts mode "away"; the agent refuses it, counts
    // it and tells the hub.
    let (status, body) = op
        .put(hub_record, &json!({"mode": "away", "label": "den"}))
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    poll(
        "the agent refuses the value and the hub hears of it",
        SYNC_TIMEOUT,
        || async {
            let s = agent_status(&agent).await?;
            let told = hub_counter(&fleet, "schema_refused_by_agents").await?;
            Ok(if s["schema_refused_down"] == 1 && told == 1 {
                Ok(())
            } else {
                Err(format!("agent {s}, hub told {told}"))
            })
        },
    )
    .await?;
    let (_, a) = agent_send(
        &agent,
        reqwest::Method::GET,
        "/v1/records/thermostat/t1",
        &Value::Null,
    )
    .await?;
    assert_eq!(
        a["fields"],
        json!({"setpoint": 99, "mode": "eco", "label": "den"})
    );
    let row = fleet.hub.agent_row("gw-diff").await?.unwrap();
    assert_eq!(
        row["queue_pending"], 0,
        "the refused write is acknowledged, not retried: {row}"
    );
    Ok(())
}
