//! The hub's configuration: a TOML file, overridden by `FIELDSYNC__SECTION__KEY`
//! environment variables, validated once at start into [`HubConfig`]. Every
//! error names the key at fault. Relative paths resolve against the folder that
//! holds the config file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fieldsync_shared::files::{existing_file, resolve};
use fieldsync_shared::history;
use fieldsync_shared::logging::LogFormat;
use fieldsync_shared::{Policy, PolicyError};
use serde::Deserialize;

use crate::admission::Rate;

/// Default address of the MQTT front door.
pub const DEFAULT_MQTT_LISTEN: &str = "127.0.0.1:8883";
/// Default address of the operator API.
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:8080";
/// Shortest operator token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    hub: RawHub,
    mqtt: RawMqtt,
    #[serde(default)]
    api: RawApi,
    policy: RawPolicy,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    webhooks: RawWebhooks,
    #[serde(default)]
    events: RawEvents,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    history: history::HistorySection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    /// An agent connected with a backlog and no upstream applied for this
    /// long is `stalled`, in milliseconds.
    stall_after_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhooks {
    /// Allow `http://` endpoints that are not loopback.
    allow_http: Option<bool>,
    /// PEM of extra CAs trusted for `https://` endpoints (besides the system's).
    ca: Option<String>,
    /// Time allowed for one delivery attempt, in milliseconds.
    timeout_ms: Option<u64>,
    /// Wait after the first failed attempt, and the longest wait, in milliseconds.
    retry_initial_ms: Option<u64>,
    retry_max_ms: Option<u64>,
    /// Attempts at one event before it is given up.
    max_attempts: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvents {
    /// Hours the event log keeps an event (longer while an enabled webhook
    /// endpoint has not had it).
    retention_hours: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHub {
    /// Folder of the hub's redb store.
    data_dir: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMqtt {
    /// Address of the public mTLS MQTT listener.
    listen: Option<String>,
    /// PEM of the fleet CA: agents' certificates must chain to it.
    ca: String,
    /// PEM of the hub's certificate.
    cert: String,
    /// PEM of the hub's private key.
    key: String,
    /// Most authenticated agents connected at once.
    max_connections: Option<usize>,
    /// Most connections still in TLS or CONNECT, in all and per source IP.
    max_pending_connections: Option<usize>,
    max_pending_per_ip: Option<usize>,
    /// Largest packet before CONNECT is done, in bytes.
    max_connect_bytes: Option<usize>,
    /// Time allowed for a TLS handshake, in milliseconds.
    handshake_timeout_ms: Option<u64>,
    /// Time allowed from handshake to CONNECT, in milliseconds.
    connect_timeout_ms: Option<u64>,
    /// Each connection's pace: messages per second and the burst above it,
    /// bytes per second and the burst above it.
    rate_messages: Option<f64>,
    burst_messages: Option<f64>,
    rate_bytes: Option<f64>,
    burst_bytes: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    /// Address of the operator API.
    listen: Option<String>,
    /// Bearer token operators present.
    token: Option<String>,
    /// File holding the bearer token (first line).
    token_file: Option<String>,
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
    /// The policy file: what the hub accepts from agents and may send down.
    file: String,
}

/// The validated configuration.
#[derive(Clone)]
pub struct HubConfig {
    /// `[hub] data_dir`.
    pub data_dir: PathBuf,
    /// `[mqtt]`.
    pub mqtt: MqttConfig,
    /// `[api]`.
    pub api: ApiConfig,
    /// `[policy] file`, parsed.
    pub policy: Policy,
    /// `[log] format`.
    pub log: LogFormat,
    /// `[webhooks]`.
    pub webhooks: WebhookSettings,
    /// `[events] retention_hours`.
    pub event_retention: Duration,
    /// `[health] stall_after_ms`.
    pub stall_after_ms: u64,
    /// `[history] max_bytes`.
    pub history_max_bytes: u64,
}

/// How webhooks are delivered (`[webhooks]`; README, "Webhooks").
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookSettings {
    pub allow_http: bool,
    pub ca: Option<PathBuf>,
    pub timeout: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub max_attempts: u32,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            allow_http: false,
            ca: None,
            timeout: Duration::from_millis(defaults::WEBHOOK_TIMEOUT_MS),
            retry_initial: Duration::from_millis(defaults::WEBHOOK_RETRY_INITIAL_MS),
            retry_max: Duration::from_millis(defaults::WEBHOOK_RETRY_MAX_MS),
            max_attempts: defaults::WEBHOOK_MAX_ATTEMPTS,
        }
    }
}

/// The front door's settings.
#[derive(Debug, Clone)]
pub struct MqttConfig {
    pub listen: SocketAddr,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub max_connections: usize,
    pub max_pending: usize,
    pub max_pending_per_ip: usize,
    pub max_connect_bytes: usize,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    /// Each connection's budget of messages and of bytes.
    pub messages: Rate,
    pub bytes: Rate,
}

/// Defaults of the `[mqtt]` budgets (README, "Hub configuration").
pub mod defaults {
    /// Agents connected at once: the fleet one hub on 2 cores serves.
    pub const MAX_CONNECTIONS: usize = 50_000;
    /// Connections in TLS or CONNECT at once: a handshake takes about a
    /// millisecond of CPU, so this many is a few hundred ms of work queued.
    pub const MAX_PENDING_CONNECTIONS: usize = 256;
    /// Of those, from one source IP (a NAT of many gateways is served in
    /// turns: the rest retry under their backoff).
    pub const MAX_PENDING_PER_IP: usize = 32;
    /// A CONNECT carries a client id and, at most, short credentials.
    pub const MAX_CONNECT_BYTES: usize = 4096;
    /// Messages per second per connection, and the burst: an agent at its
    /// fastest (batches of ~10 changes at 100k changes/s, plus an ack per
    /// downstream batch) stays below this; a flood does not.
    pub const RATE_MESSAGES: f64 = 20_000.0;
    pub const BURST_MESSAGES: f64 = 40_000.0;
    /// Bytes per second per connection, and the burst: above what one
    /// connection's TLS carries on these machines (~64 MiB/s measured).
    pub const RATE_BYTES: f64 = 128.0 * 1024.0 * 1024.0;
    pub const BURST_BYTES: f64 = 128.0 * 1024.0 * 1024.0;
    /// One webhook attempt.
    pub const WEBHOOK_TIMEOUT_MS: u64 = 10_000;
    /// Webhook retries: 5 s, doubling, capped at 1 h, 20 attempts in all
    /// (about 16 h from the first failure to giving up).
    pub const WEBHOOK_RETRY_INITIAL_MS: u64 = 5_000;
    pub const WEBHOOK_RETRY_MAX_MS: u64 = 3_600_000;
    pub const WEBHOOK_MAX_ATTEMPTS: u32 = 20;
    /// The event log keeps events a week.
    pub const EVENT_RETENTION_HOURS: u64 = 168;
    /// Two minutes without upstream progress on a backlog is a stall: well
    /// above an agent's report interval (10 s) and its ack timeout (5 s).
    pub const STALL_AFTER_MS: u64 = 120_000;
}

/// The operator API's settings.
#[derive(Clone)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// The bearer token (never logged).
    pub token: String,
}

impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("listen", &self.listen)
            .field("token", &"<redacted>")
            .finish()
    }
}

impl HubConfig {
    /// Loads `path`, applies environment overrides and validates everything.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let env = config::Environment::with_prefix("FIELDSYNC").separator("__");
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
        let data_dir = resolve(base, &raw.hub.data_dir)
            .ok_or_else(|| invalid("hub.data_dir", "must not be empty".into()))?;
        let addr = |key: &'static str, value: Option<&str>, default: &str| {
            let text = value.unwrap_or(default);
            text.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    key,
                    format!("{text:?} is not an IP address and port such as {default}"),
                )
            })
        };
        let millis = |key: &'static str,
                      value: Option<u64>,
                      default: u64,
                      range: std::ops::RangeInclusive<u64>| {
            match value.unwrap_or(default) {
                ms if range.contains(&ms) => Ok(Duration::from_millis(ms)),
                ms => Err(invalid(
                    key,
                    format!("{ms} is outside {}..={}", range.start(), range.end()),
                )),
            }
        };
        let count =
            |key: &'static str, value: Option<usize>, default: usize, max: usize| match value
                .unwrap_or(default)
            {
                n if (1..=max).contains(&n) => Ok(n),
                n => Err(invalid(key, format!("{n} is outside 1..={max}"))),
            };
        let rate =
            |key: &'static str, value: Option<f64>, default: f64| match value.unwrap_or(default) {
                r if r.is_finite() && r >= 1.0 => Ok(r),
                r => Err(invalid(key, format!("{r} is not a number of at least 1"))),
            };
        let max_connections = count(
            "mqtt.max_connections",
            raw.mqtt.max_connections,
            defaults::MAX_CONNECTIONS,
            1_000_000,
        )?;
        let max_pending = count(
            "mqtt.max_pending_connections",
            raw.mqtt.max_pending_connections,
            defaults::MAX_PENDING_CONNECTIONS,
            100_000,
        )?;
        let max_pending_per_ip = count(
            "mqtt.max_pending_per_ip",
            raw.mqtt.max_pending_per_ip,
            defaults::MAX_PENDING_PER_IP.min(max_pending),
            max_pending,
        )?;
        let max_connect_bytes = match raw
            .mqtt
            .max_connect_bytes
            .unwrap_or(defaults::MAX_CONNECT_BYTES)
        {
            n @ 64..=65_536 => n,
            n => {
                return Err(invalid(
                    "mqtt.max_connect_bytes",
                    format!("{n} is outside 64..=65536"),
                ))
            }
        };
        let messages = Rate {
            per_s: rate(
                "mqtt.rate_messages",
                raw.mqtt.rate_messages,
                defaults::RATE_MESSAGES,
            )?,
            burst: rate(
                "mqtt.burst_messages",
                raw.mqtt.burst_messages,
                defaults::BURST_MESSAGES,
            )?,
        };
        let bytes = Rate {
            per_s: rate("mqtt.rate_bytes", raw.mqtt.rate_bytes, defaults::RATE_BYTES)?,
            burst: rate(
                "mqtt.burst_bytes",
                raw.mqtt.burst_bytes,
                defaults::BURST_BYTES,
            )?,
        };
        let mqtt = MqttConfig {
            listen: addr(
                "mqtt.listen",
                raw.mqtt.listen.as_deref(),
                DEFAULT_MQTT_LISTEN,
            )?,
            ca: existing_file(base, &raw.mqtt.ca).map_err(|m| invalid("mqtt.ca", m))?,
            cert: existing_file(base, &raw.mqtt.cert).map_err(|m| invalid("mqtt.cert", m))?,
            key: existing_file(base, &raw.mqtt.key).map_err(|m| invalid("mqtt.key", m))?,
            max_connections,
            max_pending,
            max_pending_per_ip,
            max_connect_bytes,
            messages,
            bytes,
            handshake_timeout: millis(
                "mqtt.handshake_timeout_ms",
                raw.mqtt.handshake_timeout_ms,
                10_000,
                100..=600_000,
            )?,
            connect_timeout: millis(
                "mqtt.connect_timeout_ms",
                raw.mqtt.connect_timeout_ms,
                10_000,
                100..=600_000,
            )?,
        };
        let token = match (raw.api.token, raw.api.token_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "api.token",
                    "set api.token or api.token_file, not both".into(),
                ))
            }
            (None, None) => {
                return Err(invalid(
                    "api.token",
                    "the operator API needs api.token or api.token_file".into(),
                ))
            }
            (Some(token), None) => token,
            (None, Some(file)) => {
                let path = existing_file(base, &file).map_err(|m| invalid("api.token_file", m))?;
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| invalid("api.token_file", format!("{}: {e}", path.display())))?;
                text.lines().next().unwrap_or("").trim().to_owned()
            }
        };
        if token.len() < MIN_TOKEN_LEN || token.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                "api.token",
                format!("the token must be at least {MIN_TOKEN_LEN} characters without spaces"),
            ));
        }
        let api = ApiConfig {
            listen: addr("api.listen", raw.api.listen.as_deref(), DEFAULT_API_LISTEN)?,
            token,
        };
        let policy_file =
            existing_file(base, &raw.policy.file).map_err(|m| invalid("policy.file", m))?;
        let policy = Policy::load(&policy_file).map_err(|source| ConfigError::Policy {
            path: shown.to_owned(),
            source,
        })?;
        let w = raw.webhooks;
        let webhooks = WebhookSettings {
            allow_http: w.allow_http.unwrap_or(false),
            ca: w
                .ca
                .map(|ca| existing_file(base, &ca).map_err(|m| invalid("webhooks.ca", m)))
                .transpose()?,
            timeout: millis(
                "webhooks.timeout_ms",
                w.timeout_ms,
                defaults::WEBHOOK_TIMEOUT_MS,
                1..=600_000,
            )?,
            retry_initial: millis(
                "webhooks.retry_initial_ms",
                w.retry_initial_ms,
                defaults::WEBHOOK_RETRY_INITIAL_MS,
                1..=86_400_000,
            )?,
            retry_max: millis(
                "webhooks.retry_max_ms",
                w.retry_max_ms,
                defaults::WEBHOOK_RETRY_MAX_MS,
                1..=86_400_000,
            )?,
            max_attempts: match w.max_attempts.unwrap_or(defaults::WEBHOOK_MAX_ATTEMPTS) {
                n @ 1..=1000 => n,
                n => {
                    return Err(invalid(
                        "webhooks.max_attempts",
                        format!("{n} is outside 1..=1000"),
                    ))
                }
            },
        };
        let hours = raw
            .events
            .retention_hours
            .unwrap_or(defaults::EVENT_RETENTION_HOURS);
        if !(1..=24 * 366).contains(&hours) {
            return Err(invalid(
                "events.retention_hours",
                format!("{hours} is outside 1..=8784"),
            ));
        }
        let stall_after_ms = raw
            .health
            .stall_after_ms
            .unwrap_or(defaults::STALL_AFTER_MS);
        if !(1_000..=86_400_000).contains(&stall_after_ms) {
            return Err(invalid(
                "health.stall_after_ms",
                format!("{stall_after_ms} is outside 1000..=86400000"),
            ));
        }
        let history_max_bytes = raw
            .history
            .max_bytes(history::DEFAULT_HUB_MAX_BYTES)
            .map_err(|m| invalid("history.max_bytes", m))?;
        let log = match raw.log.format.as_deref() {
            None => LogFormat::default(),
            Some(text) => LogFormat::parse(text).map_err(|m| invalid("log.format", m))?,
        };
        Ok(Self {
            history_max_bytes,
            data_dir,
            mqtt,
            api,
            policy,
            stall_after_ms,
            webhooks,
            event_retention: Duration::from_secs(hours * 3600),
            log,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[hub]
data_dir = "data"
[mqtt]
listen = "127.0.0.1:0"
ca = "ca.pem"
cert = "hub.pem"
key = "hub.key"
[api]
listen = "127.0.0.1:0"
token = "0123456789abcdef"
[policy]
file = "policy.toml"
"#;

    fn load_with(config: &str, vars: &[(&str, &str)]) -> Result<HubConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "hub.pem", "hub.key"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        std::fs::write(dir.path().join("policy.toml"), "").unwrap();
        let path = dir.path().join("hub.toml");
        std::fs::write(&path, config).unwrap();
        let vars = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let env = config::Environment::with_prefix("FIELDSYNC")
            .separator("__")
            .source(Some(vars));
        HubConfig::load_with_env(&path, env)
    }

    #[test]
    fn the_log_format_comes_from_the_file_or_the_environment() {
        assert_eq!(load_with(GOOD, &[]).unwrap().log, LogFormat::Text);
        let json = format!("{GOOD}[log]\nformat = \"json\"\n");
        assert_eq!(load_with(&json, &[]).unwrap().log, LogFormat::Json);
        // The documented override beats the file.
        let text = format!("{GOOD}[log]\nformat = \"text\"\n");
        let c = load_with(&text, &[("FIELDSYNC__LOG__FORMAT", "json")]).unwrap();
        assert_eq!(c.log, LogFormat::Json);
        match load_with(GOOD, &[("FIELDSYNC__LOG__FORMAT", "yaml")]) {
            Err(e) => assert!(e.to_string().contains("log.format"), "{e}"),
            Ok(_) => panic!("log.format = yaml was accepted"),
        }
    }

    fn error_of(config: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "hub.pem", "hub.key"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        std::fs::write(dir.path().join("policy.toml"), "").unwrap();
        std::fs::write(dir.path().join("token"), "fedcba9876543210\n").unwrap();
        let path = dir.path().join("hub.toml");
        std::fs::write(&path, config).unwrap();
        let env = config::Environment::with_prefix("FIELDSYNC_TEST_UNUSED").separator("__");
        match HubConfig::load_with_env(&path, env) {
            Ok(c) => format!("ok token={}", c.api.token),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_good_config_loads() {
        assert_eq!(error_of(GOOD), "ok token=0123456789abcdef");
        let with_file = GOOD.replace("token = \"0123456789abcdef\"", "token_file = \"token\"");
        assert_eq!(error_of(&with_file), "ok token=fedcba9876543210");
    }

    #[test]
    fn every_bad_key_is_named() {
        let cases = [
            (
                GOOD.replace("data_dir = \"data\"", "data_dir = \"\""),
                "hub.data_dir",
            ),
            (
                format!("{GOOD}[history]\nmax_bytes = 1000\n"),
                "history.max_bytes: 1000 is below",
            ),
            (
                GOOD.replace("ca = \"ca.pem\"", "ca = \"nope.pem\""),
                "mqtt.ca",
            ),
            (
                GOOD.replace("127.0.0.1:0\"\nca", "nonsense\"\nca"),
                "mqtt.listen",
            ),
            (
                GOOD.replace("token = \"0123456789abcdef\"", "token = \"short\""),
                "api.token",
            ),
            (
                GOOD.replace("token = \"0123456789abcdef\"", ""),
                "api.token",
            ),
            (
                GOOD.replace(
                    "token = \"0123456789abcdef\"",
                    "token = \"0123456789abcdef\"\ntoken_file = \"token\"",
                ),
                "api.token",
            ),
            (GOOD.replace("policy.toml", "missing.toml"), "policy.file"),
            (
                GOOD.replace(
                    "key = \"hub.key\"",
                    "key = \"hub.key\"\nmax_pending_connections = 0",
                ),
                "mqtt.max_pending_connections",
            ),
            (
                GOOD.replace(
                    "key = \"hub.key\"",
                    "key = \"hub.key\"\nmax_pending_connections = 8\nmax_pending_per_ip = 9",
                ),
                "mqtt.max_pending_per_ip",
            ),
            (
                GOOD.replace(
                    "key = \"hub.key\"",
                    "key = \"hub.key\"\nmax_connect_bytes = 10",
                ),
                "mqtt.max_connect_bytes",
            ),
            (
                GOOD.replace(
                    "key = \"hub.key\"",
                    "key = \"hub.key\"\nrate_messages = 0.5",
                ),
                "mqtt.rate_messages",
            ),
            (
                GOOD.replace("key = \"hub.key\"", "key = \"hub.key\"\nburst_bytes = -1"),
                "mqtt.burst_bytes",
            ),
            (format!("{GOOD}\n[extra]\nx = 1\n"), "extra"),
            (
                format!("{GOOD}\n[webhooks]\nmax_attempts = 0\n"),
                "webhooks.max_attempts",
            ),
            (
                format!("{GOOD}\n[webhooks]\nca = \"nope.pem\"\n"),
                "webhooks.ca",
            ),
            (
                format!("{GOOD}\n[webhooks]\ntimeout_ms = 0\n"),
                "webhooks.timeout_ms",
            ),
            (
                format!("{GOOD}\n[events]\nretention_hours = 0\n"),
                "events.retention_hours",
            ),
            (
                format!("{GOOD}\n[health]\nstall_after_ms = 5\n"),
                "health.stall_after_ms",
            ),
            (format!("{GOOD}\n[log]\nformat = \"xml\"\n"), "log.format"),
        ];
        for (config, key) in cases {
            let e = error_of(&config);
            assert!(e.contains(key), "expected {key} in {e:?}");
        }
    }

    #[test]
    fn the_token_is_redacted_in_debug_output() {
        let api = ApiConfig {
            listen: DEFAULT_API_LISTEN.parse().unwrap(),
            token: "0123456789abcdef".into(),
        };
        assert!(!format!("{api:?}").contains("0123456789abcdef"));
    }
}
