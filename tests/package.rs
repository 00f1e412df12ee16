//! The Debian package: built with cargo deb, installed with dpkg -i on this
//! machine, its binary and `check` run against the shipped configuration,
//! then purged. Needs root and cargo-deb (scripts/test installs it).

use std::{path::Path, process::Command};

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn installed() -> bool {
    run(Command::new("dpkg-query").args(["-W", "-f=${Status}", "imip-milter"]))
        .1
        .contains("install ok installed")
}

#[test]
fn deb_installs_runs_checks_and_purges() {
    assert!(
        !installed(),
        "imip-milter is installed on this machine; this test would purge it"
    );
    let out = tempfile::tempdir().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // The dev profile reuses the test build; releases are built with plain `cargo deb`.
    let (ok, text) = run(Command::new(cargo)
        .args(["deb", "--profile", "dev", "--fast", "-o"])
        .arg(out.path())
        .current_dir(env!("CARGO_MANIFEST_DIR")));
    assert!(ok, "cargo deb failed (install it: cargo install cargo-deb): {text}");
    let deb = std::fs::read_dir(out.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("a .deb");

    let (ok, text) = run(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(ok, "dpkg -i: {text}");
    let result = std::panic::catch_unwind(|| {
        let (ok, text) = run(Command::new("/usr/sbin/imip-milter").arg("--version"));
        assert!(
            ok && text.starts_with(&format!("imip-milter {}", env!("CARGO_PKG_VERSION"))),
            "{text}"
        );

        // The system user, its private state directory, conffile, man pages, snippets.
        let (ok, text) = run(Command::new("id").arg("imip-milter"));
        assert!(ok, "no imip-milter user: {text}");
        let (_, owner) = run(Command::new("stat").args(["-c", "%U %a", "/var/lib/imip-milter"]));
        assert_eq!(owner.trim(), "imip-milter 700");
        let (_, conffiles) = run(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "imip-milter"]));
        assert!(conffiles.contains("/etc/imip-milter/imip-milter.toml"), "{conffiles}");
        for f in [
            "/usr/share/man/man8/imip-milter.8.gz",
            "/usr/share/man/man5/imip-milter.toml.5.gz",
            "/usr/share/doc/imip-milter/postfix/main.cf",
            "/usr/share/doc/imip-milter/postfix/master.cf",
            "/usr/lib/systemd/system/imip-milter.service",
        ] {
            assert!(Path::new(f).exists(), "{f} missing");
        }

        // check, as the daemon's user, against the shipped configuration: the
        // configuration is valid; nothing listens at the example target.
        let (uid, gid) = {
            let id = |a: &str| {
                run(Command::new("id").args([a, "imip-milter"]))
                    .1
                    .trim()
                    .parse::<u32>()
                    .unwrap()
            };
            (id("-u"), id("-g"))
        };
        use std::os::unix::process::CommandExt;
        let out = Command::new("/usr/sbin/imip-milter")
            .args(["check", "--config", "/etc/imip-milter/imip-milter.toml"])
            .uid(uid)
            .gid(gid)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("OK   config: /etc/imip-milter/imip-milter.toml is valid"),
            "{text}"
        );
        assert!(
            text.contains("OK   state_dir: /var/lib/imip-milter is writable"),
            "{text}"
        );
        assert!(text.contains("FAIL target: http://127.0.0.1:9000/imip"), "{text}");
        assert_eq!(out.status.code(), Some(1), "{text}");
    });

    let (ok, text) = run(Command::new("dpkg").args(["--purge", "imip-milter"]));
    assert!(ok, "dpkg --purge: {text}");
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    assert!(!installed());
    for gone in [
        "/usr/sbin/imip-milter",
        "/etc/imip-milter/imip-milter.toml",
        "/var/lib/imip-milter",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} left after purge");
    }
}
