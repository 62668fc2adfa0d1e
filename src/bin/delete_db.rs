//! `delete_db --yes`: drop every table the worker owns.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use worker_iot_core::cli::{self, EXIT_USAGE, Generate};
use worker_iot_core::config::{DATABASE_KEYS, Settings};
use worker_iot_core::emit;
use worker_iot_core::store;

/// Drop every table worker-iot-core owns in the database of DATABASE_URL.
/// Says which database on which server first; without -y/--yes it only
/// says so and exits 2.
///
/// Exit status: 0 done, 2 bad flag or setting (or no --yes), 1 any other
/// error, 130 interrupted.
#[derive(Parser)]
#[command(name = "delete_db", version, after_help = tables_help())]
struct Args {
    /// Confirm that the data may be destroyed.
    #[arg(long, short = 'y')]
    yes: bool,
    #[command(flatten)]
    generate: Generate,
}

/// The tables it drops, from [`store::TABLES`] itself, so the help cannot
/// leave one out.
fn tables_help() -> String {
    format!(
        "Tables dropped (with their data): {}, and the function outbox_notify().",
        store::TABLES.join(", ")
    )
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(code) = args.generate.run::<Args>() {
        return code;
    }
    cli::until_interrupted("delete_db", run(args)).await
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let settings = Settings::load_for(DATABASE_KEYS)?.settings;
    let url = settings.database_url.expose();
    let target = store::describe_database(url)?;
    let tables = store::TABLES.join(", ");
    if !args.yes {
        eprintln!("delete_db: this would drop {tables} and all their data from {target}: run again with --yes");
        return Ok(ExitCode::from(EXIT_USAGE));
    }
    cli::write_stdout_before_work(format!("dropping {tables} from {target}\n").as_bytes());
    store::drop_tables(url).await.context("dropping the tables")?;
    emit!("dropped");
    Ok(ExitCode::SUCCESS)
}
