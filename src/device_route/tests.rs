//! The device route decoder without a broker: the shipped routes, the
//! refusals, identity, and properties over any topic and body.

use chrono::TimeZone;
use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::topology::Topology;

/// The shipped topology file's routes and command topics.
fn shipped() -> Topology {
    let text = include_str!("../../topology/topology.toml");
    Topology::parse(text, "q").unwrap()
}

fn identity() -> Identity {
    Identity {
        id: "raw-1".into(),
        id_source: IdSource::Minted,
        time: Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap(),
    }
}

/// The message a raw body on `routing_key` decodes to under the shipped routes.
fn decode(routing_key: &str, body: &str) -> Result<Message, DeviceError> {
    let topology = shipped();
    let (index, topic) = topology
        .routes
        .find(MQTT_EXCHANGE, routing_key)
        .expect("a route matches");
    let route = topology.routes.get(index).unwrap();
    route.decode(&topic, body.as_bytes(), &identity(), 262_144)
}

fn routes(toml: &str) -> Result<Routes, String> {
    #[derive(Deserialize)]
    struct File {
        routes: Vec<RouteFile>,
    }
    let file: File = toml::from_str(toml).map_err(|e| e.to_string())?;
    Routes::parse(file.routes)
}

#[test]
fn the_shipped_routes_map_the_firmware_topics() {
    let up = decode(
        "up",
        r#"{"device_id":"lamp-1","ip":"192.168.0.103","status":"running"}"#,
    )
    .unwrap();
    assert_eq!(up.message_type, "DEVICE_UP");
    assert_eq!(up.kind, Kind::Event);
    assert_eq!(
        up.data,
        json!({"device_id":"lamp-1","ip":"192.168.0.103","status":"running"})
    );
    assert_eq!((up.id.as_str(), up.time), ("raw-1", identity().time));

    let down = decode("down", r#"{"device_id":"lamp-1"}"#).unwrap();
    assert_eq!(
        (down.message_type.as_str(), &down.data),
        ("DEVICE_DOWN", &json!({"device_id":"lamp-1"}))
    );
    assert_eq!(decode(".up", r#"{"device_id":"l"}"#).unwrap().message_type, "DEVICE_UP");
    assert_eq!(
        decode(".down", r#"{"device_id":"l"}"#).unwrap().message_type,
        "DEVICE_DOWN"
    );

    // The reading's `time` is milliseconds since boot: never the message time.
    let reading = decode("p-1.pressure", r#"{"value": 55, "measure": "psi", "time": 12340074}"#).unwrap();
    assert_eq!(reading.message_type, "MEASUREMENT");
    assert_eq!(
        reading.data,
        json!({"device_id":"p-1","sensor":"pressure","value":55,"unit":"psi"})
    );
    assert_eq!(reading.time, identity().time);
}

#[test]
fn the_shipped_routes_are_bound_and_commands_go_to_the_firmware_topics() {
    let topology = shipped();
    let keys: Vec<&str> = topology
        .bindings
        .iter()
        .filter(|b| b.exchange == MQTT_EXCHANGE)
        .map(|b| b.routing_key.as_str())
        .collect();
    for key in ["up", "down", ".up", ".down", "*.pressure"] {
        assert!(keys.contains(&key), "{key} in {keys:?}");
    }
    assert_eq!(
        topology.commands.routing_key("SET_LED", "lamp-1").unwrap(),
        ".led.lamp-1"
    );
    assert_eq!(
        topology.commands.routing_key("SET_PUBLISH_PERIOD", "p-1").unwrap(),
        "p-1.config"
    );
    assert_eq!(topology.commands, CommandTopics::default());
}

#[test]
fn only_deliveries_from_amq_topic_on_a_route_match() {
    let topology = shipped();
    assert!(topology.routes.find("", "up").is_none());
    assert!(topology.routes.find("other", "up").is_none());
    assert!(topology.routes.find(MQTT_EXCHANGE, "iot.up").is_none());
    assert!(topology.routes.find(MQTT_EXCHANGE, "a.b.pressure").is_none());
    assert!(topology.routes.find(MQTT_EXCHANGE, "led.lamp-1").is_none());
    assert_eq!(
        topology.routes.find(MQTT_EXCHANGE, "a.pressure").map(|(_, t)| t),
        Some("a/pressure".into())
    );
}

#[test]
fn a_payload_that_does_not_fit_names_the_topic_and_the_field() {
    let error = decode("p-1.pressure", r#"{"measure": "psi"}"#).unwrap_err();
    assert!(!error.undecodable);
    let text = error.to_string();
    assert!(
        text.contains("\"p-1/pressure\"") && text.contains("body field `value` is required"),
        "{text}"
    );

    let error = decode("up", "not json").unwrap_err();
    assert!(error.undecodable);
    assert!(error.to_string().contains("MQTT topic \"up\""), "{error}");
    assert!(decode("up", "[1]").unwrap_err().undecodable);
    let no_id = decode("up", r#"{"ip":"1.2.3.4"}"#).unwrap_err();
    assert!(
        no_id.to_string().contains("body field `device_id` is required"),
        "{no_id}"
    );
    let number_id = decode("down", r#"{"device_id": 7}"#).unwrap_err();
    assert!(number_id.to_string().contains("must be a string"), "{number_id}");
}

#[test]
fn a_handlers_refusal_is_said_of_the_body_field_it_came_from() {
    let topology = shipped();
    let route = topology.routes.get(4).unwrap();
    let error = route.explain("p-1/pressure", "unit", "must be 1 to 32 characters, found 40");
    assert_eq!(
        error.to_string(),
        "device message on MQTT topic \"p-1/pressure\" (route \"+/pressure\" → MEASUREMENT): \
         body field `measure` must be 1 to 32 characters, found 40"
    );
    let level = route.explain("a b/pressure", "device_id", "must match …");
    assert!(level.to_string().contains("topic level 1 must match"), "{level}");
}

#[test]
fn refuses_bad_routes() {
    let route = |extra: &str| routes(&format!("[[routes]]\ntopic = \"+/t\"\ntype = \"MEASUREMENT\"\n{extra}"));
    assert!(route("device_id = { level = 1 }").is_ok());
    for (bad, says) in [
        ("device_id = { level = 3 }", "level 3"),
        ("device_id = { level = 0 }", "level 0"),
        ("device_id = { value = \"x\" }", "topic level or a body field"),
        ("device_id = { level = 1, field = \"a\" }", "exactly one"),
        ("device_id = { level = 1, optional = true }", "optional"),
        (
            "device_id = { level = 1 }\ndata = { device_id = { value = 1 } }",
            "device_id",
        ),
        ("device_id = { level = 1 }\ndata = { x = { nope = 1 } }", "data.x"),
    ] {
        let error = route(bad).unwrap_err();
        assert!(error.contains(says) && error.contains("\"+/t\""), "{bad}: {error}");
    }
    for topic in ["a/#/b", "a+", "a.b", "a/*", "$SYS/x", ""] {
        let toml = format!("[[routes]]\ntopic = {topic:?}\ntype = \"A\"\ndevice_id = {{ field = \"d\" }}");
        assert!(routes(&toml).is_err(), "{topic}");
    }
    let twice = "[[routes]]\ntopic = \"up\"\ntype = \"A\"\ndevice_id = { field = \"d\" }\n";
    assert!(routes(&twice.repeat(2)).unwrap_err().contains("twice"));
    assert!(routes("[[routes]]\ntopic = \"up\"\ntype = \"bad\"\ndevice_id = { field = \"d\" }").is_err());
}

#[test]
fn refuses_bad_command_templates() {
    let parse = |t: &str, k: &str| CommandTopics::parse([(t.to_owned(), k.to_owned())].into());
    assert!(parse("SET_LED", "led.{device_id}").is_ok());
    assert!(parse("SET_LED", "led").is_err());
    assert!(parse("SET_LED", "{device_id}.{device_id}").is_err());
    assert!(parse("SET_LED", "led.*.{device_id}").is_err());
    assert!(parse("set_led", "{device_id}").is_err());
    let unknown = CommandTopics::default().routing_key("REBOOT", "d1").unwrap_err();
    assert!(unknown.contains("REBOOT"), "{unknown}");
}

#[test]
fn identity_prefers_the_message_id_then_the_stamp_then_a_fresh_id() {
    let now = Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap();
    let earlier = Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).unwrap();
    let receipt = Receipt {
        routing_key: "up",
        body: b"{}",
        stamp_ms: None,
        message_id: None,
        first_received: None,
    };
    let minted = identify(&receipt, now, || "fresh".into());
    assert_eq!(
        (minted.id.as_str(), minted.id_source, minted.time),
        ("fresh", IdSource::Minted, now)
    );

    let copy = Receipt {
        message_id: Some("fresh"),
        first_received: Some(earlier),
        ..receipt
    };
    let carried = identify(&copy, now, || unreachable!());
    assert_eq!((carried.id.as_str(), carried.time), ("fresh", earlier));

    let stamped = Receipt {
        stamp_ms: Some(1_767_225_600_123),
        ..receipt
    };
    let first = identify(&stamped, now, || unreachable!());
    assert_eq!(first.id_source, IdSource::ArrivalStamp);
    assert_eq!(first.time.timestamp_millis(), 1_767_225_600_123);
    assert_eq!(
        identify(&stamped, earlier, || unreachable!()),
        first,
        "a redelivery is the same message"
    );
    let later = Receipt {
        stamp_ms: Some(1_767_225_600_124),
        ..stamped
    };
    assert_ne!(
        identify(&later, now, || unreachable!()).id,
        first.id,
        "a second `up` is another message"
    );
}

#[test]
fn fresh_ids_differ() {
    let ids: std::collections::BTreeSet<String> = (0..1000).map(|_| fresh_id()).collect();
    assert_eq!(ids.len(), 1000);
    assert!(ids.iter().all(|id| id.len() == 36 && id.starts_with("raw-")));
}

proptest! {
    /// Any body on any topic a route matches decodes or fails with an error
    /// that names that topic; never a panic.
    #[test]
    fn any_body_decodes_or_names_the_topic(
        device in "[A-Za-z0-9_:-]{1,12}",
        body in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let routing_key = format!("{device}.pressure");
        match decode(&routing_key, &String::from_utf8_lossy(&body)) {
            Ok(message) => prop_assert_eq!(&message.data["device_id"], &json!(device)),
            Err(e) => prop_assert!(e.to_string().contains(&format!("\"{device}/pressure\"")), "{}", e),
        }
    }

    /// A reading's fields land in `data` as the route says, whatever else
    /// the body holds.
    #[test]
    fn readings_map_value_and_measure(
        device in "[A-Za-z0-9_:-]{1,12}",
        value in any::<i32>(),
        measure in proptest::option::of("[a-z]{1,8}"),
        extra in "[a-z]{1,8}",
    ) {
        let mut body = json!({"value": value, "time": 1, extra.clone(): true});
        if let Some(m) = &measure {
            body["measure"] = json!(m);
        }
        let message = decode(&format!("{device}.pressure"), &body.to_string()).unwrap();
        prop_assert_eq!(&message.data["value"], &json!(value));
        prop_assert_eq!(message.data.get("unit").cloned(), measure.map(|m| json!(m)));
        prop_assert_eq!(&message.data["sensor"], &json!("pressure"));
    }

    /// The routing-key form of a filter binds exactly the topics the filter
    /// matches, under the MQTT plugin's mapping (checked with an AMQP
    /// topic matcher written here).
    #[test]
    fn the_binding_matches_what_the_filter_matches(
        filter in proptest::collection::vec(prop_oneof!["[a-c]{1,2}", Just("+".to_owned()), Just(String::new())], 1..4),
        hash in any::<bool>(),
        topic in proptest::collection::vec(prop_oneof!["[a-c]{1,2}", Just(String::new())], 1..5),
    ) {
        let mut filter = filter.join("/");
        if hash {
            filter.push_str("/#");
        }
        let Ok(routes) = routes(&format!("[[routes]]\ntopic = {filter:?}\ntype = \"A\"\ndevice_id = {{ field = \"d\" }}")) else {
            return Ok(());
        };
        let route = routes.get(0).unwrap();
        let topic = topic.join("/");
        let routing_key = topic.replace('/', ".");
        prop_assert_eq!(mqtt_topic(&routing_key), topic.clone());
        prop_assert_eq!(route.matches(&topic), amqp_topic_matches(&route.routing_key(), &routing_key), "{} {}", filter, topic);
    }

    /// The arrival hash tells apart any two different receipts.
    #[test]
    fn the_arrival_hash_is_injective_in_practice(
        a in ("[a-z.]{0,6}", proptest::collection::vec(any::<u8>(), 0..8), any::<i64>()),
        b in ("[a-z.]{0,6}", proptest::collection::vec(any::<u8>(), 0..8), any::<i64>()),
    ) {
        prop_assert_eq!(arrival_hash(&a.0, &a.1, a.2) == arrival_hash(&b.0, &b.1, b.2), a == b);
    }
}

/// RabbitMQ's topic matching: `*` is one word, `#` zero or more.
fn amqp_topic_matches(binding: &str, key: &str) -> bool {
    fn go(b: &[&str], k: &[&str]) -> bool {
        match (b.first(), k.first()) {
            (None, None) => true,
            (Some(&"#"), _) => go(&b[1..], k) || (!k.is_empty() && go(b, &k[1..])),
            (Some(&"*"), Some(_)) => go(&b[1..], &k[1..]),
            (Some(w), Some(x)) if w == x => go(&b[1..], &k[1..]),
            _ => false,
        }
    }
    let b: Vec<&str> = binding.split('.').collect();
    let k: Vec<&str> = key.split('.').collect();
    go(&b, &k)
}

/// MQTT 3.1.1's own examples (4.7), and a topic with multi-byte
/// characters, on which rumqttc's matcher panicked (found by the fuzz
/// target `decode_device_route`).
#[test]
fn filters_match_as_mqtt_says_and_any_topic_is_safe() {
    let matches = |filter: &str, topic: &str| {
        let routes = routes(&format!(
            "[[routes]]\ntopic = {filter:?}\ntype = \"A\"\ndevice_id = {{ field = \"d\" }}"
        ))
        .expect("a valid route");
        routes.get(0).expect("the route").matches(topic)
    };
    assert!(matches("sport/tennis/#", "sport/tennis"));
    assert!(matches("sport/tennis/#", "sport/tennis/player1/ranking"));
    assert!(matches("sport/+", "sport/"));
    assert!(!matches("sport/+", "sport"));
    assert!(!matches("sport/+", "sport/tennis/player1"));
    assert!(matches("+/+", "/finance"));
    assert!(matches("+/pressure", "lamp-1/pressure"));
    assert!(!matches("+/pressure", "lamp-1/pressure/x"));
    assert!(!matches("#", "$SYS/broker"));
    assert!(!matches("+/pressure", "ü/x"));
    assert!(matches("+/pressure", "ü€/pressure"));
    assert!(!matches("up", "\u{fffd}\u{fffd}\u{fffd}f"));
}
