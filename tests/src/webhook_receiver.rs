//! A webhook receiver for end-to-end tests: a loopback HTTP server that
//! records every delivery, checks its Standard Webhooks signature with its
//! own HMAC (ring, not the hub's code), answers with the status a test sets,
//! and can go down (its port closed: connection refused) and come back on
//! the same port.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// One delivery as received.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: String,
    pub timestamp: u64,
    pub signature_ok: bool,
    pub body: Value,
    /// The status the receiver answered.
    pub answered: u16,
}

#[derive(Default)]
struct Shared {
    got: Vec<Delivery>,
    status: u16,
}

/// The receiver. Dropping it stops the server.
pub struct Receiver {
    addr: SocketAddr,
    secret: Arc<Mutex<Option<Vec<u8>>>>,
    shared: Arc<Mutex<Shared>>,
    server: Option<JoinHandle<()>>,
}

impl Receiver {
    /// Starts on a free loopback port, answering 200.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut r = Self {
            addr,
            secret: Arc::default(),
            shared: Arc::new(Mutex::new(Shared {
                got: Vec::new(),
                status: 200,
            })),
            server: None,
        };
        r.serve(listener);
        Ok(r)
    }

    /// The URL to register.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// The endpoint's secret (`whsec_…`), to check signatures with.
    pub fn set_secret(&self, secret: &str) -> anyhow::Result<()> {
        let key = base64::engine::general_purpose::STANDARD.decode(
            secret
                .strip_prefix("whsec_")
                .ok_or_else(|| anyhow::anyhow!("not a whsec_ secret"))?,
        )?;
        *self.secret.lock().unwrap() = Some(key);
        Ok(())
    }

    /// The status later deliveries get.
    pub fn answer(&self, status: u16) {
        self.shared.lock().unwrap().status = status;
    }

    /// Every delivery so far, in arrival order.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.shared.lock().unwrap().got.clone()
    }

    /// Closes the port: deliveries are refused until [`Receiver::up`].
    pub fn down(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }

    /// Listens again on the same port.
    pub async fn up(&mut self) -> anyhow::Result<()> {
        let listener = TcpListener::bind(self.addr).await?;
        self.serve(listener);
        Ok(())
    }

    fn serve(&mut self, listener: TcpListener) {
        let (secret, shared) = (self.secret.clone(), self.shared.clone());
        self.server = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let (secret, shared) = (secret.clone(), shared.clone());
                conns.spawn(async move {
                    let _ = connection(stream, secret, shared).await;
                });
            }
        }));
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.down();
    }
}

/// Serves HTTP/1.1 requests on one connection (keep-alive), just enough for
/// the hub's client: a request line, headers, a Content-Length body.
async fn connection(
    stream: tokio::net::TcpStream,
    secret: Arc<Mutex<Option<Vec<u8>>>>,
    shared: Arc<Mutex<Shared>>,
) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    loop {
        let mut line = String::new();
        if read.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            read.read_line(&mut h).await?;
            let h = h.trim_end().to_owned();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let len: usize = header("content-length").parse().unwrap_or(0);
        let mut body = vec![0; len];
        read.read_exact(&mut body).await?;
        let id = header("webhook-id");
        let timestamp: u64 = header("webhook-timestamp").parse().unwrap_or(0);
        let signature = header("webhook-signature");
        let key = secret.lock().unwrap().clone();
        let signature_ok = key.is_some_and(|key| {
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
            let signed = [
                id.as_bytes(),
                b".",
                timestamp.to_string().as_bytes(),
                b".",
                &body,
            ]
            .concat();
            let want = ring::hmac::sign(&key, &signed);
            // The header may carry several space-separated signatures.
            signature.split(' ').any(|s| {
                s.strip_prefix("v1,")
                    .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                    .is_some_and(|got| got == want.as_ref())
            })
        });
        let status = {
            let mut s = shared.lock().unwrap();
            let status = s.status;
            s.got.push(Delivery {
                id,
                timestamp,
                signature_ok,
                body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                answered: status,
            });
            status
        };
        let reply = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
        write.write_all(reply.as_bytes()).await?;
    }
}
