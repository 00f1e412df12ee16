//! Configuration: the TOML schema, its defaults, and validation errors that
//! name the offending key.

use crate::address::{BaseAddress, GatewayAddresses};
use serde::Deserialize;
use std::{
    fmt, fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

/// Where the packaged configuration lives.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/imip-milter/imip-milter.toml";

/// The configuration shipped with the package, also used by `run` when no
/// configuration file exists at the default path.
pub const EMBEDDED_DEFAULT: &str = include_str!("../packaging/imip-milter.toml");

/// A configuration error; always names the key (or the file) it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    fn new(key: &str, message: impl Into<String>) -> Self {
        Self {
            key: key.to_owned(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// The milter socket, in Postfix notation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenSocket {
    Inet(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for ListenSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Inet(addr) => write!(f, "inet:{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl ListenSocket {
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("inet:") {
            // Accept the sendmail form PORT@HOST as well as HOST:PORT.
            let hostport = match rest.split_once('@') {
                Some((port, host)) => format!("{host}:{port}"),
                None => rest.to_owned(),
            };
            let hostport = hostport.replace("localhost:", "127.0.0.1:");
            hostport
                .parse::<SocketAddr>()
                .map(Self::Inet)
                .map_err(|_| format!("`{s}` is not inet:ADDRESS:PORT (an IP address and a port)"))
        } else if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            Ok(Self::Unix(PathBuf::from(path)))
        } else {
            Err(format!("`{s}` must start with inet: or unix:"))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    Webhook,
    /// CalendarServer's legacy iMIP injection: POST {url}/inbox/.
    CalendarServer,
    /// Apply replies to the organizer's event on a CalDAV server.
    CalDav,
}

#[derive(Debug, Clone)]
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

#[derive(Debug, Clone)]
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
}

/// `[journal]`: how much of what happened `imip-milter journal` can show.
#[derive(Debug, Clone)]
pub struct JournalConfig {
    pub keep: Duration,
    pub max_events: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenMode {
    /// Tokens belong to the calendar server and travel in the webhook JSON.
    Remote,
    /// imip-milter owns the tokens (see `tokens`).
    Local,
}

#[derive(Debug, Clone)]
pub struct TokensConfig {
    pub mode: TokenMode,
    pub days_to_live: u32,
    /// More unknown tokens than this from one client address within
    /// `unknown_window` get 450 4.7.1.
    pub max_unknown: usize,
    pub unknown_window: Duration,
    /// Token lookups one client may have in flight at once.
    pub max_lookups_per_client: usize,
    /// How long an unknown token is remembered as unknown; zero: not at all.
    pub remember_unknown: Duration,
    /// Where local tokens live: this host's spool, or a database all hosts share.
    pub store: TokenStoreConfig,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenStoreConfig {
    Redb,
    Postgres {
        /// `postgresql://user@host:port/db`, no password.
        url: String,
        password_file: Option<PathBuf>,
        layout: crate::tokens::Layout,
        pool: crate::tokens::PoolLimits,
    },
}

/// Who may answer for a token (`[policy] sender`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderPolicy {
    /// The token alone.
    Token,
    /// The header From must be the token's attendee (local tokens).
    Attendee,
    /// DMARC pass for the header From domain, in an Authentication-Results
    /// header added by this trusted authserv-id.
    Dmarc { authserv_id: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: ListenSocket,
    pub state_dir: PathBuf,
    pub max_message_bytes: usize,
    pub max_sessions: usize,
    /// Scheduling components one calendar reply may hold.
    pub max_components: usize,
    /// ATTENDEEs one component of a calendar reply may list.
    pub max_attendees: usize,
    /// Message bytes all sessions together may buffer.
    pub max_buffered_bytes: usize,
    /// Started as root, run as this user (default: the owner of state_dir).
    pub user: Option<String>,
    /// Gateway recipients one message may have.
    pub max_gateway_recipients: usize,
    pub log_level: tracing::Level,
    pub log_format: LogFormat,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    pub gateway: GatewayAddresses,
    pub target: TargetConfig,
    pub delivery: DeliveryConfig,
    pub tokens: TokensConfig,
    pub policy: SenderPolicy,
    /// Outbound tokenization, when enabled.
    pub outbound: Option<crate::outbound::Outbound>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    state_dir: Option<PathBuf>,
    max_message_bytes: Option<i64>,
    max_sessions: Option<i64>,
    max_components: Option<i64>,
    max_attendees: Option<i64>,
    max_buffered_bytes: Option<i64>,
    user: Option<String>,
    max_gateway_recipients: Option<i64>,
    log_level: Option<String>,
    log_format: Option<String>,
    gateway: Option<RawGateway>,
    target: Option<RawTarget>,
    delivery: Option<RawDelivery>,
    journal: Option<RawJournal>,
    metrics: Option<RawMetrics>,
    tokens: Option<RawTokens>,
    policy: Option<RawPolicy>,
    outbound: Option<RawOutbound>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutbound {
    enabled: Option<bool>,
    organizer_domains: Option<Vec<String>>,
    address_patterns: Option<Vec<String>>,
    sender_login_maps: Option<PathBuf>,
    trusted_logins: Option<Vec<String>>,
    trusted_clients: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    sender: Option<String>,
    authserv_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokens {
    mode: Option<String>,
    days_to_live: Option<i64>,
    max_unknown: Option<i64>,
    unknown_window: Option<RawDuration>,
    max_lookups_per_client: Option<i64>,
    remember_unknown: Option<RawDuration>,
    store: Option<String>,
    pool_size: Option<i64>,
    pool_wait: Option<RawDuration>,
    url: Option<String>,
    password_file: Option<PathBuf>,
    layout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    addresses: Option<Vec<String>>,
    delimiters: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    kind: Option<String>,
    url: Option<String>,
    timeout: Option<RawDuration>,
    token_file: Option<PathBuf>,
    username: Option<String>,
    password_file: Option<PathBuf>,
    secret_file: Option<PathBuf>,
    secret_header: Option<String>,
    calendar_home: Option<String>,
    party_crashers: Option<String>,
    max_response_bytes: Option<i64>,
    max_new_overrides: Option<i64>,
    ca_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJournal {
    keep: Option<RawDuration>,
    max_events: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDelivery {
    concurrency: Option<i64>,
    max_age: Option<RawDuration>,
    initial_backoff: Option<RawDuration>,
    max_backoff: Option<RawDuration>,
    keep_delivered: Option<RawDuration>,
    keep_failed: Option<RawDuration>,
    probe_interval: Option<RawDuration>,
}

/// A duration written as seconds (`30`) or with a unit (`500ms`, `30s`, `5m`, `2h`, `5d`).
#[derive(Deserialize)]
#[serde(untagged)]
enum RawDuration {
    Seconds(i64),
    Text(String),
}

fn duration(key: &str, raw: Option<RawDuration>, default: Duration) -> Result<Duration, ConfigError> {
    match raw {
        None => Ok(default),
        Some(RawDuration::Seconds(n)) if n >= 0 => Ok(Duration::from_secs(n as u64)),
        Some(RawDuration::Seconds(_)) => Err(ConfigError::new(key, "must not be negative")),
        Some(RawDuration::Text(s)) => parse_duration(&s)
            .ok_or_else(|| ConfigError::new(key, format!("`{s}` is not a duration such as 30s, 5m, 2h or 5d"))),
    }
}

pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let ms = match unit.trim() {
        "ms" => n,
        "" | "s" => n.checked_mul(1000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        "d" => n.checked_mul(86_400_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

fn positive(key: &str, raw: Option<i64>, default: usize, max: usize) -> Result<usize, ConfigError> {
    match raw {
        None => Ok(default),
        Some(n) if n >= 1 && (n as u64) <= max as u64 => Ok(n as usize),
        Some(n) => Err(ConfigError::new(key, format!("{n} is out of range (1 to {max})"))),
    }
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = fs::read_to_string(path)
            .map_err(|e| ConfigError::new("", format!("cannot read configuration file {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|mut e| {
            e.message = format!("{} (in {})", e.message, path.display());
            e
        })
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            // toml's message names the key and the line; keep it on one line.
            let msg = e.message().trim().to_owned();
            let line = e.span().map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            let key = match e.message().split('`').nth(1) {
                Some(k) if e.message().starts_with("unknown field") => k.to_owned(),
                _ => String::new(),
            };
            let msg = match line {
                Some(l) => format!("{msg} at line {l}"),
                None => msg,
            };
            ConfigError::new(&key, msg)
        })?;

        let listen = ListenSocket::parse(raw.listen.as_deref().unwrap_or("inet:127.0.0.1:8895"))
            .map_err(|m| ConfigError::new("listen", m))?;
        let state_dir = raw.state_dir.unwrap_or_else(|| PathBuf::from("/var/lib/imip-milter"));
        if !state_dir.is_absolute() {
            return Err(ConfigError::new("state_dir", "must be an absolute path"));
        }
        let max_message_bytes = positive("max_message_bytes", raw.max_message_bytes, 10 * 1024 * 1024, 1 << 30)?;
        let max_sessions = positive("max_sessions", raw.max_sessions, 100, 10_000)?;
        let max_components = positive(
            "max_components",
            raw.max_components,
            crate::analysis::DEFAULT_MAX_COMPONENTS,
            1_000_000,
        )?;
        let max_buffered_bytes = positive("max_buffered_bytes", raw.max_buffered_bytes, 128 << 20, 1 << 40)?;
        if max_buffered_bytes < max_message_bytes {
            return Err(ConfigError::new(
                "max_buffered_bytes",
                "must not be smaller than max_message_bytes",
            ));
        }
        let log_level = match raw.log_level.as_deref().unwrap_or("info") {
            "error" => tracing::Level::ERROR,
            "warn" => tracing::Level::WARN,
            "info" => tracing::Level::INFO,
            "debug" => tracing::Level::DEBUG,
            "trace" => tracing::Level::TRACE,
            other => {
                return Err(ConfigError::new(
                    "log_level",
                    format!("`{other}` is not one of error, warn, info, debug, trace"),
                ))
            }
        };

        let log_format = match raw.log_format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(ConfigError::new("log_format", format!("`{other}` is not text or json"))),
        };
        let metrics_listen = match raw.metrics.and_then(|m| m.listen) {
            None => None,
            Some(l) => Some(
                l.replace("localhost:", "127.0.0.1:")
                    .parse::<SocketAddr>()
                    .map_err(|_| ConfigError::new("metrics.listen", format!("`{l}` is not ADDRESS:PORT")))?,
            ),
        };

        let gateway = raw
            .gateway
            .ok_or_else(|| ConfigError::new("gateway", "section is missing"))?;
        let addresses = gateway
            .addresses
            .ok_or_else(|| ConfigError::new("gateway.addresses", "is missing"))?;
        if addresses.is_empty() {
            return Err(ConfigError::new("gateway.addresses", "needs at least one address"));
        }
        let delimiters = gateway.delimiters.unwrap_or_else(|| "+".to_owned());
        if delimiters.is_empty() {
            return Err(ConfigError::new("gateway.delimiters", "needs at least one character"));
        }
        if let Some(c) = delimiters
            .chars()
            .find(|c| c.is_ascii_alphanumeric() || *c == '@' || !c.is_ascii_graphic())
        {
            return Err(ConfigError::new(
                "gateway.delimiters",
                format!("`{c}` cannot be a delimiter"),
            ));
        }
        let mut bases = Vec::new();
        for a in &addresses {
            let base = BaseAddress::parse(a).map_err(|m| ConfigError::new("gateway.addresses", m))?;
            if base.local.chars().any(|c| delimiters.contains(c)) {
                return Err(ConfigError::new(
                    "gateway.addresses",
                    format!("`{a}` contains a delimiter character; give the base address without token"),
                ));
            }
            bases.push(base);
        }
        let gateway = GatewayAddresses::new(bases, &delimiters);

        let target = raw
            .target
            .ok_or_else(|| ConfigError::new("target", "section is missing"))?;
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

        let d = raw.delivery.unwrap_or(RawDelivery {
            concurrency: None,
            max_age: None,
            initial_backoff: None,
            max_backoff: None,
            keep_delivered: None,
            keep_failed: None,
            probe_interval: None,
        });
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
            journal: {
                let j = raw.journal.unwrap_or(RawJournal {
                    keep: None,
                    max_events: None,
                });
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

        let t = raw.tokens.unwrap_or(RawTokens {
            mode: None,
            days_to_live: None,
            max_unknown: None,
            unknown_window: None,
            max_lookups_per_client: None,
            remember_unknown: None,
            store: None,
            pool_size: None,
            pool_wait: None,
            url: None,
            password_file: None,
            layout: None,
        });
        let tokens = TokensConfig {
            mode: match t.mode.as_deref().unwrap_or("remote") {
                "remote" => TokenMode::Remote,
                "local" => TokenMode::Local,
                other => {
                    return Err(ConfigError::new(
                        "tokens.mode",
                        format!("`{other}` is not remote or local"),
                    ))
                }
            },
            days_to_live: positive("tokens.days_to_live", t.days_to_live, 90, 36_500)? as u32,
            max_unknown: positive("tokens.max_unknown", t.max_unknown, 10, 1_000_000)?,
            unknown_window: duration("tokens.unknown_window", t.unknown_window, Duration::from_secs(600))?,
            max_lookups_per_client: positive("tokens.max_lookups_per_client", t.max_lookups_per_client, 4, 1000)?,
            remember_unknown: duration("tokens.remember_unknown", t.remember_unknown, Duration::from_secs(60))?,
            store: match t.store.as_deref().unwrap_or("redb") {
                "redb" => {
                    for (key, set) in [
                        ("tokens.url", t.url.is_some()),
                        ("tokens.password_file", t.password_file.is_some()),
                        ("tokens.layout", t.layout.is_some()),
                        ("tokens.pool_size", t.pool_size.is_some()),
                        ("tokens.pool_wait", t.pool_wait.is_some()),
                    ] {
                        if set {
                            return Err(ConfigError::new(key, "is for store = \"postgres\""));
                        }
                    }
                    TokenStoreConfig::Redb
                }
                "postgres" => {
                    let url = t
                        .url
                        .filter(|u| !u.trim().is_empty())
                        .ok_or_else(|| ConfigError::new("tokens.url", "store = \"postgres\" needs the database URL"))?;
                    if !(url.starts_with("postgresql://") || url.starts_with("postgres://")) {
                        return Err(ConfigError::new("tokens.url", "must start with postgresql://"));
                    }
                    if url
                        .split_once("://")
                        .map(|(_, r)| r.split('?').next().unwrap_or(r))
                        .and_then(|r| r.split_once('@'))
                        .is_some_and(|(userinfo, _)| userinfo.contains(':'))
                    {
                        return Err(ConfigError::new(
                            "tokens.url",
                            "no password in the URL: put it in tokens.password_file",
                        ));
                    }
                    crate::tokens::check_url(&url).map_err(|e| ConfigError::new("tokens.url", e))?;
                    let layout = match t.layout.as_deref().unwrap_or("own") {
                        "own" => crate::tokens::Layout::Own,
                        "calendarserver" => crate::tokens::Layout::CalendarServer,
                        other => {
                            return Err(ConfigError::new(
                                "tokens.layout",
                                format!("`{other}` is not own or calendarserver"),
                            ))
                        }
                    };
                    let pool = crate::tokens::PoolLimits {
                        size: positive("tokens.pool_size", t.pool_size, 4, 100)?,
                        wait: duration("tokens.pool_wait", t.pool_wait, Duration::from_secs(1))?,
                    };
                    if pool.wait.is_zero() {
                        return Err(ConfigError::new("tokens.pool_wait", "must be longer than zero"));
                    }
                    TokenStoreConfig::Postgres {
                        url,
                        password_file: t.password_file,
                        layout,
                        pool,
                    }
                }
                other => {
                    return Err(ConfigError::new(
                        "tokens.store",
                        format!("`{other}` is not redb or postgres"),
                    ))
                }
            },
        };

        let policy = match raw.policy {
            None => SenderPolicy::Token,
            Some(p) => match (p.sender.as_deref().unwrap_or("token"), p.authserv_id) {
                ("token", _) => SenderPolicy::Token,
                ("attendee", _) if tokens.mode != TokenMode::Local => {
                    return Err(ConfigError::new(
                        "policy.sender",
                        "attendee needs tokens.mode = \"local\": only local tokens know the attendee",
                    ))
                }
                ("attendee", _) => SenderPolicy::Attendee,
                ("dmarc", Some(id)) if !id.trim().is_empty() => SenderPolicy::Dmarc {
                    authserv_id: id.trim().to_ascii_lowercase(),
                },
                ("dmarc", _) => {
                    return Err(ConfigError::new(
                        "policy.authserv_id",
                        "sender = \"dmarc\" needs the authserv-id of your OpenDMARC or rspamd",
                    ))
                }
                (other, _) => {
                    return Err(ConfigError::new(
                        "policy.sender",
                        format!("`{other}` is not token, attendee or dmarc"),
                    ))
                }
            },
        };
        let outbound = match raw.outbound {
            Some(o) if o.enabled.unwrap_or(false) => {
                if tokens.mode != TokenMode::Local {
                    return Err(ConfigError::new(
                        "outbound.enabled",
                        "outbound tokenization needs tokens.mode = \"local\"",
                    ));
                }
                let domains: Vec<String> = o
                    .organizer_domains
                    .unwrap_or_default()
                    .into_iter()
                    .map(|d| d.trim().to_ascii_lowercase())
                    .filter(|d| !d.is_empty())
                    .collect();
                if domains.is_empty() {
                    return Err(ConfigError::new(
                        "outbound.organizer_domains",
                        "needs at least one domain",
                    ));
                }
                let mut patterns = Vec::new();
                for p in o.address_patterns.unwrap_or_else(|| vec!["^mailto:".to_owned()]) {
                    let re = regex::Regex::new(&p)
                        .map_err(|e| ConfigError::new("outbound.address_patterns", format!("`{p}`: {e}")))?;
                    patterns.push(re);
                }
                let sender_logins = match &o.sender_login_maps {
                    None => Default::default(),
                    Some(path) => {
                        let text = read_small_file(path, 1 << 20).map_err(|e| {
                            ConfigError::new("outbound.sender_login_maps", format!("{}: {e}", path.display()))
                        })?;
                        crate::outbound::parse_login_map(&text).map_err(|e| {
                            ConfigError::new("outbound.sender_login_maps", format!("{}: {e}", path.display()))
                        })?
                    }
                };
                let trusted_logins = o
                    .trusted_logins
                    .unwrap_or_default()
                    .into_iter()
                    .map(|l| l.trim().to_ascii_lowercase())
                    .filter(|l| !l.is_empty())
                    .collect();
                let mut trusted_clients = Vec::new();
                for c in o.trusted_clients.unwrap_or_default() {
                    trusted_clients.push(c.parse().map_err(|e| ConfigError::new("outbound.trusted_clients", e))?);
                }
                Some(crate::outbound::Outbound {
                    organizer_domains: domains,
                    address_patterns: patterns,
                    sender_logins,
                    trusted_logins,
                    trusted_clients,
                })
            }
            _ => None,
        };
        if target.kind == TargetKind::CalDav && tokens.mode != TokenMode::Local {
            return Err(ConfigError::new(
                "tokens.mode",
                "target kind caldav needs mode = \"local\": the organizer's calendar is found from the token",
            ));
        }
        if target.kind == TargetKind::CalendarServer && tokens.mode != TokenMode::Local {
            return Err(ConfigError::new(
                "tokens.mode",
                "target kind calendarserver needs mode = \"local\": the injection names the organizer, which only local tokens know",
            ));
        }

        Ok(Self {
            listen,
            state_dir,
            max_message_bytes,
            max_sessions,
            max_components,
            max_attendees: positive(
                "max_attendees",
                raw.max_attendees,
                crate::analysis::DEFAULT_MAX_ATTENDEES,
                1_000_000,
            )?,
            max_buffered_bytes,
            user: raw.user.map(|u| u.trim().to_owned()).filter(|u| !u.is_empty()),
            max_gateway_recipients: positive("max_gateway_recipients", raw.max_gateway_recipients, 10, 1000)?,
            log_level,
            log_format,
            metrics_listen,
            gateway,
            target,
            delivery,
            tokens,
            policy,
            outbound,
        })
    }

    /// Path of the spool database.
    pub fn spool_path(&self) -> PathBuf {
        self.state_dir.join("spool.redb")
    }

    /// Path of the control socket the CLI uses to reach the daemon.
    pub fn control_path(&self) -> PathBuf {
        self.state_dir.join("control.sock")
    }
}

/// A configuration side file (a map), read whole up to `limit` bytes.
fn read_small_file(path: &std::path::Path, limit: u64) -> Result<String, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut text = String::new();
    file.take(limit + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > limit {
        return Err(format!("larger than {limit} bytes"));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[gateway]
addresses = ["calendar@example.org"]
[target]
url = "http://127.0.0.1:9000/imip"
"#;

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::parse(EMBEDDED_DEFAULT).unwrap();
        assert_eq!(c.listen, ListenSocket::Inet("127.0.0.1:8895".parse().unwrap()));
        assert_eq!(c.max_message_bytes, 10_485_760);
    }

    #[test]
    fn defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/imip-milter"));
        assert_eq!(c.delivery.max_age, Duration::from_secs(5 * 86400));
        assert_eq!(c.delivery.initial_backoff, Duration::from_secs(1));
        assert_eq!(c.delivery.max_backoff, Duration::from_secs(300));
        assert_eq!(c.target.kind, TargetKind::Webhook);
    }

    #[test]
    fn several_addresses_and_delimiters() {
        let c = Config::parse(
            r#"
[gateway]
addresses = ["calendar@example.org", "Replies@Example.NET"]
delimiters = "+-"
[target]
url = "http://x/"
"#,
        )
        .unwrap();
        assert_eq!(c.gateway.bases().len(), 2);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("listen = \"tcp:1\"\n", "listen"),
            ("max_message_bytes = 0\n", "max_message_bytes"),
            ("state_dir = \"relative\"\n", "state_dir"),
            ("log_level = \"loud\"\n", "log_level"),
            ("bogus = 1\n", "bogus"),
        ];
        for (prefix, key) in cases {
            let err = Config::parse(&format!("{prefix}{MINIMAL}")).unwrap_err();
            assert_eq!(err.key, key, "{err}");
            assert!(err.to_string().starts_with(key), "{err}");
        }
        let err = Config::parse("[gateway]\naddresses = []\n[target]\nurl=\"http://x\"\n").unwrap_err();
        assert_eq!(err.key, "gateway.addresses");
        let err = Config::parse("[gateway]\naddresses = [\"nodomain\"]\n[target]\nurl=\"http://x\"\n").unwrap_err();
        assert_eq!(err.key, "gateway.addresses");
        let err = Config::parse("[gateway]\naddresses = [\"a@b\"]\n[target]\nurl=\"ftp://x\"\n").unwrap_err();
        assert_eq!(err.key, "target.url");
        let err =
            Config::parse("[gateway]\naddresses = [\"a@b\"]\n[target]\nurl=\"http://x\"\nkind=\"smtp\"\n").unwrap_err();
        assert_eq!(err.key, "target.kind");
        let err = Config::parse(&format!("{MINIMAL}[delivery]\nmax_age = \"soon\"\n")).unwrap_err();
        assert_eq!(err.key, "delivery.max_age");
        let err = Config::parse(&format!("{MINIMAL}username = \"u\"\n")).unwrap_err();
        assert_eq!(err.key, "target.password_file");
    }

    #[test]
    fn token_database_keys() {
        let tokens = |body: &str| Config::parse(&format!("{MINIMAL}\n[tokens]\nmode = \"local\"\n{body}"));
        let c = tokens("store = \"postgres\"\nurl = \"postgresql://cs@db/caldav?sslmode=verify-full\"\nlayout = \"calendarserver\"\n")
            .unwrap();
        assert!(matches!(
            c.tokens.store,
            TokenStoreConfig::Postgres {
                layout: crate::tokens::Layout::CalendarServer,
                ..
            }
        ));
        for (body, key, why) in [
            ("store = \"postgres\"\n", "tokens.url", "needs the database URL"),
            (
                "store = \"postgres\"\nurl = \"postgresql://u:pw@db/x\"\n",
                "tokens.url",
                "no password",
            ),
            (
                "store = \"postgres\"\nurl = \"postgresql://u@db/x?sslmode=maybe\"\n",
                "tokens.url",
                "sslmode",
            ),
            (
                "store = \"postgres\"\nurl = \"postgresql://u@db/x\"\nlayout = \"x\"\n",
                "tokens.layout",
                "not own",
            ),
            ("layout = \"calendarserver\"\n", "tokens.layout", "store = \"postgres\""),
            ("url = \"postgresql://u@db/x\"\n", "tokens.url", "store = \"postgres\""),
            ("store = \"mysql\"\n", "tokens.store", "not redb or postgres"),
            ("pool_size = 8\n", "tokens.pool_size", "store = \"postgres\""),
            (
                "store = \"postgres\"\nurl = \"postgresql://u@db/x\"\npool_size = 0\n",
                "tokens.pool_size",
                "out of range",
            ),
            (
                "store = \"postgres\"\nurl = \"postgresql://u@db/x\"\npool_wait = \"0s\"\n",
                "tokens.pool_wait",
                "longer than zero",
            ),
            (
                "max_lookups_per_client = 0\n",
                "tokens.max_lookups_per_client",
                "out of range",
            ),
            (
                "remember_unknown = \"soon\"\n",
                "tokens.remember_unknown",
                "not a duration",
            ),
        ] {
            let err = tokens(body).unwrap_err();
            assert_eq!(err.key, key, "{body}: {err}");
            assert!(err.to_string().contains(why), "{body}: {err}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("5d"), Some(Duration::from_secs(432_000)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("12"), Some(Duration::from_secs(12)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration("99999999999999999999d"), None);
    }

    #[test]
    fn listen_forms() {
        assert_eq!(
            ListenSocket::parse("inet:8895@127.0.0.1").unwrap(),
            ListenSocket::Inet("127.0.0.1:8895".parse().unwrap())
        );
        assert_eq!(
            ListenSocket::parse("unix:/var/spool/postfix/imip/milter.sock").unwrap(),
            ListenSocket::Unix("/var/spool/postfix/imip/milter.sock".into())
        );
        assert!(ListenSocket::parse("inet:nohost").is_err());
    }
}
