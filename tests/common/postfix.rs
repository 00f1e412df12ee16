//! A private Postfix instance: its own configuration directory, queue, log
//! and port, chroot off, delivering example.org mail to maildirs.

use super::{free_port, wait_until};
use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

pub struct Postfix {
    pub dir: tempfile::TempDir,
    pub port: u16,
}

/// Mailboxes of the instance (virtual(8) maildirs).
pub const MAILBOXES: &[&str] = &["calendar", "alice", "grace", "bob@example.com"];

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn id(arg: &str, name: &str) -> String {
    let out = Command::new("id").args([arg, name]).output().expect("id");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

impl Postfix {
    /// Starts Postfix with `smtpd_milters` set to `milters` (may be empty).
    pub fn start(milters: &str) -> Self {
        Self::start_with(milters, "")
    }

    /// As `start`, with more main.cf lines.
    pub fn start_with(milters: &str, extra: &str) -> Self {
        let main_cf =
            format!("recipient_delimiter = +\nsmtpd_milters = {milters}\nmilter_default_action = tempfail\n{extra}");
        Self::build(&main_cf, "", MAILBOXES, &[])
    }

    /// As `start`, with these mailboxes (see MAILBOXES for the forms).
    pub fn start_with_mailboxes(milters: &str, mailboxes: &[&str]) -> Self {
        let main_cf = format!("recipient_delimiter = +\nsmtpd_milters = {milters}\nmilter_default_action = tempfail\n");
        Self::build(&main_cf, "", mailboxes, &[])
    }

    /// Starts Postfix with the snippets shipped in postfix/, as a mail
    /// administrator installs them: only paths, the milter port, the pipe's
    /// user and program are adapted to this instance.
    pub fn start_shipped(milter_port: u16, program: &Path, config: &Path) -> Self {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("postfix");
        let read =
            |name: &str| fs::read_to_string(shipped.join(name)).unwrap_or_else(|e| panic!("postfix/{name}: {e}"));
        let holder = "@ETC@";
        let main_cf = read("main.cf")
            .replace("/etc/postfix/", &format!("{holder}/"))
            .replace("inet:127.0.0.1:8895", &format!("inet:127.0.0.1:{milter_port}"));
        let master_cf = read("master.cf")
            .replace("user=imip-milter", "user=nobody")
            .replace("/usr/sbin/imip-milter", &program.display().to_string())
            .replace("/etc/imip-milter/imip-milter.toml", &config.display().to_string());
        let maps = [
            ("imip-milter-recipients", read("imip-milter-recipients")),
            ("imip-milter-transport", read("imip-milter-transport")),
            ("imip-milter-access", read("imip-milter-access")),
        ];
        // No mailbox for the gateway address: the shipped map must make it valid.
        Self::build(&main_cf, &master_cf, &["alice", "grace"], &maps)
    }

    fn build(main_extra: &str, master_extra: &str, mailboxes: &[&str], files: &[(&str, String)]) -> Self {
        assert!(
            Path::new("/usr/sbin/postfix").exists(),
            "Postfix is not installed: .ci/run installs it (apt-get install postfix)"
        );
        let dir = tempfile::Builder::new()
            .prefix("imip-postfix-")
            .tempdir()
            .expect("tempdir");
        let root = dir.path();
        fs::set_permissions(root, fs::Permissions::from_mode(0o755)).unwrap();
        for sub in ["etc", "queue", "data", "mail"] {
            fs::create_dir(root.join(sub)).unwrap();
        }
        let (uid, gid) = (id("-u", "nobody"), id("-g", "nobody"));
        run(Command::new("chown").arg("postfix").arg(root.join("data")));
        run(Command::new("chown").arg(format!("{uid}:{gid}")).arg(root.join("mail")));
        let port = free_port();
        let etc = root.join("etc");
        let r = root.display();
        // "bob@example.com" is delivered to the mailbox "bob-example.com":
        // example.com plays the external attendees' domain.
        let vmailbox: String = mailboxes
            .iter()
            .map(|m| match m.split_once('@') {
                Some((l, d)) => format!("{m} {l}-{d}/\n"),
                None => format!("{m}@example.org {m}/\n"),
            })
            .collect();
        fs::write(etc.join("vmailbox"), vmailbox).unwrap();
        for (name, text) in files {
            fs::write(etc.join(name), text).unwrap();
        }
        let main_extra = main_extra.replace("@ETC@", &etc.display().to_string());
        fs::write(
            etc.join("main.cf"),
            format!(
                "compatibility_level = 3.6
queue_directory = {r}/queue
data_directory = {r}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.example.org
mydomain = example.org
myorigin = example.org
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
maillog_file = {r}/maillog
maillog_file_prefixes = {r}
virtual_mailbox_domains = example.org, example.com
virtual_mailbox_base = {r}/mail
virtual_mailbox_maps = texthash:{r}/etc/vmailbox
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
alias_maps =
alias_database =
smtputf8_enable = no
biff = no
{main_extra}
"
            ),
        )
        .unwrap();
        fs::write(
            etc.join("master.cf"),
            format!(
                "127.0.0.1:{port} inet n - n - 50 smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
{master_extra}
"
            ),
        )
        .unwrap();
        run(Command::new("postfix").arg("-c").arg(&etc).arg("check"));
        run(Command::new("postfix").arg("-c").arg(&etc).arg("start"));
        let pf = Self { dir, port };
        assert!(
            wait_until(Duration::from_secs(20), || std::net::TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "Postfix did not start: {}",
            pf.log()
        );
        pf
    }

    pub fn etc(&self) -> PathBuf {
        self.dir.path().join("etc")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    /// Messages delivered to `mailbox`, oldest first.
    pub fn mailbox(&self, mailbox: &str) -> Vec<String> {
        let new = self.dir.path().join("mail").join(mailbox).join("new");
        let mut files: Vec<_> = fs::read_dir(new)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        files
            .iter()
            .map(|p| fs::read_to_string(p).unwrap_or_default())
            .collect()
    }

    pub fn wait_mailbox(&self, mailbox: &str, n: usize) -> Vec<String> {
        wait_until(Duration::from_secs(20), || self.mailbox(mailbox).len() >= n);
        self.mailbox(mailbox)
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new("postfix").arg("-c").arg(self.etc()).arg("stop").output();
        // Give master a moment to take its children down before the dirs go.
        let pid = self.dir.path().join("queue/pid/master.pid");
        wait_until(Duration::from_secs(10), || !pid.exists());
    }
}
