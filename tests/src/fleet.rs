//! A real hub and linked agents for end-to-end tests: a PKI made by
//! `fieldsync-hub certs`, a `fieldsync-hub run` process on loopback ports
//! ([`TempHub`]), agents configured to sync to it, and a small operator-API
//! client.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context};
use reqwest::StatusCode;
use serde_json::Value;

use crate::{
    expect_success, hub_command, output_within, AgentLink, AgentSetup, TempAgent, COMMAND_TIMEOUT,
    START_TIMEOUT,
};

/// The operator token every [`TempHub`] uses.
pub const TOKEN: &str = "e2e-operator-token-0123456789";

/// A policy with every direction: `patients` up, `settings` both ways,
/// `orders` down. Agents and hub use the same file unless a test says otherwise.
pub const FLEET_POLICY: &str = r#"
[collections.patients]
direction = "up"
sync = ["initials", "ward", "heart_rate"]

[collections.settings]
direction = "both"
sync = ["mode", "threshold"]

[collections.orders]
direction = "down"
sync = ["dose"]
"#;

const MQTT_PREFIX: &str = "fieldsync-hub: mqtt listening on ";
const API_PREFIX: &str = "fieldsync-hub: api listening on ";

/// A dev PKI in a folder, made with the real `fieldsync-hub certs` commands.
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// `fieldsync-hub certs init --out DIR`.
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        let mut cmd = hub_command();
        cmd.args(["certs", "init", "--out"]).arg(dir);
        expect_success(&output_within(cmd, COMMAND_TIMEOUT)?);
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// `fieldsync-hub certs issue --ca-dir DIR --agent ID --out DIR`.
    pub fn issue(&self, agent: &str) -> anyhow::Result<()> {
        let mut cmd = hub_command();
        cmd.args(["certs", "issue", "--ca-dir"])
            .arg(&self.dir)
            .args(["--agent", agent, "--out"])
            .arg(&self.dir);
        expect_success(&output_within(cmd, COMMAND_TIMEOUT)?);
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn hub_cert(&self) -> PathBuf {
        self.dir.join("hub.pem")
    }
    pub fn hub_key(&self) -> PathBuf {
        self.dir.join("hub.key")
    }
    pub fn cert(&self, agent: &str) -> PathBuf {
        self.dir.join(format!("{agent}.pem"))
    }
    pub fn key(&self, agent: &str) -> PathBuf {
        self.dir.join(format!("{agent}.key"))
    }

    /// The `[hub]` section for `agent` (issue its certificate first) pointing at `url`.
    pub fn link(&self, agent: &str, url: &str) -> AgentLink {
        AgentLink {
            url: url.to_owned(),
            ca: self.ca(),
            cert: self.cert(agent),
            key: self.key(agent),
        }
    }
}

/// A running `fieldsync-hub run` with its data in `dir/hub-data`. The MQTT port
/// stays the same across restarts (agents keep their URL); dropping it kills
/// the process.
pub struct TempHub {
    dir: PathBuf,
    config: PathBuf,
    policy: String,
    /// Extra `key = value` lines for the `[mqtt]` section.
    extra_mqtt: String,
    /// Extra sections (`[webhooks]`, `[events]`) at the end of the file.
    extra_sections: String,
    /// Extra environment variables for the hub process.
    env: Vec<(String, String)>,
    child: Option<(Child, std::thread::JoinHandle<()>)>,
    mqtt: SocketAddr,
    api: String,
    operator: Operator,
}

impl TempHub {
    /// Writes `hub.toml` into `dir` (ports chosen by the OS) and starts the hub.
    pub fn start(dir: &Path, pki: &Pki, policy: &str) -> anyhow::Result<Self> {
        Self::start_with(dir, pki, policy, "")
    }

    /// [`TempHub::start`] with `extra_mqtt` (TOML `key = value` lines, such as
    /// `max_connections = 8`) added to the `[mqtt]` section, for every start.
    /// `listen`, `ca`, `cert`, `key`, `handshake_timeout_ms` and
    /// `connect_timeout_ms` are set already (TOML refuses a key twice).
    pub fn start_with(
        dir: &Path,
        pki: &Pki,
        policy: &str,
        extra_mqtt: &str,
    ) -> anyhow::Result<Self> {
        Self::start_configured(dir, pki, policy, extra_mqtt, "", &[])
    }

    /// [`TempHub::start_with`], with `env` set for every start after the
    /// clean environment (so `FIELDSYNC__SECTION__KEY` overrides apply).
    pub fn start_with_env(
        dir: &Path,
        pki: &Pki,
        policy: &str,
        extra_mqtt: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::start_configured(dir, pki, policy, extra_mqtt, "", env)
    }

    /// [`TempHub::start_with`] plus `extra_sections` (whole TOML sections such
    /// as `[webhooks]`) at the end of the config and `env` in the process's
    /// environment, for every start.
    pub fn start_configured(
        dir: &Path,
        pki: &Pki,
        policy: &str,
        extra_mqtt: &str,
        extra_sections: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut hub = Self {
            dir: dir.to_owned(),
            config: dir.join("hub.toml"),
            policy: policy.to_owned(),
            extra_mqtt: extra_mqtt.trim().to_owned(),
            extra_sections: extra_sections.trim().to_owned(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            child: None,
            mqtt: "127.0.0.1:0".parse()?,
            api: String::new(),
            operator: Operator::new(""),
        };
        std::fs::write(dir.join("hub-policy.toml"), policy)?;
        hub.write_config(pki)?;
        hub.spawn()?;
        // Later starts keep the MQTT port the agents were given.
        hub.write_config(pki)?;
        Ok(hub)
    }

    fn write_config(&self, pki: &Pki) -> anyhow::Result<()> {
        let text = format!(
            "[hub]\ndata_dir = \"hub-data\"\n\n\
             [mqtt]\nlisten = \"{}\"\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
             handshake_timeout_ms = 3000\nconnect_timeout_ms = 3000\n{}\n\
             [api]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\n\
             [policy]\nfile = \"hub-policy.toml\"\n\n{}\n",
            self.mqtt,
            pki.ca(),
            pki.hub_cert(),
            pki.hub_key(),
            if self.extra_mqtt.is_empty() {
                String::new()
            } else {
                format!("{}\n", self.extra_mqtt)
            },
            self.extra_sections,
        );
        std::fs::write(&self.config, text)?;
        Ok(())
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.stderr_log_path())?;
        let mut cmd = hub_command();
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config)
            .stdout(Stdio::piped())
            .stderr(log);
        let (child, drain, lines) =
            spawn_until(cmd, &[MQTT_PREFIX, API_PREFIX]).with_context(|| {
                format!(
                    "fieldsync-hub did not start; its stderr:\n{}",
                    self.stderr_log()
                )
            })?;
        self.mqtt = lines[0].parse().context("mqtt address")?;
        self.api = lines[1].clone();
        self.operator = Operator::new(&self.api);
        self.child = Some((child, drain));
        Ok(())
    }

    /// The process id while the hub runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|(c, _)| c.id())
    }

    /// `mqtts://127.0.0.1:PORT` for agents' `[hub] url`.
    pub fn mqtt_url(&self) -> String {
        format!("mqtts://{}", self.mqtt)
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt
    }

    /// The operator API's base URL.
    pub fn api_url(&self) -> &str {
        &self.api
    }

    /// The hub's redb file.
    pub fn data_file(&self) -> PathBuf {
        self.dir.join("hub-data").join("hub.redb")
    }

    /// The policy the hub runs with.
    pub fn policy(&self) -> &str {
        &self.policy
    }

    fn stderr_log_path(&self) -> PathBuf {
        self.dir.join("hub.stderr.log")
    }

    /// Everything the hub wrote to stderr over all its starts.
    pub fn stderr_log(&self) -> String {
        std::fs::read_to_string(self.stderr_log_path()).unwrap_or_default()
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill(&mut self) {
        if let Some((mut child, drain)) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = drain.join();
        }
    }

    /// Kills the hub if it runs and starts it again on the same store and MQTT port.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }

    /// A client of the operator API as it listens now (its port changes with
    /// every restart: take a new one after [`TempHub::restart`]).
    pub fn operator(&self) -> Operator {
        self.operator.clone()
    }

    /// `GET path` on the operator API with the token.
    pub async fn get(&self, path: &str) -> anyhow::Result<(StatusCode, Value)> {
        self.operator.get(path).await
    }

    /// `PUT path` with a JSON body on the operator API with the token.
    pub async fn put(&self, path: &str, body: &Value) -> anyhow::Result<(StatusCode, Value)> {
        self.operator.put(path, body).await
    }

    /// The hub's `GET /v1/agents` entry for `agent`, if it knows the agent.
    pub async fn agent_row(&self, agent: &str) -> anyhow::Result<Option<Value>> {
        self.operator.agent_row(agent).await
    }

    /// The hub's copy of a record's fields, or `None` (404).
    pub async fn record(
        &self,
        agent: &str,
        collection: &str,
        key: &str,
    ) -> anyhow::Result<Option<Value>> {
        self.operator.record(agent, collection, key).await
    }

    /// Starts an agent `id` (its certificate issued now) linked to `url`
    /// (this hub's MQTT URL unless a test puts a tap in between), with the
    /// hub's policy.
    pub fn agent(&self, pki: &Pki, id: &str, url: Option<&str>) -> anyhow::Result<TempAgent> {
        if !pki.cert(id).is_file() {
            pki.issue(id)?;
        }
        let url = url.map(str::to_owned).unwrap_or_else(|| self.mqtt_url());
        TempAgent::start_with(AgentSetup {
            link: Some(pki.link(id, &url)),
            id: Some(id.to_owned()),
            policy: Some(self.policy.clone()),
            ..AgentSetup::default()
        })
    }
}

impl Drop for TempHub {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Spawns `cmd` (stdout piped) and waits until it printed one line starting
/// with each of `prefixes`; returns the rest of each line, in order. A thread
/// keeps draining stdout afterwards.
fn spawn_until(
    mut cmd: Command,
    prefixes: &'static [&'static str],
) -> anyhow::Result<(Child, std::thread::JoinHandle<()>, Vec<String>)> {
    let mut child = cmd.spawn().context("cannot spawn")?;
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let (tx, rx) = mpsc::channel();
    let drain = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            for (i, p) in prefixes.iter().enumerate() {
                if let Some(rest) = line.strip_prefix(p) {
                    let _ = tx.send((i, rest.trim().to_owned()));
                }
            }
        }
    });
    let mut found: Vec<Option<String>> = vec![None; prefixes.len()];
    let deadline = std::time::Instant::now() + START_TIMEOUT;
    while found.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok((i, rest)) => found[i] = Some(rest),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("not ready within {START_TIMEOUT:?} (or exited)");
            }
        }
    }
    Ok((child, drain, found.into_iter().flatten().collect()))
}

/// A cloneable client of a hub's operator API (bearer [`TOKEN`]).
#[derive(Clone)]
pub struct Operator {
    http: reqwest::Client,
    base: String,
}

impl Operator {
    /// A client of the API at `base` (`http://ADDR`), with a 30 s timeout.
    pub fn new(base: &str) -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("cannot build an HTTP client"),
            base: base.to_owned(),
        }
    }

    /// `GET path` with the token.
    pub async fn get(&self, path: &str) -> anyhow::Result<(StatusCode, Value)> {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .send()
            .await?;
        Ok((r.status(), r.json().await?))
    }

    /// `PUT path` with a JSON body and the token.
    pub async fn put(&self, path: &str, body: &Value) -> anyhow::Result<(StatusCode, Value)> {
        let r = self
            .http
            .put(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .json(body)
            .send()
            .await?;
        Ok((r.status(), r.json().await?))
    }

    /// `POST path` with a JSON body and the token.
    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<(StatusCode, Value)> {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .json(body)
            .send()
            .await?;
        Ok((r.status(), r.json().await?))
    }

    /// `DELETE path` with the token; the status.
    pub async fn delete(&self, path: &str) -> anyhow::Result<StatusCode> {
        let r = self
            .http
            .delete(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .send()
            .await?;
        Ok(r.status())
    }

    /// The `GET /v1/agents` entry for `agent`, if the hub knows it.
    pub async fn agent_row(&self, agent: &str) -> anyhow::Result<Option<Value>> {
        let (status, body) = self.get("/v1/agents").await?;
        if status != StatusCode::OK {
            bail!("GET /v1/agents answered {status}: {body}");
        }
        Ok(body["agents"]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["id"] == agent).cloned()))
    }

    /// The hub's copy of a record's fields, or `None` (404).
    pub async fn record(
        &self,
        agent: &str,
        collection: &str,
        key: &str,
    ) -> anyhow::Result<Option<Value>> {
        let (status, body) = self
            .get(&format!("/v1/agents/{agent}/records/{collection}/{key}"))
            .await?;
        match status {
            StatusCode::OK => Ok(Some(body["fields"].clone())),
            StatusCode::NOT_FOUND => Ok(None),
            other => bail!("GET record {collection}/{key} answered {other}: {body}"),
        }
    }
}
