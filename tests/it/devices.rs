//! Devices over MQTT, end to end (docs/devices.md): a real MQTT client
//! (rumqttc, speaking only MQTT) against RabbitMQ's MQTT plugin on
//! `MQTT_PORT` (1884 here, set up by `.ci/mqtt`), the worker and its
//! database. Device routes are shared through `amq.topic`, so every route
//! of a test sits under a topic prefix of its own (its queue's name); the
//! command topics are the shipped ones with device ids no other test uses.

use std::collections::BTreeSet;
use std::time::Duration;

use lapin::BasicProperties;
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS};
use serde_json::json;
use tokio::sync::mpsc;

use crate::common::messages::body;
use crate::common::{TestEnv, TopologyFile, wait_for};
use worker_iot_core::headers::{self, ERROR, ERROR_KIND};

const WORKER: &str = env!("CARGO_BIN_EXE_worker-iot-core");
const WAIT: Duration = Duration::from_secs(60);

/// `MQTT_<name>`, the variables `publish device` reads too
/// (docs/development.md, "What the tests need"), or `default`.
fn mqtt_setting(name: &str, default: &str) -> String {
    std::env::var(format!("MQTT_{name}")).unwrap_or_else(|_| default.to_owned())
}

fn mqtt_port() -> u16 {
    mqtt_setting("PORT", "1884")
        .parse()
        .expect("MQTT_PORT is a port number")
}

/// The firmware's routes, each under the prefix `{Q}/`.
const ROUTES: &str = r#"
[[routes]]
topic = "{Q}/up"
type = "DEVICE_UP"
device_id = { field = "device_id" }
data = { ip = { field = "ip", optional = true }, status = { field = "status", optional = true } }

[[routes]]
topic = "{Q}/down"
type = "DEVICE_DOWN"
device_id = { field = "device_id" }

[[routes]]
topic = "{Q}/+/pressure"
type = "MEASUREMENT"
device_id = { level = 2 }
data = { sensor = { value = "pressure" }, value = { field = "value" }, unit = { field = "measure", optional = true } }
"#;

fn topology() -> TopologyFile {
    TopologyFile::classic().extra(ROUTES)
}

/// An MQTT 3.1.1 client whose event loop runs in a task: what it receives
/// comes out of `received`. Dropping `stop` (or the whole thing) drops the
/// socket without DISCONNECT.
struct Mqtt {
    client: AsyncClient,
    received: mpsc::UnboundedReceiver<(String, String)>,
    task: tokio::task::JoinHandle<()>,
}

impl Mqtt {
    async fn connect(options: MqttOptions) -> Mqtt {
        let (client, events) = AsyncClient::new(options, 1000);
        let (tx, received) = mpsc::unbounded_channel();
        let (connected_tx, connected) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(pump(events, tx, connected_tx));
        tokio::time::timeout(WAIT, connected).await.expect("MQTT CONNACK").ok();
        Mqtt { client, received, task }
    }

    async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("queue an MQTT publish");
    }

    /// Drops the socket without DISCONNECT: the broker sends the will.
    fn crash(self) {
        self.task.abort();
    }

    /// Sends DISCONNECT and waits until the event loop has sent it.
    async fn disconnect(self) {
        self.client.disconnect().await.expect("queue DISCONNECT");
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("DISCONNECT sent")
            .ok();
    }

    async fn next(&mut self) -> (String, String) {
        tokio::time::timeout(WAIT, self.received.recv())
            .await
            .expect("an MQTT message in time")
            .expect("the client is running")
    }
}

async fn pump(
    mut events: EventLoop,
    tx: mpsc::UnboundedSender<(String, String)>,
    connected: tokio::sync::oneshot::Sender<()>,
) {
    let mut connected = Some(connected);
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if let Some(c) = connected.take() {
                    c.send(()).ok();
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                tx.send((p.topic.clone(), String::from_utf8_lossy(&p.payload).into_owned()))
                    .ok();
            }
            // No reconnecting in tests: a dropped connection ends the client.
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn options(client_id: &str) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, mqtt_setting("HOST", "127.0.0.1"), mqtt_port());
    options
        .set_credentials(mqtt_setting("USERNAME", "guest"), mqtt_setting("PASSWORD", "guest"))
        .set_keep_alive(Duration::from_secs(5))
        .set_inflight(200);
    options
}

/// Waits until the MQTT plugin has bound the subscriber's queue (SUBACK).
async fn subscribe(mqtt: &Mqtt, topic: &str) {
    mqtt.client.subscribe(topic, QoS::AtLeastOnce).await.expect("subscribe");
}

/// Ends a persistent session, so that the broker drops its queue.
async fn end_session(client_id: &str) {
    let mut clean = options(client_id);
    clean.set_clean_session(true);
    Mqtt::connect(clean).await.disconnect().await;
}

fn prefix(env: &TestEnv) -> &str {
    &env.queue
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_a_last_will_and_a_reading_land_as_online_offline_and_a_measurement() {
    let env = TestEnv::new(&topology()).await;
    let worker = env.spawn_worker(&[]);
    worker.wait_ready(&env).await;
    let p = prefix(&env).to_owned();
    let device = format!("lamp-{}", &env.queue["wic_test_".len()..]);
    let mut will_options = options(&device);
    will_options.set_last_will(LastWill::new(
        format!("{p}/down"),
        json!({"device_id": device}).to_string(),
        QoS::AtLeastOnce,
        false,
    ));
    let board = Mqtt::connect(will_options).await;
    board
        .publish(
            &format!("{p}/up"),
            json!({"device_id": device, "ip": "192.168.0.103", "status": "running"}).to_string(),
        )
        .await;
    board
        .publish(
            &format!("{p}/{device}/pressure"),
            r#"{"value": 55, "measure": "psi", "time": 12340074}"#,
        )
        .await;
    let status = |status: &'static str| {
        let (pool, device) = (env.pool.clone(), device.clone());
        async move {
            sqlx::query_as::<_, (String, Option<String>)>("SELECT status, ip FROM devices WHERE device_id = $1")
                .bind(device)
                .fetch_optional(&pool)
                .await
                .unwrap()
                .filter(|(s, _)| s == status)
        }
    };
    let (_, ip) = wait_for("the device online", WAIT, || status("online")).await;
    assert_eq!(ip.as_deref(), Some("192.168.0.103"));
    env.wait_for_rows("measurements", 1, WAIT).await;
    let row: (String, String, f64, Option<String>) =
        sqlx::query_as("SELECT device_id, sensor, value, unit FROM measurements")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(row, (device.clone(), "pressure".into(), 55.0, Some("psi".into())));

    board.crash();
    wait_for("the last will: offline", WAIT, || status("offline")).await;
    assert_eq!(env.count("events WHERE type = 'DEVICE_DOWN'").await, 1);
    assert_eq!(env.queue_len(&env.dlq()).await, 0);
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_led_reaches_the_lamp_on_its_firmware_topic_also_after_it_was_offline() {
    let env = TestEnv::new(&topology()).await;
    let worker = env.spawn_worker(&[]);
    worker.wait_ready(&env).await;
    let lamp = format!("lamp-{}", &env.queue["wic_test_".len()..]);
    let mut persistent = options(&lamp);
    persistent.set_clean_session(false);
    let mut subscriber = Mqtt::connect(persistent.clone()).await;
    subscribe(&subscriber, &format!("/led/{lamp}")).await;
    // The subscription is in place once a message to it arrives: send
    // commands until the first one comes back (QoS 1 queues keep the rest).
    let command = |id: &str, state: &str| {
        body(json!({"type": "SET_LED", "kind": "command", "id": id, "data": {"device_id": lamp, "state": state}}))
    };
    env.publish(&command("led-1", "on"), BasicProperties::default()).await;
    let (topic, payload) = subscriber.next().await;
    assert_eq!(
        (topic.as_str(), payload.as_str()),
        (format!("/led/{lamp}").as_str(), "on")
    );

    // Offline (a clean DISCONNECT keeps a persistent session): the command
    // waits in its session's queue and arrives on reconnect.
    subscriber.disconnect().await;
    env.publish(&command("led-2", "off"), BasicProperties::default()).await;
    wait_for("the command sent to the broker", WAIT, || async {
        (env.count("outbox WHERE published_at IS NOT NULL").await == 2).then_some(())
    })
    .await;
    let mut back = Mqtt::connect(persistent).await;
    let (topic, payload) = back.next().await;
    assert_eq!(
        (topic.as_str(), payload.as_str()),
        (format!("/led/{lamp}").as_str(), "off")
    );
    assert_eq!(
        env.count(&format!("outbox WHERE routing_key = '.led.{lamp}'")).await,
        2,
        "the shipped template: MQTT /led/<id>"
    );
    // End the persistent session, so the broker drops its queue.
    back.disconnect().await;
    end_session(&lamp).await;
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_that_does_not_fit_its_route_is_parked_with_its_topic_and_the_rest_flows() {
    let env = TestEnv::new(&topology()).await;
    let worker = env.spawn_worker(&[]);
    worker.wait_ready(&env).await;
    let p = prefix(&env).to_owned();
    let sensor = Mqtt::connect(options(&format!("sensor-{}", &env.queue["wic_test_".len()..]))).await;
    let topic = format!("{p}/s1/pressure");
    for i in 0..10 {
        sensor
            .publish(&topic, json!({"value": i, "measure": "psi"}).to_string())
            .await;
        if i == 3 {
            sensor.publish(&topic, r#"{"value": "high", "measure": "psi"}"#).await;
            sensor.publish(&topic, "not json").await;
        }
    }
    env.wait_for_rows("measurements", 10, WAIT).await;
    env.wait_for_queue_len(&env.dlq(), 2, WAIT).await;
    let parked = env.drain(&env.dlq()).await;
    let mut kinds = BTreeSet::new();
    for message in &parked {
        let table = message.delivery.properties.headers().as_ref();
        let error = headers::read_string(table, ERROR).unwrap();
        assert!(error.contains(&format!("MQTT topic \"{topic}\"")), "{error}");
        kinds.insert(headers::read_string(table, ERROR_KIND).unwrap());
        if error.contains("high") || error.contains("body field") {
            assert!(error.contains("body field `value`"), "{error}");
        }
        assert!(
            message.delivery.properties.message_id().is_some(),
            "the copy carries the raw message's id"
        );
    }
    assert_eq!(kinds, BTreeSet::from(["decode".to_owned(), "validation".to_owned()]));
    worker.stop().await;
    env.cleanup().await;
}

/// 10,000 raw readings from 100 devices, the worker killed -9 twice while
/// it applies them: none is lost. RabbitMQ 3.10 stamps no arrival, so each
/// reading gets a fresh id at first receipt and is applied at least once:
/// a reading committed but not yet acked when the worker dies is delivered
/// again with a new id and recorded twice. The test reports how many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_raw_readings_through_two_kill_9s_none_lost() {
    const DEVICES: usize = 100;
    const EACH: usize = 100;
    const N: i64 = (DEVICES * EACH) as i64;
    let env = TestEnv::new(&topology()).await;
    let p = prefix(&env).to_owned();
    let mut devices = Vec::with_capacity(DEVICES);
    for d in 0..DEVICES {
        devices.push(Mqtt::connect(options(&format!("{p}-d{d}"))).await);
    }
    for n in 0..EACH {
        for (d, device) in devices.iter().enumerate() {
            let value = (d * EACH + n) as i64;
            device
                .publish(
                    &format!("{p}/d{d}/pressure"),
                    json!({"value": value, "measure": "psi", "time": n}).to_string(),
                )
                .await;
        }
    }
    // QoS 1: every reading is in Q once the broker has taken it.
    env.wait_for_queue_len(&env.queue, N as u32, Duration::from_secs(120))
        .await;
    for device in devices {
        device.disconnect().await;
    }

    let settings = env.settings_json();
    let extra = [("RABBITMQ_PREFETCH_COUNT", "64")];
    for round in 0..2 {
        let mut worker = env.spawn_binary(WORKER, &settings, &extra, &format!("round-{round}"));
        let at = env.count("measurements").await + 1500;
        wait_for("progress before the kill", Duration::from_secs(120), || async {
            (env.count("measurements").await >= at).then_some(())
        })
        .await;
        worker.signal("KILL");
        assert!(!worker.wait_exit(Duration::from_secs(10)).await.success(), "killed");
    }
    let before_last = env.count("measurements").await;
    assert!(before_last < N, "the kills happened under load ({before_last} applied)");
    let mut worker = env.spawn_binary(WORKER, &settings, &extra, "final");
    let distinct = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(DISTINCT value) FROM measurements")
            .fetch_one(&env.pool)
            .await
            .unwrap()
    };
    wait_for("every reading applied", Duration::from_secs(180), || async {
        (distinct().await == N && env.queue_len(&env.queue).await == 0).then_some(())
    })
    .await;
    worker.signal("TERM");
    assert!(worker.wait_exit(Duration::from_secs(20)).await.success());
    let rows = env.count("measurements").await;
    assert_eq!(distinct().await, N, "no reading lost");
    assert_eq!(env.queue_len(&env.dlq()).await, 0);
    let duplicates = rows - N;
    eprintln!("raw readings: {N} sent, {rows} rows, {duplicates} duplicates after 2 kill -9 (prefetch 64)");
    assert!(
        duplicates <= 2 * 64 * 2,
        "duplicates bounded by what was in flight at the kills: {duplicates}"
    );
    env.cleanup().await;
}

/// `publish device` speaks MQTT as the firmware does: `up`, readings, and
/// with `--crash` its will; a command reaches it and it prints it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_simulator_is_online_reads_gets_its_command_and_its_will_takes_it_offline() {
    let env = TestEnv::new(&topology()).await;
    let worker = env.spawn_worker(&[]);
    worker.wait_ready(&env).await;
    let p = prefix(&env).to_owned();
    let id = format!("sim-{}", &env.queue["wic_test_".len()..]);
    let port = mqtt_port().to_string();
    let simulator = tokio::process::Command::new(env!("CARGO_BIN_EXE_publish"))
        .args([
            "device",
            &id,
            "--mqtt-port",
            &port,
            "--prefix",
            &p,
            "--period-ms",
            "200",
            "--readings",
            "15",
            "--crash",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("publish device");
    let online = format!("devices WHERE device_id = '{id}' AND status = 'online'");
    wait_for("the simulated device online", WAIT, || async {
        (env.count(&online).await == 1).then_some(())
    })
    .await;
    // It subscribed before it sent `up`, so its queue is bound by now. Its
    // topics are under the prefix: send its LED message there, as the
    // relay would.
    let channel = env.connection.create_channel().await.unwrap();
    let key = format!("{p}..led.{id}");
    channel
        .basic_publish(
            "amq.topic".into(),
            key.as_str().into(),
            Default::default(),
            b"on",
            BasicProperties::default(),
        )
        .await
        .expect("publish the LED message");
    let output = tokio::time::timeout(WAIT, simulator.wait_with_output())
        .await
        .expect("simulator ends")
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains(&format!("received {p}//led/{id}: on")), "{text}");
    assert!(text.contains("without DISCONNECT"), "{text}");
    let offline = format!("devices WHERE device_id = '{id}' AND status = 'offline'");
    wait_for("the will: offline", WAIT, || async {
        (env.count(&offline).await == 1).then_some(())
    })
    .await;
    assert_eq!(env.count(&format!("measurements WHERE device_id = '{id}'")).await, 15);
    end_session(&id).await;
    worker.stop().await;
    env.cleanup().await;
}
