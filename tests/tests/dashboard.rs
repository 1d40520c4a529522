//! The hub's fleet dashboard (`/ui`) end to end, against a real hub with real
//! agents: the page is served without the token and holds no fleet data, with
//! a strict CSP; and, with `FIELDSYNC_BROWSER` naming a Chromium binary, real
//! headless Chromium runs its script: no token shows the login form, a wrong
//! one sends it back there with a clear message, the operator token (from
//! `#token=`) shows both agents with their states, and the record browser
//! (pre-filled from the fragment) shows a record's fields as text — markup in
//! a value stays text — or the API's 404 message. A second browser case
//! serves the dashboard's files beside a canned `/v1/agents` to check what a
//! live hub does not produce on demand: labels, certificate expiry and serial,
//! and the stalled, clock-skew and expiry flags. Screenshots are saved to
//! `target/dashboard/dashboard.png` and `dashboard-flags.png`.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use axum::response::IntoResponse;
use fieldsync_e2e::durability::{http, poll, wait_row, Fleet, Write, SYNC_TIMEOUT};
use fieldsync_e2e::fleet::TOKEN;
use fieldsync_e2e::output_within;
use reqwest::{header, StatusCode};
use serde_json::json;

/// Names the Chromium binary (a path, or a name on `PATH`); the browser test
/// is skipped without it.
const BROWSER_ENV: &str = "FIELDSYNC_BROWSER";
/// Longest a single headless Chromium run may take (a loaded 2-core machine).
const BROWSER_TIMEOUT: Duration = Duration::from_secs(120);

const NORTH: &str = "gw-dash-north";
const SOUTH: &str = "gw-dash-south";

/// A value with markup in it: the page must show it as text.
const MARKUP: &str = "<b id=\"xss\">JD</b>";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_served_without_the_token_and_holds_no_fleet_data() -> anyhow::Result<()> {
    let fleet = Fleet::start()?;
    let (_agent, _api) = fleet.linked_agent("gw-dash-plain").await?;
    let op = fleet.operator();
    wait_row(&op, "gw-dash-plain", "the hub knows the agent", |r| {
        r["connected"] == true
    })
    .await?;
    let client = http();
    let base = fleet.hub.api_url();

    for path in ["/ui", "/ui/"] {
        let r = client.get(format!("{base}{path}")).send().await?;
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        let headers = r.headers().clone();
        let value = |name: header::HeaderName| {
            headers
                .get(&name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_else(|| panic!("{path}: no {name} header in {headers:?}"))
                .to_owned()
        };
        assert!(
            value(header::CONTENT_TYPE).starts_with("text/html"),
            "{headers:?}"
        );
        let csp = value(header::CONTENT_SECURITY_POLICY);
        assert!(csp.contains("default-src 'self'"), "{csp}");
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert_eq!(value(header::X_CONTENT_TYPE_OPTIONS), "nosniff");
        assert_eq!(value(header::REFERRER_POLICY), "no-referrer");
        assert_eq!(value(header::CACHE_CONTROL), "no-store");
        let page = r.text().await?;
        assert!(page.contains(r#"id="login-form""#), "{page}");
        assert!(page.contains(r#"<script src="/ui/app.js" defer></script>"#));
        assert!(!page.contains(TOKEN), "the page holds no token");
        assert!(
            !page.contains("gw-dash-plain"),
            "the page holds no fleet data"
        );
    }

    for (path, kind) in [
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
    ] {
        let r = client.get(format!("{base}{path}")).send().await?;
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        let content_type = r
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(content_type.starts_with(kind), "{path}: {content_type}");
        assert_eq!(
            r.headers()
                .get(header::X_CONTENT_TYPE_OPTIONS)
                .and_then(|v| v.to_str().ok()),
            Some("nosniff"),
            "{path}"
        );
        let text = r.text().await?;
        assert!(!text.contains(TOKEN) && !text.contains("gw-dash-plain"));
    }

    // Mounting the page opened nothing else: the fleet still needs the token.
    let r = client.get(format!("{base}/v1/agents")).send().await?;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_chromium_shows_the_fleet_and_browses_a_record() -> anyhow::Result<()> {
    let Some(browser) = browser("headless_chromium_shows_the_fleet_and_browses_a_record") else {
        return Ok(());
    };

    // A hub with two agents: north stays linked and holds a record, south
    // is killed so the hub shows it offline.
    let fleet = Fleet::start()?;
    let (_north, north_api) = fleet.linked_agent(NORTH).await?;
    let (mut south, _south_api) = fleet.linked_agent(SOUTH).await?;
    let op = fleet.operator();
    let record = json!({"initials": MARKUP, "ward": 7, "heart_rate": 72});
    north_api
        .put(&Write::new("patients", "p-1", record.clone()))
        .await?;
    poll("the hub's copy of the record", SYNC_TIMEOUT, || async {
        Ok(match op.record(NORTH, "patients", "p-1").await? {
            Some(fields) if fields == record => Ok(()),
            other => Err(format!("{other:?}")),
        })
    })
    .await?;
    wait_row(&op, SOUTH, "south linked", |r| r["connected"] == true).await?;
    south.kill();
    wait_row(&op, SOUTH, "south offline", |r| r["state"] == "offline").await?;
    let north_now = wait_row(&op, NORTH, "north connected", |r| r["connected"] == true).await?;
    let (status, body) = fleet
        .hub
        .operator()
        .put(
            &format!("/v1/agents/{NORTH}/labels"),
            &json!({"site": "berlin", "model": "gw3"}),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let serial = north_now["serial"]
        .as_str()
        .unwrap_or_else(|| panic!("the hub shows north's certificate: {north_now}"))
        .to_owned();

    let scratch = tempfile::Builder::new()
        .prefix("fieldsync-dashboard-")
        .tempdir()?;
    let chromium = Chromium {
        bin: browser,
        scratch: scratch.path().to_owned(),
        page: format!("{}/ui", fleet.hub.api_url()),
        runs: Cell::new(0),
    };

    // No token: the login form, and nothing of the fleet.
    let dom = chromium.dump_dom("")?;
    assert!(visible(&dom, "login"), "{dom}");
    assert!(!visible(&dom, "dashboard"), "{dom}");
    assert!(dom.contains(r#"id="login-form""#), "{dom}");
    assert!(!dom.contains(NORTH) && !dom.contains(SOUTH), "{dom}");

    // A wrong token: the API's 401 sends the page back to the login form.
    let dom = chromium.dump_dom("#token=not-the-operator-token")?;
    assert!(visible(&dom, "login"), "{dom}");
    assert!(visible(&dom, "login-message"), "{dom}");
    assert!(dom.contains("The hub refused the token (401"), "{dom}");
    assert!(!dom.contains(NORTH) && !dom.contains(SOUTH), "{dom}");

    // The token and a record to show: both agents, their states, the record.
    let fragment = format!("#token={TOKEN}&agent={NORTH}&collection=patients&key=p-1");
    let dom = chromium.dump_dom(&fragment)?;
    assert!(!visible(&dom, "login"), "{dom}");
    assert!(visible(&dom, "dashboard"), "{dom}");
    assert!(!dom.contains(TOKEN), "the token is not in the page: {dom}");
    assert!(dom.contains("2 agents"), "the summary: {dom}");
    assert!(dom.contains("1 connected"), "the summary: {dom}");
    let south_row = agent_row(&dom, SOUTH);
    assert!(south_row.contains(r#"data-state="offline""#), "{south_row}");
    assert!(south_row.contains(">offline</span>"), "{south_row}");
    let north_row = agent_row(&dom, NORTH);
    assert!(
        ["idle", "syncing"]
            .iter()
            .any(|s| north_row.contains(&format!(">{s}</span>"))),
        "north is connected: {north_row}"
    );
    // The live hub's labels and certificate, as the page shows them.
    assert!(north_row.contains(">model=gw3</li>"), "labels: {north_row}");
    assert!(
        north_row.contains(">site=berlin</li>"),
        "labels: {north_row}"
    );
    assert!(
        north_row.contains(&format!("serial {serial}")),
        "serial: {north_row}"
    );
    for row in [&north_row, &south_row] {
        assert!(row.contains("<time datetime=\""), "last seen: {row}");
        assert!(row.contains(" ago</time>") || row.contains(">just now</time>"));
    }
    assert!(dom.contains(r#"id="record-form""#), "{dom}");
    let fields = between(&dom, r#"<table id="record-fields">"#, "</table>")
        .unwrap_or_else(|| panic!("no record table: {dom}"));
    assert!(
        fields.contains(r#"<tr data-field="heart_rate"><th scope="row">heart_rate</th><td class="json">72</td></tr>"#),
        "{fields}"
    );
    assert!(
        fields.contains("<td>&lt;b id=\"xss\"&gt;JD&lt;/b&gt;</td>"),
        "markup in a value is shown as text: {fields}"
    );
    assert!(
        !dom.contains(r#"<b id="xss">"#),
        "a value became markup: {dom}"
    );
    assert!(dom.contains("History:"), "the history placeholder: {dom}");

    // A record the hub does not have: the API's message.
    let dom = chromium.dump_dom(&format!(
        "#token={TOKEN}&agent={NORTH}&collection=patients&key=p-missing"
    ))?;
    let error = between(&dom, r#"id="record-error""#, "</p>")
        .unwrap_or_else(|| panic!("no record error: {dom}"));
    assert!(
        error.contains(r#"the hub has no record "p-missing""#) && error.contains("HTTP 404"),
        "{error}"
    );

    // The screenshot, for people.
    let png = screenshot_path("dashboard.png")?;
    chromium.screenshot(&fragment, &png)?;
    check_png(&png)?;
    Ok(())
}

/// `target/dashboard/NAME`, its folder made and any older file removed.
fn screenshot_path(name: &str) -> anyhow::Result<PathBuf> {
    let dir = target_dir().join("dashboard");
    std::fs::create_dir_all(&dir)?;
    let png = dir.join(name);
    let _ = std::fs::remove_file(&png);
    Ok(png)
}

/// Fails unless `png` is a 1280x900 PNG with more than a blank page in it.
fn check_png(png: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(png)?;
    assert!(
        bytes.len() > 30_000,
        "{}: a near-empty screenshot of {} bytes",
        png.display(),
        bytes.len()
    );
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG",
        png.display()
    );
    let dimensions = (
        u32::from_be_bytes(bytes[16..20].try_into()?),
        u32::from_be_bytes(bytes[20..24].try_into()?),
    );
    assert_eq!(dimensions, (1280, 900), "the window size");
    println!(
        "dashboard screenshot: {} ({} bytes)",
        png.display(),
        bytes.len()
    );
    Ok(())
}

/// The fields the hub does not serve yet (`labels`, `serial`, `not_after`)
/// and the flagged cases (stalled, a skewed clock, a certificate close to or
/// past expiry) as the page renders them: the dashboard's own files beside a
/// canned `GET /v1/agents`, in headless Chromium.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_chromium_renders_labels_certificates_and_flags() -> anyhow::Result<()> {
    let Some(browser) = browser("headless_chromium_renders_labels_certificates_and_flags") else {
        return Ok(());
    };
    const FIXTURE_TOKEN: &str = "fixture-token-0123456789";
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let day = 24 * hour;
    let time = |t: SystemTime| humantime::format_rfc3339_millis(t).to_string();
    let agents_a_reported = time(now - Duration::from_secs(5));
    let agents = json!({"agents": [
        {
            "id": "gw-fix-a", "connected": true, "state": "stalled",
            "outbox_pending": 1234, "outbox_bytes": 5_300_000, "oldest_pending_ms": 180_000,
            "drain_per_s": 0.0, "health_reported": agents_a_reported,
            "last_seen": time(now - Duration::from_secs(30)), "queue_pending": 3,
            "clock_skew_ms": 7200, "labels": {"site": "north", "role": MARKUP},
            "serial": "0a1b2c3d", "not_after": time(now + 10 * day + hour),
        },
        {
            "id": "gw-fix-b", "connected": true, "state": "idle",
            "outbox_pending": 0, "outbox_bytes": 0, "health_reported": time(now),
            "last_seen": time(now - Duration::from_secs(30)), "queue_pending": 0,
            "clock_skew_ms": -120, "labels": {}, "serial": "ff00",
            "not_after": time(now + 300 * day + hour),
        },
        {
            "id": "gw-fix-c", "connected": false, "state": "offline",
            "outbox_pending": null, "outbox_bytes": null, "health_reported": null,
            "last_seen": time(now - 3 * hour), "queue_pending": 12,
            "clock_skew_ms": null, "serial": "c0ffee",
            "not_after": time(now - 2 * day + hour),
        },
    ]});
    let app = fieldsync_hub::ui::router().route(
        "/v1/agents",
        axum::routing::get(move |headers: axum::http::HeaderMap| async move {
            let bearer = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if bearer == Some(FIXTURE_TOKEN) {
                axum::Json(agents).into_response()
            } else {
                StatusCode::UNAUTHORIZED.into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let scratch = tempfile::Builder::new()
        .prefix("fieldsync-dashboard-")
        .tempdir()?;
    let chromium = Chromium {
        bin: browser,
        scratch: scratch.path().to_owned(),
        page: format!("http://{addr}/ui"),
        runs: Cell::new(0),
    };
    // The server runs on this runtime: let its other worker serve while
    // this one waits for the browser.
    let fragment = format!("#token={FIXTURE_TOKEN}");
    let png = screenshot_path("dashboard-flags.png")?;
    let dom = tokio::task::block_in_place(|| {
        chromium.screenshot(&fragment, &png)?;
        chromium.dump_dom(&fragment)
    })?;
    server.abort();
    check_png(&png)?;

    let summary = between(&dom, r#"<p id="summary""#, "</p>").unwrap_or_default();
    for part in [
        "3 agents",
        "2 connected",
        "1 offline",
        r#"<span class="flag">1 stalled</span>"#,
    ] {
        assert!(summary.contains(part), "{part}: {summary}");
    }
    let a = agent_row(&dom, "gw-fix-a");
    for part in [
        r#"<span class="badge state-stalled" title="connected to the hub">stalled</span>"#,
        ">1234 pending · 5.1 MiB</span>",
        ">3</td>",
        ">⚠ +7.2 s</span>",
        "(in 10 d)</time>",
        r#"<span class="serial muted">serial 0a1b2c3d</span>"#,
        r#"<li class="label">role=&lt;b id="xss"&gt;JD&lt;/b&gt;</li><li class="label">site=north</li>"#,
    ] {
        assert!(a.contains(part), "{part}: {a}");
    }
    // Last seen: the later of the last hello and the last health report.
    let reported = format!(r#"<time datetime="{}""#, agents_a_reported);
    assert!(a.contains(&reported) && a.contains(" s ago</time>"), "{a}");
    assert!(
        a.contains(r#"class="flag">⚠ "#),
        "the expiry within 30 days is flagged: {a}"
    );
    let b = agent_row(&dom, "gw-fix-b");
    for part in [">idle</span>", ">−120 ms</span>", "(in 300 d)</time>"] {
        assert!(b.contains(part), "{part}: {b}");
    }
    assert!(!b.contains("flag"), "nothing flagged: {b}");
    assert!(b.contains(">—</span></td></tr>"), "no labels: {b}");
    let c = agent_row(&dom, "gw-fix-c");
    for part in [
        ">offline</span>",
        r#"<span class="muted" title="no health report yet">—</span>"#,
        ">12</td>",
        ">3 h ago</time>",
        r#"class="flag bad">⚠ expired 2 d ago</time>"#,
    ] {
        assert!(c.contains(part), "{part}: {c}");
    }
    assert!(
        !dom.contains(r#"<b id="xss">"#),
        "a label became markup: {dom}"
    );
    Ok(())
}

/// The browser named by [`BROWSER_ENV`]; without it, says that `test` is
/// skipped and why.
fn browser(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os(BROWSER_ENV).filter(|b| !b.is_empty());
    if found.is_none() {
        println!(
            "{test}: skipped, {BROWSER_ENV} is not set (set it to a Chromium binary, e.g. {BROWSER_ENV}=chromium, to run the dashboard in a headless browser)"
        );
    }
    found.map(PathBuf::from)
}

/// Headless Chromium runs against the dashboard at `page`.
struct Chromium {
    bin: PathBuf,
    /// Each run gets its own profile folder here.
    scratch: PathBuf,
    page: String,
    runs: Cell<u32>,
}

impl Chromium {
    fn command(&self) -> anyhow::Result<Command> {
        self.runs.set(self.runs.get() + 1);
        let profile = self.scratch.join(format!("profile-{}", self.runs.get()));
        std::fs::create_dir_all(&profile)?;
        let mut cmd = Command::new(&self.bin);
        cmd.args([
            "--headless",
            // Root (as in CI containers) cannot use the sandbox.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--window-size=1280,900",
            // Runs the page's timers (the 5 s refresh too) and waits for its
            // requests, then acts on the page as it is.
            "--virtual-time-budget=10000",
            "--no-proxy-server",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-extensions",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()));
        Ok(cmd)
    }

    /// The page's DOM after its script ran, for `/ui` plus `fragment`.
    fn dump_dom(&self, fragment: &str) -> anyhow::Result<String> {
        let mut cmd = self.command()?;
        cmd.arg("--dump-dom")
            .arg(format!("{}{fragment}", self.page));
        let out = output_within(cmd, BROWSER_TIMEOUT)?;
        let dom = String::from_utf8_lossy(&out.stdout).into_owned();
        anyhow::ensure!(
            out.status.success() && dom.contains("</html>"),
            "{} --dump-dom failed ({}); stderr:\n{}",
            self.bin.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(dom)
    }

    /// A 1280x900 PNG of `/ui` plus `fragment` at `png`.
    fn screenshot(&self, fragment: &str, png: &Path) -> anyhow::Result<()> {
        let mut cmd = self.command()?;
        cmd.arg(format!("--screenshot={}", png.display()))
            .arg(format!("{}{fragment}", self.page));
        let out = output_within(cmd, BROWSER_TIMEOUT)?;
        anyhow::ensure!(
            out.status.success() && png.is_file(),
            "{} --screenshot failed ({}); stderr:\n{}",
            self.bin.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}

/// The text from `start` to the next `end` (both included).
fn between(text: &str, start: &str, end: &str) -> Option<String> {
    let from = text.find(start)?;
    let to = text[from..].find(end)? + from + end.len();
    Some(text[from..to].to_owned())
}

/// The agents-table row of `agent`.
fn agent_row(dom: &str, agent: &str) -> String {
    between(dom, &format!(r#"<tr data-agent="{agent}""#), "</tr>")
        .unwrap_or_else(|| panic!("no row for {agent}: {dom}"))
}

/// Whether the element with `id` is in the page and not `hidden`.
fn visible(dom: &str, id: &str) -> bool {
    let marker = format!(r#"id="{id}""#);
    let Some(at) = dom.find(&marker) else {
        return false;
    };
    let open = dom[..at].rfind('<').unwrap_or(0);
    let close = at + dom[at..].find('>').unwrap_or(0);
    !dom[open..close].contains(" hidden")
}

/// The workspace's target folder (`CARGO_TARGET_DIR` when set).
fn target_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the e2e crate sits in the workspace");
    match std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        // A relative CARGO_TARGET_DIR is relative to where cargo ran: the
        // workspace, for the commands the README gives.
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    }
}
