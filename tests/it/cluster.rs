//! Node loss on a real three-node RabbitMQ cluster with quorum queues
//! (`.ci/cluster start`: wic1..wic3@localhost on 127.0.0.1:5681..5683).
//!
//! Every test runs two workers connected to different nodes (their
//! `AMQP_URL` lists start at different nodes), stops or wipes a node while
//! messages flow, and ends with exact counts: every message applied once,
//! every poison message parked with its reason, nothing lost. The test
//! environment's own connection (publisher, queue checks) is on wic3, which
//! no test stops.
//!
//! Without the cluster these tests say so and pass, unless
//! `WIC_CLUSTER_REQUIRED` is set (CI sets it), which makes a missing
//! cluster a failure. They take the cluster in turn.

use std::time::Duration;

use crate::common::messages::{flaky, invalid_measurement};
use crate::common::{RunningWorker, TestEnv, TopologyFile, wait_for};
use lapin::BasicProperties;
use tokio::sync::{Mutex, MutexGuard};
use worker_iot_core::ErrorKind;
use worker_iot_core::headers::{self, ERROR, ERROR_KIND};

const WAIT: Duration = Duration::from_secs(120);

/// Quorum queues everywhere; one in-process run, so a transient failure
/// goes through a retry queue.
fn topology() -> TopologyFile {
    TopologyFile::classic()
        .queue_type("quorum")
        .delivery_limit(5)
        .delays(&["1s"])
        .max_attempts(4)
        .in_process_attempts(1)
}

/// The cluster is shared: one test at a time.
static CLUSTER: Mutex<()> = Mutex::const_new(());

fn node_url(n: u8) -> String {
    format!("amqp://guest:guest@127.0.0.1:568{n}/%2f")
}

/// `AMQP_URL` for the nodes in this order.
fn nodes(order: [u8; 3]) -> String {
    order.map(node_url).join(",")
}

fn node_name(n: u8) -> String {
    format!("wic{n}@localhost")
}

/// `host:port` of node `n`, as the worker reports it.
fn node_address(n: u8) -> String {
    format!("127.0.0.1:568{n}")
}

/// `rabbitmqctl -n wic<n>@localhost ARGS…`: its stdout, or `None` when it
/// failed.
async fn try_ctl(n: u8, args: &[&str]) -> Option<String> {
    let output = tokio::process::Command::new("rabbitmqctl")
        .args(["-q", "-n", &node_name(n)])
        .args(args)
        .output()
        .await
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

async fn ctl(n: u8, args: &[&str]) -> String {
    match try_ctl(n, args).await {
        Some(out) => out,
        None => panic!("rabbitmqctl -n {} {} failed", node_name(n), args.join(" ")),
    }
}

async fn is_running(n: u8) -> bool {
    try_ctl(n, &["await_startup", "--timeout", "2"]).await.is_some()
}

/// Takes the cluster, with all three nodes running; `None` (after saying
/// why) when there is no cluster and none is required.
async fn take_cluster() -> Option<MutexGuard<'static, ()>> {
    let guard = CLUSTER.lock().await;
    if try_ctl(3, &["status"]).await.is_none() {
        assert!(
            std::env::var_os("WIC_CLUSTER_REQUIRED").is_none(),
            "WIC_CLUSTER_REQUIRED is set but the local cluster is not running: .ci/cluster start"
        );
        eprintln!("SKIPPED: no local RabbitMQ cluster on 127.0.0.1:5681-5683 (start one with .ci/cluster start)");
        return None;
    }
    // A test that failed half-way may have left a node stopped.
    for n in 1..=3 {
        if !is_running(n).await {
            ctl(n, &["start_app"]).await;
            ctl(n, &["await_startup"]).await;
        }
    }
    Some(guard)
}

/// The node that leads `queue`. Right after its leader's node stops, a
/// quorum queue can be missing from `list_queues` (the listing skips a
/// queue that does not answer in time), so this waits until it is listed
/// with a leader on the cluster.
async fn leader_of(queue: &str) -> u8 {
    wait_for(
        &format!("{queue} listed with a leader on the cluster"),
        WAIT,
        || async {
            let listing = ctl(3, &["list_queues", "name", "leader", "--no-table-headers"]).await;
            let leader = listing
                .lines()
                .filter_map(|line| line.split_once('\t'))
                .find(|(name, _)| *name == queue)
                .map(|(_, leader)| leader.trim().to_owned())?;
            (1..=3).find(|n| leader == node_name(*n))
        },
    )
    .await
}

/// The members of quorum queue `queue`, as rabbitmqctl lists them.
async fn members_of(queue: &str) -> String {
    let listing = ctl(3, &["list_queues", "name", "members", "--no-table-headers"]).await;
    listing
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{queue}\t")))
        .unwrap_or_else(|| panic!("{queue} is not listed: {listing}"))
        .to_owned()
}

async fn stop_node(n: u8) {
    ctl(n, &["stop_app"]).await;
}

async fn start_node(n: u8) {
    ctl(n, &["start_app"]).await;
    ctl(n, &["await_startup"]).await;
}

/// A worker whose `AMQP_URL` starts at node `order[0]`, once it consumes
/// there.
async fn worker_on(env: &TestEnv, order: [u8; 3]) -> RunningWorker {
    let worker = env.spawn_worker(&[("AMQP_URL", &nodes(order))]);
    worker.wait_ready(env).await;
    let node = node_address(order[0]);
    wait_for(&format!("a worker connected to {node}"), WAIT, || async {
        (worker.metrics.node() == node).then_some(())
    })
    .await;
    worker
}

async fn publish_all(env: &TestEnv, bodies: impl IntoIterator<Item = Vec<u8>>) {
    for body in bodies {
        env.publish(&body, BasicProperties::default()).await;
    }
}

/// Every message of the DLQ has kind `kind` and an error; returns how many.
async fn parked_with(env: &TestEnv, kind: ErrorKind) -> usize {
    let parked = env.drain(&env.dlq()).await;
    for message in &parked {
        let h = message.delivery.properties.headers().as_ref();
        assert_eq!(headers::read_string(h, ERROR_KIND).as_deref(), Some(kind.as_str()));
        assert!(headers::read_string(h, ERROR).is_some_and(|e| !e.is_empty()));
    }
    parked.len()
}

async fn stop_workers(workers: [RunningWorker; 2]) {
    for worker in workers {
        worker.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_main_queue_leader_stopped_mid_burst_loses_and_repeats_nothing() {
    let Some(_cluster) = take_cluster().await else { return };
    let env = TestEnv::undeclared_on(&node_url(3), &topology()).await;
    // The first worker declares the queues: their leaders are on wic2.
    let second = worker_on(&env, [2, 3, 1]).await;
    let first = worker_on(&env, [1, 2, 3]).await;
    let leader = leader_of(&env.queue).await;
    assert_eq!(leader, 2, "declared from wic2");

    env.publish_measurements(0..3000).await;
    wait_for("a third of the burst applied", WAIT, || async {
        (env.count("measurements").await >= 1000).then_some(())
    })
    .await;
    stop_node(leader).await;
    env.wait_for_rows("measurements", 3000, WAIT).await;
    assert_ne!(leader_of(&env.queue).await, leader, "a new leader took over");
    start_node(leader).await;

    env.publish_measurements(3000..3100).await;
    env.wait_for_rows("measurements", 3100, WAIT).await;
    env.wait_for_queue_len(&env.queue, 0, WAIT).await;
    stop_workers([first, second]).await;
    assert_eq!(env.count("events").await, 3100, "each message applied once");
    assert_eq!(env.count("measurements").await, 3100);
    assert_eq!(env.queue_len(&env.dlq()).await, 0, "nothing parked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_node_stops_moves_to_another_and_keeps_processing() {
    let Some(_cluster) = take_cluster().await else { return };
    let env = TestEnv::new_on(&node_url(3), &topology()).await;
    let first = worker_on(&env, [1, 2, 3]).await;
    let second = worker_on(&env, [2, 3, 1]).await;

    env.publish_measurements(0..2000).await;
    wait_for("some of the burst applied", WAIT, || async {
        (env.count("measurements").await >= 300).then_some(())
    })
    .await;
    stop_node(1).await;
    let moved = wait_for("the first worker on another node", Duration::from_secs(30), || async {
        let node = first.metrics.node();
        (node != node_address(1) && first.readiness.is_ready()).then_some(node)
    })
    .await;
    assert!([node_address(2), node_address(3)].contains(&moved), "moved to {moved}");
    assert_eq!(second.metrics.node(), node_address(2), "the other worker stayed");

    // Still down: the burst completes and new messages are applied.
    env.wait_for_rows("measurements", 2000, WAIT).await;
    env.publish_measurements(2000..2200).await;
    env.wait_for_rows("measurements", 2200, WAIT).await;
    assert!(!is_running(1).await, "wic1 was down throughout");
    start_node(1).await;

    env.wait_for_queue_len(&env.queue, 0, WAIT).await;
    stop_workers([first, second]).await;
    assert_eq!(env.count("events").await, 2200, "each message applied once");
    assert_eq!(env.queue_len(&env.dlq()).await, 0, "nothing parked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_parking_survive_the_loss_of_their_leaders_node() {
    let Some(_cluster) = take_cluster().await else { return };
    let env = TestEnv::undeclared_on(&node_url(3), &topology()).await;
    // Declared from wic1: the retry queue and the DLQ are led from there.
    let first = worker_on(&env, [1, 2, 3]).await;
    let second = worker_on(&env, [2, 3, 1]).await;
    let retry_queue = env.topology.retry_queue(1);
    let leader = leader_of(&retry_queue).await;
    assert_eq!(leader_of(&env.dlq()).await, leader);

    let half = |from: u32| {
        (from..from + 50).flat_map(|i| [flaky(&format!("f-{i}"), 1), invalid_measurement(&format!("p-{i}"))])
    };
    publish_all(&env, half(0)).await;
    // Some retries are waiting in the retry queue when its leader goes.
    wait_for("retries waiting", WAIT, || async {
        (env.queue_len(&retry_queue).await > 0).then_some(())
    })
    .await;
    stop_node(leader).await;
    publish_all(&env, half(50)).await;
    env.wait_for_rows("measurements", 100, WAIT).await;
    env.wait_for_queue_len(&env.dlq(), 100, WAIT).await;
    start_node(leader).await;

    env.wait_for_queue_len(&env.queue, 0, WAIT).await;
    env.wait_for_queue_len(&retry_queue, 0, WAIT).await;
    stop_workers([first, second]).await;
    assert_eq!(env.count("events").await, 100, "every retry came back and applied once");
    let runs: Vec<f64> = sqlx::query_scalar("SELECT value FROM measurements")
        .fetch_all(&env.pool)
        .await
        .expect("runs");
    // Each failed once and was applied once; a retried copy can take a
    // third run, when a batch-mate's first run rolls back its second
    // (docs/reliability.md, "Batches").
    assert_eq!(runs.len(), 100, "one row each");
    assert!(
        runs.iter().all(|run| *run >= 2.0),
        "each applied after its failed first run: {runs:?}"
    );
    assert_eq!(
        parked_with(&env, ErrorKind::Validation).await,
        100,
        "every poison message parked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_node_that_rejoins_loses_nothing_parked() {
    let Some(_cluster) = take_cluster().await else { return };
    let env = TestEnv::undeclared_on(&node_url(3), &topology()).await;
    let first = worker_on(&env, [1, 2, 3]).await;
    let second = worker_on(&env, [2, 3, 1]).await;
    let wiped = leader_of(&env.dlq()).await;
    assert_eq!(wiped, 1, "declared from wic1");

    publish_all(&env, (0..100).map(|i| invalid_measurement(&format!("p-{i}")))).await;
    env.wait_for_queue_len(&env.dlq(), 100, WAIT).await;

    // The DLQ leader's node loses its data: stopped, forgotten by the
    // cluster, reset, joined again as a new member.
    stop_node(wiped).await;
    ctl(2, &["forget_cluster_node", &node_name(wiped)]).await;
    ctl(wiped, &["reset"]).await;
    ctl(wiped, &["join_cluster", &node_name(2)]).await;
    start_node(wiped).await;
    assert!(
        !members_of(&env.dlq()).await.contains(&node_name(wiped)),
        "forgotten by the DLQ"
    );
    let grown = tokio::process::Command::new("rabbitmq-queues")
        .args(["-q", "-n", &node_name(2), "grow", &node_name(wiped), "all"])
        .args(["--queue-pattern", &format!("^{}", env.queue)])
        .output()
        .await
        .expect("rabbitmq-queues");
    assert!(grown.status.success(), "the wiped node joins the test's queues again");
    assert!(members_of(&env.dlq()).await.contains(&node_name(wiped)));

    // Parked messages keep arriving through the outage's aftermath.
    publish_all(&env, (100..120).map(|i| invalid_measurement(&format!("p-{i}")))).await;
    env.wait_for_queue_len(&env.dlq(), 120, WAIT).await;
    env.publish_measurements(0..50).await;
    env.wait_for_rows("measurements", 50, WAIT).await;
    stop_workers([first, second]).await;
    assert_eq!(
        parked_with(&env, ErrorKind::Validation).await,
        120,
        "nothing parked was lost"
    );
    assert_eq!(env.count("events").await, 50);
}
