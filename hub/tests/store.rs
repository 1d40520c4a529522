//! Crate tests of the hub's redb store: upstream batches apply with their
//! watermark, re-applying is harmless, downstream queues are per agent, ordered,
//! and trimmed only by acknowledgement, and everything survives a reopen.

use fieldsync_hub::store::{HubStore, RedbHubStore, StoreError, Upstream};
use fieldsync_shared::{
    AgentId, Change, CollectionName, FieldName, Origin, RecordKey, RecordState, Seq, Stamp, Version,
};
use serde_json::json;

fn agent(id: &str) -> AgentId {
    AgentId::new(id).unwrap()
}

fn change(key: &str, field: &str, value: serde_json::Value, wall: u64, origin: &str) -> Change {
    let mut state = RecordState::default();
    let version = Version {
        stamp: Stamp::new(wall, 0),
        origin: Origin::new(origin).unwrap(),
    };
    let delta = state.write([(FieldName::new(field).unwrap(), Some(value))], &version);
    Change {
        collection: CollectionName::new("patients").unwrap(),
        key: RecordKey::new(key).unwrap(),
        state: delta,
    }
}

fn visible(store: &RedbHubStore, a: &AgentId, key: &str) -> Vec<(String, serde_json::Value)> {
    store
        .record(
            a,
            &CollectionName::new("patients").unwrap(),
            &RecordKey::new(key).unwrap(),
        )
        .unwrap()
        .map(|s| {
            s.visible()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn upstream_applies_with_its_watermark_and_reapplying_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbHubStore::open(dir.path()).unwrap();
    let a = agent("gw-1");
    let batch = [
        change("p1", "ward", json!(3), 10, "gw-1"),
        change("p1", "initials", json!("JD"), 11, "gw-1"),
    ];
    store.apply_upstream(&a, &batch, cur(2), 1_000).unwrap();
    let row = store.agent(&a).unwrap().unwrap();
    assert_eq!(row.up_applied, Seq(2));
    assert_eq!(row.last_seen_ms, Some(1_000));
    let before = visible(&store, &a, "p1");
    assert_eq!(
        before,
        [("initials".into(), json!("JD")), ("ward".into(), json!(3))]
    );
    // The same batch again is harmless: merge is idempotent. (The session
    // never plans a batch at or below the cursor; the store sets the cursor
    // it is given, since a resync may move it back to a restored sender's end.)
    store.apply_upstream(&a, &batch, cur(2), 2_000).unwrap();
    assert_eq!(visible(&store, &a, "p1"), before);
    assert_eq!(store.agent(&a).unwrap().unwrap().up_applied, Seq(2));
}

#[test]
fn a_group_applies_several_agents_and_consecutive_batches_in_one_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbHubStore::open(dir.path()).unwrap();
    let (a, b) = (agent("gw-a"), agent("gw-b"));
    let group = [
        Upstream {
            agent: a.clone(),
            changes: vec![change("k", "ward", json!(1), 10, "gw-a")],
            cursor: Some(cur(1)),
            snapshot: false,
        },
        Upstream {
            agent: b.clone(),
            changes: vec![change("k", "ward", json!(7), 10, "gw-b")],
            cursor: Some(cur(4)),
            snapshot: false,
        },
        // The same agent's next batch in the same group builds on the first.
        Upstream {
            agent: a.clone(),
            changes: vec![
                change("k", "ward", json!(2), 11, "gw-a"),
                change("j", "initials", json!("AB"), 11, "gw-a"),
            ],
            cursor: Some(cur(3)),
            snapshot: false,
        },
    ];
    store.apply_upstream_group(&group, 5_000).unwrap();
    drop(store);
    // All of it is there after a reopen. (A clean close would also persist a
    // non-durable commit; crash durability is what the SIGKILL tests in
    // tests/tests/hub_durability.rs check.)
    let store = RedbHubStore::open(dir.path()).unwrap();
    let row_a = store.agent(&a).unwrap().unwrap();
    assert_eq!((row_a.up_applied, row_a.changes_applied), (Seq(3), 3));
    let row_b = store.agent(&b).unwrap().unwrap();
    assert_eq!((row_b.up_applied, row_b.changes_applied), (Seq(4), 1));
    assert_eq!(visible(&store, &a, "k"), [("ward".into(), json!(2))]);
    assert_eq!(visible(&store, &a, "j"), [("initials".into(), json!("AB"))]);
    assert_eq!(visible(&store, &b, "k"), [("ward".into(), json!(7))]);
}

#[test]
fn agents_records_are_kept_apart() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbHubStore::open(dir.path()).unwrap();
    store
        .apply_upstream(
            &agent("a"),
            &[change("k", "ward", json!(1), 1, "a")],
            cur(1),
            1,
        )
        .unwrap();
    store
        .apply_upstream(
            &agent("b"),
            &[change("k", "ward", json!(2), 1, "b")],
            cur(1),
            1,
        )
        .unwrap();
    assert_eq!(
        visible(&store, &agent("a"), "k"),
        [("ward".into(), json!(1))]
    );
    assert_eq!(
        visible(&store, &agent("b"), "k"),
        [("ward".into(), json!(2))]
    );
    let ids: Vec<String> = store
        .agents()
        .unwrap()
        .into_iter()
        .map(|(id, _)| id.to_string())
        .collect();
    assert_eq!(ids, ["a", "b"]);
}

#[test]
fn downstream_queues_are_ordered_per_agent_and_trimmed_only_by_ack() {
    let dir = tempfile::tempdir().unwrap();
    let a = agent("a");
    let b = agent("b");
    {
        let store = RedbHubStore::open(dir.path()).unwrap();
        for i in 0..5 {
            let last = store
                .enqueue_downstream(
                    &a,
                    &[change(&format!("k{i}"), "mode", json!(i), 100 + i, "@hub")],
                    Stamp::new(100 + i, 0),
                )
                .unwrap();
            assert_eq!(last, Seq(i + 1));
        }
        store
            .enqueue_downstream(
                &b,
                &[change("x", "mode", json!("b"), 200, "@hub")],
                Stamp::new(200, 0),
            )
            .unwrap();
        let row = store.agent(&a).unwrap().unwrap();
        assert_eq!(
            (row.down_last, row.down_acked, row.queue_pending()),
            (Seq(5), Seq(0), 5)
        );
        // The hub's copy already holds the queued writes.
        assert_eq!(visible(&store, &a, "k4"), [("mode".into(), json!(4))]);
        store.ack_downstream(&a, mark(2), false).unwrap();
        assert_eq!(store.hlc_last().unwrap(), Stamp::new(200, 0));
    }
    // Everything survives a reopen.
    let store = RedbHubStore::open(dir.path()).unwrap();
    let rest: Vec<u64> = store
        .downstream(&a, Seq(0), 100, usize::MAX)
        .unwrap()
        .iter()
        .map(|(s, _)| s.0)
        .collect();
    assert_eq!(rest, [3, 4, 5]);
    assert_eq!(
        store.downstream(&a, Seq(4), 1, usize::MAX).unwrap()[0].0,
        Seq(4)
    );
    assert_eq!(
        store.downstream(&b, Seq(0), 100, usize::MAX).unwrap().len(),
        1
    );
    // An ack beyond the queue trims only what exists; an old ack changes nothing.
    store.ack_downstream(&a, mark(99), false).unwrap();
    store.ack_downstream(&a, mark(1), false).unwrap();
    let row = store.agent(&a).unwrap().unwrap();
    assert_eq!((row.down_acked, row.queue_pending()), (Seq(5), 0));
    assert!(store
        .downstream(&a, Seq(0), 100, usize::MAX)
        .unwrap()
        .is_empty());
    assert_eq!(
        store.downstream(&b, Seq(0), 100, usize::MAX).unwrap().len(),
        1,
        "b's queue is untouched"
    );
}

#[test]
fn an_unknown_schema_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(RedbHubStore::open(dir.path()).unwrap());
    {
        let db = redb::Database::create(dir.path().join("hub.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(redb::TableDefinition::<&str, u64>::new("meta"))
            .unwrap()
            .insert("schema_version", 7)
            .unwrap();
        txn.commit().unwrap();
    }
    assert!(matches!(
        RedbHubStore::open(dir.path()),
        Err(StoreError::SchemaVersion { found: 7, .. })
    ));
}

#[test]
fn reading_the_queue_stops_at_a_byte_budget_but_always_takes_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbHubStore::open(dir.path()).unwrap();
    let a = agent("a");
    let big = "x".repeat(400_000);
    for i in 0..3 {
        let c = change(&format!("k{i}"), "mode", json!(big), 10 + i, "@hub");
        store
            .enqueue_downstream(&a, &[c], Stamp::new(10 + i, 0))
            .unwrap();
    }
    let seqs = |max: usize| -> Vec<u64> {
        store
            .downstream(&a, Seq(0), 100, max)
            .unwrap()
            .iter()
            .map(|(s, _)| s.0)
            .collect()
    };
    assert_eq!(seqs(usize::MAX), [1, 2, 3]);
    assert_eq!(seqs(1 << 20), [1, 2]);
    assert_eq!(seqs(1), [1]);
}

fn cur(seq: u64) -> fieldsync_shared::Cursor {
    fieldsync_shared::Cursor {
        source: Some(fieldsync_shared::Incarnation(1)),
        at: mark(seq),
    }
}

fn mark(seq: u64) -> fieldsync_shared::Mark {
    fieldsync_shared::Mark {
        seq: Seq(seq),
        check: 0,
    }
}
