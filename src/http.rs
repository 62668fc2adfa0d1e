//! `/metrics`, `/healthz` and `/readyz` on `METRICS_ADDR`: an `axum`
//! router served over HTTP/1 by `hyper`, with the limits a port open to a
//! network needs:
//!
//! * a client must send its request head within [`HEADER_READ_TIMEOUT`]
//!   (idle keep-alive connections included), a handler must answer within
//!   [`REQUEST_TIMEOUT`], and no connection lives past
//!   [`MAX_CONNECTION_AGE`];
//! * at most [`connection_limit`] connections are open at once; past that
//!   the server stops accepting (the kernel's backlog holds the rest) until
//!   one closes, so HTTP clients can never take the file descriptors the
//!   broker and database connections need;
//! * an accept error such as `EMFILE` pauses accepting for a second rather
//!   than spinning;
//! * on shutdown it stops accepting, lets requests in progress finish and
//!   closes idle connections, within [`SHUTDOWN_GRACE`].
//!
//! [`probe_ready`] is the client side, for `worker-iot-core --healthcheck`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::timeout::TimeoutLayer;

use crate::metrics::Metrics;
use crate::readiness::Readiness;

/// How long a client may take to send a request head, and how long an
/// idle keep-alive connection stays open.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a handler may take (answered with 408 past it).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection is closed (gracefully) after this long, however busy.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);
/// How long connections get to finish at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// How long accepting pauses after an accept error other than a
/// connection reset.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);
/// The largest request head read (bytes).
const MAX_BUFFER: usize = 16 * 1024;
/// The Prometheus text format's content type.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the handlers read.
#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
}

/// The server, running.
pub struct Server {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    /// Ends after shutdown, once the connections closed or the grace ended.
    pub task: JoinHandle<()>,
}

/// At most a quarter of the process's file-descriptor limit, between 16
/// and 4096: the rest stays for the broker, the database and the logs.
pub fn connection_limit() -> usize {
    let soft = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
    usize::try_from(soft / 4).unwrap_or(usize::MAX).clamp(16, 4096)
}

/// Binds `addr` and serves until `shutdown`.
///
/// # Errors
/// The bind error.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) -> std::io::Result<Server> {
    let listener = TcpListener::bind(addr).await?;
    serve_router(listener, router(AppState { metrics, readiness }), shutdown)
}

/// Serves `router` on `listener` with this module's limits (timeouts,
/// connection cap, graceful shutdown) until `shutdown`: the console's
/// server too.
///
/// # Errors
/// The listener's address cannot be read.
pub fn serve_router(listener: TcpListener, router: Router, shutdown: CancellationToken) -> std::io::Result<Server> {
    let addr = listener.local_addr()?;
    let limit = connection_limit();
    tracing::debug!(%addr, connection_limit = limit, "HTTP server listening");
    let task = tokio::spawn(accept_loop(listener, router, limit, shutdown));
    Ok(Server { addr, task })
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .fallback(|| async { (StatusCode::NOT_FOUND, "try /metrics, /healthz or /readyz\n") })
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .with_state(state)
}

/// The pool gauges are as of the database check's last tick (a second).
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], state.metrics.render())
}

/// 200 while connected, consuming and the database reachable; 503 with
/// the reasons otherwise.
async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    match state.readiness.check() {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(reasons) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reasons}\n")),
    }
}

async fn accept_loop(listener: TcpListener, router: Router, limit: usize, shutdown: CancellationToken) {
    let permits = Arc::new(Semaphore::new(limit));
    let connections = TaskTracker::new();
    loop {
        // A permit first: at the limit, connections wait in the backlog.
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            // The semaphore is never closed.
            permit = permits.clone().acquire_owned() => permit.expect("semaphore open"),
        };
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let service = TowerToHyperService::new(router.clone());
                connections.spawn(serve_connection(stream, service, permit, shutdown.clone()));
            }
            Err(e) if is_connection_error(&e) => {}
            Err(e) => {
                // EMFILE and the like: retrying at once would spin.
                tracing::warn!(error.message = %e, pause = ?ACCEPT_ERROR_PAUSE, "HTTP server cannot accept a connection");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                }
            }
        }
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, connections.wait()).await.is_err() {
        tracing::debug!(open = connections.len(), "HTTP connections dropped at shutdown");
    }
}

/// Errors of one connection, not of the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// Serves one connection until it closes, it is too old, or shutdown;
/// then closes it gracefully within [`SHUTDOWN_GRACE`]. The permit is
/// released when the connection is gone.
async fn serve_connection(
    stream: TcpStream,
    service: TowerToHyperService<Router>,
    _permit: OwnedSemaphorePermit,
    shutdown: CancellationToken,
) {
    stream.set_nodelay(true).ok();
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUFFER)
        .serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        () = shutdown.cancelled() => {}
        () = tokio::time::sleep(MAX_CONNECTION_AGE) => {}
    }
    connection.as_mut().graceful_shutdown();
    tokio::time::timeout(SHUTDOWN_GRACE, connection).await.ok();
}

/// Asks `/readyz` on `addr` (an unspecified address means this host), for
/// `worker-iot-core --healthcheck`: `Ok(Ok(()))` for a 200 answer,
/// `Ok(Err(body))` for any other.
///
/// # Errors
/// The connection error, or a timeout after 3 s.
pub async fn probe_ready(addr: SocketAddr) -> std::io::Result<Result<(), String>> {
    let mut target = addr;
    if target.ip().is_unspecified() {
        target.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let ask = async {
        let mut stream = TcpStream::connect(target).await?;
        // HTTP/1.0: the server closes the connection after its answer.
        stream
            .write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut response = Vec::new();
        stream.take(64 * 1024).read_to_end(&mut response).await?;
        let response = String::from_utf8_lossy(&response);
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let status = head.split_whitespace().nth(1).unwrap_or("");
        Ok::<_, std::io::Error>(if status == "200" {
            Ok(())
        } else {
            Err(format!("{status} {}", body.trim()))
        })
    };
    tokio::time::timeout(Duration::from_secs(3), ask)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 3 s"))?
}
