//! The agent's link to the hub: rumqttc over mutual TLS (rustls, ring), with
//! reconnects under exponential backoff and jitter. It is a thin driver of the
//! shared sans-IO [`Session`]: it feeds it MQTT events, messages and ticks,
//! and executes what it asks — publish, load outbox entries or a snapshot
//! chunk, commit downstream changes through the writer, trim the outbox,
//! correct the clock. Every protocol rule is in `fieldsync_shared::session`.
//!
//! **Architecture invariant:** outbox entries are deleted only after the hub
//! acknowledged them (the hub acknowledges after its commit); downstream
//! changes are merged and the cursor advanced in one transaction before the
//! agent acknowledges.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fieldsync_shared::codec;
use fieldsync_shared::session::{self, Action, Now, OutboxHealth, Report, Session, SessionConfig};
use fieldsync_shared::tls::{client_config, TlsError};
use fieldsync_shared::wire::{
    down_topic, up_topic, Envelope, ErrorCode, Message, MAX_MESSAGE_BYTES,
};
use fieldsync_shared::{schema, AgentId, Change, Flow, Mark, Policy, Seq};
use rand::Rng;
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, MqttOptions, NetworkOptions, Packet, QoS,
    TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::HubConfig;
use crate::store::{Store, StoreError};
use crate::writer::{CorrectedClock, WriteError, Writer};

/// Reconnect backoff: first and largest delay.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Largest MQTT packet: one envelope plus topic and headers.
const MAX_PACKET_BYTES: usize = MAX_MESSAGE_BYTES + 1024;
/// How often the session's timers are checked.
const TICK: Duration = Duration::from_millis(250);
/// Most records in one snapshot part (fewer if the bytes would not fit).
const SNAPSHOT_RECORDS: usize = 512;
/// Outbox reads of at most this many entries run on the link's own task.
const INLINE_READ: usize = 64;
/// Longest peer-supplied text put in a log line.
const MAX_LOGGED_CHARS: usize = 200;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    #[error("hub TLS files (hub.ca / hub.cert / hub.key): {0}")]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("store task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The hub refused this store's identity: another device uses this
    /// agent's certificate (or this store was replaced and came back).
    #[error("the hub refused this agent's store identity (identity conflict)")]
    IdentityRefused,
    /// The session starts over from the store (after a clock re-stamp).
    #[error("the link starts over from the store")]
    Restart,
}

/// What the link shows in `GET /v1/status` and `GET /metrics`.
#[derive(Debug, Default)]
pub struct LinkStatus {
    /// The hub welcomed this agent on a live connection.
    pub connected: AtomicBool,
    /// The highest outbox position the hub acknowledged on this run (the
    /// store's trim point follows it).
    pub acked_seq: AtomicU64,
    /// A resync by snapshot is running (either way).
    pub resyncing: AtomicBool,
    /// Resyncs this agent sent to the hub (snapshots of its upstream state).
    pub resyncs_sent: AtomicU64,
    /// Batches the hub refused because their stamps were ahead of its clock.
    pub clock_refused: AtomicU64,
    /// The hub refused this store's identity (cloned certificate).
    pub identity_refused: AtomicBool,
    /// The hub refused the link: this agent's merge rules are not the hub's.
    pub rules_refused: AtomicBool,
    /// Changes the hub applied without field values that break its schema
    /// (one per change it reported).
    pub schema_refused: AtomicU64,
    /// Downstream field values this agent refused for breaking its schema.
    pub schema_refused_down: AtomicU64,
    /// Upstream batches published to the hub (resends included).
    pub batches_sent: AtomicU64,
    /// Moves whenever the hub acknowledges outbox entries or a downstream
    /// batch is applied, for `GET /v1/progress` waiters.
    pub progress: watch::Sender<u64>,
}

impl LinkStatus {
    /// Wakes `GET /v1/progress` waiters.
    pub fn progressed(&self) {
        self.progress.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// What the link needs.
#[derive(Clone)]
pub struct LinkSetup {
    pub hub: HubConfig,
    pub agent: AgentId,
    pub store: Store,
    pub writer: Writer,
    pub policy: Arc<Policy>,
    pub clock: CorrectedClock,
    pub status: Arc<LinkStatus>,
    pub session: SessionConfig,
}

/// Prepared link: TLS loaded and checked, ready to run.
pub struct Link {
    setup: LinkSetup,
    options: MqttOptions,
}

/// Loads the link's TLS files. The agent calls it before anything else, so a
/// bad certificate or key stops it at start with an error naming the key and
/// without touching the store.
pub fn load_tls(hub: &HubConfig) -> Result<Arc<rustls::ClientConfig>, LinkError> {
    Ok(client_config(&hub.ca, &hub.cert, &hub.key)?)
}

impl Link {
    /// A link with the TLS configuration from [`load_tls`].
    pub fn new(setup: LinkSetup, tls: Arc<rustls::ClientConfig>) -> Self {
        let mut options =
            MqttOptions::new(setup.agent.as_str(), setup.hub.host.clone(), setup.hub.port);
        options
            .set_transport(Transport::Tls(TlsConfiguration::Rustls(tls)))
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES)
            .set_inflight(64);
        Self { setup, options }
    }

    /// Runs until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), LinkError> {
        let (client, mut eventloop) = AsyncClient::new(self.options, 256);
        let mut network = NetworkOptions::new();
        network.set_tcp_nodelay(true);
        network.set_connection_timeout(10);
        eventloop.set_network_options(network);

        // The event loop runs in its own task so that publishing from the
        // session can never wait on itself. The session bounds what is in
        // flight (entries and bytes), so neither channel can fill while the
        // driver is busy.
        let (events_tx, mut events) = mpsc::channel::<Result<Event, String>>(1024);
        let poll_shutdown = shutdown.clone();
        let poller = tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                let polled = tokio::select! {
                    _ = poll_shutdown.cancelled() => return,
                    p = eventloop.poll() => p,
                };
                match polled {
                    Ok(event) => {
                        if matches!(event, Event::Incoming(Packet::ConnAck(_))) {
                            failures = 0;
                        }
                        // The session acts on CONNACK and incoming PUBLISH
                        // only; the rest (PUBACKs, outgoing notices) would
                        // just fill the channel while the driver is busy.
                        let wanted = matches!(
                            event,
                            Event::Incoming(Packet::ConnAck(_) | Packet::Publish(_))
                        );
                        if wanted && events_tx.send(Ok(event)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        if events_tx.send(Err(e.to_string())).await.is_err() {
                            return;
                        }
                        let delay = backoff(failures);
                        failures = failures.saturating_add(1);
                        tokio::select! {
                            _ = poll_shutdown.cancelled() => return,
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            }
        });

        let s = &self.setup;
        let bounds = s.store.outbox_bounds()?;
        let session = Session::agent(
            s.agent.clone(),
            s.store.incarnation()?,
            bounds.acked,
            bounds.last,
            s.store.down_cursor()?,
            s.session,
        );
        // Trims run beside the link, coalesced to the latest mark: the link
        // never waits for the store's write lock to send the next batch.
        let (trims, mut trim_rx) = watch::channel(None::<Mark>);
        let trim_store = s.store.clone();
        let trimmer = tokio::spawn(async move {
            while trim_rx.changed().await.is_ok() {
                let Some(mark) = *trim_rx.borrow_and_update() else {
                    continue;
                };
                let store = trim_store.clone();
                match tokio::task::spawn_blocking(move || store.trim_outbox(mark, false)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "outbox trim failed; the next welcome trims again")
                    }
                    Err(e) => tracing::warn!(error = %e, "outbox trim task failed"),
                }
            }
        });
        let mut driver = Driver {
            setup: &self.setup,
            client: &client,
            trims,
            session,
            up_topic: up_topic(&s.agent),
            down_topic: down_topic(&s.agent),
            started: Instant::now(),
            mqtt_up: false,
            reported_failure: false,
            restart: false,
        };
        let mut outbox = s.writer.outbox_last();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                e = events.recv() => match e {
                    Some(event) => driver.on_event(event).await,
                    None => break Ok(()),
                },
                changed = outbox.changed() => {
                    if changed.is_ok() {
                        driver.session.appended(*outbox.borrow_and_update());
                    }
                }
                _ = tick.tick() => {
                    let now = driver.now();
                    driver.session.on_tick(now);
                }
            };
            if let Err(e) = driver.drive().await {
                break Err(e);
            }
            if driver.session.is_refused() {
                break Err(LinkError::IdentityRefused);
            }
            if driver.restart {
                break Err(LinkError::Restart);
            }
        };
        self.setup.status.connected.store(false, Ordering::Relaxed);
        let _ = client.try_disconnect();
        poller.abort();
        // The last trim asked for is done before the link is gone.
        drop(driver);
        let _ = trimmer.await;
        result
    }
}

/// Runs the link until `shutdown`, starting it again (after a backoff) if it
/// stops on an error such as a failed store transaction, so a passing fault
/// never ends syncing while the local API keeps taking writes.
pub async fn supervise(
    setup: LinkSetup,
    tls: Arc<rustls::ClientConfig>,
    shutdown: CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        let link = Link::new(setup.clone(), tls.clone());
        match link.run(shutdown.clone()).await {
            Ok(()) => return,
            Err(LinkError::Restart) => {
                tracing::info!("hub link starts over after a clock re-stamp");
            }
            Err(LinkError::IdentityRefused) => {
                let retry = Duration::from_millis(setup.session.refused_retry_ms);
                if setup.status.rules_refused.load(Ordering::Relaxed) {
                    tracing::error!(retry_in = ?retry, rules = %setup.session.rules, "hub link stopped: the hub runs other merge rules; run one policy on both");
                } else {
                    tracing::error!(retry_in = ?retry, "hub link stopped: the hub refused this store's identity");
                    setup.status.identity_refused.store(true, Ordering::Relaxed);
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(retry) => {}
                }
            }
            Err(e) => {
                let delay = backoff(failures);
                failures = failures.saturating_add(1);
                tracing::error!(error = %e, retry_in = ?delay, "hub link stopped; restarting it");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Delay before reconnect attempt `failures + 1`: exponential with full jitter
/// (public so the bench's simulated fleet reconnects exactly as agents do).
pub fn backoff(failures: u32) -> Duration {
    let cap = BACKOFF_MIN
        .saturating_mul(1u32 << failures.min(16))
        .min(BACKOFF_MAX);
    let millis = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(millis / 2..=millis))
}

/// At most `MAX_LOGGED_CHARS` of a peer's text.
fn truncated(text: &str) -> &str {
    match text.char_indices().nth(MAX_LOGGED_CHARS) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

struct Driver<'a> {
    setup: &'a LinkSetup,
    client: &'a AsyncClient,
    /// The latest trim point, for the trimmer task.
    trims: watch::Sender<Option<Mark>>,
    session: Session,
    up_topic: String,
    down_topic: String,
    started: Instant,
    /// The MQTT connection is up (CONNACK received).
    mqtt_up: bool,
    reported_failure: bool,
    /// The session must start over from the store (after a re-stamp).
    restart: bool,
}

impl Driver<'_> {
    fn now(&self) -> Now {
        Now {
            mono_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            wall_ms: self.setup.clock.now_ms(),
        }
    }

    async fn on_event(&mut self, event: Result<Event, String>) {
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                if ack.code != ConnectReturnCode::Success {
                    tracing::error!(code = ?ack.code, "hub refused the connection");
                    return;
                }
                self.mqtt_up = true;
                self.reported_failure = false;
                let _ = self
                    .client
                    .subscribe(self.down_topic.clone(), QoS::AtLeastOnce)
                    .await;
                let now = self.now();
                self.session
                    .connected_with(now, self.setup.clock.offset_ms());
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == self.down_topic => {
                match codec::decode(&p.payload) {
                    Ok(envelope) => {
                        let now = self.now();
                        self.session.on_message(envelope.msg, now);
                    }
                    Err(e) => tracing::warn!(error = %e, "undecodable message from the hub"),
                }
            }
            Ok(_) => {}
            Err(e) => {
                if self.mqtt_up || !self.reported_failure {
                    tracing::warn!(error = %e, "hub link down; retrying with backoff");
                    self.reported_failure = true;
                }
                self.mqtt_up = false;
                self.session.disconnected();
            }
        }
    }

    /// Executes what the session asks, in order, until it asks nothing more.
    /// The session's window bounds this loop.
    async fn drive(&mut self) -> Result<(), LinkError> {
        let was_linked = self.setup.status.connected.load(Ordering::Relaxed);
        while let Some(action) = self.session.poll() {
            self.execute(action).await?;
            if self.restart {
                return Ok(());
            }
        }
        let status = &self.setup.status;
        let linked = self.session.is_linked();
        status.connected.store(linked, Ordering::Relaxed);
        status
            .resyncing
            .store(self.session.sender.resyncing(), Ordering::Relaxed);
        status
            .identity_refused
            .store(self.session.is_refused(), Ordering::Relaxed);
        if linked && !was_linked {
            tracing::info!(
                pending = self.session.sender.pending(),
                clock_offset_ms = self.setup.clock.offset_ms(),
                "linked to the hub"
            );
        }
        Ok(())
    }

    async fn execute(&mut self, action: Action) -> Result<(), LinkError> {
        let store = self.setup.store.clone();
        match action {
            Action::Send(msg) => self.publish(msg).await,
            Action::LoadBatch { first, last } => {
                let limit = usize::try_from(last.0 - first.0 + 1).unwrap_or(usize::MAX);
                let entries = if limit <= INLINE_READ {
                    // A few entries just committed: a cached read of
                    // microseconds, cheaper than a hop to the blocking pool.
                    store.outbox_batch(first, limit, MAX_MESSAGE_BYTES)?
                } else {
                    tokio::task::spawn_blocking(move || {
                        store.outbox_batch(first, limit, MAX_MESSAGE_BYTES)
                    })
                    .await??
                };
                let now = self.now();
                match self.session.batch_loaded(first, entries, now) {
                    Some(mut batch) => {
                        // The policy once more on the way out (defence in depth).
                        let policy = &self.setup.policy;
                        batch.entries.retain_mut(|e| {
                            match policy.filter(Flow::Up, &e.change).permitted {
                                Some(permitted) => {
                                    e.change = permitted;
                                    true
                                }
                                None => false,
                            }
                        });
                        self.publish(Message::Batch(batch)).await;
                        self.setup
                            .status
                            .batches_sent
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    None if self.session.is_paused() => {
                        tracing::error!(%first, "outbox is missing entries; not sending")
                    }
                    None => {}
                }
            }
            Action::Verify { seq } => {
                let found = tokio::task::spawn_blocking(move || store.outbox_entry(seq)).await??;
                self.session.verified(seq, found);
            }
            Action::LoadSnapshot { after } => {
                let (records, next) = tokio::task::spawn_blocking(move || {
                    store.records_after(after.as_ref(), SNAPSHOT_RECORDS, MAX_MESSAGE_BYTES / 2)
                })
                .await??;
                let policy = &self.setup.policy;
                let changes: Vec<Change> = records
                    .iter()
                    .filter_map(|c| policy.filter(Flow::Up, c).permitted)
                    .collect();
                let now = self.now();
                self.session.snapshot_loaded(changes, next, now);
            }
            Action::Commit {
                changes,
                cursor,
                snapshot,
                then,
            } => {
                // This agent's own policy is the authority on what it accepts.
                let mut accepted: Vec<Change> = Vec::with_capacity(changes.len());
                let mut refused = Vec::new();
                for change in &changes {
                    let filtered = self.setup.policy.filter(Flow::Down, change);
                    if !filtered.denied.is_empty() || filtered.collection_denied {
                        let fields: Vec<&str> =
                            filtered.denied.iter().map(|f| f.as_str()).collect();
                        tracing::warn!(
                            collection = %change.collection,
                            ?fields,
                            "dropped downstream fields this agent's policy does not accept"
                        );
                    }
                    let Some(change) = filtered.permitted else {
                        continue;
                    };
                    let (collection, key) = (change.collection.clone(), change.key.clone());
                    let (left, violations) = self.setup.policy.strip_invalid(change);
                    if !violations.is_empty() {
                        let fields: Vec<&str> =
                            violations.iter().map(|v| v.field.as_str()).collect();
                        tracing::warn!(
                            %collection,
                            ?fields,
                            "dropped downstream field values that break this agent's schema"
                        );
                        self.setup
                            .status
                            .schema_refused_down
                            .fetch_add(violations.len() as u64, Ordering::Relaxed);
                        refused.push(schema::refusal_detail(&collection, &key, &violations));
                    }
                    accepted.extend(left);
                }
                self.setup
                    .writer
                    .apply_downstream(accepted, cursor, snapshot)
                    .await?;
                self.setup.status.progressed();
                self.publish(then).await;
                for detail in refused {
                    self.publish(session::error(ErrorCode::SchemaRefused, &detail, None))
                        .await;
                }
            }
            Action::Trim { mark, resync } => {
                // The hub committed these: shown at once, trimmed just after.
                self.setup
                    .status
                    .acked_seq
                    .fetch_max(mark.seq.0, Ordering::Relaxed);
                self.setup.status.progressed();
                if resync {
                    tokio::task::spawn_blocking(move || store.trim_outbox(mark, true)).await??;
                } else {
                    self.trims.send_replace(Some(mark));
                }
            }
            Action::ClockOffset { offset_ms } => self.correct_clock(offset_ms).await?,
            Action::LoadHealth => {
                let stats = tokio::task::spawn_blocking(move || store.outbox_health()).await??;
                let now = self.now();
                let acked = self.setup.status.acked_seq.load(Ordering::Relaxed);
                self.session.health_loaded(
                    OutboxHealth {
                        pending: stats.pending,
                        bytes: stats.bytes,
                        oldest_pending_ms: stats
                            .oldest_wall_ms
                            .map(|at| now.wall_ms.saturating_sub(at)),
                        acked: Seq(acked.max(stats.acked.0)),
                    },
                    now,
                );
            }
            Action::ClockSkew { .. } | Action::Health(_) => {}
            Action::Report(report) => self.report(report),
        }
        Ok(())
    }

    /// The hub's clock differs from ours by `offset_ms` (on top of the
    /// correction already applied): correct the clock, keep the correction,
    /// and re-stamp what was written with the clock running ahead — also when
    /// there is no difference (the device clock may have been set right
    /// meanwhile, leaving stamps from the future). A re-stamp that changed
    /// records made the store's downstream cursor follow no hub (see
    /// `Store::restamp`): the link starts over so the hub resyncs it.
    async fn correct_clock(&mut self, offset_ms: i64) -> Result<(), LinkError> {
        if offset_ms != 0 {
            let clock = &self.setup.clock;
            let total = clock.offset_ms().saturating_add(offset_ms);
            clock.set_offset_ms(total);
            tracing::warn!(
                clock_offset_ms = total,
                "the local clock differs from the hub's; correcting it"
            );
            let store = self.setup.store.clone();
            tokio::task::spawn_blocking(move || store.set_clock_offset(total)).await??;
        }
        let done = self.setup.writer.restamp(offset_ms).await?;
        if done.entries > 0 || done.records > 0 {
            tracing::warn!(
                entries = done.entries,
                records = done.records,
                "re-stamped writes made while the clock ran ahead"
            );
        }
        if done.records > 0 {
            self.restart = true;
        }
        Ok(())
    }

    fn report(&self, report: Report) {
        let status = &self.setup.status;
        match report {
            Report::ResyncStarted { reason } => {
                status.resyncs_sent.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(?reason, "the hub cannot be brought up to date from the outbox; sending a snapshot");
            }
            Report::ResyncCompleted => {
                tracing::info!("resync from the hub complete: the downstream cursor follows the hub again")
            }
            Report::ClockRefusedByPeer { seq } => {
                status.clock_refused.fetch_add(1, Ordering::Relaxed);
                let (collection, key) = seq
                    .and_then(|s| self.setup.store.outbox_entry(s).ok().flatten())
                    .map(|c| (c.collection.to_string(), c.key.to_string()))
                    .unwrap_or_default();
                tracing::warn!(
                    seq = seq.map(|s| s.0),
                    %collection,
                    %key,
                    clock_offset_ms = self.setup.clock.offset_ms(),
                    "the hub refused writes stamped ahead of its clock; they stay queued"
                );
            }
            Report::ClockRefused { seq, ahead_ms } => tracing::warn!(
                seq = seq.map(|s| s.0),
                ahead_ms,
                "refused downstream changes stamped ahead of this agent's clock"
            ),
            Report::Resend => tracing::debug!("no acknowledgement from the hub; resending"),
            Report::PeerGap => tracing::debug!("the hub reported a gap; resending"),
            Report::BadAck { upto } => {
                tracing::warn!(%upto, "the hub acknowledged entries this agent never queued")
            }
            Report::PeerError { code } => tracing::debug!(?code, "the hub reported an error"),
            Report::Duplicate => tracing::debug!("a downstream batch came again; acknowledged again"),
            Report::SchemaRefusedByPeer { detail } => {
                status.schema_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%detail, "the hub refused field values that break its schema (the rest of the change applied)");
            }
            Report::RulesRefused => {
                self.setup.status.rules_refused.store(true, Ordering::Relaxed);
                tracing::error!(
                    "the hub refused this agent's merge rules (the policy's merge and prefer tables differ from the hub's); nothing is synced until both run one policy"
                )
            }
            Report::IdentityRefused => tracing::error!(
                "the hub refused this agent's store: another device uses this agent's certificate, or this store was replaced earlier; nothing is synced until an operator resolves it"
            ),
        }
    }

    async fn publish(&self, msg: Message) {
        if let Message::Error(e) = &msg {
            tracing::debug!(code = ?e.code, message = %truncated(&e.message), "sending an error to the hub");
        }
        let bytes = match codec::encode(&Envelope::new(msg)) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a message for the hub");
                return;
            }
        };
        if let Err(e) = self
            .client
            .publish(self.up_topic.clone(), QoS::AtLeastOnce, false, bytes)
            .await
        {
            tracing::debug!(error = %e, "publish not queued");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_a_cap_with_jitter() {
        for failures in 0..40 {
            let cap = BACKOFF_MIN
                .saturating_mul(1 << failures.min(16))
                .min(BACKOFF_MAX);
            let d = backoff(failures);
            assert!(d >= cap / 2 && d <= cap, "{failures}: {d:?} vs {cap:?}");
        }
        assert!(backoff(30) <= BACKOFF_MAX);
    }
}
