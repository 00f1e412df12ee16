//! End to end: a private Postfix instance, the real imip-milter daemon and a
//! real HTTP webhook, all started by the test.

mod common;

use common::{fixture, postfix::Postfix, reply_message, smtp_send, wait_until, Daemon, Webhook, TOKEN};
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

/// One Postfix at a time: the machine has two cores.
static SERIAL: Mutex<()> = Mutex::new(());

struct Site {
    hook: Webhook,
    milter: Daemon,
    postfix: Postfix,
    _dir: tempfile::TempDir,
}

fn site() -> Site {
    site_with("")
}

fn site_with(main_cf: &str) -> Site {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start();
    let milter = Daemon::start(dir.path(), &hook.url());
    let postfix = Postfix::start_with(
        &format!(
            "{{ inet:127.0.0.1:{}, default_action=tempfail, command_timeout=10s }}",
            milter.port
        ),
        main_cf,
    );
    Site {
        hook,
        milter,
        postfix,
        _dir: dir,
    }
}

/// A site set up with the snippets of postfix/ as shipped, the daemon
/// running unprivileged as the pipe transport's user.
fn shipped_site() -> Site {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start();
    let milter = Daemon::start_as(dir.path(), &hook.url(), Some(common::nobody()));
    let program = std::path::Path::new(env!("CARGO_BIN_EXE_imip-milter"));
    let postfix = Postfix::start_shipped(milter.port, program, &milter.config_path);
    Site {
        hook,
        milter,
        postfix,
        _dir: dir,
    }
}

fn gateway() -> String {
    format!("calendar+{TOKEN}@example.org")
}

/// Sends replies number `from..from + n` to the gateway; each must get 250.
fn send_replies(s: &Site, from: usize, n: usize) {
    for i in from..from + n {
        let out = smtp_send(s.postfix.port, "a@example.com", &[&gateway()], &reply_message(i, TOKEN));
        assert!(
            out.data.as_deref().unwrap_or("").starts_with("250"),
            "{out:?}\n{}",
            diagnostics(s)
        );
    }
}

fn diagnostics(s: &Site) -> String {
    format!("--- maillog\n{}\n--- milter\n{}", s.postfix.log(), s.milter.log())
}

#[test]
fn reply_is_taken_with_250_discarded_and_posted() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = site();
    let out = smtp_send(s.postfix.port, "bob@example.com", &[&gateway()], &fixture("apple.eml"));
    assert!(out.rcpt[0].starts_with("250"), "{out:?}");
    let data = out.data.clone().unwrap_or_default();
    assert!(data.starts_with("250"), "{data}\n{}", diagnostics(&s));

    let got = s.hook.wait_for(1, Duration::from_secs(15));
    assert_eq!(got.len(), 1, "{}", diagnostics(&s));
    let b = &got[0].body;
    assert_eq!(b["kind"], "reply");
    assert_eq!(b["token"], TOKEN);
    assert_eq!(b["attendee"], "mailto:bob@example.com");
    assert_eq!(b["envelope"]["client_addr"], "127.0.0.1");
    let queue_id = b["queue_id"].as_str().unwrap().to_owned();
    assert!(queue_id.len() >= 8 && queue_id != "NOQUEUE", "{queue_id}");

    wait_until(Duration::from_secs(5), || {
        s.postfix.log().contains("milter triggers DISCARD action")
    });
    let log = s.postfix.log();
    assert!(
        log.contains(&format!("{queue_id}: milter-discard")),
        "{}",
        diagnostics(&s)
    );
    assert!(
        s.postfix.mailbox("calendar").is_empty(),
        "a discarded reply must not be delivered"
    );
    assert!(s.milter.log().contains(&format!("{queue_id}: from=<bob@example.com>")));
    assert!(!s.milter.log().contains(TOKEN), "the full token must never be logged");
}

#[test]
fn ordinary_mail_is_delivered_untouched() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = site();
    let out = smtp_send(
        s.postfix.port,
        "bob@example.com",
        &["alice@example.org"],
        &fixture("human-text.eml"),
    );
    assert!(out.data.as_deref().unwrap_or("").starts_with("250"), "{out:?}");
    let mail = s.postfix.wait_mailbox("alice", 1);
    assert_eq!(mail.len(), 1, "{}", diagnostics(&s));
    assert!(mail[0].contains("I can only come for the first half hour"));
    assert!(s.hook.deliveries().is_empty());
}

#[test]
fn mixed_recipients_keep_the_others() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = site();
    let out = smtp_send(
        s.postfix.port,
        "frank@example.com",
        &["grace@example.org", &gateway()],
        &fixture("reply-all.eml"),
    );
    assert!(out.data.as_deref().unwrap_or("").starts_with("250"), "{out:?}");
    let grace = s.postfix.wait_mailbox("grace", 1);
    assert_eq!(grace.len(), 1, "{}", diagnostics(&s));
    assert!(grace[0].contains("UID:design-review-2026@example.org"));
    let got = s.hook.wait_for(1, Duration::from_secs(15));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body["attendee"], "mailto:frank@example.com");
    // The gateway copy was deleted, not delivered to the calendar mailbox.
    std::thread::sleep(Duration::from_millis(500));
    assert!(s.postfix.mailbox("calendar").is_empty(), "{}", diagnostics(&s));
}

#[test]
fn human_text_and_bare_address_get_5xx() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = site();
    let out = smtp_send(
        s.postfix.port,
        "bob@example.com",
        &[&gateway()],
        &fixture("human-text.eml"),
    );
    let data = out.data.unwrap_or_default();
    assert!(data.starts_with("550 5.7.1 "), "{data}\n{}", diagnostics(&s));
    assert!(data.contains("write to the organizer"), "{data}");

    let out = smtp_send(
        s.postfix.port,
        "bob@example.com",
        &["calendar@example.org"],
        &fixture("apple.eml"),
    );
    assert!(out.rcpt[0].starts_with("550 5.1.1 "), "{out:?}");
    assert!(out.data.is_none());
    assert!(s.hook.deliveries().is_empty());
}

#[test]
fn webhook_down_then_up_every_reply_arrives_once() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = site();
    s.hook.stop();
    const N: usize = 10;
    send_replies(&s, 0, N);
    // Spooled, waiting: the queue shows them through the daemon's control socket.
    let list = s.milter.cli(&["queue", "list"]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(list.status.success(), "{text}{}", String::from_utf8_lossy(&list.stderr));
    assert!(text.contains(&format!("-- {N} pending")), "{text}");

    s.hook.restart();
    let got = s.hook.wait_for(N, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    let got = if got.len() >= N { s.hook.deliveries() } else { got };
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for d in &got {
        *per_id.entry(d.body["id"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    assert_eq!(per_id.len(), N, "{}", diagnostics(&s));
    assert!(per_id.values().all(|&c| c == 1), "{per_id:?}");
}

#[test]
fn sigkill_and_restart_lose_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = site();
    s.hook.stop();
    const N: usize = 5;
    send_replies(&s, 100, N);
    s.milter.kill();
    // With the daemon gone, the CLI opens the spool itself.
    let list = s.milter.cli(&["queue", "list"]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        text.contains(&format!("-- {N} pending")),
        "{text}{}",
        String::from_utf8_lossy(&list.stderr)
    );

    s.milter.spawn();
    s.hook.restart();
    let got = s.hook.wait_for(N, Duration::from_secs(30));
    let uids: std::collections::BTreeSet<String> =
        got.iter().map(|d| d.body["uid"].as_str().unwrap().to_owned()).collect();
    assert_eq!(uids.len(), N, "{}", diagnostics(&s));

    // SIGTERM: open sessions finish, the daemon exits cleanly.
    let status = s.milter.terminate();
    assert!(status.success(), "{status:?}\n{}", s.milter.log());
}

#[test]
fn shipped_snippets_route_replies_through_the_milter() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = shipped_site();
    let out = smtp_send(
        s.postfix.port,
        "bob@example.com",
        &[&gateway()],
        &fixture("outlook.eml"),
    );
    assert!(
        out.data.as_deref().unwrap_or("").starts_with("250"),
        "{out:?}\n{}",
        diagnostics(&s)
    );
    let got = s.hook.wait_for(1, Duration::from_secs(15));
    assert_eq!(got.len(), 1, "{}", diagnostics(&s));
    assert_eq!(got[0].body["attendee"], "mailto:Erik.Jansen@contoso.example");
    assert!(
        s.postfix.log().contains("milter triggers DISCARD action"),
        "{}",
        diagnostics(&s)
    );
    // The gateway address is valid through the shipped map; without a token the milter refuses it.
    let out = smtp_send(
        s.postfix.port,
        "bob@example.com",
        &["calendar@example.org"],
        &fixture("apple.eml"),
    );
    assert!(out.rcpt[0].starts_with("550 5.1.1 "), "{out:?}");
    let out = smtp_send(
        s.postfix.port,
        "bob@example.com",
        &["alice@example.org"],
        &fixture("human-text.eml"),
    );
    assert!(out.data.as_deref().unwrap_or("").starts_with("250"), "{out:?}");
    assert_eq!(s.postfix.wait_mailbox("alice", 1).len(), 1, "{}", diagnostics(&s));
}

#[test]
fn milter_outage_replies_reach_the_target_through_the_safety_net() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = shipped_site();
    s.milter.kill();

    // default_action=accept: mail flows, gateway mail takes the pipe transport.
    let out = smtp_send(
        s.postfix.port,
        "dana.k@gmail.com",
        &[&gateway()],
        &fixture("google.eml"),
    );
    assert!(
        out.data.as_deref().unwrap_or("").starts_with("250"),
        "{out:?}\n{}",
        diagnostics(&s)
    );
    let got = s.hook.wait_for(1, Duration::from_secs(30));
    assert_eq!(got.len(), 1, "{}", diagnostics(&s));
    let b = &got[0].body;
    assert_eq!(b["token"], TOKEN);
    assert_eq!(b["partstat"], "ACCEPTED");
    let queue_id = b["queue_id"].as_str().unwrap().to_owned();
    // Postfix logs the pipe delivery once deliver has exited, just after the post.
    let relayed = format!("{queue_id}: to=<{}>, relay=imip-milter", gateway());
    assert!(
        wait_until(Duration::from_secs(10), || s.postfix.log().contains(&relayed)),
        "{}",
        diagnostics(&s)
    );

    let out = smtp_send(
        s.postfix.port,
        "bob@example.com",
        &["alice@example.org"],
        &fixture("human-text.eml"),
    );
    assert!(out.data.as_deref().unwrap_or("").starts_with("250"), "{out:?}");
    assert_eq!(
        s.postfix.wait_mailbox("alice", 1).len(),
        1,
        "ordinary mail flows during the outage"
    );

    // A person's text bounces with imip-milter's sentence instead of vanishing.
    let out = smtp_send(
        s.postfix.port,
        "bob@example.com",
        &[&gateway()],
        &fixture("human-text.eml"),
    );
    assert!(out.data.as_deref().unwrap_or("").starts_with("250"), "{out:?}");
    assert!(
        wait_until(Duration::from_secs(20), || s.postfix.log().contains("status=bounced")),
        "{}",
        diagnostics(&s)
    );
    assert!(
        s.postfix.log().contains("write to the organizer"),
        "{}",
        diagnostics(&s)
    );
    // The journal says what the pipe did: a bounce, not a redirect.
    let journal =
        String::from_utf8_lossy(&s.milter.cli(&["journal", "--address", "bob@example.com"]).stdout).into_owned();
    assert!(
        journal.contains("message reject") && journal.contains("550 5.7.1") && !journal.contains("message redirect"),
        "{journal}"
    );

    // The daemon comes back and takes over the spool the safety net used.
    s.milter.spawn();
    let out = smtp_send(
        s.postfix.port,
        "chloe@example.net",
        &[&gateway()],
        &fixture("thunderbird.eml"),
    );
    assert!(out.data.as_deref().unwrap_or("").starts_with("250"), "{out:?}");
    let got = s.hook.wait_for(2, Duration::from_secs(15));
    assert_eq!(got.len(), 2, "{}", diagnostics(&s));
    let list = s.milter.cli(&["queue", "list", "--all"]);
    assert!(String::from_utf8_lossy(&list.stdout).contains("-- 0 pending, 0 failed"));
}

#[test]
fn check_finds_the_shipped_setup_sound_and_a_refused_credential() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = shipped_site();
    s.hook.require_auth("Bearer right-token");
    let dir = tempfile::tempdir().unwrap();
    let write_config = |name: &str, token: &str| {
        let token_file = dir.path().join(format!("{name}.token"));
        std::fs::write(&token_file, format!("{token}\n")).unwrap();
        let base = std::fs::read_to_string(&s.milter.config_path).unwrap();
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, format!("{base}token_file = \"{}\"\n", token_file.display())).unwrap();
        path
    };
    let check = |config: &std::path::Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_imip-milter"))
            .arg("check")
            .arg("--config")
            .arg(config)
            .arg("--postfix-config")
            .arg(s.postfix.etc())
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };

    let (code, text) = check(&write_config("good", "right-token"));
    assert_eq!(code, Some(0), "{text}");
    for want in [
        "OK   target:",
        "OK   postfix: smtpd_milters lists",
        "OK   postfix: default_action=accept",
        "OK   postfix: recipient_delimiter = +",
        "OK   postfix: safety-net transport",
        "hands RCPT <calendar+imip-milter-check@example.org> to imip-milter, which answers its check probe",
        "OK   postfix: connect_timeout=10s",
        "OK   postfix: command_timeout=10s",
        "OK   postfix: content_timeout=30s",
        "OK   daemon: answers on",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    assert!(!text.contains("FAIL"), "{text}");

    // Local tokens: check in a monitoring loop never trips the per-client
    // limit of unknown tokens (10 in 10 minutes), and leaves no trace.
    let base = std::fs::read_to_string(&s.milter.config_path).unwrap();
    let local = base.replace("[target]", "[tokens]\nmode = \"local\"\n\n[target]");
    assert_ne!(local, base);
    std::fs::write(&s.milter.config_path, &local).unwrap();
    s.milter.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || s
            .milter
            .log()
            .contains("tokens.mode changed")),
        "{}",
        s.milter.log()
    );
    let looped = dir.path().join("looped.token");
    std::fs::write(&looped, "right-token\n").unwrap();
    let looped_config = dir.path().join("looped.toml");
    std::fs::write(
        &looped_config,
        format!("{local}token_file = \"{}\"\n", looped.display()),
    )
    .unwrap();
    for run in 1..=20 {
        let (code, text) = check(&looped_config);
        assert_eq!(code, Some(0), "run {run}:\n{text}");
        assert!(text.contains("which answers its check probe"), "run {run}:\n{text}");
    }
    let journal = s.milter.cli(&["journal"]);
    let journal = String::from_utf8_lossy(&journal.stdout);
    assert!(!journal.contains("imip-mil"), "the probe is not journaled:\n{journal}");
    std::fs::write(&s.milter.config_path, &base).unwrap();
    s.milter.signal(libc::SIGHUP);

    // The classic failure of the old mailbox design: a credential the server no longer accepts.
    let (code, text) = check(&write_config("stale", "old-token"));
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("FAIL target:") && text.contains("target.token_file"),
        "{text}"
    );
    assert!(s.hook.deliveries().is_empty(), "check sends no reply");
}

const SECRET: &str = "calendarserver-shared-secret";

/// Local tokens, outbound tokenization and the calendarserver target
/// against the contract double.
fn calendarserver_site() -> Site {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start();
    hook.calendarserver(SECRET);
    let secret = dir.path().join("secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let milter = Daemon::start_edited(dir.path(), &hook.base_url(), None, |c| {
        format!(
            "{}secret_file = \"{}\"\n\n[tokens]\nmode = \"local\"\n\n[outbound]\nenabled = true\norganizer_domains = [\"example.org\"]\n# The test client submits as a calendar server on a fixed host.\ntrusted_clients = [\"127.0.0.1\"]\n",
            c.replace("kind = \"webhook\"", "kind = \"calendarserver\""),
            secret.display()
        )
    });
    let postfix = Postfix::start(&format!(
        "{{ inet:127.0.0.1:{}, default_action=tempfail, command_timeout=10s }}",
        milter.port
    ));
    Site {
        hook,
        milter,
        postfix,
        _dir: dir,
    }
}

fn invitation() -> Vec<u8> {
    "From: Alice Doe <alice@example.org>\r\nTo: Bob <bob@example.com>\r\nSubject: Invitation: Kickoff\r\nMessage-ID: <kickoff-invite@example.org>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=\"inv\"\r\n\r\n--inv\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nYou are invited to the kickoff.\r\n--inv\r\nContent-Type: text/calendar; charset=utf-8; method=REQUEST\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        .bytes()
        .chain(
            b64("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Example Server//EN\r\nMETHOD:REQUEST\r\nBEGIN:VEVENT\r\nUID:kickoff-2026@example.org\r\nDTSTAMP:20261120T100000Z\r\nDTSTART:20261205T100000Z\r\nSUMMARY:Kickoff\r\nORGANIZER;CN=\"Doe, Alice\":mailto:alice@example.org\r\nATTENDEE;PARTSTAT=NEEDS-ACTION;RSVP=TRUE:mailto:bob@example.com\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n")
                .into_bytes(),
        )
        .chain(b"\r\n--inv--\r\n".iter().copied())
        .collect()
}

fn b64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in s.as_bytes().chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                T[((n >> (18 - 6 * i)) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out.as_bytes()
        .chunks(76)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join("\r\n")
}

#[test]
fn invitation_out_tokenized_reply_in_injected() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = calendarserver_site();

    // Out: the organizer's invitation leaves with a tokenized address.
    let out = smtp_send(s.postfix.port, "alice@example.org", &["bob@example.com"], &invitation());
    assert!(
        out.data.as_deref().unwrap_or("").starts_with("250"),
        "{out:?}\n{}",
        diagnostics(&s)
    );
    let received = s.postfix.wait_mailbox("bob-example.com", 1);
    assert_eq!(received.len(), 1, "{}", diagnostics(&s));
    let mail = &received[0];
    let reply_to = mail
        .lines()
        .find_map(|l| l.strip_prefix("Reply-To: "))
        .unwrap_or_else(|| panic!("no Reply-To in\n{mail}"))
        .trim()
        .to_owned();
    let token = reply_to
        .strip_prefix("calendar+")
        .and_then(|r| r.strip_suffix("@example.org"))
        .unwrap_or_else(|| panic!("Reply-To {reply_to}"))
        .to_owned();
    assert_eq!(token.len(), 36);
    assert!(
        mail.starts_with(&format!("Return-Path: <{reply_to}>")),
        "envelope sender tokenized:\n{mail}"
    );
    let a = imip_milter::analysis::analyse(mail.as_bytes());
    let cal = a.icalendar.unwrap_or_default().replace("\r\n ", "").replace("\n ", "");
    assert!(cal.contains(&format!("mailto:{reply_to}")), "{cal}");
    assert!(
        cal.contains("EMAIL=alice@example.org") && cal.contains("CN=\"Doe, Alice\""),
        "{cal}"
    );
    assert!(mail.contains("You are invited to the kickoff."));

    // In: Bob's reply to the tokenized address is injected with the real organizer.
    let reply = format!(
        "From: Bob <bob@example.com>\r\nTo: {reply_to}\r\nSubject: Accepted: Kickoff\r\nMessage-ID: <kickoff-reply@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: text/calendar; charset=utf-8; method=REPLY\r\n\r\nBEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Client//EN\r\nMETHOD:REPLY\r\nBEGIN:VEVENT\r\nUID:kickoff-2026@example.org\r\nDTSTAMP:20261120T110000Z\r\nORGANIZER;EMAIL=alice@example.org:mailto:{reply_to}\r\nATTENDEE;PARTSTAT=ACCEPTED:mailto:bob@example.com\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
    );
    let out = smtp_send(s.postfix.port, "bob@example.com", &[&reply_to], reply.as_bytes());
    assert!(
        out.data.as_deref().unwrap_or("").starts_with("250"),
        "{out:?}\n{}",
        diagnostics(&s)
    );
    let got = s.hook.wait_for(1, Duration::from_secs(15));
    assert_eq!(got.len(), 1, "refused: {:?}\n{}", s.hook.refused(), diagnostics(&s));
    assert_eq!(got[0].headers["recipient"], "mailto:alice@example.org");
    assert_eq!(got[0].headers["originator"], "mailto:bob@example.com");
    assert!(got[0].text.contains("PARTSTAT=ACCEPTED"));

    // An unknown token is refused at RCPT.
    let out = smtp_send(
        s.postfix.port,
        "bob@example.com",
        &["calendar+00000000-0000-4000-8000-000000000000@example.org"],
        reply.as_bytes(),
    );
    assert!(out.rcpt[0].starts_with("550 5.1.1 "), "{out:?}");

    // A person's text goes to the organizer.
    let text = format!(
        "From: Bob <bob@example.com>\r\nTo: {reply_to}\r\nSubject: Re: Kickoff\r\nMessage-ID: <kickoff-question@example.com>\r\n\r\nCan we move it to 11?\r\n"
    );
    let out = smtp_send(s.postfix.port, "bob@example.com", &[&reply_to], text.as_bytes());
    assert!(out.data.as_deref().unwrap_or("").starts_with("250"), "{out:?}");
    let alice = s.postfix.wait_mailbox("alice", 1);
    assert!(
        alice.iter().any(|m| m.contains("Can we move it to 11?")),
        "{}",
        diagnostics(&s)
    );

    // A bounce of the invitation is injected as a 5.1 status: it quotes the
    // Message-ID that went out with the token.
    let bounce = String::from_utf8(fixture("bounce.eml"))
        .unwrap()
        .replace(TOKEN, &token)
        .replace("invite-bounce-77-msg@example.org", "kickoff-invite@example.org")
        .replace("nobody@gone.example", "bob@example.com");
    let out = smtp_send(s.postfix.port, "", &[&reply_to], bounce.as_bytes());
    assert!(
        out.data.as_deref().unwrap_or("").starts_with("250"),
        "{out:?}\n{}",
        diagnostics(&s)
    );
    let got = s.hook.wait_for(2, Duration::from_secs(15));
    assert_eq!(got.len(), 2, "refused: {:?}\n{}", s.hook.refused(), diagnostics(&s));
    assert!(got[1].text.contains("REQUEST-STATUS:5.1"), "{}", got[1].text);
    assert_eq!(got[1].headers["originator"], "mailto:bob@example.com");
}

/// Replies per second through the private Postfix (not a pass/fail test):
/// cargo test --release --test postfix -- --ignored --nocapture throughput
#[test]
#[ignore]
fn throughput() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Discarded messages never reach the queue manager, so they return no
    // in_flow_delay tokens: without this, Postfix slows every smtpd to one
    // message a second once the initial tokens are spent.
    let s = site_with(&std::env::var("IMIP_MAIN_CF").unwrap_or_else(|_| "in_flow_delay = 0".into()));
    const N: usize = 400;
    const CLIENTS: usize = 8;
    let port = s.postfix.port;
    let start = Instant::now();
    std::thread::scope(|scope| {
        for c in 0..CLIENTS {
            scope.spawn(move || {
                for n in (c..N).step_by(CLIENTS) {
                    let out = smtp_send(port, "a@example.com", &[&gateway()], &reply_message(1000 + n, TOKEN));
                    assert!(out.data.as_deref().unwrap_or("").starts_with("250"), "{out:?}");
                }
            });
        }
    });
    let smtp = start.elapsed();
    s.hook.wait_for(N, Duration::from_secs(120));
    let all = start.elapsed();
    println!(
        "{N} replies over {CLIENTS} SMTP clients: {:.0} replies/s accepted (250 after spool fsync), {:.0} replies/s at the webhook",
        N as f64 / smtp.as_secs_f64(),
        N as f64 / all.as_secs_f64()
    );
    assert_eq!(s.hook.deliveries().len(), N);
    if std::env::var_os("IMIP_SHOW_LOGS").is_some() {
        println!("{}", diagnostics(&s));
    }
}

/// `[policy] sender = "dmarc"` believes Authentication-Results with this
/// site's authserv-id. A sender who writes one itself is believed only
/// where Postfix does not remove it first: the shipped header_checks table
/// does, before the milter sees the message.
#[test]
fn dmarc_policy_believes_no_authentication_results_a_sender_wrote() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let forged = format!(
        "Authentication-Results: mx.example.org; dkim=pass header.d=example.com; dmarc=pass (p=reject) header.from=example.com\r\n{}",
        String::from_utf8(fixture("apple.eml")).unwrap()
    );
    let table = tempfile::tempdir().unwrap();
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("postfix/imip-milter-header-checks"),
        table.path().join("header-checks"),
    )
    .unwrap();
    let send = |header_checks: &str| {
        let dir = tempfile::tempdir().unwrap();
        let hook = Webhook::start();
        let milter = Daemon::start_edited(dir.path(), &hook.url(), None, |c| {
            format!("{c}\n[policy]\nsender = \"dmarc\"\nauthserv_id = \"mx.example.org\"\n")
        });
        let postfix = Postfix::start_with(
            &format!("{{ inet:127.0.0.1:{}, default_action=tempfail }}", milter.port),
            header_checks,
        );
        let out = smtp_send(postfix.port, "bob@example.com", &[&gateway()], forged.as_bytes());
        let etc = postfix.etc();
        let check = milter.cli(&["check", "--postfix-config", etc.to_str().unwrap()]);
        let check = String::from_utf8_lossy(&check.stdout).into_owned();
        (
            out.data.unwrap_or_default(),
            format!("{}\n{check}", postfix.log()),
            milter.log(),
            check,
        )
    };
    // Without the table the milter cannot tell the forged header from its
    // MTA's; check says so.
    let (answer, maillog, log, check) = send("");
    assert!(answer.starts_with("250"), "{answer}\n{maillog}\n{log}");
    assert!(
        check.contains("FAIL") && check.contains("header_checks keeps"),
        "{check}"
    );
    // With it the header never reaches the milter, and the reply is refused.
    let (answer, maillog, log, check) = send(&format!(
        "header_checks = regexp:{}/header-checks",
        table.path().display()
    ));
    assert!(answer.starts_with("550 5.7.1 "), "{answer}\n{maillog}\n{log}");
    assert!(log.contains("no DMARC pass"), "{log}");
    assert!(check.contains("header_checks removes"), "{check}");
}

/// Greylisting would hold replies back: `check` warns, naming the setting,
/// when a policy service runs before an exemption for the gateway
/// addresses, and is quiet with the shipped table in front of it.
#[test]
fn check_warns_when_greylisting_comes_before_the_exemption() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let table = tempfile::tempdir().unwrap();
    let access = table.path().join("imip-milter-access");
    let shipped =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("postfix/imip-milter-access"))
            .unwrap();
    // As an admin edits it: every gateway address of the configuration.
    std::fs::write(&access, format!("{shipped}replies@example.net\tOK\n")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start();
    let milter = Daemon::start(dir.path(), &hook.url());
    // No policy service listens: fail fast, not after retries.
    let postfix = Postfix::start_with(
        &format!("{{ inet:127.0.0.1:{}, default_action=tempfail }}", milter.port),
        "smtpd_policy_service_try_limit = 1\nsmtpd_policy_service_timeout = 2s\n",
    );
    let etc = postfix.etc();
    // check reads main.cf through postconf: one instance, its list rewritten.
    let check = |restrictions: &str| {
        let set = std::process::Command::new("postconf")
            .arg("-c")
            .arg(&etc)
            .arg("-e")
            .arg(format!("smtpd_recipient_restrictions = {restrictions}"))
            .status()
            .unwrap();
        assert!(set.success());
        let out = milter.cli(&["check", "--postfix-config", etc.to_str().unwrap()]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("greylisting"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let policy = "check_policy_service inet:127.0.0.1:10023";
    let warned = check(policy);
    assert!(
        warned.starts_with("WARN") && warned.contains("check_policy_service") && warned.contains("imip-milter-access"),
        "{warned}"
    );
    let quiet = check(&format!(
        "check_recipient_access texthash:{}, {policy}",
        access.display()
    ));
    assert!(quiet.starts_with("OK") && quiet.contains("exempt"), "{quiet}");
    let after = check(&format!(
        "{policy}, check_recipient_access texthash:{}",
        access.display()
    ));
    assert!(after.starts_with("WARN"), "the exemption must come first: {after}");
    assert_eq!(
        check("permit_mynetworks, reject_unauth_destination"),
        "",
        "no greylisting, no word"
    );
}

/// `check` says what Postfix will actually do: an smtpd service in
/// master.cf that overrides smtpd_milters, transport_maps that do not send
/// the gateway address to the safety net, and another milter that refuses
/// MAIL FROM before the RCPT probe gets anywhere, each named with what to
/// change; quiet once each is right.
#[test]
fn check_names_what_postfix_will_actually_do() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start();
    let milter = Daemon::start(dir.path(), &hook.url());
    let ours = format!("{{ inet:127.0.0.1:{}, default_action=tempfail }}", milter.port);
    let postfix = Postfix::start(&ours);
    let etc = postfix.etc();
    let postconf = |args: &[&str]| {
        let ok = std::process::Command::new("postconf")
            .arg("-c")
            .arg(&etc)
            .args(args)
            .status()
            .unwrap();
        assert!(ok.success(), "postconf {args:?}");
    };
    let reload = || {
        let ok = std::process::Command::new("postfix")
            .arg("-c")
            .arg(&etc)
            .arg("reload")
            .status()
            .unwrap();
        assert!(ok.success());
        std::thread::sleep(Duration::from_secs(2));
    };
    let check = || {
        let out = milter.cli(&["check", "--postfix-config", etc.to_str().unwrap()]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let line = |text: &str, words: &str| text.lines().find(|l| l.contains(words)).unwrap_or("").to_owned();

    // No transport_maps: the safety net is not reached.
    let text = check();
    assert!(line(&text, "transport_maps").starts_with("WARN"), "{text}");
    let table = dir.path().join("transport");
    std::fs::write(
        &table,
        "calendar@example.org\timip-milter:\nreplies@example.net\timip-milter:\n",
    )
    .unwrap();
    postconf(&["-e", &format!("transport_maps = texthash:{}", table.display())]);
    let text = check();
    assert!(
        line(&text, "transport_maps sends calendar@example.org").starts_with("OK"),
        "{text}"
    );

    // The smtpd service of master.cf switches the milter off.
    let service = format!("127.0.0.1:{}", postfix.port);
    postconf(&["-P", &format!("{service}/inet/smtpd_milters=")]);
    let text = check();
    let over = line(&text, "master.cf service");
    assert!(
        over.starts_with("FAIL") && over.contains("remove that -o line"),
        "{text}"
    );
    postconf(&["-X", "-P", &format!("{service}/inet/smtpd_milters")]);
    let text = check();
    assert!(!text.contains("master.cf service"), "{text}");

    // A milter timeout that holds SMTP clients long on a hung milter, named with where to set it.
    postconf(&["-e", "milter_content_timeout = 15m"]);
    let text = check();
    let timeout = line(&text, "content_timeout=");
    assert!(
        timeout.starts_with("WARN") && timeout.contains("content_timeout=900s") && timeout.contains("at most 300s"),
        "{text}"
    );
    assert!(line(&text, "command_timeout=").starts_with("OK"), "{text}");

    // A dead milter before ours refuses MAIL FROM: named as such.
    postconf(&[
        "-e",
        &format!(
            "smtpd_milters = {{ inet:127.0.0.1:{}, default_action=tempfail }}, {ours}",
            common::free_port()
        ),
    ]);
    reload();
    let text = check();
    let probe = line(&text, "did not get to RCPT");
    assert!(
        probe.starts_with("FAIL") && probe.contains("MAIL FROM:<> answered: 451"),
        "{text}"
    );

    // Outbound on: a submission service that accepts while the milter is
    // down lets invitations leave untokenized; named, then quiet.
    let outbound = dir.path().join("outbound.toml");
    let base = std::fs::read_to_string(&milter.config_path).unwrap();
    std::fs::write(
        &outbound,
        format!(
            "{base}\n[tokens]\nmode = \"local\"\n\n[outbound]\nenabled = true\norganizer_domains = [\"example.org\"]\n"
        ),
    )
    .unwrap();
    let check_outbound = || {
        let out = common::cli(&outbound, &["check", "--postfix-config", etc.to_str().unwrap()]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    postconf(&["-M", "submission/inet=submission inet n - n - - smtpd"]);
    let port = milter.port;
    postconf(&[
        "-P",
        &format!("submission/inet/smtpd_milters={{inet:127.0.0.1:{port},default_action=accept}}"),
    ]);
    let text = check_outbound();
    let submission = line(&text, "submission service submission");
    assert!(
        submission.starts_with("WARN") && submission.contains("leave untokenized"),
        "{text}"
    );
    postconf(&[
        "-P",
        &format!("submission/inet/smtpd_milters={{inet:127.0.0.1:{port},default_action=tempfail}}"),
    ]);
    let text = check_outbound();
    assert!(line(&text, "submission service submission").starts_with("OK"), "{text}");
}

/// The shipped postconf script applied twice over a main.cf that has its
/// own milter, delimiter and policy service: one entry each, theirs kept,
/// the exemption before the policy service.
#[test]
fn the_shipped_postconf_script_can_run_twice() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("main.cf"),
        "compatibility_level = 3.6\nrecipient_delimiter = +\nsmtpd_milters = inet:127.0.0.1:8891\nsmtpd_recipient_restrictions = check_policy_service inet:127.0.0.1:10023\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("master.cf"), "").unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("postfix/imip-milter-postconf");
    for _ in 0..2 {
        let out = std::process::Command::new("sh")
            .arg(&script)
            .arg("-c")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let main_cf = std::fs::read_to_string(dir.path().join("main.cf")).unwrap();
    for key in [
        "recipient_delimiter =",
        "smtpd_milters =",
        "virtual_alias_maps =",
        "transport_maps =",
        "imip-milter_destination_recipient_limit =",
        "smtpd_recipient_restrictions =",
    ] {
        assert_eq!(main_cf.matches(key).count(), 1, "{key}\n{main_cf}");
    }
    assert_eq!(main_cf.matches("inet:127.0.0.1:8895").count(), 1, "{main_cf}");
    assert!(
        main_cf.contains("smtpd_milters = inet:127.0.0.1:8891, { inet:127.0.0.1:8895"),
        "{main_cf}"
    );
    assert!(
        main_cf.contains("smtpd_recipient_restrictions = check_recipient_access texthash:/etc/postfix/imip-milter-access, check_policy_service"),
        "{main_cf}"
    );

    // Again with the unix socket and --outbound: imip-milter's own entry is
    // replaced, theirs kept, the change printed; the submission service
    // defers while the milter is down.
    std::fs::write(dir.path().join("master.cf"), "submission inet n - y - - smtpd\n").unwrap();
    let unix = "{ unix:imip-milter/milter.sock, default_action=accept, connect_timeout=10s, command_timeout=10s, content_timeout=30s }";
    let run = || {
        let out = std::process::Command::new("sh")
            .arg(&script)
            .args(["-c", dir.path().to_str().unwrap(), "--outbound", unix])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let said = run();
    assert!(
        said.contains(&format!(
            "smtpd_milters = inet:127.0.0.1:8891, {unix} (was: inet:127.0.0.1:8891, {{ inet:127.0.0.1:8895"
        )),
        "{said}"
    );
    assert!(
        said.contains(
            "master.cf submission/inet: smtpd_milters = {unix:imip-milter/milter.sock,default_action=tempfail,"
        ),
        "{said}"
    );
    let main_cf = std::fs::read_to_string(dir.path().join("main.cf")).unwrap();
    assert!(
        !main_cf.contains("8895") && main_cf.contains("inet:127.0.0.1:8891"),
        "{main_cf}"
    );
    let master_cf = std::fs::read_to_string(dir.path().join("master.cf")).unwrap();
    assert!(
        master_cf.contains("-o smtpd_milters={unix:imip-milter/milter.sock,default_action=tempfail,"),
        "{master_cf}"
    );
    assert_eq!(run(), "", "nothing left to change");
}
