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
//! Messages come prepared (the pipeline's `prepare` parsed each one's
//! `data` into its handler's typed item) and are written by handler, each
//! group with one inbox statement and one statement of its handler's. A
//! lone message is a group of one: there is no other path. A failure of
//! the run (a statement, a lost connection, a failed commit, the deadline,
//! a panic) rolls everything back; the messages then go again in halves,
//! down to one by one, each with every attempt it has, where the inbox
//! makes a commit of unknown outcome safe to repeat, and a message that
//! fails alone has failed itself.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, PoisonError, RwLock};

use backon::Retryable;
use chrono::{NaiveDate, Utc};
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, join_all};
use opentelemetry::trace::TraceContextExt;
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::envelope::Kind;
use crate::failure::{self, Failure};
use crate::growth;
use crate::handlers::{Prepared, Route};
use crate::inbox::Inbox;
use crate::outcome::Outcome;
use crate::retry::RetryPolicy;
use crate::store;

/// One message to apply.
pub type Item<'a> = &'a Prepared;

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
/// alone has failed itself; in a batch, the failure is nobody's in
/// particular (one message's transient error, a constraint, a panic), so
/// every message goes again (in halves, see [`Retries::run`]) with every
/// attempt it has: another's failure never costs a message an attempt,
/// nor sends it to a retry queue. Except when the database itself failed
/// (the connection lost or refused, the deadline): smaller runs would
/// only wait for it again, once per halving, so every message takes that
/// failure as its own attempt at once (docs/reliability.md, "Batches").
fn aborted(items: usize, failure: Failure) -> Vec<Applied> {
    if items == 1 {
        return vec![Applied::Failed(failure)];
    }
    if let Failure::Database(e) = &failure
        && failure::is_database_unreachable(e)
    {
        tracing::debug!(error.message = %failure, size = items, "database unreachable: the batch's messages each take the failure");
        let text = e.to_string();
        return (0..items)
            .map(|_| {
                let copy = std::io::Error::new(std::io::ErrorKind::ConnectionAborted, text.clone());
                Applied::Failed(Failure::Database(sqlx::Error::Io(copy)))
            })
            .collect();
    }
    tracing::debug!(error.message = %failure, size = items, "batch rolled back; its messages run alone");
    (0..items).map(|_| Applied::Again).collect()
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
pub fn layered(pool: PgPool, inbox: Arc<Inbox>) -> impl Apply {
    CatchPanic(Deadline(Database {
        pool,
        inbox,
        days: RwLock::default(),
    }))
}

/// One PostgreSQL transaction per run.
pub struct Database {
    pub pool: PgPool,
    pub inbox: Arc<Inbox>,
    /// The days whose partitions this process has made or found.
    days: RwLock<HashSet<NaiveDate>>,
}

impl Database {
    /// Makes the day partitions of the messages of `items` that this
    /// process has not seen yet, before their transaction: a message dated
    /// outside every partition is stored, never parked, and its handler
    /// runs once.
    async fn make_days(&self, conn: &mut PgConnection, items: &[Item<'_>]) -> Result<(), sqlx::Error> {
        let mut days: Vec<NaiveDate> = {
            let known = self.days.read().unwrap_or_else(PoisonError::into_inner);
            items
                .iter()
                .flat_map(|p| p.days())
                .filter(|d| !known.contains(d))
                .collect()
        };
        if days.is_empty() {
            return Ok(());
        }
        days.sort();
        days.dedup();
        growth::make_days(conn, &days).await?;
        self.days.write().unwrap_or_else(PoisonError::into_inner).extend(days);
        Ok(())
    }

    /// Makes what a run found missing after all: a partition that
    /// retention dropped since (a reading that old is stored again), the
    /// inbox's generation of today (a new day began) or its list of
    /// generations (another worker dropped one).
    async fn make_missing(&self, conn: &mut PgConnection, items: &[Item<'_>]) -> Result<(), sqlx::Error> {
        tracing::info!("making the partitions or inbox generation a batch found missing");
        self.days.write().unwrap_or_else(PoisonError::into_inner).clear();
        self.make_days(conn, items).await?;
        self.inbox.upkeep(conn, Utc::now().date_naive()).await?;
        Ok(())
    }
}

impl Apply for Database {
    fn apply<'a>(&'a self, items: &'a [Item<'a>]) -> BoxFuture<'a, Vec<Applied>> {
        Box::pin(async move {
            let mut conn = match self.pool.acquire().await {
                Ok(conn) => conn,
                Err(e) => return aborted(items.len(), Failure::Database(e)),
            };
            if let Err(e) = self.make_days(&mut conn, items).await {
                return aborted(items.len(), Failure::Database(e));
            }
            let mut result = run(&mut conn, &self.inbox, items).await;
            if let Err(Failure::Database(e)) = &result
                && growth::is_missing_table(e)
            {
                result = match self.make_missing(&mut conn, items).await {
                    Ok(()) => run(&mut conn, &self.inbox, items).await,
                    Err(e) => Err(Failure::Database(e)),
                };
            }
            let applied = match result {
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

/// Each handler's group with its inbox statement and its handler's; commits
/// unless nothing new was written.
async fn run(conn: &mut PgConnection, inbox: &Inbox, items: &[Item<'_>]) -> Result<Vec<Applied>, Failure> {
    let mut tx = conn.begin().await?;
    let mut outcomes = vec![Outcome::Duplicate; items.len()];
    for indexes in groups(items) {
        let group: Vec<&Prepared> = indexes.iter().map(|i| items[*i]).collect();
        let fresh = write_group(&mut tx, inbox, &group).await?;
        for (index, fresh) in indexes.into_iter().zip(fresh) {
            if fresh {
                outcomes[index] = Outcome::Processed;
            }
        }
    }
    // Duplicates alone wrote nothing worth a commit: dropping the
    // transaction rolls it back.
    if outcomes.contains(&Outcome::Processed) {
        tx.commit().instrument(tracing::debug_span!("commit")).await?;
    }
    Ok(outcomes.into_iter().map(Applied::Done).collect())
}

impl PartialEq<Outcome> for Applied {
    fn eq(&self, outcome: &Outcome) -> bool {
        matches!(self, Applied::Done(done) if done == outcome)
    }
}

/// The items by the statement that writes them (see [`Route::same_handler`]),
/// in their order.
fn groups(items: &[Item<'_>]) -> Vec<Vec<usize>> {
    let mut groups: Vec<(&'static Route, Vec<usize>)> = Vec::new();
    for (index, item) in items.iter().enumerate() {
        match groups.iter_mut().find(|(route, _)| route.same_handler(item.route)) {
            Some((_, indexes)) => indexes.push(index),
            None => groups.push((item.route, vec![index])),
        }
    }
    groups.into_iter().map(|(_, indexes)| indexes).collect()
}

/// The group's ids in the inbox in one statement, then the new ones: an
/// event no typed table keeps into `event_rows`, and every one through its
/// handler's `write`. The first copy of an id in the batch is the one
/// applied. Says which items were new. A failure is the whole run's.
async fn write_group(tx: &mut PgConnection, inbox: &Inbox, group: &[&Prepared]) -> Result<Vec<bool>, Failure> {
    let route = group[0].route;
    let mut new_ids = match route.kind {
        Kind::Event => {
            let ids: Vec<&str> = group.iter().map(|p| p.message.id.as_str()).collect();
            inbox.record(tx, &ids).await?
        }
        Kind::Command => store::record_commands_in_inbox(tx, group).await?,
    };
    let fresh: Vec<bool> = group.iter().map(|p| new_ids.remove(&p.message.id)).collect();
    let writes: Vec<&Prepared> = group.iter().zip(&fresh).filter(|(_, f)| **f).map(|(p, _)| *p).collect();
    if writes.is_empty() {
        return Ok(fresh);
    }
    if route.kind == Kind::Event && !route.keeps_message() {
        store::store_events(tx, &writes).await?;
    }
    route.write(tx, &writes).instrument(handler_span(&writes)).await?;
    Ok(fresh)
}

/// The `handler` span of a write, named by the types it applies
/// (`handler DEVICE_UP` for one of them).
fn handler_span(batch: &[&Prepared]) -> Span {
    let mut types: Vec<&str> = Vec::new();
    for prepared in batch {
        if !types.contains(&prepared.route.message_type) {
            types.push(prepared.route.message_type);
        }
    }
    let types = types.join(", ");
    tracing::debug_span!(
        "handler",
        otel.name = %format_args!("handler {types}"),
        iot.message.type = %types,
        iot.batch.size = batch.len(),
    )
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
        self.together(items, spans).await
    }

    /// Runs `items` in one transaction. A run rolled back for nobody in
    /// particular goes again in two halves, each in one transaction,
    /// concurrently, down to a message alone: a bad message among many
    /// costs two runs per halving, not a run per message, and a transient
    /// failure that has passed commits the halves at once.
    fn together<'a, 'b: 'a>(&'a self, items: &'a [Item<'b>], spans: &'a [Span]) -> BoxFuture<'a, Vec<Tried>> {
        Box::pin(async move {
            let applied = self.apply.apply(items).instrument(transaction_span(spans)).await;
            if items.len() > 1 && applied.iter().all(|a| matches!(a, Applied::Again)) {
                let middle = items.len() / 2;
                let (first, second) = tokio::join!(
                    self.together(&items[..middle], &spans[..middle]),
                    self.together(&items[middle..], &spans[middle..]),
                );
                return first.into_iter().chain(second).collect();
            }
            let each = items.iter().zip(spans).zip(applied).map(|((item, span), applied)| {
                let tried = async move {
                    match applied {
                        Applied::Done(outcome) => Tried {
                            result: Ok(outcome),
                            in_process_retries: 0,
                        },
                        Applied::Failed(failure) => self.after_failure(item, failure).await,
                        Applied::Again => self.alone(item, self.policy.in_process_attempts, 0).await,
                    }
                };
                tried.instrument(span.clone())
            });
            join_all(each).await
        })
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
                Some(Applied::Again) | None => Err(Failure::Panic("a run of one message asked to run again".into())),
            }
        })
        .retry(self.policy.in_process_backoff(runs))
        .sleep(tokio::time::sleep)
        .when(|failure| self.retry_allowed(failure))
        .notify(|failure, delay| {
            retries += 1;
            tracing::debug!(message_id = %item.message.id, error.message = %failure, ?delay, "transient failure, retrying in process");
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
