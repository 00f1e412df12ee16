//! The settings a milter session and `deliver` read: a snapshot taken per
//! message, replaced as a whole on SIGHUP.

use crate::{address::GatewayAddresses, config::SenderPolicy, outbound::Outbound, tokens::TokenStore};
use std::sync::Arc;

/// Local token mode: the store and how long a token lives.
#[derive(Clone)]
pub struct LocalTokens {
    pub store: Arc<dyn TokenStore>,
    pub days_to_live: u32,
}

impl std::fmt::Debug for LocalTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalTokens {{ days_to_live: {} }}", self.days_to_live)
    }
}

/// The settings a SIGHUP may change.
#[derive(Debug)]
pub struct Settings {
    pub gateway: GatewayAddresses,
    pub max_message_bytes: usize,
    /// What one calendar reply may hold.
    pub limits: crate::analysis::Limits,
    pub max_gateway_recipients: usize,
    /// Read once, at start: the budget of all sessions together.
    pub max_buffered_bytes: usize,
    pub policy: SenderPolicy,
    /// The target applies REPLY only (caldav): COUNTER and REFRESH go to
    /// the organizer instead.
    pub replies_only: bool,
    /// Set in local token mode; `run` opens the store, a reload reopens it
    /// when `[tokens]` names another.
    pub tokens: Option<LocalTokens>,
    /// Set when outbound tokenization is enabled (needs local tokens).
    pub outbound: Option<Outbound>,
    /// `mode = "observe"`: decide and journal, change nothing.
    pub observe: bool,
    /// delivery.on_failure = "organizer": a reply is kept as it arrived,
    /// for its notice should it fail.
    pub keep_originals: bool,
}

impl Settings {
    /// A disposition as the log and the journal name it: in observe mode,
    /// what it would have been.
    pub fn shown(&self, d: crate::decision::Disposition) -> String {
        match self.observe {
            true => crate::journal::would(d.as_str()),
            false => d.as_str().to_owned(),
        }
    }

    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            gateway: config.gateway.clone(),
            max_message_bytes: config.max_message_bytes,
            limits: crate::analysis::Limits {
                components: config.max_components,
                attendees: config.max_attendees,
            },
            max_buffered_bytes: config.max_buffered_bytes,
            max_gateway_recipients: config.max_gateway_recipients,
            policy: config.policy.clone(),
            replies_only: config.target.kind == crate::config::TargetKind::CalDav,
            tokens: None,
            outbound: config.outbound.clone(),
            observe: config.mode == crate::config::Mode::Observe,
            keep_originals: config.delivery.on_failure == crate::config::OnFailure::Organizer,
        }
    }
}
