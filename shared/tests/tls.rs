//! The TLS layer against real handshakes: certificates made with rcgen in a temp
//! dir, `server_config`/`client_config` on both ends of a loopback TCP socket.
//! Who is let in, who is refused, and what `peer_agent_id` reads from a
//! certificate; plus the errors for unusable PEM files.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fieldsync_shared::tls::{self, TlsError};
use fieldsync_shared::AgentId;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// A CA made for a test.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(&[(DnType::CommonName, name)]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert_pem = params.self_signed(&key).unwrap().pem();
        Self {
            issuer: Issuer::new(params, key),
            cert_pem,
        }
    }

    /// An end-entity certificate and its key, both PEM.
    fn issue(
        &self,
        subject: DistinguishedName,
        sans: &[&str],
        purpose: ExtendedKeyUsagePurpose,
    ) -> (String, String) {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name = subject;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![purpose];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn client(&self, common_name: &str) -> (String, String) {
        self.issue(
            dn(&[(DnType::CommonName, common_name)]),
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }
}

fn dn(parts: &[(DnType, &str)]) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    for (ty, value) in parts {
        name.push(ty.clone(), *value);
    }
    name
}

/// The files of one test PKI: a fleet CA with a hub and agents, and an
/// unrelated CA with its own hub and agent.
struct Pki {
    dir: TempDir,
}

impl Pki {
    fn new() -> Self {
        let pki = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        let fleet = Ca::new("Test fleet CA");
        let other = Ca::new("Some other CA");
        pki.write("ca.pem", &fleet.cert_pem);
        pki.write("other-ca.pem", &other.cert_pem);
        let server = |ca: &Ca| {
            ca.issue(
                dn(&[(DnType::CommonName, "hub")]),
                &["localhost", "127.0.0.1"],
                ExtendedKeyUsagePurpose::ServerAuth,
            )
        };
        pki.write_pair("hub", server(&fleet));
        pki.write_pair("other-hub", server(&other));
        pki.write_pair("gw-1", fleet.client("gw-1"));
        pki.write_pair("gw-2", fleet.client("gw-2"));
        pki.write_pair("bad-cn", fleet.client("not/an id"));
        pki.write_pair("stranger", other.client("gw-1"));
        pki.write_pair(
            "no-cn",
            fleet.issue(
                dn(&[(DnType::OrganizationName, "Fieldsync")]),
                &[],
                ExtendedKeyUsagePurpose::ClientAuth,
            ),
        );
        // rcgen keeps one value per DnType, so the second CN goes in by its OID.
        pki.write_pair(
            "two-cns",
            fleet.issue(
                dn(&[
                    (DnType::CommonName, "gw-1"),
                    (DnType::CustomDnType(vec![2, 5, 4, 3]), "gw-2"),
                ]),
                &[],
                ExtendedKeyUsagePurpose::ClientAuth,
            ),
        );
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, contents: &str) {
        std::fs::write(self.path(name), contents).unwrap();
    }

    fn write_pair(&self, name: &str, (cert, key): (String, String)) {
        self.write(&format!("{name}.pem"), &cert);
        self.write(&format!("{name}.key"), &key);
    }

    fn server(&self) -> Arc<ServerConfig> {
        tls::server_config(
            &self.path("ca.pem"),
            &self.path("hub.pem"),
            &self.path("hub.key"),
        )
        .unwrap()
    }

    /// An agent's config with the identity `name` that trusts the CA `ca`.
    fn client(&self, ca: &str, name: &str) -> Arc<ClientConfig> {
        tls::client_config(
            &self.path(ca),
            &self.path(&format!("{name}.pem")),
            &self.path(&format!("{name}.key")),
        )
        .unwrap()
    }

    fn cert(&self, name: &str) -> CertificateDer<'static> {
        tls::load_certs(&self.path(&format!("{name}.pem")))
            .unwrap()
            .remove(0)
    }
}

/// What each side saw of one connection.
struct Outcome {
    /// The server side: the client's certificate once the handshake completed
    /// and a byte went each way.
    server: Result<CertificateDer<'static>, String>,
    /// The client side: whether the handshake completed and a byte went each way.
    client: Result<(), String>,
}

/// One connection over loopback TCP: a TLS handshake, then one byte each way, so
/// a refusal by either side shows on both.
async fn connect(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serve = async {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut stream = TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        stream
            .read_exact(&mut byte)
            .await
            .map_err(|e| e.to_string())?;
        stream.write_all(b"y").await.map_err(|e| e.to_string())?;
        stream.flush().await.map_err(|e| e.to_string())?;
        let peer = stream.get_ref().1.peer_certificates();
        let first = peer
            .and_then(|c| c.first())
            .ok_or("no client certificate")?;
        Ok::<_, String>(first.clone().into_owned())
    };
    let dial = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from("localhost").unwrap();
        let mut stream = TlsConnector::from(client)
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        stream.write_all(b"x").await.map_err(|e| e.to_string())?;
        stream.flush().await.map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        stream
            .read_exact(&mut byte)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    };
    // A guard against a hung test, not a synchronisation point: both sides end
    // on their own because each drops its socket when it fails.
    let (server, client) =
        tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(serve, dial) })
            .await
            .expect("the connection neither completed nor failed");
    Outcome { server, client }
}

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(path: &Path) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for cert in tls::load_certs(path).unwrap() {
        roots.add(cert).unwrap();
    }
    roots
}

#[tokio::test]
async fn an_agent_with_a_fleet_certificate_is_let_in_and_identified_by_its_cn() {
    let pki = Pki::new();
    let mut serials = Vec::new();
    for agent in ["gw-1", "gw-2"] {
        let outcome = connect(pki.server(), pki.client("ca.pem", agent)).await;
        assert_eq!(outcome.client, Ok(()));
        let cert = outcome.server.expect("the server completed the handshake");
        assert_eq!(cert, pki.cert(agent));
        assert_eq!(
            tls::peer_agent_id(&cert).unwrap(),
            AgentId::new(agent).unwrap()
        );
        let about = tls::peer_certificate(&cert).unwrap();
        assert_eq!(about.agent.as_str(), agent);
        assert!(
            !about.serial.is_empty() && about.serial.chars().all(|c| c.is_ascii_hexdigit()),
            "{}",
            about.serial
        );
        let now_s = i64::try_from(fieldsync_shared::hlc::system_now_ms() / 1000).unwrap();
        assert!(
            about.not_after_s > now_s,
            "a valid certificate expires later"
        );
        serials.push(about.serial);
    }
    assert_ne!(
        serials[0], serials[1],
        "each certificate has its own serial"
    );
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let pki = Pki::new();
    let client = ClientConfig::builder_with_provider(ring())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(&pki.path("ca.pem")))
        .with_no_client_auth();
    let outcome = connect(pki.server(), Arc::new(client)).await;
    let err = outcome.server.expect_err("server must refuse");
    assert!(err.contains("certificate"), "{err}");
    assert!(outcome.client.is_err());
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused() {
    let pki = Pki::new();
    let outcome = connect(pki.server(), pki.client("ca.pem", "stranger")).await;
    let err = outcome.server.expect_err("server must refuse");
    assert!(err.to_lowercase().contains("unknownissuer"), "{err}");
    assert!(outcome.client.is_err());
}

#[tokio::test]
async fn a_client_that_trusts_another_ca_refuses_the_server() {
    let pki = Pki::new();
    let outcome = connect(pki.server(), pki.client("other-ca.pem", "gw-1")).await;
    let err = outcome.client.expect_err("client must refuse");
    assert!(err.to_lowercase().contains("unknownissuer"), "{err}");
    assert!(outcome.server.is_err());
}

#[tokio::test]
async fn a_server_with_a_certificate_from_another_ca_is_refused() {
    let pki = Pki::new();
    let server = tls::server_config(
        &pki.path("ca.pem"),
        &pki.path("other-hub.pem"),
        &pki.path("other-hub.key"),
    )
    .unwrap();
    let outcome = connect(server, pki.client("ca.pem", "gw-1")).await;
    assert!(outcome.client.is_err());
    assert!(outcome.server.is_err());
}

#[tokio::test]
async fn a_cn_that_is_not_an_agent_id_passes_tls_but_not_peer_agent_id() {
    let pki = Pki::new();
    let outcome = connect(pki.server(), pki.client("ca.pem", "bad-cn")).await;
    assert_eq!(outcome.client, Ok(()));
    let err = tls::peer_agent_id(&outcome.server.unwrap()).unwrap_err();
    assert!(matches!(err, TlsError::BadAgentId(_)), "{err:?}");
    assert!(err.to_string().contains("not a valid agent id"), "{err}");
}

#[test]
fn peer_agent_id_wants_exactly_one_cn() {
    let pki = Pki::new();
    let err = tls::peer_agent_id(&pki.cert("no-cn")).unwrap_err();
    assert!(matches!(err, TlsError::NoCommonName), "{err:?}");
    let err = tls::peer_agent_id(&pki.cert("two-cns")).unwrap_err();
    assert!(
        matches!(err, TlsError::SeveralCommonNames { count: 2 }),
        "{err:?}"
    );
    let err = tls::peer_agent_id(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])).unwrap_err();
    assert!(
        matches!(err, TlsError::BadPeerCertificate { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_tls12_only_client_is_refused() {
    let pki = Pki::new();
    let client = ClientConfig::builder_with_provider(ring())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots(&pki.path("ca.pem")))
        .with_client_auth_cert(
            tls::load_certs(&pki.path("gw-1.pem")).unwrap(),
            tls::load_key(&pki.path("gw-1.key")).unwrap(),
        )
        .unwrap();
    let outcome = connect(pki.server(), Arc::new(client)).await;
    let err = outcome.server.expect_err("server must refuse");
    assert!(err.contains("Tls12NotOfferedOrEnabled"), "{err}");
    assert!(outcome.client.is_err());
}

#[tokio::test]
async fn a_tls12_only_server_is_refused() {
    let pki = Pki::new();
    let server = ServerConfig::builder_with_provider(ring())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            tls::load_certs(&pki.path("hub.pem")).unwrap(),
            tls::load_key(&pki.path("hub.key")).unwrap(),
        )
        .unwrap();
    let outcome = connect(Arc::new(server), pki.client("ca.pem", "gw-1")).await;
    assert!(outcome.client.is_err());
    assert!(outcome.server.is_err());
}

#[test]
fn unusable_pem_files_are_named_and_explained() {
    let pki = Pki::new();
    let missing = pki.path("missing.pem");
    let err = tls::load_certs(&missing).unwrap_err();
    assert!(matches!(err, TlsError::Read { .. }), "{err:?}");
    assert!(err.to_string().contains("missing.pem"), "{err}");

    pki.write("empty.pem", "");
    let err = tls::load_certs(&pki.path("empty.pem")).unwrap_err();
    assert!(matches!(err, TlsError::NoCertificate { .. }), "{err:?}");
    assert!(err.to_string().contains("empty.pem"), "{err}");
    assert!(err.to_string().contains("the file is empty"), "{err}");
    let err = tls::load_key(&pki.path("empty.pem")).unwrap_err();
    assert!(matches!(err, TlsError::NoPrivateKey { .. }), "{err:?}");

    // A key given where a certificate belongs, and the other way round.
    let err = tls::load_certs(&pki.path("gw-1.key")).unwrap_err();
    assert!(matches!(err, TlsError::NoCertificate { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("gw-1.key"), "{message}");
    assert!(message.contains("PRIVATE KEY"), "{message}");
    let key_pem = std::fs::read_to_string(pki.path("gw-1.key")).unwrap();
    let key_line = key_pem.lines().nth(1).unwrap();
    assert!(!message.contains(key_line), "no key material: {message}");
    let err = tls::load_key(&pki.path("gw-1.pem")).unwrap_err();
    assert!(err.to_string().contains("CERTIFICATE"), "{err}");

    pki.write("der.pem", "\u{30}\u{82}garbage");
    let err = tls::load_certs(&pki.path("der.pem")).unwrap_err();
    assert!(err.to_string().contains("no PEM section"), "{err}");

    pki.write("cut.pem", "-----BEGIN CERTIFICATE-----\nMIIB\n");
    let err = tls::load_certs(&pki.path("cut.pem")).unwrap_err();
    assert!(matches!(err, TlsError::Pem { .. }), "{err:?}");
    assert!(err.to_string().contains("cut.pem"), "{err}");

    let two_keys = std::fs::read_to_string(pki.path("gw-1.key")).unwrap()
        + &std::fs::read_to_string(pki.path("gw-2.key")).unwrap();
    pki.write("two.key", &two_keys);
    let err = tls::load_key(&pki.path("two.key")).unwrap_err();
    assert!(
        matches!(err, TlsError::SeveralPrivateKeys { count: 2, .. }),
        "{err:?}"
    );
}

#[test]
fn configs_refuse_a_key_that_is_not_the_certificates() {
    let pki = Pki::new();
    let err = tls::server_config(
        &pki.path("ca.pem"),
        &pki.path("hub.pem"),
        &pki.path("gw-1.key"),
    )
    .unwrap_err();
    assert!(matches!(err, TlsError::CertifiedKey { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("hub.pem") && message.contains("gw-1.key"),
        "{message}"
    );

    let err = tls::client_config(
        &pki.path("ca.pem"),
        &pki.path("gw-1.pem"),
        &pki.path("gw-2.key"),
    )
    .unwrap_err();
    assert!(matches!(err, TlsError::CertifiedKey { .. }), "{err:?}");

    let err = tls::server_config(
        &pki.path("gw-1.key"),
        &pki.path("hub.pem"),
        &pki.path("hub.key"),
    )
    .unwrap_err();
    assert!(matches!(err, TlsError::NoCertificate { .. }), "{err:?}");
}
