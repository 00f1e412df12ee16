//! Message analysis and the decision, as the milter runs them on any message.
#![no_main]

use imip_milter::{
    address::Recipient,
    analysis::analyse,
    decision::decide_message,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let a = analyse(data);
    let token = "8e3c0d1a-5b7e-4f61-9a0c-2d4f3b6a7c81".to_owned();
    let d = decide_message(&a, &[Recipient::Gateway { token: token.clone() }]);
    // A reject always says why, in one SMTP line.
    if let Some(r) = d.smtp_reply {
        let line = r.to_string();
        assert!(!line.contains(['\r', '\n']));
        assert!(line.len() < 1000);
    }
    let _ = decide_message(&a, &[Recipient::Other, Recipient::Gateway { token }]);
});
