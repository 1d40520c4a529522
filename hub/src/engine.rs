//! The hub's sync engine: one task that talks to the embedded broker through
//! its in-process link. It applies agents' upstream batches (policy-checked,
//! committed with the watermark, then acknowledged) and feeds each connected
//! agent its durable downstream queue, using the shared sans-IO session types.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use fieldsync_shared::codec;
use fieldsync_shared::hlc::system_now_ms;
use fieldsync_shared::session::{Plan, Receiver, Sender};
use fieldsync_shared::wire::{
    down_topic, parse_topic, Ack, Batch, Entry, Envelope, ErrorCode, ErrorMsg, Message, Welcome,
    MAX_MESSAGE_BYTES,
};
use fieldsync_shared::{AgentId, Change, Flow, Hlc, Origin, Policy, Seq};
use rumqttd::Notification;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::broker::EngineLink;
use crate::metrics::Metrics;
use crate::store::{HubStore, StoreError, Upstream};

/// Most sequence numbers in flight to one agent.
pub const DOWN_WINDOW: u64 = 4096;
/// Most entries in one downstream batch (fewer if the bytes would not fit).
pub const DOWN_BATCH: u64 = 512;
/// Without an acknowledgement for this long, unacknowledged entries are resent.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Most upstream changes committed in one transaction (group commit).
const GROUP_CHANGES: usize = 8192;
/// Most messages taken from the broker before a group is committed.
const GROUP_MESSAGES: usize = 256;
/// Most message bytes (as received, CBOR) in one group: bounds the engine's
/// memory to a small multiple of this once decoded.
const GROUP_BYTES: usize = 8 << 20;

/// What the front door and the operator API tell the engine.
#[derive(Debug)]
pub enum EngineEvent {
    Connected {
        agent: AgentId,
        conn: u64,
    },
    Disconnected {
        agent: AgentId,
        conn: u64,
    },
    /// An operator write was queued for `agent` up to `last`.
    Enqueued {
        agent: AgentId,
        last: Seq,
    },
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("store task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("broker link: {0}")]
    Link(String),
}

/// One agent's live session.
struct AgentSession {
    /// The front door's connection number, while connected.
    conn: Option<u64>,
    /// Set by the agent's hello on the current connection.
    down: Option<Sender>,
    /// Loaded from the store at this connection's hello.
    up: Option<Receiver>,
    last_progress: Instant,
}

/// The engine's shared parts.
pub struct Engine<S: HubStore> {
    pub store: Arc<S>,
    pub policy: Arc<Policy>,
    pub hlc: Arc<Mutex<Hlc>>,
    pub metrics: Arc<Metrics>,
}

impl<S: HubStore> Engine<S> {
    /// Runs until `shutdown`.
    pub async fn run(
        self,
        mut link: EngineLink,
        mut events: mpsc::UnboundedReceiver<EngineEvent>,
        shutdown: CancellationToken,
    ) -> Result<(), EngineError> {
        link.tx
            .subscribe("fieldsync/v1/agents/+/up")
            .map_err(|e| EngineError::Link(e.to_string()))?;
        let mut sessions: HashMap<AgentId, AgentSession> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            // Biased: a connection's Connected event is always handled before
            // the messages that connection sends.
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                e = events.recv() => {
                    let Some(e) = e else { return Ok(()) };
                    self.on_event(&mut sessions, e);
                }
                // Before the link, so that a steady stream of messages cannot
                // starve the resend timer.
                _ = tick.tick() => self.on_tick(&mut sessions),
                n = link.rx.next() => {
                    // Group commit: take what the broker already holds (pending
                    // connection events first, as above), apply every upstream
                    // batch in one transaction, then send what waited for it.
                    let mut group = Group::default();
                    let mut next = Some(n);
                    while let Some(n) = next.take() {
                        let n = n.map_err(|e| EngineError::Link(e.to_string()))?;
                        self.on_notification(&mut link, &mut sessions, &mut group, n).await?;
                        if group.changes >= GROUP_CHANGES
                            || group.messages >= GROUP_MESSAGES
                            || group.bytes >= GROUP_BYTES
                        {
                            break;
                        }
                        while let Ok(e) = events.try_recv() {
                            self.on_event(&mut sessions, e);
                        }
                        next = ready_now(link.rx.next());
                    }
                    self.flush(&mut link, &mut group).await?;
                }
            }
            self.pump(&mut link, &mut sessions).await?;
        }
    }

    async fn on_notification(
        &self,
        link: &mut EngineLink,
        sessions: &mut HashMap<AgentId, AgentSession>,
        group: &mut Group,
        notification: Option<Notification>,
    ) -> Result<(), EngineError> {
        match notification {
            Some(Notification::Forward(f)) => {
                group.messages += 1;
                group.bytes += f.publish.payload.len();
                let topic = String::from_utf8_lossy(&f.publish.topic).into_owned();
                self.on_publish(link, sessions, group, &topic, &f.publish.payload)
                    .await
            }
            Some(Notification::Unschedule) => link
                .rx
                .ready()
                .map_err(|e| EngineError::Link(e.to_string())),
            _ => Ok(()),
        }
    }

    /// Commits the group's upstream batches in one durable transaction, then
    /// sends the messages that waited for it, in the order they were made.
    async fn flush(&self, link: &mut EngineLink, group: &mut Group) -> Result<(), EngineError> {
        if !group.upstream.is_empty() {
            let upstream = std::mem::take(&mut group.upstream);
            let batches = upstream.len() as u64;
            let changes = self
                .blocking(move |s| {
                    s.apply_upstream_group(&upstream, system_now_ms())?;
                    Ok(upstream.iter().map(|u| u.changes.len() as u64).sum())
                })
                .await?;
            Metrics::add(&self.metrics.upstream_batches_applied, batches);
            Metrics::add(&self.metrics.upstream_changes_applied, changes);
        }
        for (agent, msg) in group.out.drain(..) {
            send(link, &agent, msg)?;
        }
        // What bounds memory starts over; `messages` keeps bounding how long
        // the group runs before the downstream pump gets its turn.
        group.changes = 0;
        group.bytes = 0;
        Ok(())
    }

    fn on_event(&self, sessions: &mut HashMap<AgentId, AgentSession>, event: EngineEvent) {
        match event {
            EngineEvent::Connected { agent, conn } => {
                let s = sessions.entry(agent).or_insert_with(|| AgentSession {
                    conn: None,
                    down: None,
                    up: None,
                    last_progress: Instant::now(),
                });
                s.conn = Some(conn);
                // Nothing flows until this connection's hello.
                s.down = None;
                s.up = None;
            }
            EngineEvent::Disconnected { agent, conn } => {
                if let Some(s) = sessions.get_mut(&agent) {
                    if s.conn == Some(conn) {
                        s.conn = None;
                        s.down = None;
                        s.up = None;
                    }
                }
            }
            EngineEvent::Enqueued { agent, last } => {
                if let Some(sender) = sessions.get_mut(&agent).and_then(|s| s.down.as_mut()) {
                    sender.appended(last);
                }
            }
        }
    }

    /// Go-back-N: an agent that acknowledged nothing for [`ACK_TIMEOUT`] while
    /// entries were in flight gets them again.
    fn on_tick(&self, sessions: &mut HashMap<AgentId, AgentSession>) {
        for s in sessions.values_mut() {
            if let Some(sender) = s.down.as_mut() {
                if sender.in_flight() > 0 && s.last_progress.elapsed() >= ACK_TIMEOUT {
                    sender.rewind();
                    s.last_progress = Instant::now();
                    Metrics::inc(&self.metrics.downstream_resends);
                }
            }
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&S) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, EngineError> {
        let store = self.store.clone();
        Ok(tokio::task::spawn_blocking(move || f(&store)).await??)
    }

    async fn on_publish(
        &self,
        link: &mut EngineLink,
        sessions: &mut HashMap<AgentId, AgentSession>,
        group: &mut Group,
        topic: &str,
        payload: &[u8],
    ) -> Result<(), EngineError> {
        let Some((agent, Flow::Up)) = parse_topic(topic) else {
            return Ok(());
        };
        let envelope = match codec::decode(payload) {
            Ok(e) => e,
            Err(e) => {
                Metrics::inc(&self.metrics.envelopes_rejected);
                tracing::warn!(%agent, error = %e, "undecodable message");
                let code = match e {
                    codec::CodecError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
                    codec::CodecError::TooLarge { .. } => ErrorCode::TooLarge,
                    _ => ErrorCode::Malformed,
                };
                return group.reply(
                    &agent,
                    Message::Error(ErrorMsg {
                        code,
                        message: e.to_string(),
                    }),
                );
            }
        };
        let Some(session) = sessions.get_mut(&agent) else {
            // The front door announces every connection before its messages;
            // without that the agent must start over.
            return group.reply(
                &agent,
                error(ErrorCode::HelloFirst, "no session: say hello"),
            );
        };
        match envelope.msg {
            Message::Hello(hello) => {
                if hello.agent != agent {
                    Metrics::inc(&self.metrics.envelopes_rejected);
                    return group.reply(
                        &agent,
                        error(ErrorCode::Malformed, "hello names another agent"),
                    );
                }
                // The welcome names what the store holds, so this agent's
                // batches planned in this group must be committed first.
                if group.upstream.iter().any(|u| u.agent == agent) {
                    self.flush(link, group).await?;
                }
                let a = agent.clone();
                let row = self.blocking(move |s| s.touch(&a, system_now_ms())).await?;
                session.up = Some(Receiver::new(row.up_applied));
                let mut sender = Sender::new(row.down_acked, row.down_last, DOWN_WINDOW);
                match sender.connected(hello.down_applied) {
                    Ok(Some(upto)) => {
                        let a = agent.clone();
                        self.blocking(move |s| s.ack_downstream(&a, upto)).await?;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(%agent, error = %e, "agent reports downstream entries the hub never queued");
                        return group.reply(&agent, error(ErrorCode::SequenceGap, &e.to_string()));
                    }
                }
                session.down = Some(sender);
                session.last_progress = Instant::now();
                group.reply(
                    &agent,
                    Message::Welcome(Welcome {
                        up_applied: row.up_applied,
                    }),
                )
            }
            Message::Batch(batch) => self.on_batch(group, &agent, session, batch),
            Message::Ack(Ack { upto }) => {
                let Some(sender) = session.down.as_mut() else {
                    return group.reply(&agent, error(ErrorCode::HelloFirst, "ack before hello"));
                };
                match sender.acked(upto) {
                    Ok(Some(upto)) => {
                        session.last_progress = Instant::now();
                        let a = agent.clone();
                        self.blocking(move |s| s.ack_downstream(&a, upto)).await?;
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(%agent, error = %e, "bad downstream ack"),
                }
                Ok(())
            }
            Message::Error(e) => {
                tracing::warn!(%agent, code = ?e.code, message = %e.message, "agent reported an error");
                Ok(())
            }
            Message::Welcome(_) => group.reply(
                &agent,
                error(ErrorCode::Malformed, "welcome is hub-to-agent only"),
            ),
        }
    }

    /// Plans `batch` into the group: it is committed with the group and
    /// acknowledged after that. The receiver advances at once so that the
    /// agent's next batch in the same group follows on; a failed commit stops
    /// the engine, so no acknowledgement can run ahead of the store.
    fn on_batch(
        &self,
        group: &mut Group,
        agent: &AgentId,
        session: &mut AgentSession,
        batch: Batch,
    ) -> Result<(), EngineError> {
        // A batch before this connection's hello is not applied; the agent is
        // told to say hello, and resends after the welcome.
        let Some(up) = session.up.as_mut() else {
            return group.reply(agent, error(ErrorCode::HelloFirst, "batch before hello"));
        };
        let (entries, watermark) = match up.plan(&batch) {
            Ok(Plan::Apply { entries, watermark }) => (entries, watermark),
            Ok(Plan::Duplicate { watermark }) => {
                Metrics::inc(&self.metrics.upstream_duplicates);
                return group.reply(agent, Message::Ack(Ack { upto: watermark }));
            }
            Err(e) => {
                tracing::debug!(%agent, error = %e, "upstream gap");
                return group.reply(agent, error(ErrorCode::SequenceGap, &e.to_string()));
            }
        };
        let changes = self.admit_upstream(agent, entries);
        up.committed(watermark);
        group.changes += changes.len();
        group.upstream.push(Upstream {
            agent: agent.clone(),
            changes,
            watermark,
        });
        group.reply(agent, Message::Ack(Ack { upto: watermark }))
    }

    /// The hub's own policy check (defence in depth): fields it does not permit
    /// upstream are dropped, counted and logged by name, never by value. Remote
    /// stamps advance the hub clock unless they are beyond the drift bound.
    fn admit_upstream(&self, agent: &AgentId, entries: &[Entry]) -> Vec<Change> {
        let now = system_now_ms();
        let own = Origin::agent(agent);
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            // An agent sends only its own writes; a change claiming another
            // origin (another agent, or the hub) is refused whole.
            let state = &entry.change.state;
            let forged = state
                .fields
                .values()
                .map(|f| &f.version)
                .chain(state.deleted.as_ref())
                .any(|v| v.origin != own);
            if forged {
                Metrics::inc(&self.metrics.forged_origin_changes);
                tracing::warn!(%agent, collection = %entry.change.collection, "dropped a change stamped with another origin");
                continue;
            }
            let filtered = self.policy.filter(Flow::Up, &entry.change);
            if !filtered.denied.is_empty() || filtered.collection_denied {
                Metrics::add(
                    &self.metrics.policy_denied_fields,
                    filtered.denied.len() as u64,
                );
                let fields: Vec<&str> = filtered.denied.iter().map(|f| f.as_str()).collect();
                tracing::warn!(
                    %agent,
                    collection = %entry.change.collection,
                    ?fields,
                    whole_collection = filtered.collection_denied,
                    "dropped fields the hub policy does not permit upstream"
                );
            }
            if let Some(change) = filtered.permitted {
                if let Some(v) = change.state.max_version() {
                    let observed = self.hlc.lock().map(|mut h| h.observe(v.stamp, now));
                    if let Ok(Err(e)) = observed {
                        Metrics::inc(&self.metrics.clock_drift_rejected);
                        tracing::warn!(%agent, error = %e, "agent clock ahead of the hub");
                    }
                }
                out.push(change);
            }
        }
        out
    }

    /// Sends whatever each connected agent's window allows.
    async fn pump(
        &self,
        link: &mut EngineLink,
        sessions: &mut HashMap<AgentId, AgentSession>,
    ) -> Result<(), EngineError> {
        for (agent, session) in sessions.iter_mut() {
            let Some(sender) = session.down.as_mut() else {
                continue;
            };
            while let Some((first, last)) = sender.next_range(DOWN_BATCH) {
                let a = agent.clone();
                let limit = (last.0 - first.0 + 1) as usize;
                let entries = self
                    .blocking(move |s| s.downstream(&a, first, limit, MAX_MESSAGE_BYTES))
                    .await?;
                if entries.first().map(|(seq, _)| *seq) != Some(first) {
                    tracing::error!(%agent, %first, "downstream queue is missing entries; not sending");
                    break;
                }
                let batch = Batch::fit(first, entries);
                let sent_upto = batch.last;
                send(link, agent, Message::Batch(batch))?;
                if sender.in_flight() == 0 {
                    session.last_progress = Instant::now();
                }
                sender.sent(sent_upto);
                Metrics::inc(&self.metrics.downstream_batches_sent);
            }
        }
        Ok(())
    }
}

/// Upstream batches planned but not yet committed, and the messages (acks,
/// welcomes, errors) that leave only after the commit, in order.
#[derive(Default)]
struct Group {
    upstream: Vec<Upstream>,
    out: Vec<(AgentId, Message)>,
    changes: usize,
    messages: usize,
    bytes: usize,
}

impl Group {
    fn reply(&mut self, agent: &AgentId, msg: Message) -> Result<(), EngineError> {
        self.out.push((agent.clone(), msg));
        Ok(())
    }
}

/// Polls `future` once: its output if it is ready now, `None` if it would wait.
/// (Dropping a pending `LinkRx::next` loses nothing: the broker's signal stays
/// queued for the next call.)
fn ready_now<F: Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => Some(output),
        Poll::Pending => None,
    }
}

fn error(code: ErrorCode, message: &str) -> Message {
    Message::Error(ErrorMsg {
        code,
        message: message.to_owned(),
    })
}

fn send(link: &mut EngineLink, agent: &AgentId, msg: Message) -> Result<(), EngineError> {
    let bytes = match codec::encode(&Envelope::new(msg)) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(%agent, error = %e, "cannot encode a message for the agent");
            return Ok(());
        }
    };
    link.tx
        .publish(down_topic(agent), bytes)
        .map(|_| ())
        .map_err(|e| EngineError::Link(e.to_string()))
}
