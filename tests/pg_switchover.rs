//! A PostgreSQL switchover under the running daemon (DESIGN §4b): the token
//! store is a primary and its streaming replica, both in `tokens.url` with
//! `target_session_attrs=read-write`. While the primary is down and the
//! replica not yet promoted, replies get 451 (never 550) and invitations are
//! deferred, not sent untokenized; once the replica is promoted, lookups and
//! minting work again without restarting the milter.

mod common;

use common::{milter_message, postgres::Postgres, Daemon, Webhook};
use indymilter_test::{EomAction, MacroStage, Status, TestConnection};
use std::time::{Duration, Instant};

/// An invitation from Alice to Bob for the event `uid`.
fn invitation(uid: &str) -> Vec<u8> {
    format!("From: Alice Doe <alice@example.org>\r\nTo: Bob <bob@example.com>\r\nSubject: Invitation: {uid}\r\nMessage-ID: <{uid}-invite@example.org>\r\nMIME-Version: 1.0\r\nContent-Type: text/calendar; charset=utf-8; method=REQUEST\r\n\r\nBEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Example Server//EN\r\nMETHOD:REQUEST\r\nBEGIN:VEVENT\r\nUID:{uid}\r\nDTSTAMP:20261120T100000Z\r\nDTSTART:20261210T100000Z\r\nSUMMARY:Planning\r\nORGANIZER;CN=Alice:mailto:alice@example.org\r\nATTENDEE;PARTSTAT=NEEDS-ACTION;RSVP=TRUE:mailto:bob@example.com\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n").into_bytes()
}

/// Bob's answer (`partstat`) to the event `uid`, to `gateway`.
fn reply(uid: &str, gateway: &str, partstat: &str) -> Vec<u8> {
    format!("From: Bob <bob@example.com>\r\nTo: {gateway}\r\nSubject: {partstat}: Planning\r\nMessage-ID: <{uid}-{partstat}@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: text/calendar; charset=utf-8; method=REPLY\r\n\r\nBEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Attendee//EN\r\nMETHOD:REPLY\r\nBEGIN:VEVENT\r\nUID:{uid}\r\nDTSTAMP:20261121T100000Z\r\nORGANIZER:{gateway}\r\nATTENDEE;PARTSTAT={partstat}:mailto:bob@example.com\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n").into_bytes()
}

async fn open(port: u16, client: u8) -> TestConnection {
    let mut conn = TestConnection::configure()
        .read_timeout(Duration::from_secs(30))
        .open_tcp(("127.0.0.1", port))
        .await
        .expect("connect to the milter");
    conn.connect("mx.example.com", [192, 0, 2, client])
        .await
        .expect("connect");
    conn
}

/// The invitation for `uid` as Alice submits it (SASL login): the answer at
/// end of message and the token of the Reply-To the milter put in, if any.
async fn invite(port: u16, uid: &str) -> (Status, Option<String>) {
    let mut conn = open(port, 10).await;
    conn.macros(MacroStage::Mail, [("{auth_authen}", "alice@example.org")])
        .await
        .expect("macros");
    conn.mail(["<alice@example.org>"]).await.expect("mail");
    conn.rcpt(["<bob@example.com>"]).await.expect("rcpt");
    conn.data().await.expect("data");
    let (actions, status) = milter_message(&mut conn, &invitation(uid), "QINVITE").await;
    let _ = conn.close().await;
    let token = actions.actions.iter().find_map(|a| match a {
        EomAction::AddHeader { name, value } | EomAction::ChangeHeader { name, value, .. }
            if name.to_bytes().eq_ignore_ascii_case(b"Reply-To") =>
        {
            let v = value.to_string_lossy();
            let start = v.find("calendar+")? + "calendar+".len();
            let end = start + v[start..].find('@')?;
            Some(v[start..end].to_owned())
        }
        _ => None,
    });
    (status, token)
}

/// RCPT of `gateway` from the SMTP client 192.0.2.`client`.
async fn rcpt(port: u16, client: u8, gateway: &str) -> Status {
    let mut conn = open(port, client).await;
    conn.mail(["<bob@example.com>"]).await.expect("mail");
    let st = conn.rcpt([format!("<{gateway}>").as_str()]).await.expect("rcpt");
    let _ = conn.close().await;
    st
}

/// Bob's reply to `gateway` for `uid`, the whole transaction: the answers
/// at RCPT and at end of message.
async fn send_reply(port: u16, client: u8, uid: &str, gateway: &str, partstat: &str) -> (Status, Option<Status>) {
    let mut conn = open(port, client).await;
    conn.mail(["<bob@example.com>"]).await.expect("mail");
    let at_rcpt = conn.rcpt([format!("<{gateway}>").as_str()]).await.expect("rcpt");
    if at_rcpt != Status::Continue {
        let _ = conn.close().await;
        return (at_rcpt, None);
    }
    conn.data().await.expect("data");
    let (_, eom) = milter_message(&mut conn, &reply(uid, gateway, partstat), "QREPLY").await;
    let _ = conn.close().await;
    (at_rcpt, Some(eom))
}

fn is_451(st: &Status) -> bool {
    matches!(st, Status::Tempfail { message: Some(m) } if m.to_string_lossy().starts_with("451 4.3.0 "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_to_the_promoted_replica_needs_no_restart() {
    let started = Instant::now();
    let mut primary = Postgres::start_primary();
    let replica = Postgres::replica_of(&primary);
    assert!(replica.in_recovery(), "the replica is a standby");
    eprintln!("primary and replica up in {:?}", started.elapsed());
    let hook = Webhook::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!(
        "postgresql://imip@127.0.0.1:{},127.0.0.1:{}/imip?target_session_attrs=read-write",
        primary.port, replica.port
    );
    let milter = Daemon::start_edited(dir.path(), &hook.url(), None, |c| {
        format!(
            "{}\n[tokens]\nmode = \"local\"\nstore = \"postgres\"\nurl = \"{url}\"\n\n[outbound]\nenabled = true\norganizer_domains = [\"example.org\"]\n",
            c.replace("log_level = \"debug\"", "log_level = \"info\"")
        )
    });
    let pid = milter.pid();
    let port = milter.port;
    let diag = || format!("--- milter log\n{}", milter.log());

    // Before: a token is minted on the primary and a reply to it is taken.
    let (st, token) = invite(port, "switch-1").await;
    assert_eq!(st, Status::Accept, "{}", diag());
    let token = token.unwrap_or_else(|| panic!("invitation not tokenized\n{}", diag()));
    let gateway = format!("calendar+{token}@example.org");
    assert_eq!(
        send_reply(port, 20, "switch-1", &gateway, "ACCEPTED").await,
        (Status::Continue, Some(Status::Discard)),
        "{}",
        diag()
    );
    assert_eq!(hook.wait_for(1, Duration::from_secs(15)).len(), 1, "{}", diag());
    // The replica has it too before the primary goes.
    let replicated = common::wait_until(Duration::from_secs(30), || {
        replica.psql(&format!(
            "SELECT count(*) FROM imip_milter_tokens WHERE token = '{token}'"
        )) == "1"
    });
    assert!(replicated, "the token reaches the replica");

    // The primary stops; the replica, read-only, is refused by
    // target_session_attrs: replies are deferred, never refused, and an
    // invitation is deferred rather than sent untokenized.
    primary.stop();
    for client in 30..33 {
        let st = rcpt(port, client, &gateway).await;
        assert!(is_451(&st), "{st:?}\n{}", diag());
    }
    let (st, token_down) = invite(port, "switch-2").await;
    assert!(is_451(&st), "{st:?}\n{}", diag());
    assert_eq!(token_down, None);

    // The replica is promoted: the same token passes again, from one client
    // after another as senders retry (store failures count toward each
    // client's unknown-token limit), and nothing in between is a 550.
    let promoted_at = Instant::now();
    replica.promote();
    assert!(!replica.in_recovery(), "promoted");
    let mut answers = Vec::new();
    let mut client = 40u8;
    let back = loop {
        let st = rcpt(port, client, &gateway).await;
        let ok = st == Status::Continue;
        assert!(ok || is_451(&st), "{st:?} after promotion\n{}", diag());
        answers.push(st);
        if ok {
            break true;
        }
        if promoted_at.elapsed() > Duration::from_secs(60) {
            break false;
        }
        client = client.wrapping_add(1).max(40);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(back, "lookups did not come back: {answers:?}\n{}", diag());
    eprintln!(
        "switchover: lookups back {:?} after promotion, {} answer(s)",
        promoted_at.elapsed(),
        answers.len()
    );
    // A reply to the old token is taken, and a new one is minted.
    assert_eq!(
        send_reply(port, 21, "switch-1", &gateway, "DECLINED").await,
        (Status::Continue, Some(Status::Discard)),
        "{}",
        diag()
    );
    let (st, fresh) = invite(port, "switch-3").await;
    assert_eq!(st, Status::Accept, "{}", diag());
    let fresh = fresh.unwrap_or_else(|| panic!("not tokenized after promotion\n{}", diag()));
    assert_ne!(fresh, token);
    let fresh_gateway = format!("calendar+{fresh}@example.org");
    assert_eq!(
        send_reply(port, 22, "switch-3", &fresh_gateway, "ACCEPTED").await,
        (Status::Continue, Some(Status::Discard)),
        "{}",
        diag()
    );
    assert_eq!(
        replica.psql(&format!(
            "SELECT count(*) FROM imip_milter_tokens WHERE token = '{fresh}'"
        )),
        "1",
        "minted on the promoted replica"
    );
    let got = hook.wait_for(3, Duration::from_secs(15));
    assert_eq!(got.len(), 3, "{}", diag());
    for d in &got {
        assert_eq!(d.body["organizer"], "mailto:alice@example.org");
        assert_eq!(d.body["attendee"], "mailto:bob@example.com");
    }
    let answers: Vec<_> = got
        .iter()
        .map(|d| (d.body["uid"].clone(), d.body["partstat"].clone()))
        .collect();
    assert!(answers.contains(&("switch-1".into(), "DECLINED".into())), "{answers:?}");
    assert!(answers.contains(&("switch-3".into(), "ACCEPTED".into())), "{answers:?}");

    // The same process all along; the outage logged once as it began, once
    // as it ended.
    assert_eq!(milter.pid(), pid);
    assert!(
        std::path::Path::new(&format!("/proc/{}", pid.expect("pid"))).exists(),
        "the milter kept running"
    );
    let log = milter.log();
    assert_eq!(log.matches("recipients get 451 until it answers").count(), 1, "{log}");
    assert_eq!(log.matches("reachable again").count(), 1, "{log}");
    eprintln!("{log}");
    eprintln!("took {:?}", started.elapsed());
}
