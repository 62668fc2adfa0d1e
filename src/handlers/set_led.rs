//! `SET_LED` (command): switch a device's LED. Writes the device message
//! (`led.<device_id>`, body `on`/`off`) to the outbox.

use futures_util::future::BoxFuture;
use serde_json::Value;
use sqlx::PgConnection;

use super::Bulk;
use super::fields::{Fields, ValidationError};
use crate::envelope::Message;
use crate::failure::Failure;
use crate::outbox;

/// The validated `data` of a `SET_LED`: device id and `on`/`off`.
///
/// # Errors
/// A [`ValidationError`] naming the first bad field.
pub fn parse(data: &Value) -> Result<(&str, &str), ValidationError> {
    let fields = Fields::of(data)?;
    let device_id = fields.device_id()?;
    match fields.string("state", 1..=16)? {
        state @ ("on" | "off") => Ok((device_id, state)),
        _ => Err(ValidationError::new("state", "must be \"on\" or \"off\"")),
    }
}

/// The device message: `led.<device_id>`, body `on` or `off`.
///
/// # Errors
/// As [`parse`].
pub fn device_message(data: &Value) -> Result<(String, Vec<u8>), ValidationError> {
    let (device_id, state) = parse(data)?;
    Ok((format!("led.{device_id}"), state.as_bytes().to_vec()))
}

pub fn apply<'a>(conn: &'a mut PgConnection, message: &'a Message) -> BoxFuture<'a, Result<(), Failure>> {
    Box::pin(async move {
        let (routing_key, body) = device_message(&message.data)?;
        outbox::enqueue(conn, &message.id, &routing_key, &body).await?;
        Ok(())
    })
}

/// In a batch: every `SET_LED`'s device message in one statement.
pub static BULK: Bulk = Bulk {
    check: |message| device_message(&message.data).map(drop).map_err(Failure::from),
    apply_many: |conn, messages| super::enqueue_all(conn, messages, device_message),
};

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn validates_state_and_device() {
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
}
