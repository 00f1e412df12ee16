//! The spool's writer thread: one transaction for all requests waiting at that moment (group commit).
//!
//! Appends are durable before their reply; delivery outcomes and journal
//! events wait a moment (`LINGER`) for an append to ride along with, and are
//! otherwise committed without an fsync of their own.

use super::{
    journal::put_events,
    layout::DbCell,
    records::{Appended, Record, RecordTables, State},
    SpoolError,
};
use crate::errors;
use redb::{Database, Durability};
use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc, Arc, Mutex,
    },
    thread,
    time::Duration,
};
use tokio::sync::{oneshot, Notify};

/// Requests folded into one commit at most.
const MAX_GROUP: usize = 512;

/// How long outcomes and journal events wait for an append to share a
/// commit with, before they are committed alone.
const LINGER: Duration = Duration::from_millis(50);

/// Outcomes and journal events waiting for the writer at most.
const MAX_LATER: usize = 100_000;
/// Whether events were dropped for MAX_LATER (logged once until it empties).
static LATER_FULL: AtomicBool = AtomicBool::new(false);

/// How long a commit waits for appends that other sessions are about to
/// send: under load one fsync then serves more replies; alone, none waits.
const COMMIT_DELAY: Duration = Duration::from_millis(1);

/// New records handed straight to the delivery worker at most; beyond, it
/// finds them by scanning the spool.
pub(super) const FRESH: usize = 256;

/// Work for the writer thread.
pub(super) enum Work {
    /// New records, durable before the reply.
    Append {
        records: Vec<Record>,
        reply: oneshot::Sender<Result<Vec<Appended>, SpoolError>>,
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
        reply: mpsc::SyncSender<Result<(), SpoolError>>,
    },
}

/// Outcomes and journal events for the writer's next commit. They are put
/// here, not into the channel, so that only the first of a batch wakes it.
#[derive(Clone, Default)]
pub(super) struct Later(Arc<Mutex<Vec<Work>>>);

impl Later {
    /// Queues `work`; true when it is the first waiting, and the writer
    /// must be woken.
    pub(super) fn push(&self, work: Work) -> bool {
        let mut later = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // The writer takes these every LINGER; many more means it hangs
        // (a disk that does not answer): journal events then go, not memory.
        if later.len() >= MAX_LATER && matches!(work, Work::Journal(_)) {
            drop(later);
            if !LATER_FULL.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "journal: the spool writer is behind by {MAX_LATER} items; events are dropped until it catches up"
                );
            }
            return false;
        }
        later.push(work);
        later.len() == 1
    }

    /// Everything waiting.
    fn take(&self) -> Vec<Work> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect()
    }
}

/// A session's append may come soon; see `Spool::append_coming`.
pub struct AppendComing(Arc<AtomicUsize>);

impl AppendComing {
    /// Counts one more session in `coming` until dropped.
    pub(super) fn new(coming: &Arc<AtomicUsize>) -> Self {
        coming.fetch_add(1, Ordering::Relaxed);
        Self(coming.clone())
    }
}

impl Drop for AppendComing {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The writer thread's side of the spool's handles.
pub(super) struct Writer {
    pub(super) db: Arc<DbCell>,
    pub(super) notify: Arc<Notify>,
    pub(super) commits: Arc<AtomicU64>,
    pub(super) journal_max: Arc<AtomicUsize>,
    pub(super) later: Later,
    pub(super) fresh: tokio::sync::mpsc::Sender<Record>,
    pub(super) coming: Arc<AtomicUsize>,
}

impl Writer {
    /// Starts the thread; it ends when every sender of `rx` is gone.
    pub(super) fn spawn(self, rx: mpsc::Receiver<Work>) -> Result<(), SpoolError> {
        thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || self.run(rx))
            .map_err(|e| SpoolError::with("cannot start the spool writer", e))?;
        Ok(())
    }

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
            group.extend(self.later.take());
            LATER_FULL.store(false, Ordering::Relaxed);
            self.commit(group);
        }
        // Whatever still waits, before the thread ends.
        let rest = self.later.take();
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
                    let e = errors::chain(e);
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
                Err(e)
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
                        Work::Outcome { done, .. } => done(Err(errors::chain(&e))),
                        Work::Journal(_) => lost_events += 1,
                        Work::Wake => {}
                        Work::Flush { reply, .. } => {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                }
                if lost_events > 0 {
                    tracing::warn!("journal: {lost_events} events not recorded: {}", errors::chain(&e));
                }
            }
        }
        if scan {
            self.notify.notify_one();
        }
    }

    /// One transaction for the group: appends (skipping ids stored
    /// already), outcomes, journal events. Returns what each append found.
    fn write(&self, db: &Database, group: &[Work], durable: bool) -> Result<Vec<Vec<Appended>>, SpoolError> {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{tests::record, Spool};

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
}
