//! End-to-end processing against the real RabbitMQ and PostgreSQL: the
//! worker runs in-process on its own queues and database.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::{TestEnv, TopologyFile};
use chrono::{DateTime, Duration as Span, TimeZone, Utc};
use lapin::BasicProperties;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde_json::{Value, json};
use worker_iot_core::headers::{self, ERROR, ERROR_FINGERPRINT, ERROR_KIND, RETRY_COUNT};

const WAIT: Duration = Duration::from_secs(60);

fn body(message_type: &str, kind: &str, id: Option<&str>, time: DateTime<Utc>, data: Value) -> Vec<u8> {
    let mut envelope = json!({"type": message_type, "kind": kind, "time": time.to_rfc3339(), "data": data});
    if let Some(id) = id {
        envelope["id"] = id.into();
    }
    envelope.to_string().into_bytes()
}

/// What the test expects, built alongside the messages it sends.
#[derive(Default)]
struct Expected {
    events: i64,
    commands: i64,
    measurements: i64,
    beacons: i64,
    outbox: i64,
    parked: u32,
    /// device -> (time, status) of its latest UP/DOWN.
    devices: BTreeMap<String, (DateTime<Utc>, &'static str)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_realistic_mix_of_1000_messages_ends_with_exactly_the_expected_rows() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let base = Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap();
    let mut expected = Expected::default();
    let mut bodies: Vec<Vec<u8>> = Vec::new();

    for i in 0..1000_i64 {
        let id = format!("m-{i}");
        let time = base + Span::seconds(i);
        let device = format!("dev-{}", i % 7);
        let b = match i % 20 {
            0 | 1 => {
                update_device(&mut expected, &device, time, "online");
                expected.events += 1;
                body(
                    "DEVICE_UP",
                    "event",
                    Some(&id),
                    time,
                    json!({"device_id": device, "ip": format!("10.0.0.{}", i % 200)}),
                )
            }
            2 => {
                update_device(&mut expected, &device, time, "offline");
                expected.events += 1;
                body("DEVICE_DOWN", "event", Some(&id), time, json!({"device_id": device}))
            }
            3..=5 => {
                expected.events += 1;
                expected.measurements += 1;
                body(
                    "MEASUREMENT",
                    "event",
                    Some(&id),
                    time,
                    json!({"device_id": device, "sensor": "t", "value": i as f64 / 4.0}),
                )
            }
            6 => {
                expected.events += 1;
                expected.beacons += 1;
                body(
                    "IBEACON_CHANGE",
                    "event",
                    Some(&id),
                    time,
                    json!({"mac_address": "0a:1b:2c:3d:4e:5f",
                    "uuid": "f7826da6-4fa2-4e98-8024-bc5b71e0893e", "major": i % 100, "minor": 1, "tx_power": -59, "rssi": -60}),
                )
            }
            7 => {
                expected.events += 1;
                expected.beacons += 1;
                body("IBEACON_CHANGE", "event", Some(&id), time, Value::Null)
            }
            8 => {
                expected.events += 1;
                body(
                    ["IBEACON_READ", "HTTP_COAP_REQUEST", "COAP_HTTP_RESPONSE"][(i as usize / 20) % 3],
                    "event",
                    Some(&id),
                    time,
                    json!({"x": i}),
                )
            }
            9 => {
                expected.commands += 1;
                expected.outbox += 1;
                body(
                    "SET_LED",
                    "command",
                    Some(&id),
                    time,
                    json!({"device_id": device, "state": "on"}),
                )
            }
            10 => {
                expected.commands += 1;
                expected.outbox += 1;
                body(
                    "SET_PUBLISH_PERIOD",
                    "command",
                    Some(&id),
                    time,
                    json!({"device_id": device, "period_ms": 2000}),
                )
            }
            11 => {
                // Exact redelivery of an earlier message with an id.
                body(
                    "MEASUREMENT",
                    "event",
                    Some(&format!("m-{}", i - 8)),
                    base + Span::seconds(i - 8),
                    json!({"device_id": format!("dev-{}", (i - 8) % 7), "sensor": "t", "value": (i - 8) as f64 / 4.0}),
                )
            }
            12 | 13 => {
                // An id-less message, sent twice (i % 20 == 12 and 13 send the same body).
                let first = i - (i % 20 - 12);
                if i % 20 == 12 {
                    expected.events += 1;
                    expected.measurements += 1;
                }
                body(
                    "MEASUREMENT",
                    "event",
                    None,
                    base + Span::seconds(first),
                    json!({"device_id": "idless", "sensor": "h", "value": first}),
                )
            }
            14 => body("HEARTBEAT", "event", Some(&id), time, json!({})), // omitted
            15 => {
                expected.parked += 1;
                b"{not json".to_vec()
            }
            16 => {
                expected.parked += 1;
                body("TELEPORT", "event", Some(&id), time, json!({}))
            }
            17 => {
                expected.parked += 1;
                body(
                    "MEASUREMENT",
                    "event",
                    Some(&id),
                    time,
                    json!({"device_id": "bad id", "sensor": "t", "value": 1}),
                )
            }
            18 => {
                expected.parked += 1;
                format!(r#"{{"type":"DEVICE_UP","id":"{id}"}}"#).into_bytes()
            }
            _ => {
                expected.parked += 1;
                body(
                    "SET_LED",
                    "command",
                    Some(&id),
                    time,
                    json!({"device_id": device, "state": "blink"}),
                )
            }
        };
        bodies.push(b);
    }
    // Arrival order is not time order: shuffle so older device events often
    // arrive after newer ones.
    bodies.shuffle(&mut rand::rngs::StdRng::seed_from_u64(7));
    for b in &bodies {
        env.publish(b, BasicProperties::default()).await;
    }

    let worker = env.spawn_worker(&[("EVENTS_TO_OMIT", "HEARTBEAT, OTHER")]);
    env.wait_for_rows("events", expected.events, WAIT).await;
    env.wait_for_rows("commands", expected.commands, WAIT).await;
    env.wait_for_queue_len(&env.dlq(), expected.parked, WAIT).await;
    worker.stop().await;

    assert_eq!(
        env.queue_len(&env.queue).await,
        0,
        "Q is empty: every delivery was acked"
    );
    assert_eq!(env.count("events").await, expected.events);
    assert_eq!(env.count("commands").await, expected.commands);
    assert_eq!(env.count("measurements").await, expected.measurements);
    assert_eq!(env.count("beacon_readings").await, expected.beacons);
    assert_eq!(env.count("beacon_readings WHERE mac_address IS NULL").await, 50);
    assert_eq!(env.count("outbox").await, expected.outbox);
    assert_eq!(
        env.count("outbox WHERE routing_key LIKE '.led.dev-%' AND body = 'on'")
            .await,
        50
    );
    assert_eq!(
        env.count("outbox WHERE routing_key LIKE 'dev-%.config' AND body = '2000'")
            .await,
        50
    );
    assert_eq!(env.count("events WHERE type = 'HEARTBEAT'").await, 0);

    let devices: Vec<(String, String, DateTime<Utc>)> =
        sqlx::query_as("SELECT device_id, status, last_seen_at FROM devices ORDER BY device_id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let want: Vec<(String, String, DateTime<Utc>)> = expected
        .devices
        .iter()
        .map(|(d, (t, s))| (d.clone(), (*s).to_owned(), *t))
        .collect();
    assert_eq!(devices, want, "devices hold the latest event by time");

    let parked = env.drain(&env.dlq()).await;
    assert_eq!(parked.len() as u32, expected.parked);
    let mut kinds = BTreeMap::new();
    for message in &parked {
        let h = message.delivery.properties.headers().as_ref();
        let kind = headers::read_string(h, ERROR_KIND).expect("iot-error-kind set");
        assert!(
            !headers::read_string(h, ERROR).unwrap_or_default().is_empty(),
            "iot-error set"
        );
        assert_eq!(headers::read_string(h, ERROR_FINGERPRINT).map(|f| f.len()), Some(16));
        assert_eq!(headers::read_i64(h, RETRY_COUNT), Some(0));
        *kinds.entry(kind).or_insert(0) += 1;
    }
    assert_eq!(
        kinds,
        BTreeMap::from([
            ("decode".to_owned(), 100),
            ("unknown_type".to_owned(), 50),
            ("validation".to_owned(), 100)
        ])
    );
    env.cleanup().await;
}

fn update_device(expected: &mut Expected, device: &str, time: DateTime<Utc>, status: &'static str) {
    let entry = expected.devices.entry(device.to_owned()).or_insert((time, status));
    if time >= entry.0 {
        *entry = (time, status);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_message_twice_is_applied_once_with_and_without_an_id() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let time = Utc::now();
    let with_id = body(
        "MEASUREMENT",
        "event",
        Some("dup-1"),
        time,
        json!({"device_id": "d1", "sensor": "t", "value": 1.5}),
    );
    let without_id = body(
        "MEASUREMENT",
        "event",
        None,
        time,
        json!({"device_id": "d2", "sensor": "t", "value": 2.5}),
    );
    let by_property = body(
        "SET_LED",
        "command",
        None,
        time,
        json!({"device_id": "d3", "state": "off"}),
    );
    let property = BasicProperties::default().with_message_id("prop-1".into());
    for _ in 0..2 {
        env.publish(&with_id, BasicProperties::default()).await;
        env.publish(&without_id, BasicProperties::default()).await;
        env.publish(&by_property, property.clone()).await;
    }
    // A third copy of the id-less body with different bytes is a new message.
    let reformatted = String::from_utf8(without_id.clone()).unwrap().replace(',', ", ");
    env.publish(reformatted.as_bytes(), BasicProperties::default()).await;

    let worker = env.spawn_worker(&[]);
    env.wait_for_rows("measurements", 3, WAIT).await;
    env.wait_for_rows("commands", 1, WAIT).await;
    worker.stop().await;

    assert_eq!(env.queue_len(&env.queue).await, 0);
    assert_eq!(env.count("measurements WHERE message_id = 'dup-1'").await, 1);
    assert_eq!(env.count("measurements WHERE device_id = 'd2'").await, 2);
    let hash = worker_iot_core::envelope::body_hash(&without_id);
    assert_eq!(env.count(&format!("events WHERE message_id = '{hash}'")).await, 1);
    assert_eq!(env.count("commands WHERE message_id = 'prop-1'").await, 1);
    assert_eq!(env.count("outbox WHERE message_id = 'prop-1'").await, 1);
    assert_eq!(env.count("events").await, 3);
    assert_eq!(env.queue_len(&env.dlq()).await, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_device_event_never_overwrites_a_newer_one() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap();
    // Newest first: DOWN at t0+10, then UP at t0 (older), then UP at t0+5 (older).
    for (message_type, id, offset, data) in [
        ("DEVICE_DOWN", "a", 10, json!({"device_id": "lamp"})),
        ("DEVICE_UP", "b", 0, json!({"device_id": "lamp", "ip": "1.2.3.4"})),
        ("DEVICE_UP", "c", 5, json!({"device_id": "lamp"})),
    ] {
        let b = body(message_type, "event", Some(id), t0 + Span::seconds(offset), data);
        env.publish(&b, BasicProperties::default()).await;
    }
    let worker = env.spawn_worker(&[("RABBITMQ_PREFETCH_COUNT", "1")]);
    env.wait_for_rows("events", 3, WAIT).await;
    worker.stop().await;
    let (status, seen): (String, DateTime<Utc>) =
        sqlx::query_as("SELECT status, last_seen_at FROM devices WHERE device_id = 'lamp'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), seen), ("offline", t0 + Span::seconds(10)));
    env.cleanup().await;
}
