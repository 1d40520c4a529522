//! The operator's batch route end to end: many downstream writes checked as a
//! whole (one bad write or one the policy refuses queues nothing), queued in
//! order in one transaction, and delivered to the agent.

use std::time::Duration;

use fieldsync_e2e::eventually;
use fieldsync_e2e::fleet::{Pki, TempHub, FLEET_POLICY, TOKEN};
use reqwest::StatusCode;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

async fn post(hub: &TempHub, agent: &str, body: &Value) -> (StatusCode, Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/agents/{agent}/batch", hub.api_url()))
        .bearer_auth(TOKEN)
        .json(body)
        .send()
        .await
        .unwrap();
    (r.status(), r.json().await.unwrap())
}

async fn queued(hub: &TempHub, agent: &str) -> u64 {
    hub.agent_row(agent)
        .await
        .unwrap()
        .map_or(0, |r| r["queue_pending"].as_u64().unwrap())
}

#[tokio::test]
async fn a_batch_is_checked_whole_queued_in_order_and_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(&dir.path().join("pki")).unwrap();
    let hub = TempHub::start(dir.path(), &pki, FLEET_POLICY).unwrap();
    pki.issue("gw-ops").unwrap();

    // Refused whole: a bad key in the middle, a field the policy keeps up-only,
    // an unknown key, an empty batch. Nothing is queued by any of them.
    let good =
        |i: usize| json!({"collection": "settings", "key": format!("s{i}"), "fields": {"mode": i}});
    let cases = [
        (
            json!({"writes": [good(0), {"collection": "settings", "key": "", "fields": {"mode": 1}}, good(2)]}),
            StatusCode::BAD_REQUEST,
            "invalid_name",
        ),
        (
            json!({"writes": [good(0), {"collection": "patients", "key": "p", "fields": {"ward": 1}}]}),
            StatusCode::FORBIDDEN,
            "policy_denied",
        ),
        (
            json!({"writes": [good(0), {"collection": "settings", "key": "k", "fields": {"pin": 1}}]}),
            StatusCode::FORBIDDEN,
            "policy_denied",
        ),
        (
            json!({"writes": [good(0)], "extra": 1}),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            json!({"writes": []}),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
    ];
    for (body, status, code) in cases {
        let (got, answer) = post(&hub, "gw-ops", &body).await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{answer}"
        );
    }
    assert_eq!(queued(&hub, "gw-ops").await, 0);

    // Accepted: 1,000 writes in one request, then 50 more to one key.
    let writes: Vec<Value> = (0..1000).map(good).collect();
    let (status, answer) = post(&hub, "gw-ops", &json!({ "writes": writes })).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(
        (answer["queued"].as_u64(), answer["last_seq"].as_u64()),
        (Some(1000), Some(1000))
    );
    let same_key: Vec<Value> = (0..50)
        .map(|i| json!({"collection": "settings", "key": "last", "fields": {"threshold": i}}))
        .collect();
    let (status, answer) = post(&hub, "gw-ops", &json!({ "writes": same_key })).await;
    assert_eq!(
        (status, answer["last_seq"].as_u64()),
        (StatusCode::ACCEPTED, Some(1050))
    );
    assert_eq!(queued(&hub, "gw-ops").await, 1050);

    // The agent comes online and gets everything, the last write to a key winning.
    let agent = hub.agent(&pki, "gw-ops", None).unwrap();
    eventually("the queue to drain", WAIT, || async {
        (queued(&hub, "gw-ops").await == 0).then_some(())
    })
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let get = |key: String| {
        let http = http.clone();
        let url = agent.url(&format!("/v1/records/settings/{key}"));
        async move {
            http.get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    for i in [0, 1, 499, 998, 999] {
        assert_eq!(get(format!("s{i}")).await["fields"], json!({"mode": i}));
    }
    assert_eq!(get("last".into()).await["fields"], json!({"threshold": 49}));
    let status: Value = http
        .get(agent.url("/v1/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["down_applied_seq"], 1050);
}

#[tokio::test]
async fn a_write_too_large_to_travel_is_refused_and_queues_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(&dir.path().join("pki")).unwrap();
    let hub = TempHub::start(dir.path(), &pki, FLEET_POLICY).unwrap();
    // Under the 1 MiB body limit, over what one message can carry.
    let big = "x".repeat(1_040_000);
    let (status, answer) = hub
        .put(
            "/v1/agents/gw-big/records/settings/s",
            &json!({ "mode": big }),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert_eq!(answer["error"]["code"], "change_too_large");
    let (status, _) = post(
        &hub,
        "gw-big",
        &json!({"writes": [{"collection": "settings", "key": "s", "fields": {"mode": big}}]}),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(queued(&hub, "gw-big").await, 0);
    // A large write that fits is accepted.
    let fits = "y".repeat(900_000);
    let (status, answer) = hub
        .put(
            "/v1/agents/gw-big/records/settings/s",
            &json!({ "mode": fits }),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
}
