//! The whole sync session as a sans-IO state machine, one type for both sides.
//!
//! A [`Session`] is one replica's view of its link to one peer: the agent holds
//! one for the hub, the hub one per connected agent. Each session has a
//! [`Sender`] (the agent's outbox, the hub's per-agent downstream queue) and a
//! [`Receiver`] (the hub's per-agent upstream cursor, the agent's downstream
//! cursor). It takes events — `connected`, `on_message(msg, now)`,
//! `on_tick(now)`, `appended`, and the results of loads the driver did for it —
//! and queues [`Action`]s for the driver, taken with [`Session::poll`]: send a
//! message, load entries, commit changes with a cursor, trim the queue, apply a
//! clock offset. Time and ids are passed in; there is no IO here. Every rule of
//! the protocol (hello/welcome, the window, the ack timeout, go-back-N, gaps,
//! incarnations, resync, clock bounds) lives in this file; the drivers in
//! `agent/src/link.rs` and `hub/src/engine.rs` only move bytes, time and
//! storage results. `docs/wire-format.md` describes the same rules for people.
//!
//! Streams are identified by the sender's store [`Incarnation`]; a receiver's
//! durable [`Cursor`] names the incarnation it follows and the last position it
//! applied, with that position's check (a digest of the entry, or a token the
//! sender chose at a resync), so a sender can tell a receiver that is on its
//! history from one that was wiped, restored from an older copy, or is ahead of
//! a sender that was itself restored. Anything that cannot be replayed from the
//! queue is repaired by a snapshot of the sender's permitted state.

use std::collections::VecDeque;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::id::{AgentId, CollectionName, RecordKey};
use crate::record::Change;
use crate::rules::Fingerprint;
use crate::wire::{
    Ack, Batch, Entry, ErrorCode, ErrorMsg, Hello, Message, Snapshot, SnapshotAck, Time, Welcome,
};

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

/// A store's identity over time: a random non-zero number drawn when the store
/// is created and kept in it. A wiped or replaced store has a new one; a store
/// restored from a copy has the copy's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Incarnation(pub u64);

impl fmt::Display for Incarnation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A position in a stream and its check: the digest of the sender's entry at
/// `seq` ([`entry_check`]), or the token a resync ended with. `Seq(0)` has
/// check 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    pub seq: Seq,
    pub check: u64,
}

/// A receiver's durable watermark: whose stream it follows (`None` for a store
/// that never synced) and how far it has applied it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub source: Option<Incarnation>,
    pub at: Mark,
}

/// The check of a queued entry: 64-bit FNV-1a over its canonical encoding
/// (the golden fixtures pin that encoding, so the check is stable across
/// builds). Two different entries at one sequence number are told apart with
/// near certainty, which is what catches a sender that reuses numbers after a
/// restore.
pub fn entry_check(change: &Change) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let bytes = crate::codec::to_bytes(change).unwrap_or_default();
    let hash = bytes
        .iter()
        .fold(OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    hash.max(1)
}

/// The two clocks a session reads: a monotonic one for its timers (never
/// jumps, so a corrected wall clock cannot fire or stall them) and the wall
/// clock (milliseconds since the Unix epoch, as corrected by the driver) for
/// stamps and clock bounds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Now {
    pub mono_ms: u64,
    pub wall_ms: u64,
}

/// A record's address, the cursor of a snapshot being read.
pub type RecordAddr = (CollectionName, RecordKey);

/// Records read for a snapshot part, and where the next part starts (`None`:
/// the last part).
pub type SnapshotChunk = (Vec<Change>, Option<RecordAddr>);

/// Timeouts and bounds of a session. Both sides use the same defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    /// Without an acknowledgement (or an answer to hello) for this long, send again.
    pub ack_timeout_ms: u64,
    /// Most sequence numbers in flight.
    pub window_entries: u64,
    /// Most encoded batch bytes in flight.
    pub window_bytes: usize,
    /// Most entries in one batch (fewer if the bytes would not fit).
    pub batch_entries: u64,
    /// Largest amount a peer's stamp may be ahead of the receiver's clock.
    pub max_drift_ms: u64,
    /// How often the hub sends its wall clock to a linked agent.
    pub clock_interval_ms: u64,
    /// Agent: how long to stay away after the hub refused this store's
    /// identity (connecting sooner would take the connection over from the
    /// device the hub accepts, again and again).
    pub refused_retry_ms: u64,
    /// Agent: how often it reports its sync health to a hub that takes
    /// reports (the first right after the welcome); 0: never.
    pub health_interval_ms: u64,
    /// The fingerprint of this side's merge rules: the hub refuses a hello
    /// whose rules differ.
    pub rules: Fingerprint,
}

/// What the agent's driver measures of its outbox for a health report.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct OutboxHealth {
    pub pending: u64,
    pub bytes: u64,
    pub oldest_pending_ms: Option<u64>,
    pub acked: Seq,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            ack_timeout_ms: 5_000,
            window_entries: 4096,
            window_bytes: 8 << 20,
            batch_entries: 512,
            max_drift_ms: crate::hlc::DEFAULT_MAX_DRIFT_MS,
            clock_interval_ms: 60_000,
            refused_retry_ms: 300_000,
            health_interval_ms: 10_000,
            rules: Fingerprint::default(),
        }
    }
}

/// Which end of the link a session is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Says hello; its sender is the outbox, its receiver the downstream cursor.
    Agent,
    /// Answers with welcome; its sender is the per-agent downstream queue.
    Hub,
}

/// Why a sender resynchronises its receiver by snapshot instead of replaying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResyncReason {
    /// The receiver follows another incarnation of this sender, or none: it is
    /// new, or this sender's store was replaced.
    NewReceiver,
    /// The receiver is behind what this sender already trimmed: it was
    /// restored from an older copy.
    ReceiverBehind,
    /// The receiver is past this sender's last entry: this sender was restored.
    SenderBehind,
    /// The receiver's check differs from this sender's entry at that position:
    /// this sender reused sequence numbers for other content (restored, then
    /// written again), or two stores share an identity.
    Diverged,
}

/// What the driver must do, in order.
#[derive(Debug)]
pub enum Action {
    /// Publish this message to the peer.
    Send(Message),
    /// Load queued entries from `first` (at most `last - first + 1` and one
    /// message's worth of bytes), then call [`Session::batch_loaded`].
    LoadBatch { first: Seq, last: Seq },
    /// Load the queued entry at `seq` (the peer's reported position), then call
    /// [`Session::verified`].
    Verify { seq: Seq },
    /// Load the next chunk of the permitted state after `after` (from the
    /// start when `None`), then call [`Session::snapshot_loaded`].
    LoadSnapshot { after: Option<RecordAddr> },
    /// Merge `changes` and, if given, set the receiver cursor, in **one durable**
    /// transaction; only after it is committed, send `then`. A failed commit
    /// must not send `then` (the driver stops; the peer resends). `snapshot`
    /// says the changes are whole record states from a resync (they may carry
    /// the receiver's own writes back), not queue entries.
    Commit {
        changes: Vec<Change>,
        cursor: Option<Cursor>,
        snapshot: bool,
        then: Message,
    },
    /// The peer holds everything up to `mark`: trim the queue to it and store
    /// the mark as the trim point (a commit that need not be durable).
    /// `resync`: the peer got there by a snapshot that just completed.
    Trim { mark: Mark, resync: bool },
    /// Agent only: the hub's clock minus the wall clock the driver passes in,
    /// measured now (0 when the difference is measurement noise). Add it to
    /// the correction the driver applies to its wall clock, then re-stamp
    /// what was written with a clock that ran ahead (also when it is 0: the
    /// device clock may have been set right meanwhile), before the next
    /// action.
    ClockOffset { offset_ms: i64 },
    /// Hub only: the agent's clock minus ours, measured at its hello.
    ClockSkew { skew_ms: i64 },
    /// Agent only: measure the outbox ([`OutboxHealth`]), then call
    /// [`Session::health_loaded`].
    LoadHealth,
    /// Hub only: the agent reported its sync health.
    Health(crate::wire::Health),
    /// Something the operator should see: counted and logged by the driver.
    Report(Report),
}

/// Events a driver counts and logs; never carry field values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Report {
    /// A resync by snapshot started (we are the sender).
    ResyncStarted { reason: ResyncReason },
    /// A resync we received finished: our cursor follows the peer again.
    ResyncCompleted,
    /// The peer refused entries whose stamps are beyond its clock bound; they
    /// stay queued. `seq` is the first refused entry.
    ClockRefusedByPeer { seq: Option<Seq> },
    /// We refused a peer's entry stamped beyond our clock bound.
    ClockRefused { seq: Option<Seq>, ahead_ms: u64 },
    /// Go-back-N after an acknowledgement timeout.
    Resend,
    /// A batch we already hold came again (a resend): acknowledged again,
    /// applied once.
    Duplicate,
    /// The peer reported a gap: the stream restarts from its watermark.
    PeerGap,
    /// The peer acknowledged something we never sent.
    BadAck { upto: Seq },
    /// The peer sent a protocol error.
    PeerError { code: ErrorCode },
    /// The hub refused this agent's store identity (cloned certificate, or a
    /// store replaced earlier that came back).
    IdentityRefused,
    /// The hub refused the link: this agent's merge rules are not the hub's.
    RulesRefused,
    /// The peer applied a change of ours without field values that break
    /// its schema (`detail` names the record, fields and rules, never a
    /// value). The rest of the change applied; the entry is acknowledged.
    SchemaRefusedByPeer { detail: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The peer acknowledged or claims to hold entries this sender never had.
    #[error("peer is at sequence {peer}, beyond the last queued entry {last}")]
    PeerAhead { peer: Seq, last: Seq },
}

// ---- Sender ----------------------------------------------------------------

/// The sending half: a queue `acked+1..=last`, a window of batches in flight,
/// and an optional resync by snapshot.
#[derive(Debug, Clone)]
pub struct Sender {
    own: Incarnation,
    acked: Mark,
    last: Seq,
    sent: Seq,
    /// Batches in flight: their last sequence number, encoded size and check.
    flight: VecDeque<(Seq, usize, u64)>,
    flight_bytes: usize,
    state: SendState,
    /// Gives every resync a distinct id and end token.
    resyncs: u64,
    cfg: SessionConfig,
}

#[derive(Debug, Clone, PartialEq)]
enum SendState {
    /// Not linked, or not yet told where the receiver is.
    Idle,
    /// Waiting for the entry at the receiver's position, to compare checks.
    Verifying(Cursor),
    /// Streaming batches.
    Streaming,
    /// Sending a snapshot.
    Resyncing(Resync),
    /// The receiver refused our stamps: nothing is sent until the next link.
    Paused,
}

#[derive(Debug, Clone, PartialEq)]
struct Resync {
    id: u64,
    part: u64,
    /// Where the receiver's cursor lands when the snapshot is complete.
    end: Mark,
    after: Option<RecordAddr>,
    /// The part sent and not yet acknowledged (kept for a resend).
    unacked: Option<Snapshot>,
    /// Records loaded that did not fit the last part.
    pending: VecDeque<Change>,
    /// The store has no records after `after`.
    exhausted: bool,
    loading: bool,
    done: bool,
}

impl Sender {
    /// A sender for the stream of incarnation `own`, whose durable queue holds
    /// `acked.seq+1..=last`.
    pub fn new(own: Incarnation, acked: Mark, last: Seq, cfg: SessionConfig) -> Self {
        Self {
            own,
            acked,
            last: last.max(acked.seq),
            sent: acked.seq,
            flight: VecDeque::new(),
            flight_bytes: 0,
            state: SendState::Idle,
            resyncs: 0,
            cfg,
        }
    }

    /// Sequence numbers not yet acknowledged (sent or not).
    pub fn pending(&self) -> u64 {
        self.last.0 - self.acked.seq.0
    }

    /// Sequence numbers sent on this link and not yet acknowledged.
    pub fn in_flight(&self) -> u64 {
        self.sent.0 - self.acked.seq.0
    }

    /// The trim point.
    pub fn acked(&self) -> Mark {
        self.acked
    }

    pub fn last(&self) -> Seq {
        self.last
    }

    /// Whether a snapshot is being sent.
    pub fn resyncing(&self) -> bool {
        matches!(self.state, SendState::Resyncing(_))
    }

    fn reset_flight(&mut self) {
        self.sent = self.acked.seq;
        self.flight.clear();
        self.flight_bytes = 0;
    }

    fn stop(&mut self) {
        self.state = SendState::Idle;
        self.reset_flight();
    }

    /// Decides how to resume towards a receiver at `peer`, given the entry this
    /// sender holds at `peer.at.seq` (if any). Pure: the caller applies it.
    pub fn resume_plan(&self, peer: &Cursor, found: Option<&Change>) -> Result<Seq, ResyncReason> {
        if peer.source != Some(self.own) {
            return Err(ResyncReason::NewReceiver);
        }
        let at = peer.at.seq;
        if at < self.acked.seq {
            return Err(ResyncReason::ReceiverBehind);
        }
        if at > self.last {
            return Err(ResyncReason::SenderBehind);
        }
        let expected = if at == self.acked.seq {
            Some(self.acked.check)
        } else {
            found.map(entry_check)
        };
        if at.0 > 0 && expected != Some(peer.at.check) {
            return Err(ResyncReason::Diverged);
        }
        Ok(at)
    }

    /// The seq whose entry [`Sender::resume_plan`] needs, if any.
    fn needs_entry(&self, peer: &Cursor) -> Option<Seq> {
        let at = peer.at.seq;
        (peer.source == Some(self.own) && at > self.acked.seq && at <= self.last).then_some(at)
    }

    fn can_send(&self) -> bool {
        let in_flight = self.in_flight();
        self.state == SendState::Streaming
            && self.sent < self.last
            && in_flight < self.cfg.window_entries
            && self.flight_bytes < self.cfg.window_bytes
    }

    /// The next range to load, if the window has room.
    fn next_range(&self) -> Option<(Seq, Seq)> {
        if !self.can_send() {
            return None;
        }
        let room = (self.cfg.window_entries - self.in_flight()).min(self.cfg.batch_entries.max(1));
        let first = self.sent.next();
        let last = Seq((first.0 + room - 1).min(self.last.0));
        Some((first, last))
    }

    /// The receiver acknowledged `upto` with `check`. Returns the new trim
    /// point if it moved.
    fn on_ack(&mut self, upto: Seq, check: u64) -> Result<Option<Mark>, SessionError> {
        // Only what went out on this link, with the check it went out with:
        // an ack meant for another store of this identity, or for an earlier
        // link, must not trim entries this sender never sent.
        let mismatch = self
            .flight
            .iter()
            .any(|&(last, _, c)| last == upto && c != check);
        if upto > self.last || upto > self.sent || mismatch {
            return Err(SessionError::PeerAhead {
                peer: upto,
                last: self.sent,
            });
        }
        if upto <= self.acked.seq {
            return Ok(None);
        }
        self.acked = Mark { seq: upto, check };
        while self.flight.front().is_some_and(|(s, _, _)| *s <= upto) {
            if let Some((_, bytes, _)) = self.flight.pop_front() {
                self.flight_bytes -= bytes;
            }
        }
        Ok(Some(self.acked))
    }
}

// ---- Receiver --------------------------------------------------------------

/// The receiving half: the durable cursor and the sender it follows on this link.
#[derive(Debug, Clone)]
pub struct Receiver {
    /// As planned: advanced when a commit is handed to the driver (a failed
    /// commit stops the driver, so nothing is acknowledged ahead of the store).
    cursor: Cursor,
    /// The peer's incarnation, from its hello or welcome.
    peer: Option<Incarnation>,
    /// The resync being received: its id and the last part applied.
    resync: Option<(u64, u64)>,
    /// The cursor when this link said (or answered) hello.
    start: Cursor,
}

/// What to do with an incoming batch.
#[derive(Debug, PartialEq)]
pub enum Plan<'a> {
    /// Commit these entries with the new cursor, then acknowledge it.
    Apply {
        entries: &'a [Entry],
        cursor: Cursor,
    },
    /// Everything was applied before: acknowledge the current position again.
    Duplicate { at: Mark },
}

/// Why a batch cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No hello/welcome on this link yet, or the cursor follows another
    /// incarnation of the peer (it must resync first).
    NotSynced,
    Gap {
        expected: Seq,
    },
    ClockAhead {
        seq: Seq,
        ahead_ms: u64,
    },
}

impl Receiver {
    pub fn new(cursor: Cursor) -> Self {
        Self {
            cursor,
            peer: None,
            resync: None,
            start: cursor,
        }
    }

    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// Decides what of `batch` is new. Pure.
    pub fn plan<'a>(
        &self,
        batch: &'a Batch,
        now_ms: u64,
        max_drift_ms: u64,
    ) -> Result<Plan<'a>, Refusal> {
        if self.peer.is_none() || self.cursor.source != self.peer {
            return Err(Refusal::NotSynced);
        }
        let applied = self.cursor.at.seq;
        if batch.first > applied.next() {
            return Err(Refusal::Gap {
                expected: applied.next(),
            });
        }
        if batch.last <= applied {
            return Ok(Plan::Duplicate { at: self.cursor.at });
        }
        let skip = batch.entries.partition_point(|e| e.seq <= applied);
        let entries = &batch.entries[skip..];
        for e in entries {
            if let Some(ahead_ms) = ahead_of(&e.change, now_ms, max_drift_ms) {
                return Err(Refusal::ClockAhead {
                    seq: e.seq,
                    ahead_ms,
                });
            }
        }
        Ok(Plan::Apply {
            entries,
            cursor: Cursor {
                source: self.peer,
                at: Mark {
                    seq: batch.last,
                    check: batch.check,
                },
            },
        })
    }
}

/// How far `change`'s newest stamp is ahead of `now_ms`, if beyond the bound.
pub fn ahead_of(change: &Change, now_ms: u64, max_drift_ms: u64) -> Option<u64> {
    let v = change.state.max_version()?;
    let ahead = v.stamp.wall_ms.saturating_sub(now_ms);
    (ahead > max_drift_ms).then_some(ahead)
}

// ---- Hub identity check -----------------------------------------------------

/// How many replaced incarnations the hub remembers per agent.
pub const RETIRED_KEPT: usize = 16;

/// The store identities the hub has seen for one agent id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The incarnation the hub links with now.
    pub current: Option<Incarnation>,
    /// Incarnations that were replaced (newest last).
    pub retired: Vec<Incarnation>,
}

/// The hub's answer to a hello's incarnation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// The known store.
    Known,
    /// A new store for this id (first contact, or a re-imaged device): the
    /// identity record changes to this.
    Replaced(Identity),
    /// A replaced store came back, or another live connection has another
    /// store: two devices share one certificate. Refused.
    Conflict,
}

impl Identity {
    /// Decides on a hello from `incarnation`; `live` is the incarnation of
    /// another connection of this agent that is linked right now, if any.
    pub fn admit(&self, incarnation: Incarnation, live: Option<Incarnation>) -> Admission {
        if live.is_some_and(|l| l != incarnation) || self.retired.contains(&incarnation) {
            return Admission::Conflict;
        }
        if self.current == Some(incarnation) {
            return Admission::Known;
        }
        let mut next = self.clone();
        if let Some(old) = next.current.replace(incarnation) {
            next.retired.push(old);
            let excess = next.retired.len().saturating_sub(RETIRED_KEPT);
            next.retired.drain(..excess);
        }
        Admission::Replaced(next)
    }
}

// ---- Session -----------------------------------------------------------------

/// One link's whole protocol state on one side. Drivers execute the actions
/// from [`Session::poll`] in order, each to completion (a load's result is
/// handed back before the next poll).
#[derive(Debug)]
pub struct Session {
    role: Role,
    cfg: SessionConfig,
    agent: AgentId,
    pub sender: Sender,
    pub receiver: Receiver,
    link: LinkState,
    /// Monotonic time something last moved (an ack, a welcome, a snapshot
    /// ack, the first batch put in flight): the ack timer runs from it.
    last_progress_ms: u64,
    /// Monotonic time the hub last sent its clock.
    last_clock_ms: u64,
    /// Agent: the correction its driver applies to the device clock.
    correction_ms: i64,
    /// Hub: the welcome to send once the downstream is decided (the hub's
    /// wall clock at the hello).
    welcome_at: Option<u64>,
    /// Agent: the hub takes health reports; when (monotonic) and at which
    /// acknowledged position the last one was made.
    peer_health: bool,
    last_health: Option<(u64, Seq)>,
    /// Agent: a report is asked for (not yet loaded), or due at once (a new link).
    health_asked: bool,
    health_now: bool,
    out: VecDeque<Action>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkState {
    Down,
    /// Agent: hello sent at this wall time, no welcome yet.
    Hello {
        sent_mono_ms: u64,
    },
    Linked,
    /// Agent: the hub refused this store's identity; the driver ends the
    /// link and tries again after `refused_retry_ms`.
    Refused,
}

impl Session {
    /// The agent's session: its outbox (`acked`, `last`) and its durable
    /// downstream cursor `down`.
    pub fn agent(
        agent: AgentId,
        own: Incarnation,
        acked: Mark,
        last: Seq,
        down: Cursor,
        cfg: SessionConfig,
    ) -> Self {
        Self {
            role: Role::Agent,
            cfg,
            agent,
            sender: Sender::new(own, acked, last, cfg),
            receiver: Receiver::new(down),
            link: LinkState::Down,
            last_progress_ms: 0,
            last_clock_ms: 0,
            correction_ms: 0,
            welcome_at: None,
            peer_health: false,
            last_health: None,
            health_asked: false,
            health_now: false,
            out: VecDeque::new(),
        }
    }

    /// The hub's answer to `hello` on a new link: `acked`/`last` are the hub's
    /// downstream queue for the agent, `up` its upstream cursor, `identity`
    /// the store identities it has seen for the agent, and `live` the
    /// incarnation of another linked connection of this agent, if any.
    /// Returns the linked session and the identity record to persist if it
    /// changed, or the refusal to send.
    #[allow(clippy::too_many_arguments)]
    pub fn hub(
        hello: &Hello,
        own: Incarnation,
        acked: Mark,
        last: Seq,
        up: Cursor,
        identity: &Identity,
        live: Option<Incarnation>,
        now: Now,
        cfg: SessionConfig,
    ) -> Result<(Self, Option<Identity>), Message> {
        if hello.rules != cfg.rules {
            return Err(error(
                ErrorCode::RulesMismatch,
                &format!(
                    "the agent merges under rules {}, the hub under {}: run one policy (its merge and prefer tables) on both; refused",
                    hello.rules, cfg.rules
                ),
                None,
            ));
        }
        let changed = match identity.admit(hello.incarnation, live) {
            Admission::Known => None,
            Admission::Replaced(next) => Some(next),
            Admission::Conflict => {
                return Err(error(
                    ErrorCode::IdentityConflict,
                    "another store holds this agent's identity (a cloned certificate, or a replaced store came back); refused",
                    None,
                ))
            }
        };
        let mut s = Self {
            role: Role::Hub,
            cfg,
            agent: hello.agent.clone(),
            sender: Sender::new(own, acked, last, cfg),
            receiver: Receiver::new(up),
            link: LinkState::Linked,
            last_progress_ms: now.mono_ms,
            last_clock_ms: now.mono_ms,
            correction_ms: 0,
            welcome_at: None,
            peer_health: false,
            last_health: None,
            health_asked: false,
            health_now: false,
            out: VecDeque::new(),
        };
        s.receiver.peer = Some(hello.incarnation);
        // Resync ids grow from one session to the next on a link (a hello
        // sent again, or delivered twice, makes another session): by
        // monotonic time, then by queue length (sessions of one millisecond
        // with the same queue resync to the same end). An ack or a part of an
        // earlier session's resync still in flight must not pass for one of
        // this session's, and the receiver drops parts of older resyncs.
        s.sender.resyncs = now
            .mono_ms
            .saturating_mul(1 << 24)
            .saturating_add(last.0 & 0xff_ffff);
        // The device clock's skew: what the agent corrects plus what remains.
        s.push(Action::ClockSkew {
            skew_ms: signed_diff(hello.time_ms, now.wall_ms).saturating_sub(hello.correction_ms),
        });
        // The welcome waits for the downstream decision (it may need the
        // entry at the agent's cursor): see `decide`.
        s.welcome_at = Some(now.wall_ms);
        s.resume(hello.down);
        Ok((s, changed))
    }

    /// Whether the peer has answered on this link (agent: welcomed).
    pub fn is_linked(&self) -> bool {
        self.link == LinkState::Linked
    }

    /// Whether the hub refused this agent's identity on the current link.
    pub fn is_refused(&self) -> bool {
        self.link == LinkState::Refused
    }

    /// The peer's store incarnation on this link, once known.
    pub fn peer_incarnation(&self) -> Option<Incarnation> {
        self.receiver.peer
    }

    /// Whether the sender stopped because the peer refused its stamps.
    pub fn is_paused(&self) -> bool {
        self.sender.state == SendState::Paused
    }

    /// The next thing for the driver to do.
    pub fn poll(&mut self) -> Option<Action> {
        if self.out.is_empty() {
            self.pump();
        }
        self.out.pop_front()
    }

    fn push(&mut self, a: Action) {
        self.out.push_back(a);
    }

    /// Agent: the transport is up (or the hub asked for it): say hello.
    /// `now.wall_ms` is the corrected clock; `correction_ms` the correction
    /// applied to the device clock to get it (0 if none).
    pub fn connected_with(&mut self, now: Now, correction_ms: i64) {
        self.correction_ms = correction_ms;
        self.connected(now);
    }

    /// Agent: the transport is up (or the hub asked for it): say hello.
    pub fn connected(&mut self, now: Now) {
        self.sender.stop();
        self.receiver.peer = None;
        self.receiver.resync = None;
        self.receiver.start = self.receiver.cursor;
        self.link = LinkState::Hello {
            sent_mono_ms: now.mono_ms,
        };
        self.last_progress_ms = now.mono_ms;
        self.push(Action::Send(Message::Hello(Hello {
            agent: self.agent.clone(),
            incarnation: self.sender.own,
            down: self.receiver.cursor,
            time_ms: now.wall_ms,
            correction_ms: self.correction_ms,
            rules: self.cfg.rules,
        })));
    }

    /// The transport went down: whatever was unacknowledged will be resent.
    pub fn disconnected(&mut self) {
        self.link = LinkState::Down;
        self.sender.stop();
        self.receiver.peer = None;
        self.receiver.resync = None;
        self.out.clear();
    }

    /// The queue grew to `last` (a committed append).
    pub fn appended(&mut self, last: Seq) {
        self.sender.last = self.sender.last.max(last);
    }

    /// A message from the peer.
    pub fn on_message(&mut self, msg: Message, now: Now) {
        match msg {
            Message::Welcome(w) if self.role == Role::Agent => self.on_welcome(w, now),
            Message::Time(Time { time_ms }) if self.role == Role::Agent => {
                if self.is_linked() {
                    self.push(clock_offset(signed_diff(time_ms, now.wall_ms)));
                }
            }
            Message::Batch(b) => self.on_batch(b, now),
            // Acks count only on a linked, streaming session.
            Message::Ack(_) if !self.is_linked() || self.sender.state != SendState::Streaming => {}
            Message::Ack(Ack { upto, check }) => match self.sender.on_ack(upto, check) {
                Ok(Some(mark)) => {
                    self.last_progress_ms = now.mono_ms;
                    self.push(Action::Trim {
                        mark,
                        resync: false,
                    });
                }
                Ok(None) => {}
                Err(_) => self.push(Action::Report(Report::BadAck { upto })),
            },
            Message::Snapshot(s) => self.on_snapshot(s, now),
            Message::SnapshotAck(a) => self.on_snapshot_ack(a, now),
            Message::Health(h) if self.role == Role::Hub => self.push(Action::Health(h)),
            Message::Error(e) => self.on_error(e, now),
            // The hub's driver answers a hello with a new `Session::hub`;
            // anything else here came the wrong way.
            Message::Hello(_) | Message::Welcome(_) | Message::Time(_) | Message::Health(_) => self
                .push(Action::Send(error(
                    ErrorCode::Malformed,
                    "message not valid in this direction",
                    None,
                ))),
        }
    }

    fn on_welcome(&mut self, w: Welcome, now: Now) {
        let LinkState::Hello { sent_mono_ms } = self.link else {
            return;
        };
        self.link = LinkState::Linked;
        self.last_progress_ms = now.mono_ms;
        self.receiver.peer = Some(w.incarnation);
        self.peer_health = w.health;
        self.health_now = true;
        // The hub read its clock about half-way between our hello and now:
        // half the round trip (on the monotonic clock, so that a wall clock
        // set right meanwhile does not skew the estimate) before now.
        let round_trip = now.mono_ms.saturating_sub(sent_mono_ms);
        let midpoint = now.wall_ms.saturating_sub(round_trip / 2);
        self.push(clock_offset(signed_diff(w.time_ms, midpoint)));
        self.resume(w.up);
    }

    /// Starts the sender towards a receiver at `peer`.
    fn resume(&mut self, peer: Cursor) {
        match self.sender.needs_entry(&peer) {
            Some(seq) => {
                self.sender.state = SendState::Verifying(peer);
                self.push(Action::Verify { seq });
            }
            None => self.decide(peer, None),
        }
    }

    /// The outbox measured for [`Action::LoadHealth`]: sends the report, with
    /// the drain rate since the previous one and the clock correction.
    pub fn health_loaded(&mut self, outbox: OutboxHealth, now: Now) {
        self.health_asked = false;
        if !self.is_linked() {
            return;
        }
        self.health_now = false;
        let drain_per_s = match self.last_health {
            Some((at, acked)) if now.mono_ms > at => {
                (outbox.acked.0.saturating_sub(acked.0)) as f64 * 1000.0 / (now.mono_ms - at) as f64
            }
            _ => 0.0,
        };
        self.last_health = Some((now.mono_ms, outbox.acked));
        self.push(Action::Send(Message::Health(crate::wire::Health {
            outbox_pending: outbox.pending,
            outbox_bytes: outbox.bytes,
            oldest_pending_ms: outbox.oldest_pending_ms,
            acked: outbox.acked,
            drain_per_s,
            clock_offset_ms: self.correction_ms,
        })));
    }

    /// The entry a [`Action::Verify`] asked for (`None` if the queue lacks it).
    pub fn verified(&mut self, seq: Seq, found: Option<Change>) {
        let SendState::Verifying(peer) = self.sender.state else {
            return;
        };
        if peer.at.seq == seq {
            self.decide(peer, found.as_ref());
        }
    }

    fn decide(&mut self, peer: Cursor, found: Option<&Change>) {
        self.sender.reset_flight();
        let plan = self.sender.resume_plan(&peer, found);
        if let Some(time_ms) = self.welcome_at.take() {
            // The agent is ahead of this hub's own stream, or holds other
            // content at one of its positions: this hub's store went back
            // (restored from an older copy), so what it holds of the agent's
            // stream may be older too — and a cursor check cannot tell, since
            // the agent may have written nothing since. Ask for the agent's
            // state: a welcome whose cursor follows no incarnation.
            let went_back = matches!(
                plan,
                Err(ResyncReason::SenderBehind | ResyncReason::Diverged)
            );
            let welcome = |cursor| {
                Message::Welcome(Welcome {
                    incarnation: self.sender.own,
                    up: cursor,
                    time_ms,
                    health: true,
                })
            };
            if went_back {
                // Durably, before the welcome: a link cut before the agent's
                // snapshot completes must ask again at the next hello.
                self.receiver.cursor.source = None;
                let cursor = self.receiver.cursor;
                self.push(Action::Commit {
                    changes: Vec::new(),
                    cursor: Some(cursor),
                    snapshot: false,
                    then: welcome(cursor),
                });
            } else {
                let msg = welcome(self.receiver.cursor);
                self.push(Action::Send(msg));
            }
        }
        match plan {
            Ok(at) => {
                self.sender.state = SendState::Streaming;
                if at > self.sender.acked.seq {
                    self.sender.acked = peer.at;
                    self.sender.sent = at;
                    self.push(Action::Trim {
                        mark: peer.at,
                        resync: false,
                    });
                }
            }
            Err(reason) => {
                self.sender.resyncs += 1;
                let end = Mark {
                    seq: self.sender.last,
                    check: resync_token(self.sender.own, self.sender.last, self.sender.resyncs),
                };
                self.sender.state = SendState::Resyncing(Resync {
                    id: self.sender.resyncs,
                    part: 0,
                    end,
                    after: None,
                    unacked: None,
                    pending: VecDeque::new(),
                    exhausted: false,
                    loading: false,
                    done: false,
                });
                self.push(Action::Report(Report::ResyncStarted { reason }));
            }
        }
    }

    /// Queues the load the sender can make now.
    fn pump(&mut self) {
        if !self.is_linked() {
            return;
        }
        match &mut self.sender.state {
            SendState::Streaming => {
                if let Some((first, last)) = self.sender.next_range() {
                    self.out.push_back(Action::LoadBatch { first, last });
                    // Counted as sent while it loads, so it is asked for once.
                    self.sender.sent = last;
                }
            }
            SendState::Resyncing(r) if !r.loading && r.unacked.is_none() && !r.done => {
                if r.pending.is_empty() && !r.exhausted {
                    r.loading = true;
                    let after = r.after.clone();
                    self.out.push_back(Action::LoadSnapshot { after });
                } else {
                    let part = next_part(r);
                    self.out.push_back(Action::Send(Message::Snapshot(part)));
                }
            }
            _ => {}
        }
    }

    /// The entries a [`Action::LoadBatch`] asked for, in order from `first`.
    /// Returns the batch to send (the driver may filter its entries by policy
    /// on the way out), or `None` when there is nothing to send: the link is
    /// no longer streaming, or the queue lacks `first` (then nothing more is
    /// sent on this link rather than a gap).
    pub fn batch_loaded(
        &mut self,
        first: Seq,
        entries: Vec<(Seq, Change)>,
        now: Now,
    ) -> Option<Batch> {
        if self.sender.state != SendState::Streaming {
            return None;
        }
        if entries.first().map(|(s, _)| *s) != Some(first) {
            self.sender.reset_flight();
            self.sender.state = SendState::Paused;
            return None;
        }
        let (mut batch, bytes) = Batch::fit(first, entries);
        batch.check = batch.entries.last().map_or(0, |e| entry_check(&e.change));
        if self.sender.flight.is_empty() {
            self.last_progress_ms = now.mono_ms;
        }
        self.sender.sent = batch.last;
        self.sender
            .flight
            .push_back((batch.last, bytes, batch.check));
        self.sender.flight_bytes += bytes;
        Some(batch)
    }

    /// The chunk a [`Action::LoadSnapshot`] asked for: permitted record
    /// states, and where the next chunk starts (`None`: this was the last).
    pub fn snapshot_loaded(&mut self, changes: Vec<Change>, next: Option<RecordAddr>, now: Now) {
        let SendState::Resyncing(r) = &mut self.sender.state else {
            return;
        };
        r.loading = false;
        r.exhausted = next.is_none();
        r.after = next;
        // A record too large for one message goes in pieces (its fields
        // split across changes, which merge back into the same state).
        for change in changes {
            r.pending.extend(split_to_fit(change));
        }
        let part = next_part(r);
        self.last_progress_ms = now.mono_ms;
        self.out.push_back(Action::Send(Message::Snapshot(part)));
    }

    fn on_snapshot_ack(&mut self, a: SnapshotAck, now: Now) {
        let SendState::Resyncing(r) = &mut self.sender.state else {
            return;
        };
        if r.id != a.resync || r.unacked.as_ref().map(|s| s.part) != Some(a.part) {
            return;
        }
        r.unacked = None;
        self.last_progress_ms = now.mono_ms;
        if r.done {
            let end = r.end;
            self.sender.acked = end;
            self.sender.state = SendState::Streaming;
            self.sender.reset_flight();
            self.push(Action::Trim {
                mark: end,
                resync: true,
            });
        }
    }

    fn on_batch(&mut self, batch: Batch, now: Now) {
        let plan = self
            .receiver
            .plan(&batch, now.wall_ms, self.cfg.max_drift_ms);
        match plan {
            Ok(Plan::Apply { entries, cursor }) => {
                let changes = entries.iter().map(|e| e.change.clone()).collect();
                self.receiver.cursor = cursor;
                self.push(Action::Commit {
                    changes,
                    cursor: Some(cursor),
                    snapshot: false,
                    then: Message::Ack(Ack {
                        upto: cursor.at.seq,
                        check: cursor.at.check,
                    }),
                });
            }
            Ok(Plan::Duplicate { at }) => {
                self.push(Action::Report(Report::Duplicate));
                self.push(Action::Send(Message::Ack(Ack {
                    upto: at.seq,
                    check: at.check,
                })))
            }
            Err(Refusal::NotSynced) => self.push(Action::Send(error(
                ErrorCode::HelloFirst,
                "this link is not synced: say hello (and resync) first",
                None,
            ))),
            Err(Refusal::Gap { expected }) => self.push(Action::Send(error(
                ErrorCode::SequenceGap,
                &format!("expected a batch starting at most at {expected}"),
                Some(expected),
            ))),
            Err(Refusal::ClockAhead { seq, ahead_ms }) => {
                self.push(Action::Report(Report::ClockRefused {
                    seq: Some(seq),
                    ahead_ms,
                }));
                self.push(Action::Send(error(
                    ErrorCode::ClockAhead,
                    &format!("entry {seq} is stamped {ahead_ms} ms ahead of this replica's clock"),
                    Some(seq),
                )));
                self.refused_peer_clock(now);
            }
        }
    }

    /// Agent: it refused the hub's stamps, so its own clock is behind (a
    /// stale correction). The hub's sender pauses until the next hello, and
    /// only the agent says hello: pause too, so that after the ack timeout it
    /// says hello again and the welcome corrects its clock.
    fn refused_peer_clock(&mut self, now: Now) {
        if self.role == Role::Agent {
            self.sender.reset_flight();
            self.sender.state = SendState::Paused;
            self.last_progress_ms = now.mono_ms;
        }
    }

    fn on_snapshot(&mut self, s: Snapshot, now: Now) {
        if self.receiver.peer.is_none() {
            self.push(Action::Send(error(
                ErrorCode::HelloFirst,
                "snapshot before hello",
                None,
            )));
            return;
        }
        let ack = Message::SnapshotAck(SnapshotAck {
            resync: s.resync,
            part: s.part,
        });
        // A part applied before, or of an older resync than one this link
        // already carries (a stale part of a session the peer replaced):
        // acknowledged again, not applied.
        if self
            .receiver
            .resync
            .is_some_and(|(id, part)| s.resync < id || (id == s.resync && s.part <= part))
        {
            self.push(Action::Send(ack));
            return;
        }
        let ahead = s
            .changes
            .iter()
            .find_map(|c| ahead_of(c, now.wall_ms, self.cfg.max_drift_ms));
        if let Some(ahead_ms) = ahead {
            self.push(Action::Report(Report::ClockRefused {
                seq: None,
                ahead_ms,
            }));
            self.push(Action::Send(error(
                ErrorCode::ClockAhead,
                &format!(
                    "a snapshot record is stamped {ahead_ms} ms ahead of this replica's clock"
                ),
                None,
            )));
            self.refused_peer_clock(now);
            return;
        }
        self.receiver.resync = Some((s.resync, s.part));
        // Only the first resync after hello may move the cursor back (the
        // sender was restored). Once the cursor moved on this link, a last
        // part behind it is a copy of an earlier resync's, still in flight
        // when the peer made a new session: its records merge, the cursor
        // stays (the sender trims no further than the cursor).
        let current = self.receiver.cursor;
        let cursor = s
            .end
            .map(|at| Cursor {
                source: self.receiver.peer,
                at,
            })
            .filter(|c| {
                current == self.receiver.start
                    || c.source != current.source
                    || c.at.seq >= current.at.seq
            });
        if let Some(c) = cursor {
            self.receiver.cursor = c;
            self.push(Action::Report(Report::ResyncCompleted));
        }
        self.push(Action::Commit {
            changes: s.changes,
            cursor,
            snapshot: true,
            then: ack,
        });
    }

    fn on_error(&mut self, e: ErrorMsg, now: Now) {
        self.push(Action::Report(Report::PeerError { code: e.code }));
        match e.code {
            ErrorCode::SchemaRefused => self.push(Action::Report(Report::SchemaRefusedByPeer {
                detail: e.message,
            })),
            // A hello is already on its way when not linked: its answer, or
            // the hello timeout, decides (a second hello could be answered
            // as a new session while the first one is refused).
            ErrorCode::HelloFirst if self.role == Role::Agent && self.is_linked() => {
                self.connected(now)
            }
            ErrorCode::SequenceGap => {
                self.push(Action::Report(Report::PeerGap));
                if self.sender.state == SendState::Streaming {
                    self.sender.reset_flight();
                }
            }
            ErrorCode::ClockAhead => {
                self.push(Action::Report(Report::ClockRefusedByPeer { seq: e.at }));
                self.sender.reset_flight();
                self.sender.state = SendState::Paused;
            }
            ErrorCode::IdentityConflict | ErrorCode::RulesMismatch if self.role == Role::Agent => {
                self.push(Action::Report(if e.code == ErrorCode::RulesMismatch {
                    Report::RulesRefused
                } else {
                    Report::IdentityRefused
                }));
                self.sender.stop();
                self.receiver.peer = None;
                self.link = LinkState::Refused;
                self.last_progress_ms = now.mono_ms;
            }
            _ => {}
        }
    }

    /// Timers: after the ack timeout, go-back-N (or the unacknowledged
    /// snapshot part again, or hello again); the hub's clock messages.
    pub fn on_tick(&mut self, now: Now) {
        let idle = now.mono_ms.saturating_sub(self.last_progress_ms);
        let timed_out = idle >= self.cfg.ack_timeout_ms;
        match self.link {
            LinkState::Hello { .. } if timed_out => return self.connected(now),
            LinkState::Linked => {}
            _ => return,
        }
        if self.role == Role::Hub
            && now.mono_ms.saturating_sub(self.last_clock_ms) >= self.cfg.clock_interval_ms
        {
            self.last_clock_ms = now.mono_ms;
            self.push(Action::Send(Message::Time(Time {
                time_ms: now.wall_ms,
            })));
        }
        let health_due = self.health_now
            || self.last_health.is_none_or(|(at, _)| {
                now.mono_ms.saturating_sub(at) >= self.cfg.health_interval_ms
            });
        if self.role == Role::Agent
            && self.peer_health
            && self.cfg.health_interval_ms > 0
            && health_due
            && !self.health_asked
        {
            self.health_asked = true;
            self.push(Action::LoadHealth);
        }
        if !timed_out {
            return;
        }
        let in_flight = self.sender.in_flight();
        match &mut self.sender.state {
            SendState::Streaming if in_flight > 0 => {
                self.sender.reset_flight();
                self.last_progress_ms = now.mono_ms;
                self.out.push_back(Action::Report(Report::Resend));
            }
            SendState::Resyncing(r) => {
                if let Some(snap) = r.unacked.clone() {
                    self.last_progress_ms = now.mono_ms;
                    self.out.push_back(Action::Send(Message::Snapshot(snap)));
                    self.out.push_back(Action::Report(Report::Resend));
                }
            }
            // Try again on a fresh link, once the clock may have been corrected.
            SendState::Paused if self.role == Role::Agent => self.connected(now),
            _ => {}
        }
    }
}

/// The next snapshot part of `r`: as many pending records as fit one message.
fn next_part(r: &mut Resync) -> Snapshot {
    let budget = crate::wire::MAX_CHANGE_BYTES;
    let mut changes = Vec::new();
    let mut bytes = 0usize;
    while let Some(c) = r.pending.front() {
        let size = crate::codec::to_bytes(c).map_or(usize::MAX, |b| b.len());
        if !changes.is_empty() && bytes.saturating_add(size) > budget {
            break;
        }
        bytes = bytes.saturating_add(size);
        changes.extend(r.pending.pop_front());
    }
    r.part += 1;
    r.done = r.exhausted && r.pending.is_empty();
    let snap = Snapshot {
        resync: r.id,
        part: r.part,
        changes,
        end: r.done.then_some(r.end),
    };
    r.unacked = Some(snap.clone());
    snap
}

/// `change` as pieces that each encode within [`crate::wire::MAX_CHANGE_BYTES`]:
/// its fields split in halves until they fit (every piece keeps the record
/// tombstone). One field always fits: writes larger than that are refused
/// where they enter.
fn split_to_fit(change: Change) -> Vec<Change> {
    let fits = |c: &Change| {
        crate::codec::to_bytes(c).is_ok_and(|b| b.len() <= crate::wire::MAX_CHANGE_BYTES)
    };
    if change.state.fields.len() <= 1 || fits(&change) {
        return vec![change];
    }
    let mut first = change.clone();
    let half = first.state.fields.len() / 2;
    let keys: Vec<_> = first.state.fields.keys().skip(half).cloned().collect();
    let mut second = change;
    second.state.fields.clear();
    for k in keys {
        if let Some(f) = first.state.fields.remove(&k) {
            second.state.fields.insert(k, f);
        }
    }
    let mut out = split_to_fit(first);
    out.extend(split_to_fit(second));
    out
}

/// The offset to report: differences under [`crate::clock::OFFSET_NOISE_MS`]
/// are measurement noise.
fn clock_offset(offset_ms: i64) -> Action {
    let offset_ms = if offset_ms.abs() < crate::clock::OFFSET_NOISE_MS {
        0
    } else {
        offset_ms
    };
    Action::ClockOffset { offset_ms }
}

/// `a - b` as a signed number of milliseconds, saturating.
pub fn signed_diff(a: u64, b: u64) -> i64 {
    if a >= b {
        i64::try_from(a - b).unwrap_or(i64::MAX)
    } else {
        i64::try_from(b - a).map_or(i64::MIN, |d| -d)
    }
}

/// The check a resync ends with: distinct per sender incarnation, position and
/// resync, and never a valid entry digest by more than chance.
fn resync_token(own: Incarnation, last: Seq, n: u64) -> u64 {
    let mut h = own.0 ^ last.0.rotate_left(21) ^ n.rotate_left(42) ^ 0x5245_5359_4e43_0000;
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h.max(1)
}

/// An error message.
pub fn error(code: ErrorCode, message: &str, at: Option<Seq>) -> Message {
    Message::Error(ErrorMsg {
        code,
        message: message.to_owned(),
        at,
    })
}
