//! `DEVICE_DOWN`: a device went offline. Upserts `devices` unless a newer
//! event for the device was applied already.

use futures_util::future::BoxFuture;
use serde_json::Value;
use sqlx::PgConnection;

use super::device_up::upsert_device;
use super::fields::{Fields, ValidationError};
use crate::envelope::Message;
use crate::failure::Failure;

/// # Errors
/// A [`ValidationError`] when `device_id` is missing or malformed.
pub fn parse(data: &Value) -> Result<&str, ValidationError> {
    Fields::of(data)?.device_id()
}

pub fn apply<'a>(conn: &'a mut PgConnection, message: &'a Message) -> BoxFuture<'a, Result<(), Failure>> {
    Box::pin(async move {
        let device_id = parse(&message.data)?;
        upsert_device(conn, device_id, "offline", None, message.time).await?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn validates_device_id() {
        assert_eq!(parse(&json!({"device_id": "d-9"})), Ok("d-9"));
        assert_eq!(parse(&json!({})).unwrap_err().field, "device_id");
        assert_eq!(parse(&json!({"device_id": "x/y"})).unwrap_err().field, "device_id");
        assert_eq!(parse(&json!(null)).unwrap_err().field, "");
    }
}
