//! Counters and readiness, served as `/metrics` (Prometheus text format),
//! `/healthz` and `/readyz` on `METRICS_ADDR` by a deliberately tiny HTTP
//! server. Tests read the same [`Metrics`] directly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::failure::ErrorKind;
use crate::outbox::Stats;
use crate::pipeline::{Event, Outcome};
use crate::retry::Disposition;

/// The worker's live state.
#[derive(Default)]
pub struct Metrics {
    ready: AtomicBool,
    processed: AtomicU64,
    duplicate: AtomicU64,
    omitted: AtomicU64,
    retried: AtomicU64,
    parked: [AtomicU64; ErrorKind::ALL.len()],
    connections: AtomicU64,
    /// `host:port` of the broker of the current (or last) session.
    node: std::sync::Mutex<String>,
    unsettled: AtomicU64,
    outbox_published: AtomicU64,
    outbox_unroutable: AtomicU64,
    outbox_errors: AtomicU64,
    outbox_pending: AtomicU64,
    outbox_failed: AtomicU64,
    outbox_oldest_pending_ms: AtomicU64,
}

impl Metrics {
    /// Whether the worker is connected and consuming.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Follows the pipeline: counts each settled delivery by outcome, and
    /// each one left unsettled.
    pub fn observe(&self, event: &Event<'_>) {
        match event {
            Event::Received(_) => {}
            Event::Settled(_, outcome) => self.record(outcome),
            Event::Unsettled(..) => {
                self.unsettled.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn record(&self, outcome: &Outcome) {
        let counter = match outcome {
            Outcome::Processed => &self.processed,
            Outcome::Duplicate => &self.duplicate,
            Outcome::Omitted => &self.omitted,
            Outcome::Diverted(Disposition::RetryLater { .. }) => &self.retried,
            Outcome::Diverted(Disposition::Park { kind }) => &self.parked[*kind as usize],
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one broker connection established (the first and every
    /// reconnection), to the broker at `node` (`host:port`).
    pub fn record_connection(&self, node: &str) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        node.clone_into(&mut self.node.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    }

    /// `host:port` of the broker the worker is (or was last) connected to.
    pub fn node(&self) -> String {
        self.node
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Counts device messages the outbox relay published (confirmed).
    pub fn record_outbox_published(&self, rows: u64) {
        self.outbox_published.fetch_add(rows, Ordering::Relaxed);
    }

    /// Counts one device message returned unroutable.
    pub fn record_outbox_unroutable(&self) {
        self.outbox_unroutable.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one database or broker error of the outbox relay (it backs
    /// off and tries again).
    pub fn record_outbox_error(&self) {
        self.outbox_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn outbox_errors(&self) -> u64 {
        self.outbox_errors.load(Ordering::Relaxed)
    }

    /// Sets the outbox gauges.
    pub fn set_outbox_stats(&self, stats: Stats) {
        let rows = |n: i64| u64::try_from(n).unwrap_or(0);
        self.outbox_pending.store(rows(stats.pending), Ordering::Relaxed);
        self.outbox_failed.store(rows(stats.failed), Ordering::Relaxed);
        let age_ms = u64::try_from(stats.oldest_pending.as_millis()).unwrap_or(u64::MAX);
        self.outbox_oldest_pending_ms.store(age_ms, Ordering::Relaxed);
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

    pub fn retried(&self) -> u64 {
        self.retried.load(Ordering::Relaxed)
    }

    pub fn parked(&self, kind: ErrorKind) -> u64 {
        self.parked[kind as usize].load(Ordering::Relaxed)
    }

    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "# HELP iot_deliveries_total Deliveries settled, by outcome.\n# TYPE iot_deliveries_total counter\n",
        );
        let line = |out: &mut String, labels: &str, value: u64| {
            out.push_str(&format!("iot_deliveries_total{{{labels}}} {value}\n"));
        };
        line(&mut out, "outcome=\"processed\"", self.processed());
        line(&mut out, "outcome=\"duplicate\"", self.duplicates());
        line(&mut out, "outcome=\"omitted\"", self.omitted.load(Ordering::Relaxed));
        line(&mut out, "outcome=\"retried\"", self.retried());
        for kind in ErrorKind::ALL {
            line(
                &mut out,
                &format!("outcome=\"parked\",kind=\"{kind}\""),
                self.parked(kind),
            );
        }
        out.push_str(&format!(
            "# HELP iot_broker_connections_total Broker connections opened.\n# TYPE iot_broker_connections_total counter\n\
             iot_broker_connections_total {}\n\
             # HELP iot_broker_node_info The broker (host:port) of the current session.\n# TYPE iot_broker_node_info gauge\n\
             iot_broker_node_info{{node=\"{}\"}} 1\n\
             # HELP iot_unsettled_total Deliveries left unacked for redelivery.\n# TYPE iot_unsettled_total counter\n\
             iot_unsettled_total {}\n\
             # HELP iot_ready 1 when connected and consuming.\n# TYPE iot_ready gauge\niot_ready {}\n",
            self.connections(),
            self.node(),
            self.unsettled.load(Ordering::Relaxed),
            u8::from(self.is_ready()),
        ));
        out.push_str(&format!(
            "# HELP iot_outbox_published_total Device messages the outbox relay published (confirmed).\n\
             # TYPE iot_outbox_published_total counter\niot_outbox_published_total {}\n\
             # HELP iot_outbox_unroutable_total Device messages the broker returned as unroutable.\n\
             # TYPE iot_outbox_unroutable_total counter\niot_outbox_unroutable_total {}\n\
             # HELP iot_outbox_relay_errors_total Database or broker errors of the outbox relay (it backs off).\n\
             # TYPE iot_outbox_relay_errors_total counter\niot_outbox_relay_errors_total {}\n\
             # HELP iot_outbox_pending_rows Outbox rows waiting to be published.\n\
             # TYPE iot_outbox_pending_rows gauge\niot_outbox_pending_rows {}\n\
             # HELP iot_outbox_failed_rows Outbox rows given up on (returned unroutable too often).\n\
             # TYPE iot_outbox_failed_rows gauge\niot_outbox_failed_rows {}\n\
             # HELP iot_outbox_oldest_pending_seconds Age of the oldest pending outbox row.\n\
             # TYPE iot_outbox_oldest_pending_seconds gauge\niot_outbox_oldest_pending_seconds {:.3}\n",
            self.outbox_published(),
            self.outbox_unroutable(),
            self.outbox_errors(),
            self.outbox_pending.load(Ordering::Relaxed),
            self.outbox_failed.load(Ordering::Relaxed),
            self.outbox_oldest_pending_ms.load(Ordering::Relaxed) as f64 / 1000.0,
        ));
        out
    }
}

/// Asks `/readyz` on `addr` (an unspecified address means this host), for
/// `worker-iot-core --healthcheck`. `Ok(true)` for a 200 answer.
///
/// # Errors
/// The connection error, or a timeout after 3 s.
pub async fn probe_ready(addr: SocketAddr) -> std::io::Result<bool> {
    let mut target = addr;
    if target.ip().is_unspecified() {
        target.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let ask = async {
        let mut stream = tokio::net::TcpStream::connect(target).await?;
        stream
            .write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response.starts_with(b"HTTP/1.1 200") || response.starts_with(b"HTTP/1.0 200"))
    };
    tokio::time::timeout(std::time::Duration::from_secs(3), ask)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 3 s"))?
}

/// Binds `addr` and serves `/metrics`, `/healthz` and `/readyz` until
/// `shutdown`. Returns the bound address (useful with port 0).
///
/// # Errors
/// The bind error.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let Ok((mut stream, _)) = accepted else { continue };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let n = stream.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]);
                let path = request.split_whitespace().nth(1).unwrap_or("/");
                let (status, body) = match path {
                    "/metrics" => ("200 OK", metrics.render()),
                    "/healthz" => ("200 OK", "ok\n".to_owned()),
                    "/readyz" if metrics.is_ready() => ("200 OK", "ready\n".to_owned()),
                    "/readyz" => ("503 Service Unavailable", "not ready: not consuming\n".to_owned()),
                    _ => ("404 Not Found", "try /metrics, /healthz or /readyz\n".to_owned()),
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                stream.write_all(response.as_bytes()).await.ok();
            });
        }
    });
    Ok(local)
}
