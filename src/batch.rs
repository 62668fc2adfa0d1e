//! Several first deliveries applied in one transaction (micro-batching).
//!
//! Messages whose handler has a bulk path (`MEASUREMENT`) are checked
//! first, and the ones that pass are written with one inbox statement and
//! one statement of the handler's. Every other message runs inside its own
//! savepoint: a message whose handler fails is rolled back to it and leaves
//! the batch, and its batch-mates commit. A failure of the batch itself (a lost connection, a failed
//! commit, the deadline, a panic) rolls everything back; the messages then
//! run again one by one, where the inbox makes a commit of unknown outcome
//! safe to repeat.

use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;
use sqlx::{Connection, PgConnection, PgPool};
use tracing::Instrument;

use crate::envelope::{Kind, Message};
use crate::failure::Failure;
use crate::handlers::Handler;
use crate::outcome::Outcome;
use crate::store;

/// What the batch did with one message.
#[derive(Debug)]
pub enum Applied {
    /// Committed with the batch (processed, or a duplicate).
    Done(Outcome),
    /// Its own run failed and was rolled back; the rest committed.
    Failed(Failure),
    /// The batch failed as a whole: run it again, alone. With a transient
    /// failure (a lost or silent connection, the deadline), that run was
    /// the message's first in-process attempt, as it would have been alone.
    Again(Option<Failure>),
}

/// Why a batch failed as a whole.
enum Abort {
    Database(sqlx::Error),
    /// A bulk path failed: its messages, like the others, run alone.
    Bulk(Failure),
    /// The handler of message `index` panicked.
    Panic {
        index: usize,
        text: String,
    },
}

impl From<sqlx::Error> for Abort {
    fn from(e: sqlx::Error) -> Abort {
        Abort::Database(e)
    }
}

/// Applies `items` in one transaction, in order; one [`Applied`] per item.
pub async fn apply(pool: &PgPool, items: &[(&Message, &Handler)]) -> Vec<Applied> {
    match store::deadline(run(pool, items)).await {
        Ok(applied) => applied,
        Err(Abort::Database(e)) => again(items, &Failure::Database(e)),
        Err(Abort::Bulk(failure)) => again(items, &failure),
        Err(Abort::Panic { index, text }) => (0..items.len())
            .map(|i| {
                if i == index {
                    Applied::Failed(Failure::Panic(text.clone()))
                } else {
                    Applied::Again(None)
                }
            })
            .collect(),
    }
}

fn again(items: &[(&Message, &Handler)], failure: &Failure) -> Vec<Applied> {
    tracing::debug!(error.message = %failure, size = items.len(), "batch rolled back; its messages run alone");
    let (transient, reason) = (failure.is_transient(), failure.to_string());
    let each = || {
        transient.then(|| Failure::BatchAborted {
            transient,
            reason: reason.clone(),
        })
    };
    items.iter().map(|_| Applied::Again(each())).collect()
}

async fn run(pool: &PgPool, items: &[(&Message, &Handler)]) -> Result<Vec<Applied>, Abort> {
    let mut conn = pool.acquire().await?;
    let result = run_on(&mut conn, items).await;
    if let Err(Abort::Database(e)) = &result {
        store::close_if_read_only(&mut conn, e);
    }
    result
}

async fn run_on(conn: &mut PgConnection, items: &[(&Message, &Handler)]) -> Result<Vec<Applied>, Abort> {
    let mut tx = conn.begin().await?;
    let mut applied: Vec<Option<Applied>> = items.iter().map(|_| None).collect();
    for (handler, indexes) in bulk_groups(items, &mut applied) {
        apply_bulk(&mut tx, handler, items, &indexes, &mut applied).await?;
    }
    for index in lock_order(items) {
        if applied[index].is_none() {
            let (message, handler) = items[index];
            applied[index] = Some(apply_in_savepoint(&mut tx, index, handler, message).await?);
        }
    }
    tx.commit().instrument(tracing::debug_span!("commit")).await?;
    Ok(applied.into_iter().map(|a| a.unwrap_or(Applied::Again(None))).collect())
}

/// The order the one-by-one items run in: by the device they are about
/// (`data.device_id`), so that two batches in flight lock `devices` rows in
/// the same order and cannot deadlock (PostgreSQL would break the cycle
/// only after `deadlock_timeout`, a second). A message's outcome does not
/// depend on its place: device state follows event time.
fn lock_order(items: &[(&Message, &Handler)]) -> Vec<usize> {
    let device = |i: &usize| items[*i].0.data.get("device_id").and_then(|d| d.as_str());
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|a, b| device(a).cmp(&device(b)));
    order
}

/// The items that take a handler's bulk path, by handler. An item its
/// `check` refuses (or panics on) fails at once; items without a bulk path
/// stay `None`.
fn bulk_groups<'h>(
    items: &[(&Message, &'h Handler)],
    applied: &mut [Option<Applied>],
) -> Vec<(&'h Handler, Vec<usize>)> {
    let mut groups: Vec<(&Handler, Vec<usize>)> = Vec::new();
    for (index, (message, handler)) in items.iter().enumerate() {
        let Some(bulk) = handler.bulk.as_ref().filter(|_| handler.kind == Kind::Event) else {
            continue;
        };
        // A panic in a check is that message's failure, like a handler's.
        let checked = std::panic::catch_unwind(AssertUnwindSafe(|| (bulk.check)(message)))
            .unwrap_or_else(|panic| Err(Failure::Panic(panic_text(&*panic))));
        if let Err(failure) = checked {
            applied[index] = Some(Applied::Failed(failure));
            continue;
        }
        match groups.iter_mut().find(|(h, _)| std::ptr::eq(*h, *handler)) {
            Some((_, indexes)) => indexes.push(index),
            None => groups.push((handler, vec![index])),
        }
    }
    groups
}

/// Inbox rows for the group in one statement, then the new ones through
/// the handler's `apply_many`; the first copy of an id in the batch is
/// the one applied.
async fn apply_bulk(
    tx: &mut PgConnection,
    handler: &Handler,
    items: &[(&Message, &Handler)],
    indexes: &[usize],
    applied: &mut [Option<Applied>],
) -> Result<(), Abort> {
    let messages: Vec<&Message> = indexes.iter().map(|i| items[*i].0).collect();
    let mut new_ids = store::record_events_in_inbox(tx, &messages).await?;
    let mut fresh = Vec::with_capacity(messages.len());
    for (index, message) in indexes.iter().zip(&messages) {
        let outcome = if new_ids.remove(&message.id) {
            fresh.push(*message);
            Outcome::Processed
        } else {
            Outcome::Duplicate
        };
        applied[*index] = Some(Applied::Done(outcome));
    }
    let apply_many = handler.bulk.as_ref().map(|bulk| bulk.apply_many);
    if let (Some(apply_many), false) = (apply_many, fresh.is_empty()) {
        let applied_many = AssertUnwindSafe(apply_many(tx, &fresh)).catch_unwind().await;
        match applied_many {
            Ok(Ok(())) => {}
            Ok(Err(failure)) => return Err(Abort::Bulk(failure)),
            Err(panic) => return Err(Abort::Bulk(Failure::Panic(panic_text(&*panic)))),
        }
    }
    Ok(())
}

/// One message in its own savepoint: rolled back to it if it fails.
async fn apply_in_savepoint(
    tx: &mut PgConnection,
    index: usize,
    handler: &Handler,
    message: &Message,
) -> Result<Applied, Abort> {
    sqlx::raw_sql("SAVEPOINT message").execute(&mut *tx).await?;
    let result = AssertUnwindSafe(apply_one(tx, handler, message))
        .catch_unwind()
        .await
        .map_err(|panic| Abort::Panic {
            index,
            text: panic_text(&*panic),
        })?;
    match result {
        Ok(outcome) => {
            sqlx::raw_sql("RELEASE SAVEPOINT message").execute(&mut *tx).await?;
            Ok(Applied::Done(outcome))
        }
        Err(failure) => {
            sqlx::raw_sql("ROLLBACK TO SAVEPOINT message; RELEASE SAVEPOINT message")
                .execute(&mut *tx)
                .await?;
            Ok(Applied::Failed(failure))
        }
    }
}

/// One message inside an open transaction: its inbox row, then its
/// handler; a message already in the inbox is a duplicate.
pub async fn apply_one(conn: &mut PgConnection, handler: &Handler, message: &Message) -> Result<Outcome, Failure> {
    if !store::record_in_inbox(conn, message).await? {
        return Ok(Outcome::Duplicate);
    }
    let handler_span = tracing::debug_span!(
        "handler",
        otel.name = %format_args!("handler {}", handler.message_type),
        iot.message.type = handler.message_type,
    );
    (handler.apply)(conn, message).instrument(handler_span).await?;
    Ok(Outcome::Processed)
}

/// The text of a panic's payload.
pub fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}
