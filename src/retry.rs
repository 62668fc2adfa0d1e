//! The retry policy (docs/reliability.md, "Retries"), in one place: what
//! happens to a failed delivery, and every backoff the worker waits by.
//!
//! Everything here is pure. [`RetryPolicy::disposition`] decides a failed
//! delivery's fate from the failure and its history; the pipeline only
//! executes that decision.

use std::time::Duration;

use backon::ExponentialBuilder;

use crate::failure::{ErrorKind, Failure};

/// Stage 1: the shortest and longest sleep between in-process runs.
const IN_PROCESS_MIN_DELAY: Duration = Duration::from_millis(50);
const IN_PROCESS_MAX_DELAY: Duration = Duration::from_millis(500);
/// Stage 1 sleeps at most this long in all before handing over to stage 2.
const IN_PROCESS_TOTAL_DELAY: Duration = Duration::from_secs(2);

/// One delayed-retry stage: messages wait in `Q.retry.<name>` for `delay`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryDelay {
    /// As written in the topology file (`50ms`, `1s`, `5m`): the queue
    /// name suffix.
    pub name: String,
    pub delay: Duration,
}

/// The `[retry]` table of the topology file, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Never empty, never decreasing.
    pub delays: Vec<RetryDelay>,
    /// Deliveries in total (first try plus delayed retries) before parking.
    pub max_attempts: u32,
    /// Stage 1: runs of one delivery's transaction in process (first run
    /// included) before it goes to a retry queue.
    pub in_process_attempts: u32,
}

/// What happens to a failed delivery. The delivery is acked once the copy
/// is confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Publish to `queue`, the retry queue of delayed retry `retry`
    /// (1-based).
    RetryLater { retry: u32, queue: String },
    /// Publish to the DLQ with this kind.
    Park { kind: ErrorKind },
}

impl RetryPolicy {
    /// The fate of a delivery that failed with `failure` after `retries`
    /// delayed retries so far (its `iot-retry-count`). `retry_queue` names
    /// the queue of a delay.
    pub fn disposition(
        &self,
        failure: &Failure,
        retries: u32,
        retry_queue: impl FnOnce(&RetryDelay) -> String,
    ) -> Disposition {
        match next_retry(failure.is_transient(), failure.kind(), retries, self.max_attempts) {
            Ok(retry) => Disposition::RetryLater {
                retry,
                queue: retry_queue(self.delay(retry)),
            },
            Err(kind) => Disposition::Park { kind },
        }
    }

    /// The delay of delayed retry `n` (1-based): the `n`-th delay, the last
    /// one repeating.
    pub fn delay(&self, n: u32) -> &RetryDelay {
        let index = usize::try_from(n.saturating_sub(1)).unwrap_or(usize::MAX);
        // The topology parser guarantees at least one delay.
        &self.delays[index.min(self.delays.len() - 1)]
    }

    /// Stage 1: jittered exponential backoff between at most `runs`
    /// in-process runs of one transaction (`in_process_attempts`, or fewer
    /// when a run in a batch already failed).
    pub fn in_process_backoff(&self, runs: u32) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(IN_PROCESS_MIN_DELAY)
            .with_max_delay(IN_PROCESS_MAX_DELAY)
            .with_max_times(runs.min(self.in_process_attempts).saturating_sub(1) as usize)
            .with_total_delay(Some(IN_PROCESS_TOTAL_DELAY))
            .with_jitter()
    }
}

/// The pure core of the policy: `Ok(retry)` to retry later as delayed retry
/// `retry`, or `Err(kind)` to park. Permanent failures park at once;
/// transient ones retry until the delivery that failed was the
/// `max_attempts`-th.
///
/// # Errors
/// The kind to park with.
pub fn next_retry(transient: bool, kind: ErrorKind, retries: u32, max_attempts: u32) -> Result<u32, ErrorKind> {
    if !transient {
        return Err(kind);
    }
    // This delivery was attempt `retries + 1`.
    if retries.saturating_add(1) >= max_attempts {
        Err(ErrorKind::AttemptsExhausted)
    } else {
        Ok(retries + 1)
    }
}

/// The first reconnect delay, before jitter.
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(100);
/// The longest reconnect delay, jitter included.
pub const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(10);

/// Between broker sessions, between the outbox relay's tries after a broker
/// or database error, and while the worker waits for its database at start:
/// 100 ms doubling to 10 s, jittered, forever.
pub fn reconnect_backoff() -> ReconnectBackoff {
    ReconnectBackoff { attempt: 0 }
}

/// The delays of [`reconnect_backoff`]. Jitter takes off up to half of each
/// delay rather than adding to it (backon's jitter adds up to a whole delay
/// on top of its cap, which made the documented 10 s up to 20 s): delay `n`
/// lies in `[d/2, d]` for `d = min(100 ms × 2ⁿ, 10 s)`, so the cap holds.
#[derive(Debug, Clone)]
pub struct ReconnectBackoff {
    attempt: u32,
}

impl Iterator for ReconnectBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = reconnect_delay(self.attempt, jitter_unit());
        self.attempt = self.attempt.saturating_add(1);
        Some(delay)
    }
}

/// Reconnect delay `attempt` (from 0) for a jitter draw `unit` in `[0, 1]`:
/// `d × (1 − unit/2)` with `d = min(100 ms × 2^attempt, 10 s)`.
pub fn reconnect_delay(attempt: u32, unit: f64) -> Duration {
    let doubled = RECONNECT_MIN_DELAY.saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX));
    let capped = doubled.min(RECONNECT_MAX_DELAY);
    capped.mul_f64(1.0 - unit.clamp(0.0, 1.0) / 2.0)
}

/// A uniform draw from `[0, 1)`, from the operating system's generator (0
/// when it fails: no jitter is better than no delay).
fn jitter_unit() -> f64 {
    let bits = getrandom::u64().unwrap_or(0) >> 11; // 53 bits: an f64's mantissa
    #[allow(clippy::cast_precision_loss)] // exact: below 2⁵³
    let unit = bits as f64 / (1u64 << 53) as f64;
    unit
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            delays: ["50ms", "1s"]
                .map(|name| RetryDelay {
                    name: name.into(),
                    delay: humantime::parse_duration(name).unwrap(),
                })
                .to_vec(),
            max_attempts,
            in_process_attempts: 3,
        }
    }

    #[test]
    fn permanent_failures_park_at_once() {
        assert_eq!(
            next_retry(false, ErrorKind::Validation, 0, 5),
            Err(ErrorKind::Validation)
        );
    }

    #[test]
    fn transient_failures_retry_until_max_attempts() {
        assert_eq!(next_retry(true, ErrorKind::Transient, 0, 3), Ok(1));
        assert_eq!(next_retry(true, ErrorKind::Transient, 1, 3), Ok(2));
        assert_eq!(
            next_retry(true, ErrorKind::Transient, 2, 3),
            Err(ErrorKind::AttemptsExhausted)
        );
        assert_eq!(
            next_retry(true, ErrorKind::Transient, 0, 1),
            Err(ErrorKind::AttemptsExhausted)
        );
        assert_eq!(
            next_retry(true, ErrorKind::Transient, u32::MAX, 3),
            Err(ErrorKind::AttemptsExhausted)
        );
    }

    #[test]
    fn dispositions_name_the_queue_of_the_delay() {
        let transient = Failure::Database(sqlx::Error::PoolTimedOut);
        let name = |d: &RetryDelay| format!("q.retry.{}", d.name);
        assert_eq!(
            policy(4).disposition(&transient, 0, name),
            Disposition::RetryLater {
                retry: 1,
                queue: "q.retry.50ms".into()
            }
        );
        // The last delay repeats.
        assert_eq!(
            policy(4).disposition(&transient, 2, name),
            Disposition::RetryLater {
                retry: 3,
                queue: "q.retry.1s".into()
            }
        );
        assert_eq!(
            policy(4).disposition(&transient, 3, name),
            Disposition::Park {
                kind: ErrorKind::AttemptsExhausted
            }
        );
        let panic = Failure::Panic("boom".into());
        assert_eq!(
            policy(4).disposition(&panic, 0, name),
            Disposition::Park { kind: ErrorKind::Panic }
        );
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

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
                    match next_retry(true, ErrorKind::Transient, retries, max_attempts) {
                        Ok(retry) => {
                            prop_assert_eq!(retry, retries + 1, "retry count grows by one");
                            retries = retry;
                            deliveries += 1;
                            prop_assert!(deliveries <= max_attempts);
                        }
                        Err(kind) => {
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
                let d = next_retry(true, ErrorKind::Transient, retries, max_attempts);
                if retries.saturating_add(1) >= max_attempts {
                    prop_assert_eq!(d, Err(ErrorKind::AttemptsExhausted));
                } else {
                    prop_assert_eq!(d, Ok(retries + 1));
                }
            }

            /// Permanent failures park at once with their own kind.
            #[test]
            fn permanent_failures_never_retry(kind in any_kind(), retries in any::<u32>(), max_attempts in 1u32..=100) {
                prop_assert_eq!(next_retry(false, kind, retries, max_attempts), Err(kind));
            }
        }
    }

    #[test]
    fn the_reconnect_cap_holds_with_jitter() {
        // docs/reliability.md: "100 ms to 10 s"; jitter once added on top.
        let delays: Vec<Duration> = reconnect_backoff().take(500).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(10)), "{delays:?}");
        assert!(delays[0] <= Duration::from_millis(100), "{delays:?}");
        for attempt in [0, 1, 5, 7, 8, 20, 31, 32, 1000, u32::MAX] {
            for unit in [0.0, 0.25, 0.5, 0.999_999, 1.0] {
                let delay = reconnect_delay(attempt, unit);
                assert!(delay <= RECONNECT_MAX_DELAY, "{attempt} {unit}: {delay:?}");
                assert!(delay >= Duration::from_millis(50), "{attempt} {unit}: {delay:?}");
            }
        }
        assert_eq!(reconnect_delay(0, 0.0), Duration::from_millis(100));
        assert_eq!(reconnect_delay(3, 0.0), Duration::from_millis(800));
        assert_eq!(reconnect_delay(40, 0.0), RECONNECT_MAX_DELAY);
        assert_eq!(reconnect_delay(40, 1.0), RECONNECT_MAX_DELAY / 2);
    }

    #[test]
    fn a_delivery_is_settled_long_before_a_quorum_consumer_timeout() {
        // RabbitMQ 4.3 enforces consumer_timeout (default 30 min) on quorum
        // queues: a delivery held past it closes the channel. The worker
        // holds one for at most its in-process runs (10 at most, see
        // topology.rs), each bounded by store::DEADLINE, plus their sleeps;
        // a longer wait goes through a retry queue, acked (docs/reliability.md,
        // "RabbitMQ 4").
        let worst = crate::store::DEADLINE * 10 + IN_PROCESS_TOTAL_DELAY;
        assert!(worst <= Duration::from_secs(3 * 60), "{worst:?}");
        assert!(worst * 10 < Duration::from_secs(30 * 60), "{worst:?}");
    }
}
