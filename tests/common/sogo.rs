//! A real SOGo (Debian's package `sogo`) for tests: its own private
//! PostgreSQL cluster holding SOGo's tables and its user source (an SQL
//! table of the users alice (organizer), imip (the service account) and bob,
//! plain passwords), and one sogod process on a free port. Nothing under
//! /etc is written: every setting is given on sogod's command line, GNUstep's
//! argument domain, which outranks /etc/sogo/sogo.conf and the sogod
//! defaults of the `sogo` user. SOGo still reads /etc/sogo/sogo.conf (mode
//! 0640 root:sogo) and exits when it cannot, and refuses to run as root: it
//! runs as the package's `sogo` user and group. No memcached: the cache is a
//! socket in the test's directory that nothing listens on; SOGo logs a cache
//! error per lookup and answers all the same, from the database.
//!
//! Sharing as SOGo's web interface does it, through SOGo's own DAV
//! extensions: `grant` (an `acl-query` POSTed to the owner's calendar as
//! the owner) and `subscribe` (a `subscribe` POSTed to it as the reader,
//! after which the calendar shows in the reader's home as
//! `<owner>_personal/`, DAV:owner the owner's principal).

use super::{
    free_port,
    postgres::Postgres,
    radicale::{basic, http, Response},
    wait_until,
};
use std::{
    net::TcpStream,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

pub struct Sogo {
    pub port: u16,
    pub pg: Postgres,
    pub dir: tempfile::TempDir,
    child: Child,
}

/// Login and password of each user.
pub const USERS: &[(&str, &str)] = &[("alice", "alice-pw"), ("imip", "imip-pw"), ("bob", "bob-pw")];

/// Where SOGo answers CalDAV; request paths are under it.
pub const DAV: &str = "/SOGo/dav";

const SOGOD: &str = "/usr/sbin/sogod";

/// The roles SOGo's sharing dialog gives for "create, erase, and modify
/// every event" (SoObjects/SOGo/SOGoPermissions.m). Changing an existing
/// event takes the Modifier role of its CLASS (PUBLIC, PRIVATE,
/// CONFIDENTIAL), which also lets it be read; creating one takes
/// ObjectCreator. ObjectViewer and ObjectEditor are not calendar roles:
/// alone they give nothing.
pub const CALENDAR_ROLES: &str =
    "<ObjectCreator/><ObjectEraser/><PublicModifier/><PrivateModifier/><ConfidentialModifier/>";

/// SOGo's SQL user source: c_uid logs in, c_name is the unique id, c_cn the
/// display name, mail the calendar user address.
const USERS_SQL: &str = "
CREATE TABLE sogo_users (
  c_uid varchar(128) PRIMARY KEY,
  c_name varchar(128) NOT NULL,
  c_password varchar(256) NOT NULL,
  c_cn varchar(256),
  mail varchar(256)
);
INSERT INTO sogo_users VALUES
  ('alice', 'alice', 'alice-pw', 'Alice Organizer', 'alice@example.org'),
  ('imip',  'imip',  'imip-pw',  'iMIP service',    'imip@example.org'),
  ('bob',   'bob',   'bob-pw',   'Bob Attendee',    'bob@example.org');
";

fn id_of_sogo(arg: &str) -> u32 {
    let out = Command::new("id").args([arg, "sogo"]).output().expect("id");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse::<u32>()
        .expect("the sogo user (the sogo package creates it)")
}

impl Sogo {
    pub fn start() -> Self {
        assert!(
            Path::new(SOGOD).exists(),
            "SOGo is not installed: .ci/run installs it (apt-get install sogo)"
        );
        let pg = Postgres::start_bare();
        // CREATE DATABASE cannot share a psql -c with other statements.
        pg.psql_as("postgres", "postgres", "CREATE ROLE sogo LOGIN");
        pg.psql_as("postgres", "postgres", "CREATE DATABASE sogo OWNER sogo");
        pg.psql_as("sogo", "sogo", USERS_SQL);

        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let (uid, gid) = (id_of_sogo("-u"), id_of_sogo("-g"));
        // sogod writes its log and pid file here.
        let chown = Command::new("chown").arg("sogo:sogo").arg(dir.path()).status().unwrap();
        assert!(chown.success());
        let d = dir.path();
        let port = free_port();
        // Trust authentication: no password in the URLs.
        let db = format!("postgresql://sogo@127.0.0.1:{}/sogo", pg.port);
        let sources = format!(
            "({{ type = sql; id = users; viewURL = \"{db}/sogo_users\"; canAuthenticate = YES; \
             isAddressBook = NO; userPasswordAlgorithm = plain; displayName = Users; }})"
        );
        let settings: Vec<(&str, String)> = vec![
            ("WOPort", format!("127.0.0.1:{port}")),
            ("WONoDetach", "YES".into()),
            // One process: no watchdog parent that outlives a kill, or
            // waits for its child on SIGTERM.
            ("WOUseWatchDog", "NO".into()),
            ("WOLogFile", d.join("sogo.log").display().to_string()),
            ("WOPidFile", d.join("sogo.pid").display().to_string()),
            ("SOGoUserSources", sources),
            // SOGo creates these tables when it starts.
            ("SOGoProfileURL", format!("{db}/sogo_user_profile")),
            ("OCSFolderInfoURL", format!("{db}/sogo_folder_info")),
            ("OCSSessionsFolderURL", format!("{db}/sogo_sessions_folder")),
            // /etc/sogo/sogo.conf points these at 127.0.0.1:5432 and the
            // standard memcached port: nothing of another SOGo is shared.
            ("OCSEMailAlarmsFolderURL", format!("{db}/sogo_alarms_folder")),
            ("SOGoMemcachedHost", d.join("memcached.sock").display().to_string()),
            // No mail: the machine may run a Postfix of the tests' own.
            ("SOGoAppointmentSendEMailNotifications", "NO".into()),
            ("SOGoACLsSendEMailNotifications", "NO".into()),
            ("SOGoFoldersSendEMailNotifications", "NO".into()),
            ("SOGoEnableEMailAlarms", "NO".into()),
            ("SOGoMailingMechanism", "smtp".into()),
            ("SOGoSMTPServer", "smtp://127.0.0.1:1".into()),
            ("SOGoTimeZone", "UTC".into()),
            ("SOGoMailDomain", "example.org".into()),
        ];
        let mut cmd = Command::new(SOGOD);
        for (k, v) in &settings {
            cmd.arg(format!("-{k}")).arg(v);
        }
        let err = std::fs::File::create(d.join("sogod.err")).unwrap();
        let mut child = cmd
            .uid(uid)
            .gid(gid)
            .current_dir(d)
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("sogod");
        let up = wait_until(Duration::from_secs(30), || {
            matches!(child.try_wait(), Ok(Some(_))) || TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        let exited = child.try_wait().ok().flatten();
        let sogo = Self { port, pg, dir, child };
        assert!(
            up && exited.is_none(),
            "SOGo did not start ({exited:?}): {}",
            sogo.log()
        );
        sogo
    }

    /// target.url: SOGo's CalDAV root (principals are /SOGo/dav/<login>/,
    /// calendar homes /SOGo/dav/<login>/Calendar/).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}{DAV}", self.port)
    }

    /// sogod's log, then what it wrote to stderr (startup failures).
    pub fn log(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        format!("{}{}", read("sogo.log"), read("sogod.err"))
    }

    /// A request as `user` to a path under /SOGo/dav.
    pub fn request(&self, user: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Response {
        let password = USERS.iter().find(|(u, _)| *u == user).map(|(_, p)| *p).unwrap_or("");
        let auth = basic(user, password);
        let mut all: Vec<(&str, &str)> = vec![("Authorization", auth.as_str())];
        all.extend_from_slice(headers);
        http(self.port, method, &format!("{DAV}{path}"), &all, body)
    }

    /// The path (under /SOGo/dav) of `owner`'s default calendar.
    pub fn calendar(owner: &str) -> String {
        format!("/{owner}/Calendar/personal/")
    }

    /// One of SOGo's DAV commands (an XML body POSTed to a calendar).
    fn command(&self, user: &str, path: &str, xml: &str) -> Response {
        self.request(
            user,
            "POST",
            path,
            &[("Content-Type", "application/xml; charset=utf-8")],
            &format!("<?xml version=\"1.0\" encoding=\"utf-8\"?>{xml}"),
        )
    }

    /// Gives `to` read and write on `owner`'s personal calendar, as the
    /// owner shares it in the web interface: `add-user`, then
    /// `set-roles` with CALENDAR_ROLES (both answer 204).
    pub fn grant(&self, owner: &str, to: &str) {
        let calendar = Self::calendar(owner);
        for query in [
            format!("<add-user user=\"{to}\"/>"),
            format!("<set-roles user=\"{to}\">{CALENDAR_ROLES}</set-roles>"),
        ] {
            let r = self.command(
                owner,
                &calendar,
                &format!("<acl-query xmlns=\"urn:inverse:params:xml:ns:inverse-dav\">{query}</acl-query>"),
            );
            assert_eq!(
                r.status,
                204,
                "acl-query {query} on {calendar}: {}\n{}",
                r.body,
                self.log()
            );
        }
    }

    /// `by` subscribes to `owner`'s personal calendar (it needs a grant
    /// first: SOGo answers 404 for a calendar `by` may not read). The path
    /// (under /SOGo/dav) where it then shows in `by`'s calendar home.
    pub fn subscribe(&self, owner: &str, by: &str) -> String {
        let calendar = Self::calendar(owner);
        let r = self.command(
            by,
            &calendar,
            "<subscribe xmlns=\"urn:inverse:params:xml:ns:inverse-dav\"/>",
        );
        // 200 and the calendar's display name, e.g.
        // "Personal Calendar (Alice Organizer <alice@example.org>)".
        assert_eq!(
            r.status,
            200,
            "subscribe to {calendar} as {by}: {}\n{}",
            r.body,
            self.log()
        );
        format!("/{by}/Calendar/{owner}_personal/")
    }
}

impl Drop for Sogo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
