//! The edges of the worker's promises (issue 18): a returned publish taken
//! for a confirmed one (device messages and retry/DLQ copies), a database
//! that turns read-only for a while, a panic in a batch's bulk check, and
//! the in-flight gauge after a cut connection and after a shutdown that
//! cuts a batch off.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::messages::{body, flaky, measurement, message_id, set_led, slow, with_id};
use crate::common::observe::{QueueCounts, metric_value, queue_counts, rabbitmqctl_available, wait_for_seen};
use crate::common::proxy::{Proxy, upstream_of};
use crate::common::{Device, RunningWorker, TestEnv, TopologyFile, amqp_url, server_url, wait_for};
use lapin::BasicProperties;
use lapin::message::BasicGetMessage;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use serde_json::json;
use sqlx::{Connection as _, PgConnection};
use worker_iot_core::ErrorKind;
use worker_iot_core::headers::{self, ERROR_KIND};

const WAIT: Duration = Duration::from_secs(90);
const IN_FLIGHT: &str = "iot_deliveries_in_flight";

/// Messages to publish together: body and properties.
type Burst = Vec<(Vec<u8>, BasicProperties)>;

/// How many times each message id occurs.
fn tally(messages: &[BasicGetMessage]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for message in messages {
        *counts.entry(message_id(message)).or_insert(0) += 1;
    }
    counts
}

/// `Q`'s counts; the queue must exist.
async fn main_queue(env: &TestEnv) -> QueueCounts {
    queue_counts(&env.queue).await.expect("the main queue exists")
}

/// The in-flight gauge of `worker`'s metrics.
fn in_flight(worker: &RunningWorker) -> f64 {
    metric_value(&worker.metrics, IN_FLIGHT).expect("the in-flight gauge is rendered")
}

// ---------------------------------------------------------------------------
// 1. Device messages: a returned one is never taken for a confirmed one.

/// A device whose queue is not durable (exclusive to the test's
/// connection): the broker confirms a message routed only there at once,
/// with no disk write to wait for, so the confirm of a routable device
/// message can reach the relay before the return and confirm of an
/// unroutable one sent just before it.
async fn bind_transient_device(env: &TestEnv) -> Device {
    let transient = QueueDeclareOptions {
        durable: false,
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    Device::bind_with(env, transient).await
}

/// The outbox rows of the routable and the unroutable device, by state.
#[derive(Debug, Default, PartialEq, Eq, sqlx::FromRow)]
struct OutboxStates {
    routable_published: i64,
    routable_pending: i64,
    /// Tried, returned, and kept pending: what a returned message must give.
    unroutable_deferred: i64,
    /// Marked published although no queue could take it: the bug.
    unroutable_published: i64,
}

async fn outbox_states(env: &TestEnv, unroutable_key: &str) -> OutboxStates {
    sqlx::query_as(
        "SELECT
           count(*) FILTER (WHERE routing_key <> $1 AND published_at IS NOT NULL) AS routable_published,
           count(*) FILTER (WHERE routing_key <> $1 AND published_at IS NULL) AS routable_pending,
           count(*) FILTER (WHERE routing_key = $1 AND published_at IS NULL AND attempts >= 1
                            AND last_error LIKE 'unroutable%') AS unroutable_deferred,
           count(*) FILTER (WHERE routing_key = $1 AND published_at IS NOT NULL) AS unroutable_published
         FROM outbox",
    )
    .bind(unroutable_key)
    .fetch_one(&env.pool)
    .await
    .expect("outbox states")
}

/// `n` SET_LED commands, every other one for `routable`, the rest for
/// `unroutable`; with the ids of each half.
fn mixed_commands(n: usize, routable: &str, unroutable: &str) -> (Vec<Vec<u8>>, BTreeSet<String>, BTreeSet<String>) {
    let (mut bodies, mut to_device, mut to_nobody) = (Vec::new(), BTreeSet::new(), BTreeSet::new());
    for i in 0..n {
        let id = format!("c-{i}");
        if i % 2 == 0 {
            bodies.push(set_led(&id, routable, "on"));
            to_device.insert(id);
        } else {
            bodies.push(set_led(&id, unroutable, "on"));
            to_nobody.insert(id);
        }
    }
    (bodies, to_device, to_nobody)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_burst_of_routable_and_unroutable_commands_marks_only_the_routable_published() {
    const N: usize = 200;
    let env = TestEnv::new(&TopologyFile::outbox()).await;
    let device = bind_transient_device(&env).await;
    let nobody = format!("nobody-{}", &env.queue["wic_test_".len()..]);
    let worker = env.spawn_worker(&[]);
    worker.wait_ready(&env).await;
    let (bodies, to_device, to_nobody) = mixed_commands(N, &device.id, &nobody);
    let burst = bodies.into_iter().map(|b| (b, BasicProperties::default())).collect();
    env.publish_burst(burst).await;

    // Every row sent at least once: the routable ones marked published, the
    // unroutable ones either deferred as they must be or (the bug) marked.
    let half = (N / 2) as i64;
    let unroutable_key = format!(".led.{nobody}");
    let states = wait_for_seen("every outbox row sent once", WAIT, || async {
        let s = outbox_states(&env, &unroutable_key).await;
        let sent = s.routable_published == half && s.unroutable_deferred + s.unroutable_published == half;
        (sent, s)
    })
    .await;
    // Confirmed before they were marked, so all of them are in the queue.
    wait_for_seen(
        "the device messages in the device queue",
        Duration::from_secs(10),
        || async {
            let len = env.queue_len(&device.queue).await;
            (i64::from(len) >= half, len)
        },
    )
    .await;
    // Stopped, the worker sends nothing more: the device queue is final.
    worker.stop().await;

    let received = tally(&env.drain(&device.queue).await);
    let twice: Vec<_> = received.iter().filter(|(_, n)| **n > 1).collect();
    assert_eq!(
        states.unroutable_published, 0,
        "unroutable device messages marked published (lost): {states:?}; received twice: {twice:?}"
    );
    assert!(twice.is_empty(), "device messages received more than once: {twice:?}");
    let ids: BTreeSet<String> = received.keys().cloned().collect();
    let stray: Vec<_> = ids.intersection(&to_nobody).collect();
    assert!(stray.is_empty(), "unroutable messages arrived: {stray:?}");
    assert_eq!(ids, to_device, "each routable command's device message arrived");
    assert_eq!(env.count("commands").await, N as i64);
    env.cleanup().await;
}

// ---------------------------------------------------------------------------
// 2. Retry and DLQ copies: a returned copy never lets its original be acked.

fn retry_topology() -> TopologyFile {
    TopologyFile::classic()
        .delivery_limit(5)
        .delays(&["200ms"])
        // A TEST_FLAKY's first failure goes straight to the retry queue: a
        // routable copy, published among the DLQ copies that will be returned.
        .in_process_attempts(1)
}

/// Poison messages (invalid JSON, parked at once) and TEST_FLAKY events
/// that fail once, interleaved, each named by its AMQP message id.
fn poison_and_flaky(n: usize) -> (Burst, BTreeSet<String>) {
    let (mut burst, mut poison) = (Vec::new(), BTreeSet::new());
    for i in 0..n {
        let id = format!("poison-{i}");
        burst.push((format!("not json {i}").into_bytes(), with_id(&id)));
        poison.insert(id);
        let id = format!("flaky-{i}");
        burst.push((flaky(&id, 1), with_id(&id)));
    }
    (burst, poison)
}

async fn delete_queue(env: &TestEnv, queue: &str) {
    let channel = env.connection.create_channel().await.expect("channel");
    channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await
        .expect("delete queue");
    channel.close(200, "".into()).await.ok();
}

/// Settings under which every delivery runs alone (no batch), so the
/// copies of up to 100 deliveries are published at the same time on the one
/// confirm channel.
const ALONE_AND_CONCURRENT: [(&str, &str); 2] = [("BATCH_MAX_SIZE", "1"), ("RABBITMQ_PREFETCH_COUNT", "100")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returned_dlq_copy_leaves_its_original_unacked() {
    if !rabbitmqctl_available("a_returned_dlq_copy_leaves_its_original_unacked") {
        return;
    }
    const N: usize = 100;
    let env = TestEnv::new(&retry_topology()).await;
    let worker = env.spawn_worker(&ALONE_AND_CONCURRENT);
    worker.wait_ready(&env).await;
    delete_queue(&env, &env.dlq()).await;
    let (burst, poison) = poison_and_flaky(N);
    env.publish_burst(burst).await;

    env.wait_for_rows("measurements", N as i64, WAIT).await;
    let retry_queue = env.topology.retry_queue(1);
    // What is left is poison: in Q (ready or unacked), or parked if the
    // worker declared the DLQ again meanwhile. A poison message acked on a
    // returned copy is in neither.
    let (held, parked) = wait_for_seen("only the poison messages left", WAIT, || async {
        let held = main_queue(&env).await;
        let parked = queue_counts(&env.dlq()).await.unwrap_or_default();
        let retrying = queue_counts(&retry_queue).await.unwrap_or_default();
        let settled = retrying.total() == 0 && held.total() + parked.total() <= N as u64;
        (settled, (held, parked))
    })
    .await;
    assert_eq!(
        held.total() + parked.total(),
        N as u64,
        "poison messages lost while the DLQ was missing: in Q {held:?}, in the DLQ {parked:?}"
    );
    assert_eq!(
        env.count("measurements").await,
        N as i64,
        "each TEST_FLAKY applied once"
    );

    // A new worker declares the DLQ again and takes back what was unacked.
    worker.stop().await;
    let worker = env.spawn_worker(&ALONE_AND_CONCURRENT);
    let left = wait_for_seen("Q to drain into the DLQ", WAIT, || async {
        let left = main_queue(&env).await;
        (left.total() == 0, left)
    })
    .await;
    assert_eq!(left, QueueCounts::default());
    worker.stop().await;
    let parked = tally(&env.drain(&env.dlq()).await);
    let twice: Vec<_> = parked.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "poison messages parked more than once: {twice:?}");
    let ids: BTreeSet<String> = parked.keys().cloned().collect();
    let missing: Vec<_> = poison.difference(&ids).collect();
    assert!(missing.is_empty(), "poison messages never parked (lost): {missing:?}");
    assert_eq!(ids, poison, "only the poison messages are parked");
    assert_eq!(env.count("measurements").await, N as i64);
    env.cleanup().await;
}

// ---------------------------------------------------------------------------
// 3. A read-only database (an HA failover) parks nothing.

/// A message that first fails as the read-only window opens is tried again
/// about 1 s, 3 s, 8 s, 13 s and 18 s later: its sixth and last attempt
/// comes 18 s in, three times the 6 s window, so attempts run out only if
/// the read-only error is not taken for a transient one.
fn failover_topology() -> TopologyFile {
    TopologyFile::classic()
        .delivery_limit(5)
        .delays(&["1s", "2s", "5s"])
        .max_attempts(6)
}

async fn admin_execute(admin: &mut PgConnection, sql: String) {
    sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
        .execute(&mut *admin)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Ends every session on `database` but the caller's.
async fn terminate_sessions(admin: &mut PgConnection, database: &str) {
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(database)
    .execute(&mut *admin)
    .await
    .expect("terminate the database's sessions");
}

/// What a failover to a standby looks like to the worker: `database` turns
/// read-only for `hold` (new sessions are read-only, the open ones are
/// ended), then writable again with fresh sessions, as on a promoted
/// primary. Run from the `postgres` database, not the test's.
async fn read_only_window(database: &str, hold: Duration) {
    let mut admin = PgConnection::connect(&server_url()).await.expect("admin connection");
    let quoted = format!("\"{database}\"");
    admin_execute(
        &mut admin,
        format!("ALTER DATABASE {quoted} SET default_transaction_read_only = on"),
    )
    .await;
    terminate_sessions(&mut admin, database).await;
    // Holds the fault open; nothing is synchronised by it.
    tokio::time::sleep(hold).await;
    admin_execute(
        &mut admin,
        format!("ALTER DATABASE {quoted} RESET default_transaction_read_only"),
    )
    .await;
    terminate_sessions(&mut admin, database).await;
    admin.close().await.ok();
}

/// Publishes `n` measurements at a steady rate (one every 40 ms), counting
/// them in `sent`.
async fn steady_stream(env: &TestEnv, n: usize, sent: &AtomicUsize) {
    // The rate of a load generator, not a synchronisation.
    let mut every = tokio::time::interval(Duration::from_millis(40));
    for i in 0..n {
        every.tick().await;
        env.publish(&measurement(&format!("m-{i}"), 1), BasicProperties::default())
            .await;
        sent.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_database_window_under_load_parks_nothing() {
    if !rabbitmqctl_available("a_read_only_database_window_under_load_parks_nothing") {
        return;
    }
    const N: usize = 200;
    let env = TestEnv::new(&failover_topology()).await;
    let worker = env.spawn_worker(&[]);
    worker.wait_ready(&env).await;
    let sent = AtomicUsize::new(0);
    let fault = async {
        wait_for("the stream to be applied for a while", WAIT, || async {
            (env.count("measurements").await >= 20).then_some(())
        })
        .await;
        let at = sent.load(Ordering::SeqCst);
        read_only_window(&env.database, Duration::from_secs(6)).await;
        (at, sent.load(Ordering::SeqCst))
    };
    let ((opened_at, closed_at), ()) = tokio::join!(fault, steady_stream(&env, N, &sent));
    assert!(
        opened_at < N && closed_at > opened_at,
        "the window fell inside the stream (messages {opened_at}..{closed_at} of {N})"
    );

    let (applied, parked) = wait_for_seen("every message applied or parked", Duration::from_secs(120), || async {
        let applied = env.count("measurements").await;
        let parked = queue_counts(&env.dlq()).await.expect("the DLQ exists").total();
        (applied + parked as i64 >= N as i64, (applied, parked))
    })
    .await;
    let metrics = worker.metrics.clone();
    worker.stop().await;
    assert_eq!(parked, 0, "parked during the read-only window ({applied} applied)");
    for kind in ErrorKind::ALL {
        assert_eq!(metrics.parked(kind), 0, "nothing parked as {kind:?}");
    }
    assert_eq!(applied, N as i64, "each measurement applied once");
    let distinct: i64 = sqlx::query_scalar("SELECT count(DISTINCT message_id) FROM events")
        .fetch_one(&env.pool)
        .await
        .expect("count events");
    assert_eq!(distinct, N as i64, "each event recorded once in the inbox");
    assert_eq!(env.count("events").await, N as i64);
    env.cleanup().await;
}

// ---------------------------------------------------------------------------
// 4. A panic in a bulk check strands nothing.

/// 50 TEST_PANIC_CHECK events (5 of which panic in the bulk check)
/// interleaved with 50 measurements; with the ids of the panicking ones and
/// of the others.
fn panic_check_burst() -> (Burst, BTreeSet<String>, BTreeSet<String>) {
    let (mut burst, mut panicking, mut applied) = (Vec::new(), BTreeSet::new(), BTreeSet::new());
    for i in 0..50 {
        let id = format!("check-{i}");
        let panic = i % 10 == 3;
        let check = body(json!({"type": "TEST_PANIC_CHECK", "id": id, "data": {"panic": panic}}));
        burst.push((check, with_id(&id)));
        let group = if panic { &mut panicking } else { &mut applied };
        group.insert(id);
        let id = format!("m-{i}");
        burst.push((measurement(&id, 1), with_id(&id)));
        applied.insert(id);
    }
    (burst, panicking, applied)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_bulk_check_still_drains_the_queue() {
    if !rabbitmqctl_available("a_panic_in_a_bulk_check_still_drains_the_queue") {
        return;
    }
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let (burst, panicking, applied) = panic_check_burst();
    // Waiting in Q when the worker starts, so they arrive together and batch.
    env.publish_burst(burst).await;
    let worker = env.spawn_worker(&[("RABBITMQ_PREFETCH_COUNT", "64")]);
    let seen = wait_for_seen("Q to drain", WAIT, || async {
        let left = main_queue(&env).await;
        let parked = env.queue_len(&env.dlq()).await;
        let recorded = env.count("measurements").await;
        let done = left.total() == 0 && parked as usize >= panicking.len() && recorded as usize >= applied.len();
        (done, (left, parked, recorded))
    })
    .await;
    assert_eq!(seen.0, QueueCounts::default(), "nothing stranded in Q");
    wait_for_seen("the in-flight gauge back to 0", Duration::from_secs(10), || async {
        let now = in_flight(&worker);
        (now == 0.0, now)
    })
    .await;
    worker.stop().await;

    let ids: Vec<String> = sqlx::query_scalar("SELECT message_id FROM measurements ORDER BY message_id")
        .fetch_all(&env.pool)
        .await
        .expect("measurement ids");
    assert_eq!(ids.len(), applied.len(), "each recorded once: {ids:?}");
    assert_eq!(ids.into_iter().collect::<BTreeSet<_>>(), applied);
    let parked = env.drain(&env.dlq()).await;
    for message in &parked {
        let kind = headers::read_string(message.delivery.properties.headers().as_ref(), ERROR_KIND);
        assert_eq!(
            kind.as_deref(),
            Some("panic"),
            "{} parked as {kind:?}",
            message_id(message)
        );
    }
    let parked = tally(&parked);
    assert!(parked.values().all(|n| *n == 1), "parked more than once: {parked:?}");
    assert_eq!(parked.into_keys().collect::<BTreeSet<_>>(), panicking);
    env.cleanup().await;
}

// ---------------------------------------------------------------------------
// 5. The in-flight gauge returns to 0 on every path.

/// Sessions of the test's database running a slow message's `pg_sleep`
/// (a table expression for [`TestEnv::count`]).
const SLEEPING: &str =
    "pg_stat_activity WHERE datname = current_database() AND query LIKE 'SELECT pg_sleep%' AND state = 'active'";

/// `n` measurements with a slow message (3 s in its transaction) every
/// 200th: whenever the cut comes, a batch is likely mid-flight, and the
/// test cuts while one is.
fn burst_with_slow_ones(n: usize) -> Burst {
    (0..n)
        .map(|i| {
            let b = if i % 200 == 100 {
                slow(&format!("slow-{i}"), 3)
            } else {
                measurement(&format!("m-{i}"), 1)
            };
            (b, BasicProperties::default())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_returns_to_zero_after_a_cut_mid_burst() {
    if !rabbitmqctl_available("in_flight_returns_to_zero_after_a_cut_mid_burst") {
        return;
    }
    const N: usize = 2000;
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let proxy = Proxy::start(upstream_of(&amqp_url())).await;
    let proxied = proxy.url_for(&amqp_url());
    // Slow batches hold their deliveries: room for the others to flow.
    let worker = env.spawn_worker_with(
        env.settings(&[("AMQP_URL", &proxied), ("RABBITMQ_PREFETCH_COUNT", "128")]),
        None,
    );
    worker.wait_ready(&env).await;
    env.publish_burst(burst_with_slow_ones(N)).await;
    // Cut while a batch is mid-flight: it outlasts the second a session
    // gives its work after a fault.
    wait_for("progress, with a slow message running", WAIT, || async {
        (env.count("measurements").await >= 300 && env.count(SLEEPING).await >= 1).then_some(())
    })
    .await;
    proxy.cut();
    let at_cut = env.count("measurements").await;
    assert!(at_cut < N as i64, "the cut came mid-burst ({at_cut} of {N} applied)");
    wait_for("the worker to reconnect", WAIT, || async {
        (worker.metrics.connections() >= 2 && worker.readiness.is_ready()).then_some(())
    })
    .await;
    env.wait_for_rows("measurements", N as i64, Duration::from_secs(120))
        .await;
    let left = wait_for_seen("Q to be empty", WAIT, || async {
        let left = main_queue(&env).await;
        (left.total() == 0, left)
    })
    .await;
    assert_eq!(left, QueueCounts::default());
    wait_for_seen("the in-flight gauge back to 0", Duration::from_secs(10), || async {
        let now = in_flight(&worker);
        (now == 0.0, now)
    })
    .await;
    worker.stop().await;
    assert_eq!(env.count("events").await, N as i64, "each applied once");
    assert_eq!(env.queue_len(&env.dlq()).await, 0);
    env.cleanup().await;
}

/// Four slow messages (5 s in their transaction) among twelve measurements.
fn slow_and_quick() -> Burst {
    (0..16)
        .map(|i| {
            let b = if i % 4 == 1 {
                slow(&format!("slow-{i}"), 5)
            } else {
                measurement(&format!("m-{i}"), 1)
            };
            (b, BasicProperties::default())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_returns_to_zero_after_a_shutdown_mid_batch() {
    if !rabbitmqctl_available("in_flight_returns_to_zero_after_a_shutdown_mid_batch") {
        return;
    }
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let burst = slow_and_quick();
    let total = burst.len() as u64;
    // Waiting in Q when the worker starts, so they arrive together and batch.
    env.publish_burst(burst).await;
    let worker = env.spawn_worker(&[("SHUTDOWN_GRACE_MS", "200")]);
    let before = wait_for_seen("a batch mid-flight", WAIT, || async {
        let gauge = in_flight(&worker);
        (env.count(SLEEPING).await >= 1 && gauge > 0.0, gauge)
    })
    .await;
    let metrics = worker.metrics.clone();
    worker.stop().await;

    let after = metric_value(&metrics, IN_FLIGHT).expect("the in-flight gauge is rendered");
    assert_eq!(
        after, 0.0,
        "in flight after the worker stopped (it was {before} at the stop)"
    );
    // The cut-off work was left unacked, and is back in Q.
    let (applied, waiting) = wait_for_seen("every message applied or back in Q", WAIT, || async {
        let applied = env.count("measurements").await as u64;
        let waiting = main_queue(&env).await;
        (
            applied + waiting.ready == total && waiting.unacked == 0,
            (applied, waiting),
        )
    })
    .await;
    assert!(waiting.ready >= 1, "the slow work was cut off ({applied} applied)");
    env.cleanup().await;
}
