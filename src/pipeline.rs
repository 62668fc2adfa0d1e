//! One delivery flow, from bytes to settlement (docs/reliability.md,
//! "Outcomes"; docs/architecture.md, "One delivery, file by file"):
//! admit → prepare → apply → settle. A batch of first deliveries and a lone
//! redelivery take the same path; a single delivery is a batch of one.
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
//!
//! The broker side ([`Outlet`]), admission ([`Admission`]) and the
//! transaction ([`Apply`]) are given to the pipeline, so the flow's
//! decisions are unit-tested with fakes of each (see the tests below).

use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use lapin::message::Delivery;
use opentelemetry::trace::Status;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::arrival::Arrival;
use crate::broker::Outgoing;
use crate::crash_guard::{Admission, Admitted};
use crate::divert::{self, Origin, Writer};
use crate::envelope::{self, MessageType};
use crate::failure::{Failed, Failure};
use crate::handlers::{self, Context, Prepared};
use crate::headers;
use crate::outcome::{Event, EventHook, Handling, Outcome, Outlet, SettleError};
use crate::retry::Disposition;
use crate::telemetry;
use crate::topology::Topology;
use crate::transaction::{Apply, Item, Retries};

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
    arrival: Arrival,
    processed: Result<Outcome, Failed>,
}

/// A decoded delivery prepared for its handler, or how it ended without
/// one (with its type, when it was decoded).
enum Decided {
    Apply(Box<Prepared>),
    Done(Result<Outcome, Failed>, Option<MessageType>),
}

/// A delivery about to be applied.
struct Ready<'d> {
    delivery: &'d Delivery,
    arrival: Arrival,
    span: Span,
    prepared: Box<Prepared>,
}

/// How deliveries are processed: built once at start-up, shared by every
/// broker session.
pub struct Pipeline {
    topology: Arc<Topology>,
    events_to_omit: BTreeSet<String>,
    max_message_bytes: usize,
    /// `host/version`, for `iot-failed-by`.
    failed_by: String,
    admission: Arc<dyn Admission>,
    retries: Retries,
    hooks: Vec<EventHook>,
}

/// The pipeline's settings and layers, from the worker's.
pub struct PipelineConfig {
    pub topology: Arc<Topology>,
    pub events_to_omit: BTreeSet<String>,
    pub max_message_bytes: usize,
    pub failed_by: String,
    /// Once cancelled, no new in-process retry starts.
    pub shutdown: CancellationToken,
    pub hooks: Vec<EventHook>,
    /// Who may run when: the crash guard.
    pub admission: Arc<dyn Admission>,
    /// The transaction, with its layers (see [`crate::transaction`]).
    pub apply: Arc<dyn Apply>,
}

impl<'d> Resolved<'d> {
    fn new(delivery: &'d Delivery, message_type: Option<MessageType>, started: Instant, span: Span) -> Resolved<'d> {
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
            retries: Retries {
                apply: config.apply,
                policy: config.topology.retry.clone(),
                shutdown: config.shutdown,
            },
            topology: config.topology,
            events_to_omit: config.events_to_omit,
            max_message_bytes: config.max_message_bytes,
            failed_by: config.failed_by,
            admission: config.admission,
            hooks: config.hooks,
        }
    }

    /// Processes deliveries together and settles each, telling the hooks:
    /// first deliveries in a batch, or one redelivered delivery alone.
    /// Their handlers run in one transaction; a message whose run failed
    /// goes on alone, with the in-process attempts it has left.
    ///
    /// # Errors
    /// A [`SettleError`] for the first delivery that could not be settled;
    /// the others are settled (see [`Pipeline::settle_all`]).
    pub async fn handle(&self, deliveries: &[Delivery], outlet: &dyn Outlet) -> Result<(), SettleError> {
        let started = Instant::now();
        let spans: Vec<Span> = deliveries.iter().map(|d| self.delivery_span(d)).collect();
        // A delivery alone is handled inside its span, admission included.
        let current = match spans.as_slice() {
            [one] => one.clone(),
            _ => Span::none(),
        };
        async {
            for (delivery, span) in deliveries.iter().zip(&spans) {
                span.in_scope(|| self.emit(&Event::Received(delivery)));
            }
            let Admitted { permit, refused } = self.admission.admit(deliveries).await;
            let mut ended = Vec::with_capacity(deliveries.len());
            let mut ready = Vec::with_capacity(deliveries.len());
            for ((delivery, span), refusal) in deliveries.iter().zip(spans).zip(refused) {
                // The time of an envelope without `time`, and a raw device
                // message's id and time: the same on every attempt.
                let arrival = Arrival::of(delivery, &self.topology.routes, Utc::now());
                let decided = match refusal {
                    Some(failure) => Decided::Done(Err(Failed::untyped(failure)), None),
                    None => self.prepare_caught(delivery, &arrival, &span),
                };
                match decided {
                    Decided::Apply(prepared) => ready.push(Ready {
                        delivery,
                        arrival,
                        span,
                        prepared,
                    }),
                    Decided::Done(processed, message_type) => ended.push(Ended {
                        one: Resolved::new(delivery, message_type, started, span),
                        arrival,
                        processed,
                    }),
                }
            }
            // What failed before its transaction is copied while the
            // transaction runs: the copies' confirms wait beside the commit.
            let (failed, mut ended): (Vec<_>, Vec<_>) = ended.into_iter().partition(|e| e.processed.is_err());
            let (copied, applied) = tokio::join!(self.copy(failed, outlet), self.apply(ready, started));
            ended.extend(applied);
            self.settle_all(ended, copied, outlet).await?;
            permit.settled().await;
            Ok(())
        }
        .instrument(current)
        .await
    }

    /// Runs the decoded deliveries' handlers (stage 1 included) and says
    /// how each ended.
    async fn apply<'d>(&self, ready: Vec<Ready<'d>>, started: Instant) -> Vec<Ended<'d>> {
        let items: Vec<Item<'_>> = ready.iter().map(|r| &*r.prepared).collect();
        let spans: Vec<Span> = ready.iter().map(|r| r.span.clone()).collect();
        let tried = self.retries.run(&items, &spans).await;
        drop(items);
        ready
            .into_iter()
            .zip(tried)
            .map(|(r, tried)| {
                let message_type = MessageType::Handled(r.prepared.route.message_type);
                let mut one = Resolved::new(r.delivery, Some(message_type.clone()), started, r.span);
                one.handling.in_process_retries = tried.in_process_retries;
                Ended {
                    one,
                    arrival: r.arrival,
                    processed: tried.result.map_err(|failure| Failed {
                        message_type: Some(message_type),
                        failure,
                    }),
                }
            })
            .collect()
    }

    /// Deliveries whose run was cut off by the end of the shutdown grace
    /// period: left unacked for redelivery (see [`Admission::cut_off`]).
    pub async fn cut_off(&self, deliveries: &[Delivery]) {
        for delivery in deliveries {
            self.emit(&Event::CutOff(delivery));
            self.admission.cut_off(delivery).await;
        }
    }

    fn emit(&self, event: &Event<'_>) {
        for hook in &self.hooks {
            hook(event);
        }
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

    /// Settles deliveries whose processing ended, with `copied`, those
    /// whose copies were published already. Those that need no copy, and
    /// the copied ones, are acked at once, together. Then the copies of the
    /// others that failed are published, and each original is acked once
    /// its own copy is confirmed: a copy that is not confirmed leaves only
    /// its delivery unacked.
    ///
    /// # Errors
    /// The first [`SettleError`]; every other delivery is settled, and the
    /// ones whose copy failed are left unacked for redelivery.
    async fn settle_all<'d>(
        &self,
        ended: Vec<Ended<'d>>,
        copied: Vec<Copied<'d>>,
        outlet: &dyn Outlet,
    ) -> Result<(), SettleError> {
        let (failed, ended): (Vec<_>, Vec<_>) = ended.into_iter().partition(|e| e.processed.is_err());
        let mut first_error = None;
        let mut done = self.confirmed(copied, &mut first_error);
        done.extend(ended.into_iter().filter_map(|Ended { mut one, processed, .. }| {
            one.outcome = processed.ok()?;
            Some(one)
        }));
        self.ack(&done, outlet).await?;
        let copied = self.copy(failed, outlet).await;
        let copied = self.confirmed(copied, &mut first_error);
        self.ack(&copied, outlet).await?;
        first_error.map_or(Ok(()), Err)
    }

    /// The deliveries whose copy was confirmed, with its outcome; the
    /// others are unsettled, and the first error is kept for the caller.
    fn confirmed<'d>(&self, copied: Vec<Copied<'d>>, first_error: &mut Option<SettleError>) -> Vec<Resolved<'d>> {
        let mut confirmed = Vec::with_capacity(copied.len());
        for (mut one, copy) in copied {
            match copy {
                Ok(outcome) => {
                    one.outcome = outcome;
                    confirmed.push(one);
                }
                Err(e) => {
                    one.span.record("iot.outcome", "unsettled");
                    self.emit(&Event::Unsettled(one.delivery, &e));
                    first_error.get_or_insert(e);
                }
            }
        }
        confirmed
    }

    /// Acks settled deliveries together (see [`Acks`]) and tells the hooks.
    async fn ack(&self, settled: &[Resolved<'_>], outlet: &dyn Outlet) -> Result<(), SettleError> {
        let tags: Vec<u64> = settled.iter().map(|one| one.delivery.delivery_tag).collect();
        match outlet.ack(&tags).await {
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

    /// [`Pipeline::prepare`], with a panic in it (a decoder bug) taken as
    /// the message's failure: it is parked, and its batch goes on.
    fn prepare_caught(&self, delivery: &Delivery, arrival: &Arrival, span: &Span) -> Decided {
        std::panic::catch_unwind(AssertUnwindSafe(|| self.prepare(delivery, arrival, span)))
            .unwrap_or_else(|panic| Decided::Done(Err(Failed::untyped(Failure::from_panic(&*panic))), None))
    }

    /// Decodes a delivery (an envelope, or a raw device message by its
    /// route) and has its handler parse its `data` into the typed item its
    /// write takes, or says how it ended without one (omitted,
    /// undecodable, unknown type, refused by the handler). Names the
    /// delivery's `span` by the message's idempotency key and type.
    fn prepare(&self, delivery: &Delivery, arrival: &Arrival, span: &Span) -> Decided {
        let amqp_id = delivery.properties.message_id().as_ref().map(|id| id.as_str());
        let decoded = match &arrival.raw {
            None => envelope::decode(&delivery.data, amqp_id, arrival.received, self.max_message_bytes)
                .map_err(Failure::from),
            Some(raw) => raw.route(&self.topology.routes).and_then(|route| {
                route
                    .decode(&raw.topic, &delivery.data, &raw.identity, self.max_message_bytes)
                    .map_err(Failure::from)
            }),
        };
        let message = match decoded {
            Ok(message) => message,
            Err(e) => return Decided::Done(Err(Failed::untyped(e)), None),
        };
        if amqp_id != Some(message.id.as_str()) {
            span.record("messaging.message.id", message.id.as_str());
        }
        let message_type = handlers::type_of(&message);
        span.record("iot.message.type", message_type.as_str());
        if self.events_to_omit.contains(&message.message_type) {
            return Decided::Done(Ok(Outcome::Omitted), Some(message_type));
        }
        // The handler refuses a message here, without the database, so
        // that its copy is published while the batch's transaction runs.
        let context = Context {
            commands: &self.topology.commands,
        };
        match handlers::prepare(message, &context, span) {
            Ok(prepared) => Decided::Apply(Box::new(prepared)),
            Err(failure) => Decided::Done(
                Err(Failed {
                    message_type: Some(message_type.clone()),
                    failure: self.of_topic(arrival, failure),
                }),
                Some(message_type),
            ),
        }
    }

    /// A handler's refusal of a raw device message, said of its MQTT topic
    /// and of the body field or topic level the refused field came from.
    fn of_topic(&self, arrival: &Arrival, failure: Failure) -> Failure {
        match (&arrival.raw, failure) {
            (Some(raw), Failure::Invalid(e)) => match raw.route(&self.topology.routes) {
                Ok(route) => Failure::Device(route.explain(&raw.topic, &e.field, &e.problem)),
                Err(_) => Failure::Invalid(e),
            },
            (_, failure) => failure,
        }
    }

    /// Stage 2 or parking: publishes the copies the retry policy plans for
    /// the `failed` deliveries, in one group (one channel, its confirms
    /// awaited together: a batch's copies cost the broker one stream, not
    /// one channel each), and says what became of each.
    async fn copy<'d>(&self, failed: Vec<Ended<'d>>, outlet: &dyn Outlet) -> Vec<Copied<'d>> {
        if failed.is_empty() {
            return Vec::new();
        }
        let writer = Writer {
            failed_by: &self.failed_by,
            frame_max: outlet.frame_max(),
        };
        let now = Utc::now();
        let mut copies: Vec<(Resolved<'d>, Failed, CopyPlan)> = failed
            .into_iter()
            .filter_map(
                |Ended {
                     one,
                     arrival,
                     processed,
                 }| {
                    let failed = processed.err()?;
                    let copy = CopyPlan::plan(&one, &arrival, &failed, &self.topology, writer, now);
                    Some((one, failed, copy))
                },
            )
            .collect();
        let outgoing: Vec<Outgoing<'_>> = copies
            .iter_mut()
            .map(|(one, _, copy)| Outgoing {
                exchange: "",
                routing_key: &copy.plan.routing_key,
                body: &one.delivery.data,
                properties: std::mem::take(&mut copy.plan.properties),
            })
            .collect();
        let published = outlet.publish_all(&outgoing).await;
        drop(outgoing);
        copies
            .into_iter()
            .zip(published)
            .map(|((one, failed, copy), published)| {
                let outcome = published.map(|()| {
                    copy.log(&one.span, &failed.failure);
                    copy.plan.outcome
                });
                (one, outcome.map_err(SettleError::from))
            })
            .collect()
    }
}

/// A failed delivery after its copy's publish: the outcome once the copy
/// is confirmed, or why it was not.
type Copied<'d> = (Resolved<'d>, Result<Outcome, SettleError>);

/// The copy a failed delivery becomes, and the span of its publish (a
/// child of the delivery's span), whose context the copy carries on: the
/// next attempt, or the requeued message, is its child, in the same trace.
/// The span ends when the copy is dropped, after the confirm.
struct CopyPlan {
    plan: divert::Plan,
    fingerprint: Option<String>,
    _publish: Span,
}

impl CopyPlan {
    fn plan(
        one: &Resolved<'_>,
        arrival: &Arrival,
        failed: &Failed,
        topology: &Topology,
        writer: Writer<'_>,
        now: DateTime<Utc>,
    ) -> CopyPlan {
        let delivery = one.delivery;
        let origin = Origin {
            properties: &delivery.properties,
            exchange: delivery.exchange.as_str(),
            routing_key: delivery.routing_key.as_str(),
            received: arrival.received,
            message_id: arrival.message_id(),
        };
        let mut plan = divert::plan(&origin, failed, topology, writer, now);
        let routing_key = &plan.routing_key;
        let fingerprint = headers::read_string(plan.properties.headers().as_ref(), headers::ERROR_FINGERPRINT);
        let publish = tracing::debug_span!(
            parent: &one.span,
            "publish",
            otel.name = %format_args!("publish {routing_key}"),
            otel.kind = "producer",
            messaging.system = "rabbitmq",
            messaging.operation.type = "send",
            messaging.destination.name = %routing_key,
        );
        plan.properties = telemetry::with_context_of(&publish, std::mem::take(&mut plan.properties));
        CopyPlan {
            plan,
            fingerprint,
            _publish: publish,
        }
    }

    /// Says, in the delivery's `span`, where the confirmed copy went.
    fn log(&self, span: &Span, error: &Failure) {
        let routing_key = &self.plan.routing_key;
        span.in_scope(|| match &self.plan.outcome {
            Outcome::Diverted(Disposition::Park { kind }) => {
                // The final failure: the only one that makes the span an error.
                span.set_status(Status::error(error.to_string()));
                span.set_attribute("error.type", kind.as_str());
                tracing::warn!(%routing_key, error.kind = %kind, error.fingerprint = self.fingerprint.as_deref().unwrap_or("-"),
                               error.message = %error, "message parked");
            }
            _ => tracing::debug!(%routing_key, error.message = %error, "message sent to delayed retry"),
        });
    }
}

/// The flow's decisions, with fakes for the broker side, admission and the
/// transaction: no broker, no database.
#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use futures_util::future::BoxFuture;
    use serde_json::json;

    use super::*;
    use crate::broker::PublishError;
    use crate::crash_guard::Release;
    use crate::envelope::Message;
    use crate::transaction::{Applied, CatchPanic, Deadline};

    const TOPOLOGY: &str = r#"
        queue_type = "quorum"
        delivery_limit = 5
        [retry]
        delays = ["1s", "30s"]
        max_attempts = 3
        in_process_attempts = 3
    "#;

    /// What the fakes saw, in order.
    #[derive(Default)]
    struct Seen {
        /// Message ids of each run of the transaction.
        runs: Vec<Vec<String>>,
        /// Each ack call's delivery tags.
        acks: Vec<Vec<u64>>,
        /// Each copy: routing key and its `iot-error-kind`.
        copies: Vec<(String, String)>,
        /// How many copies each publish carried.
        groups: Vec<usize>,
        /// How many copies were published when each run began.
        copies_at_run: Vec<usize>,
        /// What the hooks were told: tag and outcome, `unsettled` or `cut_off`.
        events: Vec<(u64, String)>,
        /// Tags whose admission was given back at a cut-off.
        cut_off: Vec<u64>,
        released: usize,
    }

    type Script = dyn Fn(usize, &[Item<'_>]) -> Vec<Applied> + Send + Sync;

    /// A transaction whose runs follow `script(run number, items)`.
    struct FakeApply {
        seen: Arc<Mutex<Seen>>,
        script: Box<Script>,
    }

    impl Apply for FakeApply {
        fn apply<'a>(&'a self, items: &'a [Item<'a>]) -> BoxFuture<'a, Vec<Applied>> {
            let run = {
                let mut seen = self.seen.lock().unwrap();
                seen.runs.push(items.iter().map(|p| p.message.id.clone()).collect());
                let copies = seen.copies.len();
                seen.copies_at_run.push(copies);
                seen.runs.len()
            };
            Box::pin(std::future::ready((self.script)(run, items)))
        }
    }

    /// Admission that refuses a lone redelivery when `refuse` is set.
    struct FakeAdmission {
        seen: Arc<Mutex<Seen>>,
        refuse: Option<fn() -> Failure>,
    }

    struct FakePermit(Arc<Mutex<Seen>>);

    impl<'a> Release<'a> for FakePermit {
        fn settled(self: Box<Self>) -> BoxFuture<'a, ()> {
            self.0.lock().unwrap().released += 1;
            Box::pin(std::future::ready(()))
        }
    }

    impl Admission for FakeAdmission {
        fn admit<'a>(&'a self, deliveries: &'a [Delivery]) -> BoxFuture<'a, Admitted<'a>> {
            let refused = deliveries
                .iter()
                .map(|d| self.refuse.filter(|_| d.redelivered).map(|failure| failure()))
                .collect();
            Box::pin(std::future::ready(Admitted {
                permit: Box::new(FakePermit(self.seen.clone())),
                refused,
            }))
        }

        fn cut_off<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, ()> {
            self.seen.lock().unwrap().cut_off.push(delivery.delivery_tag);
            Box::pin(std::future::ready(()))
        }
    }

    /// A broker side whose publishes to `refuse` fail.
    struct FakeOutlet {
        seen: Arc<Mutex<Seen>>,
        refuse: Option<&'static str>,
    }

    impl Outlet for FakeOutlet {
        fn frame_max(&self) -> usize {
            131_072
        }

        fn ack<'a>(&'a self, tags: &'a [u64]) -> BoxFuture<'a, Result<(), lapin::Error>> {
            if !tags.is_empty() {
                self.seen.lock().unwrap().acks.push(tags.to_vec());
            }
            Box::pin(std::future::ready(Ok(())))
        }

        fn publish_all<'a>(&'a self, messages: &'a [Outgoing<'a>]) -> BoxFuture<'a, Vec<Result<(), PublishError>>> {
            self.seen.lock().unwrap().groups.push(messages.len());
            let results = messages
                .iter()
                .map(|m| {
                    if self.refuse == Some(m.routing_key) {
                        return Err(PublishError::Nacked(m.routing_key.into()));
                    }
                    let kind = headers::read_string(m.properties.headers().as_ref(), headers::ERROR_KIND);
                    self.seen
                        .lock()
                        .unwrap()
                        .copies
                        .push((m.routing_key.into(), kind.unwrap_or_default()));
                    Ok(())
                })
                .collect();
            Box::pin(std::future::ready(results))
        }
    }

    struct Fixture {
        pipeline: Pipeline,
        outlet: FakeOutlet,
        seen: Arc<Mutex<Seen>>,
        shutdown: CancellationToken,
    }

    fn fixture(script: impl Fn(usize, &[Item<'_>]) -> Vec<Applied> + Send + Sync + 'static) -> Fixture {
        fixture_with(Box::new(script), None, None)
    }

    fn fixture_with(
        script: Box<Script>,
        refuse: Option<fn() -> Failure>,
        refuse_copy: Option<&'static str>,
    ) -> Fixture {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let shutdown = CancellationToken::new();
        let hook_seen = seen.clone();
        let hook: EventHook = Arc::new(move |event: &Event<'_>| {
            let entry = match event {
                Event::Received(_) => return,
                Event::Settled(d, outcome, _) => (d.delivery_tag, outcome.as_str().to_owned()),
                Event::Unsettled(d, _) => (d.delivery_tag, "unsettled".into()),
                Event::CutOff(d) => (d.delivery_tag, "cut_off".into()),
            };
            hook_seen.lock().unwrap().events.push(entry);
        });
        let pipeline = Pipeline::new(PipelineConfig {
            topology: Arc::new(Topology::parse(TOPOLOGY, "q").unwrap()),
            events_to_omit: BTreeSet::from(["DEVICE_DOWN".to_owned()]),
            max_message_bytes: 4096,
            failed_by: "test/0".into(),
            shutdown: shutdown.clone(),
            hooks: vec![hook],
            admission: Arc::new(FakeAdmission {
                seen: seen.clone(),
                refuse,
            }),
            apply: Arc::new(FakeApply {
                seen: seen.clone(),
                script,
            }),
        });
        let outlet = FakeOutlet {
            seen: seen.clone(),
            refuse: refuse_copy,
        };
        Fixture {
            pipeline,
            outlet,
            seen,
            shutdown,
        }
    }

    fn reading(tag: u64) -> Delivery {
        let body = json!({"type": "MEASUREMENT", "kind": "event", "id": format!("m{tag}"),
                          "data": {"device_id": "d1", "sensor": "t", "value": 1.5}});
        Delivery::mock(tag, "".into(), "q".into(), false, body.to_string().into_bytes())
    }

    fn with_body(tag: u64, body: &str) -> Delivery {
        Delivery::mock(tag, "".into(), "q".into(), false, body.as_bytes().to_vec())
    }

    fn transient() -> Failure {
        Failure::Database(sqlx::Error::PoolTimedOut)
    }

    fn done(items: &[Item<'_>]) -> Vec<Applied> {
        items.iter().map(|_| Applied::Done(Outcome::Processed)).collect()
    }

    /// Fails the message `id` with `failure()` on every run it is in.
    fn failing(id: &'static str, failure: fn() -> Failure) -> impl Fn(usize, &[Item<'_>]) -> Vec<Applied> {
        move |_, items| {
            items
                .iter()
                .map(|p| match p.message.id == id {
                    true => Applied::Failed(failure()),
                    false => Applied::Done(Outcome::Processed),
                })
                .collect()
        }
    }

    fn ids(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|id| (*id).to_owned()).collect()
    }

    impl Fixture {
        async fn handle(&self, deliveries: &[Delivery]) -> Result<(), SettleError> {
            self.pipeline.handle(deliveries, &self.outlet).await
        }

        fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
            self.seen.lock().unwrap()
        }
    }

    #[tokio::test]
    async fn a_batch_runs_in_one_transaction_and_is_acked_together() {
        let f = fixture(|_, items| done(items));
        f.handle(&[reading(1), reading(2), reading(3)]).await.unwrap();
        let seen = f.seen();
        assert_eq!(seen.runs, vec![ids(&["m1", "m2", "m3"])]);
        assert_eq!(seen.acks, vec![vec![1, 2, 3]]);
        assert!(seen.copies.is_empty());
        assert_eq!(seen.released, 1);
    }

    #[tokio::test]
    async fn a_permanent_failure_is_parked_after_its_batch_mates_are_acked() {
        let f = fixture(failing("m2", || {
            Failure::Invalid(crate::failure::ValidationError::new("value", "NaN"))
        }));
        f.handle(&[reading(1), reading(2), reading(3)]).await.unwrap();
        let seen = f.seen();
        assert_eq!(seen.runs.len(), 1, "a permanent failure is not run again");
        assert_eq!(seen.acks, vec![vec![1, 3], vec![2]]);
        assert_eq!(seen.copies, vec![("q.dlq".to_owned(), "validation".to_owned())]);
        assert!(seen.events.contains(&(2, "parked".into())));
    }

    #[tokio::test(start_paused = true)]
    async fn a_transient_failure_runs_again_alone_and_counts_its_retries() {
        // m2 fails on the batch's run and on its first run alone.
        let f = fixture(|run, items| match run {
            1 | 2 => failing("m2", transient)(run, items),
            _ => done(items),
        });
        let retries = Arc::new(Mutex::new(Vec::new()));
        let seen_retries = retries.clone();
        let mut pipeline = f.pipeline;
        pipeline.hooks.push(Arc::new(move |event: &Event<'_>| {
            if let Event::Settled(d, _, handling) = event {
                seen_retries
                    .lock()
                    .unwrap()
                    .push((d.delivery_tag, handling.in_process_retries));
            }
        }));
        pipeline.handle(&[reading(1), reading(2)], &f.outlet).await.unwrap();
        let seen = f.seen.lock().unwrap();
        assert_eq!(seen.runs, vec![ids(&["m1", "m2"]), ids(&["m2"]), ids(&["m2"])]);
        assert_eq!(seen.acks, vec![vec![1, 2]]);
        assert!(seen.copies.is_empty());
        assert_eq!(*retries.lock().unwrap(), vec![(1, 0), (2, 2)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_that_stays_transient_goes_to_the_first_delayed_retry() {
        let f = fixture(failing("m1", transient));
        f.handle(&[reading(1)]).await.unwrap();
        let seen = f.seen();
        assert_eq!(seen.runs.len(), 3, "in_process_attempts = 3");
        assert_eq!(seen.copies, vec![("q.retry.1s".to_owned(), "transient".to_owned())]);
        assert_eq!(seen.events, vec![(1, "retry".to_owned())]);
    }

    #[tokio::test(start_paused = true)]
    async fn after_shutdown_began_a_transient_failure_is_not_run_again_in_process() {
        let f = fixture(failing("m1", transient));
        f.shutdown.cancel();
        f.handle(&[reading(1)]).await.unwrap();
        assert_eq!(f.seen().runs.len(), 1);
        assert_eq!(f.seen().copies[0].0, "q.retry.1s");
    }

    #[tokio::test]
    async fn a_batch_rolled_back_for_nobody_in_particular_runs_each_alone_with_every_attempt() {
        let f = fixture(|run, items| match run {
            1 => items.iter().map(|_| Applied::Again).collect(),
            _ => done(items),
        });
        f.handle(&[reading(1), reading(2)]).await.unwrap();
        let seen = f.seen();
        assert_eq!(seen.runs.len(), 3);
        assert_eq!(seen.runs[1..].concat().len(), 2, "each alone: {:?}", seen.runs);
        assert_eq!(seen.acks.concat().len(), 2);
    }

    #[tokio::test]
    async fn what_cannot_be_applied_never_reaches_the_transaction() {
        let f = fixture(|_, items| done(items));
        let omitted = json!({"type": "DEVICE_DOWN", "kind": "event", "id": "o1", "data": {"device_id": "d"}});
        let unknown = json!({"type": "NO_SUCH_TYPE", "kind": "event", "id": "u1", "data": {}});
        let deliveries = [
            reading(1),
            with_body(2, "{not json"),
            with_body(3, &omitted.to_string()),
            with_body(4, &unknown.to_string()),
        ];
        f.handle(&deliveries).await.unwrap();
        let seen = f.seen();
        assert_eq!(seen.runs, vec![ids(&["m1"])]);
        let mut copies = seen.copies.clone();
        copies.sort();
        assert_eq!(
            copies,
            vec![
                ("q.dlq".into(), "decode".into()),
                ("q.dlq".into(), "unknown_type".into())
            ]
        );
        assert_eq!(seen.groups, vec![2], "a batch's copies are published together");
        assert!(seen.events.contains(&(3, "omitted".into())));
        assert_eq!(seen.acks.concat().len(), 4);
    }

    #[tokio::test]
    async fn a_refused_redelivery_is_parked_without_running() {
        let f = fixture_with(
            Box::new(|_, items| done(items)),
            Some(|| Failure::CrashLoop { deliveries: 5 }),
            None,
        );
        let mut delivery = reading(7);
        delivery.redelivered = true;
        f.handle(&[delivery]).await.unwrap();
        let seen = f.seen();
        assert!(seen.runs.is_empty());
        assert_eq!(seen.copies, vec![("q.dlq".to_owned(), "crash_loop".to_owned())]);
        assert_eq!(seen.acks, vec![vec![7]]);
    }

    #[tokio::test]
    async fn what_fails_before_the_transaction_is_copied_while_it_runs_and_acked_with_the_batch() {
        let f = fixture(|_, items| done(items));
        f.handle(&[reading(1), with_body(2, "{not json"), reading(3)])
            .await
            .unwrap();
        let seen = f.seen();
        assert_eq!(
            seen.copies_at_run,
            vec![1],
            "the copy was out before the transaction ended"
        );
        let mut acked = seen.acks.concat();
        acked.sort_unstable();
        assert_eq!((seen.acks.len(), acked), (1, vec![1, 2, 3]), "one ack for all three");
    }

    #[tokio::test]
    async fn a_copy_that_is_not_confirmed_leaves_only_its_delivery_unacked() {
        let f = fixture_with(
            Box::new(failing("m2", || Failure::Panic("boom".into()))),
            None,
            Some("q.dlq"),
        );
        let result = f.handle(&[reading(1), reading(2)]).await;
        assert!(matches!(result, Err(SettleError::Publish(_))), "{result:?}");
        let seen = f.seen();
        assert_eq!(seen.acks, vec![vec![1]]);
        assert!(seen.events.contains(&(2, "unsettled".into())));
        assert_eq!(seen.released, 0, "the admission is kept: the redelivery is counted");
    }

    #[tokio::test]
    async fn a_cut_off_tells_the_hooks_and_the_admission_for_every_delivery() {
        let f = fixture(|_, items| done(items));
        let mut redelivered = reading(2);
        redelivered.redelivered = true;
        f.pipeline.cut_off(&[reading(1), redelivered]).await;
        let seen = f.seen();
        assert_eq!(seen.events, vec![(1, "cut_off".into()), (2, "cut_off".into())]);
        assert_eq!(seen.cut_off, vec![1, 2]);
    }

    /// A transaction that never answers, or panics.
    struct Stuck;
    struct Panics;

    impl Apply for Stuck {
        fn apply<'a>(&'a self, _: &'a [Item<'a>]) -> BoxFuture<'a, Vec<Applied>> {
            Box::pin(std::future::pending())
        }
    }

    impl Apply for Panics {
        fn apply<'a>(&'a self, _: &'a [Item<'a>]) -> BoxFuture<'a, Vec<Applied>> {
            Box::pin(async { panic!("handler bug") })
        }
    }

    fn message(id: &str) -> Message {
        let body = json!({"type": "IBEACON_READ", "kind": "event", "id": id, "data": {}});
        envelope::decode(body.to_string().as_bytes(), None, Utc::now(), 4096).unwrap()
    }

    fn prepared(id: &str) -> Prepared {
        handlers::prepare(
            message(id),
            &Context {
                commands: &Default::default(),
            },
            &Span::none(),
        )
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_fails_each_message_of_a_run_at_once_without_halving() {
        let (a, b) = (prepared("a"), prepared("b"));
        let alone = Deadline(Stuck).apply(&[&a]).await;
        assert!(matches!(&alone[..], [Applied::Failed(f)] if f.is_transient() && matches!(f, Failure::Database(_))));
        // The database, not a batch-mate, failed: halving would wait for
        // it again once per halving.
        let together = Deadline(Stuck).apply(&[&a, &b]).await;
        assert!(
            together
                .iter()
                .all(|a| matches!(a, Applied::Failed(f) if f.is_transient() && f.to_string().contains("no answer from PostgreSQL"))),
            "each takes the database's failure: {together:?}"
        );
    }

    #[tokio::test]
    async fn the_panic_layer_fails_a_lone_message_and_runs_a_batch_again_alone() {
        let (a, b) = (prepared("a"), prepared("b"));
        let alone = CatchPanic(Panics).apply(&[&a]).await;
        assert!(matches!(&alone[..], [Applied::Failed(Failure::Panic(text))] if text == "handler bug"));
        let together = CatchPanic(Panics).apply(&[&a, &b]).await;
        assert!(together.iter().all(|a| matches!(a, Applied::Again)));
    }

    #[test]
    fn a_message_type_comes_from_the_handler_table() {
        assert_eq!(handlers::type_of(&message("a")), MessageType::Handled("IBEACON_READ"));
        let mut unknown = message("b");
        unknown.message_type = "NO_SUCH".into();
        assert_eq!(handlers::type_of(&unknown).label(), "unknown");
    }
}
