//! Checks across sections: what one section's value requires of another's.

use super::{Config, ConfigError, SenderPolicy, TargetKind, TokenMode};

pub fn across_sections(config: &Config) -> Result<(), ConfigError> {
    if config.max_buffered_bytes < config.max_message_bytes {
        return Err(ConfigError::new(
            "max_buffered_bytes",
            "must not be smaller than max_message_bytes",
        ));
    }
    let local = config.tokens.mode == TokenMode::Local;
    if config.policy == SenderPolicy::Attendee && !local {
        return Err(ConfigError::new(
            "policy.sender",
            "attendee needs tokens.mode = \"local\": only local tokens know the attendee",
        ));
    }
    if config.outbound.is_some() && !local {
        return Err(ConfigError::new(
            "outbound.enabled",
            "outbound tokenization needs tokens.mode = \"local\"",
        ));
    }
    if config.target.kind == TargetKind::CalDav && !local {
        return Err(ConfigError::new(
            "tokens.mode",
            "target kind caldav needs mode = \"local\": the organizer's calendar is found from the token",
        ));
    }
    if config.target.kind == TargetKind::CalendarServer && !local {
        return Err(ConfigError::new(
            "tokens.mode",
            "target kind calendarserver needs mode = \"local\": the injection names the organizer, which only local tokens know",
        ));
    }
    Ok(())
}
