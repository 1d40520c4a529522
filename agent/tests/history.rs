//! The agent store's version history on real redb files: a local write is a
//! version in the same transaction (who, why, each synced field before and
//! after; never a local-only field), both bounds drop the oldest versions and
//! count them, and versions and counters survive a restart.

use std::path::Path;

use fieldsync_agent::store::{Store, WriteOp};
use fieldsync_shared::history::{HistoryLimits, MIN_MAX_BYTES};
use fieldsync_shared::{AgentId, CollectionName, FieldName, Hlc, Origin, Policy, RecordKey};
use serde_json::{json, Value};

const POLICY: &str = r#"
[collections.settings]
direction = "both"
sync = ["threshold", "blob"]
history = 3
"#;

fn agent() -> AgentId {
    AgentId::new("gw-1").unwrap()
}

fn policy() -> Policy {
    Policy::parse(POLICY).unwrap()
}

fn open(dir: &Path, max_bytes: u64) -> Store {
    Store::open(dir, &agent())
        .unwrap()
        .with_history(HistoryLimits::new(policy(), max_bytes))
}

fn put(key: &str, fields: Value) -> WriteOp {
    WriteOp::Put {
        collection: CollectionName::new("settings").unwrap(),
        key: RecordKey::new(key).unwrap(),
        fields: fields
            .as_object()
            .unwrap()
            .iter()
            .map(|(f, v)| {
                (
                    FieldName::new(f).unwrap(),
                    (!v.is_null()).then(|| v.clone()),
                )
            })
            .collect(),
    }
}

/// Commits each op as its own request, at wall time `now_ms`.
fn commit(store: &Store, hlc: &mut Hlc, ops: Vec<WriteOp>, now_ms: u64) {
    let requests: Vec<Vec<WriteOp>> = ops.into_iter().map(|op| vec![op]).collect();
    store
        .commit_writes(&requests, hlc, &Origin::agent(&agent()), &policy(), now_ms)
        .unwrap();
}

fn versions(store: &Store, key: &str) -> Vec<(u64, Value)> {
    store
        .history(
            &CollectionName::new("settings").unwrap(),
            &RecordKey::new(key).unwrap(),
            100,
        )
        .unwrap()
        .into_iter()
        .map(|(n, e)| (n, serde_json::to_value(e).unwrap()))
        .collect()
}

#[test]
fn a_local_write_is_a_version_of_its_synced_fields_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), MIN_MAX_BYTES);
    let mut hlc = Hlc::new(1_000);
    commit(
        &store,
        &mut hlc,
        vec![put("s1", json!({"threshold": 5, "pin": "1234"}))],
        1_000,
    );
    commit(
        &store,
        &mut hlc,
        vec![put("s1", json!({"threshold": 7}))],
        2_000,
    );
    // Only the local-only field changes: nothing a reader of history sees.
    commit(
        &store,
        &mut hlc,
        vec![put("s1", json!({"pin": "9999"}))],
        3_000,
    );

    let got = versions(&store, "s1");
    assert_eq!(got.len(), 2, "{got:?}");
    let (newest, first) = (&got[0].1, &got[1].1);
    assert!(got[0].0 > got[1].0, "numbers increase");
    assert_eq!(newest["writer"]["by"], "gw-1");
    assert_eq!(newest["writer"]["cause"]["kind"], "local");
    assert_eq!(newest["at_ms"], 2_000);
    assert_eq!(
        newest["changed"]["threshold"],
        json!({"before": 5, "after": 7})
    );
    assert_eq!(
        first["changed"],
        json!({"threshold": {"before": null, "after": 5}})
    );
    let text = serde_json::to_string(&got).unwrap();
    assert!(!text.contains("1234") && !text.contains("pin"), "{text}");
}

#[test]
fn the_count_bound_drops_a_records_oldest_versions_and_counts_them_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), MIN_MAX_BYTES);
        let mut hlc = Hlc::new(1_000);
        for n in 0..5 {
            commit(
                &store,
                &mut hlc,
                vec![put("s1", json!({"threshold": n}))],
                1_000 + n,
            );
        }
        // Another record's versions are its own.
        commit(
            &store,
            &mut hlc,
            vec![put("s2", json!({"threshold": 1}))],
            2_000,
        );
        let stats = store.history_stats().unwrap();
        assert_eq!(stats.dropped, 2);
        assert!(stats.bytes > 0);
    }
    let store = open(dir.path(), MIN_MAX_BYTES);
    let got = versions(&store, "s1");
    let afters: Vec<&Value> = got
        .iter()
        .map(|(_, e)| &e["changed"]["threshold"]["after"])
        .collect();
    assert_eq!(afters, [&json!(4), &json!(3), &json!(2)], "the newest 3");
    assert_eq!(versions(&store, "s2").len(), 1);
    assert_eq!(store.history_stats().unwrap().dropped, 2);
}

#[test]
fn the_byte_bound_drops_the_stores_oldest_versions_first_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), MIN_MAX_BYTES);
    let mut hlc = Hlc::new(1_000);
    // Each version holds ~300 KB; the bound (~2 MB) keeps about six.
    let blob = "x".repeat(300_000);
    for n in 0..10u64 {
        let key = format!("r{n}");
        commit(
            &store,
            &mut hlc,
            vec![put(&key, json!({"blob": blob}))],
            1_000 + n,
        );
        let stats = store.history_stats().unwrap();
        assert!(
            stats.bytes <= MIN_MAX_BYTES,
            "{} > {MIN_MAX_BYTES}",
            stats.bytes
        );
    }
    let stats = store.history_stats().unwrap();
    assert!(stats.dropped >= 3, "{stats:?}");
    let kept: Vec<u64> = (0..10)
        .filter(|n| !versions(&store, &format!("r{n}")).is_empty())
        .collect();
    assert_eq!(
        kept.len() as u64 + stats.dropped,
        10,
        "every version kept or counted"
    );
    let oldest_kept = 10 - kept.len() as u64;
    assert_eq!(
        kept,
        (oldest_kept..10).collect::<Vec<_>>(),
        "oldest out first"
    );
}

#[test]
fn a_store_opened_without_limits_keeps_no_history() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &agent()).unwrap();
    let mut hlc = Hlc::new(1_000);
    commit(
        &store,
        &mut hlc,
        vec![put("s1", json!({"threshold": 1}))],
        1_000,
    );
    assert!(versions(&store, "s1").is_empty());
    assert_eq!(store.history_stats().unwrap().bytes, 0);
}
