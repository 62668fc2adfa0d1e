//! Chaos soak (ignored by default): two worker processes, each behind its
//! own cuttable broker proxy and a shared cuttable database proxy, take a
//! steady stream of valid and bad messages while the test kills workers
//! (`kill -9`), cuts their broker and database connections and restarts
//! the broker. Once the faults stop and everything has drained, every
//! valid message is applied exactly once, none of them is parked, and
//! every bad one is parked (docs/reliability.md, "Outcomes" and "Failure modes").
//!
//! It restarts the broker, so it runs alone (in the `whole_broker`
//! binary, one test at a time), under the exclusive lock:
//!
//! ```sh
//! WIC_SOAK_MESSAGES=20000 flock -x /tmp/wic-broker.lock \
//!     cargo test --all-features --test whole_broker soak -- --ignored --nocapture
//! ```
//!
//! `WIC_SOAK_MESSAGES` (default 100000) sizes it, `WIC_SOAK_RATE` is the
//! publish rate in messages per second (default 500), `WIC_SOAK_SEED`
//! replays a message mix (the seed is printed).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::messages::{body, measurement_of, set_led};
use crate::common::observe::rabbitmqctl;
use crate::common::proxy::{Proxy, upstream_of};
use crate::common::{Device, TestEnv, TopologyFile, WorkerProcess, wait_for};
use lapin::types::ShortString;
use lapin::{BasicProperties, Connection};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::task::JoinHandle;
use worker_iot_core::broker::{self, Outgoing, PublishError, Publisher};
use worker_iot_core::headers::{self, ERROR_KIND};

const WORKER: &str = env!("CARGO_BIN_EXE_worker-iot-core");
const WORKERS: usize = 2;
/// Broker restarts the soak makes at least, spread over the publishing.
const RESTARTS: u32 = 3;
const TICK: Duration = Duration::from_millis(20);

/// The retry budget (200 ms + 1 s + 1 s + 1 s between five deliveries) is
/// longer than any database outage the soak makes, so no valid message
/// may run out of attempts because of one.
fn topology() -> TopologyFile {
    TopologyFile::classic()
        .delivery_limit(5)
        .delays(&["200ms", "1s"])
        .max_attempts(5)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "chaos soak: restarts the broker; run alone under flock -x /tmp/wic-broker.lock"]
async fn chaos_soak_loses_nothing_applies_once_and_parks_every_bad_message() {
    let _broker = crate::take_broker().await;
    let n: usize = setting("WIC_SOAK_MESSAGES", 100_000);
    let rate: usize = setting("WIC_SOAK_RATE", 500);
    let seed: u64 = setting("WIC_SOAK_SEED", rand::random());
    println!("soak: {n} messages at {rate}/s, seed {seed}");
    let mut env = TestEnv::new(&topology()).await;
    let device = Device::bind(&env).await;
    let ledger = Arc::new(ledger(n, seed, &device.id));
    let mut broker = BrokerApp::default();
    let mut workers = Workers::start(&env).await;
    let started = Instant::now();
    let confirmed = Arc::new(AtomicUsize::new(0));
    let publishing = tokio::spawn(publish_all(
        env.amqp_url.clone(),
        env.queue.clone(),
        ledger.clone(),
        rate,
        confirmed.clone(),
    ));
    let mut chaos = Chaos {
        rng: StdRng::seed_from_u64(seed ^ 0x5eed),
        faults: Faults::default(),
        messages: n,
        started,
        deadline: Instant::now() + Duration::from_secs((n / rate.max(1)) as u64 + 900),
    };
    chaos
        .run(&env, &mut workers, &mut broker, &confirmed, &publishing)
        .await;
    let sent = publishing.await.expect("the publisher task panicked");
    workers.revive_exited(&env);
    let drain = wait_drained(&env, Duration::from_secs(300 + n as u64 / 100)).await;
    let elapsed = started.elapsed();
    let exits = workers.stop().await;
    env.connection = broker::connect(&env.amqp_url, "soak-check").await.expect("connect");
    let verdict = Verdict::gather(&env, &ledger, &device).await;
    let tally = Tally::of(&ledger, &verdict);
    print_figures(
        &ledger,
        &sent,
        &chaos.faults,
        &workers,
        &verdict,
        &tally,
        (elapsed, drain),
    );
    tally.assert_promise(&verdict);
    assert!(
        exits.iter().all(|s| s.success()),
        "workers exit 0 on SIGTERM: {exits:?}"
    );
    env.cleanup().await;
}

/// A number from the environment, or `default`.
fn setting<T: FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().map_or(default, |v| {
        v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

// ---------------------------------------------------------------- ledger

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Measurement,
    DeviceUp,
    DeviceDown,
    SetLed,
    BadJson,
    BadData,
    UnknownType,
}

impl Kind {
    /// 97 % valid, 3 % bad, from a roll in 0..1000.
    fn from_roll(roll: u32) -> Kind {
        match roll {
            0..10 => Kind::BadJson,
            10..20 => Kind::BadData,
            20..30 => Kind::UnknownType,
            30..40 => Kind::SetLed,
            40..65 => Kind::DeviceUp,
            65..90 => Kind::DeviceDown,
            _ => Kind::Measurement,
        }
    }

    fn is_valid(self) -> bool {
        !matches!(self, Kind::BadJson | Kind::BadData | Kind::UnknownType)
    }
}

/// One message of the run: its id (also its AMQP `message_id`), what it
/// is, and its exact body (unique, so even an id-less copy is known).
struct Entry {
    id: String,
    kind: Kind,
    body: Vec<u8>,
}

fn ledger(n: usize, seed: u64, device: &str) -> Vec<Entry> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let kind = Kind::from_roll(rng.random_range(0..1000));
            let id = format!("soak-{i}");
            let body = body_of(kind, &id, i, device);
            Entry { id, kind, body }
        })
        .collect()
}

fn body_of(kind: Kind, id: &str, i: usize, device: &str) -> Vec<u8> {
    let sensor = format!("soak-d{}", i % 20);
    match kind {
        Kind::Measurement => measurement_of(&sensor, id, i),
        Kind::DeviceUp => body(json!({"type": "DEVICE_UP", "id": id, "data": {"device_id": sensor, "ip": "10.0.0.7"}})),
        Kind::DeviceDown => body(json!({"type": "DEVICE_DOWN", "id": id, "data": {"device_id": sensor}})),
        Kind::SetLed => set_led(id, device, if i.is_multiple_of(2) { "on" } else { "off" }),
        Kind::BadData => measurement_of(&sensor, id, "x"),
        Kind::UnknownType => body(json!({"type": "SOAK_NO_SUCH_TYPE", "id": id, "data": {}})),
        Kind::BadJson => format!("{{\"type\": \"MEASUREMENT\", \"id\": \"{id}\", oops").into_bytes(),
    }
}

// ------------------------------------------------------------- publisher

/// What the publisher did: copies put on the wire per ledger entry (a
/// message is sent again until the broker confirms it), and connections.
struct Sent {
    sends: Vec<u32>,
    connections: u32,
    elapsed: Duration,
}

/// A confirmed publisher that survives broker restarts: a broken
/// connection is dropped and a new one opened on the next publish.
struct ReconnectingPublisher {
    url: String,
    open: Option<(Connection, Publisher)>,
    connections: u32,
}

impl ReconnectingPublisher {
    async fn get(&mut self) -> Publisher {
        if self.open.is_none() {
            let url = self.url.clone();
            let opened = wait_for("the publisher to reconnect", Duration::from_secs(180), || async {
                let connection = broker::connect(&url, "soak-publisher").await.ok()?;
                let publisher = Publisher::open(&connection).await.ok()?;
                Some((connection, publisher))
            })
            .await;
            self.connections += 1;
            self.open = Some(opened);
        }
        self.open.as_ref().expect("opened above").1.clone()
    }

    async fn reset(&mut self) {
        if let Some((connection, _)) = self.open.take() {
            tokio::time::timeout(Duration::from_secs(2), connection.close(200, "".into()))
                .await
                .ok();
        }
    }
}

/// Publishes the whole ledger to `queue` at `rate` per second, each
/// message persistent, with its id as `message_id`, confirmed; what is not
/// confirmed is published again. `confirmed` counts confirmed entries.
async fn publish_all(
    url: String,
    queue: String,
    ledger: Arc<Vec<Entry>>,
    rate: usize,
    confirmed: Arc<AtomicUsize>,
) -> Sent {
    let started = Instant::now();
    let mut out = ReconnectingPublisher {
        url,
        open: None,
        connections: 0,
    };
    let mut sends = vec![0; ledger.len()];
    let per_tick = (rate * TICK.as_millis() as usize / 1000).max(1);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut next, mut again) = (0, Vec::new());
    while next < ledger.len() || !again.is_empty() {
        tick.tick().await;
        let chunk: Vec<usize> = if again.is_empty() {
            let end = (next + per_tick).min(ledger.len());
            let fresh = (next..end).collect();
            next = end;
            fresh
        } else {
            std::mem::take(&mut again)
        };
        let publisher = out.get().await;
        let (failed, broken) = publish_chunk(&publisher, &queue, &ledger, &chunk, &mut sends).await;
        confirmed.fetch_add(chunk.len() - failed.len(), Ordering::SeqCst);
        if broken {
            out.reset().await;
        }
        again = failed;
    }
    out.reset().await;
    Sent {
        sends,
        connections: out.connections,
        elapsed: started.elapsed(),
    }
}

/// Sends `chunk`, then waits for its confirms. Returns the entries not
/// confirmed, and whether the connection looks broken.
async fn publish_chunk(
    publisher: &Publisher,
    queue: &str,
    ledger: &[Entry],
    chunk: &[usize],
    sends: &mut [u32],
) -> (Vec<usize>, bool) {
    let properties = |entry: &Entry| {
        BasicProperties::default()
            .with_message_id(ShortString::from(entry.id.as_str()))
            .with_content_type(ShortString::from("application/json"))
            .with_delivery_mode(2)
    };
    let messages: Vec<Outgoing<'_>> = chunk
        .iter()
        .map(|&i| Outgoing {
            exchange: "",
            routing_key: queue,
            body: &ledger[i].body,
            properties: properties(&ledger[i]),
        })
        .collect();
    let results = publisher.publish_all(&messages).await;
    let (mut failed, mut broken) = (Vec::new(), false);
    for (&i, result) in chunk.iter().zip(results) {
        // Counted as sent even when it failed: it may be on the wire.
        sends[i] += 1;
        if let Err(e) = result {
            broken |= matches!(e, PublishError::Broker { .. } | PublishError::Timeout(_));
            failed.push(i);
        }
    }
    (failed, broken)
}

// --------------------------------------------------------------- workers

/// The worker processes, each with its own broker proxy; all share one
/// database proxy.
struct Workers {
    processes: Vec<WorkerProcess>,
    amqp: Vec<Proxy>,
    database: Proxy,
    starts: u32,
    unexpected_exits: u32,
}

impl Workers {
    async fn start(env: &TestEnv) -> Workers {
        let mut workers = Workers {
            processes: Vec::new(),
            amqp: Vec::new(),
            database: Proxy::start(upstream_of(&env.database_url)).await,
            starts: 0,
            unexpected_exits: 0,
        };
        for i in 0..WORKERS {
            workers.amqp.push(Proxy::start(upstream_of(&env.amqp_url)).await);
            let process = workers.spawn(env, i);
            workers.processes.push(process);
        }
        workers
    }

    fn spawn(&mut self, env: &TestEnv, i: usize) -> WorkerProcess {
        self.starts += 1;
        let amqp = self.amqp[i].url_for(&env.amqp_url);
        let database = self.database.url_for(&env.database_url);
        let extra = [
            ("AMQP_URL", amqp.as_str()),
            ("DATABASE_URL", database.as_str()),
            ("RABBITMQ_PREFETCH_COUNT", "64"),
        ];
        env.spawn_binary(WORKER, &env.settings_json(), &extra, &format!("w{i}-{}", self.starts))
    }

    async fn kill(&mut self, env: &TestEnv, i: usize) {
        self.processes[i].signal("KILL");
        let status = self.processes[i].wait_exit(Duration::from_secs(10)).await;
        assert!(!status.success(), "killed, not exited");
        self.processes[i] = self.spawn(env, i);
    }

    /// Starts again any worker that exited on its own (a finding: printed
    /// and counted).
    fn revive_exited(&mut self, env: &TestEnv) {
        for i in 0..self.processes.len() {
            if let Some(status) = self.processes[i].child.try_wait().expect("try_wait") {
                let stderr = self.processes[i].stderr_text();
                let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
                println!("soak: worker {i} exited by itself ({status}); last lines: {tail:?}");
                self.unexpected_exits += 1;
                self.processes[i] = self.spawn(env, i);
            }
        }
    }

    async fn stop(&mut self) -> Vec<std::process::ExitStatus> {
        let mut statuses = Vec::new();
        for process in &mut self.processes {
            process.signal("TERM");
            statuses.push(process.wait_exit(Duration::from_secs(30)).await);
        }
        statuses
    }
}

// ---------------------------------------------------------------- faults

#[derive(Default)]
struct Faults {
    kills: u32,
    broker_cuts: u32,
    database_cuts: u32,
    database_outages: u32,
    broker_restarts: u32,
}

impl Faults {
    fn of(&self, fault: Fault) -> u32 {
        match fault {
            Fault::Kill => self.kills,
            Fault::BrokerCut => self.broker_cuts,
            Fault::DatabaseCut => self.database_cuts,
            Fault::DatabaseOutage => self.database_outages,
            Fault::BrokerRestart => self.broker_restarts,
        }
    }

    /// Every kind of fault happened, and the broker restarts are done.
    fn all_done(&self) -> bool {
        self.broker_restarts >= RESTARTS && Fault::ALL.into_iter().all(|f| self.of(f) > 0)
    }
}

impl fmt::Display for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "kill -9: {}, broker cuts: {}, database cuts: {}, database outages: {}, broker restarts: {}",
            self.kills, self.broker_cuts, self.database_cuts, self.database_outages, self.broker_restarts
        )
    }
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Kill,
    BrokerCut,
    DatabaseCut,
    DatabaseOutage,
    BrokerRestart,
}

impl Fault {
    const ALL: [Fault; 5] = [
        Fault::Kill,
        Fault::BrokerCut,
        Fault::DatabaseCut,
        Fault::DatabaseOutage,
        Fault::BrokerRestart,
    ];
}

struct Chaos {
    rng: StdRng,
    faults: Faults,
    messages: usize,
    started: Instant,
    deadline: Instant,
}

impl Chaos {
    /// One fault every 2 to 5 s while publishing, and after it until the
    /// main queue is drained and the broker was restarted `RESTARTS` times.
    async fn run(
        &mut self,
        env: &TestEnv,
        workers: &mut Workers,
        broker: &mut BrokerApp,
        confirmed: &AtomicUsize,
        publishing: &JoinHandle<Sent>,
    ) {
        loop {
            // Paces the faults; nothing waits on this.
            tokio::time::sleep(Duration::from_millis(self.rng.random_range(2000..5000))).await;
            workers.revive_exited(env);
            let published = publishing.is_finished();
            if published && self.faults.all_done() && backlog(env).await.main_ready == 0 {
                return;
            }
            assert!(
                Instant::now() < self.deadline,
                "still not drained at the deadline; faults so far: {}",
                self.faults
            );
            let share = confirmed.load(Ordering::SeqCst) as f64 / self.messages as f64;
            let fault = self.choose(share, published);
            self.inject(fault, env, workers, broker).await;
        }
    }

    /// A random fault; a broker restart more often while restarts are
    /// behind schedule (spread over the publishing), and once publishing
    /// is over, a kind that has not happened yet.
    fn choose(&mut self, share: f64, published: bool) -> Fault {
        let restarts = self.faults.broker_restarts;
        let due = f64::from(restarts + 1) / f64::from(RESTARTS + 1);
        if restarts < RESTARTS && (published || share >= due) && self.rng.random_bool(0.5) {
            return Fault::BrokerRestart;
        }
        let missing: Vec<Fault> = Fault::ALL.into_iter().filter(|f| self.faults.of(*f) == 0).collect();
        if published && !missing.is_empty() {
            return missing[self.rng.random_range(0..missing.len())];
        }
        Fault::ALL[self.rng.random_range(0..Fault::ALL.len())]
    }

    async fn inject(&mut self, fault: Fault, env: &TestEnv, workers: &mut Workers, broker: &mut BrokerApp) {
        let which = self.rng.random_range(0..WORKERS);
        let hold = Duration::from_millis(self.rng.random_range(500..2000));
        let at = self.started.elapsed().as_secs_f64();
        println!("soak: {at:>6.1}s {fault:?} (worker {which}, hold {hold:?})");
        match fault {
            Fault::Kill => {
                workers.kill(env, which).await;
                self.faults.kills += 1;
            }
            Fault::BrokerCut => {
                workers.amqp[which].cut();
                self.faults.broker_cuts += 1;
            }
            Fault::DatabaseCut => {
                workers.database.cut();
                self.faults.database_cuts += 1;
            }
            Fault::DatabaseOutage => {
                workers.database.set_refusing(true);
                workers.database.cut();
                tokio::time::sleep(hold).await; // holds the outage open
                workers.database.set_refusing(false);
                self.faults.database_outages += 1;
            }
            Fault::BrokerRestart => {
                broker.restart(hold).await;
                self.faults.broker_restarts += 1;
            }
        }
    }
}

// ---------------------------------------------------------------- broker

/// The broker's application as the soak stops and starts it. Dropped while
/// stopped (a panic mid-restart), it starts it again: the broker is shared.
#[derive(Default)]
struct BrokerApp {
    stopped: bool,
}

impl BrokerApp {
    async fn restart(&mut self, hold: Duration) {
        // `block_in_place`: the future cannot be dropped mid-command, so a
        // stop is never left half done behind the guard's back.
        self.stopped = true;
        tokio::task::block_in_place(|| rabbitmqctl(&["stop_app"]));
        tokio::time::sleep(hold).await; // holds the broker down
        tokio::task::block_in_place(|| {
            rabbitmqctl(&["start_app"]);
            rabbitmqctl(&["await_startup"]);
        });
        self.stopped = false;
    }
}

impl Drop for BrokerApp {
    fn drop(&mut self) {
        if self.stopped {
            for args in [["start_app"], ["await_startup"]] {
                let status = std::process::Command::new("rabbitmqctl").args(args).status();
                eprintln!("soak: restoring the broker: rabbitmqctl {args:?}: {status:?}");
            }
        }
    }
}

/// What is still to do: messages ready and unacked in `Q` and its retry
/// queues (from `rabbitmqctl`, which needs no connection of ours), and
/// device messages not yet published.
#[derive(Debug, PartialEq, Eq)]
struct Backlog {
    main_ready: u64,
    main_unacked: u64,
    retrying: u64,
    outbox_pending: i64,
}

async fn backlog(env: &TestEnv) -> Backlog {
    let output = tokio::process::Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "--no-table-headers"])
        .args(["name", "messages_ready", "messages_unacknowledged"])
        .output()
        .await
        .expect("run rabbitmqctl list_queues");
    let text = String::from_utf8_lossy(&output.stdout);
    let retry_prefix = format!("{}.retry.", env.queue);
    let mut backlog = Backlog {
        main_ready: u64::MAX,
        main_unacked: u64::MAX,
        retrying: 0,
        outbox_pending: env
            .count("outbox WHERE published_at IS NULL AND failed_at IS NULL")
            .await,
    };
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, ready, unacked] = fields[..] else { continue };
        let (ready, unacked): (u64, u64) = (ready.parse().unwrap_or(u64::MAX), unacked.parse().unwrap_or(u64::MAX));
        if name == env.queue {
            (backlog.main_ready, backlog.main_unacked) = (ready, unacked);
        } else if name.starts_with(&retry_prefix) {
            backlog.retrying = backlog.retrying.saturating_add(ready).saturating_add(unacked);
        }
    }
    backlog
}

/// Waits until nothing is left to do, seen twice in a row (a message
/// moving from a retry queue into `Q` between two reads is not missed).
/// Returns how long it took.
async fn wait_drained(env: &TestEnv, timeout: Duration) -> Duration {
    let started = Instant::now();
    let idle = Backlog {
        main_ready: 0,
        main_unacked: 0,
        retrying: 0,
        outbox_pending: 0,
    };
    let mut quiet = 0;
    loop {
        let seen = backlog(env).await;
        quiet = if seen == idle { quiet + 1 } else { 0 };
        if quiet == 2 {
            return started.elapsed();
        }
        assert!(started.elapsed() < timeout, "not drained after {timeout:?}: {seen:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// --------------------------------------------------------------- verdict

/// What the database, the DLQ and the device queue hold at the end.
struct Verdict {
    events: HashSet<String>,
    commands: HashSet<String>,
    measurements: HashSet<String>,
    /// Outbox rows per command id.
    outbox: HashMap<String, i64>,
    /// The `iot-error-kind` of every parked copy, per ledger id.
    parked: HashMap<String, Vec<String>>,
    /// Parked copies that match no ledger entry, by id or body.
    parked_unknown: u32,
    /// Device messages received per command id.
    device: HashMap<String, u32>,
}

impl Verdict {
    async fn gather(env: &TestEnv, ledger: &[Entry], device: &Device) -> Verdict {
        let outbox: Vec<(String, i64)> = sqlx::query_as("SELECT message_id, count(*) FROM outbox GROUP BY message_id")
            .fetch_all(&env.pool)
            .await
            .expect("outbox rows");
        let mut verdict = Verdict {
            events: column(env, "SELECT message_id FROM events").await,
            commands: column(env, "SELECT message_id FROM commands").await,
            measurements: column(env, "SELECT message_id FROM measurements").await,
            outbox: outbox.into_iter().collect(),
            parked: HashMap::new(),
            parked_unknown: 0,
            device: HashMap::new(),
        };
        verdict.take_parked(env, ledger).await;
        for message in env.drain(&device.queue).await {
            let id = message.delivery.properties.message_id().as_ref();
            let id = id.map_or_else(|| "?".to_owned(), ToString::to_string);
            *verdict.device.entry(id).or_default() += 1;
        }
        verdict
    }

    /// Takes every copy in `Q.dlq` (and reads the parking lot, once the
    /// worker has one), naming each by its `message_id` property, else by
    /// its body.
    async fn take_parked(&mut self, env: &TestEnv, ledger: &[Entry]) {
        let by_body: HashMap<&[u8], &str> = ledger.iter().map(|e| (e.body.as_slice(), e.id.as_str())).collect();
        let mut copies: Vec<(Option<String>, String)> = Vec::new();
        for message in env.drain(&env.dlq()).await {
            let properties = &message.delivery.properties;
            let id = properties.message_id().as_ref().map(ToString::to_string);
            let id = id.or_else(|| by_body.get(message.delivery.data.as_slice()).map(|id| (*id).to_owned()));
            let kind = headers::read_string(properties.headers().as_ref(), ERROR_KIND);
            copies.push((id, kind.unwrap_or_else(|| "none".into())));
        }
        let lot: Option<String> = sqlx::query_scalar("SELECT to_regclass('parked_messages')::text")
            .fetch_one(&env.pool)
            .await
            .expect("look for the parking lot");
        if lot.is_some() {
            let rows: Vec<(String, String)> = sqlx::query_as("SELECT message_id, error_kind FROM parked_messages")
                .fetch_all(&env.pool)
                .await
                .expect("parked_messages");
            copies.extend(rows.into_iter().map(|(id, kind)| (Some(id), kind)));
        }
        let known: HashSet<&str> = ledger.iter().map(|e| e.id.as_str()).collect();
        for (id, kind) in copies {
            match id.filter(|id| known.contains(id.as_str())) {
                Some(id) => self.parked.entry(id).or_default().push(kind),
                None => self.parked_unknown += 1,
            }
        }
    }

    /// Whether `entry` (valid) had its effect: its inbox row, and its
    /// measurement or its one outbox row.
    fn applied(&self, entry: &Entry) -> bool {
        match entry.kind {
            Kind::Measurement => self.events.contains(&entry.id) && self.measurements.contains(&entry.id),
            Kind::DeviceUp | Kind::DeviceDown => self.events.contains(&entry.id),
            Kind::SetLed => self.commands.contains(&entry.id) && self.outbox.contains_key(&entry.id),
            Kind::BadJson | Kind::BadData | Kind::UnknownType => false,
        }
    }

    fn recorded(&self, id: &str) -> bool {
        self.events.contains(id) || self.commands.contains(id) || self.measurements.contains(id)
    }
}

async fn column(env: &TestEnv, sql: &'static str) -> HashSet<String> {
    let ids: Vec<String> = sqlx::query_scalar(sql).fetch_all(&env.pool).await.expect(sql);
    ids.into_iter().collect()
}

/// The figures the promise is judged on.
struct Tally<'a> {
    /// Valid messages without their effect.
    unapplied: usize,
    /// Unapplied and not parked either: gone.
    lost: Vec<&'a Entry>,
    valid_parked: Vec<(&'a Entry, &'a [String])>,
    bad_missing: Vec<&'a Entry>,
    bad_applied: Vec<&'a Entry>,
    bad_distinct: usize,
    bad_copies: usize,
    /// Rows in events/commands/measurements of no ledger id.
    strangers: usize,
    /// Commands whose outbox rows are not exactly one.
    outbox_not_once: usize,
    device_missing: usize,
}

impl<'a> Tally<'a> {
    fn of(ledger: &'a [Entry], verdict: &'a Verdict) -> Tally<'a> {
        let parked = |e: &Entry| verdict.parked.get(&e.id).map(Vec::as_slice);
        let (valid, bad): (Vec<&Entry>, Vec<&Entry>) = ledger.iter().partition(|e| e.kind.is_valid());
        let known: HashSet<&str> = ledger.iter().map(|e| e.id.as_str()).collect();
        let recorded = verdict
            .events
            .iter()
            .chain(&verdict.commands)
            .chain(&verdict.measurements);
        let commands: Vec<&&Entry> = valid.iter().filter(|e| e.kind == Kind::SetLed).collect();
        Tally {
            unapplied: valid.iter().filter(|e| !verdict.applied(e)).count(),
            lost: valid
                .iter()
                .copied()
                .filter(|e| !verdict.applied(e) && parked(e).is_none())
                .collect(),
            valid_parked: valid
                .iter()
                .filter_map(|e| parked(e).map(|kinds| (*e, kinds)))
                .collect(),
            bad_missing: bad.iter().copied().filter(|e| parked(e).is_none()).collect(),
            bad_applied: bad.iter().copied().filter(|e| verdict.recorded(&e.id)).collect(),
            bad_distinct: bad.iter().filter(|e| parked(e).is_some()).count(),
            bad_copies: bad.iter().filter_map(|e| parked(e)).map(<[String]>::len).sum(),
            strangers: recorded.filter(|id| !known.contains(id.as_str())).count(),
            outbox_not_once: commands
                .iter()
                .filter(|e| verdict.outbox.get(&e.id).copied() != Some(1))
                .count(),
            device_missing: commands.iter().filter(|e| !verdict.device.contains_key(&e.id)).count(),
        }
    }

    fn assert_promise(&self, verdict: &Verdict) {
        let sample = |entries: &[&Entry]| -> Vec<String> {
            entries
                .iter()
                .take(10)
                .map(|e| format!("{} ({:?})", e.id, e.kind))
                .collect()
        };
        let parked_sample: Vec<String> = self
            .valid_parked
            .iter()
            .take(10)
            .map(|(e, kinds)| format!("{} ({:?}) as {kinds:?}", e.id, e.kind))
            .collect();
        assert!(
            self.lost.is_empty(),
            "{} valid messages lost, e.g. {:?}",
            self.lost.len(),
            sample(&self.lost)
        );
        assert!(
            self.valid_parked.is_empty(),
            "{} valid messages parked, e.g. {parked_sample:?}",
            self.valid_parked.len()
        );
        assert_eq!(self.unapplied, 0, "valid messages without their effect");
        assert!(
            self.bad_missing.is_empty(),
            "{} bad messages not parked, e.g. {:?}",
            self.bad_missing.len(),
            sample(&self.bad_missing)
        );
        assert!(
            self.bad_applied.is_empty(),
            "{} bad messages recorded, e.g. {:?}",
            self.bad_applied.len(),
            sample(&self.bad_applied)
        );
        assert_eq!(self.strangers, 0, "rows of messages never published");
        assert_eq!(self.outbox_not_once, 0, "commands without exactly one outbox row");
        assert_eq!(self.device_missing, 0, "commands whose device message never arrived");
        assert_eq!(verdict.parked_unknown, 0, "parked copies of no published message");
    }
}

fn print_figures(
    ledger: &[Entry],
    sent: &Sent,
    faults: &Faults,
    workers: &Workers,
    verdict: &Verdict,
    tally: &Tally<'_>,
    (elapsed, drain): (Duration, Duration),
) {
    let mut mix: BTreeMap<Kind, usize> = BTreeMap::new();
    for entry in ledger {
        *mix.entry(entry.kind).or_default() += 1;
    }
    let valid = ledger.iter().filter(|e| e.kind.is_valid()).count();
    let bad = ledger.len() - valid;
    let wire: u64 = sent.sends.iter().map(|&s| u64::from(s)).sum();
    let resent = sent.sends.iter().filter(|&&s| s > 1).count();
    let mut kinds: BTreeMap<&str, u32> = BTreeMap::new();
    for kind in verdict.parked.values().flatten() {
        *kinds.entry(kind.as_str()).or_default() += 1;
    }
    let secs = |d: Duration| d.as_secs_f64();
    println!("soak: messages {} (valid {valid}, bad {bad}): {mix:?}", ledger.len());
    println!(
        "soak: publisher: {} confirmed in {:.1} s ({:.0} msg/s), {wire} copies on the wire ({resent} ids sent more than once), {} connections",
        ledger.len(),
        secs(sent.elapsed),
        ledger.len() as f64 / secs(sent.elapsed),
        sent.connections
    );
    println!(
        "soak: faults: {faults}; worker starts {}, unexpected exits {}",
        workers.starts, workers.unexpected_exits
    );
    println!(
        "soak: applied {} of {valid} valid (lost, neither applied nor parked: {}), strangers {}, commands without one outbox row {}, bad recorded {}",
        valid - tally.unapplied,
        tally.lost.len(),
        tally.strangers,
        tally.outbox_not_once,
        tally.bad_applied.len()
    );
    println!(
        "soak: parked: valid {}, bad {} of {bad} distinct ({} copies, {} extra copies parked twice), unidentified {}, by kind {kinds:?}",
        tally.valid_parked.len(),
        tally.bad_distinct,
        tally.bad_copies,
        tally.bad_copies - tally.bad_distinct,
        verdict.parked_unknown
    );
    let device_copies: u32 = verdict.device.values().sum();
    println!(
        "soak: device messages: {} of {} commands received ({device_copies} copies)",
        mix.get(&Kind::SetLed).copied().unwrap_or(0) - tally.device_missing,
        mix.get(&Kind::SetLed).copied().unwrap_or(0)
    );
    println!(
        "soak: duration {:.1} s (drain after the faults {:.1} s), throughput {:.0} valid msg/s applied",
        secs(elapsed),
        secs(drain),
        (valid - tally.unapplied) as f64 / secs(elapsed)
    );
}
