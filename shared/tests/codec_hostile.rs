//! Hostile input for the codec: `decode` must answer every malformed, truncated,
//! oversized, deeply nested, wrongly versioned or semantically invalid message
//! with a typed `CodecError`, never a panic; `encode` must refuse to produce an
//! envelope over the wire limit.

use std::collections::BTreeMap;

use fieldsync_shared::codec::{self, CodecError};
use fieldsync_shared::record::MAX_VALUE_DEPTH;
use fieldsync_shared::session::{Cursor, Incarnation, Mark};
use fieldsync_shared::wire::{
    Ack, Batch, Entry, Envelope, ErrorCode, ErrorMsg, Hello, InvalidMessage, Message, Snapshot,
    SnapshotAck, Time, Welcome, MAX_BATCH_ENTRIES, MAX_MESSAGE_BYTES, WIRE_VERSION,
};
use fieldsync_shared::{AgentId, Change, CollectionName, FieldName, FieldState, FieldValue};
use fieldsync_shared::{Origin, RecordKey, RecordState, Seq, Stamp, Value, Version};
use proptest::prelude::*;
use serde_json::json;

// ---- a minimal CBOR writer for hand-made messages --------------------------

/// A CBOR head: major type and argument, in the shortest form.
fn head(major: u8, n: u64) -> Vec<u8> {
    let m = major << 5;
    match n {
        0..=23 => vec![m | n as u8],
        24..=0xff => vec![m | 24, n as u8],
        0x100..=0xffff => [vec![m | 25], (n as u16).to_be_bytes().to_vec()].concat(),
        0x1_0000..=0xffff_ffff => [vec![m | 26], (n as u32).to_be_bytes().to_vec()].concat(),
        _ => [vec![m | 27], n.to_be_bytes().to_vec()].concat(),
    }
}

fn uint(n: u64) -> Vec<u8> {
    head(0, n)
}

fn text(s: &str) -> Vec<u8> {
    [head(3, s.len() as u64), s.as_bytes().to_vec()].concat()
}

fn map(pairs: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = head(5, pairs.len() as u64);
    for (k, v) in pairs {
        out.extend(text(k));
        out.extend_from_slice(v);
    }
    out
}

/// `{"v": 2, "msg": ` — everything that follows is the message body.
fn envelope_prefix() -> Vec<u8> {
    [
        head(5, 2),
        text("v"),
        uint(WIRE_VERSION.into()),
        text("msg"),
    ]
    .concat()
}

// ---- valid values ----------------------------------------------------------

fn version(wall_ms: u64, origin: &str) -> Version {
    Version {
        stamp: Stamp::new(wall_ms, 0),
        origin: Origin::new(origin).unwrap(),
    }
}

fn change_with(field: &str, value: Value) -> Change {
    let mut fields = BTreeMap::new();
    fields.insert(
        FieldName::new(field).unwrap(),
        FieldState::plain(version(1_000, "gw-1"), FieldValue::Set(value)),
    );
    Change {
        collection: CollectionName::new("patients").unwrap(),
        key: RecordKey::new("p-1").unwrap(),
        state: RecordState {
            deleted: None,
            fields,
        },
    }
}

fn entry(seq: u64) -> Entry {
    Entry {
        seq: Seq(seq),
        change: change_with("ward", json!("ICU")),
    }
}

fn batch(first: u64, last: u64, entries: Vec<Entry>) -> Envelope {
    Envelope::new(Message::Batch(Batch {
        first: Seq(first),
        last: Seq(last),
        check: 0x0bad_cafe,
        entries,
    }))
}

fn snapshot(part: u64, changes: Vec<Change>) -> Envelope {
    Envelope::new(Message::Snapshot(Snapshot {
        resync: 1,
        part,
        changes,
        end: None,
    }))
}

/// One valid envelope of every message kind.
fn valid_envelopes() -> Vec<Envelope> {
    let mut deleted = change_with("x", json!(null));
    deleted.state.deleted = Some(version(2_000, "@hub"));
    deleted.state.fields.clear();
    vec![
        Envelope::new(Message::Hello(Hello {
            agent: AgentId::new("gw-1").unwrap(),
            incarnation: Incarnation(77),
            down: Cursor {
                source: Some(Incarnation(5)),
                at: Mark {
                    seq: Seq(3),
                    check: 0xdead_beef,
                },
            },
            time_ms: 1_733_000_000_000,
            correction_ms: -3_600_000,
            rules: Default::default(),
        })),
        Envelope::new(Message::Welcome(Welcome {
            incarnation: Incarnation(5),
            up: Cursor {
                source: Some(Incarnation(77)),
                at: Mark {
                    seq: Seq(9),
                    check: 1,
                },
            },
            time_ms: 1_733_000_000_500,
            health: false,
        })),
        batch(
            4,
            7,
            vec![
                Entry {
                    seq: Seq(4),
                    change: change_with("vitals", json!({"bp": [120, 80], "t": 36.6})),
                },
                Entry {
                    seq: Seq(6),
                    change: deleted.clone(),
                },
            ],
        ),
        Envelope::new(Message::Ack(Ack {
            upto: Seq(5),
            check: u64::MAX,
        })),
        Envelope::new(Message::Snapshot(Snapshot {
            resync: 3,
            part: 2,
            changes: vec![change_with("ward", json!("ICU")), deleted],
            end: Some(Mark {
                seq: Seq(12),
                check: 99,
            }),
        })),
        Envelope::new(Message::SnapshotAck(SnapshotAck { resync: 3, part: 2 })),
        Envelope::new(Message::Time(Time {
            time_ms: 1_733_000_060_000,
        })),
        Envelope::new(Message::Error(ErrorMsg {
            code: ErrorCode::PolicyDenied,
            message: "field not permitted".into(),
            at: Some(Seq(4)),
        })),
    ]
}

/// Encodes without the size check and without validation, so invalid envelopes
/// can be produced on purpose.
fn raw(envelope: &Envelope) -> Vec<u8> {
    codec::to_bytes(envelope).unwrap()
}

fn nested(depth: usize) -> Value {
    let mut v = json!(1);
    for _ in 0..depth {
        v = json!([v]);
    }
    v
}

/// Replaces the one occurrence of `from` in `bytes` with `to` (same length).
fn patch(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at: Vec<usize> = bytes
        .windows(from.len())
        .enumerate()
        .filter(|(_, w)| *w == from.as_bytes())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(at.len(), 1, "{from:?} must occur exactly once");
    let mut out = bytes.to_vec();
    out[at[0]..at[0] + to.len()].copy_from_slice(to.as_bytes());
    out
}

fn assert_malformed(bytes: &[u8], what: &str) {
    match codec::decode(bytes) {
        Err(CodecError::Malformed(_)) => {}
        other => panic!("{what}: expected Malformed, got {other:?}"),
    }
}

fn invalid(bytes: &[u8]) -> InvalidMessage {
    match codec::decode(bytes) {
        Err(CodecError::Invalid(e)) => e,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

// ---- tests -----------------------------------------------------------------

#[test]
fn valid_messages_round_trip() {
    for envelope in valid_envelopes() {
        let bytes = codec::encode(&envelope).unwrap();
        assert_eq!(codec::decode(&bytes).unwrap(), envelope);
    }
}

#[test]
fn every_truncated_prefix_is_malformed() {
    for envelope in valid_envelopes() {
        let bytes = codec::encode(&envelope).unwrap();
        for len in 0..bytes.len() {
            assert_malformed(&bytes[..len], &format!("{:?} cut at {len}", envelope.msg));
        }
    }
}

#[test]
fn trailing_bytes_are_malformed() {
    for envelope in valid_envelopes() {
        let mut bytes = codec::encode(&envelope).unwrap();
        bytes.push(0x00);
        assert_malformed(&bytes, "one byte after a whole envelope");
    }
}

#[test]
fn deep_nesting_is_refused_without_overflowing_the_stack() {
    let levels = 10_000;
    let deep_arrays = [vec![0x81; levels], vec![0x01]].concat();
    let deep_maps = [[0xa1, 0x61, b'k'].repeat(levels), vec![0x01]].concat();
    let deep_indefinite = [vec![0x9f; levels], vec![0xff; levels]].concat();
    let deep_tags = [vec![0xc6; levels], vec![0x01]].concat();
    for (what, body) in [
        ("arrays", deep_arrays),
        ("maps", deep_maps),
        ("indefinite arrays", deep_indefinite),
        ("tags", deep_tags),
    ] {
        assert_malformed(&body, &format!("bare {what}"));
        // As the message body, where the version check skips over it and the
        // envelope decoder then descends into it.
        let in_envelope = [envelope_prefix(), body].concat();
        assert_malformed(&in_envelope, &format!("{what} as the message"));
    }
}

#[test]
fn huge_declared_lengths_are_refused_without_allocating() {
    let huge = 1u64 << 60;
    let batch_with_entries = |entries_head: Vec<u8>| {
        let body = map(&[
            ("first", uint(1)),
            ("last", uint(1)),
            ("entries", entries_head),
        ]);
        [envelope_prefix(), map(&[("Batch", body)])].concat()
    };
    for n in [huge, u64::MAX] {
        for major in [2, 3, 4, 5] {
            // byte string, text string, array, map
            let h = head(major, n);
            assert_malformed(&h, &format!("bare major {major} of length {n}"));
            assert_malformed(
                &[envelope_prefix(), h.clone()].concat(),
                &format!("message of major {major} and length {n}"),
            );
            assert_malformed(
                &batch_with_entries(h),
                &format!("entries of major {major} and length {n}"),
            );
        }
    }
}

#[test]
fn oversize_input_is_refused_before_parsing() {
    // 0xff is a stray "break": as CBOR it would be Malformed, so TooLarge proves
    // the size is checked first.
    let bytes = vec![0xff; MAX_MESSAGE_BYTES + 1];
    assert_eq!(
        codec::decode(&bytes),
        Err(CodecError::TooLarge {
            len: MAX_MESSAGE_BYTES + 1,
            max: MAX_MESSAGE_BYTES
        })
    );
    assert_malformed(&bytes[..MAX_MESSAGE_BYTES], "a limit-sized run of breaks");
}

/// An envelope whose encoding is exactly `len` bytes: one entry with a long
/// string value (a string over 64 KiB has a 5-byte head, so size grows by one
/// per character).
fn envelope_of_size(len: usize) -> Envelope {
    let size = |n: usize| raw(&batch(1, 1, vec![big_entry(n)])).len();
    let base = 100_000;
    let overhead = size(base) - base;
    batch(1, 1, vec![big_entry(len - overhead)])
}

fn big_entry(n: usize) -> Entry {
    Entry {
        seq: Seq(1),
        change: change_with("blob", Value::String("x".repeat(n))),
    }
}

#[test]
fn the_size_limit_is_exact_in_both_directions() {
    let at_limit = envelope_of_size(MAX_MESSAGE_BYTES);
    let bytes = codec::encode(&at_limit).unwrap();
    assert_eq!(bytes.len(), MAX_MESSAGE_BYTES);
    assert_eq!(codec::decode(&bytes).unwrap(), at_limit);

    let over = envelope_of_size(MAX_MESSAGE_BYTES + 1);
    let expected = CodecError::TooLarge {
        len: MAX_MESSAGE_BYTES + 1,
        max: MAX_MESSAGE_BYTES,
    };
    assert_eq!(codec::encode(&over), Err(expected.clone()));
    assert_eq!(codec::decode(&raw(&over)), Err(expected));
}

#[test]
fn encode_refuses_an_envelope_over_one_mebibyte() {
    let envelope = batch(1, 1, vec![big_entry(2 << 20)]);
    match codec::encode(&envelope) {
        Err(CodecError::TooLarge { len, max }) => {
            assert_eq!(max, MAX_MESSAGE_BYTES);
            assert!(len > 2 << 20, "{len}");
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

#[test]
fn other_versions_are_unsupported_even_with_a_body_this_build_cannot_read() {
    for envelope in valid_envelopes() {
        for v in [0, 1, 3, u16::MAX] {
            let bytes = raw(&Envelope {
                v,
                msg: envelope.msg.clone(),
            });
            assert_eq!(
                codec::decode(&bytes),
                Err(CodecError::UnsupportedVersion { found: v })
            );
        }
    }
    // A future message kind this build has never heard of.
    let future = map(&[
        ("v", uint(3)),
        ("msg", map(&[("Ping", map(&[("nonce", uint(7))]))])),
    ]);
    assert_eq!(
        codec::decode(&future),
        Err(CodecError::UnsupportedVersion { found: 3 })
    );
    // A version 1 body (the v1 `Ack` had no check) at version 1 is refused
    // for its version, and at version 2 it is simply malformed.
    let v1_ack = map(&[("Ack", map(&[("upto", uint(3))]))]);
    assert_eq!(
        codec::decode(&map(&[("v", uint(1)), ("msg", v1_ack.clone())])),
        Err(CodecError::UnsupportedVersion { found: 1 })
    );
    assert_malformed(
        &map(&[("v", uint(2)), ("msg", v1_ack)]),
        "a v1 ack body at version 2",
    );
    let unknown = map(&[
        ("v", uint(2)),
        ("msg", map(&[("Ping", map(&[("nonce", uint(7))]))])),
    ]);
    assert_malformed(&unknown, "unknown message kind at version 2");
}

#[test]
fn a_missing_or_out_of_range_version_is_malformed() {
    let ack = map(&[("Ack", map(&[("upto", uint(1)), ("check", uint(1))]))]);
    assert_malformed(&map(&[("msg", ack.clone())]), "no version");
    assert_malformed(
        &map(&[("v", uint(70_000)), ("msg", ack.clone())]),
        "version beyond u16",
    );
    assert_malformed(
        &map(&[("v", text("2")), ("msg", ack.clone())]),
        "version as text",
    );
    assert_malformed(&map(&[("v", uint(2))]), "no message");
    // The same body with the version right is accepted.
    assert!(codec::decode(&map(&[("v", uint(2)), ("msg", ack)])).is_ok());
}

#[test]
fn invalid_ids_inside_a_message_are_malformed() {
    let hello = raw(&Envelope::new(Message::Hello(Hello {
        agent: AgentId::new("a-b").unwrap(),
        incarnation: Incarnation(1),
        down: Cursor::default(),
        time_ms: 0,
        correction_ms: 0,
        rules: Default::default(),
    })));
    match codec::decode(&patch(&hello, "a-b", "a/b")) {
        Err(CodecError::Malformed(m)) => assert!(m.contains("agent id"), "{m}"),
        other => panic!("expected Malformed, got {other:?}"),
    }
    assert_malformed(&patch(&hello, "a-b", "$ab"), "agent id starting with $");

    let bytes = raw(&batch(1, 1, vec![entry(1)]));
    let cases = [
        ("patients", "pat/ents", "collection name"),
        ("p-1", "p\n1", "record key"),
        ("ward", "wa\u{7}d", "field name"),
        ("gw-1", "gw#1", "origin"),
    ];
    for (from, to, kind) in cases {
        match codec::decode(&patch(&bytes, from, to)) {
            Err(CodecError::Malformed(m)) => assert!(m.contains(kind), "{kind}: {m}"),
            other => panic!("{kind}: expected Malformed, got {other:?}"),
        }
    }
}

#[test]
fn batches_that_break_the_sequence_rules_are_invalid() {
    assert_eq!(
        invalid(&raw(&batch(5, 3, vec![]))),
        InvalidMessage::BadRange {
            first: Seq(5),
            last: Seq(3)
        }
    );
    assert_eq!(
        invalid(&raw(&batch(0, 3, vec![entry(1)]))),
        InvalidMessage::BadRange {
            first: Seq(0),
            last: Seq(3)
        }
    );
    let out_of_order = [
        (vec![entry(3), entry(2)], 2),
        (vec![entry(2), entry(2)], 2),
        (vec![entry(1)], 1),
        (vec![entry(2), entry(6)], 6),
    ];
    for (entries, bad) in out_of_order {
        assert_eq!(
            invalid(&raw(&batch(2, 5, entries))),
            InvalidMessage::EntryOutOfOrder { seq: Seq(bad) }
        );
    }
}

#[test]
fn a_batch_without_entries_is_valid() {
    // Every change in the range was filtered out by the sender's policy.
    let envelope = batch(3, 9, vec![]);
    assert_eq!(codec::decode(&raw(&envelope)).unwrap(), envelope);
}

#[test]
fn empty_changes_are_invalid() {
    let mut empty = entry(2);
    empty.change.state = RecordState::default();
    assert_eq!(
        invalid(&raw(&batch(1, 3, vec![entry(1), empty]))),
        InvalidMessage::EmptyChange { seq: Seq(2) }
    );
}

#[test]
fn too_many_entries_are_invalid() {
    let entries: Vec<Entry> = (1..=MAX_BATCH_ENTRIES as u64 + 1)
        .map(|seq| Entry {
            seq: Seq(seq),
            change: Change {
                collection: CollectionName::new("c").unwrap(),
                key: RecordKey::new("k").unwrap(),
                state: RecordState::default(),
            },
        })
        .collect();
    let last = entries.len() as u64;
    let bytes = raw(&batch(1, last, entries));
    assert!(bytes.len() <= MAX_MESSAGE_BYTES, "{}", bytes.len());
    assert_eq!(
        invalid(&bytes),
        InvalidMessage::TooManyEntries {
            count: MAX_BATCH_ENTRIES + 1
        }
    );
}

#[test]
fn values_deeper_than_the_limit_are_invalid() {
    for (depth, wrap_in_object) in [(MAX_VALUE_DEPTH, false), (MAX_VALUE_DEPTH, true)] {
        let value = if wrap_in_object {
            json!({ "o": nested(depth - 1) })
        } else {
            nested(depth)
        };
        let ok = batch(
            1,
            1,
            vec![Entry {
                seq: Seq(1),
                change: change_with("v", value),
            }],
        );
        assert_eq!(codec::decode(&raw(&ok)).unwrap(), ok, "depth {depth}");
    }
    let too_deep = batch(
        1,
        2,
        vec![
            entry(1),
            Entry {
                seq: Seq(2),
                change: change_with("v", nested(MAX_VALUE_DEPTH + 1)),
            },
        ],
    );
    assert_eq!(
        invalid(&raw(&too_deep)),
        InvalidMessage::TooDeep { seq: Seq(2) }
    );
    // Far deeper: refused, as Invalid or (past the decoder's recursion limit)
    // as Malformed, but never a panic.
    for depth in [64, 100, 115, 130, 500] {
        let envelope = batch(
            1,
            1,
            vec![Entry {
                seq: Seq(1),
                change: change_with("v", nested(depth)),
            }],
        );
        match codec::decode(&raw(&envelope)) {
            Err(CodecError::Invalid(InvalidMessage::TooDeep { .. }) | CodecError::Malformed(_)) => {
            }
            other => panic!("depth {depth}: {other:?}"),
        }
    }
}

#[test]
fn a_tombstone_only_change_is_not_too_deep_or_empty() {
    let mut change = change_with("x", nested(MAX_VALUE_DEPTH + 5));
    change.state.fields.clear();
    change.state.deleted = Some(version(5, "gw-1"));
    let envelope = batch(
        1,
        1,
        vec![Entry {
            seq: Seq(1),
            change,
        }],
    );
    assert_eq!(codec::decode(&raw(&envelope)).unwrap(), envelope);
}

#[test]
fn snapshots_that_break_the_part_rules_are_invalid() {
    let bad = |part: u64, reason: &'static str| InvalidMessage::BadSnapshot { part, reason };
    assert_eq!(
        invalid(&raw(&snapshot(0, vec![]))),
        bad(0, "parts count from 1")
    );
    let mut empty = change_with("ward", json!("ICU"));
    empty.state = RecordState::default();
    assert_eq!(
        invalid(&raw(&snapshot(2, vec![change_with("a", json!(1)), empty]))),
        bad(2, "an empty record")
    );
    assert_eq!(
        invalid(&raw(&snapshot(
            1,
            vec![change_with("v", nested(MAX_VALUE_DEPTH + 1))]
        ))),
        bad(1, "a value nested too deeply")
    );
    // The count is checked first, so the smallest (empty) records will do.
    let tiny = Change {
        collection: CollectionName::new("c").unwrap(),
        key: RecordKey::new("k").unwrap(),
        state: RecordState::default(),
    };
    let many = vec![tiny; MAX_BATCH_ENTRIES + 1];
    assert_eq!(
        invalid(&raw(&snapshot(1, many))),
        bad(1, "too many records")
    );
    // A part with no records (everything filtered out) is valid.
    let empty_part = snapshot(1, vec![]);
    assert_eq!(codec::decode(&raw(&empty_part)).unwrap(), empty_part);
}

/// Whatever `decode` accepts is valid and survives a round trip.
fn accepted_is_sound(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(envelope) = codec::decode(bytes) {
        match &envelope.msg {
            Message::Batch(b) => prop_assert_eq!(b.validate(), Ok(())),
            Message::Snapshot(s) => prop_assert_eq!(s.validate(), Ok(())),
            _ => {}
        }
        let again = codec::encode(&envelope).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(codec::decode(&again), Ok(envelope));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        accepted_is_sound(&bytes)?;
    }

    /// Random bytes after a valid `{"v": 2, "msg": ` prefix reach the message
    /// decoder rather than failing at the first byte.
    #[test]
    fn random_message_bodies_never_panic(body in prop::collection::vec(any::<u8>(), 0..256)) {
        accepted_is_sound(&[envelope_prefix(), body].concat())?;
    }

    /// Valid messages with a few bytes overwritten, inserted or removed.
    #[test]
    fn mutated_messages_never_panic(
        which in 0usize..8,
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..4),
    ) {
        let mut bytes = codec::encode(&valid_envelopes()[which]).unwrap();
        for (at, byte, kind) in edits {
            let i = at.index(bytes.len());
            match kind {
                0 => bytes[i] = byte,
                1 => bytes.insert(i, byte),
                _ => { bytes.remove(i); }
            }
        }
        accepted_is_sound(&bytes)?;
    }
}

/// A field must be a plain one (version and value) or a ruled one holding a
/// write: an empty rule state, or a field with neither, is malformed, and a
/// ruled field's view comes from its state, never from what a peer wrote
/// beside it.
#[test]
fn a_field_without_a_write_is_malformed_and_a_ruled_view_is_recomputed() {
    let stamp = map(&[("wall_ms", uint(1_000)), ("logical", uint(0))]);
    let version = map(&[("stamp", stamp.clone()), ("origin", text("gw-01"))]);
    let record = |field: Vec<u8>| {
        [
            head(5, 2),
            text("deleted"),
            vec![0xf6],
            text("fields"),
            map(&[("f", field)]),
        ]
        .concat()
    };
    let empty_counter = map(&[("rule", map(&[("counter", map(&[("parts", head(4, 0))]))]))]);
    let nothing = map(&[]);
    let version_only = map(&[("version", version.clone())]);
    for (what, field) in [
        ("an empty counter", empty_counter),
        ("no version, value or rule", nothing),
        ("a version without a value", version_only),
    ] {
        let got = codec::from_bytes::<RecordState>(&record(field));
        assert!(
            matches!(got, Err(CodecError::Malformed(_))),
            "{what}: {got:?}"
        );
    }
    // A max field whose written view says 999 while its state holds 5.
    let entry = [head(4, 2), version.clone(), uint(5)].concat();
    let lying = map(&[
        ("version", version),
        ("value", map(&[("Set", uint(999))])),
        (
            "rule",
            map(&[("max", map(&[("entries", [head(4, 1), entry].concat())]))]),
        ),
    ]);
    let state = codec::from_bytes::<RecordState>(&record(lying)).unwrap();
    let f = &state.fields[&FieldName::new("f").unwrap()];
    assert_eq!(f.value, FieldValue::Set(json!(5)));
}
