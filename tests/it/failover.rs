//! A list of brokers in `AMQP_URL` (docs/operations.md, "Running on a cluster"): the worker starts on the
//! first that answers, and when its broker goes it moves to another within
//! seconds; `publish` and `requeue` take the same list. One local broker
//! stands in for a cluster's nodes, reached directly and through a proxy
//! the test can cut.

use std::time::{Duration, Instant};

use crate::common::proxy::{Proxy, upstream_of};
use crate::common::{TestEnv, TopologyFile, amqp_url, wait_for};

const PUBLISH: &str = env!("CARGO_BIN_EXE_publish");
const REQUEUE: &str = env!("CARGO_BIN_EXE_requeue");
const WAIT: Duration = Duration::from_secs(60);
/// Nothing listens on port 1: connections are refused at once.
const DEAD: &str = "amqp://guest:guest@127.0.0.1:1/%2f";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_moves_to_another_broker_when_its_broker_goes() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let proxy = Proxy::start(upstream_of(&amqp_url())).await;
    let urls = format!("{DEAD}, {}, {}", proxy.url_for(&amqp_url()), amqp_url());
    let worker = env.spawn_worker_with(env.settings(&[("AMQP_URL", &urls)]), None);
    worker.wait_ready(&env).await;
    assert_eq!(
        worker.metrics.node(),
        proxy.addr.to_string(),
        "the first broker that answers"
    );
    env.publish_measurements(0..100).await;
    env.wait_for_rows("measurements", 100, WAIT).await;

    proxy.set_refusing(true);
    proxy.cut();
    let gone = Instant::now();
    wait_for("the worker on another broker", WAIT, || async {
        (worker.metrics.connections() >= 2 && worker.readiness.is_ready()).then_some(())
    })
    .await;
    let moved_after = gone.elapsed();
    let node = worker.metrics.node();
    assert_eq!(node, upstream_of(&amqp_url()).to_string());
    assert!(
        worker
            .metrics
            .render()
            .contains(&format!("iot_broker_node_info{{node=\"{node}\"}} 1"))
    );
    env.publish_measurements(100..200).await;
    env.wait_for_rows("measurements", 200, WAIT).await;
    worker.stop().await;
    assert!(moved_after < Duration::from_secs(10), "moved after {moved_after:?}");
    assert_eq!(env.count("events").await, 200, "each applied once");
    assert_eq!(env.queue_len(&env.queue).await, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_requeue_take_the_same_list() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let urls = format!("{DEAD},{}", amqp_url());
    std::fs::write(env.dir.join("none.json"), "{}").unwrap();
    let run = |bin: &str, args: &[&str]| {
        let out = std::process::Command::new(bin)
            .args(args)
            .env("AMQP_URL", &urls)
            .env("DATABASE_URL", &env.database_url)
            .env("SETTINGS_FILE", env.dir.join("none.json"))
            .output()
            .expect("run binary");
        assert!(out.status.success(), "{bin}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(PUBLISH, &["raw", "not json", "--queue", &env.dlq()]);
    assert_eq!(env.queue_len(&env.dlq()).await, 1);
    run(REQUEUE, &["--queue", &env.queue, "--yes"]);
    assert_eq!(env.queue_len(&env.dlq()).await, 0);
    assert_eq!(env.queue_len(&env.queue).await, 1);
    env.cleanup().await;
}
