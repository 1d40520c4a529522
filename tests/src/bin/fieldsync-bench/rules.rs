//! What merge rules, schema checks and version history cost: the upstream and
//! latency figures of one collection run three ways in the same run, each on
//! a fresh hub and agent — plain last-writer-wins (history kept, as by
//! default), every rule in use (`counter`, `max`, `min`, `review`,
//! `prefer = hub`, a `schema` on three fields; history kept) and plain
//! last-writer-wins without history. Every write touches every synced field.
//!
//! Rounds take the three setups in rotated order and each figure is the
//! median of its rounds; `rules_slowdown_*` is the rules' figure against
//! plain LWW's and `history_slowdown_*` LWW with history against without
//! (both > 1 when slower: throughput `base / ours`, latency `ours / base`).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};

use crate::latency::{offer, Flow};
use crate::upstream::stream;
use crate::{Linked, Plan, Report};

/// The collection under test, plain last-writer-wins (default history).
const LWW: &str = r#"
[collections.meters]
direction = "both"
sync = ["reading", "runtime_s", "peak", "low", "limit", "note", "level"]
"#;

/// The lines that give [`LWW`]'s collection every rule.
const RULES: &str = r#"
merge = { runtime_s = "counter", peak = "max", low = "min", note = "review" }
prefer = { limit = "hub" }
schema = { reading = "number", level = { type = "number", min = 0, max = 100 }, note = "string" }
"#;

/// The shape of a benchmark's writes.
#[derive(Clone, Copy)]
pub(crate) enum Load {
    /// The fleet policy's collections: `patients` up (two synced fields and
    /// one local-only), `settings` down (one field).
    Fleet,
    /// [`LWW`]'s `meters`: up writes every synced field and a local-only
    /// one, down writes four fields; `counter` sends `runtime_s` as an
    /// increment (the rule's only write) instead of a number.
    Meters { counter: bool },
}

impl Load {
    /// Write number `n` of record `key` on the agent's batch API.
    pub(crate) fn up(self, key: &str, n: u64) -> Value {
        match self {
            Load::Fleet => json!({"collection": "patients", "key": key,
                "fields": {"ward": n, "initials": "UP", "ssn": "local-only"}}),
            Load::Meters { counter } => json!({"collection": "meters", "key": key,
                "fields": {"reading": n, "runtime_s": runtime(counter, n), "peak": n,
                    "low": n, "limit": n % 100, "note": "ok", "level": n % 100,
                    "serial": "local-only"}}),
        }
    }

    /// Write number `n` of record `key` on the operator's batch API.
    pub(crate) fn down(self, key: &str, n: u64) -> Value {
        match self {
            Load::Fleet => json!({"collection": "settings", "key": key, "fields": {"mode": n}}),
            Load::Meters { counter } => json!({"collection": "meters", "key": key,
                "fields": {"runtime_s": runtime(counter, n), "limit": n % 100,
                    "note": "op", "level": n % 100}}),
        }
    }
}

fn runtime(counter: bool, n: u64) -> Value {
    if counter {
        json!({"$inc": 1})
    } else {
        json!(n)
    }
}

/// The figures each setup reports: name, and whether larger is better.
const FIGURES: [(&str, bool); 5] = [
    ("upstream", true),
    ("latency_p50_1k", false),
    ("latency_p99_1k", false),
    ("latency_down_p50_1k", false),
    ("latency_down_p99_1k", false),
];

pub(crate) async fn run(plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let rules_policy = format!("{LWW}{RULES}");
    let no_history = format!("{LWW}history = 0\n");
    let setups: [(&str, &str, Load); 3] = [
        ("lww", LWW, Load::Meters { counter: false }),
        ("rules", &rules_policy, Load::Meters { counter: true }),
        ("nohistory", &no_history, Load::Meters { counter: false }),
    ];
    let rounds = if plan.quick { 1 } else { 3 };
    let total = if plan.quick { 20_000 } else { 100_000 };
    let measure = Duration::from_secs(if plan.quick { 2 } else { 10 });
    let http = reqwest::Client::new();
    let mut runs: BTreeMap<(&str, &str), Vec<f64>> = BTreeMap::new();
    for round in 0..rounds {
        for i in 0..setups.len() {
            let (name, policy, load) = setups[(round + i) % setups.len()];
            let linked = Linked::start_with(&format!("gw-{name}"), policy).await?;
            let took = stream(&http, &linked.agent, load, "r", 1000, total).await?;
            let per_s = total as f64 / took.as_secs_f64();
            runs.entry((name, "upstream")).or_default().push(per_s);
            let logs = || linked.logs();
            let up = offer(&http, &linked, load, Flow::Up, 1_000, measure)
                .await
                .with_context(logs)?;
            let down = offer(&http, &linked, load, Flow::Down, 1_000, measure)
                .await
                .with_context(logs)?;
            for (figure, value) in [
                ("latency_p50_1k", up.quantile(0.50)),
                ("latency_p99_1k", up.quantile(0.99)),
                ("latency_down_p50_1k", down.quantile(0.50)),
                ("latency_down_p99_1k", down.quantile(0.99)),
            ] {
                runs.entry((name, figure)).or_default().push(value);
            }
            eprintln!("  round {round} {name}: upstream {per_s:.0} changes/s");
        }
    }
    let median = |setup: &str, figure: &str| {
        let mut v = runs[&(setup, figure)].clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for (figure, larger_is_better) in FIGURES {
        for (setup, _, _) in &setups {
            report.insert(key(format!("{setup}_{figure}")), median(setup, figure));
        }
        let slowdown = |ours: f64, base: f64| {
            if larger_is_better {
                base / ours
            } else {
                ours / base
            }
        };
        let rules = slowdown(median("rules", figure), median("lww", figure));
        let history = slowdown(median("lww", figure), median("nohistory", figure));
        eprintln!("  {figure}: rules x{rules:.3} of lww, history x{history:.3} of none");
        report.insert(key(format!("rules_slowdown_{figure}")), rules);
        report.insert(key(format!("history_slowdown_{figure}")), history);
    }
    Ok(())
}

/// A report key made at run time (a handful per run, kept for the process's
/// life as the report's keys are).
fn key(name: String) -> &'static str {
    Box::leak(name.into_boxed_str())
}
