//! Validated identifiers: agent ids, replica origins, collection names, record keys
//! and field names. Each is a newtype that can only hold a valid value.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    #[error("{kind} must not be empty")]
    Empty { kind: &'static str },
    #[error("{kind} is {len} bytes long; at most {max} are allowed")]
    TooLong {
        kind: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{kind} {value:?} contains {found:?}; allowed: {allowed}")]
    BadChar {
        kind: &'static str,
        value: String,
        found: char,
        allowed: &'static str,
    },
}

/// The character set of agent ids and collection names:
/// `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`. It excludes every MQTT topic
/// metacharacter (`+ # / $`), so such a name can be used as a topic level.
const NAME_ALLOWED: &str = "ASCII letters and digits, then also '.', '_' and '-'";

fn check_name(kind: &'static str, s: &str, max: usize) -> Result<(), IdError> {
    check_len(kind, s, max)?;
    for (i, c) in s.chars().enumerate() {
        let ok = c.is_ascii_alphanumeric() || (i > 0 && matches!(c, '.' | '_' | '-'));
        if !ok {
            return Err(IdError::BadChar {
                kind,
                value: s.to_owned(),
                found: c,
                allowed: NAME_ALLOWED,
            });
        }
    }
    Ok(())
}

/// Free-form text: any Unicode except control characters.
fn check_text(kind: &'static str, s: &str, max: usize) -> Result<(), IdError> {
    check_len(kind, s, max)?;
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(IdError::BadChar {
            kind,
            value: s.to_owned(),
            found: c,
            allowed: "any Unicode text without control characters",
        });
    }
    Ok(())
}

fn check_len(kind: &'static str, s: &str, max: usize) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if s.len() > max {
        return Err(IdError::TooLong {
            kind,
            len: s.len(),
            max,
        });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $check:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates `s`; the error says what is wrong with it.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                let check: fn(&str) -> Result<(), IdError> = $check;
                check(&s)?;
                Ok(Self(s))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

/// Maximum length of an agent id or a collection name, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Maximum length of a record key, in bytes.
pub const MAX_KEY_LEN: usize = 256;
/// Maximum length of a field name, in bytes.
pub const MAX_FIELD_LEN: usize = 128;

id_type!(
    /// An agent's identity: `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`. It is the CN of the
    /// agent's certificate and a level of its MQTT topics.
    AgentId,
    "agent id",
    |s| check_name("agent id", s, MAX_NAME_LEN)
);

id_type!(
    /// A collection name, same rules as [`AgentId`].
    CollectionName,
    "collection name",
    |s| check_name("collection name", s, MAX_NAME_LEN)
);

id_type!(
    /// A record key within a collection: 1 to 256 bytes of text without control
    /// characters (so `/`, spaces and non-ASCII letters are allowed).
    RecordKey,
    "record key",
    |s| check_text("record key", s, MAX_KEY_LEN)
);

id_type!(
    /// A field name within a record: 1 to 128 bytes of text without control characters.
    FieldName,
    "field name",
    |s| check_text("field name", s, MAX_FIELD_LEN)
);

id_type!(
    /// The replica that wrote a change: an agent id, or `@` followed by a hub
    /// replica name (for example `@hub`). The `@` keeps the two sets apart, so an
    /// agent can never be mistaken for a hub.
    Origin,
    "origin",
    |s| check_name("origin", s.strip_prefix('@').unwrap_or(s), MAX_NAME_LEN)
);

impl Origin {
    /// The origin of changes written by `agent`.
    pub fn agent(agent: &AgentId) -> Self {
        Self(agent.0.clone())
    }

    /// The origin of changes written by the hub replica `name`.
    pub fn hub(name: &str) -> Result<Self, IdError> {
        Self::new(format!("@{name}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_ids_follow_the_documented_pattern() {
        for ok in ["a", "A9", "gw-01.site_b", &"x".repeat(64)] {
            assert!(AgentId::new(ok).is_ok(), "{ok}");
        }
        assert_eq!(AgentId::new(""), Err(IdError::Empty { kind: "agent id" }));
        assert!(matches!(
            AgentId::new("x".repeat(65)),
            Err(IdError::TooLong {
                len: 65,
                max: 64,
                ..
            })
        ));
        for bad in ["-a", ".a", "_a", "a/b", "a+b", "a#", "$SYS", "a b", "é"] {
            assert!(
                matches!(AgentId::new(bad), Err(IdError::BadChar { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn keys_and_fields_allow_text_but_not_control_characters() {
        assert!(RecordKey::new("room 1/sensor é").is_ok());
        assert!(RecordKey::new("a\nb").is_err());
        assert!(RecordKey::new("k".repeat(257)).is_err());
        assert!(FieldName::new("heart rate").is_ok());
        assert!(FieldName::new("a\u{7f}").is_err());
        assert!(FieldName::new("").is_err());
    }

    #[test]
    fn origins_separate_agents_from_hubs() {
        let a = AgentId::new("hub").unwrap();
        assert_ne!(Origin::agent(&a), Origin::hub("hub").unwrap());
        assert!(Origin::new("@@x").is_err());
        assert!(Origin::new("@").is_err());
    }

    #[test]
    fn deserialisation_validates() {
        let err = serde_json::from_str::<AgentId>("\"a/b\"").unwrap_err();
        assert!(err.to_string().contains("agent id"), "{err}");
    }
}
