//! The sync session as a sans-IO state machine, used in both directions: the
//! agent's outbox and the hub's per-agent downstream queue are a [`Sender`]; the
//! hub's per-agent upstream watermark and the agent's downstream cursor are a
//! [`Receiver`]. They take events and return decisions; the caller does the I/O
//! (loading entries, publishing, committing) and keeps the durable state.
//!
//! The rules: a sender's queue holds sequence numbers `acked+1..=last`; it sends
//! them in order in batches, with at most `window` unacknowledged at once; an
//! entry leaves the queue only when the receiver acknowledges it; after a
//! reconnect it resends from the receiver's watermark. A receiver applies a batch
//! at most once, commits the entries and its new watermark together, and only
//! then acknowledges.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::wire::{Batch, Entry};

/// A position in one sender's queue. `Seq(0)` means "nothing yet"; the first
/// entry is `Seq(1)`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl Seq {
    /// The following sequence number. Saturates at `u64::MAX`: a peer can claim
    /// that watermark in a batch, and arithmetic on it must not panic.
    pub fn next(self) -> Seq {
        Seq(self.0.saturating_add(1))
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The peer acknowledged or claims to hold entries this sender never had.
    #[error("peer is at sequence {peer}, beyond the last queued entry {last}")]
    PeerAhead { peer: Seq, last: Seq },
    /// A batch starts after the receiver's next expected sequence number.
    #[error("sequence gap: expected at most {expected}, got a batch starting at {first}")]
    Gap { expected: Seq, first: Seq },
}

/// The sending half of one stream.
#[derive(Debug, Clone)]
pub struct Sender {
    acked: Seq,
    sent: Seq,
    last: Seq,
    connected: bool,
    window: u64,
}

impl Sender {
    /// A sender whose durable queue holds `acked+1..=last`; at most `window`
    /// sequence numbers may be in flight.
    pub fn new(acked: Seq, last: Seq, window: u64) -> Self {
        Self {
            acked,
            sent: acked,
            last,
            connected: false,
            window: window.max(1),
        }
    }

    /// The queue grew to `last` (a committed append).
    pub fn appended(&mut self, last: Seq) {
        self.last = self.last.max(last);
    }

    /// A connection is up and the receiver reports its watermark. Returns the
    /// sequence number up to which the queue may be trimmed, if it moved.
    pub fn connected(&mut self, peer_applied: Seq) -> Result<Option<Seq>, SessionError> {
        let trim = self.acked(peer_applied)?;
        self.connected = true;
        self.sent = self.acked;
        Ok(trim)
    }

    /// The connection dropped: whatever was unacknowledged will be resent.
    pub fn disconnected(&mut self) {
        self.connected = false;
        self.sent = self.acked;
    }

    /// The next range to load and send (at most `max_entries` long), or `None`
    /// when disconnected, the window is full, or nothing is waiting.
    pub fn next_range(&self, max_entries: u64) -> Option<(Seq, Seq)> {
        let in_flight = self.sent.0 - self.acked.0;
        if !self.connected || in_flight >= self.window || self.sent >= self.last {
            return None;
        }
        let room = (self.window - in_flight).min(max_entries.max(1));
        let first = self.sent.next();
        let last = Seq((first.0 + room - 1).min(self.last.0));
        Some((first, last))
    }

    /// Everything up to `upto` went out on the current connection.
    pub fn sent(&mut self, upto: Seq) {
        if self.connected {
            self.sent = self.sent.max(upto.min(self.last));
        }
    }

    /// The receiver acknowledged everything up to `upto`. Returns the sequence
    /// number up to which the durable queue may now be trimmed, if it moved.
    pub fn acked(&mut self, upto: Seq) -> Result<Option<Seq>, SessionError> {
        if upto > self.last {
            return Err(SessionError::PeerAhead {
                peer: upto,
                last: self.last,
            });
        }
        if upto <= self.acked {
            return Ok(None);
        }
        self.acked = upto;
        self.sent = self.sent.max(upto);
        Ok(Some(upto))
    }

    /// Sequence numbers sent on this connection and not yet acknowledged.
    pub fn in_flight(&self) -> u64 {
        self.sent.0 - self.acked.0
    }

    /// Go-back-N after an acknowledgement timeout: everything unacknowledged
    /// will be sent again (the receiver skips what it already applied).
    pub fn rewind(&mut self) {
        self.sent = self.acked;
    }

    /// How many entries wait for an acknowledgement (sent or not).
    pub fn pending(&self) -> u64 {
        self.last.0 - self.acked.0
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    pub fn acked_upto(&self) -> Seq {
        self.acked
    }
}

/// The receiving half of one stream: a durable watermark.
#[derive(Debug, Clone)]
pub struct Receiver {
    applied: Seq,
}

/// What to do with an incoming batch.
#[derive(Debug, PartialEq)]
pub enum Plan<'a> {
    /// Commit these entries together with the new watermark, then acknowledge it.
    Apply {
        entries: &'a [Entry],
        watermark: Seq,
    },
    /// Everything was applied before: acknowledge the current watermark again.
    Duplicate { watermark: Seq },
}

impl Receiver {
    /// A receiver that has durably applied everything up to `applied`.
    pub fn new(applied: Seq) -> Self {
        Self { applied }
    }

    pub fn applied(&self) -> Seq {
        self.applied
    }

    /// Decides what of `batch` is new. A batch that starts past the next expected
    /// sequence number is a gap: nothing is applied.
    pub fn plan<'a>(&self, batch: &'a Batch) -> Result<Plan<'a>, SessionError> {
        if batch.first > self.applied.next() {
            return Err(SessionError::Gap {
                expected: self.applied.next(),
                first: batch.first,
            });
        }
        if batch.last <= self.applied {
            return Ok(Plan::Duplicate {
                watermark: self.applied,
            });
        }
        let skip = batch.entries.partition_point(|e| e.seq <= self.applied);
        Ok(Plan::Apply {
            entries: &batch.entries[skip..],
            watermark: batch.last,
        })
    }

    /// The entries and `watermark` of a [`Plan::Apply`] are durably committed.
    pub fn committed(&mut self, watermark: Seq) {
        self.applied = self.applied.max(watermark);
    }
}
