//! Crash safety of the agent's write path: SIGKILL at random moments while
//! concurrent clients write through the HTTP API, many times over, then check
//! the redb store directly: no acknowledged write is lost, records, outbox
//! entries and history versions commit together (never one without the
//! others, never twice), only permitted fields are queued, and sequence
//! numbers and clock stamps only grow.
//!
//! Set `FIELDSYNC_E2E_SEED` to replay the kill timings of a failed run.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fieldsync_e2e::TempAgent;
use fieldsync_shared::record::FieldValue;
use fieldsync_shared::{CollectionName, RecordKey, Seq, Version};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use tokio::task::JoinSet;

/// Agent kills (each followed by a restart).
const KILLS: usize = 30;
/// Concurrent writer tasks.
const WRITERS: u64 = 4;
/// Every BATCH_EVERY-th request of a writer is a `POST /v1/batch`...
const BATCH_EVERY: u64 = 5;
/// ...of this many records.
const BATCH_SIZE: u64 = 3;
/// Kill this long after the writers start, in milliseconds (inclusive).
const KILL_DELAY_MS: std::ops::RangeInclusive<u64> = 20..=250;
/// The only fields of the patients policy these writes use that may go up.
const PERMITTED: [&str; 2] = ["initials", "ward"];
/// Longest wait for one HTTP answer, or for the writers to notice a kill.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// One record write: a whole new record under a key written only once.
#[derive(Debug, Clone)]
struct Write {
    collection: &'static str,
    key: String,
    fields: Map<String, Value>,
}

impl Write {
    /// Writer `task`'s `n`-th record. Most are patients with a denied `ssn`
    /// beside permitted fields; some hold only `ssn` (nothing may go up), some go
    /// to a collection the policy does not name (nothing may go up either).
    fn new(task: u64, n: u64) -> Self {
        let ssn = format!("{:03}-{:02}-{:04}", 900 + task, n % 100, n % 10_000);
        let initials = format!(
            "{}{}",
            char::from(b'A' + (task % 26) as u8),
            char::from(b'A' + (n % 26) as u8)
        );
        let (collection, fields) = match n % 11 {
            3 => ("patients", json!({ "ssn": ssn })),
            7 => (
                "notes",
                json!({ "initials": initials, "ward": n, "ssn": ssn }),
            ),
            _ => (
                "patients",
                json!({ "initials": initials, "ward": n, "ssn": ssn }),
            ),
        };
        let Value::Object(fields) = fields else {
            unreachable!()
        };
        Self {
            collection,
            key: format!("w{task}-{n}"),
            fields,
        }
    }

    /// The part of this write the policy lets into the outbox, if any.
    fn permitted(&self) -> Option<Map<String, Value>> {
        if self.collection != "patients" {
            return None;
        }
        let up: Map<String, Value> = self
            .fields
            .iter()
            .filter(|(k, _)| PERMITTED.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        (!up.is_empty()).then_some(up)
    }

    fn address(&self) -> (String, String) {
        (self.collection.to_owned(), self.key.clone())
    }
}

/// One HTTP request: a PUT (one write) or a batch (several, atomic).
#[derive(Debug)]
struct Attempt {
    writes: Vec<Write>,
    /// The agent answered 2xx: the writes are durable.
    acked: bool,
}

/// What one writer task did in one round.
struct WriterReport {
    task: u64,
    next_n: u64,
    attempts: Vec<Attempt>,
    /// Answers that were neither 2xx nor a broken connection.
    refused: Vec<String>,
}

/// Writes until the agent goes away (the first failed request) or `stop` is set.
async fn writer(
    http: reqwest::Client,
    base: String,
    task: u64,
    mut n: u64,
    stop: Arc<AtomicBool>,
) -> WriterReport {
    let mut attempts = Vec::new();
    let mut refused = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let batch = n % BATCH_EVERY == BATCH_EVERY - 1;
        let count = if batch { BATCH_SIZE } else { 1 };
        let writes: Vec<Write> = (n..n + count).map(|i| Write::new(task, i)).collect();
        n += count;
        let request = if batch {
            let body: Vec<Value> = writes
                .iter()
                .map(|w| json!({"collection": w.collection, "key": w.key, "fields": w.fields}))
                .collect();
            http.post(format!("{base}/v1/batch"))
                .json(&json!({ "writes": body }))
        } else {
            let w = &writes[0];
            http.put(format!("{base}/v1/records/{}/{}", w.collection, w.key))
                .json(&w.fields)
        };
        match request.send().await {
            Ok(response) if response.status().is_success() => {
                // The status line alone acknowledges the write; check the body
                // when it arrives whole.
                if let Ok(body) = response.json::<Value>().await {
                    let stored: Vec<&Value> = if batch {
                        body["results"]
                            .as_array()
                            .map(|r| r.iter().map(|v| &v["fields"]).collect())
                            .unwrap_or_default()
                    } else {
                        vec![&body["fields"]]
                    };
                    let expected: Vec<Value> = writes
                        .iter()
                        .map(|w| Value::Object(w.fields.clone()))
                        .collect();
                    let stored: Vec<Value> = stored.into_iter().cloned().collect();
                    if stored != expected {
                        refused.push(format!("{body} answered for {writes:?}"));
                    }
                }
                attempts.push(Attempt {
                    writes,
                    acked: true,
                });
            }
            Ok(response) => {
                let status = response.status();
                let body = response.text().await.unwrap_or_default();
                refused.push(format!("{status} {body} for {writes:?}"));
                attempts.push(Attempt {
                    writes,
                    acked: false,
                });
                break;
            }
            Err(_) => {
                // Killed mid-request or before it: committed or not, unknown.
                attempts.push(Attempt {
                    writes,
                    acked: false,
                });
                break;
            }
        }
    }
    WriterReport {
        task,
        next_n: n,
        attempts,
        refused,
    }
}

fn seed() -> u64 {
    match std::env::var("FIELDSYNC_E2E_SEED") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("FIELDSYNC_E2E_SEED={s:?} is not a u64")),
        Err(_) => rand::random(),
    }
}

async fn get_json(http: &reqwest::Client, url: String) -> Value {
    let response = http.get(&url).send().await.unwrap();
    assert!(response.status().is_success(), "GET {url}: {response:?}");
    response.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_writes_loses_no_acknowledged_write() {
    let seed = seed();
    eprintln!("agent_kill seed: {seed} (replay with FIELDSYNC_E2E_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();

    let mut agent = TempAgent::start().unwrap();
    let mut next_n = [0u64; WRITERS as usize];
    let mut attempts: Vec<Attempt> = Vec::new();
    let mut refused: Vec<String> = Vec::new();

    for round in 0..KILLS {
        // A fresh client per round: pooled connections die with the agent.
        let http = reqwest::Client::builder()
            .timeout(IO_TIMEOUT)
            .build()
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = JoinSet::new();
        for task in 0..WRITERS {
            writers.spawn(writer(
                http.clone(),
                agent.base_url().to_owned(),
                task,
                next_n[task as usize],
                stop.clone(),
            ));
        }
        let delay = rng.random_range(KILL_DELAY_MS);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        tokio::task::block_in_place(|| agent.kill());
        stop.store(true, Ordering::Relaxed);

        let reports = tokio::time::timeout(IO_TIMEOUT, writers.join_all())
            .await
            .unwrap_or_else(|_| {
                panic!("round {round}: writers still busy {IO_TIMEOUT:?} after the kill")
            });
        // join_all yields in completion order, not spawn order.
        for report in reports {
            next_n[report.task as usize] = report.next_n;
            attempts.extend(report.attempts);
            refused.extend(report.refused);
        }
        tokio::task::block_in_place(|| agent.restart())
            .unwrap_or_else(|e| panic!("round {round}: restart after kill failed: {e:#}"));
    }
    assert!(
        refused.is_empty(),
        "the agent answered valid writes wrongly:\n{}",
        refused.join("\n")
    );

    let acked: Vec<&Write> = attempts
        .iter()
        .filter(|a| a.acked)
        .flat_map(|a| &a.writes)
        .collect();
    let acked_batches = attempts
        .iter()
        .filter(|a| a.acked && a.writes.len() > 1)
        .count();
    assert!(
        acked.len() >= 20 && acked_batches >= 1,
        "too little got written to prove anything: {} acknowledged writes, {acked_batches} batches",
        acked.len()
    );

    // The restarted agent reports the outbox the store holds, and serves the
    // acknowledged records (a sample of them).
    let http = reqwest::Client::builder()
        .timeout(IO_TIMEOUT)
        .build()
        .unwrap();
    let status = get_json(&http, agent.url("/v1/status")).await;
    let pending = status["outbox_pending"]
        .as_u64()
        .unwrap_or_else(|| panic!("no outbox_pending in {status}"));
    let mut api_seqs = Vec::new();
    loop {
        let after = api_seqs.last().copied().unwrap_or(0);
        let page = get_json(
            &http,
            agent.url(&format!("/v1/outbox?after={after}&limit=1000")),
        )
        .await;
        let entries = page["entries"].as_array().expect("entries").clone();
        if entries.is_empty() {
            break;
        }
        let seqs = entries.iter().map(|e| e["seq"].as_u64().expect("seq"));
        let seqs: Vec<u64> = seqs.collect();
        assert!(
            seqs.iter().all(|seq| *seq > after),
            "/v1/outbox?after={after} returned {seqs:?}"
        );
        api_seqs.extend(seqs);
    }
    for w in acked.iter().step_by(17) {
        let url = agent.url(&format!("/v1/records/{}/{}", w.collection, w.key));
        let response = http.get(&url).send().await.unwrap();
        assert_eq!(
            response.status(),
            reqwest::StatusCode::OK,
            "acknowledged write {} {} missing after the restarts (seed {seed})",
            w.collection,
            w.key
        );
        let record: Value = response.json().await.unwrap();
        assert_eq!(record["fields"], Value::Object(w.fields.clone()));
    }
    tokio::task::block_in_place(|| agent.kill());

    // Now the store itself.
    let store = agent.open_store().unwrap();
    let record_of = |w: &Write| {
        let collection = CollectionName::new(w.collection).unwrap();
        let key = RecordKey::new(w.key.clone()).unwrap();
        store.get(&collection, &key).unwrap().map(|view| {
            serde_json::to_value(&view.fields)
                .unwrap()
                .as_object()
                .cloned()
                .unwrap()
        })
    };

    // Every acknowledged write is there with its values; an unacknowledged one
    // is there whole or not at all, and a batch all together or not at all.
    let mut present: BTreeSet<(String, String)> = BTreeSet::new();
    let mut unacked_present = 0;
    for attempt in &attempts {
        let found: Vec<bool> = attempt
            .writes
            .iter()
            .map(|w| match record_of(w) {
                Some(fields) => {
                    assert_eq!(
                        fields, w.fields,
                        "{} {} has other values",
                        w.collection, w.key
                    );
                    true
                }
                None => false,
            })
            .collect();
        if attempt.acked {
            assert!(
                found.iter().all(|f| *f),
                "acknowledged write lost: {:?} (found {found:?}; seed {seed})",
                attempt.writes
            );
        } else {
            assert!(
                found.iter().all(|f| *f) || found.iter().all(|f| !*f),
                "batch committed in part: {:?} (found {found:?})",
                attempt.writes
            );
            if found.first() == Some(&true) {
                unacked_present += 1;
            }
        }
        for (w, f) in attempt.writes.iter().zip(found) {
            if f {
                present.insert(w.address());
            }
        }
    }

    // The outbox: one entry per stored record with permitted fields, holding
    // exactly those fields; none for anything else; sequence numbers 1..=N
    // without gap or repeat (nothing was acknowledged by a hub); stamps growing.
    let written: BTreeMap<(String, String), &Write> = attempts
        .iter()
        .flat_map(|a| &a.writes)
        .map(|w| (w.address(), w))
        .collect();
    let entries = store.outbox_entries(Seq(1), usize::MAX).unwrap();
    let mut queued: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut last_version: Option<Version> = None;
    let mut queued_version: BTreeMap<(String, String), Version> = BTreeMap::new();
    for (i, (seq, change)) in entries.iter().enumerate() {
        assert_eq!(
            seq.0,
            i as u64 + 1,
            "outbox sequence numbers skip or repeat"
        );
        let text = serde_json::to_string(change).unwrap();
        assert!(
            !text.contains("ssn"),
            "denied field queued at {seq:?}: {text}"
        );
        let address = (
            change.collection.as_str().to_owned(),
            change.key.as_str().to_owned(),
        );
        let write = written
            .get(&address)
            .unwrap_or_else(|| panic!("outbox entry {seq:?} for a record never written: {text}"));
        let expected = write.permitted().unwrap_or_else(|| {
            panic!("outbox entry {seq:?} for a write with nothing permitted: {text}")
        });
        assert!(change.state.deleted.is_none(), "{text}");
        let queued_fields: Map<String, Value> = change
            .state
            .fields
            .iter()
            .map(|(name, state)| match &state.value {
                FieldValue::Set(v) => (name.as_str().to_owned(), v.clone()),
                FieldValue::Deleted => panic!("field tombstone queued at {seq:?}: {text}"),
            })
            .collect();
        assert_eq!(queued_fields, expected, "outbox entry {seq:?}");
        let version = change
            .state
            .max_version()
            .cloned()
            .expect("a stamped change");
        if let Some(last) = &last_version {
            assert!(
                &version > last,
                "clock went backwards at {seq:?}: {version:?} after {last:?}"
            );
        }
        last_version = Some(version.clone());
        queued_version.insert(address.clone(), version);
        *queued.entry(address).or_default() += 1;
    }
    for (address, write) in &written {
        let stored = present.contains(address);
        let expected = usize::from(stored && write.permitted().is_some());
        let count = queued.get(address).copied().unwrap_or(0);
        assert_eq!(
            count,
            expected,
            "{address:?}: {count} outbox entries; stored: {stored}, permitted: {:?}",
            write.permitted()
        );
        // History commits with the change: a stored record with synced
        // fields has exactly its one version (those fields, from nothing, at
        // the outbox entry's version); anything else has none.
        let collection = CollectionName::new(write.collection).unwrap();
        let key = RecordKey::new(write.key.clone()).unwrap();
        let versions = store.history(&collection, &key, 10).unwrap();
        match write.permitted().filter(|_| stored) {
            Some(permitted) => {
                assert_eq!(versions.len(), 1, "{address:?}: versions {versions:?}");
                let entry = &versions[0].1;
                let after: Map<String, Value> = entry
                    .changed
                    .iter()
                    .map(|(name, diff)| {
                        assert_eq!(diff.before, None, "{address:?}: {entry:?}");
                        let value = diff.after.clone().expect("a value written");
                        (name.as_str().to_owned(), value)
                    })
                    .collect();
                assert_eq!(after, permitted, "{address:?}: {entry:?}");
                assert_eq!(Some(&entry.version), queued_version.get(address));
            }
            None => assert!(versions.is_empty(), "{address:?}: {versions:?}"),
        }
    }
    assert_eq!(store.outbox_len().unwrap(), entries.len() as u64);
    assert_eq!(
        pending,
        entries.len() as u64,
        "/v1/status outbox_pending after the last restart"
    );
    let store_seqs: Vec<u64> = entries.iter().map(|(s, _)| s.0).collect();
    assert_eq!(api_seqs, store_seqs, "/v1/outbox after the last restart");

    eprintln!(
        "agent_kill: {KILLS} kills, {} requests, {} writes acknowledged ({acked_batches} batches), \
         {unacked_present} unacknowledged requests committed anyway, {} outbox entries, {:.1?}",
        attempts.len(),
        acked.len(),
        entries.len(),
        started.elapsed()
    );
}
