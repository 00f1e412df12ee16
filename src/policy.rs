//! Who may answer for a token: `[policy] sender`.

use crate::{analysis::Analysis, config::SenderPolicy, tokens::TokenRecord};

/// Ok when `policy` lets this reply through; Err says why not.
/// `answering`: the attendee the reply answers for (local tokens).
pub fn check(
    policy: &SenderPolicy,
    analysis: &Analysis,
    token: Option<&TokenRecord>,
    answering: Option<&str>,
) -> Result<(), String> {
    let from = analysis.from.as_deref().unwrap_or("").to_ascii_lowercase();
    let shown: String = from.chars().filter(|c| !c.is_control()).take(80).collect();
    match policy {
        SenderPolicy::Token => Ok(()),
        SenderPolicy::Attendee => {
            let bare = |a: &str| crate::decision::bare_address(a).unwrap_or(a).to_ascii_lowercase();
            // Any attendee of a shared token, but only for their own answer.
            let invited = token.is_some_and(|t| t.allowed().iter().any(|a| bare(a) == from));
            let own = answering.is_none_or(|a| bare(a) == from);
            if !from.is_empty() && invited && own {
                Ok(())
            } else {
                Err(format!("header From <{shown}> is not the invited attendee"))
            }
        }
        SenderPolicy::Dmarc { authserv_id } => {
            let domain = from.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
            if domain.is_empty() {
                return Err("no header From to check DMARC for".into());
            }
            let pass = analysis
                .all_authentication_results
                .iter()
                .any(|ar| dmarc_pass(ar, authserv_id, domain));
            if pass {
                Ok(())
            } else {
                Err(format!("no DMARC pass for {domain} from {authserv_id}"))
            }
        }
    }
}

/// Whether one Authentication-Results header (RFC 8601), added by
/// `authserv_id`, says dmarc=pass for `domain`.
fn dmarc_pass(header: &str, authserv_id: &str, domain: &str) -> bool {
    let mut parts = header.split(';');
    let id = parts.next().unwrap_or("").split_whitespace().next().unwrap_or("");
    if !id.eq_ignore_ascii_case(authserv_id) {
        return false;
    }
    parts.any(|result| {
        let words: Vec<String> = result.split_whitespace().map(|w| w.to_ascii_lowercase()).collect();
        words.first().is_some_and(|w| w == "dmarc=pass")
            && words.iter().any(|w| w.strip_prefix("header.from=") == Some(domain))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::analyse;

    fn reply(from: &str, ar: &[&str]) -> Analysis {
        let headers: String = ar.iter().map(|a| format!("Authentication-Results: {a}\r\n")).collect();
        let raw = format!(
            "{headers}From: {from}\r\nContent-Type: text/calendar; method=REPLY\r\n\r\nBEGIN:VCALENDAR\r\nMETHOD:REPLY\r\nBEGIN:VEVENT\r\nUID:u\r\nATTENDEE;PARTSTAT=ACCEPTED:mailto:bob@example.com\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
        );
        analyse(raw.as_bytes())
    }

    fn token() -> TokenRecord {
        TokenRecord {
            token: "t".repeat(10),
            organizer: "mailto:alice@example.org".into(),
            attendee: "mailto:Bob@Example.com".into(),
            uid: "u".into(),
            created_ms: 0,
            last_used_ms: 0,
            attendees: Vec::new(),
            invitations: Vec::new(),
        }
    }

    #[test]
    fn attendee_policy() {
        let p = SenderPolicy::Attendee;
        assert!(check(
            &p,
            &reply("bob@example.com", &[]),
            Some(&token()),
            Some("mailto:bob@example.com")
        )
        .is_ok());
        assert!(check(&p, &reply("mallory@example.net", &[]), Some(&token()), None).is_err());
    }

    #[test]
    fn attendee_policy_on_a_shared_token() {
        let p = SenderPolicy::Attendee;
        let mut shared = token();
        shared.attendee.clear();
        shared.attendees = vec!["mailto:bob@example.com".into(), "mailto:Carol@example.com".into()];
        let bob = Some("mailto:bob@example.com");
        let carol = Some("mailto:carol@example.com");
        assert!(check(&p, &reply("bob@example.com", &[]), Some(&shared), bob).is_ok());
        assert!(check(&p, &reply("carol@example.com", &[]), Some(&shared), carol).is_ok());
        // Carol may not answer for Bob, nor a stranger for anybody.
        assert!(check(&p, &reply("carol@example.com", &[]), Some(&shared), bob).is_err());
        assert!(check(&p, &reply("dana@example.com", &[]), Some(&shared), None).is_err());
    }

    #[test]
    fn dmarc_policy_trusts_only_its_authserv_id() {
        let p = SenderPolicy::Dmarc {
            authserv_id: "mx.example.org".into(),
        };
        let good = "mx.example.org; dkim=pass header.d=example.com; dmarc=pass (p=reject) header.from=example.com";
        assert!(check(&p, &reply("bob@example.com", &[good]), None, None).is_ok());
        let forged = good.replace("mx.example.org", "evil.example");
        assert!(check(&p, &reply("bob@example.com", &[&forged]), None, None).is_err());
        let fail = good.replace("dmarc=pass", "dmarc=fail");
        assert!(check(&p, &reply("bob@example.com", &[&fail]), None, None).is_err());
        let other_domain = good.replace("header.from=example.com", "header.from=example.net");
        assert!(check(&p, &reply("bob@example.com", &[&other_domain]), None, None).is_err());
        // Several headers: one trusted pass suffices.
        assert!(check(&p, &reply("bob@example.com", &[&forged, good]), None, None).is_ok());
    }
}
