//! The group committer: the one thread that writes to the store. Concurrent
//! callers hand it their writes; it takes every request that is waiting (up to a
//! bound), commits them all in one durable transaction, then answers each caller.
//! One fsync serves many writes, so throughput does not stop at the disk's fsync
//! rate, and no caller hears "done" before its write is durable.
//!
//! It also applies downstream batches from the hub, since it owns the clock.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use fieldsync_shared::{clock, hlc, Change, Cursor, Hlc, Origin, Policy, Seq};
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics;
use crate::store::{Restamped, Store, StoreError, WriteOp, WriteOutcome};

/// Most operations committed in one transaction.
pub const MAX_OPS_PER_COMMIT: usize = 4096;
/// Requests that may wait for the committer before callers are held back.
const QUEUE_DEPTH: usize = 4096;

/// Source of wall-clock time in milliseconds since the Unix epoch.
pub type WallClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Environment variable that shifts the agent's reading of the system clock
/// by this many milliseconds: a testing aid that makes the agent behave like a
/// device whose clock is wrong (no RTC battery, bad NTP). Unset in production.
pub const CLOCK_SKEW_ENV: &str = "FIELDSYNC_TEST_CLOCK_SKEW_MS";

/// The system clock as a [`WallClock`] (shifted by [`CLOCK_SKEW_ENV`] if set).
pub fn system_clock() -> WallClock {
    match std::env::var(CLOCK_SKEW_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
    {
        Some(skew) if skew != 0 => {
            tracing::warn!(
                skew_ms = skew,
                "{CLOCK_SKEW_ENV} is set: the wall clock is shifted"
            );
            Arc::new(move || clock::corrected(hlc::system_now_ms(), skew))
        }
        _ => Arc::new(hlc::system_now_ms),
    }
}

/// The wall clock the agent stamps with: the device's clock corrected by the
/// offset learned from the hub (kept across restarts in the store).
#[derive(Clone)]
pub struct CorrectedClock {
    base: WallClock,
    offset_ms: Arc<AtomicI64>,
}

impl CorrectedClock {
    pub fn new(base: WallClock, offset_ms: i64) -> Self {
        Self {
            base,
            offset_ms: Arc::new(AtomicI64::new(offset_ms)),
        }
    }

    /// Corrected milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        clock::corrected((self.base)(), self.offset_ms())
    }

    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
    }

    pub fn set_offset_ms(&self, offset_ms: i64) {
        self.offset_ms.store(offset_ms, Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    #[error(transparent)]
    Store(#[from] Arc<StoreError>),
    #[error("the store is shutting down")]
    Closed,
}

type Reply<T> = oneshot::Sender<Result<T, Arc<StoreError>>>;

enum Request {
    /// Local writes, group-committed with other local writes.
    Local {
        ops: Vec<WriteOp>,
        reply: Reply<Vec<WriteOutcome>>,
    },
    /// A downstream batch or snapshot part from the hub, committed on its own.
    Downstream {
        changes: Vec<Change>,
        cursor: Option<Cursor>,
        snapshot: bool,
        reply: Reply<usize>,
    },
    /// The clock was corrected: re-stamp what was written with a clock that
    /// ran ahead (see `fieldsync_shared::clock`).
    Restamp {
        offset_ms: i64,
        reply: Reply<Restamped>,
    },
}

/// Handle for submitting writes. Cheap to clone.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Request>,
    stats: Arc<CommitStats>,
    outbox_last: watch::Receiver<Seq>,
}

/// Counters and histograms kept by the committer (served by `GET /metrics`,
/// see [`crate::metrics`]).
#[derive(Debug)]
pub struct CommitStats {
    /// Local group commits (durable transactions of local writes).
    pub commits: AtomicU64,
    /// Write requests answered by those commits.
    pub requests: AtomicU64,
    /// Record writes (puts and deletes) in those commits.
    pub writes: AtomicU64,
    /// Requests in the transaction being committed right now.
    pub in_commit: AtomicU64,
    /// Downstream batches and snapshot parts merged (each one transaction).
    pub downstream_commits: AtomicU64,
    /// Changes in those.
    pub downstream_changes: AtomicU64,
    /// Duration of each local group commit, in seconds.
    pub commit_seconds: Histogram,
    /// Record writes in each local group commit.
    pub batch_changes: Histogram,
}

impl Default for CommitStats {
    fn default() -> Self {
        Self {
            commits: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            in_commit: AtomicU64::new(0),
            downstream_commits: AtomicU64::new(0),
            downstream_changes: AtomicU64::new(0),
            commit_seconds: Histogram::new(metrics::COMMIT_SECONDS_BUCKETS),
            batch_changes: Histogram::new(metrics::batch_changes_buckets()),
        }
    }
}

/// Settings of the committer thread.
pub struct WriterSetup {
    pub store: Store,
    pub policy: Arc<Policy>,
    pub origin: Origin,
    pub clock: CorrectedClock,
    pub max_drift_ms: u64,
}

impl Writer {
    /// Starts the committer thread. It exits once every [`Writer`] clone is dropped
    /// and the queue is drained; join the returned handle to wait for that.
    pub fn start(setup: WriterSetup) -> Result<(Self, thread::JoinHandle<()>), StoreError> {
        let hlc = Hlc::restore(setup.store.hlc_last()?, setup.max_drift_ms);
        let (outbox_tx, outbox_last) = watch::channel(setup.store.outbox_bounds()?.last);
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let stats = Arc::new(CommitStats::default());
        let committer = Committer {
            setup,
            hlc,
            stats: stats.clone(),
            outbox_tx,
        };
        let handle = thread::Builder::new()
            .name("fieldsync-writer".into())
            .spawn(move || committer.run(rx))
            .map_err(|e| StoreError::Storage(redb::Error::Io(e)))?;
        Ok((
            Self {
                tx,
                stats,
                outbox_last,
            },
            handle,
        ))
    }

    /// The committer's counters.
    pub fn stats(&self) -> &CommitStats {
        &self.stats
    }

    /// Requests waiting for the committer right now.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// The outbox's last sequence number, updated after every commit.
    pub fn outbox_last(&self) -> watch::Receiver<Seq> {
        self.outbox_last.clone()
    }

    /// Commits `ops` atomically (together with whatever else is waiting) and
    /// returns their outcomes once the commit is durable.
    pub async fn write(&self, ops: Vec<WriteOp>) -> Result<Vec<WriteOutcome>, WriteError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Request::Local { ops, reply }, answer).await
    }

    /// Merges a downstream batch (or snapshot part) and sets the downstream
    /// cursor, if given, in one durable transaction. Returns how many records
    /// changed.
    pub async fn apply_downstream(
        &self,
        changes: Vec<Change>,
        cursor: Option<Cursor>,
        snapshot: bool,
    ) -> Result<usize, WriteError> {
        let (reply, answer) = oneshot::channel();
        self.submit(
            Request::Downstream {
                changes,
                cursor,
                snapshot,
                reply,
            },
            answer,
        )
        .await
    }

    /// Re-stamps, in one durable transaction, what this agent stamped beyond
    /// the corrected clock's bound (nothing if its clock never ran ahead);
    /// `offset_ms` is the correction just learned (0 if none).
    pub async fn restamp(&self, offset_ms: i64) -> Result<Restamped, WriteError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Request::Restamp { offset_ms, reply }, answer)
            .await
    }

    async fn submit<T>(
        &self,
        request: Request,
        answer: oneshot::Receiver<Result<T, Arc<StoreError>>>,
    ) -> Result<T, WriteError> {
        self.tx
            .send(request)
            .await
            .map_err(|_| WriteError::Closed)?;
        Ok(answer.await.map_err(|_| WriteError::Closed)??)
    }
}

struct Committer {
    setup: WriterSetup,
    hlc: Hlc,
    stats: Arc<CommitStats>,
    outbox_tx: watch::Sender<Seq>,
}

impl Committer {
    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut next = None;
        while let Some(first) = next.take().or_else(|| rx.blocking_recv()) {
            match first {
                Request::Downstream {
                    changes,
                    cursor,
                    snapshot,
                    reply,
                } => {
                    let result = self.downstream(&changes, cursor, snapshot);
                    if result.is_ok() {
                        self.stats
                            .downstream_commits
                            .fetch_add(1, Ordering::Relaxed);
                        self.stats
                            .downstream_changes
                            .fetch_add(changes.len() as u64, Ordering::Relaxed);
                    }
                    let _ = reply.send(result.map_err(Arc::new));
                }
                Request::Restamp { offset_ms, reply } => {
                    let result = self.restamp(offset_ms);
                    let _ = reply.send(result.map_err(Arc::new));
                }
                Request::Local { ops, reply } => {
                    let mut count = ops.len();
                    let mut batch = vec![(ops, reply)];
                    while count < MAX_OPS_PER_COMMIT {
                        match rx.try_recv() {
                            Ok(Request::Local { ops, reply }) => {
                                count += ops.len();
                                batch.push((ops, reply));
                            }
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.local(batch);
                }
            }
        }
    }

    fn local(&mut self, batch: Vec<(Vec<WriteOp>, Reply<Vec<WriteOutcome>>)>) {
        let (requests, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        self.stats
            .in_commit
            .store(replies.len() as u64, Ordering::Relaxed);
        let now = self.setup.clock.now_ms();
        let s = &self.setup;
        let started = std::time::Instant::now();
        let result = s
            .store
            .commit_writes(&requests, &mut self.hlc, &s.origin, &s.policy, now);
        let took = started.elapsed();
        self.stats.in_commit.store(0, Ordering::Relaxed);
        match result {
            Ok((outcomes, outbox_last)) => {
                let writes: usize = requests.iter().map(Vec::len).sum();
                let stats = &self.stats;
                stats.commits.fetch_add(1, Ordering::Relaxed);
                stats
                    .requests
                    .fetch_add(replies.len() as u64, Ordering::Relaxed);
                stats.writes.fetch_add(writes as u64, Ordering::Relaxed);
                stats.commit_seconds.observe(took.as_secs_f64());
                stats.batch_changes.observe(writes as f64);
                self.outbox_tx.send_replace(outbox_last);
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    // A caller that went away no longer needs the answer; its
                    // write is committed all the same.
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, requests = replies.len(), "group commit failed");
                let e = Arc::new(e);
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// Remote stamps advance the clock unless they are beyond the drift bound;
    /// such a change is still applied (dropping it would lose the write for
    /// good), but it does not drag this replica's clock into the future.
    fn downstream(
        &mut self,
        changes: &[Change],
        cursor: Option<Cursor>,
        snapshot: bool,
    ) -> Result<usize, StoreError> {
        let now = self.setup.clock.now_ms();
        for change in changes {
            if let Some(v) = change.state.max_version() {
                if let Err(e) = self.hlc.observe(v.stamp, now) {
                    tracing::warn!(collection = %change.collection, error = %e, "hub clock ahead of ours");
                }
            }
        }
        self.setup
            .store
            .apply_downstream(changes, cursor, snapshot, &self.hlc, now)
    }

    fn restamp(&mut self, offset: i64) -> Result<Restamped, StoreError> {
        let now = self.setup.clock.now_ms();
        let limit = clock::limit_ms(now, self.setup.max_drift_ms);
        if !clock::needs_restamp(self.hlc.last(), limit) {
            return Ok(Restamped::default());
        }
        let mut hlc = self.hlc.clone();
        let done = self
            .setup
            .store
            .restamp(&self.setup.origin, limit, now, offset, &mut hlc)?;
        // Only a committed re-stamp lowers the clock.
        self.hlc = hlc;
        Ok(done)
    }
}
