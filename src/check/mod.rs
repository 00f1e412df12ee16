//! `imip-milter check`: is this host set up to work? One line per finding,
//! OK / WARN / FAIL; the caller exits 1 on any FAIL.

mod postfix;

pub use crate::findings::{Finding, Level};
use crate::{
    config::{Config, ListenSocket},
    control::{self, Request},
    targets::Target,
};
use std::path::Path;

/// What the milter does with its decisions: observe mode says so in every
/// check, so that nobody forgets it is on.
fn mode(config: &Config) -> Finding {
    match config.mode {
        crate::config::Mode::Enforce => Finding::ok("mode", "enforce: decisions are carried out"),
        crate::config::Mode::Observe => Finding::ok(
            "mode",
            "observe: every decision is journaled as what it would have been (would-discard, \
             would-reject …); no message is changed, refused or spooled. Set mode = \"enforce\" and \
             send SIGHUP to take over",
        ),
    }
}

/// Whether a reply that fails for good can reach its organizer.
fn notices(config: &Config) -> Finding {
    use std::os::unix::fs::PermissionsExt;
    let d = &config.delivery;
    if d.on_failure == crate::config::OnFailure::Keep {
        return Finding::ok(
            "notices",
            "delivery.on_failure = keep: a failed reply stays in the spool, nobody is mailed",
        );
    }
    match std::fs::metadata(&d.sendmail) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Finding::ok(
            "notices",
            format!(
                "a reply that fails for good is mailed to its organizer through {}",
                d.sendmail.display()
            ),
        ),
        _ => Finding::warn(
            "notices",
            format!(
                "delivery.sendmail {} is not an executable file: a reply that fails for good cannot be mailed to \
                 its organizer (install Postfix's sendmail, or set delivery.on_failure = \"keep\")",
                d.sendmail.display()
            ),
        ),
    }
}

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
    let mut out = vec![
        Finding::ok("config", format!("{} is valid", config_path.display())),
        mode(config),
    ];
    out.extend(state_dir(config));
    out.extend(milter_socket(config));
    out.extend(secret_files(config));
    out.extend(service_user_access(config));
    out.extend(token_database(config).await);
    out.push(target(config).await);
    out.push(notices(config));
    if let Some(o) = organizer {
        out.extend(for_organizer(config, o).await);
    }
    out.extend(postfix::checks(config, postfix_config));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_sendmail_is_named() {
        let text = |extra: &str| {
            format!(
                "[gateway]\naddresses = [\"calendar@example.org\"]\n[target]\nurl = \"http://127.0.0.1:9/\"\n{extra}"
            )
        };
        let missing = Config::parse(&text("[delivery]\nsendmail = \"/nonexistent/sendmail\"\n")).unwrap();
        let f = notices(&missing);
        assert!(
            f.to_string().starts_with("WARN") && f.to_string().contains("/nonexistent/sendmail"),
            "{f}"
        );
        let present = Config::parse(&text("[delivery]\nsendmail = \"/bin/sh\"\n")).unwrap();
        assert!(notices(&present).to_string().starts_with("OK"), "{}", notices(&present));
        let keep = Config::parse(&text(
            "[delivery]\non_failure = \"keep\"\nsendmail = \"/nonexistent/x\"\n",
        ))
        .unwrap();
        assert!(notices(&keep).to_string().starts_with("OK"));
    }
}
