//! `DEVICE_UP` and `DEVICE_DOWN`: a device came online or went offline.
//! Both upsert `devices` with one statement, unless a newer event for the
//! device was applied already (docs/reliability.md, "Device state").

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use serde_json::Value;
use sqlx::PgConnection;

use super::fields::{Fields, ValidationError};
use super::{Context, Handler, Typed};
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
pub fn parse_up(data: &Value) -> Result<DeviceUp<'_>, ValidationError> {
    let fields = Fields::of(data)?;
    Ok(DeviceUp {
        device_id: fields.device_id()?,
        ip: fields.optional_string("ip", 1..=64)?,
        status: fields.optional_string("status", 0..=64)?,
    })
}

/// The validated `data` of a `DEVICE_DOWN`: its device id.
///
/// # Errors
/// A [`ValidationError`] when `device_id` is missing or malformed.
pub fn parse_down(data: &Value) -> Result<&str, ValidationError> {
    Fields::of(data)?.device_id()
}

/// What a `DEVICE_UP` or `DEVICE_DOWN` says of its device.
#[derive(Debug, PartialEq, Eq)]
pub struct DeviceState {
    pub device_id: String,
    pub status: Status,
    /// Only a `DEVICE_UP` carries one.
    pub ip: Option<String>,
}

/// `devices.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Online,
    Offline,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Online => "online",
            Status::Offline => "offline",
        }
    }
}

/// Device state into `devices`: one row per device of the batch. The
/// routes of both types share the statement (see [`super::Route`]).
pub struct Devices {
    /// What the type says of its device.
    pub status: Status,
}

pub static DEVICE_UP: Devices = Devices { status: Status::Online };
pub static DEVICE_DOWN: Devices = Devices {
    status: Status::Offline,
};

impl Handler for Devices {
    type Item = DeviceState;

    fn prepare(&self, message: &Message, _: &Context<'_>) -> Result<DeviceState, Failure> {
        let (device_id, ip) = match self.status {
            Status::Online => {
                let up = parse_up(&message.data)?;
                (up.device_id, up.ip)
            }
            Status::Offline => (parse_down(&message.data)?, None),
        };
        Ok(DeviceState {
            device_id: device_id.to_owned(),
            status: self.status,
            ip: ip.map(str::to_owned),
        })
    }

    fn device_id(item: &DeviceState) -> Option<&str> {
        Some(&item.device_id)
    }

    /// The newest event by `time` gives status and time; on equal times the
    /// later in the batch wins. The `ip` is the newest one the batch's
    /// events for the device carry, among those not older than the stored
    /// state; none keeps the stored one. The stored row changes only if it
    /// is not newer.
    fn write<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        batch: &'a [Typed<'a, DeviceState>],
    ) -> BoxFuture<'a, Result<(), Failure>> {
        let device_id: Vec<&str> = batch.iter().map(|t| t.item.device_id.as_str()).collect();
        let status: Vec<&str> = batch.iter().map(|t| t.item.status.as_str()).collect();
        let ip: Vec<Option<&str>> = batch.iter().map(|t| t.item.ip.as_deref()).collect();
        let seen_at: Vec<DateTime<Utc>> = batch.iter().map(|t| t.time).collect();
        Box::pin(async move {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn accepts_minimal_and_full_data() {
        assert_eq!(
            parse_up(&json!({"device_id": "d1"})).unwrap(),
            DeviceUp {
                device_id: "d1",
                ip: None,
                status: None
            }
        );
        let data = json!({"device_id": "d1", "ip": "10.0.0.7", "status": "booting"});
        assert_eq!(parse_up(&data).unwrap().ip, Some("10.0.0.7"));
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
            assert_eq!(parse_up(&data).unwrap_err().field, field, "{data}");
        }
    }

    #[test]
    fn down_validates_device_id() {
        assert_eq!(parse_down(&json!({"device_id": "d-9"})), Ok("d-9"));
        assert_eq!(parse_down(&json!({})).unwrap_err().field, "device_id");
        assert_eq!(parse_down(&json!({"device_id": "x/y"})).unwrap_err().field, "device_id");
        assert_eq!(parse_down(&json!(null)).unwrap_err().field, "");
    }
}
