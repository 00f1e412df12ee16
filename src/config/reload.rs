//! What a SIGHUP changes: the keys that differ between the running
//! configuration and the one read again, and which of them wait for a
//! restart.

use super::Config;

/// Keys a running daemon cannot change: its sockets, its files, who it
/// runs as, and what is sized or set up once at start. Everything else
/// applies at a reload (imip-milter.toml(5), RELOAD).
pub const RESTART_KEYS: &[&str] = &[
    "listen",
    "state_dir",
    "user",
    "max_sessions",
    "max_buffered_bytes",
    "log_level",
    "log_format",
    "metrics.listen",
];

/// The keys a reload changes, as written (`outbound.trusted_clients`), and
/// those that changed but wait for a restart.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub applied: Vec<String>,
    pub restart: Vec<String>,
}

/// Compares what the two files say, key by key; a key set to its default
/// counts as changed from one left out, as the admin wrote it so.
pub fn changes(running: &Config, new: &Config) -> Changes {
    let mut changed = Vec::new();
    differing("", &running.written, &new.written, &mut changed);
    changed.sort();
    let mut out = Changes::default();
    for key in changed {
        if needs_restart(&key) {
            out.restart.push(key);
        } else {
            out.applied.push(key);
        }
    }
    out
}

fn needs_restart(key: &str) -> bool {
    RESTART_KEYS
        .iter()
        .any(|k| key == *k || key.strip_prefix(k).is_some_and(|rest| rest.starts_with('.')))
}

/// The dotted names of keys whose values differ.
fn differing(prefix: &str, a: &toml::Table, b: &toml::Table, out: &mut Vec<String>) {
    let name = |k: &str| {
        if prefix.is_empty() {
            k.to_owned()
        } else {
            format!("{prefix}.{k}")
        }
    };
    for (k, va) in a {
        match (va, b.get(k)) {
            (toml::Value::Table(ta), Some(toml::Value::Table(tb))) => differing(&name(k), ta, tb, out),
            (toml::Value::Table(ta), None) => differing(&name(k), ta, &toml::Table::new(), out),
            (va, Some(vb)) if va == vb => {}
            _ => out.push(name(k)),
        }
    }
    for (k, vb) in b {
        match (vb, a.get(k)) {
            (toml::Value::Table(tb), None) => differing(&name(k), &toml::Table::new(), tb, out),
            (_, None) => out.push(name(k)),
            _ => {}
        }
    }
}

/// The configuration in force after a reload: `new`, with the running
/// values of the keys that wait for a restart (so the next reload names
/// them again until the daemon restarts).
pub fn in_force(running: &Config, mut new: Config) -> Config {
    new.listen = running.listen.clone();
    new.state_dir = running.state_dir.clone();
    new.user = running.user.clone();
    new.max_sessions = running.max_sessions;
    new.max_buffered_bytes = running.max_buffered_bytes;
    new.log_level = running.log_level;
    new.log_format = running.log_format;
    new.metrics_listen = running.metrics_listen;
    for key in RESTART_KEYS {
        let (section, leaf) = match key.split_once('.') {
            Some((s, l)) => (Some(s), l),
            None => (None, *key),
        };
        let old = match section {
            Some(s) => running
                .written
                .get(s)
                .and_then(|t| t.as_table())
                .and_then(|t| t.get(leaf)),
            None => running.written.get(leaf),
        };
        let table = match section {
            Some(s) => match new
                .written
                .entry(s)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            {
                toml::Value::Table(t) => t,
                _ => continue,
            },
            None => &mut new.written,
        };
        match old {
            Some(v) => {
                table.insert(leaf.to_owned(), v.clone());
            }
            None => {
                table.remove(leaf);
            }
        }
    }
    new
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str =
        "[gateway]\naddresses = [\"calendar@example.org\"]\n[target]\nurl = \"http://127.0.0.1:9000/imip\"\n";

    #[test]
    fn every_changed_key_is_named_and_only_the_sockets_and_files_wait_for_a_restart() {
        let running = Config::parse(BASE).unwrap();
        assert_eq!(changes(&running, &Config::parse(BASE).unwrap()), Changes::default());
        let new = Config::parse(&format!(
            "listen = \"inet:127.0.0.1:9999\"\n{BASE}timeout = \"5s\"\n[delivery]\nconcurrency = 9\n[metrics]\nlisten = \"127.0.0.1:9100\"\n"
        ))
        .unwrap();
        let c = changes(&running, &new);
        assert_eq!(c.applied, ["delivery.concurrency", "target.timeout"]);
        assert_eq!(c.restart, ["listen", "metrics.listen"]);

        // In force: the new timeout, the old socket; the next reload of the
        // same file names only what still waits for a restart.
        let now = in_force(&running, new.clone());
        assert_eq!(now.target.timeout, std::time::Duration::from_secs(5));
        assert_eq!(now.listen, running.listen);
        assert_eq!(now.metrics_listen, None);
        let again = changes(&now, &new);
        assert!(again.applied.is_empty(), "{again:?}");
        assert_eq!(again.restart, ["listen", "metrics.listen"]);

        let fewer = Config::parse(&BASE.replace("calendar@", "cal@")).unwrap();
        assert_eq!(changes(&running, &fewer).applied, ["gateway.addresses"]);
    }
}
