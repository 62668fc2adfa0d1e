//! A broker whose confirms arrive after the relay's confirm timeout: the
//! relay may send a device message again, but never more often than the
//! attempts it counts in the outbox (docs/reliability.md, "Commands to devices").

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::messages::message_id;
use crate::common::observe::wait_for_seen;
use crate::common::proxy::{Proxy, upstream_of};
use crate::common::{Device, RunningWorker, TestEnv, TopologyFile, amqp_url};
use worker_iot_core::broker::CONFIRM_TIMEOUT;

/// Device messages written while the confirms are late.
const ROWS: usize = 20;
/// Longer than the relay's confirm timeout.
const LATE: Duration = Duration::from_secs(11);
/// How long the broker keeps confirming late: several confirm timeouts.
const HOLD: Duration = Duration::from_secs(60);

/// Writes device messages straight into the outbox in one statement, as a
/// committed command would (the insert trigger wakes the relay, which then
/// claims them all in one batch).
async fn insert_outbox_rows(env: &TestEnv, device: &Device, ids: &[String]) {
    let states: Vec<Vec<u8>> = (0..ids.len())
        .map(|i| if i % 2 == 0 { b"on".to_vec() } else { b"off".to_vec() })
        .collect();
    sqlx::query(
        "INSERT INTO outbox (message_id, exchange, routing_key, body)
         SELECT id, 'amq.topic', $2, body FROM unnest($1::text[], $3::bytea[]) AS m(id, body)",
    )
    .bind(ids)
    .bind(format!(".led.{}", device.id))
    .bind(&states)
    .execute(&env.pool)
    .await
    .expect("insert outbox rows");
}

async fn wait_all_published(env: &TestEnv, expected: i64, timeout: Duration) {
    wait_for_seen(&format!("{expected} published outbox rows"), timeout, || async {
        let published = env.count("outbox WHERE published_at IS NOT NULL").await;
        (published == expected, published)
    })
    .await;
}

/// Starts a worker whose broker connections go through `proxy`, and waits
/// until its relay has published one device message through it.
async fn worker_behind(env: &TestEnv, device: &Device, proxy: &Proxy) -> RunningWorker {
    let proxied = proxy.url_for(&amqp_url());
    let worker = env.spawn_worker(&[("AMQP_URL", &proxied)]);
    worker.wait_ready(env).await;
    insert_outbox_rows(env, device, &["warm-up".to_owned()]).await;
    wait_all_published(env, 1, Duration::from_secs(30)).await;
    worker
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_confirms_eleven_seconds_late_never_sends_a_command_more_than_its_counted_attempts() {
    assert!(LATE > CONFIRM_TIMEOUT, "the confirms must come after the timeout");
    let env = TestEnv::new(&TopologyFile::outbox()).await;
    let device = Device::bind(&env).await;
    let proxy = Proxy::start(upstream_of(&amqp_url())).await;
    let worker = worker_behind(&env, &device, &proxy).await;

    proxy.delay_downstream(LATE);
    let ids: Vec<String> = (0..ROWS).map(|i| format!("led-{i}")).collect();
    insert_outbox_rows(&env, &device, &ids).await;
    // Publishes reach the broker at once; only what it answers is late.
    wait_for_seen("the relay to send the rows", Duration::from_secs(30), || async {
        let received = env.queue_len(&device.queue).await;
        (received > ROWS as u32, received)
    })
    .await;
    tokio::time::sleep(HOLD).await; // holds the late confirms for a minute
    proxy.delay_downstream(Duration::ZERO);
    wait_all_published(&env, ROWS as i64 + 1, Duration::from_secs(120)).await;
    let published_marks = worker.metrics.outbox_published();
    worker.stop().await;

    assert_each_copy_counted(&env, &device, published_marks).await;
    env.cleanup().await;
}

/// Every device message reached the device, no more often than the
/// attempts its row counts, and every row was marked published once.
async fn assert_each_copy_counted(env: &TestEnv, device: &Device, published_marks: u64) {
    let copies = copies_by_message_id(env, device).await;
    let rows: Vec<(String, i32, bool)> =
        sqlx::query_as("SELECT message_id, attempts, published_at IS NOT NULL FROM outbox ORDER BY id")
            .fetch_all(&env.pool)
            .await
            .expect("outbox rows");
    let seen: Vec<String> = rows
        .iter()
        .map(|(id, attempts, _)| format!("{id}: {} copies, {attempts} attempts", copies.get(id).unwrap_or(&0)))
        .collect();
    assert_eq!(rows.len(), ROWS + 1, "one row per device message: {seen:?}");
    for (id, attempts, published) in &rows {
        let received = copies.get(id).copied().unwrap_or(0);
        assert!(*published, "{id} is published: {seen:?}");
        assert!(received >= 1, "{id} reached the device: {seen:?}");
        assert!(
            received <= i64::from(*attempts),
            "{id} was sent more often than its counted attempts: {seen:?}"
        );
    }
    assert_eq!(copies.len(), ROWS + 1, "nothing else reached the device: {copies:?}");
    assert_eq!(
        published_marks,
        ROWS as u64 + 1,
        "each row marked published once: {seen:?}"
    );
}

/// How many copies of each device message the device queue holds.
async fn copies_by_message_id(env: &TestEnv, device: &Device) -> BTreeMap<String, i64> {
    let mut copies = BTreeMap::new();
    for message in env.drain(&device.queue).await {
        *copies.entry(message_id(&message)).or_insert(0) += 1;
    }
    copies
}
