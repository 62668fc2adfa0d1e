//! Crash-loop protection (docs/reliability.md, "Crash loops"), the most
//! delicate invariant of the crate, in one place.
//!
//! A message that crashes the process is redelivered to the next one, and
//! would crash it too, forever. So:
//!
//! * a redelivered message runs alone ([`CrashGuard::admit`] takes the
//!   isolation lock for writing; first deliveries share it): a message
//!   that crashed the process cannot take innocent ones down with it again;
//! * before it runs, its redelivery is counted in `delivery_attempts` and
//!   committed, so a crash cannot lose the count. Only a new process adds
//!   one: a redelivery after a broker reconnect of the same process is no
//!   crash;
//! * once its deliveries reach `min(delivery_limit, max_attempts)` it is
//!   parked as `crash_loop` instead of run. On quorum queues
//!   `x-delivery-limit` stays as the broker's backstop; it dead-letters
//!   only after limit + 1 deliveries, so the worker parks first, with
//!   headers;
//! * settling the message forgets its count ([`Permit::settled`]); a run
//!   cut off by the end of the shutdown grace period takes its count back
//!   ([`CrashGuard::cut_off`]). A permit dropped otherwise (the process
//!   dies, the delivery is left unacked) keeps it: that is the crash
//!   being counted.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;
use lapin::message::Delivery;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::failure::Failure;
use crate::store;

/// How long taking back a count may take: the process is stopping.
const CUT_OFF_TIMEOUT: Duration = Duration::from_secs(1);

/// The crash-loop state of one worker process.
pub struct CrashGuard {
    pool: PgPool,
    /// Unique to this run of the worker: a redelivery started by another
    /// process means the last one did not survive the message.
    boot_id: String,
    /// Deliveries of one message before it is parked.
    limit: u32,
    isolation: RwLock<()>,
    /// Redelivered deliveries in flight, by [`delivery_key`].
    in_flight: Mutex<HashMap<String, u32>>,
}

/// Who may run when: the admission layer of the delivery flow.
pub trait Admission: Send + Sync {
    /// Waits until `deliveries` (first deliveries, or one redelivered
    /// delivery alone) may run.
    fn admit<'a>(&'a self, deliveries: &'a [Delivery]) -> BoxFuture<'a, Admitted<'a>>;

    /// A delivery whose run was cut off by the end of the shutdown grace
    /// period.
    fn cut_off<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, ()>;
}

/// Deliveries let in.
pub struct Admitted<'a> {
    /// Held until they are settled.
    pub permit: Box<dyn Release<'a> + 'a>,
    /// For each delivery, the failure to settle it with instead of running
    /// it, if it may not run.
    pub refused: Vec<Option<Failure>>,
}

/// Ends an admission once its deliveries are settled.
pub trait Release<'a>: Send {
    fn settled(self: Box<Self>) -> BoxFuture<'a, ()>;
}

impl Admission for CrashGuard {
    fn admit<'a>(&'a self, deliveries: &'a [Delivery]) -> BoxFuture<'a, Admitted<'a>> {
        Box::pin(async move {
            let (permit, refused) = match deliveries {
                [one] => match self.admit_one(one).await {
                    Verdict::Run(permit) => (permit, None),
                    Verdict::Fail(permit, failure) => (permit, Some(failure)),
                },
                _ => (self.share().await, None),
            };
            let mut refused = vec![refused];
            refused.resize_with(deliveries.len(), || None);
            Admitted {
                permit: Box::new(permit),
                refused,
            }
        })
    }

    fn cut_off<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, ()> {
        Box::pin(self.take_back(delivery))
    }
}

impl<'a> Release<'a> for Permit<'a> {
    fn settled(self: Box<Self>) -> BoxFuture<'a, ()> {
        Box::pin((*self).settled())
    }
}

/// Whether a delivery may run.
enum Verdict<'a> {
    Run(Permit<'a>),
    /// Settle it with this failure instead of running it: a crash loop
    /// (parked), or a database error while counting (retried later).
    Fail(Permit<'a>, Failure),
}

/// Held while a delivery runs and settles.
pub struct Permit<'a> {
    guard: &'a CrashGuard,
    _lock: Lock<'a>,
    redelivered: Option<InFlightCopy<'a>>,
}

/// Held, never read: releasing it on drop is its job.
enum Lock<'a> {
    Shared { _guard: RwLockReadGuard<'a, ()> },
    Alone { _guard: RwLockWriteGuard<'a, ()> },
}

impl CrashGuard {
    /// A guard for a new worker process; `limit` is the topology's
    /// crash-loop limit.
    pub fn new(pool: PgPool, limit: u32) -> CrashGuard {
        CrashGuard {
            pool,
            boot_id: format!("{}-{}", std::process::id(), chrono::Utc::now().timestamp_micros()),
            limit,
            isolation: RwLock::new(()),
            in_flight: Mutex::default(),
        }
    }

    /// Lets first deliveries run (a batch of them) alongside others.
    async fn share(&self) -> Permit<'_> {
        Permit {
            guard: self,
            _lock: Lock::Shared {
                _guard: self.isolation.read().await,
            },
            redelivered: None,
        }
    }

    /// Lets a first delivery run alongside others; makes a redelivered one
    /// wait to run alone, then counts it, and refuses it at the limit.
    async fn admit_one<'a>(&'a self, delivery: &Delivery) -> Verdict<'a> {
        if !delivery.redelivered {
            return Verdict::Run(self.share().await);
        }
        // Copies with the same id and body share one count row: only the
        // last of them in flight here forgets it.
        let copy = InFlightCopy::enter(&self.in_flight, delivery_key(delivery));
        // Counting happens only once the message is about to run alone, so
        // messages that were merely in flight when another one crashed the
        // process are not blamed.
        let lock = Lock::Alone {
            _guard: self.isolation.write().await,
        };
        let counted = store::deadline(count_redelivery(&self.pool, &copy.key, &self.boot_id)).await;
        let permit = Permit {
            guard: self,
            _lock: lock,
            redelivered: Some(copy),
        };
        match counted {
            Ok(redeliveries) if redeliveries.saturating_add(1) >= self.limit => Verdict::Fail(
                permit,
                Failure::CrashLoop {
                    deliveries: redeliveries.saturating_add(1),
                },
            ),
            Ok(_) => Verdict::Run(permit),
            Err(e) => Verdict::Fail(permit, Failure::Database(e)),
        }
    }

    /// A redelivered delivery whose run was cut off by the end of the
    /// shutdown grace period: that was no crash, so the count its run added
    /// is taken back (a slow message must not be parked as a crash loop by
    /// rolling restarts). Bounded, since the process is stopping.
    async fn take_back(&self, delivery: &Delivery) {
        if !delivery.redelivered {
            return;
        }
        let key = delivery_key(delivery);
        let uncount = uncount_redelivery(&self.pool, &key, &self.boot_id);
        match tokio::time::timeout(CUT_OFF_TIMEOUT, uncount).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error.message = %e, "could not take back a redelivery count"),
            Err(_) => tracing::debug!("taking back a redelivery count timed out"),
        }
    }

    /// Deletes counts left behind by processes that died between settling
    /// a message and forgetting its count. Run at start-up.
    pub async fn prune(&self) {
        match prune_redelivery_counts(&self.pool).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "pruned stale redelivery counts"),
            Err(e) => tracing::warn!(error.message = %e, "could not prune stale redelivery counts"),
        }
    }
}

impl Permit<'_> {
    /// The delivery was settled: its count is forgotten, once no other copy
    /// of it is in flight here.
    async fn settled(self) {
        let Some(copy) = &self.redelivered else {
            return;
        };
        if copy.is_last()
            && let Err(e) = store::deadline(forget_redeliveries(&self.guard.pool, &copy.key)).await
        {
            tracing::debug!(error.message = %e, "could not forget a redelivery count");
        }
    }
}

/// One redelivered copy of a message in flight in this process; leaving
/// (on drop) takes it off the in-flight count.
struct InFlightCopy<'a> {
    copies: &'a Mutex<HashMap<String, u32>>,
    key: String,
}

impl<'a> InFlightCopy<'a> {
    fn enter(copies: &'a Mutex<HashMap<String, u32>>, key: String) -> InFlightCopy<'a> {
        *lock(copies).entry(key.clone()).or_insert(0) += 1;
        InFlightCopy { copies, key }
    }

    /// Whether no other copy of the message is in flight here.
    fn is_last(&self) -> bool {
        lock(self.copies).get(&self.key).is_none_or(|n| *n <= 1)
    }
}

impl Drop for InFlightCopy<'_> {
    fn drop(&mut self) {
        let mut copies = lock(self.copies);
        if let Some(n) = copies.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                copies.remove(&self.key);
            }
        }
    }
}

/// The map stays consistent even if a holder panicked: every update is a
/// single step.
fn lock(copies: &Mutex<HashMap<String, u32>>) -> MutexGuard<'_, HashMap<String, u32>> {
    copies.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Identifies a delivery across redeliveries: its AMQP message id and body.
fn delivery_key(delivery: &Delivery) -> String {
    let mut hasher = Sha256::new();
    if let Some(id) = delivery.properties.message_id() {
        hasher.update(id.as_str().as_bytes());
    }
    hasher.update([0]);
    hasher.update(&delivery.data);
    hex::encode(hasher.finalize())
}

/// Counts a redelivery of the delivery with `key` that this process (its
/// `boot_id`) is about to start, committed at once so a crash cannot lose
/// the count. Redeliveries started by the same process as the last one (after
/// a broker reconnect) are not counted again: only a new process, that is a
/// crash or restart while the message ran, adds one. Returns the count.
///
/// # Errors
/// The database error.
async fn count_redelivery(pool: &PgPool, key: &str, boot_id: &str) -> Result<u32, sqlx::Error> {
    let n: i32 = sqlx::query_scalar(
        "INSERT INTO delivery_attempts (delivery_key, redeliveries, boot_id) VALUES ($1, 1, $2)
         ON CONFLICT (delivery_key) DO UPDATE
         SET redeliveries = delivery_attempts.redeliveries
                 + CASE WHEN delivery_attempts.boot_id = EXCLUDED.boot_id THEN 0 ELSE 1 END,
             boot_id = EXCLUDED.boot_id,
             last_seen_at = now()
         RETURNING redeliveries",
    )
    .bind(key)
    .bind(boot_id)
    .fetch_one(pool)
    .await?;
    Ok(u32::try_from(n).unwrap_or(0))
}

/// Takes back the count that this process (`boot_id`) added for `key`,
/// once: the run it counted was cut off by a shutdown, not a crash. The row
/// is marked so that a second cut-off copy takes nothing more back, and the
/// next process counts afresh.
///
/// # Errors
/// The database error.
async fn uncount_redelivery(pool: &PgPool, key: &str, boot_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE delivery_attempts SET redeliveries = redeliveries - 1, boot_id = 'cut-off ' || boot_id
         WHERE delivery_key = $1 AND boot_id = $2",
    )
    .bind(key)
    .bind(boot_id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Deletes redelivery counts not touched for a week: left behind when a
/// process died between settling a message and forgetting its count.
///
/// # Errors
/// The database error.
async fn prune_redelivery_counts(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let result = sqlx::query("DELETE FROM delivery_attempts WHERE last_seen_at < now() - interval '7 days'")
        .execute(pool)
        .await?;
    Ok(result.rows_affected())
}

/// Forgets the redelivery count of a settled delivery.
///
/// # Errors
/// The database error.
async fn forget_redeliveries(pool: &PgPool, key: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM delivery_attempts WHERE delivery_key = $1")
        .bind(key)
        .execute(pool)
        .await?;
    Ok(())
}
