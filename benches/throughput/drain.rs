//! The worker end to end: a pre-filled queue drained by the worker process,
//! timed from its first delivery (the start of its first transaction, read
//! from the inbox) to the moment its metrics count the last message settled
//! (acked after commit, or after its copy to the DLQ was confirmed); then
//! the rows, the queues and the outcomes are checked.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::child::{Counts, WorkerProcess};
use crate::mix::{Expected, Mix};
use crate::support::{fill, passive_len, purge};
use crate::{Bench, Target};

/// How often the bench asks the worker's metrics whether it is done.
const POLL: Duration = Duration::from_millis(5);
/// A drain that settles nothing for this long has stalled.
const STALL: Duration = Duration::from_secs(60);

pub struct Drain {
    pub rate: f64,
    pub peak_rss_mib: f64,
}

/// Empties the tables and every queue of `target`, and the device sink.
pub async fn reset(bench: &Bench, target: &Target) {
    sqlx::query("TRUNCATE event_rows, commands, measurements, beacon_readings, devices, outbox, delivery_attempts")
        .execute(&bench.pool)
        .await
        .unwrap();
    // The inbox's generations, so that a round's ids are new again.
    sqlx::raw_sql(
        "DO $$ DECLARE t text; BEGIN
           FOR t IN SELECT relname FROM pg_class
                     WHERE relkind = 'r' AND relname ~ '^inbox_g[0-9]{8}$' AND pg_table_is_visible(oid) LOOP
             EXECUTE format('TRUNCATE %I', t);
           END LOOP;
         END $$",
    )
    .execute(&bench.pool)
    .await
    .unwrap();
    for queue in target.topology.queues() {
        purge(&bench.publisher, &queue).await;
    }
    purge(&bench.publisher, &bench.sink).await;
}

/// Fills `target`'s queue with `mix`, lets a fresh worker drain it, checks
/// the result and returns the rate.
pub async fn run(bench: &Bench, target: &Target, mix: &Mix, tag: &str) -> Drain {
    reset(bench, target).await;
    fill(&bench.publisher, target.topology.queue(), &mix.bodies).await;
    filled(bench, target, mix.bodies.len() as u64, &mix.expected, tag).await
}

/// Lets a fresh worker drain the `n` messages already in `target`'s queue,
/// checks the result against `expected` and returns the rate.
pub async fn filled(bench: &Bench, target: &Target, n: u64, expected: &Expected, tag: &str) -> Drain {
    let worker = WorkerProcess::start(bench, target, tag).await;
    let (finished, counts) = wait_settled(&worker, n).await;
    let peak_rss_mib = worker.peak_rss_mib();
    let log = worker.log_tail();
    worker.stop().await;
    let started = first_delivery(bench).await;
    if let Err(problem) = check(bench, target, expected, &counts).await {
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
/// wall-clock time of that moment (seconds since the epoch) and the counts.
async fn wait_settled(worker: &WorkerProcess, n: u64) -> (f64, Counts) {
    let mut last = (0, Instant::now());
    loop {
        let counts = worker.counts().await;
        if counts.done() >= n {
            return (epoch_now(), counts);
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

/// When the worker's first transaction began (the same host's clock): a
/// reading without a `time` is dated by its first receipt.
async fn first_delivery(bench: &Bench) -> f64 {
    sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM LEAST((SELECT min(received_at) FROM event_rows),
                                         (SELECT min(received_at) FROM commands),
                                         (SELECT min(measured_at) FROM measurements),
                                         (SELECT min(observed_at) FROM beacon_readings)))::float8",
    )
    .fetch_one(&bench.pool)
    .await
    .expect("the drain left inbox rows")
}

/// The rows, the queues and the settled outcomes against `expected`.
async fn check(bench: &Bench, target: &Target, expected: &Expected, counts: &Counts) -> Result<(), String> {
    let (events, commands, measurements): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM commands), (SELECT count(*) FROM measurements)",
    )
    .fetch_one(&bench.pool)
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
