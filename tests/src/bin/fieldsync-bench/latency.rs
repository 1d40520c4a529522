//! Propagation latency at fixed offered loads, both directions, through the
//! real hub and agent processes (mTLS, durable commits on both sides).
//!
//! Upstream: a writer offers `rate` changes per second to the agent's batch API
//! on a fixed schedule (write `i` is due at `start + i / rate`); when the agent
//! is slower than the schedule, the next call carries every write that is due,
//! so a slow system cannot hide its delay by slowing the writer down
//! (coordinated omission). A write's latency runs from its due time to the
//! moment the agent reports it acknowledged (`outbox_acked_seq`), which the hub
//! sends only after its durable commit. Downstream is the same from the
//! operator's batch API to the agent's `down_applied_seq` (merged and committed
//! by the agent). An observer long-polls the agent's `/v1/progress`, which
//! answers as soon as the cursor moves past the one it was given, so each
//! figure is late by one answer's trip (`latency_poll_ms`: the median of
//! calls answered at once, measured before each run).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use fieldsync_e2e::fleet::TOKEN;
use serde_json::{json, Value};

use crate::rules::Load;
use crate::{get_json, Linked, Plan, Report};

/// Writes offered before measuring starts (connections and caches warm up).
const WARM_UP: Duration = Duration::from_secs(1);
/// Most writes one API call carries (the batch routes' limit).
const MAX_BATCH: u64 = 1000;

const AGENT: &str = "gw-latency";

/// The direction under test.
#[derive(Clone, Copy)]
pub(crate) enum Flow {
    Up,
    Down,
}

/// Latencies of one run, in milliseconds, sorted.
pub(crate) struct Samples {
    ms: Vec<f64>,
    poll_ms: f64,
}

impl Samples {
    pub(crate) fn quantile(&self, q: f64) -> f64 {
        crate::quantile(&self.ms, q)
    }
}

pub(crate) async fn run(plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let linked = crate::Linked::start(AGENT).await?;
    let http = reqwest::Client::new();

    let measure = Duration::from_secs(if plan.quick { 3 } else { 10 });
    let runs: [(Flow, u64, [&'static str; 3]); 4] = [
        (
            Flow::Up,
            1_000,
            [
                "latency_p50_ms_1k",
                "latency_p99_ms_1k",
                "latency_max_ms_1k",
            ],
        ),
        (
            Flow::Up,
            10_000,
            [
                "latency_p50_ms_10k",
                "latency_p99_ms_10k",
                "latency_max_ms_10k",
            ],
        ),
        (
            Flow::Down,
            1_000,
            [
                "latency_down_p50_ms_1k",
                "latency_down_p99_ms_1k",
                "latency_down_max_ms_1k",
            ],
        ),
        (
            Flow::Down,
            10_000,
            [
                "latency_down_p50_ms_10k",
                "latency_down_p99_ms_10k",
                "latency_down_max_ms_10k",
            ],
        ),
    ];
    // The floor, measured next to the runs: the two durable commits alone.
    let floor = commit_floor(1_000, measure)?;
    report.insert("latency_floor_p50_ms_1k", crate::quantile(&floor, 0.50));
    report.insert("latency_floor_p99_ms_1k", crate::quantile(&floor, 0.99));
    eprintln!(
        "  floor 1000/s: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (two chained durable redb commits)",
        crate::quantile(&floor, 0.50),
        crate::quantile(&floor, 0.99),
        crate::quantile(&floor, 1.0)
    );
    let mut poll = Vec::new();
    for (flow, rate, [p50, p99, max]) in runs {
        let samples = offer(&http, &linked, Load::Fleet, flow, rate, measure).await?;
        report.insert(p50, samples.quantile(0.50));
        report.insert(p99, samples.quantile(0.99));
        report.insert(max, samples.quantile(1.0));
        poll.push(samples.poll_ms);
    }
    poll.sort_by(f64::total_cmp);
    report.insert("latency_poll_ms", poll[poll.len() / 2]);
    Ok(())
}

/// What a write's propagation costs with no network and no program in the
/// way: two redb files in the temp dir the agent and the hub use (the same
/// disk and filesystem), one thread each, chained as the agent's commit is to
/// the hub's. Write `i` is due at `start + i / rate`; the first thread commits
/// it to one file and hands it on, the second commits it to the other, and
/// the latency runs from its due time to the second commit's return. Sorted
/// milliseconds of the writes due after the warm-up.
fn commit_floor(rate: u64, measure: Duration) -> anyhow::Result<Vec<f64>> {
    const TABLE: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("floor");
    let dir = tempfile::tempdir()?;
    let open = |name: &str| redb::Database::create(dir.path().join(name));
    let (first, second) = (open("first.redb")?, open("second.redb")?);
    let value = vec![7u8; 100];
    let commit = |db: &redb::Database, i: u64| -> anyhow::Result<()> {
        let txn = db.begin_write()?;
        txn.open_table(TABLE)?.insert(i, value.as_slice())?;
        txn.commit()?;
        Ok(())
    };
    let total = ((WARM_UP + measure).as_secs_f64() * rate as f64) as u64;
    let start = Instant::now();
    let due = |i: u64| start + Duration::from_secs_f64(i as f64 / rate as f64);
    let (tx, rx) = std::sync::mpsc::channel::<u64>();
    std::thread::scope(|scope| {
        let handed = scope.spawn(|| -> anyhow::Result<Vec<f64>> {
            let mut ms = Vec::with_capacity(total as usize);
            for i in rx {
                commit(&second, i)?;
                let d = due(i);
                if d >= start + WARM_UP {
                    ms.push(d.elapsed().as_secs_f64() * 1e3);
                }
            }
            Ok(ms)
        });
        for i in 0..total {
            std::thread::sleep(due(i).saturating_duration_since(Instant::now()));
            commit(&first, i)?;
            tx.send(i)?;
        }
        drop(tx);
        let mut ms = handed.join().expect("the second committer panicked")?;
        ms.sort_by(f64::total_cmp);
        Ok(ms)
    })
}

/// The agent's cursor that shows a write of `flow` arrived.
fn cursor(status: &Value, flow: Flow) -> anyhow::Result<u64> {
    let key = match flow {
        Flow::Up => "outbox_acked_seq",
        Flow::Down => "down_applied_seq",
    };
    status[key]
        .as_u64()
        .with_context(|| format!("status has no {key}"))
}

/// Offers `rate` writes per second (shaped by `load`) for the warm-up plus
/// `measure`, and returns the latency of every write due after the warm-up.
pub(crate) async fn offer(
    http: &reqwest::Client,
    linked: &Linked,
    load: Load,
    flow: Flow,
    rate: u64,
    measure: Duration,
) -> anyhow::Result<Samples> {
    let (hub, agent) = (&linked.hub, &linked.agent);
    let status_url = agent.url("/v1/status");
    let before = get_json(http, &status_url, false).await?;
    let base = match flow {
        Flow::Up => before["outbox_last_seq"]
            .as_u64()
            .context("outbox_last_seq")?,
        // The hub numbers its queue for this agent; everything queued so far
        // has been applied (the previous run waited for it).
        Flow::Down => cursor(&before, flow)?,
    };
    // The observer's resolution: one progress call answered at once.
    let mut trips = Vec::new();
    for _ in 0..21 {
        let asked = Instant::now();
        get_json(http, &agent.url("/v1/progress"), false).await?;
        trips.push(asked.elapsed());
    }
    trips.sort();
    let poll_ms = trips[trips.len() / 2].as_secs_f64() * 1e3;
    let total = (WARM_UP + measure).as_secs_f64() * rate as f64;
    let total = total as u64;
    let start = Instant::now();
    let due = move |i: u64| start + Duration::from_secs_f64(i as f64 / rate as f64);

    // The observer: write `i` (0-based) has arrived when the cursor passes
    // `base + i + 1`. It long-polls the agent's `/v1/progress`, which answers
    // as soon as the cursor passes the one given (no busy polling to compete
    // with the system under test for the CPU).
    let done = Arc::new(AtomicBool::new(false));
    let progress_url = agent.url("/v1/progress");
    let observer = {
        let (http, url, done) = (http.clone(), progress_url, done.clone());
        tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(total as usize);
            let mut seen = 0u64;
            let deadline = Duration::from_secs(120);
            while seen < total {
                ensure!(
                    start.elapsed() < measure + WARM_UP + deadline,
                    "only {seen} of {total} writes arrived"
                );
                let after = match flow {
                    Flow::Up => "acked_after",
                    Flow::Down => "applied_after",
                };
                let url = format!("{url}?{after}={}&wait_ms=1000", base + seen);
                let status = get_json(&http, &url, false).await?;
                let now = Instant::now();
                let arrived = cursor(&status, flow)?.saturating_sub(base).min(total);
                for i in seen..arrived {
                    let d = due(i);
                    if d >= start + WARM_UP {
                        latencies.push(now.saturating_duration_since(d).as_secs_f64() * 1e3);
                    }
                }
                seen = seen.max(arrived);
                if done.load(Ordering::Relaxed) && seen >= total {
                    break;
                }
            }
            anyhow::Ok(latencies)
        })
    };

    // The writer: every call carries all writes that are due. It runs on a
    // thread of its own and sleeps there: tokio's timer rounds a deadline up
    // to its next whole millisecond, which would send each write up to 1 ms
    // after its due time (a phase error that differs from run to run).
    let writer = Writer {
        load,
        flow,
        rate,
        base,
        total,
        start,
        up_url: agent.url("/v1/batch"),
        down_url: format!("{}/v1/agents/{}/batch", hub.api_url(), agent.id()),
    };
    tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(writer.run(&reqwest::Client::new()))
    })
    .await??;
    done.store(true, Ordering::Relaxed);
    let mut ms = observer.await??;
    if let Flow::Up = flow {
        let after = get_json(http, &status_url, false).await?;
        let last = after["outbox_last_seq"]
            .as_u64()
            .context("outbox_last_seq")?;
        ensure!(
            last == base + total,
            "the outbox grew to {last}, expected {} (one entry per write)",
            base + total
        );
    }
    ensure!(!ms.is_empty(), "no write was measured");
    ms.sort_by(f64::total_cmp);
    let samples = Samples { ms, poll_ms };
    eprintln!(
        "  {} {rate}/s: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} writes, poll {:.2} ms)",
        match flow {
            Flow::Up => "up",
            Flow::Down => "down",
        },
        samples.quantile(0.5),
        samples.quantile(0.99),
        samples.quantile(1.0),
        samples.ms.len(),
        samples.poll_ms
    );
    Ok(samples)
}

/// The open-loop writer of one run.
struct Writer {
    load: Load,
    flow: Flow,
    rate: u64,
    base: u64,
    total: u64,
    start: Instant,
    up_url: String,
    down_url: String,
}

impl Writer {
    /// Sends every write when it is due (all that are due in one call).
    async fn run(self, http: &reqwest::Client) -> anyhow::Result<()> {
        let Writer {
            load,
            flow,
            rate,
            base,
            total,
            start,
            up_url,
            down_url,
        } = self;
        let due = move |i: u64| start + Duration::from_secs_f64(i as f64 / rate as f64);
        let tag = format!("{}-{rate}", matches!(flow, Flow::Up) as u8);
        let mut sent = 0u64;
        while sent < total {
            let from = sent;
            let now_due = ((start.elapsed().as_secs_f64() * rate as f64) as u64 + 1).min(total);
            if now_due <= from {
                std::thread::sleep(due(from).saturating_duration_since(Instant::now()));
                continue;
            }
            let upto = now_due.min(from + MAX_BATCH);
            let writes: Vec<Value> = (from..upto)
                .map(|i| match flow {
                    Flow::Up => load.up(&format!("l{tag}-{i}"), i),
                    Flow::Down => load.down(&format!("l{tag}-{i}"), i),
                })
                .collect();
            let request = match flow {
                Flow::Up => http.post(&up_url),
                Flow::Down => http.post(&down_url).bearer_auth(TOKEN),
            };
            let answer: Value = request
                .json(&json!({ "writes": writes }))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            if let Flow::Down = flow {
                let last = answer["last_seq"].as_u64().context("last_seq")?;
                ensure!(
                    last == base + upto,
                    "the hub queued up to {last}, expected {}",
                    base + upto
                );
            }
            sent = upto;
        }
        Ok(())
    }
}
