//! The hub's client commands end to end: the real `fieldsync-hub` binary as
//! a client of a real hub with a real agent linked over mTLS — `agents list`
//! and `show` (table and `--json`), `put` delivered to the agent, `get`,
//! `agents label`, `broadcast` to a labelled group,
//! `webhooks create|list|deliveries|replay|delete`; the token from
//! `--token-file` or `FIELDSYNC_TOKEN`; a missing or wrong token, an unknown
//! agent or record, a malformed FIELD=VALUE or LABEL=VALUE and an empty
//! selector fail with a clear message.

use std::process::Output;

use fieldsync_e2e::durability::{poll, wait_status, AgentApi, SYNC_TIMEOUT};
use fieldsync_e2e::fleet::{Pki, TempHub, FLEET_POLICY, TOKEN};
use fieldsync_e2e::{expect_failure, expect_success, hub_command, output_within, COMMAND_TIMEOUT};
use serde_json::Value;

struct Setup {
    hub: TempHub,
    pki: Pki,
    dir: tempfile::TempDir,
}

fn setup() -> anyhow::Result<Setup> {
    let dir = tempfile::Builder::new()
        .prefix("fieldsync-hubcli-")
        .tempdir()?;
    let pki_dir = dir.path().join("pki");
    std::fs::create_dir(&pki_dir)?;
    let pki = Pki::create(&pki_dir)?;
    let hub = TempHub::start(dir.path(), &pki, FLEET_POLICY)?;
    Ok(Setup { hub, pki, dir })
}

/// `fieldsync-hub ARGS --api URL`, the token in `FIELDSYNC_TOKEN` unless
/// `token` says otherwise (`Some(None)`: no token at all).
fn hub_cli(s: &Setup, args: &[&str], token: Option<Option<&str>>) -> anyhow::Result<Output> {
    let mut cmd = hub_command();
    cmd.args(args).args(["--api", s.hub.api_url()]);
    match token {
        None => {
            cmd.env("FIELDSYNC_TOKEN", TOKEN);
        }
        Some(Some(t)) => {
            cmd.env("FIELDSYNC_TOKEN", t);
        }
        Some(None) => {}
    }
    output_within(cmd, COMMAND_TIMEOUT)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_cli_lists_reads_writes_and_manages_webhooks() -> anyhow::Result<()> {
    let s = setup()?;
    let agent = s.hub.agent(&s.pki, "gw-cli", None)?;
    let api = AgentApi::of(&agent);
    wait_status(&api, "the agent linked", |st| st["connected"] == true).await?;

    // agents list: a table with the agent, and --json for scripts.
    let table = expect_success(&hub_cli(&s, &["agents"], None)?);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("ID"), "{table}");
    assert!(lines.iter().any(|l| l.starts_with("gw-cli ")), "{table}");
    let json: Value = serde_json::from_str(&expect_success(&hub_cli(
        &s,
        &["agents", "list", "--json"],
        None,
    )?))?;
    assert_eq!(json["agents"][0]["id"], "gw-cli");
    let show = expect_success(&hub_cli(&s, &["agents", "show", "gw-cli"], None)?);
    assert!(show.lines().any(|l| l == "id: gw-cli"), "{show}");
    assert!(show.lines().any(|l| l == "connected: true"), "{show}");

    // put, with the token from a file this time: delivered to the agent.
    let token_file = s.dir.path().join("operator.token");
    std::fs::write(&token_file, format!("{TOKEN}\n"))?;
    let token_path = token_file.to_string_lossy().to_string();
    let put = expect_success(&hub_cli(
        &s,
        &[
            "put",
            "gw-cli",
            "settings",
            "s1",
            "mode=eco",
            "threshold=30",
            "--token-file",
            &token_path,
        ],
        Some(None),
    )?);
    assert!(put.starts_with("queued for gw-cli at seq 1"), "{put}");
    poll("the write on the agent", SYNC_TIMEOUT, || async {
        Ok(match api.record("settings", "s1").await? {
            Some(f) if f["threshold"] == 30 => Ok(()),
            other => Err(format!("{other:?}")),
        })
    })
    .await?;
    let got = expect_success(&hub_cli(&s, &["get", "gw-cli", "settings", "s1"], None)?);
    assert_eq!(got.trim(), "mode: eco\nthreshold: 30");
    let got: Value = serde_json::from_str(&expect_success(&hub_cli(
        &s,
        &["get", "gw-cli", "settings", "s1", "--json"],
        None,
    )?))?;
    assert_eq!(got["fields"]["mode"], "eco");

    // agents label, then broadcast to the group.
    let labelled = expect_success(&hub_cli(
        &s,
        &["agents", "label", "gw-cli", "site=berlin", "model=gw3"],
        None,
    )?);
    assert_eq!(labelled.trim(), "labels of gw-cli: model=gw3, site=berlin");
    let table = expect_success(&hub_cli(&s, &["agents"], None)?);
    assert!(table.contains("model=gw3, site=berlin"), "{table}");
    let sent = expect_success(&hub_cli(
        &s,
        &[
            "broadcast",
            "--selector",
            "site=berlin",
            "settings",
            "s2",
            "mode=away",
        ],
        None,
    )?);
    assert_eq!(
        sent.trim(),
        "site=berlin: 1 agents matched, queued to 1 (1 writes)"
    );
    let none = expect_success(&hub_cli(
        &s,
        &[
            "broadcast",
            "--selector",
            "site=paris",
            "settings",
            "s2",
            "mode=x",
            "--json",
        ],
        None,
    )?);
    let none: Value = serde_json::from_str(&none)?;
    assert_eq!(
        (none["agents"].as_u64(), none["queued"].as_u64()),
        (Some(0), Some(0))
    );
    poll("the broadcast on the agent", SYNC_TIMEOUT, || async {
        Ok(match api.record("settings", "s2").await? {
            Some(f) if f["mode"] == "away" => Ok(()),
            other => Err(format!("{other:?}")),
        })
    })
    .await?;
    let cleared = expect_success(&hub_cli(&s, &["agents", "label", "gw-cli"], None)?);
    assert_eq!(cleared.trim(), "labels of gw-cli: none");

    // webhooks: create, list, deliveries, replay, delete.
    let made = expect_success(&hub_cli(
        &s,
        &[
            "webhooks",
            "create",
            "--url",
            "http://127.0.0.1:9/hook",
            "--event",
            "record.changed",
            "--collection",
            "settings",
        ],
        None,
    )?);
    let id = made
        .lines()
        .find_map(|l| l.strip_prefix("created "))
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(id.starts_with("wh_"), "{made}");
    assert!(made.contains("secret whsec_"), "{made}");
    let list = expect_success(&hub_cli(&s, &["webhooks", "list"], None)?);
    assert!(
        list.lines()
            .any(|l| l.starts_with(&id) && l.contains("record.changed")),
        "{list}"
    );
    assert!(
        !list.contains("whsec_"),
        "a listing shows no secret: {list}"
    );
    let deliveries = expect_success(&hub_cli(&s, &["webhooks", "deliveries", &id], None)?);
    assert!(deliveries.starts_with("AT"), "{deliveries}");
    let replay = expect_success(&hub_cli(
        &s,
        &["webhooks", "replay", &id, "--since", "2026-01-01T00:00:00Z"],
        None,
    )?);
    assert!(
        replay.starts_with(&format!("replaying {id} from seq")),
        "{replay}"
    );
    assert_eq!(
        expect_success(&hub_cli(&s, &["webhooks", "delete", &id], None)?).trim(),
        format!("deleted {id}")
    );
    let list = expect_success(&hub_cli(&s, &["webhooks", "list", "--json"], None)?);
    assert_eq!(
        serde_json::from_str::<Value>(&list)?["webhooks"],
        serde_json::json!([])
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_cli_fails_clearly_and_changes_nothing_on_bad_input() -> anyhow::Result<()> {
    let s = setup()?;
    let no_token = expect_failure(&hub_cli(&s, &["agents"], Some(None))?);
    assert!(
        no_token.contains("--token-file FILE or set FIELDSYNC_TOKEN"),
        "{no_token}"
    );
    let wrong = expect_failure(&hub_cli(&s, &["agents"], Some(Some("not-the-token-0123")))?);
    assert!(
        wrong.contains("401") && wrong.contains("unauthorized"),
        "{wrong}"
    );
    let unknown = expect_failure(&hub_cli(&s, &["agents", "show", "gw-none"], None)?);
    assert!(unknown.contains("no agent \"gw-none\""), "{unknown}");
    let absent = expect_failure(&hub_cli(&s, &["get", "gw-none", "settings", "s1"], None)?);
    assert!(
        absent.contains("404") && absent.contains("not_found"),
        "{absent}"
    );
    let malformed = expect_failure(&hub_cli(
        &s,
        &["put", "gw-none", "settings", "s1", "threshold"],
        None,
    )?);
    assert!(malformed.contains("FIELD=VALUE"), "{malformed}");
    let denied = expect_failure(&hub_cli(
        &s,
        &["put", "gw-none", "patients", "p1", "ward=3"],
        None,
    )?);
    assert!(
        denied.contains("403") && denied.contains("policy_denied"),
        "{denied}"
    );
    let bad_label = expect_failure(&hub_cli(&s, &["agents", "label", "gw-cli", "site"], None)?);
    assert!(bad_label.contains("LABEL=VALUE"), "{bad_label}");
    let bad_selector = expect_failure(&hub_cli(
        &s,
        &["broadcast", "--selector", "", "settings", "s1", "mode=x"],
        None,
    )?);
    assert!(bad_selector.contains("invalid_selector"), "{bad_selector}");
    let bad_api = {
        let mut cmd = hub_command();
        cmd.args(["agents", "--api", "not a url"])
            .env("FIELDSYNC_TOKEN", TOKEN);
        expect_failure(&output_within(cmd, COMMAND_TIMEOUT)?)
    };
    assert!(bad_api.contains("--api \"not a url\""), "{bad_api}");
    // Nothing was queued by any of it.
    let (_, agents) = s.hub.get("/v1/agents").await?;
    assert_eq!(agents["agents"], serde_json::json!([]));
    Ok(())
}
