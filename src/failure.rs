//! Why a message failed, and what that means for it (docs/reliability.md,
//! "Error classes").
//!
//! [`Failure::is_transient`] and [`Failure::kind`] classify a failure; the
//! retry policy (`retry`) turns that into the message's fate. Their matches
//! have no `_` arm on purpose: a new failure must choose between retry and
//! park.

use std::fmt;

use crate::device_route::DeviceError;
use crate::envelope::{DecodeError, Kind, MessageType};

/// The `iot-error-kind` header values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorKind {
    Decode,
    Validation,
    UnknownType,
    Transient,
    Permanent,
    Panic,
    CrashLoop,
    AttemptsExhausted,
}

impl ErrorKind {
    /// Every kind, in header spelling order.
    pub const ALL: [ErrorKind; 8] = [
        ErrorKind::Decode,
        ErrorKind::Validation,
        ErrorKind::UnknownType,
        ErrorKind::Transient,
        ErrorKind::Permanent,
        ErrorKind::Panic,
        ErrorKind::CrashLoop,
        ErrorKind::AttemptsExhausted,
    ];

    /// The header spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Decode => "decode",
            ErrorKind::Validation => "validation",
            ErrorKind::UnknownType => "unknown_type",
            ErrorKind::Transient => "transient",
            ErrorKind::Permanent => "permanent",
            ErrorKind::Panic => "panic",
            ErrorKind::CrashLoop => "crash_loop",
            ErrorKind::AttemptsExhausted => "attempts_exhausted",
        }
    }

    /// Parses the header spelling.
    pub fn parse(text: &str) -> Option<ErrorKind> {
        ErrorKind::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why `data` does not fit its handler. Always permanent. An empty
/// `field` is `data` itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationError {
    pub field: String,
    pub problem: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.field.as_str() {
            "" => write!(f, "data {}", self.problem),
            field => write!(f, "data.{field} {}", self.problem),
        }
    }
}

impl ValidationError {
    pub fn new(field: &str, problem: impl Into<String>) -> ValidationError {
        ValidationError {
            field: field.to_owned(),
            problem: problem.into(),
        }
    }
}

/// A delivery that did not end processed, duplicate or omitted.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// A raw device message that does not fit its route (or its handler),
    /// said of its MQTT topic.
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("no handler for {} type {message_type}", kind.as_str())]
    UnknownType { kind: Kind, message_type: String },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("handler panicked: {0}")]
    Panic(String),
    #[error("delivery {deliveries} of a message that never settled: it may crash the worker")]
    CrashLoop { deliveries: u32 },
}

/// A delivery that failed, with what is known of it: the message type when
/// the envelope could be decoded that far.
#[derive(Debug)]
pub struct Failed {
    pub message_type: Option<MessageType>,
    pub failure: Failure,
}

impl Failed {
    /// A failure before the message type was known.
    pub fn untyped(failure: impl Into<Failure>) -> Failed {
        Failed {
            message_type: None,
            failure: failure.into(),
        }
    }
}

impl Failure {
    /// A panic, with the text of its payload.
    pub fn from_panic(payload: &(dyn std::any::Any + Send)) -> Failure {
        Failure::Panic(panic_text(payload))
    }

    /// Whether running the same transaction again may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Failure::Decode(_)
            | Failure::Invalid(_)
            | Failure::Device(_)
            | Failure::UnknownType { .. }
            | Failure::Panic(_)
            | Failure::CrashLoop { .. } => false,
            Failure::Database(e) => is_transient_database_error(e),
        }
    }

    /// The kind a parked copy carries when this failure parks it directly.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Failure::Decode(_) => ErrorKind::Decode,
            Failure::Invalid(_) => ErrorKind::Validation,
            Failure::Device(e) if e.undecodable => ErrorKind::Decode,
            Failure::Device(_) => ErrorKind::Validation,
            Failure::UnknownType { .. } => ErrorKind::UnknownType,
            Failure::Panic(_) => ErrorKind::Panic,
            Failure::CrashLoop { .. } => ErrorKind::CrashLoop,
            Failure::Database(_) if self.is_transient() => ErrorKind::Transient,
            Failure::Database(_) => ErrorKind::Permanent,
        }
    }
}

/// Whether a SQLSTATE means "try again in a new transaction"
/// (docs/reliability.md, "Error classes" and "Database failover"): the one
/// place that list lives.
///
/// * `40001` serialization failure, `40P01` deadlock, `55P03` lock not
///   available: another transaction was in the way;
/// * `57014` query cancelled: the worker's own `statement_timeout` fired,
///   so that no statement blocks a delivery forever;
/// * `25006` read-only transaction: the primary was demoted (an HA
///   failover) or is in recovery; writes work again on the new primary;
/// * `57P01`/`57P02`/`57P03`: the server is shutting down or starting up;
/// * class `08`: the connection failed;
/// * class `53`: out of resources (disk full, out of memory, too many
///   connections);
/// * class `58`: a system error outside PostgreSQL (an I/O error).
///
/// Every other code (constraint and data errors above all) is permanent:
/// the same transaction would fail the same way.
pub fn is_transient_sqlstate(code: &str) -> bool {
    matches!(
        code,
        "40001" | "40P01" | "55P03" | "57014" | "25006" | "57P01" | "57P02" | "57P03"
    ) || ["08", "53", "58"].iter().any(|class| code.starts_with(class))
}

/// Database errors that a new transaction may not hit again: the
/// SQLSTATEs of [`is_transient_sqlstate`], and the sqlx errors of a lost,
/// refused or exhausted connection. A connection lost during COMMIT leaves
/// the outcome unknown; the inbox makes the retry safe.
pub fn is_transient_database_error(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| is_transient_sqlstate(&code)),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed => true,
        // sqlx::Error is non-exhaustive: anything else (decode errors, row
        // not found, type errors) is a bug that retrying cannot fix.
        _ => false,
    }
}

/// Whether the database itself failed, whatever was asked of it: the
/// connection was lost, refused or never came (I/O, TLS, the pool, the
/// deadline). A run of several messages that fails so is not helped by
/// running them in smaller groups.
pub fn is_database_unreachable(error: &sqlx::Error) -> bool {
    matches!(
        error,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
    )
}

/// The text of a panic's payload.
pub fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_validation_error_names_its_field_or_data_itself() {
        let field = ValidationError::new("device_id", "is missing");
        assert_eq!(field.to_string(), "data.device_id is missing");
        let whole = ValidationError::new("", "must be a JSON object");
        assert_eq!(whole.to_string(), "data must be a JSON object");
    }

    #[test]
    fn kinds_round_trip() {
        for kind in ErrorKind::ALL {
            assert_eq!(ErrorKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(ErrorKind::parse("other"), None);
    }

    #[test]
    fn classifies_database_errors() {
        assert!(is_transient_database_error(&sqlx::Error::PoolTimedOut));
        assert!(!is_transient_database_error(&sqlx::Error::RowNotFound));
        let f = Failure::Database(sqlx::Error::PoolTimedOut);
        assert_eq!(f.kind(), ErrorKind::Transient);
        let f = Failure::Database(sqlx::Error::RowNotFound);
        assert_eq!(f.kind(), ErrorKind::Permanent);
    }

    /// One case per code: a failover or a server short of resources is
    /// retried, never parked.
    #[test]
    fn failover_and_resource_sqlstates_are_transient() {
        let transient = [
            ("40001", "serialization failure"),
            ("40P01", "deadlock detected"),
            ("55P03", "lock not available"),
            ("57014", "statement timeout"),
            ("25006", "read-only transaction: a demoted primary"),
            ("57P01", "admin shutdown"),
            ("57P02", "crash shutdown"),
            ("57P03", "cannot connect now: starting up"),
            ("08006", "connection failure"),
            ("08001", "unable to connect"),
            ("53100", "disk full"),
            ("53200", "out of memory"),
            ("53300", "too many connections"),
            ("53400", "configuration limit exceeded"),
            ("58000", "system error"),
            ("58030", "I/O error"),
        ];
        for (code, what) in transient {
            assert!(is_transient_sqlstate(code), "{code} ({what}) must be retried");
        }
    }

    #[test]
    fn constraint_and_data_sqlstates_are_permanent() {
        let permanent = [
            ("23505", "unique violation"),
            ("23503", "foreign key violation"),
            ("22P02", "invalid text representation"),
            ("42P01", "undefined table"),
            ("25001", "active SQL transaction"),
            ("57000", "operator intervention, other than the 57P0x shutdowns"),
        ];
        for (code, what) in permanent {
            assert!(!is_transient_sqlstate(code), "{code} ({what}) must be parked");
        }
    }
}
