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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
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
/// Operator writes in flight at once.
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

    let writes = total / VALUE_BYTES as u64;
    let warm = writes / 20;
    let value = "x".repeat(VALUE_BYTES - 64);
    let operator = hub.operator();
    let http_slots = Arc::new(Semaphore::new(WRITERS));
    let write_range = |from: u64, to: u64| {
        let mut tasks = JoinSet::new();
        for w in from..to {
            let (operator, slots, value) = (operator.clone(), http_slots.clone(), value.clone());
            let agent = fleet[(w as usize) % agents].id.clone();
            tasks.spawn(async move {
                let _slot = slots.acquire_owned().await?;
                let path = format!(
                    "/v1/agents/{agent}/records/orders/k{}",
                    (w as usize / agents) % KEYS
                );
                let (status, body) = operator
                    .put(&path, &json!({ "dose": format!("{w}{value}") }))
                    .await?;
                ensure!(
                    status.is_success(),
                    "operator write refused: {status} {body}"
                );
                anyhow::Ok(())
            });
        }
        tasks
    };
    let drain = |upto: u64| {
        let acked = acked.clone();
        async move {
            let t = Instant::now();
            while acked.load(Ordering::Relaxed) < upto {
                if t.elapsed() > DRAIN_DEADLINE {
                    bail!(
                        "agents acknowledged {} of {upto} writes within {DRAIN_DEADLINE:?}",
                        acked.load(Ordering::Relaxed)
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok(())
        }
    };
    let mut warmup = write_range(0, warm);
    while let Some(r) = warmup.join_next().await {
        r??;
    }
    drain(warm).await?;
    let before = rss_mib(hub.pid())?;
    let started = Instant::now();
    let mut rest = write_range(warm, writes);
    while let Some(r) = rest.join_next().await {
        r??;
    }
    drain(writes).await?;
    let took = started.elapsed().as_secs_f64();
    let after = rss_mib(hub.pid())?;
    readers.abort_all();
    let growth = (after - before) / before;
    let mib = (writes - warm) as f64 * VALUE_BYTES as f64 / (1 << 20) as f64;
    eprintln!(
        "memory: {mib:.0} MiB of operator writes down to {agents} agents in {took:.1} s \
         ({:.1} MiB/s); hub RSS {before:.1} MiB warmed up, {after:.1} MiB after: {:+.1}%",
        mib / took,
        growth * 100.0
    );
    report.insert("hub_rss_before_down_mib", before);
    report.insert("hub_rss_after_down_mib", after);
    report.insert("hub_rss_growth_1gb_down", growth);
    report.insert("down_mib_per_s", mib / took);
    drop(hub);
    upstream(total, report).await
}

/// An agent's RSS across `total` bytes of local writes drained upstream.
async fn upstream(total: u64, report: &mut Report) -> anyhow::Result<()> {
    let linked = Linked::start("gw-memory").await?;
    let agent = &linked.agent;
    let http = reqwest::Client::new();
    let status_url = agent.url("/v1/status");
    let writes = total / VALUE_BYTES as u64;
    let warm = writes / 20;
    let value = "x".repeat(VALUE_BYTES - 64);
    let slots = Arc::new(Semaphore::new(WRITERS));
    let write_range = |from: u64, to: u64| {
        let mut tasks = JoinSet::new();
        for w in from..to {
            let (http, slots, value) = (http.clone(), slots.clone(), value.clone());
            let url = agent.url(&format!("/v1/records/patients/p{}", w as usize % KEYS));
            tasks.spawn(async move {
                let _slot = slots.acquire_owned().await?;
                http.put(&url)
                    .json(&json!({ "initials": format!("{w}{value}") }))
                    .send()
                    .await?
                    .error_for_status()?;
                anyhow::Ok(())
            });
        }
        tasks
    };
    let drained = || async {
        time_until("the outbox to drain", DRAIN_DEADLINE, || async {
            Ok(get_json(&http, &status_url, false).await?["outbox_pending"] == 0)
        })
        .await
    };
    let mut warmup = write_range(0, warm);
    while let Some(r) = warmup.join_next().await {
        r??;
    }
    drained().await?;
    let before = rss_mib(agent.pid())?;
    let started = Instant::now();
    let mut rest = write_range(warm, writes);
    while let Some(r) = rest.join_next().await {
        r??;
    }
    drained().await?;
    let took = started.elapsed().as_secs_f64();
    let after = rss_mib(agent.pid())?;
    let growth = (after - before) / before;
    let mib = (writes - warm) as f64 * VALUE_BYTES as f64 / (1 << 20) as f64;
    eprintln!(
        "memory: {mib:.0} MiB of local writes drained upstream in {took:.1} s ({:.1} MiB/s); \
         agent RSS {before:.1} MiB warmed up, {after:.1} MiB after: {:+.1}%",
        mib / took,
        growth * 100.0
    );
    report.insert("agent_rss_before_up_mib", before);
    report.insert("agent_rss_after_up_mib", after);
    report.insert("agent_rss_growth_1gb_up", growth);
    report.insert("up_mib_per_s", mib / took);
    Ok(())
}
