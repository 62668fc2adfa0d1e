//! Several first deliveries applied in one transaction (micro-batching).
//!
//! Each message runs inside its own savepoint: a message whose handler
//! fails is rolled back to it and leaves the batch, and its batch-mates
//! commit. A failure of the batch itself (a lost connection, a failed
//! commit, the deadline, a panic) rolls everything back; the messages then
//! run again one by one, where the inbox makes a commit of unknown outcome
//! safe to repeat.

use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;
use sqlx::{PgConnection, PgPool};

use crate::envelope::Message;
use crate::failure::Failure;
use crate::handlers::Handler;
use crate::pipeline::Outcome;
use crate::store;

/// What the batch did with one message.
#[derive(Debug)]
pub enum Applied {
    /// Committed with the batch (processed, or a duplicate).
    Done(Outcome),
    /// Its own run failed and was rolled back; the rest committed.
    Failed(Failure),
    /// The batch failed as a whole: run it again, alone.
    Again,
}

/// Why a batch failed as a whole.
enum Abort {
    Database(sqlx::Error),
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
        Err(Abort::Database(e)) => {
            tracing::debug!(error.message = %e, size = items.len(), "batch rolled back; its messages run alone");
            items.iter().map(|_| Applied::Again).collect()
        }
        Err(Abort::Panic { index, text }) => (0..items.len())
            .map(|i| {
                if i == index {
                    Applied::Failed(Failure::Panic(text.clone()))
                } else {
                    Applied::Again
                }
            })
            .collect(),
    }
}

async fn run(pool: &PgPool, items: &[(&Message, &Handler)]) -> Result<Vec<Applied>, Abort> {
    let mut tx = pool.begin().await?;
    let mut applied = Vec::with_capacity(items.len());
    for (index, (message, handler)) in items.iter().enumerate() {
        sqlx::raw_sql("SAVEPOINT message").execute(&mut *tx).await?;
        let result = AssertUnwindSafe(apply_one(&mut tx, handler, message))
            .catch_unwind()
            .await
            .map_err(|panic| Abort::Panic {
                index,
                text: panic_text(&*panic),
            })?;
        match result {
            Ok(outcome) => {
                sqlx::raw_sql("RELEASE SAVEPOINT message").execute(&mut *tx).await?;
                applied.push(Applied::Done(outcome));
            }
            Err(failure) => {
                sqlx::raw_sql("ROLLBACK TO SAVEPOINT message; RELEASE SAVEPOINT message")
                    .execute(&mut *tx)
                    .await?;
                applied.push(Applied::Failed(failure));
            }
        }
    }
    tx.commit().await?;
    Ok(applied)
}

/// One message inside an open transaction: its inbox row, then its
/// handler; a message already in the inbox is a duplicate.
pub async fn apply_one(conn: &mut PgConnection, handler: &Handler, message: &Message) -> Result<Outcome, Failure> {
    if !store::record_in_inbox(conn, message).await? {
        return Ok(Outcome::Duplicate);
    }
    (handler.apply)(conn, message).await?;
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
