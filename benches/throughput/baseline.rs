//! The baseline worker's database (`BENCH_BASELINE_WORKER`): another
//! build drained beside this one needs the schema it was written for.

use sqlx::PgPool;
use worker_iot_core::store;

use crate::child;
use crate::drain::{Db, Schema};

/// The baseline worker's own database, `<prefix>_baseline`: created empty
/// and migrated by the baseline worker itself at its first start, so each
/// build drains into the schema it was written for (a worker refuses a
/// database that had a migration it does not know, and its statements may
/// not fit the newer tables).
pub struct Baseline {
    pub url: String,
    pub pool: PgPool,
}

impl Baseline {
    /// Creates the database when [`child::baseline_worker`] is set.
    pub async fn open(server_url: &str, prefix: &str) -> Option<Baseline> {
        child::baseline_worker()?;
        let url = format!("{}/{prefix}_baseline", &server_url[..server_url.rfind('/').unwrap()]);
        store::create_database(&url).await.unwrap();
        let pool = store::connect(&url, 2).await.unwrap();
        Some(Baseline { url, pool })
    }

    pub fn db(&self) -> Db<'_> {
        Db {
            url: &self.url,
            pool: &self.pool,
            since: 0.0,
            schema: Schema::Baseline,
        }
    }
}
