//! Settings (docs/configuration.md, "Where settings come from"): built-in
//! defaults, then `_storage/settings.json` (path from `SETTINGS_FILE`), then
//! environment variables of the same name.
//!
//! Every value is checked here, once, at start-up. A bad one becomes a
//! [`ConfigError`] that names the key, the value (with any password
//! masked), where it came from and what is allowed, so a binary refuses to
//! start instead of misbehaving later. A binary checks only the settings it
//! uses ([`Settings::load_for`]): a bad worker-only setting does not stop
//! `publish`.
//!
//! Each setting is declared once, in the `settings!` table below: its
//! field, key, default, parser and printed form. [`KEYS`], the defaults,
//! the validation and the printed configuration all come from that table,
//! so adding a setting is adding one entry.
//!
//! Passwords travel as [`SecretUrl`]s (and tokens as [`Secret`]s), whose
//! `Debug` and `Display` mask them; the code that connects asks for the
//! real value with `expose()`.

mod load;
mod secret;
mod urls;
mod values;

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use load::Layers;
pub use load::{Loaded, SettingsFile, Warnings};
pub use secret::{SecretUrl, mask_loosely, mask_password, mask_passwords};
use values::{
    host_name, integer, log_filter, message_types, on_off, otlp_endpoint, queue_name, service_name, topology_path,
};

/// Default settings file, relative to the working directory.
pub const DEFAULT_SETTINGS_FILE: &str = "_storage/settings.json";

/// The database when `DATABASE_URL` is not set: the local server's, created
/// at start-up if missing, so the worker starts with nothing exported.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@localhost:5432/worker_iot_core";

/// Keys read from the environment only: in the settings file they are
/// ignored, with a warning (`RUST_LOG` is read by the log output itself).
const ENVIRONMENT_ONLY: [&str; 1] = ["RUST_LOG"];

/// The settings a binary that talks to the broker reads.
pub const BROKER_KEYS: &[&str] = &["RABBITMQ_HOSTNAME", "AMQP_URL", "RABBITMQ_LOCAL_QUEUE_NAME"];

/// The settings a binary that only opens the database reads.
pub const DATABASE_KEYS: &[&str] = &["DATABASE_URL"];

/// The settings of the log output and the span export.
pub const TELEMETRY_KEYS: &[&str] = &[
    "RUST_LOG",
    "LOG_FORMAT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_SERVICE_NAME",
];

/// Declares the settings: the [`Settings`] struct, [`KEYS`], the layered
/// parse (`Settings::from_layers`) and the printed configuration, from one
/// entry per setting:
///
/// ```text
/// field: Type = "KEY" {
///     default: text a user could have written (may use earlier fields),
///     parse: fn(&str) -> Result<Type, String>, the error saying what is allowed,
///     show: fn(&Type) -> String, for the printed configuration,
/// }
/// ```
///
/// Entries are parsed in order, so a default may depend on an earlier field
/// (`AMQP_URL` on `RABBITMQ_HOSTNAME`); they are printed in the same order.
macro_rules! settings {
    ($(
        $(#[$doc:meta])*
        $field:ident: $ty:ty = $key:literal {
            default: $default:expr,
            parse: $parse:expr,
            show: $show:expr $(,)?
        }
    )*) => {
        /// The effective configuration. Its `Debug` and `Display` mask
        /// every password.
        #[derive(Debug, Clone, PartialEq)]
        pub struct Settings {
            $($(#[$doc])* pub $field: $ty,)*
        }

        /// Every key the worker reads, from the file or the environment.
        pub const KEYS: &[&str] = &[$($key),*];

        impl Settings {
            /// Parses every key; a bad value of a key in `layers.checked`
            /// is an error, and all of them are reported at once.
            fn from_layers(layers: &Layers) -> Result<Settings, ConfigError> {
                let mut errors = Vec::new();
                $(
                    let parse: fn(&str) -> Result<$ty, String> = $parse;
                    let Some($field) = layers.parse($key, || String::from($default), parse, &mut errors) else {
                        return Err(ConfigError::from_list(errors));
                    };
                )*
                if !errors.is_empty() {
                    return Err(ConfigError::from_list(errors));
                }
                Ok(Settings { $($field),* })
            }

            /// The printed configuration: `(key, value)` with passwords masked.
            fn rows(&self) -> Vec<(&'static str, String)> {
                vec![$({
                    let show: fn(&$ty) -> String = $show;
                    ($key, show(&self.$field))
                }),*]
            }
        }
    };
}

settings! {
    rabbitmq_hostname: String = "RABBITMQ_HOSTNAME" {
        default: "localhost",
        parse: host_name,
        show: String::clone,
    }
    /// The main queue `Q`.
    queue: String = "RABBITMQ_LOCAL_QUEUE_NAME" {
        default: "local_iot_core",
        parse: queue_name,
        show: String::clone,
    }
    prefetch_count: u16 = "RABBITMQ_PREFETCH_COUNT" {
        default: "256",
        parse: |text| integer(text, 1, 1000),
        show: u16::to_string,
    }
    /// Most deliveries applied in one transaction; 1 turns batching off.
    batch_max_size: usize = "BATCH_MAX_SIZE" {
        default: "64",
        parse: |text| integer(text, 1, 1000),
        show: usize::to_string,
    }
    /// How long a batch may wait for more deliveries while another batch
    /// is being committed. With nothing in flight a batch never waits.
    batch_max_wait: Duration = "BATCH_MAX_WAIT_MS" {
        default: "5",
        parse: |text| integer(text, 0, 1000).map(Duration::from_millis),
        show: |wait| wait.as_millis().to_string(),
    }
    events_to_omit: BTreeSet<String> = "EVENTS_TO_OMIT" {
        default: "",
        parse: message_types,
        show: |types| types.iter().map(String::as_str).collect::<Vec<_>>().join(","),
    }
    topology_file: PathBuf = "TOPOLOGY_FILE" {
        default: "topology/topology.toml",
        parse: topology_path,
        show: |path| path.display().to_string(),
    }
    max_message_bytes: usize = "MAX_MESSAGE_BYTES" {
        default: "262144",
        // At most RabbitMQ 4's default max_message_size (16 MiB, down from
        // 128 MiB in 3.x): a bigger message could not be published to the
        // broker, nor its parked copy (docs/reliability.md, "RabbitMQ 4").
        parse: |text| integer(text, 1024, 16 * 1024 * 1024),
        show: usize::to_string,
    }
    shutdown_grace: Duration = "SHUTDOWN_GRACE_MS" {
        default: "10000",
        parse: |text| integer(text, 0, 600_000).map(Duration::from_millis),
        show: |grace| grace.as_millis().to_string(),
    }
    metrics_addr: SocketAddr = "METRICS_ADDR" {
        default: "0.0.0.0:9464",
        parse: |text| text.parse().map_err(|_| "an address such as 0.0.0.0:9464".into()),
        show: SocketAddr::to_string,
    }
    /// Upper bound of the PostgreSQL pool; the pool is one connection per
    /// message in flight (the prefetch count) plus two for bookkeeping,
    /// capped by this. With batching, a few connections serve many
    /// messages in flight.
    database_max_connections: u32 = "DATABASE_MAX_CONNECTIONS" {
        default: "16",
        parse: |text| integer(text, 1, 1000),
        show: u32::to_string,
    }
    /// Whether this worker runs the outbox relay.
    outbox_relay: bool = "OUTBOX_RELAY" {
        default: "on",
        parse: on_off,
        show: |on| if *on { "on" } else { "off" }.into(),
    }
    /// How long published outbox rows are kept.
    outbox_retention: Duration = "OUTBOX_RETENTION_DAYS" {
        default: "7",
        parse: |text| integer(text, 1, 3650).map(|days: u64| Duration::from_secs(days * 86_400)),
        show: |retention| (retention.as_secs() / 86_400).to_string(),
    }
    /// Whether this worker runs the parking keeper, which moves what
    /// reaches `Q.dlq` into the parking lot.
    parking_keeper: bool = "PARKING_KEEPER" {
        default: "on",
        parse: on_off,
        show: |on| if *on { "on" } else { "off" }.into(),
    }
    /// How long `retried` and `archived` parked messages are kept
    /// (`parked` ones are never deleted).
    parked_retention: Duration = "PARKED_RETENTION_DAYS" {
        default: "30",
        parse: |text| integer(text, 1, 3650).map(|days: u64| Duration::from_secs(days * 86_400)),
        show: |retention| (retention.as_secs() / 86_400).to_string(),
    }
    /// How long readings and events are kept, in whole days: older day
    /// partitions are dropped. `None` (empty, the default) keeps
    /// everything.
    telemetry_retention_days: Option<u32> = "TELEMETRY_RETENTION_DAYS" {
        default: "",
        parse: |text| match text.trim() {
            "" => Ok(None),
            days => integer(days, 1, 36_500).map(Some).map_err(|allowed| format!("{allowed}, or empty to keep everything")),
        },
        show: |days| days.map_or_else(|| "(not set: everything is kept)".into(), |d| d.to_string()),
    }
    /// How long a message id is remembered at least, in days (an id is
    /// remembered for the window and at most a day more).
    inbox_window_days: u32 = "INBOX_WINDOW_DAYS" {
        default: "30",
        parse: |text| integer(text, 1, 3650),
        show: u32::to_string,
    }
    /// The broker, or the nodes of one cluster (comma-separated). Connect
    /// with `amqp_url.expose()`; printing it masks the passwords.
    amqp_url: SecretUrl = "AMQP_URL" {
        default: format!("amqp://guest:guest@{rabbitmq_hostname}:5672/%2f"),
        parse: urls::amqp_urls,
        show: |urls| urls.masked().to_owned(),
    }
    /// Connect with `database_url.expose()`; printing it masks the password.
    database_url: SecretUrl = "DATABASE_URL" {
        default: DEFAULT_DATABASE_URL,
        parse: urls::postgres_url,
        show: |url| url.masked().to_owned(),
    }
    /// The log output's filter (environment only; the log output reads it
    /// itself, this checks it).
    rust_log: String = "RUST_LOG" {
        default: "info",
        parse: log_filter,
        show: String::clone,
    }
    log_format: LogFormat = "LOG_FORMAT" {
        default: "text",
        parse: LogFormat::parse,
        show: |format| format.as_str().into(),
    }
    /// Where spans are exported over OTLP; `None` (empty) exports nothing.
    otel_endpoint: Option<String> = "OTEL_EXPORTER_OTLP_ENDPOINT" {
        default: "",
        parse: otlp_endpoint,
        show: |endpoint| endpoint.as_deref().map_or_else(|| "(not set: no spans exported)".into(), mask_password),
    }
    otel_protocol: OtlpProtocol = "OTEL_EXPORTER_OTLP_PROTOCOL" {
        default: "grpc",
        parse: OtlpProtocol::parse,
        show: |protocol| protocol.as_str().into(),
    }
    /// `service.name` of the exported spans.
    otel_service_name: String = "OTEL_SERVICE_NAME" {
        default: "worker-iot-core",
        parse: service_name,
        show: String::clone,
    }
}

/// How spans travel to `OTEL_EXPORTER_OTLP_ENDPOINT`. Only gRPC is built
/// in: `http/protobuf` would need an HTTP client this build does not have,
/// so it is refused at start-up rather than silently sent over gRPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
}

impl OtlpProtocol {
    /// The setting's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            OtlpProtocol::Grpc => "grpc",
        }
    }

    fn parse(text: &str) -> Result<OtlpProtocol, String> {
        match text.trim() {
            "grpc" => Ok(OtlpProtocol::Grpc),
            _ => Err("\"grpc\" (http/protobuf and http/json are not built in)".into()),
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    /// The setting's spelling: `text` or `json`.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }

    fn parse(text: &str) -> Result<LogFormat, String> {
        match text {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err("\"text\" or \"json\"".into()),
        }
    }
}

/// Where a setting's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Default,
    File,
    Environment,
}

impl Source {
    /// One word, for `--check-config --json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Default => "default",
            Source::File => "file",
            Source::Environment => "environment",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Default => "default",
            Source::File => "settings file",
            Source::Environment => "environment",
        })
    }
}

/// A setting that stops start-up. The value it carries is masked
/// ([`shown_value`]): no password reaches an error message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid setting {key}={value:?} (from {origin}): expected {allowed}")]
    Invalid {
        key: &'static str,
        value: String,
        origin: Source,
        allowed: String,
    },
    #[error("cannot read settings file SETTINGS_FILE={path:?}: {reason}")]
    File { path: String, reason: String },
    /// Several bad values, one per line.
    #[error("{}", lines(.0))]
    Several(Vec<ConfigError>),
}

fn lines(errors: &[ConfigError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
}

impl ConfigError {
    /// The key the error is about (`SETTINGS_FILE` for an unreadable file;
    /// the first one's for several).
    pub fn key(&self) -> &'static str {
        match self {
            ConfigError::Invalid { key, .. } => key,
            ConfigError::File { .. } => "SETTINGS_FILE",
            ConfigError::Several(errors) => errors.first().map_or("SETTINGS_FILE", ConfigError::key),
        }
    }

    /// One error, or [`ConfigError::Several`].
    fn from_list(mut errors: Vec<ConfigError>) -> ConfigError {
        if errors.len() == 1 {
            errors.remove(0)
        } else {
            ConfigError::Several(errors)
        }
    }
}

/// A value as an error may show it: a key that holds a secret whole
/// (`…_TOKEN`, `…_PASSWORD`, `…_SECRET`) shows `****`; any other value is
/// shown with whatever looks like a password masked (a URL pasted into the
/// wrong key is masked too).
pub fn shown_value(key: &str, value: &str) -> String {
    if ["_TOKEN", "_PASSWORD", "_SECRET"].iter().any(|end| key.ends_with(end)) {
        return secret::MASK.to_owned();
    }
    mask_loosely(value)
}

impl fmt::Display for Settings {
    /// The effective configuration, one `KEY = value` per line, with
    /// passwords in URLs masked.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (key, value) in self.rows() {
            writeln!(f, "  {key:<26} = {value}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn load(file: Option<&str>, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let env: BTreeMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Settings::from_sources(file.map(|text| ("settings.json", text)), |k| env.get(k).cloned()).map(|(s, _)| s)
    }

    fn invalid_key(result: Result<Settings, ConfigError>) -> &'static str {
        match result {
            Err(e @ ConfigError::Invalid { .. }) => {
                let text = e.to_string();
                assert!(text.contains("expected"), "{text}");
                e.key()
            }
            other => panic!("expected an invalid setting, got {other:?}"),
        }
    }

    /// What a bare start and `docker compose up` read must not undo a
    /// benchmarked default (docs/benchmarks.md, "Why these defaults").
    #[test]
    fn the_shipped_settings_file_keeps_every_default() {
        let shipped = include_str!("../_storage/settings.json");
        assert_eq!(load(Some(shipped), &[]).unwrap(), load(None, &[]).unwrap());
    }

    #[test]
    fn defaults() {
        let s = load(None, &[]).unwrap();
        assert_eq!(s.queue, "local_iot_core");
        assert_eq!(s.amqp_url.expose(), "amqp://guest:guest@localhost:5672/%2f");
        assert_eq!(s.database_url.expose(), DEFAULT_DATABASE_URL);
        assert_eq!(s.rust_log, "info");
        assert_eq!(s.max_message_bytes, 262_144);
        assert_eq!(s.shutdown_grace, Duration::from_secs(10));
        assert_eq!(s.metrics_addr.port(), 9464);
        assert!(s.events_to_omit.is_empty());
        assert_eq!(s.log_format, LogFormat::Text);
        assert!(s.outbox_relay);
        assert_eq!((s.prefetch_count, s.batch_max_size, s.pool_size()), (256, 64, 16));
        assert_eq!(s.batch_max_wait, Duration::from_millis(5));
        assert_eq!(s.outbox_retention, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(s.parked_retention, Duration::from_secs(30 * 24 * 3600));
        assert!(s.parking_keeper);
        assert_eq!(s.otel_endpoint, None);
        assert_eq!(s.otel_protocol, OtlpProtocol::Grpc);
        assert_eq!(s.otel_service_name, "worker-iot-core");
    }

    #[test]
    fn otel_settings_are_checked() {
        let s = load(
            None,
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://jaeger:4317"),
                ("OTEL_SERVICE_NAME", "edge-7"),
            ],
        )
        .unwrap();
        assert_eq!(s.otel_endpoint.as_deref(), Some("http://jaeger:4317"));
        assert_eq!(s.otel_service_name, "edge-7");
        assert!(
            s.to_string()
                .contains("OTEL_EXPORTER_OTLP_ENDPOINT = http://jaeger:4317\n")
        );
        let err = load(None, &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid setting OTEL_EXPORTER_OTLP_PROTOCOL=\"http/protobuf\" (from environment): \
             expected \"grpc\" (http/protobuf and http/json are not built in)"
        );
        assert_eq!(
            invalid_key(load(None, &[("OTEL_EXPORTER_OTLP_ENDPOINT", "jaeger:4317")])),
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        );
        assert_eq!(
            invalid_key(load(None, &[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://jaeger:4317")])),
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        );
        assert_eq!(
            invalid_key(load(None, &[("OTEL_SERVICE_NAME", " ")])),
            "OTEL_SERVICE_NAME"
        );
    }

    #[test]
    fn environment_beats_file_beats_default() {
        let file = r#"{"RABBITMQ_PREFETCH_COUNT": "10", "RABBITMQ_HOSTNAME": "broker", "EVENTS_TO_OMIT": "A, B"}"#;
        let s = load(Some(file), &[("RABBITMQ_PREFETCH_COUNT", "64")]).unwrap();
        assert_eq!(s.prefetch_count, 64);
        assert_eq!(s.rabbitmq_hostname, "broker");
        assert_eq!(s.amqp_url.expose(), "amqp://guest:guest@broker:5672/%2f");
        assert_eq!(
            s.events_to_omit.iter().map(String::as_str).collect::<Vec<_>>(),
            ["A", "B"]
        );
        let s = load(Some(r#"{"RABBITMQ_PREFETCH_COUNT": 7}"#), &[]).unwrap();
        assert_eq!(s.prefetch_count, 7);
    }

    #[test]
    fn bad_numbers_name_key_value_and_range() {
        let err = load(None, &[("RABBITMQ_PREFETCH_COUNT", "lots")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid setting RABBITMQ_PREFETCH_COUNT=\"lots\" (from environment): expected an integer from 1 to 1000"
        );
        assert_eq!(
            invalid_key(load(None, &[("RABBITMQ_PREFETCH_COUNT", "0")])),
            "RABBITMQ_PREFETCH_COUNT"
        );
        assert_eq!(
            invalid_key(load(None, &[("RABBITMQ_PREFETCH_COUNT", "-3")])),
            "RABBITMQ_PREFETCH_COUNT"
        );
        assert_eq!(
            invalid_key(load(None, &[("MAX_MESSAGE_BYTES", "10")])),
            "MAX_MESSAGE_BYTES"
        );
        // RabbitMQ 4's max_message_size: 16 MiB (docs/reliability.md, "RabbitMQ 4").
        assert_eq!(
            invalid_key(load(None, &[("MAX_MESSAGE_BYTES", "16777217")])),
            "MAX_MESSAGE_BYTES"
        );
        assert_eq!(
            invalid_key(load(None, &[("SHUTDOWN_GRACE_MS", "1.5")])),
            "SHUTDOWN_GRACE_MS"
        );
        assert_eq!(
            invalid_key(load(None, &[("DATABASE_MAX_CONNECTIONS", "0")])),
            "DATABASE_MAX_CONNECTIONS"
        );
        let err = load(Some(r#"{"SHUTDOWN_GRACE_MS": 9999999}"#), &[]).unwrap_err();
        assert!(err.to_string().contains("(from settings file)"), "{err}");
    }

    #[test]
    fn bad_names_and_urls() {
        assert_eq!(
            invalid_key(load(None, &[("RABBITMQ_LOCAL_QUEUE_NAME", "")])),
            "RABBITMQ_LOCAL_QUEUE_NAME"
        );
        assert_eq!(
            invalid_key(load(None, &[("RABBITMQ_LOCAL_QUEUE_NAME", "amq.x")])),
            "RABBITMQ_LOCAL_QUEUE_NAME"
        );
        let long = "q".repeat(201);
        assert_eq!(
            invalid_key(load(None, &[("RABBITMQ_LOCAL_QUEUE_NAME", &long)])),
            "RABBITMQ_LOCAL_QUEUE_NAME"
        );
        assert_eq!(
            invalid_key(load(None, &[("RABBITMQ_HOSTNAME", "a b")])),
            "RABBITMQ_HOSTNAME"
        );
        assert_eq!(
            invalid_key(load(None, &[("EVENTS_TO_OMIT", "DEVICE_UP, lower")])),
            "EVENTS_TO_OMIT"
        );
        assert_eq!(invalid_key(load(None, &[("METRICS_ADDR", "nowhere")])), "METRICS_ADDR");
        assert_eq!(invalid_key(load(None, &[("AMQP_URL", "http://x")])), "AMQP_URL");
        assert_eq!(
            invalid_key(load(None, &[("AMQP_URL", "amqp://a:5672/%2f,,amqp://b")])),
            "AMQP_URL"
        );
        let two = load(
            None,
            &[("AMQP_URL", "amqp://u:pw1@a:5681/%2f, amqp://u:pw2@b:5682/%2f")],
        )
        .unwrap();
        let shown = two.to_string();
        assert!(
            shown.contains("amqp://u:****@a:5681/%2f,amqp://u:****@b:5682/%2f"),
            "{shown}"
        );
        assert_eq!(
            invalid_key(load(None, &[("DATABASE_URL", "mysql://x")])),
            "DATABASE_URL"
        );
        assert_eq!(invalid_key(load(None, &[("LOG_FORMAT", "xml")])), "LOG_FORMAT");
        assert_eq!(invalid_key(load(None, &[("OUTBOX_RELAY", "yes")])), "OUTBOX_RELAY");
        assert_eq!(
            invalid_key(load(None, &[("OUTBOX_RETENTION_DAYS", "0")])),
            "OUTBOX_RETENTION_DAYS"
        );
        let err = load(None, &[("PARKED_RETENTION_DAYS", "0")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid setting PARKED_RETENTION_DAYS=\"0\" (from environment): expected an integer from 1 to 3650"
        );
        assert_eq!(
            invalid_key(load(Some(r#"{"EVENTS_TO_OMIT": ["A"]}"#), &[])),
            "EVENTS_TO_OMIT"
        );
        let err = load(None, &[("TELEMETRY_RETENTION_DAYS", "a year")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid setting TELEMETRY_RETENTION_DAYS=\"a year\" (from environment): expected an integer from 1 to 36500, or empty to keep everything"
        );
        assert_eq!(
            invalid_key(load(None, &[("INBOX_WINDOW_DAYS", "0")])),
            "INBOX_WINDOW_DAYS"
        );
    }

    #[test]
    fn retention_is_off_and_the_inbox_window_a_month_unless_set() {
        let s = load(None, &[]).unwrap();
        assert_eq!((s.telemetry_retention_days, s.inbox_window_days), (None, 30));
        let s = load(
            Some(r#"{"TELEMETRY_RETENTION_DAYS": 400}"#),
            &[("INBOX_WINDOW_DAYS", "7")],
        )
        .unwrap();
        assert_eq!((s.telemetry_retention_days, s.inbox_window_days), (Some(400), 7));
    }

    #[test]
    fn bad_files() {
        assert_eq!(load(Some("{oops"), &[]).unwrap_err().key(), "SETTINGS_FILE");
        assert_eq!(load(Some("[1]"), &[]).unwrap_err().key(), "SETTINGS_FILE");
    }

    #[test]
    fn unknown_file_keys_are_reported_not_fatal() {
        let (_, warnings) = Settings::from_sources(Some(("f", r#"{"RABBITMQ_PREFETCH_CONUT": 5}"#)), |_| None).unwrap();
        assert_eq!(warnings.unknown_keys, ["RABBITMQ_PREFETCH_CONUT"]);
        assert_eq!(
            warnings.lines(),
            ["unknown key \"RABBITMQ_PREFETCH_CONUT\" in the settings file is ignored"]
        );
    }

    #[test]
    fn printed_settings_mask_passwords() {
        let s = load(
            None,
            &[("DATABASE_URL", "postgres://u@db/x?password=s3cret&sslmode=require")],
        )
        .unwrap();
        for shown in [s.to_string(), format!("{s:?}")] {
            assert!(!shown.contains("s3cret") && !shown.contains(":guest@"), "{shown}");
        }
        assert!(
            s.to_string()
                .contains("DATABASE_URL               = postgres://u@db/x?password=****&sslmode=require"),
            "{s}"
        );
    }

    #[test]
    fn errors_mask_passwords_whatever_the_key() {
        let cases = [
            ("AMQP_URL", "amqp://iot:S3cretPW@rabbit:5672/%2f,"),
            ("AMQP_URL", "amqp://iot:S3cretPW@rabbit:notaport/%2f"),
            ("AMQP_URL", "iot:S3cretPW@rabbit"),
            ("DATABASE_URL", "postgres://u:S3cretPW@db:notaport/x"),
            ("DATABASE_URL", "host=db password=S3cretPW"),
            ("DATABASE_URL", "postgres://u@db/x?sslpassword=S3cretPW"),
            ("RABBITMQ_HOSTNAME", "amqp://iot:S3cretPW@rabbit"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://u:S3cretPW@jaeger:4317"),
        ];
        for (key, value) in cases {
            let err = load(None, &[(key, value)]).unwrap_err();
            let text = format!("{err} {err:?}");
            assert_eq!(err.key(), key, "{text}");
            assert!(!text.contains("S3cretPW"), "{text}");
            assert!(text.contains("****"), "{text}");
        }
        let err = load(Some(r#"{"DATABASE_URL": ["postgres://u:S3cretPW@db/x"]}"#), &[]).unwrap_err();
        assert!(!err.to_string().contains("S3cretPW"), "{err}");
        assert_eq!(shown_value("CONSOLE_TOKEN", "t0ken"), "****");
    }

    #[test]
    fn a_bad_port_names_key_masked_value_and_what_is_allowed() {
        let err = load(None, &[("AMQP_URL", "amqp://iot:pw@rabbit:notaport/%2f")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid setting AMQP_URL=\"amqp://iot:****@rabbit:notaport/%2f\" (from environment): \
             expected amqp:// or amqps:// URLs such as amqp://user:password@host:5672/%2f \
             (several, of one cluster, separated by commas; a comma in a password is written %2C); \
             here the port is not a number from 1 to 65535"
        );
    }

    #[test]
    fn every_bad_value_is_reported_at_once() {
        let err = load(
            Some(r#"{"BATCH_MAX_SIZE": "abc"}"#),
            &[("RABBITMQ_HOSTNAME", "a b"), ("RUST_LOG", "x=loud")],
        )
        .unwrap_err();
        let text = err.to_string();
        let keys: Vec<&str> = text
            .lines()
            .map(|line| line.trim_start_matches("invalid setting ").split('=').next().unwrap())
            .collect();
        assert_eq!(keys, ["RABBITMQ_HOSTNAME", "BATCH_MAX_SIZE", "RUST_LOG"], "{text}");
        assert_eq!(err.key(), "RABBITMQ_HOSTNAME");
    }

    #[test]
    fn a_binary_checks_only_the_keys_it_uses() {
        let env = |key: &str| match key {
            "BATCH_MAX_SIZE" => Some("abc".to_owned()),
            "RUST_LOG" => Some("x=loud".to_owned()),
            "RABBITMQ_LOCAL_QUEUE_NAME" => Some("q".to_owned()),
            _ => None,
        };
        let (s, _, rows) = Settings::from_layers_of(None, env, BROKER_KEYS).unwrap();
        assert_eq!(
            (s.batch_max_size, s.rust_log.as_str(), s.queue.as_str()),
            (64, "info", "q")
        );
        let keys: Vec<_> = rows.iter().map(|(key, _, source)| (*key, *source)).collect();
        assert_eq!(
            keys,
            [
                ("RABBITMQ_HOSTNAME", Source::Default),
                ("RABBITMQ_LOCAL_QUEUE_NAME", Source::Environment),
                ("AMQP_URL", Source::Default),
            ]
        );
        let err = Settings::from_layers_of(None, env, &[BROKER_KEYS, &["BATCH_MAX_SIZE"]].concat()).unwrap_err();
        assert_eq!(err.key(), "BATCH_MAX_SIZE");
    }

    #[test]
    fn rust_log_is_read_from_the_environment_only() {
        let (s, warnings) = Settings::from_sources(Some(("f", r#"{"RUST_LOG": "debug"}"#)), |_| None).unwrap();
        assert_eq!(s.rust_log, "info");
        assert_eq!(
            warnings.lines(),
            ["RUST_LOG in the settings file is ignored: it is read from the environment only"]
        );
        assert_eq!(
            invalid_key(load(None, &[("RUST_LOG", "worker_iot_core=loud")])),
            "RUST_LOG"
        );
    }

    #[test]
    fn the_printed_configuration_has_one_row_per_key_in_order() {
        let shown = load(None, &[]).unwrap().to_string();
        let keys: Vec<&str> = shown
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .collect();
        assert_eq!(keys, KEYS);
        assert!(shown.contains("  EVENTS_TO_OMIT             = \n"), "{shown}");
        assert!(shown.contains("  OUTBOX_RETENTION_DAYS      = 7\n"), "{shown}");
        assert!(shown.contains("  LOG_FORMAT                 = text\n"), "{shown}");
    }
}
