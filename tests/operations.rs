//! Running the daemon: SIGHUP reload, Prometheus metrics, JSON logs.

mod common;

use common::{fixture, free_port, wait_until, Daemon, Webhook};
use indymilter_test::{Status, TestConnection};
use std::{
    io::{Read, Write},
    time::Duration,
};

async fn rcpt_status(port: u16, rcpt: &str) -> Status {
    let mut conn = TestConnection::configure().open_tcp(("127.0.0.1", port)).await.unwrap();
    conn.connect("c.example.com", [192, 0, 2, 9]).await.unwrap();
    conn.mail(["<bob@example.com>"]).await.unwrap();
    let st = conn.rcpt([rcpt]).await.unwrap();
    conn.close().await.unwrap();
    st
}

async fn send_reply(port: u16) -> Status {
    send(port, "<bob@example.com>", "reply-all.eml").await
}

/// A fixture to the gateway, from `sender`, as Postfix hands it over.
async fn send(port: u16, sender: &str, eml: &str) -> Status {
    common::milter_send(("127.0.0.1", port), sender, &fixture(eml), "OPS1").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_gateway_addresses_and_keeps_a_bad_file_out() {
    let hook = Webhook::start();
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &hook.url());
    let bare = "<events@example.org>";
    assert_eq!(
        rcpt_status(d.port, bare).await,
        Status::Continue,
        "not a gateway address yet"
    );

    let text = std::fs::read_to_string(&d.config_path).unwrap();
    let added = text.replace(
        r#"addresses = ["calendar@example.org", "replies@example.net"]"#,
        r#"addresses = ["calendar@example.org", "events@example.org"]"#,
    );
    assert_ne!(added, text);
    std::fs::write(&d.config_path, &added).unwrap();
    d.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || d.log().contains("configuration reloaded")),
        "{}",
        d.log()
    );
    assert!(
        matches!(rcpt_status(d.port, bare).await, Status::Reject { .. }),
        "events@ is a gateway address now"
    );

    // Every changed key is named; one that needs a restart is named as
    // such; a broken file is refused.
    std::fs::write(
        &d.config_path,
        format!(
            "max_sessions = 9\n{}",
            added.replace("[delivery]", "[delivery]\nconcurrency = 9")
        ),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || d
            .log()
            .contains("max_sessions changed but can only change with a restart")),
        "{}",
        d.log()
    );
    assert!(
        d.log().contains("configuration reloaded: delivery.concurrency changed"),
        "{}",
        d.log()
    );
    std::fs::write(&d.config_path, "this is not toml [").unwrap();
    d.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || d
            .log()
            .contains("keeping the running configuration")),
        "{}",
        d.log()
    );
    assert!(
        matches!(rcpt_status(d.port, bare).await, Status::Reject { .. }),
        "still running on the last good file"
    );
}

/// An invitation from alice@example.org to bob@example.com over the milter
/// protocol from client 127.0.0.1, unauthenticated: whether it left
/// tokenized (the body replaced, a Reply-To to the gateway).
async fn invitation_tokenized(port: u16) -> bool {
    let mut conn = TestConnection::configure().open_tcp(("127.0.0.1", port)).await.unwrap();
    conn.connect("calendar.example.org", [127, 0, 0, 1]).await.unwrap();
    conn.mail(["<alice@example.org>"]).await.unwrap();
    assert_eq!(conn.rcpt(["<bob@example.com>"]).await.unwrap(), Status::Continue);
    conn.data().await.unwrap();
    let (actions, status) = common::milter_message(&mut conn, &fixture("invitation.eml"), "OUT1").await;
    let _ = conn.close().await;
    assert_eq!(status, Status::Accept, "{actions:?}");
    actions.actions.iter().any(|a| format!("{a:?}").contains("Reply-To"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_outbound_tokens_and_limits_without_a_restart() {
    let hook = Webhook::start();
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_edited(dir.path(), &hook.url(), None, |c| {
        format!(
            "{c}\n[tokens]\nmode = \"local\"\nmax_unknown = 50\n\n[outbound]\nenabled = true\norganizer_domains = [\"example.org\"]\ntrusted_clients = [\"127.0.0.2\"]\n"
        )
    });
    assert!(
        !invitation_tokenized(d.port).await,
        "127.0.0.1 is not trusted yet\n{}",
        d.log()
    );
    let text = std::fs::read_to_string(&d.config_path).unwrap();
    let edited = text
        .replace(
            r#"trusted_clients = ["127.0.0.2"]"#,
            r#"trusted_clients = ["127.0.0.1"]"#,
        )
        .replace("max_unknown = 50", "max_unknown = 2");
    assert_ne!(edited, text);
    std::fs::write(&d.config_path, &edited).unwrap();
    d.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || d.log().contains(
            "configuration reloaded: outbound.trusted_clients, tokens.max_unknown changed"
        )),
        "{}",
        d.log()
    );
    assert!(invitation_tokenized(d.port).await, "{}", d.log());
    // The new limit counts: the third unknown token from one client waits.
    let unknown = |i: u32| format!("<calendar+{i:08x}-0000-4000-8000-000000000000@example.org>");
    for i in 0..2 {
        let st = rcpt_status(d.port, &unknown(i)).await;
        assert!(matches!(st, Status::Reject { .. }), "{st:?}");
    }
    let st = rcpt_status(d.port, &unknown(3)).await;
    assert!(format!("{st:?}").contains("450"), "{st:?}\n{}", d.log());
    // A new spool has every table its first scan reads.
    assert!(!d.log().contains("cannot read the spool"), "{}", d.log());

    // The journal answers "did the invitation get a token?" both ways.
    let journal = |queue_id: &str| {
        let out = d.cli(&["journal", "--queue-id", queue_id]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        wait_until(Duration::from_secs(5), || journal("OUT1")
            .contains("outbound tokenized")),
        "{}",
        journal("OUT1")
    );
    let out1 = journal("OUT1");
    assert!(
        out1.contains("outbound not-tokenized") && out1.contains("reason=\"authorized by outbound.trusted_clients"),
        "{out1}"
    );
    assert!(
        out1.find("not-tokenized") < out1.find("outbound tokenized"),
        "oldest first: {out1}"
    );

    // The safety net's refusal of an unknown token is journaled too.
    let mut deliver = std::process::Command::new(env!("CARGO_BIN_EXE_imip-milter"))
        .args([
            "deliver",
            "--rcpt",
            &unknown(9),
            "--sender",
            "bob@example.com",
            "--queue-id",
            "DLV1",
        ])
        .arg("--config")
        .arg(&d.config_path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    deliver
        .stdin
        .take()
        .unwrap()
        .write_all(&fixture("reply-all.eml"))
        .unwrap();
    let done = deliver.wait_with_output().unwrap();
    assert_eq!(
        done.status.code(),
        Some(67),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(
        wait_until(Duration::from_secs(5), || journal("DLV1").contains("recipient reject")),
        "{}",
        journal("DLV1")
    );
}

fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_json_logs() {
    let hook = Webhook::start();
    let dir = tempfile::tempdir().unwrap();
    let mport = free_port();
    let d = Daemon::start_edited(dir.path(), &hook.url(), None, |c| {
        format!("log_format = \"json\"\n{c}\n[metrics]\nlisten = \"127.0.0.1:{mport}\"\n")
    });
    assert_eq!(send_reply(d.port).await, Status::Discard);
    assert!(matches!(
        rcpt_status(d.port, "<calendar@example.org>").await,
        Status::Reject { .. }
    ));
    // A delay warning from the null sender: taken quietly, counted, no delivery.
    assert_eq!(send(d.port, "<>", "dsn-delayed.eml").await, Status::Discard);
    // The same from a person is no report: answered, not swallowed.
    assert!(matches!(
        send(d.port, "<mallory@example.net>", "dsn-delayed.eml").await,
        Status::Reject { .. }
    ));
    hook.wait_for(1, Duration::from_secs(10));
    assert!(
        wait_until(Duration::from_secs(5), || scrape(mport)
            .contains("imip_milter_deliveries_total{result=\"delivered\"} 1")),
        "{}",
        scrape(mport)
    );
    let m = scrape(mport);
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    for want in [
        "imip_milter_messages_total{disposition=\"discard\"} 2",
        "imip_milter_messages_total{disposition=\"reject\"} 2",
        "imip_milter_delivery_reports_total 1",
        "imip_milter_spool_pending 0",
        "imip_milter_spool_oldest_pending_seconds 0.000",
        "imip_milter_delivery_seconds_count 1",
        "imip_milter_delivery_seconds_bucket{le=\"+Inf\"} 1",
    ] {
        assert!(m.contains(want), "missing {want} in\n{m}");
    }

    // Every log line is one JSON object; the message line carries the queue id.
    let log = d.log();
    let lines: Vec<&str> = log.lines().collect();
    assert!(!lines.is_empty());
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v.get("level").is_some() && v.get("message").is_some(), "{l}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("OPS1: from=<bob@example.com>") && l.contains("disposition=discard")),
        "{log}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("kind=report") && l.contains("disposition=discard")),
        "{log}"
    );
    assert_eq!(hook.deliveries().len(), 1, "the report is handed to nobody");
    assert!(!log.contains('\u{1b}'), "no colour codes when not on a terminal");
}

/// A state_dir owned by the daemon's user (nobody here), with the CLI and
/// the daemon started as root, as a newcomer does: root becomes the owner
/// before it opens anything, so a symlink the owner planted leads nowhere
/// the owner could not go, and the daemon's files stay the owner's.
#[test]
fn root_works_in_state_dir_as_its_owner() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let (uid, gid) = common::nobody();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(uid), Some(gid)).unwrap();
    // Root's own directory, where the owner plants a link.
    let secret_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(secret_dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let target = secret_dir.path().join("created-by-root");
    std::os::unix::fs::symlink(&target, state.join("spool.redb")).unwrap();
    let config = dir.path().join("imip-milter.toml");
    std::fs::write(
        &config,
        common::config_text(
            &state,
            "inet:127.0.0.1:1",
            "http://127.0.0.1:1/",
            "\n[tokens]\nmode = \"local\"\n",
        ),
    )
    .unwrap();
    let out = common::cli(
        &config,
        &[
            "tokens",
            "add",
            "--organizer",
            "alice@example.org",
            "--attendee",
            "bob@example.com",
            "--uid",
            "u1",
        ],
    );
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(!target.exists(), "root followed the owner's symlink");

    // Without the link, the daemon started as root runs as the owner.
    std::fs::remove_file(state.join("spool.redb")).unwrap();
    let hook = Webhook::start();
    let mut milter = Daemon::start_edited(dir.path(), &hook.url(), None, |c| c);
    assert!(
        wait_until(Duration::from_secs(10), || state.join("spool.redb").exists()),
        "{}",
        milter.log()
    );
    let spool = std::fs::metadata(state.join("spool.redb")).unwrap();
    assert_eq!((spool.uid(), spool.gid()), (uid, gid), "{}", milter.log());
    let status = std::fs::read_to_string(format!("/proc/{}/status", milter.pid().unwrap())).unwrap();
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        uid_line.split_whitespace().skip(1).all(|u| u == uid.to_string()),
        "{uid_line}"
    );
    assert!(milter.log().contains(&format!("uid {uid}")), "{}", milter.log());
    assert!(milter.terminate().success());
}

/// A spool the service user may not open is said to be a permission
/// problem (chown), not a foreign file.
#[test]
fn an_unreadable_spool_is_a_permission_problem() {
    use std::os::unix::{fs::PermissionsExt, process::CommandExt};
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    // As root, as the README's first command run as root once did.
    drop(imip_milter::spool::Spool::open(&state.join("spool.redb")).unwrap());
    let config = dir.path().join("imip-milter.toml");
    std::fs::write(
        &config,
        common::config_text(&state, "inet:127.0.0.1:1", "http://127.0.0.1:1/", ""),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (uid, gid) = common::nobody();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imip-milter"))
        .args(["queue", "list", "--config"])
        .arg(&config)
        .uid(uid)
        .gid(gid)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("permission denied") && err.contains("chown") && !err.contains("never overwritten"),
        "{err}"
    );
}

/// `check` run as root judges the files the service opens as the service
/// user would: a secret only root can read is a FAIL, however root sees it.
#[test]
fn check_as_root_judges_files_as_the_service_user() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let (uid, gid) = common::nobody();
    std::os::unix::fs::chown(&state, Some(uid), Some(gid)).unwrap();
    let secret = dir.path().join("webhook.password");
    std::fs::write(&secret, "pw\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = dir.path().join("imip-milter.toml");
    std::fs::write(
        &config,
        common::config_text(
            &state,
            "inet:127.0.0.1:1",
            "http://127.0.0.1:1/",
            &format!("username = \"u\"\npassword_file = \"{}\"\n", secret.display()),
        ),
    )
    .unwrap();
    let access = || {
        let out = common::cli(&config, &["check"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("access:"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let refused = access();
    assert!(
        refused.starts_with("FAIL access: target.password_file") && refused.contains("cannot read it"),
        "{refused}"
    );
    std::os::unix::fs::chown(&secret, Some(uid), Some(gid)).unwrap();
    assert_eq!(access(), "", "readable by the service user now");
}

/// Local token lookups in the metrics: made, answered by the memory of
/// unknown tokens, refused before a lookup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_lookups_are_counted() {
    let hook = Webhook::start();
    let dir = tempfile::tempdir().unwrap();
    let mport = free_port();
    let d = Daemon::start_edited(dir.path(), &hook.url(), None, |c| {
        format!("{c}\n[metrics]\nlisten = \"127.0.0.1:{mport}\"\n\n[tokens]\nmode = \"local\"\nmax_unknown = 2\n")
    });
    let guess = |n: u32| format!("<calendar+{n:08x}-0000-4000-8000-000000000000@example.org>");
    for (rcpt, want) in [
        (guess(1), "550 5.1.1 "),
        (guess(1), "550 5.1.1 "),
        (guess(2), "450 4.7.1 "),
    ] {
        match rcpt_status(d.port, &rcpt).await {
            Status::Reject { message: Some(m) } | Status::Tempfail { message: Some(m) } => {
                assert!(m.to_string_lossy().starts_with(want), "{m:?}")
            }
            other => panic!("{other:?}"),
        }
    }
    let m = scrape(mport);
    for want in [
        "imip_milter_token_lookups_total 2",
        "imip_milter_token_lookups_remembered_total 1",
        "imip_milter_token_lookups_refused_total 1",
    ] {
        assert!(m.contains(want), "missing {want} in\n{m}");
    }
}
