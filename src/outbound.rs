//! Outbound tokenization (`[outbound] enabled = true`): an invitation from a
//! local organizer to external attendees leaves with the organizer's address
//! replaced by a tokenized gateway address, so that replies and bounces come
//! back through the gateway. Only the ORGANIZER lines of the calendar parts
//! change; every other byte of the message stays as it was.

use mail_parser::{MessageParser, MimeHeaders, PartType};
use regex::Regex;
use std::{collections::HashMap, net::IpAddr};

/// The methods that carry an invitation (RFC 5546).
const METHODS: [&str; 4] = ["REQUEST", "CANCEL", "ADD", "PUBLISH"];

/// Outbound settings.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// Domains whose organizers are local (lower case).
    pub organizer_domains: Vec<String>,
    /// Calendar user addresses that are external and reached by iMIP.
    pub address_patterns: Vec<Regex>,
    /// `sender_login_maps`: organizer address or `@domain` → SASL logins
    /// that may send for it (keys and logins in lower case).
    pub sender_logins: HashMap<String, Vec<String>>,
    /// SASL logins of calendar servers that may send for any local organizer.
    pub trusted_logins: Vec<String>,
    /// Client networks of calendar servers that submit without SMTP AUTH.
    pub trusted_clients: Vec<ClientNet>,
}

/// An address or network, `192.0.2.10`, `2001:db8::/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientNet {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for ClientNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = a.parse().map_err(|_| format!("`{s}` is no IP address or network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: the prefix length must be 0 to {max}"))?,
        };
        Ok(Self { addr, prefix })
    }
}

impl ClientNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| -> Option<u128> {
            match (self.addr, ip) {
                (IpAddr::V4(_), IpAddr::V4(v)) => Some(u128::from(u32::from(v)) << 96),
                (IpAddr::V6(_), IpAddr::V6(v)) => Some(u128::from(v)),
                (IpAddr::V4(_), IpAddr::V6(v)) => v.to_ipv4_mapped().map(|v| u128::from(u32::from(v)) << 96),
                _ => None,
            }
        };
        let (Some(net), Some(ip)) = (bits(self.addr), bits(ip)) else {
            return false;
        };
        let mask = match self.prefix {
            0 => 0,
            p => u128::MAX << (128 - u32::from(p)),
        };
        net & mask == ip & mask
    }
}

/// Reads a Postfix `smtpd_sender_login_maps`-style file: `address login,
/// login` or `@domain login` per line, `#` comments. Err names the line.
pub fn parse_login_map(text: &str) -> Result<HashMap<String, Vec<String>>, String> {
    let mut map: HashMap<String, Vec<String>> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|w| !w.is_empty());
        let (Some(key), logins) = (words.next(), words) else {
            continue;
        };
        let logins: Vec<String> = logins.map(str::to_ascii_lowercase).collect();
        if logins.is_empty() || !key.contains('@') {
            return Err(format!(
                "line {}: needs an address or @domain and at least one login",
                n + 1
            ));
        }
        map.entry(key.to_ascii_lowercase()).or_default().extend(logins);
    }
    Ok(map)
}

impl Outbound {
    /// Whether the sender who submitted this message may get tokens for
    /// `organizer` (DESIGN §4c): Ok says how, Err why not. The envelope
    /// sender never counts.
    pub fn authorize(
        &self,
        organizer: &str,
        login: Option<&str>,
        client: Option<IpAddr>,
    ) -> Result<&'static str, String> {
        let address = organizer
            .trim()
            .trim_start_matches("mailto:")
            .trim_start_matches("MAILTO:")
            .to_ascii_lowercase();
        if let Some(login) = login.map(str::to_ascii_lowercase).filter(|l| !l.is_empty()) {
            if login == address {
                return Ok("SASL login");
            }
            let domain = address
                .rsplit_once('@')
                .map(|(_, d)| format!("@{d}"))
                .unwrap_or_default();
            let mapped = |key: &str| self.sender_logins.get(key).is_some_and(|ls| ls.contains(&login));
            if mapped(&address) || mapped(&domain) {
                return Ok("outbound.sender_login_maps");
            }
            if self.trusted_logins.contains(&login) && self.is_local(&address) {
                return Ok("outbound.trusted_logins");
            }
        }
        if client.is_some_and(|ip| self.trusted_clients.iter().any(|n| n.contains(ip))) && self.is_local(&address) {
            return Ok("outbound.trusted_clients");
        }
        let login: String = login
            .unwrap_or("")
            .chars()
            .filter(|c| !c.is_control())
            .take(80)
            .collect();
        Err(format!(
            "the sender did not authenticate as organizer {} (SASL login: {}, client {}; see outbound.sender_login_maps, trusted_logins, trusted_clients)",
            address.chars().filter(|c| !c.is_control()).take(120).collect::<String>(),
            if login.is_empty() { "none".to_owned() } else { login },
            client.map(|c| c.to_string()).unwrap_or_else(|| "unknown".into()),
        ))
    }

    pub fn is_local(&self, address: &str) -> bool {
        let a = address.trim_start_matches("mailto:").trim_start_matches("MAILTO:");
        a.rsplit_once('@')
            .is_some_and(|(_, d)| self.organizer_domains.iter().any(|l| l.eq_ignore_ascii_case(d)))
    }

    /// An envelope recipient that gets a token: not local, and matching a pattern.
    pub fn is_external(&self, rcpt: &str) -> bool {
        let uri = format!("mailto:{}", strip(rcpt).to_ascii_lowercase());
        !self.is_local(&uri) && self.address_patterns.iter().any(|p| p.is_match(&uri))
    }
}

fn strip(a: &str) -> &str {
    let a = a.trim();
    a.strip_prefix('<').and_then(|a| a.strip_suffix('>')).unwrap_or(a)
}

/// What an outgoing message holds that needs a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invitation {
    /// `mailto:` URI of the (local) organizer.
    pub organizer: String,
    pub uid: String,
    pub method: String,
    /// The message's Message-ID, `<...>`, remembered with the token.
    pub message_id: Option<String>,
    /// Byte ranges of the calendar parts' bodies in the raw message, with
    /// their transfer encoding.
    parts: Vec<(usize, usize, Encoding)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Plain,
    Base64,
    QuotedPrintable,
}

/// Finds an invitation from a local organizer in `raw` (headers and body).
pub fn find(raw: &[u8], cfg: &Outbound) -> Option<Invitation> {
    find_where(raw, |method, organizer| {
        METHODS.contains(&method) && cfg.is_local(organizer)
    })
}

/// A message redirected to the organizer with her real address as ORGANIZER
/// again where it names the gateway (a COUNTER through a token): the body
/// to put in place, or None when it has no calendar part to rewrite.
/// `organizer` is the token's, a `mailto:` URI.
pub fn organizer_given_back(raw: &[u8], organizer: &str) -> Option<Vec<u8>> {
    let mut inv = find_where(raw, |_, _| true)?;
    inv.organizer = organizer.to_owned();
    rewrite_body(raw, body_start(raw), &inv, organizer)
}

/// Where the body of `raw` begins (after the first empty line); its end
/// when it has none.
pub fn body_start(raw: &[u8]) -> usize {
    raw.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(raw.len(), |p| p + 4)
}

/// The first calendar part whose METHOD and ORGANIZER `keep` takes, with
/// the other parts of the same event.
fn find_where(raw: &[u8], keep: impl Fn(&str, &str) -> bool) -> Option<Invitation> {
    let message = MessageParser::default().parse(raw)?;
    let mut found: Option<Invitation> = None;
    for part in message.parts.iter().take(crate::message::MAX_PARTS) {
        let is_calendar = part.content_type().is_some_and(|ct| {
            let (t, s) = (
                ct.ctype().to_ascii_lowercase(),
                ct.subtype().unwrap_or("").to_ascii_lowercase(),
            );
            (t == "text" && s == "calendar") || (t == "application" && s == "ics")
        });
        if !is_calendar || matches!(part.body, PartType::Message(_) | PartType::Multipart(_)) {
            continue;
        }
        let text = match &part.body {
            PartType::Text(t) => t.to_string(),
            PartType::Binary(b) | PartType::InlineBinary(b) => String::from_utf8_lossy(b).into_owned(),
            _ => continue,
        };
        let Ok(itip) = crate::itip::read(&text, None) else {
            continue;
        };
        let (Some(method), Some(organizer), Some(uid)) = (itip.method, itip.organizer, itip.uid) else {
            continue;
        };
        if !keep(&method, &organizer) {
            continue;
        }
        let encoding = match part.content_transfer_encoding().map(|e| e.to_ascii_lowercase()) {
            Some(e) if e == "base64" => Encoding::Base64,
            Some(e) if e == "quoted-printable" => Encoding::QuotedPrintable,
            _ => Encoding::Plain,
        };
        let range = (part.offset_body as usize, part.offset_end as usize, encoding);
        if range.0 > range.1 || range.1 > raw.len() {
            continue;
        }
        match &mut found {
            None => {
                found = Some(Invitation {
                    organizer,
                    uid,
                    method,
                    message_id: message.message_id().map(|id| format!("<{id}>")),
                    parts: vec![range],
                })
            }
            // Google-style second copy of the same event.
            Some(inv) if inv.uid == uid => inv.parts.push(range),
            Some(_) => {}
        }
    }
    found
}

/// The message body with every ORGANIZER in the invitation's calendar parts
/// set to `tokenized` (a `mailto:` URI), its parameters kept and EMAIL= the
/// real address. `body_start` is where the body begins in `raw`.
pub fn rewrite_body(raw: &[u8], body_start: usize, inv: &Invitation, tokenized: &str) -> Option<Vec<u8>> {
    let real = inv
        .organizer
        .trim_start_matches("mailto:")
        .trim_start_matches("MAILTO:");
    let mut parts = inv.parts.clone();
    parts.sort_by_key(|p| p.0);
    let mut out = Vec::with_capacity(raw.len() + 256);
    let mut pos = body_start;
    for (start, end, encoding) in parts {
        if start < pos {
            return None;
        }
        out.extend_from_slice(&raw[pos..start]);
        let encoded = &raw[start..end];
        let decoded = match encoding {
            Encoding::Plain => encoded.to_vec(),
            Encoding::Base64 => decode_base64(encoded)?,
            Encoding::QuotedPrintable => decode_qp(encoded),
        };
        // 8-bit calendar text that is no UTF-8 is taken as Latin-1 and
        // written back as it came: only ORGANIZER lines change.
        let rewritten: Vec<u8> = match String::from_utf8(decoded) {
            Ok(t) => rewrite_organizer(&t, tokenized, real).into_bytes(),
            Err(e) => {
                let text: String = e.into_bytes().iter().map(|&b| char::from(b)).collect();
                rewrite_organizer(&text, tokenized, real)
                    .chars()
                    .map(|c| u8::try_from(u32::from(c)).ok())
                    .collect::<Option<Vec<u8>>>()?
            }
        };
        let trailing = &encoded[encoded.len() - trailing_newlines(encoded)..];
        match encoding {
            Encoding::Plain => out.extend_from_slice(&rewritten),
            Encoding::Base64 => {
                out.extend_from_slice(encode_base64(&rewritten).as_bytes());
                out.extend_from_slice(trailing);
            }
            Encoding::QuotedPrintable => {
                out.extend_from_slice(encode_qp(&rewritten).as_bytes());
                out.extend_from_slice(trailing);
            }
        }
        pos = end;
    }
    out.extend_from_slice(&raw[pos..]);
    Some(out)
}

fn trailing_newlines(b: &[u8]) -> usize {
    b.iter().rev().take_while(|c| matches!(c, b'\r' | b'\n')).count()
}

/// Rewrites the ORGANIZER properties of iCalendar text, leaving every other
/// line as it was.
pub fn rewrite_organizer(text: &str, tokenized: &str, real: &str) -> String {
    let mut out = String::with_capacity(text.len() + 128);
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let is_org = line.get(..9).is_some_and(|n| n.eq_ignore_ascii_case("ORGANIZER"))
            && matches!(line.get(9..10), Some(";" | ":"));
        if !is_org {
            out.push_str(line);
            i += 1;
            continue;
        }
        // Unfold the property.
        let eol = if line.ends_with("\r\n") { "\r\n" } else { "\n" };
        let mut logical = line.trim_end_matches(['\r', '\n']).to_owned();
        i += 1;
        while i < lines.len() && lines[i].starts_with([' ', '\t']) {
            logical.push_str(lines[i][1..].trim_end_matches(['\r', '\n']));
            i += 1;
        }
        let (head, _) = split_value(&logical);
        let params: Vec<&str> = split_params(head.get(9..).unwrap_or(""))
            .into_iter()
            .filter(|p| !p.to_ascii_uppercase().starts_with("EMAIL="))
            .collect();
        let mut prop = String::from("ORGANIZER");
        for p in params {
            prop.push(';');
            prop.push_str(p);
        }
        prop.push_str(&format!(";EMAIL={real}:{tokenized}"));
        out.push_str(&fold(&prop, eol));
    }
    out
}

/// (name and parameters, value): split at the first colon outside quotes.
fn split_value(line: &str) -> (&str, &str) {
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ':' if !quoted => return (&line[..i], &line[i + 1..]),
            _ => {}
        }
    }
    (line, "")
}

/// `;A=1;B="x;y"` → ["A=1", "B=\"x;y\""]
fn split_params(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut quoted = false;
    let mut start = None;
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ';' if !quoted => {
                if let Some(st) = start {
                    out.push(&s[st..i]);
                }
                start = Some(i + 1);
            }
            _ => {}
        }
    }
    if let Some(st) = start {
        if st < s.len() {
            out.push(&s[st..]);
        }
    }
    out
}

/// Folds a content line at 75 octets (RFC 5545 §3.1), never inside a character.
fn fold(line: &str, eol: &str) -> String {
    let mut out = String::with_capacity(line.len() + 8);
    let mut width = 0;
    for c in line.chars() {
        let n = c.len_utf8();
        if width + n > 75 {
            out.push_str(eol);
            out.push(' ');
            width = 1;
        }
        out.push(c);
        width += n;
    }
    out.push_str(eol);
    out
}

fn decode_base64(b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(b.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for &c in b {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            b'\r' | b'\n' | b' ' | b'\t' => continue,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

fn encode_base64(b: &[u8]) -> String {
    let flat = crate::message::base64(b);
    let mut out = String::with_capacity(flat.len() + flat.len() / 76 * 2 + 2);
    for (i, chunk) in flat.as_bytes().chunks(76).enumerate() {
        if i > 0 {
            out.push_str("\r\n");
        }
        out.push_str(std::str::from_utf8(chunk).unwrap_or(""));
    }
    out
}

fn decode_qp(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    while i < b.len() {
        if b[i] == b'=' {
            if b.get(i + 1) == Some(&b'\r') && b.get(i + 2) == Some(&b'\n') {
                i += 3;
                continue;
            }
            if b.get(i + 1) == Some(&b'\n') {
                i += 2;
                continue;
            }
            if let (Some(h), Some(l)) = (b.get(i + 1).and_then(|c| hex(*c)), b.get(i + 2).and_then(|c| hex(*c))) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn encode_qp(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len() + b.len() / 8);
    let mut width = 0;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'\r' && b.get(i + 1) == Some(&b'\n') {
            out.push_str("\r\n");
            width = 0;
            i += 2;
            continue;
        }
        let literal = (c == b' ' || c == b'\t') && !matches!(b.get(i + 1), Some(b'\r') | Some(b'\n') | None)
            || (33..=126).contains(&c) && c != b'=';
        let piece = if literal {
            (c as char).to_string()
        } else {
            format!("={c:02X}")
        };
        if width + piece.len() > 75 {
            out.push_str("=\r\n");
            width = 0;
        }
        width += piece.len();
        out.push_str(&piece);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Outbound {
        Outbound {
            sender_logins: HashMap::new(),
            trusted_logins: Vec::new(),
            trusted_clients: Vec::new(),
            organizer_domains: vec!["example.org".into()],
            address_patterns: vec![Regex::new("^mailto:").unwrap()],
        }
    }

    const INVITE: &str = "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Test//EN\r\nMETHOD:REQUEST\r\nBEGIN:VEVENT\r\nUID:ev-1\r\nDTSTAMP:20261120T100000Z\r\nSUMMARY:Planung Zürich\r\nORGANIZER;CN=\"Doe, Alice\";EMAIL=alice@example.org:mailto:alice@example.org\r\nATTENDEE;PARTSTAT=NEEDS-ACTION;RSVP=TRUE:mailto:bob@example.com\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n";

    fn message(encoding: &str, body: &str) -> Vec<u8> {
        format!(
            "From: Alice <alice@example.org>\r\nTo: bob@example.com\r\nSubject: Invitation\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nYou are invited.\r\n--b\r\nContent-Type: text/calendar; charset=utf-8; method=REQUEST\r\nContent-Transfer-Encoding: {encoding}\r\n\r\n{body}\r\n--b--\r\n"
        )
        .into_bytes()
    }

    fn roundtrip(raw: &[u8]) -> (Vec<u8>, String) {
        let inv = find(raw, &cfg()).expect("an invitation");
        assert_eq!(inv.organizer, "mailto:alice@example.org");
        assert_eq!(inv.uid, "ev-1");
        let start = body_start(raw);
        let tok = "mailto:calendar+8e3c0d1a-5b7e-4f61-9a0c-2d4f3b6a7c81@example.org";
        let body = rewrite_body(raw, start, &inv, tok).unwrap();
        let mut whole = raw[..start].to_vec();
        whole.extend_from_slice(&body);
        let a = crate::analysis::analyse(&whole);
        (body, a.icalendar.unwrap_or_default())
    }

    #[test]
    fn plain_part_only_organizer_changes() {
        let raw = message("8bit", INVITE);
        let (body, cal) = roundtrip(&raw);
        let start = body_start(&raw);
        let before = String::from_utf8(raw[start..].to_vec()).unwrap();
        let after = String::from_utf8(body).unwrap().replace("\r\n ", "");
        assert_eq!(before.lines().count(), after.lines().count());
        let changed: Vec<(&str, &str)> = before.lines().zip(after.lines()).filter(|(a, b)| a != b).collect();
        assert!(changed.iter().all(|(a, _)| a.starts_with("ORGANIZER")), "{changed:?}");
        assert!(
            cal.contains("EMAIL=alice@example.org:mailto:calendar+8e3c0d1a"),
            "{cal}"
        );
        assert!(cal.contains("CN=\"Doe, Alice\""), "{cal}");
        let itip = crate::itip::read(&cal, None).unwrap();
        assert_eq!(
            itip.organizer.as_deref(),
            Some("mailto:calendar+8e3c0d1a-5b7e-4f61-9a0c-2d4f3b6a7c81@example.org")
        );
        assert!(cal.contains("SUMMARY:Planung Zürich"));
    }

    #[test]
    fn base64_and_quoted_printable_parts() {
        let b64 = encode_base64(INVITE.as_bytes());
        let (_, cal) = roundtrip(&message("base64", &b64));
        assert!(cal.contains("mailto:calendar+8e3c0d1a"), "{cal}");
        assert!(cal.contains("SUMMARY:Planung Zürich"), "{cal}");
        let qp = encode_qp(INVITE.as_bytes());
        let (_, cal) = roundtrip(&message("quoted-printable", &qp));
        assert!(cal.contains("mailto:calendar+8e3c0d1a"), "{cal}");
        assert!(cal.contains("SUMMARY:Planung Zürich"), "{cal}");
    }

    #[test]
    fn external_and_local() {
        let c = cfg();
        assert!(c.is_external("<bob@example.com>"));
        assert!(!c.is_external("<carol@example.org>"));
        assert!(c.is_local("mailto:Alice@Example.ORG"));
    }

    #[test]
    fn replies_and_foreign_organizers_are_left_alone() {
        assert!(find(
            &message("8bit", &INVITE.replace("METHOD:REQUEST", "METHOD:REPLY")),
            &cfg()
        )
        .is_none());
        assert!(find(
            &message("8bit", &INVITE.replace("alice@example.org", "alice@example.com")),
            &cfg()
        )
        .is_none());
    }

    #[test]
    fn folding() {
        let long = format!("ORGANIZER;CN={}:mailto:a@b", "x".repeat(200));
        let folded = fold(&long, "\r\n");
        assert!(folded.split("\r\n").all(|l| l.len() <= 75));
        assert_eq!(folded.replace("\r\n ", "").trim_end(), long);
    }

    #[test]
    fn only_the_authenticated_organizer_gets_tokens() {
        let mut c = cfg();
        c.sender_logins =
            parse_login_map("# who may send for whom\nalice@example.org  alice, assistant\n@example.org calsrv\n")
                .unwrap();
        c.trusted_logins = vec!["caldav-robot".into()];
        c.trusted_clients = vec!["192.0.2.0/24".parse().unwrap(), "2001:db8::1".parse().unwrap()];
        let alice = "mailto:Alice@example.org";
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert!(c.authorize(alice, Some("alice@example.org"), None).is_ok());
        assert!(c.authorize(alice, Some("assistant"), None).is_ok());
        assert!(c.authorize(alice, Some("calsrv"), None).is_ok());
        assert!(c.authorize(alice, Some("caldav-robot"), None).is_ok());
        assert!(c.authorize(alice, None, ip("192.0.2.77")).is_ok());
        assert!(c.authorize(alice, None, ip("::ffff:192.0.2.77")).is_ok());
        assert!(c.authorize(alice, None, ip("2001:db8::1")).is_ok());
        // The envelope sender is no argument here at all; these are refused.
        assert!(c.authorize(alice, None, None).is_err());
        assert!(c.authorize(alice, Some("mallory"), ip("198.51.100.1")).is_err());
        assert!(c.authorize(alice, None, ip("192.0.3.1")).is_err());
        assert!(c.authorize(alice, None, ip("2001:db8::2")).is_err());
        // Trust reaches only organizers in organizer_domains.
        assert!(c
            .authorize("mailto:ceo@other.example", Some("caldav-robot"), ip("192.0.2.77"))
            .is_err());
        assert!(parse_login_map("alice\n").is_err());
        assert!("10.0.0.0/33".parse::<ClientNet>().is_err());
        assert!("0.0.0.0/0"
            .parse::<ClientNet>()
            .unwrap()
            .contains("203.0.113.9".parse().unwrap()));
    }

    #[test]
    fn non_ascii_lines_neither_panic_nor_change() {
        // Found in review: a byte-index slice split a character at byte 9.
        let text = INVITE.replace("SUMMARY:Planung Zürich", "SUMMARY:Über\r\nORGANIZÉ:x\r\nORGANIZER:Ü");
        let out = rewrite_organizer(&text, "mailto:calendar+t@example.org", "alice@example.org");
        assert!(out.contains("SUMMARY:Über\r\nORGANIZÉ:x\r\n"), "{out}");
    }
}
