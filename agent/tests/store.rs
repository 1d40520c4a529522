//! Crate tests of the agent's store and group committer on real redb files:
//! one transaction per write and outbox entry, default-deny egress into the
//! outbox, clock state across restarts, and group commit under concurrency.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fieldsync_agent::store::{Store, StoreError, WriteOp, WriteOutcome};
use fieldsync_agent::writer::{WallClock, Writer, WriterSetup};
use fieldsync_shared::{
    AgentId, CollectionName, FieldName, FieldValue, Origin, Policy, RecordKey, Seq,
};
use serde_json::json;

const POLICY: &str = r#"
[collections.patients]
direction = "up"
sync = ["initials", "ward"]

[collections.orders]
direction = "down"
sync = ["dose"]
"#;

fn agent() -> AgentId {
    AgentId::new("gw-1").unwrap()
}

fn start(dir: &Path, clock: WallClock) -> (Writer, Store, std::thread::JoinHandle<()>) {
    let store = Store::open(dir, &agent()).unwrap();
    let (writer, handle) = Writer::start(WriterSetup {
        store: store.clone(),
        policy: Arc::new(Policy::parse(POLICY).unwrap()),
        origin: Origin::agent(&agent()),
        clock: fieldsync_agent::writer::CorrectedClock::new(clock, 0),
        max_drift_ms: 60_000,
    })
    .unwrap();
    (writer, store, handle)
}

fn fixed_clock(ms: u64) -> WallClock {
    Arc::new(move || ms)
}

fn put(collection: &str, key: &str, fields: &[(&str, serde_json::Value)]) -> WriteOp {
    WriteOp::Put {
        collection: CollectionName::new(collection).unwrap(),
        key: RecordKey::new(key).unwrap(),
        fields: fields
            .iter()
            .map(|(f, v)| {
                (
                    FieldName::new(*f).unwrap(),
                    (!v.is_null()).then(|| v.clone()),
                )
            })
            .collect(),
    }
}

fn delete(collection: &str, key: &str) -> WriteOp {
    WriteOp::Delete {
        collection: CollectionName::new(collection).unwrap(),
        key: RecordKey::new(key).unwrap(),
    }
}

fn field_names(store: &Store) -> Vec<Vec<String>> {
    store
        .outbox_entries(Seq(1), usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(_, c)| c.state.fields.keys().map(|f| f.to_string()).collect())
        .collect()
}

#[tokio::test]
async fn a_write_stores_everything_and_queues_only_permitted_fields() {
    let dir = tempfile::tempdir().unwrap();
    let (writer, store, _h) = start(dir.path(), fixed_clock(1_000));
    let out = writer
        .write(vec![put(
            "patients",
            "p1",
            &[
                ("initials", json!("JD")),
                ("ssn", json!("123")),
                ("ward", json!(3)),
            ],
        )])
        .await
        .unwrap();
    let WriteOutcome::Stored(view) = &out[0] else {
        panic!("{out:?}")
    };
    assert_eq!(view.fields.len(), 3);
    let stored = store
        .get(
            &CollectionName::new("patients").unwrap(),
            &RecordKey::new("p1").unwrap(),
        )
        .unwrap()
        .unwrap();
    assert_eq!(&stored, view);
    assert_eq!(field_names(&store), [["initials", "ward"]]);
    assert_eq!(store.outbox_len().unwrap(), 1);
    assert_eq!(store.outbox_bounds().unwrap().last, Seq(1));
}

#[tokio::test]
async fn local_only_writes_and_unnamed_collections_queue_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (writer, store, _h) = start(dir.path(), fixed_clock(1_000));
    writer
        .write(vec![put("patients", "p1", &[("ssn", json!("123"))])])
        .await
        .unwrap();
    writer
        .write(vec![put("diary", "d1", &[("text", json!("secret"))])])
        .await
        .unwrap();
    writer
        .write(vec![put("orders", "o1", &[("dose", json!(5))])])
        .await
        .unwrap(); // down-only
    writer.write(vec![delete("diary", "d1")]).await.unwrap();
    assert_eq!(store.outbox_len().unwrap(), 0);
    assert!(store
        .get(
            &CollectionName::new("diary").unwrap(),
            &RecordKey::new("d1").unwrap()
        )
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn field_and_record_deletes_are_tombstones_that_go_out() {
    let dir = tempfile::tempdir().unwrap();
    let (writer, store, _h) = start(dir.path(), fixed_clock(1_000));
    writer
        .write(vec![put(
            "patients",
            "p1",
            &[("ward", json!(3)), ("initials", json!("JD"))],
        )])
        .await
        .unwrap();
    writer
        .write(vec![put("patients", "p1", &[("ward", json!(null))])])
        .await
        .unwrap();
    let (c, k) = (
        CollectionName::new("patients").unwrap(),
        RecordKey::new("p1").unwrap(),
    );
    let state = store.get_state(&c, &k).unwrap().unwrap();
    assert_eq!(
        state.fields[&FieldName::new("ward").unwrap()].value,
        FieldValue::Deleted
    );
    assert_eq!(store.get(&c, &k).unwrap().unwrap().fields.len(), 1);

    assert_eq!(
        writer.write(vec![delete("patients", "p1")]).await.unwrap(),
        [WriteOutcome::Deleted]
    );
    assert!(store.get(&c, &k).unwrap().is_none());
    assert_eq!(
        writer.write(vec![delete("patients", "p1")]).await.unwrap(),
        [WriteOutcome::NotFound]
    );
    let entries = store.outbox_entries(Seq(1), 10).unwrap();
    assert_eq!(
        entries.len(),
        3,
        "put, field delete, record delete; nothing for the no-op delete"
    );
    assert!(entries[2].1.state.deleted.is_some());
}

#[tokio::test]
async fn stamps_stay_monotonic_across_restart_when_the_clock_steps_back() {
    let dir = tempfile::tempdir().unwrap();
    let first = {
        let (writer, store, handle) = start(dir.path(), fixed_clock(5_000_000));
        for i in 0..3 {
            writer
                .write(vec![put(
                    "patients",
                    &format!("p{i}"),
                    &[("ward", json!(i))],
                )])
                .await
                .unwrap();
        }
        let last = store.hlc_last().unwrap();
        drop((writer, store));
        handle.join().unwrap();
        last
    };
    assert_eq!(first.wall_ms, 5_000_000);
    // Restart with a wall clock an hour behind.
    let (writer, store, _h) = start(dir.path(), fixed_clock(5_000_000 - 3_600_000));
    writer
        .write(vec![put("patients", "p9", &[("ward", json!(9))])])
        .await
        .unwrap();
    let entries = store.outbox_entries(Seq(1), 10).unwrap();
    let stamps: Vec<_> = entries
        .iter()
        .map(|(_, c)| c.state.fields.values().next().unwrap().version.stamp)
        .collect();
    assert!(stamps.windows(2).all(|w| w[0] < w[1]), "{stamps:?}");
    assert!(store.hlc_last().unwrap() > first);
}

#[tokio::test]
async fn a_store_refuses_another_agent() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path(), &agent()).unwrap());
    let err = Store::open(dir.path(), &AgentId::new("gw-2").unwrap())
        .err()
        .unwrap();
    assert!(matches!(err, StoreError::WrongAgent { .. }), "{err}");
    assert!(err.to_string().contains("gw-1"));
}

#[tokio::test]
async fn a_store_refuses_an_unknown_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path(), &agent()).unwrap());
    {
        let db = redb::Database::create(dir.path().join("agent.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(redb::TableDefinition::<&str, u64>::new("meta"))
            .unwrap()
            .insert("schema_version", 99)
            .unwrap();
        txn.commit().unwrap();
    }
    let err = Store::open(dir.path(), &agent()).err().unwrap();
    assert!(
        matches!(err, StoreError::SchemaVersion { found: 99, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn a_multi_write_request_commits_atomically_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (writer, store, _h) = start(dir.path(), fixed_clock(1_000));
    let out = writer
        .write(vec![
            put("patients", "a", &[("ward", json!(1))]),
            put("patients", "a", &[("ward", json!(2))]),
            delete("patients", "zzz"),
        ])
        .await
        .unwrap();
    assert_eq!(out.len(), 3);
    assert_eq!(out[2], WriteOutcome::NotFound);
    let view = store
        .get(
            &CollectionName::new("patients").unwrap(),
            &RecordKey::new("a").unwrap(),
        )
        .unwrap()
        .unwrap();
    assert_eq!(view.fields[&FieldName::new("ward").unwrap()], json!(2));
    assert_eq!(store.outbox_len().unwrap(), 2);
}

/// Concurrent writers share commits: while one commit is in progress, every
/// request that arrives waits for the next one, which takes them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_are_group_committed() {
    let dir = tempfile::tempdir().unwrap();
    let released = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    // The committer reads the clock once per transaction, after taking what is
    // queued; the first read blocks until the test has queued everything else.
    let clock: WallClock = {
        let (released, calls) = (released.clone(), calls.clone());
        Arc::new(move || {
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                let deadline = Instant::now() + Duration::from_secs(30);
                while !released.load(Ordering::SeqCst) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            1_000
        })
    };
    let (writer, store, _h) = start(dir.path(), clock);
    const N: usize = 200;
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let w = writer.clone();
            tokio::spawn(async move {
                w.write(vec![put(
                    "patients",
                    &format!("k{i}"),
                    &[("ward", json!(i))],
                )])
                .await
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let waiting = || writer.queued() + writer.stats().in_commit.load(Ordering::Relaxed) as usize;
    while waiting() < N {
        assert!(
            Instant::now() < deadline,
            "only {} requests arrived",
            waiting()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    released.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(writer.stats().requests.load(Ordering::Relaxed), N as u64);
    // The first transaction took whatever had arrived when the committer woke
    // (one request, or all); everything else went into the second.
    let commits = writer.stats().commits.load(Ordering::Relaxed);
    assert!(
        (1..=2).contains(&commits),
        "{N} requests took {commits} commits"
    );
    assert_eq!(store.outbox_len().unwrap(), N as u64);
}

#[tokio::test]
async fn reading_the_outbox_stops_at_a_byte_budget_but_always_takes_one() {
    let dir = tempfile::tempdir().unwrap();
    let (writer, store, _h) = start(dir.path(), fixed_clock(1_000));
    let big = "x".repeat(400_000);
    for i in 0..3 {
        writer
            .write(vec![put(
                "patients",
                &format!("k{i}"),
                &[("initials", json!(big))],
            )])
            .await
            .unwrap();
    }
    let seqs = |max: usize| -> Vec<u64> {
        store
            .outbox_batch(Seq(1), 100, max)
            .unwrap()
            .iter()
            .map(|(s, _)| s.0)
            .collect()
    };
    assert_eq!(seqs(usize::MAX), [1, 2, 3]);
    assert_eq!(seqs(1 << 20), [1, 2]);
    assert_eq!(seqs(1), [1]);
}
