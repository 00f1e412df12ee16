//! The journal: what became of every message and every delivery, so that
//! "what happened to Bob's reply?" has an answer (`imip-milter journal`).
//! Kept in the spool's file, written without an fsync of its own (the next
//! spool commit makes it durable), bounded in age and count
//! (`[journal] keep`, `max_events`); it holds the first 8 characters of a
//! token and never a message body.

use serde::{Deserialize, Serialize};

/// One decision or delivery outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// RFC 3339, UTC.
    pub time: String,
    #[serde(skip)]
    pub time_ms: u64,
    /// `recipient` (RCPT refused), `message` (end of message, or `deliver`),
    /// `delivery` (an attempt at the target).
    pub event: String,
    pub queue_id: Option<String>,
    pub message_id: Option<String>,
    /// The envelope sender.
    pub sender: Option<String>,
    /// Header From.
    pub from: Option<String>,
    pub attendee: Option<String>,
    pub organizer: Option<String>,
    /// The first 8 characters of the token.
    pub token: Option<String>,
    /// accept, discard, reject, tempfail, redirect, delete-recipients;
    /// for deliveries: delivered, retry, failed; for notices to the
    /// organizer: sent, not-sent; in observe mode `would-` and the
    /// disposition (would-discard, would-tokenize).
    pub disposition: String,
    pub smtp_reply: Option<String>,
    pub reason: String,
    pub record_id: Option<String>,
}

/// What `imip-milter journal` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// Envelope sender, header From, attendee or organizer.
    pub address: Option<String>,
    pub message_id: Option<String>,
    pub queue_id: Option<String>,
    /// Events at or after this time (ms since the epoch).
    pub since_ms: u64,
}

/// Events listed at most by one query.
pub const MAX_LISTED: usize = 10_000;

impl Event {
    /// A new event now; text from outside is clipped to a line.
    pub fn now(event: &str, disposition: &str, reason: &str) -> Self {
        let time_ms = crate::clock::now_ms();
        Self {
            time: rfc3339(time_ms),
            time_ms,
            event: event.to_owned(),
            disposition: disposition.to_owned(),
            reason: clip(reason),
            ..Default::default()
        }
    }

    /// As stored: every field from outside one line of at most 500
    /// characters (a Message-ID or From may be as long as the message).
    pub fn bounded(&self) -> Self {
        let c = |v: &Option<String>| v.as_deref().map(clip);
        Self {
            time: self.time.clone(),
            time_ms: self.time_ms,
            event: clip(&self.event),
            queue_id: c(&self.queue_id),
            message_id: c(&self.message_id),
            sender: c(&self.sender),
            from: c(&self.from),
            attendee: c(&self.attendee),
            organizer: c(&self.organizer),
            token: self.token.as_deref().map(token8),
            disposition: clip(&self.disposition),
            smtp_reply: c(&self.smtp_reply),
            reason: clip(&self.reason),
            record_id: c(&self.record_id),
        }
    }

    pub fn matches(&self, f: &Filter) -> bool {
        let same = |a: &Option<String>, b: &str| a.as_deref().is_some_and(|a| bare(a).eq_ignore_ascii_case(bare(b)));
        self.time_ms >= f.since_ms
            && f.queue_id
                .as_deref()
                .is_none_or(|q| self.queue_id.as_deref() == Some(q))
            && f.message_id.as_deref().is_none_or(|m| same(&self.message_id, m))
            && f.address.as_deref().is_none_or(|a| {
                [&self.sender, &self.from, &self.organizer].iter().any(|v| same(v, a))
                    // An invitation's attendees, one a comma.
                    || self.attendee.as_deref().is_some_and(|list| {
                        list.split(", ").any(|one| bare(one).eq_ignore_ascii_case(bare(a)))
                    })
            })
    }

    /// One line for a terminal: every value escaped.
    pub fn to_line(&self) -> String {
        let p = |v: &Option<String>| crate::address::printable(v.as_deref().unwrap_or("-"));
        let mut line = format!(
            "{} {} {} queue-id={} message-id={} sender=<{}> from={} attendee={} organizer={} token={}",
            self.time,
            self.event,
            self.disposition,
            p(&self.queue_id),
            p(&self.message_id),
            crate::address::printable(self.sender.as_deref().unwrap_or("")),
            p(&self.from),
            p(&self.attendee),
            p(&self.organizer),
            p(&self.token),
        );
        if let Some(r) = &self.smtp_reply {
            line.push_str(&format!(" smtp-reply=\"{}\"", crate::address::quoted(r)));
        }
        if let Some(id) = &self.record_id {
            line.push_str(&format!(" id={}", crate::address::printable(id)));
        }
        line.push_str(&format!(" reason=\"{}\"", crate::address::quoted(&self.reason)));
        line
    }
}

/// `<a@b>`, `mailto:a@b`, `a@b`: the address alone.
fn bare(s: &str) -> &str {
    let s = s.trim().trim_start_matches('<').trim_end_matches('>');
    s.get(..7)
        .filter(|m| m.eq_ignore_ascii_case("mailto:"))
        .and_then(|_| s.get(7..))
        .unwrap_or(s)
}

/// A token as the journal keeps it: its first 8 characters.
pub fn token8(token: &str) -> String {
    token.trim_end_matches('…').chars().take(8).collect()
}

pub fn clip(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(500).collect()
}

/// A disposition as observe mode journals it: what would have been done.
pub fn would(disposition: &str) -> String {
    match disposition {
        "tokenized" => "would-tokenize".into(),
        "not-tokenized" => "would-not-tokenize".into(),
        d => format!("would-{d}"),
    }
}

pub fn rfc3339(ms: u64) -> String {
    chrono::DateTime::<chrono::Utc>::from(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_addresses_in_any_form() {
        let mut e = Event::now("message", "discard", "calendar reply");
        e.sender = Some("bob@example.com".into());
        e.attendee = Some("mailto:Bob@Example.com".into());
        e.queue_id = Some("4QxYz1".into());
        e.message_id = Some("<r1@example.com>".into());
        let f = |address: Option<&str>, q: Option<&str>, m: Option<&str>| Filter {
            address: address.map(str::to_owned),
            queue_id: q.map(str::to_owned),
            message_id: m.map(str::to_owned),
            since_ms: 0,
        };
        assert!(e.matches(&f(Some("<bob@example.com>"), None, None)));
        assert!(e.matches(&f(
            Some("mailto:BOB@example.com"),
            Some("4QxYz1"),
            Some("r1@example.com")
        )));
        assert!(!e.matches(&f(Some("carol@example.com"), None, None)));
        assert!(!e.matches(&f(None, Some("other"), None)));
        assert!(!e.matches(&Filter {
            since_ms: e.time_ms + 1,
            ..Filter::default()
        }));
        let mut long = e.clone();
        long.message_id = Some(format!("<{}@x>", "a".repeat(100_000)));
        long.token = Some("8e3c0d1a-5b7e-4f61-9a0c-2d4f3b6a7c81".into());
        let b = long.bounded();
        assert_eq!(b.message_id.unwrap().chars().count(), 500);
        assert_eq!(b.token.as_deref(), Some("8e3c0d1a"));
        let mut shady = e.clone();
        shady.reason = "x\u{1b}[31my".into();
        assert!(!shady.to_line().contains('\u{1b}'));
    }
}
