//! Observe mode through a private Postfix: every message passes unchanged,
//! the journal says what would have become of each; one key and SIGHUP
//! switch to enforce.

mod common;

use common::{cli, postfix::Postfix, smtp_send, wait_until, Daemon, Webhook};
use std::time::Duration;

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn reply(to: &str, message_id: &str) -> Vec<u8> {
    format!(
        "From: Bob <bob@example.com>\r\nTo: <{to}>\r\nSubject: Accepted: Review\r\nMessage-ID: <{message_id}>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/calendar; charset=utf-8; method=REPLY\r\n\r\n\
         BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Client//EN\r\nMETHOD:REPLY\r\nBEGIN:VEVENT\r\n\
         UID:review-7@example.org\r\nDTSTAMP:20261206T090000Z\r\nORGANIZER:mailto:{to}\r\n\
         ATTENDEE;PARTSTAT=ACCEPTED:mailto:bob@example.com\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
    )
    .into_bytes()
}

fn invitation() -> Vec<u8> {
    b"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.com>\r\nSubject: Invitation: Review\r\n\
      Message-ID: <review-invite@example.org>\r\nMIME-Version: 1.0\r\n\
      Content-Type: text/calendar; charset=utf-8; method=REQUEST\r\n\r\n\
      BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Server//EN\r\nMETHOD:REQUEST\r\nBEGIN:VEVENT\r\n\
      UID:review-8@example.org\r\nDTSTAMP:20261206T080000Z\r\nDTSTART:20261210T100000Z\r\n\
      ORGANIZER:mailto:alice@example.org\r\nATTENDEE;RSVP=TRUE:mailto:bob@example.com\r\n\
      END:VEVENT\r\nEND:VCALENDAR\r\n"
        .to_vec()
}

#[test]
fn observe_mode_passes_everything_unchanged_and_journals_what_would_have_been() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start();
    let milter = Daemon::start_edited(dir.path(), &hook.url(), None, |c| {
        format!(
            "mode = \"observe\"\n{c}\n[tokens]\nmode = \"local\"\n\n[outbound]\nenabled = true\n\
             organizer_domains = [\"example.org\"]\ntrusted_clients = [\"127.0.0.1\"]\n"
        )
    });
    let postfix = Postfix::start(&format!(
        "{{ inet:127.0.0.1:{}, default_action=tempfail, command_timeout=10s }}",
        milter.port
    ));
    let config = milter.config_path.clone();
    let diagnostics = || format!("--- maillog\n{}\n--- milter\n{}", postfix.log(), milter.log());
    assert!(milter.log().contains(", mode observe, "), "{}", milter.log());
    let check = text(&cli(
        &config,
        &["check", "--postfix-config", &postfix.etc().display().to_string()],
    ));
    assert!(
        check
            .lines()
            .any(|l| l.starts_with("OK") && l.contains("mode") && l.contains("observe:")),
        "{check}"
    );

    let token = common::add_token(&config, "alice@example.org", "bob@example.com", "review-7@example.org");
    let gateway = format!("calendar+{token}@example.org");
    let sent = |from: &str, to: &str, data: &[u8]| {
        let out = smtp_send(postfix.port, from, &[to], data);
        assert!(out.rcpt[0].starts_with("250"), "{out:?}\n{}", diagnostics());
        assert!(out.data.as_deref().unwrap_or("").starts_with("250"), "{out:?}");
    };
    // A reply, a person's text, an unknown token, an invitation.
    sent(
        "bob@example.com",
        &gateway,
        &reply(&gateway, "observed-reply@example.com"),
    );
    let question = format!(
        "From: Bob <bob@example.com>\r\nTo: <{gateway}>\r\nSubject: Re: Review\r\n\
         Message-ID: <observed-text@example.com>\r\n\r\nCan we start at 11?\r\n"
    );
    sent("bob@example.com", &gateway, question.as_bytes());
    let unknown = "calendar+00000000-0000-4000-8000-000000000000@example.org";
    sent(
        "mallory@example.com",
        unknown,
        &reply(unknown, "observed-unknown@example.com"),
    );
    sent("alice@example.org", "bob@example.com", &invitation());

    // Each reached its recipient as it was sent.
    let calendar = postfix.wait_mailbox("calendar", 3);
    assert_eq!(calendar.len(), 3, "{}", diagnostics());
    assert!(calendar
        .iter()
        .any(|m| m.contains("Message-ID: <observed-reply@example.com>")));
    assert!(calendar.iter().any(|m| m.contains("Can we start at 11?")));
    assert!(calendar
        .iter()
        .any(|m| m.contains("Message-ID: <observed-unknown@example.com>")));
    assert!(calendar.iter().all(|m| !m.contains("X-IMIP-Milter")), "unchanged");
    let bob = postfix.wait_mailbox("bob-example.com", 1);
    assert_eq!(bob.len(), 1, "{}", diagnostics());
    assert!(bob[0].starts_with("Return-Path: <alice@example.org>"), "{}", bob[0]);
    assert!(
        !bob[0].contains("Reply-To:") && !bob[0].contains("calendar+"),
        "{}",
        bob[0]
    );
    assert!(postfix.mailbox("alice").is_empty(), "nothing redirected");
    std::thread::sleep(Duration::from_secs(1));
    assert!(hook.deliveries().is_empty(), "nothing delivered to the target");
    let queue = text(&cli(&config, &["queue", "list", "--all"]));
    assert!(queue.contains("-- 0 pending, 0 failed"), "nothing spooled:\n{queue}");
    let tokens = text(&cli(&config, &["tokens", "list"]));
    assert_eq!(tokens.matches("review-").count(), 1, "no token minted:\n{tokens}");

    // The journal holds the four decisions as they would have been.
    let journal = text(&cli(&config, &["journal"]));
    println!("--- journal of the observe-mode run\n{journal}");
    let line = |needle: &str, word: &str| {
        journal
            .lines()
            .find(|l| l.contains(needle) && l.contains(word))
            .unwrap_or_else(|| panic!("no {word} for {needle} in\n{journal}"))
            .to_owned()
    };
    line("observed-reply@example.com", "message would-discard");
    line("observed-text@example.com", "message would-redirect");
    assert!(
        line("token=00000000", "recipient would-reject").contains("550 5.1.1"),
        "{journal}"
    );
    line("review-invite@example.org", "outbound would-tokenize");
    assert!(
        !journal.contains(" discard ") && !journal.contains(" tokenized "),
        "{journal}"
    );

    // The safety net takes nothing either: the message stays in Postfix's queue.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_imip-milter"))
        .args(["deliver", "--config"])
        .arg(&config)
        .args([
            "--sender",
            "bob@example.com",
            "--queue-id",
            "OBSDQ1",
            "--rcpt",
            &gateway,
        ])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("deliver");
    std::io::Write::write_all(
        &mut child.stdin.take().unwrap(),
        &reply(&gateway, "observed-pipe@example.com"),
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(75), "{}", text(&out));
    assert!(text(&out).contains("observe mode"), "{}", text(&out));
    let piped = text(&cli(&config, &["journal", "--queue-id", "OBSDQ1"]));
    assert!(piped.contains("message would-discard"), "{piped}");
    assert!(hook.deliveries().is_empty());

    // One key and SIGHUP: the same kind of reply is now taken.
    let edited = std::fs::read_to_string(&config)
        .unwrap()
        .replace("mode = \"observe\"\n", "mode = \"enforce\"\n");
    std::fs::write(&config, edited).unwrap();
    milter.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || milter.log().contains("mode changed")),
        "{}",
        milter.log()
    );
    sent(
        "bob@example.com",
        &gateway,
        &reply(&gateway, "enforced-reply@example.com"),
    );
    let got = hook.wait_for(1, Duration::from_secs(15));
    assert_eq!(got.len(), 1, "{}", diagnostics());
    assert_eq!(got[0].body["message_id"], "<enforced-reply@example.com>");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(postfix.mailbox("calendar").len(), 3, "discarded once enforced");
}
