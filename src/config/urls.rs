//! The URL settings, parsed whole: scheme, host, port (1 to 65535), the
//! vhost or database, and each query parameter against the list the client
//! library reads, so a typo stops start-up instead of being ignored (or, for
//! sqlx, logged with its value). Each error says what is wrong without
//! repeating the value: the caller shows it, masked.

use std::net::IpAddr;
use std::str::FromStr;

use lapin::uri::{AMQPUri, SASLMechanism};
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use url::{Host, Url};

use super::secret::SecretUrl;

const AMQP_EXAMPLE: &str = "amqp:// or amqps:// URLs such as amqp://user:password@host:5672/%2f \
     (several, of one cluster, separated by commas; a comma in a password is written %2C)";

const POSTGRES_EXAMPLE: &str = "a URL such as postgres://user:password@host:5432/database";

/// The query parameters lapin reads from an AMQP URL.
const AMQP_PARAMETERS: [&str; 5] = [
    "heartbeat",
    "connection_timeout",
    "channel_max",
    "frame_max",
    "auth_mechanism",
];

/// The query parameters sqlx reads from a PostgreSQL URL (and `options[NAME]`).
const POSTGRES_PARAMETERS: [&str; 19] = [
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
    "options[NAME]",
];

/// `AMQP_URL`: one broker URL, or several of one cluster separated by
/// commas (tried in turn).
pub(super) fn amqp_urls(text: &str) -> Result<SecretUrl, String> {
    let urls: Vec<&str> = text.split(',').map(str::trim).collect();
    for (n, url) in urls.iter().enumerate() {
        if let Err(problem) = amqp_url(url) {
            let which = if urls.len() > 1 {
                format!("URL {} of {}: ", n + 1, urls.len())
            } else {
                String::new()
            };
            return Err(format!("{AMQP_EXAMPLE}; here {which}{problem}"));
        }
    }
    Ok(SecretUrl::new(text))
}

fn amqp_url(text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err("the URL is empty".into());
    }
    let url = parse(text, &["amqp", "amqps"])?;
    match url.host() {
        None | Some(Host::Domain("")) => return Err("the host is missing".into()),
        // lapin reads the host with `Url::domain`, which is `None` for an
        // IPv6 address: it would connect to localhost instead.
        Some(Host::Ipv6(_)) => return Err("the host is an IPv6 address, which the AMQP client cannot use".into()),
        Some(_) => {}
    }
    let vhost = url.path().strip_prefix('/').unwrap_or(url.path());
    if url.path() == "/" {
        return Err("the vhost is empty (the default vhost / is written %2f)".into());
    }
    if vhost.contains('/') {
        return Err("the vhost is more than one path segment (a '/' in it is written %2f)".into());
    }
    for (key, value) in url.query_pairs() {
        let valid = match &*key {
            "heartbeat" | "channel_max" => value.parse::<u16>().is_ok(),
            "frame_max" => value.parse::<u32>().is_ok(),
            "connection_timeout" => value.parse::<u64>().is_ok(),
            "auth_mechanism" => value.parse::<SASLMechanism>().is_ok(),
            _ => return Err(unknown_parameter(&key, &AMQP_PARAMETERS)),
        };
        if !valid {
            return Err(format!("the value of the query parameter {key:?} is not valid"));
        }
    }
    // The client's own parser has the last word. Its error is not shown: it
    // may quote the URL, password included.
    AMQPUri::from_str(text).map_err(|_| "the AMQP client cannot read it".to_owned())?;
    Ok(())
}

/// `DATABASE_URL`: a PostgreSQL URL with a host (or a `host` parameter) and
/// a database name.
pub(super) fn postgres_url(text: &str) -> Result<SecretUrl, String> {
    postgres_problem(text)
        .map(|problem| Err(format!("{POSTGRES_EXAMPLE}; here {problem}")))
        .unwrap_or_else(|| Ok(SecretUrl::new(text)))
}

fn postgres_problem(text: &str) -> Option<String> {
    let url = match parse(text, &["postgres", "postgresql"]) {
        Ok(url) => url,
        Err(problem) => return Some(problem),
    };
    let has = |name: &str| url.query_pairs().any(|(key, _)| key == name);
    if url.host_str().is_none_or(str::is_empty) && !has("host") && !has("hostaddr") {
        return Some("the host is missing".into());
    }
    let database = url.path().trim_start_matches('/');
    if database.is_empty() && !has("dbname") {
        return Some("the database name is missing".into());
    }
    if database.contains('/') {
        return Some("the database name is more than one path segment".into());
    }
    for (key, value) in url.query_pairs() {
        let valid = match &*key {
            "sslmode" | "ssl-mode" => value.parse::<PgSslMode>().is_ok(),
            "port" => value.parse::<u16>().is_ok_and(|port| port > 0),
            "hostaddr" => value.parse::<IpAddr>().is_ok(),
            "statement-cache-capacity" => value.parse::<usize>().is_ok(),
            key if POSTGRES_PARAMETERS.contains(&key) => true,
            key if key.starts_with("options[") && key.ends_with(']') => true,
            _ => return Some(unknown_parameter(&key, &POSTGRES_PARAMETERS)),
        };
        if !valid {
            return Some(format!("the value of the query parameter {key:?} is not valid"));
        }
    }
    // sqlx's own parser has the last word (its error is not shown).
    PgConnectOptions::from_str(text)
        .err()
        .map(|_| "the PostgreSQL client cannot read it".to_owned())
}

/// `text` as a URL of one of `schemes`, with a port from 1 to 65535 and no
/// fragment.
fn parse(text: &str, schemes: &[&str]) -> Result<Url, String> {
    if text.contains('#') {
        return Err("it has a '#' (in a password it is written %23)".into());
    }
    let url = Url::parse(text).map_err(|e| match e {
        url::ParseError::InvalidPort if stray_at(text) => {
            "the port is not a number from 1 to 65535 (a '/' or '?' in a user name or password is written %2F or %3F)"
                .to_owned()
        }
        url::ParseError::InvalidPort => "the port is not a number from 1 to 65535".to_owned(),
        url::ParseError::RelativeUrlWithoutBase => "it is not a URL (no scheme://)".to_owned(),
        other => format!("it is not a valid URL ({other})"),
    })?;
    if !schemes.contains(&url.scheme()) {
        return Err(format!("the scheme is not {}", schemes.join(" or ")));
    }
    if url.cannot_be_a_base() {
        return Err(format!("it does not start with {}://", url.scheme()));
    }
    if url.port() == Some(0) {
        return Err("the port is not a number from 1 to 65535".into());
    }
    Ok(url)
}

/// Whether an `@` follows the end of the authority (`scheme://authority`
/// ends at the first `/` or `?`): then a `/` or `?` in the credentials cut
/// the URL short.
fn stray_at(text: &str) -> bool {
    let rest = text.split_once("://").map_or(text, |(_, rest)| rest);
    rest.find(['/', '?']).is_some_and(|end| rest[end..].contains('@'))
}

fn unknown_parameter(key: &str, known: &[&str]) -> String {
    // The key only: a misspelt `password` key would still carry a secret
    // in its value.
    let key: String = key.chars().take(40).collect();
    format!(
        "the query parameter {key:?} is not one the client reads ({})",
        known.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amqp_problem(text: &str) -> String {
        amqp_urls(text).expect_err(text)
    }

    #[test]
    fn amqp_urls_are_parsed_whole() {
        for good in [
            "amqp://guest:guest@localhost:5672/%2f",
            "amqps://node-2?heartbeat=5",
            "amqp://h",
            "amqp://u:p@127.0.0.1:5681/vhost?frame_max=8192&auth_mechanism=external",
            "amqp://u:p@a:5681/%2f, amqp://u:p@b:5682/%2f",
        ] {
            assert!(amqp_urls(good).is_ok(), "{good}: {:?}", amqp_urls(good).err());
        }
        let cases = [
            (
                "amqp://iot:pw@rabbit:notaport/%2f",
                "the port is not a number from 1 to 65535",
            ),
            ("amqp://iot:pw@rabbit:0/%2f", "the port is not a number from 1 to 65535"),
            (
                "amqp://iot:pw@rabbit:65536/%2f",
                "the port is not a number from 1 to 65535",
            ),
            ("http://rabbit/%2f", "the scheme is not amqp or amqps"),
            ("rabbit:5672", "the scheme is not amqp or amqps"),
            ("amqp:rabbit", "does not start with amqp://"),
            ("amqp://rabbit/", "the vhost is empty"),
            ("amqp://rabbit/a/b", "more than one path segment"),
            ("amqp://[::1]/%2f", "IPv6"),
            ("amqp://rabbit/%2f?heartbeat=often", "\"heartbeat\" is not valid"),
            (
                "amqp://rabbit/%2f?verify=verify_none",
                "\"verify\" is not one the client reads",
            ),
            ("amqp://u:p#w@rabbit/%2f", "'#'"),
            ("amqp://u:pw@rabbit/%2f#x", "'#'"),
            ("amqp://u:p/w@rabbit/%2f", "a '/' or '?' in a user name or password"),
            ("amqp://a/%2f,,amqp://b", "URL 2 of 3: the URL is empty"),
            ("amqp://iot:pw@rabbit:5672/%2f,", "URL 2 of 2: the URL is empty"),
        ];
        for (text, problem) in cases {
            let said = amqp_problem(text);
            assert!(said.contains(problem), "{text}: {said}");
            assert!(said.starts_with("amqp:// or amqps:// URLs"), "{said}");
            assert!(!said.contains("pw@"), "{said}");
        }
    }

    #[test]
    fn postgres_urls_are_parsed_whole() {
        for good in [
            "postgres://postgres@localhost:5432/worker_iot_core",
            "postgresql://u:pw@db/x?sslmode=verify-full&application_name=w&options[search_path]=s",
            "postgres:///x?host=/var/run/postgresql",
            "postgres://db?dbname=x&port=5433",
        ] {
            assert!(postgres_url(good).is_ok(), "{good}: {:?}", postgres_url(good).err());
        }
        let cases = [
            ("postgres://u:pw@db:notaport/x", "the port is not a number"),
            ("postgres://u:pw@db:0/x", "the port is not a number"),
            ("mysql://db/x", "the scheme is not postgres or postgresql"),
            ("host=db password=pw", "not a URL"),
            ("postgres:///x", "the host is missing"),
            ("postgres://db", "the database name is missing"),
            ("postgres://db/x/y", "more than one path segment"),
            ("postgres://db/x?sslmode=sometimes", "\"sslmode\" is not valid"),
            ("postgres://db/x?port=0", "\"port\" is not valid"),
            (
                "postgres://db/x?sslpassword=pw",
                "\"sslpassword\" is not one the client reads",
            ),
        ];
        for (text, problem) in cases {
            let said = postgres_url(text).expect_err(text);
            assert!(said.contains(problem), "{text}: {said}");
            assert!(said.starts_with(POSTGRES_EXAMPLE), "{said}");
        }
    }
}
