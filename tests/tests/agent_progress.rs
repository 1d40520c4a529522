//! `GET /v1/progress` end to end, with a real agent linked to a real hub: a
//! long-poll that answers as soon as the hub has acknowledged an outbox entry
//! past the one given (after its durable commit), or a downstream entry past
//! the one given is applied; a wait that runs out answers `reached: false`
//! with the cursors as they are; a bad query is a 400.

use std::time::Duration;

use fieldsync_e2e::durability::{http, AgentApi, Fleet, Write};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn progress(base: &str, query: &str) -> anyhow::Result<(StatusCode, Value)> {
    let r = http()
        .get(format!("{base}/v1/progress?{query}"))
        .timeout(Duration::from_secs(30))
        .send()
        .await?;
    Ok((r.status(), r.json().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_answers_when_the_hub_acknowledges_or_a_downstream_write_lands(
) -> anyhow::Result<()> {
    let fleet = Fleet::start()?;
    let (agent, api) = fleet.linked_agent("gw-progress").await?;
    let base = agent.base_url().to_owned();

    // A write, then a long-poll for its acknowledgement.
    api.put(&Write::patient("p-1", 1)).await?;
    let (status, now) = progress(&base, "").await?;
    assert_eq!(status, StatusCode::OK, "{now}");
    let last = now["outbox_last_seq"].as_u64().unwrap();
    assert!(last >= 1, "{now}");
    let (_, got) = progress(&base, &format!("acked_after={}&wait_ms=20000", last - 1)).await?;
    assert_eq!(got["reached"], true, "{got}");
    assert!(got["outbox_acked_seq"].as_u64().unwrap() >= last, "{got}");
    // The hub holds it: the acknowledgement came after its commit.
    let on_hub = fleet
        .operator()
        .record("gw-progress", "patients", "p-1")
        .await?;
    assert!(on_hub.is_some(), "acknowledged but not on the hub");

    // Nothing more to acknowledge: the wait runs out, nothing reached.
    let acked = got["outbox_acked_seq"].as_u64().unwrap();
    let (status, idle) = progress(&base, &format!("acked_after={acked}&wait_ms=200")).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(idle["reached"], false, "{idle}");
    assert_eq!(idle["outbox_acked_seq"], acked, "{idle}");

    // A downstream write wakes a waiter on `applied_after`.
    let applied = idle["down_applied_seq"].as_u64().unwrap();
    let waiter = {
        let base = base.clone();
        tokio::spawn(async move {
            progress(&base, &format!("applied_after={applied}&wait_ms=20000")).await
        })
    };
    let (status, body) = fleet
        .hub
        .operator()
        .put(
            "/v1/agents/gw-progress/records/settings/s1",
            &json!({"mode": "eco"}),
        )
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (_, woke) = waiter.await??;
    assert_eq!(woke["reached"], true, "{woke}");
    assert!(
        woke["down_applied_seq"].as_u64().unwrap() > applied,
        "{woke}"
    );
    assert_eq!(
        AgentApi::of(&agent).record("settings", "s1").await?,
        Some(json!({"mode": "eco"})),
        "applied before the answer"
    );

    // Bad queries are refused.
    for bad in ["wait_ms=60001", "acked_after=-1", "wait_ms=x", "nope=1"] {
        let (status, body) = progress(&base, bad).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "invalid_query", "{bad}: {body}");
    }
    Ok(())
}
