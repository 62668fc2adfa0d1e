//! Failures over time (docs/console.md, "The pages"): messages
//! parked per hour and kind over the last days, and the groups that grew
//! lately, read from `parkings` (every parking, not only the latest) with
//! one index range each.

use std::collections::BTreeMap;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use serde::Serialize;
use sqlx::PgPool;

/// Hours the chart covers: 7 days.
pub const HOURS: i64 = 7 * 24;

/// The parkings of one hour that had any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hour {
    /// The hour's start.
    pub hour: DateTime<Utc>,
    pub total: i64,
    /// Parkings by error kind.
    pub kinds: BTreeMap<String, i64>,
}

/// A group (fingerprint) parked into within the last hour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Grown {
    pub fingerprint: String,
    pub error_kind: String,
    /// Parkings in the last hour.
    pub added: i64,
}

/// The start of the first hour of the chart ending in the hour of `now`.
pub fn first_hour(now: DateTime<Utc>) -> DateTime<Utc> {
    let hour = now.duration_trunc(TimeDelta::hours(1)).unwrap_or(now);
    hour - TimeDelta::hours(HOURS - 1)
}

/// Messages of `queue` parked per hour since `from`, by kind, oldest hour
/// first; hours without a parking are left out.
///
/// # Errors
/// The database error.
pub async fn per_hour(pool: &PgPool, queue: &str, from: DateTime<Utc>) -> Result<Vec<Hour>, sqlx::Error> {
    let rows: Vec<(DateTime<Utc>, String, i64)> = sqlx::query_as(
        "SELECT date_trunc('hour', at) AS hour, error_kind, count(*) FROM parkings
         WHERE queue = $1 AND at >= $2 GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .bind(queue)
    .bind(from)
    .fetch_all(pool)
    .await?;
    let mut hours: Vec<Hour> = Vec::new();
    for (hour, kind, count) in rows {
        match hours.last_mut() {
            Some(last) if last.hour == hour => {
                last.total += count;
                last.kinds.insert(kind, count);
            }
            _ => hours.push(Hour {
                hour,
                total: count,
                kinds: BTreeMap::from([(kind, count)]),
            }),
        }
    }
    Ok(hours)
}

/// The groups of `queue` parked into since `since`, most first.
///
/// # Errors
/// The database error.
pub async fn grown(pool: &PgPool, queue: &str, since: DateTime<Utc>, limit: i64) -> Result<Vec<Grown>, sqlx::Error> {
    sqlx::query_as(
        "SELECT fingerprint, min(error_kind) AS error_kind, count(*) AS added FROM parkings
         WHERE queue = $1 AND at >= $2 GROUP BY fingerprint ORDER BY count(*) DESC, fingerprint LIMIT $3",
    )
    .bind(queue)
    .bind(since)
    .bind(limit)
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_ends_with_the_current_hour() {
        let now = DateTime::parse_from_rfc3339("2026-01-08T10:42:07Z")
            .unwrap()
            .with_timezone(&Utc);
        let first = first_hour(now);
        assert_eq!(first.to_rfc3339(), "2026-01-01T11:00:00+00:00");
        assert_eq!((now - first).num_hours(), HOURS - 1);
    }
}
