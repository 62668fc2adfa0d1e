//! The JSON API under `/api/` (docs/console.md, "The JSON API"): the same
//! data and actions as the pages, for scripts. A script sends
//! `Authorization: Bearer <token>`; a group action (no `filter.ids`) must
//! say how many messages it expects, as a person confirms the count.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Console;
use super::act::{self, Finished, Order};
use super::auth::{Who, csrf_ok, csrf_refusal};
use super::frame::{not_json, problem};
use super::params::{Params, cursor_text};
use crate::parking::Filter;
use crate::parking::{actions, query};

/// Most messages in one answer of `/api/messages`.
const MAX_PAGE: i64 = 500;

fn database(e: &sqlx::Error) -> Response {
    problem(StatusCode::SERVICE_UNAVAILABLE, format!("PostgreSQL: {e}"))
}

/// `GET /api/groups`: the groups the filter (query string, as the pages')
/// matches.
pub async fn groups(State(console): State<Arc<Console>>, params: Params) -> Response {
    let filter = match params.filter() {
        Ok(filter) => filter,
        Err(why) => return problem(StatusCode::BAD_REQUEST, why),
    };
    match query::groups(&console.pool, &console.queue, &filter).await {
        Ok(groups) => Json(json!({ "queue": console.queue, "groups": groups })).into_response(),
        Err(e) => database(&e),
    }
}

/// `GET /api/messages`: a page of the matching messages, newest first;
/// `next` is the `after` of the next page.
pub async fn messages(State(console): State<Arc<Console>>, params: Params) -> Response {
    let (filter, after) = match params.filter().and_then(|f| Ok((f, params.cursor()?))) {
        Ok(found) => found,
        Err(why) => return problem(StatusCode::BAD_REQUEST, why),
    };
    let limit = params
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(100)
        .clamp(1, MAX_PAGE);
    match query::page(&console.pool, &console.queue, &filter, after, limit).await {
        Ok(messages) => {
            let next = (messages.len() as i64 == limit)
                .then(|| messages.last().map(|m| cursor_text((m.last_parked_at, m.id))))
                .flatten();
            Json(json!({ "messages": messages, "next": next })).into_response()
        }
        Err(e) => database(&e),
    }
}

/// `GET /api/messages/{id}`: one message with headers, properties, body
/// (text when UTF-8, else hex) and the actions on it.
pub async fn message(State(console): State<Arc<Console>>, Path(id): Path<i64>) -> Response {
    let shown = match query::show_row(&console.pool, &console.queue, id).await {
        Ok(Some(shown)) => shown,
        Ok(None) => return problem(StatusCode::NOT_FOUND, format!("no parked message {id}")),
        Err(e) => return database(&e),
    };
    let (body, encoding) = match String::from_utf8(shown.body.clone()) {
        Ok(text) => (text, "utf-8"),
        Err(_) => (hex::encode(&shown.body), "hex"),
    };
    let mut value = serde_json::to_value(&shown.message).unwrap_or(Value::Null);
    if let Some(map) = value.as_object_mut() {
        map.insert("headers".into(), shown.headers);
        map.insert("properties".into(), shown.properties);
        map.insert("body".into(), body.into());
        map.insert("body_encoding".into(), encoding.into());
        map.insert("status_changed_at".into(), json!(shown.status_changed_at));
        map.insert("status_changed_by".into(), json!(shown.status_changed_by));
        map.insert("failed_at".into(), json!(shown.failed_at));
        map.insert("actions".into(), json!(shown.actions));
    }
    Json(value).into_response()
}

/// `GET /api/actions`: who did what, newest first (`before`: an id).
pub async fn actions(State(console): State<Arc<Console>>, params: Params) -> Response {
    let before = params.get("before").and_then(|b| b.parse().ok());
    match query::actions(&console.pool, &console.queue, before, 100).await {
        Ok(rows) => Json(json!({ "actions": rows })).into_response(),
        Err(e) => database(&e),
    }
}

/// The body of `POST /api/actions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActRequest {
    /// `retry`, `archive` or `unarchive`.
    action: String,
    #[serde(default)]
    filter: Filter,
    /// At most this many messages.
    limit: Option<u64>,
    /// For an action without `filter.ids`: the count the caller saw
    /// (as `GET` with `"dry_run"` tells); no more than it is touched.
    expect: Option<u64>,
    /// Only count, change nothing.
    #[serde(default)]
    dry_run: bool,
    /// For a retry: the queue to publish to (it must exist), else `Q`.
    to: Option<String>,
    /// At most this many messages per second: the action runs in the
    /// background and `GET /api/actions/{id}` shows its progress.
    rate: Option<f64>,
}

/// The request and the order it makes.
fn parse(body: &[u8], queue: &str) -> Result<(ActRequest, Order), String> {
    let request: ActRequest = serde_json::from_slice(body).map_err(|e| format!("the request: {e}"))?;
    let rate = request
        .rate
        .map(actions::check_rate)
        .transpose()
        .map_err(|e| format!("rate: {e}"))?;
    let order = Order {
        action: act::action(&request.action, queue, request.to.as_deref(), &request.filter)?,
        limit: request.limit,
        filter: request.filter.clone(),
        rate,
    };
    Ok((request, order))
}

/// `POST /api/actions`: runs an action. JSON only (a browser cannot send
/// it cross-site without asking first), with the session's
/// `X-CSRF-Token` when it comes from a logged-in browser.
pub async fn act(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let csrf = headers.get("x-csrf-token").and_then(|v| v.to_str().ok());
    if !csrf_ok(&who, csrf) {
        return csrf_refusal(true);
    }
    if let Some(refusal) = not_json(&headers) {
        return refusal;
    }
    let (request, mut order) = match parse(&body, &console.queue) {
        Ok(parsed) => parsed,
        Err(why) => return problem(StatusCode::BAD_REQUEST, why),
    };
    let matching = match act::count(&console, &order).await {
        Ok(n) => n,
        Err(e) => return database(&e),
    };
    if request.dry_run {
        return Json(json!({ "dry_run": true, "matching": matching })).into_response();
    }
    if order.filter.ids.is_empty() {
        let Some(expect) = request.expect else {
            return (
                StatusCode::CONFLICT,
                Json(json!({
                    "error": "an action on a whole group or filter must say how many messages it expects",
                    "matching": matching,
                    "hint": format!("send again with \"expect\": {matching}"),
                })),
            )
                .into_response();
        };
        order.limit = Some(order.limit.map_or(expect, |l| l.min(expect)));
    }
    match act::run(&console, &who, order).await {
        Ok(Finished::Done(done)) => Json(json!({
            "action_id": done.action_id,
            "messages": done.messages,
            "running": false,
        }))
        .into_response(),
        Ok(Finished::Running) => (StatusCode::ACCEPTED, Json(json!({ "running": true }))).into_response(),
        Ok(Finished::Paced(id)) => (
            StatusCode::ACCEPTED,
            Json(json!({ "action_id": id, "running": true, "progress": format!("/api/actions/{id}") })),
        )
            .into_response(),
        Err(why) => problem(StatusCode::BAD_GATEWAY, why),
    }
}
