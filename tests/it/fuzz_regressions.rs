//! Every input the fuzzers found a bug with, kept as a regression test.
//! Files in `tests/it/fuzz_regressions/` are named `<target>-<what>`; each is
//! run through the same invariant its fuzz target asserts.

use chrono::{TimeZone, Utc};
use worker_iot_core::envelope::{IdSource, Message, decode};

/// The input decodes, and decode -> encode -> decode gives the same message.
fn assert_envelope_round_trips(data: &[u8]) {
    let received = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let message = decode(data, None, received, 262_144).expect("the saved input is a valid message");
    let again = decode(&message.to_json(), None, received, usize::MAX).expect("re-encoded message accepted");
    assert_eq!(
        again,
        Message {
            id_source: IdSource::Envelope,
            ..message
        }
    );
}

#[test]
fn every_saved_decode_envelope_input_round_trips() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/fuzz_regressions");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("regression inputs") {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("decode_envelope-")
        {
            assert_envelope_round_trips(&std::fs::read(&path).unwrap());
            seen += 1;
        }
    }
    assert!(seen >= 1, "regression inputs are present");
}

/// Found by decode_envelope: serde_json's fast float parser rounded a long
/// integer literal differently from the shortest form it prints, so a
/// decoded value changed when re-encoded. Fixed with `float_roundtrip`.
#[test]
fn long_integer_literals_keep_their_float_value() {
    let body = br#"{"type":"A","data":[1e308,-1e308,18446744000000000000000000000001]}"#;
    assert_envelope_round_trips(body);
    let m = decode(body, None, Utc::now(), 262_144).unwrap();
    assert_eq!(m.data[2].as_f64(), Some(18446744000000000000000000000001_f64));
}

/// Found while writing the fuzz target: a valid RFC 3339 time whose UTC
/// year is 0 printed as `-0001-…`, which no RFC 3339 parser accepts.
#[test]
fn times_outside_years_1_to_9999_are_refused() {
    assert!(
        decode(
            br#"{"type":"A","data":1,"time":"0001-01-01T00:00:00+01:00"}"#,
            None,
            Utc::now(),
            1024
        )
        .is_err()
    );
    assert_envelope_round_trips(br#"{"type":"A","data":1,"time":"0001-01-01T00:59:59-00:01"}"#);
}
