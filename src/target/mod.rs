//! Delivery targets, one file per kind.

pub mod caldav;
pub mod calendarserver;
pub mod webhook;

use crate::{
    config::{TargetConfig, TargetKind},
    spool::Record,
};

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
