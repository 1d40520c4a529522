//! Hybrid logical clock: stamps that follow wall-clock time when it moves forward
//! and a logical counter when it does not, so every stamp a replica issues is
//! greater than every stamp it has issued or observed before.
//!
//! The wall clock is passed in (milliseconds since the Unix epoch), so the clock
//! is deterministic under test. The caller persists [`Hlc::last`] in the same
//! transaction as the writes it stamped and restores it with [`Hlc::restore`];
//! that keeps stamps monotonic across restarts even if the system clock steps back.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// One reading of a hybrid logical clock. Ordered by `wall_ms`, then `logical`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Stamp {
    /// Physical component: milliseconds since the Unix epoch.
    pub wall_ms: u64,
    /// Logical component: orders stamps that share `wall_ms`.
    pub logical: u32,
}

impl Stamp {
    pub const fn new(wall_ms: u64, logical: u32) -> Self {
        Self { wall_ms, logical }
    }

    /// The smallest stamp strictly greater than `self`.
    fn successor(self) -> Self {
        match self.logical.checked_add(1) {
            Some(logical) => Self::new(self.wall_ms, logical),
            None => Self::new(self.wall_ms.saturating_add(1), 0),
        }
    }
}

/// Errors from the clock.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HlcError {
    /// A remote stamp is further ahead of our wall clock than the allowed drift.
    /// It is refused rather than dragging this replica's clock into the future.
    #[error(
        "remote stamp {remote_ms} ms is {ahead_ms} ms ahead of the local clock \
         ({local_ms} ms); at most {max_drift_ms} ms of drift is allowed"
    )]
    TooFarAhead {
        remote_ms: u64,
        local_ms: u64,
        ahead_ms: u64,
        max_drift_ms: u64,
    },
}

/// Default bound on how far a remote stamp may be ahead of the local clock.
pub const DEFAULT_MAX_DRIFT_MS: u64 = 60_000;

/// A hybrid logical clock owned by one replica.
#[derive(Debug, Clone)]
pub struct Hlc {
    last: Stamp,
    max_drift_ms: u64,
}

impl Hlc {
    /// A clock that has issued nothing yet.
    pub fn new(max_drift_ms: u64) -> Self {
        Self::restore(Stamp::default(), max_drift_ms)
    }

    /// A clock continuing from `last`, the value of [`Hlc::last`] that was persisted.
    pub fn restore(last: Stamp, max_drift_ms: u64) -> Self {
        Self { last, max_drift_ms }
    }

    /// The greatest stamp issued or observed so far; persist it with the writes.
    pub fn last(&self) -> Stamp {
        self.last
    }

    /// Lowers the clock to `floor` (keeping it if already below): after
    /// [`crate::clock`] re-stamped the stamps a clock that ran ahead had
    /// issued, the clock continues from the greatest stamp still held
    /// (`floor`), so it stops issuing stamps from the future and every later
    /// stamp still exceeds everything stored.
    pub fn lower_to(&mut self, floor: Stamp) {
        if self.last > floor {
            self.last = floor;
        }
    }

    /// A stamp for a local event at wall time `now_ms`.
    pub fn tick(&mut self, now_ms: u64) -> Stamp {
        self.last = if now_ms > self.last.wall_ms {
            Stamp::new(now_ms, 0)
        } else {
            self.last.successor()
        };
        self.last
    }

    /// Takes a remote stamp into account, so later local stamps sort after it.
    /// Refuses (and leaves the clock unchanged) a stamp further ahead of `now_ms`
    /// than the drift bound.
    pub fn observe(&mut self, remote: Stamp, now_ms: u64) -> Result<(), HlcError> {
        let ahead_ms = remote.wall_ms.saturating_sub(now_ms);
        if ahead_ms > self.max_drift_ms {
            return Err(HlcError::TooFarAhead {
                remote_ms: remote.wall_ms,
                local_ms: now_ms,
                ahead_ms,
                max_drift_ms: self.max_drift_ms,
            });
        }
        self.last = self.last.max(remote);
        Ok(())
    }
}

/// The system's wall clock in milliseconds since the Unix epoch (0 if the clock
/// reads before 1970).
pub fn system_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn follows_the_wall_clock_when_it_advances() {
        let mut c = Hlc::new(DEFAULT_MAX_DRIFT_MS);
        assert_eq!(c.tick(100), Stamp::new(100, 0));
        assert_eq!(c.tick(105), Stamp::new(105, 0));
    }

    #[test]
    fn counts_logically_when_the_wall_clock_stalls_or_steps_back() {
        let mut c = Hlc::new(DEFAULT_MAX_DRIFT_MS);
        c.tick(100);
        assert_eq!(c.tick(100), Stamp::new(100, 1));
        assert_eq!(c.tick(50), Stamp::new(100, 2));
    }

    #[test]
    fn logical_overflow_moves_to_the_next_millisecond() {
        let mut c = Hlc::restore(Stamp::new(7, u32::MAX), DEFAULT_MAX_DRIFT_MS);
        assert_eq!(c.tick(0), Stamp::new(8, 0));
    }

    #[test]
    fn stays_monotonic_across_a_restart_even_if_the_clock_steps_back() {
        let mut before = Hlc::new(DEFAULT_MAX_DRIFT_MS);
        let last = (0..10).map(|i| before.tick(4_000_000 + i)).last().unwrap();
        // The process restarts and the system clock now reads an hour earlier.
        let mut after = Hlc::restore(before.last(), DEFAULT_MAX_DRIFT_MS);
        let next = after.tick(4_000_000 - 3_600_000);
        assert!(next > last);
    }

    #[test]
    fn observed_remote_stamps_order_later_local_stamps_after_them() {
        let mut c = Hlc::new(DEFAULT_MAX_DRIFT_MS);
        c.tick(100);
        c.observe(Stamp::new(5_000, 3), 1_000).unwrap();
        assert_eq!(c.tick(1_000), Stamp::new(5_000, 4));
    }

    #[test]
    fn refuses_a_remote_stamp_beyond_the_drift_bound_and_stays_unchanged() {
        let mut c = Hlc::new(1_000);
        let before = c.tick(10_000);
        assert_eq!(c.observe(Stamp::new(11_000, 0), 10_000), Ok(()));
        let err = c
            .observe(Stamp::new(11_001 + 1_000, 0), 10_000)
            .unwrap_err();
        assert_eq!(
            err,
            HlcError::TooFarAhead {
                remote_ms: 12_001,
                local_ms: 10_000,
                ahead_ms: 2_001,
                max_drift_ms: 1_000
            }
        );
        assert!(c.last() >= before);
        assert_eq!(c.last(), Stamp::new(11_000, 0));
    }

    proptest! {
        /// Whatever the wall clock does and whatever remote stamps arrive, every
        /// local stamp is strictly greater than all stamps issued or observed.
        #[test]
        fn every_tick_exceeds_everything_seen(events in prop::collection::vec(
            (0u64..10_000, prop::option::of((0u64..12_000, 0u32..4))), 1..200)
        ) {
            let mut c = Hlc::new(1_000);
            let mut max_seen = Stamp::default();
            for (now, remote) in events {
                if let Some((wall, logical)) = remote {
                    if c.observe(Stamp::new(wall, logical), now).is_ok() {
                        max_seen = max_seen.max(Stamp::new(wall, logical));
                    }
                }
                let s = c.tick(now);
                prop_assert!(s > max_seen);
                max_seen = s;
            }
        }
    }
}
