//! `imip-milter inspect`: the milter's decision for a message file. With the
//! configuration it replays the milter's own path (RCPT checks, token lookup,
//! binding, policy, target kind: `intake::decide`) without spooling or
//! touching anything; with `--gateway` alone it is the offline check of
//! classify → analyse → decide.

use crate::{
    address::{GatewayAddresses, Recipient},
    decision::{self, Decision},
    settings::Settings,
    spool::Envelope,
    tokens::TokenRecord,
};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Verdict {
    pub disposition: &'static str,
    pub smtp_reply: Option<String>,
    /// Where a redirect sends the message instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect_to: Option<String>,
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
    /// What the decision was taken with: the configuration file, the token
    /// store, the policy and target kind; or that it was offline.
    pub inputs: String,
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
        redirect_to: d.redirect_to.clone(),
        kind,
        token: None,
        method: None,
        uid: None,
        attendee: None,
        partstat: None,
        reason: d.reason.clone(),
        rejected_recipients: Vec::new(),
        inputs: String::new(),
    }
}

/// What the token store answered for one token, as the milter reads it.
#[derive(Debug, Clone)]
pub enum TokenAnswer {
    Valid(TokenRecord),
    Unknown,
    Expired,
    /// The store could not answer: the milter would say 451.
    Failed(String),
}

/// Decides what the milter would do with `raw` sent to `rcpts`, offline:
/// the gateway addresses and limits only, no token store, policy or target
/// (the milter's path with the sender policy `token` and no token lookups).
pub fn inspect(
    gateway: &GatewayAddresses,
    max_message_bytes: usize,
    limits: crate::analysis::Limits,
    rcpts: &[String],
    raw: &[u8],
) -> Verdict {
    let settings = Settings {
        gateway: gateway.clone(),
        max_message_bytes,
        limits,
        // Offline there is no per-message bound of gateway recipients.
        max_gateway_recipients: usize::MAX,
        max_buffered_bytes: max_message_bytes,
        policy: crate::config::SenderPolicy::Token,
        replies_only: false,
        tokens: None,
        outbound: None,
        observe: false,
        keep_originals: false,
    };
    replay(&settings, "", rcpts, raw, None)
}

/// Decides as the milter configured with `settings` would: each gateway
/// recipient's token looked up through `lookup` (read-only; None in remote
/// token mode), then binding,
/// `[policy]` and the target kind, as `intake::decide` does at end of
/// message. `sender` is the envelope sender (MAIL FROM). The per-client
/// limits do not apply: `inspect` is no SMTP client.
pub fn replay(
    settings: &Settings,
    sender: &str,
    rcpts: &[String],
    raw: &[u8],
    mut lookup: Option<&mut dyn FnMut(&str) -> TokenAnswer>,
) -> Verdict {
    let mut accepted: Vec<(String, Recipient)> = Vec::new();
    let mut tokens = Vec::new();
    let mut rejected = Vec::new();
    let mut last_reject = None;
    let mut gateways = 0;
    for r in rcpts {
        let class = settings.gateway.classify(r);
        let mut refusal = decision::decide_recipient(&class);
        if let (None, Recipient::Gateway { token }) = (&refusal, &class) {
            if gateways >= settings.max_gateway_recipients {
                refusal = Some(decision::decide_too_many_recipients(settings.max_gateway_recipients));
            } else if let Some(lookup) = lookup.as_mut() {
                match lookup(token) {
                    TokenAnswer::Valid(t) => tokens.push(t),
                    TokenAnswer::Unknown => refusal = Some(decision::decide_unknown_token(false)),
                    TokenAnswer::Expired => refusal = Some(decision::decide_unknown_token(true)),
                    TokenAnswer::Failed(e) => refusal = Some(decision::decide_store_failed(&e)),
                }
            }
            gateways += 1;
        }
        match refusal {
            Some(d) => {
                rejected.push(rejected_recipient(r, &d));
                last_reject = Some(d);
            }
            None => accepted.push((r.clone(), class)),
        }
    }
    let classes: Vec<Recipient> = accepted.iter().map(|(_, c)| c.clone()).collect();
    let mut v = match last_reject {
        Some(d) if accepted.is_empty() => verdict(&d, "none"),
        _ => {
            if let Some(d) = decision::decide_data(&classes) {
                verdict(&d, "none")
            } else if raw.len() > settings.max_message_bytes {
                verdict(&decision::decide_too_large(settings.max_message_bytes, false), "none")
            } else {
                let envelope = Envelope {
                    queue_id: None,
                    mail_from: sender.to_owned(),
                    client_addr: None,
                };
                let (d, analysis) = crate::intake::decide(raw, &accepted, &tokens, settings, &envelope);
                with_analysis(verdict(&d, analysis.kind.as_str()), &analysis, &classes)
            }
        }
    };
    v.rejected_recipients = rejected;
    v
}

fn rejected_recipient(rcpt: &str, d: &Decision) -> RejectedRecipient {
    RejectedRecipient {
        rcpt: rcpt.to_owned(),
        smtp_reply: d.smtp_reply.as_ref().map(ToString::to_string).unwrap_or_default(),
    }
}

fn with_analysis(mut v: Verdict, analysis: &crate::analysis::Analysis, accepted: &[Recipient]) -> Verdict {
    v.token = accepted.iter().find_map(|c| match c {
        Recipient::Gateway { token } => Some(token.clone()),
        _ => None,
    });
    (v.attendee, v.partstat) = analysis.answer();
    if let Some(i) = &analysis.itip {
        v.method.clone_from(&i.method);
        v.uid.clone_from(&i.uid);
    }
    v
}

impl Verdict {
    /// Human-readable form, one fact a line; text from the message escaped.
    pub fn to_text(&self) -> String {
        let mut out = format!("disposition: {}\n", self.disposition);
        let mut line = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                out.push_str(&format!("{k}: {}\n", crate::address::printable(v)));
            }
        };
        line("smtp_reply", &self.smtp_reply);
        line("redirect_to", &self.redirect_to);
        line("kind", &Some(self.kind.to_owned()));
        line("token", &self.token.as_deref().map(crate::address::token_prefix));
        line("method", &self.method);
        line("uid", &self.uid);
        line("attendee", &self.attendee);
        line("partstat", &self.partstat);
        line("reason", &Some(self.reason.clone()));
        line("inputs", &Some(self.inputs.clone()));
        for r in &self.rejected_recipients {
            out.push_str(&format!(
                "rejected: {} ({})\n",
                crate::address::printable(&r.rcpt),
                crate::address::printable(&r.smtp_reply)
            ));
        }
        out
    }
}
