//! What a SIGHUP may change: comparing the running configuration with the
//! one read again.

use super::Config;

/// The keys that differ between `running` and `new` but take effect only
/// with a restart; the caller keeps their running values.
pub fn restart_needed(running: &Config, new: &Config) -> Vec<&'static str> {
    let mut fixed = Vec::new();
    let mut differs = |changed: bool, key: &'static str| {
        if changed {
            fixed.push(key);
        }
    };
    differs(new.listen != running.listen, "listen");
    differs(new.state_dir != running.state_dir, "state_dir");
    differs(new.max_sessions != running.max_sessions, "max_sessions");
    differs(new.log_level != running.log_level, "log_level");
    differs(new.log_format != running.log_format, "log_format");
    differs(new.metrics_listen != running.metrics_listen, "metrics.listen");
    differs(new.target != running.target, "[target]");
    differs(new.delivery != running.delivery, "[delivery]");
    fixed
}

/// `running` with the settings a reload applied taken from `new`, so that
/// the next reload compares against what is in force.
pub fn applied(running: &mut Config, new: Config) {
    running.gateway = new.gateway;
    running.max_message_bytes = new.max_message_bytes;
    running.policy = new.policy;
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str =
        "[gateway]\naddresses = [\"calendar@example.org\"]\n[target]\nurl = \"http://127.0.0.1:9000/imip\"\n";

    #[test]
    fn a_changed_target_or_socket_needs_a_restart_and_a_gateway_does_not() {
        let running = Config::parse(BASE).unwrap();
        let same = Config::parse(BASE).unwrap();
        assert!(restart_needed(&running, &same).is_empty());
        let new = Config::parse(&format!("listen = \"inet:127.0.0.1:9999\"\n{BASE}timeout = \"5s\"\n")).unwrap();
        assert_eq!(restart_needed(&running, &new), ["listen", "[target]"]);
        let new = Config::parse(&BASE.replace("calendar@", "cal@")).unwrap();
        assert!(restart_needed(&running, &new).is_empty());
        let mut running = running;
        applied(&mut running, new);
        assert_eq!(running.gateway.bases()[0].to_string(), "cal@example.org");
    }
}
