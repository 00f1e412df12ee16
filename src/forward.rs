//! The delivery worker: hands spooled records to the target, a few at a
//! time, retrying with exponential backoff, keeping what fails as failed.

use crate::{
    config::DeliveryConfig,
    metrics::{DeliveryResult, METRICS},
    spool::{now_ms, Record, Spool, State},
    target::{Outcome, Target},
};
use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{sync::Semaphore, task::JoinSet, time};
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
    let error = match outcome {
        Outcome::Delivered => None,
        Outcome::Retry(e) | Outcome::ServerFault(e) | Outcome::Permanent(e) => Some(e),
    };
    rec.repeats = match (error, &rec.last_error) {
        (Some(e), Some(last)) if e == last => rec.repeats.saturating_add(1),
        (Some(_), _) => 1,
        (None, _) => 0,
    };
    if rec.repeats <= 1 {
        rec.repeats_since_ms = now;
    }
    let span = cfg.max_backoff.saturating_mul(SAME_FAULT_SPAN).as_millis() as u64;
    let lasting = rec.repeats >= MAX_SAME_SERVER_FAULT && now.saturating_sub(rec.repeats_since_ms) >= span;
    match outcome {
        Outcome::Delivered => {
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
        Outcome::Retry(e) | Outcome::ServerFault(e) => {
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

/// Runs until `shutdown` resolves, then lets deliveries in flight finish.
pub async fn run(
    spool: Spool,
    target: Arc<Target>,
    cfg: DeliveryConfig,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let limit = Arc::new(Semaphore::new(cfg.concurrency));
    let in_flight: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut tasks = JoinSet::new();
    let mut last_purge = 0u64;

    loop {
        let notified = spool.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();

        let now = now_ms();
        if now.saturating_sub(last_purge) > 3_600_000 {
            last_purge = now;
            let delivered = now.saturating_sub(cfg.keep_delivered.as_millis() as u64);
            let failed = now.saturating_sub(cfg.keep_failed.as_millis() as u64);
            let s = spool.clone();
            let (keep, max_events) = (cfg.journal.keep.as_millis() as u64, cfg.journal.max_events);
            let j = spool.clone();
            match tokio::task::spawn_blocking(move || j.journal_purge(now.saturating_sub(keep), max_events)).await {
                Ok(Ok(n)) if n > 0 => info!("forgot {n} journal events past journal.keep or journal.max_events"),
                Ok(Err(e)) => warn!("journal purge failed: {e}"),
                _ => {}
            }
            match tokio::task::spawn_blocking(move || s.purge_finished(delivered, failed)).await {
                Ok(Ok(n)) if n > 0 => {
                    info!("forgot {n} records past delivery.keep_delivered or delivery.keep_failed")
                }
                Ok(Err(e)) => warn!("spool purge failed: {e}"),
                _ => {}
            }
        }

        let scan = {
            let s = spool.clone();
            let busy = in_flight.clone();
            let room = limit.available_permits().max(1) * 4;
            tokio::task::spawn_blocking(move || {
                let busy = busy.lock().map(|b| b.clone()).unwrap_or_default();
                s.due(now, room, &|id| busy.contains(id))
            })
            .await
        };
        let (due, next) = match scan {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                error!("cannot read the spool: {e}");
                (Vec::new(), Some(now + 5_000))
            }
            Err(e) => {
                error!("spool scan failed: {e}");
                (Vec::new(), Some(now + 5_000))
            }
        };

        let mut next_wake = next.map(|n| n.saturating_sub(now)).unwrap_or(u64::MAX);
        for rec in due {
            let permit = tokio::select! {
                p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = &mut shutdown => { return drain(tasks).await; }
            };
            if let Ok(mut set) = in_flight.lock() {
                set.insert(rec.id.clone());
            }
            let (spool, target, cfg, in_flight) = (spool.clone(), target.clone(), cfg.clone(), in_flight.clone());
            tasks.spawn(async move {
                let id = rec.id.clone();
                let notify = spool.notify.clone();
                attempt(&spool, &target, &cfg, rec, move || {
                    // Leaves the in-flight set only once its new state is committed.
                    if let Ok(mut set) = in_flight.lock() {
                        set.remove(&id);
                    }
                    // Rescan now the id is free: a scan while it was in flight skipped it.
                    notify.notify_one();
                })
                .await;
                drop(permit);
            });
        }
        // Reap finished tasks and release their ids.
        while let Some(res) = tasks.try_join_next() {
            if let Err(e) = res {
                error!("delivery task failed: {e}");
            }
        }
        if !tasks.is_empty() {
            // Wake when a delivery ends: its record may be due again soon, and
            // a permit is free.
            next_wake = next_wake.min(200);
        }

        tokio::select! {
            _ = &mut shutdown => return drain(tasks).await,
            _ = notified => {}
            _ = time::sleep(Duration::from_millis(next_wake).min(MAX_IDLE)) => {}
        }
    }
}

async fn drain(mut tasks: JoinSet<()>) {
    while let Some(res) = tasks.join_next().await {
        if let Err(e) = res {
            error!("delivery task failed: {e}");
        }
    }
}

/// One delivery attempt of `rec`; the outcome goes to the spool with its
/// writer's next commit, after which `committed` runs.
pub async fn attempt(
    spool: &Spool,
    target: &Target,
    cfg: &DeliveryConfig,
    mut rec: Record,
    committed: impl FnOnce() + Send + 'static,
) {
    let started = std::time::Instant::now();
    let outcome = target.deliver(&rec).await;
    let now = now_ms();
    apply(cfg, &mut rec, &outcome, now);
    let result = match (&outcome, rec.state) {
        (Outcome::Delivered, _) => DeliveryResult::Delivered,
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
    let event = delivery_event(&rec, &outcome);
    let id = rec.id.clone();
    spool.record_outcome(rec, event, move |result| {
        if let Err(e) = result {
            error!("{queue_id}: cannot record the delivery outcome of {id}: {e}");
        }
        committed();
    });
}

/// The journal's line for one delivery attempt.
fn delivery_event(rec: &Record, outcome: &Outcome) -> crate::journal::Event {
    let disposition = match (outcome, rec.state) {
        (Outcome::Delivered, _) => "delivered",
        (_, State::Failed) => "failed",
        _ => "retry",
    };
    let text = |k: &str| rec.payload[k].as_str().map(str::to_owned);
    crate::journal::Event {
        queue_id: rec.queue_id.clone(),
        message_id: text("message_id"),
        sender: rec.payload["envelope"]["mail_from"].as_str().map(str::to_owned),
        from: text("from"),
        attendee: text("attendee"),
        organizer: text("organizer"),
        token: Some(crate::journal::token8(&rec.token_prefix)),
        record_id: Some(rec.id.clone()),
        ..crate::journal::Event::now("delivery", disposition, rec.last_error.as_deref().unwrap_or(""))
    }
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
