//! The agent's configuration: a TOML file, overridden by `FIELDSYNC__SECTION__KEY`
//! environment variables, validated once at start into [`AgentConfig`]. Every
//! error names the key at fault. Relative paths resolve against the folder that
//! holds the config file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fieldsync_shared::files::{existing_file, resolve};
use fieldsync_shared::history;
use fieldsync_shared::logging::LogFormat;
use fieldsync_shared::{AgentId, Policy, PolicyError};
use serde::Deserialize;

/// Default address of the local HTTP API.
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:7070";
/// Default limit on an HTTP request body.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;
/// Environment variables starting with this prefix override the file.
pub const ENV_PREFIX: &str = "FIELDSYNC";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config {path}: {message}")]
    Load { path: String, message: String },
    #[error("config {path}: {key}: {message}")]
    Invalid {
        path: String,
        key: &'static str,
        message: String,
    },
    #[error("config {path}: policy.file: {source}")]
    Policy { path: String, source: PolicyError },
}

/// The config file as written: every key the agent reads, unvalidated.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    agent: RawAgent,
    hub: Option<RawHub>,
    #[serde(default)]
    api: RawApi,
    policy: RawPolicy,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    history: history::HistorySection,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    /// This agent's id; the CN of its certificate.
    id: String,
    /// Folder for the agent's redb store.
    data_dir: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHub {
    /// `mqtts://host:port` of the hub's MQTT front door.
    url: String,
    /// PEM file of the fleet CA that signed the hub's certificate.
    ca: String,
    /// PEM file of this agent's certificate.
    cert: String,
    /// PEM file of this agent's private key.
    key: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    /// Address of the local HTTP API; loopback only.
    listen: Option<String>,
    /// Largest accepted request body, in bytes.
    max_body_bytes: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    /// How log lines are written: `text` (default) or `json`.
    format: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    /// The policy file: which collections and fields may leave the device.
    file: String,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This agent's id (`[agent] id`).
    pub id: AgentId,
    /// Folder of the redb store (`[agent] data_dir`).
    pub data_dir: PathBuf,
    /// The hub link (`[hub]`); without it the agent runs local-only.
    pub hub: Option<HubConfig>,
    /// The local HTTP API (`[api]`).
    pub api: ApiConfig,
    /// Path of the policy file (`[policy] file`).
    pub policy_file: PathBuf,
    /// The parsed policy.
    pub policy: Policy,
    /// How log lines are written (`[log] format`).
    pub log: LogFormat,
    /// Bytes of version history the store keeps (`[history] max_bytes`).
    pub history_max_bytes: u64,
}

/// Where and how to reach the hub.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub host: String,
    pub port: u16,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The local HTTP API's settings.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
}

impl AgentConfig {
    /// Loads `path`, applies environment overrides and validates everything,
    /// including the policy file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let env = config::Environment::with_prefix(ENV_PREFIX).separator("__");
        Self::load_with_env(path, env)
    }

    fn load_with_env(path: &Path, env: config::Environment) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let load_err = |message: String| ConfigError::Load {
            path: shown.clone(),
            message,
        };
        if !path.is_file() {
            return Err(load_err("no such file".into()));
        }
        let raw: RawConfig = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(env)
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| load_err(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::validate(raw, base, &shown)
    }

    fn validate(raw: RawConfig, base: &Path, shown: &str) -> Result<Self, ConfigError> {
        let invalid = |key: &'static str, message: String| ConfigError::Invalid {
            path: shown.to_owned(),
            key,
            message,
        };
        let id = AgentId::new(raw.agent.id).map_err(|e| invalid("agent.id", e.to_string()))?;
        let data_dir = resolve(base, &raw.agent.data_dir)
            .ok_or_else(|| invalid("agent.data_dir", "must not be empty".into()))?;

        let hub = match raw.hub {
            None => None,
            Some(h) => {
                let (host, port) = parse_hub_url(&h.url).map_err(|m| invalid("hub.url", m))?;
                Some(HubConfig {
                    host,
                    port,
                    ca: existing_file(base, &h.ca).map_err(|m| invalid("hub.ca", m))?,
                    cert: existing_file(base, &h.cert).map_err(|m| invalid("hub.cert", m))?,
                    key: existing_file(base, &h.key).map_err(|m| invalid("hub.key", m))?,
                })
            }
        };

        let listen_text = raw.api.listen.as_deref().unwrap_or(DEFAULT_API_LISTEN);
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            invalid(
                "api.listen",
                format!(
                    "{listen_text:?} is not an IP address and port such as {DEFAULT_API_LISTEN}"
                ),
            )
        })?;
        if !listen.ip().is_loopback() {
            return Err(invalid(
                "api.listen",
                format!(
                    "{listen} is not a loopback address; the local API has no authentication \
                     and listens on 127.0.0.1 or ::1 only"
                ),
            ));
        }
        let max_body_bytes = raw.api.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
        if !(1024..=64 << 20).contains(&max_body_bytes) {
            return Err(invalid(
                "api.max_body_bytes",
                format!("{max_body_bytes} is outside 1024..=67108864"),
            ));
        }

        let policy_file =
            existing_file(base, &raw.policy.file).map_err(|m| invalid("policy.file", m))?;
        let policy = Policy::load(&policy_file).map_err(|source| ConfigError::Policy {
            path: shown.to_owned(),
            source,
        })?;
        let log = match raw.log.format.as_deref() {
            None => LogFormat::default(),
            Some(text) => LogFormat::parse(text).map_err(|m| invalid("log.format", m))?,
        };
        let history_max_bytes = raw
            .history
            .max_bytes(history::DEFAULT_AGENT_MAX_BYTES)
            .map_err(|m| invalid("history.max_bytes", m))?;

        Ok(Self {
            history_max_bytes,
            id,
            data_dir,
            hub,
            api: ApiConfig {
                listen,
                max_body_bytes,
            },
            policy_file,
            policy,
            log,
        })
    }
}

/// Parses `mqtts://host[:port]` (port 8883 by default). Plain `mqtt://` is refused:
/// the link is always TLS.
fn parse_hub_url(url: &str) -> Result<(String, u16), String> {
    let Some(rest) = url.strip_prefix("mqtts://") else {
        return Err(format!(
            "{url:?} must start with mqtts:// (the hub link always uses TLS)"
        ));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => {
            let port = port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{url:?} has an invalid port {port:?}"))?;
            (host, port)
        }
        _ => (rest, 8883),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(['/', '@', '?', '#', ' ']) {
        return Err(format!("{url:?} has no valid host"));
    }
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    const POLICY: &str = "[collections.patients]\ndirection = \"up\"\nsync = [\"ward\"]\n";

    fn setup(config: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "policy.toml", POLICY);
        let path = write(dir.path(), "agent.toml", config);
        (dir, path)
    }

    fn no_env() -> config::Environment {
        config::Environment::with_prefix("FIELDSYNC_TEST_UNUSED").separator("__")
    }

    const GOOD: &str =
        "[agent]\nid = \"gw-1\"\ndata_dir = \"data\"\n[policy]\nfile = \"policy.toml\"\n";

    #[test]
    fn minimal_config_gets_defaults_and_resolves_paths() {
        let (dir, path) = setup(GOOD);
        let c = AgentConfig::load_with_env(&path, no_env()).unwrap();
        assert_eq!(c.id.as_str(), "gw-1");
        assert_eq!(c.data_dir, dir.path().join("data"));
        assert_eq!(c.api.listen, DEFAULT_API_LISTEN.parse().unwrap());
        assert!(c.hub.is_none());
        assert_eq!(c.policy_file, dir.path().join("policy.toml"));
    }

    #[test]
    fn environment_overrides_the_file() {
        let (_dir, path) = setup(GOOD);
        let vars = [
            (
                "FIELDSYNC__API__LISTEN".to_owned(),
                "127.0.0.1:9999".to_owned(),
            ),
            ("FIELDSYNC__AGENT__ID".to_owned(), "gw-2".to_owned()),
        ];
        let env = config::Environment::with_prefix(ENV_PREFIX)
            .separator("__")
            .source(Some(vars.into_iter().collect()));
        let c = AgentConfig::load_with_env(&path, env).unwrap();
        assert_eq!(c.api.listen.port(), 9999);
        assert_eq!(c.id.as_str(), "gw-2");
    }

    #[test]
    fn the_log_format_comes_from_the_file_or_the_environment() {
        let (_dir, path) = setup(GOOD);
        let c = AgentConfig::load_with_env(&path, no_env()).unwrap();
        assert_eq!(c.log, LogFormat::Text);
        let (_dir, path) = setup(&format!("{GOOD}[log]\nformat = \"json\"\n"));
        let c = AgentConfig::load_with_env(&path, no_env()).unwrap();
        assert_eq!(c.log, LogFormat::Json);
        // The documented override, through the same FIELDSYNC__SECTION__KEY
        // mechanism as every other key; it beats the file.
        let (_dir, path) = setup(&format!("{GOOD}[log]\nformat = \"text\"\n"));
        let vars = [("FIELDSYNC__LOG__FORMAT".to_owned(), "json".to_owned())];
        let env = config::Environment::with_prefix(ENV_PREFIX)
            .separator("__")
            .source(Some(vars.into_iter().collect()));
        let c = AgentConfig::load_with_env(&path, env).unwrap();
        assert_eq!(c.log, LogFormat::Json);
    }

    fn error_of(config: &str) -> String {
        let (_dir, path) = setup(config);
        AgentConfig::load_with_env(&path, no_env())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn every_bad_key_is_named() {
        let cases = [
            (GOOD.replace("gw-1", "gw/1"), "agent.id"),
            (GOOD.replace("\"data\"", "\"\""), "agent.data_dir"),
            (GOOD.replace("policy.toml", "missing.toml"), "policy.file"),
            (format!("{GOOD}[api]\nlisten = \"0.0.0.0:7070\"\n"), "api.listen"),
            (format!("{GOOD}[api]\nlisten = \"localhost\"\n"), "api.listen"),
            (format!("{GOOD}[api]\nmax_body_bytes = 1\n"), "api.max_body_bytes"),
            (format!("{GOOD}[log]\nformat = \"xml\"\n"), "log.format"),
            (format!("{GOOD}[history]\nmax_bytes = 1000\n"), "history.max_bytes: 1000 is below"),
            (format!("{GOOD}[log]\nlevel = \"debug\"\n"), "level"),
            (
                format!("{GOOD}[hub]\nurl = \"mqtt://h:1883\"\nca = \"policy.toml\"\ncert = \"policy.toml\"\nkey = \"policy.toml\"\n"),
                "hub.url",
            ),
            (
                format!("{GOOD}[hub]\nurl = \"mqtts://h\"\nca = \"nope.pem\"\ncert = \"policy.toml\"\nkey = \"policy.toml\"\n"),
                "hub.ca",
            ),
        ];
        for (config, key) in cases {
            let e = error_of(&config);
            assert!(e.contains(key), "expected {key} in {e:?}");
        }
    }

    #[test]
    fn unknown_and_missing_keys_are_rejected() {
        let e = error_of(&format!("{GOOD}[agent2]\nx = 1\n"));
        assert!(e.contains("agent2"), "{e}");
        let e = error_of(&GOOD.replace("data_dir", "datadir"));
        assert!(e.contains("datadir") || e.contains("data_dir"), "{e}");
        let e = error_of("[policy]\nfile = \"policy.toml\"\n");
        assert!(e.contains("agent"), "{e}");
        let e = error_of("[agent\n");
        assert!(e.contains("agent.toml"), "{e}");
    }

    #[test]
    fn a_bad_policy_is_reported_through_the_config() {
        let (dir, path) = setup(GOOD);
        write(
            dir.path(),
            "policy.toml",
            "[collections.p]\ndirection = \"up\"\nsync = [1]\n",
        );
        let e = AgentConfig::load_with_env(&path, no_env())
            .unwrap_err()
            .to_string();
        assert!(e.contains("policy.file") && e.contains("sync"), "{e}");
    }

    #[test]
    fn hub_urls() {
        assert_eq!(
            parse_hub_url("mqtts://hub.example:8884"),
            Ok(("hub.example".into(), 8884))
        );
        assert_eq!(
            parse_hub_url("mqtts://10.0.0.1"),
            Ok(("10.0.0.1".into(), 8883))
        );
        assert_eq!(parse_hub_url("mqtts://[::1]:9"), Ok(("::1".into(), 9)));
        assert!(parse_hub_url("mqtts://h:0").is_err());
        assert!(parse_hub_url("mqtts://").is_err());
        assert!(parse_hub_url("tcp://h:1").is_err());
    }
}
