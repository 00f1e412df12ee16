//! Local tokens (`[tokens] mode = "local"`): token → organizer, attendee and
//! event UID, as CalendarServer's IMIP_TOKENS table. Behind a small trait so
//! that a store shared by several MX hosts (a database server) can be added.

use serde::{Deserialize, Serialize};
use std::{future::Future, io::Read, pin::Pin, sync::Arc};

mod calendarserver;
mod import;
mod postgres;
mod redb;
mod tls;
mod unknown;

pub use self::{
    calendarserver::CalendarServerTokens,
    import::parse_csv,
    postgres::{Layout, PoolLimits, PostgresTokens},
    redb::RedbTokens,
    unknown::{RememberUnknown, MAX_REMEMBERED},
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub token: String,
    /// `mailto:` URI of the organizer.
    pub organizer: String,
    /// `mailto:` URI of the attendee.
    pub attendee: String,
    pub uid: String,
    pub created_ms: u64,
    pub last_used_ms: u64,
    /// A token shared by several external attendees of one invitation:
    /// `attendee` is empty and a reply must come from one of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attendees: Vec<String>,
    /// Message-IDs of the invitations sent with this token (newest last, at
    /// most `MAX_INVITATIONS`): a bounce is believed when it quotes one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub invitations: Vec<String>,
}

/// Invitation Message-IDs remembered per token.
pub const MAX_INVITATIONS: usize = 8;

impl TokenRecord {
    /// Expired: unused for `days_to_live` days (CalendarServer's ACCESSED).
    pub fn expired(&self, now_ms: u64, days_to_live: u32) -> bool {
        now_ms.saturating_sub(self.last_used_ms.max(self.created_ms)) > u64::from(days_to_live) * 86_400_000
    }

    /// The attendees this token may answer for: its own, or a shared token's list.
    pub fn allowed(&self) -> Vec<&str> {
        if self.attendee.is_empty() {
            self.attendees.iter().map(String::as_str).collect()
        } else {
            vec![self.attendee.as_str()]
        }
    }

    /// The first of `named` (ATTENDEE values of a reply, a bounce's failed
    /// recipient) that this token may answer for. Nobody else, ever.
    pub fn answering<'a>(&self, named: impl IntoIterator<Item = &'a str>) -> Option<String> {
        // Hashed: a shared token's list times a hostile reply's would be quadratic.
        let allowed: std::collections::HashMap<String, &str> = self
            .allowed()
            .into_iter()
            .map(|a| (a.to_ascii_lowercase(), a))
            .collect();
        named
            .into_iter()
            .find_map(|n| allowed.get(&n.to_ascii_lowercase()))
            .map(|a| (*a).to_owned())
    }

    /// Remembers the Message-ID of an invitation sent with this token.
    pub fn remember_invitation(&mut self, message_id: &str) {
        if message_id.is_empty() || self.invitations.iter().any(|m| m == message_id) {
            return;
        }
        self.invitations.push(message_id.chars().take(998).collect());
        if self.invitations.len() > MAX_INVITATIONS {
            self.invitations.remove(0);
        }
    }
}

crate::errors::context_error!(
    /// A token store operation that failed: what and where (its text), and why
    /// (`source()`: redb's, the spool's, the system's or the database client's
    /// error). What a PostgreSQL server answered is part of the text, never a
    /// cause (see `postgres::pool::failed`). Messages and log lines print
    /// `errors::chain`; an SMTP answer prints none of it.
    StoreError
);

/// What a store call comes to, later: a lookup may wait on a database.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// What the gateway needs from a token store. One file per backend.
pub trait TokenStore: Send + Sync {
    fn get<'a>(&'a self, token: &'a str) -> StoreFuture<'a, Option<TokenRecord>>;
    fn find<'a>(&'a self, organizer: &'a str, attendee: &'a str, uid: &'a str) -> StoreFuture<'a, Option<TokenRecord>>;
    /// Inserts or replaces.
    fn put<'a>(&'a self, rec: &'a TokenRecord) -> StoreFuture<'a, ()>;
    fn revoke<'a>(&'a self, token: &'a str) -> StoreFuture<'a, bool>;
    fn list(&self) -> StoreFuture<'_, Vec<TokenRecord>>;
    /// Removes the tokens last used before `cutoff_ms`; how many.
    fn purge<'a>(&'a self, cutoff_ms: u64) -> StoreFuture<'a, usize>;
    /// Records a use of a token that still exists (its last use only: a
    /// token revoked meanwhile stays revoked).
    fn touch<'a>(&'a self, token: &'a str, now_ms: u64) -> StoreFuture<'a, ()>;
}

/// The configured store: the spool's redb file (one host), or PostgreSQL
/// (every host of a site). PostgreSQL is connected at first use.
pub fn open(
    config: &crate::config::TokensConfig,
    spool: &crate::spool::Spool,
) -> Result<Arc<dyn TokenStore>, StoreError> {
    use crate::config::TokenStoreConfig;
    match &config.store {
        TokenStoreConfig::Redb => Ok(Arc::new(RedbTokens::new(spool)?)),
        TokenStoreConfig::Postgres { .. } => open_shared(&config.store),
    }
}

/// The PostgreSQL store in its configured layout.
pub fn open_shared(config: &crate::config::TokenStoreConfig) -> Result<Arc<dyn TokenStore>, StoreError> {
    let crate::config::TokenStoreConfig::Postgres {
        url,
        password_file,
        layout,
        pool,
    } = config
    else {
        return Err(StoreError::new("tokens.store: not a database"));
    };
    let password = match password_file {
        Some(f) => Some(crate::config::read_secret(f, "tokens.password_file").map_err(StoreError::new)?),
        None => None,
    };
    Ok(match layout {
        Layout::Own => Arc::new(PostgresTokens::with_pool(url, password, *pool)?),
        Layout::CalendarServer => Arc::new(CalendarServerTokens::with_pool(url, password, *pool)?),
    })
}

/// What a token in a recipient address comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Valid(TokenRecord),
    Unknown,
    Expired,
}

/// A token expires `days_to_live` after its last use (CalendarServer's ACCESSED).
pub async fn lookup(store: &dyn TokenStore, token: &str, now_ms: u64, days_to_live: u32) -> Result<Lookup, StoreError> {
    Ok(match store.get(token).await? {
        None => Lookup::Unknown,
        Some(r) if r.expired(now_ms, days_to_live) => Lookup::Expired,
        Some(r) => Lookup::Valid(r),
    })
}

/// A new token: a UUID version 4 as CalendarServer writes them, 122 random bits.
pub fn mint() -> Result<String, StoreError> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|x| StoreError::with("no randomness for a token", x))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
}

/// The token for (organizer, attendee, uid): the existing one, or a new one.
pub async fn mint_or_reuse(
    store: &dyn TokenStore,
    organizer: &str,
    attendee: &str,
    uid: &str,
    invitation: Option<&str>,
    now_ms: u64,
) -> Result<TokenRecord, StoreError> {
    let organizer = crate::itip::normalise_mailto(organizer);
    let attendee = crate::itip::normalise_mailto(attendee);
    if let Some(mut r) = store.find(&organizer, &attendee, uid).await? {
        r.last_used_ms = now_ms;
        r.remember_invitation(invitation.unwrap_or(""));
        store.put(&r).await?;
        return Ok(r);
    }
    let mut r = TokenRecord {
        token: mint()?,
        organizer,
        attendee,
        uid: uid.to_owned(),
        created_ms: now_ms,
        last_used_ms: now_ms,
        attendees: Vec::new(),
        invitations: Vec::new(),
    };
    r.remember_invitation(invitation.unwrap_or(""));
    store.put(&r).await?;
    Ok(r)
}

/// One token per (organizer, UID) for an invitation to several external
/// attendees; the reply is bound to `attendees`.
pub async fn mint_or_reuse_shared(
    store: &dyn TokenStore,
    organizer: &str,
    uid: &str,
    attendees: &[String],
    invitation: Option<&str>,
    now_ms: u64,
) -> Result<TokenRecord, StoreError> {
    let organizer = crate::itip::normalise_mailto(organizer);
    let mut list: Vec<String> = attendees.iter().map(|a| crate::itip::normalise_mailto(a)).collect();
    let mut r = match store.find(&organizer, "", uid).await? {
        Some(r) => r,
        None => TokenRecord {
            token: mint()?,
            organizer,
            attendee: String::new(),
            uid: uid.to_owned(),
            created_ms: now_ms,
            last_used_ms: now_ms,
            attendees: Vec::new(),
            invitations: Vec::new(),
        },
    };
    list.retain(|a| !r.attendees.iter().any(|b| b.eq_ignore_ascii_case(a)));
    r.attendees.extend(list);
    r.remember_invitation(invitation.unwrap_or(""));
    r.last_used_ms = now_ms;
    store.put(&r).await?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, RedbTokens) {
        let dir = tempfile::tempdir().unwrap();
        let spool = crate::spool::Spool::open(&dir.path().join("t.redb")).unwrap();
        (dir, RedbTokens::new(&spool).unwrap())
    }

    #[tokio::test]
    async fn minted_tokens_are_uuid4_and_reused_per_event() {
        let (_d, s) = store();
        let t = mint().unwrap();
        assert_eq!(t.len(), 36);
        assert_eq!(&t[14..15], "4");
        assert!(crate::address::valid_token_syntax(&t));
        let a = mint_or_reuse(&s, "mailto:alice@example.org", "mailto:bob@example.com", "u1", None, 1)
            .await
            .unwrap();
        let b = mint_or_reuse(&s, "MAILTO:Alice@example.org", "mailto:BOB@example.com", "u1", None, 2)
            .await
            .unwrap();
        assert_eq!(a.token, b.token);
        let c = mint_or_reuse(&s, "alice@example.org", "mailto:carol@example.com", "u1", None, 3)
            .await
            .unwrap();
        assert_eq!(
            mint_or_reuse(&s, "alice@example.org", "carol@example.com", "u1", None, 4)
                .await
                .unwrap()
                .token,
            c.token
        );
        assert_ne!(a.token, c.token);
        assert_eq!(s.list().await.unwrap().len(), 2);
    }

    #[test]
    fn the_cause_follows_the_context_in_the_chain() {
        let e = StoreError::with("no randomness for a token", std::io::Error::other("gone"));
        assert_eq!(e.to_string(), "no randomness for a token");
        assert_eq!(crate::errors::chain(&e), "no randomness for a token: gone");
        assert_eq!(crate::errors::chain(&StoreError::new("alone")), "alone");
    }

    #[tokio::test]
    async fn expiry_and_revocation() {
        let (_d, s) = store();
        let r = mint_or_reuse(&s, "mailto:a@x", "mailto:b@y", "u", None, 0)
            .await
            .unwrap();
        assert!(matches!(
            lookup(&s, &r.token, 89 * 86_400_000, 90).await.unwrap(),
            Lookup::Valid(_)
        ));
        assert_eq!(
            lookup(&s, &r.token, 91 * 86_400_000, 90).await.unwrap(),
            Lookup::Expired
        );
        assert_eq!(lookup(&s, "0000000000", 0, 90).await.unwrap(), Lookup::Unknown);
        assert!(s.revoke(&r.token).await.unwrap());
        assert_eq!(lookup(&s, &r.token, 0, 90).await.unwrap(), Lookup::Unknown);
        assert!(s.find("mailto:a@x", "mailto:b@y", "u").await.unwrap().is_none());
    }
}
