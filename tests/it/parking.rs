//! The parking lot against the real broker and database: the keeper moves
//! every kind of parked message from Q.dlq into `parked_messages` once,
//! waits while the database is cut, and `requeue` lists, shows, retries,
//! archives and survives `kill -9` without losing a message.

use std::collections::BTreeMap;
use std::process::Output;
use std::time::Duration;

use crate::common::messages::{device_up, measurement, measurement_of, unknown_type};
use crate::common::proxy::{Proxy, upstream_of};
use crate::common::{TestEnv, TopologyFile, json_lines, wait_for};
use lapin::BasicProperties;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString};
use serde_json::{Value, json};
use worker_iot_core::ErrorKind;
use worker_iot_core::headers::{REQUEUE_COUNT, REQUEUED_AT};

const WAIT: Duration = Duration::from_secs(60);
const KEEPER_ON: (&str, &str) = ("PARKING_KEEPER", "on");

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Parks a measurement `id` in Q.dlq the way the worker does.
async fn park(env: &TestEnv, id: &str, kind: ErrorKind, error: &str) {
    env.park(&measurement(id, 1), id, kind, error).await;
}

/// `count(*)` of the lot rows matching `condition`.
async fn rows(env: &TestEnv, condition: &str) -> i64 {
    env.count(&format!("parked_messages WHERE {condition}")).await
}

/// Every message id in `queue`, with how many times it is there (drained).
async fn ids_in(env: &TestEnv, queue: &str) -> BTreeMap<String, usize> {
    let mut ids = BTreeMap::new();
    for m in env.drain(queue).await {
        let id = m.delivery.properties.message_id().as_ref().unwrap().to_string();
        *ids.entry(id).or_insert(0) += 1;
    }
    ids
}

/// A queue whose messages expire at once into Q.dlq: the broker
/// dead-letters them itself, with `x-death` and no `iot-*` headers.
async fn expire_into_the_dlq(env: &TestEnv, body: &[u8]) -> String {
    let name = format!("{}.expiring", env.queue);
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongInt(1));
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(env.dlq().as_str().into()),
    );
    let channel = env.connection.create_channel().await.unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(name.as_str().into(), durable, args)
        .await
        .unwrap();
    env.publish_to(
        &name,
        body,
        BasicProperties::default().with_message_id("expired-1".into()),
    )
    .await;
    name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mix_of_parked_kinds_lands_in_the_lot_once_each() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("decode", b"{broken json".to_vec()),
        ("unknown_type", unknown_type("t-1")),
        ("validation", measurement_of("bad id", "v-1", 1)),
        ("decode", b"\xff\xfe not utf-8 \x00".to_vec()),
    ];
    for (_, body) in &bodies {
        env.publish(body, BasicProperties::default()).await;
    }
    let expiring = expire_into_the_dlq(&env, b"{\"type\":\"DEVICE_UP\"}").await;
    // One worker copy parked twice (a crash between confirm and ack): one row.
    park(&env, "twice", ErrorKind::Permanent, "constraint").await;
    park(&env, "twice", ErrorKind::Permanent, "constraint").await;

    let worker = env.spawn_worker(&[KEEPER_ON]);
    env.wait_for_rows("parked_messages", 6, WAIT).await;
    env.wait_for_queue_len(&env.dlq(), 0, WAIT).await;
    worker.stop().await;

    for (kind, body) in &bodies {
        let stored: (String, String, Value) =
            sqlx::query_as("SELECT error_kind, fingerprint, headers FROM parked_messages WHERE body = $1")
                .bind(body)
                .fetch_one(&env.pool)
                .await
                .expect("the body, byte for byte");
        assert_eq!(stored.0, *kind);
        assert_eq!(stored.1.len(), 16, "a fingerprint");
        assert_eq!(stored.2["iot-error-kind"], *kind, "readable headers");
    }
    let (kind, error, headers): (String, String, Value) =
        sqlx::query_as("SELECT error_kind, error, headers FROM parked_messages WHERE message_id = 'expired-1'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(kind, "expired", "derived from x-first-death-reason");
    assert!(error.contains("dead-lettered by the broker"), "{error}");
    assert_eq!(headers["x-death"][0]["reason"], "expired");
    assert_eq!(rows(&env, "message_id = 'twice' AND times_parked = 1").await, 1);
    assert_eq!(rows(&env, "status = 'parked'").await, 6);
    let channel = env.connection.create_channel().await.unwrap();
    channel
        .queue_delete(expiring.as_str().into(), QueueDeleteOptions::default())
        .await
        .ok();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_keep_one_lot_without_colliding() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let (a, b) = (env.spawn_worker(&[KEEPER_ON]), env.spawn_worker(&[KEEPER_ON]));
    for i in 0..300 {
        // Every message parked twice: the copies go to either keeper.
        for _ in 0..2 {
            park(&env, &format!("m-{i}"), ErrorKind::Validation, "bad").await;
        }
    }
    env.wait_for_queue_len(&env.dlq(), 0, WAIT).await;
    env.wait_for_rows("parked_messages", 300, WAIT).await;
    a.stop().await;
    b.stop().await;
    assert_eq!(rows(&env, "times_parked = 1").await, 300, "one row each, parked once");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_database_is_cut_parked_copies_wait_in_the_dlq_then_move_in_once() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let proxy = Proxy::start(upstream_of(&env.database_url)).await;
    let proxied = proxy.url_for(&env.database_url);
    let worker = env.spawn_worker(&[KEEPER_ON, ("DATABASE_URL", &proxied)]);
    worker.wait_ready(&env).await;
    proxy.set_refusing(true);
    proxy.cut();
    for i in 0..10 {
        park(&env, &format!("early-{i}"), ErrorKind::Validation, "bad").await;
    }
    wait_for("the keeper to stop taking", WAIT, || async {
        worker.metrics.render().contains("iot_parking_paused 1\n").then_some(())
    })
    .await;
    for i in 0..40 {
        park(&env, &format!("late-{i}"), ErrorKind::Validation, "bad").await;
    }
    // The keeper holds what it had taken (unacked, on its channel); the
    // later copies wait in the DLQ, ready.
    assert!(
        env.queue_len(&env.dlq()).await >= 40,
        "the later copies wait in the DLQ"
    );
    assert_eq!(env.count("parked_messages").await, 0);

    proxy.set_refusing(false);
    env.wait_for_rows("parked_messages", 50, WAIT).await;
    env.wait_for_queue_len(&env.dlq(), 0, WAIT).await;
    let text = worker.metrics.render();
    worker.stop().await;
    assert_eq!(rows(&env, "times_parked = 1").await, 50, "each once");
    assert!(
        text.contains("iot_parking_moved_total{result=\"stored\"} 50\n"),
        "{text}"
    );
    assert!(text.contains("iot_parking_paused 0\n"), "{text}");
    env.cleanup().await;
}

/// Parks 6 transient MEASUREMENT failures `m-0`… and 4 DEVICE_UP
/// validation failures `u-0`… in Q.dlq, oldest first.
async fn park_two_groups(env: &TestEnv) {
    for i in 0..6 {
        park(
            env,
            &format!("m-{i}"),
            ErrorKind::Transient,
            &format!("pool timed out after {i} ms"),
        )
        .await;
    }
    for i in 0..4 {
        let id = format!("u-{i}");
        let body = json!({"type": "DEVICE_UP", "id": id, "data": {"device_id": "d1", "ip": 7}}).to_string();
        let properties = env.parked_properties(
            BasicProperties::default().with_message_id(id.as_str().into()),
            ErrorKind::Validation,
            "data.ip must be a string",
        );
        env.publish_to(&env.dlq(), body.as_bytes(), properties).await;
    }
}

/// `(count, error_kind)` of each group of `--list --json ARGS`.
fn listed(env: &TestEnv, args: &[&str]) -> Vec<(u64, String)> {
    let lines = json_lines(&env.run_requeue(&[&["--list", "--json"], args].concat()));
    let (summary, groups) = lines.split_last().expect("a summary line");
    assert_eq!(summary["record"], "summary");
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
async fn list_groups_and_show_prints_body_headers_and_error() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    park_two_groups(&env).await;
    let transient = (6, "transient".to_owned());
    let validation = (4, "validation".to_owned());
    assert_eq!(
        listed(&env, &[]),
        [transient.clone(), validation.clone()],
        "no worker ran"
    );
    assert_eq!(env.queue_len(&env.dlq()).await, 0, "requeue moved them into the lot");
    assert_eq!(
        listed(&env, &["--type", "DEVICE_UP"]),
        std::slice::from_ref(&validation)
    );
    assert_eq!(listed(&env, &["--grep", "must be a string"]), [validation]);
    assert_eq!(
        listed(&env, &["--id", "m-1", "--error-kind", "transient"]),
        [(1, "transient".into())]
    );
    let table = stdout(&env.run_requeue(&["--list"]));
    assert!(
        table.contains(&format!("{}: 10 parked message(s) in 2 group(s)", env.queue)),
        "{table}"
    );

    // `--list --messages` shows the ids `--show` takes (the README's tour).
    let table = stdout(&env.run_requeue(&["--list", "--messages", "--type", "DEVICE_UP"]));
    assert!(table.contains(&format!("{}: 4 message(s)", env.queue)), "{table}");
    assert!(table.contains("MESSAGE ID"), "{table}");
    for id in ["u-0", "u-1", "u-2", "u-3"] {
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("{id} ")))
            .unwrap_or_default();
        assert!(row.contains("DEVICE_UP") && row.contains("validation"), "{id}: {table}");
    }
    assert!(!table.contains("m-0"), "filtered: {table}");
    let records = json_lines(&env.run_requeue(&["--list", "--messages", "--json"]));
    assert_eq!(records.len(), 11, "10 messages and a summary: {records:?}");
    assert!(records.iter().any(|r| r["message_id"] == "u-2"));

    let shown = stdout(&env.run_requeue(&["--show", "u-2"]));
    let body = json!({"type": "DEVICE_UP", "id": "u-2", "data": {"device_id": "d1", "ip": 7}}).to_string();
    assert!(
        shown.contains(&format!("body ({} bytes)\n{body}\n", body.len())),
        "{shown}"
    );
    assert!(shown.contains("error        data.ip must be a string"), "{shown}");
    assert!(shown.contains("\"iot-error-kind\": \"validation\""), "{shown}");
    assert!(shown.contains("parked       1 time(s)"), "{shown}");
    let line = &json_lines(&env.run_requeue(&["--show", "u-2", "--json"]))[0];
    assert_eq!(line["record"], "message");
    assert_eq!(line["headers"]["iot-retry-count"], 2);
    assert_eq!(line["properties"]["message_id"], "u-2");
    let missing = env.requeue(&["--show", "nope"]).output().unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no parked message with id \"nope\""));
    env.cleanup().await;
}

/// Everything a dry run could touch: each row's status and times parked,
/// the actions, and the two queues.
async fn snapshot(env: &TestEnv) -> (Vec<(String, String, i32)>, i64, u32, u32) {
    let lot = sqlx::query_as("SELECT message_id, status, times_parked FROM parked_messages ORDER BY message_id")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    (
        lot,
        env.count("operator_actions").await,
        env.queue_len(&env.queue).await,
        env.queue_len(&env.dlq()).await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_changes_nothing_anywhere() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    park_two_groups(&env).await;
    env.run_requeue(&["--list"]);
    park(&env, "waiting", ErrorKind::Transient, "db down").await;
    let before = snapshot(&env).await;
    assert_eq!((before.0.len(), before.3), (10, 1));

    let lines = json_lines(&env.run_requeue(&["--dry-run", "--json", "--limit", "3"]));
    assert_eq!(lines.iter().filter(|l| l["action"] == "would_retry").count(), 3);
    assert_eq!(lines.last().unwrap()["summary"]["matching"], 10);
    let text = stdout(&env.run_requeue(&["--dry-run", "--archive", "--type", "DEVICE_UP"]));
    assert_eq!(text.matches("would archive u-").count(), 4, "{text}");
    env.run_requeue(&["--dry-run", "--unarchive"]);
    env.run_requeue(&["--dry-run", "--list"]);
    env.run_requeue(&["--dry-run", "--show", "u-1"]);
    assert_eq!(snapshot(&env).await, before, "same rows, no action, same queues");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_retry_with_a_limit_publishes_marks_and_logs_exactly_those() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    park_two_groups(&env).await;
    let lines = json_lines(&env.run_requeue(&[
        "--error-kind",
        "transient",
        "--limit",
        "4",
        "--actor",
        "alice",
        "--json",
    ]));
    assert_eq!(lines.last().unwrap()["summary"]["messages"], 4);

    let published = ids_in(&env, &env.queue).await;
    let oldest: BTreeMap<String, usize> = (0..4).map(|i| (format!("m-{i}"), 1)).collect();
    assert_eq!(published, oldest, "the four oldest of the group, once each");
    let retried: Vec<String> = sqlx::query_scalar(
        "SELECT message_id FROM parked_messages WHERE status = 'retried' AND status_changed_by = 'alice' ORDER BY 1",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(retried, ["m-0", "m-1", "m-2", "m-3"]);
    assert_eq!(rows(&env, "status = 'parked'").await, 6);
    let (actor, action, filter, messages): (String, String, Value, i32) =
        sqlx::query_as("SELECT actor, action, filter, messages FROM operator_actions")
            .fetch_one(&env.pool)
            .await
            .expect("one action");
    assert_eq!((actor.as_str(), action.as_str(), messages), ("alice", "retry", 4));
    assert_eq!(filter, json!({"error_kinds": ["transient"], "limit": 4}));
    assert_eq!(env.count("operator_action_messages").await, 4);
    let shown = stdout(&env.run_requeue(&["--show", "m-0"]));
    assert!(shown.contains(&format!("retry to {} by alice", env.queue)), "{shown}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_message_that_fails_again_is_one_row_parked_twice() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    env.publish(&device_up("up-1", "has space"), BasicProperties::default())
        .await;
    let worker = env.spawn_worker(&[KEEPER_ON]);
    env.wait_for_rows("parked_messages WHERE status = 'parked'", 1, WAIT)
        .await;
    env.run_requeue(&["--yes"]);
    env.wait_for_rows("parked_messages WHERE times_parked = 2 AND status = 'parked'", 1, WAIT)
        .await;
    worker.stop().await;
    assert_eq!(env.count("parked_messages").await, 1, "one row");
    let (requeues, error): (i32, String) =
        sqlx::query_as("SELECT requeue_count, error FROM parked_messages WHERE message_id = 'up-1'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(requeues, 1, "the parking after the retry");
    assert!(error.contains("device_id"), "{error}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_hides_a_group_from_list_and_unarchive_brings_it_back() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    park_two_groups(&env).await;
    let both = listed(&env, &[]);
    let out = stdout(&env.run_requeue(&["--archive", "--type", "DEVICE_UP"]));
    assert!(out.contains("archived 4 message(s)"), "{out}");
    assert_eq!(listed(&env, &[]), [(6, "transient".into())]);
    assert_eq!(listed(&env, &["--status", "archived"]), [(4, "validation".into())]);
    env.run_requeue(&["--unarchive", "--type", "DEVICE_UP"]);
    assert_eq!(listed(&env, &[]), both);
    let actions: Vec<(String, i32)> = sqlx::query_as("SELECT action, messages FROM operator_actions ORDER BY id")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(actions, [("archive".into(), 4), ("unarchive".into(), 4)]);
    assert_eq!(env.queue_len(&env.queue).await, 0, "nothing published");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_retry_loses_nothing_and_sends_at_most_one_batch_twice() {
    const N: usize = 300;
    let env = TestEnv::new(&TopologyFile::fast()).await;
    for i in 0..N {
        park(&env, &format!("m-{i:03}"), ErrorKind::Transient, "db down").await;
    }
    env.run_requeue(&["--list"]);
    // 100 per second: batches of 10, one every 0.1 s.
    let mut child = tokio::process::Command::from(env.requeue(&["--rate", "100", "--yes"]))
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for("the retry to be under way", WAIT, || async {
        (env.queue_len(&env.queue).await >= 80).then_some(())
    })
    .await;
    child.start_kill().unwrap();
    assert!(!child.wait().await.unwrap().success());

    let first = ids_in(&env, &env.queue).await;
    let retried: Vec<String> = sqlx::query_scalar("SELECT message_id FROM parked_messages WHERE status = 'retried'")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert!(retried.len() < N, "killed mid-retry");
    for id in &retried {
        assert!(
            first.contains_key(id),
            "{id} was marked retried without being published"
        );
    }
    // The rest goes now; the killed batch, published but not marked, again.
    env.run_requeue(&["--yes"]);
    let mut all = first.clone();
    for (id, n) in ids_in(&env, &env.queue).await {
        *all.entry(id).or_insert(0) += n;
    }
    assert_eq!(all.len(), N, "every message was published");
    let twice = all.values().filter(|&&n| n > 1).count();
    assert!(twice <= 10, "at most the in-flight batch of 10 twice, not {twice}");
    assert_eq!(rows(&env, "status = 'retried'").await, N as i64);
    env.cleanup().await;
}

/// A header of every AMQP field type.
fn every_type() -> FieldTable {
    let mut t = FieldTable::default();
    let mut put = |k: &str, v: AMQPValue| {
        t.insert(ShortString::from(k), v);
    };
    put("x-bool", AMQPValue::Boolean(true));
    put("x-i8", AMQPValue::ShortShortInt(-8));
    put("x-u8", AMQPValue::ShortShortUInt(8));
    put("x-i16", AMQPValue::ShortInt(-16));
    put("x-u16", AMQPValue::ShortUInt(16));
    put("x-i32", AMQPValue::LongInt(-32));
    put("x-i64", AMQPValue::LongLongInt(-64));
    put("x-f32", AMQPValue::Float(1.5));
    put("x-f64", AMQPValue::Double(2.25));
    put("x-dec", AMQPValue::DecimalValue(DecimalValue { scale: 2, value: 1234 }));
    put("x-long", AMQPValue::LongString(LongString::from("l")));
    put("x-bytes", AMQPValue::ByteArray(ByteArray::from(vec![0u8, 255])));
    put("x-time", AMQPValue::Timestamp(1_790_000_000));
    put("x-void", AMQPValue::Void);
    let mut inner = FieldTable::default();
    inner.insert("n".into(), AMQPValue::LongInt(1));
    put(
        "x-array",
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(inner.clone())])),
    );
    put("x-table", AMQPValue::FieldTable(inner));
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_message_keeps_its_properties_and_header_types() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let base = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("identity".into())
        .with_headers(every_type())
        .with_priority(3)
        .with_correlation_id("corr".into())
        .with_reply_to("replies".into())
        .with_message_id("typed-1".into())
        .with_timestamp(1_790_000_000)
        .with_type("reading".into())
        .with_app_id("sensor-gw".into());
    let parked = env.parked_properties(base, ErrorKind::Permanent, "constraint");
    let body = b"{\"type\":\"MEASUREMENT\",\"data\":{}}\n\x00tail";
    env.publish_to(&env.dlq(), body, parked.clone()).await;

    env.run_requeue(&["--yes", "--keep-retry-count"]);
    let mut out = env.drain(&env.queue).await;
    assert_eq!(out.len(), 1);
    let retried = out.remove(0).delivery;
    assert_eq!(retried.data, body, "the body, byte for byte");
    let mut got = retried.properties.headers().clone().unwrap().inner().clone();
    assert!(matches!(got.remove(REQUEUE_COUNT), Some(AMQPValue::LongLongInt(1))));
    assert!(matches!(got.remove(REQUEUED_AT), Some(AMQPValue::LongLongInt(_))));
    assert_eq!(
        FieldTable::from(got),
        parked.headers().clone().unwrap(),
        "same headers, same types"
    );
    assert_eq!(
        retried.properties.with_headers(FieldTable::default()),
        parked.with_headers(FieldTable::default()),
        "same properties"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keeper_deletes_old_retried_and_archived_rows_never_parked_ones() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    for age in ["old", "new"] {
        for status in ["parked", "retried", "archived"] {
            park(&env, &format!("{age}-{status}"), ErrorKind::Validation, "bad").await;
        }
    }
    env.run_requeue(&["--list"]);
    sqlx::query(
        "UPDATE parked_messages SET status = split_part(message_id, '-', 2),
             status_changed_at = now() - CASE WHEN message_id LIKE 'old-%' THEN interval '31 days' ELSE interval '29 days' END",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let worker = env.spawn_worker(&[KEEPER_ON, ("PARKED_RETENTION_DAYS", "30")]);
    env.wait_for_rows("parked_messages", 4, WAIT).await;
    wait_for("the gauge to count the lot", WAIT, || async {
        let text = worker.metrics.render();
        (text.contains("iot_parked_messages{status=\"parked\"} 2\n")
            && text.contains("iot_parked_messages{status=\"retried\"} 1\n"))
        .then_some(())
    })
    .await;
    worker.stop().await;
    let kept: Vec<String> = sqlx::query_scalar("SELECT message_id FROM parked_messages ORDER BY 1")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(kept, ["new-archived", "new-parked", "new-retried", "old-parked"]);
    env.cleanup().await;
}
