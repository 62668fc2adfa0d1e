//! Arbitrary bytes into the envelope decoder: it returns a message or a
//! typed error, never panics; and whatever it accepts, it accepts again
//! after encoding, unchanged.
#![no_main]

use chrono::{TimeZone, Utc};
use libfuzzer_sys::fuzz_target;
use worker_iot_core::envelope::{IdSource, decode};

const MAX: usize = 262_144;

fuzz_target!(|data: &[u8]| {
    let received = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let amqp_id = data.first().is_some_and(|b| b % 2 == 0).then_some("amqp-id");
    let Ok(message) = decode(data, amqp_id, received, MAX) else {
        return;
    };
    assert!(data.len() <= MAX);
    assert!(!message.id.is_empty());
    let encoded = message.to_json();
    // The encoding may be longer than the input (escapes), so no size cap here.
    let again = decode(&encoded, None, received, usize::MAX).unwrap_or_else(|e| {
        panic!(
            "re-encoded message rejected: {e}; {}",
            String::from_utf8_lossy(&encoded)
        )
    });
    let expected = worker_iot_core::envelope::Message {
        id_source: IdSource::Envelope,
        ..message
    };
    assert_eq!(again, expected);
});
