//! What the pipeline knows of a delivery before decoding it: when it was
//! first received and, when it arrived on a device route's MQTT topic, the
//! route and the id and time it was given then (docs/devices.md,
//! "Guarantees"). Decided once per attempt, from the delivery and what its
//! earlier copies carry, so every attempt of one message agrees.

use chrono::{DateTime, Utc};
use lapin::message::Delivery;

use crate::device_route::{self, ARRIVAL_STAMP, DeviceRoute, Identity, Receipt, Routes};
use crate::failure::Failure;
use crate::headers;

/// When a delivery was first received, and whether it is a raw device
/// message.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// The message time of an envelope without `time`, and the
    /// `iot-first-received-at` its copies carry.
    pub received: DateTime<Utc>,
    pub raw: Option<Raw>,
}

/// A raw device message: which route decodes it, from which MQTT topic,
/// and its identity.
#[derive(Debug, Clone)]
pub struct Raw {
    route: usize,
    pub topic: String,
    pub identity: Identity,
}

impl Arrival {
    /// The arrival of `delivery`, matched against `routes` by where it
    /// first arrived: its own exchange and routing key, or those a copy
    /// keeps in `iot-original-exchange` and `iot-original-routing-key`.
    pub fn of(delivery: &Delivery, routes: &Routes, now: DateTime<Utc>) -> Arrival {
        let first_received = headers::first_received(&delivery.properties);
        let table = delivery.properties.headers().as_ref();
        let original = match routes.is_empty() {
            true => None,
            false => headers::read_string(table, headers::ORIGINAL_EXCHANGE)
                .zip(headers::read_string(table, headers::ORIGINAL_ROUTING_KEY)),
        };
        let (exchange, routing_key) = match &original {
            Some((exchange, routing_key)) => (exchange.as_str(), routing_key.as_str()),
            None => (delivery.exchange.as_str(), delivery.routing_key.as_str()),
        };
        let Some((route, topic)) = routes.find(exchange, routing_key) else {
            return Arrival {
                received: first_received.unwrap_or(now),
                raw: None,
            };
        };
        let receipt = Receipt {
            routing_key,
            body: &delivery.data,
            stamp_ms: headers::read_i64(table, ARRIVAL_STAMP),
            message_id: delivery.properties.message_id().as_ref().map(|id| id.as_str()),
            first_received,
        };
        let identity = device_route::identify(&receipt, now, device_route::fresh_id);
        Arrival {
            received: identity.time,
            raw: Some(Raw { route, topic, identity }),
        }
    }

    /// The id a copy must carry as its `message_id`: a raw message's.
    pub fn message_id(&self) -> Option<&str> {
        self.raw.as_ref().map(|raw| raw.identity.id.as_str())
    }
}

impl Raw {
    /// The route that matched.
    ///
    /// # Errors
    /// Never in practice: the index came from the same routes.
    pub fn route<'r>(&self, routes: &'r Routes) -> Result<&'r DeviceRoute, Failure> {
        routes
            .get(self.route)
            .ok_or_else(|| Failure::Panic(format!("device route {} is gone", self.route)))
    }
}
