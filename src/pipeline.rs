//! One delivery, from bytes to settlement (SPEC §2.3).
//!
//! Ordering invariants, the heart of the no-loss promise:
//!
//! * a delivery is acked only after its transaction committed, or after
//!   the copy it became (retry or DLQ) was confirmed by the broker;
//! * when that copy is not confirmed, the delivery is not acked at all: the
//!   caller treats it as a broker fault and the broker redelivers it;
//! * nothing is ever rejected with requeue, so nothing can loop.

use std::collections::{BTreeSet, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio::sync::RwLock;
use tokio_util::sync::CancellationToken;

use crate::broker::{PublishError, Publisher};
use crate::envelope::{self, Message};
use crate::failure::{Disposition, ErrorKind, Failure};
use crate::handlers::{self, Handler};
use crate::headers::{self, FailureRecord};
use crate::store;
use crate::topology::{self, Topology};

const IN_PROCESS_MIN_DELAY: Duration = Duration::from_millis(50);
const IN_PROCESS_MAX_DELAY: Duration = Duration::from_millis(500);
/// Stage 1 sleeps at most this long in all before handing over to stage 2.
const IN_PROCESS_TOTAL_DELAY: Duration = Duration::from_secs(2);

/// How a delivery ended. Every delivery ends in exactly one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Processed,
    Duplicate,
    Omitted,
    Retried { retry: u32 },
    Parked { kind: ErrorKind },
}

/// A delivery that could not be settled; it is left unacked, and the
/// caller must drop the connection so the broker redelivers it.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("ack failed: {0}")]
    Ack(#[source] lapin::Error),
}

/// What the pipeline needs, shared by every in-flight delivery.
pub struct Pipeline {
    pub pool: PgPool,
    pub publisher: Publisher,
    pub topology: Arc<Topology>,
    /// The main queue `Q`.
    pub queue: String,
    pub events_to_omit: BTreeSet<String>,
    pub max_message_bytes: usize,
    /// `host/version`, for `iot-failed-by`.
    pub failed_by: String,
    /// Once cancelled, no new in-process retry starts.
    pub shutdown: CancellationToken,
    /// Redelivered messages take it for writing, so each runs alone: one
    /// that crashed the process cannot take innocent messages down with it
    /// again, and only its own redeliveries are counted.
    pub isolation: RwLock<()>,
    /// Called with every delivery before it is processed (tests use it to
    /// see the headers of each attempt).
    pub observer: Option<DeliveryObserver>,
    /// Identifies this worker process in the redelivery counts.
    pub boot_id: String,
    /// The connection's negotiated frame size: a copy's headers must fit.
    pub frame_max: usize,
    /// Redelivered deliveries in flight, by [`delivery_key`].
    pub redelivered_in_flight: Mutex<HashMap<String, u32>>,
}

/// One redelivered copy of a message in flight in this process; leaving
/// (on drop) takes it off the count.
struct InFlightCopy<'a> {
    copies: &'a Mutex<HashMap<String, u32>>,
    key: &'a str,
}

impl<'a> InFlightCopy<'a> {
    fn enter(copies: &'a Mutex<HashMap<String, u32>>, key: &'a str) -> InFlightCopy<'a> {
        *lock(copies).entry(key.to_owned()).or_insert(0) += 1;
        InFlightCopy { copies, key }
    }

    /// Whether no other copy of the message is in flight here.
    fn is_last(&self) -> bool {
        lock(self.copies).get(self.key).is_none_or(|n| *n <= 1)
    }
}

impl Drop for InFlightCopy<'_> {
    fn drop(&mut self) {
        let mut copies = lock(self.copies);
        if let Some(n) = copies.get_mut(self.key) {
            *n -= 1;
            if *n == 0 {
                copies.remove(self.key);
            }
        }
    }
}

/// The map stays consistent even if a holder panicked: every update is a
/// single step.
fn lock(copies: &Mutex<HashMap<String, u32>>) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
    copies.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// See [`Pipeline::observer`].
pub type DeliveryObserver = Arc<dyn Fn(&Delivery) + Send + Sync>;

impl Pipeline {
    /// Processes one delivery and settles it.
    ///
    /// # Errors
    /// A [`SettleError`] when the delivery could not be settled.
    pub async fn handle(&self, delivery: &Delivery) -> Result<Outcome, SettleError> {
        if let Some(observer) = &self.observer {
            observer(delivery);
        }
        // The time of an envelope without `time`: the same on every attempt.
        let received = headers::first_received(&delivery.properties).unwrap_or_else(Utc::now);
        if !delivery.redelivered {
            let _shared = self.isolation.read().await;
            return self
                .settle(delivery, received, self.process(delivery, received).await)
                .await;
        }
        let key = delivery_key(delivery);
        // Copies with the same id and body share one count row: only the
        // last of them in flight here forgets it.
        let copy = InFlightCopy::enter(&self.redelivered_in_flight, &key);
        let _alone = self.isolation.write().await;
        // Crash-loop protection: redeliveries are counted durably before the
        // message runs, and it is parked once its deliveries reach
        // min(delivery_limit, max_attempts). Counting happens only when the
        // message is about to run alone, so messages that were merely in
        // flight when another one crashed the process are not blamed. On
        // quorum queues x-delivery-limit stays as the broker's backstop; it
        // dead-letters only after limit + 1 deliveries, so the worker parks
        // first, with headers.
        let limit = self.topology.delivery_limit.min(self.topology.max_attempts);
        let processed = match store::deadline(store::count_redelivery(&self.pool, &key, &self.boot_id)).await {
            Ok(redeliveries) if redeliveries.saturating_add(1) >= limit => (
                "-".to_owned(),
                Err(Failure::CrashLoop {
                    deliveries: redeliveries.saturating_add(1),
                }),
            ),
            Ok(_) => self.process(delivery, received).await,
            Err(e) => ("-".to_owned(), Err(Failure::Database(e))),
        };
        let outcome = self.settle(delivery, received, processed).await?;
        if copy.is_last()
            && let Err(e) = store::deadline(store::forget_redeliveries(&self.pool, &key)).await
        {
            tracing::debug!(error.message = %e, "could not forget a redelivery count");
        }
        Ok(outcome)
    }

    /// A redelivered delivery whose run was cut off by the end of the
    /// shutdown grace period: that was no crash, so the count its run added
    /// is taken back (a slow message must not be parked as a crash loop by
    /// rolling restarts). Bounded, since the process is stopping.
    pub async fn cut_off(&self, delivery: &Delivery) {
        if !delivery.redelivered {
            return;
        }
        let key = delivery_key(delivery);
        let uncount = store::uncount_redelivery(&self.pool, &key, &self.boot_id);
        match tokio::time::timeout(Duration::from_secs(1), uncount).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error.message = %e, "could not take back a redelivery count"),
            Err(_) => tracing::debug!("taking back a redelivery count timed out"),
        }
    }

    /// Acks a delivery that ended well; diverts a failed one to its retry
    /// queue or the DLQ first.
    async fn settle(
        &self,
        delivery: &Delivery,
        received: DateTime<Utc>,
        (handler_name, result): (String, Result<Outcome, Failure>),
    ) -> Result<Outcome, SettleError> {
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(failure) => self.divert(delivery, received, handler_name, &failure).await?,
        };
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(SettleError::Ack)?;
        Ok(outcome)
    }

    /// Decodes and applies; returns the handler name (or `-`) with the
    /// result, for the failure headers.
    async fn process(&self, delivery: &Delivery, received: DateTime<Utc>) -> (String, Result<Outcome, Failure>) {
        let amqp_id = delivery.properties.message_id().as_ref().map(|id| id.as_str());
        let message = match envelope::decode(&delivery.data, amqp_id, received, self.max_message_bytes) {
            Ok(message) => message,
            Err(e) => return ("-".into(), Err(e.into())),
        };
        let name = message.message_type.clone();
        if self.events_to_omit.contains(&message.message_type) {
            return (name, Ok(Outcome::Omitted));
        }
        let result = match handlers::lookup(&message) {
            Ok(handler) => self.apply_with_retries(handler, &message).await,
            Err(failure) => Err(failure),
        };
        (name, result)
    }

    /// Stage 1: runs the transaction again on transient failures, with
    /// jittered exponential backoff, unless shutdown has begun.
    async fn apply_with_retries(&self, handler: &Handler, message: &Message) -> Result<Outcome, Failure> {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(IN_PROCESS_MIN_DELAY)
            .with_max_delay(IN_PROCESS_MAX_DELAY)
            .with_max_times(self.topology.in_process_attempts.saturating_sub(1) as usize)
            .with_total_delay(Some(IN_PROCESS_TOTAL_DELAY))
            .with_jitter();
        (|| self.apply_once(handler, message))
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|failure| failure.is_transient() && !self.shutdown.is_cancelled())
            .notify(|failure, delay| {
                tracing::debug!(message_id = %message.id, error.message = %failure, ?delay, "transient failure, retrying in process");
            })
            .await
    }

    /// One transaction: inbox row, handler, commit. A handler panic rolls
    /// the transaction back (it is dropped) and becomes [`Failure::Panic`].
    async fn apply_once(&self, handler: &Handler, message: &Message) -> Result<Outcome, Failure> {
        let transaction = async {
            let mut tx = self.pool.begin().await?;
            if !store::record_in_inbox(&mut tx, message).await? {
                return Ok(Outcome::Duplicate);
            }
            (handler.apply)(&mut tx, message).await?;
            tx.commit().await?;
            Ok(Outcome::Processed)
        };
        match AssertUnwindSafe(store::deadline(transaction)).catch_unwind().await {
            Ok(result) => result,
            Err(panic) => {
                let text = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic payload".into());
                Err(Failure::Panic(text))
            }
        }
    }

    /// Stage 2 or parking: publishes the failed delivery, with the failure
    /// headers, to its retry queue or the DLQ, and waits for the confirm.
    async fn divert(
        &self,
        delivery: &Delivery,
        received: DateTime<Utc>,
        handler: String,
        failure: &Failure,
    ) -> Result<Outcome, SettleError> {
        let retries = headers::retry_count(delivery.properties.headers().as_ref());
        let disposition = failure.disposition(retries, &self.topology);
        let (routing_key, kind, retry_count, outcome) = match disposition {
            Disposition::RetryLater { retry } => (
                topology::retry_queue_name(&self.queue, &self.topology.retry_delay(retry).name),
                failure.kind(),
                retry,
                Outcome::Retried { retry },
            ),
            Disposition::Park { kind } => (topology::dlq_name(&self.queue), kind, retries, Outcome::Parked { kind }),
        };
        let error = failure.to_string();
        let record = FailureRecord {
            kind,
            handler: &handler,
            error: &error,
            retry_count,
            now_ms: Utc::now().timestamp_millis(),
            received_ms: received.timestamp_millis(),
            exchange: delivery.exchange.as_str(),
            routing_key: delivery.routing_key.as_str(),
            failed_by: &self.failed_by,
        };
        let properties = headers::fit_frame(headers::with_failure(&delivery.properties, &record), self.frame_max);
        self.publisher
            .publish("", &routing_key, &delivery.data, properties)
            .await?;
        match outcome {
            Outcome::Parked { .. } => {
                tracing::warn!(%routing_key, error.kind = %kind, error.message = %error, "message parked");
            }
            _ => {
                tracing::info!(%routing_key, error.message = %error, "message sent to delayed retry")
            }
        }
        Ok(outcome)
    }
}

/// Identifies a delivery across redeliveries: its AMQP message id and body.
fn delivery_key(delivery: &Delivery) -> String {
    let mut hasher = Sha256::new();
    if let Some(id) = delivery.properties.message_id() {
        hasher.update(id.as_str().as_bytes());
    }
    hasher.update([0]);
    hasher.update(&delivery.data);
    hex::encode(hasher.finalize())
}
