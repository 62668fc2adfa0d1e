//! What an operator does to parked messages, for `requeue` and the
//! console alike (docs/operations.md, "The parking lot"): retry, archive and
//! unarchive the messages a [`Filter`] matches, each action written to
//! `operator_actions` with its actor, filter and count.
//!
//! An action works in batches, oldest parking first. Each batch is one
//! transaction: lock the batch's rows (`FOR UPDATE SKIP LOCKED`, so two
//! operators never take the same row), for a retry publish every message
//! to the target with confirms, then mark the confirmed rows and count them
//! on the action, and commit. A crash (even `kill -9`) after the confirms
//! and before the commit leaves those rows `parked`, to be sent again by
//! the next retry: a message may be sent twice (the inbox absorbs it),
//! never marked `retried` without having been published, and at most one
//! batch is sent twice.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use lapin::types::FieldTable;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use super::query::{bind_filter, matching};
use super::record::decode_properties;
use super::{Filter, Status};
use crate::broker::{Outgoing, PublishError, Publisher};
use crate::headers::{self, RETRY_COUNT};

/// Rows taken per batch (without `--rate`).
pub const BATCH_SIZE: u64 = 100;

/// What to do to the matching messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Publish to `target` with the requeue headers, then mark `retried`.
    Retry { target: String, keep_retry_count: bool },
    /// Mark `archived`: hidden from the default views, kept until
    /// retention.
    Archive,
    /// Mark an archived message `parked` again.
    Unarchive,
}

impl Action {
    /// The `action` column's word.
    pub fn as_str(&self) -> &'static str {
        match self {
            Action::Retry { .. } => "retry",
            Action::Archive => "archive",
            Action::Unarchive => "unarchive",
        }
    }

    /// The status it takes messages from, when the filter names none.
    pub fn from_status(&self) -> Status {
        match self {
            Action::Retry { .. } | Action::Archive => Status::Parked,
            Action::Unarchive => Status::Archived,
        }
    }

    /// The status it leaves them in.
    pub fn to_status(&self) -> Status {
        match self {
            Action::Retry { .. } => Status::Retried,
            Action::Archive => Status::Archived,
            Action::Unarchive => Status::Parked,
        }
    }
}

/// Which messages, how many, how fast, and who asks.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// The main queue `Q` whose lot it is.
    pub queue: &'a str,
    pub filter: &'a Filter,
    /// At most this many messages.
    pub limit: Option<u64>,
    /// At most this many messages per second.
    pub rate: Option<f64>,
    /// Written as `status_changed_by` and in `operator_actions`.
    pub actor: &'a str,
}

/// A finished (or interrupted) action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    /// Its `operator_actions` row.
    pub action_id: i64,
    /// Messages it changed.
    pub messages: u64,
    /// Stopped by the stop token between two batches.
    pub interrupted: bool,
}

/// An action that stopped. What it had committed stays done and counted.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("PostgreSQL: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{source}; the message stays parked ({done} done before)")]
    Publish {
        #[source]
        source: PublishError,
        done: u64,
    },
    #[error("the stored properties of parked message {0} cannot be read; it stays parked")]
    Unreadable(String),
}

/// One locked row of a batch.
#[derive(sqlx::FromRow)]
struct Row {
    id: i64,
    message_id: String,
    last_parked_at: DateTime<Utc>,
    body: Vec<u8>,
    amqp_properties: Vec<u8>,
}

/// Runs `action` on the messages `request` matches, in batches, calling
/// `progress` with the running count after each. `stop` is checked between
/// batches and while a paced action waits; a batch under way finishes.
///
/// # Errors
/// An [`ActionError`]; the batches committed before it stay done.
pub async fn run(
    pool: &PgPool,
    publisher: Option<&Publisher>,
    request: &Request<'_>,
    action: &Action,
    stop: &CancellationToken,
    progress: impl FnMut(u64),
) -> Result<Done, ActionError> {
    let action_id = start(pool, request, action).await?;
    carry_out(pool, publisher, request, action, action_id, stop, progress).await
}

/// [`run`] for an action already written by [`start`] (the console's
/// paced retries show its id before the first batch).
///
/// # Errors
/// As [`run`].
pub async fn carry_out(
    pool: &PgPool,
    publisher: Option<&Publisher>,
    request: &Request<'_>,
    action: &Action,
    action_id: i64,
    stop: &CancellationToken,
    mut progress: impl FnMut(u64),
) -> Result<Done, ActionError> {
    let step = Step {
        publisher,
        request,
        action,
        action_id,
    };
    let mut done = Done {
        action_id,
        messages: 0,
        interrupted: false,
    };
    // Before any parking: `last_parked_at` is always a real time.
    let mut after = (DateTime::<Utc>::default(), 0);
    let started = Instant::now();
    loop {
        let room = request.limit.map_or(u64::MAX, |l| l.saturating_sub(done.messages));
        let size = batch_size(request.rate).min(room);
        if size == 0 {
            return Ok(done);
        }
        let paced = async {
            if let Some(rate) = request.rate {
                pace(started, done.messages, rate).await;
            }
        };
        let stopped = tokio::select! {
            biased;
            () = stop.cancelled() => true,
            () = paced => false,
        };
        if stopped {
            done.interrupted = true;
            return Ok(done);
        }
        let batch = one_batch(pool, &step, &mut after, size).await?;
        done.messages += batch.changed;
        progress(done.messages);
        match batch.error {
            Some(source) => {
                return Err(ActionError::Publish {
                    source,
                    done: done.messages,
                });
            }
            None if batch.taken < size => return Ok(done),
            None => {}
        }
    }
}

/// What one batch did.
struct Batch {
    taken: u64,
    changed: u64,
    /// The first publish that failed; the batch's other confirmed
    /// messages were still marked.
    error: Option<PublishError>,
}

/// One action's fixed parts, for each of its batches.
struct Step<'a, 'r> {
    publisher: Option<&'a Publisher>,
    request: &'a Request<'r>,
    action: &'a Action,
    action_id: i64,
}

/// Locks, publishes (for a retry), marks and counts one batch of at most
/// `size` rows after the keyset `after`, in one transaction.
async fn one_batch(
    pool: &PgPool,
    step: &Step<'_, '_>,
    after: &mut (DateTime<Utc>, i64),
    size: u64,
) -> Result<Batch, ActionError> {
    let (publisher, request, action) = (step.publisher, step.request, step.action);
    let mut tx = pool.begin().await?;
    let rows = lock_batch(&mut tx, request, action.from_status(), *after, size).await?;
    if let Some(last) = rows.last() {
        *after = (last.last_parked_at, last.id);
    }
    let (changed, error) = match (action, publisher) {
        (
            Action::Retry {
                target,
                keep_retry_count,
            },
            Some(publisher),
        ) => publish(publisher, &rows, target, *keep_retry_count).await?,
        // No publisher, no retry: nothing is marked that was not sent.
        (Action::Retry { .. }, None) => (Vec::new(), None),
        (Action::Archive | Action::Unarchive, _) => (rows.iter().map(|r| r.id).collect(), None),
    };
    mark(&mut tx, &changed, action.to_status(), request.actor).await?;
    count_on_action(&mut tx, step.action_id, &changed).await?;
    tx.commit().await?;
    Ok(Batch {
        taken: rows.len() as u64,
        changed: changed.len() as u64,
        error,
    })
}

/// Publishes each row to `target` with confirms; returns the ids the
/// broker confirmed and the first failure.
async fn publish(
    publisher: &Publisher,
    rows: &[Row],
    target: &str,
    keep_retry_count: bool,
) -> Result<(Vec<i64>, Option<PublishError>), ActionError> {
    let mut messages = Vec::with_capacity(rows.len());
    for row in rows {
        let stored =
            decode_properties(&row.amqp_properties).ok_or_else(|| ActionError::Unreadable(row.message_id.clone()))?;
        messages.push(Outgoing {
            exchange: "",
            routing_key: target,
            body: &row.body,
            properties: requeued_properties(&stored, keep_retry_count),
        });
    }
    let mut confirmed = Vec::with_capacity(rows.len());
    let mut failure = None;
    for (row, result) in rows.iter().zip(publisher.publish_all(&messages).await) {
        match result {
            Ok(()) => confirmed.push(row.id),
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    Ok((confirmed, failure))
}

/// The properties of a retried copy (docs/reliability.md, "Copies and
/// their headers"): the parked message's, made safe by
/// [`headers::safe_copy`] (persistent, no expiration, no `user_id`), plus
/// `iot-requeue-count` and `iot-requeued-at`; `iot-retry-count` removed
/// unless `keep_retry_count`, so the message gets a full set of attempts.
pub fn requeued_properties(properties: &BasicProperties, keep_retry_count: bool) -> BasicProperties {
    let properties = headers::safe_copy_noted(properties);
    let mut map = properties
        .headers()
        .as_ref()
        .map(|h| h.inner().clone())
        .unwrap_or_default();
    if !keep_retry_count {
        map.remove(RETRY_COUNT);
    }
    let mut h = FieldTable::from(map);
    let previous = headers::read_i64(Some(&h), headers::REQUEUE_COUNT).unwrap_or(0);
    headers::put_long(&mut h, headers::REQUEUE_COUNT, previous.saturating_add(1));
    headers::put_long(&mut h, headers::REQUEUED_AT, Utc::now().timestamp_millis());
    properties.with_headers(h)
}

/// A rate as `requeue --rate` and the console's rate field take it: a
/// positive number of messages per second.
///
/// # Errors
/// Anything else, in words.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    let rate = text.trim().parse::<f64>().unwrap_or(f64::NAN);
    check_rate(rate).map_err(|_| format!("{text:?} is not a rate: expected a positive number of messages per second"))
}

/// `rate` when it is a positive number of messages per second.
///
/// # Errors
/// Anything else, in words.
pub fn check_rate(rate: f64) -> Result<f64, String> {
    if rate.is_finite() && rate > 0.0 {
        Ok(rate)
    } else {
        Err(format!(
            "{rate} is not a rate: expected a positive number of messages per second"
        ))
    }
}

/// Rows per batch: [`BATCH_SIZE`], or about a tenth of a second's worth
/// at `rate`, so a paced action holds its locks briefly and a crash sends
/// few messages twice.
fn batch_size(rate: Option<f64>) -> u64 {
    rate.map_or(BATCH_SIZE, |rate| ((rate / 10.0).ceil() as u64).clamp(1, BATCH_SIZE))
}

/// Sleeps until message number `done` (0-based) may go at `rate` per second.
async fn pace(started: Instant, done: u64, rate: f64) {
    let due = started + Duration::from_secs_f64(done as f64 / rate);
    tokio::time::sleep_until(due.into()).await;
}

/// Writes the `operator_actions` row (count 0) and returns its id. Its
/// `filter` holds the request's `limit` and `rate` too.
///
/// # Errors
/// The database error.
pub async fn start(pool: &PgPool, request: &Request<'_>, action: &Action) -> Result<i64, sqlx::Error> {
    let mut filter = serde_json::to_value(request.filter).unwrap_or_default();
    if let Some(map) = filter.as_object_mut() {
        if let Some(limit) = request.limit {
            map.insert("limit".into(), limit.into());
        }
        if let Some(rate) = request.rate {
            map.insert("rate".into(), rate.into());
        }
    }
    let target = match action {
        Action::Retry { target, .. } => Some(target.as_str()),
        Action::Archive | Action::Unarchive => None,
    };
    sqlx::query_scalar(
        "INSERT INTO operator_actions (actor, action, filter, queue, target)
         VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(request.actor)
    .bind(action.as_str())
    .bind(sqlx::types::Json(filter))
    .bind(request.queue)
    .bind(target)
    .fetch_one(pool)
    .await
}

/// Locks the next `size` rows matching the request after `after`, oldest
/// parking first, skipping rows another action holds.
async fn lock_batch(
    tx: &mut PgConnection,
    request: &Request<'_>,
    from: Status,
    after: (DateTime<Utc>, i64),
    size: u64,
) -> Result<Vec<Row>, sqlx::Error> {
    let query = sqlx::query_as(concat!(
        "SELECT id, message_id, last_parked_at, body, amqp_properties FROM parked_messages WHERE ",
        matching!(),
        " AND (last_parked_at, id) > ($10, $11)
         ORDER BY last_parked_at, id LIMIT $12 FOR UPDATE SKIP LOCKED"
    ));
    bind_filter!(query, request.queue, request.filter, from)
        .bind(after.0)
        .bind(after.1)
        .bind(i64::try_from(size).unwrap_or(i64::MAX))
        .fetch_all(tx)
        .await
}

/// Sets the status of rows `ids`, saying who did it.
async fn mark(tx: &mut PgConnection, ids: &[i64], to: Status, actor: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE parked_messages SET status = $2, status_changed_at = now(), status_changed_by = $3
         WHERE id = ANY($1)",
    )
    .bind(ids)
    .bind(to.as_str())
    .bind(actor)
    .execute(tx)
    .await?;
    Ok(())
}

/// Links rows `ids` to action `action_id` and adds them to its count.
async fn count_on_action(tx: &mut PgConnection, action_id: i64, ids: &[i64]) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH linked AS (
             INSERT INTO operator_action_messages (parked_id, action_id)
             SELECT unnest($1::bigint[]), $2 ON CONFLICT DO NOTHING)
         UPDATE operator_actions SET messages = messages + cardinality($1::bigint[]) WHERE id = $2",
    )
    .bind(ids)
    .bind(action_id)
    .execute(tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requeued_copies_count_and_clear_the_retry_count() {
        let mut h = FieldTable::default();
        headers::put_long(&mut h, RETRY_COUNT, 4);
        headers::put_str(&mut h, "x-producer", "p");
        let original = BasicProperties::default().with_message_id("m".into()).with_headers(h);
        let once = requeued_properties(&original, false);
        let twice = requeued_properties(&once, true);
        let h1 = once.headers().as_ref();
        assert!(!h1.unwrap().contains_key(RETRY_COUNT), "retry count cleared");
        assert_eq!(headers::read_i64(h1, headers::REQUEUE_COUNT), Some(1));
        assert!(headers::read_i64(h1, headers::REQUEUED_AT).is_some());
        assert_eq!(headers::read_string(h1, "x-producer").as_deref(), Some("p"));
        assert_eq!(
            headers::read_i64(twice.headers().as_ref(), headers::REQUEUE_COUNT),
            Some(2)
        );
        assert_eq!(once.message_id().as_ref().map(|s| s.as_str()), Some("m"));
        let kept = requeued_properties(&original, true);
        assert_eq!(headers::read_i64(kept.headers().as_ref(), RETRY_COUNT), Some(4));
    }

    #[test]
    fn paced_batches_hold_a_tenth_of_a_second() {
        assert_eq!(batch_size(None), BATCH_SIZE);
        assert_eq!(batch_size(Some(50.0)), 5);
        assert_eq!(batch_size(Some(0.5)), 1);
        assert_eq!(batch_size(Some(1e9)), BATCH_SIZE);
    }

    #[test]
    fn each_action_moves_between_two_statuses() {
        let retry = Action::Retry {
            target: "q".into(),
            keep_retry_count: false,
        };
        assert_eq!(
            (retry.from_status(), retry.to_status()),
            (Status::Parked, Status::Retried)
        );
        assert_eq!(Action::Archive.to_status(), Status::Archived);
        assert_eq!(Action::Unarchive.from_status(), Status::Archived);
    }
}
