//! Messages the AMQP client could not decode (docs/reliability.md, "Messages the AMQP client cannot decode"): a `message_id` that
//! is not UTF-8 and a header table nested thousands of levels deep, sent as
//! raw frames. Each is settled without tearing the session down, on classic
//! and quorum queues alike, and the messages around it flow.

use std::time::Duration;

use crate::common::messages::device_up;
use crate::common::raw_amqp::{self, FLAG_HEADERS, FLAG_MESSAGE_ID};
use crate::common::{TestEnv, TopologyFile, amqp_url};
use serde_json::json;
use worker_iot_core::headers::{self, ERROR, ERROR_KIND};

const WAIT: Duration = Duration::from_secs(60);

async fn undecodable_messages_are_settled_and_the_others_flow(queue_type: &str) {
    let env = TestEnv::new(&TopologyFile::classic().queue_type(queue_type).delays(&["50ms"])).await;
    env.publish_measurements(0..20).await;
    let mut bad_id = Vec::new();
    raw_amqp::short(&mut bad_id, b"\xff\xfe");
    let without_id = json!({"type": "DEVICE_UP", "data": {"device_id": "d1"}}).to_string();
    raw_amqp::publish(&amqp_url(), &env.queue, FLAG_MESSAGE_ID, &bad_id, without_id.as_bytes())
        .await
        .expect("raw publish with a non-UTF-8 message_id");
    env.publish_measurements(20..40).await;
    let deep = device_up("deep-1", "d2");
    raw_amqp::publish(
        &amqp_url(),
        &env.queue,
        FLAG_HEADERS,
        &raw_amqp::deep_table(15_000),
        &deep,
    )
    .await
    .expect("raw publish with deeply nested headers");
    env.publish_measurements(40..60).await;
    assert_eq!(env.queue_len(&env.queue).await, 62);

    let worker = env.spawn_worker(&[]);
    env.wait_for_rows("measurements", 60, WAIT).await;
    env.wait_for_rows("devices", 1, WAIT).await;
    env.wait_for_queue_len(&env.dlq(), 1, WAIT).await;
    assert_eq!(worker.metrics.connections(), 1, "the session was never torn down");
    worker.stop().await;

    assert_eq!(env.queue_len(&env.queue).await, 0);
    assert_eq!(
        env.count("events").await,
        61,
        "every measurement and the deep one, once"
    );
    let device: String = sqlx::query_scalar("SELECT device_id FROM devices")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(device, "d2", "the deep one was applied; the unreadable one was not");
    let parked = env.drain(&env.dlq()).await;
    let h = parked[0].delivery.properties.headers().as_ref();
    assert_eq!(headers::read_string(h, ERROR_KIND).as_deref(), Some("decode"));
    assert!(
        headers::read_string(h, ERROR)
            .unwrap()
            .contains("message_id property is not valid UTF-8")
    );
    assert_eq!(parked[0].delivery.data, without_id.as_bytes(), "body kept");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_classic_queue() {
    undecodable_messages_are_settled_and_the_others_flow("classic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_quorum_queue() {
    undecodable_messages_are_settled_and_the_others_flow("quorum").await;
}
