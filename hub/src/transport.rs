//! The hub's transport seam: how agent traffic reaches the sync engine and how
//! the engine answers, with nothing broker- or socket-specific in it.
//!
//! - **Inbound** is one ordered stream of [`Inbound`] events — a connection of
//!   an authenticated agent, each message it published on its upstream topic,
//!   its end — that a transport produces through an [`InletSender`] and the
//!   engine consumes from the matching [`Inlet`]. Per connection, events
//!   arrive in the order the transport sent them: `Connected`, its messages,
//!   `Disconnected`.
//! - **Outbound** is the [`Outlet`] each `Connected` event carries: a handle
//!   that queues one message for that connection without ever waiting.
//!
//! The inlet is bounded twice: in events and in message bytes (every queued
//! message holds a [`Credit`] of its size until the engine drops it), so a
//! transport that produces faster than the engine commits waits instead of
//! growing memory. The front door ([`crate::front_door`]) is the embedded
//! transport; an in-memory one drives the engine in the crate tests.

use std::sync::Arc;

use bytes::Bytes;
use fieldsync_shared::AgentId;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// A connection's number, unique for the life of the process.
pub type ConnId = u64;

/// Events in the inlet at most (each connection's control events included).
pub const INLET_EVENTS: usize = 4096;
/// Message bytes in the inlet at most: with the engine's group of at most
/// 8 MiB being decoded, what upstream traffic can hold in the hub.
pub const INLET_BYTES: usize = 32 << 20;

/// What a transport tells the engine.
#[derive(Debug)]
pub enum Inbound {
    /// An agent's connection was authenticated; `outlet` sends to it.
    Connected {
        agent: AgentId,
        conn: ConnId,
        outlet: Arc<dyn Outlet>,
    },
    /// One message the agent published on its upstream topic.
    Message {
        agent: AgentId,
        conn: ConnId,
        payload: Bytes,
        /// Held until the engine is done with the message.
        credit: Credit,
    },
    /// The connection ended. `replaced`: because a newer connection of the
    /// same agent took over (its `Connected` may come before or after this).
    Disconnected {
        agent: AgentId,
        conn: ConnId,
        replaced: bool,
    },
}

/// Why [`Outlet::send`] did not queue a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The connection's outbound queue is at its bound: the peer does not
    /// read. The caller closes the connection; the protocol resends.
    #[error("the connection's outbound queue is full")]
    Full,
    /// The connection is gone.
    #[error("the connection is closed")]
    Closed,
}

/// The engine's handle on one connection.
pub trait Outlet: Send + Sync + std::fmt::Debug {
    /// Queues one message (an encoded envelope) for the connection. Never
    /// waits: a full queue is an error, not backpressure on the engine.
    fn send(&self, payload: Bytes) -> Result<(), SendError>;
    /// Closes the connection; the transport then reports `Disconnected`.
    fn close(&self);
}

/// Bytes of the inlet's budget held by one queued message.
#[derive(Debug)]
pub struct Credit {
    /// Returned to the budgets when dropped: the inlet's bytes, the
    /// connection's share in messages and in bytes.
    _held: Vec<OwnedSemaphorePermit>,
}

impl Credit {
    /// A credit that holds nothing (for transports without a byte budget).
    pub fn none() -> Self {
        Self { _held: Vec::new() }
    }
}

/// One connection's share of the inlet: what it may have queued at once, in
/// messages and in bytes. A connection over its share waits for the engine
/// to take its own messages; other connections' messages go on.
#[derive(Debug, Clone)]
pub struct InletShare {
    messages: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_bytes: usize,
}

impl InletShare {
    pub fn new(messages: usize, bytes: usize) -> Self {
        let bytes = bytes.clamp(1, u32::MAX as usize);
        Self {
            messages: Arc::new(Semaphore::new(messages.max(1))),
            bytes: Arc::new(Semaphore::new(bytes)),
            max_bytes: bytes,
        }
    }
}

/// The engine's end of the inlet.
#[derive(Debug)]
pub struct Inlet {
    rx: mpsc::Receiver<Inbound>,
}

impl Inlet {
    /// The next event; `None` once every sender is gone.
    pub async fn recv(&mut self) -> Option<Inbound> {
        self.rx.recv().await
    }

    /// The next event if one is queued now.
    pub fn try_recv(&mut self) -> Option<Inbound> {
        self.rx.try_recv().ok()
    }
}

/// A transport's end of the inlet (cheap to clone, one per connection task).
#[derive(Debug, Clone)]
pub struct InletSender {
    tx: mpsc::Sender<Inbound>,
    bytes: Arc<Semaphore>,
    max_credit: usize,
}

/// The engine is gone (the hub is stopping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the sync engine is not running")]
pub struct EngineGone;

/// An inlet bounded to `events` events and `bytes` queued message bytes.
pub fn inlet(events: usize, bytes: usize) -> (InletSender, Inlet) {
    let (tx, rx) = mpsc::channel(events.max(1));
    let bytes = bytes.clamp(1, Semaphore::MAX_PERMITS);
    let sender = InletSender {
        tx,
        bytes: Arc::new(Semaphore::new(bytes)),
        max_credit: bytes,
    };
    (sender, Inlet { rx })
}

impl InletSender {
    /// Announces an authenticated connection.
    pub async fn connected(
        &self,
        agent: AgentId,
        conn: ConnId,
        outlet: Arc<dyn Outlet>,
    ) -> Result<(), EngineGone> {
        self.send(Inbound::Connected {
            agent,
            conn,
            outlet,
        })
        .await
    }

    /// Queues one message, waiting while its connection's `share` or the
    /// inlet is at its bounds (the share first, so a connection waiting on
    /// itself holds none of the inlet's budget meanwhile).
    pub async fn message(
        &self,
        agent: AgentId,
        conn: ConnId,
        payload: Bytes,
        share: &InletShare,
    ) -> Result<(), EngineGone> {
        let take = |sem: &Arc<Semaphore>, n: usize, max: usize| {
            // A message larger than a whole budget takes all of it.
            let n = u32::try_from(n.clamp(1, max)).unwrap_or(u32::MAX);
            sem.clone().acquire_many_owned(n)
        };
        let len = payload.len();
        let held = vec![
            take(&share.messages, 1, 1).await.map_err(|_| EngineGone)?,
            take(&share.bytes, len, share.max_bytes)
                .await
                .map_err(|_| EngineGone)?,
            take(&self.bytes, len, self.max_credit)
                .await
                .map_err(|_| EngineGone)?,
        ];
        self.send(Inbound::Message {
            agent,
            conn,
            payload,
            credit: Credit { _held: held },
        })
        .await
    }

    /// Announces the end of a connection.
    pub async fn disconnected(
        &self,
        agent: AgentId,
        conn: ConnId,
        replaced: bool,
    ) -> Result<(), EngineGone> {
        self.send(Inbound::Disconnected {
            agent,
            conn,
            replaced,
        })
        .await
    }

    /// Sends any event as is (the in-memory transport of the crate tests).
    pub async fn send(&self, event: Inbound) -> Result<(), EngineGone> {
        self.tx.send(event).await.map_err(|_| EngineGone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str) -> AgentId {
        AgentId::new(id).unwrap()
    }

    #[tokio::test]
    async fn a_connection_over_its_share_waits_alone() {
        let (tx, mut rx) = inlet(16, 1 << 20);
        let (a, b) = (InletShare::new(2, 1 << 20), InletShare::new(2, 1 << 20));
        let msg = || Bytes::from_static(b"m");
        tx.message(agent("a"), 1, msg(), &a).await.unwrap();
        tx.message(agent("a"), 1, msg(), &a).await.unwrap();
        // A third from `a` waits for the engine to take one of its own...
        let third = tx.message(agent("a"), 1, msg(), &a);
        let mut third = std::pin::pin!(third);
        assert!(
            futures_poll(&mut third).is_none(),
            "a third message is queued"
        );
        // ...while `b` is not held up by it.
        tx.message(agent("b"), 2, msg(), &b).await.unwrap();
        let first = rx.recv().await.unwrap();
        drop(first);
        third.await.unwrap();
        let mut from = Vec::new();
        while let Some(Inbound::Message { agent, .. }) = rx.try_recv() {
            from.push(agent.as_str().to_owned());
        }
        assert_eq!(from, ["a", "b", "a"]);
    }

    #[tokio::test]
    async fn the_inlet_bounds_bytes_across_connections() {
        let (tx, mut rx) = inlet(16, 10);
        let (a, b) = (InletShare::new(8, 1 << 20), InletShare::new(8, 1 << 20));
        tx.message(agent("a"), 1, Bytes::from(vec![0; 8]), &a)
            .await
            .unwrap();
        let more = tx.message(agent("b"), 2, Bytes::from(vec![0; 8]), &b);
        let mut more = std::pin::pin!(more);
        assert!(futures_poll(&mut more).is_none(), "over the inlet's bytes");
        drop(rx.recv().await.unwrap());
        more.await.unwrap();
    }

    /// Polls a future once without a waker that does anything.
    fn futures_poll<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        match std::pin::Pin::new(f).poll(&mut std::task::Context::from_waker(waker)) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }
}
