//! A broker-wide memory alarm: RabbitMQ blocks every publisher, so the
//! worker's retry and DLQ copies wait for the alarm to clear (docs/reliability.md, "Broker alarms").
//! The alarm blocks every test's publishes too: it runs in the
//! `whole_broker` binary, one test at a time.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::common::messages::{measurement, with_id};
use crate::common::observe::{
    QueueCounts, metric_value, queue_counts, rabbitmqctl, rabbitmqctl_available, wait_for_seen,
};
use crate::common::{RunningWorker, TestEnv, TopologyFile};
use lapin::BasicProperties;
use worker_iot_core::broker::CONFIRM_TIMEOUT;
use worker_iot_core::headers::{self, ERROR_KIND};

const POISON: usize = 50;
const VALID: usize = 100;
/// How long the alarm stays on at least: longer than the confirm timeout,
/// after which a worker that waits for confirms would give up on a copy.
const HOLD: Duration = Duration::from_secs(15);

fn memory_alarm_on() -> bool {
    rabbitmqctl(&["eval", "rabbit_alarm:get_alarms()."]).contains("resource_limit,memory")
}

/// Polls the broker's alarms until the memory alarm is `on` (or off).
fn wait_for_memory_alarm(on: bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while memory_alarm_on() != on {
        let alarms = rabbitmqctl(&["eval", "rabbit_alarm:get_alarms()."]);
        assert!(Instant::now() < deadline, "memory alarm not {on} after 60 s: {alarms}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A memory alarm raised by setting a tiny high watermark; the watermark
/// found before is put back when it is cleared or dropped (on panic too).
struct MemoryAlarm {
    /// The watermark before, as the Erlang term the broker printed.
    watermark: String,
    cleared: bool,
}

impl MemoryAlarm {
    fn raise() -> MemoryAlarm {
        let watermark = rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]);
        assert!(
            !memory_alarm_on(),
            "a memory alarm is already on (watermark {watermark}): not starting"
        );
        let alarm = MemoryAlarm {
            watermark,
            cleared: false,
        };
        rabbitmqctl(&["set_vm_memory_high_watermark", "0.000001"]);
        wait_for_memory_alarm(true);
        alarm
    }

    fn clear(&mut self) {
        if self.cleared {
            return;
        }
        self.cleared = true;
        let restore = format!("vm_memory_monitor:set_vm_memory_high_watermark({}).", self.watermark);
        rabbitmqctl(&["eval", &restore]);
        let now = rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]);
        assert_eq!(now, self.watermark, "the watermark is restored");
        wait_for_memory_alarm(false);
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        self.clear();
    }
}

/// Waits until the worker's `iot_broker_blocked` gauge shows `value`.
async fn wait_for_blocked(worker: &RunningWorker, value: f64) {
    wait_for_seen(
        &format!("iot_broker_blocked {value}"),
        Duration::from_secs(30),
        || async {
            let gauge = metric_value(&worker.metrics, "iot_broker_blocked");
            (gauge == Some(value), gauge)
        },
    )
    .await;
}

/// Publishes `VALID` measurements and `POISON` undecodable messages, mixed.
async fn publish_mixed(env: &TestEnv) {
    for i in 0..VALID + POISON {
        if i % 3 == 2 {
            let body = format!("{{\"type\": \"MEASUREMENT\", not json #{i}");
            env.publish(body.as_bytes(), with_id(&format!("poison-{i}"))).await;
        } else {
            env.publish(&measurement(&format!("m-{i}"), i), BasicProperties::default())
                .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_parks_each_poison_message_once_and_tears_nothing_down() {
    if !rabbitmqctl_available("a_memory_alarm_parks_each_poison_message_once_and_tears_nothing_down") {
        return;
    }
    let _broker = crate::take_broker().await;
    assert!(HOLD > CONFIRM_TIMEOUT);
    let env = TestEnv::new(&TopologyFile::fast()).await;
    publish_mixed(&env).await;
    assert_eq!(env.queue_len(&env.queue).await, (VALID + POISON) as u32);
    let mut alarm = tokio::task::block_in_place(MemoryAlarm::raise);

    // Every message prefetched at once: the blocked copies of the poison
    // messages cannot hold back the others.
    let worker = env.spawn_worker(&[("RABBITMQ_PREFETCH_COUNT", "256")]);
    let started = Instant::now();
    worker.wait_ready(&env).await;
    let connections_at_start = metric_value(&worker.metrics, "iot_broker_connections_total");
    wait_for_seen("the valid messages to be applied", Duration::from_secs(60), || async {
        let applied = env.count("measurements").await;
        (applied == VALID as i64, applied)
    })
    .await;
    assert_eq!(env.queue_len(&env.dlq()).await, 0, "no copy gets through the alarm");
    wait_for_blocked(&worker, 1.0).await;
    tokio::time::sleep(HOLD.saturating_sub(started.elapsed())).await; // holds the alarm
    assert_eq!(env.queue_len(&env.dlq()).await, 0, "no copy gets through the alarm");
    let connections_in_alarm = metric_value(&worker.metrics, "iot_broker_connections_total");
    tokio::task::block_in_place(|| alarm.clear());

    let parked = wait_until_settled(&env).await;
    wait_for_blocked(&worker, 0.0).await;
    let connections_at_end = metric_value(&worker.metrics, "iot_broker_connections_total");
    worker.stop().await;

    assert_parked_once(&parked);
    let connections = [connections_at_start, connections_in_alarm, connections_at_end];
    assert!(connections_at_start.is_some(), "connections counted: {connections:?}");
    assert!(
        connections.iter().all(|c| *c == connections_at_start),
        "no session torn down (start, in alarm, end): {connections:?}"
    );
    assert_eq!(env.count("measurements").await, VALID as i64, "each applied once");
    assert_eq!(env.count("events").await, VALID as i64);
    env.cleanup().await;
}

/// Waits for `POISON` parked copies and then for the main queue to settle
/// (nothing ready, nothing unacked), so no later copy can follow; returns
/// what the DLQ holds.
async fn wait_until_settled(env: &TestEnv) -> Vec<lapin::message::BasicGetMessage> {
    let dlq = env.dlq();
    wait_for_seen(&format!("{POISON} parked copies"), Duration::from_secs(60), || async {
        let parked = env.queue_len(&dlq).await;
        assert!(
            parked <= POISON as u32,
            "{parked} parked copies of {POISON} poison messages"
        );
        (parked == POISON as u32, parked)
    })
    .await;
    wait_for_seen("the main queue to settle", Duration::from_secs(60), || async {
        let counts = queue_counts(&env.queue).await;
        (counts == Some(QueueCounts::default()), counts)
    })
    .await;
    env.drain(&dlq).await
}

/// Each poison message was parked exactly once, as undecodable.
fn assert_parked_once(parked: &[lapin::message::BasicGetMessage]) {
    let ids: BTreeSet<String> = parked
        .iter()
        .filter_map(|m| m.delivery.properties.message_id().as_ref().map(|id| id.to_string()))
        .collect();
    let bodies: BTreeSet<&[u8]> = parked.iter().map(|m| m.delivery.data.as_slice()).collect();
    let counts = format!(
        "{} copies, {} distinct ids, {} distinct bodies",
        parked.len(),
        ids.len(),
        bodies.len()
    );
    assert_eq!(parked.len(), POISON, "{counts}");
    assert_eq!(ids.len(), POISON, "{counts}");
    assert_eq!(bodies.len(), POISON, "{counts}");
    for message in parked {
        let kind = headers::read_string(message.delivery.properties.headers().as_ref(), ERROR_KIND);
        assert_eq!(kind.as_deref(), Some("decode"), "{counts}");
    }
}
