//! Running it in production (docs/deployment.md): the worker as a
//! least-privilege PostgreSQL role, created by the shipped
//! `deploy/postgres/worker-role.sql`; an existing database moved to that
//! role by `deploy/postgres/move-to-worker-role.sql`; and TLS to PostgreSQL
//! (`sslmode=verify-full`) and RabbitMQ (`amqps://`) with a private CA that
//! the test makes, trusted through `SSL_CERT_FILE` by both clients.
//!
//! The CA and the TLS proxies are common/tls.rs, the scripts run as psql
//! would by common/sql.rs; this file's own helpers (a database and role of
//! the test, the worker as a process) are below, after the tests. The
//! binaries run as child processes with a cleared environment, so
//! `SSL_CERT_FILE` (which is process-wide) never touches this process.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use sqlx::{Connection as _, PgConnection};
use tokio::process::{Child, Command};
use url::Url;

use crate::common::browser::{CONSOLE, free_port, http};
use crate::common::command::{assert_success, output_text as text, run_clean};
use crate::common::messages::{device_up, measurement_of, set_led, unknown_type};
use crate::common::proxy::upstream_of;
use crate::common::sql::run_script;
use crate::common::tls::{Pki, TlsProxy, Upstream};
use crate::common::{amqp_url, server_url, wait_for};

/// How long a condition may take to hold.
const WAIT: Duration = Duration::from_secs(60);
const WORKER: &str = env!("CARGO_BIN_EXE_worker-iot-core");
const CREATE_DB: &str = env!("CARGO_BIN_EXE_create_db");
const DELETE_DB: &str = env!("CARGO_BIN_EXE_delete_db");
const PUBLISH: &str = env!("CARGO_BIN_EXE_publish");

const TOPOLOGY: &str = r#"
queue_type = "classic"
delivery_limit = 3
[retry]
delays = ["50ms"]
max_attempts = 3
"#;

/// The worker, as the role of worker-role.sql: `create_db` migrates, the
/// worker applies events and a command and relays its device message, and
/// `delete_db` drops the tables; the role is no superuser, cannot create a
/// database, a schema or a table outside its schema, and cannot read
/// another schema of its own database.
#[tokio::test]
async fn the_worker_runs_as_a_role_that_owns_its_tables_and_nothing_else() {
    let scratch = Scratch::new().await;
    let password = format!("{:032x}", rand::random::<u128>());
    let mut admin = scratch.admin().await;
    run_script(
        &mut admin,
        "worker-role.sql",
        &[("worker_role", &scratch.name), ("worker_password", &password)],
    )
    .await;
    // Another application's data in the same database.
    sqlx::raw_sql("CREATE SCHEMA other; CREATE TABLE other.secrets (v text); INSERT INTO other.secrets VALUES ('x')")
        .execute(&mut admin)
        .await
        .expect("other schema");
    let role_url = scratch.database_url_as(&scratch.name, &password);

    // Migrations: create_db as the role finds the database and migrates it.
    let output = run(CREATE_DB, &scratch.dir, &[("DATABASE_URL", &role_url)]).await;
    assert_success("create_db as the worker's role", &output);
    let tables: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT schemaname::text, tablename::text, tableowner::text FROM pg_tables
         WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2",
    )
    .fetch_all(&mut admin)
    .await
    .expect("list tables");
    for table in worker_iot_core::store::TABLES {
        assert!(
            tables.contains(&("iot".into(), (*table).into(), scratch.name.clone())),
            "{table} is in the schema iot and owned by the role: {tables:?}"
        );
    }
    assert!(
        tables.iter().all(|(schema, _, _)| schema != "public"),
        "nothing is created in public: {tables:?}"
    );

    // Processing and the outbox relay (its trigger, NOTIFY and LISTEN).
    let broker = Broker::connect(&amqp_url()).await;
    let device = format!("{}_led", scratch.name);
    let devices_queue = broker.device_queue(&scratch.name, &device).await;
    let mut worker = Worker::start(&scratch, &[("DATABASE_URL", &role_url), ("AMQP_URL", &amqp_url())]).await;
    broker.wait_for_consumer(&scratch.name).await;
    broker.publish(&scratch.name, &device_up("lp-up", &device)).await;
    broker
        .publish(&scratch.name, &measurement_of(&device, "lp-m", 21.5))
        .await;
    broker.publish(&scratch.name, &set_led("lp-led", &device, "on")).await;
    let (scratch_ref, device_ref) = (&scratch, &device);
    wait_for(
        "the events, the command and its device message",
        WAIT,
        move || async move {
            let row: (i64, i64, i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM iot.devices WHERE device_id = $1 AND status = 'online'),
                    (SELECT count(*) FROM iot.measurements WHERE device_id = $1),
                    (SELECT count(*) FROM iot.commands WHERE device_id = $1),
                    (SELECT count(*) FROM iot.outbox WHERE published_at IS NOT NULL)",
            )
            .bind(device_ref)
            .fetch_one(&mut scratch_ref.admin().await)
            .await
            .ok()?;
            (row == (1, 1, 1, 1)).then_some(())
        },
    )
    .await;
    let sent = broker.take_all(&devices_queue).await;
    assert_eq!(sent, vec![b"on".to_vec()], "the device got its message once");

    // The parking lot: the keeper parks as the role, and the console
    // reads and archives as the role.
    broker.publish(&scratch.name, &unknown_type("lp-bad")).await;
    wait_for("the parked message in the lot", WAIT, move || async move {
        let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM iot.parked_messages WHERE message_id = 'lp-bad'")
            .fetch_one(&mut scratch_ref.admin().await)
            .await
            .ok()?;
        (parked == 1).then_some(())
    })
    .await;
    worker.stop().await;
    console_as(&scratch, &role_url).await;

    // What the role is not, and cannot do.
    let (superuser, createdb, createrole): (bool, bool, bool) =
        sqlx::query_as("SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = $1")
            .bind(&scratch.name)
            .fetch_one(&mut admin)
            .await
            .expect("role attributes");
    assert_eq!((superuser, createdb, createrole), (false, false, false));
    let mut role = PgConnection::connect(&role_url).await.expect("connect as the role");
    for sql in [
        "CREATE DATABASE wic_test_never",
        "SELECT * FROM other.secrets",
        "CREATE TABLE public.t (v int)",
        "CREATE SCHEMA elsewhere",
        "CREATE ROLE wic_test_never",
    ] {
        let error = sqlx::raw_sql(sql).execute(&mut role).await.expect_err(sql);
        let code = error.as_database_error().and_then(|e| e.code()).map(|c| c.into_owned());
        assert_eq!(code.as_deref(), Some("42501"), "{sql}: permission denied, got {error}");
    }
    role.close().await.ok();

    // delete_db as the role drops what it owns.
    let output = run(DELETE_DB, &scratch.dir, &[("DATABASE_URL", &role_url)]).await;
    assert!(!output.status.success(), "delete_db without --yes refuses");
    let output = run_clean(DELETE_DB, &["--yes"], &scratch.dir, &[("DATABASE_URL", &role_url)]).await;
    assert_success("delete_db --yes as the worker's role", &output);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'iot'")
        .fetch_one(&mut admin)
        .await
        .expect("count tables");
    assert_eq!(left, 0, "delete_db dropped every table of the role");

    broker.delete_queues(&[&devices_queue]).await;
    admin.close().await.ok();
    scratch.drop_all().await;
}

/// A database migrated as the superuser (tables in `public`) moves to the
/// role with move-to-worker-role.sql: nothing stays behind, the rows and
/// the migration history come along, and the role migrates and writes.
#[tokio::test]
async fn an_existing_database_moves_to_the_role() {
    let scratch = Scratch::new().await;
    let mut admin = scratch.admin().await;
    let pool = worker_iot_core::store::connect(&scratch.admin_url(), 1)
        .await
        .expect("pool");
    worker_iot_core::store::migrate(&pool)
        .await
        .expect("migrate as the superuser");
    pool.close().await;
    sqlx::raw_sql(
        "INSERT INTO event_rows (message_id, type, occurred_at, data) VALUES ('before-move', 'DEVICE_UP', now(), '{}');
         INSERT INTO outbox (message_id, exchange, routing_key, body) VALUES ('before-move', 'amq.topic', 'led.x', 'on')",
    )
    .execute(&mut admin)
    .await
    .expect("rows before the move");

    let password = format!("{:032x}", rand::random::<u128>());
    run_script(
        &mut admin,
        "worker-role.sql",
        &[("worker_role", &scratch.name), ("worker_password", &password)],
    )
    .await;
    run_script(&mut admin, "move-to-worker-role.sql", &[("worker_role", &scratch.name)]).await;

    let left: Vec<String> = sqlx::query_scalar(
        "SELECT relname::text FROM pg_class WHERE relnamespace = 'public'::regnamespace
         UNION ALL SELECT proname::text FROM pg_proc WHERE pronamespace = 'public'::regnamespace",
    )
    .fetch_all(&mut admin)
    .await
    .expect("what is left in public");
    assert!(
        left.is_empty(),
        "every table, sequence, index and function moved: left {left:?}"
    );
    let foreign: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c WHERE c.relnamespace = 'iot'::regnamespace
           AND pg_get_userbyid(c.relowner) <> $1",
    )
    .bind(&scratch.name)
    .fetch_all(&mut admin)
    .await
    .expect("owners in iot");
    assert!(foreign.is_empty(), "the role owns everything in iot: not {foreign:?}");

    let role_url = scratch.database_url_as(&scratch.name, &password);
    let output = run(CREATE_DB, &scratch.dir, &[("DATABASE_URL", &role_url)]).await;
    assert_success(
        "create_db as the role after the move (history kept: nothing to migrate)",
        &output,
    );
    let mut role = PgConnection::connect(&role_url).await.expect("connect as the role");
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE message_id = 'before-move'")
        .fetch_one(&mut role)
        .await
        .expect("read as the role");
    assert_eq!(kept, 1, "the inbox kept its rows, so duplicates stay duplicates");
    // Its trigger runs the moved function (which notifies the relay).
    sqlx::raw_sql(
        "INSERT INTO outbox (message_id, exchange, routing_key, body) VALUES ('after-move', 'amq.topic', 'led.x', 'off')",
    )
    .execute(&mut role)
    .await
    .expect("the role writes the outbox (its trigger and function moved with it)");
    role.close().await.ok();
    admin.close().await.ok();
    scratch.drop_all().await;
}

/// TLS with a private CA that only `SSL_CERT_FILE` names: `create_db`
/// reaches PostgreSQL with `sslmode=verify-full`, `publish` reaches
/// RabbitMQ over `amqps://`, and the worker does both (pool, outbox relay,
/// broker sessions) and processes a message; without the CA each fails
/// with a certificate error and exit status 1.
#[tokio::test]
async fn postgres_and_rabbitmq_over_tls_with_a_private_ca() {
    let scratch = Scratch::new().await;
    let pki = Pki::make(&scratch.dir);
    let postgres = TlsProxy::start(&pki, upstream_of(&server_url()), Upstream::Postgres).await;
    let rabbitmq = TlsProxy::start(&pki, upstream_of(&amqp_url()), Upstream::Amqp).await;
    let database_url = {
        let mut url = Url::parse(&scratch.admin_url()).expect("database URL");
        url.set_host(Some("localhost")).expect("host");
        url.set_port(Some(postgres.port)).expect("port");
        url.set_query(Some("sslmode=verify-full"));
        url.to_string()
    };
    let amqps_url = {
        let mut url = Url::parse(&amqp_url()).expect("AMQP URL");
        url.set_scheme("amqps").expect("scheme");
        url.set_host(Some("localhost")).expect("host");
        url.set_port(Some(rabbitmq.port)).expect("port");
        url.to_string()
    };
    let ca = pki.ca.display().to_string();
    let broker = Broker::connect(&amqp_url()).await;
    broker.declare(&scratch.name).await;

    // Without the CA: the OS store does not know it.
    let output = run(CREATE_DB, &scratch.dir, &[("DATABASE_URL", &database_url)]).await;
    assert_eq!(
        output.status.code(),
        Some(1),
        "create_db without the CA: {}",
        text(&output)
    );
    assert!(text(&output).contains("certificate"), "says why: {}", text(&output));
    let output = run_clean(
        PUBLISH,
        &[
            "--queue",
            &scratch.name,
            "event",
            "DEVICE_UP",
            "--data",
            r#"{"device_id":"x"}"#,
        ],
        &scratch.dir,
        &[("AMQP_URL", &amqps_url)],
    )
    .await;
    assert_eq!(
        output.status.code(),
        Some(1),
        "publish without the CA: {}",
        text(&output)
    );
    assert!(text(&output).contains("certificate"), "says why: {}", text(&output));
    assert_eq!(postgres.handshakes(), 0);
    assert_eq!(rabbitmq.handshakes(), 0);

    // With it, through SSL_CERT_FILE.
    let output = run(
        CREATE_DB,
        &scratch.dir,
        &[("DATABASE_URL", &database_url), ("SSL_CERT_FILE", &ca)],
    )
    .await;
    assert_success("create_db over TLS", &output);
    assert!(postgres.handshakes() > 0, "PostgreSQL was reached through TLS");
    let device = format!("{}_tls", scratch.name);
    let data = format!(r#"{{"device_id":"{device}"}}"#);
    let output = run_clean(
        PUBLISH,
        &[
            "--queue",
            &scratch.name,
            "event",
            "DEVICE_UP",
            "--id",
            "tls-up",
            "--data",
            &data,
        ],
        &scratch.dir,
        &[("AMQP_URL", &amqps_url), ("SSL_CERT_FILE", &ca)],
    )
    .await;
    assert_success("publish over amqps", &output);
    assert!(rabbitmq.handshakes() > 0, "RabbitMQ was reached through TLS");

    let devices_queue = broker.device_queue(&scratch.name, &device).await;
    let before = (postgres.handshakes(), rabbitmq.handshakes());
    let mut worker = Worker::start(
        &scratch,
        &[
            ("DATABASE_URL", &database_url),
            ("AMQP_URL", &amqps_url),
            ("SSL_CERT_FILE", &ca),
        ],
    )
    .await;
    broker.wait_for_consumer(&scratch.name).await;
    broker.publish(&scratch.name, &set_led("tls-led", &device, "on")).await;
    let (scratch_ref, device_ref) = (&scratch, &device);
    wait_for(
        "the event and the command applied, the device message relayed",
        WAIT,
        move || async move {
            let row: (i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM devices WHERE device_id = $1),
                    (SELECT count(*) FROM outbox WHERE published_at IS NOT NULL)",
            )
            .bind(device_ref)
            .fetch_one(&mut scratch_ref.admin().await)
            .await
            .ok()?;
            (row == (1, 1)).then_some(())
        },
    )
    .await;
    assert_eq!(broker.take_all(&devices_queue).await, vec![b"on".to_vec()]);
    worker.stop().await;
    // The pool and the relay's LISTEN connection; the consuming, copies and
    // relay connections to the broker.
    assert!(
        postgres.handshakes() >= before.0 + 2,
        "{} PostgreSQL handshakes",
        postgres.handshakes()
    );
    assert!(
        rabbitmq.handshakes() >= before.1 + 3,
        "{} RabbitMQ handshakes",
        rabbitmq.handshakes()
    );

    // The worker without the CA waits for its database, saying why each
    // time (docs/operations.md, "The database at start"), and stops on
    // SIGTERM.
    let mut worker = Worker::start(&scratch, &[("DATABASE_URL", &database_url), ("AMQP_URL", &amqps_url)]).await;
    let worker_ref = &worker;
    wait_for("the worker to say twice why it waits", WAIT, move || async move {
        let log = worker_ref.log();
        (log.matches("waiting for the database").count() >= 2).then_some(log)
    })
    .await;
    let log = worker.log();
    assert!(log.contains("certificate"), "says why: {log}");
    worker.stop().await;

    broker.delete_queues(&[&devices_queue]).await;
    scratch.drop_all().await;
}

// ---------------------------------------------------------------------------
// Helpers.

/// Runs a binary to its end in `dir`, with only `env` (and `PATH`) in its
/// environment.
async fn run(bin: &str, dir: &Path, env: &[(&str, &str)]) -> Output {
    run_clean(bin, &[], dir, env).await
}

/// One test's database, role (the same name), queues (the same name, its
/// retry queue and DLQ) and directory; removed by [`Scratch::drop_all`],
/// or when dropped (a failing test) by a thread of its own.
struct Scratch {
    name: String,
    dir: PathBuf,
    dropped: bool,
}

impl Scratch {
    async fn new() -> Scratch {
        let name = format!("wic_test_{:016x}", rand::random::<u64>());
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("topology.toml"), TOPOLOGY).expect("topology file");
        let mut server = PgConnection::connect(&server_url())
            .await
            .expect("connect as the superuser");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut server)
            .await
            .expect("create the test database");
        server.close().await.ok();
        Scratch {
            name,
            dir,
            dropped: false,
        }
    }

    /// The test database, as the superuser.
    fn admin_url(&self) -> String {
        let mut url = Url::parse(&server_url()).expect("DATABASE_URL");
        url.set_path(&format!("/{}", self.name));
        url.to_string()
    }

    async fn admin(&self) -> PgConnection {
        PgConnection::connect(&self.admin_url())
            .await
            .expect("connect to the test database")
    }

    /// The test database, as `user`.
    fn database_url_as(&self, user: &str, password: &str) -> String {
        let mut url = Url::parse(&self.admin_url()).expect("URL");
        url.set_username(user).expect("user");
        url.set_password(Some(password)).expect("password");
        url.to_string()
    }

    /// What a worker of this test needs besides `extra`.
    fn worker_env<'a>(&'a self, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, String)> {
        let mut env = vec![
            ("RABBITMQ_LOCAL_QUEUE_NAME", self.name.clone()),
            ("TOPOLOGY_FILE", self.dir.join("topology.toml").display().to_string()),
            ("METRICS_ADDR", "127.0.0.1:0".into()),
            ("RABBITMQ_PREFETCH_COUNT", "16".into()),
            ("DATABASE_MAX_CONNECTIONS", "4".into()),
            ("RUST_LOG", "info".into()),
        ];
        env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        env
    }

    async fn drop_all(mut self) {
        self.dropped = true;
        cleanup(&self.name, &self.dir).await;
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let (name, dir) = (self.name.clone(), self.dir.clone());
        // Drop cannot await, and this runtime may be shutting down.
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(cleanup(&name, &dir));
        })
        .join()
        .ok();
    }
}

async fn cleanup(name: &str, dir: &Path) {
    if let Ok(mut server) = PgConnection::connect(&server_url()).await {
        for sql in [
            format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
            format!("DROP ROLE IF EXISTS \"{name}\""),
        ] {
            if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut server).await {
                eprintln!("cleanup of {name}: {e}");
            }
        }
        server.close().await.ok();
    }
    if let Ok(broker) = Connection::connect(&amqp_url(), Default::default()).await
        && let Ok(channel) = broker.create_channel().await
    {
        for queue in [name.to_owned(), format!("{name}.retry.50ms"), format!("{name}.dlq")] {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
                .ok();
        }
        broker.close(200, "".into()).await.ok();
    }
    std::fs::remove_dir_all(dir).ok();
}

/// The console as the role: it migrates nothing new, lists the lot and
/// archives the parked message through the JSON API.
async fn console_as(scratch: &Scratch, role_url: &str) {
    let token = "deploy-test-token-0123456789";
    let addr = format!("127.0.0.1:{}", free_port());
    let env = [
        ("DATABASE_URL", role_url),
        ("AMQP_URL", &amqp_url()),
        ("CONSOLE_ADDR", &addr),
        ("CONSOLE_TOKEN", token),
    ];
    let mut console = Worker::start_binary(CONSOLE, scratch, &env).await;
    let listening = &console;
    wait_for("the console to listen", WAIT, move || async move {
        listening.log().contains("console listening").then_some(())
    })
    .await;
    let bearer = format!("Authorization: Bearer {token}");
    let (status, _, body) = http(&addr, &format!("GET /api/groups HTTP/1.1\r\n{bearer}"), "").await;
    assert_eq!(status, 200, "{body}\n{}", console.log());
    assert!(body.contains("TELEPORT"), "{body}");
    let archive = r#"{"action": "archive", "filter": {"ids": ["lp-bad"]}}"#;
    let post = format!("POST /api/actions HTTP/1.1\r\n{bearer}\r\nContent-Type: application/json");
    let (status, _, body) = http(&addr, &post, archive).await;
    assert_eq!(status, 200, "{body}\n{}", console.log());
    assert!(body.contains(r#""messages":1"#), "{body}");
    console.stop().await;
}

/// A worker process of a test, stopped by SIGTERM in [`Worker::stop`] or
/// killed when dropped.
struct Worker {
    child: Child,
    log: PathBuf,
}

impl Worker {
    async fn start(scratch: &Scratch, extra: &[(&str, &str)]) -> Worker {
        Worker::start_binary(WORKER, scratch, extra).await
    }

    /// Starts `bin` (the worker, or the console) with the worker's
    /// environment plus `extra`.
    async fn start_binary(bin: &str, scratch: &Scratch, extra: &[(&str, &str)]) -> Worker {
        let log = scratch.dir.join(format!("worker-{:08x}.log", rand::random::<u32>()));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(bin)
            .current_dir(&scratch.dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(scratch.worker_env(extra))
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("start the worker");
        Worker { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn stop(&mut self) {
        let pid = self.child.id().expect("the worker runs").to_string();
        let sent = std::process::Command::new("kill").args(["-TERM", &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "SIGTERM to the worker");
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the worker stops within 30 s")
            .expect("wait for the worker");
        assert!(status.success(), "the worker exits 0 on SIGTERM:\n{}", self.log());
    }
}

/// A plain AMQP connection of the test (no TLS), with confirms.
struct Broker {
    connection: Connection,
    channel: Channel,
}

impl Broker {
    async fn connect(url: &str) -> Broker {
        let connection = Connection::connect(url, Default::default())
            .await
            .expect("connect to RabbitMQ");
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        Broker { connection, channel }
    }

    /// Declares `queue` as the worker will (classic, dead-lettering to its DLQ).
    async fn declare(&self, queue: &str) {
        let topology = worker_iot_core::Topology::parse(TOPOLOGY, queue).expect("topology");
        topology.declare(&self.channel).await.expect("declare the topology");
    }

    /// A queue that takes `device`'s LED messages from `amq.topic`.
    async fn device_queue(&self, name: &str, device: &str) -> String {
        let queue = format!("{name}.device");
        let options = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        self.channel
            .queue_declare(queue.as_str().into(), options, FieldTable::default())
            .await
            .expect("declare the device queue");
        self.channel
            .queue_bind(
                queue.as_str().into(),
                "amq.topic".into(),
                format!(".led.{device}").as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind the device queue");
        queue
    }

    async fn wait_for_consumer(&self, queue: &str) {
        let connection = &self.connection;
        wait_for("the worker to consume", WAIT, move || async move {
            let options = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            let channel = connection.create_channel().await.ok()?;
            let declared = channel
                .queue_declare(queue.into(), options, FieldTable::default())
                .await;
            channel.close(200, "".into()).await.ok();
            (declared.ok()?.consumer_count() > 0).then_some(())
        })
        .await;
    }

    async fn publish(&self, queue: &str, body: &[u8]) {
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish");
        let body = String::from_utf8_lossy(body);
        assert!(confirm.await.expect("confirm").is_ack(), "the broker took {body}");
    }

    /// Every message of `queue`, acked, in order.
    async fn take_all(&self, queue: &str) -> Vec<Vec<u8>> {
        let mut bodies = Vec::new();
        while let Some(message) = self
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic_get")
        {
            bodies.push(message.delivery.data.clone());
        }
        bodies
    }

    async fn delete_queues(&self, queues: &[&str]) {
        for queue in queues {
            self.channel
                .queue_delete((*queue).into(), QueueDeleteOptions::default())
                .await
                .ok();
        }
    }
}
