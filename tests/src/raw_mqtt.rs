//! A raw MQTT 3.1.1 client over TLS for security tests: it speaks packet by
//! packet (rumqttc's `Packet` codec over a tokio-rustls stream), so a test can
//! send what a well-behaved client never would (another agent's topic, a last
//! will, garbage) and see exactly how the hub answers: a packet, a closed
//! connection, or silence. Also the TLS client configurations a test needs:
//! the fleet's mutual-TLS one and one that presents no client certificate.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::BytesMut;
use fieldsync_shared::codec;
use fieldsync_shared::hlc::system_now_ms;
use fieldsync_shared::wire::{
    down_topic, up_topic, Envelope, Hello, Message, Snapshot, SnapshotAck, Welcome,
};
use fieldsync_shared::{AgentId, Cursor, Incarnation, Mark, Seq};
use rumqttc::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, QoS, SubAck, Subscribe,
    SubscribeReasonCode,
};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Largest packet the raw client reads (the hub's limit is 1 MiB plus headers).
const MAX_PACKET: usize = 2 << 20;
/// Deadline for TCP connect plus the client side of the TLS handshake.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// The fleet's client configuration: TLS 1.3, ring, the agent's certificate.
pub fn mtls_config(ca: &Path, cert: &Path, key: &Path) -> anyhow::Result<Arc<ClientConfig>> {
    Ok(fieldsync_shared::tls::client_config(ca, cert, key)?)
}

/// A client configuration that trusts the fleet CA (so the hub's certificate is
/// accepted) but presents no client certificate of its own.
pub fn no_client_cert_config(ca: &Path) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in fieldsync_shared::tls::load_certs(ca)? {
        roots.add(cert)?;
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(Arc::new(config))
}

/// What the connection did next.
#[derive(Debug)]
pub enum Next {
    /// A packet from the hub.
    Packet(Packet),
    /// The hub closed the connection (end of stream, a TLS alert or a reset).
    Closed(String),
    /// Nothing within the time allowed; the connection is still open.
    Silent,
}

/// One raw MQTT connection over TLS.
pub struct RawMqtt {
    stream: TlsStream<TcpStream>,
    buf: BytesMut,
}

impl RawMqtt {
    /// TCP connect and the client side of the TLS handshake (the server name is
    /// the address's IP, which the hub's certificate carries). In TLS 1.3 the
    /// client finishes its handshake before the server has checked the client
    /// certificate, so a refused certificate shows up on the first read. Fails
    /// if it takes longer than [`HANDSHAKE_DEADLINE`].
    pub async fn tls(addr: SocketAddr, config: Arc<ClientConfig>) -> anyhow::Result<Self> {
        Self::tls_from(None, addr, config).await
    }

    /// [`RawMqtt::tls`] from the source address `from` (any loopback address
    /// 127.x.y.z works on Linux): many clients on one machine then look like
    /// many hosts, and are not limited to one address's ephemeral ports.
    pub async fn tls_from(
        from: Option<IpAddr>,
        addr: SocketAddr,
        config: Arc<ClientConfig>,
    ) -> anyhow::Result<Self> {
        let handshake = async {
            let socket = match addr {
                SocketAddr::V4(_) => TcpSocket::new_v4()?,
                SocketAddr::V6(_) => TcpSocket::new_v6()?,
            };
            if let Some(ip) = from {
                socket
                    .bind(SocketAddr::new(ip, 0))
                    .with_context(|| format!("cannot bind to {ip}"))?;
            }
            let tcp = socket
                .connect(addr)
                .await
                .with_context(|| format!("cannot connect to {addr}"))?;
            tcp.set_nodelay(true)?;
            let stream = TlsConnector::from(config)
                .connect(ServerName::IpAddress(addr.ip().into()), tcp)
                .await?;
            anyhow::Ok(stream)
        };
        let stream = tokio::time::timeout(HANDSHAKE_DEADLINE, handshake)
            .await
            .map_err(|_| anyhow!("no TLS handshake with {addr} within {HANDSHAKE_DEADLINE:?}"))??;
        Ok(Self {
            stream,
            buf: BytesMut::with_capacity(4096),
        })
    }

    /// TLS, then a CONNECT for `client_id` (clean session, 60 s keep-alive);
    /// fails unless the hub answers with a successful CONNACK.
    pub async fn open(
        addr: SocketAddr,
        config: Arc<ClientConfig>,
        client_id: &str,
        within: Duration,
    ) -> anyhow::Result<Self> {
        let mut client = Self::tls(addr, config).await?;
        let ack = client.connect(connect_packet(client_id), within).await?;
        if ack.code != ConnectReturnCode::Success {
            bail!("the hub refused CONNECT of {client_id:?}: {:?}", ack.code);
        }
        Ok(client)
    }

    /// Sends `connect` and returns the hub's CONNACK; an error if the hub closes
    /// the connection or stays silent instead.
    pub async fn connect(&mut self, connect: Connect, within: Duration) -> anyhow::Result<ConnAck> {
        self.send(Packet::Connect(connect)).await?;
        match self.next(within).await {
            Next::Packet(Packet::ConnAck(ack)) => Ok(ack),
            other => Err(anyhow!("expected CONNACK, got {other:?}")),
        }
    }

    /// Writes one packet.
    pub async fn send(&mut self, packet: Packet) -> anyhow::Result<()> {
        let mut out = BytesMut::new();
        packet
            .write(&mut out, MAX_PACKET)
            .map_err(|e| anyhow!("cannot encode {packet:?}: {e}"))?;
        self.stream.write_all(&out).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Publishes `payload` to `topic` at `qos` (packet id 1 for QoS 1).
    pub async fn publish(&mut self, topic: &str, qos: QoS, payload: Vec<u8>) -> anyhow::Result<()> {
        let mut publish = Publish::new(topic, qos, payload);
        if qos != QoS::AtMostOnce {
            publish.pkid = 1;
        }
        self.send(Packet::Publish(publish)).await
    }

    /// Publishes an envelope holding `msg` to `topic` at QoS 1.
    pub async fn publish_msg(&mut self, topic: &str, msg: Message) -> anyhow::Result<()> {
        let bytes = codec::encode(&Envelope::new(msg))?;
        self.publish(topic, QoS::AtLeastOnce, bytes).await
    }

    /// Subscribes to `filter` at QoS 1 (packet id 1) and waits for the SUBACK.
    pub async fn subscribe(&mut self, filter: &str, within: Duration) -> anyhow::Result<SubAck> {
        let mut subscribe = Subscribe::new(filter, QoS::AtLeastOnce);
        subscribe.pkid = 1;
        self.send(Packet::Subscribe(subscribe)).await?;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Next::Packet(Packet::SubAck(ack)) => return Ok(ack),
                Next::Packet(Packet::PubAck(_)) => {}
                other => bail!("expected SUBACK for {filter:?}, got {other:?}"),
            }
        }
    }

    /// The next packet, or how the connection ended, or [`Next::Silent`] after
    /// `within`.
    pub async fn next(&mut self, within: Duration) -> Next {
        let read = async {
            loop {
                match Packet::read(&mut self.buf, MAX_PACKET) {
                    Ok(packet) => return Next::Packet(packet),
                    Err(rumqttc::Error::InsufficientBytes(_)) => {}
                    Err(e) => return Next::Closed(format!("undecodable packet from the hub: {e}")),
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) => return Next::Closed("end of stream".into()),
                    Ok(_) => {}
                    Err(e) => return Next::Closed(e.to_string()),
                }
            }
        };
        tokio::time::timeout(within, read)
            .await
            .unwrap_or(Next::Silent)
    }

    /// The next PUBLISH from the hub within `within` (acknowledging it if it is
    /// QoS 1, skipping acknowledgements of ours); `None` if none arrived or the
    /// connection closed.
    pub async fn next_publish(&mut self, within: Duration) -> anyhow::Result<Option<Publish>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Next::Packet(Packet::Publish(p)) => {
                    if p.qos == QoS::AtLeastOnce {
                        self.send(Packet::PubAck(PubAck::new(p.pkid))).await?;
                    }
                    return Ok(Some(p));
                }
                Next::Packet(Packet::PubAck(_) | Packet::SubAck(_) | Packet::PingResp) => {}
                Next::Packet(other) => bail!("unexpected packet from the hub: {other:?}"),
                Next::Closed(why) => bail!("the hub closed the connection: {why}"),
                Next::Silent => return Ok(None),
            }
        }
    }

    /// The next envelope the hub publishes within `within`, decoded.
    pub async fn next_msg(&mut self, within: Duration) -> anyhow::Result<Message> {
        match self.next_publish(within).await? {
            Some(p) => Ok(codec::decode(&p.payload)
                .with_context(|| format!("undecodable message on {}", p.topic))?
                .msg),
            None => bail!("no message from the hub within {within:?}"),
        }
    }

    /// The next message that is not the hub's clock (`Time`).
    pub async fn next_non_time(&mut self, within: Duration) -> anyhow::Result<Message> {
        loop {
            match self.next_msg(within).await? {
                Message::Time(_) => {}
                other => return Ok(other),
            }
        }
    }

    /// Subscribes to `agent`'s down topic (failing unless granted) and says
    /// hello as store `incarnation`, following no hub stream; the welcome.
    pub async fn say_hello(
        &mut self,
        agent: &AgentId,
        incarnation: Incarnation,
        within: Duration,
    ) -> anyhow::Result<Welcome> {
        let ack = self.subscribe(&down_topic(agent), within).await?;
        if !matches!(ack.return_codes[..], [SubscribeReasonCode::Success(_)]) {
            bail!("own down topic refused: {ack:?}");
        }
        let hello = Message::Hello(Hello {
            agent: agent.clone(),
            incarnation,
            down: Cursor::default(),
            time_ms: system_now_ms(),
            correction_ms: 0,
            rules: Default::default(),
        });
        self.publish_msg(&up_topic(agent), hello).await?;
        match self.next_non_time(within).await? {
            Message::Welcome(w) => Ok(w),
            other => bail!("expected a welcome, got {other:?}"),
        }
    }

    /// After the welcome (protocol v2): takes the hub's resync (the store
    /// follows no hub stream) and, unless the hub already follows this
    /// incarnation's stream, resyncs the hub with an empty snapshot. Returns
    /// the upstream position batches continue after.
    pub async fn finish_link(
        &mut self,
        agent: &AgentId,
        incarnation: Incarnation,
        welcome: &Welcome,
        within: Duration,
    ) -> anyhow::Result<Seq> {
        let up = up_topic(agent);
        loop {
            match self.next_non_time(within).await? {
                Message::Snapshot(s) => {
                    let last = s.end.is_some();
                    let ack = SnapshotAck {
                        resync: s.resync,
                        part: s.part,
                    };
                    self.publish_msg(&up, Message::SnapshotAck(ack)).await?;
                    if last {
                        break;
                    }
                }
                other => bail!("expected the hub's snapshot, got {other:?}"),
            }
        }
        if welcome.up.source == Some(incarnation) {
            return Ok(welcome.up.at.seq);
        }
        let empty = Snapshot {
            resync: 1,
            part: 1,
            changes: vec![],
            end: Some(Mark::default()),
        };
        self.publish_msg(&up, Message::Snapshot(empty)).await?;
        match self.next_non_time(within).await? {
            Message::SnapshotAck(_) => Ok(Seq(0)),
            other => bail!("expected a snapshot ack, got {other:?}"),
        }
    }

    /// The TLS stream and the bytes read from it but not yet parsed, for a
    /// test that drives the connection itself (a flood, say).
    pub fn into_parts(self) -> (TlsStream<TcpStream>, BytesMut) {
        (self.stream, self.buf)
    }

    /// Reads until the hub closes the connection; returns every packet it sent
    /// before closing and how it closed. An error if it is still open after
    /// `within`.
    pub async fn until_closed(
        &mut self,
        within: Duration,
    ) -> anyhow::Result<(Vec<Packet>, String)> {
        let deadline = tokio::time::Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Next::Packet(p) => seen.push(p),
                Next::Closed(why) => return Ok((seen, why)),
                Next::Silent => {
                    bail!("the hub kept the connection open for {within:?}; it sent {seen:?}")
                }
            }
        }
    }
}

/// A plain TCP connection to `addr` from the source address `from` (any
/// loopback address 127.x.y.z works on Linux), with TCP_NODELAY.
pub async fn tcp_from(from: IpAddr, addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket
        .bind(SocketAddr::new(from, 0))
        .with_context(|| format!("cannot bind to {from}"))?;
    let tcp = socket
        .connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr} from {from}"))?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// A CONNECT for `client_id`: clean session, 60 s keep-alive, no will, no login.
pub fn connect_packet(client_id: &str) -> Connect {
    let mut connect = Connect::new(client_id);
    connect.keep_alive = 60;
    connect
}
