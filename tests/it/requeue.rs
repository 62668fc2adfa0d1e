//! `requeue` against the real broker (and the worker where it matters):
//! grouping, dry run, filtered and limited drains that keep the rest in
//! order, replay after a fix, SIGKILL mid-drain, and the rate limiter.

use std::process::Output;
use std::time::{Duration, Instant};

use crate::common::messages::{body, measurement, measurement_of, message_id, with_id};
use crate::common::{TestEnv, TopologyFile, amqp_url, wait_for};
use lapin::BasicProperties;
use lapin::message::Delivery;
use serde_json::{Value, json};
use worker_iot_core::ErrorKind;
use worker_iot_core::headers::{self, FailureRecord, REQUEUE_COUNT, RETRY_COUNT};
use worker_iot_core::requeue;

const REQUEUE: &str = env!("CARGO_BIN_EXE_requeue");
const WAIT: Duration = Duration::from_secs(60);

fn requeue_command(env: &TestEnv, args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(REQUEUE);
    command
        .args(["--queue", &env.queue])
        .args(args)
        .env("AMQP_URL", amqp_url())
        .env("SETTINGS_FILE", env.dir.join("none.json"));
    std::fs::write(env.dir.join("none.json"), "{}").unwrap();
    command
}

fn run_requeue(env: &TestEnv, args: &[&str]) -> Output {
    let output = requeue_command(env, args).output().expect("run requeue");
    assert!(
        output.status.success(),
        "requeue {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn json_lines(output: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// Parks `body` in the DLQ the way the worker does, with a failure record.
async fn park(env: &TestEnv, body: &[u8], message_id: &str, kind: ErrorKind, error: &str) {
    let record = FailureRecord {
        kind,
        message_type: Some("MEASUREMENT"),
        error,
        retry_count: 2,
        now_ms: 1_790_000_000_000,
        received_ms: 1_790_000_000_000,
        exchange: "",
        routing_key: &env.queue,
        failed_by: "test/0",
    };
    let properties = headers::with_failure(&with_id(message_id), &record);
    env.publish_to(&env.dlq(), body, properties).await;
}

/// Parks `n` measurements `m-0`, `m-1`, … as transient failures.
async fn park_measurements(env: &TestEnv, n: i64) {
    for i in 0..n {
        let id = format!("m-{i}");
        park(env, &measurement(&id, i), &id, ErrorKind::Transient, "db down").await;
    }
}

/// Bodies and headers of the DLQ, in order, without consuming it.
async fn contents(env: &TestEnv, queue: &str) -> Vec<(Vec<u8>, String)> {
    requeue::peek(&env.connection, queue)
        .await
        .unwrap()
        .into_iter()
        .map(|d: Delivery| (d.data.clone(), format!("{:?}", d.properties)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_groups_300_parked_messages_from_three_failures() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    for i in 0..300 {
        let message = match i % 3 {
            0 => format!("{{broken json {i}").into_bytes(),
            1 => body(json!({"type": "TELEPORT", "id": format!("t-{i}"), "data": {}})),
            _ => measurement_of(&format!("bad id {i}"), &format!("m-{i}"), 1),
        };
        env.publish(&message, BasicProperties::default()).await;
    }
    let worker = env.spawn_worker(&[]);
    env.wait_for_queue_len(&env.dlq(), 300, WAIT).await;
    worker.stop().await;

    let lines = json_lines(&run_requeue(&env, &["--list", "--json"]));
    let (groups, summary) = lines.split_at(lines.len() - 1);
    assert_eq!(summary[0]["summary"]["messages"], 300);
    assert_eq!(groups.len(), 3, "{groups:?}");
    let mut by_kind: Vec<(String, u64)> = groups
        .iter()
        .map(|g| {
            (
                g["error_kind"].as_str().unwrap().to_owned(),
                g["count"].as_u64().unwrap(),
            )
        })
        .collect();
    by_kind.sort();
    assert_eq!(
        by_kind,
        [
            ("decode".into(), 100),
            ("unknown_type".into(), 100),
            ("validation".into(), 100)
        ]
    );
    let validation = groups.iter().find(|g| g["error_kind"] == "validation").unwrap();
    assert_eq!(validation["types"], json!(["MEASUREMENT"]));
    assert!(validation["sample_error"].as_str().unwrap().contains("device_id"));

    let table = String::from_utf8(run_requeue(&env, &["--list"]).stdout).unwrap();
    assert!(
        table.contains(&format!("{}: 300 message(s) in 3 group(s)", env.dlq())),
        "{table}"
    );
    assert_eq!(table.lines().filter(|l| l.contains("   100  ")).count(), 3, "{table}");
    assert_eq!(env.queue_len(&env.dlq()).await, 300, "--list moves nothing");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_moves_nothing() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    park_measurements(&env, 50).await;
    let before = contents(&env, &env.dlq()).await;
    let lines = json_lines(&run_requeue(&env, &["--dry-run", "--json", "--limit", "30"]));
    assert_eq!(lines.iter().filter(|l| l["action"] == "would_move").count(), 30);
    assert_eq!(lines.last().unwrap()["summary"]["moved"], 30);
    assert_eq!(env.queue_len(&env.queue).await, 0);
    assert_eq!(
        contents(&env, &env.dlq()).await,
        before,
        "same messages, same order, same headers"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fingerprint_and_limit_move_exactly_those_and_keep_the_rest_in_order() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    for i in 0..150 {
        let (kind, error) = if i % 2 == 0 {
            (ErrorKind::Transient, format!("pool timed out after {i} ms"))
        } else {
            (ErrorKind::Validation, "data.value must be a number".to_owned())
        };
        park(
            &env,
            &measurement(&format!("m-{i}"), i),
            &format!("m-{i}"),
            kind,
            &error,
        )
        .await;
    }
    let fingerprint = headers::fingerprint(ErrorKind::Transient, Some("MEASUREMENT"), "pool timed out after 7 ms");
    let before = contents(&env, &env.dlq()).await;

    let lines = json_lines(&run_requeue(
        &env,
        &["--fingerprint", &fingerprint, "--limit", "40", "--json"],
    ));
    assert_eq!(lines.last().unwrap()["summary"]["moved"], 40);

    let moved = env.drain(&env.queue).await;
    assert_eq!(moved.len(), 40);
    let moved_ids: Vec<String> = moved.iter().map(message_id).collect();
    let expected_ids: Vec<String> = (0..80).step_by(2).map(|i| format!("m-{i}")).collect();
    assert_eq!(moved_ids, expected_ids, "the first 40 of the group, in order");
    for m in &moved {
        let h = m.delivery.properties.headers().as_ref();
        assert_eq!(headers::read_i64(h, RETRY_COUNT), None, "retry count cleared");
        assert_eq!(headers::read_i64(h, REQUEUE_COUNT), Some(1));
        assert!(headers::read_i64(h, headers::REQUEUED_AT).is_some());
    }
    let after = contents(&env, &env.dlq()).await;
    let expected_rest: Vec<(Vec<u8>, String)> = before
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !(i % 2 == 0 && *i < 80))
        .map(|(_, m)| m)
        .collect();
    assert_eq!(after.len(), 110);
    assert_eq!(after, expected_rest, "the others stay, in order, byte for byte");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_fix_a_full_drain_applies_every_message_exactly_once() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    // The "bug": a constraint that rejects readings of 1000 and more.
    sqlx::query("ALTER TABLE measurements ADD CONSTRAINT buggy CHECK (value < 1000)")
        .execute(&env.pool)
        .await
        .unwrap();
    for i in 0..200 {
        env.publish(&measurement(&format!("m-{i}"), 990 + i), BasicProperties::default())
            .await;
    }
    let worker = env.spawn_worker(&[]);
    env.wait_for_rows("measurements", 10, WAIT).await;
    env.wait_for_queue_len(&env.dlq(), 190, WAIT).await;
    worker.stop().await;
    // One message that was applied is parked too (its ack was lost, say).
    park(
        &env,
        &measurement("m-3", 993),
        "m-3",
        ErrorKind::CrashLoop,
        "delivered 4 times",
    )
    .await;
    let kinds = json_lines(&run_requeue(&env, &["--list", "--json"]));
    assert_eq!(kinds[0]["error_kind"], "permanent");
    assert_eq!(kinds[0]["count"], 190);

    sqlx::query("ALTER TABLE measurements DROP CONSTRAINT buggy")
        .execute(&env.pool)
        .await
        .unwrap();
    let out = String::from_utf8(run_requeue(&env, &[]).stdout).unwrap();
    assert!(out.contains(&format!("moved 191 to {}, kept 0", env.queue)), "{out}");
    assert_eq!(env.queue_len(&env.dlq()).await, 0);

    let worker = env.spawn_worker(&[]);
    env.wait_for_rows("measurements", 200, WAIT).await;
    wait_for("the replayed duplicate to be acked", WAIT, || async {
        (worker.metrics.duplicates() == 1).then_some(())
    })
    .await;
    worker.stop().await;
    assert_eq!(env.count("measurements").await, 200);
    assert_eq!(
        env.count("measurements WHERE message_id = 'm-3'").await,
        1,
        "not applied twice"
    );
    assert_eq!(env.queue_len(&env.queue).await, 0);
    assert_eq!(env.queue_len(&env.dlq()).await, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_drain_loses_no_message() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    park_measurements(&env, 2000).await;
    let mut child = tokio::process::Command::from(requeue_command(&env, &["--rate", "1000"]))
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for("the drain to be under way", WAIT, || async {
        (env.queue_len(&env.queue).await >= 500).then_some(())
    })
    .await;
    child.start_kill().unwrap();
    let status = child.wait().await.unwrap();
    assert!(!status.success());

    let ids = |messages: Vec<(Vec<u8>, String)>| -> Vec<String> {
        messages
            .iter()
            .map(|(body, _)| {
                serde_json::from_slice::<Value>(body).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    };
    // The broker returns the killed process's unacked message to the DLQ
    // once it notices the closed connection: wait for every id to be back.
    let (in_q, in_dlq) = wait_for("every message in a queue", WAIT, || async {
        let in_q = ids(contents(&env, &env.queue).await);
        let in_dlq = ids(contents(&env, &env.dlq()).await);
        (in_q.len() + in_dlq.len() >= 2000).then_some((in_q, in_dlq))
    })
    .await;
    assert!(
        in_q.len() >= 500 && in_q.len() < 2000,
        "killed mid-drain: {} moved",
        in_q.len()
    );
    let mut all: Vec<&String> = in_q.iter().chain(in_dlq.iter()).collect();
    all.sort();
    let total = all.len();
    all.dedup();
    assert_eq!(all.len(), 2000, "every message is in the DLQ or in Q");
    assert!(
        total - 2000 <= 1,
        "at most one is in both ({} duplicates)",
        total - 2000
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_200_on_400_messages_takes_about_two_seconds() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    park_measurements(&env, 400).await;
    let started = Instant::now();
    run_requeue(&env, &["--rate", "200"]);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1600) && took <= Duration::from_secs(3),
        "took {took:?}"
    );
    assert_eq!(env.queue_len(&env.queue).await, 400);
    assert_eq!(env.queue_len(&env.dlq()).await, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_and_missing_queues_fail_with_a_clear_message() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let out = requeue_command(&env, &["--rate", "0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a rate"));
    let out = requeue_command(&env, &["--to", "no-such-queue-anywhere"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("queue 'no-such-queue-anywhere' does not exist"));
    let out = std::process::Command::new(REQUEUE)
        .args(["--list", "--queue", &env.queue])
        .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach RabbitMQ"));
    env.cleanup().await;
}

/// Parks 6 transient MEASUREMENT failures and 4 DEVICE_UP validation
/// failures.
async fn park_two_groups(env: &TestEnv) {
    park_measurements(env, 6).await;
    for i in 0..4 {
        let id = format!("u-{i}");
        let body = json!({"type": "DEVICE_UP", "id": id, "data": {"device_id": "d1", "ip": 7}}).to_string();
        park(
            env,
            body.as_bytes(),
            &id,
            ErrorKind::Validation,
            "data.ip must be a string",
        )
        .await;
    }
}

/// `(count, error_kind)` of each group of `--list --json ARGS`, after
/// checking the record kinds and the summary's total.
fn listed(env: &TestEnv, args: &[&str]) -> Vec<(u64, String)> {
    let mut all = vec!["--list", "--json"];
    all.extend_from_slice(args);
    let lines = json_lines(&run_requeue(env, &all));
    let (summary, groups) = lines.split_last().expect("a summary line");
    assert_eq!(summary["record"], "summary");
    assert!(groups.iter().all(|g| g["record"] == "group"), "{groups:?}");
    let counts: Vec<(u64, String)> = groups
        .iter()
        .map(|g| {
            (
                g["count"].as_u64().unwrap(),
                g["error_kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        summary["summary"]["messages"].as_u64().unwrap(),
        counts.iter().map(|(n, _)| n).sum::<u64>()
    );
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_honours_the_filters() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    park_two_groups(&env).await;
    let validation = vec![(4, "validation".to_owned())];
    let transient = vec![(6, "transient".to_owned())];
    assert_eq!(listed(&env, &[]), [transient.clone(), validation.clone()].concat());
    assert_eq!(listed(&env, &["--type", "DEVICE_UP"]), validation);
    assert_eq!(listed(&env, &["--error-kind", "transient"]), transient);
    assert_eq!(listed(&env, &["--grep", "must be a string"]), validation);
    assert_eq!(listed(&env, &["--type", "DEVICE_UP", "--error-kind", "transient"]), []);
    assert_eq!(env.queue_len(&env.dlq()).await, 10, "listing moves nothing");
    env.cleanup().await;
}

/// Runs requeue in a pseudo-terminal (util-linux `script`), typing
/// `input`; returns the exit status and everything the terminal showed.
async fn requeue_on_a_terminal(env: &TestEnv, args: &[&str], input: &str) -> (Option<i32>, String) {
    use tokio::io::AsyncWriteExt;
    let command = std::iter::once(REQUEUE)
        .chain(["--queue", env.queue.as_str()])
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    std::fs::write(env.dir.join("none.json"), "{}").unwrap();
    let mut child = tokio::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("AMQP_URL", amqp_url())
        .env("SETTINGS_FILE", env.dir.join("none.json"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run requeue under script");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input.as_bytes()).await.expect("type the answer");
    // Kept open until requeue ends: script stops at end of input.
    let output = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("requeue on a terminal ends")
        .expect("script output");
    drop(stdin);
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_drain_on_a_terminal_asks_first() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    park_measurements(&env, 5).await;
    let dlq = env.dlq();
    let question = format!("move all 5 messages from {dlq} to {}? [y/N]", env.queue);

    let (status, screen) = requeue_on_a_terminal(&env, &[], "n\n").await;
    assert!(screen.contains(&question), "{screen}");
    assert_eq!(status, Some(1), "{screen}");
    assert!(screen.contains("cancelled: nothing moved"), "{screen}");
    assert_eq!(env.queue_len(&dlq).await, 5, "no means nothing moves");

    // A filtered drain does not ask; its dry-run lines stay on the screen
    // above the progress bar.
    let (status, screen) = requeue_on_a_terminal(&env, &["--dry-run", "--type", "MEASUREMENT"], "").await;
    assert_eq!(status, Some(0), "{screen}");
    assert!(!screen.contains("[y/N]"), "{screen}");
    assert_eq!(screen.matches("would move m-").count(), 5, "{screen}");

    let (status, screen) = requeue_on_a_terminal(&env, &[], "y\n").await;
    assert_eq!(status, Some(0), "{screen}");
    assert_eq!(env.queue_len(&dlq).await, 0);
    assert_eq!(env.queue_len(&env.queue).await, 5);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yes_skips_the_question_and_ctrl_c_exits_130_losing_nothing() {
    const N: u32 = 100;
    let env = TestEnv::new(&TopologyFile::fast()).await;
    park_measurements(&env, i64::from(N)).await;
    let (status, screen) = requeue_on_a_terminal(&env, &["--yes", "--limit", "1"], "").await;
    assert_eq!(status, Some(0), "{screen}");
    assert!(!screen.contains("[y/N]"), "{screen}");

    let child = tokio::process::Command::from(requeue_command(&env, &["--rate", "20"]))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start requeue");
    wait_for("a few messages moved", WAIT, || async {
        (env.queue_len(&env.queue).await >= 5).then_some(())
    })
    .await;
    let pid = child.id().expect("running").to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let output = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("requeue stops on SIGINT")
        .unwrap();
    assert_eq!(output.status.code(), Some(130));
    assert!(String::from_utf8_lossy(&output.stderr).contains("interrupted"));
    let (moved, parked) = (env.queue_len(&env.queue).await, env.queue_len(&env.dlq()).await);
    assert!(moved < N, "stopped before the end");
    assert_eq!(moved + parked, N, "every message is in one queue or the other");
    env.cleanup().await;
}
