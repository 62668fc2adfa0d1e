//! The transactional outbox: device messages that commands produce are
//! written here in the command's transaction, and published afterwards by
//! the relay ([`crate::relay`]) with publisher confirms: at-least-once to
//! the device, exactly-once in the database.
//!
//! One SQL statement per function. A row is *pending* while it is neither
//! published nor failed; the relay claims pending rows with
//! `FOR UPDATE SKIP LOCKED` and a lease, so several workers never claim the
//! same row at the same time.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use tracing::Span;

use crate::telemetry::{self, TraceContext};

/// Exchange that device messages from commands are published to, so MQTT
/// devices get them through RabbitMQ's MQTT plugin.
pub const DEVICE_EXCHANGE: &str = "amq.topic";

/// The `LISTEN` channel a committed outbox insert notifies.
pub const CHANNEL: &str = "iot_outbox";

/// One claimed row, ready to publish.
#[derive(Debug, sqlx::FromRow)]
pub struct Row {
    pub id: i64,
    pub message_id: String,
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub created_at: DateTime<Utc>,
    pub attempts: i32,
    /// The writing command's trace context, when spans are exported.
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

/// What the relay's gauges show.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    pub pending: i64,
    /// Age of the oldest pending row; zero when none is pending.
    pub oldest_pending: Duration,
    pub failed: i64,
}

/// Writes one device message to the outbox, in the caller's transaction,
/// with the trace context of the current span, so that its publish joins
/// the writer's trace: [`enqueue_many`] with one row.
///
/// # Errors
/// The database error.
pub async fn enqueue(
    conn: &mut PgConnection,
    message_id: &str,
    routing_key: &str,
    body: &[u8],
) -> Result<(), sqlx::Error> {
    let trace = telemetry::context_headers(&Span::current());
    let row = Pending {
        message_id,
        routing_key,
        body,
        trace: trace.as_ref(),
    };
    enqueue_many(conn, &[row]).await
}

/// A device message to write, for [`enqueue_many`].
pub struct Pending<'a> {
    pub message_id: &'a str,
    pub routing_key: &'a str,
    pub body: &'a [u8],
    /// The writing command's trace context.
    pub trace: Option<&'a TraceContext>,
}

/// Writes many device messages to the outbox in one statement, in the
/// caller's transaction and in the order given (ids follow it, and the
/// relay publishes by id), each with its command's trace context.
///
/// # Errors
/// The database error.
pub async fn enqueue_many(conn: &mut PgConnection, rows: &[Pending<'_>]) -> Result<(), sqlx::Error> {
    let ids: Vec<&str> = rows.iter().map(|r| r.message_id).collect();
    let keys: Vec<&str> = rows.iter().map(|r| r.routing_key).collect();
    let bodies: Vec<&[u8]> = rows.iter().map(|r| r.body).collect();
    let parents: Vec<Option<&str>> = rows.iter().map(|r| r.trace.map(|t| t.0.as_str())).collect();
    let states: Vec<Option<&str>> = rows.iter().map(|r| r.trace.and_then(|t| t.1.as_deref())).collect();
    sqlx::query(
        "INSERT INTO outbox (message_id, exchange, routing_key, body, traceparent, tracestate)
         SELECT m.message_id, $6, m.routing_key, m.body, m.traceparent, m.tracestate
         FROM UNNEST($1::text[], $2::text[], $3::bytea[], $4::text[], $5::text[]) WITH ORDINALITY
             AS m (message_id, routing_key, body, traceparent, tracestate, n)
         ORDER BY m.n",
    )
    .bind(ids)
    .bind(keys)
    .bind(bodies)
    .bind(parents)
    .bind(states)
    .bind(DEVICE_EXCHANGE)
    .execute(conn)
    .await?;
    Ok(())
}

/// Claims up to `limit` pending rows that are due, oldest first, skipping
/// rows another relay is claiming and rows for `skip_routing_keys` (the
/// devices whose earlier messages this relay has not seen confirmed yet):
/// counts the attempt about to be made and leases each row for `lease` (it
/// is not due again before). Commit at once; the rows come back with their
/// new attempt count, by id.
///
/// # Errors
/// The database error.
pub async fn claim(
    conn: &mut PgConnection,
    limit: i64,
    lease: Duration,
    skip_routing_keys: &[String],
) -> Result<Vec<Row>, sqlx::Error> {
    let mut rows: Vec<Row> = sqlx::query_as(
        "UPDATE outbox SET attempts = attempts + 1,
                next_attempt_at = clock_timestamp() + make_interval(secs => $2)
         WHERE id IN (
             SELECT id FROM outbox
             WHERE published_at IS NULL AND failed_at IS NULL
               AND (next_attempt_at IS NULL OR next_attempt_at <= now())
               AND routing_key <> ALL($3::text[])
             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
         RETURNING id, message_id, exchange, routing_key, body, created_at, attempts, traceparent, tracestate",
    )
    .bind(limit)
    .bind(lease.as_secs_f64())
    .bind(skip_routing_keys)
    .fetch_all(conn)
    .await?;
    rows.sort_by_key(|row| row.id);
    Ok(rows)
}

/// Marks confirmed rows published, at the time of marking (after the
/// confirm). Their attempt was counted when they were claimed.
///
/// # Errors
/// The database error.
pub async fn mark_published(conn: &mut PgConnection, ids: &[i64]) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE outbox SET published_at = clock_timestamp() WHERE id = ANY($1)")
        .bind(ids)
        .execute(conn)
        .await?;
    Ok(())
}

/// Puts a row off after a failed attempt (counted when it was claimed):
/// it is due again after `retry_after`, or, when `give_up`, marked failed
/// and never tried again (it stays in the table, with `last_error`, for
/// an operator).
///
/// # Errors
/// The database error.
pub async fn defer(
    conn: &mut PgConnection,
    id: i64,
    error: &str,
    retry_after: Duration,
    give_up: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE outbox SET last_error = $2,
                next_attempt_at = clock_timestamp() + make_interval(secs => $3),
                failed_at = CASE WHEN $4 THEN clock_timestamp() END
         WHERE id = $1",
    )
    .bind(id)
    .bind(error)
    .bind(retry_after.as_secs_f64())
    .bind(give_up)
    .execute(conn)
    .await?;
    Ok(())
}

/// Counts pending and failed rows and the age of the oldest pending one.
///
/// # Errors
/// The database error.
pub async fn stats(pool: &PgPool) -> Result<Stats, sqlx::Error> {
    let (pending, oldest_seconds, failed): (i64, f64, i64) = sqlx::query_as(
        "SELECT count(*),
                COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8,
                (SELECT count(*) FROM outbox WHERE failed_at IS NOT NULL)
         FROM outbox WHERE published_at IS NULL AND failed_at IS NULL",
    )
    .fetch_one(pool)
    .await?;
    Ok(Stats {
        pending,
        oldest_pending: Duration::from_secs_f64(oldest_seconds.max(0.0)),
        failed,
    })
}

/// Deletes up to `limit` rows published more than `retention` ago.
/// Returns how many went.
///
/// # Errors
/// The database error.
pub async fn delete_published_before(pool: &PgPool, retention: Duration, limit: i64) -> Result<u64, sqlx::Error> {
    let result = sqlx::query(
        "DELETE FROM outbox WHERE id IN (
             SELECT id FROM outbox WHERE published_at < now() - make_interval(secs => $1) LIMIT $2)",
    )
    .bind(retention.as_secs_f64())
    .bind(limit)
    .execute(pool)
    .await?;
    Ok(result.rows_affected())
}
