//! Local token mode: tokens owned by imip-milter, CalendarServer's inbound
//! rules, redirect to the organizer, and the abuse limit.

mod common;

use common::{fixture, InProcess, Webhook, TOKEN};
use indymilter_test::{EomActions, Status, TestConnection};
use std::{process::Command, time::Duration};

const LOCAL: &str = "\n[tokens]\nmode = \"local\"\nmax_unknown = 3\nunknown_window = \"10m\"\n";

fn cli(m: &InProcess, url: &str, args: &[&str]) -> (bool, String, String) {
    cli_in(m.state_dir.path(), url, args)
}

/// The CLI against the state_dir `dir`.
fn cli_in(dir: &std::path::Path, url: &str, args: &[&str]) -> (bool, String, String) {
    let config = dir.join("cli.toml");
    std::fs::write(&config, common::config_text(dir, "inet:127.0.0.1:1", url, LOCAL)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_imip-milter"))
        .args(args)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The events of the fixtures.
const APPLE_UID: &str = "2E1F6A8C-4B1D-4C2E-9F3A-1B2C3D4E5F60";
const OUTLOOK_UID: &str = "040000008200E00074C5B7101A82E00800000000A0B1C2D3E4F5A60100000000000000001000000012345678";
const BOUNCED_UID: &str = "invite-bounce-77@example.org";

/// The token of the fixtures, as CalendarServer's IMIP_TOKENS would hold it.
fn import(m: &InProcess, url: &str, attendee: &str, uid: &str) {
    import_in(m.state_dir.path(), url, attendee, uid)
}

fn import_in(dir: &std::path::Path, url: &str, attendee: &str, uid: &str) {
    let csv = dir.join("tokens.csv");
    std::fs::write(
        &csv,
        format!("TOKEN,ORGANIZER,ATTENDEE,ICALUID,ACCESSED\n{TOKEN},mailto:alice@example.org,{attendee},{uid},2099-01-01 00:00:00\n"),
    )
    .unwrap();
    let (ok, out, err) = cli_in(dir, url, &["tokens", "import", csv.to_str().unwrap()]);
    assert!(ok && out.contains("1 token(s) imported"), "{out}{err}");
}

async fn transaction(m: &InProcess, client: [u8; 4], rcpts: &[String]) -> (TestConnection, Vec<Status>) {
    transaction_at(m.addr, client, rcpts).await
}

async fn transaction_at(
    addr: std::net::SocketAddr,
    client: [u8; 4],
    rcpts: &[String],
) -> (TestConnection, Vec<Status>) {
    let mut conn = TestConnection::configure().open_tcp(addr).await.unwrap();
    conn.connect("client.example.com", client).await.unwrap();
    conn.mail(["<sender@example.com>"]).await.unwrap();
    let mut st = Vec::new();
    for r in rcpts {
        st.push(conn.rcpt([r.as_str()]).await.unwrap());
    }
    (conn, st)
}

async fn finish(conn: TestConnection, eml: &str) -> (EomActions, Status) {
    finish_raw(conn, String::from_utf8(fixture(eml)).unwrap()).await
}

async fn finish_raw(mut conn: TestConnection, raw: String) -> (EomActions, Status) {
    assert_eq!(conn.data().await.unwrap(), Status::Continue);
    let r = common::milter_message(&mut conn, raw.as_bytes(), "LOCAL1").await;
    conn.close().await.unwrap();
    r
}

/// A 550 5.7.1 whose text says `words`, and nothing handed on to the target.
async fn refused_and_not_applied(status: Status, words: &str, hook: &Webhook) {
    match status {
        Status::Reject { message: Some(msg) } => {
            let msg = msg.to_string_lossy().into_owned();
            assert!(msg.starts_with("550 5.7.1 ") && msg.contains(words), "{msg}");
        }
        other => panic!("{other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(hook.deliveries().is_empty(), "nothing handed on as an answer");
}

/// Redirected to the organizer: she is added as recipient, the gateway
/// recipient removed, nothing handed on as an answer.
async fn redirected_to_organizer((actions, status): (EomActions, Status), hook: &Webhook) {
    assert!(matches!(status, Status::Accept | Status::Continue), "{status:?}");
    assert!(
        actions.has_add_recipient("<alice@example.org>", None::<&str>),
        "{actions:?}"
    );
    assert!(actions.has_delete_recipient(gateway().as_str()), "{actions:?}");
    // She learns why the message came to her.
    assert!(format!("{actions:?}").contains("X-IMIP-Milter-Redirect"), "{actions:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(hook.deliveries().is_empty());
}

fn gateway() -> String {
    format!("<calendar+{TOKEN}@example.org>")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlook_reply_gets_the_real_organizer_back() {
    let hook = Webhook::start();
    let m = InProcess::start_with(&hook.url(), LOCAL).await;
    import(&m, &hook.url(), "mailto:erik.jansen@contoso.example", OUTLOOK_UID);
    let (conn, st) = transaction(&m, [192, 0, 2, 1], &[gateway()]).await;
    assert_eq!(st, vec![Status::Continue]);
    let (_, status) = finish(conn, "outlook.eml").await;
    assert_eq!(status, Status::Discard);
    let got = hook.wait_for(1, Duration::from_secs(10));
    let b = &got[0].body;
    assert_eq!(b["organizer"], "mailto:alice@example.org");
    let cal = b["icalendar"].as_str().unwrap();
    assert!(cal.contains("ORGANIZER:mailto:alice@example.org"), "{cal}");
    assert!(cal.contains("METHOD:REPLY"), "{cal}");
    assert!(cal.contains("PARTSTAT=DECLINED"), "{cal}");
    assert!(!cal.contains("SCHEDULE-STATUS"), "the token's attendee replied: {cal}");
    let (_, list, _) = cli(&m, &hook.url(), &["tokens", "list"]);
    assert!(
        list.contains("8e3c0d1a…") && !list.contains("2099-01-01"),
        "last use recorded: {list}"
    );
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_for_somebody_else_is_refused_and_changes_nothing() {
    let hook = Webhook::start();
    let m = InProcess::start_with(&hook.url(), LOCAL).await;
    // The token was given to someone else; Bob answers through it.
    import(&m, &hook.url(), "mailto:someone-else@example.com", APPLE_UID);
    let (conn, _) = transaction(&m, [192, 0, 2, 2], &[gateway()]).await;
    refused_and_not_applied(finish(conn, "apple.eml").await.1, "not sent to", &hook).await;
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_about_another_event_is_refused() {
    let hook = Webhook::start();
    let m = InProcess::start_with(&hook.url(), LOCAL).await;
    // Bob's token, for another event than the one his reply names.
    import(&m, &hook.url(), "mailto:bob@example.com", BOUNCED_UID);
    let (conn, _) = transaction(&m, [192, 0, 2, 9], &[gateway()]).await;
    refused_and_not_applied(finish(conn, "apple.eml").await.1, "another event", &hook).await;
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounce_that_quotes_the_invitation_becomes_a_5_1_reply_and_a_forged_one_is_refused() {
    let hook = Webhook::start();
    let m = InProcess::start_with(&hook.url(), LOCAL).await;
    import(&m, &hook.url(), "mailto:nobody@gone.example", BOUNCED_UID);
    let (conn, _) = transaction(&m, [192, 0, 2, 2], &[gateway()]).await;
    assert_eq!(finish(conn, "bounce.eml").await.1, Status::Discard);
    let got = hook.wait_for(1, Duration::from_secs(10));
    let bounce = got.iter().find(|d| d.body["kind"] == "bounce").unwrap();
    let cal = bounce.body["icalendar"].as_str().unwrap();
    assert!(
        cal.contains("METHOD:REPLY") && cal.contains("REQUEST-STATUS:5.1"),
        "{cal}"
    );
    assert!(!cal.contains("PARTSTAT"), "a bounce is no answer: {cal}");
    assert!(cal.contains("ORGANIZER:mailto:alice@example.org"), "{cal}");
    assert!(cal.contains("UID:invite-bounce-77@example.org"), "{cal}");

    // A report that names the token but quotes no invitation sent with it.
    let forged = String::from_utf8(fixture("bounce.eml"))
        .unwrap()
        .replace("invite-bounce-77-msg@example.org", "made-up@evil.example")
        .replace("UID:invite-bounce-77@example.org", "UID:made-up@evil.example");
    let (conn, _) = transaction(&m, [192, 0, 2, 2], &[gateway()]).await;
    match finish_raw(conn, forged).await.1 {
        Status::Reject { message: Some(msg) } => {
            assert!(msg.to_string_lossy().starts_with("550 5.7.1 "), "{msg:?}")
        }
        other => panic!("{other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hook.deliveries().len(), 1);
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persons_text_is_redirected_to_the_organizer() {
    let hook = Webhook::start();
    let m = InProcess::start_with(&hook.url(), LOCAL).await;
    import(&m, &hook.url(), "mailto:bob@example.com", APPLE_UID);
    let (conn, _) = transaction(&m, [192, 0, 2, 3], &[gateway()]).await;
    redirected_to_organizer(finish(conn, "human-text.eml").await, &hook).await;
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tokens_are_refused_and_a_prober_is_slowed_down() {
    let hook = Webhook::start();
    let m = InProcess::start_with(&hook.url(), LOCAL).await;
    import(&m, &hook.url(), "mailto:bob@example.com", APPLE_UID);
    let unknown: Vec<String> = (0..3)
        .map(|i| format!("<calendar+guess{i:04}-0000@example.org>"))
        .collect();
    let (_, st) = transaction(&m, [198, 51, 100, 7], &unknown).await;
    for s in &st {
        match s {
            Status::Reject { message: Some(m) } => assert!(m.to_string_lossy().starts_with("550 5.1.1 ")),
            other => panic!("{other:?}"),
        }
    }
    // Past the limit the client waits, with a valid token too (the store
    // is not asked: see below); other clients are not affected.
    let (_, st) = transaction(&m, [198, 51, 100, 7], &[unknown[0].clone(), gateway()]).await;
    for s in &st {
        match s {
            Status::Tempfail { message: Some(m) } => assert!(m.to_string_lossy().starts_with("450 4.7.1 "), "{m:?}"),
            other => panic!("{other:?}"),
        }
    }
    let (_, st) = transaction(&m, [192, 0, 2, 3], &[gateway()]).await;
    assert_eq!(st[0], Status::Continue, "a valid token from another client");
    let (_, st) = transaction(&m, [192, 0, 2, 4], &[unknown[1].clone()]).await;
    assert!(matches!(&st[0], Status::Reject { .. }), "{st:?}");

    // Revoked tokens are unknown.
    let (ok, _, err) = cli(&m, &hook.url(), &["tokens", "revoke", TOKEN]);
    assert!(ok, "{err}");
    let (_, st) = transaction(&m, [192, 0, 2, 5], &[gateway()]).await;
    assert!(matches!(st[0], Status::Reject { .. }), "{st:?}");
    m.stop().await;
}

/// A client past tokens.max_unknown gets 450 4.7.1 without a lookup, for
/// a guess and for a valid token alike; another client's token is looked
/// up. Store failures count toward the limit as unknown tokens do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_past_its_limit_is_refused_without_asking_the_store() {
    use imip_milter::{milter, tokens};
    let dir = tempfile::tempdir().unwrap();
    let spool = imip_milter::spool::Spool::open(&dir.path().join("spool.redb")).unwrap();
    let redb = tokens::RedbTokens::new(&spool).unwrap();
    let valid = tokens::mint_or_reuse(
        &redb,
        "mailto:alice@example.org",
        "mailto:bob@example.com",
        "u1",
        None,
        imip_milter::clock::now_ms(),
    )
    .await
    .unwrap();
    let store = std::sync::Arc::new(common::CountingStore::new(std::sync::Arc::new(redb)));
    let text = common::config_text(dir.path(), "inet:127.0.0.1:1", "http://127.0.0.1:1/", LOCAL);
    let config = imip_milter::config::Config::parse(&text).unwrap();
    let mut settings = imip_milter::settings::Settings::from_config(&config);
    settings.tokens = Some(milter::LocalTokens {
        store: store.clone(),
        days_to_live: 90,
    });
    let mut shared = milter::Shared::new(settings, spool);
    shared.clients = imip_milter::client_limits(&config);
    let (addr, _stop) = common::serve_shared(shared).await;
    let guess = |i: u32| format!("<calendar+{i:08x}-0000-4000-8000-000000000000@example.org>");
    let token = format!("<calendar+{}@example.org>", valid.token);

    let (_, st) = transaction_at(addr, [198, 51, 100, 7], &[guess(1), guess(2), guess(3)]).await;
    assert!(st.iter().all(|s| matches!(s, Status::Reject { .. })), "{st:?}");
    assert_eq!(store.lookups(), 3);
    let (_, st) = transaction_at(addr, [198, 51, 100, 7], &[guess(4), token.clone(), guess(5)]).await;
    for s in &st {
        match s {
            Status::Tempfail { message: Some(m) } => assert!(m.to_string_lossy().starts_with("450 4.7.1 "), "{m:?}"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(store.lookups(), 3, "past the limit, the store is not asked");
    let (_, st) = transaction_at(addr, [192, 0, 2, 60], std::slice::from_ref(&token)).await;
    assert_eq!(st, vec![Status::Continue]);
    assert_eq!(store.lookups(), 4);

    // A store that fails or does not answer: each lookup counts too, so a
    // flood that makes the store slow reaches its limit all the same.
    store.fail(true);
    let (_, st) = transaction_at(addr, [203, 0, 113, 5], &[guess(6), token.clone(), guess(7)]).await;
    for s in &st {
        match s {
            Status::Tempfail { message: Some(m) } => assert!(m.to_string_lossy().starts_with("451 4.3.0 "), "{m:?}"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(store.lookups(), 7);
    store.fail(false);
    let (_, st) = transaction_at(addr, [203, 0, 113, 5], &[token]).await;
    match &st[0] {
        Status::Tempfail { message: Some(m) } => assert!(m.to_string_lossy().starts_with("450 4.7.1 "), "{m:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(store.lookups(), 7, "past the limit after three failures");
}

/// Tokenless and malformed gateway recipients count toward the same limit:
/// past it, the journal sums a client up once per window instead of
/// writing an event per recipient.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_tokenless_recipients_is_one_summary_in_the_journal() {
    let hook = Webhook::start();
    let local = "\n[tokens]\nmode = \"local\"\nmax_unknown = 3\nunknown_window = \"2s\"\n";
    let m = InProcess::start_with(&hook.url(), local).await;
    let rcpts: Vec<String> = (0..200)
        .map(|i| match i % 2 {
            0 => "<calendar@example.org>".to_owned(),
            _ => format!("<calendar+bad!{i}@example.org>"),
        })
        .collect();
    let (_, st) = transaction(&m, [198, 51, 100, 9], &rcpts).await;
    assert!(
        st.iter()
            .all(|s| matches!(s, Status::Reject { message: Some(m) } if m.to_string_lossy().starts_with("550 5.1.1 "))),
        "{st:?}"
    );
    let journal = || -> Vec<serde_json::Value> {
        let out = m.cli(local, &["journal", "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let summed_up = common::wait_until(Duration::from_secs(10), || {
        journal().iter().any(|e| e["event"] == "recipients")
    });
    let events = journal();
    assert!(summed_up, "{events:#?}");
    let one_by_one = events.iter().filter(|e| e["event"] == "recipient").count();
    assert!(one_by_one <= 3 + 2, "{one_by_one}: {events:#?}");
    let summaries: Vec<_> = events.iter().filter(|e| e["event"] == "recipients").collect();
    assert_eq!(summaries.len(), 1, "{events:#?}");
    let reason = summaries[0]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with(&format!(
            "{} recipients refused from client 198.51.100.9 ",
            200 - one_by_one
        )),
        "{reason}"
    );
    assert!(summaries[0]["smtp_reply"].as_str().unwrap().starts_with("550 5.1.1 "));
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_add_mints_and_reuses() {
    let hook = Webhook::start();
    let m = InProcess::start_with(&hook.url(), LOCAL).await;
    let add = |att: &str| {
        let (ok, out, err) = cli(
            &m,
            &hook.url(),
            &[
                "tokens",
                "add",
                "--organizer",
                "alice@example.org",
                "--attendee",
                att,
                "--uid",
                "ev-1",
            ],
        );
        assert!(ok, "{err}");
        out.trim().to_owned()
    };
    let a = add("bob@example.com");
    assert_eq!(a.len(), 36, "{a}");
    assert_eq!(add("BOB@example.com"), a, "one token per (organizer, attendee, UID)");
    assert_ne!(add("carol@example.com"), a);
    let (_, show, _) = cli(&m, &hook.url(), &["tokens", "show", &a]);
    assert!(show.contains("\"attendee\": \"mailto:bob@example.com\""), "{show}");
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attendee_policy_refuses_a_reply_from_someone_else() {
    let hook = Webhook::start();
    let m = InProcess::start_with(&hook.url(), &format!("{LOCAL}\n[policy]\nsender = \"attendee\"\n")).await;
    import(&m, &hook.url(), "mailto:bob@example.com", APPLE_UID);
    // Bob's answer, sent by somebody else.
    let other = String::from_utf8(fixture("apple.eml"))
        .unwrap()
        .replace("<bob@example.com>", "<mallory@example.net>");
    let (conn, _) = transaction(&m, [192, 0, 2, 8], &[gateway()]).await;
    match finish_raw(conn, other).await.1 {
        Status::Reject { message: Some(msg) } => {
            let msg = msg.to_string_lossy().into_owned();
            assert!(
                msg.starts_with("550 5.7.1 ") && msg.contains("invited attendee"),
                "{msg}"
            );
        }
        other => panic!("{other:?}"),
    }
    let (conn, _) = transaction(&m, [192, 0, 2, 8], &[gateway()]).await;
    assert_eq!(
        finish(conn, "apple.eml").await.1,
        Status::Discard,
        "From is the attendee"
    );
    assert_eq!(hook.wait_for(1, Duration::from_secs(10)).len(), 1);
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attendee_policy_takes_any_attendee_of_a_shared_token_for_their_own_answer() {
    let hook = Webhook::start();
    let m = InProcess::start_with(&hook.url(), &format!("{LOCAL}\n[policy]\nsender = \"attendee\"\n")).await;
    // One token for an invitation to Carol and Bob, as outbound mints it.
    let (ok, out, err) = cli(
        &m,
        &hook.url(),
        &[
            "tokens",
            "add",
            "--organizer",
            "alice@example.org",
            "--attendee",
            "carol@example.com",
            "--attendee",
            "bob@example.com",
            "--uid",
            APPLE_UID,
        ],
    );
    assert!(ok, "{out}{err}");
    let shared = format!("<calendar+{}@example.org>", out.trim());
    let (conn, _) = transaction(&m, [192, 0, 2, 10], std::slice::from_ref(&shared)).await;
    assert_eq!(
        finish(conn, "apple.eml").await.1,
        Status::Discard,
        "Bob, the second attendee"
    );
    let got = hook.wait_for(1, Duration::from_secs(10));
    assert_eq!(got[0].body["attendee"], "mailto:bob@example.com");
    // Carol may not send Bob's answer.
    let carol = String::from_utf8(fixture("apple.eml"))
        .unwrap()
        .replace("<bob@example.com>", "<carol@example.com>");
    let (conn, _) = transaction(&m, [192, 0, 2, 10], &[shared]).await;
    assert!(matches!(finish_raw(conn, carol).await.1, Status::Reject { .. }));
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_token_file_is_imported_through_the_daemon() {
    let hook = Webhook::start();
    let m = InProcess::start_with(&hook.url(), LOCAL).await;
    // About 400 KiB: far more than one request line may carry.
    let rows: String = (0..3000)
        .map(|i| {
            format!("8e3c0d1a-5b7e-4f61-9a0c-{i:012},mailto:alice@example.org,mailto:guest{i}@example.com,event-{i}@example.org,2099-01-01 00:00:00\n")
        })
        .collect();
    assert!(rows.len() > 256 * 1024);
    let csv = m.state_dir.path().join("big.csv");
    std::fs::write(&csv, format!("TOKEN,ORGANIZER,ATTENDEE,ICALUID,ACCESSED\n{rows}")).unwrap();
    let (ok, out, err) = cli(&m, &hook.url(), &["tokens", "import", csv.to_str().unwrap()]);
    assert!(ok && out.contains("3000 token(s) imported"), "{out}{err}");
    let last = "<calendar+8e3c0d1a-5b7e-4f61-9a0c-000000002999@example.org>".to_owned();
    let (_, st) = transaction(&m, [192, 0, 2, 11], &[last]).await;
    assert_eq!(st, vec![Status::Continue]);
    m.stop().await;
}

/// The event of the fixtures to Carol (counter.eml, refresh.eml, …).
const BUDGET_UID: &str = "budget-review-2026@example.org";

/// Carol answers from another address of hers. The token was given to her
/// invited address and stays the authority: an answer for the alias is an
/// answer for nobody the token knows (refused, readable, nothing applied);
/// her invited address as ATTENDEE, sent from the alias, is her answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_from_an_alias_keeps_the_token_as_the_authority() {
    let hook = Webhook::start();
    let m = InProcess::start_with(&hook.url(), LOCAL).await;
    import(&m, &hook.url(), "mailto:carol@example.net", BUDGET_UID);
    let (conn, _) = transaction(&m, [192, 0, 2, 4], &[gateway()]).await;
    refused_and_not_applied(finish(conn, "reply-from-alias.eml").await.1, "not sent to", &hook).await;
    let invited = String::from_utf8(fixture("reply-from-alias.eml"))
        .unwrap()
        .replace(":mailto:c.smith@home.example", ":mailto:carol@example.net");
    let (conn, _) = transaction(&m, [192, 0, 2, 4], &[gateway()]).await;
    assert_eq!(finish_raw(conn, invited).await.1, Status::Discard);
    let got = hook.wait_for(1, Duration::from_secs(10));
    assert_eq!(got[0].body["attendee"], "mailto:carol@example.net");
    assert_eq!(got[0].body["partstat"], "ACCEPTED");
    assert_eq!(got[0].body["from"], "c.smith@home.example");
    m.stop().await;
}

/// A REPLY that names no attendee answers for nobody: no PARTSTAT comes of
/// it, and the organizer gets the message to read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_without_attendee_goes_to_the_organizer() {
    let hook = Webhook::start();
    let m = InProcess::start_with(&hook.url(), LOCAL).await;
    import(&m, &hook.url(), "mailto:carol@example.net", BUDGET_UID);
    let (conn, _) = transaction(&m, [192, 0, 2, 5], &[gateway()]).await;
    redirected_to_organizer(finish(conn, "reply-without-attendee.eml").await, &hook).await;
    m.stop().await;
}

/// COUNTER and REFRESH travel as replies do, bound to the token alike, and
/// reach a webhook with their method; the caldav target, which cannot act
/// on them, has them go to the organizer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_and_refresh_reach_the_webhook_and_go_to_the_organizer_with_caldav() {
    let hook = Webhook::start();
    let m = InProcess::start_with(&hook.url(), LOCAL).await;
    import(&m, &hook.url(), "mailto:carol@example.net", BUDGET_UID);
    for (n, (eml, method)) in [("counter.eml", "COUNTER"), ("refresh.eml", "REFRESH")]
        .into_iter()
        .enumerate()
    {
        let (conn, _) = transaction(&m, [192, 0, 2, 6], &[gateway()]).await;
        assert_eq!(finish(conn, eml).await.1, Status::Discard, "{eml}");
        let got = hook.wait_for(n + 1, Duration::from_secs(10));
        let d = got.iter().find(|d| d.body["method"] == method).unwrap_or_else(|| {
            panic!(
                "{method}: {:?} refused {:?}",
                got.iter().map(|d| d.body["method"].clone()).collect::<Vec<_>>(),
                hook.refused()
            )
        });
        assert_eq!(d.body["kind"], "reply");
        assert_eq!(d.body["attendee"], "mailto:carol@example.net");
        let cal = d.body["icalendar"].as_str().unwrap();
        assert!(
            cal.contains(&format!("METHOD:{method}")) && cal.contains("ORGANIZER:mailto:alice@example.org"),
            "{cal}"
        );
    }
    // Through another attendee's token: refused as a reply would be.
    let stolen = String::from_utf8(fixture("counter.eml"))
        .unwrap()
        .replace("mailto:carol@example.net", "mailto:mallory@example.net");
    let (conn, _) = transaction(&m, [192, 0, 2, 6], &[gateway()]).await;
    match finish_raw(conn, stolen).await.1 {
        Status::Reject { message: Some(msg) } => assert!(msg.to_string_lossy().starts_with("550 5.7.1 ")),
        other => panic!("{other:?}"),
    }
    m.stop().await;

    let server = Webhook::start();
    let m = InProcess::start_edited(&server.url(), |c| {
        format!("{}{LOCAL}", c.replace("kind = \"webhook\"", "kind = \"caldav\""))
    })
    .await;
    import(&m, &server.url(), "mailto:carol@example.net", BUDGET_UID);
    let (conn, _) = transaction(&m, [192, 0, 2, 7], &[gateway()]).await;
    let (actions, status) = finish(conn, "counter.eml").await;
    // The COUNTER she gets names her, not the gateway, as ORGANIZER.
    let shown = format!("{actions:?}");
    assert!(
        shown.contains("ORGANIZER;EMAIL=alice@example.org:mailto:alice@example.org")
            && !shown.contains("ORGANIZER:mailto:calendar+"),
        "{shown}"
    );
    redirected_to_organizer((actions, status), &server).await;
    m.stop().await;
}

/// A token holder's reply whose second VEVENT lists 40,000 other attendees
/// (with max_attendees raised to let it in): the rewrite that drops them
/// runs off the session thread, in time linear in the reply; new sessions
/// meanwhile are answered within a second, and only Bob's answer is handed on.
#[tokio::test(flavor = "current_thread")]
async fn a_reply_listing_40000_others_stalls_nobody_and_hands_on_only_the_tokens_answer() {
    let hook = Webhook::start();
    let m = InProcess::start_edited(&hook.url(), |c| {
        let c = c.replace(
            "max_message_bytes = 1000000",
            "max_message_bytes = 20000000\nmax_attendees = 100000",
        );
        format!("{c}{LOCAL}")
    })
    .await;
    // The CLI waits for the daemon, which runs on this very thread.
    let (dir, url) = (m.state_dir.path().to_owned(), hook.url());
    tokio::task::spawn_blocking(move || import_in(&dir, &url, "mailto:bob@example.com", "many@example.org"))
        .await
        .unwrap();
    let others: String = (0..40_000)
        .map(|i| format!("ATTENDEE;PARTSTAT=DECLINED:mailto:guest{i}@example.net\r\n"))
        .collect();
    let ics = format!(
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//x//EN\r\nMETHOD:REPLY\r\n\
         BEGIN:VEVENT\r\nUID:many@example.org\r\nDTSTAMP:20261120T100000Z\r\nATTENDEE;PARTSTAT=ACCEPTED:mailto:bob@example.com\r\nEND:VEVENT\r\n\
         BEGIN:VEVENT\r\nUID:many@example.org\r\nRECURRENCE-ID:20261208T090000Z\r\nDTSTAMP:20261120T100000Z\r\n{others}END:VEVENT\r\nEND:VCALENDAR\r\n"
    );
    let raw = common::calendar_message("many@example.com", &ics);
    let addr = m.addr;
    let big = tokio::spawn(async move { common::milter_send(addr, "<bob@example.com>", &raw, "QMANY").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let slowest = common::slowest_new_session(m.addr, 5).await;
    assert_eq!(big.await.unwrap(), Status::Discard);
    println!("slowest new connection {slowest:?}");
    assert!(slowest < Duration::from_secs(1), "a new connection waited {slowest:?}");
    let got = hook.wait_for(1, Duration::from_secs(10));
    let body = &got[0].body;
    let cal = body["icalendar"].as_str().unwrap();
    assert!(cal.contains("bob@example.com") && !cal.contains("guest"), "{cal}");
    let dropped = body["dropped"].as_array().unwrap();
    assert!((1..=10).contains(&dropped.len()), "{dropped:?}");
    m.stop().await;
}

/// `inspect` with the configuration takes the milter's decision: the same
/// SMTP answer for an unknown token, a token answered for by another
/// attendee, a person's text to a valid token, and a policy refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_with_the_configuration_agrees_with_the_milter() {
    let hook = Webhook::start();
    let policy = "\n[policy]\nsender = \"dmarc\"\nauthserv_id = \"mx.example.org\"\n";
    let extra = format!("{LOCAL}{policy}");
    let m = InProcess::start_with(&hook.url(), &extra).await;
    let dir = m.state_dir.path();
    let config = dir.join("inspect.toml");
    std::fs::write(
        &config,
        common::config_text(dir, "inet:127.0.0.1:1", &hook.url(), &extra),
    )
    .unwrap();
    let add = |attendee: &str| common::add_token(&config, "mailto:alice@example.org", attendee, APPLE_UID);
    let carols = add("mailto:carol@example.net");
    let bobs = add("mailto:bob@example.com");
    let unknown = "00000000-0000-4000-8000-000000000000".to_owned();
    let rcpt = |token: &str| format!("<calendar+{token}@example.org>");

    // (token, fixture, what the milter answers at RCPT or end of message)
    let cases = [
        (&unknown, "apple.eml", "550 5.1.1"),
        (&carols, "apple.eml", "550 5.7.1"),
        (&bobs, "human-text.eml", "redirect"),
        (&bobs, "apple.eml", "550 5.7.1"),
    ];
    for (token, eml, want) in cases {
        let (conn, st) = transaction(&m, [192, 0, 2, 44], &[rcpt(token)]).await;
        let milter = match &st[0] {
            Status::Reject { message: Some(msg) } => msg.to_string_lossy().into_owned(),
            Status::Continue => {
                let (actions, status) = finish(conn, eml).await;
                match status {
                    Status::Reject { message: Some(msg) } => msg.to_string_lossy().into_owned(),
                    _ if actions.has_add_recipient("<alice@example.org>", None::<&str>) => "redirect".into(),
                    other => format!("{other:?}"),
                }
            }
            other => format!("{other:?}"),
        };
        assert!(milter.starts_with(want), "milter, {eml} to {}: {milter}", &token[..8]);

        let path = format!("{}/tests/fixtures/{eml}", env!("CARGO_MANIFEST_DIR"));
        let out = common::cli(
            &config,
            &[
                "inspect",
                "--rcpt",
                &rcpt(token),
                "--sender",
                "bob@example.com",
                "--json",
                &path,
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{e}: {text}{}", String::from_utf8_lossy(&out.stderr)));
        let inspected = match v["disposition"].as_str() {
            Some("redirect") => "redirect".to_owned(),
            _ => v["smtp_reply"]
                .as_str()
                .or_else(|| v["rejected_recipients"][0]["smtp_reply"].as_str())
                .unwrap_or_default()
                .to_owned(),
        };
        assert!(inspected.starts_with(want), "inspect, {eml} to {}: {text}", &token[..8]);
        assert!(
            v["inputs"].as_str().unwrap().contains("policy.sender = dmarc"),
            "{text}"
        );
    }
    assert!(hook.deliveries().is_empty(), "nothing was handed on");
    m.stop().await;
}

/// Tokens are acted on as `tokens list` prints them: a unique prefix works
/// for show and revoke; the list filters by organizer, attendee and UID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_acted_on_by_the_listed_prefix() {
    let hook = Webhook::start();
    let m = InProcess::start_with(&hook.url(), LOCAL).await;
    let url = hook.url();
    let config = m.state_dir.path().join("tokens.toml");
    std::fs::write(
        &config,
        common::config_text(m.state_dir.path(), "inet:127.0.0.1:1", &url, LOCAL),
    )
    .unwrap();
    let add = |attendee: &str, uid: &str| common::add_token(&config, "mailto:alice@example.org", attendee, uid);
    let bobs = add("mailto:bob@example.com", APPLE_UID);
    let carols = add("mailto:carol@example.net", "other-event@example.org");

    let (_, list, _) = cli(&m, &url, &["tokens", "list"]);
    let listed = list
        .lines()
        .find(|l| l.contains("bob@example.com"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("{list}"))
        .to_owned();
    assert!(listed.ends_with('…') && !list.contains(&bobs), "{list}");
    let (ok, shown, err) = cli(&m, &url, &["tokens", "show", &listed]);
    assert!(ok, "{err}");
    assert!(shown.contains(&bobs), "{shown}");
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert!(
        shown["created_at"]
            .as_str()
            .is_some_and(|t| t.starts_with("20") && t.ends_with('Z')),
        "RFC 3339 beside epoch milliseconds: {shown}"
    );

    let (_, json, _) = cli(&m, &url, &["tokens", "list", "--attendee", "BOB@example.com", "--json"]);
    let rows: Vec<serde_json::Value> = json.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 1, "{json}");
    assert_eq!(rows[0]["token"], bobs.as_str());
    let (_, by_uid, _) = cli(
        &m,
        &url,
        &["tokens", "list", "--uid", "other-event@example.org", "--json"],
    );
    assert!(by_uid.contains(&carols) && !by_uid.contains(&bobs), "{by_uid}");
    let (_, by_organizer, _) = cli(&m, &url, &["tokens", "list", "--organizer", "alice@example.org"]);
    assert!(by_organizer.contains("-- 2 tokens"), "{by_organizer}");

    let (ok, _, err) = cli(&m, &url, &["tokens", "show", "abc"]);
    assert!(
        !ok && err.contains("no such token"),
        "too short a prefix names nothing: {err}"
    );
    let (ok, out, err) = cli(&m, &url, &["tokens", "revoke", &bobs[..8]]);
    assert!(ok && out.contains("revoked"), "{out}{err}");
    let (_, st) = transaction(&m, [192, 0, 2, 45], &[format!("<calendar+{bobs}@example.org>")]).await;
    match &st[0] {
        Status::Reject { message: Some(msg) } => assert!(msg.to_string_lossy().starts_with("550 5.1.1 ")),
        other => panic!("{other:?}"),
    }
    let (_, list, _) = cli(&m, &url, &["tokens", "list"]);
    assert!(
        list.contains("-- 1 tokens") && list.contains("carol@example.net"),
        "{list}"
    );
    m.stop().await;
}

/// One transaction from `sender` (MAIL FROM) to `rcpt`, the message `raw`.
async fn from_sender(m: &InProcess, sender: &str, rcpt: &str, raw: &[u8]) -> (EomActions, Status) {
    let mut conn = TestConnection::configure().open_tcp(m.addr).await.unwrap();
    conn.connect("mx.example.net", [192, 0, 2, 60]).await.unwrap();
    conn.mail([sender]).await.unwrap();
    assert_eq!(conn.rcpt([rcpt]).await.unwrap(), Status::Continue);
    assert_eq!(conn.data().await.unwrap(), Status::Continue);
    let r = common::milter_message(&mut conn, raw, "BOUNCE1").await;
    conn.close().await.unwrap();
    r
}

/// Each form of bounce, from the null sender, marks the attendee's
/// invitation failed as an RFC 3464 bounce does; a text "report" from a
/// person is no bounce; a bounce through a token shared by several
/// attendees goes to the organizer to read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounces_as_the_world_writes_them_mark_the_invitation_failed() {
    let hook = Webhook::start();
    let m = InProcess::start_with(&hook.url(), LOCAL).await;
    import(&m, &hook.url(), "mailto:bob@example.com", "planning-2026@example.org");
    let forms = [
        "domino-nested.eml",
        "exim-global.eml",
        "google-empty-status.eml",
        "qmail-text.eml",
        "gmail-text.eml",
        "zoho-mixed.eml",
    ];
    let raw = |name: &str| {
        String::from_utf8(fixture(&format!("bounces/{name}")))
            .unwrap()
            .replace("calendar+TOKEN@", &format!("calendar+{TOKEN}@"))
            .into_bytes()
    };
    for (n, name) in forms.iter().enumerate() {
        // Each its own Message-ID, so none is a duplicate of another.
        let text = String::from_utf8(raw(name))
            .unwrap()
            .replacen("Message-ID: <", &format!("Message-ID: <{n}."), 1);
        let (_, status) = from_sender(&m, "<>", &gateway(), text.as_bytes()).await;
        assert_eq!(status, Status::Discard, "{name}");
        let got = hook.wait_for(n + 1, Duration::from_secs(10));
        let last = got.last().unwrap();
        assert_eq!(last.body["kind"], "bounce", "{name}: {}", last.body);
        assert_eq!(last.body["attendee"], "mailto:bob@example.com", "{name}");
    }
    let delivered = hook.deliveries().len();

    // The same text from a person is no report: she gets it to read.
    let (actions, status) = from_sender(&m, "<mallory@example.net>", &gateway(), &raw("qmail-text.eml")).await;
    assert!(matches!(status, Status::Accept | Status::Continue), "{status:?}");
    assert!(
        actions.has_add_recipient("<alice@example.org>", None::<&str>),
        "{actions:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hook.deliveries().len(), delivered);

    // A token shared by Bob and Carol: the report cannot be tied to Bob.
    let (ok, shared, err) = cli(
        &m,
        &hook.url(),
        &[
            "tokens",
            "add",
            "--organizer",
            "mailto:alice@example.org",
            "--attendee",
            "mailto:bob@example.com",
            "--attendee",
            "mailto:carol@example.net",
            "--uid",
            "planning-2026@example.org",
        ],
    );
    assert!(ok, "{err}");
    let rcpt = format!("<calendar+{}@example.org>", shared.trim());
    let text = String::from_utf8(raw("domino-nested.eml"))
        .unwrap()
        .replace(&format!("calendar+{TOKEN}@"), &format!("calendar+{}@", shared.trim()));
    let (actions, status) = from_sender(&m, "<>", &rcpt, text.as_bytes()).await;
    assert!(matches!(status, Status::Accept | Status::Continue), "{status:?}");
    assert!(
        actions.has_add_recipient("<alice@example.org>", None::<&str>),
        "{actions:?}"
    );
    assert!(actions.has_delete_recipient(rcpt.as_str()), "{actions:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hook.deliveries().len(), delivered, "nothing applied for Bob");
    m.stop().await;
}
