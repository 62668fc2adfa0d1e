//! Fault tests with real processes and real sockets: SIGKILL under load, a
//! cut broker connection, a database outage, and a message that aborts the
//! process.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::common::messages::{measurement, set_led, slow};
use crate::common::proxy::{Proxy, upstream_of};
use crate::common::{RunningWorker, TestEnv, TopologyFile, WorkerProcess, amqp_url, wait_for};
use lapin::BasicProperties;
use lapin::message::BasicGetMessage;
use rand::Rng;
use serde_json::json;
use worker_iot_core::ErrorKind;
use worker_iot_core::Metrics;
use worker_iot_core::headers::{self, ERROR_KIND};

const WORKER: &str = env!("CARGO_BIN_EXE_worker-iot-core");
const WAIT_START: Duration = Duration::from_secs(60);

/// Two in-process attempts in every test here.
fn topology(queue_type: &str, delays: &[&str], max_attempts: u32) -> TopologyFile {
    TopologyFile::classic()
        .queue_type(queue_type)
        .delays(delays)
        .max_attempts(max_attempts)
        .in_process_attempts(2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_three_times_under_load_applies_every_message_exactly_once() {
    const N: i64 = 5000;
    let env = TestEnv::new(&topology("classic", &["50ms", "100ms"], 5)).await;
    let mut commands = 0;
    for i in 0..N {
        let body = if i % 10 == 0 {
            commands += 1;
            set_led(&format!("c-{i}"), &format!("d{}", i % 13), "on")
        } else {
            measurement(&format!("m-{i}"), i)
        };
        env.publish(&body, BasicProperties::default()).await;
    }
    let events = N - commands;
    let settings = env.settings_json();
    let extra = [("RABBITMQ_PREFETCH_COUNT", "32")];
    let mut rng = rand::rng();
    for round in 0..3 {
        let mut worker = env.spawn_binary(WORKER, &settings, &extra, &format!("round-{round}"));
        let before = env.count("events").await + env.count("commands").await;
        let at = before + rng.random_range(200..900);
        wait_for("progress before the kill", Duration::from_secs(120), || async {
            (env.count("events").await + env.count("commands").await >= at).then_some(())
        })
        .await;
        worker.signal("KILL");
        let status = worker.wait_exit(Duration::from_secs(10)).await;
        assert!(!status.success(), "killed, not exited");
    }
    let applied_before_last = env.count("events").await + env.count("commands").await;
    assert!(applied_before_last < N, "the kills happened under load");
    let mut worker = env.spawn_binary(WORKER, &settings, &extra, "final");
    env.wait_for_rows("events", events, Duration::from_secs(180)).await;
    env.wait_for_rows("commands", commands, Duration::from_secs(60)).await;
    worker.signal("TERM");
    assert!(worker.wait_exit(Duration::from_secs(20)).await.success());

    assert_eq!(env.queue_len(&env.queue).await, 0);
    assert_eq!(env.queue_len(&env.dlq()).await, 0);
    assert_eq!(env.count("measurements").await, events, "each measurement applied once");
    assert_eq!(
        env.count("outbox").await,
        commands,
        "each command's device message written once"
    );
    let distinct: i64 = sqlx::query_scalar("SELECT count(DISTINCT value) FROM measurements")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(distinct, events);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_on_one_queue_with_a_kill_9_apply_every_message_once() {
    const N: i64 = 3000;
    let env = TestEnv::new(&topology("quorum", &["50ms", "100ms"], 5)).await;
    let poison = 10;
    let mut poison_bodies = BTreeSet::new();
    for i in 0..N {
        let body = if i % 300 == 0 {
            let body = json!({"type": "DEVICE_UP", "id": format!("bad-{i}"), "data": {"device_id": "has space"}})
                .to_string()
                .into_bytes();
            poison_bodies.insert(body.clone());
            body
        } else {
            measurement(&format!("m-{i}"), i)
        };
        env.publish(&body, BasicProperties::default()).await;
    }
    let settings = env.settings_json();
    let mut first = env.spawn_binary(WORKER, &settings, &[], "first");
    let mut second = env.spawn_binary(WORKER, &settings, &[], "second");
    wait_for("progress with both workers", Duration::from_secs(120), || async {
        (env.consumers(&env.queue).await == Some(2) && env.count("measurements").await >= 800).then_some(())
    })
    .await;
    first.signal("KILL");
    assert!(!first.wait_exit(Duration::from_secs(10)).await.success());
    let at_kill = env.count("measurements").await;
    assert!(at_kill < N - poison, "killed under load ({at_kill} applied)");
    let mut first = env.spawn_binary(WORKER, &settings, &[], "first-again");
    env.wait_for_rows("measurements", N - poison, Duration::from_secs(180))
        .await;
    // A kill -9 between a copy's confirm and its original's ack parks that
    // message twice (at least once, by design): count distinct messages.
    let mut parked = take_parked_until_distinct(&env, poison_bodies.len(), Duration::from_secs(60)).await;
    for worker in [&mut first, &mut second] {
        worker.signal("TERM");
        assert!(worker.wait_exit(Duration::from_secs(20)).await.success());
    }
    assert_eq!(env.count("events").await, N - poison, "each applied once");
    assert_eq!(env.queue_len(&env.queue).await, 0);
    parked.extend(env.drain(&env.dlq()).await);
    let distinct: BTreeSet<Vec<u8>> = parked.iter().map(|m| m.delivery.data.clone()).collect();
    assert_eq!(
        distinct,
        poison_bodies,
        "exactly the poison messages parked ({} copies)",
        parked.len()
    );
    assert!(parked.iter().all(|m| {
        headers::read_string(m.delivery.properties.headers().as_ref(), ERROR_KIND).as_deref() == Some("validation")
    }));
    env.cleanup().await;
}

/// Takes the parked copies out of the DLQ until they hold `expected`
/// distinct messages (by body); returns every copy taken. Panics after
/// `timeout` with the copies and distinct messages seen.
async fn take_parked_until_distinct(env: &TestEnv, expected: usize, timeout: Duration) -> Vec<BasicGetMessage> {
    let deadline = Instant::now() + timeout;
    let mut parked = Vec::new();
    loop {
        parked.extend(env.drain(&env.dlq()).await);
        let distinct = parked.iter().map(|m| &m.delivery.data).collect::<BTreeSet<_>>().len();
        if distinct == expected {
            return parked;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {expected} distinct parked messages; saw {} copies of {distinct} distinct",
            parked.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_broker_connection_is_rebuilt_and_everything_is_processed_once() {
    const N: i64 = 3000;
    let env = TestEnv::new(&topology("classic", &["50ms"], 5)).await;
    let proxy = Proxy::start(upstream_of(&amqp_url())).await;
    env.publish_measurements(0..N).await;
    let proxied = proxy.url_for(&amqp_url());
    let worker = env.spawn_worker_with(env.settings(&[("AMQP_URL", &proxied)]), None);
    wait_for("progress before the cut", Duration::from_secs(60), || async {
        (env.count("measurements").await >= 500).then_some(())
    })
    .await;
    proxy.cut();
    let applied_at_cut = env.count("measurements").await;
    assert!(
        applied_at_cut < N,
        "the cut came mid-burst ({applied_at_cut} of {N} applied)"
    );
    wait_for("the worker to reconnect", Duration::from_secs(60), || async {
        (worker.metrics.connections() >= 2 && worker.readiness.is_ready()).then_some(())
    })
    .await;
    env.wait_for_rows("measurements", N, Duration::from_secs(120)).await;
    worker.stop().await;
    assert_eq!(env.queue_len(&env.queue).await, 0);
    assert_eq!(env.queue_len(&env.dlq()).await, 0);
    assert_eq!(env.count("events").await, N);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_sends_messages_to_retry_queues_and_loses_none() {
    const N: i64 = 300;
    let env = TestEnv::new(&topology("classic", &["100ms", "200ms"], 100)).await;
    // One message at a time, so the outage finds most of them unprocessed.
    let (proxy, worker) = behind_a_database_proxy(&env, N, "1", 20).await;
    proxy.set_refusing(true);
    proxy.cut();
    // Stage 1 gives up within about a second; the outage lasts until many
    // messages went through the retry queues.
    wait_for(
        "messages diverted to retry queues",
        Duration::from_secs(120),
        || async { (worker.metrics.retried() >= 30).then_some(()) },
    )
    .await;
    let during = env.count("measurements").await;
    proxy.set_refusing(false);
    env.wait_for_rows("measurements", N, Duration::from_secs(120)).await;
    let metrics = worker.metrics.clone();
    worker.stop().await;

    assert!(during < N);
    each_applied_once_none_parked(&env, &metrics, N).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_database_partition_is_noticed_within_seconds() {
    const N: i64 = 100;
    let env = TestEnv::new(&topology("classic", &["1s", "2s"], 10)).await;
    let (proxy, worker) = behind_a_database_proxy(&env, N, "4", 10).await;
    // No FIN, no RST: the sockets stay open and nothing answers, so only
    // the worker's own deadlines can notice.
    proxy.stall();
    let stalled_at = Instant::now();
    wait_for(
        "a stuck transaction to fail as transient",
        Duration::from_secs(40),
        || async { (worker.metrics.retried() >= 1).then_some(()) },
    )
    .await;
    let noticed = stalled_at.elapsed();
    proxy.heal();
    env.wait_for_rows("measurements", N, Duration::from_secs(120)).await;
    let metrics = worker.metrics.clone();
    worker.stop().await;

    assert!(noticed < Duration::from_secs(20), "noticed after {noticed:?}");
    each_applied_once_none_parked(&env, &metrics, N).await;
    env.cleanup().await;
}

/// Publishes `n` measurements and starts a worker whose database is behind
/// a proxy the test can cut or stall, once it applied `progress` of them.
async fn behind_a_database_proxy(env: &TestEnv, n: i64, prefetch: &str, progress: i64) -> (Proxy, RunningWorker) {
    let proxy = Proxy::start(upstream_of(&env.database_url)).await;
    env.publish_measurements(0..n).await;
    let proxied = proxy.url_for(&env.database_url);
    let worker = env.spawn_worker_with(
        env.settings(&[("DATABASE_URL", &proxied), ("RABBITMQ_PREFETCH_COUNT", prefetch)]),
        None,
    );
    wait_for("progress before the fault", Duration::from_secs(60), || async {
        (env.count("measurements").await >= progress).then_some(())
    })
    .await;
    (proxy, worker)
}

/// After a database fault: every message applied once, none parked.
async fn each_applied_once_none_parked(env: &TestEnv, metrics: &Metrics, n: i64) {
    for kind in ErrorKind::ALL {
        assert_eq!(metrics.parked(kind), 0, "nothing parked as {kind}");
    }
    assert_eq!(env.queue_len(&env.dlq()).await, 0);
    assert_eq!(env.queue_len(&env.queue).await, 0);
    assert_eq!(env.count("events").await, n, "each applied once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restarts_do_not_park_a_slow_message_as_a_crash_loop() {
    // delivery_limit 3: without taking back the counts of runs cut off by a
    // shutdown, the third redelivery would park it as crash_loop.
    let env = TestEnv::new(&topology("classic", &["50ms"], 5)).await;
    env.publish(&slow("slow-1", 4), BasicProperties::default()).await;
    let settings = env.settings_json();
    for round in 0..4 {
        let mut worker = env.spawn_binary(WORKER, &settings, &[("SHUTDOWN_GRACE_MS", "100")], &format!("r{round}"));
        let pid = worker.child.id().expect("running");
        wait_for("the slow message to run", WAIT_START, || async {
            let taken = env.consumers(&env.queue).await == Some(1) && env.queue_len(&env.queue).await == 0;
            // From the second start on it is a redelivery, counted by this process.
            let counted: i64 = sqlx::query_scalar("SELECT count(*) FROM delivery_attempts WHERE boot_id LIKE $1")
                .bind(format!("{pid}-%"))
                .fetch_one(&env.pool)
                .await
                .unwrap();
            (taken && (round == 0 || counted == 1)).then_some(())
        })
        .await;
        worker.signal("TERM");
        assert!(worker.wait_exit(Duration::from_secs(20)).await.success());
    }
    let mut worker = env.spawn_binary(WORKER, &settings, &[], "final");
    env.wait_for_rows("events", 1, Duration::from_secs(60)).await;
    worker.signal("TERM");
    assert!(worker.wait_exit(Duration::from_secs(20)).await.success());
    assert_eq!(env.queue_len(&env.dlq()).await, 0, "not parked");
    assert_eq!(env.count("measurements").await, 1, "applied once");
    assert_eq!(env.count("delivery_attempts").await, 0, "count forgotten once settled");
    env.cleanup().await;
}

/// Runs the worker binary again each time it dies, until `done` or the
/// restart budget runs out. Returns how many times it was started.
async fn supervise(env: &TestEnv, max_starts: u32, done: impl AsyncFn() -> bool) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut starts = 0;
    let mut worker: Option<WorkerProcess> = None;
    while !done().await {
        assert!(Instant::now() < deadline, "not done after {starts} starts");
        let exited = match worker.as_mut() {
            None => true,
            Some(w) => w.child.try_wait().expect("try_wait").is_some(),
        };
        if exited {
            assert!(starts < max_starts, "still crashing after {starts} starts");
            starts += 1;
            worker = Some(env.spawn_binary(WORKER, &env.settings_json(), &[], &format!("start-{starts}")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Some(mut w) = worker {
        w.signal("TERM");
        assert!(w.wait_exit(Duration::from_secs(20)).await.success());
    }
    starts
}

async fn a_message_that_aborts_the_process_is_parked_after_the_limit(queue_type: &str) {
    let env = TestEnv::new(&topology(queue_type, &["50ms"], 5)).await;
    for i in 0..40 {
        env.publish(&measurement(&format!("m-{i}"), i), BasicProperties::default())
            .await;
        if i == 5 {
            let poison = json!({"type": "TEST_ABORT", "id": "killer", "data": null}).to_string();
            env.publish(poison.as_bytes(), BasicProperties::default()).await;
        }
    }
    let starts = supervise(&env, 3 + 3, async || {
        env.queue_len(&env.dlq()).await == 1 && env.count("measurements").await == 40
    })
    .await;
    // delivery_limit = 3 (< max_attempts): it ran, and crashed the worker,
    // on deliveries 1 and 2; delivery 3 parked it without running it.
    assert_eq!(starts, 3, "parked on its third delivery");

    let parked = env.drain(&env.dlq()).await;
    let h = parked[0].delivery.properties.headers().as_ref();
    // On both queue types the worker's durable count parks it first, with
    // headers; the quorum queue's x-delivery-limit is the backstop.
    assert_eq!(parked.len(), 1, "only the poison message is parked");
    assert_eq!(headers::read_string(h, ERROR_KIND).as_deref(), Some("crash_loop"));
    assert_eq!(env.count("events").await, 40);
    assert_eq!(env.queue_len(&env.queue).await, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_on_a_classic_queue_is_parked_after_the_limit() {
    a_message_that_aborts_the_process_is_parked_after_the_limit("classic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_on_a_quorum_queue_is_parked_before_the_broker_limit() {
    a_message_that_aborts_the_process_is_parked_after_the_limit("quorum").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_still_running_after_the_grace_period_is_rolled_back_and_redelivered() {
    let env = TestEnv::new(&topology("classic", &["50ms"], 5)).await;
    for i in 0..4 {
        env.publish(&slow(&format!("slow-{i}"), 3), BasicProperties::default())
            .await;
    }
    let mut worker = env.spawn_binary(WORKER, &env.settings_json(), &[("SHUTDOWN_GRACE_MS", "300")], "slow");
    wait_for("the slow handlers to start", WAIT_START, || async {
        (env.count("pg_stat_activity WHERE datname = current_database() AND query LIKE 'SELECT pg_sleep%' AND state = 'active'").await >= 1).then_some(())
    })
    .await;
    let stopping = Instant::now();
    worker.signal("TERM");
    assert!(
        worker.wait_exit(Duration::from_secs(10)).await.success(),
        "exit 0 after the grace period"
    );
    assert!(
        stopping.elapsed() < Duration::from_secs(3),
        "did not wait for the 3 s handlers: {:?}",
        stopping.elapsed()
    );
    assert_eq!(
        env.count("measurements").await,
        0,
        "unfinished transactions were rolled back"
    );

    let mut worker = env.spawn_binary(WORKER, &env.settings_json(), &[], "slow-again");
    env.wait_for_rows("measurements", 4, Duration::from_secs(60)).await;
    worker.signal("TERM");
    assert!(worker.wait_exit(Duration::from_secs(20)).await.success());
    assert_eq!(env.count("events").await, 4, "each applied once after redelivery");
    assert_eq!(env.queue_len(&env.queue).await, 0);
    assert_eq!(env.queue_len(&env.dlq()).await, 0);
    env.cleanup().await;
}
