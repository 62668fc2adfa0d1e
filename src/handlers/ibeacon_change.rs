//! `IBEACON_CHANGE`: the beacon in range changed. Inserts one row into
//! `beacon_readings`; `data: null` means no beacon is in range and gives a
//! row with null beacon columns.

use futures_util::future::BoxFuture;
use serde_json::Value;
use sqlx::PgConnection;

use super::Bulk;
use super::fields::{Fields, ValidationError};
use crate::envelope::Message;
use crate::failure::Failure;

/// The validated `data` of an `IBEACON_CHANGE` with a beacon in range.
#[derive(Debug, PartialEq, Eq)]
pub struct Beacon<'a> {
    pub mac_address: &'a str,
    pub uuid: &'a str,
    pub major: i32,
    pub minor: i32,
    pub tx_power: i32,
    pub rssi: i32,
}

/// `None` when no beacon is in range.
///
/// # Errors
/// A [`ValidationError`] naming the first bad field.
pub fn parse(data: &Value) -> Result<Option<Beacon<'_>>, ValidationError> {
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
        mac_address,
        uuid,
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

pub fn apply<'a>(conn: &'a mut PgConnection, message: &'a Message) -> BoxFuture<'a, Result<(), Failure>> {
    Box::pin(async move {
        let beacon = parse(&message.data)?;
        sqlx::query(
            "INSERT INTO beacon_readings (message_id, mac_address, uuid, major, minor, tx_power, rssi, observed_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&message.id)
        .bind(beacon.as_ref().map(|b| b.mac_address))
        .bind(beacon.as_ref().map(|b| b.uuid))
        .bind(beacon.as_ref().map(|b| b.major))
        .bind(beacon.as_ref().map(|b| b.minor))
        .bind(beacon.as_ref().map(|b| b.tx_power))
        .bind(beacon.as_ref().map(|b| b.rssi))
        .bind(message.time)
        .execute(conn)
        .await?;
        Ok(())
    })
}

/// The bulk path: one `INSERT … SELECT FROM UNNEST` for many readings.
pub static BULK: Bulk = Bulk {
    check: |message| parse(&message.data).map(drop).map_err(Failure::from),
    apply_many,
};

fn apply_many<'a>(conn: &'a mut PgConnection, messages: &'a [&'a Message]) -> BoxFuture<'a, Result<(), Failure>> {
    Box::pin(async move {
        let mut beacons = Vec::with_capacity(messages.len());
        for message in messages {
            beacons.push(parse(&message.data)?);
        }
        let text = |f: fn(&Beacon<'a>) -> &'a str| beacons.iter().map(|b| b.as_ref().map(f)).collect::<Vec<_>>();
        let number = |f: fn(&Beacon<'a>) -> i32| beacons.iter().map(|b| b.as_ref().map(f)).collect::<Vec<_>>();
        sqlx::query(
            "INSERT INTO beacon_readings (message_id, mac_address, uuid, major, minor, tx_power, rssi, observed_at)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int[], $5::int[], $6::int[], $7::int[],
                                  $8::timestamptz[])",
        )
        .bind(messages.iter().map(|m| m.id.as_str()).collect::<Vec<_>>())
        .bind(text(|b| b.mac_address))
        .bind(text(|b| b.uuid))
        .bind(number(|b| b.major))
        .bind(number(|b| b.minor))
        .bind(number(|b| b.tx_power))
        .bind(number(|b| b.rssi))
        .bind(messages.iter().map(|m| m.time).collect::<Vec<_>>())
        .execute(conn)
        .await?;
        Ok(())
    })
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
