//! The integration tests, as one test binary: one link of the crate
//! instead of one per file. Each file is a module named for what it
//! tests; [`common`] is the shared harness (`TestEnv`, proxies, builders).
//!
//! Tests run on parallel threads of one process, so nothing here changes
//! what the process shares: no test sets an environment variable (child
//! processes get theirs), metrics belong to each worker's own `Metrics`,
//! [`traces`] sets its span subscriber on its own runtimes' threads only,
//! and `TEST_FLAKY` ids, which the handler counts per process, differ
//! from test to test. The tests that take the whole broker (a memory
//! alarm, a restart, the soak) are the `whole_broker` binary.

// Without `test-handlers` the tests that need it are left out, and with
// them the parts of the harness only they use.
#[cfg_attr(not(feature = "test-handlers"), allow(dead_code))]
mod common;

#[cfg(feature = "test-handlers")]
mod batching;
mod cli;
#[cfg(feature = "test-handlers")]
mod cluster;
mod console;
mod console_fixes;
mod deploy;
mod devices;
#[cfg(feature = "test-handlers")]
mod edges;
mod failover;
#[cfg(feature = "test-handlers")]
mod faults;
mod fuzz_regressions;
mod growth;
#[cfg(feature = "test-handlers")]
mod observability;
mod outbox;
mod parking;
mod pipeline;
mod requeue;
#[cfg(feature = "test-handlers")]
mod retry;
mod safe_copies;
mod slow_confirms;
mod startup;
#[cfg(feature = "test-handlers")]
mod traces;
mod undecodable;
