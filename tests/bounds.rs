//! Measurements for the resource bounds (issue: hostile input), not timed
//! tests: `cargo test --test bounds -- --ignored --nocapture`. They print
//! the daemon's peak RSS under 24 concurrent 10 MB messages and the spool
//! size after one 1 MB reply to 200 gateway recipients.

mod common;
use common::{Daemon, Webhook, TOKEN};
use indymilter_test::{Status, TestConnection};
use std::time::Duration;

fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn peak_rss_with_24_concurrent_10mb_messages() {
    let hook = Webhook::start();
    let dir = tempfile::tempdir().unwrap();
    let milter = Daemon::start_edited(dir.path(), &hook.url(), None, |c| {
        c.replace("max_message_bytes = 1000000", "max_message_bytes = 10485760")
    });
    let pid = milter.pid().unwrap();
    let port = milter.port;
    let mut tasks = Vec::new();
    for i in 0..24u8 {
        tasks.push(tokio::spawn(async move {
            let mut conn = TestConnection::configure()
                .read_timeout(Duration::from_secs(120))
                .open_tcp(("127.0.0.1", port))
                .await
                .unwrap();
            conn.connect("c", [192, 0, 2, i]).await.unwrap();
            conn.mail(["<bob@example.com>"]).await.unwrap();
            conn.rcpt([format!("<calendar+{TOKEN}@example.org>").as_str()])
                .await
                .unwrap();
            conn.data().await.unwrap();
            conn.header("Subject", "big").await.unwrap();
            conn.eoh().await.unwrap();
            for _ in 0..160 {
                conn.body(vec![b'x'; 65_000]).await.unwrap();
            }
            // All sessions hold what they buffered at once; end of message answers.
            tokio::time::sleep(Duration::from_secs(3)).await;
            conn.eom().await.unwrap().1
        }));
    }
    let mut tempfails = 0;
    for t in tasks {
        if matches!(t.await.unwrap(), Status::Tempfail { .. }) {
            tempfails += 1;
        }
    }
    println!("peak RSS {} kB; {} of 24 sessions got 451 4.3.2", rss(pid), tempfails);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn spool_size_for_one_reply_to_200_gateway_recipients() {
    let hook = Webhook::start();
    let dir = tempfile::tempdir().unwrap();
    let milter = Daemon::start_edited(dir.path(), &hook.url(), None, |c| {
        c.replace("max_message_bytes = 1000000", "max_message_bytes = 10485760")
    });
    let port = milter.port;
    let mut conn = TestConnection::configure()
        .read_timeout(Duration::from_secs(120))
        .open_tcp(("127.0.0.1", port))
        .await
        .unwrap();
    conn.connect("c", [192, 0, 2, 1]).await.unwrap();
    conn.mail(["<bob@example.com>"]).await.unwrap();
    let mut refused = 0;
    for i in 0..200 {
        let st = conn
            .rcpt([format!("<calendar+invented{i:06}@example.org>").as_str()])
            .await
            .unwrap();
        if st != Status::Continue {
            refused += 1;
        }
    }
    conn.data().await.unwrap();
    conn.header("From", "<bob@example.com>").await.unwrap();
    conn.header("Content-Type", "text/calendar; method=REPLY")
        .await
        .unwrap();
    conn.eoh().await.unwrap();
    let pad: String = (0..13000)
        .map(|_| "X-PAD:yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy\r\n")
        .collect();
    let ics = format!("BEGIN:VCALENDAR\r\nMETHOD:REPLY\r\nBEGIN:VEVENT\r\nUID:u1\r\n{pad}ATTENDEE;PARTSTAT=ACCEPTED:mailto:bob@example.com\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n");
    for c in ics.as_bytes().chunks(65_000) {
        conn.body(c.to_vec()).await.unwrap();
    }
    let (_, st) = conn.eom().await.unwrap();
    let size = std::fs::metadata(dir.path().join("state/spool.redb")).unwrap().len();
    println!(
        "reply {} bytes; {refused} of 200 recipients refused at RCPT; EOM {st:?}; spool {} bytes",
        ics.len(),
        size
    );
}
