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
    assert!(
        s.postfix
            .log()
            .contains(&format!("{queue_id}: to=<{}>, relay=imip-milter", gateway())),
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
        "accepts RCPT <calendar+imipcheck0@example.org>",
        "OK   spool: daemon answers",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    assert!(!text.contains("FAIL"), "{text}");

    // The classic failure of the old mailbox design: a credential the server no longer accepts.
    let (code, text) = check(&write_config("stale", "old-token"));
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("FAIL target:") && text.contains("target.token_file"),
        "{text}"
    );
    assert!(s.hook.deliveries().is_empty(), "check sends no reply");
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
