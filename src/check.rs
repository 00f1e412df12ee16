//! `imip-milter check`: is this host set up to work? One line per finding,
//! OK / WARN / FAIL; the caller exits 1 on any FAIL.

pub use crate::findings::{Finding, Level};
use crate::{
    config::{Config, ListenSocket, SenderPolicy},
    control::{self, Request},
    targets::Target,
};
use std::{
    io::{BufRead, BufReader, Write},
    net::TcpStream,
    path::Path,
    process::Command,
    time::Duration,
};

/// Runs every check. `postfix_config`: Postfix's configuration directory
/// (postconf -c), None for the default one. `organizer`: prove the target
/// works for this organizer (caldav: home, calendars, a search), writing
/// nothing.
pub async fn run(
    config: &Config,
    config_path: &Path,
    postfix_config: Option<&Path>,
    organizer: Option<&str>,
) -> Vec<Finding> {
    let mut out = vec![Finding::ok("config", format!("{} is valid", config_path.display()))];
    out.extend(state_dir(config));
    out.extend(milter_socket(config));
    out.extend(secret_files(config));
    out.extend(service_user_access(config));
    out.extend(token_database(config).await);
    out.push(target(config).await);
    if let Some(o) = organizer {
        out.extend(for_organizer(config, o).await);
    }
    out.extend(postfix(config, postfix_config));
    out
}

async fn for_organizer(config: &Config, organizer: &str) -> Vec<Finding> {
    match Target::new(&config.target) {
        Ok(Target::CalDav(c)) => c.check_organizer(&crate::itip::normalise_mailto(organizer)).await,
        Ok(_) => vec![Finding::warn(
            "organizer",
            "--organizer is for target kind caldav; the other targets find the organizer themselves",
        )],
        Err(e) => vec![Finding::fail("target", e)],
    }
}

/// With outbound tokenization whoever reaches the milter socket can claim
/// any SASL login or client address in the macros, and so mint tokens.
fn milter_socket(config: &Config) -> Option<Finding> {
    config.outbound.as_ref()?;
    Some(match &config.listen {
        ListenSocket::Inet(addr) => Finding::fail(
            "listen",
            format!(
                "listen = inet:{addr} with outbound tokenization: any local user can connect and claim a SASL login; \
                 listen on unix:/var/spool/postfix/imip-milter/milter.sock (group postfix) instead"
            ),
        ),
        ListenSocket::Unix(path) => {
            use std::os::unix::fs::PermissionsExt;
            match std::fs::metadata(path) {
                Ok(m) if m.permissions().mode() & 0o006 != 0 => Finding::fail(
                    "listen",
                    format!("{} is open to every local user: chmod o-rw it", path.display()),
                ),
                Ok(_) => Finding::ok("listen", format!("{} is closed to other users", path.display())),
                Err(_) => Finding::warn(
                    "listen",
                    format!("{} does not exist (daemon not running?)", path.display()),
                ),
            }
        }
    })
}

/// The shared token database: reachable, credentials, schema, a lookup.
async fn token_database(config: &Config) -> Option<Finding> {
    let crate::config::TokenStoreConfig::Postgres { url, layout, .. } = &config.tokens.store else {
        return None;
    };
    let store = match crate::tokens::open_shared(&config.tokens.store) {
        Ok(s) => s,
        Err(e) => return Some(Finding::fail("tokens", crate::errors::chain(&e))),
    };
    let schema = match layout {
        crate::config::Layout::Own => "schema version 1",
        crate::config::Layout::CalendarServer => "CalendarServer's IMIP_TOKENS",
    };
    Some(match store.get("imip-milter-check-probe").await {
        Ok(_) => Finding::ok("tokens", format!("{url} answers a lookup ({schema})")),
        Err(e) => Finding::fail(
            "tokens",
            format!(
                "{}: check tokens.url and tokens.password_file",
                crate::errors::chain(&e)
            ),
        ),
    })
}

/// Secrets readable by others are secrets no more.
fn secret_files(config: &Config) -> Vec<Finding> {
    use std::os::unix::fs::PermissionsExt;
    let t = &config.target;
    [
        ("target.token_file", &t.token_file),
        ("target.password_file", &t.password_file),
        ("target.secret_file", &t.secret_file),
    ]
    .into_iter()
    .filter_map(|(key, path)| Some((key, path.as_ref()?)))
    .map(|(key, path)| match std::fs::metadata(path) {
        Ok(m) if m.permissions().mode() & 0o077 != 0 => Finding::warn(
            "secrets",
            format!(
                "{key} {} is readable by group or others (mode {:o}): chmod 600 it, owned by the daemon's user",
                path.display(),
                m.permissions().mode() & 0o777
            ),
        ),
        Ok(_) => Finding::ok("secrets", format!("{key} {} is private", path.display())),
        Err(e) => Finding::fail("secrets", format!("{key} {}: {e}", path.display())),
    })
    .collect()
}

/// Run as root, `check` could open what the service cannot: the files the
/// daemon opens are judged for the service user (`user`, or state_dir's
/// owner), with the primary group it runs with.
fn service_user_access(config: &Config) -> Vec<Finding> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Vec::new();
    }
    let Ok(id) = crate::privileges::target(config) else {
        return Vec::new();
    };
    if id.uid == 0 {
        return Vec::new();
    }
    let t = &config.target;
    let mut files: Vec<(&str, &Path, u32)> = [
        ("target.token_file", &t.token_file),
        ("target.password_file", &t.password_file),
        ("target.secret_file", &t.secret_file),
        ("target.ca_file", &t.ca_file),
    ]
    .into_iter()
    .filter_map(|(key, path)| Some((key, path.as_deref()?, 0o4)))
    .collect();
    if let crate::config::TokenStoreConfig::Postgres {
        password_file: Some(p), ..
    } = &config.tokens.store
    {
        files.push(("tokens.password_file", p.as_path(), 0o4));
    }
    let spool = config.spool_path();
    if spool.exists() {
        files.push(("spool", spool.as_path(), 0o6));
    }
    files
        .into_iter()
        .filter_map(|(key, path, want)| {
            let why = denied(path, id, want)?;
            Some(Finding::fail(
                "access",
                format!(
                    "{key} {}: the service user (uid {} gid {}) cannot {}: {why}",
                    path.display(),
                    id.uid,
                    id.gid,
                    if want == 0o6 { "read and write it" } else { "read it" }
                ),
            ))
        })
        .collect()
}

/// Why `id` may not open `path` with these permission bits (4 read, 2
/// write), judged by owner, group and mode along the whole path; None when
/// it may.
fn denied(path: &Path, id: crate::privileges::Identity, want: u32) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let bits = |m: &std::fs::Metadata| {
        let mode = m.mode();
        if m.uid() == id.uid {
            (mode >> 6) & 7
        } else if m.gid() == id.gid {
            (mode >> 3) & 7
        } else {
            mode & 7
        }
    };
    for dir in path.ancestors().skip(1).filter(|d| !d.as_os_str().is_empty()) {
        let m = std::fs::metadata(dir).ok()?;
        if bits(&m) & 1 == 0 {
            return Some(format!(
                "directory {} is closed to it (owner uid {}, mode {:o})",
                dir.display(),
                m.uid(),
                m.mode() & 0o7777
            ));
        }
    }
    let m = std::fs::metadata(path).ok()?;
    (bits(&m) & want != want).then(|| {
        format!(
            "owner uid {} gid {}, mode {:o}: chown it to the service user",
            m.uid(),
            m.gid(),
            m.mode() & 0o7777
        )
    })
}

fn state_dir(config: &Config) -> Vec<Finding> {
    let dir = &config.state_dir;
    let mut out = Vec::new();
    if !dir.is_dir() {
        out.push(Finding::warn(
            "state_dir",
            format!("{} does not exist yet; run creates it", dir.display()),
        ));
        return out;
    }
    let probe = dir.join(format!(".check-{}", std::process::id()));
    match std::fs::write(&probe, b"") {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            out.push(Finding::ok("state_dir", format!("{} is writable", dir.display())));
        }
        Err(e) => out.push(Finding::fail(
            "state_dir",
            format!("{} is not writable by this user: {e}", dir.display()),
        )),
    }
    match control::request(&config.control_path(), &Request::List { all: false }) {
        Ok(resp) => {
            let records = resp.records.unwrap_or_default();
            let failed = records
                .iter()
                .filter(|r| r.state == crate::spool::State::Failed)
                .count();
            let line = format!(
                "answers on {}; {} pending, {failed} failed",
                config.control_path().display(),
                records.len() - failed
            );
            out.push(if failed > 0 {
                Finding::warn("daemon", format!("{line} (see imip-milter queue list)"))
            } else {
                Finding::ok("daemon", line)
            });
        }
        Err(control::ClientError::NoDaemon) => {
            out.push(Finding::warn("daemon", "no daemon answers on the control socket"))
        }
        Err(control::ClientError::Other(e)) => out.push(Finding::fail("daemon", e)),
    }
    out
}

async fn target(config: &Config) -> Finding {
    match Target::new(&config.target) {
        Ok(t) => t.check().await,
        Err(e) => Finding::fail("target", e),
    }
}

/// `postmap -q KEY TABLE`: the table's answer, None for none.
fn postmap_query(dir: Option<&Path>, key: &str, table: &str) -> Option<String> {
    let mut cmd = Command::new("postmap");
    if let Some(d) = dir {
        cmd.arg("-c").arg(d);
    }
    let out = cmd.args(["-q", key, table]).output().ok()?;
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (!answer.is_empty()).then_some(answer)
}

/// The entries of a list-valued Postfix parameter.
fn list_items(value: &str) -> Vec<&str> {
    value.split([',', ' ', '\t', '\n']).filter(|s| !s.is_empty()).collect()
}

/// The gateway base addresses, `local@domain`.
fn gateway_addresses(config: &Config) -> Vec<String> {
    config
        .gateway
        .bases()
        .iter()
        .map(|b| format!("{}@{}", b.local, b.domain))
        .collect()
}

fn postconf(dir: Option<&Path>, args: &[&str]) -> Option<String> {
    let mut cmd = Command::new("postconf");
    if let Some(d) = dir {
        cmd.arg("-c").arg(d);
    }
    let out = cmd.args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The milter address as Postfix writes it, for matching smtpd_milters.
fn milter_names(listen: &ListenSocket) -> Vec<String> {
    match listen {
        ListenSocket::Inet(addr) => {
            let mut v = vec![format!("inet:{addr}"), format!("inet:{}@{}", addr.port(), addr.ip())];
            if addr.ip().is_loopback() {
                v.push(format!("inet:localhost:{}", addr.port()));
            }
            v
        }
        ListenSocket::Unix(path) => {
            let mut v = vec![format!("unix:{}", path.display())];
            // smtpd runs chrooted in /var/spool/postfix on Debian.
            if let Ok(rel) = path.strip_prefix("/var/spool/postfix") {
                v.push(format!("unix:{}", rel.display()));
                v.push(format!("unix:/{}", rel.display()));
            }
            v
        }
    }
}

/// The `{ address, key=value, ... }` group of smtpd_milters naming `names`.
fn milter_entry(smtpd_milters: &str, names: &[String]) -> Option<String> {
    let mut rest = smtpd_milters;
    let mut entries = Vec::new();
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        entries.push(rest[open + 1..open + close].to_owned());
        rest = &rest[open + close + 1..];
    }
    for word in smtpd_milters.split(|c: char| c == ',' || c.is_whitespace()) {
        if !word.is_empty() && !word.contains(['{', '}', '=']) {
            entries.push(word.to_owned());
        }
    }
    entries.into_iter().find(|e| {
        let first = e.split(',').next().unwrap_or("").trim();
        names.iter().any(|n| n == first)
    })
}

/// `[policy] sender = "dmarc"` is sound only when Postfix removes the
/// Authentication-Results a sender wrote in this site's name.
fn header_checks(authserv_id: &str, dir: Option<&Path>) -> Finding {
    let tables = postconf(dir, &["-h", "header_checks"]).unwrap_or_default();
    let forged = format!("Authentication-Results: {authserv_id}; dmarc=pass header.from=example.com");
    let removes = list_items(&tables)
        .into_iter()
        .any(|table| postmap_query(dir, &forged, table).is_some_and(|a| a.starts_with("IGNORE")));
    match removes {
        true => Finding::ok(
            "postfix",
            format!("header_checks removes Authentication-Results claiming {authserv_id}"),
        ),
        false => Finding::fail(
            "postfix",
            format!(
                "policy.sender = dmarc, but header_checks keeps Authentication-Results that a sender writes as \
                 {authserv_id}: add regexp:/etc/postfix/imip-milter-header-checks (from \
                 /usr/share/doc/imip-milter/postfix/, with your authserv-id)"
            ),
        ),
    }
}

fn setting(entry: &str, key: &str) -> Option<String> {
    entry.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == key).then(|| v.trim().to_owned())
    })
}

/// The three milter timeouts of the README's snippet, from the smtpd_milters entry or else
/// main.cf's milter_*_timeout. Each bounds how long an SMTP client waits on a hung milter.
fn milter_timeouts(entry: &str, dir: Option<&Path>) -> Vec<Finding> {
    // (name, the largest value that keeps a client's wait short, what it bounds)
    const TIMEOUTS: [(&str, u64, &str); 3] = [
        ("connect_timeout", 30, "each new SMTP session"),
        ("command_timeout", 60, "every SMTP command"),
        ("content_timeout", 300, "the end of every message"),
    ];
    TIMEOUTS
        .iter()
        .filter_map(|(name, max, bounds)| {
            let value = setting(entry, name)
                .or_else(|| postconf(dir, &["-h", &format!("milter_{name}")]))?;
            let Some(t) = crate::config::parse_duration(&value) else {
                return Some(Finding::warn("postfix", format!("{name}={value} is not a duration")));
            };
            Some(if t.as_secs() > *max {
                Finding::warn(
                    "postfix",
                    format!(
                        "{name}={}s: a hung milter holds {bounds} that long; set {name}= at most {max}s in the smtpd_milters entry",
                        t.as_secs()
                    ),
                )
            } else {
                Finding::ok("postfix", format!("{name}={}s", t.as_secs()))
            })
        })
        .collect()
}

fn postfix(config: &Config, dir: Option<&Path>) -> Vec<Finding> {
    let mut out = Vec::new();
    let Some(milters) = postconf(dir, &["-h", "smtpd_milters"]) else {
        out.push(Finding::warn(
            "postfix",
            "postconf not found or failed; Postfix not checked",
        ));
        return out;
    };
    if let SenderPolicy::Dmarc { authserv_id } = &config.policy {
        out.push(header_checks(authserv_id, dir));
    }
    let names = milter_names(&config.listen);
    match milter_entry(&milters, &names) {
        None => out.push(Finding::fail(
            "postfix",
            format!("smtpd_milters does not list {} (it is \"{milters}\")", names[0]),
        )),
        Some(entry) => {
            out.push(Finding::ok("postfix", format!("smtpd_milters lists {}", names[0])));
            let action = setting(&entry, "default_action")
                .or_else(|| postconf(dir, &["-h", "milter_default_action"]))
                .unwrap_or_default();
            out.push(match action.as_str() {
                "accept" | "tempfail" => Finding::ok("postfix", format!("default_action={action}")),
                "" => Finding::warn("postfix", "default_action unknown"),
                other => Finding::warn(
                    "postfix",
                    format!("default_action={other}: during a milter outage mail is refused; use accept with the safety net, or tempfail"),
                ),
            });
            out.extend(milter_timeouts(&entry, dir));
        }
    }

    let delimiter = postconf(dir, &["-h", "recipient_delimiter"]).unwrap_or_default();
    let missing: String = config
        .gateway
        .delimiters()
        .iter()
        .filter(|c| !delimiter.contains(**c))
        .collect();
    if missing.is_empty() {
        out.push(Finding::ok("postfix", format!("recipient_delimiter = {delimiter}")));
    } else {
        out.push(Finding::fail(
            "postfix",
            format!(
                "recipient_delimiter = \"{delimiter}\" lacks \"{missing}\" of gateway.delimiters: Postfix refuses calendar{}TOKEN@ addresses",
                missing.chars().next().unwrap_or('+')
            ),
        ));
    }

    out.extend(greylisting(config, dir));
    out.extend(service_overrides(config, dir));
    out.extend(safety_net_route(config, dir));

    let services = postconf(dir, &["-M"]).unwrap_or_default();
    if services
        .lines()
        .any(|l| l.starts_with("imip-milter ") || l.starts_with("imip-milter\t"))
    {
        out.push(Finding::ok("postfix", "safety-net transport imip-milter in master.cf"));
    } else {
        out.push(Finding::warn(
            "postfix",
            "no imip-milter transport in master.cf: during a milter outage replies wait in the queue (see /usr/share/doc/imip-milter/postfix/master.cf)",
        ));
    }
    if let Some(addr) = smtpd_address(&services) {
        for base in config.gateway.bases() {
            out.push(probe_recipient(
                &addr,
                &format!(
                    "{}{}imipcheck0@{}",
                    base.local,
                    config.gateway.delimiters().first().copied().unwrap_or('+'),
                    base.domain
                ),
            ));
        }
    }
    out
}

/// master.cf can give one smtpd service its own smtpd_milters
/// (`-o smtpd_milters=`): main.cf then says nothing about that service.
fn service_overrides(config: &Config, dir: Option<&Path>) -> Vec<Finding> {
    let Some(params) = postconf(dir, &["-P"]) else {
        return Vec::new();
    };
    let names = milter_names(&config.listen);
    let master = dir
        .map(|d| d.join("master.cf"))
        .unwrap_or_else(|| Path::new("/etc/postfix/master.cf").to_path_buf());
    params
        .lines()
        .filter_map(|l| l.split_once('='))
        .filter_map(|(k, v)| {
            let k = k.trim();
            let service = k.strip_suffix("/smtpd_milters")?;
            let v = v.trim();
            Some(match milter_entry(v, &names) {
                Some(_) => Finding::ok("postfix", format!("master.cf service {service} lists the milter")),
                None => Finding::fail(
                    "postfix",
                    format!(
                        "master.cf service {service} sets smtpd_milters = \"{v}\": the milter never sees its mail; \
                         remove that -o line (or add {}) in {}",
                        names[0],
                        master.display()
                    ),
                ),
            })
        })
        .collect()
}

/// The safety net needs transport_maps to send the gateway addresses to the
/// imip-milter transport; without it, mail the milter did not take goes to
/// ordinary delivery.
fn safety_net_route(config: &Config, dir: Option<&Path>) -> Vec<Finding> {
    let Some(maps) = postconf(dir, &["-h", "transport_maps"]) else {
        return Vec::new();
    };
    let tables = list_items(&maps);
    gateway_addresses(config)
        .into_iter()
        .map(|address| {
            let route = tables.iter().find_map(|t| postmap_query(dir, &address, t));
            match route {
                Some(r) if r.starts_with("imip-milter:") => {
                    Finding::ok("postfix", format!("transport_maps sends {address} to {r}"))
                }
                Some(r) => Finding::warn(
                    "postfix",
                    format!("transport_maps sends {address} to {r}, not imip-milter: (the safety net)"),
                ),
                None => Finding::warn(
                    "postfix",
                    format!(
                        "transport_maps does not route {address} to imip-milter: (transport_maps = \"{maps}\"); \
                         during a milter outage replies go to ordinary delivery; see \
                         /usr/share/doc/imip-milter/postfix/imip-milter-transport"
                    ),
                ),
            }
        })
        .collect()
}

/// Greylisting (a policy service, postgrey) holds replies back for minutes:
/// a `check_recipient_access` table that answers OK for every gateway
/// address must come before it in smtpd_recipient_restrictions.
fn greylisting(config: &Config, dir: Option<&Path>) -> Option<Finding> {
    let list = postconf(dir, &["-h", "smtpd_recipient_restrictions"])?;
    let items = list_items(&list);
    let greylist = |i: &&str| i.contains("check_policy_service") || i.contains("postgrey") || i.contains("greylist");
    let at = items.iter().position(greylist)?;
    let policy = items[at..].iter().take(2).copied().collect::<Vec<_>>().join(" ");
    let addresses = gateway_addresses(config);
    let exempts = |table: &str| {
        addresses
            .iter()
            .all(|a| postmap_query(dir, a, table).is_some_and(|r| r.eq_ignore_ascii_case("OK")))
    };
    let exempt = items[..at]
        .windows(2)
        .find(|w| w[0] == "check_recipient_access" && exempts(w[1]))
        .map(|w| w[1].to_owned());
    Some(match exempt {
        Some(table) => Finding::ok(
            "postfix",
            format!("gateway addresses exempt from greylisting: {table} answers OK before {policy}"),
        ),
        None => Finding::warn(
            "postfix",
            format!(
                "smtpd_recipient_restrictions runs {policy} before any exemption for {}: replies wait for greylisting; \
                 put check_recipient_access texthash:/etc/postfix/imip-milter-access before it \
                 (/usr/share/doc/imip-milter/postfix/imip-milter-access, main.cf)",
                addresses.join(", ")
            ),
        ),
    })
}

/// Where smtpd listens, from `postconf -M`: `127.0.0.1:2525 inet ... smtpd` or `smtp inet ...`.
fn smtpd_address(services: &str) -> Option<String> {
    services.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() >= 8 && f[1] == "inet" && f[7] == "smtpd" {
            Some(match f[0] {
                "smtp" => "127.0.0.1:25".to_owned(),
                s if s.contains(':') => s.to_owned(),
                port => format!("127.0.0.1:{port}"),
            })
        } else {
            None
        }
    })
}

/// Asks Postfix over SMTP whether it takes the address as a recipient, then
/// resets: no message is sent.
fn probe_recipient(addr: &str, rcpt: &str) -> Finding {
    let talk = || -> std::io::Result<String> {
        let sock = addr
            .parse()
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "bad address"))?;
        let stream = TcpStream::connect_timeout(&sock, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut w = stream.try_clone()?;
        let mut r = BufReader::new(stream);
        let mut reply = |w: &mut TcpStream, cmd: Option<&str>| -> std::io::Result<String> {
            if let Some(c) = cmd {
                w.write_all(format!("{c}\r\n").as_bytes())?;
            }
            let mut last = String::new();
            loop {
                let mut line = String::new();
                if r.read_line(&mut line)? == 0 {
                    return Ok(last);
                }
                last = line.trim_end().to_owned();
                if last.len() < 4 || last.as_bytes()[3] != b'-' {
                    return Ok(last);
                }
            }
        };
        // Each step must pass; the one that does not is named with Postfix's answer.
        for (step, cmd) in [
            ("greeting", None),
            ("EHLO", Some("EHLO imip-milter.check")),
            ("MAIL FROM:<>", Some("MAIL FROM:<>")),
        ] {
            let a = reply(&mut w, cmd)?;
            if !a.starts_with('2') {
                let _ = reply(&mut w, Some("QUIT"));
                return Ok(format!("{step} answered: {a}"));
            }
        }
        let answer = reply(&mut w, Some(&format!("RCPT TO:<{rcpt}>")))?;
        let _ = reply(&mut w, Some("RSET"));
        let _ = reply(&mut w, Some("QUIT"));
        Ok(answer)
    };
    match talk() {
        Ok(a) if a.starts_with("250") => Finding::ok("postfix", format!("{addr} accepts RCPT <{rcpt}>")),
        // Local tokens: Postfix took the address and the milter refused the
        // made-up token, as it must.
        Ok(a) if a.starts_with("550") && a.contains("unknown or has expired") => Finding::ok(
            "postfix",
            format!("{addr} passes RCPT <{rcpt}> to the milter, which refuses the unknown token"),
        ),
        Ok(a) if a.contains(" answered: ") => Finding::fail(
            "postfix",
            format!("{addr} did not get to RCPT: {a} (another milter or a restriction refuses it)"),
        ),
        Ok(a) if a.contains("User unknown") => Finding::fail(
            "postfix",
            format!(
                "{addr} refuses RCPT <{rcpt}>: {a}: make the gateway address a valid recipient with \
                 virtual_alias_maps (/usr/share/doc/imip-milter/postfix/imip-milter-recipients)"
            ),
        ),
        Ok(a) => Finding::fail("postfix", format!("{addr} refuses RCPT <{rcpt}>: {a}")),
        Err(e) => Finding::warn("postfix", format!("cannot ask smtpd at {addr}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_milter_entry() {
        let names = milter_names(&ListenSocket::Inet("127.0.0.1:8895".parse().unwrap()));
        let m = "{ inet:127.0.0.1:8895, default_action=accept, command_timeout=10s }, inet:127.0.0.1:8891";
        let e = milter_entry(m, &names).unwrap();
        assert_eq!(setting(&e, "default_action").as_deref(), Some("accept"));
        assert_eq!(setting(&e, "command_timeout").as_deref(), Some("10s"));
        assert!(milter_entry("inet:127.0.0.1:8891", &names).is_none());
        assert!(milter_entry("inet:127.0.0.1:8895", &names).is_some());
        let unix = milter_names(&ListenSocket::Unix("/var/spool/postfix/imip-milter/milter.sock".into()));
        assert!(milter_entry("{ unix:imip-milter/milter.sock, default_action=tempfail }", &unix).is_some());
    }

    #[test]
    fn smtpd_from_master_cf() {
        assert_eq!(
            smtpd_address("smtp       inet  n       -       y       -       -       smtpd").as_deref(),
            Some("127.0.0.1:25")
        );
        assert_eq!(
            smtpd_address("127.0.0.1:2525 inet n - n - 50 smtpd\npickup unix n - n 60 1 pickup").as_deref(),
            Some("127.0.0.1:2525")
        );
    }
}
