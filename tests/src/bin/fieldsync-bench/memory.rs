//! The hub-memory scenario: does the hub give memory back after heavy
//! downstream traffic? 100 simulated agents (10 in a quick run) connect as in
//! the fleet scenario; operators then write 1 GiB (64 MiB quick) of 64 KiB
//! values down to them through the API, and each agent acknowledges every
//! batch as it arrives. Reports the hub's RSS once warmed up (the first 5% of
//! the traffic), after all of it, and the growth between the two
//! (`hub_rss_growth_1gb_down`, a fraction: 0.2 is 20%). Values rewrite a few
//! keys per agent, so the store stays small and what is measured is the
//! transport's and the engine's memory, not the data's.
//!
//! The same for an agent: a real `fieldsync-agent` linked to a real hub takes
//! 1 GiB (64 MiB quick) of 64 KiB local writes through its API and drains
//! them upstream; its RSS once warmed up and after the drain
//! (`agent_rss_growth_1gb_up`).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use fieldsync_e2e::fleet::{Pki, TempHub, FLEET_POLICY};
use fieldsync_shared::wire::{up_topic, Ack, Message};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::fleet::{issue_fleet, session, source};
use crate::{get_json, rss_mib, time_until, Linked, Plan, Report};

/// Bytes of each written value.
const VALUE_BYTES: usize = 64 << 10;
/// Keys each agent's values rotate over.
const KEYS: usize = 4;
/// Writes in flight at once (operator or local).
const WRITERS: usize = 8;
/// Every write must be acknowledged by its agent within this long of the last.
const DRAIN_DEADLINE: Duration = Duration::from_secs(120);

pub(crate) async fn downstream(plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let (agents, total): (usize, u64) = if plan.quick {
        (10, 64 << 20)
    } else {
        (100, 1 << 30)
    };
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(&dir.path().join("pki"))?;
    let fleet = issue_fleet(&pki, agents)?;
    let hub_dir = dir.path().join("hub");
    std::fs::create_dir_all(&hub_dir)?;
    let hub = TempHub::start(&hub_dir, &pki, FLEET_POLICY)?;
    let addr = hub.mqtt_addr();
    let deadline = tokio::time::Instant::now() + DRAIN_DEADLINE * 4;
    let slots = Arc::new(Semaphore::new(agents));
    let acked = Arc::new(AtomicU64::new(0));
    let mut readers = JoinSet::new();
    for (i, agent) in fleet.iter().enumerate() {
        let s = session(
            addr,
            source(i),
            &agent.id,
            agent.tls.clone(),
            slots.clone(),
            deadline,
            None,
        )
        .await
        .with_context(|| format!("agent {}", agent.id))?;
        let (id, acked) = (agent.id.clone(), acked.clone());
        let mut mqtt = s.mqtt;
        // Each agent acknowledges every batch as it arrives, as the agent's
        // session does once it has stored it.
        readers.spawn(async move {
            let _: anyhow::Result<()> = async {
                loop {
                    if let Message::Batch(b) = mqtt.next_msg(Duration::from_secs(3600)).await? {
                        acked.fetch_add(b.entries.len() as u64, Ordering::Relaxed);
                        let ack = Message::Ack(Ack {
                            upto: b.last,
                            check: b.check,
                        });
                        mqtt.publish_msg(&up_topic(&id), ack).await?;
                    }
                }
            }
            .await;
        });
    }

    let value = Arc::new("x".repeat(VALUE_BYTES - 64));
    let operator = hub.operator();
    let write = |w: u64| {
        let (operator, value) = (operator.clone(), value.clone());
        let path = format!(
            "/v1/agents/{}/records/orders/k{}",
            fleet[(w as usize) % agents].id,
            (w as usize / agents) % KEYS
        );
        async move {
            let (status, body) = operator
                .put(&path, &json!({ "dose": format!("{w}{value}") }))
                .await?;
            ensure!(
                status.is_success(),
                "operator write refused: {status} {body}"
            );
            anyhow::Ok(())
        }
    };
    let drained = |upto: u64| {
        let acked = acked.clone();
        async move {
            time_until(
                "the agents to acknowledge every write",
                DRAIN_DEADLINE,
                || async { Ok(acked.load(Ordering::Relaxed) >= upto) },
            )
            .await
            .map(|_| ())
        }
    };
    let g = around(total, write, drained, || rss_mib(hub.pid())).await?;
    readers.abort_all();
    eprintln!(
        "memory: {:.0} MiB of operator writes down to {agents} agents in {:.1} s \
         ({:.1} MiB/s); hub RSS {:.1} MiB warmed up, {:.1} MiB after: {:+.1}%",
        g.mib,
        g.took,
        g.mib / g.took,
        g.before,
        g.after,
        g.growth() * 100.0
    );
    report.insert("hub_rss_before_down_mib", g.before);
    report.insert("hub_rss_after_down_mib", g.after);
    report.insert("hub_rss_growth_1gb_down", g.growth());
    report.insert("down_mib_per_s", g.mib / g.took);
    drop(hub);
    upstream(total, report).await
}

/// An agent's RSS across `total` bytes of local writes drained upstream.
async fn upstream(total: u64, report: &mut Report) -> anyhow::Result<()> {
    let linked = Linked::start("gw-memory").await?;
    let agent = &linked.agent;
    let http = reqwest::Client::new();
    let status_url = agent.url("/v1/status");
    let value = Arc::new("x".repeat(VALUE_BYTES - 64));
    let write = |w: u64| {
        let (http, value) = (http.clone(), value.clone());
        let url = agent.url(&format!("/v1/records/patients/p{}", w as usize % KEYS));
        async move {
            http.put(&url)
                .json(&json!({ "initials": format!("{w}{value}") }))
                .send()
                .await?
                .error_for_status()?;
            anyhow::Ok(())
        }
    };
    let drained = |_upto: u64| async {
        time_until("the outbox to drain", DRAIN_DEADLINE, || async {
            Ok(get_json(&http, &status_url, false).await?["outbox_pending"] == 0)
        })
        .await
        .map(|_| ())
    };
    let g = around(total, write, drained, || rss_mib(agent.pid())).await?;
    eprintln!(
        "memory: {:.0} MiB of local writes drained upstream in {:.1} s ({:.1} MiB/s); \
         agent RSS {:.1} MiB warmed up, {:.1} MiB after: {:+.1}%",
        g.mib,
        g.took,
        g.mib / g.took,
        g.before,
        g.after,
        g.growth() * 100.0
    );
    report.insert("agent_rss_before_up_mib", g.before);
    report.insert("agent_rss_after_up_mib", g.after);
    report.insert("agent_rss_growth_1gb_up", g.growth());
    report.insert("up_mib_per_s", g.mib / g.took);
    Ok(())
}

/// A process's RSS once warmed up and after the rest of the traffic.
struct Growth {
    before: f64,
    after: f64,
    /// Seconds and MiB of the measured (post-warm-up) traffic.
    took: f64,
    mib: f64,
}

impl Growth {
    fn growth(&self) -> f64 {
        (self.after - self.before) / self.before
    }
}

/// `total` bytes of writes (`write(w)` makes write `w`): the first 5% as a
/// warm-up, then `rss` before, the rest, and `rss` after; each part ends
/// once `drained(writes so far)` says it went through.
async fn around<W, WF, D, DF>(
    total: u64,
    write: W,
    drained: D,
    rss: impl Fn() -> anyhow::Result<f64>,
) -> anyhow::Result<Growth>
where
    W: Fn(u64) -> WF,
    WF: Future<Output = anyhow::Result<()>> + Send + 'static,
    D: Fn(u64) -> DF,
    DF: Future<Output = anyhow::Result<()>>,
{
    let writes = total / VALUE_BYTES as u64;
    let warm = writes / 20;
    write_all(0..warm, &write).await?;
    drained(warm).await?;
    let before = rss()?;
    let started = Instant::now();
    write_all(warm..writes, &write).await?;
    drained(writes).await?;
    let took = started.elapsed().as_secs_f64();
    Ok(Growth {
        before,
        after: rss()?,
        took,
        mib: (writes - warm) as f64 * VALUE_BYTES as f64 / (1 << 20) as f64,
    })
}

/// Runs `write(w)` for every `w` in `range`, [`WRITERS`] at once; the first
/// failure ends it.
async fn write_all<W, WF>(range: std::ops::Range<u64>, write: &W) -> anyhow::Result<()>
where
    W: Fn(u64) -> WF,
    WF: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(WRITERS));
    let mut tasks = JoinSet::new();
    for w in range {
        let (slots, one) = (slots.clone(), write(w));
        tasks.spawn(async move {
            let _slot = slots.acquire_owned().await?;
            one.await
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}
