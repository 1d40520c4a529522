//! The migration of a version-1 redb hub store to protocol v2. (The v2 state
//! itself, on any backend — incarnation, cursors with their source and check,
//! identity record, hello notes, trim marks, snapshot reads — is tested by the
//! conformance suite, run on redb in `store.rs`.)

use fieldsync_hub::store::{HubStore, RedbHubStore, SCHEMA_VERSION};
use fieldsync_shared::session::Identity;
use fieldsync_shared::{AgentId, Seq};

fn agent(id: &str) -> AgentId {
    AgentId::new(id).unwrap()
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
