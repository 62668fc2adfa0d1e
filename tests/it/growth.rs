//! Growth (docs/architecture.md, "Growth"): a reading dated outside every
//! partition is stored, retention drops whole partitions while ingest goes
//! on, a duplicate is caught after the inbox's generation and the reading's
//! partition rolled over, a sealed generation is checked through its filter,
//! and the migration keeps every row of a filled database.

use std::time::Duration;

use chrono::{DateTime, Days, NaiveDate, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;
use worker_iot_core::ErrorKind;
use worker_iot_core::headers::RETRY_COUNT;

use crate::common::messages::{body, measurement_at};
use crate::common::{TestEnv, TopologyFile, wait_for};

const WAIT: Duration = Duration::from_secs(60);

fn days_ago(days: u64) -> DateTime<Utc> {
    Utc::now() - Days::new(days)
}

fn day_name(table: &str, day: NaiveDate) -> String {
    format!("{table}_p{}", day.format("%Y%m%d"))
}

/// The partition each row of `table` (keyed by `message_id`) is in.
async fn partition_of(env: &TestEnv, table: &str, id: &str) -> String {
    let sql = format!("SELECT tableoid::regclass::text FROM {table} WHERE message_id = $1");
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_one(&env.pool)
        .await
        .unwrap_or_else(|e| panic!("{id} in {table}: {e}"))
}

/// Nothing parked, nothing left in the queue.
async fn nothing_parked(env: &TestEnv) {
    assert_eq!(env.queue_len(&env.queue).await, 0);
    assert_eq!(env.queue_len(&env.dlq()).await, 0, "nothing parked");
    assert_eq!(
        env.count("parked_messages WHERE status = 'parked'").await,
        0,
        "nothing parked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_dated_400_days_back_and_a_year_ahead_are_stored_not_parked() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let (old, ahead) = (days_ago(400), Utc::now() + Days::new(365));
    let device_up = |id: &str, time: DateTime<Utc>| {
        body(json!({"type": "DEVICE_UP", "id": id, "time": time.to_rfc3339(), "data": {"device_id": "d9"}}))
    };
    let props = BasicProperties::default;
    env.publish(&measurement_at("old", 1.0, old), props()).await;
    env.publish(&measurement_at("ahead", 2.0, ahead), props()).await;
    env.publish(&device_up("old-up", old), props()).await;
    let worker = env.spawn_worker(&[]);
    env.wait_for_rows("events", 3, WAIT).await;
    // A copy of the old reading, after its partition was made: caught.
    env.publish(&measurement_at("old", 9.0, old), props()).await;
    wait_for("the copy acked as a duplicate", WAIT, || async {
        (worker.metrics.duplicates() == 1).then_some(())
    })
    .await;
    worker.stop().await;

    assert_eq!(
        partition_of(&env, "measurements", "old").await,
        day_name("measurements", old.date_naive())
    );
    assert_eq!(
        partition_of(&env, "measurements", "ahead").await,
        day_name("measurements", ahead.date_naive())
    );
    assert_eq!(
        partition_of(&env, "event_rows", "old-up").await,
        day_name("event_rows", old.date_naive())
    );
    let old_value: f64 = sqlx::query_scalar("SELECT value FROM measurements WHERE message_id = 'old'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(old_value, 1.0, "the first copy is the one applied");
    assert_eq!(env.count("events").await, 3);
    nothing_parked(&env).await;
    env.cleanup().await;
}

/// The day partitions of the three partitioned tables older than `day`.
async fn partitions_before(env: &TestEnv, day: NaiveDate) -> Vec<String> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i
           JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent
          WHERE p.relname IN ('measurements', 'beacon_readings', 'event_rows') ORDER BY 1",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let cutoff = day.format("%Y%m%d").to_string();
    names
        .into_iter()
        .filter(|n| n.rsplit('p').next().is_some_and(|d| *d < *cutoff))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_old_partitions_while_ingest_goes_on_and_keeps_every_kept_reading() {
    const KEPT: u64 = 5;
    const PER_DAY: i64 = 50;
    const LIVE: i64 = 3000;
    let env = TestEnv::new(&TopologyFile::fast()).await;
    // Ten days of stored readings and events, 1 to 10 days old.
    for ago in 1..=10u64 {
        let day = days_ago(ago);
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "SELECT day_partition(t, '{d}') FROM UNNEST(ARRAY['measurements', 'event_rows']::regclass[]) t;
             INSERT INTO measurements (message_id, device_id, sensor, value, measured_at)
             SELECT 'stored-{ago}-' || g, 'd1', 't', g, '{t}' FROM generate_series(1, {PER_DAY}) g;
             INSERT INTO event_rows (message_id, type, occurred_at, data)
             SELECT 'up-{ago}-' || g, 'DEVICE_UP', '{t}', '{{}}' FROM generate_series(1, {PER_DAY}) g;",
            d = day.date_naive(),
            t = day.to_rfc3339()
        )))
        .execute(&env.pool)
        .await
        .expect("stored rows");
    }
    let cutoff = Utc::now().date_naive() - Days::new(KEPT);
    assert_eq!(partitions_before(&env, cutoff).await.len(), 10, "days 6 to 10 ago");

    // A worker that keeps everything ingests readings of the kept days;
    // a second, with retention on, starts while it does.
    let publish = |range: std::ops::Range<i64>| {
        let env = &env;
        async move {
            for i in range {
                let time = days_ago(i as u64 % (KEPT - 1));
                env.publish(
                    &measurement_at(&format!("live-{i}"), i, time),
                    BasicProperties::default(),
                )
                .await;
            }
        }
    };
    let keeper = env.spawn_worker(&[]);
    publish(0..LIVE / 3).await;
    let retention = env.spawn_worker(&[("TELEMETRY_RETENTION_DAYS", "5")]);
    publish(LIVE / 3..LIVE).await;

    let kept_stored = KEPT as i64 * PER_DAY;
    env.wait_for_rows("measurements", LIVE + kept_stored, WAIT).await;
    wait_for("retention to drop the old days", WAIT, || async {
        partitions_before(&env, cutoff).await.is_empty().then_some(())
    })
    .await;
    let rendered = retention.metrics.render();
    keeper.stop().await;
    retention.stop().await;

    assert_eq!(env.count("measurements WHERE message_id LIKE 'live-%'").await, LIVE);
    assert_eq!(
        env.count("(SELECT DISTINCT message_id FROM measurements) m").await,
        LIVE + kept_stored
    );
    assert_eq!(env.count("event_rows").await, kept_stored, "the kept days' events");
    for ago in 1..=KEPT {
        assert_eq!(
            env.count(&format!("measurements WHERE message_id LIKE 'stored-{ago}-%'"))
                .await,
            PER_DAY,
            "{ago} days ago is kept"
        );
    }
    assert_eq!(env.count("measurements WHERE message_id LIKE 'stored-6-%'").await, 0);
    nothing_parked(&env).await;
    assert!(rendered.contains("iot_telemetry_retention_days 5"), "{rendered}");
    assert!(
        rendered.contains("iot_telemetry_retention_last_run_timestamp_seconds"),
        "{rendered}"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_is_caught_after_its_generation_and_partition_rolled_over_on_every_path() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    let yesterday = days_ago(1);
    let worker = env.spawn_worker(&[("INBOX_WINDOW_DAYS", "1")]);
    for i in 1..=4 {
        env.publish(
            &measurement_at(&format!("r-{i}"), i, yesterday),
            BasicProperties::default(),
        )
        .await;
    }
    env.wait_for_rows("measurements", 4, WAIT).await;

    // The day turns: today's generation becomes yesterday's, under the
    // running worker, which knows only today's.
    let (today, before) = (Utc::now().date_naive(), yesterday.date_naive());
    let rename = format!(
        "ALTER TABLE inbox_g{} RENAME TO inbox_g{}",
        today.format("%Y%m%d"),
        before.format("%Y%m%d")
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(rename))
        .execute(&env.pool)
        .await
        .expect("today's generation holds the four ids");

    let copy = |i: u32| measurement_at(&format!("r-{i}"), 100, Utc::now());
    // Bulk: with new readings, published at once.
    env.publish(&copy(1), BasicProperties::default()).await;
    for id in ["n-1", "n-2"] {
        env.publish(&measurement_at(id, 5, Utc::now()), BasicProperties::default())
            .await;
    }
    // Alone, once the rest settled.
    env.wait_for_rows("measurements", 6, WAIT).await;
    env.publish(&copy(2), BasicProperties::default()).await;
    // As a retry copy.
    let mut retry = FieldTable::default();
    retry.insert(RETRY_COUNT.into(), AMQPValue::LongLongInt(1));
    env.publish(&copy(3), BasicProperties::default().with_headers(retry))
        .await;
    // Requeued by an operator from the parking lot.
    env.park(&copy(4), "r-4", ErrorKind::Transient, "db down").await;
    env.run_requeue(&[]);
    wait_for("four copies acked as duplicates", WAIT, || async {
        (worker.metrics.duplicates() == 4).then_some(())
    })
    .await;
    worker.stop().await;

    let values: Vec<(String, f64)> = sqlx::query_as("SELECT message_id, value FROM measurements ORDER BY message_id")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    let expected: Vec<(String, f64)> = [
        ("n-1", 5.0),
        ("n-2", 5.0),
        ("r-1", 1.0),
        ("r-2", 2.0),
        ("r-3", 3.0),
        ("r-4", 4.0),
    ]
    .into_iter()
    .map(|(id, v)| (id.to_owned(), v))
    .collect();
    assert_eq!(values, expected, "each applied once, the first copy");
    for i in 1..=4 {
        assert_eq!(
            partition_of(&env, "measurements", &format!("r-{i}")).await,
            day_name("measurements", before)
        );
    }
    let generation = |day: NaiveDate| format!("inbox_g{}", day.format("%Y%m%d"));
    assert_eq!(env.count(&generation(before)).await, 4);
    assert_eq!(env.count(&generation(today)).await, 2, "only the new readings");
    nothing_parked(&env).await;
    env.cleanup().await;
}

/// The schema as it was before growth: every migration but the last.
async fn migrate_to_before_growth(env: &TestEnv) {
    worker_iot_core::store::drop_tables(&env.database_url)
        .await
        .expect("an empty database");
    let dir = env.dir.join("migrations-before-growth");
    std::fs::create_dir_all(&dir).unwrap();
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations");
    for file in std::fs::read_dir(source).unwrap() {
        let path = file.unwrap().path();
        let name = path.file_name().unwrap().to_owned();
        if name.to_string_lossy().as_ref() < "20260107000000" {
            std::fs::copy(&path, dir.join(name)).unwrap();
        }
    }
    sqlx::migrate::Migrator::new(dir.as_path())
        .await
        .expect("the migrations before growth")
        .run(&env.pool)
        .await
        .expect("migrated to before growth");
}

/// What a user reads, in an order and a form that survive the migration.
const READ_BACK: &str = "SELECT md5(string_agg(
        concat_ws('|', message_id, type, (extract(epoch FROM occurred_at) * 1000)::bigint,
                  data->>'device_id', data->>'sensor', (data->>'value')::float8, data->>'unit',
                  data->>'mac_address', data->>'rssi', data->>'ip'),
        ',' ORDER BY message_id)) FROM events";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_migration_keeps_every_row_of_a_filled_database_and_its_ids() {
    const N: i64 = 3000;
    let env = TestEnv::new(&TopologyFile::fast()).await;
    migrate_to_before_growth(&env).await;
    // A database as the worker filled it: readings with their events,
    // device status, beacons and commands over 90 days.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO events (message_id, type, occurred_at, data, received_at)
         SELECT 'm-' || g, 'MEASUREMENT', now() - g * interval '43 minutes',
                jsonb_build_object('device_id', 'd' || g % 7, 'sensor', 't', 'value', g / 10.0, 'unit', 'C'),
                now() - g * interval '43 minutes' FROM generate_series(1, {N}) g;
         INSERT INTO measurements (message_id, device_id, sensor, value, unit, measured_at)
         SELECT message_id, data->>'device_id', data->>'sensor', (data->>'value')::float8, data->>'unit', occurred_at
           FROM events WHERE type = 'MEASUREMENT';
         INSERT INTO events (message_id, type, occurred_at, data, received_at)
         SELECT 'b-' || g, 'IBEACON_CHANGE', now() - g * interval '1 hour',
                jsonb_build_object('mac_address', '0a:1b:2c:3d:4e:5f', 'uuid', 'f7826da6-4fa2-4e98-8024-bc5b71e0893e',
                                   'major', 1, 'minor', g, 'tx_power', -59, 'rssi', -60),
                now() - g * interval '1 hour' FROM generate_series(1, 300) g;
         INSERT INTO beacon_readings (message_id, mac_address, uuid, major, minor, tx_power, rssi, observed_at)
         SELECT message_id, data->>'mac_address', data->>'uuid', 1, (data->>'minor')::int, -59, -60, occurred_at
           FROM events WHERE type = 'IBEACON_CHANGE';
         INSERT INTO events (message_id, type, occurred_at, data, received_at)
         SELECT 'up-' || g, 'DEVICE_UP', now() - g * interval '2 hours',
                jsonb_build_object('device_id', 'd' || g, 'ip', '10.0.0.' || g % 250), now() - g * interval '2 hours'
           FROM generate_series(1, 500) g;
         INSERT INTO commands (message_id, type, device_id, data)
         SELECT 'c-' || g, 'SET_LED', 'd' || g, '{{\"state\": \"on\"}}' FROM generate_series(1, 50) g;"
    )))
    .execute(&env.pool)
    .await
    .expect("the filled database");
    let before: Option<String> = sqlx::query_scalar(READ_BACK).fetch_one(&env.pool).await.unwrap();
    let totals = "(SELECT count(*) FROM events) + (SELECT count(*) FROM measurements) * 1000
                  + (SELECT count(*) FROM beacon_readings) * 1000000";
    let total_before: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT {totals}")))
        .fetch_one(&env.pool)
        .await
        .unwrap();

    worker_iot_core::store::migrate(&env.pool)
        .await
        .expect("the growth migration");

    let after: Option<String> = sqlx::query_scalar(READ_BACK).fetch_one(&env.pool).await.unwrap();
    assert_eq!(after, before, "every event reads back as it was");
    let total_after: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT {totals}")))
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(total_after, total_before);
    assert_eq!(env.count("events").await, N + 800);
    assert_eq!(env.count("event_rows").await, 500, "only what no typed table keeps");
    assert_eq!(env.count("commands").await, 50);

    // An id seen in the last 60 days is still a duplicate; a new one is
    // stored.
    let worker = env.spawn_worker(&[]);
    env.publish(&measurement_at("m-100", -1, days_ago(3)), BasicProperties::default())
        .await;
    env.publish(&measurement_at("m-new", -1, Utc::now()), BasicProperties::default())
        .await;
    env.wait_for_rows("measurements", N + 1, WAIT).await;
    wait_for("the old id acked as a duplicate", WAIT, || async {
        (worker.metrics.duplicates() == 1).then_some(())
    })
    .await;
    worker.stop().await;
    assert_eq!(env.count("measurements WHERE value = -1").await, 1, "only m-new");
    nothing_parked(&env).await;
    env.cleanup().await;
}

/// The key the inbox keeps of a message id, computed in SQL.
const KEY_SQL: &str = "encode(substring(sha256(convert_to($1, 'UTF8')) FROM 1 FOR 16), 'hex')::uuid";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_generation_is_checked_through_its_filter_and_takes_no_new_id() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    // The generation of two days ago: its day ended yesterday at
    // midnight, more than an hour ago.
    let sealed_day = days_ago(2).date_naive();
    let sealed = format!("inbox_g{}", sealed_day.format("%Y%m%d"));
    sqlx::query("SELECT inbox_generation($1)")
        .bind(sealed_day)
        .execute(&env.pool)
        .await
        .unwrap();
    // Fixed ids, so the filter is the same in every run.
    let fill = format!("INSERT INTO {sealed} SELECT md5('fill-' || g)::uuid FROM generate_series(1, 20000) g");
    sqlx::raw_sql(sqlx::AssertSqlSafe(fill))
        .execute(&env.pool)
        .await
        .unwrap();
    let remember = format!("INSERT INTO {sealed} VALUES ({KEY_SQL})");
    for i in 1..=3 {
        sqlx::query(sqlx::AssertSqlSafe(remember.clone()))
            .bind(format!("old-{i}"))
            .execute(&env.pool)
            .await
            .unwrap();
    }

    // The worker's start seals it and builds its filter.
    let worker = env.spawn_worker(&[]);
    env.publish(&measurement_at("n-1", 5, Utc::now()), BasicProperties::default())
        .await;
    env.wait_for_rows("measurements", 1, WAIT).await;
    let (days, bytes): (Vec<NaiveDate>, i64) =
        sqlx::query_as("SELECT days, length(bits)::int8 FROM inbox_filters WHERE $1 = ANY (days)")
            .bind(sealed_day)
            .fetch_one(&env.pool)
            .await
            .expect("the sealed generation's ids are in a stored filter");
    // (With the generation the migration began, empty here.)
    assert!(
        days.contains(&sealed_day) && !days.contains(&Utc::now().date_naive()),
        "{days:?}"
    );
    assert!(bytes >= 20_003 * 2, "2 bytes an id at least: {bytes}");
    let refused = sqlx::query(sqlx::AssertSqlSafe(remember.clone()))
        .bind("late")
        .execute(&env.pool)
        .await
        .expect_err("a sealed generation takes no new id");
    assert!(refused.to_string().contains("inbox_sealed"), "{refused}");

    // Copies of what it holds are duplicates, in a batch and alone.
    for id in ["old-1", "old-2", "n-2"] {
        env.publish(&measurement_at(id, 100, Utc::now()), BasicProperties::default())
            .await;
    }
    env.wait_for_rows("measurements", 2, WAIT).await;
    env.publish(&measurement_at("old-3", 100, Utc::now()), BasicProperties::default())
        .await;
    wait_for("three copies acked as duplicates", WAIT, || async {
        (worker.metrics.duplicates() == 3).then_some(())
    })
    .await;

    // The filter, not the table, decides: an id slipped into the sealed
    // table behind the filter's back is not found.
    let slip = format!(
        "ALTER TABLE {sealed} DROP CONSTRAINT inbox_sealed;
         INSERT INTO {sealed} VALUES (encode(substring(sha256('slipped') FROM 1 FOR 16), 'hex')::uuid)"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(slip))
        .execute(&env.pool)
        .await
        .unwrap();
    env.publish(&measurement_at("slipped", 7, Utc::now()), BasicProperties::default())
        .await;
    env.wait_for_rows("measurements", 3, WAIT).await;
    worker.stop().await;

    let ids: Vec<String> = sqlx::query_scalar("SELECT message_id FROM measurements ORDER BY message_id")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(ids, ["n-1", "n-2", "slipped"], "the copies applied nothing");
    let today = format!("inbox_g{}", Utc::now().format("%Y%m%d"));
    assert_eq!(env.count(&today).await, 3, "the new ids went into today's generation");
    nothing_parked(&env).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_is_open_and_has_read_todays_partitions_before_the_first_delivery() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    // A pool of 6: the worker opens all 6 at start.
    let worker = env.spawn_worker(&[("DATABASE_MAX_CONNECTIONS", "6")]);
    worker.wait_ready(&env).await;
    let warmed = "SELECT count(*) FROM pg_stat_activity
                   WHERE datname = current_database() AND pid <> pg_backend_pid()
                     AND query LIKE 'SELECT 1 FROM measurements WHERE measured_at >= $1%'";
    // Most are still idle after their first statement (the keeper and
    // the parking lot may have used one or two since).
    let n: i64 = sqlx::query_scalar(warmed).fetch_one(&env.pool).await.unwrap();
    assert!(n >= 4, "{n} connections warmed before any delivery");
    env.publish(&measurement_at("m-1", 1, Utc::now()), BasicProperties::default())
        .await;
    env.wait_for_rows("measurements", 1, WAIT).await;
    worker.stop().await;
    nothing_parked(&env).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_workers_beginning_the_same_generation_at_once_all_succeed() {
    let env = TestEnv::new(&TopologyFile::fast()).await;
    // What every worker's first batch after midnight does at once.
    for round in 0..10u64 {
        let day = Utc::now().date_naive() + Days::new(10 + round);
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let pool = env.pool.clone();
                tokio::spawn(async move {
                    sqlx::query("SELECT inbox_generation($1)")
                        .bind(day)
                        .execute(&pool)
                        .await
                })
            })
            .collect();
        for call in calls {
            call.await.unwrap().expect("each call succeeds");
        }
        assert_eq!(env.count(&format!("inbox_g{}", day.format("%Y%m%d"))).await, 0);
    }
    env.cleanup().await;
}
