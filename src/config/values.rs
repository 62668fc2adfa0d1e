//! The parsers of the settings table that are not URLs: each returns the
//! value, or a sentence saying what is allowed.

use std::collections::BTreeSet;
use std::path::PathBuf;

use tracing_subscriber::EnvFilter;
use url::Url;

use crate::envelope::check_type_name;

/// Longest main queue name: leaves room for `.retry.<delay>` within AMQP's
/// 255-byte limit on names.
const MAX_QUEUE_NAME: usize = 200;

pub(super) fn host_name(text: &str) -> Result<String, String> {
    if text.is_empty() || !text.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)) {
        return Err("a host name (letters, digits, '-', '.', '_')".into());
    }
    Ok(text.to_owned())
}

pub(super) fn queue_name(text: &str) -> Result<String, String> {
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
pub(super) fn integer<T: TryFrom<u64>>(text: &str, min: u64, max: u64) -> Result<T, String> {
    text.trim()
        .parse::<u64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .and_then(|n| T::try_from(n).ok())
        .ok_or_else(|| format!("an integer from {min} to {max}"))
}

/// Comma-separated message types; blanks around and between are ignored.
pub(super) fn message_types(text: &str) -> Result<BTreeSet<String>, String> {
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

pub(super) fn topology_path(text: &str) -> Result<PathBuf, String> {
    if text.is_empty() {
        return Err("the path of the topology file".into());
    }
    Ok(PathBuf::from(text))
}

/// Empty (no export) or an `http://` URL of an OTLP gRPC receiver. TLS is
/// not built in, so `https://` is refused instead of failing at the first
/// export; so are credentials, which an OTLP receiver takes in headers, not
/// in its URL (and which the exporter's errors would print).
pub(super) fn otlp_endpoint(text: &str) -> Result<Option<String>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let allowed = "empty (no export) or a URL such as http://jaeger:4317 (https is not built in; no user or password)";
    match Url::parse(text) {
        Ok(url)
            if url.scheme() == "http"
                && url.host_str().is_some()
                && url.username().is_empty()
                && url.password().is_none()
                && url.port() != Some(0) =>
        {
            Ok(Some(text.to_owned()))
        }
        _ => Err(allowed.into()),
    }
}

pub(super) fn service_name(text: &str) -> Result<String, String> {
    let text = text.trim();
    if text.is_empty() || text.len() > 255 || text.chars().any(char::is_control) {
        return Err("a service name of 1 to 255 printable characters".into());
    }
    Ok(text.to_owned())
}

pub(super) fn on_off(text: &str) -> Result<bool, String> {
    match text {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err("\"on\" or \"off\"".into()),
    }
}

/// `RUST_LOG`: a filter the log output can use, parsed as the telemetry
/// module parses it (`EnvFilter::try_from_default_env`), so that a bad one
/// stops start-up here rather than being replaced by `info` there.
pub(super) fn log_filter(text: &str) -> Result<String, String> {
    match EnvFilter::builder().parse(text) {
        Ok(_) => Ok(text.to_owned()),
        Err(e) => Err(format!(
            "comma-separated tracing directives such as info or worker_iot_core=debug,lapin=warn ({e})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_filters_are_parsed_as_the_log_output_parses_them() {
        for good in ["info", "", "worker_iot_core=debug,lapin=warn", "warn,sqlx::query=off"] {
            assert_eq!(log_filter(good).as_deref(), Ok(good));
        }
        for bad in ["worker_iot_core=loud", "info,=x=y", "[{"] {
            assert!(log_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn otlp_endpoints_carry_no_credentials() {
        assert_eq!(otlp_endpoint(" "), Ok(None));
        assert_eq!(
            otlp_endpoint("http://jaeger:4317"),
            Ok(Some("http://jaeger:4317".into()))
        );
        for bad in [
            "jaeger:4317",
            "https://jaeger:4317",
            "http://u:pw@jaeger:4317",
            "http://jaeger:0",
        ] {
            assert!(otlp_endpoint(bad).is_err(), "{bad}");
        }
    }
}
