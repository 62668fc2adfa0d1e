//! Acks for one channel. Every delivery is acked once, after it settled;
//! settled deliveries with no unsettled one below them go out as one
//! `multiple` ack, the others one by one at once (a slow message never
//! holds its successors' acks back).
//!
//! The acks keep the in-flight gauge too: up when a delivery arrives, down
//! when it is acked, and down for every delivery left unacked when the
//! channel's acks are dropped (the session ended; the broker redelivers
//! them). So the gauge comes back to zero on every path: settled, cut off
//! at the end of the grace period, stranded by a failed ack or a panic.

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard, PoisonError};

use lapin::Channel;
use lapin::options::BasicAckOptions;
use metrics::Gauge;

pub struct Acks {
    channel: Channel,
    in_flight: Gauge,
    /// Delivery tags received and not yet settled.
    unsettled: Mutex<BTreeSet<u64>>,
    /// Held while acks are sent, so a `multiple` ack never covers a tag
    /// that another task is acking too. Tags received meanwhile are higher
    /// than any being acked.
    sending: tokio::sync::Mutex<()>,
}

impl Acks {
    pub fn new(channel: Channel, in_flight: Gauge) -> Acks {
        Acks {
            channel,
            in_flight,
            unsettled: Mutex::default(),
            sending: tokio::sync::Mutex::default(),
        }
    }

    /// A delivery arrived: no `multiple` ack may pass it until it settles.
    pub fn received(&self, tag: u64) {
        if self.lock().insert(tag) {
            self.in_flight.increment(1.0);
        }
    }

    /// The set stays consistent even if a holder panicked: every update is
    /// a single step.
    fn lock(&self) -> MutexGuard<'_, BTreeSet<u64>> {
        self.unsettled.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Acks settled deliveries.
    ///
    /// # Errors
    /// The channel's error; the deliveries not acked are redelivered.
    pub async fn ack(&self, tags: &[u64]) -> Result<(), lapin::Error> {
        let _sending = self.sending.lock().await;
        let floor = {
            let mut unsettled = self.lock();
            for tag in tags {
                if unsettled.remove(tag) {
                    self.in_flight.decrement(1.0);
                }
            }
            unsettled.first().copied().unwrap_or(u64::MAX)
        };
        let (contiguous, alone) = plan(tags, floor);
        if let Some((tag, multiple)) = contiguous {
            self.channel.basic_ack(tag, BasicAckOptions { multiple }).await?;
        }
        for tag in alone {
            self.channel.basic_ack(tag, BasicAckOptions::default()).await?;
        }
        Ok(())
    }
}

impl Drop for Acks {
    fn drop(&mut self) {
        let left = self.lock().len();
        self.in_flight.decrement(left as f64);
    }
}

/// With `floor` the lowest tag still unsettled: the tags below it go as one
/// ack of the highest (`multiple` when there are several), the rest alone.
fn plan(tags: &[u64], floor: u64) -> (Option<(u64, bool)>, Vec<u64>) {
    let below: Vec<u64> = tags.iter().copied().filter(|t| *t < floor).collect();
    let alone = tags.iter().copied().filter(|t| *t >= floor).collect();
    let contiguous = below.iter().max().map(|max| (*max, below.len() > 1));
    (contiguous, alone)
}

#[cfg(test)]
mod tests {
    use super::plan;

    #[test]
    fn settled_runs_below_the_lowest_unsettled_go_as_one_multiple_ack() {
        assert_eq!(plan(&[3, 1, 2], u64::MAX), (Some((3, true)), vec![]));
        assert_eq!(plan(&[5], u64::MAX), (Some((5, false)), vec![]));
        // 4 is still being processed: 5 and 6 are acked alone, now.
        assert_eq!(plan(&[1, 2, 5, 6], 4), (Some((2, true)), vec![5, 6]));
        assert_eq!(plan(&[7, 8], 4), (None, vec![7, 8]));
        assert_eq!(plan(&[], 4), (None, vec![]));
    }
}
