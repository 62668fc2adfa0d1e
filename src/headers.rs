//! The `iot-*` headers the worker writes on every message it republishes
//! (docs/reliability.md, "Copies and their headers"), and the readers for
//! them. Header tables come from the network: every reader tolerates any
//! value type and never panics.

use chrono::{DateTime, Utc};
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
/// A producer's `expiration`, moved out of the properties of a copy.
pub const ORIGINAL_EXPIRATION: &str = "iot-original-expiration";
/// Unix ms when the worker first received the message: the time of an
/// envelope without `time`, the same on every attempt (docs/reliability.md,
/// "The message time").
pub const FIRST_RECEIVED_AT: &str = "iot-first-received-at";

/// Room kept in a content header frame for the properties other than the
/// headers table and for the frame's own fields.
const FRAME_RESERVE_BYTES: usize = 4096;

/// Longest `iot-error`, in bytes.
pub const MAX_ERROR_BYTES: usize = 1024;

/// One failure, as it is recorded on the republished copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureRecord<'a> {
    pub kind: ErrorKind,
    /// The message type whose handler failed, when it is known.
    pub message_type: Option<&'a str>,
    pub error: &'a str,
    /// `iot-retry-count` to write.
    pub retry_count: u32,
    pub now_ms: i64,
    /// Unix ms of this attempt's receipt; kept as `iot-first-received-at`
    /// when the message has none yet.
    pub received_ms: i64,
    /// Where the delivery came from, used when it has no `iot-original-*` yet.
    pub exchange: &'a str,
    pub routing_key: &'a str,
    /// `host/version`.
    pub failed_by: &'a str,
}

/// The properties of the republished copy: the original's properties and
/// headers, made safe by [`safe_copy`], plus the `iot-*` failure headers.
/// What the copy had to change is said at the end of `iot-error`.
pub fn with_failure(properties: &BasicProperties, record: &FailureRecord<'_>) -> BasicProperties {
    let (properties, changes) = safe_copy(properties);
    let mut headers = properties.headers().clone().unwrap_or_default();
    let first_failure = read_i64(Some(&headers), FIRST_FAILURE_AT).unwrap_or(record.now_ms);
    if read_i64(Some(&headers), FIRST_RECEIVED_AT).is_none() {
        put_long(&mut headers, FIRST_RECEIVED_AT, record.received_ms);
    }
    if read_string(Some(&headers), ORIGINAL_EXCHANGE).is_none() {
        put_str(&mut headers, ORIGINAL_EXCHANGE, record.exchange);
        put_str(&mut headers, ORIGINAL_ROUTING_KEY, record.routing_key);
    }
    put_long(&mut headers, RETRY_COUNT, i64::from(record.retry_count));
    put_long(&mut headers, FIRST_FAILURE_AT, first_failure);
    put_long(&mut headers, LAST_FAILURE_AT, record.now_ms);
    put_str(&mut headers, ERROR_KIND, record.kind.as_str());
    put_str(&mut headers, ERROR, &with_changes(record.error, &changes));
    put_str(
        &mut headers,
        ERROR_FINGERPRINT,
        &fingerprint(record.kind, record.message_type, record.error),
    );
    put_str(&mut headers, FAILED_BY, record.failed_by);
    properties.with_headers(headers)
}

/// `error`, then what the copy changed, within [`MAX_ERROR_BYTES`]: the
/// changes are kept whole and the error is cut to make room.
fn with_changes(error: &str, changes: &[String]) -> String {
    // Header values are limited in bytes, so cut on the last character
    // boundary within the budget.
    let cut = |text: &str, max: usize| text[..text.floor_char_boundary(max)].to_owned();
    if changes.is_empty() {
        return cut(error, MAX_ERROR_BYTES);
    }
    let note = cut(&format!(" [copy changed: {}]", changes.join("; ")), MAX_ERROR_BYTES / 2);
    format!("{}{note}", cut(error, MAX_ERROR_BYTES - note.len()))
}

/// Makes a copy the worker republishes (retry, DLQ, requeue) at least as
/// safe as the queue it goes to and always publishable by the worker's own
/// broker user (docs/reliability.md, "Copies and their headers"):
///
/// * persistent (`delivery_mode` 2), whatever the producer set;
/// * no per-message `expiration`: it is kept in `iot-original-expiration`
///   (a parked copy must never expire out of the DLQ);
/// * no `user_id`: the broker refuses a publish whose `user_id` names
///   another user, which would loop the session.
///
/// Returns the properties and what was removed, for `iot-error` (the
/// routine persistence and expiration changes are not listed).
pub fn safe_copy(properties: &BasicProperties) -> (BasicProperties, Vec<String>) {
    let mut headers = properties.headers().clone();
    if let Some(expiration) = properties.expiration() {
        put_str(
            headers.get_or_insert_with(FieldTable::default),
            ORIGINAL_EXPIRATION,
            expiration.as_str(),
        );
    }
    let mut changes = Vec::new();
    if let Some(user) = properties.user_id() {
        changes.push(format!("user_id {:?} removed", user.as_str()));
    }
    // AMQPProperties cannot unset a field: copy every other one.
    let mut copy = BasicProperties::default().with_delivery_mode(2);
    let p = properties;
    let short = |value: &Option<ShortString>| value.clone();
    if let Some(v) = short(p.content_type()) {
        copy = copy.with_content_type(v);
    }
    if let Some(v) = short(p.content_encoding()) {
        copy = copy.with_content_encoding(v);
    }
    if let Some(v) = headers {
        copy = copy.with_headers(v);
    }
    if let Some(v) = *p.priority() {
        copy = copy.with_priority(v);
    }
    if let Some(v) = short(p.correlation_id()) {
        copy = copy.with_correlation_id(v);
    }
    if let Some(v) = short(p.reply_to()) {
        copy = copy.with_reply_to(v);
    }
    if let Some(v) = short(p.message_id()) {
        copy = copy.with_message_id(v);
    }
    if let Some(v) = *p.timestamp() {
        copy = copy.with_timestamp(v);
    }
    if let Some(v) = short(p.kind()) {
        copy = copy.with_type(v);
    }
    if let Some(v) = short(p.app_id()) {
        copy = copy.with_app_id(v);
    }
    if let Some(v) = short(p.cluster_id()) {
        copy = copy.with_cluster_id(v);
    }
    (copy, changes)
}

/// [`safe_copy`], with what it removed added to `iot-error`: for copies
/// that keep their failure headers (`requeue`).
pub fn safe_copy_noted(properties: &BasicProperties) -> BasicProperties {
    let (copy, changes) = safe_copy(properties);
    if changes.is_empty() {
        return copy;
    }
    let mut headers = copy.headers().clone().unwrap_or_default();
    let error = read_string(Some(&headers), ERROR).unwrap_or_default();
    put_str(&mut headers, ERROR, &with_changes(&error, &changes));
    copy.with_headers(headers)
}

/// Cuts a copy's headers to fit a content header frame of `frame_max`
/// bytes: lapin does not check, and an oversized frame kills the
/// connection. The producer's largest headers go first; `iot-*` and trace
/// context stay. What was removed is added to `iot-error`.
pub fn fit_frame(properties: BasicProperties, frame_max: usize) -> BasicProperties {
    let budget = frame_max.saturating_sub(FRAME_RESERVE_BYTES);
    let Some(table) = properties.headers().as_ref().filter(|t| table_size(t) > budget) else {
        return properties;
    };
    let mut entries = table.inner().clone();
    let mut size = table_size(table);
    let mut removed = Vec::new();
    while size > budget {
        let largest = entries
            .iter()
            .filter(|(key, _)| {
                let key = key.as_str();
                !key.starts_with("iot-") && !matches!(key, "traceparent" | "tracestate")
            })
            .map(|(key, value)| (1 + key.as_str().len() + value_size(value), key.clone()))
            .max();
        let Some((entry_size, key)) = largest else { break };
        entries.remove(&key);
        size -= entry_size;
        removed.push(format!(
            "header {:?} ({entry_size} bytes) removed to fit the frame size",
            key.as_str()
        ));
    }
    let mut headers = FieldTable::from(entries);
    let error = read_string(Some(&headers), ERROR).unwrap_or_default();
    put_str(&mut headers, ERROR, &with_changes(&error, &removed));
    properties.with_headers(headers)
}

/// Encoded size of a field table, as AMQP 0-9-1 writes it.
fn table_size(table: &FieldTable) -> usize {
    4 + table
        .inner()
        .iter()
        .map(|(key, value)| 1 + key.as_str().len() + value_size(value))
        .sum::<usize>()
}

/// Encoded size of one field value, with its type byte.
fn value_size(value: &AMQPValue) -> usize {
    1 + match value {
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ByteArray(b) => 4 + b.as_slice().len(),
        AMQPValue::FieldArray(a) => 4 + a.as_slice().iter().map(value_size).sum::<usize>(),
        AMQPValue::FieldTable(t) => table_size(t),
        AMQPValue::Void => 0,
    }
}

/// When the message was first received (docs/reliability.md, "The message
/// time"): the producer's AMQP `timestamp` (seconds), else
/// `iot-first-received-at` carried on an earlier copy; `None` for a message
/// seen for the first time without a timestamp.
pub fn first_received(properties: &BasicProperties) -> Option<DateTime<Utc>> {
    match properties.timestamp() {
        Some(seconds) => DateTime::from_timestamp(i64::try_from(*seconds).ok()?, 0),
        None => DateTime::from_timestamp_millis(read_i64(properties.headers().as_ref(), FIRST_RECEIVED_AT)?),
    }
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

/// A stable 16-hex-digit hash of kind, message type (`-` when unknown) and
/// the error with its variable parts masked, so alike failures share one
/// fingerprint.
pub fn fingerprint(kind: ErrorKind, message_type: Option<&str>, error: &str) -> String {
    fingerprint_of(kind.as_str(), message_type, error)
}

/// [`fingerprint`] of a kind given by name: also the kinds the broker
/// gives a message it dead-lettered itself (`expired`, `delivery_limit`, …).
pub fn fingerprint_of(kind: &str, message_type: Option<&str>, error: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(kind.as_bytes());
    hasher.update([0]);
    hasher.update(message_type.unwrap_or("-").as_bytes());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(error: &str) -> FailureRecord<'_> {
        FailureRecord {
            kind: ErrorKind::Transient,
            message_type: Some("MEASUREMENT"),
            error,
            retry_count: 2,
            now_ms: 1_000,
            received_ms: 900,
            exchange: "amq.topic",
            routing_key: "iot.x",
            failed_by: "host/0.1.0",
        }
    }

    #[test]
    fn copies_are_persistent_never_expire_and_carry_no_user_id() {
        let original = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_correlation_id("c-1".into())
            .with_expiration("3000".into())
            .with_user_id("someone-else".into())
            .with_priority(3);
        let copy = with_failure(&original, &record("boom"));
        assert_eq!(copy.delivery_mode(), &Some(2));
        assert_eq!(copy.expiration(), &None);
        assert_eq!(copy.user_id(), &None);
        assert_eq!(copy.priority(), &Some(3));
        assert_eq!(copy.correlation_id().as_ref().map(|s| s.as_str()), Some("c-1"));
        let h = copy.headers().as_ref();
        assert_eq!(read_string(h, ORIGINAL_EXPIRATION).as_deref(), Some("3000"));
        assert_eq!(read_i64(h, FIRST_RECEIVED_AT), Some(900));
        let error = read_string(h, ERROR).unwrap();
        assert_eq!(error, "boom [copy changed: user_id \"someone-else\" removed]");
        // The note does not split a group of alike failures.
        assert_eq!(
            read_string(h, ERROR_FINGERPRINT),
            Some(fingerprint(ErrorKind::Transient, Some("MEASUREMENT"), "boom"))
        );
        // A safe message is copied unchanged.
        let safe = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id("m".into());
        assert_eq!(safe_copy(&safe), (safe.clone(), Vec::new()));
    }

    #[test]
    fn a_long_error_keeps_room_for_the_changes() {
        let long = "e".repeat(5000);
        let copy = with_failure(&BasicProperties::default().with_user_id("u".into()), &record(&long));
        let error = read_string(copy.headers().as_ref(), ERROR).unwrap();
        assert!(error.len() <= MAX_ERROR_BYTES, "{}", error.len());
        assert!(error.starts_with("eee") && error.ends_with("[copy changed: user_id \"u\" removed]"));
    }

    #[test]
    fn headers_too_large_for_the_frame_are_cut_largest_first() {
        let mut headers = FieldTable::default();
        put_str(&mut headers, "big", &"x".repeat(130_000));
        put_str(&mut headers, "small", "kept");
        put_str(
            &mut headers,
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
        let original = BasicProperties::default().with_headers(headers);
        let copy = fit_frame(with_failure(&original, &record("boom")), 131_072);
        let h = copy.headers().as_ref().unwrap();
        assert!(table_size(h) <= 131_072 - FRAME_RESERVE_BYTES);
        assert!(read_string(Some(h), "big").is_none());
        assert_eq!(read_string(Some(h), "small").as_deref(), Some("kept"));
        assert!(read_string(Some(h), "traceparent").is_some());
        assert_eq!(read_string(Some(h), ERROR_KIND).as_deref(), Some("transient"));
        let error = read_string(Some(h), ERROR).unwrap();
        assert!(error.starts_with("boom [copy changed: header \"big\" ("), "{error}");
        // Headers that fit are left alone.
        let fits = with_failure(&BasicProperties::default(), &record("boom"));
        assert_eq!(fit_frame(fits.clone(), 131_072), fits);
    }

    #[test]
    fn first_receipt_is_the_timestamp_else_the_carried_header() {
        let stamped = BasicProperties::default().with_timestamp(1_700_000_000);
        assert_eq!(
            first_received(&stamped).map(|t| t.timestamp_millis()),
            Some(1_700_000_000_000)
        );
        let mut h = FieldTable::default();
        put_long(&mut h, FIRST_RECEIVED_AT, 1_700_000_000_123);
        let carried = BasicProperties::default().with_headers(h);
        assert_eq!(
            first_received(&carried).map(|t| t.timestamp_millis()),
            Some(1_700_000_000_123)
        );
        assert_eq!(first_received(&BasicProperties::default()), None);
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
            Some("MEASUREMENT"),
            "value 12.5 for device \"d-1\" is out of range",
        );
        let b = fingerprint(
            ErrorKind::Validation,
            Some("MEASUREMENT"),
            "value 99 for device \"sensor 7\" is out of range",
        );
        let c = fingerprint(
            ErrorKind::Validation,
            Some("MEASUREMENT"),
            "field `unit` must be a string",
        );
        let d = fingerprint(
            ErrorKind::Validation,
            Some("DEVICE_UP"),
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
                    kind, message_type: Some(&handler), error: &error, retry_count: retries, now_ms, received_ms: now_ms,
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
                prop_assert_eq!(read_string(h, ERROR_FINGERPRINT), Some(fingerprint(kind, Some(&handler), &error)));
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
