//! The tests that take the whole broker: a memory alarm blocks every
//! publisher on it, and a restart (or the soak's chaos) drops every
//! connection. They are a test binary of their own, apart from `it`:
//! cargo runs test binaries one after another, so no other test runs
//! while they do, and [`take_broker`] runs them one at a time.
//!
//! Run by hand beside other work on the same broker, take the broker lock
//! exclusively: `flock -x /tmp/wic-broker.lock cargo test --all-features
//! --test whole_broker`.

#[allow(dead_code)] // the harness of `it`, of which these tests use a part
#[path = "../it/common/mod.rs"]
mod common;

mod alarm;
#[cfg(feature = "test-handlers")]
mod broker_restart;
mod soak;

use tokio::sync::{Mutex, MutexGuard};

/// The broker, held by one test of this binary at a time.
static BROKER: Mutex<()> = Mutex::const_new(());

/// Waits until no other test of this binary holds the broker. Hold the
/// guard until the test ends.
pub async fn take_broker() -> MutexGuard<'static, ()> {
    BROKER.lock().await
}
