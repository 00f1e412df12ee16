//! Delivery targets, one file per kind.

pub mod caldav;
pub mod calendarserver;
pub mod dav_xml;
pub mod webhook;

use crate::{
    config::{TargetConfig, TargetKind},
    spool::Record,
};

/// The HTTP client every target uses: the configured timeout, no redirects
/// (one would turn a POST into a GET; the target says so instead), and the
/// CAs of `target.ca_file` beside the built-in roots.
pub(crate) fn http_client(config: &TargetConfig) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .timeout(config.timeout)
        .connect_timeout(config.timeout.min(std::time::Duration::from_secs(10)))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("imip-milter/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &config.ca_file {
        let pem = std::fs::read(path).map_err(|e| format!("target.ca_file {}: {e}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("target.ca_file {}: {}", path.display(), crate::errors::chain(&e)))?;
        if certs.is_empty() {
            return Err(format!("target.ca_file {}: no certificate in it", path.display()));
        }
        for c in certs {
            builder = builder.add_root_certificate(c);
        }
    }
    builder
        .build()
        .map_err(|e| format!("target: cannot build HTTP client: {}", crate::errors::chain(&e)))
}

/// An HTTP answer's body, at most `limit` bytes (`target.max_response_bytes`):
/// a server that sends more is not read on. Invalid UTF-8 is replaced.
pub(crate) async fn read_capped(mut resp: reqwest::Response, limit: usize) -> Result<String, ReadError> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(ReadError::TooLarge(limit));
    }
    let mut body: Vec<u8> = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(ReadError::Http)? {
        if body.len() + chunk.len() > limit {
            return Err(ReadError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[derive(Debug)]
pub(crate) enum ReadError {
    TooLarge(usize),
    Http(reqwest::Error),
}

impl ReadError {
    /// A too large answer is kept as failed: trying again gets the same.
    pub(crate) fn outcome(self) -> Outcome {
        match self {
            Self::TooLarge(limit) => Outcome::Permanent(format!(
                "the server's answer is larger than {limit} bytes (target.max_response_bytes)"
            )),
            Self::Http(e) => Outcome::unreachable(&e, ""),
        }
    }
}

/// Whether `url` is on the scheme, host and port of `base`: credentials
/// and requests go nowhere else, whatever hrefs a server sends.
pub(crate) fn same_origin(base: &reqwest::Url, url: &reqwest::Url) -> bool {
    base.scheme() == url.scheme()
        && base.host_str() == url.host_str()
        && base.port_or_known_default() == url.port_or_known_default()
}

/// What one delivery attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The target took the record and applied it.
    Delivered,
    /// The target took the record and rightly changed nothing (a stale or
    /// repeated answer): done, and why.
    Ignored(String),
    /// Try again later (408, 425, 429, 5xx, a server not ready).
    Retry(String),
    /// The target did not answer: no connection, a timeout, a proxy's 502,
    /// 503 or 504. Retried; several in a row take the target as down.
    Unreachable(String),
    /// HTTP 500 with the server's words: tried again, but the same words
    /// `forward::MAX_SAME_SERVER_FAULT` times in a row fail the record.
    ServerFault(String),
    /// The target refused the record for good; kept as failed.
    Permanent(String),
}

impl Outcome {
    /// The words of a failure; "" for a delivery.
    pub fn error(&self) -> Option<&str> {
        match self {
            Self::Delivered | Self::Ignored(_) => None,
            Self::Retry(e) | Self::Unreachable(e) | Self::ServerFault(e) | Self::Permanent(e) => Some(e),
        }
    }

    /// An HTTP status no proxy or server in front of the target would give
    /// while the target itself answers.
    pub fn gateway_status(status: u16) -> bool {
        matches!(status, 502..=504)
    }

    /// A request that got no answer. The outer error says only "error
    /// sending request"; its causes are what an admin acts on (a refused
    /// connection, an unknown CA), so the whole chain is kept. `prefix`
    /// says what was asked of whom, "" where the caller's context does.
    pub(crate) fn unreachable(e: &reqwest::Error, prefix: &str) -> Self {
        if e.is_timeout() {
            Self::Unreachable("timed out".into())
        } else if e.is_connect() && prefix.is_empty() {
            Self::Unreachable(format!("cannot connect: {}", crate::errors::chain(e)))
        } else {
            Self::Unreachable(format!("{prefix}{}", crate::errors::chain(e)))
        }
    }

    /// DESIGN §3, the one place an HTTP status that is no success becomes an
    /// outcome for every target: 408, 425, 429 and 5xx are retried (502-504
    /// as the target unreachable, a 500 with the server's words as a fault
    /// that repeats); anything else is kept as failed. `asked` says what was
    /// asked ("PUT https://…", or "" for the target's one URL), `said` is
    /// the server's own words or "", `credentials` the keys that hold them.
    pub(crate) fn from_status(status: reqwest::StatusCode, asked: &str, said: &str, credentials: &str) -> Self {
        let asked = if asked.is_empty() {
            String::new()
        } else {
            format!("{asked}: ")
        };
        let said = if said.is_empty() {
            String::new()
        } else {
            format!(": {said}")
        };
        let text = format!("{asked}HTTP {status}{said}");
        match status.as_u16() {
            500 if !said.is_empty() => Self::ServerFault(text),
            s if Self::gateway_status(s) => Self::Unreachable(text),
            408 | 425 | 429 | 500..=599 => Self::Retry(text),
            300..=399 => Self::Permanent(format!("{text}: redirects are not followed; fix target.url")),
            401 => Self::Permanent(format!("{text}: credentials refused ({credentials})")),
            403 => Self::Permanent(format!(
                "{text}: credentials refused, or without the rights for this on the server ({credentials})"
            )),
            _ => Self::Permanent(text),
        }
    }
}

/// The configured target.
pub enum Target {
    Webhook(webhook::Webhook),
    CalendarServer(calendarserver::CalendarServer),
    CalDav(Box<caldav::CalDav>),
}

impl Target {
    /// Builds the target; reads secrets from their files.
    pub fn new(config: &TargetConfig) -> Result<Self, String> {
        match config.kind {
            TargetKind::Webhook => webhook::Webhook::new(config).map(Self::Webhook),
            TargetKind::CalendarServer => calendarserver::CalendarServer::new(config).map(Self::CalendarServer),
            TargetKind::CalDav => caldav::CalDav::new(config).map(|c| Self::CalDav(Box::new(c))),
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
    pub async fn check(&self) -> crate::findings::Finding {
        match self {
            Self::Webhook(w) => w.check().await,
            Self::CalendarServer(c) => c.check().await,
            Self::CalDav(c) => c.check().await,
        }
    }
}
