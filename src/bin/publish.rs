//! `publish`: send exploration messages to the worker's queue
//! (docs/operations.md, "The binaries").
//!
//! ```text
//! publish event MEASUREMENT --data '{"device_id":"d1","sensor":"t","value":21.5}'
//! publish command SET_LED --data '{"device_id":"d1","state":"on"}'
//! publish raw 'not json'
//! publish sample --count 100
//! publish invalid
//! publish --trace event DEVICE_UP --data '{"device_id":"d1"}'
//! publish device lamp-1 --mqtt-port 1884          # a simulated device over MQTT
//! ```

use std::process::ExitCode;

use anyhow::Context;
use clap::error::ErrorKind as ClapErrorKind;
use clap::{CommandFactory, Parser, Subcommand};
use lapin::BasicProperties;
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use worker_iot_core::broker::{self, Publisher};
use worker_iot_core::cli::device::{self, DeviceOptions};
use worker_iot_core::cli::{self, Generate, UsageError, samples};
use worker_iot_core::config::{BROKER_KEYS, Settings, TELEMETRY_KEYS};
use worker_iot_core::emit;
use worker_iot_core::envelope::Kind;
use worker_iot_core::telemetry::{self, Telemetry};

/// Send sample events, commands and invalid data to the worker's queue.
///
/// Exit status: 0 done, 2 bad flag or setting, 1 any other error, 130
/// interrupted.
#[derive(Parser)]
#[command(
    name = "publish",
    version,
    subcommand_value_name = "COMMAND",
    override_usage = "publish [OPTIONS] <COMMAND>"
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
    /// One JSON line per message (with its trace id) and a summary line,
    /// instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    what: Option<What>,
    #[command(flatten)]
    generate: Generate,
}

#[derive(Subcommand)]
enum What {
    /// One event of TYPE.
    Event {
        /// The message type, such as MEASUREMENT or DEVICE_UP.
        #[arg(value_name = "TYPE")]
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
        /// The command type, such as SET_LED.
        #[arg(value_name = "TYPE")]
        message_type: String,
        /// The `data` payload, as JSON.
        #[arg(long, default_value = "null")]
        data: String,
        /// Idempotency key (default: none, so the body hash is the id).
        #[arg(long)]
        id: Option<String>,
    },
    /// A body sent as it is, JSON or not.
    Raw {
        /// The message body, byte for byte.
        body: String,
    },
    /// A realistic mix of every event type and both commands.
    Sample {
        /// How many messages.
        #[arg(long, default_value_t = 20)]
        count: usize,
        /// Seed of the mix (ids are `sample-<seed>-<n>`).
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// One of each malformed or invalid case: all of them end in the DLQ.
    Invalid,
    /// A simulated device over MQTT, as the firmware behaves: last will on
    /// `down`, `up` at start, a reading on `<ID>/pressure` every period,
    /// QoS 1 persistent subscriptions to `/led/<ID>` and `<ID>/config`
    /// (printed; the period follows `<ID>/config`). Stops with Ctrl-C.
    Device(DeviceArgs),
}

#[derive(clap::Args)]
struct DeviceArgs {
    /// The device id (also its MQTT client id, so its session persists).
    #[arg(value_name = "ID")]
    id: String,
    /// The broker's MQTT listener.
    #[arg(long, env = "MQTT_HOST", default_value = "127.0.0.1")]
    mqtt_host: String,
    /// Its port (compose: 1883; the test broker: 1884).
    #[arg(long, env = "MQTT_PORT", default_value_t = 1883)]
    mqtt_port: u16,
    /// MQTT user name.
    #[arg(long, env = "MQTT_USERNAME", default_value = "guest")]
    mqtt_username: String,
    /// MQTT password.
    #[arg(long, env = "MQTT_PASSWORD", default_value = "guest", hide_env_values = true)]
    mqtt_password: String,
    /// The ip it announces in `up`.
    #[arg(long, default_value = "127.0.0.1")]
    ip: String,
    /// Milliseconds between readings, until `<ID>/config` says otherwise.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    period_ms: u64,
    /// Stop after this many readings (default: run until Ctrl-C).
    #[arg(long)]
    readings: Option<u64>,
    /// At the end, drop the connection without DISCONNECT, so the broker
    /// publishes the last will on `down`.
    #[arg(long)]
    crash: bool,
    /// Put PREFIX/ before every topic (keeps test devices apart).
    #[arg(long, default_value = "")]
    prefix: String,
}

/// One message published, for `--json`.
#[derive(Serialize)]
struct MessageLine<'a> {
    record: &'static str,
    name: &'a str,
    queue: &'a str,
    trace_id: Option<String>,
}

/// The last line of `--json`.
#[derive(Serialize)]
struct SummaryLine<'a> {
    record: &'static str,
    published: usize,
    queue: &'a str,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(code) = args.generate.run::<Args>() {
        return code;
    }
    match args.what {
        // The simulator stops on Ctrl-C itself, with a DISCONNECT (unless
        // --crash): dropping it mid-way would make the broker send its will.
        Some(What::Device(_)) => cli::finish("publish", run(args).await),
        _ => cli::until_interrupted("publish", run(args)).await,
    }
}

async fn run(mut args: Args) -> anyhow::Result<ExitCode> {
    let Some(what) = args.what.take() else {
        Args::command()
            .error(
                ClapErrorKind::MissingSubcommand,
                "what to publish is missing: event, command, raw, sample, invalid or device",
            )
            .exit();
    };
    if let What::Device(device) = what {
        return run_device(device).await;
    }
    // The log output and the span export are only set up with --trace.
    let keys = if args.trace {
        [BROKER_KEYS, TELEMETRY_KEYS].concat()
    } else {
        BROKER_KEYS.to_vec()
    };
    let settings = Settings::load_for(&keys)?.settings;
    let queue = args.queue.clone().unwrap_or_else(|| settings.queue.clone());
    let bodies = bodies(what)?;
    let telemetry = if args.trace && settings.otel_endpoint.is_some() {
        Some(Telemetry::install(&settings)?)
    } else {
        None
    };

    let connection = broker::connect(settings.amqp_url.expose(), "publish")
        .await
        .with_context(|| format!("connecting to {}", settings.amqp_url))?;
    let publisher = Publisher::open(&connection).await?;
    for (name, body) in &bodies {
        publish_one(&publisher, &args, &queue, name, body).await?;
    }
    connection.close(200, "done".into()).await.ok();
    if args.json {
        let summary = SummaryLine {
            record: "summary",
            published: bodies.len(),
            queue: &queue,
        };
        emit!("{}", serde_json::to_string(&summary)?);
    } else {
        emit!("published {} message(s) to {queue}", bodies.len());
    }
    if let Some(telemetry) = telemetry {
        telemetry.shutdown().await;
    }
    Ok(ExitCode::SUCCESS)
}

/// Publishes one body (with confirm) and prints its line when there is
/// one: always with `--json`, with `--trace` in text.
async fn publish_one(publisher: &Publisher, args: &Args, queue: &str, name: &str, body: &[u8]) -> anyhow::Result<()> {
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    // The library's target, so the span passes the export filter.
    let span = tracing::info_span!(target: "worker_iot_core::publish", "publish",
        otel.name = %format_args!("publish {queue}"), otel.kind = "producer",
        messaging.system = "rabbitmq", messaging.destination.name = %queue);
    let (properties, trace_id) = if args.trace {
        let (properties, trace_id) = telemetry::start_trace(&span, properties);
        (properties, Some(trace_id.to_string()))
    } else {
        (properties, None)
    };
    publisher
        .publish("", queue, body, properties)
        .instrument(span)
        .await
        .with_context(|| format!("publishing {name} to {queue}"))?;
    if args.json {
        let line = MessageLine {
            record: "message",
            name,
            queue,
            trace_id,
        };
        emit!("{}", serde_json::to_string(&line)?);
    } else if let Some(trace_id) = trace_id {
        emit!("{name}: trace {trace_id}");
    }
    Ok(())
}

/// Runs a simulated device until its readings are sent or Ctrl-C,
/// printing what it sends and receives.
async fn run_device(args: DeviceArgs) -> anyhow::Result<ExitCode> {
    let options = DeviceOptions {
        id: args.id,
        host: args.mqtt_host,
        port: args.mqtt_port,
        username: args.mqtt_username,
        password: args.mqtt_password,
        ip: args.ip,
        period: std::time::Duration::from_millis(args.period_ms),
        readings: args.readings,
        crash: args.crash,
        prefix: args.prefix,
    };
    let stop = CancellationToken::new();
    let on_interrupt = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_interrupt.cancel();
        }
    });
    device::run(&options, stop, |seen| emit!("{}", device::describe(&seen))).await?;
    Ok(ExitCode::SUCCESS)
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
        What::Device(_) => Vec::new(),
    })
}

fn one(kind: Kind, message_type: &str, data: &str, id: Option<String>) -> anyhow::Result<Vec<u8>> {
    let data: Value = serde_json::from_str(data).map_err(|e| UsageError(format!("--data must be JSON: {e}")))?;
    if message_type.is_empty() {
        return Err(UsageError("TYPE must not be empty".into()).into());
    }
    Ok(samples::envelope(kind, message_type, data, id.as_deref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_argument_has_help() {
        let command = Args::command();
        command.clone().debug_assert();
        let mut missing = Vec::new();
        let commands = std::iter::once(&command).chain(command.get_subcommands());
        for command in commands {
            for arg in command.get_arguments().filter(|arg| !arg.is_hide_set()) {
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                if help.trim().is_empty() && !["help", "version"].contains(&arg.get_id().as_str()) {
                    missing.push(format!("{} {}", command.get_name(), arg.get_id()));
                }
            }
        }
        assert!(missing.is_empty(), "arguments without help: {missing:?}");
    }
}
