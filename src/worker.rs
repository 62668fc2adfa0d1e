//! The worker: start-up (migrations, topology), the supervised consume
//! loop, and the graceful shutdown of SPEC §8.
//!
//! Connection supervision does not rely on lapin's automatic recovery
//! (SPEC §10): any connection or channel error, or a delivery that cannot
//! be settled, ends the session; the supervisor then builds connection,
//! channels, topology and consumer again from scratch, with backoff.
//! Unacked deliveries of the lost session are redelivered by the broker and
//! absorbed by the inbox.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use sqlx::PgPool;
use tokio::sync::RwLock;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{self, Publisher};
use crate::config::Settings;
use crate::metrics::{self, Metrics};
use crate::pipeline::{DeliveryObserver, Pipeline};
use crate::relay::Relay;
use crate::store::{self, StoreError};
use crate::topology::{Topology, TopologyError};

/// How long closing a channel or connection may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the outbox relay may take to finish its batch at shutdown.
const RELAY_STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long opening a broker connection may take before it is retried
/// (each broker of the list has `broker::CONNECT_TIMEOUT_PER_BROKER`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the worker stopped other than by a shutdown request.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot serve metrics on METRICS_ADDR: {0}")]
    Metrics(#[source] std::io::Error),
}

/// What ended one broker session.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("RabbitMQ: {0}")]
    Broker(#[from] lapin::Error),
    #[error("RabbitMQ: the consumer was cancelled or its channel closed")]
    ConsumerEnded,
    #[error("RabbitMQ: no connection within {CONNECT_TIMEOUT:?}")]
    ConnectTimeout,
    #[error("a delivery could not be settled; reconnecting so the broker redelivers it")]
    SettleFailed,
    /// Not worth retrying: the topology conflicts with the broker's.
    #[error(transparent)]
    Fatal(TopologyError),
}

/// Extra wiring, for tests and embedding.
#[derive(Default, Clone)]
pub struct Options {
    /// Shared counters and readiness; served on `METRICS_ADDR`.
    pub metrics: Arc<Metrics>,
    /// Called with every delivery before processing.
    pub observer: Option<DeliveryObserver>,
    /// Serve `/metrics`, `/healthz` and `/readyz` on `METRICS_ADDR`.
    pub serve_metrics: bool,
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
    let topology = Arc::new(Topology::load(&settings.topology_file)?);
    // A fresh machine with local services has no database yet. Creating it
    // needs rights the worker may lack in production; connecting then
    // says what is wrong.
    match store::create_database(&settings.database_url).await {
        Ok(true) => tracing::info!("database created"),
        Ok(false) => {}
        Err(e) => tracing::debug!(error.message = %e, "could not make sure the database exists"),
    }
    let pool = store::connect(&settings.database_url, settings.pool_size()).await?;
    store::migrate(&pool).await?;
    tracing::info!("database migrated");
    match store::prune_redelivery_counts(&pool).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(rows = n, "pruned stale redelivery counts"),
        Err(e) => tracing::warn!(error.message = %e, "could not prune stale redelivery counts"),
    }
    if options.serve_metrics {
        let addr = metrics::serve(settings.metrics_addr, options.metrics.clone(), shutdown.clone())
            .await
            .map_err(WorkerError::Metrics)?;
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    }

    // The relay stops with the worker, and also when the supervisor fails.
    let relay_stop = shutdown.child_token();
    let relay = settings
        .outbox_relay
        .then(|| spawn_relay(&settings, &pool, &options, relay_stop.clone()));

    let supervisor = Supervisor {
        boot_id: format!("{}-{}", std::process::id(), chrono::Utc::now().timestamp_micros()),
        next_broker: AtomicUsize::new(0),
        settings,
        topology,
        pool: pool.clone(),
        options,
        shutdown: shutdown.clone(),
    };
    let result = supervisor.run().await;
    relay_stop.cancel();
    if let Some(relay) = relay {
        stop_relay(relay).await;
    }
    // A connection dropped mid-statement (work cut off after the grace
    // period) is only released when the statement ends: do not wait for it.
    // The server rolls its transaction back when the process goes.
    tokio::time::timeout(CLOSE_TIMEOUT, pool.close()).await.ok();
    tracing::info!("stopped");
    result
}

fn spawn_relay(settings: &Settings, pool: &PgPool, options: &Options, stop: CancellationToken) -> JoinHandle<()> {
    let relay = Relay {
        pool: pool.clone(),
        amqp_url: settings.amqp_url.clone(),
        database_url: settings.database_url.clone(),
        retention: settings.outbox_retention,
        metrics: options.metrics.clone(),
    };
    tokio::spawn(relay.run(stop))
}

/// Waits a little for the relay to finish its batch. A batch still waiting
/// for confirms is then dropped: its transaction rolls back and its rows
/// are published again later.
async fn stop_relay(relay: JoinHandle<()>) {
    let abort = relay.abort_handle();
    if tokio::time::timeout(RELAY_STOP_TIMEOUT, relay).await.is_err() {
        abort.abort();
    }
}

struct Supervisor {
    /// Unique to this run of the worker (see `store::count_redelivery`).
    boot_id: String,
    /// The broker of `AMQP_URL`'s list to try first at the next connect.
    next_broker: AtomicUsize,
    settings: Settings,
    topology: Arc<Topology>,
    pool: PgPool,
    options: Options,
    shutdown: CancellationToken,
}

impl Supervisor {
    async fn run(&self) -> Result<(), WorkerError> {
        let backoff = broker::reconnect_backoff;
        let mut delays = backoff();
        loop {
            let healthy_before = self.options.metrics.processed();
            let result = self.session().await;
            self.options.metrics.set_ready(false);
            match result {
                Ok(()) => return Ok(()),
                Err(SessionError::Fatal(e)) => return Err(e.into()),
                Err(e) => {
                    if self.options.metrics.processed() > healthy_before {
                        // The session worked for a while: start the backoff over.
                        delays = backoff();
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

    /// One broker session: connect, declare, consume until shutdown or a
    /// failure, then drain in-flight work within the grace period.
    async fn session(&self) -> Result<(), SessionError> {
        let settings = &self.settings;
        let connect = tokio::time::timeout(
            CONNECT_TIMEOUT,
            broker::connect_to_any(&settings.amqp_url, "worker-iot-core", &self.next_broker),
        );
        let (connection, node) = tokio::select! {
            () = self.shutdown.cancelled() => return Ok(()),
            connected = connect => connected.map_err(|_| SessionError::ConnectTimeout)??,
        };
        let setup = connection.create_channel().await?;
        self.topology
            .declare(&setup, &settings.queue)
            .await
            .map_err(|e| match e {
                TopologyError::Broker { source, .. } => SessionError::Broker(source),
                other => SessionError::Fatal(other),
            })?;
        setup.close(200, "topology declared".into()).await.ok();

        let channel = connection.create_channel().await?;
        channel
            .basic_qos(settings.prefetch_count, BasicQosOptions::default())
            .await?;
        let publisher = Publisher::open(&connection).await?;
        let mut consumer = channel
            .basic_consume(
                settings.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.options.metrics.record_connection(&node);
        self.options.metrics.set_ready(true);
        tracing::info!(%node, queue = %settings.queue, queue_type = ?self.topology.queue_type,
                       prefetch = settings.prefetch_count, "topology declared; consuming");

        let pipeline = Arc::new(Pipeline {
            pool: self.pool.clone(),
            publisher,
            topology: self.topology.clone(),
            queue: settings.queue.clone(),
            events_to_omit: settings.events_to_omit.clone(),
            max_message_bytes: settings.max_message_bytes,
            failed_by: failed_by(),
            shutdown: self.shutdown.clone(),
            isolation: RwLock::new(()),
            observer: self.options.observer.clone(),
            boot_id: self.boot_id.clone(),
            frame_max: usize::try_from(connection.configuration().frame_max()).unwrap_or(usize::MAX),
            redelivered_in_flight: std::sync::Mutex::default(),
        });
        let tracker = TaskTracker::new();
        // Cancelled by a task whose delivery could not be settled.
        let fault = CancellationToken::new();
        // Cancelled when the grace period is over: in-flight work is
        // dropped, its transaction rolled back, its delivery left unacked.
        let hard_stop = CancellationToken::new();

        let result = loop {
            tokio::select! {
                () = self.shutdown.cancelled() => break Ok(()),
                () = fault.cancelled() => break Err(SessionError::SettleFailed),
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        let (pipeline, fault, hard_stop) = (pipeline.clone(), fault.clone(), hard_stop.clone());
                        let metrics = self.options.metrics.clone();
                        tracker.spawn(async move {
                            tokio::select! {
                                () = hard_stop.cancelled() => pipeline.cut_off(&delivery).await,
                                result = pipeline.handle(&delivery) => match result {
                                    Ok(outcome) => metrics.record(outcome),
                                    Err(e) => {
                                        tracing::error!(error.message = %e, "delivery left unacked");
                                        metrics.record_unsettled();
                                        fault.cancel();
                                    }
                                },
                            }
                        });
                    }
                    Some(Err(e)) => break Err(e.into()),
                    None => break Err(SessionError::ConsumerEnded),
                },
            }
        };

        self.options.metrics.set_ready(false);
        // Stop consuming; deliveries the broker sent that nobody took yet
        // stay unacked and are redelivered when the channel closes.
        let cancel = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default());
        tokio::time::timeout(CLOSE_TIMEOUT, cancel).await.ok();
        tracker.close();
        let grace = if result.is_ok() {
            settings.shutdown_grace
        } else {
            Duration::from_secs(1)
        };
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(
                in_flight = tracker.len(),
                "unfinished deliveries are left unacked for redelivery"
            );
            hard_stop.cancel();
            tracker.wait().await;
        }
        // A dead connection must not hold the shutdown up.
        tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, "shutting down".into()))
            .await
            .ok();
        tokio::time::timeout(CLOSE_TIMEOUT, connection.close(200, "shutting down".into()))
            .await
            .ok();
        result
    }
}
