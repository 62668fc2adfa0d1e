//! The messages tests publish: a builder for each message type they use,
//! so that every test writes the envelope the same way, and the AMQP
//! `message_id` that tells copies apart. A body no builder makes (a
//! malformed one, one missing a field) is written out where it is used.

use lapin::BasicProperties;
use lapin::message::BasicGetMessage;
use lapin::types::ShortString;
use serde_json::{Value, json};

/// `value` as a message body.
pub fn body(value: Value) -> Vec<u8> {
    value.to_string().into_bytes()
}

/// A `MEASUREMENT` of sensor `t` of device `d1`.
pub fn measurement(id: &str, value: impl Into<Value>) -> Vec<u8> {
    measurement_of("d1", id, value)
}

/// A `MEASUREMENT` of sensor `t` of `device`.
pub fn measurement_of(device: &str, id: &str, value: impl Into<Value>) -> Vec<u8> {
    let value = value.into();
    body(json!({"type": "MEASUREMENT", "id": id, "data": {"device_id": device, "sensor": "t", "value": value}}))
}

/// A `MEASUREMENT` of sensor `t` of device `d1`, measured at `time`.
pub fn measurement_at(id: &str, value: impl Into<Value>, time: chrono::DateTime<chrono::Utc>) -> Vec<u8> {
    let value = value.into();
    body(json!({"type": "MEASUREMENT", "id": id, "time": time.to_rfc3339(),
                "data": {"device_id": "d1", "sensor": "t", "value": value}}))
}

/// A `MEASUREMENT` whose value is not a number: parked as `validation`,
/// with no retry.
pub fn invalid_measurement(id: &str) -> Vec<u8> {
    measurement(id, "hot")
}

/// A `DEVICE_UP` event of `device` (no address).
pub fn device_up(id: &str, device: &str) -> Vec<u8> {
    body(json!({"type": "DEVICE_UP", "id": id, "data": {"device_id": device}}))
}

/// An event of a type no handler knows (`TELEPORT`): parked as
/// `unknown_type`, with no retry.
pub fn unknown_type(id: &str) -> Vec<u8> {
    body(json!({"type": "TELEPORT", "id": id, "data": {}}))
}

/// A `TEST_FLAKY` event: fails transiently on its first `fail_first` runs,
/// then records a measurement. The handler counts the runs of each id in
/// the process, which every test of the binary shares: give each test ids
/// of its own.
pub fn flaky(id: &str, fail_first: u32) -> Vec<u8> {
    body(json!({"type": "TEST_FLAKY", "id": id, "data": {"fail_first": fail_first}}))
}

/// A `TEST_SLOW` event: `seconds` in its transaction, then a measurement.
pub fn slow(id: &str, seconds: impl Into<Value>) -> Vec<u8> {
    let seconds = seconds.into();
    body(json!({"type": "TEST_SLOW", "id": id, "data": {"seconds": seconds}}))
}

/// A `SET_LED` command for `device`.
pub fn set_led(id: &str, device: &str, state: &str) -> Vec<u8> {
    body(json!({"type": "SET_LED", "kind": "command", "id": id, "data": {"device_id": device, "state": state}}))
}

/// A `SET_PUBLISH_PERIOD` command for `device`.
pub fn set_period(id: &str, device: &str, period_ms: u32) -> Vec<u8> {
    body(
        json!({"type": "SET_PUBLISH_PERIOD", "kind": "command", "id": id, "data": {"device_id": device, "period_ms": period_ms}}),
    )
}

/// Properties naming the message by its AMQP `message_id`, so that its
/// copies can be told apart.
pub fn with_id(id: &str) -> BasicProperties {
    BasicProperties::default().with_message_id(ShortString::from(id))
}

/// The AMQP `message_id` of a message taken from a queue.
pub fn message_id(message: &BasicGetMessage) -> String {
    let id = message.delivery.properties.message_id().as_ref();
    id.expect("the message has a message_id").to_string()
}
