//! The commands: each writes the message for its device to the outbox
//! (docs/reliability.md, "Commands to devices"), which the relay
//! publishes to `amq.topic`. The routing key comes from the type's template
//! in the topology file (docs/devices.md, "Commands"); the shipped ones are
//! the firmware's topics:
//!
//! * `SET_LED`: switch a device's LED: `.led.<device_id>` (MQTT
//!   `/led/<device_id>`), body `on`/`off`.
//! * `SET_PUBLISH_PERIOD`: how often a device publishes:
//!   `<device_id>.config` (MQTT `<device_id>/config`), body the period in ms.

use futures_util::future::BoxFuture;
use serde_json::Value;
use sqlx::PgConnection;
use tracing::Span;

use super::fields::{Fields, ValidationError};
use super::{Context, Handler, Typed};
use crate::envelope::Message;
use crate::failure::Failure;
use crate::outbox;
use crate::telemetry;

/// What a command sends its device.
#[derive(Debug, PartialEq, Eq)]
pub struct DeviceMessage {
    pub device_id: String,
    pub routing_key: String,
    pub body: Vec<u8>,
}

/// A command's device id and the body of its device message.
type Addressed = (String, Vec<u8>);

/// A command type: how its `data` becomes its device and body.
pub struct Command {
    pub device_message: fn(&Value) -> Result<Addressed, ValidationError>,
}

pub static SET_LED: Command = Command {
    device_message: set_led,
};
pub static SET_PUBLISH_PERIOD: Command = Command {
    device_message: set_publish_period,
};

impl Handler for Command {
    type Item = DeviceMessage;

    /// The device message, on the routing key the topology file gives the
    /// type: a device id that cannot be one topic level is refused here.
    fn prepare(&self, message: &Message, context: &Context<'_>) -> Result<DeviceMessage, Failure> {
        let (device_id, body) = (self.device_message)(&message.data)?;
        let routing_key = context
            .commands
            .routing_key(&message.message_type, &device_id)
            .map_err(|problem| ValidationError::new("device_id", problem))?;
        Ok(DeviceMessage {
            device_id,
            routing_key,
            body,
        })
    }

    fn device_id(item: &DeviceMessage) -> Option<&str> {
        Some(&item.device_id)
    }

    /// The device messages in one statement, each with its command's trace
    /// context: a lone command's `handler` span (the current span, in its
    /// own trace), or, in a batch, its delivery's.
    fn write<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        batch: &'a [Typed<'a, DeviceMessage>],
    ) -> BoxFuture<'a, Result<(), Failure>> {
        let alone = match batch {
            [_] => telemetry::context_headers(&Span::current()),
            _ => None,
        };
        Box::pin(async move {
            let rows: Vec<outbox::Pending<'_>> = batch
                .iter()
                .map(|t| outbox::Pending {
                    message_id: t.id,
                    routing_key: &t.item.routing_key,
                    body: &t.item.body,
                    trace: alone.as_ref().or(t.trace),
                })
                .collect();
            outbox::enqueue_many(conn, &rows).await?;
            Ok(())
        })
    }
}

/// `SET_LED`'s `data`: device id and `on`/`off`.
///
/// # Errors
/// A [`ValidationError`] naming the first bad field.
pub fn parse_set_led(data: &Value) -> Result<(&str, &str), ValidationError> {
    let fields = Fields::of(data)?;
    let device_id = fields.device_id()?;
    match fields.string("state", 1..=16)? {
        state @ ("on" | "off") => Ok((device_id, state)),
        _ => Err(ValidationError::new("state", "must be \"on\" or \"off\"")),
    }
}

fn set_led(data: &Value) -> Result<Addressed, ValidationError> {
    let (device_id, state) = parse_set_led(data)?;
    Ok((device_id.to_owned(), state.as_bytes().to_vec()))
}

/// `SET_PUBLISH_PERIOD`'s `data`: device id and period in milliseconds.
///
/// # Errors
/// A [`ValidationError`] naming the first bad field.
pub fn parse_set_publish_period(data: &Value) -> Result<(&str, i64), ValidationError> {
    let fields = Fields::of(data)?;
    Ok((fields.device_id()?, fields.integer("period_ms", 1000..=10_000)?))
}

fn set_publish_period(data: &Value) -> Result<Addressed, ValidationError> {
    let (device_id, period_ms) = parse_set_publish_period(data)?;
    Ok((device_id.to_owned(), period_ms.to_string().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device_route::CommandTopics;
    use serde_json::json;

    #[test]
    fn set_led_validates_state_and_device() {
        let parse = parse_set_led;
        assert_eq!(parse(&json!({"device_id": "d1", "state": "on"})), Ok(("d1", "on")));
        assert_eq!(parse(&json!({"device_id": "d1", "state": "off"})), Ok(("d1", "off")));
        assert_eq!(
            parse(&json!({"device_id": "d1", "state": "ON"})).unwrap_err().field,
            "state"
        );
        assert_eq!(
            parse(&json!({"device_id": "d1", "state": true})).unwrap_err().field,
            "state"
        );
        assert_eq!(parse(&json!({"device_id": "d1"})).unwrap_err().field, "state");
        assert_eq!(parse(&json!({"state": "on"})).unwrap_err().field, "device_id");
    }

    #[test]
    fn set_publish_period_validates_period_bounds() {
        let parse = parse_set_publish_period;
        assert_eq!(parse(&json!({"device_id": "d1", "period_ms": 1000})), Ok(("d1", 1000)));
        assert_eq!(
            parse(&json!({"device_id": "d1", "period_ms": 10_000})),
            Ok(("d1", 10_000))
        );
        for bad in [json!(999), json!(10_001), json!(1500.5), json!("2000"), Value::Null] {
            let err = parse(&json!({"device_id": "d1", "period_ms": bad})).unwrap_err();
            assert_eq!(err.field, "period_ms");
        }
        assert_eq!(parse(&json!({"period_ms": 2000})).unwrap_err().field, "device_id");
    }

    fn device_message(message_type: &str, data: Value, topics: &CommandTopics) -> Result<DeviceMessage, Failure> {
        let command = match message_type {
            "SET_LED" => &SET_LED,
            _ => &SET_PUBLISH_PERIOD,
        };
        let message = Message {
            id: "m1".into(),
            id_source: crate::envelope::IdSource::Envelope,
            kind: crate::envelope::Kind::Command,
            message_type: message_type.into(),
            actor: None,
            target: None,
            time: chrono::Utc::now(),
            data,
        };
        Handler::prepare(command, &message, &Context { commands: topics })
    }

    #[test]
    fn device_messages_go_to_the_shipped_firmware_topics() {
        let shipped = CommandTopics::default();
        let led = device_message("SET_LED", json!({"device_id": "lamp-1", "state": "on"}), &shipped).unwrap();
        assert_eq!(
            (led.routing_key.as_str(), led.body.as_slice()),
            (".led.lamp-1", &b"on"[..])
        );
        let period = device_message(
            "SET_PUBLISH_PERIOD",
            json!({"device_id": "p-1", "period_ms": 2500}),
            &shipped,
        )
        .unwrap();
        assert_eq!(
            (period.routing_key.as_str(), period.body.as_slice()),
            ("p-1.config", &b"2500"[..])
        );
    }

    #[test]
    fn templates_come_from_the_topology_file() {
        let topics =
            CommandTopics::parse([("SET_LED".to_owned(), "site.7.led.{device_id}".to_owned())].into()).unwrap();
        let led = device_message("SET_LED", json!({"device_id": "lamp-1", "state": "off"}), &topics).unwrap();
        assert_eq!(led.routing_key, "site.7.led.lamp-1");
    }

    #[test]
    fn a_device_id_that_is_not_one_topic_level_is_refused() {
        let shipped = CommandTopics::default();
        for id in ["a.b", "a/b", "a+", "a#"] {
            let refused = device_message("SET_LED", json!({"device_id": id, "state": "on"}), &shipped).unwrap_err();
            assert!(
                matches!(&refused, Failure::Invalid(e) if e.field == "device_id"),
                "{id}: {refused}"
            );
            assert_eq!(refused.kind(), crate::failure::ErrorKind::Validation);
        }
        // `.` passes the device id rule of events: commands refuse it.
        let dotted = device_message("SET_LED", json!({"device_id": "a.b", "state": "on"}), &shipped).unwrap_err();
        assert!(dotted.to_string().contains("one MQTT topic level"), "{dotted}");
    }
}
