//! The peer: the raw publish workloads of `raw.rs` (same payload bytes, same
//! client options, same durations, same round-trip probe) against a mosquitto
//! broker this harness starts on a free loopback port with a config of its own
//! in a temp dir: mutual TLS 1.3 with the fleet's dev PKI, identity from the
//! client certificate, no persistence, no plaintext listener. Installs
//! mosquitto with apt-get if it is missing. Never touches a system-wide
//! mosquitto.

use std::io::Read;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fieldsync_e2e::fleet::Pki;

use crate::raw::{self, Target};
use crate::{Plan, Report};

/// How long mosquitto may take to accept TCP connections.
const READY_DEADLINE: Duration = Duration::from_secs(10);
/// Largest MQTT packet mosquitto accepts: well above the 1 MiB envelope limit.
const MAX_PACKET_BYTES: usize = 4 << 20;

/// The mosquitto peer scenario.
pub(crate) async fn peer(plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let exe = find_or_install()?;
    let version = version(&exe)?;
    let dir = tempfile::Builder::new()
        .prefix("fieldsync-bench-mosquitto-")
        .tempdir()?;
    let pki = Pki::create(&dir.path().join("pki"))?;
    pki.issue(raw::AGENT)?;
    let mut broker = Mosquitto::start(&exe, dir.path(), &pki).await?;
    eprintln!(
        "  mosquitto {} (pid {}, uid {}) on {}",
        version.text,
        broker.child.id(),
        broker.uid,
        broker.addr
    );
    let target = Target::new(&pki, broker.addr)?;
    let figures = match raw::measure(&target, plan).await {
        Ok(f) => f,
        Err(e) => return Err(e.context(format!("mosquitto's log:\n{}", broker.log()))),
    };
    broker.check_running()?;
    let odd = broker.log_problems();
    if !odd.is_empty() {
        eprintln!(
            "  mosquitto's log has errors or warnings:\n{}",
            odd.join("\n")
        );
    }
    eprintln!("  {}", figures.describe("mosquitto"));
    report.insert("mosquitto_publish_msgs_per_s", figures.change.msgs_per_s);
    report.insert(
        "mosquitto_publish_batch_msgs_per_s",
        figures.batch.msgs_per_s,
    );
    report.insert(
        "mosquitto_publish_batch_mib_per_s",
        figures.batch_mib_per_s(),
    );
    report.insert("mosquitto_publish_rtt_p50_ms", figures.rtt.p50_ms);
    report.insert("mosquitto_publish_rtt_p99_ms", figures.rtt.p99_ms);
    report.insert("mosquitto_connect_ms", figures.connect_ms());
    if let Some(number) = version.number {
        report.insert("mosquitto_version_number", number);
    }
    Ok(())
}

/// `mosquitto` from /usr/sbin or the PATH; installed with apt-get if absent.
fn find_or_install() -> anyhow::Result<PathBuf> {
    if let Some(found) = find() {
        return Ok(found);
    }
    let root = current_uid()? == 0;
    let apt = |args: &[&str]| -> anyhow::Result<bool> {
        let mut cmd = if root {
            Command::new("apt-get")
        } else {
            let mut sudo = Command::new("sudo");
            sudo.arg("apt-get");
            sudo
        };
        cmd.args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null());
        eprintln!("  mosquitto is not installed; running {cmd:?}");
        let status = cmd
            .status()
            .with_context(|| format!("cannot run {cmd:?}"))?;
        Ok(status.success())
    };
    // A fresh machine may have no package lists yet: update once and retry.
    let installed = apt(&["install", "-y", "mosquitto"])?
        || (apt(&["update"])? && apt(&["install", "-y", "mosquitto"])?);
    if !installed {
        bail!("apt-get could not install mosquitto; install it and run again");
    }
    find().context("apt-get installed mosquitto but no mosquitto executable is found")
}

fn find() -> Option<PathBuf> {
    let sbin = PathBuf::from("/usr/sbin/mosquitto");
    if sbin.is_file() {
        return Some(sbin);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("mosquitto"))
        .find(|p| p.is_file())
}

struct Version {
    text: String,
    /// libmosquitto's convention: major * 1,000,000 + minor * 1,000 + revision.
    number: Option<f64>,
}

/// From the first line of `mosquitto -h`, "mosquitto version 2.0.11".
fn version(exe: &Path) -> anyhow::Result<Version> {
    let out = Command::new(exe)
        .arg("-h")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {} -h", exe.display()))?;
    let text = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("mosquitto version "))
        .map(|v| v.trim().to_owned())
        .context("`mosquitto -h` prints no version")?;
    let parts: Vec<Option<f64>> = text.split('.').map(|p| p.parse().ok()).collect();
    let number = match parts.as_slice() {
        [Some(major), Some(minor), Some(rev)] => Some(major * 1e6 + minor * 1e3 + rev),
        _ => None,
    };
    Ok(Version { text, number })
}

/// This process's real user id, from /proc (Linux).
fn current_uid() -> anyhow::Result<u32> {
    proc_uid("self")
}

fn proc_uid(pid: &str) -> anyhow::Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no Uid in /proc/{pid}/status"))
}

/// This process's user name (`id -un`).
fn current_user() -> anyhow::Result<String> {
    let out = Command::new("id")
        .arg("-un")
        .stdin(Stdio::null())
        .output()
        .context("cannot run `id -un`")?;
    let name = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || name.is_empty() {
        bail!("`id -un` failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(name)
}

/// A running mosquitto; dropping it kills the process.
struct Mosquitto {
    child: Child,
    addr: SocketAddr,
    uid: u32,
    log: PathBuf,
    stderr: PathBuf,
}

impl Mosquitto {
    /// Writes `mosquitto.conf` into `dir` and starts mosquitto as the current
    /// user; returns once it accepts TCP connections.
    async fn start(exe: &Path, dir: &Path, pki: &Pki) -> anyhow::Result<Self> {
        let port = {
            let probe = StdTcpListener::bind("127.0.0.1:0")?;
            probe.local_addr()?.port()
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log = dir.join("mosquitto.log");
        let stderr = dir.join("mosquitto.stderr");
        // Run as root, mosquitto 2 switches to the user `mosquitto` before it
        // reads the certificates and opens its log, and that user cannot read
        // the owner-only PKI in this temp dir. `user` set to the current user
        // keeps it as who we are (the option is ignored when not root).
        // `set_tcp_nodelay`: mosquitto leaves Nagle on by default, which adds
        // ~40 ms to every TLS handshake (measured: connect 44 ms without it,
        // ~1 ms with it); the hub's front door sets TCP_NODELAY too.
        let config = format!(
            "# fieldsync-bench: a loopback-only peer broker with mutual TLS 1.3.\n\
             per_listener_settings false\n\
             user {user}\n\
             listener {port} 127.0.0.1\n\
             cafile {ca}\n\
             certfile {cert}\n\
             keyfile {key}\n\
             require_certificate true\n\
             set_tcp_nodelay true\n\
             use_identity_as_username true\n\
             tls_version tlsv1.3\n\
             allow_anonymous false\n\
             persistence false\n\
             max_packet_size {MAX_PACKET_BYTES}\n\
             log_dest file {log}\n\
             log_type error\n\
             log_type warning\n\
             log_type notice\n\
             log_type information\n\
             connection_messages true\n",
            user = current_user()?,
            ca = pki.ca().display(),
            cert = pki.hub_cert().display(),
            key = pki.hub_key().display(),
            log = log.display(),
        );
        let config_path = dir.join("mosquitto.conf");
        std::fs::write(&config_path, config)?;
        let child = Command::new(exe)
            .arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr)?)
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        let mut broker = Self {
            child,
            addr,
            uid: 0,
            log,
            stderr,
        };
        broker.wait_ready().await?;
        broker.uid = proc_uid(&broker.child.id().to_string())?;
        let ours = current_uid()?;
        if broker.uid != ours {
            bail!(
                "mosquitto runs as uid {}, not as this process's uid {ours}",
                broker.uid
            );
        }
        Ok(broker)
    }

    /// Polls a TCP connect until it succeeds or the deadline passes; fails
    /// with the log if mosquitto exits first.
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            self.check_running()?;
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return Ok(());
            }
            if start.elapsed() > READY_DEADLINE {
                bail!(
                    "mosquitto does not accept connections on {} after {READY_DEADLINE:?}; {}",
                    self.addr,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Fails with the log if the process has exited.
    fn check_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            Some(status) => bail!("mosquitto exited ({status}); {}", self.log()),
            None => Ok(()),
        }
    }

    /// Its log file and its stderr.
    fn log(&self) -> String {
        format!(
            "log {}:\n{}\nstderr:\n{}",
            self.log.display(),
            read_lossy(&self.log),
            read_lossy(&self.stderr)
        )
    }

    /// Error and warning lines of its log once a client has connected (what
    /// comes before is the readiness probe: a bare TCP connect, no TLS).
    fn log_problems(&self) -> Vec<String> {
        read_lossy(&self.log)
            .lines()
            .skip_while(|l| !l.contains("New client connected"))
            .filter(|l| {
                let lower = l.to_lowercase();
                ["error", "warning", "failed"]
                    .iter()
                    .any(|w| lower.contains(w))
            })
            .map(str::to_owned)
            .collect()
    }
}

fn read_lossy(path: &Path) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
