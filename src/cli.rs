//! What the binaries share: the exit status ([`exit_code`]), the banner,
//! and the sample messages of `publish`.

pub mod banner;
pub mod samples;

use std::fmt::Display;
use std::process::ExitCode;

/// Turns a binary's result into its exit status: 0, or one line naming
/// the binary and the whole cause chain, and 1. Errors are printed with
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
