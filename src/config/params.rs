//! Value syntaxes shared by the sections: durations, counts, the listen
//! socket, log levels, side files.

use super::{raw::RawDuration, ConfigError};
use std::{fmt, net::SocketAddr, path::Path, path::PathBuf, time::Duration};

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

/// `key` as a duration, `default` when not given.
pub fn duration(key: &str, raw: Option<RawDuration>, default: Duration) -> Result<Duration, ConfigError> {
    match raw {
        None => Ok(default),
        Some(RawDuration::Seconds(n)) if n >= 0 => Ok(Duration::from_secs(n as u64)),
        Some(RawDuration::Seconds(_)) => Err(ConfigError::new(key, "must not be negative")),
        Some(RawDuration::Text(s)) => parse_duration(&s)
            .ok_or_else(|| ConfigError::new(key, format!("`{s}` is not a duration such as 30s, 5m, 2h or 5d"))),
    }
}

/// `30`, `500ms`, `30s`, `5m`, `2h`, `5d`; None when not one of these.
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

/// `key` as a count from 1 to `max`, `default` when not given.
pub fn positive(key: &str, raw: Option<i64>, default: usize, max: usize) -> Result<usize, ConfigError> {
    match raw {
        None => Ok(default),
        Some(n) if n >= 1 && (n as u64) <= max as u64 => Ok(n as usize),
        Some(n) => Err(ConfigError::new(key, format!("{n} is out of range (1 to {max})"))),
    }
}

/// `log_level`: error, warn, info, debug, trace.
pub fn log_level(raw: Option<&str>) -> Result<tracing::Level, ConfigError> {
    Ok(match raw.unwrap_or("info") {
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
    })
}

/// First line of a secret file, which must not be empty.
pub fn read_secret(path: &Path, key: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{key}: cannot read {}: {e}", path.display()))?;
    let line = text.lines().next().unwrap_or("").trim().to_owned();
    if line.is_empty() {
        return Err(format!("{key}: {} is empty", path.display()));
    }
    Ok(line)
}

/// A configuration side file (a map), read whole up to `limit` bytes.
pub fn read_small_file(path: &Path, limit: u64) -> Result<String, String> {
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

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("5d"), Some(Duration::from_secs(432_000)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("12"), Some(Duration::from_secs(12)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration("99999999999999999999d"), None);
        assert!(duration("k", Some(RawDuration::Seconds(-1)), Duration::ZERO).is_err());
        assert_eq!(
            duration("k", None, Duration::from_secs(3)).ok(),
            Some(Duration::from_secs(3))
        );
    }

    #[test]
    fn counts() {
        assert_eq!(positive("k", None, 7, 10).ok(), Some(7));
        assert_eq!(positive("k", Some(10), 7, 10).ok(), Some(10));
        let err = positive("k", Some(11), 7, 10).unwrap_err();
        assert_eq!(err.key, "k");
        assert!(positive("k", Some(0), 7, 10).is_err());
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
