//! The parking lot (docs/reliability.md, "The parking lot"): parked
//! messages kept in PostgreSQL, one row per message, where an operator
//! finds, reads, retries and archives them.
//!
//! `Q.dlq` stays the durable door: the worker and the broker park into it,
//! and the [`Keeper`] (inside the worker) moves each message from there into
//! `parked_messages`, acking only after the commit. `requeue` and the web
//! console act on the lot through the same functions, so they keep the same
//! rules:
//!
//! * [`record`]: what the lot keeps of one delivery (pure);
//! * [`lot`]: storing a batch (the one-row-per-message rule, and a row
//!   of `parkings` per parking), counts, retention;
//! * [`query`]: a [`Filter`] in SQL, the groups of `--list`, one message of
//!   `--show`, the messages a dry run names;
//! * [`actions`]: retry (confirmed publish, *then* marked), archive and
//!   unarchive, each written to `operator_actions`;
//! * [`edit`]: fix and retry: an operator's edit, checked as the worker
//!   checks a message, published, then recorded with its diff;
//! * [`stats`]: messages parked per hour and kind, the groups that grew;
//! * [`keeper`]: taking from `Q.dlq` in batches, for the worker and for
//!   `requeue`.

pub mod actions;
pub mod edit;
pub mod keeper;
pub mod lot;
pub mod query;
pub mod record;
pub mod stats;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use actions::{Action, ActionError, Done, Request};
pub use keeper::{Keeper, take_waiting};
pub use query::{Group, Message, Shown};
pub use record::Parking;

/// The error kinds of messages the broker dead-lettered itself (from
/// `x-first-death-reason`), beside the worker's [`ErrorKind`]s, and
/// `unknown`.
///
/// [`ErrorKind`]: crate::ErrorKind
pub const BROKER_KINDS: [&str; 5] = ["expired", "rejected", "maxlen", "delivery_limit", "unknown"];

/// Every error kind a parked message can have.
pub fn error_kinds() -> Vec<&'static str> {
    crate::ErrorKind::ALL
        .iter()
        .map(|k| k.as_str())
        .chain(BROKER_KINDS)
        .collect()
}

/// Where a parked message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Waiting for an operator (the state a parking starts in).
    Parked,
    /// Published back by a retry.
    Retried,
    /// Put aside by an operator; hidden from the default views.
    Archived,
}

impl Status {
    pub const ALL: [Status; 3] = [Status::Parked, Status::Retried, Status::Archived];

    /// The spelling of the `status` column and of `--status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Parked => "parked",
            Status::Retried => "retried",
            Status::Archived => "archived",
        }
    }

    /// `parked`, `retried` or `archived`.
    pub fn parse(text: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// Which parked messages an action or a view takes. Empty lists and `None`
/// match everything; all given conditions must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Filter {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub error_kinds: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// Text in the error, the message id or the body (case-sensitive).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grep: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<String>,
    /// Last parked at or after.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    /// Last parked before.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
    /// `None`: the status the view or action works on by default
    /// ([`Filter::statuses`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

impl Filter {
    /// Whether only the status (or nothing) is given: an action on such a
    /// filter takes the whole lot, so a person is asked first.
    pub fn is_empty(&self) -> bool {
        Filter {
            status: None,
            ..self.clone()
        } == Filter::default()
    }

    /// The statuses matched: the one given, else `default`.
    pub fn statuses(&self, default: Status) -> Vec<String> {
        vec![self.status.unwrap_or(default).as_str().to_owned()]
    }
}

/// A time given by a person: RFC 3339, or a duration such as `2h`
/// meaning that long ago (`requeue --since`, the console's time filter).
///
/// # Errors
/// What is allowed, naming the text.
pub fn parse_when(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(ago) = humantime::parse_duration(text) {
        let ago = chrono::Duration::from_std(ago).map_err(|e| e.to_string())?;
        return Ok(Utc::now() - ago);
    }
    crate::envelope::parse_time(text)
        .map_err(|problem| format!("{text:?} is not a time ({problem}): expected RFC 3339 or a duration such as 2h"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_spell_as_the_column() {
        for status in Status::ALL {
            assert_eq!(Status::parse(status.as_str()), Some(status));
        }
        assert_eq!(Status::parse("PARKED"), None);
    }

    #[test]
    fn a_filter_serialises_what_was_given() {
        let filter = Filter {
            types: vec!["MEASUREMENT".into()],
            status: Some(Status::Archived),
            ..Filter::default()
        };
        assert_eq!(
            serde_json::to_string(&filter).unwrap(),
            r#"{"types":["MEASUREMENT"],"status":"archived"}"#
        );
        assert!(!filter.is_empty());
        assert!(
            Filter {
                status: Some(Status::Retried),
                ..Filter::default()
            }
            .is_empty()
        );
        assert_eq!(filter.statuses(Status::Parked), ["archived"]);
    }
}
