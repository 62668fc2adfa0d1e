//! Secrets as types: a [`SecretUrl`] (a password-bearing URL, or several
//! separated by commas) prints masked through `Debug` and `Display`, so
//! neither a log line, an error nor a `{:?}` of the settings can show it.
//! Code that needs the real value asks for it by name, with `expose()`.
//!
//! The masking functions are here too: [`mask_password`] for a URL that
//! parses, and [`mask_loosely`] for any text a user may have written (a
//! value refused at start-up), which guesses where a password could be and
//! hides more rather than less.

use std::fmt;

use url::Url;
use url::form_urlencoded;

/// What a password is replaced with when a URL is shown.
pub(super) const MASK: &str = "****";

/// Query parameters of a URL that hold a secret.
const SECRET_PARAMETERS: [&str; 2] = ["password", "sslpassword"];

/// One URL, or several separated by commas, that may carry a password
/// (`AMQP_URL`, `DATABASE_URL`). `Debug` and `Display` show it with every
/// password masked (`amqp://iot:****@rabbit:5672/%2f`).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl {
    text: String,
    masked: String,
}

impl SecretUrl {
    /// Wraps `text`; its masked form is computed once, here.
    pub fn new(text: impl Into<String>) -> SecretUrl {
        let text = text.into();
        let masked = mask_passwords(&text);
        SecretUrl { text, masked }
    }

    /// The URL with its password, for the code that connects: never print
    /// it.
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// The URL as it may be shown: passwords replaced by `****`.
    pub fn masked(&self) -> &str {
        &self.masked
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SecretUrl").field(&self.masked).finish()
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked)
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
/// first). A URL without a password comes back unchanged; one that does not
/// parse is masked by [`mask_loosely`], since its password could be
/// anywhere in it.
pub fn mask_password(url: &str) -> String {
    let Ok(mut parsed) = Url::parse(url) else {
        return mask_loosely(url);
    };
    let mut masked = false;
    if parsed.password().is_some() {
        if parsed.set_password(Some(MASK)).is_err() {
            return mask_loosely(url);
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
            Some((key, _)) if SECRET_PARAMETERS.contains(&decoded(key).as_str()) => {
                found = true;
                format!("{key}={MASK}")
            }
            _ => pair.to_owned(),
        })
        .collect();
    found.then(|| pairs.join("&"))
}

/// Masks whatever could be a password in `text`, a value a user wrote that
/// may not parse (`amqp://iot:pw@rabbit:notaport/%2f`, `iot:pw@rabbit`, a
/// libpq `host=db password=pw`):
///
/// * after each `://` (or from the start), everything between the first
///   `:` and the *last* `@` before the next `://`: a password with an
///   unescaped `@`, `/` or `,` is hidden whole, at the price of hiding a
///   port or a path that happens to precede a stray `@`;
/// * the value of every `key=value` whose key ends in `password` (any case,
///   percent-decoded), up to the next `&`, `?`, `;`, `,` or blank.
pub fn mask_loosely(text: &str) -> String {
    let userinfo_masked = text.split("://").map(mask_userinfo).collect::<Vec<_>>().join("://");
    mask_password_pairs(&userinfo_masked)
}

/// `user:****@rest` for a `user:secret@rest` (split at the last `@`).
fn mask_userinfo(piece: &str) -> String {
    let Some(at) = piece.rfind('@') else {
        return piece.to_owned();
    };
    let (head, rest) = piece.split_at(at);
    match head.split_once(':') {
        Some((user, _)) => format!("{user}:{MASK}{rest}"),
        None => piece.to_owned(),
    }
}

fn mask_password_pairs(text: &str) -> String {
    let separator = |c: char| "&?;,".contains(c) || c.is_whitespace();
    text.split_inclusive(separator)
        .map(|chunk| {
            let body = chunk.trim_end_matches(separator);
            let end = &chunk[body.len()..];
            match body.split_once('=') {
                Some((key, _)) if decoded(key).trim().to_ascii_lowercase().ends_with("password") => {
                    format!("{key}={MASK}{end}")
                }
                _ => chunk.to_owned(),
            }
        })
        .collect()
}

/// A query key as a server reads it (percent- and `+`-decoded).
fn decoded(key: &str) -> String {
    form_urlencoded::parse(key.as_bytes())
        .next()
        .map(|(key, _)| key.into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_mask_every_password() {
        let url = SecretUrl::new("amqp://iot:S3cretPW@rabbit:5672/%2f,amqp://iot:S3cretPW@b/%2f");
        for shown in [format!("{url}"), format!("{url:?}"), format!("{url:#?}")] {
            assert!(!shown.contains("S3cretPW"), "{shown}");
            assert!(
                shown.contains("amqp://iot:****@rabbit:5672/%2f,amqp://iot:****@b/%2f"),
                "{shown}"
            );
        }
        assert_eq!(
            url.expose(),
            "amqp://iot:S3cretPW@rabbit:5672/%2f,amqp://iot:S3cretPW@b/%2f"
        );
    }

    #[test]
    fn masks_passwords() {
        assert_eq!(
            mask_password("amqp://iot:s3cret@rabbitmq:5672/%2f"),
            "amqp://iot:****@rabbitmq:5672/%2f"
        );
        assert_eq!(mask_password("postgres://postgres@db/x"), "postgres://postgres@db/x");
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
    }

    #[test]
    fn an_unparsable_url_is_masked_loosely() {
        assert_eq!(
            mask_password("amqp://u:s3cret@host:99999/%2f"),
            "amqp://u:****@host:99999/%2f"
        );
        assert_eq!(
            mask_passwords("amqp://u:pw@a/%2f, amqp://u:s3cret@[b/%2f"),
            "amqp://u:****@a/%2f,amqp://u:****@[b/%2f"
        );
    }

    #[test]
    fn loose_masking_hides_more_rather_than_less() {
        let cases = [
            (
                "amqp://iot:S3cretPW@rabbit:notaport/%2f,",
                "amqp://iot:****@rabbit:notaport/%2f,",
            ),
            ("iot:S3cretPW@rabbit:5672", "iot:****@rabbit:5672"),
            // Unescaped '@', '/' and ',' in the password.
            ("amqp://u:S3c@ret/PW,x@h:1/%2f", "amqp://u:****@h:1/%2f"),
            (
                "amqp://u:S3cretPW@a/%2f,amqp://v:S3cretPW@b/%2f",
                "amqp://u:****@a/%2f,amqp://v:****@b/%2f",
            ),
            ("host=db password=S3cretPW user=u", "host=db password=**** user=u"),
            (
                "postgres://db/x?sslPassword=S3cretPW&a=b",
                "postgres://db/x?sslPassword=****&a=b",
            ),
            ("postgres://db/x?pass%77ord=S3cretPW", "postgres://db/x?pass%77ord=****"),
            ("lots", "lots"),
            ("amqp://rabbit:5672/%2f", "amqp://rabbit:5672/%2f"),
        ];
        for (text, masked) in cases {
            assert_eq!(mask_loosely(text), masked, "{text}");
        }
    }
}
