//! The benchmark behind bench/run (ignored in the test suite): throughput of
//! a private Postfix without a milter (A), with imip-milter on plain mail (B),
//! with imip-milter on replies (C), and with OpenDKIM verifying (D),
//! alternating in rounds; the milter's CPU per message and its milter-socket
//! round trips; reply latency to the target one at a time and under load;
//! peak RSS; milter-only throughput over the milter protocol. Prints a
//! Markdown report.

mod common;

use common::{fixture, postfix::Postfix, reply_message, smtp_send, smtp_try, wait_until, Daemon, Webhook, TOKEN};
use indymilter_test::{MacroStage, Status, TestConnection};
use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
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

/// Sends `n` messages over `clients` connections, as fast as they go or, with
/// `rate`, message i not before i/rate seconds; messages per second and when
/// each DATA ended (the final dot sent).
fn send(
    port: u16,
    n: usize,
    clients: usize,
    rate: Option<f64>,
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
                if let Some(rate) = rate {
                    let due = start + Duration::from_secs_f64(i as f64 / rate);
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
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

fn burst(
    port: u16,
    n: usize,
    clients: usize,
    message: &(dyn Fn(usize) -> (String, Vec<u8>) + Sync),
) -> (f64, Vec<(usize, Instant)>) {
    send(port, n, clients, None, message)
}

/// CPU time the process has used, user and system, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which may hold spaces: utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    fields.iter().sum::<u64>() as f64 / hz
}

/// A TCP relay between Postfix and the milter that counts milter protocol
/// packets: commands from Postfix (macro definitions aside) and the
/// milter's answers, each answer one round trip Postfix waited for.
struct CountingRelay {
    port: u16,
    commands: Arc<AtomicUsize>,
    answers: Arc<AtomicUsize>,
}

impl CountingRelay {
    fn start(milter_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let commands = Arc::new(AtomicUsize::new(0));
        let answers = Arc::new(AtomicUsize::new(0));
        let (c, a) = (commands.clone(), answers.clone());
        std::thread::spawn(move || {
            for mta in listener.incoming().flatten() {
                let milter = TcpStream::connect(("127.0.0.1", milter_port)).unwrap();
                let _ = mta.set_nodelay(true);
                let _ = milter.set_nodelay(true);
                let (mta2, milter2) = (mta.try_clone().unwrap(), milter.try_clone().unwrap());
                let (c, a) = (c.clone(), a.clone());
                // 'D' defines macros; every other packet from Postfix is a command.
                std::thread::spawn(move || Self::pump(mta, milter, c, |k| k != b'D'));
                // Accept, continue, discard, reject, tempfail, reply code, skip,
                // options: answers. Modification actions ride with the end-of-message answer.
                std::thread::spawn(move || Self::pump(milter2, mta2, a, |k| b"acdrtysO".contains(&k)));
            }
        });
        Self {
            port,
            commands,
            answers,
        }
    }

    fn pump(mut from: TcpStream, mut to: TcpStream, counter: Arc<AtomicUsize>, counts: fn(u8) -> bool) {
        let mut buf = vec![0u8; 65536];
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            pending.extend_from_slice(&buf[..n]);
            while pending.len() >= 5 {
                let len = u32::from_be_bytes([pending[0], pending[1], pending[2], pending[3]]) as usize;
                if pending.len() < 4 + len {
                    break;
                }
                if counts(pending[4]) {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                pending.drain(..4 + len);
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    }

    fn take(&self) -> (usize, usize) {
        (
            self.commands.swap(0, Ordering::SeqCst),
            self.answers.swap(0, Ordering::SeqCst),
        )
    }
}

/// Milliseconds from the end of DATA to the webhook holding each reply,
/// sorted. Postfix answers 250 after the end of DATA, so this bounds the
/// time from its 250 from above.
fn latencies(hook: &Webhook, ends: &[(usize, Instant)], uid: impl Fn(usize) -> String) -> Vec<f64> {
    let got = hook.deliveries();
    let at: std::collections::HashMap<String, Instant> = got
        .iter()
        .filter_map(|d| Some((d.body["uid"].as_str()?.to_owned(), d.at)))
        .collect();
    let mut ms: Vec<f64> = ends
        .iter()
        .filter_map(|(i, answered)| {
            at.get(&uid(*i))
                .map(|t| t.saturating_duration_since(*answered).as_secs_f64() * 1000.0)
        })
        .collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    ms
}

fn vm_hwm_kb(pid: u32) -> u64 {
    proc_status_kb(pid, "VmHWM:")
}

/// A field of /proc/PID/status in kB (VmRSS, VmHWM).
fn proc_status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
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
    // A production web server keeps connections open; so does this one here.
    hook.keep_alive();
    let dir = tempfile::tempdir().unwrap();
    // Logging as shipped (info: a line or two per message), not the tests' debug.
    // IMIP_BENCH_ON_FAILURE=keep: without keeping each reply for its notice.
    let on_failure = std::env::var("IMIP_BENCH_ON_FAILURE").unwrap_or_else(|_| "organizer".into());
    let milter = Daemon::start_edited(dir.path(), &hook.url(), None, |c| {
        c.replace("log_level = \"debug\"", "log_level = \"info\"")
            .replace("[delivery]\n", &format!("[delivery]\non_failure = \"{on_failure}\"\n"))
    });
    let pid = milter.pid().expect("daemon pid");
    let dkim = OpenDkim::start();
    let relay = CountingRelay::start(milter.port);
    let milter_entry = |port: u16| format!("{{ inet:127.0.0.1:{port}, default_action=tempfail, command_timeout=10s }}");
    let a = Postfix::start_with("", extra);
    let b = Postfix::start_with(&milter_entry(milter.port), extra);
    let counted = Postfix::start_with(&milter_entry(relay.port), extra);
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
    let uid_of = |base: usize| move |i: usize| format!("event-{}@example.org", base + i);

    // For perf/strace: only plain mail or only replies through the milter,
    // IMIP_BENCH_MESSAGES per round, and the milter's pid to attach to.
    if let Ok(what) = std::env::var("IMIP_BENCH_PROFILE") {
        eprintln!("profile {what}: milter pid {pid}");
        std::thread::sleep(Duration::from_secs(5));
        for round in 0..rounds {
            let base = 600_000 + round * per_round;
            reply_base.store(base, Ordering::SeqCst);
            let cpu = cpu_seconds(pid);
            let (rate, _) = match what.as_str() {
                "plain" => burst(b.port, per_round, clients, &plain_msg),
                _ => burst(b.port, per_round, clients, &reply_msg),
            };
            eprintln!(
                "{what}: {rate:.0}/s, {:.0} µs CPU per message",
                (cpu_seconds(pid) - cpu) / per_round as f64 * 1e6
            );
        }
        return;
    }

    let (mut ra, mut rb, mut rc, mut rd) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut cpu_plain, mut cpu_replies) = (0.0, 0.0);
    let mut burst_latencies = Vec::new();
    for round in 0..rounds {
        ra.push(burst(a.port, per_round, clients, &plain_msg).0);
        let cpu = cpu_seconds(pid);
        rb.push(burst(b.port, per_round, clients, &plain_msg).0);
        cpu_plain += cpu_seconds(pid) - cpu;
        let before = hook.deliveries().len();
        let base = 100_000 + round * per_round;
        reply_base.store(base, Ordering::SeqCst);
        let cpu = cpu_seconds(pid);
        let (rate, answers) = burst(b.port, per_round, clients, &reply_msg);
        rc.push(rate);
        assert!(wait_until(Duration::from_secs(60), || hook.deliveries().len()
            >= before + per_round));
        cpu_replies += cpu_seconds(pid) - cpu;
        burst_latencies.extend(latencies(&hook, &answers, uid_of(base)));
        rd.push(burst(d.port, per_round, clients, &plain_msg).0);
    }
    let rss_after_runs = vm_hwm_kb(pid);
    let (ma, mb, mc, md) = (median(&mut ra), median(&mut rb), median(&mut rc), median(&mut rd));

    // Reply latency one at a time, and at 80% of the highest reply rate measured above.
    let latency_run = |base: usize, n: usize, clients: usize, rate: Option<f64>| {
        reply_base.store(base, Ordering::SeqCst);
        let before = hook.deliveries().len();
        let (_, answers) = send(b.port, n, clients, rate, &reply_msg);
        assert!(wait_until(Duration::from_secs(60), || hook.deliveries().len() >= before + n));
        latencies(&hook, &answers, uid_of(base))
    };
    let one_at_a_time = latency_run(300_000, per_round, 1, None);
    let max_rate = rc.iter().copied().fold(0.0, f64::max);
    let paced_rate = 0.8 * max_rate;
    let paced = latency_run(400_000, per_round * 2, clients * 2, Some(paced_rate));

    // Milter-socket packets per message, through the counting relay.
    let counted_n = 50;
    burst(counted.port, counted_n, 1, &plain_msg);
    let (plain_commands, plain_answers) = relay.take();
    reply_base.store(450_000, Ordering::SeqCst);
    burst(counted.port, counted_n, 1, &reply_msg);
    let (reply_commands, reply_answers) = relay.take();

    // 50 concurrent SMTP sessions of replies, for the memory ceiling.
    reply_base.store(500_000, Ordering::SeqCst);
    let before = hook.deliveries().len();
    burst(b.port, 500, 50, &reply_msg);
    wait_until(Duration::from_secs(60), || hook.deliveries().len() >= before + 500);
    let rss_50 = vm_hwm_kb(pid);

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
    let total = (rounds * per_round) as f64;
    println!(
        "Milter CPU (user+system, /proc/PID/stat) per message: {:.0} µs per reply (spooled, delivered, journaled), {:.0} µs per plain message",
        cpu_replies / total * 1e6,
        cpu_plain / total * 1e6
    );
    let per = |x: usize| x as f64 / counted_n as f64;
    println!(
        "Milter-socket round trips per message (counting relay, {counted_n} of each, one SMTP session each): {:.1} per reply ({:.1} commands from Postfix), {:.1} per plain message ({:.1} commands)",
        per(reply_answers),
        per(reply_commands),
        per(plain_answers),
        per(plain_commands)
    );
    let line = |name: &str, v: &[f64]| {
        println!(
            "Reply latency, end of DATA to the webhook holding the reply, {name} ({} replies): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            v.len(),
            percentile(v, 0.5),
            percentile(v, 0.99),
            v.last().copied().unwrap_or(f64::NAN)
        )
    };
    line("one at a time", &one_at_a_time);
    line(
        &format!("at {paced_rate:.0}/s (80% of the highest C round, {max_rate:.0}/s)"),
        &paced,
    );
    burst_latencies.sort_by(|a, b| a.total_cmp(b));
    line(
        &format!("in the C bursts ({clients} clients, unpaced)"),
        &burst_latencies,
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
                // The bench's sessions all come from 127.0.0.1: no cap on
                // their lookups in flight, as for one client.
                "{}\n[tokens]\nmode = \"local\"\nmax_lookups_per_client = 1000\n{section}",
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

/// `bench/run backlog`: the webhook down while N replies arrive, then back.
/// Per N: the daemon's CPU per second while it waits, its RSS, a new reply's
/// time to the end-of-message answer (one at a time), the spool's size, and
/// the drain rate once the target answers again. IMIP_BENCH_BACKLOG lists
/// the sizes (2000,16000,100000).
#[test]
#[ignore]
fn backlog() {
    let sizes: Vec<usize> = std::env::var("IMIP_BENCH_BACKLOG")
        .unwrap_or_else(|_| "2000,16000,100000".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    println!("| backlog | fill s | idle CPU ms/s | RSS MB | new reply p50 / p99 ms | spool MB | drain replies/s |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for n in sizes {
        let mut hook = Webhook::start();
        hook.keep_alive();
        hook.stop();
        let dir = tempfile::tempdir().unwrap();
        let milter = Daemon::start_edited(dir.path(), &hook.url(), None, |c| {
            c.replace("log_level = \"debug\"", "log_level = \"info\"")
                .replace("max_backoff = \"1s\"", "max_backoff = \"10s\"")
                .replace("probe_interval = \"1s\"", "probe_interval = \"2s\"")
        });
        let pid = milter.pid().expect("daemon pid");
        let postfix = Postfix::start_with(
            &format!(
                "{{ inet:127.0.0.1:{}, default_action=tempfail, command_timeout=10s }}",
                milter.port
            ),
            "in_flow_delay = 0",
        );
        let reply = |i: usize| (format!("calendar+{TOKEN}@example.org"), reply_message(i, TOKEN));
        // Fill: eight SMTP clients at once, as fast as Postfix and the milter go.
        let t = Instant::now();
        send(postfix.port, n, 8, None, &reply);
        let fill = t.elapsed().as_secs_f64();
        // Settled: the target found down, what the fill left behind done.
        std::thread::sleep(Duration::from_secs(5));
        let cpu0 = cpu_seconds(pid);
        std::thread::sleep(Duration::from_secs(10));
        let idle_ms = (cpu_seconds(pid) - cpu0) * 1000.0 / 10.0;
        let rss_mb = proc_status_kb(pid, "VmRSS:") as f64 / 1024.0;
        // A new reply's time from the end of DATA to Postfix's 250.
        let mut lat: Vec<f64> = (0..200)
            .map(|i| {
                let (rcpt, data) = reply(n + i);
                let out = smtp_send(postfix.port, "sender@example.net", &[&rcpt], &data);
                let answered = Instant::now();
                assert!(out.data.as_deref().unwrap_or("").starts_with("250"), "{out:?}");
                std::thread::sleep(Duration::from_millis(20));
                answered
                    .duration_since(out.data_sent_at.expect("data sent"))
                    .as_secs_f64()
                    * 1000.0
            })
            .collect();
        lat.sort_by(|a, b| a.total_cmp(b));
        let spool_mb = std::fs::metadata(dir.path().join("state/spool.redb")).map_or(0, |m| m.len()) as f64 / 1048576.0;
        hook.restart();
        let total = n + 200;
        assert!(
            wait_until(Duration::from_secs(600), || hook.delivered().0 >= total),
            "{} of {total} delivered",
            hook.delivered().0
        );
        let (count, span) = hook.delivered();
        let drain = span.map_or(0.0, |(a, b)| {
            (count - 1) as f64 / b.duration_since(a).as_secs_f64().max(1e-3)
        });
        println!(
            "| {n} | {fill:.0} | {idle_ms:.1} | {rss_mb:.0} | {:.1} / {:.1} | {spool_mb:.0} | {drain:.0} |",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99)
        );
        drop(milter);
    }
}
