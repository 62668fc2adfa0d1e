//! Micro-batching against the real broker and database: several first
//! deliveries share one transaction, and each still ends as docs/reliability.md, "Outcomes", says.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::messages::{body, flaky, invalid_measurement, measurement, slow};
use crate::common::observe::{QueueCounts, queue_counts, rabbitmqctl_available};
use crate::common::{RunningWorker, TestEnv, TopologyFile, wait_for};
use lapin::BasicProperties;
use serde_json::json;
use worker_iot_core::ErrorKind;
use worker_iot_core::headers::{self, ERROR_KIND};

const WAIT: Duration = Duration::from_secs(60);

/// Starts a worker on a slow message (0.5 s in its transaction), then
/// publishes `bodies` while it runs: they arrive together and wait (up to
/// `BATCH_MAX_WAIT_MS`, 1 s) for it, then go as one batch.
async fn start_behind_a_slow_one(env: &TestEnv, bodies: &[Vec<u8>]) -> RunningWorker {
    start_behind_a_slow_one_for(env, bodies, 0.5, &[]).await
}

/// [`start_behind_a_slow_one`], with the slow one taking `seconds` and
/// more settings for the worker.
async fn start_behind_a_slow_one_for(
    env: &TestEnv,
    bodies: &[Vec<u8>],
    seconds: f64,
    more: &[(&str, &str)],
) -> RunningWorker {
    env.publish(&slow("slow", seconds), BasicProperties::default()).await;
    let received = Arc::new(AtomicUsize::new(0));
    let seen = received.clone();
    let hook = crate::common::on_received(move |_| {
        seen.fetch_add(1, Ordering::SeqCst);
    });
    let settings = env.settings(&[&[("BATCH_MAX_SIZE", "50"), ("BATCH_MAX_WAIT_MS", "1000")], more].concat());
    let worker = env.spawn_worker_with(settings, Some(hook));
    wait_for("the slow message taken", WAIT, || async {
        (received.load(Ordering::SeqCst) >= 1).then_some(())
    })
    .await;
    for b in bodies {
        env.publish(b, BasicProperties::default()).await;
    }
    worker
}

/// The transaction of each event's row (`xmin`: the id of the transaction
/// that wrote it), in `measurements` for a reading, else in `event_rows`.
async fn transactions(env: &TestEnv, ids: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for id in ids {
        let started: String = sqlx::query_scalar(
            "SELECT xmin::text FROM measurements WHERE message_id = $1
             UNION ALL SELECT xmin::text FROM event_rows WHERE message_id = $1",
        )
        .bind(id)
        .fetch_one(&env.pool)
        .await
        .unwrap_or_else(|e| panic!("event {id}: {e}"));
        out.push(started);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_poison_a_duplicate_and_a_transient_failure_settles_each_message() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let mates = [
        measurement("m-1", 1),
        invalid_measurement("poison"),
        measurement("m-1", 1),
        flaky("flaky", 1),
        measurement("m-2", 1),
        b"not json".to_vec(),
        measurement("m-3", 1),
    ];
    let worker = start_behind_a_slow_one(&env, &mates).await;
    env.wait_for_rows("events", 5, WAIT).await;
    env.wait_for_queue_len(&env.dlq(), 2, WAIT).await;
    env.wait_for_queue_len(&env.queue, 0, WAIT).await;
    let metrics = worker.metrics.clone();
    worker.stop().await;

    // The transient failure of TEST_FLAKY's write failed the batch's
    // transaction, as a deadlock would fail production's: it was rolled
    // back, and its messages went again in halves (costing none of them an
    // attempt), so they committed in more than one transaction.
    let mut runs = transactions(&env, &["m-1", "m-2", "m-3", "flaky"]).await;
    runs.sort();
    runs.dedup();
    assert!(
        runs.len() >= 2,
        "the batch rolled back and went again in halves: {runs:?}"
    );
    let run: f64 = sqlx::query_scalar("SELECT value FROM measurements WHERE message_id = 'flaky'")
        .fetch_one(&env.pool)
        .await
        .expect("flaky applied");
    assert_eq!(run, 2.0, "applied on its second run, in process");

    assert_eq!(env.count("events").await, 5, "slow, m-1, m-2, m-3, flaky: each once");
    assert_eq!(env.count("measurements").await, 5);
    assert_eq!(metrics.processed(), 5);
    assert_eq!(metrics.duplicates(), 1, "the second m-1");
    assert_eq!(metrics.retried(), 0, "no delayed retry was needed");
    assert_eq!(metrics.parked(ErrorKind::Validation), 1);
    assert_eq!(metrics.parked(ErrorKind::Decode), 1);
    let mut kinds: Vec<String> = env
        .drain(&env.dlq())
        .await
        .iter()
        .filter_map(|m| headers::read_string(m.delivery.properties.headers().as_ref(), ERROR_KIND))
        .collect();
    kinds.sort();
    assert_eq!(kinds, ["decode", "validation"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_batch_parks_that_message_and_applies_the_others_once() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let mates = [
        measurement("m-1", 1),
        body(json!({"type": "TEST_PANIC", "id": "boom", "data": {}})),
        measurement("m-2", 1),
    ];
    let worker = start_behind_a_slow_one(&env, &mates).await;
    env.wait_for_rows("events", 3, WAIT).await;
    env.wait_for_queue_len(&env.dlq(), 1, WAIT).await;
    env.wait_for_queue_len(&env.queue, 0, WAIT).await;
    let metrics = worker.metrics.clone();
    worker.stop().await;

    assert_eq!(env.count("measurements").await, 3, "slow, m-1, m-2: each once");
    assert_eq!(metrics.processed(), 3);
    assert_eq!(metrics.parked(ErrorKind::Panic), 1);
    let parked = env.drain(&env.dlq()).await;
    let kind = headers::read_string(parked[0].delivery.properties.headers().as_ref(), ERROR_KIND);
    assert_eq!(kind.as_deref(), Some("panic"));
}

/// Settled deliveries above an unsettled one wait for it only briefly, so
/// that one `multiple` ack covers them all (src/acks.rs): a slow message
/// does not hold the acks of those after it. With a prefetch of 256 the
/// 200 below fit the hold (240), so only its time limit releases their
/// acks while the slow one still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_message_holds_the_acks_of_those_after_it_only_briefly() {
    if !rabbitmqctl_available("a_slow_message_holds_the_acks_of_those_after_it_only_briefly") {
        return;
    }
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let bodies: Vec<Vec<u8>> = (0..200).map(|i| measurement(&format!("m-{i}"), i)).collect();
    // 8 s: within the database deadline (12 s), so it runs once.
    let more = [("RABBITMQ_PREFETCH_COUNT", "256")];
    let worker = start_behind_a_slow_one_for(&env, &bodies, 8.0, &more).await;
    let counts = wait_for(
        "every delivery acked but the slow one",
        Duration::from_secs(6),
        || async {
            let counts = queue_counts(&env.queue).await?;
            (counts == QueueCounts { ready: 0, unacked: 1 }).then_some(counts)
        },
    )
    .await;
    assert_eq!(env.count("measurements").await, 200, "{counts:?}");
    let slow_done: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE message_id = 'slow'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(slow_done, 0, "the slow one still runs");
    worker.stop().await;
}

/// `devices` after one batch of `DEVICE_UP`/`DEVICE_DOWN`
/// (docs/reliability.md, "Device state"): newest by time wins, the later in
/// the batch on a tie, the newest ip among events not older than the stored
/// row, and a newer stored row is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_device_events_ends_where_time_order_would() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    sqlx::query(
        "INSERT INTO devices (device_id, status, ip, last_seen_at)
         VALUES ('d3', 'online', '10.0.0.3', '2026-01-01T00:01:40Z'),
                ('d4', 'online', '10.0.0.4', '2026-01-01T00:00:10Z')",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let event = |id: &str, kind: &str, seconds: u32, data: serde_json::Value| {
        body(json!({"type": kind, "id": id, "time": format!("2026-01-01T00:00:{seconds:02}Z"), "data": data}))
    };
    let mates = [
        event("a", "DEVICE_UP", 10, json!({"device_id": "d1", "ip": "10.1.0.1"})),
        event("b", "DEVICE_DOWN", 20, json!({"device_id": "d1"})),
        event("c", "DEVICE_UP", 5, json!({"device_id": "d1", "ip": "10.1.0.2"})),
        event("d", "DEVICE_UP", 7, json!({"device_id": "d2", "ip": "10.2.0.1"})),
        event("e", "DEVICE_DOWN", 7, json!({"device_id": "d2"})),
        event("f", "DEVICE_DOWN", 50, json!({"device_id": "d3"})),
        event("g", "DEVICE_UP", 5, json!({"device_id": "d4", "ip": "10.4.0.9"})),
        event("h", "DEVICE_UP", 30, json!({"device_id": "d4"})),
    ];
    let worker = start_behind_a_slow_one(&env, &mates).await;
    env.wait_for_rows("events", 9, WAIT).await;
    env.wait_for_queue_len(&env.queue, 0, WAIT).await;
    worker.stop().await;

    let batch = transactions(&env, &["a", "b", "c", "d", "e", "f", "g", "h"]).await;
    assert!(batch.iter().all(|x| *x == batch[0]), "one batch: {batch:?}");
    let devices: Vec<(String, String, Option<String>, String)> = sqlx::query_as(
        "SELECT device_id, status, ip, to_char(last_seen_at AT TIME ZONE 'UTC', 'MI:SS')
         FROM devices ORDER BY device_id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let row = |d: &str, s: &str, ip: &str, at: &str| (d.to_owned(), s.to_owned(), Some(ip.to_owned()), at.to_owned());
    assert_eq!(
        devices,
        [
            row("d1", "offline", "10.1.0.1", "00:20"),
            row("d2", "offline", "10.2.0.1", "00:07"),
            row("d3", "online", "10.0.0.3", "01:40"),
            row("d4", "online", "10.0.0.4", "00:30"),
        ]
    );
}
