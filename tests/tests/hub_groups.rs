//! Fleet groups end to end, with a real hub and real agents: an admin labels
//! agents (`PUT /v1/agents/{agent}/labels`), `GET /v1/agents?selector=` lists a
//! group, and `POST /v1/broadcast` queues writes to every agent the selector
//! matches — delivered to a connected one, queued durably for an offline one
//! (through a hub SIGKILL) and delivered when it comes back; an agent outside
//! the group gets nothing, and one labelled into the group later does not get
//! the earlier broadcast. Bad labels and selectors are refused and change
//! nothing; labels survive a hub restart.

use fieldsync_e2e::durability::{poll, wait_row, AgentApi, Fleet, SYNC_TIMEOUT};
use fieldsync_e2e::fleet;
use reqwest::StatusCode;
use serde_json::{json, Value};

const B1: &str = "gw-grp-berlin-1";
const B2: &str = "gw-grp-berlin-2";
const P1: &str = "gw-grp-paris-1";

async fn labels(
    op: &fleet::Operator,
    agent: &str,
    labels: Value,
) -> anyhow::Result<(StatusCode, Value)> {
    op.put(&format!("/v1/agents/{agent}/labels"), &labels).await
}

async fn ids(op: &fleet::Operator, selector: &str) -> anyhow::Result<Vec<String>> {
    let (status, body) = op
        .get(&format!("/v1/agents?selector={}", urlencode(selector)))
        .await?;
    anyhow::ensure!(status == StatusCode::OK, "{status}: {body}");
    Ok(body["agents"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn wait_mode(api: &AgentApi, key: &str, want: Value) -> anyhow::Result<()> {
    poll(
        &format!("settings/{key} mode = {want}"),
        SYNC_TIMEOUT,
        || async {
            let found = api.record("settings", key).await?;
            Ok(match found {
                Some(fields) if fields["mode"] == want => Ok(()),
                other => Err(format!("{other:?}")),
            })
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_reaches_the_group_as_it_is_now_and_survives_a_hub_kill() -> anyhow::Result<()>
{
    let mut fleet = Fleet::start()?;
    let (_b1, b1) = fleet.linked_agent(B1).await?;
    let (mut b2_agent, _) = fleet.linked_agent(B2).await?;
    let (_p1, p1) = fleet.linked_agent(P1).await?;
    let op = fleet.hub.operator();

    for (agent, site) in [(B1, "berlin"), (B2, "berlin"), (P1, "paris")] {
        let (status, body) = labels(&op, agent, json!({"site": site, "model": "gw3"})).await?;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["labels"], json!({"site": site, "model": "gw3"}));
    }
    assert_eq!(ids(&op, "site=berlin").await?, [B1, B2]);
    assert_eq!(ids(&op, "model=gw3,site!=berlin").await?, [P1]);
    let row = fleet.operator().known_row(B1).await?;
    assert_eq!(row["labels"], json!({"site": "berlin", "model": "gw3"}));
    assert!(
        row["serial"].as_str().is_some_and(|s| !s.is_empty()),
        "{row}"
    );
    assert!(row["not_after"].as_str().is_some(), "{row}");

    // Bad input is refused and changes nothing.
    let (status, body) = labels(&op, B1, json!({"site": "two words"})).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "invalid_labels");
    let (status, body) = labels(&op, B1, json!({"site": 7})).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = labels(&op, "gw-never-seen", json!({"site": "berlin"})).await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["code"], "unknown_agent");
    assert_eq!(ids(&op, "site=berlin").await?, [B1, B2], "labels unchanged");
    let (status, body) = op.get("/v1/agents?selector=site%3D%3D%3D").await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "invalid_selector");
    let bad_selector = json!({"selector": "", "writes": [{"collection": "settings", "key": "s", "fields": {"mode": "x"}}]});
    let (status, body) = op.post("/v1/broadcast", &bad_selector).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let denied = json!({"selector": "site=berlin", "writes": [{"collection": "patients", "key": "p", "fields": {"ward": 1}}]});
    let (status, body) = op.post("/v1/broadcast", &denied).await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    for agent in [B1, B2, P1] {
        let row = fleet.operator().known_row(agent).await?;
        assert_eq!(
            row["queue_pending"], 0,
            "nothing queued by refused broadcasts: {row}"
        );
    }

    // One berlin agent is offline when the broadcast goes out.
    b2_agent.kill();
    wait_row(&fleet.operator(), B2, "b2 offline", |r| {
        r["connected"] == false
    })
    .await?;
    let broadcast = json!({
        "selector": "site=berlin",
        "writes": [
            {"collection": "settings", "key": "night", "fields": {"mode": "eco", "threshold": 18}},
            {"collection": "settings", "key": "day", "fields": {"mode": "comfort"}},
        ],
    });
    let (status, body) = op.post("/v1/broadcast", &broadcast).await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["agents"], 2, "{body}");
    assert_eq!(body["queued_agents"], 2, "{body}");
    assert_eq!(body["queued"], 4, "{body}");
    assert_eq!(body["refused"], json!([]));
    wait_mode(&b1, "night", json!("eco")).await?;
    wait_mode(&b1, "day", json!("comfort")).await?;
    let b2_row = fleet.operator().known_row(B2).await?;
    assert_eq!(
        b2_row["queue_pending"], 2,
        "queued for the offline agent: {b2_row}"
    );

    // Labelled into the group after the broadcast: it does not get it.
    let (status, _) = labels(&op, P1, json!({"site": "berlin"})).await?;
    assert_eq!(status, StatusCode::OK);

    // The hub dies and comes back: the queue and the labels are durable.
    fleet.hub.kill();
    fleet.hub.restart()?;
    let op = fleet.hub.operator();
    assert_eq!(ids(&op, "site=berlin").await?, [B1, B2, P1]);
    b2_agent.restart()?;
    let b2 = AgentApi::of(&b2_agent);
    wait_mode(&b2, "night", json!("eco")).await?;
    wait_mode(&b2, "day", json!("comfort")).await?;
    wait_row(&fleet.operator(), B2, "b2's queue drained", |r| {
        r["queue_pending"] == 0
    })
    .await?;

    // P1 was never sent the earlier broadcast.
    let p1_row = wait_row(&fleet.operator(), P1, "p1 linked again", |r| {
        r["connected"] == true
    })
    .await?;
    assert_eq!(p1_row["queue_pending"], 0, "{p1_row}");
    assert_eq!(p1.record("settings", "night").await?, None);
    assert_eq!(
        fleet.operator().record(P1, "settings", "night").await?,
        None,
        "nothing was queued to it"
    );
    Ok(())
}
