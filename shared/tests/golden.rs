//! Golden byte fixtures for the wire envelopes and the stored record format.
//!
//! Every fixture in `tests/fixtures/*.cbor.hex` is kept forever: a build must
//! encode the fixed value to exactly those bytes and decode those bytes back to
//! exactly that value. A change that breaks a fixture is a wire-format change and
//! needs a new envelope version, not a new fixture. To add a fixture for a new
//! value, run once with `FIELDSYNC_BLESS=1`; that writes fixtures that are missing
//! and never rewrites one that exists.
//!
//! The envelopes of wire version 1 (`hello.cbor.hex` and the others without a
//! version in their name) stay too: this build must answer each of them with
//! `UnsupportedVersion { found: 1 }`, the documented answer to a v1 peer. The
//! version 2 envelopes are `NAME.v2.cbor.hex`. `record_state.cbor.hex` is a
//! stored value without an envelope and still decodes as it did.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::PathBuf;

use fieldsync_shared::codec::{self, CodecError};
use fieldsync_shared::session::{entry_check, Cursor, Incarnation, Mark};
use fieldsync_shared::wire::{
    Ack, Batch, Entry, Envelope, ErrorCode, ErrorMsg, Hello, Message, Snapshot, SnapshotAck, Time,
    Welcome, WIRE_VERSION,
};
use fieldsync_shared::{AgentId, Change, CollectionName, FieldName, FieldState, FieldValue};
use fieldsync_shared::{Origin, RecordKey, RecordState, Seq, Stamp, Version};
use serde_json::json;

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text
        .bytes()
        .filter(|b| !b.is_ascii_whitespace())
        .map(|b| match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => panic!("fixture holds a non-hex character {:?}", b as char),
        })
        .collect();
    assert!(
        digits.len().is_multiple_of(2),
        "fixture holds an odd number of hex digits"
    );
    digits.chunks(2).map(|p| p[0] << 4 | p[1]).collect()
}

/// The checked-in form: lowercase hex, 64 digits a line.
fn hex_lines(bytes: &[u8]) -> String {
    let hex = hex_encode(bytes);
    let lines: Vec<&str> = hex
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    lines.join("\n") + "\n"
}

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Envelopes of wire version 1, kept forever: each must now be refused as
/// `UnsupportedVersion { found: 1 }`.
const V1_FIXTURES: [&str; 5] = ["hello", "welcome", "batch", "ack", "error"];

/// Every fixture this file encodes and decodes. A fixture on disk that is not
/// listed here or in [`V1_FIXTURES`] fails `no_fixture_is_orphaned`: fixtures
/// are never dropped.
const FIXTURES: [&str; 14] = [
    "hello.v2",
    "welcome.v2",
    "batch.v2",
    "ack.v2",
    "snapshot.v2",
    "snapshot_ack.v2",
    "time.v2",
    "error.v2",
    "record_state",
    "welcome_health.v2",
    "health.v2",
    "hello_rules.v2",
    "record_state_rules",
    "record_state_rules_compact",
];

/// Compares `encoded` with the fixture `name` and decodes the fixture back to
/// `value`. Writes a missing fixture only when `FIELDSYNC_BLESS=1`.
fn check<T: PartialEq + Debug>(
    name: &str,
    value: &T,
    encoded: Result<Vec<u8>, CodecError>,
    decode: impl Fn(&[u8]) -> Result<T, CodecError>,
) {
    assert!(FIXTURES.contains(&name), "list {name} in FIXTURES");
    let encoded = encoded.unwrap_or_else(|e| panic!("{name}: encoding failed: {e}"));
    let path = fixtures_dir().join(format!("{name}.cbor.hex"));
    let fixture = match std::fs::read_to_string(&path) {
        Ok(text) => hex_decode(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if std::env::var("FIELDSYNC_BLESS").as_deref() != Ok("1") {
                panic!(
                    "fixture {} is missing; run with FIELDSYNC_BLESS=1 to write it, \
                     inspect it, and commit it",
                    path.display()
                );
            }
            std::fs::create_dir_all(fixtures_dir()).unwrap();
            std::fs::write(&path, hex_lines(&encoded)).unwrap();
            encoded.clone()
        }
        Err(e) => panic!("cannot read {}: {e}", path.display()),
    };
    assert_eq!(
        hex_encode(&encoded),
        hex_encode(&fixture),
        "{name}: this build encodes the value differently from the fixture kept \
         in {}; fixtures are never rewritten — a format change needs a new wire version",
        path.display()
    );
    let decoded =
        decode(&fixture).unwrap_or_else(|e| panic!("{name}: fixture does not decode: {e}"));
    assert_eq!(
        &decoded, value,
        "{name}: fixture decodes to a different value"
    );
}

fn check_envelope(name: &str, msg: Message) {
    let envelope = Envelope::new(msg);
    check(name, &envelope, codec::encode(&envelope), codec::decode);
}

fn agent() -> AgentId {
    AgentId::new("gw-01").unwrap()
}

fn version(wall_ms: u64, logical: u32, origin: &str) -> Version {
    Version {
        stamp: Stamp::new(wall_ms, logical),
        origin: Origin::new(origin).unwrap(),
    }
}

fn set(v: &Version, value: serde_json::Value) -> FieldState {
    FieldState::plain(v.clone(), FieldValue::Set(value))
}

fn fields<const N: usize>(items: [(&str, FieldState); N]) -> BTreeMap<FieldName, FieldState> {
    items
        .into_iter()
        .map(|(k, f)| (FieldName::new(k).unwrap(), f))
        .collect()
}

#[test]
fn hello() {
    check_envelope(
        "hello.v2",
        Message::Hello(Hello {
            agent: agent(),
            incarnation: Incarnation(0x0123_4567_89ab_cdef),
            down: Cursor {
                source: Some(Incarnation(0xfedc_ba98_7654_3210)),
                at: Mark {
                    seq: Seq(7),
                    check: 0x1d2c_3b4a_5968_7786,
                },
            },
            time_ms: 1_733_000_000_000,
            correction_ms: -172_800_000,
            rules: Default::default(),
        }),
    );
}

#[test]
fn welcome() {
    // A hub that never heard of this agent's store: no source, nothing applied.
    check_envelope(
        "welcome.v2",
        Message::Welcome(Welcome {
            incarnation: Incarnation(0xfedc_ba98_7654_3210),
            up: Cursor::default(),
            time_ms: 1_733_000_000_042,
            health: false,
        }),
    );
}

/// The changes of the batch fixture: many kinds of JSON value, a field
/// delete, a record delete with a newer write on top.
fn batch_entries() -> Vec<Entry> {
    let w = version(1_733_000_000_000, 0, "gw-01");
    let later = version(1_733_000_000_500, 3, "gw-01");
    let hub = version(1_733_000_001_000, 0, "@hub");
    vec![
        Entry {
            seq: Seq(1),
            change: Change {
                collection: CollectionName::new("patients").unwrap(),
                key: RecordKey::new("p-17/bed 3").unwrap(),
                state: RecordState {
                    deleted: None,
                    fields: fields([
                        ("initials", set(&w, json!("J.D."))),
                        ("ward", set(&w, json!("Zürich Nord"))),
                        ("heart_rate", set(&w, json!(72))),
                        ("delta", set(&w, json!(-3))),
                        ("counter", set(&w, json!(u64::MAX))),
                        ("temp", set(&w, json!(36.6))),
                        ("half", set(&w, json!(1.5))),
                        ("ok", set(&w, json!(true))),
                        ("note", set(&w, json!(null))),
                        ("tags", set(&w, json!(["a", 1, [], {}]))),
                        ("vitals", set(&w, json!({"bp": {"sys": 120, "dia": 80}}))),
                        ("old", FieldState::plain(w.clone(), FieldValue::Deleted)),
                    ]),
                },
            },
        },
        // Seq 2 was filtered to nothing by the policy, so it is absent.
        Entry {
            seq: Seq(3),
            change: Change {
                collection: CollectionName::new("patients").unwrap(),
                key: RecordKey::new("p-18").unwrap(),
                state: RecordState {
                    deleted: Some(later),
                    fields: fields([("ward", set(&hub, json!("ICU")))]),
                },
            },
        },
    ]
}

#[test]
fn batch() {
    let entries = batch_entries();
    // The check is the digest of the sender's entry at `last` (here seq 4,
    // filtered out on the way; its digest stands in as a fixed number).
    check_envelope(
        "batch.v2",
        Message::Batch(Batch {
            first: Seq(1),
            last: Seq(4),
            check: 0x8a3f_0c11_d2e4_5b67,
            entries,
        }),
    );
}

/// The entry check is pinned too: it is part of every cursor on disk and on
/// the wire, so a build that digests differently would resync every link.
#[test]
fn entry_checks_are_stable() {
    let checks: Vec<String> = batch_entries()
        .iter()
        .map(|e| format!("{:016x}", entry_check(&e.change)))
        .collect();
    assert_eq!(checks, ["bad10b87b2ef6474", "475d921fd7a2ebca"]);
}

#[test]
fn ack() {
    check_envelope(
        "ack.v2",
        Message::Ack(Ack {
            upto: Seq(3),
            check: 0x8a3f_0c11_d2e4_5b67,
        }),
    );
}

#[test]
fn snapshot() {
    let changes = batch_entries().into_iter().map(|e| e.change).collect();
    check_envelope(
        "snapshot.v2",
        Message::Snapshot(Snapshot {
            resync: 2,
            part: 3,
            changes,
            end: Some(Mark {
                seq: Seq(1_000),
                check: 0x5245_5359_4e43_0001,
            }),
        }),
    );
}

#[test]
fn snapshot_ack() {
    check_envelope(
        "snapshot_ack.v2",
        Message::SnapshotAck(SnapshotAck { resync: 2, part: 3 }),
    );
}

/// A welcome from a hub that takes health reports, and a report.
#[test]
fn health() {
    check_envelope(
        "welcome_health.v2",
        Message::Welcome(Welcome {
            incarnation: Incarnation(0xfedc_ba98_7654_3210),
            up: Cursor::default(),
            time_ms: 1_733_000_000_042,
            health: true,
        }),
    );
    check_envelope(
        "health.v2",
        Message::Health(fieldsync_shared::wire::Health {
            outbox_pending: 42,
            outbox_bytes: 123_456,
            oldest_pending_ms: Some(90_000),
            acked: Seq(1_000),
            drain_per_s: 12.5,
            clock_offset_ms: -250,
        }),
    );
}

#[test]
fn time() {
    check_envelope(
        "time.v2",
        Message::Time(Time {
            time_ms: 1_733_000_060_000,
        }),
    );
}

#[test]
fn error() {
    check_envelope(
        "error.v2",
        Message::Error(ErrorMsg {
            code: ErrorCode::ClockAhead,
            message: "entry 5 is stamped 172800000 ms ahead of this replica's clock".into(),
            at: Some(Seq(5)),
        }),
    );
}

/// A v1 peer's envelopes, byte for byte as v1 builds wrote them, get the
/// documented answer: the version is read before the body, so even a body
/// this build cannot parse is `UnsupportedVersion { found: 1 }`.
#[test]
fn v1_envelopes_are_unsupported_version_1() {
    for name in V1_FIXTURES {
        let path = fixtures_dir().join(format!("{name}.cbor.hex"));
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("v1 fixture {} is kept forever: {e}", path.display()));
        assert_eq!(
            codec::decode(&hex_decode(&text)),
            Err(CodecError::UnsupportedVersion { found: 1 }),
            "{name}"
        );
    }
}

#[test]
fn record_state() {
    let state = RecordState {
        deleted: Some(version(1_733_000_000_000, 0, "@hub")),
        fields: fields([
            (
                "mode",
                set(&version(1_733_000_000_250, 1, "gw-01"), json!("eco")),
            ),
            (
                "setpoint",
                FieldState::plain(version(1_733_000_000_300, 0, "gw-01"), FieldValue::Deleted),
            ),
        ]),
    };
    check(
        "record_state",
        &state,
        codec::to_bytes(&state),
        codec::from_bytes::<RecordState>,
    );
}

/// The smallest envelope, annotated byte by byte: structs are maps keyed by field
/// name, enums are externally tagged (a one-entry map from variant name to body),
/// integers use the shortest form. `docs/wire-format.md` shows this example.
#[test]
fn ack_bytes_are_maps_with_string_keys_and_tagged_enums() {
    let expected = [
        "a2",            // map, 2 entries
        "61 76",         //   text(1) "v"
        "02",            //   unsigned 2
        "63 6d7367",     //   text(3) "msg"
        "a1",            //   map, 1 entry (the enum)
        "63 41636b",     //     text(3) "Ack" (the variant)
        "a2",            //     map, 2 entries (the Ack struct)
        "64 7570746f",   //       text(4) "upto"
        "03",            //       unsigned 3
        "65 636865636b", //       text(5) "check"
        "18 2a",         //       unsigned 42 (one extra byte)
    ]
    .concat()
    .replace(' ', "");
    let ack = Ack {
        upto: Seq(3),
        check: 42,
    };
    let bytes = codec::encode(&Envelope::new(Message::Ack(ack))).unwrap();
    assert_eq!(hex_encode(&bytes), expected);
    assert_eq!(WIRE_VERSION, 2);
}

/// Field tombstones are the bare text "Deleted"; set values are {"Set": value};
/// an absent record tombstone is CBOR null; 1.5 takes the 16-bit float form.
#[test]
fn field_values_and_tombstones_have_the_documented_shape() {
    let deleted = codec::to_bytes(&FieldValue::Deleted).unwrap();
    assert_eq!(hex_encode(&deleted), "6744656c65746564"); // text(7) "Deleted"
    let set = codec::to_bytes(&FieldValue::Set(json!(1.5))).unwrap();
    assert_eq!(hex_encode(&set), "a163536574f93e00"); // {"Set": f16 1.5}
    let empty = codec::to_bytes(&RecordState::default()).unwrap();
    // {"deleted": null, "fields": {}}
    assert_eq!(hex_encode(&empty), "a26764656c65746564f6666669656c6473a0");
}

/// The name of each error code. The match is exhaustive, so a new code fails to
/// compile here until its encoding is pinned.
fn code_name(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::Malformed => "Malformed",
        ErrorCode::UnsupportedVersion => "UnsupportedVersion",
        ErrorCode::TooLarge => "TooLarge",
        ErrorCode::SequenceGap => "SequenceGap",
        ErrorCode::PolicyDenied => "PolicyDenied",
        ErrorCode::Internal => "Internal",
        ErrorCode::HelloFirst => "HelloFirst",
        ErrorCode::ClockAhead => "ClockAhead",
        ErrorCode::IdentityConflict => "IdentityConflict",
        ErrorCode::RulesMismatch => "RulesMismatch",
        ErrorCode::SchemaRefused => "SchemaRefused",
    }
}

#[test]
fn every_error_code_is_its_name_as_text() {
    for code in [
        ErrorCode::Malformed,
        ErrorCode::UnsupportedVersion,
        ErrorCode::TooLarge,
        ErrorCode::SequenceGap,
        ErrorCode::PolicyDenied,
        ErrorCode::Internal,
        ErrorCode::HelloFirst,
        ErrorCode::ClockAhead,
        ErrorCode::IdentityConflict,
        ErrorCode::RulesMismatch,
        ErrorCode::SchemaRefused,
    ] {
        let name = code_name(code);
        let mut expected = vec![0x60 + u8::try_from(name.len()).unwrap()];
        expected.extend_from_slice(name.as_bytes());
        assert_eq!(codec::to_bytes(&code).unwrap(), expected, "{name}");
        assert_eq!(codec::from_bytes::<ErrorCode>(&expected).unwrap(), code);
    }
}

#[test]
fn no_fixture_is_orphaned() {
    let Ok(dir) = std::fs::read_dir(fixtures_dir()) else {
        panic!("{} is missing", fixtures_dir().display());
    };
    for entry in dir {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let stem = name.strip_suffix(".cbor.hex");
        assert!(
            stem.is_some_and(|s| FIXTURES.contains(&s) || V1_FIXTURES.contains(&s)),
            "fixture {name} is not checked by any test; fixtures are kept forever"
        );
    }
    // And every listed fixture is on disk (a v2 one once blessed).
    for name in FIXTURES.iter().chain(&V1_FIXTURES) {
        let path = fixtures_dir().join(format!("{name}.cbor.hex"));
        assert!(path.exists(), "fixture {} is missing", path.display());
    }
}

#[test]
fn hex_helpers_round_trip() {
    let bytes: Vec<u8> = (0..=255).collect();
    assert_eq!(hex_decode(&hex_lines(&bytes)), bytes);
    assert_eq!(hex_decode("0A ff\n10"), [0x0a, 0xff, 0x10]);
}

/// A hello from an agent with merge rules carries their fingerprint (a hello
/// without rules leaves it out: `hello.v2` is unchanged).
#[test]
fn hello_with_rules() {
    check_envelope(
        "hello_rules.v2",
        Message::Hello(Hello {
            agent: agent(),
            incarnation: Incarnation(0x0123_4567_89ab_cdef),
            down: Cursor::default(),
            time_ms: 1_733_000_000_000,
            correction_ms: 0,
            rules: fieldsync_shared::rules::Fingerprint(*b"0123456789abcdef"),
        }),
    );
}

/// The field states of every merge rule, built through the writer's API so
/// the fixture shows what replicas really store and send.
#[test]
fn record_state_with_rules() {
    use fieldsync_shared::rules::{FieldRule, MergeRule, Side};
    use fieldsync_shared::Edit;
    let rule_of = |f: &FieldName| {
        let (merge, prefer) = match f.as_str() {
            "runtime_s" => (MergeRule::Counter, None),
            "peak" => (MergeRule::Max, None),
            "low" => (MergeRule::Min, None),
            "dose" => (MergeRule::Review, None),
            "limit" => (MergeRule::Lww, Some(Side::Hub)),
            _ => (MergeRule::Lww, None),
        };
        FieldRule { merge, prefer }
    };
    let f = |n: &str| FieldName::new(n).unwrap();
    let mut gw = RecordState::default();
    gw.edit(
        vec![
            (f("runtime_s"), Edit::Add(5)),
            (f("peak"), Edit::Set(json!(71.5))),
            (f("low"), Edit::Set(json!(-3))),
            (f("dose"), Edit::Set(json!("5 mg"))),
            (f("limit"), Edit::Set(json!(90))),
        ],
        &version(1_733_000_000_100, 0, "gw-01"),
        0x0123_4567_89ab_cdef,
        rule_of,
    )
    .unwrap();
    let mut hub = RecordState::default();
    hub.edit(
        vec![
            (f("runtime_s"), Edit::Add(-2)),
            (f("dose"), Edit::Set(json!("10 mg"))),
            (f("limit"), Edit::Set(json!(60))),
        ],
        &version(1_733_000_000_050, 0, "@hub"),
        0xfedc_ba98_7654_3210,
        rule_of,
    )
    .unwrap();
    use fieldsync_shared::Merge;
    gw.merge(&hub);
    check(
        "record_state_rules_compact",
        &gw,
        codec::to_bytes(&gw),
        codec::from_bytes::<RecordState>,
    );
    // The first encoding of ruled fields (each with its view written out, a
    // review or prefer state with all it had seen, zeros and empty clears
    // spelled out) still decodes to the same state: stores written by it
    // stay readable.
    let first = hex_decode(
        &std::fs::read_to_string(fixtures_dir().join("record_state_rules.cbor.hex")).unwrap(),
    );
    assert_eq!(codec::from_bytes::<RecordState>(&first).unwrap(), gw);
}
