//! `requeue`: list, show, retry and archive parked messages
//! (docs/operations.md, "The parking lot"). The logic is in
//! `worker_iot_core::parking`, which the console calls too; this parses
//! flags and prints.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{ArgGroup, Parser};
use indicatif::{ProgressBar, ProgressStyle};
use lapin::Connection;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use worker_iot_core::broker::{self, Publisher};
use worker_iot_core::cli::{self, EXIT_INTERRUPTED, Generate, UsageError};
use worker_iot_core::config::{BROKER_KEYS, DATABASE_KEYS, Settings};
use worker_iot_core::parking::{self, Action, Filter, Request, Status, actions, keeper, query};
use worker_iot_core::store;

mod edit;
mod output;

/// List, show, retry and archive the parked messages of queue Q.
///
/// Works on the parking lot (the `parked_messages` table); what still waits
/// in Q.dlq is moved into it first, so it works with no worker running. A
/// retry publishes each matching message to Q (or --to) with a publisher
/// confirm, *then* marks it `retried`: a crash mid-retry may send a message
/// twice (the worker's inbox absorbs it), never lose one.
///
/// Exit status: 0 done, 2 bad flag or setting, 1 any other error, 130
/// interrupted.
#[derive(Parser)]
#[command(name = "requeue", version)]
#[command(group(ArgGroup::new("mode").args(["list", "show", "archive", "unarchive"])))]
struct Args {
    /// Main queue Q (default: RABBITMQ_LOCAL_QUEUE_NAME); its DLQ is Q.dlq.
    #[arg(long)]
    queue: Option<String>,
    /// Groups by fingerprint: count, kind, types, first and last time,
    /// sample error (only the messages the filters match).
    #[arg(long, conflicts_with_all = ["to", "limit", "rate", "keep_retry_count", "yes"])]
    list: bool,
    /// With --list: one line per message instead of per group, its message
    /// id first (for --show and --id), oldest parking first.
    #[arg(long, requires = "list")]
    messages: bool,
    /// One message: headers, properties, body, error, times parked, and the
    /// actions on it.
    #[arg(long, value_name = "MESSAGE_ID", conflicts_with_all = ["to", "limit", "rate", "keep_retry_count", "yes"])]
    show: Option<String>,
    /// Mark the matching parked messages archived (no publish).
    #[arg(long, conflicts_with_all = ["to", "keep_retry_count"])]
    archive: bool,
    /// Mark the matching archived messages parked again.
    #[arg(long, conflicts_with_all = ["to", "keep_retry_count"])]
    unarchive: bool,
    /// Fix and retry one message: opens its body in $EDITOR, checks the
    /// edit as the worker would (envelope, then the type's validation),
    /// and only then retries it (to Q, or --to). The original bytes are
    /// kept; the edit and its diff are an operator action.
    #[arg(long, value_name = "MESSAGE_ID", conflicts_with_all = ["list", "show", "archive", "unarchive", "limit", "rate", "dry_run"])]
    edit: Option<String>,
    /// With --edit: also set this header (not iot-*), as NAME=VALUE.
    #[arg(long, value_name = "NAME=VALUE", requires = "edit")]
    set_header: Option<String>,
    /// Queue a retry publishes to (default: Q).
    #[arg(long, value_name = "QUEUE")]
    to: Option<String>,
    /// At most N messages.
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    /// At most this many messages per second.
    #[arg(long, value_name = "PER_SEC", value_parser = actions::parse_rate)]
    rate: Option<f64>,
    /// Only messages of this type (repeatable).
    #[arg(long = "type", value_name = "T")]
    types: Vec<String>,
    /// Only messages of this error kind (repeatable).
    #[arg(long = "error-kind", value_name = "K", value_parser = parse_kind)]
    error_kinds: Vec<String>,
    /// Only messages with this fingerprint.
    #[arg(long, value_name = "F")]
    fingerprint: Option<String>,
    /// Only messages whose error, message id or body contains TEXT
    /// (case-sensitive).
    #[arg(long, value_name = "TEXT")]
    grep: Option<String>,
    /// Only the message with this id (repeatable).
    #[arg(long = "id", value_name = "MESSAGE_ID")]
    ids: Vec<String>,
    /// Only messages last parked at or after TIME (RFC 3339, or a duration
    /// such as 2h meaning that long ago).
    #[arg(long, value_name = "TIME", value_parser = parking::parse_when)]
    since: Option<chrono::DateTime<chrono::Utc>>,
    /// Only messages last parked before TIME.
    #[arg(long, value_name = "TIME", value_parser = parking::parse_when)]
    until: Option<chrono::DateTime<chrono::Utc>>,
    /// Only messages in this status (default: parked; archived for
    /// --unarchive).
    #[arg(long, value_parser = parse_status)]
    status: Option<Status>,
    /// Change nothing (nothing is taken from Q.dlq, no database is created
    /// or migrated): print what an action would do, or list and show the
    /// lot as it is. Exits 1 when the database or its tables are missing.
    #[arg(long)]
    dry_run: bool,
    /// Keep iot-retry-count instead of clearing it.
    #[arg(long)]
    keep_retry_count: bool,
    /// Who acts, for operator_actions (default: $USER).
    #[arg(long, value_name = "NAME")]
    actor: Option<String>,
    /// Do not ask before an action on every message (no filter, no
    /// --limit); only a terminal is asked.
    #[arg(long, short = 'y')]
    yes: bool,
    /// One JSON line per record ("record": "message", "group" or "summary").
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    generate: Generate,
}

fn parse_kind(text: &str) -> Result<String, String> {
    let known = parking::error_kinds();
    if known.contains(&text) {
        return Ok(text.to_owned());
    }
    Err(format!(
        "{text:?} is not an error kind: expected one of {}",
        known.join(", ")
    ))
}

fn parse_status(text: &str) -> Result<Status, String> {
    Status::parse(text).ok_or_else(|| format!("{text:?} is not a status: expected parked, retried or archived"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(code) = args.generate.run::<Args>() {
        return code;
    }
    cli::finish("requeue", run(args).await)
}

impl Args {
    fn filter(&self) -> Filter {
        Filter {
            types: self.types.clone(),
            error_kinds: self.error_kinds.clone(),
            fingerprint: self.fingerprint.clone(),
            grep: self.grep.clone(),
            ids: self.ids.clone(),
            since: self.since,
            until: self.until,
            status: self.status,
        }
    }

    /// Who acts: --actor, else $USER.
    fn actor(&self) -> String {
        self.actor
            .clone()
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "unknown".into())
    }

    fn action(&self, queue: &str) -> Action {
        if self.archive {
            Action::Archive
        } else if self.unarchive {
            Action::Unarchive
        } else {
            Action::Retry {
                target: self.to.clone().unwrap_or_else(|| queue.to_owned()),
                keep_retry_count: self.keep_retry_count,
            }
        }
    }
}

/// The lot's database and the broker. The database is created and
/// migrated if need be, as the worker does, except by a dry run, which
/// changes nothing: it says that the database or the lot is missing.
async fn open(settings: &Settings, dry_run: bool) -> anyhow::Result<(PgPool, Connection)> {
    let url = settings.database_url.expose();
    if dry_run {
        if !store::database_exists(url).await? {
            bail!(
                "{} does not exist: nothing is parked there (a dry run creates nothing; \
                 the worker, or requeue without --dry-run, creates it)",
                store::describe_database(url)?
            );
        }
    } else if let Err(e) = store::create_database(url).await {
        tracing::debug!(error.message = %e, "could not make sure the database exists");
    }
    let pool = store::connect(url, 2).await?;
    if dry_run {
        if !store::has_table(&pool, "parked_messages").await? {
            bail!(
                "{} has no parking lot (table parked_messages): nothing is parked there \
                 (a dry run migrates nothing)",
                store::describe_database(url)?
            );
        }
    } else {
        store::migrate(&pool).await?;
    }
    let connection = broker::connect(settings.amqp_url.expose(), "requeue")
        .await
        .with_context(|| format!("cannot reach RabbitMQ at {}", settings.amqp_url))?;
    Ok((pool, connection))
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let settings = Settings::load_for(&[BROKER_KEYS, DATABASE_KEYS, &["MAX_MESSAGE_BYTES"]].concat())?.settings;
    let queue = args.queue.clone().unwrap_or_else(|| settings.queue.clone());
    if args.unarchive && args.status.is_some_and(|s| s != Status::Archived) {
        return Err(UsageError("--unarchive works on archived messages: leave out --status".into()).into());
    }
    let (pool, connection) = open(&settings, args.dry_run).await?;
    let result = work(&args, &queue, &pool, &connection, settings.max_message_bytes).await;
    connection.close(200, "done".into()).await.ok();
    pool.close().await;
    result
}

async fn work(
    args: &Args,
    queue: &str,
    pool: &PgPool,
    connection: &Connection,
    max_bytes: usize,
) -> anyhow::Result<ExitCode> {
    let dlq = worker_iot_core::MainQueue::new(queue).dlq();
    if args.dry_run {
        let waiting = keeper::queue_depth(connection, &dlq).await?.unwrap_or(0);
        if waiting > 0 {
            eprintln!("requeue: {waiting} message(s) wait in {dlq} and are not counted (a dry run takes nothing)");
        }
    } else {
        let taken = keeper::take_waiting(connection, pool, queue)
            .await
            .with_context(|| format!("moving the messages of {dlq} into the parking lot"))?;
        if taken.new + taken.again > 0 {
            eprintln!(
                "requeue: moved {} message(s) from {dlq} into the parking lot",
                taken.new + taken.again
            );
        }
    }
    let filter = args.filter();
    if args.list && args.messages {
        let messages = query::messages(pool, queue, &filter, Status::Parked, i64::MAX).await?;
        output::messages(&messages, queue, args.json);
        return Ok(ExitCode::SUCCESS);
    }
    if args.list {
        let groups = query::groups(pool, queue, &filter).await?;
        output::groups(&groups, queue, args.json);
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(id) = &args.edit {
        return edit::run(args, queue, pool, connection, id, max_bytes).await;
    }
    if let Some(id) = &args.show {
        let Some(shown) = query::show(pool, queue, id).await? else {
            bail!("no parked message with id {id:?} in the lot of {queue}");
        };
        output::shown(&shown, args.json);
        return Ok(ExitCode::SUCCESS);
    }
    act(args, queue, pool, connection, &filter).await
}

/// Retry, archive or unarchive (or say what they would do).
async fn act(
    args: &Args,
    queue: &str,
    pool: &PgPool,
    connection: &Connection,
    filter: &Filter,
) -> anyhow::Result<ExitCode> {
    let action = args.action(queue);
    if let Action::Retry { target, .. } = &action
        && keeper::queue_depth(connection, target).await?.is_none()
    {
        bail!("queue '{target}' does not exist");
    }
    let matching = query::count(pool, queue, filter, action.from_status()).await?;
    if args.dry_run {
        return dry_run(args, queue, pool, filter, &action, matching).await;
    }
    if !confirmed(args, filter, &action, queue, matching)? {
        bail!("cancelled: nothing changed");
    }
    let publisher = match action {
        Action::Retry { .. } => Some(Publisher::open(connection).await?),
        Action::Archive | Action::Unarchive => None,
    };
    let actor = args.actor();
    let request = Request {
        queue,
        filter,
        limit: args.limit,
        rate: args.rate,
        actor: &actor,
    };
    let total = args
        .limit
        .map_or(matching, |l| matching.min(i64::try_from(l).unwrap_or(i64::MAX)));
    run_action(args, pool, publisher.as_ref(), &request, &action, total).await
}

/// Runs the action with a progress bar on a terminal and Ctrl-C between
/// batches; prints the summary.
async fn run_action(
    args: &Args,
    pool: &PgPool,
    publisher: Option<&Publisher>,
    request: &Request<'_>,
    action: &Action,
    total: i64,
) -> anyhow::Result<ExitCode> {
    let stop = CancellationToken::new();
    let ctrl_c = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            ctrl_c.cancel();
        }
    });
    let bar = (!args.json && std::io::stderr().is_terminal()).then(|| progress_bar(total));
    let result = actions::run(pool, publisher, request, action, &stop, |n| {
        if let Some(bar) = &bar {
            bar.set_position(n);
        }
    })
    .await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let done = result.with_context(|| format!("{} stopped", action.as_str()))?;
    output::action_summary(action, &done, args.json);
    if done.interrupted {
        eprintln!("requeue: interrupted: {} message(s) done", done.messages);
        return Ok(ExitCode::from(EXIT_INTERRUPTED));
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints what the action would take; changes nothing.
async fn dry_run(
    args: &Args,
    queue: &str,
    pool: &PgPool,
    filter: &Filter,
    action: &Action,
    matching: i64,
) -> anyhow::Result<ExitCode> {
    let limit = args.limit.map_or(i64::MAX, |l| i64::try_from(l).unwrap_or(i64::MAX));
    let messages = query::messages(pool, queue, filter, action.from_status(), limit).await?;
    for message in &messages {
        output::would(action, message, args.json);
    }
    output::dry_run_summary(action, messages.len(), matching, args.json);
    Ok(ExitCode::SUCCESS)
}

/// An action on every message (no filter, no limit) asks first when a
/// person is at a terminal, unless `--yes`. Scripts are not asked.
fn confirmed(args: &Args, filter: &Filter, action: &Action, queue: &str, matching: i64) -> anyhow::Result<bool> {
    let everything = filter.is_empty() && args.limit.is_none();
    if args.yes || !everything || matching == 0 || !std::io::stdin().is_terminal() {
        return Ok(true);
    }
    let what = match action {
        Action::Retry { target, .. } => format!("retry all {matching} parked messages of {queue} to {target}"),
        Action::Archive => format!("archive all {matching} parked messages of {queue}"),
        Action::Unarchive => format!("unarchive all {matching} archived messages of {queue}"),
    };
    eprint!("{what}? [y/N] ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).context("reading the answer")?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

fn progress_bar(total: i64) -> ProgressBar {
    let bar = ProgressBar::new(u64::try_from(total).unwrap_or(0));
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:40}] {pos}/{len}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}
