//! Applying a REPLY to a stored object: input is "stored\0reply".
#![no_main]

use imip_milter::schedule::{apply_reply, Applied, Crashers};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (stored, reply) = text.split_once('\0').unwrap_or((&text, ""));
    for crashers in [Crashers::Refuse, Crashers::Record] {
        if let Ok(Applied::Changed(out)) = apply_reply(stored, reply, "mailto:bob@example.com", crashers) {
            // Applying the same reply again changes nothing more than once over.
            let _ = apply_reply(&out, reply, "mailto:bob@example.com", crashers);
        }
    }
});
