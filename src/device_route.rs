//! Devices over MQTT (docs/devices.md): the decoder of raw device messages,
//! beside the envelope decoder, and the topics commands are sent on.
//!
//! A device publishes raw JSON on its own MQTT topics; RabbitMQ's MQTT
//! plugin puts it on `amq.topic` with the topic as routing key (`a/b` is
//! `a.b`). A [`DeviceRoute`] from the topology file maps a topic filter to
//! a message type, says where the device id comes from (a topic level or a
//! body field) and how `data` is built (topic levels, body fields,
//! constants). [`DeviceRoute::decode`] turns a delivery that matches it into
//! the same [`Message`] an envelope decodes to, so it flows like any other.
//!
//! Like the envelope decoder this is an attack surface: it never panics, it
//! reads at most `max_bytes` of body, and every refusal is a
//! [`DeviceError`] that names the topic and the field.
//!
//! A raw message carries no id and no wall time: [`identify`] gives it both
//! once, at receipt (docs/devices.md, "Guarantees").

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::envelope::{IdSource, Kind, Message, check_type_name, truncate_chars};

/// The header RabbitMQ 3.12+'s `set_header_timestamp` message interceptor
/// sets on every incoming message: its arrival, in unix milliseconds.
pub const ARRIVAL_STAMP: &str = "timestamp_in_ms";

/// The exchange RabbitMQ's MQTT plugin publishes to and delivers from.
pub const MQTT_EXCHANGE: &str = "amq.topic";

/// Where a value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A level of the topic, 1 for the first (`/up` has an empty first level).
    Level(usize),
    /// A field of the JSON body; an optional one may be absent or `null`.
    Field { name: String, optional: bool },
    /// A constant from the topology file.
    Constant(Value),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Level(n) => write!(f, "topic level {n}"),
            Source::Field { name, .. } => write!(f, "body field `{name}`"),
            Source::Constant(value) => write!(f, "the constant {value}"),
        }
    }
}

/// One route of the topology file's `[[routes]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRoute {
    /// The MQTT topic filter, such as `+/pressure`.
    pub topic: String,
    /// The message type it makes (always an event).
    pub message_type: String,
    pub device_id: Source,
    /// The fields of `data` beside `device_id`, in file order.
    pub data: Vec<(String, Source)>,
}

/// A route as the topology file spells it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    topic: String,
    #[serde(rename = "type")]
    message_type: String,
    device_id: SourceFile,
    #[serde(default)]
    data: toml::Table,
}

/// `{ level = N }`, `{ field = "name", optional = true }` or `{ value = … }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceFile {
    level: Option<usize>,
    field: Option<String>,
    value: Option<toml::Value>,
    #[serde(default)]
    optional: bool,
}

/// Why a raw device message cannot be the message its route makes. Always
/// permanent: the same bytes fail the same way on every attempt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device message on MQTT topic {topic:?} (route {route:?} → {message_type}): {problem}")]
pub struct DeviceError {
    pub topic: String,
    pub route: String,
    pub message_type: String,
    /// `decode` (the body is not a JSON object) or `validation`.
    pub undecodable: bool,
    pub problem: String,
}

impl DeviceRoute {
    /// Checks a route of the topology file.
    ///
    /// # Errors
    /// A sentence naming the route and what is wrong with it.
    pub fn parse(file: RouteFile) -> Result<DeviceRoute, String> {
        let at = |problem: String| format!("routes: topic {:?}: {problem}", file.topic);
        check_filter(&file.topic).map_err(at)?;
        check_type_name(&file.message_type).map_err(|p| at(format!("type {p}")))?;
        let levels = fixed_levels(&file.topic);
        let device_id = file
            .device_id
            .parse(levels)
            .map_err(|p| at(format!("device_id: {p}")))?;
        if matches!(device_id, Source::Constant(_)) {
            return Err(at("device_id must come from a topic level or a body field".into()));
        }
        let mut data = Vec::with_capacity(file.data.len());
        for (name, value) in file.data {
            if name.is_empty() || name == "device_id" {
                return Err(at(format!(
                    "data.{name:?}: device_id is set by device_id; name another field"
                )));
            }
            let source: SourceFile = value.try_into().map_err(|e| at(format!("data.{name}: {e}")))?;
            data.push((
                name.clone(),
                source.parse(levels).map_err(|p| at(format!("data.{name}: {p}")))?,
            ));
        }
        Ok(DeviceRoute {
            topic: file.topic,
            message_type: file.message_type,
            device_id,
            data,
        })
    }

    /// The binding key of the route on `amq.topic`, as the MQTT plugin maps
    /// the filter (`/` is `.`, `+` is `*`; `/up` is `.up`).
    pub fn routing_key(&self) -> String {
        self.topic
            .split('/')
            .map(|level| if level == "+" { "*" } else { level })
            .collect::<Vec<_>>()
            .join(".")
    }

    /// Whether an MQTT topic matches the route's filter (MQTT 3.1.1,
    /// 4.7): level by level, `+` one level, a last `#` the rest and the
    /// parent level; a wildcard first matches no `$` topic. Written here,
    /// not taken from rumqttc, whose `matches` panics on a topic with
    /// multi-byte characters (found by the fuzz target
    /// `decode_device_route`), and a routing key may hold any.
    pub fn matches(&self, topic: &str) -> bool {
        if topic.starts_with('$') && self.topic.starts_with(['+', '#']) {
            return false;
        }
        let mut levels = topic.split('/');
        for wanted in self.topic.split('/') {
            match (wanted, levels.next()) {
                ("#", _) => return true,
                (_, None) => return false,
                ("+", Some(_)) => {}
                (wanted, Some(level)) if wanted == level => {}
                _ => return false,
            }
        }
        levels.next().is_none()
    }

    /// Turns a raw body that arrived on `topic` into the route's message,
    /// with the id and time given at receipt. `data` is built but not
    /// validated: that is the handler's job, as for an envelope.
    ///
    /// # Errors
    /// A [`DeviceError`] naming the topic and the field.
    pub fn decode(
        &self,
        topic: &str,
        body: &[u8],
        identity: &Identity,
        max_bytes: usize,
    ) -> Result<Message, DeviceError> {
        if body.len() > max_bytes {
            let problem = format!(
                "body is {} bytes, more than MAX_MESSAGE_BYTES ({max_bytes})",
                body.len()
            );
            return Err(self.error(topic, true, problem));
        }
        let object = match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(object)) => object,
            Ok(other) => {
                return Err(self.error(
                    topic,
                    true,
                    format!("body must be a JSON object, found {}", kind_of(&other)),
                ));
            }
            Err(e) => return Err(self.error(topic, true, format!("body is not valid JSON: {e}"))),
        };
        let levels: Vec<&str> = topic.split('/').collect();
        let mut data = Map::new();
        let device_id = self.value(&self.device_id, &levels, &object);
        match device_id {
            Ok(Some(Value::String(id))) => data.insert("device_id".into(), Value::String(id)),
            Ok(Some(other)) => {
                return Err(self.invalid(
                    topic,
                    &self.device_id,
                    &format!("must be a string, found {}", kind_of(&other)),
                ));
            }
            Ok(None) | Err(()) => return Err(self.invalid(topic, &self.device_id, "is required")),
        };
        for (name, source) in &self.data {
            match self.value(source, &levels, &object) {
                Ok(Some(value)) => data.insert(name.clone(), value),
                Ok(None) => None,
                Err(()) => return Err(self.invalid(topic, source, "is required")),
            };
        }
        Ok(Message {
            id: identity.id.clone(),
            id_source: identity.id_source,
            kind: Kind::Event,
            message_type: self.message_type.clone(),
            actor: None,
            target: None,
            time: identity.time,
            data: Value::Object(data),
        })
    }

    /// The value `source` gives: `Ok(None)` for an absent optional field,
    /// `Err(())` for an absent required one.
    fn value(&self, source: &Source, levels: &[&str], body: &Map<String, Value>) -> Result<Option<Value>, ()> {
        match source {
            Source::Level(n) => levels
                .get(n - 1)
                .map(|level| Some(Value::String((*level).to_owned())))
                .ok_or(()),
            Source::Constant(value) => Ok(Some(value.clone())),
            Source::Field { name, optional } => match body.get(name).filter(|v| !v.is_null()) {
                Some(value) => Ok(Some(value.clone())),
                None if *optional => Ok(None),
                None => Err(()),
            },
        }
    }

    /// A handler's refusal of `data.<field>`, said of the topic and of
    /// where the field came from.
    pub fn explain(&self, topic: &str, field: &str, problem: &str) -> DeviceError {
        match self.source_of(field) {
            Some(source) => self.invalid(topic, source, problem),
            None if field.is_empty() => self.error(topic, false, format!("data {problem}")),
            None => self.error(topic, false, format!("data.{field} {problem}")),
        }
    }

    fn source_of(&self, field: &str) -> Option<&Source> {
        match field {
            "device_id" => Some(&self.device_id),
            _ => self
                .data
                .iter()
                .find(|(name, _)| name == field)
                .map(|(_, source)| source),
        }
    }

    fn invalid(&self, topic: &str, source: &Source, problem: &str) -> DeviceError {
        self.error(topic, false, format!("{source} {problem}"))
    }

    fn error(&self, topic: &str, undecodable: bool, problem: String) -> DeviceError {
        DeviceError {
            topic: truncate_chars(topic, 256).to_owned(),
            route: self.topic.clone(),
            message_type: self.message_type.clone(),
            undecodable,
            problem,
        }
    }
}

impl SourceFile {
    /// One of `level`, `field` or `value`; a level within the filter's
    /// `fixed` levels (those before a `#`).
    fn parse(self, fixed: usize) -> Result<Source, String> {
        let optional_alone = self.optional && self.field.is_none();
        match (self.level, self.field, self.value) {
            _ if optional_alone => Err("optional applies to a body field only".into()),
            (Some(n), None, None) if (1..=fixed).contains(&n) => Ok(Source::Level(n)),
            (Some(n), None, None) => Err(format!("level {n} is not a level of the topic filter (1 to {fixed})")),
            (None, Some(name), None) if !name.is_empty() => Ok(Source::Field {
                name,
                optional: self.optional,
            }),
            (None, None, Some(value)) => serde_json::to_value(value)
                .map(Source::Constant)
                .map_err(|e| e.to_string()),
            _ => Err("give exactly one of level = N, field = \"name\" or value = …".into()),
        }
    }
}

/// An MQTT topic filter that the MQTT plugin can bind: valid, and without
/// the characters that mean something else in a routing key.
fn check_filter(filter: &str) -> Result<(), String> {
    if !rumqttc::valid_filter(filter) || filter.starts_with('$') {
        return Err("not a valid MQTT topic filter".into());
    }
    if filter.contains(['.', '*']) || filter.len() > 200 {
        return Err("a route's filter must not hold `.` or `*` (they mean other things in a routing key) and must be at most 200 bytes".into());
    }
    Ok(())
}

/// The levels of a filter before a trailing `#`.
fn fixed_levels(filter: &str) -> usize {
    filter.split('/').take_while(|level| *level != "#").count()
}

/// The MQTT topic of a routing key on `amq.topic`: the plugin's mapping
/// the other way (`.` is `/`, and a `/` in a routing key is a `.` in MQTT).
pub fn mqtt_topic(routing_key: &str) -> String {
    routing_key
        .chars()
        .map(|c| match c {
            '.' => '/',
            '/' => '.',
            c => c,
        })
        .collect()
}

/// The routes of a topology file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes(Vec<DeviceRoute>);

impl Routes {
    /// # Errors
    /// The first route's problem, or two routes with the same filter.
    pub fn parse(files: Vec<RouteFile>) -> Result<Routes, String> {
        let mut routes: Vec<DeviceRoute> = Vec::with_capacity(files.len());
        for file in files {
            let route = DeviceRoute::parse(file)?;
            if routes.iter().any(|r| r.topic == route.topic) {
                return Err(format!("routes: topic {:?} is routed twice", route.topic));
            }
            routes.push(route);
        }
        Ok(Routes(routes))
    }

    pub fn iter(&self) -> impl Iterator<Item = &DeviceRoute> {
        self.0.iter()
    }

    /// The first route (in file order) that a delivery which first arrived
    /// through `exchange` with `routing_key` matches, with its MQTT topic.
    pub fn find(&self, exchange: &str, routing_key: &str) -> Option<(usize, String)> {
        if exchange != MQTT_EXCHANGE || self.0.is_empty() {
            return None;
        }
        let topic = mqtt_topic(routing_key);
        let index = self.0.iter().position(|route| route.matches(&topic))?;
        Some((index, topic))
    }

    pub fn get(&self, index: usize) -> Option<&DeviceRoute> {
        self.0.get(index)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The id and time of a raw device message, decided at receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub id: String,
    pub id_source: IdSource,
    pub time: DateTime<Utc>,
}

/// What is known of a raw delivery when it is received.
#[derive(Debug, Clone, Copy)]
pub struct Receipt<'a> {
    /// The routing key it first arrived with.
    pub routing_key: &'a str,
    pub body: &'a [u8],
    /// The broker's arrival stamp ([`ARRIVAL_STAMP`]), unix ms.
    pub stamp_ms: Option<i64>,
    /// The AMQP `message_id`: a producer's, or the one an earlier copy carries.
    pub message_id: Option<&'a str>,
    /// When it was first received, as an earlier copy (or the producer's
    /// `timestamp`) says.
    pub first_received: Option<DateTime<Utc>>,
}

/// The id and time of a raw device message (docs/devices.md, "Guarantees"):
///
/// * id: the AMQP `message_id` (a producer's, or carried on a copy), else,
///   when the broker stamped arrival, the SHA-256 of routing key, body and
///   stamp (a redelivery is the same message), else `fresh()`, minted now;
/// * time: the stamp, else the first receipt carried on copies, else `now`.
pub fn identify(receipt: &Receipt<'_>, now: DateTime<Utc>, fresh: impl FnOnce() -> String) -> Identity {
    let stamp = receipt.stamp_ms.and_then(DateTime::from_timestamp_millis);
    let time = stamp.or(receipt.first_received).unwrap_or(now);
    let (id, id_source) = match (
        receipt.message_id.filter(|id| (1..=255).contains(&id.len())),
        receipt.stamp_ms,
    ) {
        (Some(id), _) => (id.to_owned(), IdSource::AmqpProperty),
        (None, Some(stamp)) => (
            arrival_hash(receipt.routing_key, receipt.body, stamp),
            IdSource::ArrivalStamp,
        ),
        (None, None) => (fresh(), IdSource::Minted),
    };
    Identity { id, id_source, time }
}

/// SHA-256 (hex) of routing key, body and arrival stamp, each length-prefixed
/// so that no two different triples hash alike by concatenation.
pub fn arrival_hash(routing_key: &str, body: &[u8], stamp_ms: i64) -> String {
    let mut hash = Sha256::new();
    hash.update((routing_key.len() as u64).to_be_bytes());
    hash.update(routing_key.as_bytes());
    hash.update((body.len() as u64).to_be_bytes());
    hash.update(body);
    hash.update(stamp_ms.to_be_bytes());
    hex::encode(hash.finalize())
}

/// A fresh message id: `raw-` and 128 random bits in hex (the operating
/// system's generator). Unique without coordination, like a UUID v4.
pub fn fresh_id() -> String {
    let mut bytes = [0u8; 16];
    // getrandom fails only where the OS has no entropy source at all; the
    // clock and a counter then still tell ids of one process apart.
    if getrandom::fill(&mut bytes).is_err() {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = Utc::now().timestamp_nanos_opt().unwrap_or_default();
        bytes[..8].copy_from_slice(&nanos.to_be_bytes());
        bytes[8..].copy_from_slice(&n.to_be_bytes());
    }
    format!("raw-{}", hex::encode(bytes))
}

/// The routing key of each command type's device message: a template with
/// `{device_id}` (the topology file's `[commands]`; docs/devices.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandTopics(BTreeMap<String, String>);

/// The firmware's command topics: MQTT `/led/<id>` and `<id>/config`.
pub const SHIPPED_COMMAND_TOPICS: [(&str, &str); 2] = [
    ("SET_LED", ".led.{device_id}"),
    ("SET_PUBLISH_PERIOD", "{device_id}.config"),
];

impl Default for CommandTopics {
    fn default() -> CommandTopics {
        CommandTopics(
            SHIPPED_COMMAND_TOPICS
                .iter()
                .map(|(t, k)| ((*t).to_owned(), (*k).to_owned()))
                .collect(),
        )
    }
}

impl CommandTopics {
    /// The file's templates over the shipped ones.
    ///
    /// # Errors
    /// A template without exactly one `{device_id}`, or with a wildcard.
    pub fn parse(file: BTreeMap<String, String>) -> Result<CommandTopics, String> {
        let mut topics = CommandTopics::default();
        for (message_type, template) in file {
            let at = |problem: &str| format!("commands.{message_type} = {template:?}: {problem}");
            check_type_name(&message_type).map_err(|p| at(&p))?;
            if template.matches("{device_id}").count() != 1 {
                return Err(at("must hold {device_id} exactly once"));
            }
            if template.contains(['*', '#', '+']) || template.len() > 200 {
                return Err(at(
                    "a routing key to publish to holds no wildcard and is at most 200 bytes",
                ));
            }
            topics.0.insert(message_type, template);
        }
        Ok(topics)
    }

    /// The command types that have a template.
    pub fn types(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// The routing key of `message_type`'s device message for `device_id`.
    ///
    /// # Errors
    /// A sentence about the device id when it cannot be one topic level
    /// (it holds `.`, `/`, `+` or `#`), or when the type has no template.
    pub fn routing_key(&self, message_type: &str, device_id: &str) -> Result<String, String> {
        if let Some(c) = device_id.chars().find(|c| matches!(c, '.' | '/' | '+' | '#')) {
            return Err(format!(
                "cannot be one MQTT topic level: it holds {c:?} (a device id for commands has none of `.` `/` `+` `#`), found {:?}",
                truncate_chars(device_id, 80)
            ));
        }
        let template = self
            .0
            .get(message_type)
            .ok_or_else(|| format!("{message_type} has no command topic in the topology file's [commands]"))?;
        Ok(template.replace("{device_id}", device_id))
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests;
