//! Finding and tokenizing an outgoing invitation in any message.
#![no_main]

use imip_milter::outbound::{find, rewrite_body, Outbound};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cfg = Outbound {
        sender_logins: Default::default(),
        trusted_logins: Vec::new(),
        trusted_clients: Vec::new(),
        organizer_domains: vec!["example.org".into()],
        address_patterns: vec![regex::Regex::new("^mailto:").unwrap()],
    };
    if let Some(inv) = find(data, &cfg) {
        let start = data.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4).unwrap_or(data.len());
        let _ = rewrite_body(data, start, &inv, "mailto:calendar+8e3c0d1a-5b7e-4f61-9a0c-2d4f3b6a7c81@example.org");
    }
});
