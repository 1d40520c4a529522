//! Webhooks under load: the upstream figure without and with one webhook
//! endpoint subscribed to every change (measured in this scenario, one after
//! the other, on the same hub and agent, so their ratio is what to trust),
//! and the delivery rate to a loopback receiver (the test receiver, which
//! checks every signature).
//!
//! Each run: four writers post 1,000-write batches to the agent; the clock
//! runs until the agent holds the hub's acknowledgement of every write. With
//! the endpoint, delivery is timed from the first write until the receiver
//! has one event per write.

use std::time::{Duration, Instant};

use anyhow::ensure;
use fieldsync_e2e::webhook_receiver::Receiver;
use serde_json::json;

use crate::rules::Load;
use crate::upstream::stream;
use crate::{time_until, Plan, Report};

/// Writes per batch.
const BATCH: u64 = 1000;

pub(crate) async fn run(plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let linked = crate::Linked::start("gw-webhooks").await?;
    let (hub, agent) = (&linked.hub, &linked.agent);
    let http = reqwest::Client::new();
    let total = if plan.quick { 20_000 } else { 100_000 };

    let without = stream(&http, agent, Load::Fleet, "plain", BATCH, total).await?;
    let without_per_s = total as f64 / without.as_secs_f64();

    let receiver = Receiver::start().await?;
    let (status, created) = hub
        .operator()
        .post(
            "/v1/webhooks",
            &json!({"url": receiver.url(), "events": ["record.changed"]}),
        )
        .await?;
    ensure!(status.is_success(), "POST /v1/webhooks: {status} {created}");
    receiver.set_secret(created["secret"].as_str().unwrap_or_default())?;

    let started = Instant::now();
    let with = stream(&http, agent, Load::Fleet, "hooked", BATCH, total).await?;
    let with_per_s = total as f64 / with.as_secs_f64();
    time_until(
        "the receiver to hold every event",
        Duration::from_secs(600),
        || async { Ok(receiver.deliveries().len() as u64 >= total) },
    )
    .await?;
    let delivered = started.elapsed();
    let got = receiver.deliveries();
    ensure!(
        got.iter().all(|d| d.signature_ok),
        "a delivery failed its signature check"
    );
    let events_per_s = got.len() as f64 / delivered.as_secs_f64();
    eprintln!(
        "  upstream {without_per_s:.0} changes/s without a webhook, {with_per_s:.0} with; \
         {} events delivered in {:.1} s ({events_per_s:.0}/s)",
        got.len(),
        delivered.as_secs_f64()
    );
    report.insert("upstream_changes_per_s_no_webhook", without_per_s);
    report.insert("upstream_changes_per_s_webhook", with_per_s);
    report.insert("upstream_webhook_ratio", with_per_s / without_per_s);
    report.insert("webhook_events_per_s", events_per_s);
    Ok(())
}
