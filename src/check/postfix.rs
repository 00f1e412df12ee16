//! `check`'s questions to Postfix (postconf, postmap, and an RCPT TO at
//! smtpd): the milter entry and its timeouts, header_checks, the recipient
//! delimiter, restrictions and greylisting before the gateway, per-service
//! overrides, the safety-net route, and whether smtpd accepts a gateway
//! recipient.

use super::Finding;
use crate::config::{Config, ListenSocket, SenderPolicy};
use std::{
    io::{BufRead, BufReader, Write},
    net::TcpStream,
    path::Path,
    process::Command,
    time::Duration,
};

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
    milter_entries(smtpd_milters).into_iter().find(|e| {
        let first = e.split(',').next().unwrap_or("").trim();
        names.iter().any(|n| n == first)
    })
}

/// The entries of an smtpd_milters list: `{ address, settings }` groups
/// (without the braces) and bare addresses.
fn milter_entries(smtpd_milters: &str) -> Vec<String> {
    let mut entries = Vec::new();
    let mut current = String::new();
    let mut depth = 0usize;
    for c in smtpd_milters.chars() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    entries.push(std::mem::take(&mut current).trim().to_owned());
                }
            }
            c if depth == 0 && (c == ',' || c.is_whitespace()) => {
                if !current.trim().is_empty() {
                    entries.push(std::mem::take(&mut current).trim().to_owned());
                }
                current.clear();
            }
            c => current.push(c),
        }
    }
    if !current.trim().is_empty() {
        entries.push(current.trim().to_owned());
    }
    entries
}

/// Entries of smtpd_milters that are imip-milter's: its socket, or what the
/// shipped files and imip-milter-postconf write (port 8895, a socket under
/// imip-milter/). Two of them is a stale entry left beside a new one.
fn duplicate_entries(smtpd_milters: &str, names: &[String]) -> Option<Finding> {
    let ours: Vec<String> = milter_entries(smtpd_milters)
        .into_iter()
        .map(|e| e.split(',').next().unwrap_or("").trim().to_owned())
        .filter(|a| names.contains(a) || a.contains("imip-milter") || a.ends_with(":8895"))
        .collect();
    (ours.len() > 1).then(|| {
        Finding::warn(
            "postfix",
            format!(
                "smtpd_milters lists imip-milter {} times ({}): every message passes each, and one that no \
                 longer answers applies its default_action; keep {} only (imip-milter-postconf replaces its own entry)",
                ours.len(),
                ours.join(", "),
                names[0]
            ),
        )
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

pub(super) fn checks(config: &Config, dir: Option<&Path>) -> Vec<Finding> {
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
    out.extend(duplicate_entries(&milters, &names));
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

    // master.cf's services and their -o overrides, asked once.
    let services = postconf(dir, &["-M"]).unwrap_or_default();
    let overrides = postconf(dir, &["-P"]);
    out.extend(greylisting(config, dir));
    out.extend(service_overrides(config, dir, overrides.as_deref()));
    out.extend(submission(
        config,
        dir,
        &milters,
        &services,
        overrides.as_deref().unwrap_or(""),
    ));
    out.extend(safety_net_route(config, dir));

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
                    "{}{}{}@{}",
                    base.local,
                    config.gateway.delimiters().first().copied().unwrap_or('+'),
                    crate::address::CHECK_TOKEN,
                    base.domain
                ),
            ));
        }
    }
    out
}

/// master.cf can give one smtpd service its own smtpd_milters
/// (`-o smtpd_milters=`): main.cf then says nothing about that service.
/// With `[outbound]` on, the path invitations are submitted by must defer
/// while the milter is down: with default_action=accept an invitation
/// leaves with the organizer's own address and its replies bypass the
/// gateway. Inbound keeps accept and the safety net.
fn submission(
    config: &Config,
    dir: Option<&Path>,
    main_milters: &str,
    services: &str,
    overrides: &str,
) -> Vec<Finding> {
    let Some(outbound) = &config.outbound else {
        return Vec::new();
    };
    let names = milter_names(&config.listen);
    let overridden = |service: &str, key: &str| {
        overrides.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == format!("{service}/{key}")).then(|| v.trim().to_owned())
        })
    };
    let main_action = postconf(dir, &["-h", "milter_default_action"]).unwrap_or_default();
    let mut out = Vec::new();
    for l in services.lines() {
        let fields: Vec<&str> = l.split_whitespace().collect();
        let (Some(name), Some(&"inet"), Some(command)) = (fields.first(), fields.get(1), fields.get(7)) else {
            continue;
        };
        let port = name.rsplit(':').next().unwrap_or(name);
        if *command != "smtpd" || !matches!(port, "submission" | "submissions" | "smtps" | "587" | "465") {
            continue;
        }
        let service = format!("{name}/inet");
        let milters = overridden(&service, "smtpd_milters").unwrap_or_else(|| main_milters.to_owned());
        // Without the milter at all: service_overrides says so.
        let Some(entry) = milter_entry(&milters, &names) else {
            continue;
        };
        let action = setting(&entry, "default_action")
            .or_else(|| overridden(&service, "milter_default_action"))
            .unwrap_or_else(|| main_action.clone());
        out.push(if action == "tempfail" {
            Finding::ok(
                "postfix",
                format!("submission service {name} defers while the milter is down: no invitation leaves untokenized"),
            )
        } else {
            Finding::warn(
                "postfix",
                format!(
                    "submission service {name} accepts mail while the milter is down (default_action={action}): \
                     invitations leave untokenized; give it -o smtpd_milters={{ {}, default_action=tempfail }} \
                     (/usr/share/doc/imip-milter/postfix/master.cf)",
                    names[0]
                ),
            )
        });
    }
    if out.is_empty() && !outbound.trusted_clients.is_empty() {
        let action = milter_entry(main_milters, &names)
            .and_then(|e| setting(&e, "default_action"))
            .unwrap_or(main_action);
        if action != "tempfail" {
            out.push(Finding::warn(
                "postfix",
                format!(
                    "outbound.trusted_clients submit through smtpd with default_action={action}: while the milter is \
                     down their invitations leave untokenized; let them submit on a submission service with \
                     default_action=tempfail (/usr/share/doc/imip-milter/postfix/master.cf)"
                ),
            ));
        }
    }
    out
}

fn service_overrides(config: &Config, dir: Option<&Path>, overrides: Option<&str>) -> Vec<Finding> {
    let Some(params) = overrides else {
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
        // Postfix took the address and handed it to the milter, which knows
        // its own probe.
        Ok(a) if a.starts_with("550") && a.contains("imip-milter's check address") => Finding::ok(
            "postfix",
            format!("{addr} hands RCPT <{rcpt}> to imip-milter, which answers its check probe"),
        ),
        Ok(a) if a.starts_with("250") => Finding::warn(
            "postfix",
            format!(
                "{addr} accepts RCPT <{rcpt}> without imip-milter answering it: \
                 is the milter in this smtpd's smtpd_milters, and running?"
            ),
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
    fn a_stale_entry_beside_the_new_one_is_named() {
        let unix = milter_names(&ListenSocket::Unix("/var/spool/postfix/imip-milter/milter.sock".into()));
        let two =
            "{ inet:127.0.0.1:8895, default_action=accept }, inet:127.0.0.1:8891, { unix:imip-milter/milter.sock }";
        let f = duplicate_entries(two, &unix).unwrap();
        assert!(
            f.to_string()
                .contains("2 times (inet:127.0.0.1:8895, unix:imip-milter/milter.sock)"),
            "{f}"
        );
        assert!(duplicate_entries("inet:127.0.0.1:8891, { unix:imip-milter/milter.sock }", &unix).is_none());
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
