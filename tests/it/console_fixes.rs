//! The console's second round in a real browser (docs/console.md, "Round
//! two"): every parking's history, fix and retry, retry into another
//! queue, paced retries and the chart of failures over time, through what
//! a person sees and clicks, then the rows and queues behind it.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use fantoccini::Locator;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use serde_json::{Value, json};

use crate::common::browser::{Browser, http};
use crate::common::messages::{measurement, unknown_type};
use crate::common::{TestEnv, TopologyFile, wait_for};
use crate::console::{OPERATOR, VIEWER, WAIT, fill, login, open_group, row_id, set, stop};

/// The items of a message's `#history`, as the page shows them.
async fn history(browser: &Browser) -> Vec<String> {
    browser.text("#history").await;
    let items = browser
        .run("return [...document.querySelectorAll('#history > li')].map(l => l.innerText.trim());")
        .await;
    serde_json::from_value(items).expect("history items")
}

async fn times_parked(env: &TestEnv, message_id: &str) -> i32 {
    sqlx::query_scalar("SELECT times_parked FROM parked_messages WHERE message_id = $1")
        .bind(message_id)
        .fetch_one(&env.pool)
        .await
        .expect("a row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_parked_retried_and_parked_again_shows_two_parkings_and_one_action_in_order() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    fill(&env, &[("h1", measurement("h1", "high"))]).await;
    let console = env.spawn_console(&[], "console").await;
    let browser = Browser::start(&env).await;
    let page = format!("{}/messages/{}", console.url, row_id(&env, "h1").await);
    browser.client.goto(&page).await.expect("the message");
    let first = history(&browser).await;
    assert_eq!(first.len(), 2, "one parking and the status: {first:?}");
    assert!(first[0].contains("parked, validation"), "{first:?}");

    browser.click("form.actions button[value=retry]").await;
    assert!(browser.text("#result").await.starts_with("Retried 1 message(s)"));
    // The worker takes the retried copy, refuses it again, and its keeper
    // parks it again.
    let worker = env.spawn_worker(&[("PARKING_KEEPER", "on")]);
    worker.wait_ready(&env).await;
    wait_for("the second parking", WAIT, || async {
        (times_parked(&env, "h1").await == 2).then_some(())
    })
    .await;
    worker.stop().await;

    browser.client.goto(&page).await.expect("the message again");
    let items = history(&browser).await;
    assert_eq!(items.len(), 4, "{items:?}");
    assert!(
        items[0].contains("parked, validation") && items[0].contains("iot-requeue-count 0"),
        "{items:?}"
    );
    assert!(
        items[1].contains("retry to ") && items[1].contains("by operator:local"),
        "{items:?}"
    );
    assert!(
        items[2].contains("parked, validation") && items[2].contains("iot-requeue-count 1"),
        "{items:?}"
    );
    assert!(items[3].contains("status parked"), "{items:?}");
    let stored: Vec<i32> = sqlx::query_scalar("SELECT requeue_count FROM parkings ORDER BY at, id")
        .fetch_all(&env.pool)
        .await
        .expect("parkings");
    assert_eq!(stored, [0, 1], "one history row per parking");
    browser.screenshot("history").await;
    browser.close().await;
    stop(console).await;
    env.cleanup().await;
}

/// Replaces what the edit form's body holds, as a person typing it.
async fn type_body(browser: &Browser, text: &str) {
    let area = browser
        .client
        .find(Locator::Css("#edit-body"))
        .await
        .expect("the edit form");
    area.clear().await.expect("clear the body");
    area.send_keys(text).await.expect("type the body");
}

async fn operator_actions(env: &TestEnv) -> Vec<(String, String, Option<String>, i32)> {
    sqlx::query_as("SELECT action, actor, target, messages FROM operator_actions ORDER BY id")
        .fetch_all(&env.pool)
        .await
        .expect("read operator_actions")
}

fn ids(messages: &[lapin::message::BasicGetMessage]) -> BTreeSet<String> {
    messages
        .iter()
        .map(|m| m.delivery.properties.message_id().as_ref().expect("id").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_measurement_is_fixed_in_the_page_checked_first_and_applied_once() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let fixed = json!({"type": "MEASUREMENT", "id": "f1", "data": {"device_id": "d1", "sensor": "t", "value": 21.5}});
    let hostile = json!({"type": "MEASUREMENT", "id": "f2",
                         "data": {"device_id": "d1", "sensor": "t", "value": 1,
                                  "unit": "<img src=x onerror=xss=1>"}});
    fill(
        &env,
        &[("f1", measurement("f1", "21.5")), ("f2", measurement("f2", "hot"))],
    )
    .await;
    let console = env
        .spawn_console(
            &[("CONSOLE_TOKEN", OPERATOR), ("CONSOLE_VIEWER_TOKEN", VIEWER)],
            "console",
        )
        .await;
    let browser = Browser::start(&env).await;
    let page = format!("{}/messages/{}", console.url, row_id(&env, "f1").await);

    // A viewer sees no edit form, and the API refuses their edit.
    login(&browser, &console.url, "vera", VIEWER).await;
    browser.client.goto(&page).await.expect("the message");
    browser.text("#body").await;
    assert_eq!(browser.count("#fix").await, 0, "no edit form for a viewer");
    let id = row_id(&env, "f1").await;
    let api = format!("POST /api/messages/{id}/edit HTTP/1.1\r\nContent-Type: application/json");
    let edit = json!({"body": fixed.to_string()}).to_string();
    let (status, _, _) = http(
        &console.addr,
        &format!("{api}\r\nAuthorization: Bearer {VIEWER}"),
        &edit,
    )
    .await;
    assert_eq!(status, 403);
    browser.click("header form button").await;
    browser.text("form[action='/login'] button").await;

    // The operator: a still-bad edit shows the worker's own error and
    // sends nothing.
    login(&browser, &console.url, "olga", OPERATOR).await;
    browser.client.goto(&page).await.expect("the message");
    let still_bad =
        json!({"type": "MEASUREMENT", "id": "f1", "data": {"device_id": "d1", "sensor": "t", "value": "21,5"}});
    type_body(&browser, &still_bad.to_string()).await;
    browser.click("#edit-button").await;
    let error = browser.text("#edit-error").await;
    assert!(
        error.contains("validation: ") && error.contains("data.value must be a number"),
        "{error}"
    );
    let kept = browser.run("return document.querySelector('#edit-body').value;").await;
    assert_eq!(kept, json!(still_bad.to_string()), "the edit is kept for another try");
    assert_eq!(env.queue_len(&env.queue).await, 0, "nothing sent");
    assert!(operator_actions(&env).await.is_empty(), "nothing recorded");
    browser.screenshot("fix-refused").await;

    // The fixed edit goes, once, and the worker applies it.
    browser.client.goto(&page).await.expect("the message");
    type_body(&browser, &fixed.to_string()).await;
    browser.click("#edit-button").await;
    assert_eq!(browser.text("#result").await, "Fixed and retried (action #1).");
    assert_eq!(
        operator_actions(&env).await,
        [("edit".into(), "operator:olga".into(), Some(env.queue.clone()), 1)]
    );
    let original: Vec<u8> = sqlx::query_scalar("SELECT body FROM parked_messages WHERE message_id = 'f1'")
        .fetch_one(&env.pool)
        .await
        .expect("the row");
    assert_eq!(original, measurement("f1", "21.5"), "the original bytes are kept");
    let worker = env.spawn_worker(&[]);
    env.wait_for_rows("measurements", 1, WAIT).await;
    env.wait_for_queue_len(&env.queue, 0, WAIT).await;
    worker.stop().await;
    let values: Vec<f64> = sqlx::query_scalar("SELECT value FROM measurements")
        .fetch_all(&env.pool)
        .await
        .expect("measurements");
    assert_eq!(values, [21.5], "applied once");

    // Its page shows the diff and who.
    browser.client.goto(&page).await.expect("the message");
    assert_eq!(browser.text("#status").await, "retried");
    let items = history(&browser).await;
    assert!(
        items
            .iter()
            .any(|i| i.contains("edit to ") && i.contains("by operator:olga")),
        "{items:?}"
    );
    let diff = browser.text("pre.diff").await;
    assert!(
        diff.contains(r#"-     "value": "21.5""#) && diff.contains(r#"+     "value": 21.5"#),
        "{diff}"
    );
    browser.screenshot("fix-diff").await;

    // A hostile edit is shown as text, in the diff too.
    let hostile_page = format!("{}/messages/{}", console.url, row_id(&env, "f2").await);
    browser.client.goto(&hostile_page).await.expect("f2");
    type_body(&browser, &hostile.to_string()).await;
    browser.click("#edit-button").await;
    assert!(browser.text("#result").await.starts_with("Fixed and retried"));
    browser.client.goto(&hostile_page).await.expect("f2");
    assert!(browser.text("pre.diff").await.contains("<img src=x onerror=xss=1>"));
    let ran = browser
        .run("return [typeof window.xss, document.querySelectorAll('main img, main script').length];")
        .await;
    assert_eq!(ran, json!(["undefined", 0]));

    browser.close().await;
    stop(console).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_retried_into_another_queue_lands_there_and_only_there() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    fill(
        &env,
        &[
            ("a1", measurement("a1", "high")),
            ("a2", measurement("a2", "high")),
            ("b1", unknown_type("b1")),
        ],
    )
    .await;
    let other = format!("{}.other", env.queue);
    let channel = env.connection.create_channel().await.expect("channel");
    channel
        .queue_declare(
            other.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare the other queue");
    let console = env.spawn_console(&[], "console").await;
    let browser = Browser::start(&env).await;
    browser.client.goto(&console.url).await.expect("failures");
    open_group(&browser, "MEASUREMENT").await;
    let group = browser.client.current_url().await.expect("url").to_string();

    // A queue that does not exist: refused, nothing sent.
    let to = browser
        .client
        .find(Locator::Css("form.actions input[name=to]"))
        .await
        .expect("to");
    to.send_keys("no-such-queue-here").await.expect("type");
    browser.click("form.actions button[value=retry]").await;
    browser.click("#confirm-button").await;
    assert!(
        browser
            .text("#result")
            .await
            .contains("queue 'no-such-queue-here' does not exist")
    );

    browser.client.goto(&group).await.expect("the group");
    let to = browser
        .client
        .find(Locator::Css("form.actions input[name=to]"))
        .await
        .expect("to");
    to.send_keys(&other).await.expect("type");
    browser.click("form.actions button[value=retry]").await;
    assert_eq!(browser.text("#confirm-count").await, "2");
    assert_eq!(browser.text("#confirm-target").await, other);
    browser.click("#confirm-button").await;
    assert!(browser.text("#result").await.starts_with("Retried 2 message(s)"));
    assert_eq!(ids(&env.drain(&other).await), set(&["a1", "a2"]), "in the other queue");
    assert!(env.drain(&env.queue).await.is_empty(), "and not in Q");
    let actions = operator_actions(&env).await;
    assert_eq!(actions.last().expect("the retry").2.as_deref(), Some(other.as_str()));

    // The API refuses a missing target too.
    let api = "POST /api/actions HTTP/1.1\r\nContent-Type: application/json";
    let (status, _, answer) = http(
        &console.addr,
        api,
        r#"{"action": "retry", "filter": {"ids": ["b1"]}, "to": "nowhere-at-all"}"#,
    )
    .await;
    assert_eq!(status, 502, "{answer}");
    assert!(
        serde_json::from_str::<Value>(&answer).expect("JSON")["error"]
            .as_str()
            .expect("error")
            .contains("does not exist")
    );
    channel
        .queue_delete(other.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the other queue");
    browser.close().await;
    stop(console).await;
    env.cleanup().await;
}

/// Parkings at known hours (one parked row each), then the chart against
/// `/api/stats`: one bar per hour that had failures, with its count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_has_one_bar_per_hour_with_failures_with_the_counts_of_api_stats() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    insert_parkings(&env, &[0, 0, 0, 2, 2, 30, 30, 30, 30, 200], 100).await;
    let console = env.spawn_console(&[], "console").await;
    let (status, _, body) = http(&console.addr, "GET /api/stats HTTP/1.1", "").await;
    assert_eq!(status, 200, "{body}");
    let stats: Value = serde_json::from_str(&body).expect("JSON");
    let hours = stats["hours"].as_array().expect("hours");
    assert_eq!(hours.len(), 3, "hours 0, 2 and 30 ago; 200 is beyond 7 days: {stats}");
    let totals: Vec<i64> = hours.iter().map(|h| h["total"].as_i64().expect("total")).collect();
    assert_eq!(totals, [40, 20, 30], "oldest hour first");
    assert_eq!(hours[0]["kinds"]["validation"], 20);

    let browser = Browser::start(&env).await;
    browser.client.goto(&console.url).await.expect("failures");
    browser.text("#failures-chart").await;
    let bars = browser
        .run("return [...document.querySelectorAll('#failures-chart g.bar')].map(g => [g.dataset.hour, Number(g.dataset.count), g.querySelectorAll('rect').length]);")
        .await;
    let expected: Vec<Value> = hours
        .iter()
        .map(|h| {
            let hour = chrono::DateTime::parse_from_rfc3339(h["hour"].as_str().expect("hour")).expect("a time");
            json!([
                hour.to_rfc3339(),
                h["total"],
                h["kinds"].as_object().expect("kinds").len()
            ])
        })
        .collect();
    assert_eq!(bars, Value::Array(expected));
    let grown = browser.text("#grown").await;
    assert!(grown.contains("+"), "the groups parked into in the last hour: {grown}");
    browser.screenshot("chart").await;
    browser.close().await;
    stop(console).await;
    env.cleanup().await;
}

/// `n` parked rows `m-1`, `m-2`, …, row `g` with one parking
/// `hours_ago[g % len]` hours ago, of kinds validation and decode in turn,
/// in 4 groups.
async fn insert_parkings(env: &TestEnv, hours_ago: &[i32], n: i64) {
    sqlx::query(
        "INSERT INTO parked_messages (queue, message_id, message_type, error_kind, error, fingerprint, headers,
                                      body, properties, amqp_properties)
         SELECT $1, 'm-' || g, 'MEASUREMENT', 'validation', 'data.value must be a number', 'fp' || (g % 4),
                '{}', convert_to('{}', 'UTF8'), '{}', '\\x'::bytea
         FROM generate_series(1, $2) AS g",
    )
    .bind(&env.queue)
    .bind(n)
    .execute(&env.pool)
    .await
    .expect("parked rows");
    sqlx::query(
        "INSERT INTO parkings (parked_id, queue, at, error_kind, error, fingerprint, requeue_count)
         SELECT p.id, p.queue, now() - ($3::int[])[1 + g % cardinality($3::int[])] * interval '1 hour',
                (ARRAY['validation', 'decode'])[1 + g % 2], p.error, p.fingerprint, 0
         FROM parked_messages p JOIN generate_series(1, $2) AS g ON p.message_id = 'm-' || g
         WHERE p.queue = $1",
    )
    .bind(&env.queue)
    .bind(n)
    .bind(hours_ago)
    .execute(&env.pool)
    .await
    .expect("parkings");
    sqlx::query("ANALYZE parkings")
        .execute(&env.pool)
        .await
        .expect("analyze");
}

/// The Failures page with its chart over 100,000 parked rows and their
/// parkings spread over 7 days, timed by Navigation Timing as
/// every_page_loads_within_a_second_with_100_000_parked_rows times pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_failures_page_with_its_chart_over_100_000_parked_rows() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    insert_parkings(&env, &(0..168).collect::<Vec<i32>>(), 100_000).await;
    let console = env.spawn_console(&[], "console").await;
    let browser = Browser::start(&env).await;
    let page = format!("{}/", console.url);
    browser.client.goto(&page).await.expect("page");
    browser.client.goto(&page).await.expect("page");
    let ms = browser.load_ms().await;
    assert_eq!(
        browser.count("#failures-chart g.bar").await,
        168,
        "a bar for every hour"
    );
    println!("the Failures page with its chart over 100,000 parked rows: {ms:.0} ms");
    assert!(ms < 1000.0, "{ms:.0} ms");
    browser.close().await;
    stop(console).await;
    env.cleanup().await;
}

/// Rows of group `message_type` in `status`.
async fn in_status(env: &TestEnv, message_type: &str, status: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM parked_messages WHERE message_type = $1 AND status = $2")
        .bind(message_type)
        .bind(status)
        .fetch_one(&env.pool)
        .await
        .expect("count")
}

/// Asks for a paced retry of `message_type`'s group at `rate` per second,
/// confirms `expected` messages, and returns when its page shows it
/// running, with the instant of the confirming click.
async fn start_paced_retry(browser: &Browser, url: &str, message_type: &str, rate: &str, expected: &str) -> Instant {
    browser.client.goto(url).await.expect("failures");
    open_group(browser, message_type).await;
    let field = browser
        .client
        .find(Locator::Css("form.actions input[name=rate]"))
        .await
        .expect("the rate field");
    field.send_keys(rate).await.expect("type the rate");
    browser.click("form.actions button[value=retry]").await;
    assert_eq!(browser.text("#confirm-count").await, expected);
    assert_eq!(browser.text("#confirm-rate").await, rate);
    let clicked = Instant::now();
    browser.click("#confirm-button").await;
    assert_eq!(browser.text("#action-word").await, "retry", "the action's page");
    clicked
}

/// What the action's page shows in `#css` now.
async fn shown(browser: &Browser, css: &str) -> String {
    browser
        .run(&format!("return document.querySelector('{css}')?.innerText ?? '';"))
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// 2,000 messages at 200/s run about 10 s and all land in Q; another
/// 2,000 stopped from the page after about half leave the rest parked,
/// and Q holds exactly what the page says was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paced_retry_takes_its_time_shows_its_progress_and_stopped_halfway_leaves_the_rest_parked() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let ids: Vec<(String, Vec<u8>)> = (0..4000)
        .map(|i| {
            let id = format!("p{i}");
            let body = if i % 2 == 0 {
                measurement(&id, "high")
            } else {
                unknown_type(&id)
            };
            (id, body)
        })
        .collect();
    let borrowed: Vec<(&str, Vec<u8>)> = ids.iter().map(|(id, body)| (id.as_str(), body.clone())).collect();
    fill(&env, &borrowed).await;
    let console = env
        .spawn_console(
            &[("CONSOLE_TOKEN", OPERATOR), ("CONSOLE_VIEWER_TOKEN", VIEWER)],
            "console",
        )
        .await;
    let browser = Browser::start(&env).await;
    login(&browser, &console.url, "olga", OPERATOR).await;

    // To the end: about 10 s, every message in Q once.
    let clicked = start_paced_retry(&browser, &console.url, "MEASUREMENT", "200", "2000").await;
    let took = wait_for("the retry to finish", Duration::from_secs(60), || async {
        (shown(&browser, "#state").await == "finished").then(|| clicked.elapsed())
    })
    .await;
    println!("a paced retry of 2,000 messages at 200/s took {took:.1?}");
    assert!(
        took >= Duration::from_millis(9_500) && took < Duration::from_secs(15),
        "2,000 at 200/s took {took:?}"
    );
    assert_eq!(browser.text("#sent").await, "2000");
    assert_eq!(in_status(&env, "MEASUREMENT", "retried").await, 2000);
    assert_eq!(env.queue_len(&env.queue).await, 2000, "each sent once");
    env.drain(&env.queue).await;

    // Stopped halfway: what it sent is in Q, the rest stays parked. A
    // viewer's stop is refused on the way.
    start_paced_retry(&browser, &console.url, "TELEPORT", "200", "2000").await;
    let url = browser.client.current_url().await.expect("url");
    let action_id = url.path().rsplit('/').next().expect("an id").to_owned();
    let viewer = format!("POST /api/actions/{action_id}/stop HTTP/1.1\r\nAuthorization: Bearer {VIEWER}");
    let (status, _, body) = http(&console.addr, &viewer, "").await;
    assert_eq!(status, 403, "a viewer stops nothing: {body}");
    wait_for("half of them sent", Duration::from_secs(30), || async {
        let sent: u64 = shown(&browser, "#sent").await.parse().unwrap_or(0);
        (sent >= 1000).then_some(())
    })
    .await;
    browser.click("#stop").await;
    wait_for("the page to say stopped", Duration::from_secs(10), || async {
        (shown(&browser, "#state").await == "stopped").then_some(())
    })
    .await;
    let sent: i64 = browser.text("#sent").await.parse().expect("a count");
    assert!((1000..1400).contains(&sent), "stopped soon after 1,000: {sent}");
    assert_eq!(in_status(&env, "TELEPORT", "retried").await, sent);
    assert_eq!(
        in_status(&env, "TELEPORT", "parked").await,
        2000 - sent,
        "the rest stays parked"
    );
    assert_eq!(
        i64::from(env.queue_len(&env.queue).await),
        sent,
        "Q holds what was sent"
    );
    assert_eq!(browser.count("#stop").await, 0, "no Stop button once stopped");
    let actions = operator_actions(&env).await;
    let last = actions.last().expect("the paced retry");
    assert_eq!(
        (last.0.as_str(), last.1.as_str(), i64::from(last.3)),
        ("retry", "operator:olga", sent)
    );

    // The API says the same.
    let get = format!("GET /api/actions/{action_id} HTTP/1.1\r\nAuthorization: Bearer {VIEWER}");
    let (status, _, body) = http(&console.addr, &get, "").await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(answer["paced"]["state"], "stopped", "{answer}");
    assert_eq!(answer["filter"]["rate"], 200.0, "the rate is recorded: {answer}");
    assert_eq!(answer["paced"]["sent"], sent, "{answer}");
    assert_eq!(answer["paced"]["planned"], 2000, "{answer}");
    browser.close().await;
    stop(console).await;
    env.cleanup().await;
}
