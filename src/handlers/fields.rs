//! Typed readers for the fields of a message's `data`, shared by the
//! handlers. Each failure is a [`ValidationError`] that names the field.

use std::ops::RangeInclusive;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::envelope::{parse_time, truncate_chars};
pub use crate::failure::ValidationError;

/// The `data` object of a message.
pub struct Fields<'a>(&'a Map<String, Value>);

impl<'a> Fields<'a> {
    /// # Errors
    /// When `data` is not an object.
    pub fn of(data: &'a Value) -> Result<Fields<'a>, ValidationError> {
        match data {
            Value::Object(map) => Ok(Fields(map)),
            _ => Err(ValidationError::new("", "must be a JSON object")),
        }
    }

    fn present(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    /// A required string of `chars` characters.
    pub fn string(&self, name: &str, chars: RangeInclusive<usize>) -> Result<&'a str, ValidationError> {
        self.optional_string(name, chars)?
            .ok_or_else(|| ValidationError::new(name, "is required"))
    }

    /// An optional string of `chars` characters.
    pub fn optional_string(
        &self,
        name: &str,
        chars: RangeInclusive<usize>,
    ) -> Result<Option<&'a str>, ValidationError> {
        match self.present(name) {
            None => Ok(None),
            Some(Value::String(s)) => {
                let n = s.chars().count();
                if chars.contains(&n) {
                    Ok(Some(s))
                } else {
                    Err(ValidationError::new(
                        name,
                        format!("must be {} to {} characters, found {n}", chars.start(), chars.end()),
                    ))
                }
            }
            Some(_) => Err(ValidationError::new(name, "must be a string")),
        }
    }

    /// `device_id`: `[A-Za-z0-9_.:-]{1,64}`.
    pub fn device_id(&self) -> Result<&'a str, ValidationError> {
        let id = self
            .present("device_id")
            .ok_or_else(|| ValidationError::new("device_id", "is required"))?;
        match id {
            Value::String(s)
                if (1..=64).contains(&s.len())
                    && s.chars().all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c)) =>
            {
                Ok(s)
            }
            Value::String(s) => Err(ValidationError::new(
                "device_id",
                format!(
                    "must match [A-Za-z0-9_.:-]{{1,64}}, found \"{}\"",
                    truncate_chars(s, 80)
                ),
            )),
            _ => Err(ValidationError::new("device_id", "must be a string")),
        }
    }

    /// A required finite number.
    pub fn finite_number(&self, name: &str) -> Result<f64, ValidationError> {
        match self.present(name) {
            None => Err(ValidationError::new(name, "is required")),
            Some(Value::Number(n)) => n
                .as_f64()
                .filter(|v| v.is_finite())
                .ok_or_else(|| ValidationError::new(name, "must be a finite number")),
            Some(_) => Err(ValidationError::new(name, "must be a number")),
        }
    }

    /// A required whole number within `range`.
    pub fn integer(&self, name: &str, range: RangeInclusive<i64>) -> Result<i64, ValidationError> {
        let out_of_range = || {
            ValidationError::new(
                name,
                format!("must be a whole number from {} to {}", range.start(), range.end()),
            )
        };
        match self.present(name) {
            None => Err(ValidationError::new(name, "is required")),
            Some(Value::Number(n)) => n.as_i64().filter(|v| range.contains(v)).ok_or_else(out_of_range),
            Some(_) => Err(out_of_range()),
        }
    }

    /// An optional RFC 3339 / ISO-8601 time (no offset means UTC).
    pub fn optional_time(&self, name: &str) -> Result<Option<DateTime<Utc>>, ValidationError> {
        match self.present(name) {
            None => Ok(None),
            Some(Value::String(s)) => parse_time(s).map(Some).map_err(|p| ValidationError::new(name, p)),
            Some(_) => Err(ValidationError::new(name, "must be a time string")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn data_must_be_an_object() {
        assert!(Fields::of(&json!([1])).is_err());
        assert!(Fields::of(&json!(null)).is_err());
        assert!(Fields::of(&json!({})).is_ok());
    }

    #[test]
    fn device_id_rules() {
        let ok = |v: Value| {
            Fields::of(&json!({ "device_id": v }))
                .unwrap()
                .device_id()
                .map(str::to_owned)
        };
        assert_eq!(ok(json!("dev-1_a.b:c")).unwrap(), "dev-1_a.b:c");
        assert!(ok(json!("")).is_err());
        assert!(ok(json!("a b")).is_err());
        assert!(ok(json!("d".repeat(65))).is_err());
        assert!(ok(json!("d".repeat(64))).is_ok());
        assert!(ok(json!(7)).is_err());
        assert!(Fields::of(&json!({})).unwrap().device_id().is_err());
    }

    #[test]
    fn integer_and_number_rules() {
        let f = json!({"a": 5, "b": 5.5, "c": "5", "d": 1e300});
        let f = Fields::of(&f).unwrap();
        assert_eq!(f.integer("a", 0..=10), Ok(5));
        assert!(f.integer("a", 6..=10).is_err());
        assert!(f.integer("b", 0..=10).is_err());
        assert!(f.integer("c", 0..=10).is_err());
        assert_eq!(f.finite_number("b"), Ok(5.5));
        assert_eq!(f.finite_number("d"), Ok(1e300));
        assert!(f.finite_number("c").is_err());
        assert!(f.finite_number("missing").is_err());
    }
}
