//! What one SMTP client may cost the others (DESIGN §4d), counted per client
//! address (IPv6: per /64): bad gateway recipients within a window
//! (`tokens.max_unknown`, `tokens.unknown_window`), token lookups in flight
//! (`tokens.max_lookups_per_client`), and the refusals that the journal
//! tallies, once a client is past its limit, instead of one event each.

use crate::journal::Event;
use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Mutex,
    },
    time::Duration,
};

/// Client addresses remembered at most; the oldest go first.
const MAX_CLIENTS: usize = 10_000;

/// The bucket that new clients share while MAX_CLIENTS are remembered.
const OVERFLOW: &str = "*";

/// The per-client limits every session shares.
pub struct Clients {
    bad: UnknownLimiter,
    /// `tokens.max_lookups_per_client`; a reload may change it.
    max_lookups: AtomicUsize,
    /// Lookups in flight per client; an entry goes when its count is back
    /// to zero, so there are at most as many as sessions.
    lookups: Mutex<HashMap<String, usize>>,
    tallies: Mutex<HashMap<String, Tally>>,
}

/// Refusals of one client past its limit, not journaled one by one.
struct Tally {
    since_ms: u64,
    count: u64,
    /// The last answer given, for the summary.
    reply: Option<String>,
}

impl Clients {
    pub fn new(max_unknown: usize, window: Duration, max_lookups: usize) -> Self {
        Self {
            bad: UnknownLimiter::new(max_unknown, window),
            max_lookups: AtomicUsize::new(max_lookups),
            lookups: Mutex::new(HashMap::new()),
            tallies: Mutex::new(HashMap::new()),
        }
    }

    /// `tokens.max_lookups_per_client`.
    pub fn max_lookups(&self) -> usize {
        self.max_lookups.load(Ordering::Relaxed)
    }

    /// The limits of a reloaded `[tokens]`; what was counted stays counted.
    pub fn set_limits(&self, max_unknown: usize, window: Duration, max_lookups: usize) {
        self.bad.max.store(max_unknown, Ordering::Relaxed);
        self.bad.window_ms.store(window.as_millis() as u64, Ordering::Relaxed);
        self.max_lookups.store(max_lookups, Ordering::Relaxed);
    }

    /// Whether `client` sent its `max_unknown` bad recipients within the window.
    pub fn over_limit(&self, client: &str, now_ms: u64) -> bool {
        self.bad.blocked(client, now_ms)
    }

    /// A bad recipient from `client`: no token, a token of bad syntax, an
    /// unknown or expired one, or one the store could not answer for.
    pub fn count_bad(&self, client: &str, now_ms: u64) {
        self.bad.record(client, now_ms);
    }

    /// A lookup for `client`, or None while it has `max_lookups_per_client`
    /// in flight. The slot is given back when dropped, even when the
    /// session ends mid-lookup.
    pub fn start_lookup(&self, client: &str) -> Option<LookupSlot<'_>> {
        let key = key(client);
        let mut lookups = self.lookups.lock().unwrap_or_else(|p| p.into_inner());
        let n = lookups.entry(key.clone()).or_default();
        if *n >= self.max_lookups() {
            return None;
        }
        *n += 1;
        Some(LookupSlot { clients: self, key })
    }

    /// A refusal of `client` that the journal counts instead of writing.
    pub fn tally(&self, client: &str, now_ms: u64, reply: Option<String>) {
        let mut key = key(client);
        let mut tallies = self.tallies.lock().unwrap_or_else(|p| p.into_inner());
        if tallies.len() >= MAX_CLIENTS && !tallies.contains_key(&key) {
            key = OVERFLOW.to_owned();
        }
        let t = tallies.entry(key).or_insert(Tally {
            since_ms: now_ms,
            count: 0,
            reply: None,
        });
        t.count += 1;
        t.reply = reply;
    }

    /// The summaries whose window has passed (all of them at `end`): one
    /// journal event per client, with the count.
    pub fn summaries(&self, now_ms: u64, end: bool) -> Vec<Event> {
        let window = self.bad.window_ms.load(Ordering::Relaxed);
        let mut tallies = self.tallies.lock().unwrap_or_else(|p| p.into_inner());
        let due: Vec<String> = tallies
            .iter()
            .filter(|(_, t)| end || now_ms.saturating_sub(t.since_ms) >= window)
            .map(|(k, _)| k.clone())
            .collect();
        due.into_iter()
            .filter_map(|client| {
                let t = tallies.remove(&client)?;
                let reason = format!(
                    "{} recipients refused from client {client} since {}, past its limit of {} bad recipients in {}s; not journaled one by one",
                    t.count,
                    crate::journal::rfc3339(t.since_ms),
                    self.bad.max.load(Ordering::Relaxed),
                    window / 1000
                );
                Some(Event {
                    smtp_reply: t.reply,
                    ..Event::now("recipients", "refused", &reason)
                })
            })
            .collect()
    }
}

/// One lookup in flight for a client; dropping it gives the slot back.
pub struct LookupSlot<'a> {
    clients: &'a Clients,
    key: String,
}

impl Drop for LookupSlot<'_> {
    fn drop(&mut self) {
        let mut lookups = self.clients.lookups.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = lookups.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                lookups.remove(&self.key);
            }
        }
    }
}

/// Counts bad recipients per client address in a sliding window.
pub struct UnknownLimiter {
    max: AtomicUsize,
    window_ms: AtomicU64,
    seen: Mutex<HashMap<String, VecDeque<u64>>>,
}

impl UnknownLimiter {
    pub fn new(max: usize, window: Duration) -> Self {
        Self {
            max: AtomicUsize::new(max),
            window_ms: AtomicU64::new(window.as_millis() as u64),
            seen: Mutex::new(HashMap::new()),
        }
    }

    fn prune(q: &mut VecDeque<u64>, now: u64, window: u64) {
        while q.front().is_some_and(|t| now.saturating_sub(*t) > window) {
            q.pop_front();
        }
    }

    /// Whether `client` used up its bad recipients for now.
    pub fn blocked(&self, client: &str, now: u64) -> bool {
        let key = key(client);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let full = seen.len() >= MAX_CLIENTS;
        let q = match seen.get_mut(&key) {
            Some(q) => q,
            // Under a flood of new addresses they share one bucket.
            None if full => match seen.get_mut(OVERFLOW) {
                Some(q) => q,
                None => return false,
            },
            None => return false,
        };
        Self::prune(q, now, self.window_ms.load(Ordering::Relaxed));
        q.len() >= self.max.load(Ordering::Relaxed)
    }

    pub fn record(&self, client: &str, now: u64) {
        let mut key = key(client);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= MAX_CLIENTS && !seen.contains_key(&key) {
            let window = self.window_ms.load(Ordering::Relaxed);
            seen.retain(|_, q| {
                Self::prune(q, now, window);
                !q.is_empty()
            });
            if seen.len() >= MAX_CLIENTS {
                key = OVERFLOW.to_owned();
            }
        }
        let q = seen.entry(key).or_default();
        Self::prune(q, now, self.window_ms.load(Ordering::Relaxed));
        q.push_back(now);
        // Remember no more than the limit needs.
        while q.len() > self.max.load(Ordering::Relaxed) {
            q.pop_front();
        }
    }
}

/// IPv6 clients are counted per /64: one host has a whole /64 to rotate through.
fn key(client: &str) -> String {
    match client.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        Ok(std::net::IpAddr::V6(v6)) => v6.to_ipv4_mapped().map(|v4| v4.to_string()).unwrap_or_default(),
        _ => client.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_share_their_64_and_a_full_map_a_bucket() {
        let l = UnknownLimiter::new(2, std::time::Duration::from_secs(60));
        l.record("2001:db8:1:2::1", 0);
        l.record("2001:db8:1:2:ffff::9", 1);
        assert!(l.blocked("2001:db8:1:2::77", 2), "the same /64");
        assert!(!l.blocked("2001:db8:1:3::1", 2), "another /64");
        assert!(!l.blocked("192.0.2.1", 2));
        // Fill the map; newcomers then share one bucket instead of going free.
        for i in 0..MAX_CLIENTS {
            l.record(&format!("10.{}.{}.{}", i >> 16 & 255, i >> 8 & 255, i & 255), 3);
        }
        l.record("198.51.100.1", 4);
        l.record("198.51.100.2", 4);
        assert!(l.blocked("198.51.100.3", 5), "a newcomer under a flood is limited");
        // Counts age out of the window.
        assert!(!l.blocked("2001:db8:1:2::1", 61_002));
    }

    #[test]
    fn lookups_in_flight_are_capped_per_client_and_given_back() {
        let c = Clients::new(10, Duration::from_secs(60), 2);
        let a = c.start_lookup("192.0.2.1");
        let b = c.start_lookup("192.0.2.1");
        assert!(a.is_some() && b.is_some());
        assert!(c.start_lookup("192.0.2.1").is_none(), "a third at once");
        assert!(c.start_lookup("192.0.2.2").is_some(), "another client");
        drop(a);
        assert!(c.start_lookup("192.0.2.1").is_some(), "given back when done");
        drop(b);
        assert!(c.lookups.lock().unwrap().is_empty(), "nothing left behind");
    }

    #[test]
    fn a_tally_is_one_summary_per_window() {
        let c = Clients::new(3, Duration::from_secs(60), 2);
        for i in 0..197 {
            c.tally("198.51.100.7", 1_000 + i, Some("550 5.1.1 no".into()));
        }
        assert!(c.summaries(30_000, false).is_empty(), "the window is not over");
        let s = c.summaries(61_000, false);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].event, "recipients");
        assert!(
            s[0].reason
                .starts_with("197 recipients refused from client 198.51.100.7 "),
            "{}",
            s[0].reason
        );
        assert_eq!(s[0].smtp_reply.as_deref(), Some("550 5.1.1 no"));
        assert!(c.summaries(200_000, true).is_empty(), "written once");
        c.tally("198.51.100.7", 300_000, None);
        assert_eq!(c.summaries(300_001, true).len(), 1, "what is left, at the end");
    }
}
