//! `requeue` as a command: replay after a fix applies every message once,
//! the rate limiter, bad flags, the question on a terminal and Ctrl-C.
//! The parking lot itself (grouping, show, dry run, filters, archive,
//! `kill -9` mid-retry) is in tests/it/parking.rs.

use std::time::{Duration, Instant};

use crate::common::messages::measurement;
use crate::common::{REQUEUE, TestEnv, TopologyFile, amqp_url, json_lines, wait_for};
use lapin::BasicProperties;
use worker_iot_core::ErrorKind;

const WAIT: Duration = Duration::from_secs(60);

/// Parks `n` measurements `m-0`, `m-1`, … as transient failures.
async fn park_measurements(env: &TestEnv, n: i64) {
    for i in 0..n {
        let id = format!("m-{i}");
        env.park(&measurement(&id, i), &id, ErrorKind::Transient, "db down")
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_fix_a_full_retry_applies_every_message_exactly_once() {
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
    env.park(
        &measurement("m-3", 993),
        "m-3",
        ErrorKind::CrashLoop,
        "delivered 4 times",
    )
    .await;
    let kinds = json_lines(&env.run_requeue(&["--list", "--json"]));
    assert_eq!(kinds[0]["error_kind"], "permanent");
    assert_eq!(kinds[0]["count"], 190);

    sqlx::query("ALTER TABLE measurements DROP CONSTRAINT buggy")
        .execute(&env.pool)
        .await
        .unwrap();
    let out = String::from_utf8(env.run_requeue(&[]).stdout).unwrap();
    assert!(
        out.contains(&format!("retried 191 message(s) to {}", env.queue)),
        "{out}"
    );
    assert_eq!(env.queue_len(&env.dlq()).await, 0);
    assert_eq!(env.count("parked_messages WHERE status = 'retried'").await, 191);

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
async fn rate_200_on_400_messages_takes_about_two_seconds() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    park_measurements(&env, 400).await;
    env.run_requeue(&["--list"]);
    let started = Instant::now();
    env.run_requeue(&["--rate", "200"]);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1600) && took <= Duration::from_secs(3),
        "took {took:?}"
    );
    assert_eq!(env.queue_len(&env.queue).await, 400);
    assert_eq!(env.count("parked_messages WHERE status = 'retried'").await, 400);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_and_missing_queues_fail_with_a_clear_message() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let out = env.requeue(&["--rate", "0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a rate"));
    let out = env.requeue(&["--to", "no-such-queue-anywhere"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("queue 'no-such-queue-anywhere' does not exist"));
    let out = env
        .requeue(&["--list"])
        .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach RabbitMQ"));
    let out = env
        .requeue(&["--list"])
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("cannot connect to PostgreSQL, database 'x' on 127.0.0.1:1")
            && said.contains("connection refused"),
        "names the database and the cause: {said}"
    );
    let out = env.requeue(&["--unarchive", "--status", "parked"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = env.requeue(&["--since", "yesterday-ish"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a time"));
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
        .env("DATABASE_URL", &env.database_url)
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
async fn a_bare_retry_on_a_terminal_asks_first() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    park_measurements(&env, 5).await;
    let question = format!("retry all 5 parked messages of {0} to {0}? [y/N]", env.queue);

    let (status, screen) = requeue_on_a_terminal(&env, &[], "n\n").await;
    assert!(screen.contains(&question), "{screen}");
    assert_eq!(status, Some(1), "{screen}");
    assert!(screen.contains("cancelled: nothing changed"), "{screen}");
    assert_eq!(
        env.count("parked_messages WHERE status = 'parked'").await,
        5,
        "no means nothing moves"
    );
    assert_eq!(env.queue_len(&env.queue).await, 0);

    // A filtered action does not ask.
    let (status, screen) = requeue_on_a_terminal(&env, &["--dry-run", "--type", "MEASUREMENT"], "").await;
    assert_eq!(status, Some(0), "{screen}");
    assert!(!screen.contains("[y/N]"), "{screen}");
    assert_eq!(screen.matches("would retry m-").count(), 5, "{screen}");

    let (status, screen) = requeue_on_a_terminal(&env, &[], "y\n").await;
    assert_eq!(status, Some(0), "{screen}");
    assert_eq!(env.queue_len(&env.queue).await, 5);
    assert_eq!(env.count("operator_actions").await, 1);
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

    let child = tokio::process::Command::from(env.requeue(&["--rate", "20"]))
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
    let moved = env.queue_len(&env.queue).await;
    let parked = env.count("parked_messages WHERE status = 'parked'").await;
    let retried = env.count("parked_messages WHERE status = 'retried'").await;
    assert!(moved < N, "stopped before the end");
    assert_eq!(i64::from(moved), retried, "every message retried was published, once");
    assert_eq!(
        retried + parked,
        i64::from(N),
        "every message is retried or still parked"
    );
    env.cleanup().await;
}

/// `requeue --edit` through `$EDITOR` (here a script): a still-bad edit
/// says the worker's error and sends nothing; a fixed one is sent once,
/// recorded with its diff, and the row keeps the original bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_opens_the_editor_checks_like_the_worker_then_retries() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let original = measurement("e1", "21.5");
    env.park(&original, "e1", ErrorKind::Validation, "data.value must be a number")
        .await;
    let editor = |name: &str, sed: &str| {
        let path = env.dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\nsed -i '{sed}' \"$1\"\n")).expect("write the editor");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("make the editor executable");
        path
    };
    let still_bad = editor("bad.sh", r#"s/"21.5"/"21,5"/"#);
    let out = env
        .requeue(&["--edit", "e1"])
        .env("EDITOR", &still_bad)
        .output()
        .expect("requeue");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("nothing sent") && stderr.contains("validation: "),
        "{stderr}"
    );
    assert_eq!(env.queue_len(&env.queue).await, 0);

    let fixed = editor("fix.sh", r#"s/"21.5"/21.5/"#);
    let out = env
        .requeue(&["--edit", "e1", "--actor", "ed"])
        .env("EDITOR", &fixed)
        .output()
        .expect("requeue");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let sent = env.drain(&env.queue).await;
    assert_eq!(sent.len(), 1);
    let body: serde_json::Value = serde_json::from_slice(&sent[0].delivery.data).expect("JSON");
    assert_eq!(body["data"]["value"], 21.5);
    let (action, actor, diff): (String, String, String) = sqlx::query_as(
        "SELECT a.action, a.actor, e.diff FROM operator_actions a JOIN message_edits e ON e.action_id = a.id",
    )
    .fetch_one(&env.pool)
    .await
    .expect("the edit");
    assert_eq!((action.as_str(), actor.as_str()), ("edit", "ed"));
    assert!(diff.contains(r#"+     "value": 21.5"#), "{diff}");
    let kept: Vec<u8> = sqlx::query_scalar("SELECT body FROM parked_messages WHERE message_id = 'e1'")
        .fetch_one(&env.pool)
        .await
        .expect("the row");
    assert_eq!(kept, original);
    env.cleanup().await;
}
