//! End-to-end test harness: builds and locates the real `fieldsync-agent` and
//! `fieldsync-hub` binaries, runs an agent on a temp dir ([`TempAgent`]), runs
//! it as a CLI client ([`cli`]), runs a hub and a fleet of linked agents with a
//! generated PKI ([`fleet`]), records what agents send ([`tap`]), and waits on
//! things with deadlines ([`wait_for`], [`eventually`]) instead of sleeps.

pub mod durability;
pub mod fleet;
pub mod raw_mqtt;
pub mod tap;
pub mod webhook_receiver;

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{mpsc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use fieldsync_agent::store::Store;
use fieldsync_shared::AgentId;

/// Set this to a path to test a prebuilt binary instead of building one.
pub const AGENT_BIN_ENV: &str = "FIELDSYNC_E2E_AGENT_BIN";
/// The line prefix `fieldsync-agent run` prints on stdout once its API is up.
pub const LISTENING_PREFIX: &str = "fieldsync-agent: api listening on ";
/// The policy every [`TempAgent`] runs with (the brief's example).
pub const PATIENTS_POLICY: &str = "[collections.patients]\n\
direction = \"up\"\n\
sync = [\"initials\", \"ward\", \"heart_rate\"]\n";
/// The agent id every [`TempAgent`] runs as.
pub const AGENT_ID: &str = "gw-e2e";

/// How long an agent may take from spawn to "api listening" (a loaded 2-core
/// machine, a debug build and a redb repair after SIGKILL all fit in it).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a CLI command or a failing `run` may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The `fieldsync-agent` binary of the profile this test was built with (see
/// [`bin_dir`]).
pub fn agent_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| match std::env::var_os(AGENT_BIN_ENV) {
        Some(path) => PathBuf::from(path),
        None => bin_dir().join(format!("fieldsync-agent{}", std::env::consts::EXE_SUFFIX)),
    })
}

/// The `fieldsync-hub` binary of the profile this test was built with.
pub fn hub_bin() -> PathBuf {
    bin_dir().join(format!("fieldsync-hub{}", std::env::consts::EXE_SUFFIX))
}

/// The folder holding both binaries, built (once per process) by
/// `cargo build -p fieldsync-agent -p fieldsync-hub --bins` with this test's
/// profile and target dir. Panics with the build's error if they cannot be built.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match DIR.get_or_init(|| build_bins().map_err(|e| format!("{e:#}"))) {
        Ok(path) => path,
        Err(e) => panic!("cannot build or find the fieldsync binaries: {e}"),
    }
}

fn build_bins() -> anyhow::Result<PathBuf> {
    // A test executable is <target>/<profile>/deps/<test>-<hash>; the demo
    // binary is <target>/<profile>/fieldsync-demo.
    let exe = std::env::current_exe().context("cannot locate the test executable")?;
    let parent = exe
        .parent()
        .ok_or_else(|| anyhow!("unexpected executable location {}", exe.display()))?;
    let profile_dir = if parent.file_name().is_some_and(|n| n == "deps") {
        parent
            .parent()
            .ok_or_else(|| anyhow!("unexpected test executable location {}", exe.display()))?
    } else {
        parent
    };
    let target_dir = profile_dir
        .parent()
        .ok_or_else(|| anyhow!("unexpected test executable location {}", exe.display()))?;
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("unexpected test executable location {}", exe.display()))?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the e2e crate has no parent folder")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    // Cargo gives this test process variables describing the e2e crate. Build
    // scripts in the tree (ring's) track some of them, so passing them on would
    // make this build differ from a plain one and recompile half the tree.
    for (name, _) in std::env::vars_os() {
        let name_text = name.to_string_lossy();
        let set_by_cargo = name_text.starts_with("CARGO_PKG_")
            || name_text.starts_with("CARGO_BIN_EXE_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "OUT_DIR",
            ]
            .contains(&&*name_text);
        if set_by_cargo {
            build.env_remove(&name);
        }
    }
    build
        .current_dir(workspace)
        // `--workspace` resolves features exactly as `cargo test --workspace`
        // does, so after a test build this is a no-op instead of a rebuild.
        .args(["build", "--quiet", "--workspace", "--bins"])
        .arg("--target-dir")
        .arg(target_dir);
    match profile {
        "debug" => {}
        "release" => {
            build.arg("--release");
        }
        other => {
            build.args(["--profile", other]);
        }
    }
    let status = build
        .stdin(Stdio::null())
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("cargo build of fieldsync-agent and fieldsync-hub failed: {status}");
    }
    for name in ["fieldsync-agent", "fieldsync-hub"] {
        let bin = profile_dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
        if !bin.is_file() {
            bail!("cargo built {name} but {} is missing", bin.display());
        }
    }
    Ok(profile_dir.to_owned())
}

/// A `fieldsync-agent` command with a clean environment: no `FIELDSYNC*`
/// variable of the caller's shell leaks in and changes the config or `--api`.
pub fn agent_command() -> Command {
    clean_command(agent_bin())
}

/// A `fieldsync-hub` command with the same clean environment.
pub fn hub_command() -> Command {
    clean_command(&hub_bin())
}

fn clean_command(bin: &Path) -> Command {
    let mut cmd = Command::new(bin);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("FIELDSYNC") {
            cmd.env_remove(name);
        }
    }
    cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs the binary with `args` (for example as an API client) and returns its
/// output; fails if it does not exit within [`COMMAND_TIMEOUT`].
pub fn cli<I, S>(args: I) -> anyhow::Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = agent_command();
    cmd.args(args);
    output_within(cmd, COMMAND_TIMEOUT)
}

/// Spawns `cmd` with captured stdout and stderr and waits at most `timeout` for
/// it to exit; a process still running then is killed and reported as an error.
pub fn output_within(mut cmd: Command, timeout: Duration) -> anyhow::Result<Output> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot spawn {cmd:?}"))?;
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let status = wait_for_exit(&mut child, timeout);
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => bail!(
            "{cmd:?} did not exit within {timeout:?}; stdout: {}; stderr: {}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    }
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

/// Waits up to `timeout` for `child` to exit; kills (and reaps) it and returns
/// `None` if it is still running then.
fn wait_for_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let found = wait_for(timeout, || child.try_wait().ok().flatten());
    if found.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    found
}

/// Calls `check` until it returns `Some` or `timeout` passes (then `None`),
/// pausing briefly between calls.
pub fn wait_for<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = check() {
            return Some(found);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The async form of [`wait_for`]: awaits `check` until it yields `Some`, or
/// fails naming `what` once `timeout` has passed.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(found) = check().await {
            return Ok(found);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A TCP port on 127.0.0.1 that nothing listens on (bound, then released).
pub fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("cannot bind 127.0.0.1:0");
    listener.local_addr().expect("no local address").port()
}

/// Options for [`TempAgent::start_with`].
#[derive(Debug, Clone, Default)]
pub struct AgentSetup {
    /// Add a `[hub]` section pointing at this `mqtts://` URL, with a CA, a
    /// certificate for [`AGENT_ID`] and its key made by [`write_dev_pki`].
    pub hub_url: Option<String>,
    /// Add a `[hub]` section with these URL and files (a real hub's PKI).
    pub link: Option<AgentLink>,
    /// The agent id; [`AGENT_ID`] if unset.
    pub id: Option<String>,
    /// The policy file's text; [`PATIENTS_POLICY`] if unset.
    pub policy: Option<String>,
    /// Extra environment variables for `fieldsync-agent run`, set after the
    /// clean environment (so `FIELDSYNC*` test aids and overrides apply).
    pub env: Vec<(String, String)>,
    /// Extra TOML appended to `agent.toml` (whole sections, such as `[log]`).
    pub extra_config: String,
}

/// A `[hub]` section: where the hub is and the agent's TLS files.
#[derive(Debug, Clone)]
pub struct AgentLink {
    pub url: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Writes a throwaway PKI into `dir`: `ca.pem` (a self-signed CA), and
/// `agent.pem` / `agent.key`, a client certificate for [`AGENT_ID`] signed by it.
pub fn write_dev_pki(dir: &Path) -> anyhow::Result<()> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "fieldsync e2e CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    std::fs::write(dir.join("ca.pem"), ca.self_signed(&ca_key)?.pem())?;
    let issuer = Issuer::new(ca, ca_key);

    let mut leaf = CertificateParams::default();
    leaf.distinguished_name.push(DnType::CommonName, AGENT_ID);
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate()?;
    std::fs::write(dir.join("agent.pem"), leaf.signed_by(&key, &issuer)?.pem())?;
    std::fs::write(dir.join("agent.key"), key.serialize_pem())?;
    Ok(())
}

/// Writes the agent config (`agent.toml`) and the patients policy (`policy.toml`)
/// into `dir`, with the API on `127.0.0.1:0` and the store in `dir/data`.
/// Returns the config's path.
pub fn write_agent_config(dir: &Path, setup: &AgentSetup) -> anyhow::Result<PathBuf> {
    let policy = setup.policy.as_deref().unwrap_or(PATIENTS_POLICY);
    std::fs::write(dir.join("policy.toml"), policy)?;
    let id = setup.id.as_deref().unwrap_or(AGENT_ID);
    let mut config = format!(
        "[agent]\nid = \"{id}\"\ndata_dir = \"data\"\n\n\
         [api]\nlisten = \"127.0.0.1:0\"\n\n\
         [policy]\nfile = \"policy.toml\"\n"
    );
    if let Some(url) = &setup.hub_url {
        write_dev_pki(dir)?;
        config.push_str(&format!(
            "\n[hub]\nurl = \"{url}\"\nca = \"ca.pem\"\ncert = \"agent.pem\"\nkey = \"agent.key\"\n"
        ));
    }
    if let Some(link) = &setup.link {
        config.push_str(&format!(
            "\n[hub]\nurl = \"{}\"\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            link.url, link.ca, link.cert, link.key
        ));
    }
    if !setup.extra_config.is_empty() {
        config.push('\n');
        config.push_str(&setup.extra_config);
        config.push('\n');
    }
    let path = dir.join("agent.toml");
    std::fs::write(&path, config)?;
    Ok(path)
}

/// A running `fieldsync-agent run` on a temp dir of its own, with the patients
/// policy and its API on a free loopback port. Dropping it kills the process.
pub struct TempAgent {
    dir: tempfile::TempDir,
    id: String,
    config: PathBuf,
    env: Vec<(String, String)>,
    running: Option<Running>,
    base_url: String,
    starts: u32,
}

struct Running {
    child: Child,
    stdout_drain: JoinHandle<()>,
}

impl TempAgent {
    /// Starts an agent with no `[hub]` section.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(AgentSetup::default())
    }

    /// Starts an agent configured by `setup`.
    pub fn start_with(setup: AgentSetup) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("fieldsync-e2e-")
            .tempdir()?;
        let config = write_agent_config(dir.path(), &setup)?;
        let mut agent = Self {
            dir,
            id: setup.id.clone().unwrap_or_else(|| AGENT_ID.to_owned()),
            config,
            env: setup.env.clone(),
            running: None,
            base_url: String::new(),
            starts: 0,
        };
        agent.spawn()?;
        Ok(agent)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        let log_path = self.stderr_log_path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        let mut child = agent_command()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("cannot spawn fieldsync-agent run")?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let (tx, rx) = mpsc::channel();
        // Reads stdout to the end, so the agent never blocks on a full pipe, and
        // hands over the address from the "api listening" line.
        let stdout_drain = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix(LISTENING_PREFIX) {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let running = Running {
            child,
            stdout_drain,
        };
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(url) => {
                self.base_url = url;
                self.running = Some(running);
                Ok(())
            }
            Err(e) => {
                running.kill();
                let why = match e {
                    mpsc::RecvTimeoutError::Timeout => {
                        format!("not ready within {START_TIMEOUT:?}")
                    }
                    mpsc::RecvTimeoutError::Disconnected => "exited before it was ready".into(),
                };
                bail!(
                    "fieldsync-agent (start #{}) {why}; its stderr:\n{}",
                    self.starts,
                    self.stderr_log()
                )
            }
        }
    }

    /// The process id while the agent runs.
    pub fn pid(&self) -> Option<u32> {
        self.running.as_ref().map(|r| r.child.id())
    }

    /// The agent's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The API's base URL, `http://127.0.0.1:PORT` (a new port after each restart).
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The URL of `path` (which starts with `/`) on the API.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// The temp dir holding the config, policy, store and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The agent's config file.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The store's folder (`[agent] data_dir`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn stderr_log_path(&self) -> PathBuf {
        self.dir.path().join("agent.stderr.log")
    }

    /// Everything the agent has written to stderr, over all its starts.
    pub fn stderr_log(&self) -> String {
        std::fs::read_to_string(self.stderr_log_path()).unwrap_or_default()
    }

    /// Whether the process is running (not killed, not exited).
    pub fn is_running(&mut self) -> bool {
        match &mut self.running {
            Some(r) => matches!(r.child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the agent with SIGKILL (no shutdown path runs) and reaps it.
    pub fn kill(&mut self) {
        if let Some(running) = self.running.take() {
            running.kill();
        }
    }

    /// Kills the agent if it runs, then starts it again on the same config and
    /// store and waits until its API is up.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }

    /// Runs the binary as a client of this agent: `args` then `--api URL`.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--api", &self.base_url]);
        cli(all)
    }

    /// Opens the agent's store directly. Kill the agent first: redb locks the
    /// file while the agent has it open.
    pub fn open_store(&self) -> anyhow::Result<Store> {
        if self.running.is_some() {
            bail!("open_store while the agent runs: kill it first");
        }
        let id = AgentId::new(&*self.id)?;
        Ok(Store::open(&self.data_dir(), &id)?)
    }
}

impl Running {
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The pipe closes with the process, so the drain thread ends.
        let _ = self.stdout_drain.join();
    }
}

impl Drop for TempAgent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Asserts a finished command failed, and returns its stderr for further checks.
pub fn expect_failure(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success(),
        "expected a failure; got {} with stdout {} and stderr {stderr}",
        output.status,
        String::from_utf8_lossy(&output.stdout)
    );
    stderr
}

/// Asserts a finished command succeeded, and returns its stdout.
pub fn expect_success(output: &Output) -> String {
    assert!(
        output.status.success(),
        "expected success; got {} with stdout {} and stderr {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}
