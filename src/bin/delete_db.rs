//! `delete_db --yes`: drop every table the worker owns.

use anyhow::{Context, bail};
use clap::Parser;
use worker_iot_core::config::Settings;
use worker_iot_core::store;

/// Drop every table worker-iot-core owns (events, commands, devices,
/// measurements, beacon_readings, outbox and the migration history).
#[derive(Parser)]
struct Args {
    /// Confirm that the data may be destroyed.
    #[arg(long)]
    yes: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    worker_iot_core::cli::exit_code("delete_db", run().await)
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.yes {
        bail!(
            "this drops {} and all their data: run again with --yes",
            store::TABLES.join(", ")
        );
    }
    let (settings, _) = Settings::load()?;
    store::drop_tables(settings.database_url()?)
        .await
        .context("dropping the tables")?;
    println!("dropped {}", store::TABLES.join(", "));
    Ok(())
}
