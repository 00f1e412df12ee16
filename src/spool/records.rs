//! The spool's records: what one reply or bounce holds, how it is built, stored and read back.

use super::{
    content::{self, CONTENT},
    layout::{DUE, PENDING, PENDING_SINCE, RECORDS},
    SpoolError,
};
use crate::{
    address::token_prefix,
    analysis::{Analysis, Kind},
    clock::now_ms,
};
use redb::{Database, ReadableTable, ReadableTableMetadata};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::{
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Pending,
    Delivered,
    Failed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
        }
    }
}

/// One reply or bounce on its way to the target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub state: State,
    pub kind: String,
    pub token_prefix: String,
    pub queue_id: Option<String>,
    pub created_ms: u64,
    pub attempts: u32,
    pub next_attempt_ms: u64,
    pub last_error: Option<String>,
    /// How many attempts in a row ended with `last_error` word for word,
    /// and when the first of them was.
    #[serde(default)]
    pub repeats: u32,
    #[serde(default)]
    pub repeats_since_ms: u64,
    pub finished_ms: Option<u64>,
    /// The document handed to the target (DESIGN §3).
    pub payload: serde_json::Value,
    /// The key in CONTENT of the message as received (replies only): what
    /// the organizer gets if the record fails for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_ref: Option<String>,
    /// The message as received, until the record is first stored.
    #[serde(skip)]
    pub original: Option<Arc<Vec<u8>>>,
    /// What became of the notice to the organizer, once the record failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice: Option<Notice>,
}

impl Record {
    /// A failed record whose notice is still to be sent.
    pub fn notice_due(&self) -> bool {
        self.state == State::Failed && self.notice.as_ref().is_some_and(Notice::due)
    }

    /// The journal's line about this record: `event` (delivery, notice),
    /// with what the record knows of its message.
    pub fn event(&self, event: &str, disposition: &str, reason: &str) -> crate::journal::Event {
        let text = |k: &str| self.payload[k].as_str().map(str::to_owned);
        crate::journal::Event {
            queue_id: self.queue_id.clone(),
            message_id: text("message_id"),
            sender: self.payload["envelope"]["mail_from"].as_str().map(str::to_owned),
            from: text("from"),
            attendee: text("attendee"),
            organizer: text("organizer"),
            token: Some(crate::journal::token8(&self.token_prefix)),
            record_id: Some(self.id.clone()),
            ..crate::journal::Event::now(event, disposition, reason)
        }
    }
}

/// The notice to the organizer of a reply that failed for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    pub state: NoticeState,
    /// The organizer it went to (or would have).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    pub time_ms: u64,
    /// Not sent: why.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Times sendmail was tried.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Times a notice is tried while sendmail fails: at the failure, then with
/// each hourly pass and at each start, a day long.
pub const NOTICE_ATTEMPTS: u32 = 24;

impl Notice {
    /// Still to be sent: pending, or sendmail failed fewer than
    /// NOTICE_ATTEMPTS times.
    pub fn due(&self) -> bool {
        match self.state {
            NoticeState::Pending => true,
            NoticeState::Failed => self.attempts < NOTICE_ATTEMPTS,
            NoticeState::Sent | NoticeState::Refused => false,
        }
    }
}

/// Where a notice stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NoticeState {
    /// Committed with the failure, to be sent (again after a crash).
    Pending,
    Sent,
    /// Not sent, by rule: no organizer, one that is a gateway address or
    /// outside the local domains.
    Refused,
    /// Not sent: sendmail failed. Tried again with the hourly pass and at
    /// start, NOTICE_ATTEMPTS times in all, and when the record fails again.
    Failed,
}

impl NoticeState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Sent => "sent",
            Self::Refused => "refused",
            Self::Failed => "failed",
        }
    }
}

/// The SMTP envelope of one message.
#[derive(Debug, Clone, Default)]
pub struct Envelope {
    pub queue_id: Option<String>,
    pub mail_from: String,
    pub client_addr: Option<String>,
}

/// Result of an append, per record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    New,
    /// A record with this id exists already: the same reply arrived before.
    Duplicate,
}

/// The delivery id: the same on every retry and on every MX host.
pub fn delivery_id(token: &str, message_id: Option<&str>, content: &str) -> String {
    let mut h = Sha256::new();
    for part in [token, message_id.unwrap_or(""), content] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// Builds the record for one gateway recipient (`rcpt` as received, `token` from it).
pub fn build_record(analysis: &Analysis, envelope: &Envelope, rcpt: &str, token: &str) -> Record {
    let itip = analysis.itip.as_ref();
    let answer = analysis.answer();
    let bounce = analysis.bounce.as_ref().map(|b| {
        serde_json::json!({
            "action": b.action,
            "status": b.status,
            "final_recipient": b.final_recipient,
            "diagnostic": b.diagnostic,
        })
    });
    let content = match (&analysis.icalendar, &bounce) {
        (Some(cal), None) => cal.clone(),
        (cal, Some(b)) => format!("{}\0{}", cal.as_deref().unwrap_or(""), b),
        (None, None) => String::new(),
    };
    let id = delivery_id(token, analysis.message_id.as_deref(), &content);
    let kind = match analysis.kind {
        Kind::Bounce => "bounce",
        _ => "reply",
    };
    let now = now_ms();
    let received_at = chrono::DateTime::<chrono::Utc>::from(UNIX_EPOCH + Duration::from_millis(now))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut payload = serde_json::json!({
        "id": id,
        "kind": kind,
        "received_at": received_at,
        "queue_id": envelope.queue_id,
        "message_id": analysis.message_id,
        "envelope": {
            "mail_from": envelope.mail_from,
            "rcpt": strip_brackets(rcpt),
            "client_addr": envelope.client_addr,
        },
        "from": analysis.from,
        "token": token,
        "method": itip.and_then(|i| i.method.clone()),
        "uid": itip.and_then(|i| i.uid.clone()),
        "attendee": answer.0,
        "partstat": answer.1,
        "authentication_results": analysis.authentication_results,
        "icalendar": analysis.icalendar,
    });
    if let (Some(b), Some(obj)) = (bounce, payload.as_object_mut()) {
        obj.insert("bounce".into(), b);
    }
    Record {
        id,
        state: State::Pending,
        kind: kind.into(),
        token_prefix: token_prefix(token),
        queue_id: envelope.queue_id.clone(),
        created_ms: now,
        attempts: 0,
        next_attempt_ms: now,
        last_error: None,
        repeats: 0,
        repeats_since_ms: 0,
        finished_ms: None,
        payload,
        message_ref: None,
        original: None,
        notice: None,
    }
}

fn strip_brackets(rcpt: &str) -> &str {
    let r = rcpt.trim();
    r.strip_prefix('<').and_then(|r| r.strip_suffix('>')).unwrap_or(r)
}

/// The record as stored: a long calendar text moves to CONTENT, the record
/// keeps its hash in `icalendar_ref`.
fn encode(rec: &Record, content: &mut redb::Table<&str, &[u8]>) -> Result<Vec<u8>, SpoolError> {
    let encode = |r: &Record| serde_json::to_vec(r).map_err(|e| SpoolError::with("spool encode", e));
    let shared = content::share(&rec.payload, content)?;
    if shared.is_none() && rec.original.is_none() {
        return encode(rec);
    }
    let mut stored = rec.clone();
    if let Some(key) = shared {
        content::refer(&mut stored.payload, key);
    }
    if let Some(original) = &rec.original {
        stored.message_ref = Some(content::store(original, content)?);
    }
    encode(&stored)
}

/// A stored record with its calendar text back in place.
pub(super) fn hydrate(mut rec: Record, content: &impl ReadableTable<&'static str, &'static [u8]>) -> Record {
    content::restore(&mut rec.payload, content);
    rec
}

/// The tables a record lives in, open in one write transaction.
pub(super) struct RecordTables<'t> {
    records: redb::Table<'t, &'static str, &'static [u8]>,
    pending: redb::Table<'t, &'static str, u64>,
    due: redb::Table<'t, (u64, &'static str), ()>,
    since: redb::Table<'t, &'static str, u64>,
    content: redb::Table<'t, &'static str, &'static [u8]>,
}

impl<'t> RecordTables<'t> {
    pub(super) fn open(txn: &'t redb::WriteTransaction) -> Result<Self, SpoolError> {
        Ok(Self {
            records: redb_try!(txn.open_table(RECORDS), "spool write"),
            pending: redb_try!(txn.open_table(PENDING), "spool write"),
            due: redb_try!(txn.open_table(DUE), "spool write"),
            since: redb_try!(txn.open_table(PENDING_SINCE), "spool write"),
            content: redb_try!(txn.open_table(CONTENT), "spool write"),
        })
    }

    /// A record and its pending index entries. A notice stored as sent
    /// stays sent: a copy of the record read before (a delivery attempt, a
    /// `queue retry`) never undoes it, so no organizer hears twice.
    pub(super) fn put(&mut self, rec: &Record) -> Result<(), SpoolError> {
        let stored_sent = redb_try!(self.records.get(rec.id.as_str()), "spool read")
            .and_then(|raw| serde_json::from_slice::<serde_json::Value>(raw.value()).ok())
            .and_then(|v| serde_json::from_value::<Notice>(v.get("notice")?.clone()).ok())
            .filter(|n| n.state == NoticeState::Sent);
        let kept;
        let rec = match stored_sent {
            Some(sent) if rec.notice.as_ref().map(|n| n.state) != Some(NoticeState::Sent) => {
                let mut r = rec.clone();
                r.notice = Some(sent);
                r.message_ref = None;
                r.original = None;
                kept = r;
                &kept
            }
            _ => rec,
        };
        let bytes = encode(rec, &mut self.content)?;
        let id = rec.id.as_str();
        redb_try!(self.records.insert(id, bytes.as_slice()), "spool write");
        let was_due = match rec.state {
            State::Pending => redb_try!(self.pending.insert(id, rec.next_attempt_ms), "spool write"),
            _ => redb_try!(self.pending.remove(id), "spool write"),
        }
        .map(|at| at.value());
        if let Some(at) = was_due {
            redb_try!(self.due.remove((at, id)), "spool write");
        }
        if rec.state == State::Pending {
            redb_try!(self.due.insert((rec.next_attempt_ms, id), ()), "spool write");
            redb_try!(self.since.insert(id, rec.created_ms), "spool write");
        } else {
            redb_try!(self.since.remove(id), "spool write");
        }
        Ok(())
    }

    /// A new record, unless one with its id is stored already.
    pub(super) fn add(&mut self, rec: &Record) -> Result<Appended, SpoolError> {
        if redb_try!(self.records.get(rec.id.as_str()), "spool read").is_some() {
            return Ok(Appended::Duplicate);
        }
        self.put(rec)?;
        Ok(Appended::New)
    }
}

/// Creates the tables of records a new spool lacks, and fills the
/// pending_since index once in a spool from before it.
pub(super) fn create_tables(db: &Database) -> Result<(), SpoolError> {
    let txn = redb_try!(db.begin_write(), "spool");
    let records = redb_try!(txn.open_table(RECORDS), "spool");
    let pending = redb_try!(txn.open_table(PENDING), "spool");
    let mut since = redb_try!(txn.open_table(PENDING_SINCE), "spool");
    redb_try!(txn.open_table(CONTENT), "spool");
    // The due index: the delivery worker's first scan of a new spool reads it.
    redb_try!(txn.open_table(DUE), "spool");
    // A spool from before the index: fill it once.
    if redb_try!(since.is_empty(), "spool") && !redb_try!(pending.is_empty(), "spool") {
        for entry in redb_try!(pending.iter(), "spool") {
            let (id, _) = redb_try!(entry, "spool");
            let created = redb_try!(records.get(id.value()), "spool")
                .and_then(|raw| serde_json::from_slice::<Record>(raw.value()).ok())
                .map_or(0, |r| r.created_ms);
            redb_try!(since.insert(id.value(), created), "spool");
        }
    }
    drop((records, pending, since));
    redb_try!(txn.commit(), "spool");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_depend_on_content() {
        assert_eq!(delivery_id("t", Some("<m>"), "c"), delivery_id("t", Some("<m>"), "c"));
        assert_ne!(delivery_id("t", Some("<m>"), "c"), delivery_id("t2", Some("<m>"), "c"));
        assert_ne!(delivery_id("ab", None, "c"), delivery_id("a", None, "bc"));
    }
}
