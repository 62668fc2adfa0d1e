//! Shared test harness: every test gets its own queue names (random
//! suffix), its own database, and helpers that wait on conditions with a
//! deadline instead of sleeping.

pub mod browser;
pub mod command;
pub mod messages;
pub mod observe;
pub mod proxy;
pub mod raw_amqp;
pub mod sql;
pub mod tls;
pub mod topology;

pub use topology::TopologyFile;

use std::collections::BTreeMap;
use std::future::Future;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::message::BasicGetMessage;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use worker_iot_core::broker::{self, Publisher};
use worker_iot_core::config::Settings;
use worker_iot_core::headers::{self, FailureRecord};
use worker_iot_core::{ErrorKind, Event, EventHook, Metrics, Options, Readiness, Topology, WorkerError};

/// An event hook that sees every delivery before it is processed.
pub fn on_received(see: impl Fn(&Delivery) + Send + Sync + 'static) -> EventHook {
    Arc::new(move |event: &Event<'_>| {
        if let Event::Received(delivery) = event {
            see(delivery);
        }
    })
}

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The server to create test databases on (any database on it).
pub fn server_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// `url` with its database name replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let slash = base.rfind('/').expect("database URL has a path");
    let mut out = format!("{}/{name}", &base[..slash]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// Waits until `check` returns `Some`, polling, or panics after `timeout`
/// naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// One test's private queues and database.
pub struct TestEnv {
    pub queue: String,
    pub database: String,
    pub database_url: String,
    pub pool: PgPool,
    pub connection: Connection,
    pub publisher: Publisher,
    pub dir: PathBuf,
    pub topology_file: PathBuf,
    /// The topology the test started with: every queue name comes from it.
    pub topology: Topology,
    /// The broker (or comma-separated cluster nodes) of this test.
    pub amqp_url: String,
}

impl TestEnv {
    /// Creates the database (migrated), writes the topology file and
    /// declares it, so messages can be published before a worker starts.
    pub async fn new(topology: &TopologyFile) -> TestEnv {
        TestEnv::new_on(&amqp_url(), topology).await
    }

    /// Like [`TestEnv::new`], on the broker or cluster nodes `amqp_url`.
    pub async fn new_on(amqp_url: &str, topology: &TopologyFile) -> TestEnv {
        let env = TestEnv::undeclared_on(amqp_url, topology).await;
        let channel = env.connection.create_channel().await.expect("channel");
        env.topology.declare(&channel).await.expect("declare test topology");
        channel.close(200, "".into()).await.ok();
        env
    }

    /// Like [`TestEnv::new`], but leaves declaring the queues to the worker.
    pub async fn undeclared(topology: &TopologyFile) -> TestEnv {
        TestEnv::undeclared_on(&amqp_url(), topology).await
    }

    /// Like [`TestEnv::undeclared`], on the broker or cluster nodes `amqp_url`.
    pub async fn undeclared_on(amqp_url: &str, topology: &TopologyFile) -> TestEnv {
        let suffix = format!("{:016x}", rand::random::<u64>());
        let queue = format!("wic_test_{suffix}");
        let database = format!("wic_test_{suffix}");
        let database_url = with_database(&server_url(), &database);
        worker_iot_core::store::create_database(&database_url)
            .await
            .expect("create test database");
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&database_url)
            .await
            .expect("connect test database");
        worker_iot_core::store::migrate(&pool)
            .await
            .expect("migrate test database");
        let connection = broker::connect(amqp_url, "test").await.expect("connect to RabbitMQ");
        let publisher = Publisher::open(&connection).await.expect("open publisher");
        let dir = std::env::temp_dir().join(&queue);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let topology_file = dir.join("topology.toml");
        let topology_text = topology.toml(&queue);
        std::fs::write(&topology_file, &topology_text).expect("write topology");
        let topology = Topology::parse(&topology_text, &queue).expect("valid test topology");
        TestEnv {
            queue,
            database,
            database_url,
            pool,
            connection,
            publisher,
            dir,
            topology_file,
            topology,
            amqp_url: amqp_url.to_owned(),
        }
    }

    /// The test's DLQ.
    pub fn dlq(&self) -> String {
        self.topology.dlq()
    }

    /// The environment a new user would set, as key/value pairs.
    pub fn env_vars(&self, extra: &[(&str, &str)]) -> BTreeMap<String, String> {
        let mut env: BTreeMap<String, String> = [
            ("AMQP_URL", self.amqp_url.clone()),
            ("DATABASE_URL", self.database_url.clone()),
            ("RABBITMQ_LOCAL_QUEUE_NAME", self.queue.clone()),
            ("TOPOLOGY_FILE", self.topology_file.display().to_string()),
            ("METRICS_ADDR", "127.0.0.1:0".into()),
            ("DATABASE_MAX_CONNECTIONS", "8".into()),
            ("RABBITMQ_PREFETCH_COUNT", "16".into()),
            // Most tests look at the parked copies in Q.dlq; tests/it/parking.rs
            // turns the keeper on to see them move into the lot.
            ("PARKING_KEEPER", "off".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (k, v) in extra {
            env.insert((*k).to_owned(), (*v).to_owned());
        }
        env
    }

    pub fn settings(&self, extra: &[(&str, &str)]) -> Settings {
        let env = self.env_vars(extra);
        Settings::from_sources(None, |k| env.get(k).cloned())
            .expect("valid test settings")
            .0
    }

    /// Runs the worker in this process until the returned token is cancelled.
    pub fn spawn_worker(&self, extra: &[(&str, &str)]) -> RunningWorker {
        self.spawn_worker_with(self.settings(extra), None)
    }

    /// Runs the worker with these settings and an optional event hook.
    pub fn spawn_worker_with(&self, settings: Settings, events: Option<EventHook>) -> RunningWorker {
        RunningWorker::start(settings, events, false)
    }

    /// Publishes to `Q` through the default exchange, confirmed.
    pub async fn publish(&self, body: &[u8], properties: BasicProperties) {
        self.publish_to(&self.queue, body, properties).await;
    }

    pub async fn publish_to(&self, queue: &str, body: &[u8], properties: BasicProperties) {
        self.publisher
            .publish("", queue, body, properties)
            .await
            .expect("publish");
    }

    /// Publishes the measurements `m-<i>` of value `i`, for each `i` of
    /// `ids`, to `Q`.
    pub async fn publish_measurements(&self, ids: Range<i64>) {
        for i in ids {
            self.publish(&messages::measurement(&format!("m-{i}"), i), BasicProperties::default())
                .await;
        }
    }

    /// The broker's view of `queue` (a passive declare, on its own channel).
    async fn inspect(&self, queue: &str) -> Result<lapin::Queue, lapin::Error> {
        let channel = self.connection.create_channel().await?;
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let result = channel
            .queue_declare(queue.into(), options, FieldTable::default())
            .await;
        channel.close(200, "".into()).await.ok();
        result
    }

    /// Ready messages in `queue`.
    pub async fn queue_len(&self, queue: &str) -> u32 {
        let q = self.inspect(queue).await;
        q.unwrap_or_else(|e| panic!("queue {queue} should exist: {e}"))
            .message_count()
    }

    /// Consumers on `queue`, if it exists.
    pub async fn consumers(&self, queue: &str) -> Option<u32> {
        self.inspect(queue).await.ok().map(|q| q.consumer_count())
    }

    /// Takes every message from `queue` (acking them), in order.
    pub async fn drain(&self, queue: &str) -> Vec<BasicGetMessage> {
        self.get_all(queue, true).await
    }

    /// Every message of `queue`, in order, left in place: read without
    /// acking, then handed back by closing the channel.
    pub async fn peek(&self, queue: &str) -> Vec<Delivery> {
        self.get_all(queue, false)
            .await
            .into_iter()
            .map(|m| m.delivery)
            .collect()
    }

    async fn get_all(&self, queue: &str, ack: bool) -> Vec<BasicGetMessage> {
        let channel = self.connection.create_channel().await.expect("channel");
        let mut out = Vec::new();
        while let Some(message) = channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .expect("basic_get")
        {
            if ack {
                message
                    .delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .expect("ack");
            }
            out.push(message);
        }
        channel.close(200, "".into()).await.ok();
        out
    }

    /// `SELECT count(*)` of one table.
    pub async fn count(&self, table: &str) -> i64 {
        let sql = format!("SELECT count(*) FROM {table}");
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }

    /// Waits until `table` holds `expected` rows.
    pub async fn wait_for_rows(&self, table: &str, expected: i64, timeout: Duration) {
        wait_for(&format!("{expected} rows in {table}"), timeout, || async {
            (self.count(table).await == expected).then_some(())
        })
        .await;
    }

    /// Waits until `queue` holds `expected` ready messages.
    pub async fn wait_for_queue_len(&self, queue: &str, expected: u32, timeout: Duration) {
        wait_for(&format!("{expected} messages in {queue}"), timeout, || async {
            (self.queue_len(queue).await == expected).then_some(())
        })
        .await;
    }

    /// Deletes the test's queues and database (dropping the `TestEnv`
    /// does the same, so a failed test cleans up too).
    pub async fn cleanup(self) {
        self.connection.close(200, "".into()).await.ok();
        self.pool.close().await;
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let mut queues = self.topology.queues();
        queues.push(format!("{}.device", self.queue));
        let (database, dir, url) = (self.database.clone(), self.dir.clone(), self.amqp_url.clone());
        // Drop cannot await, and may run while a runtime unwinds: remove
        // everything from a thread with a runtime of its own.
        let removed = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(remove_resources(&url, &queues, &database));
            std::fs::remove_dir_all(dir).ok();
        })
        .join();
        if removed.is_err() && !std::thread::panicking() {
            panic!("cleaning up the test's queues and database failed");
        }
    }
}

/// Deletes `queues` on the broker at `url` and drops `database`.
async fn remove_resources(url: &str, queues: &[String], database: &str) {
    if let Ok(connection) = broker::connect(url, "test-cleanup").await {
        if let Ok(channel) = connection.create_channel().await {
            for name in queues {
                channel
                    .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                    .await
                    .ok();
            }
        }
        connection.close(200, "".into()).await.ok();
    }
    let mut admin = PgConnection::connect(&server_url()).await.expect("admin connection");
    let sql = format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)");
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(&mut admin)
        .await
        .expect("drop test database");
}

/// A worker running in this process.
pub struct RunningWorker {
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<Result<(), WorkerError>>,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
}

impl RunningWorker {
    /// Runs the worker in this process until `shutdown` is cancelled; with
    /// `serve_metrics`, with its HTTP server too.
    pub fn start(settings: Settings, events: Option<EventHook>, serve_metrics: bool) -> RunningWorker {
        let shutdown = CancellationToken::new();
        let options = Options {
            events,
            serve_metrics,
            ..Options::default()
        };
        let (metrics, readiness) = (options.metrics.clone(), options.readiness.clone());
        let handle = tokio::spawn(worker_iot_core::run_with(settings, shutdown.clone(), options));
        RunningWorker {
            shutdown,
            handle,
            metrics,
            readiness,
        }
    }

    /// Waits until the worker consumes `queue`.
    pub async fn wait_ready(&self, env: &TestEnv) {
        wait_for("the worker to consume", Duration::from_secs(30), || async {
            assert!(!self.handle.is_finished(), "worker stopped during start-up");
            (env.consumers(&env.queue).await.unwrap_or(0) > 0).then_some(())
        })
        .await;
    }

    /// Requests a graceful stop and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("worker stops within 30 s")
            .expect("worker task did not panic");
        result.expect("worker ran without error");
    }
}

impl TestEnv {
    /// `base` as the worker parks it: a copy with a failure record of
    /// type `MEASUREMENT`, as if it arrived on this test's queue.
    pub fn parked_properties(&self, base: BasicProperties, kind: ErrorKind, error: &str) -> BasicProperties {
        let record = FailureRecord {
            kind,
            message_type: Some("MEASUREMENT"),
            error,
            retry_count: 2,
            now_ms: 1_790_000_000_000,
            received_ms: 1_790_000_000_000,
            exchange: "",
            routing_key: &self.queue,
            failed_by: "test/0",
        };
        headers::with_failure(&base, &record)
    }

    /// Parks `body` with message id `id` in Q.dlq the way the worker does.
    pub async fn park(&self, body: &[u8], id: &str, kind: ErrorKind, error: &str) {
        let properties = self.parked_properties(BasicProperties::default().with_message_id(id.into()), kind, error);
        self.publish_to(&self.dlq(), body, properties).await;
    }
}

/// The `requeue` binary of this build.
pub const REQUEUE: &str = env!("CARGO_BIN_EXE_requeue");

impl TestEnv {
    /// `requeue --queue Q ARGS` on this test's broker and database, with
    /// an empty settings file.
    pub fn requeue(&self, args: &[&str]) -> std::process::Command {
        std::fs::write(self.dir.join("none.json"), "{}").expect("write settings");
        let mut command = std::process::Command::new(REQUEUE);
        command
            .args(["--queue", &self.queue])
            .args(args)
            .env("AMQP_URL", &self.amqp_url)
            .env("DATABASE_URL", &self.database_url)
            .env("SETTINGS_FILE", self.dir.join("none.json"));
        command
    }

    /// Runs [`TestEnv::requeue`] and checks that it succeeded.
    pub fn run_requeue(&self, args: &[&str]) -> std::process::Output {
        let output = self.requeue(args).output().expect("run requeue");
        assert!(
            output.status.success(),
            "requeue {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }
}

/// A command's stdout, one JSON value per line.
pub fn json_lines(output: &std::process::Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// A worker binary started as a user would: settings file plus environment,
/// output captured to files in the test's directory.
pub struct WorkerProcess {
    pub child: tokio::process::Child,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl TestEnv {
    /// Starts `bin` (e.g. `env!("CARGO_BIN_EXE_worker-iot-core")`) with a
    /// settings file holding `settings` (JSON) and the test's environment.
    pub fn spawn_binary(&self, bin: &str, settings: &str, extra: &[(&str, &str)], tag: &str) -> WorkerProcess {
        let settings_file = self.dir.join(format!("settings-{tag}.json"));
        std::fs::write(&settings_file, settings).expect("write settings");
        let stdout = self.dir.join(format!("{tag}.out"));
        let stderr = self.dir.join(format!("{tag}.err"));
        let mut env = self.env_vars(extra);
        // The queue name comes from the settings file, as in production.
        env.remove("RABBITMQ_LOCAL_QUEUE_NAME");
        env.insert("SETTINGS_FILE".into(), settings_file.display().to_string());
        env.entry("RUST_LOG".into()).or_insert_with(|| "warn".into());
        let child = tokio::process::Command::new(bin)
            .envs(env)
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn worker binary");
        WorkerProcess { child, stdout, stderr }
    }

    /// The settings file a user would write for this test's queue.
    pub fn settings_json(&self) -> String {
        serde_json::json!({
            "RABBITMQ_LOCAL_QUEUE_NAME": self.queue,
            "RABBITMQ_PREFETCH_COUNT": 16,
            "EVENTS_TO_OMIT": "",
            "SHUTDOWN_GRACE_MS": 5000,
        })
        .to_string()
    }
}

impl WorkerProcess {
    /// Waits for the process to exit, at most `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("worker did not exit within {timeout:?}; stderr: {}", self.stderr_text()))
            .expect("wait for worker")
    }

    /// Sends a signal by name (TERM, KILL, INT) with `kill`.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("worker is running");
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

/// A device of this test: a unique id, and a queue bound to `amq.topic`
/// for both of its routing keys (`.led.<id>` and `<id>.config`, the
/// shipped command topics), as the MQTT plugin would bind a subscribed
/// device.
pub struct Device {
    pub id: String,
    pub queue: String,
}

impl Device {
    /// A device with a durable queue, as a subscribed device has.
    pub async fn bind(env: &TestEnv) -> Device {
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        Device::bind_with(env, durable).await
    }

    /// A device whose queue is declared with `options`.
    pub async fn bind_with(env: &TestEnv, options: QueueDeclareOptions) -> Device {
        let id = format!("dev-{}", &env.queue["wic_test_".len()..]);
        let queue = format!("{}.device", env.queue);
        let channel = env.connection.create_channel().await.expect("channel");
        channel
            .queue_declare(queue.as_str().into(), options, FieldTable::default())
            .await
            .expect("declare device queue");
        for key in [format!(".led.{id}"), format!("{id}.config")] {
            channel
                .queue_bind(
                    queue.as_str().into(),
                    "amq.topic".into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("bind device queue");
        }
        channel.close(200, "".into()).await.ok();
        Device { id, queue }
    }
}
