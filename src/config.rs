//! Settings (SPEC §6): built-in defaults, then `_storage/settings.json`
//! (path from `SETTINGS_FILE`), then environment variables of the same name.
//!
//! Every value is checked here, once, at start-up. A bad one becomes a
//! [`ConfigError`] that names the key, the value, where it came from and what
//! is allowed, so the worker refuses to start instead of misbehaving later.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::envelope::check_type_name;

/// Default settings file, relative to the working directory.
pub const DEFAULT_SETTINGS_FILE: &str = "_storage/settings.json";

/// Every key the worker reads, from the file or the environment.
pub const KEYS: &[&str] = &[
    "RABBITMQ_HOSTNAME",
    "RABBITMQ_LOCAL_QUEUE_NAME",
    "RABBITMQ_PREFETCH_COUNT",
    "EVENTS_TO_OMIT",
    "TOPOLOGY_FILE",
    "MAX_MESSAGE_BYTES",
    "SHUTDOWN_GRACE_MS",
    "METRICS_ADDR",
    "DATABASE_MAX_CONNECTIONS",
    "OUTBOX_RELAY",
    "OUTBOX_RETENTION_DAYS",
    "AMQP_URL",
    "DATABASE_URL",
    "LOG_FORMAT",
];

/// The database when `DATABASE_URL` is not set: the local server's, created
/// at start-up if missing, so the worker starts with nothing exported.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@localhost:5432/worker_iot_core";

/// Longest main queue name: leaves room for `.retry.<delay>` within AMQP's
/// 255-byte limit on names.
const MAX_QUEUE_NAME: usize = 200;

/// The worker's effective configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub rabbitmq_hostname: String,
    /// The main queue `Q`.
    pub queue: String,
    pub prefetch_count: u16,
    pub events_to_omit: BTreeSet<String>,
    pub topology_file: PathBuf,
    pub max_message_bytes: usize,
    pub shutdown_grace: Duration,
    pub metrics_addr: SocketAddr,
    /// Upper bound of the PostgreSQL pool; the pool is one connection per
    /// message in flight (the prefetch count) plus one for bookkeeping,
    /// capped by this.
    pub database_max_connections: u32,
    /// Whether this worker runs the outbox relay.
    pub outbox_relay: bool,
    /// How long published outbox rows are kept.
    pub outbox_retention: Duration,
    pub amqp_url: String,
    pub database_url: String,
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
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
    fn get(&self, key: &'static str) -> Option<(&str, Source)> {
        self.values.get(key).map(|(v, s)| (v.as_str(), *s))
    }

    fn invalid(&self, key: &'static str, allowed: impl Into<String>) -> ConfigError {
        let (value, source) = self.get(key).unwrap_or(("", Source::Default));
        ConfigError::Invalid {
            key,
            value: value.to_owned(),
            origin: source,
            allowed: allowed.into(),
        }
    }

    fn string(&self, key: &'static str, default: &str) -> String {
        self.get(key).map_or(default, |(v, _)| v).to_owned()
    }

    fn integer<T: TryFrom<u64> + Copy>(
        &self,
        key: &'static str,
        default: T,
        min: u64,
        max: u64,
    ) -> Result<T, ConfigError> {
        let Some((text, _)) = self.get(key) else {
            return Ok(default);
        };
        let allowed = || format!("an integer from {min} to {max}");
        let n: u64 = text.trim().parse().map_err(|_| self.invalid(key, allowed()))?;
        if !(min..=max).contains(&n) {
            return Err(self.invalid(key, allowed()));
        }
        T::try_from(n).map_err(|_| self.invalid(key, allowed()))
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
        let mut values = BTreeMap::new();
        if let Some((path, text)) = file {
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
        }
        for key in KEYS {
            if let Some(value) = env(key) {
                values.insert(*key, (value, Source::Environment));
            }
        }
        let layers = Layers { values };
        Ok((Settings::from_layers(&layers)?, warnings))
    }

    fn from_layers(layers: &Layers) -> Result<Settings, ConfigError> {
        let rabbitmq_hostname = layers.string("RABBITMQ_HOSTNAME", "localhost");
        if rabbitmq_hostname.is_empty()
            || !rabbitmq_hostname
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        {
            return Err(layers.invalid("RABBITMQ_HOSTNAME", "a host name (letters, digits, '-', '.', '_')"));
        }

        let queue = layers.string("RABBITMQ_LOCAL_QUEUE_NAME", "local_iot_core");
        if queue.is_empty()
            || queue.len() > MAX_QUEUE_NAME
            || queue.starts_with("amq.")
            || !queue.chars().all(|c| c.is_ascii_alphanumeric() || "-._:".contains(c))
        {
            return Err(layers.invalid(
                "RABBITMQ_LOCAL_QUEUE_NAME",
                format!("1 to {MAX_QUEUE_NAME} characters of letters, digits, '-', '.', '_', ':', not starting with \"amq.\""),
            ));
        }

        let mut events_to_omit = BTreeSet::new();
        for name in layers.string("EVENTS_TO_OMIT", "").split(',') {
            let name = name.trim();
            if name.is_empty() {
                continue;
            }
            if check_type_name(name).is_err() {
                return Err(layers.invalid(
                    "EVENTS_TO_OMIT",
                    format!("comma-separated message types matching [A-Z][A-Z0-9_]{{0,63}}; {name:?} is not one"),
                ));
            }
            events_to_omit.insert(name.to_owned());
        }

        let topology_file = PathBuf::from(layers.string("TOPOLOGY_FILE", "topology/topology.toml"));
        if topology_file.as_os_str().is_empty() {
            return Err(layers.invalid("TOPOLOGY_FILE", "the path of the topology file"));
        }

        let metrics_addr = layers.string("METRICS_ADDR", "0.0.0.0:9464");
        let metrics_addr = metrics_addr
            .parse()
            .map_err(|_| layers.invalid("METRICS_ADDR", "an address such as 0.0.0.0:9464"))?;

        let amqp_url = match layers.get("AMQP_URL") {
            Some((url, _)) => url.to_owned(),
            None => format!("amqp://guest:guest@{rabbitmq_hostname}:5672/%2f"),
        };
        // Several brokers of one cluster: comma-separated URLs, tried in turn.
        let urls: Vec<&str> = amqp_url.split(',').map(str::trim).collect();
        if urls
            .iter()
            .any(|u| !(u.starts_with("amqp://") || u.starts_with("amqps://")))
        {
            return Err(layers.invalid(
                "AMQP_URL",
                "a URL such as amqp://user:password@host:5672/%2f, or several of one cluster separated by commas",
            ));
        }

        let database_url = layers.string("DATABASE_URL", DEFAULT_DATABASE_URL);
        if !(database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")) {
            return Err(layers.invalid(
                "DATABASE_URL",
                "a URL such as postgres://user:password@host:5432/database",
            ));
        }

        let outbox_relay = match layers.string("OUTBOX_RELAY", "on").as_str() {
            "on" => true,
            "off" => false,
            _ => return Err(layers.invalid("OUTBOX_RELAY", "\"on\" or \"off\"")),
        };
        let retention_days: u64 = layers.integer("OUTBOX_RETENTION_DAYS", 7, 1, 3650)?;

        let log_format = match layers.string("LOG_FORMAT", "text").as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            _ => return Err(layers.invalid("LOG_FORMAT", "\"text\" or \"json\"")),
        };

        Ok(Settings {
            rabbitmq_hostname,
            queue,
            prefetch_count: layers.integer("RABBITMQ_PREFETCH_COUNT", 32, 1, 1000)?,
            events_to_omit,
            topology_file,
            max_message_bytes: layers.integer("MAX_MESSAGE_BYTES", 262_144, 1024, 128 * 1024 * 1024)?,
            shutdown_grace: Duration::from_millis(layers.integer("SHUTDOWN_GRACE_MS", 10_000, 0, 600_000)?),
            metrics_addr,
            database_max_connections: layers.integer("DATABASE_MAX_CONNECTIONS", 64, 1, 1000)?,
            outbox_relay,
            outbox_retention: Duration::from_secs(retention_days * 24 * 3600),
            amqp_url,
            database_url,
            log_format,
        })
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

impl fmt::Display for Settings {
    /// The effective configuration, one `KEY = value` per line, with
    /// passwords in URLs masked.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let omit: Vec<&str> = self.events_to_omit.iter().map(String::as_str).collect();
        let rows: [(&str, String); 14] = [
            ("RABBITMQ_HOSTNAME", self.rabbitmq_hostname.clone()),
            ("RABBITMQ_LOCAL_QUEUE_NAME", self.queue.clone()),
            ("RABBITMQ_PREFETCH_COUNT", self.prefetch_count.to_string()),
            ("EVENTS_TO_OMIT", omit.join(",")),
            ("TOPOLOGY_FILE", self.topology_file.display().to_string()),
            ("MAX_MESSAGE_BYTES", self.max_message_bytes.to_string()),
            ("SHUTDOWN_GRACE_MS", self.shutdown_grace.as_millis().to_string()),
            ("METRICS_ADDR", self.metrics_addr.to_string()),
            ("DATABASE_MAX_CONNECTIONS", self.database_max_connections.to_string()),
            ("OUTBOX_RELAY", if self.outbox_relay { "on" } else { "off" }.into()),
            (
                "OUTBOX_RETENTION_DAYS",
                (self.outbox_retention.as_secs() / 86_400).to_string(),
            ),
            ("AMQP_URL", mask_passwords(&self.amqp_url)),
            ("DATABASE_URL", mask_password(&self.database_url)),
            ("LOG_FORMAT", format!("{:?}", self.log_format).to_lowercase()),
        ];
        for (key, value) in rows {
            writeln!(f, "  {key:<26} = {value}")?;
        }
        Ok(())
    }
}

/// [`mask_password`] for each URL of a comma-separated list.
pub fn mask_passwords(urls: &str) -> String {
    urls.split(',')
        .map(|url| mask_password(url.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

/// Replaces the password of `scheme://user:password@host` with `****`.
pub fn mask_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) => format!("{}{}:****{}", &url[..scheme_end], &rest[..colon], &rest[at..]),
        None => url.to_owned(),
    }
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
        assert_eq!(s.outbox_retention, Duration::from_secs(7 * 24 * 3600));
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
}
