//! Handlers that exist only to test the fault paths (feature
//! `test-handlers`, never in a release build): `TEST_FLAKY`, `TEST_SLOW`,
//! `TEST_PANIC`, `TEST_PANIC_CHECK` and `TEST_ABORT`. They implement the
//! same [`Handler`] as the production types, so a fault test runs the
//! production path: prepare, the inbox statement, one write per batch.
//!
//! Each that writes records one `measurements` row per message (sensor:
//! its type), so tests can count applications.

use std::collections::HashMap;
use std::sync::Mutex;

use futures_util::future::BoxFuture;
use serde_json::Value;
use sqlx::PgConnection;

use super::{Context, Handler, Typed};
use crate::envelope::Message;
use crate::failure::Failure;

/// Runs per message id, across every attempt in this process.
static FLAKY_RUNS: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);

/// `TEST_FLAKY`: fails transiently on the first `data.fail_first` runs of
/// a message (per message id, in this process), with a serialization
/// failure the server raises, then records the run number. A batch fails
/// as a whole while one of its messages does.
pub struct Flaky;

impl Handler for Flaky {
    /// `data.fail_first`.
    type Item = u64;

    const KEEPS_MESSAGE: bool = true;

    fn prepare(&self, message: &Message, _: &Context<'_>) -> Result<u64, Failure> {
        Ok(number(message, "fail_first").map_or(0, |n| n as u64))
    }

    fn write<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        batch: &'a [Typed<'a, u64>],
    ) -> BoxFuture<'a, Result<(), Failure>> {
        let runs: Vec<(u64, u64)> = {
            let mut runs = FLAKY_RUNS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let runs = runs.get_or_insert_with(HashMap::new);
            batch
                .iter()
                .map(|t| {
                    let count = runs.entry(t.id.to_owned()).or_insert(0);
                    *count += 1;
                    (*count, *t.item)
                })
                .collect()
        };
        Box::pin(async move {
            if let Some((run, _)) = runs.iter().find(|(run, fail_first)| run <= fail_first) {
                // A real serialization failure (SQLSTATE 40001) from the
                // server, which aborts the transaction: the transient
                // failure of one message, not of the database.
                let raise = format!(
                    "DO $$ BEGIN RAISE EXCEPTION 'TEST_FLAKY transient failure, run {run}' \
                     USING ERRCODE = 'serialization_failure'; END $$"
                );
                return Err(sqlx::raw_sql(sqlx::AssertSqlSafe(raise))
                    .execute(conn)
                    .await
                    .map_or_else(Failure::Database, |_| {
                        Failure::Panic("TEST_FLAKY: the server did not raise".into())
                    }));
            }
            let values = runs.iter().map(|(run, _)| *run as f64);
            record(conn, "TEST_FLAKY", batch, values).await
        })
    }
}

/// `TEST_SLOW`: sleeps the longest `data.seconds` of its batch inside the
/// transaction, then records: work that outlives a short shutdown grace
/// period.
pub struct Slow;

impl Handler for Slow {
    /// `data.seconds`.
    type Item = f64;

    const KEEPS_MESSAGE: bool = true;

    fn prepare(&self, message: &Message, _: &Context<'_>) -> Result<f64, Failure> {
        Ok(number(message, "seconds").unwrap_or(1.0))
    }

    fn write<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        batch: &'a [Typed<'a, f64>],
    ) -> BoxFuture<'a, Result<(), Failure>> {
        let seconds = batch.iter().map(|t| *t.item).fold(0.0, f64::max);
        Box::pin(async move {
            sqlx::query("SELECT pg_sleep($1)")
                .bind(seconds)
                .execute(&mut *conn)
                .await?;
            record(conn, "TEST_SLOW", batch, batch.iter().map(|t| *t.item)).await
        })
    }
}

/// `TEST_PANIC`: its write panics.
pub struct Panic;

impl Handler for Panic {
    type Item = ();

    fn prepare(&self, _: &Message, _: &Context<'_>) -> Result<(), Failure> {
        Ok(())
    }

    fn write<'a>(&'a self, _: &'a mut PgConnection, batch: &'a [Typed<'a, ()>]) -> BoxFuture<'a, Result<(), Failure>> {
        let ids: Vec<&str> = batch.iter().map(|t| t.id).collect();
        Box::pin(async move { panic!("TEST_PANIC handler asked to panic by {}", ids.join(", ")) })
    }
}

/// `TEST_PANIC_CHECK`: its prepare panics when `data.panic` is true (a
/// panic outside any transaction, as a bug in a type's validation would
/// be); the messages that pass are recorded.
pub struct PanicCheck;

impl Handler for PanicCheck {
    type Item = ();

    const KEEPS_MESSAGE: bool = true;

    fn prepare(&self, message: &Message, _: &Context<'_>) -> Result<(), Failure> {
        assert!(
            message.data.get("panic") != Some(&Value::Bool(true)),
            "TEST_PANIC_CHECK check asked to panic by {}",
            message.id
        );
        Ok(())
    }

    fn write<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        batch: &'a [Typed<'a, ()>],
    ) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(record(conn, "TEST_PANIC_CHECK", batch, batch.iter().map(|_| 1.0)))
    }
}

/// `TEST_ABORT`: its write aborts the process (a crash mid-transaction).
pub struct Abort;

impl Handler for Abort {
    type Item = ();

    fn prepare(&self, _: &Message, _: &Context<'_>) -> Result<(), Failure> {
        Ok(())
    }

    fn write<'a>(&'a self, _: &'a mut PgConnection, _: &'a [Typed<'a, ()>]) -> BoxFuture<'a, Result<(), Failure>> {
        std::process::abort()
    }
}

/// A number in `data`, if there is one.
fn number(message: &Message, name: &str) -> Option<f64> {
    message.data.get(name).and_then(Value::as_f64)
}

/// One `measurements` row per message of `batch`, with the next of
/// `values`, `sensor` as its sensor and the message time, in one
/// statement. It is the message's only row (`KEEPS_MESSAGE`): the view
/// `events` shows it once.
async fn record<T>(
    conn: &mut PgConnection,
    sensor: &str,
    batch: &[Typed<'_, T>],
    values: impl Iterator<Item = f64>,
) -> Result<(), Failure> {
    sqlx::query(
        "INSERT INTO measurements (message_id, device_id, sensor, value, measured_at)
         SELECT id, 'test', $2, value, time FROM UNNEST($1::text[], $3::float8[], $4::timestamptz[]) AS r (id, value, time)",
    )
    .bind(batch.iter().map(|t| t.id).collect::<Vec<_>>())
    .bind(sensor)
    .bind(values.collect::<Vec<_>>())
    .bind(batch.iter().map(|t| t.time).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}
