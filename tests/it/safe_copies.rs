//! Every copy the worker or `requeue` republishes is at least as safe as
//! the queue it goes to, and always publishable (docs/reliability.md, "Copies and their headers"); a missing `time`
//! is the first receipt on every attempt, and a long AMQP `message_id` is
//! used whole (docs/reliability.md, "The message id").

use std::time::Duration;

use crate::common::messages::device_up;
use crate::common::observe::{rabbitmqctl, rabbitmqctl_available};
use crate::common::{TestEnv, TopologyFile, amqp_url};
use lapin::BasicProperties;
use lapin::message::Delivery;
use serde_json::json;
use worker_iot_core::broker::{self, Publisher};
use worker_iot_core::headers::{self, ERROR, ERROR_KIND, ORIGINAL_EXPIRATION};

const WAIT: Duration = Duration::from_secs(60);
const REQUEUE: &str = env!("CARGO_BIN_EXE_requeue");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_copy_is_persistent_and_never_expires() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    // What pika, amqplib and lapin send by default: no delivery_mode.
    let transient = BasicProperties::default()
        .with_message_id("not-json-1".into())
        .with_expiration("3000".into());
    env.publish(b"not json", transient).await;
    let worker = env.spawn_worker(&[]);
    env.wait_for_queue_len(&env.dlq(), 1, WAIT).await;
    worker.stop().await;

    let parked = env.drain(&env.dlq()).await;
    let properties = &parked[0].delivery.properties;
    assert_eq!(properties.delivery_mode(), &Some(2), "persistent");
    assert_eq!(properties.expiration(), &None, "cannot expire out of the DLQ");
    let h = properties.headers().as_ref();
    assert_eq!(headers::read_string(h, ORIGINAL_EXPIRATION).as_deref(), Some("3000"));
    assert_eq!(headers::read_string(h, ERROR_KIND).as_deref(), Some("decode"));
    assert_eq!(parked[0].delivery.data, b"not json");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_headers_near_the_frame_size_are_cut_not_looped_on() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    // Fits the negotiated 128 KiB frame as sent, but not with the iot-*
    // headers added.
    let mut table = lapin::types::FieldTable::default();
    headers::put_str(&mut table, "x-blob", &"b".repeat(130_000));
    headers::put_str(&mut table, "x-small", "kept");
    let heavy = BasicProperties::default()
        .with_message_id("heavy-1".into())
        .with_headers(table);
    env.publish(b"not json", heavy).await;
    let worker = env.spawn_worker(&[]);
    env.wait_for_queue_len(&env.dlq(), 1, WAIT).await;
    assert_eq!(worker.metrics.connections(), 1, "no session was rebuilt");
    worker.stop().await;

    let parked = peek_parked(&env).await;
    let h = parked.properties.headers().as_ref();
    assert!(headers::read_string(h, "x-blob").is_none());
    assert_eq!(headers::read_string(h, "x-small").as_deref(), Some("kept"));
    let error = headers::read_string(h, ERROR).unwrap();
    assert!(error.contains("header \"x-blob\" (130012 bytes) removed"), "{error}");
    env.cleanup().await;
}

/// A broker user of the test's own, removed at the end.
struct OtherUser(String);

impl OtherUser {
    fn create(env: &TestEnv) -> OtherUser {
        let name = format!("{}_user", env.queue);
        rabbitmqctl(&["-q", "add_user", &name, "pw"]);
        let user = OtherUser(name);
        rabbitmqctl(&["-q", "set_permissions", "-p", "/", &user.0, ".*", ".*", ".*"]);
        user
    }

    /// The test's broker URL, as this user (whoever the URL names).
    fn url(&self) -> String {
        let mut url = url::Url::parse(&amqp_url()).expect("AMQP_URL is a URL");
        url.set_username(&self.0).expect("an AMQP URL has a user");
        url.set_password(Some("pw")).expect("an AMQP URL has a password");
        url.to_string()
    }
}

impl Drop for OtherUser {
    fn drop(&mut self) {
        std::process::Command::new("rabbitmqctl")
            .args(["-q", "delete_user", &self.0])
            .status()
            .ok();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_id_of_another_user_is_removed_not_looped_on() {
    if !rabbitmqctl_available("a_user_id_of_another_user_is_removed_not_looped_on") {
        return;
    }
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let user = OtherUser::create(&env);
    let connection = broker::connect(&user.url(), "other-user")
        .await
        .expect("connect as the other user");
    let publisher = Publisher::open(&connection).await.expect("publisher");
    let signed = BasicProperties::default()
        .with_message_id("signed-1".into())
        .with_user_id(user.0.as_str().into());
    publisher
        .publish("", &env.queue, b"{broken", signed.clone())
        .await
        .expect("the broker takes user_id from its own user");
    env.publish(&device_up("up-1", "d1"), BasicProperties::default()).await;

    let worker = env.spawn_worker(&[]);
    env.wait_for_queue_len(&env.dlq(), 1, WAIT).await;
    env.wait_for_rows("events", 1, WAIT).await;
    assert_eq!(worker.metrics.connections(), 1, "no session was rebuilt");
    worker.stop().await;

    let parked = peek_parked(&env).await;
    assert_eq!(parked.properties.user_id(), &None);
    let error = headers::read_string(parked.properties.headers().as_ref(), ERROR).unwrap();
    assert!(error.contains(&format!("user_id \"{}\" removed", user.0)), "{error}");

    // requeue's retry copy is made safe the same way: one published by the
    // other user straight into the DLQ is retried without its user_id.
    publisher
        .publish(
            "",
            &env.dlq(),
            b"{broken too",
            signed.with_message_id("signed-2".into()),
        )
        .await
        .expect("publish to the DLQ as the other user");
    std::fs::write(env.dir.join("none.json"), "{}").unwrap();
    let out = std::process::Command::new(REQUEUE)
        .args(["--queue", &env.queue, "--yes"])
        .env("AMQP_URL", amqp_url())
        .env("DATABASE_URL", &env.database_url)
        .env("SETTINGS_FILE", env.dir.join("none.json"))
        .output()
        .expect("run requeue");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let retried = env.drain(&env.queue).await;
    assert_eq!(retried.len(), 2, "both retried");
    assert!(retried.iter().all(|m| m.delivery.properties.user_id().is_none()));
    connection.close(200, "".into()).await.ok();
    env.cleanup().await;
}

/// The DLQ's only message, left in place.
async fn peek_parked(env: &TestEnv) -> Delivery {
    let mut all = env.peek(&env.dlq()).await;
    assert_eq!(all.len(), 1);
    all.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_amqp_message_ids_are_used_whole() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let body = json!({"type": "DEVICE_UP", "data": {"device_id": "d1"}}).to_string();
    for tail in ['a', 'b'] {
        let id = format!("{}{tail}", "x".repeat(199));
        env.publish(
            body.as_bytes(),
            BasicProperties::default().with_message_id(id.as_str().into()),
        )
        .await;
    }
    let max = "y".repeat(255);
    env.publish(
        body.as_bytes(),
        BasicProperties::default().with_message_id(max.as_str().into()),
    )
    .await;
    let worker = env.spawn_worker(&[]);
    env.wait_for_rows("events", 3, WAIT).await;
    worker.stop().await;
    let ids: Vec<String> = sqlx::query_scalar("SELECT message_id FROM events ORDER BY message_id")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(
        ids,
        [format!("{}a", "x".repeat(199)), format!("{}b", "x".repeat(199)), max]
    );
    env.cleanup().await;
}

#[cfg(feature = "test-handlers")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_time_is_the_first_receipt_on_every_attempt() {
    use std::sync::{Arc, Mutex};

    use crate::common::messages::flaky;
    use worker_iot_core::headers::FIRST_RECEIVED_AT;

    let env = TestEnv::new(&TopologyFile::fast()).await;
    // Fails twice in process on its first delivery, once more on the retry.
    env.publish(&flaky("no-time", 4), BasicProperties::default()).await;
    let retried: Arc<Mutex<Vec<BasicProperties>>> = Arc::default();
    let seen = retried.clone();
    let observer = crate::common::on_received(move |delivery: &Delivery| {
        seen.lock().unwrap().push(delivery.properties.clone());
    });
    let worker = env.spawn_worker_with(env.settings(&[]), Some(observer));
    env.wait_for_rows("events", 1, WAIT).await;
    worker.stop().await;

    let deliveries = retried.lock().unwrap().clone();
    assert!(deliveries.len() >= 2, "{} deliveries", deliveries.len());
    let first_receipt = headers::read_i64(deliveries[1].headers().as_ref(), FIRST_RECEIVED_AT)
        .expect("the retry copy carries the first receipt");
    for copy in &deliveries[1..] {
        assert_eq!(copy.delivery_mode(), &Some(2), "retry copies are persistent");
        assert_eq!(
            headers::read_i64(copy.headers().as_ref(), FIRST_RECEIVED_AT),
            Some(first_receipt)
        );
    }
    // A reading keeps its time, not its receipt (docs/architecture.md,
    // "Growth"); it was applied on a later attempt, since the first failed.
    let occurred_ms: f64 = sqlx::query_scalar("SELECT (EXTRACT(EPOCH FROM occurred_at) * 1000)::float8 FROM events")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(
        occurred_ms.round() as i64,
        first_receipt,
        "occurred_at is the first receipt"
    );
    env.cleanup().await;
}
