//! Applying messages: the transaction, and what is wrapped around it, each
//! written once (docs/architecture.md, "One delivery, file by file").
//!
//! * [`Database`] runs a batch of messages in one PostgreSQL transaction. A
//!   single message is a batch of one.
//! * [`Deadline`] and [`CatchPanic`] are layers around any [`Apply`]: a run
//!   past the deadline, or one that panicked, is rolled back (its
//!   connection is dropped) and counts as its batch's failure.
//! * [`Retries`] is stage 1 of the retry policy: a message that failed
//!   transiently runs again alone, with backoff, while it has in-process
//!   attempts left.
//!
//! Messages whose handler has a bulk path (every type but the test
//! handlers) come checked (the pipeline's `prepare` ran the handler's
//! `check`) and are written with one inbox statement and one statement of
//! the handler's per bulk path. Every other message of a batch runs inside
//! its own savepoint: a message whose handler fails is rolled back to it and
//! leaves the batch, and its batch-mates commit. A failure of the batch
//! itself (a lost connection, a failed commit, the deadline, a panic) rolls
//! everything back; the messages then run again one by one, where the inbox
//! makes a commit of unknown outcome safe to repeat.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use backon::Retryable;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, join_all};
use opentelemetry::trace::TraceContextExt;
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::envelope::{Kind, Message};
use crate::failure::Failure;
use crate::handlers::{Bulk, Handler};
use crate::outcome::Outcome;
use crate::retry::RetryPolicy;
use crate::store;

/// One message to apply, with the handler of its type.
pub type Item<'a> = (&'a Message, &'static Handler);

/// What a run did with one message of its batch.
#[derive(Debug)]
pub enum Applied {
    /// Committed (processed, or a duplicate).
    Done(Outcome),
    /// Failed: this run was one of the message's in-process attempts.
    Failed(Failure),
    /// Rolled back for another message's sake (its batch failed for a
    /// reason that is not the message's): run it again alone, with every
    /// attempt it has.
    Again,
}

/// Runs a batch of messages (in order) and says what became of each: one
/// [`Applied`] per item.
pub trait Apply: Send + Sync {
    fn apply<'a>(&'a self, items: &'a [Item<'a>]) -> BoxFuture<'a, Vec<Applied>>;
}

/// The failure of a whole run, as each of its messages takes it: a message
/// alone has failed itself; in a batch, a transient failure is each
/// message's first attempt (as it would have been alone), and any other is
/// nobody's in particular, so every message runs again alone.
fn aborted(items: usize, failure: Failure) -> Vec<Applied> {
    if items == 1 {
        return vec![Applied::Failed(failure)];
    }
    tracing::debug!(error.message = %failure, size = items, "batch rolled back; its messages run alone");
    let (transient, reason) = (failure.is_transient(), failure.to_string());
    (0..items)
        .map(|_| match transient {
            true => Applied::Failed(Failure::BatchAborted {
                transient,
                reason: reason.clone(),
            }),
            false => Applied::Again,
        })
        .collect()
}

/// The layer that bounds a run by the database deadline (see
/// [`store::deadline`]).
pub struct Deadline<A>(pub A);

impl<A: Apply> Apply for Deadline<A> {
    fn apply<'a>(&'a self, items: &'a [Item<'a>]) -> BoxFuture<'a, Vec<Applied>> {
        Box::pin(async move {
            let run = async { Ok::<_, sqlx::Error>(self.0.apply(items).await) };
            store::deadline(run)
                .await
                .unwrap_or_else(|e| aborted(items.len(), Failure::Database(e)))
        })
    }
}

/// The layer that turns a panic into the run's failure.
pub struct CatchPanic<A>(pub A);

impl<A: Apply> Apply for CatchPanic<A> {
    fn apply<'a>(&'a self, items: &'a [Item<'a>]) -> BoxFuture<'a, Vec<Applied>> {
        Box::pin(async move {
            AssertUnwindSafe(self.0.apply(items))
                .catch_unwind()
                .await
                .unwrap_or_else(|panic| aborted(items.len(), Failure::from_panic(&*panic)))
        })
    }
}

/// The transactions of the worker, with the deadline and panic layers.
pub fn layered(pool: PgPool) -> impl Apply {
    CatchPanic(Deadline(Database { pool }))
}

/// One PostgreSQL transaction per run.
pub struct Database {
    pub pool: PgPool,
}

impl Apply for Database {
    fn apply<'a>(&'a self, items: &'a [Item<'a>]) -> BoxFuture<'a, Vec<Applied>> {
        Box::pin(async move {
            let mut conn = match self.pool.acquire().await {
                Ok(conn) => conn,
                Err(e) => return aborted(items.len(), Failure::Database(e)),
            };
            let applied = match run(&mut conn, items).await {
                Ok(applied) => applied,
                Err(failure) => {
                    if let Failure::Database(e) = &failure {
                        store::close_if_read_only(&mut conn, e);
                    }
                    aborted(items.len(), failure)
                }
            };
            // One message's statement answered 25006: this connection
            // reaches a read-only server, so it is not pooled either.
            for failed in &applied {
                if let Applied::Failed(Failure::Database(e)) = failed {
                    store::close_if_read_only(&mut conn, e);
                }
            }
            applied
        })
    }
}

/// Bulk groups first, then the others in lock order, each in a savepoint
/// when it has batch-mates; commits unless nothing was written.
async fn run(conn: &mut PgConnection, items: &[Item<'_>]) -> Result<Vec<Applied>, Failure> {
    let mut tx = conn.begin().await?;
    let mut applied: Vec<Option<Applied>> = items.iter().map(|_| None).collect();
    for (bulk, indexes) in bulk_groups(items) {
        apply_bulk(&mut tx, bulk, items, &indexes, &mut applied).await?;
    }
    for index in lock_order(items) {
        if applied[index].is_none() {
            let (message, handler) = items[index];
            applied[index] = Some(match items.len() {
                1 => apply_one(&mut tx, handler, message)
                    .await
                    .map_or_else(Applied::Failed, Applied::Done),
                _ => apply_in_savepoint(&mut tx, handler, message).await?,
            });
        }
    }
    let applied: Vec<Applied> = applied.into_iter().map(|a| a.unwrap_or(Applied::Again)).collect();
    // A lone failure or duplicate wrote nothing worth a commit: dropping the
    // transaction rolls it back.
    if applied.iter().any(|a| *a == Outcome::Processed) {
        tx.commit().instrument(tracing::debug_span!("commit")).await?;
    }
    Ok(applied)
}

impl PartialEq<Outcome> for Applied {
    fn eq(&self, outcome: &Outcome) -> bool {
        matches!(self, Applied::Done(done) if done == outcome)
    }
}

/// The order the one-by-one items run in: by the device they are about
/// (`data.device_id`), so that two batches in flight lock `devices` rows in
/// the same order and cannot deadlock (PostgreSQL would break the cycle
/// only after `deadlock_timeout`, a second). A message's outcome does not
/// depend on its place: device state follows event time.
fn lock_order(items: &[Item<'_>]) -> Vec<usize> {
    let device = |i: &usize| items[*i].0.data.get("device_id").and_then(|d| d.as_str());
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|a, b| device(a).cmp(&device(b)));
    order
}

/// The items that take a bulk path, by [`Bulk`]; the others run one by
/// one. Every item passed its handler's `check` already (the pipeline's
/// `prepare` runs it, so that a refused message is copied while the
/// transaction runs); one that did not would fail its bulk statement, and
/// with it the run, whose messages then run alone.
fn bulk_groups(items: &[Item<'_>]) -> Vec<(&'static Bulk, Vec<usize>)> {
    let mut groups: Vec<(&'static Bulk, Vec<usize>)> = Vec::new();
    for (index, (_, handler)) in items.iter().enumerate() {
        let Some(bulk) = handler.bulk else { continue };
        match groups.iter_mut().find(|(b, _)| std::ptr::eq(*b, bulk)) {
            Some((_, indexes)) => indexes.push(index),
            None => groups.push((bulk, vec![index])),
        }
    }
    groups
}

/// Inbox rows for the group in one statement, then the new ones through
/// the handler's `apply_many`; the first copy of an id in the batch is
/// the one applied. A failure of `apply_many` is the whole run's.
async fn apply_bulk(
    tx: &mut PgConnection,
    bulk: &Bulk,
    items: &[Item<'_>],
    indexes: &[usize],
    applied: &mut [Option<Applied>],
) -> Result<(), Failure> {
    let messages: Vec<&Message> = indexes.iter().map(|i| items[*i].0).collect();
    let mut new_ids = match items[indexes[0]].1.kind {
        Kind::Event => store::record_events_in_inbox(tx, &messages).await?,
        Kind::Command => store::record_commands_in_inbox(tx, &messages).await?,
    };
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
    if fresh.is_empty() {
        return Ok(());
    }
    (bulk.apply_many)(tx, &fresh).instrument(bulk_span(&fresh)).await
}

/// The `handler` span of a bulk statement, named by the types it applies
/// (`handler DEVICE_UP` for one of them, as a message alone gets).
fn bulk_span(messages: &[&Message]) -> Span {
    let mut types: Vec<&str> = Vec::new();
    for message in messages {
        if !types.contains(&message.message_type.as_str()) {
            types.push(&message.message_type);
        }
    }
    let types = types.join(", ");
    tracing::debug_span!(
        "handler",
        otel.name = %format_args!("handler {types}"),
        iot.message.type = %types,
        iot.batch.size = messages.len(),
    )
}

/// One message in its own savepoint: rolled back to it if it fails.
async fn apply_in_savepoint(tx: &mut PgConnection, handler: &Handler, message: &Message) -> Result<Applied, Failure> {
    sqlx::raw_sql("SAVEPOINT message").execute(&mut *tx).await?;
    match apply_one(tx, handler, message).await {
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
async fn apply_one(conn: &mut PgConnection, handler: &Handler, message: &Message) -> Result<Outcome, Failure> {
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

/// A message's end after stage 1, with the runs it took after the first.
#[derive(Debug)]
pub struct Tried {
    pub result: Result<Outcome, Failure>,
    pub in_process_retries: u32,
}

/// Stage 1 of the retry policy, around an [`Apply`].
pub struct Retries {
    pub apply: Arc<dyn Apply>,
    pub policy: RetryPolicy,
    /// Once cancelled, no new in-process run starts.
    pub shutdown: CancellationToken,
}

impl Retries {
    /// Runs `items` together, then each one that failed transiently alone,
    /// concurrently, with the attempts it has left. `spans` are the
    /// deliveries' (one per item): a batch's transaction is linked to each,
    /// a message's own runs are children of its span.
    pub async fn run(&self, items: &[Item<'_>], spans: &[Span]) -> Vec<Tried> {
        if items.is_empty() {
            return Vec::new();
        }
        let first = self.apply.apply(items).instrument(transaction_span(spans)).await;
        let each = items.iter().zip(spans).zip(first).map(|((item, span), applied)| {
            let tried = async move {
                match applied {
                    Applied::Done(outcome) => Tried {
                        result: Ok(outcome),
                        in_process_retries: 0,
                    },
                    Applied::Failed(failure) => self.after_failure(*item, failure).await,
                    Applied::Again => self.alone(*item, self.policy.in_process_attempts, 0).await,
                }
            };
            tried.instrument(span.clone())
        });
        join_all(each).await
    }

    /// A message whose run failed, which was its first attempt: a transient
    /// failure runs again alone, with the attempts left.
    async fn after_failure(&self, item: Item<'_>, failure: Failure) -> Tried {
        let left = self.policy.in_process_attempts.saturating_sub(1);
        if left == 0 || !self.retry_allowed(&failure) {
            return Tried {
                result: Err(failure),
                in_process_retries: 0,
            };
        }
        self.alone(item, left, 1).await
    }

    /// Runs `item` alone, at most `runs` times while it fails transiently.
    /// `retries` counts the runs after its first, these included.
    async fn alone(&self, item: Item<'_>, runs: u32, mut retries: u32) -> Tried {
        let result = (|| async {
            let run = self.apply.apply(std::slice::from_ref(&item));
            match run.instrument(transaction_span(&[])).await.pop() {
                Some(Applied::Done(outcome)) => Ok(outcome),
                Some(Applied::Failed(failure)) => Err(failure),
                // A batch of one has no batch-mate to be rolled back for.
                Some(Applied::Again) | None => Err(Failure::BatchAborted {
                    transient: true,
                    reason: "rolled back".into(),
                }),
            }
        })
        .retry(self.policy.in_process_backoff(runs))
        .sleep(tokio::time::sleep)
        .when(|failure| self.retry_allowed(failure))
        .notify(|failure, delay| {
            retries += 1;
            tracing::debug!(message_id = %item.0.id, error.message = %failure, ?delay, "transient failure, retrying in process");
        })
        .await;
        Tried {
            result,
            in_process_retries: retries,
        }
    }

    fn retry_allowed(&self, failure: &Failure) -> bool {
        failure.is_transient() && !self.shutdown.is_cancelled()
    }
}

/// The span of a run: a child of the current span for a message alone (or
/// of the one delivery's span), linked to each delivery's span for a batch.
fn transaction_span(deliveries: &[Span]) -> Span {
    match deliveries {
        [] => tracing::debug_span!("transaction", db.system.name = "postgresql"),
        [one] => tracing::debug_span!(parent: one, "transaction", db.system.name = "postgresql"),
        many => {
            let span = tracing::debug_span!(
                "transaction",
                otel.name = "transaction (batch)",
                db.system.name = "postgresql"
            );
            for delivery in many {
                span.add_link(delivery.context().span().span_context().clone());
            }
            span
        }
    }
}
