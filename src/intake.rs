//! The path every message takes, from the milter's end of message and from
//! `imip-milter deliver` alike: analyse → decide → spool.

use crate::{
    address::{token_prefix, Recipient},
    analysis::{analyse, Analysis},
    decision::{self, Decision, Disposition},
    spool::{build_record, Appended, Envelope, Spool},
};
use tracing::{debug, error, info, warn};

/// What became of one message.
pub struct Intake {
    pub decision: Decision,
    pub analysis: Analysis,
    /// Record ids spooled (or found spooled already).
    pub ids: Vec<String>,
    pub duplicates: usize,
}

/// Analyses, decides and, for a reply or bounce, spools durably.
/// `recipients` are those accepted at RCPT: the argument as received and its class.
pub async fn take(spool: &Spool, raw: Vec<u8>, recipients: &[(String, Recipient)], envelope: &Envelope) -> Intake {
    let queue_id = envelope.queue_id.as_deref().unwrap_or("NOQUEUE");
    let classes: Vec<Recipient> = recipients.iter().map(|(_, c)| c.clone()).collect();
    // MIME and iCalendar parsing is CPU work; keep it off the I/O threads.
    let analysis = match tokio::task::spawn_blocking(move || analyse(&raw)).await {
        Ok(a) => a,
        Err(e) => {
            error!("{queue_id}: analysis failed: {e}");
            return Intake {
                decision: decision::decide_spool_failed("analysis failed"),
                analysis: Analysis::failed(),
                ids: Vec::new(),
                duplicates: 0,
            };
        }
    };
    let mut decision = decision::decide_message(&analysis, &classes);
    let mut ids = Vec::new();
    let mut duplicates = 0;
    if decision.spool {
        let records: Vec<_> = gateway(recipients)
            .map(|(raw, token)| build_record(&analysis, envelope, raw, token))
            .collect();
        ids = records.iter().map(|r| r.id.clone()).collect();
        match spool.append(records).await {
            Ok(outcomes) => duplicates = outcomes.iter().filter(|o| **o == Appended::Duplicate).count(),
            Err(e) => {
                error!("{queue_id}: {e}");
                decision = decision::decide_spool_failed(&e.0);
            }
        }
    }
    Intake {
        decision,
        analysis,
        ids,
        duplicates,
    }
}

/// The gateway recipients: raw argument and token.
pub fn gateway(recipients: &[(String, Recipient)]) -> impl Iterator<Item = (&str, &str)> {
    recipients.iter().filter_map(|(raw, class)| match class {
        Recipient::Gateway { token } => Some((raw.as_str(), token.as_str())),
        _ => None,
    })
}

/// The one log line per message.
pub fn log(envelope: &Envelope, recipients: &[(String, Recipient)], intake: &Intake, via: &str) {
    let queue_id = envelope.queue_id.as_deref().unwrap_or("NOQUEUE");
    let tokens: Vec<String> = gateway(recipients).map(|(_, t)| token_prefix(t)).collect();
    let mut line = format!(
        "{queue_id}: from=<{}> message-id={} disposition={} kind={} token={} reason=\"{}\"",
        envelope.mail_from,
        intake.analysis.message_id.as_deref().unwrap_or("-"),
        intake.decision.disposition.as_str(),
        intake.analysis.kind.as_str(),
        if tokens.is_empty() {
            "-".into()
        } else {
            tokens.join(",")
        },
        intake.decision.reason.replace('"', "'"),
    );
    if !intake.ids.is_empty() {
        line.push_str(&format!(" id={}", intake.ids.join(",")));
    }
    if intake.duplicates > 0 {
        line.push_str(&format!(" duplicate={}", intake.duplicates));
    }
    if !via.is_empty() {
        line.push_str(&format!(" via={via}"));
    }
    crate::metrics::METRICS.message(intake.decision.disposition);
    match intake.decision.disposition {
        Disposition::Tempfail => warn!("{line}"),
        _ => info!("{line}"),
    }
    debug!(
        "{queue_id}: smtp_reply={:?}",
        intake.decision.smtp_reply.as_ref().map(ToString::to_string)
    );
}
