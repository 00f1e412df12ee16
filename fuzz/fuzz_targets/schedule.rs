//! Applying a REPLY to a stored object: input is "stored\0reply".
#![no_main]

use imip_milter::schedule::{apply_reply, Applied, Crashers, Growth};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (stored, reply) = text.split_once('\0').unwrap_or((&text, ""));
    for crashers in [Crashers::Refuse, Crashers::Record] {
        let growth = Growth::for_object(stored.len(), 100, 4 << 20);
        if let Ok(Applied::Changed(out)) = apply_reply(stored, reply, "mailto:bob@example.com", crashers, growth) {
            assert!(out.len() <= growth.object_bytes);
            // Applying the same reply again changes nothing more than once over.
            let growth = Growth::for_object(out.len(), 100, 4 << 20);
            let _ = apply_reply(&out, reply, "mailto:bob@example.com", crashers, growth);
        }
    }
});
