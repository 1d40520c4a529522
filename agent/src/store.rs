//! The agent's redb store: records with their per-field stamps, the clock state,
//! the outbox and the downstream cursor, behind a schema version.
//!
//! **Architecture invariant:** a local write, the clock state it advanced and its
//! outbox entry commit in one redb transaction ([`Store::commit_writes`]); there is
//! no state in which one exists without the other.
//!
//! Writes go through the group committer in [`crate::writer`]; this module holds
//! the transaction logic and the reads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fieldsync_history::{HistoryStats, HistoryWriter};
use fieldsync_shared::codec::{self, CodecError, SnapshotPage};
use fieldsync_shared::files::create_private_dir;
use fieldsync_shared::history::{self, Cause, HistoryEntry, HistoryLimits, Writer};
use fieldsync_shared::session::SnapshotChunk;
use fieldsync_shared::{
    clock, policy::Flow, AgentId, Change, CollectionName, Cursor, Edit, FieldName, Hlc,
    Incarnation, Mark, Merge, Origin, Policy, RecordKey, RecordState, Seq, Stamp, Value, Version,
};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::Serialize;

/// The on-disk schema this build writes. A version-1 store is migrated at open
/// ([`Store::open`]: it gets an incarnation, and its downstream cursor follows
/// no hub incarnation, so the first link resyncs it); any other version fails
/// with [`StoreError::SchemaVersion`].
pub const SCHEMA_VERSION: u64 = 2;
/// redb's page cache: small, because agents run on gateways with little memory.
const CACHE_BYTES: usize = 16 << 20;
/// File name of the store inside `data_dir`.
pub const STORE_FILE: &str = "agent.redb";

/// Counters and clock state.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The agent id this store belongs to.
const IDENTITY: TableDefinition<&str, &str> = TableDefinition::new("identity");
/// (collection, key) → CBOR [`RecordState`].
const RECORDS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("records");
/// Sequence number → CBOR [`Change`], already filtered by the policy.
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");

const K_SCHEMA: &str = "schema_version";
const K_HLC_WALL: &str = "hlc_wall_ms";
const K_HLC_LOGICAL: &str = "hlc_logical";
const K_OUTBOX_LAST: &str = "outbox_last_seq";
const K_OUTBOX_ACKED: &str = "outbox_acked_seq";
const K_DOWN_APPLIED: &str = "down_applied_seq";
const K_DOWN_CHECK: &str = "down_applied_check";
/// The hub incarnation the downstream cursor follows (0: none yet).
const K_DOWN_SOURCE: &str = "down_source";
const K_OUTBOX_ACKED_CHECK: &str = "outbox_acked_check";
/// This store's incarnation, drawn at creation.
const K_INCARNATION: &str = "incarnation";
/// The last clock correction learned from the hub (i64 as two's complement).
const K_CLOCK_OFFSET: &str = "clock_offset_ms";
/// Resyncs received from the hub (snapshots fully applied).
const K_RESYNCS: &str = "resyncs";
const K_AGENT: &str = "agent_id";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open store {path}: {source}")]
    Open {
        path: PathBuf,
        source: redb::DatabaseError,
    },
    #[error("store {path} is in use by another process (is another fieldsync-agent running with this data_dir?)")]
    InUse { path: PathBuf },
    #[error("store {path} has schema version {found}; this build reads version {SCHEMA_VERSION}")]
    SchemaVersion { path: PathBuf, found: u64 },
    #[error("store {path} belongs to agent {found:?}, not {expected:?}")]
    WrongAgent {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("storage: {0}")]
    Storage(#[from] redb::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(#[from] CodecError),
    #[error("{0}")]
    History(#[from] fieldsync_history::HistoryError),
    /// A write that does not fit its field's merge rule (the API checks
    /// first, so this is a caller's bug).
    #[error("{0}")]
    Edit(#[from] fieldsync_shared::EditError),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Storage(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// One local write, already validated.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// Partial update: each field gets a value, or `None` to delete it.
    Put {
        collection: CollectionName,
        key: RecordKey,
        fields: Vec<(FieldName, Option<Value>)>,
    },
    /// Delete the whole record.
    Delete {
        collection: CollectionName,
        key: RecordKey,
    },
}

/// What a write did.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteOutcome {
    /// The record as stored after the write.
    Stored(RecordView),
    /// The record was deleted.
    Deleted,
    /// Delete of a record that does not exist: nothing was written.
    NotFound,
}

/// A record as a reader sees it: visible fields only.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct RecordView {
    #[schema(value_type = String)]
    pub collection: CollectionName,
    #[schema(value_type = String)]
    pub key: RecordKey,
    /// Field name to value (any JSON).
    #[schema(value_type = Object)]
    pub fields: BTreeMap<FieldName, Value>,
    /// Fields with concurrent values on record (merge rule `review`, or a
    /// `prefer` rule that decided): field name to every candidate value.
    /// Absent when there are none.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(value_type = Option<Object>)]
    pub conflicts: BTreeMap<FieldName, Vec<Value>>,
}

impl RecordView {
    fn of(collection: &CollectionName, key: &RecordKey, state: &RecordState) -> Self {
        Self {
            collection: collection.clone(),
            key: key.clone(),
            fields: state
                .visible()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            conflicts: state.conflicts(),
        }
    }
}

/// The outbox's bounds: entries `acked.seq+1..=last` wait to go out; `acked`
/// is the trim point with the check the hub acknowledged it with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxBounds {
    pub acked: Mark,
    pub last: Seq,
}

/// What a health report says of the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxStats {
    pub pending: u64,
    pub bytes: u64,
    /// The oldest pending entry's stamp (wall ms), if any.
    pub oldest_wall_ms: Option<u64>,
    /// The trim point (the hub's last acknowledgement the store holds).
    pub acked: Seq,
}

/// What a clock re-stamp changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restamped {
    pub entries: u64,
    pub records: u64,
}

fn get_u64(meta: &impl ReadableTable<&'static str, u64>, key: &str) -> Result<u64, StoreError> {
    Ok(meta.get(key)?.map_or(0, |v| v.value()))
}

/// Handle to the agent's store. Cheap to clone; reads may run concurrently with
/// the single writer.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    path: PathBuf,
    limits: Arc<HistoryLimits>,
}

impl Store {
    /// The store, keeping version history by `limits` (a store opened keeps
    /// none: it knows no policy).
    pub fn with_history(mut self, limits: HistoryLimits) -> Self {
        self.limits = Arc::new(limits);
        self
    }

    /// Up to `limit` versions of a record, newest first.
    pub fn history(
        &self,
        collection: &CollectionName,
        key: &RecordKey,
        limit: usize,
    ) -> Result<Vec<(u64, HistoryEntry)>, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(fieldsync_history::versions(
            &txn,
            "",
            collection.as_str(),
            key.as_str(),
            limit,
        )?)
    }

    /// The history's size and what its bounds dropped.
    pub fn history_stats(&self) -> Result<HistoryStats, StoreError> {
        Ok(fieldsync_history::stats(&self.db.begin_read()?)?)
    }

    /// Opens (or creates) the store in `data_dir` for `agent`.
    pub fn open(data_dir: &Path, agent: &AgentId) -> Result<Self, StoreError> {
        create_private_dir(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let path = data_dir.join(STORE_FILE);
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|source| match source {
                redb::DatabaseError::DatabaseAlreadyOpen => {
                    StoreError::InUse { path: path.clone() }
                }
                source => StoreError::Open {
                    path: path.clone(),
                    source,
                },
            })?;
        let store = Self {
            db: Arc::new(db),
            path,
            limits: Arc::default(),
        };
        store.init(agent)?;
        Ok(store)
    }

    fn init(&self, agent: &AgentId) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let mut identity = txn.open_table(IDENTITY)?;
            let found = meta.get(K_SCHEMA)?.map(|v| v.value());
            match found {
                None => {
                    meta.insert(K_SCHEMA, SCHEMA_VERSION)?;
                    meta.insert(K_INCARNATION, new_incarnation().0)?;
                    identity.insert(K_AGENT, agent.as_str())?;
                }
                Some(v @ (1 | SCHEMA_VERSION)) => {
                    if v == 1 {
                        // v1 → v2: an incarnation; the downstream cursor
                        // follows no hub incarnation, so the first link
                        // resyncs it by snapshot (nothing is lost).
                        meta.insert(K_SCHEMA, SCHEMA_VERSION)?;
                        meta.insert(K_INCARNATION, new_incarnation().0)?;
                    }
                    let owner = identity.get(K_AGENT)?.map(|v| v.value().to_owned());
                    if owner.as_deref() != Some(agent.as_str()) {
                        return Err(StoreError::WrongAgent {
                            path: self.path.clone(),
                            found: owner.unwrap_or_default(),
                            expected: agent.to_string(),
                        });
                    }
                }
                Some(found) => {
                    return Err(StoreError::SchemaVersion {
                        path: self.path.clone(),
                        found,
                    })
                }
            }
            txn.open_table(RECORDS)?;
            txn.open_table(OUTBOX)?;
            fieldsync_history::create_tables(&txn)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// The clock state persisted with the last committed write.
    pub fn hlc_last(&self) -> Result<Stamp, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let wall = meta.get(K_HLC_WALL)?.map_or(0, |v| v.value());
        let logical = meta.get(K_HLC_LOGICAL)?.map_or(0, |v| v.value());
        Ok(Stamp::new(wall, u32::try_from(logical).unwrap_or(u32::MAX)))
    }

    /// A record's full replicated state (with tombstones), if any was ever written.
    pub fn get_state(
        &self,
        collection: &CollectionName,
        key: &RecordKey,
    ) -> Result<Option<RecordState>, StoreError> {
        let txn = self.db.begin_read()?;
        let records = txn.open_table(RECORDS)?;
        let found = records.get((collection.as_str(), key.as_str()))?;
        Ok(match found {
            Some(bytes) => Some(codec::from_bytes(bytes.value())?),
            None => None,
        })
    }

    /// A record as a reader sees it; `None` if it does not exist.
    pub fn get(
        &self,
        collection: &CollectionName,
        key: &RecordKey,
    ) -> Result<Option<RecordView>, StoreError> {
        Ok(self
            .get_state(collection, key)?
            .filter(RecordState::exists)
            .map(|s| RecordView::of(collection, key, &s)))
    }

    /// How many outbox entries wait for the hub's acknowledgement.
    pub fn outbox_len(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(OUTBOX)?.len()?)
    }

    /// The outbox for a health report: entries, the bytes they take (redb's
    /// table statistics: a walk of the outbox's pages, so once per report,
    /// not per write), and the stamp (wall ms) of the oldest entry.
    pub fn outbox_health(&self) -> Result<OutboxStats, StoreError> {
        let txn = self.db.begin_read()?;
        let outbox = txn.open_table(OUTBOX)?;
        let oldest_wall_ms = match outbox.first()? {
            Some((_, bytes)) => {
                let change: Change = codec::from_bytes(bytes.value())?;
                change.state.max_version().map(|v| v.stamp.wall_ms)
            }
            None => None,
        };
        let acked = Seq(get_u64(&txn.open_table(META)?, K_OUTBOX_ACKED)?);
        Ok(OutboxStats {
            pending: outbox.len()?,
            bytes: outbox.stats()?.stored_bytes(),
            oldest_wall_ms,
            acked,
        })
    }

    pub fn outbox_bounds(&self) -> Result<OutboxBounds, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(OutboxBounds {
            acked: Mark {
                seq: Seq(get_u64(&meta, K_OUTBOX_ACKED)?),
                check: get_u64(&meta, K_OUTBOX_ACKED_CHECK)?,
            },
            last: Seq(get_u64(&meta, K_OUTBOX_LAST)?),
        })
    }

    /// This store's incarnation.
    pub fn incarnation(&self) -> Result<Incarnation, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(Incarnation(get_u64(&txn.open_table(META)?, K_INCARNATION)?))
    }

    /// The outbox entry at `seq`, if it is still queued.
    pub fn outbox_entry(&self, seq: Seq) -> Result<Option<Change>, StoreError> {
        let txn = self.db.begin_read()?;
        let outbox = txn.open_table(OUTBOX)?;
        let found = outbox.get(seq.0)?;
        Ok(match found {
            Some(bytes) => Some(codec::from_bytes(bytes.value())?),
            None => None,
        })
    }

    /// Up to `limit` records after `after` (from the first when `None`), and
    /// the address to continue after if there may be more; stops before the
    /// stored bytes pass `max_bytes` (one record is always taken).
    /// Up to `limit` records holding a conflict (a `review` or `prefer`
    /// field with concurrent values), in key order, of one collection or all.
    /// A scan of the records (no index yet).
    pub fn conflicted(
        &self,
        collection: Option<&CollectionName>,
        limit: usize,
    ) -> Result<Vec<Change>, StoreError> {
        let txn = self.db.begin_read()?;
        let records = txn.open_table(RECORDS)?;
        let from = collection.map_or("", CollectionName::as_str);
        let mut found = Vec::new();
        for item in records.range::<(&str, &str)>((from, "")..)? {
            let (k, bytes) = item?;
            let (c, key) = k.value();
            if collection.is_some_and(|want| want.as_str() != c) {
                break;
            }
            let state: RecordState = codec::from_bytes(bytes.value())?;
            if state.conflicts().is_empty() {
                continue;
            }
            let (Ok(collection), Ok(key)) = (CollectionName::new(c), RecordKey::new(key)) else {
                continue;
            };
            found.push(Change {
                collection,
                key,
                state,
            });
            if found.len() >= limit {
                break;
            }
        }
        Ok(found)
    }

    pub fn records_after(
        &self,
        after: Option<&(CollectionName, RecordKey)>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<SnapshotChunk, StoreError> {
        let txn = self.db.begin_read()?;
        let records = txn.open_table(RECORDS)?;
        let range = match after {
            Some((c, k)) => records.range::<(&str, &str)>((
                std::ops::Bound::Excluded((c.as_str(), k.as_str())),
                std::ops::Bound::Unbounded,
            ))?,
            None => records.range::<(&str, &str)>(..)?,
        };
        let mut page = SnapshotPage::new(limit, max_bytes);
        for item in range {
            let (k, bytes) = item?;
            let (c, key) = k.value();
            if !page.push(c, key, bytes.value())? {
                break;
            }
        }
        Ok(page.finish())
    }

    /// The last clock correction learned from the hub.
    pub fn clock_offset(&self) -> Result<i64, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(get_u64(&txn.open_table(META)?, K_CLOCK_OFFSET)? as i64)
    }

    /// Resyncs from the hub this store has completed.
    pub fn resyncs(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        get_u64(&txn.open_table(META)?, K_RESYNCS)
    }

    /// Keeps the clock correction for the next start (a lost update only
    /// means the next welcome measures it again).
    pub fn set_clock_offset(&self, offset_ms: i64) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::None)?;
        txn.open_table(META)?
            .insert(K_CLOCK_OFFSET, offset_ms as u64)?;
        txn.commit()?;
        Ok(())
    }

    /// Re-stamps, in one durable transaction, every version this agent
    /// (`own`) stamped beyond `limit_ms`, in the outbox and in the records, by
    /// one shift (`fieldsync_shared::clock`: the correction `offset_ms` just
    /// learned, or more so that none lands past `now_ms`), continues the
    /// clock from the greatest stamp still held, and — if a record changed —
    /// lets the downstream cursor follow no hub incarnation, so the next link
    /// resyncs what the hub holds (a hub write that lost to a stamp from the
    /// future is gone from the records).
    pub fn restamp(
        &self,
        own: &Origin,
        limit_ms: u64,
        now_ms: u64,
        offset_ms: i64,
        hlc: &mut Hlc,
    ) -> Result<Restamped, StoreError> {
        let txn = self.db.begin_write()?;
        let mut done = Restamped::default();
        {
            let mut outbox = txn.open_table(OUTBOX)?;
            let mut records = txn.open_table(RECORDS)?;
            // First the newest stamp to move, for one shift that keeps order.
            let mut newest: Option<u64> = None;
            for item in outbox.iter()? {
                let change: Change = codec::from_bytes(item?.1.value())?;
                newest = newest.max(clock::newest_beyond(&change.state, own, limit_ms));
            }
            for item in records.iter()? {
                let state: RecordState = codec::from_bytes(item?.1.value())?;
                newest = newest.max(clock::newest_beyond(&state, own, limit_ms));
            }
            let Some(newest) = newest else {
                return Ok(done);
            };
            let shift = clock::restamp_shift(offset_ms, now_ms, newest);
            // The greatest stamp the store holds once re-stamped: the clock
            // continues from there.
            let mut floor = Stamp::default();
            let mut hold = |state: &RecordState| {
                if let Some(v) = state.max_version() {
                    floor = floor.max(v.stamp);
                }
            };
            let mut rewritten = Vec::new();
            for item in outbox.iter()? {
                let (seq, bytes) = item?;
                let mut change: Change = codec::from_bytes(bytes.value())?;
                let changed = clock::restamp_state(&mut change.state, own, limit_ms, shift);
                hold(&change.state);
                if changed {
                    rewritten.push((seq.value(), codec::to_bytes(&change)?));
                }
            }
            done.entries = rewritten.len() as u64;
            for (seq, bytes) in rewritten {
                outbox.insert(seq, bytes.as_slice())?;
            }
            let mut rewritten = Vec::new();
            for item in records.iter()? {
                let (k, bytes) = item?;
                let mut state: RecordState = codec::from_bytes(bytes.value())?;
                let changed = clock::restamp_state(&mut state, own, limit_ms, shift);
                hold(&state);
                if changed {
                    let (c, key) = k.value();
                    rewritten.push(((c.to_owned(), key.to_owned()), codec::to_bytes(&state)?));
                }
            }
            done.records = rewritten.len() as u64;
            for ((c, key), bytes) in rewritten {
                records.insert((c.as_str(), key.as_str()), bytes.as_slice())?;
            }
            hlc.lower_to(floor);
            let mut meta = txn.open_table(META)?;
            let last = hlc.last();
            meta.insert(K_HLC_WALL, last.wall_ms)?;
            meta.insert(K_HLC_LOGICAL, u64::from(last.logical))?;
            if done.records > 0 {
                meta.insert(K_DOWN_SOURCE, 0)?;
            }
        }
        txn.commit()?;
        Ok(done)
    }

    /// Up to `limit` outbox entries from `from` on, in sequence order.
    pub fn outbox_entries(
        &self,
        from: Seq,
        limit: usize,
    ) -> Result<Vec<(Seq, Change)>, StoreError> {
        self.outbox_batch(from, limit, usize::MAX)
    }

    /// Like [`Store::outbox_entries`], also stopping before the stored bytes
    /// pass `max_bytes` (the first entry is always taken), so a sender never
    /// decodes much more than one message's worth.
    pub fn outbox_batch(
        &self,
        from: Seq,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<(Seq, Change)>, StoreError> {
        let txn = self.db.begin_read()?;
        let outbox = txn.open_table(OUTBOX)?;
        let mut out = Vec::new();
        let mut total = 0usize;
        for item in outbox.range(from.0..)?.take(limit) {
            let (seq, bytes) = item?;
            total = total.saturating_add(bytes.value().len());
            if total > max_bytes && !out.is_empty() {
                break;
            }
            out.push((Seq(seq.value()), codec::from_bytes(bytes.value())?));
        }
        Ok(out)
    }

    /// The durable downstream cursor: which hub incarnation, how far.
    pub fn down_cursor(&self) -> Result<Cursor, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let source = get_u64(&meta, K_DOWN_SOURCE)?;
        Ok(Cursor {
            source: (source != 0).then_some(Incarnation(source)),
            at: Mark {
                seq: Seq(get_u64(&meta, K_DOWN_APPLIED)?),
                check: get_u64(&meta, K_DOWN_CHECK)?,
            },
        })
    }

    /// Applies `requests` (each a list of writes) in **one** durable transaction:
    /// records, clock state and outbox entries together. Returns each request's
    /// outcomes in order and the outbox's last sequence number. Stamps come from `hlc` at wall time `now_ms`; only the
    /// fields `policy` lets go up enter the outbox.
    pub fn commit_writes(
        &self,
        requests: &[Vec<WriteOp>],
        hlc: &mut Hlc,
        origin: &Origin,
        policy: &Policy,
        now_ms: u64,
    ) -> Result<(Vec<Vec<WriteOutcome>>, Seq), StoreError> {
        let txn = self.db.begin_write()?;
        let mut history = HistoryWriter::open(&txn, &self.limits)?;
        let writer = Writer::new(origin.to_string(), Cause::Local);
        let mut results = Vec::with_capacity(requests.len());
        let outbox_last = {
            let mut records = txn.open_table(RECORDS)?;
            let mut outbox = txn.open_table(OUTBOX)?;
            let mut meta = txn.open_table(META)?;
            let mut last_seq = meta.get(K_OUTBOX_LAST)?.map_or(0, |v| v.value());
            let incarnation = get_u64(&meta, K_INCARNATION)?;
            for ops in requests {
                let mut outcomes = Vec::with_capacity(ops.len());
                for op in ops {
                    let (collection, key) = match op {
                        WriteOp::Put {
                            collection, key, ..
                        }
                        | WriteOp::Delete { collection, key } => (collection, key),
                    };
                    let db_key = (collection.as_str(), key.as_str());
                    let mut state: RecordState = match records.get(db_key)? {
                        Some(bytes) => codec::from_bytes(bytes.value())?,
                        None => RecordState::default(),
                    };
                    // The written fields' values before the write (all
                    // fields for a delete): the "before" of its version.
                    let before = history.keeps(collection).then(|| match op {
                        WriteOp::Put { fields, .. } => {
                            history::values_of(&state, fields.iter().map(|(f, _)| f))
                        }
                        WriteOp::Delete { .. } => history::values_of(&state, state.fields.keys()),
                    });
                    let mut version = || Version {
                        stamp: hlc.tick(now_ms),
                        origin: origin.clone(),
                    };
                    let (delta, outcome) = match op {
                        WriteOp::Put { fields, .. } => {
                            let rule_of = |f: &FieldName| policy.field_rule(collection, f);
                            let edits = Edit::of_fields(fields, rule_of)?;
                            let delta = state.edit(edits, &version(), incarnation, rule_of)?;
                            let view = RecordView::of(collection, key, &state);
                            (delta, WriteOutcome::Stored(view))
                        }
                        WriteOp::Delete { .. } if !state.exists() => {
                            outcomes.push(WriteOutcome::NotFound);
                            continue;
                        }
                        WriteOp::Delete { .. } => (state.delete(&version()), WriteOutcome::Deleted),
                    };
                    records.insert(db_key, codec::to_bytes(&state)?.as_slice())?;
                    let change = Change {
                        collection: collection.clone(),
                        key: key.clone(),
                        state: delta,
                    };
                    history.record("", before, &state, &change, &writer, now_ms)?;
                    if let Some(permitted) = policy.filter(Flow::Up, &change).permitted {
                        last_seq += 1;
                        outbox.insert(last_seq, codec::to_bytes(&permitted)?.as_slice())?;
                    }
                    outcomes.push(outcome);
                }
                results.push(outcomes);
            }
            meta.insert(K_OUTBOX_LAST, last_seq)?;
            let last = hlc.last();
            meta.insert(K_HLC_WALL, last.wall_ms)?;
            meta.insert(K_HLC_LOGICAL, u64::from(last.logical))?;
            Seq(last_seq)
        };
        history.close(&txn)?;
        txn.commit()?;
        Ok((results, outbox_last))
    }

    /// Applies a downstream batch or snapshot part from the hub in **one**
    /// durable transaction: merges each change into its record, sets the
    /// downstream cursor (if given; a snapshot's last part counts as a resync)
    /// and persists the clock state. Returns how many changes altered a record.
    pub fn apply_downstream(
        &self,
        changes: &[Change],
        cursor: Option<Cursor>,
        snapshot: bool,
        hlc: &Hlc,
        now_ms: u64,
    ) -> Result<usize, StoreError> {
        let txn = self.db.begin_write()?;
        let mut history = HistoryWriter::open(&txn, &self.limits)?;
        let writer = Writer::new("hub", if snapshot { Cause::Resync } else { Cause::Hub });
        let mut altered = 0;
        {
            let mut records = txn.open_table(RECORDS)?;
            let mut meta = txn.open_table(META)?;
            for change in changes {
                let db_key = (change.collection.as_str(), change.key.as_str());
                let mut state: RecordState = match records.get(db_key)? {
                    Some(bytes) => codec::from_bytes(bytes.value())?,
                    None => RecordState::default(),
                };
                let before = history.before(&state, change);
                if state.merge(&change.state) {
                    records.insert(db_key, codec::to_bytes(&state)?.as_slice())?;
                    history.record("", before, &state, change, &writer, now_ms)?;
                    altered += 1;
                }
            }
            if let Some(c) = cursor {
                meta.insert(K_DOWN_SOURCE, c.source.map_or(0, |i| i.0))?;
                meta.insert(K_DOWN_APPLIED, c.at.seq.0)?;
                meta.insert(K_DOWN_CHECK, c.at.check)?;
                if snapshot {
                    let n = get_u64(&meta, K_RESYNCS)?;
                    meta.insert(K_RESYNCS, n + 1)?;
                }
            }
            let last = hlc.last();
            meta.insert(K_HLC_WALL, last.wall_ms)?;
            meta.insert(K_HLC_LOGICAL, u64::from(last.logical))?;
        }
        history.close(&txn)?;
        txn.commit()?;
        Ok(altered)
    }

    /// The hub holds everything up to `mark`: those outbox entries go and
    /// `mark` becomes the trim point. The commit skips the fsync (it becomes
    /// durable with the next durable commit): a trim lost in a crash is
    /// repaired by the hub's next welcome, whose cursor trims those entries
    /// again before anything is sent.
    ///
    /// `durable`: the trim ends a resync, whose end mark must survive a crash
    /// (a lost one would make the next welcome look like another history
    /// and start the resync again).
    pub fn trim_outbox(&self, mark: Mark, durable: bool) -> Result<(), StoreError> {
        let upto = mark.seq;
        let mut txn = self.db.begin_write()?;
        if !durable {
            txn.set_durability(redb::Durability::None)?;
        }
        {
            let mut outbox = txn.open_table(OUTBOX)?;
            let mut meta = txn.open_table(META)?;
            let acked = meta.get(K_OUTBOX_ACKED)?.map_or(0, |v| v.value());
            let last = meta.get(K_OUTBOX_LAST)?.map_or(0, |v| v.value());
            let upto = upto.0.min(last);
            if upto >= acked {
                outbox.retain_in(..=upto, |_, _| false)?;
                meta.insert(K_OUTBOX_ACKED, upto)?;
                meta.insert(K_OUTBOX_ACKED_CHECK, mark.check)?;
            }
        }
        txn.commit()?;
        Ok(())
    }
}

/// A fresh random incarnation (never 0, which means "none").
fn new_incarnation() -> Incarnation {
    Incarnation(rand::random::<u64>().max(1))
}
