//! `[target]`: where replies go, how to authenticate there, and the bounds
//! on what the target answers.

use super::{
    params::{duration, positive},
    raw::RawTarget,
    ConfigError,
};
use std::{path::PathBuf, time::Duration};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    Webhook,
    /// CalendarServer's legacy iMIP injection: POST {url}/inbox/.
    CalendarServer,
    /// Apply replies to the organizer's event on a CalDAV server.
    CalDav,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetConfig {
    pub kind: TargetKind,
    pub url: String,
    pub timeout: Duration,
    /// File holding a bearer token (first line).
    pub token_file: Option<PathBuf>,
    /// User name for HTTP basic authentication; the password comes from `password_file`.
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// calendarserver: file holding the shared secret sent in `secret_header`.
    pub secret_file: Option<PathBuf>,
    pub secret_header: String,
    /// caldav: the organizer's calendar home; {base}, {user}, {domain},
    /// {address}. None: found on the server (RFC 3744, 4791, 5397, 6638).
    pub calendar_home: Option<String>,
    /// caldav: add a reply from someone not invited (else refuse it).
    pub party_crashers_record: bool,
    /// The largest HTTP answer body read from the target.
    pub max_response_bytes: usize,
    /// caldav: overrides one reply may create in the organizer's event.
    pub max_new_overrides: usize,
    /// PEM file of CA certificates trusted beside the built-in roots.
    pub ca_file: Option<PathBuf>,
}

pub fn build(raw: Option<RawTarget>) -> Result<TargetConfig, ConfigError> {
    let target = raw.ok_or_else(|| ConfigError::new("target", "section is missing"))?;
    let kind = match target.kind.as_deref().unwrap_or("webhook") {
        "webhook" => TargetKind::Webhook,
        "calendarserver" => TargetKind::CalendarServer,
        "caldav" => TargetKind::CalDav,
        other => {
            return Err(ConfigError::new(
                "target.kind",
                format!("`{other}` is not one of webhook, calendarserver, caldav"),
            ))
        }
    };
    let url = target.url.ok_or_else(|| ConfigError::new("target.url", "is missing"))?;
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(ConfigError::new(
            "target.url",
            format!("`{url}` is not an http:// or https:// URL"),
        ));
    }
    if target.password_file.is_some() != target.username.is_some() {
        return Err(ConfigError::new(
            "target.password_file",
            "basic authentication needs both target.username and target.password_file",
        ));
    }
    if target.token_file.is_some() && target.username.is_some() {
        return Err(ConfigError::new(
            "target.token_file",
            "choose either a bearer token (token_file) or basic authentication (username, password_file)",
        ));
    }
    let target = TargetConfig {
        kind,
        url,
        timeout: duration("target.timeout", target.timeout, Duration::from_secs(30))?,
        token_file: target.token_file,
        username: target.username,
        password_file: target.password_file,
        secret_file: target.secret_file,
        secret_header: target
            .secret_header
            .unwrap_or_else(|| "x-calendarserver-internal".to_owned()),
        calendar_home: target.calendar_home.filter(|h| !h.trim().is_empty()),
        max_response_bytes: positive("target.max_response_bytes", target.max_response_bytes, 4 << 20, 1 << 30)?,
        max_new_overrides: positive(
            "target.max_new_overrides",
            target.max_new_overrides,
            crate::schedule::DEFAULT_MAX_NEW_OVERRIDES,
            100_000,
        )?,
        ca_file: target.ca_file,
        party_crashers_record: match target.party_crashers.as_deref().unwrap_or("refuse") {
            "refuse" => false,
            "record" => true,
            other => {
                return Err(ConfigError::new(
                    "target.party_crashers",
                    format!("`{other}` is not refuse or record"),
                ))
            }
        },
    };
    if target.secret_file.is_some() && target.kind != TargetKind::CalendarServer {
        return Err(ConfigError::new(
            "target.secret_file",
            "is for kind = \"calendarserver\"",
        ));
    }
    if target.secret_file.is_some() && (target.username.is_some() || target.token_file.is_some()) {
        return Err(ConfigError::new(
            "target.secret_file",
            "choose either the shared secret or username and password_file",
        ));
    }
    if target.timeout.is_zero() {
        return Err(ConfigError::new("target.timeout", "must be longer than zero"));
    }
    Ok(target)
}
