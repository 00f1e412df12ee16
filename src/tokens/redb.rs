//! The token store in the daemon's redb file: one host's tokens.

use super::{StoreError, StoreFuture, TokenRecord, TokenStore};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::sync::Arc;

/// token → TokenRecord (JSON)
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
/// "organizer\0attendee\0uid" (addresses in lower case) → token
const BY_EVENT: TableDefinition<&str, &str> = TableDefinition::new("tokens_by_event");

/// `token store {what}` failed because of `cause` (redb's error, or
/// serde_json's for a record that cannot be encoded).
fn failed<E: std::error::Error + Send + Sync + 'static>(what: &'static str) -> impl FnOnce(E) -> StoreError {
    move |cause| StoreError::with(format!("token store {what}"), cause)
}

/// The token store in the daemon's redb file.
pub struct RedbTokens {
    spool: crate::spool::Spool,
}

fn event_key(organizer: &str, attendee: &str, uid: &str) -> String {
    format!(
        "{}\0{}\0{uid}",
        organizer.to_ascii_lowercase(),
        attendee.to_ascii_lowercase()
    )
}

impl RedbTokens {
    pub fn new(spool: &crate::spool::Spool) -> Result<Self, StoreError> {
        let store = Self { spool: spool.clone() };
        let db = store.db()?;
        let txn = db.begin_write().map_err(failed("open"))?;
        txn.open_table(TOKENS).map_err(failed("open"))?;
        txn.open_table(BY_EVENT).map_err(failed("open"))?;
        txn.commit().map_err(failed("open"))?;
        Ok(store)
    }

    fn db(&self) -> Result<Arc<Database>, StoreError> {
        self.spool.database().map_err(|x| StoreError::with("token store", x))
    }
}

impl RedbTokens {
    fn get_now(&self, token: &str) -> Result<Option<TokenRecord>, StoreError> {
        let txn = self.db()?.begin_read().map_err(failed("read"))?;
        let t = txn.open_table(TOKENS).map_err(failed("read"))?;
        let v = t.get(token).map_err(failed("read"))?;
        Ok(v.and_then(|v| serde_json::from_slice(v.value()).ok()))
    }

    fn find_now(&self, organizer: &str, attendee: &str, uid: &str) -> Result<Option<TokenRecord>, StoreError> {
        let token = {
            let txn = self.db()?.begin_read().map_err(failed("read"))?;
            let t = txn.open_table(BY_EVENT).map_err(failed("read"))?;
            let v = t
                .get(event_key(organizer, attendee, uid).as_str())
                .map_err(failed("read"))?;
            v.map(|v| v.value().to_owned())
        };
        match token {
            Some(t) => self.get_now(&t),
            None => Ok(None),
        }
    }

    fn put_now(&self, rec: &TokenRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(rec).map_err(failed("encode"))?;
        let txn = self.db()?.begin_write().map_err(failed("write"))?;
        {
            let mut t = txn.open_table(TOKENS).map_err(failed("write"))?;
            t.insert(rec.token.as_str(), bytes.as_slice())
                .map_err(failed("write"))?;
            let mut by = txn.open_table(BY_EVENT).map_err(failed("write"))?;
            by.insert(
                event_key(&rec.organizer, &rec.attendee, &rec.uid).as_str(),
                rec.token.as_str(),
            )
            .map_err(failed("write"))?;
        }
        txn.commit().map_err(failed("commit"))
    }

    fn revoke_now(&self, token: &str) -> Result<bool, StoreError> {
        let Some(rec) = self.get_now(token)? else {
            return Ok(false);
        };
        let txn = self.db()?.begin_write().map_err(failed("write"))?;
        {
            let mut t = txn.open_table(TOKENS).map_err(failed("write"))?;
            t.remove(token).map_err(failed("write"))?;
            let mut by = txn.open_table(BY_EVENT).map_err(failed("write"))?;
            let key = event_key(&rec.organizer, &rec.attendee, &rec.uid);
            let points_here = by
                .get(key.as_str())
                .map_err(failed("write"))?
                .is_some_and(|v| v.value() == token);
            if points_here {
                by.remove(key.as_str()).map_err(failed("write"))?;
            }
        }
        txn.commit().map_err(failed("commit"))?;
        Ok(true)
    }

    fn list_now(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let txn = self.db()?.begin_read().map_err(failed("read"))?;
        let t = txn.open_table(TOKENS).map_err(failed("read"))?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(failed("read"))? {
            let (_, v) = entry.map_err(failed("read"))?;
            if let Ok(r) = serde_json::from_slice::<TokenRecord>(v.value()) {
                out.push(r);
            }
        }
        out.sort_by_key(|r| r.created_ms);
        Ok(out)
    }
}

impl RedbTokens {
    /// A write: it commits with an fsync, and waits while the spool's writer
    /// commits (one write transaction at a time in the file). Off the
    /// session thread, which answers every SMTP session meanwhile.
    fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&RedbTokens) -> Result<T, StoreError> + Send + 'static,
    ) -> StoreFuture<'static, T> {
        let store = RedbTokens {
            spool: self.spool.clone(),
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => Box::pin(async move {
                rt.spawn_blocking(move || f(&store))
                    .await
                    .map_err(|x| StoreError::with("token store", x))?
            }),
            Err(_) => Box::pin(std::future::ready(f(&store))),
        }
    }
}

impl TokenStore for RedbTokens {
    // Reads answer at once from a local file: no thread hop.
    fn get<'a>(&'a self, token: &'a str) -> StoreFuture<'a, Option<TokenRecord>> {
        Box::pin(std::future::ready(self.get_now(token)))
    }

    fn find<'a>(&'a self, organizer: &'a str, attendee: &'a str, uid: &'a str) -> StoreFuture<'a, Option<TokenRecord>> {
        Box::pin(std::future::ready(self.find_now(organizer, attendee, uid)))
    }

    fn put<'a>(&'a self, rec: &'a TokenRecord) -> StoreFuture<'a, ()> {
        let rec = rec.clone();
        self.write(move |s| s.put_now(&rec))
    }

    fn revoke<'a>(&'a self, token: &'a str) -> StoreFuture<'a, bool> {
        let token = token.to_owned();
        self.write(move |s| s.revoke_now(&token))
    }

    fn list(&self) -> StoreFuture<'_, Vec<TokenRecord>> {
        Box::pin(std::future::ready(self.list_now()))
    }

    fn purge<'a>(&'a self, cutoff_ms: u64) -> StoreFuture<'a, usize> {
        self.write(move |s| {
            let mut n = 0;
            for t in s
                .list_now()?
                .iter()
                .filter(|t| t.last_used_ms.max(t.created_ms) < cutoff_ms)
            {
                if s.revoke_now(&t.token)? {
                    n += 1;
                }
            }
            Ok(n)
        })
    }

    fn touch<'a>(&'a self, token: &'a str, now_ms: u64) -> StoreFuture<'a, ()> {
        let token = token.to_owned();
        self.write(move |s| match s.get_now(&token)? {
            Some(mut t) => {
                t.last_used_ms = now_ms;
                s.put_now(&t)
            }
            None => Ok(()),
        })
    }
}
