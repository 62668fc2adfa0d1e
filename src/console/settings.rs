//! The console's own settings, read from the environment
//! (docs/configuration.md, "The console"). A bad value stops start-up with
//! the key, the value (tokens masked) and what is allowed.

use std::fmt;
use std::net::SocketAddr;

use url::Url;

use crate::cli::UsageError;

/// Where the console listens without `CONSOLE_ADDR`.
pub const DEFAULT_ADDR: &str = "127.0.0.1:8080";
/// The shortest token accepted: a guessable token is no lock.
pub const MIN_TOKEN_LEN: usize = 16;

/// A token, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

/// The console's settings.
#[derive(Debug, Clone)]
pub struct ConsoleSettings {
    pub addr: SocketAddr,
    /// May act. Without it the console serves loopback only, and whoever
    /// reaches it is the operator `local`.
    pub token: Option<Token>,
    /// May only read.
    pub viewer_token: Option<Token>,
    /// Jaeger's UI, for the link from a message to its trace.
    pub jaeger_ui_url: Option<Url>,
}

impl ConsoleSettings {
    /// Reads the settings from the environment.
    ///
    /// # Errors
    /// A [`UsageError`] naming the key, the value and what is allowed.
    pub fn from_env() -> Result<ConsoleSettings, UsageError> {
        ConsoleSettings::from_lookup(|key| std::env::var(key).ok().filter(|v| !v.is_empty()))
    }

    /// Reads the settings through `lookup` (the environment, or a test's
    /// map).
    ///
    /// # Errors
    /// As [`ConsoleSettings::from_env`].
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<ConsoleSettings, UsageError> {
        let addr_text = lookup("CONSOLE_ADDR").unwrap_or_else(|| DEFAULT_ADDR.into());
        let addr: SocketAddr = addr_text.trim().parse().map_err(|_| {
            UsageError(format!(
                "CONSOLE_ADDR={addr_text:?}: expected an address and port such as {DEFAULT_ADDR}"
            ))
        })?;
        let token = lookup("CONSOLE_TOKEN")
            .map(|t| parse_token("CONSOLE_TOKEN", t))
            .transpose()?;
        let viewer_token = lookup("CONSOLE_VIEWER_TOKEN")
            .map(|t| parse_token("CONSOLE_VIEWER_TOKEN", t))
            .transpose()?;
        let jaeger_ui_url = lookup("JAEGER_UI_URL").map(jaeger_url).transpose()?;
        let settings = ConsoleSettings {
            addr,
            token,
            viewer_token,
            jaeger_ui_url,
        };
        settings.check()?;
        Ok(settings)
    }

    /// The rules between the keys.
    fn check(&self) -> Result<(), UsageError> {
        if self.token.is_none() && !self.addr.ip().is_loopback() {
            return Err(UsageError(format!(
                "CONSOLE_ADDR={:?} is not a loopback address and CONSOLE_TOKEN is not set: \
                 without a token the console listens on loopback only (such as {DEFAULT_ADDR}), \
                 since anyone who reaches it could retry and archive parked messages; \
                 set CONSOLE_TOKEN (at least {MIN_TOKEN_LEN} characters) to listen on {}",
                self.addr.to_string(),
                self.addr
            )));
        }
        match (&self.token, &self.viewer_token) {
            (None, Some(_)) => Err(UsageError(
                "CONSOLE_VIEWER_TOKEN=\"****\" is set but CONSOLE_TOKEN is not: \
                 a viewer token needs an operator token beside it"
                    .into(),
            )),
            (Some(operator), Some(viewer)) if operator == viewer => Err(UsageError(
                "CONSOLE_VIEWER_TOKEN=\"****\" is the same as CONSOLE_TOKEN: expected a different token, \
                 or none"
                    .into(),
            )),
            _ => Ok(()),
        }
    }

    /// Whether pages ask for a token.
    pub fn protected(&self) -> bool {
        self.token.is_some()
    }
}

fn parse_token(key: &str, text: String) -> Result<Token, UsageError> {
    let printable = text.chars().all(|c| c.is_ascii_graphic());
    if text.len() < MIN_TOKEN_LEN || !printable {
        return Err(UsageError(format!(
            "{key}=\"****\" ({} characters): expected at least {MIN_TOKEN_LEN} printable ASCII characters \
             without spaces (for example: openssl rand -hex 32)",
            text.chars().count()
        )));
    }
    Ok(Token(text))
}

fn jaeger_url(text: String) -> Result<Url, UsageError> {
    match Url::parse(text.trim()) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && !url.cannot_be_a_base() => Ok(url),
        _ => Err(UsageError(format!(
            "JAEGER_UI_URL={text:?}: expected the http:// or https:// address of Jaeger's UI, \
             such as http://localhost:16686"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn load(pairs: &[(&str, &str)]) -> Result<ConsoleSettings, String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        ConsoleSettings::from_lookup(|key| map.get(key).cloned()).map_err(|e| e.0)
    }

    #[test]
    fn defaults_to_loopback_without_a_token() {
        let settings = load(&[]).unwrap();
        assert_eq!(settings.addr.to_string(), DEFAULT_ADDR);
        assert!(!settings.protected());
    }

    #[test]
    fn a_non_loopback_address_needs_a_token() {
        let error = load(&[("CONSOLE_ADDR", "0.0.0.0:8080")]).unwrap_err();
        assert!(error.contains("CONSOLE_ADDR=\"0.0.0.0:8080\""), "{error}");
        assert!(error.contains("CONSOLE_TOKEN is not set"), "{error}");
        let settings = load(&[("CONSOLE_ADDR", "0.0.0.0:8080"), ("CONSOLE_TOKEN", "0123456789abcdef")]).unwrap();
        assert!(settings.protected());
    }

    #[test]
    fn bad_values_name_the_key_and_hide_tokens() {
        let error = load(&[("CONSOLE_ADDR", "localhost")]).unwrap_err();
        assert!(error.starts_with("CONSOLE_ADDR=\"localhost\": expected"), "{error}");
        let error = load(&[("CONSOLE_TOKEN", "short-secret")]).unwrap_err();
        assert!(error.contains("CONSOLE_TOKEN=\"****\" (12 characters)"), "{error}");
        assert!(!error.contains("short-secret"), "{error}");
        let error = load(&[("CONSOLE_VIEWER_TOKEN", "0123456789abcdef")]).unwrap_err();
        assert!(error.contains("CONSOLE_TOKEN is not"), "{error}");
        let same = "0123456789abcdef";
        let error = load(&[("CONSOLE_TOKEN", same), ("CONSOLE_VIEWER_TOKEN", same)]).unwrap_err();
        assert!(error.contains("the same as CONSOLE_TOKEN"), "{error}");
        let error = load(&[("JAEGER_UI_URL", "jaeger:16686")]).unwrap_err();
        assert!(error.starts_with("JAEGER_UI_URL=\"jaeger:16686\""), "{error}");
    }
}
