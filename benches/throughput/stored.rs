//! A database that has been filling for a year (`BENCH_STORED=<readings>`):
//! each round's clean mix is also drained into it, beside the drain into
//! the bench's empty database, and the report gives the ratio.
//!
//! The database `wic_stored_<readings>` is filled once and kept for
//! later runs (drop it by hand; its name is not `wic_bench_*`, which CI
//! removes as the leftovers of interrupted runs). It is filled the way the worker fills one:
//! readings dated over the 365 days before today, inserted through
//! `measurements` in time order, one day per statement, with random UUID
//! message ids and 10,000 devices, so every index grows by inserts; the
//! ids of the 30 days the inbox still remembers (the default window) go
//! into each day's generation in the same order.
//! Then `VACUUM (ANALYZE)`, as autovacuum would have done by then, and a
//! checkpoint. Drains add today's rows, which are emptied (their day's
//! partitions and inbox generation truncated) before the next one.

use std::sync::Arc;

use chrono::{Days, NaiveDate, Utc};
use sqlx::PgPool;
use tokio::sync::Mutex;
use worker_iot_core::store;

use crate::Bench;
use crate::drain::{Db, Schema};
use crate::support::env_or;

/// How many days the fill spreads its readings over.
const DAYS: u64 = 365;
/// The inbox window the fill assumes (the default `INBOX_WINDOW_DAYS`).
const WINDOW: u64 = 30;

pub struct Stored {
    pub url: String,
    pub pool: PgPool,
    /// When the fill ended (seconds since the epoch).
    pub since: f64,
}

impl Stored {
    pub fn db(&self) -> Db<'_> {
        Db {
            url: &self.url,
            pool: &self.pool,
            since: self.since,
            schema: Schema::Own,
        }
    }
}

/// The stored database of `BENCH_STORED` readings, filled unless it already
/// is; `None` when `BENCH_STORED` is unset.
pub async fn open(bench: &Bench) -> Option<Stored> {
    let readings: i64 = match env_or("BENCH_STORED", "").trim() {
        "" => return None,
        n => n.parse().expect("BENCH_STORED: a number of readings"),
    };
    let name = format!("wic_stored_{readings}");
    let url = format!("{}/{name}", &bench.server_url[..bench.server_url.rfind('/').unwrap()]);
    store::create_database(&url).await.unwrap();
    let pool = store::connect(&url, 3).await.unwrap();
    store::migrate(&pool).await.unwrap();
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_fill (readings bigint NOT NULL, filled_at timestamptz NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let done: Option<f64> =
        sqlx::query_scalar("SELECT EXTRACT(EPOCH FROM filled_at)::float8 FROM bench_fill WHERE readings = $1")
            .bind(readings)
            .fetch_optional(&pool)
            .await
            .unwrap();
    let since = match done {
        Some(since) => since,
        None => fill(&pool, readings).await,
    };
    let stored = Stored { url, pool, since };
    describe(&stored).await;
    Some(stored)
}

/// Fills `pool`'s database with `readings` readings (as many as fill whole
/// days); returns when it ended.
async fn fill(pool: &PgPool, readings: i64) -> f64 {
    let today = Utc::now().date_naive();
    let per_day = readings / DAYS as i64;
    println!("stored: filling {readings} readings, {per_day} a day over {DAYS} days (once; kept for later runs)");
    let started = std::time::Instant::now();
    let remembered_since = today - Days::new(WINDOW);
    let days: Vec<NaiveDate> = (1..=DAYS).rev().map(|ago| today - Days::new(ago)).collect();
    // Two connections, each taking the next day: both cores busy, every
    // partition filled in time order.
    let queue = Arc::new(Mutex::new(days.into_iter()));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (queue, pool) = (queue.clone(), pool.clone());
            tokio::spawn(async move {
                loop {
                    let Some(day) = queue.lock().await.next() else { break };
                    fill_day(&pool, day, per_day, day >= remembered_since).await;
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    println!(
        "stored: inserted in {:.0} s; VACUUM (ANALYZE) and CHECKPOINT",
        started.elapsed().as_secs_f64()
    );
    // One statement each: VACUUM cannot run in a transaction block. On one
    // connection, whose statements may take longer than the pool's 10 s.
    let mut conn = pool.acquire().await.unwrap();
    for statement in ["SET statement_timeout = 0", "VACUUM (ANALYZE)", "CHECKPOINT"] {
        sqlx::raw_sql(statement).execute(&mut *conn).await.unwrap();
    }
    sqlx::query_scalar(
        "INSERT INTO bench_fill (readings, filled_at) VALUES ($1, now()) RETURNING EXTRACT(EPOCH FROM filled_at)::float8",
    )
    .bind(readings)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// One day of readings, in time order, and their ids into that day's
/// generation of the inbox when `remembered`.
async fn fill_day(pool: &PgPool, day: NaiveDate, per_day: i64, remembered: bool) {
    let step_us = 86_400_000_000 / per_day;
    // Its own statement: attaching locks `measurements` against another
    // attach until the statement's transaction ends.
    sqlx::query("SELECT day_partition('measurements', $1)")
        .bind(day)
        .execute(pool)
        .await
        .unwrap();
    let mut sql = format!(
        "INSERT INTO measurements (message_id, device_id, sensor, value, unit, measured_at)
         SELECT gen_random_uuid()::text, 'fleet-' || (random() * 9999)::int, 't',
                round((random() * 40)::numeric, 2), 'C',
                timestamptz '{day} 00:00:00+00' + g * interval '{step_us} microseconds'
           FROM generate_series(0, {per_day} - 1) g;"
    );
    if remembered {
        sql.push_str(&format!(
            "SELECT inbox_generation('{day}');
             INSERT INTO inbox_g{day_name} (id)
             SELECT encode(substring(sha256(convert_to(message_id, 'UTF8')) FROM 1 FOR 16), 'hex')::uuid
               FROM measurements_p{day_name} ON CONFLICT DO NOTHING;",
            day_name = day.format("%Y%m%d"),
        ));
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(pool).await.unwrap();
}

/// Prints what the stored database holds, and its bytes per reading.
async fn describe(stored: &Stored) {
    let (rows, reading_bytes, inbox_ids, inbox_bytes): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT sum(c.reltuples)::bigint FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                  WHERE i.inhparent = 'measurements'::regclass),
                (SELECT sum(pg_total_relation_size(inhrelid))::bigint FROM pg_inherits
                  WHERE inhparent = 'measurements'::regclass),
                (SELECT sum(c.reltuples)::bigint FROM pg_class c
                  WHERE c.relkind = 'r' AND c.relname ~ '^inbox_g[0-9]{8}$'),
                (SELECT sum(pg_total_relation_size(c.oid))::bigint FROM pg_class c
                  WHERE c.relkind = 'r' AND c.relname ~ '^inbox_g[0-9]{8}$')",
    )
    .fetch_one(&stored.pool)
    .await
    .unwrap();
    println!(
        "stored: {rows} readings in {:.1} GB of measurements ({:.0} bytes a reading, indexes included); \
         inbox: {inbox_ids} ids in {:.2} GB ({:.0} bytes an id)",
        reading_bytes as f64 / 1e9,
        reading_bytes as f64 / rows as f64,
        inbox_bytes as f64 / 1e9,
        inbox_bytes as f64 / inbox_ids.max(1) as f64,
    );
}
