//! The agent's metrics in the Prometheus text format, for `GET /metrics` on
//! the local API: the committer's counters and histograms
//! ([`crate::writer::CommitStats`]), the link's counters and levels
//! ([`crate::link::LinkStatus`]) and two readings of the store, all read at
//! scrape time. Every name starts with [`PREFIX`]; counters end in `_total`,
//! durations in `_seconds`. The list is [`NAMES`] (README, "Metrics").

use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{prometheus_text, DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::link::LinkStatus;
use crate::writer::CommitStats;

/// The prefix of every name the agent exports.
pub const PREFIX: &str = "fieldsync_agent";

/// Every name `GET /metrics` serves (histograms by their base name).
pub const NAMES: [&str; 21] = [
    "fieldsync_agent_commits_total",
    "fieldsync_agent_write_requests_total",
    "fieldsync_agent_writes_total",
    "fieldsync_agent_downstream_commits_total",
    "fieldsync_agent_downstream_changes_total",
    "fieldsync_agent_batches_sent_total",
    "fieldsync_agent_resyncs_sent_total",
    "fieldsync_agent_resyncs_received_total",
    "fieldsync_agent_history_dropped_total",
    "fieldsync_agent_history_bytes",
    "fieldsync_agent_clock_refused_total",
    "fieldsync_agent_schema_refused_total",
    "fieldsync_agent_schema_refused_down_total",
    "fieldsync_agent_connected",
    "fieldsync_agent_outbox_pending",
    "fieldsync_agent_clock_offset_seconds",
    "fieldsync_agent_resync_running",
    "fieldsync_agent_identity_conflict",
    "fieldsync_agent_write_requests_queued",
    "fieldsync_agent_commit_seconds",
    "fieldsync_agent_batch_changes",
];

/// Bucket bounds, in seconds, of a durable redb commit: 100 µs to 10 s.
pub const COMMIT_SECONDS_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Bucket bounds of writes per commit: 1, 2, 4, .. 4096 (the most one
/// commit takes, [`crate::writer::MAX_OPS_PER_COMMIT`]) and above.
pub fn batch_changes_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(1.0, 2.0, 13)
}

/// What one scrape reads from the store (one read each, off the async threads).
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreReadings {
    /// Entries in the outbox now.
    pub outbox_pending: u64,
    /// Resyncs from the hub completed (kept in the store across restarts).
    pub resyncs_received: u64,
    /// Bytes of version history kept, and versions its bounds dropped.
    pub history_bytes: u64,
    pub history_dropped: u64,
}

/// Everything else one scrape reads.
pub struct Sources<'a> {
    pub stats: &'a CommitStats,
    pub link: &'a LinkStatus,
    /// The clock correction in force (`clock_offset_ms` in `/v1/status`).
    pub clock_offset_ms: i64,
    /// Write requests waiting for the committer.
    pub queued: usize,
    pub store: StoreReadings,
}

#[derive(Debug, Clone, Copy)]
enum Value {
    Counter(u64),
    Gauge(i64),
    Seconds(f64),
}

#[derive(Debug)]
struct Reading {
    name: &'static str,
    help: &'static str,
    value: Value,
}

/// The readings of one scrape, encoded in order.
#[derive(Debug)]
struct Readings(Vec<Reading>);

impl Collector for Readings {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for r in &self.0 {
            match r.value {
                Value::Counter(v) => {
                    let m = encoder.encode_descriptor(r.name, r.help, None, MetricType::Counter)?;
                    ConstCounter::new(v).encode(m)?;
                }
                Value::Gauge(v) => {
                    let m = encoder.encode_descriptor(r.name, r.help, None, MetricType::Gauge)?;
                    ConstGauge::new(v).encode(m)?;
                }
                Value::Seconds(v) => {
                    let unit = Unit::Seconds;
                    let m = encoder.encode_descriptor(
                        r.name,
                        r.help,
                        Some(&unit),
                        MetricType::Gauge,
                    )?;
                    ConstGauge::new(v).encode(m)?;
                }
            }
        }
        Ok(())
    }
}

fn reading(name: &'static str, help: &'static str, value: Value) -> Reading {
    Reading { name, help, value }
}

/// The exposition of `sources`, in the Prometheus text format (0.0.4).
pub fn encode(sources: &Sources<'_>) -> Result<String, std::fmt::Error> {
    use Value::{Counter, Gauge, Seconds};
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let flag = |a: &std::sync::atomic::AtomicBool| i64::from(a.load(Ordering::Relaxed));
    let (stats, link) = (sources.stats, sources.link);
    let readings = vec![
        reading(
            "commits",
            "Local group commits (durable transactions of local writes).",
            Counter(load(&stats.commits)),
        ),
        reading(
            "write_requests",
            "Write requests (PUT, DELETE, batch) answered by those commits.",
            Counter(load(&stats.requests)),
        ),
        reading(
            "writes",
            "Record writes (puts and deletes) in those commits.",
            Counter(load(&stats.writes)),
        ),
        reading(
            "downstream_commits",
            "Downstream batches and snapshot parts from the hub merged, each in one transaction.",
            Counter(load(&stats.downstream_commits)),
        ),
        reading(
            "downstream_changes",
            "Changes from the hub in those.",
            Counter(load(&stats.downstream_changes)),
        ),
        reading(
            "batches_sent",
            "Upstream batches published to the hub, resends included.",
            Counter(load(&link.batches_sent)),
        ),
        reading(
            "resyncs_sent",
            "Resyncs by snapshot this agent sent to the hub.",
            Counter(load(&link.resyncs_sent)),
        ),
        reading(
            "resyncs_received",
            "Resyncs by snapshot from the hub completed (kept across restarts).",
            Counter(sources.store.resyncs_received),
        ),
        reading(
            "history_dropped",
            "Record versions dropped from history by its bounds (history per record, history.max_bytes per store).",
            Counter(sources.store.history_dropped),
        ),
        reading(
            "history_bytes",
            "Bytes of record version history kept.",
            Gauge(i64::try_from(sources.store.history_bytes).unwrap_or(i64::MAX)),
        ),
        reading(
            "clock_refused",
            "Batches the hub refused because their stamps were ahead of its clock (they stay queued).",
            Counter(load(&link.clock_refused)),
        ),
        reading(
            "schema_refused",
            "Changes the hub applied without field values that break its schema.",
            Counter(load(&link.schema_refused)),
        ),
        reading(
            "schema_refused_down",
            "Downstream field values this agent refused for breaking its schema.",
            Counter(load(&link.schema_refused_down)),
        ),
        reading(
            "connected",
            "1 while the hub has welcomed this agent on a live link, else 0.",
            Gauge(flag(&link.connected)),
        ),
        reading(
            "outbox_pending",
            "Outbox entries waiting for the hub's acknowledgement.",
            Gauge(i64::try_from(sources.store.outbox_pending).unwrap_or(i64::MAX)),
        ),
        reading(
            "clock_offset",
            "The correction applied to the device clock, learned from the hub.",
            Seconds(sources.clock_offset_ms as f64 / 1000.0),
        ),
        reading(
            "resync_running",
            "1 while a resync by snapshot runs (either way), else 0.",
            Gauge(flag(&link.resyncing)),
        ),
        reading(
            "identity_conflict",
            "1 if the hub refused this store's identity (another device uses its certificate), else 0.",
            Gauge(flag(&link.identity_refused)),
        ),
        reading(
            "write_requests_queued",
            "Write requests waiting for the committer.",
            Gauge(i64::try_from(sources.queued).unwrap_or(i64::MAX)),
        ),
    ];
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register_with_unit(
        "commit",
        "Duration of each local group commit",
        Unit::Seconds,
        stats.commit_seconds.clone(),
    );
    registry.register(
        "batch_changes",
        "Record writes in each local group commit",
        stats.batch_changes.clone(),
    );
    registry.register_collector(Box::new(Readings(readings)));
    let mut text = String::new();
    prometheus_text::encode(&mut text, &registry)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    #[test]
    fn every_documented_name_is_served_and_nothing_else() {
        let stats = CommitStats::default();
        stats.commits.store(3, Ordering::Relaxed);
        stats.commit_seconds.observe(0.004);
        stats.batch_changes.observe(7.0);
        let link = LinkStatus::default();
        link.connected.store(true, Ordering::Relaxed);
        let text = encode(&Sources {
            stats: &stats,
            link: &link,
            clock_offset_ms: -1500,
            queued: 2,
            store: StoreReadings {
                outbox_pending: 9,
                resyncs_received: 1,
                history_bytes: 300,
                history_dropped: 2,
            },
        })
        .unwrap();
        let typed: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        assert_eq!(typed.len(), NAMES.len(), "{text}");
        for name in NAMES {
            assert!(typed.contains(&name), "{name} missing in\n{text}");
        }
        for line in [
            "fieldsync_agent_commits_total 3",
            "fieldsync_agent_connected 1",
            "fieldsync_agent_outbox_pending 9",
            "fieldsync_agent_clock_offset_seconds -1.5",
            "fieldsync_agent_write_requests_queued 2",
            "fieldsync_agent_resyncs_received_total 1",
            "fieldsync_agent_history_dropped_total 2",
            "fieldsync_agent_history_bytes 300",
            "fieldsync_agent_commit_seconds_count 1",
            "fieldsync_agent_batch_changes_sum 7.0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
        for help in text.lines().filter(|l| l.starts_with("# HELP ")) {
            let words = help.splitn(4, ' ').nth(3).unwrap_or("");
            assert!(!words.trim().is_empty(), "no help text: {help}");
        }
    }
}
