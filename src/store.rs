//! PostgreSQL: the pool, the migrations, database creation and removal,
//! and the inbox.

use std::time::Duration;

use sqlx::migrate::MigrateDatabase;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Postgres};

use crate::envelope::Message;
use crate::handlers::Prepared;

/// The embedded migrations (`migrations/`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// Every table the worker owns, for `delete_db`.
pub const TABLES: &[&str] = &[
    "events",
    "commands",
    "devices",
    "measurements",
    "beacon_readings",
    "outbox",
    "delivery_attempts",
    "operator_action_messages",
    "operator_actions",
    "parked_messages",
    "_sqlx_migrations",
];

/// A database problem at start-up or in the admin tools.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("DATABASE_URL is not a valid PostgreSQL URL: {0}")]
    Url(#[source] sqlx::Error),
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("running migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{what} failed: {source}")]
    Query {
        what: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

/// Opens a pool of at most `size` connections.
///
/// # Errors
/// [`StoreError::Url`] or [`StoreError::Connect`].
pub async fn connect(url: &str, size: u32) -> Result<PgPool, StoreError> {
    let options: PgConnectOptions = url.parse().map_err(StoreError::Url)?;
    // A row lock or a runaway statement must not hold a delivery (and the
    // messages queued behind a redelivered one) forever: both errors are
    // transient, so the message is retried later. The server also ends the
    // session of a worker it cannot reach (keepalives) or whose transaction
    // went quiet, so a partitioned worker does not hold row locks for the
    // others; the worker's own side is [`deadline`].
    let options = options.options([
        ("lock_timeout", "5s"),
        ("statement_timeout", "10s"),
        ("idle_in_transaction_session_timeout", "15s"),
        ("tcp_keepalives_idle", "5"),
        ("tcp_keepalives_interval", "2"),
        ("tcp_keepalives_count", "3"),
    ]);
    PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
        .map_err(StoreError::Connect)
}

/// How long the worker waits for one piece of database work (a whole
/// message transaction, or one bookkeeping statement). Server-side
/// timeouts cannot fire when the server is unreachable, and sqlx sets no
/// TCP keepalive: this deadline is what notices a silent partition.
pub const DEADLINE: Duration = Duration::from_secs(12);

/// Runs `work` within [`DEADLINE`]; past it, a transient I/O error (the
/// work is dropped: its transaction, if any, is rolled back by the server).
///
/// # Errors
/// `work`'s error, or the deadline's.
pub async fn deadline<T, E: From<sqlx::Error>>(work: impl Future<Output = Result<T, E>>) -> Result<T, E> {
    match tokio::time::timeout(DEADLINE, work).await {
        Ok(result) => result,
        Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer from PostgreSQL within {DEADLINE:?}"),
        ))
        .into()),
    }
}

/// A connection whose server answered 25006 (read-only transaction: the
/// primary was demoted, or a failover sent the worker to a standby) is
/// closed instead of going back to the pool, so the next transaction opens
/// a new connection, to wherever the primary is now (docs/reliability.md,
/// "Database failover"). The message itself is retried: 25006 is
/// transient.
pub fn close_if_read_only(conn: &mut PoolConnection<Postgres>, error: &sqlx::Error) {
    if let sqlx::Error::Database(db) = error
        && db.code().as_deref() == Some("25006")
    {
        conn.close_on_drop();
    }
}

/// Runs pending migrations.
///
/// # Errors
/// [`StoreError::Migrate`].
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Creates the database named in `url` if it does not exist (connecting to
/// the server's `postgres` database to do so, as `createdb` does). Returns
/// whether it was created.
///
/// # Errors
/// A [`StoreError`] when the URL is not a PostgreSQL URL, or the server
/// cannot be reached or refuses.
pub async fn create_database(url: &str) -> Result<bool, StoreError> {
    // Parsed first so that a bad URL is told apart from an unreachable server.
    let _: PgConnectOptions = url.parse().map_err(StoreError::Url)?;
    if Postgres::database_exists(url).await.map_err(StoreError::Connect)? {
        return Ok(false);
    }
    Postgres::create_database(url)
        .await
        .map_err(|source| StoreError::Query {
            what: "CREATE DATABASE",
            source,
        })?;
    Ok(true)
}

/// `database 'name' on host:port as user`, for messages that must say
/// which database they touch (no password).
///
/// # Errors
/// [`StoreError::Url`] for a URL that is not a PostgreSQL URL.
pub fn describe_database(url: &str) -> Result<String, StoreError> {
    let options: PgConnectOptions = url.parse().map_err(StoreError::Url)?;
    Ok(format!(
        "database '{}' on {}:{} as user '{}'",
        options.get_database().unwrap_or("postgres"),
        options.get_host(),
        options.get_port(),
        options.get_username()
    ))
}

/// Drops every table the worker owns (see [`TABLES`]).
///
/// # Errors
/// A [`StoreError`] when the server cannot be reached or refuses.
pub async fn drop_tables(url: &str) -> Result<(), StoreError> {
    let mut conn = PgConnection::connect(url).await.map_err(StoreError::Connect)?;
    let sql = format!("DROP TABLE IF EXISTS {} CASCADE", TABLES.join(", "));
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(&mut conn)
        .await
        .map_err(|source| StoreError::Query {
            what: "DROP TABLE",
            source,
        })?;
    // The relay's trigger function outlives its table.
    sqlx::query("DROP FUNCTION IF EXISTS outbox_notify()")
        .execute(&mut conn)
        .await
        .map_err(|source| StoreError::Query {
            what: "DROP FUNCTION",
            source,
        })?;
    conn.close().await.ok();
    Ok(())
}

/// Records many events in the inbox in one statement, in message id order
/// (so two batches sharing ids lock them in the same order). Returns the
/// ids that were new; an id already there (or twice in `events`) is a
/// duplicate.
///
/// # Errors
/// The database error.
pub(crate) async fn record_events_in_inbox(
    conn: &mut PgConnection,
    events: &[&Prepared],
) -> Result<std::collections::HashSet<String>, sqlx::Error> {
    let column = |f: fn(&Message) -> Option<&str>| events.iter().map(|p| f(&p.message)).collect::<Vec<_>>();
    let data: Vec<_> = events.iter().map(|p| sqlx::types::Json(&p.message.data)).collect();
    let times: Vec<_> = events.iter().map(|p| p.message.time).collect();
    sqlx::query_scalar(
        "INSERT INTO events (message_id, type, actor, target, occurred_at, data)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::jsonb[])
             AS e (message_id, type, actor, target, occurred_at, data)
         ORDER BY message_id
         ON CONFLICT (message_id) DO NOTHING
         RETURNING message_id",
    )
    .bind(column(|m| Some(m.id.as_str())))
    .bind(events.iter().map(|p| p.route.message_type).collect::<Vec<_>>())
    .bind(column(|m| m.actor.as_deref()))
    .bind(column(|m| m.target.as_deref()))
    .bind(times)
    .bind(data)
    .fetch_all(conn)
    .await
    .map(|ids: Vec<String>| ids.into_iter().collect())
}

/// Records many commands in the inbox in one statement, as
/// [`record_events_in_inbox`] does events, each with the device its handler
/// found. Returns the ids that were new.
///
/// # Errors
/// The database error.
pub(crate) async fn record_commands_in_inbox(
    conn: &mut PgConnection,
    commands: &[&Prepared],
) -> Result<std::collections::HashSet<String>, sqlx::Error> {
    let ids: Vec<&str> = commands.iter().map(|p| p.message.id.as_str()).collect();
    let types: Vec<&str> = commands.iter().map(|p| p.route.message_type).collect();
    let devices: Vec<Option<&str>> = commands.iter().map(|p| p.device_id.as_deref()).collect();
    let data: Vec<_> = commands.iter().map(|p| sqlx::types::Json(&p.message.data)).collect();
    sqlx::query_scalar(
        "INSERT INTO commands (message_id, type, device_id, data)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::jsonb[]) AS c (message_id, type, device_id, data)
         ORDER BY message_id
         ON CONFLICT (message_id) DO NOTHING
         RETURNING message_id",
    )
    .bind(ids)
    .bind(types)
    .bind(devices)
    .bind(data)
    .fetch_all(conn)
    .await
    .map(|ids: Vec<String>| ids.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::TABLES;

    /// The script that moves a superuser-migrated database to the worker's
    /// role names its tables one by one: every table the worker owns must
    /// be among them (docs/deployment.md).
    #[test]
    fn the_move_to_the_worker_role_names_every_table() {
        let script = include_str!("../deploy/postgres/move-to-worker-role.sql");
        for table in TABLES {
            assert!(script.contains(&format!("'{table}'")), "{table} is missing");
        }
    }
}
