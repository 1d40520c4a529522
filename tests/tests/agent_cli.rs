//! The agent binary end to end through its command line: `run` starts from a
//! written config and policy with no hub (and with an unreachable one), `put`,
//! `get` and `status` talk to it, and only the policy's fields reach the outbox.

use fieldsync_e2e::{
    cli, closed_port, expect_failure, expect_success, AgentSetup, TempAgent, AGENT_ID,
};
use serde_json::{json, Value};

fn parse(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// The must-show flow: a write with a sensitive field is stored whole locally,
/// while the outbox (what would go to the hub) holds only the permitted fields.
async fn put_get_status_outbox(agent: &TempAgent, hub_configured: bool) {
    let put = agent
        .cli(&[
            "put",
            "patients",
            "p1",
            "initials=JD",
            "ssn=123-45-6789",
            "ward=3",
        ])
        .unwrap();
    let stored = parse(&expect_success(&put));
    let all_fields = json!({"initials": "JD", "ssn": "123-45-6789", "ward": 3});
    assert_eq!(
        stored["fields"], all_fields,
        "put answers the stored record"
    );

    let got = parse(&expect_success(
        &agent.cli(&["get", "patients", "p1"]).unwrap(),
    ));
    assert_eq!(
        got,
        json!({"collection": "patients", "key": "p1", "fields": all_fields})
    );

    let status = parse(&expect_success(&agent.cli(&["status"]).unwrap()));
    assert_eq!(status["agent_id"], AGENT_ID);
    assert_eq!(status["connected"], false);
    assert_eq!(status["hub_configured"], hub_configured);
    assert_eq!(status["outbox_pending"], 1, "{status}");
    let preview = status["outbox_preview"].as_array().expect("outbox_preview");
    assert_eq!(preview.len(), 1, "{status}");
    assert_eq!(preview[0]["collection"], "patients");
    assert_eq!(preview[0]["key"], "p1");
    assert_eq!(
        preview[0]["fields"],
        json!(["initials", "ward"]),
        "{status}"
    );

    let http = reqwest::Client::new();
    let outbox: Value = http
        .get(agent.url("/v1/outbox"))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    let entries = outbox["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 1, "{outbox}");
    let change = &entries[0]["change"];
    assert_eq!(change["collection"], "patients");
    assert_eq!(change["key"], "p1");
    let fields = change["state"]["fields"].as_object().expect("fields");
    let names: Vec<&str> = fields.keys().map(String::as_str).collect();
    assert_eq!(names, ["initials", "ward"], "{outbox}");
    assert_eq!(fields["initials"]["value"]["Set"], "JD", "{outbox}");
    assert_eq!(fields["ward"]["value"]["Set"], 3, "{outbox}");
    let text = outbox.to_string();
    assert!(
        !text.contains("ssn") && !text.contains("123-45-6789"),
        "the denied field leaked into the outbox: {text}"
    );
    // Nor does the agent log it.
    assert!(
        !agent.stderr_log().contains("123-45-6789"),
        "the agent logged a denied value:\n{}",
        agent.stderr_log()
    );
}

#[tokio::test]
async fn runs_without_a_hub_and_keeps_denied_fields_local() {
    let agent = TempAgent::start().unwrap();
    put_get_status_outbox(&agent, false).await;
}

#[tokio::test]
async fn runs_while_the_configured_hub_is_unreachable() {
    let setup = AgentSetup {
        hub_url: Some(format!("mqtts://127.0.0.1:{}", closed_port())),
        ..AgentSetup::default()
    };
    let mut agent = TempAgent::start_with(setup).unwrap();
    put_get_status_outbox(&agent, true).await;
    // Local writes keep working, and survive a restart, with the hub still away.
    let put = agent.cli(&["put", "patients", "p2", "ward=7"]).unwrap();
    expect_success(&put);
    agent.restart().unwrap();
    let got = parse(&expect_success(
        &agent.cli(&["get", "patients", "p2"]).unwrap(),
    ));
    assert_eq!(got["fields"], json!({"ward": 7}));
    let status = parse(&expect_success(&agent.cli(&["status"]).unwrap()));
    assert_eq!(status["outbox_pending"], 2, "{status}");
    assert!(
        agent.is_running(),
        "the agent exited:\n{}",
        agent.stderr_log()
    );
}

#[test]
fn help_names_the_subcommands_and_field_syntax() {
    let top = expect_success(&cli(["--help"]).unwrap());
    for word in ["run", "put", "get", "delete", "status"] {
        assert!(top.contains(word), "--help lacks {word}: {top}");
    }
    let put = expect_success(&cli(["put", "--help"]).unwrap());
    assert!(put.contains("FIELD=VALUE"), "put --help: {put}");
    let run = expect_success(&cli(["run", "--help"]).unwrap());
    assert!(run.contains("--config"), "run --help: {run}");
}

#[test]
fn get_of_a_missing_record_fails_clearly() {
    let agent = TempAgent::start().unwrap();
    let out = agent.cli(&["get", "patients", "nobody"]).unwrap();
    let stderr = expect_failure(&out);
    assert!(
        stderr.contains("404") && stderr.contains("nobody") && stderr.contains("patients"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "nothing on stdout for a failure");
}

#[test]
fn the_cli_says_when_no_agent_listens() {
    let url = format!("http://127.0.0.1:{}", closed_port());
    for args in [
        vec!["status", "--api", &url],
        vec!["get", "patients", "p1", "--api", &url],
        vec!["put", "patients", "p1", "ward=1", "--api", &url],
    ] {
        let stderr = expect_failure(&cli(&args).unwrap());
        assert!(
            stderr.contains("cannot reach the agent") && stderr.contains(&url),
            "{args:?}: {stderr}"
        );
    }
}
