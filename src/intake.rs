//! The path every message takes, from the milter's end of message and from
//! `imip-milter deliver` alike: analyse → decide → spool.

use crate::{
    address::{printable, token_prefix, Recipient},
    analysis::{analyse_bounded, Analysis, Kind},
    decision::{self, Decision, Disposition},
    errors, itip, policy,
    settings::Settings,
    spool::{build_record, Appended, Envelope, Record, Spool},
    tokens::{TokenRecord, TokenStore},
};
use std::{panic::AssertUnwindSafe, sync::Arc};
use tracing::{debug, error, info, warn};

/// Large messages handled at once, off the session thread.
static ANALYSES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// Messages up to this size are handled on the session's own thread: under
/// a millisecond even when built to be slow (see bench/README.md).
pub const IN_PLACE: usize = 16 * 1024;

/// What became of one message.
pub struct Intake {
    pub decision: Decision,
    pub analysis: Analysis,
    /// Record ids spooled (or found spooled already).
    pub ids: Vec<String>,
    pub duplicates: usize,
    /// The organizer, as the token names her (local tokens).
    pub organizer: Option<String>,
    /// When the decision was taken: the journal's time for the message,
    /// before any delivery of what it spooled.
    pub decided_ms: u64,
    /// The message, given back when it is redirected: the milter gives the
    /// organizer her own address back in it.
    pub message: Option<Vec<u8>>,
    /// Observe mode: decided only; shown as what it would have been.
    pub observed: bool,
}

impl Intake {
    /// The disposition as the log and the journal name it.
    pub fn disposition(&self) -> String {
        let d = self.decision.disposition.as_str();
        match self.observed {
            true => crate::journal::would(d),
            false => d.to_owned(),
        }
    }
}

/// Analyses, decides and, for a reply or bounce, spools durably.
/// `recipients` are those accepted at RCPT: the argument as received and its class.
/// `tokens`: in local mode, the records of the gateway recipients' tokens.
/// `store`: the token store, in local mode.
pub async fn take(
    spool: &Spool,
    store: Option<&dyn TokenStore>,
    raw: Vec<u8>,
    recipients: &[(String, Recipient)],
    tokens: &[TokenRecord],
    settings: &Arc<Settings>,
    envelope: &Envelope,
) -> Intake {
    // The spool's writer may hold its commit a moment for this append.
    let coming = spool.append_coming();
    let queue_id = envelope.queue_id.as_deref().unwrap_or("NOQUEUE");
    let (
        Prepared {
            mut decision,
            analysis,
            records,
            organizer,
        },
        raw,
    ) = match prepared(raw, recipients, tokens, settings, envelope).await {
        Ok(p) => p,
        Err(e) => return failed(queue_id, &e),
    };
    let decided_ms = crate::clock::now_ms();
    let ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
    let mut duplicates = 0;
    let mut records = records;
    // A reply is kept as it arrived: if it fails for good, the organizer
    // gets it (delivery.on_failure); a larger one, its calendar text.
    // Spooled records mean no redirect, so the message is not needed back.
    let keep = settings.keep_originals && raw.len() <= crate::notice::MAX_KEPT;
    let raw = match keep && records.iter().any(|r| r.kind == "reply") {
        true => {
            let original = Arc::new(raw);
            for r in records.iter_mut().filter(|r| r.kind == "reply") {
                r.original = Some(original.clone());
            }
            Vec::new()
        }
        false => raw,
    };
    if !records.is_empty() {
        drop(coming);
        match spool.append(records).await {
            Ok(outcomes) => {
                duplicates = outcomes.iter().filter(|o| **o == Appended::Duplicate).count();
                if let Some(store) = store {
                    touch(store, tokens).await;
                }
            }
            Err(e) => {
                let e = errors::chain(&e);
                error!("{queue_id}: {e}");
                decision = decision::decide_spool_failed(&e);
            }
        }
    }
    let message = decision.redirect_to.is_some().then_some(raw);
    Intake {
        organizer,
        decision,
        analysis,
        ids,
        duplicates,
        decided_ms,
        message,
        observed: false,
    }
}

/// The analysis and decision of one message, off the session thread when
/// it is large. Err: the analysis failed (a parser panicked).
async fn prepared(
    raw: Vec<u8>,
    recipients: &[(String, Recipient)],
    tokens: &[TokenRecord],
    settings: &Arc<Settings>,
    envelope: &Envelope,
) -> Result<(Prepared, Vec<u8>), String> {
    // Parsing, deciding and rewriting are CPU work. A small message (nearly
    // every reply) is handled in place: a hop to another thread and back
    // costs more than the work. A larger one goes off the session thread, a
    // few at a time (each holds a whole message), so no session waits
    // behind it. A panic in a parser is a refusal, never a dead session.
    if raw.len() <= IN_PLACE {
        return std::panic::catch_unwind(AssertUnwindSafe(|| {
            prepare(&raw, recipients, tokens, settings, envelope)
        }))
        .map(|p| (p, raw))
        .map_err(|_| "a parser panicked".to_owned());
    }
    let _slot = ANALYSES.acquire().await;
    let (recipients, tokens, settings, envelope) = (
        recipients.to_vec(),
        tokens.to_vec(),
        Arc::clone(settings),
        envelope.clone(),
    );
    tokio::task::spawn_blocking(move || {
        let p = prepare(&raw, &recipients, &tokens, &settings, &envelope);
        (p, raw)
    })
    .await
    .map_err(|e| e.to_string())
}

/// What a message whose analysis failed gets: 451, the sender retries.
fn failed(queue_id: &str, e: &str) -> Intake {
    error!("{queue_id}: analysis failed: {e}");
    Intake {
        decision: decision::decide_spool_failed("analysis failed"),
        analysis: Analysis::failed(),
        ids: Vec::new(),
        duplicates: 0,
        organizer: None,
        decided_ms: crate::clock::now_ms(),
        message: None,
        observed: false,
    }
}

/// Observe mode: what `take` would do, decided and nothing else; no spool,
/// no token touched. The intake is marked observed: the log, the journal
/// and the metrics say "would-…".
pub async fn observe(
    raw: Vec<u8>,
    recipients: &[(String, Recipient)],
    tokens: &[TokenRecord],
    settings: &Arc<Settings>,
    envelope: &Envelope,
) -> Intake {
    let queue_id = envelope.queue_id.as_deref().unwrap_or("NOQUEUE");
    match prepared(raw, recipients, tokens, settings, envelope).await {
        // Nothing spooled: no record ids to show.
        Ok((p, _)) => Intake {
            ids: Vec::new(),
            decision: p.decision,
            analysis: p.analysis,
            duplicates: 0,
            organizer: p.organizer,
            decided_ms: crate::clock::now_ms(),
            message: None,
            observed: true,
        },
        Err(e) => Intake {
            observed: true,
            ..failed(queue_id, &e)
        },
    }
}

/// The decision `take` would come to, without spooling anything: what
/// `inspect` replays. The analysis comes with it.
pub fn decide(
    raw: &[u8],
    recipients: &[(String, Recipient)],
    tokens: &[TokenRecord],
    settings: &Settings,
    envelope: &Envelope,
) -> (Decision, Analysis) {
    let p = prepare(raw, recipients, tokens, settings, envelope);
    (p.decision, p.analysis)
}

/// Dropped attendees named in the log and the record; a hostile reply may
/// list thousands.
const SHOWN_DROPPED: usize = 10;

/// A message analysed and decided, with the records to spool: everything
/// before the first I/O, so it may run on any thread.
struct Prepared {
    decision: Decision,
    analysis: Analysis,
    records: Vec<Record>,
    organizer: Option<String>,
}

fn prepare(
    raw: &[u8],
    recipients: &[(String, Recipient)],
    tokens: &[TokenRecord],
    settings: &Settings,
    envelope: &Envelope,
) -> Prepared {
    let sender_policy = &settings.policy;
    let classes: Vec<Recipient> = recipients.iter().map(|(_, c)| c.clone()).collect();
    let mut analysis = analyse_bounded(raw, settings.limits);
    if analysis.kind == Kind::Bounce && analysis.loose_report && !envelope.mail_from.is_empty() {
        // Only a mailer daemon writes a report in text, from the null sender.
        analysis.kind = Kind::Other;
        analysis.reason = "a message that reads like a delivery report, from a sender other than the null sender; \
                           please write to the organizer directly"
            .into();
    }
    if analysis.kind == Kind::Report && !envelope.mail_from.is_empty() {
        // Reports come from the null sender (RFC 3464); anything else that
        // looks like one is a person's message and gets an answer.
        analysis.kind = Kind::Other;
        analysis.reason = "a delivery report from a sender other than the null sender; \
                           please write to the organizer directly"
            .into();
    }
    let record_of = |token: &str| tokens.iter().find(|r| r.token == token);
    let organizer = gateway(recipients)
        .find_map(|(_, t)| record_of(t))
        .map(|r| r.organizer.as_str());
    let mixed = classes.contains(&Recipient::Other);
    let mut decision = match tokens.is_empty() {
        true => decision::decide_message(&analysis, &classes),
        false => decision::decide_with_organizer(&analysis, &classes, organizer),
    };
    // Local tokens: each token binds the message to its attendee and event.
    let mut answering: Vec<(&str, String)> = Vec::new();
    if decision.spool {
        for (_, token) in gateway(recipients) {
            let Some(t) = record_of(token) else { continue };
            match decision::bind(&analysis, t, &envelope.mail_from) {
                decision::Binding::Answers(a) => answering.push((token, a)),
                unbound => {
                    if let Some(d) = decision::decide_unbound(&unbound, mixed, Some(t.organizer.as_str())) {
                        decision = d;
                    }
                    answering.clear();
                    break;
                }
            }
        }
    }
    if decision.spool && analysis.kind == Kind::Reply {
        // Every token the message names must pass, each for its own attendee.
        for (_, token) in gateway(recipients) {
            let who = answering.iter().find(|(t, _)| *t == token).map(|(_, a)| a.as_str());
            if let Err(why) = policy::check(sender_policy, &analysis, record_of(token), who) {
                decision = decision::decide_policy_refused(&why, mixed);
                break;
            }
        }
    }
    // The caldav target applies REPLY only: another method, bound to its
    // token like a reply above, goes to the organizer to read.
    let method = analysis.itip.as_ref().and_then(|i| i.method.clone());
    if decision.spool && settings.replies_only && analysis.kind == Kind::Reply && method.as_deref() != Some("REPLY") {
        let mut other = analysis.clone();
        other.kind = Kind::Other;
        other.reason = format!(
            "the calendar target applies replies only, not METHOD:{}",
            method.as_deref().unwrap_or("-")
        );
        decision = decision::decide_with_organizer(&other, &classes, organizer);
    }
    let mut records = Vec::new();
    let mut notes = Vec::new();
    if decision.spool {
        let mut unreadable = None;
        for (raw, token) in gateway(recipients) {
            let record = match (record_of(token), answering.iter().find(|(t, _)| *t == token)) {
                (Some(t), Some((_, attendee))) => match for_organizer(&analysis, t, attendee) {
                    Ok((local, dropped)) => {
                        let mut r = build_record(&local, envelope, raw, token);
                        if let Some(obj) = r.payload.as_object_mut() {
                            obj.insert("organizer".into(), t.organizer.clone().into());
                            // The token is the authority on whom a bounce is about.
                            obj.insert("attendee".into(), attendee.clone().into());
                            if !dropped.is_empty() {
                                let shown: Vec<&str> = dropped.iter().take(SHOWN_DROPPED).map(String::as_str).collect();
                                obj.insert("dropped".into(), shown.into());
                            }
                        }
                        if !dropped.is_empty() {
                            let mut who = dropped
                                .iter()
                                .take(SHOWN_DROPPED)
                                .cloned()
                                .collect::<Vec<_>>()
                                .join(", ");
                            if dropped.len() > SHOWN_DROPPED {
                                who.push_str(&format!(" and {} more", dropped.len() - SHOWN_DROPPED));
                            }
                            notes.push(format!("components for {who} dropped (not the token's attendee)"));
                        }
                        r
                    }
                    Err(e) => {
                        unreadable = Some(e);
                        break;
                    }
                },
                (Some(_), None) => continue, // cannot happen: every local token was bound above
                (None, _) => build_record(&analysis, envelope, raw, token),
            };
            records.push(record);
        }
        if let Some(e) = unreadable {
            decision = decision::decide_unreadable(&e, mixed);
            records.clear();
        }
    }
    if !notes.is_empty() {
        decision.reason = format!("{}; {}", decision.reason, notes.join("; "));
    }
    Prepared {
        organizer: organizer.map(str::to_owned),
        decision,
        analysis,
        records,
    }
}

/// The journal's line for one message.
pub fn journal_event(
    envelope: &Envelope,
    recipients: &[(String, Recipient)],
    intake: &Intake,
) -> crate::journal::Event {
    let d = &intake.decision;
    let reason = match intake.duplicates {
        0 => d.reason.clone(),
        n => format!("{}; duplicate: {n} of its records were spooled already", d.reason),
    };
    let mut now = crate::journal::Event::now("message", &intake.disposition(), &reason);
    now.time_ms = intake.decided_ms;
    now.time = crate::journal::rfc3339(intake.decided_ms);
    crate::journal::Event {
        queue_id: envelope.queue_id.clone(),
        message_id: intake.analysis.message_id.clone(),
        sender: Some(envelope.mail_from.clone()),
        from: intake.analysis.from.clone(),
        attendee: intake.analysis.answer().0,
        organizer: intake.organizer.clone(),
        token: gateway(recipients).next().map(|(_, t)| crate::journal::token8(t)),
        smtp_reply: d.smtp_reply.as_ref().map(ToString::to_string),
        record_id: (!intake.ids.is_empty()).then(|| intake.ids.join(",")),
        ..now
    }
}

/// Local mode: the reply (or bounce) as the organizer's server should get
/// it, for `attendee` only; and the attendees whose components were dropped.
/// Err: the reply cannot be rewritten, and is not handed on as it came.
fn for_organizer(analysis: &Analysis, t: &TokenRecord, attendee: &str) -> Result<(Analysis, Vec<String>), String> {
    let mut a = analysis.clone();
    let mut dropped = Vec::new();
    match a.kind {
        Kind::Reply => {
            if let Some(cal) = &analysis.icalendar {
                let r = itip::rewrite_reply(cal, &t.organizer, attendee)?;
                dropped = r.dropped;
                a.itip = Some(itip::read(&r.text, None)?);
                a.icalendar = Some(r.text);
            }
        }
        Kind::Bounce => {
            let text = itip::bounce_reply(&t.organizer, attendee, &t.uid, chrono::Utc::now());
            a.itip = itip::read(&text, None).ok();
            a.icalendar = Some(text);
        }
        _ => {}
    }
    Ok((a, dropped))
}

/// Records when each token was last used; tokens expire counted from there.
async fn touch(store: &dyn TokenStore, tokens: &[TokenRecord]) {
    let now = crate::clock::now_ms();
    for t in tokens {
        // The reply is stored; a database that fails once is not asked again
        // for the other tokens of this message.
        if let Err(e) = store.touch(&t.token, now).await {
            warn!("{}", crate::errors::chain(&e));
            break;
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
/// The log line and the journal's event for one message.
pub fn record(spool: &Spool, envelope: &Envelope, recipients: &[(String, Recipient)], intake: &Intake, via: &str) {
    log(envelope, recipients, intake, via);
    spool.journal_later(journal_event(envelope, recipients, intake));
}

pub fn log(envelope: &Envelope, recipients: &[(String, Recipient)], intake: &Intake, via: &str) {
    let queue_id = envelope.queue_id.as_deref().unwrap_or("NOQUEUE");
    let tokens: Vec<String> = gateway(recipients).map(|(_, t)| token_prefix(t)).collect();
    let mut line = format!(
        "{}: from=<{}> message-id={} disposition={} kind={} token={} reason=\"{}\"",
        printable(queue_id),
        printable(&envelope.mail_from),
        printable(intake.analysis.message_id.as_deref().unwrap_or("-")),
        intake.disposition(),
        intake.analysis.kind.as_str(),
        if tokens.is_empty() {
            "-".into()
        } else {
            tokens.join(",")
        },
        crate::address::quoted(&intake.decision.reason),
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
    match intake.observed {
        true => crate::metrics::METRICS.observed(&intake.disposition()),
        false => crate::metrics::METRICS.message(intake.decision.disposition),
    }
    if intake.analysis.kind == Kind::Report && !intake.observed {
        crate::metrics::METRICS.report();
    }
    match intake.decision.disposition {
        Disposition::Tempfail => warn!("{line}"),
        _ => info!("{line}"),
    }
    debug!(
        "{queue_id}: smtp_reply={:?}",
        intake.decision.smtp_reply.as_ref().map(ToString::to_string)
    );
}
