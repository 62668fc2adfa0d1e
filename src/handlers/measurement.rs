//! `MEASUREMENT`: one sensor reading, inserted into `measurements`.

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use serde_json::Value;
use sqlx::PgConnection;

use super::fields::{Fields, ValidationError};
use super::{Context, Handler, Typed};
use crate::envelope::Message;
use crate::failure::Failure;

/// The validated `data` of a `MEASUREMENT`.
#[derive(Debug, PartialEq)]
pub struct Measurement {
    pub device_id: String,
    pub sensor: String,
    pub value: f64,
    pub unit: Option<String>,
    /// When it was measured; the message time when absent.
    pub time: Option<DateTime<Utc>>,
}

/// # Errors
/// A [`ValidationError`] naming the first bad field.
pub fn parse(data: &Value) -> Result<Measurement, ValidationError> {
    let fields = Fields::of(data)?;
    Ok(Measurement {
        device_id: fields.device_id()?.to_owned(),
        sensor: fields.string("sensor", 1..=64)?.to_owned(),
        value: fields.finite_number("value")?,
        unit: fields.optional_string("unit", 1..=32)?.map(str::to_owned),
        time: fields.optional_time("time")?,
    })
}

/// Readings into `measurements`, with one `INSERT … SELECT FROM UNNEST`.
pub struct Measurements;

pub static MEASUREMENTS: Measurements = Measurements;

impl Handler for Measurements {
    type Item = Measurement;

    fn prepare(&self, message: &Message, _: &Context<'_>) -> Result<Measurement, Failure> {
        Ok(parse(&message.data)?)
    }

    fn device_id(item: &Measurement) -> Option<&str> {
        Some(&item.device_id)
    }

    const KEEPS_MESSAGE: bool = true;

    fn stored_time(item: &Measurement) -> Option<DateTime<Utc>> {
        item.time
    }

    fn write<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        batch: &'a [Typed<'a, Measurement>],
    ) -> BoxFuture<'a, Result<(), Failure>> {
        let column = |f: fn(&'a Typed<'a, Measurement>) -> &'a str| batch.iter().map(f).collect::<Vec<_>>();
        let message_id = column(|t| t.id);
        let device_id = column(|t| &t.item.device_id);
        let sensor = column(|t| &t.item.sensor);
        let value: Vec<f64> = batch.iter().map(|t| t.item.value).collect();
        let unit: Vec<Option<&str>> = batch.iter().map(|t| t.item.unit.as_deref()).collect();
        let measured_at: Vec<DateTime<Utc>> = batch.iter().map(|t| t.item.time.unwrap_or(t.time)).collect();
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO measurements (message_id, device_id, sensor, value, unit, measured_at)
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::float8[], $5::text[], $6::timestamptz[])",
            )
            .bind(message_id)
            .bind(device_id)
            .bind(sensor)
            .bind(value)
            .bind(unit)
            .bind(measured_at)
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
    fn accepts_a_reading() {
        let data = json!({"device_id": "d1", "sensor": "temp", "value": 21.5, "unit": "C",
                          "time": "2026-01-01T00:00:00Z"});
        let m = parse(&data).unwrap();
        assert_eq!(
            (m.device_id.as_str(), m.sensor.as_str(), m.value, m.unit.as_deref()),
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
