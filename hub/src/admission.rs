//! Admission control for the front door: the budget of connections that have
//! not yet authenticated (total and per source IP, apart from the slots of
//! authenticated agents), and the token buckets that pace each connection's
//! messages and bytes.
//!
//! **Architecture invariant:** an unauthenticated peer can hold only a pending
//! slot, never an agent's slot, and one source IP only a few of those; a
//! pending slot lasts at most the handshake and CONNECT timeouts.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The pending-connection budget: slots for connections still in TLS or
/// CONNECT, in all and per source IP. The accept loop takes a slot before it
/// accepts (so when all are held, new connections wait in the listen backlog
/// instead of being turned away) and, when none frees for a while, evicts
/// every holder that has stalled past `min_age`.
#[derive(Debug)]
pub struct Pending {
    slots: Arc<Semaphore>,
    max_per_ip: usize,
    held: Mutex<PendingCounts>,
}

#[derive(Debug, Default)]
struct PendingCounts {
    by_ip: HashMap<IpAddr, usize>,
    /// Holders in the order they took their slot.
    oldest: BTreeMap<u64, (Instant, CancellationToken)>,
    next: u64,
}

/// Why a new connection got no pending slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingRefusal {
    /// The source IP holds its share already.
    PerIp,
}

/// One held pending slot; released on drop.
#[derive(Debug)]
pub struct PendingSlot {
    budget: Arc<Pending>,
    ip: IpAddr,
    id: u64,
    _permit: OwnedSemaphorePermit,
}

impl Pending {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(Self {
            slots: Arc::new(Semaphore::new(max_total)),
            max_per_ip,
            held: Mutex::default(),
        })
    }

    /// A free slot now, if there is one.
    pub fn try_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// Waits for a free slot.
    pub async fn slot(&self) -> OwnedSemaphorePermit {
        self.slots
            .clone()
            .acquire_owned()
            .await
            .expect("the pending semaphore is never closed")
    }

    /// Closes every holder that has held its slot for `min_age` or more
    /// (oldest first; each closes once); returns how many it closed.
    pub fn evict_stalled(&self, min_age: Duration, now: Instant) -> usize {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let mut closed = 0;
        for (since, cancel) in held.oldest.values() {
            if now.saturating_duration_since(*since) < min_age {
                break;
            }
            if !cancel.is_cancelled() {
                cancel.cancel();
                closed += 1;
            }
        }
        closed
    }

    /// Gives the connection from `ip` the slot `permit`, unless its IP holds
    /// its share already. `cancel` closes it if it is evicted.
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        permit: OwnedSemaphorePermit,
        cancel: CancellationToken,
        now: Instant,
    ) -> Result<PendingSlot, PendingRefusal> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.by_ip.entry(ip).or_default();
        if *n >= self.max_per_ip {
            return Err(PendingRefusal::PerIp);
        }
        *n += 1;
        held.next += 1;
        let id = held.next;
        held.oldest.insert(id, (now, cancel));
        Ok(PendingSlot {
            budget: self.clone(),
            ip,
            id,
            _permit: permit,
        })
    }

    /// Slots held now.
    pub fn held(&self) -> usize {
        self.held.lock().map(|h| h.oldest.len()).unwrap_or(0)
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut held = self.budget.held.lock().unwrap_or_else(|p| p.into_inner());
        held.oldest.remove(&self.id);
        if let Some(n) = held.by_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                held.by_ip.remove(&self.ip);
            }
        }
    }
}

/// A rate and the burst allowed above it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_s: f64,
    pub burst: f64,
}

/// A token bucket: `burst` tokens at most, refilled at `per_s`.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: Rate,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate: Rate, now: Instant) -> Self {
        Self {
            rate,
            tokens: rate.burst,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate.per_s).min(self.rate.burst);
        self.at = now;
    }

    /// Takes `n` tokens (at most the burst: a message larger than the burst
    /// waits for a full bucket). Returns how long the caller must wait before
    /// going on; zero if the tokens were there. The bucket may go negative:
    /// the wait pays the debt.
    pub fn take(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= n.min(self.rate.burst);
        if self.tokens >= 0.0 || self.rate.per_s <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate.per_s)
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket is full (nothing to remember about its owner).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.rate.burst
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_slots_are_bounded_in_total_and_per_ip_and_stalled_holders_are_evicted() {
        let budget = Pending::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        let take = |ip, cancel: &CancellationToken, at| {
            let permit = budget.try_slot().expect("a free slot");
            budget.admit(ip, permit, cancel.clone(), at)
        };
        let (c1, c2, c3) = (
            CancellationToken::new(),
            CancellationToken::new(),
            CancellationToken::new(),
        );
        let s1 = take(a, &c1, t0).unwrap();
        let _s2 = take(a, &c2, t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(
            take(a, &c3, t0).unwrap_err(),
            PendingRefusal::PerIp,
            "a third from one IP"
        );
        let _s3 = take(b, &c3, t0 + Duration::from_secs(2)).unwrap();
        assert!(budget.try_slot().is_none(), "all three slots are held");
        // Nobody has stalled for 5 s yet; at 6 s the two oldest have, once.
        let five = Duration::from_secs(5);
        assert_eq!(budget.evict_stalled(five, t0 + Duration::from_secs(4)), 0);
        assert_eq!(budget.evict_stalled(five, t0 + Duration::from_secs(6)), 2);
        assert!(c1.is_cancelled() && c2.is_cancelled() && !c3.is_cancelled());
        assert_eq!(budget.evict_stalled(five, t0 + Duration::from_secs(6)), 0);
        drop(s1);
        assert_eq!(budget.held(), 2);
        assert!(budget.try_slot().is_some());
    }

    #[test]
    fn a_bucket_paces_to_its_rate_after_the_burst() {
        let t0 = Instant::now();
        let mut bucket = Bucket::new(
            Rate {
                per_s: 10.0,
                burst: 5.0,
            },
            t0,
        );
        for _ in 0..5 {
            assert_eq!(bucket.take(1.0, t0), Duration::ZERO);
        }
        // The sixth token is owed: a tenth of a second at 10/s.
        let wait = bucket.take(1.0, t0);
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9, "{wait:?}");
        // After a second the debt is paid and 9 of 5 would be back: capped.
        assert!(bucket.is_full(t0 + Duration::from_secs(2)));
        let mut hellos = Bucket::new(
            Rate {
                per_s: 1.0,
                burst: 2.0,
            },
            t0,
        );
        assert!(hellos.try_take(t0) && hellos.try_take(t0));
        assert!(!hellos.try_take(t0));
        assert!(hellos.try_take(t0 + Duration::from_secs(1)));
    }
}
