//! The inbox of events: the message ids the worker has applied, kept for
//! at least `INBOX_WINDOW_DAYS` and then forgotten a table at a time
//! (docs/reliability.md, "The inbox"; docs/architecture.md, "Growth").
//!
//! A generation is a table of ids, `inbox_gYYYYMMDD` by the UTC day whose
//! ids it holds: one a day, so the one written to, and its index of random
//! keys, holds at most a day of ids. An id is written into today's
//! generation (its primary key catches copies in one generation, two
//! workers' included) after a check against the others. A generation is
//! dropped once the one after it is a window old: every id in it was seen
//! at least a window ago. An id is therefore remembered for a window and
//! at most a day more.
//!
//! The id kept is the first 16 bytes of the SHA-256 of the message id, as
//! a `uuid`: 16 bytes however long the message id, and spread evenly.
//!
//! An older generation takes no new ids, so an hour after its day ended it
//! is sealed (a `CHECK (false) NOT VALID` constraint refuses any insert)
//! and its ids go into a [`Filter`]: one filter for the sealed generations
//! of each window of days (counted from 1970), added to by one worker a
//! generation at a time, kept in `inbox_filters` and held in every
//! worker's memory. An id is looked up in a window's sealed generations
//! only when its filter says maybe: most ids cost a probe or two of one or
//! two filters, and no lookup in the window's millions of older ids.

mod filter;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, PoisonError, RwLock};

use chrono::{DateTime, Days, NaiveDate, NaiveTime, TimeDelta, Utc};
use futures_util::TryStreamExt;
use sha2::{Digest, Sha256};
use sqlx::{Connection, PgConnection};

pub use filter::Filter;

/// How long after a generation stopped being the newest it is sealed: a
/// worker whose clock is behind by less than that still writes into it.
const SEAL_AFTER: TimeDelta = TimeDelta::hours(1);

/// The most ids a filter is made for: a filter takes 2 bytes an id in each
/// worker's memory. The generations of a window that would need more are
/// looked up in the database.
const MOST_FILTERED_IDS: u64 = 100_000_000;

/// The filter of a window's sealed generations.
#[derive(Debug)]
struct Bucket {
    /// The sealed generations whose ids it holds.
    days: Vec<NaiveDate>,
    filter: Filter,
}

/// The generations of one database, as this worker last read them.
#[derive(Debug)]
pub struct Inbox {
    window_days: u32,
    /// Begin days of the generations that exist, oldest first; `None`
    /// until read.
    known: RwLock<Option<Vec<NaiveDate>>>,
    /// The filters of the sealed generations, by the first day of their
    /// window.
    buckets: RwLock<HashMap<NaiveDate, Arc<Bucket>>>,
}

impl Inbox {
    pub fn new(window_days: u32) -> Inbox {
        Inbox {
            window_days,
            known: RwLock::new(None),
            buckets: RwLock::new(HashMap::new()),
        }
    }

    /// The first day of the window `day` is in: windows begin every
    /// `INBOX_WINDOW_DAYS` days counted from 1970-01-01.
    fn bucket_of(&self, day: NaiveDate) -> NaiveDate {
        let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
        let days = day.signed_duration_since(epoch).num_days().max(0) as u64;
        let window = u64::from(self.window_days.max(1));
        epoch + Days::new(days / window * window)
    }

    /// Records `ids` in today's generation, unless a generation has them
    /// already. Returns those that were new: of two copies of one id in
    /// `ids`, one.
    ///
    /// # Errors
    /// The database error: `42P01` (undefined table) when a generation is
    /// missing or gone; [`Inbox::upkeep`] mends that.
    pub async fn record(&self, conn: &mut PgConnection, ids: &[&str]) -> Result<HashSet<String>, sqlx::Error> {
        let today = Utc::now().date_naive();
        let known = self.generations(conn).await?;
        let buckets: Vec<Arc<Bucket>> = self
            .buckets
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        let mut by_key: HashMap<String, &str> = HashMap::new();
        // The ids a filter says its generations may hold, and those
        // generations: only there is a sealed generation looked in.
        let (mut maybes, mut maybe_in): (Vec<String>, Vec<NaiveDate>) = (Vec::new(), Vec::new());
        for id in ids {
            let bytes = key_bytes(id);
            let text = key_text(&bytes);
            let holders: Vec<&Bucket> = buckets
                .iter()
                .filter(|b| b.filter.may_contain(&bytes))
                .map(|b| &**b)
                .collect();
            if !holders.is_empty() {
                maybes.push(text.clone());
                maybe_in.extend(holders.iter().flat_map(|b| b.days.iter()));
            }
            by_key.insert(text, *id);
        }
        maybe_in.retain(|d| known.contains(d));
        maybe_in.sort();
        maybe_in.dedup();
        let unsealed: Vec<NaiveDate> = known
            .into_iter()
            .filter(|d| *d != today && !buckets.iter().any(|b| b.days.contains(d)))
            .collect();
        let keys: Vec<&String> = by_key.keys().collect();
        let mut query = sqlx::query_scalar(sqlx::AssertSqlSafe(record_sql(today, &unsealed, &maybe_in))).bind(keys);
        if !maybe_in.is_empty() {
            query = query.bind(&maybes);
        }
        let new: Vec<String> = query.fetch_all(&mut *conn).await?;
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
            .bind(today)
            .execute(&mut *conn)
            .await?;
        let mut dropped = Vec::new();
        let mut left = self.read(conn).await?;
        for (older, newer) in left.windows(2).map(|w| (w[0], w[1])) {
            if newer + Days::new(u64::from(self.window_days)) <= today {
                sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {}", table(older))))
                    .execute(&mut *conn)
                    .await?;
                dropped.push(older);
            }
        }
        if !dropped.is_empty() {
            left = self.read(conn).await?;
        }
        // A filter whose generations are all gone goes too; one with some
        // left keeps the others' bits, which only cost a wrong maybe.
        sqlx::query("DELETE FROM inbox_filters WHERE NOT (days && $1)")
            .bind(&left)
            .execute(&mut *conn)
            .await?;
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

    /// Seals each generation whose day ended [`SEAL_AFTER`] ago and adds
    /// its ids to its window's filter (unless another worker did), then
    /// holds the filters that changed. The generations are those the last
    /// [`Inbox::upkeep`] read. Returns those it took up: the first
    /// day of their window and their size in bytes.
    ///
    /// # Errors
    /// The database error.
    pub async fn seal(
        &self,
        conn: &mut PgConnection,
        now: DateTime<Utc>,
    ) -> Result<Vec<(NaiveDate, usize)>, sqlx::Error> {
        let mut taken = self.take_filters(conn).await?;
        let filtered: HashSet<NaiveDate> = self.sealed_days();
        let mut due: HashMap<NaiveDate, Vec<NaiveDate>> = HashMap::new();
        let known = self.generations(conn).await?;
        for generation in known {
            let closed = (generation + Days::new(1)).and_time(NaiveTime::MIN).and_utc();
            if now >= closed + SEAL_AFTER && !filtered.contains(&generation) {
                due.entry(self.bucket_of(generation)).or_default().push(generation);
            }
        }
        if due.is_empty() {
            return Ok(taken);
        }
        for (bucket, generations) in due {
            add_to_filter(conn, bucket, &generations, self.window_days).await?;
        }
        taken.extend(self.take_filters(conn).await?);
        Ok(taken)
    }

    /// The sealed generations whose ids the held filters hold.
    fn sealed_days(&self) -> HashSet<NaiveDate> {
        let buckets = self.buckets.read().unwrap_or_else(PoisonError::into_inner);
        buckets.values().flat_map(|b| b.days.iter().copied()).collect()
    }

    /// Reads the filters that are new or changed since this worker last
    /// took them, and lets go of those that are gone.
    async fn take_filters(&self, conn: &mut PgConnection) -> Result<Vec<(NaiveDate, usize)>, sqlx::Error> {
        let stored: Vec<(NaiveDate, Vec<NaiveDate>)> = sqlx::query_as("SELECT bucket, days FROM inbox_filters")
            .fetch_all(&mut *conn)
            .await?;
        let held = self.buckets.read().unwrap_or_else(PoisonError::into_inner).clone();
        let mut taken = Vec::new();
        let mut now_held = HashMap::new();
        for (bucket, days) in stored {
            if let Some(same) = held.get(&bucket).filter(|b| b.days == days) {
                now_held.insert(bucket, same.clone());
                continue;
            }
            let (hashes, bits): (i32, Vec<u8>) =
                sqlx::query_as("SELECT hashes, bits FROM inbox_filters WHERE bucket = $1 AND days = $2")
                    .bind(bucket)
                    .bind(&days)
                    .fetch_optional(&mut *conn)
                    .await?
                    .unwrap_or_default();
            if let Some(filter) = Filter::from_parts(hashes, &bits) {
                taken.push((bucket, filter.bytes()));
                now_held.insert(bucket, Arc::new(Bucket { days, filter }));
            }
        }
        *self.buckets.write().unwrap_or_else(PoisonError::into_inner) = now_held;
        Ok(taken)
    }

    /// The generations as last read, read now if never.
    async fn generations(&self, conn: &mut PgConnection) -> Result<Vec<NaiveDate>, sqlx::Error> {
        let known = self.known.read().unwrap_or_else(PoisonError::into_inner).clone();
        match known {
            Some(known) => Ok(known),
            None => self.read(conn).await,
        }
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
pub fn table(begins: NaiveDate) -> String {
    format!("inbox_g{}", begins.format("%Y%m%d"))
}

/// The statement that records the keys `$1` in `today`'s generation,
/// leaving out those in an `unsealed` older one (each key looked up) or in
/// a sealed one of `maybe_in` (only the keys `$2` looked up).
fn record_sql(today: NaiveDate, unsealed: &[NaiveDate], maybe_in: &[NaiveDate]) -> String {
    let mut checks: String = unsealed
        .iter()
        .map(|d| format!(" AND NOT EXISTS (SELECT 1 FROM {} o WHERE o.id = u.id)", table(*d)))
        .collect();
    if !maybe_in.is_empty() {
        let held: Vec<String> = maybe_in
            .iter()
            .map(|d| format!("SELECT o.id FROM {} o WHERE o.id = ANY($2::text[]::uuid[])", table(*d)))
            .collect();
        checks.push_str(&format!(" AND u.id NOT IN ({})", held.join(" UNION ALL ")));
    }
    format!(
        "INSERT INTO {} (id)
         SELECT u.id FROM UNNEST($1::text[]::uuid[]) AS u (id) WHERE true{checks}
         ORDER BY u.id
         ON CONFLICT (id) DO NOTHING
         RETURNING id::text",
        table(today)
    )
}

/// Seals `generations` (of the window beginning `bucket`) and adds their
/// ids to the window's filter, making it when it is the first: sized for a
/// window of days like these, a quarter more. One worker at a time; a
/// generation already in the filter is skipped. Nothing is added when the
/// filter would be made for more than [`MOST_FILTERED_IDS`].
async fn add_to_filter(
    conn: &mut PgConnection,
    bucket: NaiveDate,
    generations: &[NaiveDate],
    window_days: u32,
) -> Result<(), sqlx::Error> {
    for generation in generations {
        seal_table(conn, *generation).await?;
    }
    let mut tx = conn.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('inbox_filters'))")
        .execute(&mut *tx)
        .await?;
    let stored: Option<(Vec<NaiveDate>, i32, Vec<u8>)> =
        sqlx::query_as("SELECT days, hashes, bits FROM inbox_filters WHERE bucket = $1")
            .bind(bucket)
            .fetch_optional(&mut *tx)
            .await?;
    // A filter that cannot be read is made again: the days it held are
    // looked up in the database meanwhile.
    let (mut days, stored) = match stored.map(|(days, hashes, bits)| (days, Filter::from_parts(hashes, &bits))) {
        Some((days, Some(filter))) => (days, Some(filter)),
        _ => (Vec::new(), None),
    };
    let new: Vec<NaiveDate> = generations.iter().copied().filter(|g| !days.contains(g)).collect();
    if new.is_empty() {
        return Ok(());
    }
    let mut filter = match stored {
        Some(filter) => filter,
        None => {
            let ids = count_ids(&mut tx, &new).await?;
            let capacity = (ids / new.len() as u64 * u64::from(window_days) * 5 / 4)
                .max(ids)
                .max(100_000);
            if capacity > MOST_FILTERED_IDS {
                return Ok(());
            }
            Filter::with_capacity(capacity)
        }
    };
    read_into(&mut tx, &new, &mut filter).await?;
    days.extend(new);
    days.sort();
    let (hashes, bits) = filter.to_parts();
    sqlx::query(
        "INSERT INTO inbox_filters (bucket, days, hashes, bits) VALUES ($1, $2, $3, $4)
         ON CONFLICT (bucket) DO UPDATE SET days = EXCLUDED.days, hashes = EXCLUDED.hashes, bits = EXCLUDED.bits",
    )
    .bind(bucket)
    .bind(&days)
    .bind(hashes)
    .bind(bits)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// Seals a generation: the rows it has stay, any insert is refused. Its
/// own transaction: the seal waits for the last writers to commit, and
/// holds readers off only while it is added.
async fn seal_table(conn: &mut PgConnection, generation: NaiveDate) -> Result<(), sqlx::Error> {
    let seal = format!(
        "DO $$ BEGIN
             ALTER TABLE {} ADD CONSTRAINT inbox_sealed CHECK (false) NOT VALID;
         EXCEPTION WHEN duplicate_object THEN NULL;
         END $$",
        table(generation)
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(seal)).execute(conn).await?;
    Ok(())
}

/// Adds the ids of `generations` to `filter`.
async fn read_into(conn: &mut PgConnection, generations: &[NaiveDate], filter: &mut Filter) -> Result<(), sqlx::Error> {
    for generation in generations {
        let read = format!("SELECT uuid_send(id) FROM {}", table(*generation));
        let mut rows = sqlx::query_scalar::<_, Vec<u8>>(sqlx::AssertSqlSafe(read)).fetch(&mut *conn);
        while let Some(bytes) = rows.try_next().await? {
            if let Ok(key) = <[u8; 16]>::try_from(bytes.as_slice()) {
                filter.insert(&key);
            }
        }
    }
    Ok(())
}

/// How many ids `generations` hold together.
async fn count_ids(conn: &mut PgConnection, generations: &[NaiveDate]) -> Result<u64, sqlx::Error> {
    let mut ids = 0;
    for generation in generations {
        let sql = format!("SELECT count(*) FROM {}", table(*generation));
        let count: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&mut *conn)
            .await?;
        ids += count.unsigned_abs();
    }
    Ok(ids)
}

/// What the inbox keeps of a message id: the first 16 bytes of its
/// SHA-256 (what the migration computes in SQL).
fn key_bytes(message_id: &str) -> [u8; 16] {
    let digest = Sha256::digest(message_id.as_bytes());
    let mut key = [0; 16];
    key.copy_from_slice(&digest[..16]);
    key
}

/// A key written as a uuid.
fn key_text(key: &[u8; 16]) -> String {
    let hex = hex::encode(key);
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
    fn windows_of_filters_begin_every_window_counted_from_1970() {
        let inbox = Inbox::new(30);
        // 2026-12-06 is day 20,793 since 1970-01-01; 20,790 = 693 × 30.
        assert_eq!(inbox.bucket_of(day(2026, 12, 6)), day(2026, 12, 3));
        assert_eq!(inbox.bucket_of(day(2026, 12, 3)), day(2026, 12, 3));
        assert_eq!(inbox.bucket_of(day(2026, 12, 2)), day(2026, 11, 3));
        assert_eq!(Inbox::new(1).bucket_of(day(2026, 12, 6)), day(2026, 12, 6));
    }

    #[test]
    fn a_sealed_generation_is_looked_in_only_for_its_maybes() {
        let today = day(2026, 12, 6);
        let sql = record_sql(today, &[], &[]);
        assert!(sql.starts_with("INSERT INTO inbox_g20261206 (id)"), "{sql}");
        assert!(!sql.contains("inbox_g20261205"), "{sql}");
        let sql = record_sql(today, &[day(2026, 12, 5)], &[day(2026, 11, 20)]);
        assert!(
            sql.contains("NOT EXISTS (SELECT 1 FROM inbox_g20261205 o WHERE o.id = u.id)"),
            "every key looked up in an unsealed one: {sql}"
        );
        assert!(
            sql.contains("NOT IN (SELECT o.id FROM inbox_g20261120 o WHERE o.id = ANY($2::text[]::uuid[]))"),
            "only the maybes in a sealed one: {sql}"
        );
    }

    fn key(message_id: &str) -> String {
        key_text(&key_bytes(message_id))
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
