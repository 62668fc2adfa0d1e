//! The outbox relay: publishes the device messages that commands left in
//! the `outbox` table (docs/reliability.md, "Message types"), inside the
//! worker process.
//!
//! Delivery guarantee, from the ordering of its steps (docs/reliability.md,
//! "Commands to devices"):
//!
//! 1. claim pending rows that are due, oldest first, in one short
//!    transaction (`FOR UPDATE SKIP LOCKED`): each claim counts an attempt
//!    and leases the row for [`CLAIM_LEASE`], so no other relay takes it
//!    meanwhile;
//! 2. publish each, in order, `mandatory`, persistent, with the command's
//!    message id as `message_id`, then wait for the broker's confirms;
//! 3. mark the confirmed rows `published_at`, and put the others off until
//!    their next attempt, in one transaction.
//!
//! Batches are pipelined: up to [`WINDOW`] batches are published and wait
//! for their confirms at once (each on a channel of its own, so a return
//! is matched within its batch), while the next is claimed; each is marked
//! as its confirms arrive, oldest first. A device's messages keep their
//! order: a claim skips the routing keys of the batches still in flight, so
//! a device's next message is published only after the broker confirmed
//! (routed) its previous ones.
//!
//! Every send is an attempt counted before it happens, so a device gets at
//! most as many copies of a command as its row counts attempts, however
//! slowly the broker confirms. A crash before 3 commits leaves the rows to
//! the next claim once their lease ends: at least once on the wire, never
//! lost, and every row is marked exactly once. A returned (unroutable)
//! message is not published: it is counted, logged and tried again with a
//! growing delay, and once a row has made [`MAX_UNROUTABLE_ATTEMPTS`] it is
//! marked failed (kept, with its error, for an operator). A nack or a
//! confirm that did not come is tried again, without limit.
//!
//! The relay wakes on the `NOTIFY` that a committed outbox insert sends,
//! and at least every [`POLL_INTERVAL`] (for retries that fall due and
//! notifications lost while the listener reconnected). It has its own
//! broker connection, rebuilt with backoff, so it never disturbs the
//! consume session; database errors make it wait and try again.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::types::ShortString;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::broker::{self, BlockedHook, Outgoing, PublishError, Publisher, Reconnect};
use crate::metrics::Metrics;
use crate::outbox::{self, Row};
use crate::readiness::Readiness;
use crate::retry::reconnect_backoff as backoff;
use crate::store;
use crate::telemetry;

/// Rows claimed and published per transaction.
pub const BATCH_SIZE: i64 = 100;
/// Batches published and waiting for their confirms at most: a window of
/// `WINDOW × BATCH_SIZE` unconfirmed device messages.
pub const WINDOW: usize = 4;
/// The longest the relay sleeps without a notification.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Attempts, the last of them returned (no queue bound for the routing
/// key), after which a row is marked failed; with the delays of
/// [`retry_delay`] that is about an hour.
pub const MAX_UNROUTABLE_ATTEMPTS: i32 = 20;
/// How long a claimed row is left to the relay that claimed it. A relay
/// that dies after claiming leaves its rows to the next claim after this;
/// a relay that outlives it (a publish blocked by a broker alarm) may see
/// them claimed and sent again by another, as a new, counted attempt.
pub const CLAIM_LEASE: Duration = Duration::from_secs(30);
/// The longest delay before a returned or nacked row is tried again.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);
/// How often published rows past their retention are deleted.
const CLEANUP_INTERVAL: Duration = Duration::from_secs(3600);
/// Rows deleted per statement, so cleanup never holds long locks.
const CLEANUP_CHUNK: i64 = 10_000;
/// How often the gauges are refreshed at most.
const STATS_INTERVAL: Duration = Duration::from_secs(1);
/// Bounds connecting the `LISTEN` connection; the relay polls meanwhile.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);

/// The relay's dependencies.
pub struct Relay {
    pub pool: PgPool,
    pub amqp_url: String,
    pub database_url: String,
    /// Published rows older than this are deleted.
    pub retention: Duration,
    pub metrics: Arc<Metrics>,
    /// Told when the broker blocks the relay's connection.
    pub readiness: Arc<Readiness>,
}

/// When the next housekeeping jobs are due.
struct Housekeeping {
    stats_due: Instant,
    cleanup_due: Instant,
}

impl Relay {
    /// Relays until `shutdown` is cancelled; a batch in progress finishes
    /// first (bounded by the confirm timeout).
    pub async fn run(self, shutdown: CancellationToken) {
        let mut wake = Wake::new(self.database_url.clone());
        // Listen before the first claim: a row committed in between would
        // otherwise wait for the next poll.
        wake.listener = wake.listen().await;
        let mut housekeeping = Housekeeping {
            stats_due: Instant::now(),
            cleanup_due: Instant::now(),
        };
        let mut reconnect = Reconnect::new(&self.amqp_url, "worker-iot-core outbox relay", backoff);
        loop {
            let error = match reconnect.connect(&shutdown).await {
                None => return,
                Some(Ok(connection)) => {
                    let result = self
                        .connected(&connection, &mut wake, &mut housekeeping, &shutdown)
                        .await;
                    broker::close(connection, "relay stopping").await;
                    match result {
                        Ok(()) => return,
                        Err(e) => e,
                    }
                }
                Some(Err(e)) => e,
            };
            self.metrics.record_outbox_error();
            if !reconnect.pause(&error, &shutdown).await {
                return;
            }
        }
    }

    /// Opens the publisher (watching for broker alarms) and relays on it.
    async fn connected(
        &self,
        connection: &lapin::Connection,
        wake: &mut Wake,
        housekeeping: &mut Housekeeping,
        shutdown: &CancellationToken,
    ) -> Result<(), String> {
        let readiness = self.readiness.clone();
        let on_blocked: BlockedHook = Arc::new(move |reason| readiness.set_broker_blocked("outbox relay", reason));
        let publisher = Publisher::open_watched(connection, Some(on_blocked))
            .await
            .map_err(|e| format!("RabbitMQ: {e}"))?;
        tracing::info!("outbox relay connected");
        let result = self.session(&publisher, wake, housekeeping, shutdown).await;
        result.map_err(|e| e.to_string())
    }

    /// Relays on one broker connection until shutdown (`Ok`) or a broker
    /// failure (`Err`, to reconnect): claims and publishes while the window
    /// has room and rows wait, marks the oldest batch once its confirms are
    /// in, and sleeps only when nothing is in flight and nothing is due.
    async fn session(
        &self,
        publisher: &Publisher,
        wake: &mut Wake,
        housekeeping: &mut Housekeeping,
        shutdown: &CancellationToken,
    ) -> Result<(), PublishError> {
        let mut window: VecDeque<InFlight> = VecDeque::with_capacity(WINDOW);
        let mut database_delays = backoff();
        loop {
            // Rate-limited inside, and done under a backlog too, so the
            // gauges stay fresh exactly when the outbox lags.
            self.housekeeping(housekeeping).await;
            let mut more = false;
            if window.len() < WINDOW && !shutdown.is_cancelled() {
                match self.claim(&window).await {
                    Ok(rows) => {
                        database_delays = backoff();
                        more = rows.len() == BATCH_SIZE as usize;
                        if !rows.is_empty() {
                            window.push_back(InFlight::publish(publisher, rows));
                        }
                    }
                    Err(e) => self.database_error(&e, &mut database_delays, shutdown).await,
                }
            }
            if more && window.len() < WINDOW {
                continue;
            }
            match window.pop_front() {
                Some(oldest) => {
                    if let Err(e) = self.settle(oldest).await {
                        return Err(self.drain(window, e).await);
                    }
                }
                None if shutdown.is_cancelled() => return Ok(()),
                None => wake.wait(shutdown).await,
            }
        }
    }

    /// Claims the next batch, skipping the devices still in flight.
    async fn claim(&self, window: &VecDeque<InFlight>) -> Result<Vec<Row>, sqlx::Error> {
        let busy: Vec<String> = window
            .iter()
            .flat_map(|batch| batch.routing_keys.iter().cloned())
            .collect();
        store::deadline(async {
            let mut conn = self.pool.acquire().await?;
            outbox::claim(&mut conn, BATCH_SIZE, CLAIM_LEASE, &busy).await
        })
        .await
    }

    async fn database_error(
        &self,
        e: &sqlx::Error,
        delays: &mut impl Iterator<Item = Duration>,
        shutdown: &CancellationToken,
    ) {
        self.metrics.record_outbox_error();
        let delay = delays.next().unwrap_or(Duration::from_secs(10));
        tracing::warn!(error.message = %e, ?delay, "outbox relay: database error; trying again");
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(delay) => {}
        }
    }

    /// Waits for a batch's confirms and marks it. A database error leaves
    /// its rows leased (sent again after [`CLAIM_LEASE`], as a new counted
    /// attempt); a broken channel or connection is returned.
    async fn settle(&self, batch: InFlight) -> Result<(), PublishError> {
        let (rows, results) = match batch.confirms.await {
            Ok(done) => done,
            // The publish task panicked: nothing is known of its confirms.
            Err(e) => {
                tracing::error!(error.message = %e, "outbox relay: a publish task failed; its rows wait for their lease");
                return Ok(());
            }
        };
        #[cfg(feature = "test-handlers")]
        crash_after_confirm_for_tests(&results);
        match store::deadline(self.record(&rows, results)).await {
            Ok(None) => Ok(()),
            Ok(Some(broken)) => Err(broken),
            Err(e) => {
                self.metrics.record_outbox_error();
                tracing::warn!(error.message = %e, "outbox relay: cannot mark a batch; its rows wait for their lease");
                Ok(())
            }
        }
    }

    /// After a broken publish: the batches still in flight are settled
    /// (their confirms fail or arrive) before the connection is rebuilt.
    async fn drain(&self, window: VecDeque<InFlight>, first: PublishError) -> PublishError {
        for batch in window {
            self.settle(batch).await.ok();
        }
        first
    }

    /// Marks the confirmed rows published and puts the others off until
    /// their next attempt, in one transaction. Returns the broker error
    /// that ends the session, if any.
    async fn record(
        &self,
        rows: &[Row],
        results: Vec<Result<(), PublishError>>,
    ) -> Result<Option<PublishError>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let mut published = Vec::with_capacity(rows.len());
        let mut broken = None;
        for (row, result) in rows.iter().zip(results) {
            let error = match result {
                Ok(()) => {
                    published.push(row.id);
                    continue;
                }
                Err(PublishError::Unroutable(_)) => {
                    self.returned(&mut tx, row).await?;
                    continue;
                }
                Err(PublishError::Nacked(_)) => "nacked by the broker".to_owned(),
                Err(e @ (PublishError::Broker { .. } | PublishError::Timeout(_))) => {
                    let error = e.to_string();
                    broken.get_or_insert(e);
                    error
                }
            };
            outbox::defer(&mut tx, row.id, &error, retry_delay(row.attempts), false).await?;
        }
        outbox::mark_published(&mut tx, &published).await?;
        tx.commit().await?;
        self.metrics.record_outbox_published(published.len() as u64);
        Ok(broken)
    }

    /// A row whose message no queue took: tried again later, or, after
    /// [`MAX_UNROUTABLE_ATTEMPTS`], marked failed.
    async fn returned(&self, tx: &mut sqlx::PgConnection, row: &Row) -> Result<(), sqlx::Error> {
        self.metrics.record_outbox_unroutable();
        let attempt = row.attempts;
        let give_up = attempt >= MAX_UNROUTABLE_ATTEMPTS;
        let error = format!(
            "unroutable: no queue is bound to routing key '{}' on exchange '{}'",
            row.routing_key, row.exchange
        );
        let delay = retry_delay(row.attempts);
        if give_up {
            tracing::error!(messaging.message.id = %row.message_id, routing_key = %row.routing_key, attempt,
                            "device message returned unroutable too often; marked failed in the outbox");
        } else {
            tracing::warn!(messaging.message.id = %row.message_id, routing_key = %row.routing_key, attempt, ?delay,
                           "device message returned unroutable; will try again");
        }
        outbox::defer(tx, row.id, &error, delay, give_up).await
    }

    /// Refreshes the gauges and deletes rows past their retention, each
    /// when due. Errors are logged: housekeeping never stops relaying.
    async fn housekeeping(&self, due: &mut Housekeeping) {
        let now = Instant::now();
        if now >= due.stats_due {
            due.stats_due = now + STATS_INTERVAL;
            match store::deadline(outbox::stats(&self.pool)).await {
                Ok(stats) => self.metrics.set_outbox_stats(stats),
                Err(e) => tracing::debug!(error.message = %e, "outbox relay: cannot read outbox statistics"),
            }
        }
        if now >= due.cleanup_due {
            due.cleanup_due = now + CLEANUP_INTERVAL;
            match store::deadline(self.delete_expired()).await {
                Ok(0) => {}
                Ok(rows) => tracing::info!(rows, "deleted published outbox rows past their retention"),
                Err(e) => tracing::warn!(error.message = %e, "outbox relay: retention cleanup failed"),
            }
        }
    }

    async fn delete_expired(&self) -> Result<u64, sqlx::Error> {
        let mut total = 0;
        loop {
            let deleted = outbox::delete_published_before(&self.pool, self.retention, CLEANUP_CHUNK).await?;
            total += deleted;
            if deleted < CLEANUP_CHUNK as u64 {
                return Ok(total);
            }
        }
    }
}

/// A batch published, its confirms awaited by a task of its own.
struct InFlight {
    /// The batch's devices: no later row of theirs is claimed meanwhile.
    routing_keys: Vec<String>,
    /// The rows and each one's confirm.
    confirms: JoinHandle<Confirmed>,
}

/// A batch's rows and each one's publish result.
type Confirmed = (Vec<Row>, Vec<Result<(), PublishError>>);

impl InFlight {
    /// Publishes `rows`, one after the other on one channel, so a device
    /// gets its messages in the order the commands committed; the task
    /// then waits for the confirms together.
    fn publish(publisher: &Publisher, rows: Vec<Row>) -> InFlight {
        let mut routing_keys: Vec<String> = rows.iter().map(|row| row.routing_key.clone()).collect();
        routing_keys.sort_unstable();
        routing_keys.dedup();
        let publisher = publisher.clone();
        let confirms = tokio::spawn(async move {
            let spans: Vec<_> = rows.iter().map(publish_span).collect();
            let messages: Vec<Outgoing<'_>> = rows
                .iter()
                .zip(&spans)
                .map(|(row, span)| Outgoing {
                    exchange: &row.exchange,
                    routing_key: &row.routing_key,
                    body: &row.body,
                    properties: telemetry::with_context_of(span, device_message_properties(row)),
                })
                .collect();
            let results = publisher.publish_all(&messages).await;
            drop(messages);
            (rows, results)
        });
        InFlight { routing_keys, confirms }
    }
}

/// The span of one device message's publish: a child of the command that
/// wrote it (its context was stored with the row), so a command and the
/// device message it caused are one trace; the device message carries this
/// span's context on.
fn publish_span(row: &Row) -> tracing::Span {
    let span = tracing::debug_span!(
        "publish",
        otel.name = %format_args!("publish {}", row.exchange),
        otel.kind = "producer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "send",
        messaging.destination.name = %row.exchange,
        messaging.rabbitmq.destination.routing_key = %row.routing_key,
        messaging.message.id = %row.message_id,
    );
    let mut carrier = lapin::types::FieldTable::default();
    if let Some(traceparent) = &row.traceparent {
        crate::headers::put_str(&mut carrier, telemetry::TRACEPARENT, traceparent);
    }
    if let Some(tracestate) = &row.tracestate {
        crate::headers::put_str(&mut carrier, telemetry::TRACESTATE, tracestate);
    }
    telemetry::continue_trace(&span, Some(&carrier));
    span
}

/// A device message: persistent, with the command's message id so a
/// device or bridge can deduplicate.
fn device_message_properties(row: &Row) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(ShortString::from(row.message_id.as_str()))
        .with_content_type(ShortString::from("text/plain"))
        .with_app_id(ShortString::from("worker-iot-core"))
        .with_timestamp(u64::try_from(row.created_at.timestamp()).unwrap_or(0))
}

/// 1 s, 2 s, 4 s, … up to five minutes, after attempt number `attempt`
/// (1 for the first).
fn retry_delay(attempt: i32) -> Duration {
    let exponent = u32::try_from(attempt.saturating_sub(1)).unwrap_or(0).min(16);
    Duration::from_secs(1u64 << exponent).min(MAX_RETRY_DELAY)
}

/// Waits for an outbox notification, the poll interval, or shutdown.
struct Wake {
    database_url: String,
    /// `None` until connected, and again after the connection is lost.
    listener: Option<PgListener>,
}

impl Wake {
    fn new(database_url: String) -> Wake {
        Wake {
            database_url,
            listener: None,
        }
    }

    async fn wait(&mut self, shutdown: &CancellationToken) {
        if self.listener.is_none() {
            self.listener = self.listen().await;
        }
        let notified = async {
            match &mut self.listener {
                Some(listener) => listener.recv().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        let listening = tokio::select! {
            () = shutdown.cancelled() => true,
            () = tokio::time::sleep(POLL_INTERVAL) => true,
            ok = notified => ok,
        };
        match &mut self.listener {
            // One claim serves every notification that arrived meanwhile.
            Some(listener) if listening => while listener.next_buffered().is_some() {},
            _ => self.listener = None,
        }
    }

    async fn listen(&self) -> Option<PgListener> {
        let connect = async {
            let mut listener = PgListener::connect(&self.database_url).await?;
            listener.listen(outbox::CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        match tokio::time::timeout(LISTEN_TIMEOUT, connect).await {
            Ok(Ok(listener)) => Some(listener),
            Ok(Err(e)) => {
                tracing::debug!(error.message = %e, "outbox relay: cannot LISTEN; polling");
                None
            }
            Err(_) => None,
        }
    }
}

/// Fault injection for the tests: with `WIC_TEST_RELAY_ABORT_AFTER_CONFIRM`
/// set, the process aborts after the broker confirmed a batch and before
/// the rows are marked, the window in which a crash duplicates a device
/// message.
#[cfg(feature = "test-handlers")]
fn crash_after_confirm_for_tests(results: &[Result<(), PublishError>]) {
    if results.iter().any(Result::is_ok) && std::env::var_os("WIC_TEST_RELAY_ABORT_AFTER_CONFIRM").is_some() {
        eprintln!("test hook: aborting between the confirm and the marking of a batch");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_up_to_five_minutes() {
        let delays: Vec<u64> = (1..13).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(retry_delay(0), Duration::from_secs(1));
        assert_eq!(retry_delay(-1), Duration::from_secs(1));
        assert_eq!(retry_delay(i32::MAX), MAX_RETRY_DELAY);
    }

    #[test]
    fn device_messages_are_persistent_and_carry_the_command_id() {
        let row = Row {
            id: 1,
            message_id: "cmd-1".into(),
            exchange: "amq.topic".into(),
            routing_key: "led.d1".into(),
            body: b"on".to_vec(),
            created_at: chrono::Utc::now(),
            attempts: 0,
            traceparent: None,
            tracestate: None,
        };
        let properties = device_message_properties(&row);
        assert_eq!(properties.delivery_mode(), &Some(2));
        assert_eq!(properties.message_id().as_ref().map(|id| id.as_str()), Some("cmd-1"));
        assert_eq!(properties.expiration(), &None);
    }
}
