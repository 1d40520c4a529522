//! `fieldsync-hub certs` end to end: the real binary writes the dev PKI into temp
//! dirs. Checks the files and their modes, the refusal to overwrite, the agent
//! identity and the hub's names in the certificates, and a real mutual-TLS
//! handshake with shared's `server_config`/`client_config`, which ties the PKI
//! to the TLS layer.

use std::ffi::OsStr;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use fieldsync_shared::tls;
use fieldsync_shared::AgentId;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use x509_parser::extensions::GeneralName;

fn hub<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fieldsync-hub"))
        .args(args)
        .output()
        .expect("the fieldsync-hub binary runs")
}

/// Runs `fieldsync-hub` and insists it succeeds.
fn hub_ok<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> String {
    let out = hub(args);
    assert!(
        out.status.success(),
        "fieldsync-hub failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `fieldsync-hub`, insists it fails, and returns its stderr.
fn hub_err<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> String {
    let out = hub(args);
    assert!(!out.status.success(), "fieldsync-hub should have failed");
    assert!(out.stdout.is_empty(), "nothing reported as written");
    String::from_utf8(out.stderr).unwrap()
}

fn init(out: &Path) {
    hub_ok([
        OsStr::new("certs"),
        "init".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
}

fn issue(ca_dir: &Path, agent: &str, out: &Path) {
    hub_ok([
        OsStr::new("certs"),
        "issue".as_ref(),
        "--ca-dir".as_ref(),
        ca_dir.as_os_str(),
        "--agent".as_ref(),
        agent.as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Every file in `dir` with its contents.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    file_names(dir)
        .into_iter()
        .map(|name| {
            let contents = fs::read(dir.join(&name)).unwrap();
            (name, contents)
        })
        .collect()
}

fn cert(path: &Path) -> CertificateDer<'static> {
    tls::load_certs(path).unwrap().remove(0)
}

#[test]
fn init_writes_the_ca_and_the_hub_certificate_with_private_keys_0600() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pki");
    let stdout = hub_ok([
        OsStr::new("certs"),
        "init".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);

    assert_eq!(file_names(&out), ["ca.key", "ca.pem", "hub.key", "hub.pem"]);
    for name in ["ca.pem", "ca.key", "hub.pem", "hub.key"] {
        assert!(
            stdout.contains(&out.join(name).display().to_string()),
            "{stdout}"
        );
    }
    assert_eq!(mode(&out.join("ca.key")), 0o600);
    assert_eq!(mode(&out.join("hub.key")), 0o600);
    for name in ["ca.pem", "hub.pem"] {
        assert_eq!(
            mode(&out.join(name)) & 0o022,
            0,
            "{name} writable by others"
        );
        assert_eq!(mode(&out.join(name)) & 0o444, 0o444, "{name} is public");
    }
    assert_eq!(mode(&out), 0o700, "a new directory is private");

    let ca = cert(&out.join("ca.pem"));
    let (_, ca) = x509_parser::parse_x509_certificate(&ca).unwrap();
    assert!(ca.is_ca());
    assert_eq!(common_names(&ca), ["Fieldsync dev CA"]);
    let hub_cert = cert(&out.join("hub.pem"));
    let (_, hub_cert) = x509_parser::parse_x509_certificate(&hub_cert).unwrap();
    assert!(!hub_cert.is_ca());
    assert_eq!(common_names(&hub_cert), ["fieldsync-hub"]);
    let eku = hub_cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && !eku.client_auth);
}

#[test]
fn init_refuses_to_overwrite_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pki");
    init(&out);
    let before = snapshot(&out);

    let stderr = hub_err([
        OsStr::new("certs"),
        "init".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    assert!(stderr.contains(&out.display().to_string()), "{stderr}");
    assert!(stderr.contains("--force"), "{stderr}");
    assert_eq!(snapshot(&out), before, "files unchanged");

    hub_ok([
        OsStr::new("certs"),
        "init".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
        "--force".as_ref(),
    ]);
    let after = snapshot(&out);
    assert_eq!(file_names(&out), ["ca.key", "ca.pem", "hub.key", "hub.pem"]);
    for ((name, old), (_, new)) in before.iter().zip(&after) {
        assert_ne!(old, new, "{name} replaced");
    }
    assert_eq!(mode(&out.join("ca.key")), 0o600);
    assert_eq!(mode(&out.join("hub.key")), 0o600);
}

#[test]
fn init_writes_nothing_when_any_one_file_exists() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("hub.pem"), "mine").unwrap();
    let stderr = hub_err([
        OsStr::new("certs"),
        "init".as_ref(),
        "--out".as_ref(),
        tmp.path().as_os_str(),
    ]);
    assert!(stderr.contains("hub.pem"), "{stderr}");
    assert_eq!(file_names(tmp.path()), ["hub.pem"]);
    assert_eq!(fs::read(tmp.path().join("hub.pem")).unwrap(), b"mine");
}

#[test]
fn issue_writes_an_agent_certificate_whose_cn_is_the_agent_id() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = tmp.path().join("pki");
    let agents = tmp.path().join("agents");
    init(&pki);
    issue(&pki, "gw-1", &agents);

    assert_eq!(file_names(&agents), ["gw-1.key", "gw-1.pem"]);
    assert_eq!(mode(&agents.join("gw-1.key")), 0o600);
    let agent_cert = cert(&agents.join("gw-1.pem"));
    assert_eq!(
        tls::peer_agent_id(&agent_cert).unwrap(),
        AgentId::new("gw-1").unwrap()
    );
    let (_, parsed) = x509_parser::parse_x509_certificate(&agent_cert).unwrap();
    let eku = parsed.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    assert!(!parsed.is_ca());

    // Issuing again is refused unless forced.
    let before = snapshot(&agents);
    let stderr = hub_err([
        OsStr::new("certs"),
        "issue".as_ref(),
        "--ca-dir".as_ref(),
        pki.as_os_str(),
        "--agent".as_ref(),
        "gw-1".as_ref(),
        "--out".as_ref(),
        agents.as_os_str(),
    ]);
    assert!(stderr.contains("gw-1."), "{stderr}");
    assert_eq!(snapshot(&agents), before);
}

#[test]
fn a_bad_agent_id_is_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = tmp.path().join("pki");
    init(&pki);
    let out = tmp.path().join("agents");
    let stderr = hub_err([
        OsStr::new("certs"),
        "issue".as_ref(),
        "--ca-dir".as_ref(),
        pki.as_os_str(),
        "--agent".as_ref(),
        "bad/id".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    assert!(stderr.contains("agent id \"bad/id\""), "{stderr}");
    assert!(stderr.contains("'/'"), "{stderr}");
    assert!(!out.exists());
    assert_eq!(file_names(&pki), ["ca.key", "ca.pem", "hub.key", "hub.pem"]);
}

#[test]
fn issue_never_replaces_the_pki_files_even_with_force() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = tmp.path().join("pki");
    init(&pki);
    let before = snapshot(&pki);
    for agent in ["ca", "hub"] {
        let stderr = hub_err([
            OsStr::new("certs"),
            "issue".as_ref(),
            "--ca-dir".as_ref(),
            pki.as_os_str(),
            "--agent".as_ref(),
            agent.as_ref(),
            "--out".as_ref(),
            pki.as_os_str(),
            "--force".as_ref(),
        ]);
        assert!(stderr.contains("would overwrite"), "{stderr}");
    }
    assert_eq!(snapshot(&pki), before);
}

#[test]
fn issue_without_a_ca_names_the_missing_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("agents");
    let stderr = hub_err([
        OsStr::new("certs"),
        "issue".as_ref(),
        "--ca-dir".as_ref(),
        tmp.path().as_os_str(),
        "--agent".as_ref(),
        "gw-1".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    assert!(
        stderr.contains(&tmp.path().join("ca.pem").display().to_string()),
        "{stderr}"
    );
    assert!(!out.exists());
}

#[test]
fn issue_checks_that_the_ca_files_are_a_ca_and_its_key() {
    use fieldsync_hub::pki::{self, OnExisting, PkiError};
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    pki::init(&one, &[], &[], OnExisting::Refuse).unwrap();
    pki::init(&two, &[], &[], OnExisting::Refuse).unwrap();
    let agent = AgentId::new("gw-1").unwrap();
    let out = tmp.path().join("agents");

    // The hub's certificate posing as the CA.
    let mixed = tmp.path().join("mixed");
    fs::create_dir(&mixed).unwrap();
    fs::copy(one.join("hub.pem"), mixed.join("ca.pem")).unwrap();
    fs::copy(one.join("hub.key"), mixed.join("ca.key")).unwrap();
    let err = pki::issue_agent(&mixed, &agent, &out, OnExisting::Refuse).unwrap_err();
    assert!(matches!(err, PkiError::NotACa { .. }), "{err:?}");

    // One CA's certificate with another CA's key.
    fs::copy(one.join("ca.pem"), mixed.join("ca.pem")).unwrap();
    fs::copy(two.join("ca.key"), mixed.join("ca.key")).unwrap();
    let err = pki::issue_agent(&mixed, &agent, &out, OnExisting::Refuse).unwrap_err();
    assert!(matches!(err, PkiError::CaKeyMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains("ca.key"), "{err}");

    // A certificate where the key belongs.
    fs::copy(one.join("ca.pem"), mixed.join("ca.key")).unwrap();
    let err = pki::issue_agent(&mixed, &agent, &out, OnExisting::Refuse).unwrap_err();
    assert!(matches!(err, PkiError::BadCaKey { .. }), "{err:?}");
    assert!(!out.exists(), "nothing written on any of these");
}

#[test]
fn extra_names_and_addresses_are_in_the_hub_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pki");
    hub_ok([
        OsStr::new("certs"),
        "init".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
        "--dns".as_ref(),
        "hub.example".as_ref(),
        "--ip".as_ref(),
        "10.1.2.3".as_ref(),
        "--dns".as_ref(),
        "localhost".as_ref(),
    ]);
    let der = cert(&out.join("hub.pem"));
    let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
    let sans = parsed.subject_alternative_name().unwrap().unwrap().value;
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    for name in &sans.general_names {
        match name {
            GeneralName::DNSName(n) => dns.push(n.to_string()),
            GeneralName::IPAddress(bytes) => ips.push(match bytes.len() {
                4 => IpAddr::from(<[u8; 4]>::try_from(*bytes).unwrap()),
                16 => IpAddr::from(<[u8; 16]>::try_from(*bytes).unwrap()),
                n => panic!("an IP address of {n} bytes"),
            }),
            other => panic!("unexpected SAN {other:?}"),
        }
    }
    assert_eq!(dns, ["localhost", "hub.example"], "each name once");
    assert_eq!(
        ips,
        [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            "10.1.2.3".parse::<IpAddr>().unwrap(),
        ]
    );
}

#[test]
fn an_ip_address_given_as_a_dns_name_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pki");
    let stderr = hub_err([
        OsStr::new("certs"),
        "init".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
        "--dns".as_ref(),
        "10.1.2.3".as_ref(),
    ]);
    assert!(stderr.contains("--ip"), "{stderr}");
    assert!(!out.exists());
}

#[tokio::test]
async fn an_issued_agent_and_the_hub_complete_a_mutual_tls_handshake() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = tmp.path().join("pki");
    init(&pki);
    issue(&pki, "gw-1", &tmp.path().join("agents"));
    let server = tls::server_config(
        &pki.join("ca.pem"),
        &pki.join("hub.pem"),
        &pki.join("hub.key"),
    )
    .unwrap();
    let client = tls::client_config(
        &pki.join("ca.pem"),
        &tmp.path().join("agents/gw-1.pem"),
        &tmp.path().join("agents/gw-1.key"),
    )
    .unwrap();

    for server_name in ["localhost", "127.0.0.1"] {
        let peer = handshake(server.clone(), client.clone(), server_name)
            .await
            .unwrap_or_else(|e| panic!("handshake as {server_name}: {e}"));
        assert_eq!(
            tls::peer_agent_id(&peer).unwrap(),
            AgentId::new("gw-1").unwrap()
        );
    }

    // An agent of another dev PKI is not let in.
    let other = tmp.path().join("other");
    init(&other);
    issue(&other, "gw-1", &other);
    let stranger = tls::client_config(
        &pki.join("ca.pem"),
        &other.join("gw-1.pem"),
        &other.join("gw-1.key"),
    )
    .unwrap();
    // Both dev CAs have the same subject, so the server finds "its" issuer and
    // the signature check is what fails.
    let err = handshake(server, stranger, "localhost").await.unwrap_err();
    assert!(err.contains("invalid peer certificate"), "{err}");
}

/// One TLS connection over loopback, then a byte each way. Returns the client
/// certificate the server saw, or the server's error (else the client's).
async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    server_name: &str,
) -> Result<CertificateDer<'static>, String> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
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
        let first = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first());
        Ok::<_, String>(first.ok_or("no client certificate")?.clone().into_owned())
    };
    let dial = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
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
    // A guard against a hung test, not synchronisation: each side drops its
    // socket when it fails, which ends the other.
    let (served, dialled) =
        tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(serve, dial) })
            .await
            .expect("the connection neither completed nor failed");
    let peer = served?;
    dialled?;
    Ok(peer)
}

fn common_names(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    cert.subject()
        .iter_common_name()
        .map(|cn| cn.as_str().unwrap().to_owned())
        .collect()
}
