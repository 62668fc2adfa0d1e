//! Query strings and forms: repeated keys (`type=A&type=B`, checked
//! boxes) kept, then read into a [`Filter`] or a page [`Cursor`].

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use chrono::{DateTime, SecondsFormat, Utc};

use crate::parking::query::Cursor;
use crate::parking::{Filter, Status, parse_when};

/// The pairs of a query string or an urlencoded form, in order.
#[derive(Debug, Default, Clone)]
pub struct Params(Vec<(String, String)>);

impl Params {
    pub fn from_form(bytes: &[u8]) -> Params {
        Params(url::form_urlencoded::parse(bytes).into_owned().collect())
    }

    /// The first non-empty value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, v)| k == key && !v.trim().is_empty())
            .map(|(_, v)| v.trim())
    }

    /// Every non-empty value of `key`.
    pub fn all(&self, key: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, v)| k == key && !v.trim().is_empty())
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    }

    /// `text` encoded for a query string.
    pub fn encode(text: &str) -> String {
        url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
    }

    /// The filter the keys give: `status`, `kind`, `type` (repeatable),
    /// `q` (search in id, error and body), `since`, `until` (RFC 3339 or a
    /// duration ago), `fingerprint` and `id` (repeatable message ids).
    ///
    /// # Errors
    /// What is wrong with which key.
    pub fn filter(&self) -> Result<Filter, String> {
        let when = |key: &str| {
            self.get(key)
                .map(|text| parse_when(text).map_err(|e| format!("{key}: {e}")))
                .transpose()
        };
        let status = self
            .get("status")
            .map(|text| {
                Status::parse(text).ok_or_else(|| format!("status: {text:?} is not parked, retried or archived"))
            })
            .transpose()?;
        // A type field may hold several, as the form shows them.
        let types = self
            .all("type")
            .iter()
            .flat_map(|t| {
                t.split([',', ' '])
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect();
        Ok(Filter {
            types,
            error_kinds: self.all("kind"),
            fingerprint: self.get("fingerprint").map(str::to_owned),
            grep: self.get("q").map(str::to_owned),
            ids: self.all("id"),
            since: when("since")?,
            until: when("until")?,
            status,
        })
    }

    /// `after`: where the page starts.
    ///
    /// # Errors
    /// A cursor this console did not write.
    pub fn cursor(&self) -> Result<Option<Cursor>, String> {
        let Some(text) = self.get("after") else { return Ok(None) };
        let bad = || format!("after: {text:?} is not a page cursor");
        let (time, id) = text.rsplit_once('_').ok_or_else(bad)?;
        let time = DateTime::parse_from_rfc3339(time)
            .map_err(|_| bad())?
            .with_timezone(&Utc);
        Ok(Some((time, id.parse().map_err(|_| bad())?)))
    }
}

/// A filter back as query-string pairs (for links that keep the view's
/// filters, and the hidden fields of an action on them). Times go as
/// RFC 3339, so a page and its action agree on them.
pub fn filter_pairs(filter: &Filter) -> Vec<(&'static str, String)> {
    let time = |t: &DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Micros, true);
    let mut pairs = Vec::new();
    pairs.extend(filter.status.map(|s| ("status", s.as_str().to_owned())));
    pairs.extend(filter.error_kinds.iter().map(|k| ("kind", k.clone())));
    pairs.extend(filter.types.iter().map(|t| ("type", t.clone())));
    pairs.extend(filter.grep.clone().map(|q| ("q", q)));
    pairs.extend(filter.since.as_ref().map(|t| ("since", time(t))));
    pairs.extend(filter.until.as_ref().map(|t| ("until", time(t))));
    pairs.extend(filter.fingerprint.clone().map(|f| ("fingerprint", f)));
    pairs.extend(filter.ids.iter().map(|i| ("id", i.clone())));
    pairs
}

/// `pairs` as a query string (without `?`).
pub fn query_string(pairs: &[(&str, String)]) -> String {
    let mut out = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        out.append_pair(k, v);
    }
    out.finish()
}

/// A cursor as `after` spells it.
pub fn cursor_text(cursor: Cursor) -> String {
    format!("{}_{}", cursor.0.to_rfc3339_opts(SecondsFormat::Micros, true), cursor.1)
}

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Params, Self::Rejection> {
        Ok(Params::from_form(parts.uri.query().unwrap_or("").as_bytes()))
    }
}

/// The page of group `fingerprint` under `filter`'s other fields.
pub fn group_link(fingerprint: &str, filter: &Filter) -> String {
    let view = Filter {
        fingerprint: None,
        ..filter.clone()
    };
    format!(
        "/groups/{}?{}",
        Params::encode(fingerprint),
        query_string(&filter_pairs(&view))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_goes_to_pairs_and_back() {
        let params = Params::from_form(
            b"status=archived&kind=validation&type=A&type=B%2C+C&q=%3Cscript%3E&since=2026-11-30T10:00:00Z&fingerprint=f1&id=m1&id=m2&x=",
        );
        let filter = params.filter().unwrap();
        assert_eq!(filter.types, ["A", "B", "C"]);
        assert_eq!(filter.grep.as_deref(), Some("<script>"));
        assert_eq!(filter.status, Some(Status::Archived));
        let again = Params::from_form(query_string(&filter_pairs(&filter)).as_bytes())
            .filter()
            .unwrap();
        assert_eq!(again, filter);
    }

    #[test]
    fn bad_values_name_their_key() {
        let error = Params::from_form(b"status=gone").filter().unwrap_err();
        assert!(error.starts_with("status: \"gone\""), "{error}");
        let error = Params::from_form(b"since=yesterday").filter().unwrap_err();
        assert!(error.starts_with("since: "), "{error}");
        assert!(Params::from_form(b"after=nope").cursor().is_err());
    }

    #[test]
    fn cursors_round_trip() {
        let cursor = (
            DateTime::parse_from_rfc3339("2026-11-30T10:00:00.123456Z")
                .unwrap()
                .with_timezone(&Utc),
            42,
        );
        let params = Params::from_form(format!("after={}", Params::encode(&cursor_text(cursor))).as_bytes());
        assert_eq!(params.cursor().unwrap(), Some(cursor));
    }
}
