//! Settings (SPEC §6): built-in defaults, then `_storage/settings.json`
//! (path from `SETTINGS_FILE`), then environment variables of the same name.
//!
//! Every value is checked here, once, at start-up. A bad one becomes a
//! [`ConfigError`] that names the key, the value, where it came from and what
//! is allowed, so the worker refuses to start instead of misbehaving later.
//!
//! Each setting is declared once, in the `settings!` table below: its
//! field, key, default, parser and printed form. [`KEYS`], the defaults,
//! the validation and the printed configuration all come from that table,
//! so adding a setting is adding one entry.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use url::Url;
use url::form_urlencoded;

use crate::envelope::check_type_name;

/// Default settings file, relative to the working directory.
pub const DEFAULT_SETTINGS_FILE: &str = "_storage/settings.json";

/// The database when `DATABASE_URL` is not set: the local server's, created
/// at start-up if missing, so the worker starts with nothing exported.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@localhost:5432/worker_iot_core";

/// Longest main queue name: leaves room for `.retry.<delay>` within AMQP's
/// 255-byte limit on names.
const MAX_QUEUE_NAME: usize = 200;

/// What a password is replaced with when a URL is shown.
const MASK: &str = "****";

/// Query parameters of a URL that hold a secret.
const SECRET_PARAMETERS: [&str; 2] = ["password", "sslpassword"];

/// What is shown instead of a URL that does not parse.
const UNPARSABLE: &str = "(not shown: not a valid URL)";

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
        /// The worker's effective configuration.
        #[derive(Debug, Clone, PartialEq)]
        pub struct Settings {
            $($(#[$doc])* pub $field: $ty,)*
        }

        /// Every key the worker reads, from the file or the environment.
        pub const KEYS: &[&str] = &[$($key),*];

        impl Settings {
            fn from_layers(layers: &Layers) -> Result<Settings, ConfigError> {
                $(
                    let parse: fn(&str) -> Result<$ty, String> = $parse;
                    let $field = layers.parse($key, || String::from($default), parse)?;
                )*
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
        parse: |text| integer(text, 1024, 128 * 1024 * 1024),
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
    amqp_url: String = "AMQP_URL" {
        default: format!("amqp://guest:guest@{rabbitmq_hostname}:5672/%2f"),
        parse: amqp_urls,
        show: |urls| mask_passwords(urls),
    }
    database_url: String = "DATABASE_URL" {
        default: DEFAULT_DATABASE_URL,
        parse: postgres_url,
        show: |url| mask_password(url),
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

/// Where a setting's value came from, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Default,
    File,
    Environment,
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

/// A setting that stops start-up.
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
}

impl ConfigError {
    /// The key the error is about (`SETTINGS_FILE` for an unreadable file).
    pub fn key(&self) -> &'static str {
        match self {
            ConfigError::Invalid { key, .. } => key,
            ConfigError::File { .. } => "SETTINGS_FILE",
        }
    }
}

/// The raw values, key by key, with where each came from.
struct Layers {
    values: BTreeMap<&'static str, (String, Source)>,
}

impl Layers {
    /// Parses `key`'s value, or its default when no layer sets it. A bad
    /// value becomes [`ConfigError::Invalid`] with `parse`'s sentence.
    fn parse<T>(
        &self,
        key: &'static str,
        default: impl FnOnce() -> String,
        parse: fn(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let (value, origin) = match self.values.get(key) {
            Some((value, origin)) => (value.clone(), *origin),
            None => (default(), Source::Default),
        };
        parse(&value).map_err(|allowed| ConfigError::Invalid {
            key,
            value,
            origin,
            allowed,
        })
    }
}

/// What loading found besides the settings: keys it does not know, which
/// the caller logs once logging is up.
#[derive(Debug, Default)]
pub struct Warnings {
    pub unknown_keys: Vec<String>,
}

impl Settings {
    /// Loads the settings from `SETTINGS_FILE` (default
    /// [`DEFAULT_SETTINGS_FILE`]; a missing default file is fine, a missing
    /// named file is not) and the process environment.
    ///
    /// # Errors
    /// A [`ConfigError`] for an unreadable file or a bad value.
    pub fn load() -> Result<(Settings, Warnings), ConfigError> {
        let env = |key: &str| std::env::var(key).ok();
        let (path, required) = match env("SETTINGS_FILE") {
            Some(path) => (path, true),
            None => (DEFAULT_SETTINGS_FILE.to_owned(), false),
        };
        let file = match std::fs::read_to_string(&path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => None,
            Err(e) => {
                return Err(ConfigError::File {
                    path,
                    reason: e.to_string(),
                });
            }
        };
        Settings::from_sources(file.as_deref().map(|text| (path.as_str(), text)), env)
    }

    /// Builds the settings from a settings file's text (with its path, for
    /// messages) and an environment lookup. Pure, for tests and fuzzing.
    ///
    /// # Errors
    /// A [`ConfigError`] for a malformed file or a bad value.
    pub fn from_sources(
        file: Option<(&str, &str)>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(Settings, Warnings), ConfigError> {
        let mut warnings = Warnings::default();
        let mut values = match file {
            Some((path, text)) => file_values(path, text, &mut warnings)?,
            None => BTreeMap::new(),
        };
        for key in KEYS {
            if let Some(value) = env(key) {
                values.insert(*key, (value, Source::Environment));
            }
        }
        let layers = Layers { values };
        Ok((Settings::from_layers(&layers)?, warnings))
    }

    /// The size of the PostgreSQL pool: one connection per message in
    /// flight plus one for bookkeeping (redelivery counts) and one for the
    /// outbox relay, up to
    /// `DATABASE_MAX_CONNECTIONS`. A smaller pool makes deliveries wait for
    /// a connection, and a wait past the acquire timeout counts as a
    /// transient failure.
    pub fn pool_size(&self) -> u32 {
        (u32::from(self.prefetch_count) + 2).min(self.database_max_connections)
    }
}

/// The known keys of a settings file, as text; unknown keys go to
/// `warnings`.
fn file_values(
    path: &str,
    text: &str,
    warnings: &mut Warnings,
) -> Result<BTreeMap<&'static str, (String, Source)>, ConfigError> {
    let object = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(object)) => object,
        Ok(_) => {
            return Err(ConfigError::File {
                path: path.to_owned(),
                reason: "expected a JSON object of settings".into(),
            });
        }
        Err(e) => {
            return Err(ConfigError::File {
                path: path.to_owned(),
                reason: format!("not valid JSON: {e}"),
            });
        }
    };
    let mut values = BTreeMap::new();
    for (key, value) in object {
        let Some(known) = KEYS.iter().find(|k| **k == key) else {
            warnings.unknown_keys.push(key);
            continue;
        };
        let text = match value {
            Value::String(s) => s,
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Null => continue,
            other => {
                return Err(ConfigError::Invalid {
                    key: known,
                    value: other.to_string(),
                    origin: Source::File,
                    allowed: "a string or a number".into(),
                });
            }
        };
        values.insert(*known, (text, Source::File));
    }
    Ok(values)
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

// The parsers of the table above: each returns the value, or what is allowed.

fn host_name(text: &str) -> Result<String, String> {
    if text.is_empty() || !text.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)) {
        return Err("a host name (letters, digits, '-', '.', '_')".into());
    }
    Ok(text.to_owned())
}

fn queue_name(text: &str) -> Result<String, String> {
    if text.is_empty()
        || text.len() > MAX_QUEUE_NAME
        || text.starts_with("amq.")
        || !text.chars().all(|c| c.is_ascii_alphanumeric() || "-._:".contains(c))
    {
        return Err(format!(
            "1 to {MAX_QUEUE_NAME} characters of letters, digits, '-', '.', '_', ':', not starting with \"amq.\""
        ));
    }
    Ok(text.to_owned())
}

/// A whole number from `min` to `max` (surrounding spaces allowed).
fn integer<T: TryFrom<u64>>(text: &str, min: u64, max: u64) -> Result<T, String> {
    text.trim()
        .parse::<u64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .and_then(|n| T::try_from(n).ok())
        .ok_or_else(|| format!("an integer from {min} to {max}"))
}

/// Comma-separated message types; blanks around and between are ignored.
fn message_types(text: &str) -> Result<BTreeSet<String>, String> {
    let mut types = BTreeSet::new();
    for name in text.split(',').map(str::trim).filter(|name| !name.is_empty()) {
        if check_type_name(name).is_err() {
            return Err(format!(
                "comma-separated message types matching [A-Z][A-Z0-9_]{{0,63}}; {name:?} is not one"
            ));
        }
        types.insert(name.to_owned());
    }
    Ok(types)
}

fn topology_path(text: &str) -> Result<PathBuf, String> {
    if text.is_empty() {
        return Err("the path of the topology file".into());
    }
    Ok(PathBuf::from(text))
}

/// One broker URL, or several of one cluster separated by commas (tried in
/// turn). The value is kept as given.
fn amqp_urls(text: &str) -> Result<String, String> {
    let valid = |url: &str| url.starts_with("amqp://") || url.starts_with("amqps://");
    if !text.split(',').map(str::trim).all(valid) {
        return Err(
            "a URL such as amqp://user:password@host:5672/%2f, or several of one cluster separated by commas".into(),
        );
    }
    Ok(text.to_owned())
}

fn postgres_url(text: &str) -> Result<String, String> {
    if !(text.starts_with("postgres://") || text.starts_with("postgresql://")) {
        return Err("a URL such as postgres://user:password@host:5432/database".into());
    }
    Ok(text.to_owned())
}

/// Empty (no export) or an `http://` URL of an OTLP gRPC receiver. TLS is
/// not built in, so `https://` is refused instead of failing at the first
/// export.
fn otlp_endpoint(text: &str) -> Result<Option<String>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    match Url::parse(text) {
        Ok(url) if url.scheme() == "http" && url.host_str().is_some() => Ok(Some(text.to_owned())),
        _ => Err("empty (no export) or a URL such as http://jaeger:4317 (https is not built in)".into()),
    }
}

fn service_name(text: &str) -> Result<String, String> {
    let text = text.trim();
    if text.is_empty() || text.len() > 255 || text.chars().any(char::is_control) {
        return Err("a service name of 1 to 255 printable characters".into());
    }
    Ok(text.to_owned())
}

fn on_off(text: &str) -> Result<bool, String> {
    match text {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err("\"on\" or \"off\"".into()),
    }
}

/// [`mask_password`] for each URL of a comma-separated list.
pub fn mask_passwords(urls: &str) -> String {
    urls.split(',')
        .map(|url| mask_password(url.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

/// Replaces the password of a URL with `****`: the one in
/// `scheme://user:password@host` and the value of any `password=` or
/// `sslpassword=` query parameter (libpq's two secrets; sqlx reads the
/// first). A URL without a password comes back
/// unchanged; one that does not parse is not shown at all, since its
/// password could be anywhere in it.
pub fn mask_password(url: &str) -> String {
    let Ok(mut parsed) = Url::parse(url) else {
        return UNPARSABLE.to_owned();
    };
    let mut masked = false;
    if parsed.password().is_some() {
        if parsed.set_password(Some(MASK)).is_err() {
            return UNPARSABLE.to_owned();
        }
        masked = true;
    }
    if let Some(query) = parsed.query().and_then(mask_query_password) {
        parsed.set_query(Some(&query));
        masked = true;
    }
    if masked { parsed.into() } else { url.to_owned() }
}

/// `query` with the value of each `password` and `sslpassword` parameter
/// replaced by `****` and every other parameter untouched; `None` when it
/// has neither.
fn mask_query_password(query: &str) -> Option<String> {
    let mut found = false;
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            // The key as a server reads it: `pass%77ord` is `password` too.
            Some((key, _)) if form_urlencoded::parse(key.as_bytes()).any(|(k, _)| SECRET_PARAMETERS.contains(&&*k)) => {
                found = true;
                format!("{key}={MASK}")
            }
            _ => pair.to_owned(),
        })
        .collect();
    found.then(|| pairs.join("&"))
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn defaults() {
        let s = load(None, &[]).unwrap();
        assert_eq!(s.queue, "local_iot_core");
        assert_eq!(s.amqp_url, "amqp://guest:guest@localhost:5672/%2f");
        assert_eq!(s.database_url, DEFAULT_DATABASE_URL);
        assert_eq!(s.max_message_bytes, 262_144);
        assert_eq!(s.shutdown_grace, Duration::from_secs(10));
        assert_eq!(s.metrics_addr.port(), 9464);
        assert!(s.events_to_omit.is_empty());
        assert_eq!(s.log_format, LogFormat::Text);
        assert!(s.outbox_relay);
        assert_eq!((s.prefetch_count, s.batch_max_size, s.pool_size()), (256, 64, 16));
        assert_eq!(s.batch_max_wait, Duration::from_millis(5));
        assert_eq!(s.outbox_retention, Duration::from_secs(7 * 24 * 3600));
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
        assert_eq!(s.amqp_url, "amqp://guest:guest@broker:5672/%2f");
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
        assert_eq!(
            invalid_key(load(Some(r#"{"EVENTS_TO_OMIT": ["A"]}"#), &[])),
            "EVENTS_TO_OMIT"
        );
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
    }

    #[test]
    fn masks_passwords() {
        assert_eq!(
            mask_password("amqp://iot:s3cret@rabbitmq:5672/%2f"),
            "amqp://iot:****@rabbitmq:5672/%2f"
        );
        assert_eq!(mask_password("postgres://postgres@db/x"), "postgres://postgres@db/x");
        let s = load(None, &[("DATABASE_URL", "postgres://u:pw@db/x")]).unwrap();
        let shown = s.to_string();
        assert!(!shown.contains("pw@") && !shown.contains(":guest@"), "{shown}");
    }

    #[test]
    fn masks_password_query_parameters() {
        assert_eq!(
            mask_password("postgres://u@db:5432/x?sslmode=disable&password=s3cret&application_name=w"),
            "postgres://u@db:5432/x?sslmode=disable&password=****&application_name=w"
        );
        assert_eq!(
            mask_password("postgresql://u:one@db/x?password=two"),
            "postgresql://u:****@db/x?password=****"
        );
        // Encoded keys name the same parameter; other parameters keep their bytes.
        assert_eq!(
            mask_password("postgres://db/x?pass%77ord=s3cret&options=-c%20a%3Db"),
            "postgres://db/x?pass%77ord=****&options=-c%20a%3Db"
        );
        assert_eq!(
            mask_password("postgres://db/x?sslpassword=key&password_file=f&passwords=p"),
            "postgres://db/x?sslpassword=****&password_file=f&passwords=p"
        );
        let s = load(None, &[("DATABASE_URL", "postgres://u@db/x?password=s3cret")]).unwrap();
        let shown = s.to_string();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("DATABASE_URL               = postgres://u@db/x?password=****"),
            "{shown}"
        );
    }

    #[test]
    fn an_unparsable_url_is_not_shown() {
        assert_eq!(mask_password("amqp://u:s3cret@host:99999/%2f"), UNPARSABLE);
        assert_eq!(
            mask_passwords("amqp://u:pw@a/%2f, amqp://u:s3cret@[b/%2f"),
            format!("amqp://u:****@a/%2f,{UNPARSABLE}")
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
