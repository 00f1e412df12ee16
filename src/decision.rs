//! decide: the decision table (DESIGN §4) as pure functions from recipient
//! classes and analysis to a disposition and an SMTP answer.

use crate::{
    address::Recipient,
    analysis::{Analysis, Kind},
    tokens::TokenRecord,
};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Accept,
    Discard,
    DeleteRecipients,
    Reject,
    Tempfail,
    Redirect,
}

impl Disposition {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accept => "accept",
            Self::Discard => "discard",
            Self::DeleteRecipients => "delete-recipients",
            Self::Reject => "reject",
            Self::Tempfail => "tempfail",
            Self::Redirect => "redirect",
        }
    }
}

/// An SMTP answer: reply code, enhanced status code, one line of text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpReply {
    pub code: &'static str,
    pub enhanced: &'static str,
    pub text: String,
}

impl SmtpReply {
    fn new(code: &'static str, enhanced: &'static str, text: impl Into<String>) -> Self {
        // Keep within what milter and SMTP allow: one line, printable, ≤ 900 bytes.
        let mut text: String = text
            .into()
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if text.len() > 900 {
            let mut end = 900;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        Self { code, enhanced, text }
    }
}

impl fmt::Display for SmtpReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.code, self.enhanced, self.text)
    }
}

/// What to do with a message (or one recipient, at RCPT).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub disposition: Disposition,
    pub smtp_reply: Option<SmtpReply>,
    /// Spool the reply before answering (and tempfail if that fails).
    pub spool: bool,
    pub reason: String,
    /// Redirect: the address the message goes to instead of the gateway.
    pub redirect_to: Option<String>,
}

impl Decision {
    fn new(disposition: Disposition, reason: impl Into<String>) -> Self {
        Self {
            disposition,
            smtp_reply: None,
            spool: false,
            reason: reason.into(),
            redirect_to: None,
        }
    }

    fn reply(mut self, code: &'static str, enhanced: &'static str, text: impl Into<String>) -> Self {
        self.smtp_reply = Some(SmtpReply::new(code, enhanced, text));
        self
    }
}

/// RCPT stage: None lets the recipient through, Some rejects this recipient.
pub fn decide_recipient(recipient: &Recipient) -> Option<Decision> {
    match recipient {
        Recipient::GatewayWithoutToken => Some(
            Decision::new(Disposition::Reject, "gateway address without token").reply(
                "550",
                "5.1.1",
                "This address only takes replies to calendar invitations; \
                 please answer the invitation with your calendar program",
            ),
        ),
        Recipient::GatewayBadToken => Some(Decision::new(Disposition::Reject, "token of bad syntax").reply(
            "550",
            "5.1.1",
            "The reply address of this invitation is not valid; please answer the invitation \
                 with your calendar program",
        )),
        Recipient::Gateway { .. } | Recipient::Other => None,
    }
}

/// RCPT stage, local tokens: the token is not in the store, or has expired.
pub fn decide_unknown_token(expired: bool) -> Decision {
    Decision::new(
        Disposition::Reject,
        if expired { "token expired" } else { "unknown token" },
    )
    .reply(
        "550",
        "5.1.1",
        "This reply address is unknown or has expired; please write to the organizer directly",
    )
}

/// `deliver`: mail for a gateway recipient that Postfix routed to the
/// safety net, though it is no gateway address.
pub fn decide_not_a_gateway(shown: &str) -> Decision {
    Decision::new(Disposition::Reject, "not a gateway address").reply(
        "550",
        "5.1.1",
        format!("{shown} is not a gateway address; check transport_maps"),
    )
}

/// `deliver`: what the milter would redirect to the organizer bounces
/// instead (pipe(8) cannot add a recipient), saying where to write.
pub fn decide_write_to_organizer(organizer: &str, reason: &str) -> Decision {
    Decision::new(Disposition::Reject, reason).reply(
        "550",
        "5.7.1",
        format!("This address only takes calendar replies; please write to the organizer at {organizer}"),
    )
}

/// RCPT stage: `imip-milter check`'s probe (`address::CHECK_TOKEN`). The
/// answer tells `check` that Postfix hands gateway recipients to the milter.
pub fn decide_check_probe() -> Decision {
    Decision::new(Disposition::Reject, "imip-milter check's probe").reply(
        "550",
        "5.1.1",
        "This is imip-milter's check address, not a reply address",
    )
}

/// RCPT stage: one client sent too many unknown tokens lately.
pub fn decide_too_many_unknown() -> Decision {
    Decision::new(Disposition::Tempfail, "too many unknown tokens from this client").reply(
        "450",
        "4.7.1",
        "Too many unknown reply addresses from your address; try again later",
    )
}

/// RCPT stage: one client has `max` token lookups in flight already.
/// 451 4.3.0, as for a store that does not answer, not 450 4.7.1: many
/// replies at once from one big mail host look the same, and the store's
/// slowness, not a guess, is why they pile up; it does not count toward
/// the unknown-token limit either.
pub fn decide_too_many_lookups(max: usize) -> Decision {
    Decision::new(
        Disposition::Tempfail,
        format!("{max} token lookups in flight from this client"),
    )
    .reply(
        "451",
        "4.3.0",
        "Too many reply addresses from your address are being looked up; please try again later",
    )
}

/// RCPT stage: the token store could not be read.
pub fn decide_store_failed(error: &str) -> Decision {
    Decision::new(Disposition::Tempfail, format!("token store: {error}")).reply(
        "451",
        "4.3.0",
        "Temporary failure looking up the reply address; please try again later",
    )
}

/// DATA stage: with no gateway recipient left, accept (Postfix stops calling us).
pub fn decide_data(recipients: &[Recipient]) -> Option<Decision> {
    if recipients.iter().any(|r| matches!(r, Recipient::Gateway { .. })) {
        None
    } else {
        Some(Decision::new(Disposition::Accept, "no gateway recipient"))
    }
}

/// Body stage: the message outgrew `max_message_bytes`.
/// `mixed`: other recipients get the message; only the gateway recipients
/// are removed (refusing it would bounce it for everybody).
pub fn decide_too_large(limit: usize, mixed: bool) -> Decision {
    if mixed {
        return Decision::new(
            Disposition::DeleteRecipients,
            format!("message larger than {limit} bytes; gateway recipients removed"),
        );
    }
    Decision::new(Disposition::Reject, format!("message larger than {limit} bytes")).reply(
        "552",
        "5.3.4",
        format!("Message too big for the calendar gateway (limit {limit} bytes)"),
    )
}

/// RCPT: more gateway recipients than `max_gateway_recipients`; the client
/// sends the others in another transaction.
pub fn decide_too_many_recipients(max: usize) -> Decision {
    Decision::new(Disposition::Tempfail, format!("more than {max} gateway recipients")).reply(
        "452",
        "4.5.3",
        "Too many calendar gateway recipients in one message",
    )
}

/// Header or body: the host's budget for buffered message bytes
/// (`max_buffered_bytes`) is spent; the sender tries again later.
pub fn decide_budget_spent() -> Decision {
    Decision::new(Disposition::Tempfail, "max_buffered_bytes spent").reply(
        "451",
        "4.3.2",
        "The calendar gateway is busy; please try again later",
    )
}

/// EOM: `recipients` are those accepted at RCPT.
pub fn decide_message(analysis: &Analysis, recipients: &[Recipient]) -> Decision {
    if let Some(d) = decide_data(recipients) {
        return d;
    }
    let mixed = recipients.iter().any(|r| matches!(r, Recipient::Other));
    match analysis.kind {
        Kind::Reply | Kind::Bounce => {
            let disposition = if mixed {
                Disposition::DeleteRecipients
            } else {
                Disposition::Discard
            };
            Decision {
                spool: true,
                ..Decision::new(disposition, analysis.reason.clone())
            }
        }
        // From the null sender, and nobody needs it: a refusal would only
        // make a double bounce for the postmaster.
        Kind::Report if mixed => Decision::new(Disposition::DeleteRecipients, analysis.reason.clone()),
        Kind::Report => Decision::new(Disposition::Discard, analysis.reason.clone()),
        // Other people receive the message: they keep what the sender wrote,
        // only the gateway copy goes. Rejecting would bounce it for everyone.
        Kind::Other | Kind::Malformed if mixed => Decision::new(Disposition::DeleteRecipients, analysis.reason.clone()),
        Kind::Other => Decision::new(Disposition::Reject, analysis.reason.clone()).reply(
            "550",
            "5.7.1",
            capitalise(&analysis.reason),
        ),
        Kind::Malformed => Decision::new(Disposition::Reject, analysis.reason.clone()).reply(
            "550",
            "5.6.0",
            capitalise(&analysis.reason),
        ),
    }
}

/// EOM, local tokens: what is no reply (a person's text, a COUNTER, a
/// forwarded invitation) goes to the organizer instead, so people still reach
/// people. `organizer` is the token's, as a `mailto:` URI.
pub fn decide_with_organizer(analysis: &Analysis, recipients: &[Recipient], organizer: Option<&str>) -> Decision {
    let d = decide_message(analysis, recipients);
    let address = organizer.and_then(bare_address);
    match (analysis.kind, address) {
        (Kind::Other, Some(a)) if !d.spool && d.disposition != Disposition::Accept => Decision {
            redirect_to: Some(a.to_owned()),
            ..Decision::new(
                Disposition::Redirect,
                format!("{}; redirected to the organizer", analysis.reason),
            )
        },
        _ => d,
    }
}

/// What a local token lets a reply or bounce do (DESIGN §4c): answer for
/// one attendee of one event of one organizer, and nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// The attendee (`mailto:`) the message answers, or bounced, for.
    Answers(String),
    /// The reply is about another event than the token's.
    ForeignUid(String),
    /// The reply answers only for people the token was not given to.
    ForeignAttendee(String),
    /// The bounce does not quote the invitation sent with this token.
    BounceNotBelieved(String),
    /// A bounce on a token shared by several attendees: every one of them
    /// holds what it quotes, so it cannot be tied to the one it names. The
    /// organizer reads it instead.
    SharedBounce(String),
}

/// Binds a reply or bounce to `token`. Pure: the milter, `deliver` and
/// `inspect` judge alike. `envelope_sender`: MAIL FROM, without brackets.
pub fn bind(analysis: &Analysis, token: &TokenRecord, envelope_sender: &str) -> Binding {
    let itip = analysis.itip.as_ref();
    match analysis.kind {
        Kind::Bounce => {
            let quotes_message = analysis
                .returned_message_ids
                .iter()
                .any(|m| token.invitations.iter().any(|i| i == m));
            let quotes_event = itip.is_some_and(|i| !i.uids.is_empty() && i.uids.iter().all(|u| *u == token.uid));
            if !quotes_message && !quotes_event {
                return Binding::BounceNotBelieved(
                    "the delivery report quotes neither the invitation's Message-ID nor its event".into(),
                );
            }
            let failed = analysis.failed_recipient();
            // One attendee: the token is the authority (the report may name
            // an alias). A shared token: any co-invitee could have written
            // "carol's invitation failed", quoting what she holds too.
            if token.attendee.is_empty() {
                return Binding::SharedBounce(format!(
                    "a delivery report for {} on an address shared by several attendees cannot be tied to one of them",
                    failed.as_deref().map(clip).unwrap_or_else(|| "(none)".into())
                ));
            }
            Binding::Answers(token.attendee.clone())
        }
        _ => {
            let Some(itip) = itip else {
                return Binding::ForeignAttendee(String::new());
            };
            if let Some(other) = itip.uids.iter().find(|u| **u != token.uid) {
                return Binding::ForeignUid(clip(other));
            }
            let named = itip.attendees.iter().map(String::as_str);
            let who = match token.attendee.is_empty() {
                false => token.answering(named),
                // A shared token went to several people alike: it answers for
                // the listed attendee who sent the reply (header From or
                // envelope sender), never for another one on the list.
                true => {
                    let senders = [analysis.from.as_deref().unwrap_or(""), envelope_sender];
                    named
                        .filter(|a| {
                            let bare = bare_address(a).unwrap_or(a);
                            senders.iter().any(|s| !s.is_empty() && s.eq_ignore_ascii_case(bare))
                        })
                        .find_map(|a| token.answering([a]))
                }
            };
            match who {
                Some(a) => Binding::Answers(a),
                None => Binding::ForeignAttendee(itip.attendees.first().map(|a| clip(a)).unwrap_or_default()),
            }
        }
    }
}

/// Text from a message, made safe and short for a log line or an SMTP reply.
fn clip(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(80).collect()
}

/// EOM, local tokens: the reply or bounce does not bind to its token.
/// `organizer`: the token's, a `mailto:` URI, for what she reads instead.
pub fn decide_unbound(binding: &Binding, mixed: bool, organizer: Option<&str>) -> Option<Decision> {
    let (reason, text) = match binding {
        Binding::Answers(_) => return None,
        Binding::SharedBounce(why) => match organizer.and_then(bare_address) {
            Some(a) if !mixed => {
                return Some(Decision {
                    redirect_to: Some(a.to_owned()),
                    ..Decision::new(Disposition::Redirect, format!("{why}; redirected to the organizer"))
                })
            }
            _ => (
                why.clone(),
                "The delivery report cannot be tied to one attendee; please write to the organizer",
            ),
        },
        Binding::ForeignUid(uid) => (
            format!("the reply is about event {uid}, not the token's"),
            "The calendar reply is about another event than the invitation this address was given for; \
             please answer the invitation itself with your calendar program",
        ),
        // Refused rather than redirected: the organizer's own calendar
        // program could apply the answer it carries.
        Binding::ForeignAttendee(who) => (
            format!("the reply answers for {who}, not for the attendee the token was given to"),
            "The calendar reply answers for somebody this invitation was not sent to; \
             please answer from the address the invitation went to",
        ),
        Binding::BounceNotBelieved(why) => (
            format!("bounce not believed: {why}"),
            "The delivery report does not quote an invitation sent from here",
        ),
    };
    if mixed {
        return Some(Decision::new(Disposition::DeleteRecipients, reason));
    }
    Some(Decision::new(Disposition::Reject, reason).reply("550", "5.7.1", text))
}

/// A `mailto:` URI's address, when it is one plain address.
pub fn bare_address(uri: &str) -> Option<&str> {
    let a = uri
        .get(..7)
        .filter(|p| p.eq_ignore_ascii_case("mailto:"))
        .and_then(|_| uri.get(7..))?;
    (a.contains('@') && !a.contains(['<', '>', ',', ' ']) && !a.chars().any(char::is_control)).then_some(a)
}

/// EOM: `[policy] sender` does not let this reply through.
pub fn decide_policy_refused(why: &str, mixed: bool) -> Decision {
    let reason = format!("sender policy: {why}");
    if mixed {
        return Decision::new(Disposition::DeleteRecipients, reason);
    }
    Decision::new(Disposition::Reject, reason).reply(
        "550",
        "5.7.1",
        "The calendar reply could not be verified as coming from the invited attendee; \
         please answer from the address the invitation went to",
    )
}

/// EOM, local tokens: the reply cannot be made into one attendee's answer.
pub fn decide_unreadable(why: &str, mixed: bool) -> Decision {
    let reason = format!("calendar data not handed on: {why}");
    if mixed {
        return Decision::new(Disposition::DeleteRecipients, reason);
    }
    Decision::new(Disposition::Reject, reason).reply(
        "550",
        "5.6.0",
        format!("The calendar reply cannot be read: {why}"),
    )
}

/// Any stage: a bug in a per-message step (a caught panic).
pub fn decide_internal_error(stage: &str) -> Decision {
    Decision::new(Disposition::Tempfail, format!("internal error at {stage}")).reply(
        "451",
        "4.3.0",
        "Temporary failure in the calendar gateway; please try again later",
    )
}

/// EOM: the spool could not store the reply durably.
pub fn decide_spool_failed(error: &str) -> Decision {
    Decision::new(Disposition::Tempfail, format!("spool write failed: {error}")).reply(
        "451",
        "4.3.0",
        "Temporary failure storing the calendar reply; please try again later",
    )
}

/// `deliver` in observe mode: the message stays in Postfix's queue (while
/// observing, the gateway address goes to its mailbox, not to the
/// imip-milter transport).
pub fn decide_observing_deliver() -> Decision {
    Decision::new(
        Disposition::Tempfail,
        "mode = \"observe\": deliver takes nothing; route the gateway address to its mailbox while observing",
    )
    .reply(
        "451",
        "4.3.0",
        "imip-milter is in observe mode and takes no message; please try again later",
    )
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::analyse;

    fn reply(from: &str, components: &str) -> Analysis {
        analyse(
            format!(
                "From: <{from}>\r\nContent-Type: text/calendar; method=REPLY\r\n\r\nBEGIN:VCALENDAR\r\nMETHOD:REPLY\r\n{components}END:VCALENDAR\r\n"
            )
            .as_bytes(),
        )
    }

    fn answer(uid_lines: &str, who: &str) -> String {
        format!("BEGIN:VEVENT\r\n{uid_lines}ATTENDEE;PARTSTAT=ACCEPTED:mailto:{who}\r\nEND:VEVENT\r\n")
    }

    fn token(attendee: &str, attendees: &[&str]) -> TokenRecord {
        TokenRecord {
            token: "t".repeat(36),
            organizer: "mailto:alice@example.org".into(),
            attendee: attendee.into(),
            uid: "ev-1".into(),
            created_ms: 0,
            last_used_ms: 0,
            attendees: attendees.iter().map(|a| (*a).to_owned()).collect(),
            invitations: Vec::new(),
        }
    }

    #[test]
    fn a_token_binds_its_attendee_and_its_event() {
        let bob = token("mailto:bob@example.com", &[]);
        let ok = reply("bob@example.com", &answer("UID:ev-1\r\n", "Bob@example.com"));
        assert_eq!(bind(&ok, &bob, ""), Binding::Answers("mailto:bob@example.com".into()));
        let dana = reply("dana@example.com", &answer("UID:ev-1\r\n", "dana@example.com"));
        assert!(matches!(bind(&dana, &bob, ""), Binding::ForeignAttendee(_)));
        let other = reply("bob@example.com", &answer("UID:ev-2\r\n", "bob@example.com"));
        assert!(matches!(bind(&other, &bob, ""), Binding::ForeignUid(_)));
        // A second UID line, or a second component about another event.
        let two = reply(
            "bob@example.com",
            &answer("UID:ev-1\r\nUID:ev-2\r\n", "bob@example.com"),
        );
        assert!(matches!(bind(&two, &bob, ""), Binding::ForeignUid(_)), "{:?}", two.itip);
        let mixed = reply(
            "bob@example.com",
            &format!(
                "{}{}",
                answer("UID:ev-1\r\n", "bob@example.com"),
                answer("UID:ev-2\r\n", "bob@example.com")
            ),
        );
        assert!(matches!(bind(&mixed, &bob, ""), Binding::ForeignUid(_)));
    }

    #[test]
    fn a_shared_token_answers_for_the_listed_attendee_who_sent_the_reply() {
        let shared = token("", &["mailto:bob@example.com", "mailto:carol@example.com"]);
        // Carol sends an answer for Bob (listed first) and for herself.
        let both = format!(
            "{}{}",
            answer("UID:ev-1\r\n", "bob@example.com"),
            answer("UID:ev-1\r\n", "carol@example.com")
        );
        let from_carol = reply("carol@example.com", &both);
        assert_eq!(
            bind(&from_carol, &shared, ""),
            Binding::Answers("mailto:carol@example.com".into())
        );
        // Only Bob's answer, from Carol: nobody's.
        let for_bob = reply("carol@example.com", &answer("UID:ev-1\r\n", "bob@example.com"));
        assert!(matches!(
            bind(&for_bob, &shared, "carol@example.com"),
            Binding::ForeignAttendee(_)
        ));
        // The envelope sender counts as well (a From rewritten by a list).
        let via_list = reply("list@lists.example", &answer("UID:ev-1\r\n", "bob@example.com"));
        assert_eq!(
            bind(&via_list, &shared, "Bob@example.com"),
            Binding::Answers("mailto:bob@example.com".into())
        );
    }

    #[test]
    fn unbound_messages_are_refused_with_a_sentence() {
        let d = decide_unbound(&Binding::ForeignUid("ev-2".into()), false, None).unwrap();
        assert_eq!(d.smtp_reply.map(|r| r.enhanced), Some("5.7.1"));
        let d = decide_unbound(&Binding::ForeignAttendee("mailto:dana@example.com".into()), true, None).unwrap();
        assert_eq!(d.disposition, Disposition::DeleteRecipients);
        assert!(decide_unbound(&Binding::Answers("mailto:bob@example.com".into()), false, None).is_none());
    }
}
