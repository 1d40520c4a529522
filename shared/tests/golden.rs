//! Golden byte fixtures for the wire envelopes and the stored record format.
//!
//! Every fixture in `tests/fixtures/*.cbor.hex` is kept forever: a build must
//! encode the fixed value to exactly those bytes and decode those bytes back to
//! exactly that value. A change that breaks a fixture is a wire-format change and
//! needs a new envelope version, not a new fixture. To add a fixture for a new
//! value, run once with `FIELDSYNC_BLESS=1`; that writes fixtures that are missing
//! and never rewrites one that exists.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::PathBuf;

use fieldsync_shared::codec::{self, CodecError};
use fieldsync_shared::wire::{
    Ack, Batch, Entry, Envelope, ErrorCode, ErrorMsg, Hello, Message, Welcome, WIRE_VERSION,
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
        digits.len() % 2 == 0,
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

/// Every fixture this file checks. A fixture on disk that is not listed here
/// fails `no_fixture_is_orphaned`: fixtures are never dropped.
const FIXTURES: [&str; 6] = ["hello", "welcome", "batch", "ack", "error", "record_state"];

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
    FieldState {
        version: v.clone(),
        value: FieldValue::Set(value),
    }
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
        "hello",
        Message::Hello(Hello {
            agent: agent(),
            down_applied: Seq(7),
        }),
    );
}

#[test]
fn welcome() {
    check_envelope(
        "welcome",
        Message::Welcome(Welcome {
            up_applied: Seq(42),
        }),
    );
}

#[test]
fn batch() {
    let w = version(1_733_000_000_000, 0, "gw-01");
    let later = version(1_733_000_000_500, 3, "gw-01");
    let hub = version(1_733_000_001_000, 0, "@hub");
    let entries = vec![
        // A write of many kinds of JSON value, plus a field delete.
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
                        (
                            "old",
                            FieldState {
                                version: w.clone(),
                                value: FieldValue::Deleted,
                            },
                        ),
                    ]),
                },
            },
        },
        // Seq 2 was filtered to nothing by the policy, so it is absent.
        // A record delete by the hub with a newer write on top.
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
    ];
    check_envelope(
        "batch",
        Message::Batch(Batch {
            first: Seq(1),
            last: Seq(4),
            entries,
        }),
    );
}

#[test]
fn ack() {
    check_envelope("ack", Message::Ack(Ack { upto: Seq(3) }));
}

#[test]
fn error() {
    check_envelope(
        "error",
        Message::Error(ErrorMsg {
            code: ErrorCode::SequenceGap,
            message: "expected at most 5, got a batch starting at 9".into(),
        }),
    );
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
                FieldState {
                    version: version(1_733_000_000_300, 0, "gw-01"),
                    value: FieldValue::Deleted,
                },
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
        "a2",          // map, 2 entries
        "61 76",       //   text(1) "v"
        "01",          //   unsigned 1
        "63 6d7367",   //   text(3) "msg"
        "a1",          //   map, 1 entry (the enum)
        "63 41636b",   //     text(3) "Ack" (the variant)
        "a1",          //     map, 1 entry (the Ack struct)
        "64 7570746f", //       text(4) "upto"
        "03",          //       unsigned 3
    ]
    .concat()
    .replace(' ', "");
    let bytes = codec::encode(&Envelope::new(Message::Ack(Ack { upto: Seq(3) }))).unwrap();
    assert_eq!(hex_encode(&bytes), expected);
    assert_eq!(WIRE_VERSION, 1);
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
            stem.is_some_and(|s| FIXTURES.contains(&s)),
            "fixture {name} is not checked by any test; fixtures are kept forever"
        );
    }
}

#[test]
fn hex_helpers_round_trip() {
    let bytes: Vec<u8> = (0..=255).collect();
    assert_eq!(hex_decode(&hex_lines(&bytes)), bytes);
    assert_eq!(hex_decode("0A ff\n10"), [0x0a, 0xff, 0x10]);
}
