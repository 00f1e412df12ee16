//! `[gateway]`: the base addresses whose plus-addressed recipients carry
//! tokens, and the delimiters.

use super::{raw::RawGateway, ConfigError};
use crate::address::{BaseAddress, GatewayAddresses};

pub fn build(raw: Option<RawGateway>) -> Result<GatewayAddresses, ConfigError> {
    let gateway = raw.ok_or_else(|| ConfigError::new("gateway", "section is missing"))?;
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
    Ok(GatewayAddresses::new(bases, &delimiters))
}
