//! `SET_PUBLISH_PERIOD` (command): set how often a device publishes.
//! Writes the device message (`<device_id>.config`, body the period in ms)
//! to the outbox.

use futures_util::future::BoxFuture;
use serde_json::Value;
use sqlx::PgConnection;

use super::Bulk;
use super::fields::{Fields, ValidationError};
use crate::envelope::Message;
use crate::failure::Failure;
use crate::outbox;

/// The validated `data`: device id and period in milliseconds.
///
/// # Errors
/// A [`ValidationError`] naming the first bad field.
pub fn parse(data: &Value) -> Result<(&str, i64), ValidationError> {
    let fields = Fields::of(data)?;
    Ok((fields.device_id()?, fields.integer("period_ms", 1000..=10_000)?))
}

/// The device message: `<device_id>.config`, body the period in ms.
///
/// # Errors
/// As [`parse`].
pub fn device_message(data: &Value) -> Result<(String, Vec<u8>), ValidationError> {
    let (device_id, period_ms) = parse(data)?;
    Ok((format!("{device_id}.config"), period_ms.to_string().into_bytes()))
}

pub fn apply<'a>(conn: &'a mut PgConnection, message: &'a Message) -> BoxFuture<'a, Result<(), Failure>> {
    Box::pin(async move {
        let (routing_key, body) = device_message(&message.data)?;
        outbox::enqueue(conn, &message.id, &routing_key, &body).await?;
        Ok(())
    })
}

/// In a batch: every `SET_PUBLISH_PERIOD`'s device message in one
/// statement.
pub static BULK: Bulk = Bulk {
    check: |message| device_message(&message.data).map(drop).map_err(Failure::from),
    apply_many: |conn, messages| super::enqueue_all(conn, messages, device_message),
};

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn validates_period_bounds() {
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
}
