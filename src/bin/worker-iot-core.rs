//! The worker binary: arguments, settings, banner, logging and span export
//! (flushed at exit), signals; the rest is `worker_iot_core::run`.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use worker_iot_core::Topology;
use worker_iot_core::WorkerError;
use worker_iot_core::cli::banner;
use worker_iot_core::config::{LogFormat, Settings};
use worker_iot_core::telemetry::Telemetry;

/// The worker of worker-iot-core: takes events and commands from the
/// RabbitMQ queue RABBITMQ_LOCAL_QUEUE_NAME, applies each in a PostgreSQL
/// transaction, acks after commit, retries and parks what fails, and relays
/// commands' device messages from the outbox.
///
/// Settings come from _storage/settings.json (SETTINGS_FILE) and the
/// environment; with nothing set it uses RabbitMQ and PostgreSQL on
/// localhost and creates the database worker_iot_core if missing.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Check the settings and the topology file, print the effective
    /// configuration and exit: 0 when valid, 2 when not. Touches neither the
    /// broker nor the database.
    #[arg(long, conflicts_with = "healthcheck")]
    check_config: bool,
    /// Ask a running worker's /readyz on METRICS_ADDR and exit 0 when it is
    /// ready, 1 when not (for container health checks).
    #[arg(long)]
    healthcheck: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let (settings, warnings) = match Settings::load() {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("worker-iot-core: {e}");
            return ExitCode::from(2);
        }
    };
    if args.healthcheck {
        return healthcheck(&settings).await;
    }
    if args.check_config {
        return check_config(&settings, &warnings.unknown_keys);
    }
    let telemetry = match Telemetry::install(&settings) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("worker-iot-core: {e}");
            return ExitCode::FAILURE;
        }
    };
    print_banner(&settings);
    for key in &warnings.unknown_keys {
        tracing::warn!(%key, "unknown key in the settings file is ignored");
    }

    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let code = match worker_iot_core::run(settings, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error.message = %e, "worker stopped");
            eprintln!("worker-iot-core: {e}");
            exit_code_for(&e)
        }
    };
    // After the drain: the last deliveries' spans are exported too.
    telemetry.shutdown().await;
    code
}

/// The banner and the effective configuration: on stdout in text mode, on
/// stderr in JSON mode, so that stdout stays one JSON object per line.
fn print_banner(settings: &Settings) {
    let text = format!("{}\nEffective configuration:\n{settings}", banner::banner());
    match settings.log_format {
        LogFormat::Text => println!("{text}"),
        LogFormat::Json => eprintln!("{text}"),
    }
}

/// Validates without connecting: settings (already loaded) and topology.
fn check_config(settings: &Settings, unknown_keys: &[String]) -> ExitCode {
    println!("Effective configuration:\n{settings}");
    for key in unknown_keys {
        println!("warning: unknown key {key:?} in the settings file is ignored");
    }
    match Topology::load(&settings.topology_file, &settings.queue) {
        Ok(topology) => {
            let queues = topology.queues();
            println!("Topology ({:?}): {}", topology.queue_type, queues.join(", "));
            println!("configuration is valid");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("worker-iot-core: {e}");
            ExitCode::from(2)
        }
    }
}

/// 0 when the worker on `METRICS_ADDR` answers /readyz with 200.
async fn healthcheck(settings: &Settings) -> ExitCode {
    match worker_iot_core::probe_ready(settings.metrics_addr).await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(answer)) => {
            eprintln!("worker-iot-core: /readyz answered {answer}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("worker-iot-core: /readyz on {}: {e}", settings.metrics_addr);
            ExitCode::FAILURE
        }
    }
}

/// 2 when the worker refuses to start because of its configuration
/// (settings, topology file, a queue declared otherwise), 1 otherwise.
fn exit_code_for(error: &WorkerError) -> ExitCode {
    match error {
        WorkerError::Topology(_) => ExitCode::from(2),
        WorkerError::Store(_) | WorkerError::Metrics(_) => ExitCode::FAILURE,
    }
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
async fn stop_on_signal(shutdown: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error.message = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("shutdown requested: finishing in-flight work");
    shutdown.cancel();
}
