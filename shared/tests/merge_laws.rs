//! Property tests of the merge laws for `RecordState` (per-field last-writer-wins
//! with record tombstones): commutativity, associativity, idempotence, an honest
//! "changed" flag, canonical form, agreement with a reference model, and
//! convergence of replicas under shuffled and duplicated delivery.

use std::collections::BTreeMap;

use fieldsync_shared::{FieldName, FieldState, FieldValue, Merge, Origin, RecordState, Stamp};
use fieldsync_shared::{Value, Version};
use proptest::prelude::*;
use serde_json::json;

const FIELDS: [&str; 4] = ["a", "b", "heart rate", "é"];
const ORIGINS: [&str; 3] = ["gw-1", "gw-2", "@hub"];

/// A write or a delete, described by small indices so that stamps and origins
/// collide often (equal stamps, equal versions, ties broken by origin).
#[derive(Clone, Debug)]
enum Op {
    /// Writes the listed fields (indices into `FIELDS`) at one version.
    Write { fields: Vec<usize>, version: Ver },
    /// Deletes the whole record at one version.
    Delete { version: Ver },
}

/// (wall ms, logical, origin index).
type Ver = (u64, u32, usize);

fn version((wall, logical, origin): Ver) -> Version {
    Version {
        stamp: Stamp::new(wall, logical),
        origin: Origin::new(ORIGINS[origin]).unwrap(),
    }
}

fn field(i: usize) -> FieldName {
    FieldName::new(FIELDS[i]).unwrap()
}

/// The content a write at `ver` gives field `f`. A version identifies one write,
/// so the content must be a function of (field, version); `salt` varies it
/// between test cases. About a quarter of the writes delete the field.
fn content(salt: u64, f: usize, (wall, logical, origin): Ver) -> Option<Value> {
    let h = salt
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(wall * 131 + u64::from(logical) * 31 + origin as u64 * 7 + f as u64);
    let h = h ^ (h >> 29);
    match h % 8 {
        0 | 1 => None,
        2 => Some(json!(h % 100)),
        3 => Some(json!(format!("v{}", h % 10))),
        4 => Some(json!([h % 3, {"k": h % 5}])),
        5 => Some(json!({"nested": {"x": h.is_multiple_of(7)}})),
        6 => Some(Value::Null),
        _ => Some(json!(-((h % 50) as i64) as f64 / 4.0)),
    }
}

/// The change an op produces (what travels between replicas).
fn change(salt: u64, op: &Op) -> RecordState {
    match op {
        Op::Write { fields, version: v } => RecordState::default().write(
            fields.iter().map(|&f| (field(f), content(salt, f, *v))),
            &version(*v),
        ),
        Op::Delete { version: v } => RecordState::default().delete(&version(*v)),
    }
}

fn ver() -> impl Strategy<Value = Ver> {
    (0u64..4, 0u32..2, 0usize..ORIGINS.len())
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (prop::collection::vec(0usize..FIELDS.len(), 1..4), ver())
            .prop_map(|(fields, version)| Op::Write { fields, version }),
        1 => ver().prop_map(|version| Op::Delete { version }),
    ]
}

/// A reachable (hence canonical) state: the merge of a few changes.
fn state_from(salt: u64, ops: &[Op]) -> RecordState {
    let mut s = RecordState::default();
    for op in ops {
        s.merge(&change(salt, op));
    }
    s
}

fn states(n: usize) -> impl Strategy<Value = (u64, Vec<RecordState>)> {
    (
        any::<u64>(),
        prop::collection::vec(prop::collection::vec(op(), 0..6), n),
    )
        .prop_map(|(salt, opss)| (salt, opss.iter().map(|ops| state_from(salt, ops)).collect()))
}

fn merged(a: &RecordState, b: &RecordState) -> RecordState {
    let mut out = a.clone();
    out.merge(b);
    out
}

/// Canonical form: no field is at or below the record tombstone.
fn is_canonical(s: &RecordState) -> bool {
    s.fields
        .values()
        .all(|f| Some(&f.version) > s.deleted.as_ref())
}

/// What a reader sees, for comparing replicas.
fn view(s: &RecordState) -> (bool, Vec<(String, Value)>) {
    let visible = s
        .visible()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    (s.exists(), visible)
}

/// The reference model of LWW with record tombstones, computed directly from the
/// set of changes: the latest delete, and per field the latest write if it is
/// newer than that delete.
fn model(salt: u64, ops: &[Op]) -> RecordState {
    let deleted = ops
        .iter()
        .filter_map(|op| match op {
            Op::Delete { version } => Some(*version),
            Op::Write { .. } => None,
        })
        .map(version)
        .max();
    let mut latest: BTreeMap<usize, Ver> = BTreeMap::new();
    for op in ops {
        if let Op::Write { fields, version: v } = op {
            for &f in fields {
                let e = latest.entry(f).or_insert(*v);
                if version(*v) > version(*e) {
                    *e = *v;
                }
            }
        }
    }
    let fields = latest
        .into_iter()
        .filter(|(_, v)| Some(&version(*v)) > deleted.as_ref())
        .map(|(f, v)| {
            let value = content(salt, f, v).map_or(FieldValue::Deleted, FieldValue::Set);
            let state = FieldState::plain(version(v), value);
            (field(f), state)
        })
        .collect();
    RecordState { deleted, fields }
}

/// The order and duplication of one replica's deliveries: every change at least
/// once, some twice, in a random order.
fn deliveries(n: usize) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(0..n.max(1), 0..=n).prop_flat_map(move |dups| {
        let mut all: Vec<usize> = (0..n).collect();
        all.extend(dups);
        Just(all).prop_shuffle()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn merge_is_commutative((_, s) in states(2)) {
        prop_assert_eq!(merged(&s[0], &s[1]), merged(&s[1], &s[0]));
    }

    #[test]
    fn merge_is_associative((_, s) in states(3)) {
        let left = merged(&merged(&s[0], &s[1]), &s[2]);
        let right = merged(&s[0], &merged(&s[1], &s[2]));
        prop_assert_eq!(left, right);
    }

    #[test]
    fn merge_is_idempotent((_, s) in states(2)) {
        let mut a = s[0].clone();
        prop_assert!(!a.merge(&s[0]), "merging a state into itself reports a change");
        prop_assert_eq!(&a, &s[0]);
        let mut ab = merged(&s[0], &s[1]);
        let once = ab.clone();
        prop_assert!(!ab.merge(&s[1]), "merging the same state twice reports a change");
        prop_assert_eq!(ab, once);
    }

    #[test]
    fn merge_reports_a_change_exactly_when_the_state_changes((_, s) in states(2)) {
        let mut a = s[0].clone();
        let changed = a.merge(&s[1]);
        prop_assert_eq!(changed, a != s[0], "before {:?}, merged {:?}, after {:?}", s[0], s[1], a);
    }

    #[test]
    fn merge_keeps_canonical_form((_, s) in states(2)) {
        prop_assert!(is_canonical(&s[0]) && is_canonical(&s[1]));
        prop_assert!(is_canonical(&merged(&s[0], &s[1])));
    }

    /// The merge of any set of changes is the reference model of that set.
    #[test]
    fn merge_agrees_with_the_reference_model(
        salt in any::<u64>(),
        ops in prop::collection::vec(op(), 0..12),
    ) {
        prop_assert_eq!(state_from(salt, &ops), model(salt, &ops));
    }

    /// Changes decoded from the wire need not be canonical (a field at or below the
    /// change's own tombstone). Merging one is the same as merging its canonical form.
    #[test]
    fn a_non_canonical_change_merges_like_its_canonical_form(
        (salt, s) in states(1),
        del in ver(),
        stale in prop::collection::vec((0usize..FIELDS.len(), ver()), 1..4),
    ) {
        let deleted = version(del);
        let mut raw = RecordState { deleted: Some(deleted.clone()), fields: BTreeMap::new() };
        for (f, v) in stale {
            let v = if version(v) <= deleted { v } else { del };
            let value = content(salt, f, v).map_or(FieldValue::Deleted, FieldValue::Set);
            raw.fields.insert(field(f), FieldState::plain(version(v), value));
        }
        let canonical = RecordState { deleted: Some(deleted), fields: BTreeMap::new() };
        let (mut via_raw, mut via_canonical) = (s[0].clone(), s[0].clone());
        let changed_raw = via_raw.merge(&raw);
        let changed_canonical = via_canonical.merge(&canonical);
        prop_assert_eq!(changed_raw, changed_canonical);
        prop_assert_eq!(&via_raw, &via_canonical);
        prop_assert!(is_canonical(&via_raw));
    }

    /// Replicas that receive the same changes — each in its own order, some twice,
    /// one of them partly by state exchange with another — end up identical, and
    /// readers on every replica see the same record.
    #[test]
    fn replicas_converge_under_shuffled_duplicated_delivery(
        (salt, ops, orders, split) in (any::<u64>(), prop::collection::vec(op(), 0..10))
            .prop_flat_map(|(salt, ops)| {
                let n = ops.len();
                (Just(salt), Just(ops), prop::collection::vec(deliveries(n), 3), 0..=n)
            })
    ) {
        let changes: Vec<RecordState> = ops.iter().map(|op| change(salt, op)).collect();
        let mut replicas: Vec<RecordState> = orders
            .iter()
            .map(|order| {
                let mut r = RecordState::default();
                for &i in order {
                    r.merge(&changes[i]);
                }
                r
            })
            .collect();
        // A fourth replica hears half the changes directly and the rest by merging
        // in a peer's whole state (state-based sync), then gets a late duplicate.
        let mut gossip = RecordState::default();
        for c in &changes[..split] {
            gossip.merge(c);
        }
        gossip.merge(&replicas[1]);
        if let Some(c) = changes.first() {
            prop_assert!(!gossip.merge(c), "a late duplicate changed a converged replica");
        }
        replicas.push(gossip);

        let expected = model(salt, &ops);
        for r in &replicas {
            prop_assert_eq!(r, &expected);
            prop_assert_eq!(view(r), view(&expected));
        }
    }
}

#[test]
fn the_generators_produce_ties_tombstones_and_hidden_fields() {
    // Guards the property tests against vacuity: with these small ranges the
    // interesting cases (equal stamps, record deletes that hide fields, field
    // tombstones) actually occur.
    let salt = 7;
    let ops = [
        Op::Write {
            fields: vec![0, 1],
            version: (1, 0, 0),
        },
        Op::Write {
            fields: vec![0],
            version: (1, 0, 2),
        },
        // Same stamp; "gw-2" sorts after "gw-1" and "@hub", so this delete wins the tie.
        Op::Delete { version: (1, 0, 1) },
        Op::Write {
            fields: vec![2],
            version: (2, 1, 0),
        },
    ];
    let s = state_from(salt, &ops);
    assert_eq!(s.deleted, Some(version((1, 0, 1))));
    assert_eq!(s.fields.keys().collect::<Vec<_>>(), [&field(2)]);
    assert_eq!(s, model(salt, &ops));
    let deleted = (0..100)
        .filter(|&w| content(salt, 0, (w, 0, 0)).is_none())
        .count();
    assert!((5..60).contains(&deleted), "{deleted} of 100 writes delete");
}
