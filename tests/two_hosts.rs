//! Several mail hosts sharing one token store (DESIGN §4b): two private
//! Postfix instances, each with its own imip-milter and spool, one private
//! PostgreSQL. An invitation leaves tokenized through host 1; its reply is
//! taken at host 2; a sender that retries at the other host reaches the
//! target with the same Idempotency-Key; while the database is down both
//! hosts ask senders to retry and nothing leaves untokenized.

mod common;

use common::{postfix::Postfix, postgres::Postgres, smtp_send, Daemon, Webhook};
use std::time::Duration;

struct Host {
    milter: Daemon,
    postfix: Postfix,
    _dir: tempfile::TempDir,
}

fn host(hook: &Webhook, pg: &Postgres) -> Host {
    let dir = tempfile::tempdir().unwrap();
    let url = pg.url();
    let milter = Daemon::start_edited(dir.path(), &hook.url(), None, |c| {
        format!(
            "{c}\n[tokens]\nmode = \"local\"\nstore = \"postgres\"\nurl = \"{url}\"\n\n[outbound]\nenabled = true\norganizer_domains = [\"example.org\"]\n# The test client submits as a calendar server on a fixed host.\ntrusted_clients = [\"127.0.0.1\"]\n"
        )
    });
    let postfix = Postfix::start(&format!(
        "{{ inet:127.0.0.1:{}, default_action=tempfail, command_timeout=10s }}",
        milter.port
    ));
    Host {
        milter,
        postfix,
        _dir: dir,
    }
}

fn invitation() -> Vec<u8> {
    b"From: Alice Doe <alice@example.org>\r\nTo: Bob <bob@example.com>\r\nSubject: Invitation: Planning\r\nMessage-ID: <planning-invite@example.org>\r\nMIME-Version: 1.0\r\nContent-Type: text/calendar; charset=utf-8; method=REQUEST\r\n\r\nBEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Example Server//EN\r\nMETHOD:REQUEST\r\nBEGIN:VEVENT\r\nUID:planning-2026@example.org\r\nDTSTAMP:20261120T100000Z\r\nDTSTART:20261210T100000Z\r\nSUMMARY:Planning\r\nORGANIZER;CN=Alice:mailto:alice@example.org\r\nATTENDEE;PARTSTAT=NEEDS-ACTION;RSVP=TRUE:mailto:bob@example.com\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n".to_vec()
}

fn reply(gateway: &str) -> Vec<u8> {
    format!("From: Bob <bob@example.com>\r\nTo: {gateway}\r\nSubject: Accepted: Planning\r\nMessage-ID: <planning-reply@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: text/calendar; charset=utf-8; method=REPLY\r\n\r\nBEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Attendee//EN\r\nMETHOD:REPLY\r\nBEGIN:VEVENT\r\nUID:planning-2026@example.org\r\nDTSTAMP:20261121T100000Z\r\nORGANIZER:{gateway}\r\nATTENDEE;PARTSTAT=ACCEPTED:mailto:bob@example.com\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n").into_bytes()
}

#[test]
fn a_token_minted_at_one_host_is_known_at_the_other() {
    let mut pg = Postgres::start();
    let hook = Webhook::start();
    let (one, two) = (host(&hook, &pg), host(&hook, &pg));
    let diag = || {
        format!(
            "--- host 1\n{}\n{}\n--- host 2\n{}\n{}",
            one.postfix.log(),
            one.milter.log(),
            two.postfix.log(),
            two.milter.log()
        )
    };
    // The submission host tokenizes the invitation.
    let out = smtp_send(
        one.postfix.port,
        "alice@example.org",
        &["bob@example.com"],
        &invitation(),
    );
    assert!(
        out.data.as_deref().unwrap_or("").starts_with("250"),
        "{out:?}\n{}",
        diag()
    );
    let bob = one.postfix.wait_mailbox("bob-example.com", 1);
    let gateway = bob
        .first()
        .and_then(|m| m.lines().find_map(|l| l.strip_prefix("Reply-To: ")))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| panic!("no Reply-To\n{}", diag()));
    // The reply arrives at the other MX.
    let out = smtp_send(two.postfix.port, "bob@example.com", &[&gateway], &reply(&gateway));
    assert!(
        out.data.as_deref().unwrap_or("").starts_with("250"),
        "{out:?}\n{}",
        diag()
    );
    let got = hook.wait_for(1, Duration::from_secs(15));
    assert_eq!(got.len(), 1, "{}", diag());
    assert_eq!(got[0].body["organizer"], "mailto:alice@example.org");
    assert_eq!(got[0].body["attendee"], "mailto:bob@example.com");
    // A sender that retries at host 1 after a timeout: the same delivery id.
    let out = smtp_send(one.postfix.port, "bob@example.com", &[&gateway], &reply(&gateway));
    assert!(
        out.data.as_deref().unwrap_or("").starts_with("250"),
        "{out:?}\n{}",
        diag()
    );
    let got = hook.wait_for(2, Duration::from_secs(15));
    assert_eq!(got.len(), 2, "{}", diag());
    assert_eq!(got[0].idempotency_key, got[1].idempotency_key);
    // An unknown token is refused at host 2 as at host 1.
    let unknown = "calendar+00000000-0000-4000-8000-000000000000@example.org";
    let out = smtp_send(two.postfix.port, "bob@example.com", &[unknown], &reply(unknown));
    assert!(out.rcpt[0].starts_with("550 5.1.1 "), "{out:?}");

    // The database goes down: the reply is deferred at RCPT, the invitation
    // at the end of DATA; neither is lost or sent untokenized.
    pg.stop();
    let declined = String::from_utf8(reply(&gateway))
        .unwrap()
        .replace("PARTSTAT=ACCEPTED", "PARTSTAT=DECLINED")
        .into_bytes();
    let out = smtp_send(two.postfix.port, "bob@example.com", &[&gateway], &declined);
    assert!(out.rcpt[0].starts_with("451 4.3.0 "), "{out:?}\n{}", diag());
    let out = smtp_send(
        one.postfix.port,
        "alice@example.org",
        &["bob@example.com"],
        &invitation(),
    );
    assert!(
        out.data.as_deref().unwrap_or("").starts_with("451 4.3.0 "),
        "{out:?}\n{}",
        diag()
    );
    assert_eq!(one.postfix.wait_mailbox("bob-example.com", 1).len(), 1);
    for m in [&one.milter, &two.milter] {
        let outages = m.log().matches("recipients get 451 until it answers").count();
        assert_eq!(outages, 1, "one log line per outage\n{}", diag());
    }
    // Back up: the sender's retry goes through.
    pg.run();
    let passed = common::wait_until(Duration::from_secs(20), || {
        let out = smtp_send(two.postfix.port, "bob@example.com", &[&gateway], &declined);
        out.data.as_deref().unwrap_or("").starts_with("250")
    });
    assert!(passed, "{}", diag());
    let got = hook.wait_for(3, Duration::from_secs(15));
    assert_eq!(got.len(), 3, "{}", diag());
    assert_eq!(got[2].body["partstat"], "DECLINED");
    assert!(two.milter.log().contains("reachable again"), "{}", diag());
}
