//! `requeue` (docs/operations.md, "The dead-letter queue"): inspect the
//! dead-letter queue and drain it back.
//!
//! AMQP has no way to take a message out of the middle of a queue, so a
//! drain walks a bounded snapshot: the DLQ's depth when it starts. Each
//! message is taken with `basic.get`; one that matches is published to the
//! target queue, one that does not is published unchanged to the DLQ's
//! tail. Either publish is confirmed by the broker *before* the original is
//! acked, so a crash at any instant duplicates at most one message (which
//! the worker's inbox absorbs) and never loses one.
//!
//! The trade-off: messages that do not match keep their order relative to
//! each other, but messages parked while the drain runs end up before them.
//! When `--limit` is reached and some messages were already cycled, the
//! drain finishes the snapshot so the order is kept; when none were cycled
//! yet it stops at once. A stop in the middle (Ctrl-C, an error) leaves the
//! queue rotated: every message is still there, the cycled ones at the tail.
//!
//! `--list` and `--dry-run` read the whole snapshot without acking and then
//! close the channel: the broker puts every message back where it was.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use tokio_util::sync::CancellationToken;

use crate::broker::{PublishError, Publisher};
use crate::failure::ErrorKind;
use crate::headers::{self, ERROR, ERROR_FINGERPRINT, ERROR_KIND, FIRST_FAILURE_AT, LAST_FAILURE_AT, RETRY_COUNT};

/// What the operator sees of one parked message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parked {
    pub message_id: Option<String>,
    /// The envelope's `type`, when the body has one.
    pub message_type: Option<String>,
    /// `iot-error-kind`; for a message the broker dead-lettered (quorum
    /// `x-delivery-limit`, say), derived from `x-first-death-reason`.
    pub kind: String,
    pub fingerprint: String,
    pub error: String,
    pub first_failure_ms: Option<i64>,
    pub last_failure_ms: Option<i64>,
    /// The body, lossily decoded, for `--grep`.
    pub body: String,
}

impl Parked {
    /// Reads a parked delivery's headers and body. Never fails: missing
    /// headers become empty or derived values.
    pub fn inspect(delivery: &Delivery) -> Parked {
        let h = delivery.properties.headers().as_ref();
        let body = String::from_utf8_lossy(&delivery.data).into_owned();
        let message_type = serde_json::from_slice::<serde_json::Value>(&delivery.data)
            .ok()
            .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned));
        let death_reason = headers::read_string(h, "x-first-death-reason");
        let kind = headers::read_string(h, ERROR_KIND).unwrap_or_else(|| match death_reason.as_deref() {
            Some("delivery_limit") => ErrorKind::CrashLoop.as_str().to_owned(),
            Some(reason) => format!("broker:{reason}"),
            None => "unknown".to_owned(),
        });
        let error = headers::read_string(h, ERROR).unwrap_or_else(|| match &death_reason {
            Some(reason) => format!("dead-lettered by the broker: {reason}"),
            None => String::new(),
        });
        let fingerprint = headers::read_string(h, ERROR_FINGERPRINT).unwrap_or_else(|| {
            let kind = ErrorKind::parse(&kind).unwrap_or(ErrorKind::Permanent);
            headers::fingerprint(kind, message_type.as_deref(), &error)
        });
        let death_time = || timestamp_of_first_death(h);
        Parked {
            message_id: delivery.properties.message_id().as_ref().map(|s| s.as_str().to_owned()),
            message_type,
            kind,
            fingerprint,
            error,
            first_failure_ms: headers::read_i64(h, FIRST_FAILURE_AT).or_else(death_time),
            last_failure_ms: headers::read_i64(h, LAST_FAILURE_AT).or_else(death_time),
            body,
        }
    }
}

fn timestamp_of_first_death(h: Option<&FieldTable>) -> Option<i64> {
    let AMQPValue::FieldArray(deaths) = h?.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().last()? else {
        return None;
    };
    headers::read_i64(Some(first), "time").map(|seconds| seconds.saturating_mul(1000))
}

/// Which parked messages to move. Empty lists match everything; all given
/// conditions must hold.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub types: Vec<String>,
    pub error_kinds: Vec<String>,
    pub fingerprint: Option<String>,
    /// Substring of the error text or the body.
    pub grep: Option<String>,
}

impl Filter {
    pub fn matches(&self, parked: &Parked) -> bool {
        (self.types.is_empty() || parked.message_type.as_ref().is_some_and(|t| self.types.contains(t)))
            && (self.error_kinds.is_empty() || self.error_kinds.contains(&parked.kind))
            && self.fingerprint.as_ref().is_none_or(|f| *f == parked.fingerprint)
            && self
                .grep
                .as_ref()
                .is_none_or(|g| parked.error.contains(g.as_str()) || parked.body.contains(g.as_str()))
    }
}

/// One group of `--list`: the parked messages sharing a fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub fingerprint: String,
    pub count: u64,
    pub kind: String,
    /// Message types in the group, sorted.
    pub types: Vec<String>,
    pub first_failure_ms: Option<i64>,
    pub last_failure_ms: Option<i64>,
    pub sample_error: String,
}

/// A requeue that stopped. Messages are never lost by one: what was not
/// confirmed elsewhere stays in the DLQ.
#[derive(Debug, thiserror::Error)]
pub enum RequeueError {
    #[error("queue '{0}' does not exist")]
    MissingQueue(String),
    #[error("RabbitMQ: {0}")]
    Broker(#[from] lapin::Error),
    #[error("{0}; the message stays in the DLQ")]
    Publish(#[from] PublishError),
}

/// What happened to one message of the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Moved,
    WouldMove,
    Kept,
}

/// What a drain is asked to do.
#[derive(Debug, Clone)]
pub struct DrainOptions {
    pub dlq: String,
    pub target: String,
    pub filter: Filter,
    pub limit: Option<u64>,
    /// Messages moved per second, at most.
    pub rate: Option<f64>,
    pub dry_run: bool,
    pub keep_retry_count: bool,
}

/// Counts of a finished (or stopped) drain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub moved: u64,
    pub kept: u64,
    /// Messages of the snapshot not visited (stopped early).
    pub left: u64,
    /// Moved (or would-move) messages by fingerprint.
    pub moved_by_fingerprint: BTreeMap<String, u64>,
    pub interrupted: bool,
}

/// Ready messages in `queue`.
///
/// # Errors
/// [`RequeueError::MissingQueue`] when it does not exist.
pub async fn depth(connection: &Connection, queue: &str) -> Result<u32, RequeueError> {
    let channel = connection.create_channel().await?;
    let options = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    match channel
        .queue_declare(queue.into(), options, FieldTable::default())
        .await
    {
        Ok(q) => {
            channel.close(200, "".into()).await.ok();
            Ok(q.message_count())
        }
        Err(e) if is_not_found(&e) => Err(RequeueError::MissingQueue(queue.to_owned())),
        Err(e) => Err(e.into()),
    }
}

/// Whether the broker answered 404 NOT_FOUND, as RabbitMQ does to a passive
/// declare of a missing queue. Anything else (a lost connection, say) is a
/// broker error.
fn is_not_found(e: &lapin::Error) -> bool {
    matches!(
        e.kind(),
        lapin::ErrorKind::ProtocolError(amqp) if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
    )
}

/// Reads up to `depth` messages without acking them, handing each to
/// `visit` and dropping it, then closes the channel so the broker puts them
/// back in place. Memory holds one message at a time, whatever the depth.
///
/// # Errors
/// A broker error.
pub async fn peek_each(
    connection: &Connection,
    queue: &str,
    mut visit: impl FnMut(Delivery),
) -> Result<(), RequeueError> {
    let snapshot = depth(connection, queue).await?;
    let channel = connection.create_channel().await?;
    for _ in 0..snapshot {
        match get(&channel, queue).await? {
            Some(delivery) => visit(delivery),
            None => break,
        }
    }
    // Unacked messages go back to their places when the channel closes.
    channel.close(200, "peeked".into()).await.ok();
    Ok(())
}

/// Every message of [`peek_each`], collected (for small queues and tests).
///
/// # Errors
/// A broker error.
pub async fn peek(connection: &Connection, queue: &str) -> Result<Vec<Delivery>, RequeueError> {
    let mut out = Vec::new();
    peek_each(connection, queue, |delivery| out.push(delivery)).await?;
    Ok(out)
}

/// The `--list` summary of the messages `filter` matches: groups by
/// fingerprint, most numerous first.
///
/// # Errors
/// A broker error or a missing queue.
pub async fn list(connection: &Connection, dlq: &str, filter: &Filter) -> Result<Vec<Group>, RequeueError> {
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    peek_each(connection, dlq, |delivery| {
        let p = Parked::inspect(&delivery);
        if !filter.matches(&p) {
            return;
        }
        let group = groups.entry(p.fingerprint.clone()).or_insert_with(|| Group {
            fingerprint: p.fingerprint.clone(),
            count: 0,
            kind: p.kind.clone(),
            types: Vec::new(),
            first_failure_ms: None,
            last_failure_ms: None,
            sample_error: p.error.clone(),
        });
        group.count += 1;
        if let Some(t) = p.message_type
            && !group.types.contains(&t)
        {
            group.types.push(t);
            group.types.sort();
        }
        group.first_failure_ms = min_some(group.first_failure_ms, p.first_failure_ms);
        group.last_failure_ms = group.last_failure_ms.max(p.last_failure_ms);
    })
    .await?;
    let mut groups: Vec<Group> = groups.into_values().collect();
    groups.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.fingerprint.cmp(&b.fingerprint)));
    Ok(groups)
}

fn min_some(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Drains the DLQ snapshot as `options` say, calling `report` for every
/// message visited. Stops between messages when `stop` is cancelled.
///
/// # Errors
/// A [`RequeueError`]; the message being handled then stays in the DLQ.
pub async fn drain(
    connection: &Connection,
    options: &DrainOptions,
    stop: &CancellationToken,
    mut report: impl FnMut(Action, &Parked),
) -> Result<Summary, RequeueError> {
    let snapshot = u64::from(depth(connection, &options.dlq).await?);
    depth(connection, &options.target).await?;
    if options.dry_run {
        return dry_run(connection, options, report).await;
    }

    let channel = connection.create_channel().await?;
    let publisher = Publisher::open(connection).await?;
    let started = Instant::now();
    let mut summary = Summary::default();
    let mut visited = 0;
    while visited < snapshot {
        if stop.is_cancelled() {
            summary.interrupted = true;
            break;
        }
        let limit_reached = options.limit.is_some_and(|l| summary.moved >= l);
        if limit_reached && summary.kept == 0 {
            break; // nothing cycled yet: the rest is still in order
        }
        let Some(delivery) = get(&channel, &options.dlq).await? else {
            break;
        };
        visited += 1;
        let parked = Parked::inspect(&delivery);
        let moves = !limit_reached && options.filter.matches(&parked);
        if moves && let Some(rate) = options.rate {
            pace(started, summary.moved, rate).await;
        }
        relocate(&publisher, options, &delivery, moves).await?;
        count(&mut summary, moves, &parked);
        report(if moves { Action::Moved } else { Action::Kept }, &parked);
    }
    summary.left = snapshot - visited;
    channel.close(200, "drained".into()).await.ok();
    publisher.channel().close(200, "drained".into()).await.ok();
    Ok(summary)
}

/// A `--dry-run` drain: reads the snapshot without acking and reports what
/// would move.
async fn dry_run(
    connection: &Connection,
    options: &DrainOptions,
    mut report: impl FnMut(Action, &Parked),
) -> Result<Summary, RequeueError> {
    let mut summary = Summary::default();
    peek_each(connection, &options.dlq, |delivery| {
        let parked = Parked::inspect(&delivery);
        let moves = options.filter.matches(&parked) && options.limit.is_none_or(|l| summary.moved < l);
        count(&mut summary, moves, &parked);
        report(if moves { Action::WouldMove } else { Action::Kept }, &parked);
    })
    .await?;
    Ok(summary)
}

/// Publishes a copy of `delivery`, to the target when it `moves` and
/// otherwise to the DLQ's tail, and acks the original once the broker has
/// confirmed the copy.
async fn relocate(
    publisher: &Publisher,
    options: &DrainOptions,
    delivery: &Delivery,
    moves: bool,
) -> Result<(), RequeueError> {
    let (queue, properties) = if moves {
        let properties = requeued_properties(&delivery.properties, options.keep_retry_count);
        (&options.target, properties)
    } else {
        // Unchanged, byte for byte (unless the broker would refuse it
        // back: see `headers::safe_copy`).
        (&options.dlq, headers::safe_copy_noted(&delivery.properties))
    };
    publisher.publish("", queue, &delivery.data, properties).await?;
    // Only now, with the copy confirmed, may the original go.
    delivery.acker.ack(BasicAckOptions::default()).await?;
    Ok(())
}

fn count(summary: &mut Summary, moved: bool, parked: &Parked) {
    if moved {
        summary.moved += 1;
        *summary
            .moved_by_fingerprint
            .entry(parked.fingerprint.clone())
            .or_insert(0) += 1;
    } else {
        summary.kept += 1;
    }
}

async fn get(channel: &Channel, queue: &str) -> Result<Option<Delivery>, RequeueError> {
    let message = channel.basic_get(queue.into(), BasicGetOptions::default()).await?;
    Ok(message.map(|m| m.delivery))
}

/// Sleeps until message number `moved` (0-based) may go at `rate` per second.
async fn pace(started: Instant, moved: u64, rate: f64) {
    let due = started + Duration::from_secs_f64(moved as f64 / rate);
    tokio::time::sleep_until(due.into()).await;
}

/// The properties of a requeued copy: everything kept (made safe by
/// [`headers::safe_copy`]: persistent, no expiration, no `user_id`), plus
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

/// Formats unix milliseconds for people.
pub fn format_ms(ms: Option<i64>) -> String {
    ms.and_then(DateTime::<Utc>::from_timestamp_millis)
        .map_or_else(|| "-".to_owned(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parked(kind: &str, t: Option<&str>, fingerprint: &str, error: &str) -> Parked {
        Parked {
            message_id: None,
            message_type: t.map(str::to_owned),
            kind: kind.into(),
            fingerprint: fingerprint.into(),
            error: error.into(),
            first_failure_ms: None,
            last_failure_ms: None,
            body: "{\"device_id\":\"d7\"}".into(),
        }
    }

    #[test]
    fn filters_combine_with_and() {
        let p = parked("validation", Some("MEASUREMENT"), "abc", "data.value must be a number");
        assert!(Filter::default().matches(&p));
        let by_type = Filter {
            types: vec!["DEVICE_UP".into(), "MEASUREMENT".into()],
            ..Filter::default()
        };
        assert!(by_type.matches(&p));
        let wrong_kind = Filter {
            error_kinds: vec!["decode".into()],
            ..by_type.clone()
        };
        assert!(!wrong_kind.matches(&p));
        let grep_body = Filter {
            grep: Some("d7".into()),
            ..Filter::default()
        };
        assert!(grep_body.matches(&p));
        let grep_error = Filter {
            grep: Some("must be a number".into()),
            fingerprint: Some("abc".into()),
            ..Filter::default()
        };
        assert!(grep_error.matches(&p));
        assert!(
            !Filter {
                fingerprint: Some("other".into()),
                ..Filter::default()
            }
            .matches(&p)
        );
        assert!(
            !Filter {
                types: vec!["MEASUREMENT".into()],
                ..Filter::default()
            }
            .matches(&parked("decode", None, "x", ""))
        );
    }

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
}
