//! Bad days: a full disk under the spool, a foreign spool file, a target
//! that hangs, the milter killed mid-burst. Each test is bounded in time.

mod common;

use common::{postfix::Postfix, reply_message, wait_until, Daemon, InProcess, Webhook, TOKEN};
use indymilter_test::Status;
use std::{
    collections::HashMap,
    io::Write,
    net::TcpListener,
    process::Command,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

async fn send(addr: std::net::SocketAddr, raw: &[u8], queue_id: &str) -> Status {
    common::milter_send(addr, "<bob@example.com>", raw, queue_id).await
}

/// A small tmpfs for the state directory, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn new(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs needs root");
        Self { dir }
    }

    /// Fills the disk; returns the filler to delete later.
    fn fill(&self) -> std::path::PathBuf {
        let path = self.dir.path().join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let _ = f.flush();
        // The last partial block too.
        while f.write_all(&[0u8; 512]).is_ok() {}
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazy: the spool writer thread may still hold its file for a moment.
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_tempfails_and_recovers_without_loss() {
    let hook = Webhook::start();
    let disk = SmallDisk::new("8m");
    let state = disk.dir.path().join("state");
    let text = common::config_text(&state, "inet:127.0.0.1:0", &hook.url(), "");
    let config = imip_milter::config::Config::parse(&text).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(imip_milter::run(config, listener, async move {
        let _ = stopped.await;
    }));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let filler = disk.fill();
    let mut refused = 0;
    for n in 0..5 {
        match send(addr, &reply_message(500 + n, TOKEN), &format!("FULL{n}")).await {
            Status::Tempfail { message: Some(m) } => {
                assert!(m.to_string_lossy().starts_with("451 4.3.0 "), "{m:?}");
                refused += 1;
            }
            Status::Discard => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(refused > 0, "a full disk must refuse with 451, not accept");
    let accepted_while_full = 5 - refused;

    // Space again: the same replies (the senders' retries) are taken.
    std::fs::remove_file(filler).unwrap();
    for n in 0..5 {
        let st = send(addr, &reply_message(500 + n, TOKEN), &format!("RETRY{n}")).await;
        assert_eq!(st, Status::Discard, "reply {n} after space came back");
    }
    let got = hook.wait_for(5, Duration::from_secs(20));
    let uids: std::collections::BTreeSet<String> = got
        .iter()
        .map(|d| d.body["uid"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        uids.len(),
        5,
        "every reply delivered ({accepted_while_full} taken while full)"
    );
    assert_eq!(got.len(), 5, "each once");
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(20), task).await;
}

#[test]
fn a_foreign_spool_file_stops_the_start_with_a_clear_error() {
    let hook = Webhook::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(
        state.join("spool.redb"),
        b"SQLite format 3\0 this is somebody else's file".repeat(50),
    )
    .unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        common::config_text(&state, "inet:127.0.0.1:0", &hook.url(), ""),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_imip-milter"))
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("spool.redb") && err.contains("never overwritten"), "{err}");
    assert!(
        std::fs::read(state.join("spool.redb"))
            .unwrap()
            .starts_with(b"SQLite format 3"),
        "left as it was"
    );
}

/// A target that never answers some requests: deliveries time out and are
/// retried, and the others go through meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_target_does_not_hold_up_other_deliveries() {
    let hook = Webhook::start();
    // In front of the webhook: requests for UIDs ending in "hang" never get an answer.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hung = Arc::new(AtomicUsize::new(0));
    let (h, upstream) = (hung.clone(), hook.port);
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let h = h.clone();
            std::thread::spawn(move || {
                use std::io::Read;
                s.set_read_timeout(Some(Duration::from_secs(5))).ok();
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0;
                loop {
                    match s.read(&mut buf[n..]) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                    let text = String::from_utf8_lossy(&buf[..n]);
                    if let Some(hdr_end) = text.find("\r\n\r\n") {
                        let len: usize = text[..hdr_end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if n >= hdr_end + 4 + len {
                            break;
                        }
                    }
                }
                let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                if req.contains("hang@example.org") {
                    h.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_secs(30));
                    return;
                }
                let mut up = std::net::TcpStream::connect(("127.0.0.1", upstream)).unwrap();
                up.write_all(&buf[..n]).unwrap();
                let mut resp = Vec::new();
                let _ = up.read_to_end(&mut resp);
                let _ = s.write_all(&resp);
            });
        }
    });
    let url = format!("http://127.0.0.1:{port}{}", hook.path);
    let m = InProcess::start_edited(&url, |c| {
        c.replace("timeout = \"5s\"", "timeout = \"1s\"")
            .replace("[delivery]", "[delivery]\nconcurrency = 2")
    })
    .await;
    let hang = String::from_utf8(reply_message(900, TOKEN))
        .unwrap()
        .replace("event-900@example.org", "hang@example.org");
    assert_eq!(send(m.addr, hang.as_bytes(), "HANG1").await, Status::Discard);
    let start = Instant::now();
    for n in 0..6 {
        assert_eq!(
            send(m.addr, &reply_message(910 + n, TOKEN), &format!("OK{n}")).await,
            Status::Discard
        );
    }
    let got = hook.wait_for(6, Duration::from_secs(20));
    assert_eq!(got.len(), 6, "the others are delivered");
    assert!(start.elapsed() < Duration::from_secs(15));
    assert!(
        wait_until(Duration::from_secs(10), || hung.load(Ordering::SeqCst) >= 2),
        "the hanging one is retried"
    );
    m.stop().await;
}

/// With default_action=tempfail, a milter killed mid-burst makes Postfix
/// answer 4xx; senders retry; the spool keeps what it took: nothing is lost.
#[test]
fn sigkill_mid_burst_loses_nothing() {
    let hook = Webhook::start();
    let dir = tempfile::tempdir().unwrap();
    let mut milter = Daemon::start(dir.path(), &hook.url());
    let postfix = Postfix::start(&format!(
        "{{ inet:127.0.0.1:{}, default_action=tempfail, command_timeout=10s }}",
        milter.port
    ));
    const N: usize = 40;
    let port = postfix.port;
    let sent = Arc::new(AtomicUsize::new(0));
    let retries = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(120);
    std::thread::scope(|scope| {
        for c in 0..4 {
            let (sent, retries) = (sent.clone(), retries.clone());
            scope.spawn(move || {
                for n in (c..N).step_by(4) {
                    // A sender's queue: retry 4xx until taken.
                    loop {
                        assert!(Instant::now() < deadline, "reply {n} never taken");
                        let out = common::smtp_try(
                            port,
                            "a@example.com",
                            &[&format!("calendar+{TOKEN}@example.org")],
                            &reply_message(2000 + n, TOKEN),
                        );
                        match out.ok().and_then(|o| o.data) {
                            Some(d) if d.starts_with("250") => break,
                            Some(d) if d.starts_with('5') => panic!("reply {n}: {d}"),
                            _ => {
                                retries.fetch_add(1, Ordering::SeqCst);
                                std::thread::sleep(Duration::from_millis(300));
                            }
                        }
                    }
                    sent.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        // Kill the milter once a quarter of the burst is in, restart it a second later.
        while sent.load(Ordering::SeqCst) < N / 4 {
            std::thread::sleep(Duration::from_millis(10));
        }
        milter.kill();
        std::thread::sleep(Duration::from_secs(1));
        milter.spawn();
    });
    let got = hook.wait_for(N, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    // Every reply arrives. One posted just before the kill may be posted again
    // after the restart (its outcome was not yet recorded): with the same
    // Idempotency-Key, so the target keeps it once.
    let mut keys: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
    for d in hook.deliveries() {
        keys.entry(d.body["uid"].as_str().unwrap_or("").to_owned())
            .or_default()
            .insert(d.idempotency_key.clone());
    }
    assert_eq!(
        keys.len(),
        N,
        "{} delivered; retries {}\n{}",
        got.len(),
        retries.load(Ordering::SeqCst),
        postfix.log()
    );
    assert!(keys.values().all(|k| k.len() == 1), "one id per reply: {keys:?}");
    assert!(retries.load(Ordering::SeqCst) > 0, "the kill was felt by the senders");
}

/// A local user floods the metrics port and the milter port until the
/// daemon's descriptor table is full: the daemon says so once, keeps
/// running, and serves the next reply once the flood is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_descriptor_table_is_survived() {
    let hook = Webhook::start();
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = common::free_port();
    let mut milter = Daemon::start_edited(dir.path(), &hook.url(), None, |c| {
        format!("{c}\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n")
    });
    let pid = milter.pid().expect("pid").to_string();
    let limited = Command::new("prlimit")
        .args(["--nofile=64:64", "--pid", &pid])
        .status()
        .unwrap();
    assert!(limited.success());
    let mut flood = Vec::new();
    for port in [metrics_port, milter.port] {
        for _ in 0..120 {
            if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                flood.push(s);
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        milter.log().contains("cannot accept milter connections"),
        "the flood filled the table: {}",
        milter.log()
    );
    drop(flood);
    // The backoff is at most 1 s; then the next reply is served.
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", milter.port).parse().unwrap();
    let status = tokio::time::timeout(
        Duration::from_secs(20),
        send(addr, &common::fixture("apple.eml"), "FD1"),
    )
    .await
    .expect("answered in time");
    assert_eq!(status, Status::Discard, "{}", milter.log());
    assert_eq!(hook.wait_for(1, Duration::from_secs(10)).len(), 1);
    let log = milter.log();
    assert_eq!(log.matches("cannot accept milter connections").count(), 1, "{log}");
    assert!(log.contains("accepting connections again"), "{log}");
    assert!(milter.terminate().success());
}

/// Tokens are capabilities: no log level prints one whole, not even the
/// milter library's own trace lines of each milter command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_carry_no_whole_token() {
    let hook = Webhook::start();
    let dir = tempfile::tempdir().unwrap();
    let mut milter = Daemon::start_edited(dir.path(), &hook.url(), None, |c| {
        c.replace("log_level = \"debug\"", "log_level = \"trace\"")
    });
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", milter.port).parse().unwrap();
    assert_eq!(
        send(addr, &common::fixture("apple.eml"), "TRACE1").await,
        Status::Discard
    );
    assert_eq!(hook.wait_for(1, Duration::from_secs(10)).len(), 1);
    assert!(milter.terminate().success());
    let log = milter.log();
    assert!(log.contains("TRACE") && log.contains(&TOKEN[..8]), "{log}");
    assert!(!log.contains(TOKEN), "a whole token in the log:\n{log}");
}
