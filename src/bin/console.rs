//! `console`: the failed-message web console (docs/console.md). The pages
//! and the API are in `worker_iot_core::console`; this reads the settings,
//! opens the database and serves until SIGTERM or Ctrl-C.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use worker_iot_core::cli::{self, EXIT_INTERRUPTED, Generate};
use worker_iot_core::config::{BROKER_KEYS, DATABASE_KEYS, Settings, TELEMETRY_KEYS};
use worker_iot_core::console::{self, Broker, Console, ConsoleSettings};
use worker_iot_core::store;
use worker_iot_core::telemetry::Telemetry;

/// Serve the parking lot of queue Q in a browser: the groups of failed
/// messages, each message with its headers, body and error, and Retry,
/// Archive and Unarchive (the same actions as `requeue`), plus a JSON API
/// under /api/.
///
/// Listens on CONSOLE_ADDR (default 127.0.0.1:8080). Without CONSOLE_TOKEN
/// it serves loopback only; with it every page asks for a token
/// (CONSOLE_TOKEN may act, CONSOLE_VIEWER_TOKEN may only read).
/// JAEGER_UI_URL links each message to its trace.
///
/// Exit status: 0 stopped by SIGTERM, 130 stopped by SIGINT (Ctrl-C), 2
/// bad flag or setting, 1 any other error.
#[derive(Parser)]
#[command(name = "console", version)]
struct Args {
    /// Main queue Q whose parking lot is shown (default:
    /// RABBITMQ_LOCAL_QUEUE_NAME).
    #[arg(long)]
    queue: Option<String>,
    #[command(flatten)]
    generate: Generate,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(code) = args.generate.run::<Args>() {
        return code;
    }
    cli::finish("console", run(args).await)
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let own = ConsoleSettings::from_env()?;
    let settings =
        Settings::load_for(&[BROKER_KEYS, DATABASE_KEYS, TELEMETRY_KEYS, &["MAX_MESSAGE_BYTES"]].concat())?.settings;
    let telemetry = Telemetry::install(&settings)?;
    let queue = args.queue.unwrap_or_else(|| settings.queue.clone());
    let url = settings.database_url.expose();
    // Created and migrated if need be, as the worker does.
    if let Err(e) = store::create_database(url).await {
        tracing::debug!(error.message = %e, "could not make sure the database exists");
    }
    let pool = store::connect(url, 4)
        .await
        .with_context(|| format!("cannot reach PostgreSQL at {}", settings.database_url))?;
    store::migrate(&pool).await?;
    let listener = TcpListener::bind(own.addr)
        .await
        .with_context(|| format!("cannot listen on CONSOLE_ADDR={}", own.addr))?;
    let addr = listener.local_addr()?;
    let lock = if own.protected() {
        "every page asks for a token"
    } else {
        "no CONSOLE_TOKEN: loopback only"
    };
    tracing::info!(%addr, queue, "console listening on http://{addr}/ ({lock})");
    let stop = CancellationToken::new();
    let console = Console {
        pool: pool.clone(),
        broker: Broker::new(settings.amqp_url.expose()),
        queue,
        settings: own,
        sessions: console::auth::Sessions::default(),
        max_message_bytes: settings.max_message_bytes,
        // Stopped with the console, between two batches: what a paced
        // retry has not sent stays parked.
        jobs: console::Jobs::new(stop.clone()),
    };
    let server = console::serve(listener, console, stop.clone())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    // As every binary (docs/operations.md, "The binaries"): SIGTERM is a
    // requested stop (0), Ctrl-C an interruption (130).
    let code = tokio::select! {
        _ = terminate.recv() => ExitCode::SUCCESS,
        _ = interrupt.recv() => ExitCode::from(EXIT_INTERRUPTED),
    };
    tracing::info!("console stopping");
    stop.cancel();
    server.task.await.ok();
    pool.close().await;
    telemetry.shutdown().await;
    Ok(code)
}
