//! A real Cyrus IMAP with CalDAV (Debian's cyrus-imapd and cyrus-caldav,
//! 3.6) for tests: its own imapd.conf and cyrus.conf in a temporary
//! directory (configuration directory, partition, sasldb, pid file), given to
//! `master -C … -M …`, so nothing under /etc or /var is touched. master
//! starts as root and turns itself into the `cyrus` user, as Debian runs
//! it. Two services on free loopback ports: httpd (CalDAV) and imapd (Cyrus
//! shares calendars through IMAP: ACLs and subscriptions). Passwords are
//! checked against the private sasldb (auxprop), so wrong ones are refused.
//! The users alice (organizer, mailto:alice@example.org), imip (the service
//! account) and bob log in once over IMAP (their INBOX is created) and once
//! over HTTP (Cyrus creates their calendar home with Default, Inbox and
//! Outbox). What Cyrus mails (iMIP it schedules) goes to a fake sendmail
//! that keeps it in `sent.eml`; each user's HTTP traffic is logged (Cyrus's
//! telemetry log) for `log()`.

use super::{
    free_port,
    radicale::{basic, http, Response},
    wait_until,
};
use std::{
    io::{BufRead, BufReader, Write},
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

pub struct Cyrus {
    /// httpd (CalDAV).
    pub port: u16,
    /// imapd (ACLs, subscriptions).
    pub imap_port: u16,
    pub dir: tempfile::TempDir,
    master: Child,
}

/// Login and password of each user.
pub const USERS: &[(&str, &str)] = &[("alice", "alice-pw"), ("imip", "imip-pw"), ("bob", "bob-pw")];

/// Cyrus lists mailto:<user>@DOMAIN in a user's calendar-user-address-set.
pub const DOMAIN: &str = "example.org";

/// The host's name, as a real server's; also the SASL realm. Cyrus's
/// principal-property-search matches the text searched for as a substring
/// of `<user>@SERVERNAME`, not of the calendar-user-address-set.
pub const SERVERNAME: &str = "mail.example.org";

/// An owner's rights on her calendar but the administration right `a`:
/// read, write, create and delete events.
pub const READ_WRITE: &str = "lrswipkxtecdn";

const BIN: &str = "/usr/lib/cyrus/bin";

/// Cyrus runs `sendmail -bs` and speaks SMTP on its standard input and
/// output: answer as a mail server would, keep each message in sent.eml.
const SENDMAIL: &str = r#"#!/bin/sh
out="$(dirname "$0")/sent.eml"
r() { printf '%s\r\n' "$1"; }
r "220 localhost ESMTP test sink"
while IFS= read -r line; do
	line=$(printf '%s' "$line" | tr -d '\r')
	case "$line" in
	[Ee][Hh][Ll][Oo]*|[Hh][Ee][Ll][Oo]*) r "250-localhost"; r "250 8BITMIME" ;;
	[Mm][Aa][Ii][Ll]*|[Rr][Cc][Pp][Tt]*) printf '%s\n' "$line" >> "$out"; r "250 OK" ;;
	[Dd][Aa][Tt][Aa]*)
		r "354 go on"
		while IFS= read -r data; do
			data=$(printf '%s' "$data" | tr -d '\r')
			[ "$data" = "." ] && break
			printf '%s\n' "$data" >> "$out"
		done
		printf '\n' >> "$out"
		r "250 OK queued" ;;
	[Qq][Uu][Ii][Tt]*) r "221 bye"; exit 0 ;;
	*) r "250 OK" ;;
	esac
done
"#;

impl Cyrus {
    pub fn start() -> Self {
        assert!(
            Path::new(BIN).join("master").exists()
                && Path::new(BIN).join("httpd").exists()
                && Path::new("/usr/sbin/saslpasswd2").exists(),
            "Cyrus is not installed: .ci/run installs it (apt-get install cyrus-imapd cyrus-caldav cyrus-admin sasl2-bin)"
        );
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        for sub in ["db", "socket", "proc", "lock", "msg", "user", "quota", "sieve"] {
            std::fs::create_dir_all(d.join("conf").join(sub)).unwrap();
        }
        // Telemetry: Cyrus logs each session of a user who has a directory here.
        for (user, _) in USERS {
            std::fs::create_dir_all(d.join("conf/log").join(user)).unwrap();
        }
        std::fs::create_dir(d.join("spool")).unwrap();
        let (port, imap_port) = (free_port(), free_port());
        let dd = d.display();
        std::fs::write(
            d.join("imapd.conf"),
            format!(
                "configdirectory: {dd}/conf\n\
                 defaultpartition: default\n\
                 partition-default: {dd}/spool\n\
                 servername: {SERVERNAME}\n\
                 defaultdomain: {DOMAIN}\n\
                 virtdomains: off\n\
                 altnamespace: yes\n\
                 unixhierarchysep: yes\n\
                 allowplaintext: yes\n\
                 sasl_pwcheck_method: auxprop\n\
                 sasl_auxprop_plugin: sasldb\n\
                 sasl_sasldb_path: {dd}/sasldb2\n\
                 sasl_mech_list: PLAIN LOGIN\n\
                 autocreate_quota: 0\n\
                 httpmodules: caldav\n\
                 caldav_create_default: yes\n\
                 sendmail: {dd}/sendmail\n\
                 lmtpsocket: {dd}/conf/socket/lmtp\n\
                 idlesocket: {dd}/conf/socket/idle\n\
                 notifysocket: {dd}/conf/socket/notify\n\
                 syslog_prefix: cyrus-test\n"
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("cyrus.conf"),
            format!(
                "SERVICES {{\n  \
                 imap cmd=\"{BIN}/imapd -C {dd}/imapd.conf\" listen=\"127.0.0.1:{imap_port}\" prefork=0\n  \
                 http cmd=\"{BIN}/httpd -C {dd}/imapd.conf\" listen=\"127.0.0.1:{port}\" prefork=0\n}}\n"
            ),
        )
        .unwrap();
        std::fs::write(d.join("sendmail"), SENDMAIL).unwrap();
        std::fs::set_permissions(d.join("sendmail"), std::fs::Permissions::from_mode(0o755)).unwrap();
        for (user, password) in USERS {
            let mut c = Command::new("/usr/sbin/saslpasswd2")
                .arg("-f")
                .arg(d.join("sasldb2"))
                .args(["-c", "-p", "-u", SERVERNAME, user])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("saslpasswd2");
            c.stdin.take().unwrap().write_all(password.as_bytes()).unwrap();
            assert!(c.wait().unwrap().success(), "saslpasswd2 {user}");
        }
        let chown = Command::new("chown")
            .args(["-R", "cyrus:mail"])
            .arg(d)
            .status()
            .expect("chown");
        assert!(chown.success(), "chown cyrus:mail (is Cyrus's user there?)");
        let log = std::fs::File::create(d.join("master.log")).unwrap();
        let err = log.try_clone().unwrap();
        // -D: in the foreground, the child is master itself (SIGTERM stops
        // it and its services).
        let master = Command::new(Path::new(BIN).join("master"))
            .arg("-C")
            .arg(d.join("imapd.conf"))
            .arg("-M")
            .arg(d.join("cyrus.conf"))
            .arg("-p")
            .arg(d.join("master.pid"))
            .arg("-D")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("cyrus master");
        let cyrus = Self {
            port,
            imap_port,
            dir,
            master,
        };
        assert!(
            wait_until(Duration::from_secs(30), || TcpStream::connect(("127.0.0.1", port))
                .is_ok()
                && TcpStream::connect(("127.0.0.1", imap_port)).is_ok()),
            "Cyrus did not start: {}",
            cyrus.log()
        );
        for (user, _) in USERS {
            // An IMAP login creates the INBOX (autocreate_quota), the first
            // CalDAV request the calendar home with its Default calendar.
            cyrus.imap(user, &[]);
            let home = cyrus.request(
                user,
                "PROPFIND",
                &Self::home(user),
                &[("Depth", "0"), ("Content-Type", "application/xml")],
                "<?xml version=\"1.0\"?><D:propfind xmlns:D=\"DAV:\"><D:prop><D:resourcetype/></D:prop></D:propfind>",
            );
            assert_eq!(
                home.status,
                207,
                "{user}'s calendar home: {}\n{}",
                home.body,
                cyrus.log()
            );
        }
        cyrus
    }

    /// target.url: Cyrus's CalDAV context path (where /.well-known/caldav
    /// points; OPTIONS there says calendar-access). PROPFIND on / and /dav/
    /// answers current-user-principal too.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/dav/calendars/", self.port)
    }

    /// A user's calendar home.
    pub fn home(user: &str) -> String {
        format!("/dav/calendars/user/{user}/")
    }

    /// `owner`'s Default calendar as `by` sees it once subscribed:
    /// `/dav/calendars/user/<by>/<owner>.Default/` (the owner's own path
    /// answers anyone else a 301 to it).
    pub fn shared(owner: &str, by: &str) -> String {
        format!("/dav/calendars/user/{by}/{owner}.Default/")
    }

    /// master's output, what Cyrus mailed, and each user's HTTP sessions
    /// (Cyrus logs to syslog, which tests do not read).
    pub fn log(&self) -> String {
        let d = self.dir.path();
        let mut out = std::fs::read_to_string(d.join("master.log")).unwrap_or_default();
        let sent = self.sent();
        if !sent.is_empty() {
            out.push_str("--- sent by Cyrus\n");
            out.push_str(&sent);
        }
        for (user, _) in USERS {
            let mut files: Vec<_> = std::fs::read_dir(d.join("conf/log").join(user))
                .map(|r| r.filter_map(|e| e.ok()).map(|e| e.path()).collect())
                .unwrap_or_default();
            files.sort();
            for f in files {
                out.push_str(&format!("--- {user}: {}\n", f.display()));
                out.push_str(&String::from_utf8_lossy(&std::fs::read(&f).unwrap_or_default()));
            }
        }
        out
    }

    /// What Cyrus mailed (iMIP of its implicit scheduling): the MAIL and
    /// RCPT lines and each message.
    pub fn sent(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sent.eml")).unwrap_or_default()
    }

    /// `to` may read and write `owner`'s Default calendar: the ACL on its
    /// mailbox, set by the owner over IMAP (what cyradm's setaclmailbox
    /// `user/<owner>/#calendars/Default <to> lrswipkxtecdn` does as admin).
    /// Without `grant_home` too, `to` can neither find `owner` by
    /// principal-property-search nor read her principal (403).
    pub fn grant(&self, owner: &str, to: &str) {
        self.imap(owner, &[&format!("SETACL \"#calendars/Default\" {to} {READ_WRITE}")]);
    }

    /// `to` may look up (`l`: principal-property-search finds `owner`) and
    /// read (`r`: PROPFIND on her principal) `owner`'s calendar home.
    pub fn grant_home(&self, owner: &str, to: &str) {
        self.imap(owner, &[&format!("SETACL \"#calendars\" {to} lr")]);
    }

    /// `by` subscribes to `owner`'s Default calendar over IMAP; it then
    /// shows in `by`'s calendar home as `<owner>.Default` (`shared`).
    /// Reading and writing through that path works without it; listing
    /// `by`'s home does not show it.
    pub fn subscribe(&self, owner: &str, by: &str) {
        self.imap(by, &[&format!("SUBSCRIBE \"Other Users/{owner}/#calendars/Default\"")]);
    }

    /// An IMAP session as `user`: LOGIN, each command (each must answer
    /// OK), LOGOUT. The server's lines.
    pub fn imap(&self, user: &str, commands: &[&str]) -> String {
        let password = USERS.iter().find(|(u, _)| *u == user).map(|(_, p)| *p).unwrap_or("");
        let s = TcpStream::connect(("127.0.0.1", self.imap_port)).expect("connect to imapd");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        let mut all = String::new();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        all.push_str(&line);
        let login = format!("LOGIN \"{user}\" \"{password}\"");
        let mut tagged = vec![login.as_str()];
        tagged.extend_from_slice(commands);
        tagged.push("LOGOUT");
        for (n, cmd) in tagged.iter().enumerate() {
            let tag = format!("t{n}");
            w.write_all(format!("{tag} {cmd}\r\n").as_bytes()).unwrap();
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    panic!("imapd closed the connection after {cmd}: {all}");
                }
                all.push_str(&line);
                if let Some(answer) = line.strip_prefix(&format!("{tag} ")) {
                    assert!(answer.starts_with("OK"), "IMAP {user}: {cmd}: {answer}\n{all}");
                    break;
                }
            }
        }
        all
    }

    /// A request as `user` to a path on the server (`/dav/…`, as Cyrus's
    /// hrefs are). Cyrus answers chunked: the body is given back dechunked.
    pub fn request(&self, user: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Response {
        let password = USERS.iter().find(|(u, _)| *u == user).map(|(_, p)| *p).unwrap_or("");
        let auth = basic(user, password);
        let mut all: Vec<(&str, &str)> = vec![("Authorization", auth.as_str())];
        all.extend_from_slice(headers);
        let mut resp = http(self.port, method, path, &all, body);
        if resp
            .headers
            .get("transfer-encoding")
            .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
        {
            resp.body = dechunk(&resp.body);
        }
        resp
    }
}

/// The body of a chunked HTTP/1.1 message (sizes in hex, each chunk
/// followed by CRLF, a last chunk of size 0); what does not parse is kept.
fn dechunk(raw: &str) -> String {
    let raw = raw.as_bytes();
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(eol) = raw[at..].windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&raw[at..at + eol]);
        let Ok(n) = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16) else {
            break;
        };
        let start = at + eol + 2;
        let end = (start + n).min(raw.len());
        out.extend_from_slice(&raw[start..end]);
        if n == 0 || end == raw.len() {
            return String::from_utf8_lossy(&out).into_owned();
        }
        at = if raw[end..].starts_with(b"\r\n") { end + 2 } else { end };
    }
    out.extend_from_slice(&raw[at..]);
    String::from_utf8_lossy(&out).into_owned()
}

impl Drop for Cyrus {
    fn drop(&mut self) {
        // SIGTERM: master stops its services, then itself.
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.master.id() as libc::pid_t, libc::SIGTERM) };
        let stopped = wait_until(Duration::from_secs(10), || {
            matches!(self.master.try_wait(), Ok(Some(_)))
        });
        if !stopped {
            let _ = self.master.kill();
            let _ = self.master.wait();
        }
    }
}
