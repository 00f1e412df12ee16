//! `[tokens]`: who owns the tokens, where local ones are stored, and the
//! database URL (its TLS parameters read as libpq reads them).

use super::{
    params::{duration, positive},
    raw::RawTokens,
    ConfigError,
};
use std::{path::PathBuf, time::Duration};

/// Who owns the tokens (`tokens.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenMode {
    /// Tokens belong to the calendar server and travel in the webhook JSON.
    Remote,
    /// imip-milter owns the tokens (see `tokens`).
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq)]
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
        layout: Layout,
        pool: PoolLimits,
    },
}

/// Whose tables hold the tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// imip_milter_tokens, created and versioned by this program.
    Own,
    /// CalendarServer's IMIP_TOKENS, in its database; never created here.
    CalendarServer,
}

/// `tokens.pool_size` and `tokens.pool_wait`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolLimits {
    /// Connections open at most.
    pub size: usize,
    /// Waiting for a connection at most, apart from the statement timeout:
    /// while a slow database keeps every connection busy, a lookup gives up
    /// early (451) instead of spending the whole statement time in the queue.
    pub wait: Duration,
}

impl Default for PoolLimits {
    fn default() -> Self {
        Self {
            size: 4,
            wait: Duration::from_secs(1),
        }
    }
}

pub fn build(t: Option<RawTokens>) -> Result<TokensConfig, ConfigError> {
    let t = t.unwrap_or_default();
    Ok(TokensConfig {
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
                check_url(&url).map_err(|e| ConfigError::new("tokens.url", e))?;
                let layout = match t.layout.as_deref().unwrap_or("own") {
                    "own" => Layout::Own,
                    "calendarserver" => Layout::CalendarServer,
                    other => {
                        return Err(ConfigError::new(
                            "tokens.layout",
                            format!("`{other}` is not own or calendarserver"),
                        ))
                    }
                };
                let pool = PoolLimits {
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
    })
}

/// Whether tokio-postgres takes the URL (after its TLS parameters).
fn check_url(url: &str) -> Result<(), String> {
    let asked = read_url(url)?;
    asked
        .url
        .parse::<tokio_postgres::Config>()
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// What the URL asked for, read before tokio-postgres sees it (it knows
/// neither `verify-full` nor `sslrootcert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlTls {
    /// The URL as tokio-postgres takes it.
    pub url: String,
    /// TLS wanted (any sslmode from `require` up).
    pub tls: bool,
    pub root_cert: Option<String>,
}

/// Splits the TLS parameters off a `postgresql://` URL. `prefer`, `allow`
/// and `disable` (and none) mean plain TCP: TLS is used when asked for, and
/// then never without a verified certificate.
pub fn read_url(url: &str) -> Result<UrlTls, String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok(UrlTls {
            url: url.to_owned(),
            tls: false,
            root_cert: None,
        });
    };
    let mut kept = Vec::new();
    let (mut mode, mut root_cert, mut system_roots) = (None, None, false);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        // tokio-postgres decodes keys too: `ssl%6Dode` must not slip past.
        match percent_decode(key)?.as_str() {
            "sslmode" => {
                mode = Some(match percent_decode(value)?.as_str() {
                    "disable" | "allow" | "prefer" => false,
                    "require" | "verify-ca" | "verify-full" => true,
                    other => {
                        return Err(format!(
                            "sslmode `{other}` is not disable, prefer, require or verify-full"
                        ))
                    }
                })
            }
            // libpq's `system`: the trusted roots, and TLS then required.
            "sslrootcert" if value == "system" => system_roots = true,
            "sslrootcert" if !value.is_empty() => root_cert = Some(percent_decode(value)?),
            "sslrootcert" => return Err("sslrootcert needs a file".into()),
            "password" | "passfile" => return Err("no password in the URL: put it in tokens.password_file".into()),
            k @ ("sslcert" | "sslkey" | "sslpassword" | "sslcrl" | "options") => {
                return Err(format!("{k} is not supported"))
            }
            _ => kept.push(pair),
        }
    }
    // A CA named (or libpq's `system`) without a mode asks for TLS.
    let tls = mode.unwrap_or(root_cert.is_some() || system_roots);
    kept.push(if tls { "sslmode=require" } else { "sslmode=disable" });
    Ok(UrlTls {
        url: format!("{base}?{}", kept.join("&")),
        tls,
        root_cert,
    })
}

fn percent_decode(s: &str) -> Result<String, String> {
    crate::address::percent_decode(s, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_read_off_the_url() {
        let plain = read_url("postgresql://imip@db/imip").unwrap();
        assert!(!plain.tls && plain.url == "postgresql://imip@db/imip");
        let t = read_url("postgresql://imip@db/imip?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=5")
            .unwrap();
        assert!(t.tls);
        assert_eq!(t.root_cert.as_deref(), Some("/etc/ca.pem"));
        assert_eq!(t.url, "postgresql://imip@db/imip?connect_timeout=5&sslmode=require");
        assert!(!read_url("postgresql://db/x?sslmode=prefer").unwrap().tls);
        assert!(read_url("postgresql://db/x?sslmode=bogus").is_err());
        assert!(read_url("postgresql://db/x?sslcert=/c.pem").is_err());
        assert!(read_url("postgresql://db/x?sslrootcert=%zz").is_err());
        // Encoded keys are keys all the same.
        let sneaky = read_url("postgresql://db/x?ssl%6Dode=require").unwrap();
        assert!(sneaky.tls && sneaky.url == "postgresql://db/x?sslmode=require");
        assert!(read_url("postgresql://db/x?sslmode=disable&pass%77ord=x").is_err());
        assert!(read_url("postgresql://db/x?password=x").is_err());
        let system = read_url("postgresql://db/x?sslrootcert=system").unwrap();
        assert!(system.tls && system.root_cert.is_none());
    }
}
