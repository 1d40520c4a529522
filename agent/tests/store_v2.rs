//! The agent store's protocol-v2 state on real redb files: the incarnation
//! (kept across restarts, new after a wipe, drawn for a migrated v1 store), the
//! outbox trim mark with its check, snapshot reads in pages, and the clock
//! re-stamp transaction that repairs writes made while the clock ran ahead.

use std::path::Path;
use std::sync::Arc;

use fieldsync_agent::store::{Store, StoreError, WriteOp, SCHEMA_VERSION};
use fieldsync_agent::writer::{CorrectedClock, WallClock, Writer, WriterSetup};
use fieldsync_shared::{
    AgentId, CollectionName, Cursor, FieldName, Incarnation, Mark, Origin, Policy, RecordKey, Seq,
};
use serde_json::json;

const POLICY: &str = r#"
[collections.settings]
direction = "both"
sync = ["threshold"]
"#;

const DAY: u64 = 86_400_000;

fn agent() -> AgentId {
    AgentId::new("gw-1").unwrap()
}

fn start(store: &Store, clock: CorrectedClock) -> (Writer, std::thread::JoinHandle<()>) {
    Writer::start(WriterSetup {
        store: store.clone(),
        policy: Arc::new(Policy::parse(POLICY).unwrap()),
        origin: Origin::agent(&agent()),
        clock,
        max_drift_ms: 60_000,
    })
    .unwrap()
}

fn fixed(ms: u64) -> WallClock {
    Arc::new(move || ms)
}

fn put(key: &str, value: i64) -> WriteOp {
    WriteOp::Put {
        collection: CollectionName::new("settings").unwrap(),
        key: RecordKey::new(key).unwrap(),
        fields: vec![(FieldName::new("threshold").unwrap(), Some(json!(value)))],
    }
}

fn open(dir: &Path) -> Store {
    Store::open(dir, &agent()).unwrap()
}

#[test]
fn the_incarnation_survives_a_restart_and_a_wiped_store_gets_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path()).incarnation().unwrap();
    assert_ne!(first.0, 0);
    assert_eq!(open(dir.path()).incarnation().unwrap(), first);
    std::fs::remove_dir_all(dir.path()).unwrap();
    let after_wipe = open(dir.path()).incarnation().unwrap();
    assert_ne!(after_wipe, first);
}

#[test]
fn a_version_1_store_is_migrated_with_an_incarnation_and_a_cursor_that_follows_no_hub() {
    let dir = tempfile::tempdir().unwrap();
    {
        // A store as version 1 wrote it: schema 1, its agent, a downstream
        // cursor and an outbox position.
        let db = redb::Database::create(dir.path().join("agent.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn
                .open_table(redb::TableDefinition::<&str, u64>::new("meta"))
                .unwrap();
            meta.insert("schema_version", 1).unwrap();
            meta.insert("down_applied_seq", 7).unwrap();
            meta.insert("outbox_last_seq", 3).unwrap();
            meta.insert("outbox_acked_seq", 3).unwrap();
            let mut identity = txn
                .open_table(redb::TableDefinition::<&str, &str>::new("identity"))
                .unwrap();
            identity.insert("agent_id", "gw-1").unwrap();
        }
        txn.commit().unwrap();
    }
    let store = open(dir.path());
    assert_ne!(store.incarnation().unwrap().0, 0);
    let down = store.down_cursor().unwrap();
    assert_eq!(down.source, None, "the first link resyncs it");
    assert_eq!(down.at.seq, Seq(7));
    assert_eq!(store.outbox_bounds().unwrap().acked.seq, Seq(3));
    let incarnation = store.incarnation().unwrap();
    drop(store);
    assert_eq!(open(dir.path()).incarnation().unwrap(), incarnation);
}

#[test]
fn a_store_of_an_unknown_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = redb::Database::create(dir.path().join("agent.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(redb::TableDefinition::<&str, u64>::new("meta"))
            .unwrap()
            .insert("schema_version", SCHEMA_VERSION + 1)
            .unwrap();
        txn.commit().unwrap();
    }
    match Store::open(dir.path(), &agent()) {
        Err(StoreError::SchemaVersion { found, .. }) => assert_eq!(found, SCHEMA_VERSION + 1),
        other => panic!("expected a schema error, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn the_trim_mark_keeps_its_check_and_snapshots_page_through_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (writer, _h) = start(&store, CorrectedClock::new(fixed(1_000 * DAY), 0));
    for i in 0..25 {
        writer
            .write(vec![put(&format!("k{i:02}"), i)])
            .await
            .unwrap();
    }
    store
        .trim_outbox(
            Mark {
                seq: Seq(10),
                check: 0xfeed,
            },
            false,
        )
        .unwrap();
    let bounds = store.outbox_bounds().unwrap();
    assert_eq!(
        bounds.acked,
        Mark {
            seq: Seq(10),
            check: 0xfeed
        }
    );
    assert_eq!(bounds.last, Seq(25));
    assert!(store.outbox_entry(Seq(10)).unwrap().is_none());
    assert!(store.outbox_entry(Seq(11)).unwrap().is_some());

    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let (page, next) = store.records_after(after.as_ref(), 7, usize::MAX).unwrap();
        assert!(page.len() <= 7);
        seen.extend(page.into_iter().map(|c| c.key.to_string()));
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let expected: Vec<String> = (0..25).map(|i| format!("k{i:02}")).collect();
    assert_eq!(seen, expected, "every record once, in order");
}

#[tokio::test]
async fn writes_made_while_the_clock_ran_ahead_are_restamped_once_the_offset_is_known() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let now = 1_000 * DAY;
    let skew = 300 * DAY;
    // The device clock reads 300 days ahead and nothing corrects it yet.
    let clock = CorrectedClock::new(fixed(now + skew), 0);
    let (writer, _h) = start(&store, clock.clone());
    writer.write(vec![put("s1", 1)]).await.unwrap();
    writer.write(vec![put("s2", 2)]).await.unwrap();
    let stamp = |key: &str| {
        store
            .get_state(
                &CollectionName::new("settings").unwrap(),
                &RecordKey::new(key).unwrap(),
            )
            .unwrap()
            .unwrap()
            .fields
            .values()
            .next()
            .unwrap()
            .version
            .stamp
    };
    let (s1_before, s2_before) = (stamp("s1"), stamp("s2"));
    assert!(s1_before.wall_ms >= now + skew);

    // The store follows a hub's downstream stream.
    let follows = Cursor {
        source: Some(Incarnation(5)),
        at: Mark::default(),
    };
    store
        .apply_downstream(
            &[],
            Some(follows),
            false,
            &fieldsync_shared::Hlc::new(60_000),
            60_000,
        )
        .unwrap();
    assert_eq!(store.down_cursor().unwrap(), follows);

    // Nothing beyond the bound of the (uncorrected) clock: nothing to do.
    assert_eq!(writer.restamp(0).await.unwrap().entries, 0);

    // The hub's welcome tells the agent its clock is 300 days ahead.
    clock.set_offset_ms(-(skew as i64));
    let done = writer.restamp(-(skew as i64)).await.unwrap();
    assert_eq!((done.entries, done.records), (2, 2));
    assert_eq!(
        store.down_cursor().unwrap().source,
        None,
        "records changed: the downstream resyncs"
    );
    let (s1, s2) = (stamp("s1"), stamp("s2"));
    assert!(s1.wall_ms <= now && s1.wall_ms + 1_000 >= now, "{s1:?}");
    assert!(s1 < s2, "re-stamped writes keep their order");
    let entries = store.outbox_entries(Seq(1), 10).unwrap();
    let queued: Vec<_> = entries
        .iter()
        .map(|(_, c)| c.state.max_version().unwrap().stamp)
        .collect();
    assert_eq!(queued, [s1, s2], "outbox entries carry the same stamps");

    // The clock no longer issues stamps from the future: a new write sorts
    // after the re-stamped ones, at real time.
    writer.write(vec![put("s1", 3)]).await.unwrap();
    let s3 = stamp("s1");
    assert!(s3 > s2 && s3.wall_ms <= now + 1, "{s3:?}");
    assert!(s3 < s1_before);
    // A second pass finds nothing left.
    assert_eq!(writer.restamp(0).await.unwrap().entries, 0);
    let _ = s2_before;
}
