//! RabbitMQ: connections and the confirmed publisher.
//!
//! The worker never relies on lapin's automatic recovery (SPEC §10): on any
//! connection or channel error it drops the connection and builds a new one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
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

/// The code and text of a channel-level error the broker sent (a missing
/// queue, a conflicting declaration, …), when `error` is one.
pub fn soft_error(error: &lapin::Error) -> Option<(&AMQPSoftError, &str)> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(code) => Some((code, amqp.get_message().as_str())),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// Heartbeat interval asked for when the URL names none: a silent network
/// partition from the broker is noticed within about two intervals, not
/// the operating system's TCP timeout.
pub const HEARTBEAT_SECONDS: u16 = 10;

/// How long one broker of the list may take to accept a connection.
pub const CONNECT_TIMEOUT_PER_BROKER: Duration = Duration::from_secs(5);

/// Opens a connection named `name` (shown in the management UI) to one of
/// the brokers in `urls` (see [`connect_to_any`]).
///
/// # Errors
/// The last broker's connection error.
pub async fn connect(urls: &str, name: &str) -> Result<Connection, lapin::Error> {
    connect_to_any(urls, name, &AtomicUsize::new(0))
        .await
        .map(|(connection, _)| connection)
}

/// Opens a connection to the first broker of `urls` (comma-separated
/// `amqp://` URLs of one cluster) that accepts it within
/// [`CONNECT_TIMEOUT_PER_BROKER`], trying them in turn from index `next`,
/// which it advances past every broker it tries: a caller that keeps `next`
/// across reconnects goes to another node first.
/// Heartbeats every [`HEARTBEAT_SECONDS`] unless a URL sets `heartbeat`.
/// Returns the connection and the broker's `host:port`.
///
/// # Errors
/// The last broker's connection error.
pub async fn connect_to_any(urls: &str, name: &str, next: &AtomicUsize) -> Result<(Connection, String), lapin::Error> {
    let list: Vec<&str> = urls.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
    let properties = ConnectionProperties::default().with_connection_name(LongString::from(name));
    let unreachable = |what: String| {
        lapin::Error::from(lapin::ErrorKind::IOError(std::sync::Arc::new(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            what,
        ))))
    };
    let mut last_error = unreachable("AMQP_URL names no broker".into());
    for _ in 0..list.len().max(1) {
        let index = next.fetch_add(1, Ordering::Relaxed) % list.len().max(1);
        let Some(url) = list.get(index) else { break };
        let url_with_heartbeat = with_heartbeat(url);
        let attempt = Connection::connect(&url_with_heartbeat, properties.clone());
        match tokio::time::timeout(CONNECT_TIMEOUT_PER_BROKER, attempt).await {
            Ok(Ok(connection)) => return Ok((connection, broker_address(url))),
            Ok(Err(e)) => {
                tracing::debug!(broker = %broker_address(url), error.message = %e, "broker refused; trying the next");
                last_error = e;
            }
            Err(_) => {
                let what = format!(
                    "no answer from {} within {CONNECT_TIMEOUT_PER_BROKER:?}",
                    broker_address(url)
                );
                tracing::debug!(error.message = %what, "trying the next broker");
                last_error = unreachable(what);
            }
        }
    }
    Err(last_error)
}

/// `host:port` of an AMQP URL, for logs (never the credentials).
pub fn broker_address(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    authority.rsplit('@').next().unwrap_or(authority).to_owned()
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
    fn broker_addresses_hide_credentials() {
        assert_eq!(broker_address("amqp://u:p@node-1:5681/%2f"), "node-1:5681");
        assert_eq!(broker_address("amqps://node-2?heartbeat=5"), "node-2");
    }

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
