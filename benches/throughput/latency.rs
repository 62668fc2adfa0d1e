//! Latency at low load: sample messages published at a steady
//! `BENCH_LATENCY_RATE` per second (default 100) for `BENCH_LATENCY_SECONDS`
//! (default 10) after one second of warm-up, to a running worker.
//!
//! What is measured, per message, on the bench's monotonic clock: from just
//! before its `basic.publish` to the moment the bench receives a PostgreSQL
//! notification that its inbox row (`events` or `commands`) is committed.
//! A trigger, added to the bench database for this section only, sends
//! `pg_notify` with the message id on insert; PostgreSQL delivers it when
//! the inserting transaction commits. So the figure is delivery → commit
//! plus the publish and routing before it and the notification after it:
//! an upper bound of delivery → commit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;
use worker_iot_core::cli::samples;

use crate::child::WorkerProcess;
use crate::support::{env_number, percentile, properties};
use crate::{Bench, Target};

const CHANNEL: &str = "wic_bench_commit";

type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

/// p50 and p99 in milliseconds.
pub async fn measure(bench: &Bench, target: &Target, round: usize) -> (f64, f64) {
    let rate: u64 = env_number("BENCH_LATENCY_RATE", "100");
    let seconds: u64 = env_number("BENCH_LATENCY_SECONDS", "10");
    crate::drain::reset(bench, target).await;
    sqlx::raw_sql(
        "CREATE OR REPLACE FUNCTION bench_commit_notify() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_notify('wic_bench_commit', NEW.message_id); RETURN NULL; END $$;
         CREATE TRIGGER bench_commit_notify AFTER INSERT ON measurements
             FOR EACH ROW EXECUTE FUNCTION bench_commit_notify();
         CREATE TRIGGER bench_commit_notify AFTER INSERT ON beacon_readings
             FOR EACH ROW EXECUTE FUNCTION bench_commit_notify();
         CREATE TRIGGER bench_commit_notify AFTER INSERT ON event_rows
             FOR EACH ROW EXECUTE FUNCTION bench_commit_notify();
         CREATE TRIGGER bench_commit_notify AFTER INSERT ON commands
             FOR EACH ROW EXECUTE FUNCTION bench_commit_notify();",
    )
    .execute(&bench.pool)
    .await
    .unwrap();
    let arrivals = Arrivals::default();
    let stop = CancellationToken::new();
    let listening = listen(bench, arrivals.clone(), stop.clone()).await;
    let worker = WorkerProcess::start(bench, target, &format!("latency-{round}")).await;
    let sent = publish_steady(bench, target, rate, seconds, round).await;
    wait_arrived(&arrivals, &sent, &worker).await;
    worker.stop().await;
    stop.cancel();
    listening.await.unwrap();
    sqlx::raw_sql(
        "DROP TRIGGER bench_commit_notify ON measurements; DROP TRIGGER bench_commit_notify ON beacon_readings;
         DROP TRIGGER bench_commit_notify ON event_rows; DROP TRIGGER bench_commit_notify ON commands;",
    )
    .execute(&bench.pool)
    .await
    .unwrap();
    let arrivals = arrivals.lock().unwrap();
    let ms: Vec<f64> = sent
        .iter()
        .map(|(id, at)| (arrivals[id] - *at).as_secs_f64() * 1000.0)
        .collect();
    (percentile(&ms, 0.5), percentile(&ms, 0.99))
}

/// Records when each commit notification arrives, until `stop`.
async fn listen(bench: &Bench, arrivals: Arrivals, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    let mut listener = PgListener::connect(&bench.database_url).await.unwrap();
    listener.listen(CHANNEL).await.unwrap();
    tokio::spawn(async move {
        loop {
            let notification = tokio::select! {
                () = stop.cancelled() => return,
                n = listener.recv() => n.expect("the notification connection"),
            };
            let at = Instant::now();
            arrivals.lock().unwrap().insert(notification.payload().to_owned(), at);
        }
    })
}

/// Publishes a second of warm-up and then `seconds` of sample messages at
/// `rate` per second. Returns the measured ones: id and publish instant.
async fn publish_steady(
    bench: &Bench,
    target: &Target,
    rate: u64,
    seconds: u64,
    round: usize,
) -> Vec<(String, Instant)> {
    let warm_up = rate as usize;
    let total = warm_up + (rate * seconds) as usize;
    let seed = 1_000_000 + round as u64;
    let bodies = samples::mix(total, seed);
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    let mut sent = Vec::with_capacity(total);
    let mut confirms = Vec::with_capacity(total);
    for (i, body) in bodies.iter().enumerate() {
        tick.tick().await;
        let at = Instant::now();
        // Each publish waits for its own confirm, off the pace of the ticks.
        let (publisher, queue, body_owned) = (
            bench.publisher.clone(),
            target.topology.queue().to_owned(),
            body.clone(),
        );
        confirms.push(tokio::spawn(async move {
            publisher.publish("", &queue, &body_owned, properties()).await
        }));
        if i >= warm_up {
            let value: serde_json::Value = serde_json::from_slice(body).expect("sample bodies are JSON");
            sent.push((value["id"].as_str().expect("an id").to_owned(), at));
        }
    }
    for confirm in confirms {
        confirm.await.expect("publish task").expect("confirm");
    }
    sent
}

async fn wait_arrived(arrivals: &Arrivals, sent: &[(String, Instant)], worker: &WorkerProcess) {
    let started = Instant::now();
    loop {
        let missing = {
            let arrivals = arrivals.lock().unwrap();
            sent.iter().filter(|(id, _)| !arrivals.contains_key(id)).count()
        };
        if missing == 0 {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{missing} latency messages were not committed within 30 s:\n{}",
            worker.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
