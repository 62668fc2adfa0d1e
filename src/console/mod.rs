//! The failed-message console (docs/console.md): pages and a JSON API over
//! the parking lot, for the operator who would otherwise use `requeue`.
//! Every read is a [`query`](crate::parking::query) and every action an
//! [`actions::run`](crate::parking::actions::run), the functions `requeue`
//! calls, so the two keep the same rules.
//!
//! * [`settings`]: `CONSOLE_ADDR`, the tokens and `JAEGER_UI_URL`, checked
//!   at start-up (a non-loopback address needs a token);
//! * [`auth`]: who asks (token, session cookie, CSRF token, same origin)
//!   and the security headers of every response;
//! * `pages` and `api`: the HTML and the JSON, both through [`act`] for
//!   actions;
//! * `frame`: the navigation around every page, and the error page;
//! * `fix`: fix and retry, the edit form and its JSON twin;
//! * `chart`: failures over time, an SVG drawn here, and `/api/stats`;
//! * `paced`: retries at a rate, in the background, with their progress
//!   and a Stop button;
//! * `params`: filters and cursors from query strings and forms.

mod act;
mod api;
pub mod auth;
mod chart;
mod fix;
mod frame;
mod layout;
mod paced;
mod pages;
mod params;
pub mod settings;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::routing::{get, post};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::timeout::TimeoutLayer;

use crate::http::{self, Server};
pub use act::Broker;
pub use paced::Jobs;
pub use settings::ConsoleSettings;

/// How long a request may take. An action that takes longer goes on in
/// the background ([`act::ANSWER_WITHIN`] is shorter).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// htmx, vendored from the npm package `htmx.org` 2.0.11
/// (`static/htmx.LICENSE`): nothing loads from a CDN.
const HTMX: &str = include_str!("static/htmx.min.js");
const CSS: &str = include_str!("static/console.css");

/// What every handler reads.
pub struct Console {
    pub pool: PgPool,
    pub broker: Broker,
    /// The main queue `Q` whose lot is shown.
    pub queue: String,
    pub settings: ConsoleSettings,
    pub sessions: auth::Sessions,
    /// `MAX_MESSAGE_BYTES`: an edit is decoded as the worker decodes.
    pub max_message_bytes: usize,
    /// Paced retries under way; stopped with the console.
    pub jobs: Jobs,
}

/// Serves the console on `listener` until `shutdown`.
///
/// # Errors
/// The listener's address cannot be read.
pub fn serve(listener: TcpListener, console: Console, shutdown: CancellationToken) -> std::io::Result<Server> {
    http::serve_router(listener, router(Arc::new(console)), shutdown)
}

fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/", get(pages::failures))
        .route("/groups/{fingerprint}", get(pages::group))
        .route("/messages/{id}", get(pages::message))
        .route("/messages/{id}/edit", post(fix::edit_page))
        .route("/actions", get(pages::actions))
        .route("/actions/{id}", get(paced::page))
        .route("/actions/{id}/progress", get(paced::progress))
        .route("/actions/{id}/stop", post(paced::stop_page))
        .route("/act", post(pages::act))
        .route("/login", get(auth::login_page).post(auth::login))
        .route("/logout", post(auth::logout))
        .route("/api/groups", get(api::groups))
        .route("/api/messages", get(api::messages))
        .route("/api/messages/{id}", get(api::message))
        .route("/api/messages/{id}/edit", post(fix::edit_api))
        .route("/api/actions", get(api::actions).post(api::act))
        .route("/api/actions/{id}", get(paced::api))
        .route("/api/actions/{id}/stop", post(paced::stop_api))
        .route("/api/stats", get(chart::api))
        .route("/static/htmx.min.js", get(|| async { asset("text/javascript", HTMX) }))
        .route("/static/console.css", get(|| async { asset("text/css", CSS) }))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .layer(middleware::from_fn_with_state(console.clone(), auth::guard))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .layer(middleware::map_response(auth::security_headers))
        .with_state(console)
}

fn asset(content_type: &'static str, body: &'static str) -> impl axum::response::IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
}
