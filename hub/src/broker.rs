//! The embedded rumqttd broker, used as an internal router only. It listens on a
//! loopback port without TLS; the front door is its only legitimate client, and
//! proves it with a per-process secret in the CONNECT password, so a local
//! process that bypasses the front door is refused. The sync engine reaches it
//! through the in-process link.
//!
//! rumqttd facts this module works around (see PRODUCT.md): `Broker::start`
//! blocks forever and swallows bind errors, so it runs on its own thread and the
//! listener is probed with a real authenticated CONNECT before use; connection
//! accept is serial with a per-connection delay, set to zero here.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::{ConnAck, Connect, ConnectReturnCode, Packet};
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use fieldsync_shared::wire::MAX_MESSAGE_BYTES;

/// Largest MQTT packet the broker and front door accept: one envelope plus the
/// topic and headers.
pub const MAX_PACKET_BYTES: usize = MAX_MESSAGE_BYTES + 1024;
/// MQTT client ids of the hub's own broker clients. A leading `_` can never
/// start an [`fieldsync_shared::AgentId`], so no agent can take over these
/// sessions by connecting with the same id.
pub const ENGINE_CLIENT_ID: &str = "_fieldsync-engine";
const PROBE_CLIENT_ID: &str = "_fieldsync-probe";
/// Username the front door presents to the broker.
pub const FRONT_DOOR_USER: &str = "fieldsync-front-door";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    #[error("cannot reserve a loopback port for the internal broker: {0}")]
    Port(std::io::Error),
    #[error("cannot create the broker's in-process link: {0}")]
    Link(String),
    #[error("cannot start the broker thread: {0}")]
    Thread(std::io::Error),
    #[error("the internal broker on {addr} did not accept an authenticated CONNECT: {reason}")]
    NotReady { addr: SocketAddr, reason: String },
}

/// A running embedded broker.
pub struct EmbeddedBroker {
    /// The loopback address only the front door should use.
    pub addr: SocketAddr,
    /// The password the broker expects in every CONNECT.
    pub secret: String,
}

/// The engine's in-process connection to the broker.
pub struct EngineLink {
    pub tx: LinkTx,
    pub rx: LinkRx,
}

/// Starts rumqttd on a free loopback port and returns it with the engine's link.
pub async fn start(max_connections: usize) -> Result<(EmbeddedBroker, EngineLink), BrokerError> {
    let addr = {
        let probe = StdTcpListener::bind("127.0.0.1:0").map_err(BrokerError::Port)?;
        probe.local_addr().map_err(BrokerError::Port)?
    };
    let secret = random_secret();
    let mut connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: MAX_PACKET_BYTES,
        max_inflight_count: 256,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let expected = secret.clone();
    connections.set_auth_handler(move |_client_id, user: String, pass: String| {
        let ok = user == FRONT_DOOR_USER && constant_time_eq(pass.as_bytes(), expected.as_bytes());
        async move { ok }
    });
    let server = ServerSettings {
        name: "internal".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: max_connections + 16,
            max_outgoing_packet_count: 1024,
            max_segment_size: 64 << 20,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("internal".to_owned(), server)])),
        ..Default::default()
    };
    let mut broker = Broker::new(config);
    let (tx, rx) = broker
        .link(ENGINE_CLIENT_ID)
        .map_err(|e| BrokerError::Link(e.to_string()))?;
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(BrokerError::Thread)?;
    let broker = EmbeddedBroker { addr, secret };
    broker.wait_ready(Duration::from_secs(10)).await?;
    // A latency optimisation, not a reason to refuse to start (e.g. where
    // /proc is not mounted): without it the loopback hop keeps Nagle.
    if let Err(e) = set_listener_nodelay(addr) {
        tracing::warn!(error = %e, "cannot set TCP_NODELAY on the internal broker's sockets; expect ~40 ms delays");
    }
    Ok((broker, EngineLink { tx, rx }))
}

impl EmbeddedBroker {
    /// Polls until the broker answers an authenticated CONNECT with success.
    async fn wait_ready(&self, within: Duration) -> Result<(), BrokerError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let reason = match self.probe().await {
                Ok(()) => return Ok(()),
                Err(reason) => reason,
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(BrokerError::NotReady {
                    addr: self.addr,
                    reason,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn probe(&self) -> Result<(), String> {
        let mut stream = TcpStream::connect(self.addr)
            .await
            .map_err(|e| e.to_string())?;
        let mut connect = Connect::new(PROBE_CLIENT_ID);
        connect.set_login(FRONT_DOOR_USER, &self.secret);
        let mut out = BytesMut::new();
        Packet::Connect(connect)
            .write(&mut out, MAX_PACKET_BYTES)
            .map_err(|e| e.to_string())?;
        stream.write_all(&out).await.map_err(|e| e.to_string())?;
        let mut buf = BytesMut::with_capacity(16);
        let answer = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match Packet::read(&mut buf, 64) {
                    Ok(p) => return Ok(p),
                    Err(rumqttc::Error::InsufficientBytes(_)) => {
                        if stream.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
                            return Err("connection closed".to_owned());
                        }
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        })
        .await
        .map_err(|_| "no CONNACK within 2 s".to_owned())??;
        match answer {
            Packet::ConnAck(ConnAck {
                code: ConnectReturnCode::Success,
                ..
            }) => {
                let mut bye = BytesMut::new();
                let _ = Packet::Disconnect.write(&mut bye, 8);
                let _ = stream.write_all(&bye).await;
                Ok(())
            }
            other => Err(format!("unexpected answer {other:?}")),
        }
    }
}

/// rumqttd never sets TCP_NODELAY on the sockets it accepts, so its writes to
/// the front door (acks, forwarded messages) would wait on Nagle's algorithm
/// and the front door's delayed ACK: a ~40 ms floor under every round trip.
/// Linux copies TCP_NODELAY from a listening socket to the sockets it accepts,
/// so this finds rumqttd's listener among this process's descriptors (it is
/// the only listening socket bound to `addr`) and sets it there, once.
#[cfg(target_os = "linux")]
fn set_listener_nodelay(addr: SocketAddr) -> Result<(), String> {
    use std::os::fd::{BorrowedFd, RawFd};

    let dir = std::fs::read_dir("/proc/self/fd").map_err(|e| format!("/proc/self/fd: {e}"))?;
    for entry in dir.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        // SAFETY: `borrow_raw` wants the descriptor to stay open while
        // borrowed, which nothing here can promise; but a racing close only
        // makes the calls below fail (EBADF), and a reused number at worst
        // gets TCP_NODELAY on another socket of this process: no memory is
        // touched through it, and rumqttd never closes its listener.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&fd);
        let bound_here = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .is_some_and(|a| a == addr);
        if bound_here && socket.is_listener().unwrap_or(false) {
            return socket
                .set_tcp_nodelay(true)
                .map_err(|e| format!("setsockopt: {e}"));
        }
    }
    Err(format!(
        "no listening socket bound to {addr} in this process"
    ))
}

/// Elsewhere the loopback hop keeps Nagle's algorithm (a latency floor, not an
/// error).
#[cfg(not(target_os = "linux"))]
fn set_listener_nodelay(_addr: SocketAddr) -> Result<(), String> {
    Ok(())
}

fn random_secret() -> String {
    use rand::Rng;
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares secrets without leaking where they differ through timing.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
