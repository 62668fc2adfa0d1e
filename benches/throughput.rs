//! Throughput of the worker against the broker's own drain rate, measured
//! in the same run on the same machine.
//!
//! ```sh
//! cargo bench --bench throughput            # N=20000, 3 rounds
//! BENCH_MESSAGES=5000 BENCH_ROUNDS=5 cargo bench --bench throughput
//! ```
//!
//! Baseline: a bare consumer that acks each message as it arrives (no
//! decoding, no database), prefetch 256. Worker: the real worker, in this
//! process, applying MEASUREMENT messages (inbox row + measurement row, one
//! transaction each) at several prefetch counts. Each figure is the median
//! of the rounds; time runs from the consumer starting to the last message
//! settled.
//!
//! Outbox relay (`BENCH_COMMANDS`, default 2000; `BENCH_OUTBOX=off` skips
//! it): the worker takes `SET_LED` commands from a pre-filled queue and the
//! relay publishes their device messages to a queue bound to `amq.topic`;
//! the rate runs from the worker starting to the last device message in
//! that queue. Then commands arrive at a steady 50 per second for 10 s and
//! the latency from commit to confirm (after one second of warm-up) is read
//! from the outbox rows:
//! `published_at` (set after the confirm) minus `created_at` (the start of
//! the command's transaction, so a little before its commit: the figure is
//! an upper bound).
//!
//! Trace export (`BENCH_EXPORT=on`; default off): the process installs the
//! worker binary's telemetry with `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at
//! an OTLP gRPC receiver in this process, so every span is encoded and sent
//! as in production. Run once with and once without and compare:
//!
//! ```sh
//! BENCH_MESSAGES=5000 BENCH_OUTBOX=off cargo bench --bench throughput
//! BENCH_MESSAGES=5000 BENCH_OUTBOX=off BENCH_EXPORT=on cargo bench --bench throughput
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use serde_json::json;
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use worker_iot_core::broker::{self, Publisher};
use worker_iot_core::config::Settings;
use worker_iot_core::store;
use worker_iot_core::telemetry::Telemetry;
use worker_iot_core::{Options, Topology};

const TOPOLOGY: &str = "queue_type = \"classic\"\ndelivery_limit = 5\n[retry]\ndelays = [\"1s\"]\nmax_attempts = 5\n";

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_owned())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

async fn fill(publisher: &Publisher, queue: &str, n: usize, round: usize) {
    for i in 0..n {
        let body = json!({"type": "MEASUREMENT", "id": format!("r{round}-{i}"),
                          "data": {"device_id": format!("d{}", i % 50), "sensor": "t", "value": i}});
        publisher
            .publish("", queue, body.to_string().as_bytes(), BasicProperties::default())
            .await
            .expect("publish");
    }
}

/// Messages per second of a bare consumer draining `n` messages.
async fn baseline(connection: &Connection, publisher: &Publisher, queue: &str, n: usize, round: usize) -> f64 {
    fill(publisher, queue, n, round).await;
    let channel = connection.create_channel().await.unwrap();
    channel.basic_qos(256, BasicQosOptions::default()).await.unwrap();
    let started = Instant::now();
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for _ in 0..n {
        let delivery = consumer.next().await.expect("a delivery").expect("no error");
        delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    channel.close(200, "".into()).await.ok();
    rate
}

/// Messages per second of the worker applying `n` measurements.
async fn worker_rate(settings: &Settings, publisher: &Publisher, pool: &PgPool, n: usize, round: usize) -> f64 {
    sqlx::query("TRUNCATE events, measurements")
        .execute(pool)
        .await
        .unwrap();
    fill(publisher, &settings.queue, n, round).await;
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let handle = tokio::spawn(worker_iot_core::run_with(
        settings.clone(),
        shutdown.clone(),
        Options::default(),
    ));
    loop {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM measurements")
            .fetch_one(pool)
            .await
            .unwrap();
        if done as usize >= n {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the worker stalled at {done} of {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    shutdown.cancel();
    handle.await.unwrap().unwrap();
    rate
}

/// Runs the worker until `done` holds, then stops it. Returns the seconds
/// from its start.
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

async fn passive_len(publisher: &Publisher, queue: &str) -> u32 {
    let options = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    publisher
        .channel()
        .queue_declare(queue.into(), options, FieldTable::default())
        .await
        .map_or(0, |q| q.message_count())
}

/// Durable: RabbitMQ 4 refuses transient non-exclusive queues.
fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

async fn purge(publisher: &Publisher, queue: &str) {
    publisher
        .channel()
        .queue_purge(queue.into(), Default::default())
        .await
        .unwrap();
}

/// The outbox figures: a device queue bound to `amq.topic` for one device.
async fn outbox_bench(settings: &Settings, publisher: &Publisher, pool: &PgPool, rounds: usize) {
    let n: usize = env_or("BENCH_COMMANDS", "2000").parse().expect("BENCH_COMMANDS");
    let device = format!("bench-{}", std::process::id());
    let device_queue = format!("{}.device", settings.queue);
    let channel = publisher.channel();
    channel
        .queue_declare(device_queue.as_str().into(), durable(), FieldTable::default())
        .await
        .unwrap();
    let key = format!("led.{device}");
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
    let mut rates = Vec::new();
    let mut p50s = Vec::new();
    let mut p99s = Vec::new();
    for round in 0..rounds {
        rates.push(outbox_rate(settings, publisher, pool, target, n, round).await);
        let (p50, p99) = outbox_latency(settings, publisher, pool, target, round).await;
        p50s.push(p50);
        p99s.push(p99);
    }
    println!();
    println!("| outbox relay | figure (median of {rounds}) |");
    println!("|---|---|");
    println!(
        "| {n} SET_LED commands, queue → device queue | {:.0} commands/s |",
        median(rates)
    );
    println!("| 50 commands/s, commit → confirm p50 | {:.1} ms |", median(p50s));
    println!("| 50 commands/s, commit → confirm p99 | {:.1} ms |", median(p99s));
    channel
        .queue_delete(device_queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .ok();
}

#[tokio::main]
async fn main() {
    let n: usize = env_or("BENCH_MESSAGES", "20000").parse().expect("BENCH_MESSAGES");
    let rounds: usize = env_or("BENCH_ROUNDS", "3").parse().expect("BENCH_ROUNDS");
    let prefetches: Vec<u16> = env_or("BENCH_PREFETCH", "1,8,32,128")
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| p.trim().parse().expect("BENCH_PREFETCH"))
        .collect();
    let amqp_url = env_or("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    let server = env_or("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres");
    let suffix = format!("{:08x}", std::process::id());
    let queue = format!("wic_bench_{suffix}");
    let database_url = format!("{}/wic_bench_{suffix}", &server[..server.rfind('/').unwrap()]);

    store::create_database(&database_url).await.unwrap();
    let pool = store::connect(&database_url, 2).await.unwrap();
    store::migrate(&pool).await.unwrap();
    let connection = broker::connect(&amqp_url, "bench").await.unwrap();
    let setup = connection.create_channel().await.unwrap();
    let baseline_queue = format!("{queue}_baseline");
    let topologies = [&queue, &baseline_queue].map(|q| Topology::parse(TOPOLOGY, q).unwrap());
    for topology in &topologies {
        topology.declare(&setup).await.unwrap();
    }
    let publisher = Publisher::open(&connection).await.unwrap();
    let topology_file = std::env::temp_dir().join(format!("{queue}.toml"));
    std::fs::write(&topology_file, TOPOLOGY).unwrap();

    let export = env_or("BENCH_EXPORT", "off") == "on";
    let (spans, endpoint) = if export {
        let (spans, addr) = start_receiver().await;
        (Some(spans), format!("http://{addr}"))
    } else {
        (None, String::new())
    };
    // The binary's logging and export, so both runs pay for the same logs.
    let log_settings = settings_from(&[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint), ("LOG_FORMAT", "text".into())]);
    let telemetry = Telemetry::install(&log_settings).expect("telemetry");

    let mut baselines = Vec::new();
    for round in 0..rounds {
        baselines.push(baseline(&connection, &publisher, &baseline_queue, n, round).await);
    }
    let broker = median(baselines);
    println!("{n} messages, {rounds} rounds, medians; machine: {} cores", num_cpus());
    println!(
        "trace export: {}",
        if export {
            "on (OTLP gRPC to an in-process receiver)"
        } else {
            "off"
        }
    );
    println!("| consumer | prefetch | msg/s | vs broker drain |");
    println!("|---|---|---|---|");
    println!("| bare consumer, ack only (baseline) | 256 | {broker:.0} | 100 % |");
    for prefetch in prefetches {
        let env = [
            ("AMQP_URL", amqp_url.clone()),
            ("DATABASE_URL", database_url.clone()),
            ("RABBITMQ_LOCAL_QUEUE_NAME", queue.clone()),
            ("TOPOLOGY_FILE", topology_file.display().to_string()),
            ("RABBITMQ_PREFETCH_COUNT", prefetch.to_string()),
        ];
        let settings = settings_from(&env);
        let mut rates = Vec::new();
        for round in 0..rounds {
            rates.push(worker_rate(&settings, &publisher, &pool, n, round).await);
        }
        let rate = median(rates);
        println!(
            "| worker-iot-core | {prefetch} | {rate:.0} | {:.0} % |",
            100.0 * rate / broker
        );
    }

    if env_or("BENCH_OUTBOX", "on") != "off" {
        let env = [
            ("AMQP_URL", amqp_url.clone()),
            ("DATABASE_URL", database_url.clone()),
            ("RABBITMQ_LOCAL_QUEUE_NAME", queue.clone()),
            ("TOPOLOGY_FILE", topology_file.display().to_string()),
        ];
        outbox_bench(&settings_from(&env), &publisher, &pool, rounds).await;
    }

    for topology in &topologies {
        for q in topology.queues() {
            setup
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await
                .ok();
        }
    }
    pool.close().await;
    let mut admin = PgConnection::connect(&server).await.unwrap();
    let drop = format!("DROP DATABASE IF EXISTS \"wic_bench_{suffix}\" WITH (FORCE)");
    sqlx::query(sqlx::AssertSqlSafe(drop))
        .execute(&mut admin)
        .await
        .unwrap();
    std::fs::remove_file(topology_file).ok();
    telemetry.shutdown().await;
    if let Some(spans) = spans {
        println!("spans received over OTLP: {}", spans.load(Ordering::Relaxed));
    }
}

/// An OTLP gRPC trace receiver that counts the spans it gets.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let count: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(count, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

async fn start_receiver() -> (Arc<AtomicUsize>, SocketAddr) {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let spans = receiver.spans.clone();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (spans, addr)
}

fn settings_from(env: &[(&str, String)]) -> Settings {
    Settings::from_sources(None, |k| env.iter().find(|(key, _)| *key == k).map(|(_, v)| v.clone()))
        .expect("valid bench settings")
        .0
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
