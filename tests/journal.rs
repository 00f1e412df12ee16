//! `imip-milter journal` answers "what happened to this reply?": through a
//! private Postfix, a reply taken and delivered, a person's text sent on to
//! the organizer, a reply about another event refused, and a reply to an
//! unknown token refused at RCPT, each found by address, queue id and
//! Message-ID with its disposition and SMTP answer.

mod common;

use common::{postfix::Postfix, smtp_send, wait_until, Daemon, Webhook};
use std::time::Duration;

fn reply(gateway: &str, uid: &str, message_id: &str) -> Vec<u8> {
    format!("From: Bob <bob@example.com>\r\nTo: {gateway}\r\nSubject: Accepted\r\nMessage-ID: <{message_id}>\r\nMIME-Version: 1.0\r\nContent-Type: text/calendar; charset=utf-8; method=REPLY\r\n\r\nBEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Attendee//EN\r\nMETHOD:REPLY\r\nBEGIN:VEVENT\r\nUID:{uid}\r\nDTSTAMP:20261121T100000Z\r\nORGANIZER:{gateway}\r\nATTENDEE;PARTSTAT=ACCEPTED:mailto:bob@example.com\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n").into_bytes()
}

fn journal(config: &std::path::Path, args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["journal", "--json"];
    all.extend_from_slice(args);
    let out = common::cli(config, &all);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The queue id in Postfix's "250 2.0.0 Ok: queued as ID".
fn queued_as(answer: &str) -> String {
    answer.rsplit(' ').next().unwrap_or("").trim().to_owned()
}

#[test]
fn what_happened_to_each_message_is_in_the_journal() {
    let hook = Webhook::start();
    let dir = tempfile::tempdir().unwrap();
    let milter = Daemon::start_edited(dir.path(), &hook.url(), None, |c| {
        format!("{c}\n[tokens]\nmode = \"local\"\n")
    });
    let config = dir.path().join("imip-milter.toml");
    let token = common::add_token(&config, "alice@example.org", "bob@example.com", "journal-1@example.org");
    let postfix = Postfix::start(&format!(
        "{{ inet:127.0.0.1:{}, default_action=tempfail, command_timeout=10s }}",
        milter.port
    ));
    let diag = || format!("--- maillog\n{}\n--- milter\n{}", postfix.log(), milter.log());
    let gateway = format!("calendar+{token}@example.org");

    // Taken and delivered.
    let out = smtp_send(
        postfix.port,
        "bob@example.com",
        &[&gateway],
        &reply(&gateway, "journal-1@example.org", "taken@example.com"),
    );
    let data = out.data.clone().unwrap_or_default();
    assert!(data.starts_with("250"), "{out:?}\n{}", diag());
    let taken_queue_id = queued_as(&data);
    hook.wait_for(1, Duration::from_secs(10));
    // A person's words: sent on to the organizer.
    let text = format!("From: Bob <bob@example.com>\r\nTo: {gateway}\r\nSubject: Re: Invitation\r\nMessage-ID: <words@example.com>\r\n\r\nCan we move it to Friday?\r\n");
    let out = smtp_send(postfix.port, "bob@example.com", &[&gateway], text.as_bytes());
    assert!(
        out.data.as_deref().unwrap_or("").starts_with("250"),
        "{out:?}\n{}",
        diag()
    );
    // About another event: refused.
    let out = smtp_send(
        postfix.port,
        "bob@example.com",
        &[&gateway],
        &reply(&gateway, "another-event@example.org", "refused@example.com"),
    );
    assert!(
        out.data.as_deref().unwrap_or("").starts_with("550 5.7.1"),
        "{out:?}\n{}",
        diag()
    );
    // An unknown token: refused at RCPT.
    let unknown = "calendar+00000000-0000-4000-8000-000000000000@example.org";
    let out = smtp_send(
        postfix.port,
        "bob@example.com",
        &[unknown],
        &reply(unknown, "x@example.org", "unknown@example.com"),
    );
    assert!(out.rcpt[0].starts_with("550 5.1.1"), "{out:?}");

    let ok = wait_until(Duration::from_secs(10), || {
        journal(&config, &["--address", "bob@example.com"])
            .iter()
            .any(|e| e["event"] == "delivery" && e["disposition"] == "delivered")
    });
    let events = journal(&config, &["--address", "bob@example.com"]);
    assert!(ok, "{events:#?}\n{}", diag());
    let find = |event: &str, disposition: &str| {
        events
            .iter()
            .find(|e| e["event"] == event && e["disposition"] == disposition)
            .unwrap_or_else(|| panic!("no {event} {disposition} in {events:#?}"))
            .clone()
    };
    let taken = find("message", "discard");
    assert_eq!(taken["message_id"], "<taken@example.com>");
    assert_eq!(taken["token"], &token[..8]);
    assert_eq!(taken["attendee"], "mailto:bob@example.com");
    assert_eq!(taken["organizer"], "mailto:alice@example.org");
    let redirected = find("message", "redirect");
    assert_eq!(redirected["message_id"], "<words@example.com>");
    let refused = find("message", "reject");
    assert!(
        refused["smtp_reply"].as_str().unwrap().starts_with("550 5.7.1 "),
        "{refused}"
    );
    let at_rcpt = find("recipient", "reject");
    assert!(
        at_rcpt["smtp_reply"].as_str().unwrap().starts_with("550 5.1.1 "),
        "{at_rcpt}"
    );
    assert_eq!(at_rcpt["token"], "00000000");
    let delivered = find("delivery", "delivered");
    assert_eq!(delivered["record_id"], taken["record_id"]);
    // Never a whole token.
    assert!(!serde_json::to_string(&events).unwrap().contains(&token), "{events:#?}");

    // The same by queue id and by Message-ID; oldest first.
    let by_queue = journal(&config, &["--queue-id", &taken_queue_id]);
    assert_eq!(
        by_queue.first().map(|e| e["event"].clone()),
        Some("message".into()),
        "{by_queue:#?}"
    );
    assert!(by_queue.iter().any(|e| e["event"] == "delivery"), "{by_queue:#?}");
    let by_id = journal(&config, &["--message-id", "refused@example.com"]);
    assert_eq!(by_id.len(), 1, "{by_id:#?}");
    assert_eq!(by_id[0]["disposition"], "reject");
    // Text form: one line each, escaped.
    let out = common::cli(&config, &["journal", "--address", "bob@example.com"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), events.len(), "{text}");
    assert!(
        text.contains("message discard") && text.contains("recipient reject"),
        "{text}"
    );
    assert!(common::cli(&config, &["journal", "--since", "soon"]).status.code() == Some(64));
}

/// journal.max_events holds whatever the rate: the oldest go.
#[test]
fn the_journal_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let spool = imip_milter::spool::Spool::open(&dir.path().join("spool.redb")).unwrap();
    spool.set_journal_limit(50);
    for i in 0..120 {
        let mut e = imip_milter::journal::Event::now("message", "discard", &format!("n{i}"));
        e.sender = Some("bob@example.com".into());
        spool.journal_later(e);
    }
    spool.settle().unwrap();
    let all = spool.journal(&imip_milter::journal::Filter::default()).unwrap();
    assert_eq!(all.len(), 50);
    assert_eq!(all.last().unwrap().reason, "n119");
    // And by age: everything before now goes.
    let later = imip_milter::clock::now_ms() + 1;
    assert_eq!(spool.journal_purge(later, 1000).unwrap(), 50);
    assert!(spool
        .journal(&imip_milter::journal::Filter::default())
        .unwrap()
        .is_empty());
}

/// Text from mail reaches the admin's terminal escaped: a right-to-left
/// override in MAIL FROM, in a queue id and in an organizer is shown as
/// `\u{202e}` by `journal`, `queue list` and `tokens list`, never obeyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminal_spoofing_is_shown_escaped() {
    let hook = Webhook::start();
    hook.fail_next(&[404]);
    let m = common::InProcess::start_with(&hook.url(), "\n[tokens]\nmode = \"local\"\n").await;
    let config = m.state_dir.path().join("spoof.toml");
    std::fs::write(
        &config,
        common::config_text(
            m.state_dir.path(),
            "inet:127.0.0.1:1",
            &hook.url(),
            "\n[tokens]\nmode = \"local\"\n",
        ),
    )
    .unwrap();
    let token = common::add_token(
        &config,
        "alice\u{202E}@example.org",
        "bob@example.com",
        "spoof-1@example.org",
    );
    let gateway = format!("calendar+{token}@example.org");
    let status = common::milter_send_to(
        m.addr,
        "<bob\u{202E}moc.elpmaxe@example.com>",
        &format!("<{gateway}>"),
        &reply(&gateway, "spoof-1@example.org", "spoof@example.com"),
        "Q\u{202E}1",
    )
    .await;
    assert!(
        matches!(
            status,
            indymilter_test::Status::Discard | indymilter_test::Status::Reject { .. }
        ),
        "{status:?}"
    );
    let text = |args: &[&str]| String::from_utf8_lossy(&common::cli(&config, args).stdout).into_owned();
    assert!(
        wait_until(Duration::from_secs(10), || text(&["queue", "list"]).contains("failed")),
        "{}",
        text(&["queue", "list"])
    );
    for (what, out) in [
        ("journal", text(&["journal"])),
        ("queue list", text(&["queue", "list"])),
        ("tokens list", text(&["tokens", "list"])),
    ] {
        assert!(!out.contains('\u{202E}'), "{what} prints the override raw:\n{out}");
        assert!(out.contains("\\u{202e}"), "{what} shows it escaped:\n{out}");
    }
    m.stop().await;
}
