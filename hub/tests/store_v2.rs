//! The hub store's protocol-v2 state on real redb files: its incarnation,
//! per-agent cursors with their source and check, the identity record and
//! hello notes, the downstream trim mark, snapshot reads that stay inside one
//! agent's records, and the migration of a version-1 store.

use fieldsync_hub::store::{HelloNote, HubStore, RedbHubStore, Upstream, SCHEMA_VERSION};
use fieldsync_shared::session::Identity;
use fieldsync_shared::{
    AgentId, Change, CollectionName, Cursor, FieldName, Incarnation, Mark, Origin, RecordKey,
    RecordState, Seq, Stamp, Version,
};
use serde_json::json;

fn agent(id: &str) -> AgentId {
    AgentId::new(id).unwrap()
}

fn change(key: &str, value: i64, origin: &Origin) -> Change {
    let mut state = RecordState::default();
    let version = Version {
        stamp: Stamp::new(1_000 + value as u64, 0),
        origin: origin.clone(),
    };
    let delta = state.write(
        [(FieldName::new("threshold").unwrap(), Some(json!(value)))],
        &version,
    );
    Change {
        collection: CollectionName::new("settings").unwrap(),
        key: RecordKey::new(key).unwrap(),
        state: delta,
    }
}

#[test]
fn the_incarnation_is_drawn_once_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let first = RedbHubStore::open(dir.path())
        .unwrap()
        .incarnation()
        .unwrap();
    assert_ne!(first.0, 0);
    assert_eq!(
        RedbHubStore::open(dir.path())
            .unwrap()
            .incarnation()
            .unwrap(),
        first
    );
}

#[test]
fn cursors_identity_and_trim_marks_persist_per_agent() {
    let dir = tempfile::tempdir().unwrap();
    let a = agent("gw-a");
    let origin = Origin::agent(&a);
    {
        let store = RedbHubStore::open(dir.path()).unwrap();
        let cursor = Cursor {
            source: Some(Incarnation(0xa1)),
            at: Mark {
                seq: Seq(2),
                check: 0xc2,
            },
        };
        store
            .apply_upstream_group(
                &[
                    Upstream {
                        agent: a.clone(),
                        changes: vec![change("s1", 1, &origin)],
                        cursor: None,
                        snapshot: true,
                    },
                    Upstream {
                        agent: a.clone(),
                        changes: vec![change("s2", 2, &origin)],
                        cursor: Some(cursor),
                        snapshot: true,
                    },
                ],
                5_000,
            )
            .unwrap();
        let identity = Identity {
            current: Some(Incarnation(0xa1)),
            retired: vec![Incarnation(0xa0)],
        };
        store
            .hello(
                &a,
                6_000,
                &HelloNote {
                    identity: Some(identity),
                    clock_skew_ms: Some(-42),
                    conflict: true,
                },
            )
            .unwrap();
        let last = store
            .enqueue_downstream(
                &a,
                &[change("s3", 3, &Origin::hub("hub").unwrap())],
                Stamp::new(9, 0),
            )
            .unwrap();
        assert_eq!(last, Seq(1));
        assert!(store.downstream_entry(&a, Seq(1)).unwrap().is_some());
        store
            .ack_downstream(
                &a,
                Mark {
                    seq: Seq(1),
                    check: 0xd1,
                },
                true,
            )
            .unwrap();
        assert!(store.downstream_entry(&a, Seq(1)).unwrap().is_none());
        // A durable commit after the lazy ones makes them durable too.
        store
            .enqueue_downstream(
                &a,
                &[change("s4", 4, &Origin::hub("hub").unwrap())],
                Stamp::new(10, 0),
            )
            .unwrap();
    }
    let store = RedbHubStore::open(dir.path()).unwrap();
    let row = store.agent(&a).unwrap().unwrap();
    assert_eq!(row.up_cursor().source, Some(Incarnation(0xa1)));
    assert_eq!(
        row.up_cursor().at,
        Mark {
            seq: Seq(2),
            check: 0xc2
        }
    );
    assert_eq!(row.changes_applied, 0, "snapshot records are not entries");
    assert_eq!(row.resyncs, 2, "one received (last part), one sent (trim)");
    assert_eq!(row.identity.current, Some(Incarnation(0xa1)));
    assert_eq!(row.identity.retired, [Incarnation(0xa0)]);
    assert_eq!((row.clock_skew_ms, row.identity_conflicts), (Some(-42), 1));
    assert_eq!(
        row.down_acked_mark(),
        Mark {
            seq: Seq(1),
            check: 0xd1
        }
    );
    assert_eq!((row.down_last, row.queue_pending()), (Seq(2), 1));
}

#[test]
fn snapshot_reads_page_through_one_agents_records_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbHubStore::open(dir.path()).unwrap();
    let hub = Origin::hub("hub").unwrap();
    for id in ["gw-a", "gw-b", "gw-c"] {
        let changes: Vec<Change> = (0..10).map(|i| change(&format!("k{i}"), i, &hub)).collect();
        store
            .enqueue_downstream(&agent(id), &changes, Stamp::new(20, 0))
            .unwrap();
    }
    let b = agent("gw-b");
    let mut keys = Vec::new();
    let mut after = None;
    loop {
        let (page, next) = store
            .records_after(&b, after.as_ref(), 4, usize::MAX)
            .unwrap();
        assert!(page.len() <= 4);
        keys.extend(page.into_iter().map(|c| c.key.to_string()));
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let expected: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
    assert_eq!(keys, expected);
    let (none, next) = store
        .records_after(&agent("gw-unknown"), None, 4, usize::MAX)
        .unwrap();
    assert!(none.is_empty() && next.is_none());
}

#[test]
fn a_version_1_store_is_migrated_and_its_rows_follow_no_incarnation() {
    let dir = tempfile::tempdir().unwrap();
    let a = agent("gw-a");
    {
        // A version-1 row: only the five fields schema 1 wrote.
        #[derive(serde::Serialize)]
        struct RowV1 {
            up_applied: Seq,
            down_last: Seq,
            down_acked: Seq,
            last_seen_ms: Option<u64>,
            changes_applied: u64,
        }
        let db = redb::Database::create(dir.path().join("hub.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn
                .open_table(redb::TableDefinition::<&str, u64>::new("meta"))
                .unwrap();
            meta.insert("schema_version", 1).unwrap();
            let mut agents = txn
                .open_table(redb::TableDefinition::<&str, &[u8]>::new("agents"))
                .unwrap();
            let row = RowV1 {
                up_applied: Seq(12),
                down_last: Seq(3),
                down_acked: Seq(2),
                last_seen_ms: Some(77),
                changes_applied: 12,
            };
            let bytes = fieldsync_shared::codec::to_bytes(&row).unwrap();
            agents.insert("gw-a", bytes.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let store = RedbHubStore::open(dir.path()).unwrap();
    let incarnation = store.incarnation().unwrap();
    assert_ne!(incarnation.0, 0);
    let row = store.agent(&a).unwrap().unwrap();
    assert_eq!((row.up_applied, row.changes_applied), (Seq(12), 12));
    assert_eq!(row.up_cursor().source, None, "the first link resyncs");
    assert_eq!(row.identity, Identity::default());
    drop(store);
    // Migrated once: the incarnation stays.
    let again = RedbHubStore::open(dir.path()).unwrap();
    assert_eq!(again.incarnation().unwrap(), incarnation);
    assert_eq!(SCHEMA_VERSION, 2);
}
