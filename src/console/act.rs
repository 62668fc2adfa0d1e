//! Retry, Archive and Unarchive from the console: the pages and the API
//! both come here, and this calls [`actions::run`], `requeue`'s own path
//! (confirmed publish, then marked, then logged in `operator_actions`).

use std::sync::Arc;
use std::time::Duration;

use lapin::Connection;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::Console;
use super::auth::Who;
use super::paced::JobState;
use crate::broker::{self, Publisher};
use crate::parking::edit::{self, Edit, EditError, Fix};
use crate::parking::{Action, Done, Filter, Request, Status, actions, keeper, query};

/// How long a request waits for its action. A longer one (a retry of very
/// many messages) goes on in the background: each batch commits on its
/// own, and the Actions page counts them.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(20);

/// How long a page waits for the depth of `Q.dlq`.
const WAITING_TIMEOUT: Duration = Duration::from_millis(300);

/// The console's broker connection, opened at the first retry (or the
/// first look at `Q.dlq`) and again after it broke.
pub struct Broker {
    urls: String,
    open: Mutex<Option<(Connection, Publisher)>>,
}

impl Broker {
    pub fn new(urls: &str) -> Broker {
        Broker {
            urls: urls.to_owned(),
            open: Mutex::new(None),
        }
    }

    /// How many messages wait in `queue` (the DLQ, not yet in the lot),
    /// if the broker answers within [`WAITING_TIMEOUT`]: a page never
    /// waits for a broker that is down.
    pub async fn waiting(&self, queue: &str) -> Option<u32> {
        let ask = async {
            self.publisher().await.ok()?;
            let open = self.open.lock().await;
            let (connection, _) = open.as_ref()?;
            keeper::queue_depth(connection, queue).await.ok().flatten()
        };
        tokio::time::timeout(WAITING_TIMEOUT, ask).await.ok().flatten()
    }

    async fn publisher(&self) -> Result<Publisher, String> {
        let mut open = self.open.lock().await;
        if let Some((connection, publisher)) = open.as_ref()
            && connection.status().connected()
        {
            return Ok(publisher.clone());
        }
        let connection = broker::connect(&self.urls, "worker-iot-core console")
            .await
            .map_err(|e| format!("cannot reach RabbitMQ: {e}"))?;
        let publisher = Publisher::open(&connection)
            .await
            .map_err(|e| format!("cannot open a channel: {e}"))?;
        *open = Some((connection, publisher.clone()));
        Ok(publisher)
    }

    /// Whether `queue` exists (a passive declare), so a retry never
    /// publishes into nothing.
    ///
    /// # Errors
    /// The broker cannot be asked.
    pub async fn queue_exists(&self, queue: &str) -> Result<bool, String> {
        self.publisher().await?;
        let open = self.open.lock().await;
        let (connection, _) = open.as_ref().ok_or("the broker connection closed")?;
        let depth = keeper::queue_depth(connection, queue)
            .await
            .map_err(|e| format!("cannot ask RabbitMQ about queue '{queue}': {e}"))?;
        Ok(depth.is_some())
    }

    /// Forgets the connection after a failed publish: the next retry opens
    /// a new one.
    async fn forget(&self) {
        if let Some((connection, _)) = self.open.lock().await.take() {
            broker::close(connection, "publish failed").await;
        }
    }
}

/// An action asked for by a person or a script.
#[derive(Debug, Clone)]
pub struct Order {
    pub action: Action,
    pub filter: Filter,
    pub limit: Option<u64>,
    /// At most this many messages per second: the action runs in the
    /// background, paced ([`super::paced`]).
    pub rate: Option<f64>,
}

/// How an action ended, as far as the request saw it.
#[derive(Debug)]
pub enum Finished {
    Done(Done),
    /// Still running after [`ANSWER_WITHIN`].
    Running,
    /// A paced retry, started in the background: its action id.
    Paced(i64),
}

/// A rate from a form or a request; empty is none.
///
/// # Errors
/// Not a positive number, in words.
pub fn rate(text: Option<&str>) -> Result<Option<f64>, String> {
    match text.map(str::trim) {
        None | Some("") => Ok(None),
        Some(text) => actions::parse_rate(text).map(Some).map_err(|e| format!("rate: {e}")),
    }
}

/// `retry`, `archive` or `unarchive`: a retry goes to `to`, else back to
/// `Q`.
///
/// # Errors
/// The word is none of them, a target given for another action than
/// retry, or unarchive on another status than archived.
pub fn action(word: &str, queue: &str, to: Option<&str>, filter: &Filter) -> Result<Action, String> {
    if to.is_some() && word != "retry" {
        return Err(format!("to: only a retry goes to another queue, not {word}"));
    }
    let action = match word {
        "retry" => Action::Retry {
            target: to.unwrap_or(queue).to_owned(),
            keep_retry_count: false,
        },
        "archive" => Action::Archive,
        "unarchive" => Action::Unarchive,
        _ => return Err(format!("action: {word:?} is not retry, archive or unarchive")),
    };
    if action == Action::Unarchive && filter.status.is_some_and(|s| s != Status::Archived) {
        return Err("unarchive works on archived messages only".into());
    }
    Ok(action)
}

/// Refuses a retry into a queue that does not exist.
///
/// # Errors
/// The queue is missing, or the broker cannot be asked.
pub async fn check_target(console: &Console, action: &Action) -> Result<(), String> {
    let Action::Retry { target, .. } = action else {
        return Ok(());
    };
    if target == &console.queue || console.broker.queue_exists(target).await? {
        return Ok(());
    }
    Err(format!("queue '{target}' does not exist: nothing was sent"))
}

/// Fixes message `id` with `edit` and retries it to `to` (else `Q`), for
/// `who`: checked as the worker checks, published, then recorded.
///
/// # Errors
/// [`EditError::Refused`] with the worker's error (nothing sent), a
/// missing target, or what stopped it.
pub async fn fix(console: &Console, who: &Who, id: i64, edit: &Edit, to: Option<&str>) -> Result<i64, EditError> {
    let target = to.unwrap_or(&console.queue);
    let retry = Action::Retry {
        target: target.to_owned(),
        keep_retry_count: false,
    };
    check_target(console, &retry).await.map_err(EditError::Refused)?;
    let publisher = console.broker.publisher().await.map_err(EditError::Refused)?;
    let actor = who.actor();
    let fix = Fix {
        queue: &console.queue,
        id,
        edit,
        target,
        actor: &actor,
        max_bytes: console.max_message_bytes,
    };
    let result = edit::fix_and_retry(&console.pool, &publisher, &fix).await;
    if let Err(EditError::Publish(_)) = &result {
        console.broker.forget().await;
    }
    result
}

/// How many messages `order` would touch now.
///
/// # Errors
/// The database error.
pub async fn count(console: &Console, order: &Order) -> Result<u64, sqlx::Error> {
    let matching = query::count(&console.pool, &console.queue, &order.filter, order.action.from_status()).await?;
    let matching = u64::try_from(matching).unwrap_or(0);
    Ok(order.limit.map_or(matching, |limit| matching.min(limit)))
}

/// Runs `order` for `who`, waiting up to [`ANSWER_WITHIN`]; the action
/// itself goes on if the request ends first.
///
/// # Errors
/// Why it stopped (what it committed before stays done).
pub async fn run(console: &Arc<Console>, who: &Who, order: Order) -> Result<Finished, String> {
    check_target(console, &order.action).await?;
    let publisher = match order.action {
        Action::Retry { .. } => Some(console.broker.publisher().await?),
        Action::Archive | Action::Unarchive => None,
    };
    if let Some(rate) = order.rate {
        return paced(console, who, order, publisher, rate).await;
    }
    let console = console.clone();
    let actor = who.actor();
    let task = tokio::spawn(async move {
        let request = Request {
            queue: &console.queue,
            filter: &order.filter,
            limit: order.limit,
            rate: None,
            actor: &actor,
        };
        let stop = CancellationToken::new();
        let result = actions::run(
            &console.pool,
            publisher.as_ref(),
            &request,
            &order.action,
            &stop,
            |_| {},
        )
        .await;
        if let Err(e) = &result {
            tracing::warn!(error.message = %e, actor, action = order.action.as_str(), "console action stopped");
            if matches!(e, actions::ActionError::Publish { .. }) {
                console.broker.forget().await;
            }
        }
        result
    });
    match tokio::time::timeout(ANSWER_WITHIN, task).await {
        Ok(Ok(Ok(done))) => Ok(Finished::Done(done)),
        Ok(Ok(Err(e))) => Err(e.to_string()),
        Ok(Err(join)) => Err(format!("the action failed: {join}")),
        Err(_) => Ok(Finished::Running),
    }
}

/// Starts `order` at `rate` in the background: writes its action, counts
/// what it plans, registers it with the console's jobs and returns its id
/// at once.
async fn paced(
    console: &Arc<Console>,
    who: &Who,
    order: Order,
    publisher: Option<Publisher>,
    rate: f64,
) -> Result<Finished, String> {
    let planned = count(console, &order).await.map_err(|e| format!("PostgreSQL: {e}"))?;
    let actor = who.actor();
    let request = paced_request(&console.queue, &order, planned, rate, &actor);
    let action_id = actions::start(&console.pool, &request, &order.action)
        .await
        .map_err(|e| format!("PostgreSQL: {e}"))?;
    let (job, stop) = console.jobs.add(action_id, planned, rate);
    let console = console.clone();
    tokio::spawn(async move {
        let request = paced_request(&console.queue, &order, planned, rate, &actor);
        let sent = |n| job.sent.store(n, std::sync::atomic::Ordering::Relaxed);
        let result = actions::carry_out(
            &console.pool,
            publisher.as_ref(),
            &request,
            &order.action,
            action_id,
            &stop,
            sent,
        )
        .await;
        job.end(match result {
            Ok(done) if done.interrupted => JobState::Stopped,
            Ok(_) => JobState::Finished,
            Err(e) => {
                tracing::warn!(error.message = %e, actor, action_id, "paced retry stopped");
                if matches!(e, actions::ActionError::Publish { .. }) {
                    console.broker.forget().await;
                }
                JobState::Failed(e.to_string())
            }
        });
    });
    Ok(Finished::Paced(action_id))
}

/// The request of a paced retry: `planned` messages at `rate`.
fn paced_request<'a>(queue: &'a str, order: &'a Order, planned: u64, rate: f64, actor: &'a str) -> Request<'a> {
    Request {
        queue,
        filter: &order.filter,
        limit: Some(planned),
        rate: Some(rate),
        actor,
    }
}
