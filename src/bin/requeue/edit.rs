//! `requeue --edit MESSAGE_ID`: fix and retry through `$EDITOR`
//! (docs/operations.md, "The parking lot"). The checks, the publish and the
//! record are `worker_iot_core::parking::edit`'s, the console's own.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};
use lapin::Connection;
use sqlx::PgPool;
use worker_iot_core::broker::Publisher;
use worker_iot_core::parking::edit::{self, Edit, EditError, Fix};
use worker_iot_core::parking::{keeper, query};

use super::Args;

/// Opens the body of message `id` in `$EDITOR` (else `vi`), then fixes and
/// retries it when the edit changed something and the worker would take
/// it.
pub async fn run(
    args: &Args,
    queue: &str,
    pool: &PgPool,
    connection: &Connection,
    id: &str,
    max_bytes: usize,
) -> anyhow::Result<ExitCode> {
    let Some(shown) = query::show(pool, queue, id).await? else {
        bail!("no parked message with id {id:?} in the lot of {queue}");
    };
    let target = args.to.clone().unwrap_or_else(|| queue.to_owned());
    if keeper::queue_depth(connection, &target).await?.is_none() {
        bail!("queue '{target}' does not exist");
    }
    let body = edit_in_editor(&shown.body, shown.message.id)?;
    let header = args.set_header.as_deref().map(split_header).transpose()?;
    if body == shown.body && header.is_none() {
        eprintln!("requeue: the body is unchanged: nothing sent");
        return Ok(ExitCode::FAILURE);
    }
    let edit = Edit { body, header };
    let publisher = Publisher::open(connection).await?;
    let actor = args.actor();
    let fix = Fix {
        queue,
        id: shown.message.id,
        edit: &edit,
        target: &target,
        actor: &actor,
        max_bytes,
    };
    match edit::fix_and_retry(pool, &publisher, &fix).await {
        Ok(action_id) => {
            println!("fixed and retried {id} to {target} (operator action {action_id})");
            Ok(ExitCode::SUCCESS)
        }
        Err(EditError::Refused(why)) => bail!("the worker would refuse the edit, nothing sent: {why}"),
        Err(e) => Err(e).context("fix and retry"),
    }
}

/// `NAME=VALUE`.
fn split_header(text: &str) -> anyhow::Result<(String, String)> {
    let (name, value) = text
        .split_once('=')
        .with_context(|| format!("--set-header {text:?}: expected NAME=VALUE"))?;
    Ok((name.to_owned(), value.to_owned()))
}

/// Writes `body` to a new file of its own, runs `$EDITOR` on it (through
/// the shell, so `EDITOR="code --wait"` works), and reads it back.
fn edit_in_editor(body: &[u8], row: i64) -> anyhow::Result<Vec<u8>> {
    let path: PathBuf = std::env::temp_dir().join(format!("requeue-edit-{}-{row}.json", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .and_then(|mut file| std::io::Write::write_all(&mut file, body))
        .with_context(|| format!("writing {}", path.display()))?;
    let editor = std::env::var("EDITOR").unwrap_or_else(|_| "vi".into());
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("requeue")
        .arg(&path)
        .status()
        .with_context(|| format!("running $EDITOR ({editor})"));
    let edited = std::fs::read(&path).with_context(|| format!("reading {}", path.display()));
    std::fs::remove_file(&path).ok();
    if !status?.success() {
        bail!("$EDITOR ({editor}) failed: nothing sent");
    }
    edited
}
