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
    "event_rows",
    "commands",
    "devices",
    "measurements",
    "beacon_readings",
    "outbox",
    "delivery_attempts",
    "operator_action_messages",
    "operator_actions",
    "parked_messages",
    "parkings",
    "message_edits",
    "inbox_filters",
    "_sqlx_migrations",
];

/// A database problem at start-up or in the admin tools.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("DATABASE_URL is not a valid PostgreSQL URL: {0}")]
    Url(#[source] sqlx::Error),
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(#[source] sqlx::Error),
    /// The server of `DATABASE_URL` cannot be reached or refuses the login:
    /// names the database (masked) and the first connection's own error.
    #[error("cannot connect to PostgreSQL, {0}")]
    Unreachable(DatabaseWait),
    #[error("running migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{what} failed: {source}")]
    Query {
        what: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

/// How long the first connection of [`connect`] may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens a pool of at most `size` connections.
///
/// One connection is opened first, alone: a pool retries a refused
/// connection until its acquire timeout and then says only "pool timed
/// out", where this says why (refused, DNS, authentication, TLS) and which
/// database.
///
/// # Errors
/// [`StoreError::Url`] or [`StoreError::Unreachable`].
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
    let unreachable = |source| StoreError::Unreachable(DatabaseWait::new(&options, &source));
    let first = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options))
        .await
        .unwrap_or_else(|_| Err(sqlx::Error::PoolTimedOut));
    first.map_err(unreachable)?.close().await.ok();
    PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options.clone())
        .await
        .map_err(unreachable)
}

/// Why a database cannot be reached, for the worker's log while it waits
/// at start and for its readiness: the database (no password) and the
/// cause (docs/operations.md, "The database at start").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseWait {
    /// `database 'NAME' on HOST:PORT as user 'USER'`.
    pub target: String,
    pub cause: Cause,
}

/// The cause of a failed connection, sorted so an operator knows where to
/// look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// Nothing listens on the port (the server is down or starting).
    Refused,
    /// The host name does not resolve.
    HostNotFound(String),
    /// The server refused the user or password.
    Authentication(String),
    /// The TLS handshake or the certificate failed.
    Tls(String),
    /// The database does not exist (the server is up).
    NoDatabase(String),
    /// No answer in time.
    Timeout,
    /// Anything else, as the client library says it.
    Other(String),
}

impl DatabaseWait {
    fn new(options: &PgConnectOptions, error: &sqlx::Error) -> DatabaseWait {
        DatabaseWait {
            target: describe_options(options),
            cause: Cause::of(error),
        }
    }
}

impl std::fmt::Display for DatabaseWait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.target, self.cause)
    }
}

impl Cause {
    /// Sorts a connection error.
    pub fn of(error: &sqlx::Error) -> Cause {
        match error {
            sqlx::Error::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Cause::Refused,
            sqlx::Error::Io(e) if e.kind() == std::io::ErrorKind::TimedOut => Cause::Timeout,
            sqlx::Error::Io(e) if e.to_string().contains("lookup") || e.to_string().contains("resolve") => {
                Cause::HostNotFound(e.to_string())
            }
            sqlx::Error::Tls(e) => Cause::Tls(e.to_string()),
            sqlx::Error::Database(db) => match db.code().as_deref() {
                Some("28P01" | "28000") => Cause::Authentication(db.message().to_owned()),
                Some("3D000") => Cause::NoDatabase(db.message().to_owned()),
                _ => Cause::Other(db.message().to_owned()),
            },
            sqlx::Error::PoolTimedOut => Cause::Timeout,
            other => Cause::Other(other.to_string()),
        }
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cause::Refused => write!(f, "connection refused (is PostgreSQL running there?)"),
            Cause::HostNotFound(e) => write!(f, "host not found (DNS): {e}"),
            Cause::Authentication(e) => write!(f, "authentication failed: {e}"),
            Cause::Tls(e) => write!(f, "TLS failed: {e}"),
            Cause::NoDatabase(e) => write!(f, "{e}"),
            Cause::Timeout => write!(f, "no answer within {CONNECT_TIMEOUT:?}"),
            Cause::Other(e) => write!(f, "{e}"),
        }
    }
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

/// Whether the database named in `url` exists (asked of the server's
/// `postgres` database, as [`create_database`] does); creates nothing.
///
/// # Errors
/// [`StoreError::Url`] or [`StoreError::Connect`].
pub async fn database_exists(url: &str) -> Result<bool, StoreError> {
    let _: PgConnectOptions = url.parse().map_err(StoreError::Url)?;
    Postgres::database_exists(url).await.map_err(StoreError::Connect)
}

/// Whether `table` exists in the connection's search path.
///
/// # Errors
/// [`StoreError::Query`].
pub async fn has_table(pool: &PgPool, table: &str) -> Result<bool, StoreError> {
    sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(table)
        .fetch_one(pool)
        .await
        .map_err(|source| StoreError::Query {
            what: "looking up a table",
            source,
        })
}

/// `database 'name' on host:port as user`, for messages that must say
/// which database they touch (no password).
///
/// # Errors
/// [`StoreError::Url`] for a URL that is not a PostgreSQL URL.
pub fn describe_database(url: &str) -> Result<String, StoreError> {
    let options: PgConnectOptions = url.parse().map_err(StoreError::Url)?;
    Ok(describe_options(&options))
}

fn describe_options(options: &PgConnectOptions) -> String {
    format!(
        "database '{}' on {}:{} as user '{}'",
        options.get_database().unwrap_or("postgres"),
        options.get_host(),
        options.get_port(),
        options.get_username()
    )
}

/// Drops every table the worker owns (see [`TABLES`]).
///
/// # Errors
/// A [`StoreError`] when the server cannot be reached or refuses.
pub async fn drop_tables(url: &str) -> Result<(), StoreError> {
    let mut conn = PgConnection::connect(url).await.map_err(StoreError::Connect)?;
    // The inbox's generations, by the names the worker gives them.
    let generations = crate::inbox::tables(&mut conn)
        .await
        .map_err(|source| StoreError::Query {
            what: "listing the inbox",
            source,
        })?;
    // The view `events` reads three of the tables: CASCADE drops it; each
    // table's partitions go with it. The functions outlive their tables:
    // the relay's trigger, and the makers of partitions and generations.
    let tables = TABLES.iter().copied().chain(generations.iter().map(String::as_str));
    let statements = [
        (
            "DROP TABLE",
            format!("DROP TABLE IF EXISTS {} CASCADE", tables.collect::<Vec<_>>().join(", ")),
        ),
        (
            "DROP FUNCTION",
            "DROP FUNCTION IF EXISTS outbox_notify(), day_partition(regclass, date), inbox_generation(date)".to_owned(),
        ),
    ];
    for (what, sql) in statements {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await
            .map_err(|source| StoreError::Query { what, source })?;
    }
    conn.close().await.ok();
    Ok(())
}

/// Stores events whose handler keeps no whole copy of them (device
/// status, record-only types) in `event_rows`, in one statement. The
/// inbox has filtered the duplicates.
///
/// # Errors
/// The database error; `23514` when a message's day has no partition.
pub(crate) async fn store_events(conn: &mut PgConnection, events: &[&Prepared]) -> Result<(), sqlx::Error> {
    let column = |f: fn(&Message) -> Option<&str>| events.iter().map(|p| f(&p.message)).collect::<Vec<_>>();
    let data: Vec<_> = events.iter().map(|p| sqlx::types::Json(&p.message.data)).collect();
    let times: Vec<_> = events.iter().map(|p| p.message.time).collect();
    sqlx::query(
        "INSERT INTO event_rows (message_id, type, actor, target, occurred_at, data)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::jsonb[])",
    )
    .bind(column(|m| Some(m.id.as_str())))
    .bind(events.iter().map(|p| p.route.message_type).collect::<Vec<_>>())
    .bind(column(|m| m.actor.as_deref()))
    .bind(column(|m| m.target.as_deref()))
    .bind(times)
    .bind(data)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records many commands in their inbox, `commands` (keyed by message id,
/// not partitioned: commands are few), in one statement, in message id
/// order (so two batches sharing ids lock them in the same order), each
/// with the device its handler found. Returns the ids that were new; an id
/// already there (or twice in `commands`) is a duplicate.
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
    use std::io;

    use super::*;

    /// Every table a migration creates and no later one makes a view (the
    /// old `events`), in file order.
    fn created_by_migrations() -> Vec<String> {
        let views = named_after("CREATE VIEW ");
        named_after("CREATE TABLE ")
            .into_iter()
            .filter(|t| !views.contains(t))
            .collect()
    }

    /// The names that follow `statement` at the start of a migration's line.
    fn named_after(statement: &str) -> Vec<String> {
        let mut files: Vec<_> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
            .expect("migrations/")
            .map(|e| e.expect("an entry").path())
            .collect();
        files.sort();
        files
            .iter()
            .flat_map(|f| {
                let sql = std::fs::read_to_string(f).expect("a migration");
                sql.lines()
                    .filter_map(|l| l.strip_prefix(statement))
                    .map(|rest| rest.split([' ', '(']).next().unwrap_or_default().to_owned())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn tables_names_every_table_the_migrations_create_and_the_role_script_moves_them() {
        let created = created_by_migrations();
        assert!(created.len() >= 12, "{created:?}");
        for table in &created {
            assert!(TABLES.contains(&table.as_str()), "store::TABLES leaves out {table}");
        }
        let script = include_str!("../deploy/postgres/move-to-worker-role.sql");
        for table in TABLES {
            assert!(
                script.contains(&format!("'{table}'")),
                "deploy/postgres/move-to-worker-role.sql does not move {table}"
            );
        }
    }

    #[test]
    fn a_connection_error_names_its_cause_and_no_pool_timeout() {
        let io = |kind, text: &str| sqlx::Error::Io(io::Error::new(kind, text.to_owned()));
        let refused = io(io::ErrorKind::ConnectionRefused, "Connection refused (os error 111)");
        assert_eq!(Cause::of(&refused), Cause::Refused);
        let dns = io(
            io::ErrorKind::Other,
            "failed to lookup address information: Name or service not known",
        );
        assert!(matches!(Cause::of(&dns), Cause::HostNotFound(_)));
        assert_eq!(Cause::of(&sqlx::Error::PoolTimedOut), Cause::Timeout);
        let options: PgConnectOptions = "postgres://iot:S3cret@db.example:6432/lot".parse().unwrap();
        let wait = DatabaseWait::new(&options, &refused);
        assert_eq!(
            wait.to_string(),
            "database 'lot' on db.example:6432 as user 'iot': connection refused (is PostgreSQL running there?)"
        );
        let error = StoreError::Unreachable(wait);
        assert!(!error.to_string().contains("S3cret") && !error.to_string().contains("pool"));
    }

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
