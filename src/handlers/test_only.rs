//! Handlers that exist only to test the fault paths (feature
//! `test-handlers`, never in a release build): `TEST_FLAKY`, `TEST_SLOW`,
//! `TEST_PANIC` and `TEST_ABORT`.

use std::collections::HashMap;
use std::sync::Mutex;

use futures_util::future::BoxFuture;
use sqlx::PgConnection;

use crate::envelope::Message;
use crate::failure::Failure;

/// Runs per message id, across every attempt in this process.
static FLAKY_RUNS: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);

/// Fails transiently on its first `data.fail_first` runs (per message id,
/// in this process), then records a measurement of the run number.
pub fn flaky<'a>(conn: &'a mut PgConnection, message: &'a Message) -> BoxFuture<'a, Result<(), Failure>> {
    Box::pin(async move {
        let fail_first = message
            .data
            .get("fail_first")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        let run = {
            let mut runs = FLAKY_RUNS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let count = runs
                .get_or_insert_with(HashMap::new)
                .entry(message.id.clone())
                .or_insert(0);
            *count += 1;
            *count
        };
        if run <= fail_first {
            let error = std::io::Error::other(format!("TEST_FLAKY transient failure, run {run}"));
            return Err(Failure::Database(sqlx::Error::Io(error)));
        }
        record(conn, message, run as f64).await
    })
}

/// Sleeps `data.seconds` inside the transaction, then records a
/// measurement: work that outlives a short shutdown grace period.
pub fn slow<'a>(conn: &'a mut PgConnection, message: &'a Message) -> BoxFuture<'a, Result<(), Failure>> {
    Box::pin(async move {
        let seconds = message
            .data
            .get("seconds")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(1.0);
        sqlx::query("SELECT pg_sleep($1)")
            .bind(seconds)
            .execute(&mut *conn)
            .await?;
        record(conn, message, seconds).await
    })
}

pub fn panic<'a>(_: &'a mut PgConnection, message: &'a Message) -> BoxFuture<'a, Result<(), Failure>> {
    Box::pin(async move { panic!("TEST_PANIC handler asked to panic by {}", message.id) })
}

/// `TEST_PANIC_CHECK`'s bulk path: its `check` panics when `data.panic` is
/// true, a panic outside any handler run (as a bug in a bulk check would
/// be); the messages that pass are recorded one by one.
pub static PANIC_CHECK_BULK: super::Bulk = super::Bulk {
    check: |message| {
        assert!(
            message.data.get("panic") != Some(&serde_json::Value::Bool(true)),
            "TEST_PANIC_CHECK bulk check asked to panic by {}",
            message.id
        );
        Ok(())
    },
    apply_many: record_many,
};

fn record_many<'a>(conn: &'a mut PgConnection, messages: &'a [&'a Message]) -> BoxFuture<'a, Result<(), Failure>> {
    Box::pin(async move {
        for message in messages {
            record(&mut *conn, message, 1.0).await?;
        }
        Ok(())
    })
}

/// `TEST_PANIC_CHECK` alone: records a measurement (its check ran first).
pub fn recorded<'a>(conn: &'a mut PgConnection, message: &'a Message) -> BoxFuture<'a, Result<(), Failure>> {
    Box::pin(async move {
        (PANIC_CHECK_BULK.check)(message)?;
        record(conn, message, 1.0).await
    })
}

pub fn abort<'a>(_: &'a mut PgConnection, _: &'a Message) -> BoxFuture<'a, Result<(), Failure>> {
    std::process::abort()
}

/// One `measurements` row for the message, so tests can count applications.
async fn record(conn: &mut PgConnection, message: &Message, value: f64) -> Result<(), Failure> {
    sqlx::query(
        "INSERT INTO measurements (message_id, device_id, sensor, value, measured_at)
         VALUES ($1, 'test', $2, $3, now())",
    )
    .bind(&message.id)
    .bind(&message.message_type)
    .bind(value)
    .execute(conn)
    .await?;
    Ok(())
}
