//! iTIP reading and CalendarServer's reply rewriting on any calendar text.
#![no_main]

use imip_milter::itip;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = itip::read(&text, Some("REPLY"));
    if let Ok(r) = itip::rewrite_reply(&text, "mailto:alice@example.org", "mailto:bob@example.com") {
        // What we hand on must itself be readable.
        assert!(itip::read(&r.text, None).is_ok(), "{}", r.text);
    }
});
