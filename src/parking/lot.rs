//! The statements that fill and keep the lot: storing a batch of parkings
//! (one row per message, docs/reliability.md, "The parking lot"), the
//! counts behind `iot_parked_messages`, and retention. One statement per
//! function.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};

use super::record::Parking;

/// What storing one batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stored {
    /// New rows.
    pub new: u64,
    /// Rows parked again after a retry (`times_parked` + 1).
    pub again: u64,
    /// Copies of a parking already stored: nothing changed.
    pub duplicates: u64,
}

/// Keeps one parking per message id: the one with the highest
/// `iot-requeue-count`, the first of equals. One `INSERT … ON CONFLICT`
/// cannot touch a row twice.
fn latest_per_message(parkings: &[Parking]) -> Vec<&Parking> {
    let mut chosen: HashMap<&str, &Parking> = HashMap::with_capacity(parkings.len());
    for p in parkings {
        chosen
            .entry(p.message_id.as_str())
            .and_modify(|kept| {
                if p.requeue_count > kept.requeue_count {
                    *kept = p;
                }
            })
            .or_insert(p);
    }
    let mut rows: Vec<&Parking> = chosen.into_values().collect();
    // In message id order, so two keepers storing overlapping batches lock
    // the rows in the same order.
    rows.sort_by(|a, b| a.message_id.cmp(&b.message_id));
    rows
}

/// Stores `parkings` of main queue `queue` in one statement (the caller's
/// transaction or autocommit), the rule of docs/reliability.md, "The
/// parking lot": a message not in the lot becomes a row; one whose row
/// holds a lower `requeue_count` failed again after a retry and goes back
/// to `parked` with `times_parked` + 1 and its latest error, headers, body
/// and properties; any other copy is the same parking again and changes
/// nothing. Each row written (new or parked again) also gets its row in
/// `parkings`, the message's history, in the same statement: the history
/// never misses a parking the lot counts, nor holds one it does not.
/// Several keepers may store the same message at once: the unique key
/// serialises them.
///
/// # Errors
/// The database error; nothing is stored then.
pub async fn store(conn: &mut PgConnection, queue: &str, parkings: &[Parking]) -> Result<Stored, sqlx::Error> {
    let rows = latest_per_message(parkings);
    let column = |f: fn(&Parking) -> Option<&str>| rows.iter().map(|p| f(p)).collect::<Vec<_>>();
    let inserted: Vec<bool> = sqlx::query_scalar(
        "WITH input AS (
             SELECT * FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::jsonb[],
                                  $8::bytea[], $9::jsonb[], $10::bytea[], $11::int[], $12::timestamptz[],
                                  $13::bigint[])
                 AS i (message_id, message_type, error_kind, error, fingerprint, headers, body, properties,
                       amqp_properties, requeue_count, failed_at, retry_count)),
         stored AS (
             INSERT INTO parked_messages AS p
                 (queue, message_id, message_type, error_kind, error, fingerprint, headers, body,
                  properties, amqp_properties, requeue_count, failed_at)
             SELECT $1, message_id, message_type, error_kind, error, fingerprint, headers, body,
                    properties, amqp_properties, requeue_count, failed_at FROM input
             ON CONFLICT (queue, message_id) DO UPDATE SET
                 message_type = EXCLUDED.message_type, error_kind = EXCLUDED.error_kind,
                 error = EXCLUDED.error, fingerprint = EXCLUDED.fingerprint, headers = EXCLUDED.headers,
                 body = EXCLUDED.body, properties = EXCLUDED.properties,
                 amqp_properties = EXCLUDED.amqp_properties, requeue_count = EXCLUDED.requeue_count,
                 failed_at = EXCLUDED.failed_at, status = 'parked', times_parked = p.times_parked + 1,
                 last_parked_at = now(), status_changed_at = now(), status_changed_by = NULL
             WHERE p.requeue_count < EXCLUDED.requeue_count
             RETURNING id, message_id, last_parked_at, xmax = 0 AS is_new),
         history AS (
             INSERT INTO parkings (parked_id, queue, at, error_kind, error, fingerprint, retry_count,
                                   requeue_count, failed_at)
             SELECT s.id, $1, s.last_parked_at, i.error_kind, i.error, i.fingerprint, i.retry_count,
                    i.requeue_count, i.failed_at
             FROM stored s JOIN input i USING (message_id))
         SELECT is_new FROM stored",
    )
    .bind(queue)
    .bind(column(|p| Some(p.message_id.as_str())))
    .bind(column(|p| p.message_type.as_deref()))
    .bind(column(|p| Some(p.error_kind.as_str())))
    .bind(column(|p| Some(p.error.as_str())))
    .bind(column(|p| Some(p.fingerprint.as_str())))
    .bind(rows.iter().map(|p| Json(&p.headers)).collect::<Vec<_>>())
    .bind(rows.iter().map(|p| p.body.as_slice()).collect::<Vec<_>>())
    .bind(rows.iter().map(|p| Json(&p.properties)).collect::<Vec<_>>())
    .bind(rows.iter().map(|p| p.amqp_properties.as_slice()).collect::<Vec<_>>())
    .bind(rows.iter().map(|p| p.requeue_count).collect::<Vec<_>>())
    .bind(rows.iter().map(|p| p.failed_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|p| p.retry_count).collect::<Vec<_>>())
    .fetch_all(conn)
    .await?;
    let new = inserted.iter().filter(|&&new| new).count() as u64;
    let again = inserted.len() as u64 - new;
    Ok(Stored {
        new,
        again,
        duplicates: parkings.len() as u64 - new - again,
    })
}

/// Rows of `queue`'s lot by status, every status present (0 when none).
///
/// # Errors
/// The database error.
pub async fn counts(pool: &PgPool, queue: &str) -> Result<Vec<(&'static str, i64)>, sqlx::Error> {
    let found: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM parked_messages WHERE queue = $1 GROUP BY status")
            .bind(queue)
            .fetch_all(pool)
            .await?;
    Ok(super::Status::ALL
        .iter()
        .map(|status| {
            let n = found.iter().find(|(s, _)| s == status.as_str()).map_or(0, |(_, n)| *n);
            (status.as_str(), n)
        })
        .collect())
}

/// Deletes up to `chunk` `retried` and `archived` rows whose status changed
/// more than `retention` ago, with their history (`parkings` and edits
/// cascade); `parked` rows are never deleted. Returns how many went.
///
/// # Errors
/// The database error.
pub async fn delete_expired(pool: &PgPool, retention: Duration, chunk: i64) -> Result<u64, sqlx::Error> {
    let seconds = i64::try_from(retention.as_secs()).unwrap_or(i64::MAX);
    let done = sqlx::query(
        "DELETE FROM parked_messages WHERE id IN (
             SELECT id FROM parked_messages
             WHERE status <> 'parked' AND status_changed_at < now() - make_interval(secs => $1)
             LIMIT $2)",
    )
    .bind(seconds as f64)
    .bind(chunk)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

#[cfg(test)]
mod tests {
    use lapin::BasicProperties;

    use super::*;

    #[test]
    fn a_batch_keeps_the_latest_parking_of_each_message() {
        let parking = |id: &str, requeues: i32| Parking {
            requeue_count: requeues,
            ..Parking::of(&BasicProperties::default().with_message_id(id.into()), id.as_bytes())
        };
        let batch = [parking("b", 0), parking("a", 0), parking("b", 1), parking("a", 0)];
        let kept: Vec<(&str, i32)> = latest_per_message(&batch)
            .iter()
            .map(|p| (p.message_id.as_str(), p.requeue_count))
            .collect();
        assert_eq!(kept, [("a", 0), ("b", 1)]);
    }
}
