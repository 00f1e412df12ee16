//! CalendarServer's IMIP_TOKENS table as CSV, for `imip-milter tokens import`.

use super::TokenRecord;

/// Reads CalendarServer's IMIP_TOKENS rows as CSV: TOKEN, ORGANIZER,
/// ATTENDEE, ICALUID, ACCESSED (a header row is skipped). Returns the
/// records, and one message per line that could not be read.
pub fn parse_csv(text: &str, now_ms: u64) -> (Vec<TokenRecord>, Vec<String>) {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fields = split_csv(line);
        if n == 0 && fields.first().is_some_and(|f| f.eq_ignore_ascii_case("token")) {
            continue;
        }
        if fields.len() < 4 {
            bad.push(format!(
                "line {}: needs TOKEN, ORGANIZER, ATTENDEE, ICALUID[, ACCESSED]",
                n + 1
            ));
            continue;
        }
        let token = fields[0].trim();
        if !crate::address::valid_token_syntax(token) {
            bad.push(format!("line {}: token of bad syntax", n + 1));
            continue;
        }
        let accessed = fields.get(4).and_then(|a| parse_time(a.trim())).unwrap_or(now_ms);
        out.push(TokenRecord {
            token: token.to_owned(),
            organizer: crate::itip::normalise_mailto(fields[1].trim()),
            attendee: crate::itip::normalise_mailto(fields[2].trim()),
            uid: fields[3].trim().to_owned(),
            created_ms: accessed,
            last_used_ms: accessed,
            attendees: Vec::new(),
            invitations: Vec::new(),
        });
    }
    (out, bad)
}

fn parse_time(s: &str) -> Option<u64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return u64::try_from(t.timestamp_millis()).ok();
    }
    for fmt in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, fmt) {
            return u64::try_from(t.and_utc().timestamp_millis()).ok();
        }
    }
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .and_then(|t| u64::try_from(t.and_utc().timestamp_millis()).ok())
}

fn split_csv(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    fields.push(cur);
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendarserver_csv() {
        let csv = "TOKEN,ORGANIZER,ATTENDEE,ICALUID,ACCESSED\n\
            8e3c0d1a-5b7e-4f61-9a0c-2d4f3b6a7c81,urn:x-uid:alice,mailto:bob@example.com,\"uid,with,commas\",2026-11-01 10:00:00\n\
            bad token!,mailto:a@x,mailto:b@y,u\n\
            short\n";
        let (recs, bad) = parse_csv(csv, 5);
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].uid, "uid,with,commas");
        assert_eq!(recs[0].organizer, "urn:x-uid:alice");
        assert_eq!(recs[0].last_used_ms, 1_793_527_200_000);
        assert_eq!(bad.len(), 2, "{bad:?}");
    }
}
