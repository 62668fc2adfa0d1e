//! Loading: the layers (defaults, the settings file, the environment) and
//! what came of them, [`Loaded`].

use std::collections::BTreeMap;

use serde_json::Value;

use super::{ConfigError, DEFAULT_SETTINGS_FILE, ENVIRONMENT_ONLY, KEYS, Settings, Source, shown_value};

/// The raw values, key by key, with where each came from, and the keys the
/// binary checks.
pub(super) struct Layers<'a> {
    values: BTreeMap<&'static str, (String, Source)>,
    checked: &'a [&'a str],
}

impl Layers<'_> {
    /// Parses `key`'s value, or its default when no layer sets it. A bad
    /// value of a checked key is pushed to `errors` as
    /// [`ConfigError::Invalid`] with `parse`'s sentence; a bad value of a key
    /// the binary does not use is ignored. Either way parsing goes on with
    /// the default, so every bad value is reported at once; `None` only when
    /// the default fails too.
    pub(super) fn parse<T>(
        &self,
        key: &'static str,
        default: impl Fn() -> String,
        parse: fn(&str) -> Result<T, String>,
        errors: &mut Vec<ConfigError>,
    ) -> Option<T> {
        let (value, origin) = match self.values.get(key) {
            Some((value, origin)) => (value.clone(), *origin),
            None => (default(), Source::Default),
        };
        let allowed = match parse(&value) {
            Ok(parsed) => return Some(parsed),
            Err(allowed) => allowed,
        };
        let invalid = ConfigError::Invalid {
            key,
            value: shown_value(key, &value),
            origin,
            allowed,
        };
        if origin == Source::Default {
            // Nothing to fall back on. Only a default built from an earlier
            // value can fail (AMQP_URL's from RABBITMQ_HOSTNAME).
            errors.push(invalid);
            return None;
        }
        let checked = self.checked.contains(&key);
        if checked {
            errors.push(invalid.clone());
        }
        let fallback = parse(&default()).ok();
        if fallback.is_none() && !checked {
            errors.push(invalid);
        }
        fallback
    }

    fn origin(&self, key: &str) -> Source {
        self.values.get(key).map_or(Source::Default, |(_, origin)| *origin)
    }
}

/// What loading found besides the settings, for the caller to show once
/// logging is up.
#[derive(Debug, Default)]
pub struct Warnings {
    /// Keys of the settings file that no setting has.
    pub unknown_keys: Vec<String>,
    /// Keys of the settings file that are read from the environment only.
    pub environment_only: Vec<String>,
}

impl Warnings {
    /// One sentence per warning.
    pub fn lines(&self) -> Vec<String> {
        let unknown = self
            .unknown_keys
            .iter()
            .map(|key| format!("unknown key {key:?} in the settings file is ignored"));
        let environment_only = self
            .environment_only
            .iter()
            .map(|key| format!("{key} in the settings file is ignored: it is read from the environment only"));
        unknown.chain(environment_only).collect()
    }
}

/// The settings file a binary read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsFile {
    pub path: String,
    /// [`Source::Environment`] when `SETTINGS_FILE` named it.
    pub origin: Source,
    /// Whether it was there (a missing default file is not an error).
    pub found: bool,
}

/// Everything loading produced: the settings, the warnings, and where each
/// checked value came from (for `--check-config`).
#[derive(Debug)]
pub struct Loaded {
    pub settings: Settings,
    pub warnings: Warnings,
    pub file: SettingsFile,
    /// `(key, value as printed, source)` for each checked key, in [`KEYS`]
    /// order.
    pub rows: Vec<(&'static str, String, Source)>,
}

impl Settings {
    /// Loads every setting ([`Settings::load_for`] with [`KEYS`]).
    ///
    /// # Errors
    /// A [`ConfigError`] for an unreadable file or a bad value.
    pub fn load() -> Result<(Settings, Warnings), ConfigError> {
        Settings::load_for(KEYS).map(|loaded| (loaded.settings, loaded.warnings))
    }

    /// Loads the settings from `SETTINGS_FILE` (default
    /// [`DEFAULT_SETTINGS_FILE`]; a missing default file is fine, a missing
    /// named file is not) and the process environment, checking the keys in
    /// `checked`: any other key with a bad value gets its default, since the
    /// binary does not use it.
    ///
    /// # Errors
    /// A [`ConfigError`] for an unreadable file or a bad value of a checked
    /// key (every one of them).
    pub fn load_for(checked: &[&str]) -> Result<Loaded, ConfigError> {
        // Not `var`, which reads a value that is not UTF-8 as unset.
        let env = |key: &str| std::env::var_os(key).map(|value| value.to_string_lossy().into_owned());
        let file = match env("SETTINGS_FILE") {
            Some(path) => SettingsFile {
                path,
                origin: Source::Environment,
                found: true,
            },
            None => SettingsFile {
                path: DEFAULT_SETTINGS_FILE.to_owned(),
                origin: Source::Default,
                found: true,
            },
        };
        let text = match std::fs::read_to_string(&file.path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && file.origin == Source::Default => None,
            Err(e) => {
                return Err(ConfigError::File {
                    path: file.path,
                    reason: e.to_string(),
                });
            }
        };
        let file = SettingsFile {
            found: text.is_some(),
            ..file
        };
        let source = text.as_deref().map(|text| (file.path.as_str(), text));
        let (settings, warnings, rows) = Settings::from_layers_of(source, env, checked)?;
        Ok(Loaded {
            settings,
            warnings,
            file,
            rows,
        })
    }

    /// Builds the settings from a settings file's text (with its path, for
    /// messages) and an environment lookup, checking every key. Pure, for
    /// tests and fuzzing.
    ///
    /// # Errors
    /// A [`ConfigError`] for a malformed file or a bad value.
    pub fn from_sources(
        file: Option<(&str, &str)>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(Settings, Warnings), ConfigError> {
        Settings::from_layers_of(file, env, KEYS).map(|(settings, warnings, _)| (settings, warnings))
    }

    /// [`Settings::from_sources`] checking only `checked`, with the rows of
    /// the checked keys.
    #[allow(clippy::type_complexity)]
    pub(super) fn from_layers_of(
        file: Option<(&str, &str)>,
        env: impl Fn(&str) -> Option<String>,
        checked: &[&str],
    ) -> Result<(Settings, Warnings, Vec<(&'static str, String, Source)>), ConfigError> {
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
        let layers = Layers { values, checked };
        let settings = Settings::from_layers(&layers)?;
        let rows = settings
            .rows()
            .into_iter()
            .filter(|(key, _)| checked.contains(key))
            .map(|(key, value)| (key, value, layers.origin(key)))
            .collect();
        Ok((settings, warnings, rows))
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

/// The known keys of a settings file, as text; unknown keys and keys read
/// from the environment only go to `warnings`.
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
        if ENVIRONMENT_ONLY.contains(known) {
            warnings.environment_only.push(key);
            continue;
        }
        let text = match value {
            Value::String(s) => s,
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Null => continue,
            other => {
                return Err(ConfigError::Invalid {
                    key: known,
                    value: shown_value(known, &other.to_string()),
                    origin: Source::File,
                    allowed: "a string or a number".into(),
                });
            }
        };
        values.insert(*known, (text, Source::File));
    }
    Ok(values)
}
