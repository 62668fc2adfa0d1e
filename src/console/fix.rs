//! Fix and retry from the console (docs/console.md, "Fix and retry"): the
//! edit form on a message's page, its POST, and the same as JSON under
//! `/api/`. Both come to [`act::fix`], which checks the edit the way the
//! worker will before anything is sent.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::json;

use super::Console;
use super::act;
use super::auth::{Who, csrf_ok, csrf_refusal};
use super::frame::{not_json, problem};
use super::layout::document;
use super::params::Params;
use crate::parking::Status;
use crate::parking::edit::{Edit, EditError};
use crate::parking::query::Shown;

/// What the form held: shown again, unchanged, when the edit is refused.
#[derive(Debug, Default)]
pub struct Draft<'a> {
    pub body: &'a str,
    pub header: &'a str,
    pub value: &'a str,
    pub to: &'a str,
}

/// The edit form of a message's page: for the operator, on a message not
/// yet retried whose body is text. `problem` is why the last try was not
/// sent.
pub fn form(who: &Who, shown: &Shown, queue: &str, draft: Option<&Draft<'_>>, problem: Option<&str>) -> Markup {
    let Ok(original) = std::str::from_utf8(&shown.body) else {
        return html! {};
    };
    if !who.may_act() || shown.message.status == Status::Retried {
        return html! {};
    }
    let draft = draft.map_or(
        Draft {
            body: original,
            ..Draft::default()
        },
        |d| Draft { ..*d },
    );
    html! {
        section #fix {
            h2 { "Fix and retry" }
            p.note { "The edit is checked as the worker checks a message (the envelope, then the type's \
                validation) before anything is sent. The original bytes are kept." }
            @if let Some(problem) = problem {
                p.error role="alert" #edit-error { "Not sent: " (problem) }
            }
            form method="post" action=(format!("/messages/{}/edit", shown.message.id)) {
                input type="hidden" name="csrf" value=(who.csrf.as_deref().unwrap_or(""));
                label { "Body" textarea #edit-body name="body" rows="12" cols="80" spellcheck="false" { (draft.body) } }
                label { "Header (optional, not iot-*) " input #edit-header type="text" name="header" value=(draft.header); }
                label { "Value " input #edit-value type="text" name="value" value=(draft.value); }
                label { "Into queue " input #edit-to type="text" name="to" value=(draft.to) placeholder=(queue); }
                button #edit-button type="submit" { "Check and retry" }
            }
        }
    }
}

/// The edit a form or a JSON body gives.
fn edit_of(body: &str, header: &str, value: &str) -> Edit {
    Edit {
        body: body.as_bytes().to_vec(),
        header: (!header.trim().is_empty()).then(|| (header.trim().to_owned(), value.to_owned())),
    }
}

/// `POST /messages/{id}/edit`: a refused edit shows the message's form
/// again with the worker's error; an accepted one says what was done.
pub async fn edit_page(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Path(id): Path<i64>,
    body: Bytes,
) -> Response {
    // Not `Params`: a body's own spaces and line ends are kept.
    let fields: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    let field = |name: &str| fields.iter().find(|(k, _)| k == name).map_or("", |(_, v)| v.as_str());
    if !csrf_ok(&who, Some(field("csrf")).filter(|c| !c.is_empty())) {
        return csrf_refusal(false);
    }
    let to = Params::from_form(&body).get("to").map(str::to_owned);
    let edit = edit_of(field("body"), field("header"), field("value"));
    let (status, markup) = match act::fix(&console, &who, id, &edit, to.as_deref()).await {
        Ok(action_id) => (StatusCode::OK, done(id, action_id)),
        Err(EditError::Refused(problem)) => {
            let draft = Draft {
                body: field("body"),
                header: field("header"),
                value: field("value"),
                to: to.as_deref().unwrap_or(""),
            };
            let shown = crate::parking::query::show_row(&console.pool, &console.queue, id).await;
            let form = match shown {
                Ok(Some(shown)) => form(&who, &shown, &console.queue, Some(&draft), Some(&problem)),
                _ => html! { p.error role="alert" #edit-error { "Not sent: " (problem) } },
            };
            (StatusCode::UNPROCESSABLE_ENTITY, html! { h1 { "Not sent" } (form) })
        }
        Err(e) => {
            let status = match e {
                EditError::NotFound(_) => StatusCode::NOT_FOUND,
                _ => StatusCode::BAD_GATEWAY,
            };
            (status, html! { p.error role="alert" #edit-error { (e.to_string()) } })
        }
    };
    (status, document("Fix and retry", None, markup)).into_response()
}

fn done(id: i64, action_id: i64) -> Markup {
    html! {
        h1 { "Done" }
        p.done role="status" #result { "Fixed and retried (action #" (action_id) ")." }
        p { a #back href=(format!("/messages/{id}")) { "Back to the message" } }
    }
}

/// The body of `POST /api/messages/{id}/edit`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EditRequest {
    /// The whole new body, as text.
    body: String,
    /// One header to set (not `iot-*`).
    header: Option<HeaderEdit>,
    /// The queue to retry into, else `Q`.
    to: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderEdit {
    name: String,
    value: String,
}

/// `POST /api/messages/{id}/edit`: 200 with the action's id, 422 with the
/// worker's error (nothing sent).
pub async fn edit_api(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Path(id): Path<i64>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !csrf_ok(&who, headers.get("x-csrf-token").and_then(|v| v.to_str().ok())) {
        return csrf_refusal(true);
    }
    if let Some(refusal) = not_json(&headers) {
        return refusal;
    }
    let request: EditRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return problem(StatusCode::BAD_REQUEST, format!("the request: {e}")),
    };
    let (name, value) = request
        .header
        .map_or((String::new(), String::new()), |h| (h.name, h.value));
    let edit = edit_of(&request.body, &name, &value);
    match act::fix(&console, &who, id, &edit, request.to.as_deref()).await {
        Ok(action_id) => Json(json!({ "action_id": action_id, "sent": true })).into_response(),
        Err(EditError::Refused(why)) => problem(StatusCode::UNPROCESSABLE_ENTITY, why),
        Err(EditError::NotFound(id)) => problem(StatusCode::NOT_FOUND, format!("no message {id} in the lot")),
        Err(e) => problem(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}
