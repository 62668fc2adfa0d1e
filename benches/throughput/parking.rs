//! The parking lot (`BENCH_PARKING=on`, or `BENCH_ONLY=parking` for this
//! section alone): how fast the keeper moves parked messages from `Q.dlq`
//! into `parked_messages`, and how long `requeue --list` takes over a large
//! lot.
//!
//! 1. `BENCH_PARKED` (default 20,000) parked copies, as the worker writes
//!    them (distinct ids, 20 fingerprints), are published to `Q.dlq`; the
//!    keeper ([`Keeper`], the worker's own) starts and the time runs until
//!    every row is in the lot and `Q.dlq` is empty.
//! 2. `BENCH_LOT_ROWS` (default 100,000) rows are inserted straight into the
//!    lot (50 fingerprints, 200-byte bodies, the headers a parked copy
//!    has); then the `requeue --list` binary runs over them, timed from
//!    its start to its exit, and `--list --type DEVICE_UP --grep d-1`, the
//!    slowest filter (a text search of every row).
//!
//! Each figure is the median of `BENCH_ROUNDS` rounds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use tokio_util::sync::CancellationToken;
use worker_iot_core::broker::Outgoing;
use worker_iot_core::headers::{self, FailureRecord};
use worker_iot_core::parking::Keeper;
use worker_iot_core::{ErrorKind, Metrics};

use crate::support::{env_number, median};
use crate::{Bench, Target};

const REQUEUE: &str = env!("CARGO_BIN_EXE_requeue");
/// Publishes are confirmed in windows of this many.
const WINDOW: usize = 500;

/// Runs the section on `target`'s queue and prints its figures.
pub async fn bench(bench: &Bench, target: &Target) {
    let parked: usize = env_number("BENCH_PARKED", "20000");
    let lot_rows: i64 = env_number("BENCH_LOT_ROWS", "100000");
    let queue = target.topology.queue();
    std::fs::write(bench.dir.join("none.json"), "{}").unwrap();
    let (mut rates, mut lists, mut greps) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..bench.rounds {
        clear(bench).await;
        let rate = keeper_rate(bench, queue, parked).await;
        clear(bench).await;
        fill_lot(bench, queue, lot_rows).await;
        let list = time_requeue(bench, queue, &["--list"]);
        let grep = time_requeue(bench, queue, &["--list", "--type", "DEVICE_UP", "--grep", "d-1"]);
        println!(
            "parking round {}: keeper {rate:.0} msg/s; --list over {lot_rows} rows {:.0} ms; filtered {:.0} ms",
            round + 1,
            list * 1e3,
            grep * 1e3
        );
        rates.push(rate);
        lists.push(list);
        greps.push(grep);
    }
    clear(bench).await;
    println!(
        "\n| the parking lot, median of {} | {} |\n|---|---|",
        bench.rounds, target.queue_type
    );
    println!(
        "| keeper: {parked} parked messages, Q.dlq → lot (msg/s) | {:.0} |",
        median(&rates)
    );
    println!(
        "| `requeue --list` over {lot_rows} parked rows (ms) | {:.0} |",
        median(&lists) * 1e3
    );
    println!(
        "| `requeue --list --type DEVICE_UP --grep d-1` over {lot_rows} rows (ms) | {:.0} |",
        median(&greps) * 1e3
    );
}

async fn clear(bench: &Bench) {
    sqlx::query("TRUNCATE parked_messages, operator_actions, operator_action_messages")
        .execute(&bench.pool)
        .await
        .unwrap();
}

/// A parked copy of measurement `i`, as the worker writes it.
fn parked_copy(i: usize) -> (Vec<u8>, BasicProperties) {
    let body = format!(
        r#"{{"type":"MEASUREMENT","id":"p-{i}","data":{{"device_id":"d-{}","sensor":"t","value":"x{i}"}}}}"#,
        i % 97
    );
    let error = format!("data.value must be a finite number, found \"x{i}\" (case {})", i % 20);
    let record = FailureRecord {
        kind: ErrorKind::Validation,
        message_type: Some("MEASUREMENT"),
        error: &error,
        retry_count: 0,
        now_ms: 1_790_000_000_000,
        received_ms: 1_790_000_000_000,
        exchange: "",
        routing_key: "q",
        failed_by: "bench/0",
    };
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id(format!("p-{i}").into());
    (body.into_bytes(), headers::with_failure(&properties, &record))
}

/// Publishes `n` parked copies to `Q.dlq`, runs the keeper until every one
/// is a row, and returns messages per second.
async fn keeper_rate(bench: &Bench, queue: &str, n: usize) -> f64 {
    let dlq = format!("{queue}.dlq");
    let copies: Vec<(Vec<u8>, BasicProperties)> = (0..n).map(parked_copy).collect();
    for window in copies.chunks(WINDOW) {
        let messages: Vec<Outgoing<'_>> = window
            .iter()
            .map(|(body, properties)| Outgoing {
                exchange: "",
                routing_key: &dlq,
                body,
                properties: properties.clone(),
            })
            .collect();
        for result in bench.publisher.publish_all(&messages).await {
            result.expect("publish a parked copy");
        }
    }
    let stop = CancellationToken::new();
    let keeper = Keeper {
        pool: bench.pool.clone(),
        amqp_url: bench.amqp_url.clone(),
        queue: queue.to_owned(),
        retention: Duration::from_secs(30 * 86_400),
        metrics: Arc::new(Metrics::new()),
    };
    let started = Instant::now();
    let task = tokio::spawn(keeper.run(stop.clone()));
    loop {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM parked_messages")
            .fetch_one(&bench.pool)
            .await
            .unwrap();
        if rows == n as i64 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the keeper stored {rows} of {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    stop.cancel();
    task.await.unwrap();
    n as f64 / elapsed
}

/// Inserts `rows` parked rows straight into the lot.
async fn fill_lot(bench: &Bench, queue: &str, rows: i64) {
    let (_, sample) = parked_copy(0);
    let properties = worker_iot_core::parking::record::encode_properties(&sample);
    sqlx::query(
        "INSERT INTO parked_messages (queue, message_id, message_type, error_kind, error, fingerprint,
                                      headers, body, properties, amqp_properties, failed_at)
         SELECT $1, 'lot-' || i, CASE WHEN i % 3 = 0 THEN 'DEVICE_UP' ELSE 'MEASUREMENT' END,
                'validation', 'data.value must be a finite number, found \"x' || i || '\"',
                lpad(to_hex(i % 50), 16, '0'),
                jsonb_build_object('iot-error-kind', 'validation', 'iot-retry-count', 0,
                                   'iot-error', 'data.value must be a finite number', 'traceparent',
                                   '00-' || md5(i::text) || md5(i::text) || '-01'),
                convert_to(rpad('{\"type\":\"MEASUREMENT\",\"id\":\"lot-' || i || '\",\"data\":{\"device_id\":\"d-' || (i % 97) || '\"}}', 200), 'UTF8'),
                '{\"content_type\":\"application/json\"}', $2, now()
         FROM generate_series(1, $3) AS i",
    )
    .bind(queue)
    .bind(properties)
    .bind(rows)
    .execute(&bench.pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE parked_messages")
        .execute(&bench.pool)
        .await
        .unwrap();
}

/// Seconds `requeue --queue Q ARGS` takes, start to exit (connecting to the
/// broker and the database included).
fn time_requeue(bench: &Bench, queue: &str, args: &[&str]) -> f64 {
    let started = Instant::now();
    let out = std::process::Command::new(REQUEUE)
        .args(["--queue", queue])
        .args(args)
        .env_clear()
        .env("AMQP_URL", &bench.amqp_url)
        .env("DATABASE_URL", &bench.database_url)
        .env("SETTINGS_FILE", bench.dir.join("none.json"))
        .current_dir(&bench.dir)
        .output()
        .expect("run requeue");
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "requeue: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    elapsed
}
