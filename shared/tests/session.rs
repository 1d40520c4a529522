//! Behaviour of the sans-IO sync session: the `Sender`'s batching, window, acks
//! and resend after reconnect; the `Receiver`'s at-most-once plan; and a
//! simulation over a channel that drops, duplicates and disconnects, checking
//! that every entry is applied exactly once, in order, and trimmed only after.

use std::collections::{BTreeMap, VecDeque};

use fieldsync_shared::session::{Plan, SessionError};
use fieldsync_shared::wire::{Batch, Entry};
use fieldsync_shared::{Change, CollectionName, FieldName, Origin, RecordKey, RecordState};
use fieldsync_shared::{Receiver, Sender, Seq, Stamp, Version};
use proptest::prelude::*;
use serde_json::json;

fn change(seq: u64) -> Change {
    let mut state = RecordState::default();
    let version = Version {
        stamp: Stamp::new(seq, 0),
        origin: Origin::new("gw-1").unwrap(),
    };
    state.write([(FieldName::new("n").unwrap(), Some(json!(seq)))], &version);
    Change {
        collection: CollectionName::new("c").unwrap(),
        key: RecordKey::new("k").unwrap(),
        state,
    }
}

fn entry(seq: u64) -> Entry {
    Entry {
        seq: Seq(seq),
        change: change(seq),
    }
}

fn batch(first: u64, last: u64, present: &[u64]) -> Batch {
    Batch {
        first: Seq(first),
        last: Seq(last),
        entries: present.iter().map(|&s| entry(s)).collect(),
    }
}

fn seqs(entries: &[Entry]) -> Vec<u64> {
    entries.iter().map(|e| e.seq.0).collect()
}

/// A connected sender with `acked+1..=last` queued.
fn connected(acked: u64, last: u64, window: u64) -> Sender {
    let mut s = Sender::new(Seq(acked), Seq(last), window);
    s.connected(Seq(acked)).unwrap();
    s
}

/// Takes the next range as sent and returns it.
fn send(s: &mut Sender, max_entries: u64) -> Option<(u64, u64)> {
    let (first, last) = s.next_range(max_entries)?;
    s.sent(last);
    Some((first.0, last.0))
}

// ---- Sender ----------------------------------------------------------------

#[test]
fn batches_respect_max_entries_and_the_window() {
    let mut s = connected(0, 10, 4);
    assert_eq!(send(&mut s, 3), Some((1, 3)));
    assert_eq!(
        send(&mut s, 3),
        Some((4, 4)),
        "only one slot left in the window"
    );
    assert_eq!(s.next_range(3), None, "window full");
    assert_eq!(s.acked(Seq(2)), Ok(Some(Seq(2))));
    assert_eq!(send(&mut s, 3), Some((5, 6)), "the ack opened two slots");
    assert_eq!(s.acked(Seq(6)), Ok(Some(Seq(6))));
    assert_eq!(
        send(&mut s, 100),
        Some((7, 10)),
        "capped by the queue's end"
    );
    assert_eq!(s.next_range(100), None, "nothing left to send");
    assert_eq!(s.pending(), 4);
}

#[test]
fn zero_limits_still_make_progress_one_entry_at_a_time() {
    let mut s = connected(0, 3, 0);
    assert_eq!(send(&mut s, 0), Some((1, 1)));
    assert_eq!(s.next_range(0), None, "a window of 0 acts as 1");
    s.acked(Seq(1)).unwrap();
    assert_eq!(send(&mut s, 0), Some((2, 2)));
}

#[test]
fn appends_extend_the_queue_and_never_shrink_it() {
    let mut s = connected(0, 0, 8);
    assert_eq!(s.next_range(8), None, "empty queue");
    s.appended(Seq(3));
    assert_eq!(send(&mut s, 8), Some((1, 3)));
    s.appended(Seq(2));
    assert_eq!(s.pending(), 3, "a stale append does not shrink the queue");
    s.appended(Seq(5));
    assert_eq!(send(&mut s, 8), Some((4, 5)));
    assert_eq!(s.pending(), 5);
}

#[test]
fn nothing_is_sent_while_disconnected() {
    let mut s = Sender::new(Seq(0), Seq(5), 10);
    assert!(!s.is_connected());
    assert_eq!(s.next_range(10), None, "never connected");
    s.sent(Seq(5)); // ignored: there is no connection to have sent it on
    s.connected(Seq(0)).unwrap();
    assert_eq!(send(&mut s, 2), Some((1, 2)));
    s.disconnected();
    assert!(!s.is_connected());
    assert_eq!(s.next_range(10), None, "disconnected");
    s.appended(Seq(9));
    assert_eq!(s.next_range(10), None, "still disconnected after an append");
    assert_eq!(s.pending(), 9);
}

#[test]
fn acks_trim_only_forward() {
    let mut s = connected(0, 10, 10);
    send(&mut s, 10);
    assert_eq!(s.acked(Seq(5)), Ok(Some(Seq(5))));
    assert_eq!(s.acked(Seq(3)), Ok(None), "an older ack trims nothing");
    assert_eq!(s.acked(Seq(5)), Ok(None), "a repeated ack trims nothing");
    assert_eq!(s.acked(Seq(0)), Ok(None));
    assert_eq!(s.acked_upto(), Seq(5));
    assert_eq!(s.pending(), 5);
    assert_eq!(s.acked(Seq(10)), Ok(Some(Seq(10))));
    assert_eq!(s.pending(), 0);
}

#[test]
fn an_ack_beyond_the_queue_is_peer_ahead_and_changes_nothing() {
    let mut s = connected(0, 4, 10);
    send(&mut s, 10);
    assert_eq!(
        s.acked(Seq(5)),
        Err(SessionError::PeerAhead {
            peer: Seq(5),
            last: Seq(4)
        })
    );
    assert_eq!(s.acked_upto(), Seq(0));
    assert_eq!(s.pending(), 4);
    assert!(s.is_connected());
}

#[test]
fn a_peer_watermark_beyond_the_queue_refuses_the_connection() {
    let mut s = Sender::new(Seq(2), Seq(4), 10);
    assert_eq!(
        s.connected(Seq(9)),
        Err(SessionError::PeerAhead {
            peer: Seq(9),
            last: Seq(4)
        })
    );
    assert!(!s.is_connected());
    assert_eq!(s.next_range(10), None);
    assert_eq!(s.acked_upto(), Seq(2));
}

#[test]
fn reconnect_resends_from_the_peer_watermark() {
    let mut s = connected(0, 10, 10);
    assert_eq!(send(&mut s, 10), Some((1, 10)));
    s.disconnected();
    // The receiver committed 1..=4 but its acks were lost with the connection.
    assert_eq!(s.connected(Seq(4)), Ok(Some(Seq(4))), "the watermark trims");
    assert_eq!(s.acked_upto(), Seq(4));
    assert_eq!(
        send(&mut s, 3),
        Some((5, 7)),
        "resend starts after the watermark"
    );
    s.disconnected();
    // Nothing new was committed: everything unacknowledged is resent.
    assert_eq!(s.connected(Seq(4)), Ok(None));
    assert_eq!(send(&mut s, 10), Some((5, 10)));
}

#[test]
fn a_new_connection_resends_even_without_a_disconnect_event() {
    // The driver may learn of a dropped connection only when the next one is up.
    let mut s = connected(0, 8, 8);
    assert_eq!(send(&mut s, 8), Some((1, 8)));
    assert_eq!(s.connected(Seq(3)), Ok(Some(Seq(3))));
    assert_eq!(send(&mut s, 8), Some((4, 8)));
}

#[test]
fn a_reconnect_during_a_full_window_reopens_it() {
    let mut s = connected(0, 6, 2);
    assert_eq!(send(&mut s, 10), Some((1, 2)));
    assert_eq!(s.next_range(10), None);
    s.disconnected();
    s.connected(Seq(0)).unwrap();
    assert_eq!(send(&mut s, 10), Some((1, 2)), "the lost flight is resent");
}

#[test]
fn an_ack_past_what_was_sent_moves_the_send_position() {
    // After a reconnect the peer may acknowledge entries sent on an earlier
    // connection; the sender must not send them again.
    let mut s = connected(0, 10, 10);
    assert_eq!(send(&mut s, 2), Some((1, 2)));
    assert_eq!(s.acked(Seq(6)), Ok(Some(Seq(6))));
    assert_eq!(send(&mut s, 10), Some((7, 10)));
}

// ---- Receiver --------------------------------------------------------------

#[test]
fn the_next_batch_is_applied_whole() {
    let r = Receiver::new(Seq(3));
    let b = batch(4, 7, &[4, 6]);
    assert_eq!(
        r.plan(&b),
        Ok(Plan::Apply {
            entries: &b.entries[..],
            watermark: Seq(7)
        })
    );
}

#[test]
fn a_duplicate_batch_is_acknowledged_again_not_applied() {
    let r = Receiver::new(Seq(7));
    for b in [
        batch(4, 7, &[4, 6]),
        batch(1, 2, &[1, 2]),
        batch(7, 7, &[7]),
    ] {
        assert_eq!(r.plan(&b), Ok(Plan::Duplicate { watermark: Seq(7) }));
    }
}

#[test]
fn an_overlapping_batch_applies_only_the_new_entries() {
    let r = Receiver::new(Seq(5));
    let b = batch(3, 9, &[3, 4, 5, 6, 8]);
    match r.plan(&b) {
        Ok(Plan::Apply { entries, watermark }) => {
            assert_eq!(seqs(entries), [6, 8]);
            assert_eq!(watermark, Seq(9));
        }
        other => panic!("{other:?}"),
    }
    // The new part may be empty (filtered out) and still move the watermark.
    let b = batch(2, 8, &[2, 5]);
    match r.plan(&b) {
        Ok(Plan::Apply { entries, watermark }) => {
            assert!(entries.is_empty());
            assert_eq!(watermark, Seq(8));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_batch_past_the_next_expected_seq_is_a_gap() {
    let r = Receiver::new(Seq(5));
    assert_eq!(
        r.plan(&batch(7, 9, &[7])),
        Err(SessionError::Gap {
            expected: Seq(6),
            first: Seq(7)
        })
    );
    assert_eq!(
        Receiver::new(Seq(0)).plan(&batch(2, 2, &[2])).unwrap_err(),
        {
            SessionError::Gap {
                expected: Seq(1),
                first: Seq(2),
            }
        }
    );
}

#[test]
fn the_watermark_only_moves_forward() {
    let mut r = Receiver::new(Seq(5));
    r.committed(Seq(3));
    assert_eq!(r.applied(), Seq(5));
    r.committed(Seq(8));
    assert_eq!(r.applied(), Seq(8));
}

#[test]
fn a_watermark_at_the_end_of_the_sequence_space_does_not_panic() {
    // A (misbehaving) peer can send a valid batch that claims `last = u64::MAX`.
    let mut r = Receiver::new(Seq(0));
    let claim = batch(1, u64::MAX, &[]);
    let Ok(Plan::Apply { watermark, .. }) = r.plan(&claim) else {
        panic!("the first batch applies");
    };
    r.committed(watermark);
    assert_eq!(r.applied(), Seq(u64::MAX));
    assert_eq!(
        r.plan(&batch(1, 1, &[1])),
        Ok(Plan::Duplicate {
            watermark: Seq(u64::MAX)
        })
    );
    assert_eq!(Seq(u64::MAX).next(), Seq(u64::MAX));
}

// ---- simulation ------------------------------------------------------------

/// One step of the world around a sender and a receiver.
#[derive(Clone, Debug)]
enum Step {
    /// The local writer commits `n` more entries to the sender's queue.
    Append(u64),
    /// The sender's driver sends the next range, if any.
    Pump,
    /// The oldest in-flight batch arrives (unless dropped); a duplicate of it may
    /// arrive again later.
    DeliverBatch { drop: bool, duplicate: bool },
    /// The oldest in-flight ack arrives (unless dropped).
    DeliverAck { drop: bool },
    /// The connection breaks: whatever is in flight is lost.
    Disconnect,
    /// A new connection: the receiver reports its watermark (Hello / Welcome).
    Reconnect,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => (1u64..5).prop_map(Step::Append),
        4 => Just(Step::Pump),
        4 => (prop::bool::weighted(0.15), prop::bool::weighted(0.15))
            .prop_map(|(drop, duplicate)| Step::DeliverBatch { drop, duplicate }),
        3 => prop::bool::weighted(0.2).prop_map(|drop| Step::DeliverAck { drop }),
        1 => Just(Step::Disconnect),
        1 => Just(Step::Reconnect),
    ]
}

/// The sender's side, the channel, and the receiver's side, with the checks.
struct World {
    sender: Sender,
    /// The sender's durable queue: seq to change, `None` where the policy
    /// filtered the change to nothing (the seq is covered but carries no entry).
    queue: BTreeMap<u64, Option<Change>>,
    last: u64,
    receiver: Receiver,
    /// Everything the receiver applied, in order.
    applied: Vec<u64>,
    batches: VecDeque<Batch>,
    acks: VecDeque<Seq>,
    max_entries: u64,
    window: u64,
}

impl World {
    fn new(max_entries: u64, window: u64) -> Self {
        Self {
            sender: Sender::new(Seq(0), Seq(0), window),
            queue: BTreeMap::new(),
            last: 0,
            receiver: Receiver::new(Seq(0)),
            applied: Vec::new(),
            batches: VecDeque::new(),
            acks: VecDeque::new(),
            max_entries,
            window,
        }
    }

    fn append(&mut self, n: u64) {
        for _ in 0..n {
            self.last += 1;
            let filtered = self.last % 5 == 0;
            let change = (!filtered).then(|| change(self.last));
            self.queue.insert(self.last, change);
        }
        self.sender.appended(Seq(self.last));
    }

    fn pump(&mut self) -> Result<bool, TestCaseError> {
        let before = self.sender.acked_upto();
        let Some((first, last)) = self.sender.next_range(self.max_entries) else {
            return Ok(false);
        };
        prop_assert!(
            self.sender.is_connected(),
            "a range offered while disconnected"
        );
        prop_assert!(first > before && first <= last && last.0 <= self.last);
        prop_assert!(
            last.0 - first.0 < self.max_entries,
            "range over max_entries"
        );
        prop_assert!(last.0 - before.0 <= self.window, "range beyond the window");
        let entries: Vec<Entry> = self
            .queue
            .range(first.0..=last.0)
            .filter_map(|(&seq, c)| {
                c.clone().map(|change| Entry {
                    seq: Seq(seq),
                    change,
                })
            })
            .collect();
        let b = Batch {
            first,
            last,
            entries,
        };
        prop_assert_eq!(b.validate(), Ok(()));
        self.batches.push_back(b);
        self.sender.sent(last);
        Ok(true)
    }

    fn receive(&mut self, b: &Batch) -> Result<(), TestCaseError> {
        match self.receiver.plan(b) {
            Ok(Plan::Apply { entries, watermark }) => {
                // "Commit" the entries and the watermark together, then ack.
                self.applied.extend(entries.iter().map(|e| e.seq.0));
                for e in entries {
                    let sent = self.queue.get(&e.seq.0);
                    prop_assert!(
                        sent.is_some_and(|c| c.as_ref() == Some(&e.change)),
                        "applied seq {} that is not (or no longer) queued with this change",
                        e.seq
                    );
                }
                self.receiver.committed(watermark);
                self.acks.push_back(watermark);
            }
            Ok(Plan::Duplicate { watermark }) => self.acks.push_back(watermark),
            // The driver would answer with an Error; the stream resumes after the
            // next reconnect.
            Err(SessionError::Gap { .. }) => {}
            Err(e) => return Err(TestCaseError::fail(format!("receiver: {e}"))),
        }
        Ok(())
    }

    fn ack(&mut self, upto: Seq) -> Result<(), TestCaseError> {
        let before = self.sender.acked_upto();
        match self.sender.acked(upto) {
            Ok(Some(trim)) => {
                prop_assert!(trim > before, "trim moved backwards");
                self.trim(trim)?;
            }
            Ok(None) => prop_assert!(upto <= before),
            Err(e) => return Err(TestCaseError::fail(format!("sender: {e}"))),
        }
        Ok(())
    }

    /// Removes `..=upto` from the durable queue, checking it was all applied.
    fn trim(&mut self, upto: Seq) -> Result<(), TestCaseError> {
        prop_assert!(
            upto <= self.receiver.applied(),
            "trimmed up to {} but the receiver applied only {}",
            upto,
            self.receiver.applied()
        );
        let keep = self.queue.split_off(&(upto.0 + 1));
        let trimmed = std::mem::replace(&mut self.queue, keep);
        for (seq, change) in trimmed {
            if change.is_some() {
                prop_assert!(self.applied.contains(&seq), "trimmed unapplied seq {seq}");
            }
        }
        Ok(())
    }

    fn disconnect(&mut self) {
        self.sender.disconnected();
        self.batches.clear();
        self.acks.clear();
    }

    fn reconnect(&mut self) -> Result<(), TestCaseError> {
        self.disconnect();
        let before = self.sender.acked_upto();
        match self.sender.connected(self.receiver.applied()) {
            Ok(Some(trim)) => {
                prop_assert!(trim > before);
                self.trim(trim)?;
            }
            Ok(None) => {}
            Err(e) => return Err(TestCaseError::fail(format!("connect: {e}"))),
        }
        prop_assert_eq!(self.sender.acked_upto(), self.receiver.applied());
        Ok(())
    }

    fn run(&mut self, s: &Step) -> Result<(), TestCaseError> {
        match *s {
            Step::Append(n) => self.append(n),
            Step::Pump => {
                self.pump()?;
            }
            Step::DeliverBatch { drop, duplicate } => {
                if let Some(b) = self.batches.pop_front() {
                    if duplicate {
                        self.batches.push_back(b.clone());
                    }
                    if !drop {
                        self.receive(&b)?;
                    }
                }
            }
            Step::DeliverAck { drop } => {
                if let Some(upto) = self.acks.pop_front() {
                    if !drop {
                        self.ack(upto)?;
                    }
                }
            }
            Step::Disconnect => self.disconnect(),
            Step::Reconnect => self.reconnect()?,
        }
        self.check_invariants()
    }

    fn check_invariants(&self) -> Result<(), TestCaseError> {
        prop_assert!(
            self.applied.windows(2).all(|w| w[0] < w[1]),
            "applied out of order or twice: {:?}",
            self.applied
        );
        prop_assert!(self.sender.acked_upto() <= self.receiver.applied());
        prop_assert_eq!(
            self.sender.pending(),
            self.last - self.sender.acked_upto().0
        );
        if !self.sender.is_connected() {
            prop_assert_eq!(self.sender.next_range(self.max_entries), None);
        }
        Ok(())
    }

    /// The network heals: a clean connection, no loss, until nothing moves.
    fn settle(&mut self) -> Result<(), TestCaseError> {
        self.reconnect()?;
        for _ in 0..10_000 {
            let sent = self.pump()?;
            let batch = self.batches.pop_front();
            if let Some(b) = &batch {
                self.receive(b)?;
            }
            let ack = self.acks.pop_front();
            if let Some(upto) = ack {
                self.ack(upto)?;
            }
            self.check_invariants()?;
            if !sent && batch.is_none() && ack.is_none() {
                return Ok(());
            }
        }
        Err(TestCaseError::fail("the session did not settle"))
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_entry_is_applied_exactly_once_in_order_and_trimmed_only_after(
        max_entries in 1u64..6,
        window in 1u64..10,
        connect_first in any::<bool>(),
        steps in prop::collection::vec(step(), 0..150),
    ) {
        let mut w = World::new(max_entries, window);
        if connect_first {
            w.reconnect()?;
        }
        for s in &steps {
            w.run(s)?;
        }
        w.settle()?;
        let expected: Vec<u64> = (1..=w.last).filter(|s| s % 5 != 0).collect();
        prop_assert_eq!(&w.applied, &expected);
        prop_assert_eq!(w.receiver.applied(), Seq(w.last));
        prop_assert_eq!(w.sender.acked_upto(), Seq(w.last));
        prop_assert_eq!(w.sender.pending(), 0);
        prop_assert!(w.queue.is_empty(), "left in the queue: {:?}", w.queue.keys());
    }
}
