//! Unknown tokens remembered for a while (`tokens.remember_unknown`): a
//! guess sent again, from any client, costs the store nothing. Only
//! *unknown* is remembered, never a record: a revoked token fails at once
//! on every host, and an expired one comes back when its invitation is
//! sent again. A token written through this store (`tokens add`, import,
//! outbound) is forgotten at once; one added on another host may be taken
//! for unknown here until its entry runs out.

use super::{StoreFuture, TokenRecord, TokenStore};
use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::Duration,
};

/// Unknown tokens remembered at most; the oldest go first.
pub const MAX_REMEMBERED: usize = 10_000;

pub struct RememberUnknown {
    inner: Arc<dyn TokenStore>,
    keep_ms: u64,
    remembered: Mutex<Remembered>,
    /// Lookups answered from memory.
    hits: AtomicU64,
}

/// Unknown tokens with when each is forgotten; `order` oldest first (one
/// keep time for all: the order of expiry too).
#[derive(Default)]
struct Remembered {
    until: HashMap<String, u64>,
    order: VecDeque<(String, u64)>,
}

impl RememberUnknown {
    pub fn new(inner: Arc<dyn TokenStore>, keep: Duration) -> Self {
        Self {
            inner,
            keep_ms: keep.as_millis() as u64,
            remembered: Mutex::new(Remembered::default()),
            hits: AtomicU64::new(0),
        }
    }

    /// Lookups answered from memory so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Relaxed)
    }

    fn known_unknown(&self, token: &str, now: u64) -> bool {
        let r = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
        r.until.get(token).is_some_and(|until| *until > now)
    }

    fn remember(&self, token: &str, now: u64) {
        let mut r = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
        while r
            .order
            .front()
            .is_some_and(|(_, until)| *until <= now || r.order.len() >= MAX_REMEMBERED)
        {
            if let Some((t, until)) = r.order.pop_front() {
                // A token remembered again later has a newer entry behind.
                if r.until.get(&t) == Some(&until) {
                    r.until.remove(&t);
                }
            }
        }
        let until = now.saturating_add(self.keep_ms);
        r.until.insert(token.to_owned(), until);
        r.order.push_back((token.to_owned(), until));
    }

    fn forget(&self, token: &str) {
        let mut r = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
        // Its entry in `order` goes when it comes to the front.
        r.until.remove(token);
    }
}

impl TokenStore for RememberUnknown {
    fn get<'a>(&'a self, token: &'a str) -> StoreFuture<'a, Option<TokenRecord>> {
        Box::pin(async move {
            if self.known_unknown(token, crate::clock::now_ms()) {
                self.hits.fetch_add(1, Relaxed);
                crate::metrics::METRICS.token_lookup_remembered();
                return Ok(None);
            }
            let found = self.inner.get(token).await?;
            if found.is_none() {
                self.remember(token, crate::clock::now_ms());
            }
            Ok(found)
        })
    }

    fn find<'a>(&'a self, organizer: &'a str, attendee: &'a str, uid: &'a str) -> StoreFuture<'a, Option<TokenRecord>> {
        self.inner.find(organizer, attendee, uid)
    }

    fn put<'a>(&'a self, rec: &'a TokenRecord) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.forget(&rec.token);
            let written = self.inner.put(rec).await;
            // A lookup that raced the write may have remembered it meanwhile.
            self.forget(&rec.token);
            written
        })
    }

    fn revoke<'a>(&'a self, token: &'a str) -> StoreFuture<'a, bool> {
        self.inner.revoke(token)
    }

    fn list(&self) -> StoreFuture<'_, Vec<TokenRecord>> {
        self.inner.list()
    }

    fn purge<'a>(&'a self, cutoff_ms: u64) -> StoreFuture<'a, usize> {
        self.inner.purge(cutoff_ms)
    }

    fn touch<'a>(&'a self, token: &'a str, now_ms: u64) -> StoreFuture<'a, ()> {
        self.inner.touch(token, now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::RedbTokens;

    #[tokio::test]
    async fn unknown_is_remembered_a_record_never() {
        let dir = tempfile::tempdir().unwrap();
        let spool = crate::spool::Spool::open(&dir.path().join("t.redb")).unwrap();
        let redb: Arc<dyn TokenStore> = Arc::new(RedbTokens::new(&spool).unwrap());
        let s = RememberUnknown::new(redb.clone(), Duration::from_secs(60));
        let guess = "00000000-0000-4000-8000-000000000001";
        assert_eq!(s.get(guess).await.unwrap(), None);
        assert_eq!(s.get(guess).await.unwrap(), None);
        assert_eq!(s.hits(), 1, "the second from memory");
        // Written through this store: known at once.
        let r = crate::tokens::mint_or_reuse(&s, "mailto:a@x", "mailto:b@y", "u", None, 0)
            .await
            .unwrap();
        let mut known = r.clone();
        known.token = guess.to_owned();
        s.put(&known).await.unwrap();
        assert!(s.get(guess).await.unwrap().is_some());
        // A record is never remembered: revoked elsewhere, unknown here at once.
        assert!(s.get(&r.token).await.unwrap().is_some());
        assert!(redb.revoke(&r.token).await.unwrap());
        assert_eq!(s.get(&r.token).await.unwrap(), None);
    }

    #[test]
    fn memory_is_bounded_and_runs_out() {
        let dir = tempfile::tempdir().unwrap();
        let spool = crate::spool::Spool::open(&dir.path().join("t.redb")).unwrap();
        let s = RememberUnknown::new(Arc::new(RedbTokens::new(&spool).unwrap()), Duration::from_secs(60));
        for i in 0..MAX_REMEMBERED + 10 {
            s.remember(&format!("t{i}"), 1000);
        }
        assert_eq!(s.remembered.lock().unwrap().until.len(), MAX_REMEMBERED);
        assert!(!s.known_unknown("t0", 1000), "the oldest went first");
        assert!(s.known_unknown(&format!("t{}", MAX_REMEMBERED + 9), 60_999));
        assert!(!s.known_unknown(&format!("t{}", MAX_REMEMBERED + 9), 61_000), "ran out");
    }
}
