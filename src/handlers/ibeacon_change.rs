//! `IBEACON_CHANGE`: the beacon in range changed. Inserts one row into
//! `beacon_readings`; `data: null` means no beacon is in range and gives a
//! row with null beacon columns.

use futures_util::future::BoxFuture;
use serde_json::Value;
use sqlx::PgConnection;

use super::fields::{Fields, ValidationError};
use super::{Context, Handler, Typed};
use crate::envelope::Message;
use crate::failure::Failure;

/// The validated `data` of an `IBEACON_CHANGE` with a beacon in range.
#[derive(Debug, PartialEq, Eq)]
pub struct Beacon {
    pub mac_address: String,
    pub uuid: String,
    pub major: i32,
    pub minor: i32,
    pub tx_power: i32,
    pub rssi: i32,
}

/// `None` when no beacon is in range.
///
/// # Errors
/// A [`ValidationError`] naming the first bad field.
pub fn parse(data: &Value) -> Result<Option<Beacon>, ValidationError> {
    if data.is_null() {
        return Ok(None);
    }
    let fields = Fields::of(data)?;
    let mac_address = fields.string("mac_address", 1..=64)?;
    if !is_mac(mac_address) {
        return Err(ValidationError::new("mac_address", "must look like 0a:1b:2c:3d:4e:5f"));
    }
    let uuid = fields.string("uuid", 1..=64)?;
    if !is_uuid(uuid) {
        return Err(ValidationError::new(
            "uuid",
            "must be a UUID such as f7826da6-4fa2-4e98-8024-bc5b71e0893e",
        ));
    }
    // The ranges make the casts below lossless.
    Ok(Some(Beacon {
        mac_address: mac_address.to_owned(),
        uuid: uuid.to_owned(),
        major: fields.integer("major", 0..=65_535)? as i32,
        minor: fields.integer("minor", 0..=65_535)? as i32,
        tx_power: fields.integer("tx_power", -128..=127)? as i32,
        rssi: fields.integer("rssi", -128..=127)? as i32,
    }))
}

fn is_mac(text: &str) -> bool {
    text.split([':', '-']).count() == 6
        && text
            .split([':', '-'])
            .all(|part| part.len() == 2 && part.chars().all(|c| c.is_ascii_hexdigit()))
}

fn is_uuid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups.iter().all(|g| g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Beacon readings into `beacon_readings`, with one `INSERT … SELECT FROM
/// UNNEST`.
pub struct Beacons;

pub static BEACONS: Beacons = Beacons;

impl Handler for Beacons {
    /// `None`: no beacon in range.
    type Item = Option<Beacon>;

    fn prepare(&self, message: &Message, _: &Context<'_>) -> Result<Option<Beacon>, Failure> {
        Ok(parse(&message.data)?)
    }

    const KEEPS_MESSAGE: bool = true;

    fn write<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        batch: &'a [Typed<'a, Option<Beacon>>],
    ) -> BoxFuture<'a, Result<(), Failure>> {
        let text = |f: fn(&'a Beacon) -> &'a str| batch.iter().map(|t| t.item.as_ref().map(f)).collect::<Vec<_>>();
        let number = |f: fn(&Beacon) -> i32| batch.iter().map(|t| t.item.as_ref().map(f)).collect::<Vec<_>>();
        let (mac_address, uuid) = (text(|b| &b.mac_address), text(|b| &b.uuid));
        let (major, minor) = (number(|b| b.major), number(|b| b.minor));
        let (tx_power, rssi) = (number(|b| b.tx_power), number(|b| b.rssi));
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO beacon_readings (message_id, mac_address, uuid, major, minor, tx_power, rssi, observed_at)
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int[], $5::int[], $6::int[], $7::int[],
                                      $8::timestamptz[])",
            )
            .bind(batch.iter().map(|t| t.id).collect::<Vec<_>>())
            .bind(mac_address)
            .bind(uuid)
            .bind(major)
            .bind(minor)
            .bind(tx_power)
            .bind(rssi)
            .bind(batch.iter().map(|t| t.time).collect::<Vec<_>>())
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

    fn good() -> Value {
        json!({"mac_address": "0a:1b:2c:3d:4e:5f", "uuid": "f7826da6-4fa2-4e98-8024-bc5b71e0893e",
               "major": 1, "minor": 2, "tx_power": -59, "rssi": -70})
    }

    #[test]
    fn accepts_a_beacon_or_null() {
        assert_eq!(parse(&good()).unwrap().unwrap().rssi, -70);
        assert_eq!(parse(&Value::Null).unwrap(), None);
    }

    #[test]
    fn rejects_bad_fields() {
        for (key, bad) in [
            ("mac_address", json!("0a:1b:2c:3d:4e")),
            ("mac_address", json!("zz:1b:2c:3d:4e:5f")),
            ("uuid", json!("not-a-uuid")),
            ("uuid", json!("f7826da6-4fa2-4e98-8024-bc5b71e0893g")),
            ("major", json!(70_000)),
            ("minor", json!(-1)),
            ("tx_power", json!(200)),
            ("rssi", json!("strong")),
        ] {
            let mut data = good();
            data[key] = bad;
            assert_eq!(parse(&data).unwrap_err().field, key, "{data}");
        }
        assert_eq!(parse(&json!([1])).unwrap_err().field, "");
    }
}
