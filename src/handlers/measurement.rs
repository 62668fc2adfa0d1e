//! `MEASUREMENT`: one sensor reading, inserted into `measurements`.

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use serde_json::Value;
use sqlx::PgConnection;

use super::Bulk;
use super::fields::{Fields, ValidationError};
use crate::envelope::Message;
use crate::failure::Failure;

/// The validated `data` of a `MEASUREMENT`.
#[derive(Debug, PartialEq)]
pub struct Measurement<'a> {
    pub device_id: &'a str,
    pub sensor: &'a str,
    pub value: f64,
    pub unit: Option<&'a str>,
    /// When it was measured; the message time when absent.
    pub time: Option<DateTime<Utc>>,
}

/// # Errors
/// A [`ValidationError`] naming the first bad field.
pub fn parse(data: &Value) -> Result<Measurement<'_>, ValidationError> {
    let fields = Fields::of(data)?;
    Ok(Measurement {
        device_id: fields.device_id()?,
        sensor: fields.string("sensor", 1..=64)?,
        value: fields.finite_number("value")?,
        unit: fields.optional_string("unit", 1..=32)?,
        time: fields.optional_time("time")?,
    })
}

pub fn apply<'a>(conn: &'a mut PgConnection, message: &'a Message) -> BoxFuture<'a, Result<(), Failure>> {
    Box::pin(async move {
        let m = parse(&message.data)?;
        sqlx::query(
            "INSERT INTO measurements (message_id, device_id, sensor, value, unit, measured_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&message.id)
        .bind(m.device_id)
        .bind(m.sensor)
        .bind(m.value)
        .bind(m.unit)
        .bind(m.time.unwrap_or(message.time))
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
        let mut columns = Columns::default();
        for message in messages {
            let m = parse(&message.data)?;
            columns.message_id.push(message.id.as_str());
            columns.device_id.push(m.device_id);
            columns.sensor.push(m.sensor);
            columns.value.push(m.value);
            columns.unit.push(m.unit);
            columns.measured_at.push(m.time.unwrap_or(message.time));
        }
        sqlx::query(
            "INSERT INTO measurements (message_id, device_id, sensor, value, unit, measured_at)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::float8[], $5::text[], $6::timestamptz[])",
        )
        .bind(columns.message_id)
        .bind(columns.device_id)
        .bind(columns.sensor)
        .bind(columns.value)
        .bind(columns.unit)
        .bind(columns.measured_at)
        .execute(conn)
        .await?;
        Ok(())
    })
}

/// The `measurements` columns of many readings, for `UNNEST`.
#[derive(Default)]
struct Columns<'a> {
    message_id: Vec<&'a str>,
    device_id: Vec<&'a str>,
    sensor: Vec<&'a str>,
    value: Vec<f64>,
    unit: Vec<Option<&'a str>>,
    measured_at: Vec<DateTime<Utc>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn accepts_a_reading() {
        let data = json!({"device_id": "d1", "sensor": "temp", "value": 21.5, "unit": "C",
                          "time": "2026-01-01T00:00:00Z"});
        let m = parse(&data).unwrap();
        assert_eq!(
            (m.device_id, m.sensor, m.value, m.unit),
            ("d1", "temp", 21.5, Some("C"))
        );
        assert!(m.time.is_some());
        assert_eq!(
            parse(&json!({"device_id": "d1", "sensor": "t", "value": -3}))
                .unwrap()
                .value,
            -3.0
        );
    }

    #[test]
    fn rejects_bad_fields() {
        for (data, field) in [
            (json!({"sensor": "t", "value": 1}), "device_id"),
            (json!({"device_id": "d1", "value": 1}), "sensor"),
            (json!({"device_id": "d1", "sensor": "", "value": 1}), "sensor"),
            (json!({"device_id": "d1", "sensor": "t"}), "value"),
            (json!({"device_id": "d1", "sensor": "t", "value": "21.5"}), "value"),
            (json!({"device_id": "d1", "sensor": "t", "value": 1, "unit": 5}), "unit"),
            (
                json!({"device_id": "d1", "sensor": "t", "value": 1, "time": "noon"}),
                "time",
            ),
        ] {
            assert_eq!(parse(&data).unwrap_err().field, field, "{data}");
        }
    }
}
