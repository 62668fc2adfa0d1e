//! `publish`: send exploration messages to the worker's queue (SPEC §9).
//!
//! ```text
//! publish event MEASUREMENT --data '{"device_id":"d1","sensor":"t","value":21.5}'
//! publish command SET_LED --data '{"device_id":"d1","state":"on"}'
//! publish raw 'not json'
//! publish sample --count 100
//! publish invalid
//! publish --trace event DEVICE_UP --data '{"device_id":"d1"}'
//! ```

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use lapin::BasicProperties;
use serde_json::Value;
use tracing::Instrument;
use worker_iot_core::broker::{self, Publisher};
use worker_iot_core::cli::samples;
use worker_iot_core::config::Settings;
use worker_iot_core::envelope::Kind;
use worker_iot_core::telemetry::{self, Telemetry};

#[derive(Parser)]
#[command(
    version,
    about = "Send sample events, commands and invalid data to the worker's queue"
)]
struct Args {
    /// Queue to publish to (default: RABBITMQ_LOCAL_QUEUE_NAME).
    #[arg(long, global = true)]
    queue: Option<String>,
    /// Start a trace per message: a new `traceparent` header, whose trace
    /// id is printed (find it in Jaeger). With OTEL_EXPORTER_OTLP_ENDPOINT
    /// set, the publish span is exported too.
    #[arg(long, global = true)]
    trace: bool,
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// One event of TYPE.
    Event {
        message_type: String,
        /// The `data` payload, as JSON.
        #[arg(long, default_value = "null")]
        data: String,
        /// Idempotency key (default: none, so the body hash is the id).
        #[arg(long)]
        id: Option<String>,
    },
    /// One command of TYPE.
    Command {
        message_type: String,
        #[arg(long, default_value = "null")]
        data: String,
        #[arg(long)]
        id: Option<String>,
    },
    /// A body sent as it is, JSON or not.
    Raw { body: String },
    /// A realistic mix of every event type and both commands.
    Sample {
        #[arg(long, default_value_t = 20)]
        count: usize,
        /// Seed of the mix (ids are `sample-<seed>-<n>`).
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// One of each malformed or invalid case: all of them end in the DLQ.
    Invalid,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    worker_iot_core::cli::exit_code("publish", run().await)
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let (settings, _) = Settings::load()?;
    let queue = args.queue.clone().unwrap_or_else(|| settings.queue.clone());
    let telemetry = if args.trace && settings.otel_endpoint.is_some() {
        Some(Telemetry::install(&settings)?)
    } else {
        None
    };
    let bodies = bodies(args.what)?;

    let connection = broker::connect(&settings.amqp_url, "publish").await.with_context(|| {
        format!(
            "connecting to {}",
            worker_iot_core::config::mask_passwords(&settings.amqp_url)
        )
    })?;
    let publisher = Publisher::open(&connection).await?;
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    for (name, body) in &bodies {
        // The library's target, so the span passes the export filter.
        let span = tracing::info_span!(target: "worker_iot_core::publish", "publish",
            otel.name = %format_args!("publish {queue}"), otel.kind = "producer",
            messaging.system = "rabbitmq", messaging.destination.name = %queue);
        let properties = if args.trace {
            let (properties, trace_id) = telemetry::start_trace(&span, properties.clone());
            println!("{name}: trace {trace_id}");
            properties
        } else {
            properties.clone()
        };
        publisher
            .publish("", &queue, body, properties)
            .instrument(span)
            .await
            .with_context(|| format!("publishing {name} to {queue}"))?;
    }
    connection.close(200, "done".into()).await.ok();
    println!("published {} message(s) to {queue}", bodies.len());
    if let Some(telemetry) = telemetry {
        telemetry.shutdown().await;
    }
    Ok(())
}

/// The messages to publish, each with a name for the output.
fn bodies(what: What) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    Ok(match what {
        What::Event { message_type, data, id } => {
            vec![(message_type.clone(), one(Kind::Event, &message_type, &data, id)?)]
        }
        What::Command { message_type, data, id } => {
            vec![(message_type.clone(), one(Kind::Command, &message_type, &data, id)?)]
        }
        What::Raw { body } => vec![("raw".into(), body.into_bytes())],
        What::Sample { count, seed } => samples::mix(count, seed)
            .into_iter()
            .map(|b| ("sample".into(), b))
            .collect(),
        What::Invalid => samples::invalid_cases()
            .into_iter()
            .map(|(name, b)| (name.to_owned(), b))
            .collect(),
    })
}

fn one(kind: Kind, message_type: &str, data: &str, id: Option<String>) -> anyhow::Result<Vec<u8>> {
    let data: Value = serde_json::from_str(data).context("--data must be JSON")?;
    if message_type.is_empty() {
        bail!("TYPE must not be empty");
    }
    Ok(samples::envelope(kind, message_type, data, id.as_deref()))
}
