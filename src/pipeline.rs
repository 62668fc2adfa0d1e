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
//!
//! Each delivery runs in one span (`process <queue>`, kind consumer, the
//! messaging semantic conventions), the child of the trace context in its
//! headers ([`crate::telemetry`]); its children are each transaction (with
//! the handler and the commit) and the publish of a retry or DLQ copy,
//! which carries the publish span's context on.

use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use backon::Retryable;
use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use opentelemetry::trace::Status;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::broker::{PublishError, Publisher};
use crate::crash_guard::{Admission, CrashGuard};
use crate::divert::{self, Origin, Writer};
use crate::envelope::{self, Message};
use crate::failure::{Failed, Failure};
use crate::handlers::{self, Handler};
use crate::headers;
use crate::retry::Disposition;
use crate::store;
use crate::telemetry;
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

impl Outcome {
    /// A short name, for spans and logs: `processed`, `duplicate`,
    /// `omitted`, `retry` or `parked`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Processed => "processed",
            Outcome::Duplicate => "duplicate",
            Outcome::Omitted => "omitted",
            Outcome::Diverted(Disposition::RetryLater { .. }) => "retry",
            Outcome::Diverted(Disposition::Park { .. }) => "parked",
        }
    }
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
    /// Acked, with its outcome.
    Settled(&'a Delivery, &'a Outcome),
    /// Left unacked for redelivery; the session ends.
    Unsettled(&'a Delivery, &'a SettleError),
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
        let span = self.delivery_span(delivery);
        async {
            self.emit(&Event::Received(delivery));
            let result = self.admit_process_settle(delivery, outlet).await;
            let span = Span::current();
            match &result {
                Ok(outcome) => {
                    span.record("iot.outcome", outcome.as_str());
                    self.emit(&Event::Settled(delivery, outcome));
                }
                Err(e) => {
                    span.record("iot.outcome", "unsettled");
                    self.emit(&Event::Unsettled(delivery, e));
                }
            }
            result
        }
        .instrument(span)
        .await
    }

    /// The span of one delivery, the child of the trace context in its
    /// headers. At `warn`, so that every line logged about the delivery
    /// (the least verbose is "message parked", at warn) carries its fields
    /// whatever `RUST_LOG` says; its children are at `debug`, exported but
    /// not created when nothing is exported. The message id is the AMQP one until the
    /// envelope is decoded; the type comes with decoding.
    fn delivery_span(&self, delivery: &Delivery) -> Span {
        let queue = self.topology.queue();
        let headers = delivery.properties.headers().as_ref();
        let span = tracing::warn_span!(
            "process",
            otel.name = %format_args!("process {queue}"),
            otel.kind = "consumer",
            messaging.system = "rabbitmq",
            messaging.operation.type = "process",
            messaging.destination.name = %queue,
            messaging.rabbitmq.destination.routing_key = %delivery.routing_key,
            messaging.message.id = tracing::field::Empty,
            iot.message.type = tracing::field::Empty,
            iot.attempt = u64::from(headers::retry_count(headers)) + 1,
            iot.outcome = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        if let Some(id) = delivery.properties.message_id() {
            span.record("messaging.message.id", id.as_str());
        }
        if let Some(trace_id) = telemetry::continue_trace(&span, headers) {
            span.record("trace_id", tracing::field::display(trace_id));
        }
        span
    }

    /// A delivery whose run was cut off by the end of the shutdown grace
    /// period (see [`CrashGuard::cut_off`]).
    pub async fn cut_off(&self, delivery: &Delivery) {
        self.crash_guard.cut_off(delivery).await;
    }

    fn emit(&self, event: &Event<'_>) {
        for hook in &self.hooks {
            hook(event);
        }
    }

    async fn admit_process_settle(&self, delivery: &Delivery, outlet: &Outlet) -> Result<Outcome, SettleError> {
        // The time of an envelope without `time`: the same on every attempt.
        let received = headers::first_received(&delivery.properties).unwrap_or_else(Utc::now);
        let (permit, processed) = match self.crash_guard.admit(delivery).await {
            Admission::Run(permit) => (permit, self.process(delivery, received).await),
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

    /// Decodes and applies.
    async fn process(&self, delivery: &Delivery, received: DateTime<Utc>) -> Result<Outcome, Failed> {
        let amqp_id = delivery.properties.message_id().as_ref().map(|id| id.as_str());
        let message =
            envelope::decode(&delivery.data, amqp_id, received, self.max_message_bytes).map_err(Failed::untyped)?;
        // The delivery's span (see `handle`), named by the idempotency key.
        let span = Span::current();
        if amqp_id != Some(message.id.as_str()) {
            span.record("messaging.message.id", message.id.as_str());
        }
        span.record("iot.message.type", message.message_type.as_str());
        if self.events_to_omit.contains(&message.message_type) {
            return Ok(Outcome::Omitted);
        }
        let result = match handlers::lookup(&message) {
            Ok(handler) => self.apply_with_retries(handler, &message).await,
            Err(failure) => Err(failure),
        };
        result.map_err(|failure| Failed {
            message_type: Some(message.message_type),
            failure,
        })
    }

    /// Stage 1: runs the transaction again on transient failures, with the
    /// policy's backoff, unless shutdown has begun.
    async fn apply_with_retries(&self, handler: &Handler, message: &Message) -> Result<Outcome, Failure> {
        (|| self.apply_once(handler, message))
            .retry(self.topology.retry.in_process_backoff())
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
            let handler_span = tracing::debug_span!(
                "handler",
                otel.name = %format_args!("handler {}", handler.message_type),
                iot.message.type = handler.message_type,
            );
            (handler.apply)(&mut tx, message).instrument(handler_span).await?;
            tx.commit().instrument(tracing::debug_span!("commit")).await?;
            Ok(Outcome::Processed)
        }
        .instrument(tracing::debug_span!("transaction", db.system.name = "postgresql"));
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
        let routing_key = &plan.routing_key;
        let fingerprint = headers::read_string(plan.properties.headers().as_ref(), headers::ERROR_FINGERPRINT);
        // The copy carries the publish span's context: the next attempt
        // (or the requeued message) is its child, in the same trace.
        let publish = tracing::debug_span!(
            "publish",
            otel.name = %format_args!("publish {routing_key}"),
            otel.kind = "producer",
            messaging.system = "rabbitmq",
            messaging.operation.type = "send",
            messaging.destination.name = %routing_key,
        );
        let properties = telemetry::with_context_of(&publish, plan.properties);
        outlet
            .publisher
            .publish("", routing_key, &delivery.data, properties)
            .instrument(publish)
            .await?;
        let error = &failed.failure;
        match &plan.outcome {
            Outcome::Diverted(Disposition::Park { kind }) => {
                // The final failure: the only one that makes the span an error.
                let span = Span::current();
                span.set_status(Status::error(error.to_string()));
                span.set_attribute("error.type", kind.as_str());
                tracing::warn!(%routing_key, error.kind = %kind, error.fingerprint = fingerprint.as_deref().unwrap_or("-"),
                               error.message = %error, "message parked");
            }
            _ => tracing::debug!(%routing_key, error.message = %error, "message sent to delayed retry"),
        }
        Ok(plan.outcome)
    }
}
