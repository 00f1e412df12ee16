//! A private PostgreSQL cluster for tests: initdb into a temporary
//! directory as the `postgres` user, 127.0.0.1 on a free port, trust
//! authentication, a database `imip` owned by the user `imip`. Also a
//! primary and its streaming replica (`pg_basebackup -R`), for a switchover.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

pub struct Postgres {
    pub port: u16,
    bin: PathBuf,
    data: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

/// The newest server under /usr/lib/postgresql (Debian's layout).
fn bin_dir() -> PathBuf {
    let mut versions: Vec<u32> = fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed: .ci/run installs it (apt-get install postgresql)")
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect();
    versions.sort_unstable();
    let v = versions
        .last()
        .expect("no PostgreSQL version under /usr/lib/postgresql");
    PathBuf::from(format!("/usr/lib/postgresql/{v}/bin"))
}

fn as_postgres(bin: &Path, program: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(bin.join(program));
    c
}

impl Postgres {
    pub fn start() -> Self {
        let mut pg = Self::init("imip");
        pg.run();
        pg.create_database();
        pg
    }

    /// A cluster whose superuser is `postgres`, with no database of ours:
    /// for software that sets up its own (DAViCal's create-database.sh).
    pub fn start_bare() -> Self {
        let mut pg = Self::init("postgres");
        pg.run();
        pg
    }

    /// With TLS (a certificate for 127.0.0.1 from a CA of its own) and plain
    /// TCP refused; the CA certificate's file.
    pub fn start_tls() -> (Self, PathBuf) {
        let mut pg = Self::init("imip");
        let dir = pg.data.parent().expect("parent").to_path_buf();
        let ca = super::tls::TestCa::new(&dir);
        for f in ["server.crt", "server.key"] {
            fs::copy(ca.dir.join(f), pg.data.join(f)).unwrap();
            let ok = Command::new("chown")
                .arg("postgres:postgres")
                .arg(pg.data.join(f))
                .status()
                .unwrap();
            assert!(ok.success());
        }
        fs::set_permissions(pg.data.join("server.key"), fs::Permissions::from_mode(0o600)).unwrap();
        let mut conf = fs::read_to_string(pg.data.join("postgresql.conf")).unwrap();
        conf.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        fs::write(pg.data.join("postgresql.conf"), conf).unwrap();
        let hba = fs::read_to_string(pg.data.join("pg_hba.conf")).unwrap();
        fs::write(
            pg.data.join("pg_hba.conf"),
            format!("hostnossl all all all reject\n{hba}"),
        )
        .unwrap();
        pg.run();
        pg.create_database();
        (pg, ca.ca)
    }

    /// As `start`, ready to be a streaming primary: WAL for a replica and
    /// replication connections from 127.0.0.1 without a password.
    pub fn start_primary() -> Self {
        let mut pg = Self::init("imip");
        let mut conf = fs::read_to_string(pg.data.join("postgresql.conf")).expect("postgresql.conf");
        conf.push_str("\nwal_level = replica\nmax_wal_senders = 4\n");
        fs::write(pg.data.join("postgresql.conf"), conf).expect("postgresql.conf");
        let hba = fs::read_to_string(pg.data.join("pg_hba.conf")).expect("pg_hba.conf");
        fs::write(
            pg.data.join("pg_hba.conf"),
            format!("host replication all 127.0.0.1/32 trust\n{hba}"),
        )
        .expect("pg_hba.conf");
        pg.run();
        pg.create_database();
        pg
    }

    /// A hot standby of `primary` on a port of its own, streaming from it:
    /// `pg_basebackup -R` into a temporary directory, then started.
    pub fn replica_of(primary: &Postgres) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let data = dir.path().join("data");
        fs::create_dir(&data).expect("data");
        fs::set_permissions(&data, fs::Permissions::from_mode(0o700)).expect("chmod");
        let chown = Command::new("chown")
            .arg("postgres:postgres")
            .arg(&data)
            .status()
            .expect("chown");
        assert!(chown.success());
        let bin = bin_dir();
        let out = as_postgres(&bin, "pg_basebackup")
            .args(["-h", "127.0.0.1", "-p", &primary.port.to_string(), "-U", "imip"])
            .args(["-X", "stream", "-R", "--checkpoint=fast", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .expect("pg_basebackup");
        assert!(
            out.status.success(),
            "pg_basebackup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = Self {
            port: super::free_port(),
            bin,
            data,
            child: None,
            _dir: dir,
        };
        pg.run();
        pg
    }

    /// Promotes a standby to primary and waits until it takes writes.
    pub fn promote(&self) {
        let out = as_postgres(&self.bin, "pg_ctl")
            .args(["promote", "-w", "-t", "30", "-D"])
            .arg(&self.data)
            .output()
            .expect("pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl promote: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Whether the server is a standby (in recovery).
    pub fn in_recovery(&self) -> bool {
        self.psql("SELECT pg_is_in_recovery()") == "t"
    }

    /// A cluster in a temporary directory, not started.
    fn init(superuser: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let data = dir.path().join("data");
        fs::create_dir(&data).unwrap();
        let chown = Command::new("chown")
            .arg("postgres:postgres")
            .arg(&data)
            .status()
            .unwrap();
        assert!(chown.success());
        let bin = bin_dir();
        let out = as_postgres(&bin, "initdb")
            .args(["-A", "trust", "-U", superuser, "--no-sync", "-E", "UTF8", "-D"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        Self {
            port: super::free_port(),
            bin,
            data,
            child: None,
            _dir: dir,
        }
    }

    fn create_database(&self) {
        let out = as_postgres(&self.bin, "createdb")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "imip", "imip"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "createdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the server (again) and waits until it answers.
    pub fn run(&mut self) {
        // Started as postgres directly (not through runuser): signals reach it.
        use std::os::unix::process::CommandExt;
        let id = |arg: &str| {
            let out = Command::new("id").args([arg, "postgres"]).output().expect("id");
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<u32>()
                .expect("postgres user")
        };
        let child = Command::new(self.bin.join("postgres"))
            .uid(id("-u"))
            .gid(id("-g"))
            .arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string(), "-k", ""])
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("postgres");
        self.child = Some(child);
        let ready = super::wait_until(Duration::from_secs(30), || {
            as_postgres(&self.bin, "pg_isready")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        assert!(ready, "PostgreSQL did not start on port {}", self.port);
    }

    /// Stops the server (fast shutdown), as an outage.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // runuser passes SIGINT on to postgres: fast shutdown.
            let _ = Command::new("kill").args(["-INT", &c.id().to_string()]).status();
            let _ = c.wait();
        }
        super::wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err()
        });
    }

    /// Runs SQL as the user imip in the database imip; the rows, `|`-separated.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_as("imip", "imip", sql)
    }

    /// Runs SQL as `user` in `database`.
    pub fn psql_as(&self, user: &str, database: &str, sql: &str) -> String {
        let port = self.port.to_string();
        let out = as_postgres(&self.bin, "psql")
            .args(["-h", "127.0.0.1", "-p", &port, "-U", user, "-d", database])
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("psql");
        assert!(out.status.success(), "psql: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// CalendarServer's IMIP_TOKENS table, as its schema creates it.
    pub fn calendarserver_schema(&self) {
        let ddl = String::from_utf8(super::fixture("sql/calendarserver-imip-tokens.sql")).expect("utf-8");
        self.psql(&ddl);
    }

    pub fn url(&self) -> String {
        format!("postgresql://imip@127.0.0.1:{}/imip", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
