//! The delivery worker: hands spooled records to the target, a few at a
//! time, retrying with exponential backoff, keeping what fails as failed.

use crate::{
    clock::now_ms,
    config::DeliveryConfig,
    errors,
    metrics::{DeliveryResult, METRICS},
    notice::{self, Notices},
    spool::{Record, Spool, State},
    targets::{Outcome, Target},
};
use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{
    sync::{watch, Semaphore},
    task::JoinSet,
    time,
};
use tracing::{error, info, warn};

/// Longest sleep between scans, so that a clock change or a lost wake-up costs little.
const MAX_IDLE: Duration = Duration::from_secs(30);

/// Backoff before attempt `attempts + 1`: initial × 2^(attempts−1), capped.
pub fn backoff(cfg: &DeliveryConfig, attempts: u32) -> Duration {
    let factor = 1u32.checked_shl(attempts.saturating_sub(1).min(30)).unwrap_or(u32::MAX);
    cfg.initial_backoff.saturating_mul(factor).min(cfg.max_backoff)
}

/// A server fault answered in the same words this many times in a row, over
/// at least `SAME_FAULT_SPAN` × delivery.max_backoff (an hour by default), is
/// taken as lasting (Xandikos answers 500 for a refusal): the record fails
/// with those words instead of being retried until delivery.max_age. A
/// generic error page during a short outage stays a retry.
pub const MAX_SAME_SERVER_FAULT: u32 = 5;
pub const SAME_FAULT_SPAN: u32 = 12;

/// Applies an outcome to a record.
pub fn apply(cfg: &DeliveryConfig, rec: &mut Record, outcome: &Outcome, now: u64) {
    rec.attempts = rec.attempts.saturating_add(1);
    let error = outcome.error();
    rec.repeats = match (error, &rec.last_error) {
        (Some(e), Some(last)) if e == last.as_str() => rec.repeats.saturating_add(1),
        (Some(_), _) => 1,
        (None, _) => 0,
    };
    if rec.repeats <= 1 {
        rec.repeats_since_ms = now;
    }
    let span = cfg.max_backoff.saturating_mul(SAME_FAULT_SPAN).as_millis() as u64;
    let lasting = rec.repeats >= MAX_SAME_SERVER_FAULT && now.saturating_sub(rec.repeats_since_ms) >= span;
    match outcome {
        Outcome::Delivered | Outcome::Ignored(_) => {
            rec.state = State::Delivered;
            rec.last_error = None;
            rec.finished_ms = Some(now);
        }
        Outcome::Permanent(e) => {
            rec.state = State::Failed;
            rec.last_error = Some(e.clone());
            rec.finished_ms = Some(now);
        }
        Outcome::ServerFault(e) if lasting => {
            rec.state = State::Failed;
            rec.last_error = Some(e.clone());
            rec.finished_ms = Some(now);
        }
        Outcome::Retry(e) | Outcome::Unreachable(e) | Outcome::ServerFault(e) => {
            let next = now.saturating_add(backoff(cfg, rec.attempts).as_millis() as u64);
            if next.saturating_sub(rec.created_ms) > cfg.max_age.as_millis() as u64 {
                rec.state = State::Failed;
                rec.last_error = Some(format!(
                    "{e}; gave up after {} attempts (delivery.max_age)",
                    rec.attempts
                ));
                rec.finished_ms = Some(now);
            } else {
                rec.next_attempt_ms = next;
                rec.last_error = Some(e.clone());
            }
        }
    }
}

/// Transport failures in a row (no connection, timeouts, a proxy's 502-504)
/// after which the target is taken as down.
pub const DOWN_AFTER: u32 = 5;

/// The target as the worker sees it. Down, as Postfix treats a dead
/// destination: no record is attempted but one probe per
/// `delivery.probe_interval`; the probe's success drains the backlog.
#[derive(Debug, Default)]
struct Health {
    in_a_row: u32,
    down_since: Option<u64>,
    /// While down: when the next probe may start.
    probe_at: u64,
    probing: bool,
}

/// What the worker may start now.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    /// Every due record, as many as the concurrency allows.
    Deliver,
    /// One due record, to learn whether the target is back.
    Probe,
    /// Nothing until then (or a probe's outcome).
    Wait(u64),
}

impl Health {
    fn plan(&self, now: u64) -> Plan {
        match self.down_since {
            None => Plan::Deliver,
            Some(_) if !self.probing && now >= self.probe_at => Plan::Probe,
            Some(_) if self.probing => Plan::Wait(u64::MAX),
            Some(_) => Plan::Wait(self.probe_at),
        }
    }

    /// Learns from one attempt's outcome. Some(true): the target just went
    /// down; Some(false): it just came back.
    fn observe(&mut self, outcome: &Outcome, now: u64, interval: u64) -> Option<bool> {
        if let Outcome::Unreachable(_) = outcome {
            self.in_a_row = self.in_a_row.saturating_add(1);
            self.probe_at = now.saturating_add(interval);
            self.probing = false;
            if self.down_since.is_none() && self.in_a_row >= DOWN_AFTER {
                self.down_since = Some(now);
                return Some(true);
            }
            return None;
        }
        // Any answer from the target itself, even a refusal: it is up.
        self.in_a_row = 0;
        self.probing = false;
        self.down_since.take().map(|_| false)
    }
}

/// Runs until `shutdown` resolves, then lets deliveries in flight finish.
/// New records arrive straight from the spool's writer; the spool is
/// scanned when told (`notify`: a retry, a record that did not fit) and
/// when the next retry is due.
pub async fn run(
    spool: Spool,
    mut reloads: watch::Receiver<Delivering>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let Delivering { target, cfg, notices } = reloads.borrow_and_update().clone();
    let mut cfg = cfg;
    // Notices go out one at a time beside the deliveries: a slow sendmail
    // holds no delivery up.
    let (queue, queued) = notice::Queue::new();
    let current = reloads.clone();
    let (stop_notices, stop) = watch::channel(false);
    let noticing = tokio::spawn(notice::run(
        spool.clone(),
        queued,
        move || current.borrow().notices.clone(),
        stop,
    ));
    let notices_task = NoticeTask {
        stop: stop_notices,
        task: noticing,
    };
    let mut worker = Worker {
        notices,
        queue,
        limit: Arc::new(Semaphore::new(cfg.concurrency)),
        in_flight: Arc::default(),
        health: Arc::default(),
        spool: spool.clone(),
        target,
        cfg: cfg.clone(),
    };
    let mut fresh = spool.take_fresh();
    let mut tasks = JoinSet::new();
    let mut last_purge = 0u64;
    let mut scan = true;
    let mut wake_at = 0u64;
    // The last scan left due records behind (more than could start): each
    // delivery that ends starts the next, as fast as the target takes them.
    let mut backlog = false;
    let mut reloaded = false;

    loop {
        let notified = spool.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();

        // changed() below marks the new value seen: `reloaded` remembers it.
        if reloaded || reloads.has_changed().unwrap_or(false) {
            reloaded = false;
            let new = reloads.borrow_and_update().clone();
            worker.reconfigure(new.target, &new.cfg, new.notices);
            cfg = new.cfg;
        }
        let now = now_ms();
        if now.saturating_sub(last_purge) > 3_600_000 {
            last_purge = now;
            purge(&spool, &cfg, now).await;
            worker.expire(now).await;
            worker.queue.pending(&spool).await;
        }

        let plan = worker.plan(now);
        if let Plan::Wait(until) = plan {
            // The target is down: what is due waits in the spool, unread.
            wake_at = until;
            if let Some(rx) = fresh.as_mut() {
                while rx.try_recv().is_ok() {}
            }
        } else if scan {
            // Whatever the writer handed over is committed, so the scan sees
            // it: dropped here, it is not started twice.
            if let Some(rx) = fresh.as_mut() {
                while rx.try_recv().is_ok() {}
            }
            let probe = plan == Plan::Probe;
            let (due, next, cut) = worker.scan(now, probe).await;
            wake_at = next.unwrap_or(u64::MAX);
            backlog = cut && !probe;
            if probe && !due.is_empty() {
                worker.probing();
            }
            for rec in due {
                let permit = tokio::select! {
                    p = worker.limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                    _ = &mut shutdown => { return drain(tasks, notices_task).await; }
                };
                worker.start(&mut tasks, rec, permit);
            }
        }
        // Reap finished tasks.
        while let Some(res) = tasks.try_join_next() {
            if let Err(e) = res {
                error!("delivery task failed: {e}");
            }
        }
        let mut sleep_ms = wake_at.saturating_sub(now);
        if !tasks.is_empty() {
            // Wake when a delivery ends: its record may be due again soon, and
            // a permit is free.
            sleep_ms = sleep_ms.min(200);
        }

        scan = true;
        tokio::select! {
            _ = &mut shutdown => return drain(tasks, notices_task).await,
            _ = notified => {}
            Ok(()) = reloads.changed() => reloaded = true,
            _ = time::sleep(Duration::from_millis(sleep_ms).min(MAX_IDLE)) => {}
            Some(res) = tasks.join_next(), if backlog => {
                if let Err(e) = res {
                    error!("delivery task failed: {e}");
                }
            }
            Some(rec) = next_fresh(&mut fresh) => {
                // The common case: a reply just spooled, started without a scan.
                match worker.limit.clone().try_acquire_owned() {
                    // The target down: it waits in the spool for the probe.
                    _ if worker.plan(now_ms()) != Plan::Deliver => scan = false,
                    Ok(permit) if !worker.seen(&rec.id) => {
                        worker.start(&mut tasks, rec, permit);
                        scan = false;
                    }
                    // Seen before (found by a scan), or every permit taken:
                    // the scan tells what is still to do.
                    _ => {}
                }
            }
        }
    }
}

/// The target and `[delivery]` in force; a SIGHUP sends new ones.
#[derive(Clone)]
pub struct Delivering {
    pub target: Arc<Target>,
    pub cfg: DeliveryConfig,
    /// Whom a reply that fails for good goes to, and how.
    pub notices: Arc<Notices>,
}

/// The next record from the spool's writer; never, without a channel.
async fn next_fresh(fresh: &mut Option<tokio::sync::mpsc::Receiver<Record>>) -> Option<Record> {
    match fresh {
        Some(rx) => match rx.recv().await {
            Some(rec) => Some(rec),
            None => {
                *fresh = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

async fn purge(spool: &Spool, cfg: &DeliveryConfig, now: u64) {
    let delivered = now.saturating_sub(cfg.keep_delivered.as_millis() as u64);
    let failed = now.saturating_sub(cfg.keep_failed.as_millis() as u64);
    let (keep, max_events) = (cfg.journal.keep.as_millis() as u64, cfg.journal.max_events);
    let j = spool.clone();
    match tokio::task::spawn_blocking(move || j.journal_purge(now.saturating_sub(keep), max_events)).await {
        Ok(Ok(n)) if n > 0 => info!("forgot {n} journal events past journal.keep or journal.max_events"),
        Ok(Err(e)) => warn!("journal purge failed: {}", errors::chain(&e)),
        _ => {}
    }
    let s = spool.clone();
    match tokio::task::spawn_blocking(move || s.purge_finished(delivered, failed)).await {
        Ok(Ok(n)) if n > 0 => {
            info!("forgot {n} records past delivery.keep_delivered or delivery.keep_failed")
        }
        Ok(Err(e)) => warn!("spool purge failed: {}", errors::chain(&e)),
        _ => {}
    }
}

/// Ids being delivered (a scan skips them) and the last ones finished (a
/// record handed over by the writer may have been found by a scan and
/// delivered already).
#[derive(Default)]
struct InFlight {
    busy: HashSet<String>,
    finished: HashSet<String>,
    order: std::collections::VecDeque<String>,
}

/// Finished ids remembered; more than the writer's hand-over channel holds.
const FINISHED_KEPT: usize = 1024;

impl InFlight {
    fn finish(&mut self, id: String) {
        self.busy.remove(&id);
        if self.finished.insert(id.clone()) {
            self.order.push_back(id);
        }
        while self.order.len() > FINISHED_KEPT {
            if let Some(old) = self.order.pop_front() {
                self.finished.remove(&old);
            }
        }
    }
}

/// What the delivery tasks share.
struct Worker {
    limit: Arc<Semaphore>,
    in_flight: Arc<Mutex<InFlight>>,
    health: Arc<Mutex<Health>>,
    spool: Spool,
    target: Arc<Target>,
    cfg: DeliveryConfig,
    notices: Arc<Notices>,
    queue: notice::Queue,
}

impl Worker {
    /// A reloaded target and `[delivery]`: attempts that start from now on
    /// use them; those in flight finish with the old ones.
    fn reconfigure(&mut self, target: Arc<Target>, cfg: &DeliveryConfig, notices: Arc<Notices>) {
        self.notices = notices;
        let (old, new) = (self.cfg.concurrency, cfg.concurrency);
        if new > old {
            self.limit.add_permits(new - old);
        } else if new < old {
            // Taken back as deliveries in flight end.
            let limit = self.limit.clone();
            let fewer = u32::try_from(old - new).unwrap_or(u32::MAX);
            tokio::spawn(async move {
                if let Ok(p) = limit.acquire_many_owned(fewer).await {
                    p.forget();
                }
            });
        }
        self.target = target;
        self.cfg = cfg.clone();
    }

    /// Whether a record handed over by the writer is being, or was, delivered.
    fn seen(&self, id: &str) -> bool {
        self.in_flight
            .lock()
            .map(|f| f.busy.contains(id) || f.finished.contains(id))
            .unwrap_or(true)
    }

    fn plan(&self, now: u64) -> Plan {
        self.health.lock().map(|h| h.plan(now)).unwrap_or(Plan::Deliver)
    }

    /// Fails the pending records older than delivery.max_age that no attempt
    /// has failed yet (while the target is down, only probes are made), as
    /// Postfix bounces what outlived maximal_queue_lifetime.
    async fn expire(&self, now: u64) {
        let before = now.saturating_sub(self.cfg.max_age.as_millis() as u64);
        // A thousand at a time, a hundred thousand an hour at most.
        for _ in 0..100 {
            let (s, busy) = (self.spool.clone(), self.in_flight.clone());
            let found = tokio::task::spawn_blocking(move || {
                let busy = busy.lock().map(|f| f.busy.clone()).unwrap_or_default();
                s.pending_created_before(before, 1000, &|id| busy.contains(id))
            })
            .await;
            let old = match found {
                Ok(Ok(old)) => old,
                Ok(Err(e)) => return warn!("cannot read the spool for expired records: {}", errors::chain(&e)),
                Err(e) => return warn!("expiry failed: {e}"),
            };
            let n = old.len();
            for mut rec in old {
                let why = match rec.attempts {
                    0 => "never attempted".to_owned(),
                    _ => rec.last_error.clone().unwrap_or_default(),
                };
                let why = format!("{why}; gave up after {} attempts (delivery.max_age)", rec.attempts);
                error!(
                    "{}: delivery failed for good id={} token={}: {why}",
                    rec.queue_id.as_deref().unwrap_or("-"),
                    rec.id,
                    rec.token_prefix
                );
                rec.state = State::Failed;
                rec.finished_ms = Some(now);
                let outcome = Outcome::Permanent(why.clone());
                rec.last_error = Some(why);
                let noticed = self.notices.mark(&mut rec).then(|| self.queue.clone());
                let event = delivery_event(&rec, &outcome);
                let id = rec.id.clone();
                self.spool.record_outcome(rec, Some(event), move |r| match r {
                    Err(e) => error!("cannot record that {id} expired: {e}"),
                    Ok(()) => {
                        if let Some(q) = noticed {
                            q.push(id);
                        }
                    }
                });
            }
            if n < 1000 {
                return;
            }
            // What the writer holds is committed before the next pass reads.
            let s = self.spool.clone();
            let _ = tokio::task::spawn_blocking(move || s.settle()).await;
        }
    }

    fn probing(&self) {
        if let Ok(mut h) = self.health.lock() {
            h.probing = true;
        }
    }

    /// Due records, not in flight, as many as may start soon (one for a
    /// probe); when the next one falls due; and whether due ones were left.
    async fn scan(&self, now: u64, probe: bool) -> (Vec<Record>, Option<u64>, bool) {
        let s = self.spool.clone();
        let busy = self.in_flight.clone();
        let room = match probe {
            true => 1,
            false => self.limit.available_permits().max(1) * 4,
        };
        // The pending table can be long after an outage: read it off the I/O thread.
        let scan = tokio::task::spawn_blocking(move || {
            let busy = busy.lock().map(|f| f.busy.clone()).unwrap_or_default();
            s.due(now, room, &|id| busy.contains(id))
        });
        match scan.await {
            Ok(Ok((due, next))) => {
                let cut = due.len() >= room;
                (due, next, cut)
            }
            Ok(Err(e)) => {
                error!("cannot read the spool: {}", errors::chain(&e));
                (Vec::new(), Some(now + 5_000), false)
            }
            Err(e) => {
                error!("spool scan failed: {e}");
                (Vec::new(), Some(now + 5_000), false)
            }
        }
    }

    fn start(&self, tasks: &mut JoinSet<()>, rec: Record, permit: tokio::sync::OwnedSemaphorePermit) {
        if let Ok(mut f) = self.in_flight.lock() {
            f.busy.insert(rec.id.clone());
        }
        let (spool, target, cfg, in_flight, health, notices, queue) = (
            self.spool.clone(),
            self.target.clone(),
            self.cfg.clone(),
            self.in_flight.clone(),
            self.health.clone(),
            self.notices.clone(),
            self.queue.clone(),
        );
        tasks.spawn(async move {
            let id = rec.id.clone();
            let outcome = attempt(&spool, &target, &cfg, &notices, Some(&queue), rec, move || {
                // Leaves the in-flight set only once its new state is committed
                // (a record still pending makes the writer ask for a scan).
                if let Ok(mut f) = in_flight.lock() {
                    f.finish(id);
                }
            })
            .await;
            let now = now_ms();
            let interval = cfg.probe_interval.as_millis() as u64;
            let change = health.lock().ok().and_then(|mut h| h.observe(&outcome, now, interval));
            match change {
                Some(true) => {
                    warn!(
                        "target down: {DOWN_AFTER} attempts in a row got no answer ({}); \
                         one probe every {}s until it answers",
                        outcome.error().unwrap_or(""),
                        interval / 1000
                    );
                    spool.set_target_down(Some(now));
                }
                Some(false) => {
                    info!("target answers again: delivering what waits");
                    spool.set_target_down(None);
                    spool.notify.notify_one();
                }
                None => {}
            }
            drop(permit);
        });
    }
}

/// The notice task, stopped after the deliveries in flight.
struct NoticeTask {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Lets the deliveries in flight finish, then the notice being sent (a
/// notice queued but not begun is sent at the next start).
async fn drain(mut tasks: JoinSet<()>, notices: NoticeTask) {
    while let Some(res) = tasks.join_next().await {
        if let Err(e) = res {
            error!("delivery task failed: {e}");
        }
    }
    let _ = notices.stop.send(true);
    if time::timeout(Duration::from_secs(65), notices.task).await.is_err() {
        warn!("a notice was still being sent at shutdown; it is sent again at the next start");
    }
}

/// One delivery attempt of `rec`; the outcome goes to the spool with its
/// writer's next commit, after which `committed` runs.
pub async fn attempt(
    spool: &Spool,
    target: &Target,
    cfg: &DeliveryConfig,
    notices: &Notices,
    queue: Option<&notice::Queue>,
    mut rec: Record,
    committed: impl FnOnce() + Send + 'static,
) -> Outcome {
    let started = std::time::Instant::now();
    let outcome = target.deliver(&rec).await;
    let now = now_ms();
    let error_before = rec.last_error.clone();
    apply(cfg, &mut rec, &outcome, now);
    let result = match (&outcome, rec.state) {
        (Outcome::Delivered | Outcome::Ignored(_), _) => DeliveryResult::Delivered,
        (_, State::Failed) => DeliveryResult::Failed,
        _ => DeliveryResult::Retry,
    };
    METRICS.delivery(result, started.elapsed());
    let queue_id = rec.queue_id.clone().unwrap_or_else(|| "-".into());
    match (&outcome, rec.state) {
        (Outcome::Delivered, _) => info!(
            "{queue_id}: delivered id={} kind={} token={} attempts={} latency_ms={}",
            rec.id,
            rec.kind,
            rec.token_prefix,
            rec.attempts,
            started.elapsed().as_millis()
        ),
        (Outcome::Ignored(why), _) => info!(
            "{queue_id}: delivered id={} kind={} token={} attempts={} latency_ms={}, ignored by the target: {}",
            rec.id,
            rec.kind,
            rec.token_prefix,
            rec.attempts,
            started.elapsed().as_millis(),
            crate::address::printable(why)
        ),
        (_, State::Failed) => error!(
            "{queue_id}: delivery failed for good id={} token={} attempts={}: {}",
            rec.id,
            rec.token_prefix,
            rec.attempts,
            rec.last_error.as_deref().unwrap_or("")
        ),
        _ => warn!(
            "{queue_id}: delivery deferred id={} token={} attempts={} next_in_ms={}: {}",
            rec.id,
            rec.token_prefix,
            rec.attempts,
            rec.next_attempt_ms.saturating_sub(now),
            rec.last_error.as_deref().unwrap_or("")
        ),
    }
    // A reply failed for good: its notice is committed with the failure,
    // then sent (without a notice task here, the daemon's next pass sends it).
    let noticed = notices.mark(&mut rec).then(|| queue.cloned()).flatten();
    // The journal tells the record's story, not every attempt: its first
    // failure, each change of reason, and the end.
    let changed = rec.state != State::Pending || rec.last_error != error_before;
    let event = changed.then(|| delivery_event(&rec, &outcome));
    let id = rec.id.clone();
    spool.record_outcome(rec, event, move |result| {
        match result {
            Err(e) => error!("{queue_id}: cannot record the delivery outcome of {id}: {e}"),
            Ok(()) => {
                if let Some(q) = noticed {
                    q.push(id);
                }
            }
        }
        committed();
    });
    outcome
}

/// The journal's line for one delivery attempt.
fn delivery_event(rec: &Record, outcome: &Outcome) -> crate::journal::Event {
    let (disposition, reason) = match (outcome, rec.state) {
        (Outcome::Delivered, _) => ("delivered", "applied".to_owned()),
        (Outcome::Ignored(why), _) => ("delivered", format!("ignored: {why}")),
        (_, State::Failed) => ("failed", rec.last_error.clone().unwrap_or_default()),
        _ => ("retry", rec.last_error.clone().unwrap_or_default()),
    };
    rec.event("delivery", disposition, &reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DeliveryConfig {
        DeliveryConfig {
            concurrency: 4,
            max_age: Duration::from_secs(5 * 86_400),
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            keep_delivered: Duration::from_secs(86_400),
            keep_failed: Duration::from_secs(86_400),
            journal: crate::config::JournalConfig {
                keep: Duration::from_secs(86_400),
                max_events: 1000,
            },
            probe_interval: Duration::from_secs(60),
            on_failure: crate::config::OnFailure::Keep,
            sendmail: "/usr/sbin/sendmail".into(),
            notice_sender: String::new(),
        }
    }

    #[test]
    fn exponential_from_one_second_capped_at_five_minutes() {
        let c = cfg();
        let secs: Vec<u64> = (1..=12).map(|n| backoff(&c, n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(backoff(&c, u32::MAX).as_secs(), 300);
    }

    fn rec(created_ms: u64) -> Record {
        Record {
            id: "x".into(),
            state: State::Pending,
            kind: "reply".into(),
            token_prefix: "abcdefgh…".into(),
            queue_id: None,
            created_ms,
            attempts: 0,
            next_attempt_ms: created_ms,
            last_error: None,
            repeats: 0,
            repeats_since_ms: 0,
            finished_ms: None,
            payload: serde_json::Value::Null,
            message_ref: None,
            original: None,
            notice: None,
        }
    }

    #[test]
    fn outcomes() {
        let c = cfg();
        let mut r = rec(1_000);
        apply(&c, &mut r, &Outcome::Retry("HTTP 503".into()), 2_000);
        assert_eq!((r.state, r.attempts, r.next_attempt_ms), (State::Pending, 1, 3_000));
        apply(&c, &mut r, &Outcome::Delivered, 4_000);
        assert_eq!(r.state, State::Delivered);

        let mut r = rec(1_000);
        apply(&c, &mut r, &Outcome::Permanent("HTTP 404".into()), 2_000);
        assert_eq!(r.state, State::Failed);
        assert_eq!(r.last_error.as_deref(), Some("HTTP 404"));

        // Past max_age a retryable error fails the record for good.
        let mut r = rec(0);
        apply(&c, &mut r, &Outcome::Retry("timed out".into()), 5 * 86_400_000);
        assert_eq!(r.state, State::Failed);
        assert!(r.last_error.unwrap().contains("max_age"));
    }

    #[test]
    fn a_target_that_does_not_answer_is_down_until_a_probe_is_answered() {
        let mut h = Health::default();
        let gone = Outcome::Unreachable("cannot connect: Connection refused".into());
        for n in 1..DOWN_AFTER {
            assert_eq!(h.observe(&gone, u64::from(n), 60_000), None);
            assert_eq!(h.plan(u64::from(n)), Plan::Deliver);
        }
        // A refusal is an answer: the count starts again.
        assert_eq!(h.observe(&Outcome::Permanent("HTTP 404".into()), 10, 60_000), None);
        for n in 0..DOWN_AFTER - 1 {
            assert_eq!(h.observe(&gone, 20 + u64::from(n), 60_000), None);
        }
        assert_eq!(h.observe(&gone, 30, 60_000), Some(true));
        assert_eq!(h.plan(31), Plan::Wait(60_030));
        assert_eq!(h.plan(60_030), Plan::Probe);
        h.probing = true;
        assert_eq!(h.plan(60_031), Plan::Wait(u64::MAX));
        // The probe gets no answer: the next one an interval later.
        assert_eq!(h.observe(&gone, 60_040, 60_000), None);
        assert_eq!(h.plan(60_041), Plan::Wait(120_040));
        // A 429 is an answer: the target is back.
        assert_eq!(
            h.observe(&Outcome::Retry("HTTP 429".into()), 120_050, 60_000),
            Some(false)
        );
        assert_eq!(h.plan(120_051), Plan::Deliver);
    }

    #[test]
    fn the_same_server_fault_for_long_fails_the_record() {
        let c = cfg();
        let span = c.max_backoff.as_millis() as u64 * u64::from(SAME_FAULT_SPAN);
        let mut r = rec(0);
        let fault = Outcome::ServerFault("PUT /x: HTTP 500: access denied".into());
        for n in 1..=MAX_SAME_SERVER_FAULT {
            apply(&c, &mut r, &fault, u64::from(n));
            assert_eq!(
                (r.state, r.repeats),
                (State::Pending, n),
                "five quick ones are an outage"
            );
        }
        // Other words in between start the count again.
        apply(&c, &mut r, &Outcome::ServerFault("PUT /x: HTTP 500: busy".into()), 10);
        assert_eq!((r.state, r.repeats), (State::Pending, 1));
        for n in 0..MAX_SAME_SERVER_FAULT {
            apply(&c, &mut r, &fault, 20 + u64::from(n) * span / 4);
        }
        assert_eq!(r.state, State::Failed);
        assert_eq!(r.last_error.as_deref(), Some("PUT /x: HTTP 500: access denied"));
    }
}
