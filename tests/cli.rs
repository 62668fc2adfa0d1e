//! Every binary's command line, run as an operator would: `--help` and
//! `--version` change nothing, `--check-config` touches neither broker nor
//! database, `delete_db` names its target and wants `--yes`.

mod common;

use std::process::Output;

use common::{FAST_TOPOLOGY, TestEnv};

const BINARIES: [&str; 5] = [
    env!("CARGO_BIN_EXE_worker-iot-core"),
    env!("CARGO_BIN_EXE_create_db"),
    env!("CARGO_BIN_EXE_delete_db"),
    env!("CARGO_BIN_EXE_requeue"),
    env!("CARGO_BIN_EXE_publish"),
];
const WORKER: &str = env!("CARGO_BIN_EXE_worker-iot-core");
const DELETE_DB: &str = env!("CARGO_BIN_EXE_delete_db");

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
    let env = TestEnv::new(FAST_TOPOLOGY).await;
    // A database that must not appear: create_db and the worker would
    // create it if --help ran them.
    let absent = format!("{}_absent", env.database);
    let url = common::with_database(&env.database_url, &absent);
    let before = tables(&env).await;
    for bin in BINARIES {
        for flag in ["--help", "--version"] {
            let out = run(&env, bin, &[flag], &[("DATABASE_URL", &url)]);
            assert!(out.status.success(), "{bin} {flag}: {}", text(&out.stderr));
            let shown = text(&out.stdout);
            match flag {
                "--help" => assert!(shown.contains("Usage:"), "{bin}: {shown}"),
                _ => assert!(shown.contains(env!("CARGO_PKG_VERSION")), "{bin}: {shown}"),
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
    let env = TestEnv::undeclared(FAST_TOPOLOGY).await;
    let absent = format!("{}_absent", env.database);
    let url = common::with_database(&env.database_url, &absent).replace("postgres@", "postgres:pw@");
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
    let env = TestEnv::new(FAST_TOPOLOGY).await;
    let before = tables(&env).await;
    assert!(before >= 7, "migrated: {before} tables");
    let target = format!("database '{}' on 127.0.0.1:5432", env.database);

    let out = run(&env, DELETE_DB, &[], &[]);
    assert_eq!(out.status.code(), Some(2));
    let refusal = text(&out.stderr);
    assert!(refusal.contains(&target) && refusal.contains("--yes"), "{refusal}");
    assert_eq!(tables(&env).await, before, "nothing dropped without --yes");

    let out = run(&env, DELETE_DB, &["--yes"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&target), "{}", text(&out.stdout));
    assert_eq!(tables(&env).await, 0);
    env.cleanup().await;
}
