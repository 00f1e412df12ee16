//! Gateway address matching and token extraction.
//!
//! A reply arrives at `local+TOKEN@domain`, where `local@domain` is one of the
//! configured base addresses and `+` any of the configured delimiters (the
//! same characters as Postfix's `recipient_delimiter`).

use std::fmt;

/// Longest token accepted. An SMTP local part is at most 64 octets (RFC 5321).
pub const MAX_TOKEN_LEN: usize = 64;
/// Shortest token accepted: anything shorter cannot carry enough randomness.
pub const MIN_TOKEN_LEN: usize = 8;

/// A configured base address, kept in lower case for comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseAddress {
    pub local: String,
    pub domain: String,
}

impl BaseAddress {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (local, domain) = s
            .rsplit_once('@')
            .ok_or_else(|| format!("`{s}` is not an address of the form local@domain"))?;
        if local.is_empty()
            || domain.is_empty()
            || local.contains(['<', '>', '"', ' '])
            || domain.contains(['<', '>', ' '])
        {
            return Err(format!("`{s}` is not an address of the form local@domain"));
        }
        Ok(Self {
            local: local.to_ascii_lowercase(),
            domain: domain.to_ascii_lowercase(),
        })
    }
}

impl fmt::Display for BaseAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// What one envelope recipient is, as far as the gateway is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipient {
    /// A gateway address carrying a token of valid syntax.
    Gateway { token: String },
    /// A bare gateway address: nobody can be identified.
    GatewayWithoutToken,
    /// A gateway address whose token has characters or a length no token has.
    GatewayBadToken,
    /// Any other recipient: not ours.
    Other,
}

/// The configured gateway addresses and delimiters.
#[derive(Debug, Clone)]
pub struct GatewayAddresses {
    bases: Vec<BaseAddress>,
    delimiters: Vec<char>,
}

impl GatewayAddresses {
    pub fn new(bases: Vec<BaseAddress>, delimiters: &str) -> Self {
        Self {
            bases,
            delimiters: delimiters.chars().collect(),
        }
    }

    pub fn bases(&self) -> &[BaseAddress] {
        &self.bases
    }

    pub fn delimiters(&self) -> &[char] {
        &self.delimiters
    }

    /// The recipient as it may appear in a log: anything after the first
    /// delimiter cut to 8 characters, since it may be a token.
    pub fn redact(&self, rcpt: &str) -> String {
        let r = rcpt.trim();
        let r = r.strip_prefix('<').and_then(|r| r.strip_suffix('>')).unwrap_or(r);
        let (local, domain) = r.rsplit_once('@').unwrap_or((r, ""));
        let shown = match local.find(|c| self.delimiters.contains(&c)) {
            Some(i) => {
                let (base, rest) = local.split_at(i);
                let mut chars = rest.chars();
                let d = chars.next().unwrap_or('+');
                format!("{base}{d}{}", token_prefix(chars.as_str()))
            }
            None => local.to_owned(),
        };
        let shown: String = shown.chars().filter(|c| !c.is_control()).take(128).collect();
        if domain.is_empty() {
            format!("<{shown}>")
        } else {
            format!(
                "<{shown}@{}>",
                domain.chars().filter(|c| !c.is_control()).take(255).collect::<String>()
            )
        }
    }

    /// Classifies an envelope recipient as Postfix passes it in RCPT
    /// (`<Calendar+Tok@Example.org>`), or as a bare address.
    pub fn classify(&self, rcpt: &str) -> Recipient {
        let Some(addr) = strip_envelope(rcpt) else {
            return Recipient::Other;
        };
        let Some((local, domain)) = addr.rsplit_once('@') else {
            return Recipient::Other;
        };
        let local = unquote(local);
        for base in &self.bases {
            if !domain.eq_ignore_ascii_case(&base.domain) {
                continue;
            }
            if local.eq_ignore_ascii_case(&base.local) {
                return Recipient::GatewayWithoutToken;
            }
            let n = base.local.len();
            // The base local part is ASCII-lower-cased, so a byte prefix check is exact.
            if local.len() > n && local.is_char_boundary(n) && local[..n].eq_ignore_ascii_case(&base.local) {
                let mut rest = local[n..].chars();
                if let Some(d) = rest.next() {
                    if self.delimiters.contains(&d) {
                        let token = rest.as_str();
                        return if valid_token_syntax(token) {
                            Recipient::Gateway {
                                token: token.to_owned(),
                            }
                        } else {
                            Recipient::GatewayBadToken
                        };
                    }
                }
            }
        }
        Recipient::Other
    }
}

/// An address a command line or a header may carry as it is, and that
/// Postfix routes as written: one `@`; a local part of letters, digits and
/// `. _ + - '`; a domain of letters, digits, `-` and `.`; at most 254
/// characters; not starting with `-`. No `%`, `!` or second `@`: Postfix
/// would route `victim%elsewhere@example.org` elsewhere.
pub fn is_plain_address(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    let local_ok = |c: char| c.is_ascii_alphanumeric() || "._+-'".contains(c);
    let domain_ok = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.';
    !local.is_empty()
        && !domain.is_empty()
        && s.len() <= 254
        && !local.starts_with(['-', '.'])
        && !domain.starts_with(['-', '.'])
        && local.chars().all(local_ok)
        && domain.chars().all(domain_ok)
}

/// Removes angle brackets and a source route (`<@a,@b:user@c>`).
fn strip_envelope(rcpt: &str) -> Option<&str> {
    let s = rcpt.trim();
    let s = s
        .strip_prefix('<')
        .map(|s| s.strip_suffix('>').unwrap_or(s))
        .unwrap_or(s);
    let s = match s.starts_with('@') {
        true => s.split_once(':').map(|(_, a)| a)?,
        false => s,
    };
    if s.is_empty() {
        None
    } else {
        Some(s)
    }
}

fn unquote(local: &str) -> &str {
    match local.strip_prefix('"').and_then(|l| l.strip_suffix('"')) {
        Some(inner) if !inner.contains('\\') => inner,
        _ => local,
    }
}

/// The token of `imip-milter check`'s RCPT probe. The milter answers it at
/// once with `decision::decide_check_probe`: no lookup, and neither the
/// per-client limit, the journal nor the metrics count it, so a monitoring
/// loop that runs `check` never trips the limit. No store mints it (tokens
/// are UUIDs).
pub const CHECK_TOKEN: &str = "imip-milter-check";

/// Token syntax: 8 to 64 characters of letters, digits, `-`, `_`, `.`, `=`.
/// Covers CalendarServer's UUIDs and base32/base64url tokens; rejects
/// anything that could smuggle further address syntax or log noise.
pub fn valid_token_syntax(token: &str) -> bool {
    (MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'='))
}

/// `%XX` escapes decoded. A `%` without two hex digits after it is an error
/// when `strict` (a URL's key or value), else kept as written (an address a
/// server wrote); a result that is no UTF-8 is an error.
pub fn percent_decode(s: &str, strict: bool) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        let hex = (c == b'%')
            .then(|| s.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(v) => {
                out.push(v);
                i += 3;
            }
            None if c == b'%' && strict => return Err(format!("bad %-escape in `{s}`")),
            None => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("`{s}` is not UTF-8"))
}

/// A token shortened for logs: tokens are capabilities and never logged in full.
/// Text from outside made fit for a log line or a terminal: control
/// characters (escape sequences, line breaks) shown as `\u{..}`, at most
/// 1000 characters.
pub fn printable(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars().take(1000) {
        if c.is_control() || is_format(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// `printable`, for a value between double quotes (`reason="…"`): `"` and
/// `\` escaped with a backslash, so that a value cannot end the quotes or
/// pass for an escape.
pub fn quoted(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars().take(1000) {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() || is_format(c) => out.extend(c.escape_unicode()),
            c => out.push(c),
        }
    }
    out
}

/// Characters that change how a terminal shows the text around them
/// without showing themselves (Unicode Cf, Zl, Zp): bidirectional
/// overrides and isolates (U+202E turns a line around), zero-width
/// characters, line and paragraph separators, tag characters.
fn is_format(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{0600}'..='\u{0605}'
            | '\u{061C}'
            | '\u{06DD}'
            | '\u{070F}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{E0001}'
            | '\u{E0020}'..='\u{E007F}'
    )
}

pub fn token_prefix(token: &str) -> String {
    let prefix: String = token.chars().take(8).collect();
    if prefix.len() < token.len() {
        format!("{prefix}…")
    } else {
        prefix
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_addresses_are_routed_as_written() {
        for ok in ["alice@example.org", "o'brien.j+cal@mx-1.example.org"] {
            assert!(is_plain_address(ok), "{ok}");
        }
        for bad in [
            "victim%evil.example@example.org",
            "victim@evil.example@example.org",
            "evil.example!victim@example.org",
            "-oQ/tmp@example.org",
            "a b@example.org",
            "\"a\"@example.org",
            "alice@example.org>",
            "alice",
            "@example.org",
            "alice@",
            "alice@exa_mple.org",
        ] {
            assert!(!is_plain_address(bad), "{bad}");
        }
    }

    fn gw() -> GatewayAddresses {
        GatewayAddresses::new(
            vec![
                BaseAddress::parse("calendar@example.org").unwrap(),
                BaseAddress::parse("Replies@Example.NET").unwrap(),
            ],
            "+-",
        )
    }

    const UUID: &str = "8e3c0d1a-5b7e-4f61-9a0c-2d4f3b6a7c81";

    #[test]
    fn token_from_raw_rcpt_keeps_case() {
        assert_eq!(
            gw().classify("<Calendar+AbCdEf12-34@Example.ORG>"),
            Recipient::Gateway {
                token: "AbCdEf12-34".into()
            }
        );
        assert_eq!(
            gw().classify(&format!("calendar+{UUID}@example.org")),
            Recipient::Gateway { token: UUID.into() }
        );
    }

    #[test]
    fn second_address_and_second_delimiter() {
        assert_eq!(
            gw().classify(&format!("<replies-{UUID}@example.net>")),
            Recipient::Gateway { token: UUID.into() }
        );
    }

    #[test]
    fn format_characters_are_shown_not_obeyed() {
        assert_eq!(printable("bob\u{202E}gpj.exe"), "bob\\u{202e}gpj.exe");
        assert_eq!(
            printable("a\u{2028}b\u{200B}c\u{2066}"),
            "a\\u{2028}b\\u{200b}c\\u{2066}"
        );
        assert_eq!(printable("Müller 日本"), "Müller 日本");
        assert_eq!(
            quoted("say \"hi\" \\u{202e}\u{202e}"),
            "say \\\"hi\\\" \\\\u{202e}\\u{202e}"
        );
    }

    #[test]
    fn bare_and_bad_tokens() {
        let g = gw();
        assert_eq!(g.classify("<calendar@example.org>"), Recipient::GatewayWithoutToken);
        assert_eq!(g.classify("<CALENDAR@EXAMPLE.ORG>"), Recipient::GatewayWithoutToken);
        assert_eq!(g.classify("<calendar+@example.org>"), Recipient::GatewayBadToken);
        assert_eq!(g.classify("<calendar+short@example.org>"), Recipient::GatewayBadToken);
        assert_eq!(g.classify("<calendar+abc%def@example.org>"), Recipient::GatewayBadToken);
        assert_eq!(
            g.classify(&format!("<calendar+{}@example.org>", "a".repeat(65))),
            Recipient::GatewayBadToken
        );
        assert_eq!(
            g.classify("<calendar+abcdefgh+ijk@example.org>"),
            Recipient::GatewayBadToken
        );
    }

    #[test]
    fn others() {
        let g = gw();
        for r in [
            "<alice@example.org>",
            "<calendarx+abcdefgh@example.org>",
            "<calendar+abcdefgh@example.com>",
            "<>",
            "",
            "<calendar+abcdefgh>",
            "<é+abcdefgh@example.org>",
        ] {
            assert_eq!(g.classify(r), Recipient::Other, "{r}");
        }
    }

    #[test]
    fn source_route_and_quotes() {
        assert_eq!(
            gw().classify("<@relay.example:calendar+abcdefgh@example.org>"),
            Recipient::Gateway {
                token: "abcdefgh".into()
            }
        );
        assert_eq!(
            gw().classify("<\"calendar+abcdefgh\"@example.org>"),
            Recipient::Gateway {
                token: "abcdefgh".into()
            }
        );
    }

    #[test]
    fn redaction() {
        assert_eq!(
            gw().redact(&format!("<calendar+{UUID}@example.org>")),
            "<calendar+8e3c0d1a…@example.org>"
        );
        assert_eq!(gw().redact("<alice@example.org>"), "<alice@example.org>");
    }

    #[test]
    fn prefixes() {
        assert_eq!(token_prefix(UUID), "8e3c0d1a…");
        assert_eq!(token_prefix("abcdefgh"), "abcdefgh");
    }
}
