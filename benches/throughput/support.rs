//! Small helpers shared by the sections: settings from the environment,
//! medians and percentiles, filling and counting queues.

use lapin::BasicProperties;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use worker_iot_core::broker::{Outgoing, Publisher};

/// Publishes are sent in windows of this many, then their confirms awaited.
const CONFIRM_WINDOW: usize = 500;

pub fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_owned())
}

/// `key` parsed, or `default`; a value that does not parse stops the bench.
pub fn env_number<T: std::str::FromStr>(key: &str, default: &str) -> T {
    env_or(key, default)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{key} must be a number"))
}

/// The median (the upper one of an even count); NaN when there is none.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The nearest-rank percentile `q` (0 to 1) of `values`; NaN when empty.
pub fn percentile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.max(1) - 1).copied().unwrap_or(f64::NAN)
}

/// What the `publish` tool sends: JSON, persistent.
pub fn properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
}

/// Publishes `bodies` to `queue` (through the default exchange) in order,
/// every one confirmed.
pub async fn fill(publisher: &Publisher, queue: &str, bodies: &[Vec<u8>]) {
    let messages: Vec<(&str, &[u8])> = bodies.iter().map(|body| (queue, body.as_slice())).collect();
    fill_routed(publisher, "", &messages, &properties()).await;
}

/// Publishes each `(routing key, body)` of `messages` to `exchange` in
/// order, with `properties`, every one confirmed. The publisher sets
/// `mandatory`, so a message no queue is bound for stops the bench.
pub async fn fill_routed(
    publisher: &Publisher,
    exchange: &str,
    messages: &[(&str, &[u8])],
    properties: &BasicProperties,
) {
    for window in messages.chunks(CONFIRM_WINDOW) {
        let outgoing: Vec<Outgoing<'_>> = window
            .iter()
            .map(|(routing_key, body)| Outgoing {
                exchange,
                routing_key,
                body,
                properties: properties.clone(),
            })
            .collect();
        for result in publisher.publish_all(&outgoing).await {
            result.expect("publish");
        }
    }
}

/// Ready messages in `queue` (0 when it does not exist).
pub async fn passive_len(publisher: &Publisher, queue: &str) -> u32 {
    let options = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    publisher
        .channel()
        .queue_declare(queue.into(), options, FieldTable::default())
        .await
        .map_or(0, |q| q.message_count())
}

/// Durable: RabbitMQ 4 refuses transient non-exclusive queues.
pub fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

pub async fn purge(publisher: &Publisher, queue: &str) {
    publisher
        .channel()
        .queue_purge(queue.into(), Default::default())
        .await
        .unwrap();
}
