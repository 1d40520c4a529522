//! Version history of a record: what each change that a replica applied did
//! to the fields a reader sees, kept bounded per record and per store, and
//! the state of a record as of one of those versions (what a rollback writes).
//!
//! The stores keep the entries; this module decides what an entry holds,
//! which entries a bound drops, and how a past state is rebuilt, so the agent
//! and the hub keep history by one rule.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::id::{CollectionName, FieldName, RecordKey};
use crate::policy::{Flow, Policy};
use crate::record::{FieldValue, RecordState, Value, Version};

/// Default bound on the bytes of history the hub's store keeps (oldest
/// versions out first).
pub const DEFAULT_HUB_MAX_BYTES: u64 = 256 << 20;
/// Default bound on an agent's (a gateway's disk is small).
pub const DEFAULT_AGENT_MAX_BYTES: u64 = 16 << 20;
/// Smallest bound a config may set: two versions of the largest change.
pub const MIN_MAX_BYTES: u64 = 2 * crate::wire::MAX_CHANGE_BYTES as u64;

/// A config file's `[history]` section, the same in both programs' configs.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistorySection {
    /// Bytes of version history the store keeps (oldest versions out first).
    pub max_bytes: Option<u64>,
}

impl HistorySection {
    /// `max_bytes`, or `default` when unset; an error (for the key) below
    /// [`MIN_MAX_BYTES`].
    pub fn max_bytes(&self, default: u64) -> Result<u64, String> {
        let bytes = self.max_bytes.unwrap_or(default);
        if bytes < MIN_MAX_BYTES {
            return Err(format!(
                "{bytes} is below {MIN_MAX_BYTES} (two versions of the largest change)"
            ));
        }
        Ok(bytes)
    }
}

/// Why a version exists: who made the change and by which operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
#[non_exhaustive]
pub enum Cause {
    /// A write on the agent (local API, CLI), applied where it was made.
    Local,
    /// An agent's change, applied on the hub (`by` is the agent id).
    Agent,
    /// A change that arrived by resync snapshot.
    Resync,
    /// An operator write (`by` names the operator).
    Operator,
    /// An operator's conflict resolution.
    Resolve,
    /// A rollback to version `to` of the same record.
    Rollback { to: u64 },
    /// A change from the hub, applied on the agent (an operator write made
    /// there, or a rollback or resolution; the hub's history says which).
    Hub,
}

/// Who made a change and why; the stores stamp each version with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Writer {
    /// An agent id, or an operator's name.
    pub by: String,
    pub cause: Cause,
}

impl Writer {
    pub fn new(by: impl Into<String>, cause: Cause) -> Self {
        Self {
            by: by.into(),
            cause,
        }
    }
}

/// A field's visible value before and after a change (`None`: absent).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FieldDiff {
    pub before: Option<Value>,
    pub after: Option<Value>,
}

/// One version of a record: a change that altered what a reader sees of its
/// permitted fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub collection: CollectionName,
    pub key: RecordKey,
    /// When this replica applied it (its wall clock, ms since the epoch).
    pub at_ms: u64,
    /// The greatest version the change carried: its stamp and origin.
    pub version: Version,
    pub writer: Writer,
    /// The permitted fields whose visible value changed.
    pub changed: BTreeMap<FieldName, FieldDiff>,
}

/// What a store needs to decide about history: how many versions each
/// collection keeps, and the store-wide byte bound.
#[derive(Clone, Debug)]
pub struct HistoryLimits {
    policy: Policy,
    pub max_bytes: u64,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        Self::new(Policy::default(), DEFAULT_AGENT_MAX_BYTES)
    }
}

impl HistoryLimits {
    pub fn new(policy: Policy, max_bytes: u64) -> Self {
        Self { policy, max_bytes }
    }

    /// Versions kept per record of `collection` (0: none).
    pub fn keep(&self, collection: &CollectionName) -> u32 {
        self.policy.history(collection)
    }

    /// Whether the policy lets `field` travel in either direction: only those
    /// are recorded (a field kept on the device leaves no copy in history).
    pub fn records_field(&self, collection: &CollectionName, field: &FieldName) -> bool {
        self.policy.permits(Flow::Up, collection, field)
            || self.policy.permits(Flow::Down, collection, field)
    }
}

/// The visible values of the fields a change touches, before it merges.
pub type Touched = BTreeMap<FieldName, Option<Value>>;

/// The visible values of the fields `change` touches in `state`: taken before
/// a merge, it is the "before" half of [`HistoryEntry::of`].
pub fn touched(state: &RecordState, change: &RecordState) -> Touched {
    let names: Vec<&FieldName> = if change.deleted.is_some() {
        state.fields.keys().chain(change.fields.keys()).collect()
    } else {
        change.fields.keys().collect()
    };
    values_of(state, names)
}

/// The visible values in `state` of the fields `names`: what a write to
/// those fields is about to change (the same as [`touched`] by the change the
/// write makes, without cloning the record to compute it afterwards).
pub fn values_of<'a>(
    state: &RecordState,
    names: impl IntoIterator<Item = &'a FieldName>,
) -> Touched {
    names
        .into_iter()
        .map(|name| (name.clone(), visible(state, name)))
        .collect()
}

fn visible(state: &RecordState, name: &FieldName) -> Option<Value> {
    match state.fields.get(name).map(|f| &f.value) {
        Some(FieldValue::Set(v)) => Some(v.clone()),
        _ => None,
    }
}

impl HistoryEntry {
    /// The version `change` made of a record whose touched fields were
    /// `before` ([`touched`], taken before the merge) and whose state is now
    /// `after`; `None` when no recorded field's visible value changed.
    #[allow(clippy::too_many_arguments)]
    pub fn of(
        limits: &HistoryLimits,
        collection: &CollectionName,
        key: &RecordKey,
        before: Touched,
        after: &RecordState,
        change: &RecordState,
        writer: &Writer,
        at_ms: u64,
    ) -> Option<HistoryEntry> {
        if limits.keep(collection) == 0 {
            return None;
        }
        let changed: BTreeMap<FieldName, FieldDiff> = before
            .into_iter()
            .filter(|(name, _)| limits.records_field(collection, name))
            .filter_map(|(name, before)| {
                let after = visible(after, &name);
                (before != after).then_some((name, FieldDiff { before, after }))
            })
            .collect();
        if changed.is_empty() {
            return None;
        }
        Some(HistoryEntry {
            collection: collection.clone(),
            key: key.clone(),
            at_ms,
            version: change.max_version()?.clone(),
            writer: writer.clone(),
            changed,
        })
    }
}

/// Which of a record's versions (oldest first) go when the record may keep
/// `keep` of them.
pub fn over_count<T>(versions: &[T], keep: u32) -> &[T] {
    let excess = versions.len().saturating_sub(keep as usize);
    &versions[..excess]
}

/// The recorded fields of a record as of a version: `now` (its visible
/// recorded fields today) with every later version undone, newest first.
/// `newer` must hold every version after the one asked for.
pub fn state_at<'a>(
    mut now: BTreeMap<FieldName, Value>,
    newer: impl IntoIterator<Item = &'a HistoryEntry>,
) -> BTreeMap<FieldName, Value> {
    for entry in newer {
        for (name, diff) in &entry.changed {
            match &diff.before {
                Some(v) => now.insert(name.clone(), v.clone()),
                None => now.remove(name),
            };
        }
    }
    now
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Stamp;
    use crate::id::Origin;
    use crate::merge::Merge;
    use serde_json::json;

    fn f(s: &str) -> FieldName {
        FieldName::new(s).unwrap()
    }

    fn v(ms: u64) -> Version {
        Version {
            stamp: Stamp {
                wall_ms: ms,
                logical: 0,
            },
            origin: Origin::new("gw-1").unwrap(),
        }
    }

    fn limits() -> HistoryLimits {
        let policy = Policy::parse(
            "[collections.t]\ndirection = \"both\"\nsync = [\"a\", \"b\"]\nhistory = 3\n",
        )
        .unwrap();
        HistoryLimits::new(policy, 1 << 20)
    }

    /// Applies `change` to `state` and returns its history entry.
    fn apply(state: &mut RecordState, change: &RecordState, at: u64) -> Option<HistoryEntry> {
        let (c, k) = (
            CollectionName::new("t").unwrap(),
            RecordKey::new("r").unwrap(),
        );
        let before = touched(state, change);
        state.merge(change);
        let w = Writer::new("gw-1", Cause::Local);
        HistoryEntry::of(&limits(), &c, &k, before, state, change, &w, at)
    }

    #[test]
    fn an_entry_holds_the_recorded_fields_that_changed_and_rebuilds_the_past() {
        let mut state = RecordState::default();
        let mut entries = Vec::new();
        let w1 = state.clone().write(
            [(f("a"), Some(json!(1))), (f("ssn"), Some(json!("x")))],
            &v(1),
        );
        entries.push(apply(&mut state, &w1, 1).unwrap());
        // Only `a` is recorded: `ssn` stays on the device.
        assert_eq!(entries[0].changed.keys().collect::<Vec<_>>(), vec![&f("a")]);
        let w2 = state.clone().write(
            [(f("a"), Some(json!(2))), (f("b"), Some(json!("x")))],
            &v(2),
        );
        entries.push(apply(&mut state, &w2, 2).unwrap());
        // The same change again is no version.
        assert_eq!(apply(&mut state, &w2, 3), None);
        // A local-only field's change is no version either.
        let w3 = state.clone().write([(f("ssn"), Some(json!("y")))], &v(3));
        assert_eq!(apply(&mut state, &w3, 3), None);
        let mut w4 = state.clone();
        let del = w4.delete(&v(4));
        entries.push(apply(&mut state, &del, 4).unwrap());
        assert_eq!(entries[2].changed[&f("a")].before, Some(json!(2)));
        assert_eq!(entries[2].changed[&f("a")].after, None);

        let now: BTreeMap<FieldName, Value> = BTreeMap::new();
        let at = |i: usize| state_at(now.clone(), entries[i + 1..].iter().rev());
        assert_eq!(at(2), BTreeMap::new());
        assert_eq!(
            at(1),
            BTreeMap::from([(f("a"), json!(2)), (f("b"), json!("x"))])
        );
        assert_eq!(at(0), BTreeMap::from([(f("a"), json!(1))]));
    }

    #[test]
    fn counts_drop_the_oldest_and_zero_keeps_none() {
        assert_eq!(over_count(&[1, 2, 3, 4, 5], 3), &[1, 2]);
        assert_eq!(over_count(&[1, 2], 3), &[] as &[u64]);
        let none = HistoryLimits::new(
            Policy::parse("[collections.t]\ndirection = \"up\"\nsync = [\"a\"]\nhistory = 0\n")
                .unwrap(),
            1,
        );
        let (c, k) = (
            CollectionName::new("t").unwrap(),
            RecordKey::new("r").unwrap(),
        );
        let mut state = RecordState::default();
        let change = state.write([(f("a"), Some(json!(1)))], &v(1));
        let w = Writer::new("gw-1", Cause::Local);
        let before = BTreeMap::from([(f("a"), None)]);
        assert_eq!(
            HistoryEntry::of(&none, &c, &k, before, &state, &change, &w, 1),
            None
        );
    }
}
