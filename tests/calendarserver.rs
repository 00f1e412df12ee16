//! Target calendarserver against a contract double that enforces
//! CalendarServer's checks on injected replies.

mod common;

use common::{fixture, postgres::Postgres, InProcess, Webhook, TOKEN};
use indymilter_test::Status;
use std::{process::Command, time::Duration};

const SECRET: &str = "s3cret-shared";
/// The event of outlook.eml, which Erik's token was given for.
const OUTLOOK_UID: &str = "040000008200E00074C5B7101A82E00800000000A0B1C2D3E4F5A60100000000000000001000000012345678";
/// The event of the invitation bounce.eml returns.
const BOUNCED_UID: &str = "invite-bounce-77@example.org";

/// The milter with target calendarserver and this `[tokens]` section.
async fn start_with_tokens(server: &Webhook, tokens: &str) -> InProcess {
    let secrets = tempfile::tempdir().unwrap().keep();
    let secret_file = secrets.join("secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    InProcess::start_edited(&server.base_url(), |c| {
        format!(
            "{}secret_file = \"{}\"\n{tokens}",
            c.replace("kind = \"webhook\"", "kind = \"calendarserver\""),
            secret_file.display()
        )
    })
    .await
}

async fn start(server: &Webhook, uid: &str) -> InProcess {
    let m = start_with_tokens(server, "\n[tokens]\nmode = \"local\"\n").await;
    // The token of the fixtures, as CalendarServer's IMIP_TOKENS holds it.
    let csv = m.state_dir.path().join("tokens.csv");
    std::fs::write(
        &csv,
        format!("{TOKEN},mailto:alice@example.org,mailto:Erik.Jansen@contoso.example,{uid},2099-01-01 00:00:00\n"),
    )
    .unwrap();
    let out = cli(&m, server, &["tokens", "import", csv.to_str().unwrap()]);
    assert!(out.0, "{}", out.1);
    m
}

fn cli(m: &InProcess, server: &Webhook, args: &[&str]) -> (bool, String) {
    let config = m.state_dir.path().join("cli.toml");
    let text = common::config_text(
        m.state_dir.path(),
        "inet:127.0.0.1:1",
        &server.base_url(),
        "\n[tokens]\nmode = \"local\"\n",
    );
    std::fs::write(&config, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_imip-milter"))
        .args(args)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

async fn send(m: &InProcess, eml: &str) -> Status {
    send_from(m, "<erik.jansen@contoso.example>", eml).await
}

/// A fixture to the token's gateway address from `sender`.
async fn send_from(m: &InProcess, sender: &str, eml: &str) -> Status {
    common::milter_send(m.addr, sender, &fixture(eml), "CS1").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlook_reply_is_injected_with_the_real_organizer() {
    let server = Webhook::start();
    server.calendarserver(SECRET);
    let m = start(&server, OUTLOOK_UID).await;
    assert_eq!(send(&m, "outlook.eml").await, Status::Discard);
    let got = server.wait_for(1, Duration::from_secs(10));
    assert_eq!(got.len(), 1, "refused: {:?}", server.refused());
    let h = &got[0].headers;
    assert_eq!(h["originator"], "mailto:Erik.Jansen@contoso.example");
    assert_eq!(h["recipient"], "mailto:alice@example.org");
    assert!(got[0].text.contains("PARTSTAT=DECLINED"));
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounce_is_injected_as_a_5_1_reply() {
    let server = Webhook::start();
    server.calendarserver(SECRET);
    let m = start(&server, BOUNCED_UID).await;
    assert_eq!(send(&m, "bounce.eml").await, Status::Discard);
    let got = server.wait_for(1, Duration::from_secs(10));
    assert_eq!(got.len(), 1, "refused: {:?}", server.refused());
    assert!(got[0].text.contains("REQUEST-STATUS:5.1"), "{}", got[0].text);
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_3_x_status_is_kept_as_failed_with_the_status() {
    let server = Webhook::start();
    server.calendarserver(SECRET);
    server.request_status_next(&["3.7;Invalid calendar user"]);
    let m = start(&server, OUTLOOK_UID).await;
    assert_eq!(send(&m, "outlook.eml").await, Status::Discard);
    server.wait_for(1, Duration::from_secs(10));
    let ok = common::wait_until(Duration::from_secs(5), || {
        cli(&m, &server, &["queue", "list"]).1.contains("1 failed")
    });
    let list = cli(&m, &server, &["queue", "list"]).1;
    assert!(
        ok && list.contains("request-status 3.7;Invalid calendar user"),
        "{list}"
    );
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_double_refuses_a_wrong_secret() {
    let server = Webhook::start();
    server.calendarserver("another-secret");
    let m = start(&server, OUTLOOK_UID).await;
    assert_eq!(send(&m, "outlook.eml").await, Status::Discard);
    assert!(common::wait_until(Duration::from_secs(5), || !server
        .refused()
        .is_empty()));
    assert!(server.deliveries().is_empty());
    let ok = common::wait_until(Duration::from_secs(5), || {
        cli(&m, &server, &["queue", "list"]).1.contains("credentials refused")
    });
    assert!(ok, "{}", cli(&m, &server, &["queue", "list"]).1);
    m.stop().await;
}

/// A CalendarServer site keeps its own token table: CalendarServer minted
/// the token as it sent the invitation, the milter reads the row, injects the
/// reply with the row's organizer and attendee, and moves ACCESSED as
/// CalendarServer does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calendarserver_s_own_token_table_is_the_store() {
    let pg = Postgres::start();
    pg.calendarserver_schema();
    // As CalendarServer's imipCreateToken writes a row: the attendee in lower case.
    pg.psql(&format!(
        "INSERT INTO imip_tokens (token, organizer, attendee, icaluid, accessed) VALUES \
         ('{TOKEN}', 'mailto:alice@example.org', 'mailto:erik.jansen@contoso.example', '{OUTLOOK_UID}', \
          timezone('UTC', now()) - interval '10 days')"
    ));
    let age = || {
        pg.psql(&format!(
            "SELECT extract(epoch FROM timezone('UTC', now()) - accessed)::bigint FROM imip_tokens WHERE token = '{TOKEN}'"
        ))
    };
    assert!(age().parse::<i64>().unwrap() > 9 * 86_400);
    let tokens = format!(
        "\n[tokens]\nmode = \"local\"\nstore = \"postgres\"\nurl = \"{}\"\nlayout = \"calendarserver\"\n",
        pg.url()
    );
    let server = Webhook::start();
    server.calendarserver(SECRET);
    let m = start_with_tokens(&server, &tokens).await;
    assert_eq!(send(&m, "outlook.eml").await, Status::Discard);
    let got = server.wait_for(1, Duration::from_secs(10));
    assert_eq!(got.len(), 1, "refused: {:?}", server.refused());
    assert_eq!(
        got[0].headers["originator"].to_ascii_lowercase(),
        "mailto:erik.jansen@contoso.example"
    );
    assert_eq!(got[0].headers["recipient"], "mailto:alice@example.org");
    assert!(got[0].text.contains("PARTSTAT=DECLINED"));
    let moved = age().parse::<i64>().unwrap();
    assert!(moved < 600, "ACCESSED not moved: {moved} s old");
    // The tokens commands work on CalendarServer's table.
    let list = m.cli(&tokens, &["tokens", "list"]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        text.contains("erik.jansen@contoso.example") && text.contains(&TOKEN[..8]),
        "{text}"
    );
    let minted = common::add_token(
        &m.state_dir.path().join("cli.toml"),
        "alice@example.org",
        "Dana@Example.com",
        "cs-minted-1",
    );
    let row = pg.psql(&format!(
        "SELECT organizer || ' ' || attendee || ' ' || icaluid FROM imip_tokens WHERE token = '{minted}'"
    ));
    assert_eq!(row, "mailto:alice@example.org mailto:dana@example.com cs-minted-1");
    assert!(m.cli(&tokens, &["tokens", "revoke", TOKEN]).status.success());
    assert_eq!(
        pg.psql(&format!("SELECT count(*) FROM imip_tokens WHERE token = '{TOKEN}'")),
        "0"
    );
    m.stop().await;
}

/// An attendee's COUNTER goes to CalendarServer's /inbox/ as a REPLY does,
/// with its method, from the token's attendee to the real organizer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_is_injected_like_a_reply() {
    let server = Webhook::start();
    server.calendarserver(SECRET);
    let m = start_with_tokens(&server, "\n[tokens]\nmode = \"local\"\n").await;
    let csv = m.state_dir.path().join("tokens.csv");
    std::fs::write(
        &csv,
        format!("{TOKEN},mailto:alice@example.org,mailto:carol@example.net,budget-review-2026@example.org,2099-01-01 00:00:00\n"),
    )
    .unwrap();
    let out = cli(&m, &server, &["tokens", "import", csv.to_str().unwrap()]);
    assert!(out.0, "{}", out.1);
    assert_eq!(
        send_from(&m, "<carol@example.net>", "counter.eml").await,
        Status::Discard
    );
    let got = server.wait_for(1, Duration::from_secs(10));
    assert_eq!(got.len(), 1, "refused: {:?}", server.refused());
    assert_eq!(got[0].headers["originator"], "mailto:carol@example.net");
    assert_eq!(got[0].headers["recipient"], "mailto:alice@example.org");
    assert!(
        got[0].text.contains("METHOD:COUNTER") && got[0].text.contains("DTSTART:20261210T150000Z"),
        "{}",
        got[0].text
    );
    m.stop().await;
}
