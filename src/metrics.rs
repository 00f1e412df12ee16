//! Prometheus metrics on `[metrics] listen`: counters kept in atomics, served
//! as text by a small HTTP responder (GET /metrics, nothing else).

use crate::{decision::Disposition, spool::Spool};
use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tracing::warn;

const DISPOSITIONS: [Disposition; 6] = [
    Disposition::Accept,
    Disposition::Discard,
    Disposition::DeleteRecipients,
    Disposition::Reject,
    Disposition::Tempfail,
    Disposition::Redirect,
];
const RESULTS: [&str; 3] = ["delivered", "retry", "failed"];
/// What became of an outgoing invitation (`[outbound]`).
const OUTBOUND: [&str; 3] = ["tokenized", "not_tokenized", "tempfail"];
/// Delivery latency bucket bounds, seconds.
/// What observe mode counts: each disposition, and the outbound ones, as
/// they would have been.
const OBSERVED: [&str; 8] = [
    "would-accept",
    "would-discard",
    "would-delete-recipients",
    "would-reject",
    "would-tempfail",
    "would-redirect",
    "would-tokenize",
    "would-not-tokenize",
];
const BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0];

pub struct Metrics {
    messages: [AtomicU64; 6],
    deliveries: [AtomicU64; 3],
    latency_buckets: [AtomicU64; 10],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
    reports: AtomicU64,
    token_lookups: AtomicU64,
    token_lookups_remembered: AtomicU64,
    token_lookups_refused: AtomicU64,
    outbound: [AtomicU64; 3],
    token_store_errors: AtomicU64,
    /// Observe mode: decisions by what they would have been (OBSERVED).
    observed: [AtomicU64; OBSERVED.len()],
    /// Notices to organizers: sent, refused, failed.
    notices: [AtomicU64; 3],
}

pub static METRICS: Metrics = Metrics {
    messages: [const { AtomicU64::new(0) }; 6],
    deliveries: [const { AtomicU64::new(0) }; 3],
    latency_buckets: [const { AtomicU64::new(0) }; 10],
    latency_count: AtomicU64::new(0),
    latency_sum_us: AtomicU64::new(0),
    reports: AtomicU64::new(0),
    token_lookups: AtomicU64::new(0),
    token_lookups_remembered: AtomicU64::new(0),
    token_lookups_refused: AtomicU64::new(0),
    outbound: [const { AtomicU64::new(0) }; 3],
    token_store_errors: AtomicU64::new(0),
    notices: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
    observed: [const { AtomicU64::new(0) }; OBSERVED.len()],
};

/// What became of an outgoing invitation, as counted.
#[derive(Debug, Clone, Copy)]
pub enum OutboundResult {
    Tokenized,
    /// Left with the organizer's own address (not authorized, unreadable).
    NotTokenized,
    /// Deferred: the token store or a milter action failed.
    Tempfail,
}

/// Delivery result, as counted.
#[derive(Debug, Clone, Copy)]
pub enum DeliveryResult {
    Delivered,
    Retry,
    Failed,
}

impl Metrics {
    pub fn message(&self, d: Disposition) {
        if let Some(i) = DISPOSITIONS.iter().position(|x| *x == d) {
            self.messages[i].fetch_add(1, Relaxed);
        }
    }

    /// A delivery report that needed no answer, taken quietly.
    pub fn report(&self) {
        self.reports.fetch_add(1, Relaxed);
    }

    /// A token looked up at RCPT (from the store or from memory).
    pub fn token_lookup(&self) {
        self.token_lookups.fetch_add(1, Relaxed);
    }

    /// A lookup answered by the memory of unknown tokens.
    pub fn token_lookup_remembered(&self) {
        self.token_lookups_remembered.fetch_add(1, Relaxed);
    }

    /// A gateway recipient refused before any lookup: its client past the
    /// limit or with its lookups in flight.
    pub fn token_lookup_refused(&self) {
        self.token_lookups_refused.fetch_add(1, Relaxed);
    }

    /// The token store failed a lookup or a mint (a 451 followed).
    pub fn token_store_error(&self) {
        self.token_store_errors.fetch_add(1, Relaxed);
    }

    /// Observe mode: a decision that was not carried out (`would-…`).
    pub fn observed(&self, would: &str) {
        if let Some(i) = OBSERVED.iter().position(|x| *x == would) {
            self.observed[i].fetch_add(1, Relaxed);
        }
    }

    /// A reply that failed for good, handed to its organizer or not.
    pub fn notice(&self, state: crate::spool::NoticeState) {
        use crate::spool::NoticeState::*;
        let i = match state {
            Sent => 0,
            Refused => 1,
            Failed => 2,
            Pending => return,
        };
        self.notices[i].fetch_add(1, Relaxed);
    }

    pub fn outbound(&self, result: OutboundResult) {
        self.outbound[result as usize].fetch_add(1, Relaxed);
    }

    pub fn delivery(&self, result: DeliveryResult, latency: Duration) {
        self.deliveries[result as usize].fetch_add(1, Relaxed);
        let secs = latency.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.latency_buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_us.fetch_add(latency.as_micros() as u64, Relaxed);
    }

    /// The text exposition format.
    pub fn render(&self, spool_pending: usize, oldest_pending_secs: f64, target_down_secs: Option<f64>) -> String {
        let mut out = String::new();
        out.push_str("# HELP imip_milter_messages_total Messages to gateway addresses, by disposition.\n");
        out.push_str("# TYPE imip_milter_messages_total counter\n");
        for (i, d) in DISPOSITIONS.iter().enumerate() {
            let _ = writeln!(
                out,
                "imip_milter_messages_total{{disposition=\"{}\"}} {}",
                d.as_str(),
                self.messages[i].load(Relaxed)
            );
        }
        out.push_str("# HELP imip_milter_outbound_invitations_total Outgoing invitations, by what became of them.\n");
        out.push_str("# TYPE imip_milter_outbound_invitations_total counter\n");
        for (i, r) in OUTBOUND.iter().enumerate() {
            let _ = writeln!(
                out,
                "imip_milter_outbound_invitations_total{{result=\"{r}\"}} {}",
                self.outbound[i].load(Relaxed)
            );
        }
        out.push_str(
            "# HELP imip_milter_token_store_errors_total Token lookups and mints the store failed (answered 451).\n",
        );
        out.push_str("# TYPE imip_milter_token_store_errors_total counter\n");
        let _ = writeln!(
            out,
            "imip_milter_token_store_errors_total {}",
            self.token_store_errors.load(Relaxed)
        );
        out.push_str("# HELP imip_milter_observed_total Observe mode: decisions not carried out, by what they would have been.\n");
        out.push_str("# TYPE imip_milter_observed_total counter\n");
        for (i, d) in OBSERVED.iter().enumerate() {
            let _ = writeln!(
                out,
                "imip_milter_observed_total{{disposition=\"{d}\"}} {}",
                self.observed[i].load(Relaxed)
            );
        }
        out.push_str(
            "# HELP imip_milter_notices_total Replies that failed for good: sent to their organizer, refused by rule (no organizer, a gateway address, not local), failed (sendmail).\n",
        );
        out.push_str("# TYPE imip_milter_notices_total counter\n");
        for (i, result) in ["sent", "refused", "failed"].iter().enumerate() {
            let _ = writeln!(
                out,
                "imip_milter_notices_total{{result=\"{result}\"}} {}",
                self.notices[i].load(Relaxed)
            );
        }
        out.push_str("# HELP imip_milter_spool_pending Records waiting for delivery.\n");
        out.push_str("# TYPE imip_milter_spool_pending gauge\n");
        let _ = writeln!(out, "imip_milter_spool_pending {spool_pending}");
        out.push_str("# HELP imip_milter_spool_oldest_pending_seconds Age of the oldest pending record.\n");
        out.push_str("# TYPE imip_milter_spool_oldest_pending_seconds gauge\n");
        let _ = writeln!(out, "imip_milter_spool_oldest_pending_seconds {oldest_pending_secs:.3}");
        out.push_str("# HELP imip_milter_target_down 1 while the target is taken as down (one probe per delivery.probe_interval).\n");
        out.push_str("# TYPE imip_milter_target_down gauge\n");
        let _ = writeln!(out, "imip_milter_target_down {}", u8::from(target_down_secs.is_some()));
        out.push_str(
            "# HELP imip_milter_target_down_seconds How long the target has been taken as down; 0 while up.\n",
        );
        out.push_str("# TYPE imip_milter_target_down_seconds gauge\n");
        let _ = writeln!(
            out,
            "imip_milter_target_down_seconds {:.3}",
            target_down_secs.unwrap_or(0.0)
        );
        out.push_str("# HELP imip_milter_deliveries_total Delivery attempts, by result.\n");
        out.push_str("# TYPE imip_milter_deliveries_total counter\n");
        for (i, r) in RESULTS.iter().enumerate() {
            let _ = writeln!(
                out,
                "imip_milter_deliveries_total{{result=\"{r}\"}} {}",
                self.deliveries[i].load(Relaxed)
            );
        }
        out.push_str("# HELP imip_milter_delivery_seconds Time a delivery attempt took.\n");
        out.push_str("# TYPE imip_milter_delivery_seconds histogram\n");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "imip_milter_delivery_seconds_bucket{{le=\"{b}\"}} {}",
                self.latency_buckets[i].load(Relaxed)
            );
        }
        let count = self.latency_count.load(Relaxed);
        let _ = writeln!(out, "imip_milter_delivery_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "imip_milter_delivery_seconds_sum {:.6}",
            self.latency_sum_us.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "imip_milter_delivery_seconds_count {count}");
        out.push_str(
            "# HELP imip_milter_delivery_reports_total Delivery reports taken quietly: delayed, relayed, delivered.\n",
        );
        out.push_str("# TYPE imip_milter_delivery_reports_total counter\n");
        let _ = writeln!(out, "imip_milter_delivery_reports_total {}", self.reports.load(Relaxed));
        for (name, help, counter) in [
            (
                "imip_milter_token_lookups_total",
                "Local tokens looked up at RCPT, in the store or in the memory of unknown tokens.",
                &self.token_lookups,
            ),
            (
                "imip_milter_token_lookups_remembered_total",
                "Lookups answered by the memory of unknown tokens (tokens.remember_unknown).",
                &self.token_lookups_remembered,
            ),
            (
                "imip_milter_token_lookups_refused_total",
                "Gateway recipients refused before a lookup: the client past tokens.max_unknown or tokens.max_lookups_per_client.",
                &self.token_lookups_refused,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", counter.load(Relaxed));
        }
        out
    }
}

/// Scrapes answered at once; more connections wait in the kernel's backlog
/// instead of taking the daemon's descriptors (local users reach this port).
const MAX_CONNECTIONS: usize = 8;
/// How long a connection may take to send its request.
const IDLE: Duration = Duration::from_secs(2);

/// Serves GET /metrics until the task is dropped.
pub async fn serve(listener: TcpListener, spool: Spool) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut failing = false;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (mut stream, _) = match listener.accept().await {
            Ok(s) => {
                failing = false;
                s
            }
            Err(e) => {
                // Once per burst: a full descriptor table fails every accept.
                if !std::mem::replace(&mut failing, true) {
                    warn!("metrics: cannot accept connections: {e}");
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        let spool = spool.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let down = spool
                .target_down_since()
                .map(|t| crate::clock::now_ms().saturating_sub(t) as f64 / 1000.0);
            let mut head = vec![0u8; 2048];
            let n = match tokio::time::timeout(IDLE, stream.read(&mut head)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let request = String::from_utf8_lossy(&head[..n]);
            let (status, body) = if request.starts_with("GET /metrics ") || request.starts_with("GET /metrics?") {
                let stats = tokio::task::spawn_blocking(move || spool.pending_stats()).await;
                let (pending, oldest) = match stats {
                    Ok(Ok(s)) => s,
                    _ => (0, None),
                };
                let age = oldest
                    .map(|o| crate::clock::now_ms().saturating_sub(o) as f64 / 1000.0)
                    .unwrap_or(0.0);
                ("200 OK", METRICS.render(pending, age, down))
            } else {
                ("404 Not Found", "GET /metrics\n".to_owned())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}
