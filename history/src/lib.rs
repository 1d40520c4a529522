//! Version history on redb, one implementation for the agent's store and the
//! hub's: two tables in the store's own file, written inside the store's
//! write transactions, so a version commits with the change that made it.
//!
//! - `history_order`: version number → (owner, collection, key), the
//!   store-wide order (oldest first) the bytes bound drops from;
//! - `history_versions`: (owner, collection, key, version) → CBOR of the
//!   [`HistoryEntry`], a record's versions in order. The owner is the agent
//!   id on the hub and empty on the agent (whose records are all its own).
//!
//! Dropping the oldest version reads its place from the order table and
//! deletes it from both, decoding nothing.
//!
//! Both bounds are kept as versions are written: a record's count
//! ([`HistoryLimits::keep`]) at each push, the store's bytes
//! ([`HistoryLimits::max_bytes`], oldest versions of any record first) when
//! the transaction's writer closes. Every version a bound drops is counted.
//! What an entry holds and how a past state is rebuilt is decided in
//! `fieldsync_shared::history`.

use fieldsync_shared::codec::{self, CodecError};
use fieldsync_shared::history::{self, HistoryEntry, HistoryLimits, Writer};
use fieldsync_shared::{Change, CollectionName, RecordState};
use redb::{ReadableTable, TableDefinition};
use serde::Serialize;

/// version → (owner, collection, key).
const ORDER: TableDefinition<u64, (&str, &str, &str)> = TableDefinition::new("history_order");
/// (owner, collection, key, version) → CBOR [`HistoryEntry`].
const VERSIONS: TableDefinition<(&str, &str, &str, u64), &[u8]> =
    TableDefinition::new("history_versions");
/// The tables of the first layout (one never released): dropped at open.
const FIRST_LAYOUT: [&str; 2] = ["history", "history_index"];
/// The store's own `meta` table: the counters live beside its other marks.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const K_LAST: &str = "history_last";
const K_BYTES: &str = "history_bytes";
const K_DROPPED: &str = "history_dropped";

/// Why a history operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HistoryError {
    #[error("storage: {0}")]
    Storage(#[from] redb::Error),
    #[error("stored history is corrupt: {0}")]
    Corrupt(#[from] CodecError),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for HistoryError {
            fn from(e: $t) -> Self {
                HistoryError::Storage(e.into())
            }
        }
    )*};
}
from_redb!(redb::TableError, redb::StorageError);

/// How much history a store holds, and how many versions its bounds (per
/// record, and the store's bytes) have dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct HistoryStats {
    pub bytes: u64,
    pub dropped: u64,
}

/// Creates the tables (at a store's open); a store with the first layout's
/// tables drops them and starts its history afresh (its byte count too).
pub fn create_tables(txn: &redb::WriteTransaction) -> Result<(), HistoryError> {
    txn.open_table(ORDER)?;
    txn.open_table(VERSIONS)?;
    let mut dropped = false;
    for name in FIRST_LAYOUT {
        let table: TableDefinition<u64, u64> = TableDefinition::new(name);
        dropped |= txn.delete_table(table)?;
    }
    if dropped {
        txn.open_table(META)?.insert(K_BYTES, 0)?;
    }
    Ok(())
}

/// Appends versions inside one write transaction.
pub struct HistoryWriter<'t> {
    order: redb::Table<'t, u64, (&'static str, &'static str, &'static str)>,
    versions: redb::Table<'t, (&'static str, &'static str, &'static str, u64), &'static [u8]>,
    limits: &'t HistoryLimits,
    last: u64,
    bytes: u64,
    dropped: u64,
}

impl<'t> HistoryWriter<'t> {
    pub fn open(
        txn: &'t redb::WriteTransaction,
        limits: &'t HistoryLimits,
    ) -> Result<Self, HistoryError> {
        let meta = txn.open_table(META)?;
        let get =
            |k: &str| -> Result<u64, HistoryError> { Ok(meta.get(k)?.map_or(0, |v| v.value())) };
        let (last, bytes, dropped) = (get(K_LAST)?, get(K_BYTES)?, get(K_DROPPED)?);
        drop(meta);
        Ok(Self {
            order: txn.open_table(ORDER)?,
            versions: txn.open_table(VERSIONS)?,
            limits,
            last,
            bytes,
            dropped,
        })
    }

    /// Whether records of `collection` keep versions.
    pub fn keeps(&self, collection: &CollectionName) -> bool {
        self.limits.keep(collection) > 0
    }

    /// The touched fields of `record` before `change` merges into it, when
    /// its collection keeps history (hand it to [`HistoryWriter::record`]).
    pub fn before(&self, record: &RecordState, change: &Change) -> Option<history::Touched> {
        self.keeps(&change.collection)
            .then(|| history::touched(record, &change.state))
    }

    /// Records the version `change` made of `owner`'s record, now `after`,
    /// whose touched fields were `before` ([`HistoryWriter::before`]); a change
    /// that altered no recorded field is no version.
    pub fn record(
        &mut self,
        owner: &str,
        before: Option<history::Touched>,
        after: &RecordState,
        change: &Change,
        writer: &Writer,
        now_ms: u64,
    ) -> Result<(), HistoryError> {
        let Some(before) = before else { return Ok(()) };
        let (c, k) = (&change.collection, &change.key);
        let limits = self.limits;
        match HistoryEntry::of(limits, c, k, before, after, &change.state, writer, now_ms) {
            Some(entry) => self.push(owner, entry),
            None => Ok(()),
        }
    }

    fn push(&mut self, owner: &str, entry: HistoryEntry) -> Result<(), HistoryError> {
        let keep = self.limits.keep(&entry.collection);
        let bytes = codec::to_bytes(&entry)?;
        let (c, k) = (entry.collection.as_str(), entry.key.as_str());
        self.last += 1;
        self.order.insert(self.last, (owner, c, k))?;
        self.versions
            .insert((owner, c, k, self.last), bytes.as_slice())?;
        self.bytes += bytes.len() as u64;
        let mut versions = Vec::new();
        for item in self
            .versions
            .range((owner, c, k, 0)..=(owner, c, k, u64::MAX))?
        {
            let (at, stored) = item?;
            versions.push((at.value().3, stored.value().len() as u64));
        }
        for &(at, size) in history::over_count(&versions, keep) {
            self.order.remove(at)?;
            self.versions.remove((owner, c, k, at))?;
            self.forget(size);
        }
        Ok(())
    }

    fn forget(&mut self, size: u64) {
        self.bytes = self.bytes.saturating_sub(size);
        self.dropped += 1;
    }

    /// Drops the oldest versions while the store holds more than its bytes
    /// bound, and persists the counters. Call before the commit.
    pub fn close(mut self, txn: &redb::WriteTransaction) -> Result<(), HistoryError> {
        while self.bytes > self.limits.max_bytes {
            let popped = self.order.pop_first()?.map(|(at, place)| {
                let (o, c, k) = place.value();
                (at.value(), o.to_owned(), c.to_owned(), k.to_owned())
            });
            let Some((at, o, c, k)) = popped else {
                self.bytes = 0;
                break;
            };
            let size = match self
                .versions
                .remove((o.as_str(), c.as_str(), k.as_str(), at))?
            {
                Some(stored) => stored.value().len() as u64,
                None => 0,
            };
            self.forget(size);
        }
        let (last, bytes, dropped) = (self.last, self.bytes, self.dropped);
        drop(self);
        let mut meta = txn.open_table(META)?;
        meta.insert(K_LAST, last)?;
        meta.insert(K_BYTES, bytes)?;
        meta.insert(K_DROPPED, dropped)?;
        Ok(())
    }
}

/// Up to `limit` versions of `owner`'s record, newest first, each with its
/// number.
pub fn versions(
    txn: &redb::ReadTransaction,
    owner: &str,
    collection: &str,
    key: &str,
    limit: usize,
) -> Result<Vec<(u64, HistoryEntry)>, HistoryError> {
    let table = txn.open_table(VERSIONS)?;
    let (o, c, k) = (owner, collection, key);
    let mut out = Vec::new();
    for item in table.range((o, c, k, 0)..=(o, c, k, u64::MAX))?.rev() {
        if out.len() >= limit {
            break;
        }
        let (at, stored) = item?;
        out.push((at.value().3, codec::from_bytes(stored.value())?));
    }
    Ok(out)
}

/// The history's size and what its bounds dropped.
pub fn stats(txn: &redb::ReadTransaction) -> Result<HistoryStats, HistoryError> {
    let meta = txn.open_table(META)?;
    let get = |k: &str| -> Result<u64, HistoryError> { Ok(meta.get(k)?.map_or(0, |v| v.value())) };
    Ok(HistoryStats {
        bytes: get(K_BYTES)?,
        dropped: get(K_DROPPED)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{ReadableDatabase, TableHandle};

    /// A store written by the first layout drops its tables at open and
    /// counts its history afresh; the new tables are there and empty.
    #[test]
    fn the_first_layouts_tables_are_dropped_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("s.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let old: TableDefinition<u64, &[u8]> = TableDefinition::new("history");
            txn.open_table(old)
                .unwrap()
                .insert(1, [1u8; 40].as_slice())
                .unwrap();
            let old: TableDefinition<(&str, &str, &str, u64), u64> =
                TableDefinition::new("history_index");
            txn.open_table(old)
                .unwrap()
                .insert(("", "c", "k", 1), 40)
                .unwrap();
            let mut meta = txn.open_table(META).unwrap();
            meta.insert(K_BYTES, 40).unwrap();
            meta.insert(K_DROPPED, 3).unwrap();
        }
        txn.commit().unwrap();

        let txn = db.begin_write().unwrap();
        create_tables(&txn).unwrap();
        txn.commit().unwrap();

        let txn = db.begin_read().unwrap();
        let names: Vec<String> = txn
            .list_tables()
            .unwrap()
            .map(|t| t.name().to_owned())
            .collect();
        assert!(
            !names.iter().any(|n| FIRST_LAYOUT.contains(&n.as_str())),
            "{names:?}"
        );
        assert!(names.iter().any(|n| n == "history_versions"), "{names:?}");
        let stats = stats(&txn).unwrap();
        assert_eq!(
            stats,
            HistoryStats {
                bytes: 0,
                dropped: 3
            }
        );
        assert!(versions(&txn, "", "c", "k", 10).unwrap().is_empty());
    }
}
