//! The [`HubStore`] conformance suite: the store's contract as tests written
//! once over the trait, so every backend runs the same ones. Upstream batches
//! apply with their cursor and re-applying is harmless, a group commits several
//! agents and batches at once, agents' records are kept apart, downstream
//! queues are per agent, ordered, read within a byte budget and trimmed only by
//! acknowledgement, the incarnation, cursors, identity record, hello notes and
//! trim marks persist, snapshot reads page through one agent's records only,
//! and all of it survives a reopen.
//!
//! Test support, not hub API: it is compiled with the library (generic, so it
//! costs the binary nothing) so that this crate's tests and a backend in
//! another crate run it with no feature flag. A backend's test file adds one
//! invocation of `fieldsync_hub::hub_store_suite!`, given a factory
//! called once per test that returns the test's `open`: the first call opens
//! an empty store, a later one (after the previous handle was dropped) the same
//! store again, as a hub restart would. For redb (`hub/tests/store.rs`):
//!
//! ```ignore
//! fieldsync_hub::hub_store_suite!(|| {
//!     let dir = tempfile::tempdir().unwrap();
//!     move || RedbHubStore::open(dir.path()).unwrap()
//! });
//! ```
//!
//! Tests of one backend's own format (file locks, migrations, schema rows)
//! stay beside that backend.

use fieldsync_shared::history::{Cause, HistoryLimits, Writer};
use fieldsync_shared::session::Identity;
use fieldsync_shared::Policy;
use fieldsync_shared::{
    AgentId, Change, CollectionName, Cursor, FieldName, Incarnation, Mark, Origin, RecordKey,
    RecordState, Seq, Stamp, Version,
};
use serde_json::json;

use super::{HelloNote, HubStore, Upstream};
use crate::events::{EventFilter, EventKind};
use crate::labels::Labels;
use crate::webhooks::{Attempt, Endpoint, Outcome, Progress};

/// Expands to one `#[test]` per suite test for the backend that `$factory`
/// opens (see the module docs of `store::conformance`). Every `pub fn`
/// test below must be listed here (a unit test checks it).
#[macro_export]
#[doc(hidden)]
macro_rules! hub_store_suite {
    ($factory:expr) => {
        $crate::hub_store_suite!(@each $factory;
            // suite: begin
            upstream_applies_with_its_watermark_and_reapplying_changes_nothing,
            a_group_applies_several_agents_and_consecutive_batches_in_one_commit,
            agents_records_are_kept_apart,
            downstream_queues_are_ordered_per_agent_and_trimmed_only_by_ack,
            reading_the_queue_stops_at_a_byte_budget_but_always_takes_one,
            the_incarnation_is_drawn_once_and_kept,
            cursors_identity_and_trim_marks_persist_per_agent,
            snapshot_reads_page_through_one_agents_records_only,
            record_changes_are_logged_with_their_commit_once_in_order,
            link_events_become_readable_once_durable_and_the_log_trims_from_the_old_end,
            webhook_endpoints_keep_progress_per_epoch_and_attempts_newest_first,
            a_group_enqueue_queues_for_several_agents_in_one_commit,
            labels_are_kept_on_known_agents_and_survive_other_updates,
            history_keeps_each_records_versions_within_both_bounds,
            // suite: end
        );
    };
    (@each $factory:expr; $($name:ident,)*) => {$(
        #[test]
        fn $name() {
            let open = ($factory)();
            $crate::store::conformance::$name(&open);
        }
    )*};
}

fn agent(id: &str) -> AgentId {
    AgentId::new(id).unwrap()
}

/// A write of `field` in `patients/key` stamped at `wall` by `origin`.
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

/// A write of `threshold = value` in `settings/key`, stamped `1000 + value`.
fn setting(key: &str, value: i64, origin: &Origin) -> Change {
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

fn visible<S: HubStore>(store: &S, a: &AgentId, key: &str) -> Vec<(String, serde_json::Value)> {
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

fn cur(seq: u64) -> Cursor {
    Cursor {
        source: Some(Incarnation(1)),
        at: mark(seq),
    }
}

fn mark(seq: u64) -> Mark {
    Mark {
        seq: Seq(seq),
        check: 0,
    }
}

pub fn upstream_applies_with_its_watermark_and_reapplying_changes_nothing<S: HubStore>(
    open: &dyn Fn() -> S,
) {
    let store = open();
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

pub fn a_group_applies_several_agents_and_consecutive_batches_in_one_commit<S: HubStore>(
    open: &dyn Fn() -> S,
) {
    let store = open();
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
    let store = open();
    let row_a = store.agent(&a).unwrap().unwrap();
    assert_eq!((row_a.up_applied, row_a.changes_applied), (Seq(3), 3));
    let row_b = store.agent(&b).unwrap().unwrap();
    assert_eq!((row_b.up_applied, row_b.changes_applied), (Seq(4), 1));
    assert_eq!(visible(&store, &a, "k"), [("ward".into(), json!(2))]);
    assert_eq!(visible(&store, &a, "j"), [("initials".into(), json!("AB"))]);
    assert_eq!(visible(&store, &b, "k"), [("ward".into(), json!(7))]);
}

pub fn agents_records_are_kept_apart<S: HubStore>(open: &dyn Fn() -> S) {
    let store = open();
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

pub fn downstream_queues_are_ordered_per_agent_and_trimmed_only_by_ack<S: HubStore>(
    open: &dyn Fn() -> S,
) {
    let a = agent("a");
    let b = agent("b");
    {
        let store = open();
        for i in 0..5 {
            let last = store
                .enqueue_downstream(
                    &a,
                    &[change(&format!("k{i}"), "mode", json!(i), 100 + i, "@hub")],
                    Stamp::new(100 + i, 0),
                    5_000,
                )
                .unwrap();
            assert_eq!(last, Seq(i + 1));
        }
        store
            .enqueue_downstream(
                &b,
                &[change("x", "mode", json!("b"), 200, "@hub")],
                Stamp::new(200, 0),
                5_000,
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
    let store = open();
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

pub fn reading_the_queue_stops_at_a_byte_budget_but_always_takes_one<S: HubStore>(
    open: &dyn Fn() -> S,
) {
    let store = open();
    let a = agent("a");
    let big = "x".repeat(400_000);
    for i in 0..3 {
        let c = change(&format!("k{i}"), "mode", json!(big), 10 + i, "@hub");
        store
            .enqueue_downstream(&a, &[c], Stamp::new(10 + i, 0), 5_000)
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

pub fn the_incarnation_is_drawn_once_and_kept<S: HubStore>(open: &dyn Fn() -> S) {
    let first = open().incarnation().unwrap();
    assert_ne!(first.0, 0);
    assert_eq!(open().incarnation().unwrap(), first);
}

pub fn cursors_identity_and_trim_marks_persist_per_agent<S: HubStore>(open: &dyn Fn() -> S) {
    let a = agent("gw-a");
    let origin = Origin::agent(&a);
    {
        let store = open();
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
                        changes: vec![setting("s1", 1, &origin)],
                        cursor: None,
                        snapshot: true,
                    },
                    Upstream {
                        agent: a.clone(),
                        changes: vec![setting("s2", 2, &origin)],
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
                &[setting("s3", 3, &Origin::hub("hub").unwrap())],
                Stamp::new(9, 0),
                5_000,
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
                &[setting("s4", 4, &Origin::hub("hub").unwrap())],
                Stamp::new(10, 0),
                5_000,
            )
            .unwrap();
    }
    let store = open();
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

pub fn snapshot_reads_page_through_one_agents_records_only<S: HubStore>(open: &dyn Fn() -> S) {
    let store = open();
    let hub = Origin::hub("hub").unwrap();
    for id in ["gw-a", "gw-b", "gw-c"] {
        let changes: Vec<Change> = (0..10)
            .map(|i| setting(&format!("k{i}"), i, &hub))
            .collect();
        store
            .enqueue_downstream(&agent(id), &changes, Stamp::new(20, 0), 5_000)
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

pub fn record_changes_are_logged_with_their_commit_once_in_order<S: HubStore>(
    open: &dyn Fn() -> S,
) {
    let store = open();
    let a = agent("gw-1");
    let batch = [
        change("p1", "ward", json!(3), 10, "gw-1"),
        change("p2", "ward", json!(4), 11, "gw-1"),
    ];
    store.apply_upstream(&a, &batch, cur(2), 1_000).unwrap();
    // A re-sent batch changes nothing, so it logs nothing.
    store.apply_upstream(&a, &batch, cur(2), 2_000).unwrap();
    let hub = Origin::hub("hub").unwrap();
    store
        .enqueue_downstream(&a, &[setting("p1", 7, &hub)], Stamp::new(20, 0), 5_000)
        .unwrap();
    let events = store.events_after(0, 100).unwrap();
    let seen: Vec<(u64, String, serde_json::Value)> = events
        .iter()
        .map(|(seq, e)| match &e.kind {
            EventKind::RecordChanged(c) => (*seq, c.key.to_string(), json!(c.fields)),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        seen,
        [
            (1, "p1".into(), json!({"ward": 3})),
            (2, "p2".into(), json!({"ward": 4})),
            (3, "p1".into(), json!({"threshold": 7})),
        ]
    );
    assert_eq!(events[0].1.at_ms, 1_000);
    assert_eq!(
        events[2].1.at_ms, 5_000,
        "stamped with the time it is given"
    );
    assert_eq!(store.events_after(2, 100).unwrap().len(), 1);
    assert_eq!(store.event_bounds().unwrap().head, 3);
    drop(store);
    // The log and its numbering survive a reopen.
    let store = open();
    assert_eq!(store.events_after(0, 100).unwrap().len(), 3);
    store
        .apply_upstream(
            &a,
            &[change("p3", "ward", json!(5), 30, "gw-1")],
            cur(3),
            3_000,
        )
        .unwrap();
    assert_eq!(store.events_after(3, 100).unwrap()[0].0, 4);
}

pub fn link_events_become_readable_once_durable_and_the_log_trims_from_the_old_end<S: HubStore>(
    open: &dyn Fn() -> S,
) {
    let store = open();
    let a = agent("gw-1");
    let mut head = store.watch_events();
    store
        .append_events(&[EventKind::AgentConnected { agent: a.clone() }], 500)
        .unwrap();
    // Not yet durable: not readable.
    assert!(store.events_after(0, 10).unwrap().is_empty());
    assert!(store.sync_events().unwrap());
    assert!(!store.sync_events().unwrap(), "nothing left to sync");
    assert!(head.has_changed().unwrap());
    assert_eq!(*head.borrow_and_update(), 1);
    assert_eq!(store.events_after(0, 10).unwrap().len(), 1);
    // A durable commit carries earlier appended events with it.
    store
        .append_events(&[EventKind::AgentDisconnected { agent: a.clone() }], 600)
        .unwrap();
    store
        .apply_upstream(
            &a,
            &[change("p1", "ward", json!(1), 10, "gw-1")],
            cur(1),
            700,
        )
        .unwrap();
    assert_eq!(store.events_after(0, 10).unwrap().len(), 3);
    assert_eq!(
        store.event_bounds().unwrap(),
        crate::events::EventBounds { oldest: 1, head: 3 }
    );
    // Trimming stops at the first event too young or past `upto`.
    assert_eq!(store.trim_events(3, 650, 100).unwrap(), 2);
    assert_eq!(store.event_bounds().unwrap().oldest, 3);
    assert_eq!(store.trim_events(2, 10_000, 100).unwrap(), 0);
    assert!(store.event(2).unwrap().is_none());
    assert_eq!(store.event(3).unwrap().unwrap().at_ms, 700);
}

pub fn webhook_endpoints_keep_progress_per_epoch_and_attempts_newest_first<S: HubStore>(
    open: &dyn Fn() -> S,
) {
    let store = open();
    let endpoint = Endpoint {
        id: "wh_1".into(),
        url: "https://example.com/hook".into(),
        filter: EventFilter::default(),
        secret: "whsec_AAAA".into(),
        created_ms: 1,
        epoch: 0,
        progress: Progress::default(),
    };
    store.put_webhook(&endpoint).unwrap();
    let attempt = |n: u32| Attempt {
        event_id: format!("evt_{n}"),
        event_type: "record.changed".into(),
        seq: u64::from(n),
        at_ms: u64::from(n),
        attempt: 1,
        status: Some(200),
        error: None,
        duration_ms: 1,
        outcome: Outcome::Delivered,
    };
    let moved = Progress {
        cursor: 5,
        ..Progress::default()
    };
    assert!(store
        .webhook_progress("wh_1", 0, &moved, &[attempt(1)])
        .unwrap());
    assert!(store
        .webhook_progress("wh_1", 0, &moved, &[attempt(2), attempt(3)])
        .unwrap());
    assert_eq!(store.webhook("wh_1").unwrap().unwrap().progress.cursor, 5);
    // A replay rewinds under a new epoch: older progress no longer lands.
    let rewound = store.rewind_webhook("wh_1", 1).unwrap().unwrap();
    assert_eq!((rewound.epoch, rewound.progress.cursor), (1, 1));
    assert!(!store.webhook_progress("wh_1", 0, &moved, &[]).unwrap());
    assert_eq!(store.webhook("wh_1").unwrap().unwrap().progress.cursor, 1);
    let ids: Vec<String> = store
        .webhook_attempts("wh_1", 10)
        .unwrap()
        .into_iter()
        .map(|a| a.event_id)
        .collect();
    assert_eq!(ids, ["evt_3", "evt_2", "evt_1"]);
    drop(store);
    let store = open();
    assert_eq!(store.webhooks().unwrap().len(), 1);
    assert!(store.delete_webhook("wh_1").unwrap());
    assert!(!store.delete_webhook("wh_1").unwrap());
    assert!(store.webhook_attempts("wh_1", 10).unwrap().is_empty());
    assert!(store.rewind_webhook("wh_1", 0).unwrap().is_none());
    assert!(!store.webhook_progress("wh_1", 1, &moved, &[]).unwrap());
}

pub fn a_group_enqueue_queues_for_several_agents_in_one_commit<S: HubStore>(open: &dyn Fn() -> S) {
    let (a, b) = (agent("a"), agent("b"));
    {
        let store = open();
        store
            .enqueue_downstream(
                &a,
                &[change("k0", "mode", json!(0), 90, "@hub")],
                Stamp::new(90, 0),
                5_000,
            )
            .unwrap();
        let lasts = store
            .enqueue_downstream_group(
                &[
                    (a.clone(), vec![change("k1", "mode", json!(1), 100, "@hub")]),
                    (
                        b.clone(),
                        vec![
                            change("k1", "mode", json!(1), 101, "@hub"),
                            change("k2", "mode", json!(2), 102, "@hub"),
                        ],
                    ),
                ],
                &Writer::new("ops", Cause::Operator),
                Stamp::new(102, 0),
                6_000,
            )
            .unwrap();
        assert_eq!(lasts, [Seq(2), Seq(2)], "each agent's own last position");
        // One record.changed per change, in the order given.
        let logged: Vec<(String, String)> = store
            .events_after(0, 100)
            .unwrap()
            .into_iter()
            .filter_map(|(_, e)| match e.kind {
                EventKind::RecordChanged(c) => Some((c.agent.to_string(), c.key.to_string())),
                _ => None,
            })
            .collect();
        assert_eq!(
            logged,
            [("a", "k0"), ("a", "k1"), ("b", "k1"), ("b", "k2")].map(|(x, y)| (x.into(), y.into()))
        );
    }
    let store = open();
    assert_eq!(store.hlc_last().unwrap(), Stamp::new(102, 0));
    let queued = |id: &AgentId| -> Vec<u64> {
        store
            .downstream(id, Seq(0), 100, usize::MAX)
            .unwrap()
            .iter()
            .map(|(s, _)| s.0)
            .collect()
    };
    assert_eq!(queued(&a), [1, 2]);
    assert_eq!(queued(&b), [1, 2]);
    assert_eq!(visible(&store, &b, "k2"), [("mode".into(), json!(2))]);
}

pub fn labels_are_kept_on_known_agents_and_survive_other_updates<S: HubStore>(
    open: &dyn Fn() -> S,
) {
    let (a, ghost) = (agent("a"), agent("never-seen"));
    let labels: Labels = [("site", "berlin"), ("model", "gw3")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    {
        let store = open();
        assert!(!store.set_labels(&ghost, &labels).unwrap(), "unknown agent");
        assert!(store.agent(&ghost).unwrap().is_none(), "no row was made");
        store.hello(&a, 1_000, &HelloNote::default()).unwrap();
        assert!(store.set_labels(&a, &labels).unwrap());
        // Cursor updates rewrite the row; the labels stay.
        store
            .enqueue_downstream(
                &a,
                &[change("k", "mode", json!(1), 100, "@hub")],
                Stamp::new(100, 0),
                5_000,
            )
            .unwrap();
        store.ack_downstream(&a, mark(1), false).unwrap();
        store.hello(&a, 2_000, &HelloNote::default()).unwrap();
    }
    let store = open();
    assert_eq!(store.agent(&a).unwrap().unwrap().labels, labels);
    assert_eq!(store.agents().unwrap()[0].1.labels, labels);
    assert!(store.set_labels(&a, &Labels::new()).unwrap());
    assert!(
        store.agent(&a).unwrap().unwrap().labels.is_empty(),
        "replaced, not merged"
    );
}

fn history_limits(keep: u32, max_bytes: u64) -> HistoryLimits {
    let policy = format!(
        "[collections.patients]\ndirection = \"both\"\nsync = [\"mode\"]\nhistory = {keep}\n"
    );
    HistoryLimits::new(Policy::parse(&policy).unwrap(), max_bytes)
}

pub fn history_keeps_each_records_versions_within_both_bounds<S: HubStore>(open: &dyn Fn() -> S) {
    let (a, b) = (agent("a"), agent("b"));
    let (patients, k1) = (
        CollectionName::new("patients").unwrap(),
        RecordKey::new("k1").unwrap(),
    );
    // Stamped before the operator's write at 500 up to seq 6, after it from 7.
    let up = |agent: &AgentId, seq: u64, value: i64| Upstream {
        agent: agent.clone(),
        changes: vec![change(
            "k1",
            "mode",
            json!(value),
            if seq < 7 { 100 + seq } else { 1_000 + seq },
            agent.as_str(),
        )],
        cursor: Some(cur(seq)),
        snapshot: false,
    };
    {
        let store = open();
        // No limits set: a store keeps no history.
        store.apply_upstream_group(&[up(&a, 1, 0)], 1_000).unwrap();
        assert!(store.history(&a, &patients, &k1, 10).unwrap().is_empty());
        store.set_history_limits(history_limits(3, 1 << 20));
        for seq in 2..=6 {
            store
                .apply_upstream_group(&[up(&a, seq, seq as i64), up(&b, seq, -1)], 1_000 + seq)
                .unwrap();
        }
        // The same change again is no version.
        store.apply_upstream_group(&[up(&a, 6, 6)], 2_000).unwrap();
        store
            .enqueue_downstream_group(
                &[(
                    a.clone(),
                    vec![change("k1", "mode", json!(42), 500, "@hub")],
                )],
                &Writer::new("ops", Cause::Operator),
                Stamp::new(500, 0),
                3_000,
            )
            .unwrap();
        let kept = store.history(&a, &patients, &k1, 10).unwrap();
        let seen: Vec<(Option<serde_json::Value>, Option<serde_json::Value>, String)> = kept
            .iter()
            .map(|(_, e)| {
                let d = &e.changed[&FieldName::new("mode").unwrap()];
                (d.before.clone(), d.after.clone(), e.writer.by.clone())
            })
            .collect();
        assert_eq!(
            seen,
            [
                (Some(json!(6)), Some(json!(42)), "ops".to_owned()),
                (Some(json!(5)), Some(json!(6)), "a".to_owned()),
                (Some(json!(4)), Some(json!(5)), "a".to_owned()),
            ],
            "newest first, three kept"
        );
        assert_eq!(kept[0].1.writer.cause, Cause::Operator);
        assert_eq!(kept[1].1.writer.cause, Cause::Agent);
        assert!(kept[0].0 > kept[1].0 && kept[1].0 > kept[2].0);
        assert_eq!(store.history(&a, &patients, &k1, 1).unwrap().len(), 1);
        // Agent b's record of the same key is its own: one version (-1 once).
        assert_eq!(store.history(&b, &patients, &k1, 10).unwrap().len(), 1);
        let stats = store.history_stats().unwrap();
        assert_eq!(stats.dropped, 3, "a's three oldest of six");
        assert!(stats.bytes > 0);
    }
    // It survives a reopen; then a byte bound below what is kept drops the
    // oldest versions, of any record, first.
    let store = open();
    assert_eq!(store.history(&a, &patients, &k1, 10).unwrap().len(), 3);
    let before = store.history_stats().unwrap();
    store.set_history_limits(history_limits(3, before.bytes / 2));
    store.apply_upstream_group(&[up(&a, 7, 7)], 4_000).unwrap();
    let after = store.history_stats().unwrap();
    assert!(
        after.bytes <= before.bytes / 2,
        "{after:?} within {before:?}/2"
    );
    assert!(after.dropped > before.dropped);
    assert!(
        store.history(&b, &patients, &k1, 10).unwrap().is_empty(),
        "b's was oldest"
    );
    let newest = store.history(&a, &patients, &k1, 10).unwrap();
    assert_eq!(
        newest[0].1.changed[&FieldName::new("mode").unwrap()].after,
        Some(json!(7))
    );
}

#[cfg(test)]
mod tests {
    /// A suite test missing from `hub_store_suite!` would run for no
    /// backend, redb included: every `pub fn` here must be listed there.
    #[test]
    fn every_suite_test_is_listed_in_the_macro() {
        let source = include_str!("conformance.rs");
        let list = source
            .split("// suite: begin")
            .nth(1)
            .and_then(|rest| rest.split("// suite: end").next())
            .expect("the macro's list is marked");
        let listed: Vec<&str> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        let defined: Vec<&str> = source
            .lines()
            .filter_map(|line| line.strip_prefix("pub fn "))
            .filter_map(|rest| rest.split('<').next())
            .collect();
        assert_eq!(listed, defined, "list every suite test, in order");
    }
}
