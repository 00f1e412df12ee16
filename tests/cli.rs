//! The command line: `inspect` on every fixture, `queue` against a running
//! daemon, and target authentication read from a file.

mod common;

use common::{fixture, wait_until, InProcess, Webhook, TOKEN};
use indymilter_test::Status;
use std::{process::Command, time::Duration};

fn imip(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_imip-milter"))
        .args(args)
        .output()
        .expect("run imip-milter");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn inspect_json_gives_a_decision_for_every_fixture() {
    let rcpt = format!("<calendar+{TOKEN}@example.org>");
    let dir = format!("{}/tests/fixtures", env!("CARGO_MANIFEST_DIR"));
    let want = [
        ("apple.eml", "discard", "reply"),
        ("bounce.eml", "discard", "bounce"),
        ("forwarded-request.eml", "reject", "other"),
        ("google.eml", "discard", "reply"),
        ("groupware-latin1.eml", "discard", "reply"),
        ("human-text.eml", "reject", "other"),
        ("outlook-tnef.eml", "reject", "other"),
        ("outlook.eml", "discard", "reply"),
        ("reply-all.eml", "discard", "reply"),
        ("thunderbird.eml", "discard", "reply"),
        ("truncated.eml", "reject", "malformed"),
        ("dsn-back-to-back.eml", "discard", "bounce"),
        ("bounce-organizer-first.eml", "discard", "bounce"),
        ("dsn-delayed.eml", "discard", "report"),
        ("reply-without-attendee.eml", "reject", "other"),
        ("counter.eml", "discard", "reply"),
        ("refresh.eml", "discard", "reply"),
        ("invitation.eml", "reject", "other"),
        ("reply-from-alias.eml", "discard", "reply"),
    ];
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            continue; // hostile/: regression inputs, tested in decide.rs; sql/: not mail
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let (ok, out, err) = imip(&[
            "inspect",
            "--gateway",
            "calendar@example.org",
            "--rcpt",
            &rcpt,
            "--json",
            path.to_str().unwrap(),
        ]);
        assert!(ok, "{name}: exit status must be 0 for any decision: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{name}: {e}: {out}"));
        let (_, disposition, kind) = want
            .iter()
            .find(|w| w.0 == name)
            .unwrap_or_else(|| panic!("no expectation for {name}"));
        assert_eq!(v["disposition"], *disposition, "{name}: {out}");
        assert_eq!(v["kind"], *kind, "{name}: {out}");
        for key in ["smtp_reply", "token", "method", "uid", "attendee", "partstat", "reason"] {
            assert!(v.get(key).is_some(), "{name}: {key} missing in {out}");
        }
        // A bounce answers for the failed recipient, with no PARTSTAT.
        let failed = [
            ("bounce.eml", "mailto:nobody@gone.example"),
            ("dsn-back-to-back.eml", "mailto:carol@example.net"),
            ("bounce-organizer-first.eml", "mailto:dave@example.net"),
        ];
        if let Some((_, who)) = failed.iter().find(|f| f.0 == name) {
            assert_eq!(v["attendee"], *who, "{name}: {out}");
            assert!(v["partstat"].is_null(), "{name}: {out}");
        }
        if *disposition == "reject" {
            assert!(v["smtp_reply"].as_str().unwrap().starts_with("550 5."), "{name}: {out}");
        }
        seen += 1;
    }
    assert_eq!(seen, want.len());

    // Mixed recipients, and a bare gateway address, from standard input.
    let (_, out, _) = imip(&[
        "inspect",
        "--gateway",
        "calendar@example.org",
        "--rcpt",
        "<grace@example.org>",
        "--rcpt",
        &rcpt,
        "--json",
        &format!("{dir}/reply-all.eml"),
    ]);
    assert!(out.contains("\"disposition\":\"delete-recipients\""), "{out}");
    let (ok, out, _) = imip(&[
        "inspect",
        "--gateway",
        "calendar@example.org",
        "--rcpt",
        "calendar@example.org",
        "--json",
        &format!("{dir}/apple.eml"),
    ]);
    assert!(ok);
    assert!(out.contains("\"smtp_reply\":\"550 5.1.1 "), "{out}");
}

#[test]
fn config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[gateway]\naddresses = []\n[target]\nurl = \"http://x/\"\n").unwrap();
    let (ok, _, err) = imip(&["run", "--config", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("gateway.addresses"), "{err}");
}

async fn send(m: &InProcess, eml: &str, queue_id: &str) -> Status {
    common::milter_send(m.addr, "<bob@example.com>", &fixture(eml), queue_id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_list_show_retry_delete_through_the_daemon() {
    let hook = Webhook::start();
    hook.fail_next(&[404, 404]); // permanent: kept as failed
    let m = InProcess::start(&hook.url()).await;
    let config = m.state_dir.path().join("cli.toml");
    std::fs::write(
        &config,
        common::config_text(m.state_dir.path(), "inet:127.0.0.1:1", &hook.url(), ""),
    )
    .unwrap();
    let cfg = config.to_str().unwrap().to_owned();
    assert_eq!(send(&m, "apple.eml", "AQUEUE1").await, Status::Discard);
    assert_eq!(send(&m, "outlook.eml", "AQUEUE2").await, Status::Discard);

    let list = || imip(&["queue", "list", "--config", &cfg]).1;
    assert!(
        wait_until(Duration::from_secs(10), || list().contains("-- 0 pending, 2 failed")),
        "{}",
        list()
    );
    let text = list();
    assert!(text.contains("HTTP 404"), "{text}");
    assert!(
        text.contains("8e3c0d1a…") && !text.contains(TOKEN),
        "token shown shortened: {text}"
    );
    let ids: Vec<String> = text
        .lines()
        .filter(|l| l.contains("failed"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|id| id.len() == 32)
        .collect();
    assert_eq!(ids.len(), 2, "{text}");

    let (ok, show, _) = imip(&["queue", "show", &ids[0], "--config", &cfg]);
    assert!(ok);
    let rec: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(rec["state"], "failed");
    assert!(rec["created_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{rec}");
    assert_eq!(rec["payload"]["token"], TOKEN);
    // The same record by a prefix of its id, its queue id, its Message-ID.
    let queue_id = rec["queue_id"].as_str().unwrap().to_owned();
    let message_id = rec["payload"]["message_id"].as_str().unwrap().to_owned();
    for key in [&ids[0][..8], queue_id.as_str(), message_id.as_str()] {
        let (ok, show, err) = imip(&["queue", "show", key, "--config", &cfg]);
        assert!(ok, "{key}: {err}");
        assert!(show.contains(&format!("\"id\": \"{}\"", ids[0])), "{key}: {show}");
    }
    let (ok, _, err) = imip(&["queue", "show", "nope-nothing", "--config", &cfg]);
    assert!(!ok && err.contains("no record"), "{err}");

    // Delete and retry take what show takes: the other record by its queue
    // id, this one by the prefix of its id.
    let (_, other, _) = imip(&["queue", "show", &ids[1], "--config", &cfg]);
    let other: serde_json::Value = serde_json::from_str(&other).unwrap();
    let other_queue_id = other["queue_id"].as_str().unwrap().to_owned();
    let (ok, _, err) = imip(&["queue", "delete", &other_queue_id, "--config", &cfg]);
    assert!(ok, "{err}");
    let (ok, _, err) = imip(&["queue", "delete", &ids[1], "--config", &cfg]);
    assert!(!ok && err.contains("no record"), "{err}");

    let (ok, _, err) = imip(&["queue", "retry", &ids[0][..8], "--config", &cfg]);
    assert!(ok, "{err}");
    let got = hook.wait_for(1, Duration::from_secs(10));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body["id"], ids[0].as_str());
    assert!(
        wait_until(Duration::from_secs(5), || list().contains("-- 0 pending, 0 failed")),
        "{}",
        list()
    );
    let all = imip(&["queue", "list", "--all", "--config", &cfg]).1;
    assert!(
        all.contains("delivered") && all.contains("-- 0 pending, 0 failed, 1 delivered"),
        "the footer counts what is listed: {all}"
    );
    m.stop().await;
}

/// `queue retry --all` acts as `postqueue -f`: a reply still waiting in
/// backoff is tried now, not only the failed ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_retry_all_tries_waiting_records_now() {
    let hook = Webhook::start();
    let m = InProcess::start_edited(&hook.url(), |c| {
        c.replace("initial_backoff = \"200ms\"", "initial_backoff = \"1h\"")
            .replace("max_backoff = \"1s\"", "max_backoff = \"2h\"")
    })
    .await;
    hook.fail_next(&[503]);
    let config = m.state_dir.path().join("cli.toml");
    std::fs::write(
        &config,
        common::config_text(m.state_dir.path(), "inet:127.0.0.1:1", &hook.url(), ""),
    )
    .unwrap();
    let cfg = config.to_str().unwrap().to_owned();
    assert_eq!(send(&m, "apple.eml", "WAIT1").await, Status::Discard);
    let list = || imip(&["queue", "list", "--config", &cfg]).1;
    assert!(
        wait_until(Duration::from_secs(10), || list().contains("HTTP 503")),
        "{}",
        list()
    );
    assert!(list().contains("-- 1 pending, 0 failed"), "{}", list());
    let (ok, out, err) = imip(&["queue", "retry", "--all", "--config", &cfg]);
    assert!(ok && out.contains("1 record(s)"), "{out}{err}");
    let got = hook.wait_for(1, Duration::from_secs(10));
    assert_eq!(got.len(), 1, "tried now, not in an hour");
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_is_read_from_its_file() {
    let hook = Webhook::start();
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("webhook.token");
    std::fs::write(&token_file, "s3cret-bearer\n").unwrap();
    let m = InProcess::start_with(&hook.url(), &format!("token_file = \"{}\"\n", token_file.display())).await;
    assert_eq!(send(&m, "thunderbird.eml", "BAUTH1").await, Status::Discard);
    let got = hook.wait_for(1, Duration::from_secs(10));
    assert_eq!(got[0].authorization.as_deref(), Some("Bearer s3cret-bearer"));
    m.stop().await;
}

fn deliver(cfg: &str, rcpt: &str, eml: &str) -> (i32, String) {
    deliver_from(cfg, rcpt, eml, "192.0.2.80")
}

/// As Postfix's pipe runs it, with `${client_address}`.
fn deliver_from(cfg: &str, rcpt: &str, eml: &str, client: &str) -> (i32, String) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_imip-milter"))
        .args([
            "deliver",
            "--config",
            cfg,
            "--sender",
            "bob@example.com",
            "--queue-id",
            "DQ1",
            "--client-addr",
            client,
            "--rcpt",
            rcpt,
        ])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("deliver");
    child.stdin.take().unwrap().write_all(&fixture(eml)).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliver_through_the_daemon_answers_with_sysexits() {
    let hook = Webhook::start();
    let m = InProcess::start(&hook.url()).await;
    let config = m.state_dir.path().join("cli.toml");
    std::fs::write(
        &config,
        common::config_text(m.state_dir.path(), "inet:127.0.0.1:1", &hook.url(), ""),
    )
    .unwrap();
    let cfg = config.to_str().unwrap().to_owned();
    let rcpt = format!("calendar+{TOKEN}@example.org");

    let (code, err) = tokio::task::spawn_blocking({
        let (cfg, rcpt) = (cfg.clone(), rcpt.clone());
        move || deliver(&cfg, &rcpt, "outlook.eml")
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    let got = hook.wait_for(1, Duration::from_secs(10));
    assert_eq!(got[0].body["queue_id"], "DQ1");
    assert_eq!(got[0].body["envelope"]["mail_from"], "bob@example.com");

    let cases = [
        (rcpt.clone(), "human-text.eml", 77, "write to the organizer"),
        (rcpt.clone(), "truncated.eml", 65, "truncated"),
        ("calendar@example.org".to_owned(), "apple.eml", 67, "calendar program"),
        ("alice@example.org".to_owned(), "apple.eml", 67, "not a gateway address"),
    ];
    for (r, eml, want, text) in cases {
        let c = cfg.clone();
        let (code, err) = tokio::task::spawn_blocking(move || deliver(&c, &r, eml)).await.unwrap();
        assert_eq!(code, want, "{eml}: {err}");
        assert!(err.contains(text), "{eml}: {err}");
        assert!(!err.starts_with("550"), "pipe(8) adds its own code: {err}");
    }
    m.stop().await;
}

#[test]
fn deliver_without_daemon_spools_and_delivers_itself() {
    let hook = Webhook::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("imip-milter.toml");
    std::fs::write(
        &config,
        common::config_text(&dir.path().join("state"), "inet:127.0.0.1:1", &hook.url(), ""),
    )
    .unwrap();
    let (code, err) = deliver(
        config.to_str().unwrap(),
        &format!("calendar+{TOKEN}@example.org"),
        "apple.eml",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(hook.deliveries().len(), 1, "delivered before deliver exits");
    // Same message again: a duplicate, taken (exit 0) and not delivered twice.
    let (code, _) = deliver(
        config.to_str().unwrap(),
        &format!("calendar+{TOKEN}@example.org"),
        "apple.eml",
    );
    assert_eq!(code, 0);
    assert_eq!(hook.deliveries().len(), 1);
}

#[test]
fn check_warns_about_a_secret_file_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let hook = Webhook::start();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("webhook.token");
    std::fs::write(&secret, "s3cret\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = dir.path().join("imip-milter.toml");
    std::fs::write(
        &cfg,
        common::config_text(
            &dir.path().join("state"),
            "inet:127.0.0.1:1",
            &hook.url(),
            &format!("token_file = \"{}\"\n", secret.display()),
        ),
    )
    .unwrap();
    let check = || imip(&["check", "--config", cfg.to_str().unwrap()]).1;
    let out = check();
    assert!(
        out.lines()
            .any(|l| l.contains("WARN") && l.contains("target.token_file") && l.contains("644")),
        "{out}"
    );
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = check();
    assert!(
        out.lines().any(|l| l.contains("OK") && l.contains("target.token_file")),
        "{out}"
    );
}

/// The safety net counts unknown tokens per SMTP client too, not in one
/// bucket for everybody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliver_counts_unknown_tokens_per_client() {
    const LOCAL: &str = "\n[tokens]\nmode = \"local\"\nmax_unknown = 2\n";
    let hook = Webhook::start();
    let m = InProcess::start_with(&hook.url(), LOCAL).await;
    let config = m.state_dir.path().join("cli.toml");
    std::fs::write(
        &config,
        common::config_text(m.state_dir.path(), "inet:127.0.0.1:1", &hook.url(), LOCAL),
    )
    .unwrap();
    let cfg = config.to_str().unwrap().to_owned();
    let run = |client: &'static str, guess: u32| {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || {
            deliver_from(
                &cfg,
                &format!("calendar+guess-{guess:08}@example.org"),
                "apple.eml",
                client,
            )
            .0
        })
    };
    assert_eq!(run("198.51.100.7", 1).await.unwrap(), 67);
    assert_eq!(run("198.51.100.7", 2).await.unwrap(), 67);
    // The prober waits (75 = EX_TEMPFAIL); another client is not affected.
    assert_eq!(run("198.51.100.7", 3).await.unwrap(), 75);
    assert_eq!(run("192.0.2.81", 4).await.unwrap(), 67);
    m.stop().await;
}
