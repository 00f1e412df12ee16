//! `[tokens] layout = "calendarserver"`: CalendarServer's own IMIP_TOKENS
//! table in its database. CalendarServer keeps minting a token per
//! (ORGANIZER, ATTENDEE, ICALUID) as it sends invitations; the milter reads
//! them and, as CalendarServer does, moves ACCESSED on use. The table is
//! read and written, never created or altered.
//!
//! The table has room for one token per (organizer, attendee, UID) and no
//! more: a token shared by several attendees is one row per attendee with
//! the same TOKEN, and takes the place of an earlier token of theirs for that
//! event. Attendees are written in lower case, as CalendarServer writes them.
//! No column remembers invitation Message-IDs: a bounce is believed when it
//! quotes the event's UID.

use super::{
    postgres::pool::{error_text, failed, ms, Pool},
    StoreError, StoreFuture, TokenRecord, TokenStore,
};
use crate::config::PoolLimits;
use tokio_postgres::{Client, Row};

/// ACCESSED is a UTC `timestamp`; CalendarServer's default leaves it set,
/// a NULL is taken as now (CalendarServer's purge never removes such a row).
const COLUMNS: &str = "token, organizer, attendee, icaluid, \
     (extract(epoch FROM coalesce(accessed, timezone('UTC', now()))) * 1000)::bigint";

/// Rows read for one token at most (the attendees of a shared token).
const MAX_ROWS: i64 = 1000;

pub struct CalendarServerTokens {
    pool: Pool,
}

impl CalendarServerTokens {
    /// Reads the settings; connects at first use.
    pub fn new(url: &str, password: Option<String>) -> Result<Self, StoreError> {
        Self::with_pool(url, password, PoolLimits::default())
    }

    /// As `new`, with the pool's size and wait as configured.
    pub fn with_pool(url: &str, password: Option<String>, limits: PoolLimits) -> Result<Self, StoreError> {
        Ok(Self {
            pool: Pool::new(url, password, limits, |c| Box::pin(verify(c)))?,
        })
    }
}

/// At first connection: the table is there with the columns this program uses.
async fn verify(client: &Client) -> Result<(), String> {
    client
        .query(
            "SELECT token, organizer, attendee, icaluid, accessed FROM imip_tokens LIMIT 0",
            &[],
        )
        .await
        .map(|_| ())
        .map_err(|e| {
            format!(
                "CalendarServer's table IMIP_TOKENS is not readable ({}): is tokens.url CalendarServer's database?",
                error_text(&e)
            )
        })
}

/// Rows ordered by token, one record per token. A token whose rows name
/// more than one organizer or event (written by hand or by other software)
/// is left out: it would let one event's attendee answer in another.
fn records(rows: &[Row]) -> Result<Vec<TokenRecord>, StoreError> {
    let mut out: Vec<TokenRecord> = Vec::new();
    let mut inconsistent: Vec<String> = Vec::new();
    for row in rows {
        let text = |i: usize| {
            row.try_get::<_, String>(i)
                .map_err(|e| failed("token database: IMIP_TOKENS row", e))
        };
        let (token, organizer, attendee, uid) = (text(0)?, text(1)?, text(2)?, text(3)?);
        let accessed = row
            .try_get::<_, i64>(4)
            .ok()
            .and_then(|v| u64::try_from(v).ok())
            .unwrap_or(0);
        match out.last_mut() {
            Some(r) if r.token == token => {
                if !r.organizer.eq_ignore_ascii_case(&organizer) || r.uid != uid {
                    inconsistent.push(token);
                    continue;
                }
                if !r.attendee.is_empty() {
                    let first = std::mem::take(&mut r.attendee);
                    r.attendees.push(first);
                }
                r.attendees.push(attendee);
                r.created_ms = r.created_ms.min(accessed);
                r.last_used_ms = r.last_used_ms.max(accessed);
            }
            _ => out.push(TokenRecord {
                token,
                organizer,
                attendee,
                uid,
                created_ms: accessed,
                last_used_ms: accessed,
                attendees: Vec::new(),
                invitations: Vec::new(),
            }),
        }
    }
    inconsistent.dedup();
    for t in &inconsistent {
        tracing::warn!(
            "token {} has IMIP_TOKENS rows for more than one organizer or event; it is refused until they agree",
            crate::address::token_prefix(t)
        );
    }
    out.retain(|r| !inconsistent.contains(&r.token));
    Ok(out)
}

fn one(rows: &[Row]) -> Result<Option<TokenRecord>, StoreError> {
    Ok(records(rows)?.into_iter().next())
}

impl TokenStore for CalendarServerTokens {
    fn get<'a>(&'a self, token: &'a str) -> StoreFuture<'a, Option<TokenRecord>> {
        Box::pin(async move {
            // IMIP_TOKENS_TOKEN indexes this.
            let sql = format!("SELECT {COLUMNS} FROM imip_tokens WHERE token = $1 ORDER BY attendee LIMIT $2");
            let rows = self
                .pool
                .with("lookup", async |c| c.query(&sql, &[&token, &MAX_ROWS]).await)
                .await?;
            one(&rows)
        })
    }

    fn find<'a>(&'a self, organizer: &'a str, attendee: &'a str, uid: &'a str) -> StoreFuture<'a, Option<TokenRecord>> {
        Box::pin(async move {
            // The primary key (ORGANIZER, ATTENDEE, ICALUID) serves both: the
            // organizer as written or in lower case, as CalendarServer writes it.
            let rows = if attendee.is_empty() {
                let sql = format!(
                    "SELECT {COLUMNS} FROM imip_tokens WHERE token = \
                     (SELECT token FROM imip_tokens WHERE organizer IN ($1::text, lower($1::text)) AND icaluid = $2 \
                      GROUP BY token HAVING count(*) > 1 ORDER BY max(accessed) DESC NULLS LAST LIMIT 1) \
                     ORDER BY attendee LIMIT $3"
                );
                self.pool
                    .with("lookup", async |c| c.query(&sql, &[&organizer, &uid, &MAX_ROWS]).await)
                    .await?
            } else {
                // The whole token the attendee has, shared or not: a put of
                // it must not lose the others' rows.
                let sql = format!(
                    "SELECT {COLUMNS} FROM imip_tokens WHERE token = \
                     (SELECT token FROM imip_tokens \
                      WHERE organizer IN ($1::text, lower($1::text)) AND attendee = lower($2::text) AND icaluid = $3 \
                      ORDER BY organizer DESC LIMIT 1) \
                     ORDER BY attendee LIMIT $4"
                );
                self.pool
                    .with("lookup", async |c| {
                        c.query(&sql, &[&organizer, &attendee, &uid, &MAX_ROWS]).await
                    })
                    .await?
            };
            one(&rows)
        })
    }

    fn put<'a>(&'a self, rec: &'a TokenRecord) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut attendees: Vec<String> = rec.allowed().iter().map(|a| a.to_lowercase()).collect();
            attendees.sort();
            attendees.dedup();
            let accessed = ms(rec.last_used_ms.max(rec.created_ms));
            // One statement: rows of this token that no longer belong to it
            // go, each attendee's row for the event takes this token.
            let sql = "WITH gone AS (DELETE FROM imip_tokens WHERE token = $1 \
                       AND NOT (organizer = $2 AND icaluid = $3 AND attendee = ANY($5::text[]))) \
                       INSERT INTO imip_tokens (token, organizer, attendee, icaluid, accessed) \
                       SELECT $1, $2, a, $3, timezone('UTC', to_timestamp($4::bigint / 1000.0)) \
                       FROM unnest($5::text[]) AS a \
                       ON CONFLICT (organizer, attendee, icaluid) \
                       DO UPDATE SET token = EXCLUDED.token, accessed = EXCLUDED.accessed";
            self.pool
                .with("write", async |c| {
                    c.execute(sql, &[&rec.token, &rec.organizer, &rec.uid, &accessed, &attendees])
                        .await
                })
                .await
                .map(|_| ())
        })
    }

    fn revoke<'a>(&'a self, token: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let n = self
                .pool
                .with("write", async |c| {
                    c.execute("DELETE FROM imip_tokens WHERE token = $1", &[&token]).await
                })
                .await?;
            Ok(n > 0)
        })
    }

    fn list(&self) -> StoreFuture<'_, Vec<TokenRecord>> {
        Box::pin(async move {
            let sql = format!("SELECT {COLUMNS} FROM imip_tokens ORDER BY token, attendee");
            let rows = self.pool.with("list", async |c| c.query(&sql, &[]).await).await?;
            let mut all = records(&rows)?;
            all.sort_by_key(|r| r.created_ms);
            Ok(all)
        })
    }

    fn purge<'a>(&'a self, cutoff_ms: u64) -> StoreFuture<'a, usize> {
        Box::pin(async move {
            let cutoff = ms(cutoff_ms);
            // Tokens, not rows: a shared token has a row per attendee.
            let row = self
                .pool
                .with("write", async |c| {
                    c.query_one(
                        "WITH gone AS (DELETE FROM imip_tokens \
                         WHERE accessed < timezone('UTC', to_timestamp($1::bigint / 1000.0)) RETURNING token) \
                         SELECT count(DISTINCT token) FROM gone",
                        &[&cutoff],
                    )
                    .await
                })
                .await?;
            let n = row.try_get::<_, i64>(0).unwrap_or(0);
            Ok(usize::try_from(n).unwrap_or(0))
        })
    }

    fn touch<'a>(&'a self, token: &'a str, now_ms: u64) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let now = ms(now_ms);
            self.pool
                .with("write", async |c| {
                    c.execute(
                        "UPDATE imip_tokens SET accessed = \
                         greatest(accessed, timezone('UTC', to_timestamp($2::bigint / 1000.0))) WHERE token = $1",
                        &[&token, &now],
                    )
                    .await
                })
                .await
                .map(|_| ())
        })
    }
}
