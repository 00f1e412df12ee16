//! Reading and validating iTIP (RFC 5546) calendar data.

use calcard::{
    icalendar::{
        ICalendar, ICalendarComponent, ICalendarComponentType, ICalendarEntry, ICalendarMethod, ICalendarParameterName,
        ICalendarProperty, ICalendarValue, Uri,
    },
    Entry,
};

/// The facts of one iTIP object that routing and the target need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Itip {
    /// METHOD, upper case (older groupware writes `reply`).
    pub method: Option<String>,
    pub uid: Option<String>,
    /// The first ATTENDEE as a `mailto:` URI with the scheme in lower case.
    pub attendee: Option<String>,
    pub partstat: Option<String>,
    pub organizer: Option<String>,
    /// The ORGANIZER's EMAIL parameter: her real address where the value is
    /// a tokenized gateway address (CalendarServer writes it so).
    pub organizer_email: Option<String>,
    /// Number of scheduling components (VEVENT, VTODO, VJOURNAL).
    pub components: usize,
    /// Every distinct UID of the scheduling components, in order.
    pub uids: Vec<String>,
    /// Every distinct ATTENDEE of the scheduling components, in order, as
    /// `mailto:` URIs (scheme in lower case).
    pub attendees: Vec<String>,
    /// The most ATTENDEE properties any one scheduling component holds.
    pub most_attendees: usize,
}

/// Reads calendar text. Err is a sentence saying why it cannot be read.
pub fn read(text: &str, method_param: Option<&str>) -> Result<Itip, String> {
    check_structure(text)?;
    let cal = ICalendar::parse(text).map_err(|e| describe(&e))?;
    let root = cal
        .components
        .first()
        .filter(|c| c.component_type == ICalendarComponentType::VCalendar)
        .ok_or_else(|| "the calendar data does not start with BEGIN:VCALENDAR".to_owned())?;
    let method = root
        .property(&ICalendarProperty::Method)
        .and_then(first_text)
        .or(method_param)
        .map(|m| m.trim().to_ascii_uppercase());

    let scheduling: Vec<&ICalendarComponent> = cal
        .components
        .iter()
        .filter(|c| {
            matches!(
                c.component_type,
                ICalendarComponentType::VEvent | ICalendarComponentType::VTodo | ICalendarComponentType::VJournal
            )
        })
        .collect();
    let first = scheduling.first();
    let uid = first.and_then(|c| c.uid()).map(str::to_owned);
    let attendee_entry = first.and_then(|c| c.property(&ICalendarProperty::Attendee));
    let attendee = attendee_entry.and_then(first_text).map(normalise_mailto);
    let partstat = attendee_entry
        .and_then(|e| e.parameter(&ICalendarParameterName::Partstat))
        .and_then(|p| p.as_text())
        .map(|p| p.to_ascii_uppercase());
    let organizer_entry = first.and_then(|c| c.property(&ICalendarProperty::Organizer));
    let organizer = organizer_entry.and_then(first_text).map(normalise_mailto);
    let organizer_email = organizer_entry
        .and_then(|e| e.parameter(&ICalendarParameterName::Email))
        .and_then(|p| p.as_text())
        .map(|e| e.trim().to_owned());
    // Hashed sets: a hostile reply may list 100 000 attendees.
    let mut uids = Distinct::exact();
    let mut attendees = Distinct::any_case();
    let mut most_attendees = 0;
    for c in &scheduling {
        // Exactly one UID, as text; anything else binds to no event ("").
        let mut found = c.properties(&ICalendarProperty::Uid);
        let u = match (found.next().and_then(first_text), found.next()) {
            (Some(u), None) => u,
            _ => "",
        };
        uids.add(u.to_owned());
        let mut here = 0;
        for a in c.properties(&ICalendarProperty::Attendee).filter_map(first_text) {
            attendees.add(normalise_mailto(a));
            here += 1;
        }
        most_attendees = most_attendees.max(here);
    }
    Ok(Itip {
        method,
        uid,
        attendee,
        partstat,
        organizer,
        organizer_email,
        components: scheduling.len(),
        uids: uids.list,
        attendees: attendees.list,
        most_attendees,
    })
}

/// Values in the order first seen, each once; O(1) per value.
struct Distinct {
    list: Vec<String>,
    seen: std::collections::HashSet<String>,
    /// Addresses compare without regard to ASCII case; UIDs exactly.
    fold_case: bool,
}

impl Distinct {
    fn exact() -> Self {
        Self {
            list: Vec::new(),
            seen: Default::default(),
            fold_case: false,
        }
    }

    fn any_case() -> Self {
        Self {
            fold_case: true,
            ..Self::exact()
        }
    }

    fn add(&mut self, value: String) {
        let key = match self.fold_case {
            true => value.to_ascii_lowercase(),
            false => value.clone(),
        };
        if self.seen.insert(key) {
            self.list.push(value);
        }
    }
}

/// Nesting depth beyond any real calendar (VCALENDAR > VEVENT > VALARM > ...).
const MAX_DEPTH: usize = 16;

/// BEGIN/END balance. calcard's parser is lenient and would take a cut-off
/// object as complete; a truncated reply must be refused, not half-applied.
fn check_structure(text: &str) -> Result<(), String> {
    let mut stack: Vec<String> = Vec::new();
    let mut seen = false;
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(name) = strip_prefix_ci(line, "BEGIN:") {
            if stack.len() >= MAX_DEPTH {
                return Err("the calendar data is nested too deeply".into());
            }
            stack.push(name.trim().to_ascii_uppercase());
            seen = true;
        } else if let Some(name) = strip_prefix_ci(line, "END:") {
            let name = name.trim().to_ascii_uppercase();
            match stack.pop() {
                Some(open) if open == name => {
                    if stack.is_empty() {
                        return Ok(()); // what follows the object is not ours to judge
                    }
                }
                Some(open) => {
                    return Err(format!(
                        "the calendar data is damaged (END:{} where END:{} was expected)",
                        clip(&name),
                        clip(&open)
                    ))
                }
                None => {
                    return Err(format!(
                        "the calendar data is damaged (END:{} without BEGIN)",
                        clip(&name)
                    ))
                }
            }
        }
    }
    match stack.first() {
        Some(_) => Err(format!(
            "the calendar data is truncated (BEGIN:{} has no END)",
            clip(stack.last().map(String::as_str).unwrap_or(""))
        )),
        None if !seen => Err("the calendar data holds no VCALENDAR object".into()),
        None => Ok(()),
    }
}

fn strip_prefix_ci<'a>(line: &'a str, prefix: &str) -> Option<&'a str> {
    match line.get(..prefix.len()) {
        Some(p) if p.eq_ignore_ascii_case(prefix) => Some(&line[prefix.len()..]),
        _ => None,
    }
}

fn clip(s: &str) -> String {
    s.chars().take(30).filter(|c| !c.is_control()).collect()
}

/// A REPLY made ready for the organizer's server, as CalendarServer's mail
/// gateway does, and bounded by the token: only components that answer for
/// `attendee` are kept, and in them only that ATTENDEE; components about
/// anybody else are dropped (never applied as that person's answer). The real
/// ORGANIZER is put back (this also repairs Outlook replies without one),
/// STATUS is dropped, METHOD is upper case (COUNTER and REFRESH kept,
/// anything else REPLY), a missing PRODID is added.
pub struct Rewritten {
    pub text: String,
    /// ATTENDEE values of the components dropped, for the log and `queue show`.
    pub dropped: Vec<String>,
}

pub fn rewrite_reply(text: &str, organizer: &str, attendee: &str) -> Result<Rewritten, String> {
    check_structure(text)?;
    let mut cal = ICalendar::parse(text).map_err(|e| describe(&e))?;
    if cal.components.first().map(|c| &c.component_type) != Some(&ICalendarComponentType::VCalendar) {
        return Err("the calendar data does not start with BEGIN:VCALENDAR".into());
    }
    let is = |e: &ICalendarEntry| first_text(e).is_some_and(|v| normalise_mailto(v).eq_ignore_ascii_case(attendee));
    let mut dropped = Distinct::any_case();
    // Components are a flat list; the VCALENDAR's children are indexes into it.
    let mut remove: Vec<u32> = Vec::new();
    for (i, comp) in cal.components.iter().enumerate() {
        if is_scheduling(&comp.component_type)
            && !comp
                .entries
                .iter()
                .any(|e| e.name == ICalendarProperty::Attendee && is(e))
        {
            for a in comp.properties(&ICalendarProperty::Attendee).filter_map(first_text) {
                dropped.add(normalise_mailto(a));
            }
            remove.push(i as u32);
        }
    }
    cal.remove_component_ids(&remove);
    if !cal.components.iter().any(|c| is_scheduling(&c.component_type)) {
        return Err(format!("the reply does not answer for {attendee}"));
    }
    for comp in cal.components.iter_mut() {
        match comp.component_type {
            ICalendarComponentType::VCalendar => {
                // An attendee's other iTIP messages keep their method; anything
                // else leaves as the REPLY it was taken for.
                for e in comp.entries.iter_mut().filter(|e| e.name == ICalendarProperty::Method) {
                    let attendees_own = matches!(
                        e.values.first(),
                        Some(ICalendarValue::Method(
                            ICalendarMethod::Counter | ICalendarMethod::Refresh
                        ))
                    );
                    if !attendees_own {
                        e.values = vec![ICalendarValue::Method(ICalendarMethod::Reply)];
                    }
                }
                if !comp.entries.iter().any(|e| e.name == ICalendarProperty::Prodid) {
                    comp.entries.insert(
                        0,
                        ICalendarEntry {
                            name: ICalendarProperty::Prodid,
                            params: Vec::new(),
                            values: vec![ICalendarValue::Text("-//imip-milter//NONSGML imip-milter//EN".into())],
                        },
                    );
                }
            }
            ref t if is_scheduling(t) => {
                comp.entries.retain(|e| e.name != ICalendarProperty::Status);
                comp.entries.retain(|e| e.name != ICalendarProperty::Attendee || is(e));
                let org = ICalendarValue::Uri(Uri::Location(organizer.to_owned()));
                let mut seen = false;
                comp.entries.retain_mut(|e| {
                    if e.name != ICalendarProperty::Organizer {
                        return true;
                    }
                    if seen {
                        return false;
                    }
                    seen = true;
                    e.values = vec![org.clone()];
                    // CN stays; EMAIL or SENT-BY of the tokenized address would mislead.
                    e.params.retain(|p| p.name == ICalendarParameterName::Cn);
                    true
                });
                if !seen {
                    comp.entries.push(ICalendarEntry {
                        name: ICalendarProperty::Organizer,
                        params: Vec::new(),
                        values: vec![org],
                    });
                }
            }
            _ => {}
        }
    }
    let text = cal.to_string();
    // What we hand on must read back; calcard writes some garbage it took
    // in (control characters in component names) in a form it cannot read.
    let back = read(&text, None).map_err(|e| format!("the calendar data cannot be rewritten: {e}"))?;
    // The token's bound must hold in what we hand on, whatever the writer did.
    if back.attendees.len() != 1 || !back.attendees.iter().all(|a| a.eq_ignore_ascii_case(attendee)) {
        return Err("the calendar data cannot be rewritten for one attendee".into());
    }
    Ok(Rewritten {
        text,
        dropped: dropped.list,
    })
}

fn is_scheduling(t: &ICalendarComponentType) -> bool {
    matches!(
        t,
        ICalendarComponentType::VEvent | ICalendarComponentType::VTodo | ICalendarComponentType::VJournal
    )
}

/// CalendarServer's answer to a bounced invitation: a REPLY from the
/// attendee with REQUEST-STATUS 5.1, for the organizer's server.
pub fn bounce_reply(organizer: &str, attendee: &str, uid: &str, now: chrono::DateTime<chrono::Utc>) -> String {
    let clean = |s: &str| s.chars().filter(|c| !c.is_control()).collect::<String>();
    format!(
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//imip-milter//NONSGML imip-milter//EN\r\nMETHOD:REPLY\r\n\
         BEGIN:VEVENT\r\nUID:{}\r\nDTSTAMP:{}\r\nORGANIZER:{}\r\nATTENDEE:{}\r\n\
         REQUEST-STATUS:5.1;Service unavailable\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n",
        clean(uid),
        now.format("%Y%m%dT%H%M%SZ"),
        clean(organizer),
        clean(attendee)
    )
}

fn first_text(entry: &ICalendarEntry) -> Option<&str> {
    entry.values.first().and_then(|v| v.as_text())
}

/// `MAILTO:Bob@Example.com` → `mailto:Bob@Example.com`; a bare address gains the scheme.
pub fn normalise_mailto(value: &str) -> String {
    let v = value.trim();
    match v.get(..7) {
        Some(s) if s.eq_ignore_ascii_case("mailto:") => format!("mailto:{}", &v[7..]),
        _ if v.contains('@') && !v.contains(':') => format!("mailto:{v}"),
        _ => v.to_owned(),
    }
}

fn describe(entry: &Entry) -> String {
    match entry {
        Entry::UnterminatedComponent(name) => {
            format!("the calendar data is truncated (BEGIN:{name} has no END)")
        }
        Entry::UnexpectedComponentEnd { expected, found } => format!(
            "the calendar data is damaged (END:{} where END:{} was expected)",
            found.as_str(),
            expected.as_str()
        ),
        Entry::InvalidLine(line) => {
            let shown: String = line.chars().take(60).filter(|c| !c.is_control()).collect();
            format!("the calendar data has a line that cannot be read: \"{shown}\"")
        }
        Entry::TooManyComponents => "the calendar data has too many components".to_owned(),
        Entry::VCard(_) => "the attachment is a contact card, not calendar data".to_owned(),
        _ => "the calendar data holds no VCALENDAR object".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPLY: &str = "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Test//EN\r\nMETHOD:reply\r\nBEGIN:VEVENT\r\nUID:abc-123\r\nDTSTAMP:20261120T100000Z\r\nDTSTART:20261201T090000Z\r\nORGANIZER;CN=\"Doe, Alice\":mailto:alice@example.org\r\nATTENDEE;PARTSTAT=ACCEPTED;CN=Bob:MAILTO:bob@example.com\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n";

    #[test]
    fn reads_reply() {
        let i = read(REPLY, None).unwrap();
        assert_eq!(i.method.as_deref(), Some("REPLY"));
        assert_eq!(i.uid.as_deref(), Some("abc-123"));
        assert_eq!(i.attendee.as_deref(), Some("mailto:bob@example.com"));
        assert_eq!(i.partstat.as_deref(), Some("ACCEPTED"));
        assert_eq!(i.organizer.as_deref(), Some("mailto:alice@example.org"));
        assert_eq!(i.components, 1);
    }

    #[test]
    fn method_from_content_type_when_missing() {
        let text = REPLY.replace("METHOD:reply\r\n", "");
        assert_eq!(read(&text, Some("reply")).unwrap().method.as_deref(), Some("REPLY"));
        assert_eq!(read(&text, None).unwrap().method, None);
    }

    #[test]
    fn rewrite_keeps_the_tokens_attendee_and_restores_the_organizer() {
        let tokenized = REPLY
            .replace(
                "ORGANIZER;CN=\"Doe, Alice\":mailto:alice@example.org",
                "ORGANIZER;CN=\"Doe, Alice\":mailto:calendar+tok12345@example.org",
            )
            .replace(
                "ATTENDEE;PARTSTAT",
                "STATUS:CONFIRMED\r\nATTENDEE;PARTSTAT=DECLINED:mailto:eve@example.com\r\nATTENDEE;PARTSTAT",
            );
        let r = rewrite_reply(&tokenized, "mailto:alice@example.org", "mailto:bob@example.com").unwrap();
        assert!(r.dropped.is_empty());
        let i = read(&r.text, None).unwrap();
        assert_eq!(i.method.as_deref(), Some("REPLY"));
        assert_eq!(i.organizer.as_deref(), Some("mailto:alice@example.org"));
        assert_eq!(i.attendee.as_deref(), Some("mailto:bob@example.com"));
        assert!(!r.text.contains("eve@example.com"), "{}", r.text);
        assert!(!r.text.contains("STATUS:CONFIRMED"), "{}", r.text);
        assert!(!r.text.contains("calendar+tok"), "{}", r.text);
        assert!(r.text.contains("CN=\"Doe, Alice\""), "quotes survive: {}", r.text);
    }

    #[test]
    fn rewrite_adds_a_missing_organizer() {
        let no_org: String = REPLY
            .lines()
            .filter(|l| !l.starts_with("ORGANIZER") && !l.starts_with("PRODID"))
            .map(|l| format!("{l}\r\n"))
            .collect();
        let r = rewrite_reply(&no_org, "mailto:alice@example.org", "mailto:bob@example.com").unwrap();
        assert!(r.text.contains("PRODID:"), "{}", r.text);
        assert_eq!(
            read(&r.text, None).unwrap().organizer.as_deref(),
            Some("mailto:alice@example.org")
        );
    }

    #[test]
    fn rewrite_keeps_only_the_tokens_attendees_components() {
        // Bob's master answer, and an override that answers for Dana.
        let two = REPLY.replace(
            "END:VEVENT\r\n",
            "END:VEVENT\r\nBEGIN:VEVENT\r\nUID:abc-123\r\nRECURRENCE-ID:20261208T090000Z\r\nDTSTAMP:20261120T100000Z\r\nATTENDEE;PARTSTAT=DECLINED:mailto:dana@example.com\r\nEND:VEVENT\r\n",
        );
        let i = read(&two, None).unwrap();
        assert_eq!(i.attendees, ["mailto:bob@example.com", "mailto:dana@example.com"]);
        let r = rewrite_reply(&two, "mailto:alice@example.org", "mailto:bob@example.com").unwrap();
        assert_eq!(r.dropped, ["mailto:dana@example.com"]);
        assert!(!r.text.contains("dana@example.com"), "{}", r.text);
        assert_eq!(read(&r.text, None).unwrap().components, 1);
        // Nothing for the token's attendee at all: no reply to hand on.
        let err = rewrite_reply(&two, "mailto:alice@example.org", "mailto:carol@example.com");
        assert!(err.is_err());
    }

    #[test]
    fn bounce_becomes_a_reply_with_request_status() {
        let now = chrono::DateTime::from_timestamp(1_790_000_000, 0).unwrap();
        let t = bounce_reply(
            "mailto:alice@example.org",
            "mailto:bob@gone.example",
            "u-1\r\nX:evil",
            now,
        );
        let i = read(&t, None).unwrap();
        assert_eq!(i.method.as_deref(), Some("REPLY"));
        assert_eq!(i.uid.as_deref(), Some("u-1X:evil"));
        assert!(t.contains("REQUEST-STATUS:5.1;Service unavailable"));
    }

    #[test]
    fn rewrite_refuses_what_read_refuses() {
        // Found by fuzz/run itip: a bare VEVENT was rewritten into something unreadable.
        let bare = "BEGIN:VEVENT\r\nUID:x\r\nATTENDEE;PARTSTAT=ACCEPTED:mailto:b@example.com\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n";
        assert!(read(bare, None).is_err());
        assert!(rewrite_reply(bare, "mailto:a@example.org", "mailto:b@example.com").is_err());
    }

    #[test]
    fn truncated() {
        let cut = &REPLY[..REPLY.find("END:VEVENT").unwrap()];
        let err = read(cut, None).unwrap_err();
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn not_calendar() {
        assert!(read("hello world", None).is_err());
        assert!(read("", None).is_err());
    }
}
