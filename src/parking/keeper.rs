//! Moving messages from `Q.dlq` into the lot (docs/reliability.md, "The
//! parking lot"): the [`Keeper`] inside every worker, and [`take_waiting`]
//! for `requeue`, on one [`Intake`].
//!
//! The order of the steps is the guarantee: take a batch of deliveries,
//! store it in one statement ([`lot::store`]), and only after that commit
//! ack the batch (one `multiple` ack). A crash in between leaves the batch
//! unacked: the broker hands it out again and the one-row-per-message rule
//! stores it once. While the database is unreachable the keeper stops
//! taking: it cancels its consumer and keeps the deliveries it holds,
//! unacked, on its live channel, trying the batch again with backoff.
//! Nothing is nacked or requeued, so no delivery is counted against a
//! message (quorum queues on RabbitMQ 4 count every return), and the rest
//! waits in `Q.dlq`. Once the batch commits it acks and consumes again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::protocol::AMQPSoftError;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::lot::{self, Stored};
use super::record::Parking;
use crate::broker::{self, Reconnect};
use crate::metrics::{Metrics, MoveResult};
use crate::retry::reconnect_backoff as backoff;
use crate::store;
use crate::topology::MainQueue;

/// Most deliveries stored in one statement.
pub const BATCH_MAX: usize = 500;
/// Unacked deliveries the broker may send ahead: the next batch arrives
/// while one is being stored.
const PREFETCH: u16 = 1000;
/// How long a batch waits for one more delivery before it goes.
const GATHER_WAIT: Duration = Duration::from_millis(10);
/// How long `requeue` waits for a delivery before it asks whether `Q.dlq`
/// is empty.
const TAKE_IDLE: Duration = Duration::from_millis(200);
/// How often the keeper refreshes `iot_parked_messages`.
const STATS_INTERVAL: Duration = Duration::from_secs(10);
/// How often retried and archived rows past their retention are deleted.
const CLEANUP_INTERVAL: Duration = Duration::from_secs(3600);
/// Rows deleted per statement, so cleanup never holds long locks.
const CLEANUP_CHUNK: i64 = 10_000;

/// Why taking from `Q.dlq` stopped.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("RabbitMQ: {0}")]
    Broker(#[from] lapin::Error),
    #[error("RabbitMQ: the consumer of '{0}' was cancelled or its channel closed")]
    ConsumerEnded(String),
    #[error("PostgreSQL: {0}; the messages stay in the DLQ")]
    Database(#[from] sqlx::Error),
}

/// A channel consuming `Q.dlq`, handing its deliveries out in batches.
pub struct Intake {
    channel: Channel,
    consumer: Option<Consumer>,
    dlq: String,
}

impl Intake {
    /// Opens a channel of its own on `connection` and consumes `dlq`.
    ///
    /// # Errors
    /// The broker error (a missing queue closes only this channel).
    pub async fn open(connection: &Connection, dlq: &str) -> Result<Intake, IntakeError> {
        let channel = connection.create_channel().await?;
        channel.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
        let mut intake = Intake {
            channel,
            consumer: None,
            dlq: dlq.to_owned(),
        };
        intake.consume().await?;
        Ok(intake)
    }

    async fn consume(&mut self) -> Result<(), IntakeError> {
        let consumer = self
            .channel
            .basic_consume(
                self.dlq.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.consumer = Some(consumer);
        Ok(())
    }

    /// Up to `max` deliveries: waits at most `idle` for the first (an empty
    /// batch then), then takes what follows within [`GATHER_WAIT`] of the
    /// last.
    ///
    /// # Errors
    /// [`IntakeError::ConsumerEnded`] when the consumer or its channel ends.
    pub async fn gather(&mut self, max: usize, idle: Duration) -> Result<Vec<Delivery>, IntakeError> {
        let dlq = self.dlq.clone();
        let Some(consumer) = self.consumer.as_mut() else {
            return Ok(Vec::new());
        };
        let mut batch = Vec::new();
        let mut wait = idle;
        while batch.len() < max {
            match tokio::time::timeout(wait, consumer.next()).await {
                Err(_) => break,
                Ok(Some(delivery)) => batch.push(delivery?),
                Ok(None) => return Err(IntakeError::ConsumerEnded(dlq)),
            }
            wait = GATHER_WAIT;
        }
        Ok(batch)
    }

    /// Stops taking: cancels the consumer and adds to `held` what the
    /// broker had already sent, so every unacked delivery of the channel is
    /// in `held`.
    ///
    /// # Errors
    /// The broker error.
    pub async fn pause(&mut self, held: &mut Vec<Delivery>) -> Result<(), IntakeError> {
        let Some(mut consumer) = self.consumer.take() else {
            return Ok(());
        };
        self.channel
            .basic_cancel(consumer.tag().as_str().into(), BasicCancelOptions::default())
            .await?;
        // After the cancel-ok the stream yields what it holds, then ends.
        while let Some(delivery) = consumer.next().await {
            held.push(delivery?);
        }
        Ok(())
    }

    /// Takes again after [`Intake::pause`].
    ///
    /// # Errors
    /// The broker error.
    pub async fn resume(&mut self) -> Result<(), IntakeError> {
        if self.consumer.is_none() {
            self.consume().await?;
        }
        Ok(())
    }

    /// Acks every delivery up to the batch's last, in one `multiple` ack:
    /// the batch holds every unacked delivery of the channel, in order.
    ///
    /// # Errors
    /// The broker error.
    pub async fn ack(&self, batch: &[Delivery]) -> Result<(), IntakeError> {
        if let Some(last) = batch.last() {
            last.acker.ack(BasicAckOptions { multiple: true }).await?;
        }
        Ok(())
    }

    /// Closes the channel; unacked deliveries go back to `Q.dlq`.
    pub async fn close(self) {
        let close = self.channel.close(200, "done".into());
        tokio::time::timeout(Duration::from_secs(1), close).await.ok();
    }
}

/// Stores one batch of deliveries from `queue`'s DLQ, within
/// [`store::DEADLINE`].
///
/// # Errors
/// The database error; nothing is stored then.
pub async fn store_batch(pool: &PgPool, queue: &str, batch: &[Delivery]) -> Result<Stored, sqlx::Error> {
    let parkings: Vec<Parking> = batch.iter().map(|d| Parking::of(&d.properties, &d.data)).collect();
    store::deadline(async {
        let mut conn = pool.acquire().await?;
        lot::store(&mut conn, queue, &parkings).await
    })
    .await
}

/// Ready messages in `queue`, `None` when it does not exist. Uses a channel
/// of its own (a passive declare of a missing queue closes it).
///
/// # Errors
/// The broker error.
pub async fn queue_depth(connection: &Connection, queue: &str) -> Result<Option<u32>, lapin::Error> {
    let channel = connection.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let result = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await;
    match result {
        Ok(q) => {
            channel.close(200, "".into()).await.ok();
            Ok(Some(q.message_count()))
        }
        Err(e) if matches!(broker::soft_error(&e), Some((AMQPSoftError::NOTFOUND, _))) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Moves everything waiting in `queue`'s DLQ into the lot, batch by batch
/// (store, then ack), until it is empty: what `requeue` does first, so it
/// works with no worker running. Returns what was stored.
///
/// # Errors
/// An [`IntakeError`]; the batch being stored goes back to the DLQ when the
/// channel closes.
pub async fn take_waiting(connection: &Connection, pool: &PgPool, queue: &str) -> Result<Stored, IntakeError> {
    let dlq = MainQueue::new(queue).dlq();
    let mut total = Stored::default();
    if queue_depth(connection, &dlq).await?.unwrap_or(0) == 0 {
        return Ok(total);
    }
    let mut intake = Intake::open(connection, &dlq).await?;
    loop {
        let batch = intake.gather(BATCH_MAX, TAKE_IDLE).await?;
        if batch.is_empty() {
            if queue_depth(connection, &dlq).await?.unwrap_or(0) == 0 {
                break;
            }
            continue;
        }
        let stored = store_batch(pool, queue, &batch).await?;
        intake.ack(&batch).await?;
        total.new += stored.new;
        total.again += stored.again;
        total.duplicates += stored.duplicates;
    }
    intake.close().await;
    Ok(total)
}

/// The keeper's dependencies (one per worker process).
pub struct Keeper {
    pub pool: PgPool,
    pub amqp_url: String,
    /// The main queue `Q`; the keeper takes from `Q.dlq`.
    pub queue: String,
    /// `PARKED_RETENTION_DAYS`.
    pub retention: Duration,
    pub metrics: Arc<Metrics>,
}

/// When the next housekeeping jobs are due.
struct Housekeeping {
    stats_due: Instant,
    cleanup_due: Instant,
}

impl Keeper {
    /// Keeps the lot until `shutdown`, on a broker connection of its own
    /// (`worker-iot-core parking keeper`), rebuilt with backoff.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut due = Housekeeping {
            stats_due: Instant::now(),
            cleanup_due: Instant::now(),
        };
        let mut reconnect = Reconnect::new(&self.amqp_url, "worker-iot-core parking keeper", backoff);
        loop {
            let error = match reconnect.connect(&shutdown).await {
                None => return,
                Some(Ok(connection)) => {
                    let result = self.session(&connection, &mut due, &shutdown).await;
                    broker::close(connection, "keeper stopping").await;
                    match result {
                        Ok(()) => return,
                        Err(e) => e.to_string(),
                    }
                }
                Some(Err(e)) => e,
            };
            if !reconnect.pause(&error, &shutdown).await {
                return;
            }
        }
    }

    /// Takes from `Q.dlq` on one connection until shutdown (`Ok`) or a
    /// broker failure (`Err`, to reconnect). Waits for the worker's session
    /// to declare `Q.dlq` first.
    async fn session(
        &self,
        connection: &Connection,
        due: &mut Housekeeping,
        shutdown: &CancellationToken,
    ) -> Result<(), IntakeError> {
        let dlq = MainQueue::new(&self.queue).dlq();
        let mut delays = backoff();
        while queue_depth(connection, &dlq).await?.is_none() {
            let delay = delays.next().unwrap_or(Duration::from_secs(10));
            tracing::debug!(queue = %dlq, ?delay, "parking keeper: waiting for the DLQ to be declared");
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(delay) => {}
            }
        }
        let mut intake = Intake::open(connection, &dlq).await?;
        tracing::info!(queue = %dlq, "parking keeper: moving parked messages into the lot");
        loop {
            self.housekeeping(due).await;
            let batch = tokio::select! {
                () = shutdown.cancelled() => break,
                batch = intake.gather(BATCH_MAX, STATS_INTERVAL) => batch?,
            };
            if !batch.is_empty() && !self.keep(&mut intake, batch, shutdown).await? {
                break;
            }
        }
        intake.close().await;
        Ok(())
    }

    /// Stores `batch` and acks it. While the database refuses, stops taking
    /// and tries again with backoff. Returns `false` when shutdown came
    /// first (the held deliveries go back to `Q.dlq` with the channel).
    async fn keep(
        &self,
        intake: &mut Intake,
        mut batch: Vec<Delivery>,
        shutdown: &CancellationToken,
    ) -> Result<bool, IntakeError> {
        let mut delays = backoff();
        loop {
            match store_batch(&self.pool, &self.queue, &batch).await {
                Ok(stored) => {
                    intake.ack(&batch).await?;
                    self.record(stored);
                    intake.resume().await?;
                    self.metrics.set_parking_paused(false);
                    return Ok(true);
                }
                Err(e) => {
                    self.metrics.record_parking_error();
                    intake.pause(&mut batch).await?;
                    self.metrics.set_parking_paused(true);
                    let delay = delays.next().unwrap_or(Duration::from_secs(10));
                    tracing::warn!(error.message = %e, held = batch.len(), ?delay,
                                   "parking keeper: cannot store parked messages; not taking from the DLQ until the database answers");
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(false),
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    fn record(&self, stored: Stored) {
        self.metrics.record_parking_moves(MoveResult::Stored, stored.new);
        self.metrics.record_parking_moves(MoveResult::ParkedAgain, stored.again);
        self.metrics
            .record_parking_moves(MoveResult::Duplicate, stored.duplicates);
        if stored.again > 0 || stored.duplicates > 0 {
            tracing::info!(
                new = stored.new,
                parked_again = stored.again,
                duplicates = stored.duplicates,
                "parking keeper: stored a batch"
            );
        }
    }

    /// Refreshes the gauge and deletes rows past their retention, each when
    /// due. Errors are logged: housekeeping never stops the keeper.
    async fn housekeeping(&self, due: &mut Housekeeping) {
        let now = Instant::now();
        // Cleanup first, so the counts that follow leave out what it deleted.
        if now >= due.cleanup_due {
            due.cleanup_due = now + CLEANUP_INTERVAL;
            match store::deadline(self.delete_expired()).await {
                Ok(0) => {}
                Ok(rows) => tracing::info!(
                    rows,
                    "deleted retried and archived parked messages past their retention"
                ),
                Err(e) => tracing::warn!(error.message = %e, "parking keeper: retention cleanup failed"),
            }
        }
        if now >= due.stats_due {
            due.stats_due = now + STATS_INTERVAL;
            match store::deadline(lot::counts(&self.pool, &self.queue)).await {
                Ok(counts) => self.metrics.set_parked(&counts),
                Err(e) => tracing::debug!(error.message = %e, "parking keeper: cannot count the lot"),
            }
        }
    }

    async fn delete_expired(&self) -> Result<u64, sqlx::Error> {
        let mut total = 0;
        loop {
            let deleted = lot::delete_expired(&self.pool, self.retention, CLEANUP_CHUNK).await?;
            total += deleted;
            if deleted < CLEANUP_CHUNK as u64 {
                return Ok(total);
            }
        }
    }
}
