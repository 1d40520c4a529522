//! TLS for the agent–hub link: loading PEM files, building the mutually
//! authenticated rustls configurations (TLS 1.3 only, ring provider only) and
//! reading an agent's identity from its certificate. Plain rustls, no sockets and
//! no runtime: the agent and the hub wrap these configurations in their own
//! connectors and acceptors. The only I/O here is reading the PEM files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{VerifierBuilderError, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::id::{AgentId, IdError};

/// Why a PEM file, a TLS configuration or a peer's identity was refused. Errors
/// about files name the file; none of them contains key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not valid PEM: {source}", .path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("{} holds no PEM certificate ({found})", .path.display())]
    NoCertificate { path: PathBuf, found: String },
    #[error("{} holds no PEM private key ({found})", .path.display())]
    NoPrivateKey { path: PathBuf, found: String },
    #[error("{} holds {count} private keys; expected exactly one", .path.display())]
    SeveralPrivateKeys { path: PathBuf, count: usize },
    #[error("a certificate in {} cannot be used as a trusted CA: {source}", .path.display())]
    BadCaCertificate {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot verify client certificates with the CA in {}: {source}", .path.display())]
    ClientVerifier {
        path: PathBuf,
        #[source]
        source: VerifierBuilderError,
    },
    #[error(
        "cannot use the certificate {} with the key {}: {source}",
        .cert.display(),
        .key.display()
    )]
    CertifiedKey {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("rustls refused the TLS 1.3 configuration: {0}")]
    Config(#[source] rustls::Error),
    #[error("the peer certificate is not valid X.509: {reason}")]
    BadPeerCertificate { reason: String },
    #[error("the peer certificate's subject has no common name (CN); it must be the agent id")]
    NoCommonName,
    #[error("the peer certificate's subject has {count} common names (CN); expected exactly one, the agent id")]
    SeveralCommonNames { count: usize },
    #[error("the peer certificate's common name (CN) is not a text string")]
    CommonNameNotText,
    #[error("the peer certificate's common name (CN) is not a valid agent id: {0}")]
    BadAgentId(#[source] IdError),
}

/// Reads every certificate from the PEM file at `path`, in file order (leaf
/// first for a chain). Other PEM sections are skipped; a file with no
/// certificate is an error that says what the file holds instead.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file = PemFile::read(path)?;
    let certs: Vec<_> = file
        .sections
        .iter()
        .filter(|(kind, _)| *kind == SectionKind::Certificate)
        .map(|(_, der)| CertificateDer::from(der.clone()))
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
            found: file.describe(),
        });
    }
    Ok(certs)
}

/// Reads the one private key (PKCS#8, PKCS#1 or SEC1) from the PEM file at
/// `path`. A file with no key, or with several, is an error.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let file = PemFile::read(path)?;
    let mut keys: Vec<_> = file
        .sections
        .iter()
        .filter_map(|(kind, der)| PrivateKeyDer::from_pem(*kind, der.clone()))
        .collect();
    match keys.len() {
        0 => Err(TlsError::NoPrivateKey {
            path: path.to_owned(),
            found: file.describe(),
        }),
        1 => Ok(keys.remove(0)),
        count => Err(TlsError::SeveralPrivateKeys {
            path: path.to_owned(),
            count,
        }),
    }
}

/// The TLS configuration of the hub's MQTT listener.
///
/// TLS 1.3 only, ring provider. Every client must present a certificate that
/// chains to a CA in `ca` (one or more PEM certificates); `cert` (leaf first,
/// then any intermediates) and `key` are the hub's own identity. The agent id is
/// then read from the verified certificate with [`peer_agent_id`].
///
/// Revocation is not checked yet: the hardening issue will add CRL files here
/// (`WebPkiClientVerifier`'s builder takes them with `with_crls`).
pub fn server_config(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = ring_provider();
    let roots = Arc::new(root_store(ca)?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|source| TlsError::ClientVerifier {
            path: ca.to_owned(),
            source,
        })?;
    let (chain, private_key) = (load_certs(cert)?, load_key(key)?);
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, private_key)
        .map_err(|source| TlsError::CertifiedKey {
            cert: cert.to_owned(),
            key: key.to_owned(),
            source,
        })?;
    Ok(Arc::new(config))
}

/// The TLS configuration of an agent connecting to the hub.
///
/// TLS 1.3 only, ring provider. The hub's certificate must chain to a CA in
/// `ca` and match the server name the caller connects with; the agent presents
/// `cert` (its CN is its agent id) and proves it holds `key`.
pub fn client_config(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = ring_provider();
    let roots = root_store(ca)?;
    let (chain, private_key) = (load_certs(cert)?, load_key(key)?);
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, private_key)
        .map_err(|source| TlsError::CertifiedKey {
            cert: cert.to_owned(),
            key: key.to_owned(),
            source,
        })?;
    Ok(Arc::new(config))
}

/// What a verified peer certificate says about its agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate {
    /// The agent id ([`peer_agent_id`]).
    pub agent: AgentId,
    /// The serial number, lowercase hex without separators.
    pub serial: String,
    /// The end of the validity period, seconds since the Unix epoch.
    pub not_after_s: i64,
}

/// The agent id a certificate stands for: its subject's common name, which must
/// occur exactly once, be a text string and be a valid [`AgentId`].
///
/// This only reads the certificate; call it on a certificate that the TLS
/// handshake has already verified (the first of the peer's certificates).
pub fn peer_agent_id(cert: &CertificateDer<'_>) -> Result<AgentId, TlsError> {
    peer_certificate(cert).map(|c| c.agent)
}

/// [`peer_agent_id`] with the certificate's serial number and expiry.
pub fn peer_certificate(cert: &CertificateDer<'_>) -> Result<PeerCertificate, TlsError> {
    let (rest, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| {
        TlsError::BadPeerCertificate {
            reason: e.to_string(),
        }
    })?;
    if !rest.is_empty() {
        return Err(TlsError::BadPeerCertificate {
            reason: format!("{} bytes follow the certificate", rest.len()),
        });
    }
    let names: Vec<_> = parsed.subject().iter_common_name().collect();
    let name = match names.as_slice() {
        [] => return Err(TlsError::NoCommonName),
        [one] => one,
        several => {
            return Err(TlsError::SeveralCommonNames {
                count: several.len(),
            })
        }
    };
    let text = name.as_str().map_err(|_| TlsError::CommonNameNotText)?;
    let agent = AgentId::new(text).map_err(TlsError::BadAgentId)?;
    let serial = parsed
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(PeerCertificate {
        agent,
        serial,
        not_after_s: parsed.validity().not_after.timestamp(),
    })
}

/// The one crypto provider Fieldsync uses (see ARCHITECTURE.md: ring, never
/// aws-lc-rs).
fn ring_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The trust anchors in the PEM file `ca`.
fn root_store(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots
            .add(cert)
            .map_err(|source| TlsError::BadCaCertificate {
                path: ca.to_owned(),
                source,
            })?;
    }
    Ok(roots)
}

/// The PEM sections of one file, with the labels of all its sections (also
/// those rustls skips) to say what a file holds when it lacks what was asked for.
struct PemFile {
    empty: bool,
    labels: Vec<String>,
    sections: Vec<(SectionKind, Vec<u8>)>,
}

impl PemFile {
    fn read(path: &Path) -> Result<Self, TlsError> {
        let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })?;
        let sections = <(SectionKind, Vec<u8>)>::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TlsError::Pem {
                path: path.to_owned(),
                source,
            })?;
        let labels = bytes
            .split(|b| *b == b'\n')
            .filter_map(|line| line.trim_ascii().strip_prefix(b"-----BEGIN "))
            .filter_map(|rest| rest.strip_suffix(b"-----"))
            .map(|label| String::from_utf8_lossy(label).into_owned())
            .collect();
        Ok(Self {
            empty: bytes.trim_ascii().is_empty(),
            labels,
            sections,
        })
    }

    /// What the file holds, in words: "the file is empty", "it holds: CERTIFICATE".
    fn describe(&self) -> String {
        if self.empty {
            return "the file is empty".to_owned();
        }
        if self.labels.is_empty() {
            return "it holds no PEM section; a DER file must be converted to PEM".to_owned();
        }
        let mut found = format!("it holds: {}", self.labels.join(", "));
        if self.labels.iter().any(|l| l == "ENCRYPTED PRIVATE KEY") {
            found.push_str("; encrypted private keys are not supported");
        }
        found
    }
}
