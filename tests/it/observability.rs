//! `/metrics`, `/readyz` and `/healthz` over real HTTP, against the real
//! broker and database: exact counts after a known mix of messages,
//! readiness that follows the broker and the database (cut through test
//! proxies), and a metrics port that survives 2,000 idle connections.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::common::messages::{flaky, measurement};
use crate::common::proxy::{Proxy, upstream_of};
use crate::common::{RunningWorker, TestEnv, TopologyFile, amqp_url, wait_for};
use lapin::BasicProperties;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use worker_iot_core::ErrorKind;
use worker_iot_core::config::Settings;

const WAIT: Duration = Duration::from_secs(60);
/// How long one HTTP request may take in these tests.
const HTTP_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs the worker with its HTTP server on a free port; returns it and the
/// server's address.
async fn spawn_serving(settings: Settings) -> (RunningWorker, SocketAddr) {
    let worker = RunningWorker::start(settings, None, true);
    let addr = wait_for("the HTTP server to listen", WAIT, || async {
        assert!(!worker.handle.is_finished(), "worker stopped during start-up");
        worker.metrics.http_addr()
    })
    .await;
    (worker, addr)
}

/// `GET path` over HTTP/1.0: the status and the body, or the error.
async fn try_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let ask = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        let response = String::from_utf8_lossy(&response).into_owned();
        let (head, body) = response
            .split_once("\r\n\r\n")
            .ok_or_else(|| std::io::Error::other(format!("no HTTP answer: {response:?}")))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("no status in {head:?}")))?;
        Ok((status, body.to_owned()))
    };
    tokio::time::timeout(HTTP_TIMEOUT, ask)
        .await
        .map_err(|_| std::io::Error::other(format!("no answer to GET {path} within {HTTP_TIMEOUT:?}")))?
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_get(addr, path).await.unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// The samples of metric `name` in a Prometheus text exposition, keyed by
/// their labels (sorted, `k=v` joined by `,`).
fn samples(text: &str, name: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, labels) = series.split_once('{').unwrap_or((series, "}"));
        if metric != name {
            continue;
        }
        let mut labels: Vec<String> = labels
            .trim_end_matches('}')
            .split(',')
            .filter(|l| !l.is_empty())
            .map(|l| l.replace('"', ""))
            .collect();
        labels.sort();
        out.insert(labels.join(","), value.parse().expect("a number"));
    }
    out
}

fn expected(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_counts_each_outcome_exactly() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let props = BasicProperties::default;
    for i in 1..=3 {
        env.publish(&measurement(&format!("ok-{i}"), 20.5), props()).await;
    }
    env.publish(&measurement("ok-1", 20.5), props()).await; // duplicate
    for i in 1..=2 {
        env.publish(&measurement(&format!("bad-{i}"), "warm"), props()).await;
    }
    env.publish(b"not json at all", props()).await;
    let unknown = json!({"type": "NO_SUCH_TYPE", "id": "u-1", "data": {}}).to_string();
    env.publish(unknown.as_bytes(), props()).await;
    let (worker, addr) = spawn_serving(env.settings(&[])).await;
    let m = worker.metrics.clone();
    wait_for("the first eight settled", WAIT, || async {
        let parked: u64 = ErrorKind::ALL.into_iter().map(|k| m.parked(k)).sum();
        (m.processed() == 3 && m.duplicates() == 1 && parked == 4).then_some(())
    })
    .await;
    // Fails its three in-process runs (two in-process retries), goes to the
    // 50ms retry queue, then succeeds. Sent alone: in a batch its transient
    // failure would roll its batch-mates back too, and their runs alone
    // would count as in-process retries of theirs. The id is unique to
    // this test: the handler counts runs per id in this process.
    let flaky_id = format!("flaky-{}", env.queue);
    env.publish(&flaky(&flaky_id, 3), props()).await;
    wait_for("every delivery settled", WAIT, || async {
        let parked: u64 = ErrorKind::ALL.into_iter().map(|k| m.parked(k)).sum();
        (m.processed() == 4 && m.duplicates() == 1 && parked == 4 && m.retried() == 1).then_some(())
    })
    .await;
    let (status, text) = get(addr, "/metrics").await;
    assert_eq!(status, 200);

    let validation = ErrorKind::Validation.as_str();
    let decode = ErrorKind::Decode.as_str();
    let unknown_type = ErrorKind::UnknownType.as_str();
    assert_eq!(
        samples(&text, "iot_deliveries_total"),
        expected(&[
            ("outcome=processed,type=MEASUREMENT", 3.0),
            ("outcome=duplicate,type=MEASUREMENT", 1.0),
            (&format!("kind={validation},outcome=parked,type=MEASUREMENT"), 2.0),
            (&format!("kind={decode},outcome=parked,type=unknown"), 1.0),
            (&format!("kind={unknown_type},outcome=parked,type=unknown"), 1.0),
            ("outcome=retried,type=TEST_FLAKY", 1.0),
            ("outcome=processed,type=TEST_FLAKY", 1.0),
        ]),
        "{text}"
    );
    assert_eq!(
        samples(&text, "iot_in_process_retries_total"),
        expected(&[("type=TEST_FLAKY", 2.0)]),
        "{text}"
    );
    assert_eq!(
        samples(&text, "iot_delayed_retries_total"),
        expected(&[("delay=50ms", 1.0)]),
        "{text}"
    );
    assert_eq!(
        samples(&text, "iot_delivery_handling_seconds_count"),
        expected(&[
            ("outcome=processed,type=MEASUREMENT", 3.0),
            ("outcome=duplicate,type=MEASUREMENT", 1.0),
            ("outcome=parked,type=MEASUREMENT", 2.0),
            ("outcome=parked,type=unknown", 2.0),
            ("outcome=retried,type=TEST_FLAKY", 1.0),
            ("outcome=processed,type=TEST_FLAKY", 1.0),
        ]),
        "{text}"
    );
    assert_eq!(samples(&text, "iot_deliveries_in_flight"), expected(&[("", 0.0)]));
    assert_eq!(samples(&text, "iot_broker_connections_total"), expected(&[("", 1.0)]));
    assert_eq!(samples(&text, "iot_broker_reconnects_total"), expected(&[("", 0.0)]));
    assert_eq!(samples(&text, "iot_ready"), expected(&[("", 1.0)]));
    let version = format!("version={}", env!("CARGO_PKG_VERSION"));
    assert_eq!(samples(&text, "iot_build_info"), expected(&[(&version, 1.0)]));
    assert_eq!(samples(&text, "iot_db_pool_max_connections"), expected(&[("", 8.0)]));
    assert!(
        text.contains("# TYPE iot_delivery_handling_seconds histogram"),
        "{text}"
    );
    assert_eq!(env.queue_len(&env.dlq()).await, 4, "the four parked messages");
    assert_eq!(env.count("measurements").await, 4);

    worker.stop().await;
    env.cleanup().await;
}

/// Waits until `/readyz` answers `status` with a body containing `reason`.
async fn wait_readyz(addr: SocketAddr, status: u16, reason: &str) {
    wait_for(&format!("/readyz to answer {status} ({reason})"), WAIT, || async {
        let (got, body) = try_get(addr, "/readyz").await.ok()?;
        (got == status && body.contains(reason)).then_some(())
    })
    .await;
}

/// Runs `worker-iot-core --healthcheck` against `addr`: its exit code and
/// standard error.
async fn healthcheck(env: &TestEnv, addr: SocketAddr) -> (Option<i32>, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_worker-iot-core"))
        .arg("--healthcheck")
        .envs(env.env_vars(&[("METRICS_ADDR", &addr.to_string())]))
        .output()
        .await
        .expect("run worker-iot-core --healthcheck");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_broker_and_the_database() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let broker = Proxy::start(upstream_of(&amqp_url())).await;
    let database = Proxy::start(upstream_of(&env.database_url)).await;
    let settings = env.settings(&[
        ("AMQP_URL", &broker.url_for(&amqp_url())),
        ("DATABASE_URL", &database.url_for(&env.database_url)),
    ]);
    let (worker, addr) = spawn_serving(settings).await;
    wait_readyz(addr, 200, "ready").await;
    assert_eq!(get(addr, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(healthcheck(&env, addr).await, (Some(0), String::new()));

    broker.set_refusing(true);
    broker.cut();
    wait_readyz(addr, 503, "not connected to RabbitMQ").await;
    assert_eq!(get(addr, "/healthz").await.0, 200, "alive while not ready");
    let (code, stderr) = healthcheck(&env, addr).await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("503 not ready: not connected to RabbitMQ"), "{stderr}");
    let (_, text) = get(addr, "/metrics").await;
    assert_eq!(samples(&text, "iot_ready"), expected(&[("", 0.0)]), "{text}");
    broker.set_refusing(false);
    wait_readyz(addr, 200, "ready").await;
    assert_eq!(worker.metrics.connections(), 2, "one reconnection");

    database.set_refusing(true);
    database.cut();
    wait_readyz(addr, 503, "database unreachable").await;
    let (status, body) = get(addr, "/readyz").await;
    assert_eq!(status, 503);
    assert!(!body.contains("RabbitMQ"), "the broker is fine: {body}");
    let (_, text) = get(addr, "/metrics").await;
    assert_eq!(samples(&text, "iot_database_up"), expected(&[("", 0.0)]), "{text}");
    database.set_refusing(false);
    wait_readyz(addr, 200, "ready").await;

    // Working again: a message goes through both proxies.
    env.publish(&measurement("after-cuts", 1.0), BasicProperties::default())
        .await;
    env.wait_for_rows("measurements", 1, WAIT).await;
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections_do_not_stop_the_worker_or_its_endpoints() {
    const IDLE: usize = 2000;
    // The test process holds both ends of every connection (4,000 fds),
    // and the server allows a quarter of the limit: ask for 16,384 (the
    // soft limit is raised up to the hard one, never lowered).
    let limit = rlimit::increase_nofile_limit(16_384).expect("raise RLIMIT_NOFILE");
    assert!(
        limit >= 4 * IDLE as u64 + 512,
        "RLIMIT_NOFILE {limit} is too low for this test"
    );

    let env = TestEnv::new(&TopologyFile::fast()).await;
    let (worker, addr) = spawn_serving(env.settings(&[])).await;
    worker.wait_ready(&env).await;

    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        idle.push(TcpStream::connect(addr).await.expect("connect an idle client"));
    }
    // Each answered on the first try, while the 2,000 are open.
    assert_eq!(get(addr, "/healthz").await.0, 200);
    assert_eq!(get(addr, "/readyz").await, (200, "ready\n".into()));
    let (status, text) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(samples(&text, "iot_ready"), expected(&[("", 1.0)]));
    // And the worker still works.
    env.publish(&measurement("during-flood", 2.0), BasicProperties::default())
        .await;
    env.wait_for_rows("measurements", 1, WAIT).await;
    assert!(!worker.handle.is_finished());

    // The server closes clients that send nothing (header read timeout).
    let closed = futures_util::future::join_all(idle.iter_mut().map(|stream| async move {
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut buf))
            .await
            .is_ok()
    }))
    .await;
    assert_eq!(
        closed.iter().filter(|c| **c).count(),
        IDLE,
        "every idle client closed by the server"
    );
    assert_eq!(get(addr, "/readyz").await.0, 200);

    worker.stop().await;
    env.cleanup().await;
}
