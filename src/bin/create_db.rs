//! `create_db`: create the database named in DATABASE_URL if it is missing,
//! then run every pending migration.

use anyhow::Context;
use clap::Parser;
use worker_iot_core::config::{Settings, mask_password};
use worker_iot_core::store;

/// Create the database in DATABASE_URL if it is missing (default
/// postgres://postgres@localhost:5432/worker_iot_core) and run every pending
/// migration. The worker does the same at start-up.
#[derive(Parser)]
#[command(version)]
struct Args {}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    Args::parse();
    worker_iot_core::cli::exit_code("create_db", run().await)
}

async fn run() -> anyhow::Result<()> {
    let (settings, _) = Settings::load()?;
    let url = &settings.database_url;
    let created = store::create_database(url).await.context("creating the database")?;
    let pool = store::connect(url, 1).await?;
    store::migrate(&pool).await.context("migrating")?;
    pool.close().await;
    println!(
        "{} and migrated: {}",
        if created { "database created" } else { "database exists" },
        mask_password(url)
    );
    Ok(())
}
