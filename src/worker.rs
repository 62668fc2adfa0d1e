//! The worker: start-up (migrations, topology, the pipeline), the
//! supervisor that opens broker sessions with backoff, and the graceful
//! shutdown (docs/operations.md, "Shutdown").

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::crash_guard::CrashGuard;
use crate::http;
use crate::inbox::Inbox;
use crate::metrics::Metrics;
use crate::outcome::{Event, EventHook};
use crate::parking::Keeper;
use crate::pipeline::{Pipeline, PipelineConfig};
use crate::readiness::{DatabaseDown, Readiness};
use crate::relay::Relay;
use crate::retry::{RECONNECT_MAX_DELAY, reconnect_backoff};
use crate::session::{Batching, Endpoint, Session, SessionError};
use crate::store::{self, StoreError};
use crate::topology::{Topology, TopologyError};
use crate::transaction;
use crate::{growth, health};

/// How long closing the database pool may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the outbox relay may take to finish its batch at shutdown.
const RELAY_STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the worker stopped other than by a shutdown request.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot serve metrics on METRICS_ADDR={addr}: {source}{}", metrics_hint(source, *addr))]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What to do when `METRICS_ADDR` is taken: most often by a second worker
/// on the same machine (docs/configuration.md, "Settings").
fn metrics_hint(error: &std::io::Error, addr: std::net::SocketAddr) -> String {
    if error.kind() != std::io::ErrorKind::AddrInUse {
        return String::new();
    }
    let mut other = addr;
    other.set_port(addr.port().wrapping_add(1).max(1));
    format!(
        " (another process listens there; to run two workers on one machine, \
         give each its own METRICS_ADDR, e.g. METRICS_ADDR={other})"
    )
}

/// Extra wiring, for tests and embedding.
#[derive(Clone)]
pub struct Options {
    /// Shared counters; served on `METRICS_ADDR`.
    pub metrics: Arc<Metrics>,
    /// Whether the worker is ready, and why not (`/readyz`); its gauges
    /// are in `metrics`.
    pub readiness: Arc<Readiness>,
    /// Called with every pipeline event, after the metrics.
    pub events: Option<EventHook>,
    /// Serve `/metrics`, `/healthz` and `/readyz` on `METRICS_ADDR`.
    pub serve_metrics: bool,
}

impl Default for Options {
    fn default() -> Options {
        let metrics = Arc::new(Metrics::new());
        Options {
            readiness: Arc::new(Readiness::new(&metrics)),
            metrics,
            events: None,
            serve_metrics: false,
        }
    }
}

/// `host/version`, written as `iot-failed-by`.
pub fn failed_by() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into());
    format!("{host}/{}", env!("CARGO_PKG_VERSION"))
}

/// Runs the worker until `shutdown` is cancelled, serving metrics.
///
/// # Errors
/// See [`run_with`].
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), WorkerError> {
    let options = Options {
        serve_metrics: true,
        ..Options::default()
    };
    run_with(settings, shutdown, options).await
}

/// Runs the worker until `shutdown` is cancelled (then returns `Ok` after
/// the graceful drain) or a fatal error occurs.
///
/// Start-up order: topology file, database and migrations, then broker
/// sessions (connection, topology, consumer with `basic_qos(prefetch)`),
/// rebuilt with backoff whenever one fails.
///
/// # Errors
/// A [`WorkerError`] for bad settings, an unusable topology or database.
pub async fn run_with(settings: Settings, shutdown: CancellationToken, options: Options) -> Result<(), WorkerError> {
    let topology = Arc::new(Topology::load(&settings.topology_file, &settings.queue)?);
    // The HTTP server and the database check stop with the worker, and
    // also when the supervisor fails. The server answers from the start:
    // `/readyz` says why the worker is not ready while it waits for its
    // database.
    let background = shutdown.child_token();
    let server = if options.serve_metrics {
        Some(serve_http(&settings, &options, &background).await?)
    } else {
        None
    };
    let result = match wait_for_database(&settings, &options.readiness, &shutdown).await {
        Ok(Some(pool)) => run_on(pool, settings, topology, options, &shutdown, &background).await,
        Ok(None) => {
            tracing::info!("stopped before the database could be reached");
            Ok(())
        }
        Err(e) => Err(e),
    };
    background.cancel();
    stop_server(server).await;
    tracing::info!("stopped");
    result
}

/// The worker on its database: the pipeline, the database check (until
/// `background` is cancelled), the relay, the keeper and the supervisor of
/// broker sessions, until `shutdown` or the supervisor's failure.
async fn run_on(
    pool: PgPool,
    settings: Settings,
    topology: Arc<Topology>,
    options: Options,
    shutdown: &CancellationToken,
    background: &CancellationToken,
) -> Result<(), WorkerError> {
    options.readiness.set_database(Ok(()));
    let inbox = start_growth(&settings, &pool, &options, background).await;
    let pipeline = Arc::new(build_pipeline(&settings, &topology, &pool, inbox, &options, shutdown).await);
    tokio::spawn(health::watch(
        pool.clone(),
        options.readiness.clone(),
        options.metrics.clone(),
        background.clone(),
    ));
    // The relay stops with the worker, and also when the supervisor fails.
    let relay_stop = shutdown.child_token();
    let relay = settings
        .outbox_relay
        .then(|| spawn_relay(&settings, &pool, &options, relay_stop.clone()));
    // The parking keeper too (docs/reliability.md, "The parking lot"),
    // once the first session declared `Q.dlq`.
    let declared = CancellationToken::new();
    let keeper = settings
        .parking_keeper
        .then(|| spawn_keeper(&settings, &pool, &options, &declared, relay_stop.clone()));
    let supervisor = Supervisor {
        next_broker: AtomicUsize::new(0),
        declared,
        settings,
        topology,
        pipeline,
        metrics: options.metrics,
        readiness: options.readiness,
        shutdown: shutdown.clone(),
    };
    let result = supervisor.run().await;
    relay_stop.cancel();
    background.cancel();
    for task in [relay, keeper].into_iter().flatten() {
        stop_relay(task).await;
    }
    // A connection dropped mid-statement (work cut off after the grace
    // period) is only released when the statement ends: do not wait for it.
    // The server rolls its transaction back when the process goes.
    tokio::time::timeout(CLOSE_TIMEOUT, pool.close()).await.ok();
    result
}

/// [`open_database`] until it succeeds: a worker started before its
/// database (a pod before the database's) waits, with the reconnect backoff
/// and one warning per attempt naming the database and the cause, instead
/// of exiting. `None` when `shutdown` came first. A bad URL or a failed
/// migration still stops it at once (docs/operations.md, "The database at
/// start").
async fn wait_for_database(
    settings: &Settings,
    readiness: &Readiness,
    shutdown: &CancellationToken,
) -> Result<Option<PgPool>, WorkerError> {
    let mut delays = reconnect_backoff();
    let mut attempt = 0u64;
    loop {
        attempt += 1;
        let wait = tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            opened = open_database(settings) => match opened {
                Ok(pool) => return Ok(Some(pool)),
                Err(WorkerError::Store(StoreError::Unreachable(wait))) => wait,
                Err(e) => return Err(e),
            },
        };
        readiness.set_database(Err(DatabaseDown::Starting(wait.clone())));
        let delay = delays.next().unwrap_or(RECONNECT_MAX_DELAY);
        tracing::warn!(database = %wait.target, cause = %wait.cause, attempt, retry_in = ?delay,
                       "waiting for the database: {}; trying again", wait.cause);
        tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Lets the HTTP server finish its requests (stopped by its token).
async fn stop_server(server: Option<http::Server>) {
    if let Some(server) = server {
        tokio::time::timeout(http::SHUTDOWN_GRACE, server.task).await.ok();
    }
}

/// The worker's database, created if missing and migrated. A fresh machine
/// with local services has no database yet; creating it needs rights the
/// worker may lack in production, and connecting then says what is wrong.
async fn open_database(settings: &Settings) -> Result<PgPool, WorkerError> {
    match store::create_database(settings.database_url.expose()).await {
        Ok(true) => tracing::info!("database created"),
        Ok(false) => {}
        Err(e) => tracing::debug!(error.message = %e, "could not make sure the database exists"),
    }
    let pool = store::connect(settings.database_url.expose(), settings.pool_size()).await?;
    store::migrate(&pool).await?;
    tracing::info!("database migrated");
    Ok(pool)
}

/// `/metrics`, `/healthz` and `/readyz` on `METRICS_ADDR`, until `stop`.
async fn serve_http(
    settings: &Settings,
    options: &Options,
    stop: &CancellationToken,
) -> Result<http::Server, WorkerError> {
    let server = http::serve(
        settings.metrics_addr,
        options.metrics.clone(),
        options.readiness.clone(),
        stop.clone(),
    )
    .await
    .map_err(|source| WorkerError::Metrics {
        addr: settings.metrics_addr,
        source,
    })?;
    options.metrics.set_http_addr(server.addr);
    tracing::info!(addr = %server.addr, "serving /metrics, /healthz and /readyz");
    Ok(server)
}

/// The pipeline, built once: every broker session shares it. The metrics
/// follow its events first, then the caller's hook.
/// Today's partitions and inbox generation before the first message (a
/// failure here is mended by the first batch that needs them), then the
/// growth keeper in the background. Returns the inbox the transactions
/// record ids in.
async fn start_growth(
    settings: &Settings,
    pool: &PgPool,
    options: &Options,
    background: &CancellationToken,
) -> Arc<Inbox> {
    let inbox = Arc::new(Inbox::new(settings.inbox_window_days));
    let growth = growth::Keeper {
        pool: pool.clone(),
        inbox: inbox.clone(),
        retention_days: settings.telemetry_retention_days,
        metrics: options.metrics.clone(),
    };
    let upkept = growth.upkeep().await;
    if let Err(e) = &upkept {
        tracing::warn!(error.message = %e, "partition upkeep at start failed");
    } else if let Err(e) = growth::warm(pool, settings.pool_size(), chrono::Utc::now().date_naive()).await {
        tracing::warn!(error.message = %e, "opening the database connections at start failed");
    }
    tokio::spawn(growth.run(upkept.is_ok(), background.clone()));
    inbox
}

async fn build_pipeline(
    settings: &Settings,
    topology: &Arc<Topology>,
    pool: &PgPool,
    inbox: Arc<Inbox>,
    options: &Options,
    shutdown: &CancellationToken,
) -> Pipeline {
    let (metrics, retry_topology) = (options.metrics.clone(), topology.clone());
    let mut hooks: Vec<EventHook> = vec![Arc::new(move |event: &Event<'_>| {
        metrics.observe(event, &retry_topology.retry);
    })];
    hooks.extend(options.events.clone());
    let crash_guard = CrashGuard::new(pool.clone(), topology.crash_loop_limit());
    crash_guard.prune().await;
    Pipeline::new(PipelineConfig {
        topology: topology.clone(),
        events_to_omit: settings.events_to_omit.clone(),
        max_message_bytes: settings.max_message_bytes,
        failed_by: failed_by(),
        shutdown: shutdown.clone(),
        hooks,
        admission: Arc::new(crash_guard),
        apply: Arc::new(transaction::layered(pool.clone(), inbox)),
    })
}

fn spawn_relay(settings: &Settings, pool: &PgPool, options: &Options, stop: CancellationToken) -> JoinHandle<()> {
    let relay = Relay {
        pool: pool.clone(),
        amqp_url: settings.amqp_url.expose().to_owned(),
        database_url: settings.database_url.expose().to_owned(),
        retention: settings.outbox_retention,
        metrics: options.metrics.clone(),
        readiness: options.readiness.clone(),
    };
    tokio::spawn(relay.run(stop))
}

fn spawn_keeper(
    settings: &Settings,
    pool: &PgPool,
    options: &Options,
    declared: &CancellationToken,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let keeper = Keeper {
        pool: pool.clone(),
        amqp_url: settings.amqp_url.expose().to_owned(),
        queue: settings.queue.clone(),
        retention: settings.parked_retention,
        metrics: options.metrics.clone(),
    };
    let declared = declared.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = stop.cancelled() => {}
            () = declared.cancelled() => keeper.run(stop).await,
        }
    })
}

/// Waits a little for the relay (or the parking keeper) to finish its
/// batch. A relay batch still waiting for confirms is then dropped: its
/// transaction rolls back and its rows are published again later; a
/// keeper batch not stored yet goes back to `Q.dlq` with its channel.
async fn stop_relay(relay: JoinHandle<()>) {
    let abort = relay.abort_handle();
    if tokio::time::timeout(RELAY_STOP_TIMEOUT, relay).await.is_err() {
        abort.abort();
    }
}

struct Supervisor {
    /// The broker of `AMQP_URL`'s list to try first at the next connect.
    next_broker: AtomicUsize,
    /// Cancelled once a session declared the topology: the parking keeper
    /// waits for it, so it never looks for a `Q.dlq` not declared yet.
    declared: CancellationToken,
    settings: Settings,
    topology: Arc<Topology>,
    pipeline: Arc<Pipeline>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
}

impl Supervisor {
    async fn run(&self) -> Result<(), WorkerError> {
        let mut delays = reconnect_backoff();
        loop {
            let healthy_before = self.metrics.processed();
            let result = self.session().await;
            self.readiness.set_consuming(false);
            match result {
                Ok(()) => return Ok(()),
                Err(SessionError::Fatal(e)) => return Err(e.into()),
                Err(e) => {
                    if self.metrics.processed() > healthy_before {
                        // The session worked for a while: start the backoff over.
                        delays = reconnect_backoff();
                    }
                    let delay = delays.next().unwrap_or(Duration::from_secs(10));
                    tracing::warn!(error.message = %e, ?delay, "broker session ended; reconnecting");
                    tokio::select! {
                        () = self.shutdown.cancelled() => return Ok(()),
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// One broker session: open, consume until shutdown or a failure, then
    /// drain in-flight work within the grace period.
    async fn session(&self) -> Result<(), SessionError> {
        let endpoint = Endpoint {
            amqp_url: self.settings.amqp_url.expose(),
            next_broker: &self.next_broker,
            topology: &self.topology,
            prefetch: self.settings.prefetch_count,
            metrics: &self.metrics,
            readiness: &self.readiness,
        };
        let mut session = tokio::select! {
            () = self.shutdown.cancelled() => return Ok(()),
            opened = Session::open(&endpoint) => opened?,
        };
        self.metrics.record_connection(&session.node);
        self.readiness.set_consuming(true);
        self.declared.cancel();
        tracing::info!(node = %session.node, queue = %self.topology.queue(), queue_type = ?self.topology.queue_type,
                       prefetch = self.settings.prefetch_count, "topology declared; consuming");
        let batching = Batching {
            max_size: self.settings.batch_max_size,
            max_wait: self.settings.batch_max_wait,
        };
        let result = session.consume(&self.pipeline, &self.shutdown, batching).await;
        self.readiness.set_consuming(false);
        session.finish(result.is_ok(), self.settings.shutdown_grace).await;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_metrics_addr_names_the_address_and_what_to_do() {
        let addr: std::net::SocketAddr = "0.0.0.0:9464".parse().unwrap();
        let taken = std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let said = WorkerError::Metrics { addr, source: taken }.to_string();
        assert!(said.contains("METRICS_ADDR=0.0.0.0:9464"), "{said}");
        assert!(said.contains("METRICS_ADDR=0.0.0.0:9465"), "{said}");
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let said = WorkerError::Metrics { addr, source: denied }.to_string();
        assert!(
            said.contains("METRICS_ADDR=0.0.0.0:9464") && !said.contains("two workers"),
            "{said}"
        );
    }
}
