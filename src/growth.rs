//! The tables that grow with every message, kept at day one's pace
//! (docs/architecture.md, "Growth"; docs/operations.md, "Retention"):
//! day partitions made ahead of need (and on demand for a message dated
//! outside them), retention that drops whole partitions, the inbox's
//! generations, and the gauges of what is stored.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Days, NaiveDate, NaiveTime, Utc};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::inbox::{self, Inbox};
use crate::metrics::Metrics;

/// The tables partitioned by day, each with its partition column.
pub const PARTITIONED: [(&str, &str); 3] = [
    ("measurements", "measured_at"),
    ("beacon_readings", "observed_at"),
    ("event_rows", "occurred_at"),
];

/// Days made ahead of today (and today itself).
const AHEAD_DAYS: u64 = 7;

/// How often partitions, retention and the inbox are looked after.
const UPKEEP_EVERY: Duration = Duration::from_secs(15 * 60);

/// How often the stored-rows gauges are read.
const STATS_EVERY: Duration = Duration::from_secs(60);

/// Opens `size` connections of `pool` before the first delivery, each
/// having read today's partitions and inbox generation. A connection's
/// first statement on a table of a year of day partitions reads their
/// bounds: about 2 ms more than on an empty database, measured, which the
/// first messages after a start would otherwise wait for.
///
/// # Errors
/// The database error.
pub async fn warm(pool: &PgPool, size: u32, today: NaiveDate) -> Result<(), sqlx::Error> {
    let from = today.and_time(NaiveTime::MIN).and_utc();
    let to = from + Days::new(1);
    let tables: String = PARTITIONED
        .iter()
        .map(|(table, column)| format!("SELECT 1 FROM {table} WHERE {column} >= $1 AND {column} < $2 UNION ALL "))
        .collect();
    let sql = format!("{tables}SELECT 1 FROM {} LIMIT 0", inbox::table(today));
    // Held until all are open, so each is a connection of its own.
    let mut held = Vec::new();
    for _ in 0..size {
        let mut conn = pool.acquire().await?;
        sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
            .bind(from)
            .bind(to)
            .execute(&mut *conn)
            .await?;
        held.push(conn);
    }
    Ok(())
}

/// Makes the partitions of every partitioned table for each of `days`
/// that lacks one (the migration's `day_partition`, which two workers may
/// call at once).
///
/// # Errors
/// The database error.
pub async fn make_days(conn: &mut PgConnection, days: &[NaiveDate]) -> Result<(), sqlx::Error> {
    let tables: Vec<&str> = PARTITIONED.iter().map(|(t, _)| *t).collect();
    sqlx::query("SELECT day_partition(t::regclass, d) FROM UNNEST($1::text[]) AS t, UNNEST($2::date[]) AS d")
        .bind(tables)
        .bind(days)
        .execute(conn)
        .await?;
    Ok(())
}

/// Whether `error` says a row had no partition to go to (a message dated
/// outside every partition) or a table of the inbox is missing: both are
/// mended by making what is missing ([`make_days`], [`Inbox::upkeep`]).
pub fn is_missing_table(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("42P01") => true,
            Some("23514") => db.message().starts_with("no partition of relation"),
            _ => false,
        },
        _ => false,
    }
}

/// A partition of a partitioned table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub table: &'static str,
    pub name: String,
    pub day: NaiveDate,
    /// Detached by a retention run that did not finish.
    pub detach_pending: bool,
}

/// The day partitions of every partitioned table, oldest first.
///
/// # Errors
/// The database error.
pub async fn partitions(conn: &mut PgConnection) -> Result<Vec<Partition>, sqlx::Error> {
    let rows: Vec<(String, String, bool)> = sqlx::query_as(
        "SELECT p.relname::text, c.relname::text, i.inhdetachpending
           FROM pg_inherits i
           JOIN pg_class p ON p.oid = i.inhparent
           JOIN pg_class c ON c.oid = i.inhrelid
          WHERE p.relname = ANY($1) AND pg_table_is_visible(p.oid)",
    )
    .bind(PARTITIONED.iter().map(|(t, _)| *t).collect::<Vec<_>>())
    .fetch_all(conn)
    .await?;
    let mut found: Vec<Partition> = rows
        .into_iter()
        .filter_map(|(parent, name, detach_pending)| {
            let table = PARTITIONED.iter().map(|(t, _)| *t).find(|t| *t == parent)?;
            let day = NaiveDate::parse_from_str(name.strip_prefix(table)?.strip_prefix("_p")?, "%Y%m%d").ok()?;
            Some(Partition {
                table,
                name,
                day,
                detach_pending,
            })
        })
        .collect();
    found.sort_by(|a, b| (a.day, a.table).cmp(&(b.day, b.table)));
    Ok(found)
}

/// Removes the partitions whose whole day is older than `days` before
/// `today`: each is detached without blocking ingest (`DETACH …
/// CONCURRENTLY`), then dropped. Never a DELETE. Returns their names.
///
/// # Errors
/// The database error; the partitions removed before it stay removed, and
/// one left detached halfway is finished by the next run.
pub async fn drop_older_than(conn: &mut PgConnection, days: u32, today: NaiveDate) -> Result<Vec<String>, sqlx::Error> {
    let cutoff = today - Days::new(u64::from(days));
    let mut dropped = Vec::new();
    for old in partitions(conn).await?.into_iter().filter(|p| p.day < cutoff) {
        let how = if old.detach_pending { "FINALIZE" } else { "CONCURRENTLY" };
        let detach = format!("ALTER TABLE {} DETACH PARTITION {} {how}", old.table, old.name);
        sqlx::raw_sql(sqlx::AssertSqlSafe(detach)).execute(&mut *conn).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP TABLE {}", old.name)))
            .execute(&mut *conn)
            .await?;
        dropped.push(old.name);
    }
    Ok(dropped)
}

/// What one partitioned table holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub table: &'static str,
    /// PostgreSQL's estimate (as of the last ANALYZE).
    pub rows: f64,
    /// Heap, indexes and TOAST of every partition.
    pub bytes: f64,
    /// Since the beginning of the oldest partition's day.
    pub oldest: Option<Duration>,
}

/// What every partitioned table holds (estimates, cheap to read).
///
/// # Errors
/// The database error.
pub async fn stored(conn: &mut PgConnection, now: DateTime<Utc>) -> Result<Vec<Stored>, sqlx::Error> {
    let partitions = partitions(conn).await?;
    let mut all = Vec::new();
    for (table, _) in PARTITIONED {
        let (rows, bytes): (f64, f64) = sqlx::query_as(
            "SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::float8,
                    coalesce(sum(pg_total_relation_size(c.oid)), 0)::float8
               FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
              WHERE i.inhparent = $1::regclass",
        )
        .bind(table)
        .fetch_one(&mut *conn)
        .await?;
        let oldest = partitions.iter().find(|p| p.table == table).map(|p| {
            let begins = p.day.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc();
            (now - begins).to_std().unwrap_or_default()
        });
        all.push(Stored {
            table,
            rows,
            bytes,
            oldest,
        });
    }
    Ok(all)
}

/// The growth keeper's dependencies (one per worker process).
pub struct Keeper {
    pub pool: PgPool,
    pub inbox: Arc<Inbox>,
    /// `TELEMETRY_RETENTION_DAYS`; `None` keeps everything.
    pub retention_days: Option<u32>,
    pub metrics: Arc<Metrics>,
}

impl Keeper {
    /// Looks after partitions, retention and the inbox every
    /// [`UPKEEP_EVERY`] (a minute from now when the start's run failed,
    /// `!upkept`), and reads the gauges every [`STATS_EVERY`], until
    /// `shutdown`. A failed run is logged and tried again at the next tick.
    pub async fn run(self, upkept: bool, shutdown: CancellationToken) {
        self.metrics.set_retention_days(self.retention_days);
        // The start's run (`upkept`) needs no second one; the first tick
        // comes a minute later, off the start's busiest moment (reading
        // the sizes stats every partition's files).
        let mut upkeep_due = Instant::now() + if upkept { UPKEEP_EVERY } else { STATS_EVERY };
        let first = tokio::time::Instant::now() + STATS_EVERY;
        let mut tick = tokio::time::interval_at(first, STATS_EVERY);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if Instant::now() >= upkeep_due {
                match self.upkeep().await {
                    Ok(()) => upkeep_due = Instant::now() + UPKEEP_EVERY,
                    Err(e) => tracing::warn!(error.message = %e, "partition upkeep failed; trying again in a minute"),
                }
            }
            if let Err(e) = self.read_stats().await {
                tracing::debug!(error.message = %e, "reading the stored-rows gauges failed");
            }
        }
    }

    /// One run: today's and the coming days' partitions, retention, the
    /// inbox's generations.
    ///
    /// # Errors
    /// The database error.
    pub async fn upkeep(&self) -> Result<(), sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        let today = Utc::now().date_naive();
        let days: Vec<NaiveDate> = (0..=AHEAD_DAYS).map(|n| today + Days::new(n)).collect();
        make_days(&mut conn, &days).await?;
        if let Some(days) = self.retention_days {
            let dropped = drop_older_than(&mut conn, days, today).await?;
            if !dropped.is_empty() {
                tracing::info!(partitions = ?dropped, retention_days = days, "retention dropped partitions");
            }
            self.metrics.set_retention_run(Utc::now());
        }
        let forgotten = self.inbox.upkeep(&mut conn, today).await?;
        if !forgotten.is_empty() {
            tracing::info!(generations = ?forgotten, "the inbox forgot generations older than its window");
        }
        for (generation, bytes) in self.inbox.seal(&mut conn, Utc::now()).await? {
            tracing::info!(%generation, bytes, "holding the filter of a sealed inbox generation");
        }
        Ok(())
    }

    async fn read_stats(&self) -> Result<(), sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        for stored in stored(&mut conn, Utc::now()).await? {
            self.metrics
                .set_stored(stored.table, stored.rows, stored.bytes, stored.oldest);
        }
        Ok(())
    }
}
