//! The console in a real browser (headless chromium through chromedriver),
//! against a parking lot the worker filled: what a person sees and clicks,
//! then the rows, the queue and `operator_actions` behind it.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::browser::{Browser, ConsoleProcess, http};
use crate::common::messages::{measurement, unknown_type};
use crate::common::{TestEnv, TopologyFile};
use fantoccini::Locator;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};
use worker_iot_core::ErrorKind;

pub(crate) const WAIT: Duration = Duration::from_secs(60);
pub(crate) const OPERATOR: &str = "operator-token-0123456789";
pub(crate) const VIEWER: &str = "viewer-token-0123456789ab";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// A body a person must only ever read: a script in the body, and HTML in
/// the device id, which the validation error quotes.
fn hostile(id: &str) -> Vec<u8> {
    json!({"type": "DEVICE_DOWN", "id": id,
           "data": {"device_id": "<img src=x onerror=\"window.xss=1\">", "note": "<script>window.xss=2</script>"}})
    .to_string()
    .into_bytes()
}

/// Publishes `messages` to Q with a running worker (its keeper on), and
/// waits until each is a row of the lot; stops the worker, so a retried
/// message stays in Q to be counted.
pub(crate) async fn fill(env: &TestEnv, messages: &[(&str, Vec<u8>)]) {
    let worker = env.spawn_worker(&[("PARKING_KEEPER", "on")]);
    worker.wait_ready(env).await;
    for (id, body) in messages {
        let mut headers = FieldTable::default();
        headers.insert(
            "traceparent".into(),
            AMQPValue::LongString(format!("00-{TRACE}-00f067aa0ba902b7-01").into()),
        );
        let properties = BasicProperties::default()
            .with_message_id((*id).into())
            .with_headers(headers);
        env.publish(body, properties).await;
    }
    env.wait_for_rows("parked_messages", messages.len() as i64, WAIT).await;
    worker.stop().await;
}

/// The cells of each row of table `css`, as the page shows them.
pub(crate) async fn table(browser: &Browser, css: &str) -> Vec<Vec<String>> {
    let script = format!(
        "return [...document.querySelectorAll('{css} tbody tr')].map(r => [...r.cells].map(c => c.innerText.trim()));"
    );
    serde_json::from_value(browser.run(&script).await).expect("rows of cells")
}

/// (message id, status) of every row, and the statuses' change times.
async fn lot(env: &TestEnv) -> Vec<(String, String, i32, String)> {
    sqlx::query_as(
        "SELECT message_id, status, times_parked, status_changed_at::text FROM parked_messages ORDER BY message_id",
    )
    .fetch_all(&env.pool)
    .await
    .expect("read the lot")
}

pub(crate) async fn row_id(env: &TestEnv, message_id: &str) -> i64 {
    sqlx::query_scalar("SELECT id FROM parked_messages WHERE message_id = $1")
        .bind(message_id)
        .fetch_one(&env.pool)
        .await
        .expect("a row")
}

pub(crate) async fn statuses(env: &TestEnv, status: &str) -> BTreeSet<String> {
    sqlx::query_scalar("SELECT message_id FROM parked_messages WHERE status = $1")
        .bind(status)
        .fetch_all(&env.pool)
        .await
        .expect("read statuses")
        .into_iter()
        .collect()
}

async fn actions(env: &TestEnv) -> Vec<(String, String, i32)> {
    sqlx::query_as("SELECT action, actor, messages FROM operator_actions ORDER BY id")
        .fetch_all(&env.pool)
        .await
        .expect("read operator_actions")
}

/// Clicks the link of the group whose types cell is `message_type`.
pub(crate) async fn open_group(browser: &Browser, message_type: &str) {
    let xpath = format!("//table[@id='groups']//tr[td[3]='{message_type}']//a");
    let link = browser
        .client
        .find(Locator::XPath(&xpath))
        .await
        .expect("the group's link");
    link.click().await.expect("click the group");
    browser.text("#messages").await;
}

pub(crate) fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_reads_the_lot_and_retries_one_group() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let messages = [
        ("a1", measurement("a1", "high")),
        ("a2", measurement("a2", "high")),
        ("a3", measurement("a3", "high")),
        ("b1", unknown_type("b1")),
        ("b2", unknown_type("b2")),
        ("x1", hostile("x1")),
    ];
    fill(&env, &messages).await;
    let console = env
        .spawn_console(&[("JAEGER_UI_URL", "http://jaeger.example:16686")], "console")
        .await;
    let browser = Browser::start(&env).await;

    // Failures: each group with its type and count.
    browser.client.goto(&console.url).await.expect("open the console");
    let groups = table(&browser, "#groups").await;
    let count_of = |t: &str| groups.iter().find(|g| g[2] == t).map(|g| g[3].clone());
    assert_eq!(count_of("MEASUREMENT").as_deref(), Some("3"), "{groups:?}");
    assert_eq!(count_of("TELEPORT").as_deref(), Some("2"), "{groups:?}");
    assert_eq!(count_of("DEVICE_DOWN").as_deref(), Some("1"), "{groups:?}");
    assert_eq!(browser.text("#summary").await, "6 parked message(s) in 3 group(s)");
    browser.screenshot("failures").await;

    // A group lists its messages; a message shows headers, error and body.
    open_group(&browser, "MEASUREMENT").await;
    let group_url = browser.client.current_url().await.expect("url").to_string();
    let listed: BTreeSet<String> = table(&browser, "#messages")
        .await
        .into_iter()
        .map(|r| r[1].clone())
        .collect();
    assert_eq!(listed, set(&["a1", "a2", "a3"]));
    browser.screenshot("group").await;
    browser.click("#messages tbody tr a").await;
    assert!(["a1", "a2", "a3"].contains(&browser.text("#message-id").await.as_str()));
    assert!(browser.text("#error").await.contains("data.value must be a number"));
    assert!(
        browser.text("#body").await.contains("\"value\": \"high\""),
        "pretty-printed JSON"
    );
    let headers = table(&browser, "#headers").await;
    assert!(
        headers.iter().any(|h| h[0] == "iot-error-kind" && h[1] == "validation"),
        "{headers:?}"
    );
    let trace = browser.client.find(Locator::Css("#trace")).await.expect("a trace link");
    assert_eq!(
        trace.attr("href").await.expect("href").as_deref(),
        Some(format!("http://jaeger.example:16686/trace/{TRACE}").as_str())
    );
    browser.screenshot("message").await;

    // Retry on the group: the confirmation says how many, then only they
    // change.
    let before = lot(&env).await;
    browser.client.goto(&group_url).await.expect("back to the group");
    browser.click("form.actions button[value=retry]").await;
    assert_eq!(browser.text("#confirm-count").await, "3");
    browser.screenshot("confirm").await;
    browser.click("#confirm-button").await;
    assert_eq!(
        browser.text("#result").await,
        format!("Retried 3 message(s) (action #1).")
    );
    assert_eq!(statuses(&env, "retried").await, set(&["a1", "a2", "a3"]));
    let back: BTreeSet<String> = env
        .drain(&env.queue)
        .await
        .iter()
        .map(|m| m.delivery.properties.message_id().as_ref().expect("id").to_string())
        .collect();
    assert_eq!(
        back,
        set(&["a1", "a2", "a3"]),
        "the group's messages are back in Q, once each"
    );
    assert_eq!(actions(&env).await, [("retry".into(), "operator:local".into(), 3)]);
    let after = lot(&env).await;
    let untouched = |rows: &[(String, String, i32, String)]| {
        rows.iter()
            .filter(|r| !r.0.starts_with('a'))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(untouched(&after), untouched(&before), "nothing else changed");

    // A selection, and one message from its own page.
    browser.client.goto(&console.url).await.expect("failures");
    open_group(&browser, "TELEPORT").await;
    browser.click("#messages input[value=b1]").await;
    browser.click("#selection button[value=archive]").await;
    assert_eq!(browser.text("#result").await, "Archived 1 message(s) (action #2).");
    browser
        .client
        .goto(&format!("{}/messages/{}", console.url, row_id(&env, "b1").await))
        .await
        .expect("b1");
    assert_eq!(browser.text("#status").await, "archived");
    assert!(browser.text("#history").await.contains("archive by operator:local"));
    browser.click("form.actions button[value=unarchive]").await;
    assert_eq!(browser.text("#result").await, "Unarchived 1 message(s) (action #3).");
    assert_eq!(statuses(&env, "parked").await, set(&["b1", "b2", "x1"]));

    // A hostile body and HTML in an error are text; no script runs.
    let hostile_row = row_id(&env, "x1").await;
    browser
        .client
        .goto(&format!("{}/messages/{hostile_row}", console.url))
        .await
        .expect("the hostile message");
    assert!(browser.text("#body").await.contains("<script>window.xss=2</script>"));
    assert!(browser.text("#error").await.contains("<img src=x"));
    let ran = browser
        .run("return [typeof window.xss, document.querySelectorAll('main img, main script').length];")
        .await;
    assert_eq!(
        ran,
        json!(["undefined", 0]),
        "no script ran and no element came from the body"
    );
    browser.screenshot("hostile").await;

    browser.close().await;
    stop(console).await;
    env.cleanup().await;
}

pub(crate) async fn stop(mut console: ConsoleProcess) {
    console.process.signal("TERM");
    let status = console.process.wait_exit(Duration::from_secs(10)).await;
    assert!(
        status.success(),
        "console exit {status:?}: {}",
        console.process.stderr_text()
    );
}

/// Runs `fetch` in the page: a POST of `form` to `path`; the status.
pub(crate) async fn post_from_page(browser: &Browser, path: &str, form: Value) -> u16 {
    let script = "const [path, form, done] = arguments; \
                  fetch(path, {method: 'POST', body: new URLSearchParams(form)}).then(r => done(r.status));";
    let status = browser
        .client
        .execute_async(script, vec![json!(path), form])
        .await
        .expect("a POST from the page");
    u16::try_from(status.as_u64().expect("a status")).expect("a status")
}

pub(crate) async fn login(browser: &Browser, url: &str, name: &str, token: &str) {
    browser.client.goto(&format!("{url}/login")).await.expect("login page");
    let form = browser.client.form(Locator::Css("form")).await.expect("login form");
    form.set_by_name("name", name).await.expect("name");
    form.set_by_name("token", token).await.expect("token");
    form.submit().await.expect("log in");
    browser.text("#who").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_decide_who_reads_and_who_acts_and_archive_hides_a_group() {
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
    let console = env
        .spawn_console(
            &[("CONSOLE_TOKEN", OPERATOR), ("CONSOLE_VIEWER_TOKEN", VIEWER)],
            "console",
        )
        .await;

    // Without a token, nothing of the lot shows.
    let (status, head, body) = http(&console.addr, "GET / HTTP/1.1", "").await;
    assert_eq!(status, 303, "{head}");
    assert!(head.contains("location: /login?next=%2F"), "{head}");
    assert!(!body.contains("MEASUREMENT"));
    let (status, _, body) = http(&console.addr, "GET /api/groups HTTP/1.1", "").await;
    assert_eq!(status, 401, "{body}");
    let browser = Browser::start(&env).await;
    browser.client.goto(&console.url).await.expect("open the console");
    assert_eq!(browser.client.current_url().await.expect("url").path(), "/login");
    assert!(!browser.client.source().await.expect("source").contains("MEASUREMENT"));
    browser.screenshot("login").await;

    // The viewer reads, and every POST of theirs is refused.
    login(&browser, &console.url, "vera", VIEWER).await;
    assert_eq!(browser.text("#who").await, "viewer:vera");
    assert_eq!(table(&browser, "#groups").await.len(), 2);
    assert_eq!(
        browser.count("form.actions button").await,
        0,
        "no action buttons for a viewer"
    );
    let csrf = browser
        .run("return document.querySelector('input[name=csrf]').value;")
        .await;
    let archive_all = json!({"csrf": csrf, "scope": "matching", "action": "archive", "confirm": "3"});
    assert_eq!(post_from_page(&browser, "/act", archive_all).await, 403);
    let api = "POST /api/actions HTTP/1.1\r\nContent-Type: application/json";
    let (status, _, _) = http(
        &console.addr,
        &format!("{api}\r\nAuthorization: Bearer {VIEWER}"),
        r#"{"action": "archive", "filter": {"ids": ["a1"]}}"#,
    )
    .await;
    assert_eq!(status, 403);
    browser.click("header form button").await;
    // The login form is on the login page only: its showing is the end
    // of the navigation.
    browser.text("form[action='/login'] button").await;
    assert_eq!(browser.client.current_url().await.expect("url").path(), "/login");

    // The operator: a POST without the CSRF token, or from another origin,
    // is refused.
    login(&browser, &console.url, "olga", OPERATOR).await;
    let no_csrf = json!({"scope": "matching", "action": "archive", "confirm": "3"});
    assert_eq!(post_from_page(&browser, "/act", no_csrf).await, 403);
    let cookies = browser.client.get_all_cookies().await.expect("cookies");
    let session = cookies
        .iter()
        .find(|c| c.name() == "wic_console")
        .expect("the session cookie");
    assert_eq!(session.http_only(), Some(true));
    assert_eq!(format!("{:?}", session.same_site()), "Some(Strict)");
    let csrf = browser
        .run("return document.querySelector('input[name=csrf]').value;")
        .await;
    let forged = format!(
        "csrf={}&scope=matching&action=archive&confirm=3",
        csrf.as_str().expect("csrf")
    );
    let cross = format!(
        "POST /act HTTP/1.1\r\nCookie: wic_console={}\r\nOrigin: http://evil.example\r\n\
         Content-Type: application/x-www-form-urlencoded",
        session.value()
    );
    let (status, _, _) = http(&console.addr, &cross, &forged).await;
    assert_eq!(status, 403);
    assert_eq!(
        statuses(&env, "parked").await.len(),
        3,
        "no refused POST changed anything"
    );
    assert!(actions(&env).await.is_empty());

    // Archive hides the group; the archived view shows it.
    browser.client.goto(&console.url).await.expect("failures");
    open_group(&browser, "MEASUREMENT").await;
    browser.click("form.actions button[value=archive]").await;
    assert_eq!(browser.text("#confirm-count").await, "2");
    browser.click("#confirm-button").await;
    assert_eq!(browser.text("#result").await, "Archived 2 message(s) (action #1).");
    browser.client.goto(&console.url).await.expect("failures");
    let shown: Vec<String> = table(&browser, "#groups")
        .await
        .into_iter()
        .map(|g| g[2].clone())
        .collect();
    assert_eq!(shown, ["TELEPORT"]);
    browser
        .client
        .goto(&format!("{}/?status=archived", console.url))
        .await
        .expect("archived");
    let archived = table(&browser, "#groups").await;
    assert_eq!((archived[0][2].as_str(), archived[0][3].as_str()), ("MEASUREMENT", "2"));
    assert_eq!(statuses(&env, "archived").await, set(&["a1", "a2"]));
    assert_eq!(actions(&env).await, [("archive".into(), "operator:olga".into(), 2)]);
    browser
        .client
        .goto(&format!("{}/actions", console.url))
        .await
        .expect("actions page");
    let listed = table(&browser, "#actions").await;
    assert_eq!(
        (listed[0][2].as_str(), listed[0][3].as_str()),
        ("operator:olga", "archive")
    );
    browser.screenshot("actions").await;
    browser.close().await;

    // The JSON API acts the same way: a group action says its count first.
    let bearer = format!("{api}\r\nAuthorization: Bearer {OPERATOR}");
    let unarchive = r#"{"action": "unarchive", "filter": {"types": ["MEASUREMENT"]}}"#;
    let (status, _, body) = http(&console.addr, &bearer, unarchive).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).expect("JSON")["matching"], 2);
    let confirmed = r#"{"action": "unarchive", "filter": {"types": ["MEASUREMENT"]}, "expect": 2}"#;
    let (status, _, body) = http(&console.addr, &bearer, confirmed).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).expect("JSON")["messages"], 2);
    assert_eq!(statuses(&env, "parked").await.len(), 3);
    assert_eq!(actions(&env).await[1], ("unarchive".into(), "operator:api".into(), 2));

    stop(console).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_console_keeps_to_loopback() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    // A non-loopback address without a token: refused at start-up.
    let mut refused = env.spawn_binary(
        crate::common::browser::CONSOLE,
        &env.settings_json(),
        &[("CONSOLE_ADDR", "0.0.0.0:18080")],
        "refused",
    );
    let status = refused.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(2));
    let stderr = refused.stderr_text();
    assert!(
        stderr.contains("CONSOLE_ADDR=\"0.0.0.0:18080\" is not a loopback address"),
        "{stderr}"
    );
    assert!(stderr.contains("CONSOLE_TOKEN is not set"), "{stderr}");

    // On loopback, a request that names another host (DNS rebinding) is
    // refused; a loopback name is served.
    let console = env.spawn_console(&[], "console").await;
    let rebound = "GET / HTTP/1.1\r\nHost: evil.example";
    let (status, _, _) = http(&console.addr, rebound, "").await;
    assert_eq!(status, 403);
    // A message parked while no keeper runs waits in Q.dlq: the page says so.
    env.park(
        &measurement("w1", "high"),
        "w1",
        ErrorKind::Validation,
        "data.value must be a number",
    )
    .await;
    let (status, head, body) = http(&console.addr, "GET / HTTP/1.1", "").await;
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("content-security-policy: default-src 'self'"), "{head}");
    assert!(
        body.contains(&format!("1 message(s) wait in <code>{}</code>", env.dlq())),
        "{body}"
    );

    // A script on this machine may use the API without a token; a page of
    // another origin may not, nor a form's body.
    let api = "POST /api/actions HTTP/1.1\r\nContent-Type: application/json";
    let archive = r#"{"action": "archive", "filter": {"ids": ["none"]}}"#;
    let (status, _, body) = http(&console.addr, api, archive).await;
    assert_eq!((status, body.contains(r#""messages":0"#)), (200, true), "{body}");
    let cross = format!("{api}\r\nOrigin: http://evil.example");
    assert_eq!(http(&console.addr, &cross, archive).await.0, 403);
    let form = "POST /api/actions HTTP/1.1\r\nContent-Type: text/plain";
    assert_eq!(http(&console.addr, form, archive).await.0, 415);
    assert_eq!(
        sqlx::query_scalar::<_, String>("SELECT actor FROM operator_actions")
            .fetch_all(&env.pool)
            .await
            .expect("actions"),
        ["operator:api"],
        "only the script's action was logged"
    );
    stop(console).await;
    env.cleanup().await;
}

/// 100,000 parked rows in 20 groups (inserted in one statement: the
/// keeper's own pace is in docs/benchmarks.md), then every page in the
/// browser, timed by Navigation Timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_loads_within_a_second_with_100_000_parked_rows() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    sqlx::query(
        "INSERT INTO parked_messages (queue, message_id, message_type, error_kind, error, fingerprint, headers,
                                      body, properties, amqp_properties, first_parked_at, last_parked_at)
         SELECT $1, 'm-' || g, (ARRAY['MEASUREMENT', 'DEVICE_UP', 'SET_LED', 'IBEACON_CHANGE'])[1 + g % 4],
                'validation', 'data.value must be a number, found \"v' || g || '\"', 'fp' || (g % 20),
                jsonb_build_object('iot-error-kind', 'validation', 'iot-retry-count', 2),
                convert_to('{\"type\":\"MEASUREMENT\",\"id\":\"m-' || g || '\",\"data\":{\"device_id\":\"d'
                           || (g % 200) || '\",\"sensor\":\"t\",\"value\":\"v' || g || '\"}}', 'UTF8'),
                '{\"delivery_mode\": 2}', '\\x'::bytea,
                now() - g * interval '1 second', now() - g * interval '1 second'
         FROM generate_series(1, 100000) AS g",
    )
    .bind(&env.queue)
    .execute(&env.pool)
    .await
    .expect("100,000 rows");
    sqlx::query(
        "INSERT INTO operator_actions (actor, action, filter, messages, queue)
         SELECT 'operator:test', 'archive', '{}', 1, $1 FROM generate_series(1, 200)",
    )
    .bind(&env.queue)
    .execute(&env.pool)
    .await
    .expect("actions");
    sqlx::query("ANALYZE parked_messages")
        .execute(&env.pool)
        .await
        .expect("analyze");
    let console = env.spawn_console(&[], "console").await;
    let browser = Browser::start(&env).await;
    let url = &console.url;
    let deep = {
        browser.client.goto(&format!("{url}/groups/fp7")).await.expect("group");
        browser.click("#next-page").await;
        browser.text("#messages").await;
        browser.client.current_url().await.expect("url").to_string()
    };
    let message = row_id(&env, "m-50000").await;
    let pages = [
        ("failures", format!("{url}/")),
        ("search", format!("{url}/?q=m-99999")),
        ("filter", format!("{url}/?type=SET_LED&kind=validation&since=1h")),
        ("group", format!("{url}/groups/fp7")),
        ("group page 2", deep),
        ("message", format!("{url}/messages/{message}")),
        ("actions", format!("{url}/actions")),
    ];
    let mut timings = Vec::new();
    for (name, page) in &pages {
        // Once to warm the connection pool, then the measured load.
        browser.client.goto(page).await.expect("page");
        browser.client.goto(page).await.expect("page");
        let ms = browser.load_ms().await;
        timings.push(format!("{name}: {ms:.0} ms"));
        assert!(ms < 1000.0, "{name} took {ms:.0} ms with 100,000 rows ({page})");
    }
    assert_eq!(browser.text("#who").await, "operator:local (no token: loopback only)");
    println!("page loads with 100,000 parked rows: {}", timings.join(", "));
    browser.close().await;
    stop(console).await;
    env.cleanup().await;
}
