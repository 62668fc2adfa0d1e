//! The console's second round in a real browser (docs/console.md, "Round
//! two"): every parking's history, fix and retry, retry into another
//! queue, paced retries and the chart of failures over time, through what
//! a person sees and clicks, then the rows and queues behind it.

use std::time::{Duration, Instant};

use crate::common::browser::{Browser, http};
use crate::common::messages::measurement;
use crate::common::{TestEnv, TopologyFile, wait_for};
use crate::console::{WAIT, fill, row_id, stop, table};

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
    assert!(items[0].contains("parked, validation") && items[0].contains("iot-requeue-count 0"), "{items:?}");
    assert!(items[1].contains("retry to ") && items[1].contains("by operator:local"), "{items:?}");
    assert!(items[2].contains("parked, validation") && items[2].contains("iot-requeue-count 1"), "{items:?}");
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
