//! The message envelope (docs/reliability.md, "The envelope"): bytes in, a
//! typed [`Message`] or a typed [`DecodeError`] out.
//!
//! This is the worker's attack surface: every byte a device or service sends
//! passes through [`decode`]. It never panics, reads at most
//! `max_bytes` of input (so allocation is bounded by the body size), and
//! relies on `serde_json`'s recursion limit (128) against deep nesting.

use std::fmt;

use chrono::{DateTime, Datelike, NaiveDateTime, SecondsFormat, Utc};
use serde::de;
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Longest `id`, `actor`, `target` and AMQP `message_id`, in characters.
pub const MAX_FIELD_CHARS: usize = 128;
/// Longest message type name: `[A-Z][A-Z0-9_]{0,63}`.
pub const MAX_TYPE_CHARS: usize = 64;

/// Whether a message reports something that happened or asks for an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Event,
    Command,
}

impl Kind {
    /// The envelope spelling: `event` or `command`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Event => "event",
            Kind::Command => "command",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the message id came from (docs/reliability.md, "The message id":
/// `id`, else AMQP `message_id`, else SHA-256 of the body; a raw device
/// message's id comes from [`crate::device_route::identify`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdSource {
    Envelope,
    AmqpProperty,
    BodyHash,
    /// A raw device message: the hash of routing key, body and the
    /// broker's arrival stamp (docs/devices.md, "Guarantees").
    ArrivalStamp,
    /// A raw device message without an arrival stamp: minted at first
    /// receipt and carried on its copies.
    Minted,
}

/// A message's `type` as the delivery flow carries it: the handler table's
/// own name for a type it has (a `&'static str`, free to copy), or the text
/// of a type it does not know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageType {
    Handled(&'static str),
    Unknown(std::sync::Arc<str>),
}

impl MessageType {
    pub fn as_str(&self) -> &str {
        match self {
            MessageType::Handled(name) => name,
            MessageType::Unknown(name) => name,
        }
    }

    /// The `type` label of a metric: a type without a handler is `unknown`,
    /// so a sender cannot grow the label set.
    pub fn label(&self) -> &'static str {
        match self {
            MessageType::Handled(name) => name,
            MessageType::Unknown(_) => "unknown",
        }
    }
}

impl std::fmt::Display for MessageType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A decoded, envelope-valid message. Its `data` is not yet validated: that
/// is the handler's job.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The idempotency key.
    pub id: String,
    pub id_source: IdSource,
    pub kind: Kind,
    pub message_type: String,
    pub actor: Option<String>,
    pub target: Option<String>,
    /// When it happened; the receive time when the envelope had none.
    pub time: DateTime<Utc>,
    pub data: Value,
}

impl Message {
    /// Encodes the message as an envelope that [`decode`] turns back into an
    /// equal message (with the id written out, so its source becomes
    /// `Envelope`).
    pub fn to_json(&self) -> Vec<u8> {
        let mut object = serde_json::Map::new();
        object.insert("type".into(), self.message_type.clone().into());
        object.insert("kind".into(), self.kind.as_str().into());
        object.insert("id".into(), self.id.clone().into());
        if let Some(actor) = &self.actor {
            object.insert("actor".into(), actor.clone().into());
        }
        if let Some(target) = &self.target {
            object.insert("target".into(), target.clone().into());
        }
        object.insert("time".into(), format_time(self.time).into());
        object.insert("data".into(), self.data.clone());
        // Serialising a `Value` map cannot fail: all keys are strings.
        serde_json::to_vec(&Value::Object(object)).unwrap_or_default()
    }
}

/// Why a body is not a valid envelope. Always permanent: the same bytes
/// will fail the same way on every attempt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("body is {size} bytes, more than MAX_MESSAGE_BYTES ({max})")]
    TooLarge { size: usize, max: usize },
    #[error("body is empty")]
    Empty,
    #[error("body is not valid JSON: {0}")]
    Json(String),
    #[error("body must be a JSON object, found {0}")]
    NotAnObject(&'static str),
    #[error("field `{0}` appears more than once")]
    DuplicateField(&'static str),
    #[error("field `{0}` is required")]
    Missing(&'static str),
    #[error("field `{field}` {problem}")]
    Invalid { field: &'static str, problem: String },
    #[error(
        "the AMQP message_id property is not valid UTF-8 (shown with U+FFFD for the bad bytes) and the body has no `id`: \
         it cannot identify the message"
    )]
    UnreadableMessageId,
}

/// Decodes one message body.
///
/// `amqp_message_id` is the delivery's `message_id` property, the second
/// choice for the message id; `received_at` stands in for a missing `time`.
///
/// # Errors
/// A [`DecodeError`] naming the first rule the body breaks.
pub fn decode(
    body: &[u8],
    amqp_message_id: Option<&str>,
    received_at: DateTime<Utc>,
    max_bytes: usize,
) -> Result<Message, DecodeError> {
    if body.len() > max_bytes {
        return Err(DecodeError::TooLarge {
            size: body.len(),
            max: max_bytes,
        });
    }
    // A UTF-8 byte-order mark is tolerated: some producers write one.
    let json = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    if json.iter().all(u8::is_ascii_whitespace) {
        return Err(DecodeError::Empty);
    }
    let raw = parse_fields(json)?;

    let message_type = string_field("type", raw.message_type)?.ok_or(DecodeError::Missing("type"))?;
    check_type_name(&message_type).map_err(|problem| DecodeError::Invalid { field: "type", problem })?;
    let kind = match string_field("kind", raw.kind)?.as_deref() {
        None | Some("event") => Kind::Event,
        Some("command") => Kind::Command,
        Some(other) => {
            return Err(DecodeError::Invalid {
                field: "kind",
                problem: format!("must be \"event\" or \"command\", found {other:?}"),
            });
        }
    };
    let id = bounded_string_field("id", raw.id, 1)?;
    let actor = bounded_string_field("actor", raw.actor, 0)?;
    let target = bounded_string_field("target", raw.target, 0)?;
    let time = match string_field("time", raw.time)? {
        None => received_at,
        Some(text) => parse_time(&text).map_err(|problem| DecodeError::Invalid { field: "time", problem })?,
    };
    let data = raw.data.ok_or(DecodeError::Missing("data"))?;

    let (id, id_source) = choose_id(id, amqp_message_id, body)?;
    Ok(Message {
        id,
        id_source,
        kind,
        message_type,
        actor,
        target,
        time,
        data,
    })
}

/// The message id and where it came from: the envelope's `id`, else the
/// AMQP `message_id`, else the body's hash.
fn choose_id(
    id: Option<String>,
    amqp_message_id: Option<&str>,
    body: &[u8],
) -> Result<(String, IdSource), DecodeError> {
    match (id, amqp_message_id) {
        (Some(id), _) => Ok((id, IdSource::Envelope)),
        // The client decodes bad bytes as U+FFFD (vendor/amq-protocol-types):
        // two different ids could read alike, so this one cannot deduplicate.
        (None, Some(amqp)) if amqp.contains(char::REPLACEMENT_CHARACTER) => Err(DecodeError::UnreadableMessageId),
        (None, Some(amqp)) if valid_amqp_id(amqp) => Ok((amqp.to_owned(), IdSource::AmqpProperty)),
        (None, _) => Ok((body_hash(body), IdSource::BodyHash)),
    }
}

/// The lowercase hex SHA-256 of a body: the id of last resort.
pub fn body_hash(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// Parses an RFC 3339 / ISO-8601 time; one without an offset is UTC.
///
/// # Errors
/// A sentence saying what forms are accepted.
pub fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    let parsed = DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
                .iter()
                .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
                .map(|naive| naive.and_utc())
        });
    // Years outside 0001-9999 (in UTC) have no RFC 3339 form: refusing them
    // keeps every accepted time printable and parsable again.
    match parsed {
        Some(time) if (1..=9999).contains(&time.year()) => Ok(time),
        _ => Err(format!(
            "must be an RFC 3339 / ISO-8601 time from year 0001 to 9999, such as 2026-01-31T12:00:00Z \
             (no offset means UTC), found {:?}",
            truncate_chars(text, 64)
        )),
    }
}

/// Formats a time the way [`Message::to_json`] writes it (RFC 3339, UTC,
/// nanoseconds kept so a round trip is exact).
pub fn format_time(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// Checks a type name against `[A-Z][A-Z0-9_]{0,63}`.
///
/// # Errors
/// A sentence saying what is allowed.
pub fn check_type_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_uppercase());
    let rest_ok = chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    if first_ok && rest_ok && name.len() <= MAX_TYPE_CHARS {
        Ok(())
    } else {
        Err(format!(
            "must match [A-Z][A-Z0-9_]{{0,63}}, found {:?}",
            truncate_chars(name, 80)
        ))
    }
}

/// Any `message_id` the property can hold (1–255 bytes) is used whole:
/// cutting or ignoring a long one would merge different messages.
fn valid_amqp_id(id: &str) -> bool {
    (1..=255).contains(&id.len())
}

fn check_length(field: &'static str, value: &str, min: usize) -> Result<(), DecodeError> {
    let chars = value.chars().count();
    if (min..=MAX_FIELD_CHARS).contains(&chars) {
        Ok(())
    } else {
        Err(DecodeError::Invalid {
            field,
            problem: format!("must be {min} to {MAX_FIELD_CHARS} characters, found {chars}"),
        })
    }
}

/// [`string_field`] of `min` to [`MAX_FIELD_CHARS`] characters.
fn bounded_string_field(field: &'static str, value: Option<Value>, min: usize) -> Result<Option<String>, DecodeError> {
    let text = string_field(field, value)?;
    if let Some(text) = &text {
        check_length(field, text, min)?;
    }
    Ok(text)
}

/// A present field must be a string; `null` counts as absent.
fn string_field(field: &'static str, value: Option<Value>) -> Result<Option<String>, DecodeError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(DecodeError::Invalid {
            field,
            problem: format!("must be a string, found {}", json_type(&other)),
        }),
    }
}

fn json_error(json: &[u8], e: serde_json::Error) -> DecodeError {
    // Tell "not an object" apart from broken JSON for a clearer reason.
    match json.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') if e.is_data() => DecodeError::NotAnObject("an array"),
        Some(b'"') if e.is_data() => DecodeError::NotAnObject("a string"),
        Some(b'0'..=b'9' | b'-') if e.is_data() => DecodeError::NotAnObject("a number"),
        Some(b't' | b'f') if e.is_data() => DecodeError::NotAnObject("a boolean"),
        Some(b'n') if e.is_data() => DecodeError::NotAnObject("null"),
        _ => DecodeError::Json(e.to_string()),
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Cuts `text` to at most `max` characters (never inside a character).
pub fn truncate_chars(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

/// The known top-level fields of an envelope. Unknown fields are skipped.
/// Every field is kept as a JSON value so that [`decode`], not serde, says
/// what is wrong with it.
#[derive(Deserialize)]
struct RawFields {
    #[serde(rename = "type")]
    message_type: Option<Value>,
    kind: Option<Value>,
    id: Option<Value>,
    actor: Option<Value>,
    target: Option<Value>,
    time: Option<Value>,
    /// `data: null` is data (an empty reading), not a missing field.
    #[serde(default, deserialize_with = "present")]
    data: Option<Value>,
}

/// The names [`RawFields`] reads, as they appear in a body.
const FIELDS: [&str; 7] = ["type", "kind", "id", "actor", "target", "time", "data"];

fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

/// Reads the known fields of an envelope, which must be a JSON object. A
/// known field given twice is refused, so two parsers can never disagree
/// on which `type` or `id` a body carries.
fn parse_fields(json: &[u8]) -> Result<RawFields, DecodeError> {
    // A derived struct also reads an array, field by field: ask for a map,
    // which fails for anything but an object, to say what the body is.
    if json.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(match serde_json::from_slice::<serde_json::Map<String, Value>>(json) {
            Err(e) => json_error(json, e),
            Ok(_) => DecodeError::NotAnObject("something else"), // not reached: checked above
        });
    }
    serde_json::from_slice::<RawFields>(json).map_err(|e| match duplicate_field(&e) {
        // Broken JSON after the repeated field is reported as broken JSON,
        // as if the whole body had been read first. (Not nesting too deep
        // for serde_json in a known field after the repeat: that is
        // reported as the repeat. Both park the message as `decode`.)
        Some(field) => match serde_json::from_slice::<de::IgnoredAny>(json) {
            Ok(_) => DecodeError::DuplicateField(field),
            Err(e) => json_error(json, e),
        },
        None => json_error(json, e),
    })
}

/// The field serde refused as given twice (`de::Error::duplicate_field`,
/// whose wording serde fixes), if that is the error.
fn duplicate_field(e: &serde_json::Error) -> Option<&'static str> {
    let text = e.to_string();
    let name = text.strip_prefix("duplicate field `")?.split('`').next()?;
    FIELDS.into_iter().find(|field| *field == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const MAX: usize = 262_144;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap()
    }

    fn dec(body: &str) -> Result<Message, DecodeError> {
        decode(body.as_bytes(), None, now(), MAX)
    }

    fn problem_field(body: &str) -> &'static str {
        match dec(body) {
            Err(DecodeError::Invalid { field, .. }) => field,
            other => panic!("expected an invalid field, got {other:?}"),
        }
    }

    #[test]
    fn decodes_a_full_envelope() {
        let m = dec(
            r#"{"type":"SET_LED","kind":"command","id":"m1","actor":"svc","target":"d1",
                "time":"2026-05-01T10:00:00+02:00","data":{"device_id":"d1","state":"on"},"extra":[1]}"#,
        )
        .unwrap();
        assert_eq!(m.id, "m1");
        assert_eq!(m.id_source, IdSource::Envelope);
        assert_eq!(m.kind, Kind::Command);
        assert_eq!(m.message_type, "SET_LED");
        assert_eq!(m.actor.as_deref(), Some("svc"));
        assert_eq!(m.target.as_deref(), Some("d1"));
        assert_eq!(m.time, Utc.with_ymd_and_hms(2026, 5, 1, 8, 0, 0).unwrap());
        assert_eq!(m.data["state"], "on");
    }

    #[test]
    fn defaults_kind_to_event_and_time_to_receive_time() {
        let m = dec(r#"{"type":"DEVICE_UP","data":null}"#).unwrap();
        assert_eq!(m.kind, Kind::Event);
        assert_eq!(m.time, now());
        assert_eq!(m.data, Value::Null);
    }

    #[test]
    fn time_without_offset_is_utc() {
        let m = dec(r#"{"type":"A","data":1,"time":"2026-05-01T10:00:00.250"}"#).unwrap();
        assert_eq!(
            m.time,
            Utc.with_ymd_and_hms(2026, 5, 1, 10, 0, 0).unwrap() + chrono::Duration::milliseconds(250)
        );
        let m = dec(r#"{"type":"A","data":1,"time":"2026-05-01 10:00:00"}"#).unwrap();
        assert_eq!(m.time, Utc.with_ymd_and_hms(2026, 5, 1, 10, 0, 0).unwrap());
    }

    #[test]
    fn rejects_bad_time() {
        assert_eq!(problem_field(r#"{"type":"A","data":1,"time":"yesterday"}"#), "time");
        assert_eq!(problem_field(r#"{"type":"A","data":1,"time":12}"#), "time");
        // Valid RFC 3339, but year 0 in UTC, which RFC 3339 cannot write.
        assert_eq!(
            problem_field(r#"{"type":"A","data":1,"time":"0001-01-01T00:00:00+01:00"}"#),
            "time"
        );
        assert_eq!(
            problem_field(r#"{"type":"A","data":1,"time":"+10000-01-01T00:00:00"}"#),
            "time"
        );
        assert!(dec(r#"{"type":"A","data":1,"time":"9999-12-31T23:59:59Z"}"#).is_ok());
    }

    #[test]
    fn an_unreadable_amqp_id_is_refused_unless_the_body_has_one() {
        let body = br#"{"type":"A","data":1}"#;
        let lossy = "\u{fffd}\u{fffd}";
        assert_eq!(
            decode(body, Some(lossy), now(), 1024),
            Err(DecodeError::UnreadableMessageId)
        );
        let with_id = br#"{"type":"A","id":"x","data":1}"#;
        assert_eq!(decode(with_id, Some(lossy), now(), 1024).unwrap().id, "x");
    }

    #[test]
    fn id_falls_back_to_amqp_property_then_body_hash() {
        let body = br#"{"type":"A","data":1}"#;
        let m = decode(body, Some("amqp-1"), now(), MAX).unwrap();
        assert_eq!((m.id.as_str(), m.id_source), ("amqp-1", IdSource::AmqpProperty));
        let m = decode(body, None, now(), MAX).unwrap();
        assert_eq!(m.id_source, IdSource::BodyHash);
        assert_eq!(m.id, body_hash(body));
        assert_eq!(m.id.len(), 64);
        assert!(m.id.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        // An empty message_id property is no id.
        let m = decode(body, Some(""), now(), MAX).unwrap();
        assert_eq!(m.id_source, IdSource::BodyHash);
        // The envelope id wins over the property.
        let m = decode(br#"{"type":"A","data":1,"id":"env"}"#, Some("amqp-1"), now(), MAX).unwrap();
        assert_eq!(m.id, "env");
    }

    #[test]
    fn enforces_max_bytes() {
        let body = format!(r#"{{"type":"A","data":"{}"}}"#, "x".repeat(100));
        assert!(matches!(
            decode(body.as_bytes(), None, now(), 50),
            Err(DecodeError::TooLarge { max: 50, .. })
        ));
        assert!(decode(body.as_bytes(), None, now(), body.len()).is_ok());
    }

    #[test]
    fn requires_type_and_data() {
        assert_eq!(dec(r#"{"data":1}"#), Err(DecodeError::Missing("type")));
        assert_eq!(dec(r#"{"type":"A"}"#), Err(DecodeError::Missing("data")));
    }

    #[test]
    fn checks_type_pattern() {
        for bad in [r#""""#, r#""device_up""#, r#""1ABC""#, r#""A-B""#, "7"] {
            assert_eq!(problem_field(&format!(r#"{{"type":{bad},"data":1}}"#)), "type", "{bad}");
        }
        let longest = format!("A{}", "B".repeat(63));
        assert!(dec(&format!(r#"{{"type":"{longest}","data":1}}"#)).is_ok());
        assert_eq!(problem_field(&format!(r#"{{"type":"{longest}C","data":1}}"#)), "type");
    }

    #[test]
    fn checks_kind() {
        assert_eq!(problem_field(r#"{"type":"A","kind":"query","data":1}"#), "kind");
        assert_eq!(problem_field(r#"{"type":"A","kind":1,"data":1}"#), "kind");
    }

    #[test]
    fn checks_lengths_of_id_actor_target() {
        let long = "é".repeat(129);
        assert_eq!(problem_field(r#"{"type":"A","id":"","data":1}"#), "id");
        assert_eq!(
            problem_field(&format!(r#"{{"type":"A","id":"{long}","data":1}}"#)),
            "id"
        );
        assert!(dec(&format!(r#"{{"type":"A","id":"{}","data":1}}"#, "é".repeat(128))).is_ok());
        assert_eq!(
            problem_field(&format!(r#"{{"type":"A","actor":"{long}","data":1}}"#)),
            "actor"
        );
        assert_eq!(
            problem_field(&format!(r#"{{"type":"A","target":"{long}","data":1}}"#)),
            "target"
        );
        assert_eq!(problem_field(r#"{"type":"A","actor":5,"data":1}"#), "actor");
    }

    #[test]
    fn rejects_non_objects_and_broken_json() {
        assert_eq!(dec("[1,2]"), Err(DecodeError::NotAnObject("an array")));
        assert_eq!(dec("42"), Err(DecodeError::NotAnObject("a number")));
        assert_eq!(dec("null"), Err(DecodeError::NotAnObject("null")));
        assert_eq!(dec("  "), Err(DecodeError::Empty));
        assert_eq!(dec(""), Err(DecodeError::Empty));
        assert!(matches!(dec("not json"), Err(DecodeError::Json(_))));
        assert!(matches!(dec(r#"{"type":"A","data":1"#), Err(DecodeError::Json(_))));
        assert!(matches!(
            decode(b"{\"type\":\"A\xff\",\"data\":1}", None, now(), MAX),
            Err(DecodeError::Json(_))
        ));
    }

    #[test]
    fn refuses_duplicate_known_fields_and_ignores_unknown_ones() {
        assert_eq!(
            dec(r#"{"type":"A","type":"B","data":1}"#),
            Err(DecodeError::DuplicateField("type"))
        );
        let m = dec(r#"{"type":"A","data":1,"x":1,"x":2,"nested":{"deep":[1,2,3]}}"#).unwrap();
        assert_eq!(m.message_type, "A");
    }

    #[test]
    fn tolerates_a_bom_and_survives_deep_nesting() {
        assert!(decode(b"\xEF\xBB\xBF{\"type\":\"A\",\"data\":1}", None, now(), MAX).is_ok());
        let deep = format!(r#"{{"type":"A","data":{}{}}}"#, "[".repeat(10_000), "]".repeat(10_000));
        assert!(matches!(dec(&deep), Err(DecodeError::Json(_))));
    }

    #[test]
    fn null_optional_fields_count_as_absent() {
        let m = dec(r#"{"type":"A","data":1,"id":null,"actor":null,"time":null,"kind":null}"#).unwrap();
        assert_eq!(m.kind, Kind::Event);
        assert_eq!(m.actor, None);
        assert_eq!(m.id_source, IdSource::BodyHash);
    }

    #[test]
    fn to_json_round_trips() {
        let m = dec(
            r#"{"type":"MEASUREMENT","actor":"a","data":{"v":[1,2.5,"x"]},"time":"2026-05-01T10:00:00.123456789Z"}"#,
        )
        .unwrap();
        let again = decode(&m.to_json(), None, now(), MAX).unwrap();
        assert_eq!(
            again,
            Message {
                id_source: IdSource::Envelope,
                ..m
            }
        );
    }

    mod properties {
        use chrono::{Duration as Span, NaiveDateTime};
        use proptest::prelude::*;
        use serde_json::Map;

        use super::*;

        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<f64>()
                    .prop_filter("finite", |f| f.is_finite())
                    .prop_map(Value::from),
                ".{0,20}".prop_map(Value::from),
            ];
            leaf.prop_recursive(4, 32, 6, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    proptest::collection::btree_map(".{0,8}", inner, 0..6)
                        .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
                ]
            })
        }

        fn any_time() -> impl Strategy<Value = DateTime<Utc>> {
            // 0001-01-01 to 9999-12-31, with nanoseconds.
            (-62_135_596_800i64..253_402_300_799, 0u32..1_000_000_000)
                .prop_map(|(secs, nanos)| DateTime::from_timestamp(secs, nanos).unwrap())
        }

        fn any_message() -> impl Strategy<Value = Message> {
            (
                "[A-Z][A-Z0-9_]{0,63}",
                any::<bool>(),
                ".{1,128}",
                proptest::option::of(".{0,128}"),
                proptest::option::of(".{0,128}"),
                any_time(),
                json_value(),
            )
                .prop_map(|(message_type, command, id, actor, target, time, data)| Message {
                    id,
                    id_source: IdSource::Envelope,
                    kind: if command { Kind::Command } else { Kind::Event },
                    message_type,
                    actor,
                    target,
                    time,
                    data,
                })
        }

        proptest! {
            /// Any valid message encodes and decodes back to itself.
            #[test]
            fn valid_messages_round_trip(message in any_message()) {
                let decoded = decode(&message.to_json(), None, now(), usize::MAX);
                prop_assert_eq!(decoded, Ok(message));
            }

            /// Any bytes give a message or an error, never a panic; what is
            /// accepted fits the limit.
            #[test]
            fn any_bytes_decode_or_fail_cleanly(body in proptest::collection::vec(any::<u8>(), 0..512)) {
                if decode(&body, None, now(), 256).is_ok() {
                    prop_assert!(body.len() <= 256);
                }
            }

            /// JSON-ish text built from the envelope's own pieces, the inputs
            /// most likely to get past the first checks.
            #[test]
            fn envelope_like_text_decodes_or_fails_cleanly(
                parts in proptest::collection::vec(
                    prop_oneof![
                        Just("{".to_owned()), Just("}".to_owned()), Just("\"type\":".to_owned()),
                        Just("\"data\":".to_owned()), Just("\"time\":".to_owned()), Just(",".to_owned()),
                        "\"[A-Z_]{1,4}\"", "-?[0-9]{1,30}(\\.[0-9]{1,5})?(e-?[0-9]{1,3})?", Just("null".to_owned()),
                    ],
                    0..16,
                ),
            ) {
                let _ = decode(parts.concat().as_bytes(), None, now(), MAX);
            }

            /// The id falls back deterministically: the AMQP message_id, else
            /// the SHA-256 of the exact body.
            #[test]
            fn id_fallback_is_deterministic(data in json_value(), amqp in proptest::option::of("[a-z0-9-]{1,40}")) {
                let body = serde_json::to_vec(&serde_json::json!({"type": "A", "data": data})).unwrap();
                let first = decode(&body, amqp.as_deref(), now(), usize::MAX).unwrap();
                let second = decode(&body, amqp.as_deref(), now(), usize::MAX).unwrap();
                prop_assert_eq!(&first.id, &second.id);
                match amqp {
                    Some(amqp) => prop_assert_eq!(first.id, amqp),
                    None => prop_assert_eq!(first.id, body_hash(&body)),
                }
            }

            /// Unknown top-level fields change nothing.
            #[test]
            fn unknown_fields_are_ignored(message in any_message(), key in "[a-z_]{1,12}", extra in json_value()) {
                prop_assume!(!["type", "kind", "id", "actor", "target", "time", "data"].contains(&key.as_str()));
                let mut object: Value = serde_json::from_slice(&message.to_json()).unwrap();
                object[key.as_str()] = extra;
                let decoded = decode(&serde_json::to_vec(&object).unwrap(), None, now(), usize::MAX);
                prop_assert_eq!(decoded, Ok(message));
            }

            /// A time without an offset is UTC; with one, it is shifted to UTC.
            #[test]
            fn times_with_and_without_offset(
                secs in -62_135_510_400i64..253_402_214_399,
                offset_minutes in -(23 * 60 + 59)..=(23 * 60 + 59i64),
            ) {
                let naive: NaiveDateTime = DateTime::from_timestamp(secs, 0).unwrap().naive_utc();
                let plain = naive.format("%Y-%m-%dT%H:%M:%S").to_string();
                prop_assert_eq!(parse_time(&plain), Ok(naive.and_utc()));
                let sign = if offset_minutes < 0 { '-' } else { '+' };
                let shifted = format!("{plain}{sign}{:02}:{:02}", offset_minutes.abs() / 60, offset_minutes.abs() % 60);
                prop_assert_eq!(parse_time(&shifted), Ok(naive.and_utc() - Span::minutes(offset_minutes)));
            }
        }
    }
}
