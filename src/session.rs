//! One broker session: open (connect, declare, consume), the consume loop,
//! the drain of in-flight work, and close.
//!
//! Connection supervision does not rely on lapin's automatic recovery
//! (docs/reliability.md, "Broker connection"): any connection or channel
//! error, or a delivery that cannot be settled, ends the session, and the
//! worker opens a new one. Unacked deliveries of the lost session are
//! redelivered by the broker and absorbed by the inbox.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::acks::Acks;
use crate::broker::{self, BlockedHook, Outgoing, PublishError, Publisher};
use crate::failure::panic_text;
use crate::metrics::Metrics;
use crate::outcome::{Outlet, SettleError};
use crate::pipeline::Pipeline;
use crate::readiness::Readiness;
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
    /// Keeps the in-flight and blocked gauges.
    pub metrics: &'a Arc<Metrics>,
    pub readiness: &'a Arc<Readiness>,
}

/// An open session, consuming.
pub struct Session {
    connection: Connection,
    /// Where copies are published: a connection of its own, so that a
    /// broker that blocks publishers never holds the consumer's acks up.
    copies: Connection,
    channel: Channel,
    consumer: Consumer,
    outlet: Arc<Copies>,
    in_flight: InFlight,
    /// `host:port` of the broker.
    pub node: String,
}

/// A session's [`Outlet`]: its confirmed publisher for copies, the copies
/// connection's negotiated frame size, and the consumer channel's acks.
struct Copies {
    publisher: Publisher,
    frame_max: usize,
    acks: Acks,
}

impl Outlet for Copies {
    fn frame_max(&self) -> usize {
        self.frame_max
    }

    fn ack<'a>(&'a self, tags: &'a [u64]) -> BoxFuture<'a, Result<(), lapin::Error>> {
        Box::pin(self.acks.ack(tags))
    }

    fn publish_all<'a>(&'a self, copies: &'a [Outgoing<'a>]) -> BoxFuture<'a, Vec<Result<(), PublishError>>> {
        Box::pin(self.publisher.publish_all(copies))
    }
}

/// How first deliveries are grouped into one transaction.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// `BATCH_MAX_SIZE`: 1 runs every delivery on its own.
    pub max_size: usize,
    /// `BATCH_MAX_WAIT_MS`: how long a batch may wait for more deliveries
    /// while another batch is being applied.
    pub max_wait: Duration,
}

/// First deliveries waiting to be handed over as a batch.
#[derive(Default)]
struct Pending {
    deliveries: Vec<Delivery>,
    /// When the first of them arrived.
    since: Option<Instant>,
}

impl Pending {
    fn push(&mut self, delivery: Delivery) {
        self.since.get_or_insert_with(Instant::now);
        self.deliveries.push(delivery);
    }

    /// A batch goes when it is full, when nothing else is being applied
    /// (so a lone message never waits: low load keeps low latency), or
    /// when it has waited `max_wait` for the batch in flight.
    fn is_due(&self, batching: &Batching, batches_in_flight: usize) -> bool {
        let Some(since) = self.since else { return false };
        self.deliveries.len() >= batching.max_size || batches_in_flight == 0 || since.elapsed() >= batching.max_wait
    }
}

/// Ends the session when a delivery task could not settle what it was
/// given: its error, or a panic outside the stages that catch their own
/// (decode, checks, handlers). Closing the channel hands every unacked
/// delivery back to the broker, which redelivers it, and the crash guard
/// parks one that keeps failing that way: none stays unacked on a live
/// channel.
fn unsettled(result: std::thread::Result<Result<(), SettleError>>, fault: &CancellationToken) {
    match result {
        Ok(Ok(())) => return,
        Ok(Err(e)) => tracing::error!(error.message = %e, "delivery left unacked"),
        Err(panic) => tracing::error!(
            error.message = %panic_text(&*panic),
            "panic while settling deliveries; reconnecting so the broker redelivers them"
        ),
    }
    fault.cancel();
}

/// Sleeps until `at`; forever without one (the select's guard skips it).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The deliveries a session is working on.
struct InFlight {
    tracker: TaskTracker,
    /// Cancelled by a task whose delivery could not be settled.
    fault: CancellationToken,
    /// Cancelled when the grace period is over: in-flight work is dropped,
    /// its transaction rolled back, its delivery left unacked.
    hard_stop: CancellationToken,
    /// Batches being applied, and a signal when one is done.
    batches: Arc<AtomicUsize>,
    batch_done: Arc<Notify>,
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
        let copies = connect_copies(endpoint).await?;
        let readiness = endpoint.readiness.clone();
        let on_blocked: BlockedHook = Arc::new(move |reason| readiness.set_broker_blocked("copies", reason));
        let outlet = Arc::new(Copies {
            publisher: Publisher::open_watched(&copies, Some(on_blocked)).await?,
            frame_max: usize::try_from(copies.configuration().frame_max()).unwrap_or(usize::MAX),
            acks: Acks::new(channel.clone(), endpoint.metrics.in_flight(), endpoint.prefetch),
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
            copies,
            channel,
            consumer,
            outlet,
            in_flight: InFlight {
                tracker: TaskTracker::new(),
                fault: CancellationToken::new(),
                hard_stop: CancellationToken::new(),
                batches: Arc::default(),
                batch_done: Arc::default(),
            },
            node,
        })
    }

    /// Hands every delivery to `pipeline` until `shutdown`, a broker fault
    /// or a delivery that could not be settled. First deliveries go in
    /// batches (see [`Batching`]); redelivered ones run alone.
    ///
    /// # Errors
    /// What ended the session, other than `shutdown`.
    pub async fn consume(
        &mut self,
        pipeline: &Arc<Pipeline>,
        shutdown: &CancellationToken,
        batching: Batching,
    ) -> Result<(), SessionError> {
        let mut pending = Pending::default();
        loop {
            let flush_at = pending.since.map(|since| since + batching.max_wait);
            let acks = &self.outlet.acks;
            let release_at = acks.release_at();
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = self.in_flight.fault.cancelled() => return Err(SessionError::SettleFailed),
                () = sleep_until(flush_at), if flush_at.is_some() => {}
                () = self.in_flight.batch_done.notified() => {}
                () = acks.holding() => {}
                // Held acks past their time, with no other ack to take them.
                () = sleep_until(release_at), if release_at.is_some() => acks.ack(&[]).await?,
                next = self.consumer.next() => {
                    self.take(next, pipeline, &mut pending)?;
                    // What the broker already sent joins the batch, without waiting.
                    while pending.deliveries.len() < batching.max_size {
                        match self.consumer.next().now_or_never() {
                            Some(next) => self.take(next, pipeline, &mut pending)?,
                            None => break,
                        }
                    }
                }
            }
            if pending.is_due(&batching, self.in_flight.batches()) {
                self.in_flight
                    .spawn_batch(pipeline.clone(), self.outlet.clone(), std::mem::take(&mut pending));
            }
        }
    }

    /// One item of the consumer stream: a redelivered delivery runs alone
    /// at once, a first one waits in `pending`.
    fn take(
        &self,
        next: Option<Result<Delivery, lapin::Error>>,
        pipeline: &Arc<Pipeline>,
        pending: &mut Pending,
    ) -> Result<(), SessionError> {
        if let Some(Ok(delivery)) = &next {
            self.outlet.acks.received(delivery.delivery_tag);
        }
        match next {
            Some(Ok(delivery)) if delivery.redelivered => {
                self.in_flight.spawn(pipeline.clone(), self.outlet.clone(), delivery);
            }
            Some(Ok(delivery)) => pending.push(delivery),
            Some(Err(e)) => return Err(e.into()),
            None => return Err(SessionError::ConsumerEnded),
        }
        Ok(())
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
        // Settled deliveries still held above one that never ran.
        tokio::time::timeout(CLOSE_TIMEOUT, self.outlet.acks.flush()).await.ok();
        self.close().await;
    }

    /// A dead connection must not hold the shutdown up.
    async fn close(self) {
        tokio::time::timeout(CLOSE_TIMEOUT, self.channel.close(200, "shutting down".into()))
            .await
            .ok();
        for connection in [&self.connection, &self.copies] {
            tokio::time::timeout(CLOSE_TIMEOUT, connection.close(200, "shutting down".into()))
                .await
                .ok();
        }
    }
}

/// The connection copies are published on, to the broker the session
/// consumes from (the one `next_broker` tried last), or the next that
/// answers.
async fn connect_copies(endpoint: &Endpoint<'_>) -> Result<Connection, SessionError> {
    let consuming_from = AtomicUsize::new(endpoint.next_broker.load(Ordering::Relaxed).wrapping_sub(1));
    let connect = broker::connect_to_any(endpoint.amqp_url, "worker-iot-core copies", &consuming_from);
    let (connection, _) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| SessionError::ConnectTimeout)??;
    Ok(connection)
}

impl InFlight {
    /// Runs a redelivered delivery alone, at once.
    fn spawn(&self, pipeline: Arc<Pipeline>, outlet: Arc<Copies>, delivery: Delivery) {
        self.tracker.spawn(self.run(pipeline, outlet, vec![delivery]));
    }

    fn batches(&self) -> usize {
        self.batches.load(Ordering::SeqCst)
    }

    /// Applies `pending` as one batch, counted among the batches in flight.
    fn spawn_batch(&self, pipeline: Arc<Pipeline>, outlet: Arc<Copies>, pending: Pending) {
        let run = self.run(pipeline, outlet, pending.deliveries);
        let (batches, done) = (self.batches.clone(), self.batch_done.clone());
        batches.fetch_add(1, Ordering::SeqCst);
        self.tracker.spawn(async move {
            run.await;
            batches.fetch_sub(1, Ordering::SeqCst);
            done.notify_one();
        });
    }

    /// One delivery task: the pipeline handles `deliveries` until the end
    /// of the grace period cuts it off.
    fn run(
        &self,
        pipeline: Arc<Pipeline>,
        outlet: Arc<Copies>,
        deliveries: Vec<Delivery>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let (fault, hard_stop) = (self.fault.clone(), self.hard_stop.clone());
        async move {
            let handle = AssertUnwindSafe(pipeline.handle(&deliveries, &*outlet)).catch_unwind();
            tokio::select! {
                () = hard_stop.cancelled() => pipeline.cut_off(&deliveries).await,
                result = handle => unsettled(result, &fault),
            }
        }
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
