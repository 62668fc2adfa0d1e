//! Reading the lot: a [`Filter`] in SQL, the groups of `requeue --list`,
//! the messages a dry run names, and one message with the actions on it.
//!
//! Every statement is static SQL: the filter is one `WHERE` clause whose
//! conditions are off when their parameter is empty or NULL (PostgreSQL
//! plans each execution with the values, so an unused condition costs
//! nothing). `--list` over 100,000 rows is one grouping scan
//! (docs/benchmarks.md, "The parking lot").

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;

use super::{Filter, Status};

/// The filter's `WHERE` clause: `$1` the queue, `$2` the statuses, `$3` to
/// `$9` the filter's fields ([`bind_filter!`]); further parameters start
/// at `$10`.
macro_rules! matching {
    () => {
        "queue = $1 AND status = ANY($2::text[])
         AND (cardinality($3::text[]) = 0 OR message_type = ANY($3::text[]))
         AND (cardinality($4::text[]) = 0 OR error_kind = ANY($4::text[]))
         AND ($5::text IS NULL OR fingerprint = $5::text)
         AND ($6::text IS NULL OR strpos(error, $6::text) > 0 OR strpos(message_id, $6::text) > 0
              OR position(convert_to($6::text, 'UTF8') IN body) > 0)
         AND (cardinality($7::text[]) = 0 OR message_id = ANY($7::text[]))
         AND ($8::timestamptz IS NULL OR last_parked_at >= $8::timestamptz)
         AND ($9::timestamptz IS NULL OR last_parked_at < $9::timestamptz)"
    };
}
pub(crate) use matching;

/// The columns of [`Message`], after `SELECT`.
macro_rules! message_columns {
    () => {
        "SELECT id, message_id, message_type, error_kind, error, fingerprint, status, times_parked,
                first_parked_at, last_parked_at"
    };
}

/// Binds `$1` to `$9` of [`matching!`] on a query.
macro_rules! bind_filter {
    ($query:expr, $queue:expr, $filter:expr, $default:expr) => {
        $query
            .bind($queue)
            .bind($filter.statuses($default))
            .bind(&$filter.types)
            .bind(&$filter.error_kinds)
            .bind(&$filter.fingerprint)
            .bind(&$filter.grep)
            .bind(&$filter.ids)
            .bind($filter.since)
            .bind($filter.until)
    };
}
pub(crate) use bind_filter;

impl TryFrom<String> for Status {
    type Error = String;

    fn try_from(text: String) -> Result<Status, String> {
        Status::parse(&text).ok_or_else(|| format!("unknown status {text:?}"))
    }
}

/// One group of `--list`: the messages sharing a fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Group {
    pub fingerprint: String,
    pub count: i64,
    pub error_kind: String,
    /// Message types in the group, sorted.
    pub types: Vec<String>,
    pub first_parked_at: DateTime<Utc>,
    pub last_parked_at: DateTime<Utc>,
    pub sample_error: String,
}

/// One parked message, as lists show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Message {
    pub id: i64,
    pub message_id: String,
    pub message_type: Option<String>,
    pub error_kind: String,
    pub error: String,
    pub fingerprint: String,
    #[sqlx(try_from = "String")]
    pub status: Status,
    pub times_parked: i32,
    pub first_parked_at: DateTime<Utc>,
    pub last_parked_at: DateTime<Utc>,
}

/// Everything the lot holds of one message, for `--show`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Shown {
    #[sqlx(flatten)]
    pub message: Message,
    pub headers: Value,
    pub properties: Value,
    pub body: Vec<u8>,
    pub status_changed_at: DateTime<Utc>,
    pub status_changed_by: Option<String>,
    pub failed_at: Option<DateTime<Utc>>,
    #[sqlx(skip)]
    pub actions: Vec<ActionOn>,
    /// Every parking of the message, oldest first.
    #[sqlx(skip)]
    pub parkings: Vec<ParkingOf>,
    /// The operators' edits of the message, oldest first.
    #[sqlx(skip)]
    pub edits: Vec<EditOf>,
}

/// One parking of a message (a row of `parkings`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct ParkingOf {
    pub at: DateTime<Utc>,
    pub error_kind: String,
    pub error: String,
    pub fingerprint: String,
    /// `iot-retry-count` of the parked copy.
    pub retry_count: Option<i64>,
    /// `iot-requeue-count` of the parked copy.
    pub requeue_count: i32,
    pub failed_at: Option<DateTime<Utc>>,
}

/// One edit of a message (fix and retry), with its diff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct EditOf {
    pub action_id: i64,
    pub header: Option<String>,
    pub header_value: Option<String>,
    pub diff: String,
}

/// One entry of a message's history: a parking or an operator action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    Parked(&'a ParkingOf),
    Acted(&'a ActionOn),
}

impl Event<'_> {
    pub fn at(&self) -> DateTime<Utc> {
        match self {
            Event::Parked(p) => p.at,
            Event::Acted(a) => a.at,
        }
    }
}

impl Shown {
    /// The parkings and the actions, in the order they happened (a parking
    /// and an action at the same instant: the parking first).
    pub fn history(&self) -> Vec<Event<'_>> {
        let mut events: Vec<Event<'_>> = self
            .parkings
            .iter()
            .map(Event::Parked)
            .chain(self.actions.iter().map(Event::Acted))
            .collect();
        events.sort_by_key(|e| (e.at(), matches!(e, Event::Acted(_))));
        events
    }

    /// The edit that action `action_id` made, if it was one.
    pub fn edit(&self, action_id: i64) -> Option<&EditOf> {
        self.edits.iter().find(|e| e.action_id == action_id)
    }
}

/// An operator action that changed one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct ActionOn {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
}

/// The groups by fingerprint of the messages `filter` matches (status
/// `parked` unless it says otherwise), most numerous first.
///
/// # Errors
/// The database error.
pub async fn groups(pool: &PgPool, queue: &str, filter: &Filter) -> Result<Vec<Group>, sqlx::Error> {
    // By type first, then by group: hash aggregates, where one
    // `array_agg(DISTINCT …)` over every row sorts them all (spilling to
    // disk at 100,000 rows).
    let query = sqlx::query_as(concat!(
        "SELECT fingerprint, sum(n)::bigint AS count, min(error_kind) AS error_kind,
                array_remove(array_agg(message_type ORDER BY message_type), NULL) AS types,
                min(first_parked_at) AS first_parked_at, max(last_parked_at) AS last_parked_at,
                min(sample_error) AS sample_error
         FROM (SELECT fingerprint, message_type, count(*) AS n, min(error_kind) AS error_kind,
                      min(first_parked_at) AS first_parked_at, max(last_parked_at) AS last_parked_at,
                      min(error COLLATE \"C\") AS sample_error
               FROM parked_messages WHERE ",
        matching!(),
        " GROUP BY fingerprint, message_type) AS by_type
         GROUP BY fingerprint ORDER BY sum(n) DESC, fingerprint"
    ));
    bind_filter!(query, queue, filter, Status::Parked).fetch_all(pool).await
}

/// How many messages `filter` matches, `default` being the status when it
/// names none.
///
/// # Errors
/// The database error.
pub async fn count(pool: &PgPool, queue: &str, filter: &Filter, default: Status) -> Result<i64, sqlx::Error> {
    let query = sqlx::query_scalar(concat!("SELECT count(*) FROM parked_messages WHERE ", matching!()));
    bind_filter!(query, queue, filter, default).fetch_one(pool).await
}

/// The first `limit` messages `filter` matches, oldest parking first: what
/// an action would take.
///
/// # Errors
/// The database error.
pub async fn messages(
    pool: &PgPool,
    queue: &str,
    filter: &Filter,
    default: Status,
    limit: i64,
) -> Result<Vec<Message>, sqlx::Error> {
    let query = sqlx::query_as(concat!(
        message_columns!(),
        " FROM parked_messages WHERE ",
        matching!(),
        " ORDER BY last_parked_at, id LIMIT $10"
    ));
    bind_filter!(query, queue, filter, default)
        .bind(limit)
        .fetch_all(pool)
        .await
}

/// The columns of [`Shown`].
macro_rules! shown {
    () => {
        concat!(
            message_columns!(),
            ", headers, properties, body, status_changed_at, status_changed_by, failed_at FROM parked_messages"
        )
    };
}

/// The message `message_id` of `queue`'s lot, whatever its status, with
/// the actions that changed it, oldest first.
///
/// # Errors
/// The database error.
pub async fn show(pool: &PgPool, queue: &str, message_id: &str) -> Result<Option<Shown>, sqlx::Error> {
    let found = sqlx::query_as(concat!(shown!(), " WHERE queue = $1 AND message_id = $2"))
        .bind(queue)
        .bind(message_id)
        .fetch_optional(pool)
        .await?;
    with_actions(pool, found).await
}

/// Row `id` of `queue`'s lot, as [`show`] gives it.
///
/// # Errors
/// The database error.
pub async fn show_row(pool: &PgPool, queue: &str, id: i64) -> Result<Option<Shown>, sqlx::Error> {
    let found = sqlx::query_as(concat!(shown!(), " WHERE queue = $1 AND id = $2"))
        .bind(queue)
        .bind(id)
        .fetch_optional(pool)
        .await?;
    with_actions(pool, found).await
}

async fn with_actions(pool: &PgPool, found: Option<Shown>) -> Result<Option<Shown>, sqlx::Error> {
    let Some(mut shown) = found else { return Ok(None) };
    shown.actions = actions_on(pool, shown.message.id).await?;
    shown.parkings = parkings_of(pool, shown.message.id).await?;
    shown.edits = edits_of(pool, shown.message.id).await?;
    Ok(Some(shown))
}

/// Every parking of row `parked_id`, oldest first.
///
/// # Errors
/// The database error.
pub async fn parkings_of(pool: &PgPool, parked_id: i64) -> Result<Vec<ParkingOf>, sqlx::Error> {
    sqlx::query_as(
        "SELECT at, error_kind, error, fingerprint, retry_count, requeue_count, failed_at
         FROM parkings WHERE parked_id = $1 ORDER BY at, id",
    )
    .bind(parked_id)
    .fetch_all(pool)
    .await
}

/// The edits of row `parked_id`, oldest first.
///
/// # Errors
/// The database error.
pub async fn edits_of(pool: &PgPool, parked_id: i64) -> Result<Vec<EditOf>, sqlx::Error> {
    sqlx::query_as(
        "SELECT action_id, header, header_value, diff FROM message_edits
         WHERE parked_id = $1 ORDER BY action_id",
    )
    .bind(parked_id)
    .fetch_all(pool)
    .await
}

/// Where a page of messages starts: after this `(last_parked_at, id)`,
/// newest first.
pub type Cursor = (DateTime<Utc>, i64);

/// One page of the messages `filter` matches, newest parking first,
/// starting after `after` (keyset pagination: each page is an index range,
/// however deep).
///
/// # Errors
/// The database error.
pub async fn page(
    pool: &PgPool,
    queue: &str,
    filter: &Filter,
    after: Option<Cursor>,
    limit: i64,
) -> Result<Vec<Message>, sqlx::Error> {
    let query = sqlx::query_as(concat!(
        message_columns!(),
        " FROM parked_messages WHERE ",
        matching!(),
        " AND ($10::timestamptz IS NULL OR (last_parked_at, id) < ($10::timestamptz, $11::bigint))
         ORDER BY last_parked_at DESC, id DESC LIMIT $12"
    ));
    bind_filter!(query, queue, filter, Status::Parked)
        .bind(after.map(|a| a.0))
        .bind(after.map_or(0, |a| a.1))
        .bind(limit)
        .fetch_all(pool)
        .await
}

/// One row of `operator_actions`.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct ActionRow {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub filter: Value,
    pub messages: i32,
    pub target: Option<String>,
}

/// The actions on `queue`'s lot, newest first, with ids below `before`.
///
/// # Errors
/// The database error.
pub async fn actions(
    pool: &PgPool,
    queue: &str,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<ActionRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, at, actor, action, filter, messages, target FROM operator_actions
         WHERE queue = $1 AND ($2::bigint IS NULL OR id < $2) ORDER BY id DESC LIMIT $3",
    )
    .bind(queue)
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Action `id` on `queue`'s lot.
///
/// # Errors
/// The database error.
pub async fn action(pool: &PgPool, queue: &str, id: i64) -> Result<Option<ActionRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, at, actor, action, filter, messages, target FROM operator_actions
         WHERE queue = $1 AND id = $2",
    )
    .bind(queue)
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// The actions that changed row `parked_id`, oldest first.
///
/// # Errors
/// The database error.
pub async fn actions_on(pool: &PgPool, parked_id: i64) -> Result<Vec<ActionOn>, sqlx::Error> {
    sqlx::query_as(
        "SELECT a.id, a.at, a.actor, a.action, a.target
         FROM operator_action_messages m JOIN operator_actions a ON a.id = m.action_id
         WHERE m.parked_id = $1 ORDER BY a.at, a.id",
    )
    .bind(parked_id)
    .fetch_all(pool)
    .await
}
