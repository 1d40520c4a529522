//! The hub's sync engine: one task that takes agent traffic from the
//! transport seam ([`crate::transport`]) and answers through each
//! connection's outlet. It is a thin driver of one shared sans-IO [`Session`]
//! per linked agent: it feeds each session its agent's messages and the
//! timers, and executes what the sessions ask — send, load queue entries or a
//! snapshot chunk, commit upstream changes (group commit: every message the
//! inlet already holds, from any agent, in one transaction, then the acks),
//! trim a downstream queue. Every protocol rule is in
//! `fieldsync_shared::session`; the hub's own policy and origin checks, and
//! its pacing of hellos, are here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fieldsync_shared::codec;
use fieldsync_shared::hlc::system_now_ms;
use fieldsync_shared::session::{
    error, Action, Mark, Now, Report, ResyncReason, Session, SessionConfig,
};
use fieldsync_shared::wire::{Envelope, ErrorCode, ErrorMsg, Message, MAX_MESSAGE_BYTES};
use fieldsync_shared::{
    schema, AgentId, Change, FieldName, Flow, Hlc, Incarnation, Origin, Policy, Seq,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::admission::{Bucket, Rate};
use crate::events::EventKind;
use crate::health::FleetHealth;
use crate::metrics::{self, Metrics};
use crate::store::{HelloNote, HubStore, StoreError, Upstream};
use crate::transport::{ConnId, Inbound, Inlet, Outlet, SendError};

/// Most records in one snapshot part (fewer if the bytes would not fit).
const SNAPSHOT_RECORDS: usize = 512;
/// Most upstream changes committed in one transaction (group commit).
const GROUP_CHANGES: usize = 8192;
/// Most messages taken from the inlet before a group is committed.
const GROUP_MESSAGES: usize = 256;
/// Most message bytes (as received, CBOR) in one group: bounds the engine's
/// memory to a small multiple of this once decoded.
const GROUP_BYTES: usize = 8 << 20;
/// How often the sessions' timers are checked.
const TICK: Duration = Duration::from_millis(250);
/// Longest peer-supplied text put in a log line.
const MAX_LOGGED_CHARS: usize = 200;
/// Hellos one agent may say: a burst, then one per period. A hello costs a
/// store read and write and may start a resync; an agent says one per
/// connection, so only a broken or hostile one comes near this.
pub const HELLO_RATE: Rate = Rate {
    per_s: 0.5,
    burst: 5.0,
};

/// Set (to anything) in the hub's environment, the engine drops every
/// upstream batch unanswered: a test fault that makes agents stall.
pub const DROP_UPSTREAM_ENV: &str = "FIELDSYNC_TEST_DROP_UPSTREAM";
/// How often (in ticks) stalls are looked for.
const STALL_CHECK_TICKS: u32 = 4;

/// What the operator API tells the engine.
#[derive(Debug)]
pub enum EngineEvent {
    /// An operator write was queued for `agent` up to `last`.
    Enqueued { agent: AgentId, last: Seq },
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("store task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// One agent's connection and, once it said hello on it, its session.
struct AgentLink {
    /// The transport's connection number and outlet, while connected.
    conn: Option<ConnId>,
    outlet: Option<Arc<dyn Outlet>>,
    session: Option<Session>,
    /// The store incarnation of a linked connection this one took over (the
    /// transport closes the older of two connections of one agent): if the
    /// new connection's store differs, two devices share one certificate.
    displaced: Option<Incarnation>,
}

/// The engine's shared parts.
pub struct Engine<S: HubStore> {
    pub store: Arc<S>,
    /// Agents' sync health, fed here and shown by the API.
    pub health: Arc<FleetHealth>,
    /// The [`DROP_UPSTREAM_ENV`] test fault.
    pub drop_upstream: bool,
    pub policy: Arc<Policy>,
    pub hlc: Arc<Mutex<Hlc>>,
    pub metrics: Arc<Metrics>,
    pub session: SessionConfig,
    /// The hub store's incarnation.
    pub incarnation: Incarnation,
    /// The origin of operator writes (accepted back in an agent's snapshot).
    pub origin: Origin,
}

/// The engine's view of the fleet.
#[derive(Default)]
struct State {
    links: HashMap<AgentId, AgentLink>,
    /// Agents whose sessions have new work outside their own messages.
    woken: Vec<AgentId>,
    /// Hello budgets of agents that used some (dropped once full again).
    hellos: HashMap<AgentId, Bucket>,
}

impl<S: HubStore> Engine<S> {
    /// Runs until `shutdown` or until the transport and the API are gone.
    pub async fn run(
        self,
        mut inlet: Inlet,
        mut events: mpsc::UnboundedReceiver<EngineEvent>,
        shutdown: CancellationToken,
    ) -> Result<(), EngineError> {
        let started = Instant::now();
        let mut state = State::default();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u32;
        loop {
            let mut group = Group::default();
            let mut all = false;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                e = events.recv() => {
                    let Some(e) = e else { return Ok(()) };
                    self.on_event(&mut state, e);
                }
                // Before the inlet, so that a steady stream of messages cannot
                // starve the timers.
                _ = tick.tick() => {
                    let now = now(started);
                    for s in state.links.values_mut().filter_map(|l| l.session.as_mut()) {
                        s.on_tick(now);
                    }
                    let at = Instant::now();
                    state.hellos.retain(|_, b| !b.is_full(at));
                    all = true;
                    ticks = ticks.wrapping_add(1);
                    if ticks.is_multiple_of(STALL_CHECK_TICKS) {
                        self.look_for_stalls(&state, &mut group);
                    }
                }
                first = inlet.recv() => {
                    // Group commit: take what the inlet already holds, apply
                    // every upstream batch in one transaction, then send what
                    // waited for it.
                    let Some(first) = first else { return Ok(()) };
                    let mut next = Some(first);
                    while let Some(inbound) = next.take() {
                        self.on_inbound(&mut state, &mut group, inbound, started).await?;
                        if group.changes >= GROUP_CHANGES
                            || group.messages >= GROUP_MESSAGES
                            || group.bytes >= GROUP_BYTES
                        {
                            break;
                        }
                        while let Ok(e) = events.try_recv() {
                            self.on_event(&mut state, e);
                        }
                        next = inlet.try_recv();
                    }
                }
            }
            // The other work of the sessions that may have some (timers,
            // windows that opened, new queue entries), then the commit and
            // what waited for it.
            let now = now(started);
            let woken = std::mem::take(&mut state.woken);
            if all {
                for (agent, l) in state.links.iter_mut() {
                    if let (Some(session), Some(outlet)) = (l.session.as_mut(), l.outlet.as_ref()) {
                        self.drive(agent, session, outlet, &mut group, now).await?;
                    }
                }
            } else {
                for agent in woken {
                    if let Some(l) = state.links.get_mut(&agent) {
                        if let (Some(session), Some(outlet)) =
                            (l.session.as_mut(), l.outlet.as_ref())
                        {
                            self.drive(&agent, session, outlet, &mut group, now).await?;
                        }
                    }
                }
            }
            self.flush(&mut group).await?;
        }
    }

    async fn on_inbound(
        &self,
        state: &mut State,
        group: &mut Group,
        inbound: Inbound,
        started: Instant,
    ) -> Result<(), EngineError> {
        match inbound {
            Inbound::Message {
                agent,
                conn,
                payload,
                credit,
            } => {
                group.messages += 1;
                group.bytes += payload.len();
                let result = self
                    .on_message(state, group, &agent, conn, &payload, started)
                    .await;
                drop(credit);
                result
            }
            Inbound::Connected {
                agent,
                conn,
                outlet,
            } => {
                let l = state.links.entry(agent).or_insert(AgentLink {
                    conn: None,
                    outlet: None,
                    session: None,
                    displaced: None,
                });
                if l.conn.is_some_and(|c| c > conn) {
                    // Already replaced by a newer connection.
                    outlet.close();
                    return Ok(());
                }
                // Kept for this connection's life: every hello on it is
                // checked against the store it took over from.
                l.displaced = l
                    .conn
                    .and(l.session.as_ref())
                    .and_then(Session::peer_incarnation)
                    .or(l.displaced);
                l.conn = Some(conn);
                l.outlet = Some(outlet);
                // Nothing flows until this connection's hello.
                l.session = None;
                Ok(())
            }
            Inbound::Disconnected {
                agent,
                conn,
                replaced,
            } => {
                let Some(l) = state.links.get_mut(&agent) else {
                    return Ok(());
                };
                if l.conn == Some(conn) {
                    if l.session.is_some() && !replaced {
                        group.events.push(EventKind::AgentDisconnected {
                            agent: agent.clone(),
                        });
                    }
                    if replaced {
                        // The newer connection's announcement is on its way:
                        // remember whose store this one carried.
                        l.displaced = l
                            .session
                            .as_ref()
                            .and_then(Session::peer_incarnation)
                            .or(l.displaced);
                        l.conn = None;
                        l.outlet = None;
                        l.session = None;
                    } else {
                        state.links.remove(&agent);
                    }
                }
                Ok(())
            }
        }
    }

    /// Stores what the group planned — its upstream changes in one durable
    /// transaction, its downstream acks, its hellos — in one trip to the
    /// store, then sends the messages that waited for it, in the order they
    /// were made.
    async fn flush(&self, group: &mut Group) -> Result<(), EngineError> {
        let upstream = std::mem::take(&mut group.upstream);
        let trims = std::mem::take(&mut group.trims);
        let hellos = std::mem::take(&mut group.hellos);
        let events = std::mem::take(&mut group.events);
        if !(upstream.is_empty() && trims.is_empty() && hellos.is_empty() && events.is_empty()) {
            // Per batch (snapshot parts are not batches): its size and the
            // wall time of its newest change, for the histograms.
            let batches: Vec<(usize, Option<u64>)> = upstream
                .iter()
                .filter(|u| !u.snapshot)
                .map(|u| (u.changes.len(), newest_wall_ms(&u.changes)))
                .collect();
            let commit = self
                .blocking(move |s| {
                    let mut commit = None;
                    if !upstream.is_empty() {
                        let started = std::time::Instant::now();
                        s.apply_upstream_group(&upstream, system_now_ms())?;
                        commit = Some((started.elapsed(), system_now_ms()));
                    }
                    if !trims.is_empty() {
                        s.ack_downstream_group(&trims)?;
                    }
                    for (agent, at, note) in &hellos {
                        s.hello(agent, *at, note)?;
                    }
                    s.append_events(&events, system_now_ms())?;
                    Ok(commit)
                })
                .await?;
            let changes: usize = batches.iter().map(|(n, _)| n).sum();
            Metrics::add(&self.metrics.upstream_batches_applied, batches.len() as u64);
            Metrics::add(&self.metrics.upstream_changes_applied, changes as u64);
            if let Some((took, durable_ms)) = commit {
                let h = &self.metrics.histograms;
                h.commit_seconds.observe(took.as_secs_f64());
                for (len, newest) in batches {
                    h.batch_changes.observe(len as f64);
                    if let Some(stamped) = newest {
                        h.sync_lag_seconds
                            .observe(metrics::seconds(durable_ms.saturating_sub(stamped)));
                    }
                }
            }
        }
        for (outlet, agent, msg) in group.out.drain(..) {
            send(&*outlet, &agent, msg);
        }
        // What bounds memory starts over; `messages` keeps bounding how long
        // the group runs before the other sessions get their turn.
        group.changes = 0;
        group.bytes = 0;
        group.messages = 0;
        Ok(())
    }

    /// Announces agents that became stalled: an event, a count, a warning.
    fn look_for_stalls(&self, state: &State, group: &mut Group) {
        let linked = |a: &AgentId| state.links.get(a).is_some_and(|l| l.session.is_some());
        for (agent, outbox_pending) in self.health.newly_stalled(linked, system_now_ms()) {
            Metrics::inc(&self.metrics.agent_stalls);
            tracing::warn!(%agent, outbox_pending, "agent stalled: connected with a backlog and nothing applied");
            group.events.push(EventKind::AgentStalled {
                agent,
                outbox_pending,
            });
        }
    }

    fn on_event(&self, state: &mut State, event: EngineEvent) {
        match event {
            EngineEvent::Enqueued { agent, last } => {
                if let Some(s) = state.links.get_mut(&agent).and_then(|l| l.session.as_mut()) {
                    s.appended(last);
                    state.woken.push(agent);
                }
            }
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&S) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, EngineError> {
        let store = self.store.clone();
        Ok(tokio::task::spawn_blocking(move || f(&store)).await??)
    }

    async fn on_message(
        &self,
        state: &mut State,
        group: &mut Group,
        agent: &AgentId,
        conn: ConnId,
        payload: &[u8],
        started: Instant,
    ) -> Result<(), EngineError> {
        let Some(l) = state.links.get_mut(agent).filter(|l| l.conn == Some(conn)) else {
            // The transport announces every connection before its messages,
            // so this one's connection is already gone or replaced.
            Metrics::inc(&self.metrics.ghost_messages);
            return Ok(());
        };
        let Some(outlet) = l.outlet.clone() else {
            return Ok(());
        };
        let envelope = match codec::decode(payload) {
            Ok(e) => e,
            Err(e) => {
                Metrics::inc(&self.metrics.envelopes_rejected);
                tracing::warn!(%agent, error = %e, "undecodable message");
                let code = match e {
                    codec::CodecError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
                    codec::CodecError::TooLarge { .. } => ErrorCode::TooLarge,
                    _ => ErrorCode::Malformed,
                };
                group.reply(&outlet, agent, error(code, &e.to_string(), None));
                return Ok(());
            }
        };
        let now = now(started);
        if let Message::Hello(hello) = envelope.msg {
            if hello.agent != *agent {
                Metrics::inc(&self.metrics.envelopes_rejected);
                group.reply(
                    &outlet,
                    agent,
                    error(ErrorCode::Malformed, "hello names another agent", None),
                );
                return Ok(());
            }
            let at = Instant::now();
            let budget = state
                .hellos
                .entry(agent.clone())
                .or_insert_with(|| Bucket::new(HELLO_RATE, at));
            if !budget.try_take(at) {
                // Unanswered: the agent asks again after its ack timeout.
                Metrics::inc(&self.metrics.hellos_throttled);
                tracing::debug!(%agent, "hello dropped: this agent says hello too often");
                return Ok(());
            }
            // The welcome names what the store holds, so this agent's
            // changes and hello planned in this group must be stored first.
            if group.upstream.iter().any(|u| u.agent == *agent)
                || group.hellos.iter().any(|(a, ..)| a == agent)
                || group.trims.iter().any(|(a, ..)| a == agent)
            {
                self.flush(group).await?;
            }
            let a = agent.clone();
            let row = self
                .blocking(move |s| Ok(s.agent(&a)?.unwrap_or_default()))
                .await?;
            let made = Session::hub(
                &hello,
                self.incarnation,
                row.down_acked_mark(),
                row.down_last,
                row.up_cursor(),
                &row.identity,
                l.displaced,
                now,
                self.session,
            );
            let mut note = HelloNote::default();
            match made {
                Ok((session, identity)) => {
                    if identity.is_some() {
                        Metrics::inc(&self.metrics.incarnations_replaced);
                        match row.identity.current {
                            None => {
                                tracing::info!(%agent, incarnation = %hello.incarnation, "first contact")
                            }
                            Some(previous) => tracing::warn!(
                                %agent,
                                incarnation = %hello.incarnation,
                                %previous,
                                "agent store is new to the hub (the device was re-imaged or its store replaced); resyncing"
                            ),
                        }
                    }
                    note.identity = identity;
                    if l.session.is_none() {
                        group.events.push(EventKind::AgentConnected {
                            agent: agent.clone(),
                        });
                    }
                    l.session = Some(session);
                }
                Err(
                    refusal @ Message::Error(ErrorMsg {
                        code: ErrorCode::RulesMismatch,
                        ..
                    }),
                ) => {
                    Metrics::inc(&self.metrics.rules_mismatches);
                    tracing::warn!(
                        %agent,
                        agent_rules = %hello.rules,
                        hub_rules = %self.session.rules,
                        "refused a hello: the agent's merge rules are not the hub's (run one policy on both)"
                    );
                    l.session = None;
                    group.reply(&outlet, agent, refusal);
                }
                Err(refusal) => {
                    Metrics::inc(&self.metrics.identity_conflicts);
                    tracing::warn!(
                        %agent,
                        incarnation = %hello.incarnation,
                        current = ?row.identity.current.map(|i| i.to_string()),
                        "refused a hello: another store holds this agent's identity (cloned certificate, or a replaced store came back)"
                    );
                    note.conflict = true;
                    l.session = None;
                    group.reply(&outlet, agent, refusal);
                }
            }
            if let Some(session) = l.session.as_mut() {
                note.clock_skew_ms = self.drive(agent, session, &outlet, group, now).await?;
            }
            group.hellos.push((agent.clone(), now.wall_ms, note));
            return Ok(());
        }
        let Some(session) = l.session.as_mut() else {
            group.reply(
                &outlet,
                agent,
                error(ErrorCode::HelloFirst, "no session: say hello", None),
            );
            return Ok(());
        };
        if self.drop_upstream && matches!(envelope.msg, Message::Batch(_)) {
            return Ok(());
        }
        session.on_message(envelope.msg, now);
        self.drive(agent, session, &outlet, group, now).await?;
        Ok(())
    }

    /// Executes what `session` asks until it asks nothing more. Messages go
    /// into the group and leave after its commit. Returns the clock skew the
    /// session measured, if it did.
    async fn drive(
        &self,
        agent: &AgentId,
        session: &mut Session,
        outlet: &Arc<dyn Outlet>,
        group: &mut Group,
        now: Now,
    ) -> Result<Option<i64>, EngineError> {
        let mut skew = None;
        while let Some(action) = session.poll() {
            match action {
                Action::Send(msg) => group.reply(outlet, agent, msg),
                Action::LoadBatch { first, last } => {
                    let a = agent.clone();
                    let limit = usize::try_from(last.0 - first.0 + 1).unwrap_or(usize::MAX);
                    let entries = self
                        .blocking(move |s| s.downstream(&a, first, limit, MAX_MESSAGE_BYTES))
                        .await?;
                    match session.batch_loaded(first, entries, now) {
                        Some(batch) => {
                            Metrics::inc(&self.metrics.downstream_batches_sent);
                            group.reply(outlet, agent, Message::Batch(batch));
                        }
                        None if session.is_paused() => {
                            tracing::error!(%agent, %first, "downstream queue is missing entries; not sending")
                        }
                        None => {}
                    }
                }
                Action::Verify { seq } => {
                    let a = agent.clone();
                    let found = self.blocking(move |s| s.downstream_entry(&a, seq)).await?;
                    session.verified(seq, found);
                }
                Action::LoadSnapshot { after } => {
                    let a = agent.clone();
                    let (records, next) = self
                        .blocking(move |s| {
                            s.records_after(
                                &a,
                                after.as_ref(),
                                SNAPSHOT_RECORDS,
                                MAX_MESSAGE_BYTES / 2,
                            )
                        })
                        .await?;
                    let changes: Vec<Change> = records
                        .iter()
                        .filter_map(|c| self.policy.filter(Flow::Down, c).permitted)
                        .collect();
                    session.snapshot_loaded(changes, next, now);
                }
                Action::Commit {
                    changes,
                    cursor,
                    snapshot,
                    then,
                } => {
                    if !changes.is_empty() || cursor.is_some() {
                        self.health.progressed(agent, now.wall_ms);
                    }
                    let mut refused = Vec::new();
                    let changes = self.admit_upstream(
                        agent,
                        changes,
                        snapshot,
                        &mut group.events,
                        &mut refused,
                    );
                    group.changes += changes.len();
                    group.upstream.push(Upstream {
                        agent: agent.clone(),
                        changes,
                        cursor,
                        snapshot,
                    });
                    group.reply(outlet, agent, then);
                    for detail in refused {
                        let msg = error(ErrorCode::SchemaRefused, &detail, None);
                        group.reply(outlet, agent, msg);
                    }
                }
                // Stored with the group, before anything it sends.
                Action::Trim { mark, resync } => group.trims.push((agent.clone(), mark, resync)),
                Action::ClockSkew { skew_ms } => skew = Some(skew_ms),
                Action::ClockOffset { .. } | Action::LoadHealth => {}
                Action::Health(report) => self.health.reported(agent, report, now.wall_ms),
                Action::Report(r) => self.report(agent, r),
            }
        }
        Ok(skew)
    }

    fn report(&self, agent: &AgentId, report: Report) {
        match report {
            Report::ResyncStarted { reason } => {
                Metrics::inc(&self.metrics.resyncs_sent);
                if reason == ResyncReason::NewReceiver {
                    tracing::info!(%agent, "a store new to the hub: sending it a snapshot");
                } else {
                    tracing::warn!(%agent, ?reason, "the agent cannot be brought up to date from its queue; sending a snapshot");
                }
            }
            Report::ResyncCompleted => {
                Metrics::inc(&self.metrics.resyncs_received);
                tracing::info!(%agent, "resync from the agent complete");
            }
            Report::ClockRefused { seq, ahead_ms } => {
                Metrics::inc(&self.metrics.clock_drift_rejected);
                tracing::warn!(%agent, seq = seq.map(|s| s.0), ahead_ms, "refused upstream changes stamped ahead of the hub clock; the agent keeps them queued");
            }
            Report::ClockRefusedByPeer { seq } => {
                Metrics::inc(&self.metrics.clock_refused_by_agents);
                tracing::warn!(%agent, seq = seq.map(|s| s.0), "the agent refused downstream changes stamped ahead of its clock; they stay queued");
            }
            Report::Resend => Metrics::inc(&self.metrics.downstream_resends),
            Report::PeerGap => tracing::debug!(%agent, "the agent reported a downstream gap"),
            Report::BadAck { upto } => {
                tracing::warn!(%agent, %upto, "the agent acknowledged downstream entries the hub never queued")
            }
            Report::PeerError { code } => {
                tracing::debug!(%agent, ?code, "the agent reported an error")
            }
            Report::IdentityRefused | Report::RulesRefused => {}
            Report::SchemaRefusedByPeer { detail } => {
                Metrics::inc(&self.metrics.schema_refused_by_agents);
                tracing::warn!(%agent, %detail, "the agent refused downstream values that break its schema");
            }
            Report::Duplicate => Metrics::inc(&self.metrics.upstream_duplicates),
        }
    }

    /// The hub's own checks on what an agent sends (defence in depth): a
    /// change claiming another agent's origin is refused whole (a snapshot
    /// may also carry the hub's own operator writes back); fields the hub
    /// policy does not permit upstream are dropped, counted and logged by
    /// name, never by value; so are field values that break the hub's
    /// schema, and the agent is told of each such change (`refused`, sent
    /// after the ack). Stamps advance the hub clock (the session has
    /// already refused any beyond the drift bound).
    fn admit_upstream(
        &self,
        agent: &AgentId,
        changes: Vec<Change>,
        snapshot: bool,
        events: &mut Vec<EventKind>,
        refused: &mut Vec<String>,
    ) -> Vec<Change> {
        let now = system_now_ms();
        let own = Origin::agent(agent);
        let mut out = Vec::with_capacity(changes.len());
        for change in changes {
            let state = &change.state;
            let forged = state
                .fields
                .values()
                .map(|f| &f.version)
                .chain(state.deleted.as_ref())
                .any(|v| v.origin != own && !(snapshot && v.origin == self.origin));
            if forged {
                Metrics::inc(&self.metrics.forged_origin_changes);
                tracing::warn!(%agent, collection = %change.collection, "dropped a change stamped with another origin");
                continue;
            }
            let filtered = self.policy.filter(Flow::Up, &change);
            if !filtered.denied.is_empty() || filtered.collection_denied {
                Metrics::add(
                    &self.metrics.policy_denied_fields,
                    filtered.denied.len() as u64,
                );
                let fields: Vec<&str> = filtered.denied.iter().map(|f| f.as_str()).collect();
                tracing::warn!(
                    %agent,
                    collection = %change.collection,
                    ?fields,
                    whole_collection = filtered.collection_denied,
                    "dropped fields the hub policy does not permit upstream"
                );
                // Once per agent, collection and field set in a group: a
                // flood of refused fields does not flood the event log.
                let event = EventKind::PolicyDenied {
                    agent: agent.clone(),
                    collection: change.collection.clone(),
                    fields: filtered.denied.clone(),
                    whole_collection: filtered.collection_denied,
                };
                if !events.contains(&event) {
                    events.push(event);
                }
            }
            let Some(change) = filtered.permitted else {
                continue;
            };
            let (collection, key) = (change.collection.clone(), change.key.clone());
            let (left, violations) = self.policy.strip_invalid(change);
            if !violations.is_empty() {
                Metrics::add(&self.metrics.schema_refused_fields, violations.len() as u64);
                let fields: Vec<FieldName> = violations.iter().map(|v| v.field.clone()).collect();
                tracing::warn!(
                    %agent,
                    %collection,
                    fields = ?fields.iter().map(FieldName::as_str).collect::<Vec<_>>(),
                    "dropped field values that break the hub's schema"
                );
                refused.push(schema::refusal_detail(&collection, &key, &violations));
                let event = EventKind::SchemaRefused {
                    agent: agent.clone(),
                    collection,
                    key,
                    fields,
                };
                if !events.contains(&event) {
                    events.push(event);
                }
            }
            if let Some(change) = left {
                if let Some(v) = change.state.max_version() {
                    if let Ok(mut h) = self.hlc.lock() {
                        let _ = h.observe(v.stamp, now);
                    }
                }
                out.push(change);
            }
        }
        out
    }
}

/// The HLC wall time of the newest change in `changes`.
fn newest_wall_ms(changes: &[Change]) -> Option<u64> {
    changes
        .iter()
        .filter_map(|c| c.state.max_version())
        .map(|v| v.stamp.wall_ms)
        .max()
}

fn now(started: Instant) -> Now {
    Now {
        mono_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        wall_ms: system_now_ms(),
    }
}

/// Upstream batches and hellos planned but not yet stored, and the messages
/// (acks, welcomes, errors) that leave only after the commit, in order, each
/// to the connection it answers.
#[derive(Default)]
struct Group {
    upstream: Vec<Upstream>,
    hellos: Vec<(AgentId, u64, HelloNote)>,
    /// Downstream acks to store: (agent, mark, the end of a resync).
    trims: Vec<(AgentId, Mark, bool)>,
    /// Link and policy events to log.
    events: Vec<EventKind>,
    out: Vec<(Arc<dyn Outlet>, AgentId, Message)>,
    changes: usize,
    messages: usize,
    bytes: usize,
}

impl Group {
    fn reply(&mut self, outlet: &Arc<dyn Outlet>, agent: &AgentId, msg: Message) {
        self.out.push((outlet.clone(), agent.clone(), msg));
    }
}

/// Hands one message to its connection. A connection whose queue is full
/// does not read: it is closed (the front door counts it), and the protocol
/// resends on its next connection.
fn send(outlet: &dyn Outlet, agent: &AgentId, msg: Message) {
    if let Message::Error(e) = &msg {
        let text: String = e.message.chars().take(MAX_LOGGED_CHARS).collect();
        tracing::debug!(%agent, code = ?e.code, message = %text, "sending an error to the agent");
    }
    let bytes = match codec::encode(&Envelope::new(msg)) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(%agent, error = %e, "cannot encode a message for the agent");
            return;
        }
    };
    match outlet.send(bytes.into()) {
        Ok(()) | Err(SendError::Closed) => {}
        Err(SendError::Full) => {
            tracing::warn!(%agent, "the agent does not read what the hub sends; closing its connection");
            outlet.close();
        }
    }
}
