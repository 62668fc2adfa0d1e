//! The words of the delivery flow (docs/architecture.md): how a delivery
//! ended ([`Outcome`]), how it was handled ([`Handling`]), why it could not
//! be settled ([`SettleError`]), the [`Event`]s that metrics and tests
//! follow, and the broker side the flow settles through ([`Outlet`]). Every stage of the flow uses these; this module uses none of
//! the stages, so no import goes back up.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use lapin::message::Delivery;

use crate::broker::{Outgoing, PublishError};
use crate::envelope::MessageType;
use crate::retry::Disposition;

/// How a delivery ended. Every delivery ends in exactly one of these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Processed,
    Duplicate,
    Omitted,
    /// Copied to a retry queue or the DLQ, as the retry policy decided.
    Diverted(Disposition),
}

impl Outcome {
    /// A short name, for spans and logs: `processed`, `duplicate`,
    /// `omitted`, `retry` or `parked`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Processed => "processed",
            Outcome::Duplicate => "duplicate",
            Outcome::Omitted => "omitted",
            Outcome::Diverted(Disposition::RetryLater { .. }) => "retry",
            Outcome::Diverted(Disposition::Park { .. }) => "parked",
        }
    }
}

/// A delivery that could not be settled; it is left unacked, and the
/// caller must drop the connection so the broker redelivers it.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("ack failed: {0}")]
    Ack(#[source] lapin::Error),
}

/// What happens to a delivery, as the pipeline goes. Metrics and tests
/// follow the worker through these.
#[derive(Debug)]
pub enum Event<'a> {
    /// Before anything is done with it.
    Received(&'a Delivery),
    /// Acked, with its outcome and how the handling went.
    Settled(&'a Delivery, &'a Outcome, &'a Handling),
    /// Left unacked for redelivery; the session ends.
    Unsettled(&'a Delivery, &'a SettleError),
    /// Dropped unfinished at the end of the grace period (see
    /// `Pipeline::cut_off`): left unacked for redelivery.
    CutOff(&'a Delivery),
}

/// How a settled delivery was handled: what metrics need besides the
/// outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Handling {
    /// The envelope's `type`, once decoded (`None` when it was not).
    pub message_type: Option<MessageType>,
    /// Runs of the transaction after the first, in process (stage 1).
    pub in_process_retries: u32,
    /// From receipt to settlement.
    pub elapsed: Duration,
}

/// Called with every [`Event`].
pub type EventHook = Arc<dyn Fn(&Event<'_>) + Send + Sync>;

/// Where a broker session's settlements go: the consumer channel's acks
/// and a confirmed publisher for copies.
pub trait Outlet: Send + Sync {
    /// The connection's negotiated frame size: a copy's headers must fit.
    fn frame_max(&self) -> usize;

    /// Acks settled deliveries together.
    fn ack<'a>(&'a self, tags: &'a [u64]) -> BoxFuture<'a, Result<(), lapin::Error>>;

    /// Publishes copies together and waits for the broker's confirms: one
    /// result per copy, in order (see [`Publisher::publish_all`]).
    ///
    /// [`Publisher::publish_all`]: crate::broker::Publisher::publish_all
    fn publish_all<'a>(&'a self, copies: &'a [Outgoing<'a>]) -> BoxFuture<'a, Vec<Result<(), PublishError>>>;
}
