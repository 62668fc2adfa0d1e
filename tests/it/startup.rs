//! The worker binary as a new user starts it: settings file plus
//! environment, topology declared for both queue types, clear refusals,
//! and a graceful SIGTERM that loses nothing.

use std::time::Duration;

use crate::common::messages::{device_up, measurement};
use crate::common::{TestEnv, TopologyFile, wait_for};
use lapin::BasicProperties;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};

const WORKER: &str = env!("CARGO_BIN_EXE_worker-iot-core");

fn table(args: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in args {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Declaring with `args` succeeds only if the queue has exactly these
/// (RabbitMQ compares them): a check on the broker's own state.
async fn declared_with(env: &TestEnv, queue: &str, args: FieldTable) -> Result<(), lapin::Error> {
    let channel = env.connection.create_channel().await.expect("channel");
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let result = channel.queue_declare(queue.into(), options, args).await.map(|_| ());
    channel.close(200, "".into()).await.ok();
    result
}

async fn wait_consuming(env: &TestEnv, worker: &mut crate::common::WorkerProcess) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while env.consumers(&env.queue).await.unwrap_or(0) == 0 {
        if let Ok(Some(status)) = worker.child.try_wait() {
            panic!("worker exited with {status}: {}", worker.stderr_text());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the worker binary did not start consuming"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn declares_the_whole_topology(queue_type: &str) {
    let env = TestEnv::undeclared(&TopologyFile::fast().queue_type(queue_type)).await;
    let mut worker = env.spawn_binary(WORKER, &env.settings_json(), &[("RUST_LOG", "info")], "start");
    wait_consuming(&env, &mut worker).await;

    let q = env.queue.as_str();
    let mut main = vec![
        ("x-dead-letter-exchange", text("")),
        ("x-dead-letter-routing-key", text(&env.dlq())),
    ];
    if queue_type == "quorum" {
        main.push(("x-queue-type", text("quorum")));
        main.push(("x-delivery-limit", AMQPValue::LongLongInt(3)));
    }
    declared_with(&env, q, table(&main))
        .await
        .expect("main queue has the spec's arguments");
    for (suffix, ttl) in [("50ms", 50), ("100ms", 100)] {
        let mut args = vec![
            ("x-message-ttl", AMQPValue::LongLongInt(ttl)),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text(q)),
        ];
        if queue_type == "quorum" {
            // Replicated, and handed back to Q at least once.
            args.push(("x-queue-type", text("quorum")));
            args.push(("x-dead-letter-strategy", text("at-least-once")));
            args.push(("x-overflow", text("reject-publish")));
        }
        declared_with(&env, &format!("{q}.retry.{suffix}"), table(&args))
            .await
            .expect("retry queue arguments");
    }
    let dlq_args = if queue_type == "quorum" {
        table(&[("x-queue-type", text("quorum"))])
    } else {
        FieldTable::default()
    };
    declared_with(&env, &env.dlq(), dlq_args)
        .await
        .expect("DLQ has no TTL and no limit");
    // The check can fail: a wrong TTL on a retry queue is refused.
    let wrong = table(&[
        ("x-message-ttl", AMQPValue::LongLongInt(999)),
        ("x-dead-letter-exchange", text("")),
        ("x-dead-letter-routing-key", text(q)),
        (
            "x-queue-type",
            text(if queue_type == "quorum" { "quorum" } else { "classic" }),
        ),
    ]);
    assert!(declared_with(&env, &format!("{q}.retry.50ms"), wrong).await.is_err());

    // The binding from the topology file routes into Q.
    let connection = &env.connection;
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    let body = device_up("via-topic", "t1");
    channel
        .basic_publish(
            "amq.topic".into(),
            format!("{q}.devices").as_str().into(),
            Default::default(),
            &body,
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    env.wait_for_rows("devices WHERE device_id = 't1'", 1, Duration::from_secs(30))
        .await;

    worker.signal("TERM");
    assert!(worker.wait_exit(Duration::from_secs(20)).await.success());
    let out = worker.stdout_text();
    assert!(out.contains(r"|_|\___/ \__|"), "banner printed: {out}");
    assert!(
        out.contains(&format!("RABBITMQ_LOCAL_QUEUE_NAME  = {q}")),
        "configuration printed: {out}"
    );
    assert!(out.contains(":****@"), "AMQP password masked: {out}");
    let password = crate::common::amqp_url()
        .split(':')
        .nth(2)
        .and_then(|p| p.split('@').next())
        .unwrap()
        .to_owned();
    assert!(
        !out.contains(&format!(":{password}@")),
        "the password is not printed: {out}"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_declares_every_queue_for_a_classic_main_queue() {
    declares_the_whole_topology("classic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_declares_every_queue_for_a_quorum_main_queue() {
    declares_the_whole_topology("quorum").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_existing_queue_stops_start_up_with_a_clear_error() {
    let env = TestEnv::undeclared(&TopologyFile::fast()).await;
    // Someone declared Q before, without the dead-letter arguments.
    declared_with(&env, &env.queue, FieldTable::default()).await.unwrap();
    let mut worker = env.spawn_binary(WORKER, &env.settings_json(), &[], "conflict");
    let status = worker.wait_exit(Duration::from_secs(60)).await;
    assert!(!status.success());
    let err = worker.stderr_text();
    assert!(
        err.contains(&format!("queue '{}' already exists with other arguments", env.queue)),
        "{err}"
    );
    assert!(err.contains("x-dead-letter-"), "names the argument: {err}");
    assert!(err.contains("current is none"), "names the existing value: {err}");
    assert!(err.contains("delete_queue"), "says what to do: {err}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classic_dlq_under_a_quorum_topology_is_refused_and_migrates_without_loss() {
    const PARKED: u32 = 7;
    let env = TestEnv::undeclared(&TopologyFile::fast().queue_type("quorum")).await;
    // An older deployment: classic DLQ with parked messages.
    declared_with(&env, &env.dlq(), FieldTable::default()).await.unwrap();
    for i in 0..PARKED {
        env.publish_to(
            &env.dlq(),
            format!("parked {i}").as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await;
    }
    let mut worker = env.spawn_binary(WORKER, &env.settings_json(), &[], "refused");
    assert_eq!(worker.wait_exit(Duration::from_secs(60)).await.code(), Some(2));
    let err = worker.stderr_text();
    assert!(
        err.contains(&format!("queue '{}' exists with other arguments", env.dlq())),
        "{err}"
    );
    assert!(err.contains("Migrate without losing a message"), "{err}");
    assert_eq!(env.queue_len(&env.dlq()).await, PARKED, "nothing touched");

    // The steps of the message (the retry queues were never declared here).
    std::fs::write(env.dir.join("none.json"), "{}").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_requeue"))
        .args(["--queue", &env.queue, "--list"])
        .env("AMQP_URL", crate::common::amqp_url())
        .env("DATABASE_URL", &env.database_url)
        .env("SETTINGS_FILE", env.dir.join("none.json"))
        .output()
        .expect("run requeue");
    assert!(
        out.status.success(),
        "requeue --list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        env.count("parked_messages").await,
        i64::from(PARKED),
        "every parked message is in the lot"
    );
    let channel = env.connection.create_channel().await.unwrap();
    let if_empty = lapin::options::QueueDeleteOptions {
        if_empty: true,
        ..Default::default()
    };
    channel.queue_delete(env.dlq().as_str().into(), if_empty).await.unwrap();
    let mut worker = env.spawn_binary(WORKER, &env.settings_json(), &[], "migrated");
    wait_consuming(&env, &mut worker).await;
    worker.signal("TERM");
    assert!(worker.wait_exit(Duration::from_secs(20)).await.success());

    let quorum_dlq = table(&[("x-queue-type", text("quorum"))]);
    declared_with(&env, &env.dlq(), quorum_dlq)
        .await
        .expect("the DLQ is a quorum queue now");
    assert_eq!(env.count("parked_messages").await, i64::from(PARKED));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_setting_stops_start_up_naming_key_value_and_allowed() {
    let env = TestEnv::undeclared(&TopologyFile::fast()).await;
    let mut worker = env.spawn_binary(
        WORKER,
        r#"{"RABBITMQ_PREFETCH_COUNT": "many"}"#,
        &[("RABBITMQ_PREFETCH_COUNT", "")],
        "bad",
    );
    // The environment's empty value wins over the file, and is refused.
    let status = worker.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(2));
    assert_eq!(
        worker.stderr_text().trim(),
        "worker-iot-core: invalid setting RABBITMQ_PREFETCH_COUNT=\"\" (from environment): expected an integer from 1 to 1000"
    );
    let mut worker = env.spawn_binary(WORKER, r#"{"SHUTDOWN_GRACE_MS": "soon"}"#, &[], "bad-file");
    assert_eq!(worker.wait_exit(Duration::from_secs(30)).await.code(), Some(2));
    assert!(
        worker
            .stderr_text()
            .contains("SHUTDOWN_GRACE_MS=\"soon\" (from settings file)")
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_burst_exits_zero_and_nothing_is_lost() {
    const N: i64 = 3000;
    let env = TestEnv::new(&TopologyFile::fast()).await;
    for i in 0..N {
        env.publish(&measurement(&format!("burst-{i}"), i), BasicProperties::default())
            .await;
    }
    // A small prefetch keeps the burst going long enough to interrupt it.
    let mut worker = env.spawn_binary(
        WORKER,
        &env.settings_json(),
        &[("RABBITMQ_PREFETCH_COUNT", "4")],
        "first",
    );
    wait_for("some messages applied", Duration::from_secs(60), || async {
        (env.count("measurements").await >= 200).then_some(())
    })
    .await;
    let stopping = std::time::Instant::now();
    worker.signal("TERM");
    // SHUTDOWN_GRACE_MS is 5000 in settings_json(); closing adds at most ~2 s.
    let status = worker.wait_exit(Duration::from_secs(15)).await;
    let took = stopping.elapsed();
    assert!(
        took < Duration::from_secs(7),
        "exited within the grace period: {took:?}"
    );
    assert!(
        status.success(),
        "exit 0 after SIGTERM: {status}; {}",
        worker.stderr_text()
    );
    let applied_before_restart = env.count("measurements").await;
    assert!(
        applied_before_restart < N,
        "the burst was interrupted ({applied_before_restart} of {N})"
    );

    let mut worker = env.spawn_binary(WORKER, &env.settings_json(), &[], "second");
    env.wait_for_rows("measurements", N, Duration::from_secs(120)).await;
    worker.signal("TERM");
    assert!(worker.wait_exit(Duration::from_secs(15)).await.success());
    assert_eq!(env.queue_len(&env.queue).await, 0);
    assert_eq!(env.queue_len(&env.dlq()).await, 0);
    assert_eq!(env.count("events").await, N);
    assert_eq!(env.count("measurements").await, N, "each message applied exactly once");
    let distinct: i64 = sqlx::query_scalar("SELECT count(DISTINCT value) FROM measurements")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(distinct, N);
    env.cleanup().await;
}
