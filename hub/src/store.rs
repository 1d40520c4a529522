//! The hub's durable state behind a narrow trait, [`HubStore`]: per-agent
//! records (permitted fields only), the upstream watermark that makes a re-sent
//! batch apply once, and the per-agent downstream queue. [`RedbHubStore`] is the
//! embedded implementation; a PostgreSQL one can follow without touching callers.
//!
//! It also holds the event log ([`crate::events`]) and the webhook endpoints
//! with their delivery progress.
//!
//! **Architecture invariant:** `apply_upstream_group` commits the merged records,
//! the new watermarks and a `record.changed` event per record it changed in one
//! transaction, and the hub acknowledges only after it returns;
//! `enqueue_downstream` commits the hub's copy, the queue entry and the events in
//! one transaction; queue entries leave only through `ack_downstream`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use fieldsync_history::HistoryStats;
use fieldsync_history::{HistoryError, HistoryWriter};
use fieldsync_shared::codec::{self, CodecError, SnapshotPage};
use fieldsync_shared::files::create_private_dir;
use fieldsync_shared::history::{Cause, HistoryEntry, HistoryLimits, Writer};
use fieldsync_shared::session::{Identity, SnapshotChunk};
use fieldsync_shared::{
    AgentId, Change, CollectionName, Cursor, Incarnation, Mark, Merge, RecordKey, RecordState, Seq,
    Stamp,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::events::{Event, EventBounds, EventKind, Prior, RecordChanged};
use crate::labels::Labels;
use crate::webhooks::{Attempt, Endpoint, Progress};

#[doc(hidden)]
pub mod conformance;

/// The on-disk schema this build writes. A version-1 store is migrated at
/// open: it gets an incarnation, and its agent rows (which follow no agent
/// incarnation yet) make every agent resync once.
pub const SCHEMA_VERSION: u64 = 2;
/// redb's page cache for the hub store.
const CACHE_BYTES: usize = 256 << 20;
/// File name of the store inside `[hub] data_dir`.
pub const STORE_FILE: &str = "hub.redb";

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// agent id → CBOR [`AgentRow`].
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
/// (agent, collection, key) → CBOR [`RecordState`].
const RECORDS: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("records");
/// (agent, seq) → CBOR [`Change`] waiting for the agent.
const DOWN_QUEUE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("down_queue");
/// event seq → CBOR [`Event`].
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// webhook endpoint id → CBOR [`Endpoint`].
const WEBHOOKS: TableDefinition<&str, &[u8]> = TableDefinition::new("webhooks");
/// (endpoint id, attempt number) → CBOR [`Attempt`].
const ATTEMPTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("webhook_attempts");
/// Delivery attempts kept per endpoint (the oldest are dropped).
pub const ATTEMPTS_KEPT: u64 = 1000;

/// Who operator writes are by until operators have names of their own.
pub const OPERATOR: &str = "operator";

const K_SCHEMA: &str = "schema_version";
const K_HLC_WALL: &str = "hlc_wall_ms";
const K_HLC_LOGICAL: &str = "hlc_logical";
const K_INCARNATION: &str = "incarnation";
const K_EVENTS_LAST: &str = "events_last";

/// What the hub keeps per agent besides its records. Fields added after
/// schema 1 default when absent, so version-1 rows still decode.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRow {
    /// Highest upstream sequence number applied (of `up_source`'s stream).
    pub up_applied: Seq,
    /// Highest downstream sequence number queued.
    pub down_last: Seq,
    /// Highest downstream sequence number the agent acknowledged.
    pub down_acked: Seq,
    /// Wall time (ms since the Unix epoch) of the agent's last applied batch or hello.
    pub last_seen_ms: Option<u64>,
    /// Upstream changes applied in all (each sequence number counts once).
    pub changes_applied: u64,
    /// The agent store incarnation whose upstream stream `up_applied` counts.
    #[serde(default)]
    pub up_source: Option<Incarnation>,
    /// The check of the upstream position `up_applied`.
    #[serde(default)]
    pub up_check: u64,
    /// The check the agent acknowledged `down_acked` with.
    #[serde(default)]
    pub down_acked_check: u64,
    /// The agent store identities seen (current and replaced).
    #[serde(default)]
    pub identity: Identity,
    /// The agent's clock minus the hub's at its last hello.
    #[serde(default)]
    pub clock_skew_ms: Option<i64>,
    /// Resyncs by snapshot with this agent (either way).
    #[serde(default)]
    pub resyncs: u64,
    /// Hellos refused because another store claimed this identity.
    #[serde(default)]
    pub identity_conflicts: u64,
    /// The labels an admin gave the agent (see [`crate::labels`]).
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
}

impl AgentRow {
    /// Downstream entries that wait for the agent.
    pub fn queue_pending(&self) -> u64 {
        self.down_last.0 - self.down_acked.0
    }

    /// The hub's durable cursor on the agent's upstream stream.
    pub fn up_cursor(&self) -> Cursor {
        Cursor {
            source: self.up_source,
            at: Mark {
                seq: self.up_applied,
                check: self.up_check,
            },
        }
    }

    /// The downstream queue's trim point.
    pub fn down_acked_mark(&self) -> Mark {
        Mark {
            seq: self.down_acked,
            check: self.down_acked_check,
        }
    }
}

/// What an agent's hello changes in its row (none of it needs an fsync).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HelloNote {
    pub identity: Option<Identity>,
    pub clock_skew_ms: Option<i64>,
    pub conflict: bool,
}

/// A storage engine's own error, boxed so that no backend's types reach the
/// callers of [`HubStore`].
pub type BackendError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a [`HubStore`] operation failed, whatever the backend. `store` names
/// where the store is (a file, or a database's host and name), never a
/// credential; no message carries a field value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The embedded store's folder (`[hub] data_dir`) cannot be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The store cannot be opened or created.
    #[error("cannot open store {store}: {source}")]
    Open { store: String, source: BackendError },
    /// Another process holds the store.
    #[error("store {store} is in use by another process (is another fieldsync-hub running on the same store?)")]
    InUse { store: String },
    /// The store has a schema this build cannot read.
    #[error("store {store} has schema version {found}; this build reads version {supported}")]
    SchemaVersion {
        store: String,
        found: u64,
        supported: u64,
    },
    /// A networked store cannot be reached (refused, timed out, failing
    /// over); retrying later may succeed. The operation may or may not have
    /// taken effect (a commit whose answer was lost): callers treat it as
    /// failed and acknowledge nothing, which is safe because a repeated
    /// write merges to the same state. For the PostgreSQL store; the
    /// embedded store has no network and never returns it.
    #[error("store unavailable: {0}")]
    Unavailable(BackendError),
    /// The storage engine failed.
    #[error("storage failed: {0}")]
    Backend(BackendError),
    /// Stored bytes do not decode.
    #[error("stored data is corrupt: {0}")]
    Corrupt(#[from] CodecError),
}

impl From<HistoryError> for StoreError {
    fn from(e: HistoryError) -> Self {
        match e {
            HistoryError::Corrupt(e) => StoreError::Corrupt(e),
            e => StoreError::Backend(Box::new(e)),
        }
    }
}

/// The redb backend's errors become [`StoreError::Backend`] (its open errors
/// are mapped in [`RedbHubStore::open`]).
macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Backend(Box::new(e))
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// One agent's upstream batch or snapshot part, ready to commit: the changes
/// the hub admitted and the agent's new cursor (none for a snapshot part that
/// is not the last).
#[derive(Debug, Clone)]
pub struct Upstream {
    pub agent: AgentId,
    pub changes: Vec<Change>,
    pub cursor: Option<Cursor>,
    /// A snapshot part (its changes do not count as applied entries; a last
    /// part counts a resync).
    pub snapshot: bool,
}

/// The hub's durable state. Every method is one transaction; implementations
/// must be safe to call from several threads. Orders are byte orders of the
/// ids and keys (a SQL backend needs a binary collation). What a backend must
/// do is tested once, over this trait, by the suite in `store::conformance`.
pub trait HubStore: Send + Sync + 'static {
    /// The agent's cursors, if the hub has heard of it.
    fn agent(&self, agent: &AgentId) -> Result<Option<AgentRow>, StoreError>;
    /// Every agent the hub has heard of, ordered by id.
    fn agents(&self) -> Result<Vec<(AgentId, AgentRow)>, StoreError>;
    /// This store's incarnation, drawn at creation.
    fn incarnation(&self) -> Result<Incarnation, StoreError>;
    /// Applies every batch of `group` (several agents, or several batches of
    /// one agent in order) in one durable transaction: each batch's changes are
    /// merged into its agent's records and its cursor is set, atomically.
    fn apply_upstream_group(&self, group: &[Upstream], now_ms: u64) -> Result<(), StoreError>;
    /// [`HubStore::apply_upstream_group`] for one batch.
    fn apply_upstream(
        &self,
        agent: &AgentId,
        changes: &[Change],
        cursor: Cursor,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let one = Upstream {
            agent: agent.clone(),
            changes: changes.to_vec(),
            cursor: Some(cursor),
            snapshot: false,
        };
        self.apply_upstream_group(std::slice::from_ref(&one), now_ms)
    }
    /// Records an agent's hello at `now_ms` and what it changed. Need not be
    /// durable: losing it in a crash loses `last_seen_ms`, the skew, a
    /// conflict count, or an identity change (the next hello decides again;
    /// a missing row is recreated as the default row).
    fn hello(&self, agent: &AgentId, now_ms: u64, note: &HelloNote) -> Result<(), StoreError>;
    /// Merges `changes` into the hub's copy of the agent's records and appends
    /// each to the agent's downstream queue, atomically, persisting the hub
    /// clock state `hlc_last`; the events it logs are stamped `now_ms`.
    /// Returns the last queued sequence number.
    /// The versions they make are an operator's writes.
    fn enqueue_downstream(
        &self,
        agent: &AgentId,
        changes: &[Change],
        hlc_last: Stamp,
        now_ms: u64,
    ) -> Result<Seq, StoreError> {
        let one = [(agent.clone(), changes.to_vec())];
        let writer = Writer::new(OPERATOR, Cause::Operator);
        let last = self.enqueue_downstream_group(&one, &writer, hlc_last, now_ms)?;
        Ok(last[0])
    }
    /// [`HubStore::enqueue_downstream`] for several agents in one durable
    /// transaction (a broadcast's chunk), by `writer`; returns each agent's
    /// last queued sequence number, in order.
    fn enqueue_downstream_group(
        &self,
        queues: &[(AgentId, Vec<Change>)],
        writer: &Writer,
        hlc_last: Stamp,
        now_ms: u64,
    ) -> Result<Vec<Seq>, StoreError>;
    /// Up to `limit` versions of one of an agent's records, newest first,
    /// each with its number.
    fn history(
        &self,
        agent: &AgentId,
        collection: &CollectionName,
        key: &RecordKey,
        limit: usize,
    ) -> Result<Vec<(u64, HistoryEntry)>, StoreError>;
    /// The history's size and what its bounds dropped.
    fn history_stats(&self) -> Result<HistoryStats, StoreError>;
    /// Keeps version history by `limits` from now on (a store opened keeps
    /// none until told: it knows no policy).
    fn set_history_limits(&self, limits: HistoryLimits);
    /// Replaces an agent's labels, durably; `false` (and nothing changed) if
    /// the hub has never heard of the agent.
    fn set_labels(&self, agent: &AgentId, labels: &Labels) -> Result<bool, StoreError>;
    /// Up to `limit` queued entries for `agent` from `from` on, in order;
    /// stops before the stored bytes pass `max_bytes` (one entry is always
    /// taken).
    fn downstream(
        &self,
        agent: &AgentId,
        from: Seq,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<(Seq, Change)>, StoreError>;
    /// The queued entry at `seq`, if still queued.
    fn downstream_entry(&self, agent: &AgentId, seq: Seq) -> Result<Option<Change>, StoreError>;
    /// The agent holds everything up to `mark`: drop those entries and keep
    /// `mark` as the trim point (`resync`: it got there by snapshot; that one
    /// is durable). Need not be durable otherwise: an ack lost in a crash is
    /// repaired by the agent's next hello, whose cursor acknowledges those
    /// entries again before anything is sent; nothing is applied twice.
    fn ack_downstream(&self, agent: &AgentId, mark: Mark, resync: bool) -> Result<(), StoreError>;
    /// [`HubStore::ack_downstream`] for several acks (of several agents, or
    /// of one in order), in as few transactions as the backend can: durable
    /// if any of them is a resync's end.
    fn ack_downstream_group(&self, acks: &[(AgentId, Mark, bool)]) -> Result<(), StoreError> {
        for (agent, mark, resync) in acks {
            self.ack_downstream(agent, *mark, *resync)?;
        }
        Ok(())
    }
    /// Up to `limit` of the agent's records after `after` (from the first when
    /// `None`) in (collection, key) order, and where to continue if there may
    /// be more; stops before the stored bytes pass `max_bytes` (one record is
    /// always taken).
    fn records_after(
        &self,
        agent: &AgentId,
        after: Option<&(CollectionName, RecordKey)>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<SnapshotChunk, StoreError>;
    /// Up to `limit` records holding a conflict (a `review` or `prefer`
    /// field with concurrent values), in key order, of one agent or all, of
    /// one collection or all. A scan of the records (no index yet).
    fn conflicted(
        &self,
        agent: Option<&AgentId>,
        collection: Option<&CollectionName>,
        limit: usize,
    ) -> Result<Vec<(AgentId, Change)>, StoreError>;
    /// The hub's copy of one record.
    fn record(
        &self,
        agent: &AgentId,
        collection: &CollectionName,
        key: &RecordKey,
    ) -> Result<Option<RecordState>, StoreError>;
    /// The hub clock state persisted with the last downstream write.
    fn hlc_last(&self) -> Result<Stamp, StoreError>;

    // The event log (see `crate::events`). Upstream applies and downstream
    // enqueues append their `record.changed` events themselves.

    /// Appends events that need no fsync of their own (link and policy
    /// events): they become durable, and readable, with the next durable
    /// commit ([`HubStore::sync_events`] makes one if none comes).
    fn append_events(&self, events: &[EventKind], now_ms: u64) -> Result<(), StoreError>;
    /// Up to `limit` durable events after `after`, in order.
    fn events_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, Event)>, StoreError>;
    /// The durable event at `seq`, if the log still holds it.
    fn event(&self, seq: u64) -> Result<Option<Event>, StoreError>;
    /// The readable part of the log.
    fn event_bounds(&self) -> Result<EventBounds, StoreError>;
    /// Makes every appended event durable; whether that took a commit.
    fn sync_events(&self) -> Result<bool, StoreError>;
    /// Sees the durable head move.
    fn watch_events(&self) -> watch::Receiver<u64>;
    /// Drops up to `limit` of the oldest events that are at or before `upto`
    /// and were committed before `before_ms`; returns how many.
    fn trim_events(&self, upto: u64, before_ms: u64, limit: usize) -> Result<usize, StoreError>;

    // Webhook endpoints (see `crate::webhooks`).

    /// Stores a new endpoint (durable).
    fn put_webhook(&self, endpoint: &Endpoint) -> Result<(), StoreError>;
    fn webhook(&self, id: &str) -> Result<Option<Endpoint>, StoreError>;
    /// Every endpoint, ordered by id.
    fn webhooks(&self) -> Result<Vec<Endpoint>, StoreError>;
    /// Deletes an endpoint and its attempts (durable); whether it existed.
    fn delete_webhook(&self, id: &str) -> Result<bool, StoreError>;
    /// Makes delivery resume after `cursor` (a replay), re-enabled, with a
    /// new epoch (durable). The endpoint, or `None` if there is none.
    fn rewind_webhook(&self, id: &str, cursor: u64) -> Result<Option<Endpoint>, StoreError>;
    /// Records an endpoint's progress, if the endpoint still exists at
    /// `epoch` (false if it was deleted or rewound meanwhile), and its
    /// `attempts` (in order) if it exists at all. Need not be durable: a lost
    /// cursor move re-sends events (same ids).
    fn webhook_progress(
        &self,
        id: &str,
        epoch: u64,
        progress: &Progress,
        attempts: &[Attempt],
    ) -> Result<bool, StoreError>;
    /// Up to `limit` of an endpoint's attempts, newest first.
    fn webhook_attempts(&self, id: &str, limit: usize) -> Result<Vec<Attempt>, StoreError>;
}

/// Where the event log's head is: committed, and durable. Readers are
/// woken when the durable head moves.
struct EventHeads {
    committed: AtomicU64,
    durable: AtomicU64,
    notify: watch::Sender<u64>,
}

impl EventHeads {
    fn new(head: u64) -> Self {
        Self {
            committed: AtomicU64::new(head),
            durable: AtomicU64::new(head),
            notify: watch::Sender::new(head),
        }
    }

    /// A commit that left the log's head at `head` returned.
    fn committed(&self, head: u64, durable: bool) {
        self.committed.fetch_max(head, Ordering::AcqRel);
        if durable {
            let before = self.durable.fetch_max(head, Ordering::AcqRel);
            if head > before {
                self.notify.send_if_modified(|h| {
                    let moved = head > *h;
                    *h = (*h).max(head);
                    moved
                });
            }
        }
    }

    fn durable(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }
}

/// Appends events inside a write transaction; returns the new head.
struct EventWriter<'t> {
    table: redb::Table<'t, u64, &'static [u8]>,
    last: u64,
}

impl<'t> EventWriter<'t> {
    fn open(txn: &'t redb::WriteTransaction) -> Result<Self, StoreError> {
        let meta = txn.open_table(META)?;
        let last = meta.get(K_EVENTS_LAST)?.map_or(0, |v| v.value());
        drop(meta);
        Ok(Self {
            table: txn.open_table(EVENTS)?,
            last,
        })
    }

    fn push(&mut self, at_ms: u64, kind: EventKind) -> Result<(), StoreError> {
        self.last += 1;
        let event = Event { at_ms, kind };
        self.table
            .insert(self.last, codec::to_bytes(&event)?.as_slice())?;
        Ok(())
    }

    /// Persists the head; returns it.
    fn close(self, txn: &redb::WriteTransaction) -> Result<u64, StoreError> {
        let last = self.last;
        drop(self);
        txn.open_table(META)?.insert(K_EVENTS_LAST, last)?;
        Ok(last)
    }
}

/// [`HubStore`] on one redb file.
#[derive(Clone)]
pub struct RedbHubStore {
    db: Arc<Database>,
    heads: Arc<EventHeads>,
    limits: Arc<std::sync::RwLock<Arc<HistoryLimits>>>,
}

impl RedbHubStore {
    /// A write transaction whose commit skips the fsync: it becomes durable
    /// with the next durable commit, and a crash before that rolls it back.
    /// Only for writes whose loss the protocol repairs (see [`HubStore`]).
    fn lazy_write(&self) -> Result<redb::WriteTransaction, StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::None)?;
        Ok(txn)
    }

    fn limits(&self) -> Arc<HistoryLimits> {
        self.limits
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Opens (or creates) the store in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        create_private_dir(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let path = data_dir.join(STORE_FILE);
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|source| match source {
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse {
                    store: path.display().to_string(),
                },
                source => StoreError::Open {
                    store: path.display().to_string(),
                    source: Box::new(source),
                },
            })?;
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let found = meta.get(K_SCHEMA)?.map(|v| v.value());
            match found {
                // New, or version 1 (migrated: rows decode with defaults).
                None | Some(1) => {
                    meta.insert(K_SCHEMA, SCHEMA_VERSION)?;
                    meta.insert(K_INCARNATION, rand::random::<u64>().max(1))?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(found) => {
                    return Err(StoreError::SchemaVersion {
                        store: path.display().to_string(),
                        found,
                        supported: SCHEMA_VERSION,
                    })
                }
            }
            txn.open_table(AGENTS)?;
            txn.open_table(RECORDS)?;
            txn.open_table(DOWN_QUEUE)?;
            txn.open_table(EVENTS)?;
            txn.open_table(WEBHOOKS)?;
            txn.open_table(ATTEMPTS)?;
            fieldsync_history::create_tables(&txn)?;
        }
        // Whatever survived to this open is durable.
        let head = txn
            .open_table(META)?
            .get(K_EVENTS_LAST)?
            .map_or(0, |v| v.value());
        txn.commit()?;
        Ok(Self {
            db: Arc::new(db),
            heads: Arc::new(EventHeads::new(head)),
            limits: Arc::default(),
        })
    }
}

fn read_row(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    agent: &AgentId,
) -> Result<Option<AgentRow>, StoreError> {
    Ok(match table.get(agent.as_str())? {
        Some(bytes) => Some(codec::from_bytes(bytes.value())?),
        None => None,
    })
}

/// Merges `change` into the agent's record, recording the version it made;
/// what it changed, if anything.
fn merge_into(
    records: &mut redb::Table<(&'static str, &'static str, &'static str), &'static [u8]>,
    history: &mut HistoryWriter<'_>,
    agent: &AgentId,
    change: &Change,
    writer: &Writer,
    now_ms: u64,
) -> Result<Option<RecordChanged>, StoreError> {
    let key = (
        agent.as_str(),
        change.collection.as_str(),
        change.key.as_str(),
    );
    let mut state: RecordState = match records.get(key)? {
        Some(bytes) => codec::from_bytes(bytes.value())?,
        None => RecordState::default(),
    };
    let prior = Prior::of(&state, &change.state);
    let before = history.before(&state, change);
    if !state.merge(&change.state) {
        return Ok(None);
    }
    records.insert(key, codec::to_bytes(&state)?.as_slice())?;
    history.record(agent.as_str(), before, &state, change, writer, now_ms)?;
    Ok(RecordChanged::of(
        agent,
        &change.collection,
        &change.key,
        &prior,
        &state,
        &change.state,
    ))
}

fn read_endpoint(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    id: &str,
) -> Result<Option<Endpoint>, StoreError> {
    Ok(match table.get(id)? {
        Some(bytes) => Some(codec::from_bytes(bytes.value())?),
        None => None,
    })
}

impl HubStore for RedbHubStore {
    fn agent(&self, agent: &AgentId) -> Result<Option<AgentRow>, StoreError> {
        let txn = self.db.begin_read()?;
        read_row(&txn.open_table(AGENTS)?, agent)
    }

    fn agents(&self) -> Result<Vec<(AgentId, AgentRow)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(AGENTS)?;
        let mut out = Vec::new();
        for item in table.iter()? {
            let (id, bytes) = item?;
            let id = AgentId::new(id.value()).map_err(|e| CodecError::Malformed(e.to_string()))?;
            out.push((id, codec::from_bytes(bytes.value())?));
        }
        Ok(out)
    }

    fn incarnation(&self) -> Result<Incarnation, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(Incarnation(
            meta.get(K_INCARNATION)?.map_or(0, |v| v.value()),
        ))
    }

    fn apply_upstream_group(&self, group: &[Upstream], now_ms: u64) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        let mut events = EventWriter::open(&txn)?;
        let limits = self.limits();
        let mut history = HistoryWriter::open(&txn, &limits)?;
        {
            let mut agents = txn.open_table(AGENTS)?;
            let mut records = txn.open_table(RECORDS)?;
            for Upstream {
                agent,
                changes,
                cursor,
                snapshot,
            } in group
            {
                let mut row = read_row(&agents, agent)?.unwrap_or_default();
                let cause = if *snapshot {
                    Cause::Resync
                } else {
                    Cause::Agent
                };
                let writer = Writer::new(agent.as_str(), cause);
                for change in changes {
                    let changed =
                        merge_into(&mut records, &mut history, agent, change, &writer, now_ms)?;
                    if let Some(changed) = changed {
                        events.push(now_ms, EventKind::RecordChanged(changed))?;
                    }
                }
                if let Some(c) = cursor {
                    row.up_source = c.source;
                    row.up_applied = c.at.seq;
                    row.up_check = c.at.check;
                    if *snapshot {
                        row.resyncs += 1;
                    }
                }
                row.last_seen_ms = Some(now_ms);
                if !snapshot {
                    row.changes_applied += changes.len() as u64;
                }
                agents.insert(agent.as_str(), codec::to_bytes(&row)?.as_slice())?;
            }
        }
        history.close(&txn)?;
        let head = events.close(&txn)?;
        txn.commit()?;
        self.heads.committed(head, true);
        Ok(())
    }

    fn hello(&self, agent: &AgentId, now_ms: u64, note: &HelloNote) -> Result<(), StoreError> {
        let txn = self.lazy_write()?;
        {
            let mut agents = txn.open_table(AGENTS)?;
            let mut row = read_row(&agents, agent)?.unwrap_or_default();
            row.last_seen_ms = Some(now_ms);
            if let Some(identity) = &note.identity {
                row.identity = identity.clone();
            }
            if note.clock_skew_ms.is_some() {
                row.clock_skew_ms = note.clock_skew_ms;
            }
            if note.conflict {
                row.identity_conflicts += 1;
            }
            agents.insert(agent.as_str(), codec::to_bytes(&row)?.as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    fn enqueue_downstream_group(
        &self,
        queues: &[(AgentId, Vec<Change>)],
        writer: &Writer,
        hlc_last: Stamp,
        now_ms: u64,
    ) -> Result<Vec<Seq>, StoreError> {
        let txn = self.db.begin_write()?;
        let mut events = EventWriter::open(&txn)?;
        let limits = self.limits();
        let mut history = HistoryWriter::open(&txn, &limits)?;
        let mut lasts = Vec::with_capacity(queues.len());
        {
            let mut agents = txn.open_table(AGENTS)?;
            let mut records = txn.open_table(RECORDS)?;
            let mut queue = txn.open_table(DOWN_QUEUE)?;
            let mut meta = txn.open_table(META)?;
            for (agent, changes) in queues {
                let mut row = read_row(&agents, agent)?.unwrap_or_default();
                for change in changes {
                    let changed =
                        merge_into(&mut records, &mut history, agent, change, writer, now_ms)?;
                    if let Some(changed) = changed {
                        events.push(now_ms, EventKind::RecordChanged(changed))?;
                    }
                    row.down_last = row.down_last.next();
                    queue.insert(
                        (agent.as_str(), row.down_last.0),
                        codec::to_bytes(change)?.as_slice(),
                    )?;
                }
                agents.insert(agent.as_str(), codec::to_bytes(&row)?.as_slice())?;
                lasts.push(row.down_last);
            }
            meta.insert(K_HLC_WALL, hlc_last.wall_ms)?;
            meta.insert(K_HLC_LOGICAL, u64::from(hlc_last.logical))?;
        }
        history.close(&txn)?;
        let head = events.close(&txn)?;
        txn.commit()?;
        self.heads.committed(head, true);
        Ok(lasts)
    }

    fn history(
        &self,
        agent: &AgentId,
        collection: &CollectionName,
        key: &RecordKey,
        limit: usize,
    ) -> Result<Vec<(u64, HistoryEntry)>, StoreError> {
        let txn = self.db.begin_read()?;
        let (a, c, k) = (agent.as_str(), collection.as_str(), key.as_str());
        Ok(fieldsync_history::versions(&txn, a, c, k, limit)?)
    }

    fn set_history_limits(&self, limits: HistoryLimits) {
        *self
            .limits
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(limits);
    }

    fn history_stats(&self) -> Result<HistoryStats, StoreError> {
        Ok(fieldsync_history::stats(&self.db.begin_read()?)?)
    }

    fn set_labels(&self, agent: &AgentId, labels: &Labels) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut agents = txn.open_table(AGENTS)?;
            let Some(mut row) = read_row(&agents, agent)? else {
                return Ok(false);
            };
            row.labels = labels.clone();
            agents.insert(agent.as_str(), codec::to_bytes(&row)?.as_slice())?;
        }
        txn.commit()?;
        Ok(true)
    }

    fn downstream(
        &self,
        agent: &AgentId,
        from: Seq,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<(Seq, Change)>, StoreError> {
        let txn = self.db.begin_read()?;
        let queue = txn.open_table(DOWN_QUEUE)?;
        let mut out = Vec::new();
        let mut total = 0usize;
        for item in queue
            .range((agent.as_str(), from.0)..=(agent.as_str(), u64::MAX))?
            .take(limit)
        {
            let (k, bytes) = item?;
            total = total.saturating_add(bytes.value().len());
            if total > max_bytes && !out.is_empty() {
                break;
            }
            out.push((Seq(k.value().1), codec::from_bytes(bytes.value())?));
        }
        Ok(out)
    }

    fn downstream_entry(&self, agent: &AgentId, seq: Seq) -> Result<Option<Change>, StoreError> {
        let txn = self.db.begin_read()?;
        let queue = txn.open_table(DOWN_QUEUE)?;
        let found = queue.get((agent.as_str(), seq.0))?;
        Ok(match found {
            Some(bytes) => Some(codec::from_bytes(bytes.value())?),
            None => None,
        })
    }

    fn ack_downstream(&self, agent: &AgentId, mark: Mark, resync: bool) -> Result<(), StoreError> {
        self.ack_downstream_group(&[(agent.clone(), mark, resync)])
    }

    fn ack_downstream_group(&self, acks: &[(AgentId, Mark, bool)]) -> Result<(), StoreError> {
        // The end of a resync is durable: a lost end mark would make the next
        // hello look like another history and resync again.
        let txn = if acks.iter().any(|(_, _, resync)| *resync) {
            self.db.begin_write()?
        } else {
            self.lazy_write()?
        };
        {
            let mut agents = txn.open_table(AGENTS)?;
            let mut queue = txn.open_table(DOWN_QUEUE)?;
            for (agent, mark, resync) in acks {
                let mut row = read_row(&agents, agent)?.unwrap_or_default();
                let upto = mark.seq.min(row.down_last);
                if upto >= row.down_acked {
                    queue
                        .retain_in((agent.as_str(), 0)..=(agent.as_str(), upto.0), |_, _| false)?;
                    row.down_acked = upto;
                    row.down_acked_check = mark.check;
                    if *resync {
                        row.resyncs += 1;
                    }
                    agents.insert(agent.as_str(), codec::to_bytes(&row)?.as_slice())?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn records_after(
        &self,
        agent: &AgentId,
        after: Option<&(CollectionName, RecordKey)>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<SnapshotChunk, StoreError> {
        use std::ops::Bound;
        let txn = self.db.begin_read()?;
        let records = txn.open_table(RECORDS)?;
        let a = agent.as_str();
        let start = match after {
            Some((c, k)) => Bound::Excluded((a, c.as_str(), k.as_str())),
            None => Bound::Included((a, "", "")),
        };
        let mut page = SnapshotPage::new(limit, max_bytes);
        for item in records.range::<(&str, &str, &str)>((start, Bound::Unbounded))? {
            let (k, bytes) = item?;
            let (owner, c, key) = k.value();
            if owner != a || !page.push(c, key, bytes.value())? {
                break;
            }
        }
        Ok(page.finish())
    }

    fn conflicted(
        &self,
        agent: Option<&AgentId>,
        collection: Option<&CollectionName>,
        limit: usize,
    ) -> Result<Vec<(AgentId, Change)>, StoreError> {
        let txn = self.db.begin_read()?;
        let records = txn.open_table(RECORDS)?;
        let from = agent.map_or("", AgentId::as_str);
        let mut found = Vec::new();
        for item in records.range::<(&str, &str, &str)>((from, "", "")..)? {
            let (k, bytes) = item?;
            let (owner, c, key) = k.value();
            if agent.is_some_and(|a| a.as_str() != owner) {
                break;
            }
            if collection.is_some_and(|want| want.as_str() != c) {
                continue;
            }
            let state: RecordState = codec::from_bytes(bytes.value())?;
            if state.conflicts().is_empty() {
                continue;
            }
            let (Ok(owner), Ok(collection), Ok(key)) = (
                AgentId::new(owner),
                CollectionName::new(c),
                RecordKey::new(key),
            ) else {
                continue;
            };
            found.push((
                owner,
                Change {
                    collection,
                    key,
                    state,
                },
            ));
            if found.len() >= limit {
                break;
            }
        }
        Ok(found)
    }

    fn record(
        &self,
        agent: &AgentId,
        collection: &CollectionName,
        key: &RecordKey,
    ) -> Result<Option<RecordState>, StoreError> {
        let txn = self.db.begin_read()?;
        let records = txn.open_table(RECORDS)?;
        let found = records.get((agent.as_str(), collection.as_str(), key.as_str()))?;
        Ok(match found {
            Some(bytes) => Some(codec::from_bytes(bytes.value())?),
            None => None,
        })
    }

    fn hlc_last(&self) -> Result<Stamp, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let wall = meta.get(K_HLC_WALL)?.map_or(0, |v| v.value());
        let logical = meta.get(K_HLC_LOGICAL)?.map_or(0, |v| v.value());
        Ok(Stamp::new(wall, u32::try_from(logical).unwrap_or(u32::MAX)))
    }

    fn append_events(&self, events: &[EventKind], now_ms: u64) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let txn = self.lazy_write()?;
        let mut log = EventWriter::open(&txn)?;
        for kind in events {
            log.push(now_ms, kind.clone())?;
        }
        let head = log.close(&txn)?;
        txn.commit()?;
        self.heads.committed(head, false);
        Ok(())
    }

    fn events_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, Event)>, StoreError> {
        let durable = self.heads.durable();
        if after >= durable {
            return Ok(Vec::new());
        }
        let txn = self.db.begin_read()?;
        let table = txn.open_table(EVENTS)?;
        let mut out = Vec::new();
        for item in table.range(after + 1..=durable)?.take(limit) {
            let (k, bytes) = item?;
            out.push((k.value(), codec::from_bytes(bytes.value())?));
        }
        Ok(out)
    }

    fn event(&self, seq: u64) -> Result<Option<Event>, StoreError> {
        if seq > self.heads.durable() {
            return Ok(None);
        }
        let txn = self.db.begin_read()?;
        let table = txn.open_table(EVENTS)?;
        let found = table.get(seq)?;
        Ok(match found {
            Some(bytes) => Some(codec::from_bytes(bytes.value())?),
            None => None,
        })
    }

    fn event_bounds(&self) -> Result<EventBounds, StoreError> {
        let head = self.heads.durable();
        let txn = self.db.begin_read()?;
        let table = txn.open_table(EVENTS)?;
        let oldest = match table.first()? {
            Some((k, _)) if k.value() <= head => k.value(),
            _ => head + 1,
        };
        Ok(EventBounds { oldest, head })
    }

    fn sync_events(&self) -> Result<bool, StoreError> {
        if self.heads.committed.load(Ordering::Acquire) <= self.heads.durable() {
            return Ok(false);
        }
        // A durable commit makes every earlier commit durable; it rewrites
        // the head it sees, so it is never empty.
        let txn = self.db.begin_write()?;
        let head = {
            let mut meta = txn.open_table(META)?;
            let head = meta.get(K_EVENTS_LAST)?.map_or(0, |v| v.value());
            meta.insert(K_EVENTS_LAST, head)?;
            head
        };
        txn.commit()?;
        self.heads.committed(head, true);
        Ok(true)
    }

    fn watch_events(&self) -> watch::Receiver<u64> {
        self.heads.notify.subscribe()
    }

    fn trim_events(&self, upto: u64, before_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let txn = self.lazy_write()?;
        let mut dropped = 0;
        {
            let mut table = txn.open_table(EVENTS)?;
            let mut last = None;
            for item in table.range(..=upto)?.take(limit) {
                let (k, bytes) = item?;
                let event: Event = codec::from_bytes(bytes.value())?;
                if event.at_ms >= before_ms {
                    break;
                }
                last = Some(k.value());
                dropped += 1;
            }
            if let Some(last) = last {
                table.retain_in(..=last, |_, _| false)?;
            }
        }
        txn.commit()?;
        Ok(dropped)
    }

    fn put_webhook(&self, endpoint: &Endpoint) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(WEBHOOKS)?
            .insert(endpoint.id.as_str(), codec::to_bytes(endpoint)?.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    fn webhook(&self, id: &str) -> Result<Option<Endpoint>, StoreError> {
        let txn = self.db.begin_read()?;
        read_endpoint(&txn.open_table(WEBHOOKS)?, id)
    }

    fn webhooks(&self) -> Result<Vec<Endpoint>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(WEBHOOKS)?;
        let mut out = Vec::new();
        for item in table.iter()? {
            let (_, bytes) = item?;
            out.push(codec::from_bytes(bytes.value())?);
        }
        Ok(out)
    }

    fn delete_webhook(&self, id: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let existed = {
            let existed = txn.open_table(WEBHOOKS)?.remove(id)?.is_some();
            txn.open_table(ATTEMPTS)?
                .retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
            existed
        };
        txn.commit()?;
        Ok(existed)
    }

    fn rewind_webhook(&self, id: &str, cursor: u64) -> Result<Option<Endpoint>, StoreError> {
        let txn = self.db.begin_write()?;
        let found = {
            let mut table = txn.open_table(WEBHOOKS)?;
            let found = read_endpoint(&table, id)?;
            match found {
                Some(mut endpoint) => {
                    endpoint.epoch += 1;
                    endpoint.progress = Progress {
                        cursor,
                        ..Progress::default()
                    };
                    table.insert(id, codec::to_bytes(&endpoint)?.as_slice())?;
                    Some(endpoint)
                }
                None => None,
            }
        };
        txn.commit()?;
        Ok(found)
    }

    fn webhook_progress(
        &self,
        id: &str,
        epoch: u64,
        progress: &Progress,
        attempts: &[Attempt],
    ) -> Result<bool, StoreError> {
        let txn = self.lazy_write()?;
        let current = {
            let mut table = txn.open_table(WEBHOOKS)?;
            let Some(mut endpoint) = read_endpoint(&table, id)? else {
                return Ok(false);
            };
            let current = endpoint.epoch == epoch;
            if current {
                endpoint.progress = progress.clone();
                table.insert(id, codec::to_bytes(&endpoint)?.as_slice())?;
            }
            if !attempts.is_empty() {
                let mut table = txn.open_table(ATTEMPTS)?;
                let mut next = table
                    .range((id, 0)..=(id, u64::MAX))?
                    .next_back()
                    .transpose()?
                    .map_or(1, |(k, _)| k.value().1 + 1);
                for attempt in attempts {
                    table.insert((id, next), codec::to_bytes(attempt)?.as_slice())?;
                    next += 1;
                }
                if next > ATTEMPTS_KEPT + 1 {
                    let keep_from = next - ATTEMPTS_KEPT;
                    table.retain_in((id, 0)..(id, keep_from), |_, _| false)?;
                }
            }
            current
        };
        txn.commit()?;
        Ok(current)
    }

    fn webhook_attempts(&self, id: &str, limit: usize) -> Result<Vec<Attempt>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ATTEMPTS)?;
        let mut out = Vec::new();
        for item in table.range((id, 0)..=(id, u64::MAX))?.rev().take(limit) {
            let (_, bytes) = item?;
            out.push(codec::from_bytes(bytes.value())?);
        }
        Ok(out)
    }
}
