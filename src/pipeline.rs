//! One delivery, from bytes to settlement (SPEC §2.3): admit → process →
//! settle.
//!
//! Ordering invariants, the heart of the no-loss promise:
//!
//! * a delivery is acked only after its transaction committed, or after
//!   the copy it became (retry or DLQ) was confirmed by the broker;
//! * when that copy is not confirmed, the delivery is not acked at all: the
//!   caller treats it as a broker fault and the broker redelivers it;
//! * nothing is ever rejected with requeue, so nothing can loop.

use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::Retryable;
use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::broker::{PublishError, Publisher};
use crate::crash_guard::{Admission, CrashGuard};
use crate::divert::{self, Origin, Writer};
use crate::envelope::{self, Message};
use crate::failure::{Failed, Failure};
use crate::handlers::{self, Handler};
use crate::headers;
use crate::retry::Disposition;
use crate::store;
use crate::topology::Topology;

/// How a delivery ended. Every delivery ends in exactly one of these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Processed,
    Duplicate,
    Omitted,
    /// Copied to a retry queue or the DLQ, as the retry policy decided.
    Diverted(Disposition),
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

/// What happens to a delivery, as the pipeline goes. Metrics and tests
/// follow the worker through these.
#[derive(Debug)]
pub enum Event<'a> {
    /// Before anything is done with it.
    Received(&'a Delivery),
    /// Acked, with its outcome and how the handling went.
    Settled(&'a Delivery, &'a Outcome, &'a Handling),
    /// Left unacked for redelivery; the session ends.
    Unsettled(&'a Delivery, &'a SettleError),
    /// Dropped unfinished at the end of the grace period (see
    /// [`Pipeline::cut_off`]): left unacked for redelivery.
    CutOff(&'a Delivery),
}

/// How a settled delivery was handled: what metrics need besides the
/// outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Handling {
    /// The envelope's `type`, once decoded (`None` when it was not).
    pub message_type: Option<String>,
    /// Runs of the transaction after the first, in process (stage 1).
    pub in_process_retries: u32,
    /// From receipt to settlement.
    pub elapsed: Duration,
}

/// Called with every [`Event`].
pub type EventHook = Arc<dyn Fn(&Event<'_>) + Send + Sync>;

/// How deliveries are processed: built once at start-up, shared by every
/// broker session.
pub struct Pipeline {
    pool: PgPool,
    topology: Arc<Topology>,
    events_to_omit: BTreeSet<String>,
    max_message_bytes: usize,
    /// `host/version`, for `iot-failed-by`.
    failed_by: String,
    /// Once cancelled, no new in-process retry starts.
    shutdown: CancellationToken,
    crash_guard: CrashGuard,
    hooks: Vec<EventHook>,
}

/// The pipeline's settings, from the worker's.
pub struct PipelineConfig {
    pub pool: PgPool,
    pub topology: Arc<Topology>,
    pub events_to_omit: BTreeSet<String>,
    pub max_message_bytes: usize,
    pub failed_by: String,
    pub shutdown: CancellationToken,
    pub hooks: Vec<EventHook>,
}

/// Where one broker session's copies go: its confirmed publisher, and the
/// connection's negotiated frame size (a copy's headers must fit).
pub struct Outlet {
    pub publisher: Publisher,
    pub frame_max: usize,
}

impl Pipeline {
    pub fn new(config: PipelineConfig) -> Pipeline {
        Pipeline {
            crash_guard: CrashGuard::new(config.pool.clone(), config.topology.crash_loop_limit()),
            pool: config.pool,
            topology: config.topology,
            events_to_omit: config.events_to_omit,
            max_message_bytes: config.max_message_bytes,
            failed_by: config.failed_by,
            shutdown: config.shutdown,
            hooks: config.hooks,
        }
    }

    pub fn crash_guard(&self) -> &CrashGuard {
        &self.crash_guard
    }

    /// Processes one delivery and settles it, telling the hooks.
    ///
    /// # Errors
    /// A [`SettleError`] when the delivery could not be settled.
    pub async fn handle(&self, delivery: &Delivery, outlet: &Outlet) -> Result<Outcome, SettleError> {
        let started = Instant::now();
        self.emit(&Event::Received(delivery));
        let mut handling = Handling::default();
        let result = self.admit_process_settle(delivery, outlet, &mut handling).await;
        handling.elapsed = started.elapsed();
        match &result {
            Ok(outcome) => self.emit(&Event::Settled(delivery, outcome, &handling)),
            Err(e) => self.emit(&Event::Unsettled(delivery, e)),
        }
        result
    }

    /// A delivery whose run was cut off by the end of the shutdown grace
    /// period (see [`CrashGuard::cut_off`]).
    pub async fn cut_off(&self, delivery: &Delivery) {
        self.emit(&Event::CutOff(delivery));
        self.crash_guard.cut_off(delivery).await;
    }

    fn emit(&self, event: &Event<'_>) {
        for hook in &self.hooks {
            hook(event);
        }
    }

    async fn admit_process_settle(
        &self,
        delivery: &Delivery,
        outlet: &Outlet,
        handling: &mut Handling,
    ) -> Result<Outcome, SettleError> {
        // The time of an envelope without `time`: the same on every attempt.
        let received = headers::first_received(&delivery.properties).unwrap_or_else(Utc::now);
        let (permit, processed) = match self.crash_guard.admit(delivery).await {
            Admission::Run(permit) => (permit, self.process(delivery, received, handling).await),
            Admission::Fail(permit, failure) => (permit, Err(Failed::untyped(failure))),
        };
        let outcome = match processed {
            Ok(outcome) => outcome,
            Err(failed) => self.divert(delivery, received, &failed, outlet).await?,
        };
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(SettleError::Ack)?;
        permit.settled().await;
        Ok(outcome)
    }

    /// Decodes and applies, noting the type and the in-process retries in
    /// `handling`.
    async fn process(
        &self,
        delivery: &Delivery,
        received: DateTime<Utc>,
        handling: &mut Handling,
    ) -> Result<Outcome, Failed> {
        let amqp_id = delivery.properties.message_id().as_ref().map(|id| id.as_str());
        let message =
            envelope::decode(&delivery.data, amqp_id, received, self.max_message_bytes).map_err(Failed::untyped)?;
        handling.message_type = Some(message.message_type.clone());
        if self.events_to_omit.contains(&message.message_type) {
            return Ok(Outcome::Omitted);
        }
        let result = match handlers::lookup(&message) {
            Ok(handler) => {
                self.apply_with_retries(handler, &message, &mut handling.in_process_retries)
                    .await
            }
            Err(failure) => Err(failure),
        };
        result.map_err(|failure| Failed {
            message_type: Some(message.message_type),
            failure,
        })
    }

    /// Stage 1: runs the transaction again on transient failures, with the
    /// policy's backoff, unless shutdown has begun.
    async fn apply_with_retries(
        &self,
        handler: &Handler,
        message: &Message,
        retries: &mut u32,
    ) -> Result<Outcome, Failure> {
        (|| self.apply_once(handler, message))
            .retry(self.topology.retry.in_process_backoff())
            .sleep(tokio::time::sleep)
            .when(|failure| failure.is_transient() && !self.shutdown.is_cancelled())
            .notify(|failure, delay| {
                *retries += 1;
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

    /// Stage 2 or parking: publishes the copy the retry policy plans and
    /// waits for the confirm.
    async fn divert(
        &self,
        delivery: &Delivery,
        received: DateTime<Utc>,
        failed: &Failed,
        outlet: &Outlet,
    ) -> Result<Outcome, SettleError> {
        let origin = Origin {
            properties: &delivery.properties,
            exchange: delivery.exchange.as_str(),
            routing_key: delivery.routing_key.as_str(),
            received,
        };
        let writer = Writer {
            failed_by: &self.failed_by,
            frame_max: outlet.frame_max,
        };
        let plan = divert::plan(&origin, failed, &self.topology, writer, Utc::now());
        outlet
            .publisher
            .publish("", &plan.routing_key, &delivery.data, plan.properties)
            .await?;
        let routing_key = &plan.routing_key;
        let error = &failed.failure;
        match &plan.outcome {
            Outcome::Diverted(Disposition::Park { kind }) => {
                tracing::warn!(%routing_key, error.kind = %kind, error.message = %error, "message parked");
            }
            _ => tracing::info!(%routing_key, error.message = %error, "message sent to delayed retry"),
        }
        Ok(plan.outcome)
    }
}
