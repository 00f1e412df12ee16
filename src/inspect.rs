//! `imip-milter inspect`: the milter's decision for a message file, offline.
//! Runs the very same classify → analyse → decide code as the milter.

use crate::{
    address::{GatewayAddresses, Recipient},
    analysis::analyse_bounded,
    decision::{self, Decision},
};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Verdict {
    pub disposition: &'static str,
    pub smtp_reply: Option<String>,
    pub kind: &'static str,
    pub token: Option<String>,
    pub method: Option<String>,
    pub uid: Option<String>,
    pub attendee: Option<String>,
    pub partstat: Option<String>,
    pub reason: String,
    /// Recipients refused at RCPT, with the SMTP answer each got.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rejected_recipients: Vec<RejectedRecipient>,
}

#[derive(Debug, Serialize)]
pub struct RejectedRecipient {
    pub rcpt: String,
    pub smtp_reply: String,
}

fn verdict(d: &Decision, kind: &'static str) -> Verdict {
    Verdict {
        disposition: d.disposition.as_str(),
        smtp_reply: d.smtp_reply.as_ref().map(ToString::to_string),
        kind,
        token: None,
        method: None,
        uid: None,
        attendee: None,
        partstat: None,
        reason: d.reason.clone(),
        rejected_recipients: Vec::new(),
    }
}

/// Decides what the milter would do with `raw` sent to `rcpts`.
pub fn inspect(
    gateway: &GatewayAddresses,
    max_message_bytes: usize,
    limits: crate::analysis::Limits,
    rcpts: &[String],
    raw: &[u8],
) -> Verdict {
    let mut accepted = Vec::new();
    let mut rejected = Vec::new();
    let mut last_reject = None;
    for r in rcpts {
        let class = gateway.classify(r);
        match decision::decide_recipient(&class) {
            Some(d) => {
                rejected.push(RejectedRecipient {
                    rcpt: r.clone(),
                    smtp_reply: d.smtp_reply.as_ref().map(ToString::to_string).unwrap_or_default(),
                });
                last_reject = Some(d);
            }
            None => accepted.push(class),
        }
    }
    let mut v = if accepted.is_empty() && last_reject.is_some() {
        // Every recipient refused: the transaction ends at RCPT.
        let d = last_reject.unwrap_or_else(|| decision::decide_too_large(0, false));
        verdict(&d, "none")
    } else if let Some(d) = decision::decide_data(&accepted) {
        verdict(&d, "none")
    } else if raw.len() > max_message_bytes {
        verdict(&decision::decide_too_large(max_message_bytes, false), "none")
    } else {
        let analysis = analyse_bounded(raw, limits);
        let d = decision::decide_message(&analysis, &accepted);
        let mut v = verdict(&d, analysis.kind.as_str());
        v.token = accepted.iter().find_map(|c| match c {
            Recipient::Gateway { token } => Some(token.clone()),
            _ => None,
        });
        (v.attendee, v.partstat) = analysis.answer();
        if let Some(i) = analysis.itip {
            v.method = i.method;
            v.uid = i.uid;
        }
        v
    };
    v.rejected_recipients = rejected;
    v
}

impl Verdict {
    /// Human-readable form, one fact a line.
    pub fn to_text(&self) -> String {
        let mut out = format!("disposition: {}\n", self.disposition);
        let mut line = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                out.push_str(&format!("{k}: {v}\n"));
            }
        };
        line("smtp_reply", &self.smtp_reply);
        line("kind", &Some(self.kind.to_owned()));
        line("token", &self.token.as_deref().map(crate::address::token_prefix));
        line("method", &self.method);
        line("uid", &self.uid);
        line("attendee", &self.attendee);
        line("partstat", &self.partstat);
        line("reason", &Some(self.reason.clone()));
        for r in &self.rejected_recipients {
            out.push_str(&format!("rejected: {} ({})\n", r.rcpt, r.smtp_reply));
        }
        out
    }
}
