//! `[policy]`: who may answer for a token.

use super::{raw::RawPolicy, ConfigError};

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

pub fn build(raw: Option<RawPolicy>) -> Result<SenderPolicy, ConfigError> {
    let policy = match raw {
        None => SenderPolicy::Token,
        Some(p) => match (p.sender.as_deref().unwrap_or("token"), p.authserv_id) {
            ("token", _) => SenderPolicy::Token,
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
    Ok(policy)
}
