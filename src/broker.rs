//! RabbitMQ: connections and the confirmed publisher.
//!
//! The worker never relies on lapin's automatic recovery (SPEC §10): on any
//! connection or channel error it drops the connection and builds a new one.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::LongString;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, PublisherConfirm};

/// How long a publish may wait for the broker's confirm.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// A publish that the broker did not take responsibility for. The message
/// it was copying must not be acked.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("publishing to '{routing_key}' failed: {source}")]
    Broker {
        routing_key: String,
        #[source]
        source: lapin::Error,
    },
    #[error("the broker nacked the message published to '{0}'")]
    Nacked(String),
    #[error("the broker returned the message published to '{0}': no queue is bound to it")]
    Unroutable(String),
    #[error("no confirm for the message published to '{0}' within {CONFIRM_TIMEOUT:?}")]
    Timeout(String),
}

/// The delays between attempts to reconnect (broker sessions, the outbox
/// relay): 100 ms doubling to 10 s, jittered, without end.
pub fn reconnect_backoff() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Heartbeat interval asked for when the URL names none: a silent network
/// partition from the broker is noticed within about two intervals, not
/// the operating system's TCP timeout.
pub const HEARTBEAT_SECONDS: u16 = 10;

/// Opens a connection named `name` (shown in the management UI), with
/// heartbeats every [`HEARTBEAT_SECONDS`] unless the URL sets `heartbeat`.
///
/// # Errors
/// The connection error.
pub async fn connect(url: &str, name: &str) -> Result<Connection, lapin::Error> {
    let properties = ConnectionProperties::default().with_connection_name(LongString::from(name));
    Connection::connect(&with_heartbeat(url), properties).await
}

/// `url` with `heartbeat=HEARTBEAT_SECONDS` added to its query, unless it
/// has one.
fn with_heartbeat(url: &str) -> String {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    if query.split('&').any(|pair| pair.starts_with("heartbeat=")) {
        return url.to_owned();
    }
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}heartbeat={HEARTBEAT_SECONDS}")
}

/// A channel in confirm mode. Every publish waits for the broker's confirm
/// and uses `mandatory`, so an unroutable message is an error, not a loss.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    /// Opens a confirm-mode channel on `connection`.
    ///
    /// # Errors
    /// The channel error.
    pub async fn open(connection: &Connection) -> Result<Publisher, lapin::Error> {
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Publisher { channel })
    }

    /// Publishes and waits for the confirm. `Ok` means the broker has the
    /// message in a queue; only then may the caller ack what it copies.
    ///
    /// # Errors
    /// A [`PublishError`]: broker error, nack, return or timeout.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        self.send(exchange, routing_key, body, properties).await?.wait().await
    }

    /// Sends a `mandatory` publish without waiting for its confirm, so a
    /// batch can be sent in order and its confirms awaited together.
    ///
    /// # Errors
    /// [`PublishError::Broker`] when the channel cannot take the message.
    pub async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<PendingConfirm, PublishError> {
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let confirm = self
            .channel
            .basic_publish(exchange.into(), routing_key.into(), options, body, properties)
            .await
            .map_err(|source| PublishError::Broker {
                routing_key: routing_key.to_owned(),
                source,
            })?;
        Ok(PendingConfirm {
            confirm,
            routing_key: routing_key.to_owned(),
        })
    }

    /// The underlying channel.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }
}

/// A message sent on a confirm-mode channel whose confirm is still due.
pub struct PendingConfirm {
    confirm: PublisherConfirm,
    routing_key: String,
}

impl PendingConfirm {
    /// Waits, at most [`CONFIRM_TIMEOUT`], for the broker's confirm.
    ///
    /// # Errors
    /// A [`PublishError`]: broker error, nack, return or timeout.
    pub async fn wait(self) -> Result<(), PublishError> {
        let routing_key = self.routing_key;
        match tokio::time::timeout(CONFIRM_TIMEOUT, self.confirm).await {
            Err(_) => Err(PublishError::Timeout(routing_key)),
            Ok(Err(source)) => Err(PublishError::Broker { routing_key, source }),
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(_)))) => Err(PublishError::Unroutable(routing_key)),
            // NotRequested cannot happen on a confirm-mode channel; treat it
            // as no confirm rather than as success.
            Ok(Ok(Confirmation::Nack(_) | Confirmation::NotRequested)) => Err(PublishError::Nacked(routing_key)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_are_asked_for_unless_the_url_sets_them() {
        assert_eq!(with_heartbeat("amqp://h/%2f"), "amqp://h/%2f?heartbeat=10");
        assert_eq!(
            with_heartbeat("amqp://h/%2f?frame_max=8192"),
            "amqp://h/%2f?frame_max=8192&heartbeat=10"
        );
        assert_eq!(with_heartbeat("amqp://h/%2f?heartbeat=30"), "amqp://h/%2f?heartbeat=30");
    }
}
