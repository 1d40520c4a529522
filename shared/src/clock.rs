//! Clock safety: what a replica does once it learns that its wall clock is
//! wrong. The hub's clock is the reference; an agent learns its offset from
//! the welcome (and the hub's `Time` messages), corrects the wall clock its
//! HLC reads by it, and re-stamps what it wrote with the wrong clock and no
//! one has acknowledged yet, so that those writes sort where they happened in
//! real time instead of winning (or losing) every later write.
//!
//! The rule: a version stamped by this replica whose wall time is beyond
//! `limit_ms` (the corrected now plus the drift bound) was made with a clock
//! that ran ahead. It is moved by the offset (to `wall + offset_ms`, never
//! past the corrected now) and keeps its logical part, so re-stamped writes
//! keep their order. Only entries never acknowledged are re-stamped: the hub
//! refuses stamps beyond its bound, so whatever it acknowledged is within it.
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

fn restamp_version(v: &mut Version, own: &Origin, limit_ms: u64, now_ms: u64, offset_ms: i64) -> bool {
    if &v.origin != own || v.stamp.wall_ms <= limit_ms {
        return false;
    }
    v.stamp = Stamp::new(
        v.stamp.wall_ms.saturating_add_signed(offset_ms).min(now_ms),
        v.stamp.logical,
    );
    true
}

/// Re-stamps the own versions in `state` that are beyond `limit_ms`. Returns
/// whether anything changed. Keeps the canonical form (fields at or below the
/// record tombstone are dropped).
pub fn restamp_state(
    state: &mut RecordState,
    own: &Origin,
    limit_ms: u64,
    now_ms: u64,
    offset_ms: i64,
) -> bool {
    let mut changed = false;
    if let Some(d) = state.deleted.as_mut() {
        changed |= restamp_version(d, own, limit_ms, now_ms, offset_ms);
    }
    for f in state.fields.values_mut() {
        changed |= restamp_version(&mut f.version, own, limit_ms, now_ms, offset_ms);
    }
    if changed {
        let deleted = state.deleted.clone();
        state
            .fields
            .retain(|_, f| Some(&f.version) > deleted.as_ref());
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
    fn future_own_stamps_move_back_by_the_offset_and_keep_their_order() {
        let own = Origin::new("gw").unwrap();
        let hub = Origin::hub("hub").unwrap();
        let now = 1_000 * DAY;
        let ahead = now + 300 * DAY;
        let mut s = RecordState::default();
        let v = |wall, origin: &Origin| Version {
            stamp: Stamp::new(wall, 0),
            origin: origin.clone(),
        };
        s.write([(FieldName::new("a").unwrap(), Some(json!(1)))], &v(ahead, &own));
        s.write([(FieldName::new("b").unwrap(), Some(json!(2)))], &v(ahead + 5, &own));
        s.write([(FieldName::new("c").unwrap(), Some(json!(3)))], &v(now - 10, &hub));
        let offset = -(300 * DAY as i64);
        assert!(restamp_state(&mut s, &own, limit_ms(now, 60_000), now, offset));
        let wall = |n: &str| s.fields[&FieldName::new(n).unwrap()].version.stamp.wall_ms;
        assert_eq!(wall("a"), now);
        assert_eq!(wall("b"), now, "never past the corrected now");
        assert_eq!(wall("c"), now - 10, "other origins are untouched");
        assert!(!restamp_state(&mut s, &own, limit_ms(now, 60_000), now, offset));
    }

    #[test]
    fn corrected_clock_saturates() {
        assert_eq!(corrected(10, -20), 0);
        assert_eq!(corrected(u64::MAX, 5), u64::MAX);
        assert_eq!(corrected(100, -30), 70);
    }
}
