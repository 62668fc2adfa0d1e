//! Seeing what a test needs to assert on: queue counts that include the
//! unacknowledged messages (a passive declare counts only the ready ones),
//! metric values, bursts of publishes, and waits that say what they saw
//! last when they time out.

use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use worker_iot_core::Metrics;

use super::TestEnv;

/// A queue's messages as the broker counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounts {
    pub ready: u64,
    pub unacked: u64,
}

impl QueueCounts {
    /// Every message the queue holds, delivered or not.
    pub fn total(self) -> u64 {
        self.ready + self.unacked
    }
}

/// `queue`'s ready and unacknowledged messages on the default vhost, from
/// `rabbitmqctl list_queues` (it asks the queue itself, so the figures are
/// current); `None` when the queue does not exist.
pub async fn queue_counts(queue: &str) -> Option<QueueCounts> {
    let output = tokio::process::Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "--no-table-headers", "name"])
        .args(["messages_ready", "messages_unacknowledged"])
        .output()
        .await
        .expect("run rabbitmqctl list_queues");
    assert!(
        output.status.success(),
        "rabbitmqctl list_queues: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout.lines().find_map(|line| {
        let mut fields = line.split('\t');
        if fields.next() != Some(queue) {
            return None;
        }
        let mut number = || fields.next().and_then(|f| f.trim().parse().ok());
        Some(QueueCounts {
            ready: number()?,
            unacked: number()?,
        })
    })
}

/// Whether `test` can use `rabbitmqctl`, the broker's own CLI, which runs
/// only where the broker is installed (the compose `test` container has
/// none). Without it, the test says why it skips and should return at
/// once, unless `WIC_RABBITMQCTL_REQUIRED` is set (CI sets it): then a
/// missing `rabbitmqctl` fails the test.
pub fn rabbitmqctl_available(test: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|dir| dir.join("rabbitmqctl").is_file()) {
        return true;
    }
    assert!(
        std::env::var_os("WIC_RABBITMQCTL_REQUIRED").is_none(),
        "{test}: rabbitmqctl is not on PATH, and WIC_RABBITMQCTL_REQUIRED is set"
    );
    // One write, newline and all, so that the line stays whole beside the
    // output of the tests running at the same time: CI counts these lines.
    let line = format!(
        "skipped: {test}: rabbitmqctl is not on PATH (it comes with the broker; \
         the compose test image has none)\n"
    );
    eprint!("{line}");
    false
}

/// Runs `rabbitmqctl` with `args` and returns its output; panics if it fails.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let output = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("run rabbitmqctl");
    let text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?} failed: {text} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    text
}

/// The value of the unlabelled series `name` in `metrics`' Prometheus
/// text, if it has one.
pub fn metric_value(metrics: &Metrics, name: &str) -> Option<f64> {
    metrics
        .render()
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Waits until `check` says done, polling; returns what it saw then. After
/// `timeout`, panics naming `what` and the last thing `check` saw.
pub async fn wait_for_seen<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    T: Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = (bool, T)>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let (done, seen) = check().await;
        if done {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; last seen: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl TestEnv {
    /// Publishes every message to `Q` in one burst: all are sent before any
    /// confirm is awaited, so the worker receives them together. On a
    /// confirm-mode channel of its own (plain lapin, whatever the worker's
    /// publisher offers).
    pub async fn publish_burst(&self, messages: Vec<(Vec<u8>, BasicProperties)>) {
        let channel = self.connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        let mut confirms = Vec::with_capacity(messages.len());
        for (body, properties) in messages {
            let sent = channel
                .basic_publish(
                    "".into(),
                    self.queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    properties,
                )
                .await;
            confirms.push(sent.expect("send to the test's queue"));
        }
        for confirmed in join_all(confirms).await {
            let confirmation = confirmed.expect("a confirm for the test's publish");
            assert!(
                confirmation.is_ack(),
                "the broker nacked a test publish: {confirmation:?}"
            );
        }
        channel.close(200, "".into()).await.ok();
    }
}
