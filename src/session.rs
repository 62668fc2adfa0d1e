//! One broker session: open (connect, declare, consume), the consume loop,
//! the drain of in-flight work, and close.
//!
//! Connection supervision does not rely on lapin's automatic recovery
//! (SPEC §10): any connection or channel error, or a delivery that cannot
//! be settled, ends the session, and the worker opens a new one. Unacked
//! deliveries of the lost session are redelivered by the broker and
//! absorbed by the inbox.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{self, Publisher};
use crate::pipeline::{Outlet, Pipeline};
use crate::topology::{Topology, TopologyError};

/// How long closing a channel or connection may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long opening a broker connection may take before it is retried
/// (each broker of the list has `broker::CONNECT_TIMEOUT_PER_BROKER`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long in-flight work may take to finish after a broker fault.
const FAULT_GRACE: Duration = Duration::from_secs(1);

/// What ended one broker session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
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

/// Where and how a session consumes.
pub struct Endpoint<'a> {
    /// `AMQP_URL`: one broker or a comma-separated list.
    pub amqp_url: &'a str,
    /// The broker of the list to try first.
    pub next_broker: &'a AtomicUsize,
    pub topology: &'a Topology,
    pub prefetch: u16,
}

/// An open session, consuming.
pub struct Session {
    connection: Connection,
    channel: Channel,
    consumer: Consumer,
    outlet: Arc<Outlet>,
    in_flight: InFlight,
    /// `host:port` of the broker.
    pub node: String,
}

/// The deliveries a session is working on.
struct InFlight {
    tracker: TaskTracker,
    /// Cancelled by a task whose delivery could not be settled.
    fault: CancellationToken,
    /// Cancelled when the grace period is over: in-flight work is dropped,
    /// its transaction rolled back, its delivery left unacked.
    hard_stop: CancellationToken,
}

impl Session {
    /// Connects to a broker of the list, declares the topology and starts
    /// consuming with `basic_qos(prefetch)`.
    ///
    /// # Errors
    /// [`SessionError::Fatal`] when the broker's queues conflict with the
    /// topology; any other error is worth a new try.
    pub async fn open(endpoint: &Endpoint<'_>) -> Result<Session, SessionError> {
        let connect = broker::connect_to_any(endpoint.amqp_url, "worker-iot-core", endpoint.next_broker);
        let (connection, node) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| SessionError::ConnectTimeout)??;
        let setup = connection.create_channel().await?;
        endpoint.topology.declare(&setup).await.map_err(|e| match e {
            TopologyError::Broker { source, .. } => SessionError::Broker(source),
            other => SessionError::Fatal(other),
        })?;
        setup.close(200, "topology declared".into()).await.ok();

        let channel = connection.create_channel().await?;
        channel.basic_qos(endpoint.prefetch, BasicQosOptions::default()).await?;
        let outlet = Arc::new(Outlet {
            publisher: Publisher::open(&connection).await?,
            frame_max: usize::try_from(connection.configuration().frame_max()).unwrap_or(usize::MAX),
        });
        let consumer = channel
            .basic_consume(
                endpoint.topology.queue().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Session {
            connection,
            channel,
            consumer,
            outlet,
            in_flight: InFlight {
                tracker: TaskTracker::new(),
                fault: CancellationToken::new(),
                hard_stop: CancellationToken::new(),
            },
            node,
        })
    }

    /// Hands every delivery to `pipeline` until `shutdown`, a broker fault
    /// or a delivery that could not be settled.
    ///
    /// # Errors
    /// What ended the session, other than `shutdown`.
    pub async fn consume(
        &mut self,
        pipeline: &Arc<Pipeline>,
        shutdown: &CancellationToken,
    ) -> Result<(), SessionError> {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = self.in_flight.fault.cancelled() => return Err(SessionError::SettleFailed),
                next = self.consumer.next() => match next {
                    Some(Ok(delivery)) => self.in_flight.spawn(pipeline.clone(), self.outlet.clone(), delivery),
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(SessionError::ConsumerEnded),
                },
            }
        }
    }

    /// Stops consuming, lets in-flight work finish within `grace` (after a
    /// clean stop; one second after a fault), then closes. Unfinished work
    /// is left unacked for redelivery.
    pub async fn finish(self, clean: bool, grace: Duration) {
        // Deliveries the broker sent that nobody took yet stay unacked and
        // are redelivered when the channel closes.
        let cancel = self
            .channel
            .basic_cancel(self.consumer.tag(), BasicCancelOptions::default());
        tokio::time::timeout(CLOSE_TIMEOUT, cancel).await.ok();
        self.in_flight.drain(if clean { grace } else { FAULT_GRACE }).await;
        self.close().await;
    }

    /// A dead connection must not hold the shutdown up.
    async fn close(self) {
        tokio::time::timeout(CLOSE_TIMEOUT, self.channel.close(200, "shutting down".into()))
            .await
            .ok();
        tokio::time::timeout(CLOSE_TIMEOUT, self.connection.close(200, "shutting down".into()))
            .await
            .ok();
    }
}

impl InFlight {
    fn spawn(&self, pipeline: Arc<Pipeline>, outlet: Arc<Outlet>, delivery: Delivery) {
        let (fault, hard_stop) = (self.fault.clone(), self.hard_stop.clone());
        self.tracker.spawn(async move {
            tokio::select! {
                () = hard_stop.cancelled() => pipeline.cut_off(&delivery).await,
                result = pipeline.handle(&delivery, &outlet) => if let Err(e) = result {
                    tracing::error!(error.message = %e, "delivery left unacked");
                    fault.cancel();
                },
            }
        });
    }

    async fn drain(&self, grace: Duration) {
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait()).await.is_err() {
            tracing::warn!(
                in_flight = self.tracker.len(),
                "unfinished deliveries are left unacked for redelivery"
            );
            self.hard_stop.cancel();
            self.tracker.wait().await;
        }
    }
}
