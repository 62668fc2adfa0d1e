//! What every framed page shares: the navigation around a body, the
//! CSRF field of a form, the error page of a request that failed, and
//! the JSON API's error answers.

use axum::Json;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde_json::json;

use super::Console;
use super::auth::Who;
use super::layout::{document, layout_bare};

/// A page that could not be made.
pub enum PageError {
    BadRequest(String),
    NotFound(String),
    Database(sqlx::Error),
}

impl From<sqlx::Error> for PageError {
    fn from(e: sqlx::Error) -> PageError {
        PageError::Database(e)
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let (status, text) = match self {
            PageError::BadRequest(why) => (StatusCode::BAD_REQUEST, why),
            PageError::NotFound(what) => (StatusCode::NOT_FOUND, what),
            PageError::Database(e) => {
                tracing::warn!(error.message = %e, "console page failed");
                (StatusCode::SERVICE_UNAVAILABLE, format!("PostgreSQL: {e}"))
            }
        };
        (status, layout_bare("Error", html! { p.error role="alert" { (text) } })).into_response()
    }
}

pub type Page = Result<Markup, PageError>;

/// A page with the navigation and who is logged in.
pub fn layout(console: &Console, who: &Who, title: &str, body: Markup) -> Markup {
    let nav = html! {
        header {
            nav {
                a href="/" { "Failures" }
                a href="/actions" { "Actions" }
                span.queue { "queue " code { (console.queue) } }
                span.who #who { (who.actor()) @if !console.settings.protected() { " (no token: loopback only)" } }
                @if console.settings.protected() {
                    form.inline method="post" action="/logout" {
                        (csrf_field(who))
                        button type="submit" { "Log out" }
                    }
                }
            }
        }
    };
    document(title, Some(nav), body)
}

/// The hidden CSRF field of every form that posts.
pub fn csrf_field(who: &Who) -> Markup {
    html! { input type="hidden" name="csrf" value=(who.csrf.as_deref().unwrap_or("")); }
}

/// `text` cut to `max` characters, with an ellipsis when cut.
pub fn short(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let cut: String = text.chars().take(max).collect();
    format!("{cut}…")
}

/// A JSON error: `{"error": why}`.
pub fn problem(status: StatusCode, why: impl Into<String>) -> Response {
    (status, Json(json!({ "error": why.into() }))).into_response()
}

/// The refusal of a POST whose body is not JSON (a browser cannot send
/// JSON cross-site without asking first).
pub fn not_json(headers: &HeaderMap) -> Option<Response> {
    let json_body = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.split(';').next().is_some_and(|t| t.trim() == "application/json"));
    (!json_body).then(|| {
        problem(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send Content-Type: application/json",
        )
    })
}
