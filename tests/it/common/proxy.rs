//! A TCP proxy the tests can cut, stall or slow down: real sockets between
//! the worker and RabbitMQ or PostgreSQL, so a fault test breaks a real
//! connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: CancellationToken,
}

struct State {
    /// Cancelled (and replaced) by `cut`: ends every open connection.
    connections: Mutex<CancellationToken>,
    /// While set, new connections are accepted and closed at once.
    refusing: AtomicBool,
    /// Cancelled (and replaced) by `heal`'s counterpart `stall`: open
    /// connections stop forwarding but stay open, as in a silent partition.
    stalled: Mutex<CancellationToken>,
    /// While set, new connections are accepted and held, never forwarded.
    stalling: AtomicBool,
    /// How long each chunk from upstream is held before it reaches the
    /// client, in microseconds (0: forwarded at once).
    downstream_delay_us: AtomicU64,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(State {
            connections: Mutex::new(CancellationToken::new()),
            refusing: AtomicBool::new(false),
            stalled: Mutex::new(CancellationToken::new()),
            stalling: AtomicBool::new(false),
            downstream_delay_us: AtomicU64::new(0),
        });
        let stop = CancellationToken::new();
        let (loop_state, loop_stop) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    () = loop_stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => continue,
                    },
                };
                if loop_state.refusing.load(Ordering::SeqCst) {
                    continue; // dropping `client` closes it
                }
                let cut = loop_state.connections.lock().unwrap().clone();
                let stall = loop_state.stalled.lock().unwrap().clone();
                if loop_state.stalling.load(Ordering::SeqCst) {
                    // Held open, silent, until cut.
                    tokio::spawn(async move {
                        cut.cancelled().await;
                        drop(client);
                    });
                    continue;
                }
                let state = loop_state.clone();
                tokio::spawn(async move {
                    let mut client = client;
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    // Borrowed halves: a stall drops the forwarding but
                    // keeps both sockets open until the cut.
                    let (client_read, client_write) = client.split();
                    let (server_read, server_write) = server.split();
                    let forward = async {
                        tokio::join!(
                            upstream_copy(client_read, server_write),
                            downstream_copy(server_read, client_write, &state),
                        )
                    };
                    tokio::select! {
                        () = cut.cancelled() => {}
                        () = stall.cancelled() => cut.cancelled().await,
                        _ = forward => {}
                    }
                });
            }
        });
        Proxy { addr, state, stop }
    }

    /// Drops every open connection (new ones are still accepted unless
    /// refusing).
    pub fn cut(&self) {
        let mut connections = self.state.connections.lock().unwrap();
        connections.cancel();
        *connections = CancellationToken::new();
    }

    /// A silent partition: open connections stop forwarding without being
    /// closed, and new ones are accepted and never answered.
    pub fn stall(&self) {
        self.state.stalling.store(true, Ordering::SeqCst);
        let mut stalled = self.state.stalled.lock().unwrap();
        stalled.cancel();
        *stalled = CancellationToken::new();
    }

    /// Ends a partition: the stalled connections are closed (as the peers'
    /// TCP stacks would eventually do) and new ones are forwarded again.
    pub fn heal(&self) {
        self.state.stalling.store(false, Ordering::SeqCst);
        self.cut();
    }

    /// Holds every chunk the upstream server sends, on open and new
    /// connections, for `delay` before the client gets it (in order, and
    /// without slowing the reading): a server that answers late, e.g. a
    /// broker whose confirms arrive after the client's timeout.
    /// `Duration::ZERO` stops delaying (chunks already held keep their
    /// time, and later ones queue behind them).
    pub fn delay_downstream(&self, delay: Duration) {
        let micros = u64::try_from(delay.as_micros()).expect("a delay of less than 500,000 years");
        self.state.downstream_delay_us.store(micros, Ordering::SeqCst);
    }

    /// Refuses (or accepts again) new connections.
    pub fn set_refusing(&self, refusing: bool) {
        self.state.refusing.store(refusing, Ordering::SeqCst);
    }

    /// `url` with its `host:port` replaced by the proxy's.
    pub fn url_for(&self, url: &str) -> String {
        let scheme_end = url.find("://").expect("URL has a scheme") + 3;
        let rest = &url[scheme_end..];
        let authority_end = rest.find('/').unwrap_or(rest.len());
        let host_start = rest[..authority_end].rfind('@').map_or(0, |at| at + 1);
        format!(
            "{}{}{}{}",
            &url[..scheme_end],
            &rest[..host_start],
            self.addr,
            &rest[authority_end..]
        )
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut();
    }
}

/// Client to server, as it comes; the server sees the end of the client's
/// stream when the client closes.
async fn upstream_copy(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin) {
    tokio::io::copy(&mut from, &mut to).await.ok();
    to.shutdown().await.ok();
}

/// Server to client, each chunk released at the time it was read plus the
/// downstream delay then in force. Reading never waits for the delay: a
/// second task writes the chunks out in the order they were read.
async fn downstream_copy(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin, state: &State) {
    let (chunks, mut due) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let read = async move {
        let mut buffer = vec![0; 64 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buffer).await {
            let delay = Duration::from_micros(state.downstream_delay_us.load(Ordering::SeqCst));
            if chunks.send((Instant::now() + delay, buffer[..n].to_vec())).is_err() {
                return;
            }
        }
        // Dropping `chunks` ends the writer once it wrote what is held.
    };
    let write = async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        to.shutdown().await.ok();
    };
    tokio::join!(read, write);
}

/// The `host:port` of a URL, resolved.
pub fn upstream_of(url: &str) -> SocketAddr {
    use std::net::ToSocketAddrs;
    let rest = &url[url.find("://").expect("URL has a scheme") + 3..];
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let host_port = authority.rsplit('@').next().unwrap();
    let with_port = if host_port.contains(':') {
        host_port.to_owned()
    } else if url.starts_with("amqp") {
        format!("{host_port}:5672")
    } else {
        format!("{host_port}:5432")
    };
    with_port
        .to_socket_addrs()
        .expect("resolve")
        .next()
        .expect("an address")
}
