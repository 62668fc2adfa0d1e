//! What every binary does with its outcome: exit 0, or print one line
//! naming the binary and the whole cause chain, and exit 1.

use std::fmt::Display;
use std::process::ExitCode;

/// Turns a binary's result into its exit status. Errors are printed with
/// `{:#}`, which shows an `anyhow` error's whole context chain on one line.
pub fn exit_code<E: Display>(binary: &str, result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{binary}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
