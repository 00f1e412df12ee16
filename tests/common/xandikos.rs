//! A real Xandikos CalDAV server (Debian's package), started per test in a
//! temporary directory: single-user, the principal /alice/ whose
//! calendar-user-address-set is alice@example.org (from EMAIL), her calendar
//! at /alice/calendars/calendar/. Xandikos has no authentication of its own.

use super::{
    free_port,
    radicale::{http, Response},
    wait_until,
};
use std::{
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

pub struct Xandikos {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Child,
}

pub const CALENDAR: &str = "/alice/calendars/calendar/";

impl Xandikos {
    pub fn start() -> Self {
        assert!(
            Path::new("/usr/bin/xandikos").exists(),
            "Xandikos is not installed: .ci/run installs it (apt-get install xandikos)"
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let child = Command::new("/usr/bin/xandikos")
            .args(["--defaults", "-d"])
            .arg(dir.path().join("data"))
            .args(["-l", "127.0.0.1", "-p", &port.to_string()])
            .args(["--current-user-principal", "/alice/"])
            .env("EMAIL", "alice@example.org")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start xandikos");
        let x = Self { port, dir, child };
        assert!(
            wait_until(Duration::from_secs(30), || TcpStream::connect(("127.0.0.1", port))
                .is_ok()
                && x.request("PROPFIND", CALENDAR, &[("Depth", "0")], "").status == 207),
            "Xandikos did not start: {}",
            x.log()
        );
        x
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Response {
        http(self.port, method, path, headers, body)
    }
}

impl Drop for Xandikos {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
