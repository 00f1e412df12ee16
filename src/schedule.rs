//! Applying an iTIP REPLY to the organizer's stored calendar object (RFC 5546
//! §3.2.3), for targets that write the calendar themselves (caldav).
//!
//! calcard reads both objects; the stored one is edited as text, line by
//! line, so that every byte not about the replying attendee survives.
//!
//! Longer than 700 lines: a third of it is unit tests; the rest is one
//! algorithm (a REPLY applied to a stored object) best read in one place.

use calcard::{
    common::timezone::Tz,
    icalendar::{ICalendar, ICalendarComponentType, ICalendarEntry, ICalendarParameterName, ICalendarProperty},
};
use chrono::{NaiveDate, TimeZone};
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    str::FromStr,
};

/// Remembers, on the ATTENDEE, the DTSTAMP of the reply last applied: a reply
/// with the same SEQUENCE and an older DTSTAMP is stale.
const STAMP_PARAM: &str = "X-IMIP-MILTER-DTSTAMP";

/// What to do with a reply from someone who is not an attendee.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crashers {
    Refuse,
    Record,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The new text of the calendar object.
    Changed(String),
    /// Nothing to write; why.
    Unchanged(String),
}

/// One instance the reply answers for.
#[derive(Debug, Clone)]
struct Answer {
    recurrence_id: Option<i64>,
    recurrence_line: Option<String>,
    attendee: String,
    /// None for a bounce: it records a delivery failure, not an answer.
    partstat: Option<String>,
    delegated_to: Option<String>,
    delegated_from: Option<String>,
    request_status: Option<String>,
    sequence: i64,
    dtstamp: String,
    /// The attendee's comment: X-RESPONSE-COMMENT on her ATTENDEE, else the
    /// component's COMMENT (Thunderbird); made a safe parameter value.
    comment: Option<String>,
    /// X-NUM-GUESTS (Google): how many she brings.
    guests: Option<String>,
}

/// The longest comment carried onto the organizer's copy.
const MAX_COMMENT: usize = 300;

/// Text from a reply as a parameter value: one line, no DQUOTE (a value
/// cannot hold one, RFC 5545 §3.1), no control characters, bounded.
fn param_text(text: &str) -> Option<String> {
    let clean: String = text
        .chars()
        .map(|c| match c {
            '"' => '\'',
            c if c.is_control() => ' ',
            c => c,
        })
        .take(MAX_COMMENT)
        .collect();
    let clean = clean.split_whitespace().collect::<Vec<_>>().join(" ");
    (!clean.is_empty()).then_some(clean)
}

/// A parameter's value on a property line as written, without quotes.
fn param_of(line: &str, name: &str) -> Option<String> {
    let (_, ps) = params(line);
    ps.iter().find_map(|p| {
        let (n, v) = p.split_once('=')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim_matches('"').to_owned())
    })
}

/// A stored VEVENT/VTODO: its line range and what matching needs.
#[derive(Debug, Clone)]
struct Block {
    begin: usize,
    end: usize,
    recurrence_id: Option<i64>,
    sequence: i64,
}

/// The instant of a DATE or DATE-TIME property, seconds since the epoch
/// (floating times and dates taken as UTC).
fn instant(e: &ICalendarEntry) -> Option<i64> {
    let dt = e.values.first()?.as_partial_date_time()?;
    let date = NaiveDate::from_ymd_opt(i32::from(dt.year?), u32::from(dt.month?), u32::from(dt.day?))?;
    let naive = date.and_hms_opt(
        u32::from(dt.hour.unwrap_or(0)),
        u32::from(dt.minute.unwrap_or(0)),
        u32::from(dt.second.unwrap_or(0)),
    )?;
    if let Some(h) = dt.tz_hour {
        let off = i64::from(h) * 3600 + i64::from(dt.tz_minute.unwrap_or(0)) * 60;
        let off = if dt.tz_minus { -off } else { off };
        return Some(naive.and_utc().timestamp() - off);
    }
    let tzid = e.parameter(&ICalendarParameterName::Tzid).and_then(|p| p.as_text());
    match tzid.and_then(|id| Tz::from_str(id).ok()) {
        Some(Tz::Tz(tz)) => tz.from_local_datetime(&naive).earliest().map(|d| d.timestamp()),
        Some(Tz::Fixed(off)) => off.from_local_datetime(&naive).earliest().map(|d| d.timestamp()),
        _ => Some(naive.and_utc().timestamp()),
    }
}

fn text_of(e: &ICalendarEntry) -> Option<String> {
    e.values.first().and_then(|v| v.as_text()).map(str::to_owned)
}

/// A property's value as written (UTC DATE-TIMEs compare as text).
fn raw_value(e: &ICalendarEntry) -> String {
    let mut s = String::new();
    let _ = e.write_to(&mut s);
    value_of(s.replace("\r\n ", "").trim_end()).to_owned()
}

fn mailto(v: &str) -> String {
    crate::itip::normalise_mailto(v).to_ascii_lowercase()
}

fn answers(reply: &str) -> Result<Vec<Answer>, String> {
    let cal = ICalendar::parse(reply).map_err(|_| "the reply cannot be read".to_owned())?;
    let mut out = Vec::new();
    for c in &cal.components {
        if !matches!(
            c.component_type,
            ICalendarComponentType::VEvent | ICalendarComponentType::VTodo
        ) {
            continue;
        }
        let Some(att) = c.property(&ICalendarProperty::Attendee) else {
            continue;
        };
        let param = |n: ICalendarParameterName| att.parameter(&n).and_then(|p| p.as_text()).map(str::to_owned);
        let rid = c.property(&ICalendarProperty::RecurrenceId);
        let mut att_line = String::new();
        let _ = att.write_to(&mut att_line);
        let att_line = att_line.replace("\r\n ", "").replace("\r\n\t", "");
        let att_line = att_line.trim_end();
        let comment = param_of(att_line, "X-RESPONSE-COMMENT")
            .or_else(|| c.property(&ICalendarProperty::Comment).and_then(text_of))
            .and_then(|t| param_text(&t));
        let guests = param_of(att_line, "X-NUM-GUESTS")
            .filter(|g| !g.is_empty() && g.len() <= 4 && g.bytes().all(|b| b.is_ascii_digit()));
        out.push(Answer {
            recurrence_id: rid.and_then(instant),
            recurrence_line: rid.map(|e| {
                let mut s = String::new();
                let _ = e.write_to(&mut s);
                s
            }),
            attendee: text_of(att).map(|a| mailto(&a)).unwrap_or_default(),
            partstat: param(ICalendarParameterName::Partstat).map(|p| p.to_ascii_uppercase()),
            delegated_to: param(ICalendarParameterName::DelegatedTo),
            delegated_from: param(ICalendarParameterName::DelegatedFrom),
            request_status: c
                .property(&ICalendarProperty::RequestStatus)
                .and_then(text_of)
                .and_then(|s| s.split(';').next().map(str::to_owned)),
            sequence: c
                .property(&ICalendarProperty::Sequence)
                .and_then(|e| e.values.first())
                .and_then(|v| v.as_integer())
                .unwrap_or(0),
            dtstamp: c
                .property(&ICalendarProperty::Dtstamp)
                .map(raw_value)
                .unwrap_or_default(),
            comment,
            guests,
        });
    }
    if out.is_empty() {
        return Err("the reply holds no ATTENDEE".into());
    }
    Ok(out)
}

/// Logical lines: (first physical line, one past the last, unfolded text).
fn logical_lines(lines: &[&str]) -> Vec<(usize, usize, String)> {
    let mut out: Vec<(usize, usize, String)> = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let body = l.trim_end_matches(['\r', '\n']);
        match out.last_mut() {
            Some(last) if l.starts_with([' ', '\t']) => {
                last.1 = i + 1;
                last.2.push_str(&body[1..]);
            }
            _ => out.push((i, i + 1, body.to_owned())),
        }
    }
    out
}

fn name_of(line: &str) -> String {
    line.split([';', ':']).next().unwrap_or("").to_ascii_uppercase()
}

/// The value of a logical line: after the first colon outside quotes.
fn value_of(line: &str) -> &str {
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ':' if !quoted => return &line[i + 1..],
            _ => {}
        }
    }
    ""
}

fn blocks(stored: &ICalendar, logical: &[(usize, usize, String)]) -> Vec<Block> {
    let _ = stored;
    let mut out = Vec::new();
    let mut depth = 0;
    let mut current: Option<Block> = None;
    for (idx, (_, _, l)) in logical.iter().enumerate() {
        let upper = l.to_ascii_uppercase();
        if upper.starts_with("BEGIN:") {
            depth += 1;
            if depth == 2 && (upper == "BEGIN:VEVENT" || upper == "BEGIN:VTODO") {
                current = Some(Block {
                    begin: idx,
                    end: idx,
                    recurrence_id: None,
                    sequence: 0,
                });
            }
        } else if upper.starts_with("END:") {
            if depth == 2 {
                if let Some(mut b) = current.take() {
                    b.end = idx;
                    out.push(b);
                }
            }
            depth -= 1;
        } else if depth == 2 {
            if let Some(b) = current.as_mut() {
                match name_of(l).as_str() {
                    "RECURRENCE-ID" => {
                        let text = format!("BEGIN:VCALENDAR\r\nBEGIN:VEVENT\r\n{l}\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n");
                        b.recurrence_id = ICalendar::parse(&text).ok().and_then(|c| {
                            c.components
                                .iter()
                                .find_map(|c| c.property(&ICalendarProperty::RecurrenceId).and_then(instant))
                        });
                    }
                    "SEQUENCE" => b.sequence = value_of(l).trim().parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
    }
    out
}

/// Parameters of a logical line, as (NAME, raw "NAME=value").
fn params(line: &str) -> (String, Vec<String>) {
    let head_end = line.len() - value_of(line).len() - usize::from(!value_of(line).is_empty() || line.ends_with(':'));
    let head = &line[..head_end.min(line.len())];
    let mut parts = Vec::new();
    let mut quoted = false;
    let mut start = 0;
    for (i, c) in head.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ';' if !quoted => {
                parts.push(head[start..i].to_owned());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(head[start..].to_owned());
    let name = parts.remove(0);
    (name, parts)
}

fn set_param(params: &mut Vec<String>, name: &str, value: Option<&str>) {
    params.retain(|p| !p.split('=').next().unwrap_or("").eq_ignore_ascii_case(name));
    if let Some(v) = value {
        let needs_quotes = v.contains([':', ';', ',']) && !v.starts_with('"');
        params.push(if needs_quotes {
            format!("{name}=\"{v}\"")
        } else {
            format!("{name}={v}")
        });
    }
}

fn get_param<'a>(params: &'a [String], name: &str) -> Option<&'a str> {
    params.iter().find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.eq_ignore_ascii_case(name).then_some(v.trim_matches('"'))
    })
}

fn fold(line: &str, eol: &str) -> String {
    let mut out = String::with_capacity(line.len() + 8);
    let mut width = 0;
    for c in line.chars() {
        if width + c.len_utf8() > 75 {
            out.push_str(eol);
            out.push(' ');
            width = 1;
        }
        out.push(c);
        width += c.len_utf8();
    }
    out.push_str(eol);
    out
}

/// What applying one reply may make of the stored object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Growth {
    /// Overrides the reply may create (instances it answers for that the
    /// object holds no component of yet).
    pub new_overrides: usize,
    /// Bytes the object written may have.
    pub object_bytes: usize,
}

/// Overrides one reply may create by default (`target.max_new_overrides`).
pub const DEFAULT_MAX_NEW_OVERRIDES: usize = 100;

impl Growth {
    /// The object written may at most double, and grow by 64 KiB when it is
    /// small; never past what the target reads back (`max_response_bytes`).
    pub fn for_object(stored_bytes: usize, new_overrides: usize, max_response_bytes: usize) -> Self {
        let grown = stored_bytes.saturating_add(stored_bytes.max(64 * 1024));
        Self {
            new_overrides,
            object_bytes: grown.min(max_response_bytes),
        }
    }
}

/// Properties a new override carries: what places the instance and what
/// scheduling needs of it. Description, attachments, alarms and the rest
/// stay with the master; copied into every override, one reply answering
/// a thousand instances would multiply the object.
const OVERRIDE_KEEPS: &[&str] = &[
    "UID",
    "DTSTAMP",
    "SEQUENCE",
    "ORGANIZER",
    "ATTENDEE",
    "SUMMARY",
    "LOCATION",
    "STATUS",
    "TRANSP",
    "CLASS",
];

/// Applies `reply` to `stored`, for `attendee` only (the token's: answers
/// the reply gives for anybody else are never applied). Err is a permanent
/// refusal (attendee not invited and crashers refused, unreadable data, an
/// object that would grow past `growth`). Linear in both objects: lookups
/// are hashed, each instance is answered once.
pub fn apply_reply(
    stored: &str,
    reply: &str,
    attendee: &str,
    crashers: Crashers,
    growth: Growth,
) -> Result<Applied, String> {
    let stored_cal = ICalendar::parse(stored).map_err(|_| "the stored event cannot be read".to_owned())?;
    let attendee = mailto(attendee);
    let (answers, foreign): (Vec<Answer>, Vec<Answer>) =
        answers(reply)?.into_iter().partition(|a| a.attendee == attendee);
    // One answer per instance: the first the reply gives.
    let mut answered = HashSet::new();
    let answers: Vec<Answer> = answers
        .into_iter()
        .filter(|a| answered.insert(a.recurrence_id))
        .collect();
    let mut notes: Vec<String> = foreign
        .iter()
        .map(|a| format!("answer for {} ignored (not the token's attendee)", a.attendee))
        .collect();
    if answers.is_empty() {
        return Ok(Applied::Unchanged(notes.join("; ")));
    }
    let eol = if stored.contains("\r\n") { "\r\n" } else { "\n" };
    let physical: Vec<&str> = stored.split_inclusive('\n').collect();
    let logical = logical_lines(&physical);
    let blocks = blocks(&stored_cal, &logical);
    let Some(master) = blocks
        .iter()
        .find(|b| b.recurrence_id.is_none())
        .or(blocks.first())
        .cloned()
    else {
        return Err("the stored object holds no event".into());
    };

    let overrides: HashMap<i64, &Block> = blocks
        .iter()
        .filter_map(|b| b.recurrence_id.map(|rid| (rid, b)))
        .collect();

    // Edits: logical line index → replacement text (folded); insertions before a logical line.
    let mut replace: HashMap<usize, String> = HashMap::new();
    let mut insert: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    let mut instances: Option<HashSet<i64>> = None;
    let mut created = 0;

    for a in &answers {
        let block = match a.recurrence_id {
            None => Some(master.clone()),
            Some(rid) => overrides.get(&rid).map(|b| (*b).clone()),
        };
        let block = match block {
            Some(b) => b,
            None => {
                // An instance without an override: create one, if it is an instance at all.
                let rid = a.recurrence_id.unwrap_or(0);
                // Expanded once per reply, however many overrides it brings.
                let starts = instances.get_or_insert_with(|| {
                    stored_cal
                        .expand_dates(chrono::Utc, 10_000)
                        .events
                        .iter()
                        .map(|e| e.start.timestamp())
                        .collect::<HashSet<i64>>()
                });
                let real = starts.contains(&rid);
                if !real {
                    notes.push(format!("no instance at RECURRENCE-ID {rid}; ignored"));
                    continue;
                }
                created += 1;
                if created > growth.new_overrides {
                    return Err(format!(
                        "the reply answers for more than {} instances the event has no override for \
                         (target.max_new_overrides); not applied",
                        growth.new_overrides
                    ));
                }
                let mut lines: Vec<String> = Vec::new();
                let dtstart = logical[master.begin..=master.end]
                    .iter()
                    .find(|(_, _, l)| name_of(l) == "DTSTART")
                    .map(|(_, _, l)| l.clone());
                let dtend = logical[master.begin..=master.end]
                    .iter()
                    .find(|(_, _, l)| name_of(l) == "DTEND")
                    .map(|(_, _, l)| l.clone());
                let duration = match (&dtstart, &dtend) {
                    (Some(s), Some(e)) => {
                        let t =
                            format!("BEGIN:VCALENDAR\r\nBEGIN:VEVENT\r\n{s}\r\n{e}\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n");
                        ICalendar::parse(&t).ok().and_then(|c| {
                            let ev = c
                                .components
                                .iter()
                                .find(|c| c.component_type == ICalendarComponentType::VEvent)?;
                            let s = ev.property(&ICalendarProperty::Dtstart).and_then(instant)?;
                            let e = ev.property(&ICalendarProperty::Dtend).and_then(instant)?;
                            Some(e - s)
                        })
                    }
                    _ => None,
                };
                let rid_line = a.recurrence_line.clone().unwrap_or_default();
                let rid_line = rid_line.trim_end().to_owned();
                // The master's own lines; its alarms and other subcomponents stay with it.
                let mut depth = 0usize;
                for (i, (_, _, l)) in logical[master.begin..=master.end].iter().enumerate() {
                    let name = name_of(l);
                    if i == 0 || i == master.end - master.begin {
                        lines.push(l.clone());
                        continue;
                    }
                    match name.as_str() {
                        "BEGIN" => depth += 1,
                        "END" => depth = depth.saturating_sub(1),
                        _ => {}
                    }
                    if depth > 0 || name == "END" {
                        continue;
                    }
                    match name.as_str() {
                        "DTSTART" => {
                            lines.push(rid_line.replacen("RECURRENCE-ID", "DTSTART", 1));
                            if let Some(d) = duration {
                                lines.push(format!("DURATION:PT{d}S"));
                            }
                            lines.push(rid_line.clone());
                        }
                        "ATTENDEE" if mailto(value_of(l)) == a.attendee => {
                            lines.push(attendee_line(l, a));
                        }
                        n if OVERRIDE_KEEPS.contains(&n) => lines.push(l.clone()),
                        _ => {}
                    }
                }
                let text: String = lines.iter().map(|l| fold(l, eol)).collect();
                // After the last component of the object.
                let last_end = blocks.iter().map(|b| b.end).max().unwrap_or(master.end);
                insert.entry(last_end + 1).or_default().push(text);
                continue;
            }
        };
        if a.partstat.is_some() && a.sequence < block.sequence {
            notes.push(format!(
                "older than the answer on file (SEQUENCE {} < {})",
                a.sequence, block.sequence
            ));
            continue;
        }
        let attendee_idx = (block.begin..=block.end)
            .find(|&i| name_of(&logical[i].2) == "ATTENDEE" && mailto(value_of(&logical[i].2)) == a.attendee);
        match attendee_idx {
            Some(i) => {
                let old = &logical[i].2;
                let (_, ps) = params(old);
                let last = get_param(&ps, STAMP_PARAM).unwrap_or("");
                if a.partstat.is_some()
                    && a.sequence == block.sequence
                    && !a.dtstamp.is_empty()
                    && a.dtstamp.as_str() < last
                {
                    notes.push(format!(
                        "older than the answer on file (DTSTAMP {} before {last})",
                        a.dtstamp
                    ));
                    continue;
                }
                let new = attendee_line(old, a);
                if &new != old {
                    replace.insert(i, fold(&new, eol));
                }
            }
            None if crashers == Crashers::Refuse => {
                return Err(format!("{} is not an attendee of this event", a.attendee));
            }
            None => {
                let line = attendee_line(&format!("ATTENDEE:{}", a.attendee), a);
                insert.entry(block.end).or_default().push(fold(&line, eol));
            }
        }
    }

    if replace.is_empty() && insert.is_empty() {
        let why = if notes.is_empty() {
            "nothing changed".to_owned()
        } else {
            notes.join("; ")
        };
        return Ok(Applied::Unchanged(why));
    }
    let mut out = String::with_capacity(stored.len() + 256);
    for (idx, (first, last, _)) in logical.iter().enumerate() {
        for text in insert.remove(&idx).into_iter().flatten() {
            out.push_str(&text);
        }
        match replace.get(&idx) {
            Some(text) => out.push_str(text),
            None => {
                for l in &physical[*first..*last] {
                    out.push_str(l);
                }
            }
        }
    }
    // Insertions past the last line (a stored object without END:VCALENDAR).
    for text in insert.into_values().flatten() {
        out.push_str(&text);
    }
    if out.len() > growth.object_bytes {
        return Err(format!(
            "applying the reply would make the event {} bytes, more than the {} allowed for a {}-byte event; not applied",
            out.len(),
            growth.object_bytes,
            stored.len()
        ));
    }
    Ok(Applied::Changed(out))
}

/// The attendee's line with the answer applied.
fn attendee_line(old: &str, a: &Answer) -> String {
    let value = value_of(old).to_owned();
    let (name, mut ps) = params(old);
    if let Some(p) = &a.partstat {
        set_param(&mut ps, "PARTSTAT", Some(p));
    }
    if let Some(d) = &a.delegated_to {
        set_param(&mut ps, "DELEGATED-TO", Some(d));
    }
    if let Some(d) = &a.delegated_from {
        set_param(&mut ps, "DELEGATED-FROM", Some(d));
    }
    if let Some(rs) = &a.request_status {
        set_param(&mut ps, "SCHEDULE-STATUS", Some(rs));
    }
    // The stamp marks the last answer applied; a bounce is no answer.
    if a.partstat.is_some() && !a.dtstamp.is_empty() {
        set_param(&mut ps, STAMP_PARAM, Some(&a.dtstamp));
    }
    // An answer brings its comment and guests; one without takes the old
    // ones away (they were about the earlier answer).
    if a.partstat.is_some() {
        set_param(&mut ps, "X-RESPONSE-COMMENT", a.comment.as_deref());
        set_param(&mut ps, "X-NUM-GUESTS", a.guests.as_deref());
    }
    let mut line = name;
    for p in ps {
        line.push(';');
        line.push_str(&p);
    }
    line.push(':');
    line.push_str(&value);
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    const GROWTH: Growth = Growth {
        new_overrides: 100,
        object_bytes: 1 << 20,
    };

    const STORED: &str = "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Radicale test//EN\r\nX-WR-CALNAME:Work\r\nBEGIN:VEVENT\r\nUID:weekly@example.org\r\nDTSTAMP:20261101T100000Z\r\nDTSTART:20261207T090000Z\r\nDTEND:20261207T093000Z\r\nRRULE:FREQ=WEEKLY;COUNT=10\r\nSUMMARY:Weekly sync\r\nDESCRIPTION:Agenda: a\\, b\\; c\r\nSEQUENCE:1\r\nORGANIZER;CN=\"Doe, Alice\":mailto:alice@example.org\r\nATTENDEE;CN=\"Dana K\";PARTSTAT=NEEDS-ACTION;RSVP=TRUE:mailto:dana@example.com\r\nATTENDEE;PARTSTAT=NEEDS-ACTION:mailto:erik@example.com\r\nX-CUSTOM;X-PARAM=\"keep me\":value\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n";

    fn reply(attendee: &str, partstat: &str, extra: &str, seq: i64, stamp: &str) -> String {
        format!(
            "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//x//EN\r\nMETHOD:REPLY\r\nBEGIN:VEVENT\r\nUID:weekly@example.org\r\nDTSTAMP:{stamp}\r\nSEQUENCE:{seq}\r\n{extra}ATTENDEE;PARTSTAT={partstat}:mailto:{attendee}\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
        )
    }

    /// Applies for the reply's own (first) attendee, as a token for them would.
    fn apply(stored: &str, reply: &str, crashers: Crashers) -> Result<Applied, String> {
        let who = answers(reply)?.first().map(|a| a.attendee.clone()).unwrap_or_default();
        apply_reply(stored, reply, &who, crashers, GROWTH)
    }

    /// The new text, unfolded for comparison.
    fn changed(a: Applied) -> String {
        match a {
            Applied::Changed(t) => t.replace("\r\n ", ""),
            Applied::Unchanged(why) => panic!("unchanged: {why}"),
        }
    }

    #[test]
    fn the_attendees_comment_and_guests_reach_the_organizer_and_go_with_a_later_answer() {
        // Google: the parameters on the ATTENDEE.
        let google = reply("dana@example.com", "ACCEPTED", "", 1, "20261120T100000Z").replace(
            "ATTENDEE;PARTSTAT",
            "ATTENDEE;X-RESPONSE-COMMENT=\"Running late; start without me\";X-NUM-GUESTS=2;PARTSTAT",
        );
        let out = changed(apply(STORED, &google, Crashers::Refuse).unwrap());
        let dana = out.lines().find(|l| l.contains("dana@example.com")).unwrap();
        assert!(
            dana.contains("X-RESPONSE-COMMENT=\"Running late; start without me\"") && dana.contains("X-NUM-GUESTS=2"),
            "{dana}"
        );
        // Thunderbird: a COMMENT in the VEVENT; quotes and line breaks made safe.
        let tb = reply(
            "dana@example.com",
            "TENTATIVE",
            "COMMENT:Maybe \"later\"\\nif the train is on time\r\n",
            1,
            "20261121T100000Z",
        );
        let out = changed(apply(&out, &tb, Crashers::Refuse).unwrap());
        let dana = out.lines().find(|l| l.contains("dana@example.com")).unwrap();
        assert!(
            dana.contains("X-RESPONSE-COMMENT=Maybe 'later' if the train is on time") && !dana.contains("X-NUM-GUESTS"),
            "{dana}"
        );
        // A later answer without a comment takes the old one away.
        let plain = reply("dana@example.com", "DECLINED", "", 1, "20261122T100000Z");
        let out = changed(apply(&out, &plain, Crashers::Refuse).unwrap());
        let dana = out.lines().find(|l| l.contains("dana@example.com")).unwrap();
        assert!(
            !dana.contains("X-RESPONSE-COMMENT") && dana.contains("PARTSTAT=DECLINED"),
            "{dana}"
        );
        // Bounded.
        let long = reply(
            "dana@example.com",
            "ACCEPTED",
            &format!("COMMENT:{}\r\n", "x".repeat(5000)),
            1,
            "20261123T100000Z",
        );
        let out = changed(apply(&out, &long, Crashers::Refuse).unwrap());
        let dana = out.lines().find(|l| l.contains("dana@example.com")).unwrap();
        assert!(dana.len() < 500, "{}", dana.len());
    }

    #[test]
    fn partstat_changes_and_nothing_else() {
        let out = changed(
            apply(
                STORED,
                &reply("Dana@Example.com", "ACCEPTED", "", 1, "20261120T100000Z"),
                Crashers::Refuse,
            )
            .unwrap(),
        );
        let diff: Vec<(&str, &str)> = STORED.lines().zip(out.lines()).filter(|(a, b)| a != b).collect();
        assert_eq!(diff.len(), 1, "{diff:?}\n{out}");
        assert!(
            diff[0].1.contains("PARTSTAT=ACCEPTED") && diff[0].1.contains("CN=\"Dana K\""),
            "{out}"
        );
        assert_eq!(STORED.lines().count(), out.lines().count());
        // Applying the same reply again writes nothing.
        assert!(matches!(
            apply(
                &out,
                &reply("dana@example.com", "ACCEPTED", "", 1, "20261120T100000Z"),
                Crashers::Refuse
            ),
            Ok(Applied::Unchanged(_))
        ));
    }

    #[test]
    fn stale_replies_are_ignored() {
        let r = apply(
            STORED,
            &reply("dana@example.com", "DECLINED", "", 0, "20261120T100000Z"),
            Crashers::Refuse,
        );
        assert!(
            matches!(r, Ok(Applied::Unchanged(ref w)) if w.contains("SEQUENCE")),
            "{r:?}"
        );
        let newer = changed(
            apply(
                STORED,
                &reply("dana@example.com", "ACCEPTED", "", 1, "20261120T120000Z"),
                Crashers::Refuse,
            )
            .unwrap(),
        );
        let r = apply(
            &newer,
            &reply("dana@example.com", "DECLINED", "", 1, "20261120T110000Z"),
            Crashers::Refuse,
        );
        assert!(
            matches!(r, Ok(Applied::Unchanged(ref w)) if w.contains("DTSTAMP")),
            "{r:?}"
        );
    }

    #[test]
    fn override_created_only_for_a_real_instance() {
        let rid = "RECURRENCE-ID:20261214T090000Z\r\n";
        let out = changed(
            apply(
                STORED,
                &reply("dana@example.com", "DECLINED", rid, 1, "20261120T100000Z"),
                Crashers::Refuse,
            )
            .unwrap(),
        );
        assert!(out.matches("BEGIN:VEVENT").count() == 2, "{out}");
        let cal = ICalendar::parse(&out).unwrap();
        let over = cal
            .components
            .iter()
            .find(|c| c.property(&ICalendarProperty::RecurrenceId).is_some())
            .unwrap();
        assert!(over.property(&ICalendarProperty::Rrule).is_none());
        let att = over
            .properties(&ICalendarProperty::Attendee)
            .find(|a| text_of(a).is_some_and(|v| v.contains("dana")))
            .unwrap();
        assert_eq!(
            att.parameter(&ICalendarParameterName::Partstat)
                .and_then(|p| p.as_text()),
            Some("DECLINED")
        );
        // The master keeps Dana's answer as it was.
        assert!(out.contains("ATTENDEE;CN=\"Dana K\";PARTSTAT=NEEDS-ACTION;RSVP=TRUE:mailto:dana@example.com"));
        let not_an_instance = "RECURRENCE-ID:20261215T090000Z\r\n";
        let r = apply(
            STORED,
            &reply("dana@example.com", "DECLINED", not_an_instance, 1, "2026"),
            Crashers::Refuse,
        );
        assert!(matches!(r, Ok(Applied::Unchanged(_))), "{r:?}");
    }

    #[test]
    fn a_new_override_carries_what_an_override_needs() {
        let stored = STORED.replace(
            "X-CUSTOM",
            "ATTACH:https://files.example.org/agenda.pdf\r\nBEGIN:VALARM\r\nACTION:DISPLAY\r\nSUMMARY:alarm\r\nTRIGGER:-PT5M\r\nEND:VALARM\r\nX-CUSTOM",
        );
        let rid = "RECURRENCE-ID:20261214T090000Z\r\n";
        let out = changed(
            apply(
                &stored,
                &reply("dana@example.com", "DECLINED", rid, 1, "20261120T100000Z"),
                Crashers::Refuse,
            )
            .unwrap(),
        );
        let over = &out[out.rfind("BEGIN:VEVENT").unwrap()..];
        for kept in [
            "UID:",
            "DTSTART:20261214T090000Z",
            "DURATION:PT1800S",
            "RECURRENCE-ID:",
            "SUMMARY:Weekly sync",
            "SEQUENCE:1",
            "ORGANIZER;",
            "mailto:erik@example.com",
        ] {
            assert!(over.contains(kept), "{kept} missing: {over}");
        }
        for left in [
            "DESCRIPTION",
            "ATTACH",
            "VALARM",
            "TRIGGER",
            "X-CUSTOM",
            "RRULE",
            "DTEND",
        ] {
            assert!(!over.contains(left), "{left} copied: {over}");
        }
        assert!(ICalendar::parse(&out).is_ok());
    }

    #[test]
    fn a_reply_may_create_only_so_many_overrides_and_grow_the_event_only_so_much() {
        let rids: String = ["20261214", "20261221", "20261228"]
            .iter()
            .map(|d| format!("BEGIN:VEVENT\r\nUID:weekly@example.org\r\nRECURRENCE-ID:{d}T090000Z\r\nDTSTAMP:20261120T100000Z\r\nATTENDEE;PARTSTAT=DECLINED:mailto:dana@example.com\r\nEND:VEVENT\r\n"))
            .collect();
        let three =
            format!("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//x//EN\r\nMETHOD:REPLY\r\n{rids}END:VCALENDAR\r\n");
        let who = "mailto:dana@example.com";
        let room = |new_overrides, object_bytes| Growth {
            new_overrides,
            object_bytes,
        };
        assert!(matches!(
            apply_reply(STORED, &three, who, Crashers::Refuse, room(3, 1 << 20)),
            Ok(Applied::Changed(_))
        ));
        let err = apply_reply(STORED, &three, who, Crashers::Refuse, room(2, 1 << 20)).unwrap_err();
        assert!(
            err.contains("more than 2 instances") && err.contains("target.max_new_overrides"),
            "{err}"
        );
        let err = apply_reply(STORED, &three, who, Crashers::Refuse, room(3, STORED.len() + 100)).unwrap_err();
        assert!(err.contains("more than the"), "{err}");
        // The rule: double, or 64 KiB more, never past what is read back.
        assert_eq!(Growth::for_object(1000, 5, 1 << 20).object_bytes, 1000 + 65536);
        assert_eq!(Growth::for_object(1 << 18, 5, 1 << 20).object_bytes, 1 << 19);
        assert_eq!(Growth::for_object(1 << 20, 5, 1 << 20).object_bytes, 1 << 20);
    }

    #[test]
    fn party_crashers() {
        let r = reply("mallory@example.net", "ACCEPTED", "", 1, "20261120T100000Z");
        assert!(apply(STORED, &r, Crashers::Refuse).is_err());
        let out = changed(apply(STORED, &r, Crashers::Record).unwrap());
        assert!(out.contains("mailto:mallory@example.net"), "{out}");
    }

    #[test]
    fn request_status_becomes_schedule_status() {
        let out = changed(
            apply(
                STORED,
                &reply(
                    "erik@example.com",
                    "NEEDS-ACTION",
                    "REQUEST-STATUS:5.1;Service unavailable\r\n",
                    1,
                    "20261120T100000Z",
                ),
                Crashers::Refuse,
            )
            .unwrap(),
        );
        assert!(out.contains("SCHEDULE-STATUS=5.1"), "{out}");
    }

    #[test]
    fn answers_for_anybody_but_the_tokens_attendee_change_nothing() {
        // A token for Erik; the reply answers for Dana (and Erik in an override).
        let r = reply("dana@example.com", "DECLINED", "", 1, "20261120T100000Z");
        let got = apply_reply(STORED, &r, "mailto:erik@example.com", Crashers::Record, GROWTH).unwrap();
        assert!(
            matches!(got, Applied::Unchanged(ref w) if w.contains("dana@example.com")),
            "{got:?}"
        );
        let both = r.replace(
            "END:VEVENT\r\nEND:VCALENDAR",
            "END:VEVENT\r\nBEGIN:VEVENT\r\nUID:weekly@example.org\r\nDTSTAMP:20261120T100000Z\r\nSEQUENCE:1\r\nATTENDEE;PARTSTAT=ACCEPTED:mailto:erik@example.com\r\nEND:VEVENT\r\nEND:VCALENDAR",
        );
        let out = changed(apply_reply(STORED, &both, "MAILTO:Erik@example.com", Crashers::Refuse, GROWTH).unwrap());
        assert!(
            out.contains("ATTENDEE;CN=\"Dana K\";PARTSTAT=NEEDS-ACTION;RSVP=TRUE:mailto:dana@example.com"),
            "{out}"
        );
        assert!(
            out.contains("PARTSTAT=ACCEPTED") && out.contains("erik@example.com"),
            "{out}"
        );
    }

    #[test]
    fn a_bounce_records_the_failure_and_keeps_the_answer_and_its_stamp() {
        let accepted = changed(
            apply(
                STORED,
                &reply("dana@example.com", "ACCEPTED", "", 1, "20261120T100000Z"),
                Crashers::Refuse,
            )
            .unwrap(),
        );
        let bounce = crate::itip::bounce_reply(
            "mailto:alice@example.org",
            "mailto:dana@example.com",
            "weekly@example.org",
            chrono::DateTime::from_timestamp(1_900_000_000, 0).unwrap(),
        );
        let out =
            changed(apply_reply(&accepted, &bounce, "mailto:dana@example.com", Crashers::Refuse, GROWTH).unwrap());
        let dana = out.lines().find(|l| l.contains("dana@example.com")).unwrap();
        assert!(dana.contains("PARTSTAT=ACCEPTED"), "{dana}");
        assert!(dana.contains("SCHEDULE-STATUS=5.1"), "{dana}");
        assert!(
            dana.contains("X-IMIP-MILTER-DTSTAMP=20261120T100000Z"),
            "the stamp stays: {dana}"
        );
        // Dana's later genuine answer still counts.
        let later = changed(
            apply(
                &out,
                &reply("dana@example.com", "TENTATIVE", "", 1, "20261121T100000Z"),
                Crashers::Refuse,
            )
            .unwrap(),
        );
        assert!(later.contains("PARTSTAT=TENTATIVE"), "{later}");
    }
}
