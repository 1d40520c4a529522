//! Agent labels and label selectors: an admin tags agents (`site=berlin`,
//! `model=gw3`) through `PUT /v1/agents/{agent}/labels`; a selector such as
//! `site=berlin,model!=gw2` picks the agents a broadcast write goes to or a
//! listing shows.
//!
//! Rules (the README repeats them): a label key is 1 to 63 characters of
//! ASCII letters, digits and `-_./`, starting with a letter or digit; a value
//! is 0 to 63 characters of letters, digits and `-_.`; an agent has at most
//! [`MAX_LABELS`] labels. A selector is one to [`MAX_REQUIREMENTS`]
//! requirements separated by commas, all of which must hold: `key=value` (or
//! `key==value`), `key!=value` (true too when the agent lacks the key), `key`
//! (has the key) and `!key` (lacks it).

use std::collections::BTreeMap;
use std::fmt;

/// An agent's labels, ordered by key.
pub type Labels = BTreeMap<String, String>;

/// Most labels on one agent.
pub const MAX_LABELS: usize = 32;
/// Longest label key or value.
pub const MAX_LABEL_LEN: usize = 63;
/// Most requirements in one selector.
pub const MAX_REQUIREMENTS: usize = 16;

/// Why labels or a selector were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("label key {0:?} is not 1 to 63 characters of letters, digits and -_./ starting with a letter or digit")]
    Key(String),
    #[error("the value of label {0:?} is not 0 to 63 characters of letters, digits and -_.")]
    Value(String),
    #[error("an agent has at most {MAX_LABELS} labels; got {0}")]
    TooMany(usize),
    #[error("a selector needs at least one requirement, such as site=berlin")]
    EmptySelector,
    #[error("a selector has at most {MAX_REQUIREMENTS} requirements; got {0}")]
    TooManyRequirements(usize),
    #[error("selector requirement {0:?} is empty")]
    EmptyRequirement(String),
}

fn key_ok(key: &str) -> bool {
    key.len() <= MAX_LABEL_LEN
        && key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn value_ok(value: &str) -> bool {
    value.len() <= MAX_LABEL_LEN
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Checks a whole label set.
pub fn validate(labels: &Labels) -> Result<(), LabelError> {
    if labels.len() > MAX_LABELS {
        return Err(LabelError::TooMany(labels.len()));
    }
    for (key, value) in labels {
        if !key_ok(key) {
            return Err(LabelError::Key(key.clone()));
        }
        if !value_ok(value) {
            return Err(LabelError::Value(key.clone()));
        }
    }
    Ok(())
}

/// One requirement of a selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
}

/// A parsed label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector(Vec<Requirement>);

impl Selector {
    /// Parses `site=berlin,model!=gw2,beta,!retired`.
    pub fn parse(text: &str) -> Result<Self, LabelError> {
        if text.trim().is_empty() {
            return Err(LabelError::EmptySelector);
        }
        let parts: Vec<&str> = text.split(',').map(str::trim).collect();
        if parts.len() > MAX_REQUIREMENTS {
            return Err(LabelError::TooManyRequirements(parts.len()));
        }
        let key = |k: &str| {
            let k = k.trim();
            if key_ok(k) {
                Ok(k.to_owned())
            } else {
                Err(LabelError::Key(k.to_owned()))
            }
        };
        let value = |k: &str, v: &str| {
            let v = v.trim();
            if value_ok(v) {
                Ok(v.to_owned())
            } else {
                Err(LabelError::Value(k.trim().to_owned()))
            }
        };
        let mut requirements = Vec::with_capacity(parts.len());
        for part in parts {
            let requirement = if part.is_empty() {
                return Err(LabelError::EmptyRequirement(text.to_owned()));
            } else if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEquals(key(k)?, value(k, v)?)
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::Equals(key(k)?, value(k, v)?)
            } else if let Some(k) = part.strip_prefix('!') {
                Requirement::Absent(key(k)?)
            } else {
                Requirement::Exists(key(part)?)
            };
            requirements.push(requirement);
        }
        Ok(Self(requirements))
    }

    /// Whether an agent with `labels` is selected.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::Absent(k) => !labels.contains_key(k),
        })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match r {
                Requirement::Equals(k, v) => write!(f, "{k}={v}")?,
                Requirement::NotEquals(k, v) => write!(f, "{k}!={v}")?,
                Requirement::Exists(k) => f.write_str(k)?,
                Requirement::Absent(k) => write!(f, "!{k}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selectors_match_as_documented() {
        let berlin_gw3 = labels(&[("site", "berlin"), ("model", "gw3")]);
        let paris = labels(&[("site", "paris"), ("retired", "")]);
        let none = Labels::new();
        let cases = [
            ("site=berlin", [true, false, false]),
            ("site==berlin", [true, false, false]),
            ("site = berlin , model=gw3", [true, false, false]),
            ("site!=berlin", [false, true, true]),
            ("model", [true, false, false]),
            ("!model", [false, true, true]),
            ("retired", [false, true, false]),
            ("site=berlin,model=gw2", [false, false, false]),
        ];
        for (text, expected) in cases {
            let selector = Selector::parse(text).unwrap();
            let got = [&berlin_gw3, &paris, &none].map(|l| selector.matches(l));
            assert_eq!(got, expected, "{text}");
        }
        assert_eq!(
            Selector::parse(" site = berlin ,!retired")
                .unwrap()
                .to_string(),
            "site=berlin,!retired"
        );
    }

    #[test]
    fn bad_selectors_are_refused() {
        for bad in [
            "",
            "  ",
            "site=berlin,",
            ",x",
            "-a=b",
            "site=ber lin",
            "a=b=c",
            "!",
            "x y",
        ] {
            assert!(Selector::parse(bad).is_err(), "{bad:?} parsed");
        }
        let many = vec!["a"; MAX_REQUIREMENTS + 1].join(",");
        assert_eq!(
            Selector::parse(&many),
            Err(LabelError::TooManyRequirements(MAX_REQUIREMENTS + 1))
        );
    }

    #[test]
    fn label_sets_are_checked() {
        assert!(validate(&labels(&[("site", "berlin"), ("example.com/tier", "")])).is_ok());
        assert_eq!(
            validate(&labels(&[("", "x")])),
            Err(LabelError::Key(String::new()))
        );
        assert_eq!(
            validate(&labels(&[("site", "a b")])),
            Err(LabelError::Value("site".into()))
        );
        let long = "x".repeat(MAX_LABEL_LEN + 1);
        assert!(validate(&labels(&[(&long, "v")])).is_err());
        assert!(validate(&labels(&[("k", &long)])).is_err());
        let many: Labels = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), String::new()))
            .collect();
        assert_eq!(validate(&many), Err(LabelError::TooMany(MAX_LABELS + 1)));
    }
}
