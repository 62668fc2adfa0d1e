//! The handler mapping (docs/reliability.md, "Message types"): one handler
//! per message type, each in its own file, registered in [`HANDLERS`].
//!
//! A handler validates `data` and applies its effect on the open
//! transaction it is given. It never begins, commits or rolls back, and it
//! never acks: the pipeline owns the transaction and the delivery, so several
//! messages can later share one transaction without touching a handler.

mod device_down;
mod device_up;
mod fields;
mod ibeacon_change;
mod measurement;
mod record_only;
mod set_led;
mod set_publish_period;
#[cfg(feature = "test-handlers")]
mod test_only;

use futures_util::future::BoxFuture;
use sqlx::PgConnection;

use crate::envelope::{Kind, Message, MessageType};
use crate::failure::Failure;

/// Applies one message's effect inside the caller's transaction.
pub type ApplyFn = for<'a> fn(&'a mut PgConnection, &'a Message) -> BoxFuture<'a, Result<(), Failure>>;

/// Applies many checked messages of one type inside the caller's
/// transaction, with the same effect as `apply` on each: all of them, or
/// an error for the lot.
pub type ApplyManyFn = for<'a> fn(&'a mut PgConnection, &'a [&'a Message]) -> BoxFuture<'a, Result<(), Failure>>;

/// A handler's bulk path, for batches: `check` validates one message
/// without the database (the pipeline runs it before the transaction, and
/// a message it refuses is parked without reaching the bulk), and
/// `apply_many` applies the checked ones; their inbox rows (`events` or
/// `commands`) are written in bulk too. Handlers that share one `Bulk` (the
/// same static) share its statement: `DEVICE_UP` and `DEVICE_DOWN` write
/// `devices` together. All messages of one `Bulk` are of one kind.
pub struct Bulk {
    pub check: fn(&Message) -> Result<(), Failure>,
    pub apply_many: ApplyManyFn,
}

/// What a command sends its device: routing key and body.
type DeviceMessage = fn(&serde_json::Value) -> Result<(String, Vec<u8>), fields::ValidationError>;

/// A command's bulk path: the device messages of the checked commands
/// written to the outbox in one statement, each with its command's trace
/// context: a lone command's `handler` span (the current span, in its own
/// trace), or, in a batch, its delivery's ([`Message::trace`]).
fn enqueue_all<'a>(
    conn: &'a mut PgConnection,
    messages: &'a [&'a Message],
    device_message: DeviceMessage,
) -> BoxFuture<'a, Result<(), Failure>> {
    Box::pin(async move {
        let alone = match messages {
            [_] => crate::telemetry::context_headers(&tracing::Span::current()),
            _ => None,
        };
        let mut rows = Vec::with_capacity(messages.len());
        for message in messages {
            let (routing_key, body) = device_message(&message.data)?;
            rows.push(crate::outbox::Pending {
                message_id: &message.id,
                routing_key,
                body,
                trace: alone.as_ref().or(message.trace.as_ref()),
            });
        }
        crate::outbox::enqueue_many(conn, &rows).await?;
        Ok(())
    })
}

/// One row of the handler mapping.
pub struct Handler {
    pub message_type: &'static str,
    pub kind: Kind,
    pub apply: ApplyFn,
    /// A faster path for many messages at once, where it pays off.
    pub bulk: Option<&'static Bulk>,
}

/// The handler mapping: every message type the worker knows.
#[rustfmt::skip]
pub static HANDLERS: &[Handler] = &[
    Handler { message_type: "DEVICE_UP",          kind: Kind::Event,   apply: device_up::apply,           bulk: Some(&device_up::BULK) },
    Handler { message_type: "DEVICE_DOWN",        kind: Kind::Event,   apply: device_down::apply,         bulk: Some(&device_up::BULK) },
    Handler { message_type: "MEASUREMENT",        kind: Kind::Event,   apply: measurement::apply,         bulk: Some(&measurement::BULK) },
    Handler { message_type: "IBEACON_CHANGE",     kind: Kind::Event,   apply: ibeacon_change::apply,      bulk: Some(&ibeacon_change::BULK) },
    Handler { message_type: "IBEACON_READ",       kind: Kind::Event,   apply: record_only::apply,         bulk: Some(&record_only::BULK) },
    Handler { message_type: "HTTP_COAP_REQUEST",  kind: Kind::Event,   apply: record_only::apply,         bulk: Some(&record_only::BULK) },
    Handler { message_type: "COAP_HTTP_RESPONSE", kind: Kind::Event,   apply: record_only::apply,         bulk: Some(&record_only::BULK) },
    Handler { message_type: "SET_LED",            kind: Kind::Command, apply: set_led::apply,             bulk: Some(&set_led::BULK) },
    Handler { message_type: "SET_PUBLISH_PERIOD", kind: Kind::Command, apply: set_publish_period::apply,  bulk: Some(&set_publish_period::BULK) },
    #[cfg(feature = "test-handlers")]
    Handler { message_type: "TEST_ABORT",         kind: Kind::Event,   apply: test_only::abort,           bulk: None },
    #[cfg(feature = "test-handlers")]
    Handler { message_type: "TEST_PANIC",         kind: Kind::Event,   apply: test_only::panic,           bulk: None },
    #[cfg(feature = "test-handlers")]
    Handler { message_type: "TEST_PANIC_CHECK",   kind: Kind::Event,   apply: test_only::recorded,        bulk: Some(&test_only::PANIC_CHECK_BULK) },
    #[cfg(feature = "test-handlers")]
    Handler { message_type: "TEST_FLAKY",         kind: Kind::Event,   apply: test_only::flaky,           bulk: None },
    #[cfg(feature = "test-handlers")]
    Handler { message_type: "TEST_SLOW",          kind: Kind::Event,   apply: test_only::slow,            bulk: None },
];

/// The handler for a message's kind and type.
///
/// # Errors
/// [`Failure::UnknownType`] when no handler has that kind and type.
pub fn lookup(message: &Message) -> Result<&'static Handler, Failure> {
    HANDLERS
        .iter()
        .find(|h| h.message_type == message.message_type && h.kind == message.kind)
        .ok_or_else(|| Failure::UnknownType {
            kind: message.kind.as_str(),
            message_type: message.message_type.clone(),
        })
}

/// The type of `message` as the flow carries it: the table's name when a
/// handler (of either kind) has it.
pub fn type_of(message: &Message) -> MessageType {
    HANDLERS
        .iter()
        .find(|h| h.message_type == message.message_type)
        .map_or_else(
            || MessageType::Unknown(message.message_type.as_str().into()),
            |h| MessageType::Handled(h.message_type),
        )
}
