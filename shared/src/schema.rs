//! Data quality rules: a collection's optional `schema` in the policy, the
//! type, enumeration and numeric bounds a field's values must keep. Checked
//! where a write enters (both APIs refuse it, 422) and again where a change
//! arrives from the other side (the receiver drops the field's change,
//! counts it and tells the sender), so a bad value never spreads.
//!
//! ```toml
//! [collections.thermostat]
//! schema = { setpoint = { type = "number", min = 5, max = 35 }, mode = ["eco", "away"], label = "string" }
//! ```
//!
//! A rule never names a field's value in its errors: only the field and
//! what the rule asks for (which the policy, not the data, says).

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

use crate::id::{CollectionName, FieldName, RecordKey};
use crate::record::{Change, FieldState, FieldValue, Value};
use crate::rules::MergeRule;

/// A JSON type a field's values must have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    String,
    /// Any JSON number.
    Number,
    /// A number with no fractional part (`5`, not `5.5`).
    Integer,
    Bool,
    Object,
    Array,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::String => "string",
            Kind::Number => "number",
            Kind::Integer => "integer",
            Kind::Bool => "bool",
            Kind::Object => "object",
            Kind::Array => "array",
        }
    }

    fn holds(self, value: &Value) -> bool {
        match self {
            Kind::String => value.is_string(),
            Kind::Number => value.is_number(),
            Kind::Integer => {
                value.is_i64() || value.is_u64() || value.as_f64().is_some_and(|f| f.fract() == 0.0)
            }
            Kind::Bool => value.is_boolean(),
            Kind::Object => value.is_object(),
            Kind::Array => value.is_array(),
        }
    }
}

/// What one field's values must be. Deleting a field (`null`) is always
/// allowed: a schema constrains values, not presence.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldSchema {
    pub kind: Option<Kind>,
    /// The only values allowed, when set.
    pub one_of: Option<Vec<Value>>,
    pub min: Option<f64>,
    pub max: Option<f64>,
}

// Values from a parsed policy are finite numbers and JSON scalars: equality
// is total on them.
impl Eq for FieldSchema {}

impl FieldSchema {
    /// Whether `value` keeps the rule.
    pub fn allows(&self, value: &Value) -> bool {
        if self.kind.is_some_and(|k| !k.holds(value)) {
            return false;
        }
        if let Some(one_of) = &self.one_of {
            if !one_of.iter().any(|v| same(v, value)) {
                return false;
            }
        }
        if self.min.is_some() || self.max.is_some() {
            let Some(n) = value.as_f64() else {
                return false;
            };
            if self.min.is_some_and(|m| n < m) || self.max.is_some_and(|m| n > m) {
                return false;
            }
        }
        true
    }
}

/// JSON equality where `5` and `5.0` are the same number.
fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) if a.is_number() && b.is_number() => x == y,
        _ => a == b,
    }
}

/// The rule in words, for errors: "a number from 5 to 35", "one of "eco",
/// "away"".
impl fmt::Display for FieldSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(kind) = self.kind {
            parts.push(format!("a {}", kind.name()));
        }
        if let Some(one_of) = &self.one_of {
            let list: Vec<String> = one_of.iter().map(Value::to_string).collect();
            parts.push(format!("one of {}", list.join(", ")));
        }
        match (self.min, self.max) {
            (Some(lo), Some(hi)) => parts.push(format!("from {lo} to {hi}")),
            (Some(lo), None) => parts.push(format!("at least {lo}")),
            (None, Some(hi)) => parts.push(format!("at most {hi}")),
            (None, None) => {}
        }
        f.write_str(&parts.join(", "))
    }
}

/// A field value that breaks its collection's schema: the field and the
/// rule, never the value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("field \"{field}\" must be {rule}")]
pub struct Violation {
    pub field: FieldName,
    /// The rule in words ([`FieldSchema`]'s display).
    pub rule: String,
}

/// One collection's schema: field → rule.
pub type Schema = BTreeMap<FieldName, FieldSchema>;

/// Checks new values (field, value): the first that breaks its rule.
pub fn check_patch<'a>(
    schema: &Schema,
    values: impl IntoIterator<Item = (&'a FieldName, &'a Value)>,
) -> Result<(), Violation> {
    if schema.is_empty() {
        return Ok(());
    }
    for (field, value) in values {
        let Some(rule) = schema.get(field) else {
            continue;
        };
        if !rule.allows(value) {
            return Err(Violation {
                field: field.clone(),
                rule: rule.to_string(),
            });
        }
    }
    Ok(())
}

/// Whether every value a field's state carries keeps `rule`: its view and,
/// for a field that keeps concurrent values, each candidate.
fn state_allows(rule: &FieldSchema, state: &FieldState) -> bool {
    let set = |v: &FieldValue| match v {
        FieldValue::Set(v) => rule.allows(v),
        FieldValue::Deleted => true,
    };
    set(&state.value) && state.candidates().iter().all(|(_, v)| set(v))
}

/// A change without the fields whose values break `schema` (`None` when
/// nothing of it is left), and those fields' violations. What a receiver
/// applies: a field's state left out is simply not merged, so the other
/// fields (and every replica) stay consistent.
pub fn strip(schema: &Schema, change: Change) -> (Option<Change>, Vec<Violation>) {
    if schema.is_empty() {
        return (Some(change), Vec::new());
    }
    let mut change = change;
    let mut violations = Vec::new();
    change.state.fields.retain(|field, state| {
        let Some(rule) = schema.get(field) else {
            return true;
        };
        let ok = state_allows(rule, state);
        if !ok {
            violations.push(Violation {
                field: field.clone(),
                rule: rule.to_string(),
            });
        }
        ok
    });
    let left = (!change.state.is_empty()).then_some(change);
    (left, violations)
}

/// Longest refusal detail sent to a peer (an enumeration can be long).
pub const MAX_DETAIL: usize = 1024;

/// What a receiver tells the sender it refused of one change:
/// `collection/key: field "f" must be ...; ...` (never a value), at most
/// [`MAX_DETAIL`] bytes.
pub fn refusal_detail(
    collection: &CollectionName,
    key: &RecordKey,
    violations: &[Violation],
) -> String {
    let list: Vec<String> = violations.iter().map(Violation::to_string).collect();
    let mut text = format!("{collection}/{key}: {}", list.join("; "));
    if text.len() > MAX_DETAIL {
        let mut end = MAX_DETAIL - 3;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

/// A field's rule as the policy file writes it: a type name, a list of
/// allowed values, or a table (`type`, `enum`, `min`, `max`).
pub(crate) enum RawFieldSchema {
    Kind(String),
    OneOf(Vec<toml::Value>),
    Table(RawTable),
}

impl RawFieldSchema {
    pub(crate) fn of(value: toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::String(s) => Ok(Self::Kind(s)),
            toml::Value::Array(values) => Ok(Self::OneOf(values)),
            table @ toml::Value::Table(_) => table
                .try_into()
                .map(Self::Table)
                .map_err(|e| e.to_string().trim_end().to_owned()),
            _ => Err(format!(
                "a rule is a type ({KINDS}), a list of allowed values, or a table with type, enum, min and max"
            )),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTable {
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(rename = "enum")]
    one_of: Option<Vec<toml::Value>>,
    min: Option<toml::Value>,
    max: Option<toml::Value>,
}

const KINDS: &str = "\"string\", \"number\", \"integer\", \"bool\", \"object\" or \"array\"";

fn kind_of(name: &str) -> Result<Kind, String> {
    Kind::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(name))
        .map_err(|_| format!("unknown type \"{name}\"; use {KINDS}"))
}

fn number(v: &toml::Value, key: &str) -> Result<f64, String> {
    match v {
        toml::Value::Integer(i) => Ok(*i as f64),
        toml::Value::Float(f) if f.is_finite() => Ok(*f),
        _ => Err(format!("{key} takes a finite number")),
    }
}

fn scalar(v: toml::Value) -> Result<Value, String> {
    match v {
        toml::Value::String(s) => Ok(Value::String(s)),
        toml::Value::Integer(i) => Ok(Value::from(i)),
        toml::Value::Float(f) => serde_json::Number::from_f64(f)
            .map(Value::Number)
            .ok_or_else(|| "an allowed value must be a finite number".to_owned()),
        toml::Value::Boolean(b) => Ok(Value::Bool(b)),
        _ => Err("allowed values are strings, numbers or booleans".to_owned()),
    }
}

impl RawFieldSchema {
    /// The rule, checked against itself and the field's merge rule.
    pub(crate) fn parse(self, merge: MergeRule) -> Result<FieldSchema, String> {
        let (kind, one_of, min, max) = match self {
            RawFieldSchema::Kind(name) => (Some(kind_of(&name)?), None, None, None),
            RawFieldSchema::OneOf(values) => (None, Some(values), None, None),
            RawFieldSchema::Table(t) => (
                t.kind.as_deref().map(kind_of).transpose()?,
                t.one_of,
                t.min.as_ref().map(|v| number(v, "min")).transpose()?,
                t.max.as_ref().map(|v| number(v, "max")).transpose()?,
            ),
        };
        let one_of = match one_of {
            None => None,
            Some(values) if values.is_empty() => {
                return Err("an enumeration needs at least one value".to_owned())
            }
            Some(values) => Some(
                values
                    .into_iter()
                    .map(scalar)
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let bounded = min.is_some() || max.is_some();
        let kind = match kind {
            None if bounded => Some(Kind::Number),
            Some(k) if bounded && !matches!(k, Kind::Number | Kind::Integer) => {
                return Err(format!(
                    "min and max bound numbers; this field's type is {}",
                    k.name()
                ))
            }
            k => k,
        };
        if let (Some(lo), Some(hi)) = (min, max) {
            if lo > hi {
                return Err(format!("min ({lo}) is above max ({hi})"));
            }
        }
        let rule = FieldSchema {
            kind,
            one_of,
            min,
            max,
        };
        if let Some(values) = &rule.one_of {
            if let Some(bad) = values.iter().find(|v| {
                !FieldSchema {
                    one_of: None,
                    ..rule.clone()
                }
                .allows(v)
            }) {
                return Err(format!(
                    "allowed value {bad} is not {}",
                    FieldSchema {
                        one_of: None,
                        ..rule.clone()
                    }
                ));
            }
        }
        if merge == MergeRule::Counter {
            if bounded {
                return Err(
                    "a counter cannot be bounded: concurrent increments that each keep a bound can sum past it"
                        .to_owned(),
                );
            }
            if rule.one_of.is_some()
                || rule
                    .kind
                    .is_some_and(|k| !matches!(k, Kind::Number | Kind::Integer))
            {
                return Err("a counter's values are integers: its schema can only say \"integer\" or \"number\"".to_owned());
            }
        }
        Ok(rule)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rule(toml_value: &str, merge: MergeRule) -> Result<FieldSchema, String> {
        let mut table: toml::Table = toml::from_str(&format!("f = {toml_value}")).unwrap();
        RawFieldSchema::of(table.remove("f").unwrap())?.parse(merge)
    }

    #[test]
    fn types_enumerations_and_bounds_allow_what_they_say() {
        let n = rule(r#"{ type = "number", min = 5, max = 35 }"#, MergeRule::Lww).unwrap();
        assert!(n.allows(&json!(5)) && n.allows(&json!(35.0)) && n.allows(&json!(20.5)));
        assert!(!n.allows(&json!(4.9)) && !n.allows(&json!(36)) && !n.allows(&json!("20")));
        assert_eq!(n.to_string(), "a number, from 5 to 35");
        let i = rule(r#""integer""#, MergeRule::Lww).unwrap();
        assert!(i.allows(&json!(3)) && i.allows(&json!(3.0)) && !i.allows(&json!(3.5)));
        let e = rule(r#"["eco", "away"]"#, MergeRule::Lww).unwrap();
        assert!(e.allows(&json!("eco")) && !e.allows(&json!("Eco")) && !e.allows(&json!(1)));
        assert_eq!(e.to_string(), r#"one of "eco", "away""#);
        let levels = rule("[1, 2, 3]", MergeRule::Lww).unwrap();
        assert!(levels.allows(&json!(2.0)), "5 and 5.0 are one number");
        for (kind, yes, no) in [
            ("string", json!("x"), json!(1)),
            ("bool", json!(true), json!("true")),
            ("object", json!({"a": 1}), json!([1])),
            ("array", json!([1]), json!({"a": 1})),
        ] {
            let r = rule(&format!("\"{kind}\""), MergeRule::Lww).unwrap();
            assert!(r.allows(&yes) && !r.allows(&no), "{kind}");
        }
        let bounded = rule("{ max = 10 }", MergeRule::Max).unwrap();
        assert_eq!(bounded.kind, Some(Kind::Number));
    }

    #[test]
    fn contradictory_or_unknown_rules_are_refused_with_the_reason() {
        for (text, merge, want) in [
            (r#""text""#, MergeRule::Lww, "unknown type \"text\""),
            (
                r#"{ type = "string", min = 1 }"#,
                MergeRule::Lww,
                "min and max bound numbers",
            ),
            ("{ min = 5, max = 1 }", MergeRule::Lww, "above max"),
            ("[]", MergeRule::Lww, "at least one value"),
            (
                r#"{ type = "integer", enum = [1, 2.5] }"#,
                MergeRule::Lww,
                "allowed value 2.5",
            ),
            (
                "{ max = 100 }",
                MergeRule::Counter,
                "a counter cannot be bounded",
            ),
            (r#""string""#, MergeRule::Counter, "integers"),
            (
                r#"{ type = "number", lower = 1 }"#,
                MergeRule::Lww,
                "unknown field `lower`",
            ),
            ("5", MergeRule::Lww, "a rule is a type"),
            ("[[1]]", MergeRule::Lww, "strings, numbers or booleans"),
        ] {
            let got = rule(text, merge);
            assert!(
                got.as_ref().is_err_and(|e| e.contains(want)),
                "{text}: {got:?}"
            );
        }
    }
}
