//! worker-iot-core: the message worker of an edge IoT platform.
//!
//! A delivery flows through the crate like this:
//!
//! * [`broker`] connects to RabbitMQ; [`topology`] declares the queues;
//! * [`pipeline`] takes each delivery: [`envelope`] decodes it, [`handlers`]
//!   maps its type to a handler that runs inside a PostgreSQL transaction
//!   opened by the pipeline, with [`store`] recording it in the inbox first;
//! * the delivery is acked only after commit, or after its retry or DLQ
//!   copy (with [`headers`]) is confirmed by the broker; [`failure`] decides
//!   which;
//! * [`worker`] supervises the broker session, runs the consume loop and
//!   the graceful shutdown; [`metrics`] counts outcomes and serves them;
//! * [`relay`] publishes the device messages that commands left in the
//!   [`outbox`], with confirms;
//! * [`config`] reads the settings, [`samples`] makes the exploration
//!   messages of the `publish` tool.

pub mod banner;
pub mod broker;
pub mod cli;
pub mod config;
pub mod envelope;
pub mod failure;
pub mod handlers;
pub mod headers;
pub mod metrics;
pub mod outbox;
pub mod pipeline;
pub mod relay;
pub mod requeue;
pub mod samples;
pub mod store;
pub mod topology;
pub mod worker;
