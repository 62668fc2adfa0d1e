//! Exploration messages for the `publish` tool (docs/operations.md,
//! "The binaries"): well-formed events and commands, a realistic mix, and a
//! set of malformed cases.

use chrono::Utc;
use serde_json::{Value, json};

use crate::envelope::{Kind, format_time};

/// An envelope body for `kind`/`message_type` with `data` and an optional id.
pub fn envelope(kind: Kind, message_type: &str, data: Value, id: Option<&str>) -> Vec<u8> {
    let mut object = json!({
        "type": message_type,
        "kind": kind.as_str(),
        "actor": "publish",
        "time": format_time(Utc::now()),
        "data": data,
    });
    if let Some(id) = id {
        object["id"] = id.into();
    }
    object.to_string().into_bytes()
}

/// `count` realistic messages: every event type and both commands, each
/// with a unique id. Deterministic for a given `seed`.
pub fn mix(count: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = seed | 1;
    let mut next = move || {
        // xorshift64: good enough to vary sample data.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    (0..count)
        .map(|i| {
            let device = format!("dev-{}", next() % 20);
            let id = format!("sample-{seed}-{i}");
            // Mostly readings, as on a real edge: 75 % MEASUREMENT, 21 %
            // device and beacon events, 4 % commands.
            let (kind, message_type, data) = match next() % 100 {
                0..75 => (
                    Kind::Event,
                    "MEASUREMENT",
                    json!({"device_id": device, "sensor": "temperature", "value": (next() % 400) as f64 / 10.0, "unit": "C"}),
                ),
                75..80 => (Kind::Event, "DEVICE_UP", json!({"device_id": device, "ip": format!("10.0.0.{}", next() % 250)})),
                80..84 => (Kind::Event, "DEVICE_DOWN", json!({"device_id": device})),
                84..89 => (
                    Kind::Event,
                    "IBEACON_CHANGE",
                    json!({"mac_address": "0a:1b:2c:3d:4e:5f", "uuid": "f7826da6-4fa2-4e98-8024-bc5b71e0893e",
                           "major": next() % 100, "minor": next() % 100, "tx_power": -59, "rssi": -((next() % 90) as i64)}),
                ),
                89..93 => (Kind::Event, "IBEACON_READ", json!({"raw": "0201061aff4c00"})),
                93..96 => (Kind::Event, "HTTP_COAP_REQUEST", json!({"path": "/sensors", "method": "GET"})),
                96..98 => (
                    Kind::Command,
                    "SET_LED",
                    json!({"device_id": device, "state": if next() % 2 == 0 { "on" } else { "off" }}),
                ),
                _ => (
                    Kind::Command,
                    "SET_PUBLISH_PERIOD",
                    json!({"device_id": device, "period_ms": 1000 + next() % 9001}),
                ),
            };
            envelope(kind, message_type, data, Some(&id))
        })
        .collect()
}

/// Malformed and invalid bodies, each named: every one must be parked.
pub fn invalid_cases() -> Vec<(&'static str, Vec<u8>)> {
    let cases: Vec<(&'static str, Vec<u8>)> = vec![
        ("not json", b"not json".to_vec()),
        ("empty body", Vec::new()),
        ("json array", b"[1,2,3]".to_vec()),
        ("truncated json", br#"{"type":"DEVICE_UP","data":{"device_id":"d1"}"#.to_vec()),
        ("invalid utf-8", b"{\"type\":\"DEVICE_UP\",\"data\":\"\xff\xfe\"}".to_vec()),
        ("missing type", br#"{"data":{"device_id":"d1"}}"#.to_vec()),
        ("missing data", br#"{"type":"DEVICE_UP"}"#.to_vec()),
        ("lowercase type", br#"{"type":"device_up","data":{"device_id":"d1"}}"#.to_vec()),
        ("bad kind", br#"{"type":"DEVICE_UP","kind":"query","data":{"device_id":"d1"}}"#.to_vec()),
        ("bad time", br#"{"type":"DEVICE_UP","time":"yesterday","data":{"device_id":"d1"}}"#.to_vec()),
        ("unknown type", br#"{"type":"TELEPORT","data":{}}"#.to_vec()),
        ("event sent as command", br#"{"type":"DEVICE_UP","kind":"command","data":{"device_id":"d1"}}"#.to_vec()),
        ("bad device_id", br#"{"type":"DEVICE_DOWN","data":{"device_id":"has space"}}"#.to_vec()),
        ("measurement value as string", br#"{"type":"MEASUREMENT","data":{"device_id":"d1","sensor":"t","value":"hot"}}"#.to_vec()),
        ("led state", br#"{"type":"SET_LED","kind":"command","data":{"device_id":"d1","state":"blink"}}"#.to_vec()),
        ("period out of range", br#"{"type":"SET_PUBLISH_PERIOD","kind":"command","data":{"device_id":"d1","period_ms":50}}"#.to_vec()),
        ("beacon bad uuid", br#"{"type":"IBEACON_CHANGE","data":{"mac_address":"0a:1b:2c:3d:4e:5f","uuid":"x","major":1,"minor":1,"tx_power":-59,"rssi":-70}}"#.to_vec()),
        ("duplicate type field", br#"{"type":"DEVICE_UP","type":"DEVICE_DOWN","data":{"device_id":"d1"}}"#.to_vec()),
    ];
    cases
}
