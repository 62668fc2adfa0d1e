//! The outbox relay, measured in this process (`run_with`). First the relay
//! alone against the broker's own pace: `BENCH_RELAY_ROWS` (default 10000)
//! rows written to the outbox at once, relayed to a device queue, against
//! the same number of persistent confirmed publishes (window 100) to it
//! (`BENCH_ONLY=relay` runs only this). Then, as before the
//! drain sections: `BENCH_COMMANDS` (default 2000) `SET_LED` commands from a
//! pre-filled queue; the relay publishes their device messages to a queue
//! bound to `amq.topic`; the rate runs from the worker starting to the last
//! device message in that queue. Then commands arrive at a steady 50 per
//! second for 10 s and the latency from commit to confirm (after one second
//! of warm-up) is read from the outbox rows: `published_at` (set after the
//! confirm) minus `created_at` (the start of the command's transaction, so
//! a little before its commit: the figure is an upper bound).

use std::cell::Cell;
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::options::{QueueBindOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use worker_iot_core::broker::{Outgoing, Publisher};
use worker_iot_core::config::Settings;
use worker_iot_core::{Options, Topology};

use crate::Bench;
use crate::support::{durable, env_or, median, passive_len, purge};

const TOPOLOGY: &str = "queue_type = \"classic\"\ndelivery_limit = 5\n[retry]\ndelays = [\"1s\"]\nmax_attempts = 5\n";

/// The outbox figures, on a classic queue of their own.
pub async fn bench(bench: &Bench) {
    let queue = format!("{}_outbox", bench.prefix);
    let topology = Topology::parse(TOPOLOGY, &queue).unwrap();
    let setup = bench.connection.create_channel().await.unwrap();
    topology.declare(&setup).await.unwrap();
    let topology_file = bench.dir.join("outbox-topology.toml");
    std::fs::write(&topology_file, TOPOLOGY).unwrap();
    let env = [
        ("AMQP_URL", bench.amqp_url.clone()),
        ("DATABASE_URL", bench.database_url.clone()),
        ("RABBITMQ_LOCAL_QUEUE_NAME", queue.clone()),
        ("TOPOLOGY_FILE", topology_file.display().to_string()),
    ];
    outbox_bench(&settings_from(&env), &bench.publisher, &bench.pool, bench.rounds).await;
    for q in topology.queues() {
        setup
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await
            .ok();
    }
}

async fn run_worker_until<F, Fut>(settings: &Settings, mut done: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let handle = tokio::spawn(worker_iot_core::run_with(
        settings.clone(),
        shutdown.clone(),
        Options::default(),
    ));
    while !done().await {
        assert!(started.elapsed() < Duration::from_secs(600), "the worker stalled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    shutdown.cancel();
    handle.await.unwrap().unwrap();
    seconds
}

fn set_led(device: &str, id: &str) -> Vec<u8> {
    json!({"type": "SET_LED", "kind": "command", "id": id, "data": {"device_id": device, "state": "on"}})
        .to_string()
        .into_bytes()
}

/// Commands per second from a pre-filled queue to device messages in
/// `device_queue`.
async fn outbox_rate(
    settings: &Settings,
    publisher: &Publisher,
    pool: &PgPool,
    device: (&str, &str),
    n: usize,
    round: usize,
) -> f64 {
    let (device, device_queue) = device;
    sqlx::query("TRUNCATE commands, outbox").execute(pool).await.unwrap();
    for i in 0..n {
        let body = set_led(device, &format!("o{round}-{i}"));
        publisher
            .publish("", &settings.queue, &body, BasicProperties::default())
            .await
            .unwrap();
    }
    let seconds = run_worker_until(settings, || async {
        passive_len(publisher, device_queue).await as usize >= n
    })
    .await;
    purge(publisher, device_queue).await;
    n as f64 / seconds
}

/// p50 and p99, in milliseconds, of commit → confirm for commands arriving
/// at `per_second` for `seconds`.
async fn outbox_latency(
    settings: &Settings,
    publisher: &Publisher,
    pool: &PgPool,
    device: (&str, &str),
    round: usize,
) -> (f64, f64) {
    const PER_SECOND: u64 = 50;
    const SECONDS: u64 = 10;
    let (device, device_queue) = device;
    sqlx::query("TRUNCATE commands, outbox").execute(pool).await.unwrap();
    let n = (PER_SECOND * SECONDS) as i64;
    // The first second warms the worker up (pool connections, channels) and
    // is not measured: the figure is the steady state.
    let warm_up = PER_SECOND as i64;
    let fed = tokio::spawn({
        let publisher = publisher.clone();
        let queue = settings.queue.clone();
        let device = device.to_owned();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / PER_SECOND));
            for i in -warm_up..n {
                tick.tick().await;
                let id = if i < 0 {
                    format!("w{round}{i}")
                } else {
                    format!("l{round}-{i}")
                };
                let body = set_led(&device, &id);
                publisher
                    .publish("", &queue, &body, BasicProperties::default())
                    .await
                    .unwrap();
            }
        }
    });
    run_worker_until(settings, || async {
        let published: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL")
            .fetch_one(pool)
            .await
            .unwrap();
        published >= warm_up + n
    })
    .await;
    fed.await.unwrap();
    let (p50, p99): (f64, f64) = sqlx::query_as(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)
         FROM (SELECT EXTRACT(EPOCH FROM published_at - created_at) * 1000 AS ms FROM outbox
               WHERE message_id LIKE 'l%') AS latency",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    purge(publisher, device_queue).await;
    (p50, p99)
}

async fn outbox_bench(settings: &Settings, publisher: &Publisher, pool: &PgPool, rounds: usize) {
    let n: usize = env_or("BENCH_COMMANDS", "2000").parse().expect("BENCH_COMMANDS");
    let device = format!("bench-{}", std::process::id());
    let device_queue = format!("{}.device", settings.queue);
    let channel = publisher.channel();
    channel
        .queue_declare(device_queue.as_str().into(), durable(), FieldTable::default())
        .await
        .unwrap();
    let key = format!(".led.{device}");
    channel
        .queue_bind(
            device_queue.as_str().into(),
            "amq.topic".into(),
            key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let target = (device.as_str(), device_queue.as_str());
    let burst: usize = env_or("BENCH_RELAY_ROWS", "10000").parse().expect("BENCH_RELAY_ROWS");
    let mut rates = Vec::new();
    let mut p50s = Vec::new();
    let mut p99s = Vec::new();
    let mut relayed = Vec::new();
    let mut broker = Vec::new();
    for round in 0..rounds {
        broker.push(broker_rate(publisher, &key, &device_queue, burst).await);
        relayed.push(relay_rate(settings, publisher, pool, target, burst).await);
        println!(
            "round {round}: relay {:.0} msg/s, broker confirmed publishes {:.0} msg/s",
            relayed[round], broker[round]
        );
        if env_or("BENCH_ONLY", "") == "relay" {
            continue;
        }
        rates.push(outbox_rate(settings, publisher, pool, target, n, round).await);
        let (p50, p99) = outbox_latency(settings, publisher, pool, target, round).await;
        p50s.push(p50);
        p99s.push(p99);
    }
    println!();
    println!("| outbox relay | figure (median of {rounds}) |");
    println!("|---|---|");
    let (relay, ceiling) = (median(&relayed), median(&broker));
    println!("| {burst} rows in the outbox → device queue: the relay | {relay:.0} msg/s |");
    println!("| the broker's own confirmed persistent publishes, window {WINDOW} | {ceiling:.0} msg/s |");
    println!("| relay ÷ broker | **{:.2}** |", relay / ceiling);
    if !rates.is_empty() {
        println!(
            "| {n} SET_LED commands, queue → device queue | {:.0} commands/s |",
            median(&rates)
        );
        println!("| 50 commands/s, commit → confirm p50 | {:.1} ms |", median(&p50s));
        println!("| 50 commands/s, commit → confirm p99 | {:.1} ms |", median(&p99s));
    }
    channel
        .queue_delete(device_queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .ok();
}

/// Unconfirmed publishes at most in the broker's own rate.
const WINDOW: usize = 100;

/// The broker's own pace for what the relay does: persistent, mandatory
/// publishes to `amq.topic` for the device, `WINDOW` at a time, each group
/// confirmed before the next; from the first publish to the last confirm.
async fn broker_rate(publisher: &Publisher, key: &str, device_queue: &str, n: usize) -> f64 {
    let properties = BasicProperties::default().with_delivery_mode(2);
    let ids: Vec<String> = (0..n).map(|i| format!("b-{i}")).collect();
    let started = Instant::now();
    for chunk in ids.chunks(WINDOW) {
        let messages: Vec<Outgoing<'_>> = chunk
            .iter()
            .map(|id| Outgoing {
                exchange: "amq.topic",
                routing_key: key,
                body: b"on",
                properties: properties.clone().with_message_id(id.as_str().into()),
            })
            .collect();
        for result in publisher.publish_all(&messages).await {
            result.expect("a confirmed publish");
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(passive_len(publisher, device_queue).await as usize, n);
    purge(publisher, device_queue).await;
    n as f64 / seconds
}

/// The relay alone: `n` rows written to the outbox at once (as committed
/// commands leave them), then a worker; device messages per second from
/// the first to the last in the device queue, and none twice.
async fn relay_rate(settings: &Settings, publisher: &Publisher, pool: &PgPool, device: (&str, &str), n: usize) -> f64 {
    let (device, device_queue) = device;
    sqlx::query("TRUNCATE commands, outbox").execute(pool).await.unwrap();
    sqlx::query(
        "INSERT INTO outbox (message_id, exchange, routing_key, body)
         SELECT 'r-' || g, 'amq.topic', $1, convert_to('on', 'UTF8') FROM generate_series(1, $2) AS g",
    )
    .bind(format!(".led.{device}"))
    .bind(i64::try_from(n).unwrap())
    .execute(pool)
    .await
    .unwrap();
    // (when the first device message was seen, how many there were), and
    // when the last one was.
    let (first, last) = (Cell::new(None), Cell::new(None));
    let (first_ref, last_ref) = (&first, &last);
    run_worker_until(settings, move || async move {
        let len = passive_len(publisher, device_queue).await as usize;
        let now = Instant::now();
        if len > 0 && first_ref.get().is_none() {
            first_ref.set(Some((now, len)));
        }
        if len >= n {
            last_ref.set(Some(now));
        }
        len >= n
    })
    .await;
    let (started, already) = first.get().expect("a first device message");
    let seconds = last
        .get()
        .expect("the last device message")
        .duration_since(started)
        .as_secs_f64();
    let unique: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(unique as usize, n, "every row marked once");
    assert_eq!(
        passive_len(publisher, device_queue).await as usize,
        n,
        "no device message twice"
    );
    purge(publisher, device_queue).await;
    (n - already) as f64 / seconds
}

fn settings_from(env: &[(&str, String)]) -> Settings {
    Settings::from_sources(None, |k| env.iter().find(|(key, _)| *key == k).map(|(_, v)| v.clone()))
        .expect("valid bench settings")
        .0
}
