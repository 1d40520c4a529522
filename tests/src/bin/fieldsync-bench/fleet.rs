//! The fleet-connections scenario: N simulated agents in this one process, each
//! on the real stack (TCP, rustls mutual TLS 1.3 with its own certificate,
//! MQTT to the hub's front door), start a session with one real
//! `fieldsync-hub` the way `fieldsync-agent` does (CONNECT, SUBSCRIBE to its
//! down topic, Hello on its up topic, Welcome back). Reports the time until
//! every agent was welcomed and the hub's RSS with all of them connected, for
//! N = 1,000 (quick) and 1,000, 10,000 and 50,000 (full). Agents connect from
//! many loopback source addresses (127.0.1.x), as a fleet comes from many
//! hosts: one address has too few ephemeral ports for 50,000 connections, and
//! the hub limits unauthenticated connections per source address.
//!
//! At 10,000 (full; 1,000 quick) a **reconnect storm** follows: every agent
//! drops its connection at once and reconnects at once, with the agent's own
//! backoff (exponential, full jitter) after each refused attempt; reported:
//! the time until all are welcomed again, the hub's peak RSS during the
//! storm, the attempts the hub turned away, and agents that never made it.
//!
//! Each N gets a fresh hub (empty store, same PKI): the 5,000 figure then
//! measures a cold hub meeting 5,000 agents, not 4,000 newcomers next to 1,000
//! settled ones, and each RSS figure belongs to a hub that has seen exactly N
//! agents. Agent certificates are issued in memory from the PKI's CA (same
//! subject, key usage and purpose as `fieldsync-hub certs issue`), timed apart
//! and never counted in the connect time.
//!
//! Unlike the real agent, a simulated one waits for its SUBACK before saying
//! Hello, so a Welcome can never race the subscription. The progress line
//! splits each agent's start into steps (medians) and gives both processes'
//! CPU time. In TLS 1.3 the client finishes its handshake before the server
//! has checked the client certificate, so that check falls in
//! "CONNECT→CONNACK".

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, ensure, Context};
use fieldsync_e2e::fleet::{Pki, TempHub, FLEET_POLICY};
use fieldsync_e2e::raw_mqtt::{connect_packet, RawMqtt};
use fieldsync_shared::wire::{down_topic, up_topic, Hello, Message, SnapshotAck};
use fieldsync_shared::{AgentId, Cursor, Incarnation, Mark};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rumqttc::{ConnectReturnCode, Packet, SubscribeReasonCode};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, RootCertStore};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::{get_json, rss_mib, Plan, Report};

/// TLS handshakes plus CONNECTs in flight at once: enough to keep both cores
/// busy, far below the listen backlog and the hub's pending budget.
const IN_FLIGHT: usize = 128;
/// Source addresses the agents connect from, 127.0.1.1 on.
const SOURCES: usize = 200;
/// Every agent must be welcomed again within this long after the storm began.
const STORM_DEADLINE: Duration = Duration::from_secs(60);

/// Every agent must be welcomed within this long after the first attempt.
const CONNECT_DEADLINE: Duration = Duration::from_secs(120);
/// How long the hub may take to count every agent once all are welcomed.
const COUNT_DEADLINE: Duration = Duration::from_secs(30);
/// MQTT keep-alive: far longer than a run, so idle agents are never dropped
/// and never need to ping.
const KEEP_ALIVE_S: u16 = 600;
/// File descriptors beyond the per-agent ones (redb, listeners, stdio, the
/// hub's pending budget, ...).
const FD_SLACK: u64 = 1024;
/// The hub holds one descriptor per agent (its socket), as does this process.
const HUB_FDS_PER_AGENT: u64 = 1;

/// One simulated agent's identity: its id and its mutual-TLS configuration.
pub(crate) struct Identity {
    pub(crate) id: AgentId,
    pub(crate) tls: Arc<ClientConfig>,
}

/// A welcomed agent: the open connection, what it resumes from, and when each
/// step finished.
pub(crate) struct Session {
    /// The agent's store incarnation and its downstream cursor.
    incarnation: Incarnation,
    down: Cursor,
    /// Held open until the hub has counted and measured everyone.
    pub(crate) mqtt: RawMqtt,
    /// A connect slot was free: TCP connect starts.
    slot: Instant,
    tls_done: Instant,
    connack: Instant,
    hello_sent: Instant,
    welcome: Instant,
}

pub(crate) async fn connections(plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let sizes: &[usize] = if plan.quick {
        &[1_000]
    } else {
        &[1_000, 10_000, 50_000]
    };
    let storm_at = if plan.quick { 1_000 } else { 10_000 };
    // Where the open-files hard limit cannot hold a size (a container without
    // CAP_SYS_RESOURCE cannot raise it), the run says so and measures the
    // largest fleet the limit holds instead, in thousands.
    let most = raise_nofile_limit()?;
    let sizes: Vec<usize> = sizes
        .iter()
        .map(|&n| {
            if n <= most {
                return n;
            }
            let fits = most / 1000 * 1000;
            eprintln!(
                "fleet: the open-files hard limit holds {most} agents, not {n}: measuring {fits} \
                 instead (raise it with `ulimit -Hn` as root, or LimitNOFILE, for the full size)"
            );
            report.insert("fleet_limited_by_nofile", fits as f64);
            fits
        })
        .collect();
    let largest = sizes.iter().copied().max().unwrap_or(0);

    let dir = tempfile::tempdir()?;
    let pki = Pki::create(&dir.path().join("pki"))?;
    let t = Instant::now();
    let fleet = issue_fleet(&pki, largest)?;
    report.insert("fleet_cert_issue_s", t.elapsed().as_secs_f64());

    for &n in &sizes {
        let hub_dir = dir.path().join(format!("hub-{n}"));
        std::fs::create_dir_all(&hub_dir)?;
        let hub = TempHub::start(&hub_dir, &pki, FLEET_POLICY)?;
        let (figures, sessions) = connect_fleet(&hub, &fleet[..n])
            .await
            .with_context(|| format!("{n} agents{}", hub_problems(&hub, 5)))?;
        let (all_s, mqtt_s, rss) = (
            figures.connect_all_s,
            figures.connect_mqtt_all_s,
            figures.rss,
        );
        match n {
            1_000 => {
                report.insert("connect_all_s_1k", all_s);
                report.insert("connect_mqtt_all_s_1k", mqtt_s);
                report.insert("hub_rss_mib_1k", rss);
            }
            10_000 => {
                report.insert("connect_all_s_10k", all_s);
                report.insert("connect_mqtt_all_s_10k", mqtt_s);
                report.insert("hub_rss_mib_10k", rss);
            }
            50_000 => {
                report.insert("connect_all_s_50k", all_s);
                report.insert("connect_mqtt_all_s_50k", mqtt_s);
                report.insert("hub_rss_mib_50k", rss);
            }
            _ => {}
        }
        // Sizes run in increasing order: the last one is the largest.
        report.insert("agents_connected", n as f64);
        report.insert("connect_all_s", all_s);
        report.insert("connect_mqtt_all_s", mqtt_s);
        eprintln!(
            "fleet: {n} agents welcomed in {all_s:.2} s, all CONNACKs in {mqtt_s:.2} s, \
             hub RSS {rss:.1} MiB; {}{}",
            figures.breakdown, figures.problems,
        );
        if n == storm_at {
            let storm = storm(&hub, &fleet[..n], sessions)
                .await
                .with_context(|| format!("reconnect storm of {n}{}", hub_problems(&hub, 5)))?;
            report.insert("storm_agents", n as f64);
            report.insert("storm_rewelcome_s", storm.all_s);
            report.insert("storm_hub_peak_rss_mib", storm.peak_rss);
            report.insert("storm_attempts_refused", storm.refused as f64);
            report.insert("storm_agents_failed", storm.failed as f64);
            eprintln!(
                "fleet: reconnect storm of {n}: all welcomed again in {:.2} s, hub peak RSS {:.1} MiB, \
                 {} attempts turned away, {} agents failed for good; hub counters: {}{}",
                storm.all_s,
                storm.peak_rss,
                storm.refused,
                storm.failed,
                storm.counters,
                hub_problems(&hub, 1),
            );
        } else {
            hang_up(sessions).await;
        }
        drop(hub);
    }
    Ok(())
}

/// Hang up as an agent that stops does (DISCONNECT), so the hub's log shows
/// orderly ends rather than thousands of dropped connections.
async fn hang_up(sessions: Vec<Session>) {
    for mut s in sessions {
        let _ = s.mqtt.send(Packet::Disconnect).await;
    }
}

/// What the reconnect storm measured.
struct Storm {
    all_s: f64,
    peak_rss: f64,
    refused: u64,
    failed: usize,
    counters: String,
}

/// Every agent drops its connection at once (no DISCONNECT: the network went
/// away), then all reconnect at once, each retrying under the agent's backoff
/// until welcomed or [`STORM_DEADLINE`].
async fn storm(hub: &TempHub, fleet: &[Identity], sessions: Vec<Session>) -> anyhow::Result<Storm> {
    let n = fleet.len();
    let http = reqwest::Client::new();
    let url = format!("{}/v1/metrics", hub.api_url());
    let before = get_json(&http, &url, true).await?;
    let resume: Vec<(Incarnation, Cursor)> =
        sessions.iter().map(|s| (s.incarnation, s.down)).collect();
    drop(sessions);
    // Every connection is gone before anyone reconnects.
    crate::time_until(
        "the hub to see every agent gone",
        COUNT_DEADLINE,
        || async { Ok(get_json(&http, &url, true).await?["agents_connected"] == 0) },
    )
    .await?;
    let pid = hub.pid().context("the hub is not running")?;
    // Resets the hub's peak RSS (VmHWM) to its current RSS (Linux >= 4.0).
    let reset = std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
    let refused = Arc::new(AtomicU64::new(0));
    let addr = hub.mqtt_addr();
    let start = Instant::now();
    let deadline = tokio::time::Instant::from_std(start + STORM_DEADLINE);
    let mut tasks = JoinSet::new();
    for (i, (agent, (incarnation, down))) in fleet.iter().zip(resume).enumerate() {
        let (id, tls, refused) = (agent.id.clone(), agent.tls.clone(), refused.clone());
        tasks.spawn(async move {
            let mut failures = 0u32;
            loop {
                let slots = Arc::new(Semaphore::new(1));
                let attempt = session(
                    addr,
                    source(i),
                    &id,
                    tls.clone(),
                    slots,
                    deadline,
                    Some((incarnation, down)),
                )
                .await;
                match attempt {
                    Ok(s) => return Some(s),
                    Err(_) if tokio::time::Instant::now() >= deadline => return None,
                    Err(_) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        let wait = fieldsync_agent::link::backoff(failures);
                        failures = failures.saturating_add(1);
                        tokio::time::sleep_until(
                            (tokio::time::Instant::now() + wait).min(deadline),
                        )
                        .await;
                    }
                }
            }
        });
    }
    let mut back = Vec::with_capacity(n);
    let mut failed = 0;
    while let Some(joined) = tasks.join_next().await {
        match joined.context("an agent task panicked")? {
            Some(s) => back.push(s),
            None => failed += 1,
        }
    }
    let all_s = back
        .iter()
        .map(|s| s.welcome)
        .max()
        .map_or(0.0, |t| (t - start).as_secs_f64());
    let peak_rss = peak_rss_mib(pid, reset)?;
    let after = get_json(&http, &url, true).await?;
    let delta = |k: &str| after[k].as_u64().unwrap_or(0) - before[k].as_u64().unwrap_or(0);
    let counters = [
        "pending_over_limit",
        "pending_over_ip_limit",
        "connections_over_limit",
        "tls_handshake_failures",
        "hellos_throttled",
        "resyncs_sent",
    ]
    .iter()
    .map(|k| format!("{k} +{}", delta(k)))
    .collect::<Vec<_>>()
    .join(", ");
    hang_up(back).await;
    Ok(Storm {
        all_s,
        peak_rss,
        refused: refused.load(Ordering::Relaxed),
        failed,
        counters,
    })
}

/// The source address of agent `i`.
pub(crate) fn source(i: usize) -> Option<IpAddr> {
    Some(IpAddr::from([127, 0, 1, 1 + (i % SOURCES) as u8]))
}

/// The hub's peak RSS since `clear_refs` was reset (or since it started).
fn peak_rss_mib(pid: u32, _reset: bool) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM")?;
    Ok(kb as f64 / 1024.0)
}

/// What one fleet size measured.
struct Figures {
    connect_all_s: f64,
    connect_mqtt_all_s: f64,
    /// Where the time went, in words (per-step medians, CPU of each side).
    breakdown: String,
    rss: f64,
    /// The hub's warnings and errors up to the measurement (see [`hub_problems`]).
    problems: String,
}

/// Connects every agent in `fleet` to `hub`, checks the hub counts them all
/// and measures its RSS while they are all still connected.
async fn connect_fleet(
    hub: &TempHub,
    fleet: &[Identity],
) -> anyhow::Result<(Figures, Vec<Session>)> {
    let n = fleet.len();
    let addr = hub.mqtt_addr();
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let cpu_before = (cpu_s("self"), hub.pid().map(|p| cpu_s(&p.to_string())));
    let start = Instant::now();
    let deadline = tokio::time::Instant::from_std(start + CONNECT_DEADLINE);
    let mut tasks = JoinSet::new();
    for (i, agent) in fleet.iter().enumerate() {
        let (id, tls, slots) = (agent.id.clone(), agent.tls.clone(), slots.clone());
        tasks.spawn(async move {
            let session = session(addr, source(i), &id, tls, slots, deadline, None)
                .await
                .with_context(|| format!("agent {id}"));
            (i, session)
        });
    }
    let mut sessions: Vec<Option<Session>> = (0..n).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let (i, session) = joined.context("an agent task panicked")?;
        // The first failure ends the run; the JoinSet aborts the others.
        sessions[i] = Some(session?);
    }
    let sessions: Vec<Session> = sessions.into_iter().flatten().collect();
    ensure!(
        sessions.len() == n,
        "only {} of {n} agents finished",
        sessions.len()
    );

    let last = |f: fn(&Session) -> Instant| sessions.iter().map(f).max().unwrap_or(start);
    let connect_all_s = (last(|s| s.welcome) - start).as_secs_f64();
    let connect_mqtt_all_s = (last(|s| s.connack) - start).as_secs_f64();
    let cpu = |before: Option<f64>, pid: &str| match (before, cpu_s(pid)) {
        (Some(b), Some(a)) => format!("{:.1}", a - b),
        _ => "?".to_owned(),
    };
    let breakdown = format!(
        "median per agent: TLS handshake {:.1} ms, CONNECT→CONNACK {:.1} ms, \
         SUBSCRIBE+Hello {:.1} ms, Hello→Welcome {:.1} ms (max {:.1} ms); \
         CPU s during the run: bench {}, hub {}",
        median_ms(&sessions, |s| s.tls_done - s.slot),
        median_ms(&sessions, |s| s.connack - s.tls_done),
        median_ms(&sessions, |s| s.hello_sent - s.connack),
        median_ms(&sessions, |s| s.welcome - s.hello_sent),
        sessions
            .iter()
            .map(|s| (s.welcome - s.hello_sent).as_secs_f64() * 1e3)
            .fold(0.0, f64::max),
        cpu(cpu_before.0, "self"),
        match (cpu_before.1, hub.pid()) {
            (Some(b), Some(pid)) => cpu(b, &pid.to_string()),
            _ => "?".to_owned(),
        },
    );

    // The hub's own count, while every connection is still open.
    let http = reqwest::Client::new();
    let url = format!("{}/v1/metrics", hub.api_url());
    let counted = crate::time_until(
        &format!("the hub to count {n} connected agents"),
        COUNT_DEADLINE,
        || async { Ok(get_json(&http, &url, true).await?["agents_connected"] == n) },
    )
    .await;
    if let Err(e) = counted {
        let seen = get_json(&http, &url, true)
            .await
            .map(|m| m["agents_connected"].to_string())
            .unwrap_or_else(|e| format!("unknown ({e})"));
        bail!("{e:#}; it counts {seen}");
    }
    let rss = rss_mib(hub.pid())?;
    let problems = hub_problems(hub, 1);
    Ok((
        Figures {
            connect_all_s,
            connect_mqtt_all_s,
            breakdown,
            rss,
            problems,
        },
        sessions,
    ))
}

/// One agent's session start, as `fieldsync-agent`'s link does it: TLS,
/// CONNECT (clean session), SUBSCRIBE to its down topic at QoS 1, Hello on its
/// up topic at QoS 1, then wait for the hub's Welcome. A slot is held from TCP
/// connect to CONNACK only. Every step ends by `deadline`; an error names the
/// step. A new agent (`resume` None) gets a fresh store and acknowledges the
/// hub's resync; one that resumes says hello with its store and cursor.
pub(crate) async fn session(
    addr: std::net::SocketAddr,
    from: Option<IpAddr>,
    id: &AgentId,
    tls: Arc<ClientConfig>,
    slots: Arc<Semaphore>,
    deadline: tokio::time::Instant,
    resume: Option<(Incarnation, Cursor)>,
) -> anyhow::Result<Session> {
    let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
    let late = || anyhow!("not welcomed within {CONNECT_DEADLINE:?} of the first attempt");
    let slot = tokio::time::timeout_at(deadline, slots.acquire_owned())
        .await
        .map_err(|_| late())
        .context("waiting for a connect slot")??;
    let slot_at = Instant::now();
    let mut mqtt = tokio::time::timeout_at(deadline, RawMqtt::tls_from(from, addr, tls))
        .await
        .map_err(|_| late())
        .and_then(|r| r)
        .context("TCP connect or TLS handshake")?;
    let tls_done = Instant::now();
    let mut connect = connect_packet(id.as_str());
    connect.keep_alive = KEEP_ALIVE_S;
    let ack = mqtt.connect(connect, left()).await.context("CONNECT")?;
    ensure!(
        ack.code == ConnectReturnCode::Success,
        "the hub refused CONNECT: {:?}",
        ack.code
    );
    let connack = Instant::now();
    drop(slot);

    let suback = mqtt
        .subscribe(&down_topic(id), left())
        .await
        .context("SUBSCRIBE to the down topic")?;
    ensure!(
        !suback.return_codes.contains(&SubscribeReasonCode::Failure),
        "the hub refused the subscription: {:?}",
        suback.return_codes
    );
    let (incarnation, down) = resume.unwrap_or((
        Incarnation(fieldsync_shared::hlc::system_now_ms().max(1)),
        Cursor::default(),
    ));
    let hello = Message::Hello(Hello {
        agent: id.clone(),
        incarnation,
        down,
        time_ms: fieldsync_shared::hlc::system_now_ms(),
        correction_ms: 0,
        rules: Default::default(),
    });
    mqtt.publish_msg(&up_topic(id), hello)
        .await
        .context("PUBLISH Hello")?;
    let hello_sent = Instant::now();
    let hub = match mqtt.next_msg(left()).await.context("waiting for Welcome")? {
        Message::Welcome(w) => w.incarnation,
        other => bail!("the hub answered Hello with {other:?}"),
    };
    let welcome = Instant::now();
    let mut down = down;
    if resume.is_none() {
        // A new store: the hub resyncs it (an empty snapshot); acknowledge it
        // so the hub does not resend it, and resume from its end later.
        match mqtt
            .next_msg(left())
            .await
            .context("waiting for the snapshot")?
        {
            Message::Snapshot(s) => {
                let ack = Message::SnapshotAck(SnapshotAck {
                    resync: s.resync,
                    part: s.part,
                });
                mqtt.publish_msg(&up_topic(id), ack)
                    .await
                    .context("PUBLISH SnapshotAck")?;
                down = Cursor {
                    source: Some(hub),
                    at: s.end.unwrap_or(Mark::default()),
                };
            }
            other => bail!("the hub sent {other:?} after Welcome"),
        }
    }
    Ok(Session {
        incarnation,
        down,
        mqtt,
        slot: slot_at,
        tls_done,
        connack,
        hello_sent,
        welcome,
    })
}

/// Issues `n` agent certificates in memory from the PKI's CA and builds each
/// agent's client configuration (TLS 1.3, ring, roots = the fleet CA), as
/// `fieldsync_shared::tls::client_config` does from files.
pub(crate) fn issue_fleet(pki: &Pki, n: usize) -> anyhow::Result<Vec<Identity>> {
    let ca_pem = std::fs::read_to_string(pki.ca()).context("the fleet CA certificate")?;
    let ca_key = std::fs::read_to_string(pki.dir().join("ca.key")).context("the fleet CA key")?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca_pem, KeyPair::from_pem(&ca_key)?).context("the fleet CA")?;
    let mut roots = RootCertStore::empty();
    for cert in fieldsync_shared::tls::load_certs(&pki.ca())? {
        roots.add(cert)?;
    }
    let roots = Arc::new(roots);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let now = SystemTime::now();
    (0..n)
        .map(|i| {
            let id = AgentId::new(format!("fleet-{i:05}"))?;
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            // The parameters of `fieldsync-hub certs issue` (hub/src/pki.rs).
            let mut params = CertificateParams::default();
            let mut name = DistinguishedName::new();
            name.push(DnType::CommonName, id.as_str());
            params.distinguished_name = name;
            params.not_before = (now - Duration::from_secs(3600)).into();
            params.not_after = (now + Duration::from_secs(365 * 86_400)).into();
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            params.use_authority_key_identifier_extension = true;
            let cert = params.signed_by(&key, &issuer)?;
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            let tls = ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_root_certificates(roots.clone())
                .with_client_auth_cert(vec![cert.der().clone()], key)?;
            Ok(Identity {
                id,
                tls: Arc::new(tls),
            })
        })
        .collect()
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit, before the hub
/// is spawned, so the hub inherits it. Returns how many agents that holds
/// (the hub and this process each need about one descriptor per agent).
fn raise_nofile_limit() -> anyhow::Result<usize> {
    use rlimit::Resource;
    let (soft, hard) = rlimit::getrlimit(Resource::NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    if soft < hard {
        rlimit::setrlimit(Resource::NOFILE, hard, hard)
            .with_context(|| format!("cannot raise RLIMIT_NOFILE from {soft} to {hard}"))?;
    }
    let most = hard.saturating_sub(FD_SLACK) / HUB_FDS_PER_AGENT;
    ensure!(
        most >= 1_000,
        "RLIMIT_NOFILE hard limit is {hard}: too few open files for even 1,000 agents; raise it \
         (e.g. `ulimit -Hn 120000` as root) and run again"
    );
    Ok(usize::try_from(most).unwrap_or(usize::MAX))
}

/// How many warning and error lines the hub logged, with the last `tail` of
/// them, for a failure message or a progress line; empty if there are none.
fn hub_problems(hub: &TempHub, tail: usize) -> String {
    let log = hub.stderr_log();
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    if bad.is_empty() {
        return String::new();
    }
    let tail = &bad[bad.len().saturating_sub(tail)..];
    format!(
        "; the hub logged {} warnings/errors, the last: {}",
        bad.len(),
        tail.join(" | ")
    )
}

/// The median of `step` over `sessions`, in milliseconds.
fn median_ms(sessions: &[Session], step: impl Fn(&Session) -> Duration) -> f64 {
    let mut v: Vec<f64> = sessions.iter().map(|s| step(s).as_secs_f64()).collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0) * 1e3
}

/// CPU time (user + system) a process has used so far, from /proc (Linux;
/// assumes the usual 100 clock ticks per second); `pid` may be `self`.
fn cpu_s(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}
