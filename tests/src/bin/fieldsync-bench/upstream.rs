//! Live upstream throughput: changes per second from the agent's batch API
//! until the hub has committed them durably and the agent holds the
//! acknowledgement, for a few batch sizes, with the agent linked all along.
//!
//! Four writers post batches of `size` writes back to back (each write one
//! record with a permitted and a local-only field); the clock runs from the
//! first post until the agent's `outbox_acked_seq` covers every write. The
//! 1,000-write figure is `upstream_changes_per_s`.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use fieldsync_e2e::TempAgent;
use serde_json::{json, Value};

use crate::rules::Load;
use crate::{get_json, time_until, Plan, Report};

/// Concurrent writers.
const WRITERS: u64 = 4;

/// Writes `total` new records (keys `{tag}-{n}`, shaped by `load`) in batches
/// of `size` from four writers and waits until the agent holds the hub's acknowledgement of
/// every one; the time from the first post.
pub(crate) async fn stream(
    http: &reqwest::Client,
    agent: &TempAgent,
    load: Load,
    tag: &str,
    size: u64,
    total: u64,
) -> anyhow::Result<Duration> {
    let status_url = agent.url("/v1/status");
    let before = get_json(http, &status_url, false).await?;
    let base = before["outbox_last_seq"]
        .as_u64()
        .context("outbox_last_seq")?;
    let start = Instant::now();
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let (http, url, tag) = (http.clone(), agent.url("/v1/batch"), tag.to_owned());
        writers.spawn(async move {
            let mut i = w * size;
            while i < total {
                let writes: Vec<Value> = (i..(i + size).min(total))
                    .map(|n| load.up(&format!("{tag}-{n}"), n))
                    .collect();
                http.post(&url)
                    .json(&json!({ "writes": writes }))
                    .send()
                    .await?
                    .error_for_status()?;
                i += WRITERS * size;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = writers.join_next().await {
        r??;
    }
    let last = base + total;
    time_until(
        "the hub to acknowledge every write",
        Duration::from_secs(300),
        || async {
            let status = get_json(http, &status_url, false).await?;
            ensure!(
                status["outbox_last_seq"] == last,
                "the outbox holds up to {}, expected {last} (one entry per write)",
                status["outbox_last_seq"]
            );
            Ok(status["outbox_acked_seq"] == last)
        },
    )
    .await?;
    Ok(start.elapsed())
}

pub(crate) async fn run(plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let linked = crate::Linked::start("gw-upstream").await?;
    let http = reqwest::Client::new();
    let scale = if plan.quick { 1 } else { 5 };
    let runs: [(u64, u64, &'static str); 3] = [
        (10, 4_000 * scale, "upstream_changes_per_s_b10"),
        (100, 20_000 * scale, "upstream_changes_per_s_b100"),
        (1000, 40_000 * scale, "upstream_changes_per_s"),
    ];
    for (size, total, key) in runs {
        let tag = format!("u{size}");
        let took = stream(&http, &linked.agent, Load::Fleet, &tag, size, total).await?;
        let per_s = total as f64 / took.as_secs_f64();
        eprintln!("  batches of {size}: {per_s:.0} changes/s ({total} changes)");
        report.insert(key, per_s);
    }
    Ok(())
}
