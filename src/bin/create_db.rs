//! `create_db`: create the database named in DATABASE_URL if it is missing,
//! then run every pending migration.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use worker_iot_core::cli::{self, Generate};
use worker_iot_core::config::{DATABASE_KEYS, Settings};
use worker_iot_core::emit;
use worker_iot_core::store;

/// Create the database in DATABASE_URL if it is missing (default
/// postgres://postgres@localhost:5432/worker_iot_core) and run every pending
/// migration. The worker does the same at start-up.
///
/// Exit status: 0 done, 2 bad flag or setting, 1 any other error, 130
/// interrupted.
#[derive(Parser)]
#[command(name = "create_db", version)]
struct Args {
    #[command(flatten)]
    generate: Generate,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(code) = args.generate.run::<Args>() {
        return code;
    }
    cli::until_interrupted("create_db", run()).await
}

async fn run() -> anyhow::Result<ExitCode> {
    let settings = Settings::load_for(DATABASE_KEYS)?.settings;
    let url = settings.database_url.expose();
    let created = store::create_database(url).await.context("creating the database")?;
    let pool = store::connect(url, 1).await?;
    store::migrate(&pool).await.context("migrating")?;
    pool.close().await;
    emit!(
        "{} and migrated: {}",
        if created { "database created" } else { "database exists" },
        settings.database_url
    );
    Ok(ExitCode::SUCCESS)
}
