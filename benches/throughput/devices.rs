//! Raw device readings (`BENCH_RAW_DEVICES=on`): what a pressure sensor
//! publishes over MQTT, drained by the worker through a device route, in
//! the same round as the enveloped readings of `BENCH_MIX=readings`.
//!
//! A sensor publishes `{"value": 55, "measure": "psi", "time": 12340074}`
//! on MQTT topic `<id>/pressure`; RabbitMQ's MQTT plugin puts it on
//! `amq.topic` with routing key `<id>.pressure`, persistent, with only the
//! `x-mqtt-publish-qos` and `x-mqtt-dup` headers. The bench publishes the
//! same thing over AMQP under a topic prefix of its own (`<prefix>/<id>/pressure`,
//! so no other worker's route binds them), and the bench's topology routes
//! `<prefix>/+/pressure` to `MEASUREMENT` as the shipped file routes
//! `+/pressure` ([`route`]). Without the broker's arrival stamp (RabbitMQ
//! 3.10) each reading gets a fresh id at receipt: a clean drain has no
//! duplicates, and every reading is a `measurements` row.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;
use worker_iot_core::device_route::MQTT_EXCHANGE;

use crate::drain::{self, Drain};
use crate::mix::Expected;
use crate::support::{env_or, fill_routed, passive_len};
use crate::{Bench, Target};

/// Devices the readings are spread over, as in the enveloped readings mix.
const DEVICES: usize = 200;

/// Whether the raw device drain runs (`BENCH_RAW_DEVICES`, `on` or `off`).
/// It is measured against the clean drain, so that one must be the
/// enveloped readings (`BENCH_MIX=readings`).
pub fn enabled() -> bool {
    let on = match env_or("BENCH_RAW_DEVICES", "off").as_str() {
        "on" => true,
        "off" => false,
        other => panic!("BENCH_RAW_DEVICES={other:?}: expected on or off"),
    };
    let mix = env_or("BENCH_MIX", "sample");
    assert!(
        !on || mix == "readings",
        "BENCH_RAW_DEVICES=on compares raw device readings with the enveloped readings \
         of the clean drain: run it with BENCH_MIX=readings (not {mix:?})"
    );
    on
}

/// The bench topology's device route: the shipped `+/pressure` route
/// under the bench's prefix, the device id being the second level.
pub fn route(prefix: &str) -> String {
    format!(
        "[[routes]]\ntopic = \"{prefix}/+/pressure\"\ntype = \"MEASUREMENT\"\n\
         device_id = {{ level = 2 }}\n\
         data = {{ sensor = {{ value = \"pressure\" }}, value = {{ field = \"value\" }}, \
         unit = {{ field = \"measure\", optional = true }} }}\n"
    )
}

/// `n` readings from [`DEVICES`] devices: `(routing key, body)`, the
/// routing key being the MQTT plugin's form of `<prefix>/<device>/pressure`.
pub fn readings(prefix: &str, n: usize, seed: u64) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let device = (i * 7919) % DEVICES;
            let key = format!("{prefix}.fleet-{device}.pressure");
            // Each device reports every 5 s since its boot, a value in psi.
            let time = 5_000 * (i / DEVICES) as u64 + 1_000 * seed;
            let body = json!({"value": 30 + (i % 70), "measure": "psi", "time": time});
            (key, body.to_string().into_bytes())
        })
        .collect()
}

/// What the MQTT plugin sets on a QoS 1 publish: persistent, and its two
/// headers; no message id, no timestamp, no content type.
fn mqtt_properties() -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert("x-mqtt-publish-qos".into(), AMQPValue::ShortShortInt(1));
    headers.insert("x-mqtt-dup".into(), AMQPValue::Boolean(false));
    BasicProperties::default().with_delivery_mode(2).with_headers(headers)
}

/// Fills `target`'s queue with `n` raw readings through `amq.topic`, lets
/// a fresh worker drain them and checks: `n` processed, `n` measurements
/// rows, no duplicate, nothing parked, every queue empty.
pub async fn run(bench: &Bench, target: &Target, seed: u64) -> Drain {
    let readings = readings(&bench.prefix, bench.n, seed);
    let messages: Vec<(&str, &[u8])> = readings
        .iter()
        .map(|(key, body)| (key.as_str(), body.as_slice()))
        .collect();
    drain::reset(bench, target).await;
    fill_routed(&bench.publisher, MQTT_EXCHANGE, &messages, &mqtt_properties()).await;
    let queue = target.topology.queue();
    let queued = passive_len(&bench.publisher, queue).await as usize;
    assert_eq!(
        queued, bench.n,
        "the raw readings published to {MQTT_EXCHANGE} must all reach {queue} through the route's binding"
    );
    let n = bench.n as i64;
    let expected = Expected {
        events: n,
        measurements: n,
        ..Expected::default()
    };
    drain::filled(bench, target, bench.n as u64, &expected, "raw-devices").await
}
