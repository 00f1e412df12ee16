//! `[delivery]` and `[journal]`: retries, how long records and events are
//! kept, how a target that is down is probed.

use super::{
    params::{duration, positive},
    raw::{RawDelivery, RawJournal},
    ConfigError,
};
use std::{path::PathBuf, time::Duration};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryConfig {
    pub concurrency: usize,
    pub max_age: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// How long delivered records are kept to recognise duplicates.
    pub keep_delivered: Duration,
    /// Failed records are kept this long for `queue list`, then forgotten.
    pub keep_failed: Duration,
    /// `[journal]`: purged with the spool.
    pub journal: JournalConfig,
    /// While the target is down: one attempt this often.
    pub probe_interval: Duration,
    /// What becomes of a reply whose record fails for good.
    pub on_failure: OnFailure,
    /// A sendmail-compatible program, run as `-i -f SENDER -- RCPT`.
    pub sendmail: PathBuf,
    /// The envelope sender of notices; empty: the null sender.
    pub notice_sender: String,
}

/// `delivery.on_failure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// The original goes to the organizer with a note of what failed.
    Organizer,
    /// The record stays in the spool; nobody is told.
    Keep,
}

/// `[journal]`: how much of what happened `imip-milter journal` can show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalConfig {
    pub keep: Duration,
    pub max_events: usize,
}

pub fn build(delivery: Option<RawDelivery>, journal: Option<RawJournal>) -> Result<DeliveryConfig, ConfigError> {
    let d = delivery.unwrap_or_default();
    let delivery = DeliveryConfig {
        concurrency: positive("delivery.concurrency", d.concurrency, 4, 256)?,
        max_age: duration("delivery.max_age", d.max_age, Duration::from_secs(5 * 86_400))?,
        initial_backoff: duration("delivery.initial_backoff", d.initial_backoff, Duration::from_secs(1))?,
        max_backoff: duration("delivery.max_backoff", d.max_backoff, Duration::from_secs(300))?,
        keep_delivered: duration(
            "delivery.keep_delivered",
            d.keep_delivered,
            Duration::from_secs(7 * 86_400),
        )?,
        keep_failed: duration("delivery.keep_failed", d.keep_failed, Duration::from_secs(30 * 86_400))?,
        probe_interval: duration("delivery.probe_interval", d.probe_interval, Duration::from_secs(60))?,
        on_failure: match d.on_failure.as_deref().unwrap_or("organizer") {
            "organizer" => OnFailure::Organizer,
            "keep" => OnFailure::Keep,
            other => {
                return Err(ConfigError::new(
                    "delivery.on_failure",
                    format!("`{other}` is not organizer or keep"),
                ))
            }
        },
        sendmail: match d.sendmail {
            None => PathBuf::from("/usr/sbin/sendmail"),
            Some(p) if p.is_absolute() => p,
            Some(p) => {
                return Err(ConfigError::new(
                    "delivery.sendmail",
                    format!("`{}` is not an absolute path", p.display()),
                ))
            }
        },
        notice_sender: match d.notice_sender.map(|s| s.trim().to_owned()).unwrap_or_default() {
            s if s.is_empty() || s == "<>" => String::new(),
            s if crate::address::is_plain_address(&s) => s,
            s => {
                return Err(ConfigError::new(
                    "delivery.notice_sender",
                    format!(
                        "`{}` is not an address (local@domain, or empty for the null sender)",
                        crate::address::printable(&s)
                    ),
                ))
            }
        },
        journal: {
            let j = journal.unwrap_or_default();
            JournalConfig {
                keep: duration("journal.keep", j.keep, Duration::from_secs(30 * 86_400))?,
                max_events: positive("journal.max_events", j.max_events, 1_000_000, 100_000_000)?,
            }
        },
    };
    if delivery.initial_backoff.is_zero() {
        return Err(ConfigError::new("delivery.initial_backoff", "must be longer than zero"));
    }
    if delivery.max_backoff < delivery.initial_backoff {
        return Err(ConfigError::new(
            "delivery.max_backoff",
            "must not be shorter than delivery.initial_backoff",
        ));
    }
    Ok(delivery)
}
