//! The wire protocol between an agent and the hub: MQTT topics and the versioned
//! envelopes carried on them. Encoding lives in [`crate::codec`]; the protocol is
//! described for humans in `docs/wire-format.md`.

use serde::{Deserialize, Serialize};

use crate::hlc::Stamp;
use crate::id::{AgentId, CollectionName, FieldName, Origin, RecordKey};
use crate::policy::Flow;
use crate::record::{
    value_depth, Change, FieldValue, RecordState, Value, Version, MAX_VALUE_DEPTH,
};
use crate::rules::Fingerprint;
use crate::session::{Cursor, Incarnation, Mark, Seq};

/// The envelope version this build writes and reads.
pub const WIRE_VERSION: u16 = 2;
/// Largest encoded envelope accepted or produced, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;
/// Largest encoded change: what is left of a message after the envelope and
/// batch framing around one entry. Writes whose change would be larger are
/// refused where they enter (the local API, the operator API), so a sender can
/// always ship its next entry.
pub const MAX_CHANGE_BYTES: usize = MAX_MESSAGE_BYTES - 16 * 1024;
/// Most entries one batch may carry.
pub const MAX_BATCH_ENTRIES: usize = 10_000;

/// The topic layout's own version (`v1`) is not the envelope version: the
/// layout did not change with envelope version 2.
const TOPIC_ROOT: &str = "fieldsync/v1/agents";

/// Whether a write of `fields` to `collection`/`key` by `origin` encodes within
/// [`MAX_CHANGE_BYTES`] whatever stamp it gets (a partial update's change holds
/// exactly the written fields).
pub fn write_fits(
    collection: &CollectionName,
    key: &RecordKey,
    fields: &[(FieldName, Option<Value>)],
    origin: &Origin,
) -> bool {
    let version = Version {
        stamp: Stamp::new(u64::MAX, u32::MAX),
        origin: origin.clone(),
    };
    let state = RecordState::default().write(fields.iter().cloned(), &version);
    let change = Change {
        collection: collection.clone(),
        key: key.clone(),
        state,
    };
    crate::codec::to_bytes(&change).is_ok_and(|b| b.len() <= MAX_CHANGE_BYTES)
}

/// The topic an agent publishes to (agent to hub).
pub fn up_topic(agent: &AgentId) -> String {
    format!("{TOPIC_ROOT}/{agent}/up")
}

/// The topic the hub publishes to for one agent (hub to agent).
pub fn down_topic(agent: &AgentId) -> String {
    format!("{TOPIC_ROOT}/{agent}/down")
}

/// Splits a Fieldsync topic into its agent and direction; `None` for any other topic.
pub fn parse_topic(topic: &str) -> Option<(AgentId, Flow)> {
    let rest = topic.strip_prefix(TOPIC_ROOT)?.strip_prefix('/')?;
    let (agent, dir) = rest.split_once('/')?;
    let flow = match dir {
        "up" => Flow::Up,
        "down" => Flow::Down,
        _ => return None,
    };
    Some((AgentId::new(agent).ok()?, flow))
}

/// Every message on the wire: a version and a body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u16,
    pub msg: Message,
}

impl Envelope {
    /// Wraps `msg` in an envelope of the current version.
    pub fn new(msg: Message) -> Self {
        Self {
            v: WIRE_VERSION,
            msg,
        }
    }
}

/// The message bodies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Agent to hub, first on every connection: who it is (id and store
    /// incarnation), how far it has applied the hub's downstream stream, and
    /// its wall clock.
    Hello(Hello),
    /// Hub to agent, the answer to `Hello`: the hub's incarnation, how far it
    /// has applied the agent's upstream stream, and its wall clock.
    Welcome(Welcome),
    /// Either way: a run of the sender's queue with its sequence numbers.
    Batch(Batch),
    /// Either way: every sequence number up to `upto` is durably applied.
    Ack(Ack),
    /// Either way: one part of a resync, the sender's permitted state.
    Snapshot(Snapshot),
    /// Either way: a snapshot part is durably applied.
    SnapshotAck(SnapshotAck),
    /// Hub to agent, on a timer: the hub's wall clock.
    Time(Time),
    /// Agent to hub, on a timer while linked (only to a hub whose welcome
    /// said `health`): how the agent's outbox stands.
    Health(Health),
    /// Either way: a refusal with a reason.
    Error(ErrorMsg),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub agent: AgentId,
    /// The agent store's incarnation (its upstream stream's identity).
    pub incarnation: Incarnation,
    /// The agent's durable downstream cursor.
    pub down: Cursor,
    /// The agent's (corrected) wall clock when it sent this (ms since the
    /// Unix epoch).
    pub time_ms: u64,
    /// The correction the agent applies to its device clock (learned from
    /// earlier welcomes): the device clock's skew is `-correction_ms` plus
    /// what remains between `time_ms` and the hub's clock.
    pub correction_ms: i64,
    /// The fingerprint of the agent's merge rules. Encoded only when it has
    /// rules, so a hello without any is byte for byte what it was before.
    #[serde(default, skip_serializing_if = "Fingerprint::is_none")]
    pub rules: Fingerprint,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The hub store's incarnation (its downstream stream's identity).
    pub incarnation: Incarnation,
    /// The hub's durable cursor on this agent's upstream stream.
    pub up: Cursor,
    /// The hub's wall clock when it answered.
    pub time_ms: u64,
    /// The hub takes [`Message::Health`] reports. Absent (false) from hubs
    /// before it, which would refuse the message; encoded only when true, so
    /// an older welcome's bytes are unchanged.
    #[serde(default, skip_serializing_if = "is_false")]
    pub health: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A run of the sender's queue: every sequence number in `first..=last` is
/// covered; entries the sender's policy filtered to nothing are absent.
/// `check` is the check of the sender's entry at `last`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub first: Seq,
    pub last: Seq,
    pub check: u64,
    pub entries: Vec<Entry>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: Seq,
    pub change: Change,
}

/// The receiver's new position: `upto` and the check it was sent with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub upto: Seq,
    pub check: u64,
}

/// Part `part` (from 1) of resync `resync`: whole record states, permitted
/// for the direction. The last part carries `end`, the position the
/// receiver's cursor takes once every part is applied.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub resync: u64,
    pub part: u64,
    pub changes: Vec<Change>,
    pub end: Option<Mark>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotAck {
    pub resync: u64,
    pub part: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Time {
    pub time_ms: u64,
}

/// An agent's sync health, as it reports it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// Outbox entries not yet acknowledged by the hub.
    pub outbox_pending: u64,
    /// Bytes the outbox takes in the agent's store.
    pub outbox_bytes: u64,
    /// Age of the oldest pending entry (by its stamp), if any.
    pub oldest_pending_ms: Option<u64>,
    /// The highest outbox sequence number the hub acknowledged.
    pub acked: Seq,
    /// Entries acknowledged per second since the previous report.
    pub drain_per_s: f64,
    /// The correction the agent applies to its device clock (hub minus device).
    pub clock_offset_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMsg {
    pub code: ErrorCode,
    /// Human-readable detail. Never carries field values.
    pub message: String,
    /// The sequence number the error is about, if any.
    pub at: Option<Seq>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    Malformed,
    UnsupportedVersion,
    TooLarge,
    /// A batch started after the receiver's next expected sequence number
    /// (`at`): the sender resends from the receiver's position.
    SequenceGap,
    PolicyDenied,
    Internal,
    /// A batch, ack or snapshot arrived on a link the receiver holds no hello
    /// for, or for a stream it does not follow yet: say hello again.
    HelloFirst,
    /// An entry (`at`) is stamped further ahead of the receiver's clock than
    /// its drift bound: nothing was applied; the entries stay queued.
    ClockAhead,
    /// The hub refused this agent's store identity: another store uses the
    /// same certificate, or a store that was replaced came back.
    IdentityConflict,
    /// The agent's merge rules are not the hub's (their fingerprints
    /// differ): syncing would let the replicas diverge. Refused until both
    /// run one policy.
    RulesMismatch,
    /// The receiver applied a change without field values that break its
    /// schema (the message names the record, each field and its rule, never
    /// a value); the entry is acknowledged as usual. Informational: it
    /// changes nothing in the session.
    SchemaRefused,
}

/// Why a decoded message is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidMessage {
    #[error("batch range {first}..={last} is empty or reversed")]
    BadRange { first: Seq, last: Seq },
    #[error("batch holds {count} entries; at most {MAX_BATCH_ENTRIES} are allowed")]
    TooManyEntries { count: usize },
    #[error("entry {seq} is outside its batch or out of order")]
    EntryOutOfOrder { seq: Seq },
    #[error("entry {seq} holds a value nested deeper than {MAX_VALUE_DEPTH} levels")]
    TooDeep { seq: Seq },
    #[error("entry {seq} is an empty change")]
    EmptyChange { seq: Seq },
    #[error("snapshot part {part} is invalid: {reason}")]
    BadSnapshot { part: u64, reason: &'static str },
}

impl Batch {
    /// The longest run of `entries` (in order, the first being `first`) that
    /// encodes within [`MAX_MESSAGE_BYTES`], as a batch ending at its last entry.
    /// A single entry is always taken, so a sender never stalls; the encoder
    /// refuses it if it is too large on its own. Also returns the batch's
    /// encoded size. `check` is left 0 for the session to set.
    pub fn fit(first: Seq, entries: Vec<(Seq, Change)>) -> (Batch, usize) {
        /// Room for the envelope around the batch.
        const ENVELOPE_OVERHEAD: usize = 64;
        let mut entries: Vec<Entry> = entries
            .into_iter()
            .map(|(seq, change)| Entry { seq, change })
            .collect();
        loop {
            let last = entries.last().map_or(first, |e| e.seq);
            let batch = Batch {
                first,
                last,
                check: 0,
                entries,
            };
            let size = crate::codec::to_bytes(&batch).map_or(usize::MAX, |b| b.len());
            if batch.entries.len() <= 1 || size + ENVELOPE_OVERHEAD <= MAX_MESSAGE_BYTES {
                return (batch, size.saturating_add(ENVELOPE_OVERHEAD));
            }
            entries = batch.entries;
            entries.truncate(entries.len() / 2);
        }
    }

    /// Checks the invariants decoding alone cannot: a proper range, entries in
    /// strictly increasing order inside it, bounded size and nesting.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        if self.first.0 == 0 || self.first > self.last {
            return Err(InvalidMessage::BadRange {
                first: self.first,
                last: self.last,
            });
        }
        if self.entries.len() > MAX_BATCH_ENTRIES {
            return Err(InvalidMessage::TooManyEntries {
                count: self.entries.len(),
            });
        }
        let mut prev: Option<Seq> = None;
        for e in &self.entries {
            let in_order = prev.is_none_or(|p| e.seq > p);
            if !in_order || e.seq < self.first || e.seq > self.last {
                return Err(InvalidMessage::EntryOutOfOrder { seq: e.seq });
            }
            prev = Some(e.seq);
            if e.change.state.is_empty() {
                return Err(InvalidMessage::EmptyChange { seq: e.seq });
            }
            if too_deep(&e.change) {
                return Err(InvalidMessage::TooDeep { seq: e.seq });
            }
        }
        Ok(())
    }
}

fn too_deep(change: &Change) -> bool {
    change.state.fields.values().any(|f| match &f.value {
        FieldValue::Set(v) => value_depth(v) > MAX_VALUE_DEPTH,
        FieldValue::Deleted => false,
    })
}

impl Snapshot {
    /// Checks what decoding alone cannot: a part number from 1, bounded size,
    /// no empty or too deeply nested record.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        let bad = |reason| {
            Err(InvalidMessage::BadSnapshot {
                part: self.part,
                reason,
            })
        };
        if self.part == 0 {
            return bad("parts count from 1");
        }
        if self.changes.len() > MAX_BATCH_ENTRIES {
            return bad("too many records");
        }
        if self.changes.iter().any(|c| c.state.is_empty()) {
            return bad("an empty record");
        }
        if self.changes.iter().any(too_deep) {
            return bad("a value nested too deeply");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_fits_draws_the_line_below_the_message_limit() {
        let c = CollectionName::new("c").unwrap();
        let k = RecordKey::new("k").unwrap();
        let o = Origin::new("gw-1").unwrap();
        let field = |n: usize| {
            vec![(
                FieldName::new("f").unwrap(),
                Some(Value::String("x".repeat(n))),
            )]
        };
        assert!(write_fits(&c, &k, &field(MAX_CHANGE_BYTES - 1024), &o));
        assert!(!write_fits(&c, &k, &field(MAX_CHANGE_BYTES), &o));
        // Whatever fits also fits in a one-entry batch envelope.
        let version = Version {
            stamp: Stamp::new(u64::MAX, u32::MAX),
            origin: o,
        };
        let state = RecordState::default().write(field(MAX_CHANGE_BYTES - 1024), &version);
        let change = Change {
            collection: c,
            key: k,
            state,
        };
        let (batch, _) = Batch::fit(Seq(1), vec![(Seq(1), change)]);
        assert!(crate::codec::encode(&Envelope::new(Message::Batch(batch))).is_ok());
    }

    #[test]
    fn topics_round_trip() {
        let a = AgentId::new("gw-1").unwrap();
        assert_eq!(up_topic(&a), "fieldsync/v1/agents/gw-1/up");
        assert_eq!(parse_topic(&up_topic(&a)), Some((a.clone(), Flow::Up)));
        assert_eq!(parse_topic(&down_topic(&a)), Some((a, Flow::Down)));
        for bad in [
            "fieldsync/v1/agents/gw-1/sideways",
            "fieldsync/v1/agents/+/up",
            "fieldsync/v1/agents/gw-1/up/extra",
            "fieldsync/v2/agents/gw-1/up",
            "other",
        ] {
            assert_eq!(parse_topic(bad), None, "{bad}");
        }
    }
}
