//! Webhooks and the change feed end to end, with a real `fieldsync-hub run`,
//! a real agent over mTLS, real redb files, and a loopback receiver that
//! checks signatures with its own HMAC: `record.changed` arrives signed and
//! in order per key with permitted fields only; a hub SIGKILLed mid-delivery
//! loses no event (ids dedupe to exactly once); a receiver that was down gets
//! the backlog in order; replay re-sends with the same ids; 410 disables;
//! bad URLs are refused; the feed pages, long-polls and streams (SSE), and a
//! consumer resuming from its cursor across hub SIGKILLs sees every change
//! once, in commit order; agents' health reports show in `GET /v1/agents`,
//! and an agent whose backlog the hub does not apply (an injected fault)
//! turns `stalled` and fires `agent.stalled`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use fieldsync_e2e::durability::{poll, wait_status, AgentApi, Write, SYNC_TIMEOUT};
use fieldsync_e2e::fleet::{Pki, TempHub, FLEET_POLICY, TOKEN};
use fieldsync_e2e::webhook_receiver::{Delivery, Receiver};
use fieldsync_e2e::TempAgent;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Fast retries, so that a test sees several within seconds.
const FAST_RETRIES: &str = "[webhooks]\nretry_initial_ms = 100\nretry_max_ms = 400\nmax_attempts = 1000\ntimeout_ms = 2000\n";
/// A value that must never leave the agent (`ssn` is not in the policy).
const CANARY: &str = "CANARY-ssn-551-23-9876";

struct Setup {
    hub: TempHub,
    pki: Pki,
    _dir: tempfile::TempDir,
}

fn setup(extra: &str) -> anyhow::Result<Setup> {
    setup_env(extra, &[])
}

fn setup_env(extra: &str, env: &[(&str, &str)]) -> anyhow::Result<Setup> {
    let dir = tempfile::Builder::new()
        .prefix("fieldsync-webhooks-")
        .tempdir()?;
    let pki_dir = dir.path().join("pki");
    std::fs::create_dir(&pki_dir)?;
    let pki = Pki::create(&pki_dir)?;
    let hub = TempHub::start_configured(dir.path(), &pki, FLEET_POLICY, "", extra, env)?;
    Ok(Setup {
        hub,
        pki,
        _dir: dir,
    })
}

async fn linked(s: &Setup, id: &str) -> anyhow::Result<(TempAgent, AgentApi)> {
    let agent = s.hub.agent(&s.pki, id, None)?;
    let api = AgentApi::of(&agent);
    wait_status(&api, "the agent linked", |st| {
        st["connected"] == true && st["resync_running"] == false
    })
    .await?;
    Ok((agent, api))
}

/// Registers `receiver` for `body` (url added); returns the endpoint id.
async fn register(hub: &TempHub, receiver: &Receiver, mut body: Value) -> anyhow::Result<String> {
    body["url"] = json!(receiver.url());
    let (status, created) = hub.operator().post("/v1/webhooks", &body).await?;
    anyhow::ensure!(status == StatusCode::CREATED, "{status}: {created}");
    receiver.set_secret(created["secret"].as_str().unwrap_or_default())?;
    Ok(created["id"].as_str().unwrap_or_default().to_owned())
}

/// Waits until the receiver holds deliveries of `want` distinct event ids
/// that satisfy `keep`.
async fn wait_distinct(
    receiver: &Receiver,
    want: usize,
    keep: impl Fn(&Delivery) -> bool,
) -> anyhow::Result<Vec<Delivery>> {
    poll("webhook deliveries", SYNC_TIMEOUT, || async {
        let got: Vec<Delivery> = receiver
            .deliveries()
            .into_iter()
            .filter(|d| d.answered == 200 && keep(d))
            .collect();
        let ids: BTreeSet<&str> = got.iter().map(|d| d.id.as_str()).collect();
        Ok(if ids.len() >= want {
            Ok(got.clone())
        } else {
            Err(format!("{} of {want} distinct events", ids.len()))
        })
    })
    .await
}

fn is_change(d: &Delivery) -> bool {
    d.body["type"] == "record.changed"
}

/// The deliveries deduplicated by id, first arrival kept.
fn dedupe(got: &[Delivery]) -> Vec<Delivery> {
    let mut seen = BTreeSet::new();
    got.iter()
        .filter(|d| seen.insert(d.id.clone()))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_changes_arrive_signed_in_order_per_key_with_permitted_fields_only(
) -> anyhow::Result<()> {
    let s = setup(FAST_RETRIES)?;
    let receiver = Receiver::start().await?;
    register(
        &s.hub,
        &receiver,
        json!({"events": ["record.changed", "agent.connected"]}),
    )
    .await?;
    let (_agent, api) = linked(&s, "gw-hooks").await?;
    const KEYS: u64 = 4;
    const ROUNDS: u64 = 10;
    for round in 0..ROUNDS {
        for k in 0..KEYS {
            let fields = json!({"ward": round, "heart_rate": 60 + round, "ssn": CANARY});
            api.put(&Write::new("patients", format!("p{k}"), fields))
                .await?;
        }
    }
    // The last round's value of every key arrives.
    let got = poll("the last round", SYNC_TIMEOUT, || async {
        let got = receiver.deliveries();
        let last: BTreeSet<String> = got
            .iter()
            .filter(|d| is_change(d) && d.body["data"]["fields"]["ward"] == ROUNDS - 1)
            .map(|d| d.body["data"]["key"].as_str().unwrap_or("").to_owned())
            .collect();
        Ok(if last.len() == KEYS as usize {
            Ok(got)
        } else {
            Err(format!("{} keys at the last round", last.len()))
        })
    })
    .await?;
    let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for d in dedupe(&got) {
        assert!(d.signature_ok, "bad signature on {}", d.id);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        assert!(d.timestamp.abs_diff(now) < 300, "timestamp {}", d.timestamp);
        let text = d.body.to_string();
        assert!(
            !text.contains(CANARY),
            "a local-only value left the agent: {text}"
        );
        if is_change(&d) {
            let data = &d.body["data"];
            assert_eq!(data["agent"], "gw-hooks");
            assert_eq!(data["collection"], "patients");
            assert_eq!(data["origin"], "agent");
            assert!(data["cursor"].is_string());
            let key = data["key"].as_str().unwrap_or_default().to_owned();
            if let Some(w) = data["fields"]["ward"].as_u64() {
                per_key.entry(key).or_default().push(w);
            }
        }
    }
    for (key, wards) in &per_key {
        assert!(
            wards.windows(2).all(|w| w[0] < w[1]),
            "{key}: out of order {wards:?}"
        );
    }
    assert!(
        got.iter().any(|d| d.body["type"] == "agent.connected"),
        "no agent.connected event"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_killed_mid_delivery_loses_no_event() -> anyhow::Result<()> {
    let mut s = setup(FAST_RETRIES)?;
    let receiver = Receiver::start().await?;
    register(&s.hub, &receiver, json!({"events": ["record.changed"]})).await?;
    let (_agent, api) = linked(&s, "gw-kill").await?;
    const RECORDS: u64 = 150;
    const KILLS: u64 = 3;
    for n in 0..RECORDS {
        api.put(&Write::patient(format!("k{n}"), n)).await?;
        if n % (RECORDS / KILLS) == RECORDS / KILLS / 2 {
            // Mid-stream: some delivered, some committed and not yet.
            s.hub.kill();
            s.hub.restart()?;
        }
    }
    // Every write acknowledged by the agent reaches the hub; every change
    // the hub committed reaches the receiver at least once.
    let got = wait_distinct(&receiver, RECORDS as usize, is_change).await?;
    let keys: BTreeSet<String> = dedupe(&got)
        .iter()
        .map(|d| d.body["data"]["key"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        keys.len(),
        RECORDS as usize,
        "each key exactly once after dedupe"
    );
    let ids: Vec<&str> = got.iter().map(|d| d.id.as_str()).collect();
    let distinct: BTreeSet<&str> = ids.iter().copied().collect();
    eprintln!(
        "{} deliveries, {} distinct events ({} re-sent after kills)",
        ids.len(),
        distinct.len(),
        ids.len() - distinct.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_was_down_gets_the_backlog_in_order_and_replay_resends(
) -> anyhow::Result<()> {
    let s = setup(FAST_RETRIES)?;
    let mut receiver = Receiver::start().await?;
    let id = register(
        &s.hub,
        &receiver,
        json!({"events": ["record.changed"], "agents": "gw-*"}),
    )
    .await?;
    let (_agent, api) = linked(&s, "gw-down").await?;
    let started = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    receiver.down();
    const WRITES: u64 = 20;
    for n in 0..WRITES {
        api.put(&Write::new("patients", "one", json!({"ward": n})))
            .await?;
    }
    // Attempts fail while it is down, and are listed.
    let op = s.hub.operator();
    poll("failed attempts listed", SYNC_TIMEOUT, || async {
        let (_, body) = op.get(&format!("/v1/webhooks/{id}/deliveries")).await?;
        let failed = body["deliveries"].as_array().map_or(0, |a| {
            a.iter().filter(|d| d["outcome"] == "retrying").count()
        });
        Ok(if failed >= 2 {
            Ok(())
        } else {
            Err(body.to_string())
        })
    })
    .await?;
    receiver.up().await?;
    let got = poll("the whole backlog", SYNC_TIMEOUT, || async {
        let got = dedupe(&receiver.deliveries());
        Ok(
            if got
                .last()
                .is_some_and(|d| d.body["data"]["fields"]["ward"] == WRITES - 1)
            {
                Ok(got)
            } else {
                Err(format!("{} events", got.len()))
            },
        )
    })
    .await?;
    let wards: Vec<u64> = got
        .iter()
        .filter_map(|d| d.body["data"]["fields"]["ward"].as_u64())
        .collect();
    assert!(
        wards.windows(2).all(|w| w[0] < w[1]),
        "out of order: {wards:?}"
    );
    let first_ids: Vec<String> = got.iter().map(|d| d.id.clone()).collect();

    // Replay from before the writes: the same events again, same ids, in order.
    let before = receiver.deliveries().len();
    let (status, body) = op
        .post(
            &format!("/v1/webhooks/{id}/replay"),
            &json!({"since": started}),
        )
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let again = poll("the replay", SYNC_TIMEOUT, || async {
        let again: Vec<Delivery> = receiver.deliveries().split_off(before);
        Ok(if again.len() >= first_ids.len() {
            Ok(again)
        } else {
            Err(format!("{} re-sent", again.len()))
        })
    })
    .await?;
    let again_ids: Vec<String> = again
        .iter()
        .map(|d| d.id.clone())
        .take(first_ids.len())
        .collect();
    assert_eq!(again_ids, first_ids);

    // 410 disables the endpoint: later events are not sent.
    receiver.answer(410);
    api.put(&Write::new("patients", "one", json!({"ward": 100})))
        .await?;
    poll("the endpoint disabled", SYNC_TIMEOUT, || async {
        let (_, e) = op.get(&format!("/v1/webhooks/{id}")).await?;
        Ok(if e["enabled"] == false {
            Ok(())
        } else {
            Err(e.to_string())
        })
    })
    .await?;
    let after_410 = receiver.deliveries().len();
    api.put(&Write::new("patients", "one", json!({"ward": 101})))
        .await?;
    // The write reaches the hub (a later change is committed there) ...
    poll("the write at the hub", SYNC_TIMEOUT, || async {
        let r = s.hub.record("gw-down", "patients", "one").await?;
        Ok(match r {
            Some(f) if f["ward"] == 101 => Ok(()),
            other => Err(format!("{other:?}")),
        })
    })
    .await?;
    let (_, m) = op.get("/v1/metrics").await?;
    assert_eq!(m["webhook_endpoints_disabled"], 1, "{m}");
    // ... and the disabled endpoint got nothing more.
    assert_eq!(receiver.deliveries().len(), after_410);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_webhook_requests_are_refused_and_change_nothing() -> anyhow::Result<()> {
    let s = setup("")?;
    let op = s.hub.operator();
    for (body, code) in [
        (json!({"url": "http://example.com/hook"}), "invalid_url"),
        (
            json!({"url": "https://169.254.169.254/latest/meta-data"}),
            "invalid_url",
        ),
        (json!({"url": "https://[fe80::1]/x"}), "invalid_url"),
        (json!({"url": "file:///etc/passwd"}), "invalid_url"),
        (
            json!({"url": "https://example.com/", "events": ["nope"]}),
            "invalid_event_type",
        ),
        (
            json!({"url": "https://example.com/", "surprise": 1}),
            "invalid_json",
        ),
    ] {
        let (status, answer) = op.post("/v1/webhooks", &body).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{body}: {answer}");
    }
    let (_, list) = op.get("/v1/webhooks").await?;
    assert_eq!(list["webhooks"], json!([]));
    assert_eq!(
        op.delete("/v1/webhooks/wh_nope").await?,
        StatusCode::NOT_FOUND
    );
    // Without the token: 401.
    let r = reqwest::Client::new()
        .get(format!("{}/v1/changes", s.hub.api_url()))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    for (query, status) in [
        ("since=garbage", StatusCode::BAD_REQUEST),
        ("since=999999-1", StatusCode::CONFLICT),
        ("limit=0", StatusCode::BAD_REQUEST),
        ("wait=forever", StatusCode::BAD_REQUEST),
    ] {
        let (got, body) = op.get(&format!("/v1/changes?{query}")).await?;
        assert_eq!(got, status, "{query}: {body}");
    }
    Ok(())
}

/// Reads the feed from `since` until `next` stops moving; returns the
/// changes and the last cursor.
async fn drain_feed(
    hub: &TempHub,
    since: &str,
    limit: usize,
) -> anyhow::Result<(Vec<Value>, String)> {
    let mut cursor = since.to_owned();
    let mut all = Vec::new();
    loop {
        let (status, page) = hub
            .get(&format!("/v1/changes?since={cursor}&limit={limit}"))
            .await?;
        anyhow::ensure!(status == StatusCode::OK, "{status}: {page}");
        let changes = page["changes"].as_array().cloned().unwrap_or_default();
        let next = page["next"].as_str().unwrap_or_default().to_owned();
        let done = changes.is_empty();
        all.extend(changes);
        cursor = next;
        if done {
            return Ok((all, cursor));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_consumer_resuming_across_hub_kills_sees_every_change_once_in_order(
) -> anyhow::Result<()> {
    let mut s = setup("")?;
    let (_agent, api) = linked(&s, "gw-feed").await?;
    let mut seen: Vec<Value> = Vec::new();
    let mut cursor = "0".to_owned();
    const ROUNDS: u64 = 4;
    const PER_ROUND: u64 = 25;
    for round in 0..ROUNDS {
        for n in 0..PER_ROUND {
            let key = format!("f{}", round * PER_ROUND + n);
            api.put(&Write::new("patients", key, json!({"ward": round})))
                .await?;
        }
        // Read part of what is there, then SIGKILL the hub and resume.
        let (page, next) = drain_feed(&s.hub, &cursor, 7).await?;
        seen.extend(page);
        cursor = next;
        s.hub.kill();
        s.hub.restart()?;
    }
    let total = (ROUNDS * PER_ROUND) as usize;
    let all = poll("every change in the feed", SYNC_TIMEOUT, || async {
        let (page, next) = drain_feed(&s.hub, &cursor, 50).await?;
        let mut all = seen.clone();
        all.extend(page);
        Ok(if all.len() >= total {
            Ok((all, next))
        } else {
            Err(format!("{} of {total}", all.len()))
        })
    })
    .await?;
    let (all, last) = all;
    let keys: Vec<&str> = all
        .iter()
        .map(|c| c["data"]["key"].as_str().unwrap_or(""))
        .collect();
    let distinct: BTreeSet<&str> = keys.iter().copied().collect();
    assert_eq!(keys.len(), total, "duplicates in the feed: {keys:?}");
    assert_eq!(distinct.len(), total);
    let seqs: Vec<u64> = all
        .iter()
        .map(|c| {
            c["data"]["cursor"]
                .as_str()
                .and_then(|t| t.split('-').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        })
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "not in commit order: {seqs:?}"
    );

    // Long-poll: a request waiting at the head returns with the next change.
    let op = s.hub.operator();
    let waiting = tokio::spawn({
        let op = op.clone();
        let last = last.clone();
        async move { op.get(&format!("/v1/changes?since={last}&wait=30s")).await }
    });
    api.put(&Write::new("patients", "late", json!({"ward": 1})))
        .await?;
    let (status, page) = tokio::time::timeout(SYNC_TIMEOUT, waiting).await???;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["changes"][0]["data"]["key"], "late", "{page}");

    // SSE from the start: the first events are the first changes, ids are cursors.
    let response = reqwest::Client::new()
        .get(format!("{}/v1/changes?since=0", s.hub.api_url()))
        .bearer_auth(TOKEN)
        .header("accept", "text/event-stream")
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    let mut response = response;
    let mut text = String::new();
    let first_key = all[0]["data"]["key"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    tokio::time::timeout(Duration::from_secs(30), async {
        while text.matches("\n\n").count() < 3 {
            match response.chunk().await? {
                Some(c) => text.push_str(&String::from_utf8_lossy(&c)),
                None => break,
            }
        }
        anyhow::Ok(())
    })
    .await??;
    let first = text.split("\n\n").next().unwrap_or_default();
    assert!(first.contains("event: record.changed"), "{text}");
    assert!(
        first.contains(&format!("\"key\":\"{first_key}\"")),
        "{first}"
    );
    let id_line = first
        .lines()
        .find(|l| l.starts_with("id:"))
        .unwrap_or_default();
    assert_eq!(
        id_line.trim_start_matches("id:").trim(),
        all[0]["data"]["cursor"].as_str().unwrap_or_default()
    );
    Ok(())
}

/// Polls the hub's row for `agent` until `want` holds.
async fn wait_agent_row(
    hub: &TempHub,
    agent: &str,
    what: &str,
    want: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    poll(what, SYNC_TIMEOUT, || async {
        Ok(match hub.agent_row(agent).await? {
            Some(row) if want(&row) => Ok(row),
            other => Err(format!("{other:?}")),
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_syncing_agent_reports_its_health_and_goes_idle() -> anyhow::Result<()> {
    let s = setup("")?;
    let (_agent, api) = linked(&s, "gw-health").await?;
    for n in 0..5 {
        api.put(&Write::patient(format!("h{n}"), n)).await?;
    }
    wait_agent_row(&s.hub, "gw-health", "the writes applied", |r| {
        r["changes_applied"] == 5
    })
    .await?;
    let applied = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    // A report made after the writes were applied (one every 10 s); RFC 3339
    // in UTC with milliseconds sorts as text.
    let row = wait_agent_row(
        &s.hub,
        "gw-health",
        "an idle report after the writes",
        |r| {
            r["state"] == "idle"
                && r["health_reported"]
                    .as_str()
                    .is_some_and(|t| t > applied.as_str())
        },
    )
    .await?;
    assert!(row["drain_per_s"].as_f64().is_some(), "{row}");
    assert_eq!(row["outbox_pending"], 0, "{row}");
    assert!(row["health_reported"].is_string(), "{row}");
    assert!(row["agent_clock_offset_ms"].is_i64(), "{row}");
    assert!(row["outbox_bytes"].is_u64(), "{row}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_backlog_is_not_applied_turns_stalled_and_fires_the_event(
) -> anyhow::Result<()> {
    let s = setup_env(
        &format!("{FAST_RETRIES}\n[health]\nstall_after_ms = 2000\n"),
        &[("FIELDSYNC_TEST_DROP_UPSTREAM", "1")],
    )?;
    let receiver = Receiver::start().await?;
    register(&s.hub, &receiver, json!({"events": ["agent.stalled"]})).await?;
    let (_agent, api) = linked(&s, "gw-stall").await?;
    for n in 0..3 {
        api.put(&Write::patient(format!("s{n}"), n)).await?;
    }
    // The hub drops every batch: the outbox keeps its entries, nothing is
    // applied, and the next report shows the backlog.
    let row = wait_agent_row(&s.hub, "gw-stall", "state stalled", |r| {
        r["state"] == "stalled"
    })
    .await?;
    assert_eq!(row["connected"], true, "{row}");
    assert_eq!(row["outbox_pending"], 3, "{row}");
    let got = wait_distinct(&receiver, 1, |d| d.body["type"] == "agent.stalled").await?;
    assert_eq!(got[0].body["data"]["agent"], "gw-stall");
    assert_eq!(got[0].body["data"]["outbox_pending"], 3);
    assert!(got[0].signature_ok);
    let (_, m) = s.hub.get("/v1/metrics").await?;
    assert_eq!(m["agents_stalled"], 1, "{m}");
    assert_eq!(m["agent_stalls"], 1, "{m}");
    assert_eq!(m["upstream_changes_applied"], 0, "{m}");
    // Announced once per stall.
    assert_eq!(
        receiver
            .deliveries()
            .iter()
            .filter(|d| d.body["type"] == "agent.stalled")
            .count(),
        1
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_the_hub_refuses_fire_policy_denied_with_names_only() -> anyhow::Result<()> {
    let s = setup(FAST_RETRIES)?;
    let receiver = Receiver::start().await?;
    register(&s.hub, &receiver, json!({"events": ["policy.denied"]})).await?;
    // The agent's policy lets `notes` go up; the hub's does not.
    let wider = FLEET_POLICY.replace(
        r#"sync = ["initials", "ward", "heart_rate"]"#,
        r#"sync = ["initials", "ward", "heart_rate", "notes"]"#,
    );
    anyhow::ensure!(wider != FLEET_POLICY, "the policy text changed");
    s.pki.issue("gw-wide")?;
    let agent = TempAgent::start_with(fieldsync_e2e::AgentSetup {
        link: Some(s.pki.link("gw-wide", &s.hub.mqtt_url())),
        id: Some("gw-wide".into()),
        policy: Some(wider),
        ..fieldsync_e2e::AgentSetup::default()
    })?;
    let api = AgentApi::of(&agent);
    wait_status(&api, "the agent linked", |st| {
        st["connected"] == true && st["resync_running"] == false
    })
    .await?;
    for n in 0..20 {
        api.put(&Write::new(
            "patients",
            format!("d{n}"),
            json!({"ward": n, "notes": CANARY}),
        ))
        .await?;
    }
    let got = wait_distinct(&receiver, 1, |d| d.body["type"] == "policy.denied").await?;
    let data = &got[0].body["data"];
    assert_eq!(data["agent"], "gw-wide");
    assert_eq!(data["collection"], "patients");
    assert_eq!(data["fields"], json!(["notes"]));
    assert!(got.iter().all(|d| !d.body.to_string().contains(CANARY)));
    // The permitted part was applied; the refused field never stored.
    let record = s.hub.record("gw-wide", "patients", "d0").await?;
    assert_eq!(record, Some(json!({"ward": 0})));
    Ok(())
}
