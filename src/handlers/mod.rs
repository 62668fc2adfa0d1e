//! The handler mapping (docs/reliability.md, "Message types";
//! docs/architecture.md, "A message type"): one [`Handler`] per statement,
//! registered by type in [`HANDLERS`].
//!
//! A handler has one write path. `prepare` parses a message's `data` once,
//! before any transaction, into the handler's typed item; `write` applies a
//! slice of prepared items with one set statement on the open transaction
//! it is given. A lone message is a slice of one. A handler never begins,
//! commits or rolls back, and never acks: the transaction layer owns the
//! transaction (and the inbox rows), the pipeline the delivery.
//!
//! The test-only types (feature `test-handlers`) implement the same trait,
//! so every fault test runs the path production takes.

mod commands;
mod devices;
mod fields;
mod ibeacon_change;
mod measurement;
mod record_only;
#[cfg(feature = "test-handlers")]
mod test_only;

use std::any::{Any, TypeId};

use chrono::{DateTime, NaiveDate, Utc};
use futures_util::future::BoxFuture;
use sqlx::PgConnection;
use tracing::Span;

use crate::device_route::CommandTopics;
use crate::envelope::{Kind, Message, MessageType};
use crate::failure::Failure;
use crate::telemetry::{self, TraceContext};

/// A message type's handler: its one write path.
pub trait Handler: Send + Sync + 'static {
    /// A message's `data`, parsed and checked.
    type Item: Send + Sync + 'static;

    /// Parses and checks `message.data`, without the database. The
    /// pipeline runs it before the transaction: a message it refuses is
    /// parked, and its copy is published while the batch's transaction
    /// runs.
    ///
    /// # Errors
    /// The [`Failure`] that parks the message: a validation error naming
    /// the field.
    fn prepare(&self, message: &Message, context: &Context<'_>) -> Result<Self::Item, Failure>;

    /// The device the item is about, if any: the `commands` inbox row
    /// keeps it. None by default (a beacon, a record-only event).
    fn device_id(_item: &Self::Item) -> Option<&str> {
        None
    }

    /// Whether the handler's own table keeps the whole message, so that
    /// the event is not stored again in `event_rows` (a reading is
    /// stored once; the view `events` shows it from its table).
    const KEEPS_MESSAGE: bool = false;

    /// The time that places the item's row in its day partition, when it
    /// is not the message time (a reading's own `time`).
    fn stored_time(_item: &Self::Item) -> Option<DateTime<Utc>> {
        None
    }

    /// Applies `batch` (new messages only: the inbox filtered the
    /// duplicates) with one set statement, inside the caller's
    /// transaction: all of them, or an error for the lot.
    fn write<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        batch: &'a [Typed<'a, Self::Item>],
    ) -> BoxFuture<'a, Result<(), Failure>>;
}

/// One prepared message as its handler's `write` sees it: the typed item
/// and what every write may need beside it. Never the raw `data`.
pub struct Typed<'a, T> {
    pub id: &'a str,
    /// When it happened (the message time).
    pub time: DateTime<Utc>,
    /// The delivery's trace context, kept for commands: the device
    /// message joins its command's trace.
    pub trace: Option<&'a TraceContext>,
    pub item: &'a T,
}

/// A message prepared for its transaction: the envelope (for its inbox
/// row), its handler, and its `data` parsed once into the handler's item.
pub struct Prepared {
    pub message: Message,
    pub route: &'static Route,
    /// The device the message is about, from its typed item.
    pub device_id: Option<String>,
    /// The delivery's trace context (commands only; see [`Typed::trace`]).
    pub trace: Option<TraceContext>,
    item: Box<dyn Any + Send + Sync>,
}

/// A [`Handler`] with its item type erased, so that one table maps every
/// type. The item is put in a [`Prepared`] by a handler of the type whose
/// `write` takes it back: [`Route`]s group a batch by handler type.
trait Erased: Send + Sync {
    /// The handler's type: routes whose handlers are of one type share its
    /// statement.
    fn statement(&self) -> TypeId;
    fn prepare(
        &self,
        message: &Message,
        context: &Context<'_>,
    ) -> Result<(Box<dyn Any + Send + Sync>, Option<String>), Failure>;
    fn write<'a>(&'a self, conn: &'a mut PgConnection, batch: &'a [&'a Prepared])
    -> BoxFuture<'a, Result<(), Failure>>;
    fn keeps_message(&self) -> bool;
    fn stored_time(&self, prepared: &Prepared) -> Option<DateTime<Utc>>;
}

impl<H: Handler> Erased for H {
    fn statement(&self) -> TypeId {
        TypeId::of::<H>()
    }

    fn keeps_message(&self) -> bool {
        H::KEEPS_MESSAGE
    }

    fn stored_time(&self, prepared: &Prepared) -> Option<DateTime<Utc>> {
        prepared.item.downcast_ref().and_then(H::stored_time)
    }

    fn prepare(
        &self,
        message: &Message,
        context: &Context<'_>,
    ) -> Result<(Box<dyn Any + Send + Sync>, Option<String>), Failure> {
        let item = Handler::prepare(self, message, context)?;
        let device_id = H::device_id(&item).map(str::to_owned);
        Ok((Box::new(item), device_id))
    }

    fn write<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        batch: &'a [&'a Prepared],
    ) -> BoxFuture<'a, Result<(), Failure>> {
        let typed: Vec<Typed<'a, H::Item>> = batch
            .iter()
            .filter_map(|p| {
                Some(Typed {
                    id: &p.message.id,
                    time: p.message.time,
                    trace: p.trace.as_ref(),
                    // Always `Some`: this handler's `prepare` made the item.
                    item: p.item.downcast_ref()?,
                })
            })
            .collect();
        Box::pin(async move {
            match typed.len() == batch.len() {
                true => Handler::write(self, conn, &typed).await,
                false => Err(Failure::Panic(
                    "a prepared item reached a handler of another type".into(),
                )),
            }
        })
    }
}

/// What a handler's `prepare` may need beside the message: the parts of
/// the topology file that say how a type is written.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The routing key template of each command type's device message.
    pub commands: &'a CommandTopics,
}

/// One row of the handler mapping: a type, its kind and its handler.
/// Routes whose handlers are of one Rust type share its statement in a
/// batch (`DEVICE_UP` and `DEVICE_DOWN` write `devices` together), so a
/// handler's `write` depends on its items only, never on its own fields.
pub struct Route {
    pub message_type: &'static str,
    pub kind: Kind,
    handler: &'static dyn Erased,
}

impl Route {
    /// Whether `other` writes with the same statement.
    pub fn same_handler(&self, other: &Route) -> bool {
        self.handler.statement() == other.handler.statement()
    }

    /// Whether the handler's table keeps the whole message (see
    /// [`Handler::KEEPS_MESSAGE`]).
    pub fn keeps_message(&self) -> bool {
        self.handler.keeps_message()
    }

    /// Writes `batch` (all of this route's handler) in one statement.
    ///
    /// # Errors
    /// The handler's failure, for the lot.
    pub fn write<'a>(
        &self,
        conn: &'a mut PgConnection,
        batch: &'a [&'a Prepared],
    ) -> BoxFuture<'a, Result<(), Failure>> {
        self.handler.write(conn, batch)
    }
}

const fn route(message_type: &'static str, kind: Kind, handler: &'static dyn Erased) -> Route {
    Route {
        message_type,
        kind,
        handler,
    }
}

/// The handler mapping: every message type the worker knows.
#[rustfmt::skip]
pub static HANDLERS: &[Route] = &[
    route("DEVICE_UP",          Kind::Event,   &devices::DEVICE_UP),
    route("DEVICE_DOWN",        Kind::Event,   &devices::DEVICE_DOWN),
    route("MEASUREMENT",        Kind::Event,   &measurement::MEASUREMENTS),
    route("IBEACON_CHANGE",     Kind::Event,   &ibeacon_change::BEACONS),
    route("IBEACON_READ",       Kind::Event,   &record_only::RECORD_ONLY),
    route("HTTP_COAP_REQUEST",  Kind::Event,   &record_only::RECORD_ONLY),
    route("COAP_HTTP_RESPONSE", Kind::Event,   &record_only::RECORD_ONLY),
    route("SET_LED",            Kind::Command, &commands::SET_LED),
    route("SET_PUBLISH_PERIOD", Kind::Command, &commands::SET_PUBLISH_PERIOD),
    #[cfg(feature = "test-handlers")]
    route("TEST_ABORT",         Kind::Event,   &test_only::Abort),
    #[cfg(feature = "test-handlers")]
    route("TEST_PANIC",         Kind::Event,   &test_only::Panic),
    #[cfg(feature = "test-handlers")]
    route("TEST_PANIC_CHECK",   Kind::Event,   &test_only::PanicCheck),
    #[cfg(feature = "test-handlers")]
    route("TEST_FLAKY",         Kind::Event,   &test_only::Flaky),
    #[cfg(feature = "test-handlers")]
    route("TEST_SLOW",          Kind::Event,   &test_only::Slow),
];

/// The types of `kind` the worker handles, in the mapping's order.
pub fn types_of(kind: Kind) -> impl Iterator<Item = &'static str> {
    HANDLERS.iter().filter(move |r| r.kind == kind).map(|r| r.message_type)
}

/// The route for a message's kind and type.
///
/// # Errors
/// [`Failure::UnknownType`] when no route has that kind and type.
pub fn lookup(message: &Message) -> Result<&'static Route, Failure> {
    HANDLERS
        .iter()
        .find(|r| r.message_type == message.message_type && r.kind == message.kind)
        .ok_or_else(|| Failure::UnknownType {
            kind: message.kind,
            message_type: message.message_type.clone(),
        })
}

/// Finds a message's handler and parses its `data`: the worker's own check
/// of a decoded message, with nothing written. `span` is the delivery's: a
/// command keeps its trace context, for its device message.
///
/// # Errors
/// [`Failure::UnknownType`], or the handler's refusal.
pub fn prepare(message: Message, context: &Context<'_>, span: &Span) -> Result<Prepared, Failure> {
    let route = lookup(&message)?;
    let (item, device_id) = route.handler.prepare(&message, context)?;
    let trace = match route.kind {
        Kind::Command => telemetry::context_headers(span),
        Kind::Event => None,
    };
    Ok(Prepared {
        message,
        route,
        device_id,
        trace,
        item,
    })
}

impl Prepared {
    /// The days whose partitions the message's rows go into: its own time
    /// and its item's (see [`Handler::stored_time`]).
    pub fn days(&self) -> impl Iterator<Item = NaiveDate> {
        let own = self.route.handler.stored_time(self);
        std::iter::once(self.message.time).chain(own).map(|t| t.date_naive())
    }
}

/// The type of `message` as the flow carries it: the table's name when a
/// route (of either kind) has it.
pub fn type_of(message: &Message) -> MessageType {
    HANDLERS
        .iter()
        .find(|r| r.message_type == message.message_type)
        .map_or_else(
            || MessageType::Unknown(message.message_type.as_str().into()),
            |r| MessageType::Handled(r.message_type),
        )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// The source of every handler module, by file name: the test below
    /// fails if a file is added without being listed here.
    const SOURCES: [(&str, &str); 7] = [
        ("commands.rs", include_str!("commands.rs")),
        ("devices.rs", include_str!("devices.rs")),
        ("fields.rs", include_str!("fields.rs")),
        ("ibeacon_change.rs", include_str!("ibeacon_change.rs")),
        ("measurement.rs", include_str!("measurement.rs")),
        ("record_only.rs", include_str!("record_only.rs")),
        ("test_only.rs", include_str!("test_only.rs")),
    ];

    /// A source without its tests.
    fn code(source: &str) -> &str {
        source.split("#[cfg(test)]").next().unwrap_or(source)
    }

    /// The SQL statements that write, in a handler's source.
    fn statements(source: &str) -> Vec<String> {
        code(source)
            .split("sqlx::query")
            .skip(1)
            .filter_map(|rest| rest.split('"').nth(1))
            .map(|sql| sql.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|sql| ["INSERT", "UPDATE", "DELETE"].iter().any(|verb| sql.contains(verb)))
            .collect()
    }

    /// One write path per type: a handler module writes with at most one
    /// statement, no statement is written twice under `src/handlers/`, and
    /// nothing but [`Handler::write`] writes (no second, single-message
    /// path beside the set statement).
    #[test]
    fn every_type_has_one_write_path() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/handlers");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|name| name != "mod.rs")
            .collect();
        on_disk.sort();
        assert_eq!(
            on_disk,
            SOURCES.map(|(name, _)| name.to_owned()),
            "list every handler module in SOURCES"
        );
        let mut seen: BTreeMap<String, &str> = BTreeMap::new();
        for (name, source) in SOURCES {
            let found = statements(source);
            assert!(
                found.len() <= 1,
                "{name} writes with {} statements: {found:?}",
                found.len()
            );
            for sql in found {
                if let Some(other) = seen.insert(sql.clone(), name) {
                    panic!("{name} and {other} both write `{sql}`");
                }
            }
            assert!(
                !code(source).contains("fn apply"),
                "{name} has an apply beside its write"
            );
        }
        assert!(!code(include_str!("mod.rs")).contains("fn apply"));
    }

    #[test]
    fn finds_statements_in_source() {
        let source = "sqlx::query(\"INSERT  INTO t\n  VALUES (1)\"); sqlx::query(\"SELECT 1\"); sqlx::query_scalar(\"UPDATE t\")";
        assert_eq!(statements(source), ["INSERT INTO t VALUES (1)", "UPDATE t"]);
    }

    /// Every production type shares nothing with a test type, and the types
    /// that share a handler share its kind (one inbox statement per group).
    #[test]
    fn routes_that_share_a_handler_share_a_kind() {
        for a in HANDLERS {
            for b in HANDLERS.iter().filter(|b| a.same_handler(b)) {
                assert_eq!(a.kind, b.kind, "{} and {}", a.message_type, b.message_type);
                assert_eq!(
                    a.message_type.starts_with("TEST_"),
                    b.message_type.starts_with("TEST_"),
                    "{} and {}",
                    a.message_type,
                    b.message_type
                );
            }
        }
    }
}
