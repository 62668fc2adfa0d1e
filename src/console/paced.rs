//! Paced retries from the console (docs/console.md, "Paced retries"): a
//! retry with a rate runs in the background, one small batch at a time,
//! at most that many messages per second. Its page shows how far it got
//! and stops it; what it has not sent stays parked. The pages and the
//! JSON API both read the same [`Jobs`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Json};
use maud::{Markup, html};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Console;
use super::auth::{Who, csrf_ok, csrf_refusal};
use super::frame::{PageError, csrf_field, layout, problem};
use super::params::Params;
use crate::parking::query::{self, ActionRow};

/// How long a Stop waits for the batch under way (a tenth of a second's
/// worth at the job's rate) before it answers.
const STOP_WITHIN: Duration = Duration::from_secs(5);

/// Where a paced retry stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    Running,
    /// Stopped by an operator or by the console's shutdown.
    Stopped,
    /// Every matching message was sent.
    Finished,
    /// A publish or the database failed; what it committed stays done.
    Failed(String),
}

impl JobState {
    /// The word the page and the API show, and what went wrong.
    pub fn word(&self) -> (&'static str, Option<&str>) {
        match self {
            JobState::Running => ("running", None),
            JobState::Stopped => ("stopped", Some("What it had not sent stays parked.")),
            JobState::Finished => ("finished", None),
            JobState::Failed(why) => ("failed", Some(why.as_str())),
        }
    }
}

/// One paced retry: what it plans, how far it got, how to stop it.
pub struct Job {
    /// Messages it set out to send (the confirmed count).
    pub planned: u64,
    pub rate: f64,
    /// Messages sent and marked so far (committed batches).
    pub sent: AtomicU64,
    state: watch::Sender<JobState>,
    stop: CancellationToken,
}

impl Job {
    pub fn state(&self) -> JobState {
        self.state.borrow().clone()
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Records how it ended.
    pub fn end(&self, state: JobState) {
        self.state.send_replace(state);
    }

    /// Stops it between two batches, and waits up to `within` for that.
    async fn stop(&self, within: Duration) {
        self.stop.cancel();
        let mut state = self.state.subscribe();
        tokio::time::timeout(within, state.wait_for(|s| *s != JobState::Running))
            .await
            .ok();
    }
}

/// The console's paced retries by action id, in memory: a restart stops
/// them between two batches, and the Actions page keeps their counts.
pub struct Jobs {
    shutdown: CancellationToken,
    jobs: Mutex<HashMap<i64, Arc<Job>>>,
}

impl Jobs {
    /// Jobs that stop when `shutdown` is cancelled.
    pub fn new(shutdown: CancellationToken) -> Jobs {
        Jobs {
            shutdown,
            jobs: Mutex::new(HashMap::new()),
        }
    }

    /// Registers the job of action `id` and returns it with its stop token.
    pub fn add(&self, id: i64, planned: u64, rate: f64) -> (Arc<Job>, CancellationToken) {
        let stop = self.shutdown.child_token();
        let job = Arc::new(Job {
            planned,
            rate,
            sent: AtomicU64::new(0),
            state: watch::Sender::new(JobState::Running),
            stop: stop.clone(),
        });
        self.lock().insert(id, job.clone());
        (job, stop)
    }

    pub fn get(&self, id: i64) -> Option<Arc<Job>> {
        self.lock().get(&id).cloned()
    }

    /// Stops job `id` and waits until it has (a batch under way
    /// finishes); false when there is none.
    pub async fn stop(&self, id: i64) -> bool {
        let Some(job) = self.get(id) else {
            return false;
        };
        job.stop(STOP_WITHIN).await;
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The action's row of `console`'s lot, or a 404.
async fn action_row(console: &Console, id: i64) -> Result<ActionRow, PageError> {
    query::action(&console.pool, &console.queue, id)
        .await?
        .ok_or_else(|| PageError::NotFound(format!("no action {id}")))
}

/// `GET /actions/{id}`: one action, with the progress of a paced retry
/// and its Stop button.
pub async fn page(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Path(id): Path<i64>,
) -> Result<Markup, PageError> {
    let row = action_row(&console, id).await?;
    let job = console.jobs.get(id);
    let running = job.as_ref().is_some_and(|j| j.state() == JobState::Running);
    let body = html! {
        h1 { "Action #" (id) }
        dl.meta {
            dt { "Action" } dd #action-word { (row.action) }
            dt { "Who" } dd { (row.actor) }
            dt { "Filter" } dd { code { (row.filter.to_string()) } }
            @if let Some(target) = &row.target { dt { "To" } dd { code { (target) } } }
        }
        (progress_view(id, &row, job.as_deref()))
        @if running && who.may_act() {
            form method="post" action=(format!("/actions/{id}/stop")) {
                (csrf_field(&who))
                button #stop type="submit" { "Stop" }
            }
        }
        p { a href="/actions" { "All actions" } }
    };
    Ok(layout(&console, &who, &format!("Action #{id}"), body))
}

/// `GET /actions/{id}/progress`: the progress alone, which the page asks
/// for every second while the retry runs.
pub async fn progress(State(console): State<Arc<Console>>, Path(id): Path<i64>) -> Result<Markup, PageError> {
    let row = action_row(&console, id).await?;
    Ok(progress_view(id, &row, console.jobs.get(id).as_deref()))
}

/// "Sent 1,000 of 2,000 at 200 per second: running", polled while it runs.
fn progress_view(id: i64, row: &ActionRow, job: Option<&Job>) -> Markup {
    let Some(job) = job else {
        return html! { p #progress { "Messages: " span #sent { (row.messages) } } };
    };
    let state = job.state();
    let (word, note) = state.word();
    // Asks for itself again every second while the retry runs.
    let poll = (state == JobState::Running).then(|| format!("/actions/{id}/progress"));
    html! {
        p #progress role="status" hx-get=[poll.as_ref()] hx-trigger=[poll.as_ref().map(|_| "every 1s")] hx-swap="outerHTML" {
            "Sent " span #sent { (job.sent()) } " of " span #planned { (job.planned) }
            " at " (job.rate) " per second: " span #state { (word) }
            @if let Some(note) = note { " " span.note { (note) } }
        }
    }
}

/// `POST /actions/{id}/stop`: stops a paced retry between two batches,
/// then shows its page.
pub async fn stop_page(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Path(id): Path<i64>,
    body: Bytes,
) -> Response {
    if !csrf_ok(&who, Params::from_form(&body).get("csrf")) {
        return csrf_refusal(false);
    }
    if !console.jobs.stop(id).await {
        return PageError::NotFound(format!("action {id} is not a paced retry of this console")).into_response();
    }
    Redirect::to(&format!("/actions/{id}")).into_response()
}

/// `GET /api/actions/{id}`: the action, and for a paced retry its
/// `planned`, `sent`, `rate` and `state`.
pub async fn api(State(console): State<Arc<Console>>, Path(id): Path<i64>) -> Response {
    let row = match query::action(&console.pool, &console.queue, id).await {
        Ok(Some(row)) => row,
        Ok(None) => return problem(StatusCode::NOT_FOUND, format!("no action {id}")),
        Err(e) => return problem(StatusCode::SERVICE_UNAVAILABLE, format!("PostgreSQL: {e}")),
    };
    let mut value = serde_json::to_value(&row).unwrap_or_default();
    if let (Some(job), Some(map)) = (console.jobs.get(id), value.as_object_mut()) {
        let state = job.state();
        let (word, note) = state.word();
        map.insert(
            "paced".into(),
            json!({ "planned": job.planned, "sent": job.sent(), "rate": job.rate, "state": word, "note": note }),
        );
    }
    Json(value).into_response()
}

/// `POST /api/actions/{id}/stop`: as the page's Stop button.
pub async fn stop_api(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Response {
    let csrf = headers.get("x-csrf-token").and_then(|v| v.to_str().ok());
    if !csrf_ok(&who, csrf) {
        return csrf_refusal(true);
    }
    if console.jobs.stop(id).await {
        Json(json!({ "action_id": id, "stopping": true })).into_response()
    } else {
        problem(
            StatusCode::NOT_FOUND,
            format!("action {id} is not a paced retry of this console"),
        )
    }
}
