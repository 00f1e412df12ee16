//! The connection pool both PostgreSQL layouts use: lazily opened
//! connections, bounded in number and time, an outage logged once.

use crate::config::PoolLimits;
use crate::tokens::StoreError;
use std::{
    future::Future,
    pin::Pin,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};
use tokio::sync::{Mutex, Semaphore};
use tokio_postgres::{error::DbError, tls::MakeTlsConnect, Client, NoTls, Socket};

/// Connecting and one statement at most; then the caller answers 451.
const TIMEOUT: Duration = Duration::from_secs(3);

/// What a layout checks or creates on the first connection.
pub type Prepare = for<'c> fn(&'c Client) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'c>>;

/// Lazily opened connections to the token database, bounded in number and time.
pub struct Pool {
    config: tokio_postgres::Config,
    /// When the URL asks for TLS: the verifying rustls configuration.
    tls: Option<crate::tokens::tls::MakeRustls>,
    prepare: Prepare,
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
    pub fn new(url: &str, password: Option<String>, limits: PoolLimits, prepare: Prepare) -> Result<Self, StoreError> {
        let asked = crate::config::tokens::read_url(url).map_err(|e| StoreError::new(format!("tokens.url: {e}")))?;
        let mut config: tokio_postgres::Config = asked.url.parse().map_err(|e| failed("tokens.url", e))?;
        let tls = match asked.tls {
            true => Some(crate::tokens::tls::MakeRustls(
                crate::tokens::tls::client_config(asked.root_cert.as_deref().map(std::path::Path::new))
                    .map_err(|e| StoreError::new(format!("tokens.url: {e}")))?,
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
            prepare,
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
            (self.prepare)(&client)
                .await
                .map_err(|e| StoreError::new(format!("token database {}: {e}", self.url)))?;
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
            .map_err(|e| failed(format!("token database {}", self.url), e))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// Runs `f` on a pooled connection: waiting for one at most
    /// `pool_wait`, then connecting and the statement within `TIMEOUT`. A
    /// pooled connection found closed is replaced once. An outage is
    /// logged once; a busy pool is no outage.
    pub async fn with<T>(
        &self,
        what: &str,
        f: impl AsyncFnOnce(&Client) -> Result<T, tokio_postgres::Error> + Clone,
    ) -> Result<T, StoreError> {
        let slot = match tokio::time::timeout(self.limits.wait, self.slots.acquire()).await {
            Ok(Ok(slot)) => slot,
            Ok(Err(_)) => return Err(StoreError::new("token database: closed")),
            Err(_) => {
                return Err(StoreError::new(format!(
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
                Err(e) => Err(failed(format!("token database {}: {what}", self.url), e)),
            }
        };
        let result = match tokio::time::timeout(TIMEOUT, attempt).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::new(format!(
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
                    tracing::error!("{}; recipients get 451 until it answers", crate::errors::chain(&e));
                }
                Err(e)
            }
        }
    }
}

/// `context` failed because of `e`. What the server answered goes into the
/// text by `error_text`, and `e` is not kept as the cause: its source is
/// then the server's `DbError`, whose Display adds the DETAIL line (it may
/// quote a row, and so a token), and every log line prints the chain. The
/// client's own errors (I/O, TLS, timeouts, a column it cannot read) stay
/// the cause.
pub fn failed(context: impl Into<String>, e: tokio_postgres::Error) -> StoreError {
    match server_error(&e) {
        Some(_) => StoreError::new(format!("{}: {}", context.into(), error_text(&e))),
        None => StoreError::with(context, e),
    }
}

/// The server's answer anywhere in `e`'s chain (tokio-postgres puts it
/// right behind `e`, `as_db_error`; a deeper one would still be found).
fn server_error(e: &tokio_postgres::Error) -> Option<&DbError> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(db) = c.downcast_ref::<DbError>() {
            return Some(db);
        }
        cause = c.source();
    }
    None
}

/// The server's own words for an error, without its DETAIL line (which may
/// quote a row, and so a token); the root cause for others.
pub fn error_text(e: &tokio_postgres::Error) -> String {
    match server_error(e) {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => crate::errors::chain(e),
    }
}

/// Milliseconds as PostgreSQL's bigint.
pub fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clients_own_error_stays_the_cause() {
        let e = "host=a port=x".parse::<tokio_postgres::Config>().unwrap_err();
        let e = failed("tokens.url", e);
        assert_eq!(e.to_string(), "tokens.url");
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(
            crate::errors::chain(&e),
            "tokens.url: invalid connection string: invalid value for option `port`"
        );
    }
}
