//! Every binary's command line, run as an operator would: `--help` and
//! `--version` change nothing, `--check-config` touches neither broker nor
//! database, `delete_db` names its target and wants `--yes`; and the one
//! convention of every binary (docs/operations.md, "The binaries" and
//! docs/configuration.md, "Bad values"): no password in any output, exit 2
//! for a bad setting of a binary that uses it (and none for one it does
//! not), 1 for a runtime error, 130 on Ctrl-C.

use std::process::Output;
use std::time::Duration;

use crate::common::{TestEnv, TopologyFile, wait_for};
use tokio::net::TcpListener;

const BINARIES: [&str; 5] = [WORKER, CREATE_DB, DELETE_DB, REQUEUE, PUBLISH];
const WORKER: &str = env!("CARGO_BIN_EXE_worker-iot-core");
const CREATE_DB: &str = env!("CARGO_BIN_EXE_create_db");
const DELETE_DB: &str = env!("CARGO_BIN_EXE_delete_db");
const REQUEUE: &str = env!("CARGO_BIN_EXE_requeue");
const PUBLISH: &str = env!("CARGO_BIN_EXE_publish");
const CONSOLE: &str = env!("CARGO_BIN_EXE_console");

/// A password no output may show.
const PASSWORD: &str = "S3cretPW";

/// Each binary as a user would run it to do its job: the arguments after
/// its path, and whether it reads `AMQP_URL` and `DATABASE_URL`.
const JOBS: [(&str, &[&str], bool, bool); 5] = [
    (WORKER, &[], true, true),
    (CREATE_DB, &[], false, true),
    (DELETE_DB, &["-y"], false, true),
    (REQUEUE, &["--list"], true, true),
    (PUBLISH, &["sample", "--count", "1"], true, false),
];

/// The file name of a binary, as it names itself.
fn name(bin: &str) -> &str {
    bin.rsplit('/').next().unwrap_or(bin)
}

/// Runs `bin` with the test's environment plus `extra`.
fn run(env: &TestEnv, bin: &str, args: &[&str], extra: &[(&str, &str)]) -> Output {
    let settings = env.dir.join("settings.json");
    std::fs::write(&settings, env.settings_json()).unwrap();
    std::process::Command::new(bin)
        .args(args)
        .envs(env.env_vars(extra))
        .env("SETTINGS_FILE", settings)
        .output()
        .expect("run binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn database_exists(env: &TestEnv, name: &str) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

async fn tables(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_and_version_do_nothing_else() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    // A database that must not appear: create_db and the worker would
    // create it if --help ran them.
    let absent = format!("{}_absent", env.database);
    let url = crate::common::with_database(&env.database_url, &absent);
    let before = tables(&env).await;
    for bin in BINARIES {
        for flag in ["--help", "--version"] {
            let out = run(&env, bin, &[flag], &[("DATABASE_URL", &url)]);
            assert!(out.status.success(), "{bin} {flag}: {}", text(&out.stderr));
            let shown = text(&out.stdout);
            match flag {
                "--help" => assert!(shown.contains("Usage:"), "{bin}: {shown}"),
                _ => assert_eq!(
                    shown.trim_end(),
                    format!("{} {}", name(bin), env!("CARGO_PKG_VERSION")),
                    "--version names the binary"
                ),
            }
        }
    }
    let out = run(&env, DELETE_DB, &["--help", "--yes"], &[]);
    assert!(out.status.success());
    assert!(!database_exists(&env, &absent).await, "--help created no database");
    assert_eq!(tables(&env).await, before, "delete_db --help --yes dropped nothing");
    assert_eq!(env.consumers(&env.queue).await, Some(0), "no worker started");
    let out = run(&env, WORKER, &["--bogus"], &[]);
    assert_eq!(out.status.code(), Some(2), "a bad flag");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_validates_without_touching_broker_or_database() {
    let env = TestEnv::undeclared(&TopologyFile::fast()).await;
    let absent = format!("{}_absent", env.database);
    let url = crate::common::with_database(&env.database_url, &absent).replace("postgres@", "postgres:pw@");
    // Nothing listens on port 1: a worker that connected would fail.
    let unreachable = [
        ("AMQP_URL", "amqp://guest:s3cret@127.0.0.1:1/%2f"),
        ("DATABASE_URL", url.as_str()),
    ];
    let out = run(&env, WORKER, &["--check-config"], &unreachable);
    let shown = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{shown}{}", text(&out.stderr));
    assert!(shown.contains("configuration is valid"), "{shown}");
    assert!(
        shown.contains(&format!("{}.dlq", env.queue)),
        "lists the queues: {shown}"
    );
    assert!(
        !shown.contains("s3cret") && !shown.contains(":pw@"),
        "passwords masked: {shown}"
    );
    assert!(!database_exists(&env, &absent).await);
    assert_eq!(env.consumers(&env.queue).await, None, "no queue declared");

    let out = run(&env, WORKER, &["--check-config"], &[("OUTBOX_RETENTION_DAYS", "0")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("invalid setting OUTBOX_RETENTION_DAYS=\"0\""));
    std::fs::write(&env.topology_file, "queue_type = \"fancy\"").unwrap();
    let out = run(&env, WORKER, &["--check-config"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("topology"), "{}", text(&out.stderr));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_db_names_what_it_drops_and_wants_yes() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let before = tables(&env).await;
    assert!(before >= 7, "migrated: {before} tables");
    // As the binary describes it, from the URL in use (compose's is
    // postgres:5432, not 127.0.0.1): `database 'NAME' on HOST:PORT as user 'U'`.
    let target = worker_iot_core::store::describe_database(&env.database_url).unwrap();
    assert!(
        target.starts_with(&format!("database '{}' on ", env.database)),
        "{target}"
    );

    let out = run(&env, DELETE_DB, &[], &[]);
    assert_eq!(out.status.code(), Some(2));
    let refusal = text(&out.stderr);
    assert!(refusal.contains(&target) && refusal.contains("--yes"), "{refusal}");
    assert_eq!(tables(&env).await, before, "nothing dropped without --yes");

    let out = run(&env, DELETE_DB, &["-y"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&target), "{}", text(&out.stdout));
    assert_eq!(tables(&env).await, 0);
    env.cleanup().await;
}

/// Asserts that `out` shows no password, naming `what`.
fn assert_no_password(what: &str, out: &Output) {
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(!all.contains(PASSWORD), "{what} printed the password:\n{all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_url_exits_2_from_every_binary_that_uses_it_without_showing_the_password() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let bad_amqp = format!("amqp://iot:{PASSWORD}@127.0.0.1:notaport/%2f");
    let bad_database = format!("postgres://postgres:{PASSWORD}@127.0.0.1:notaport/x");
    for (bin, args, uses_amqp, uses_database) in JOBS {
        for (key, value, uses) in [
            ("AMQP_URL", &bad_amqp, uses_amqp),
            ("DATABASE_URL", &bad_database, uses_database),
        ] {
            if !uses {
                continue;
            }
            let what = format!("{} with a bad {key}", name(bin));
            let out = run(&env, bin, args, &[(key, value), ("RUST_LOG", "debug")]);
            assert_no_password(&what, &out);
            let said = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{what}: {said}");
            assert!(
                said.starts_with(&format!("{}: invalid setting {key}=\"", name(bin))),
                "{what}: {said}"
            );
            assert!(
                said.contains("****@127.0.0.1:notaport"),
                "{what}: the value, masked: {said}"
            );
            assert!(said.contains("(from environment)"), "{what}: {said}");
            assert!(
                said.contains("the port is not a number from 1 to 65535"),
                "{what}: {said}"
            );
            assert_eq!(said.lines().count(), 1, "{what}: one line: {said}");
        }
        // Both bad at once: every binary uses one of them.
        let both = [("AMQP_URL", bad_amqp.as_str()), ("DATABASE_URL", bad_database.as_str())];
        let out = run(&env, bin, args, &both);
        assert_no_password(name(bin), &out);
        assert_eq!(out.status.code(), Some(2), "{}: {}", name(bin), text(&out.stderr));
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_exits_1_from_every_binary_without_showing_the_password() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    // Nothing listens on port 1.
    let amqp = format!("amqp://iot:{PASSWORD}@127.0.0.1:1/%2f");
    let database = format!("postgres://postgres:{PASSWORD}@127.0.0.1:1/x");
    // Not the worker: it waits for its database (the test below).
    for (bin, args, _, _) in JOBS.into_iter().filter(|job| job.0 != WORKER) {
        let what = format!("{} with unreachable servers", name(bin));
        let unreachable = [("AMQP_URL", amqp.as_str()), ("DATABASE_URL", database.as_str())];
        let out = run(&env, bin, args, &unreachable);
        assert_no_password(&what, &out);
        let said = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {said}");
        assert!(said.starts_with(&format!("{}: ", name(bin))), "{what}: {said}");
        // One error chain, each cause once.
        for cause in [
            "Connection refused",
            "pool timed out",
            "error communicating with database",
        ] {
            assert!(said.matches(cause).count() <= 1, "{what}: {cause} repeated: {said}");
        }
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_retrying_an_unreachable_broker_shows_no_password() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let amqp = format!("amqp://iot:{PASSWORD}@127.0.0.1:1/%2f");
    // A password PostgreSQL's trust authentication ignores: the worker gets
    // as far as the broker, which it retries, logging every failure.
    let database = env.database_url.replace("postgres@", &format!("postgres:{PASSWORD}@"));
    let extra = [
        ("AMQP_URL", amqp.as_str()),
        ("DATABASE_URL", database.as_str()),
        ("RUST_LOG", "debug"),
    ];
    let mut worker = env.spawn_binary(WORKER, &env.settings_json(), &extra, "unreachable");
    wait_for(
        "the worker to log a refused broker connection",
        Duration::from_secs(30),
        || async { worker.stdout_text().contains("Connection refused").then_some(()) },
    )
    .await;
    worker.signal("TERM");
    let status = worker.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "stopped by SIGTERM: {}", worker.stderr_text());
    let all = format!("{}{}", worker.stdout_text(), worker.stderr_text());
    let row = format!("  {:<26} = amqp://iot:****@127.0.0.1:1/%2f\n", "AMQP_URL");
    assert!(all.contains(&row), "the banner shows the URL masked:\n{all}");
    assert!(!all.contains(PASSWORD), "the worker printed the password:\n{all}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_refuses_a_bad_port_rust_log_or_worker_setting() {
    let env = TestEnv::undeclared(&TopologyFile::fast()).await;
    let out = run(
        &env,
        WORKER,
        &["--check-config"],
        &[("AMQP_URL", "amqp://iot:pw@rabbit:notaport/%2f")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr).trim_end(),
        "worker-iot-core: invalid setting AMQP_URL=\"amqp://iot:****@rabbit:notaport/%2f\" (from environment): \
         expected amqp:// or amqps:// URLs such as amqp://user:password@host:5672/%2f \
         (several, of one cluster, separated by commas; a comma in a password is written %2C); \
         here the port is not a number from 1 to 65535"
    );
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));

    // Every bad value at once, each on its line.
    let out = run(
        &env,
        WORKER,
        &["--check-config"],
        &[("RUST_LOG", "worker_iot_core=loud"), ("BATCH_MAX_SIZE", "abc")],
    );
    assert_eq!(out.status.code(), Some(2));
    let said = text(&out.stderr);
    let keys: Vec<&str> = said
        .lines()
        .map(|line| {
            line.trim_start_matches("worker-iot-core: invalid setting ")
                .split('=')
                .next()
                .unwrap()
        })
        .collect();
    assert_eq!(keys, ["BATCH_MAX_SIZE", "RUST_LOG"], "{said}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_says_where_each_value_came_from() {
    let env = TestEnv::undeclared(&TopologyFile::fast()).await;
    let settings = env.dir.join("check-config.json");
    let file = serde_json::json!({"SHUTDOWN_GRACE_MS": 5000, "RUST_LOG": "debug", "NO_SUCH_KEY": 1});
    std::fs::write(&settings, file.to_string()).unwrap();
    let mut command = std::process::Command::new(WORKER);
    command
        .arg("--check-config")
        .envs(env.env_vars(&[("RABBITMQ_PREFETCH_COUNT", "12")]))
        .env("SETTINGS_FILE", &settings)
        .env_remove("RUST_LOG");
    let out = command.output().unwrap();
    let shown = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{shown}{}", text(&out.stderr));
    for (key, value) in [
        ("SETTINGS_FILE", format!("{}  (environment; read)", settings.display())),
        ("RABBITMQ_PREFETCH_COUNT", "12  (environment)".into()),
        ("SHUTDOWN_GRACE_MS", "5000  (settings file)".into()),
        ("BATCH_MAX_SIZE", "64  (default)".into()),
        ("RUST_LOG", "info  (default)".into()),
        (
            "AMQP_URL",
            format!(
                "{}  (environment)",
                worker_iot_core::config::mask_passwords(&env.amqp_url)
            ),
        ),
    ] {
        let row = format!("  {key:<27} = {value}\n");
        assert!(shown.contains(&row), "{row:?} in:\n{shown}");
    }
    // Warnings go to stderr, not into the configuration.
    let warned = text(&out.stderr);
    assert!(warned.contains("warning: unknown key \"NO_SUCH_KEY\""), "{warned}");
    assert!(
        warned.contains("warning: RUST_LOG in the settings file is ignored"),
        "{warned}"
    );
    assert!(!shown.contains("warning"), "{shown}");

    let out = command.arg("--json").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    let prefetch = lines
        .iter()
        .find(|line| line["key"] == "RABBITMQ_PREFETCH_COUNT")
        .unwrap();
    assert_eq!(
        (&prefetch["value"], &prefetch["source"]),
        (&"12".into(), &"environment".into())
    );
    let summary = lines.last().unwrap();
    assert_eq!(
        (&summary["record"], &summary["valid"]),
        (&"summary".into(), &true.into())
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_only_setting_does_not_stop_publish_or_requeue() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let worker_only = [("BATCH_MAX_SIZE", "abc"), ("RUST_LOG", "x=loud")];
    let out = run(&env, PUBLISH, &["--json", "sample", "--count", "2"], &worker_only);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let summary: serde_json::Value = serde_json::from_str(text(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(summary["published"], 2, "{summary}");
    assert_eq!(env.queue_len(&env.queue).await, 2);
    let out = run(&env, REQUEUE, &["--list"], &worker_only);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = run(&env, CREATE_DB, &[], &worker_only);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // The worker uses both, and says so.
    let out = run(&env, WORKER, &["--check-config"], &worker_only);
    assert_eq!(out.status.code(), Some(2));
    // publish --trace sets up logging, so it checks RUST_LOG.
    let out = run(&env, PUBLISH, &["--trace", "raw", "x"], &worker_only);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("invalid setting RUST_LOG="));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_2() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    for (bin, args) in [
        (PUBLISH, &[][..]),
        (PUBLISH, &["event", "X", "--data", "{"]),
        (PUBLISH, &["sample", "--count", "many"]),
        (REQUEUE, &["--rate", "0"]),
        (DELETE_DB, &["--bogus"]),
        (CREATE_DB, &["extra"]),
    ] {
        let out = run(&env, bin, args, &[]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{} {args:?}: {}",
            name(bin),
            text(&out.stderr)
        );
    }
    assert_eq!(env.queue_len(&env.queue).await, 0, "nothing published");
    env.cleanup().await;
}

/// Runs `bin` against `key` pointing at a server that accepts the
/// connection and never answers, interrupts it once connected, and returns
/// its output.
async fn interrupt_while_connecting(env: &TestEnv, bin: &str, args: &[&str], key: &str, url: &str) -> Output {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let url = url.replace("PORT", &port.to_string());
    let child = tokio::process::Command::new(bin)
        .args(args)
        .envs(env.env_vars(&[(key, &url)]))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (_silent, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
        .await
        .expect("the binary connects")
        .unwrap();
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the binary stops on SIGINT")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_exits_130() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let amqp = format!("amqp://iot:{PASSWORD}@127.0.0.1:PORT/%2f");
    let out = interrupt_while_connecting(&env, PUBLISH, &["raw", "x"], "AMQP_URL", &amqp).await;
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "publish: interrupted\n");
    let database = format!("postgres://postgres:{PASSWORD}@127.0.0.1:PORT/x");
    let out = interrupt_while_connecting(&env, CREATE_DB, &[], "DATABASE_URL", &database).await;
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "create_db: interrupted\n");

    // The worker finishes its in-flight work first, then exits 130.
    let mut worker = env.spawn_binary(WORKER, &env.settings_json(), &[], "interrupted");
    wait_for("the worker to consume", Duration::from_secs(30), || async {
        (env.consumers(&env.queue).await.unwrap_or(0) > 0).then_some(())
    })
    .await;
    worker.signal("INT");
    let status = worker.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(130), "{}", worker.stderr_text());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_waits_for_its_database_naming_it_and_the_cause() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    // Nothing listens on port 1: a database not up yet.
    let database = format!("postgres://postgres:{PASSWORD}@127.0.0.1:1/lot");
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], crate::common::browser::free_port()));
    let metrics_addr = metrics.to_string();
    let extra = [("DATABASE_URL", database.as_str()), ("METRICS_ADDR", &metrics_addr)];
    let mut worker = env.spawn_binary(WORKER, &env.settings_json(), &extra, "no-database");
    wait_for("three attempts, each logged", Duration::from_secs(30), || async {
        (worker.stdout_text().matches("waiting for the database").count() >= 3).then_some(())
    })
    .await;
    // `/readyz` answers while it waits, and says why it is not ready.
    let not_ready = worker_iot_core::probe_ready(metrics)
        .await
        .expect("/readyz answers")
        .unwrap_err();
    assert!(
        not_ready.contains("database unreachable: waiting for it at start-up: database 'lot' on 127.0.0.1:1")
            && not_ready.contains("connection refused"),
        "{not_ready}"
    );
    let said = worker.stdout_text();
    assert!(
        said.contains("database 'lot' on 127.0.0.1:1 as user 'postgres'"),
        "names the database: {said}"
    );
    assert!(said.contains("connection refused"), "names the cause: {said}");
    assert!(!said.contains("pool timed out"), "{said}");
    worker.signal("TERM");
    let status = worker.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "stopped by SIGTERM: {}", worker.stderr_text());
    let all = format!("{said}{}", worker.stderr_text());
    assert!(!all.contains(PASSWORD), "{all}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_ends_a_binary_quietly() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let mut jobs: Vec<(&str, Vec<&str>)> = vec![
        (WORKER, vec!["--check-config"]),
        (WORKER, vec!["--check-config", "--json"]),
        (CREATE_DB, vec![]),
        (REQUEUE, vec!["--list"]),
        (PUBLISH, vec!["sample", "--count", "1"]),
    ];
    for bin in [WORKER, CREATE_DB, DELETE_DB, REQUEUE, PUBLISH, CONSOLE] {
        jobs.push((bin, vec!["--generate-completions", "bash"]));
    }
    for (bin, args) in jobs {
        // The reading end is closed before the binary starts: every write
        // fails with EPIPE, as under `| head` once head has quit.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let settings = env.dir.join("settings.json");
        std::fs::write(&settings, env.settings_json()).unwrap();
        let out = std::process::Command::new(bin)
            .args(&args)
            .envs(env.env_vars(&[]))
            .env("SETTINGS_FILE", settings)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let said = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{} {args:?}: {said}", name(bin));
        assert!(!said.contains("panicked"), "{} {args:?}: {said}", name(bin));
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_db_help_names_every_table_it_drops() {
    let env = TestEnv::undeclared(&TopologyFile::fast()).await;
    let out = run(&env, DELETE_DB, &["--help"], &[]);
    let help = text(&out.stdout);
    assert!(out.status.success(), "{help}");
    for table in worker_iot_core::store::TABLES {
        assert!(help.contains(table), "{table} missing from:\n{help}");
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_exits_130_on_ctrl_c_and_0_on_sigterm() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    for (signal, code) in [("INT", 130), ("TERM", 0)] {
        let mut console = env.spawn_console(&[], &format!("signal-{signal}")).await;
        console.process.signal(signal);
        let status = console.process.wait_exit(Duration::from_secs(30)).await;
        assert_eq!(
            status.code(),
            Some(code),
            "SIG{signal}: {}",
            console.process.stderr_text()
        );
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_against_a_missing_database_creates_nothing_and_says_so() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let absent = format!("{}_absent", env.database);
    let url = crate::common::with_database(&env.database_url, &absent);
    for args in [
        &["--list", "--dry-run"][..],
        &["--dry-run"],
        &["--show", "x", "--dry-run"],
    ] {
        let out = run(&env, REQUEUE, args, &[("DATABASE_URL", &url)]);
        let said = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {said}");
        assert!(
            said.contains(&format!("database '{absent}' on ")) && said.contains("does not exist"),
            "{args:?}: {said}"
        );
        assert!(!database_exists(&env, &absent).await, "{args:?} created the database");
    }
    env.cleanup().await;
}
