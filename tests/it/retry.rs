//! The retry and dead-letter engine against the real broker and database:
//! in-process and delayed retries, parking, and the headers on each attempt.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::messages::{flaky, measurement};
use crate::common::{TestEnv, TopologyFile};
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::json;
use worker_iot_core::ErrorKind;
use worker_iot_core::EventHook;
use worker_iot_core::headers::{self, *};

const WAIT: Duration = Duration::from_secs(60);

/// Headers seen on each delivery of the message whose body contains `marker`.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Option<FieldTable>>>>);

impl Seen {
    fn observer(&self, marker: &'static str) -> EventHook {
        let seen = self.0.clone();
        crate::common::on_received(move |delivery: &Delivery| {
            if String::from_utf8_lossy(&delivery.data).contains(marker) {
                seen.lock().unwrap().push(delivery.properties.headers().clone());
            }
        })
    }

    fn all(&self) -> Vec<Option<FieldTable>> {
        self.0.lock().unwrap().clone()
    }
}

fn producer_properties() -> BasicProperties {
    let mut h = FieldTable::default();
    h.insert(
        "x-producer".into(),
        AMQPValue::LongString(LongString::from("sensor-gateway")),
    );
    h.insert(
        "traceparent".into(),
        AMQPValue::LongString(LongString::from(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )),
    );
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_app_id("gateway-7".into())
        .with_timestamp(1_700_000_000)
        .with_headers(h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_failing_transiently_twice_is_processed_on_its_third_delivery() {
    let env = TestEnv::new(&TopologyFile::classic().in_process_attempts(1).max_attempts(5)).await;
    env.publish(&flaky("flaky-twice", 2), producer_properties()).await;
    let seen = Seen::default();
    let worker = env.spawn_worker_with(env.settings(&[]), Some(seen.observer("flaky-twice")));
    env.wait_for_rows("measurements WHERE message_id = 'flaky-twice'", 1, WAIT)
        .await;
    worker.stop().await;

    let deliveries = seen.all();
    assert_eq!(deliveries.len(), 3, "first try plus two delayed retries");
    let counts: Vec<Option<i64>> = deliveries
        .iter()
        .map(|h| headers::read_i64(h.as_ref(), RETRY_COUNT))
        .collect();
    assert_eq!(counts, [None, Some(1), Some(2)]);
    let first: Vec<Option<i64>> = deliveries
        .iter()
        .map(|h| headers::read_i64(h.as_ref(), FIRST_FAILURE_AT))
        .collect();
    assert_eq!(first[1], first[2], "first failure time is kept");
    let last2 = headers::read_i64(deliveries[2].as_ref(), LAST_FAILURE_AT).unwrap();
    assert!(last2 > first[1].unwrap(), "last failure moves on");
    for h in &deliveries[1..] {
        assert_eq!(
            headers::read_string(h.as_ref(), ERROR_KIND).as_deref(),
            Some("transient")
        );
        assert_eq!(
            headers::read_string(h.as_ref(), "x-producer").as_deref(),
            Some("sensor-gateway")
        );
        assert_eq!(
            headers::read_string(h.as_ref(), ORIGINAL_ROUTING_KEY).as_deref(),
            Some(env.queue.as_str())
        );
    }
    // Run 3 succeeded: exactly one row, written by it.
    let value: f64 = sqlx::query_scalar("SELECT value FROM measurements WHERE message_id = 'flaky-twice'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(value, 3.0);
    assert_eq!(env.count("events").await, 1);
    assert_eq!(env.queue_len(&env.queue).await, 0);
    assert_eq!(env.queue_len(&env.dlq()).await, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_always_failing_transiently_is_parked_after_exactly_max_attempts() {
    let env = TestEnv::new(&TopologyFile::classic().in_process_attempts(2).max_attempts(3)).await;
    let body = flaky("flaky-always", 1000);
    let properties = producer_properties().with_message_id("amqp-flaky-always".into());
    env.publish(&body, properties).await;
    let seen = Seen::default();
    let worker = env.spawn_worker_with(env.settings(&[]), Some(seen.observer("flaky-always")));
    env.wait_for_queue_len(&env.dlq(), 1, WAIT).await;
    worker.stop().await;

    assert_eq!(seen.all().len(), 3, "exactly max_attempts deliveries");
    let parked = env.drain(&env.dlq()).await;
    assert_eq!(parked.len(), 1);
    let d = &parked[0].delivery;
    assert_eq!(d.data, body, "body unchanged");
    let p = &d.properties;
    assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some("amqp-flaky-always"));
    assert_eq!(p.content_type().as_ref().map(|s| s.as_str()), Some("application/json"));
    assert_eq!(p.app_id().as_ref().map(|s| s.as_str()), Some("gateway-7"));
    assert_eq!(p.timestamp(), &Some(1_700_000_000));
    let h = p.headers().as_ref();
    assert_eq!(headers::read_i64(h, RETRY_COUNT), Some(2));
    assert_eq!(
        headers::read_string(h, ERROR_KIND).as_deref(),
        Some("attempts_exhausted")
    );
    // Two in-process runs on each of three deliveries: the last error is run 6.
    let error = headers::read_string(h, ERROR).unwrap_or_default();
    assert!(
        error.starts_with("database: error returned from database: TEST_FLAKY transient failure, run 6"),
        "{error}"
    );
    assert_eq!(headers::read_string(h, ERROR_FINGERPRINT).map(|f| f.len()), Some(16));
    let first = headers::read_i64(h, FIRST_FAILURE_AT).unwrap();
    let last = headers::read_i64(h, LAST_FAILURE_AT).unwrap();
    assert!(first > 1_700_000_000_000 && last > first);
    assert!(
        headers::read_string(h, FAILED_BY)
            .unwrap()
            .ends_with(env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(headers::read_string(h, "x-producer").as_deref(), Some("sensor-gateway"));
    assert_eq!(
        headers::read_string(h, "traceparent").as_deref(),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    assert_eq!(env.count("events").await, 0, "nothing applied");
    assert_eq!(env.queue_len(&env.queue).await, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_is_parked_at_once_without_retries() {
    let env = TestEnv::new(&TopologyFile::classic().in_process_attempts(3).max_attempts(5)).await;
    env.publish(&measurement("perm-1", "warm"), producer_properties()).await;
    let seen = Seen::default();
    let worker = env.spawn_worker_with(env.settings(&[]), Some(seen.observer("perm-1")));
    env.wait_for_queue_len(&env.dlq(), 1, WAIT).await;
    let metrics = worker.metrics.clone();
    worker.stop().await;

    assert_eq!(seen.all().len(), 1);
    assert_eq!(metrics.retried(), 0);
    assert_eq!(metrics.parked(ErrorKind::Validation), 1);
    let parked = env.drain(&env.dlq()).await;
    let h = parked[0].delivery.properties.headers().as_ref();
    assert_eq!(headers::read_i64(h, RETRY_COUNT), Some(0));
    assert_eq!(headers::read_string(h, ERROR_KIND).as_deref(), Some("validation"));
    assert_eq!(
        headers::read_string(h, ERROR).as_deref(),
        Some("data.value must be a number")
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_parked_and_its_batch_is_unharmed() {
    let env = TestEnv::new(&TopologyFile::classic().in_process_attempts(3).max_attempts(5)).await;
    for i in 0..20 {
        env.publish(&measurement(&format!("ok-{i}"), i), BasicProperties::default())
            .await;
        if i == 10 {
            let poison = json!({"type": "TEST_PANIC", "id": "boom", "data": null});
            env.publish(poison.to_string().as_bytes(), BasicProperties::default())
                .await;
        }
    }
    let worker = env.spawn_worker(&[]);
    env.wait_for_rows("measurements", 20, WAIT).await;
    env.wait_for_queue_len(&env.dlq(), 1, WAIT).await;
    worker.stop().await;
    let parked = env.drain(&env.dlq()).await;
    let h = parked[0].delivery.properties.headers().as_ref();
    assert_eq!(headers::read_string(h, ERROR_KIND).as_deref(), Some("panic"));
    assert!(
        headers::read_string(h, ERROR)
            .unwrap()
            .contains("TEST_PANIC handler asked to panic by boom")
    );
    assert_eq!(
        env.count("events WHERE message_id = 'boom'").await,
        0,
        "the panic rolled back"
    );
    assert_eq!(env.queue_len(&env.queue).await, 0);
    env.cleanup().await;
}
