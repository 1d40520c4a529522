//! Per-field merge rules beyond last-writer-wins: what a field's state holds
//! when the policy gives it a rule, how two such states join, and which value
//! a reader sees.
//!
//! A field under the default rule is a plain last-writer-wins register (its
//! [`FieldState`](crate::FieldState) carries no [`RuleState`], and encodes
//! exactly as before rules existed). A field with a rule carries one of:
//!
//! - [`Counter`]: a PN-counter with one part per writer replica (origin and
//!   store incarnation), each part's totals only growing, plus the totals a
//!   reset had seen (a reset removes what it saw, never a concurrent increment);
//! - [`Extreme`]: `max` or `min`: the writes that could still become the
//!   extreme after a record delete (the Pareto frontier of value and version),
//!   plus a field-level clear;
//! - [`Concurrent`]: `review` and `prefer`: the writes no write has yet seen
//!   (they are mutually concurrent) and the versions this state has seen, per
//!   origin (a version vector). A write supersedes exactly what its writer had
//!   seen, so "concurrent" means causally concurrent, not close in time.
//!
//! The rule is part of the state (its [`RuleState`] variant), so merging needs
//! no policy and stays a join: states of one kind join by the kind's rule; a
//! state of a greater kind replaces one of a lesser kind (plain < counter <
//! max < min < review < prefer hub < prefer agent). Agents and the hub refuse
//! to sync under different rules, so mixed kinds only meet after a rule
//! change, and the README says how to roll one out.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::hlc::Stamp;
use crate::id::Origin;
use crate::record::{Edit, FieldValue, Value, Version};

/// Which side of the link made a write: the hub (operator writes, origins
/// beginning with `@`) or an agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Hub,
    Agent,
}

impl Side {
    /// The side `origin` writes for.
    pub fn of(origin: &Origin) -> Side {
        if origin.as_str().starts_with('@') {
            Side::Hub
        } else {
            Side::Agent
        }
    }
}

/// A digest of a policy's merge rules ([`crate::Policy::rules_fingerprint`]):
/// an agent sends it in its hello and the hub refuses a link whose rules are
/// not its own. All zeros means "no rules" (every field last-writer-wins), which
/// is also what a hello from before rules existed says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Fingerprint(pub [u8; 16]);

impl Fingerprint {
    /// No rules at all.
    pub fn is_none(&self) -> bool {
        self.0 == [0; 16]
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_none() {
            return f.write_str("none");
        }
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// How concurrent values of a field merge (the policy's `merge` table).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeRule {
    /// The write with the greatest hybrid-logical-clock version wins.
    #[default]
    Lww,
    /// A counter: writers add to it (`{"$inc": n}`); concurrent additions all count.
    Counter,
    /// The greatest value written wins.
    Max,
    /// The smallest value written wins.
    Min,
    /// Concurrent writes all stay, as candidates, until a write that has seen
    /// them resolves the field.
    Review,
}

impl MergeRule {
    /// The name the policy uses.
    pub fn name(self) -> &'static str {
        match self {
            MergeRule::Lww => "lww",
            MergeRule::Counter => "counter",
            MergeRule::Max => "max",
            MergeRule::Min => "min",
            MergeRule::Review => "review",
        }
    }
}

/// A field's whole rule: how it merges and, for `lww`, which side wins a
/// concurrent write whatever the clocks say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FieldRule {
    pub merge: MergeRule,
    pub prefer: Option<Side>,
}

impl FieldRule {
    /// The plain last-writer-wins rule (no state beyond the register).
    pub const LWW: FieldRule = FieldRule {
        merge: MergeRule::Lww,
        prefer: None,
    };

    /// Whether the field needs to know what each write had seen.
    pub fn tracks_causality(self) -> bool {
        self.merge == MergeRule::Review || self.prefer.is_some()
    }
}

/// The state a ruled field carries beside its view (the value a reader sees).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleState {
    Counter(Counter),
    Max(Extreme),
    Min(Extreme),
    Review(Concurrent),
    PreferHub(Concurrent),
    PreferAgent(Concurrent),
}

impl RuleState {
    /// The empty state of `rule`, or `None` for plain last-writer-wins.
    pub fn empty(rule: FieldRule) -> Option<RuleState> {
        let concurrent = Concurrent::default;
        Some(match (rule.merge, rule.prefer) {
            (MergeRule::Lww, None) => return None,
            (MergeRule::Lww, Some(Side::Hub)) => RuleState::PreferHub(concurrent()),
            (MergeRule::Lww, Some(Side::Agent)) => RuleState::PreferAgent(concurrent()),
            (MergeRule::Counter, _) => RuleState::Counter(Counter::default()),
            (MergeRule::Max, _) => RuleState::Max(Extreme::default()),
            (MergeRule::Min, _) => RuleState::Min(Extreme::default()),
            (MergeRule::Review, _) => RuleState::Review(concurrent()),
        })
    }

    /// The rank that orders kinds (a greater kind replaces a lesser one).
    fn rank(&self) -> u8 {
        match self {
            RuleState::Counter(_) => 1,
            RuleState::Max(_) => 2,
            RuleState::Min(_) => 3,
            RuleState::Review(_) => 4,
            RuleState::PreferHub(_) => 5,
            RuleState::PreferAgent(_) => 6,
        }
    }

    /// The rank of an optional state (plain last-writer-wins is 0).
    pub(crate) fn rank_of(state: Option<&RuleState>) -> u8 {
        state.map_or(0, RuleState::rank)
    }

    /// Joins `other` (of the same kind) into `self`; a different kind is
    /// decided by rank by the caller.
    pub(crate) fn join(&mut self, other: &RuleState) -> bool {
        match (self, other) {
            (RuleState::Counter(a), RuleState::Counter(b)) => a.join(b),
            (RuleState::Max(a), RuleState::Max(b)) => a.join(b, Ordering::Greater),
            (RuleState::Min(a), RuleState::Min(b)) => a.join(b, Ordering::Less),
            (RuleState::Review(a), RuleState::Review(b))
            | (RuleState::PreferHub(a), RuleState::PreferHub(b))
            | (RuleState::PreferAgent(a), RuleState::PreferAgent(b)) => a.join(b),
            _ => false,
        }
    }

    /// Drops what a record delete at `deleted` hides (a counter is reset by
    /// the delete's own reset instead, see [`Counter::reset`]).
    pub(crate) fn hide_before(&mut self, deleted: &Version) -> bool {
        match self {
            RuleState::Counter(_) => false,
            RuleState::Max(e) | RuleState::Min(e) => e.hide_before(deleted),
            RuleState::Review(c) | RuleState::PreferHub(c) | RuleState::PreferAgent(c) => {
                c.hide_before(deleted)
            }
        }
    }

    /// Whether the state holds nothing worth keeping (the field can go).
    pub(crate) fn is_void(&self) -> bool {
        match self {
            // A reset counter is kept: it is what stops an old part from
            // counting again.
            RuleState::Counter(c) => c.parts.is_empty(),
            RuleState::Max(e) | RuleState::Min(e) => e.entries.is_empty() && e.cleared.is_none(),
            RuleState::Review(c) | RuleState::PreferHub(c) | RuleState::PreferAgent(c) => {
                c.entries.is_empty()
            }
        }
    }

    /// What a reader sees and the greatest version the state holds.
    pub(crate) fn view(&self) -> Option<(Version, FieldValue)> {
        match self {
            RuleState::Counter(c) => c.view(),
            RuleState::Max(e) | RuleState::Min(e) => e.view(),
            RuleState::Review(c) => c.view(None),
            RuleState::PreferHub(c) => c.view(Some(Side::Hub)),
            RuleState::PreferAgent(c) => c.view(Some(Side::Agent)),
        }
    }

    /// The concurrent candidates a reader should be shown (more than one
    /// means a conflict: for `review` still open, for `prefer` decided).
    pub fn candidates(&self) -> &[(Version, FieldValue)] {
        match self {
            RuleState::Review(c) | RuleState::PreferHub(c) | RuleState::PreferAgent(c) => {
                &c.entries
            }
            _ => &[],
        }
    }

    /// Every version held, for a re-stamp (see [`crate::clock`]).
    pub(crate) fn versions_mut(&mut self) -> Vec<&mut Version> {
        match self {
            RuleState::Counter(c) => c.parts.iter_mut().map(|p| &mut p.version).collect(),
            RuleState::Max(e) | RuleState::Min(e) => e
                .entries
                .iter_mut()
                .map(|(v, _)| v)
                .chain(e.cleared.as_mut())
                .collect(),
            RuleState::Review(c) | RuleState::PreferHub(c) | RuleState::PreferAgent(c) => {
                c.entries.iter_mut().map(|(v, _)| v).collect()
            }
        }
    }

    /// What a `review` or `prefer` state has seen (a re-stamp moves its own
    /// origin's stamp with its versions).
    pub(crate) fn seen_mut(&mut self) -> Option<&mut Seen> {
        match self {
            RuleState::Review(c) | RuleState::PreferHub(c) | RuleState::PreferAgent(c) => {
                Some(&mut c.seen)
            }
            _ => None,
        }
    }

    /// Restores the canonical form after versions moved (a re-stamp).
    pub(crate) fn normalise(&mut self) {
        match self {
            RuleState::Counter(c) => c.parts.sort_by(|a, b| a.key().cmp(&b.key())),
            RuleState::Max(e) => e.normalise(Ordering::Greater),
            RuleState::Min(e) => e.normalise(Ordering::Less),
            RuleState::Review(c) | RuleState::PreferHub(c) | RuleState::PreferAgent(c) => {
                c.entries.sort_by(|a, b| a.0.cmp(&b.0));
                for (v, _) in &c.entries {
                    c.seen.observe(v);
                }
            }
        }
    }
}

/// One writer replica's share of a counter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub origin: Origin,
    /// The writer's store incarnation: a re-imaged gateway counts afresh
    /// without its new totals hiding behind its old ones.
    pub incarnation: u64,
    /// Everything this writer added, and everything it took away (each only
    /// grows). These four are left out of the encoding when zero.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub up: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub down: u64,
    /// The part of `up` and `down` that resets have removed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reset_up: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reset_down: u64,
    /// The latest write to this part.
    pub version: Version,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Part {
    fn key(&self) -> (&Origin, u64) {
        (&self.origin, self.incarnation)
    }

    fn net(&self) -> i128 {
        (i128::from(self.up) - i128::from(self.reset_up))
            - (i128::from(self.down) - i128::from(self.reset_down))
    }

    fn is_reset(&self) -> bool {
        self.up == self.reset_up && self.down == self.reset_down
    }

    fn join(&mut self, other: &Part) -> bool {
        let before = self.clone();
        self.up = self.up.max(other.up);
        self.down = self.down.max(other.down);
        self.reset_up = self.reset_up.max(other.reset_up);
        self.reset_down = self.reset_down.max(other.reset_down);
        if other.version > self.version {
            self.version = other.version.clone();
        }
        *self != before
    }
}

/// A PN-counter: one [`Part`] per writer replica, sorted by (origin, incarnation).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    pub parts: Vec<Part>,
}

impl Counter {
    /// The change that adds `delta` as replica (`version.origin`, `incarnation`).
    pub fn add(&self, delta: i64, version: &Version, incarnation: u64) -> Counter {
        let mut part = self
            .parts
            .iter()
            .find(|p| p.origin == version.origin && p.incarnation == incarnation)
            .cloned()
            .unwrap_or(Part {
                origin: version.origin.clone(),
                incarnation,
                up: 0,
                down: 0,
                reset_up: 0,
                reset_down: 0,
                version: version.clone(),
            });
        if delta >= 0 {
            part.up = part.up.saturating_add(delta.unsigned_abs());
        } else {
            part.down = part.down.saturating_add(delta.unsigned_abs());
        }
        part.version = version.clone();
        Counter { parts: vec![part] }
    }

    /// The change that resets the counter to zero: it removes what this state
    /// has seen, so increments it has not seen still count.
    pub fn reset(&self, version: &Version) -> Counter {
        let parts = self
            .parts
            .iter()
            .map(|p| Part {
                reset_up: p.up,
                reset_down: p.down,
                version: version.clone().max(p.version.clone()),
                ..p.clone()
            })
            .collect();
        Counter { parts }
    }

    /// The counter's value (saturated to `i64`).
    pub fn total(&self) -> i64 {
        let sum: i128 = self.parts.iter().map(Part::net).sum();
        i64::try_from(sum).unwrap_or(if sum < 0 { i64::MIN } else { i64::MAX })
    }

    fn join(&mut self, other: &Counter) -> bool {
        let mut changed = false;
        for theirs in &other.parts {
            match self.parts.binary_search_by(|p| p.key().cmp(&theirs.key())) {
                Ok(i) => changed |= self.parts[i].join(theirs),
                Err(i) => {
                    self.parts.insert(i, theirs.clone());
                    changed = true;
                }
            }
        }
        changed
    }

    fn view(&self) -> Option<(Version, FieldValue)> {
        let version = self.parts.iter().map(|p| &p.version).max()?.clone();
        let value = if self.parts.iter().all(Part::is_reset) {
            FieldValue::Deleted
        } else {
            FieldValue::Set(Value::from(self.total()))
        };
        Some((version, value))
    }
}

/// `max` or `min`: the writes that may still be the extreme, sorted by version.
///
/// A write is dropped once another write has a value at least as extreme and
/// a version at least as great: no record delete can then leave the first
/// one standing without the second. What remains is the frontier (values
/// strictly less extreme as versions grow), and the reader sees its first
/// entry's value. Writers skip a write that would not change the extreme, so
/// the frontier grows only through concurrent writes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Extreme {
    pub entries: Vec<(Version, Value)>,
    /// A field-level delete (`null`): hides every write at or before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleared: Option<Version>,
}

impl Extreme {
    fn join(&mut self, other: &Extreme, extreme: Ordering) -> bool {
        let before = self.clone();
        if other.cleared > self.cleared {
            self.cleared.clone_from(&other.cleared);
        }
        for e in &other.entries {
            if !self.entries.contains(e) {
                self.entries.push(e.clone());
            }
        }
        self.normalise(extreme);
        *self != before
    }

    fn normalise(&mut self, extreme: Ordering) {
        let cleared = self.cleared.clone();
        self.entries.retain(|(v, _)| Some(v) > cleared.as_ref());
        // Most extreme first (ties: the later version first).
        self.entries.sort_by(|a, b| {
            let more = match extreme {
                Ordering::Less => compare_values(&a.1, &b.1),
                _ => compare_values(&b.1, &a.1),
            };
            more.then_with(|| b.0.cmp(&a.0))
        });
        // Keep an entry only if its version is greater than that of every
        // more extreme entry before it.
        let mut newest: Option<Version> = None;
        self.entries.retain(|(v, _)| {
            let keep = newest.as_ref().is_none_or(|n| v > n);
            if keep {
                newest = Some(v.clone());
            }
            keep
        });
    }

    /// The change of a write (a value, or a clear) at `version`.
    pub fn written(version: &Version, edit: Edit) -> Extreme {
        match edit {
            Edit::Set(v) => Extreme {
                entries: vec![(version.clone(), v)],
                cleared: None,
            },
            _ => Extreme {
                entries: Vec::new(),
                cleared: Some(version.clone()),
            },
        }
    }

    fn hide_before(&mut self, deleted: &Version) -> bool {
        let before = self.entries.len();
        self.entries.retain(|(v, _)| v > deleted);
        let hid = self.entries.len() != before;
        if self.cleared.as_ref().is_some_and(|c| c <= deleted) {
            self.cleared = None;
            return true;
        }
        hid
    }

    fn view(&self) -> Option<(Version, FieldValue)> {
        let newest = self
            .entries
            .iter()
            .map(|(v, _)| v)
            .chain(self.cleared.as_ref())
            .max()?
            .clone();
        let value = self
            .entries
            .first()
            .map_or(FieldValue::Deleted, |(_, v)| FieldValue::Set(v.clone()));
        Some((newest, value))
    }

    /// Whether writing `value` would change nothing (it is not more extreme
    /// than what the reader sees now).
    pub fn holds_at_least(&self, value: &Value, extreme: Ordering) -> bool {
        self.entries
            .first()
            .is_some_and(|(_, best)| compare_values(value, best) != extreme)
    }
}

/// A total order on JSON values for `max` and `min`: numbers by value, then
/// by type (null < bool < number < string < array < object), strings by
/// their characters, arrays and objects by their canonical encoding.
pub fn compare_values(a: &Value, b: &Value) -> Ordering {
    fn rank(v: &Value) -> u8 {
        match v {
            Value::Null => 0,
            Value::Bool(_) => 1,
            Value::Number(_) => 2,
            Value::String(_) => 3,
            Value::Array(_) => 4,
            Value::Object(_) => 5,
        }
    }
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (fx, fy) = (x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0));
            fx.total_cmp(&fy)
                .then_with(|| x.to_string().cmp(&y.to_string()))
        }
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (Value::String(x), Value::String(y)) => x.cmp(y),
        _ if rank(a) != rank(b) => rank(a).cmp(&rank(b)),
        _ => {
            let bytes = |v: &Value| crate::codec::to_bytes(v).unwrap_or_default();
            bytes(a).cmp(&bytes(b))
        }
    }
}

/// What a state has seen: per origin, the greatest stamp of its writes
/// (every write of one origin to one field is ordered at that origin, so a
/// stamp covers its origin's earlier writes).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Seen(pub BTreeMap<Origin, Stamp>);

impl Seen {
    /// Whether the write at `v` is covered.
    pub fn covers(&self, v: &Version) -> bool {
        self.0.get(&v.origin).is_some_and(|s| *s >= v.stamp)
    }

    /// Records `v` as seen.
    pub fn observe(&mut self, v: &Version) {
        let s = self.0.entry(v.origin.clone()).or_insert(v.stamp);
        if v.stamp > *s {
            *s = v.stamp;
        }
    }

    fn join(&mut self, other: &Seen) {
        for (o, s) in &other.0 {
            let mine = self.0.entry(o.clone()).or_insert(*s);
            if s > mine {
                *mine = *s;
            }
        }
    }
}

/// `review` and `prefer`: the writes nobody has yet superseded (mutually
/// concurrent), sorted by version, and what this state has seen (which
/// covers every entry).
///
/// Encoded, `seen` leaves out what the entries imply (an origin seen up to
/// its newest entry's stamp), and is left out when that is all it holds;
/// decoding adds it back.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(from = "ConcurrentRepr")]
pub struct Concurrent {
    pub entries: Vec<(Version, FieldValue)>,
    pub seen: Seen,
}

#[derive(Deserialize)]
struct ConcurrentRepr {
    entries: Vec<(Version, FieldValue)>,
    #[serde(default)]
    seen: Seen,
}

impl From<ConcurrentRepr> for Concurrent {
    fn from(repr: ConcurrentRepr) -> Self {
        let mut seen = repr.seen;
        for (v, _) in &repr.entries {
            seen.observe(v);
        }
        Concurrent {
            entries: repr.entries,
            seen,
        }
    }
}

impl Serialize for Concurrent {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Out<'a> {
            entries: &'a [(Version, FieldValue)],
            #[serde(skip_serializing_if = "BTreeMap::is_empty")]
            seen: BTreeMap<&'a Origin, &'a Stamp>,
        }
        let implied = |origin: &Origin| {
            self.entries
                .iter()
                .filter(|(v, _)| &v.origin == origin)
                .map(|(v, _)| v.stamp)
                .max()
        };
        let seen = self
            .seen
            .0
            .iter()
            .filter(|(origin, stamp)| implied(origin).is_none_or(|s| s < **stamp))
            .collect();
        Out {
            entries: &self.entries,
            seen,
        }
        .serialize(serializer)
    }
}

impl Concurrent {
    /// The change of a write at `version`: it supersedes everything this
    /// state holds or has seen.
    pub fn write(&self, version: &Version, value: FieldValue) -> Concurrent {
        let mut seen = self.seen.clone();
        for (v, _) in &self.entries {
            seen.observe(v);
        }
        seen.observe(version);
        Concurrent {
            entries: vec![(version.clone(), value)],
            seen,
        }
    }

    /// The dot-kernel join: keep a write both hold, or one the other side
    /// has not seen; union what was seen.
    fn join(&mut self, other: &Concurrent) -> bool {
        let before = self.clone();
        let mut entries: Vec<(Version, FieldValue)> = self
            .entries
            .iter()
            .filter(|e| other.holds(&e.0) || !other.seen.covers(&e.0))
            .cloned()
            .collect();
        for e in &other.entries {
            if (self.holds(&e.0) || !self.seen.covers(&e.0)) && !entries.contains(e) {
                entries.push(e.clone());
            }
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| tie(&a.1, &b.1)));
        // Two writes with one version (a cloned store): the greater encoding stays.
        entries.dedup_by(|later, earlier| later.0 == earlier.0);
        self.entries = entries;
        self.seen.join(&other.seen);
        *self != before
    }

    fn holds(&self, v: &Version) -> bool {
        self.entries.iter().any(|(mine, _)| mine == v)
    }

    /// Drops the writes a record delete hides, and what was seen of them: a
    /// tombstone covers those already, and keeping it would make two states
    /// that mean the same differ.
    fn hide_before(&mut self, deleted: &Version) -> bool {
        let before = (self.entries.len(), self.seen.0.len());
        self.entries.retain(|(v, _)| v > deleted);
        self.seen.0.retain(|origin, stamp| {
            let v = Version {
                stamp: *stamp,
                origin: origin.clone(),
            };
            &v > deleted
        });
        (self.entries.len(), self.seen.0.len()) != before
    }

    fn view(&self, prefer: Option<Side>) -> Option<(Version, FieldValue)> {
        let newest = self.entries.last()?.0.clone();
        let chosen = prefer
            .and_then(|side| {
                self.entries
                    .iter()
                    .rev()
                    .find(|(v, _)| Side::of(&v.origin) == side)
            })
            .or(self.entries.last())?;
        Some((newest, chosen.1.clone()))
    }
}

/// Orders two values of writes that share a version (greater encoding last).
fn tie(a: &FieldValue, b: &FieldValue) -> Ordering {
    let bytes = |f: &FieldValue| crate::codec::to_bytes(f).unwrap_or_default();
    bytes(b).cmp(&bytes(a))
}

impl From<Edit> for FieldValue {
    /// The value a register keeps for an edit (an addition is not one: the
    /// writer refuses it for a field that is not a counter).
    fn from(edit: Edit) -> Self {
        match edit {
            Edit::Set(v) => FieldValue::Set(v),
            Edit::Delete | Edit::Add(_) => FieldValue::Deleted,
        }
    }
}
