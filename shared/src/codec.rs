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
    serde_cbor::to_vec(value).map_err(|e| CodecError::Malformed(e.to_string()))
}

/// Decodes any value written by [`to_bytes`].
pub fn from_bytes<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    serde_cbor::from_slice(bytes).map_err(|e| CodecError::Malformed(e.to_string()))
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
