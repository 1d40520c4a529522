//! The egress policy: which collections and fields may travel between an agent
//! and the hub, and in which direction. **Default deny**: a collection the policy
//! does not name, or a field its `sync` list does not name, never leaves the
//! replica that holds it. [`Policy::filter`] is the one function that decides.
//!
//! ```toml
//! [collections.patients]
//! direction = "up"                          # up | down | both
//! sync = ["initials", "ward", "heart_rate"] # every other field stays local
//!
//! [collections.thermostat]
//! direction = "both"
//! sync = ["setpoint", "runtime_s", "peak_temp", "limit_max"]
//! merge = { runtime_s = "counter", peak_temp = "max" } # default lww; also min, review
//! prefer = { limit_max = "hub" }            # a concurrent write: this side wins
//! history = 20                              # versions kept per record (default 10)
//! schema = { setpoint = { type = "number", min = 5, max = 35 }, mode = ["eco", "away"] }
//! ```
//!
//! The merge rules ([`crate::rules`]) must be the same on both sides: the
//! [`Policy::rules_fingerprint`] of them is what the two compare.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Deserialize;

use crate::id::{CollectionName, FieldName};
use crate::record::{Change, Edit, RecordState};
use crate::rules::{FieldRule, Fingerprint, MergeRule, Side};
use crate::schema::{self, RawFieldSchema, Schema, Violation};

/// Versions of a record kept when the policy does not say.
pub const DEFAULT_HISTORY: u32 = 10;
/// Most versions of a record a policy may ask to keep.
pub const MAX_HISTORY: u32 = 1000;

/// Which way a collection's permitted fields may flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Agent to hub only.
    Up,
    /// Hub to agent only.
    Down,
    /// Both ways.
    Both,
}

/// The direction of one transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Agent to hub.
    Up,
    /// Hub to agent.
    Down,
}

impl Direction {
    fn allows(self, flow: Flow) -> bool {
        matches!(
            (self, flow),
            (Direction::Both, _) | (Direction::Up, Flow::Up) | (Direction::Down, Flow::Down)
        )
    }
}

/// One collection's rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CollectionRule {
    pub direction: Direction,
    pub sync: BTreeSet<FieldName>,
    /// Fields whose rule is not plain last-writer-wins.
    pub fields: BTreeMap<FieldName, FieldRule>,
    /// Versions kept per record (0: none).
    pub history: u32,
    /// What fields' values must be ([`crate::schema`]).
    pub schema: Schema,
}

/// A parsed, validated policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    collections: BTreeMap<CollectionName, CollectionRule>,
}

/// Errors from reading a policy file. Each names the file and, where it applies,
/// the collection and key at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    #[error("cannot read policy file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("policy{}: {message}", in_file(.path))]
    Syntax {
        path: Option<String>,
        message: String,
    },
    #[error("policy{}: {key}: {message}", in_file(.path))]
    Invalid {
        path: Option<String>,
        /// The offending key, for example `collections.patients.sync[1]`.
        key: String,
        message: String,
    },
}

fn in_file(path: &Option<String>) -> String {
    path.as_ref().map(|p| format!(" {p}")).unwrap_or_default()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    collections: BTreeMap<String, RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    direction: Direction,
    sync: Vec<String>,
    #[serde(default)]
    merge: BTreeMap<String, MergeRule>,
    #[serde(default)]
    prefer: BTreeMap<String, Side>,
    history: Option<u32>,
    #[serde(default)]
    schema: BTreeMap<String, toml::Value>,
}

/// What [`Policy::filter`] lets through and what it holds back.
#[derive(Clone, Debug, PartialEq)]
pub struct Filtered {
    /// The permitted part of the change; `None` when nothing of it may travel.
    pub permitted: Option<Change>,
    /// Names of fields that were held back (never their values).
    pub denied: Vec<FieldName>,
    /// True when the change's collection may not travel this way at all.
    pub collection_denied: bool,
}

impl Policy {
    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse_named(&text, Some(path.display().to_string()))
    }

    /// Parses and validates policy TOML.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        Self::parse_named(text, None)
    }

    fn parse_named(text: &str, path: Option<String>) -> Result<Self, PolicyError> {
        let raw: RawPolicy = toml::from_str(text).map_err(|e| PolicyError::Syntax {
            path: path.clone(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let invalid = |key: String, message: String| PolicyError::Invalid {
            path: path.clone(),
            key,
            message,
        };
        let mut collections = BTreeMap::new();
        for (name, rule) in raw.collections {
            let key = format!("collections.{name}");
            let collection =
                CollectionName::new(&*name).map_err(|e| invalid(key.clone(), e.to_string()))?;
            let mut sync = BTreeSet::new();
            for (i, field) in rule.sync.into_iter().enumerate() {
                let key = format!("{key}.sync[{i}]");
                let field =
                    FieldName::new(field).map_err(|e| invalid(key.clone(), e.to_string()))?;
                if !sync.insert(field.clone()) {
                    return Err(invalid(key, format!("field \"{field}\" is listed twice")));
                }
            }
            let mut fields = BTreeMap::new();
            for (field, merge) in rule.merge {
                let key = format!("{key}.merge.{field}");
                let field = FieldName::new(field).map_err(|e| invalid(key, e.to_string()))?;
                if merge != MergeRule::Lww {
                    fields.insert(
                        field,
                        FieldRule {
                            merge,
                            prefer: None,
                        },
                    );
                }
            }
            for (field, side) in rule.prefer {
                let key = format!("{key}.prefer.{field}");
                let field =
                    FieldName::new(field).map_err(|e| invalid(key.clone(), e.to_string()))?;
                let entry = fields.entry(field).or_insert(FieldRule::LWW);
                if entry.merge != MergeRule::Lww {
                    return Err(invalid(
                        key,
                        format!(
                            "prefer decides between concurrent values of an lww field; this field merges by {}",
                            entry.merge.name()
                        ),
                    ));
                }
                entry.prefer = Some(side);
            }
            let history = rule.history.unwrap_or(DEFAULT_HISTORY);
            if history > MAX_HISTORY {
                return Err(invalid(
                    format!("{key}.history"),
                    format!("at most {MAX_HISTORY} versions per record can be kept"),
                ));
            }
            let mut schema = Schema::new();
            for (field, raw) in rule.schema {
                let key = format!("{key}.schema.{field}");
                let field =
                    FieldName::new(field).map_err(|e| invalid(key.clone(), e.to_string()))?;
                let merge = fields.get(&field).map_or(MergeRule::Lww, |r| r.merge);
                let parsed = RawFieldSchema::of(raw)
                    .and_then(|r| r.parse(merge))
                    .map_err(|m| invalid(key, m))?;
                schema.insert(field, parsed);
            }
            collections.insert(
                collection,
                CollectionRule {
                    direction: rule.direction,
                    sync,
                    fields,
                    history,
                    schema,
                },
            );
        }
        Ok(Self { collections })
    }

    /// How `field` of `collection` merges (plain last-writer-wins unless the
    /// policy says otherwise; a collection the policy does not name is local
    /// and plain).
    pub fn field_rule(&self, collection: &CollectionName, field: &FieldName) -> FieldRule {
        self.collections
            .get(collection)
            .and_then(|c| c.fields.get(field))
            .copied()
            .unwrap_or(FieldRule::LWW)
    }

    /// Versions of a record of `collection` to keep.
    pub fn history(&self, collection: &CollectionName) -> u32 {
        self.collections
            .get(collection)
            .map_or(DEFAULT_HISTORY, |c| c.history)
    }

    /// Checks a write's edits against `collection`'s schema: the first field
    /// whose new value breaks its rule (a delete or an increment sets no
    /// value, and passes).
    pub fn check_edits(
        &self,
        collection: &CollectionName,
        edits: &[(FieldName, Edit)],
    ) -> Result<(), Violation> {
        let Some(rule) = self.collections.get(collection) else {
            return Ok(());
        };
        schema::check_patch(
            &rule.schema,
            edits.iter().filter_map(|(f, e)| match e {
                Edit::Set(v) => Some((f, v)),
                Edit::Delete | Edit::Add(_) => None,
            }),
        )
    }

    /// A change as a receiver applies it: without the fields whose values
    /// break the schema (`None` when nothing is left), and their violations.
    pub fn strip_invalid(&self, change: Change) -> (Option<Change>, Vec<Violation>) {
        match self.collections.get(&change.collection) {
            Some(rule) => schema::strip(&rule.schema, change),
            None => (Some(change), Vec::new()),
        }
    }

    /// A digest of every merge rule (collection, field, rule, preferred side),
    /// in hex: two replicas merge alike only if theirs are equal. Directions
    /// and field lists are not in it: they may differ between an agent and
    /// the hub without the replicas diverging.
    pub fn rules_fingerprint(&self) -> Fingerprint {
        if self.collections.values().all(|c| c.fields.is_empty()) {
            return Fingerprint::default();
        }
        // The tag names the encoding of ruled fields too: builds that encode
        // them differently refuse each other (RulesMismatch) instead of
        // failing to decode each other's batches. v2: the compact encoding.
        let mut text = String::from("fieldsync-rules-v2\n");
        for (collection, rule) in &self.collections {
            for (field, r) in &rule.fields {
                let prefer = match r.prefer {
                    None => "",
                    Some(Side::Hub) => "hub",
                    Some(Side::Agent) => "agent",
                };
                text.push_str(&format!(
                    "{collection}\t{field}\t{}\t{prefer}\n",
                    r.merge.name()
                ));
            }
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
        let mut bytes = [0; 16];
        bytes.copy_from_slice(&digest.as_ref()[..16]);
        Fingerprint(bytes)
    }

    /// The rule for `collection` if it may travel in direction `flow`.
    fn rule_for(&self, flow: Flow, collection: &CollectionName) -> Option<&CollectionRule> {
        self.collections
            .get(collection)
            .filter(|r| r.direction.allows(flow))
    }

    /// Whether anything of `collection` may travel in direction `flow`.
    pub fn allows_collection(&self, flow: Flow, collection: &CollectionName) -> bool {
        self.rule_for(flow, collection).is_some()
    }

    /// Whether `field` of `collection` may travel in direction `flow`.
    pub fn permits(&self, flow: Flow, collection: &CollectionName, field: &FieldName) -> bool {
        self.rule_for(flow, collection)
            .is_some_and(|r| r.sync.contains(field))
    }

    /// Splits `change` into what may travel in direction `flow` and what may not.
    /// A field passes only if its collection is named, allows `flow`, and lists the
    /// field in `sync`. A record-level delete passes if the collection allows
    /// `flow` (it carries no field data).
    pub fn filter(&self, flow: Flow, change: &Change) -> Filtered {
        let Some(rule) = self.rule_for(flow, &change.collection) else {
            return Filtered {
                permitted: None,
                denied: change.state.fields.keys().cloned().collect(),
                collection_denied: true,
            };
        };
        let mut state = RecordState {
            deleted: change.state.deleted.clone(),
            fields: BTreeMap::new(),
        };
        let mut denied = Vec::new();
        for (name, field) in &change.state.fields {
            if rule.sync.contains(name) {
                state.fields.insert(name.clone(), field.clone());
            } else {
                denied.push(name.clone());
            }
        }
        let permitted = (!state.is_empty()).then(|| Change {
            collection: change.collection.clone(),
            key: change.key.clone(),
            state,
        });
        Filtered {
            permitted,
            denied,
            collection_denied: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Stamp;
    use crate::id::{Origin, RecordKey};
    use crate::record::{FieldValue, Version};
    use serde_json::json;

    const BRIEF: &str = r#"
        [collections.patients]
        direction = "up"
        sync = ["initials", "ward", "heart_rate"]

        [collections.settings]
        direction = "both"
        sync = ["mode"]

        [collections.orders]
        direction = "down"
        sync = ["dose"]
    "#;

    fn change(collection: &str, fields: &[&str], deleted: bool) -> Change {
        let version = Version {
            stamp: Stamp::new(1, 0),
            origin: Origin::new("a1").unwrap(),
        };
        let mut state = RecordState::default();
        for f in fields {
            state.fields.insert(
                FieldName::new(*f).unwrap(),
                crate::record::FieldState::plain(version.clone(), FieldValue::Set(json!("canary"))),
            );
        }
        if deleted {
            state.deleted = Some(version);
        }
        Change {
            collection: CollectionName::new(collection).unwrap(),
            key: RecordKey::new("k").unwrap(),
            state,
        }
    }

    fn names(f: &Filtered) -> Vec<String> {
        f.permitted
            .as_ref()
            .map(|c| c.state.fields.keys().map(|k| k.to_string()).collect())
            .unwrap_or_default()
    }

    fn strings(v: &[FieldName]) -> Vec<&str> {
        v.iter().map(|f| f.as_str()).collect()
    }

    #[test]
    fn only_listed_fields_go_up() {
        let p = Policy::parse(BRIEF).unwrap();
        let f = p.filter(
            Flow::Up,
            &change("patients", &["initials", "ssn", "ward"], false),
        );
        assert_eq!(names(&f), ["initials", "ward"]);
        assert_eq!(strings(&f.denied), ["ssn"]);
        assert!(!f.collection_denied);
    }

    #[test]
    fn unnamed_collection_is_denied_entirely() {
        let p = Policy::parse(BRIEF).unwrap();
        let f = p.filter(Flow::Up, &change("diary", &["text"], true));
        assert_eq!(f.permitted, None);
        assert!(f.collection_denied);
        assert_eq!(strings(&f.denied), ["text"]);
    }

    #[test]
    fn empty_policy_denies_everything() {
        let p = Policy::parse("").unwrap();
        for flow in [Flow::Up, Flow::Down] {
            assert_eq!(
                p.filter(flow, &change("patients", &["initials"], false))
                    .permitted,
                None
            );
        }
    }

    #[test]
    fn direction_is_enforced() {
        let p = Policy::parse(BRIEF).unwrap();
        assert!(
            p.filter(Flow::Down, &change("patients", &["ward"], false))
                .collection_denied
        );
        assert!(
            p.filter(Flow::Up, &change("orders", &["dose"], false))
                .collection_denied
        );
        assert_eq!(
            names(&p.filter(Flow::Down, &change("orders", &["dose"], false))),
            ["dose"]
        );
        for flow in [Flow::Up, Flow::Down] {
            assert_eq!(
                names(&p.filter(flow, &change("settings", &["mode"], false))),
                ["mode"]
            );
        }
    }

    #[test]
    fn a_change_of_only_local_fields_sends_nothing() {
        let p = Policy::parse(BRIEF).unwrap();
        let f = p.filter(Flow::Up, &change("patients", &["ssn", "notes"], false));
        assert_eq!(f.permitted, None);
        assert_eq!(strings(&f.denied), ["notes", "ssn"]);
    }

    #[test]
    fn record_deletes_travel_without_field_data() {
        let p = Policy::parse(BRIEF).unwrap();
        let f = p.filter(Flow::Up, &change("patients", &["ssn"], true));
        let permitted = f.permitted.unwrap();
        assert!(permitted.state.deleted.is_some());
        assert!(permitted.state.fields.is_empty());
    }

    fn err(text: &str) -> String {
        Policy::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_collection_and_key() {
        let e = err("[collections.patients]\ndirection = \"up\"\nsync = [\"a\", \"a\"]");
        assert!(
            e.contains("collections.patients.sync[1]") && e.contains("twice"),
            "{e}"
        );
        let e = err("[collections.patients]\ndirection = \"up\"\nsync = [\"ok\", \"\"]");
        assert!(
            e.contains("collections.patients.sync[1]") && e.contains("empty"),
            "{e}"
        );
        let e = err("[collections.\"bad/name\"]\ndirection = \"up\"\nsync = []");
        assert!(
            e.contains("collections.bad/name") && e.contains("collection name"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = err("[collections.p]\ndirection = \"up\"\nsync = []\nsink = [\"x\"]");
        assert!(e.contains("unknown field") && e.contains("sink"), "{e}");
        let e = err("[collection.p]\ndirection = \"up\"\nsync = []");
        assert!(
            e.contains("unknown field") && e.contains("collection"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_and_syntax_are_rejected() {
        let e = err("[collections.p]\ndirection = \"sideways\"\nsync = []");
        assert!(e.contains("sideways"), "{e}");
        let e = err("[collections.p]\nsync = []");
        assert!(
            e.contains("missing field") && e.contains("direction"),
            "{e}"
        );
        let e = err("[collections.p]\ndirection = \"up\"");
        assert!(e.contains("missing field") && e.contains("sync"), "{e}");
        let e = err("[collections.p]\ndirection = \"up\"\nsync = \"ward\"");
        assert!(e.contains("sync"), "{e}");
        let e = err("[collections.p\n");
        assert!(e.starts_with("policy:"), "{e}");
    }

    #[test]
    fn load_reports_the_file() {
        let e = Policy::load(Path::new("/nonexistent/policy.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/policy.toml"), "{e}");
    }

    const RULED: &str = r#"
        [collections.thermostat]
        direction = "both"
        sync = ["setpoint", "runtime_s", "peak_temp", "limit_max"]
        merge = { runtime_s = "counter", peak_temp = "max", limit_max = "lww", dose = "review" }
        prefer = { limit_max = "hub" }
        history = 20
    "#;

    #[test]
    fn merge_rules_prefer_and_history_are_read() {
        let p = Policy::parse(RULED).unwrap();
        let c = CollectionName::new("thermostat").unwrap();
        let rule = |f: &str| p.field_rule(&c, &FieldName::new(f).unwrap());
        assert_eq!(rule("runtime_s").merge, MergeRule::Counter);
        assert_eq!(rule("peak_temp").merge, MergeRule::Max);
        assert_eq!(
            rule("dose").merge,
            MergeRule::Review,
            "local fields may have rules"
        );
        assert_eq!(
            rule("limit_max"),
            FieldRule {
                merge: MergeRule::Lww,
                prefer: Some(Side::Hub)
            }
        );
        assert_eq!(rule("setpoint"), FieldRule::LWW);
        assert_eq!(p.history(&c), 20);
        let other = CollectionName::new("patients").unwrap();
        assert_eq!(p.history(&other), DEFAULT_HISTORY);
    }

    #[test]
    fn bad_rules_are_refused_with_their_key() {
        let e = err("[collections.p]\ndirection = \"up\"\nsync = []\nmerge = { x = \"sum\" }");
        assert!(e.contains("sum") && e.contains("counter"), "{e}");
        let e = err("[collections.p]\ndirection = \"up\"\nsync = []\nmerge = { x = \"counter\" }\nprefer = { x = \"hub\" }");
        assert!(
            e.contains("collections.p.prefer.x") && e.contains("counter"),
            "{e}"
        );
        let e =
            err("[collections.p]\ndirection = \"up\"\nsync = []\nprefer = { x = \"operator\" }");
        assert!(e.contains("operator"), "{e}");
        let e = err("[collections.p]\ndirection = \"up\"\nsync = []\nhistory = 5000");
        assert!(e.contains("collections.p.history"), "{e}");
        let e = err("[collections.p]\ndirection = \"up\"\nsync = []\nmerge = { \"\" = \"max\" }");
        assert!(e.contains("collections.p.merge."), "{e}");
    }

    #[test]
    fn the_fingerprint_follows_the_rules_and_nothing_else() {
        let fp = |text: &str| Policy::parse(text).unwrap().rules_fingerprint();
        let base = fp(RULED);
        assert_eq!(base.to_string().len(), 32);
        assert!(
            fp(BRIEF).is_none(),
            "no rules: the fingerprint of a hello from before rules"
        );
        // Other field lists and directions: same rules, same fingerprint.
        let narrower = RULED
            .replace("direction = \"both\"", "direction = \"up\"")
            .replace("\"setpoint\", ", "");
        assert_eq!(fp(&narrower), base);
        // An explicit lww is the default.
        let explicit = RULED.replace(", limit_max = \"lww\"", "");
        assert_eq!(fp(&explicit), base);
        for changed in [
            RULED.replace("\"max\"", "\"min\""),
            RULED.replace("\"hub\"", "\"agent\""),
            RULED.replace("runtime_s = \"counter\", ", ""),
        ] {
            assert_ne!(fp(&changed), base, "{changed}");
        }
        assert_ne!(fp(BRIEF), base);
    }

    const SCHEMA: &str = r#"
        [collections.thermostat]
        direction = "both"
        sync = ["setpoint", "mode", "runtime_s"]
        merge = { runtime_s = "counter" }
        schema = { setpoint = { type = "number", min = 5, max = 35 }, mode = ["eco", "away"], runtime_s = "integer" }
    "#;

    fn set(collection: &str, fields: &[(&str, serde_json::Value)]) -> Change {
        let version = Version {
            stamp: Stamp::new(1, 0),
            origin: Origin::new("a1").unwrap(),
        };
        let mut state = RecordState::default();
        for (f, v) in fields {
            state.fields.insert(
                FieldName::new(*f).unwrap(),
                crate::record::FieldState::plain(version.clone(), FieldValue::Set(v.clone())),
            );
        }
        Change {
            collection: CollectionName::new(collection).unwrap(),
            key: RecordKey::new("k").unwrap(),
            state,
        }
    }

    #[test]
    fn a_schema_checks_edits_and_strips_what_breaks_it_from_a_change() {
        let p = Policy::parse(SCHEMA).unwrap();
        let c = CollectionName::new("thermostat").unwrap();
        let f = |n: &str| FieldName::new(n).unwrap();
        assert!(p
            .check_edits(
                &c,
                &[
                    (f("setpoint"), Edit::Set(json!(20))),
                    (f("mode"), Edit::Delete)
                ]
            )
            .is_ok());
        // An increment is not a value; a field without a rule takes anything.
        assert!(p
            .check_edits(
                &c,
                &[
                    (f("runtime_s"), Edit::Add(-3)),
                    (f("note"), Edit::Set(json!([1])))
                ]
            )
            .is_ok());
        let v = p
            .check_edits(
                &c,
                &[
                    (f("mode"), Edit::Set(json!("eco"))),
                    (f("setpoint"), Edit::Set(json!(99))),
                ],
            )
            .unwrap_err();
        assert_eq!(
            v.to_string(),
            "field \"setpoint\" must be a number, from 5 to 35"
        );
        let other = CollectionName::new("diary").unwrap();
        assert!(p
            .check_edits(&other, &[(f("setpoint"), Edit::Set(json!(99)))])
            .is_ok());

        let (left, violations) = p.strip_invalid(set(
            "thermostat",
            &[("setpoint", json!(99)), ("mode", json!("eco"))],
        ));
        let left = left.unwrap();
        assert_eq!(left.state.fields.keys().collect::<Vec<_>>(), [&f("mode")]);
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].field, f("setpoint"));
        let (left, violations) = p.strip_invalid(set("thermostat", &[("mode", json!("off"))]));
        assert!(left.is_none());
        assert_eq!(violations[0].rule, "one of \"eco\", \"away\"");
        // A deleted field is no value: it passes.
        let mut deleted = set("thermostat", &[]);
        deleted.state.fields.insert(
            f("setpoint"),
            crate::record::FieldState::plain(
                Version {
                    stamp: Stamp::new(2, 0),
                    origin: Origin::new("a1").unwrap(),
                },
                FieldValue::Deleted,
            ),
        );
        let (left, violations) = p.strip_invalid(deleted.clone());
        assert_eq!((left, violations), (Some(deleted), vec![]));
    }

    #[test]
    fn a_bad_schema_is_refused_naming_its_key() {
        for (rule, want) in [
            (
                r#"setpoint = "text""#,
                "collections.t.schema.setpoint: unknown type",
            ),
            (
                r#"runtime_s = { max = 9 }"#,
                "collections.t.schema.runtime_s: a counter cannot be bounded",
            ),
            (
                r#"mode = { type = "bool", min = 1 }"#,
                "collections.t.schema.mode: min and max bound numbers",
            ),
            (r#""" = "string""#, "collections.t.schema."),
        ] {
            let text = format!(
                "[collections.t]\ndirection = \"up\"\nsync = [\"setpoint\"]\nmerge = {{ runtime_s = \"counter\" }}\nschema = {{ {rule} }}\n"
            );
            let e = Policy::parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{rule}: {e}");
        }
    }
}
