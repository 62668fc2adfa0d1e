//! The worker binary: settings, banner, logging, signals; the rest is
//! `worker_iot_core::worker::run`.

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use worker_iot_core::config::{LogFormat, Settings};
use worker_iot_core::worker::WorkerError;
use worker_iot_core::{banner, worker};

#[tokio::main]
async fn main() -> ExitCode {
    let (settings, warnings) = match Settings::load() {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("worker-iot-core: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(settings.log_format);
    println!("{}", banner::banner());
    println!("Effective configuration:\n{settings}");
    for key in &warnings.unknown_keys {
        tracing::warn!(%key, "unknown key in the settings file is ignored");
    }

    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    match worker::run(settings, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error.message = %e, "worker stopped");
            eprintln!("worker-iot-core: {e}");
            exit_code_for(&e)
        }
    }
}

/// 2 when the worker refuses to start because of its configuration
/// (settings, topology file, a queue declared otherwise), 1 otherwise.
fn exit_code_for(error: &WorkerError) -> ExitCode {
    match error {
        WorkerError::Config(_) | WorkerError::Topology(_) => ExitCode::from(2),
        WorkerError::Store(_) | WorkerError::Metrics(_) => ExitCode::FAILURE,
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
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
