//! Traces: the spans of a message's whole life share the producer's trace
//! id, with an attempt number per delivery and the error status only on
//! the failure that parks it (in process, through `InMemorySpanExporter`);
//! and the worker binary exports them over real OTLP gRPC, flushed on
//! SIGTERM (to a receiver in this test).
//!
//! The in-process tests share one subscriber, the default only on their
//! own runtimes' threads ([`run_traced`]); each test picks its spans out
//! by its own random trace id.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::common::messages::{device_up, flaky, set_led};
use crate::common::{Device, TestEnv, TopologyFile};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use opentelemetry::trace::{SpanKind, Status};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as ProtoValue;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use rand::Rng;
use serde_json::json;
use tracing::Dispatch;
use tracing::dispatcher::{self, DefaultGuard};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use worker_iot_core::telemetry;

const WAIT: Duration = Duration::from_secs(60);
const WORKER: &str = env!("CARGO_BIN_EXE_worker-iot-core");

/// Attempt 1 fails transiently and goes to the retry queue; at most
/// `max_attempts` deliveries.
fn topology(max_attempts: u32) -> TopologyFile {
    TopologyFile::classic()
        .in_process_attempts(1)
        .max_attempts(max_attempts)
}

/// Where the in-process workers of these tests send their spans: an
/// in-memory exporter, behind a subscriber that [`run_traced`] makes the
/// default of its own threads only.
///
/// `_second` is a second registered dispatcher that does nothing. While
/// only one dispatcher is registered, tracing-core (0.1.36) works out a
/// callsite's interest from the default of whichever thread reaches it
/// first: a sibling test's worker, on a thread without this subscriber,
/// would cache `never` for the worker's spans, and these tests would see
/// none (tokio-rs/tracing#3611). With two, every callsite asks both.
struct Spans {
    exporter: InMemorySpanExporter,
    dispatch: Dispatch,
    _second: Dispatch,
    _provider: SdkTracerProvider,
}

fn spans() -> &'static Spans {
    static SPANS: OnceLock<Spans> = OnceLock::new();
    SPANS.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .with_resource(telemetry::resource("worker-iot-core"))
            .build();
        // No `log` bridge, as in the binary (see `Telemetry::install`).
        let subscriber =
            tracing_subscriber::registry().with(telemetry::otel_layer(&provider).with_filter(telemetry::span_filter()));
        Spans {
            exporter,
            dispatch: Dispatch::new(subscriber),
            _second: Dispatch::new(tracing::subscriber::NoSubscriber::default()),
            _provider: provider,
        }
    })
}

thread_local! {
    /// [`spans`]' subscriber as this thread's default, while the thread
    /// belongs to a runtime of [`run_traced`].
    static SCOPED: RefCell<Option<DefaultGuard>> = const { RefCell::new(None) };
}

/// Runs `test` as `#[tokio::test(flavor = "multi_thread", worker_threads =
/// 2)]` would, on a runtime each of whose threads (and the caller's, while
/// it waits) sends its spans to [`spans`].
///
/// Not a global default: other tests share this process, and a global
/// OpenTelemetry subscriber would trace their in-process workers too,
/// whose retry, DLQ and device copies would then carry a `traceparent` of
/// their own. Each test here picks its spans out by its own trace id.
fn run_traced<F: Future>(test: F) -> F::Output {
    let dispatch = spans().dispatch.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || {
            let guard = dispatcher::set_default(&dispatch);
            SCOPED.with(|scoped| *scoped.borrow_mut() = Some(guard));
        })
        .on_thread_stop(|| SCOPED.with(|scoped| drop(scoped.borrow_mut().take())))
        .build()
        .expect("test runtime");
    dispatcher::with_default(&spans().dispatch, || runtime.block_on(test))
}

/// A fresh producer context: (trace id, parent span id, traceparent).
fn producer_context() -> (String, String, String) {
    let mut rng = rand::rng();
    let trace_id = format!("{:032x}", rng.random::<u128>() | 1);
    let span_id = format!("{:016x}", rng.random::<u64>() | 1);
    let traceparent = format!("00-{trace_id}-{span_id}-01");
    (trace_id, span_id, traceparent)
}

fn traced(traceparent: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(LongString::from(traceparent)),
    );
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_headers(headers)
}

fn spans_of(trace_id: &str) -> Vec<SpanData> {
    spans()
        .exporter
        .get_finished_spans()
        .expect("finished spans")
        .into_iter()
        .filter(|span| span.span_context.trace_id().to_string() == trace_id)
        .collect()
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
}

/// The delivery spans, in attempt order.
fn deliveries(spans: &[SpanData]) -> Vec<&SpanData> {
    let mut deliveries: Vec<&SpanData> = spans.iter().filter(|s| s.span_kind == SpanKind::Consumer).collect();
    deliveries.sort_by_key(|s| attribute(s, "iot.attempt"));
    deliveries
}

#[test]
fn a_retried_message_is_one_trace_with_an_attempt_per_delivery() {
    run_traced(async {
        let env = TestEnv::new(&topology(5)).await;
        let (trace_id, producer_span, traceparent) = producer_context();
        env.publish(&flaky("traced-once", 1), traced(&traceparent)).await;
        let worker = env.spawn_worker(&[]);
        env.wait_for_rows("measurements WHERE message_id = 'traced-once'", 1, WAIT)
            .await;
        // The drain ends every delivery, so every span has been exported.
        worker.stop().await;

        let spans = spans_of(&trace_id);
        let attempts = deliveries(&spans);
        assert_eq!(attempts.len(), 2, "two deliveries in the trace: {spans:#?}");
        let process = format!("process {}", env.queue);
        for (n, span) in attempts.iter().enumerate() {
            assert_eq!(span.name, process);
            assert_eq!(attribute(span, "iot.attempt"), Some((n + 1).to_string()));
            assert_eq!(attribute(span, "messaging.system").as_deref(), Some("rabbitmq"));
            assert_eq!(attribute(span, "messaging.destination.name"), Some(env.queue.clone()));
            assert_eq!(attribute(span, "messaging.message.id").as_deref(), Some("traced-once"));
            assert_eq!(attribute(span, "iot.message.type").as_deref(), Some("TEST_FLAKY"));
            assert_eq!(span.status, Status::Unset, "a retried failure is not an error");
        }
        assert_eq!(attribute(attempts[0], "iot.outcome").as_deref(), Some("retry"));
        assert_eq!(attribute(attempts[1], "iot.outcome").as_deref(), Some("processed"));

        // Attempt 1 is the producer's child; attempt 2 the child of the
        // publish of the retry copy, itself a child of attempt 1.
        assert_eq!(attempts[0].parent_span_id.to_string(), producer_span);
        let retry = format!("publish {}.retry.50ms", env.queue);
        let publish = spans
            .iter()
            .find(|s| s.name == retry)
            .expect("the retry copy's publish span");
        assert_eq!(publish.span_kind, SpanKind::Producer);
        assert_eq!(publish.parent_span_id, attempts[0].span_context.span_id());
        assert_eq!(attempts[1].parent_span_id, publish.span_context.span_id());

        // Each attempt ran a transaction with the handler inside; the second
        // committed.
        let named = |name: &str| spans.iter().filter(|s| s.name == name).count();
        assert_eq!(named("transaction"), 2);
        assert_eq!(named("handler TEST_FLAKY"), 2);
        assert_eq!(named("commit"), 1);
        env.cleanup().await;
    });
}

#[test]
fn only_the_failure_that_parks_a_message_is_an_error() {
    run_traced(async {
        let env = TestEnv::new(&topology(2)).await;
        let (trace_id, _, traceparent) = producer_context();
        env.publish(&flaky("traced-parked", 10), traced(&traceparent)).await;
        let worker = env.spawn_worker(&[]);
        env.wait_for_queue_len(&env.dlq(), 1, WAIT).await;
        worker.stop().await;

        let spans = spans_of(&trace_id);
        let attempts = deliveries(&spans);
        assert_eq!(attempts.len(), 2, "{spans:#?}");
        assert_eq!(attempts[0].status, Status::Unset);
        assert_eq!(attribute(attempts[0], "iot.outcome").as_deref(), Some("retry"));
        assert!(
            matches!(&attempts[1].status, Status::Error { description } if description.contains("TEST_FLAKY")),
            "{:?}",
            attempts[1].status
        );
        assert_eq!(attribute(attempts[1], "iot.outcome").as_deref(), Some("parked"));
        assert_eq!(
            attribute(attempts[1], "error.type").as_deref(),
            Some("attempts_exhausted")
        );

        // The parked copy carries the trace on: a requeued message joins it.
        let parked = env.drain(&env.dlq()).await;
        let headers = parked[0].delivery.properties.headers().as_ref();
        let carried = worker_iot_core::headers::read_string(headers, "traceparent").unwrap();
        assert!(carried.starts_with(&format!("00-{trace_id}-")), "{carried}");
        let dlq_publish = spans
            .iter()
            .find(|s| s.name == format!("publish {}", env.dlq()))
            .unwrap();
        assert!(carried.contains(&dlq_publish.span_context.span_id().to_string()));
        env.cleanup().await;
    });
}

#[test]
fn a_command_s_device_message_carries_the_command_s_trace() {
    run_traced(async {
        let env = TestEnv::new(&topology(3)).await;
        let Device {
            id: device,
            queue: device_queue,
        } = Device::bind(&env).await;
        let (trace_id, _, traceparent) = producer_context();
        env.publish(&set_led("traced-led", &device, "on"), traced(&traceparent))
            .await;
        let worker = env.spawn_worker(&[]);
        env.wait_for_queue_len(&device_queue, 1, WAIT).await;
        worker.stop().await;

        let sent = env.drain(&device_queue).await;
        let headers = sent[0].delivery.properties.headers().as_ref();
        let carried = worker_iot_core::headers::read_string(headers, "traceparent").expect("traceparent");
        let spans = spans_of(&trace_id);
        let publish = spans
            .iter()
            .find(|s| s.name == "publish amq.topic")
            .expect("the relay's publish span, in the command's trace");
        assert_eq!(publish.span_kind, SpanKind::Producer);
        assert_eq!(carried, format!("00-{trace_id}-{}-01", publish.span_context.span_id()));
        let handler = spans.iter().find(|s| s.name == "handler SET_LED").unwrap();
        assert_eq!(publish.parent_span_id, handler.span_context.span_id());
        env.cleanup().await;
    });
}

/// Commands applied together (one bulk outbox statement): each device
/// message is in its own command's trace, under that command's delivery
/// (or its `handler` span, for a command that happened to run alone).
#[test]
fn commands_in_one_batch_each_keep_their_own_trace() {
    run_traced(async {
        let env = TestEnv::new(&topology(3)).await;
        let Device {
            id: device,
            queue: device_queue,
        } = Device::bind(&env).await;
        let mut traces = Vec::new();
        for i in 0..5 {
            let (trace_id, _, traceparent) = producer_context();
            let state = if i % 2 == 0 { "on" } else { "off" };
            env.publish(&set_led(&format!("batched-{i}"), &device, state), traced(&traceparent))
                .await;
            traces.push(trace_id);
        }
        // Published before the worker starts: they arrive as one batch.
        let worker = env.spawn_worker(&[]);
        env.wait_for_queue_len(&device_queue, 5, WAIT).await;
        worker.stop().await;

        let sent = env.drain(&device_queue).await;
        // The relay's order within a batch is not a promise: each device
        // message is matched to its command by the message id it carries.
        let carried: HashMap<String, String> = sent
            .iter()
            .map(|m| {
                let properties = &m.delivery.properties;
                let command = properties.message_id().as_ref().expect("the command's id").to_string();
                let traceparent =
                    worker_iot_core::headers::read_string(properties.headers().as_ref(), "traceparent").unwrap();
                (command, traceparent)
            })
            .collect();
        assert_eq!(carried.len(), 5, "one device message per command");
        for (i, trace_id) in traces.iter().enumerate() {
            let carried = &carried[&format!("batched-{i}")];
            assert!(
                carried.starts_with(&format!("00-{trace_id}-")),
                "{carried} is in trace {trace_id}"
            );
            let spans = spans_of(trace_id);
            let publish = spans
                .iter()
                .find(|s| s.name == "publish amq.topic")
                .expect("the relay's publish");
            let parent = spans
                .iter()
                .find(|s| s.span_context.span_id() == publish.parent_span_id)
                .expect("the publish's parent is in the command's trace");
            assert!(
                parent.span_kind == SpanKind::Consumer || parent.name == "handler SET_LED",
                "{}",
                parent.name
            );
        }
        let batch: i64 = sqlx::query_scalar("SELECT count(DISTINCT traceparent) FROM outbox")
            .fetch_one(&env.pool)
            .await
            .unwrap();
        assert_eq!(batch, 5, "one trace context per command");
        env.cleanup().await;
    });
}

/// An OTLP gRPC trace receiver: keeps every request.
#[derive(Clone, Default)]
struct Receiver {
    requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.requests.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    async fn start() -> (Receiver, SocketAddr) {
        let receiver = Receiver::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(receiver.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        (receiver, addr)
    }

    /// (service.name, span name, trace id) of every span received.
    fn spans(&self) -> Vec<(String, String, String)> {
        let mut spans = Vec::new();
        for request in self.requests.lock().unwrap().iter() {
            for resource_spans in &request.resource_spans {
                let service = resource_spans
                    .resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .find(|kv| kv.key == "service.name")
                    .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                    .map(|v| match v {
                        ProtoValue::StringValue(s) => s.clone(),
                        other => format!("{other:?}"),
                    })
                    .unwrap_or_default();
                for scope in &resource_spans.scope_spans {
                    for span in &scope.spans {
                        spans.push((service.clone(), span.name.clone(), hex(&span.trace_id)));
                    }
                }
            }
        }
        spans
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_pure_json_lines_naming_the_message_and_its_trace() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let (trace_id, _, traceparent) = producer_context();
    let body = json!({"type": "NO_SUCH_TYPE", "id": "logged-parked", "data": {}}).to_string();
    env.publish(body.as_bytes(), traced(&traceparent)).await;
    let extra = [("LOG_FORMAT", "json"), ("RUST_LOG", "info")];
    let mut worker = env.spawn_binary(WORKER, &env.settings_json(), &extra, "json");
    env.wait_for_queue_len(&env.dlq(), 1, WAIT).await;
    worker.signal("TERM");
    assert!(worker.wait_exit(Duration::from_secs(30)).await.success());

    let out = worker.stdout_text();
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}")))
        .collect();
    assert!(!out.contains('\u{1b}'), "no colour codes in a file: {out}");
    let parked = lines
        .iter()
        .find(|line| line["fields"]["message"] == "message parked")
        .unwrap_or_else(|| panic!("a parked line: {out}"));
    let span = &parked["span"];
    assert_eq!(span["messaging.message.id"], "logged-parked", "{parked}");
    assert_eq!(span["iot.message.type"], "NO_SUCH_TYPE", "{parked}");
    assert_eq!(span["trace_id"], trace_id.as_str(), "{parked}");
    let fingerprint = parked["fields"]["error.fingerprint"].as_str().unwrap();
    let dlq = env.drain(&env.dlq()).await;
    let headers = dlq[0].delivery.properties.headers().as_ref();
    assert_eq!(
        worker_iot_core::headers::read_string(headers, "iot-error-fingerprint").as_deref(),
        Some(fingerprint),
        "the line matches the DLQ entry"
    );
    let err = worker.stderr_text();
    assert!(
        err.contains("Effective configuration:"),
        "the banner goes to stderr: {err}"
    );
    env.cleanup().await;
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_exports_a_message_s_spans_over_otlp_and_flushes_them_on_sigterm() {
    let (receiver, addr) = Receiver::start().await;
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let (trace_id, _, traceparent) = producer_context();
    env.publish(&device_up("exported", "otlp-1"), traced(&traceparent))
        .await;
    let endpoint = format!("http://{addr}");
    // A batch is sent only when full or after ten minutes: the spans can
    // only arrive through the flush at shutdown.
    let extra = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
    ];
    let mut worker = env.spawn_binary(WORKER, &env.settings_json(), &extra, "otlp");
    env.wait_for_rows("devices WHERE device_id = 'otlp-1'", 1, WAIT).await;
    assert!(receiver.spans().is_empty(), "nothing sent before the flush");
    worker.signal("TERM");
    assert!(worker.wait_exit(Duration::from_secs(30)).await.success());

    let spans = receiver.spans();
    let ours: Vec<_> = spans.iter().filter(|(_, _, trace)| *trace == trace_id).collect();
    let process = format!("process {}", env.queue);
    assert!(
        ours.iter().any(|(_, name, _)| *name == process),
        "the delivery span was received: {spans:?}"
    );
    assert!(ours.iter().any(|(_, name, _)| name == "handler DEVICE_UP"), "{ours:?}");
    assert!(
        ours.iter().all(|(service, _, _)| service == "worker-iot-core"),
        "{ours:?}"
    );
    env.cleanup().await;
}
