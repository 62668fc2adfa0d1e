//! Throughput and latency of the worker against the broker's own ceiling,
//! measured in one run on one machine, on a classic and a quorum queue.
//!
//! ```sh
//! cargo bench --bench throughput --features test-handlers
//! BENCH_MESSAGES=3000 BENCH_ROUNDS=1 cargo bench --bench throughput --features test-handlers
//! ```
//!
//! Without `--features test-handlers` the worker has no `TEST_FLAKY`
//! handler, so the transient-once figures are skipped (with a note).
//!
//! For each queue type (`BENCH_QUEUE_TYPES`, default `classic,quorum`) and
//! round (`BENCH_ROUNDS`, default 3), on a fresh queue declared with the
//! worker's topology (retry delays `["50ms"]`, `in_process_attempts = 1`):
//!
//! 1. `BENCH_MESSAGES` (default 100000) messages of the `publish sample` mix
//!    with 2 % duplicates ([`mix`]) are published, persistent and confirmed;
//! 2. raw ceiling ([`raw`]): a bare lapin consumer (prefetch
//!    `BENCH_RAW_PREFETCH`, default 256) drains them, acking each message;
//!    then again from a refill, acking with `multiple` every 64 messages;
//! 3. worker ([`drain`]): refilled, drained by the worker binary as its own
//!    process, from its first delivery to its last message settled; the
//!    rows, the queues and the outcomes are checked and a mismatch stops the
//!    bench; its peak RSS (VmHWM) is read before it is stopped;
//! 4. the same with 5 % poison messages (parked in the DLQ) and with 5 %
//!    that fail transiently once (retried through `Q.retry.50ms`);
//! 5. latency ([`latency`]): 100 messages per second for 10 s to a running
//!    worker, publish → commit notified, p50 and p99.
//!
//! Each figure is the median of the rounds; ratios are ratios of medians.
//! The final markdown table is ready for docs/benchmarks.md. `BATCH_*`,
//! `RABBITMQ_PREFETCH_COUNT`, `DATABASE_MAX_CONNECTIONS`, `OUTBOX_RELAY`,
//! `RUST_LOG` and `LOG_FORMAT` are passed to the worker unchanged; otherwise
//! its defaults apply. Then the outbox relay section ([`outbox`];
//! `BENCH_OUTBOX=off` skips it). `BENCH_EXPORT=on` makes the worker export
//! its spans over OTLP gRPC to a receiver in the bench ([`export`]): compare
//! a run with it and one without for the cost of tracing.
//! `BENCH_BASELINE_WORKER=<path>` also drains each round's clean mix with
//! that worker binary (another build, say of the commit before a change),
//! beside this build's (first in odd rounds, last in even ones), and
//! reports the ratio.
//! `BENCH_RAW_DEVICES=on` (with `BENCH_MIX=readings`) also drains, in each
//! round, `BENCH_MESSAGES` raw readings that 200 devices publish over MQTT
//! ([`devices`]), and reports their rate against the enveloped readings of
//! the clean drain.
//! `BENCH_STORED=<readings>` also drains each round's clean mix into a
//! database that already holds that many readings, a year's worth
//! ([`stored`]), beside the drain into the empty one, and reports the ratio.
//! `BENCH_PARKING=on` adds the parking lot section ([`parking`]) on a
//! classic queue; `BENCH_ONLY=parking` runs that section alone.

mod baseline;
mod child;
mod devices;
mod drain;
mod export;
mod latency;
mod mix;
mod outbox;
mod parking;
mod raw;
mod report;
mod stored;
mod support;

use std::path::PathBuf;

use lapin::Connection;
use lapin::options::{QueueBindOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use sqlx::{Connection as _, PgConnection, PgPool};
use worker_iot_core::broker::{self, Publisher};
use worker_iot_core::{Topology, store};

use crate::mix::{Mix, Variant};
use crate::raw::Ack;
use crate::report::Figures;
use crate::support::{durable, env_number, env_or};

/// Acks of the `multiple` variant of the raw ceiling.
const ACK_MULTIPLE_EVERY: usize = 64;

/// Connections and settings shared by every section.
pub struct Bench {
    pub n: usize,
    pub rounds: usize,
    pub raw_prefetch: u16,
    /// Prefix of every queue of this run, `wic_bench_<pid>`.
    pub prefix: String,
    pub amqp_url: String,
    pub database_url: String,
    pub server_url: String,
    pub pool: PgPool,
    pub connection: Connection,
    pub publisher: Publisher,
    /// Topology files, worker logs, the worker's working directory.
    pub dir: PathBuf,
    /// A queue bound to `amq.topic` for the device messages the relay
    /// publishes for the mix's commands, so they are routable.
    pub sink: String,
    /// The OTLP receiver the worker exports to (`BENCH_EXPORT=on`).
    pub export: Option<export::Export>,
    /// Whether each round drains raw device readings (`BENCH_RAW_DEVICES`).
    pub raw_devices: bool,
    /// The database of `BENCH_STORED` readings each clean mix also drains
    /// into ([`stored`]).
    pub stored: Option<stored::Stored>,
    /// The baseline worker's database (`BENCH_BASELINE_WORKER`).
    pub baseline: Option<baseline::Baseline>,
}

/// One queue type's main queue and topology file.
pub struct Target {
    pub queue_type: String,
    pub topology: Topology,
    pub file: PathBuf,
}

#[tokio::main]
async fn main() {
    let mut bench = Bench::open().await;
    bench.stored = stored::open(&bench).await;
    let only = env_or("BENCH_ONLY", "");
    let only_parking = only == "parking";
    if only == "relay" {
        outbox::bench(&bench).await;
    } else if !only_parking {
        throughput(&bench).await;
    }
    if only_parking || env_or("BENCH_PARKING", "off") == "on" {
        let target = bench.target("classic").await;
        parking::bench(&bench, &target).await;
        bench.remove(&target).await;
    }
    bench.close().await;
}

/// The throughput, latency and relay sections.
async fn throughput(bench: &Bench) {
    let types: Vec<String> = env_or("BENCH_QUEUE_TYPES", "classic,quorum")
        .split(',')
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect();
    report::header(bench);
    println!("mix: {}", mix::describe(&mix::build(bench.n, 1, Variant::Clean)));
    let mut results = Vec::new();
    for queue_type in &types {
        let target = bench.target(queue_type).await;
        results.push((queue_type.clone(), measure(bench, &target).await));
        bench.remove(&target).await;
    }
    report::table(bench, &results);
    match &bench.export {
        Some(export) => println!("trace export: on, {} spans received over OTLP", export.spans()),
        None => println!("trace export: off (BENCH_EXPORT=on to export to an in-process OTLP receiver)"),
    }
    if env_or("BENCH_OUTBOX", "on") != "off" {
        outbox::bench(bench).await;
    }
}

/// Every figure of one queue type, `rounds` times.
async fn measure(bench: &Bench, target: &Target) -> Figures {
    let mut figures = Figures::default();
    for round in 0..bench.rounds {
        let seed = round as u64 + 1;
        let clean = mix::build(bench.n, seed, Variant::Clean);
        figures
            .raw_each
            .push(raw::rate(bench, target, &clean.bodies, Ack::Each).await);
        let multiple = Ack::Multiple(ACK_MULTIPLE_EVERY);
        figures
            .raw_multiple
            .push(raw::rate(bench, target, &clean.bodies, multiple).await);
        clean_drains(bench, target, round, &clean, &mut figures).await;
        let poison = mix::build(bench.n, seed, Variant::Poison);
        let run = drain::run(bench, target, &poison, "poison").await;
        figures.poison.push(run.rate);
        figures.rss_all.push(run.peak_rss_mib);
        if cfg!(feature = "test-handlers") {
            let transient = mix::build(bench.n, seed, Variant::Transient);
            let run = drain::run(bench, target, &transient, "transient").await;
            figures.transient.push(run.rate);
            figures.rss_all.push(run.peak_rss_mib);
        }
        let (p50, p99) = latency::measure(bench, target, round).await;
        figures.p50.push(p50);
        figures.p99.push(p99);
        report::round(&target.queue_type, round, &figures);
    }
    figures
}

/// This build's drain of the clean mix, and beside it the baseline
/// worker's and the raw device readings' drains (when on). Those go first
/// in odd rounds and last in even ones, so neither they nor the clean drain
/// always drains into a database the other warmed.
async fn clean_drains(bench: &Bench, target: &Target, round: usize, clean: &Mix, figures: &mut Figures) {
    let beside_first = round.is_multiple_of(2);
    if beside_first {
        beside_clean(bench, target, round, clean, figures).await;
    }
    let run = drain::run(bench, target, clean, "clean").await;
    figures.clean.push(run.rate);
    figures.rss_clean.push(run.peak_rss_mib);
    figures.rss_all.push(run.peak_rss_mib);
    if !beside_first {
        beside_clean(bench, target, round, clean, figures).await;
    }
}

/// The baseline worker's drain of the clean mix, the clean mix's drain
/// into the stored database and the raw device readings' drain, each when
/// on.
async fn beside_clean(bench: &Bench, target: &Target, round: usize, clean: &Mix, figures: &mut Figures) {
    if let Some(baseline) = &bench.baseline {
        let run = drain::run_on(bench, &baseline.db(), target, clean, "baseline").await;
        figures.baseline.push(run.rate);
    }
    if let Some(stored) = &bench.stored {
        let run = drain::run_on(bench, &stored.db(), target, clean, "stored").await;
        figures.stored.push(run.rate);
    }
    if bench.raw_devices {
        let run = devices::run(bench, target, round as u64 + 1).await;
        figures.raw_devices.push(run.rate);
        figures.rss_all.push(run.peak_rss_mib);
    }
}

impl Bench {
    async fn open() -> Bench {
        // First, so a setting it refuses leaves no database behind.
        let raw_devices = devices::enabled();
        let amqp_url = env_or("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
        let server_url = env_or("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres");
        let prefix = format!("wic_bench_{:08x}", std::process::id());
        let database_url = format!("{}/{prefix}", &server_url[..server_url.rfind('/').unwrap()]);
        store::create_database(&database_url).await.unwrap();
        let pool = store::connect(&database_url, 2).await.unwrap();
        store::migrate(&pool).await.unwrap();
        let connection = broker::connect(&amqp_url, "bench").await.unwrap();
        let publisher = Publisher::open(&connection).await.unwrap();
        let dir = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(&dir).unwrap();
        let sink = format!("{prefix}.devices");
        declare_sink(&publisher, &sink).await;
        let baseline = baseline::Baseline::open(&server_url, &prefix).await;
        Bench {
            n: env_number("BENCH_MESSAGES", "100000"),
            rounds: env_number("BENCH_ROUNDS", "3"),
            raw_prefetch: env_number("BENCH_RAW_PREFETCH", "256"),
            prefix,
            amqp_url,
            database_url,
            server_url,
            pool,
            connection,
            publisher,
            dir,
            export: export::Export::start().await,
            sink,
            raw_devices,
            stored: None,
            baseline,
        }
    }

    /// Declares `queue_type`'s topology and writes it for the worker. With
    /// `BENCH_RAW_DEVICES=on` it holds the raw readings' device route, so
    /// `amq.topic` is bound to the queue before the bench publishes them,
    /// and every drain of the run has the same worker configuration.
    async fn target(&self, queue_type: &str) -> Target {
        let mut text = format!(
            "queue_type = \"{queue_type}\"\ndelivery_limit = 5\n\
             [retry]\ndelays = [\"50ms\"]\nmax_attempts = 5\nin_process_attempts = 1\n"
        );
        if self.raw_devices {
            text.push_str(&devices::route(&self.prefix));
        }
        let queue = format!("{}_{queue_type}", self.prefix);
        let topology = Topology::parse(&text, &queue).expect("a valid bench topology");
        topology.declare(self.publisher.channel()).await.unwrap();
        let file = self.dir.join(format!("topology-{queue_type}.toml"));
        std::fs::write(&file, text).unwrap();
        Target {
            queue_type: queue_type.to_owned(),
            topology,
            file,
        }
    }

    async fn remove(&self, target: &Target) {
        for queue in target.topology.queues() {
            delete_queue(&self.publisher, &queue).await;
        }
    }

    /// Deletes the sink, the database and the files.
    async fn close(self) {
        delete_queue(&self.publisher, &self.sink).await;
        self.pool.close().await;
        if let Some(stored) = &self.stored {
            stored.pool.close().await;
        }
        let mut databases = vec![self.prefix.clone()];
        if let Some(baseline) = &self.baseline {
            baseline.pool.close().await;
            databases.push(format!("{}_baseline", self.prefix));
        }
        let mut admin = PgConnection::connect(&self.server_url).await.unwrap();
        for database in databases {
            let drop = format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)");
            sqlx::query(sqlx::AssertSqlSafe(drop))
                .execute(&mut admin)
                .await
                .unwrap();
        }
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

/// The routing keys of `SET_LED` (`.led.<device>`) and `SET_PUBLISH_PERIOD`
/// (`<device>.config`) device messages.
async fn declare_sink(publisher: &Publisher, sink: &str) {
    let channel = publisher.channel();
    channel
        .queue_declare(sink.into(), durable(), FieldTable::default())
        .await
        .unwrap();
    for key in ["#.led.#", "#.config"] {
        channel
            .queue_bind(
                sink.into(),
                "amq.topic".into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }
}

async fn delete_queue(publisher: &Publisher, queue: &str) {
    publisher
        .channel()
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await
        .ok();
}
