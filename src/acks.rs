//! Acks for one channel. Every delivery is acked once, after it settled.
//! Settled deliveries with no unsettled one below them go out as one
//! `multiple` ack. A settled delivery above an unsettled one is **held**
//! until that one settles too, so that one `multiple` ack covers both:
//! batches in flight end out of order, and a batch's failed deliveries wait
//! for their copies' confirms; acked one by one, each of those would cost
//! the broker an ack, which is what caps a consumer that acks each message.
//! The hold is bounded, so a slow message never stops the consumer: once
//! the lowest unsettled delivery has held the others for [`HOLD_AT_MOST`],
//! or when they fill all but a sixteenth of the prefetch window, the held
//! deliveries are acked one by one at once.
//!
//! The acks keep the in-flight gauge too: up when a delivery arrives, down
//! when it is acked, and down for every delivery left unacked when the
//! channel's acks are dropped (the session ended; the broker redelivers
//! them). So the gauge comes back to zero on every path: settled, cut off
//! at the end of the grace period, stranded by a failed ack or a panic.

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use lapin::Channel;
use lapin::options::BasicAckOptions;
use metrics::Gauge;

/// How long the lowest unsettled delivery may hold settled ones above it
/// (a copy's confirm takes a few milliseconds; a slow handler, seconds).
pub const HOLD_AT_MOST: Duration = Duration::from_millis(50);

pub struct Acks {
    channel: Channel,
    in_flight: Gauge,
    tags: Mutex<Tags>,
    /// How many settled deliveries may be held.
    hold: usize,
    /// Told when deliveries are held, so the session can release them once
    /// they have waited [`HOLD_AT_MOST`] even if no other ack comes.
    holding: tokio::sync::Notify,
    /// Held while acks are sent, so a `multiple` ack never covers a tag
    /// that another task is acking too. Tags received meanwhile are higher
    /// than any being acked.
    sending: tokio::sync::Mutex<()>,
}

/// The channel's deliveries that are not acked yet.
#[derive(Default)]
struct Tags {
    /// Received and not yet settled.
    unsettled: BTreeSet<u64>,
    /// Settled, waiting for an unsettled one below them.
    held: BTreeSet<u64>,
    /// The lowest unsettled delivery while it holds others, and since when.
    holder: Option<(u64, Instant)>,
}

/// Acks to send: one up to a tag (`multiple` when it covers several held
/// deliveries), then single ones.
#[derive(Debug, Default, PartialEq, Eq)]
struct Due {
    contiguous: Option<(u64, bool)>,
    alone: Vec<u64>,
}

impl Tags {
    /// `settled` joins the held ones; returns what is due at `now`, and
    /// how many deliveries that acks: the held ones below the lowest
    /// unsettled one, and every held one once `hold` are held or the
    /// lowest unsettled one has held them for [`HOLD_AT_MOST`].
    fn settle(&mut self, settled: &[u64], hold: usize, now: Instant) -> (Due, usize) {
        for tag in settled {
            if self.unsettled.remove(tag) {
                self.held.insert(*tag);
            }
        }
        let floor = self.unsettled.first().copied().unwrap_or(u64::MAX);
        let above = self.held.split_off(&floor);
        let below = std::mem::replace(&mut self.held, above);
        let mut acked = below.len();
        let mut due = Due {
            contiguous: below.last().map(|max| (*max, below.len() > 1)),
            alone: Vec::new(),
        };
        self.holder = match self.holder {
            _ if self.held.is_empty() => None,
            Some((tag, since)) if tag == floor => Some((tag, since)),
            _ => Some((floor, now)),
        };
        let held_too_long = self.holder.is_some_and(|(_, since)| now - since >= HOLD_AT_MOST);
        if self.held.len() >= hold.max(1) || held_too_long {
            acked += self.held.len();
            due.alone = std::mem::take(&mut self.held).into_iter().collect();
        }
        (due, acked)
    }
}

impl Acks {
    /// Acks for a consumer on `channel` with `prefetch`.
    pub fn new(channel: Channel, in_flight: Gauge, prefetch: u16) -> Acks {
        Acks {
            channel,
            in_flight,
            tags: Mutex::default(),
            hold: hold_for(prefetch),
            holding: tokio::sync::Notify::new(),
            sending: tokio::sync::Mutex::default(),
        }
    }

    /// A delivery arrived: no `multiple` ack may pass it until it settles.
    pub fn received(&self, tag: u64) {
        if self.lock().unsettled.insert(tag) {
            self.in_flight.increment(1.0);
        }
    }

    /// The sets stay consistent even if a holder panicked: every update is
    /// a single step.
    fn lock(&self) -> MutexGuard<'_, Tags> {
        self.tags.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Acks settled deliveries, now or together with later ones (see the
    /// module's text).
    ///
    /// # Errors
    /// The channel's error; the deliveries not acked are redelivered.
    pub async fn ack(&self, tags: &[u64]) -> Result<(), lapin::Error> {
        let _sending = self.sending.lock().await;
        let (due, acked, holds) = {
            let mut unacked = self.lock();
            let (due, acked) = unacked.settle(tags, self.hold, Instant::now());
            (due, acked, !unacked.held.is_empty())
        };
        if holds {
            self.holding.notify_one();
        }
        self.in_flight.decrement(acked as f64);
        self.send(due).await
    }

    /// Resolves when deliveries may have started to be held (see
    /// [`Acks::release_at`]).
    pub async fn holding(&self) {
        self.holding.notified().await;
    }

    /// When the held deliveries are due for release, if any are held:
    /// [`Acks::ack`] with no tags then acks them.
    pub fn release_at(&self) -> Option<Instant> {
        let tags = self.lock();
        tags.holder
            .filter(|_| !tags.held.is_empty())
            .map(|(_, since)| since + HOLD_AT_MOST)
    }

    /// Acks every held delivery one by one: the session is ending, and
    /// what is below them (taken but never run) will not settle.
    ///
    /// # Errors
    /// The channel's error.
    pub async fn flush(&self) -> Result<(), lapin::Error> {
        let _sending = self.sending.lock().await;
        let held: Vec<u64> = {
            let mut tags = self.lock();
            tags.holder = None;
            std::mem::take(&mut tags.held).into_iter().collect()
        };
        self.in_flight.decrement(held.len() as f64);
        self.send(Due {
            contiguous: None,
            alone: held,
        })
        .await
    }

    async fn send(&self, due: Due) -> Result<(), lapin::Error> {
        if let Some((tag, multiple)) = due.contiguous {
            self.channel.basic_ack(tag, BasicAckOptions { multiple }).await?;
        }
        for tag in due.alone {
            self.channel.basic_ack(tag, BasicAckOptions::default()).await?;
        }
        Ok(())
    }
}

/// How many settled deliveries may be held under `prefetch`: all but a
/// sixteenth of the window (at least one delivery), so the broker always
/// has room to send more, whose acks then look at the hold's age again.
fn hold_for(prefetch: u16) -> usize {
    let prefetch = usize::from(prefetch);
    prefetch.saturating_sub((prefetch / 16).max(1))
}

impl Drop for Acks {
    fn drop(&mut self) {
        let tags = self.lock();
        let left = tags.unsettled.len() + tags.held.len();
        drop(tags);
        self.in_flight.decrement(left as f64);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{Due, HOLD_AT_MOST, Tags, hold_for};

    fn received(tags: &[u64]) -> Tags {
        Tags {
            unsettled: tags.iter().copied().collect(),
            ..Tags::default()
        }
    }

    /// What `settle` returns: the acks, and how many deliveries they ack.
    fn due(contiguous: Option<(u64, bool)>, alone: &[u64], acked: usize) -> (Due, usize) {
        let due = Due {
            contiguous,
            alone: alone.to_vec(),
        };
        (due, acked)
    }

    #[test]
    fn settled_runs_below_the_lowest_unsettled_go_as_one_multiple_ack() {
        let (mut tags, now) = (received(&[1, 2, 3, 4, 5]), Instant::now());
        assert_eq!(tags.settle(&[3, 1, 2], 8, now), due(Some((3, true)), &[], 3));
        assert_eq!(tags.settle(&[4], 8, now), due(Some((4, false)), &[], 1));
    }

    #[test]
    fn settled_deliveries_above_an_unsettled_one_wait_for_it_and_go_with_it() {
        let (mut tags, now) = (received(&[1, 2, 3, 4, 5, 6]), Instant::now());
        // 1 and 4 are still being processed: 2, 3, 5 and 6 wait.
        assert_eq!(tags.settle(&[2, 3, 5, 6], 8, now), due(None, &[], 0));
        assert_eq!(tags.settle(&[1], 8, now), due(Some((3, true)), &[], 3));
        assert_eq!(tags.settle(&[4], 8, now), due(Some((6, true)), &[], 3));
        assert!(tags.held.is_empty() && tags.unsettled.is_empty() && tags.holder.is_none());
    }

    #[test]
    fn a_full_hold_is_acked_one_by_one() {
        let (mut tags, now) = (received(&[1, 2, 3, 4, 5]), Instant::now());
        assert_eq!(tags.settle(&[2, 3], 3, now), due(None, &[], 0));
        // A third one over the slow 1 fills the hold: all three go, alone.
        assert_eq!(tags.settle(&[4], 3, now), due(None, &[2, 3, 4], 3));
        // With no room to hold, nothing waits.
        assert_eq!(tags.settle(&[5], 0, now), due(None, &[5], 1));
        assert_eq!(tags.settle(&[1], 0, now), due(Some((1, false)), &[], 1));
    }

    #[test]
    fn a_delivery_that_holds_the_others_too_long_no_longer_holds_them() {
        let (mut tags, start) = (received(&[1, 2, 3, 4, 5]), Instant::now());
        assert_eq!(tags.settle(&[2], 100, start), due(None, &[], 0));
        let almost = start + HOLD_AT_MOST - Duration::from_millis(1);
        assert_eq!(tags.settle(&[3], 100, almost), due(None, &[], 0));
        assert_eq!(tags.settle(&[4], 100, start + HOLD_AT_MOST), due(None, &[2, 3, 4], 3));
        // 1 still holds: whatever settles above it now goes at once.
        assert_eq!(tags.settle(&[5], 100, start + HOLD_AT_MOST * 2), due(None, &[5], 1));
        // A new lowest unsettled delivery starts a new hold.
        let mut tags = received(&[6, 7, 8]);
        assert_eq!(tags.settle(&[6, 8], 100, start), due(Some((6, false)), &[], 1));
        assert_eq!(tags.holder.map(|(tag, _)| tag), Some(7));
    }

    #[test]
    fn a_tag_settled_twice_or_never_received_is_not_acked() {
        let (mut tags, now) = (received(&[1]), Instant::now());
        assert_eq!(tags.settle(&[1], 8, now), due(Some((1, false)), &[], 1));
        assert_eq!(tags.settle(&[1, 9], 8, now), due(None, &[], 0));
    }

    #[test]
    fn the_hold_leaves_a_sixteenth_of_the_window_free() {
        assert_eq!(hold_for(256), 240);
        assert_eq!(hold_for(32), 30);
        assert_eq!(hold_for(2), 1);
        assert_eq!(hold_for(1), 0);
        assert_eq!(hold_for(0), 0);
    }
}
