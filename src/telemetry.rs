//! Logs and traces: the `tracing` subscriber (text or JSON lines, filtered
//! by `RUST_LOG`), the optional OpenTelemetry export over OTLP, and the W3C
//! trace context carried in AMQP headers (docs/observability.md, "Trace
//! context").
//!
//! Without `OTEL_EXPORTER_OTLP_ENDPOINT` no OpenTelemetry layer is
//! installed: spans are plain `tracing` spans (they give log lines their
//! message fields) and nothing is exported. With it, every span of the
//! worker goes to the OTLP receiver through a batch processor, whatever
//! `RUST_LOG` says (the filter is the log output's only).
//!
//! Trace context policy: a delivery's span is the child of the context in
//! its `traceparent` header (the producer's, or the copy's that an earlier
//! attempt published), and every copy the worker publishes (retry, DLQ,
//! outbox device message) carries the context of the span that published
//! it. So each attempt hangs under the publish that caused it, and a
//! message's whole life, `requeue` included (requeue keeps the headers),
//! is one trace with the producer's trace id.

use std::io::IsTerminal;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracer, SdkTracerProvider};
use tracing::Span;
use tracing::level_filters::LevelFilter;
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, OtlpProtocol, Settings};
use crate::headers;

/// The W3C headers.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot export spans to OTEL_EXPORTER_OTLP_ENDPOINT={endpoint}: {source}")]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error("a tracing subscriber is already installed: {0}")]
    AlreadyInstalled(#[from] tracing::subscriber::SetGlobalDefaultError),
}

/// The installed subscriber; [`Telemetry::shutdown`] flushes the spans
/// still buffered.
#[must_use = "spans are only flushed by Telemetry::shutdown"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Installs the process-wide subscriber: log lines in `LOG_FORMAT` on
    /// stdout (coloured only on a terminal) filtered by `RUST_LOG` (default
    /// `info`), and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, the OTLP
    /// span export. Must run inside the Tokio runtime (the gRPC exporter
    /// needs it).
    ///
    /// # Errors
    /// [`TelemetryError`] when the exporter cannot be built or a subscriber
    /// is already installed.
    pub fn install(settings: &Settings) -> Result<Telemetry, TelemetryError> {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        let ansi = std::io::stdout().is_terminal();
        let logs = match settings.log_format {
            LogFormat::Text => tracing_subscriber::fmt::layer().with_ansi(ansi).boxed(),
            LogFormat::Json => tracing_subscriber::fmt::layer().json().with_ansi(false).boxed(),
        };
        let provider = settings
            .otel_endpoint
            .as_deref()
            .map(|endpoint| exporting_provider(settings, endpoint))
            .transpose()?;
        let spans = provider
            .as_ref()
            .map(|provider| otel_layer(provider).with_filter(span_filter()));
        let subscriber = tracing_subscriber::registry()
            .with(logs.with_filter(filter))
            .with(spans);
        // Not `try_init`, which also bridges the `log` crate: sqlx's
        // `log_enabled!` checks then call the subscriber's `enabled` outside
        // any span creation, which leaves stale per-layer filter state and
        // silently drops the next span (tokio-rs/tracing#2519).
        tracing::subscriber::set_global_default(subscriber)?;
        Ok(Telemetry { provider })
    }

    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still buffered and stops the exporter. Call it
    /// last, after the worker stopped: spans ended later are lost.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else { return };
        // The SDK's shutdown blocks until the batch is exported, which
        // needs the runtime's other threads for the gRPC call.
        match tokio::task::spawn_blocking(move || provider.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("worker-iot-core: flushing spans at shutdown: {e}"),
            Err(e) => eprintln!("worker-iot-core: flushing spans at shutdown: {e}"),
        }
    }
}

/// A provider that exports to `endpoint` in batches, with the resource
/// `service.name` (`OTEL_SERVICE_NAME`) and `service.version`.
fn exporting_provider(settings: &Settings, endpoint: &str) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = match settings.otel_protocol {
        OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build(),
    }
    .map_err(|source| TelemetryError::Exporter {
        endpoint: endpoint.to_owned(),
        source,
    })?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource(&settings.otel_service_name))
        .build())
}

/// The resource every exported span names: this service and its version.
pub fn resource(service_name: &str) -> Resource {
    Resource::builder_empty()
        .with_service_name(service_name.to_owned())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build()
}

/// The layer that turns `tracing` spans into OpenTelemetry spans of
/// `provider`. Error-level events do not make a span an error: only the
/// pipeline sets a span's status (on the failure that parks a message).
pub fn otel_layer<S>(provider: &SdkTracerProvider) -> OpenTelemetryLayer<S, SdkTracer>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("worker-iot-core"))
        .with_error_events_to_status(false)
        .with_threads(false)
        .with_location(false)
}

/// The spans exported: the worker's own, at debug and above (a delivery's
/// child spans are at debug, so that without export and with logs at
/// `info` they are not even created); debug events become span events.
/// The log filter does not apply, so `RUST_LOG=warn` keeps traces whole.
pub fn span_filter() -> Targets {
    Targets::new()
        .with_target("worker_iot_core", LevelFilter::DEBUG)
        .with_default(LevelFilter::OFF)
}

/// The trace context in `headers` (`traceparent`, `tracestate`); an empty
/// context when there is none or it is malformed.
pub fn extract(headers: Option<&FieldTable>) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// The trace id of a `traceparent` header, when it has a valid one: for
/// log lines, also when nothing is exported.
pub fn header_trace_id(headers: Option<&FieldTable>) -> Option<TraceId> {
    let context = extract(headers);
    let span = context.span();
    let span_context = span.span_context();
    span_context.is_valid().then(|| span_context.trace_id())
}

/// Sets `span`'s parent to the context in `headers`, and returns the trace
/// id the span belongs to: the exported one, else the header's (when
/// nothing is exported the span has no OpenTelemetry context, but the
/// logs still name the producer's trace).
pub fn continue_trace(span: &Span, headers: Option<&FieldTable>) -> Option<TraceId> {
    let parent = extract(headers);
    let carried = {
        let carried = parent.span();
        let context = carried.span_context();
        context.is_valid().then(|| context.trace_id())
    };
    // Fails only when no OpenTelemetry layer is installed.
    if span.set_parent(parent).is_err() {
        return carried;
    }
    let context = span.context();
    let own = context.span();
    let own = own.span_context();
    if own.is_valid() { Some(own.trace_id()) } else { carried }
}

/// `properties` with the context of `span` in `traceparent`/`tracestate`,
/// replacing what was there. Unchanged when `span` has no exported
/// context (nothing is exported): a copy then keeps the producer's header.
pub fn with_context_of(span: &Span, properties: BasicProperties) -> BasicProperties {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return properties;
    }
    let mut headers = properties.headers().clone().unwrap_or_default();
    TraceContextPropagator::new().inject_context(&context, &mut HeaderInjector(&mut headers));
    properties.with_headers(headers)
}

/// `properties` with a `traceparent` that starts a trace: `span`'s context
/// when it is exported, else a new random one (the consumer's spans then
/// hang under a parent nobody exported). Returns the trace id, to look
/// the message up by.
pub fn start_trace(span: &Span, properties: BasicProperties) -> (BasicProperties, TraceId) {
    let mut context = span.context();
    if !context.span().span_context().is_valid() {
        let ids = RandomIdGenerator::default();
        let new = SpanContext::new(
            ids.new_trace_id(),
            ids.new_span_id(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        context = Context::new().with_remote_span_context(new);
    }
    let trace_id = context.span().span_context().trace_id();
    let mut headers = properties.headers().clone().unwrap_or_default();
    TraceContextPropagator::new().inject_context(&context, &mut HeaderInjector(&mut headers));
    (properties.with_headers(headers), trace_id)
}

/// A stored trace context: the W3C `traceparent`, and `tracestate` when
/// there is one.
pub type TraceContext = (String, Option<String>);

/// The W3C `traceparent` and `tracestate` of `span`, for storing (the
/// outbox keeps them with a device message until it is published).
pub fn context_headers(span: &Span) -> Option<TraceContext> {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut table = FieldTable::default();
    TraceContextPropagator::new().inject_context(&context, &mut HeaderInjector(&mut table));
    let traceparent = headers::read_string(Some(&table), TRACEPARENT)?;
    let tracestate = headers::read_string(Some(&table), TRACESTATE).filter(|s| !s.is_empty());
    Some((traceparent, tracestate))
}

/// Reads trace context from an AMQP header table: long or short strings.
struct HeaderExtractor<'a>(Option<&'a FieldTable>);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0?.inner().get(key)? {
            AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
            AMQPValue::ShortString(s) => Some(s.as_str()),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .map(|table| table.inner().keys().map(|k| k.as_str()).collect())
            .unwrap_or_default()
    }
}

/// Writes trace context into an AMQP header table as long strings.
struct HeaderInjector<'a>(&'a mut FieldTable);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        headers::put_str(self.0, key, &value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn table(traceparent: &str) -> FieldTable {
        let mut table = FieldTable::default();
        headers::put_str(&mut table, TRACEPARENT, traceparent);
        table
    }

    #[test]
    fn reads_the_producer_trace_id() {
        let id = header_trace_id(Some(&table(PARENT))).unwrap();
        assert_eq!(id.to_string(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(header_trace_id(Some(&table("00-garbage"))), None);
        assert_eq!(header_trace_id(None), None);
        let mut short = FieldTable::default();
        short.insert(TRACEPARENT.into(), AMQPValue::ShortString(PARENT.into()));
        assert!(header_trace_id(Some(&short)).is_some());
    }

    #[test]
    fn without_export_a_copy_keeps_the_producer_context() {
        let properties = BasicProperties::default().with_headers(table(PARENT));
        let copy = with_context_of(&Span::none(), properties.clone());
        assert_eq!(copy, properties);
        assert_eq!(context_headers(&Span::none()), None);
    }

    #[test]
    fn a_trace_can_be_started_without_export() {
        let (properties, trace_id) = start_trace(&Span::none(), BasicProperties::default());
        assert_eq!(header_trace_id(properties.headers().as_ref()), Some(trace_id));
        let (_, other) = start_trace(&Span::none(), BasicProperties::default());
        assert_ne!(trace_id, other, "a new trace each time");
    }
}
