//! The group committer: the one thread that writes to the store. Concurrent
//! callers hand it their writes; it takes every request that is waiting (up to a
//! bound), commits them all in one durable transaction, then answers each caller.
//! One fsync serves many writes, so throughput does not stop at the disk's fsync
//! rate, and no caller hears "done" before its write is durable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use fieldsync_shared::{hlc, Hlc, Origin, Policy};
use tokio::sync::{mpsc, oneshot};

use crate::store::{Store, StoreError, WriteOp, WriteOutcome};

/// Most operations committed in one transaction.
pub const MAX_OPS_PER_COMMIT: usize = 4096;
/// Requests that may wait for the committer before callers are held back.
const QUEUE_DEPTH: usize = 4096;

/// Source of wall-clock time in milliseconds since the Unix epoch.
pub type WallClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock as a [`WallClock`].
pub fn system_clock() -> WallClock {
    Arc::new(hlc::system_now_ms)
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    #[error(transparent)]
    Store(#[from] Arc<StoreError>),
    #[error("the store is shutting down")]
    Closed,
}

struct Request {
    ops: Vec<WriteOp>,
    reply: oneshot::Sender<Result<Vec<WriteOutcome>, Arc<StoreError>>>,
}

/// Handle for submitting writes. Cheap to clone.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Request>,
    stats: Arc<CommitStats>,
}

/// Counters kept by the committer.
#[derive(Debug, Default)]
pub struct CommitStats {
    /// Transactions committed.
    pub commits: AtomicU64,
    /// Write requests answered by those commits.
    pub requests: AtomicU64,
    /// Requests in the transaction being committed right now.
    pub in_commit: AtomicU64,
}

/// Settings of the committer thread.
pub struct WriterSetup {
    pub store: Store,
    pub policy: Arc<Policy>,
    pub origin: Origin,
    pub clock: WallClock,
    pub max_drift_ms: u64,
}

impl Writer {
    /// Starts the committer thread. It exits once every [`Writer`] clone is dropped
    /// and the queue is drained; join the returned handle to wait for that.
    pub fn start(setup: WriterSetup) -> Result<(Self, thread::JoinHandle<()>), StoreError> {
        let hlc = Hlc::restore(setup.store.hlc_last()?, setup.max_drift_ms);
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let stats = Arc::new(CommitStats::default());
        let thread_stats = stats.clone();
        let handle = thread::Builder::new()
            .name("fieldsync-writer".into())
            .spawn(move || commit_loop(setup, hlc, rx, &thread_stats))
            .map_err(|e| StoreError::Storage(redb::Error::Io(e)))?;
        Ok((Self { tx, stats }, handle))
    }

    /// The committer's counters.
    pub fn stats(&self) -> &CommitStats {
        &self.stats
    }

    /// Requests waiting for the committer right now.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Commits `ops` atomically (together with whatever else is waiting) and
    /// returns their outcomes once the commit is durable.
    pub async fn write(&self, ops: Vec<WriteOp>) -> Result<Vec<WriteOutcome>, WriteError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Request { ops, reply })
            .await
            .map_err(|_| WriteError::Closed)?;
        Ok(answer.await.map_err(|_| WriteError::Closed)??)
    }
}

fn commit_loop(
    setup: WriterSetup,
    mut hlc: Hlc,
    mut rx: mpsc::Receiver<Request>,
    stats: &CommitStats,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut ops = first.ops.len();
        let mut batch = vec![first];
        while ops < MAX_OPS_PER_COMMIT {
            match rx.try_recv() {
                Ok(req) => {
                    ops += req.ops.len();
                    batch.push(req);
                }
                Err(_) => break,
            }
        }
        let (requests, replies): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|r| (r.ops, r.reply)).unzip();
        stats
            .in_commit
            .store(replies.len() as u64, Ordering::Relaxed);
        let now = (setup.clock)();
        let result =
            setup
                .store
                .commit_writes(&requests, &mut hlc, &setup.origin, &setup.policy, now);
        stats.in_commit.store(0, Ordering::Relaxed);
        match result {
            Ok(outcomes) => {
                stats.commits.fetch_add(1, Ordering::Relaxed);
                stats
                    .requests
                    .fetch_add(replies.len() as u64, Ordering::Relaxed);
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
}
