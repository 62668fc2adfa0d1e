//! The HTML pages: Failures (the groups), a group (its messages, a page at
//! a time), a message, and Actions; plus the confirmation and the result
//! of an action. Everything from the lot is written through maud's
//! escaping: a parked body is hostile input and only ever shown as text.

use std::sync::Arc;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use maud::{Markup, html};
use serde_json::Value;

use super::Console;
use super::act::{self, Finished, Order};
use super::auth::{Who, csrf_ok, csrf_refusal};
use super::frame::{Page, PageError, csrf_field, layout, short};
use super::params::{Params, cursor_text, filter_pairs, group_link, query_string};
use crate::parking::query::{self, EditOf, Event, Group, Message, Shown};
use crate::parking::{Action, Filter, Status, error_kinds};

/// Messages on one page of a group.
pub const PAGE_SIZE: i64 = 50;
/// Groups shown on the Failures page.
const GROUPS_SHOWN: usize = 500;
/// Actions shown on one page of Actions.
const ACTIONS_PAGE: i64 = 50;

fn hidden(pairs: &[(&str, String)]) -> Markup {
    html! { @for (name, value) in pairs { input type="hidden" name=(name) value=(value); } }
}

fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

fn filter_of(params: &Params) -> Result<Filter, PageError> {
    params.filter().map_err(PageError::BadRequest)
}

/// The filter form of the Failures page.
fn filter_form(filter: &Filter) -> Markup {
    let status = filter.status.unwrap_or(Status::Parked);
    html! {
        form.filters method="get" action="/" role="search" {
            label { "Status "
                select name="status" {
                    @for s in Status::ALL { option value=(s.as_str()) selected[s == status] { (s.as_str()) } }
                }
            }
            label { "Kind "
                select name="kind" {
                    option value="" { "any" }
                    @for kind in error_kinds() {
                        option value=(kind) selected[filter.error_kinds.iter().any(|k| k == kind)] { (kind) }
                    }
                }
            }
            label { "Type " input type="text" name="type" value=(filter.types.join(", ")) placeholder="MEASUREMENT"; }
            label { "Search " input type="search" name="q" value=(filter.grep.as_deref().unwrap_or(""))
                placeholder="id, error or body text"; }
            label { "Since " input type="text" name="since" placeholder="2h or 2026-11-30T10:00:00Z"
                value=(filter.since.map(|t| t.to_rfc3339()).unwrap_or_default()); }
            label { "Until " input type="text" name="until" placeholder="RFC 3339"
                value=(filter.until.map(|t| t.to_rfc3339()).unwrap_or_default()); }
            button type="submit" { "Filter" }
        }
    }
}

/// The buttons an action form offers on messages of `status`.
fn actions_for(status: Status) -> &'static [(&'static str, &'static str)] {
    match status {
        Status::Parked => &[("retry", "Retry"), ("archive", "Archive")],
        Status::Archived => &[("unarchive", "Unarchive"), ("retry", "Retry")],
        Status::Retried => &[("retry", "Retry")],
    }
}

/// A form acting on everything `filter` matches (`scope` group or
/// matching): htmx asks for the confirmation in place; without
/// JavaScript the confirmation is a page.
fn bulk_form(who: &Who, filter: &Filter, scope: &str, count: i64, noun: &str, queue: &str) -> Markup {
    let status = filter.status.unwrap_or(Status::Parked);
    html! {
        @if who.may_act() && count > 0 {
            form.actions method="post" action="/act" hx-post="/act" hx-target="#confirm" hx-swap="innerHTML" {
                (csrf_field(who))
                input type="hidden" name="scope" value=(scope);
                (hidden(&filter_pairs(filter)))
                @for (word, label) in actions_for(status) {
                    button type="submit" name="action" value=(word) { (label) " " (noun) " (" (count) ")" }
                }
                (retry_options(queue))
            }
            div #confirm aria-live="polite" {}
        }
    }
}

/// `GET /`: the groups.
pub async fn failures(State(console): State<Arc<Console>>, Extension(who): Extension<Who>, params: Params) -> Page {
    let filter = filter_of(&params)?;
    let dlq = crate::MainQueue::new(&console.queue).dlq();
    // Side by side, each on its own connection: the page waits for the
    // slowest, not the sum.
    let (groups, over_time, waiting) = tokio::join!(
        query::groups(&console.pool, &console.queue, &filter),
        super::chart::over_time(&console),
        console.broker.waiting(&dlq),
    );
    let (groups, over_time) = (groups?, over_time?);
    let waiting = waiting.filter(|n| *n > 0);
    let total: i64 = groups.iter().map(|g| g.count).sum();
    let status = filter.status.unwrap_or(Status::Parked).as_str();
    let body = html! {
        h1 { "Failures" }
        @if let Some(n) = waiting {
            p.note #waiting { (n) " message(s) wait in " code { (dlq) } " and are not shown yet: a worker's parking keeper \
                moves them into the lot within a second (is every worker's PARKING_KEEPER off?), and "
                code { "requeue" } " moves them when it starts." }
        }
        (over_time)
        (filter_form(&filter))
        p.summary #summary { (total) " " (status) " message(s) in " (groups.len()) " group(s)" }
        @if groups.len() > GROUPS_SHOWN { p { "Showing the " (GROUPS_SHOWN) " largest groups; narrow the filter to see the rest." } }
        (bulk_form(&who, &filter, "matching", total, "all that match", &console.queue))
        table #groups {
            thead { tr { th { "Group" } th { "Kind" } th { "Types" } th.num { "Count" } th { "First" } th { "Last" } th { "Sample error" } } }
            tbody {
                @for group in groups.iter().take(GROUPS_SHOWN) { (group_row(group, &filter)) }
            }
        }
    };
    Ok(layout(&console, &who, "Failures", body))
}

fn group_row(group: &Group, filter: &Filter) -> Markup {
    html! {
        tr {
            td { a href=(group_link(&group.fingerprint, filter)) { code { (short(&group.fingerprint, 12)) } } }
            td { (group.error_kind) }
            td.types { (group.types.join(", ")) }
            td.num { (group.count) }
            td { (time(group.first_parked_at)) }
            td { (time(group.last_parked_at)) }
            td.error { (short(&group.sample_error, 200)) }
        }
    }
}

/// `GET /groups/{fingerprint}`: the group's messages, newest first, a
/// page at a time.
pub async fn group(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Path(fingerprint): Path<String>,
    params: Params,
) -> Page {
    let filter = Filter {
        fingerprint: Some(fingerprint.clone()),
        ..filter_of(&params)?
    };
    let after = params.cursor().map_err(PageError::BadRequest)?;
    let count = query::count(&console.pool, &console.queue, &filter, Status::Parked).await?;
    let messages = query::page(&console.pool, &console.queue, &filter, after, PAGE_SIZE).await?;
    let status = filter.status.unwrap_or(Status::Parked);
    let next = (messages.len() as i64 == PAGE_SIZE)
        .then(|| messages.last().map(|m| (m.last_parked_at, m.id)))
        .flatten();
    let here = format!("/groups/{}", Params::encode(&fingerprint));
    let view = query_string(&filter_pairs(&Filter {
        fingerprint: None,
        ..filter.clone()
    }));
    let body = html! {
        h1 { "Group " code { (short(&fingerprint, 16)) } }
        p.summary #summary { (count) " " (status.as_str()) " message(s)" }
        @if let Some(first) = messages.first() { p { "Kind " strong { (first.error_kind) } ". Latest error: " } pre.error { (first.error) } }
        (bulk_form(&who, &filter, "group", count, "group", &console.queue))
        form #selection method="post" action="/act" {
            (csrf_field(&who))
            input type="hidden" name="scope" value="selection";
            @if let Some(s) = filter.status { input type="hidden" name="status" value=(s.as_str()); }
            table #messages {
                thead { tr { th { "" } th { "Message id" } th { "Type" } th { "Error" } th.num { "Times parked" } th { "Last parked" } } }
                tbody { @for m in &messages { (message_row(m)) } }
            }
            @if who.may_act() && !messages.is_empty() {
                @for (word, label) in actions_for(status) {
                    button type="submit" name="action" value=(word) { (label) " selected" }
                }
                (retry_options(&console.queue))
            }
        }
        nav.pages {
            @if after.is_some() { a href=(format!("{here}?{view}")) { "First page" } }
            @if let Some(cursor) = next {
                a #next-page href=(format!("{here}?{view}&after={}", Params::encode(&cursor_text(cursor)))) { "Older messages →" }
            }
        }
    };
    Ok(layout(&console, &who, "Group", body))
}

fn message_row(m: &Message) -> Markup {
    html! {
        tr {
            td { input type="checkbox" name="id" value=(m.message_id) aria-label=(format!("select {}", m.message_id)); }
            td { a href=(format!("/messages/{}", m.id)) { (short(&m.message_id, 40)) } }
            td { (m.message_type.as_deref().unwrap_or("—")) }
            td.error { (short(&m.error, 160)) }
            td.num { (m.times_parked) }
            td { (time(m.last_parked_at)) }
        }
    }
}

/// `GET /messages/{id}`: everything the lot holds of one message.
pub async fn message(State(console): State<Arc<Console>>, Extension(who): Extension<Who>, Path(id): Path<i64>) -> Page {
    let shown = query::show_row(&console.pool, &console.queue, id)
        .await?
        .ok_or_else(|| PageError::NotFound(format!("no parked message {id} in the lot of {}", console.queue)))?;
    let m = &shown.message;
    let trace = trace_id(&shown.headers);
    let body = html! {
        h1 { "Message " code #message-id { (m.message_id) } }
        dl.facts {
            dt { "Status" } dd #status { (m.status.as_str()) }
            dt { "Type" } dd { (m.message_type.as_deref().unwrap_or("—")) }
            dt { "Kind" } dd { (m.error_kind) }
            dt { "Group" } dd { a href=(group_link(&m.fingerprint, &Filter { status: Some(m.status), ..Filter::default() })) { code { (m.fingerprint) } } }
            @if let Some(trace) = &trace {
                dt { "Trace" }
                dd { @match &console.settings.jaeger_ui_url {
                    Some(url) => a #trace href=(format!("{}/trace/{trace}", url.as_str().trim_end_matches('/'))) { (trace) },
                    None => code { (trace) },
                } }
            }
        }
        (message_actions(&who, m, &console.queue))
        h2 { "Error" }
        pre.error #error { (m.error) }
        h2 { "Body" }
        (body_view(&shown.body))
        h2 { "Headers" }
        (json_table("headers", &shown.headers))
        h2 { "Properties" }
        (json_table("properties", &shown.properties))
        h2 { "History" }
        (history(&shown))
        (super::fix::form(&who, &shown, &console.queue, None, None))
    };
    Ok(layout(&console, &who, "Message", body))
}

fn message_actions(who: &Who, m: &Message, queue: &str) -> Markup {
    html! {
        @if who.may_act() {
            form.actions method="post" action="/act" {
                (csrf_field(who))
                input type="hidden" name="scope" value="message";
                input type="hidden" name="id" value=(m.message_id);
                input type="hidden" name="status" value=(m.status.as_str());
                @for (word, label) in actions_for(m.status) { button type="submit" name="action" value=(word) { (label) } }
                (retry_options(queue))
            }
        }
    }
}

/// The fields of a retry beyond its messages: the queue it goes to (it
/// must exist; empty: back to `Q`) and its pace.
fn retry_options(queue: &str) -> Markup {
    html! {
        label.option { "Retry into queue " input.to type="text" name="to" placeholder=(queue); }
        label.option { "at most " input.rate type="number" name="rate" min="0.1" step="any" placeholder="unpaced"; " messages per second" }
    }
}

/// The trace id of a `traceparent` header (W3C: `00-<32 hex>-<16 hex>-<2 hex>`).
fn trace_id(headers: &Value) -> Option<String> {
    let parent = headers.get("traceparent")?.as_str()?;
    let id = parent.split('-').nth(1)?;
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) && id != "0".repeat(32)).then(|| id.to_owned())
}

/// The body: pretty-printed when it is JSON, as text when it is UTF-8,
/// else as hex; escaped always.
fn body_view(body: &[u8]) -> Markup {
    let (note, text) = match serde_json::from_slice::<Value>(body) {
        Ok(json) => (
            "JSON, pretty-printed",
            serde_json::to_string_pretty(&json).unwrap_or_default(),
        ),
        Err(_) => match std::str::from_utf8(body) {
            Ok(text) => ("text (not JSON)", text.to_owned()),
            Err(_) => ("not UTF-8: shown as hex", hex::encode(body)),
        },
    };
    html! {
        p.note { (body.len()) " bytes, " (note) }
        pre #body { (text) }
    }
}

fn json_table(id: &str, value: &Value) -> Markup {
    html! {
        table.kv id=(id) {
            @if let Some(map) = value.as_object() {
                @for (key, value) in map {
                    tr { th { (key) } td { code { @match value { Value::String(s) => (s), other => (other.to_string()) } } } }
                }
            }
        }
    }
}

/// Every parking and every action on the message, in order, each edit
/// with its diff; then where it stands.
fn history(shown: &Shown) -> Markup {
    let m = &shown.message;
    html! {
        ol #history {
            @for event in shown.history() {
                @match event {
                    Event::Parked(p) => li.parked {
                        (time(p.at)) ": parked, " (p.error_kind)
                        " (iot-retry-count " (p.retry_count.map_or_else(|| "none".to_owned(), |n| n.to_string()))
                        ", iot-requeue-count " (p.requeue_count) "): " span.error { (short(&p.error, 300)) }
                    },
                    Event::Acted(a) => li.action {
                        (time(a.at)) ": " (a.action)
                        @if let Some(target) = &a.target { " to " code { (target) } }
                        " by " span.actor { (a.actor) }
                        " (" a href=(format!("/actions?before={}", a.id + 1)) { "action #" (a.id) } ")"
                        @if let Some(edit) = shown.edit(a.id) { (diff_view(edit)) }
                    },
                }
            }
            li { (time(shown.status_changed_at)) ": status " (m.status.as_str())
                @if let Some(by) = &shown.status_changed_by { " by " (by) } }
        }
    }
}

/// An edit's diff, a line at a time, marked by what happened to it;
/// escaped like everything else.
fn diff_view(edit: &EditOf) -> Markup {
    html! {
        @if let (Some(header), Some(value)) = (&edit.header, &edit.header_value) {
            p.note { "Header " code { (header) } " set to " code { (value) } }
        }
        pre.diff {
            @for line in edit.diff.lines() {
                @let class = match line.chars().next() { Some('+') => "add", Some('-') => "del", _ => "same" };
                span class=(class) { (line) } "\n"
            }
        }
    }
}

/// `GET /actions`: who did what, newest first.
pub async fn actions(State(console): State<Arc<Console>>, Extension(who): Extension<Who>, params: Params) -> Page {
    let before = params
        .get("before")
        .map(|b| {
            b.parse::<i64>()
                .map_err(|_| PageError::BadRequest(format!("before: {b:?} is not an action id")))
        })
        .transpose()?;
    let rows = query::actions(&console.pool, &console.queue, before, ACTIONS_PAGE).await?;
    let next = (rows.len() as i64 == ACTIONS_PAGE)
        .then(|| rows.last().map(|r| r.id))
        .flatten();
    let body = html! {
        h1 { "Actions" }
        table #actions {
            thead { tr { th { "#" } th { "When" } th { "Who" } th { "Action" } th.num { "Messages" } th { "Filter" } th { "To" } } }
            tbody {
                @for a in &rows {
                    tr {
                        td { a href=(format!("/actions/{}", a.id)) { (a.id) } } td { (time(a.at)) } td.actor { (a.actor) } td { (a.action) }
                        td.num { (a.messages) } td { code { (a.filter.to_string()) } } td { (a.target.as_deref().unwrap_or("")) }
                    }
                }
            }
        }
        @if let Some(id) = next { nav.pages { a href=(format!("/actions?before={id}")) { "Older actions →" } } }
    };
    Ok(layout(&console, &who, "Actions", body))
}

/// `POST /act`: an action from a page. A group or "all that match" first
/// answers with the count and a confirm button; the confirmed form
/// carries that count, and the action touches no more than it.
pub async fn act(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let params = Params::from_form(&body);
    if !csrf_ok(&who, params.get("csrf")) {
        return csrf_refusal(false);
    }
    match act_page(&console, &who, &params, headers.contains_key("hx-request")).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn act_page(console: &Arc<Console>, who: &Who, params: &Params, fragment: bool) -> Result<Response, PageError> {
    let filter = filter_of(params)?;
    let word = params.get("action").unwrap_or("");
    let action = act::action(word, &console.queue, params.get("to"), &filter).map_err(PageError::BadRequest)?;
    let scope = params.get("scope").unwrap_or("");
    let bulk = match scope {
        "message" | "selection" if filter.ids.is_empty() => {
            return Err(PageError::BadRequest("Select at least one message.".into()));
        }
        "message" | "selection" => false,
        "group" | "matching" => true,
        _ => {
            return Err(PageError::BadRequest(format!(
                "scope: {scope:?} is not message, selection, group or matching"
            )));
        }
    };
    let confirmed = params
        .get("confirm")
        .map(|n| {
            n.parse::<u64>()
                .map_err(|_| PageError::BadRequest(format!("confirm: {n:?} is not a count")))
        })
        .transpose()?;
    let mut order = Order {
        action,
        filter,
        limit: confirmed,
        rate: act::rate(params.get("rate")).map_err(PageError::BadRequest)?,
    };
    let (_, past) = words(&order.action);
    if bulk && confirmed.is_none() {
        let count = act::count(console, &order).await?;
        let page = confirmation(who, &order, scope, count);
        return Ok(if fragment {
            page.into_response()
        } else {
            layout(console, who, "Confirm", page).into_response()
        });
    }
    if !bulk {
        order.limit = Some(order.filter.ids.len() as u64);
    }
    let result = match act::run(console, who, order).await {
        Ok(Finished::Done(done)) => html! {
            p.done role="status" #result { (past) " " (done.messages) " message(s) (action #" (done.action_id) ")." }
        },
        Ok(Finished::Paced(id)) => return Ok(Redirect::to(&format!("/actions/{id}")).into_response()),
        Ok(Finished::Running) => html! {
            p.done role="status" #result { "The action goes on in the background; the " a href="/actions" { "Actions" } " page counts it." }
        },
        Err(why) => html! { p.error role="alert" #result { "The action stopped: " (why) } },
    };
    let body = html! { h1 { "Done" } (result) p { a href="/" { "Back to the failures" } } };
    Ok(layout(console, who, "Done", body).into_response())
}

/// An action's button and its result, as a page words them.
fn words(action: &Action) -> (&'static str, &'static str) {
    match action {
        Action::Retry { .. } => ("Retry", "Retried"),
        Action::Archive => ("Archive", "Archived"),
        Action::Unarchive => ("Unarchive", "Unarchived"),
    }
}

/// "Retry 12 messages?" with the form that confirms it.
fn confirmation(who: &Who, order: &Order, scope: &str, count: u64) -> Markup {
    let (label, _) = words(&order.action);
    html! {
        section.confirm role="dialog" aria-labelledby="confirm-question" {
            @if count == 0 {
                p #confirm-question { "No message matches: nothing to do." }
            } @else {
                p #confirm-question { (label) " " strong #confirm-count { (count) } " message(s)"
                    @if let Action::Retry { target, .. } = &order.action { " into " code #confirm-target { (target) } }
                    @if let Some(rate) = order.rate { " at " span #confirm-rate { (rate) } " per second" } "?" }
                form method="post" action="/act" {
                    (csrf_field(who))
                    input type="hidden" name="scope" value=(scope);
                    input type="hidden" name="action" value=(order.action.as_str());
                    input type="hidden" name="confirm" value=(count);
                    @if let Action::Retry { target, .. } = &order.action { input type="hidden" name="to" value=(target); }
                    @if let Some(rate) = order.rate { input type="hidden" name="rate" value=(rate); }
                    (hidden(&filter_pairs(&order.filter)))
                    button #confirm-button type="submit" { (label) " " (count) " message(s)" }
                    " "
                    a href="/" { "Cancel" }
                }
            }
        }
    }
}
