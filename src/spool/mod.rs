//! The durable queue of replies: redb under `state_dir`.
//!
//! Appends from concurrent SMTP sessions go through one writer thread that
//! puts every request waiting at that moment into one transaction (group
//! commit): one fsync covers many replies, so durability does not cap
//! throughput. Delivery outcomes and journal events go the same way and
//! ride along (without an fsync of their own when nothing else waits). A
//! record's id is a hash of its content, so a reply that arrives twice is
//! stored, and delivered, once.
//!
//! Here the handle and its API; `records` (what a record is, how it is
//! stored), `content` (calendar text shared between records), `writer`
//! (the thread and group commit), `layout` (the file: opening it, tables,
//! version, migration), `journal` (the journal's table and its methods on
//! `Spool`).

/// `$e`, or a `SpoolError` of context `$ctx` and cause `$e`'s error.
macro_rules! redb_try {
    ($e:expr, $ctx:expr) => {
        $e.map_err(|e| $crate::spool::SpoolError::with($ctx, e))?
    };
}

mod content;
mod journal;
mod layout;
mod records;
mod writer;

pub use records::{build_record, delivery_id, Appended, Envelope, Notice, NoticeState, Record, State, NOTICE_ATTEMPTS};
pub use writer::AppendComing;

use crate::clock::now_ms;
use content::CONTENT;
use layout::{DbCell, DUE, PENDING, PENDING_SINCE, RECORDS};
use records::{hydrate, RecordTables};
use redb::{Database, ReadableDatabase, ReadableTable};
use std::{
    collections::HashSet,
    path::Path,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc, Arc,
    },
    time::Duration,
};
use tokio::sync::{oneshot, Notify};
use writer::{Later, Work, Writer, FRESH};

crate::errors::context_error!(
    /// A spool operation that failed: what and where (its text), and why
    /// (`source()`, redb's or the system's error). Cheap to clone: the writer
    /// answers every request of a failed commit with the same error.
    SpoolError
);

/// Handle to the spool; cheap to clone.
#[derive(Clone)]
pub struct Spool {
    db: Arc<DbCell>,
    work: mpsc::Sender<Work>,
    later: Later,
    /// Sessions whose append may come soon (see `append_coming`).
    coming: Arc<AtomicUsize>,
    /// New records as they are committed, for the delivery worker (taken once).
    fresh: Arc<std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<Record>>>>,
    /// Woken whenever a new record is pending.
    pub notify: Arc<Notify>,
    /// Durable commits of the writer (each one fsync), for metrics and tests.
    commits: Arc<AtomicU64>,
    /// journal.max_events: the journal is trimmed to it as it grows.
    journal_max: Arc<AtomicUsize>,
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
        let db = Arc::new(layout::open(path, wait)?);
        layout::migrate(&db, path)?;
        records::create_tables(&db)?;
        let db = Arc::new(DbCell::new(path, db));
        let (tx, rx) = mpsc::channel::<Work>();
        let notify = Arc::new(Notify::new());
        let commits = Arc::new(AtomicU64::new(0));
        let journal_max = Arc::new(AtomicUsize::new(1_000_000));
        let later = Later::default();
        let (fresh_tx, fresh_rx) = tokio::sync::mpsc::channel(FRESH);
        let coming = Arc::new(AtomicUsize::new(0));
        let writer = Writer {
            coming: coming.clone(),
            db: db.clone(),
            notify: notify.clone(),
            commits: commits.clone(),
            journal_max: journal_max.clone(),
            later: later.clone(),
            fresh: fresh_tx,
        };
        writer.spawn(rx)?;
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
        AppendComing::new(&self.coming)
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
        rx.await.map_err(|_| SpoolError::new("spool writer has stopped"))?
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
        if self.later.push(work) && self.send(Work::Wake).is_err() {
            // The writer is gone (shutting down): what waits is lost with it.
            tracing::warn!("spool writer has stopped; outcome or journal event not recorded");
        }
    }

    fn send(&self, work: Work) -> Result<(), SpoolError> {
        self.work
            .send(work)
            .map_err(|_| SpoolError::new("spool writer has stopped"))
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

    /// The message a record was built from, as received (replies only).
    pub fn original(&self, rec: &Record) -> Result<Option<Vec<u8>>, SpoolError> {
        if let Some(o) = &rec.original {
            return Ok(Some(o.as_ref().clone()));
        }
        let Some(key) = rec.message_ref.as_deref() else {
            return Ok(None);
        };
        let txn = redb_try!(self.db.get()?.begin_read(), "spool read");
        let content = redb_try!(txn.open_table(CONTENT), "spool read");
        let found = redb_try!(content.get(key), "spool read");
        Ok(found.map(|v| v.value().to_vec()))
    }

    /// Writes what became of a record's notice, leaving the rest of the
    /// record as it is now (a `queue retry` may have changed it meanwhile);
    /// a sent notice's message is needed no more. Ok(false): no such record.
    pub fn set_notice(&self, id: &str, notice: &Notice) -> Result<bool, SpoolError> {
        let txn = redb_try!(self.db.get()?.begin_write(), "spool write");
        let found = {
            let mut records = redb_try!(txn.open_table(RECORDS), "spool write");
            let stored = redb_try!(records.get(id), "spool read")
                .and_then(|raw| serde_json::from_slice::<serde_json::Value>(raw.value()).ok());
            match stored {
                Some(mut rec) => {
                    let value = serde_json::to_value(notice).map_err(|e| SpoolError::with("spool encode", e))?;
                    if let Some(obj) = rec.as_object_mut() {
                        obj.insert("notice".into(), value);
                        if notice.state == NoticeState::Sent {
                            obj.remove("message_ref");
                        }
                    }
                    let bytes = serde_json::to_vec(&rec).map_err(|e| SpoolError::with("spool encode", e))?;
                    redb_try!(records.insert(id, bytes.as_slice()), "spool write");
                    true
                }
                None => false,
            }
        };
        redb_try!(txn.commit(), "spool commit");
        Ok(found)
    }

    /// Failed records whose notice is still to be sent: a crash came
    /// between the failure and the notice, or sendmail failed.
    pub fn notices_pending(&self) -> Result<Vec<String>, SpoolError> {
        Ok(self
            .list(false)?
            .into_iter()
            .filter(Record::notice_due)
            .map(|r| r.id)
            .collect())
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
        rx.recv().map_err(|_| SpoolError::new("spool writer has stopped"))?
    }

    /// Makes a failed (or waiting) record due now. Ok(false): no such record.
    pub fn retry(&self, id: &str) -> Result<bool, SpoolError> {
        let Some(mut rec) = self.get(id)? else {
            return Ok(false);
        };
        if rec.state == State::Delivered {
            return Err(SpoolError::new(format!("{id} was delivered already")));
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
            return Err(SpoolError::new(format!(
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

    /// Forgets delivered records finished before `delivered_before` and
    /// failed ones before `failed_before` (ms); returns how many.
    pub fn purge_finished(&self, delivered_before: u64, failed_before: u64) -> Result<usize, SpoolError> {
        // Read and written in one transaction: a record the writer commits
        // meanwhile cannot lose its texts to a list read before it.
        let txn = redb_try!(self.db.get()?.begin_write(), "spool write");
        let purged = {
            let mut records = redb_try!(txn.open_table(RECORDS), "spool write");
            let mut old = Vec::new();
            let mut kept: HashSet<String> = HashSet::new();
            for entry in redb_try!(records.iter(), "spool read") {
                let (id, raw) = redb_try!(entry, "spool read");
                let Ok(r) = serde_json::from_slice::<Record>(raw.value()) else {
                    continue;
                };
                let finished = r.finished_ms.unwrap_or(r.created_ms);
                let forgotten = match r.state {
                    State::Delivered => finished < delivered_before,
                    State::Failed => finished < failed_before,
                    State::Pending => false,
                };
                if forgotten {
                    old.push(id.value().to_owned());
                    continue;
                }
                // Calendar texts no remaining record refers to go too; a
                // delivered reply's message is needed no more (it is kept
                // for a notice, should the record fail).
                kept.extend(content::reference(&r.payload).map(str::to_owned));
                if r.state != State::Delivered {
                    kept.extend(r.message_ref.clone());
                }
            }
            for id in &old {
                redb_try!(records.remove(id.as_str()), "spool write");
            }
            let mut texts = redb_try!(txn.open_table(CONTENT), "spool write");
            let kept: HashSet<&str> = kept.iter().map(String::as_str).collect();
            content::keep_only(&mut texts, &kept)?;
            old.len()
        };
        redb_try!(txn.commit(), "spool commit");
        Ok(purged)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::analyse;

    /// A reply for token abcdefgh12 to the event with UID `body`.
    pub(super) fn record(body: &str) -> Record {
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
}
