//! Sync health: what each agent last reported of its outbox (the protocol's
//! `Health` message), when the hub last applied something of its upstream,
//! and the state computed from both — `syncing`, `idle`, `stalled`
//! (connected, reporting a backlog, and nothing applied for
//! `[health] stall_after_ms` since before that report), or `offline`. Kept
//! in memory: it is about the live fleet, and a restarted hub learns it
//! again within one report interval.

use std::collections::HashMap;
use std::sync::Mutex;

use fieldsync_shared::wire::Health;
use fieldsync_shared::AgentId;
use serde::Serialize;

/// An agent's sync state, as `GET /v1/agents` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SyncState {
    /// Connected, with a backlog that moves (or no report yet).
    Syncing,
    /// Connected, nothing pending.
    Idle,
    /// Connected, a backlog, and no upstream progress for `stall_after`.
    Stalled,
    Offline,
}

/// What the hub knows of one agent's health.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AgentHealth {
    pub report: Option<Health>,
    /// Hub wall time of the last report (ms).
    pub report_at_ms: u64,
    /// Hub wall time the agent last linked or had upstream applied (ms).
    pub progress_ms: u64,
    /// Whether the stall was announced (an event and a count), so it is
    /// announced once per stall.
    announced: bool,
}

/// Every agent's health, shared by the engine (which feeds it) and the
/// operator API (which shows it).
#[derive(Debug)]
pub struct FleetHealth {
    agents: Mutex<HashMap<AgentId, AgentHealth>>,
    stall_after_ms: u64,
}

impl FleetHealth {
    pub fn new(stall_after_ms: u64) -> Self {
        Self {
            agents: Mutex::new(HashMap::new()),
            stall_after_ms,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<AgentId, AgentHealth>) -> T) -> T {
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut agents)
    }

    fn entry<'a>(
        agents: &'a mut HashMap<AgentId, AgentHealth>,
        agent: &AgentId,
        now_ms: u64,
    ) -> &'a mut AgentHealth {
        agents.entry(agent.clone()).or_insert(AgentHealth {
            report: None,
            report_at_ms: 0,
            progress_ms: now_ms,
            announced: false,
        })
    }

    /// The agent linked: the stall clock starts over.
    pub fn linked(&self, agent: &AgentId, now_ms: u64) {
        self.with(|a| Self::entry(a, agent, now_ms).progress_ms = now_ms);
    }

    /// The hub applied some of the agent's upstream.
    pub fn progressed(&self, agent: &AgentId, now_ms: u64) {
        self.with(|a| {
            let h = Self::entry(a, agent, now_ms);
            h.progress_ms = now_ms;
            h.announced = false;
        });
    }

    /// The agent reported its health.
    pub fn reported(&self, agent: &AgentId, report: Health, now_ms: u64) {
        self.with(|a| {
            let h = Self::entry(a, agent, now_ms);
            h.report = Some(report);
            h.report_at_ms = now_ms;
        });
    }

    fn classify(&self, h: &AgentHealth, connected: bool, now_ms: u64) -> SyncState {
        if !connected {
            return SyncState::Offline;
        }
        match &h.report {
            None => SyncState::Syncing,
            Some(r) if r.outbox_pending == 0 => SyncState::Idle,
            Some(_)
                if h.report_at_ms > h.progress_ms
                    && now_ms.saturating_sub(h.progress_ms) >= self.stall_after_ms =>
            {
                SyncState::Stalled
            }
            Some(_) => SyncState::Syncing,
        }
    }

    /// The agent's state and what it last reported.
    pub fn state(
        &self,
        agent: &AgentId,
        connected: bool,
        now_ms: u64,
    ) -> (SyncState, Option<AgentHealth>) {
        self.with(|a| match a.get(agent) {
            Some(h) => (self.classify(h, connected, now_ms), Some(*h)),
            None if connected => (SyncState::Syncing, None),
            None => (SyncState::Offline, None),
        })
    }

    /// Agents that became stalled since the last call (each stall once),
    /// with their reported backlog; `connected` says which agents are linked.
    pub fn newly_stalled(
        &self,
        connected: impl Fn(&AgentId) -> bool,
        now_ms: u64,
    ) -> Vec<(AgentId, u64)> {
        self.with(|a| {
            let mut out = Vec::new();
            for (agent, h) in a.iter_mut() {
                let stalled = self.classify(h, connected(agent), now_ms) == SyncState::Stalled;
                if stalled && !h.announced {
                    h.announced = true;
                    out.push((agent.clone(), h.report.map_or(0, |r| r.outbox_pending)));
                } else if !stalled {
                    h.announced = false;
                }
            }
            out
        })
    }

    /// How many connected agents are stalled now.
    pub fn stalled(&self, connected: impl Fn(&AgentId) -> bool, now_ms: u64) -> usize {
        self.with(|a| {
            a.iter()
                .filter(|(agent, h)| {
                    self.classify(h, connected(agent), now_ms) == SyncState::Stalled
                })
                .count()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fieldsync_shared::Seq;

    fn report(pending: u64) -> Health {
        Health {
            outbox_pending: pending,
            outbox_bytes: 0,
            oldest_pending_ms: None,
            acked: Seq(0),
            drain_per_s: 0.0,
            clock_offset_ms: 0,
        }
    }

    #[test]
    fn states_follow_reports_progress_and_time() {
        let fleet = FleetHealth::new(1_000);
        let a = AgentId::new("gw-1").unwrap();
        assert_eq!(fleet.state(&a, false, 0).0, SyncState::Offline);
        assert_eq!(fleet.state(&a, true, 0).0, SyncState::Syncing);
        fleet.linked(&a, 100);
        fleet.reported(&a, report(0), 200);
        assert_eq!(fleet.state(&a, true, 5_000).0, SyncState::Idle);
        // A backlog reported after the last progress, for longer than the
        // bound: stalled, announced once.
        fleet.reported(&a, report(7), 300);
        assert_eq!(fleet.state(&a, true, 1_000).0, SyncState::Syncing);
        assert_eq!(fleet.state(&a, true, 1_100).0, SyncState::Stalled);
        assert_eq!(fleet.newly_stalled(|_| true, 1_100), [(a.clone(), 7)]);
        assert!(fleet.newly_stalled(|_| true, 1_200).is_empty());
        assert_eq!(fleet.stalled(|_| true, 1_200), 1);
        // Offline is offline, whatever was reported.
        assert_eq!(fleet.state(&a, false, 1_200).0, SyncState::Offline);
        // Progress ends the stall; a backlog reported before the progress is
        // not a stall.
        fleet.progressed(&a, 1_300);
        assert_eq!(fleet.state(&a, true, 9_000).0, SyncState::Syncing);
        assert_eq!(fleet.stalled(|_| true, 9_000), 0);
        // A new stall is announced again.
        fleet.reported(&a, report(9), 9_100);
        assert_eq!(fleet.newly_stalled(|_| true, 9_100), [(a, 9)]);
    }
}
