//! Local tokens in PostgreSQL (`[tokens] store = "postgres"`), shared by
//! every host of a site: the submission host that mints tokens and the MX
//! hosts that take the replies (DESIGN §4b). Here `layout = "own"`: the
//! program's own tables, created and versioned at first use; `pool.rs` holds
//! the connections both layouts use.

pub mod pool;

use super::{StoreError, StoreFuture, TokenRecord, TokenStore};
pub use crate::config::{Layout, PoolLimits};
use pool::{ms, Pool};
use tokio_postgres::{Client, Row};

/// The schema this program writes and reads.
const VERSION: i32 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS imip_milter_version (version integer NOT NULL);
CREATE TABLE IF NOT EXISTS imip_milter_tokens (
    token text PRIMARY KEY,
    organizer text NOT NULL,
    attendee text NOT NULL,
    uid text NOT NULL,
    created_ms bigint NOT NULL,
    last_used_ms bigint NOT NULL,
    attendees text[] NOT NULL DEFAULT '{}',
    invitations text[] NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS imip_milter_tokens_event
    ON imip_milter_tokens (lower(organizer), lower(attendee), uid);
INSERT INTO imip_milter_version SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM imip_milter_version);
";

const COLUMNS: &str = "token, organizer, attendee, uid, created_ms, last_used_ms, attendees, invitations";

/// Creates or checks the schema; several hosts may start at once.
async fn migrate(client: &Client) -> Result<(), String> {
    let text = |e: tokio_postgres::Error| pool::error_text(&e);
    client
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock(726373); {SCHEMA} COMMIT;"
        ))
        .await
        .map_err(text)?;
    let row = client
        .query_one("SELECT max(version) FROM imip_milter_version", &[])
        .await
        .map_err(text)?;
    let version: Option<i32> = row.try_get(0).map_err(|e| format!("imip_milter_version: {e}"))?;
    match version {
        Some(VERSION) => Ok(()),
        Some(v) => Err(format!("schema version {v}; this imip-milter knows {VERSION}")),
        None => Err("schema version missing".into()),
    }
}

fn record(row: &Row) -> Result<TokenRecord, StoreError> {
    let bad = |e| pool::failed("token database: imip_milter_tokens row", e);
    let u = |i: usize| {
        row.try_get::<_, i64>(i)
            .map(|v| u64::try_from(v).unwrap_or(0))
            .map_err(bad)
    };
    Ok(TokenRecord {
        token: row.try_get(0).map_err(bad)?,
        organizer: row.try_get(1).map_err(bad)?,
        attendee: row.try_get(2).map_err(bad)?,
        uid: row.try_get(3).map_err(bad)?,
        created_ms: u(4)?,
        last_used_ms: u(5)?,
        attendees: row.try_get(6).map_err(bad)?,
        invitations: row.try_get(7).map_err(bad)?,
    })
}

/// `layout = "own"`.
pub struct PostgresTokens {
    pool: Pool,
}

impl PostgresTokens {
    /// Reads the settings; connects at first use.
    pub fn new(url: &str, password: Option<String>) -> Result<Self, StoreError> {
        Self::with_pool(url, password, PoolLimits::default())
    }

    /// As `new`, with the pool's size and wait as configured.
    pub fn with_pool(url: &str, password: Option<String>, limits: PoolLimits) -> Result<Self, StoreError> {
        Ok(Self {
            pool: Pool::new(url, password, limits, |c| Box::pin(migrate(c)))?,
        })
    }
}

impl TokenStore for PostgresTokens {
    fn get<'a>(&'a self, token: &'a str) -> StoreFuture<'a, Option<TokenRecord>> {
        Box::pin(async move {
            let sql = format!("SELECT {COLUMNS} FROM imip_milter_tokens WHERE token = $1");
            let row = self
                .pool
                .with("lookup", async |c| c.query_opt(&sql, &[&token]).await)
                .await?;
            row.as_ref().map(record).transpose()
        })
    }

    fn find<'a>(&'a self, organizer: &'a str, attendee: &'a str, uid: &'a str) -> StoreFuture<'a, Option<TokenRecord>> {
        Box::pin(async move {
            let sql = format!(
                "SELECT {COLUMNS} FROM imip_milter_tokens \
                 WHERE lower(organizer) = lower($1) AND lower(attendee) = lower($2) AND uid = $3 \
                 ORDER BY created_ms DESC LIMIT 1"
            );
            let row = self
                .pool
                .with("lookup", async |c| {
                    c.query_opt(&sql, &[&organizer, &attendee, &uid]).await
                })
                .await?;
            row.as_ref().map(record).transpose()
        })
    }

    fn put<'a>(&'a self, rec: &'a TokenRecord) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let sql = format!(
                "INSERT INTO imip_milter_tokens ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (token) DO UPDATE SET organizer = EXCLUDED.organizer, attendee = EXCLUDED.attendee, \
                 uid = EXCLUDED.uid, created_ms = EXCLUDED.created_ms, last_used_ms = EXCLUDED.last_used_ms, \
                 attendees = EXCLUDED.attendees, invitations = EXCLUDED.invitations"
            );
            let (created, used) = (ms(rec.created_ms), ms(rec.last_used_ms));
            self.pool
                .with("write", async |c| {
                    c.execute(
                        &sql,
                        &[
                            &rec.token,
                            &rec.organizer,
                            &rec.attendee,
                            &rec.uid,
                            &created,
                            &used,
                            &rec.attendees,
                            &rec.invitations,
                        ],
                    )
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
                    c.execute("DELETE FROM imip_milter_tokens WHERE token = $1", &[&token])
                        .await
                })
                .await?;
            Ok(n > 0)
        })
    }

    fn list(&self) -> StoreFuture<'_, Vec<TokenRecord>> {
        Box::pin(async move {
            let sql = format!("SELECT {COLUMNS} FROM imip_milter_tokens ORDER BY created_ms");
            let rows = self.pool.with("list", async |c| c.query(&sql, &[]).await).await?;
            rows.iter().map(record).collect()
        })
    }

    fn purge<'a>(&'a self, cutoff_ms: u64) -> StoreFuture<'a, usize> {
        Box::pin(async move {
            let cutoff = ms(cutoff_ms);
            let n = self
                .pool
                .with("write", async |c| {
                    c.execute(
                        "DELETE FROM imip_milter_tokens WHERE GREATEST(last_used_ms, created_ms) < $1",
                        &[&cutoff],
                    )
                    .await
                })
                .await?;
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        })
    }

    fn touch<'a>(&'a self, token: &'a str, now_ms: u64) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let now = ms(now_ms);
            self.pool
                .with("write", async |c| {
                    c.execute(
                        "UPDATE imip_milter_tokens SET last_used_ms = GREATEST(last_used_ms, $2) WHERE token = $1",
                        &[&token, &now],
                    )
                    .await
                })
                .await
                .map(|_| ())
        })
    }
}
