//! A binary of this build run to its end as an operator would, with only
//! the environment it is given, and its output for an assertion message.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::process::Command;

/// Runs `bin` with `args` to its end (at most 60 s) in `dir`, with only
/// `env` (and `PATH`) in its environment: process-wide settings such as
/// `SSL_CERT_FILE` reach the child and never this process.
pub async fn run_clean(bin: &str, args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(bin);
    command
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .unwrap_or_else(|_| panic!("{bin} did not finish within 60 s"))
        .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"))
}

/// A finished command's exit status, stdout and stderr, for a message.
pub fn output_text(output: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Panics, saying `what` and the output, unless the command succeeded.
pub fn assert_success(what: &str, output: &Output) {
    assert!(output.status.success(), "{what}: {}", output_text(output));
}
