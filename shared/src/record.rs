//! The record model: a record is a map of fields, each a last-writer-wins register
//! stamped with the hybrid-logical-clock [`Version`] of its last write. Deleting a
//! field leaves a tombstone; deleting a record leaves a record-level tombstone that
//! hides every field written at or before it.
//!
//! A change that travels between replicas is itself a (partial) [`RecordState`]:
//! applying a change is merging it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::hlc::Stamp;
use crate::id::{CollectionName, FieldName, IdError, Origin, RecordKey};
use crate::merge::Merge;
use crate::rules::{Extreme, FieldRule, MergeRule, RuleState};

/// A field's value: anything JSON can hold.
pub type Value = serde_json::Value;

/// Deepest nesting of arrays and objects allowed inside one field value. It keeps
/// every envelope well within the decoder's recursion limit.
pub const MAX_VALUE_DEPTH: usize = 32;

/// The nesting depth of `v` (a scalar has depth 0).
pub fn value_depth(v: &Value) -> usize {
    match v {
        Value::Array(items) => 1 + items.iter().map(value_depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(value_depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Most fields one write may set.
pub const MAX_FIELDS_PER_WRITE: usize = 1000;

/// Why a partial update is not acceptable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PatchError {
    #[error("the body must be a JSON object of field names to values")]
    NotAnObject,
    #[error("the body names no fields")]
    Empty,
    #[error("{count} fields in one write; at most {MAX_FIELDS_PER_WRITE} are allowed")]
    TooManyFields { count: usize },
    #[error(transparent)]
    FieldName(#[from] IdError),
    #[error("field {field:?} is nested deeper than {MAX_VALUE_DEPTH} levels")]
    TooDeep { field: String },
}

/// Reads a partial update: a non-empty JSON object of field names to values,
/// where `null` deletes the field (JSON Merge Patch, RFC 7396, at the top level).
pub fn parse_patch(body: Value) -> Result<Vec<(FieldName, Option<Value>)>, PatchError> {
    let Value::Object(map) = body else {
        return Err(PatchError::NotAnObject);
    };
    if map.is_empty() {
        return Err(PatchError::Empty);
    }
    if map.len() > MAX_FIELDS_PER_WRITE {
        return Err(PatchError::TooManyFields { count: map.len() });
    }
    map.into_iter()
        .map(|(name, value)| {
            if value_depth(&value) > MAX_VALUE_DEPTH {
                return Err(PatchError::TooDeep { field: name });
            }
            let field = FieldName::new(name)?;
            Ok((field, (!value.is_null()).then_some(value)))
        })
        .collect()
}

/// Turns command-line `FIELD=VALUE` arguments into a JSON object: VALUE is
/// read as JSON when it parses, otherwise as a string.
pub fn parse_field_args(pairs: &[String]) -> Result<serde_json::Map<String, Value>, String> {
    let mut map = serde_json::Map::new();
    for pair in pairs {
        let (name, raw) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} is not FIELD=VALUE"))?;
        if name.is_empty() {
            return Err(format!("{pair:?} has an empty field name"));
        }
        let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()));
        if map.insert(name.to_owned(), value).is_some() {
            return Err(format!("field {name:?} is given twice"));
        }
    }
    Ok(map)
}

/// When and by whom a write was made. Totally ordered by stamp, then origin, so
/// two different writes never tie.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version {
    pub stamp: Stamp,
    pub origin: Origin,
}

/// A field's current content: a value, or the tombstone of a deleted field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum FieldValue {
    Set(Value),
    Deleted,
}

/// One field of a record: its content and the version of the write that set it.
///
/// A field with a merge rule (see [`crate::rules`]) also carries the rule's
/// state; `version` and `value` are then its view (the greatest version it
/// holds and the value a reader sees), recomputed on every merge. A plain
/// last-writer-wins field encodes exactly as before rules existed; a ruled
/// field encodes its rule state only, and decoding computes the view (so a
/// peer cannot send a view its state does not hold). Decoding still takes a
/// ruled field with its view written out (the first encoding of rules) and
/// recomputes the view from the state.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(try_from = "FieldRepr")]
pub struct FieldState {
    pub version: Version,
    pub value: FieldValue,
    pub rule: Option<RuleState>,
}

/// A [`FieldState`] as encoded: `version` and `value` for a plain field,
/// `rule` for a ruled one.
#[derive(Serialize, Deserialize)]
struct FieldRepr<V = Version, F = FieldValue, R = RuleState> {
    #[serde(default = "none", skip_serializing_if = "Option::is_none")]
    version: Option<V>,
    #[serde(default = "none", skip_serializing_if = "Option::is_none")]
    value: Option<F>,
    #[serde(default = "none", skip_serializing_if = "Option::is_none")]
    rule: Option<R>,
}

fn none<T>() -> Option<T> {
    None
}

impl Serialize for FieldState {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let plain = self.rule.is_none();
        FieldRepr {
            version: plain.then_some(&self.version),
            value: plain.then_some(&self.value),
            rule: self.rule.as_ref(),
        }
        .serialize(serializer)
    }
}

impl TryFrom<FieldRepr> for FieldState {
    type Error = &'static str;

    fn try_from(repr: FieldRepr) -> Result<Self, Self::Error> {
        match (repr.version, repr.value, repr.rule) {
            (_, _, Some(rule)) if rule.is_void() => Err("a ruled field that holds no write"),
            (_, _, Some(rule)) => {
                FieldState::ruled(rule).ok_or("a ruled field that holds no write")
            }
            (Some(version), Some(value), None) => Ok(FieldState::plain(version, value)),
            _ => Err("a field needs a version and a value, or a rule state"),
        }
    }
}

impl FieldState {
    /// A plain last-writer-wins field.
    pub fn plain(version: Version, value: FieldValue) -> Self {
        Self {
            version,
            value,
            rule: None,
        }
    }

    /// A ruled field with its view; `None` when the state holds nothing.
    fn ruled(rule: RuleState) -> Option<Self> {
        let (version, value) = rule.view()?;
        Some(Self {
            version,
            value,
            rule: Some(rule),
        })
    }

    /// Recomputes the view of a ruled field; false when it holds nothing.
    fn refresh(&mut self) -> bool {
        let Some(rule) = &self.rule else { return true };
        if rule.is_void() {
            return false;
        }
        match rule.view() {
            Some((version, value)) => {
                self.version = version;
                self.value = value;
                true
            }
            None => false,
        }
    }

    /// Hides what a record delete at `deleted` hides; false when nothing is left.
    pub(crate) fn hide_before(&mut self, deleted: &Version) -> bool {
        match self.rule.as_mut() {
            None => &self.version > deleted,
            Some(rule) => {
                rule.hide_before(deleted);
                self.refresh()
            }
        }
    }

    /// Every version the field holds (for a re-stamp), then [`Self::settle`].
    pub(crate) fn versions_mut(&mut self) -> Vec<&mut Version> {
        match self.rule.as_mut() {
            None => vec![&mut self.version],
            Some(rule) => rule.versions_mut(),
        }
    }

    /// What a `review` or `prefer` field has seen.
    pub(crate) fn seen_mut(&mut self) -> Option<&mut crate::rules::Seen> {
        self.rule.as_mut().and_then(RuleState::seen_mut)
    }

    /// Restores the canonical form after [`Self::versions_mut`] moved versions.
    pub(crate) fn settle(&mut self) -> bool {
        if let Some(rule) = self.rule.as_mut() {
            rule.normalise();
        }
        self.refresh()
    }

    /// The candidates of a field whose concurrent writes are kept (`review`,
    /// `prefer`): more than one means a conflict.
    pub fn candidates(&self) -> &[(Version, FieldValue)] {
        self.rule.as_ref().map_or(&[], RuleState::candidates)
    }
}

/// One field's part of a write, as a local writer asks for it.
#[derive(Clone, Debug, PartialEq)]
pub enum Edit {
    /// Sets the value.
    Set(Value),
    /// Deletes the field (a counter: resets it to zero).
    Delete,
    /// Adds to a counter (negative subtracts).
    Add(i64),
}

impl Edit {
    /// The edit a patch asks of a field: `null` deletes, an object whose only
    /// member is `"$inc"` with an integer adds (negative subtracts), anything
    /// else is the value to set.
    pub fn of_patch(value: Option<&Value>) -> Result<Edit, EditError> {
        let Some(value) = value else {
            return Ok(Edit::Delete);
        };
        match value.as_object() {
            Some(map) if map.len() == 1 && map.contains_key("$inc") => map["$inc"]
                .as_i64()
                .map(Edit::Add)
                .ok_or(EditError::BadIncrement),
            _ => Ok(Edit::Set(value.clone())),
        }
    }

    /// The edits of a patch ([`parse_patch`]), each checked against its
    /// field's rule; nothing is written when one does not fit.
    pub fn of_fields(
        fields: &[(FieldName, Option<Value>)],
        rule_of: impl Fn(&FieldName) -> FieldRule,
    ) -> Result<Vec<(FieldName, Edit)>, EditError> {
        fields
            .iter()
            .map(|(name, value)| {
                let edit = Edit::of_patch(value.as_ref())?;
                edit.fits(name, rule_of(name))?;
                Ok((name.clone(), edit))
            })
            .collect()
    }

    /// Whether the edit fits field `name` under `rule`: counters take
    /// additions (and deletes), other fields values (and deletes).
    pub fn fits(&self, name: &FieldName, rule: FieldRule) -> Result<(), EditError> {
        let field = || name.as_str().to_owned();
        match (self, rule.merge == MergeRule::Counter) {
            (Edit::Add(_), false) => Err(EditError::NotACounter { field: field() }),
            (Edit::Set(_), true) => Err(EditError::CounterNeedsIncrement { field: field() }),
            _ => Ok(()),
        }
    }
}

/// Why an edit does not fit its field's rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EditError {
    #[error("field {field:?} is a counter: send {{\"$inc\": n}}, not a value")]
    CounterNeedsIncrement { field: String },
    #[error("field {field:?} is not a counter; only counters take {{\"$inc\": n}}")]
    NotACounter { field: String },
    #[error("\"$inc\" takes an integer (from -2^63 to 2^63-1)")]
    BadIncrement,
}

/// A record's replicated state, or a change to one (a change carries only the
/// fields it writes).
///
/// Canonical form: no field's version is at or below `deleted`. Every constructor
/// and [`Merge::merge`] keep it, so `==` compares meaning.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RecordState {
    /// Set once the record was deleted: the version of the latest delete.
    pub deleted: Option<Version>,
    pub fields: BTreeMap<FieldName, FieldState>,
}

impl RecordState {
    /// The fields a reader sees: set fields, without tombstones.
    pub fn visible(&self) -> impl Iterator<Item = (&FieldName, &Value)> {
        self.fields.iter().filter_map(|(k, f)| match &f.value {
            FieldValue::Set(v) => Some((k, v)),
            FieldValue::Deleted => None,
        })
    }

    /// Fields with concurrent writes on record (`review`, and `prefer` where
    /// the rule decided): each with every candidate's value, oldest version
    /// first (`null` for a delete).
    pub fn conflicts(&self) -> BTreeMap<FieldName, Vec<Value>> {
        self.fields
            .iter()
            .filter(|(_, f)| f.candidates().len() > 1)
            .map(|(name, f)| {
                let values = f
                    .candidates()
                    .iter()
                    .map(|(_, v)| match v {
                        FieldValue::Set(v) => v.clone(),
                        FieldValue::Deleted => Value::Null,
                    })
                    .collect();
                (name.clone(), values)
            })
            .collect()
    }

    /// Whether a reader sees the record at all (it has a set field).
    pub fn exists(&self) -> bool {
        self.visible().next().is_some()
    }

    /// Writes `fields` (a value, or `None` to delete the field) at `version`, and
    /// returns the change to send to other replicas. `version` must be newer than
    /// anything in `self` (a fresh stamp from this replica's clock).
    pub fn write(
        &mut self,
        fields: impl IntoIterator<Item = (FieldName, Option<Value>)>,
        version: &Version,
    ) -> RecordState {
        let change = RecordState {
            deleted: None,
            fields: fields
                .into_iter()
                .map(|(name, value)| {
                    let value = value.map_or(FieldValue::Deleted, FieldValue::Set);
                    let version = version.clone();
                    (name, FieldState::plain(version, value))
                })
                .collect(),
        };
        self.merge(&change);
        change
    }

    /// Writes `edits` at `version` under each field's rule (`rule_of`), as the
    /// replica whose store incarnation is `incarnation`, and returns the change
    /// to send. Nothing changes when an edit does not fit its rule. A `max` or
    /// `min` write that would not move the extreme is left out of the change
    /// (it changes nothing anywhere), so the change may hold no field.
    pub fn edit(
        &mut self,
        edits: Vec<(FieldName, Edit)>,
        version: &Version,
        incarnation: u64,
        rule_of: impl Fn(&FieldName) -> FieldRule,
    ) -> Result<RecordState, EditError> {
        for (name, edit) in &edits {
            edit.fits(name, rule_of(name))?;
        }
        let mut change = RecordState::default();
        for (name, edit) in edits {
            let rule = rule_of(&name);
            let Some(empty) = RuleState::empty(rule) else {
                let value = match edit {
                    Edit::Set(v) => FieldValue::Set(v),
                    _ => FieldValue::Deleted,
                };
                change
                    .fields
                    .insert(name, FieldState::plain(version.clone(), value));
                continue;
            };
            // The field's current state of this rule's kind (or none yet).
            let current = self
                .fields
                .get(&name)
                .and_then(|f| f.rule.as_ref())
                .filter(|r| std::mem::discriminant(*r) == std::mem::discriminant(&empty))
                .unwrap_or(&empty);
            let written = match (current, edit) {
                // Adding nothing changes nothing anywhere.
                (RuleState::Counter(_), Edit::Add(0)) => continue,
                (RuleState::Counter(c), Edit::Add(n)) => {
                    RuleState::Counter(c.add(n, version, incarnation))
                }
                (RuleState::Counter(c), _) => RuleState::Counter(c.reset(version)),
                (RuleState::Max(e), Edit::Set(v))
                    if e.holds_at_least(&v, std::cmp::Ordering::Greater) =>
                {
                    continue
                }
                (RuleState::Min(e), Edit::Set(v))
                    if e.holds_at_least(&v, std::cmp::Ordering::Less) =>
                {
                    continue
                }
                (RuleState::Max(_), edit) => RuleState::Max(Extreme::written(version, edit)),
                (RuleState::Min(_), edit) => RuleState::Min(Extreme::written(version, edit)),
                (RuleState::Review(c), edit) => RuleState::Review(c.write(version, edit.into())),
                (RuleState::PreferHub(c), edit) => {
                    RuleState::PreferHub(c.write(version, edit.into()))
                }
                (RuleState::PreferAgent(c), edit) => {
                    RuleState::PreferAgent(c.write(version, edit.into()))
                }
            };
            if let Some(field) = FieldState::ruled(written) {
                change.fields.insert(name, field);
            }
        }
        self.merge(&change);
        Ok(change)
    }

    /// Deletes the whole record at `version` and returns the change to send.
    /// A counter is reset rather than hidden: the change carries what this
    /// replica has counted, so increments it has not seen still count.
    pub fn delete(&mut self, version: &Version) -> RecordState {
        let fields = self
            .fields
            .iter()
            .filter_map(|(name, f)| match &f.rule {
                Some(RuleState::Counter(c)) => {
                    let reset = FieldState::ruled(RuleState::Counter(c.reset(version)))?;
                    Some((name.clone(), reset))
                }
                _ => None,
            })
            .collect();
        let change = RecordState {
            deleted: Some(version.clone()),
            fields,
        };
        self.merge(&change);
        change
    }

    /// True when the state holds nothing at all (no tombstones either).
    pub fn is_empty(&self) -> bool {
        self.deleted.is_none() && self.fields.is_empty()
    }

    /// The greatest version anywhere in the state (to feed a receiver's clock).
    pub fn max_version(&self) -> Option<&Version> {
        self.fields
            .values()
            .map(|f| &f.version)
            .chain(self.deleted.as_ref())
            .max()
    }
}

impl Merge for RecordState {
    /// Record tombstone: the later delete wins. Plain fields: per-field
    /// last-writer-wins by [`Version`]; ruled fields: their rule's join
    /// ([`crate::rules`]), a ruled state replacing a plain one. What a record
    /// tombstone hides is dropped (a counter is reset by the delete's own
    /// reset instead). Each part is a join and hiding commutes with them, so
    /// the laws hold.
    fn merge(&mut self, other: &Self) -> bool {
        let mut changed = false;
        if other.deleted > self.deleted {
            self.deleted.clone_from(&other.deleted);
            if let Some(deleted) = &self.deleted {
                self.fields.retain(|_, f| f.hide_before(deleted));
            }
            changed = true;
        }
        let deleted = self.deleted.clone();
        for (name, theirs) in &other.fields {
            let theirs = match (&theirs.rule, &deleted) {
                (None, _) if Some(&theirs.version) <= deleted.as_ref() => continue,
                (None, _) | (Some(_), None) => std::borrow::Cow::Borrowed(theirs),
                (Some(_), Some(d)) => {
                    let mut t = theirs.clone();
                    if !t.hide_before(d) {
                        continue;
                    }
                    std::borrow::Cow::Owned(t)
                }
            };
            let Some(ours) = self.fields.get_mut(name) else {
                self.fields.insert(name.clone(), theirs.into_owned());
                changed = true;
                continue;
            };
            let (our_rank, their_rank) = (
                RuleState::rank_of(ours.rule.as_ref()),
                RuleState::rank_of(theirs.rule.as_ref()),
            );
            if their_rank > our_rank {
                *ours = theirs.into_owned();
                changed = true;
            } else if their_rank < our_rank {
                // A lesser kind (a state from before a rule change) is ignored.
            } else if let (Some(mine), Some(their_rule)) = (ours.rule.as_mut(), &theirs.rule) {
                if mine.join(their_rule) {
                    ours.refresh();
                    changed = true;
                }
            } else if wins(&theirs, ours) {
                *ours = theirs.into_owned();
                changed = true;
            }
        }
        changed
    }
}

/// Whether `theirs` replaces `ours`: the greater version wins. Two writes by
/// one replica never share a version, but two stores that share an identity
/// (a cloned disk image) or a re-stamp can make a tie; the greater encoded
/// value then wins, so the merge stays a join whatever the order.
fn wins(theirs: &FieldState, ours: &FieldState) -> bool {
    match theirs.version.cmp(&ours.version) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Equal if theirs.value == ours.value => false,
        std::cmp::Ordering::Equal => {
            let bytes = |f: &FieldState| crate::codec::to_bytes(&f.value).unwrap_or_default();
            bytes(theirs) > bytes(ours)
        }
    }
}

/// One record's change, addressed to its collection and key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub collection: CollectionName,
    pub key: RecordKey,
    pub state: RecordState,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_are_json_when_they_parse_else_strings() {
        let args: Vec<String> = [
            "initials=JD",
            "ssn=123-45-6789",
            "ward=3",
            "ok=true",
            "tags=[1,2]",
            "note=a=b",
            "gone=null",
            "s=\"3\"",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let m = parse_field_args(&args).unwrap();
        assert_eq!(
            Value::Object(m),
            json!({"initials": "JD", "ssn": "123-45-6789", "ward": 3, "ok": true, "tags": [1, 2], "note": "a=b", "gone": null, "s": "3"})
        );
    }

    #[test]
    fn malformed_pairs_are_refused() {
        assert!(parse_field_args(&["novalue".into()])
            .unwrap_err()
            .contains("FIELD=VALUE"));
        assert!(parse_field_args(&["=1".into()])
            .unwrap_err()
            .contains("empty field name"));
        assert!(parse_field_args(&["a=1".into(), "a=2".into()])
            .unwrap_err()
            .contains("twice"));
    }

    fn v(wall: u64, who: &str) -> Version {
        Version {
            stamp: Stamp::new(wall, 0),
            origin: Origin::new(who).unwrap(),
        }
    }

    fn f(name: &str) -> FieldName {
        FieldName::new(name).unwrap()
    }

    #[test]
    fn later_write_wins_per_field() {
        let mut a = RecordState::default();
        a.write(
            [(f("x"), Some(json!(1))), (f("y"), Some(json!(1)))],
            &v(1, "a"),
        );
        let mut b = RecordState::default();
        b.write([(f("x"), Some(json!(2)))], &v(2, "b"));
        assert!(a.merge(&b));
        let seen: Vec<_> = a.visible().map(|(k, v)| (k.as_str(), v.clone())).collect();
        assert_eq!(seen, [("x", json!(2)), ("y", json!(1))]);
    }

    #[test]
    fn equal_stamps_are_ordered_by_origin() {
        let mut a = RecordState::default();
        a.write([(f("x"), Some(json!("from a")))], &v(5, "a"));
        let mut b = RecordState::default();
        b.write([(f("x"), Some(json!("from b")))], &v(5, "b"));
        let mut ab = a.clone();
        ab.merge(&b);
        let mut ba = b.clone();
        ba.merge(&a);
        assert_eq!(ab, ba);
        assert_eq!(ab.visible().next().unwrap().1, &json!("from b"));
    }

    #[test]
    fn field_delete_is_a_tombstone_that_hides_the_value() {
        let mut a = RecordState::default();
        a.write([(f("x"), Some(json!(1)))], &v(1, "a"));
        let change = a.write([(f("x"), None)], &v(2, "a"));
        assert!(!a.exists());
        assert_eq!(change.fields[&f("x")].value, FieldValue::Deleted);
        // An older write arriving late does not resurrect it.
        let mut late = RecordState::default();
        late.write([(f("x"), Some(json!(0)))], &v(1, "z"));
        assert!(!a.merge(&late));
        assert!(!a.exists());
    }

    #[test]
    fn record_delete_hides_older_fields_but_not_newer_ones() {
        let mut a = RecordState::default();
        a.write([(f("x"), Some(json!(1)))], &v(1, "a"));
        a.delete(&v(3, "a"));
        assert!(!a.exists());
        assert!(a.fields.is_empty(), "dominated fields are dropped");
        let mut newer = RecordState::default();
        newer.write([(f("y"), Some(json!(2)))], &v(4, "b"));
        assert!(a.merge(&newer));
        assert_eq!(a.visible().count(), 1);
        let mut older = RecordState::default();
        older.write([(f("z"), Some(json!(2)))], &v(2, "b"));
        assert!(!a.merge(&older));
        assert_eq!(a.visible().count(), 1);
    }

    #[test]
    fn depth_counts_nesting() {
        assert_eq!(value_depth(&json!(1)), 0);
        assert_eq!(value_depth(&json!([])), 1);
        assert_eq!(value_depth(&json!({"a": [1, {"b": []}]})), 4);
    }
}
