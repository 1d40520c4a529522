//! Helpers for the hub durability suite (`tests/hub_durability.rs`): a hub and
//! its PKI in one temp dir ([`Fleet`]), cloneable clients for an agent's local
//! API ([`AgentApi`]) and the hub's operator API ([`Operator`]), polling with
//! deadlines ([`poll`]), a continuous writer that records which writes the
//! agent acknowledged ([`stream_writes`]), a parallel comparison of
//! expected records with what a replica holds ([`mismatches`]), and the log
//! lines that mean a broken invariant ([`log_problems`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::task::JoinSet;

use crate::fleet::{self, Pki, TempHub, FLEET_POLICY};
use crate::TempAgent;

/// Longest wait for one HTTP answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a link to come up, a queue to drain or replicas to agree
/// (a loaded 2-core machine running debug builds, reconnect backoff included).
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between two polls.
const POLL_EVERY: Duration = Duration::from_millis(50);
/// Requests in flight at once when comparing many records.
const CHECK_TASKS: usize = 4;

/// An HTTP client with [`IO_TIMEOUT`].
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(IO_TIMEOUT)
        .build()
        .expect("cannot build an HTTP client")
}

/// A hub (with [`FLEET_POLICY`]) and its PKI in one temp dir. Dropping it
/// kills the hub, then removes the dir.
pub struct Fleet {
    // Field order is drop order: the hub dies before its dir goes.
    pub hub: TempHub,
    pub pki: Pki,
    _dir: tempfile::TempDir,
}

impl Fleet {
    /// Makes a PKI with `fieldsync-hub certs init` and starts a hub.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with_policy(FLEET_POLICY)
    }

    /// [`Fleet::start`] with another policy (the agents get the same one).
    pub fn start_with_policy(policy: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("fieldsync-durability-")
            .tempdir()?;
        let pki_dir = dir.path().join("pki");
        std::fs::create_dir(&pki_dir)?;
        let pki = Pki::create(&pki_dir)?;
        let hub = TempHub::start(dir.path(), &pki, policy)?;
        Ok(Self {
            hub,
            pki,
            _dir: dir,
        })
    }

    /// Starts agent `id` (certificate issued now) linked to this hub.
    pub fn agent(&self, id: &str) -> anyhow::Result<TempAgent> {
        self.hub.agent(&self.pki, id, None)
    }

    /// [`Fleet::agent`], then waits until the agent reports the link up and
    /// the first contact's resync done.
    pub async fn linked_agent(&self, id: &str) -> anyhow::Result<(TempAgent, AgentApi)> {
        let agent = self.agent(id)?;
        let api = AgentApi::of(&agent);
        wait_status(&api, "the agent linked", |s| {
            s["connected"] == true && s["resync_running"] == false
        })
        .await?;
        Ok((agent, api))
    }

    /// A client of the hub's operator API as it listens now (the API port
    /// changes with every restart: take a new one after [`TempHub::restart`]).
    pub fn operator(&self) -> Operator {
        Operator {
            api: self.hub.operator(),
        }
    }
}

/// One record write: `fields` (a JSON object) into `collection`/`key`.
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    pub collection: String,
    pub key: String,
    pub fields: Value,
}

impl Write {
    pub fn new(collection: &str, key: impl Into<String>, fields: Value) -> Self {
        Self {
            collection: collection.to_owned(),
            key: key.into(),
            fields,
        }
    }

    /// A new `patients` record `key` with every permitted field, derived from `n`.
    pub fn patient(key: impl Into<String>, n: u64) -> Self {
        let initials = format!(
            "{}{}",
            char::from(b'A' + (n % 26) as u8),
            char::from(b'A' + (n / 26 % 26) as u8)
        );
        Self::new(
            "patients",
            key,
            json!({"initials": initials, "ward": n % 40, "heart_rate": 40 + n % 120}),
        )
    }
}

/// A client of one agent's local API.
#[derive(Clone)]
pub struct AgentApi {
    http: reqwest::Client,
    base: String,
}

impl AgentApi {
    /// A client of `agent` as it listens now (a new port after each restart).
    pub fn of(agent: &TempAgent) -> Self {
        Self {
            http: http(),
            base: agent.base_url().to_owned(),
        }
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> anyhow::Result<Value> {
        let r = self
            .http
            .get(format!("{}/v1/status", self.base))
            .send()
            .await?;
        if r.status() != StatusCode::OK {
            bail!("GET /v1/status answered {}", r.status());
        }
        Ok(r.json().await?)
    }

    /// `GET /v1/status` field `name` as a number.
    pub async fn status_u64(&self, name: &str) -> anyhow::Result<u64> {
        let status = self.status().await?;
        status[name]
            .as_u64()
            .with_context(|| format!("no number {name} in {status}"))
    }

    /// `PUT /v1/records/{c}/{k}`; fails unless it answers 200 with the fields.
    pub async fn put(&self, w: &Write) -> anyhow::Result<()> {
        let r = self
            .http
            .put(format!(
                "{}/v1/records/{}/{}",
                self.base, w.collection, w.key
            ))
            .json(&w.fields)
            .send()
            .await?;
        let status = r.status();
        if status != StatusCode::OK {
            bail!(
                "PUT answered {status}: {}",
                r.text().await.unwrap_or_default()
            );
        }
        let body: Value = r.json().await?;
        if body["fields"] != w.fields {
            bail!("PUT {} {} answered {body}", w.collection, w.key);
        }
        Ok(())
    }

    /// `POST /v1/batch` with `writes`; fails unless it answers 200 with one
    /// stored record per write (their fields are only checked when `fresh`: a
    /// partial update answers with the whole record).
    pub async fn batch(&self, writes: &[Write], fresh: bool) -> anyhow::Result<()> {
        let body: Vec<Value> = writes
            .iter()
            .map(|w| json!({"collection": w.collection, "key": w.key, "fields": w.fields}))
            .collect();
        let r = self
            .http
            .post(format!("{}/v1/batch", self.base))
            .json(&json!({ "writes": body }))
            .send()
            .await?;
        let status = r.status();
        if status != StatusCode::OK {
            bail!(
                "POST /v1/batch answered {status}: {}",
                r.text().await.unwrap_or_default()
            );
        }
        let body: Value = r.json().await?;
        let results = body["results"]
            .as_array()
            .with_context(|| format!("no results in {body}"))?;
        if results.len() != writes.len() {
            bail!("{} results for {} writes", results.len(), writes.len());
        }
        for (w, result) in writes.iter().zip(results) {
            if result["key"] != w.key.as_str() || (fresh && result["fields"] != w.fields) {
                bail!("batch answered {result} for {w:?}");
            }
        }
        Ok(())
    }

    /// The agent's fields of a record, or `None` (404).
    pub async fn record(&self, collection: &str, key: &str) -> anyhow::Result<Option<Value>> {
        let r = self
            .http
            .get(format!("{}/v1/records/{collection}/{key}", self.base))
            .send()
            .await?;
        match r.status() {
            StatusCode::OK => Ok(Some(r.json::<Value>().await?["fields"].clone())),
            StatusCode::NOT_FOUND => Ok(None),
            other => bail!("GET {collection}/{key} answered {other}"),
        }
    }
}

/// A cloneable client of the hub's operator API, in terms of [`Write`]s.
#[derive(Clone)]
pub struct Operator {
    api: fleet::Operator,
}

impl Operator {
    /// `PUT /v1/agents/{agent}/records/{c}/{k}` with `w.fields`.
    pub async fn put(&self, agent: &str, w: &Write) -> anyhow::Result<(StatusCode, Value)> {
        let path = format!("/v1/agents/{agent}/records/{}/{}", w.collection, w.key);
        self.api.put(&path, &w.fields).await
    }

    /// [`Operator::put`] that must answer 202; returns its `queued_seq` and
    /// `agent_connected`.
    pub async fn put_accepted(&self, agent: &str, w: &Write) -> anyhow::Result<(u64, bool)> {
        let (status, body) = self.put(agent, w).await?;
        if status != StatusCode::ACCEPTED {
            bail!(
                "operator PUT {} {} answered {status}: {body}",
                w.collection,
                w.key
            );
        }
        let seq = body["queued_seq"]
            .as_u64()
            .with_context(|| format!("no queued_seq in {body}"))?;
        let connected = body["agent_connected"]
            .as_bool()
            .with_context(|| format!("no agent_connected in {body}"))?;
        Ok((seq, connected))
    }

    /// The hub's fields of a record, or `None` (404).
    pub async fn record(
        &self,
        agent: &str,
        collection: &str,
        key: &str,
    ) -> anyhow::Result<Option<Value>> {
        self.api.record(agent, collection, key).await
    }

    /// The `GET /v1/agents` entry for `agent`, if the hub knows it.
    pub async fn row(&self, agent: &str) -> anyhow::Result<Option<Value>> {
        self.api.agent_row(agent).await
    }

    /// The `GET /v1/agents` entry for `agent`, which must exist.
    pub async fn known_row(&self, agent: &str) -> anyhow::Result<Value> {
        self.row(agent)
            .await?
            .with_context(|| format!("the hub does not list agent {agent}"))
    }
}

/// Calls `check` every 50 ms until it yields `Some` (errors count as "not
/// yet"), or fails after `timeout` naming `what` and the last thing seen.
pub async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Result<T, String>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(Ok(found)) => return Ok(found),
            Ok(Err(seen)) => seen,
            Err(e) => format!("error: {e:#}"),
        };
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}; last seen: {last}");
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Polls the agent's status until `want` holds for it; returns that status.
pub async fn wait_status(
    api: &AgentApi,
    what: &str,
    want: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    poll(what, SYNC_TIMEOUT, || async {
        let status = api.status().await?;
        Ok(if want(&status) {
            Ok(status)
        } else {
            Err(status.to_string())
        })
    })
    .await
}

/// Polls the hub's row for `agent` until `want` holds for it; returns that row.
pub async fn wait_row(
    op: &Operator,
    agent: &str,
    what: &str,
    want: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    poll(what, SYNC_TIMEOUT, || async {
        Ok(match op.row(agent).await? {
            Some(row) if want(&row) => Ok(row),
            Some(row) => Err(row.to_string()),
            None => Err("no row".to_owned()),
        })
    })
    .await
}

/// Where records are read from for [`mismatches`].
#[derive(Clone)]
pub enum Replica {
    /// The hub's copy of this agent's records.
    Hub(Operator, String),
    Agent(AgentApi),
}

impl Replica {
    pub async fn record(&self, collection: &str, key: &str) -> anyhow::Result<Option<Value>> {
        match self {
            Replica::Hub(op, agent) => op.record(agent, collection, key).await,
            Replica::Agent(api) => api.record(collection, key).await,
        }
    }
}

/// Reads every `(collection, key)` of `expected` from `replica`, a few requests
/// at a time, and describes each record whose fields differ from the expected
/// ones (`None`: absent).
pub async fn mismatches(
    replica: &Replica,
    expected: Vec<(String, String, Option<Value>)>,
) -> Vec<String> {
    let mut tasks = JoinSet::new();
    let chunk = expected.len().div_ceil(CHECK_TASKS).max(1);
    for part in expected.chunks(chunk) {
        let part = part.to_vec();
        let replica = replica.clone();
        tasks.spawn(async move {
            let mut out = Vec::new();
            for (c, k, want) in part {
                match replica.record(&c, &k).await {
                    Ok(found) if found == want => {}
                    Ok(found) => out.push(format!("{c}/{k}: expected {want:?}, found {found:?}")),
                    Err(e) => out.push(format!("{c}/{k}: {e:#}")),
                }
            }
            out
        });
    }
    tasks.join_all().await.into_iter().flatten().collect()
}

/// Describes a list of mismatches: how many, and the first few.
pub fn summary(found: &[String]) -> String {
    let first: Vec<&str> = found.iter().take(10).map(String::as_str).collect();
    format!("{} mismatches, first: {}", found.len(), first.join("; "))
}

/// One request of [`stream_writes`]: a PUT (one write) or a batch.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub writes: Vec<Write>,
    /// The agent answered 2xx with the stored records: the writes are durable.
    pub acked: bool,
    /// Why it was not acknowledged.
    pub error: Option<String>,
}

/// What one [`stream_writes`] task did.
#[derive(Debug)]
pub struct StreamReport {
    pub attempts: Vec<Attempt>,
    /// The next unused record number.
    pub next_n: u64,
}

/// Every `BATCH_EVERY`-th request of a stream writer is a batch...
pub const BATCH_EVERY: u64 = 4;
/// ...of this many new records.
pub const BATCH_SIZE: u64 = 8;

/// Writes new `patients` records `{prefix}{n}`, `{prefix}{n+1}`, ... (single
/// PUTs and batches) through the agent API until `stop` is set or a request
/// fails (which ends the stream: the agent is gone or misbehaves).
pub async fn stream_writes(
    api: AgentApi,
    prefix: String,
    mut n: u64,
    stop: Arc<AtomicBool>,
) -> StreamReport {
    let mut attempts = Vec::new();
    let mut request = 0u64;
    while !stop.load(Ordering::Relaxed) {
        request += 1;
        let count = if request.is_multiple_of(BATCH_EVERY) {
            BATCH_SIZE
        } else {
            1
        };
        let writes: Vec<Write> = (n..n + count)
            .map(|i| Write::patient(format!("{prefix}{i}"), i))
            .collect();
        n += count;
        let result = if count == 1 {
            api.put(&writes[0]).await
        } else {
            api.batch(&writes, true).await
        };
        let failed = result.is_err();
        attempts.push(Attempt {
            writes,
            acked: result.is_ok(),
            error: result.err().map(|e| format!("{e:#}")),
        });
        if failed {
            break;
        }
    }
    StreamReport {
        attempts,
        next_n: n,
    }
}

/// The seed for kill timings: `FIELDSYNC_E2E_SEED` if set, else random.
pub fn seed() -> u64 {
    match std::env::var("FIELDSYNC_E2E_SEED") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("FIELDSYNC_E2E_SEED={s:?} is not a u64")),
        Err(_) => rand::random(),
    }
}

/// Log lines of a hub or agent that mean a broken invariant or protocol
/// exchange: any ERROR from Fieldsync's own code (a queue missing entries, a
/// peer ahead of its sender, a failed commit or request, ...) and warnings about
/// bad acknowledgements or undecodable messages. Lost connections are expected
/// after a kill and are not listed; nor is the embedded rumqttd's own noise.
pub fn log_problems(log: &str) -> Vec<&str> {
    const BAD_WARNINGS: [&str; 4] = [
        "bad acknowledgement",
        "bad downstream ack",
        "undecodable",
        "dropped",
    ];
    log.lines()
        .filter(|l| {
            (l.contains(" ERROR ") && l.contains("fieldsync_"))
                || (l.contains(" WARN ") && BAD_WARNINGS.iter().any(|w| l.contains(w)))
        })
        .collect()
}
