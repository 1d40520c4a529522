//! Protocol v2 end to end, with a real `fieldsync-hub run`, real agents, real
//! TLS and real redb files: each test is one failure of protocol v1 that v2
//! must repair, checked from the outside (the agent's local API, the hub's
//! operator API) — a wiped agent store, a hub restored from an older copy of
//! its data, a device clock 300 days ahead, a cloned certificate, and a large
//! backlog drained after an outage without a stall.
//!
//! Set `FIELDSYNC_HEAVY=1` to run the backlog test at full size (4,000 records
//! of 100 KiB, 400 MiB) instead of the default 400 records.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fieldsync_e2e::durability::{
    log_problems, mismatches, poll, summary, wait_row, wait_status, AgentApi, Fleet, Replica,
    Write, SYNC_TIMEOUT,
};
use fieldsync_e2e::fleet::FLEET_POLICY;
use fieldsync_e2e::{closed_port, AgentSetup, TempAgent};
use fieldsync_shared::hlc::system_now_ms;
use fieldsync_shared::{CollectionName, FieldName, RecordKey};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::task::block_in_place;

/// 300 days in milliseconds: how far ahead the skewed device clock runs.
const SKEW_MS: i64 = 300 * 86_400_000;
/// How far a measured clock offset may be from the true one (a loaded
/// machine, half a round trip of measurement error).
const CLOCK_TOLERANCE_MS: i64 = 5_000;

fn u64_of(v: &Value, name: &str) -> u64 {
    v[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {name} in {v}"))
}

fn i64_of(v: &Value, name: &str) -> i64 {
    v[name]
        .as_i64()
        .unwrap_or_else(|| panic!("no number {name} in {v}"))
}

fn str_of(v: &Value, name: &str) -> String {
    v[name]
        .as_str()
        .unwrap_or_else(|| panic!("no string {name} in {v}"))
        .to_owned()
}

/// Linked, and the agent is not sending a resync.
fn linked(s: &Value) -> bool {
    s["connected"] == true && s["resync_running"] == false
}

/// `writes` as the list [`mismatches`] takes (each record holds exactly its
/// write's fields).
fn expecting<'a>(
    writes: impl IntoIterator<Item = &'a Write>,
) -> Vec<(String, String, Option<Value>)> {
    writes
        .into_iter()
        .map(|w| (w.collection.clone(), w.key.clone(), Some(w.fields.clone())))
        .collect()
}

/// Polls until `replica` holds every record of `expected` as given.
async fn wait_records(
    replica: &Replica,
    what: &str,
    expected: Vec<(String, String, Option<Value>)>,
) {
    poll(what, SYNC_TIMEOUT, || async {
        let bad = mismatches(replica, expected.clone()).await;
        Ok(if bad.is_empty() {
            Ok(())
        } else {
            Err(summary(&bad))
        })
    })
    .await
    .unwrap();
}

/// Starts agent `id` (certificate issued if needed) with the fleet policy,
/// linked to `url`, with `env` added to its environment.
fn agent_with(fleet: &Fleet, id: &str, url: &str, env: &[(&str, String)]) -> TempAgent {
    if !fleet.pki.cert(id).is_file() {
        fleet.pki.issue(id).unwrap();
    }
    TempAgent::start_with(AgentSetup {
        link: Some(fleet.pki.link(id, url)),
        id: Some(id.to_owned()),
        policy: Some(FLEET_POLICY.to_owned()),
        env: env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
        ..AgentSetup::default()
    })
    .unwrap()
}

/// `GET /v1/metrics` of the hub as it runs now.
async fn metrics(fleet: &Fleet) -> Value {
    let (status, body) = fleet.hub.get("/v1/metrics").await.unwrap();
    assert_eq!(status, StatusCode::OK, "GET /v1/metrics: {body}");
    body
}

/// Neither the hub's nor the agent's log reports a broken invariant.
fn assert_clean_logs(fleet: &Fleet, agent: &TempAgent) {
    let hub = fleet.hub.stderr_log();
    let problems = log_problems(&hub);
    assert!(problems.is_empty(), "hub log:\n{}", problems.join("\n"));
    let log = agent.stderr_log();
    let problems = log_problems(&log);
    assert!(
        problems.is_empty(),
        "agent {} log:\n{}",
        agent.id(),
        problems.join("\n")
    );
}

/// Must-show 1: an agent whose data_dir was deleted (certificate kept) comes
/// back with a new, empty store. v1 kept the hub's upstream watermark from
/// the old store, so the first writes of the new outbox looked applied and
/// were trimmed unseen; v2 names the new incarnation, resyncs both ways, and
/// every write made after the wipe reaches the hub, while the hub's
/// `settings` and `orders` come back to the new store.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wiped_agent_store_resyncs_and_every_write_after_the_wipe_reaches_the_hub() {
    let started = Instant::now();
    let mut fleet = Fleet::start().unwrap();
    let id = "v2-wiped";
    let (mut agent, api) = fleet.linked_agent(id).await.unwrap();
    let op = fleet.operator();

    // Before the wipe: 20 upstream entries (the hub's watermark), and
    // operator records in both downstream collections.
    let before_wipe: Vec<Write> = (0..20)
        .map(|n| Write::patient(format!("pre{n}"), n))
        .collect();
    api.batch(&before_wipe, true).await.unwrap();
    let from_hub: Vec<Write> = (0..3)
        .flat_map(|n| {
            [
                Write::new(
                    "settings",
                    format!("s{n}"),
                    json!({"mode": format!("op-{n}"), "threshold": n}),
                ),
                Write::new("orders", format!("o{n}"), json!({ "dose": 10 + n })),
            ]
        })
        .collect();
    for w in &from_hub {
        op.put_accepted(id, w).await.unwrap();
    }
    wait_status(&api, "the agent's writes acknowledged", |s| {
        linked(s) && s["outbox_pending"] == 0 && s["outbox_last_seq"] == 20
    })
    .await
    .unwrap();
    wait_row(&op, id, "the operator's writes acknowledged", |r| {
        r["queue_pending"] == 0
    })
    .await
    .unwrap();
    let hub = Replica::Hub(op.clone(), id.to_owned());
    wait_records(
        &hub,
        "the agent's writes at the hub",
        expecting(&before_wipe),
    )
    .await;
    wait_records(
        &Replica::Agent(api.clone()),
        "the operator's writes at the agent",
        expecting(&from_hub),
    )
    .await;
    let old = api.status().await.unwrap();
    let old_incarnation = str_of(&old, "incarnation");
    let row = op.known_row(id).await.unwrap();
    assert_eq!(row["incarnation"], old_incarnation.as_str(), "{row}");
    assert_eq!(u64_of(&row, "up_applied"), 20, "{row}");
    let row_resyncs = u64_of(&row, "resyncs");

    // The device is re-imaged while offline: the agent stops, its data_dir is
    // deleted, and it starts again with the same config and certificate. The
    // hub is down meanwhile, so the first writes are made before the new
    // store ever links.
    block_in_place(|| {
        agent.kill();
        fleet.hub.kill();
    });
    std::fs::remove_dir_all(agent.data_dir()).unwrap();
    block_in_place(|| agent.restart()).unwrap();
    let api = AgentApi::of(&agent);
    let after_wipe: Vec<Write> = (0..30)
        .map(|n| Write::patient(format!("post{n}"), 100 + n))
        .collect();
    // More than the old watermark before the link: v1 took entries 1..=20
    // of the new outbox for the old store's and trimmed them unseen.
    api.batch(&after_wipe[..12], true).await.unwrap();
    for w in &after_wipe[12..22] {
        api.put(w).await.unwrap();
    }
    let status = api.status().await.unwrap();
    assert_eq!(status["connected"], false, "{status}");
    assert_eq!(u64_of(&status, "outbox_last_seq"), 22, "{status}");
    let new_incarnation = str_of(&status, "incarnation");
    assert_ne!(
        new_incarnation, old_incarnation,
        "a wiped store has a new incarnation"
    );
    for w in &from_hub {
        assert_eq!(
            api.record(&w.collection, &w.key).await.unwrap(),
            None,
            "the wiped store holds nothing yet"
        );
    }

    block_in_place(|| fleet.hub.restart()).unwrap();
    let op = fleet.operator();
    wait_status(&api, "the new store linked", linked)
        .await
        .unwrap();
    // After the link: single writes and a batch.
    for w in &after_wipe[22..27] {
        api.put(w).await.unwrap();
    }
    api.batch(&after_wipe[27..], true).await.unwrap();

    let status = wait_status(&api, "the outbox to drain", |s| {
        linked(s) && s["outbox_pending"] == 0
    })
    .await
    .unwrap();
    assert_eq!(u64_of(&status, "outbox_last_seq"), 30, "{status}");
    assert_eq!(u64_of(&status, "outbox_acked_seq"), 30, "{status}");
    let hub = Replica::Hub(op.clone(), id.to_owned());
    let bad = mismatches(&hub, expecting(&after_wipe)).await;
    assert!(
        bad.is_empty(),
        "writes accepted after the wipe missing at the hub: {}",
        summary(&bad)
    );
    let bad = mismatches(&hub, expecting(&before_wipe)).await;
    assert!(
        bad.is_empty(),
        "older records at the hub: {}",
        summary(&bad)
    );
    wait_records(
        &Replica::Agent(api.clone()),
        "the hub's settings and orders back in the new store",
        expecting(&from_hub),
    )
    .await;

    // Reporting: the agent shows its new incarnation and the resyncs, the hub
    // row the new incarnation and the upstream watermark of the new stream.
    let status = wait_status(&api, "the resyncs reported", |s| {
        linked(s) && s["resyncs"].as_u64() >= Some(1) && s["resyncs_received"].as_u64() >= Some(1)
    })
    .await
    .unwrap();
    assert_eq!(status["incarnation"], new_incarnation.as_str(), "{status}");
    assert_eq!(
        status["hub_incarnation"], old["hub_incarnation"],
        "{status}"
    );
    assert_eq!(status["identity_conflict"], false, "{status}");
    let row = wait_row(&op, id, "the hub row to follow the new store", |r| {
        r["incarnation"] == new_incarnation.as_str()
            && r["up_applied"] == 30
            && r["queue_pending"] == 0
    })
    .await
    .unwrap();
    assert!(u64_of(&row, "resyncs") > row_resyncs, "{row}");
    assert_eq!(u64_of(&row, "identity_conflicts"), 0, "{row}");
    assert_clean_logs(&fleet, &agent);
    eprintln!(
        "wiped agent: incarnation {old_incarnation} -> {new_incarnation}, 30 writes after the \
         wipe all at the hub, status resyncs {}, row resyncs {row_resyncs} -> {}; {:.1?}",
        status["resyncs"],
        row["resyncs"],
        started.elapsed()
    );
}

/// Must-show 2: the hub's data_dir is restored from an older copy. v1 kept
/// the agent's downstream watermark from the lost history, so new operator
/// writes under reused sequence numbers were dropped, and the agent's writes
/// the copy lacked never came back. v2 resyncs both ways: the agent's lost
/// writes are at the hub again, every operator write after the restore
/// reaches the agent, and both sides agree on the two-way `settings`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hub_restored_from_an_older_copy_resyncs_both_ways() {
    let started = Instant::now();
    let mut fleet = Fleet::start().unwrap();
    let id = "v2-restored";
    let (agent, api) = fleet.linked_agent(id).await.unwrap();

    // Syncs some writes each way, then waits until both sides hold them.
    async fn sync_round(
        fleet: &Fleet,
        api: &AgentApi,
        id: &str,
        up: &[Write],
        down: &[Write],
    ) -> Value {
        let op = fleet.operator();
        api.batch(up, true).await.unwrap();
        for w in down {
            op.put_accepted(id, w).await.unwrap();
        }
        wait_status(api, "the agent's writes acknowledged", |s| {
            linked(s) && s["outbox_pending"] == 0
        })
        .await
        .unwrap();
        wait_row(&op, id, "the operator's writes acknowledged", |r| {
            r["queue_pending"] == 0
        })
        .await
        .unwrap();
        let hub = Replica::Hub(op.clone(), id.to_owned());
        wait_records(&hub, "the agent's writes at the hub", expecting(up)).await;
        let at_agent = Replica::Agent(api.clone());
        wait_records(
            &at_agent,
            "the operator's writes at the agent",
            expecting(down),
        )
        .await;
        api.status().await.unwrap()
    }

    let mut up_a: Vec<Write> = (0..10)
        .map(|n| Write::patient(format!("a{n}"), n))
        .collect();
    up_a.push(Write::new("settings", "ag-a", json!({"mode": "agent-a"})));
    let down_a: Vec<Write> = vec![
        Write::new("settings", "sa0", json!({"mode": "op-a0"})),
        Write::new("settings", "sa1", json!({"mode": "op-a1", "threshold": 1})),
        Write::new("settings", "sa2", json!({"threshold": 2})),
        Write::new("orders", "oa0", json!({"dose": 1})),
    ];
    sync_round(&fleet, &api, id, &up_a, &down_a).await;

    // The copy: taken while the hub is stopped.
    block_in_place(|| fleet.hub.kill());
    let data_dir = fleet.hub.data_file().parent().unwrap().to_owned();
    let files: Vec<String> = std::fs::read_dir(&data_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files, ["hub.redb"], "the hub's data dir holds one file");
    let saved = data_dir.parent().unwrap().join("hub.redb.older-copy");
    std::fs::copy(fleet.hub.data_file(), &saved).unwrap();
    block_in_place(|| fleet.hub.restart()).unwrap();
    wait_status(&api, "the agent linked again", linked)
        .await
        .unwrap();

    // History the copy will not have: 21 agent writes, 5 operator writes.
    let mut up_b: Vec<Write> = (0..20)
        .map(|n| Write::patient(format!("b{n}"), 50 + n))
        .collect();
    up_b.push(Write::new("settings", "ag-b", json!({"mode": "agent-b"})));
    let down_b: Vec<Write> = (0..5)
        .map(|n| {
            Write::new(
                "settings",
                format!("sb{n}"),
                json!({ "mode": format!("op-b{n}") }),
            )
        })
        .collect();
    let status = sync_round(&fleet, &api, id, &up_b, &down_b).await;
    let hub_incarnation = str_of(&status, "hub_incarnation");
    let resyncs_sent = u64_of(&status, "resyncs_sent");
    let resyncs_received = u64_of(&status, "resyncs_received");
    let down_applied = u64_of(&status, "down_applied_seq");
    assert_eq!(down_applied, 9, "{status}");

    // The restore: the older copy back in place of the store.
    block_in_place(|| fleet.hub.kill());
    std::fs::copy(&saved, fleet.hub.data_file()).unwrap();
    block_in_place(|| fleet.hub.restart()).unwrap();
    let op = fleet.operator();
    let row = op.known_row(id).await.unwrap();
    assert_eq!(
        u64_of(&row, "up_applied"),
        up_a.len() as u64,
        "the restored hub is at the copy's position: {row}"
    );
    let hub = Replica::Hub(op.clone(), id.to_owned());
    let lost = mismatches(&hub, expecting(&up_b)).await;
    assert_eq!(lost.len(), up_b.len(), "the copy lacks phase-B writes");

    // 8 operator writes after the restore, each accepted: new keys in both
    // downstream collections, and one field of a record only the agent still
    // holds.
    let after_restore: Vec<Write> = (0..7)
        .map(|n| {
            if n % 2 == 0 {
                Write::new(
                    "settings",
                    format!("sc{n}"),
                    json!({ "threshold": 100 + n }),
                )
            } else {
                Write::new("orders", format!("oc{n}"), json!({ "dose": 100 + n }))
            }
        })
        .chain([Write::new("settings", "ag-b", json!({"threshold": 99}))])
        .collect();
    for w in &after_restore {
        op.put_accepted(id, w).await.unwrap();
    }

    let status = wait_status(&api, "the agent linked to the restored hub", |s| {
        linked(s)
            && s["outbox_pending"] == 0
            && s["resyncs_sent"].as_u64() > Some(resyncs_sent)
            && s["resyncs_received"].as_u64() > Some(resyncs_received)
    })
    .await
    .unwrap();
    assert_eq!(
        status["hub_incarnation"],
        hub_incarnation.as_str(),
        "{status}"
    );
    // The agent's writes the copy had lost are at the hub again (`ag-b`
    // with the operator's later field as well).
    let mut up_b_now = up_b.clone();
    if let Some(w) = up_b_now.iter_mut().find(|w| w.key == "ag-b") {
        w.fields = json!({"mode": "agent-b", "threshold": 99});
    }
    wait_records(
        &hub,
        "the agent's lost writes at the hub again",
        expecting(&up_b_now),
    )
    .await;
    let bad = mismatches(&hub, expecting(&up_a)).await;
    assert!(
        bad.is_empty(),
        "phase-A writes at the hub: {}",
        summary(&bad)
    );
    // Every operator write after the restore reaches the agent.
    let mut want = expecting(&after_restore[..7]);
    want.extend(expecting(up_b_now.iter().filter(|w| w.key == "ag-b")));
    wait_records(
        &Replica::Agent(api.clone()),
        "all 8 operator writes after the restore at the agent",
        want,
    )
    .await;
    wait_row(&op, id, "the restored hub's queue to drain", |r| {
        r["queue_pending"] == 0
    })
    .await
    .unwrap();

    // Both sides agree on every `settings` record.
    let settings: Vec<String> = up_a
        .iter()
        .chain(&up_b)
        .chain(&down_a)
        .chain(&down_b)
        .chain(&after_restore)
        .filter(|w| w.collection == "settings")
        .map(|w| w.key.clone())
        .collect();
    poll("settings to converge", SYNC_TIMEOUT, || async {
        let mut differ = Vec::new();
        for key in &settings {
            let a = api.record("settings", key).await?;
            let h = op.record(id, "settings", key).await?;
            if a.is_none() || a != h {
                differ.push(format!("{key}: agent {a:?}, hub {h:?}"));
            }
        }
        Ok(if differ.is_empty() {
            Ok(())
        } else {
            Err(differ.join("; "))
        })
    })
    .await
    .unwrap();
    let row = op.known_row(id).await.unwrap();
    assert_eq!(
        u64_of(&row, "up_applied"),
        u64_of(&status, "outbox_last_seq"),
        "the hub follows the agent's stream again: {row}"
    );
    let m = metrics(&fleet).await;
    assert!(u64_of(&m, "resyncs_sent") >= 1, "{m}");
    assert!(u64_of(&m, "resyncs_received") >= 1, "{m}");
    assert_clean_logs(&fleet, &agent);
    eprintln!(
        "hub restore: {} lost agent writes back at the hub, 8 operator writes after the \
         restore delivered, {} settings records agree; {:.1?}",
        up_b.len(),
        settings.len(),
        started.elapsed()
    );
}

/// The wall time of `field` of `collection/key` in a stopped agent's store.
fn stamp_ms(agent: &TempAgent, collection: &str, key: &str, field: &str) -> u64 {
    let store = agent.open_store().unwrap();
    let state = store
        .get_state(
            &CollectionName::new(collection).unwrap(),
            &RecordKey::new(key).unwrap(),
        )
        .unwrap()
        .unwrap_or_else(|| panic!("{collection}/{key} missing in the agent store"));
    state.fields[&FieldName::new(field).unwrap()]
        .version
        .stamp
        .wall_ms
}

/// Must-show 3: the device clock runs 300 days ahead. v1 stamped the agent's
/// writes 300 days in the future, so they won every later write on both sides
/// for 300 days. v2 learns the offset at the welcome, re-stamps what it wrote
/// with the wrong clock before sending it, and stamps later writes with the
/// corrected clock: an operator write after them wins on both sides (or, had
/// the hub kept a future stamp, it would refuse the write with 409 rather
/// than accept it and lose it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn device_clock_300_days_ahead_is_corrected_and_later_writes_win() {
    let started = Instant::now();
    let mut fleet = Fleet::start().unwrap();
    let id = "v2-skewed";
    let url = fleet.hub.mqtt_url();
    // (a) The agent starts and writes while the hub is down.
    block_in_place(|| fleet.hub.kill());
    let mut agent = block_in_place(|| {
        agent_with(
            &fleet,
            id,
            &url,
            &[("FIELDSYNC_TEST_CLOCK_SKEW_MS", SKEW_MS.to_string())],
        )
    });
    let api = AgentApi::of(&agent);
    let offline_at = system_now_ms();
    api.put(&Write::new("settings", "s1", json!({"threshold": 1})))
        .await
        .unwrap();
    api.put(&Write::new("patients", "p1", json!({"initials": "PA"})))
        .await
        .unwrap();
    let status = api.status().await.unwrap();
    assert_eq!(status["connected"], false, "{status}");
    assert_eq!(i64_of(&status, "clock_offset_ms"), 0, "{status}");

    block_in_place(|| fleet.hub.restart()).unwrap();
    let op = fleet.operator();
    let status = wait_status(&api, "the agent linked with its clock corrected", |s| {
        linked(s) && s["outbox_pending"] == 0
    })
    .await
    .unwrap();
    let offset = i64_of(&status, "clock_offset_ms");
    assert!(
        (offset + SKEW_MS).abs() <= CLOCK_TOLERANCE_MS,
        "agent clock_offset_ms {offset}, expected about {}: {status}",
        -SKEW_MS
    );
    assert_eq!(u64_of(&status, "clock_refused"), 0, "{status}");
    let row = wait_row(&op, id, "the hub to hold the offline writes", |r| {
        r["connected"] == true && r["queue_pending"] == 0
    })
    .await
    .unwrap();
    let skew = i64_of(&row, "clock_skew_ms");
    assert!(
        (skew - SKEW_MS).abs() <= CLOCK_TOLERANCE_MS,
        "hub clock_skew_ms {skew}, expected about {SKEW_MS}: {row}"
    );
    let hub = Replica::Hub(op.clone(), id.to_owned());
    wait_records(
        &hub,
        "the offline writes at the hub",
        vec![
            (
                "settings".into(),
                "s1".into(),
                Some(json!({"threshold": 1})),
            ),
            (
                "patients".into(),
                "p1".into(),
                Some(json!({"initials": "PA"})),
            ),
        ],
    )
    .await;

    // The operator writes the record the skewed clock stamped.
    let (code, body) = op
        .put(id, &Write::new("settings", "s1", json!({"threshold": 42})))
        .await
        .unwrap();
    let s1 = match code {
        StatusCode::ACCEPTED => json!({"threshold": 42}),
        StatusCode::CONFLICT => {
            assert_eq!(body["error"]["code"], "write_would_lose", "{body}");
            json!({"threshold": 1})
        }
        other => panic!("operator PUT settings/s1 answered {other}: {body}"),
    };
    let s1_want = vec![("settings".to_owned(), "s1".to_owned(), Some(s1.clone()))];
    wait_records(&hub, "settings/s1 at the hub", s1_want.clone()).await;
    wait_records(
        &Replica::Agent(api.clone()),
        "settings/s1 at the agent",
        s1_want,
    )
    .await;
    let m = metrics(&fleet).await;
    assert_eq!(u64_of(&m, "clock_drift_rejected"), 0, "{m}");

    // (b) Writes while linked, with the skewed device clock: the operator
    // writes the same record right after; the later write wins everywhere.
    let linked_from = system_now_ms();
    api.put(&Write::new("settings", "s2", json!({"threshold": 5})))
        .await
        .unwrap();
    api.put(&Write::new("settings", "s3", json!({"mode": "agent"})))
        .await
        .unwrap();
    let linked_to = system_now_ms();
    let (code, body) = op
        .put(id, &Write::new("settings", "s2", json!({"threshold": 6})))
        .await
        .unwrap();
    assert_eq!(
        code,
        StatusCode::ACCEPTED,
        "a write after the agent's corrected one must be accepted: {body}"
    );
    let want = vec![
        (
            "settings".to_owned(),
            "s2".to_owned(),
            Some(json!({"threshold": 6})),
        ),
        (
            "settings".to_owned(),
            "s3".to_owned(),
            Some(json!({"mode": "agent"})),
        ),
    ];
    wait_records(
        &hub,
        "the later operator write winning at the hub",
        want.clone(),
    )
    .await;
    wait_records(
        &Replica::Agent(api.clone()),
        "the later operator write winning at the agent",
        want,
    )
    .await;
    let status = wait_status(&api, "the agent's writes acknowledged", |s| {
        linked(s) && s["outbox_pending"] == 0
    })
    .await
    .unwrap();
    assert_eq!(u64_of(&status, "clock_refused"), 0, "{status}");
    assert_eq!(u64_of(&metrics(&fleet).await, "clock_drift_rejected"), 0);
    let s1_at_42 = s1 == json!({"threshold": 42});

    // The stamps themselves: the offline write re-stamped to when it was made
    // (in corrected time), the linked writes stamped with the corrected clock.
    block_in_place(|| agent.kill());
    let p1 = stamp_ms(&agent, "patients", "p1", "initials");
    let s3 = stamp_ms(&agent, "settings", "s3", "mode");
    let slack = CLOCK_TOLERANCE_MS as u64;
    assert!(
        p1 + slack >= offline_at && p1 <= linked_from + slack,
        "the offline write is stamped {p1}, not re-stamped to about {offline_at}"
    );
    assert!(
        s3 + slack >= linked_from && s3 <= linked_to + slack,
        "a write made while linked at {linked_from}..{linked_to} is stamped {s3} \
         ({} ms ahead of the corrected clock)",
        s3.saturating_sub(linked_to)
    );
    eprintln!(
        "skewed clock: offset {offset} ms, hub skew {skew} ms, operator write to s1 {}; \
         linked write stamped {} ms after the write returned; {:.1?}",
        if s1_at_42 {
            "won (202)"
        } else {
            "refused (409)"
        },
        s3 as i64 - linked_to as i64,
        started.elapsed()
    );
}

/// Must-show 4: two devices share one certificate (same agent id), each with
/// its own store. v1 merged both stores into one hub copy, silently. v2
/// (`Identity::admit`, the engine's `displaced`) refuses a store that takes
/// over the connection of another linked store, and a store that was
/// replaced and comes back; it shows the conflict on the refused agent and in
/// the hub's row and metrics, and nothing of a refused store reaches the hub.
/// A new store while no other is linked is taken as a re-imaged device.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cloned_certificate_is_refused_and_never_merged() {
    let started = Instant::now();
    let fleet = Fleet::start().unwrap();
    let id = "v2-cloned";
    let (mut a, a_api) = fleet.linked_agent(id).await.unwrap();
    let op = fleet.operator();
    let a_only = Write::new("patients", "from-a", json!({"initials": "AA", "ward": 1}));
    a_api.put(&a_only).await.unwrap();
    let hub = Replica::Hub(op.clone(), id.to_owned());
    wait_records(&hub, "A's record at the hub", expecting([&a_only])).await;
    let a_incarnation = str_of(&a_api.status().await.unwrap(), "incarnation");
    let row = op.known_row(id).await.unwrap();
    assert_eq!(row["incarnation"], a_incarnation.as_str(), "{row}");
    assert_eq!(u64_of(&row, "identity_conflicts"), 0, "{row}");

    // B: the same id and certificate, another store. It takes writes while
    // it cannot reach the hub, then is pointed at it.
    let closed = format!("mqtts://127.0.0.1:{}", closed_port());
    let mut b = block_in_place(|| agent_with(&fleet, id, &closed, &[]));
    let b_api = AgentApi::of(&b);
    let b_only = [
        Write::new("patients", "from-b", json!({"initials": "BB", "ward": 2})),
        Write::new("settings", "from-b", json!({"mode": "clone"})),
    ];
    b_api.batch(&b_only, true).await.unwrap();
    let b_incarnation = str_of(&b_api.status().await.unwrap(), "incarnation");
    assert_ne!(b_incarnation, a_incarnation, "two stores, two incarnations");
    block_in_place(|| b.kill());
    let config = std::fs::read_to_string(b.config_path()).unwrap();
    assert!(config.contains(&closed), "{config}");
    std::fs::write(
        b.config_path(),
        config.replace(&closed, &fleet.hub.mqtt_url()),
    )
    .unwrap();
    block_in_place(|| b.restart()).unwrap();
    let b_api = AgentApi::of(&b);

    // B is refused and says so; the hub counts the conflict.
    let b_status = wait_status(&b_api, "B to report the identity conflict", |s| {
        s["identity_conflict"] == true
    })
    .await
    .unwrap();
    assert_eq!(b_status["connected"], false, "{b_status}");
    assert_eq!(b_status["hub_incarnation"], Value::Null, "{b_status}");
    let row = wait_row(&op, id, "the hub row to count the conflict", |r| {
        r["identity_conflicts"].as_u64() >= Some(1)
    })
    .await
    .unwrap();
    assert_eq!(
        row["incarnation"],
        a_incarnation.as_str(),
        "the refused store must not replace the linked one: {row}"
    );
    assert!(u64_of(&metrics(&fleet).await, "identity_conflicts") >= 1);

    // A (dropped when B's connection took over its client id) links again and
    // keeps syncing; the hub still follows A's store.
    let a_status = wait_status(&a_api, "A linked again", linked).await.unwrap();
    assert_eq!(a_status["identity_conflict"], false, "{a_status}");
    let a_later = Write::new("patients", "from-a-later", json!({"initials": "AL"}));
    a_api.put(&a_later).await.unwrap();
    wait_records(
        &hub,
        "A's later record at the hub",
        expecting([&a_only, &a_later]),
    )
    .await;
    let row = op.known_row(id).await.unwrap();
    assert_eq!(row["incarnation"], a_incarnation.as_str(), "{row}");

    // Nothing of B's store is at the hub, and B is still refused.
    for w in &b_only {
        assert_eq!(
            op.record(id, &w.collection, &w.key).await.unwrap(),
            None,
            "{}/{} of the refused store reached the hub",
            w.collection,
            w.key
        );
    }
    let b_status = b_api.status().await.unwrap();
    assert_eq!(b_status["identity_conflict"], true, "{b_status}");
    assert_eq!(u64_of(&b_status, "outbox_pending"), 2, "{b_status}");
    assert!(
        fleet.hub.stderr_log().contains("refused a hello"),
        "the hub logs the refusal"
    );
    let conflicts = u64_of(&op.known_row(id).await.unwrap(), "identity_conflicts");

    // A goes offline and B starts again: with no other store linked, B is
    // taken for a re-imaged device and replaces A's store (announced in the
    // hub's log and row). When A comes back, its store is a replaced one:
    // refused, and nothing A writes reaches the hub any more.
    block_in_place(|| a.kill());
    wait_row(&op, id, "the hub to see A gone", |r| {
        r["connected"] == false
    })
    .await
    .unwrap();
    block_in_place(|| b.restart()).unwrap();
    let b_api = AgentApi::of(&b);
    let b_status = wait_status(&b_api, "B linked as a replacement", |s| {
        linked(s) && s["outbox_pending"] == 0
    })
    .await
    .unwrap();
    assert_eq!(b_status["identity_conflict"], false, "{b_status}");
    wait_row(&op, id, "the hub row to follow B's store", |r| {
        r["incarnation"] == b_incarnation.as_str()
    })
    .await
    .unwrap();
    wait_records(&hub, "B's records at the hub", expecting(&b_only)).await;
    assert!(
        fleet
            .hub
            .stderr_log()
            .contains("agent store is new to the hub"),
        "the hub logs the replacement"
    );

    block_in_place(|| a.restart()).unwrap();
    let a_api = AgentApi::of(&a);
    let a_refused = Write::new("patients", "from-a-refused", json!({"initials": "AR"}));
    a_api.put(&a_refused).await.unwrap();
    let a_status = wait_status(&a_api, "A (a replaced store) refused", |s| {
        s["identity_conflict"] == true
    })
    .await
    .unwrap();
    assert_eq!(a_status["connected"], false, "{a_status}");
    let row = wait_row(&op, id, "the hub row to count the second conflict", |r| {
        r["identity_conflicts"].as_u64() > Some(conflicts)
    })
    .await
    .unwrap();
    assert_eq!(row["incarnation"], b_incarnation.as_str(), "{row}");
    // B (dropped when A's connection took over) links again and syncs on.
    wait_status(&b_api, "B linked again", linked).await.unwrap();
    let b_later = Write::new("patients", "from-b-later", json!({"initials": "BL"}));
    b_api.put(&b_later).await.unwrap();
    wait_records(&hub, "B's later record at the hub", expecting([&b_later])).await;
    assert_eq!(
        op.record(id, &a_refused.collection, &a_refused.key)
            .await
            .unwrap(),
        None,
        "a write of the refused (replaced) store reached the hub"
    );
    assert!(u64_of(&metrics(&fleet).await, "identity_conflicts") >= 2);
    eprintln!(
        "cloned certificate: B ({b_incarnation}) refused while A ({a_incarnation}) was linked; \
         B replaced A while A was offline; A refused when it came back; hub row \
         identity_conflicts {}; {:.1?}",
        row["identity_conflicts"],
        started.elapsed()
    );
}

/// Size of the one large field of each backlog record.
const BIG_FIELD_BYTES: usize = 100 * 1024;
/// Backlog writes per `POST /v1/batch` (under the agent's default 1 MiB body
/// limit).
const BACKLOG_PER_REQUEST: usize = 8;
/// How long the drain may take after the hub returns.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the outbox may stay put while the agent is linked: longer means
/// the drain stalled.
const STALL_LIMIT: Duration = Duration::from_secs(20);

/// The large field of backlog record `n`: distinct per record.
fn big_initials(n: usize) -> String {
    let head = format!("r{n:05}-");
    let mut s = String::with_capacity(BIG_FIELD_BYTES);
    s.push_str(&head);
    while s.len() < BIG_FIELD_BYTES {
        s.push(char::from(b'a' + (s.len() % 26) as u8));
    }
    s
}

/// Must-show 5: a backlog of large records written during an outage drains
/// after it, steadily. In v1 the drain stalled: the window filled with
/// multi-MiB batches and the outbox stopped moving. Here `outbox_pending` must
/// keep decreasing while the agent is linked (never still for
/// [`STALL_LIMIT`]) and reach 0 within [`DRAIN_TIMEOUT`]. 400 records of
/// 100 KiB (40 MiB, several windows) by default; 4,000 (400 MiB) with
/// `FIELDSYNC_HEAVY=1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backlog_of_100_kib_records_drains_after_an_outage_without_a_stall() {
    let heavy = std::env::var("FIELDSYNC_HEAVY").is_ok_and(|v| v == "1");
    let records: usize = if heavy { 4000 } else { 400 };
    let started = Instant::now();
    let mut fleet = Fleet::start().unwrap();
    let id = "v2-backlog";
    let (agent, api) = fleet.linked_agent(id).await.unwrap();
    let warmup = Write::patient("warmup", 0);
    api.put(&warmup).await.unwrap();
    wait_status(&api, "the warm-up write acknowledged", |s| {
        linked(s) && s["outbox_pending"] == 0
    })
    .await
    .unwrap();

    block_in_place(|| fleet.hub.kill());
    wait_status(&api, "the agent to see the hub gone", |s| {
        s["connected"] == false
    })
    .await
    .unwrap();
    let writing = Instant::now();
    for first in (0..records).step_by(BACKLOG_PER_REQUEST) {
        let writes: Vec<Write> = (first..(first + BACKLOG_PER_REQUEST).min(records))
            .map(|n| {
                Write::new(
                    "patients",
                    format!("big{n:05}"),
                    json!({"initials": big_initials(n), "ward": n}),
                )
            })
            .collect();
        api.batch(&writes, false)
            .await
            .unwrap_or_else(|e| panic!("backlog batch from {first}: {e:#}"));
    }
    let written = writing.elapsed();
    let status = api.status().await.unwrap();
    assert_eq!(
        u64_of(&status, "outbox_pending"),
        records as u64,
        "{status}"
    );
    let last = u64_of(&status, "outbox_last_seq");

    block_in_place(|| fleet.hub.restart()).unwrap();
    let op = fleet.operator();
    let draining = Instant::now();
    let mut pending = records as u64;
    let mut moved = Instant::now();
    let mut linked_at: Option<Duration> = None;
    let mut samples: BTreeMap<u64, u64> = BTreeMap::new();
    loop {
        let status = api.status().await.unwrap();
        let now = u64_of(&status, "outbox_pending");
        let connected = status["connected"] == true;
        let elapsed = draining.elapsed();
        if connected && linked_at.is_none() {
            linked_at = Some(elapsed);
            moved = Instant::now();
        }
        if now < pending {
            pending = now;
            moved = Instant::now();
            samples.insert(elapsed.as_secs(), now);
        }
        if now == 0 {
            break;
        }
        assert!(
            !(connected && moved.elapsed() >= STALL_LIMIT),
            "the drain stalled: outbox_pending {now} unchanged for {STALL_LIMIT:?} while \
             linked ({elapsed:.1?} after the hub returned); status {status}; progress {samples:?}"
        );
        assert!(
            elapsed < DRAIN_TIMEOUT,
            "the outbox did not drain within {DRAIN_TIMEOUT:?}: {now} of {records} left; \
             progress {samples:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drained = draining.elapsed();

    let row = op.known_row(id).await.unwrap();
    assert_eq!(u64_of(&row, "up_applied"), last, "{row}");
    let sample: Vec<usize> = (0..records)
        .step_by(records / 20)
        .chain([records - 1])
        .collect();
    let want: Vec<(String, String, Option<Value>)> = sample
        .iter()
        .map(|&n| {
            (
                "patients".to_owned(),
                format!("big{n:05}"),
                Some(json!({"initials": big_initials(n), "ward": n})),
            )
        })
        .collect();
    let bad = mismatches(&Replica::Hub(op.clone(), id.to_owned()), want).await;
    assert!(
        bad.is_empty(),
        "backlog records at the hub: {}",
        summary(&bad)
    );
    assert_clean_logs(&fleet, &agent);
    let mib = (records * BIG_FIELD_BYTES) as f64 / f64::from(1 << 20);
    eprintln!(
        "backlog: {records} records of {} KiB ({mib:.0} MiB) written in {written:.1?}, \
         linked {:.1?} after the hub returned, drained in {drained:.1?} ({:.1} MiB/s); \
         progress (s -> pending) {samples:?}; {:.1?} in all",
        BIG_FIELD_BYTES / 1024,
        linked_at.unwrap_or_default(),
        mib / drained.as_secs_f64(),
        started.elapsed()
    );
}
