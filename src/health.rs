//! Readiness's database half ([`crate::readiness`]): a background check
//! that the pool can still run `SELECT 1`, so `/readyz` answers from the
//! last result instead of querying on every request (a flood of probes
//! cannot load the database, and a probe never waits for it).

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::readiness::{DatabaseDown, Readiness};

/// How often the database is checked.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long one check may take before the database counts as unreachable.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// How often histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Checks the database every [`CHECK_INTERVAL`] until `shutdown`, telling
/// `readiness`, and keeps the pool gauges and the metrics' upkeep going.
pub async fn watch(pool: PgPool, readiness: Arc<Readiness>, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let mut check = tokio::time::interval(CHECK_INTERVAL);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut upkeep = tokio::time::interval(UPKEEP_INTERVAL);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = check.tick() => {
                if let Some(result) = check_once(&pool).await {
                    if let Err(e) = &result {
                        tracing::debug!(error.message = %e, "database check failed");
                    }
                    readiness.set_database(result);
                }
                metrics.set_pool(pool.size(), pool.num_idle(), pool.options().get_max_connections());
            }
            _ = upkeep.tick() => metrics.upkeep(),
        }
    }
}

/// One `SELECT 1` through the pool. `None` when it timed out only because
/// every connection is busy: a pool full of working transactions proves
/// the database answers, and a busy worker must not be reported unready.
async fn check_once(pool: &PgPool) -> Option<Result<(), DatabaseDown>> {
    match tokio::time::timeout(CHECK_TIMEOUT, sqlx::query("SELECT 1").execute(pool)).await {
        Ok(Ok(_)) => Some(Ok(())),
        Ok(Err(e)) => Some(Err(DatabaseDown::Error(Arc::new(e)))),
        Err(_) if pool.num_idle() == 0 && pool.size() >= pool.options().get_max_connections() => None,
        Err(_) => Some(Err(DatabaseDown::NoAnswer(CHECK_TIMEOUT))),
    }
}
