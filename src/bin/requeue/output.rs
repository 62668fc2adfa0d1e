//! What `requeue` prints: tables and records for people, or one JSON line
//! per record (`"record": "message" | "group" | "summary"`).

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use worker_iot_core::envelope::truncate_chars;
use worker_iot_core::parking::query::{ActionOn, EditOf, Event, ParkingOf};
use worker_iot_core::parking::{Action, Done, Group, Message, Shown, Status};

use worker_iot_core::emit;

/// One JSON line: these structs of strings, numbers and JSON values always
/// serialise.
fn json_line(line: &impl Serialize) -> String {
    serde_json::to_string(line).unwrap_or_default()
}

fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

/// One fingerprint group of `--list`.
#[derive(Serialize)]
struct GroupLine<'a> {
    record: &'static str,
    fingerprint: &'a str,
    count: i64,
    error_kind: &'a str,
    types: &'a [String],
    first_parked_at: DateTime<Utc>,
    last_parked_at: DateTime<Utc>,
    sample_error: &'a str,
}

#[derive(Serialize)]
struct Summary<T: Serialize> {
    record: &'static str,
    summary: T,
}

/// The last line of `--json` output.
fn emit_summary(summary: impl Serialize) {
    emit!(
        "{}",
        json_line(&Summary {
            record: "summary",
            summary
        })
    );
}

#[derive(Serialize)]
struct ListSummary<'a> {
    queue: &'a str,
    groups: usize,
    messages: i64,
}

/// `--list`: a table, or a line per group and a summary.
pub fn groups(groups: &[Group], queue: &str, json: bool) {
    let total: i64 = groups.iter().map(|g| g.count).sum();
    if json {
        for g in groups {
            emit!("{}", json_line(&group_line(g)));
        }
        let summary = ListSummary {
            queue,
            groups: groups.len(),
            messages: total,
        };
        emit_summary(summary);
        return;
    }
    emit!("{queue}: {total} parked message(s) in {} group(s)\n", groups.len());
    emit!(
        "{:<16}  {:>6}  {:<18}  {:<24}  {:<19}  {:<19}  SAMPLE ERROR",
        "FINGERPRINT",
        "COUNT",
        "KIND",
        "TYPES",
        "FIRST PARKED",
        "LAST PARKED"
    );
    for g in groups {
        let types = if g.types.is_empty() {
            "-".to_owned()
        } else {
            g.types.join(",")
        };
        emit!(
            "{:<16}  {:>6}  {:<18}  {:<24}  {:<19}  {:<19}  {}",
            g.fingerprint,
            g.count,
            g.error_kind,
            types,
            time(g.first_parked_at),
            time(g.last_parked_at),
            truncate_chars(&g.sample_error, 80)
        );
    }
}

/// `--list --messages`: a line per message, its id first (the id
/// `--show` and `--id` take), or a JSON record per message and a summary.
pub fn messages(messages: &[Message], queue: &str, json: bool) {
    if json {
        for m in messages {
            emit!("{}", json_line(&message_line(m, None, None)));
        }
        let summary = ListSummary {
            queue,
            groups: 0,
            messages: i64::try_from(messages.len()).unwrap_or(i64::MAX),
        };
        emit_summary(summary);
        return;
    }
    emit!("{queue}: {} message(s)\n", messages.len());
    emit!(
        "{:<36}  {:<16}  {:<18}  {:<16}  {:>6}  {:<19}  ERROR",
        "MESSAGE ID",
        "TYPE",
        "KIND",
        "FINGERPRINT",
        "PARKED",
        "LAST PARKED"
    );
    for m in messages {
        emit!(
            "{:<36}  {:<16}  {:<18}  {:<16}  {:>6}  {:<19}  {}",
            m.message_id,
            m.message_type.as_deref().unwrap_or("-"),
            m.error_kind,
            m.fingerprint,
            m.times_parked,
            time(m.last_parked_at),
            truncate_chars(&m.error, 80)
        );
    }
}

fn group_line(g: &Group) -> GroupLine<'_> {
    GroupLine {
        record: "group",
        fingerprint: &g.fingerprint,
        count: g.count,
        error_kind: &g.error_kind,
        types: &g.types,
        first_parked_at: g.first_parked_at,
        last_parked_at: g.last_parked_at,
        sample_error: &g.sample_error,
    }
}

/// One message: listed by a dry run, or shown whole by `--show`.
#[derive(Serialize)]
struct MessageLine<'a> {
    record: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    action: Option<String>,
    message_id: &'a str,
    #[serde(rename = "type")]
    message_type: Option<&'a str>,
    error_kind: &'a str,
    error: &'a str,
    fingerprint: &'a str,
    status: Status,
    times_parked: i32,
    first_parked_at: DateTime<Utc>,
    last_parked_at: DateTime<Utc>,
    #[serde(flatten)]
    details: Option<Details<'a>>,
}

/// What `--show` adds to a message line.
#[derive(Serialize)]
struct Details<'a> {
    status_changed_at: DateTime<Utc>,
    status_changed_by: Option<&'a str>,
    failed_at: Option<DateTime<Utc>>,
    properties: &'a Value,
    headers: &'a Value,
    /// The body when it is UTF-8 text.
    body: Option<&'a str>,
    /// The body in hex when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    body_hex: Option<String>,
    actions: Vec<ActionLine<'a>>,
    /// Every parking, oldest first.
    parkings: &'a [ParkingOf],
    edits: &'a [EditOf],
}

#[derive(Serialize)]
struct ActionLine<'a> {
    id: i64,
    at: DateTime<Utc>,
    actor: &'a str,
    action: &'a str,
    target: Option<&'a str>,
}

fn message_line<'a>(m: &'a Message, action: Option<String>, details: Option<Details<'a>>) -> MessageLine<'a> {
    MessageLine {
        record: "message",
        action,
        message_id: &m.message_id,
        message_type: m.message_type.as_deref(),
        error_kind: &m.error_kind,
        error: &m.error,
        fingerprint: &m.fingerprint,
        status: m.status,
        times_parked: m.times_parked,
        first_parked_at: m.first_parked_at,
        last_parked_at: m.last_parked_at,
        details,
    }
}

/// A dry run's line for one message it would take.
pub fn would(action: &Action, m: &Message, json: bool) {
    if json {
        let line = message_line(m, Some(format!("would_{}", action.as_str())), None);
        emit!("{}", json_line(&line));
        return;
    }
    emit!(
        "would {} {} type={} kind={} fingerprint={} parked={} error={:?}",
        action.as_str(),
        m.message_id,
        m.message_type.as_deref().unwrap_or("-"),
        m.error_kind,
        m.fingerprint,
        m.times_parked,
        m.error
    );
}

#[derive(Serialize)]
struct ActionSummary<'a> {
    action: &'a str,
    dry_run: bool,
    messages: u64,
    /// Messages the filter matches (a dry run), before `--limit`.
    #[serde(skip_serializing_if = "Option::is_none")]
    matching: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    action_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    to: Option<&'a str>,
    interrupted: bool,
}

impl<'a> ActionSummary<'a> {
    fn of(action: &'a Action, messages: u64) -> ActionSummary<'a> {
        ActionSummary {
            action: action.as_str(),
            dry_run: false,
            messages,
            matching: None,
            action_id: None,
            to: target(action),
            interrupted: false,
        }
    }
}

fn target(action: &Action) -> Option<&str> {
    match action {
        Action::Retry { target, .. } => Some(target),
        Action::Archive | Action::Unarchive => None,
    }
}

/// The last line of a dry run.
pub fn dry_run_summary(action: &Action, listed: usize, matching: i64, json: bool) {
    if json {
        let summary = ActionSummary {
            dry_run: true,
            matching: Some(matching),
            ..ActionSummary::of(action, listed as u64)
        };
        emit_summary(summary);
        return;
    }
    let to = target(action).map_or(String::new(), |t| format!(" to {t}"));
    emit!(
        "would {} {listed} message(s){to} ({matching} match); nothing changed",
        action.as_str()
    );
}

/// The last line of an action.
pub fn action_summary(action: &Action, done: &Done, json: bool) {
    if json {
        let summary = ActionSummary {
            action_id: Some(done.action_id),
            interrupted: done.interrupted,
            ..ActionSummary::of(action, done.messages)
        };
        emit_summary(summary);
        return;
    }
    let past = match action {
        Action::Retry { target, .. } => format!("retried {} message(s) to {target}", done.messages),
        Action::Archive => format!("archived {} message(s)", done.messages),
        Action::Unarchive => format!("unarchived {} message(s)", done.messages),
    };
    emit!("{past} (operator action {})", done.action_id);
}

/// `--show`: the whole record.
pub fn shown(s: &Shown, json: bool) {
    let text = std::str::from_utf8(&s.body).ok();
    if json {
        let details = Details {
            status_changed_at: s.status_changed_at,
            status_changed_by: s.status_changed_by.as_deref(),
            failed_at: s.failed_at,
            properties: &s.properties,
            headers: &s.headers,
            body: text,
            body_hex: text.is_none().then(|| hex::encode(&s.body)),
            actions: s.actions.iter().map(action_line).collect(),
            parkings: &s.parkings,
            edits: &s.edits,
        };
        emit!("{}", json_line(&message_line(&s.message, None, Some(details))));
        return;
    }
    shown_text(s, text);
}

fn action_line(a: &ActionOn) -> ActionLine<'_> {
    ActionLine {
        id: a.id,
        at: a.at,
        actor: &a.actor,
        action: &a.action,
        target: a.target.as_deref(),
    }
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

fn shown_text(s: &Shown, text: Option<&str>) {
    let m = &s.message;
    let by = s.status_changed_by.as_deref().unwrap_or("the worker");
    emit!("message      {}", m.message_id);
    emit!(
        "status       {} (since {}, by {by})",
        m.status.as_str(),
        time(s.status_changed_at)
    );
    emit!("type         {}", m.message_type.as_deref().unwrap_or("-"));
    emit!("kind         {}", m.error_kind);
    emit!("fingerprint  {}", m.fingerprint);
    emit!("error        {}", m.error);
    emit!(
        "parked       {} time(s): first {}, last {}",
        m.times_parked,
        time(m.first_parked_at),
        time(m.last_parked_at)
    );
    emit!("properties\n{}", pretty(&s.properties));
    emit!("headers\n{}", pretty(&s.headers));
    match text {
        Some(body) => emit!("body ({} bytes)\n{body}", s.body.len()),
        None => emit!(
            "body ({} bytes, not UTF-8, in hex)\n{}",
            s.body.len(),
            hex::encode(&s.body)
        ),
    }
    if s.actions.is_empty() {
        emit!("actions      none");
    }
    for event in s.history() {
        match event {
            Event::Parked(p) => emit!(
                "parked       {} {}: {} (iot-retry-count {}, iot-requeue-count {})",
                time(p.at),
                p.error_kind,
                p.error,
                p.retry_count.map_or_else(|| "-".to_owned(), |n| n.to_string()),
                p.requeue_count
            ),
            Event::Acted(a) => {
                let to = a.target.as_deref().map_or(String::new(), |t| format!(" to {t}"));
                emit!(
                    "action       {} {}{to} by {} (operator action {})",
                    time(a.at),
                    a.action,
                    a.actor,
                    a.id
                );
                if let Some(edit) = s.edit(a.id) {
                    emit!("{}", edit.diff);
                }
            }
        }
    }
}
