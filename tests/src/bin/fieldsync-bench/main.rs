//! The benchmark harness (first increment): runs scenarios against the real
//! release binaries on loopback, prints a table and writes the same figures as
//! one flat JSON object to `target/bench/report.json`. Every throughput figure
//! comes with a baseline measured in the same run where one exists, because
//! this machine is shared and noisy. Run it with
//! `cargo run --release -p fieldsync-e2e --bin fieldsync-bench [-- --quick]`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use fieldsync_e2e::fleet::{Pki, TempHub, FLEET_POLICY, TOKEN};
use fieldsync_e2e::TempAgent;
use serde_json::{json, Value};

mod fleet;
mod latency;
mod memory;
mod mosquitto;
mod raw;
mod rules;
mod upstream;
mod webhooks;

/// Sizes of one run.
pub(crate) struct Plan {
    pub(crate) quick: bool,
    /// Changes in each catch-up backlog.
    backlog: u64,
    /// How long the local-write scenario runs.
    api_secs: u64,
    /// Batches of redb inserts in the storage baseline.
    redb_batches: u64,
}

/// Every figure of a run, by its JSON key.
pub(crate) type Report = BTreeMap<&'static str, f64>;

/// Keys every complete run reports (the list); a run without
/// `--only` fails if one is missing.
const REQUIRED: &[&str] = &[
    "upstream_changes_per_s",
    "raw_publish_msgs_per_s",
    "redb_batch_inserts_per_s",
    "latency_p50_ms_1k",
    "latency_p99_ms_1k",
    "latency_p99_ms_10k",
    "latency_floor_p50_ms_1k",
    "latency_floor_p99_ms_1k",
    "catchup_100k_down_s",
    "catchup_100k_up_s",
    "agents_connected",
    "connect_all_s",
    "hub_rss_mib",
    "agent_idle_rss_mib",
    "agent_load_rss_mib",
    "agent_binary_mib",
    "hub_binary_mib",
    "mosquitto_publish_msgs_per_s",
    "webhook_events_per_s",
    "upstream_webhook_ratio",
    "rules_slowdown_upstream",
    "rules_slowdown_latency_p50_1k",
    "rules_slowdown_latency_p99_1k",
    "history_slowdown_upstream",
];

/// Scenario names, in the order a run takes them (`--only a,b` picks some).
const SCENARIOS: &[&str] = &[
    "footprint",
    "redb",
    "local",
    "catchup",
    "upstream",
    "raw",
    "mosquitto",
    "latency",
    "rules",
    "fleet",
    "memory",
    "webhooks",
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|list| list.split(',').map(str::to_owned).collect());
    if let Some(unknown) = only
        .iter()
        .flatten()
        .find(|name| !SCENARIOS.contains(&name.as_str()))
    {
        eprintln!(
            "fieldsync-bench: unknown scenario {unknown:?}; known: {}",
            SCENARIOS.join(", ")
        );
        return ExitCode::from(2);
    }
    let plan = Plan {
        quick,
        backlog: if quick { 10_000 } else { 100_000 },
        api_secs: if quick { 2 } else { 5 },
        redb_batches: if quick { 20 } else { 100 },
    };
    let runtime = tokio::runtime::Runtime::new().expect("cannot start the async runtime");
    match runtime.block_on(run(&plan, only.as_deref())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fieldsync-bench FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(plan: &Plan, only: Option<&[String]>) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build; run with --release for meaningful figures");
    }
    let started = Instant::now();
    let bins = fieldsync_e2e::bin_dir();
    let mut report = Report::new();
    report.insert("quick", if plan.quick { 1.0 } else { 0.0 });

    for &name in SCENARIOS {
        if only.is_some_and(|o| !o.iter().any(|n| n == name)) {
            continue;
        }
        eprintln!("fieldsync-bench: {name} ...");
        let t = Instant::now();
        let r = &mut report;
        match name {
            "footprint" => footprint_binaries(bins, r),
            "redb" => redb_baseline(plan, r),
            "local" => local_writes(plan, r).await,
            "catchup" => catch_up(plan, r).await,
            "upstream" => upstream::run(plan, r).await,
            "raw" => raw::baseline(plan, r).await,
            "mosquitto" => mosquitto::peer(plan, r).await,
            "latency" => latency::run(plan, r).await,
            "rules" => rules::run(plan, r).await,
            "fleet" => fleet::connections(plan, r).await,
            "memory" => memory::downstream(plan, r).await,
            "webhooks" => webhooks::run(plan, r).await,
            _ => unreachable!("SCENARIOS lists every arm"),
        }
        .with_context(|| format!("scenario {name}"))?;
        eprintln!(
            "fieldsync-bench: {name} took {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    derive_ratios(&mut report);
    report.insert("bench_wall_s", started.elapsed().as_secs_f64());

    print_table(&report);
    let path = write_report(&report)?;
    println!("\nwrote {}", path.display());
    if only.is_none() {
        let missing: Vec<&str> = REQUIRED
            .iter()
            .copied()
            .filter(|k| !report.contains_key(k))
            .collect();
        ensure!(missing.is_empty(), "the report lacks {missing:?}");
    }
    Ok(())
}

/// Figures computed from others measured in the same run (only where both
/// sides were measured).
fn derive_ratios(report: &mut Report) {
    let get = |r: &Report, k: &str| r.get(k).copied().filter(|v| *v > 0.0);
    let ratios: [(&'static str, &str, &[&str]); 7] = [
        // Our changes/s against raw QoS1 publishes of one change each.
        (
            "upstream_ratio_raw_publish",
            "upstream_changes_per_s",
            &["raw_publish_msgs_per_s"],
        ),
        // Against the same bytes our agents send, as raw QoS1 publishes of
        // whole batches (`raw_publish_batch_changes` changes per message).
        (
            "upstream_ratio_raw_batch_publish",
            "upstream_changes_per_s",
            &["raw_publish_batch_msgs_per_s", "raw_publish_batch_changes"],
        ),
        // Against batched redb inserts on the same disk.
        (
            "upstream_ratio_redb",
            "upstream_changes_per_s",
            &["redb_batch_inserts_per_s"],
        ),
        // The hub's front door + broker against mosquitto, same workloads.
        (
            "raw_publish_ratio_mosquitto",
            "raw_publish_msgs_per_s",
            &["mosquitto_publish_msgs_per_s"],
        ),
        (
            "raw_publish_batch_ratio_mosquitto",
            "raw_publish_batch_msgs_per_s",
            &["mosquitto_publish_batch_msgs_per_s"],
        ),
        // Propagation against its floor: two chained durable commits on the
        // same disk at the same rate, measured just before.
        (
            "latency_p50_ratio_floor_1k",
            "latency_p50_ms_1k",
            &["latency_floor_p50_ms_1k"],
        ),
        (
            "latency_p99_ratio_floor_1k",
            "latency_p99_ms_1k",
            &["latency_floor_p99_ms_1k"],
        ),
    ];
    for (key, ours, limit) in ratios {
        let denominator = limit
            .iter()
            .map(|k| get(report, k))
            .try_fold(1.0, |acc, v| v.map(|v| acc * v));
        if let (Some(ours), Some(limit)) = (get(report, ours), denominator) {
            report.insert(key, ours / limit);
        }
    }
}

/// The nearest-rank quantile `q` (0 < q <= 1) of `sorted` (ascending, not empty).
pub(crate) fn quantile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub(crate) fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Stripped release binary sizes (`strip = "symbols"` in the release profile).
fn footprint_binaries(bins: &Path, report: &mut Report) -> anyhow::Result<()> {
    for (key, name) in [
        ("agent_binary_mib", "fieldsync-agent"),
        ("hub_binary_mib", "fieldsync-hub"),
    ] {
        let len = std::fs::metadata(bins.join(name))
            .with_context(|| format!("{name} binary"))?
            .len();
        report.insert(key, mib(len));
    }
    Ok(())
}

/// Resident set size of a process, from /proc (Linux).
pub(crate) fn rss_mib(pid: Option<u32>) -> anyhow::Result<f64> {
    let pid = pid.context("the process is not running")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")?;
    Ok(kb as f64 / 1024.0)
}

/// The storage limit: durable redb commits of 1,000 inserts each, on the same disk.
fn redb_baseline(plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    const TABLE: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("bench");
    let dir = tempfile::tempdir()?;
    let db = redb::Database::create(dir.path().join("bench.redb"))?;
    let value = vec![7u8; 100];
    let start = Instant::now();
    for b in 0..plan.redb_batches {
        let txn = db.begin_write()?;
        {
            let mut t = txn.open_table(TABLE)?;
            for i in 0..1000 {
                t.insert(b * 1000 + i, value.as_slice())?;
            }
        }
        txn.commit()?;
    }
    let secs = start.elapsed().as_secs_f64();
    report.insert(
        "redb_batch_inserts_per_s",
        (plan.redb_batches * 1000) as f64 / secs,
    );
    // One insert per durable commit: the fsync rate of this disk.
    let start = Instant::now();
    let commits = 200u64;
    for i in 0..commits {
        let txn = db.begin_write()?;
        txn.open_table(TABLE)?
            .insert(u64::MAX - i, value.as_slice())?;
        txn.commit()?;
    }
    report.insert(
        "redb_durable_commits_per_s",
        commits as f64 / start.elapsed().as_secs_f64(),
    );
    Ok(())
}

/// Single-record PUTs through the agent's HTTP API from 16 concurrent clients
/// (group commit at work), and the agent's idle footprint.
async fn local_writes(plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let agent = TempAgent::start()?;
    report.insert("agent_idle_rss_mib", rss_mib(agent.pid())?);
    let http = reqwest::Client::new();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..16 {
        let (http, stop, done) = (http.clone(), stop.clone(), done.clone());
        let base = agent.base_url().to_owned();
        tasks.spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let url = format!("{base}/v1/records/patients/c{c}-{n}");
                let r = http
                    .put(url)
                    .json(&json!({"ward": n, "initials": "AB"}))
                    .send()
                    .await?;
                ensure!(r.status().is_success(), "PUT answered {}", r.status());
                n += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(plan.api_secs)).await;
    stop.store(true, Ordering::Relaxed);
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let secs = start.elapsed().as_secs_f64();
    report.insert(
        "agent_api_writes_per_s",
        done.load(Ordering::Relaxed) as f64 / secs,
    );
    Ok(())
}

pub(crate) async fn get_json(
    http: &reqwest::Client,
    url: &str,
    token: bool,
) -> anyhow::Result<Value> {
    let mut r = http.get(url);
    if token {
        r = r.bearer_auth(TOKEN);
    }
    Ok(r.send().await?.error_for_status()?.json().await?)
}

/// Polls `check` every 20 ms until it is true; returns the time it took.
pub(crate) async fn time_until<F, Fut>(
    what: &str,
    limit: Duration,
    mut check: F,
) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let start = Instant::now();
    loop {
        if check().await? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            bail!("{what} did not happen within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A hub (its own PKI, [`FLEET_POLICY`]) and one agent linked to it, in a
/// temp dir.
pub(crate) struct Linked {
    // Field order is drop order: the processes die before their dir goes.
    pub(crate) agent: TempAgent,
    pub(crate) hub: TempHub,
    _dir: tempfile::TempDir,
}

impl Linked {
    /// Starts both and waits until agent `id` reports the link up.
    pub(crate) async fn start(id: &str) -> anyhow::Result<Self> {
        Self::start_with(id, FLEET_POLICY).await
    }

    /// The last lines each program wrote to stderr (for a failure's report).
    pub(crate) fn logs(&self) -> String {
        let tail = |log: String| {
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(20)..].join("\n")
        };
        format!(
            "agent's log ends:\n{}\nhub's log ends:\n{}",
            tail(self.agent.stderr_log()),
            tail(self.hub.stderr_log())
        )
    }

    /// [`Linked::start`], both programs on `policy`.
    pub(crate) async fn start_with(id: &str, policy: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let pki = Pki::create(&dir.path().join("pki"))?;
        let hub = TempHub::start(dir.path(), &pki, policy)?;
        let agent = hub.agent(&pki, id, None)?;
        let http = reqwest::Client::new();
        let status_url = agent.url("/v1/status");
        time_until("the agent to link", Duration::from_secs(60), || async {
            Ok(get_json(&http, &status_url, false).await?["connected"] == true)
        })
        .await?;
        Ok(Self {
            agent,
            hub,
            _dir: dir,
        })
    }
}

/// Catch-up both ways, through the real hub with mTLS and durable commits on
/// both sides: an agent with a backlog of changes meets a hub that was down;
/// an agent that was down meets a hub with a queue for it.
async fn catch_up(plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let mut linked = crate::Linked::start("gw-bench").await?;
    let (hub, agent) = (&mut linked.hub, &mut linked.agent);
    let http = reqwest::Client::new();
    let status_url = agent.url("/v1/status");

    // Upstream: the backlog is written while the hub is down.
    hub.kill();
    let batch_url = agent.url("/v1/batch");
    for b in 0..plan.backlog / 1000 {
        let writes: Vec<Value> = (0..1000)
            .map(|i| json!({"collection": "patients", "key": format!("p{b}-{i}"), "fields": {"ward": i, "initials": "CD", "ssn": "local"}}))
            .collect();
        http.post(&batch_url)
            .json(&json!({ "writes": writes }))
            .send()
            .await?
            .error_for_status()?;
    }
    let pending = get_json(&http, &status_url, false).await?["outbox_pending"]
        .as_u64()
        .unwrap_or(0);
    ensure!(
        pending == plan.backlog,
        "outbox holds {pending}, expected {}",
        plan.backlog
    );
    hub.restart()?;
    // Catch-up counts from the reconnect, not from the agent's backoff timer.
    time_until("the agent to relink", Duration::from_secs(120), || async {
        Ok(get_json(&http, &status_url, false).await?["connected"] == true)
    })
    .await?;
    let peak = AtomicU64::new(0);
    let took = time_until(
        "the upstream backlog to drain",
        Duration::from_secs(600),
        || async {
            if let Ok(rss) = rss_mib(agent.pid()) {
                peak.fetch_max((rss * 1024.0) as u64, Ordering::Relaxed);
            }
            Ok(get_json(&http, &status_url, false).await?["outbox_pending"] == 0)
        },
    )
    .await?;
    report.insert("catchup_100k_up_s", took.as_secs_f64());
    report.insert(
        "upstream_backlog_changes_per_s",
        plan.backlog as f64 / took.as_secs_f64(),
    );
    report.insert(
        "agent_load_rss_mib",
        peak.load(Ordering::Relaxed) as f64 / 1024.0,
    );
    report.insert("hub_rss_mib", rss_mib(hub.pid())?);

    // Downstream: the operator queues the backlog while the agent is down.
    agent.kill();
    let ops_url = format!("{}/v1/agents/gw-bench/batch", hub.api_url());
    for b in 0..plan.backlog / 1000 {
        let writes: Vec<Value> = (0..1000)
            .map(|i| json!({"collection": "settings", "key": format!("s{b}-{i}"), "fields": {"mode": i}}))
            .collect();
        http.post(&ops_url)
            .bearer_auth(TOKEN)
            .json(&json!({ "writes": writes }))
            .send()
            .await?
            .error_for_status()?;
    }
    agent.restart()?;
    let hub = &linked.hub;
    let took = time_until(
        "the downstream queue to drain",
        Duration::from_secs(600),
        || async {
            let row = hub.agent_row("gw-bench").await?;
            Ok(row.is_some_and(|r| r["queue_pending"] == 0))
        },
    )
    .await?;
    report.insert("catchup_100k_down_s", took.as_secs_f64());
    Ok(())
}

fn print_table(report: &Report) {
    println!("\n{:<32} {:>14}", "figure", "value");
    println!("{}", "-".repeat(47));
    for (key, value) in report {
        println!("{key:<32} {value:>14.2}");
    }
}

fn write_report(report: &Report) -> anyhow::Result<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(report)?)?;
    Ok(path.canonicalize().unwrap_or(path))
}
