//! MIME walk: finds the calendar parts of a message, the delivery status of a
//! bounce and the invitation it returns, and the shapes that carry no usable
//! calendar data (TNEF, plain text).

use mail_parser::{Message, MessageParser, MimeHeaders, PartType};

/// More parts than this and the message is not a calendar reply anyone wrote.
pub const MAX_PARTS: usize = 1000;
/// Calendar parts looked at per message (Google sends two copies; nobody sends 16).
pub const MAX_CALENDAR_PARTS: usize = 16;
/// Longest text kept of a delivery-status field.
const MAX_FIELD_LEN: usize = 512;

/// One calendar part, decoded to text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalendarPart {
    /// The `method` parameter of the Content-Type, if any.
    pub method_param: Option<String>,
    /// The text after transfer and charset decoding, as received otherwise.
    pub text: String,
}

/// The per-recipient fields of a `message/delivery-status` part.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryStatus {
    pub action: String,
    pub status: Option<String>,
    pub final_recipient: Option<String>,
    pub diagnostic: Option<String>,
}

/// A delivery report (`multipart/report; report-type=delivery-status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub status: DeliveryStatus,
    /// Calendar parts of the returned message, if the report carries it whole.
    pub returned_calendars: Vec<CalendarPart>,
    /// Message-IDs of the returned message (whole or headers only), `<...>`.
    pub returned_message_ids: Vec<String>,
    /// Read from another form than RFC 3464's (a mailer daemon's text, an
    /// empty delivery-status, X-Failed-Recipients): believed from the null
    /// sender only.
    pub loose: bool,
}

/// What the MIME walk found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageSummary {
    pub message_id: Option<String>,
    pub from: Option<String>,
    pub authentication_results: Option<String>,
    /// Every Authentication-Results header, top first (at most 16).
    pub all_authentication_results: Vec<String>,
    /// Calendar parts of the message itself.
    pub calendars: Vec<CalendarPart>,
    /// Calendar parts inside attached (forwarded) messages.
    pub attached_calendars: usize,
    pub report: Option<Report>,
    pub has_tnef: bool,
    pub has_text: bool,
    /// Calendar parts whose bytes could not be turned into text.
    pub undecodable: Vec<String>,
    /// A multipart/report at any depth of the message itself.
    pub is_report: bool,
    /// Messages the message carries (attached, or returned by a report
    /// whose status could not be read): their calendar parts and ids, for
    /// a report in another form.
    pub carried_calendars: Vec<CalendarPart>,
    pub carried_message_ids: Vec<String>,
    /// The first text part, for a report written as text.
    pub first_text: Option<String>,
}

/// Walks a raw message. Err carries a sentence for the sender.
pub fn read(raw: &[u8]) -> Result<MessageSummary, String> {
    let message = MessageParser::default()
        .parse(raw)
        .ok_or_else(|| "the message has no readable header".to_owned())?;
    let mut summary = MessageSummary {
        message_id: message.message_id().map(|id| format!("<{id}>")),
        from: message
            .from()
            .and_then(|a| a.first())
            .and_then(|a| a.address())
            .map(str::to_owned),
        authentication_results: message
            .header_raw("Authentication-Results")
            .map(|v| v.trim().chars().take(2048).collect()),
        ..Default::default()
    };
    summary.all_authentication_results = message
        .headers_raw()
        .filter(|(name, _)| name.eq_ignore_ascii_case("Authentication-Results"))
        .take(16)
        .map(|(_, v)| v.trim().chars().take(2048).collect())
        .collect();
    let mut budget = MAX_PARTS;
    walk(&message, &mut summary, &mut budget, false)?;
    if summary.report.is_none() {
        summary.report = loose_report(&message, &summary, &mut budget);
    }
    Ok(summary)
}

/// Text of a report read at most: the returned message it quotes included.
const MAX_REPORT_TEXT: usize = 512 * 1024;

/// A delivery report in another form than RFC 3464's, from a mailer daemon
/// (its From, X-Failed-Recipients, or a multipart/report whose status part
/// says nothing): the failed recipient from X-Failed-Recipients, else from
/// the text; the returned message from a carried part, else from the text
/// after the usual separator. None when no failed recipient is named.
fn loose_report(message: &Message<'_>, summary: &MessageSummary, budget: &mut usize) -> Option<Report> {
    let from = message.from().and_then(|a| a.first());
    let address = from.and_then(|a| a.address()).unwrap_or("").to_ascii_lowercase();
    let name = from.and_then(|a| a.name()).unwrap_or("").to_ascii_lowercase();
    let local = address.split('@').next().unwrap_or("");
    let listed = message
        .header_raw("X-Failed-Recipients")
        .and_then(|v| v.split(',').next())
        .map(|v| v.trim().trim_matches(['<', '>']).to_owned())
        .filter(|v| v.contains('@') && !v.contains(char::is_whitespace));
    let daemon = matches!(local, "mailer-daemon" | "postmaster" | "mail-daemon")
        || name.contains("mail delivery")
        || listed.is_some()
        || summary.is_report;
    if !daemon {
        return None;
    }
    let text = summary.first_text.as_deref().unwrap_or("");
    let failed = listed.or_else(|| crate::bounces::failed_recipient(text))?;
    let mut calendars = summary.carried_calendars.clone();
    let mut ids = summary.carried_message_ids.clone();
    if calendars.is_empty() && ids.is_empty() {
        if let Some(quoted) = crate::bounces::quoted_message(text) {
            if let Some(inner) = MessageParser::default().parse(quoted.as_bytes()) {
                let mut returned = MessageSummary::default();
                if walk(&inner, &mut returned, budget, true).is_ok() {
                    calendars = returned.calendars;
                }
                ids.extend(inner.message_id().map(|id| format!("<{id}>")));
            }
        }
    }
    Some(Report {
        status: DeliveryStatus {
            action: "failed".into(),
            status: None,
            final_recipient: Some(clip(failed)),
            diagnostic: None,
        },
        returned_calendars: calendars,
        returned_message_ids: ids.into_iter().take(4).collect(),
        loose: true,
    })
}

fn walk(message: &Message<'_>, summary: &mut MessageSummary, budget: &mut usize, nested: bool) -> Result<(), String> {
    // A report may sit inside a multipart/mixed (RFC 6522; Lotus Domino).
    let is_report = message.parts.iter().take(MAX_PARTS).any(|p| {
        p.content_type().is_some_and(|ct| {
            ct.ctype().eq_ignore_ascii_case("multipart")
                && ct.subtype().is_some_and(|s| s.eq_ignore_ascii_case("report"))
        })
    });
    if !nested {
        summary.is_report = is_report;
    }
    let mut status: Option<DeliveryStatus> = None;
    let mut returned = Vec::new();
    let mut returned_ids: Vec<String> = Vec::new();

    for part in &message.parts {
        *budget = budget
            .checked_sub(1)
            .ok_or_else(|| format!("the message has more than {MAX_PARTS} MIME parts"))?;
        let (ctype, subtype) = part
            .content_type()
            .map(|ct| {
                (
                    ct.ctype().to_ascii_lowercase(),
                    ct.subtype().unwrap_or("").to_ascii_lowercase(),
                )
            })
            .unwrap_or_else(|| ("text".into(), "plain".into()));
        let filename = part.attachment_name().unwrap_or("").to_ascii_lowercase();

        if let PartType::Message(inner) = &part.body {
            if nested {
                continue; // two levels are enough to find a returned invitation
            }
            let mut inner_summary = MessageSummary::default();
            walk(inner, &mut inner_summary, budget, true)?;
            if is_report {
                returned.extend(inner_summary.calendars);
                returned_ids.extend(inner.message_id().map(|id| format!("<{id}>")));
            } else {
                summary.attached_calendars += inner_summary.calendars.len();
                summary.carried_calendars.extend(inner_summary.calendars);
                summary
                    .carried_message_ids
                    .extend(inner.message_id().map(|id| format!("<{id}>")));
            }
            continue;
        }
        match (ctype.as_str(), subtype.as_str()) {
            ("multipart", _) => {}
            ("text", "rfc822-headers") | ("message", "global-headers") if is_report => {
                let headers = MessageParser::default().parse_headers(part.contents());
                returned_ids.extend(headers.and_then(|h| h.message_id().map(|id| format!("<{id}>"))));
            }
            // Only a report is a report: the root part multipart/report.
            ("message", "delivery-status" | "global-delivery-status") if status.is_none() && is_report && !nested => {
                status = parse_delivery_status(&String::from_utf8_lossy(part.contents()));
            }
            ("text", "calendar" | "x-vcalendar") | ("application", "ics" | "calendar") => {
                push_calendar(summary, part);
            }
            ("application", "ms-tnef" | "vnd.ms-tnef") => summary.has_tnef = true,
            _ if filename == "winmail.dat" => summary.has_tnef = true,
            _ if filename.ends_with(".ics") || filename.ends_with(".vcs") => push_calendar(summary, part),
            ("text", "plain" | "html") if part.text_contents().is_some_and(|t| !t.trim().is_empty()) => {
                summary.has_text = true;
                if !nested && summary.first_text.is_none() {
                    summary.first_text = part.text_contents().map(|t| t.chars().take(MAX_REPORT_TEXT).collect());
                }
            }
            _ => {}
        }
    }
    match status {
        Some(status) => {
            summary.report = Some(Report {
                status,
                returned_calendars: returned,
                returned_message_ids: returned_ids.into_iter().take(4).collect(),
                loose: false,
            })
        }
        // A report whose status part says nothing (Google Workspace): what
        // it returns is kept for `loose_report`.
        None if !nested => {
            summary.carried_calendars.extend(returned);
            summary.carried_message_ids.extend(returned_ids);
        }
        None => {}
    }
    Ok(())
}

fn push_calendar(summary: &mut MessageSummary, part: &mail_parser::MessagePart<'_>) {
    if summary.calendars.len() >= MAX_CALENDAR_PARTS {
        return;
    }
    let method_param = part
        .content_type()
        .and_then(|ct| ct.attribute("method"))
        .map(|m| m.trim().to_ascii_uppercase());
    let charset = part
        .content_type()
        .and_then(|ct| ct.attribute("charset"))
        .map(|c| c.to_ascii_lowercase());
    let text = match &part.body {
        PartType::Text(t) | PartType::Html(t) => Some(t.to_string()),
        PartType::Binary(b) | PartType::InlineBinary(b) => decode_bytes(b, charset.as_deref()),
        _ => None,
    };
    match text {
        Some(t) => summary.calendars.push(CalendarPart {
            method_param,
            text: t.strip_prefix('\u{feff}').map(str::to_owned).unwrap_or(t),
        }),
        None => summary.undecodable.push(format!(
            "a calendar attachment is not text in charset {}",
            charset.as_deref().unwrap_or("utf-8")
        )),
    }
}

/// Decodes an attachment's bytes: UTF-8 unless the part says a Latin charset.
fn decode_bytes(bytes: &[u8], charset: Option<&str>) -> Option<String> {
    match charset {
        Some("iso-8859-1" | "latin1" | "iso-8859-15" | "windows-1252" | "cp1252") => {
            Some(bytes.iter().map(|&b| b as char).collect())
        }
        _ => String::from_utf8(bytes.to_vec()).ok(),
    }
}

/// Reads the per-recipient groups of a delivery-status body (RFC 3464) and
/// returns the first failed one, or else the first one with an Action.
pub fn parse_delivery_status(body: &str) -> Option<DeliveryStatus> {
    let mut groups: Vec<DeliveryStatus> = Vec::new();
    let mut current = DeliveryStatus::default();
    let mut last_field: Option<String> = None;
    let mut original_seen = false;
    let flush = |current: &mut DeliveryStatus, groups: &mut Vec<DeliveryStatus>| {
        if !current.action.is_empty() {
            groups.push(std::mem::take(current));
        } else {
            *current = DeliveryStatus::default();
        }
    };
    for line in body.lines().take(10_000) {
        if line.trim().is_empty() {
            flush(&mut current, &mut groups);
            last_field = None;
            original_seen = false;
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(field) = &last_field {
                let extra = line.trim();
                let slot = match field.as_str() {
                    "diagnostic-code" => current.diagnostic.as_mut(),
                    _ => None,
                };
                if let Some(v) = slot {
                    v.push(' ');
                    v.push_str(extra);
                    truncate(v);
                }
            }
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim().to_ascii_lowercase();
        let value = value.trim();
        let after_type = |v: &str| v.split_once(';').map(|(_, a)| a.trim()).unwrap_or(v).to_owned();
        // Some reports write their per-recipient groups back to back with no
        // blank line: a recipient line after the fields of one starts another.
        // Either recipient line may come first (Postfix writes Final first).
        let described = !current.action.is_empty() || current.status.is_some();
        let new_group = match name.as_str() {
            "original-recipient" => described || original_seen,
            // Exim writes Action before Final-Recipient: only a second
            // recipient line starts another group.
            "final-recipient" => current.final_recipient.is_some(),
            _ => false,
        };
        if new_group {
            flush(&mut current, &mut groups);
            original_seen = false;
        }
        match name.as_str() {
            "original-recipient" => original_seen = true,
            "action" => current.action = value.to_ascii_lowercase().chars().take(32).collect(),
            "status" => current.status = Some(value.chars().take(32).collect()),
            "final-recipient" => current.final_recipient = Some(clip(after_type(value))),
            "diagnostic-code" => current.diagnostic = Some(clip(after_type(value))),
            _ => {}
        }
        last_field = Some(name);
    }
    flush(&mut current, &mut groups);
    let first_failed = groups.iter().position(|g| g.action == "failed");
    match first_failed {
        Some(i) => Some(groups.swap_remove(i)),
        None => groups.into_iter().next(),
    }
}

fn clip(mut s: String) -> String {
    truncate(&mut s);
    s
}

fn truncate(s: &mut String) {
    if s.len() > MAX_FIELD_LEN {
        let mut end = MAX_FIELD_LEN;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// Base64 with padding (RFC 4648), as MIME and HTTP basic authentication write it.
pub fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_status_picks_failed_group() {
        let body = "Reporting-MTA: dns; mx.example.com\r\n\r\nFinal-Recipient: rfc822; ok@example.com\r\nAction: delivered\r\nStatus: 2.0.0\r\n\r\nFinal-Recipient: rfc822; bob@example.com\r\nAction: failed\r\nStatus: 5.1.1\r\nDiagnostic-Code: smtp; 550 5.1.1 <bob@example.com>:\r\n    Recipient address rejected\r\n";
        let s = parse_delivery_status(body).unwrap();
        assert_eq!(s.action, "failed");
        assert_eq!(s.status.as_deref(), Some("5.1.1"));
        assert_eq!(s.final_recipient.as_deref(), Some("bob@example.com"));
        assert_eq!(
            s.diagnostic.as_deref(),
            Some("550 5.1.1 <bob@example.com>: Recipient address rejected")
        );
    }

    #[test]
    fn groups_without_blank_lines_between_them() {
        let body = "Reporting-MTA: dns; groupware.example.net\r\n\r\nOriginal-Recipient: rfc822;carol@example.net\r\nFinal-recipient: rfc822;carol@example.net\r\nAction: failed\r\nStatus: 5.1.1\r\nFinal-recipient: rfc822;dave@example.net\r\nAction: delivered\r\nStatus: 2.0.0\r\nOriginal-Recipient: rfc822;erin@example.net\r\nFinal-Recipient: rfc822;erin@example.net\r\nAction: delayed\r\n";
        let s = parse_delivery_status(body).unwrap();
        assert_eq!(s.action, "failed");
        assert_eq!(s.final_recipient.as_deref(), Some("carol@example.net"));
        assert_eq!(s.status.as_deref(), Some("5.1.1"));
        // The failed block last: found all the same.
        let body = "Final-Recipient: rfc822;dave@example.net\nAction: delivered\nFinal-Recipient: rfc822;carol@example.net\nAction: failed\nStatus: 5.2.2\n";
        let s = parse_delivery_status(body).unwrap();
        assert_eq!(
            (s.final_recipient.as_deref(), s.status.as_deref()),
            (Some("carol@example.net"), Some("5.2.2"))
        );
    }

    #[test]
    fn delivery_status_without_action_is_none() {
        assert_eq!(parse_delivery_status("Reporting-MTA: dns; x\n\n"), None);
    }

    #[test]
    fn latin1_attachment() {
        assert_eq!(
            decode_bytes(b"Z\xfcrich", Some("iso-8859-1")).as_deref(),
            Some("Zürich")
        );
        assert_eq!(decode_bytes(b"Z\xfcrich", None), None);
    }

    #[test]
    fn base64_with_padding() {
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(base64(b"ab"), "YWI=");
    }
}
