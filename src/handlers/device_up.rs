//! `DEVICE_UP`: a device came online. Upserts `devices` unless a newer
//! event for the device was applied already.

use futures_util::future::BoxFuture;
use serde_json::Value;
use sqlx::PgConnection;

use super::fields::{Fields, ValidationError};
use super::{Bulk, device_down};
use crate::envelope::Message;
use crate::failure::Failure;

/// The validated `data` of a `DEVICE_UP`.
#[derive(Debug, PartialEq, Eq)]
pub struct DeviceUp<'a> {
    pub device_id: &'a str,
    pub ip: Option<&'a str>,
    /// The status the device reports about itself; kept in `events.data`.
    pub status: Option<&'a str>,
}

/// # Errors
/// A [`ValidationError`] naming the first bad field.
pub fn parse(data: &Value) -> Result<DeviceUp<'_>, ValidationError> {
    let fields = Fields::of(data)?;
    Ok(DeviceUp {
        device_id: fields.device_id()?,
        ip: fields.optional_string("ip", 1..=64)?,
        status: fields.optional_string("status", 0..=64)?,
    })
}

/// One event alone takes the bulk statement too, so the device-state rule
/// is written once.
pub fn apply<'a>(conn: &'a mut PgConnection, message: &'a Message) -> BoxFuture<'a, Result<(), Failure>> {
    Box::pin(async move { apply_many(conn, &[message]).await })
}

/// The bulk path of `DEVICE_UP` and `DEVICE_DOWN` together: one statement
/// writes one row per device of the batch (docs/reliability.md, "Device
/// state"). The newest event by `time` gives status and time; on equal
/// times the later in the batch wins. The `ip` is the newest one the
/// batch's events for the device carry, among those not older than the
/// stored state; none keeps the stored one. The stored row changes only
/// if it is not newer (the same guard as one event at a time).
pub static BULK: Bulk = Bulk {
    check: |message| state_of(message).map(drop).map_err(Failure::from),
    apply_many,
};

/// Status and ip of a `DEVICE_UP` or `DEVICE_DOWN`.
fn state_of(message: &Message) -> Result<(&str, &'static str, Option<&str>), ValidationError> {
    match message.message_type.as_str() {
        "DEVICE_DOWN" => Ok((device_down::parse(&message.data)?, "offline", None)),
        _ => parse(&message.data).map(|up| (up.device_id, "online", up.ip)),
    }
}

fn apply_many<'a>(conn: &'a mut PgConnection, messages: &'a [&'a Message]) -> BoxFuture<'a, Result<(), Failure>> {
    Box::pin(async move {
        let (mut device_id, mut status, mut ip, mut seen_at) = (vec![], vec![], vec![], vec![]);
        for message in messages {
            let (device, state, address) = state_of(message)?;
            device_id.push(device);
            status.push(state);
            ip.push(address);
            seen_at.push(message.time);
        }
        sqlx::query(
            "WITH batch AS (
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamptz[])
                     WITH ORDINALITY AS b (device_id, status, ip, seen_at, n)
             ), newest AS (
                 SELECT DISTINCT ON (device_id) device_id, status, seen_at
                 FROM batch ORDER BY device_id, seen_at DESC, n DESC
             )
             INSERT INTO devices (device_id, status, ip, last_seen_at)
             SELECT nw.device_id, nw.status,
                    (SELECT b.ip FROM batch b
                      WHERE b.device_id = nw.device_id AND b.ip IS NOT NULL
                        AND b.seen_at >= COALESCE(
                            (SELECT d.last_seen_at FROM devices d WHERE d.device_id = nw.device_id),
                            '-infinity')
                      ORDER BY b.seen_at DESC, b.n DESC LIMIT 1),
                    nw.seen_at
             FROM newest nw
             ORDER BY nw.device_id
             ON CONFLICT (device_id) DO UPDATE
             SET status = EXCLUDED.status,
                 ip = COALESCE(EXCLUDED.ip, devices.ip),
                 last_seen_at = EXCLUDED.last_seen_at
             WHERE devices.last_seen_at <= EXCLUDED.last_seen_at",
        )
        .bind(device_id)
        .bind(status)
        .bind(ip)
        .bind(seen_at)
        .execute(conn)
        .await?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn accepts_minimal_and_full_data() {
        assert_eq!(
            parse(&json!({"device_id": "d1"})).unwrap(),
            DeviceUp {
                device_id: "d1",
                ip: None,
                status: None
            }
        );
        let data = json!({"device_id": "d1", "ip": "10.0.0.7", "status": "booting"});
        assert_eq!(parse(&data).unwrap().ip, Some("10.0.0.7"));
    }

    #[test]
    fn rejects_bad_fields() {
        for (data, field) in [
            (json!({}), "device_id"),
            (json!({"device_id": "bad id"}), "device_id"),
            (json!({"device_id": "d1", "ip": 7}), "ip"),
            (json!({"device_id": "d1", "ip": ""}), "ip"),
            (json!({"device_id": "d1", "status": ["x"]}), "status"),
            (json!("d1"), ""),
        ] {
            assert_eq!(parse(&data).unwrap_err().field, field, "{data}");
        }
    }
}
