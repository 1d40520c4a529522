//! Behaviour of the sans-IO sync session (`Session`, its `Sender` and
//! `Receiver`), driven the way the agent's and the hub's drivers drive it:
//! batching within the entry and byte windows, acknowledgements and trims,
//! go-back-N after the ack timeout, resume after a reconnect, gaps and
//! duplicates, every reason for a resync by snapshot, snapshot parts sent
//! stop-and-wait, clock-bound refusals, the hub's clock messages, and the
//! hub's identity check. The randomised fleet simulation is `tests/sim.rs`.

use std::collections::BTreeMap;

use fieldsync_shared::session::{
    entry_check, Action, Admission, Cursor, Identity, Incarnation, Mark, Now, OutboxHealth,
    RecordAddr, Report, ResyncReason, Session, SessionConfig, RETIRED_KEPT,
};
use fieldsync_shared::wire::{
    Ack, Batch, Entry, Envelope, ErrorCode, Health, Message, Snapshot, SnapshotAck,
};
use fieldsync_shared::{AgentId, Change, CollectionName, FieldName, Origin, RecordKey};
use fieldsync_shared::{Merge, RecordState, Sender, Seq, Stamp, Version};
use serde_json::json;

/// Wall time at mono 0.
const WALL: u64 = 1_733_000_000_000;
const DAY_MS: u64 = 86_400_000;
const AGENT_INC: Incarnation = Incarnation(0xa9e7);
const HUB_INC: Incarnation = Incarnation(0x40b);

fn at(mono_ms: u64) -> Now {
    Now {
        mono_ms,
        wall_ms: WALL + mono_ms,
    }
}

fn cfg() -> SessionConfig {
    SessionConfig {
        ack_timeout_ms: 1_000,
        window_entries: 4,
        window_bytes: 1 << 20,
        batch_entries: 3,
        max_drift_ms: 60_000,
        clock_interval_ms: 30_000,
        refused_retry_ms: 300_000,
        // Health reports have their own tests (`health_cfg`).
        health_interval_ms: 0,
        rules: Default::default(),
    }
}

fn health_cfg() -> SessionConfig {
    SessionConfig {
        health_interval_ms: 10_000,
        ..cfg()
    }
}

fn gw() -> AgentId {
    AgentId::new("gw-1").unwrap()
}

/// Change number `n`: record `k{n}`, field `n`, stamped at `wall_ms`.
fn change_at(n: u64, wall_ms: u64, origin: &str) -> Change {
    let version = Version {
        stamp: Stamp::new(wall_ms, 0),
        origin: Origin::new(origin).unwrap(),
    };
    let state =
        RecordState::default().write([(FieldName::new("n").unwrap(), Some(json!(n)))], &version);
    Change {
        collection: CollectionName::new("c").unwrap(),
        key: RecordKey::new(format!("k{n:03}")).unwrap(),
        state,
    }
}

fn change(n: u64) -> Change {
    change_at(n, WALL + n, "gw-1")
}

fn mark_of(seq: u64, c: &Change) -> Mark {
    Mark {
        seq: Seq(seq),
        check: entry_check(c),
    }
}

/// A cursor that follows `source` and has applied up to `mark`.
fn follows(source: Incarnation, mark: Mark) -> Cursor {
    Cursor {
        source: Some(source),
        at: mark,
    }
}

/// One replica's end of the link and the storage its driver holds: a queue
/// for the sender, committed changes and a cursor for the receiver, and
/// records a snapshot is read from. `run` executes actions as the drivers do.
struct Side {
    s: Session,
    queue: BTreeMap<Seq, Change>,
    records: BTreeMap<RecordAddr, Change>,
    /// Records per snapshot part.
    chunk: usize,
    cursor: Cursor,
    commits: Vec<(Vec<Change>, Option<Cursor>, bool)>,
    trims: Vec<Mark>,
    loads: Vec<(Seq, Seq)>,
    reports: Vec<Report>,
    offsets: Vec<i64>,
    healths: Vec<Health>,
}

impl Side {
    fn new(s: Session, queue: BTreeMap<Seq, Change>, cursor: Cursor) -> Self {
        Self {
            s,
            queue,
            records: BTreeMap::new(),
            chunk: 3,
            cursor,
            commits: Vec::new(),
            trims: Vec::new(),
            loads: Vec::new(),
            reports: Vec::new(),
            offsets: Vec::new(),
            healths: Vec::new(),
        }
    }

    /// An agent whose outbox holds `acked.seq+1..=last` (changes numbered by
    /// seq) and whose downstream cursor is `down`.
    fn agent(acked: Mark, last: u64, down: Cursor, cfg: SessionConfig) -> Self {
        let queue = (acked.seq.0 + 1..=last)
            .map(|n| (Seq(n), change(n)))
            .collect();
        let s = Session::agent(gw(), AGENT_INC, acked, Seq(last), down, cfg);
        Self::new(s, queue, down)
    }

    /// The hub's session for `hello`, with a downstream queue `queue` trimmed
    /// to `acked`, and upstream cursor `up`.
    fn hub(hello: &Message, acked: Mark, queue: BTreeMap<Seq, Change>, up: Cursor) -> Self {
        Self::hub_at(hello, acked, queue, up, at(0))
    }

    /// [`Side::hub`], made at `now`.
    fn hub_at(
        hello: &Message,
        acked: Mark,
        queue: BTreeMap<Seq, Change>,
        up: Cursor,
        now: Now,
    ) -> Self {
        let Message::Hello(hello) = hello else {
            panic!("expected a hello, got {hello:?}");
        };
        let last = queue.keys().last().copied().unwrap_or(acked.seq);
        let identity = Identity {
            current: Some(hello.incarnation),
            retired: Vec::new(),
        };
        let (s, changed) =
            Session::hub(hello, HUB_INC, acked, last, up, &identity, None, now, cfg())
                .expect("a known store is admitted");
        assert_eq!(changed, None);
        Self::new(s, queue, up)
    }

    /// Executes every action the session has, answering loads from this
    /// side's storage; returns the messages it sent, in order.
    fn run(&mut self, now: Now) -> Vec<Message> {
        let mut out = Vec::new();
        while let Some(action) = self.s.poll() {
            match action {
                Action::Send(m) => out.push(m),
                Action::LoadBatch { first, last } => {
                    self.loads.push((first, last));
                    let entries: Vec<(Seq, Change)> = self
                        .queue
                        .range(first..=last)
                        .map(|(s, c)| (*s, c.clone()))
                        .collect();
                    if let Some(b) = self.s.batch_loaded(first, entries, now) {
                        out.push(Message::Batch(b));
                    }
                }
                Action::Verify { seq } => {
                    let found = self.queue.get(&seq).cloned();
                    self.s.verified(seq, found);
                }
                Action::LoadSnapshot { after } => {
                    let rest: Vec<&Change> = self
                        .records
                        .iter()
                        .filter(|(addr, _)| after.as_ref().is_none_or(|a| *addr > a))
                        .map(|(_, c)| c)
                        .collect();
                    let part: Vec<Change> =
                        rest.iter().take(self.chunk).map(|c| (*c).clone()).collect();
                    let next = (rest.len() > self.chunk)
                        .then(|| part.last().map(|c| (c.collection.clone(), c.key.clone())))
                        .flatten();
                    self.s.snapshot_loaded(part, next, now);
                }
                Action::Commit {
                    changes,
                    cursor,
                    snapshot,
                    then,
                } => {
                    if let Some(c) = cursor {
                        self.cursor = c;
                    }
                    self.commits.push((changes, cursor, snapshot));
                    out.push(then);
                }
                Action::Trim { mark, .. } => {
                    self.queue.retain(|s, _| *s > mark.seq);
                    self.trims.push(mark);
                }
                Action::ClockOffset { offset_ms } => self.offsets.push(offset_ms),
                Action::ClockSkew { .. } => {}
                Action::LoadHealth => {
                    let outbox = OutboxHealth {
                        pending: self.queue.len() as u64,
                        acked: self.trims.last().map_or(Seq(0), |m| m.seq),
                        ..OutboxHealth::default()
                    };
                    self.s.health_loaded(outbox, now);
                }
                Action::Health(h) => self.healths.push(h),
                Action::Report(r) => self.reports.push(r),
            }
        }
        out
    }

    /// Delivers `msgs` in order, then runs; returns what this side sent.
    fn deliver(&mut self, msgs: Vec<Message>, now: Now) -> Vec<Message> {
        for m in msgs {
            self.s.on_message(m, now);
        }
        self.run(now)
    }

    fn tick(&mut self, now: Now) -> Vec<Message> {
        self.s.on_tick(now);
        self.run(now)
    }
}

fn batches(msgs: &[Message]) -> Vec<(u64, u64)> {
    msgs.iter()
        .filter_map(|m| match m {
            Message::Batch(b) => Some((b.first.0, b.last.0)),
            _ => None,
        })
        .collect()
}

fn only<'a>(msgs: &'a [Message], what: &str) -> &'a Message {
    assert_eq!(msgs.len(), 1, "expected one {what}, got {msgs:?}");
    &msgs[0]
}

fn error_code(m: &Message) -> Option<ErrorCode> {
    match m {
        Message::Error(e) => Some(e.code),
        _ => None,
    }
}

/// An agent with `last` entries queued (none acknowledged) and a hub whose
/// cursor follows the agent at 0, linked: returns both and what the agent
/// sent once the welcome arrived.
fn linked(last: u64, cfg: SessionConfig) -> (Side, Side, Vec<Message>) {
    let mut agent = Side::agent(
        Mark::default(),
        last,
        follows(HUB_INC, Mark::default()),
        cfg,
    );
    agent.s.connected(at(0));
    let hello = agent.run(at(0));
    let mut hub = Side::hub(
        only(&hello, "hello"),
        Mark::default(),
        BTreeMap::new(),
        follows(AGENT_INC, Mark::default()),
    );
    let welcome = hub.run(at(0));
    assert!(matches!(only(&welcome, "welcome"), Message::Welcome(_)));
    let sent = agent.deliver(welcome, at(10));
    assert!(agent.s.is_linked());
    (agent, hub, sent)
}

// ---- health reports ------------------------------------------------------

fn healths(msgs: &[Message]) -> Vec<Health> {
    msgs.iter()
        .filter_map(|m| match m {
            Message::Health(h) => Some(*h),
            _ => None,
        })
        .collect()
}

#[test]
fn a_linked_agent_reports_its_health_on_a_timer_and_the_hub_hands_it_over() {
    let (mut agent, mut hub, sent) = linked(3, health_cfg());
    // The first report comes at the first tick after the welcome.
    let first = agent.tick(at(20));
    let report = healths(&first);
    assert_eq!(report.len(), 1, "{first:?}");
    assert_eq!(report[0].outbox_pending, 3);
    assert_eq!(report[0].drain_per_s, 0.0);
    assert!(
        healths(&agent.tick(at(5_000))).is_empty(),
        "not before the interval"
    );
    hub.deliver(first, at(30));
    assert_eq!(hub.healths, report);
    // The hub acknowledges the batch: the next report has the drain rate.
    let acks = hub.deliver(sent, at(40));
    agent.deliver(acks, at(50));
    let next = healths(&agent.tick(at(10_020)));
    assert_eq!(next.len(), 1);
    assert_eq!((next[0].outbox_pending, next[0].acked), (0, Seq(3)));
    assert!((next[0].drain_per_s - 0.3).abs() < 1e-9, "{next:?}");
}

#[test]
fn an_agent_sends_no_health_to_a_hub_that_does_not_take_it() {
    let mut agent = Side::agent(
        Mark::default(),
        2,
        follows(HUB_INC, Mark::default()),
        health_cfg(),
    );
    agent.s.connected(at(0));
    agent.run(at(0));
    let welcome = Message::Welcome(fieldsync_shared::wire::Welcome {
        incarnation: HUB_INC,
        up: follows(AGENT_INC, Mark::default()),
        time_ms: WALL,
        health: false,
    });
    agent.deliver(vec![welcome], at(10));
    for t in [20, 10_020, 20_020] {
        assert!(healths(&agent.tick(at(t))).is_empty());
    }
    // A report sent the wrong way is refused.
    let mut wrong = agent.deliver(
        vec![Message::Health(Health {
            outbox_pending: 0,
            outbox_bytes: 0,
            oldest_pending_ms: None,
            acked: Seq(0),
            drain_per_s: 0.0,
            clock_offset_ms: 0,
        })],
        at(30),
    );
    assert_eq!(error_code(&wrong.remove(0)), Some(ErrorCode::Malformed));
}

// ---- batching, windows, acks -----------------------------------------------

#[test]
fn batches_respect_batch_entries_and_the_entry_window() {
    let (mut agent, mut hub, sent) = linked(10, cfg());
    assert_eq!(
        batches(&sent),
        [(1, 3), (4, 4)],
        "one slot left after 3 entries"
    );
    assert_eq!(agent.s.sender.in_flight(), 4);
    assert_eq!(agent.run(at(10)), [], "the window is full");

    let acks = hub.deliver(sent[..1].to_vec(), at(20));
    assert_eq!(
        acks,
        [Message::Ack(Ack {
            upto: Seq(3),
            check: entry_check(&change(3)),
        })]
    );
    assert_eq!(hub.cursor, follows(AGENT_INC, mark_of(3, &change(3))));
    let sent = agent.deliver(acks, at(30));
    assert_eq!(agent.trims, [mark_of(3, &change(3))]);
    assert_eq!(batches(&sent), [(5, 7)], "the ack opened three slots");
    assert_eq!(agent.s.sender.pending(), 7);
}

#[test]
fn the_byte_window_keeps_one_batch_in_flight() {
    let mut small = cfg();
    small.window_bytes = 1;
    let (mut agent, mut hub, sent) = linked(6, small);
    assert_eq!(
        batches(&sent),
        [(1, 3)],
        "the byte window is full after one batch"
    );
    let acks = hub.deliver(sent, at(20));
    let sent = agent.deliver(acks, at(30));
    assert_eq!(batches(&sent), [(4, 6)]);
}

#[test]
fn zero_batch_entries_still_sends_one_entry_at_a_time() {
    let mut c = cfg();
    c.batch_entries = 0;
    c.window_entries = 2;
    let (_, _, sent) = linked(5, c);
    assert_eq!(batches(&sent), [(1, 1), (2, 2)]);
}

#[test]
fn appends_extend_the_queue_and_never_shrink_it() {
    let (mut agent, _, sent) = linked(0, cfg());
    assert_eq!(sent, [], "empty outbox");
    for n in 1..=2 {
        agent.queue.insert(Seq(n), change(n));
    }
    agent.s.appended(Seq(2));
    assert_eq!(batches(&agent.run(at(20))), [(1, 2)]);
    agent.s.appended(Seq(1));
    assert_eq!(
        agent.s.sender.last(),
        Seq(2),
        "a stale append does not shrink the queue"
    );
    assert_eq!(agent.s.sender.pending(), 2);
}

#[test]
fn nothing_is_sent_before_the_welcome_or_after_a_disconnect() {
    let mut agent = Side::agent(Mark::default(), 5, follows(HUB_INC, Mark::default()), cfg());
    assert_eq!(agent.run(at(0)), [], "never connected");
    agent.s.connected(at(0));
    let hello = agent.run(at(0));
    assert!(matches!(only(&hello, "hello"), Message::Hello(_)));
    assert!(!agent.s.is_linked());
    assert_eq!(agent.tick(at(500)), [], "no batch before the welcome");
    agent.s.disconnected();
    agent.s.appended(Seq(5));
    assert_eq!(agent.run(at(600)), []);
    assert_eq!(
        agent.tick(at(10_000)),
        [],
        "no hello again without a connection"
    );
}

#[test]
fn acks_trim_only_forward_and_a_bad_ack_changes_nothing() {
    let (mut agent, _, _) = linked(10, cfg());
    let ack = |n: u64| {
        Message::Ack(Ack {
            upto: Seq(n),
            check: entry_check(&change(n)),
        })
    };
    agent.deliver(vec![ack(2)], at(20));
    agent.deliver(vec![ack(1), ack(2)], at(30));
    assert_eq!(
        agent.trims,
        [mark_of(2, &change(2))],
        "older and repeated acks trim nothing"
    );
    agent.deliver(vec![ack(11)], at(40));
    assert!(agent.reports.contains(&Report::BadAck { upto: Seq(11) }));
    assert_eq!(agent.s.sender.acked(), mark_of(2, &change(2)));
    assert_eq!(agent.s.sender.pending(), 8);
    assert!(agent.s.is_linked());
}

// ---- timeouts, reconnects, gaps, duplicates -----------------------------------

#[test]
fn go_back_n_after_the_ack_timeout() {
    let (mut agent, _, sent) = linked(10, cfg());
    assert_eq!(batches(&sent), [(1, 3), (4, 4)]);
    // The timer runs from the first batch put in flight (at 10).
    assert_eq!(agent.tick(at(1_009)), []);
    let resent = agent.tick(at(1_010));
    assert!(agent.reports.contains(&Report::Resend));
    assert_eq!(
        batches(&resent),
        [(1, 3), (4, 4)],
        "everything unacknowledged again"
    );
    // A partial ack, then another timeout: from the ack on.
    agent.deliver(
        vec![Message::Ack(Ack {
            upto: Seq(3),
            check: entry_check(&change(3)),
        })],
        at(1_100),
    );
    let resent = agent.tick(at(2_100));
    assert_eq!(batches(&resent)[0], (4, 6));
}

#[test]
fn a_reconnect_resumes_from_the_receivers_durable_cursor() {
    let (mut agent, mut hub, sent) = linked(10, cfg());
    // The hub commits 1..=3; the ack and the second batch are lost with the link.
    hub.deliver(sent[..1].to_vec(), at(20));
    agent.s.disconnected();
    agent.s.connected(at(100));
    let hello = agent.run(at(100));
    let mut hub = Side::hub(
        only(&hello, "hello"),
        Mark::default(),
        BTreeMap::new(),
        hub.cursor,
    );
    let sent = agent.deliver(hub.run(at(100)), at(110));
    assert_eq!(
        agent.trims,
        [mark_of(3, &change(3))],
        "the welcome's cursor trims"
    );
    assert_eq!(
        batches(&sent),
        [(4, 6), (7, 7)],
        "resent from after the cursor"
    );
    assert!(!agent
        .reports
        .iter()
        .any(|r| matches!(r, Report::ResyncStarted { .. })));
    // The rest arrives whole and in order.
    let acks = hub.deliver(sent, at(120));
    assert_eq!(hub.commits.len(), 2);
    agent.deliver(acks, at(130));
    assert_eq!(agent.s.sender.acked(), mark_of(7, &change(7)));
}

#[test]
fn a_gap_is_answered_with_the_expected_seq_and_the_sender_goes_back() {
    let (mut agent, mut hub, sent) = linked(10, cfg());
    // The first batch is lost; the second arrives.
    let answer = hub.deliver(sent[1..].to_vec(), at(20));
    let Message::Error(e) = only(&answer, "error") else {
        panic!("{answer:?}");
    };
    assert_eq!((e.code, e.at), (ErrorCode::SequenceGap, Some(Seq(1))));
    assert!(hub.commits.is_empty());
    let resent = agent.deliver(answer, at(30));
    assert!(agent.reports.contains(&Report::PeerGap));
    assert_eq!(batches(&resent), [(1, 3), (4, 4)]);
}

#[test]
fn duplicates_are_acknowledged_again_and_overlaps_apply_only_what_is_new() {
    let (_, mut hub, sent) = linked(10, cfg());
    let first = hub.deliver(sent[..1].to_vec(), at(20));
    let again = hub.deliver(sent[..1].to_vec(), at(30));
    assert_eq!(again, first, "the same ack, from the cursor");
    assert_eq!(hub.commits.len(), 1, "not applied twice");
    // A batch that overlaps what was applied: only 4 and 5 are committed.
    let overlap = Batch {
        first: Seq(2),
        last: Seq(5),
        check: entry_check(&change(5)),
        entries: (2..=5)
            .map(|n| Entry {
                seq: Seq(n),
                change: change(n),
            })
            .collect(),
    };
    hub.deliver(vec![Message::Batch(overlap)], at(40));
    let (changes, cursor, snapshot) = hub.commits.last().unwrap();
    assert_eq!(changes, &[change(4), change(5)]);
    assert_eq!(*cursor, Some(follows(AGENT_INC, mark_of(5, &change(5)))));
    assert!(!snapshot);
    // A batch whose entries were all filtered out still moves the cursor.
    let empty = Batch {
        first: Seq(6),
        last: Seq(7),
        check: 77,
        entries: Vec::new(),
    };
    hub.deliver(vec![Message::Batch(empty)], at(50));
    assert_eq!(
        hub.cursor.at,
        Mark {
            seq: Seq(7),
            check: 77
        }
    );
}

#[test]
fn a_watermark_at_the_end_of_the_sequence_space_does_not_panic() {
    let (_, mut hub, _) = linked(0, cfg());
    let claim = Batch {
        first: Seq(1),
        last: Seq(u64::MAX),
        check: 1,
        entries: Vec::new(),
    };
    hub.deliver(vec![Message::Batch(claim)], at(20));
    assert_eq!(hub.cursor.at.seq, Seq(u64::MAX));
    let again = Batch {
        first: Seq(1),
        last: Seq(1),
        check: 1,
        entries: Vec::new(),
    };
    let answer = hub.deliver(vec![Message::Batch(again)], at(30));
    assert_eq!(
        answer,
        [Message::Ack(Ack {
            upto: Seq(u64::MAX),
            check: 1
        })]
    );
    assert_eq!(Seq(u64::MAX).next(), Seq(u64::MAX));
}

#[test]
fn a_batch_before_the_hello_is_refused_and_the_agent_says_hello_again() {
    let mut agent = Side::agent(Mark::default(), 0, follows(HUB_INC, Mark::default()), cfg());
    agent.s.connected(at(0));
    agent.run(at(0));
    // A batch from the hub overtakes its welcome.
    let early = Batch {
        first: Seq(1),
        last: Seq(1),
        check: entry_check(&change(1)),
        entries: vec![Entry {
            seq: Seq(1),
            change: change(1),
        }],
    };
    let answer = agent.deliver(vec![Message::Batch(early)], at(10));
    assert_eq!(
        error_code(only(&answer, "error")),
        Some(ErrorCode::HelloFirst)
    );
    assert!(agent.commits.is_empty());
    // Told to say hello first while its hello is on the way, the agent waits
    // for the answer (a second hello could be taken as another session)...
    let err = fieldsync_shared::session::error(ErrorCode::HelloFirst, "no session", None);
    assert_eq!(agent.deliver(vec![err.clone()], at(20)), []);
    // ...and says hello again when none comes in time.
    let again = agent.tick(at(1_010));
    assert!(matches!(only(&again, "hello"), Message::Hello(_)));
    // Once linked, the hub's "say hello" is answered at once.
    let (mut linked_agent, _, _) = linked(0, cfg());
    let hello = linked_agent.deliver(vec![err], at(2_000));
    assert!(matches!(only(&hello, "hello"), Message::Hello(_)));
}

// ---- resync --------------------------------------------------------------------

#[test]
fn resume_plan_names_every_reason_to_resync() {
    let c5 = change(5);
    let sender = Sender::new(AGENT_INC, mark_of(3, &change(3)), Seq(6), cfg());
    let plan = |peer: Cursor, found: Option<&Change>| sender.resume_plan(&peer, found);
    // On this sender's history: resume from the peer.
    assert_eq!(
        plan(follows(AGENT_INC, mark_of(5, &c5)), Some(&c5)),
        Ok(Seq(5))
    );
    assert_eq!(
        plan(follows(AGENT_INC, mark_of(3, &change(3))), None),
        Ok(Seq(3))
    );
    // A receiver that follows another incarnation, or none.
    for source in [None, Some(Incarnation(0xbeef))] {
        let peer = Cursor {
            source,
            at: mark_of(5, &c5),
        };
        assert_eq!(plan(peer, Some(&c5)), Err(ResyncReason::NewReceiver));
    }
    // Behind the trim point: the receiver was restored from an older copy.
    assert_eq!(
        plan(follows(AGENT_INC, mark_of(2, &change(2))), None),
        Err(ResyncReason::ReceiverBehind)
    );
    // Past the last entry: this sender was restored.
    assert_eq!(
        plan(follows(AGENT_INC, mark_of(9, &change(9))), None),
        Err(ResyncReason::SenderBehind)
    );
    // Same position, other content: at a queued entry, and at the trim point.
    assert_eq!(
        plan(follows(AGENT_INC, mark_of(5, &change(50))), Some(&c5)),
        Err(ResyncReason::Diverged)
    );
    assert_eq!(
        plan(follows(AGENT_INC, mark_of(3, &change(30))), None),
        Err(ResyncReason::Diverged)
    );
}

fn resync_reason(side: &Side) -> Option<ResyncReason> {
    side.reports.iter().find_map(|r| match r {
        Report::ResyncStarted { reason } => Some(*reason),
        _ => None,
    })
}

/// The agent with `acked`..`last` queued says hello to a hub whose upstream
/// cursor is `up`; returns the agent after the welcome.
fn agent_welcomed(acked: Mark, last: u64, up: Cursor) -> (Side, Vec<Message>) {
    let mut agent = Side::agent(acked, last, follows(HUB_INC, Mark::default()), cfg());
    agent.s.connected(at(0));
    let hello = agent.run(at(0));
    let mut hub = Side::hub(only(&hello, "hello"), Mark::default(), BTreeMap::new(), up);
    let sent = agent.deliver(hub.run(at(0)), at(10));
    (agent, sent)
}

#[test]
fn a_hub_that_never_saw_this_store_is_resynced_by_snapshot() {
    let (agent, sent) = agent_welcomed(Mark::default(), 2, Cursor::default());
    assert_eq!(resync_reason(&agent), Some(ResyncReason::NewReceiver));
    assert!(agent.s.sender.resyncing());
    assert!(matches!(only(&sent, "snapshot"), Message::Snapshot(_)));
}

#[test]
fn a_restored_hub_behind_the_trim_point_is_resynced() {
    let up = follows(AGENT_INC, mark_of(2, &change(2)));
    let (agent, _) = agent_welcomed(mark_of(5, &change(5)), 8, up);
    assert_eq!(resync_reason(&agent), Some(ResyncReason::ReceiverBehind));
}

#[test]
fn a_receiver_ahead_of_a_restored_sender_is_resynced() {
    // The agent applied the hub's stream up to 9; the hub's restored queue
    // ends at 4.
    let queue: BTreeMap<Seq, Change> = (1..=4)
        .map(|n| (Seq(n), change_at(n, WALL, "@hub")))
        .collect();
    let mut agent = Side::agent(
        Mark::default(),
        0,
        follows(
            HUB_INC,
            Mark {
                seq: Seq(9),
                check: 9,
            },
        ),
        cfg(),
    );
    agent.s.connected(at(0));
    let hello = agent.run(at(0));
    let mut hub = Side::hub(
        only(&hello, "hello"),
        Mark::default(),
        queue,
        follows(AGENT_INC, Mark::default()),
    );
    hub.run(at(0));
    assert_eq!(resync_reason(&hub), Some(ResyncReason::SenderBehind));
}

#[test]
fn same_seq_other_content_is_detected_by_the_check() {
    // The hub reused seq 3 for another change after a restore.
    let queue: BTreeMap<Seq, Change> = (1..=4)
        .map(|n| (Seq(n), change_at(n, WALL, "@hub")))
        .collect();
    let applied = change_at(33, WALL, "@hub");
    let mut agent = Side::agent(
        Mark::default(),
        0,
        follows(HUB_INC, mark_of(3, &applied)),
        cfg(),
    );
    agent.s.connected(at(0));
    let hello = agent.run(at(0));
    let mut hub = Side::hub(
        only(&hello, "hello"),
        Mark::default(),
        queue.clone(),
        follows(AGENT_INC, Mark::default()),
    );
    hub.run(at(0));
    assert_eq!(resync_reason(&hub), Some(ResyncReason::Diverged));

    // With the content the agent applied, the hub streams from there instead.
    let mut agent = Side::agent(
        Mark::default(),
        0,
        follows(HUB_INC, mark_of(3, &queue[&Seq(3)])),
        cfg(),
    );
    agent.s.connected(at(0));
    let hello = agent.run(at(0));
    let mut hub = Side::hub(
        only(&hello, "hello"),
        Mark::default(),
        queue,
        follows(AGENT_INC, Mark::default()),
    );
    let sent = hub.run(at(0));
    assert_eq!(resync_reason(&hub), None);
    assert_eq!(batches(&sent), [(4, 4)]);
    assert_eq!(hub.trims, [mark_of(3, &change_at(3, WALL, "@hub"))]);
}

#[test]
fn snapshot_parts_go_stop_and_wait_and_the_last_sets_the_cursor() {
    // The hub resyncs a new agent store: 7 records in parts of 3, and a queue
    // of 4 entries the snapshot covers.
    let queue: BTreeMap<Seq, Change> = (1..=4)
        .map(|n| (Seq(n), change_at(n, WALL, "@hub")))
        .collect();
    let mut agent = Side::agent(Mark::default(), 0, Cursor::default(), cfg());
    agent.s.connected(at(0));
    let hello = agent.run(at(0));
    let mut hub = Side::hub(
        only(&hello, "hello"),
        Mark::default(),
        queue,
        follows(AGENT_INC, Mark::default()),
    );
    for n in 1..=7 {
        let c = change_at(n, WALL, "@hub");
        hub.records.insert((c.collection.clone(), c.key.clone()), c);
    }
    let sent = hub.run(at(0));
    assert_eq!(resync_reason(&hub), Some(ResyncReason::NewReceiver));
    assert!(matches!(&sent[0], Message::Welcome(_)));
    let part = |m: &Message| match m {
        Message::Snapshot(s) => s.clone(),
        other => panic!("expected a snapshot part, got {other:?}"),
    };
    let p1 = part(only(&sent[1..], "snapshot part"));
    assert_eq!((p1.part, p1.changes.len(), p1.end), (1, 3, None));
    assert_eq!(hub.run(at(100)), [], "stop-and-wait: one part in flight");

    // Lost: after the ack timeout the same part goes again.
    assert_eq!(hub.tick(at(999)), []);
    let again = hub.tick(at(1_000));
    assert_eq!(part(only(&again, "resent part")), p1);
    assert!(hub.reports.contains(&Report::Resend));

    // The agent welcomes, then commits part 1 without a cursor.
    agent.deliver(vec![sent[0].clone()], at(1_010));
    let ack1 = agent.deliver(again.clone(), at(1_020));
    assert_eq!(
        ack1,
        [Message::SnapshotAck(SnapshotAck {
            resync: p1.resync,
            part: 1
        })]
    );
    assert_eq!(agent.commits.len(), 1);
    let (changes, cursor, snapshot) = &agent.commits[0];
    assert_eq!((changes.len(), *cursor, *snapshot), (3, None, true));
    // A duplicate part is acknowledged again, not committed again.
    assert_eq!(agent.deliver(again, at(1_030)), ack1);
    assert_eq!(agent.commits.len(), 1);
    // An ack for another part or resync moves nothing.
    let stray = Message::SnapshotAck(SnapshotAck {
        resync: p1.resync + 1,
        part: 1,
    });
    assert_eq!(hub.deliver(vec![stray], at(1_040)), []);

    let p2 = part(only(&hub.deliver(ack1, at(1_050)), "part 2"));
    assert_eq!((p2.part, p2.changes.len(), p2.end), (2, 3, None));
    let ack2 = agent.deliver(vec![Message::Snapshot(p2)], at(1_060));
    let p3 = part(only(&hub.deliver(ack2, at(1_070)), "part 3"));
    let end = p3.end.expect("the last part carries the end mark");
    assert_eq!((p3.part, p3.changes.len(), end.seq), (3, 1, Seq(4)));

    // The last part sets the agent's cursor to the end mark, in the same commit.
    let ack3 = agent.deliver(vec![Message::Snapshot(p3)], at(1_080));
    let (_, cursor, snapshot) = agent.commits.last().unwrap();
    assert_eq!((*cursor, *snapshot), (Some(follows(HUB_INC, end)), true));
    assert_eq!(agent.cursor, follows(HUB_INC, end));
    assert!(agent.reports.contains(&Report::ResyncCompleted));

    // Its ack trims the hub's queue to the end mark; streaming follows.
    hub.queue.insert(Seq(5), change_at(5, WALL + 5, "@hub"));
    hub.s.appended(Seq(5));
    let sent = hub.deliver(ack3, at(1_090));
    assert_eq!(hub.trims, [end]);
    assert_eq!(hub.s.sender.acked(), end);
    assert!(!hub.s.sender.resyncing());
    assert_eq!(batches(&sent), [(5, 5)]);
    let ack = agent.deliver(sent, at(1_100));
    assert_eq!(agent.cursor.at.seq, Seq(5));
    hub.deliver(ack, at(1_110));
    assert_eq!(hub.s.sender.pending(), 0);
}

// ---- several sessions on one link ----------------------------------------------

fn snapshot_of(msgs: &[Message]) -> Snapshot {
    msgs.iter()
        .find_map(|m| match m {
            Message::Snapshot(s) => Some(s.clone()),
            _ => None,
        })
        .expect("a snapshot part")
}

#[test]
fn a_second_hub_session_on_one_link_does_not_take_the_first_ones_acks() {
    // The agent's hello goes twice (sent again, or delivered twice); an
    // operator write lands between the two hub sessions it makes.
    let mut agent = Side::agent(Mark::default(), 0, Cursor::default(), cfg());
    agent.s.connected(at(0));
    let hello = agent.run(at(0));
    let one: BTreeMap<Seq, Change> = [(Seq(1), change_at(1, WALL, "@hub"))].into();
    let mut first = Side::hub_at(
        &hello[0],
        Mark::default(),
        one.clone(),
        follows(AGENT_INC, Mark::default()),
        at(100),
    );
    let c1 = change_at(1, WALL, "@hub");
    first
        .records
        .insert((c1.collection.clone(), c1.key.clone()), c1);
    let sent_a = first.run(at(100));
    let a = snapshot_of(&sent_a);
    let mut two = one;
    two.insert(Seq(2), change_at(2, WALL, "@hub"));
    let mut second = Side::hub_at(
        &hello[0],
        Mark::default(),
        two,
        follows(AGENT_INC, Mark::default()),
        at(700),
    );
    let b = snapshot_of(&second.run(at(700)));
    assert!(
        b.resync > a.resync,
        "resync ids grow from session to session"
    );
    assert_eq!((a.end.unwrap().seq, b.end.unwrap().seq), (Seq(1), Seq(2)));

    // The agent takes the first welcome and applies the first session's
    // part; its ack reaches the second session.
    agent.deliver(vec![sent_a[0].clone()], at(800));
    let ack_a = agent.deliver(vec![Message::Snapshot(a.clone())], at(810));
    assert_eq!(second.deliver(ack_a, at(820)), []);
    assert!(
        second.trims.is_empty(),
        "not completed by another session's ack"
    );
    assert!(second.s.sender.resyncing());

    // Its own part completes it; the first session's part, late, changes nothing.
    let ack_b = agent.deliver(vec![Message::Snapshot(b.clone())], at(830));
    second.deliver(ack_b, at(840));
    assert_eq!(second.trims, [b.end.unwrap()]);
    let commits = agent.commits.len();
    let again = agent.deliver(vec![Message::Snapshot(a)], at(850));
    assert!(matches!(only(&again, "ack"), Message::SnapshotAck(_)));
    assert_eq!(
        agent.commits.len(),
        commits,
        "a part of an older resync is not applied"
    );
    assert_eq!(agent.cursor.at, b.end.unwrap());
}

#[test]
fn a_stale_last_part_does_not_move_a_cursor_back_but_a_restored_sender_may() {
    // A new hub session follows the agent at 5 (where a resync ended).
    let end = Mark {
        seq: Seq(5),
        check: 55,
    };
    let mut agent = Side::agent(Mark::default(), 0, follows(HUB_INC, Mark::default()), cfg());
    agent.s.connected(at(0));
    let hello = agent.run(at(0));
    let mut hub = Side::hub(
        &hello[0],
        Mark::default(),
        BTreeMap::new(),
        follows(AGENT_INC, end),
    );
    hub.run(at(0));
    // Batches move the cursor on this link...
    let b = Batch {
        first: Seq(6),
        last: Seq(7),
        check: entry_check(&change(7)),
        entries: vec![
            Entry {
                seq: Seq(6),
                change: change(6),
            },
            Entry {
                seq: Seq(7),
                change: change(7),
            },
        ],
    };
    hub.deliver(vec![Message::Batch(b)], at(10));
    assert_eq!(hub.cursor.at.seq, Seq(7));
    // ...then a copy of the resync's last part, re-sent before its ack
    // arrived, reaches this session: its records merge, the cursor stays.
    let stale = Snapshot {
        resync: 1,
        part: 1,
        changes: vec![change(3)],
        end: Some(end),
    };
    let ack = hub.deliver(vec![Message::Snapshot(stale.clone())], at(20));
    assert!(matches!(only(&ack, "ack"), Message::SnapshotAck(_)));
    let (changes, cursor, snapshot) = hub.commits.last().unwrap();
    assert_eq!((changes.len(), *cursor, *snapshot), (1, None, true));
    assert_eq!(hub.cursor.at.seq, Seq(7));

    // The first resync after hello may move it back: the agent was restored.
    let mut hub = Side::hub(
        &hello[0],
        Mark::default(),
        BTreeMap::new(),
        follows(
            AGENT_INC,
            Mark {
                seq: Seq(9),
                check: 9,
            },
        ),
    );
    hub.run(at(0));
    hub.deliver(vec![Message::Snapshot(stale)], at(10));
    assert_eq!(hub.cursor, follows(AGENT_INC, end));
}

// ---- clocks --------------------------------------------------------------------

#[test]
fn a_stamp_beyond_the_drift_bound_is_refused_and_the_agent_pauses_then_says_hello() {
    let mut agent = Side::agent(Mark::default(), 0, follows(HUB_INC, Mark::default()), cfg());
    // Written with a clock two days ahead.
    agent
        .queue
        .insert(Seq(1), change_at(1, WALL + 2 * DAY_MS, "gw-1"));
    agent.s.appended(Seq(1));
    agent.s.connected(at(0));
    let hello = agent.run(at(0));
    let mut hub = Side::hub(
        only(&hello, "hello"),
        Mark::default(),
        BTreeMap::new(),
        follows(AGENT_INC, Mark::default()),
    );
    let sent = agent.deliver(hub.run(at(0)), at(10));
    assert_eq!(batches(&sent), [(1, 1)]);

    let answer = hub.deliver(sent, at(20));
    let Message::Error(e) = only(&answer, "refusal") else {
        panic!("{answer:?}");
    };
    assert_eq!((e.code, e.at), (ErrorCode::ClockAhead, Some(Seq(1))));
    assert!(hub.commits.is_empty(), "nothing committed");
    assert_eq!(hub.cursor.at.seq, Seq(0));
    assert!(hub.reports.iter().any(|r| matches!(
        r,
        Report::ClockRefused { seq: Some(Seq(1)), ahead_ms } if *ahead_ms > DAY_MS
    )));

    assert_eq!(agent.deliver(answer, at(30)), []);
    assert!(agent
        .reports
        .contains(&Report::ClockRefusedByPeer { seq: Some(Seq(1)) }));
    assert!(agent.s.is_paused());
    assert_eq!(agent.s.sender.pending(), 1, "the entry stays queued");
    assert_eq!(agent.tick(at(500)), [], "paused: nothing is sent");
    let again = agent.tick(at(1_030));
    assert!(
        matches!(only(&again, "hello"), Message::Hello(_)),
        "hello again after the timeout"
    );
}

#[test]
fn a_snapshot_stamped_beyond_the_bound_is_refused_whole() {
    let mut agent = Side::agent(Mark::default(), 0, Cursor::default(), cfg());
    agent.s.connected(at(0));
    let hello = agent.run(at(0));
    let mut hub = Side::hub(
        only(&hello, "hello"),
        Mark::default(),
        BTreeMap::new(),
        follows(AGENT_INC, Mark::default()),
    );
    for (n, wall) in [(1, WALL), (2, WALL + DAY_MS)] {
        let c = change_at(n, wall, "@hub");
        hub.records.insert((c.collection.clone(), c.key.clone()), c);
    }
    let sent = hub.run(at(0));
    let answer = agent.deliver(sent, at(10));
    assert_eq!(
        error_code(only(&answer, "refusal")),
        Some(ErrorCode::ClockAhead)
    );
    assert!(agent.commits.is_empty());
    hub.deliver(answer, at(20));
    assert!(hub.s.is_paused());
}

#[test]
fn an_agent_that_refuses_the_hubs_stamps_says_hello_again() {
    // The agent's correction is stale: its corrected clock is two days
    // behind the hub's, so the hub's fresh write looks two days ahead.
    let (mut agent, _, _) = linked(0, cfg());
    let ahead = Batch {
        first: Seq(1),
        last: Seq(1),
        check: entry_check(&change_at(1, WALL + 2 * DAY_MS, "@hub")),
        entries: vec![Entry {
            seq: Seq(1),
            change: change_at(1, WALL + 2 * DAY_MS, "@hub"),
        }],
    };
    let answer = agent.deliver(vec![Message::Batch(ahead)], at(100));
    assert_eq!(
        error_code(only(&answer, "refusal")),
        Some(ErrorCode::ClockAhead)
    );
    assert!(agent.commits.is_empty());
    // The hub's sender now waits for a hello: the agent pauses too, and says
    // hello after the ack timeout (the welcome corrects its clock).
    assert!(agent.s.is_paused());
    assert_eq!(agent.tick(at(1_099)), []);
    let hello = agent.tick(at(1_100));
    assert!(matches!(only(&hello, "hello"), Message::Hello(_)));
}

#[test]
fn a_wall_clock_set_right_between_hello_and_welcome_does_not_skew_the_offset() {
    // The device clock is 10 hours ahead at the hello and set right (by NTP)
    // before the welcome arrives 200 ms later; the hub's clock is right.
    let mut agent = Side::agent(Mark::default(), 0, follows(HUB_INC, Mark::default()), cfg());
    agent.s.connected(Now {
        mono_ms: 0,
        wall_ms: WALL + 10 * 3_600_000,
    });
    agent.run(at(0));
    let welcome = Message::Welcome(fieldsync_shared::wire::Welcome {
        incarnation: HUB_INC,
        up: follows(AGENT_INC, Mark::default()),
        time_ms: WALL + 100,
        health: false,
    });
    agent.deliver(vec![welcome], at(200));
    // The hub read its clock half the round trip before now: no offset left.
    assert_eq!(agent.offsets, [0]);
}

#[test]
fn the_welcome_and_the_hubs_time_messages_give_the_agent_its_offset() {
    // The hub's clock is 10 s ahead of the agent's.
    let mut agent = Side::agent(Mark::default(), 0, follows(HUB_INC, Mark::default()), cfg());
    agent.s.connected(at(0));
    let hello = agent.run(at(0));
    let Message::Hello(h) = only(&hello, "hello") else {
        unreachable!()
    };
    let hub_now = |ms: u64| Now {
        mono_ms: ms,
        wall_ms: WALL + ms + 10_000,
    };
    let identity = Identity::default();
    let (s, changed) = Session::hub(
        h,
        HUB_INC,
        Mark::default(),
        Seq(0),
        follows(AGENT_INC, Mark::default()),
        &identity,
        None,
        hub_now(100),
        cfg(),
    )
    .unwrap();
    assert_eq!(
        changed.map(|i| i.current),
        Some(Some(AGENT_INC)),
        "first contact"
    );
    let mut hub = Side::new(s, BTreeMap::new(), Cursor::default());
    // The welcome is read 200 ms after the hello: the hub's clock is taken at
    // the midpoint.
    agent.deliver(hub.run(hub_now(100)), at(200));
    assert_eq!(agent.offsets, [10_000]);
    assert_eq!(hub.tick(hub_now(29_000)), []);
    let time = hub.tick(hub_now(30_100));
    assert!(matches!(only(&time, "time"), Message::Time(_)));
    agent.deliver(time, at(30_300));
    assert_eq!(
        agent.offsets,
        [10_000, 9_800],
        "a time message is read as of now"
    );
}

// ---- identity ------------------------------------------------------------------

#[test]
fn identity_admits_the_known_store_and_records_a_replacement() {
    let (a, b) = (Incarnation(1), Incarnation(2));
    let first = Identity::default().admit(a, None);
    assert_eq!(
        first,
        Admission::Replaced(Identity {
            current: Some(a),
            retired: vec![]
        }),
        "first contact"
    );
    let known = Identity {
        current: Some(a),
        retired: vec![],
    };
    assert_eq!(known.admit(a, None), Admission::Known);
    assert_eq!(
        known.admit(a, Some(a)),
        Admission::Known,
        "its own other link"
    );
    assert_eq!(
        known.admit(b, None),
        Admission::Replaced(Identity {
            current: Some(b),
            retired: vec![a]
        }),
        "a re-imaged device: the old store is retired"
    );
}

#[test]
fn identity_refuses_a_retired_store_and_a_second_live_store() {
    let (a, b) = (Incarnation(1), Incarnation(2));
    let replaced = Identity {
        current: Some(b),
        retired: vec![a],
    };
    assert_eq!(
        replaced.admit(a, None),
        Admission::Conflict,
        "a replaced store came back"
    );
    let known = Identity {
        current: Some(a),
        retired: vec![],
    };
    assert_eq!(
        known.admit(b, Some(a)),
        Admission::Conflict,
        "two devices share one certificate"
    );
    assert_eq!(known.admit(a, Some(b)), Admission::Conflict);
}

#[test]
fn identity_keeps_a_bounded_list_of_retired_stores() {
    let mut id = Identity::default();
    let n = RETIRED_KEPT as u64 + 5;
    for i in 1..=n {
        match id.admit(Incarnation(i), None) {
            Admission::Replaced(next) => id = next,
            other => panic!("{i}: {other:?}"),
        }
    }
    assert_eq!(id.current, Some(Incarnation(n)));
    assert_eq!(id.retired.len(), RETIRED_KEPT);
    let expected: Vec<Incarnation> = (n - RETIRED_KEPT as u64..n).map(Incarnation).collect();
    assert_eq!(
        id.retired, expected,
        "the oldest are forgotten, the newest last"
    );
    assert_eq!(id.admit(Incarnation(n - 1), None), Admission::Conflict);
}

#[test]
fn a_refused_agent_stops_and_says_nothing_until_a_new_link() {
    let mut agent = Side::agent(Mark::default(), 3, follows(HUB_INC, Mark::default()), cfg());
    agent.s.connected(at(0));
    let hello = agent.run(at(0));
    let Message::Hello(h) = only(&hello, "hello") else {
        unreachable!()
    };
    let identity = Identity {
        current: Some(Incarnation(0x0717)),
        retired: vec![],
    };
    let refusal = Session::hub(
        h,
        HUB_INC,
        Mark::default(),
        Seq(0),
        Cursor::default(),
        &identity,
        Some(Incarnation(0x0717)),
        at(0),
        cfg(),
    )
    .expect_err("another store is linked with this identity");
    assert_eq!(error_code(&refusal), Some(ErrorCode::IdentityConflict));
    assert_eq!(agent.deliver(vec![refusal], at(10)), []);
    assert!(agent.s.is_refused());
    assert!(agent.reports.contains(&Report::IdentityRefused));
    assert_eq!(agent.tick(at(10_000)), [], "no hello at the ack timeout");
    assert_eq!(
        agent.tick(at(10_000_000)),
        [],
        "the driver ends the link and comes back after refused_retry_ms"
    );
    assert!(agent.s.is_refused());
    agent.s.disconnected();
    agent.s.connected(at(10_000_010));
    let again = agent.run(at(10_000_010));
    assert!(matches!(only(&again, "hello"), Message::Hello(_)));
}

#[test]
fn messages_the_wrong_way_are_malformed() {
    let (_, mut hub, _) = linked(0, cfg());
    let time = Message::Time(fieldsync_shared::wire::Time { time_ms: 1 });
    let answer = hub.deliver(vec![time], at(20));
    assert_eq!(
        error_code(only(&answer, "error")),
        Some(ErrorCode::Malformed)
    );
}

#[test]
fn a_record_too_large_for_one_message_is_resynced_in_pieces_that_merge_back() {
    let mut agent = Side::agent(Mark::default(), 0, Cursor::default(), cfg());
    agent.s.connected(at(0));
    let hello = agent.run(at(0));
    let mut hub = Side::hub(
        only(&hello, "hello"),
        Mark::default(),
        BTreeMap::new(),
        follows(AGENT_INC, Mark::default()),
    );
    // Two fields of 600 KiB: each write fitted, the record does not.
    let version = Version {
        stamp: Stamp::new(WALL, 0),
        origin: Origin::new("@hub").unwrap(),
    };
    let big = |c: char| Some(json!(c.to_string().repeat(600 * 1024)));
    let state = RecordState::default().write(
        [
            (FieldName::new("a").unwrap(), big('a')),
            (FieldName::new("b").unwrap(), big('b')),
        ],
        &version,
    );
    let record = Change {
        collection: CollectionName::new("c").unwrap(),
        key: RecordKey::new("big").unwrap(),
        state,
    };
    hub.records.insert(
        (record.collection.clone(), record.key.clone()),
        record.clone(),
    );
    let mut to_agent = hub.run(at(0));
    let mut parts = 0;
    for step in 0..10 {
        for m in &to_agent {
            if let Message::Snapshot(_) = m {
                parts += 1;
                let bytes = fieldsync_shared::codec::encode(&Envelope::new(m.clone()));
                assert!(bytes.is_ok(), "part {parts} does not fit a message");
            }
        }
        let acks = agent.deliver(std::mem::take(&mut to_agent), at(10 + step));
        if acks.is_empty() {
            break;
        }
        to_agent = hub.deliver(acks, at(20 + step));
    }
    assert!(parts >= 2, "the record went in {parts} part(s)");
    let mut merged = RecordState::default();
    for (changes, _, _) in &agent.commits {
        for c in changes {
            merged.merge(&c.state);
        }
    }
    assert_eq!(
        merged, record.state,
        "the pieces merge back into the record"
    );
    assert_eq!(agent.s.receiver.cursor().source, Some(HUB_INC));
}

#[test]
fn a_hello_under_other_merge_rules_is_refused_and_the_agent_stops() {
    use fieldsync_shared::rules::Fingerprint;
    let agent_cfg = SessionConfig {
        rules: Fingerprint([1; 16]),
        ..cfg()
    };
    let mut agent = Side::agent(
        Mark::default(),
        3,
        follows(HUB_INC, Mark::default()),
        agent_cfg,
    );
    agent.s.connected(at(0));
    let hello = agent.run(at(0));
    let Message::Hello(h) = only(&hello, "hello") else {
        unreachable!()
    };
    assert_eq!(h.rules, Fingerprint([1; 16]), "the hello carries the rules");
    let identity = Identity {
        current: Some(h.incarnation),
        retired: vec![],
    };
    // The hub has no rules: refused, and nothing of the identity changes.
    let refusal = Session::hub(
        h,
        HUB_INC,
        Mark::default(),
        Seq(0),
        Cursor::default(),
        &identity,
        None,
        at(0),
        cfg(),
    )
    .expect_err("the rules differ");
    assert_eq!(error_code(&refusal), Some(ErrorCode::RulesMismatch));
    let Message::Error(e) = &refusal else {
        unreachable!()
    };
    assert!(
        e.message.contains("01010101") && e.message.contains("none"),
        "{}",
        e.message
    );
    assert_eq!(agent.deliver(vec![refusal], at(10)), []);
    assert!(agent.s.is_refused());
    assert!(agent.reports.contains(&Report::RulesRefused));
    assert_eq!(agent.tick(at(10_000)), [], "no hello at the ack timeout");
    // The same rules on both sides: admitted.
    let hub_cfg = SessionConfig {
        rules: Fingerprint([1; 16]),
        ..cfg()
    };
    assert!(Session::hub(
        h,
        HUB_INC,
        Mark::default(),
        Seq(0),
        Cursor::default(),
        &identity,
        None,
        at(0),
        hub_cfg,
    )
    .is_ok());
}
