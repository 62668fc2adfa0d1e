//! The worker end to end: a pre-filled queue drained by the worker process,
//! timed from its first delivery (the first poll of its metrics that sees
//! a delivery in flight) to the moment its metrics count the last message settled
//! (acked after commit, or after its copy to the DLQ was confirmed); then
//! the rows, the queues and the outcomes are checked.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::child::{Counts, WorkerProcess};
use crate::mix::{Expected, Mix};
use crate::support::{fill, passive_len, purge};
use crate::{Bench, Target};

/// The database a drain writes into: the bench's own, emptied before each
/// drain, or one that keeps what was stored before `since` ([`crate::stored`]).
pub struct Db<'a> {
    pub url: &'a str,
    pub pool: &'a sqlx::PgPool,
    /// Seconds since the epoch: every row from before is kept and left out
    /// of the checks; 0 for the bench's own database.
    pub since: f64,
    /// Whose tables these are, which says how a drain's rows are removed.
    pub schema: Schema,
}

/// The schema of a [`Db`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    /// This build's.
    Own,
    /// The baseline worker's ([`crate::baseline::Baseline`]), whatever it is:
    /// every table is emptied but the migrations' record.
    Baseline,
}

impl<'a> Db<'a> {
    pub fn empty(bench: &'a Bench) -> Db<'a> {
        Db {
            url: &bench.database_url,
            pool: &bench.pool,
            since: 0.0,
            schema: Schema::Own,
        }
    }
}

/// How often the bench asks the worker's metrics whether it is done.
const POLL: Duration = Duration::from_millis(5);
/// A drain that settles nothing for this long has stalled.
const STALL: Duration = Duration::from_secs(60);

pub struct Drain {
    pub rate: f64,
    pub peak_rss_mib: f64,
}

/// Empties the bench's own database, the inbox's generations included, so
/// that a round's ids are new again.
const EMPTY: &str = "
    TRUNCATE event_rows, commands, measurements, beacon_readings, devices, outbox, delivery_attempts;
    DO $$ DECLARE t text; BEGIN
      FOR t IN SELECT relname FROM pg_class
                WHERE relkind = 'r' AND relname ~ '^inbox_g[0-9]{8}$' AND pg_table_is_visible(oid) LOOP
        EXECUTE format('TRUNCATE %I', t);
      END LOOP;
    END $$";

/// Empties every table of a schema this build does not know (the baseline
/// worker's), in one statement so foreign keys do not stand in the way.
const EMPTY_ANY: &str = "
    DO $$ DECLARE tables text; BEGIN
      SELECT string_agg(format('%I', relname), ', ') INTO tables FROM pg_class
       WHERE relkind IN ('r', 'p') AND NOT relispartition AND pg_table_is_visible(oid)
         AND relnamespace = 'public'::regnamespace AND relname <> '_sqlx_migrations';
      IF tables IS NOT NULL THEN EXECUTE 'TRUNCATE ' || tables; END IF;
    END $$";

/// Removes what drains wrote into a stored database, from `{since}` (epoch
/// seconds) on. The fill dated every row before the day it ended, and a
/// drain dates its messages now, so the day partitions and inbox
/// generations from that day on, and `commands`, hold only drains' rows:
/// they are emptied the way the bench's own database is, with `TRUNCATE`.
/// (Deleting row by row left today's partition bloated with dead rows,
/// which only the stored side paid for.)
const KEEP_STORED: &str = "
    DO $$ DECLARE t text; BEGIN
      FOR t IN SELECT relname FROM pg_class
                WHERE relkind = 'r' AND pg_table_is_visible(oid)
                  AND relname ~ '^(measurements_p|beacon_readings_p|event_rows_p|inbox_g)[0-9]{8}$'
                  AND to_date(right(relname, 8), 'YYYYMMDD') >= (to_timestamp({since}) AT TIME ZONE 'UTC')::date LOOP
        EXECUTE format('TRUNCATE %I', t);
      END LOOP;
    END $$;
    TRUNCATE commands, devices, outbox, delivery_attempts";

/// Empties the tables and every queue of `target`, and the device sink.
pub async fn reset(bench: &Bench, target: &Target) {
    reset_on(bench, &Db::empty(bench), target).await;
}

/// Removes what drains wrote into `db` (everything from `db.since` on, and
/// those messages' ids from the inbox) and empties the queues.
async fn reset_on(bench: &Bench, db: &Db<'_>, target: &Target) {
    let sql = match db.schema {
        Schema::Baseline => EMPTY_ANY.to_owned(),
        Schema::Own if db.since == 0.0 => EMPTY.to_owned(),
        Schema::Own => KEEP_STORED.replace("{since}", &db.since.to_string()),
    };
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(db.pool).await.unwrap();
    for queue in target.topology.queues() {
        purge(&bench.publisher, &queue).await;
    }
    purge(&bench.publisher, &bench.sink).await;
}

/// Fills `target`'s queue with `mix`, lets a fresh worker drain it, checks
/// the result and returns the rate.
pub async fn run(bench: &Bench, target: &Target, mix: &Mix, tag: &str) -> Drain {
    run_on(bench, &Db::empty(bench), target, mix, tag).await
}

/// [`run`] into `db`.
pub async fn run_on(bench: &Bench, db: &Db<'_>, target: &Target, mix: &Mix, tag: &str) -> Drain {
    reset_on(bench, db, target).await;
    fill(&bench.publisher, target.topology.queue(), &mix.bodies).await;
    filled_on(bench, db, target, mix.bodies.len() as u64, &mix.expected, tag).await
}

/// Lets a fresh worker drain the `n` messages already in `target`'s queue,
/// checks the result against `expected` and returns the rate.
pub async fn filled(bench: &Bench, target: &Target, n: u64, expected: &Expected, tag: &str) -> Drain {
    filled_on(bench, &Db::empty(bench), target, n, expected, tag).await
}

async fn filled_on(bench: &Bench, db: &Db<'_>, target: &Target, n: u64, expected: &Expected, tag: &str) -> Drain {
    let worker = WorkerProcess::start_on(bench, db.url, target, tag).await;
    let (started, finished, counts) = wait_settled(&worker, n).await;
    let peak_rss_mib = worker.peak_rss_mib();
    let log = worker.log_tail();
    worker.stop().await;
    if let Err(problem) = check(bench, db, target, expected, &counts).await {
        panic!(
            "{} {tag} drain is wrong: {problem}\nworker log:\n{log}",
            target.queue_type
        );
    }
    Drain {
        rate: n as f64 / (finished - started),
        peak_rss_mib,
    }
}

/// Polls the worker until `n` deliveries are settled for good. Returns the
/// wall-clock times (seconds since the epoch) of the first poll that saw a
/// delivery in flight or settled, and of the one that saw them all
/// settled, and the counts. A poll is [`POLL`] apart: a reading's row
/// keeps its message's `time`, not its receipt, so the rows cannot date
/// the first delivery.
async fn wait_settled(worker: &WorkerProcess, n: u64) -> (f64, f64, Counts) {
    let mut started = None;
    let mut last = (0, Instant::now());
    loop {
        let counts = worker.counts().await;
        if started.is_none() && (counts.in_flight > 0 || counts.done() > 0) {
            started = Some(epoch_now());
        }
        if counts.done() >= n {
            return (started.unwrap_or_else(epoch_now), epoch_now(), counts);
        }
        if counts.done() != last.0 {
            last = (counts.done(), Instant::now());
        }
        assert!(
            last.1.elapsed() < STALL,
            "the worker stalled at {counts:?} of {n}:\n{}",
            worker.log_tail()
        );
        tokio::time::sleep(POLL).await;
    }
}

fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs_f64()
}

/// The rows, the queues and the settled outcomes against `expected`.
async fn check(
    bench: &Bench,
    db: &Db<'_>,
    target: &Target,
    expected: &Expected,
    counts: &Counts,
) -> Result<(), String> {
    let (events, commands, measurements): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM events WHERE occurred_at >= to_timestamp($1)),
                (SELECT count(*) FROM commands WHERE received_at >= to_timestamp($1)),
                (SELECT count(*) FROM measurements WHERE measured_at >= to_timestamp($1))",
    )
    .bind(db.since)
    .fetch_one(db.pool)
    .await
    .unwrap();
    let mut problems = Vec::new();
    let rows = [
        ("events rows", events, expected.events),
        ("commands rows", commands, expected.commands),
        ("measurements rows", measurements, expected.measurements),
    ];
    let settled = [
        ("processed", counts.processed, expected.processed()),
        ("duplicates", counts.duplicate, expected.duplicates),
        ("parked", counts.parked, expected.parked),
        ("omitted", counts.omitted, 0),
    ];
    for (what, got, want) in rows {
        if got != want {
            problems.push(format!("{what}: {got}, expected {want}"));
        }
    }
    for (what, got, want) in settled {
        if got != want {
            problems.push(format!("{what}: {got}, expected {want}"));
        }
    }
    // A transient-once message retried in process (its batch rolled back,
    // then it ran alone) needs no delayed retry: the planned count is an
    // upper bound. Its rows are checked above either way.
    if counts.retried > expected.retried {
        println!(
            "  note: {} retries, {} planned (other transient failures)",
            counts.retried, expected.retried
        );
    }
    problems.extend(check_queues(bench, target, expected).await);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// `Q` and the retry queues empty, the DLQ holding exactly the parked.
async fn check_queues(bench: &Bench, target: &Target, expected: &Expected) -> Vec<String> {
    let dlq = target.topology.dlq();
    let mut problems = Vec::new();
    for queue in target.topology.queues() {
        let want = if queue == dlq { expected.parked as u32 } else { 0 };
        let got = passive_len(&bench.publisher, &queue).await;
        if got != want {
            problems.push(format!("{queue} holds {got} messages, expected {want}"));
        }
    }
    problems
}
