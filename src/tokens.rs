//! Local tokens (`[tokens] mode = "local"`): token → organizer, attendee and
//! event UID, as CalendarServer's IMIP_TOKENS table. Behind a small trait so
//! that a store shared by several MX hosts (a database server) can be added.

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::{fmt, io::Read, sync::Arc};

/// token → TokenRecord (JSON)
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
/// "organizer\0attendee\0uid" (addresses in lower case) → token
const BY_EVENT: TableDefinition<&str, &str> = TableDefinition::new("tokens_by_event");

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
        let allowed = self.allowed();
        named
            .into_iter()
            .find_map(|n| allowed.iter().find(|a| a.eq_ignore_ascii_case(n)))
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

#[derive(Debug)]
pub struct StoreError(pub String);

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

fn e(context: &'static str) -> impl Fn(&dyn fmt::Display) -> StoreError {
    move |err| StoreError(format!("token store {context}: {err}"))
}

/// What the gateway needs from a token store.
pub trait TokenStore: Send + Sync {
    fn get(&self, token: &str) -> Result<Option<TokenRecord>, StoreError>;
    fn find(&self, organizer: &str, attendee: &str, uid: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// Inserts or replaces.
    fn put(&self, rec: &TokenRecord) -> Result<(), StoreError>;
    fn revoke(&self, token: &str) -> Result<bool, StoreError>;
    fn list(&self) -> Result<Vec<TokenRecord>, StoreError>;
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
        let txn = db.begin_write().map_err(|x| e("open")(&x))?;
        txn.open_table(TOKENS).map_err(|x| e("open")(&x))?;
        txn.open_table(BY_EVENT).map_err(|x| e("open")(&x))?;
        txn.commit().map_err(|x| e("open")(&x))?;
        Ok(store)
    }

    fn db(&self) -> Result<Arc<Database>, StoreError> {
        self.spool
            .database()
            .map_err(|x| StoreError(format!("token store: {x}")))
    }
}

impl TokenStore for RedbTokens {
    fn get(&self, token: &str) -> Result<Option<TokenRecord>, StoreError> {
        let txn = self.db()?.begin_read().map_err(|x| e("read")(&x))?;
        let t = txn.open_table(TOKENS).map_err(|x| e("read")(&x))?;
        let v = t.get(token).map_err(|x| e("read")(&x))?;
        Ok(v.and_then(|v| serde_json::from_slice(v.value()).ok()))
    }

    fn find(&self, organizer: &str, attendee: &str, uid: &str) -> Result<Option<TokenRecord>, StoreError> {
        let token = {
            let txn = self.db()?.begin_read().map_err(|x| e("read")(&x))?;
            let t = txn.open_table(BY_EVENT).map_err(|x| e("read")(&x))?;
            let v = t
                .get(event_key(organizer, attendee, uid).as_str())
                .map_err(|x| e("read")(&x))?;
            v.map(|v| v.value().to_owned())
        };
        match token {
            Some(t) => self.get(&t),
            None => Ok(None),
        }
    }

    fn put(&self, rec: &TokenRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(rec).map_err(|x| e("encode")(&x))?;
        let txn = self.db()?.begin_write().map_err(|x| e("write")(&x))?;
        {
            let mut t = txn.open_table(TOKENS).map_err(|x| e("write")(&x))?;
            t.insert(rec.token.as_str(), bytes.as_slice())
                .map_err(|x| e("write")(&x))?;
            let mut by = txn.open_table(BY_EVENT).map_err(|x| e("write")(&x))?;
            by.insert(
                event_key(&rec.organizer, &rec.attendee, &rec.uid).as_str(),
                rec.token.as_str(),
            )
            .map_err(|x| e("write")(&x))?;
        }
        txn.commit().map_err(|x| e("commit")(&x))
    }

    fn revoke(&self, token: &str) -> Result<bool, StoreError> {
        let Some(rec) = self.get(token)? else {
            return Ok(false);
        };
        let txn = self.db()?.begin_write().map_err(|x| e("write")(&x))?;
        {
            let mut t = txn.open_table(TOKENS).map_err(|x| e("write")(&x))?;
            t.remove(token).map_err(|x| e("write")(&x))?;
            let mut by = txn.open_table(BY_EVENT).map_err(|x| e("write")(&x))?;
            let key = event_key(&rec.organizer, &rec.attendee, &rec.uid);
            let points_here = by
                .get(key.as_str())
                .map_err(|x| e("write")(&x))?
                .is_some_and(|v| v.value() == token);
            if points_here {
                by.remove(key.as_str()).map_err(|x| e("write")(&x))?;
            }
        }
        txn.commit().map_err(|x| e("commit")(&x))?;
        Ok(true)
    }

    fn list(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let txn = self.db()?.begin_read().map_err(|x| e("read")(&x))?;
        let t = txn.open_table(TOKENS).map_err(|x| e("read")(&x))?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(|x| e("read")(&x))? {
            let (_, v) = entry.map_err(|x| e("read")(&x))?;
            if let Ok(r) = serde_json::from_slice::<TokenRecord>(v.value()) {
                out.push(r);
            }
        }
        out.sort_by_key(|r| r.created_ms);
        Ok(out)
    }
}

/// What a token in a recipient address comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Valid(TokenRecord),
    Unknown,
    Expired,
}

/// A token expires `days_to_live` after its last use (CalendarServer's ACCESSED).
pub fn lookup(store: &dyn TokenStore, token: &str, now_ms: u64, days_to_live: u32) -> Result<Lookup, StoreError> {
    Ok(match store.get(token)? {
        None => Lookup::Unknown,
        Some(r) if now_ms.saturating_sub(r.last_used_ms.max(r.created_ms)) > u64::from(days_to_live) * 86_400_000 => {
            Lookup::Expired
        }
        Some(r) => Lookup::Valid(r),
    })
}

/// A new token: a UUID version 4 as CalendarServer writes them, 122 random bits.
pub fn mint() -> Result<String, StoreError> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|x| StoreError(format!("no randomness for a token: {x}")))?;
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
pub fn mint_or_reuse(
    store: &dyn TokenStore,
    organizer: &str,
    attendee: &str,
    uid: &str,
    invitation: Option<&str>,
    now_ms: u64,
) -> Result<TokenRecord, StoreError> {
    let organizer = crate::itip::normalise_mailto(organizer);
    let attendee = crate::itip::normalise_mailto(attendee);
    if let Some(mut r) = store.find(&organizer, &attendee, uid)? {
        r.last_used_ms = now_ms;
        r.remember_invitation(invitation.unwrap_or(""));
        store.put(&r)?;
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
    store.put(&r)?;
    Ok(r)
}

/// One token per (organizer, UID) for an invitation to several external
/// attendees; the reply is bound to `attendees`.
pub fn mint_or_reuse_shared(
    store: &dyn TokenStore,
    organizer: &str,
    uid: &str,
    attendees: &[String],
    invitation: Option<&str>,
    now_ms: u64,
) -> Result<TokenRecord, StoreError> {
    let organizer = crate::itip::normalise_mailto(organizer);
    let mut list: Vec<String> = attendees.iter().map(|a| crate::itip::normalise_mailto(a)).collect();
    let mut r = match store.find(&organizer, "", uid)? {
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
    store.put(&r)?;
    Ok(r)
}

/// Reads CalendarServer's IMIP_TOKENS rows as CSV: TOKEN, ORGANIZER,
/// ATTENDEE, ICALUID, ACCESSED (a header row is skipped). Returns the
/// records, and one message per line that could not be read.
pub fn parse_csv(text: &str, now_ms: u64) -> (Vec<TokenRecord>, Vec<String>) {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fields = split_csv(line);
        if n == 0 && fields.first().is_some_and(|f| f.eq_ignore_ascii_case("token")) {
            continue;
        }
        if fields.len() < 4 {
            bad.push(format!(
                "line {}: needs TOKEN, ORGANIZER, ATTENDEE, ICALUID[, ACCESSED]",
                n + 1
            ));
            continue;
        }
        let token = fields[0].trim();
        if !crate::address::valid_token_syntax(token) {
            bad.push(format!("line {}: token of bad syntax", n + 1));
            continue;
        }
        let accessed = fields.get(4).and_then(|a| parse_time(a.trim())).unwrap_or(now_ms);
        out.push(TokenRecord {
            token: token.to_owned(),
            organizer: crate::itip::normalise_mailto(fields[1].trim()),
            attendee: crate::itip::normalise_mailto(fields[2].trim()),
            uid: fields[3].trim().to_owned(),
            created_ms: accessed,
            last_used_ms: accessed,
            attendees: Vec::new(),
            invitations: Vec::new(),
        });
    }
    (out, bad)
}

fn parse_time(s: &str) -> Option<u64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return u64::try_from(t.timestamp_millis()).ok();
    }
    for fmt in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, fmt) {
            return u64::try_from(t.and_utc().timestamp_millis()).ok();
        }
    }
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .and_then(|t| u64::try_from(t.and_utc().timestamp_millis()).ok())
}

fn split_csv(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    fields.push(cur);
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, RedbTokens) {
        let dir = tempfile::tempdir().unwrap();
        let spool = crate::spool::Spool::open(&dir.path().join("t.redb")).unwrap();
        (dir, RedbTokens::new(&spool).unwrap())
    }

    #[test]
    fn minted_tokens_are_uuid4_and_reused_per_event() {
        let (_d, s) = store();
        let t = mint().unwrap();
        assert_eq!(t.len(), 36);
        assert_eq!(&t[14..15], "4");
        assert!(crate::address::valid_token_syntax(&t));
        let a = mint_or_reuse(&s, "mailto:alice@example.org", "mailto:bob@example.com", "u1", None, 1).unwrap();
        let b = mint_or_reuse(&s, "MAILTO:Alice@example.org", "mailto:BOB@example.com", "u1", None, 2).unwrap();
        assert_eq!(a.token, b.token);
        let c = mint_or_reuse(&s, "alice@example.org", "mailto:carol@example.com", "u1", None, 3).unwrap();
        assert_eq!(
            mint_or_reuse(&s, "alice@example.org", "carol@example.com", "u1", None, 4)
                .unwrap()
                .token,
            c.token
        );
        assert_ne!(a.token, c.token);
        assert_eq!(s.list().unwrap().len(), 2);
    }

    #[test]
    fn expiry_and_revocation() {
        let (_d, s) = store();
        let r = mint_or_reuse(&s, "mailto:a@x", "mailto:b@y", "u", None, 0).unwrap();
        assert!(matches!(
            lookup(&s, &r.token, 89 * 86_400_000, 90).unwrap(),
            Lookup::Valid(_)
        ));
        assert_eq!(lookup(&s, &r.token, 91 * 86_400_000, 90).unwrap(), Lookup::Expired);
        assert_eq!(lookup(&s, "0000000000", 0, 90).unwrap(), Lookup::Unknown);
        assert!(s.revoke(&r.token).unwrap());
        assert_eq!(lookup(&s, &r.token, 0, 90).unwrap(), Lookup::Unknown);
        assert!(s.find("mailto:a@x", "mailto:b@y", "u").unwrap().is_none());
    }

    #[test]
    fn calendarserver_csv() {
        let csv = "TOKEN,ORGANIZER,ATTENDEE,ICALUID,ACCESSED\n\
            8e3c0d1a-5b7e-4f61-9a0c-2d4f3b6a7c81,urn:x-uid:alice,mailto:bob@example.com,\"uid,with,commas\",2026-11-01 10:00:00\n\
            bad token!,mailto:a@x,mailto:b@y,u\n\
            short\n";
        let (recs, bad) = parse_csv(csv, 5);
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].uid, "uid,with,commas");
        assert_eq!(recs[0].organizer, "urn:x-uid:alice");
        assert_eq!(recs[0].last_used_ms, 1_793_527_200_000);
        assert_eq!(bad.len(), 2, "{bad:?}");
    }
}
