//! Bad input to the agent gets a clear error and changes nothing: malformed or
//! mistyped requests to the local API, bad names, oversized or overdeep bodies,
//! malformed CLI arguments, and malformed config and policy files (which stop
//! `fieldsync-agent run` at once with a message naming the key at fault).

use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use fieldsync_e2e::{
    agent_command, cli, expect_failure, output_within, TempAgent, LISTENING_PREFIX, PATIENTS_POLICY,
};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// What the agent holds that bad requests must not change.
#[derive(Debug, PartialEq)]
struct Snapshot {
    p1: Value,
    p2: Value,
    status: Value,
    outbox: Value,
}

async fn get_ok(http: &reqwest::Client, url: String) -> Value {
    let response = http.get(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "GET {url}");
    response.json().await.unwrap()
}

async fn snapshot(http: &reqwest::Client, agent: &TempAgent) -> Snapshot {
    Snapshot {
        p1: get_ok(http, agent.url("/v1/records/patients/p1")).await,
        p2: get_ok(http, agent.url("/v1/records/patients/p2")).await,
        status: get_ok(http, agent.url("/v1/status")).await,
        outbox: get_ok(http, agent.url("/v1/outbox?limit=1000")).await,
    }
}

/// One bad request, the `error.code` it must get and text its message must hold.
struct Case {
    name: &'static str,
    method: Method,
    path: String,
    body: Vec<u8>,
    code: &'static str,
    says: &'static str,
}

fn c(
    name: &'static str,
    method: Method,
    path: impl Into<String>,
    body: impl Into<Vec<u8>>,
    code: &'static str,
    says: &'static str,
) -> Case {
    Case {
        name,
        method,
        path: path.into(),
        body: body.into(),
        code,
        says,
    }
}

/// The status that goes with an error code.
fn status_of(code: &str) -> StatusCode {
    match code {
        "payload_too_large" => StatusCode::PAYLOAD_TOO_LARGE,
        "not_found" | "no_route" => StatusCode::NOT_FOUND,
        _ => StatusCode::BAD_REQUEST,
    }
}

const P1: &str = "/v1/records/patients/p1";
const WARD: &str = r#"{"ward": 1}"#;

/// `{"ward": [[...1...]]}` with `depth` levels of arrays.
fn nested(depth: usize) -> String {
    format!("{{\"ward\": {}1{}}}", "[".repeat(depth), "]".repeat(depth))
}

/// A batch body of `writes`.
fn batch(writes: Value) -> String {
    json!({ "writes": writes }).to_string()
}

#[rustfmt::skip]
fn api_cases() -> Vec<Case> {
    use Method as M;
    let many_fields: serde_json::Map<String, Value> =
        (0..1001).map(|i| (format!("f{i}"), json!(i))).collect();
    let many_fields = Value::Object(many_fields).to_string();
    let many_writes = batch(
        (0..1001)
            .map(|i| json!({"collection": "patients", "key": format!("k{i}"), "fields": {"ward": i}}))
            .collect(),
    );
    let huge = format!("{{\"ward\": \"{}\"}}", "x".repeat((1 << 20) + 1));
    let long_field = format!("{{\"{}\": 1}}", "f".repeat(129));
    let long_collection = format!("/v1/records/{}/p1", "c".repeat(65));
    let long_key = format!("/v1/records/patients/{}", "k".repeat(257));
    let good = json!({"collection": "patients", "key": "p1", "fields": {"ward": 9}});
    let with = |extra: Value| {
        let mut w = good.clone();
        w.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        w
    };
    let deep: Value = serde_json::from_str(&nested(33)).unwrap();
    vec![
        c("malformed JSON", M::PUT, P1, b"{\"ward\": ", "invalid_json", "invalid JSON"),
        c("empty body", M::PUT, P1, "", "invalid_json", "invalid JSON"),
        c("not UTF-8", M::PUT, P1, vec![0xff, 0xfe, b'{'], "invalid_json", "invalid JSON"),
        c("body is an array", M::PUT, P1, b"[1, 2]", "invalid_body", "JSON object"),
        c("body is a string", M::PUT, P1, b"\"ward\"", "invalid_body", "JSON object"),
        c("body is a number", M::PUT, P1, b"3", "invalid_body", "JSON object"),
        c("body is null", M::PUT, P1, b"null", "invalid_body", "JSON object"),
        c("empty object", M::PUT, P1, b"{}", "invalid_body", "no fields"),
        c("1001 fields", M::PUT, P1, many_fields, "invalid_body", "at most 1000"),
        c("empty field name", M::PUT, P1, br#"{"": 1, "ward": 9}"#, "invalid_name", "field name"),
        c("control char in a field name", M::PUT, P1, br#"{"wa\u0001rd": 1}"#, "invalid_name", "field name"),
        c("129-byte field name", M::PUT, P1, long_field, "invalid_name", "field name"),
        c("field nested 33 levels", M::PUT, P1, nested(33), "invalid_body", "32"),
        c("field nested 300 levels", M::PUT, P1, nested(300), "invalid_json", "invalid JSON"),
        c("body over 1 MiB", M::PUT, P1, huge, "payload_too_large", "limit"),
        c("collection with %2F", M::PUT, "/v1/records/bad%2Fname/p1", WARD, "invalid_name", "collection name"),
        c("65-byte collection", M::PUT, long_collection, WARD, "invalid_name", "collection name"),
        c("collection starting with -", M::PUT, "/v1/records/-patients/p1", WARD, "invalid_name", "collection name"),
        c("control char in a key", M::PUT, "/v1/records/patients/p%011", WARD, "invalid_name", "record key"),
        c("257-byte key", M::PUT, long_key, WARD, "invalid_name", "record key"),
        c("GET, bad collection", M::GET, "/v1/records/bad%2Fname/p1", "", "invalid_name", "collection name"),
        c("DELETE, bad key", M::DELETE, "/v1/records/patients/p%0A1", "", "invalid_name", "record key"),
        c("DELETE, missing record", M::DELETE, "/v1/records/patients/nobody", "", "not_found", "nobody"),
        c("batch: malformed JSON", M::POST, "/v1/batch", b"{\"writes\": [", "invalid_json", "invalid JSON"),
        c("batch: body is an array", M::POST, "/v1/batch", b"[]", "invalid_json", "invalid JSON"),
        c("batch: writes not a list", M::POST, "/v1/batch", b"{\"writes\": {}}", "invalid_json", "invalid JSON"),
        c("batch: no writes", M::POST, "/v1/batch", batch(json!([])), "invalid_body", "1 to 1000"),
        c("batch: 1001 writes", M::POST, "/v1/batch", many_writes, "invalid_body", "1 to 1000"),
        c("batch: unknown top-level key", M::POST, "/v1/batch",
            json!({"writes": [good], "atomic": true}).to_string(), "invalid_json", "atomic"),
        c("batch: unknown key in a write", M::POST, "/v1/batch",
            batch(json!([with(json!({"upsert": true}))])), "invalid_json", "upsert"),
        c("batch: fields and delete", M::POST, "/v1/batch",
            batch(json!([with(json!({"delete": true}))])), "invalid_body", "either"),
        c("batch: neither fields nor delete", M::POST, "/v1/batch",
            batch(json!([{"collection": "patients", "key": "p1"}])), "invalid_body", "either"),
        c("batch: fields not an object", M::POST, "/v1/batch",
            batch(json!([with(json!({"fields": [9]}))])), "invalid_body", "writes[0]"),
        c("batch: good writes, then a bad name", M::POST, "/v1/batch",
            batch(json!([good, {"collection": "patients", "key": "p2", "delete": true},
                         with(json!({"collection": "bad/name"}))])),
            "invalid_name", "writes[2]"),
        c("batch: a good write, then a too-deep field", M::POST, "/v1/batch",
            batch(json!([good, with(json!({"key": "p2", "fields": deep}))])),
            "invalid_body", "writes[1]"),
        c("outbox: after not a number", M::GET, "/v1/outbox?after=abc", "", "invalid_query", "after"),
        c("outbox: negative limit", M::GET, "/v1/outbox?limit=-1", "", "invalid_query", "limit"),
        c("outbox: unknown parameter", M::GET, "/v1/outbox?collection=x", "", "invalid_query", "collection"),
        c("unknown route", M::GET, "/v1/records", "", "no_route", "no such route"),
    ]
}

#[tokio::test]
async fn bad_api_requests_get_clear_errors_and_change_nothing() {
    let agent = TempAgent::start().unwrap();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    for (key, body) in [
        (
            "p1",
            json!({"initials": "JD", "ward": 3, "ssn": "123-45-6789"}),
        ),
        ("p2", json!({"initials": "AB", "ward": 5})),
    ] {
        let response = http
            .put(agent.url(&format!("/v1/records/patients/{key}")))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    let before = snapshot(&http, &agent).await;
    assert_eq!(before.status["outbox_pending"], 2, "{:?}", before.status);

    let mut failures = Vec::new();
    for case in api_cases() {
        let url = agent.url(&case.path);
        let response = http
            .request(case.method.clone(), &url)
            .body(case.body.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: {} {url}: {e}", case.name, case.method));
        let status = response.status();
        let json = response
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
        let text = response.text().await.unwrap_or_default();
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let message = body["error"]["message"].as_str().unwrap_or("");
        if status != status_of(case.code)
            || !json
            || body["error"]["code"] != case.code
            || !message.contains(case.says)
        {
            failures.push(format!(
                "{}: expected {} with code {} and a message holding {:?}; got {status} {text}",
                case.name,
                status_of(case.code),
                case.code,
                case.says
            ));
        }
    }
    // A method the route lacks: axum's own 405 (with an empty body, not the
    // API's JSON error shape), and nothing written.
    let response = http.post(agent.url(P1)).body(WARD).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(
        snapshot(&http, &agent).await,
        before,
        "a bad request changed the store"
    );

    // Bad CLI input: refused with a message, nothing sent or changed.
    let too_deep = format!("ward={}1{}", "[".repeat(33), "]".repeat(33));
    for (args, says) in [
        (vec!["put", "patients", "p1", "ward"], "FIELD=VALUE"),
        (
            vec!["put", "patients", "p1", "ward=9", "ssn"],
            "FIELD=VALUE",
        ),
        (vec!["put", "patients", "p1", "=9"], "empty field name"),
        (vec!["put", "patients", "p1", "ward=9", "ward=8"], "twice"),
        (vec!["put", "patients", "p1"], "FIELD=VALUE"),
        (vec!["put", "bad/name", "p1", "ward=9"], "collection name"),
        (vec!["put", "patients", "p1", &too_deep], "32"),
        (vec!["delete", "patients", "nobody"], "nobody"),
    ] {
        let stderr = expect_failure(&agent.cli(&args).unwrap());
        assert!(
            stderr.contains(says),
            "{args:?}: expected {says:?} in {stderr}"
        );
    }
    let out = cli(["put", "patients", "p1", "ward=9", "--api", "not a url"]).unwrap();
    let stderr = expect_failure(&out);
    assert!(stderr.contains("--api"), "{stderr}");
    assert_eq!(
        snapshot(&http, &agent).await,
        before,
        "bad CLI input changed the store"
    );
}

const GOOD_CONFIG: &str = "[agent]\nid = \"gw-1\"\ndata_dir = \"data\"\n\n\
[api]\nlisten = \"127.0.0.1:0\"\n\n[policy]\nfile = \"policy.toml\"\n";

/// Runs `fieldsync-agent run` on `config` and `policy` written to a temp dir and
/// expects it to exit non-zero, quickly, naming every string in `says`, without
/// serving. Returns the temp dir.
fn refused(
    name: &str,
    config: &str,
    policy: &str,
    env: &[(&str, &str)],
    says: &[&str],
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("agent.toml"), config).unwrap();
    std::fs::write(dir.path().join("policy.toml"), policy).unwrap();
    let started = Instant::now();
    let mut cmd = agent_command();
    cmd.arg("run")
        .arg("--config")
        .arg(dir.path().join("agent.toml"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = output_within(cmd, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{name}: the agent ran on: {e:#}"));
    let stderr = expect_failure(&out);
    for s in says {
        assert!(stderr.contains(s), "{name}: expected {s:?} in {stderr}");
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains(LISTENING_PREFIX),
        "{name}: it served: {stdout}"
    );
    eprintln!("{name}: refused in {:?}", started.elapsed());
    dir
}

/// Like [`refused`], and the agent did not create its store either.
fn expect_refused(name: &str, config: &str, policy: &str, env: &[(&str, &str)], says: &[&str]) {
    let dir = refused(name, config, policy, env, says);
    assert!(
        !dir.path().join("data").exists(),
        "{name}: it created its store before refusing the config"
    );
}

/// `config` plus a `[hub]` section with this `url` and `ca` (cert and key are
/// existing files).
fn hub(config: &str, url: &str, ca: &str) -> String {
    format!(
        "{config}[hub]\nurl = \"{url}\"\nca = \"{ca}\"\n\
         cert = \"policy.toml\"\nkey = \"policy.toml\"\n"
    )
}

#[test]
fn malformed_config_files_stop_the_agent_naming_the_key() {
    let policy = PATIENTS_POLICY;
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = held.local_addr().unwrap().to_string();
    let config = GOOD_CONFIG;
    let agent_section = "[agent]\nid = \"gw-1\"\ndata_dir = \"data\"\n";
    #[rustfmt::skip]
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        ("bad TOML", "[agent\nid = \"gw-1\"\n".into(), vec!["agent.toml", "line 1"]),
        ("unknown key", config.replace("data_dir", "colour = 1\ndata_dir"), vec!["colour"]),
        ("unknown section", format!("{config}[agnet]\nid = \"x\"\n"), vec!["agnet"]),
        ("missing [agent]", config.replace(agent_section, ""), vec!["agent"]),
        ("bad agent id", config.replace("gw-1", "gw/1"), vec!["agent.id", "gw/1"]),
        ("empty data_dir", config.replace("\"data\"", "\"\""), vec!["agent.data_dir"]),
        ("non-loopback listen", config.replace("127.0.0.1:0", "0.0.0.0:0"), vec!["api.listen", "loopback"]),
        ("listen not an address", config.replace("127.0.0.1:0", "localhost"), vec!["api.listen"]),
        ("listen port in use", config.replace("127.0.0.1:0", &busy), vec!["api.listen", &busy]),
        ("missing policy file", config.replace("\"policy.toml\"", "\"nope.toml\""), vec!["policy.file", "nope.toml"]),
        ("plain mqtt hub url", hub(config, "mqtt://127.0.0.1:1883", "policy.toml"), vec!["hub.url", "mqtts://"]),
        ("missing hub ca", hub(config, "mqtts://127.0.0.1:8883", "ca.pem"), vec!["hub.ca", "ca.pem"]),
    ];
    for (name, config, says) in &cases {
        expect_refused(name, config, policy, &[], says);
    }
    // TLS files are read when the hub link starts, after the store is opened,
    // so only the refusal is checked here (see the report on this rough edge).
    refused(
        "hub ca that is no certificate",
        &hub(config, "mqtts://127.0.0.1:8883", "policy.toml"),
        policy,
        &[],
        &["hub.ca", "policy.toml"],
    );
    expect_refused(
        "environment override with a non-loopback listen",
        GOOD_CONFIG,
        policy,
        &[("FIELDSYNC__API__LISTEN", "0.0.0.0:7070")],
        &["api.listen"],
    );

    let policies: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "policy: bad TOML",
            "[collections.patients\n".into(),
            vec!["policy.file", "line 1"],
        ),
        (
            "policy: unknown key",
            format!("{policy}extra = 1\n"),
            vec!["policy.file", "extra"],
        ),
        (
            "policy: unknown top-level key",
            format!("default = \"deny\"\n{policy}"),
            vec!["policy.file", "default"],
        ),
        (
            "policy: bad direction",
            policy.replace("\"up\"", "\"sideways\""),
            vec!["policy.file", "direction", "sideways"],
        ),
        (
            "policy: missing direction",
            policy.replace("direction = \"up\"\n", ""),
            vec!["policy.file", "direction"],
        ),
        (
            "policy: duplicate field",
            policy.replace("\"heart_rate\"]", "\"heart_rate\", \"ward\"]"),
            vec!["policy.file", "collections.patients.sync[3]", "twice"],
        ),
        (
            "policy: field not a string",
            policy.replace("\"heart_rate\"]", "7]"),
            vec!["policy.file", "sync"],
        ),
        (
            "policy: bad collection name",
            policy.replace("[collections.patients]", "[collections.\"bad/name\"]"),
            vec!["policy.file", "collections.bad/name"],
        ),
    ];
    for (name, bad, says) in &policies {
        expect_refused(name, GOOD_CONFIG, bad, &[], says);
    }
    drop(held);
}

#[test]
fn a_missing_config_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.toml");
    let mut cmd = agent_command();
    cmd.arg("run").arg("--config").arg(&path);
    let stderr = expect_failure(&output_within(cmd, Duration::from_secs(20)).unwrap());
    assert!(stderr.contains(&*path.to_string_lossy()), "{stderr}");
}

#[tokio::test]
async fn a_second_agent_on_the_same_store_is_refused_and_the_first_keeps_serving() {
    let agent = TempAgent::start().unwrap();
    let put = agent.cli(&["put", "patients", "p1", "ward=3"]).unwrap();
    fieldsync_e2e::expect_success(&put);
    let mut cmd = agent_command();
    cmd.arg("run").arg("--config").arg(agent.config_path());
    let out = output_within(cmd, Duration::from_secs(20)).unwrap();
    let stderr = expect_failure(&out);
    let store = agent.data_dir().join("agent.redb");
    assert!(
        stderr.contains("in use by another process") && stderr.contains(&*store.to_string_lossy()),
        "{stderr}"
    );
    let got = fieldsync_e2e::expect_success(&agent.cli(&["get", "patients", "p1"]).unwrap());
    let got: Value = serde_json::from_str(&got).unwrap();
    assert_eq!(got["fields"], json!({"ward": 3}));
    assert!(Path::new(&store).is_file());
}

#[tokio::test]
async fn a_write_too_large_to_sync_is_refused_and_changes_nothing() {
    let agent = TempAgent::start().unwrap();
    let http = reqwest::Client::new();
    let big = "x".repeat(1_040_000);
    let r = http
        .put(agent.url("/v1/records/patients/big"))
        .json(&json!({ "initials": big }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "change_too_large", "{body}");
    let r = http
        .get(agent.url("/v1/records/patients/big"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::NOT_FOUND);
    let status: Value = http
        .get(agent.url("/v1/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["outbox_pending"], 0);
}
