//! The hub's public MQTT listener: mutual TLS (rustls, ring), identity from the
//! client certificate, and an MQTT 3.1.1 packet filter in front of the internal
//! broker.
//!
//! **Architecture invariant:** an agent can touch only its own topics. Its
//! identity is its certificate's CN; its CONNECT must carry that id; it may
//! publish only to `up_topic(id)` and subscribe only to `down_topic(id)`. Any
//! other packet closes the connection, with a log line and a counter.
//!
//! **Architecture invariant:** no connection can block another. Each accepted
//! socket gets its own task; the TLS handshake and the first packet each run
//! under a timeout; the number of connections is capped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use fieldsync_shared::tls::peer_agent_id;
use fieldsync_shared::wire::{down_topic, up_topic};
use fieldsync_shared::AgentId;
use rumqttc::{ConnAck, ConnectReturnCode, Packet, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{FRONT_DOOR_USER, MAX_PACKET_BYTES};
use crate::engine::EngineEvent;
use crate::metrics::Metrics;

/// Settings of the front door.
#[derive(Clone)]
pub struct FrontDoorSettings {
    pub tls: Arc<rustls::ServerConfig>,
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    /// The internal broker and the secret it expects.
    pub broker_addr: SocketAddr,
    pub broker_secret: String,
}

/// Which agents are connected right now (agent id → connection number).
#[derive(Debug, Default)]
pub struct Connections {
    live: Mutex<HashMap<AgentId, u64>>,
}

impl Connections {
    pub fn is_connected(&self, agent: &AgentId) -> bool {
        self.live
            .lock()
            .map(|m| m.contains_key(agent))
            .unwrap_or(false)
    }

    pub fn count(&self) -> usize {
        self.live.lock().map(|m| m.len()).unwrap_or(0)
    }

    fn insert(&self, agent: &AgentId, conn: u64) {
        if let Ok(mut m) = self.live.lock() {
            m.insert(agent.clone(), conn);
        }
    }

    /// Removes the entry only if it is still this connection's.
    fn remove(&self, agent: &AgentId, conn: u64) {
        if let Ok(mut m) = self.live.lock() {
            if m.get(agent) == Some(&conn) {
                m.remove(agent);
            }
        }
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
    #[error("{0}")]
    Acl(String),
    #[error("malformed packet: {0}")]
    Malformed(rumqttc::Error),
    #[error("internal broker: {0}")]
    Broker(std::io::Error),
    #[error("connection: {0}")]
    Io(std::io::Error),
}

/// Accepts connections on `listener` until `shutdown`.
pub async fn run(
    listener: TcpListener,
    settings: FrontDoorSettings,
    connections: Arc<Connections>,
    events: mpsc::UnboundedSender<EngineEvent>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let acceptor = TlsAcceptor::from(settings.tls.clone());
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let next_conn = AtomicU64::new(1);
    loop {
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            Metrics::inc(&metrics.connections_over_limit);
            tracing::warn!(%peer, limit = settings.max_connections, "connection limit reached; closing");
            continue;
        };
        let conn = next_conn.fetch_add(1, Ordering::Relaxed);
        let job = Connection {
            settings: settings.clone(),
            acceptor: acceptor.clone(),
            connections: connections.clone(),
            events: events.clone(),
            metrics: metrics.clone(),
            peer,
            conn,
        };
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let _slot = slot;
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = job.serve(tcp) => {}
            }
        });
    }
}

struct Connection {
    settings: FrontDoorSettings,
    acceptor: TlsAcceptor,
    connections: Arc<Connections>,
    events: mpsc::UnboundedSender<EngineEvent>,
    metrics: Arc<Metrics>,
    peer: SocketAddr,
    conn: u64,
}

impl Connection {
    async fn serve(self, tcp: TcpStream) {
        let _ = tcp.set_nodelay(true);
        let (agent, tls, first) = match self.admit(tcp).await {
            Ok(admitted) => admitted,
            Err(refusal) => {
                self.count(&refusal);
                tracing::info!(peer = %self.peer, reason = %refusal, "connection refused");
                return;
            }
        };
        Metrics::inc(&self.metrics.sessions_established);
        self.connections.insert(&agent, self.conn);
        let _ = self.events.send(EngineEvent::Connected {
            agent: agent.clone(),
            conn: self.conn,
        });
        tracing::info!(peer = %self.peer, %agent, "agent connected");
        let result = self.relay(&agent, tls, first).await;
        self.connections.remove(&agent, self.conn);
        let _ = self.events.send(EngineEvent::Disconnected {
            agent: agent.clone(),
            conn: self.conn,
        });
        match result {
            Ok(()) => tracing::info!(%agent, "agent disconnected"),
            // The network went away (a reset, an end of stream without TLS
            // close_notify: a power cut looks like this); not misbehaviour.
            Err(refusal @ Refusal::Io(_)) => {
                self.count(&refusal);
                tracing::info!(%agent, reason = %refusal, "agent connection lost");
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
            Refusal::Acl(_) => &m.acl_violations,
            Refusal::Malformed(_) => &m.malformed_packets,
            Refusal::Broker(_) | Refusal::Io(_) => return,
        };
        Metrics::inc(counter);
    }

    /// TLS handshake, identity, and a valid CONNECT rewritten for the broker.
    async fn admit(
        &self,
        tcp: TcpStream,
    ) -> Result<
        (
            AgentId,
            tokio_rustls::server::TlsStream<TcpStream>,
            BytesMut,
        ),
        Refusal,
    > {
        let mut tls =
            tokio::time::timeout(self.settings.handshake_timeout, self.acceptor.accept(tcp))
                .await
                .map_err(|_| Refusal::HandshakeTimeout)?
                .map_err(Refusal::Handshake)?;
        let agent = {
            let (_, session) = tls.get_ref();
            let cert = session
                .peer_certificates()
                .and_then(|c| c.first())
                .ok_or_else(|| Refusal::Identity("no client certificate".into()))?;
            peer_agent_id(cert).map_err(|e| Refusal::Identity(e.to_string()))?
        };
        let mut buf = BytesMut::with_capacity(4096);
        let packet = tokio::time::timeout(
            self.settings.connect_timeout,
            read_packet(&mut tls, &mut buf),
        )
        .await
        .map_err(|_| Refusal::ConnectTimeout)??
        .ok_or(Refusal::NotConnect)?;
        let Packet::Connect(mut connect) = packet else {
            return Err(Refusal::NotConnect);
        };
        if connect.client_id != agent.as_str() {
            let _ = write_packet(
                &mut tls,
                Packet::ConnAck(ConnAck::new(ConnectReturnCode::BadClientId, false)),
            )
            .await;
            return Err(Refusal::ClientId {
                client_id: connect.client_id,
            });
        }
        if connect.last_will.is_some() {
            let _ = write_packet(
                &mut tls,
                Packet::ConnAck(ConnAck::new(ConnectReturnCode::NotAuthorized, false)),
            )
            .await;
            return Err(Refusal::Will);
        }
        connect.set_login(FRONT_DOOR_USER, &self.settings.broker_secret);
        let mut first = BytesMut::new();
        Packet::Connect(connect)
            .write(&mut first, MAX_PACKET_BYTES)
            .map_err(Refusal::Malformed)?;
        // Whatever the client pipelined after CONNECT is checked by the relay.
        first.extend_from_slice(&buf);
        Ok((agent, tls, first))
    }

    /// Pumps packets both ways until either side closes; checks every packet
    /// from the client. `first` holds the rewritten CONNECT and any bytes the
    /// client sent after it.
    async fn relay(
        &self,
        agent: &AgentId,
        client: tokio_rustls::server::TlsStream<TcpStream>,
        mut first: BytesMut,
    ) -> Result<(), Refusal> {
        let broker = TcpStream::connect(self.settings.broker_addr)
            .await
            .map_err(Refusal::Broker)?;
        let _ = broker.set_nodelay(true);
        let (mut broker_rd, mut broker_wr) = broker.into_split();
        let (mut client_rd, mut client_wr) = tokio::io::split(client);
        let connect = first.split_to(connect_len(&first)?);
        broker_wr
            .write_all(&connect)
            .await
            .map_err(Refusal::Broker)?;
        let mut pending = first;
        let up = up_topic(agent);
        let down = down_topic(agent);
        let inbound = async {
            loop {
                let Some(packet) = read_packet(&mut client_rd, &mut pending).await? else {
                    return Ok(());
                };
                check_packet(&packet, &up, &down)?;
                let disconnect = matches!(packet, Packet::Disconnect);
                write_packet(&mut broker_wr, packet)
                    .await
                    .map_err(Refusal::Broker)?;
                if disconnect {
                    return Ok(());
                }
            }
        };
        let outbound = async {
            tokio::io::copy(&mut broker_rd, &mut client_wr)
                .await
                .map_err(Refusal::Io)?;
            client_wr.shutdown().await.map_err(Refusal::Io)
        };
        tokio::select! {
            r = inbound => r,
            r = outbound => r,
        }
    }
}

/// The length of the first (CONNECT) frame in `buf`.
fn connect_len(buf: &BytesMut) -> Result<usize, Refusal> {
    rumqttc::mqttbytes::check(buf.iter(), MAX_PACKET_BYTES)
        .map(|h| h.frame_length())
        .map_err(Refusal::Malformed)
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

/// Reads one MQTT packet; `None` on a clean end of stream between packets.
async fn read_packet<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
) -> Result<Option<Packet>, Refusal> {
    loop {
        match Packet::read(buf, MAX_PACKET_BYTES) {
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
    wr.write_all(&out).await
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
