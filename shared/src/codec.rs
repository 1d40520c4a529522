//! The one place that knows the byte encoding (CBOR, via serde_cbor): wire
//! envelopes and stored values. Swapping the CBOR library means changing this
//! file only.
//!
//! Decoding never panics on hostile input: sizes are checked before parsing,
//! serde_cbor bounds recursion, and every failure is a typed [`CodecError`].

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::id::{CollectionName, RecordKey};
use crate::record::Change;
use crate::session::SnapshotChunk;
use crate::wire::{Envelope, InvalidMessage, Message, MAX_MESSAGE_BYTES, WIRE_VERSION};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    #[error("message is {len} bytes; at most {max} are allowed")]
    TooLarge { len: usize, max: usize },
    #[error("malformed CBOR: {0}")]
    Malformed(String),
    #[error("unsupported envelope version {found}; this build speaks version {WIRE_VERSION}")]
    UnsupportedVersion { found: u16 },
    #[error("invalid message: {0}")]
    Invalid(#[from] InvalidMessage),
}

/// Encodes an envelope, refusing to produce one larger than the wire limit.
pub fn encode(envelope: &Envelope) -> Result<Vec<u8>, CodecError> {
    let bytes = to_bytes(envelope)?;
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(CodecError::TooLarge {
            len: bytes.len(),
            max: MAX_MESSAGE_BYTES,
        });
    }
    Ok(bytes)
}

/// Only the version, read before the body so a newer peer gets a clear answer.
#[derive(Deserialize)]
struct VersionOnly {
    v: u16,
}

/// Decodes and validates an envelope from untrusted bytes.
pub fn decode(bytes: &[u8]) -> Result<Envelope, CodecError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(CodecError::TooLarge {
            len: bytes.len(),
            max: MAX_MESSAGE_BYTES,
        });
    }
    let VersionOnly { v } = from_bytes(bytes)?;
    if v != WIRE_VERSION {
        return Err(CodecError::UnsupportedVersion { found: v });
    }
    let envelope: Envelope = from_bytes(bytes)?;
    match &envelope.msg {
        Message::Batch(batch) => batch.validate()?,
        Message::Snapshot(snapshot) => snapshot.validate()?,
        _ => {}
    }
    Ok(envelope)
}

/// Encodes any value (stored records, outbox entries) in the same CBOR form.
pub fn to_bytes<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    serde_cbor::to_vec(value)
        .map_err(|e| CodecError::Malformed(without_found_value(&e.to_string())))
}

/// Decodes any value written by [`to_bytes`].
pub fn from_bytes<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    serde_cbor::from_slice(bytes)
        .map_err(|e| CodecError::Malformed(without_found_value(&e.to_string())))
}

/// serde's "invalid type" and "invalid value" messages quote what they found
/// (`string "…"`, ``integer `…` ``): bytes from a peer or the store, maybe a
/// record's field value, and these messages are logged and sent to peers.
/// The quoted part is replaced by `…`; what was expected, and where, stay.
fn without_found_value(message: &str) -> String {
    let Some(start) = ["invalid type: ", "invalid value: "]
        .iter()
        .find_map(|marker| message.find(marker).map(|at| at + marker.len()))
    else {
        return message.to_owned();
    };
    let (head, found) = message.split_at(start);
    let Some(open) = found.find(['"', '`']) else {
        return message.to_owned();
    };
    let quote = found[open..].chars().next().unwrap_or('"');
    // The end of the quoted part: strings are quoted with escapes (Debug),
    // numbers, booleans and characters between backticks.
    let mut escaped = false;
    let mut close = found.len();
    for (i, c) in found[open + 1..].char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quote == '"' => escaped = true,
            c if c == quote => {
                close = open + 1 + i + c.len_utf8();
                break;
            }
            _ => {}
        }
    }
    format!("{head}{}{quote}…{quote}{}", &found[..open], &found[close..])
}

/// One snapshot part being read from a store's records, in key order: at most
/// `limit` records and (after the first) `max_bytes` of stored bytes.
pub struct SnapshotPage {
    out: Vec<Change>,
    total: usize,
    limit: usize,
    max_bytes: usize,
    more: bool,
}

impl SnapshotPage {
    pub fn new(limit: usize, max_bytes: usize) -> Self {
        Self {
            out: Vec::new(),
            total: 0,
            limit,
            max_bytes,
            more: false,
        }
    }

    /// Takes the stored record `collection`/`key`; returns `false` (taking
    /// nothing) once the page is full, so the caller stops reading.
    pub fn push(&mut self, collection: &str, key: &str, stored: &[u8]) -> Result<bool, CodecError> {
        self.total = self.total.saturating_add(stored.len());
        if self.out.len() >= self.limit || (self.total > self.max_bytes && !self.out.is_empty()) {
            self.more = true;
            return Ok(false);
        }
        let corrupt = |e: crate::id::IdError| CodecError::Malformed(e.to_string());
        self.out.push(Change {
            collection: CollectionName::new(collection).map_err(corrupt)?,
            key: RecordKey::new(key).map_err(corrupt)?,
            state: from_bytes(stored)?,
        });
        Ok(true)
    }

    /// The records, and where the next part starts if the page was full.
    pub fn finish(self) -> SnapshotChunk {
        let next = if self.more {
            self.out
                .last()
                .map(|c| (c.collection.clone(), c.key.clone()))
        } else {
            None
        };
        (self.out, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message<T: DeserializeOwned + std::fmt::Debug, V: Serialize>(value: V) -> String {
        match from_bytes::<T>(&to_bytes(&value).unwrap()) {
            Err(CodecError::Malformed(m)) => m,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn a_found_value_never_reaches_the_message() {
        let m = message::<u64, _>("canary-secret");
        assert!(
            m.starts_with("invalid type: string \"…\", expected u64"),
            "{m}"
        );
        let m = message::<String, _>(987_654_321u64);
        assert!(m.starts_with("invalid type: integer `…`, expected"), "{m}");
        assert!(!m.contains("987654321"), "{m}");
        // A quote inside the value does not end the redaction early.
        let m = message::<bool, _>("a\\\", expected x\" canary");
        assert!(!m.contains("canary") && !m.contains("expected x"), "{m}");
        let m = message::<u8, _>(-3i64);
        assert!(!m.contains("-3"), "{m}");
        // Everything else is left as it was.
        assert_eq!(
            without_found_value("missing field `seq`"),
            "missing field `seq`"
        );
    }
}
