//! The shipped Prometheus alert rules (packaging/prometheus/): valid, their
//! unit tests green under `promtool test rules`, and every metric they use
//! served by a running imip-milter.

mod common;

use common::{free_port, InProcess, Webhook};
use std::{
    io::{Read, Write},
    path::Path,
    process::Command,
};

fn promtool(args: &[&str]) -> (bool, String) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/prometheus");
    let out = Command::new("promtool")
        .args(args)
        .current_dir(&dir)
        .output()
        .expect("promtool is not installed: .ci/run installs it (apt-get install prometheus)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn the_alert_rules_pass_their_tests() {
    let (ok, out) = promtool(&["check", "rules", "imip-milter.rules.yml"]);
    assert!(ok, "{out}");
    let (ok, out) = promtool(&["test", "rules", "imip-milter.rules.test.yml"]);
    assert!(ok, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_rules_use_is_served() {
    let hook = Webhook::start();
    let port = free_port();
    let m = InProcess::start_with(&hook.url(), &format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n")).await;
    let scraped = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    let rules = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/prometheus/imip-milter.rules.yml"),
    )
    .unwrap();
    let mut used: Vec<&str> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("imip_milter_"))
        .collect();
    used.sort_unstable();
    used.dedup();
    assert!(used.len() >= 5, "{used:?}");
    for name in used {
        assert!(
            scraped
                .lines()
                .any(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{"))),
            "{name} is in the rules but not served:\n{scraped}"
        );
    }
    m.stop().await;
}
