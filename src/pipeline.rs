//! One delivery, from bytes to settlement (docs/reliability.md, "Outcomes";
//! docs/architecture.md, "One delivery, file by file"): admit → process →
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
//! headers ([`crate::telemetry`]); its children are its transaction (with
//! the handler and the commit) and the publish of a retry or DLQ copy,
//! which carries the publish span's context on. A batch's shared
//! transaction has a span of its own, linked to each delivery's span.

use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use backon::Retryable;
use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use futures_util::future::join_all;
use lapin::message::Delivery;
use opentelemetry::trace::{Status, TraceContextExt};
use sqlx::{Connection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::acks::Acks;
use crate::batch::{self, Applied};
use crate::broker::Publisher;
use crate::crash_guard::{Admission, CrashGuard};
use crate::divert::{self, Origin, Writer};
use crate::envelope::{self, Message};
use crate::failure::{Failed, Failure};
use crate::handlers::{self, Handler};
use crate::headers;
use crate::outcome::{Event, EventHook, Handling, Outcome, SettleError};
use crate::retry::Disposition;
use crate::store;
use crate::telemetry;
use crate::topology::Topology;

/// A delivery ready to be acked, with its outcome and handling so far.
struct Resolved<'d> {
    delivery: &'d Delivery,
    outcome: Outcome,
    handling: Handling,
    started: Instant,
    /// The delivery's `process` span.
    span: Span,
}

/// A delivery whose processing ended: how, and when it was received.
struct Ended<'d> {
    one: Resolved<'d>,
    received: DateTime<Utc>,
    processed: Result<Outcome, Failed>,
}

/// A decoded delivery with its handler, or how it ended without one (with
/// its type, when it was decoded).
enum Prepared {
    Apply(Message, &'static Handler),
    Done(Result<Outcome, Failed>, Option<String>),
}

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

/// Where one broker session's settlements go: its confirmed publisher for
/// copies, the connection's negotiated frame size (a copy's headers must
/// fit), and the consumer channel's acks.
pub struct Outlet {
    pub publisher: Publisher,
    pub frame_max: usize,
    pub acks: Acks,
}

impl<'d> Resolved<'d> {
    fn new(delivery: &'d Delivery, message_type: Option<String>, started: Instant, span: Span) -> Resolved<'d> {
        Resolved {
            delivery,
            outcome: Outcome::Processed,
            handling: Handling {
                message_type,
                ..Handling::default()
            },
            started,
            span,
        }
    }
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
    pub async fn handle(&self, delivery: &Delivery, outlet: &Outlet) -> Result<(), SettleError> {
        let started = Instant::now();
        let span = self.delivery_span(delivery);
        async {
            self.emit(&Event::Received(delivery));
            // The time of an envelope without `time`: the same on every attempt.
            let received = headers::first_received(&delivery.properties).unwrap_or_else(Utc::now);
            let mut handling = Handling::default();
            let (permit, processed) = match self.crash_guard.admit(delivery).await {
                Admission::Run(permit) => (permit, self.process(delivery, received, &mut handling).await),
                Admission::Fail(permit, failure) => (permit, Err(Failed::untyped(failure))),
            };
            let one = Resolved {
                handling,
                ..Resolved::new(delivery, None, started, Span::current())
            };
            self.settle_all(
                vec![Ended {
                    one,
                    received,
                    processed,
                }],
                outlet,
            )
            .await?;
            permit.settled().await;
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// The span of one delivery, the child of the trace context in its
    /// headers. At `warn`, so that every line logged about the delivery
    /// (the least verbose is "message parked", at warn) carries its fields
    /// whatever `RUST_LOG` says; its children are at `debug`, exported but
    /// not created when nothing is exported. The message id is the AMQP one
    /// until the envelope is decoded; the type comes with decoding.
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

    /// Processes first deliveries (none redelivered) together: their
    /// handlers run in one transaction (see [`batch`]), and each is settled
    /// on its own, in order, once it committed. A message whose run failed
    /// goes on alone, with the in-process attempts it has left.
    ///
    /// # Errors
    /// A [`SettleError`] for the first delivery that could not be settled;
    /// the others are settled (see [`Pipeline::settle_all`]).
    pub async fn handle_batch(&self, deliveries: &[Delivery], outlet: &Outlet) -> Result<(), SettleError> {
        let started = Instant::now();
        let permit = self.crash_guard.share().await;
        let mut ended = Vec::with_capacity(deliveries.len());
        let mut ready = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            let span = self.delivery_span(delivery);
            span.in_scope(|| self.emit(&Event::Received(delivery)));
            let received = headers::first_received(&delivery.properties).unwrap_or_else(Utc::now);
            match self.prepare_caught(delivery, received, &span) {
                Prepared::Apply(message, handler) => ready.push((delivery, received, message, handler, span)),
                Prepared::Done(processed, message_type) => {
                    let one = Resolved::new(delivery, message_type, started, span);
                    ended.push(Ended {
                        one,
                        received,
                        processed,
                    });
                }
            }
        }
        let items: Vec<_> = ready
            .iter()
            .map(|(_, _, message, handler, _)| (message, *handler))
            .collect();
        let applied = batch::apply(&self.pool, &items)
            .instrument(batch_span(ready.iter().map(|(.., span)| span)))
            .await;
        // The messages that leave the batch go on alone at the same time,
        // each on its own connection, as they would have without batching.
        let finished = ready
            .iter()
            .zip(applied)
            .map(|((_, _, message, handler, span), applied)| {
                self.finish_alone(handler, message, applied).instrument(span.clone())
            });
        let finished = join_all(finished).await;
        for ((delivery, received, message, _, span), (processed, retries)) in ready.into_iter().zip(finished) {
            let mut one = Resolved::new(delivery, Some(message.message_type.clone()), started, span);
            one.handling.in_process_retries = retries;
            let processed = processed.map_err(|failure| Failed {
                message_type: Some(message.message_type),
                failure,
            });
            ended.push(Ended {
                one,
                received,
                processed,
            });
        }
        self.settle_all(ended, outlet).await?;
        permit.settled().await;
        Ok(())
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

    /// Settles deliveries whose processing ended. Those that need no copy
    /// are acked at once, together. Then the copies of the failed ones are
    /// published, concurrently, and each original is acked once its copy is
    /// confirmed: a message waiting for its copy (a broker that blocks
    /// publishers, a slow confirm) never holds the others of its batch up.
    ///
    /// # Errors
    /// The first [`SettleError`]; every other delivery is settled, and the
    /// ones whose copy failed are left unacked for redelivery.
    async fn settle_all(&self, ended: Vec<Ended<'_>>, outlet: &Outlet) -> Result<(), SettleError> {
        let mut done = Vec::with_capacity(ended.len());
        let mut failed = Vec::new();
        for Ended {
            mut one,
            received,
            processed,
        } in ended
        {
            match processed {
                Ok(outcome) => {
                    one.outcome = outcome;
                    done.push(one);
                }
                Err(failure) => failed.push((one, received, failure)),
            }
        }
        self.ack(&done, outlet).await?;
        let copies = failed
            .iter()
            .map(|(one, received, failed)| self.divert(one.delivery, *received, failed, outlet, &one.span));
        let copies = join_all(copies).await;
        let mut copied = Vec::with_capacity(failed.len());
        let mut first_error = None;
        for ((mut one, ..), copy) in failed.into_iter().zip(copies) {
            match copy {
                Ok(outcome) => {
                    one.outcome = outcome;
                    copied.push(one);
                }
                Err(e) => {
                    one.span.record("iot.outcome", "unsettled");
                    self.emit(&Event::Unsettled(one.delivery, &e));
                    first_error.get_or_insert(e);
                }
            }
        }
        self.ack(&copied, outlet).await?;
        first_error.map_or(Ok(()), Err)
    }

    /// Acks settled deliveries together (see [`Acks`]) and tells the hooks.
    async fn ack(&self, settled: &[Resolved<'_>], outlet: &Outlet) -> Result<(), SettleError> {
        let tags: Vec<u64> = settled.iter().map(|one| one.delivery.delivery_tag).collect();
        match outlet.acks.ack(&tags).await {
            Ok(()) => {
                for one in settled {
                    let handling = Handling {
                        elapsed: one.started.elapsed(),
                        ..one.handling.clone()
                    };
                    one.span.record("iot.outcome", one.outcome.as_str());
                    self.emit(&Event::Settled(one.delivery, &one.outcome, &handling));
                }
                Ok(())
            }
            Err(e) => {
                let e = SettleError::Ack(e);
                for one in settled {
                    one.span.record("iot.outcome", "unsettled");
                    self.emit(&Event::Unsettled(one.delivery, &e));
                }
                Err(e)
            }
        }
    }

    /// Decodes and applies, noting the type and the in-process retries in
    /// `handling`.
    async fn process(
        &self,
        delivery: &Delivery,
        received: DateTime<Utc>,
        handling: &mut Handling,
    ) -> Result<Outcome, Failed> {
        let (message, handler) = match self.prepare_caught(delivery, received, &Span::current()) {
            Prepared::Apply(message, handler) => (message, handler),
            Prepared::Done(processed, message_type) => {
                handling.message_type = message_type;
                return processed;
            }
        };
        handling.message_type = Some(message.message_type.clone());
        let attempts = self.in_process_attempts();
        self.apply_with_retries(handler, &message, attempts, &mut handling.in_process_retries)
            .await
            .map_err(|failure| Failed {
                message_type: Some(message.message_type),
                failure,
            })
    }

    /// [`Pipeline::prepare`], with a panic in it (a decoder bug) taken as
    /// the message's failure: it is parked, and its batch goes on.
    fn prepare_caught(&self, delivery: &Delivery, received: DateTime<Utc>, span: &Span) -> Prepared {
        std::panic::catch_unwind(AssertUnwindSafe(|| self.prepare(delivery, received, span))).unwrap_or_else(|panic| {
            let failure = Failure::Panic(batch::panic_text(&*panic));
            Prepared::Done(Err(Failed::untyped(failure)), None)
        })
    }

    /// Decodes a delivery and finds its handler, or says how it ended
    /// without one (omitted, undecodable, unknown type). Names the
    /// delivery's `span` by the message's idempotency key and type.
    fn prepare(&self, delivery: &Delivery, received: DateTime<Utc>, span: &Span) -> Prepared {
        let amqp_id = delivery.properties.message_id().as_ref().map(|id| id.as_str());
        let message = match envelope::decode(&delivery.data, amqp_id, received, self.max_message_bytes) {
            Ok(message) => message,
            Err(e) => return Prepared::Done(Err(Failed::untyped(e)), None),
        };
        if amqp_id != Some(message.id.as_str()) {
            span.record("messaging.message.id", message.id.as_str());
        }
        span.record("iot.message.type", message.message_type.as_str());
        let message_type = Some(message.message_type.clone());
        if self.events_to_omit.contains(&message.message_type) {
            return Prepared::Done(Ok(Outcome::Omitted), message_type);
        }
        match handlers::lookup(&message) {
            Ok(handler) => Prepared::Apply(message, handler),
            Err(failure) => Prepared::Done(
                Err(Failed {
                    message_type: message_type.clone(),
                    failure,
                }),
                message_type,
            ),
        }
    }

    fn in_process_attempts(&self) -> u32 {
        self.topology.retry.in_process_attempts
    }

    /// How a message of a batch ended: as the batch applied it, or after
    /// running alone; with its in-process retries.
    async fn finish_alone(
        &self,
        handler: &Handler,
        message: &Message,
        applied: Applied,
    ) -> (Result<Outcome, Failure>, u32) {
        let mut retries = 0;
        let processed = match applied {
            Applied::Done(outcome) => Ok(outcome),
            Applied::Failed(failure) | Applied::Again(Some(failure)) => {
                self.go_on_alone(handler, message, failure, &mut retries).await
            }
            Applied::Again(None) => {
                let runs = self.in_process_attempts();
                self.apply_with_retries(handler, message, runs, &mut retries).await
            }
        };
        (processed, retries)
    }

    /// A message whose run in a batch failed: its first in-process attempt.
    /// A transient failure is tried again alone with the attempts left.
    async fn go_on_alone(
        &self,
        handler: &Handler,
        message: &Message,
        failure: Failure,
        retries: &mut u32,
    ) -> Result<Outcome, Failure> {
        let left = self.in_process_attempts().saturating_sub(1);
        if !failure.is_transient() || left == 0 || self.shutdown.is_cancelled() {
            return Err(failure);
        }
        *retries += 1;
        self.apply_with_retries(handler, message, left, retries).await
    }

    /// Stage 1: runs the transaction up to `runs` times while it fails
    /// transiently, with the policy's backoff, unless shutdown has begun.
    async fn apply_with_retries(
        &self,
        handler: &Handler,
        message: &Message,
        runs: u32,
        retries: &mut u32,
    ) -> Result<Outcome, Failure> {
        (|| self.apply_once(handler, message))
            .retry(self.topology.retry.in_process_backoff(runs))
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
            let mut conn = self.pool.acquire().await?;
            let result = async {
                let mut tx = conn.begin().await?;
                let outcome = batch::apply_one(&mut tx, handler, message).await?;
                if outcome == Outcome::Processed {
                    tx.commit().instrument(tracing::debug_span!("commit")).await?;
                }
                Ok(outcome)
            }
            .await;
            if let Err(Failure::Database(e)) = &result {
                store::close_if_read_only(&mut conn, e);
            }
            result
        }
        .instrument(tracing::debug_span!("transaction", db.system.name = "postgresql"));
        match AssertUnwindSafe(store::deadline(transaction)).catch_unwind().await {
            Ok(result) => result,
            Err(panic) => Err(Failure::Panic(batch::panic_text(&*panic))),
        }
    }

    /// Stage 2 or parking: publishes the copy the retry policy plans and
    /// waits for the confirm. `span` is the delivery's.
    async fn divert(
        &self,
        delivery: &Delivery,
        received: DateTime<Utc>,
        failed: &Failed,
        outlet: &Outlet,
        span: &Span,
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
            parent: span,
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
        span.in_scope(|| match &plan.outcome {
            Outcome::Diverted(Disposition::Park { kind }) => {
                // The final failure: the only one that makes the span an error.
                span.set_status(Status::error(error.to_string()));
                span.set_attribute("error.type", kind.as_str());
                tracing::warn!(%routing_key, error.kind = %kind, error.fingerprint = fingerprint.as_deref().unwrap_or("-"),
                               error.message = %error, "message parked");
            }
            _ => tracing::debug!(%routing_key, error.message = %error, "message sent to delayed retry"),
        });
        Ok(plan.outcome)
    }
}

/// The span of a batch's shared transaction: not the child of any one
/// delivery, so it is linked to each delivery's span instead.
fn batch_span<'a>(deliveries: impl Iterator<Item = &'a Span>) -> Span {
    let span = tracing::debug_span!(
        "transaction",
        otel.name = "transaction (batch)",
        db.system.name = "postgresql"
    );
    for delivery in deliveries {
        span.add_link(delivery.context().span().span_context().clone());
    }
    span
}
