//! A broker restart (`rabbitmqctl stop_app` / `start_app`) keeps what is
//! parked, what waits in a retry queue and what is queued (docs/reliability.md, "Failure modes"). It
//! runs in the `whole_broker` binary, so no other test shares the restart.

use std::time::Duration;

use crate::common::messages::{flaky, measurement};
use crate::common::observe::{rabbitmqctl, rabbitmqctl_available};
use crate::common::{TestEnv, TopologyFile, amqp_url, wait_for};
use lapin::BasicProperties;
use worker_iot_core::broker::{self, Publisher};

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_retrying_and_queued_messages_survive_a_broker_restart() {
    if !rabbitmqctl_available("parked_retrying_and_queued_messages_survive_a_broker_restart") {
        return;
    }
    let _broker = crate::take_broker().await;
    const N: usize = 5;
    let topology = TopologyFile::classic()
        .queue_type("quorum")
        .delivery_limit(5)
        .delays(&["3s"])
        .max_attempts(5)
        .in_process_attempts(1);
    let mut env = TestEnv::new(&topology).await;
    let retry_queue = format!("{}.retry.3s", env.queue);
    // Producers that leave delivery_mode unset, as pika, amqplib and lapin do.
    let transient = BasicProperties::default;
    for i in 0..N {
        env.publish(format!("not json {i}").as_bytes(), transient()).await;
        env.publish(&flaky(&format!("flaky-{i}"), 1), transient()).await;
    }
    // One message per transaction, so each flaky message fails alone and
    // waits in the retry queue (in a batch, its failure would only send
    // the batch again in halves, with no attempt spent).
    let worker = env.spawn_worker(&[("BATCH_MAX_SIZE", "1")]);
    env.wait_for_queue_len(&env.dlq(), N as u32, WAIT).await;
    env.wait_for_queue_len(&retry_queue, N as u32, WAIT).await;
    worker.stop().await;
    for i in 0..N {
        env.publish(&measurement(&format!("m-{i}"), i), transient()).await;
    }

    rabbitmqctl(&["stop_app"]);
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    env.connection = wait_for("the broker to accept connections again", WAIT, || async {
        broker::connect(&amqp_url(), "test").await.ok()
    })
    .await;
    env.publisher = Publisher::open(&env.connection).await.expect("publisher");
    assert_eq!(env.queue_len(&env.dlq()).await, N as u32, "parked copies kept");
    // A quorum queue reports its messages once its leader has recovered;
    // retry copies may meanwhile expire back into Q.
    wait_for("retry copies and queued messages after the restart", WAIT, || async {
        let waiting = env.queue_len(&retry_queue).await + env.queue_len(&env.queue).await;
        (waiting == 2 * N as u32).then_some(())
    })
    .await;

    let worker = env.spawn_worker(&[]);
    env.wait_for_rows("events", 2 * N as i64, WAIT).await;
    worker.stop().await;
    assert_eq!(
        env.count("measurements").await,
        2 * N as i64,
        "flaky and measurements, once each"
    );
    assert_eq!(env.queue_len(&env.dlq()).await, N as u32);
    assert_eq!(env.queue_len(&env.queue).await, 0);
    env.cleanup().await;
}
