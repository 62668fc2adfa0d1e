//! `create_db`: create the database named in DATABASE_URL if it is missing,
//! then run every pending migration.

use anyhow::Context;
use worker_iot_core::config::Settings;
use worker_iot_core::store;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    worker_iot_core::cli::exit_code("create_db", run().await)
}

async fn run() -> anyhow::Result<()> {
    let (settings, _) = Settings::load()?;
    let url = settings.database_url()?;
    let created = store::create_database(url).await.context("creating the database")?;
    let pool = store::connect(url, 1).await?;
    store::migrate(&pool).await.context("migrating")?;
    pool.close().await;
    println!(
        "{} and migrated",
        if created { "database created" } else { "database exists" }
    );
    Ok(())
}
