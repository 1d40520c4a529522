//! Version history on redb, one implementation for the agent's store and the
//! hub's: two tables in the store's own file, written inside the store's
//! write transactions, so a version commits with the change that made it.
//!
//! - `history`: version number → CBOR of the owner and its
//!   [`HistoryEntry`], in the store-wide order (oldest first);
//! - `history_index`: (owner, collection, key, version) → the entry's bytes,
//!   a record's versions in order. The owner is the agent id on the hub and
//!   empty on the agent (whose records are all its own).
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
use serde::{Deserialize, Serialize};

/// version → CBOR [`Versioned`].
const HISTORY: TableDefinition<u64, &[u8]> = TableDefinition::new("history");
/// (owner, collection, key, version) → the entry's stored bytes.
const INDEX: TableDefinition<(&str, &str, &str, u64), u64> = TableDefinition::new("history_index");
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

/// One stored version: whose record it is, and the entry.
#[derive(Serialize, Deserialize)]
struct Versioned {
    owner: String,
    entry: HistoryEntry,
}

/// Creates the tables (at a store's open).
pub fn create_tables(txn: &redb::WriteTransaction) -> Result<(), HistoryError> {
    txn.open_table(HISTORY)?;
    txn.open_table(INDEX)?;
    Ok(())
}

/// Appends versions inside one write transaction.
pub struct HistoryWriter<'t> {
    log: redb::Table<'t, u64, &'static [u8]>,
    index: redb::Table<'t, (&'static str, &'static str, &'static str, u64), u64>,
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
            log: txn.open_table(HISTORY)?,
            index: txn.open_table(INDEX)?,
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
        let versioned = Versioned {
            owner: owner.to_owned(),
            entry,
        };
        let bytes = codec::to_bytes(&versioned)?;
        let (c, k) = (
            versioned.entry.collection.as_str(),
            versioned.entry.key.as_str(),
        );
        self.last += 1;
        self.log.insert(self.last, bytes.as_slice())?;
        self.index
            .insert((owner, c, k, self.last), bytes.len() as u64)?;
        self.bytes += bytes.len() as u64;
        let mut versions = Vec::new();
        for item in self
            .index
            .range((owner, c, k, 0)..=(owner, c, k, u64::MAX))?
        {
            let (at, size) = item?;
            versions.push((at.value().3, size.value()));
        }
        for &(at, size) in history::over_count(&versions, keep) {
            self.log.remove(at)?;
            self.index.remove((owner, c, k, at))?;
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
            let (at, size, old) = match self.log.pop_first()? {
                Some((at, bytes)) => {
                    let old: Versioned = codec::from_bytes(bytes.value())?;
                    (at.value(), bytes.value().len() as u64, old)
                }
                None => {
                    self.bytes = 0;
                    break;
                }
            };
            let e = &old.entry;
            let place = (
                old.owner.as_str(),
                e.collection.as_str(),
                e.key.as_str(),
                at,
            );
            self.index.remove(place)?;
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
    let index = txn.open_table(INDEX)?;
    let log = txn.open_table(HISTORY)?;
    let (o, c, k) = (owner, collection, key);
    let mut out = Vec::new();
    for item in index.range((o, c, k, 0)..=(o, c, k, u64::MAX))?.rev() {
        if out.len() >= limit {
            break;
        }
        let at = item?.0.value().3;
        if let Some(bytes) = log.get(at)? {
            let versioned: Versioned = codec::from_bytes(bytes.value())?;
            out.push((at, versioned.entry));
        }
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
