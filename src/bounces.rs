//! Delivery reports as the world writes them beside RFC 3464: where the
//! text of a report names the failed recipient, and where it quotes the
//! returned message. Pure text functions; `message` decides when a message
//! is a report at all (a mailer daemon's, from the null sender).

/// Lines of a report's text looked at: the recipient and the separator
/// come early in every format known.
const MAX_LINES: usize = 400;

/// Lines that introduce a copy of the returned message, lower case: qmail
/// and Yahoo, Exim, Sendmail, older Gmail and Hotmail, Zimbra.
const SEPARATORS: &[&str] = &[
    "--- below this line is a copy of the message.",
    "------ this is a copy of the message, including all the headers. ------",
    "------ this is a copy of the message's headers. ------",
    "----- original message follows -----",
    "----- original message -----",
    "----- message header follows -----",
    "--- original message ---",
    "-----original message-----",
];

/// Phrases after which the failed addresses are listed, lower case.
const LEADS: &[&str] = &[
    "following recipient",
    "following address",
    "was not delivered to",
    "could not be delivered to",
    "wasn't delivered to",
    "delivery to the following",
];

/// The failed recipient a report's text names: qmail's `<addr>:` line, or
/// the first address after a phrase that introduces the failed ones, or an
/// address in the sentence itself ("wasn't delivered to bob@example.com
/// because"). None when the text names none.
pub fn failed_recipient(text: &str) -> Option<String> {
    let lines: Vec<&str> = text.lines().take(MAX_LINES).collect();
    // qmail: "<bob@example.com>:" alone on a line.
    for line in &lines {
        let t = line.trim();
        if let Some(inner) = t.strip_prefix('<').and_then(|r| r.strip_suffix(">:")) {
            if let Some(a) = address_in(inner) {
                return Some(a);
            }
        }
    }
    for (i, line) in lines.iter().enumerate() {
        let lower = line.to_ascii_lowercase();
        let Some(at) = LEADS.iter().find_map(|l| lower.find(l).map(|p| p + l.len())) else {
            continue;
        };
        // The rest of the sentence first, then the lines that follow.
        let rest = line.get(at..).unwrap_or("");
        if let Some(a) = address_in(rest) {
            return Some(a);
        }
        for next in lines.iter().skip(i + 1).take(6) {
            if let Some(a) = address_in(next) {
                return Some(a);
            }
        }
    }
    None
}

/// The returned message a report quotes in its text: what follows the
/// first known separator line, from its first header line on.
pub fn quoted_message(text: &str) -> Option<&str> {
    let mut offset = 0;
    for (n, line) in text.split_inclusive('\n').enumerate() {
        if n >= MAX_LINES {
            return None;
        }
        offset += line.len();
        let lower = line.trim().to_ascii_lowercase();
        if SEPARATORS.contains(&lower.as_str()) {
            let rest = text.get(offset..)?;
            // Blank lines between the separator and the headers.
            let start = rest.len() - rest.trim_start_matches(['\r', '\n']).len();
            return rest.get(start..).filter(|r| !r.is_empty());
        }
    }
    None
}

/// The first word that is an address (`local@domain.tld`), without the
/// brackets, quotes or punctuation around it.
fn address_in(text: &str) -> Option<String> {
    text.split(|c: char| c.is_whitespace() || matches!(c, '<' | '>' | '(' | ')' | '"' | ',' | ';'))
        .map(|w| w.trim_matches(|c: char| matches!(c, ':' | '.' | '\'')))
        .find(|w| {
            let Some((local, domain)) = w.rsplit_once('@') else {
                return false;
            };
            !local.is_empty() && domain.contains('.') && w.len() <= 254 && !w.contains(['[', ']', '/'])
        })
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_recipients_as_reports_write_them() {
        let qmail = "Hi. This is the qmail-send program at mail.example.net.\nI'm afraid I wasn't able to deliver your message to the following addresses.\n\n<bob@example.com>:\nSorry, no mailbox here by that name.\n";
        assert_eq!(failed_recipient(qmail).as_deref(), Some("bob@example.com"));
        let gmail =
            "Delivery to the following recipient failed permanently:\n\n     bob@example.com\n\nTechnical details";
        assert_eq!(failed_recipient(gmail).as_deref(), Some("bob@example.com"));
        let google = "Address not found\n\nYour message wasn't delivered to bob@example.com because the address couldn't be found.";
        assert_eq!(failed_recipient(google).as_deref(), Some("bob@example.com"));
        assert_eq!(failed_recipient("Thanks, see you at 10.\nAlice"), None);
    }

    #[test]
    fn the_quoted_message_starts_after_the_separator() {
        let text = "failure notice\n\n--- Below this line is a copy of the message.\n\nReturn-Path: <a@example.org>\nSubject: x\n\nbody\n";
        assert_eq!(
            quoted_message(text),
            Some("Return-Path: <a@example.org>\nSubject: x\n\nbody\n")
        );
        assert_eq!(quoted_message("no separator here\n"), None);
        assert_eq!(quoted_message("--- Below this line is a copy of the message.\n"), None);
    }
}
