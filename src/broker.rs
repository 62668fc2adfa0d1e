//! RabbitMQ: connections and the confirmed publisher.
//!
//! The worker never relies on lapin's automatic recovery
//! (docs/reliability.md, "Broker connection"): on any connection or channel
//! error it drops the connection and builds a new one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::join_all;
use lapin::message::BasicReturnMessage;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::LongString;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Event, PublisherConfirm};
use tokio::sync::{Semaphore, SemaphorePermit, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

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

/// How long [`Reconnect::connect`] waits for a connection (each broker of
/// the list has its own [`CONNECT_TIMEOUT_PER_BROKER`]).
pub const RECONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The connections of a background task with a broker connection of its
/// own (the outbox relay, the parking keeper): one after another, to the
/// brokers of the list in turn, with a backoff between failures.
pub struct Reconnect<D> {
    urls: String,
    name: &'static str,
    next_broker: AtomicUsize,
    backoff: fn() -> D,
    delays: D,
}

impl<D: Iterator<Item = Duration>> Reconnect<D> {
    /// Connections named `name` to the brokers of `urls`, waiting out the
    /// delays of `backoff` between failures.
    pub fn new(urls: &str, name: &'static str, backoff: fn() -> D) -> Reconnect<D> {
        Reconnect {
            urls: urls.to_owned(),
            name,
            next_broker: AtomicUsize::new(0),
            backoff,
            delays: backoff(),
        }
    }

    /// The next connection (the backoff starts over), or why there is none
    /// within [`RECONNECT_TIMEOUT`]; `None` once `shutdown` is cancelled.
    pub async fn connect(&mut self, shutdown: &CancellationToken) -> Option<Result<Connection, String>> {
        let connect = connect_to_any(&self.urls, self.name, &self.next_broker);
        let connected = tokio::select! {
            () = shutdown.cancelled() => return None,
            connected = tokio::time::timeout(RECONNECT_TIMEOUT, connect) => connected,
        };
        Some(match connected {
            Ok(Ok((connection, _))) => {
                self.delays = (self.backoff)();
                Ok(connection)
            }
            Ok(Err(e)) => Err(format!("RabbitMQ: {e}")),
            Err(_) => Err(format!("RabbitMQ: no connection within {RECONNECT_TIMEOUT:?}")),
        })
    }

    /// Logs why the connection or its session ended and waits the next
    /// delay; `false` when `shutdown` came first.
    pub async fn pause(&mut self, error: &str, shutdown: &CancellationToken) -> bool {
        let delay = self.delays.next().unwrap_or(Duration::from_secs(10));
        tracing::warn!(error.message = %error, ?delay, "{}: broker session ended; reconnecting", self.name);
        tokio::select! {
            () = shutdown.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }
}

/// Closes `connection`, waiting at most a second.
pub async fn close(connection: Connection, reason: &str) {
    let close = connection.close(200, reason.into());
    tokio::time::timeout(Duration::from_secs(1), close).await.ok();
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

/// Confirm-mode channels a [`Publisher`] opens: how many groups of
/// messages it can have in flight at once.
pub const PUBLISH_CHANNELS: usize = 16;

/// One message to publish with [`Publisher::publish_all`].
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub body: &'a [u8],
    pub properties: BasicProperties,
}

/// Called when the broker blocks the publisher's connection (with the
/// broker's reason) and when it unblocks it (`None`).
pub type BlockedHook = Arc<dyn Fn(Option<&str>) + Send + Sync>;

/// Publishes with confirms and `mandatory`, so an unroutable message is an
/// error, not a loss (docs/reliability.md, "Returned messages").
///
/// The broker answers an unroutable message with a `basic.return` and
/// then a confirm, but lapin hands each return to whichever confirm of the
/// channel completes next, in no defined order. So every group of messages
/// ([`Publisher::publish_all`]; a single publish is a group of one) gets a
/// channel of its own for as long as its confirms are due: once they have
/// all arrived, every return the broker sent for the group has been handed
/// to one of them, and is matched back to its message by exchange, routing
/// key and message id. A channel whose confirms did not all arrive is
/// retired, so a late return can never be taken for another group's.
///
/// While the broker blocks the connection (a memory or disk alarm), the
/// confirm timeout does not run: a blocked publish waits for the alarm to
/// clear rather than fail into a redelivery and a second copy.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<PublisherInner>,
}

struct PublisherInner {
    /// For declares and inspection; never used to publish.
    channel: Channel,
    /// Idle confirm-mode channels; a permit of `ready` per idle channel.
    idle: Mutex<Vec<Channel>>,
    ready: Semaphore,
    /// Channels not retired yet; at 0 the publisher is closed.
    live: AtomicUsize,
    /// The broker's reason while it blocks the connection.
    blocked: watch::Receiver<Option<String>>,
    /// Stops the task that follows the connection's blocked state.
    _watch: DropGuard,
}

impl Publisher {
    /// Opens [`PUBLISH_CHANNELS`] confirm-mode channels on `connection`.
    ///
    /// # Errors
    /// The channel error.
    pub async fn open(connection: &Connection) -> Result<Publisher, lapin::Error> {
        Publisher::open_watched(connection, None).await
    }

    /// Like [`Publisher::open`], telling `on_blocked` when the broker blocks
    /// and unblocks the connection. Subscribe before the first publish: the
    /// broker says it once, when it happens.
    ///
    /// # Errors
    /// The channel error.
    pub async fn open_watched(
        connection: &Connection,
        on_blocked: Option<BlockedHook>,
    ) -> Result<Publisher, lapin::Error> {
        let (blocked, stop) = watch_blocked(connection, on_blocked);
        let channel = connection.create_channel().await?;
        let mut idle = Vec::with_capacity(PUBLISH_CHANNELS);
        for _ in 0..PUBLISH_CHANNELS {
            let confirming = connection.create_channel().await?;
            confirming.confirm_select(ConfirmSelectOptions::default()).await?;
            idle.push(confirming);
        }
        Ok(Publisher {
            inner: Arc::new(PublisherInner {
                channel,
                idle: Mutex::new(idle),
                ready: Semaphore::new(PUBLISH_CHANNELS),
                live: AtomicUsize::new(PUBLISH_CHANNELS),
                blocked,
                _watch: stop.drop_guard(),
            }),
        })
    }

    /// Publishes one message and waits for its confirm. `Ok` means the
    /// broker has it in a queue; only then may the caller ack what it
    /// copies.
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
        let message = Outgoing {
            exchange,
            routing_key,
            body,
            properties,
        };
        let mut results = self.publish_all(std::slice::from_ref(&message)).await;
        results
            .pop()
            .unwrap_or_else(|| Err(PublishError::Timeout(routing_key.to_owned())))
    }

    /// Publishes `messages` in order on one channel, then waits for all of
    /// their confirms: one result per message, in the same order.
    pub async fn publish_all(&self, messages: &[Outgoing<'_>]) -> Vec<Result<(), PublishError>> {
        let Some(mut lease) = self.checkout().await else {
            return messages.iter().map(|m| Err(closed(m.routing_key))).collect();
        };
        let channel = lease.channel.clone();
        let mut confirms = Vec::with_capacity(messages.len());
        for message in messages {
            let options = BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            };
            let sent = channel
                .basic_publish(
                    message.exchange.into(),
                    message.routing_key.into(),
                    options,
                    message.body,
                    message.properties.clone(),
                )
                .await;
            confirms.push(sent);
        }
        let waits = confirms.into_iter().map(|sent| async {
            match sent {
                Ok(confirm) => self.confirmed(confirm).await,
                Err(e) => (Awaited::Failed(e), None),
            }
        });
        let (awaited, returns): (Vec<Awaited>, Vec<Option<Returned>>) = join_all(waits).await.into_iter().unzip();
        // Every confirm arrived: the channel holds nothing of this group.
        // Otherwise (or when this future is dropped) the lease retires it.
        let all_in = awaited.iter().all(|a| matches!(a, Awaited::Acked | Awaited::Nacked));
        if all_in && channel.status().connected() {
            lease.give_back();
        }
        let returns: Vec<Returned> = returns.into_iter().flatten().collect();
        settle(messages, awaited, &returns)
    }

    /// The channel for declares and inspection (not for publishing).
    pub fn channel(&self) -> &Channel {
        &self.inner.channel
    }

    async fn checkout(&self) -> Option<Lease<'_>> {
        let permit = self.inner.ready.acquire().await.ok()?;
        let channel = self.idle().pop()?;
        Some(Lease {
            inner: &self.inner,
            channel,
            permit: Some(permit),
        })
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Channel>> {
        self.inner.idle()
    }

    /// Waits for one confirm, at most [`CONFIRM_TIMEOUT`] of time in which
    /// the connection is not blocked.
    async fn confirmed(&self, confirm: PublisherConfirm) -> (Awaited, Option<Returned>) {
        let mut blocked = self.inner.blocked.clone();
        // False once the blocked state can no longer change.
        let mut watching = true;
        tokio::pin!(confirm);
        loop {
            if watching && blocked.borrow_and_update().is_some() {
                tokio::select! {
                    result = &mut confirm => return answer(result),
                    unblocked = blocked.wait_for(Option::is_none) => watching = unblocked.is_ok(),
                }
            }
            tokio::select! {
                result = &mut confirm => return answer(result),
                () = tokio::time::sleep(CONFIRM_TIMEOUT) => return (Awaited::TimedOut, None),
                // Blocked or unblocked meanwhile: the timeout starts over.
                changed = blocked.changed(), if watching => watching = changed.is_ok(),
            }
        }
    }
}

impl PublisherInner {
    fn idle(&self) -> MutexGuard<'_, Vec<Channel>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A channel checked out of the publisher for one group. Given back when
/// every confirm of the group arrived; otherwise retired when dropped,
/// since a late return on it would be handed to another group.
struct Lease<'p> {
    inner: &'p PublisherInner,
    channel: Channel,
    /// Taken when the channel is given back.
    permit: Option<SemaphorePermit<'p>>,
}

impl Lease<'_> {
    fn give_back(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.inner.idle().push(self.channel.clone());
            drop(permit);
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else { return };
        permit.forget();
        if self.inner.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inner.ready.close();
        }
        let channel = self.channel.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let close = channel.close(200, "a confirm did not arrive".into());
                tokio::time::timeout(Duration::from_secs(1), close).await.ok();
            });
        }
    }
}

/// How the wait for one confirm ended.
#[derive(Debug)]
enum Awaited {
    Acked,
    Nacked,
    Failed(lapin::Error),
    TimedOut,
}

/// What a `basic.return` names of the message it returns.
#[derive(Debug, PartialEq)]
struct Returned {
    exchange: String,
    routing_key: String,
    message_id: Option<String>,
}

impl Returned {
    fn of(back: &BasicReturnMessage) -> Returned {
        let delivery = &back.delivery;
        Returned {
            exchange: delivery.exchange.to_string(),
            routing_key: delivery.routing_key.to_string(),
            message_id: delivery.properties.message_id().as_ref().map(ToString::to_string),
        }
    }

    fn names(&self, message: &Outgoing<'_>) -> bool {
        self.exchange == message.exchange
            && self.routing_key == message.routing_key
            && self.message_id.as_deref() == message.properties.message_id().as_ref().map(|id| id.as_str())
    }
}

/// A confirm's answer, and the return it carries (lapin hands each return
/// to some confirm of the channel, not necessarily its own message's).
fn answer(result: Result<Confirmation, lapin::Error>) -> (Awaited, Option<Returned>) {
    match result {
        Err(e) => (Awaited::Failed(e), None),
        Ok(Confirmation::Ack(back)) => (Awaited::Acked, back.as_ref().map(Returned::of)),
        Ok(Confirmation::Nack(back)) => (Awaited::Nacked, back.as_ref().map(Returned::of)),
        // Cannot happen on a confirm-mode channel: no confirm, not success.
        Ok(Confirmation::NotRequested) => (Awaited::Nacked, None),
    }
}

fn closed(routing_key: &str) -> PublishError {
    PublishError::Broker {
        routing_key: routing_key.to_owned(),
        source: lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Closed, "publisher closed").into(),
    }
}

/// Each message's result, once all confirms of its group are in: an acked
/// message is returned when a return names its exchange, routing key and
/// message id, whichever confirm carried it. A return that names none of
/// them (the broker sends back what it was given, so it cannot happen)
/// marks every message of the group returned: at worst sent again, never
/// taken for delivered.
fn settle(messages: &[Outgoing<'_>], awaited: Vec<Awaited>, returns: &[Returned]) -> Vec<Result<(), PublishError>> {
    let mut returned = vec![false; messages.len()];
    for back in returns {
        let mut matched = false;
        for (index, message) in messages.iter().enumerate() {
            if back.names(message) {
                returned[index] = true;
                matched = true;
            }
        }
        if !matched {
            tracing::warn!(routing_key = %back.routing_key, "a returned message matches no publish of its group");
            returned.iter_mut().for_each(|r| *r = true);
        }
    }
    messages
        .iter()
        .zip(awaited)
        .zip(returned)
        .map(|((message, awaited), returned)| {
            let routing_key = message.routing_key.to_owned();
            match awaited {
                Awaited::Acked if returned => Err(PublishError::Unroutable(routing_key)),
                Awaited::Acked => Ok(()),
                Awaited::Nacked => Err(PublishError::Nacked(routing_key)),
                Awaited::TimedOut => Err(PublishError::Timeout(routing_key)),
                Awaited::Failed(source) => Err(PublishError::Broker { routing_key, source }),
            }
        })
        .collect()
}

/// Follows `connection`'s blocked state: the broker's reason while it
/// blocks the connection, logged and told to `hook`. The task stops with
/// the token or the connection.
fn watch_blocked(
    connection: &Connection,
    hook: Option<BlockedHook>,
) -> (watch::Receiver<Option<String>>, CancellationToken) {
    let (sender, receiver) = watch::channel(None);
    let stop = CancellationToken::new();
    let mut events = connection.events_listener();
    let stopped = stop.clone();
    tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                () = stopped.cancelled() => break,
                event = events.next() => event,
            };
            let reason = match event {
                Some(Event::ConnectionBlocked(reason)) => Some(reason),
                Some(Event::ConnectionUnblocked) => None,
                Some(_) => continue,
                None => break,
            };
            match &reason {
                Some(reason) => tracing::warn!(%reason, "the broker blocks publishing (resource alarm): copies wait"),
                None => tracing::info!("the broker unblocked publishing"),
            }
            if let Some(hook) = &hook {
                hook(reason.as_deref());
            }
            sender.send_replace(reason);
        }
        // A connection that goes away is no longer blocked.
        if sender.borrow().is_some()
            && let Some(hook) = &hook
        {
            hook(None);
        }
    });
    (receiver, stop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(routing_key: &'static str, id: &str) -> Outgoing<'static> {
        Outgoing {
            exchange: "amq.topic",
            routing_key,
            body: b"on",
            properties: BasicProperties::default().with_message_id(id.into()),
        }
    }

    fn returned(routing_key: &str, id: &str) -> Returned {
        Returned {
            exchange: "amq.topic".into(),
            routing_key: routing_key.into(),
            message_id: Some(id.into()),
        }
    }

    fn outcomes(results: &[Result<(), PublishError>]) -> Vec<&'static str> {
        results
            .iter()
            .map(|r| match r {
                Ok(()) => "ok",
                Err(PublishError::Unroutable(_)) => "returned",
                Err(PublishError::Nacked(_)) => "nacked",
                Err(PublishError::Timeout(_)) => "timeout",
                Err(PublishError::Broker { .. }) => "broker",
            })
            .collect()
    }

    /// The case lapin gets wrong: the return of the second message came
    /// with the first message's confirm. Each message gets its own fate.
    #[test]
    fn a_return_counts_for_the_message_it_names_not_the_confirm_it_came_with() {
        let messages = [command("led.a", "c1"), command("led.b", "c2"), command("led.c", "c3")];
        let awaited = vec![Awaited::Acked, Awaited::Acked, Awaited::Acked];
        let results = settle(&messages, awaited, &[returned("led.b", "c2")]);
        assert_eq!(outcomes(&results), ["ok", "returned", "ok"]);
    }

    #[test]
    fn a_return_naming_no_message_of_the_group_returns_them_all() {
        let messages = [command("led.a", "c1"), command("led.b", "c2")];
        let awaited = vec![Awaited::Acked, Awaited::Acked];
        let results = settle(&messages, awaited, &[returned("led.x", "c9")]);
        assert_eq!(outcomes(&results), ["returned", "returned"]);
    }

    #[test]
    fn nacks_timeouts_and_errors_are_never_success() {
        let messages = [command("led.a", "c1"), command("led.b", "c2"), command("led.c", "c3")];
        let error = lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Error, "test").into();
        let awaited = vec![Awaited::Nacked, Awaited::TimedOut, Awaited::Failed(error)];
        let results = settle(&messages, awaited, &[]);
        assert_eq!(outcomes(&results), ["nacked", "timeout", "broker"]);
    }

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
