//! Why a message failed, and what that means for it (SPEC §2.3).
//!
//! [`Failure::disposition`] is the one place that decides a failed
//! message's fate. Its matches have no `_` arm on purpose: a new failure
//! must choose between retry and park.

use std::fmt;

use crate::envelope::DecodeError;
use crate::handlers::ValidationError;
use crate::topology::Topology;

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

/// A delivery that did not end processed, duplicate or omitted.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("no handler for {kind} type {message_type}")]
    UnknownType { kind: &'static str, message_type: String },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("handler panicked: {0}")]
    Panic(String),
    #[error("delivery {deliveries} of a message that never settled: it may crash the worker")]
    CrashLoop { deliveries: u32 },
}

/// What happens to a failed delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Publish to the retry queue of delayed retry `retry` (1-based), then ack.
    RetryLater { retry: u32 },
    /// Publish to the DLQ with this kind, then ack.
    Park { kind: ErrorKind },
}

impl Failure {
    /// Whether running the same transaction again may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Failure::Decode(_)
            | Failure::Invalid(_)
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
            Failure::UnknownType { .. } => ErrorKind::UnknownType,
            Failure::Panic(_) => ErrorKind::Panic,
            Failure::CrashLoop { .. } => ErrorKind::CrashLoop,
            Failure::Database(_) if self.is_transient() => ErrorKind::Transient,
            Failure::Database(_) => ErrorKind::Permanent,
        }
    }

    /// The fate of a delivery that failed with `self`, after `retries`
    /// delayed retries so far (its `iot-retry-count`).
    pub fn disposition(&self, retries: u32, topology: &Topology) -> Disposition {
        retry_decision(self.is_transient(), self.kind(), retries, topology.max_attempts)
    }
}

/// The pure retry policy: permanent failures park at once; transient ones
/// retry until the delivery that failed was the `max_attempts`-th.
pub fn retry_decision(transient: bool, kind: ErrorKind, retries: u32, max_attempts: u32) -> Disposition {
    if !transient {
        return Disposition::Park { kind };
    }
    // This delivery was attempt `retries + 1`.
    if retries.saturating_add(1) >= max_attempts {
        Disposition::Park {
            kind: ErrorKind::AttemptsExhausted,
        }
    } else {
        Disposition::RetryLater { retry: retries + 1 }
    }
}

/// SQLSTATEs and sqlx errors that a new transaction may not hit again
/// (SPEC §10), plus 57014 (`statement_timeout` fired: the worker sets it so
/// that no statement blocks a delivery forever). A connection lost during COMMIT leaves the outcome unknown;
/// the inbox makes the retry safe.
pub fn is_transient_database_error(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            matches!(
                code.as_ref(),
                "40001" | "40P01" | "55P03" | "57014" | "57P01" | "57P02" | "57P03" | "53300"
            ) || code.starts_with("08")
        }),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip() {
        for kind in ErrorKind::ALL {
            assert_eq!(ErrorKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(ErrorKind::parse("other"), None);
    }

    #[test]
    fn permanent_failures_park_at_once() {
        let d = retry_decision(false, ErrorKind::Validation, 0, 5);
        assert_eq!(
            d,
            Disposition::Park {
                kind: ErrorKind::Validation
            }
        );
    }

    #[test]
    fn transient_failures_retry_until_max_attempts() {
        assert_eq!(
            retry_decision(true, ErrorKind::Transient, 0, 3),
            Disposition::RetryLater { retry: 1 }
        );
        assert_eq!(
            retry_decision(true, ErrorKind::Transient, 1, 3),
            Disposition::RetryLater { retry: 2 }
        );
        assert_eq!(
            retry_decision(true, ErrorKind::Transient, 2, 3),
            Disposition::Park {
                kind: ErrorKind::AttemptsExhausted
            }
        );
        assert_eq!(
            retry_decision(true, ErrorKind::Transient, 0, 1),
            Disposition::Park {
                kind: ErrorKind::AttemptsExhausted
            }
        );
        assert_eq!(
            retry_decision(true, ErrorKind::Transient, u32::MAX, 3),
            Disposition::Park {
                kind: ErrorKind::AttemptsExhausted
            }
        );
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

    mod properties {
        use proptest::prelude::*;

        use super::*;
        use crate::topology::Topology;

        fn any_kind() -> impl Strategy<Value = ErrorKind> {
            proptest::sample::select(ErrorKind::ALL.to_vec())
        }

        proptest! {
            /// Following the policy from the first delivery, a message that
            /// keeps failing transiently is parked after exactly
            /// `max_attempts` deliveries, never more.
            #[test]
            fn transient_failures_park_after_max_attempts(max_attempts in 1u32..=100) {
                let mut retries = 0;
                let mut deliveries = 1;
                loop {
                    match retry_decision(true, ErrorKind::Transient, retries, max_attempts) {
                        Disposition::RetryLater { retry } => {
                            prop_assert_eq!(retry, retries + 1, "retry count grows by one");
                            retries = retry;
                            deliveries += 1;
                            prop_assert!(deliveries <= max_attempts);
                        }
                        Disposition::Park { kind } => {
                            prop_assert_eq!(kind, ErrorKind::AttemptsExhausted);
                            break;
                        }
                    }
                }
                prop_assert_eq!(deliveries, max_attempts);
            }

            /// Whatever retry count a (possibly forged) header claims, the
            /// policy never retries past the limit.
            #[test]
            fn any_retry_count_at_or_past_the_limit_parks(max_attempts in 1u32..=100, retries in 0u32..=u32::MAX) {
                let d = retry_decision(true, ErrorKind::Transient, retries, max_attempts);
                if retries.saturating_add(1) >= max_attempts {
                    prop_assert_eq!(d, Disposition::Park { kind: ErrorKind::AttemptsExhausted });
                } else {
                    prop_assert_eq!(d, Disposition::RetryLater { retry: retries + 1 });
                }
            }

            /// Permanent failures park at once with their own kind.
            #[test]
            fn permanent_failures_never_retry(kind in any_kind(), retries in any::<u32>(), max_attempts in 1u32..=100) {
                prop_assert_eq!(retry_decision(false, kind, retries, max_attempts), Disposition::Park { kind });
            }

            /// Retry n waits at least as long as retry n - 1.
            #[test]
            fn delays_never_decrease(mut millis in proptest::collection::vec(1u64..=86_400_000, 1..8), n in 1u32..50) {
                millis.sort_unstable();
                let delays: Vec<String> = millis.iter().map(|ms| format!("\"{ms}ms\"")).collect();
                let text = format!(
                    "queue_type = \"classic\"\ndelivery_limit = 3\n[retry]\ndelays = [{}]\nmax_attempts = 5\n",
                    delays.join(", ")
                );
                let topology = Topology::parse(&text).map_err(TestCaseError::fail)?;
                prop_assert!(topology.retry_delay(n + 1).delay >= topology.retry_delay(n).delay);
            }
        }
    }
}
