//! `DEVICE_DOWN`: a device went offline. Upserts `devices` unless a newer
//! event for the device was applied already; the statement is
//! `DEVICE_UP`'s, which writes both (see `device_up::BULK`).

use serde_json::Value;

use super::fields::{Fields, ValidationError};

/// # Errors
/// A [`ValidationError`] when `device_id` is missing or malformed.
pub fn parse(data: &Value) -> Result<&str, ValidationError> {
    Fields::of(data)?.device_id()
}

/// Applied by `DEVICE_UP`'s statement, with the status `offline`.
pub use super::device_up::apply;

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
