//! `imip-milter deliver`: the safety net. Postfix's pipe(8) hands it one
//! message for one gateway recipient when the milter did not see it (milter
//! down, `default_action=accept`); it takes the same analyse → decide → spool
//! path and answers with a sysexits(3) code.

use crate::{address::Recipient, decision, intake, milter::Shared, spool::Envelope};
use serde::{Deserialize, Serialize};

/// sysexits(3)
pub const EX_OK: u8 = 0;
pub const EX_DATAERR: u8 = 65;
pub const EX_NOUSER: u8 = 67;
pub const EX_SOFTWARE: u8 = 70;
pub const EX_TEMPFAIL: u8 = 75;
pub const EX_NOPERM: u8 = 77;

/// What `deliver` made of a message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verdict {
    pub disposition: String,
    pub smtp_reply: Option<String>,
    pub reason: String,
    /// Record ids spooled, or found spooled already.
    #[serde(default)]
    pub ids: Vec<String>,
    /// Ids of records this message added (not duplicates).
    #[serde(default)]
    pub new_ids: Vec<String>,
}

impl Verdict {
    fn from_decision(d: &decision::Decision) -> Self {
        Self {
            disposition: d.disposition.as_str().to_owned(),
            smtp_reply: d.smtp_reply.as_ref().map(ToString::to_string),
            reason: d.reason.clone(),
            ids: Vec::new(),
            new_ids: Vec::new(),
        }
    }

    /// The exit status Postfix's pipe(8) understands: 0 taken, 75 try again
    /// later, 65/67/77 bounce with the reason.
    pub fn exit_code(&self) -> u8 {
        match self.disposition.as_str() {
            "discard" | "delete-recipients" | "accept" | "redirect" => EX_OK,
            "tempfail" => EX_TEMPFAIL,
            _ => match self.smtp_reply.as_deref().and_then(|r| r.split_whitespace().nth(1)) {
                Some("5.1.1") => EX_NOUSER,
                Some("5.6.0" | "5.3.4") => EX_DATAERR,
                Some(_) => EX_NOPERM,
                None => EX_SOFTWARE,
            },
        }
    }

    /// The one line for standard error, which Postfix puts in the bounce.
    pub fn message(&self) -> String {
        match &self.smtp_reply {
            // Without the reply code: pipe(8) adds its own.
            Some(r) => r.splitn(3, ' ').nth(2).unwrap_or(r).to_owned(),
            None => self.reason.clone(),
        }
    }
}

pub fn too_large(limit: usize) -> Verdict {
    Verdict::from_decision(&decision::decide_too_large(limit, false))
}

/// Takes one message for one recipient.
/// `client_addr`: the SMTP client's address (Postfix's `${client_address}`),
/// for the unknown-token limit and the record.
pub async fn take(
    shared: &Shared,
    rcpt: &str,
    sender: &str,
    queue_id: Option<String>,
    client_addr: Option<String>,
    raw: Vec<u8>,
) -> Verdict {
    let client_addr = client_addr.filter(|a| a.parse::<std::net::IpAddr>().is_ok());
    let settings = shared.settings();
    // Observe mode takes nothing: whatever it would have said, the message
    // waits in Postfix's queue.
    let verdict = |d: &decision::Decision| match settings.observe {
        true => Verdict::from_decision(&decision::decide_observing_deliver()),
        false => Verdict::from_decision(d),
    };
    if raw.len() > settings.max_message_bytes {
        return verdict(&decision::decide_too_large(settings.max_message_bytes, false));
    }
    let class = settings.gateway.classify(rcpt);
    // Refusals are journaled as the milter's are at RCPT: the bounce
    // pipe(8) makes of them is the sender's only answer.
    let queue = queue_id.clone().unwrap_or_else(|| "NOQUEUE".into());
    let client = client_addr.as_deref().unwrap_or("-");
    let refused = |d: &decision::Decision, token: Option<&str>, tallied: bool| {
        tracing::info!(
            "{}: {} RCPT {} from=<{}> via=deliver: {}",
            crate::address::printable(&queue),
            settings.shown(d.disposition),
            settings.gateway.redact(rcpt),
            crate::address::printable(sender),
            d.reason
        );
        shared.journal_recipient(client, tallied, queue.clone(), sender, token, d);
        verdict(d)
    };
    if let Some(d) = decision::decide_recipient(&class) {
        return refused(&d, None, false);
    }
    if class == Recipient::Other {
        return refused(
            &decision::decide_not_a_gateway(&settings.gateway.redact(rcpt)),
            None,
            false,
        );
    }
    let mut records = Vec::new();
    if let Recipient::Gateway { token } = &class {
        match shared.check_token(token, client_addr.as_deref()).await {
            Ok(Some(r)) => records.push(r),
            Ok(None) => {}
            Err(r) => return refused(&r.decision, Some(token), r.tallied),
        }
    }
    let recipients = vec![(rcpt.to_owned(), class)];
    let envelope = Envelope {
        queue_id,
        mail_from: sender.to_owned(),
        client_addr,
    };
    if settings.observe {
        // Taken here, the message would be gone: it waits in Postfix's
        // queue instead, and the journal says what would have become of it.
        let intake = intake::observe(raw, &recipients, &records, &settings, &envelope).await;
        intake::record(&shared.spool, &envelope, &recipients, &intake, "deliver");
        return Verdict::from_decision(&decision::decide_observing_deliver());
    }
    let store = settings.tokens.as_ref().map(|l| l.store.as_ref());
    let mut intake = intake::take(&shared.spool, store, raw, &recipients, &records, &settings, &envelope).await;
    if let Some(to) = intake.decision.redirect_to.clone() {
        // pipe(8) cannot add a recipient: the bounce tells the sender where
        // to write, and the journal says it bounced.
        intake.decision = decision::decide_write_to_organizer(&to, &intake.decision.reason);
    }
    intake::record(&shared.spool, &envelope, &recipients, &intake, "deliver");
    let mut v = Verdict::from_decision(&intake.decision);
    v.ids = intake.ids.clone();
    if intake.duplicates == 0 && intake.decision.spool {
        v.new_ids = intake.ids;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(disposition: &str, reply: Option<&str>) -> Verdict {
        Verdict {
            disposition: disposition.into(),
            smtp_reply: reply.map(str::to_owned),
            reason: String::new(),
            ids: Vec::new(),
            new_ids: Vec::new(),
        }
    }

    #[test]
    fn exit_codes() {
        assert_eq!(v("discard", None).exit_code(), 0);
        assert_eq!(v("tempfail", Some("451 4.3.0 x")).exit_code(), 75);
        assert_eq!(v("reject", Some("550 5.1.1 x")).exit_code(), 67);
        assert_eq!(v("reject", Some("550 5.6.0 x")).exit_code(), 65);
        assert_eq!(v("reject", Some("552 5.3.4 x")).exit_code(), 65);
        assert_eq!(v("reject", Some("550 5.7.1 x")).exit_code(), 77);
        assert_eq!(
            v("reject", Some("550 5.7.1 Write to the organizer")).message(),
            "Write to the organizer"
        );
    }
}
