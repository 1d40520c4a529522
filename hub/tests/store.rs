//! Crate tests of the hub's redb store: the [`HubStore`] conformance suite
//! (`fieldsync_hub::store::conformance`) run on redb files, and what only the
//! redb backend has: its schema version row, its file lock, its open errors.
//! (The v1→v2 migration of a redb file is in `store_v2.rs`.)

use std::error::Error as _;

use fieldsync_hub::store::{HubStore, RedbHubStore, StoreError, SCHEMA_VERSION};

fieldsync_hub::hub_store_suite!(|| {
    let dir = tempfile::tempdir().unwrap();
    move || RedbHubStore::open(dir.path()).unwrap()
});

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
    let err = RedbHubStore::open(dir.path()).err().unwrap();
    assert!(matches!(
        err,
        StoreError::SchemaVersion {
            found: 7,
            supported: SCHEMA_VERSION,
            ..
        }
    ));
    let file = dir.path().join("hub.redb");
    assert_eq!(
        err.to_string(),
        format!(
            "store {} has schema version 7; this build reads version {SCHEMA_VERSION}",
            file.display()
        )
    );
}

#[test]
fn a_store_open_in_another_handle_is_refused_as_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let first = RedbHubStore::open(dir.path()).unwrap();
    let err = RedbHubStore::open(dir.path()).err().unwrap();
    let file = dir.path().join("hub.redb");
    assert!(
        matches!(&err, StoreError::InUse { store } if *store == file.display().to_string()),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );
    // The first handle keeps working, and the store opens once it is closed.
    assert_ne!(first.incarnation().unwrap().0, 0);
    drop(first);
    RedbHubStore::open(dir.path()).unwrap();
}

#[test]
fn a_store_that_cannot_be_opened_is_named_with_its_cause() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hub.redb");
    std::fs::create_dir(&file).unwrap();
    let err = RedbHubStore::open(dir.path()).err().unwrap();
    assert!(matches!(&err, StoreError::Open { .. }), "{err:?}");
    let cause = err.source().expect("the backend's error is the source");
    assert_eq!(
        err.to_string(),
        format!("cannot open store {}: {cause}", file.display())
    );
}
