//! `requeue`: inspect the dead-letter queue and drain it back
//! (docs/operations.md, "The dead-letter queue").
//! The logic is in `worker_iot_core::requeue`; this parses flags and prints.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use lapin::Connection;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use worker_iot_core::ErrorKind;
use worker_iot_core::MainQueue;
use worker_iot_core::broker;
use worker_iot_core::cli::{self, EXIT_INTERRUPTED, Generate};
use worker_iot_core::config::{BROKER_KEYS, Settings};
use worker_iot_core::envelope::truncate_chars;
use worker_iot_core::requeue::{self, Action, DrainOptions, Filter, Group, Parked, Summary, format_ms};

/// Inspect the dead-letter queue Q.dlq and drain it back to Q.
///
/// Every message moved is published with a publisher confirm before it is
/// acked from the DLQ: a crash mid-drain may duplicate one message (the
/// worker's inbox absorbs it), never lose one. Messages that do not match
/// the filters stay in the DLQ, unchanged and in their order.
///
/// Exit status: 0 done, 2 bad flag or setting, 1 any other error, 130
/// interrupted.
#[derive(Parser)]
#[command(name = "requeue", version)]
struct Args {
    /// Main queue Q (default: RABBITMQ_LOCAL_QUEUE_NAME); the DLQ is Q.dlq.
    #[arg(long)]
    queue: Option<String>,
    /// Queue to move messages to (default: Q).
    #[arg(long)]
    to: Option<String>,
    /// Move at most N messages.
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    /// Move at most this many messages per second.
    #[arg(long, value_name = "PER_SEC", value_parser = parse_rate)]
    rate: Option<f64>,
    /// Only messages of this type (repeatable).
    #[arg(long = "type", value_name = "T")]
    types: Vec<String>,
    /// Only messages with this iot-error-kind (repeatable).
    #[arg(long = "error-kind", value_name = "K", value_parser = parse_kind)]
    error_kinds: Vec<String>,
    /// Only messages with this iot-error-fingerprint.
    #[arg(long, value_name = "F")]
    fingerprint: Option<String>,
    /// Only messages whose error text or body contains TEXT.
    #[arg(long, value_name = "TEXT")]
    grep: Option<String>,
    /// Move nothing; print what would move.
    #[arg(long)]
    dry_run: bool,
    /// Keep iot-retry-count instead of clearing it.
    #[arg(long)]
    keep_retry_count: bool,
    /// One JSON line per message (or group) and a summary line.
    #[arg(long)]
    json: bool,
    /// Summarise the DLQ grouped by fingerprint (only messages matching the
    /// filters); moves nothing.
    #[arg(long, conflicts_with_all = ["to", "limit", "rate", "dry_run", "keep_retry_count", "yes"])]
    list: bool,
    /// Do not ask before a drain of the whole DLQ (no filter, no --limit);
    /// only a terminal is asked.
    #[arg(long, short = 'y')]
    yes: bool,
    #[command(flatten)]
    generate: Generate,
}

/// `println!` that ends the process quietly when stdout is closed
/// (`requeue --list | head`). It is only called between messages, after the
/// previous one was settled, so stopping there loses nothing.
macro_rules! emit {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            panic!("cannot write to stdout: {e}");
        }
    }};
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!(
            "{text:?} is not a rate: expected a positive number of messages per second"
        )),
    }
}

fn parse_kind(text: &str) -> Result<String, String> {
    if ErrorKind::parse(text).is_some() || text.starts_with("broker:") || text == "unknown" {
        Ok(text.to_owned())
    } else {
        let known: Vec<&str> = ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        Err(format!(
            "{text:?} is not an error kind: expected one of {}",
            known.join(", ")
        ))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(code) = args.generate.run::<Args>() {
        return code;
    }
    cli::finish("requeue", run(args).await)
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let settings = Settings::load_for(BROKER_KEYS)?.settings;
    let queue = args.queue.clone().unwrap_or(settings.queue);
    let dlq = MainQueue::new(&queue).dlq();
    let filter = Filter {
        types: args.types.clone(),
        error_kinds: args.error_kinds.clone(),
        fingerprint: args.fingerprint.clone(),
        grep: args.grep.clone(),
    };
    let connection = broker::connect(settings.amqp_url.expose(), "requeue")
        .await
        .with_context(|| format!("cannot reach RabbitMQ at {}", settings.amqp_url))?;

    if args.list {
        let groups = requeue::list(&connection, &dlq, &filter).await?;
        print_groups(&groups, &dlq, args.json);
        connection.close(200, "done".into()).await.ok();
        return Ok(ExitCode::SUCCESS);
    }

    let options = DrainOptions {
        dlq: dlq.clone(),
        target: args.to.clone().unwrap_or(queue),
        filter,
        limit: args.limit,
        rate: args.rate,
        dry_run: args.dry_run,
        keep_retry_count: args.keep_retry_count,
    };
    let total = requeue::depth(&connection, &dlq).await?;
    if !confirmed(&args, &options, total)? {
        connection.close(200, "cancelled".into()).await.ok();
        bail!("cancelled: nothing moved");
    }
    drain(&connection, &options, total, args.json).await
}

/// Drains with a progress bar on a terminal (dry-run lines above it) or
/// one line per message; prints the summary. Exit 130 when interrupted.
async fn drain(connection: &Connection, options: &DrainOptions, total: u32, json: bool) -> anyhow::Result<ExitCode> {
    let stop = CancellationToken::new();
    let ctrl_c = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            ctrl_c.cancel();
        }
    });
    let bar = (!json && std::io::stderr().is_terminal()).then(|| progress_bar(total));
    let result = requeue::drain(connection, options, &stop, |action, parked| {
        if json {
            emit!("{}", message_line(action, parked));
        } else if action == Action::WouldMove {
            match &bar {
                // Above the bar, so the lines stay on the screen.
                Some(bar) => bar.println(format!("would move {}", describe(parked))),
                None => emit!("would move {}", describe(parked)),
            }
        }
        if let Some(bar) = &bar {
            bar.inc(1);
            bar.set_message(format!("{action:?}"));
        }
    })
    .await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    connection.close(200, "done".into()).await.ok();
    let summary = result.with_context(|| format!("draining {} stopped", options.dlq))?;
    print_summary(&summary, options, json);
    if summary.interrupted {
        eprintln!(
            "requeue: interrupted: {} moved, {} kept, {} not visited",
            summary.moved, summary.kept, summary.left
        );
        return Ok(ExitCode::from(EXIT_INTERRUPTED));
    }
    Ok(ExitCode::SUCCESS)
}

/// A drain of everything (no filter, no limit, not a dry run) asks first
/// when a person is at a terminal, unless `--yes`. Scripts are not asked.
fn confirmed(args: &Args, options: &DrainOptions, total: u32) -> anyhow::Result<bool> {
    let filter = &options.filter;
    let bare = filter.types.is_empty()
        && filter.error_kinds.is_empty()
        && filter.fingerprint.is_none()
        && filter.grep.is_none()
        && options.limit.is_none();
    if args.yes || args.dry_run || !bare || total == 0 || !std::io::stdin().is_terminal() {
        return Ok(true);
    }
    eprint!(
        "move all {total} messages from {} to {}? [y/N] ",
        options.dlq, options.target
    );
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).context("reading the answer")?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

fn progress_bar(total: u32) -> ProgressBar {
    let bar = ProgressBar::new(u64::from(total));
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:40}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

fn describe(p: &Parked) -> String {
    format!(
        "{} type={} kind={} fingerprint={} error={:?}",
        p.message_id.as_deref().unwrap_or("(no message_id)"),
        p.message_type.as_deref().unwrap_or("-"),
        p.kind,
        p.fingerprint,
        p.error
    )
}

// The `--json` lines. Fields are declared in alphabetical order, the order
// these lines have always had (they were once built as `serde_json::Value`
// maps, which sort their keys): scripts that compare lines keep working.

/// One message visited by a drain.
#[derive(Serialize)]
struct MessageLine<'a> {
    action: &'static str,
    error: &'a str,
    error_kind: &'a str,
    fingerprint: &'a str,
    message_id: Option<&'a str>,
    record: &'static str,
    #[serde(rename = "type")]
    message_type: Option<&'a str>,
}

/// The last line of a drain.
#[derive(Serialize)]
struct DrainSummaryLine<'a> {
    record: &'static str,
    summary: DrainSummary<'a>,
}

#[derive(Serialize)]
struct DrainSummary<'a> {
    by_fingerprint: &'a BTreeMap<String, u64>,
    dry_run: bool,
    kept: u64,
    left: u64,
    moved: u64,
    to: &'a str,
}

/// One fingerprint group of `--list`.
#[derive(Serialize)]
struct GroupLine<'a> {
    count: u64,
    error_kind: &'a str,
    fingerprint: &'a str,
    first_failure_at: Option<i64>,
    last_failure_at: Option<i64>,
    record: &'static str,
    sample_error: &'a str,
    types: &'a [String],
}

/// The last line of `--list`.
#[derive(Serialize)]
struct ListSummaryLine<'a> {
    record: &'static str,
    summary: ListSummary<'a>,
}

#[derive(Serialize)]
struct ListSummary<'a> {
    groups: usize,
    messages: u64,
    queue: &'a str,
}

/// One JSON line: serialising these structs of strings and numbers cannot
/// fail.
fn json_line(line: &impl Serialize) -> String {
    serde_json::to_string(line).unwrap_or_default()
}

fn message_line(action: Action, p: &Parked) -> String {
    let action = match action {
        Action::Moved => "moved",
        Action::WouldMove => "would_move",
        Action::Kept => "kept",
    };
    json_line(&MessageLine {
        action,
        error: &p.error,
        error_kind: &p.kind,
        fingerprint: &p.fingerprint,
        message_id: p.message_id.as_deref(),
        record: "message",
        message_type: p.message_type.as_deref(),
    })
}

fn print_summary(summary: &Summary, options: &DrainOptions, json: bool) {
    let verb = if options.dry_run { "would move" } else { "moved" };
    if json {
        let line = DrainSummaryLine {
            record: "summary",
            summary: DrainSummary {
                by_fingerprint: &summary.moved_by_fingerprint,
                dry_run: options.dry_run,
                kept: summary.kept,
                left: summary.left,
                moved: summary.moved,
                to: &options.target,
            },
        };
        emit!("{}", json_line(&line));
        return;
    }
    emit!(
        "{verb} {} to {}, kept {} in {}, {} not visited",
        summary.moved,
        options.target,
        summary.kept,
        options.dlq,
        summary.left
    );
    for (fingerprint, n) in &summary.moved_by_fingerprint {
        emit!("  {fingerprint}  {n}");
    }
}

fn group_line(g: &Group) -> GroupLine<'_> {
    GroupLine {
        count: g.count,
        error_kind: &g.kind,
        fingerprint: &g.fingerprint,
        first_failure_at: g.first_failure_ms,
        last_failure_at: g.last_failure_ms,
        record: "group",
        sample_error: &g.sample_error,
        types: &g.types,
    }
}

fn print_groups(groups: &[Group], dlq: &str, json: bool) {
    let total: u64 = groups.iter().map(|g| g.count).sum();
    if json {
        for g in groups {
            emit!("{}", json_line(&group_line(g)));
        }
        let line = ListSummaryLine {
            record: "summary",
            summary: ListSummary {
                groups: groups.len(),
                messages: total,
                queue: dlq,
            },
        };
        emit!("{}", json_line(&line));
        return;
    }
    emit!("{dlq}: {total} message(s) in {} group(s)\n", groups.len());
    emit!(
        "{:<16}  {:>6}  {:<18}  {:<24}  {:<19}  {:<19}  SAMPLE ERROR",
        "FINGERPRINT",
        "COUNT",
        "KIND",
        "TYPES",
        "FIRST FAILURE",
        "LAST FAILURE"
    );
    for g in groups {
        let types = if g.types.is_empty() {
            "-".to_owned()
        } else {
            g.types.join(",")
        };
        let sample = truncate_chars(&g.sample_error, 80);
        emit!(
            "{:<16}  {:>6}  {:<18}  {:<24}  {:<19}  {:<19}  {}",
            g.fingerprint,
            g.count,
            g.kind,
            types,
            format_ms(g.first_failure_ms),
            format_ms(g.last_failure_ms),
            sample
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_keep_their_bytes() {
        let parked = Parked {
            message_id: None,
            message_type: Some("MEASUREMENT".into()),
            kind: "validation".into(),
            fingerprint: "0123456789abcdef".into(),
            error: "data.value \"x\" is not a number".into(),
            first_failure_ms: Some(1),
            last_failure_ms: None,
            body: String::new(),
        };
        assert_eq!(
            message_line(Action::WouldMove, &parked),
            r#"{"action":"would_move","error":"data.value \"x\" is not a number","error_kind":"validation","fingerprint":"0123456789abcdef","message_id":null,"record":"message","type":"MEASUREMENT"}"#
        );
        let group = Group {
            fingerprint: "0123456789abcdef".into(),
            count: 2,
            kind: "decode".into(),
            types: vec!["A".into(), "B".into()],
            first_failure_ms: Some(1),
            last_failure_ms: None,
            sample_error: "é".into(),
        };
        assert_eq!(
            json_line(&group_line(&group)),
            r#"{"count":2,"error_kind":"decode","fingerprint":"0123456789abcdef","first_failure_at":1,"last_failure_at":null,"record":"group","sample_error":"é","types":["A","B"]}"#
        );
        let by_fingerprint = BTreeMap::from([("b".to_owned(), 2), ("a".to_owned(), 1)]);
        let line = DrainSummaryLine {
            record: "summary",
            summary: DrainSummary {
                by_fingerprint: &by_fingerprint,
                dry_run: false,
                kept: 4,
                left: 0,
                moved: 3,
                to: "q",
            },
        };
        assert_eq!(
            json_line(&line),
            r#"{"record":"summary","summary":{"by_fingerprint":{"a":1,"b":2},"dry_run":false,"kept":4,"left":0,"moved":3,"to":"q"}}"#
        );
        let line = ListSummaryLine {
            record: "summary",
            summary: ListSummary {
                groups: 1,
                messages: 2,
                queue: "q.dlq",
            },
        };
        assert_eq!(
            json_line(&line),
            r#"{"record":"summary","summary":{"groups":1,"messages":2,"queue":"q.dlq"}}"#
        );
    }
}
