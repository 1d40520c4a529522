//! Clock safety: what a replica does once it learns that its wall clock is
//! wrong. The hub's clock is the reference; an agent learns its offset from
//! the welcome (and the hub's `Time` messages), corrects the wall clock its
//! HLC reads by it, and re-stamps what it wrote with the wrong clock and no
//! one has acknowledged yet, so that those writes sort where they happened in
//! real time instead of winning (or losing) every later write.
//!
//! The rule: a version stamped by this replica whose wall time is beyond
//! `limit_ms` (the corrected now plus the drift bound) was made with a clock
//! that ran ahead. All such versions move by one shift ([`restamp_shift`]:
//! the correction just learned, or more if that would leave the newest of
//! them past the corrected now) and keep their logical parts, so re-stamped
//! writes keep their order. Only entries never acknowledged are re-stamped:
//! the hub refuses stamps beyond its bound, so whatever it acknowledged is
//! within it. A downstream write that lost to one of those stamps before the
//! re-stamp is already gone from the records, so after a re-stamp that
//! changed records the agent resyncs its downstream (its cursor follows no
//! hub incarnation again, in the same transaction).
//! The clock itself is then lowered to the greatest stamp the store still
//! holds ([`crate::Hlc::lower_to`]), so later stamps stay unique and sort
//! after everything the replica has seen, and are issued from real time.

use crate::hlc::Stamp;
use crate::id::Origin;
use crate::record::{RecordState, Version};

/// The corrected wall clock: `system_ms` moved by `offset_ms`.
pub fn corrected(system_ms: u64, offset_ms: i64) -> u64 {
    system_ms.saturating_add_signed(offset_ms)
}

/// Offsets smaller than this are measurement noise and are not applied.
pub const OFFSET_NOISE_MS: i64 = 250;

/// The highest wall time an own stamp may keep at corrected time `now_ms`:
/// the drift bound ahead, beyond which every receiver refuses it.
pub fn limit_ms(now_ms: u64, max_drift_ms: u64) -> u64 {
    now_ms.saturating_add(max_drift_ms)
}

/// Whether a clock whose last stamp is `last` needs re-stamping at `limit_ms`.
pub fn needs_restamp(last: Stamp, limit_ms: u64) -> bool {
    last.wall_ms > limit_ms
}

/// The newest wall time among the own versions in `state` beyond `limit_ms`.
pub fn newest_beyond(state: &RecordState, own: &Origin, limit_ms: u64) -> Option<u64> {
    state
        .deleted
        .iter()
        .chain(state.fields.values().map(|f| &f.version))
        .filter(|v| &v.origin == own && v.stamp.wall_ms > limit_ms)
        .map(|v| v.stamp.wall_ms)
        .max()
}

/// The one shift applied to every own stamp beyond the limit: the clock
/// correction just learned (`offset_ms`, negative for a clock that ran
/// ahead), but at least enough that the newest such stamp (`newest_ms`) lands
/// at or before the corrected now. One shift for all keeps their order.
pub fn restamp_shift(offset_ms: i64, now_ms: u64, newest_ms: u64) -> i64 {
    let to_now = crate::session::signed_diff(now_ms, newest_ms);
    offset_ms.min(to_now)
}

/// Moves the own versions in `state` beyond `limit_ms` by `shift_ms`, keeping
/// their logical parts. Returns whether anything changed. Keeps the canonical
/// form (fields at or below the record tombstone are dropped).
pub fn restamp_state(state: &mut RecordState, own: &Origin, limit_ms: u64, shift_ms: i64) -> bool {
    let shift = |v: &mut Version| {
        let ahead = &v.origin == own && v.stamp.wall_ms > limit_ms;
        if ahead {
            v.stamp = Stamp::new(
                v.stamp.wall_ms.saturating_add_signed(shift_ms),
                v.stamp.logical,
            );
        }
        ahead
    };
    let mut changed = state.deleted.as_mut().is_some_and(shift);
    let mut gone = Vec::new();
    for (name, f) in state.fields.iter_mut() {
        let mut moved = false;
        for v in f.versions_mut() {
            moved |= shift(v);
        }
        // What the field has seen of this replica moves with its versions, or
        // the receiver would take this replica's next writes as seen.
        if let Some(stamp) = f.seen_mut().and_then(|s| s.0.get_mut(own)) {
            let mut v = Version {
                stamp: *stamp,
                origin: own.clone(),
            };
            if shift(&mut v) {
                *stamp = v.stamp;
                moved = true;
            }
        }
        if moved && !f.settle() {
            gone.push(name.clone());
        }
        changed |= moved;
    }
    for name in gone {
        state.fields.remove(&name);
    }
    if changed {
        if let Some(deleted) = state.deleted.clone() {
            state.fields.retain(|_, f| f.hide_before(&deleted));
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::FieldName;
    use serde_json::json;

    const DAY: u64 = 86_400_000;

    #[test]
    fn future_own_stamps_move_back_by_one_shift_and_keep_their_order() {
        let own = Origin::new("gw").unwrap();
        let hub = Origin::hub("hub").unwrap();
        let now = 1_000 * DAY;
        let ahead = now + 300 * DAY;
        let mut s = RecordState::default();
        let v = |wall, origin: &Origin| Version {
            stamp: Stamp::new(wall, 0),
            origin: origin.clone(),
        };
        s.write(
            [(FieldName::new("a").unwrap(), Some(json!(1)))],
            &v(ahead, &own),
        );
        s.write(
            [(FieldName::new("b").unwrap(), Some(json!(2)))],
            &v(ahead + 5, &own),
        );
        s.write(
            [(FieldName::new("c").unwrap(), Some(json!(3)))],
            &v(now - 10, &hub),
        );
        let limit = limit_ms(now, 60_000);
        let newest = newest_beyond(&s, &own, limit).unwrap();
        assert_eq!(newest, ahead + 5);
        // The correction says 300 days, but the newest would then land 5 ms
        // in the future: the shift is that much larger, for both.
        let shift = restamp_shift(-(300 * DAY as i64), now, newest);
        assert_eq!(shift, -(300 * DAY as i64) - 5);
        assert!(restamp_state(&mut s, &own, limit, shift));
        let wall = |n: &str| s.fields[&FieldName::new(n).unwrap()].version.stamp.wall_ms;
        assert_eq!(wall("a"), now - 5);
        assert_eq!(wall("b"), now, "never past the corrected now, order kept");
        assert_eq!(wall("c"), now - 10, "other origins are untouched");
        assert!(!restamp_state(&mut s, &own, limit, shift));
        assert_eq!(newest_beyond(&s, &own, limit), None);
    }

    #[test]
    fn corrected_clock_saturates() {
        assert_eq!(corrected(10, -20), 0);
        assert_eq!(corrected(u64::MAX, 5), u64::MAX);
        assert_eq!(corrected(100, -30), 70);
    }
}
