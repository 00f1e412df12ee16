//! `[outbound]`: which invitations are tokenized and who may have them
//! tokenized.

use super::{params::read_small_file, raw::RawOutbound, ConfigError};
use crate::outbound::Outbound;

pub fn build(raw: Option<RawOutbound>) -> Result<Option<Outbound>, ConfigError> {
    let outbound = match raw {
        Some(o) if o.enabled.unwrap_or(false) => {
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
            Some(Outbound {
                organizer_domains: domains,
                address_patterns: patterns,
                sender_logins,
                trusted_logins,
                trusted_clients,
            })
        }
        _ => None,
    };
    Ok(outbound)
}
