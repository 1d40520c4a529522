//! A recording TLS proxy for end-to-end tests. It stands between one agent and
//! the hub: it terminates the agent's TLS with the hub's certificate, records
//! every plaintext byte the agent sends (so a test sees exactly the MQTT
//! payloads the hub receives), and forwards them over a fresh mutual-TLS
//! connection made with the agent's own certificate. It also lets a test cut
//! the link.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use fieldsync_shared::tls::{client_config, server_config};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

/// A running tap; dropped, it stops.
pub struct Tap {
    addr: SocketAddr,
    recorded: Arc<Mutex<Vec<u8>>>,
    stop: CancellationToken,
}

/// The PEM files the tap needs.
pub struct TapCerts<'a> {
    pub ca: &'a Path,
    pub hub_cert: &'a Path,
    pub hub_key: &'a Path,
    pub agent_cert: &'a Path,
    pub agent_key: &'a Path,
}

impl Tap {
    /// Listens on a free loopback port and forwards to the hub's MQTT address.
    pub async fn start(hub: SocketAddr, certs: TapCerts<'_>) -> anyhow::Result<Self> {
        let acceptor = TlsAcceptor::from(server_config(certs.ca, certs.hub_cert, certs.hub_key)?);
        let connector =
            TlsConnector::from(client_config(certs.ca, certs.agent_cert, certs.agent_key)?);
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (rec, token) = (recorded.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = token.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((tcp, _)) = accepted else { continue };
                let (acceptor, connector, rec, token) = (
                    acceptor.clone(),
                    connector.clone(),
                    rec.clone(),
                    token.clone(),
                );
                tokio::spawn(async move {
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = relay(tcp, hub, acceptor, connector, rec) => {}
                    }
                });
            }
        });
        Ok(Self {
            addr,
            recorded,
            stop,
        })
    }

    /// The address agents should connect to (as `mqtts://127.0.0.1:PORT`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Everything agents sent through the tap so far.
    pub fn recorded(&self) -> Vec<u8> {
        self.recorded.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn relay(
    tcp: TcpStream,
    hub: SocketAddr,
    acceptor: TlsAcceptor,
    connector: TlsConnector,
    recorded: Arc<Mutex<Vec<u8>>>,
) -> anyhow::Result<()> {
    let agent = acceptor.accept(tcp).await?;
    let upstream = TcpStream::connect(hub).await?;
    upstream.set_nodelay(true)?;
    let upstream = connector
        .connect(ServerName::IpAddress(hub.ip().into()), upstream)
        .await?;
    let (mut agent_rd, mut agent_wr) = tokio::io::split(agent);
    let (mut hub_rd, mut hub_wr) = tokio::io::split(upstream);
    let to_hub = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = agent_rd.read(&mut buf).await?;
            if n == 0 {
                return anyhow::Ok(());
            }
            if let Ok(mut r) = recorded.lock() {
                r.extend_from_slice(&buf[..n]);
            }
            hub_wr.write_all(&buf[..n]).await?;
        }
    };
    let to_agent = async {
        tokio::io::copy(&mut hub_rd, &mut agent_wr).await?;
        anyhow::Ok(())
    };
    tokio::select! {
        r = to_hub => r,
        r = to_agent => r,
    }
}
