//! The merge contract every replicated type follows.
//!
//! A replica's state only ever moves by `merge`, and `merge` is a join: for all
//! states `a`, `b`, `c` (compared after merging, with `==`):
//!
//! - **commutative**: `a ⊔ b == b ⊔ a`
//! - **associative**: `(a ⊔ b) ⊔ c == a ⊔ (b ⊔ c)`
//! - **idempotent**: `a ⊔ a == a`
//!
//! Together these mean that replicas which have received the same set of changes
//! hold the same state, whatever the order, grouping or duplication of delivery.
//! `tests/merge_laws.rs` checks the laws with proptest for every implementation.

/// A state that converges by merging.
pub trait Merge {
    /// Folds `other` into `self`. Must satisfy the laws in the module docs.
    /// Returns whether `self` changed, so callers can skip writing a no-op.
    fn merge(&mut self, other: &Self) -> bool;
}
