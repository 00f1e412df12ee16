//! A real Radicale CalDAV server (Debian's package), started per test with
//! its own storage, users and rights, and a small HTTP client for it.

use super::{free_port, wait_until};
use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

pub struct Radicale {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Child,
}

/// The organizer and the service account imip-milter writes with.
pub const USERS: &[(&str, &str)] = &[("alice", "alice-pw"), ("imip", "imip-pw")];

impl Radicale {
    /// The service account may read and write every calendar; users their own.
    pub const RIGHTS: &'static str = "[imip]\nuser: imip\ncollection: .*\npermissions: RrWw\n\n[owner]\nuser: .+\ncollection: {user}(/.*)?\npermissions: RrWw\n\n[root]\nuser: .+\ncollection:\npermissions: R\n";

    pub fn start() -> Self {
        Self::start_with_rights(Self::RIGHTS)
    }

    /// With this rights file (Radicale's `from_file` format).
    pub fn start_with_rights(rights: &str) -> Self {
        Self::start_as(rights, None)
    }

    /// Over TLS with a certificate of the tests' CA; the CA's file.
    pub fn start_tls() -> (Self, std::path::PathBuf) {
        let certs = tempfile::tempdir().unwrap().keep();
        let ca = super::tls::TestCa::new(&certs);
        let server = format!(
            "ssl = True\ncertificate = {}\nkey = {}\n",
            ca.cert.display(),
            ca.key.display()
        );
        (Self::start_as(Self::RIGHTS, Some(&server)), ca.ca)
    }

    fn start_as(rights: &str, tls: Option<&str>) -> Self {
        assert!(
            Path::new("/usr/bin/radicale").exists(),
            "Radicale is not installed: .ci/run installs it (apt-get install radicale)"
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let d = dir.path();
        let users: String = USERS.iter().map(|(u, p)| format!("{u}:{p}\n")).collect();
        std::fs::write(d.join("users"), users).unwrap();
        std::fs::write(d.join("rights"), rights).unwrap();
        std::fs::write(
            d.join("config"),
            format!(
                "[server]\nhosts = 127.0.0.1:{port}\n{tls}[auth]\ntype = htpasswd\nhtpasswd_filename = {0}/users\nhtpasswd_encryption = plain\n[rights]\ntype = from_file\nfile = {0}/rights\n[storage]\nfilesystem_folder = {0}/collections\n[logging]\nlevel = warning\n",
                d.display(),
                tls = tls.unwrap_or("")
            ),
        )
        .unwrap();
        let log = std::fs::File::create(d.join("log")).unwrap();
        let child = Command::new("/usr/bin/radicale")
            .arg("--config")
            .arg(d.join("config"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start radicale");
        let r = Self { dir, port, child };
        assert!(
            wait_until(Duration::from_secs(20), || TcpStream::connect(("127.0.0.1", port))
                .is_ok()),
            "Radicale did not start: {}",
            r.log()
        );
        r
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// A request as `user`: (status, headers, body).
    pub fn request(&self, user: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Response {
        let password = USERS.iter().find(|(u, _)| *u == user).map(|(_, p)| *p).unwrap_or("");
        let auth = basic(user, password);
        let mut all: Vec<(&str, &str)> = vec![("Authorization", auth.as_str())];
        all.extend_from_slice(headers);
        http(self.port, method, path, &all, body)
    }
}

impl Drop for Radicale {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Response {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

pub fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        imip_milter::message::base64(format!("{user}:{password}").as_bytes())
    )
}

/// A plain HTTP/1.1 exchange on loopback (Connection: close).
pub fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Response {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let mut status_line = String::new();
    r.read_line(&mut status_line).unwrap();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut headers = HashMap::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).unwrap_or(0) == 0 || l.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let mut body = Vec::new();
    match headers.get("content-length").and_then(|l| l.parse::<usize>().ok()) {
        Some(n) => {
            body.resize(n, 0);
            let _ = r.read_exact(&mut body);
        }
        None => {
            let _ = r.read_to_end(&mut body);
        }
    }
    Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}
