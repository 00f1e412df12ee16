//! The milter protocol, driven by indymilter-test against the milter running
//! in-process, with a real HTTP webhook behind it.

mod common;

use common::{fixture, InProcess, Webhook, TOKEN};
use indymilter_test::{MacroStage, Status, TestConnection};
use std::time::{Duration, Instant};

async fn open(m: &InProcess) -> TestConnection {
    let mut conn = TestConnection::configure()
        .read_timeout(Duration::from_secs(30))
        .write_timeout(Duration::from_secs(30))
        .open_tcp(m.addr)
        .await
        .expect("connect to milter");
    let st = conn.connect("client.example.com", [192, 0, 2, 7]).await.unwrap();
    // Negotiated: Postfix does not wait at connect, MAIL, headers or body.
    assert_eq!(st, Status::Noreply);
    conn
}

/// A transaction from `from` to the gateway, up to DATA.
async fn to_gateway(m: &InProcess, from: &str) -> TestConnection {
    let mut conn = open(m).await;
    assert_eq!(conn.mail([from]).await.unwrap(), Status::Noreply);
    let rcpt = format!("<calendar+{TOKEN}@example.org>");
    assert_eq!(conn.rcpt([rcpt.as_str()]).await.unwrap(), Status::Continue);
    assert_eq!(conn.data().await.unwrap(), Status::Continue);
    conn
}

/// The SMTP reply of a Reject status.
fn rejection(status: Status) -> String {
    match status {
        Status::Reject { message: Some(m) } => m.to_string_lossy().into_owned(),
        other => panic!("expected a reject with a reply, got {other:?}"),
    }
}

/// `chunks` body chunks of 60 kB, each answered `each`.
async fn big_body(conn: &mut TestConnection, chunks: usize, each: Status) {
    for _ in 0..chunks {
        assert_eq!(conn.body(vec![b'x'; 60_000]).await.unwrap(), each);
    }
}

/// End of message, with `queue_id` as Postfix sends it.
async fn end(conn: &mut TestConnection, queue_id: &str) -> (indymilter_test::EomActions, Status) {
    conn.macros(MacroStage::Eom, [("i", queue_id)]).await.unwrap();
    conn.eom().await.unwrap()
}

/// Sends headers and body of a raw message; returns the EOM result.
async fn send_message(conn: &mut TestConnection, raw: &[u8], queue_id: &str) -> (indymilter_test::EomActions, Status) {
    let text = String::from_utf8_lossy(raw).replace("\r\n", "\n");
    let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in head.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = headers.last_mut() {
                last.1.push_str("\r\n");
                last.1.push_str(line);
            }
        } else if let Some((k, v)) = line.split_once(':') {
            headers.push((k.to_owned(), v.trim_start().to_owned()));
        }
    }
    for (k, v) in &headers {
        assert_eq!(conn.header(k.as_str(), v.as_str()).await.unwrap(), Status::Noreply);
    }
    assert_eq!(conn.eoh().await.unwrap(), Status::Noreply);
    let body = body.replace('\n', "\r\n");
    let st = conn.body(body.into_bytes()).await.unwrap();
    assert_eq!(st, Status::Noreply);
    end(conn, queue_id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_is_spooled_discarded_and_delivered() {
    let hook = Webhook::start();
    let m = InProcess::start(&hook.url()).await;
    let mut conn = open(&m).await;
    assert_eq!(conn.mail(["<bob@example.com>"]).await.unwrap(), Status::Noreply);
    let rcpt = format!("<calendar+{TOKEN}@example.org>");
    assert_eq!(conn.rcpt([rcpt.as_str()]).await.unwrap(), Status::Continue);
    assert_eq!(conn.data().await.unwrap(), Status::Continue);
    let (_, status) = send_message(&mut conn, &fixture("apple.eml"), "4QxYz1AbC").await;
    assert_eq!(status, Status::Discard);
    conn.close().await.unwrap();

    let got = hook.wait_for(1, Duration::from_secs(10));
    assert_eq!(got.len(), 1, "refused: {:?}", hook.refused());
    let b = &got[0].body;
    assert_eq!(b["kind"], "reply");
    assert_eq!(b["token"], TOKEN);
    assert_eq!(b["queue_id"], "4QxYz1AbC");
    assert_eq!(b["envelope"]["mail_from"], "bob@example.com");
    assert_eq!(b["envelope"]["rcpt"], format!("calendar+{TOKEN}@example.org"));
    assert_eq!(b["envelope"]["client_addr"], "192.0.2.7");
    assert_eq!(b["message_id"], "<6F1D2C3B-APPLE-0001@example.com>");
    assert_eq!(b["from"], "bob@example.com");
    assert_eq!(b["attendee"], "mailto:bob@example.com");
    assert_eq!(b["partstat"], "ACCEPTED");
    assert_eq!(b["uid"], "2E1F6A8C-4B1D-4C2E-9F3A-1B2C3D4E5F60");
    assert!(b["icalendar"].as_str().unwrap().contains("CN=\"Doe, Alice\""));
    assert_eq!(got[0].idempotency_key, b["id"].as_str().unwrap());
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_recipients_delete_exactly_the_raw_gateway_argument() {
    let hook = Webhook::start();
    let m = InProcess::start(&hook.url()).await;
    let mut conn = open(&m).await;
    conn.mail(["<frank@example.com>"]).await.unwrap();
    let raw_rcpt = format!("<Calendar+{TOKEN}@Example.ORG>");
    assert_eq!(conn.rcpt(["<grace@example.org>"]).await.unwrap(), Status::Continue);
    assert_eq!(conn.rcpt([raw_rcpt.as_str()]).await.unwrap(), Status::Continue);
    conn.data().await.unwrap();
    let (actions, status) = send_message(&mut conn, &fixture("reply-all.eml"), "5MIXED").await;
    assert!(matches!(status, Status::Accept | Status::Continue), "{status:?}");
    assert!(actions.has_delete_recipient(raw_rcpt.as_str()), "{actions:?}");
    assert_eq!(actions.actions.len(), 1, "only the gateway recipient goes: {actions:?}");
    let got = hook.wait_for(1, Duration::from_secs(10));
    assert_eq!(got[0].body["token"], TOKEN, "token case preserved from RCPT");
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_gateway_address_and_bad_token_are_refused_at_rcpt() {
    let hook = Webhook::start();
    let m = InProcess::start(&hook.url()).await;
    let mut conn = open(&m).await;
    conn.mail(["<bob@example.com>"]).await.unwrap();
    for rcpt in [
        "<calendar@example.org>",
        "<calendar+no%good@example.org>",
        "<replies+x@example.net>",
    ] {
        match conn.rcpt([rcpt]).await.unwrap() {
            Status::Reject { message: Some(m) } => {
                let m = m.to_string_lossy().into_owned();
                assert!(m.starts_with("550 5.1.1 "), "{rcpt}: {m}");
            }
            other => panic!("{rcpt}: {other:?}"),
        }
    }
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordinary_mail_is_accepted_at_data() {
    let hook = Webhook::start();
    let m = InProcess::start(&hook.url()).await;
    let mut conn = open(&m).await;
    conn.mail(["<bob@example.com>"]).await.unwrap();
    assert_eq!(conn.rcpt(["<alice@example.org>"]).await.unwrap(), Status::Continue);
    assert_eq!(conn.data().await.unwrap(), Status::Accept);
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn human_text_gets_550_with_a_sentence() {
    let hook = Webhook::start();
    let m = InProcess::start(&hook.url()).await;
    let mut conn = to_gateway(&m, "<bob@example.com>").await;
    let (_, status) = send_message(&mut conn, &fixture("human-text.eml"), "6HUMAN").await;
    let msg = rejection(status);
    assert!(msg.starts_with("550 5.7.1 "), "{msg}");
    assert!(msg.contains("write to the organizer"), "{msg}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(hook.deliveries().is_empty());
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_gets_552() {
    let hook = Webhook::start();
    let m = InProcess::start(&hook.url()).await; // max_message_bytes = 1000000
    let mut conn = to_gateway(&m, "<bob@example.com>").await;
    conn.header("Subject", "big").await.unwrap();
    conn.eoh().await.unwrap();
    // Postfix waits for no answer to body chunks: past the limit the milter
    // stops buffering and answers at end of message.
    big_body(&mut conn, 20, Status::Noreply).await;
    let (actions, status) = end(&mut conn, "BIG0").await;
    let msg = rejection(status);
    assert!(msg.starts_with("552 5.3.4 "), "{msg}");
    assert!(actions.actions.is_empty(), "{actions:?}");
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_mixed_message_loses_only_its_gateway_recipient() {
    let hook = Webhook::start();
    let m = InProcess::start(&hook.url()).await; // max_message_bytes = 1000000
    let mut conn = open(&m).await;
    assert_eq!(conn.mail(["<bob@example.com>"]).await.unwrap(), Status::Noreply);
    let gateway = format!("<Calendar+{TOKEN}@example.org>");
    for r in [gateway.as_str(), "<alice@example.org>"] {
        assert_eq!(conn.rcpt([r]).await.unwrap(), Status::Continue);
    }
    assert_eq!(conn.data().await.unwrap(), Status::Continue);
    conn.header("Subject", "big, to Alice and the calendar").await.unwrap();
    conn.eoh().await.unwrap();
    big_body(&mut conn, 20, Status::Noreply).await;
    let (actions, status) = end(&mut conn, "BIG1").await;
    assert!(matches!(status, Status::Accept | Status::Continue), "{status:?}");
    assert!(actions.has_delete_recipient(gateway.as_str()), "{actions:?}");
    assert!(!actions.has_delete_recipient("<alice@example.org>"), "{actions:?}");
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_reply_twice_is_delivered_once() {
    let hook = Webhook::start();
    let m = InProcess::start(&hook.url()).await;
    for q in ["7FIRST", "7AGAIN"] {
        let mut conn = to_gateway(&m, "<chloe@example.net>").await;
        let (_, status) = send_message(&mut conn, &fixture("thunderbird.eml"), q).await;
        assert_eq!(status, Status::Discard);
        conn.close().await.unwrap();
    }
    hook.wait_for(1, Duration::from_secs(10));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(hook.deliveries().len(), 1);
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_target_errors_are_retried_until_delivered() {
    let hook = Webhook::start();
    hook.fail_next(&[503, 429]);
    let m = InProcess::start(&hook.url()).await;
    let mut conn = to_gateway(&m, "<dana.k@gmail.com>").await;
    let (_, status) = send_message(&mut conn, &fixture("google.eml"), "8RETRY").await;
    assert_eq!(status, Status::Discard);
    let got = hook.wait_for(1, Duration::from_secs(15));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body["partstat"], "ACCEPTED");
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escape_sequences_from_outside_are_shown_not_obeyed_in_queue_list() {
    let hook = Webhook::start();
    let m = InProcess::start(&hook.url()).await;
    let mut conn = to_gateway(&m, "<bob@example.com>").await;
    // Whoever reaches the milter socket sets the macros; a title-changing sequence.
    let (_, status) = send_message(&mut conn, &fixture("apple.eml"), "Q1\x1b]0;owned\x07").await;
    assert_eq!(status, Status::Discard);
    hook.wait_for(1, Duration::from_secs(10));
    let out = m.cli("", &["queue", "list", "--all"]);
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(list.contains("Q1"), "{list}");
    assert!(!list.contains('\x1b') && !list.contains('\x07'), "{list:?}");
    assert!(list.contains("\\u{1b}"), "{list}");
    m.stop().await;
}

/// A hostile reply with 60,000 components (a daily event's "overrides"):
/// refused with a sentence, and a new connection meanwhile is answered
/// within a second, on one thread as the daemon runs.
#[tokio::test(flavor = "current_thread")]
async fn a_reply_with_60000_components_is_refused_and_stalls_nobody() {
    let hook = Webhook::start();
    let m = InProcess::start_edited(&hook.url(), |c| {
        c.replace("max_message_bytes = 1000000", "max_message_bytes = 20000000")
    })
    .await;
    let mut ics = String::from("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//x//EN\r\nMETHOD:REPLY\r\n");
    for i in 0..60_000u32 {
        ics.push_str(&format!(
            "BEGIN:VEVENT\r\nUID:daily@example.org\r\nRECURRENCE-ID:2027{:02}{:02}T090000Z\r\nDTSTAMP:20261120T100000Z\r\nATTENDEE;PARTSTAT=DECLINED:mailto:bob@example.com\r\nEND:VEVENT\r\n",
            i % 12 + 1,
            i % 28 + 1
        ));
    }
    ics.push_str("END:VCALENDAR\r\n");
    let raw = common::calendar_message("huge@example.com", &ics);
    let addr = m.addr;
    let big = tokio::spawn(async move {
        let started = Instant::now();
        let st = common::milter_send(addr, "<bob@example.com>", &raw, "Q60K").await;
        (st, started.elapsed())
    });
    // While the big one is analysed: a new SMTP session's milter connection.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let slowest = common::slowest_new_session(m.addr, 5).await;
    let (status, took) = big.await.unwrap();
    let msg = rejection(status);
    assert!(
        msg.starts_with("550 5.6.0 ") && msg.contains("more than the 1000"),
        "{msg}"
    );
    println!(
        "refused after {} ms; slowest new connection {} ms",
        took.as_millis(),
        slowest.as_millis()
    );
    assert!(slowest < Duration::from_secs(1), "a new connection waited {slowest:?}");
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_recipients_past_the_cap_get_452() {
    let hook = Webhook::start();
    let m = InProcess::start_edited(&hook.url(), |c| format!("max_gateway_recipients = 3\n{c}")).await;
    let mut conn = open(&m).await;
    assert_eq!(conn.mail(["<bob@example.com>"]).await.unwrap(), Status::Noreply);
    let mut statuses = Vec::new();
    for i in 0..5 {
        let r = format!("<calendar+invented-{i:04}@example.org>");
        statuses.push(conn.rcpt([r.as_str()]).await.unwrap());
    }
    // Others still pass.
    statuses.push(conn.rcpt(["<alice@example.org>"]).await.unwrap());
    assert_eq!(&statuses[..3], &[Status::Continue, Status::Continue, Status::Continue]);
    for s in &statuses[3..5] {
        match s {
            Status::Tempfail { message: Some(m) } => assert!(m.to_string_lossy().starts_with("452 4.5.3 "), "{m:?}"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(statuses[5], Status::Continue);
    m.stop().await;
}

/// Sessions together buffer at most max_buffered_bytes: past it a message
/// gets 451 4.3.2, and the bytes come back when a session ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_buffered_bytes_budget_answers_451_instead_of_growing() {
    let hook = Webhook::start();
    let m = InProcess::start_edited(&hook.url(), |c| format!("max_buffered_bytes = 1500000\n{c}")).await;
    let mut first = to_gateway(&m, "<bob@example.com>").await;
    first.header("Subject", "first").await.unwrap();
    first.eoh().await.unwrap();
    big_body(&mut first, 15, Status::Noreply).await;
    // 900 kB held by the first; the second may not add 900 kB more: it stops
    // buffering and end of message answers.
    let mut second = to_gateway(&m, "<carol@example.com>").await;
    second.header("Subject", "second").await.unwrap();
    second.eoh().await.unwrap();
    big_body(&mut second, 15, Status::Noreply).await;
    match end(&mut second, "BUDGET2").await.1 {
        Status::Tempfail { message: Some(m) } => assert!(m.to_string_lossy().starts_with("451 4.3.2 "), "{m:?}"),
        other => panic!("{other:?}"),
    }
    // The first ends (its connection closes): its bytes come back.
    first.close().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = to_gateway(&m, "<dana@example.com>").await;
    third.header("Subject", "third").await.unwrap();
    third.eoh().await.unwrap();
    big_body(&mut third, 15, Status::Noreply).await;
    // Read whole: no calendar data in it, refused for that, not for the budget.
    let msg = rejection(end(&mut third, "BUDGET3").await.1);
    assert!(msg.starts_with("550 5.7.1 "), "{msg}");
    m.stop().await;
}

/// Postfix waits for an answer only where the milter may refuse (RCPT, DATA,
/// end of message) and sends only the macros it reads. A milter client that
/// offers no such options (an older MTA) gets every answer, and the same
/// decisions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postfix_waits_only_where_the_milter_may_refuse() {
    use indymilter_test::ProtoOpts;
    let hook = Webhook::start();
    let m = InProcess::start(&hook.url()).await;
    let conn = open(&m).await;
    let opts = conn.negotiated_opts();
    for quiet in [
        ProtoOpts::NOREPLY_CONNECT,
        ProtoOpts::NOREPLY_MAIL,
        ProtoOpts::NOREPLY_HEADER,
        ProtoOpts::NOREPLY_EOH,
        ProtoOpts::NOREPLY_BODY,
        ProtoOpts::NO_HELO,
        ProtoOpts::NO_UNKNOWN,
    ] {
        assert!(opts.contains(quiet), "{quiet:?} not negotiated: {opts:?}");
    }
    for answered in [ProtoOpts::NOREPLY_RCPT, ProtoOpts::NOREPLY_DATA] {
        assert!(!opts.contains(answered), "{answered:?} negotiated: {opts:?}");
    }
    let macros = conn.requested_macros();
    assert_eq!(macros[&MacroStage::Connect].to_str().unwrap(), "");
    assert_eq!(macros[&MacroStage::Mail].to_str().unwrap(), "i {auth_authen}");
    assert_eq!(macros[&MacroStage::Eom].to_str().unwrap(), "i");

    // An MTA without the no-reply options: every step answered.
    let mut old = TestConnection::configure()
        .available_opts(ProtoOpts::NO_HELO | ProtoOpts::NO_UNKNOWN | ProtoOpts::SKIP)
        .open_tcp(m.addr)
        .await
        .unwrap();
    assert_eq!(
        old.connect("old.example.com", [192, 0, 2, 8]).await.unwrap(),
        Status::Continue
    );
    assert_eq!(old.mail(["<bob@example.com>"]).await.unwrap(), Status::Continue);
    let rcpt = format!("<calendar+{TOKEN}@example.org>");
    assert_eq!(old.rcpt([rcpt.as_str()]).await.unwrap(), Status::Continue);
    assert_eq!(old.data().await.unwrap(), Status::Continue);
    assert_eq!(old.header("Subject", "big").await.unwrap(), Status::Continue);
    assert_eq!(old.eoh().await.unwrap(), Status::Continue);
    big_body(&mut old, 20, Status::Continue).await;
    let msg = rejection(end(&mut old, "OLD1").await.1);
    assert!(msg.starts_with("552 5.3.4 "), "{msg}");
    m.stop().await;
}

/// Deliveries reuse the target's HTTP connection (keep-alive): one TCP
/// connection for a run of replies delivered one after another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_keep_the_http_connection_open() {
    let hook = Webhook::start();
    hook.keep_alive();
    let m = InProcess::start(&hook.url()).await;
    for i in 0..5 {
        let raw = common::reply_message(700 + i, TOKEN);
        assert_eq!(
            common::milter_send(m.addr, "<bob@example.com>", &raw, "KEEP1").await,
            Status::Discard
        );
        let got = hook.wait_for(i + 1, Duration::from_secs(10));
        assert_eq!(got.len(), i + 1);
    }
    assert_eq!(hook.connections(), 1, "one connection for five deliveries");
    m.stop().await;
}

/// An ordinary reply of about 20 KB: analysed off the session thread, in
/// one of the few slots large messages share.
fn padded_reply(n: usize) -> Vec<u8> {
    let text = String::from_utf8(common::reply_message(n, TOKEN)).unwrap();
    let pad: String = (0..280).map(|_| format!("COMMENT:{}\r\n", "x".repeat(64))).collect();
    text.replace("END:VEVENT", &format!("{pad}END:VEVENT")).into_bytes()
}

/// Four replies listing 60,000 ATTENDEEs in one event, from anybody with a
/// well-formed token: refused with a sentence; meanwhile an ordinary 20 KB
/// reply is answered within 3 s and new sessions within a second.
#[tokio::test(flavor = "current_thread")]
async fn four_replies_with_60000_attendees_hold_up_nobody() {
    let hook = Webhook::start();
    let m = InProcess::start_edited(&hook.url(), |c| {
        c.replace("max_message_bytes = 1000000", "max_message_bytes = 20000000")
    })
    .await;
    let attendees: String = (0..60_000)
        .map(|i| format!("ATTENDEE;PARTSTAT=ACCEPTED:mailto:guest{i}@example.net\r\n"))
        .collect();
    let ics = format!(
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//x//EN\r\nMETHOD:REPLY\r\nBEGIN:VEVENT\r\nUID:big@example.org\r\nDTSTAMP:20261120T100000Z\r\n{attendees}END:VEVENT\r\nEND:VCALENDAR\r\n"
    );
    let mut hostile = Vec::new();
    for i in 0..4 {
        let raw = common::calendar_message(&format!("many-{i}@example.com"), &ics);
        let addr = m.addr;
        hostile.push(tokio::spawn(async move {
            common::milter_send(addr, "<bob@example.com>", &raw, "QMANY").await
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let ordinary = common::milter_send(m.addr, "<attendee1@example.com>", &padded_reply(1), "QOK").await;
    let ordinary_took = t.elapsed();
    let slowest = common::slowest_new_session(m.addr, 5).await;
    for h in hostile {
        let msg = rejection(h.await.unwrap());
        assert!(msg.starts_with("550 5.6.0 ") && msg.contains("attendees"), "{msg}");
    }
    println!("ordinary reply {ordinary_took:?}; slowest new connection {slowest:?}");
    assert_eq!(ordinary, Status::Discard);
    assert!(
        ordinary_took < Duration::from_secs(3),
        "the ordinary reply waited {ordinary_took:?}"
    );
    assert!(slowest < Duration::from_secs(1), "a new connection waited {slowest:?}");
    m.stop().await;
}

/// A target that answers only through its proxy's 503 is taken as down after
/// a few attempts: a backlog then costs one probe per probe_interval, not an
/// attempt per record; `queue list` says so. Once the probe is answered,
/// everything that waits is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_target_is_probed_not_hammered_and_drained_when_back() {
    let hook = Webhook::start();
    hook.fail_next(&[503; 10_000]);
    let m = InProcess::start_edited(&hook.url(), |c| {
        c.replace("probe_interval = \"1s\"", "probe_interval = \"2s\"")
    })
    .await;
    const REPLIES: usize = 20;
    for n in 0..REPLIES {
        let status = common::milter_send(m.addr, "<bob@example.com>", &common::reply_message(n, TOKEN), "Q1").await;
        assert_eq!(status, Status::Discard, "reply {n}");
    }
    let list = || String::from_utf8_lossy(&m.cli("", &["queue", "list"]).stdout).into_owned();
    assert!(
        common::wait_until(Duration::from_secs(20), || list().contains("target down since")),
        "{}",
        list()
    );
    // Every record is due at least once a second (max_backoff): without the
    // probe that is 20 attempts a second.
    let before = hook.connections();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let attempts = hook.connections() - before;
    assert!(attempts <= 4, "{attempts} attempts in 5 s while the target was down");
    let metrics_list = list();
    assert!(metrics_list.contains("20 pending"), "{metrics_list}");

    hook.fail_next(&[]);
    let delivered = hook.wait_for(REPLIES, Duration::from_secs(15));
    assert_eq!(delivered.len(), REPLIES);
    assert!(
        common::wait_until(Duration::from_secs(5), || !list().contains("target down")),
        "{}",
        list()
    );
    // The journal tells each record's story, not each attempt: its first
    // failure (the records tried before the target was taken as down; the
    // reason never changed) and its delivery.
    let out = m.cli("", &["journal", "--json"]);
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|e: &serde_json::Value| e["event"] == "delivery")
        .collect();
    let count = |disposition: &str| {
        let ids: Vec<&str> = events
            .iter()
            .filter(|e| e["disposition"] == disposition)
            .filter_map(|e| e["record_id"].as_str())
            .collect();
        let distinct: std::collections::HashSet<&str> = ids.iter().copied().collect();
        assert_eq!(
            ids.len(),
            distinct.len(),
            "{disposition} twice for a record: {events:#?}"
        );
        ids.len()
    };
    assert_eq!(count("delivered"), REPLIES);
    let retried = count("retry");
    assert!((1..=REPLIES).contains(&retried), "{events:#?}");
    m.stop().await;
}
