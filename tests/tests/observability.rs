//! What operators' tools read from both programs, end to end with a real
//! `fieldsync-hub run`, a real agent and real TLS: `GET /metrics` parsed as
//! a Prometheus server parses it, with the names the README documents and
//! values that match the traffic; and `[log] format = "json"`, where every
//! line on stderr is one JSON object with the documented fields and no line
//! carries a record's field value.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use fieldsync_e2e::fleet::{Pki, TempHub, FLEET_POLICY, TOKEN};
use fieldsync_e2e::{
    agent_command, eventually, expect_failure, hub_command, output_within, AgentSetup, TempAgent,
    COMMAND_TIMEOUT,
};
use prometheus_parse::{LineInfo, Scrape, Value as Sample};
use reqwest::StatusCode;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

/// The hub's names beside its counters (README, "Metrics"); every counter of
/// `GET /v1/metrics` is also `fieldsync_hub_<name>_total`.
const HUB_NAMES: [&str; 7] = [
    "fieldsync_hub_agents_connected",
    "fieldsync_hub_agents_stalled",
    "fieldsync_hub_history_bytes",
    "fieldsync_hub_history_dropped_total",
    "fieldsync_hub_commit_seconds",
    "fieldsync_hub_batch_changes",
    "fieldsync_hub_sync_lag_seconds",
];

/// The agent's names (README, "Metrics").
const AGENT_NAMES: [&str; 21] = [
    "fieldsync_agent_commits_total",
    "fieldsync_agent_write_requests_total",
    "fieldsync_agent_writes_total",
    "fieldsync_agent_downstream_commits_total",
    "fieldsync_agent_downstream_changes_total",
    "fieldsync_agent_batches_sent_total",
    "fieldsync_agent_resyncs_sent_total",
    "fieldsync_agent_resyncs_received_total",
    "fieldsync_agent_history_dropped_total",
    "fieldsync_agent_history_bytes",
    "fieldsync_agent_clock_refused_total",
    "fieldsync_agent_schema_refused_total",
    "fieldsync_agent_schema_refused_down_total",
    "fieldsync_agent_connected",
    "fieldsync_agent_outbox_pending",
    "fieldsync_agent_clock_offset_seconds",
    "fieldsync_agent_resync_running",
    "fieldsync_agent_identity_conflict",
    "fieldsync_agent_write_requests_queued",
    "fieldsync_agent_commit_seconds",
    "fieldsync_agent_batch_changes",
];

/// A scrape, parsed and indexed by metric name.
struct Exposition {
    /// `# TYPE` of each metric family.
    types: HashMap<String, String>,
    /// `# HELP` of each metric family.
    docs: HashMap<String, String>,
    samples: HashMap<String, Sample>,
}

impl Exposition {
    /// Parses `text` with `prometheus-parse`, and first checks what that
    /// parser would skip silently: every line is a comment it knows or a
    /// sample it reads, and every family has a `# HELP` and a `# TYPE`.
    fn parse(text: &str) -> Self {
        let mut types = HashMap::new();
        for line in text.lines() {
            match LineInfo::parse(line) {
                LineInfo::Ignored => panic!("not in the text format: {line:?}\n{text}"),
                LineInfo::Sample { value, .. } => {
                    assert!(value.parse::<f64>().is_ok(), "bad value in {line:?}")
                }
                _ => {}
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
                types.insert(name.to_owned(), kind.to_owned());
            }
        }
        let scrape =
            Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("prometheus-parse");
        for name in types.keys() {
            let help = scrape.docs.get(name).map(String::as_str).unwrap_or("");
            assert!(!help.trim().is_empty(), "{name} has no HELP");
        }
        let samples = scrape
            .samples
            .into_iter()
            .map(|s| (s.metric, s.value))
            .collect();
        Self {
            types,
            docs: scrape.docs,
            samples,
        }
    }

    fn kind(&self, name: &str) -> &str {
        self.types
            .get(name)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("{name} is not served"))
    }

    /// A counter's or gauge's value.
    fn value(&self, name: &str) -> f64 {
        match self.samples.get(name) {
            Some(Sample::Counter(v) | Sample::Gauge(v)) => *v,
            other => panic!("{name}: expected a counter or gauge, got {other:?}"),
        }
    }

    /// A histogram's (count, sum), after checking its buckets are cumulative
    /// and end at `+Inf` with the count.
    fn histogram(&self, name: &str) -> (f64, f64) {
        assert_eq!(self.kind(name), "histogram", "{name}");
        let Some(Sample::Histogram(buckets)) = self.samples.get(name) else {
            panic!("{name} has no buckets");
        };
        let untyped = |suffix: &str| match self.samples.get(&format!("{name}{suffix}")) {
            Some(Sample::Untyped(v)) => *v,
            other => panic!("{name}{suffix}: {other:?}"),
        };
        let (count, sum) = (untyped("_count"), untyped("_sum"));
        assert!(
            buckets.windows(2).all(|w| w[0].count <= w[1].count),
            "{name}: buckets not cumulative"
        );
        let last = buckets.last().expect("at least the +Inf bucket");
        assert!(last.less_than.is_infinite(), "{name}: no +Inf bucket");
        assert_eq!(last.count, count, "{name}: +Inf bucket vs count");
        (count, sum)
    }
}

async fn scrape(http: &reqwest::Client, url: &str, token: Option<&str>) -> (StatusCode, String) {
    let mut request = http.get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let r = request.send().await.expect("GET /metrics");
    let status = r.status();
    if status == StatusCode::OK {
        let kind = r.headers()[reqwest::header::CONTENT_TYPE].to_str().unwrap();
        assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
    }
    (status, r.text().await.unwrap())
}

async fn status_of(http: &reqwest::Client, agent: &TempAgent) -> Value {
    http.get(agent.url("/v1/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn metrics_parse_on_both_programs_with_the_documented_names() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(&dir.path().join("pki")).unwrap();
    let hub = TempHub::start(dir.path(), &pki, FLEET_POLICY).unwrap();
    let agent = hub.agent(&pki, "gw-metrics", None).unwrap();
    let http = reqwest::Client::new();
    eventually("the agent to link", WAIT, || async {
        (status_of(&http, &agent).await["connected"] == true).then_some(())
    })
    .await
    .unwrap();

    // 20 record writes in 11 requests: 10 PUTs, then one batch of 10.
    for i in 0..10 {
        let r = http
            .put(agent.url(&format!("/v1/records/patients/p{i}")))
            .json(&json!({"initials": "AB", "ward": i}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    let writes: Vec<Value> = (10..20)
        .map(|i| json!({"collection": "patients", "key": format!("p{i}"), "fields": {"ward": i}}))
        .collect();
    let r = http
        .post(agent.url("/v1/batch"))
        .json(&json!({ "writes": writes }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    eventually("the hub to acknowledge every write", WAIT, || async {
        let s = status_of(&http, &agent).await;
        (s["outbox_pending"] == 0 && s["outbox_acked_seq"] == 20).then_some(())
    })
    .await
    .unwrap();
    assert!(hub
        .record("gw-metrics", "patients", "p19")
        .await
        .unwrap()
        .is_some());

    // The hub: behind the operator token like every route but health.
    let url = format!("{}/metrics", hub.api_url());
    assert_eq!(scrape(&http, &url, None).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        scrape(&http, &url, Some("not-the-token-at-all")).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (status, json) = hub.get("/v1/metrics").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let (status, text) = scrape(&http, &url, Some(TOKEN)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let hub_metrics = Exposition::parse(&text);

    // Every counter of the JSON is a Prometheus counter, read no earlier.
    let counters = json.as_object().unwrap();
    assert!(counters.len() > 30, "{json}");
    for (name, value) in counters {
        // The JSON's two levels are gauges, checked below.
        if name == "agents_connected" || name == "agents_stalled" {
            continue;
        }
        let prom = format!("fieldsync_hub_{name}_total");
        assert_eq!(hub_metrics.kind(&prom), "counter", "{prom}");
        assert!(
            hub_metrics.value(&prom) >= value.as_f64().unwrap(),
            "{prom} went back"
        );
        assert!(!hub_metrics.docs[&prom].is_empty(), "{prom} has no HELP");
    }
    for name in HUB_NAMES {
        hub_metrics.kind(name);
    }
    assert!(hub_metrics.value("fieldsync_hub_upstream_changes_applied_total") >= 20.0);
    assert!(hub_metrics.value("fieldsync_hub_upstream_batches_applied_total") >= 1.0);
    assert!(hub_metrics.value("fieldsync_hub_connections_accepted_total") >= 1.0);
    assert_eq!(hub_metrics.kind("fieldsync_hub_agents_connected"), "gauge");
    assert_eq!(hub_metrics.value("fieldsync_hub_agents_connected"), 1.0);
    assert_eq!(hub_metrics.kind("fieldsync_hub_agents_stalled"), "gauge");
    assert_eq!(hub_metrics.value("fieldsync_hub_agents_stalled"), 0.0);
    let (commits, commit_time) = hub_metrics.histogram("fieldsync_hub_commit_seconds");
    assert!(commits >= 1.0 && commit_time > 0.0 && commit_time < 60.0 * commits);
    let (batches, changes) = hub_metrics.histogram("fieldsync_hub_batch_changes");
    assert_eq!(
        (batches, changes),
        (
            hub_metrics.value("fieldsync_hub_upstream_batches_applied_total"),
            hub_metrics.value("fieldsync_hub_upstream_changes_applied_total")
        )
    );
    let (lagged, lag) = hub_metrics.histogram("fieldsync_hub_sync_lag_seconds");
    assert_eq!(lagged, batches);
    // A live link on one machine: well under a minute per batch.
    assert!(
        lag >= 0.0 && lag < 60.0 * lagged,
        "lag {lag} s over {lagged}"
    );

    // The agent: on its local API, which has no token (yet).
    let (status, text) = scrape(&http, &agent.url("/metrics"), None).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let agent_metrics = Exposition::parse(&text);
    let served: BTreeSet<&str> = agent_metrics.types.keys().map(String::as_str).collect();
    assert_eq!(served, BTreeSet::from(AGENT_NAMES), "{text}");
    assert_eq!(
        agent_metrics.value("fieldsync_agent_write_requests_total"),
        11.0
    );
    assert_eq!(agent_metrics.value("fieldsync_agent_writes_total"), 20.0);
    let commits = agent_metrics.value("fieldsync_agent_commits_total");
    assert!((1.0..=11.0).contains(&commits), "{commits}");
    assert_eq!(agent_metrics.value("fieldsync_agent_connected"), 1.0);
    assert_eq!(agent_metrics.value("fieldsync_agent_outbox_pending"), 0.0);
    assert_eq!(
        agent_metrics.value("fieldsync_agent_identity_conflict"),
        0.0
    );
    assert!(agent_metrics.value("fieldsync_agent_batches_sent_total") >= 1.0);
    let offset = agent_metrics.value("fieldsync_agent_clock_offset_seconds");
    assert!(offset.abs() < 60.0, "{offset}");
    let (count, sum) = agent_metrics.histogram("fieldsync_agent_commit_seconds");
    assert_eq!(count, commits);
    assert!(sum > 0.0);
    let (count, sum) = agent_metrics.histogram("fieldsync_agent_batch_changes");
    assert_eq!((count, sum), (commits, 20.0));
}

/// The agent's policy: more than the hub accepts (`notes`, and a whole
/// collection `diary`), so the hub logs what it drops — by name.
const AGENT_POLICY: &str = r#"
[collections.patients]
direction = "up"
sync = ["initials", "ward", "notes"]

[collections.diary]
direction = "up"
sync = ["entry"]

[collections.settings]
direction = "both"
sync = ["mode", "threshold"]
"#;

/// The lines of a log written so far: only whole lines (the process may be
/// writing the next one).
fn whole_lines(log: &str) -> Vec<&str> {
    let end = log.rfind('\n').map_or(0, |i| i + 1);
    log[..end]
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect()
}

/// Every line is one JSON object with the documented fields; returns them.
fn json_lines(program: &str, log: &str) -> Vec<Value> {
    let lines = whole_lines(log);
    assert!(!lines.is_empty(), "{program} logged nothing");
    lines
        .iter()
        .map(|line| {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{program}: not JSON ({e}): {line}"));
            for field in fieldsync_shared::logging::JSON_FIELDS {
                assert!(v[field].is_string(), "{program}: no {field} in {line}");
            }
            let level = v["level"].as_str().unwrap();
            assert!(
                ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&level),
                "{line}"
            );
            v
        })
        .collect()
}

#[tokio::test]
async fn json_logs_on_both_programs_carry_no_record_value() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(&dir.path().join("pki")).unwrap();
    // Our own code at debug: its most talkative lines are checked too.
    let filter = "info,fieldsync_hub=debug,fieldsync_agent=debug,fieldsync_shared=debug";
    // The hub through the environment override, the agent through its file.
    let hub = TempHub::start_with_env(
        dir.path(),
        &pki,
        FLEET_POLICY,
        "",
        &[("FIELDSYNC__LOG__FORMAT", "json"), ("RUST_LOG", filter)],
    )
    .unwrap();
    let id = "gw-logs";
    pki.issue(id).unwrap();
    let agent = TempAgent::start_with(AgentSetup {
        link: Some(pki.link(id, &hub.mqtt_url())),
        id: Some(id.to_owned()),
        policy: Some(AGENT_POLICY.to_owned()),
        env: vec![("RUST_LOG".to_owned(), filter.to_owned())],
        extra_config: "[log]\nformat = \"json\"".to_owned(),
        ..AgentSetup::default()
    })
    .unwrap();
    let http = reqwest::Client::new();

    // One canary in every value: permitted, refused by the hub, local-only,
    // a whole collection the hub refuses, and an operator write down.
    let canary = format!("canary-{:016x}", rand::random::<u64>());
    let r = http
        .put(agent.url("/v1/records/patients/p1"))
        .json(&json!({"initials": canary, "notes": canary, "ssn": canary, "ward": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = http
        .put(agent.url("/v1/records/diary/d1"))
        .json(&json!({ "entry": canary }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let (status, _) = hub
        .put(
            &format!("/v1/agents/{id}/records/settings/s1"),
            &json!({ "mode": canary }),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::ACCEPTED);

    eventually("both writes to sync", WAIT, || async {
        let up = hub.record(id, "patients", "p1").await.unwrap()?;
        let down: Value = http
            .get(agent.url("/v1/records/settings/s1"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let acked = status_of(&http, &agent).await["outbox_pending"] == 0;
        (up["initials"] == canary.as_str() && down["fields"]["mode"] == canary.as_str() && acked)
            .then_some(up)
    })
    .await
    .map(|up| assert!(up.get("notes").is_none(), "{up}"))
    .unwrap();
    // The hub logged what it dropped, by name.
    let hub_lines = eventually("the hub to log the dropped fields", WAIT, || async {
        let lines = json_lines("hub", &hub.stderr_log());
        let dropped = lines.iter().any(|l| {
            l["message"] == "dropped fields the hub policy does not permit upstream"
                && l["fields"].as_str().is_some_and(|f| f.contains("notes"))
        });
        dropped.then_some(lines)
    })
    .await
    .unwrap();
    assert!(hub_lines.iter().any(|l| l["message"] == "hub listening"));
    let agent_lines = json_lines("agent", &agent.stderr_log());
    assert!(agent_lines
        .iter()
        .any(|l| l["message"] == "linked to the hub" && l["target"] == "fieldsync_agent::link"));

    for (program, log) in [("hub", hub.stderr_log()), ("agent", agent.stderr_log())] {
        assert!(
            !log.contains(&canary),
            "{program} logged a record value:\n{log}"
        );
    }
}

#[test]
fn a_fatal_error_after_the_config_is_read_is_a_json_line_too() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(&dir.path().join("pki")).unwrap();
    pki.issue("gw-busy").unwrap();
    // Both programs are told to serve their API on an address already taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap();
    std::fs::write(dir.path().join("policy.toml"), FLEET_POLICY).unwrap();
    std::fs::write(
        dir.path().join("hub.toml"),
        format!(
            "[hub]\ndata_dir = \"hub-data\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
             [api]\nlisten = \"{busy}\"\ntoken = \"{TOKEN}\"\n[policy]\nfile = \"policy.toml\"\n[log]\nformat = \"json\"\n",
            pki.ca(),
            pki.hub_cert(),
            pki.hub_key()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("agent.toml"),
        format!(
            "[agent]\nid = \"gw-busy\"\ndata_dir = \"agent-data\"\n[api]\nlisten = \"{busy}\"\n\
             [policy]\nfile = \"policy.toml\"\n"
        ),
    )
    .unwrap();
    let mut hub = hub_command();
    hub.arg("run")
        .arg("--config")
        .arg(dir.path().join("hub.toml"));
    let mut agent = agent_command();
    agent
        .env("FIELDSYNC__LOG__FORMAT", "json")
        .arg("run")
        .arg("--config")
        .arg(dir.path().join("agent.toml"));
    for (program, cmd) in [("hub", hub), ("agent", agent)] {
        let out = output_within(cmd, COMMAND_TIMEOUT).unwrap();
        let stderr = expect_failure(&out);
        let lines = json_lines(program, &stderr);
        let last = lines.last().unwrap();
        assert_eq!(last["level"], "ERROR", "{program}: {stderr}");
        assert!(
            last["error"]
                .as_str()
                .is_some_and(|e| e.contains("api.listen")),
            "{program}: {stderr}"
        );
    }

    // An error in the configuration itself comes before logging: plain text.
    let mut cmd = hub_command();
    cmd.env("FIELDSYNC__LOG__FORMAT", "json")
        .arg("run")
        .arg("--config")
        .arg(dir.path().join("missing.toml"));
    let stderr = expect_failure(&output_within(cmd, COMMAND_TIMEOUT).unwrap());
    assert!(
        stderr.starts_with("fieldsync-hub: cannot read config"),
        "{stderr}"
    );
    drop(taken);
}
