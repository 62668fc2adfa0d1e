//! A TCP proxy the tests can cut: real sockets between the worker and
//! RabbitMQ or PostgreSQL, so a fault test breaks a real connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
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
        });
        let stop = CancellationToken::new();
        let (loop_state, loop_stop) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (mut client, _) = tokio::select! {
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
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        () = cut.cancelled() => {}
                        () = stall.cancelled() => cut.cancelled().await,
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
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
