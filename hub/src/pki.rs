//! The development PKI behind `fieldsync-hub certs`: a fleet CA, the hub's
//! server certificate and one client certificate per agent, made with rcgen
//! (ECDSA P-256 keys, ring). A production fleet uses its own CA with the same
//! rules: an agent's certificate has its agent id as the subject CN and the
//! clientAuth purpose; the hub's has serverAuth and the names agents dial.
//!
//! Private keys are created with mode 0600 (never widened, never chmod-ed after
//! writing), certificates with 0644, new directories with 0700. An existing file
//! is never replaced unless the caller asks for [`OnExisting::Overwrite`].

use std::collections::HashSet;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use fieldsync_shared::AgentId;
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, DnsName};
use time::{Duration, OffsetDateTime};

/// The CA certificate's file name in a PKI directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA private key's file name in a PKI directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// The hub certificate's file name in a PKI directory.
pub const HUB_CERT_FILE: &str = "hub.pem";
/// The hub private key's file name in a PKI directory.
pub const HUB_KEY_FILE: &str = "hub.key";

/// The dev CA's subject common name.
pub const CA_COMMON_NAME: &str = "Fieldsync dev CA";
/// The hub certificate's subject common name.
pub const HUB_COMMON_NAME: &str = "fieldsync-hub";

/// The names every hub certificate carries, so agents on the same machine
/// (tests, development) can reach it.
pub const HUB_DEFAULT_DNS: &str = "localhost";
/// The addresses every hub certificate carries.
pub const HUB_DEFAULT_IPS: [IpAddr; 2] = [
    IpAddr::V4(Ipv4Addr::LOCALHOST),
    IpAddr::V6(Ipv6Addr::LOCALHOST),
];

const CA_VALIDITY: Duration = Duration::days(3650);
const HUB_VALIDITY: Duration = Duration::days(730);
const AGENT_VALIDITY: Duration = Duration::days(365);
/// Certificates start being valid this long before they are made, so a peer
/// whose clock is a little behind accepts them at once.
const BACKDATE: Duration = Duration::hours(1);

const KEY_MODE: u32 = 0o600;
const CERT_MODE: u32 = 0o644;
const DIR_MODE: u32 = 0o700;

/// What to do when an output file already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExisting {
    /// Write nothing and fail, naming the file.
    Refuse,
    /// Replace it (the old file is removed and a new one created with the
    /// right mode).
    Overwrite,
}

/// A certificate and its private key, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What [`init`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitFiles {
    pub ca: CertFiles,
    pub hub: CertFiles,
}

/// Why the dev PKI could not be made or used. Errors about files name the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    #[error("refusing to overwrite {}: it already exists (use --force to replace it)", .path.display())]
    Exists { path: PathBuf },
    #[error("cannot create the directory {}: {source}", .path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a usable CA certificate: {reason}", .path.display())]
    BadCaCertificate { path: PathBuf, reason: String },
    #[error("{} is not a CA certificate (basic constraints do not say CA)", .path.display())]
    NotACa { path: PathBuf },
    #[error("{} has expired or is not yet valid (valid {not_before} to {not_after})", .path.display())]
    CaNotValidNow {
        path: PathBuf,
        not_before: String,
        not_after: String,
    },
    #[error("{} is not a usable PEM private key: {source}", .path.display())]
    BadCaKey {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("the key in {} does not belong to the certificate in {}", .key.display(), .cert.display())]
    CaKeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{name:?} is not a valid DNS name for the hub certificate: {reason}")]
    BadDnsName { name: String, reason: String },
    #[error(
        "agent id {agent:?} would overwrite the PKI's own files in {}; issue it into another directory",
        .dir.display()
    )]
    ReservedName { agent: String, dir: PathBuf },
    #[error("cannot make the {what}: {source}")]
    Generate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
}

/// Makes a dev CA (`ca.pem`, `ca.key`) and a hub server certificate signed by it
/// (`hub.pem`, `hub.key`) in `out`, which is created if missing.
///
/// The hub certificate is for `localhost`, `127.0.0.1` and `::1` plus the extra
/// `dns` names and `ips`. With [`OnExisting::Refuse`], nothing is written if any
/// of the four files exists.
pub fn init(
    out: &Path,
    dns: &[String],
    ips: &[IpAddr],
    on_existing: OnExisting,
) -> Result<InitFiles, PkiError> {
    let now = OffsetDateTime::now_utc();
    let sans = hub_sans(dns, ips)?;

    let ca_key = new_key("CA key")?;
    let mut ca_params = params(CA_COMMON_NAME, now, CA_VALIDITY);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|source| PkiError::Generate {
            what: "CA certificate",
            source,
        })?;
    let issuer = Issuer::new(ca_params, ca_key);

    let hub_key = new_key("hub key")?;
    let mut hub_params = leaf_params(HUB_COMMON_NAME, now, HUB_VALIDITY);
    hub_params.subject_alt_names = sans;
    hub_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let hub_cert =
        hub_params
            .signed_by(&hub_key, &issuer)
            .map_err(|source| PkiError::Generate {
                what: "hub certificate",
                source,
            })?;

    let files = InitFiles {
        ca: CertFiles {
            cert: out.join(CA_CERT_FILE),
            key: out.join(CA_KEY_FILE),
        },
        hub: CertFiles {
            cert: out.join(HUB_CERT_FILE),
            key: out.join(HUB_KEY_FILE),
        },
    };
    write_files(
        out,
        &[
            Output::key(&files.ca.key, issuer.key().serialize_pem()),
            Output::cert(&files.ca.cert, ca_cert.pem()),
            Output::key(&files.hub.key, hub_key.serialize_pem()),
            Output::cert(&files.hub.cert, hub_cert.pem()),
        ],
        on_existing,
    )?;
    Ok(files)
}

/// Issues a client certificate for `agent` (subject CN = the agent id, purpose
/// clientAuth) signed by the CA in `ca_dir` (`ca.pem`, `ca.key`), and writes
/// `ID.pem` and `ID.key` into `out`, which is created if missing.
pub fn issue_agent(
    ca_dir: &Path,
    agent: &AgentId,
    out: &Path,
    on_existing: OnExisting,
) -> Result<CertFiles, PkiError> {
    let reserved = [CA_CERT_FILE, CA_KEY_FILE, HUB_CERT_FILE, HUB_KEY_FILE];
    let files = CertFiles {
        cert: out.join(format!("{agent}.pem")),
        key: out.join(format!("{agent}.key")),
    };
    let clashes = [&files.cert, &files.key]
        .iter()
        .any(|path| reserved.iter().any(|name| path.ends_with(name)));
    if clashes && same_dir(out, ca_dir) {
        return Err(PkiError::ReservedName {
            agent: agent.to_string(),
            dir: out.to_owned(),
        });
    }

    let issuer = load_issuer(ca_dir)?;
    let now = OffsetDateTime::now_utc();
    let key = new_key("agent key")?;
    let mut params = leaf_params(agent.as_str(), now, AGENT_VALIDITY);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|source| PkiError::Generate {
            what: "agent certificate",
            source,
        })?;

    write_files(
        out,
        &[
            Output::key(&files.key, key.serialize_pem()),
            Output::cert(&files.cert, cert.pem()),
        ],
        on_existing,
    )?;
    Ok(files)
}

/// The CA in `ca_dir`, checked: its certificate is a CA that is valid now and
/// its key is the certificate's key.
fn load_issuer(ca_dir: &Path) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let cert_path = ca_dir.join(CA_CERT_FILE);
    let key_path = ca_dir.join(CA_KEY_FILE);
    let cert_pem = read_to_string(&cert_path)?;
    let key_pem = read_to_string(&key_path)?;
    let bad_cert = |path: &Path, reason: String| PkiError::BadCaCertificate {
        path: path.to_owned(),
        reason,
    };

    let der = pem_certificate(&cert_pem)
        .ok_or_else(|| bad_cert(&cert_path, "it holds no PEM certificate".to_owned()))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| bad_cert(&cert_path, e.to_string()))?;
    if !parsed.is_ca() {
        return Err(PkiError::NotACa { path: cert_path });
    }
    let validity = parsed.validity();
    if !validity.is_valid() {
        return Err(PkiError::CaNotValidNow {
            path: cert_path,
            not_before: validity.not_before.to_string(),
            not_after: validity.not_after.to_string(),
        });
    }

    let key = KeyPair::from_pem(&key_pem).map_err(|source| PkiError::BadCaKey {
        path: key_path.clone(),
        source,
    })?;
    if parsed.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
        return Err(PkiError::CaKeyMismatch {
            cert: cert_path,
            key: key_path,
        });
    }
    Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| bad_cert(&cert_path, e.to_string()))
}

/// The DER of the first certificate in a PEM text.
fn pem_certificate(pem: &str) -> Option<Vec<u8>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()
        .map(|der| der.to_vec())
}

/// The hub's subject alternative names: the defaults, then the extras, each once.
fn hub_sans(dns: &[String], ips: &[IpAddr]) -> Result<Vec<SanType>, PkiError> {
    let mut sans = Vec::new();
    let mut seen_dns = HashSet::new();
    for name in std::iter::once(HUB_DEFAULT_DNS).chain(dns.iter().map(String::as_str)) {
        if name.parse::<IpAddr>().is_ok() {
            return Err(PkiError::BadDnsName {
                name: name.to_owned(),
                reason: "it is an IP address; pass it with --ip".to_owned(),
            });
        }
        DnsName::try_from(name).map_err(|e| PkiError::BadDnsName {
            name: name.to_owned(),
            reason: e.to_string(),
        })?;
        if seen_dns.insert(name.to_ascii_lowercase()) {
            let ia5 = Ia5String::try_from(name).map_err(|e| PkiError::BadDnsName {
                name: name.to_owned(),
                reason: e.to_string(),
            })?;
            sans.push(SanType::DnsName(ia5));
        }
    }
    let mut seen_ips = HashSet::new();
    for ip in HUB_DEFAULT_IPS.iter().chain(ips) {
        if seen_ips.insert(*ip) {
            sans.push(SanType::IpAddress(*ip));
        }
    }
    Ok(sans)
}

fn new_key(what: &'static str) -> Result<KeyPair, PkiError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|source| PkiError::Generate { what, source })
}

/// Parameters with a subject CN and a validity window starting [`BACKDATE`]
/// before `now`. Serial numbers are rcgen's: derived from the (fresh) subject key.
fn params(common_name: &str, now: OffsetDateTime, validity: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    params.not_before = now - BACKDATE;
    params.not_after = now + validity;
    params
}

/// Parameters for an end-entity certificate signed by the CA.
fn leaf_params(common_name: &str, now: OffsetDateTime, validity: Duration) -> CertificateParams {
    let mut params = params(common_name, now, validity);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    params
}

fn read_to_string(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Whether `a` and `b` are the same existing directory.
fn same_dir(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// One file to write, with its mode.
struct Output<'a> {
    path: &'a Path,
    contents: String,
    mode: u32,
}

impl<'a> Output<'a> {
    fn key(path: &'a Path, contents: String) -> Self {
        Self {
            path,
            contents,
            mode: KEY_MODE,
        }
    }

    fn cert(path: &'a Path, contents: String) -> Self {
        Self {
            path,
            contents,
            mode: CERT_MODE,
        }
    }
}

/// Creates `dir` (0700 if new) and writes `outputs` into it. With
/// [`OnExisting::Refuse`] every file is checked first, so a refusal writes
/// nothing. Each file is created new with its final mode, so a key is never
/// readable by others, not even for a moment.
fn write_files(
    dir: &Path,
    outputs: &[Output<'_>],
    on_existing: OnExisting,
) -> Result<(), PkiError> {
    if on_existing == OnExisting::Refuse {
        if let Some(existing) = outputs.iter().find(|o| o.path.symlink_metadata().is_ok()) {
            return Err(PkiError::Exists {
                path: existing.path.to_owned(),
            });
        }
    }
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|source| PkiError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
    for output in outputs {
        let write_error = |source| PkiError::Write {
            path: output.path.to_owned(),
            source,
        };
        if on_existing == OnExisting::Overwrite {
            match fs::remove_file(output.path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(write_error(e)),
                _ => {}
            }
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(output.mode)
            .open(output.path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => PkiError::Exists {
                    path: output.path.to_owned(),
                },
                _ => write_error(e),
            })?;
        file.write_all(output.contents.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(write_error)?;
    }
    Ok(())
}
