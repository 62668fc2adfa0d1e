//! The broker layout (docs/configuration.md, "The topology file"): read
//! from `topology/topology.toml`, checked for lossy or contradictory setups,
//! and declared idempotently at start-up.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::AMQPSoftError;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};
use serde::Deserialize;

use crate::broker;
use crate::device_route::{CommandTopics, MQTT_EXCHANGE, RouteFile, Routes};
use crate::envelope::Kind;
use crate::failure::Failure;
use crate::handlers;
use crate::retry::{Disposition, RetryDelay, RetryPolicy};

/// Type of the main queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    Classic,
    Quorum,
}

/// An exchange binding that routes into the main queue.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    pub exchange: String,
    pub routing_key: String,
}

/// The broker layout of one main queue: its name, every name derived from
/// it, and the checked contents of the topology file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    queue: MainQueue,
    pub queue_type: QueueType,
    /// Deliveries of one message before it is parked as a crash loop
    /// (`x-delivery-limit` on quorum queues).
    pub delivery_limit: u32,
    pub retry: RetryPolicy,
    /// The file's bindings, then one `amq.topic` binding per device route.
    pub bindings: Vec<Binding>,
    /// Raw device messages by MQTT topic filter (docs/devices.md).
    pub routes: Routes,
    /// The routing key of each command type's device message.
    pub commands: CommandTopics,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    queue_type: QueueType,
    delivery_limit: u32,
    retry: RetryFile,
    #[serde(default)]
    bindings: Vec<Binding>,
    #[serde(default)]
    routes: Vec<RouteFile>,
    #[serde(default)]
    commands: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryFile {
    delays: Vec<String>,
    max_attempts: u32,
    #[serde(default = "default_in_process_attempts")]
    in_process_attempts: u32,
}

fn default_in_process_attempts() -> u32 {
    3
}

/// A topology that cannot be used, or a broker that refuses it.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot read topology file TOPOLOGY_FILE={path:?}: {reason}")]
    File { path: String, reason: String },
    #[error("topology file {path:?}: {problem}")]
    Invalid { path: String, problem: String },
    #[error(
        "queue '{queue}' already exists with other arguments: {detail}. The worker declares \
         {argument} = {wanted}. To fix it, move its messages elsewhere and delete the queue \
         (rabbitmqctl delete_queue '{queue}') so the worker can declare it, or change the \
         topology file to match the existing queue"
    )]
    Conflict {
        queue: String,
        argument: String,
        wanted: String,
        detail: String,
    },
    #[error(
        "queue '{queue}' exists with other arguments ({detail}): on a quorum topology the retry queues \
         and the DLQ are quorum queues with at-least-once dead-lettering, and a queue's type cannot \
         change. Migrate without losing a message: (1) stop every worker of '{main}'; (2) wait until \
         each '{main}.retry.*' queue is empty (its messages go back to '{main}' when their delay ends) \
         and delete it: rabbitmqctl delete_queue '{main}.retry.<delay>' --if-empty; (3) move the \
         parked messages into the parking lot: requeue --queue '{main}' --list; (4) rabbitmqctl \
         delete_queue '{main}.dlq' --if-empty; (5) start the worker, which declares the new queues. \
         Or set queue_type = \"classic\" to keep the single-node topology"
    )]
    NeedsMigration {
        queue: String,
        main: String,
        detail: String,
    },
    #[error("declaring {object} failed: {source}")]
    Broker {
        object: String,
        #[source]
        source: lapin::Error,
    },
}

impl Topology {
    /// Reads and checks a topology file, for main queue `queue`.
    ///
    /// # Errors
    /// [`TopologyError::File`] or [`TopologyError::Invalid`].
    pub fn load(path: &Path, queue: &str) -> Result<Topology, TopologyError> {
        let text = std::fs::read_to_string(path).map_err(|e| TopologyError::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Topology::parse(&text, queue).map_err(|problem| TopologyError::Invalid {
            path: path.display().to_string(),
            problem,
        })
    }

    /// Parses and checks topology TOML, for main queue `queue`.
    ///
    /// # Errors
    /// A sentence naming the field and what is allowed.
    pub fn parse(text: &str, queue: &str) -> Result<Topology, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        if file.retry.delays.is_empty() {
            return Err("retry.delays must list at least one delay, such as [\"1s\", \"30s\", \"5m\"]".into());
        }
        let mut retry_delays = Vec::with_capacity(file.retry.delays.len());
        for name in file.retry.delays {
            let delay = parse_delay(&name)?;
            if let Some(previous) = retry_delays.last().map(|d: &RetryDelay| d.delay)
                && delay < previous
            {
                return Err(format!(
                    "retry.delays must not decrease: {name:?} comes after a longer delay"
                ));
            }
            retry_delays.push(RetryDelay { name, delay });
        }
        if !(1..=100).contains(&file.retry.max_attempts) {
            return Err(format!(
                "retry.max_attempts = {} (allowed: 1 to 100)",
                file.retry.max_attempts
            ));
        }
        if !(1..=10).contains(&file.retry.in_process_attempts) {
            return Err(format!(
                "retry.in_process_attempts = {} (allowed: 1 to 10)",
                file.retry.in_process_attempts
            ));
        }
        if !(1..=100).contains(&file.delivery_limit) {
            return Err(format!("delivery_limit = {} (allowed: 1 to 100)", file.delivery_limit));
        }
        for binding in &file.bindings {
            if binding.exchange.is_empty() {
                return Err("bindings: the default exchange \"\" cannot be bound; name an exchange".into());
            }
        }
        let routes = Routes::parse(file.routes)?;
        let commands = CommandTopics::parse(file.commands)?;
        check_types(&routes, &commands)?;
        let bindings = with_route_bindings(file.bindings, &routes);
        Ok(Topology {
            queue: MainQueue::new(queue),
            queue_type: file.queue_type,
            delivery_limit: file.delivery_limit,
            retry: RetryPolicy {
                delays: retry_delays,
                max_attempts: file.retry.max_attempts,
                in_process_attempts: file.retry.in_process_attempts,
            },
            bindings,
            routes,
            commands,
        })
    }

    /// Declares the main queue, every retry queue, the DLQ and the bindings.
    /// Declaring is idempotent; a queue that exists with other arguments is
    /// a [`TopologyError::Conflict`], never a bare channel error.
    ///
    /// The channel is closed by the broker after a conflict: open a new one.
    ///
    /// # Errors
    /// [`TopologyError::Conflict`] or [`TopologyError::Broker`].
    pub async fn declare(&self, channel: &Channel) -> Result<(), TopologyError> {
        let queue = self.queue();
        let main = self.main_queue_arguments();
        declare_queue(channel, queue, &main).await?;
        self.declare_retry_queues_and_dlq(channel).await?;
        for binding in &self.bindings {
            if !binding.exchange.starts_with("amq.") {
                channel
                    .exchange_declare(
                        binding.exchange.as_str().into(),
                        ExchangeKind::Topic,
                        ExchangeDeclareOptions {
                            durable: true,
                            ..ExchangeDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|source| TopologyError::Broker {
                        object: format!("exchange '{}'", binding.exchange),
                        source,
                    })?;
            }
            channel
                .queue_bind(
                    queue.into(),
                    binding.exchange.as_str().into(),
                    binding.routing_key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|source| TopologyError::Broker {
                    object: format!("binding {} '{}' -> '{queue}'", binding.exchange, binding.routing_key),
                    source,
                })?;
        }
        Ok(())
    }

    /// The retry queues and the DLQ of main queue `queue`.
    async fn declare_retry_queues_and_dlq(&self, channel: &Channel) -> Result<(), TopologyError> {
        let queue = self.queue();
        // On a quorum topology the retry queues and the DLQ are quorum queues
        // too (replicated), and a retry queue hands an expired message back
        // to Q at least once: at-most-once dead-lettering drops it when Q has
        // no leader yet, as after a broker restart ("leader not known").
        let quorum = self.queue_type == QueueType::Quorum;
        for retry in &self.retry.delays {
            let ttl = i64::try_from(retry.delay.as_millis()).unwrap_or(i64::MAX);
            let mut args = vec![
                ("x-message-ttl", Arg::Long(ttl)),
                ("x-dead-letter-exchange", Arg::Str(String::new())),
                ("x-dead-letter-routing-key", Arg::Str(queue.to_owned())),
            ];
            if quorum {
                args.extend(QUORUM_AT_LEAST_ONCE.map(|(key, value)| (key, Arg::Str(value.into()))));
            }
            let name = self.queue.retry_queue(retry);
            declare_queue(channel, &name, &args)
                .await
                .map_err(|e| needs_migration(e, quorum, queue))?;
        }
        let dlq_args = if quorum {
            vec![("x-queue-type", Arg::Str("quorum".into()))]
        } else {
            Vec::new()
        };
        declare_queue(channel, &self.dlq(), &dlq_args)
            .await
            .map_err(|e| needs_migration(e, quorum, queue))?;
        Ok(())
    }

    /// The main queue `Q`.
    pub fn queue(&self) -> &str {
        self.queue.name()
    }

    /// `Q.dlq`.
    pub fn dlq(&self) -> String {
        self.queue.dlq()
    }

    /// The queue of delayed retry `n` (1-based).
    pub fn retry_queue(&self, n: u32) -> String {
        self.queue.retry_queue(self.retry.delay(n))
    }

    /// Every queue the worker declares: `Q`, its retry queues, `Q.dlq`.
    pub fn queues(&self) -> Vec<String> {
        let mut names = vec![self.queue().to_owned()];
        names.extend(self.retry.delays.iter().map(|d| self.queue.retry_queue(d)));
        names.push(self.dlq());
        names
    }

    /// The fate of a delivery that failed with `failure` after `retries`
    /// delayed retries (see [`RetryPolicy::disposition`]).
    pub fn disposition(&self, failure: &Failure, retries: u32) -> Disposition {
        self.retry
            .disposition(failure, retries, |delay| self.queue.retry_queue(delay))
    }

    /// The arguments `Q` is declared with. A quorum `Q` always names its own
    /// `x-delivery-limit`: RabbitMQ 4.0 gives quorum queues without one a
    /// default of 20, and the worker's crash-loop limit must stay the one
    /// that acts first (docs/reliability.md, "RabbitMQ 4").
    fn main_queue_arguments(&self) -> Vec<(&'static str, Arg)> {
        let mut main = vec![
            ("x-dead-letter-exchange", Arg::Str(String::new())),
            ("x-dead-letter-routing-key", Arg::Str(self.dlq())),
        ];
        if self.queue_type == QueueType::Quorum {
            main.push(("x-queue-type", Arg::Str("quorum".into())));
            main.push(("x-delivery-limit", Arg::Long(i64::from(self.delivery_limit))));
        }
        main
    }

    /// Redeliveries of one message that the worker runs before parking it
    /// as a crash loop: `min(delivery_limit, max_attempts)`.
    pub fn crash_loop_limit(&self) -> u32 {
        self.delivery_limit.min(self.retry.max_attempts)
    }
}

/// The main queue's name, and the one place that derives the others from
/// it. Tools that only know the name (`requeue`) use it without a
/// topology file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MainQueue(String);

impl MainQueue {
    pub fn new(name: &str) -> MainQueue {
        MainQueue(name.to_owned())
    }

    /// `Q`.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// `Q.dlq`: the parking lot.
    pub fn dlq(&self) -> String {
        format!("{}.dlq", self.0)
    }

    /// `Q.retry.<delay>`.
    pub fn retry_queue(&self, delay: &RetryDelay) -> String {
        format!("{}.retry.{}", self.0, delay.name)
    }
}

/// Refuses a route to a type that is not an event the worker handles, and
/// a command topic of a type that is not a command it handles: the first
/// would park every message of its topic, the second is never used
/// (docs/devices.md, "Routes").
fn check_types(routes: &Routes, commands: &CommandTopics) -> Result<(), String> {
    let allowed = |kind| handlers::types_of(kind).collect::<Vec<_>>().join(", ");
    if let Some(route) = routes
        .iter()
        .find(|r| !handlers::types_of(Kind::Event).any(|t| t == r.message_type))
    {
        return Err(format!(
            "routes: topic {:?}: type {:?} is not an event type the worker handles (allowed: {})",
            route.topic,
            route.message_type,
            allowed(Kind::Event)
        ));
    }
    if let Some(unknown) = commands
        .types()
        .find(|c| !handlers::types_of(Kind::Command).any(|t| t == *c))
    {
        return Err(format!(
            "commands.{unknown}: not a command type the worker handles (allowed: {})",
            allowed(Kind::Command)
        ));
    }
    Ok(())
}

/// `bindings`, then one `amq.topic` binding per device route (its
/// routing-key form), each once.
fn with_route_bindings(mut bindings: Vec<Binding>, routes: &Routes) -> Vec<Binding> {
    for route in routes.iter() {
        let binding = Binding {
            exchange: MQTT_EXCHANGE.into(),
            routing_key: route.routing_key(),
        };
        if !bindings.contains(&binding) {
            bindings.push(binding);
        }
    }
    bindings
}

/// Parses a delay as `humantime` does (`250ms`, `1s`, `5m`, `1h`), from
/// 1 ms to 24 h. The text names a queue, so it must be one word.
///
/// # Errors
/// A sentence naming the value and the accepted forms.
pub fn parse_delay(text: &str) -> Result<Duration, String> {
    let bad = || {
        format!("retry delay {text:?} (allowed: a duration in one word, such as 250ms, 1s, 5m or 1h, from 1ms to 24h)")
    };
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(bad());
    }
    let delay = humantime::parse_duration(text).map_err(|_| bad())?;
    if delay < Duration::from_millis(1) || delay > Duration::from_secs(86_400) {
        return Err(bad());
    }
    Ok(delay)
}

/// A retry queue's arguments on a quorum topology, beyond TTL and
/// dead-letter target: at-least-once dead-lettering needs `reject-publish`.
const QUORUM_AT_LEAST_ONCE: [(&str, &str); 3] = [
    ("x-queue-type", "quorum"),
    ("x-dead-letter-strategy", "at-least-once"),
    ("x-overflow", "reject-publish"),
];

#[derive(Debug)]
enum Arg {
    Str(String),
    Long(i64),
}

impl Arg {
    fn shown(&self) -> String {
        match self {
            Arg::Str(s) => format!("'{s}'"),
            Arg::Long(n) => n.to_string(),
        }
    }
}

async fn declare_queue(channel: &Channel, queue: &str, args: &[(&str, Arg)]) -> Result<(), TopologyError> {
    let mut table = FieldTable::default();
    for (key, value) in args {
        let value = match value {
            Arg::Str(s) => AMQPValue::LongString(LongString::from(s.as_str())),
            Arg::Long(n) => AMQPValue::LongLongInt(*n),
        };
        table.insert((*key).into(), value);
    }
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    match channel.queue_declare(queue.into(), options, table).await {
        Ok(_) => Ok(()),
        Err(source) => {
            let refusal = match broker::soft_error(&source) {
                Some((AMQPSoftError::PRECONDITIONFAILED, text)) => conflict(queue, args, text),
                _ => None,
            };
            Err(refusal.unwrap_or(TopologyError::Broker {
                object: format!("queue '{queue}'"),
                source,
            }))
        }
    }
}

/// A conflict on a retry queue or the DLQ of a quorum topology over an
/// argument that only the quorum layout sets: a queue declared before they
/// became quorum queues, which must be migrated. Other conflicts (a changed
/// delay, say) keep their own message.
fn needs_migration(error: TopologyError, quorum: bool, main: &str) -> TopologyError {
    let quorum_only = |argument: &str| QUORUM_AT_LEAST_ONCE.iter().any(|(key, _)| *key == argument);
    match error {
        TopologyError::Conflict {
            queue,
            argument,
            detail,
            ..
        } if quorum && quorum_only(&argument) => TopologyError::NeedsMigration {
            queue,
            main: main.to_owned(),
            detail,
        },
        other => other,
    }
}

/// Turns the text of RabbitMQ's PRECONDITION_FAILED (`inequivalent arg 'X'
/// for queue 'Q' in vhost '/': received … but current is …`) into a
/// [`TopologyError::Conflict`]. Only the argument's name and the broker's
/// detail are read from the text.
fn conflict(queue: &str, args: &[(&str, Arg)], text: &str) -> Option<TopologyError> {
    let start = text.find("inequivalent arg '")? + "inequivalent arg '".len();
    let argument = &text[start..][..text[start..].find('\'')?];
    let detail = text[start..].split_once("': ").map_or(text, |(_, rest)| rest);
    let wanted = match argument {
        "durable" => "true".to_owned(),
        "x-queue-type" if args.iter().all(|(key, _)| *key != "x-queue-type") => "nothing (a classic queue)".to_owned(),
        _ => args
            .iter()
            .find(|(key, _)| *key == argument)
            .map_or_else(|| "nothing (not set)".to_owned(), |(_, v)| v.shown()),
    };
    Some(TopologyError::Conflict {
        queue: queue.to_owned(),
        argument: argument.to_owned(),
        wanted,
        detail: format!("{argument}: {}", detail.trim_end_matches(['"', ')'])),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "queue_type = \"classic\"\ndelivery_limit = 3\n[retry]\ndelays = [\"1s\"]\nmax_attempts = 5\n";

    #[test]
    fn a_route_or_command_topic_of_a_type_the_worker_does_not_handle_stops_start_up() {
        let route = |t: &str| {
            format!("{BASE}[[routes]]\ntopic = \"up\"\ntype = \"{t}\"\ndevice_id = {{ field = \"device_id\" }}\n")
        };
        if let Err(e) = Topology::parse(&route("DEVICE_UP"), "q") {
            panic!("a known type: {e}");
        }
        let error = Topology::parse(&route("DEVICE_UPP"), "q").expect_err("an unknown type");
        assert!(
            error.contains("topic \"up\"") && error.contains("\"DEVICE_UPP\"") && error.contains("allowed: DEVICE_UP"),
            "{error}"
        );
        let command = Topology::parse(&route("SET_LED"), "q").expect_err("a command is no route");
        assert!(command.contains("not an event type"), "{command}");
        let topic = format!("{BASE}[commands]\nSET_LAMP = \".lamp.{{device_id}}\"\n");
        let error = Topology::parse(&topic, "q").expect_err("an unknown command");
        assert!(
            error.starts_with("commands.SET_LAMP: not a command type") && error.contains("SET_LED, SET_PUBLISH_PERIOD"),
            "{error}"
        );
    }

    fn conflict_over(argument: &str) -> TopologyError {
        TopologyError::Conflict {
            queue: "q.dlq".into(),
            argument: argument.into(),
            wanted: "'quorum'".into(),
            detail: format!("{argument}: received … but current is none"),
        }
    }

    #[test]
    fn only_quorum_layout_conflicts_ask_for_a_migration() {
        for argument in ["x-queue-type", "x-dead-letter-strategy", "x-overflow"] {
            let error = needs_migration(conflict_over(argument), true, "q");
            assert!(matches!(error, TopologyError::NeedsMigration { .. }), "{argument}");
            let text = error.to_string();
            assert!(text.contains("requeue --queue 'q' --list"), "{text}");
        }
        let changed_delay = needs_migration(conflict_over("x-message-ttl"), true, "q");
        assert!(matches!(changed_delay, TopologyError::Conflict { .. }));
        let classic = needs_migration(conflict_over("x-queue-type"), false, "q");
        assert!(matches!(classic, TopologyError::Conflict { .. }));
    }

    const GOOD: &str = r#"
        queue_type = "quorum"
        delivery_limit = 5
        [retry]
        delays = ["50ms", "1s", "5m"]
        max_attempts = 4
        [[bindings]]
        exchange = "amq.topic"
        routing_key = "iot.#"
    "#;

    #[test]
    fn a_quorum_queue_names_its_delivery_limit_below_rabbitmq_4s_default() {
        let t = Topology::parse(GOOD, "q").unwrap();
        let limit = t
            .main_queue_arguments()
            .into_iter()
            .find(|(k, _)| *k == "x-delivery-limit");
        assert!(matches!(limit, Some((_, Arg::Long(5)))), "{limit:?}");
        // The worker parks a crash loop before the broker's limit would act.
        assert!(t.crash_loop_limit() <= t.delivery_limit);
        let classic = Topology::parse(&GOOD.replace("\"quorum\"", "\"classic\""), "q").unwrap();
        assert!(
            classic
                .main_queue_arguments()
                .iter()
                .all(|(k, _)| *k != "x-delivery-limit")
        );
    }

    #[test]
    fn parses_the_file() {
        let t = Topology::parse(GOOD, "q").unwrap();
        assert_eq!(t.queue_type, QueueType::Quorum);
        assert_eq!(t.retry.max_attempts, 4);
        assert_eq!(t.retry.delays[0].delay, Duration::from_millis(50));
        assert_eq!(t.retry.delays[2].delay, Duration::from_secs(300));
        assert_eq!(t.bindings[0].routing_key, "iot.#");
        assert_eq!(t.retry.delay(1).name, "50ms");
        assert_eq!(t.retry.delay(3).name, "5m");
        assert_eq!(t.retry.delay(9).name, "5m");
    }

    #[test]
    fn names_every_queue() {
        let t = Topology::parse(GOOD, "iot").unwrap();
        assert_eq!(t.queue(), "iot");
        assert_eq!(t.dlq(), "iot.dlq");
        assert_eq!(t.retry_queue(1), "iot.retry.50ms");
        assert_eq!(t.retry_queue(7), "iot.retry.5m");
        assert_eq!(
            t.queues(),
            ["iot", "iot.retry.50ms", "iot.retry.1s", "iot.retry.5m", "iot.dlq"]
        );
        let transient = Failure::Database(sqlx::Error::PoolTimedOut);
        assert_eq!(
            t.disposition(&transient, 1),
            Disposition::RetryLater {
                retry: 2,
                queue: "iot.retry.1s".into()
            }
        );
        assert_eq!(t.crash_loop_limit(), 4);
    }

    #[test]
    fn refuses_bad_topologies() {
        for (from, to) in [
            (r#"["50ms", "1s", "5m"]"#, "[]"),
            (r#"["50ms", "1s", "5m"]"#, r#"["1s", "50ms"]"#),
            (r#"["50ms", "1s", "5m"]"#, r#"["5 s"]"#),
            (r#"["50ms", "1s", "5m"]"#, r#"["0ms"]"#),
            (r#"["50ms", "1s", "5m"]"#, r#"["2d"]"#),
            ("max_attempts = 4", "max_attempts = 0"),
            ("max_attempts = 4", "max_attempts = 4\nin_process_attempts = 0"),
            ("delivery_limit = 5", "delivery_limit = 0"),
            (r#""quorum""#, r#""stream""#),
            (r#""amq.topic""#, r#""""#),
            ("max_attempts = 4", "max_attempts = 4\nmax_length = 10"),
        ] {
            let text = GOOD.replace(from, to);
            assert!(Topology::parse(&text, "q").is_err(), "accepted {to}");
        }
    }

    #[test]
    fn explains_conflicts() {
        let args = [("x-dead-letter-routing-key", Arg::Str("q.dlq".into()))];
        let text = "ProtocolError: PRECONDITION_FAILED - inequivalent arg 'x-dead-letter-routing-key' for queue 'q' \
                    in vhost '/': received the value 'q.dlq' of type 'longstr' but current is none";
        let err = conflict("q", &args, text).unwrap().to_string();
        assert!(err.contains("queue 'q'"), "{err}");
        assert!(err.contains("x-dead-letter-routing-key = 'q.dlq'"), "{err}");
        assert!(err.contains("but current is none"), "{err}");
        assert!(err.contains("delete the queue"), "{err}");
        assert!(conflict("q", &args, "connection reset").is_none());
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            /// Retry n waits at least as long as retry n - 1.
            #[test]
            fn delays_never_decrease(mut millis in proptest::collection::vec(1u64..=86_400_000, 1..8), n in 1u32..50) {
                millis.sort_unstable();
                let delays: Vec<String> = millis.iter().map(|ms| format!("\"{ms}ms\"")).collect();
                let text = format!(
                    "queue_type = \"classic\"\ndelivery_limit = 3\n[retry]\ndelays = [{}]\nmax_attempts = 5\n",
                    delays.join(", ")
                );
                let topology = Topology::parse(&text, "q").map_err(TestCaseError::fail)?;
                prop_assert!(topology.retry.delay(n + 1).delay >= topology.retry.delay(n).delay);
            }
        }
    }
}
