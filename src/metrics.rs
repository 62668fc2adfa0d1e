//! The worker's metrics, rendered in the Prometheus text format by
//! [`crate::http`] on `METRICS_ADDR`. Readiness is its own concept
//! ([`crate::readiness`]), which keeps its gauges here.
//!
//! Every [`Metrics`] owns its recorder: a `metrics-exporter-prometheus`
//! [`PrometheusRecorder`] that this module records into directly through
//! the [`metrics::Recorder`] trait, not the process-wide recorder of the
//! `counter!` macros. Tests run several workers in one process, each with
//! its own `Metrics`; a global recorder would add their counts together,
//! and `metrics::with_local_recorder` is per thread, so it would miss what
//! tokio runs on other threads.
//!
//! A few aggregate counts are also kept in atomics, for the supervisor and
//! the tests ([`Metrics::processed`], [`Metrics::parked`], …).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use metrics::{Counter, Gauge, Key, KeyName, Label, Level, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::envelope::MessageType;
use crate::failure::ErrorKind;
use crate::outbox::Stats;
use crate::outcome::{Event, Handling, Outcome};
use crate::retry::{Disposition, RetryPolicy};

/// The metric names, each with its type, unit and help (the table in
/// docs/observability.md, "Metrics", says the same).
mod name {
    pub const DELIVERIES: &str = "iot_deliveries_total";
    pub const HANDLING: &str = "iot_delivery_handling_seconds";
    pub const IN_PROCESS_RETRIES: &str = "iot_in_process_retries_total";
    pub const DELAYED_RETRIES: &str = "iot_delayed_retries_total";
    pub const UNSETTLED: &str = "iot_deliveries_unsettled_total";
    pub const IN_FLIGHT: &str = "iot_deliveries_in_flight";
    pub const CONNECTIONS: &str = "iot_broker_connections_total";
    pub const BLOCKED: &str = "iot_broker_blocked";
    pub const RECONNECTS: &str = "iot_broker_reconnects_total";
    pub const NODE: &str = "iot_broker_node_info";
    pub const READY: &str = "iot_ready";
    pub const DATABASE_UP: &str = "iot_database_up";
    pub const POOL_SIZE: &str = "iot_db_pool_connections";
    pub const POOL_IN_USE: &str = "iot_db_pool_connections_in_use";
    pub const POOL_MAX: &str = "iot_db_pool_max_connections";
    pub const BUILD_INFO: &str = "iot_build_info";
    pub const OUTBOX_PUBLISHED: &str = "iot_outbox_published_total";
    pub const OUTBOX_UNROUTABLE: &str = "iot_outbox_unroutable_total";
    pub const OUTBOX_ERRORS: &str = "iot_outbox_relay_errors_total";
    pub const OUTBOX_PENDING: &str = "iot_outbox_pending_rows";
    pub const OUTBOX_FAILED: &str = "iot_outbox_failed_rows";
    pub const OUTBOX_OLDEST: &str = "iot_outbox_oldest_pending_seconds";
    pub const PARKED: &str = "iot_parked_messages";
    pub const PARKING_MOVED: &str = "iot_parking_moved_total";
    pub const PARKING_ERRORS: &str = "iot_parking_errors_total";
    pub const PARKING_PAUSED: &str = "iot_parking_paused";
    pub const STORED_ROWS: &str = "iot_stored_rows";
    pub const STORED_BYTES: &str = "iot_stored_bytes";
    pub const OLDEST_PARTITION: &str = "iot_oldest_partition_age_seconds";
    pub const RETENTION_DAYS: &str = "iot_telemetry_retention_days";
    pub const RETENTION_LAST_RUN: &str = "iot_telemetry_retention_last_run_timestamp_seconds";
}

/// Upper bounds of the handling-duration histogram, in seconds.
const HANDLING_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Passed with each registration; the Prometheus recorder ignores it.
static METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// The `type` label of a message type: the type itself when a handler
/// knows it, `unknown` otherwise (undecodable or unhandled), so a producer
/// cannot create series at will.
fn type_label(message_type: Option<&MessageType>) -> &'static str {
    message_type.map_or("unknown", MessageType::label)
}

/// The worker's live counts.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    processed: AtomicU64,
    duplicate: AtomicU64,
    retried: AtomicU64,
    parked: [AtomicU64; ErrorKind::ALL.len()],
    connections: AtomicU64,
    outbox_published: AtomicU64,
    outbox_unroutable: AtomicU64,
    outbox_errors: AtomicU64,
    in_flight: Gauge,
    /// `host:port` of the broker of the current (or last) session.
    node: Mutex<String>,
    /// Where `/metrics` is served, once bound.
    http_addr: Mutex<Option<SocketAddr>>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh set, with its own recorder.
    pub fn new() -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(name::HANDLING.into()), &HANDLING_BUCKETS)
            // The buckets are a non-empty constant.
            .expect("histogram buckets are not empty")
            .build_recorder();
        describe(&recorder);
        let handle = recorder.handle();
        let in_flight = recorder.register_gauge(&Key::from_name(name::IN_FLIGHT), &METADATA);
        let metrics = Metrics {
            recorder,
            handle,
            processed: AtomicU64::new(0),
            duplicate: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            parked: Default::default(),
            connections: AtomicU64::new(0),
            outbox_published: AtomicU64::new(0),
            outbox_unroutable: AtomicU64::new(0),
            outbox_errors: AtomicU64::new(0),
            in_flight,
            node: Mutex::new(String::new()),
            http_addr: Mutex::new(None),
        };
        // Series that exist from the start, so a dashboard or an alert
        // sees 0 rather than nothing.
        let version = Label::new("version", env!("CARGO_PKG_VERSION"));
        metrics.gauge(name::BUILD_INFO, vec![version]).set(1.0);
        for counter in [
            name::CONNECTIONS,
            name::RECONNECTS,
            name::OUTBOX_PUBLISHED,
            name::OUTBOX_UNROUTABLE,
            name::OUTBOX_ERRORS,
            name::PARKING_ERRORS,
        ] {
            metrics.counter(counter, vec![]).absolute(0);
        }
        for result in MoveResult::ALL {
            metrics
                .counter(name::PARKING_MOVED, vec![Label::new("result", result.as_str())])
                .absolute(0);
        }
        metrics.gauge(name::PARKING_PAUSED, vec![]).set(0.0);
        metrics.in_flight.set(0.0);
        metrics.readiness_gauge().set(0.0);
        metrics
    }

    fn counter(&self, name: &'static str, labels: Vec<Label>) -> Counter {
        self.recorder
            .register_counter(&Key::from_parts(name, labels), &METADATA)
    }

    fn gauge(&self, name: &'static str, labels: Vec<Label>) -> Gauge {
        self.recorder.register_gauge(&Key::from_parts(name, labels), &METADATA)
    }

    /// The in-flight gauge, which each channel's acks keep: up when a
    /// delivery arrives, down when it is acked or its channel is gone, so
    /// it comes back to zero on every path.
    pub(crate) fn in_flight(&self) -> Gauge {
        self.in_flight.clone()
    }

    /// Follows the pipeline: counts each delivery by type and outcome,
    /// times it, and counts its retries. `retry` names the delay of a
    /// delayed retry.
    pub(crate) fn observe(&self, event: &Event<'_>, retry: &RetryPolicy) {
        match event {
            Event::Received(_) => {}
            Event::Settled(_, outcome, handling) => self.record(outcome, handling, retry),
            Event::Unsettled(..) => {
                self.counter(name::UNSETTLED, vec![Label::new("reason", "settle_failed")])
                    .increment(1);
            }
            Event::CutOff(_) => {
                self.counter(name::UNSETTLED, vec![Label::new("reason", "cut_off")])
                    .increment(1);
            }
        }
    }

    fn record(&self, outcome: &Outcome, handling: &Handling, retry: &RetryPolicy) {
        let message_type = type_label(handling.message_type.as_ref());
        let (label, kind) = match outcome {
            Outcome::Processed => {
                self.processed.fetch_add(1, Ordering::Relaxed);
                ("processed", None)
            }
            Outcome::Duplicate => {
                self.duplicate.fetch_add(1, Ordering::Relaxed);
                ("duplicate", None)
            }
            Outcome::Omitted => ("omitted", None),
            Outcome::Diverted(Disposition::RetryLater { retry: n, .. }) => {
                self.retried.fetch_add(1, Ordering::Relaxed);
                let delay = Label::new("delay", retry.delay(*n).name.clone());
                self.counter(name::DELAYED_RETRIES, vec![delay]).increment(1);
                ("retried", None)
            }
            Outcome::Diverted(Disposition::Park { kind }) => {
                self.parked[*kind as usize].fetch_add(1, Ordering::Relaxed);
                ("parked", Some(*kind))
            }
        };
        let mut labels = vec![Label::new("type", message_type), Label::new("outcome", label)];
        if let Some(kind) = kind {
            labels.push(Label::new("kind", kind.as_str()));
        }
        self.counter(name::DELIVERIES, labels).increment(1);
        let labels = vec![Label::new("type", message_type), Label::new("outcome", label)];
        self.recorder
            .register_histogram(&Key::from_parts(name::HANDLING, labels), &METADATA)
            .record(handling.elapsed.as_secs_f64());
        if handling.in_process_retries > 0 {
            self.counter(name::IN_PROCESS_RETRIES, vec![Label::new("type", message_type)])
                .increment(u64::from(handling.in_process_retries));
        }
    }

    /// `iot_ready`, which [`crate::readiness`] keeps.
    pub(crate) fn readiness_gauge(&self) -> Gauge {
        self.gauge(name::READY, vec![])
    }

    /// `iot_database_up`, which [`crate::readiness`] keeps.
    pub(crate) fn database_up_gauge(&self) -> Gauge {
        self.gauge(name::DATABASE_UP, vec![])
    }

    /// `iot_broker_blocked`, which [`crate::readiness`] keeps.
    pub(crate) fn broker_blocked_gauge(&self) -> Gauge {
        self.gauge(name::BLOCKED, vec![])
    }

    /// Counts one broker connection established (the first and every
    /// reconnection), to the broker at `node` (`host:port`).
    pub(crate) fn record_connection(&self, node: &str) {
        if self.connections.fetch_add(1, Ordering::Relaxed) > 0 {
            self.counter(name::RECONNECTS, vec![]).increment(1);
        }
        self.counter(name::CONNECTIONS, vec![]).increment(1);
        let mut current = self.node.lock().unwrap_or_else(PoisonError::into_inner);
        if *current != node {
            if !current.is_empty() {
                self.gauge(name::NODE, vec![Label::new("node", current.clone())])
                    .set(0.0);
            }
            node.clone_into(&mut current);
        }
        self.gauge(name::NODE, vec![Label::new("node", node.to_owned())])
            .set(1.0);
    }

    /// `host:port` of the broker the worker is (or was last) connected to.
    pub fn node(&self) -> String {
        self.node.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Sets the pool gauges: open connections, of which `idle` are idle,
    /// out of at most `max`.
    pub(crate) fn set_pool(&self, size: u32, idle: usize, max: u32) {
        let idle = u32::try_from(idle).unwrap_or(u32::MAX);
        self.gauge(name::POOL_SIZE, vec![]).set(f64::from(size));
        self.gauge(name::POOL_IN_USE, vec![])
            .set(f64::from(size.saturating_sub(idle)));
        self.gauge(name::POOL_MAX, vec![]).set(f64::from(max));
    }

    /// Counts device messages the outbox relay published (confirmed).
    pub(crate) fn record_outbox_published(&self, rows: u64) {
        self.outbox_published.fetch_add(rows, Ordering::Relaxed);
        self.counter(name::OUTBOX_PUBLISHED, vec![]).increment(rows);
    }

    /// Counts one device message returned unroutable.
    pub(crate) fn record_outbox_unroutable(&self) {
        self.outbox_unroutable.fetch_add(1, Ordering::Relaxed);
        self.counter(name::OUTBOX_UNROUTABLE, vec![]).increment(1);
    }

    /// Counts one database or broker error of the outbox relay (it backs
    /// off and tries again).
    pub(crate) fn record_outbox_error(&self) {
        self.outbox_errors.fetch_add(1, Ordering::Relaxed);
        self.counter(name::OUTBOX_ERRORS, vec![]).increment(1);
    }

    /// Sets the outbox gauges.
    pub(crate) fn set_outbox_stats(&self, stats: Stats) {
        let rows = |n: i64| n.max(0) as f64;
        self.gauge(name::OUTBOX_PENDING, vec![]).set(rows(stats.pending));
        self.gauge(name::OUTBOX_FAILED, vec![]).set(rows(stats.failed));
        self.gauge(name::OUTBOX_OLDEST, vec![])
            .set(stats.oldest_pending.as_secs_f64());
    }

    /// Sets `iot_parked_messages{status}` from the lot's counts.
    pub(crate) fn set_parked(&self, counts: &[(&'static str, i64)]) {
        for (status, n) in counts {
            self.gauge(name::PARKED, vec![Label::new("status", *status)])
                .set((*n).max(0) as f64);
        }
    }

    /// Counts messages the keeper (or `requeue`) moved from `Q.dlq` into
    /// the lot, by what became of each.
    pub(crate) fn record_parking_moves(&self, result: MoveResult, n: u64) {
        self.counter(name::PARKING_MOVED, vec![Label::new("result", result.as_str())])
            .increment(n);
    }

    /// Counts one failed attempt to store a batch in the lot.
    pub(crate) fn record_parking_error(&self) {
        self.counter(name::PARKING_ERRORS, vec![]).increment(1);
    }

    /// Sets the gauges of one day-partitioned table.
    pub(crate) fn set_stored(&self, table: &'static str, rows: f64, bytes: f64, oldest: Option<Duration>) {
        let label = || vec![Label::new("table", table)];
        self.gauge(name::STORED_ROWS, label()).set(rows);
        self.gauge(name::STORED_BYTES, label()).set(bytes);
        if let Some(oldest) = oldest {
            self.gauge(name::OLDEST_PARTITION, label()).set(oldest.as_secs_f64());
        }
    }

    /// `TELEMETRY_RETENTION_DAYS`, 0 for off.
    pub(crate) fn set_retention_days(&self, days: Option<u32>) {
        self.gauge(name::RETENTION_DAYS, vec![])
            .set(f64::from(days.unwrap_or(0)));
    }

    /// A retention run finished at `at`.
    pub(crate) fn set_retention_run(&self, at: chrono::DateTime<chrono::Utc>) {
        self.gauge(name::RETENTION_LAST_RUN, vec![])
            .set(at.timestamp_millis() as f64 / 1000.0);
    }

    /// 1 while the keeper has stopped taking from `Q.dlq`.
    pub(crate) fn set_parking_paused(&self, paused: bool) {
        self.gauge(name::PARKING_PAUSED, vec![])
            .set(f64::from(u8::from(paused)));
    }

    pub fn outbox_errors(&self) -> u64 {
        self.outbox_errors.load(Ordering::Relaxed)
    }

    pub fn outbox_published(&self) -> u64 {
        self.outbox_published.load(Ordering::Relaxed)
    }

    pub fn outbox_unroutable(&self) -> u64 {
        self.outbox_unroutable.load(Ordering::Relaxed)
    }

    pub fn processed(&self) -> u64 {
        self.processed.load(Ordering::Relaxed)
    }

    pub fn duplicates(&self) -> u64 {
        self.duplicate.load(Ordering::Relaxed)
    }

    /// Deliveries sent to a retry queue (delayed retries).
    pub fn retried(&self) -> u64 {
        self.retried.load(Ordering::Relaxed)
    }

    pub fn parked(&self, kind: ErrorKind) -> u64 {
        self.parked[kind as usize].load(Ordering::Relaxed)
    }

    /// Broker connections opened, the first included.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served, once bound
    /// (useful with port 0).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        *self.http_addr.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn set_http_addr(&self, addr: SocketAddr) {
        *self.http_addr.lock().unwrap_or_else(PoisonError::into_inner) = Some(addr);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Folds recent histogram samples into the buckets, so they do not
    /// pile up between scrapes; call every few seconds.
    pub(crate) fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}

/// What became of one message moved from `Q.dlq` into the lot
/// (docs/reliability.md, "The parking lot").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveResult {
    /// A new row.
    Stored,
    /// A message parked again after a retry: its row is `parked` again.
    ParkedAgain,
    /// A copy of a parking already stored (a crash between confirm and
    /// ack): nothing changed.
    Duplicate,
}

impl MoveResult {
    pub const ALL: [MoveResult; 3] = [MoveResult::Stored, MoveResult::ParkedAgain, MoveResult::Duplicate];

    pub fn as_str(self) -> &'static str {
        match self {
            MoveResult::Stored => "stored",
            MoveResult::ParkedAgain => "parked_again",
            MoveResult::Duplicate => "duplicate",
        }
    }
}

/// The `# HELP` lines of the counters.
const COUNTERS: [(&str, &str); 11] = [
    (
        name::DELIVERIES,
        "Deliveries settled, by message type (unknown when undecodable or unhandled), outcome (processed, duplicate, omitted, retried, parked) and, when parked, kind.",
    ),
    (
        name::IN_PROCESS_RETRIES,
        "Runs of a transaction after the first, in process (stage 1), by message type.",
    ),
    (name::DELAYED_RETRIES, "Deliveries sent to a retry queue, by delay."),
    (
        name::UNSETTLED,
        "Deliveries left unacked for redelivery: the copy or ack failed (settle_failed) or the grace period ended (cut_off).",
    ),
    (name::CONNECTIONS, "Broker connections opened, the first included."),
    (name::RECONNECTS, "Broker connections opened after the first."),
    (
        name::OUTBOX_PUBLISHED,
        "Device messages the outbox relay published (confirmed).",
    ),
    (
        name::OUTBOX_UNROUTABLE,
        "Device messages the broker returned as unroutable.",
    ),
    (
        name::OUTBOX_ERRORS,
        "Database or broker errors of the outbox relay (it backs off).",
    ),
    (
        name::PARKING_MOVED,
        "Messages moved from Q.dlq into the parking lot, by result (stored, parked_again, duplicate).",
    ),
    (
        name::PARKING_ERRORS,
        "Batches the parking keeper could not store (it stops taking from Q.dlq and tries again).",
    ),
];

/// The `# HELP` lines (and units) of the gauges.
const GAUGES: [(&str, Option<Unit>, &str); 19] = [
    (
        name::IN_FLIGHT,
        None,
        "Deliveries received on a live channel and not acked yet.",
    ),
    (
        name::BLOCKED,
        None,
        "1 while the broker blocks a publishing connection of the worker (memory or disk alarm): copies and device messages wait.",
    ),
    (
        name::NODE,
        None,
        "The broker (host:port) of the current session: 1, and 0 for earlier ones.",
    ),
    (
        name::READY,
        None,
        "1 when /readyz answers 200 (consuming and the database reachable).",
    ),
    (
        name::DATABASE_UP,
        None,
        "1 when the last database check (SELECT 1) succeeded.",
    ),
    (name::POOL_SIZE, None, "Open database connections of the pool."),
    (name::POOL_IN_USE, None, "Database connections of the pool in use."),
    (name::POOL_MAX, None, "The pool's maximum size."),
    (
        name::BUILD_INFO,
        None,
        "Always 1; the version label says which build runs.",
    ),
    (name::OUTBOX_PENDING, None, "Outbox rows waiting to be published."),
    (
        name::OUTBOX_FAILED,
        None,
        "Outbox rows given up on (returned unroutable too often).",
    ),
    (
        name::OUTBOX_OLDEST,
        Some(Unit::Seconds),
        "Age of the oldest pending outbox row.",
    ),
    (
        name::PARKED,
        None,
        "Rows of the parking lot of this worker's queue, by status (parked, retried, archived); every worker reports the same lot.",
    ),
    (
        name::PARKING_PAUSED,
        None,
        "1 while the parking keeper does not take from Q.dlq (the database is unreachable).",
    ),
    (
        name::STORED_ROWS,
        None,
        "Rows of each day-partitioned table (measurements, beacon_readings, event_rows), PostgreSQL's estimate.",
    ),
    (
        name::STORED_BYTES,
        Some(Unit::Bytes),
        "Bytes of each day-partitioned table: heap, indexes and TOAST of every partition.",
    ),
    (
        name::OLDEST_PARTITION,
        Some(Unit::Seconds),
        "Age of the beginning of each day-partitioned table's oldest partition.",
    ),
    (
        name::RETENTION_DAYS,
        None,
        "TELEMETRY_RETENTION_DAYS of this worker; 0 when retention is off (everything is kept).",
    ),
    (
        name::RETENTION_LAST_RUN,
        Some(Unit::Seconds),
        "When this worker's retention last ran to the end (Unix time); absent while it never has.",
    ),
];

/// The `# HELP` lines.
fn describe(recorder: &PrometheusRecorder) {
    for (name, help) in COUNTERS {
        recorder.describe_counter(KeyName::from(name), None, SharedString::from(help));
    }
    for (name, unit, help) in GAUGES {
        recorder.describe_gauge(KeyName::from(name), unit, SharedString::from(help));
    }
    recorder.describe_histogram(
        KeyName::from(name::HANDLING),
        Some(Unit::Seconds),
        SharedString::from("Time from receipt to settlement of a delivery, by message type and outcome."),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unhandled_types_share_one_label() {
        assert_eq!(type_label(Some(&MessageType::Handled("MEASUREMENT"))), "MEASUREMENT");
        assert_eq!(
            type_label(Some(&MessageType::Unknown("NO_SUCH_TYPE".into()))),
            "unknown"
        );
        assert_eq!(type_label(None), "unknown");
    }

    #[test]
    fn a_fresh_set_renders_build_info_and_zero_counters() {
        let metrics = Metrics::new();
        let text = metrics.render();
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            text.contains(&format!("iot_build_info{{version=\"{version}\"}} 1\n")),
            "{text}"
        );
        assert!(text.contains("iot_broker_reconnects_total 0\n"), "{text}");
        assert!(text.contains("iot_ready 0\n"), "{text}");
        assert!(text.contains("# TYPE iot_deliveries_in_flight gauge\n"), "{text}");
    }

    #[test]
    fn a_reconnect_to_another_node_moves_the_node_gauge() {
        let metrics = Metrics::new();
        metrics.record_connection("a:5672");
        metrics.record_connection("b:5672");
        let text = metrics.render();
        assert!(text.contains("iot_broker_node_info{node=\"a:5672\"} 0\n"), "{text}");
        assert!(text.contains("iot_broker_node_info{node=\"b:5672\"} 1\n"), "{text}");
        assert!(text.contains("iot_broker_connections_total 2\n"), "{text}");
        assert!(text.contains("iot_broker_reconnects_total 1\n"), "{text}");
        assert_eq!(metrics.connections(), 2);
    }

    #[test]
    fn each_set_counts_on_its_own() {
        let (a, b) = (Metrics::new(), Metrics::new());
        a.record_outbox_published(3);
        assert!(a.render().contains("iot_outbox_published_total 3\n"));
        assert!(b.render().contains("iot_outbox_published_total 0\n"));
    }

    #[test]
    fn the_parking_lot_has_its_gauge_and_counters() {
        let metrics = Metrics::new();
        let text = metrics.render();
        assert!(
            text.contains("iot_parking_moved_total{result=\"duplicate\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("iot_parking_paused 0\n"), "{text}");
        metrics.set_parked(&[("parked", 3), ("retried", 0)]);
        metrics.record_parking_moves(MoveResult::Stored, 3);
        let text = metrics.render();
        assert!(text.contains("iot_parked_messages{status=\"parked\"} 3\n"), "{text}");
        assert!(
            text.contains("iot_parking_moved_total{result=\"stored\"} 3\n"),
            "{text}"
        );
    }
}
