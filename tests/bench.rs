//! The benchmark behind bench/run (ignored in the test suite): throughput of
//! a private Postfix without a milter (A), with imip-milter on plain mail (B),
//! with imip-milter on replies (C), and with OpenDKIM verifying (D),
//! alternating in rounds; reply latency to the target; peak RSS; milter-only
//! throughput over the milter protocol. Prints a Markdown report.

mod common;

use common::{fixture, postfix::Postfix, reply_message, smtp_try, wait_until, Daemon, Webhook, TOKEN};
use indymilter_test::{MacroStage, Status, TestConnection};
use std::{
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct OpenDkim {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl OpenDkim {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = common::free_port();
        let conf = dir.path().join("opendkim.conf");
        std::fs::write(
            &conf,
            format!(
                "Mode v\nSocket inet:{port}@127.0.0.1\nSyslog no\nPidFile {}/opendkim.pid\nAutoRestart no\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let child = Command::new("opendkim")
            .args(["-f", "-x"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("opendkim (apt-get install opendkim)");
        assert!(wait_until(Duration::from_secs(10), || std::net::TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_ok()));
        Self { child, port, _dir: dir }
    }
}

impl Drop for OpenDkim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `n` messages over `clients` connections; messages per second and
/// the time each DATA ended.
fn burst(
    port: u16,
    n: usize,
    clients: usize,
    message: &(dyn Fn(usize) -> (String, Vec<u8>) + Sync),
) -> (f64, Vec<(usize, Instant)>) {
    let next = AtomicUsize::new(0);
    let start = Instant::now();
    let ends = std::sync::Mutex::new(Vec::with_capacity(n));
    std::thread::scope(|s| {
        for _ in 0..clients {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    return;
                }
                let (rcpt, data) = message(i);
                let out = smtp_try(port, "sender@example.net", &[&rcpt], &data).expect("smtp");
                assert!(out.data.as_deref().unwrap_or("").starts_with("250"), "{out:?}");
                if let Some(t) = out.data_sent_at {
                    ends.lock().unwrap().push((i, t));
                }
            });
        }
    });
    (n as f64 / start.elapsed().as_secs_f64(), ends.into_inner().unwrap())
}

fn vm_hwm_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    percentile(v, 0.5)
}

#[test]
#[ignore]
fn compare() {
    let rounds = env_usize("IMIP_BENCH_ROUNDS", 3);
    let per_round = env_usize("IMIP_BENCH_MESSAGES", 200);
    let clients = env_usize("IMIP_BENCH_CLIENTS", 8);
    let extra = "in_flow_delay = 0";

    let hook = Webhook::start();
    let dir = tempfile::tempdir().unwrap();
    let milter = Daemon::start(dir.path(), &hook.url());
    let dkim = OpenDkim::start();
    let a = Postfix::start_with("", extra);
    let b = Postfix::start_with(
        &format!(
            "{{ inet:127.0.0.1:{}, default_action=tempfail, command_timeout=10s }}",
            milter.port
        ),
        extra,
    );
    let d = Postfix::start_with(
        &format!("{{ inet:127.0.0.1:{}, default_action=accept }}", dkim.port),
        extra,
    );

    let plain = fixture("human-text.eml");
    let plain_msg = |_: usize| ("alice@example.org".to_owned(), plain.clone());
    let reply_base = AtomicUsize::new(100_000);
    let reply_msg = |i: usize| {
        let n = reply_base.load(Ordering::SeqCst) + i;
        (format!("calendar+{TOKEN}@example.org"), reply_message(n, TOKEN))
    };

    let (mut ra, mut rb, mut rc, mut rd) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut latencies = Vec::new();
    for round in 0..rounds {
        ra.push(burst(a.port, per_round, clients, &plain_msg).0);
        rb.push(burst(b.port, per_round, clients, &plain_msg).0);
        let before = hook.deliveries().len();
        reply_base.store(100_000 + round * per_round, Ordering::SeqCst);
        let (rate, ends) = burst(b.port, per_round, clients, &reply_msg);
        rc.push(rate);
        assert!(wait_until(Duration::from_secs(60), || hook.deliveries().len()
            >= before + per_round));
        let got = hook.deliveries();
        for (i, end) in ends {
            let uid = format!("event-{}@example.org", 100_000 + round * per_round + i);
            if let Some(dlv) = got.iter().find(|d| d.body["uid"] == uid.as_str()) {
                latencies.push(dlv.at.saturating_duration_since(end).as_secs_f64() * 1000.0);
            }
        }
        rd.push(burst(d.port, per_round, clients, &plain_msg).0);
    }
    let rss_after_runs = milter.pid().map(vm_hwm_kb).unwrap_or(0);

    // 50 concurrent SMTP sessions of replies, for the memory ceiling.
    reply_base.store(500_000, Ordering::SeqCst);
    let before = hook.deliveries().len();
    burst(b.port, 500, 50, &reply_msg);
    wait_until(Duration::from_secs(60), || hook.deliveries().len() >= before + 500);
    let rss_50 = milter.pid().map(vm_hwm_kb).unwrap_or(0);

    // The milter alone, over the milter protocol.
    let milter_only = {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let port = milter.port;
        let n = per_round * 2;
        rt.block_on(async move {
            let start = Instant::now();
            let mut tasks = Vec::new();
            for c in 0..clients {
                tasks.push(tokio::spawn(async move {
                    for i in (c..n).step_by(clients) {
                        let raw = String::from_utf8(reply_message(900_000 + i, TOKEN)).unwrap();
                        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
                        let mut conn = TestConnection::open(("127.0.0.1", port)).await.unwrap();
                        conn.connect("bench.example", [127, 0, 0, 1]).await.unwrap();
                        conn.mail(["<a@example.com>"]).await.unwrap();
                        conn.rcpt([format!("<calendar+{TOKEN}@example.org>").as_str()])
                            .await
                            .unwrap();
                        conn.data().await.unwrap();
                        for line in head.split("\r\n") {
                            let (k, v) = line.split_once(':').unwrap();
                            conn.header(k, v.trim_start()).await.unwrap();
                        }
                        conn.eoh().await.unwrap();
                        conn.body(body.as_bytes().to_vec()).await.unwrap();
                        conn.macros(MacroStage::Eom, [("i", "BENCH")]).await.unwrap();
                        let (_, st) = conn.eom().await.unwrap();
                        assert_eq!(st, Status::Discard);
                        conn.close().await.unwrap();
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            n as f64 / start.elapsed().as_secs_f64()
        })
    };

    latencies.sort_by(|a, b| a.total_cmp(b));
    let (ma, mb, mc, md) = (median(&mut ra), median(&mut rb), median(&mut rc), median(&mut rd));
    let fmt = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ");
    println!(
        "| run | messages/s (median of {rounds} rounds of {per_round}, {clients} SMTP clients) | rounds | ratio to A |"
    );
    println!("|---|---|---|---|");
    println!("| A plain mail, no milter | {ma:.0} | {} | 1.00 |", fmt(&ra));
    println!(
        "| B plain mail, imip-milter | {mb:.0} | {} | {:.2} |",
        fmt(&rb),
        mb / ma
    );
    println!(
        "| C replies, imip-milter + webhook | {mc:.0} | {} | {:.2} |",
        fmt(&rc),
        mc / ma
    );
    println!(
        "| D plain mail, OpenDKIM verify | {md:.0} | {} | {:.2} |",
        fmt(&rd),
        md / ma
    );
    println!();
    println!(
        "Reply latency, end of DATA to the webhook receiving it ({} replies): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(f64::NAN)
    );
    println!("Peak RSS of imip-milter: {:.1} MB after the rounds, {:.1} MB after 500 replies over 50 concurrent SMTP sessions", rss_after_runs as f64 / 1024.0, rss_50 as f64 / 1024.0);
    println!("Milter-only throughput (indymilter-test, {clients} connections, reply per connection): {milter_only:.0} replies/s");
}

/// RCPT answer time for a gateway recipient, per token store, under load:
/// `IMIP_BENCH_CLIENTS` milter connections at once, each session a MAIL and
/// eight gateway RCPTs with valid tokens picked from `IMIP_BENCH_TOKENS`.
/// Stores: redb in this host's spool, PostgreSQL in the program's tables, and
/// PostgreSQL in CalendarServer's IMIP_TOKENS. Prints a Markdown table.
#[test]
#[ignore]
fn token_lookup() {
    let tokens = env_usize("IMIP_BENCH_TOKENS", 10_000);
    let lookups = env_usize("IMIP_BENCH_LOOKUPS", 8_000);
    let clients = env_usize("IMIP_BENCH_CLIENTS", 8);
    let hook = Webhook::start();
    let pg = common::postgres::Postgres::start();
    pg.calendarserver_schema();
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("tokens.csv");
    let all: Vec<String> = (0..tokens)
        .map(|i| {
            format!(
                "{:08x}-0000-4000-8000-{i:012x}",
                i.wrapping_mul(2_654_435_761) % (1 << 32)
            )
        })
        .collect();
    let rows: String = all
        .iter()
        .enumerate()
        .map(|(i, t)| {
            format!(
                "{t},mailto:alice@example.org,mailto:guest{i}@example.com,event-{i}@example.org,2026-12-01 00:00:00\n"
            )
        })
        .collect();
    std::fs::write(&csv, rows).unwrap();
    let stores = [
        ("redb (this host)", String::new()),
        (
            "PostgreSQL, layout own",
            format!("store = \"postgres\"\nurl = \"{}\"\n", pg.url()),
        ),
        (
            "PostgreSQL, layout calendarserver",
            format!(
                "store = \"postgres\"\nurl = \"{}\"\nlayout = \"calendarserver\"\n",
                pg.url()
            ),
        ),
    ];
    println!("| token store | RCPT lookups | p50 ms | p99 ms | max ms | RCPTs/s |");
    println!("|---|---|---|---|---|---|");
    for (name, section) in stores {
        let home = tempfile::tempdir().unwrap();
        let milter = Daemon::start_edited(home.path(), &hook.url(), None, |c| {
            format!(
                "{}\n[tokens]\nmode = \"local\"\n{section}",
                c.replace("log_level = \"debug\"", "log_level = \"info\"")
            )
        });
        let out = milter.cli(&["tokens", "import", csv.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let port = milter.port;
        let rt = tokio::runtime::Runtime::new().unwrap();
        let run = |n: usize| {
            let all = all.clone();
            rt.block_on(async move {
                let start = Instant::now();
                let mut tasks = Vec::new();
                for c in 0..clients {
                    let all = all.clone();
                    tasks.push(tokio::spawn(async move {
                        let mut times = Vec::new();
                        let mut i = c;
                        while times.len() < n / clients {
                            let mut conn = TestConnection::open(("127.0.0.1", port)).await.unwrap();
                            conn.connect("bench.example", [127, 0, 0, 1]).await.unwrap();
                            conn.mail(["<guest@example.com>"]).await.unwrap();
                            for _ in 0..8 {
                                i = (i * 7919 + 104_729) % all.len();
                                let rcpt = format!("<calendar+{}@example.org>", all[i]);
                                let t = Instant::now();
                                let st = conn.rcpt([rcpt.as_str()]).await.unwrap();
                                times.push(t.elapsed().as_secs_f64() * 1000.0);
                                assert_eq!(st, Status::Continue);
                            }
                            conn.close().await.unwrap();
                        }
                        times
                    }));
                }
                let mut times = Vec::new();
                for t in tasks {
                    times.extend(t.await.unwrap());
                }
                (times, start.elapsed().as_secs_f64())
            })
        };
        run(400); // warm-up: connections, caches
        let (mut times, secs) = run(lookups);
        times.sort_by(|a, b| a.total_cmp(b));
        println!(
            "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.0} |",
            times.len(),
            percentile(&times, 0.5),
            percentile(&times, 0.99),
            times.last().copied().unwrap_or(f64::NAN),
            times.len() as f64 / secs
        );
    }
}
