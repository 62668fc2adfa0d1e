//! worker-iot-core: the message worker of an edge IoT platform.
//!
//! A delivery flows through the crate like this (docs/architecture.md has
//! the same map in more detail, with where to add things):
//!
//! * [`worker`] starts up (topology, database, the pipeline) and supervises
//!   broker sessions; [`session`] opens one (connect with [`broker`],
//!   declare the [`topology`], consume) and drains it;
//! * [`pipeline`] takes each delivery: admit ([`crash_guard`]) → process
//!   ([`envelope`] decodes, or [`device_route`] for a raw device message
//!   on a route's MQTT topic, [`handlers`] maps the type to its handler,
//!   which parses `data` once into a typed item; [`transaction`] writes a
//!   batch's items by handler in one PostgreSQL transaction, with [`store`]
//!   recording the inbox rows first) → settle;
//! * a failed delivery becomes a [`failure::Failed`]; the retry policy
//!   ([`retry`]) decides its [`Disposition`], and [`divert`] plans the copy
//!   (routing key and [`headers`]) that the pipeline publishes before it
//!   acks;
//! * every step is an [`Event`]: [`metrics`] counts them, tests watch them;
//!   [`http`] serves the metrics and the [`readiness`] ([`health`] checks
//!   the database);
//! * [`relay`] publishes the device messages that commands left in the
//!   [`outbox`];
//! * [`parking`] keeps parked messages in PostgreSQL: its keeper moves
//!   them from `Q.dlq` into the lot, and its actions (list, show, retry,
//!   archive) are what `requeue` and the console call;
//! * [`config`] reads the settings; [`telemetry`] sets up logs and the
//!   OpenTelemetry export, and carries trace context in AMQP headers.
//!
//! The public surface is what the binaries, the tests and the fuzz targets
//! use: the modules that define a contract (settings, the envelope, the
//! headers, the admin tools' libraries) and the items re-exported below.

pub mod broker;
pub mod cli;
pub mod config;
pub mod console;
pub mod device_route;
pub mod envelope;
pub mod headers;
pub mod parking;
pub mod store;
pub mod telemetry;

mod acks;
mod arrival;
mod crash_guard;
mod divert;
mod failure;
mod growth;
mod handlers;
mod health;
mod http;
mod inbox;
mod metrics;
mod outbox;
mod outcome;
mod pipeline;
mod readiness;
mod relay;
mod retry;
mod session;
mod topology;
mod transaction;
mod worker;

pub use failure::ErrorKind;
pub use http::probe_ready;
pub use metrics::Metrics;
pub use outbox::enqueue as enqueue_device_message;
pub use outcome::{Event, EventHook, Handling, Outcome};
pub use readiness::{DatabaseDown, NotReady, Readiness, Reason};
pub use retry::{Disposition, next_retry};
pub use topology::{MainQueue, QueueType, Topology, TopologyError};
pub use worker::{Options, WorkerError, run, run_with};
