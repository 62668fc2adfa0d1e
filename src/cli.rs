//! What the binaries share (docs/operations.md, "The binaries"): one
//! convention for exit statuses and error messages ([`finish`], [`report`]), stopping on Ctrl-C
//! ([`until_interrupted`]), the hidden flags that write shell completions
//! and man pages ([`Generate`]), the banner, and the sample messages of
//! `publish`.
//!
//! Every binary exits with
//!
//! * 0 when done;
//! * 2 ([`EXIT_USAGE`]) for a bad flag or a bad setting: clap's own errors,
//!   a [`ConfigError`], a [`UsageError`] or a bad topology file anywhere in
//!   the error's chain;
//! * 130 ([`EXIT_INTERRUPTED`]) when stopped by Ctrl-C (SIGINT);
//! * 1 for any other error,
//!
//! and prints an error as one line per problem, `binary: what: why`, each
//! cause once.

pub mod banner;
pub mod device;
mod generate;
pub mod samples;

use std::error::Error;
use std::future::Future;
use std::process::ExitCode;

use tokio::signal::unix::{SignalKind, signal};

pub use generate::Generate;

use crate::config::ConfigError;
use crate::store::StoreError;
use crate::telemetry::TelemetryError;
use crate::{TopologyError, WorkerError};

/// Exit status for a bad flag or setting.
pub const EXIT_USAGE: u8 = 2;

/// Exit status for an error at run time.
pub const EXIT_RUNTIME: u8 = 1;

/// Exit status when stopped by Ctrl-C: 128 + SIGINT, as a shell reports a
/// process that SIGINT killed.
pub const EXIT_INTERRUPTED: u8 = 130;

/// A bad command line found after clap parsed it (`--data` that is not
/// JSON): exit status 2, like clap's own errors.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The exit status for `error`: [`EXIT_USAGE`] when a cause in its chain
/// is a bad setting or flag, [`EXIT_RUNTIME`] otherwise.
pub fn exit_status(error: &(dyn Error + 'static)) -> u8 {
    if causes(error).any(is_usage) {
        EXIT_USAGE
    } else {
        EXIT_RUNTIME
    }
}

/// Whether `cause` is a bad setting or flag: a setting, a topology file, a
/// database URL or a span export the binary cannot start with. (Errors
/// marked `transparent` are not in a chain themselves, hence the
/// `WorkerError` arms.)
fn is_usage(cause: &(dyn Error + 'static)) -> bool {
    cause.is::<ConfigError>()
        || cause.is::<UsageError>()
        || cause.is::<TopologyError>()
        || matches!(cause.downcast_ref::<StoreError>(), Some(StoreError::Url(_)))
        || matches!(
            cause.downcast_ref::<TelemetryError>(),
            Some(TelemetryError::Exporter { .. })
        )
        || matches!(
            cause.downcast_ref::<WorkerError>(),
            Some(WorkerError::Topology(_) | WorkerError::Store(StoreError::Url(_)))
        )
}

/// `error` and its causes on one line, `what: why: why`, each text once:
/// a cause whose text is already in the line is left out (many errors print
/// their source in their own message, and chaining those repeats it).
pub fn chain(error: &(dyn Error + 'static)) -> String {
    let mut line = String::new();
    for cause in causes(error) {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn causes<'a>(error: &'a (dyn Error + 'static)) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(error), |&cause| cause.source())
}

/// Prints `error` on stderr, each line prefixed with the binary's name
/// (several bad settings are one line each), and returns its exit status.
pub fn report(binary: &str, error: &(dyn Error + 'static)) -> ExitCode {
    for line in chain(error).lines() {
        eprintln!("{binary}: {line}");
    }
    ExitCode::from(exit_status(error))
}

/// `println!` for what a binary prints on stdout. A closed stdout (a reader
/// such as `head` that has what it wanted: `worker-iot-core --check-config
/// | head`) ends the process quietly with status 0; any other write error
/// with a line on stderr and status 1. Never a panic, as `println!` would.
/// Called only once the work it reports is done, so stopping there loses
/// nothing.
#[macro_export]
macro_rules! emit {
    ($($arg:tt)*) => {
        $crate::cli::write_stdout(format!("{}\n", format_args!($($arg)*)).as_bytes())
    };
}

/// Writes `bytes` to stdout, as [`emit!`] does.
pub fn write_stdout(bytes: &[u8]) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(bytes).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("cannot write to stdout: {e}");
        std::process::exit(i32::from(EXIT_RUNTIME));
    }
}

/// Writes `bytes` to stdout and goes on whatever happens: for what comes
/// before the work (the worker's banner, `delete_db`'s target), which a
/// closed stdout must not stop or cut short.
pub fn write_stdout_before_work(bytes: &[u8]) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    // A reader that is gone misses the line; the work goes on regardless.
    out.write_all(bytes).and_then(|()| out.flush()).ok();
}

/// A binary's end: its own exit status, or [`report`] of its error.
pub fn finish(binary: &str, result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => report(binary, e.as_ref()),
    }
}

/// Runs `work` until it ends or Ctrl-C arrives; then says so and returns
/// [`EXIT_INTERRUPTED`]. Dropping `work` mid-way is safe for the tools that
/// use this: a publish not yet confirmed is not reported as done, and each
/// migration and each `DROP` is atomic on the server, so running the tool
/// again finishes the job.
pub async fn until_interrupted(binary: &str, work: impl Future<Output = anyhow::Result<ExitCode>>) -> ExitCode {
    // Listening starts here, before `work` is first polled: a Ctrl-C from
    // then on is always seen (`tokio::signal::ctrl_c` would only listen
    // once polled, and until then SIGINT kills the process).
    let mut interrupt = match signal(SignalKind::interrupt()) {
        Ok(interrupt) => interrupt,
        Err(e) => {
            eprintln!("{binary}: cannot listen for Ctrl-C: {e}");
            return finish(binary, work.await);
        }
    };
    tokio::select! {
        result = work => finish(binary, result),
        Some(()) = interrupt.recv() => {
            eprintln!("{binary}: interrupted");
            ExitCode::from(EXIT_INTERRUPTED)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot connect to PostgreSQL: {0}")]
    struct Wrapper(#[source] std::io::Error);

    #[test]
    fn a_chain_prints_each_cause_once() {
        let refused = || {
            std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "Connection refused (os error 111)",
            )
        };
        let error = anyhow::Error::new(Wrapper(refused())).context("creating the database");
        assert_eq!(
            chain(error.as_ref()),
            "creating the database: cannot connect to PostgreSQL: Connection refused (os error 111)"
        );
        let error = anyhow::Error::new(refused()).context("reading");
        assert_eq!(chain(error.as_ref()), "reading: Connection refused (os error 111)");
        assert_eq!(exit_status(error.as_ref()), EXIT_RUNTIME);
    }

    #[test]
    fn bad_settings_and_usage_exit_2() {
        let config = ConfigError::File {
            path: "x".into(),
            reason: "gone".into(),
        };
        let error = anyhow::Error::new(config).context("loading");
        assert_eq!(exit_status(error.as_ref()), EXIT_USAGE);
        let error = anyhow::Error::new(UsageError("--data must be JSON".into()));
        assert_eq!(exit_status(error.as_ref()), EXIT_USAGE);
    }
}
