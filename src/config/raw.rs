//! The configuration file as written: every key optional, unknown keys
//! refused. The builders in the section modules give defaults and check values.

use super::ConfigError;
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: Option<String>,
    pub mode: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub max_message_bytes: Option<i64>,
    pub max_sessions: Option<i64>,
    pub max_components: Option<i64>,
    pub max_attendees: Option<i64>,
    pub max_buffered_bytes: Option<i64>,
    pub user: Option<String>,
    pub max_gateway_recipients: Option<i64>,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
    pub gateway: Option<RawGateway>,
    pub target: Option<RawTarget>,
    pub delivery: Option<RawDelivery>,
    pub journal: Option<RawJournal>,
    pub metrics: Option<RawMetrics>,
    pub tokens: Option<RawTokens>,
    pub policy: Option<RawPolicy>,
    pub outbound: Option<RawOutbound>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutbound {
    pub enabled: Option<bool>,
    pub organizer_domains: Option<Vec<String>>,
    pub address_patterns: Option<Vec<String>>,
    pub sender_login_maps: Option<PathBuf>,
    pub trusted_logins: Option<Vec<String>>,
    pub trusted_clients: Option<Vec<String>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub sender: Option<String>,
    pub authserv_id: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTokens {
    pub mode: Option<String>,
    pub days_to_live: Option<i64>,
    pub max_unknown: Option<i64>,
    pub unknown_window: Option<RawDuration>,
    pub max_lookups_per_client: Option<i64>,
    pub remember_unknown: Option<RawDuration>,
    pub store: Option<String>,
    pub pool_size: Option<i64>,
    pub pool_wait: Option<RawDuration>,
    pub url: Option<String>,
    pub password_file: Option<PathBuf>,
    pub layout: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub listen: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    pub addresses: Option<Vec<String>>,
    pub delimiters: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTarget {
    pub kind: Option<String>,
    pub url: Option<String>,
    pub timeout: Option<RawDuration>,
    pub token_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub secret_file: Option<PathBuf>,
    pub secret_header: Option<String>,
    pub calendar_home: Option<String>,
    pub party_crashers: Option<String>,
    pub max_response_bytes: Option<i64>,
    pub max_new_overrides: Option<i64>,
    pub ca_file: Option<PathBuf>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJournal {
    pub keep: Option<RawDuration>,
    pub max_events: Option<i64>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDelivery {
    pub concurrency: Option<i64>,
    pub max_age: Option<RawDuration>,
    pub initial_backoff: Option<RawDuration>,
    pub max_backoff: Option<RawDuration>,
    pub keep_delivered: Option<RawDuration>,
    pub keep_failed: Option<RawDuration>,
    pub probe_interval: Option<RawDuration>,
    pub on_failure: Option<String>,
    pub sendmail: Option<PathBuf>,
    pub notice_sender: Option<String>,
}

/// A duration written as seconds (`30`) or with a unit (`500ms`, `30s`, `5m`, `2h`, `5d`).
#[derive(Deserialize)]
#[serde(untagged)]
pub enum RawDuration {
    Seconds(i64),
    Text(String),
}

/// Reads the TOML text; a syntax error or an unknown key names its line.
pub fn read(text: &str) -> Result<RawConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        // toml's message names the key and the line; keep it on one line.
        let msg = e.message().trim().to_owned();
        let line = e
            .span()
            .and_then(|s| text.get(..s.start))
            .map(|before| before.lines().count().max(1));
        let key = match e.message().split('`').nth(1) {
            Some(k) if e.message().starts_with("unknown field") => k.to_owned(),
            _ => String::new(),
        };
        ConfigError {
            line,
            ..ConfigError::new(&key, msg)
        }
    })
}
