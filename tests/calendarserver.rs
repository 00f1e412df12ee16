//! Target calendarserver against a contract double that enforces
//! CalendarServer's checks on injected replies.

mod common;

use common::{fixture, InProcess, Webhook, TOKEN};
use indymilter_test::{MacroStage, Status, TestConnection};
use std::{process::Command, time::Duration};

const SECRET: &str = "s3cret-shared";
/// The event of outlook.eml, which Erik's token was given for.
const OUTLOOK_UID: &str = "040000008200E00074C5B7101A82E00800000000A0B1C2D3E4F5A60100000000000000001000000012345678";
/// The event of the invitation bounce.eml returns.
const BOUNCED_UID: &str = "invite-bounce-77@example.org";

async fn start(server: &Webhook, uid: &str) -> InProcess {
    let secrets = tempfile::tempdir().unwrap().keep();
    let secret_file = secrets.join("secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let m = InProcess::start_edited(&server.base_url(), |c| {
        format!(
            "{}secret_file = \"{}\"\n\n[tokens]\nmode = \"local\"\n",
            c.replace("kind = \"webhook\"", "kind = \"calendarserver\""),
            secret_file.display()
        )
    })
    .await;
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
    let mut conn = TestConnection::configure().open_tcp(m.addr).await.unwrap();
    conn.connect("client.example.com", [192, 0, 2, 44]).await.unwrap();
    conn.mail(["<erik.jansen@contoso.example>"]).await.unwrap();
    assert_eq!(
        conn.rcpt([format!("<calendar+{TOKEN}@example.org>").as_str()])
            .await
            .unwrap(),
        Status::Continue
    );
    conn.data().await.unwrap();
    let raw = String::from_utf8(fixture(eml)).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    for line in head.replace("\r\n ", " ").replace("\r\n\t", " ").split("\r\n") {
        let (k, v) = line.split_once(':').unwrap();
        conn.header(k, v.trim_start()).await.unwrap();
    }
    conn.eoh().await.unwrap();
    conn.body(body.as_bytes().to_vec()).await.unwrap();
    conn.macros(MacroStage::Eom, [("i", "CS1")]).await.unwrap();
    let (_, st) = conn.eom().await.unwrap();
    conn.close().await.unwrap();
    st
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
