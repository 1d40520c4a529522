//! Admission control at the hub's front door, end to end: the real
//! `fieldsync-hub run` with small `[mqtt]` budgets, real TLS with certificates
//! from the real `fieldsync-hub certs` commands, real redb, and raw MQTT
//! clients that misbehave on purpose. Idle and stalled sockets from many
//! source addresses hold only pending slots and lock no agent out; the agent
//! cap refuses the agent after it; one identity has one connection (the
//! newest); a CONNECT over `max_connect_bytes` is refused on its header; and a
//! flooding agent is paced by its token buckets while another agent's latency
//! stays within 2× of its unloaded value.
//!
//! The tests measure time on a shared 2-core machine, so they run one at a
//! time ([`SERIAL`]): a test's figures are not disturbed by another test's hub.
//!
//! `a_replacing_connection_is_served_when_the_hub_is_full` fails against the
//! hub as it is (see its doc): on a full hub a reconnecting agent is refused
//! instead of replacing its own older connection.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use fieldsync_e2e::eventually;
use fieldsync_e2e::fleet::{Pki, TempHub, FLEET_POLICY};
use fieldsync_e2e::raw_mqtt::{connect_packet, mtls_config, tcp_from, Next, RawMqtt};
use fieldsync_shared::codec;
use fieldsync_shared::hlc::system_now_ms;
use fieldsync_shared::wire::{
    down_topic, up_topic, Ack, Batch, Entry, Envelope, Hello, Message, Welcome,
};
use fieldsync_shared::{
    AgentId, Change, CollectionName, Cursor, FieldName, FieldState, FieldValue, Incarnation,
    Origin, RecordKey, RecordState, Seq, Stamp, Version,
};
use reqwest::StatusCode;
use rumqttc::{ConnectReturnCode, Login, Packet, Publish, QoS};
use rustls::ClientConfig;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Deadline for anything that should happen promptly (a counter, a close).
const WAIT: Duration = Duration::from_secs(20);
/// Deadline for one MQTT answer from the hub.
const ANSWER: Duration = Duration::from_secs(10);
/// What a good agent is promised while others stall: TLS, CONNECT/CONNACK
/// and hello/welcome within this.
const GOOD_AGENT_BOUND: Duration = Duration::from_secs(2);

/// One test at a time (see the module doc).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------
// Setup

/// A temp dir with a PKI (`pki/`) and a hub (`hub/`) running [`FLEET_POLICY`]
/// with extra `[mqtt]` keys. The dir is on tmpfs (`/dev/shm`) where there is
/// one: these tests measure the front door's budgets and a flood's effect on
/// another agent, and on this shared disk other processes' writeback (a build
/// finishing, say) stretches single fsyncs to 30–90 ms in any window, loaded
/// or not — measured: with a 4 GB `dd` beside it, unloaded windows had p99s of
/// 74 and 36 ms. Durability on a real disk is `hub_durability`'s subject.
struct Fleet {
    _dir: TempDir,
    pki: Pki,
    hub: TempHub,
}

impl Fleet {
    fn start(extra_mqtt: &str) -> Self {
        tokio::task::block_in_place(|| {
            let shm = std::path::Path::new("/dev/shm");
            let mut builder = tempfile::Builder::new();
            builder.prefix("fieldsync-adm-");
            let dir = if shm.is_dir() {
                builder.tempdir_in(shm)
            } else {
                builder.tempdir()
            }
            .expect("temp dir");
            let pki_dir = dir.path().join("pki");
            let hub_dir = dir.path().join("hub");
            std::fs::create_dir_all(&pki_dir).expect("pki dir");
            std::fs::create_dir_all(&hub_dir).expect("hub dir");
            let pki = Pki::create(&pki_dir).expect("certs init");
            let hub =
                TempHub::start_with(&hub_dir, &pki, FLEET_POLICY, extra_mqtt).expect("hub starts");
            Self {
                _dir: dir,
                pki,
                hub,
            }
        })
    }

    fn addr(&self) -> SocketAddr {
        self.hub.mqtt_addr()
    }

    /// Issues a certificate for `agent` (once) and returns its mTLS client config.
    fn client(&self, agent: &str) -> Arc<ClientConfig> {
        tokio::task::block_in_place(|| {
            if !self.pki.cert(agent).is_file() {
                self.pki.issue(agent).expect("certs issue");
            }
        });
        mtls_config(&self.pki.ca(), &self.pki.cert(agent), &self.pki.key(agent))
            .expect("client config")
    }

    /// A raw client with `agent`'s certificate, connected as `agent`.
    async fn raw(&self, agent: &str) -> RawMqtt {
        RawMqtt::open(self.addr(), self.client(agent), agent, ANSWER)
            .await
            .unwrap_or_else(|e| panic!("{agent} connects: {e:#}"))
    }

    async fn metrics(&self) -> Value {
        let (status, body) = self.hub.get("/v1/metrics").await.expect("GET /v1/metrics");
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    async fn counter(&self, name: &str) -> u64 {
        self.metrics().await[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name}"))
    }

    /// Waits until counter `name` is at least `want`; returns its value.
    async fn counter_reaches(&self, name: &str, want: u64) -> u64 {
        eventually(&format!("{name} to reach {want}"), WAIT, || async {
            let n = self.counter(name).await;
            (n >= want).then_some(n)
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}; hub log:\n{}", self.hub.stderr_log()))
    }
}

/// A loopback source address: Linux routes all of 127/8 to `lo`, so clients
/// bound to 127.0.0.N look to the hub like N different hosts.
fn lo(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

fn name<T>(new: impl FnOnce(String) -> Result<T, fieldsync_shared::IdError>, s: &str) -> T {
    new(s.to_owned()).expect("valid name")
}

fn up(agent: &str) -> String {
    up_topic(&name(AgentId::new, agent))
}

fn down(agent: &str) -> String {
    down_topic(&name(AgentId::new, agent))
}

/// A change writing `ward = value` to `patients/key`, stamped now by `agent`.
fn change(agent: &str, key: &str, value: u64) -> Change {
    let version = Version {
        stamp: Stamp::new(system_now_ms(), 0),
        origin: Origin::agent(&name(AgentId::new, agent)),
    };
    let mut state = RecordState::default();
    state.fields.insert(
        name(FieldName::new, "ward"),
        FieldState::plain(version, FieldValue::Set(json!(value))),
    );
    Change {
        collection: name(CollectionName::new, "patients"),
        key: name(RecordKey::new, key),
        state,
    }
}

/// A batch of one change at `seq`.
fn batch(agent: &str, seq: u64) -> Message {
    Message::Batch(Batch {
        first: Seq(seq),
        last: Seq(seq),
        check: 0,
        entries: vec![Entry {
            seq: Seq(seq),
            change: change(agent, &format!("k{}", seq % 16), seq),
        }],
    })
}

fn hello_msg(agent: &str, incarnation: Incarnation) -> Message {
    Message::Hello(Hello {
        agent: name(AgentId::new, agent),
        incarnation,
        down: Cursor::default(),
        time_ms: system_now_ms(),
        correction_ms: 0,
        rules: Default::default(),
    })
}

/// The next envelope that is not the hub's clock.
async fn next_msg(client: &mut RawMqtt) -> Message {
    loop {
        match client
            .next_msg(ANSWER)
            .await
            .expect("a message from the hub")
        {
            Message::Time(_) => {}
            other => return other,
        }
    }
}

/// Subscribes to the agent's down topic and says hello as store
/// `incarnation` (following no hub stream); returns the welcome.
async fn say_hello(client: &mut RawMqtt, agent: &str, incarnation: Incarnation) -> Welcome {
    client
        .say_hello(&name(AgentId::new, agent), incarnation, ANSWER)
        .await
        .expect("hello -> welcome")
}

/// Takes the hub's resync and resyncs the hub (see
/// [`RawMqtt::finish_link`]); the upstream position batches continue after.
async fn finish_link(
    client: &mut RawMqtt,
    agent: &str,
    incarnation: Incarnation,
    welcome: &Welcome,
) -> Seq {
    client
        .finish_link(&name(AgentId::new, agent), incarnation, welcome, ANSWER)
        .await
        .expect("both resyncs")
}

/// Hello, welcome and both resyncs as a new store; returns the incarnation
/// and the upstream position.
async fn link(client: &mut RawMqtt, agent: &str) -> (Incarnation, Seq) {
    let incarnation = Incarnation(rand::random());
    let welcome = say_hello(client, agent, incarnation).await;
    let at = finish_link(client, agent, incarnation, &welcome).await;
    (incarnation, at)
}

/// Publishes a batch at `seq` and waits for the hub's protocol ack (sent
/// after the durable commit); returns the round trip.
async fn round_trip(client: &mut RawMqtt, agent: &str, seq: u64) -> Duration {
    let started = Instant::now();
    client
        .publish_msg(&up(agent), batch(agent, seq))
        .await
        .expect("publish batch");
    match next_msg(client).await {
        Message::Ack(Ack { upto, .. }) if upto == Seq(seq) => started.elapsed(),
        other => panic!("expected the ack of {seq}, got {other:?}"),
    }
}

/// The hub still serves `client`: a ping is answered.
async fn expect_pong(client: &mut RawMqtt, who: &str) {
    client.send(Packet::PingReq).await.expect("send PINGREQ");
    loop {
        match client.next(ANSWER).await {
            Next::Packet(Packet::PingResp) => return,
            // Acks of earlier publishes, the hub's clock.
            Next::Packet(Packet::PubAck(_) | Packet::Publish(_)) => {}
            other => panic!("{who}: expected PINGRESP, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Hostile sockets

/// How a hostile connection stalls.
#[derive(Clone, Copy, Debug)]
enum Stall {
    /// TCP, and never a byte.
    Idle,
    /// A record header announcing a 512-byte ClientHello, a few bytes of it,
    /// then nothing.
    MidHandshake,
    /// A finished TLS handshake with a valid certificate, and no CONNECT.
    NoConnect,
}

const STALLS: [Stall; 3] = [Stall::Idle, Stall::MidHandshake, Stall::NoConnect];

const PARTIAL_CLIENT_HELLO: [u8; 11] = [
    0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
];

enum Hostile {
    Tcp(TcpStream),
    Tls(Box<RawMqtt>),
}

impl Hostile {
    async fn open(
        stall: Stall,
        from: IpAddr,
        addr: SocketAddr,
        tls: &Arc<ClientConfig>,
    ) -> anyhow::Result<Self> {
        Ok(match stall {
            Stall::Idle => Self::Tcp(tcp_from(from, addr).await?),
            Stall::MidHandshake => {
                let mut tcp = tcp_from(from, addr).await?;
                tcp.write_all(&PARTIAL_CLIENT_HELLO).await?;
                Self::Tcp(tcp)
            }
            Stall::NoConnect => Self::Tls(Box::new(
                RawMqtt::tls_from(Some(from), addr, tls.clone()).await?,
            )),
        })
    }

    /// Returns once the hub has closed the connection.
    async fn closed(&mut self) {
        match self {
            Self::Tcp(tcp) => {
                let mut buf = [0u8; 512];
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                }
            }
            Self::Tls(tls) => loop {
                if let Next::Closed(_) = tls.next(Duration::from_secs(3600)).await {
                    return;
                }
            },
        }
    }
}

/// How long a hostile client waits after the hub closed its connection
/// before it opens the next one. This paces the load generator (a refused
/// socket is closed at once, and an attacker reconnecting in a tight loop
/// would measure the test's own CPU); it synchronises nothing.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

/// Hostile clients, each keeping one stalling connection open from its source
/// address: when the hub closes it (refused at accept, or timed out), the
/// client opens another, until [`Attack::stop`].
struct Attack {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// Connections opened (TCP connected, or TLS finished for `NoConnect`).
    opened: Arc<AtomicU64>,
    /// Connections tried.
    attempts: Arc<AtomicU64>,
}

impl Attack {
    fn new() -> Self {
        Self {
            stop: CancellationToken::new(),
            tasks: Vec::new(),
            opened: Arc::new(AtomicU64::new(0)),
            attempts: Arc::new(AtomicU64::new(0)),
        }
    }

    fn spawn(&mut self, stall: Stall, from: IpAddr, addr: SocketAddr, tls: Arc<ClientConfig>) {
        let stop = self.stop.clone();
        let opened = self.opened.clone();
        let attempts = self.attempts.clone();
        self.tasks.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                attempts.fetch_add(1, Ordering::Relaxed);
                let conn = tokio::select! {
                    c = Hostile::open(stall, from, addr, &tls) => c,
                    _ = stop.cancelled() => return,
                };
                if let Ok(mut conn) = conn {
                    opened.fetch_add(1, Ordering::Relaxed);
                    tokio::select! {
                        _ = conn.closed() => {}
                        _ = stop.cancelled() => return,
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(RECONNECT_PAUSE) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }));
    }

    fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Relaxed)
    }

    /// Stops every client; their connections are closed on return.
    async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            task.await.expect("attacker task");
        }
    }
}

// ---------------------------------------------------------------------------
// 1. The connection budget filled by idle and stalled sockets.

/// Budgets of [`stalled_sockets_hold_only_pending_slots_and_lock_no_agent_out`].
const MAX_CONNECTIONS: usize = 8;
const MAX_PENDING: usize = 16;
const MAX_PENDING_PER_IP: usize = 4;
/// Hostile source addresses 127.0.0.2 ..= 127.0.0.4, and their sockets each.
const HOSTILE_IPS: u8 = 3;
const HOSTILE_PER_IP: usize = 14;

/// More hostile sockets (42) than the hub's agent cap (8) and its pending
/// budget (16), from three source addresses, that never finish TLS or never
/// send CONNECT, and reconnect whenever the hub closes them: each address
/// holds its 4 pending slots (12 of 16) and the rest are refused at accept
/// (`pending_over_ip_limit`). A good agent from 127.0.0.1 still gets TLS,
/// CONNACK and a welcome within 2 s; then 8 agents authenticate beside the 12
/// pending sockets (which therefore hold no agent slot) and the 9th is
/// refused with CONNACK ServiceUnavailable (`connections_over_limit`). Two
/// more hostile addresses then fill the whole pending budget
/// (`pending_over_limit`): connected agents are still served. Once the attack
/// stops and an agent leaves, the refused agent gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_sockets_hold_only_pending_slots_and_lock_no_agent_out() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start(&format!(
        "max_connections = {MAX_CONNECTIONS}\n\
         max_pending_connections = {MAX_PENDING}\n\
         max_pending_per_ip = {MAX_PENDING_PER_IP}\n"
    ));
    let addr = fleet.addr();
    let hostile_tls = fleet.client("gw-hostile");
    let before = fleet.metrics().await;
    let base = |name: &str| before[name].as_u64().expect(name);

    // Each hostile address first takes its pending slots...
    let attack_started = Instant::now();
    let mut attack = Attack::new();
    let mut kinds = STALLS.iter().copied().cycle();
    for ip in 0..HOSTILE_IPS {
        for _ in 0..MAX_PENDING_PER_IP {
            attack.spawn(kinds.next().unwrap(), lo(2 + ip), addr, hostile_tls.clone());
        }
    }
    let holders = u64::from(HOSTILE_IPS) * MAX_PENDING_PER_IP as u64;
    eventually("the hub to hold the hostile sockets", WAIT, || async {
        let accepted = fleet.counter("connections_accepted").await;
        (attack.opened() >= holders && accepted >= base("connections_accepted") + holders)
            .then_some(())
    })
    .await
    .unwrap();
    assert_eq!(
        fleet.counter("pending_over_ip_limit").await,
        base("pending_over_ip_limit"),
        "the first {MAX_PENDING_PER_IP} sockets of an address fit its share"
    );
    // ...then opens ten more each: refused at accept, and retried.
    for ip in 0..HOSTILE_IPS {
        for _ in MAX_PENDING_PER_IP..HOSTILE_PER_IP {
            attack.spawn(kinds.next().unwrap(), lo(2 + ip), addr, hostile_tls.clone());
        }
    }
    let surplus = u64::from(HOSTILE_IPS) * (HOSTILE_PER_IP - MAX_PENDING_PER_IP) as u64;
    let refused = fleet
        .counter_reaches(
            "pending_over_ip_limit",
            base("pending_over_ip_limit") + surplus,
        )
        .await;
    let hostile = u64::from(HOSTILE_IPS) * HOSTILE_PER_IP as u64;
    assert!(hostile > MAX_CONNECTIONS as u64 && hostile > MAX_PENDING as u64);

    // A good agent from 127.0.0.1: TLS, CONNECT/CONNACK, hello/welcome.
    let good = fleet.client("gw-good");
    let started = Instant::now();
    let mut client = RawMqtt::open(addr, good, "gw-good", GOOD_AGENT_BOUND)
        .await
        .expect("a good agent connects while hostile sockets stall");
    let connacked = started.elapsed();
    let incarnation = Incarnation(rand::random());
    let welcome = say_hello(&mut client, "gw-good", incarnation).await;
    let welcomed = started.elapsed();
    eprintln!(
        "beside {hostile} hostile sockets from {HOSTILE_IPS} addresses \
         ({holders} holding pending slots, {} refused at accept so far): \
         TLS + CONNECT/CONNACK {connacked:?}, through hello/welcome {welcomed:?}",
        refused - base("pending_over_ip_limit")
    );
    assert!(
        welcomed < GOOD_AGENT_BOUND,
        "TLS + CONNACK took {connacked:?}, through the welcome {welcomed:?}"
    );
    let mut seq = finish_link(&mut client, "gw-good", incarnation, &welcome)
        .await
        .0;

    // The agent slots: 7 more agents fill the cap beside the pending sockets.
    let during = fleet.counter("pending_over_ip_limit").await;
    let mut agents = Vec::new();
    for i in 0..MAX_CONNECTIONS - 1 {
        let id = format!("gw-a{i}");
        agents.push((fleet.raw(&id).await, id));
    }
    assert_eq!(
        fleet.metrics().await["agents_connected"],
        json!(MAX_CONNECTIONS)
    );
    // One more authenticated agent is refused, politely.
    let mut extra = RawMqtt::tls(addr, fleet.client("gw-extra"))
        .await
        .expect("TLS for the extra agent");
    let ack = extra
        .connect(connect_packet("gw-extra"), ANSWER)
        .await
        .expect("a CONNACK for the extra agent");
    assert_eq!(ack.code, ConnectReturnCode::ServiceUnavailable);
    extra
        .until_closed(WAIT)
        .await
        .expect("the hub closes the refused agent's connection");
    assert_eq!(
        fleet
            .counter_reaches("connections_over_limit", base("connections_over_limit") + 1)
            .await,
        base("connections_over_limit") + 1
    );
    // All along, the hostile addresses were held to their share: their
    // reconnects are still refused at accept.
    fleet
        .counter_reaches("pending_over_ip_limit", during + 1)
        .await;

    // Two more hostile addresses fill the whole pending budget.
    for ip in [5, 6] {
        for _ in 0..MAX_PENDING_PER_IP + 2 {
            attack.spawn(kinds.next().unwrap(), lo(ip), addr, hostile_tls.clone());
        }
    }
    let over = fleet
        .counter_reaches("pending_over_limit", base("pending_over_limit") + 1)
        .await;
    eprintln!(
        "pending budget full: pending_over_limit +{}, pending_over_ip_limit +{}",
        over - base("pending_over_limit"),
        fleet.counter("pending_over_ip_limit").await - base("pending_over_ip_limit")
    );
    // The connected agents are unaffected.
    seq += 1;
    let took = round_trip(&mut client, "gw-good", seq).await;
    eprintln!("batch -> ack of the good agent with the pending budget full: {took:?}");
    for (raw, id) in &mut agents {
        expect_pong(raw, id).await;
    }
    assert_eq!(
        fleet.metrics().await["agents_connected"],
        json!(MAX_CONNECTIONS)
    );
    let attempts = attack.attempts();
    attack.stop().await;
    eprintln!(
        "the attack ran {:?}: {attempts} hostile connection attempts",
        attack_started.elapsed()
    );

    // An agent leaves; the refused one gets its slot, from an address that
    // was hostile a moment ago (its pending slots were released).
    let (mut leaving, _) = agents.remove(0);
    leaving.send(Packet::Disconnect).await.unwrap();
    leaving.until_closed(WAIT).await.unwrap();
    eventually("the leaving agent's slot to be free", WAIT, || async {
        (fleet.metrics().await["agents_connected"] == json!(MAX_CONNECTIONS - 1)).then_some(())
    })
    .await
    .unwrap();
    let extra_tls = fleet.client("gw-extra");
    let mut extra = eventually("gw-extra to connect from 127.0.0.2", WAIT, || async {
        let mut c = RawMqtt::tls_from(Some(lo(2)), addr, extra_tls.clone())
            .await
            .ok()?;
        let ack = c.connect(connect_packet("gw-extra"), ANSWER).await.ok()?;
        assert_eq!(ack.code, ConnectReturnCode::Success);
        Some(c)
    })
    .await
    .unwrap();
    expect_pong(&mut extra, "gw-extra").await;
    let end = fleet.metrics().await;
    eprintln!(
        "counters: pending_over_ip_limit +{}, pending_over_limit +{}, connections_over_limit +{}, \
         tls_handshake_failures +{}, connect_refused +{}, connections_accepted +{}",
        end["pending_over_ip_limit"].as_u64().unwrap() - base("pending_over_ip_limit"),
        end["pending_over_limit"].as_u64().unwrap() - base("pending_over_limit"),
        end["connections_over_limit"].as_u64().unwrap() - base("connections_over_limit"),
        end["tls_handshake_failures"].as_u64().unwrap() - base("tls_handshake_failures"),
        end["connect_refused"].as_u64().unwrap() - base("connect_refused"),
        end["connections_accepted"].as_u64().unwrap() - base("connections_accepted"),
    );
}

// ---------------------------------------------------------------------------
// 2. One identity, one connection.

/// A second authenticated connection with the same certificate replaces the
/// first: the hub closes the first (`connections_replaced`), and the second
/// links (hello as the same store, welcome) and syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_of_an_identity_replaces_the_first() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start("max_connections = 8\n");
    let id = "gw-twice";
    let replaced = fleet.counter("connections_replaced").await;

    let mut first = fleet.raw(id).await;
    let (incarnation, at) = link(&mut first, id).await;
    round_trip(&mut first, id, at.0 + 1).await;

    let mut second = fleet.raw(id).await;
    first
        .until_closed(WAIT)
        .await
        .expect("the hub closes the older connection");
    assert_eq!(
        fleet
            .counter_reaches("connections_replaced", replaced + 1)
            .await,
        replaced + 1
    );
    // The same store reconnecting: the hub follows its stream already.
    let welcome = say_hello(&mut second, id, incarnation).await;
    assert_eq!(welcome.up.source, Some(incarnation));
    assert_eq!(welcome.up.at.seq, Seq(at.0 + 1));
    let at = finish_link(&mut second, id, incarnation, &welcome).await;
    round_trip(&mut second, id, at.0 + 1).await;
    assert_eq!(fleet.metrics().await["agents_connected"], json!(1));
}

/// The same with every agent slot taken: the agent's new connection replaces
/// its old one (newest wins, as the front door documents) instead of being
/// refused for want of a slot its own old connection holds. This is the
/// agent whose old connection went half-open (a NAT dropped it, the device
/// rebooted): on a full hub it would be locked out until its keep-alive ran
/// out.
///
/// Fails against the hub as of this test: `Connection::admit`
/// (hub/src/front_door.rs) takes an agent slot with `try_acquire_owned`
/// before `Connection::serve` makes the new connection the agent's current
/// one (`Connections::insert`, which cancels the older), and the older
/// connection's permit is released only when its task ends; with all
/// `max_connections` permits held the new connection gets CONNACK
/// ServiceUnavailable (`connections_over_limit`) and the old one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacing_connection_is_served_when_the_hub_is_full() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start("max_connections = 2\n");
    let replaced = fleet.counter("connections_replaced").await;
    let mut first = fleet.raw("gw-r1").await;
    let _other = fleet.raw("gw-r2").await;
    let (incarnation, _) = link(&mut first, "gw-r1").await;
    assert_eq!(fleet.metrics().await["agents_connected"], json!(2));

    let mut second = RawMqtt::tls(fleet.addr(), fleet.client("gw-r1"))
        .await
        .expect("TLS");
    let ack = second
        .connect(connect_packet("gw-r1"), ANSWER)
        .await
        .expect("a CONNACK");
    assert_eq!(
        ack.code,
        ConnectReturnCode::Success,
        "a full hub refused the agent's new connection; its old one holds the slot"
    );
    first
        .until_closed(WAIT)
        .await
        .expect("the hub closes the older connection");
    fleet
        .counter_reaches("connections_replaced", replaced + 1)
        .await;
    let welcome = say_hello(&mut second, "gw-r1", incarnation).await;
    assert_eq!(welcome.up.source, Some(incarnation));
}

// ---------------------------------------------------------------------------
// 3. The pre-CONNECT packet limit.

const MAX_CONNECT_BYTES: usize = 1024;

/// A CONNECT for `client_id` whose remaining length (what the hub compares
/// with `max_connect_bytes`) is exactly `len`, padded with a login.
fn connect_of_len(client_id: &str, len: usize) -> rumqttc::Connect {
    let remaining = |c: &rumqttc::Connect| {
        let mut out = BytesMut::new();
        Packet::Connect(c.clone())
            .write(&mut out, 1 << 20)
            .expect("encode CONNECT");
        // One type byte, then the remaining length in 1..=4 bytes.
        let header = 1 + out[1..].iter().take_while(|b| **b & 0x80 != 0).count() + 1;
        out.len() - header
    };
    // A password of one byte; the encoding grows by one per byte from there.
    let mut connect = connect_packet(client_id);
    connect.login = Some(Login::new("u", "p"));
    let base = remaining(&connect);
    assert!(
        len >= base,
        "{len} is below the smallest such CONNECT ({base})"
    );
    connect.login = Some(Login::new("u", "p".repeat(len - base + 1)));
    assert_eq!(remaining(&connect), len);
    connect
}

/// A CONNECT larger than `max_connect_bytes` (a long password or username)
/// is refused without a CONNACK: the connection is closed and
/// `malformed_packets` rises; one that only announces such a length in its
/// header is closed at once, not after the CONNECT timeout. A CONNECT of
/// exactly the limit, and a normal one, pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_over_the_size_limit_is_refused() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start(&format!("max_connect_bytes = {MAX_CONNECT_BYTES}\n"));
    let id = "gw-big";
    let tls = fleet.client(id);
    let malformed = fleet.counter("malformed_packets").await;
    let sessions = fleet.counter("sessions_established").await;

    // Exactly at the limit: accepted.
    let mut at_limit = RawMqtt::tls(fleet.addr(), tls.clone()).await.unwrap();
    let ack = at_limit
        .connect(connect_of_len(id, MAX_CONNECT_BYTES), ANSWER)
        .await
        .expect("a CONNACK at the limit");
    assert_eq!(ack.code, ConnectReturnCode::Success);
    at_limit.send(Packet::Disconnect).await.unwrap();
    at_limit.until_closed(WAIT).await.unwrap();

    // One byte over, a long password, a long username: closed, no CONNACK.
    let mut long_name = connect_packet(id);
    long_name.login = Some(Login::new("u".repeat(16 << 10), "secret"));
    let oversize = [
        ("one byte over", connect_of_len(id, MAX_CONNECT_BYTES + 1)),
        ("a 60 KiB password", connect_of_len(id, 60 << 10)),
        ("a 16 KiB username", long_name),
    ];
    for (i, (what, connect)) in oversize.into_iter().enumerate() {
        let mut client = RawMqtt::tls(fleet.addr(), tls.clone()).await.unwrap();
        // The hub may close while this is still being written.
        let _ = client.send(Packet::Connect(connect)).await;
        let (seen, how) = client
            .until_closed(WAIT)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        assert!(seen.is_empty(), "{what}: the hub answered {seen:?}");
        eprintln!("CONNECT with {what}: closed ({how})");
        fleet
            .counter_reaches("malformed_packets", malformed + i as u64 + 1)
            .await;
    }

    // Only the fixed header of a 1 MiB CONNECT, then silence: refused on the
    // header, long before the CONNECT timeout (3 s).
    let header_only = RawMqtt::tls(fleet.addr(), tls.clone()).await.unwrap();
    let (mut stream, _) = header_only.into_parts();
    // CONNECT, remaining length 2^20 (0x80 0x80 0x40), and the start of the
    // variable header: protocol name "MQTT", level 4.
    let header = [
        0x10, 0x80, 0x80, 0x40, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04,
    ];
    let started = Instant::now();
    stream.write_all(&header).await.unwrap();
    stream.flush().await.unwrap();
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    let took = started.elapsed();
    assert!(closed.is_ok(), "the hub kept a 1 MiB CONNECT header open");
    eprintln!("a 1 MiB CONNECT header: closed after {took:?}");
    assert!(
        took < Duration::from_secs(1),
        "closed after {took:?}: the CONNECT timeout, not the size limit"
    );
    assert_eq!(
        fleet
            .counter_reaches("malformed_packets", malformed + 4)
            .await,
        malformed + 4
    );
    assert_eq!(
        fleet.counter("sessions_established").await,
        sessions + 1,
        "only the CONNECT at the limit made a session"
    );

    // A normal CONNECT passes and the agent is served.
    let mut client = fleet.raw(id).await;
    let (_, at) = link(&mut client, id).await;
    round_trip(&mut client, id, at.0 + 1).await;
}

// ---------------------------------------------------------------------------
// 4. Throttling.

/// Each connection's budgets in the throttling tests: messages per second
/// (and burst), bytes per second (and burst).
const RATE_MESSAGES: u64 = 50;
const RATE_BYTES: u64 = 64 << 10;
/// Round trips measured in the byte-budget test, unloaded and then under
/// the flood.
const SAMPLES: usize = 100;
/// The measured agent's pace: below its own message budget, so the
/// measurement is never throttled itself.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(25);
/// Messages each flooder has ready to write.
const FLOOD_MESSAGES: u64 = 5_000;
/// Changes in each batch of the large-batch flooder.
const LARGE_BATCH: u64 = 64;

/// A batch of `n` changes from `first`.
fn large_batch(agent: &str, first: u64, n: u64) -> Message {
    Message::Batch(Batch {
        first: Seq(first),
        last: Seq(first + n - 1),
        check: 0,
        entries: (first..first + n)
            .map(|seq| Entry {
                seq: Seq(seq),
                change: change(agent, &format!("b{}", seq % 4096), seq),
            })
            .collect(),
    })
}

/// A flooding agent: it writes QoS 1 publishes of `messages` to its own up
/// topic as fast as its socket takes them, and reads (and drops) whatever
/// the hub sends, until stopped.
struct Flood {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// The smallest payload among the messages.
    min_payload: usize,
}

impl Flood {
    fn start(client: RawMqtt, agent: &str, messages: impl Iterator<Item = Message>) -> Self {
        let topic = up(agent);
        let mut chunks = Vec::new();
        let mut out = BytesMut::new();
        let mut min_payload = usize::MAX;
        for (i, msg) in messages.enumerate() {
            let payload = codec::encode(&Envelope::new(msg)).expect("encode");
            min_payload = min_payload.min(payload.len());
            let mut publish = Publish::new(&topic, QoS::AtLeastOnce, payload);
            publish.pkid = (i % 65_535) as u16 + 1;
            Packet::Publish(publish)
                .write(&mut out, 1 << 20)
                .expect("encode publish");
            if out.len() >= 16 << 10 {
                chunks.push(out.split().freeze());
            }
        }
        if !out.is_empty() {
            chunks.push(out.freeze());
        }
        let (stream, _) = client.into_parts();
        let (mut rd, mut wr) = tokio::io::split(stream);
        let stop = CancellationToken::new();
        let writer = {
            let stop = stop.clone();
            tokio::spawn(async move {
                for chunk in chunks {
                    tokio::select! {
                        r = wr.write_all(&chunk) => if r.is_err() { return },
                        _ = stop.cancelled() => return,
                    }
                }
                let _ = wr.flush().await;
                stop.cancelled().await;
            })
        };
        let reader = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    tokio::select! {
                        r = rd.read(&mut buf) => match r {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        },
                        _ = stop.cancelled() => return,
                    }
                }
            })
        };
        Self {
            stop,
            tasks: vec![writer, reader],
            min_payload,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            task.await.expect("flood task");
        }
    }
}

/// `n` paced round trips (batch -> the hub's ack after its commit), sorted.
async fn measure(client: &mut RawMqtt, agent: &str, seq: &mut u64, n: usize) -> Vec<Duration> {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        tick.tick().await;
        *seq += 1;
        samples.push(round_trip(client, agent, *seq).await);
    }
    samples.sort();
    samples
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// CPU time a process has used (`pid`, or `self`): utime + stime from
/// `/proc/PID/stat`, in Linux's fixed 100 ticks per second. A diagnostic for
/// the latency figures: who had the two cores.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (in parentheses): state is the 3rd
    // field, utime the 14th and stime the 15th.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// "hub% / own%" of one core between two [`cpu_seconds`] readings.
fn cpu_share(
    now: (Option<f64>, Option<f64>),
    then: (Option<f64>, Option<f64>),
    over: Duration,
) -> String {
    let share = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.0}%", (a - b) / over.as_secs_f64() * 100.0),
        _ => "?".into(),
    };
    format!("{} / {}", share(now.0, then.0), share(now.1, then.1))
}

/// The hub's `changes_applied` for `agent`.
async fn changes_applied(fleet: &Fleet, agent: &str) -> u64 {
    fleet
        .hub
        .agent_row(agent)
        .await
        .expect("GET /v1/agents")
        .and_then(|row| row["changes_applied"].as_u64())
        .unwrap_or(0)
}

/// Connects `agent`, links it as a new store, and starts a flood of the
/// messages `make` returns for the upstream position after the link.
async fn flood<I: Iterator<Item = Message>>(
    fleet: &Fleet,
    agent: &str,
    make: impl FnOnce(u64) -> I,
) -> Flood {
    let mut client = fleet.raw(agent).await;
    let from = link(&mut client, agent).await.1 .0;
    Flood::start(client, agent, make(from))
}

/// A linked, warmed-up agent that measures round trips.
async fn calm_agent(fleet: &Fleet, agent: &str) -> (RawMqtt, u64) {
    let mut client = fleet.raw(agent).await;
    let mut seq = link(&mut client, agent).await.1 .0;
    // First commits, allocations.
    for _ in 0..10 {
        seq += 1;
        round_trip(&mut client, agent, seq).await;
    }
    (client, seq)
}

fn summary(sorted: &[Duration]) -> String {
    format!(
        "p50 {:?} p99 {:?} max {:?}",
        percentile(sorted, 0.5),
        percentile(sorted, 0.99),
        sorted[sorted.len() - 1]
    )
}

/// Rounds of the throttling test: each measures a window of [`WINDOW`]
/// round trips unloaded, then a window under the flood.
const ROUNDS: usize = 3;
const WINDOW: usize = 100;

/// The p99 of each window (its 99th of 100 values), and their median.
fn window_p99s(windows: &[Vec<Duration>]) -> (Vec<Duration>, Duration) {
    let mut p99s: Vec<Duration> = windows.iter().map(|w| percentile(w, 0.99)).collect();
    let shown = p99s.clone();
    p99s.sort();
    (shown, p99s[p99s.len() / 2])
}

/// Connects the two flooders of the throttling test and starts their floods:
/// `batcher` (as store `batcher_store`, continuing its stream) 5,000
/// one-change batches, `greeter` 5,000 hellos.
async fn start_floods(
    fleet: &Fleet,
    (batcher, batcher_store): (&'static str, Incarnation),
    (greeter, greeter_store): (&'static str, Incarnation),
) -> [Flood; 2] {
    let mut c = fleet.raw(batcher).await;
    let welcome = say_hello(&mut c, batcher, batcher_store).await;
    let from = finish_link(&mut c, batcher, batcher_store, &welcome)
        .await
        .0;
    let batches = Flood::start(
        c,
        batcher,
        (from + 1..=from + FLOOD_MESSAGES).map(move |s| batch(batcher, s)),
    );
    let mut c = fleet.raw(greeter).await;
    c.subscribe(&down(greeter), ANSWER).await.expect("SUBACK");
    let hellos = Flood::start(
        c,
        greeter,
        (0..FLOOD_MESSAGES).map(move |_| hello_msg(greeter, greeter_store)),
    );
    [batches, hellos]
}

/// With `rate_messages = 50`, `burst_messages = 50`: one agent floods
/// one-change batches (each a durable commit in the hub) and another floods
/// hellos, 5,000 messages each, as fast as their sockets take them. Both are
/// throttled (`messages_throttled`; the hello flood, once past the message
/// bucket, mostly dropped by the engine's hello budget: `hellos_throttled`),
/// the batch flooder gets no more than its rate through, and a well-behaved
/// agent's round trip (batch -> ack after the durable commit, paced at 40/s)
/// has a p99 under the flood within 2× of its unloaded p99.
///
/// How the p99s are measured: three rounds, each a 100-sample window
/// unloaded then a 100-sample window under the flood (the floods start and
/// stop with their window); each window's p99, and the median of the three
/// per phase, are compared. One window per phase — 200 samples unloaded,
/// then 200 loaded — was not a measurement of the hub on this machine: with
/// no flood at all, two such windows in a row had p99s 0.31-1.26× apart
/// (stalls of 50-200 ms from other processes on the 2 shared cores and the
/// shared disk hit one window and set its p99), and with the flood the
/// ratio was 0.94-1.62× in 13 runs and 2.24× in one (unloaded p99 10.8 ms,
/// loaded 24.2 ms, loaded p50 4.0 ms, below the unloaded 5.1 ms). Alternating
/// windows share the machine's drift, and the median lets one stalled window
/// spoil neither verdict. No absolute slack is added.
///
/// What the flood itself costs: the engine commits serially, so a round
/// trip that arrives while a flood commit is in flight waits for it; at 50
/// commits/s that reaches the p99, which becomes about the unloaded p99 plus
/// one commit (the unloaded p50, ~4 ms). The hub used ~30% of one core under
/// the flood and this process ~7%: the tail is the serial commit, not CPU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flooding_agents_are_throttled_and_slow_no_one() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start(&format!(
        "rate_messages = {RATE_MESSAGES}\nburst_messages = {RATE_MESSAGES}\n"
    ));
    let good = "gw-calm";
    let (mut client, mut seq) = calm_agent(&fleet, good).await;
    let hub_pid = fleet.hub.pid().expect("the hub runs").to_string();
    let cpu = || (cpu_seconds(&hub_pid), cpu_seconds("self"));
    let batcher = ("gw-flood-batches", Incarnation(rand::random()));
    let greeter = ("gw-flood-hellos", Incarnation(rand::random()));

    let mut unloaded = Vec::new();
    let mut loaded = Vec::new();
    for round in 1..=ROUNDS {
        // Unloaded: only the measured agent is connected.
        eventually("the floods' connections to be gone", WAIT, || async {
            (fleet.metrics().await["agents_connected"] == json!(1)).then_some(())
        })
        .await
        .unwrap();
        let throttled = fleet.counter("messages_throttled").await;
        let (before, t0) = (cpu(), Instant::now());
        unloaded.push(measure(&mut client, good, &mut seq, WINDOW).await);
        let unloaded_cpu = cpu_share(cpu(), before, t0.elapsed());
        assert_eq!(
            fleet.counter("messages_throttled").await,
            throttled,
            "the measured agent stays within its own budget"
        );

        // Loaded: both floods, throttled before the window starts.
        let floods = start_floods(&fleet, batcher, greeter).await;
        let start = fleet.metrics().await;
        let counter_at = |name: &str| start[name].as_u64().unwrap();
        fleet
            .counter_reaches("messages_throttled", counter_at("messages_throttled") + 20)
            .await;
        fleet
            .counter_reaches("hellos_throttled", counter_at("hellos_throttled") + 10)
            .await;
        let during = fleet.metrics().await;
        let batcher_at = changes_applied(&fleet, batcher.0).await;
        let (before, t0) = (cpu(), Instant::now());
        loaded.push(measure(&mut client, good, &mut seq, WINDOW).await);
        let elapsed = t0.elapsed();
        let loaded_cpu = cpu_share(cpu(), before, elapsed);
        let after = fleet.metrics().await;
        let batcher_got = changes_applied(&fleet, batcher.0).await - batcher_at;
        for flood in floods {
            flood.stop().await;
        }

        let delta = |name: &str| after[name].as_u64().unwrap() - during[name].as_u64().unwrap();
        eprintln!(
            "round {round}: good agent batch->ack unloaded {}; loaded {}",
            summary(&unloaded[round - 1]),
            summary(&loaded[round - 1])
        );
        eprintln!(
            "round {round}: CPU of one core, hub / this process: unloaded {unloaded_cpu}, \
             loaded {loaded_cpu}; in the {elapsed:?} under load messages_throttled +{}, \
             hellos_throttled +{}, the batch flood's changes applied {batcher_got}",
            delta("messages_throttled"),
            delta("hellos_throttled"),
        );
        assert!(delta("messages_throttled") > 0, "the floods were throttled");
        assert!(
            delta("hellos_throttled") > 0,
            "the hello flood was throttled"
        );
        // At most the rate, with a burst of slack for the bucket and
        // whatever was already past it when the window started.
        let allowed = (RATE_MESSAGES as f64 * elapsed.as_secs_f64()) as u64 + RATE_MESSAGES;
        assert!(
            batcher_got <= allowed,
            "the batch flood got {batcher_got} changes through in {elapsed:?} (budget {allowed})"
        );
    }

    let pooled = |windows: &[Vec<Duration>]| {
        let mut all: Vec<Duration> = windows.concat();
        all.sort();
        summary(&all)
    };
    let (u_windows, u99) = window_p99s(&unloaded);
    let (l_windows, l99) = window_p99s(&loaded);
    eprintln!(
        "good agent p99 per window: unloaded {u_windows:?} (median {u99:?}), \
         loaded {l_windows:?} (median {l99:?}); pooled {} samples each: unloaded {}, loaded {}",
        ROUNDS * WINDOW,
        pooled(&unloaded),
        pooled(&loaded)
    );
    assert!(
        l99 <= u99 * 2,
        "loaded p99 {l99:?} is more than twice the unloaded p99 {u99:?} \
         (per window: unloaded {u_windows:?}, loaded {l_windows:?})"
    );
}

/// With `rate_bytes = 64 KiB`, `burst_bytes = 64 KiB` (and the default
/// message budget): an agent floods 64-change batches (~9.6 KB each), 5,000
/// of them as fast as its socket takes them. The byte bucket throttles it
/// (`messages_throttled`), its changes applied stay within the byte budget,
/// and another agent is still served: every one of its round trips under the
/// flood completes within 2 s. Without the budget it is not: with the
/// default budgets (2,000 messages/s, burst 4,000; 64 MiB/s) the same flood
/// kept the other agent from any ack for more than 10 s. (The slowest round
/// trip seen with the budget was 0.55 s, at a load average of 5.5 on the
/// 2 shared cores; usually it is under 50 ms.)
///
/// No 2× p99 bound here: the budgets bound a connection's rate, not the work
/// in one message, and the engine commits serially, so another agent's round
/// trip can wait behind a whole 64-change commit. Measured while writing
/// this test (debug build), one window each: loaded p99 0.55-2.5× the
/// unloaded one; 2.5× (5.7 -> 14.5 ms, 400 samples) in the run where the
/// machine was quietest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_large_batches_is_paced_by_the_byte_budget() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start(&format!(
        "rate_bytes = {RATE_BYTES}\nburst_bytes = {RATE_BYTES}\n"
    ));
    let good = "gw-calm";
    let (mut client, mut seq) = calm_agent(&fleet, good).await;
    let unloaded = measure(&mut client, good, &mut seq, SAMPLES).await;

    let large = "gw-flood-large";
    let larges = flood(&fleet, large, |from| {
        (0..FLOOD_MESSAGES)
            .map(move |k| large_batch(large, from + 1 + k * LARGE_BATCH, LARGE_BATCH))
    })
    .await;
    let start = fleet.counter("messages_throttled").await;
    fleet.counter_reaches("messages_throttled", start + 5).await;
    eventually("the large-batch flood to be applied", WAIT, || async {
        (changes_applied(&fleet, large).await > 0).then_some(())
    })
    .await
    .unwrap();

    let throttled = fleet.counter("messages_throttled").await;
    let large_at = changes_applied(&fleet, large).await;
    let t0 = Instant::now();
    let loaded = measure(&mut client, good, &mut seq, SAMPLES).await;
    let elapsed = t0.elapsed();
    let large_got = changes_applied(&fleet, large).await - large_at;
    let throttled = fleet.counter("messages_throttled").await - throttled;
    let large_bytes = larges.min_payload;
    larges.stop().await;

    eprintln!(
        "good agent batch->ack, {} samples each: unloaded {}; beside the large-batch flood {}",
        SAMPLES,
        summary(&unloaded),
        summary(&loaded)
    );
    eprintln!(
        "in the {elapsed:?} under load: messages_throttled +{throttled}, \
         the flood's changes applied {large_got} (batches of >= {large_bytes} bytes)"
    );
    assert!(throttled > 0, "the flood was throttled");
    let secs = elapsed.as_secs_f64();
    let allowed =
        ((RATE_BYTES as f64 * secs) as u64 + RATE_BYTES) / large_bytes as u64 * LARGE_BATCH;
    assert!(
        large_got <= allowed,
        "the large-batch flood got {large_got} changes through in {elapsed:?} (budget {allowed})"
    );
    let slowest = loaded[loaded.len() - 1];
    assert!(
        slowest < Duration::from_secs(2),
        "a round trip beside the flood took {slowest:?}"
    );
}
