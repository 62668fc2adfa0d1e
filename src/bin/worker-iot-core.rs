//! The worker binary: arguments, settings, banner, logging and span export
//! (flushed at exit), signals; the rest is `worker_iot_core::run`.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Parser;
use serde_json::json;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;
use worker_iot_core::Topology;
use worker_iot_core::cli::{self, EXIT_INTERRUPTED, EXIT_USAGE, Generate, banner};
use worker_iot_core::config::{KEYS, Loaded, LogFormat, Settings, SettingsFile};
use worker_iot_core::emit;
use worker_iot_core::telemetry::Telemetry;

/// The worker of worker-iot-core: takes events and commands from the
/// RabbitMQ queue RABBITMQ_LOCAL_QUEUE_NAME, applies each in a PostgreSQL
/// transaction, acks after commit, retries and parks what fails, and relays
/// commands' device messages from the outbox.
///
/// Settings come from _storage/settings.json (SETTINGS_FILE) and the
/// environment; with nothing set it uses RabbitMQ and PostgreSQL on
/// localhost and creates the database worker_iot_core if missing.
///
/// Exit status: 0 stopped by SIGTERM, 130 stopped by SIGINT (Ctrl-C), both
/// after finishing in-flight work; 2 bad flag, setting or topology file; 1
/// any other error.
#[derive(Parser)]
#[command(name = "worker-iot-core", version)]
struct Args {
    /// Check the settings and the topology file, print the effective
    /// configuration with where each value came from, and exit: 0 when
    /// valid, 2 when not. Touches neither the broker nor the database.
    #[arg(long, conflicts_with = "healthcheck")]
    check_config: bool,
    /// With --check-config: one JSON line per setting and a summary line.
    #[arg(long, requires = "check_config")]
    json: bool,
    /// Ask a running worker's /readyz on METRICS_ADDR and exit 0 when it is
    /// ready, 1 when not (for container health checks).
    #[arg(long)]
    healthcheck: bool,
    #[command(flatten)]
    generate: Generate,
}

const NAME: &str = "worker-iot-core";

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(code) = args.generate.run::<Args>() {
        return code;
    }
    // The health check reads one setting; a bad other one is the worker's
    // to report.
    let keys: &[&str] = if args.healthcheck { &["METRICS_ADDR"] } else { KEYS };
    let loaded = match Settings::load_for(keys) {
        Ok(loaded) => loaded,
        Err(e) => return cli::report(NAME, &e),
    };
    if args.healthcheck {
        return healthcheck(&loaded.settings).await;
    }
    if args.check_config {
        return check_config(&loaded, args.json);
    }
    let Loaded { settings, warnings, .. } = loaded;
    let telemetry = match Telemetry::install(&settings) {
        Ok(telemetry) => telemetry,
        Err(e) => return cli::report(NAME, &e),
    };
    print_banner(&settings);
    for warning in warnings.lines() {
        tracing::warn!("{warning}");
    }

    let shutdown = CancellationToken::new();
    let interrupted = Arc::new(AtomicBool::new(false));
    // Listening starts before the worker does: a signal from then on is
    // always seen.
    let interrupt = listen(SignalKind::interrupt());
    let terminate = listen(SignalKind::terminate());
    tokio::spawn(stop_on_signal(
        interrupt,
        terminate,
        shutdown.clone(),
        interrupted.clone(),
    ));
    let code = match worker_iot_core::run(settings, shutdown).await {
        Ok(()) if interrupted.load(Ordering::SeqCst) => ExitCode::from(EXIT_INTERRUPTED),
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error.message = %cli::chain(&e), "worker stopped");
            cli::report(NAME, &e)
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
        LogFormat::Text => cli::write_stdout_before_work(format!("{text}\n").as_bytes()),
        LogFormat::Json => eprintln!("{text}"),
    }
}

/// Validates without connecting: settings (already loaded) and topology.
/// The configuration goes to stdout, warnings and errors to stderr.
fn check_config(loaded: &Loaded, json: bool) -> ExitCode {
    for warning in loaded.warnings.lines() {
        eprintln!("{NAME}: warning: {warning}");
    }
    let settings = &loaded.settings;
    let topology = match Topology::load(&settings.topology_file, &settings.queue) {
        Ok(topology) => topology,
        Err(e) => {
            eprintln!("{NAME}: {}", cli::chain(&e));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let queues = topology.queues();
    if json {
        print_json_rows(loaded);
        let summary = json!({
            "record": "summary",
            "valid": true,
            "queue_type": format!("{:?}", topology.queue_type),
            "queues": queues,
        });
        emit!("{summary}");
    } else {
        emit!("Effective configuration (value, then where it came from):");
        emit!(
            "  {:<27} = {}  ({})",
            "SETTINGS_FILE",
            loaded.file.path,
            file_origin(&loaded.file)
        );
        for (key, value, source) in &loaded.rows {
            emit!("  {key:<27} = {value}  ({source})");
        }
        emit!("Topology ({:?}): {}", topology.queue_type, queues.join(", "));
        emit!("configuration is valid");
    }
    ExitCode::SUCCESS
}

/// Where the settings file came from, and whether it was there.
fn file_origin(file: &SettingsFile) -> String {
    let found = if file.found {
        "read"
    } else {
        "not found: defaults and environment only"
    };
    format!("{}; {found}", file.origin)
}

fn print_json_rows(loaded: &Loaded) {
    let file = &loaded.file;
    let file_row = json!({
        "record": "setting", "key": "SETTINGS_FILE", "value": file.path,
        "source": file.origin.as_str(), "found": file.found,
    });
    emit!("{file_row}");
    for (key, value, source) in &loaded.rows {
        let row = json!({"record": "setting", "key": key, "value": value, "source": source.as_str()});
        emit!("{row}");
    }
}

/// 0 when the worker on `METRICS_ADDR` answers /readyz with 200.
async fn healthcheck(settings: &Settings) -> ExitCode {
    match worker_iot_core::probe_ready(settings.metrics_addr).await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(answer)) => {
            eprintln!("{NAME}: /readyz answered {answer}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{NAME}: /readyz on {}: {}", settings.metrics_addr, cli::chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// A stream of `kind` signals, or `None` (logged) when it cannot be had.
fn listen(kind: SignalKind) -> Option<Signal> {
    signal(kind)
        .inspect_err(|e| tracing::error!(error.message = %e, signal = ?kind, "cannot listen for the signal"))
        .ok()
}

/// Cancels `shutdown` on SIGTERM or SIGINT; on SIGINT, sets `interrupted`
/// first, so the worker exits 130 once drained.
async fn stop_on_signal(
    interrupt: Option<Signal>,
    terminate: Option<Signal>,
    shutdown: CancellationToken,
    interrupted: Arc<AtomicBool>,
) {
    async fn next(signal: Option<Signal>) {
        match signal {
            Some(mut signal) => {
                signal.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    tokio::select! {
        () = next(interrupt) => interrupted.store(true, Ordering::SeqCst),
        () = next(terminate) => {}
    }
    tracing::info!("shutdown requested: finishing in-flight work");
    shutdown.cancel();
}
