//! A reply that fails for good reaches its organizer: through a private
//! Postfix, its sendmail and a local mailbox, with the real daemon.

mod common;

use common::{cli, postfix::Postfix, smtp_send, wait_until, Daemon, Webhook};
use std::time::Duration;

/// Bob's answer to alice's event `uid`, sent to `to`.
fn reply(to: &str, uid: &str, message_id: &str) -> Vec<u8> {
    format!(
        "From: Bob <bob@example.com>\r\nTo: <{to}>\r\nSubject: Declined: Board meeting\r\n\
         Message-ID: <{message_id}>\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/calendar; charset=utf-8; method=REPLY\r\n\r\n\
         BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Client//EN\r\nMETHOD:REPLY\r\nBEGIN:VEVENT\r\n\
         UID:{uid}\r\nDTSTAMP:20261206T090000Z\r\nORGANIZER:mailto:{to}\r\n\
         ATTENDEE;PARTSTAT=DECLINED:mailto:bob@example.com\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
    )
    .into_bytes()
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The record spooled for `message_id`, once it has failed: `queue show` as JSON.
fn failed_record(config: &std::path::Path, message_id: &str) -> serde_json::Value {
    let mut shown = serde_json::Value::Null;
    wait_until(Duration::from_secs(20), || {
        let out = cli(config, &["queue", "show", &format!("<{message_id}>")]);
        shown = serde_json::from_slice(&out.stdout).unwrap_or_default();
        shown["state"] == "failed"
            && (shown["notice"]["state"].as_str().is_some_and(|s| s != "pending") || {
                // on_failure = keep: nothing more to wait for.
                std::fs::read_to_string(config)
                    .unwrap_or_default()
                    .contains("on_failure = \"keep\"")
            })
    });
    shown
}

/// The private instance's own sendmail at `path`, as delivery.sendmail runs
/// it; while the file `fail` exists it fails as postdrop would.
fn sendmail_wrapper(path: &std::path::Path, postfix: &Postfix, fail: &std::path::Path) {
    std::fs::write(
        path,
        format!(
            "#!/bin/sh\n[ -e {} ] && {{ echo 'postdrop: fatal: queue file write error' >&2; exit 75; }}\n\
             exec /usr/sbin/sendmail -C {} \"$@\"\n",
            fail.display(),
            postfix.etc().display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// Bob declines `organizer`'s event board-`n` through a token minted for it;
/// the target answers 404 (the event is gone), for good. The gateway address.
fn declined_for_good(postfix: &Postfix, hook: &Webhook, config: &std::path::Path, organizer: &str, n: u32) -> String {
    let uid = format!("board-{n}@example.org");
    let token = common::add_token(config, organizer, "bob@example.com", &uid);
    let gateway = format!("calendar+{token}@example.org");
    hook.fail_next(&[404]);
    let message_id = format!("declined-{n}@example.com");
    let out = smtp_send(
        postfix.port,
        "bob@example.com",
        &[&gateway],
        &reply(&gateway, &uid, &message_id),
    );
    assert!(out.data.as_deref().unwrap_or("").starts_with("250"), "{out:?}");
    gateway
}

#[test]
fn a_reply_that_fails_for_good_goes_to_its_organizer_once_and_never_in_a_loop() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start();
    let wrapper = dir.path().join("sendmail");
    let mut milter = Daemon::start_edited(dir.path(), &hook.url(), None, |c| {
        format!(
            "{}\n[tokens]\nmode = \"local\"\n",
            c.replace(
                "[delivery]\n",
                &format!("[delivery]\nsendmail = \"{}\"\n", wrapper.display())
            )
        )
    });
    let postfix = Postfix::start(&format!(
        "{{ inet:127.0.0.1:{}, default_action=tempfail, command_timeout=10s }}",
        milter.port
    ));
    sendmail_wrapper(&wrapper, &postfix, &dir.path().join("fail"));
    let config = milter.config_path.clone();
    let milter_log = milter.log_path.clone();
    let diagnostics = || {
        let log = std::fs::read_to_string(&milter_log).unwrap_or_default();
        format!("--- maillog\n{}\n--- milter\n{log}", postfix.log())
    };

    // The event is gone from the calendar server: 404, for good.
    let gateway = declined_for_good(&postfix, &hook, &config, "alice@example.org", 1);

    let mail = postfix.wait_mailbox("alice", 1);
    assert_eq!(mail.len(), 1, "{}", diagnostics());
    let notice = &mail[0];
    println!("--- the notice alice received\n{notice}");
    assert!(notice.starts_with("Return-Path: <>"), "from the null sender:\n{notice}");
    assert!(notice.contains("Subject: Not applied to your calendar: DECLINED from bob@example.com"));
    assert!(notice.contains("Auto-Submitted: auto-replied"));
    assert!(notice.contains("  Why:       HTTP 404"), "{notice}");
    assert!(notice.contains("Content-Type: message/rfc822"), "{notice}");
    // The original, as it arrived, with its calendar part for her calendar program.
    let parsed = imip_milter::analysis::analyse(notice.as_bytes());
    assert!(
        notice.contains("Message-ID: <declined-1@example.com>") && notice.contains("ATTENDEE;PARTSTAT=DECLINED"),
        "{notice}"
    );
    assert_ne!(parsed.message_id.as_deref(), Some("<declined-1@example.com>"));
    // Her own address as ORGANIZER again: her calendar program knows the event.
    assert!(
        notice.contains("ORGANIZER;EMAIL=alice@example.org:mailto:alice@example.org"),
        "{notice}"
    );
    assert!(!notice.contains(&format!("ORGANIZER:mailto:{gateway}")), "{notice}");
    // The notice does not come back to the gateway: calendar's mailbox is empty.
    assert!(postfix.mailbox("calendar").is_empty());

    let shown = failed_record(&config, "declined-1@example.com");
    assert_eq!(shown["notice"]["state"], "sent", "{shown}");
    assert!(shown.get("message_ref").is_none(), "kept no longer: {shown}");
    assert_eq!(shown["notice"]["to"], "alice@example.org");
    assert!(
        shown["notice"]["time_at"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{shown}"
    );
    let journal = text(&cli(&config, &["journal", "--message-id", "<declined-1@example.com>"]));
    println!("--- journal\n{journal}");
    assert!(journal.contains("notice sent"), "{journal}");

    // A retry that fails again sends nothing more: never twice.
    hook.fail_next(&[404]);
    let id = shown["id"].as_str().unwrap().to_owned();
    let out = cli(&config, &["queue", "retry", &id]);
    assert!(out.status.success(), "{}", text(&out));
    wait_until(Duration::from_secs(20), || {
        text(&cli(&config, &["journal", "--message-id", "<declined-1@example.com>"]))
            .matches("failed")
            .count()
            >= 2
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(postfix.mailbox("alice").len(), 1, "{}", diagnostics());

    // An organizer that is a gateway address: the notice would loop.
    declined_for_good(&postfix, &hook, &config, "calendar+feedc0de@example.org", 2);
    let shown = failed_record(&config, "declined-2@example.com");
    assert_eq!(shown["notice"]["state"], "refused", "{shown}");
    let why = shown["notice"]["reason"].as_str().unwrap_or_default();
    assert!(why.contains("gateway address"), "{shown}");
    let journal = text(&cli(&config, &["journal", "--message-id", "<declined-2@example.com>"]));
    assert!(
        journal.contains("notice refused") && journal.contains("gateway address"),
        "{journal}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(postfix.mailbox("calendar").is_empty(), "{}", diagnostics());

    // sendmail fails: the notice is failed with its words, the record keeps the reply.
    std::fs::write(dir.path().join("fail"), "").unwrap();
    declined_for_good(&postfix, &hook, &config, "alice@example.org", 4);
    let shown = failed_record(&config, "declined-4@example.com");
    assert_eq!(shown["notice"]["state"], "failed", "{shown}");
    assert!(shown["message_ref"].is_string(), "{shown}");
    let journal = text(&cli(&config, &["journal", "--message-id", "<declined-4@example.com>"]));
    assert!(
        journal.contains("notice failed") && journal.contains("queue file write error"),
        "{journal}"
    );
    std::fs::remove_file(dir.path().join("fail")).unwrap();
    // Tried again with the hourly pass and at start: here, a restart.
    milter.terminate();
    milter.spawn();
    let mail = postfix.wait_mailbox("alice", 2);
    assert_eq!(mail.len(), 2, "{}", diagnostics());
    assert!(mail[1].contains("Message-ID: <declined-4@example.com>"), "{}", mail[1]);
    let shown = failed_record(&config, "declined-4@example.com");
    assert_eq!(shown["notice"]["state"], "sent", "{shown}");
    assert_eq!(shown["notice"]["attempts"], 2, "{shown}");

    // delivery.on_failure = "keep", by SIGHUP: the record stays, nobody is mailed.
    let edited = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[delivery]\n", "[delivery]\non_failure = \"keep\"\n");
    std::fs::write(&config, edited).unwrap();
    milter.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(10), || milter
        .log()
        .contains("delivery.on_failure changed")));
    declined_for_good(&postfix, &hook, &config, "alice@example.org", 3);
    let shown = failed_record(&config, "declined-3@example.com");
    assert_eq!(shown["state"], "failed", "{shown}\n{}", diagnostics());
    assert!(shown.get("notice").is_none(), "{shown}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(postfix.mailbox("alice").len(), 2, "{}", diagnostics());
}

/// A crash between the failure and the notice: the notice, committed with
/// the failure, is sent at the next start, and once only.
#[test]
fn a_notice_left_pending_by_a_crash_is_sent_at_the_next_start_once() {
    use imip_milter::spool::{build_record, Envelope, Notice, NoticeState, Spool, State};
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start();
    let postfix = Postfix::start("");
    let wrapper = dir.path().join("sendmail");
    sendmail_wrapper(&wrapper, &postfix, &dir.path().join("never"));

    // The spool as the crash left it.
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    {
        let spool = Spool::open(&state.join("spool.redb")).unwrap();
        let gateway = "calendar+0a1b2c3d4e5f@example.org";
        let raw = reply(gateway, "board-9@example.org", "declined-9@example.com");
        let analysis = imip_milter::analysis::analyse(&raw);
        let envelope = Envelope {
            queue_id: Some("CRASH1".into()),
            mail_from: "bob@example.com".into(),
            client_addr: None,
        };
        let mut rec = build_record(&analysis, &envelope, gateway, "0a1b2c3d4e5f");
        let now = imip_milter::clock::now_ms();
        rec.payload["organizer"] = "mailto:alice@example.org".into();
        rec.state = State::Failed;
        rec.finished_ms = Some(now);
        rec.last_error = Some("HTTP 410 Gone".into());
        rec.original = Some(std::sync::Arc::new(raw));
        rec.notice = Some(Notice {
            state: NoticeState::Pending,
            to: None,
            time_ms: now,
            reason: String::new(),
            attempts: 0,
        });
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(spool.append(vec![rec])).unwrap();
        spool.flush().unwrap();
    }

    let mut milter = Daemon::start_edited(dir.path(), &hook.url(), None, |c| {
        c.replace(
            "[delivery]\n",
            &format!("[delivery]\nsendmail = \"{}\"\n", wrapper.display()),
        )
    });
    let mail = postfix.wait_mailbox("alice", 1);
    assert_eq!(mail.len(), 1, "{}\n{}", postfix.log(), milter.log());
    assert!(mail[0].contains("Why:       HTTP 410 Gone"), "{}", mail[0]);
    assert!(mail[0].contains("Message-ID: <declined-9@example.com>"), "{}", mail[0]);

    // Another start sends nothing more.
    milter.terminate();
    milter.spawn();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(postfix.mailbox("alice").len(), 1, "{}", milter.log());
}
