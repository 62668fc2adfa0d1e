//! The worker: start-up (migrations, topology), the consume loop, and the
//! graceful shutdown of SPEC §8.

use std::sync::Arc;

use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{self, Publisher};
use crate::config::{ConfigError, Settings};
use crate::pipeline::{Outcome, Pipeline};
use crate::store::{self, StoreError};
use crate::topology::{Topology, TopologyError};

/// Why the worker stopped other than by a shutdown request.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("RabbitMQ: {0}")]
    Broker(#[from] lapin::Error),
    #[error("RabbitMQ: the consumer was cancelled or its channel closed")]
    ConsumerEnded,
    #[error("RabbitMQ: a delivery could not be settled; disconnecting so the broker redelivers it")]
    SettleFailed,
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

/// Runs the worker until `shutdown` is cancelled (then returns `Ok` after
/// the graceful drain) or a fatal error occurs.
///
/// Start-up order: topology file, database and migrations, broker
/// connection and topology, then consuming with `basic_qos(prefetch)`.
///
/// # Errors
/// A [`WorkerError`] for bad settings, an unusable topology or database,
/// or a broker failure.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), WorkerError> {
    let topology = Arc::new(Topology::load(&settings.topology_file)?);
    let pool = store::connect(settings.database_url()?, settings.pool_size()).await?;
    store::migrate(&pool).await?;
    tracing::info!("database migrated");

    let connection = broker::connect(&settings.amqp_url, "worker-iot-core").await?;
    let setup = connection.create_channel().await?;
    topology.declare(&setup, &settings.queue).await?;
    setup.close(200, "topology declared".into()).await.ok();
    tracing::info!(queue = %settings.queue, queue_type = ?topology.queue_type, "topology declared");

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
    tracing::info!(queue = %settings.queue, prefetch = settings.prefetch_count, "consuming");

    let pipeline = Arc::new(Pipeline {
        pool: pool.clone(),
        publisher,
        topology,
        queue: settings.queue.clone(),
        events_to_omit: settings.events_to_omit.clone(),
        max_message_bytes: settings.max_message_bytes,
        failed_by: failed_by(),
        shutdown: shutdown.clone(),
    });
    let tracker = TaskTracker::new();
    // Cancelled by a task whose delivery could not be settled.
    let fault = CancellationToken::new();
    // Cancelled when the grace period is over: in-flight work is dropped,
    // its transaction rolled back and its delivery left unacked.
    let hard_stop = CancellationToken::new();

    let result = loop {
        tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            () = fault.cancelled() => break Err(WorkerError::SettleFailed),
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let (pipeline, fault, hard_stop) = (pipeline.clone(), fault.clone(), hard_stop.clone());
                    tracker.spawn(async move {
                        tokio::select! {
                            () = hard_stop.cancelled() => {}
                            result = pipeline.handle(&delivery) => match result {
                                Ok(outcome) => log_outcome(outcome),
                                Err(e) => {
                                    tracing::error!(error.message = %e, "delivery left unacked");
                                    fault.cancel();
                                }
                            },
                        }
                    });
                }
                Some(Err(e)) => break Err(e.into()),
                None => break Err(WorkerError::ConsumerEnded),
            },
        }
    };

    // Stop consuming; deliveries the broker already sent but nobody took
    // yet stay unacked and are redelivered when the channel closes.
    channel
        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await
        .ok();
    tracker.close();
    if tokio::time::timeout(settings.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            in_flight = tracker.len(),
            "grace period over: unfinished deliveries are left unacked for redelivery"
        );
        hard_stop.cancel();
        tracker.wait().await;
    }
    channel.close(200, "shutting down".into()).await.ok();
    connection.close(200, "shutting down".into()).await.ok();
    pool.close().await;
    tracing::info!("stopped");
    result
}

fn log_outcome(outcome: Outcome) {
    tracing::debug!(?outcome, "delivery settled");
}
