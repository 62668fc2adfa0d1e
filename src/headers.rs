//! The `iot-*` headers the worker writes on every message it republishes
//! (SPEC §4), and the readers for them. Header tables come from the network:
//! every reader tolerates any value type and never panics.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use sha2::{Digest, Sha256};

use crate::failure::ErrorKind;

pub const RETRY_COUNT: &str = "iot-retry-count";
pub const FIRST_FAILURE_AT: &str = "iot-first-failure-at";
pub const LAST_FAILURE_AT: &str = "iot-last-failure-at";
pub const ERROR_KIND: &str = "iot-error-kind";
pub const ERROR: &str = "iot-error";
pub const ERROR_FINGERPRINT: &str = "iot-error-fingerprint";
pub const ORIGINAL_EXCHANGE: &str = "iot-original-exchange";
pub const ORIGINAL_ROUTING_KEY: &str = "iot-original-routing-key";
pub const FAILED_BY: &str = "iot-failed-by";
pub const REQUEUE_COUNT: &str = "iot-requeue-count";
pub const REQUEUED_AT: &str = "iot-requeued-at";

/// Longest `iot-error`, in bytes.
pub const MAX_ERROR_BYTES: usize = 1024;

/// One failure, as it is recorded on the republished copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureRecord<'a> {
    pub kind: ErrorKind,
    /// The message type whose handler failed, or `-` when it is unknown.
    pub handler: &'a str,
    pub error: &'a str,
    /// `iot-retry-count` to write.
    pub retry_count: u32,
    pub now_ms: i64,
    /// Where the delivery came from, used when it has no `iot-original-*` yet.
    pub exchange: &'a str,
    pub routing_key: &'a str,
    /// `host/version`.
    pub failed_by: &'a str,
}

/// The properties of the republished copy: the original's properties and
/// headers, kept as they were, plus the `iot-*` failure headers.
pub fn with_failure(properties: &BasicProperties, record: &FailureRecord<'_>) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    let first_failure = read_i64(Some(&headers), FIRST_FAILURE_AT).unwrap_or(record.now_ms);
    if read_string(Some(&headers), ORIGINAL_EXCHANGE).is_none() {
        put_str(&mut headers, ORIGINAL_EXCHANGE, record.exchange);
        put_str(&mut headers, ORIGINAL_ROUTING_KEY, record.routing_key);
    }
    put_long(&mut headers, RETRY_COUNT, i64::from(record.retry_count));
    put_long(&mut headers, FIRST_FAILURE_AT, first_failure);
    put_long(&mut headers, LAST_FAILURE_AT, record.now_ms);
    put_str(&mut headers, ERROR_KIND, record.kind.as_str());
    put_str(&mut headers, ERROR, truncate_bytes(record.error, MAX_ERROR_BYTES));
    put_str(
        &mut headers,
        ERROR_FINGERPRINT,
        &fingerprint(record.kind, record.handler, record.error),
    );
    put_str(&mut headers, FAILED_BY, record.failed_by);
    properties.clone().with_headers(headers)
}

/// Delayed retries so far: `iot-retry-count`, 0 when absent or not a
/// non-negative integer.
pub fn retry_count(headers: Option<&FieldTable>) -> u32 {
    read_i64(headers, RETRY_COUNT).map_or(0, |n| u32::try_from(n.max(0)).unwrap_or(u32::MAX))
}

/// An integer header of any AMQP integer type.
pub fn read_i64(headers: Option<&FieldTable>, key: &str) -> Option<i64> {
    match headers?.inner().get(key)? {
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        AMQPValue::Boolean(_)
        | AMQPValue::Float(_)
        | AMQPValue::Double(_)
        | AMQPValue::DecimalValue(_)
        | AMQPValue::ShortString(_)
        | AMQPValue::LongString(_)
        | AMQPValue::FieldArray(_)
        | AMQPValue::FieldTable(_)
        | AMQPValue::ByteArray(_)
        | AMQPValue::Void => None,
    }
}

/// A string header (long or short string), lossily decoded.
pub fn read_string(headers: Option<&FieldTable>, key: &str) -> Option<String> {
    match headers?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Sets a string header.
pub fn put_str(headers: &mut FieldTable, key: &str, value: &str) {
    headers.insert(ShortString::from(key), AMQPValue::LongString(LongString::from(value)));
}

/// Sets a long (i64) header.
pub fn put_long(headers: &mut FieldTable, key: &str, value: i64) {
    headers.insert(ShortString::from(key), AMQPValue::LongLongInt(value));
}

/// A stable 16-hex-digit hash of kind, handler and the error with its
/// variable parts masked, so alike failures share one fingerprint.
pub fn fingerprint(kind: ErrorKind, handler: &str, error: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(kind.as_str().as_bytes());
    hasher.update([0]);
    hasher.update(handler.as_bytes());
    hasher.update([0]);
    hasher.update(mask_variable_parts(error).as_bytes());
    hex::encode(&hasher.finalize()[..8])
}

/// Masks what differs between alike errors: quoted values become `"*"`
/// and every word holding a digit (numbers, ids, hashes, uuids) becomes `#`.
pub fn mask_variable_parts(error: &str) -> String {
    let mut out = String::with_capacity(error.len().min(4096));
    let mut word = String::new();
    let mut in_quotes = false;
    let flush = |word: &mut String, out: &mut String| {
        if word.chars().any(|c| c.is_ascii_digit()) {
            out.push('#');
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in error.chars() {
        if in_quotes {
            if c == '"' {
                in_quotes = false;
                out.push_str("*\"");
            }
            continue;
        }
        if c.is_alphanumeric() || c == '_' || c == '-' || c == '.' || c == ':' {
            word.push(c);
            continue;
        }
        flush(&mut word, &mut out);
        if c == '"' {
            in_quotes = true;
        }
        out.push(c);
    }
    if in_quotes {
        out.push_str("*\"");
    }
    flush(&mut word, &mut out);
    out
}

/// Cuts `text` to at most `max` bytes, on a character boundary.
pub fn truncate_bytes(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(error: &str) -> FailureRecord<'_> {
        FailureRecord {
            kind: ErrorKind::Transient,
            handler: "MEASUREMENT",
            error,
            retry_count: 2,
            now_ms: 1_000,
            exchange: "amq.topic",
            routing_key: "iot.x",
            failed_by: "host/0.1.0",
        }
    }

    #[test]
    fn keeps_producer_headers_and_properties() {
        let mut headers = FieldTable::default();
        put_str(&mut headers, "x-producer", "svc-a");
        let original = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_content_type("application/json".into())
            .with_timestamp(42)
            .with_headers(headers);
        let copy = with_failure(&original, &record("boom"));
        assert_eq!(copy.message_id().as_ref().map(|s| s.as_str()), Some("m-1"));
        assert_eq!(copy.timestamp(), &Some(42));
        let h = copy.headers().as_ref();
        assert_eq!(read_string(h, "x-producer").as_deref(), Some("svc-a"));
        assert_eq!(retry_count(h), 2);
        assert_eq!(read_i64(h, FIRST_FAILURE_AT), Some(1_000));
        assert_eq!(read_string(h, ERROR_KIND).as_deref(), Some("transient"));
        assert_eq!(read_string(h, ORIGINAL_EXCHANGE).as_deref(), Some("amq.topic"));
        assert_eq!(read_string(h, FAILED_BY).as_deref(), Some("host/0.1.0"));
        assert_eq!(read_string(h, ERROR_FINGERPRINT).map(|f| f.len()), Some(16));
    }

    #[test]
    fn a_second_failure_keeps_first_failure_time_and_origin() {
        let first = with_failure(&BasicProperties::default(), &record("boom"));
        let second_record = FailureRecord {
            now_ms: 5_000,
            exchange: "",
            routing_key: "q.retry.1s",
            ..record("boom")
        };
        let second = with_failure(&first, &second_record);
        let h = second.headers().as_ref();
        assert_eq!(read_i64(h, FIRST_FAILURE_AT), Some(1_000));
        assert_eq!(read_i64(h, LAST_FAILURE_AT), Some(5_000));
        assert_eq!(read_string(h, ORIGINAL_ROUTING_KEY).as_deref(), Some("iot.x"));
    }

    #[test]
    fn truncates_long_errors_on_char_boundaries() {
        let long = "é".repeat(1000);
        let copy = with_failure(&BasicProperties::default(), &record(&long));
        let error = read_string(copy.headers().as_ref(), ERROR).unwrap();
        assert!(error.len() <= MAX_ERROR_BYTES && error.len() >= MAX_ERROR_BYTES - 1);
    }

    #[test]
    fn fingerprints_group_alike_errors() {
        let a = fingerprint(
            ErrorKind::Validation,
            "MEASUREMENT",
            "value 12.5 for device \"d-1\" is out of range",
        );
        let b = fingerprint(
            ErrorKind::Validation,
            "MEASUREMENT",
            "value 99 for device \"sensor 7\" is out of range",
        );
        let c = fingerprint(ErrorKind::Validation, "MEASUREMENT", "field `unit` must be a string");
        let d = fingerprint(
            ErrorKind::Validation,
            "DEVICE_UP",
            "value 99 for device \"x\" is out of range",
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        assert_eq!(mask_variable_parts("row 1f3a9 at 10:22"), "row # at #");
    }

    #[test]
    fn reads_any_integer_type_and_ignores_others() {
        let mut h = FieldTable::default();
        h.insert("iot-retry-count".into(), AMQPValue::ShortInt(3));
        assert_eq!(retry_count(Some(&h)), 3);
        h.insert("iot-retry-count".into(), AMQPValue::LongLongInt(-4));
        assert_eq!(retry_count(Some(&h)), 0);
        h.insert("iot-retry-count".into(), AMQPValue::LongString("7".into()));
        assert_eq!(retry_count(Some(&h)), 0);
        assert_eq!(retry_count(None), 0);
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            /// What `with_failure` writes, the readers read back; the error
            /// is cut to at most 1024 bytes on a character boundary.
            #[test]
            fn failure_headers_round_trip(
                kind in proptest::sample::select(ErrorKind::ALL.to_vec()),
                retries in any::<u32>(),
                now_ms in 0i64..=i64::MAX / 2,
                error in ".{0,1500}",
                handler in "[A-Z_]{1,20}",
                producer in "[ -~]{0,40}",
            ) {
                let mut original = FieldTable::default();
                put_str(&mut original, "x-producer", &producer);
                let properties = BasicProperties::default().with_headers(original);
                let record = FailureRecord {
                    kind, handler: &handler, error: &error, retry_count: retries, now_ms,
                    exchange: "amq.topic", routing_key: "iot.a", failed_by: "h/1",
                };
                let copy = with_failure(&properties, &record);
                let h = copy.headers().as_ref();
                prop_assert_eq!(retry_count(h), retries);
                prop_assert_eq!(read_i64(h, LAST_FAILURE_AT), Some(now_ms));
                prop_assert_eq!(read_i64(h, FIRST_FAILURE_AT), Some(now_ms));
                prop_assert_eq!(read_string(h, ERROR_KIND).and_then(|k| ErrorKind::parse(&k)), Some(kind));
                let written = read_string(h, ERROR).unwrap();
                prop_assert!(written.len() <= MAX_ERROR_BYTES && error.starts_with(&written));
                prop_assert_eq!(read_string(h, ERROR_FINGERPRINT), Some(fingerprint(kind, &handler, &error)));
                prop_assert_eq!(read_string(h, "x-producer"), Some(producer.clone()));
            }

            /// Readers never panic, whatever value type a header holds.
            #[test]
            fn readers_tolerate_any_value(n in any::<i64>(), text in ".{0,20}", flag in any::<bool>()) {
                for value in [
                    AMQPValue::LongLongInt(n),
                    AMQPValue::LongString(LongString::from(text.as_str())),
                    AMQPValue::Boolean(flag),
                    AMQPValue::Double(n as f64),
                    AMQPValue::Void,
                ] {
                    let mut h = FieldTable::default();
                    h.insert(RETRY_COUNT.into(), value);
                    let _ = retry_count(Some(&h));
                    let _ = read_string(Some(&h), RETRY_COUNT);
                }
            }
        }
    }
}
