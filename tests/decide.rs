//! analyse → decide on one fixture per real-world client shape, and on
//! hostile input. Pure code: no sockets, no disk.

use imip_milter::{
    address::{BaseAddress, GatewayAddresses, Recipient},
    analysis::{analyse, Analysis, Kind},
    decision::{decide_message, decide_recipient, Disposition},
};

const TOKEN: &str = "8e3c0d1a-5b7e-4f61-9a0c-2d4f3b6a7c81";

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn gateway_only() -> Vec<Recipient> {
    vec![Recipient::Gateway { token: TOKEN.into() }]
}

fn mixed() -> Vec<Recipient> {
    vec![Recipient::Other, Recipient::Gateway { token: TOKEN.into() }]
}

fn reply(name: &str) -> Analysis {
    let a = analyse(&fixture(name));
    assert_eq!(a.kind, Kind::Reply, "{name}: {}", a.reason);
    let d = decide_message(&a, &gateway_only());
    assert_eq!(d.disposition, Disposition::Discard, "{name}");
    assert!(d.spool, "{name}: a reply is spooled before it is discarded");
    assert_eq!(d.smtp_reply, None);
    a
}

fn itip(a: &Analysis) -> &imip_milter::itip::Itip {
    a.itip.as_ref().expect("iTIP facts")
}

#[test]
fn apple_reply() {
    let a = reply("apple.eml");
    let i = itip(&a);
    assert_eq!(i.uid.as_deref(), Some("2E1F6A8C-4B1D-4C2E-9F3A-1B2C3D4E5F60"));
    assert_eq!(i.attendee.as_deref(), Some("mailto:bob@example.com"));
    assert_eq!(i.partstat.as_deref(), Some("ACCEPTED"));
    assert_eq!(a.message_id.as_deref(), Some("<6F1D2C3B-APPLE-0001@example.com>"));
    assert_eq!(a.from.as_deref(), Some("bob@example.com"));
    // decoded, as received: quoted parameters and UTF-8 intact
    let cal = a.icalendar.as_deref().unwrap();
    assert!(cal.contains("CN=\"Doe, Alice\""), "{cal}");
    assert!(cal.contains("SUMMARY:Planung Zürich"), "{cal}");
}

#[test]
fn thunderbird_reply() {
    let a = reply("thunderbird.eml");
    let i = itip(&a);
    assert_eq!(i.attendee.as_deref(), Some("mailto:chloe@example.net"));
    assert_eq!(i.partstat.as_deref(), Some("TENTATIVE"));
    assert!(a.icalendar.as_deref().unwrap().contains("CN=Chloé Martin"));
}

#[test]
fn google_reply_with_override() {
    let a = reply("google.eml");
    let i = itip(&a);
    assert_eq!(i.uid.as_deref(), Some("5c2d8e7f-weekly-sync@example.org"));
    assert_eq!(i.attendee.as_deref(), Some("mailto:dana.k@gmail.com"));
    assert_eq!(i.partstat.as_deref(), Some("ACCEPTED"));
    assert_eq!(i.components, 2, "master and the declined override");
    let cal = a.icalendar.as_deref().unwrap();
    assert!(cal.contains("RECURRENCE-ID:20261214T090000Z"));
    assert!(cal.contains("PARTSTAT=DECLINED"));
    assert!(cal.contains("X-RESPONSE-COMMENT=\"Yes, I'll be there: see you"));
}

#[test]
fn outlook_reply_without_organizer() {
    let a = reply("outlook.eml");
    let i = itip(&a);
    assert_eq!(i.organizer, None);
    assert_eq!(i.attendee.as_deref(), Some("mailto:Erik.Jansen@contoso.example"));
    assert_eq!(i.partstat.as_deref(), Some("DECLINED"));
    assert!(a
        .icalendar
        .as_deref()
        .unwrap()
        .contains("X-MICROSOFT-CDO-BUSYSTATUS:BUSY"));
}

#[test]
fn groupware_latin1_quoted_printable_lowercase_method() {
    let a = reply("groupware-latin1.eml");
    let i = itip(&a);
    assert_eq!(i.method.as_deref(), Some("REPLY"));
    assert_eq!(i.partstat.as_deref(), Some("ACCEPTED"));
    assert_eq!(i.attendee.as_deref(), Some("mailto:juergen@groupware.example.de"));
    let cal = a.icalendar.as_deref().unwrap();
    assert!(cal.contains("Straßenbau in München"), "{cal}");
    assert!(cal.contains("CN=Jürgen Weiß"), "{cal}");
}

#[test]
fn reply_all_with_other_recipients_deletes_only_the_gateway() {
    let a = analyse(&fixture("reply-all.eml"));
    assert_eq!(a.kind, Kind::Reply);
    let d = decide_message(&a, &mixed());
    assert_eq!(d.disposition, Disposition::DeleteRecipients);
    assert!(d.spool);
}

#[test]
fn bounce_carries_the_invitation_and_the_status() {
    let a = analyse(&fixture("bounce.eml"));
    assert_eq!(a.kind, Kind::Bounce, "{}", a.reason);
    let b = a.bounce.as_ref().unwrap();
    assert_eq!(b.action, "failed");
    assert_eq!(b.status.as_deref(), Some("5.1.1"));
    assert_eq!(b.final_recipient.as_deref(), Some("nobody@gone.example"));
    assert_eq!(b.diagnostic.as_deref(), Some("unknown user: \"nobody\""));
    assert_eq!(itip(&a).method.as_deref(), Some("REQUEST"));
    assert_eq!(itip(&a).uid.as_deref(), Some("invite-bounce-77@example.org"));
    let d = decide_message(&a, &gateway_only());
    assert_eq!(d.disposition, Disposition::Discard);
    assert!(d.spool);
}

#[test]
fn reports_that_need_no_answer_are_taken_quietly() {
    for action in ["delayed", "relayed", "delivered", "expanded"] {
        let raw = String::from_utf8(fixture("dsn-delayed.eml"))
            .unwrap()
            .replace("Action: delayed", &format!("Action: {action}"));
        let a = analyse(raw.as_bytes());
        assert_eq!(a.kind, Kind::Report, "{action}: {}", a.reason);
        let d = decide_message(&a, &gateway_only());
        assert_eq!(d.disposition, Disposition::Discard, "{action}");
        assert!(!d.spool && d.smtp_reply.is_none(), "{action}");
        let d = decide_message(&a, &mixed());
        assert_eq!(d.disposition, Disposition::DeleteRecipients, "{action}");
    }
}

#[test]
fn back_to_back_report_groups_find_the_failed_recipient() {
    let a = analyse(&fixture("dsn-back-to-back.eml"));
    assert_eq!(a.kind, Kind::Bounce, "{}", a.reason);
    assert_eq!(a.failed_recipient().as_deref(), Some("mailto:carol@example.net"));
    assert_eq!(a.bounce.as_ref().unwrap().status.as_deref(), Some("5.2.1"));
    assert_eq!(a.answer(), (Some("mailto:carol@example.net".into()), None));
}

#[test]
fn a_bounce_answers_for_the_failed_recipient_not_the_first_attendee() {
    let a = analyse(&fixture("bounce-organizer-first.eml"));
    assert_eq!(a.kind, Kind::Bounce, "{}", a.reason);
    assert_eq!(itip(&a).attendee.as_deref(), Some("mailto:alice@example.org"));
    assert_eq!(a.answer(), (Some("mailto:dave@example.net".into()), None));
}

#[test]
fn a_reply_naming_no_attendee_answers_for_nobody() {
    let a = analyse(&fixture("reply-without-attendee.eml"));
    assert_eq!(a.kind, Kind::Other, "{}", a.reason);
    let d = decide_message(&a, &gateway_only());
    assert_eq!(d.disposition, Disposition::Reject);
    assert!(d.smtp_reply.unwrap().to_string().starts_with("550 5.7.1 "));
    let d = imip_milter::decision::decide_with_organizer(&a, &gateway_only(), Some("mailto:alice@example.org"));
    assert_eq!(d.disposition, Disposition::Redirect);
    assert_eq!(d.redirect_to.as_deref(), Some("alice@example.org"));
}

#[test]
fn counter_and_refresh_travel_as_replies_declinecounter_does_not() {
    for (eml, method) in [("counter.eml", "COUNTER"), ("refresh.eml", "REFRESH")] {
        let a = analyse(&fixture(eml));
        assert_eq!(a.kind, Kind::Reply, "{eml}: {}", a.reason);
        assert_eq!(itip(&a).method.as_deref(), Some(method));
        assert!(decide_message(&a, &gateway_only()).spool);
    }
    let raw = String::from_utf8(fixture("counter.eml"))
        .unwrap()
        .replace("COUNTER", "DECLINECOUNTER");
    // The organizer's answer to a COUNTER, sent to an attendee: no answer here.
    assert_eq!(analyse(raw.as_bytes()).kind, Kind::Other);
}

fn refused(name: &str, code: &str) -> String {
    let a = analyse(&fixture(name));
    let d = decide_message(&a, &gateway_only());
    assert_eq!(d.disposition, Disposition::Reject, "{name}: {}", a.reason);
    assert!(!d.spool);
    let reply = d.smtp_reply.expect("a reject carries an SMTP reply").to_string();
    assert!(reply.starts_with(code), "{name}: {reply}");
    reply
}

#[test]
fn human_text_gets_a_readable_refusal() {
    let r = refused("human-text.eml", "550 5.7.1");
    assert!(r.contains("no calendar data") && r.contains("organizer"), "{r}");
}

#[test]
fn forwarded_invitation_is_refused() {
    let r = refused("forwarded-request.eml", "550 5.7.1");
    assert!(r.contains("METHOD:REQUEST"), "{r}");
}

#[test]
fn tnef_only_is_refused() {
    let r = refused("outlook-tnef.eml", "550 5.7.1");
    assert!(r.contains("TNEF"), "{r}");
}

#[test]
fn truncated_calendar_is_unreadable() {
    let r = refused("truncated.eml", "550 5.6.0");
    assert!(r.contains("truncated"), "{r}");
}

#[test]
fn human_text_to_mixed_recipients_reaches_the_others() {
    let a = analyse(&fixture("human-text.eml"));
    let d = decide_message(&a, &mixed());
    assert_eq!(d.disposition, Disposition::DeleteRecipients);
    assert!(!d.spool);
}

#[test]
fn no_gateway_recipient_is_accepted() {
    let a = analyse(&fixture("human-text.eml"));
    let d = decide_message(&a, &[Recipient::Other]);
    assert_eq!(d.disposition, Disposition::Accept);
}

#[test]
fn recipient_stage() {
    let gw = GatewayAddresses::new(vec![BaseAddress::parse("calendar@example.org").unwrap()], "+");
    let bare = decide_recipient(&gw.classify("<calendar@example.org>")).unwrap();
    assert_eq!(bare.smtp_reply.unwrap().to_string()[..9], *"550 5.1.1");
    let bad = decide_recipient(&gw.classify("<calendar+x@example.org>")).unwrap();
    assert_eq!(bad.disposition, Disposition::Reject);
    assert!(decide_recipient(&gw.classify(&format!("<calendar+{TOKEN}@example.org>"))).is_none());
    assert!(decide_recipient(&gw.classify("<alice@example.org>")).is_none());
}

// Hostile input: every case ends in a decision, none panics.

fn decides(raw: &[u8]) -> (Analysis, Disposition) {
    let a = analyse(raw);
    let d = decide_message(&a, &gateway_only());
    (a, d.disposition)
}

#[test]
fn nested_multipart_300_levels() {
    let mut raw = String::from("From: x@example.com\r\nMessage-ID: <deep@x>\r\nMIME-Version: 1.0\r\n");
    for i in 0..300 {
        raw.push_str(&format!(
            "Content-Type: multipart/mixed; boundary=\"b{i}\"\r\n\r\n--b{i}\r\n"
        ));
    }
    raw.push_str("Content-Type: text/calendar; method=REPLY\r\n\r\nBEGIN:VCALENDAR\r\nMETHOD:REPLY\r\n");
    for i in (0..300).rev() {
        raw.push_str(&format!("\r\n--b{i}--\r\n"));
    }
    let (a, d) = decides(raw.as_bytes());
    assert_eq!(d, Disposition::Reject, "{}", a.reason);
}

#[test]
fn eight_bit_garbage() {
    let mut raw = b"From: x@example.com\r\nContent-Type: text/calendar; method=REPLY\r\n\r\n".to_vec();
    raw.extend((0..20_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
    let (a, d) = decides(&raw);
    assert_eq!(a.kind, Kind::Malformed, "{}", a.reason);
    assert_eq!(d, Disposition::Reject);
    // no header at all
    let (_, d) = decides(&[0xff; 4096]);
    assert_eq!(d, Disposition::Reject);
    let (_, d) = decides(b"");
    assert_eq!(d, Disposition::Reject);
}

#[test]
fn huge_lines() {
    let long = "A".repeat(2_000_000);
    let raw = format!(
        "From: x@example.com\r\nSubject: {long}\r\nContent-Type: text/calendar; method=REPLY\r\n\r\nBEGIN:VCALENDAR\r\nMETHOD:REPLY\r\nBEGIN:VEVENT\r\nUID:{long}\r\nATTENDEE;PARTSTAT=ACCEPTED:mailto:b@example.com\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
    );
    let (a, d) = decides(raw.as_bytes());
    // A long UID is still a reply; the point is a decision without a panic.
    assert!(matches!(d, Disposition::Discard | Disposition::Reject), "{}", a.reason);
}

#[test]
fn many_parts_are_bounded() {
    let mut raw = String::from("From: x@example.com\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n");
    for _ in 0..5000 {
        raw.push_str("--b\r\nContent-Type: text/plain\r\n\r\nx\r\n");
    }
    raw.push_str("--b--\r\n");
    let (a, d) = decides(raw.as_bytes());
    assert_eq!(d, Disposition::Reject);
    assert!(a.reason.contains("MIME parts"), "{}", a.reason);
}

#[test]
fn input_that_trips_a_parser_assertion_is_refused() {
    // Found by fuzz/run analyse: mail-parser 0.11.9 hits a debug_assert on it.
    let raw = fixture("hostile/mail-parser-debug-assert.eml");
    let (a, d) = decides(&raw);
    assert!(matches!(d, Disposition::Reject | Disposition::Discard), "{}", a.reason);
}

/// Delivery reports as the world writes them (tests/fixtures/bounces/): a
/// report nested in multipart/mixed (Lotus Domino), message/global (Exim,
/// SMTPUTF8), an empty delivery-status with X-Failed-Recipients (Google
/// Workspace), and text-only notices (qmail, older Gmail, Zoho) are read as
/// the bounce of the invitation they return, naming the failed recipient.
#[test]
fn bounces_as_the_world_writes_them() {
    for (name, loose) in [
        ("bounces/domino-nested.eml", false),
        ("bounces/exim-global.eml", false),
        ("bounces/google-empty-status.eml", true),
        ("bounces/qmail-text.eml", true),
        ("bounces/gmail-text.eml", true),
        ("bounces/zoho-mixed.eml", true),
    ] {
        let a = analyse(&fixture(name));
        assert_eq!(a.kind, Kind::Bounce, "{name}: {}", a.reason);
        assert_eq!(a.loose_report, loose, "{name}");
        assert_eq!(
            a.failed_recipient().as_deref(),
            Some("mailto:bob@example.com"),
            "{name}"
        );
        assert!(
            a.returned_message_ids
                .iter()
                .any(|m| m == "<planning-invite@example.org>"),
            "{name}: {:?}",
            a.returned_message_ids
        );
        assert_eq!(itip(&a).uid.as_deref(), Some("planning-2026@example.org"), "{name}");
        let d = decide_message(&a, &gateway_only());
        assert_eq!(d.disposition, Disposition::Discard, "{name}");
        assert!(d.spool, "{name}");
    }
    // A person's message that merely mentions an address is no report.
    let person = b"From: Bob <bob@example.com>\r\nSubject: hello\r\n\r\nDelivery to the following recipient failed permanently:\r\n\r\n  carol@example.net\r\n";
    assert_eq!(analyse(person).kind, Kind::Other);
}
