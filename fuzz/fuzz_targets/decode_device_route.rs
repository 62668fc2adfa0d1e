//! Arbitrary routing keys and bodies into the device route decoder, under
//! the shipped topology's routes: it returns the route's message or a
//! [`DeviceError`] naming the topic, never panics; a decoded message has a
//! string `device_id` and the route's type; and the MQTT topic of a routing
//! key maps back to the same key.
#![no_main]

use chrono::{TimeZone, Utc};
use libfuzzer_sys::fuzz_target;
use worker_iot_core::Topology;
use worker_iot_core::device_route::{Identity, MQTT_EXCHANGE, mqtt_topic};
use worker_iot_core::envelope::IdSource;

const MAX: usize = 262_144;

fuzz_target!(|data: &[u8]| {
    // Routing key, a NUL, then the body.
    let (key, body) = match data.iter().position(|b| *b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (&b"d1.pressure"[..], data),
    };
    let routing_key = String::from_utf8_lossy(key);
    assert_eq!(mqtt_topic(&mqtt_topic(&routing_key)), routing_key);
    let topology = Topology::parse(include_str!("../../topology/topology.toml"), "q").unwrap();
    let Some((index, topic)) = topology.routes.find(MQTT_EXCHANGE, &routing_key) else {
        return;
    };
    let route = topology.routes.get(index).unwrap();
    assert!(route.matches(&topic));
    let identity = Identity {
        id: "raw-fuzz".into(),
        id_source: IdSource::Minted,
        time: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
    };
    match route.decode(&topic, body, &identity, MAX) {
        Ok(message) => {
            assert!(message.data["device_id"].is_string(), "{:?}", message.data);
            assert_eq!(message.message_type, route.message_type);
            assert_eq!(message.time, identity.time);
        }
        Err(e) => {
            assert_eq!(e.topic, topic.chars().take(256).collect::<String>());
            assert!(e.to_string().contains("MQTT topic"));
        }
    }
});
