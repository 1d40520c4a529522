//! The protocol limit: raw rumqttc QoS 1 publishes of the agent's exact payload
//! bytes through the hub's own front door, started in this process with the
//! hub's settings but without a sync engine (a consumer takes each message off
//! the transport and drops it), so the figures isolate TLS and the front
//! door's MQTT server. Also the publisher, the payloads and the round-trip
//! probe that `mosquitto.rs` runs unchanged against the peer broker.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use bytes::Bytes;
use fieldsync_e2e::fleet::{Pki, FLEET_POLICY};
use fieldsync_hub::admission::Rate;
use fieldsync_hub::config::defaults;
use fieldsync_hub::front_door::{self, Connections, FrontDoorSettings};
use fieldsync_hub::metrics::{Metrics, MetricsSnapshot};
use fieldsync_hub::transport::{self, Inbound, Outlet};
use fieldsync_shared::hlc::{system_now_ms, DEFAULT_MAX_DRIFT_MS};
use fieldsync_shared::wire::{down_topic, up_topic, Batch, Envelope, Message, MAX_MESSAGE_BYTES};
use fieldsync_shared::{
    codec, AgentId, Change, CollectionName, FieldName, Flow, Hlc, Origin, Policy, RecordKey,
    RecordState, Seq, Value, Version,
};
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing,
    Packet, QoS, SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{mib, Plan, Report};

/// The agent id (certificate CN, MQTT client id, origin) of the publisher.
pub(crate) const AGENT: &str = "bench-raw";
/// Entries in the "batch" payload: the agent's upstream batch size.
pub(crate) const BATCH_ENTRIES: u64 = 512;
/// The agent's MQTT options (agent/src/link.rs): largest packet, in-flight
/// window, keep-alive.
const MAX_PACKET_BYTES: usize = MAX_MESSAGE_BYTES + 1024;
const INFLIGHT: u16 = 64;
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// The hub's defaults (hub/src/config.rs) for the in-process front door.
const HUB_MAX_CONNECTIONS: usize = defaults::MAX_CONNECTIONS;
const HUB_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HUB_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests queued in front of rumqttc's event loop (beyond the in-flight
/// window); small, so stopping drains quickly.
const REQUEST_QUEUE: usize = 16;
/// Deadlines: CONNECT to CONNACK, one PubAck, draining what is in flight.
const CONNECT_DEADLINE: Duration = Duration::from_secs(15);
const ACK_DEADLINE: Duration = Duration::from_secs(5);
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);
/// Round trips: unmeasured first ones, measured ones, and a time cap so a
/// pathological floor cannot blow the scenario's budget.
const RTT_WARMUP: usize = 20;
const RTT_SAMPLES: usize = 500;
const RTT_CAP: Duration = Duration::from_secs(3);
/// Measured downstream replies (each waits ~1 ms, a commit's worth).
const REPLY_SAMPLES: usize = 300;

/// Where and as whom a publisher connects: always the agent's options.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) addr: SocketAddr,
    pub(crate) tls: Arc<rustls::ClientConfig>,
    pub(crate) agent: AgentId,
}

impl Target {
    /// The publisher [`AGENT`] (issue its certificate first) with the agent's
    /// TLS configuration, towards `addr` (whose certificate is the Pki's hub
    /// certificate, valid for 127.0.0.1).
    pub(crate) fn new(pki: &Pki, addr: SocketAddr) -> anyhow::Result<Self> {
        let tls =
            fieldsync_shared::tls::client_config(&pki.ca(), &pki.cert(AGENT), &pki.key(AGENT))?;
        Ok(Self {
            addr,
            tls,
            agent: AgentId::new(AGENT)?,
        })
    }

    /// Exactly the agent's `MqttOptions`, with the given in-flight window.
    fn options(&self, inflight: u16) -> MqttOptions {
        let mut options = MqttOptions::new(
            self.agent.as_str(),
            self.addr.ip().to_string(),
            self.addr.port(),
        );
        options
            .set_transport(Transport::Tls(TlsConfiguration::Rustls(self.tls.clone())))
            .set_keep_alive(KEEP_ALIVE)
            .set_clean_session(true)
            .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES)
            .set_inflight(inflight);
        options
    }
}

/// The two workloads' bytes.
pub(crate) struct Payloads {
    /// An upstream batch envelope of [`BATCH_ENTRIES`] changes.
    pub(crate) batch: Bytes,
    pub(crate) batch_changes: usize,
    /// An upstream batch envelope of a single change.
    pub(crate) change: Bytes,
}

impl Payloads {
    pub(crate) fn new(agent: &AgentId) -> anyhow::Result<Self> {
        let changes = patient_changes(agent, BATCH_ENTRIES)?;
        let single = vec![changes[0].clone()];
        let (batch, _) = Batch::fit(Seq(1), changes);
        let batch_changes = batch.entries.len();
        ensure!(
            batch_changes as u64 == BATCH_ENTRIES,
            "only {batch_changes} of {BATCH_ENTRIES} changes fit one message"
        );
        Ok(Self {
            batch: envelope(batch)?,
            batch_changes,
            change: envelope(Batch::fit(Seq(1), single).0)?,
        })
    }
}

fn envelope(batch: Batch) -> anyhow::Result<Bytes> {
    Ok(codec::encode(&Envelope::new(Message::Batch(batch)))?.into())
}

/// What the agent's outbox holds after the catch-up scenario's writes
/// `{"ward": i, "initials": "CD", "ssn": "local"}` to `patients/p0-{i}`: each
/// write stamped by the agent's clock with its own version, then filtered by
/// the fleet policy for upstream (`ssn` stays local), numbered from 1.
fn patient_changes(agent: &AgentId, count: u64) -> anyhow::Result<Vec<(Seq, Change)>> {
    let policy = Policy::parse(FLEET_POLICY)?;
    let origin = Origin::agent(agent);
    let mut hlc = Hlc::new(DEFAULT_MAX_DRIFT_MS);
    let now = system_now_ms();
    let collection = CollectionName::new("patients")?;
    let (ward, initials, ssn) = (
        FieldName::new("ward")?,
        FieldName::new("initials")?,
        FieldName::new("ssn")?,
    );
    (0..count)
        .map(|i| {
            let version = Version {
                stamp: hlc.tick(now),
                origin: origin.clone(),
            };
            let fields = [
                (ward.clone(), Some(Value::from(i))),
                (initials.clone(), Some(Value::from("CD"))),
                (ssn.clone(), Some(Value::from("local"))),
            ];
            let change = Change {
                collection: collection.clone(),
                key: RecordKey::new(format!("p0-{i}"))?,
                state: RecordState::default().write(fields, &version),
            };
            let permitted = policy
                .filter(Flow::Up, &change)
                .permitted
                .context("the fleet policy sends nothing of a patients write")?;
            Ok((Seq(i + 1), permitted))
        })
        .collect()
}

/// Counters the event-loop task keeps.
#[derive(Default)]
struct Probe {
    acked: AtomicU64,
    sent: AtomicU64,
    /// Publishes received (on the down topic).
    received: AtomicU64,
    acks: Notify,
    connacks: Notify,
    subacks: Notify,
    deliveries: Notify,
}

impl Probe {
    fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }
}

/// One connected rumqttc client and the task polling its event loop.
struct Conn {
    client: AsyncClient,
    probe: Arc<Probe>,
    poller: JoinHandle<anyhow::Result<()>>,
    stop: CancellationToken,
    connect_time: Duration,
}

impl Conn {
    /// Connects like the agent does (TCP_NODELAY, 10 s connection timeout) and
    /// waits for a successful CONNACK.
    async fn open(target: &Target, inflight: u16) -> anyhow::Result<Self> {
        let start = Instant::now();
        let (client, mut eventloop) = AsyncClient::new(target.options(inflight), REQUEST_QUEUE);
        let mut network = NetworkOptions::new();
        network.set_tcp_nodelay(true);
        network.set_connection_timeout(10);
        eventloop.set_network_options(network);
        let probe = Arc::new(Probe::default());
        let stop = CancellationToken::new();
        let mut poller = tokio::spawn(poll_events(eventloop, probe.clone(), stop.clone()));
        tokio::select! {
            _ = probe.connacks.notified() => {}
            r = &mut poller => return Err(ended(r).context("connecting")),
            _ = tokio::time::sleep(CONNECT_DEADLINE) => {
                stop.cancel();
                bail!("no CONNACK from {} within {CONNECT_DEADLINE:?}", target.addr);
            }
        }
        Ok(Self {
            client,
            probe,
            poller,
            stop,
            connect_time: start.elapsed(),
        })
    }

    /// Sleeps for `d`, failing at once if the connection fails meanwhile.
    async fn watch(&mut self, d: Duration) -> anyhow::Result<()> {
        tokio::select! {
            _ = tokio::time::sleep(d) => Ok(()),
            r = &mut self.poller => Err(ended(r)),
        }
    }

    /// Waits until `done` holds, woken by `signal`, for at most [`ACK_DEADLINE`].
    async fn wait_for(
        &mut self,
        done: impl Fn(&Probe) -> bool,
        signal: fn(&Probe) -> &Notify,
        what: &str,
    ) -> anyhow::Result<()> {
        let probe = self.probe.clone();
        let deadline = tokio::time::Instant::now() + ACK_DEADLINE;
        while !done(&probe) {
            tokio::select! {
                _ = signal(&probe).notified() => {}
                r = &mut self.poller => return Err(ended(r)),
                _ = tokio::time::sleep_until(deadline) => bail!("no {what} within {ACK_DEADLINE:?}"),
            }
        }
        Ok(())
    }

    /// Waits until all `published` messages are acknowledged, then disconnects.
    async fn close(mut self, published: u64) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + DRAIN_DEADLINE;
        while self.probe.acked() < published {
            tokio::select! {
                _ = self.probe.acks.notified() => {}
                r = &mut self.poller => return Err(ended(r).context("draining")),
                _ = tokio::time::sleep_until(deadline) => bail!(
                    "only {} of {published} publishes were acknowledged within {DRAIN_DEADLINE:?} after the last",
                    self.probe.acked()
                ),
            }
        }
        let (acked, sent) = (self.probe.acked(), self.probe.sent.load(Ordering::Relaxed));
        ensure!(
            acked == published && sent == published,
            "{published} publishes queued, {sent} sent, {acked} acknowledged"
        );
        self.client
            .disconnect()
            .await
            .map_err(|e| anyhow!("cannot queue DISCONNECT: {e}"))?;
        match tokio::time::timeout(Duration::from_secs(5), &mut self.poller).await {
            Ok(r) => r.map_err(|e| anyhow!("event loop task: {e}"))?,
            Err(_) => bail!("DISCONNECT was not sent within 5 s"),
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Why the event-loop task ended before it was asked to.
fn ended(r: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Error {
    match r {
        Ok(Ok(())) => anyhow!("the MQTT event loop stopped unexpectedly"),
        Ok(Err(e)) => e,
        Err(e) => anyhow!("event loop task: {e}"),
    }
}

/// Drives the event loop: counts PubAcks and sent publishes; any error, a
/// refused CONNECT or a DISCONNECT from the broker ends it with an error.
async fn poll_events(
    mut eventloop: EventLoop,
    probe: Arc<Probe>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            e = eventloop.poll() => e.context("MQTT connection error")?,
        };
        match event {
            Event::Incoming(Packet::ConnAck(ack)) => {
                ensure!(
                    ack.code == ConnectReturnCode::Success,
                    "the broker refused CONNECT: {:?}",
                    ack.code
                );
                probe.connacks.notify_one();
            }
            Event::Incoming(Packet::PubAck(_)) => {
                probe.acked.fetch_add(1, Ordering::Relaxed);
                probe.acks.notify_one();
            }
            Event::Incoming(Packet::SubAck(ack)) => {
                ensure!(
                    ack.return_codes
                        .iter()
                        .all(|c| !matches!(c, SubscribeReasonCode::Failure)),
                    "the broker refused SUBSCRIBE: {:?}",
                    ack.return_codes
                );
                probe.subacks.notify_one();
            }
            Event::Incoming(Packet::Publish(_)) => {
                probe.received.fetch_add(1, Ordering::Relaxed);
                probe.deliveries.notify_one();
            }
            Event::Incoming(Packet::Disconnect) => bail!("the broker sent DISCONNECT"),
            Event::Outgoing(Outgoing::Publish(_)) => {
                probe.sent.fetch_add(1, Ordering::Relaxed);
            }
            Event::Outgoing(Outgoing::Disconnect) => return Ok(()),
            _ => {}
        }
    }
}

/// A throughput run's result.
pub(crate) struct Throughput {
    pub(crate) msgs_per_s: f64,
    pub(crate) connect_time: Duration,
}

/// Publishes `payload` at QoS 1 to the target's up topic as fast as the
/// agent's in-flight window allows; after `warmup`, counts PubAcks for
/// `measure`. Every publish must be acknowledged before it disconnects.
pub(crate) async fn publish_for(
    target: &Target,
    payload: &Bytes,
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<Throughput> {
    let mut conn = Conn::open(target, INFLIGHT).await?;
    let stopping = Arc::new(AtomicBool::new(false));
    // The publisher is never cancelled mid-send, so its count is exact.
    let publisher = {
        let (client, stopping, payload) = (conn.client.clone(), stopping.clone(), payload.clone());
        let topic = up_topic(&target.agent);
        tokio::spawn(async move {
            let mut published = 0u64;
            while !stopping.load(Ordering::Relaxed) {
                client
                    .publish_bytes(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
                    .await
                    .map_err(|e| anyhow!("publish not queued: {e}"))?;
                published += 1;
            }
            anyhow::Ok(published)
        })
    };
    let measured = async {
        conn.watch(warmup).await?;
        let (t0, a0) = (Instant::now(), conn.probe.acked());
        conn.watch(measure).await?;
        anyhow::Ok((conn.probe.acked() - a0) as f64 / t0.elapsed().as_secs_f64())
    }
    .await;
    stopping.store(true, Ordering::Relaxed);
    let msgs_per_s = match measured {
        Ok(rate) => rate,
        Err(e) => {
            publisher.abort();
            return Err(e);
        }
    };
    let published = publisher
        .await
        .map_err(|e| anyhow!("publisher task: {e}"))??;
    let connect_time = conn.connect_time;
    conn.close(published).await?;
    Ok(Throughput {
        msgs_per_s,
        connect_time,
    })
}

/// Publish-to-PubAck round trips with one message in flight.
pub(crate) struct Rtt {
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
    pub(crate) samples: usize,
    pub(crate) connect_time: Duration,
}

impl Rtt {
    /// Nearest-rank percentiles of `samples`.
    fn of(samples: Vec<Duration>, connect_time: Duration) -> anyhow::Result<Self> {
        ensure!(
            !samples.is_empty(),
            "no round trip measured within {RTT_CAP:?}"
        );
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        ms.sort_by(f64::total_cmp);
        Ok(Self {
            p50_ms: crate::quantile(&ms, 0.50),
            p99_ms: crate::quantile(&ms, 0.99),
            max_ms: crate::quantile(&ms, 1.0),
            samples: samples.len(),
            connect_time,
        })
    }

    fn describe(&self) -> String {
        format!(
            "p50 {:.3} ms p99 {:.3} ms max {:.3} ms over {} samples",
            self.p50_ms, self.p99_ms, self.max_ms, self.samples
        )
    }
}

/// Sequential QoS 1 publishes of `payload` (in-flight window 1): up to
/// [`RTT_SAMPLES`] measured after [`RTT_WARMUP`], within [`RTT_CAP`].
pub(crate) async fn round_trips(target: &Target, payload: &Bytes) -> anyhow::Result<Rtt> {
    let mut conn = Conn::open(target, 1).await?;
    let topic = up_topic(&target.agent);
    let mut samples = Vec::with_capacity(RTT_SAMPLES);
    let mut published = 0u64;
    let started = Instant::now();
    while samples.len() < RTT_SAMPLES && started.elapsed() < RTT_CAP {
        let t = Instant::now();
        conn.client
            .publish_bytes(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
            .await
            .map_err(|e| anyhow!("publish not queued: {e}"))?;
        published += 1;
        conn.wait_for(|p| p.acked() >= published, |p| &p.acks, "PubAck")
            .await?;
        if published > RTT_WARMUP as u64 {
            samples.push(t.elapsed());
        }
    }
    let rtt = Rtt::of(samples, conn.connect_time)?;
    conn.close(published).await?;
    Ok(rtt)
}

/// The engine's pattern, which the plain round trip cannot show: the front
/// door answers a publish with a PubAck, then ~1 ms later (a commit) writes a
/// small downstream message on the same socket, with no client packet in
/// between to carry the TCP ACK of the first write; without TCP_NODELAY,
/// Nagle would hold the second write until the client's delayed ACK (~40 ms).
/// Measures the downstream leg: from the engine's outlet to the client's
/// receipt.
async fn reply_round_trips(
    target: &Target,
    payload: &Bytes,
    outlet: &Latest,
) -> anyhow::Result<Rtt> {
    let mut conn = Conn::open(target, 1).await?;
    let (up, down) = (up_topic(&target.agent), down_topic(&target.agent));
    conn.client
        .subscribe(down.clone(), QoS::AtLeastOnce)
        .await
        .map_err(|e| anyhow!("subscribe not queued: {e}"))?;
    tokio::select! {
        _ = conn.probe.subacks.notified() => {}
        r = &mut conn.poller => return Err(ended(r).context("subscribing")),
        _ = tokio::time::sleep(ACK_DEADLINE) => bail!("no SUBACK within {ACK_DEADLINE:?}"),
    }
    let mut samples = Vec::with_capacity(REPLY_SAMPLES);
    let mut published = 0u64;
    let started = Instant::now();
    while samples.len() < REPLY_SAMPLES && started.elapsed() < RTT_CAP {
        conn.client
            .publish_bytes(up.clone(), QoS::AtLeastOnce, false, payload.clone())
            .await
            .map_err(|e| anyhow!("publish not queued: {e}"))?;
        published += 1;
        conn.wait_for(|p| p.acked() >= published, |p| &p.acks, "PubAck")
            .await?;
        tokio::time::sleep(Duration::from_millis(1)).await;
        let t = Instant::now();
        let current = outlet
            .lock()
            .map_err(|_| anyhow!("outlet lock poisoned"))?
            .clone()
            .context("no connection announced to the engine")?;
        current
            .send(payload.clone())
            .map_err(|e| anyhow!("send on the connection's outlet: {e}"))?;
        conn.wait_for(
            |p| p.received.load(Ordering::Relaxed) >= published,
            |p| &p.deliveries,
            "downstream publish",
        )
        .await?;
        if published > RTT_WARMUP as u64 {
            samples.push(t.elapsed());
        }
    }
    let rtt = Rtt::of(samples, conn.connect_time)?;
    conn.close(published).await?;
    Ok(rtt)
}

/// Every figure of the two workloads and the round-trip probe on one target.
pub(crate) struct Figures {
    pub(crate) batch: Throughput,
    pub(crate) change: Throughput,
    pub(crate) rtt: Rtt,
    pub(crate) batch_bytes: usize,
    pub(crate) batch_changes: usize,
    pub(crate) change_bytes: usize,
    /// Connections made (each one a CONNECT through the front door).
    pub(crate) connections: u64,
}

impl Figures {
    pub(crate) fn batch_mib_per_s(&self) -> f64 {
        self.batch.msgs_per_s * mib(self.batch_bytes as u64)
    }

    /// The median time from opening a connection (TCP, TLS, CONNECT) to its
    /// CONNACK, in ms.
    pub(crate) fn connect_ms(&self) -> f64 {
        let mut t = [
            self.batch.connect_time,
            self.change.connect_time,
            self.rtt.connect_time,
        ];
        t.sort();
        t[1].as_secs_f64() * 1000.0
    }

    /// One line for the console.
    pub(crate) fn describe(&self, name: &str) -> String {
        format!(
            "{name}: batch {:.0} msg/s ({:.1} MiB/s, {} B, {} changes), change {:.0} msg/s ({} B), \
             rtt {}, connect {:.1} ms",
            self.batch.msgs_per_s,
            self.batch_mib_per_s(),
            self.batch_bytes,
            self.batch_changes,
            self.change.msgs_per_s,
            self.change_bytes,
            self.rtt.describe(),
            self.connect_ms(),
        )
    }
}

/// Runs both workloads and the round-trip probe against `target`, with the
/// plan's durations.
pub(crate) async fn measure(target: &Target, plan: &Plan) -> anyhow::Result<Figures> {
    let (warmup, measure) = if plan.quick {
        (Duration::from_millis(300), Duration::from_secs(3))
    } else {
        (Duration::from_millis(500), Duration::from_secs(7))
    };
    let payloads = Payloads::new(&target.agent)?;
    let batch = publish_for(target, &payloads.batch, warmup, measure)
        .await
        .context("batch workload")?;
    let change = publish_for(target, &payloads.change, warmup, measure)
        .await
        .context("change workload")?;
    let rtt = round_trips(target, &payloads.change)
        .await
        .context("round trips")?;
    Ok(Figures {
        batch,
        change,
        rtt,
        batch_bytes: payloads.batch.len(),
        batch_changes: payloads.batch_changes,
        change_bytes: payloads.change.len(),
        connections: 3,
    })
}

/// A budget no workload here reaches.
const UNPACED: Rate = Rate {
    per_s: 1e12,
    burst: 1e12,
};

/// The outlet of the newest connection the consumer saw.
type Latest = Arc<std::sync::Mutex<Option<Arc<dyn Outlet>>>>;

/// The hub's front door in this process, with a consumer in the engine's
/// place.
struct DoorOnly {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    /// What the engine would answer through.
    outlet: Latest,
}

impl DoorOnly {
    /// What `fieldsync_hub::serve` starts for MQTT, with the hub's defaults.
    async fn start(pki: &Pki) -> anyhow::Result<Self> {
        let tls = fieldsync_shared::tls::server_config(&pki.ca(), &pki.hub_cert(), &pki.hub_key())?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let metrics = Arc::new(Metrics::default());
        let (inlet_tx, mut inlet) =
            transport::inlet(transport::INLET_EVENTS, transport::INLET_BYTES);
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let outlet: Latest = Arc::default();
        let latest = outlet.clone();
        let consumer_cancel = cancel.clone();
        tasks.spawn(async move {
            loop {
                let inbound = tokio::select! {
                    _ = consumer_cancel.cancelled() => return,
                    i = inlet.recv() => i,
                };
                match inbound {
                    None => return,
                    Some(Inbound::Connected { outlet, .. }) => {
                        if let Ok(mut l) = latest.lock() {
                            *l = Some(outlet);
                        }
                    }
                    Some(_) => {}
                }
            }
        });
        tasks.spawn(front_door::run(
            listener,
            FrontDoorSettings {
                tls,
                max_connections: HUB_MAX_CONNECTIONS,
                max_pending: defaults::MAX_PENDING_CONNECTIONS,
                max_pending_per_ip: defaults::MAX_PENDING_PER_IP,
                max_connect_bytes: defaults::MAX_CONNECT_BYTES,
                handshake_timeout: HUB_HANDSHAKE_TIMEOUT,
                connect_timeout: HUB_CONNECT_TIMEOUT,
                // The transport's limit, not a connection's budget: unpaced.
                messages: UNPACED,
                bytes: UNPACED,
            },
            Arc::new(Connections::default()),
            inlet_tx,
            metrics.clone(),
            cancel.clone(),
            tasks.clone(),
        ));
        Ok(Self {
            addr,
            metrics,
            cancel,
            tasks,
            outlet,
        })
    }

    /// Stops the front door, its connections and the consumer.
    async fn stop(self) -> anyhow::Result<MetricsSnapshot> {
        self.cancel.cancel();
        self.tasks.close();
        tokio::time::timeout(Duration::from_secs(10), self.tasks.wait())
            .await
            .context("the front door did not stop within 10 s")?;
        Ok(self.metrics.snapshot())
    }
}

/// The raw publish baseline through the in-process front door.
pub(crate) async fn baseline(plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(&dir.path().join("pki"))?;
    pki.issue(AGENT)?;
    let hub = DoorOnly::start(&pki).await?;
    let target = Target::new(&pki, hub.addr)?;
    let measured = async {
        let figures = measure(&target, plan).await?;
        let change = Payloads::new(&target.agent)?.change;
        let reply = reply_round_trips(&target, &change, &hub.outlet)
            .await
            .context("downstream replies")?;
        anyhow::Ok((figures, reply))
    }
    .await;
    let m = hub.stop().await?;
    let (figures, reply) = measured?;
    let refused = m.tls_handshake_failures
        + m.identity_rejected
        + m.connect_refused
        + m.acl_violations
        + m.malformed_packets
        + m.connections_over_limit;
    ensure!(
        refused == 0 && m.sessions_established == figures.connections + 1,
        "the front door refused something or missed a session: {m:?}"
    );
    eprintln!("  {}", figures.describe("front door"));
    eprintln!(
        "  front door: downstream reply 1 ms after the PubAck {}",
        reply.describe()
    );
    // The headline figure: one change per QoS1 message, the protocol limit for
    // sending changes one by one. The batch workload is the transport's
    // byte limit for the messages our agents actually send.
    report.insert("raw_publish_msgs_per_s", figures.change.msgs_per_s);
    report.insert("raw_publish_payload_bytes", figures.change_bytes as f64);
    report.insert("raw_publish_batch_msgs_per_s", figures.batch.msgs_per_s);
    report.insert("raw_publish_batch_mib_per_s", figures.batch_mib_per_s());
    report.insert(
        "raw_publish_batch_payload_bytes",
        figures.batch_bytes as f64,
    );
    report.insert("raw_publish_batch_changes", figures.batch_changes as f64);
    report.insert("raw_publish_rtt_p50_ms", figures.rtt.p50_ms);
    report.insert("raw_publish_rtt_p99_ms", figures.rtt.p99_ms);
    report.insert("raw_connect_ms", figures.connect_ms());
    report.insert("raw_down_reply_p50_ms", reply.p50_ms);
    report.insert("raw_down_reply_p99_ms", reply.p99_ms);
    Ok(())
}
