//! `delete_db --yes`: drop every table the worker owns.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use worker_iot_core::config::Settings;
use worker_iot_core::store;

/// Drop every table worker-iot-core owns (events, commands, devices,
/// measurements, beacon_readings, outbox, delivery_attempts and the
/// migration history) in the database of DATABASE_URL. Says which database
/// on which server first; without --yes it only says so and exits 2.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Confirm that the data may be destroyed.
    #[arg(long)]
    yes: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let settings = match Settings::load() {
        Ok((settings, _)) => settings,
        Err(e) => {
            eprintln!("delete_db: {e}");
            return ExitCode::from(2);
        }
    };
    let target = match store::describe_database(&settings.database_url) {
        Ok(target) => target,
        Err(e) => {
            eprintln!("delete_db: {e}");
            return ExitCode::from(2);
        }
    };
    let tables = store::TABLES.join(", ");
    if !args.yes {
        eprintln!("delete_db: this would drop {tables} and all their data from {target}: run again with --yes");
        return ExitCode::from(2);
    }
    println!("dropping {tables} from {target}");
    let result = store::drop_tables(&settings.database_url)
        .await
        .context("dropping the tables");
    if result.is_ok() {
        println!("dropped");
    }
    worker_iot_core::cli::exit_code("delete_db", result)
}
