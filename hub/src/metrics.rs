//! The hub's metrics, in one place so every component counts the same way:
//! the counters (the `counters!` list below is their single source), the
//! histograms of the sync path, and the levels read at scrape time.
//! Served by the operator API as JSON (`GET /v1/metrics`, counters and
//! `agents_connected`) and in the Prometheus text format (`GET /metrics`,
//! everything, via [`registry`]): each counter `x` in the list is exported as
//! `fieldsync_hub_x_total` with its doc comment as HELP, so a counter added
//! to the list appears in both with no other change.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use serde::Serialize;

use crate::front_door::Connections;
use crate::health::FleetHealth;
use crate::store::HistoryStats;

/// The prefix of every name the hub exports to Prometheus.
pub const PREFIX: &str = "fieldsync_hub";

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident),* $(,)?) => {
        /// Monotonic counters since the hub started, and the histograms of
        /// the sync path.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
            /// Distributions of the sync path (`GET /metrics` only).
            pub histograms: Histograms,
        }

        /// A point-in-time copy of [`Metrics`]' counters.
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
        pub struct MetricsSnapshot {
            $($(#[doc = $doc])* pub $name: u64,)*
        }

        impl Metrics {
            pub fn snapshot(&self) -> MetricsSnapshot {
                MetricsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }

            /// Every counter with its help text (its doc comment) and its
            /// value now, in the order of the list.
            pub fn counters(&self) -> Vec<CounterReading> {
                vec![$(CounterReading {
                    name: stringify!($name),
                    help: concat!($($doc),*),
                    value: self.$name.load(Ordering::Relaxed),
                },)*]
            }
        }

        /// Reads every counter at scrape time, so the list above is all there
        /// is to change: each is `fieldsync_hub_<name>_total`.
        impl Collector for Metrics {
            fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
                for counter in self.counters() {
                    let value = ConstCounter::new(counter.value);
                    let metric = encoder.encode_descriptor(
                        counter.name,
                        counter.help.trim(),
                        None,
                        MetricType::Counter,
                    )?;
                    value.encode(metric)?;
                }
                Ok(())
            }
        }
    };
}

/// One counter as [`Metrics::counters`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterReading {
    /// The field's name (`upstream_changes_applied`).
    pub name: &'static str,
    /// Its doc comment, lines joined (with a leading space).
    pub help: &'static str,
    pub value: u64,
}

counters!(
    /// TCP connections accepted by the front door.
    connections_accepted,
    /// Authenticated connections refused because `mqtt.max_connections` agents
    /// were connected.
    connections_over_limit,
    /// Times the front door stopped accepting because
    /// `mqtt.max_pending_connections` connections were still in TLS or
    /// CONNECT (new ones wait in the listen backlog meanwhile).
    pending_over_limit,
    /// Connections closed because they held a pending slot for over a second
    /// while others waited for one (idle or stalled before CONNECT).
    pending_evicted,
    /// Connections closed at accept because their source IP held
    /// `mqtt.max_pending_per_ip` connections still in TLS or CONNECT.
    pending_over_ip_limit,
    /// Connections closed because a newer connection of the same agent took over.
    connections_replaced,
    /// Connections closed because no packet came within 1.5 keep-alive periods.
    keep_alive_timeouts,
    /// Connections closed because the agent did not read what the hub sent
    /// (its outbound queue reached its bound; the protocol resends).
    slow_readers_closed,
    /// Times a connection's reading paused because it was over its message or
    /// byte rate (`mqtt.rate_*`).
    messages_throttled,
    /// Hellos dropped because the agent said hello too often.
    hellos_throttled,
    /// Downstream messages not delivered because the connection was not
    /// subscribed to its down topic (the protocol resends).
    downstream_unsubscribed,
    /// TLS handshakes that failed or timed out (no or bad client certificate included).
    tls_handshake_failures,
    /// Client certificates whose CN is not a valid agent id.
    identity_rejected,
    /// CONNECT packets refused (client id not the certificate's identity, a will,
    /// wrong protocol, or none within the timeout).
    connect_refused,
    /// Packets that broke the topic ACL or protocol rules; the connection was closed.
    acl_violations,
    /// Malformed or oversize MQTT packets; the connection was closed.
    malformed_packets,
    /// Agent sessions that completed CONNECT through the front door.
    sessions_established,
    /// Envelopes from agents that failed to decode.
    envelopes_rejected,
    /// Upstream changes applied to the hub store.
    upstream_changes_applied,
    /// Upstream batches applied (each one durable transaction).
    upstream_batches_applied,
    /// Re-sent upstream batches recognised as already applied.
    upstream_duplicates,
    /// Fields an agent sent that the hub's policy does not permit (dropped).
    policy_denied_fields,
    /// Field values an agent sent that break the hub's schema (dropped, never
    /// stored; the agent is told, and a `schema.refused` event is logged).
    schema_refused_fields,
    /// Reports from agents that refused downstream field values breaking
    /// their schema.
    schema_refused_by_agents,
    /// Upstream changes stamped with an origin other than the sending agent (dropped).
    forged_origin_changes,
    /// Batches or snapshot parts refused because a stamp was beyond the hub
    /// clock's drift bound (nothing applied; the agent keeps them queued).
    clock_drift_rejected,
    /// Downstream batches an agent refused because their stamps were ahead of
    /// its clock (they stay queued).
    clock_refused_by_agents,
    /// Resyncs by snapshot the hub sent to agents.
    resyncs_sent,
    /// Resyncs by snapshot the hub received from agents (completed).
    resyncs_received,
    /// Hellos refused because another store claims the agent's identity.
    identity_conflicts,
    /// Hellos refused because the agent's merge rules are not the hub's.
    rules_mismatches,
    /// Hellos from agents whose store is new to the hub (first contact or re-imaged).
    incarnations_replaced,
    /// Messages dropped because their connection was already gone.
    ghost_messages,
    /// Operator writes refused (409) because they could not win.
    operator_writes_refused,
    /// Downstream changes queued by operators.
    downstream_changes_queued,
    /// Downstream batches published to agents.
    downstream_batches_sent,
    /// Downstream resends after an acknowledgement timeout.
    downstream_resends,
    /// Webhook events delivered (answered 2xx).
    webhook_deliveries,
    /// Webhook delivery attempts that failed (timeout, refused, non-2xx).
    webhook_failures,
    /// Webhook events given up after `webhooks.max_attempts` failures (a
    /// replay can send them again).
    webhook_events_given_up,
    /// Webhook endpoints disabled because they answered 410 Gone.
    webhook_endpoints_disabled,
    /// Events dropped from the event log past its retention.
    events_trimmed,
    /// Times a connected agent became `stalled` (a backlog and no upstream
    /// applied for `health.stall_after_ms`).
    agent_stalls,
);

impl Metrics {
    /// Adds one to `counter`.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// The histograms of the sync path; each observation takes one short lock,
/// so they are fed per commit and per batch, never per change.
#[derive(Debug, Clone)]
pub struct Histograms {
    /// `fieldsync_hub_commit_seconds`: how long the engine's durable group
    /// commit of upstream batches took (one observation per transaction).
    pub commit_seconds: Histogram,
    /// `fieldsync_hub_batch_changes`: changes in each applied upstream batch
    /// (after the hub's policy; snapshot parts are not batches).
    pub batch_changes: Histogram,
    /// `fieldsync_hub_sync_lag_seconds`: per applied upstream batch, the hub's
    /// wall clock once the batch is durable minus the HLC wall time of the
    /// batch's newest change (the agent's corrected clock when it wrote it),
    /// clamped at 0: how far the hub's copy trails the agent's latest write.
    pub sync_lag_seconds: Histogram,
}

/// Bucket bounds, in seconds, of a redb group commit: 100 µs to 10 s.
pub const COMMIT_SECONDS_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Bucket bounds, in seconds, of end-to-end lag: 5 ms (a live link) to a
/// week (an agent that was offline that long).
pub const SYNC_LAG_SECONDS_BUCKETS: [f64; 19] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0, 21600.0, 86400.0, 604800.0,
];

/// Bucket bounds of changes per batch: 1, 2, 4, .. 8192.
pub fn batch_changes_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(1.0, 2.0, 14)
}

impl Default for Histograms {
    fn default() -> Self {
        Self {
            commit_seconds: Histogram::new(COMMIT_SECONDS_BUCKETS),
            batch_changes: Histogram::new(batch_changes_buckets()),
            sync_lag_seconds: Histogram::new(SYNC_LAG_SECONDS_BUCKETS),
        }
    }
}

/// Milliseconds as seconds, for the `_seconds` histograms.
pub fn seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// Reads the store's history figures at scrape time (`None`: unreadable now).
pub type HistoryReading = Arc<dyn Fn() -> Option<HistoryStats> + Send + Sync>;

/// Levels (gauges) read at scrape time.
struct Levels {
    connections: Arc<Connections>,
    health: Option<Arc<FleetHealth>>,
    history: Option<HistoryReading>,
}

impl std::fmt::Debug for Levels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Levels").finish_non_exhaustive()
    }
}

impl Collector for Levels {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let connected =
            ConstGauge::new(i64::try_from(self.connections.count()).unwrap_or(i64::MAX));
        let metric = encoder.encode_descriptor(
            "agents_connected",
            "Agents with an authenticated connection to the hub now.",
            None,
            MetricType::Gauge,
        )?;
        connected.encode(metric)?;
        if let Some(health) = &self.health {
            let connections = &self.connections;
            let stalled = health.stalled(
                |a| connections.is_connected(a),
                fieldsync_shared::hlc::system_now_ms(),
            );
            let metric = encoder.encode_descriptor(
                "agents_stalled",
                "Connected agents that report a backlog the hub has not applied from for health.stall_after_ms.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::try_from(stalled).unwrap_or(i64::MAX)).encode(metric)?;
        }
        if let Some(stats) = self.history.as_ref().and_then(|read| read()) {
            let metric = encoder.encode_descriptor(
                "history_bytes",
                "Bytes of record version history the store keeps.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::try_from(stats.bytes).unwrap_or(i64::MAX)).encode(metric)?;
            let metric = encoder.encode_descriptor(
                "history_dropped",
                "Record versions dropped from history by its bounds (history per record, history.max_bytes per store).",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(stats.dropped).encode(metric)?;
        }
        Ok(())
    }
}

/// Everything `GET /metrics` serves, under [`PREFIX`]: the counters of
/// `metrics` (read at scrape time), its histograms, and the levels.
pub fn registry(
    metrics: Arc<Metrics>,
    connections: Arc<Connections>,
    health: Option<Arc<FleetHealth>>,
    history: Option<HistoryReading>,
) -> Registry {
    let mut registry = Registry::with_prefix(PREFIX);
    let h = &metrics.histograms;
    registry.register_with_unit(
        "commit",
        "Duration of the engine's durable group commit of upstream batches",
        Unit::Seconds,
        h.commit_seconds.clone(),
    );
    registry.register(
        "batch_changes",
        "Changes in each applied upstream batch",
        h.batch_changes.clone(),
    );
    registry.register_with_unit(
        "sync_lag",
        "Per applied upstream batch: the hub clock once it is durable minus the stamp of its newest change (0 if the agent clock is ahead)",
        Unit::Seconds,
        h.sync_lag_seconds.clone(),
    );
    registry.register_collector(Box::new(Levels {
        connections,
        health,
        history,
    }));
    registry.register_collector(Box::new(metrics));
    registry
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::prometheus_text::encode;

    use super::*;

    fn exposition(metrics: Arc<Metrics>) -> String {
        let mut text = String::new();
        encode(&mut text, &registry(metrics, Arc::default(), None, None)).unwrap();
        text
    }

    #[test]
    fn every_counter_has_help_text() {
        for counter in Metrics::default().counters() {
            assert!(
                !counter.help.trim().is_empty(),
                "counter {} needs a doc comment: it is its HELP on /metrics",
                counter.name
            );
        }
    }

    #[test]
    fn every_counter_is_exported_with_its_help_and_value() {
        let metrics = Arc::new(Metrics::default());
        Metrics::add(&metrics.upstream_changes_applied, 42);
        let text = exposition(metrics.clone());
        let snapshot = serde_json::to_value(metrics.snapshot()).unwrap();
        let json = snapshot.as_object().unwrap();
        let counters = metrics.counters();
        assert_eq!(json.len(), counters.len());
        for counter in counters {
            assert!(
                json.contains_key(counter.name),
                "{} not in the JSON",
                counter.name
            );
            let name = format!("{PREFIX}_{}_total", counter.name);
            let help = format!("# HELP {name} {}\n", counter.help.trim());
            assert!(text.contains(&help), "{help:?} missing in\n{text}");
            assert!(text.contains(&format!("# TYPE {name} counter\n")), "{name}");
            let sample = format!("\n{name} {}\n", counter.value);
            assert!(text.contains(&sample), "{sample:?} missing");
        }
        assert!(text.contains("\nfieldsync_hub_upstream_changes_applied_total 42\n"));
        // A multi-line doc comment is joined into one line of help.
        assert!(text.contains(
            "# HELP fieldsync_hub_connections_over_limit_total Authenticated connections refused because `mqtt.max_connections` agents were connected.\n"
        ));
    }

    #[test]
    fn histograms_and_levels_have_their_units_and_types() {
        let metrics = Arc::new(Metrics::default());
        metrics.histograms.commit_seconds.observe(0.002);
        metrics.histograms.batch_changes.observe(3.0);
        metrics.histograms.sync_lag_seconds.observe(seconds(1500));
        let text = exposition(metrics);
        for (name, kind) in [
            ("fieldsync_hub_commit_seconds", "histogram"),
            ("fieldsync_hub_batch_changes", "histogram"),
            ("fieldsync_hub_sync_lag_seconds", "histogram"),
            ("fieldsync_hub_agents_connected", "gauge"),
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name}\n{text}"
            );
        }
        assert!(
            text.contains("fieldsync_hub_commit_seconds_count 1\n"),
            "{text}"
        );
        assert!(
            text.contains("fieldsync_hub_sync_lag_seconds_sum 1.5\n"),
            "{text}"
        );
        assert!(
            text.contains("fieldsync_hub_batch_changes_bucket{le=\"4\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("fieldsync_hub_agents_connected 0\n"),
            "{text}"
        );
    }
}
