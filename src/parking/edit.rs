//! Fix and retry (docs/console.md, "Fix and retry"): an operator edits a
//! parked message's body, or sets one header that is not `iot-*`, and
//! retries it, from the console or `requeue --edit`.
//!
//! The edit is checked the way the worker will check the copy: the
//! envelope decoder, then the type's own validation (`prepare`, with
//! nothing written). A refused edit sends nothing and records nothing; the
//! operator reads the worker's own error. An accepted edit is published to
//! the target with a confirm, *then* recorded, in one transaction holding
//! the row's lock: the `edit` action (its diff and both bodies in
//! `message_edits`) and the row marked `retried`. The row keeps the
//! original bytes.

use chrono::Utc;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};

use super::actions::requeued_properties;
use super::record::decode_properties;
use crate::broker::{Outgoing, PublishError, Publisher};
use crate::envelope::{self, IdSource};

/// Longest header name AMQP carries (a short string).
const MAX_HEADER_NAME: usize = 255;
/// How long the diff of two bodies may take to align (a large body with
/// many changes); past it, the diff is coarser, never wrong.
const DIFF_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(100);

/// What the operator changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    /// The new body (the whole of it).
    pub body: Vec<u8>,
    /// One header to set, not `iot-*`: name and value (a string).
    pub header: Option<(String, String)>,
}

/// Why a fix was not sent, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    /// The edit breaks a rule, or the worker would refuse it: nothing was
    /// sent.
    #[error("{0}")]
    Refused(String),
    #[error("no message {0} in the lot")]
    NotFound(i64),
    #[error("PostgreSQL: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{0}; the message stays parked")]
    Publish(#[from] PublishError),
}

/// Who fixes which message, and where the fixed copy goes.
#[derive(Debug, Clone)]
pub struct Fix<'a> {
    /// The main queue `Q` whose lot it is.
    pub queue: &'a str,
    /// The row's id.
    pub id: i64,
    pub edit: &'a Edit,
    /// The queue the copy is published to.
    pub target: &'a str,
    pub actor: &'a str,
    /// `MAX_MESSAGE_BYTES`, as the worker decodes.
    pub max_bytes: usize,
}

/// The stored row a fix starts from.
#[derive(sqlx::FromRow)]
struct Row {
    message_id: String,
    status: String,
    body: Vec<u8>,
    amqp_properties: Vec<u8>,
}

/// Checks `fix`, publishes the fixed copy with a confirm, then records the
/// edit and marks the row `retried`; returns the action's id.
///
/// # Errors
/// [`EditError::Refused`] with the worker's own error (nothing sent); the
/// others as they say (nothing recorded).
pub async fn fix_and_retry(pool: &PgPool, publisher: &Publisher, fix: &Fix<'_>) -> Result<i64, EditError> {
    let mut tx = pool.begin().await?;
    let row = lock(&mut tx, fix.queue, fix.id)
        .await?
        .ok_or(EditError::NotFound(fix.id))?;
    if row.status == "retried" {
        return Err(EditError::Refused(format!(
            "message {} was already retried: only a parked or archived message is fixed",
            row.message_id
        )));
    }
    let stored = decode_properties(&row.amqp_properties)
        .ok_or_else(|| EditError::Refused("the stored properties cannot be read".into()))?;
    let properties = check(&row.message_id, fix.edit, &stored, fix.max_bytes).map_err(EditError::Refused)?;
    let copy = Outgoing {
        exchange: "",
        routing_key: fix.target,
        body: &fix.edit.body,
        properties: requeued_properties(&properties, false),
    };
    if let Some(Err(e)) = publisher.publish_all(&[copy]).await.into_iter().next() {
        return Err(EditError::Publish(e));
    }
    let diff = body_diff(&row.body, &fix.edit.body);
    let action_id = record(&mut tx, fix, &row, &diff).await?;
    tx.commit().await?;
    Ok(action_id)
}

/// The properties of the edited message when the worker would take it:
/// the header set (if any), then the envelope decoded and the type's
/// validation passed, with the message id unchanged.
///
/// # Errors
/// The rule broken, or the worker's own error (its kind first).
pub fn check(
    message_id: &str,
    edit: &Edit,
    stored: &BasicProperties,
    max_bytes: usize,
) -> Result<BasicProperties, String> {
    let properties = match &edit.header {
        Some((name, value)) => with_header(stored, name, value)?,
        None => stored.clone(),
    };
    let amqp_id = properties.message_id().as_ref().map(|id| id.as_str().to_owned());
    let message =
        envelope::decode(&edit.body, amqp_id.as_deref(), Utc::now(), max_bytes).map_err(|e| format!("decode: {e}"))?;
    if message.id != message_id && message.id_source != IdSource::BodyHash {
        return Err(format!(
            "the edit changes the message id from {message_id:?} to {:?}: fix the message, keep its id",
            message.id
        ));
    }
    // The shipped command topics: a device id that cannot be one topic
    // level is refused whatever the template.
    let commands = crate::device_route::CommandTopics::default();
    let context = crate::handlers::Context { commands: &commands };
    crate::handlers::prepare(message, &context, &tracing::Span::none())
        .map_err(|failure| format!("{}: {failure}", failure.kind().as_str()))?;
    Ok(properties)
}

/// `stored` with header `name` set to `value` (a long string).
fn with_header(stored: &BasicProperties, name: &str, value: &str) -> Result<BasicProperties, String> {
    let name = name.trim();
    if name.is_empty() || name.len() > MAX_HEADER_NAME || name.chars().any(char::is_control) {
        return Err(format!(
            "header name {name:?}: 1 to {MAX_HEADER_NAME} bytes, no control characters"
        ));
    }
    if name.to_ascii_lowercase().starts_with("iot-") {
        return Err(format!(
            "header {name:?}: the iot-* headers are the worker's own and cannot be edited"
        ));
    }
    let mut map = stored.headers().as_ref().map(|h| h.inner().clone()).unwrap_or_default();
    map.insert(ShortString::from(name), AMQPValue::LongString(LongString::from(value)));
    Ok(stored.clone().with_headers(FieldTable::from(map)))
}

/// Locks row `id` of `queue`'s lot for the fix.
async fn lock(tx: &mut PgConnection, queue: &str, id: i64) -> Result<Option<Row>, sqlx::Error> {
    sqlx::query_as(
        "SELECT message_id, status, body, amqp_properties FROM parked_messages
         WHERE queue = $1 AND id = $2 FOR UPDATE",
    )
    .bind(queue)
    .bind(id)
    .fetch_optional(tx)
    .await
}

/// Writes the `edit` action (one message, to the target), its edit and
/// its link to the row, and marks the row `retried`, in one statement.
async fn record(tx: &mut PgConnection, fix: &Fix<'_>, row: &Row, diff: &str) -> Result<i64, sqlx::Error> {
    let filter: Value = json!({ "ids": [row.message_id] });
    let (header, value) = fix
        .edit
        .header
        .as_ref()
        .map_or((None, None), |(n, v)| (Some(n.trim()), Some(v.as_str())));
    sqlx::query_scalar(
        "WITH action AS (
             INSERT INTO operator_actions (actor, action, filter, messages, queue, target)
             VALUES ($1, 'edit', $2, 1, $3, $4) RETURNING id),
         edit AS (
             INSERT INTO message_edits (action_id, parked_id, original_body, edited_body, header,
                                        header_value, diff)
             SELECT id, $5, $6, $7, $8, $9, $10 FROM action),
         linked AS (
             INSERT INTO operator_action_messages (parked_id, action_id) SELECT $5, id FROM action),
         marked AS (
             UPDATE parked_messages SET status = 'retried', status_changed_at = now(),
                                        status_changed_by = $1
             WHERE id = $5)
         SELECT id FROM action",
    )
    .bind(fix.actor)
    .bind(sqlx::types::Json(filter))
    .bind(fix.queue)
    .bind(fix.target)
    .bind(fix.id)
    .bind(&row.body)
    .bind(&fix.edit.body)
    .bind(header)
    .bind(value)
    .bind(diff)
    .fetch_one(tx)
    .await
}

/// The text a diff compares: pretty-printed JSON when it is JSON (so one
/// changed field is one changed line), else the text, else hex.
fn diff_text(body: &[u8]) -> String {
    match serde_json::from_slice::<Value>(body) {
        Ok(json) => serde_json::to_string_pretty(&json).unwrap_or_default(),
        Err(_) => match std::str::from_utf8(body) {
            Ok(text) => text.to_owned(),
            Err(_) => hex::encode(body),
        },
    }
}

/// A line diff of two bodies: each line prefixed `  ` (kept), `- ` (gone)
/// or `+ ` (new), a removed line before the line that replaces it.
pub fn body_diff(before: &[u8], after: &[u8]) -> String {
    let (old, new) = (diff_text(before), diff_text(after));
    line_diff(&old, &new)
}

fn line_diff(old: &str, new: &str) -> String {
    // Every line ends in a newline, so a last line compares like the others.
    let (old, new) = (format!("{old}\n"), format!("{new}\n"));
    let diff = similar::TextDiff::configure()
        .timeout(DIFF_TIMEOUT)
        .diff_lines(old.as_str(), new.as_str());
    let lines: Vec<String> = diff
        .iter_all_changes()
        .map(|change| {
            let sign = match change.tag() {
                similar::ChangeTag::Equal => ' ',
                similar::ChangeTag::Delete => '-',
                similar::ChangeTag::Insert => '+',
            };
            format!("{sign} {}", change.value().trim_end_matches('\n'))
        })
        .collect();
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measurement(value: Value) -> Vec<u8> {
        json!({"type": "MEASUREMENT", "id": "m-1", "data": {"device_id": "d1", "sensor": "t", "value": value}})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn the_worker_s_own_check_decides() {
        let stored = BasicProperties::default().with_message_id("m-1".into());
        let edit = |body: Vec<u8>| Edit { body, header: None };
        assert!(check("m-1", &edit(measurement(json!(21.5))), &stored, 4096).is_ok());
        let still_bad = check("m-1", &edit(measurement(json!("21.5"))), &stored, 4096).unwrap_err();
        assert!(still_bad.starts_with("validation: "), "{still_bad}");
        assert!(still_bad.contains("data.value must be a number"), "{still_bad}");
        let broken = check("m-1", &edit(b"{not json".to_vec()), &stored, 4096).unwrap_err();
        assert!(broken.starts_with("decode: "), "{broken}");
        let other = json!({"type": "MEASUREMENT", "id": "m-2", "data": {}}).to_string();
        let renamed = check("m-1", &edit(other.into_bytes()), &stored, 4096).unwrap_err();
        assert!(renamed.contains("changes the message id"), "{renamed}");
    }

    #[test]
    fn one_header_may_be_set_but_not_the_worker_s_own() {
        let stored = BasicProperties::default();
        let with = |name: &str| Edit {
            body: measurement(json!(1)),
            header: Some((name.into(), "v".into())),
        };
        let set = check("m-1", &with("x-tenant"), &stored, 4096).unwrap();
        let h = set.headers().as_ref();
        assert_eq!(crate::headers::read_string(h, "x-tenant").as_deref(), Some("v"));
        assert!(
            check("m-1", &with("IOT-error"), &stored, 4096)
                .unwrap_err()
                .contains("iot-*")
        );
        assert!(check("m-1", &with(" "), &stored, 4096).is_err());
    }

    #[test]
    fn a_diff_shows_the_changed_line_only() {
        let diff = body_diff(&measurement(json!("21.5")), &measurement(json!(21.5)));
        let changed: Vec<&str> = diff.lines().filter(|l| !l.starts_with("  ")).collect();
        assert_eq!(changed, [r#"-     "value": "21.5""#, r#"+     "value": 21.5"#]);
        assert_eq!(line_diff("a\nb", "b\nc"), "- a\n  b\n+ c");
        assert_eq!(line_diff("a", "a\nx"), "  a\n+ x");
    }
}
