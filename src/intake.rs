//! The path every message takes, from the milter's end of message and from
//! `imip-milter deliver` alike: analyse → decide → spool.

use crate::{
    address::{token_prefix, Recipient},
    analysis::{analyse, Analysis, Kind},
    config::SenderPolicy,
    decision::{self, Decision, Disposition},
    itip, policy,
    spool::{build_record, Appended, Envelope, Spool},
    tokens::{RedbTokens, TokenRecord, TokenStore},
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
/// `tokens`: in local mode, the records of the gateway recipients' tokens.
pub async fn take(
    spool: &Spool,
    raw: Vec<u8>,
    recipients: &[(String, Recipient)],
    tokens: &[TokenRecord],
    sender_policy: &SenderPolicy,
    envelope: &Envelope,
) -> Intake {
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
    let record_of = |token: &str| tokens.iter().find(|r| r.token == token);
    let organizer = gateway(recipients)
        .find_map(|(_, t)| record_of(t))
        .map(|r| r.organizer.as_str());
    let mut decision = match tokens.is_empty() {
        true => decision::decide_message(&analysis, &classes),
        false => decision::decide_with_organizer(&analysis, &classes, organizer),
    };
    if decision.spool && analysis.kind == Kind::Reply {
        let token = gateway(recipients).find_map(|(_, t)| record_of(t));
        if let Err(why) = policy::check(sender_policy, &analysis, token) {
            decision = decision::decide_policy_refused(&why, classes.contains(&Recipient::Other));
        }
    }
    let mut ids = Vec::new();
    let mut duplicates = 0;
    let mut notes = Vec::new();
    if decision.spool {
        let records: Vec<_> = gateway(recipients)
            .map(|(raw, token)| match record_of(token) {
                Some(t) => {
                    let (local, note) = for_organizer(&analysis, t);
                    notes.extend(note);
                    let mut r = build_record(&local, envelope, raw, token);
                    if let Some(obj) = r.payload.as_object_mut() {
                        obj.insert("organizer".into(), t.organizer.clone().into());
                    }
                    r
                }
                None => build_record(&analysis, envelope, raw, token),
            })
            .collect();
        ids = records.iter().map(|r| r.id.clone()).collect();
        match spool.append(records).await {
            Ok(outcomes) => {
                duplicates = outcomes.iter().filter(|o| **o == Appended::Duplicate).count();
                touch(spool, tokens);
            }
            Err(e) => {
                error!("{queue_id}: {e}");
                decision = decision::decide_spool_failed(&e.0);
            }
        }
    }
    if !notes.is_empty() {
        decision.reason = format!("{}; {}", decision.reason, notes.join("; "));
    }
    Intake {
        decision,
        analysis,
        ids,
        duplicates,
    }
}

/// Local mode: the reply as the organizer's server should get it.
fn for_organizer(analysis: &Analysis, t: &TokenRecord) -> (Analysis, Option<String>) {
    let mut a = analysis.clone();
    let mut note = None;
    match a.kind {
        Kind::Reply => {
            if let Some(cal) = &analysis.icalendar {
                let replying = analysis.itip.as_ref().and_then(|i| i.attendee.as_deref());
                match itip::rewrite_reply(cal, &t.organizer, &t.attendee_for(replying)) {
                    Ok(r) => {
                        if r.attendee_mismatch {
                            note = Some("ATTENDEE is not the token's attendee (SCHEDULE-STATUS=5.1)".to_owned());
                        }
                        a.itip = itip::read(&r.text, None).ok().or(a.itip);
                        a.icalendar = Some(r.text);
                    }
                    Err(e) => note = Some(format!("not rewritten: {e}")),
                }
            }
        }
        Kind::Bounce => {
            // A shared token: the bounce names the attendee it failed for.
            let failed = analysis
                .bounce
                .as_ref()
                .and_then(|b| b.final_recipient.as_deref())
                .map(|r| format!("mailto:{r}"));
            let attendee = t.attendee_for(failed.as_deref());
            let text = itip::bounce_reply(&t.organizer, &attendee, &t.uid, chrono::Utc::now());
            a.itip = itip::read(&text, None).ok();
            a.icalendar = Some(text);
        }
        _ => {}
    }
    (a, note)
}

/// Records when each token was last used; tokens expire counted from there.
fn touch(spool: &Spool, tokens: &[TokenRecord]) {
    if tokens.is_empty() {
        return;
    }
    let store = match RedbTokens::new(spool) {
        Ok(s) => s,
        Err(e) => return warn!("{e}"),
    };
    let now = crate::spool::now_ms();
    for t in tokens {
        let mut t = t.clone();
        t.last_used_ms = now;
        if let Err(e) = store.put(&t) {
            warn!("{e}");
        }
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
