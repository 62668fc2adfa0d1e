//! What the lot keeps of one parked delivery (docs/reliability.md, "The
//! parking lot"): its id, kind, error and fingerprint read from the `iot-*`
//! headers (or, for a message the broker dead-lettered itself, derived from
//! `x-first-death-reason`), the readable headers and properties, and the
//! properties exactly as AMQP encodes them, so a retry republishes the
//! message with the same properties and header types.
//!
//! Everything here comes from the network and is pure: it never fails and
//! never panics, whatever the headers hold.

use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use lapin::protocol::basic::{gen_properties, parse_properties};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Map, Value, json};

use crate::envelope::body_hash;
use crate::headers::{self, ERROR, ERROR_FINGERPRINT, ERROR_KIND, LAST_FAILURE_AT, REQUEUE_COUNT, RETRY_COUNT};

/// Longest envelope `id` taken as the message id (as the envelope allows).
const MAX_ENVELOPE_ID_CHARS: usize = 128;

/// One parking, ready to be stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Parking {
    /// The message id of docs/reliability.md, "The message id": the
    /// envelope's `id`, else the AMQP `message_id`, else the body's hash.
    pub message_id: String,
    pub message_type: Option<String>,
    pub error_kind: String,
    pub error: String,
    pub fingerprint: String,
    /// Every header, readable.
    pub headers: Value,
    /// Every property but the headers, readable.
    pub properties: Value,
    /// The properties, headers included, as AMQP encodes them.
    pub amqp_properties: Vec<u8>,
    pub body: Vec<u8>,
    /// `iot-requeue-count`: which parking of the message this is.
    pub requeue_count: i32,
    /// `iot-retry-count`: the attempts the worker made before parking it.
    pub retry_count: Option<i64>,
    /// When it failed (`iot-last-failure-at`, or the broker's `x-death`).
    pub failed_at: Option<DateTime<Utc>>,
}

impl Parking {
    /// Reads a delivery from `Q.dlq`. Never fails: a missing header
    /// becomes a derived or empty value.
    pub fn of(properties: &BasicProperties, body: &[u8]) -> Parking {
        let h = properties.headers().as_ref();
        let envelope = serde_json::from_slice::<Value>(body).ok();
        let field = |name: &str| envelope.as_ref()?.get(name)?.as_str().map(clean);
        let message_type = field("type");
        let death = headers::read_string(h, "x-first-death-reason");
        let error_kind = headers::read_string(h, ERROR_KIND)
            .unwrap_or_else(|| death.clone().unwrap_or_else(|| "unknown".to_owned()));
        let error = headers::read_string(h, ERROR).unwrap_or_else(|| broker_error(h, death.as_deref()));
        let fingerprint = headers::read_string(h, ERROR_FINGERPRINT)
            .unwrap_or_else(|| headers::fingerprint_of(&error_kind, message_type.as_deref(), &error));
        let envelope_id = field("id").filter(|id| (1..=MAX_ENVELOPE_ID_CHARS).contains(&id.chars().count()));
        let amqp_id = properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str())
            // U+FFFD marks bytes the client could not decode: two
            // different ids could read alike (docs/reliability.md, "The message id").
            .filter(|id| !id.is_empty() && !id.contains(char::REPLACEMENT_CHARACTER))
            .map(clean);
        let failed_ms = headers::read_i64(h, LAST_FAILURE_AT).or_else(|| death_time_ms(h));
        Parking {
            message_id: envelope_id.or(amqp_id).unwrap_or_else(|| body_hash(body)),
            message_type,
            error_kind: clean(&error_kind),
            error: clean(&error),
            fingerprint: clean(&fingerprint),
            headers: h.map_or_else(|| json!({}), table_json),
            properties: properties_json(properties),
            amqp_properties: encode_properties(properties),
            body: body.to_vec(),
            requeue_count: headers::read_i64(h, REQUEUE_COUNT)
                .map_or(0, |n| i32::try_from(n.max(0)).unwrap_or(i32::MAX)),
            retry_count: headers::read_i64(h, RETRY_COUNT),
            failed_at: failed_ms.and_then(DateTime::from_timestamp_millis),
        }
    }
}

/// The error of a message the broker dead-lettered itself: the reason and
/// the queue it left.
fn broker_error(h: Option<&FieldTable>, reason: Option<&str>) -> String {
    match (reason, headers::read_string(h, "x-first-death-queue")) {
        (Some(reason), Some(queue)) => format!("dead-lettered by the broker from queue '{queue}': {reason}"),
        (Some(reason), None) => format!("dead-lettered by the broker: {reason}"),
        (None, _) => "parked without a reason (no iot-error header)".to_owned(),
    }
}

/// Unix ms of the first `x-death` entry's `time` (seconds).
fn death_time_ms(h: Option<&FieldTable>) -> Option<i64> {
    let AMQPValue::FieldArray(deaths) = h?.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().last()? else {
        return None;
    };
    headers::read_i64(Some(first), "time").map(|seconds| seconds.saturating_mul(1000))
}

/// Text PostgreSQL can store: a NUL character (valid in AMQP and JSON,
/// refused in `text` and `jsonb`) becomes U+FFFD.
pub fn clean(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

/// The properties, headers included, as a content header carries them.
pub fn encode_properties(properties: &BasicProperties) -> Vec<u8> {
    // Writing into a Vec cannot run out of room; an error would leave the
    // bytes empty, which `decode_properties` reads as no properties.
    cookie_factory::gen_simple(gen_properties(properties), Vec::new()).unwrap_or_default()
}

/// The properties [`encode_properties`] wrote; `None` for bytes it did
/// not write.
pub fn decode_properties(bytes: &[u8]) -> Option<BasicProperties> {
    match parse_properties(bytes) {
        Ok(([], properties)) => Some(properties),
        _ => None,
    }
}

/// Every property but the headers, readable; absent ones are left out.
pub fn properties_json(p: &BasicProperties) -> Value {
    let mut out = Map::new();
    let short = |v: &Option<lapin::types::ShortString>| v.as_ref().map(|s| Value::from(clean(s.as_str())));
    let fields = [
        ("content_type", short(p.content_type())),
        ("content_encoding", short(p.content_encoding())),
        ("delivery_mode", (*p.delivery_mode()).map(Value::from)),
        ("priority", (*p.priority()).map(Value::from)),
        ("correlation_id", short(p.correlation_id())),
        ("reply_to", short(p.reply_to())),
        ("expiration", short(p.expiration())),
        ("message_id", short(p.message_id())),
        ("timestamp", (*p.timestamp()).map(Value::from)),
        ("type", short(p.kind())),
        ("user_id", short(p.user_id())),
        ("app_id", short(p.app_id())),
        ("cluster_id", short(p.cluster_id())),
    ];
    for (name, value) in fields {
        if let Some(value) = value {
            out.insert(name.to_owned(), value);
        }
    }
    Value::Object(out)
}

/// A header table, readable: strings as strings, numbers as numbers,
/// tables as objects, arrays as arrays, byte arrays as hex, void as null.
pub fn table_json(table: &FieldTable) -> Value {
    let map = table
        .inner()
        .iter()
        .map(|(key, value)| (clean(key.as_str()), value_json(value)))
        .collect();
    Value::Object(map)
}

fn value_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => Value::from(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Timestamp(n) => Value::from(*n),
        // Not finite: no JSON number; said in words.
        AMQPValue::Float(x) => {
            serde_json::Number::from_f64(f64::from(*x)).map_or_else(|| Value::from(x.to_string()), Value::Number)
        }
        AMQPValue::Double(x) => {
            serde_json::Number::from_f64(*x).map_or_else(|| Value::from(x.to_string()), Value::Number)
        }
        AMQPValue::DecimalValue(d) => json!({"decimal": d.value, "scale": d.scale}),
        AMQPValue::ShortString(s) => Value::from(clean(s.as_str())),
        AMQPValue::LongString(s) => Value::from(clean(&String::from_utf8_lossy(s.as_bytes()))),
        AMQPValue::ByteArray(b) => Value::from(hex::encode(b.as_slice())),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_json).collect()),
        AMQPValue::FieldTable(t) => table_json(t),
        AMQPValue::Void => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use lapin::types::{ByteArray, DecimalValue, FieldArray, LongString, ShortString};

    use super::*;
    use crate::failure::ErrorKind;
    use crate::headers::FailureRecord;

    /// A header of every AMQP field type, nested too. (Not `ShortString`:
    /// AMQP tables cannot carry it, the client never reads one.)
    fn every_type() -> FieldTable {
        let mut t = FieldTable::default();
        let mut put = |k: &str, v: AMQPValue| {
            t.insert(ShortString::from(k), v);
        };
        put("bool", AMQPValue::Boolean(true));
        put("i8", AMQPValue::ShortShortInt(-8));
        put("u8", AMQPValue::ShortShortUInt(8));
        put("i16", AMQPValue::ShortInt(-16));
        put("u16", AMQPValue::ShortUInt(16));
        put("i32", AMQPValue::LongInt(-32));
        put("u32", AMQPValue::LongUInt(32));
        put("i64", AMQPValue::LongLongInt(-64));
        put("f32", AMQPValue::Float(1.5));
        put("f64", AMQPValue::Double(2.25));
        put("dec", AMQPValue::DecimalValue(DecimalValue { scale: 2, value: 1234 }));
        put("long", AMQPValue::LongString(LongString::from("l")));
        put("bytes", AMQPValue::ByteArray(ByteArray::from(vec![0u8, 255])));
        put("time", AMQPValue::Timestamp(1_790_000_000));
        put("void", AMQPValue::Void);
        let mut inner = FieldTable::default();
        inner.insert(ShortString::from("n"), AMQPValue::LongInt(1));
        let array = FieldArray::from(vec![AMQPValue::FieldTable(inner.clone()), AMQPValue::Boolean(false)]);
        put("array", AMQPValue::FieldArray(array));
        put("table", AMQPValue::FieldTable(inner));
        t
    }

    fn full_properties() -> BasicProperties {
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("identity".into())
            .with_headers(every_type())
            .with_delivery_mode(2)
            .with_priority(3)
            .with_correlation_id("c".into())
            .with_reply_to("r".into())
            .with_message_id("amqp-id".into())
            .with_timestamp(1_790_000_000)
            .with_type("t".into())
            .with_app_id("a".into())
            .with_cluster_id("k".into())
    }

    #[test]
    fn properties_and_header_types_survive_encoding() {
        let properties = full_properties();
        let bytes = encode_properties(&properties);
        assert_eq!(decode_properties(&bytes), Some(properties));
        assert_eq!(
            decode_properties(&encode_properties(&BasicProperties::default())),
            Some(BasicProperties::default())
        );
        assert_eq!(decode_properties(b"\xff"), None);
        assert_eq!(
            decode_properties(&[bytes.as_slice(), b"x"].concat()),
            None,
            "trailing bytes"
        );
    }

    #[test]
    fn headers_and_properties_read_as_json() {
        let p = full_properties();
        let h = table_json(p.headers().as_ref().unwrap());
        assert_eq!(h["bool"], true);
        assert_eq!(h["i64"], -64);
        assert_eq!(h["f64"], 2.25);
        assert_eq!(h["dec"], json!({"decimal": 1234, "scale": 2}));
        assert_eq!(h["bytes"], "00ff");
        assert_eq!(h["void"], Value::Null);
        assert_eq!(h["array"], json!([{"n": 1}, false]));
        let props = properties_json(&p);
        assert_eq!(props["delivery_mode"], 2);
        assert_eq!(props["type"], "t");
        assert!(props.get("headers").is_none() && props.get("user_id").is_none());
    }

    #[test]
    fn a_worker_parking_is_read_from_its_headers() {
        let record = FailureRecord {
            kind: ErrorKind::Validation,
            message_type: Some("MEASUREMENT"),
            error: "data.value must be a number",
            retry_count: 0,
            now_ms: 1_790_000_000_000,
            received_ms: 1_790_000_000_000,
            exchange: "",
            routing_key: "q",
            failed_by: "h/1",
        };
        let properties = headers::with_failure(&BasicProperties::default().with_message_id("amqp".into()), &record);
        let body = br#"{"type":"MEASUREMENT","id":"m-1","data":{}}"#;
        let p = Parking::of(&properties, body);
        assert_eq!(p.message_id, "m-1", "the envelope id comes first");
        assert_eq!(p.message_type.as_deref(), Some("MEASUREMENT"));
        assert_eq!(
            (p.error_kind.as_str(), p.error.as_str()),
            ("validation", "data.value must be a number")
        );
        assert_eq!(
            p.fingerprint,
            headers::fingerprint(
                ErrorKind::Validation,
                Some("MEASUREMENT"),
                "data.value must be a number"
            )
        );
        assert_eq!(p.requeue_count, 0);
        assert_eq!(p.retry_count, Some(0));
        assert_eq!(p.failed_at.map(|t| t.timestamp_millis()), Some(1_790_000_000_000));
        assert_eq!(p.headers["iot-error-kind"], "validation");
        assert_eq!(p.body, body);
        assert_eq!(Parking::of(&properties, b"not json").message_id, "amqp");
        assert_eq!(
            Parking::of(&BasicProperties::default(), b"not json").message_id,
            body_hash(b"not json")
        );
    }

    #[test]
    fn a_broker_dead_lettering_gets_its_kind_from_the_death_reason() {
        let mut h = FieldTable::default();
        headers::put_str(&mut h, "x-first-death-reason", "expired");
        headers::put_str(&mut h, "x-first-death-queue", "q");
        headers::put_long(&mut h, REQUEUE_COUNT, 2);
        let p = Parking::of(&BasicProperties::default().with_headers(h), b"{\"type\":\"DEVICE_UP\"}");
        assert_eq!(p.error_kind, "expired");
        assert_eq!(p.error, "dead-lettered by the broker from queue 'q': expired");
        assert_eq!(
            p.fingerprint,
            headers::fingerprint_of("expired", Some("DEVICE_UP"), &p.error)
        );
        assert_eq!(p.requeue_count, 2);
        let bare = Parking::of(&BasicProperties::default(), b"");
        assert_eq!(bare.error_kind, "unknown");
    }

    #[test]
    fn nul_characters_become_replacement_characters() {
        let mut h = FieldTable::default();
        headers::put_str(&mut h, ERROR, "bad\0byte");
        let p = Parking::of(
            &BasicProperties::default()
                .with_headers(h)
                .with_message_id("id\0".into()),
            b"x",
        );
        assert_eq!(p.error, "bad\u{FFFD}byte");
        assert_eq!(p.message_id, "id\u{FFFD}");
        assert_eq!(p.headers["iot-error"], "bad\u{FFFD}byte");
    }
}
