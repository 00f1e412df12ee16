//! The durable queue of replies: redb under `state_dir`.
//!
//! Appends from concurrent SMTP sessions go through one writer thread that
//! puts every request waiting at that moment into one transaction (group
//! commit): one fsync covers many replies, so durability does not cap
//! throughput. Delivery outcomes and journal events go the same way and
//! ride along (without an fsync of their own when nothing else waits). A
//! record's id is a hash of its content, so a reply that arrives twice is
//! stored, and delivered, once.

use crate::{
    address::token_prefix,
    analysis::{Analysis, Kind},
    clock::now_ms,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::{
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc,
    },
    thread,
    time::{Duration, UNIX_EPOCH},
};
use tokio::sync::{oneshot, Notify};

/// id → Record (JSON).
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
/// id → time of the next attempt (ms since the epoch), for pending records only.
const PENDING: TableDefinition<&str, u64> = TableDefinition::new("pending");
/// id → creation time (ms), for pending records only: metrics read it
/// instead of every record's payload.
const PENDING_SINCE: TableDefinition<&str, u64> = TableDefinition::new("pending_since");
/// (time of the next attempt, id) for pending records: a scan reads the
/// due ones and stops at the first not due, however long the backlog.
const DUE: TableDefinition<(u64, &str), ()> = TableDefinition::new("due");
/// "layout" → the spool's layout version.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// 1: records, pending, pending_since, content, journal. 2: due.
const LAYOUT: u64 = 2;

/// Page cache of the spool's database.
const SPOOL_CACHE: usize = 16 << 20;

/// Requests folded into one commit at most.
const MAX_GROUP: usize = 512;

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
}

/// The SMTP envelope of one message.
#[derive(Debug, Clone, Default)]
pub struct Envelope {
    pub queue_id: Option<String>,
    pub mail_from: String,
    pub client_addr: Option<String>,
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
    }
}

fn strip_brackets(rcpt: &str) -> &str {
    let r = rcpt.trim();
    r.strip_prefix('<').and_then(|r| r.strip_suffix('>')).unwrap_or(r)
}

/// The database handle, replaceable: redb must be closed and opened again
/// after an I/O error (a full disk, say) before it takes writes again.
struct DbCell {
    path: std::path::PathBuf,
    db: std::sync::RwLock<Option<Arc<Database>>>,
}

impl DbCell {
    fn get(&self) -> Result<Arc<Database>, SpoolError> {
        let guard = self.db.read().map_err(|_| SpoolError("spool lock poisoned".into()))?;
        guard
            .clone()
            .ok_or_else(|| SpoolError("spool is being reopened".into()))
    }

    /// Closes and opens the database again; waits briefly for readers.
    fn reopen(&self) {
        let Ok(mut guard) = self.db.write() else { return };
        if let Some(mut old) = guard.take() {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => {
                        drop(db);
                        break;
                    }
                    Err(still_shared) if std::time::Instant::now() < deadline => {
                        old = still_shared;
                        thread::sleep(Duration::from_millis(10));
                    }
                    Err(still_shared) => {
                        // Someone holds it; try again at the next failure.
                        *guard = Some(still_shared);
                        return;
                    }
                }
            }
        }
        match Database::create(&self.path) {
            Ok(db) => {
                tracing::warn!("spool {} reopened after an I/O error", self.path.display());
                *guard = Some(Arc::new(db));
            }
            Err(e) => tracing::error!("spool {} cannot be reopened: {e}", self.path.display()),
        }
    }
}

/// Result of an append, per record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    New,
    /// A record with this id exists already: the same reply arrived before.
    Duplicate,
}

/// Work for the writer thread.
enum Work {
    /// New records, durable before the reply.
    Append {
        records: Vec<Record>,
        reply: oneshot::Sender<Result<Vec<Appended>, String>>,
    },
    /// A delivery outcome and its journal event, and what to do once they
    /// are committed (not necessarily fsynced: lost in a crash, an outcome
    /// costs one more delivery with the same Idempotency-Key).
    Outcome {
        record: Box<Record>,
        event: Option<Box<crate::journal::Event>>,
        done: Box<dyn FnOnce(Result<(), String>) + Send>,
    },
    /// A journal event: nobody waits for it.
    Journal(Box<crate::journal::Event>),
    /// Outcomes or journal events wait in `later`.
    Wake,
    /// Everything before it committed; `durable`: and fsynced.
    Flush {
        durable: bool,
        reply: mpsc::SyncSender<Result<(), String>>,
    },
}

/// How long outcomes and journal events wait for an append to share a
/// commit with, before they are committed alone.
const LINGER: Duration = Duration::from_millis(50);

/// Outcomes and journal events waiting for the writer at most.
const MAX_LATER: usize = 100_000;
/// Whether events were dropped for MAX_LATER (logged once until it empties).
static LATER_FULL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A session's append may come soon; see `Spool::append_coming`.
pub struct AppendComing(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for AppendComing {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long a commit waits for appends that other sessions are about to
/// send: under load one fsync then serves more replies; alone, none waits.
const COMMIT_DELAY: Duration = Duration::from_millis(1);

/// New records handed straight to the delivery worker at most; beyond, it
/// finds them by scanning the spool.
const FRESH: usize = 256;

/// Outcomes and journal events for the writer's next commit. They are put
/// here, not into the channel, so that only the first of a batch wakes it.
type Later = Arc<std::sync::Mutex<Vec<Work>>>;

#[derive(Debug)]
pub struct SpoolError(pub String);

impl std::fmt::Display for SpoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SpoolError {}

macro_rules! redb_try {
    ($e:expr, $ctx:expr) => {
        $e.map_err(|e| SpoolError(format!("{}: {}", $ctx, e)))?
    };
}

/// Handle to the spool; cheap to clone.
#[derive(Clone)]
pub struct Spool {
    db: Arc<DbCell>,
    work: mpsc::Sender<Work>,
    later: Later,
    /// Sessions whose append may come soon (see `append_coming`).
    coming: Arc<std::sync::atomic::AtomicUsize>,
    /// New records as they are committed, for the delivery worker (taken once).
    fresh: Arc<std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<Record>>>>,
    /// Woken whenever a new record is pending.
    pub notify: Arc<Notify>,
    /// Durable commits of the writer (each one fsync), for metrics and tests.
    commits: Arc<AtomicU64>,
    /// journal.max_events: the journal is trimmed to it as it grows.
    journal_max: Arc<std::sync::atomic::AtomicUsize>,
    /// Since when (ms) the delivery worker takes the target as down; 0: up.
    target_down: Arc<AtomicU64>,
}

impl Spool {
    /// Opens (or creates) the spool at `path`. A file that is not a spool is
    /// an error, never reset.
    pub fn open(path: &Path) -> Result<Self, SpoolError> {
        Self::open_waiting(path, Duration::ZERO)
    }

    /// As `open`, waiting up to `wait` while another process (the daemon, or
    /// `imip-milter deliver`) holds the spool.
    pub fn open_waiting(path: &Path, wait: Duration) -> Result<Self, SpoolError> {
        let start = std::time::Instant::now();
        let db = loop {
            // redb caches up to 1 GiB of pages by default: memory would grow
            // with the backlog. The hot pages (due index, recent records) fit.
            match Database::builder().set_cache_size(SPOOL_CACHE).create(path) {
                Ok(db) => break db,
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if start.elapsed() < wait => {
                    thread::sleep(Duration::from_millis(50));
                }
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                    return Err(SpoolError(format!(
                        "spool {} is in use by another process",
                        path.display()
                    )))
                }
                Err(redb::DatabaseError::Storage(redb::StorageError::Io(e)))
                    if e.kind() == std::io::ErrorKind::PermissionDenied =>
                {
                    use std::os::unix::fs::MetadataExt;
                    let owner = std::fs::metadata(path)
                        .map(|m| format!("it belongs to uid {} gid {} (mode {:o})", m.uid(), m.gid(), m.mode() & 0o7777))
                        .unwrap_or_else(|_| "its directory may not be written".into());
                    return Err(SpoolError(format!(
                        "cannot open spool {}: permission denied: {owner}; run as the state_dir's owner, \
                         or chown the file to the service user (imip-milter)",
                        path.display()
                    )));
                }
                Err(e) => {
                    return Err(SpoolError(format!(
                        "cannot open spool {}: {e} (a file that is not an imip-milter spool is never overwritten; move it away)",
                        path.display()
                    )))
                }
            }
        };
        // Tokens are capabilities: the spool is for the daemon's user alone.
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        let db = Arc::new(db);
        migrate(&db, path)?;
        {
            let txn = redb_try!(db.begin_write(), "spool");
            let records = redb_try!(txn.open_table(RECORDS), "spool");
            let pending = redb_try!(txn.open_table(PENDING), "spool");
            let mut since = redb_try!(txn.open_table(PENDING_SINCE), "spool");
            redb_try!(txn.open_table(CONTENT), "spool");
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
        }
        let db = Arc::new(DbCell {
            path: path.to_owned(),
            db: std::sync::RwLock::new(Some(db)),
        });
        let (tx, rx) = mpsc::channel::<Work>();
        let notify = Arc::new(Notify::new());
        let commits = Arc::new(AtomicU64::new(0));
        let journal_max = Arc::new(std::sync::atomic::AtomicUsize::new(1_000_000));
        let later = Later::default();
        let (fresh_tx, fresh_rx) = tokio::sync::mpsc::channel(FRESH);
        let coming = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let writer = Writer {
            coming: coming.clone(),
            db: db.clone(),
            notify: notify.clone(),
            commits: commits.clone(),
            journal_max: journal_max.clone(),
            later: later.clone(),
            fresh: fresh_tx,
        };
        thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| SpoolError(format!("cannot start the spool writer: {e}")))?;
        Ok(Self {
            db,
            work: tx,
            later,
            fresh: Arc::new(std::sync::Mutex::new(Some(fresh_rx))),
            coming,
            notify,
            commits,
            journal_max,
            target_down: Arc::default(),
        })
    }

    /// The database, for the token store that lives in the same file. Hold
    /// it only for one operation: after an I/O error it is replaced.
    pub fn database(&self) -> Result<Arc<Database>, SpoolError> {
        self.db.get()
    }

    /// The records each append stores, as they are committed: the delivery
    /// worker starts on them without reading the spool. Only one taker;
    /// whatever does not fit waits in the spool for a scan (`notify`).
    pub fn take_fresh(&self) -> Option<tokio::sync::mpsc::Receiver<Record>> {
        self.fresh.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Says that this session is reading a message whose append may follow
    /// at once; until the guard is dropped, a commit of other sessions' appends
    /// waits up to `COMMIT_DELAY` for it, so one fsync serves both.
    pub fn append_coming(&self) -> AppendComing {
        self.coming.fetch_add(1, Ordering::Relaxed);
        AppendComing(self.coming.clone())
    }

    /// Since when the target is taken as down (`queue list`, metrics).
    pub fn target_down_since(&self) -> Option<u64> {
        Some(self.target_down.load(Ordering::Relaxed)).filter(|t| *t > 0)
    }

    pub fn set_target_down(&self, since: Option<u64>) {
        self.target_down.store(since.map_or(0, |t| t.max(1)), Ordering::Relaxed);
    }

    /// Append transactions committed so far.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Stores records durably; returns once they are on disk.
    pub async fn append(&self, records: Vec<Record>) -> Result<Vec<Appended>, SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.send(Work::Append { records, reply })?;
        rx.await
            .map_err(|_| SpoolError("spool writer has stopped".into()))?
            .map_err(SpoolError)
    }

    /// Records a delivery outcome and its journal event with the writer's
    /// next commit; `done` runs once it is committed (made durable by the
    /// next append, or `flush`).
    pub fn record_outcome(
        &self,
        rec: Record,
        event: Option<crate::journal::Event>,
        done: impl FnOnce(Result<(), String>) + Send + 'static,
    ) {
        self.later(Work::Outcome {
            record: Box::new(rec),
            event: event.map(Box::new),
            done: Box::new(done),
        });
    }

    /// Adds an event to the journal with the writer's next commit; nobody
    /// waits for it. `flush` makes it durable.
    pub fn journal_later(&self, event: crate::journal::Event) {
        self.later(Work::Journal(Box::new(event)));
    }

    fn later(&self, work: Work) {
        let first = {
            let mut later = self.later.lock().unwrap_or_else(|p| p.into_inner());
            // The writer takes these every LINGER; many more means it hangs
            // (a disk that does not answer): journal events then go, not memory.
            if later.len() >= MAX_LATER && matches!(work, Work::Journal(_)) {
                drop(later);
                if !LATER_FULL.swap(true, Ordering::Relaxed) {
                    tracing::warn!("journal: the spool writer is behind by {MAX_LATER} items; events are dropped until it catches up");
                }
                return;
            }
            later.push(work);
            later.len() == 1
        };
        if first && self.send(Work::Wake).is_err() {
            // The writer is gone (shutting down): what waits is lost with it.
            tracing::warn!("spool writer has stopped; outcome or journal event not recorded");
        }
    }

    fn send(&self, work: Work) -> Result<(), SpoolError> {
        self.work
            .send(work)
            .map_err(|_| SpoolError("spool writer has stopped".into()))
    }

    /// Pending records due at `now`, oldest due first, at most `limit`; and
    /// the time the first record not yet due falls due (None when `limit`
    /// cut the list short). Reads the due records and one more, not the
    /// backlog: `skip` (the ones in flight) is bounded by the concurrency.
    pub fn due(
        &self,
        now: u64,
        limit: usize,
        skip: &dyn Fn(&str) -> bool,
    ) -> Result<(Vec<Record>, Option<u64>), SpoolError> {
        let txn = redb_try!(self.db.get()?.begin_read(), "spool read");
        let index = redb_try!(txn.open_table(DUE), "spool read");
        let records = redb_try!(txn.open_table(RECORDS), "spool read");
        let content = redb_try!(txn.open_table(CONTENT), "spool read");
        let mut due = Vec::new();
        for entry in redb_try!(index.iter(), "spool read") {
            let (key, _) = redb_try!(entry, "spool read");
            let (at, id) = key.value();
            if at > now {
                return Ok((due, Some(at)));
            }
            if skip(id) {
                continue;
            }
            if due.len() >= limit {
                break;
            }
            if let Some(raw) = redb_try!(records.get(id), "spool read") {
                if let Ok(rec) = serde_json::from_slice::<Record>(raw.value()) {
                    due.push(hydrate(rec, &content));
                }
            }
        }
        Ok((due, None))
    }

    pub fn get(&self, id: &str) -> Result<Option<Record>, SpoolError> {
        let txn = redb_try!(self.db.get()?.begin_read(), "spool read");
        let records = redb_try!(txn.open_table(RECORDS), "spool read");
        let content = redb_try!(txn.open_table(CONTENT), "spool read");
        let raw = redb_try!(records.get(id), "spool read");
        Ok(raw
            .and_then(|r| serde_json::from_slice(r.value()).ok())
            .map(|r| hydrate(r, &content)))
    }

    /// All records, oldest first; only pending and failed unless `all`.
    pub fn list(&self, all: bool) -> Result<Vec<Record>, SpoolError> {
        let txn = redb_try!(self.db.get()?.begin_read(), "spool read");
        let records = redb_try!(txn.open_table(RECORDS), "spool read");
        let mut out = Vec::new();
        for entry in redb_try!(records.iter(), "spool read") {
            let (_, raw) = redb_try!(entry, "spool read");
            if let Ok(rec) = serde_json::from_slice::<Record>(raw.value()) {
                if all || rec.state != State::Delivered {
                    out.push(rec);
                }
            }
        }
        out.sort_by_key(|r| r.created_ms);
        Ok(out)
    }

    /// Writes a changed record (and its pending index entry) durably.
    pub fn update(&self, rec: &Record) -> Result<(), SpoolError> {
        let txn = redb_try!(self.db.get()?.begin_write(), "spool write");
        RecordTables::open(&txn)?.put(rec)?;
        redb_try!(txn.commit(), "spool commit");
        if rec.state == State::Pending {
            self.notify.notify_one();
        }
        Ok(())
    }

    /// Makes everything written before durable: the writer's queued work
    /// (journal events, outcomes) and every earlier commit.
    pub fn flush(&self) -> Result<(), SpoolError> {
        self.wait_for_writer(true)
    }

    /// Waits until everything handed to the writer before is committed
    /// (readers then see it), without an fsync of its own.
    pub fn settle(&self) -> Result<(), SpoolError> {
        self.wait_for_writer(false)
    }

    fn wait_for_writer(&self, durable: bool) -> Result<(), SpoolError> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.send(Work::Flush { durable, reply })?;
        rx.recv()
            .map_err(|_| SpoolError("spool writer has stopped".into()))?
            .map_err(SpoolError)
    }

    /// Makes a failed (or waiting) record due now. Ok(false): no such record.
    pub fn retry(&self, id: &str) -> Result<bool, SpoolError> {
        let Some(mut rec) = self.get(id)? else {
            return Ok(false);
        };
        if rec.state == State::Delivered {
            return Err(SpoolError(format!("{id} was delivered already")));
        }
        rec.state = State::Pending;
        rec.next_attempt_ms = now_ms();
        // A manual retry also restarts the age limit.
        rec.created_ms = rec.next_attempt_ms;
        rec.finished_ms = None;
        self.update(&rec)?;
        Ok(true)
    }

    /// Makes every waiting and every failed record due now, as `postqueue
    /// -f` does for Postfix's queue; returns how many.
    pub fn retry_all(&self) -> Result<usize, SpoolError> {
        let due: Vec<String> = self
            .list(false)?
            .into_iter()
            .filter(|r| matches!(r.state, State::Failed | State::Pending))
            .map(|r| r.id)
            .collect();
        for id in &due {
            self.retry(id)?;
        }
        Ok(due.len())
    }

    /// The records `what` names: a record id or a prefix of one (4
    /// characters at least, and only one record), a Postfix queue id, or a
    /// Message-ID (with or without its angle brackets).
    pub fn find(&self, what: &str) -> Result<Vec<Record>, SpoolError> {
        if let Some(r) = self.get(what)? {
            return Ok(vec![r]);
        }
        let bare = what.trim().trim_start_matches('<').trim_end_matches('>');
        let all = self.list(true)?;
        let by_mail: Vec<Record> = all
            .iter()
            .filter(|r| {
                r.queue_id.as_deref() == Some(what)
                    || r.payload["message_id"]
                        .as_str()
                        .is_some_and(|m| m.trim_start_matches('<').trim_end_matches('>') == bare)
            })
            .cloned()
            .collect();
        if !by_mail.is_empty() {
            return Ok(by_mail);
        }
        let by_prefix: Vec<Record> = all
            .into_iter()
            .filter(|r| what.len() >= 4 && r.id.starts_with(what))
            .collect();
        if by_prefix.len() > 1 {
            return Err(SpoolError(format!(
                "{what} begins {} record ids: give more of it",
                by_prefix.len()
            )));
        }
        Ok(by_prefix)
    }

    /// Removes a record. Ok(false): no such record.
    pub fn delete(&self, id: &str) -> Result<bool, SpoolError> {
        let txn = redb_try!(self.db.get()?.begin_write(), "spool write");
        let existed;
        {
            let mut records = redb_try!(txn.open_table(RECORDS), "spool write");
            let mut pending = redb_try!(txn.open_table(PENDING), "spool write");
            let mut since = redb_try!(txn.open_table(PENDING_SINCE), "spool write");
            let mut index = redb_try!(txn.open_table(DUE), "spool write");
            existed = redb_try!(records.remove(id), "spool write").is_some();
            let was_due = redb_try!(pending.remove(id), "spool write").map(|at| at.value());
            if let Some(at) = was_due {
                redb_try!(index.remove((at, id)), "spool write");
            }
            redb_try!(since.remove(id), "spool write");
        }
        redb_try!(txn.commit(), "spool commit");
        Ok(existed)
    }

    /// journal.max_events, enforced as the journal grows.
    pub fn set_journal_limit(&self, max_events: usize) {
        self.journal_max.store(max_events.max(1), Ordering::Relaxed);
    }

    /// The events that match, oldest first, at most `journal::MAX_LISTED`.
    pub fn journal(&self, filter: &crate::journal::Filter) -> Result<Vec<crate::journal::Event>, SpoolError> {
        let txn = redb_try!(self.db.get()?.begin_read(), "journal read");
        let table = match txn.open_table(JOURNAL) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(SpoolError(format!("journal read: {e}"))),
        };
        let mut out = Vec::new();
        for entry in redb_try!(table.range(filter.since_ms.saturating_mul(1000)..), "journal read") {
            let (key, value) = redb_try!(entry, "journal read");
            let Ok(mut e) = serde_json::from_slice::<crate::journal::Event>(value.value()) else {
                continue;
            };
            e.time_ms = key.value() / 1000;
            if e.matches(filter) {
                out.push(e);
                if out.len() >= crate::journal::MAX_LISTED {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Forgets journal events before `before_ms`, and the oldest beyond
    /// `max_events`; returns how many.
    pub fn journal_purge(&self, before_ms: u64, max_events: usize) -> Result<usize, SpoolError> {
        let txn = redb_try!(self.db.get()?.begin_write(), "journal write");
        let removed;
        {
            let mut table = redb_try!(txn.open_table(JOURNAL), "journal write");
            let total = redb_try!(table.len(), "journal read") as usize;
            let mut old: Vec<u64> = Vec::new();
            for entry in redb_try!(table.iter(), "journal read") {
                let (key, _) = redb_try!(entry, "journal read");
                let k = key.value();
                if k / 1000 < before_ms || total.saturating_sub(old.len()) > max_events {
                    old.push(k);
                } else {
                    break;
                }
            }
            for k in &old {
                redb_try!(table.remove(*k), "journal write");
            }
            removed = old.len();
        }
        redb_try!(txn.commit(), "journal commit");
        Ok(removed)
    }

    /// Forgets delivered records finished before `delivered_before` and
    /// failed ones before `failed_before` (ms); returns how many.
    pub fn purge_finished(&self, delivered_before: u64, failed_before: u64) -> Result<usize, SpoolError> {
        let all = self.list(true)?;
        let old: Vec<String> = all
            .iter()
            .filter(|r| {
                let finished = r.finished_ms.unwrap_or(r.created_ms);
                match r.state {
                    State::Delivered => finished < delivered_before,
                    State::Failed => finished < failed_before,
                    State::Pending => false,
                }
            })
            .map(|r| r.id.clone())
            .collect();
        // Calendar texts no remaining record refers to go too.
        let kept: std::collections::HashSet<&str> = all
            .iter()
            .filter(|r| !old.contains(&r.id))
            .filter_map(|r| r.payload.get("icalendar_ref").and_then(|v| v.as_str()))
            .collect();
        let txn = redb_try!(self.db.get()?.begin_write(), "spool write");
        {
            let mut records = redb_try!(txn.open_table(RECORDS), "spool write");
            for id in &old {
                redb_try!(records.remove(id.as_str()), "spool write");
            }
            let mut content = redb_try!(txn.open_table(CONTENT), "spool write");
            let mut unused = Vec::new();
            for entry in redb_try!(content.iter(), "spool read") {
                let (key, _) = redb_try!(entry, "spool read");
                if !kept.contains(key.value()) {
                    unused.push(key.value().to_owned());
                }
            }
            for key in &unused {
                redb_try!(content.remove(key.as_str()), "spool write");
            }
        }
        redb_try!(txn.commit(), "spool commit");
        Ok(old.len())
    }

    /// Pending records created before `before` (ms), at most `limit`, but
    /// those `skip` names. Reads the pending index whole: for the hourly
    /// expiry, not for delivery.
    pub fn pending_created_before(
        &self,
        before: u64,
        limit: usize,
        skip: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<Record>, SpoolError> {
        let txn = redb_try!(self.db.get()?.begin_read(), "spool read");
        let since = redb_try!(txn.open_table(PENDING_SINCE), "spool read");
        let records = redb_try!(txn.open_table(RECORDS), "spool read");
        let content = redb_try!(txn.open_table(CONTENT), "spool read");
        let mut out = Vec::new();
        for entry in redb_try!(since.iter(), "spool read") {
            let (id, created) = redb_try!(entry, "spool read");
            if created.value() >= before || skip(id.value()) {
                continue;
            }
            if let Some(raw) = redb_try!(records.get(id.value()), "spool read") {
                if let Ok(rec) = serde_json::from_slice::<Record>(raw.value()) {
                    out.push(hydrate(rec, &content));
                }
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Counts of pending records and the creation time of the oldest one.
    /// From the index alone: no record's payload is read.
    pub fn pending_stats(&self) -> Result<(usize, Option<u64>), SpoolError> {
        let txn = redb_try!(self.db.get()?.begin_read(), "spool read");
        let since = redb_try!(txn.open_table(PENDING_SINCE), "spool read");
        let mut count = 0;
        let mut oldest: Option<u64> = None;
        for entry in redb_try!(since.iter(), "spool read") {
            let (_, created) = redb_try!(entry, "spool read");
            count += 1;
            oldest = Some(oldest.map_or(created.value(), |o| o.min(created.value())));
        }
        Ok((count, oldest))
    }
}

/// Calendar text, stored once under its hash however many records (one
/// per gateway recipient) carry it.
const CONTENT: TableDefinition<&str, &[u8]> = TableDefinition::new("content");
/// The journal (see `journal`): time in ms × 1000 + a sequence number → event.
const JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("journal");
static JOURNAL_SEQ: AtomicU64 = AtomicU64::new(0);
/// Shorter calendar text stays inside its record.
const SHARE_FROM: usize = 2048;

/// The record as stored: a long calendar text moves to CONTENT, the record
/// keeps its hash in `icalendar_ref`.
fn encode(rec: &Record, content: &mut redb::Table<&str, &[u8]>) -> Result<Vec<u8>, SpoolError> {
    let encode = |r: &Record| serde_json::to_vec(r).map_err(|e| SpoolError(format!("spool encode: {e}")));
    let Some(text) = rec.payload.get("icalendar").and_then(|v| v.as_str()) else {
        return encode(rec);
    };
    if text.len() < SHARE_FROM {
        return encode(rec);
    }
    let key: String = Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if redb_try!(content.get(key.as_str()), "spool read").is_none() {
        redb_try!(content.insert(key.as_str(), text.as_bytes()), "spool write");
    }
    let mut stored = rec.clone();
    if let Some(obj) = stored.payload.as_object_mut() {
        obj.remove("icalendar");
        obj.insert("icalendar_ref".into(), key.into());
    }
    encode(&stored)
}

/// A stored record with its calendar text back in place.
fn hydrate(mut rec: Record, content: &impl ReadableTable<&'static str, &'static [u8]>) -> Record {
    let key = rec
        .payload
        .get("icalendar_ref")
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    if let (Some(key), Some(obj)) = (key, rec.payload.as_object_mut()) {
        if let Ok(Some(text)) = content.get(key.as_str()) {
            obj.insert(
                "icalendar".into(),
                String::from_utf8_lossy(text.value()).into_owned().into(),
            );
            obj.remove("icalendar_ref");
        }
    }
    rec
}

/// The tables a record lives in, open in one write transaction.
struct RecordTables<'t> {
    records: redb::Table<'t, &'static str, &'static [u8]>,
    pending: redb::Table<'t, &'static str, u64>,
    due: redb::Table<'t, (u64, &'static str), ()>,
    since: redb::Table<'t, &'static str, u64>,
    content: redb::Table<'t, &'static str, &'static [u8]>,
}

impl<'t> RecordTables<'t> {
    fn open(txn: &'t redb::WriteTransaction) -> Result<Self, SpoolError> {
        Ok(Self {
            records: redb_try!(txn.open_table(RECORDS), "spool write"),
            pending: redb_try!(txn.open_table(PENDING), "spool write"),
            due: redb_try!(txn.open_table(DUE), "spool write"),
            since: redb_try!(txn.open_table(PENDING_SINCE), "spool write"),
            content: redb_try!(txn.open_table(CONTENT), "spool write"),
        })
    }

    /// A record and its pending index entries.
    fn put(&mut self, rec: &Record) -> Result<(), SpoolError> {
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
    fn add(&mut self, rec: &Record) -> Result<Appended, SpoolError> {
        if redb_try!(self.records.get(rec.id.as_str()), "spool read").is_some() {
            return Ok(Appended::Duplicate);
        }
        self.put(rec)?;
        Ok(Appended::New)
    }
}

/// Brings a spool of an earlier layout to `LAYOUT`, in one transaction at
/// start; a spool of a later one (a downgrade) is refused, never rewritten.
fn migrate(db: &Database, path: &Path) -> Result<(), SpoolError> {
    let txn = redb_try!(db.begin_write(), "spool");
    {
        let mut meta = redb_try!(txn.open_table(META), "spool");
        let records = redb_try!(txn.open_table(RECORDS), "spool");
        let version = redb_try!(meta.get("layout"), "spool").map(|v| v.value());
        // No version: a new spool, or one of layout 1 (before the version).
        let version = match version {
            Some(v) => v,
            None if redb_try!(records.is_empty(), "spool") => LAYOUT,
            None => 1,
        };
        if version > LAYOUT {
            return Err(SpoolError(format!(
                "spool {} has layout {version}, newer than this imip-milter's {LAYOUT}: run the newer version, \
                 or move the file away",
                path.display()
            )));
        }
        if version < 2 {
            let pending = redb_try!(txn.open_table(PENDING), "spool");
            let mut index = redb_try!(txn.open_table(DUE), "spool");
            let mut n = 0;
            for entry in redb_try!(pending.iter(), "spool") {
                let (id, at) = redb_try!(entry, "spool");
                redb_try!(index.insert((at.value(), id.value()), ()), "spool");
                n += 1;
            }
            tracing::info!(
                "spool {}: layout 1 → 2, {n} pending records indexed by due time",
                path.display()
            );
        }
        redb_try!(meta.insert("layout", LAYOUT), "spool");
    }
    redb_try!(txn.commit(), "spool");
    Ok(())
}

/// Journal events, the oldest beyond `max` dropped at once, whatever the rate.
fn put_events<'a>(
    txn: &redb::WriteTransaction,
    events: impl Iterator<Item = &'a crate::journal::Event>,
    max: usize,
) -> Result<(), SpoolError> {
    let mut table = redb_try!(txn.open_table(JOURNAL), "journal write");
    for e in events {
        let seq = JOURNAL_SEQ.fetch_add(1, Ordering::Relaxed) % 1000;
        let key = e.time_ms.saturating_mul(1000).saturating_add(seq);
        let bytes = serde_json::to_vec(&e.bounded()).map_err(|x| SpoolError(format!("journal encode: {x}")))?;
        redb_try!(table.insert(key, bytes.as_slice()), "journal write");
    }
    let over = redb_try!(table.len(), "journal read").saturating_sub(max as u64);
    for _ in 0..over {
        redb_try!(table.pop_first(), "journal write");
    }
    Ok(())
}

struct Writer {
    db: Arc<DbCell>,
    notify: Arc<Notify>,
    commits: Arc<AtomicU64>,
    journal_max: Arc<std::sync::atomic::AtomicUsize>,
    later: Later,
    fresh: tokio::sync::mpsc::Sender<Record>,
    coming: Arc<std::sync::atomic::AtomicUsize>,
}

impl Writer {
    fn run(self, rx: mpsc::Receiver<Work>) {
        // Ends when every Spool handle (and so every sender) is gone.
        while let Ok(first) = rx.recv() {
            let mut group = vec![first];
            Self::take_waiting(&rx, &mut group);
            if group.iter().any(|w| matches!(w, Work::Append { .. })) {
                // Group commit: appends other sessions are about to send share this fsync.
                let deadline = std::time::Instant::now() + COMMIT_DELAY;
                while self.coming.load(Ordering::Relaxed) > 0 && group.len() < MAX_GROUP {
                    match rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
                        Ok(w) => {
                            group.push(w);
                            Self::take_waiting(&rx, &mut group);
                        }
                        Err(_) => break,
                    }
                }
            } else if group.iter().all(|w| matches!(w, Work::Wake)) {
                // Only outcomes and journal events: wait a moment for an
                // append to share the commit with.
                if let Ok(w) = rx.recv_timeout(LINGER) {
                    group.push(w);
                    Self::take_waiting(&rx, &mut group);
                }
            }
            group.extend(self.later.lock().unwrap_or_else(|p| p.into_inner()).drain(..));
            LATER_FULL.store(false, Ordering::Relaxed);
            self.commit(group);
        }
        // Whatever still waits, before the thread ends.
        let rest: Vec<Work> = self.later.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
        if !rest.is_empty() {
            self.commit(rest);
        }
    }

    fn take_waiting(rx: &mpsc::Receiver<Work>, group: &mut Vec<Work>) {
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(w) => group.push(w),
                Err(_) => break,
            }
        }
    }

    fn commit(&self, group: Vec<Work>) {
        let durable = group
            .iter()
            .any(|w| matches!(w, Work::Append { .. } | Work::Flush { durable: true, .. }));
        let nothing = group
            .iter()
            .all(|w| matches!(w, Work::Flush { durable: false, .. } | Work::Wake));
        let result = match self.db.get() {
            Ok(_) if nothing => Ok(Vec::new()),
            Ok(handle) => {
                let r = self.write(&handle, &group, durable);
                drop(handle);
                if let Err(e) = &r {
                    if e.contains("Previous I/O error") || e.contains("No space left") || e.contains("I/O error") {
                        // redb refuses all work after an I/O error until reopened;
                        // this group is refused (451), later ones find it working.
                        self.db.reopen();
                    }
                }
                r
            }
            Err(e) => {
                self.db.reopen();
                Err(e.0)
            }
        };
        if durable {
            self.commits.fetch_add(1, Ordering::Relaxed);
        }
        // Whether the delivery worker must look into the spool for work.
        let mut scan = false;
        let mut lost_events = 0;
        match result {
            Ok(appended) => {
                let mut appended = appended.into_iter();
                for work in group {
                    match work {
                        Work::Append { records, reply } => {
                            let out = appended.next().unwrap_or_default();
                            for (rec, how) in records.into_iter().zip(&out) {
                                if *how == Appended::New {
                                    // Handed over when the worker can take it; else found by a scan.
                                    scan |= self.fresh.try_send(rec).is_err();
                                }
                            }
                            let _ = reply.send(Ok(out));
                        }
                        Work::Outcome { record, done, .. } => {
                            scan |= record.state == State::Pending;
                            done(Ok(()));
                        }
                        Work::Journal(_) | Work::Wake => {}
                        Work::Flush { reply, .. } => {
                            let _ = reply.send(Ok(()));
                        }
                    }
                }
            }
            Err(e) => {
                for work in group {
                    match work {
                        Work::Append { reply, .. } => {
                            let _ = reply.send(Err(e.clone()));
                        }
                        Work::Outcome { done, .. } => done(Err(e.clone())),
                        Work::Journal(_) => lost_events += 1,
                        Work::Wake => {}
                        Work::Flush { reply, .. } => {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                }
                if lost_events > 0 {
                    tracing::warn!("journal: {lost_events} events not recorded: {e}");
                }
            }
        }
        if scan {
            self.notify.notify_one();
        }
    }

    /// One transaction for the group: appends (skipping ids stored
    /// already), outcomes, journal events. Returns what each append found.
    fn write(&self, db: &Database, group: &[Work], durable: bool) -> Result<Vec<Vec<Appended>>, String> {
        let run = || -> Result<Vec<Vec<Appended>>, SpoolError> {
            let mut txn = redb_try!(db.begin_write(), "spool write");
            if !durable {
                let _ = txn.set_durability(Durability::None);
            }
            let mut appended = Vec::new();
            {
                let mut tables = RecordTables::open(&txn)?;
                for work in group {
                    match work {
                        Work::Append { records, .. } => {
                            appended.push(records.iter().map(|r| tables.add(r)).collect::<Result<Vec<_>, _>>()?);
                        }
                        Work::Outcome { record, .. } => tables.put(record)?,
                        _ => {}
                    }
                }
            }
            let events = group.iter().filter_map(|w| match w {
                Work::Outcome { event, .. } => event.as_deref(),
                Work::Journal(e) => Some(e.as_ref()),
                _ => None,
            });
            put_events(&txn, events, self.journal_max.load(Ordering::Relaxed))?;
            // Durable (the default) when an append or a flush waits: fsync
            // before anyone hears "stored".
            redb_try!(txn.commit(), "spool commit");
            Ok(appended)
        };
        run().map_err(|e| e.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::analyse;

    fn record(body: &str) -> Record {
        let raw = format!(
            "From: b@example.com\r\nMessage-ID: <m1@x>\r\nContent-Type: text/calendar; method=REPLY\r\n\r\nBEGIN:VCALENDAR\r\nMETHOD:REPLY\r\nBEGIN:VEVENT\r\nUID:{body}\r\nATTENDEE;PARTSTAT=ACCEPTED:mailto:b@example.com\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
        );
        let a = analyse(raw.as_bytes());
        build_record(
            &a,
            &Envelope::default(),
            "<calendar+abcdefgh12@example.org>",
            "abcdefgh12",
        )
    }

    #[tokio::test]
    async fn append_dedup_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.redb");
        {
            let spool = Spool::open(&path).unwrap();
            let r = record("u1");
            assert_eq!(r.payload["envelope"]["rcpt"], "calendar+abcdefgh12@example.org");
            assert_eq!(r.payload["uid"], "u1");
            assert_eq!(spool.append(vec![r.clone()]).await.unwrap(), vec![Appended::New]);
            assert_eq!(
                spool.append(vec![record("u1")]).await.unwrap(),
                vec![Appended::Duplicate]
            );
            assert_eq!(spool.append(vec![record("u2")]).await.unwrap(), vec![Appended::New]);
        }
        // Let the writer thread drop its handle before reopening.
        let mut spool = None;
        for _ in 0..100 {
            match Spool::open(&path) {
                Ok(s) => {
                    spool = Some(s);
                    break;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let spool = spool.expect("reopen");
        let (due, _) = spool.due(now_ms() + 1, 10, &|_| false).unwrap();
        assert_eq!(due.len(), 2);
        let mut r = due[0].clone();
        r.state = State::Failed;
        spool.update(&r).unwrap();
        assert_eq!(spool.due(now_ms() + 1, 10, &|_| false).unwrap().0.len(), 1);
        // The failed one and the waiting one: both due now.
        assert_eq!(spool.retry_all().unwrap(), 2);
        assert_eq!(spool.due(now_ms() + 1, 10, &|_| false).unwrap().0.len(), 2);
        assert!(spool.delete(&r.id).unwrap());
        assert!(!spool.delete(&r.id).unwrap());
    }

    #[tokio::test]
    async fn concurrent_appends_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool.redb")).unwrap();
        let mut tasks = Vec::new();
        for i in 0..200 {
            let s = spool.clone();
            tasks.push(tokio::spawn(
                async move { s.append(vec![record(&format!("c{i}"))]).await },
            ));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), vec![Appended::New]);
        }
        assert_eq!(spool.list(false).unwrap().len(), 200);
        // Requests waiting while a commit runs share the next one.
        assert!(spool.commits() < 100, "{} commits for 200 appends", spool.commits());
    }

    /// Outcomes and journal events ride along with an append's commit; on
    /// their own they are committed after a short wait; the record a new
    /// append stores is handed to the delivery worker.
    #[tokio::test]
    async fn outcomes_and_journal_events_share_the_appends_commits() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool.redb")).unwrap();
        let mut fresh = spool.take_fresh().unwrap();
        assert!(spool.take_fresh().is_none(), "one taker");
        let r = record("o1");
        spool.append(vec![r.clone()]).await.unwrap();
        assert_eq!(fresh.recv().await.unwrap().id, r.id, "handed over once committed");
        let before = spool.commits();

        let mut delivered = r.clone();
        delivered.state = State::Delivered;
        let (tx, rx) = oneshot::channel();
        spool.record_outcome(
            delivered,
            Some(crate::journal::Event::now("delivery", "delivered", "")),
            move |result| {
                let _ = tx.send(result);
            },
        );
        spool.journal_later(crate::journal::Event::now("message", "discard", "calendar reply"));
        // The next append takes them along: one durable commit for all three.
        spool.append(vec![record("o2")]).await.unwrap();
        rx.await.unwrap().unwrap();
        assert_eq!(spool.commits(), before + 1);
        assert_eq!(spool.get(&r.id).unwrap().unwrap().state, State::Delivered);
        assert_eq!(spool.journal(&crate::journal::Filter::default()).unwrap().len(), 2);

        // Alone, an event is committed within LINGER, without an fsync.
        spool.journal_later(crate::journal::Event::now("recipient", "reject", "unknown token"));
        std::thread::sleep(LINGER * 4);
        assert_eq!(spool.journal(&crate::journal::Filter::default()).unwrap().len(), 3);
        assert_eq!(spool.commits(), before + 1);
        spool.flush().unwrap();
        assert_eq!(spool.commits(), before + 2);
    }

    #[tokio::test]
    async fn finished_records_are_forgotten_after_their_time_pending_never() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool.redb")).unwrap();
        for uid in ["p1", "d1", "f1"] {
            spool.append(vec![record(uid)]).await.unwrap();
        }
        let all = spool.list(true).unwrap();
        let by = |uid: &str| all.iter().find(|r| r.payload["uid"] == uid).unwrap().clone();
        let (mut d, mut f) = (by("d1"), by("f1"));
        d.state = State::Delivered;
        d.finished_ms = Some(1_000);
        f.state = State::Failed;
        f.finished_ms = Some(5_000);
        spool.update(&d).unwrap();
        spool.update(&f).unwrap();
        // Counted from the index: only p1 is pending.
        assert_eq!(spool.pending_stats().unwrap(), (1, Some(by("p1").created_ms)));
        // keep_delivered has passed for d1, keep_failed not yet for f1.
        assert_eq!(spool.purge_finished(2_000, 2_000).unwrap(), 1);
        assert_eq!(spool.purge_finished(2_000, 6_000).unwrap(), 1);
        let left = spool.list(true).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].payload["uid"], "p1");
    }

    #[tokio::test]
    async fn calendar_text_is_stored_once_for_many_recipients() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.redb");
        let spool = Spool::open(&path).unwrap();
        let big = format!("X-PAD:{}", "y".repeat(200_000));
        let records: Vec<Record> = (0..10)
            .map(|i| {
                let mut r = record(&format!("same\r\n{big}"));
                r.id = format!("r{i}");
                r.payload["token"] = format!("token{i:04}").into();
                r
            })
            .collect();
        let text = records[0].payload["icalendar"].as_str().unwrap().to_owned();
        spool.append(records).await.unwrap();
        spool.flush().unwrap();
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size < 1_500_000, "10 records of 200 kB take {size} bytes");
        // Deliveries and `queue show` get the text back.
        let (due, _) = spool.due(now_ms() + 1, 20, &|_| false).unwrap();
        assert_eq!(due.len(), 10);
        assert!(due.iter().all(|r| r.payload["icalendar"] == text.as_str()));
        assert_eq!(spool.get("r3").unwrap().unwrap().payload["icalendar"], text.as_str());
        // An outcome written back stays shared; a purge drops what no record needs.
        let mut r = spool.get("r0").unwrap().unwrap();
        r.state = State::Delivered;
        r.finished_ms = Some(1);
        spool.update(&r).unwrap();
        assert_eq!(spool.purge_finished(2, 0).unwrap(), 1);
        assert_eq!(spool.get("r1").unwrap().unwrap().payload["icalendar"], text.as_str());
    }

    #[test]
    fn foreign_file_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.redb");
        std::fs::write(&path, b"this is not a database, but somebody's notes\n".repeat(100)).unwrap();
        let e = Spool::open(&path).err().expect("must refuse");
        assert!(e.0.contains("never overwritten"), "{e}");
        assert!(std::fs::read(&path).unwrap().starts_with(b"this is not a database"));
    }

    /// A spool written by the release before the due index (layout 1, three
    /// pending replies to a webhook that was down), opened and migrated.
    #[test]
    fn a_spool_of_layout_1_is_migrated_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.redb");
        let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/spool/spool-v1.redb.gz");
        let out = std::process::Command::new("gzip")
            .args(["-dc", fixture])
            .output()
            .unwrap();
        assert!(out.status.success());
        std::fs::write(&path, out.stdout).unwrap();
        for _ in 0..2 {
            let spool = Spool::open_waiting(&path, Duration::from_secs(5)).unwrap();
            let (due, next) = spool.due(now_ms(), 10, &|_| false).unwrap();
            assert_eq!((due.len(), next), (3, None));
            assert!(due.iter().all(|r| r.state == State::Pending && r.attempts == 1));
            let txn = spool.database().unwrap().begin_read().unwrap();
            let layout = txn.open_table(META).unwrap().get("layout").unwrap().map(|v| v.value());
            assert_eq!(layout, Some(LAYOUT));
        }
        // An outcome moves a record in the index: due later, then delivered.
        let spool = Spool::open_waiting(&path, Duration::from_secs(5)).unwrap();
        let (mut due, _) = spool.due(now_ms(), 10, &|_| false).unwrap();
        let mut later = due.remove(0);
        later.next_attempt_ms = now_ms() + 60_000;
        spool.update(&later).unwrap();
        let (left, next) = spool.due(now_ms(), 10, &|_| false).unwrap();
        assert_eq!((left.len(), next), (2, Some(later.next_attempt_ms)));
        // Cut short by the limit: no word on the next.
        let (left, next) = spool.due(now_ms(), 1, &|_| false).unwrap();
        assert_eq!((left.len(), next), (1, None));
        let mut done = due.remove(0);
        done.state = State::Delivered;
        spool.update(&done).unwrap();
        assert!(spool.delete(&due[0].id).unwrap());
        let (left, next) = spool.due(now_ms(), 10, &|_| false).unwrap();
        assert_eq!((left.len(), next), (0, Some(later.next_attempt_ms)));
    }

    #[tokio::test]
    async fn expiry_finds_pending_records_by_age() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool.redb")).unwrap();
        let (mut old, young) = (record("old"), record("young"));
        old.created_ms = 1_000;
        spool.append(vec![old.clone(), young]).await.unwrap();
        let found = spool.pending_created_before(now_ms() - 60_000, 10, &|_| false).unwrap();
        assert_eq!(
            found.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            [old.id.as_str()]
        );
        assert!(spool
            .pending_created_before(now_ms() - 60_000, 10, &|id| id == old.id)
            .unwrap()
            .is_empty());
        old.state = State::Failed;
        spool.update(&old).unwrap();
        assert!(spool
            .pending_created_before(now_ms(), 10, &|id| id != old.id)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_spool_of_a_later_layout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.redb");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META).unwrap().insert("layout", LAYOUT + 1).unwrap();
            txn.commit().unwrap();
        }
        let e = Spool::open(&path).err().expect("must refuse");
        assert!(e.0.contains("newer than this imip-milter"), "{e}");
    }

    #[test]
    fn ids_depend_on_content() {
        assert_eq!(delivery_id("t", Some("<m>"), "c"), delivery_id("t", Some("<m>"), "c"));
        assert_ne!(delivery_id("t", Some("<m>"), "c"), delivery_id("t2", Some("<m>"), "c"));
        assert_ne!(delivery_id("ab", None, "c"), delivery_id("a", None, "bc"));
    }
}
