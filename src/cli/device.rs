//! `publish device ID`: a device simulator that speaks MQTT 3.1.1 exactly
//! as the platform's firmware does (docs/devices.md, "`publish device`: a simulated board"):
//!
//! * it connects with a persistent session (client id = device id,
//!   `clean_session = false`) and its last will on `down`;
//! * it publishes `up`, then a reading on `<id>/pressure` every period;
//! * it subscribes with QoS 1 to `/led/<id>` and `<id>/config`, reports
//!   what it receives, and follows `<id>/config` (its new period);
//! * it stops after `readings` readings (or when its caller stops it) with
//!   a DISCONNECT, or, with `crash`, by dropping the socket without one, so
//!   that the broker publishes the will.

use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// How a simulated device behaves.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    pub id: String,
    /// The MQTT listener: host and port.
    pub host: String,
    pub port: u16,
    pub username: String,
    pub password: String,
    /// The ip it announces in `up`.
    pub ip: String,
    /// Time between readings until `<id>/config` says otherwise.
    pub period: Duration,
    /// Stop after this many readings (`None`: when cancelled).
    pub readings: Option<u64>,
    /// Drop the socket without DISCONNECT at the end.
    pub crash: bool,
    /// Put before every topic, with a `/` (tests keep their topics apart);
    /// empty for the firmware's own topics.
    pub prefix: String,
}

/// What the device saw, for its caller to print or check.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    Connected { session_present: bool },
    Published { topic: String, payload: String },
    Received { topic: String, payload: String },
    PeriodChanged(Duration),
    Stopped { crashed: bool },
}

/// Why the device stopped early.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("MQTT connection to {0}: {1}")]
    Connection(String, #[source] rumqttc::ConnectionError),
    #[error("MQTT client: {0}")]
    Client(#[from] rumqttc::ClientError),
}

impl DeviceOptions {
    /// A topic of the firmware's, under the prefix.
    pub fn topic(&self, topic: &str) -> String {
        match self.prefix.as_str() {
            "" => topic.to_owned(),
            prefix => format!("{prefix}/{topic}"),
        }
    }

    /// The MQTT options: persistent session, last will on `down`.
    pub fn mqtt(&self) -> MqttOptions {
        let mut options = MqttOptions::new(&self.id, &self.host, self.port);
        options
            .set_credentials(&self.username, &self.password)
            .set_clean_session(false)
            .set_keep_alive(Duration::from_secs(5))
            .set_last_will(LastWill::new(
                self.topic("down"),
                json!({ "device_id": self.id }).to_string(),
                QoS::AtLeastOnce,
                false,
            ));
        options
    }
}

/// Runs one simulated device until its readings are sent or `stop` is
/// cancelled, telling `see` what happens.
///
/// # Errors
/// A [`DeviceError`] when the connection fails.
pub async fn run(
    options: &DeviceOptions,
    stop: CancellationToken,
    mut see: impl FnMut(Seen),
) -> Result<(), DeviceError> {
    let (client, mut events) = AsyncClient::new(options.mqtt(), 64);
    let led = options.topic(&format!("/led/{}", options.id));
    let config = options.topic(&format!("{}/config", options.id));
    client.subscribe(&led, QoS::AtLeastOnce).await?;
    client.subscribe(&config, QoS::AtLeastOnce).await?;
    let up = json!({"device_id": options.id, "ip": options.ip, "status": "running"}).to_string();
    publish(&client, options.topic("up"), up, &mut see).await?;
    // Publishes not yet acknowledged (PUBACK), so none is cut off at the end.
    let mut unacked = 1u64;

    let booted = Instant::now();
    let mut period = options.period;
    let mut sent = 0u64;
    let mut next = tokio::time::Instant::now() + period;
    while options.readings.is_none_or(|n| sent < n) {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep_until(next) => {
                let reading = json!({"value": 50 + sent % 10, "measure": "psi", "time": booted.elapsed().as_millis() as u64});
                publish(&client, options.topic(&format!("{}/pressure", options.id)), reading.to_string(), &mut see).await?;
                sent += 1;
                unacked += 1;
                next += period;
            }
            event = events.poll() => {
                let event = event.map_err(|e| DeviceError::Connection(format!("{}:{}", options.host, options.port), e))?;
                unacked -= u64::from(is_puback(&event)).min(unacked);
                if let Some(new) = handle(&event, &config, &mut see) {
                    period = new;
                    next = tokio::time::Instant::now() + period;
                    see(Seen::PeriodChanged(period));
                }
            }
        }
    }
    finish(options, &client, (events, unacked), &mut see).await
}

fn is_puback(event: &Event) -> bool {
    matches!(event, Event::Incoming(Packet::PubAck(_)))
}

/// Ends the session: waits until every publish is acknowledged, then
/// disconnects, or with `crash` drops the socket (the broker sends the will).
async fn finish(
    options: &DeviceOptions,
    client: &AsyncClient,
    (mut events, mut unacked): (EventLoop, u64),
    see: &mut impl FnMut(Seen),
) -> Result<(), DeviceError> {
    let place = format!("{}:{}", options.host, options.port);
    while unacked > 0 {
        let event = events
            .poll()
            .await
            .map_err(|e| DeviceError::Connection(place.clone(), e))?;
        unacked -= u64::from(is_puback(&event)).min(unacked);
        handle(&event, "", see);
    }
    if options.crash {
        drop(events);
        see(Seen::Stopped { crashed: true });
        return Ok(());
    }
    client.disconnect().await?;
    loop {
        match events.poll().await {
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    see(Seen::Stopped { crashed: false });
    Ok(())
}

async fn publish(
    client: &AsyncClient,
    topic: String,
    payload: String,
    see: &mut impl FnMut(Seen),
) -> Result<(), DeviceError> {
    client.publish(&topic, QoS::AtLeastOnce, false, payload.clone()).await?;
    see(Seen::Published { topic, payload });
    Ok(())
}

/// Tells `see` about a connection or a message; a period on `config`
/// (1000 to 10000 ms, as the firmware takes it) is returned.
fn handle(event: &Event, config: &str, see: &mut impl FnMut(Seen)) -> Option<Duration> {
    match event {
        Event::Incoming(Packet::ConnAck(ack)) => {
            see(Seen::Connected {
                session_present: ack.session_present,
            });
            None
        }
        Event::Incoming(Packet::Publish(publish)) => {
            let payload = String::from_utf8_lossy(&publish.payload).into_owned();
            see(Seen::Received {
                topic: publish.topic.clone(),
                payload: payload.clone(),
            });
            let period = payload
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|ms| (1000..=10_000).contains(ms));
            (publish.topic == config)
                .then_some(period)
                .flatten()
                .map(Duration::from_millis)
        }
        _ => None,
    }
}

/// One line of output for what the device saw.
pub fn describe(seen: &Seen) -> String {
    match seen {
        Seen::Connected { session_present } => format!("connected (session present: {session_present})"),
        Seen::Published { topic, payload } => format!("sent {topic}: {payload}"),
        Seen::Received { topic, payload } => format!("received {topic}: {payload}"),
        Seen::PeriodChanged(period) => format!("period now {} ms", period.as_millis()),
        Seen::Stopped { crashed: true } => {
            "dropped the connection without DISCONNECT: the broker sends the will on down".into()
        }
        Seen::Stopped { crashed: false } => "disconnected".into(),
    }
}

#[cfg(test)]
mod tests {
    use rumqttc::Publish;

    use super::*;

    #[test]
    fn topics_take_the_prefix() {
        let mut options = DeviceOptions {
            id: "lamp-1".into(),
            host: "127.0.0.1".into(),
            port: 1883,
            username: "guest".into(),
            password: "guest".into(),
            ip: "10.0.0.2".into(),
            period: Duration::from_secs(1),
            readings: None,
            crash: false,
            prefix: String::new(),
        };
        assert_eq!(options.topic("/led/lamp-1"), "/led/lamp-1");
        options.prefix = "t1".into();
        assert_eq!(options.topic("/led/lamp-1"), "t1//led/lamp-1");
        assert_eq!(options.topic("up"), "t1/up");
        assert!(!options.mqtt().clean_session());
    }

    #[test]
    fn follows_a_period_on_its_config_topic_only() {
        let mut seen = Vec::new();
        let on = |topic: &str, payload: &str| {
            Event::Incoming(Packet::Publish(Publish::new(
                topic,
                QoS::AtLeastOnce,
                payload.to_owned(),
            )))
        };
        assert_eq!(
            handle(&on("d/config", "2500"), "d/config", &mut |s| seen.push(s)),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(handle(&on("d/config", "999"), "d/config", &mut |s| seen.push(s)), None);
        assert_eq!(handle(&on("/led/d", "2500"), "d/config", &mut |s| seen.push(s)), None);
        assert_eq!(seen.len(), 3, "every message received is reported");
    }
}
