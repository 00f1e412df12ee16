//! miltertest, an independent milter client scripted in Lua (tests/miltertest/),
//! against the milter running in-process.

mod common;

use common::{InProcess, Webhook, TOKEN};
use std::{path::Path, process::Command, time::Duration};

async fn script(name: &str, m: &InProcess) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/miltertest");
    let path = dir.join(name);
    let port = m.addr.port().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("miltertest")
            .arg("-s")
            .arg(&path)
            .env("MILTER_PORT", port)
            .env("TOKEN", TOKEN)
            .env("SCRIPT_DIR", &dir)
            .output()
    })
    .await
    .expect("join")
    .expect("miltertest is not installed: .ci/run installs it (apt-get install miltertest)");
    assert!(
        out.status.success(),
        "{name}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard() {
    let hook = Webhook::start();
    let m = InProcess::start(&hook.url()).await;
    script("discard.lua", &m).await;
    let got = hook.wait_for(1, Duration::from_secs(10));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body["uid"], "mt-discard-0001");
    assert_eq!(got[0].body["queue_id"], "9MTEST0001");
    assert!(got[0].body["icalendar"]
        .as_str()
        .unwrap()
        .contains("CN=\"Example, Bob\""));
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_recipient() {
    let hook = Webhook::start();
    let m = InProcess::start(&hook.url()).await;
    script("delete-recipient.lua", &m).await;
    let got = hook.wait_for(1, Duration::from_secs(10));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body["envelope"]["rcpt"], format!("Calendar+{TOKEN}@Example.ORG"));
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_rcpt() {
    let hook = Webhook::start();
    let m = InProcess::start(&hook.url()).await;
    script("reject-rcpt.lua", &m).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(hook.deliveries().is_empty());
    m.stop().await;
}

const OUTBOUND: &str =
    "\n[tokens]\nmode = \"local\"\n\n[outbound]\nenabled = true\norganizer_domains = [\"example.org\"]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_tokens_only_for_the_authenticated_organizer_and_no_panic_on_8bit() {
    let hook = Webhook::start();
    let m = InProcess::start_with(&hook.url(), OUTBOUND).await;
    script("outbound.lua", &m).await;
    let out = m.cli(OUTBOUND, &["tokens", "list"]);
    let list = String::from_utf8_lossy(&out.stdout);
    for uid in ["out-sasl", "out-utf8", "out-latin1"] {
        assert!(list.contains(uid), "{uid}: {list}");
    }
    for uid in ["out-nosasl", "out-mallory"] {
        assert!(!list.contains(uid), "{uid} got a token: {list}");
    }
    m.stop().await;
}
