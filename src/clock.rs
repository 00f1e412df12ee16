//! The wall clock: milliseconds since the epoch, as the spool, the journal and the limits count time.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in ms since the epoch (0 for a clock set before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
