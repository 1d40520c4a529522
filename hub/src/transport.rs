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
    /// Returned to the budget when dropped.
    _held: Option<OwnedSemaphorePermit>,
}

impl Credit {
    /// A credit that holds nothing (for transports without a byte budget).
    pub fn none() -> Self {
        Self { _held: None }
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

    /// Queues one message, waiting while the inlet is at its bounds.
    pub async fn message(
        &self,
        agent: AgentId,
        conn: ConnId,
        payload: Bytes,
    ) -> Result<(), EngineGone> {
        // A message larger than the whole budget takes all of it.
        let size = payload.len().clamp(1, self.max_credit);
        let permit = self
            .bytes
            .clone()
            .acquire_many_owned(u32::try_from(size).unwrap_or(u32::MAX))
            .await
            .map_err(|_| EngineGone)?;
        self.send(Inbound::Message {
            agent,
            conn,
            payload,
            credit: Credit {
                _held: Some(permit),
            },
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
