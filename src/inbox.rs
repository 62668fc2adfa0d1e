//! The inbox of events: the message ids the worker has applied, kept for
//! at least `INBOX_WINDOW_DAYS` and then forgotten a table at a time
//! (docs/reliability.md, "The inbox"; docs/architecture.md, "Growth").
//!
//! A generation is a table of ids, `inbox_gYYYYMMDD` by the UTC day it
//! began. Generations begin every window on days counted from 1970-01-01,
//! so every worker with the same window writes into the same one. An id is
//! written into the newest generation (its primary key catches copies in
//! one generation, two workers' included) after a check against every
//! other. A generation is dropped once the one after it has been the
//! newest for a whole window: every id in it was seen at least a window
//! ago. An id is therefore remembered for one to two windows.
//!
//! The id kept is the first 16 bytes of the SHA-256 of the message id, as
//! a `uuid`: 16 bytes however long the message id, and spread evenly.

use std::collections::{HashMap, HashSet};
use std::sync::{PoisonError, RwLock};

use chrono::{Days, NaiveDate, Utc};
use sha2::{Digest, Sha256};
use sqlx::PgConnection;

/// The generations of one database, as this worker last read them.
#[derive(Debug)]
pub struct Inbox {
    window_days: u32,
    /// Begin days of the generations that exist, oldest first; `None`
    /// until read.
    known: RwLock<Option<Vec<NaiveDate>>>,
}

impl Inbox {
    pub fn new(window_days: u32) -> Inbox {
        Inbox {
            window_days,
            known: RwLock::new(None),
        }
    }

    /// The generation ids seen on `today` go into.
    pub fn current(&self, today: NaiveDate) -> NaiveDate {
        let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
        let days = today.signed_duration_since(epoch).num_days().max(0) as u64;
        let window = u64::from(self.window_days.max(1));
        epoch + Days::new(days / window * window)
    }

    /// Records `ids` in the newest generation, unless a generation has
    /// them already. Returns those that were new: of two copies of one id
    /// in `ids`, one.
    ///
    /// # Errors
    /// The database error: `42P01` (undefined table) when a generation is
    /// missing or gone; [`Inbox::upkeep`] mends that.
    pub async fn record(&self, conn: &mut PgConnection, ids: &[&str]) -> Result<HashSet<String>, sqlx::Error> {
        let current = self.current(Utc::now().date_naive());
        let known = match self.known() {
            Some(known) => known,
            None => self.read(conn).await?,
        };
        let others: Vec<NaiveDate> = known.into_iter().filter(|d| *d != current).collect();
        let not_elsewhere: String = others
            .iter()
            .map(|d| format!(" AND NOT EXISTS (SELECT 1 FROM {} o WHERE o.id = u.id)", table(*d)))
            .collect();
        let sql = format!(
            "INSERT INTO {} (id)
             SELECT u.id FROM UNNEST($1::text[]::uuid[]) AS u (id) WHERE true{not_elsewhere}
             ORDER BY u.id
             ON CONFLICT (id) DO NOTHING
             RETURNING id::text",
            table(current)
        );
        let by_key: HashMap<String, &str> = ids.iter().map(|id| (key(id), *id)).collect();
        let keys: Vec<&String> = by_key.keys().collect();
        let new: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(keys)
            .fetch_all(&mut *conn)
            .await?;
        Ok(new
            .iter()
            .filter_map(|k| by_key.get(k).map(|id| (*id).to_owned()))
            .collect())
    }

    /// Begins the generation of `today` if it is not there, drops those
    /// whose ids are all older than a window, and reads what is left.
    /// Returns the generations dropped.
    ///
    /// # Errors
    /// The database error.
    pub async fn upkeep(&self, conn: &mut PgConnection, today: NaiveDate) -> Result<Vec<NaiveDate>, sqlx::Error> {
        sqlx::query("SELECT inbox_generation($1)")
            .bind(self.current(today))
            .execute(&mut *conn)
            .await?;
        let mut dropped = Vec::new();
        for (older, newer) in self.read(conn).await?.windows(2).map(|w| (w[0], w[1])) {
            if newer + Days::new(u64::from(self.window_days)) <= today {
                sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {}", table(older))))
                    .execute(&mut *conn)
                    .await?;
                dropped.push(older);
            }
        }
        self.read(conn).await?;
        Ok(dropped)
    }

    /// Reads which generations exist.
    async fn read(&self, conn: &mut PgConnection) -> Result<Vec<NaiveDate>, sqlx::Error> {
        let names = tables(conn).await?;
        let mut days: Vec<NaiveDate> = names
            .iter()
            .filter_map(|n| NaiveDate::parse_from_str(n.strip_prefix("inbox_g")?, "%Y%m%d").ok())
            .collect();
        days.sort();
        *self.known.write().unwrap_or_else(PoisonError::into_inner) = Some(days.clone());
        Ok(days)
    }

    fn known(&self) -> Option<Vec<NaiveDate>> {
        self.known.read().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// The generations' tables, by the names [`table`] gives them, in the
/// schemas the connection sees.
///
/// # Errors
/// The database error.
pub(crate) async fn tables(conn: &mut PgConnection) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT relname::text FROM pg_class
          WHERE relkind = 'r' AND relname ~ '^inbox_g[0-9]{8}$' AND pg_table_is_visible(oid)",
    )
    .fetch_all(conn)
    .await
}

/// A generation's table.
fn table(begins: NaiveDate) -> String {
    format!("inbox_g{}", begins.format("%Y%m%d"))
}

/// What the inbox keeps of a message id: the first 16 bytes of its
/// SHA-256, written as a uuid (what the migration computes in SQL).
pub fn key(message_id: &str) -> String {
    let digest = Sha256::digest(message_id.as_bytes());
    let hex = hex::encode(&digest[..16]);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap()
    }

    #[test]
    fn generations_begin_every_window_counted_from_1970() {
        let inbox = Inbox::new(30);
        // 2026-12-06 is day 20,793 since 1970-01-01; 20,790 = 693 × 30.
        assert_eq!(inbox.current(day(2026, 12, 6)), day(2026, 12, 3));
        assert_eq!(inbox.current(day(2026, 12, 3)), day(2026, 12, 3));
        assert_eq!(inbox.current(day(2026, 12, 2)), day(2026, 11, 3));
        assert_eq!(Inbox::new(1).current(day(2026, 12, 6)), day(2026, 12, 6));
        assert_eq!(table(day(2026, 12, 3)), "inbox_g20261203");
    }

    #[test]
    fn a_key_is_the_head_of_the_sha256_as_a_uuid() {
        let k = key("m-1");
        assert_eq!(k.len(), 36);
        assert_eq!(k.matches('-').count(), 4);
        assert_eq!(k, key("m-1"));
        assert_ne!(k, key("m-2"));
        assert_eq!(
            k.replace('-', ""),
            hex::encode(&Sha256::digest(b"m-1")[..16]),
            "the first 16 bytes"
        );
    }
}
