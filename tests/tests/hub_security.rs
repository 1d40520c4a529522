//! The hub's security properties end to end, with the real `fieldsync-hub run`,
//! real TLS, certificates from the real `fieldsync-hub certs` commands, real
//! agents and raw MQTT clients: local-only fields never leave an agent, refused
//! connections are refused (and counted), slow clients block nobody, a
//! misbehaving agent's extra fields are dropped by the hub, and the operator API
//! checks its token and the policy.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fieldsync_e2e::eventually;
use fieldsync_e2e::fleet::{Pki, TempHub, FLEET_POLICY, TOKEN};
use fieldsync_e2e::raw_mqtt::{connect_packet, mtls_config, no_client_cert_config, Next, RawMqtt};
use fieldsync_e2e::tap::{Tap, TapCerts};
use fieldsync_e2e::TempAgent;
use fieldsync_shared::hlc::system_now_ms;
use fieldsync_shared::wire::{
    down_topic, up_topic, Ack, Batch, Entry, Envelope, ErrorCode, Hello, Message,
};
use fieldsync_shared::{
    AgentId, Change, CollectionName, Cursor, FieldName, FieldState, FieldValue, Incarnation,
    Origin, RecordKey, RecordState, Seq, Stamp, Version,
};
use reqwest::StatusCode;
use rumqttc::{ConnectReturnCode, LastWill, Packet, Publish, QoS};
use rustls::ClientConfig;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Deadline for anything that should happen promptly (a sync, a counter).
const WAIT: Duration = Duration::from_secs(20);
/// Deadline for one MQTT answer from the hub.
const ANSWER: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Setup

/// A temp dir with a PKI (`pki/`) and a hub (`hub/`) running [`FLEET_POLICY`].
struct Fleet {
    dir: TempDir,
    pki: Pki,
    hub: TempHub,
}

impl Fleet {
    fn start() -> Self {
        tokio::task::block_in_place(|| {
            let dir = tempfile::Builder::new()
                .prefix("fieldsync-sec-")
                .tempdir()
                .expect("temp dir");
            let pki_dir = dir.path().join("pki");
            let hub_dir = dir.path().join("hub");
            std::fs::create_dir_all(&pki_dir).expect("pki dir");
            std::fs::create_dir_all(&hub_dir).expect("hub dir");
            let pki = Pki::create(&pki_dir).expect("certs init");
            let hub = TempHub::start(&hub_dir, &pki, FLEET_POLICY).expect("hub starts");
            Self { dir, pki, hub }
        })
    }

    fn addr(&self) -> SocketAddr {
        self.hub.mqtt_addr()
    }

    /// The hub's folder: its config, policy, stderr log and `hub-data/`.
    fn hub_dir(&self) -> PathBuf {
        self.dir.path().join("hub")
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

    /// A real `fieldsync-agent` linked to the hub (or to `url`).
    fn agent(&self, id: &str, url: Option<&str>) -> TempAgent {
        tokio::task::block_in_place(|| self.hub.agent(&self.pki, id, url).expect("agent starts"))
    }

    /// A raw client with `agent`'s certificate, connected as `agent`.
    async fn raw(&self, agent: &str) -> RawMqtt {
        RawMqtt::open(self.addr(), self.client(agent), agent, ANSWER)
            .await
            .expect("a valid agent connects")
    }

    async fn metrics(&self) -> Value {
        let (status, body) = self.hub.get("/v1/metrics").await.expect("GET /v1/metrics");
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// Waits until counter `name` is at least `want`, then asserts it is exactly
    /// `want` (each refusal counts once).
    async fn expect_counter(&self, name: &str, want: u64) {
        let got = eventually(&format!("{name} to reach {want}"), WAIT, || async {
            let n = self.metrics().await[name].as_u64().expect(name);
            (n >= want).then_some(n)
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}; hub log:\n{}", self.hub.stderr_log()));
        assert_eq!(got, want, "{name} counted more than expected");
    }

    /// Asserts each counter in `names` still has the value it had in `before`.
    async fn expect_unchanged(&self, before: &Value, names: &[&str]) {
        let now = self.metrics().await;
        for name in names {
            assert_eq!(now[name], before[name], "{name} changed: {before} -> {now}");
        }
    }

    /// Waits until the hub's copy of a record has exactly `want` as fields.
    async fn expect_hub_record(&self, agent: &str, collection: &str, key: &str, want: Value) {
        let last = std::sync::Mutex::new(None);
        let found = eventually(
            &format!("hub copy of {agent}/{collection}/{key} to be {want}"),
            WAIT,
            || async {
                let got = self.hub.record(agent, collection, key).await.ok()?;
                let done = got.as_ref() == Some(&want);
                *last.lock().unwrap() = got;
                done.then_some(())
            },
        )
        .await;
        if let Err(e) = found {
            panic!(
                "{e:#}; the hub has {:?}; hub log:\n{}",
                last.lock().unwrap(),
                self.hub.stderr_log()
            );
        }
    }
}

fn name<T>(new: impl FnOnce(String) -> Result<T, fieldsync_shared::IdError>, s: &str) -> T {
    new(s.to_owned()).expect("valid name")
}

/// A change writing `fields` to `collection/key`, stamped now by `agent`.
fn change(agent: &str, collection: &str, key: &str, fields: &[(&str, Value)]) -> Change {
    let version = Version {
        stamp: Stamp::new(system_now_ms(), 0),
        origin: Origin::agent(&name(AgentId::new, agent)),
    };
    let mut state = RecordState::default();
    for (field, value) in fields {
        state.fields.insert(
            name(FieldName::new, field),
            FieldState::plain(version.clone(), FieldValue::Set(value.clone())),
        );
    }
    Change {
        collection: name(CollectionName::new, collection),
        key: name(RecordKey::new, key),
        state,
    }
}

/// A batch of `changes` numbered from `first`.
fn batch(first: u64, changes: Vec<Change>) -> Message {
    let last = first + changes.len() as u64 - 1;
    let entries = changes
        .into_iter()
        .enumerate()
        .map(|(i, change)| Entry {
            seq: Seq(first + i as u64),
            change,
        })
        .collect();
    Message::Batch(Batch {
        first: Seq(first),
        last: Seq(last),
        check: 0,
        entries,
    })
}

fn up(agent: &str) -> String {
    up_topic(&name(AgentId::new, agent))
}

fn down(agent: &str) -> String {
    down_topic(&name(AgentId::new, agent))
}

/// The raw client's first steps as a new agent store (protocol v2): subscribe
/// to its down topic, send a hello with a fresh incarnation, get the hub's
/// welcome, take the hub's resync (a new store follows no hub incarnation),
/// then resync the hub with an empty snapshot (the hub follows no stream of
/// this incarnation). Returns the upstream position batches continue after.
async fn hello(client: &mut RawMqtt, agent: &str) -> Seq {
    let id = name(AgentId::new, agent);
    let incarnation = Incarnation(system_now_ms() ^ 0x5eed_0000_0000_0000);
    let welcome = client
        .say_hello(&id, incarnation, ANSWER)
        .await
        .expect("hello -> welcome");
    client
        .finish_link(&id, incarnation, &welcome, ANSWER)
        .await
        .expect("both resyncs")
}

// --- agent's local API ------------------------------------------------------

async fn agent_put(agent: &TempAgent, collection: &str, key: &str, body: Value) {
    let r = reqwest::Client::new()
        .put(agent.url(&format!("/v1/records/{collection}/{key}")))
        .json(&body)
        .send()
        .await
        .expect("agent PUT");
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "{}",
        r.text().await.unwrap_or_default()
    );
}

/// The agent's local copy of a record's fields, or `None` (404).
async fn agent_get(agent: &TempAgent, collection: &str, key: &str) -> Option<Value> {
    let r = reqwest::Client::new()
        .get(agent.url(&format!("/v1/records/{collection}/{key}")))
        .send()
        .await
        .expect("agent GET");
    match r.status() {
        StatusCode::OK => Some(r.json::<Value>().await.expect("JSON")["fields"].clone()),
        StatusCode::NOT_FOUND => None,
        other => panic!("agent GET answered {other}"),
    }
}

async fn agent_status(agent: &TempAgent) -> Value {
    reqwest::Client::new()
        .get(agent.url("/v1/status"))
        .send()
        .await
        .expect("agent status")
        .json()
        .await
        .expect("status JSON")
}

async fn wait_connected(agent: &TempAgent) {
    eventually(&format!("{} to be connected", agent.id()), WAIT, || async {
        (agent_status(agent).await["connected"] == true).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}; agent log:\n{}", agent.stderr_log()));
}

async fn wait_agent_record(agent: &TempAgent, collection: &str, key: &str, want: Value) {
    eventually(
        &format!("{}'s copy of {collection}/{key} to be {want}", agent.id()),
        WAIT,
        || async { (agent_get(agent, collection, key).await? == want).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}; agent log:\n{}", agent.stderr_log()));
}

// --- canary scanning ---------------------------------------------------------

fn contains(haystack: &[u8], needle: &str) -> bool {
    let needle = needle.as_bytes();
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every file under `dir`, recursively, with its raw bytes.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                todo.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                out.push((path, bytes));
            }
        }
    }
    out
}

/// Asserts none of `canaries` occurs in any file under `dir` (the redb file's
/// raw pages, free ones included, the log, the config).
fn assert_no_canary_in_files(dir: &Path, canaries: &[&str]) {
    let files = files_under(dir);
    assert!(
        files
            .iter()
            .any(|(p, _)| p.extension().is_some_and(|e| e == "redb")),
        "no redb file under {}: {:?}",
        dir.display(),
        files.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    for (path, bytes) in &files {
        for canary in canaries {
            assert!(
                !contains(bytes, canary),
                "{canary} found in {}",
                path.display()
            );
        }
    }
}

/// Asserts `value` occurs in the hub's redb file, so a scan for canaries there
/// looks at the bytes where field values would be.
fn assert_in_hub_store(fleet: &Fleet, value: &str) {
    let bytes = std::fs::read(fleet.hub.data_file()).expect("hub.redb");
    assert!(
        contains(&bytes, value),
        "{value} is not in the hub's redb file: the canary scan would prove nothing"
    );
}

// ---------------------------------------------------------------------------
// 1. Local-only fields never leave the agent.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_only_fields_never_leave_the_agent() {
    let fleet = Fleet::start();
    let id = "gw-tap";
    fleet.client(id);
    let tap = Tap::start(
        fleet.addr(),
        TapCerts {
            ca: &fleet.pki.ca(),
            hub_cert: &fleet.pki.hub_cert(),
            hub_key: &fleet.pki.hub_key(),
            agent_cert: &fleet.pki.cert(id),
            agent_key: &fleet.pki.key(id),
        },
    )
    .await
    .expect("tap starts");
    let agent = fleet.agent(id, Some(&format!("mqtts://{}", tap.addr())));

    let permitted = ["PERMIT-INI-2b7e", "PERMIT-WARD-c44d", "PERMIT-MODE-a901"];
    let canaries = [
        "CANARY-SSN-7f3a",   // a field the policy does not list
        "CANARY-SSN2-0b9f",  // a later write of only that field
        "CANARY-DIARY-91c2", // a collection the policy does not name
        "CANARY-PIN-3e9b",   // an unlisted field of a both-ways collection
        "CANARY-DOSE-d0e5",  // a listed field of a down-only collection
    ];
    agent_put(
        &agent,
        "patients",
        "p1",
        json!({"initials": permitted[0], "ward": permitted[1], "ssn": canaries[0]}),
    )
    .await;
    agent_put(&agent, "patients", "p1", json!({"ssn": canaries[1]})).await;
    agent_put(&agent, "diary", "d1", json!({"text": canaries[2]})).await;
    agent_put(
        &agent,
        "settings",
        "s1",
        json!({"mode": permitted[2], "pin": canaries[3]}),
    )
    .await;
    agent_put(&agent, "orders", "o1", json!({"dose": canaries[4]})).await;

    fleet
        .expect_hub_record(
            id,
            "patients",
            "p1",
            json!({"initials": permitted[0], "ward": permitted[1]}),
        )
        .await;
    fleet
        .expect_hub_record(id, "settings", "s1", json!({"mode": permitted[2]}))
        .await;
    eventually("the agent's outbox to be empty", WAIT, || async {
        let s = agent_status(&agent).await;
        (s["outbox_pending"] == 0 && s["connected"] == true).then_some(())
    })
    .await
    .unwrap();

    // The local copy is whole: the canaries were written, they just stayed.
    assert_eq!(
        agent_get(&agent, "patients", "p1").await,
        Some(json!({"initials": permitted[0], "ward": permitted[1], "ssn": canaries[1]}))
    );
    assert_eq!(
        agent_get(&agent, "diary", "d1").await,
        Some(json!({"text": canaries[2]}))
    );
    for (collection, key) in [("diary", "d1"), ("orders", "o1")] {
        assert_eq!(
            fleet.hub.record(id, collection, key).await.unwrap(),
            None,
            "the hub has {collection}/{key}"
        );
    }

    // What went over the wire: the permitted values, none of the canaries.
    let wire = tap.recorded();
    for value in permitted {
        assert!(contains(&wire, value), "{value} not in the tap's recording");
    }
    for canary in canaries {
        assert!(!contains(&wire, canary), "{canary} went over the wire");
    }
    // What the hub keeps: its store, its log, everything in its folder.
    assert_in_hub_store(&fleet, permitted[0]);
    assert_no_canary_in_files(&fleet.hub_dir(), &canaries);
    let log = fleet.hub.stderr_log();
    for canary in canaries {
        assert!(!log.contains(canary), "{canary} in the hub's log");
    }
    // Field values never appear in logs, the agent's own included.
    let agent_log = agent.stderr_log();
    for canary in canaries {
        assert!(!agent_log.contains(canary), "{canary} in the agent's log");
    }
}

// ---------------------------------------------------------------------------
// 2. Refused connections.

/// Tries TLS and a CONNECT for `client_id`, and expects the hub to refuse at
/// the TLS level: the handshake fails, or (TLS 1.3 lets the client finish first)
/// the hub closes the connection, with an alert or without, and never answers
/// with an MQTT packet.
async fn expect_refused_at_tls(addr: SocketAddr, config: Arc<ClientConfig>, client_id: &str) {
    let Ok(mut client) = RawMqtt::tls(addr, config).await else {
        return;
    };
    if client
        .send(Packet::Connect(connect_packet(client_id)))
        .await
        .is_err()
    {
        return;
    }
    match client.next(ANSWER).await {
        Next::Closed(_) => {}
        other => panic!("expected the hub to close the connection; got {other:?}"),
    }
}

const SESSION_COUNTERS: &[&str] = &["sessions_established", "agents_connected"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_is_refused() {
    let fleet = Fleet::start();
    let before = fleet.metrics().await;
    let config = no_client_cert_config(&fleet.pki.ca()).unwrap();
    expect_refused_at_tls(fleet.addr(), config, "gw-a").await;
    fleet
        .expect_counter(
            "tls_handshake_failures",
            before["tls_handshake_failures"].as_u64().unwrap() + 1,
        )
        .await;
    fleet
        .expect_unchanged(
            &before,
            &[
                "identity_rejected",
                "connect_refused",
                "sessions_established",
            ],
        )
        .await;
    assert!(fleet.hub.agent_row("gw-a").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_from_another_ca_or_without_an_agent_id_are_refused() {
    let fleet = Fleet::start();
    let other_dir = fleet.dir.path().join("other-pki");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other = tokio::task::block_in_place(|| {
        let other = Pki::create(&other_dir).expect("second certs init");
        other.issue("gw-a").expect("issue in the second PKI");
        other
    });
    let before = fleet.metrics().await;

    // Same agent id, but signed by a CA the hub does not trust (`certs init`
    // names every CA alike, so only the signature tells them apart).
    let config = mtls_config(&fleet.pki.ca(), &other.cert("gw-a"), &other.key("gw-a")).unwrap();
    expect_refused_at_tls(fleet.addr(), config, "gw-a").await;
    let failures = before["tls_handshake_failures"].as_u64().unwrap() + 1;
    fleet
        .expect_counter("tls_handshake_failures", failures)
        .await;
    fleet
        .expect_unchanged(
            &before,
            &[
                "identity_rejected",
                "connect_refused",
                "sessions_established",
            ],
        )
        .await;

    // Signed by the fleet CA, but the CN is not an agent id, or there is none.
    for (i, cn) in [Some("not an agent id!"), None].into_iter().enumerate() {
        let (cert, key) = fleet_signed_cert(
            &fleet.pki,
            cn,
            &fleet.dir.path().join(format!("bad-cn-{i}")),
        );
        let config = mtls_config(&fleet.pki.ca(), &cert, &key).unwrap();
        expect_refused_at_tls(fleet.addr(), config, "gw-a").await;
        let rejected = before["identity_rejected"].as_u64().unwrap() + 1 + i as u64;
        fleet.expect_counter("identity_rejected", rejected).await;
    }
    fleet
        .expect_unchanged(&before, &["connect_refused", "sessions_established"])
        .await;
    fleet
        .expect_counter("tls_handshake_failures", failures)
        .await;

    // The control: the fleet's own certificate for the same id gets in.
    let mut good = fleet.raw("gw-a").await;
    fleet
        .expect_counter(
            "sessions_established",
            before["sessions_established"].as_u64().unwrap() + 1,
        )
        .await;
    good.send(Packet::PingReq).await.unwrap();
    assert!(matches!(
        good.next(ANSWER).await,
        Next::Packet(Packet::PingResp)
    ));
}

/// A client certificate signed by the fleet CA with subject CN `cn` (none if
/// `None`), written into `dir` as `client.pem` / `client.key`.
fn fleet_signed_cert(pki: &Pki, cn: Option<&str>, dir: &Path) -> (PathBuf, PathBuf) {
    use rcgen::{
        CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    std::fs::create_dir_all(dir).unwrap();
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(pki.dir().join("ca.key")).unwrap()).unwrap();
    let issuer =
        Issuer::from_ca_cert_pem(&std::fs::read_to_string(pki.ca()).unwrap(), ca_key).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(cn) = cn {
        params.distinguished_name.push(DnType::CommonName, cn);
    } else {
        params
            .distinguished_name
            .push(DnType::OrganizationName, "fieldsync e2e");
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let (cert_path, key_path) = (dir.join("client.pem"), dir.join("client.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_other_than_the_certificates_is_refused() {
    let fleet = Fleet::start();
    let config = fleet.client("gw-a");
    let before = fleet.metrics().await;

    let mut client = RawMqtt::tls(fleet.addr(), config).await.unwrap();
    let ack = client
        .connect(connect_packet("gw-b"), ANSWER)
        .await
        .unwrap();
    assert_eq!(ack.code, ConnectReturnCode::BadClientId);
    let (after, _) = client.until_closed(ANSWER).await.unwrap();
    assert!(
        after.is_empty(),
        "the hub sent more after refusing: {after:?}"
    );

    fleet
        .expect_counter(
            "connect_refused",
            before["connect_refused"].as_u64().unwrap() + 1,
        )
        .await;
    fleet.expect_unchanged(&before, SESSION_COUNTERS).await;
    for agent in ["gw-a", "gw-b"] {
        assert!(
            fleet.hub.agent_row(agent).await.unwrap().is_none(),
            "{agent} has a row"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_with_a_last_will_is_refused() {
    let fleet = Fleet::start();
    let config = fleet.client("gw-a");
    let before = fleet.metrics().await;

    let mut client = RawMqtt::tls(fleet.addr(), config).await.unwrap();
    let mut connect = connect_packet("gw-a");
    // Even a will on its own up topic: the broker would publish it unchecked.
    connect.last_will = Some(LastWill::new(
        up("gw-a"),
        b"bye".to_vec(),
        QoS::AtLeastOnce,
        false,
    ));
    let ack = client.connect(connect, ANSWER).await.unwrap();
    assert_eq!(ack.code, ConnectReturnCode::NotAuthorized);
    client.until_closed(ANSWER).await.unwrap();

    fleet
        .expect_counter(
            "connect_refused",
            before["connect_refused"].as_u64().unwrap() + 1,
        )
        .await;
    fleet.expect_unchanged(&before, SESSION_COUNTERS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_outside_its_own_up_topic_closes_the_connection() {
    let fleet = Fleet::start();
    let mut b = fleet.agent("gw-b", None);
    wait_connected(&b).await;
    fleet.client("gw-a");
    let before = fleet.metrics().await;

    // Forgeries B's session would accept if they got through: an upstream batch
    // numbered 1 (B has sent nothing yet) and a downstream batch numbered 1.
    let forged_up = batch(
        1,
        vec![change(
            "gw-b",
            "patients",
            "forged",
            &[("initials", json!("FORGED-UP-1c3b"))],
        )],
    );
    let forged_down = batch(
        1,
        vec![change(
            "gw-b",
            "settings",
            "forged",
            &[("mode", json!("FORGED-DOWN-9a7d"))],
        )],
    );
    let encode = |m: Message| fieldsync_shared::codec::encode(&Envelope::new(m)).unwrap();
    let mut retained = Publish::new(up("gw-a"), QoS::AtLeastOnce, encode(forged_up.clone()));
    retained.retain = true;
    let qos2 = Publish::new(up("gw-a"), QoS::ExactlyOnce, encode(forged_up.clone()));
    let mut cases = vec![
        (
            "another agent's up topic",
            Publish::new(up("gw-b"), QoS::AtLeastOnce, encode(forged_up.clone())),
        ),
        (
            "another agent's down topic",
            Publish::new(down("gw-b"), QoS::AtLeastOnce, encode(forged_down.clone())),
        ),
        (
            "its own down topic",
            Publish::new(down("gw-a"), QoS::AtLeastOnce, encode(forged_down)),
        ),
        ("a retained publish", retained),
        ("a QoS 2 publish", qos2),
    ];
    for (_, p) in &mut cases {
        if p.qos != QoS::AtMostOnce {
            p.pkid = 1;
        }
    }
    let mut violations = before["acl_violations"].as_u64().unwrap();
    for (what, publish) in cases {
        let mut a = fleet.raw("gw-a").await;
        a.send(Packet::Publish(publish)).await.unwrap();
        let (seen, _) = a
            .until_closed(ANSWER)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        assert!(seen.is_empty(), "{what}: the hub answered {seen:?}");
        violations += 1;
        fleet.expect_counter("acl_violations", violations).await;
    }

    // Nothing of the forgeries reached the hub or B.
    fleet
        .expect_unchanged(
            &before,
            &[
                "upstream_batches_applied",
                "upstream_changes_applied",
                "envelopes_rejected",
            ],
        )
        .await;
    assert_eq!(
        fleet
            .hub
            .record("gw-b", "patients", "forged")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        fleet
            .hub
            .record("gw-a", "patients", "forged")
            .await
            .unwrap(),
        None
    );
    let row = fleet.hub.agent_row("gw-b").await.unwrap().expect("B's row");
    assert_eq!(row["up_applied"], 0, "{row}");
    // B's own sequence numbers 1 are still free: its real write and a real
    // operator write both go through (a forged 1 would have made them duplicates).
    agent_put(&b, "patients", "p1", json!({"initials": "REAL-B"})).await;
    fleet
        .expect_hub_record("gw-b", "patients", "p1", json!({"initials": "REAL-B"}))
        .await;
    let (status, body) = fleet
        .hub
        .put(
            "/v1/agents/gw-b/records/settings/s1",
            &json!({"mode": "REAL-DOWN"}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["queued_seq"], 1, "{body}");
    wait_agent_record(&b, "settings", "s1", json!({"mode": "REAL-DOWN"})).await;
    assert_eq!(agent_get(&b, "settings", "forged").await, None);
    assert_eq!(
        fleet
            .hub
            .record("gw-b", "patients", "forged")
            .await
            .unwrap(),
        None
    );
    assert!(b.is_running(), "B's agent stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_outside_its_own_down_topic_closes_the_connection() {
    let fleet = Fleet::start();
    let b = fleet.agent("gw-b", None);
    wait_connected(&b).await;
    fleet.client("gw-a");
    let before = fleet.metrics().await;

    let filters = [
        down("gw-b"),
        "#".to_owned(),
        "fieldsync/v1/agents/+/down".to_owned(),
        "fieldsync/v1/agents/gw-b/#".to_owned(),
        up("gw-b"),
        up("gw-a"),
    ];
    let mut violations = before["acl_violations"].as_u64().unwrap();
    for filter in &filters {
        let mut a = fleet.raw("gw-a").await;
        let mut subscribe = rumqttc::Subscribe::new(filter.as_str(), QoS::AtLeastOnce);
        subscribe.pkid = 1;
        a.send(Packet::Subscribe(subscribe)).await.unwrap();
        let (seen, _) = a
            .until_closed(ANSWER)
            .await
            .unwrap_or_else(|e| panic!("subscribe {filter}: {e:#}"));
        assert!(
            seen.is_empty(),
            "subscribe {filter}: the hub answered {seen:?}"
        );
        violations += 1;
        fleet.expect_counter("acl_violations", violations).await;
    }

    // A's well-behaved session (a new connection with A's client id takes over
    // any earlier one, so it is opened last): subscribed to its own down topic,
    // welcomed by the engine.
    let mut a_good = fleet.raw("gw-a").await;
    assert_eq!(hello(&mut a_good, "gw-a").await, Seq(0));

    // A downstream write for B reaches B, and only B.
    let (status, body) = fleet
        .hub
        .put(
            "/v1/agents/gw-b/records/settings/s1",
            &json!({"mode": "FOR-B-ONLY-5d21"}),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    wait_agent_record(&b, "settings", "s1", json!({"mode": "FOR-B-ONLY-5d21"})).await;
    // A's live connection got nothing (B's batch went out before B applied it).
    match a_good.next(Duration::from_millis(500)).await {
        Next::Silent => {}
        other => panic!("A's connection saw {other:?}"),
    }
    fleet.expect_counter("acl_violations", violations).await;
}

// ---------------------------------------------------------------------------
// 3. Slow clients block nobody.

/// Waits until the hub closes `tcp` (end of stream or an error), reading and
/// discarding whatever it sends (a TLS alert, say).
async fn wait_closed(tcp: &mut TcpStream, within: Duration) -> anyhow::Result<()> {
    let mut buf = [0u8; 512];
    tokio::time::timeout(within, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("still open after {within:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_stalled_connections_block_nobody_and_are_closed() {
    let fleet = Fleet::start();
    let good = fleet.client("gw-fast");
    let slow = fleet.client("gw-slow");
    let before = fleet.metrics().await;
    let accepted = before["connections_accepted"].as_u64().unwrap();

    // Idle TCP connections that never send a byte.
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(TcpStream::connect(fleet.addr()).await.unwrap());
    }
    // A TLS handshake that stops midway: a record header announcing a 512-byte
    // ClientHello, then a few bytes of it, then nothing.
    let mut stalled = TcpStream::connect(fleet.addr()).await.unwrap();
    stalled
        .write_all(&[
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ])
        .await
        .unwrap();
    // A finished TLS handshake with a valid certificate, and no CONNECT.
    let mut no_connect = RawMqtt::tls(fleet.addr(), slow).await.unwrap();
    let stallers = idle.len() as u64 + 2;
    // The hub holds all of them before the good agent tries.
    eventually(
        "the hub to accept the stalling connections",
        WAIT,
        || async {
            let n = fleet.metrics().await["connections_accepted"].as_u64()?;
            (n >= accepted + stallers).then_some(())
        },
    )
    .await
    .unwrap();

    let started = Instant::now();
    let mut client = RawMqtt::open(fleet.addr(), good, "gw-fast", Duration::from_secs(2))
        .await
        .expect("a good agent connects while others stall");
    let took = started.elapsed();
    eprintln!("TLS + CONNECT/CONNACK beside {stallers} stalled connections: {took:?}");
    assert!(
        took < Duration::from_secs(2),
        "TLS + CONNECT/CONNACK took {took:?}"
    );
    // And it is served: hello, welcome.
    assert_eq!(hello(&mut client, "gw-fast").await, Seq(0));

    // The hub closes the stallers once their handshake (3 s) or CONNECT (3 s)
    // timeout has passed.
    let deadline = Duration::from_secs(15);
    for tcp in idle.iter_mut().chain([&mut stalled]) {
        wait_closed(tcp, deadline)
            .await
            .expect("the hub closes a stalled handshake");
    }
    no_connect
        .until_closed(deadline)
        .await
        .expect("the hub closes a connection with no CONNECT");
    fleet
        .expect_counter(
            "tls_handshake_failures",
            before["tls_handshake_failures"].as_u64().unwrap() + idle.len() as u64 + 1,
        )
        .await;
    fleet
        .expect_counter(
            "connect_refused",
            before["connect_refused"].as_u64().unwrap() + 1,
        )
        .await;
    // The good agent is still connected and served.
    client.send(Packet::PingReq).await.unwrap();
    assert!(matches!(
        client.next(ANSWER).await,
        Next::Packet(Packet::PingResp)
    ));
}

// ---------------------------------------------------------------------------
// 4. A misbehaving agent.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_drops_what_its_policy_does_not_permit_and_survives_garbage() {
    let fleet = Fleet::start();
    let x = "gw-x";
    let mut client = fleet.raw(x).await;
    assert_eq!(hello(&mut client, x).await, Seq(0));
    let before = fleet.metrics().await;

    let canaries = ["CANARY-BAD-55e1", "CANARY-VAULT-e8f0", "CANARY-DOSE-77ab"];
    client
        .publish_msg(
            &up(x),
            batch(
                1,
                vec![
                    change(
                        x,
                        "patients",
                        "p1",
                        &[
                            ("initials", json!("OK-INI-6d2a")),
                            ("secret", json!(canaries[0])),
                        ],
                    ),
                    change(x, "vault", "v1", &[("blob", json!(canaries[1]))]),
                    change(x, "orders", "o1", &[("dose", json!(canaries[2]))]),
                ],
            ),
        )
        .await
        .unwrap();
    match client.next_msg(ANSWER).await.unwrap() {
        Message::Ack(Ack { upto, .. }) => assert_eq!(upto, Seq(3)),
        other => panic!("expected an ack, got {other:?}"),
    }
    fleet
        .expect_hub_record(x, "patients", "p1", json!({"initials": "OK-INI-6d2a"}))
        .await;
    assert_eq!(fleet.hub.record(x, "vault", "v1").await.unwrap(), None);
    assert_eq!(fleet.hub.record(x, "orders", "o1").await.unwrap(), None);
    fleet
        .expect_counter(
            "policy_denied_fields",
            before["policy_denied_fields"].as_u64().unwrap() + 3,
        )
        .await;
    fleet
        .expect_counter(
            "upstream_batches_applied",
            before["upstream_batches_applied"].as_u64().unwrap() + 1,
        )
        .await;
    assert_in_hub_store(&fleet, "OK-INI-6d2a");
    assert_no_canary_in_files(&fleet.hub_dir(), &canaries);
    let log = fleet.hub.stderr_log();
    for canary in canaries {
        assert!(!log.contains(canary), "{canary} in the hub's log");
    }

    // Bad envelopes on its own up topic: each refused with an error message and
    // counted; the connection stays up.
    let wrong_version = fieldsync_shared::codec::to_bytes(&Envelope {
        v: 99,
        msg: Message::Ack(Ack {
            upto: Seq(1),
            check: 0,
        }),
    })
    .unwrap();
    let other_agent_hello =
        fieldsync_shared::codec::encode(&Envelope::new(Message::Hello(Hello {
            agent: name(AgentId::new, "gw-y"),
            incarnation: Incarnation(7),
            down: Cursor::default(),
            time_ms: system_now_ms(),
            correction_ms: 0,
            rules: Default::default(),
        })))
        .unwrap();
    let bad_range = fieldsync_shared::codec::encode(&Envelope::new(Message::Batch(Batch {
        first: Seq(0),
        last: Seq(0),
        check: 0,
        entries: vec![],
    })))
    .unwrap();
    let bad: [(&[u8], ErrorCode); 5] = [
        (b"\xff\xfe not CBOR at all", ErrorCode::Malformed),
        (b"", ErrorCode::Malformed),
        (&wrong_version, ErrorCode::UnsupportedVersion),
        (&other_agent_hello, ErrorCode::Malformed),
        (&bad_range, ErrorCode::Malformed),
    ];
    let rejected = before["envelopes_rejected"].as_u64().unwrap();
    for (i, (payload, code)) in bad.iter().enumerate() {
        client
            .publish(&up(x), QoS::AtLeastOnce, payload.to_vec())
            .await
            .unwrap();
        match client.next_msg(ANSWER).await.unwrap() {
            Message::Error(e) => assert_eq!(e.code, *code, "payload {i}: {e:?}"),
            other => panic!("payload {i}: expected an error, got {other:?}"),
        }
        fleet
            .expect_counter("envelopes_rejected", rejected + i as u64 + 1)
            .await;
    }
    // The same connection still syncs.
    client
        .publish_msg(
            &up(x),
            batch(4, vec![change(x, "patients", "p2", &[("ward", json!(4))])]),
        )
        .await
        .unwrap();
    match client.next_msg(ANSWER).await.unwrap() {
        Message::Ack(Ack { upto, .. }) => assert_eq!(upto, Seq(4)),
        other => panic!("expected an ack, got {other:?}"),
    }
    fleet
        .expect_hub_record(x, "patients", "p2", json!({"ward": 4}))
        .await;

    // And the hub serves everyone else.
    let health = reqwest::get(format!("{}/v1/health", fleet.hub.api_url()))
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let y = fleet.agent("gw-y", None);
    agent_put(&y, "patients", "y1", json!({"ward": 7, "ssn": "local"})).await;
    fleet
        .expect_hub_record("gw-y", "patients", "y1", json!({"ward": 7}))
        .await;
    fleet
        .expect_unchanged(&before, &["acl_violations", "malformed_packets"])
        .await;
}

// ---------------------------------------------------------------------------
// 5. The operator API.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_api_checks_the_token_and_the_policy() {
    let fleet = Fleet::start();
    let agent = fleet.agent("gw-op", None);
    wait_connected(&agent).await;
    eventually("the hub to know gw-op", WAIT, || async {
        fleet.hub.agent_row("gw-op").await.ok()?
    })
    .await
    .unwrap();
    let api = fleet.hub.api_url().to_owned();
    let http = reqwest::Client::new();
    let before = fleet.metrics().await;

    // Health needs no token.
    let r = http.get(format!("{api}/v1/health")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"status": "ok"}));

    // Everything else does: none, a wrong one, a prefix of the right one, the
    // right one under another scheme.
    let half = &TOKEN[..TOKEN.len() / 2];
    let headers = [
        None,
        Some("Bearer wrong-token-0123456789abcdef".to_owned()),
        Some(format!("Bearer {half}")),
        Some(format!("Basic {TOKEN}")),
        Some(TOKEN.to_owned()),
        Some("Bearer ".to_owned()),
    ];
    let routes = [
        ("GET", "/v1/agents"),
        ("GET", "/v1/metrics"),
        ("GET", "/v1/agents/gw-op/records/settings/s1"),
        ("PUT", "/v1/agents/gw-op/records/settings/s1"),
    ];
    for header in &headers {
        for (method, path) in routes {
            let mut req = match method {
                "GET" => http.get(format!("{api}{path}")),
                _ => http
                    .put(format!("{api}{path}"))
                    .json(&json!({"mode": "NO-TOKEN-WRITE"})),
            };
            if let Some(h) = header {
                req = req.header("Authorization", h);
            }
            let r = req.send().await.unwrap();
            assert_eq!(
                r.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {header:?}"
            );
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["error"]["code"], "unauthorized", "{body}");
        }
    }

    // Writes the policy does not let flow down: refused before anything is queued.
    let denied = [
        ("patients/p1", json!({"initials": "JD"})), // an up-only collection
        ("vault/v1", json!({"blob": "x"})),         // a collection it does not name
        (
            "settings/s1",
            json!({"mode": "eco", "pin": "CANARY-OP-4c1e"}),
        ), // one unlisted field
        ("orders/o1", json!({"dose": 5, "note": "CANARY-OP-4c1e"})), // same in a down-only one
    ];
    for (record, body) in &denied {
        let (status, answer) = fleet
            .hub
            .put(&format!("/v1/agents/gw-op/records/{record}"), body)
            .await
            .unwrap();
        assert_eq!(status, StatusCode::FORBIDDEN, "{record}: {answer}");
        assert_eq!(
            answer["error"]["code"], "policy_denied",
            "{record}: {answer}"
        );
        assert!(
            !answer.to_string().contains("CANARY-OP-4c1e"),
            "the error echoes a value: {answer}"
        );
    }
    fleet
        .expect_unchanged(
            &before,
            &["downstream_changes_queued", "downstream_batches_sent"],
        )
        .await;
    let row = fleet.hub.agent_row("gw-op").await.unwrap().unwrap();
    assert_eq!(row["queue_pending"], 0, "{row}");
    assert!(!fleet.hub.stderr_log().contains("CANARY-OP-4c1e"));

    // The control: a permitted write is queued as number 1 and delivered.
    let (status, answer) = fleet
        .hub
        .put("/v1/agents/gw-op/records/orders/o1", &json!({"dose": 5}))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["queued_seq"], 1, "{answer}");
    wait_agent_record(&agent, "orders", "o1", json!({"dose": 5})).await;
    for (collection, key) in [("patients", "p1"), ("vault", "v1"), ("settings", "s1")] {
        assert_eq!(
            agent_get(&agent, collection, key).await,
            None,
            "{collection}/{key} reached the agent"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_claiming_another_origin_are_dropped_and_batches_before_hello_are_refused() {
    let fleet = Fleet::start();
    let x = "gw-forger";
    let mut client = fleet.raw(x).await;

    // A batch before any hello is not applied; the hub asks for a hello.
    client.subscribe(&down(x), ANSWER).await.expect("SUBACK");
    client
        .publish_msg(
            &up(x),
            batch(
                1,
                vec![change(x, "patients", "early", &[("ward", json!(1))])],
            ),
        )
        .await
        .unwrap();
    match client.next_msg(ANSWER).await.unwrap() {
        Message::Error(e) => assert_eq!(
            e.code,
            fieldsync_shared::wire::ErrorCode::HelloFirst,
            "{e:?}"
        ),
        other => panic!("expected a HelloFirst error, got {other:?}"),
    }
    assert_eq!(
        fleet.hub.record(x, "patients", "early").await.unwrap(),
        None
    );

    let mut client = fleet.raw(x).await;
    assert_eq!(hello(&mut client, x).await, Seq(0));
    let before = fleet.metrics().await;
    // One change stamped as the hub's, one as another agent's, one honest.
    let mut as_hub = change(x, "patients", "p-hub", &[("ward", json!("FORGED-HUB"))]);
    for f in as_hub.state.fields.values_mut() {
        f.version.origin = Origin::hub("hub").unwrap();
    }
    let as_other = change(
        "gw-victim",
        "patients",
        "p-other",
        &[("ward", json!("FORGED-OTHER"))],
    );
    let honest = change(x, "patients", "p-own", &[("ward", json!("HONEST"))]);
    client
        .publish_msg(&up(x), batch(1, vec![as_hub, as_other, honest]))
        .await
        .unwrap();
    match client.next_msg(ANSWER).await.unwrap() {
        Message::Ack(Ack { upto, .. }) => assert_eq!(upto, Seq(3)),
        other => panic!("expected an ack, got {other:?}"),
    }
    fleet
        .expect_hub_record(x, "patients", "p-own", json!({"ward": "HONEST"}))
        .await;
    assert_eq!(
        fleet.hub.record(x, "patients", "p-hub").await.unwrap(),
        None
    );
    assert_eq!(
        fleet.hub.record(x, "patients", "p-other").await.unwrap(),
        None
    );
    fleet
        .expect_counter(
            "forged_origin_changes",
            before["forged_origin_changes"].as_u64().unwrap() + 2,
        )
        .await;
}
