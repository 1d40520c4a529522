//! Crate tests of the sync engine driven through the transport seam: an
//! in-memory transport (an [`Outlet`] that hands every payload to the test,
//! records closes and can report a full queue), a real redb store in a temp
//! dir, and the test talking to the engine as an agent would, in encoded
//! wire envelopes.
//!
//! Every timeout runs on tokio's paused clock (`start_paused`, on the
//! current-thread runtime of `#[tokio::test]`): the runtime advances virtual
//! time only when every task is idle, and on that runtime tokio (1.54,
//! `runtime/blocking/schedule.rs`) inhibits the auto-advance while a
//! `spawn_blocking` task runs, so the engine's store calls take no virtual
//! time and a deadline here never passes while the engine is still working.
//! Nothing waits on the wall clock.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fieldsync_hub::engine::{Engine, EngineError, EngineEvent, HELLO_RATE};
use fieldsync_hub::metrics::{Metrics, MetricsSnapshot};
use fieldsync_hub::store::{AgentRow, HubStore, RedbHubStore};
use fieldsync_hub::transport::{
    self, ConnId, Inbound, InletSender, InletShare, Outlet, SendError, INLET_BYTES, INLET_EVENTS,
};
use fieldsync_shared::codec;
use fieldsync_shared::hlc::{system_now_ms, DEFAULT_MAX_DRIFT_MS};
use fieldsync_shared::session::{entry_check, SessionConfig};
use fieldsync_shared::wire::{
    Ack, Batch, Entry, Envelope, ErrorCode, Hello, Message, Snapshot, SnapshotAck, Welcome,
    MAX_MESSAGE_BYTES,
};
use fieldsync_shared::{
    AgentId, Change, CollectionName, Cursor, FieldName, Hlc, Incarnation, Mark, Origin, Policy,
    RecordKey, RecordState, Seq, Stamp, Version,
};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

/// How long (virtual time) a test waits for a message it expects.
const DEADLINE: Duration = Duration::from_secs(30);
/// How long (virtual time) a test watches an outlet that must stay silent:
/// well below the ack timeout, so no timer of a linked session fires in it.
const QUIET: Duration = Duration::from_secs(1);
const ACK_TIMEOUT_MS: u64 = 5_000;

/// The sessions' config: the default, with the ack timeout spelled out and
/// the hub's clock messages (`Time`) moved beyond every test's span, so that
/// anything an outlet receives is an answer to what the test did.
fn config() -> SessionConfig {
    SessionConfig {
        ack_timeout_ms: ACK_TIMEOUT_MS,
        clock_interval_ms: 3_600_000,
        ..SessionConfig::default()
    }
}

fn collection() -> CollectionName {
    CollectionName::new("readings").unwrap()
}

fn key(k: &str) -> RecordKey {
    RecordKey::new(k).unwrap()
}

fn temp() -> FieldName {
    FieldName::new("temp").unwrap()
}

fn policy() -> Policy {
    Policy::parse(
        r#"
        [collections.readings]
        direction = "both"
        sync = ["temp"]
        "#,
    )
    .unwrap()
}

fn hub_origin() -> Origin {
    Origin::hub("hub").unwrap()
}

// ---- The in-memory transport ------------------------------------------------

/// What the store held at the instant the engine handed a message to the
/// outlet (read inside `send`, so it cannot race the engine).
#[derive(Debug, Clone, PartialEq)]
struct Probed {
    up_applied: Seq,
    keys: Vec<String>,
}

type Probe = Box<dyn Fn() -> Probed + Send + Sync>;

/// What an outlet passes to the test, in order.
#[derive(Debug)]
enum Out {
    Sent {
        payload: Bytes,
        probed: Option<Probed>,
    },
    Closed,
}

/// One connection's outbound side: every payload the engine queues goes to
/// the test's channel. `close()` is recorded (and shows in the channel);
/// after it every send fails with `Closed`. With `full` set, sends fail with
/// `Full`, as a connection whose peer does not read.
struct MemOutlet {
    tx: mpsc::UnboundedSender<Out>,
    closed: AtomicBool,
    full: AtomicBool,
    closes: AtomicUsize,
    refused_full: AtomicUsize,
    probe: Option<Probe>,
}

impl std::fmt::Debug for MemOutlet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemOutlet")
            .field("closed", &self.closed)
            .field("full", &self.full)
            .finish_non_exhaustive()
    }
}

impl Outlet for MemOutlet {
    fn send(&self, payload: Bytes) -> Result<(), SendError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(SendError::Closed);
        }
        if self.full.load(Ordering::SeqCst) {
            self.refused_full.fetch_add(1, Ordering::SeqCst);
            return Err(SendError::Full);
        }
        let probed = self.probe.as_ref().map(|p| p());
        let _ = self.tx.send(Out::Sent { payload, probed });
        Ok(())
    }

    fn close(&self) {
        self.closes.fetch_add(1, Ordering::SeqCst);
        if !self.closed.swap(true, Ordering::SeqCst) {
            let _ = self.tx.send(Out::Closed);
        }
    }
}

/// The test's end of one connection.
struct Conn {
    agent: AgentId,
    id: ConnId,
    outlet: Arc<MemOutlet>,
    rx: mpsc::UnboundedReceiver<Out>,
}

impl Conn {
    /// The next thing the outlet saw, within the deadline (virtual time).
    async fn next_out(&mut self) -> Out {
        match timeout(DEADLINE, self.rx.recv()).await {
            Ok(Some(out)) => out,
            Ok(None) => unreachable!("the connection holds its outlet"),
            Err(_) => panic!(
                "{} conn {}: nothing sent within {DEADLINE:?} (virtual)",
                self.agent, self.id
            ),
        }
    }

    /// The next message sent, and what the store held when it was sent.
    async fn next_probed(&mut self) -> (Message, Option<Probed>) {
        match self.next_out().await {
            Out::Sent { payload, probed } => (decoded(&payload), probed),
            Out::Closed => panic!(
                "{} conn {}: closed, expected a message",
                self.agent, self.id
            ),
        }
    }

    async fn next(&mut self) -> Message {
        self.next_probed().await.0
    }

    /// Asserts the engine closes this connection next.
    async fn expect_closed(&mut self) {
        match self.next_out().await {
            Out::Closed => {}
            Out::Sent { payload, .. } => panic!(
                "{} conn {}: expected a close, got {:?}",
                self.agent,
                self.id,
                decoded(&payload)
            ),
        }
    }

    /// Asserts nothing is sent (or closed) for `d` of virtual time.
    async fn quiet(&mut self, d: Duration) {
        if let Ok(out) = timeout(d, self.rx.recv()).await {
            let shown = match out {
                Some(Out::Sent { payload, .. }) => format!("{:?}", decoded(&payload)),
                other => format!("{other:?}"),
            };
            panic!(
                "{} conn {}: expected silence, got {shown}",
                self.agent, self.id
            );
        }
    }

    fn closes(&self) -> usize {
        self.outlet.closes.load(Ordering::SeqCst)
    }
}

fn decoded(payload: &[u8]) -> Message {
    codec::decode(payload)
        .expect("the engine sends valid envelopes")
        .msg
}

fn welcome(m: Message) -> Welcome {
    match m {
        Message::Welcome(w) => w,
        other => panic!("expected a Welcome, got {other:?}"),
    }
}

fn ack(m: &Message) -> Ack {
    match m {
        Message::Ack(a) => *a,
        other => panic!("expected an Ack, got {other:?}"),
    }
}

fn batch(m: Message) -> Batch {
    match m {
        Message::Batch(b) => b,
        other => panic!("expected a Batch, got {other:?}"),
    }
}

fn error_code(m: &Message) -> ErrorCode {
    match m {
        Message::Error(e) => e.code,
        other => panic!("expected an Error, got {other:?}"),
    }
}

// ---- The hub under test -----------------------------------------------------

/// An engine on a fresh redb store, and the handles a transport and the
/// operator API would hold.
struct Hub {
    store: Arc<RedbHubStore>,
    metrics: Arc<Metrics>,
    hlc: Arc<Mutex<Hlc>>,
    incarnation: Incarnation,
    inlet: InletSender,
    events: mpsc::UnboundedSender<EngineEvent>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), EngineError>>,
    _dir: tempfile::TempDir,
}

impl Hub {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbHubStore::open(&dir.path().join("hub")).unwrap());
        let hlc = Arc::new(Mutex::new(Hlc::restore(
            store.hlc_last().unwrap(),
            DEFAULT_MAX_DRIFT_MS,
        )));
        let metrics = Arc::new(Metrics::default());
        let incarnation = store.incarnation().unwrap();
        let engine = Engine {
            store: store.clone(),
            health: Arc::new(fieldsync_hub::health::FleetHealth::new(120_000)),
            drop_upstream: false,
            policy: Arc::new(policy()),
            hlc: hlc.clone(),
            metrics: metrics.clone(),
            session: config(),
            incarnation,
            origin: hub_origin(),
        };
        let (inlet, engine_inlet) = transport::inlet(INLET_EVENTS, INLET_BYTES);
        let (events, events_rx) = mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(engine.run(engine_inlet, events_rx, shutdown.clone()));
        Self {
            store,
            metrics,
            hlc,
            incarnation,
            inlet,
            events,
            shutdown,
            task,
            _dir: dir,
        }
    }

    fn metrics(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }

    fn outlet(&self, probe: Option<Probe>) -> (Arc<MemOutlet>, mpsc::UnboundedReceiver<Out>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let outlet = Arc::new(MemOutlet {
            tx,
            closed: AtomicBool::new(false),
            full: AtomicBool::new(false),
            closes: AtomicUsize::new(0),
            refused_full: AtomicUsize::new(0),
            probe,
        });
        (outlet, rx)
    }

    /// Announces connection `id` of `agent`.
    async fn connect(&self, agent: &AgentId, id: ConnId) -> Conn {
        self.connect_with(agent, id, None).await
    }

    /// Announces a connection whose outlet reads `agent`'s stored upstream
    /// cursor and record keys at the instant of every send.
    async fn connect_probed(&self, agent: &AgentId, id: ConnId) -> Conn {
        let store = self.store.clone();
        let a = agent.clone();
        let probe: Probe = Box::new(move || Probed {
            up_applied: store
                .agent(&a)
                .unwrap()
                .map_or(Seq(0), |row| row.up_applied),
            keys: stored_keys(&*store, &a),
        });
        self.connect_with(agent, id, Some(probe)).await
    }

    async fn connect_with(&self, agent: &AgentId, id: ConnId, probe: Option<Probe>) -> Conn {
        let (outlet, rx) = self.outlet(probe);
        self.inlet
            .connected(agent.clone(), id, outlet.clone() as Arc<dyn Outlet>)
            .await
            .unwrap();
        Conn {
            agent: agent.clone(),
            id,
            outlet,
            rx,
        }
    }

    async fn send(&self, conn: &Conn, msg: Message) {
        let bytes = codec::encode(&Envelope::new(msg)).unwrap();
        self.send_raw(&conn.agent, conn.id, bytes).await;
    }

    async fn send_raw(&self, agent: &AgentId, conn: ConnId, bytes: Vec<u8>) {
        // One share per call: these tests never fill a connection's share.
        let share = InletShare::new(64, 4 << 20);
        self.inlet
            .message(agent.clone(), conn, bytes.into(), &share)
            .await
            .unwrap();
    }

    async fn disconnect(&self, conn: &Conn, replaced: bool) {
        self.inlet
            .send(Inbound::Disconnected {
                agent: conn.agent.clone(),
                conn: conn.id,
                replaced,
            })
            .await
            .unwrap();
    }

    /// What the operator API does for a write: stamp it with the hub clock,
    /// queue it durably, tell the engine.
    fn operator_write(&self, agent: &AgentId, k: &str, value: i64) -> (Seq, Change) {
        let mut clock = self.hlc.lock().unwrap();
        let version = Version {
            stamp: clock.tick(system_now_ms()),
            origin: hub_origin(),
        };
        let change = Change {
            collection: collection(),
            key: key(k),
            state: RecordState::default().write([(temp(), Some(json!(value)))], &version),
        };
        let last = self
            .store
            .enqueue_downstream(
                agent,
                std::slice::from_ref(&change),
                clock.last(),
                system_now_ms(),
            )
            .unwrap();
        self.events
            .send(EngineEvent::Enqueued {
                agent: agent.clone(),
                last,
            })
            .unwrap();
        (last, change)
    }

    fn row(&self, agent: &AgentId) -> Option<AgentRow> {
        self.store.agent(agent).unwrap()
    }

    /// The hub's copy of `agent`'s `readings/k`, as the value of `temp`.
    fn stored_temp(&self, agent: &AgentId, k: &str) -> Option<serde_json::Value> {
        let state = self.store.record(agent, &collection(), &key(k)).unwrap()?;
        let value = state
            .visible()
            .find(|(f, _)| **f == temp())
            .map(|(_, v)| v.clone());
        value
    }

    /// Stops the engine; it must end cleanly (no store error on the way).
    async fn stop(self) {
        self.shutdown.cancel();
        let ended = timeout(DEADLINE, self.task)
            .await
            .expect("the engine stops");
        ended.expect("the engine task did not panic").unwrap();
    }
}

fn stored_keys(store: &impl HubStore, agent: &AgentId) -> Vec<String> {
    let (records, _) = store
        .records_after(agent, None, 10_000, MAX_MESSAGE_BYTES)
        .unwrap();
    records.iter().map(|c| c.key.as_str().to_owned()).collect()
}

// ---- A hand-driven agent ------------------------------------------------------

/// What an agent keeps across connections: its store's incarnation, its
/// durable downstream cursor, and its outbox's last sequence number.
struct Agent {
    id: AgentId,
    incarnation: Incarnation,
    down: Cursor,
    up_last: Seq,
}

impl Agent {
    fn new(id: &str, incarnation: u64) -> Self {
        Self {
            id: AgentId::new(id).unwrap(),
            incarnation: Incarnation(incarnation),
            down: Cursor::default(),
            up_last: Seq(0),
        }
    }

    fn hello(&self) -> Message {
        Message::Hello(Hello {
            agent: self.id.clone(),
            incarnation: self.incarnation,
            down: self.down,
            time_ms: system_now_ms(),
            correction_ms: 0,
            rules: Default::default(),
        })
    }

    /// The next upstream batch: one write of `temp = value` to `readings/k`.
    fn batch(&mut self, k: &str, value: i64) -> (Message, Change) {
        self.up_last = self.up_last.next();
        let seq = self.up_last;
        let version = Version {
            stamp: Stamp::new(system_now_ms(), u32::try_from(seq.0).unwrap()),
            origin: Origin::agent(&self.id),
        };
        let change = Change {
            collection: collection(),
            key: key(k),
            state: RecordState::default().write([(temp(), Some(json!(value)))], &version),
        };
        let msg = Message::Batch(Batch {
            first: seq,
            last: seq,
            check: entry_check(&change),
            entries: vec![Entry {
                seq,
                change: change.clone(),
            }],
        });
        (msg, change)
    }
}

/// Says hello on `conn` and completes the link as an agent does: the welcome,
/// then (for a store new to the hub) the hub's snapshot of what it holds,
/// acknowledged, and the agent's own snapshot (its store is empty), which the
/// hub acknowledges after its commit. Returns the welcome.
async fn link(hub: &Hub, agent: &mut Agent, conn: &mut Conn) -> Welcome {
    hub.send(conn, agent.hello()).await;
    let w = welcome(conn.next().await);
    assert_eq!(w.incarnation, hub.incarnation);
    if agent.down.source != Some(hub.incarnation) {
        // The hub resyncs an agent that does not follow its stream yet.
        let snap = match conn.next().await {
            Message::Snapshot(s) => s,
            other => panic!("expected the hub's snapshot, got {other:?}"),
        };
        let end = snap
            .end
            .expect("the hub holds nothing for a new agent: one part");
        hub.send(
            conn,
            Message::SnapshotAck(SnapshotAck {
                resync: snap.resync,
                part: snap.part,
            }),
        )
        .await;
        agent.down = Cursor {
            source: Some(hub.incarnation),
            at: end,
        };
    }
    if w.up.source != Some(agent.incarnation) {
        // The hub does not follow this store's stream: resync it.
        hub.send(
            conn,
            Message::Snapshot(Snapshot {
                resync: 1,
                part: 1,
                changes: Vec::new(),
                end: Some(Mark {
                    seq: agent.up_last,
                    check: 0,
                }),
            }),
        )
        .await;
        assert_eq!(
            conn.next().await,
            Message::SnapshotAck(SnapshotAck { resync: 1, part: 1 })
        );
    }
    w
}

// ---- 1. Hello, upstream, ack after commit, order -----------------------------

#[tokio::test(start_paused = true)]
async fn upstream_batches_are_acked_after_their_commit_and_in_order() {
    let hub = Hub::start();
    let mut a = Agent::new("gw-a", 0xa);
    let mut b = Agent::new("gw-b", 0xb);
    let mut ca = hub.connect_probed(&a.id, 1).await;
    let mut cb = hub.connect_probed(&b.id, 2).await;

    // Hello → welcome on this connection's outlet: the hub's incarnation,
    // and a cursor that follows no stream (the store is new to the hub).
    let w = link(&hub, &mut a, &mut ca).await;
    assert_eq!(w.up, Cursor::default());
    assert_eq!(hub.metrics().incarnations_replaced, 1);
    cb.quiet(QUIET).await;
    link(&hub, &mut b, &mut cb).await;

    // One batch: its Ack leaves only once the change and the cursor are
    // stored (the probe read the store inside the outlet's `send`).
    let (m, change) = a.batch("r-1", 21);
    hub.send(&ca, m).await;
    let (m, probed) = ca.next_probed().await;
    assert_eq!(
        ack(&m),
        Ack {
            upto: Seq(1),
            check: entry_check(&change)
        }
    );
    let probed = probed.unwrap();
    assert_eq!(
        probed.up_applied,
        Seq(1),
        "acked before the cursor was stored"
    );
    assert!(
        probed.keys.contains(&"r-1".to_owned()),
        "acked before the record was stored"
    );
    assert_eq!(hub.stored_temp(&a.id, "r-1"), Some(json!(21)));

    // A burst from two agents, interleaved, with one batch delivered twice,
    // all in the inlet before the engine runs (it takes them as one group):
    // each agent's acks come in its order, each after the commit, and the
    // duplicate is acknowledged again but not applied again.
    let (a2, _) = a.batch("r-2", 22);
    let (b1, _) = b.batch("s-1", 31);
    let (a3, _) = a.batch("r-3", 23);
    let (b2, _) = b.batch("s-2", 32);
    let (a4, _) = a.batch("r-4", 24);
    let (a5, _) = a.batch("r-5", 25);
    for (conn, msg) in [
        (&ca, a2),
        (&cb, b1),
        (&ca, a3),
        (&cb, b2),
        (&ca, a4),
        (&ca, a5.clone()),
        (&ca, a5),
    ] {
        hub.send(conn, msg).await;
    }
    let mut acked_a = Vec::new();
    for _ in 0..5 {
        let (m, probed) = ca.next_probed().await;
        let upto = ack(&m).upto;
        let probed = probed.unwrap();
        assert!(
            probed.up_applied >= upto,
            "ack {upto} sent before its commit"
        );
        assert!(probed.keys.contains(&format!("r-{}", upto.0)));
        acked_a.push(upto.0);
    }
    assert_eq!(acked_a, [2, 3, 4, 5, 5]);
    let mut acked_b = Vec::new();
    for _ in 0..2 {
        let (m, probed) = cb.next_probed().await;
        let upto = ack(&m).upto;
        let probed = probed.unwrap();
        assert!(
            probed.up_applied >= upto,
            "ack {upto} sent before its commit"
        );
        assert!(probed.keys.contains(&format!("s-{}", upto.0)));
        acked_b.push(upto.0);
    }
    assert_eq!(acked_b, [1, 2]);
    ca.quiet(QUIET).await;
    cb.quiet(QUIET).await;

    for (k, v) in [("r-2", 22), ("r-3", 23), ("r-4", 24), ("r-5", 25)] {
        assert_eq!(hub.stored_temp(&a.id, k), Some(json!(v)), "{k}");
    }
    assert_eq!(hub.stored_temp(&b.id, "s-2"), Some(json!(32)));
    let row = hub.row(&a.id).unwrap();
    assert_eq!((row.up_applied, row.changes_applied), (Seq(5), 5));
    assert_eq!(row.up_cursor().source, Some(a.incarnation));
    let m = hub.metrics();
    assert_eq!(
        (m.upstream_batches_applied, m.upstream_changes_applied),
        (7, 7)
    );
    hub.stop().await;
}

/// The hub counts re-sent upstream batches it recognises as applied
/// (`upstream_duplicates`, served at `/v1/metrics`): the session reports each
/// duplicate it acknowledges again.
#[tokio::test(start_paused = true)]
async fn a_re_sent_upstream_batch_is_counted_as_a_duplicate() {
    let hub = Hub::start();
    let mut a = Agent::new("gw-a", 0xa);
    let mut ca = hub.connect(&a.id, 1).await;
    link(&hub, &mut a, &mut ca).await;
    let (m, _) = a.batch("r-1", 21);
    hub.send(&ca, m.clone()).await;
    assert_eq!(ack(&ca.next().await).upto, Seq(1));
    // The agent's ack timeout passed before the ack reached it: it resends.
    hub.send(&ca, m).await;
    assert_eq!(ack(&ca.next().await).upto, Seq(1));
    assert_eq!(hub.row(&a.id).unwrap().changes_applied, 1);
    assert_eq!(hub.metrics().upstream_duplicates, 1);
    hub.stop().await;
}

// ---- 2. Downstream: delivery, resend after the ack timeout, trim -------------

#[tokio::test(start_paused = true)]
async fn an_operator_write_is_resent_until_acked_then_trimmed() {
    let hub = Hub::start();
    let mut a = Agent::new("gw-a", 0xa);
    let mut ca = hub.connect(&a.id, 1).await;
    link(&hub, &mut a, &mut ca).await;
    ca.quiet(QUIET).await;

    let (seq, change) = hub.operator_write(&a.id, "r-1", 7);
    assert_eq!(seq, Seq(1));
    let first = batch(ca.next().await);
    let sent_at = Instant::now();
    assert_eq!((first.first, first.last), (Seq(1), Seq(1)));
    assert_eq!(
        first.entries,
        vec![Entry {
            seq: Seq(1),
            change: change.clone()
        }]
    );
    assert_eq!(first.check, entry_check(&change));
    assert_eq!(hub.metrics().downstream_resends, 0);

    // No ack: the same batch again once the ack timeout has passed (virtual
    // time), and again after another one; each resend is counted.
    let ack_timeout = Duration::from_millis(ACK_TIMEOUT_MS);
    let mut previous = sent_at;
    for n in 1..=2 {
        let again = batch(ca.next().await);
        let waited = previous.elapsed();
        assert_eq!(again, first, "resend {n}");
        assert!(waited >= ack_timeout, "resend {n} after {waited:?}");
        assert!(
            waited < ack_timeout + Duration::from_secs(1),
            "resend {n} after {waited:?}"
        );
        assert_eq!(hub.metrics().downstream_resends, n);
        previous = Instant::now();
    }
    assert_eq!(hub.row(&a.id).unwrap().queue_pending(), 1);

    // The ack: nothing more is sent, through several ack timeouts, and the
    // queue is trimmed.
    hub.send(
        &ca,
        Message::Ack(Ack {
            upto: Seq(1),
            check: first.check,
        }),
    )
    .await;
    ca.quiet(3 * ack_timeout).await;
    let m = hub.metrics();
    assert_eq!((m.downstream_resends, m.downstream_batches_sent), (2, 3));
    let row = hub.row(&a.id).unwrap();
    assert_eq!((row.down_acked, row.queue_pending()), (Seq(1), 0));
    assert!(hub
        .store
        .downstream(&a.id, Seq(1), 10, MAX_MESSAGE_BYTES)
        .unwrap()
        .is_empty());

    // The next write starts after the trimmed entry.
    let (seq, _) = hub.operator_write(&a.id, "r-2", 8);
    let next = batch(ca.next().await);
    assert_eq!((seq, next.first, next.last), (Seq(2), Seq(2), Seq(2)));
    hub.stop().await;
}

// ---- 3. Connection rules -------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn messages_on_unknown_or_replaced_connections_are_dropped_and_counted() {
    let hub = Hub::start();

    // An agent the engine was never told about.
    let stranger = Agent::new("gw-x", 0x7);
    let hello = codec::encode(&Envelope::new(stranger.hello())).unwrap();
    hub.send_raw(&stranger.id, 42, hello).await;

    let mut a = Agent::new("gw-a", 0xa);
    let mut c1 = hub.connect(&a.id, 1).await;
    link(&hub, &mut a, &mut c1).await;
    assert_eq!(hub.metrics().ghost_messages, 1);
    assert!(hub.row(&stranger.id).is_none());

    // A newer connection of the same agent: the older one's messages (a
    // hello, a batch the hub would apply) are dropped, nothing is sent on
    // either connection, nothing is stored.
    let mut c2 = hub.connect(&a.id, 2).await;
    hub.send(&c1, a.hello()).await;
    let (m, _) = a.batch("r-1", 1);
    hub.send(&c1, m.clone()).await;
    c1.quiet(QUIET).await;
    c2.quiet(QUIET).await;
    assert_eq!(hub.metrics().ghost_messages, 3);
    assert_eq!(hub.stored_temp(&a.id, "r-1"), None);
    assert_eq!(hub.row(&a.id).unwrap().up_applied, Seq(0));
    // The older connection's end changes nothing for the newer one.
    hub.disconnect(&c1, true).await;

    // The newer connection is served.
    let w = welcome({
        hub.send(&c2, a.hello()).await;
        c2.next().await
    });
    assert_eq!(w.up.source, Some(a.incarnation));
    hub.send(&c2, m).await;
    assert_eq!(ack(&c2.next().await).upto, Seq(1));
    c1.quiet(QUIET).await;
    assert_eq!(hub.metrics().ghost_messages, 3);
    assert_eq!(c2.closes(), 0);
    hub.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_stale_connected_is_closed_and_does_not_replace_the_current_one() {
    let hub = Hub::start();
    let mut a = Agent::new("gw-a", 0xa);
    let mut c5 = hub.connect(&a.id, 5).await;
    link(&hub, &mut a, &mut c5).await;

    // An announcement of an older connection arriving late.
    let mut c3 = hub.connect(&a.id, 3).await;
    c3.expect_closed().await;
    assert_eq!(c3.closes(), 1);

    // Connection 5 is still the agent's, with its session: a batch on it is
    // applied and acked; one on 3 is a ghost.
    let (m, _) = a.batch("r-1", 1);
    hub.send(&c5, m).await;
    assert_eq!(ack(&c5.next().await).upto, Seq(1));
    let (m, _) = a.batch("r-2", 2);
    hub.send(&c3, m).await;
    c5.quiet(QUIET).await;
    assert_eq!(hub.metrics().ghost_messages, 1);
    assert_eq!(hub.stored_temp(&a.id, "r-2"), None);
    assert_eq!(c5.closes(), 0);
    hub.stop().await;
}

/// The protocol-v2 identity rule (`Identity::admit`): a hello from another
/// store is refused while the store of a linked connection it took over from
/// is remembered (for the new connection's life), whichever of the older
/// connection's end and the newer one's announcement comes first. A
/// connection that ended on its own leaves nothing to take over from: a new
/// store is then a re-imaged device, admitted.
#[tokio::test(start_paused = true)]
async fn a_replacing_connection_keeps_the_displaced_store_rule() {
    let hub = Hub::start();
    for (name, replaced_first) in [("gw-d1", true), ("gw-d2", false)] {
        let mut x = Agent::new(name, 0x1);
        let mut c1 = hub.connect(&x.id, 1).await;
        link(&hub, &mut x, &mut c1).await;
        let conflicts = hub.metrics().identity_conflicts;
        let mut c2 = if replaced_first {
            hub.disconnect(&c1, true).await;
            hub.connect(&x.id, 2).await
        } else {
            let c2 = hub.connect(&x.id, 2).await;
            hub.disconnect(&c1, true).await;
            c2
        };
        // A clone: same certificate, another store.
        let clone = Agent::new(name, 0x2);
        hub.send(&c2, clone.hello()).await;
        let m = c2.next().await;
        assert_eq!(error_code(&m), ErrorCode::IdentityConflict, "{name}");
        c2.quiet(QUIET).await;
        assert_eq!(hub.metrics().identity_conflicts, conflicts + 1, "{name}");
        let row = hub.row(&x.id).unwrap();
        assert_eq!(row.identity.current, Some(x.incarnation), "{name}");
        assert_eq!(row.identity_conflicts, 1, "{name}");
        // The displaced store itself is welcome on the new connection.
        let w = welcome({
            hub.send(&c2, x.hello()).await;
            c2.next().await
        });
        assert_eq!(w.up.source, Some(x.incarnation), "{name}");
        c1.quiet(QUIET).await;
    }

    // The older connection ended by itself, not replaced.
    let mut x = Agent::new("gw-d3", 0x1);
    let mut c1 = hub.connect(&x.id, 1).await;
    link(&hub, &mut x, &mut c1).await;
    let replaced_before = hub.metrics().incarnations_replaced;
    hub.disconnect(&c1, false).await;
    let mut c2 = hub.connect(&x.id, 2).await;
    let mut reimaged = Agent::new("gw-d3", 0x2);
    let w = link(&hub, &mut reimaged, &mut c2).await;
    assert_ne!(
        w.up.source,
        Some(reimaged.incarnation),
        "a new store is resynced"
    );
    assert_eq!(hub.metrics().incarnations_replaced, replaced_before + 1);
    let row = hub.row(&x.id).unwrap();
    assert_eq!(row.identity.current, Some(reimaged.incarnation));
    assert_eq!(row.identity.retired, vec![x.incarnation]);
    assert_eq!(row.identity_conflicts, 0);
    hub.stop().await;
}

// ---- 4. Hello admission ----------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn hellos_beyond_the_burst_are_dropped_until_the_budget_refills() {
    let hub = Hub::start();
    // Agents that follow the hub's stream already: a hello is answered with a
    // welcome alone (no resync), so the answers can be counted exactly.
    let following = |id: &str| {
        let mut agent = Agent::new(id, 0x5);
        agent.down = Cursor {
            source: Some(hub.incarnation),
            at: Mark::default(),
        };
        agent
    };
    let a = following("gw-a");
    let b = following("gw-b");
    let mut ca = hub.connect(&a.id, 1).await;
    let mut cb = hub.connect(&b.id, 2).await;

    let burst = HELLO_RATE.burst as usize;
    let extra = 2;
    for _ in 0..burst + extra {
        hub.send(&ca, a.hello()).await;
    }
    // Another agent's budget is its own.
    hub.send(&cb, b.hello()).await;
    for n in 0..burst {
        let m = ca.next().await;
        assert!(matches!(m, Message::Welcome(_)), "answer {n}: {m:?}");
    }
    ca.quiet(QUIET).await;
    welcome(cb.next().await);
    assert_eq!(hub.metrics().hellos_throttled, extra as u64);

    // Once the budget has a token again (virtual time), a hello is answered.
    tokio::time::sleep(Duration::from_secs_f64(1.0 / HELLO_RATE.per_s)).await;
    hub.send(&ca, a.hello()).await;
    welcome(ca.next().await);
    ca.quiet(QUIET).await;
    assert_eq!(hub.metrics().hellos_throttled, extra as u64);
    hub.stop().await;
}

// ---- 5. A connection that does not read --------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_full_outlet_is_closed_and_the_others_are_still_served() {
    let hub = Hub::start();
    let mut a = Agent::new("gw-a", 0xa);
    let mut b = Agent::new("gw-b", 0xb);
    let mut ca = hub.connect(&a.id, 1).await;
    let mut cb = hub.connect(&b.id, 2).await;
    link(&hub, &mut a, &mut ca).await;
    link(&hub, &mut b, &mut cb).await;

    // A's peer stops reading: the engine's next send to it finds the queue
    // full, and the engine closes the connection.
    ca.outlet.full.store(true, Ordering::SeqCst);
    let (_, change) = hub.operator_write(&a.id, "r-1", 7);
    ca.expect_closed().await;
    assert_eq!(ca.closes(), 1);
    assert_eq!(ca.outlet.refused_full.load(Ordering::SeqCst), 1);

    // B is served meanwhile, both ways.
    let (m, _) = b.batch("s-1", 1);
    hub.send(&cb, m).await;
    assert_eq!(ack(&cb.next().await).upto, Seq(1));
    hub.operator_write(&b.id, "s-2", 2);
    assert_eq!(batch(cb.next().await).first, Seq(1));
    assert_eq!(hub.stored_temp(&b.id, "s-1"), Some(json!(1)));

    // The transport reports the end of A's connection; the write was never
    // acknowledged, so it is still queued and reaches A's next connection.
    hub.disconnect(&ca, false).await;
    assert_eq!(hub.row(&a.id).unwrap().queue_pending(), 1);
    let mut ca2 = hub.connect(&a.id, 3).await;
    let w = link(&hub, &mut a, &mut ca2).await;
    assert_eq!(w.up.source, Some(a.incarnation));
    let redelivered = batch(ca2.next().await);
    assert_eq!(redelivered.entries[0].change, change);
    assert_eq!(ca.closes(), 1);
    hub.stop().await;
}

// ---- 6. Refusals that change nothing ------------------------------------------------

#[tokio::test(start_paused = true)]
async fn refused_messages_get_an_error_and_change_nothing() {
    let hub = Hub::start();
    let mut a = Agent::new("gw-a", 0xa);
    let mut ca = hub.connect(&a.id, 1).await;

    // Before hello: a batch is refused with HelloFirst, garbage as Malformed.
    let (early, _) = Agent::new("gw-a", 0xa).batch("r-1", 1);
    hub.send(&ca, early).await;
    assert_eq!(error_code(&ca.next().await), ErrorCode::HelloFirst);
    assert_eq!(hub.metrics().envelopes_rejected, 0);
    hub.send_raw(&a.id, ca.id, b"\xffnot an envelope".to_vec())
        .await;
    assert_eq!(error_code(&ca.next().await), ErrorCode::Malformed);
    assert_eq!(hub.metrics().envelopes_rejected, 1);
    assert!(hub.row(&a.id).is_none(), "nothing stored for the agent");
    assert!(stored_keys(&*hub.store, &a.id).is_empty());

    // Linked, then three envelopes that do not decode: bytes, a version-1
    // envelope, and a batch that breaks its invariants (an empty range).
    link(&hub, &mut a, &mut ca).await;
    let before = hub.row(&a.id).unwrap();
    hub.send_raw(&a.id, ca.id, vec![0x18]).await;
    assert_eq!(error_code(&ca.next().await), ErrorCode::Malformed);
    let (good, change) = a.batch("r-1", 1);
    let v1 = codec::to_bytes(&Envelope { v: 1, msg: good }).unwrap();
    hub.send_raw(&a.id, ca.id, v1).await;
    assert_eq!(error_code(&ca.next().await), ErrorCode::UnsupportedVersion);
    let empty_range = Message::Batch(Batch {
        first: Seq(0),
        last: Seq(0),
        check: 0,
        entries: vec![Entry {
            seq: Seq(0),
            change,
        }],
    });
    hub.send(&ca, empty_range).await;
    assert_eq!(error_code(&ca.next().await), ErrorCode::Malformed);
    // A hello naming another agent is refused too, and makes no session.
    let other = Agent::new("gw-b", 0xb);
    hub.send(&ca, other.hello()).await;
    assert_eq!(error_code(&ca.next().await), ErrorCode::Malformed);
    ca.quiet(QUIET).await;

    assert_eq!(hub.metrics().envelopes_rejected, 5);
    assert_eq!(hub.row(&a.id).unwrap(), before);
    assert!(hub.row(&other.id).is_none());
    assert!(stored_keys(&*hub.store, &a.id).is_empty());
    let m = hub.metrics();
    assert_eq!(
        (m.upstream_batches_applied, m.upstream_changes_applied),
        (0, 0)
    );
    hub.stop().await;
}
