//! Readiness: whether the worker can do its job now, and if not, why
//! (docs/observability.md, "Endpoints and readiness"). `/readyz` answers from
//! it, and it keeps the `iot_ready`, `iot_database_up` and
//! `iot_broker_blocked` gauges of the worker's [`Metrics`] in step.
//!
//! Ready means: a broker session is consuming, the last database check
//! passed ([`crate::health`] checks in the background), and the broker
//! blocks none of the worker's publishing connections.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use metrics::Gauge;

use crate::metrics::Metrics;
use crate::store::DatabaseWait;

/// Why the database counts as unreachable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DatabaseDown {
    /// No check has run yet.
    #[error("not checked yet")]
    NotChecked,
    /// The check failed with this error.
    #[error(transparent)]
    Error(Arc<sqlx::Error>),
    /// The check got no answer in time.
    #[error("no answer to SELECT 1 within {0:?}")]
    NoAnswer(Duration),
    /// The worker has not reached its database since it started, and
    /// waits for it (docs/operations.md, "The database at start").
    #[error("waiting for it at start-up: {0}")]
    Starting(DatabaseWait),
}

/// One reason the worker is not ready.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Reason {
    #[error("not connected to RabbitMQ (not consuming)")]
    NotConsuming,
    #[error("database unreachable: {0}")]
    Database(#[source] DatabaseDown),
    /// The broker blocks a publishing connection (a memory or disk alarm),
    /// with the reason it gave.
    #[error("RabbitMQ blocks the {connection} connection: {reason}")]
    Blocked { connection: &'static str, reason: String },
}

/// Every reason the worker is not ready, in a fixed order.
#[derive(Debug, Clone)]
pub struct NotReady(pub Vec<Reason>);

impl fmt::Display for NotReady {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, reason) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{reason}")?;
        }
        Ok(())
    }
}

impl std::error::Error for NotReady {}

/// The worker's readiness, set by the parts that know each half.
pub struct Readiness {
    /// Connected to the broker and consuming.
    consuming: AtomicBool,
    /// The last database check.
    database: Mutex<Result<(), DatabaseDown>>,
    /// The publishing connections the broker blocks now, with its reason.
    blocked: Mutex<BTreeMap<&'static str, String>>,
    gauges: Gauges,
}

/// The gauges readiness keeps.
struct Gauges {
    ready: Gauge,
    database_up: Gauge,
    blocked: Gauge,
}

impl Readiness {
    /// Not ready (nothing consuming, the database not checked), with its
    /// gauges in `metrics`.
    pub fn new(metrics: &Metrics) -> Readiness {
        let readiness = Readiness {
            consuming: AtomicBool::new(false),
            database: Mutex::new(Err(DatabaseDown::NotChecked)),
            blocked: Mutex::default(),
            gauges: Gauges {
                ready: metrics.readiness_gauge(),
                database_up: metrics.database_up_gauge(),
                blocked: metrics.broker_blocked_gauge(),
            },
        };
        readiness.gauges.blocked.set(0.0);
        readiness.gauges.database_up.set(0.0);
        readiness.refresh();
        readiness
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.check().is_ok()
    }

    /// `Ok` when ready.
    ///
    /// # Errors
    /// [`NotReady`] with every reason.
    pub fn check(&self) -> Result<(), NotReady> {
        let mut reasons = Vec::new();
        if !self.consuming.load(Ordering::SeqCst) {
            reasons.push(Reason::NotConsuming);
        }
        if let Err(down) = &*self.database.lock().unwrap_or_else(PoisonError::into_inner) {
            reasons.push(Reason::Database(down.clone()));
        }
        for (connection, reason) in &*self.blocked.lock().unwrap_or_else(PoisonError::into_inner) {
            reasons.push(Reason::Blocked {
                connection,
                reason: reason.clone(),
            });
        }
        match reasons.is_empty() {
            true => Ok(()),
            false => Err(NotReady(reasons)),
        }
    }

    /// Set by the supervisor: a broker session is consuming (or not).
    pub(crate) fn set_consuming(&self, consuming: bool) {
        self.consuming.store(consuming, Ordering::SeqCst);
        self.refresh();
    }

    /// Set when the broker blocks the publishing `connection` (`copies` or
    /// `outbox relay`) with `reason`, and unblocks it (`None`).
    pub(crate) fn set_broker_blocked(&self, connection: &'static str, reason: Option<&str>) {
        let any = {
            let mut blocked = self.blocked.lock().unwrap_or_else(PoisonError::into_inner);
            match reason {
                Some(reason) => blocked.insert(connection, reason.to_owned()),
                None => blocked.remove(connection),
            };
            !blocked.is_empty()
        };
        self.gauges.blocked.set(f64::from(u8::from(any)));
        self.refresh();
    }

    /// Set by the database check: the result of the last check.
    pub(crate) fn set_database(&self, result: Result<(), DatabaseDown>) {
        self.gauges.database_up.set(f64::from(u8::from(result.is_ok())));
        *self.database.lock().unwrap_or_else(PoisonError::into_inner) = result;
        self.refresh();
    }

    fn refresh(&self) {
        self.gauges.ready.set(f64::from(u8::from(self.is_ready())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_the_broker_and_the_database() {
        let metrics = Metrics::new();
        let readiness = Readiness::new(&metrics);
        assert!(metrics.render().contains("iot_ready 0\n"));
        assert_eq!(
            readiness.check().unwrap_err().to_string(),
            "not connected to RabbitMQ (not consuming); database unreachable: not checked yet"
        );
        readiness.set_consuming(true);
        assert!(matches!(
            &readiness.check().unwrap_err().0[..],
            [Reason::Database(DatabaseDown::NotChecked)]
        ));
        readiness.set_database(Ok(()));
        assert!(readiness.check().is_ok());
        assert!(metrics.render().contains("iot_ready 1\n"));
        assert!(metrics.render().contains("iot_database_up 1\n"));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        readiness.set_database(Err(DatabaseDown::Error(Arc::new(sqlx::Error::Io(refused)))));
        let not_ready = readiness.check().unwrap_err();
        assert_eq!(
            not_ready.to_string(),
            "database unreachable: error communicating with database: connection refused"
        );
        let cause = std::error::Error::source(&not_ready.0[0]).expect("the database error is kept");
        assert!(cause.to_string().contains("connection refused"), "{cause}");
        assert!(metrics.render().contains("iot_ready 0\n"));
        assert!(metrics.render().contains("iot_database_up 0\n"));
    }

    /// While the worker waits for its database at start, `/readyz` names
    /// the database and the cause.
    #[test]
    fn a_worker_waiting_for_its_database_says_which_and_why() {
        let readiness = Readiness::new(&Metrics::new());
        readiness.set_consuming(true);
        let refused = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let wait = DatabaseWait {
            target: "database 'lot' on db.example:6432 as user 'iot'".into(),
            cause: crate::store::Cause::of(&refused),
        };
        readiness.set_database(Err(DatabaseDown::Starting(wait)));
        assert_eq!(
            readiness.check().unwrap_err().to_string(),
            "database unreachable: waiting for it at start-up: database 'lot' on db.example:6432 as user 'iot': \
             connection refused (is PostgreSQL running there?)"
        );
    }

    #[test]
    fn a_blocked_publisher_shows_in_the_gauge_and_in_readiness() {
        let metrics = Metrics::new();
        let readiness = Readiness::new(&metrics);
        readiness.set_consuming(true);
        readiness.set_database(Ok(()));
        assert!(metrics.render().contains("iot_broker_blocked 0\n"));
        readiness.set_broker_blocked("copies", Some("low on memory"));
        readiness.set_broker_blocked("outbox relay", Some("low on memory"));
        assert!(metrics.render().contains("iot_broker_blocked 1\n"));
        assert_eq!(
            readiness.check().unwrap_err().to_string(),
            "RabbitMQ blocks the copies connection: low on memory; RabbitMQ blocks the outbox relay connection: low on memory"
        );
        readiness.set_broker_blocked("copies", None);
        assert!(
            metrics.render().contains("iot_broker_blocked 1\n"),
            "the relay is still blocked"
        );
        readiness.set_broker_blocked("outbox relay", None);
        assert!(metrics.render().contains("iot_broker_blocked 0\n"));
        assert!(readiness.is_ready());
    }
}
