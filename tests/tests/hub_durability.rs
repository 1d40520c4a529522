//! Durability of the sync link end to end, with a real `fieldsync-hub run`,
//! real agents, real TLS and real redb files: writes made on either side while
//! the other is down arrive when it returns, in order; SIGKILL of the hub or of
//! the agent in the middle of a stream loses no acknowledged write and applies
//! nothing twice; both directions converge after the link drops.
//!
//! Set `FIELDSYNC_E2E_SEED` to replay the kill timings of a failed run, and
//! `FIELDSYNC_E2E_KILLS` to kill more often than the default five times.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fieldsync_e2e::durability::{
    log_problems, mismatches, seed, stream_writes, summary, wait_row, wait_status, AgentApi,
    Attempt, Fleet, Operator, Replica, Write, IO_TIMEOUT,
};
use fieldsync_e2e::TempAgent;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use tokio::task::{block_in_place, JoinSet};

/// Changes the agent makes while the hub is down (must-show 2a).
const OFFLINE_CHANGES: u64 = 1000;
/// Writes per `POST /v1/batch` in the offline-upstream test.
const CHUNK: usize = 100;
/// Operator writes to distinct keys while the agent is down (must-show 2b)...
const DOWN_KEYS: u64 = 1000;
/// ...and successive writes to one key.
const SEQ_CHECK_WRITES: u64 = 50;
/// Hub or agent kills in the stream tests, unless `FIELDSYNC_E2E_KILLS` says
/// otherwise (for a longer soak).
const KILLS: usize = 5;
/// Concurrent writer tasks on the agent API in the stream tests.
const WRITERS: usize = 2;
/// Wait this long (milliseconds, inclusive range) after the stream is seen
/// flowing through the current hub or agent before killing it.
const KILL_DELAY_MS: std::ops::RangeInclusive<u64> = 0..=300;
/// How long the hub stays down after a kill before it restarts (milliseconds).
const DOWN_MS: std::ops::RangeInclusive<u64> = 0..=300;
/// Upstream changes, at least, through each hub or agent before it is killed.
const STREAM_VOLUME: u64 = 20;
/// Longest wait for a writer task to finish once stopped (its requests time
/// out after [`IO_TIMEOUT`]).
const JOIN_TIMEOUT: Duration = Duration::from_secs(IO_TIMEOUT.as_secs() + 15);

fn kills() -> usize {
    match std::env::var("FIELDSYNC_E2E_KILLS") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("FIELDSYNC_E2E_KILLS={s:?} is not a number")),
        Err(_) => KILLS,
    }
}

fn u64_of(v: &Value, name: &str) -> u64 {
    v[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {name} in {v}"))
}

/// `expected` as the list [`mismatches`] takes.
fn expecting(
    expected: impl IntoIterator<Item = (String, String, Value)>,
) -> Vec<(String, String, Option<Value>)> {
    expected
        .into_iter()
        .map(|(c, k, v)| (c, k, Some(v)))
        .collect()
}

fn acked_writes(attempts: &[Attempt]) -> Vec<&Write> {
    attempts
        .iter()
        .filter(|a| a.acked)
        .flat_map(|a| &a.writes)
        .collect()
}

/// Must-show 2a: the agent takes 1,000 changes while the hub is SIGKILLed
/// (every write succeeds and waits in the outbox); after the hub restarts the
/// outbox drains and the hub holds every record with its final values, each
/// change applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offline_upstream_changes_all_arrive_after_hub_restart() {
    let started = Instant::now();
    let mut fleet = Fleet::start().unwrap();
    let agent = fleet.agent("dur-up").unwrap();
    let id = agent.id().to_owned();
    let api = AgentApi::of(&agent);

    // Linked (the first contact's resync done), and one write made it
    // through as a batch: the hub knows the agent.
    wait_status(&api, "the agent linked and resynced", |s| {
        s["connected"] == true && s["resync_running"] == false
    })
    .await
    .unwrap();
    let warmup = Write::patient("warmup", 999);
    api.put(&warmup).await.unwrap();
    wait_status(&api, "the first write acknowledged by the hub", |s| {
        s["connected"] == true && s["outbox_pending"] == 0 && s["outbox_acked_seq"] == 1
    })
    .await
    .unwrap();

    block_in_place(|| fleet.hub.kill());
    wait_status(&api, "the agent to see the hub gone", |s| {
        s["connected"] == false
    })
    .await
    .unwrap();

    // 1,000 changes: new records with every permitted field, and every 100th a
    // multi-field partial update of a record written earlier.
    let mut expected: BTreeMap<String, Value> = BTreeMap::new();
    expected.insert(warmup.key.clone(), warmup.fields.clone());
    let mut changes: Vec<(Write, bool)> = Vec::new();
    let mut next_new = 0u64;
    for i in 0..OFFLINE_CHANGES {
        if i % 100 == 99 {
            let key = format!("up{}", (i / 100) * 7);
            let update = json!({"ward": 300 + i, "heart_rate": 10 + i % 50});
            let Some(Value::Object(record)) = expected.get_mut(&key) else {
                panic!("{key} is not written yet");
            };
            record.extend(update.as_object().cloned().unwrap());
            changes.push((Write::new("patients", key, update), false));
        } else {
            let w = Write::patient(format!("up{next_new}"), next_new);
            expected.insert(w.key.clone(), w.fields.clone());
            changes.push((w, true));
            next_new += 1;
        }
    }
    let mut done = 0u64;
    for chunk in changes.chunks(CHUNK) {
        let writes: Vec<Write> = chunk.iter().map(|(w, _)| w.clone()).collect();
        let fresh = chunk.iter().all(|(_, fresh)| *fresh);
        api.batch(&writes, fresh)
            .await
            .unwrap_or_else(|e| panic!("offline batch after {done} changes failed: {e:#}"));
        done += writes.len() as u64;
        let status = api.status().await.unwrap();
        assert_eq!(
            (
                &status["connected"],
                u64_of(&status, "outbox_pending"),
                u64_of(&status, "outbox_last_seq")
            ),
            (&json!(false), done, 1 + done),
            "status after {done} offline changes: {status}"
        );
    }
    // The records are whole at the agent (a sample).
    for key in ["up0", "up7", "up63", "up989"] {
        assert_eq!(
            api.record("patients", key).await.unwrap().as_ref(),
            expected.get(key),
            "agent's copy of {key}"
        );
    }

    block_in_place(|| fleet.hub.restart()).unwrap();
    let drained = Instant::now();
    let status = wait_status(&api, "the outbox to drain after the hub restart", |s| {
        s["outbox_pending"] == 0
    })
    .await
    .unwrap();
    let drained = drained.elapsed();
    let last = u64_of(&status, "outbox_last_seq");
    assert_eq!(last, 1 + OFFLINE_CHANGES, "{status}");
    assert_eq!(u64_of(&status, "outbox_acked_seq"), last, "{status}");

    let op = fleet.operator();
    let row = op.known_row(&id).await.unwrap();
    assert_eq!(u64_of(&row, "up_applied"), last, "hub row {row}");
    assert_eq!(
        u64_of(&row, "changes_applied"),
        last,
        "each change applied exactly once: {row}"
    );

    let hub = Replica::Hub(op, id.clone());
    let want = expecting(
        expected
            .iter()
            .map(|(k, v)| ("patients".to_owned(), k.clone(), v.clone())),
    );
    let records = want.len();
    let bad = mismatches(&hub, want).await;
    assert!(bad.is_empty(), "hub records: {}", summary(&bad));
    assert_clean_logs(&fleet, &agent);
    eprintln!(
        "offline upstream: {OFFLINE_CHANGES} changes to {records} records delivered \
         {drained:.1?} after the hub restart; {:.1?} in all",
        started.elapsed()
    );
}

/// Must-show 2b: 1,050 operator writes for a stopped agent are accepted (202)
/// and queued durably; when the agent returns they are all applied, in order
/// (the downstream cursor reaches 1,050 and the last of 50 writes to one key
/// wins). With `kill_hub`, the hub is SIGKILLed and restarted while they wait.
async fn offline_downstream(id: &str, kill_hub: bool) {
    let started = Instant::now();
    let mut fleet = Fleet::start().unwrap();
    let (mut agent, _) = fleet.linked_agent(id).await.unwrap();
    block_in_place(|| agent.kill());
    let mut op = fleet.operator();
    wait_row(&op, id, "the hub to see the agent gone", |r| {
        r["connected"] == false
    })
    .await
    .unwrap();

    // 1,000 keys, a few requests at a time.
    let queueing = Instant::now();
    let mut tasks = JoinSet::new();
    for t in 0..8 {
        let (op, id) = (op.clone(), id.to_owned());
        tasks.spawn(async move {
            let mut out = Vec::new();
            for i in (t..DOWN_KEYS).step_by(8) {
                let w = Write::new(
                    "settings",
                    format!("s{i}"),
                    json!({"mode": format!("mode-{i}")}),
                );
                out.push((w.key.clone(), op.put_accepted(&id, &w).await));
            }
            out
        });
    }
    let mut seqs = BTreeSet::new();
    for (key, result) in tasks.join_all().await.into_iter().flatten() {
        let (seq, connected) =
            result.unwrap_or_else(|e| panic!("operator PUT settings/{key}: {e:#}"));
        assert!(
            !connected,
            "settings/{key}: agent_connected while it is down"
        );
        assert!(seqs.insert(seq), "queued_seq {seq} handed out twice");
    }
    // 50 successive writes to one key: each queued after the one before.
    let mut last_seq = 0;
    for v in 0..SEQ_CHECK_WRITES {
        let w = Write::new("settings", "seq-check", json!({ "mode": v }));
        let (seq, connected) = op
            .put_accepted(id, &w)
            .await
            .unwrap_or_else(|e| panic!("operator PUT seq-check={v}: {e:#}"));
        assert!(!connected);
        assert!(
            seq > last_seq,
            "seq-check={v} queued at {seq} after {last_seq}"
        );
        assert!(seqs.insert(seq), "queued_seq {seq} handed out twice");
        last_seq = seq;
    }
    let total = DOWN_KEYS + SEQ_CHECK_WRITES;
    assert_eq!(
        seqs,
        (1..=total).collect::<BTreeSet<u64>>(),
        "queued_seq values are not 1..={total}"
    );
    let queued = queueing.elapsed();
    let row = op.known_row(id).await.unwrap();
    assert_eq!(u64_of(&row, "queue_pending"), total, "{row}");

    if kill_hub {
        block_in_place(|| fleet.hub.kill());
        block_in_place(|| fleet.hub.restart()).unwrap();
        op = fleet.operator();
        let row = op.known_row(id).await.unwrap();
        assert_eq!(
            u64_of(&row, "queue_pending"),
            total,
            "queue after the hub's SIGKILL and restart: {row}"
        );
        assert_eq!(row["connected"], false, "{row}");
    }

    block_in_place(|| agent.restart()).unwrap();
    let returned = Instant::now();
    let api = AgentApi::of(&agent);
    wait_row(&op, id, "the downstream queue to drain", |r| {
        r["queue_pending"] == 0
    })
    .await
    .unwrap();
    let status = wait_status(&api, "the agent's downstream cursor at the end", |s| {
        s["down_applied_seq"] == total
    })
    .await
    .unwrap();
    let delivered = returned.elapsed();
    // Downstream changes are applied, not echoed back up.
    assert_eq!(u64_of(&status, "outbox_last_seq"), 0, "{status}");

    let mut want = expecting((0..DOWN_KEYS).map(|i| {
        (
            "settings".to_owned(),
            format!("s{i}"),
            json!({"mode": format!("mode-{i}")}),
        )
    }));
    want.push((
        "settings".to_owned(),
        "seq-check".to_owned(),
        Some(json!({"mode": SEQ_CHECK_WRITES - 1})),
    ));
    let bad = mismatches(&Replica::Agent(api), want).await;
    assert!(bad.is_empty(), "agent records: {}", summary(&bad));
    assert_clean_logs(&fleet, &agent);
    eprintln!(
        "offline downstream (hub killed: {kill_hub}): {total} writes queued in {queued:.1?}, \
         delivered {delivered:.1?} after the agent returned; {:.1?} in all",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offline_downstream_writes_all_arrive_in_order() {
    offline_downstream("dur-down", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offline_downstream_queue_survives_hub_sigkill() {
    offline_downstream("dur-down-kill", true).await;
}

/// Polls until the hub's `changes_applied` for `id` exceeds `before`: changes
/// flow through the hub and agent running now.
async fn wait_flowing(op: &Operator, id: &str, before: u64) {
    wait_row(op, id, "upstream changes to flow", |r| {
        r["changes_applied"].as_u64() > Some(before)
    })
    .await
    .unwrap();
}

async fn join_writers<T: 'static>(writers: JoinSet<T>) -> Vec<T> {
    tokio::time::timeout(JOIN_TIMEOUT, writers.join_all())
        .await
        .unwrap_or_else(|_| panic!("writers still busy {JOIN_TIMEOUT:?} after being stopped"))
}

/// Must-show 3a: the hub is SIGKILLed at random moments while clients write
/// continuously through the agent API, and restarted each time. Every write
/// succeeds (the agent never needs the hub to accept one), every one reaches
/// the hub with its values, and the hub applied each outbox entry exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hub_sigkill_during_stream_loses_nothing_and_applies_once() {
    let seed = seed();
    eprintln!("hub sigkill seed: {seed} (replay with FIELDSYNC_E2E_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let mut fleet = Fleet::start().unwrap();
    let (agent, api) = fleet.linked_agent("dur-hubkill").await.unwrap();
    let id = agent.id().to_owned();

    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = JoinSet::new();
    for t in 0..WRITERS {
        writers.spawn(stream_writes(
            api.clone(),
            format!("h{t}-"),
            0,
            stop.clone(),
        ));
    }
    let kills = kills();
    for _ in 0..kills {
        let op = fleet.operator();
        // Changes flow through this hub: the kill lands mid-stream.
        let before = u64_of(&op.known_row(&id).await.unwrap(), "changes_applied");
        wait_flowing(&op, &id, before + STREAM_VOLUME).await;
        let delay = rng.random_range(KILL_DELAY_MS);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        block_in_place(|| fleet.hub.kill());
        let down = rng.random_range(DOWN_MS);
        tokio::time::sleep(Duration::from_millis(down)).await;
        block_in_place(|| fleet.hub.restart()).unwrap();
    }
    let op = fleet.operator();
    let before = u64_of(&op.known_row(&id).await.unwrap(), "changes_applied");
    wait_flowing(&op, &id, before).await;
    stop.store(true, Ordering::Relaxed);
    let attempts: Vec<Attempt> = join_writers(writers)
        .await
        .into_iter()
        .flat_map(|r| r.attempts)
        .collect();
    let failed: Vec<String> = attempts.iter().filter_map(|a| a.error.clone()).collect();
    assert!(
        failed.is_empty(),
        "agent writes failed while the hub was killed: {failed:?}"
    );
    let acked = acked_writes(&attempts);

    let status = wait_status(&api, "the outbox to drain", |s| s["outbox_pending"] == 0)
        .await
        .unwrap();
    let last = u64_of(&status, "outbox_last_seq");
    assert_eq!(
        last,
        acked.len() as u64,
        "one outbox entry per acknowledged write: {status}"
    );
    let row = op.known_row(&id).await.unwrap();
    assert_eq!(u64_of(&row, "up_applied"), last, "hub row {row}");
    assert_eq!(
        u64_of(&row, "changes_applied"),
        last,
        "each outbox entry applied exactly once: {row}"
    );
    let want = expecting(
        acked
            .iter()
            .map(|w| (w.collection.clone(), w.key.clone(), w.fields.clone())),
    );
    let bad = mismatches(&Replica::Hub(op, id.clone()), want).await;
    assert!(
        bad.is_empty(),
        "hub records (seed {seed}): {}",
        summary(&bad)
    );
    assert_clean_logs(&fleet, &agent);
    eprintln!(
        "hub sigkill: {kills} kills, {} requests, {} writes, all at the hub; {:.1?}",
        attempts.len(),
        acked.len(),
        started.elapsed()
    );
}

/// Must-show 3b: the agent is SIGKILLed at random moments while clients write
/// through its API and its outbox streams to the hub, and restarted each time.
/// Every acknowledged write reaches the hub; a write whose answer was cut off
/// is at the hub exactly when it is at the agent; each outbox entry is applied
/// exactly once and the outbox ends empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_sigkill_during_stream_loses_nothing_and_applies_once() {
    let seed = seed();
    eprintln!("agent sigkill seed: {seed} (replay with FIELDSYNC_E2E_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let fleet = Fleet::start().unwrap();
    let mut agent = fleet.agent("dur-agentkill").unwrap();
    let id = agent.id().to_owned();
    let op = fleet.operator();
    let mut next_n = [0u64; WRITERS];
    let mut attempts: Vec<Attempt> = Vec::new();
    // Operator writes flow down the whole time, through every kill.
    let stop_op = Arc::new(AtomicBool::new(false));
    let op_task = tokio::spawn(operator_side(op.clone(), id.clone(), 0, stop_op.clone()));

    let kills = kills();
    for round in 0..=kills {
        let api = AgentApi::of(&agent);
        wait_status(&api, "the agent linked", |s| s["connected"] == true)
            .await
            .unwrap();
        let before = u64_of(&op.known_row(&id).await.unwrap(), "changes_applied");
        let down_before = api.status_u64("down_applied_seq").await.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = JoinSet::new();
        for (t, n) in next_n.iter().enumerate() {
            let (api, stop, n) = (api.clone(), stop.clone(), *n);
            writers.spawn(async move { (t, stream_writes(api, format!("a{t}-"), n, stop).await) });
        }
        // Both streams flow through this agent: the kill lands mid-stream.
        wait_flowing(&op, &id, before + STREAM_VOLUME).await;
        wait_status(&api, "downstream changes to flow", |s| {
            s["down_applied_seq"].as_u64() > Some(down_before)
        })
        .await
        .unwrap();
        if round < kills {
            let delay = rng.random_range(KILL_DELAY_MS);
            tokio::time::sleep(Duration::from_millis(delay)).await;
            block_in_place(|| agent.kill());
        }
        stop.store(true, Ordering::Relaxed);
        for (t, report) in join_writers(writers).await {
            next_n[t] = report.next_n;
            attempts.extend(report.attempts);
        }
        if round < kills {
            block_in_place(|| agent.restart())
                .unwrap_or_else(|e| panic!("round {round}: agent restart failed: {e:#}"));
        }
    }

    stop_op.store(true, Ordering::Relaxed);
    let op_report = tokio::time::timeout(JOIN_TIMEOUT, op_task)
        .await
        .expect("operator writer still busy")
        .unwrap();
    assert!(
        op_report.cut.is_none(),
        "an operator write failed: {:?}",
        op_report.cut
    );
    // One last operator write marks the end of the downstream queue.
    let (final_seq, _) = op
        .put_accepted(
            &id,
            &Write::new("settings", "final", json!({"mode": "done"})),
        )
        .await
        .unwrap();

    let api = AgentApi::of(&agent);
    let status = wait_status(&api, "both directions to drain", |s| {
        s["connected"] == true && s["outbox_pending"] == 0 && s["down_applied_seq"] == final_seq
    })
    .await
    .unwrap();
    wait_row(&op, &id, "the downstream queue to drain", |r| {
        r["queue_pending"] == 0
    })
    .await
    .unwrap();
    let last = u64_of(&status, "outbox_last_seq");
    let row = op.known_row(&id).await.unwrap();
    assert_eq!(u64_of(&row, "up_applied"), last, "hub row {row}");
    assert_eq!(
        u64_of(&row, "changes_applied"),
        last,
        "each outbox entry applied exactly once (seed {seed}): {row}"
    );

    // Acknowledged writes: at the hub with their values.
    let acked = acked_writes(&attempts);
    let want = expecting(
        acked
            .iter()
            .map(|w| (w.collection.clone(), w.key.clone(), w.fields.clone())),
    );
    let hub = Replica::Hub(op.clone(), id.clone());
    let bad = mismatches(&hub, want).await;
    assert!(
        bad.is_empty(),
        "hub records (seed {seed}): {}",
        summary(&bad)
    );
    // Cut-off writes: committed whole or not at all at the agent, and the hub
    // agrees with the agent.
    let mut unacked_committed = 0u64;
    for attempt in attempts.iter().filter(|a| !a.acked) {
        let mut found = Vec::new();
        for w in &attempt.writes {
            let at_agent = api.record(&w.collection, &w.key).await.unwrap();
            if let Some(fields) = &at_agent {
                assert_eq!(fields, &w.fields, "{} at the agent", w.key);
            }
            let at_hub = op.record(&id, &w.collection, &w.key).await.unwrap();
            assert_eq!(at_hub, at_agent, "{}: hub and agent disagree", w.key);
            found.push(at_agent.is_some());
        }
        assert!(
            found.iter().all(|f| *f) || found.iter().all(|f| !*f),
            "a request committed in part: {:?} ({found:?})",
            attempt.writes
        );
        if found.first() == Some(&true) {
            unacked_committed += attempt.writes.len() as u64;
        }
    }
    assert_eq!(
        last,
        acked.len() as u64 + unacked_committed,
        "one outbox entry per committed write: {status}"
    );
    // Operator writes: at the agent, and the same at both ends.
    let mut keys = BTreeSet::from(["final".to_owned()]);
    keys.extend(op_report.acked.iter().map(|(w, _)| w.key.clone()));
    for key in &keys {
        let a = api.record("settings", key).await.unwrap();
        let h = op.record(&id, "settings", key).await.unwrap();
        assert!(
            a.is_some(),
            "settings/{key} missing at the agent (seed {seed})"
        );
        assert_eq!(a, h, "settings/{key}: agent and hub disagree (seed {seed})");
    }
    let own = op_report
        .acked
        .iter()
        .filter(|(w, _)| w.key.starts_with('o'));
    let want = expecting(own.map(|(w, _)| (w.collection.clone(), w.key.clone(), w.fields.clone())));
    let bad = mismatches(&Replica::Agent(api), want).await;
    assert!(
        bad.is_empty(),
        "agent records (seed {seed}): {}",
        summary(&bad)
    );
    assert_clean_logs(&fleet, &agent);
    eprintln!(
        "agent sigkill: {kills} kills, {} requests, {} writes acknowledged, \
         {unacked_committed} cut-off writes committed anyway, {} operator writes delivered; {:.1?}",
        attempts.len(),
        acked.len(),
        op_report.acked.len() + 1,
        started.elapsed()
    );
}

/// Keys of `settings` that both the agent and the operator write.
const SHARED_KEYS: u64 = 5;
/// Changes each way, at least, before the hub is killed and after it restarts.
const TWO_WAY_VOLUME: u64 = 40;

/// What a writer task of the two-way test did.
#[derive(Debug, Default)]
struct SideReport {
    /// Writes answered with success, with the operator's `queued_seq` (0 for
    /// agent writes).
    acked: Vec<(Write, u64)>,
    /// The request that failed (its outcome is unknown), and why.
    cut: Option<(Write, String)>,
    next_n: u64,
}

/// The agent's side: new `patients` records, and every 5th write a `settings`
/// key the operator writes too.
async fn agent_side(api: AgentApi, stop: Arc<AtomicBool>) -> SideReport {
    let mut report = SideReport::default();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let w = if n % 5 == 4 {
            Write::new(
                "settings",
                format!("both{}", n / 5 % SHARED_KEYS),
                json!({"mode": format!("agent-{n}"), "threshold": n}),
            )
        } else {
            Write::patient(format!("b{n}"), n)
        };
        n += 1;
        match api.put(&w).await {
            Ok(()) => report.acked.push((w, 0)),
            Err(e) => {
                report.cut = Some((w, format!("{e:#}")));
                break;
            }
        }
    }
    report.next_n = n;
    report
}

/// The operator's side: `settings` keys of its own, and every 3rd write a key
/// the agent writes too. Ends at the first failure (the hub was killed).
async fn operator_side(op: Operator, id: String, mut n: u64, stop: Arc<AtomicBool>) -> SideReport {
    let mut report = SideReport::default();
    while !stop.load(Ordering::Relaxed) {
        let key = if n % 3 == 2 {
            format!("both{}", n % SHARED_KEYS)
        } else {
            format!("o{n}")
        };
        let w = Write::new("settings", key, json!({"mode": format!("op-{n}")}));
        n += 1;
        match op.put_accepted(&id, &w).await {
            Ok((seq, _)) => report.acked.push((w, seq)),
            Err(e) => {
                report.cut = Some((w, format!("{e:#}")));
                break;
            }
        }
    }
    report.next_n = n;
    report
}

/// Both directions at once: the agent writes `patients` (and shared `settings`
/// keys) while the operator writes `settings` for it; the hub is SIGKILLed
/// mid-stream and restarted. Afterwards every acknowledged write is on the
/// other side, a cut-off operator write is on both sides or neither, and the
/// keys both sides wrote hold the same values at the hub and the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_directions_converge_after_hub_sigkill() {
    let seed = seed();
    eprintln!("two-way seed: {seed} (replay with FIELDSYNC_E2E_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let mut fleet = Fleet::start().unwrap();
    let (agent, api) = fleet.linked_agent("dur-both").await.unwrap();
    let id = agent.id().to_owned();

    let stop_agent = Arc::new(AtomicBool::new(false));
    let agent_task = tokio::spawn(agent_side(api.clone(), stop_agent.clone()));
    let op = fleet.operator();
    let stop_op = Arc::new(AtomicBool::new(false));
    let op_task = tokio::spawn(operator_side(op.clone(), id.clone(), 0, stop_op.clone()));

    // Both directions flow for a while, then the hub dies mid-stream.
    wait_flowing(&op, &id, TWO_WAY_VOLUME).await;
    wait_status(&api, "downstream changes to flow", |s| {
        s["down_applied_seq"].as_u64() > Some(TWO_WAY_VOLUME)
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(rng.random_range(KILL_DELAY_MS))).await;
    block_in_place(|| fleet.hub.kill());
    let first_op = tokio::time::timeout(JOIN_TIMEOUT, op_task)
        .await
        .expect("the operator writer did not notice the hub's death")
        .unwrap();
    assert!(
        first_op.cut.is_some(),
        "the operator writer stopped without a failure"
    );
    // The agent keeps taking writes while the hub is down.
    let pending = api.status_u64("outbox_pending").await.unwrap();
    wait_status(&api, "agent writes to pile up while the hub is down", |s| {
        s["outbox_pending"].as_u64() >= Some(pending + 20)
    })
    .await
    .unwrap();

    block_in_place(|| fleet.hub.restart()).unwrap();
    let op = fleet.operator();
    let up_before = u64_of(&op.known_row(&id).await.unwrap(), "changes_applied");
    let down_before = api.status_u64("down_applied_seq").await.unwrap();
    let stop_op = Arc::new(AtomicBool::new(false));
    let op_task = tokio::spawn(operator_side(
        op.clone(),
        id.clone(),
        first_op.next_n,
        stop_op.clone(),
    ));
    wait_flowing(&op, &id, up_before + TWO_WAY_VOLUME).await;
    wait_status(&api, "downstream changes to flow again", |s| {
        s["down_applied_seq"].as_u64() > Some(down_before + TWO_WAY_VOLUME)
    })
    .await
    .unwrap();
    stop_op.store(true, Ordering::Relaxed);
    stop_agent.store(true, Ordering::Relaxed);
    let second_op = tokio::time::timeout(JOIN_TIMEOUT, op_task)
        .await
        .expect("operator writer still busy")
        .unwrap();
    let agent_report = tokio::time::timeout(JOIN_TIMEOUT, agent_task)
        .await
        .expect("agent writer still busy")
        .unwrap();
    assert!(
        agent_report.cut.is_none(),
        "an agent write failed: {:?}",
        agent_report.cut
    );
    assert!(
        second_op.cut.is_none(),
        "an operator write failed after the restart: {:?}",
        second_op.cut
    );

    // One last operator write marks the end of the downstream queue.
    let (final_seq, _) = op
        .put_accepted(
            &id,
            &Write::new("settings", "final", json!({"mode": "done"})),
        )
        .await
        .unwrap();
    let op_acked: Vec<&(Write, u64)> = first_op.acked.iter().chain(&second_op.acked).collect();
    let seqs: Vec<u64> = op_acked.iter().map(|(_, s)| *s).collect();
    assert!(
        seqs.windows(2).all(|p| p[0] < p[1]) && seqs.last() < Some(&final_seq),
        "operator writes queued out of order: {seqs:?} then {final_seq}"
    );
    let status = wait_status(&api, "both directions to drain", |s| {
        s["connected"] == true && s["outbox_pending"] == 0 && s["down_applied_seq"] == final_seq
    })
    .await
    .unwrap();
    wait_row(&op, &id, "the downstream queue to drain", |r| {
        r["queue_pending"] == 0
    })
    .await
    .unwrap();

    let last = u64_of(&status, "outbox_last_seq");
    assert_eq!(
        last,
        agent_report.acked.len() as u64,
        "one outbox entry per agent write: {status}"
    );
    let row = op.known_row(&id).await.unwrap();
    assert_eq!(u64_of(&row, "up_applied"), last, "hub row {row}");
    assert_eq!(
        u64_of(&row, "changes_applied"),
        last,
        "each agent change applied exactly once: {row}"
    );

    let hub = Replica::Hub(op.clone(), id.clone());
    let at_agent = Replica::Agent(api.clone());
    // Agent records at the hub.
    let want = expecting(
        agent_report
            .acked
            .iter()
            .filter(|(w, _)| w.collection == "patients")
            .map(|(w, _)| (w.collection.clone(), w.key.clone(), w.fields.clone())),
    );
    let bad = mismatches(&hub, want).await;
    assert!(bad.is_empty(), "hub records: {}", summary(&bad));
    // Operator records of its own at the agent.
    let mut want: Vec<(String, String, Option<Value>)> = op_acked
        .iter()
        .filter(|(w, _)| w.key.starts_with('o'))
        .map(|(w, _)| (w.collection.clone(), w.key.clone(), Some(w.fields.clone())))
        .collect();
    want.push((
        "settings".into(),
        "final".into(),
        Some(json!({"mode": "done"})),
    ));
    let bad = mismatches(&at_agent, want).await;
    assert!(bad.is_empty(), "agent records: {}", summary(&bad));
    // Every settings key, including the cut-off write and the shared keys,
    // holds the same at both ends.
    let shared: BTreeSet<String> = (0..SHARED_KEYS).map(|j| format!("both{j}")).collect();
    let settings_keys = |writes: Vec<&Write>| -> BTreeSet<String> {
        writes
            .into_iter()
            .filter(|w| w.collection == "settings")
            .map(|w| w.key.clone())
            .collect()
    };
    let op_keys = settings_keys(op_acked.iter().map(|(w, _)| w).collect());
    let agent_keys = settings_keys(agent_report.acked.iter().map(|(w, _)| w).collect());
    assert!(
        shared.is_subset(&op_keys) && shared.is_subset(&agent_keys),
        "not every shared key was written from both sides: operator {op_keys:?}, agent {agent_keys:?}"
    );
    let mut keys = shared.clone();
    keys.extend(first_op.cut.iter().map(|(w, _)| w.key.clone()));
    keys.extend(op_acked.iter().map(|(w, _)| w.key.clone()));
    let mut both_sides = Vec::new();
    for key in &keys {
        let a = api.record("settings", key).await.unwrap();
        let h = op.record(&id, "settings", key).await.unwrap();
        assert_eq!(a, h, "settings/{key}: agent and hub disagree");
        if key.starts_with("both") {
            let fields: Map<String, Value> = a
                .and_then(|v| v.as_object().cloned())
                .unwrap_or_else(|| panic!("settings/{key} missing"));
            both_sides.push(format!("{key}={}", fields["mode"]));
        }
    }
    assert_clean_logs(&fleet, &agent);
    eprintln!(
        "two-way: {} agent writes, {} operator writes, shared keys {}; {:.1?}",
        agent_report.acked.len(),
        op_acked.len() + 1,
        both_sides.join(" "),
        started.elapsed()
    );
}

/// Neither the hub's nor the agent's log reports a broken invariant.
fn assert_clean_logs(fleet: &Fleet, agent: &TempAgent) {
    let hub = fleet.hub.stderr_log();
    let hub_problems = log_problems(&hub);
    assert!(
        hub_problems.is_empty(),
        "hub log:\n{}",
        hub_problems.join("\n")
    );
    let agent_log = agent.stderr_log();
    let agent_problems = log_problems(&agent_log);
    assert!(
        agent_problems.is_empty(),
        "agent {} log:\n{}",
        agent.id(),
        agent_problems.join("\n")
    );
}
