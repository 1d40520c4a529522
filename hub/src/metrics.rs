//! The hub's counters, in one place so every component counts the same way.
//! Served as JSON by the operator API (`GET /v1/metrics`).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Monotonic counters since the hub started.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        /// A point-in-time copy of [`Metrics`].
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
        pub struct MetricsSnapshot {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl Metrics {
            pub fn snapshot(&self) -> MetricsSnapshot {
                MetricsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }
    };
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
