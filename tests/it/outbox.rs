//! The outbox relay against the real broker and database: commands reach a
//! device queue bound to `amq.topic`, through crashes in both windows of
//! the relay, a cut broker, and two workers relaying one outbox.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::common::messages::{message_id, set_led, set_period};
use crate::common::proxy::{Proxy, upstream_of};
use crate::common::{Device, TestEnv, TopologyFile, amqp_url, wait_for};
use lapin::BasicProperties;

const WORKER: &str = env!("CARGO_BIN_EXE_worker-iot-core");

/// Rows of the outbox in each state.
async fn outbox_rows(env: &TestEnv, condition: &'static str) -> i64 {
    let sql = format!("SELECT count(*) FROM outbox WHERE {condition}");
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(&env.pool)
        .await
        .expect("count outbox rows")
}

async fn wait_all_published(env: &TestEnv, expected: i64, timeout: Duration) {
    wait_for(&format!("{expected} published outbox rows"), timeout, || async {
        (outbox_rows(env, "published_at IS NOT NULL").await == expected).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_produce_exactly_their_device_messages() {
    let env = TestEnv::new(&TopologyFile::outbox()).await;
    let device = Device::bind(&env).await;
    // Retention: a row published 8 days ago goes at start-up, one published
    // yesterday stays (default OUTBOX_RETENTION_DAYS = 7).
    sqlx::query(
        "INSERT INTO outbox (message_id, exchange, routing_key, body, created_at, published_at) VALUES
         ('old', 'amq.topic', 'led.x', 'on', now() - interval '8 days', now() - interval '8 days'),
         ('recent', 'amq.topic', 'led.x', 'on', now() - interval '1 day', now() - interval '1 day')",
    )
    .execute(&env.pool)
    .await
    .expect("insert published rows");
    let worker = env.spawn_worker(&[]);
    worker.wait_ready(&env).await;

    let d = &device.id;
    for body in [
        set_led("c1", d, "on"),
        set_period("c2", d, 5000),
        set_led("c3", d, "off"),
        set_led("c3", d, "off"),                 // duplicate: no second message
        set_led("bad", d, "blink"),              // invalid: parked, nothing sent
        set_period("bad2", d, 50),               // invalid: parked, nothing sent
        set_led("lost", "nobody-listens", "on"), // unroutable: kept, retried later
    ] {
        env.publish(&body, BasicProperties::default()).await;
    }
    env.wait_for_queue_len(&device.queue, 3, Duration::from_secs(30)).await;
    wait_for("the unroutable row to be deferred", Duration::from_secs(30), || async {
        (outbox_rows(
            &env,
            "message_id = 'lost' AND attempts >= 1 AND last_error LIKE 'unroutable%'",
        )
        .await
            == 1)
            .then_some(())
    })
    .await;
    wait_for(
        "the old published row to be deleted",
        Duration::from_secs(30),
        || async { (outbox_rows(&env, "message_id = 'old'").await == 0).then_some(()) },
    )
    .await;
    wait_for("the gauges", Duration::from_secs(30), || async {
        worker
            .metrics
            .render()
            .contains("iot_outbox_pending_rows 1\n")
            .then_some(())
    })
    .await;
    assert_eq!(worker.metrics.outbox_published(), 3);
    assert!(worker.metrics.outbox_unroutable() >= 1);
    worker.stop().await;

    let received = env.drain(&device.queue).await;
    // The worker applies deliveries concurrently, so commands commit (and
    // their messages are published) in any order: compare by id.
    let mut seen: Vec<(String, String, String)> = received
        .iter()
        .map(|m| {
            let body = String::from_utf8(m.delivery.data.clone()).expect("text body");
            (message_id(m), m.delivery.routing_key.to_string(), body)
        })
        .collect();
    seen.sort();
    let expected = [
        ("c1", format!(".led.{d}"), "on"),
        ("c2", format!("{d}.config"), "5000"),
        ("c3", format!(".led.{d}"), "off"),
    ];
    let expected: Vec<(String, String, String)> = expected
        .into_iter()
        .map(|(id, key, body)| (id.to_owned(), key, body.to_owned()))
        .collect();
    assert_eq!(seen, expected, "exactly the device messages of the commands");
    for message in &received {
        assert_eq!(message.delivery.exchange.as_str(), "amq.topic");
        assert_eq!(message.delivery.properties.delivery_mode(), &Some(2), "persistent");
    }
    assert_eq!(env.count("commands").await, 4, "c1, c2, c3 and the unroutable one");
    assert_eq!(env.queue_len(&env.dlq()).await, 2, "both invalid commands parked");
    assert_eq!(
        outbox_rows(&env, "published_at IS NOT NULL AND message_id LIKE 'c%'").await,
        3
    );
    assert_eq!(outbox_rows(&env, "message_id = 'recent'").await, 1, "within retention");
    assert_eq!(
        outbox_rows(
            &env,
            "message_id = 'lost' AND published_at IS NULL AND failed_at IS NULL"
        )
        .await,
        1,
        "an unroutable message is kept pending, never dropped"
    );
    env.cleanup().await;
}

/// Writes `n` device messages straight into the outbox, committed, with ids
/// `<prefix>-0` …: what commands' transactions leave behind.
async fn enqueue_rows(env: &TestEnv, device: &Device, prefix: &str, n: usize) -> BTreeSet<String> {
    let mut conn = env.pool.acquire().await.expect("connection");
    let mut ids = BTreeSet::new();
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        worker_iot_core::enqueue_device_message(&mut conn, &id, &format!(".led.{}", device.id), b"on")
            .await
            .expect("enqueue");
        ids.insert(id);
    }
    ids
}

/// The message ids in the device queue, taking them.
async fn received_ids(env: &TestEnv, device: &Device) -> BTreeSet<String> {
    env.drain(&device.queue).await.iter().map(message_id).collect()
}

/// Publishes `n` SET_LED commands for `device` with ids `c-0` …
async fn publish_commands(env: &TestEnv, device: &Device, n: usize) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for i in 0..n {
        let id = format!("c-{i}");
        let state = if i % 2 == 0 { "on" } else { "off" };
        env.publish(&set_led(&id, &device.id, state), BasicProperties::default())
            .await;
        ids.insert(id);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_between_commit_and_publish_loses_no_device_message() {
    const N: usize = 60;
    let env = TestEnv::new(&TopologyFile::outbox()).await;
    let device = Device::bind(&env).await;
    let settings = env.settings_json();
    // With the relay off, every command commits and its device message
    // waits in the outbox: the state a crash right after commit leaves.
    let mut worker = env.spawn_binary(WORKER, &settings, &[("OUTBOX_RELAY", "off")], "no-relay");
    let ids = publish_commands(&env, &device, N).await;
    env.wait_for_rows("commands", N as i64, Duration::from_secs(60)).await;
    assert_eq!(outbox_rows(&env, "published_at IS NULL").await, N as i64);
    worker.signal("KILL");
    assert!(!worker.wait_exit(Duration::from_secs(10)).await.success());
    assert_eq!(
        env.queue_len(&device.queue).await,
        0,
        "nothing was published before the kill"
    );

    let mut worker = env.spawn_binary(WORKER, &settings, &[], "relay");
    wait_all_published(&env, N as i64, Duration::from_secs(60)).await;
    env.wait_for_queue_len(&device.queue, N as u32, Duration::from_secs(30))
        .await;
    worker.signal("TERM");
    assert!(worker.wait_exit(Duration::from_secs(20)).await.success());

    let received = received_ids(&env, &device).await;
    assert_eq!(received, ids, "every command's device message arrived");
    assert_eq!(env.count("commands").await, N as i64, "no command row duplicated");
    assert_eq!(env.count("outbox").await, N as i64);
    env.cleanup().await;
}

#[cfg(feature = "test-handlers")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_publish_and_marking_duplicates_but_loses_nothing() {
    const N: usize = 60;
    let env = TestEnv::new(&TopologyFile::outbox()).await;
    let device = Device::bind(&env).await;
    let settings = env.settings_json();
    // The test hook aborts the process after the broker confirmed a batch
    // and before the rows are marked published.
    let mut worker = env.spawn_binary(
        WORKER,
        &settings,
        &[("WIC_TEST_RELAY_ABORT_AFTER_CONFIRM", "1")],
        "abort",
    );
    let ids = publish_commands(&env, &device, N).await;
    let status = worker.wait_exit(Duration::from_secs(60)).await;
    assert!(!status.success(), "the hook aborted the worker");
    assert!(
        worker.stderr_text().contains("test hook: aborting"),
        "{}",
        worker.stderr_text()
    );
    let sent_before_crash = env.queue_len(&device.queue).await;
    assert!(sent_before_crash >= 1, "a batch was confirmed before the crash");
    assert_eq!(
        outbox_rows(&env, "published_at IS NOT NULL").await,
        0,
        "and none of it was marked"
    );

    let mut worker = env.spawn_binary(WORKER, &settings, &[], "after");
    env.wait_for_rows("commands", N as i64, Duration::from_secs(60)).await;
    wait_all_published(&env, N as i64, Duration::from_secs(60)).await;
    worker.signal("TERM");
    assert!(worker.wait_exit(Duration::from_secs(20)).await.success());

    let received = env.drain(&device.queue).await;
    let distinct: BTreeSet<String> = received.iter().map(message_id).collect();
    assert_eq!(distinct, ids, "every command's device message arrived at least once");
    assert_eq!(
        received.len(),
        N + sent_before_crash as usize,
        "exactly the batch confirmed before the crash was sent twice"
    );
    assert_eq!(env.count("commands").await, N as i64, "no command row duplicated");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_pending_while_the_broker_is_cut_are_delivered_when_it_returns() {
    const N: usize = 40;
    let env = TestEnv::new(&TopologyFile::outbox()).await;
    let device = Device::bind(&env).await;
    let proxy = Proxy::start(upstream_of(&amqp_url())).await;
    let worker = env.spawn_worker_with(env.settings(&[("AMQP_URL", &proxy.url_for(&amqp_url()))]), None);
    worker.wait_ready(&env).await;
    proxy.set_refusing(true);
    proxy.cut();
    wait_for("the worker to notice the cut", Duration::from_secs(30), || async {
        (!worker.readiness.is_ready()).then_some(())
    })
    .await;

    // What committed commands leave behind while the broker is away.
    let ids = enqueue_rows(&env, &device, "p", N).await;
    // Commands sent meanwhile wait in the broker.
    let more = publish_commands(&env, &device, N).await;
    assert_eq!(outbox_rows(&env, "published_at IS NULL").await, N as i64);

    proxy.set_refusing(false);
    wait_all_published(&env, 2 * N as i64, Duration::from_secs(60)).await;
    env.wait_for_queue_len(&device.queue, 2 * N as u32, Duration::from_secs(30))
        .await;
    worker.stop().await;

    let received = received_ids(&env, &device).await;
    let expected: BTreeSet<String> = ids.union(&more).cloned().collect();
    assert_eq!(received, expected);
    assert_eq!(
        env.count("commands").await,
        N as i64,
        "the commands sent meanwhile, once each"
    );
    assert_eq!(env.queue_len(&env.queue).await, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_rides_out_a_database_outage() {
    const N: usize = 30;
    let env = TestEnv::new(&TopologyFile::outbox()).await;
    let device = Device::bind(&env).await;
    let proxy = Proxy::start(upstream_of(&env.database_url)).await;
    let worker = env.spawn_worker_with(
        env.settings(&[("DATABASE_URL", &proxy.url_for(&env.database_url))]),
        None,
    );
    worker.wait_ready(&env).await;
    let first = publish_commands(&env, &device, N).await;
    wait_all_published(&env, N as i64, Duration::from_secs(30)).await;

    proxy.set_refusing(true);
    proxy.cut();
    // Rows committed by another writer while the worker cannot reach the
    // database (the test's own connection does not go through the proxy).
    let written = enqueue_rows(&env, &device, "outage", N).await;
    wait_for("the relay to meet the outage", Duration::from_secs(30), || async {
        (worker.metrics.outbox_errors() >= 1).then_some(())
    })
    .await;
    assert_eq!(outbox_rows(&env, "published_at IS NULL").await, N as i64);
    proxy.set_refusing(false);
    wait_all_published(&env, 2 * N as i64, Duration::from_secs(60)).await;
    env.wait_for_queue_len(&device.queue, 2 * N as u32, Duration::from_secs(30))
        .await;
    worker.stop().await;

    let received = received_ids(&env, &device).await;
    assert_eq!(received.len(), 2 * N);
    assert!(first.is_subset(&received) && written.is_subset(&received));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_relay_one_outbox_without_publishing_a_row_twice() {
    const N: usize = 400;
    let env = TestEnv::new(&TopologyFile::outbox()).await;
    let device = Device::bind(&env).await;
    let settings = env.settings_json();
    let mut first = env.spawn_binary(WORKER, &settings, &[], "first");
    let mut second = env.spawn_binary(WORKER, &settings, &[], "second");
    wait_for("both workers to consume", Duration::from_secs(60), || async {
        (env.consumers(&env.queue).await == Some(2)).then_some(())
    })
    .await;
    let ids = publish_commands(&env, &device, N).await;
    env.wait_for_rows("commands", N as i64, Duration::from_secs(60)).await;
    wait_all_published(&env, N as i64, Duration::from_secs(60)).await;
    env.wait_for_queue_len(&device.queue, N as u32, Duration::from_secs(30))
        .await;
    for worker in [&mut first, &mut second] {
        worker.signal("TERM");
        assert!(worker.wait_exit(Duration::from_secs(20)).await.success());
    }

    let received = env.drain(&device.queue).await;
    assert_eq!(received.len(), N, "no row published by both workers");
    let distinct: BTreeSet<String> = received.iter().map(message_id).collect();
    assert_eq!(distinct, ids);
    env.cleanup().await;
}

/// The relay pipelines batches (several wait for confirms at once), yet a
/// device gets its messages in the order they were written: 1,500 rows
/// for three devices, one of them with long runs that span many batches,
/// arrive in order, each once. (The three devices' keys are bound to one
/// queue: its order is the order the broker routed them in.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_batches_keep_each_devices_order() {
    const N: usize = 1500;
    let env = TestEnv::new(&TopologyFile::outbox()).await;
    let device = Device::bind(&env).await;
    let keys: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|s| format!(".led.{}-{s}", device.id))
        .collect();
    let channel = env.connection.create_channel().await.expect("channel");
    for key in &keys {
        channel
            .queue_bind(
                device.queue.as_str().into(),
                "amq.topic".into(),
                key.as_str().into(),
                Default::default(),
                Default::default(),
            )
            .await
            .expect("bind");
    }
    let mut written: BTreeMap<String, Vec<String>> = BTreeMap::new();
    {
        let mut conn = env.pool.acquire().await.expect("connection");
        for i in 0..N {
            // Runs of 250 for the first device, the others in between.
            let key = &keys[match i % 500 {
                0..250 => 0,
                n => 1 + n % 2,
            }];
            let id = format!("o-{i}");
            worker_iot_core::enqueue_device_message(&mut conn, &id, key, b"on")
                .await
                .expect("enqueue");
            written.entry(key.clone()).or_default().push(id);
        }
    }
    let worker = env.spawn_worker(&[]);
    wait_all_published(&env, N as i64, Duration::from_secs(60)).await;
    worker.stop().await;
    let mut received: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in env.drain(&device.queue).await {
        received
            .entry(m.delivery.routing_key.to_string())
            .or_default()
            .push(message_id(&m));
    }
    for (key, expected) in &written {
        let got = &received[key];
        let first_difference = got.iter().zip(expected).position(|(g, e)| g != e);
        assert!(
            first_difference.is_none() && got.len() == expected.len(),
            "{key} got {} messages for {}; first out of order at {first_difference:?}: {:?}",
            got.len(),
            expected.len(),
            first_difference.map(|i| &got[i.saturating_sub(2)..(i + 3).min(got.len())]),
        );
    }
    env.cleanup().await;
}
