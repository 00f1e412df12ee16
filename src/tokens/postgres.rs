//! Local tokens in PostgreSQL (`[tokens] store = "postgres"`), shared by
//! every host of a site: the submission host that mints tokens and the MX
//! hosts that take the replies (DESIGN §4b). Here the connection pool, which
//! both layouts use, and `layout = "own"`: the program's own tables, created
//! and versioned at first use. Connections are made lazily and kept in a
//! small pool; every call is bounded in time, and an outage is logged once,
//! when it starts and when it ends.

use super::{StoreError, StoreFuture, TokenRecord, TokenStore};
pub use crate::config::{Layout, PoolLimits};
use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};
use tokio::sync::{Mutex, Semaphore};
use tokio_postgres::{tls::MakeTlsConnect, Client, NoTls, Row, Socket};

/// Connecting and one statement at most; then the caller answers 451.
const TIMEOUT: Duration = Duration::from_secs(3);

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

/// Lazily opened connections to the token database, bounded in number and time.
pub(super) struct Pool {
    config: tokio_postgres::Config,
    /// When the URL asks for TLS: the verifying rustls configuration.
    tls: Option<super::tls::MakeRustls>,
    layout: Layout,
    /// For messages: the URL as configured (it holds no password).
    url: String,
    idle: Mutex<Vec<Client>>,
    slots: Semaphore,
    limits: PoolLimits,
    ready: AtomicBool,
    down: AtomicBool,
}

impl Pool {
    /// Reads the settings; connects at first use.
    pub(super) fn new(
        url: &str,
        password: Option<String>,
        layout: Layout,
        limits: PoolLimits,
    ) -> Result<Self, StoreError> {
        let asked = crate::config::tokens::read_url(url).map_err(|e| StoreError(format!("tokens.url: {e}")))?;
        let mut config: tokio_postgres::Config =
            asked.url.parse().map_err(|e| StoreError(format!("tokens.url: {e}")))?;
        let tls = match asked.tls {
            true => Some(super::tls::MakeRustls(
                super::tls::client_config(asked.root_cert.as_deref().map(std::path::Path::new))
                    .map_err(|e| StoreError(format!("tokens.url: {e}")))?,
            )),
            false => None,
        };
        if let Some(p) = password {
            config.password(p);
        }
        config.connect_timeout(TIMEOUT);
        config.application_name("imip-milter");
        // The server gives up too: no statement or lock wait outlives the caller.
        let ms = TIMEOUT.as_millis();
        config.options(format!("-c statement_timeout={ms} -c lock_timeout={ms}"));
        Ok(Self {
            config,
            tls,
            layout,
            url: url.to_owned(),
            idle: Mutex::new(Vec::new()),
            slots: Semaphore::new(limits.size),
            limits,
            ready: AtomicBool::new(false),
            down: AtomicBool::new(false),
        })
    }

    async fn connect(&self) -> Result<Client, StoreError> {
        let client = match &self.tls {
            Some(tls) => self.open(tls.clone()).await?,
            None => self.open(NoTls).await?,
        };
        if !self.ready.load(Ordering::Relaxed) {
            let prepared = match self.layout {
                Layout::Own => migrate(&client).await,
                Layout::CalendarServer => super::calendarserver::verify(&client).await,
            };
            prepared.map_err(|e| StoreError(format!("token database {}: {e}", self.url)))?;
            self.ready.store(true, Ordering::Relaxed);
        }
        Ok(client)
    }

    /// One connection, plain or TLS; its I/O runs on a task of its own.
    async fn open<T>(&self, tls: T) -> Result<Client, StoreError>
    where
        T: MakeTlsConnect<Socket> + Send,
        T::Stream: Send + 'static,
        T::TlsConnect: Send,
        <T::TlsConnect as tokio_postgres::tls::TlsConnect<Socket>>::Future: Send,
    {
        let (client, connection) = self
            .config
            .connect(tls)
            .await
            .map_err(|e| StoreError(format!("token database {}: {}", self.url, error_text(&e))))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// Runs `f` on a pooled connection: waiting for one at most
    /// `pool_wait`, then connecting and the statement within `TIMEOUT`. A
    /// pooled connection found closed is replaced once. An outage is
    /// logged once; a busy pool is no outage.
    pub(super) async fn with<T>(
        &self,
        what: &str,
        f: impl AsyncFnOnce(&Client) -> Result<T, tokio_postgres::Error> + Clone,
    ) -> Result<T, StoreError> {
        let slot = match tokio::time::timeout(self.limits.wait, self.slots.acquire()).await {
            Ok(Ok(slot)) => slot,
            Ok(Err(_)) => return Err(StoreError("token database: closed".into())),
            Err(_) => {
                return Err(StoreError(format!(
                    "token database {}: {what}: all {} connections busy for {}ms (tokens.pool_size, tokens.pool_wait)",
                    self.url,
                    self.limits.size,
                    self.limits.wait.as_millis()
                )))
            }
        };
        let attempt = async {
            let _slot = slot;
            let pooled = self.idle.lock().await.pop().filter(|c| !c.is_closed());
            let fresh = pooled.is_none();
            let mut client = match pooled {
                Some(c) => c,
                None => self.connect().await?,
            };
            let mut answer = (f.clone())(&client).await;
            if !fresh && answer.as_ref().is_err_and(|e| e.is_closed()) {
                client = self.connect().await?;
                answer = f(&client).await;
            }
            match answer {
                Ok(a) => Ok((client, a)),
                Err(e) => Err(StoreError(format!(
                    "token database {}: {what}: {}",
                    self.url,
                    error_text(&e)
                ))),
            }
        };
        let result = match tokio::time::timeout(TIMEOUT, attempt).await {
            Ok(r) => r,
            Err(_) => Err(StoreError(format!(
                "token database {}: {what}: no answer in {}s",
                self.url,
                TIMEOUT.as_secs()
            ))),
        };
        match result {
            Ok((client, answer)) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    tracing::info!("token database {} reachable again", self.url);
                }
                self.idle.lock().await.push(client);
                Ok(answer)
            }
            Err(e) => {
                if !self.down.swap(true, Ordering::Relaxed) {
                    tracing::error!("{e}; recipients get 451 until it answers");
                }
                Err(e)
            }
        }
    }
}

/// The server's own words for an error, without its DETAIL line (which may
/// quote a row, and so a token); the root cause for others.
pub(super) fn error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => crate::targets::root_cause(e),
    }
}

/// Creates or checks the schema; several hosts may start at once.
async fn migrate(client: &Client) -> Result<(), String> {
    let text = |e: tokio_postgres::Error| error_text(&e);
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

pub(super) fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn record(row: &Row) -> Result<TokenRecord, StoreError> {
    let bad = |e: tokio_postgres::Error| StoreError(format!("token database: imip_milter_tokens row: {e}"));
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
            pool: Pool::new(url, password, Layout::Own, limits)?,
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
