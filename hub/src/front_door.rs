//! The hub's public MQTT listener and its embedded transport: mutual TLS
//! (rustls, ring), identity from the client certificate, an MQTT 3.1.1 server
//! for exactly what agents use, and agent traffic handed to the sync engine
//! in-process ([`crate::transport`]). There is no broker behind it.
//!
//! **Architecture invariant:** an agent can touch only its own topics. Its
//! identity is its certificate's CN; its CONNECT must carry that id; it may
//! publish only to `up_topic(id)` and subscribe only to `down_topic(id)`. Any
//! other packet closes the connection, with a log line and a counter.
//!
//! **Architecture invariant:** no connection can block another. Each accepted
//! socket gets its own task; the TLS handshake and the CONNECT each run under
//! a timeout, in a pending slot of their own budget ([`crate::admission`]),
//! never in an agent's slot; each connection's messages and bytes are paced by
//! token buckets; what waits to be written to a connection is bounded, and a
//! peer that stops reading is closed, never waited for.
//!
//! One connection per identity: a new authenticated connection replaces the
//! agent's older one (as MQTT's client-id takeover does). Whether the new one
//! may then sync is the protocol's identity rule, in the engine.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fieldsync_shared::tls::{peer_certificate, PeerCertificate};
use fieldsync_shared::wire::{down_topic, up_topic, MAX_MESSAGE_BYTES};
use fieldsync_shared::AgentId;
use rumqttc::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, QoS, SubAck, SubscribeReasonCode, UnsubAck,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{Bucket, Pending, PendingRefusal, PendingSlot, Rate};
use crate::metrics::Metrics;
use crate::transport::{ConnId, InletSender, InletShare, Outlet, SendError};

/// Largest MQTT packet accepted once connected: one envelope plus the topic
/// and headers.
pub const MAX_PACKET_BYTES: usize = MAX_MESSAGE_BYTES + 1024;
/// Most bytes queued for one connection: twice the protocol's in-flight
/// window (8 MiB), so only a peer that stops reading reaches it.
pub const OUTBOUND_QUEUE_BYTES: usize = 16 << 20;
/// Most bytes gathered into one write to the socket.
const WRITE_CHUNK: usize = 256 << 10;
/// A read buffer that grew past this for a large packet is given back once
/// empty, so an idle connection holds little memory.
const IDLE_READ_BUFFER: usize = 16 << 10;
/// A write buffer that grew past this is given back after the write.
const IDLE_WRITE_BUFFER: usize = 4 << 10;
/// Control packets (acks, pings) one connection may have queued for writing.
const CONTROL_QUEUE: usize = 64;
/// With every pending slot held for this long, the accept loop evicts every
/// holder that has been at it for [`STALLED`]: a handshake plus CONNECT takes
/// milliseconds, so such a holder is idle or stalling on purpose.
const EVICT_PATIENCE: Duration = Duration::from_millis(100);
const STALLED: Duration = Duration::from_secs(1);
/// How long a connection that replaces its agent's older one on a full hub
/// waits for the older one's slot.
const REPLACE_WAIT: Duration = Duration::from_secs(2);
/// What one connection may have queued for the engine at once: its share of
/// the inlet, so a flooding agent waits for its own messages, not everyone.
const INLET_SHARE_MESSAGES: usize = 64;
const INLET_SHARE_BYTES: usize = 4 << 20;

/// Settings of the front door (`[mqtt]` in the hub config).
#[derive(Clone)]
pub struct FrontDoorSettings {
    pub tls: Arc<rustls::ServerConfig>,
    /// Authenticated agents at most.
    pub max_connections: usize,
    /// Connections still in TLS or CONNECT at most, and per source IP.
    pub max_pending: usize,
    pub max_pending_per_ip: usize,
    /// Largest packet accepted before CONNECT is done (the CONNECT itself).
    pub max_connect_bytes: usize,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    /// Each connection's budget of messages and of bytes.
    pub messages: Rate,
    pub bytes: Rate,
}

impl FrontDoorSettings {
    /// The settings `[mqtt]` configures.
    pub fn new(tls: Arc<rustls::ServerConfig>, mqtt: &crate::config::MqttConfig) -> Self {
        Self {
            tls,
            max_connections: mqtt.max_connections,
            max_pending: mqtt.max_pending,
            max_pending_per_ip: mqtt.max_pending_per_ip,
            max_connect_bytes: mqtt.max_connect_bytes,
            handshake_timeout: mqtt.handshake_timeout,
            connect_timeout: mqtt.connect_timeout,
            messages: mqtt.messages,
            bytes: mqtt.bytes,
        }
    }
}

/// Which agents are connected right now.
#[derive(Debug, Default)]
pub struct Connections {
    live: Mutex<Live>,
}

#[derive(Debug, Default)]
struct Live {
    by_agent: HashMap<AgentId, (ConnId, CancellationToken)>,
    /// The certificate each agent last connected with (kept in memory only:
    /// after a hub restart it is known again at the agent's next connection).
    certificates: HashMap<AgentId, PeerCertificate>,
    /// Numbers connections in the order they became their agent's current
    /// one, so a larger number is always the newer connection.
    next: ConnId,
}

impl Connections {
    pub fn is_connected(&self, agent: &AgentId) -> bool {
        self.live
            .lock()
            .map(|m| m.by_agent.contains_key(agent))
            .unwrap_or(false)
    }

    pub fn count(&self) -> usize {
        self.live.lock().map(|m| m.by_agent.len()).unwrap_or(0)
    }

    /// The certificate the agent last connected with, since the hub started.
    pub fn certificate(&self, agent: &AgentId) -> Option<PeerCertificate> {
        self.live
            .lock()
            .ok()
            .and_then(|m| m.certificates.get(agent).cloned())
    }

    /// Makes a new connection the agent's current one and numbers it; closes
    /// the one it replaces (and says so).
    fn insert(&self, certificate: PeerCertificate, cancel: CancellationToken) -> (ConnId, bool) {
        let agent = certificate.agent.clone();
        let mut m = self.live.lock().unwrap_or_else(|p| p.into_inner());
        m.certificates.insert(agent.clone(), certificate);
        m.next += 1;
        let conn = m.next;
        match m.by_agent.insert(agent, (conn, cancel)) {
            Some((_, older)) => {
                older.cancel();
                (conn, true)
            }
            None => (conn, false),
        }
    }

    /// Removes the entry only if it is still this connection's.
    fn remove(&self, agent: &AgentId, conn: ConnId) {
        if let Ok(mut m) = self.live.lock() {
            if m.by_agent.get(agent).is_some_and(|(c, _)| *c == conn) {
                m.by_agent.remove(agent);
            }
        }
    }

    /// Closes the agent's current connection as replaced, if it has one;
    /// says whether.
    fn close_current(&self, agent: &AgentId) -> bool {
        let Ok(mut m) = self.live.lock() else {
            return false;
        };
        match m.by_agent.remove(agent) {
            Some((_, cancel)) => {
                cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Whether `conn` is still the agent's connection.
    fn is_current(&self, agent: &AgentId, conn: ConnId) -> bool {
        self.live
            .lock()
            .map(|m| m.by_agent.get(agent).is_some_and(|(c, _)| *c == conn))
            .unwrap_or(false)
    }
}

/// Why a connection was closed by the front door.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("TLS handshake timed out")]
    HandshakeTimeout,
    #[error("client certificate: {0}")]
    Identity(String),
    #[error("no CONNECT within the timeout")]
    ConnectTimeout,
    #[error("first packet is not CONNECT")]
    NotConnect,
    #[error("CONNECT client id {client_id:?} is not the certificate's identity")]
    ClientId { client_id: String },
    #[error("CONNECT with a last will is not allowed")]
    Will,
    #[error("the hub is at mqtt.max_connections")]
    Full,
    #[error("{0}")]
    Acl(String),
    #[error("malformed packet: {0}")]
    Malformed(rumqttc::Error),
    #[error("no packet within 1.5 keep-alive periods")]
    KeepAlive,
    #[error("the agent does not read what the hub sends")]
    SlowReader,
    #[error("replaced by a newer connection of the same agent")]
    Replaced,
    #[error("the hub is stopping")]
    Stopping,
    #[error("connection: {0}")]
    Io(std::io::Error),
}

/// Accepts connections on `listener` until `shutdown`.
pub async fn run(
    listener: TcpListener,
    settings: FrontDoorSettings,
    connections: Arc<Connections>,
    inlet: InletSender,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let acceptor = TlsAcceptor::from(settings.tls.clone());
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let pending = Pending::new(settings.max_pending, settings.max_pending_per_ip);
    loop {
        // A pending slot first: while all are held, new connections wait in
        // the listen backlog (TCP's own queue) rather than being turned away,
        // and a holder that stalled is evicted to make room.
        let permit = match pending.try_slot() {
            Some(p) => p,
            None => {
                Metrics::inc(&metrics.pending_over_limit);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        p = pending.slot() => break p,
                        _ = tokio::time::sleep(EVICT_PATIENCE) => {
                            let evicted = pending.evict_stalled(STALLED, Instant::now());
                            Metrics::add(&metrics.pending_evicted, evicted as u64);
                        }
                    }
                }
            }
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        Metrics::inc(&metrics.connections_accepted);
        // Before any TLS work: a refused socket costs an accept and a close.
        let cancel = shutdown.child_token();
        let pending_slot = match pending.admit(peer.ip(), permit, cancel.clone(), Instant::now()) {
            Ok(slot) => slot,
            Err(PendingRefusal::PerIp) => {
                Metrics::inc(&metrics.pending_over_ip_limit);
                tracing::debug!(%peer, "mqtt.max_pending_per_ip connections from this address are not yet authenticated; closing");
                continue;
            }
        };
        let job = Connection {
            settings: settings.clone(),
            acceptor: acceptor.clone(),
            connections: connections.clone(),
            slots: slots.clone(),
            inlet: inlet.clone(),
            metrics: metrics.clone(),
            peer,
            cancel,
        };
        tasks.spawn(job.serve(tcp, pending_slot));
    }
}

struct Connection {
    settings: FrontDoorSettings,
    acceptor: TlsAcceptor,
    connections: Arc<Connections>,
    slots: Arc<Semaphore>,
    inlet: InletSender,
    metrics: Arc<Metrics>,
    peer: SocketAddr,
    /// Closes this connection: the hub stopping, a newer connection of the
    /// same agent, or the engine (via the outlet).
    cancel: CancellationToken,
}

type Tls = tokio_rustls::server::TlsStream<TcpStream>;

/// What CONNECT left for the session.
struct Admitted {
    agent: AgentId,
    certificate: PeerCertificate,
    tls: Tls,
    keep_alive: Duration,
    /// Bytes the client pipelined after its CONNECT.
    rest: BytesMut,
    _slot: OwnedSemaphorePermit,
}

impl Connection {
    async fn serve(self, tcp: TcpStream, pending: PendingSlot) {
        let _ = tcp.set_nodelay(true);
        let admitted = tokio::select! {
            a = self.admit(tcp) => a,
            _ = self.cancel.cancelled() => Err(Refusal::Stopping),
        };
        drop(pending);
        let admitted = match admitted {
            Ok(admitted) => admitted,
            // Gone between the handshake and a CONNECT.
            Err(Refusal::Io(e)) => {
                Metrics::inc(&self.metrics.connect_refused);
                tracing::info!(peer = %self.peer, error = %e, "connection closed before CONNECT");
                return;
            }
            Err(refusal) => {
                self.count(&refusal);
                tracing::info!(peer = %self.peer, reason = %refusal, "connection refused");
                return;
            }
        };
        let agent = admitted.agent.clone();
        Metrics::inc(&self.metrics.sessions_established);
        let (conn, replaced) = self
            .connections
            .insert(admitted.certificate.clone(), self.cancel.clone());
        if replaced {
            Metrics::inc(&self.metrics.connections_replaced);
            tracing::info!(%agent, "a new connection replaces the agent's older one");
        }
        tracing::info!(peer = %self.peer, %agent, "agent connected");
        let result = self.session(admitted, conn).await;
        self.connections.remove(&agent, conn);
        let replaced = matches!(result, Err(Refusal::Replaced));
        let _ = self.inlet.disconnected(agent.clone(), conn, replaced).await;
        match result {
            Ok(()) => tracing::info!(%agent, "agent disconnected"),
            // The network went away (a reset, an end of stream without TLS
            // close_notify: a power cut looks like this); not misbehaviour.
            Err(refusal @ (Refusal::Io(_) | Refusal::Replaced | Refusal::Stopping)) => {
                self.count(&refusal);
                tracing::info!(%agent, reason = %refusal, "agent connection ended");
            }
            Err(refusal) => {
                self.count(&refusal);
                tracing::warn!(%agent, reason = %refusal, "agent connection closed");
            }
        }
    }

    fn count(&self, refusal: &Refusal) {
        let m = &self.metrics;
        let counter = match refusal {
            Refusal::Handshake(_) | Refusal::HandshakeTimeout => &m.tls_handshake_failures,
            Refusal::Identity(_) => &m.identity_rejected,
            Refusal::ConnectTimeout
            | Refusal::NotConnect
            | Refusal::ClientId { .. }
            | Refusal::Will => &m.connect_refused,
            Refusal::Full => &m.connections_over_limit,
            Refusal::Acl(_) => &m.acl_violations,
            Refusal::Malformed(_) => &m.malformed_packets,
            Refusal::KeepAlive => &m.keep_alive_timeouts,
            Refusal::SlowReader => &m.slow_readers_closed,
            Refusal::Replaced | Refusal::Stopping | Refusal::Io(_) => return,
        };
        Metrics::inc(counter);
    }

    /// TLS handshake, identity, a valid CONNECT and an agent slot.
    async fn admit(&self, tcp: TcpStream) -> Result<Admitted, Refusal> {
        let mut tls =
            tokio::time::timeout(self.settings.handshake_timeout, self.acceptor.accept(tcp))
                .await
                .map_err(|_| Refusal::HandshakeTimeout)?
                .map_err(Refusal::Handshake)?;
        let certificate = {
            let (_, session) = tls.get_ref();
            let cert = session
                .peer_certificates()
                .and_then(|c| c.first())
                .ok_or_else(|| Refusal::Identity("no client certificate".into()))?;
            peer_certificate(cert).map_err(|e| Refusal::Identity(e.to_string()))?
        };
        let agent = certificate.agent.clone();
        let mut buf = BytesMut::with_capacity(512);
        let packet = tokio::time::timeout(
            self.settings.connect_timeout,
            read_packet(&mut tls, &mut buf, self.settings.max_connect_bytes),
        )
        .await
        .map_err(|_| Refusal::ConnectTimeout)??
        .ok_or(Refusal::NotConnect)?;
        let Packet::Connect(connect) = packet else {
            return Err(Refusal::NotConnect);
        };
        let refuse = |code| Packet::ConnAck(ConnAck::new(code, false));
        if connect.client_id != agent.as_str() {
            let _ = write_packet(&mut tls, refuse(ConnectReturnCode::BadClientId)).await;
            return Err(Refusal::ClientId {
                client_id: connect.client_id,
            });
        }
        if connect.last_will.is_some() {
            let _ = write_packet(&mut tls, refuse(ConnectReturnCode::NotAuthorized)).await;
            return Err(Refusal::Will);
        }
        let slot = match self.slots.clone().try_acquire_owned() {
            Ok(slot) => Some(slot),
            // The newest connection of an agent wins even on a full hub: its
            // older one (often half-open after a network change) gives its
            // slot back as it closes.
            Err(_) if self.connections.close_current(&agent) => {
                Metrics::inc(&self.metrics.connections_replaced);
                tracing::info!(%agent, "a new connection replaces the agent's older one on a full hub");
                tokio::time::timeout(REPLACE_WAIT, self.slots.clone().acquire_owned())
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
            Err(_) => None,
        };
        let Some(slot) = slot else {
            let _ = write_packet(&mut tls, refuse(ConnectReturnCode::ServiceUnavailable)).await;
            return Err(Refusal::Full);
        };
        Ok(Admitted {
            agent,
            certificate,
            tls,
            keep_alive: Duration::from_secs(u64::from(connect.keep_alive)),
            rest: buf,
            _slot: slot,
        })
    }

    /// The connected session: announce it to the engine, CONNACK, then serve
    /// packets both ways until either side closes.
    async fn session(&self, admitted: Admitted, conn: ConnId) -> Result<(), Refusal> {
        let Admitted {
            agent,
            certificate: _,
            tls,
            keep_alive,
            rest,
            _slot,
        } = admitted;
        let (data_tx, data_rx) = mpsc::unbounded_channel();
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let outlet = Arc::new(ConnOutlet {
            tx: data_tx,
            queued: AtomicUsize::new(0),
            cancel: self.cancel.clone(),
            slow: AtomicBool::new(false),
        });
        // Announced before anything it sends, in one ordered stream; a
        // connection already replaced while it got here is not announced.
        if !self.connections.is_current(&agent, conn) {
            return Err(Refusal::Replaced);
        }
        self.inlet
            .connected(agent.clone(), conn, outlet.clone())
            .await
            .map_err(|_| Refusal::Stopping)?;
        let granted = AtomicU8::new(NOT_SUBSCRIBED);
        let down = down_topic(&agent);
        let (rd, wr) = tokio::io::split(tls);
        let writer = Writer {
            agent: &agent,
            topic: &down,
            granted: &granted,
            queued: &outlet.queued,
            metrics: &self.metrics,
        };
        let reader = Reader {
            conn: self,
            id: conn,
            agent: &agent,
            up: up_topic(&agent),
            down: &down,
            granted: &granted,
            control: control_tx,
            keep_alive,
        };
        control_send(&reader.control, Control::ConnAck).await?;
        tokio::select! {
            r = reader.run(rd, rest) => r,
            r = writer.run(wr, control_rx, data_rx) => r,
            _ = self.cancel.cancelled() => Err(
                if outlet.slow.load(Ordering::Relaxed) {
                    Refusal::SlowReader
                } else if self.connections.is_current(&agent, conn) {
                    Refusal::Stopping
                } else {
                    Refusal::Replaced
                },
            ),
        }
    }
}

const NOT_SUBSCRIBED: u8 = u8::MAX;

/// A packet the front door answers with, kept small: every connection has a
/// queue of them.
#[derive(Debug, Clone, Copy)]
enum Control {
    ConnAck,
    PubAck(u16),
    SubAck { pkid: u16, qos: QoS, filters: usize },
    UnsubAck(u16),
    PingResp,
}

impl Control {
    fn packet(self) -> Packet {
        match self {
            Control::ConnAck => Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)),
            Control::PubAck(pkid) => Packet::PubAck(PubAck::new(pkid)),
            Control::SubAck { pkid, qos, filters } => Packet::SubAck(SubAck::new(
                pkid,
                vec![SubscribeReasonCode::Success(qos); filters],
            )),
            Control::UnsubAck(pkid) => Packet::UnsubAck(UnsubAck::new(pkid)),
            Control::PingResp => Packet::PingResp,
        }
    }
}

async fn control_send(control: &mpsc::Sender<Control>, packet: Control) -> Result<(), Refusal> {
    control
        .send(packet)
        .await
        .map_err(|_| Refusal::Io(std::io::ErrorKind::BrokenPipe.into()))
}

/// Reads and checks every packet from the agent.
struct Reader<'a> {
    conn: &'a Connection,
    id: ConnId,
    agent: &'a AgentId,
    up: String,
    down: &'a str,
    granted: &'a AtomicU8,
    control: mpsc::Sender<Control>,
    keep_alive: Duration,
}

impl Reader<'_> {
    async fn run<R: AsyncRead + Unpin>(self, mut rd: R, mut buf: BytesMut) -> Result<(), Refusal> {
        let settings = &self.conn.settings;
        let metrics = &self.conn.metrics;
        let now = Instant::now();
        let mut messages = Bucket::new(settings.messages, now);
        let mut bytes = Bucket::new(settings.bytes, now);
        let share = InletShare::new(INLET_SHARE_MESSAGES, INLET_SHARE_BYTES);
        // MQTT 3.1.1 §3.1.2.10: one and a half keep-alive periods.
        let idle_limit = (!self.keep_alive.is_zero()).then(|| self.keep_alive * 3 / 2);
        loop {
            let next = read_packet(&mut rd, &mut buf, MAX_PACKET_BYTES);
            let packet = match idle_limit {
                Some(limit) => tokio::time::timeout(limit, next)
                    .await
                    .map_err(|_| Refusal::KeepAlive)??,
                None => next.await?,
            };
            let Some(packet) = packet else {
                return Ok(());
            };
            if buf.is_empty() && buf.capacity() > IDLE_READ_BUFFER {
                buf = BytesMut::with_capacity(IDLE_READ_BUFFER);
            }
            check_packet(&packet, &self.up, self.down)?;
            match packet {
                Packet::Publish(publish) => {
                    let now = Instant::now();
                    let wait = messages
                        .take(1.0, now)
                        .max(bytes.take(publish.payload.len() as f64, now));
                    if !wait.is_zero() {
                        Metrics::inc(&metrics.messages_throttled);
                        tokio::time::sleep(wait).await;
                    }
                    let pkid = publish.pkid;
                    let qos = publish.qos;
                    self.conn
                        .inlet
                        .message(self.agent.clone(), self.id, publish.payload, &share)
                        .await
                        .map_err(|_| Refusal::Stopping)?;
                    // The transport's ack: the engine holds the message. The
                    // protocol's own ack follows its commit.
                    if qos == QoS::AtLeastOnce {
                        control_send(&self.control, Control::PubAck(pkid)).await?;
                    }
                }
                Packet::Subscribe(subscribe) => {
                    // QoS 1 at most: the hub never sends QoS 2.
                    let qos = if subscribe.filters.iter().all(|f| f.qos == QoS::AtMostOnce) {
                        QoS::AtMostOnce
                    } else {
                        QoS::AtLeastOnce
                    };
                    self.granted.store(qos as u8, Ordering::Relaxed);
                    let filters = subscribe.filters.len();
                    let pkid = subscribe.pkid;
                    control_send(&self.control, Control::SubAck { pkid, qos, filters }).await?;
                }
                Packet::Unsubscribe(unsubscribe) => {
                    self.granted.store(NOT_SUBSCRIBED, Ordering::Relaxed);
                    control_send(&self.control, Control::UnsubAck(unsubscribe.pkid)).await?;
                }
                Packet::PingReq => control_send(&self.control, Control::PingResp).await?,
                Packet::Disconnect => return Ok(()),
                // Acks of the hub's QoS 1 publishes: the protocol's own acks
                // are what count, so nothing waits on these.
                _ => {}
            }
        }
    }
}

/// Writes control packets and the engine's messages to the agent, gathering
/// what is queued into few TLS writes.
struct Writer<'a> {
    agent: &'a AgentId,
    topic: &'a str,
    granted: &'a AtomicU8,
    queued: &'a AtomicUsize,
    metrics: &'a Metrics,
}

impl Writer<'_> {
    async fn run<W: AsyncWrite + Unpin>(
        self,
        mut wr: W,
        mut control: mpsc::Receiver<Control>,
        mut data: mpsc::UnboundedReceiver<Bytes>,
    ) -> Result<(), Refusal> {
        // Grown on first use and given back after a large write: most
        // connections are idle most of the time.
        let mut out = BytesMut::new();
        let mut pkid: u16 = 0;
        let mut data_open = true;
        loop {
            tokio::select! {
                biased;
                p = control.recv() => match p {
                    Some(p) => encode(&mut out, p.packet())?,
                    None => return Ok(()),
                },
                m = data.recv(), if data_open => match m {
                    Some(m) => self.publish(&mut out, &mut pkid, m)?,
                    None => data_open = false,
                },
            }
            while out.len() < WRITE_CHUNK {
                if let Ok(p) = control.try_recv() {
                    encode(&mut out, p.packet())?;
                } else if let Ok(m) = data.try_recv() {
                    self.publish(&mut out, &mut pkid, m)?;
                } else {
                    break;
                }
            }
            wr.write_all(&out).await.map_err(Refusal::Io)?;
            wr.flush().await.map_err(Refusal::Io)?;
            out.clear();
            if out.capacity() > IDLE_WRITE_BUFFER {
                out = BytesMut::new();
            }
        }
    }

    fn publish(&self, out: &mut BytesMut, pkid: &mut u16, payload: Bytes) -> Result<(), Refusal> {
        self.queued.fetch_sub(payload.len(), Ordering::Relaxed);
        let qos = match self.granted.load(Ordering::Relaxed) {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => {
                // MQTT delivers nothing without a matching subscription; the
                // protocol resends once the agent subscribes and asks again.
                Metrics::inc(&self.metrics.downstream_unsubscribed);
                tracing::debug!(agent = %self.agent, "dropped a downstream message: not subscribed");
                return Ok(());
            }
        };
        let mut publish = Publish::from_bytes(self.topic, qos, payload);
        if qos == QoS::AtLeastOnce {
            *pkid = pkid.checked_add(1).unwrap_or(1);
            publish.pkid = *pkid;
        }
        encode(out, Packet::Publish(publish))
    }
}

fn encode(out: &mut BytesMut, packet: Packet) -> Result<(), Refusal> {
    packet
        .write(out, MAX_PACKET_BYTES)
        .map(|_| ())
        .map_err(Refusal::Malformed)
}

/// The engine's handle on one front-door connection.
#[derive(Debug)]
struct ConnOutlet {
    tx: mpsc::UnboundedSender<Bytes>,
    /// Bytes queued and not yet taken by the writer.
    queued: AtomicUsize,
    cancel: CancellationToken,
    /// Set when the queue overflowed (the close is the peer's fault).
    slow: AtomicBool,
}

impl Outlet for ConnOutlet {
    fn send(&self, payload: Bytes) -> Result<(), SendError> {
        if self.cancel.is_cancelled() {
            return Err(SendError::Closed);
        }
        let len = payload.len();
        if self.queued.load(Ordering::Relaxed) + len > OUTBOUND_QUEUE_BYTES {
            self.slow.store(true, Ordering::Relaxed);
            return Err(SendError::Full);
        }
        self.queued.fetch_add(len, Ordering::Relaxed);
        self.tx.send(payload).map_err(|_| {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            SendError::Closed
        })
    }

    fn close(&self) {
        self.cancel.cancel();
    }
}

/// The topic ACL and protocol rules for packets from an agent.
fn check_packet(packet: &Packet, up: &str, down: &str) -> Result<(), Refusal> {
    match packet {
        Packet::Publish(p) => {
            if p.topic != up {
                return Err(Refusal::Acl(format!("publish to {:?}", p.topic)));
            }
            if p.retain {
                return Err(Refusal::Acl("retained publish".into()));
            }
            if p.qos == QoS::ExactlyOnce {
                return Err(Refusal::Acl("QoS 2 publish".into()));
            }
            Ok(())
        }
        Packet::Subscribe(s) => match s.filters.iter().find(|f| f.path != down) {
            Some(f) => Err(Refusal::Acl(format!("subscribe to {:?}", f.path))),
            None if s.filters.is_empty() => Err(Refusal::Acl("empty subscribe".into())),
            None => Ok(()),
        },
        Packet::Unsubscribe(u) => match u.topics.iter().find(|t| *t != down) {
            Some(t) => Err(Refusal::Acl(format!("unsubscribe from {t:?}"))),
            None => Ok(()),
        },
        Packet::PubAck(_)
        | Packet::PubRec(_)
        | Packet::PubRel(_)
        | Packet::PubComp(_)
        | Packet::PingReq
        | Packet::Disconnect => Ok(()),
        Packet::Connect(_) => Err(Refusal::Acl("second CONNECT".into())),
        other => Err(Refusal::Acl(format!(
            "server-only packet {:?}",
            packet_name(other)
        ))),
    }
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::ConnAck(_) => "CONNACK",
        Packet::SubAck(_) => "SUBACK",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingResp => "PINGRESP",
        _ => "other",
    }
}

/// Reads one MQTT packet of at most `max` bytes; `None` on a clean end of
/// stream between packets.
async fn read_packet<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<Packet>, Refusal> {
    loop {
        match Packet::read(buf, max) {
            Ok(packet) => return Ok(Some(packet)),
            Err(rumqttc::Error::InsufficientBytes(_)) => {}
            Err(e) => return Err(Refusal::Malformed(e)),
        }
        if rd.read_buf(buf).await.map_err(Refusal::Io)? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(Refusal::Io(std::io::ErrorKind::UnexpectedEof.into()))
            };
        }
    }
}

async fn write_packet<W: AsyncWrite + Unpin>(wr: &mut W, packet: Packet) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    packet
        .write(&mut out, MAX_PACKET_BYTES)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    wr.write_all(&out).await?;
    wr.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::{Publish, Subscribe, SubscribeFilter, Unsubscribe};

    const UP: &str = "fieldsync/v1/agents/a/up";
    const DOWN: &str = "fieldsync/v1/agents/a/down";

    fn allowed(p: Packet) -> bool {
        check_packet(&p, UP, DOWN).is_ok()
    }

    #[test]
    fn an_agent_may_use_only_its_own_topics() {
        assert!(allowed(Packet::Publish(Publish::new(
            UP,
            QoS::AtLeastOnce,
            vec![1]
        ))));
        assert!(!allowed(Packet::Publish(Publish::new(
            "fieldsync/v1/agents/b/up",
            QoS::AtLeastOnce,
            vec![1]
        ))));
        assert!(!allowed(Packet::Publish(Publish::new(
            DOWN,
            QoS::AtLeastOnce,
            vec![1]
        ))));
        let mut retained = Publish::new(UP, QoS::AtLeastOnce, vec![1]);
        retained.retain = true;
        assert!(!allowed(Packet::Publish(retained)));
        assert!(!allowed(Packet::Publish(Publish::new(
            UP,
            QoS::ExactlyOnce,
            vec![1]
        ))));

        assert!(allowed(Packet::Subscribe(Subscribe::new(
            DOWN,
            QoS::AtLeastOnce
        ))));
        for filter in [
            "fieldsync/v1/agents/+/down",
            "#",
            "fieldsync/v1/agents/b/down",
            UP,
        ] {
            assert!(
                !allowed(Packet::Subscribe(Subscribe::new(filter, QoS::AtLeastOnce))),
                "{filter}"
            );
        }
        let mixed = Subscribe::new_many([
            SubscribeFilter::new(DOWN.into(), QoS::AtLeastOnce),
            SubscribeFilter::new("#".into(), QoS::AtLeastOnce),
        ]);
        assert!(!allowed(Packet::Subscribe(mixed)));
        assert!(allowed(Packet::Unsubscribe(Unsubscribe::new(DOWN))));
        assert!(!allowed(Packet::Unsubscribe(Unsubscribe::new("#"))));
    }

    #[test]
    fn protocol_rules() {
        assert!(allowed(Packet::PingReq));
        assert!(allowed(Packet::Disconnect));
        assert!(!allowed(Packet::PingResp));
        assert!(!allowed(Packet::Connect(rumqttc::Connect::new("a"))));
        assert!(!allowed(Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            false
        ))));
    }
}
