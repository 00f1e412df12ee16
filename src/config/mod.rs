//! Configuration: `Config` as the daemon uses it, read from the TOML file in
//! layers (`raw` as written, a builder per section, `checks` across
//! sections), with errors that name the file, line and key.

mod checks;
mod delivery;
mod gateway;
mod outbound;
mod params;
mod policy;
mod raw;
pub mod reload;
mod target;
pub mod tokens;

pub use delivery::{DeliveryConfig, JournalConfig, OnFailure};
pub use params::{parse_duration, read_secret, ListenSocket};
pub use policy::SenderPolicy;
pub use target::{TargetConfig, TargetKind};
pub use tokens::{Layout, PoolLimits, TokenMode, TokenStoreConfig, TokensConfig};

use crate::address::GatewayAddresses;
use params::positive;
use std::{
    fmt, fs,
    net::SocketAddr,
    path::{Path, PathBuf},
};

/// Where the packaged configuration lives.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/imip-milter/imip-milter.toml";

/// The configuration shipped with the package, also used by `run` when no
/// configuration file exists at the default path.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../packaging/imip-milter.toml");

/// A configuration error: the key (empty when about the whole file), what is
/// wrong with it, and where; an I/O error reading the file is its source.
#[derive(Debug)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
    pub line: Option<usize>,
    pub file: Option<PathBuf>,
    source: Option<std::io::Error>,
}

impl ConfigError {
    pub(crate) fn new(key: &str, message: impl Into<String>) -> Self {
        Self {
            key: key.to_owned(),
            message: message.into(),
            line: None,
            file: None,
            source: None,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        write!(f, "{}", self.message)?;
        if let Some(line) = self.line {
            write!(f, " at line {line}")?;
        }
        if let (Some(file), None) = (&self.file, &self.source) {
            write!(f, " (in {})", file.display())?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// `mode`: whether decisions are carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    /// Every decision journaled as what it would have been; every message
    /// continues unchanged, nothing is spooled.
    Observe,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Observe => "observe",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: ListenSocket,
    /// `observe`: decide and journal, change nothing.
    pub mode: Mode,
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
    /// The keys as written in the file: what a reload names as changed.
    pub written: toml::Table,
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = fs::read_to_string(path).map_err(|e| ConfigError {
            file: Some(path.to_owned()),
            source: Some(e),
            ..ConfigError::new("", format!("cannot read configuration file {}", path.display()))
        })?;
        Self::parse(&text).map_err(|e| ConfigError {
            file: Some(path.to_owned()),
            ..e
        })
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw = raw::read(text)?;
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
        let log_level = params::log_level(raw.log_level.as_deref())?;
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
        let mode = match raw.mode.as_deref().unwrap_or("enforce") {
            "enforce" => Mode::Enforce,
            "observe" => Mode::Observe,
            other => return Err(ConfigError::new("mode", format!("`{other}` is not enforce or observe"))),
        };
        let config = Self {
            listen,
            mode,
            state_dir,
            max_message_bytes,
            max_sessions,
            max_components,
            max_buffered_bytes,
            log_level,
            log_format,
            metrics_listen,
            gateway: gateway::build(raw.gateway)?,
            target: target::build(raw.target)?,
            delivery: delivery::build(raw.delivery, raw.journal)?,
            tokens: tokens::build(raw.tokens)?,
            policy: policy::build(raw.policy)?,
            outbound: outbound::build(raw.outbound)?,
            max_attendees: positive(
                "max_attendees",
                raw.max_attendees,
                crate::analysis::DEFAULT_MAX_ATTENDEES,
                1_000_000,
            )?,
            user: raw.user.map(|u| u.trim().to_owned()).filter(|u| !u.is_empty()),
            max_gateway_recipients: positive("max_gateway_recipients", raw.max_gateway_recipients, 10, 1000)?,
            written: text.parse().unwrap_or_default(),
        };
        checks::across_sections(&config)?;
        Ok(config)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
                layout: Layout::CalendarServer,
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
}
