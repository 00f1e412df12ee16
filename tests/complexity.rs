//! Every step that reads outside input costs time proportional to it: each
//! test builds a hostile input at size n and 8n and fails when the time
//! grows more than 16× (a quadratic step grows 64×; 12× was seen once for a
//! linear step on a loaded machine, ×7–8 alone). Inputs are built
//! outside the timing; each size runs three times and the fastest counts.

use imip_milter::{itip, message, outbound, schedule, targets::dav_xml};
use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// One measurement at a time: tests of this file run in parallel threads.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Below this at 8n the step is too fast to judge on a shared machine.
const FLOOR: Duration = Duration::from_millis(25);

fn linear<T>(what: &str, n: usize, build: impl Fn(usize) -> T, run: impl Fn(&T)) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let time = |size: usize| {
        let input = build(size);
        (0..3)
            .map(|_| {
                let t = Instant::now();
                run(&input);
                t.elapsed()
            })
            .min()
            .unwrap_or_default()
    };
    let small = time(n);
    let large = time(8 * n);
    let ratio = large.as_secs_f64() / small.max(FLOOR / 8).as_secs_f64();
    eprintln!("{what}: n={n} {small:?}, 8n {large:?}, ×{ratio:.1}");
    assert!(
        large < FLOOR || ratio <= 16.0,
        "{what}: {small:?} at n={n}, {large:?} at 8n: ×{ratio:.1}, more than linear"
    );
}

fn calendar(components: &str) -> String {
    format!("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//T//EN\r\nMETHOD:REPLY\r\n{components}END:VCALENDAR\r\n")
}

fn attendees(n: usize) -> String {
    (0..n)
        .map(|i| format!("ATTENDEE;PARTSTAT=ACCEPTED:mailto:guest{i}@example.net\r\n"))
        .collect()
}

const BOB: &str = "BEGIN:VEVENT\r\nUID:u-1\r\nDTSTAMP:20261120T100000Z\r\nATTENDEE;PARTSTAT=ACCEPTED:mailto:bob@example.com\r\nEND:VEVENT\r\n";

#[test]
fn reading_a_reply_with_many_attendees_is_linear() {
    linear(
        "itip::read",
        2_000,
        |n| calendar(&format!("BEGIN:VEVENT\r\nUID:u-1\r\n{}END:VEVENT\r\n", attendees(n))),
        |text| {
            let i = itip::read(text, None).unwrap();
            assert!(i.most_attendees > 0);
        },
    );
}

#[test]
fn reading_a_reply_with_many_uids_is_linear() {
    linear(
        "itip::read uids",
        500,
        |n| {
            calendar(
                &(0..n)
                    .map(|i| format!("BEGIN:VEVENT\r\nUID:u-{i}\r\nATTENDEE:mailto:b@example.com\r\nEND:VEVENT\r\n"))
                    .collect::<String>(),
            )
        },
        |text| assert!(itip::read(text, None).is_ok()),
    )
}

#[test]
fn rewriting_a_reply_that_drops_many_attendees_is_linear() {
    // Bob's answer, then the same event listing everybody else: dropped.
    linear(
        "itip::rewrite_reply",
        2_000,
        |n| {
            calendar(&format!(
                "{BOB}BEGIN:VEVENT\r\nUID:u-1\r\n{}END:VEVENT\r\n",
                attendees(n)
            ))
        },
        |text| {
            let r = itip::rewrite_reply(text, "mailto:alice@example.org", "mailto:bob@example.com").unwrap();
            assert!(!r.dropped.is_empty());
        },
    );
}

#[test]
fn walking_a_message_with_many_parts_is_linear() {
    linear(
        "message::read",
        100,
        |n| {
            let mut m = String::from(
                "From: bob@example.com\r\nMessage-ID: <m@example.com>\r\nMIME-Version: 1.0\r\n\
                 Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n",
            );
            for i in 0..n {
                m.push_str(&format!(
                    "--b\r\nContent-Type: text/plain\r\n\r\npart {i}\r\n{}\r\n",
                    "text ".repeat(1000)
                ));
            }
            m.push_str("--b--\r\n");
            m.into_bytes()
        },
        |raw| assert!(message::read(raw).is_ok()),
    );
}

#[test]
fn reading_a_delivery_status_with_many_groups_is_linear() {
    linear(
        "message::parse_delivery_status",
        200,
        |n| {
            (0..n)
                .map(|i| {
                    format!(
                        "Final-Recipient: rfc822; r{i}@example.net\r\nAction: delayed\r\nStatus: 4.4.1\r\n\
                         Diagnostic-Code: smtp; 451 later\r\n more text\r\n\r\n"
                    )
                })
                .collect::<String>()
        },
        |body| assert!(message::parse_delivery_status(body).is_some()),
    );
}

#[test]
fn rewriting_an_invitations_organizer_is_linear() {
    linear(
        "outbound::rewrite_organizer",
        2_000,
        |n| {
            calendar(
                &(0..n)
                    .map(|_| "ORGANIZER;CN=\"Doe, Alice\":mailto:alice@example.org\r\n ;folded\r\n")
                    .collect::<String>(),
            )
        },
        |text| {
            let out = outbound::rewrite_organizer(text, "mailto:calendar+t@example.org", "alice@example.org");
            assert!(out.len() > text.len());
        },
    );
}

/// A stored daily event with `n` overrides and a reply answering each.
fn event_with_overrides(n: usize) -> (String, String) {
    let mut stored = String::from(
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//T//EN\r\nBEGIN:VEVENT\r\nUID:u-1\r\nDTSTAMP:20261101T000000Z\r\n\
         DTSTART:20270101T090000Z\r\nDTEND:20270101T100000Z\r\nRRULE:FREQ=DAILY\r\nSUMMARY:Daily\r\n\
         ORGANIZER:mailto:alice@example.org\r\nATTENDEE;PARTSTAT=NEEDS-ACTION:mailto:bob@example.com\r\nEND:VEVENT\r\n",
    );
    let mut reply = String::new();
    for i in 0..n {
        let day = chrono::NaiveDate::from_ymd_opt(2027, 1, 1).unwrap() + chrono::Days::new(i as u64);
        let rid = format!("RECURRENCE-ID:{}T090000Z\r\n", day.format("%Y%m%d"));
        stored.push_str(&format!(
            "BEGIN:VEVENT\r\nUID:u-1\r\n{rid}DTSTAMP:20261101T000000Z\r\nDTSTART:{}T090000Z\r\n\
             ORGANIZER:mailto:alice@example.org\r\nATTENDEE;PARTSTAT=NEEDS-ACTION:mailto:bob@example.com\r\nEND:VEVENT\r\n",
            day.format("%Y%m%d")
        ));
        reply.push_str(&format!(
            "BEGIN:VEVENT\r\nUID:u-1\r\n{rid}DTSTAMP:20261120T100000Z\r\nATTENDEE;PARTSTAT=ACCEPTED:mailto:bob@example.com\r\nEND:VEVENT\r\n"
        ));
    }
    stored.push_str("END:VCALENDAR\r\n");
    (stored, calendar(&reply))
}

#[test]
fn applying_a_reply_to_many_overrides_is_linear() {
    linear("schedule::apply_reply", 100, event_with_overrides, |(stored, reply)| {
        let growth = schedule::Growth::for_object(stored.len(), 100_000, 1 << 30);
        let applied = schedule::apply_reply(
            stored,
            reply,
            "mailto:bob@example.com",
            schedule::Crashers::Refuse,
            growth,
        );
        assert!(matches!(applied, Ok(schedule::Applied::Changed(_))), "{applied:?}");
    });
}

#[test]
fn reading_a_multistatus_with_many_responses_is_linear() {
    linear(
        "dav_xml::multistatus",
        500,
        |n| {
            let mut xml = String::from(
                "<?xml version=\"1.0\"?><d:multistatus xmlns:d=\"DAV:\" xmlns:c=\"urn:ietf:params:xml:ns:caldav\">",
            );
            for i in 0..n {
                xml.push_str(&format!(
                    "<d:response><d:href>/cal/{i}.ics</d:href><d:propstat><d:prop><d:getetag>\"{i}\"</d:getetag>\
                     <d:resourcetype><d:collection/><c:calendar/></d:resourcetype>\
                     <d:current-user-privilege-set><d:privilege><d:read/></d:privilege><d:privilege><d:write/></d:privilege></d:current-user-privilege-set>\
                     <c:calendar-data>BEGIN:VCALENDAR&#13;\nEND:VCALENDAR</c:calendar-data>\
                     </d:prop><d:status>HTTP/1.1 200 OK</d:status></d:propstat></d:response>"
                ));
            }
            xml.push_str("</d:multistatus>");
            xml
        },
        |xml| assert!(dav_xml::multistatus(xml).is_ok_and(|r| !r.is_empty())),
    );
}

#[test]
fn reading_a_schedule_response_is_linear() {
    linear(
        "dav_xml::request_status",
        2_000,
        |n| {
            let mut xml =
                String::from("<C:schedule-response xmlns:D=\"DAV:\" xmlns:C=\"urn:ietf:params:xml:ns:caldav\">");
            for i in 0..n {
                xml.push_str(&format!(
                    "<C:response><C:recipient><D:href>mailto:r{i}@example.org</D:href></C:recipient></C:response>"
                ));
            }
            xml.push_str(
                "<C:response><C:request-status>2.0;Success</C:request-status></C:response></C:schedule-response>",
            );
            xml
        },
        |xml| assert_eq!(dav_xml::request_status(xml).as_deref(), Some("2.0;Success")),
    );
}

/// Messages handled in place (up to `intake::IN_PLACE`, 16 KiB) built to be
/// slow: analysis and, for a reply, the rewrite for the token's attendee, as
/// the session thread runs them. A figure for bench/README.md, not a test:
///     cargo test --release --test complexity -- --ignored --nocapture in_place
#[test]
#[ignore]
fn in_place_worst_cases() {
    use imip_milter::{analysis, intake::IN_PLACE};
    let fill = |head: &str, unit: &dyn Fn(usize) -> String, tail: &str| {
        let mut s = head.to_owned();
        let mut i = 0;
        while s.len() + unit(i).len() + tail.len() < IN_PLACE - 200 {
            s.push_str(&unit(i));
            i += 1;
        }
        s.push_str(tail);
        s
    };
    let vcal = "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//x//EN\r\nMETHOD:REPLY\r\n";
    let shapes: Vec<(&str, String)> = vec![
        (
            "empty components",
            fill(
                vcal,
                &|i| format!("BEGIN:VEVENT\r\nUID:u-{i}\r\nEND:VEVENT\r\n"),
                "END:VCALENDAR\r\n",
            ),
        ),
        (
            "one ATTENDEE with 1,000s of parameters",
            fill(
                &format!("{vcal}BEGIN:VEVENT\r\nUID:u-1\r\nATTENDEE"),
                &|i| format!(";X-P{i}=v"),
                ":mailto:bob@example.com\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n",
            ),
        ),
        (
            "Bob's answer and an event listing others (rewrite drops them)",
            fill(
                &format!("{vcal}{BOB}BEGIN:VEVENT\r\nUID:u-1\r\n"),
                &|i| format!("ATTENDEE:mailto:g{i}@example.net\r\n"),
                "END:VEVENT\r\nEND:VCALENDAR\r\n",
            ),
        ),
        (
            "Bob's answer in many overrides",
            fill(
                vcal,
                &|i| {
                    format!("BEGIN:VEVENT\r\nUID:u-1\r\nRECURRENCE-ID:2027{:02}{:02}T090000Z\r\nATTENDEE;PARTSTAT=DECLINED:mailto:bob@example.com\r\nEND:VEVENT\r\n", i % 12 + 1, i % 28 + 1)
                },
                "END:VCALENDAR\r\n",
            ),
        ),
        (
            "folded lines of one character",
            fill(
                &format!(
                    "{vcal}BEGIN:VEVENT\r\nUID:u-1\r\nATTENDEE;PARTSTAT=ACCEPTED:mailto:bob@example.com\r\nCOMMENT:x"
                ),
                &|_| "\r\n y".to_owned(),
                "\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n",
            ),
        ),
    ];
    for (what, ics) in shapes {
        let raw = format!("From: <bob@example.com>\r\nMessage-ID: <w@example.com>\r\nContent-Type: text/calendar; method=REPLY\r\n\r\n{ics}");
        assert!(raw.len() <= IN_PLACE);
        let best = (0..20)
            .map(|_| {
                let t = Instant::now();
                let a = analysis::analyse_bounded(raw.as_bytes(), analysis::Limits::default());
                if let (analysis::Kind::Reply, Some(cal)) = (a.kind, &a.icalendar) {
                    if let Ok(r) = itip::rewrite_reply(cal, "mailto:alice@example.org", "mailto:bob@example.com") {
                        let _ = itip::read(&r.text, None);
                    }
                }
                t.elapsed()
            })
            .min()
            .unwrap_or_default();
        println!("| {what} | {} B | {} µs |", raw.len(), best.as_micros());
    }
}
