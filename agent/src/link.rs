//! The agent's link to the hub: rumqttc over mutual TLS (rustls, ring), with
//! reconnects under exponential backoff and jitter. On every connection it says
//! hello (with its downstream cursor), learns the hub's upstream watermark from
//! the welcome, then streams the outbox in batches and applies downstream
//! batches — driven by the shared sans-IO [`Sender`] and [`Receiver`].
//!
//! **Architecture invariant:** outbox entries are deleted only after the hub
//! acknowledged them (the hub acknowledges after its commit); downstream
//! changes are merged and the cursor advanced in one transaction before the
//! agent acknowledges.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fieldsync_shared::codec;
use fieldsync_shared::session::{Plan, Receiver, Sender};
use fieldsync_shared::tls::{client_config, TlsError};
use fieldsync_shared::wire::{
    down_topic, up_topic, Ack, Batch, Envelope, ErrorCode, Hello, Message, MAX_MESSAGE_BYTES,
};
use fieldsync_shared::{AgentId, Change, Flow, Policy, Seq};
use rand::Rng;
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, MqttOptions, NetworkOptions, Packet, QoS,
    TlsConfiguration, Transport,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::HubConfig;
use crate::store::{Store, StoreError};
use crate::writer::{WriteError, Writer};

/// Most entries in one upstream batch (fewer if the bytes would not fit).
pub const UP_BATCH: u64 = 512;
/// Most sequence numbers in flight to the hub.
pub const UP_WINDOW: u64 = 4096;
/// Without an acknowledgement (or a welcome) for this long, send again.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect backoff: first and largest delay.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Largest MQTT packet: one envelope plus topic and headers.
const MAX_PACKET_BYTES: usize = MAX_MESSAGE_BYTES + 1024;

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
}

/// What the link needs.
#[derive(Clone)]
pub struct LinkSetup {
    pub hub: HubConfig,
    pub agent: AgentId,
    pub store: Store,
    pub writer: Writer,
    pub policy: Arc<Policy>,
    /// Set while the hub has welcomed this agent on a live connection.
    pub connected: Arc<AtomicBool>,
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
        // session can never wait on itself.
        let (events_tx, mut events) = mpsc::channel::<Result<Event, String>>(256);
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
                        if events_tx.send(Ok(event)).await.is_err() {
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
        let mut session = Session {
            setup: &self.setup,
            client: &client,
            up: Sender::new(bounds.acked, bounds.last, UP_WINDOW),
            down: Receiver::new(s.store.down_applied()?),
            up_topic: up_topic(&s.agent),
            down_topic: down_topic(&s.agent),
            mqtt_up: false,
            welcomed: false,
            last_progress: Instant::now(),
            reported_failure: false,
        };
        let mut outbox = s.writer.outbox_last();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let result = loop {
            let step = tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                e = events.recv() => match e {
                    Some(event) => session.on_event(event).await,
                    None => break Ok(()),
                },
                changed = outbox.changed() => {
                    if changed.is_ok() {
                        session.up.appended(*outbox.borrow_and_update());
                    }
                    Ok(())
                }
                _ = tick.tick() => session.on_tick().await,
            };
            if let Err(e) = step.and(session.pump().await) {
                break Err(e);
            }
        };
        self.setup.connected.store(false, Ordering::Relaxed);
        let _ = client.try_disconnect();
        poller.abort();
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

/// Delay before reconnect attempt `failures + 1`: exponential with full jitter.
fn backoff(failures: u32) -> Duration {
    let cap = BACKOFF_MIN
        .saturating_mul(1u32 << failures.min(16))
        .min(BACKOFF_MAX);
    let millis = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(millis / 2..=millis))
}

struct Session<'a> {
    setup: &'a LinkSetup,
    client: &'a AsyncClient,
    up: Sender,
    down: Receiver,
    up_topic: String,
    down_topic: String,
    /// The MQTT connection is up (CONNACK received).
    mqtt_up: bool,
    /// The hub answered this connection's hello.
    welcomed: bool,
    last_progress: Instant,
    reported_failure: bool,
}

impl Session<'_> {
    async fn on_event(&mut self, event: Result<Event, String>) -> Result<(), LinkError> {
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                if ack.code != ConnectReturnCode::Success {
                    tracing::error!(code = ?ack.code, "hub refused the connection");
                    return Ok(());
                }
                self.mqtt_up = true;
                self.reported_failure = false;
                let _ = self
                    .client
                    .subscribe(self.down_topic.clone(), QoS::AtLeastOnce)
                    .await;
                self.hello().await;
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == self.down_topic => {
                match codec::decode(&p.payload) {
                    Ok(envelope) => self.on_message(envelope.msg).await?,
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
                self.welcomed = false;
                self.setup.connected.store(false, Ordering::Relaxed);
                self.up.disconnected();
            }
        }
        Ok(())
    }

    async fn hello(&mut self) {
        let hello = Message::Hello(Hello {
            agent: self.setup.agent.clone(),
            down_applied: self.down.applied(),
        });
        self.publish(hello).await;
        self.last_progress = Instant::now();
    }

    async fn on_message(&mut self, msg: Message) -> Result<(), LinkError> {
        match msg {
            Message::Welcome(w) => match self.up.connected(w.up_applied) {
                Ok(trim) => {
                    if let Some(upto) = trim {
                        self.trim(upto).await?;
                    }
                    self.welcomed = true;
                    self.last_progress = Instant::now();
                    self.setup.connected.store(true, Ordering::Relaxed);
                    tracing::info!(up_applied = %w.up_applied, pending = self.up.pending(), "linked to the hub");
                }
                Err(e) => {
                    tracing::error!(error = %e, "the hub holds upstream changes this agent never wrote")
                }
            },
            Message::Ack(Ack { upto }) => match self.up.acked(upto) {
                Ok(Some(upto)) => {
                    self.last_progress = Instant::now();
                    self.trim(upto).await?;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "bad acknowledgement from the hub"),
            },
            Message::Batch(batch) => self.on_batch(batch).await?,
            Message::Error(e) if e.code == ErrorCode::HelloFirst => {
                tracing::info!(message = %e.message, "the hub asks for a new hello");
                self.welcomed = false;
                self.setup.connected.store(false, Ordering::Relaxed);
                self.up.disconnected();
                self.hello().await;
            }
            Message::Error(e) => {
                tracing::warn!(code = ?e.code, message = %e.message, "the hub reported an error")
            }
            Message::Hello(_) => {}
        }
        Ok(())
    }

    async fn trim(&self, upto: Seq) -> Result<(), LinkError> {
        let store = self.setup.store.clone();
        tokio::task::spawn_blocking(move || store.trim_outbox(upto)).await??;
        Ok(())
    }

    /// A downstream batch: this agent's own policy is the authority on what it
    /// accepts; the rest is merged and the cursor advanced in one transaction,
    /// then acknowledged.
    async fn on_batch(&mut self, batch: Batch) -> Result<(), LinkError> {
        let (entries, watermark) = match self.down.plan(&batch) {
            Ok(Plan::Apply { entries, watermark }) => (entries, watermark),
            Ok(Plan::Duplicate { watermark }) => {
                self.publish(Message::Ack(Ack { upto: watermark })).await;
                return Ok(());
            }
            Err(e) => {
                tracing::debug!(error = %e, "downstream gap; the hub will resend");
                return Ok(());
            }
        };
        let mut changes: Vec<Change> = Vec::with_capacity(entries.len());
        for entry in entries {
            let filtered = self.setup.policy.filter(Flow::Down, &entry.change);
            if !filtered.denied.is_empty() || filtered.collection_denied {
                let fields: Vec<&str> = filtered.denied.iter().map(|f| f.as_str()).collect();
                tracing::warn!(
                    collection = %entry.change.collection,
                    ?fields,
                    "dropped downstream fields this agent's policy does not accept"
                );
            }
            changes.extend(filtered.permitted);
        }
        self.setup
            .writer
            .apply_downstream(changes, watermark)
            .await?;
        self.down.committed(watermark);
        self.publish(Message::Ack(Ack { upto: watermark })).await;
        Ok(())
    }

    async fn on_tick(&mut self) -> Result<(), LinkError> {
        if !self.mqtt_up || self.last_progress.elapsed() < ACK_TIMEOUT {
            return Ok(());
        }
        if !self.welcomed {
            self.hello().await;
        } else if self.up.in_flight() > 0 {
            tracing::debug!(
                in_flight = self.up.in_flight(),
                "no acknowledgement; resending"
            );
            self.up.rewind();
            self.last_progress = Instant::now();
        }
        Ok(())
    }

    /// Sends what the window allows. Entries are filtered by the policy once
    /// more on the way out (defence in depth).
    async fn pump(&mut self) -> Result<(), LinkError> {
        if !self.welcomed {
            return Ok(());
        }
        while let Some((first, last)) = self.up.next_range(UP_BATCH) {
            let store = self.setup.store.clone();
            let limit = usize::try_from(last.0 - first.0 + 1).unwrap_or(usize::MAX);
            let entries = tokio::task::spawn_blocking(move || {
                store.outbox_batch(first, limit, MAX_MESSAGE_BYTES)
            })
            .await??;
            if entries.first().map(|(seq, _)| *seq) != Some(first) {
                tracing::error!(%first, "outbox is missing entries; not sending");
                break;
            }
            let mut batch = Batch::fit(first, entries);
            let policy = &self.setup.policy;
            batch
                .entries
                .retain_mut(|e| match policy.filter(Flow::Up, &e.change).permitted {
                    Some(permitted) => {
                        e.change = permitted;
                        true
                    }
                    None => false,
                });
            let sent = batch.last;
            if self.up.in_flight() == 0 {
                self.last_progress = Instant::now();
            }
            self.publish(Message::Batch(batch)).await;
            self.up.sent(sent);
        }
        Ok(())
    }

    async fn publish(&self, msg: Message) {
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
