//! Delivery targets, one file per kind.

pub mod caldav;
pub mod calendarserver;
pub mod webhook;

use crate::{
    config::{TargetConfig, TargetKind},
    spool::Record,
};

/// The HTTP client every target uses: the configured timeout, and no
/// redirects (one would turn a POST into a GET; the target says so instead).
pub(crate) fn http_client(config: &TargetConfig) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .timeout(config.timeout)
        .connect_timeout(config.timeout.min(std::time::Duration::from_secs(10)))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("imip-milter/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("target: cannot build HTTP client: {e}"))
}

/// The innermost cause of an error: what a log line about a failed delivery needs.
pub(crate) fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// What one delivery attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Try again later (timeouts, connection errors, 408, 425, 429, 5xx).
    Retry(String),
    /// The target refused the record for good; kept as failed.
    Permanent(String),
}

/// The configured target.
pub enum Target {
    Webhook(webhook::Webhook),
    CalendarServer(calendarserver::CalendarServer),
    CalDav(caldav::CalDav),
}

impl Target {
    /// Builds the target; reads secrets from their files.
    pub fn new(config: &TargetConfig) -> Result<Self, String> {
        match config.kind {
            TargetKind::Webhook => webhook::Webhook::new(config).map(Self::Webhook),
            TargetKind::CalendarServer => calendarserver::CalendarServer::new(config).map(Self::CalendarServer),
            TargetKind::CalDav => caldav::CalDav::new(config).map(Self::CalDav),
        }
    }

    pub async fn deliver(&self, record: &Record) -> Outcome {
        match self {
            Self::Webhook(w) => w.deliver(record).await,
            Self::CalendarServer(c) => c.deliver(record).await,
            Self::CalDav(c) => c.deliver(record).await,
        }
    }

    /// Reachable, TLS valid, credentials accepted, without sending a reply.
    pub async fn check(&self) -> crate::check::Finding {
        match self {
            Self::Webhook(w) => w.check().await,
            Self::CalendarServer(c) => c.check().await,
            Self::CalDav(c) => c.check().await,
        }
    }
}
