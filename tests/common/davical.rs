//! A real DAViCal (Debian's package) for tests: its own private PostgreSQL
//! cluster, the database built by DAViCal's own create-database.sh, the users
//! alice (organizer), imip (the service account) and bob (a local attendee)
//! as DAViCal's admin pages would create them, a configuration file of the
//! test's own, and PHP's built-in web server. Nothing under /etc is written:
//! DAViCal reads `/etc/davical/<SERVER_NAME>-conf.php`, and a prepended
//! script points that name, through `..`, at the test's directory.

use super::{
    free_port,
    postgres::Postgres,
    radicale::{basic, http, Response},
    wait_until,
};
use std::{
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

pub struct Davical {
    pub port: u16,
    pub pg: Postgres,
    pub dir: tempfile::TempDir,
    php: Child,
}

/// Login and password of each user.
pub const USERS: &[(&str, &str)] = &[("alice", "alice-pw"), ("imip", "imip-pw"), ("bob", "bob-pw")];

const HTDOCS: &str = "/usr/share/davical/htdocs";

/// As DAViCal's admin pages create a user: a usr row, a principal with the
/// default privileges, the home collections. `**` marks a plain password.
const USERS_SQL: &str = "
CREATE TEMP TABLE new_users (username text, password text, fullname text, email text);
INSERT INTO new_users VALUES
  ('alice', '**alice-pw', 'Alice Organizer', 'alice@example.org'),
  ('imip',  '**imip-pw',  'iMIP service',    'imip@example.org'),
  ('bob',   '**bob-pw',   'Bob Attendee',    'bob@example.org');
INSERT INTO usr (active, email_ok, updated, username, password, fullname, email)
  SELECT true, current_date, current_timestamp, username, password, fullname, email FROM new_users;
INSERT INTO principal (type_id, user_no, displayname, default_privileges)
  SELECT 1, u.user_no, u.fullname, privilege_to_bits(ARRAY['read-free-busy','schedule-deliver'])
  FROM usr u JOIN new_users n USING (username);
INSERT INTO collection (user_no, parent_container, dav_name, dav_etag, dav_displayname,
                        is_calendar, is_addressbook, default_privileges, created, modified, resourcetypes)
  SELECT u.user_no, '/'||u.username||'/', '/'||u.username||'/'||c.name||'/', '-1', u.fullname||c.suffix,
         c.cal, NOT c.cal, NULL, current_timestamp, current_timestamp,
         CASE WHEN c.cal THEN '<DAV::collection/><urn:ietf:params:xml:ns:caldav:calendar/>'
              ELSE '<DAV::collection/><urn:ietf:params:xml:ns:carddav:addressbook/>' END
  FROM usr u JOIN new_users n USING (username)
  CROSS JOIN (VALUES ('calendar', ' calendar', true), ('.out', ' Outbox', true),
                     ('.in', ' Inbox', true), ('addresses', ' addressbook', false)) AS c(name, suffix, cal);
";

impl Davical {
    pub fn start() -> Self {
        assert!(
            Path::new(HTDOCS).exists() && Path::new("/etc/davical").exists(),
            "DAViCal is not installed: .ci/run installs it (apt-get install davical)"
        );
        let pg = Postgres::start_bare();
        let dir = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let out = Command::new("/usr/share/davical/dba/create-database.sh")
            .args(["davical", "admin-pw"])
            .current_dir(dir.path())
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", pg.port.to_string())
            .env("PGUSER", "postgres")
            .output()
            .expect("create-database.sh");
        assert!(
            out.status.success(),
            "create-database.sh: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        pg.psql_as("davical_dba", "davical", USERS_SQL);
        let port = free_port();
        let d = dir.path();
        std::fs::write(
            d.join("davical-conf.php"),
            format!(
                "<?php\n$c->domain_name = '127.0.0.1';\n$c->pg_connect[] = 'host=127.0.0.1 port={} dbname=davical user=davical_app';\n$c->admin_email = 'admin@example.org';\n$c->system_name = 'DAViCal (imip-milter tests)';\n// DAViCal builds its hrefs from SERVER_NAME: undo prepend.php's redirection.\n$_SERVER['SERVER_NAME'] = $c->domain_name;\n",
                pg.port
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("prepend.php"),
            "<?php\n$_SERVER['SERVER_NAME'] = '../..' . __DIR__ . '/davical';\n",
        )
        .unwrap();
        let log = std::fs::File::create(d.join("php.log")).unwrap();
        // One process (no PHP_CLI_SERVER_WORKERS): requests one at a time,
        // and a kill stops it all.
        let php = Command::new("php")
            .args(["-S", &format!("127.0.0.1:{port}"), "-t", HTDOCS, "-d"])
            .arg(format!("auto_prepend_file={}", d.join("prepend.php").display()))
            .current_dir(HTDOCS)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("php");
        let dav = Self { port, pg, dir, php };
        assert!(
            wait_until(Duration::from_secs(30), || TcpStream::connect(("127.0.0.1", port))
                .is_ok()),
            "DAViCal did not start: {}",
            dav.log()
        );
        dav
    }

    /// target.url: DAViCal's CalDAV entry point.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/caldav.php", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("php.log")).unwrap_or_default()
    }

    /// Grants `to` read and write on everything of `owner`'s (a principal
    /// grant, as the admin pages' Grants tab writes it).
    pub fn grant(&self, owner: &str, to: &str) {
        self.pg.psql_as(
            "davical_dba",
            "davical",
            &format!(
                "INSERT INTO grants (by_principal, to_principal, privileges, is_group) \
                 SELECT a.principal_id, i.principal_id, privilege_to_bits(ARRAY['DAV::read','DAV::write']), false \
                 FROM principal a JOIN usr ua ON ua.user_no = a.user_no, principal i JOIN usr ui ON ui.user_no = i.user_no \
                 WHERE ua.username = '{owner}' AND ui.username = '{to}'"
            ),
        );
    }

    /// A request as `user` to a path under /caldav.php.
    pub fn request(&self, user: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Response {
        let password = USERS.iter().find(|(u, _)| *u == user).map(|(_, p)| *p).unwrap_or("");
        let auth = basic(user, password);
        let mut all: Vec<(&str, &str)> = vec![("Authorization", auth.as_str())];
        all.extend_from_slice(headers);
        http(self.port, method, &format!("/caldav.php{path}"), &all, body)
    }
}

impl Drop for Davical {
    fn drop(&mut self) {
        let _ = self.php.kill();
        let _ = self.php.wait();
    }
}
