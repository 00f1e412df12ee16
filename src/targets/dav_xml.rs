//! Reading CalDAV servers' multistatus answers (RFC 4918, RFC 4791) with
//! quick-xml's namespace-aware reader: one pass, linear in the answer,
//! whatever a broken or hostile server sends. Pure functions; the answer's
//! size is bounded before it gets here (`target.max_response_bytes`).

use quick_xml::{
    escape::resolve_predefined_entity,
    events::Event,
    name::{Namespace, ResolveResult},
    NsReader,
};

const DAV: &str = "DAV:";
const CALDAV: &str = "urn:ietf:params:xml:ns:caldav";

/// Responses read from one answer at most.
const MAX_RESPONSES: usize = 10_000;

/// One `DAV:response` of a multistatus answer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DavResponse {
    /// The first `DAV:href`, as written (percent-encoded).
    pub href: Option<String>,
    /// `DAV:resourcetype` holds `CALDAV:calendar`.
    pub calendar: bool,
    /// `DAV:resourcetype` holds `CALDAV:schedule-inbox` (RFC 6638): the
    /// iTIP messages received, copies of events among them (DAViCal marks
    /// it a calendar too). An outbox is no such thing, and SOGo's personal
    /// calendar is its outbox as well.
    pub scheduling_inbox: bool,
    pub etag: Option<String>,
    /// `CALDAV:calendar-data`, entities and CDATA resolved.
    pub calendar_data: Option<String>,
    /// Discovery (RFC 5397, 3744, 4791, 6638): the hrefs of these properties.
    pub current_user_principal: Vec<String>,
    pub principal_collection_set: Vec<String>,
    pub calendar_home_set: Vec<String>,
    pub calendar_user_address_set: Vec<String>,
    /// RFC 3744 DAV:owner.
    pub owner: Vec<String>,
    /// RFC 3744 DAV:current-user-privilege-set, when the server gave it:
    /// the names of the privileges (`read`, `write`, `write-content`, `all`…).
    pub privileges: Option<Vec<String>>,
}

/// Hrefs kept per property at most, and their length: longer ones are dropped.
const MAX_HREFS: usize = 100;
const MAX_HREF_LEN: usize = 2048;

/// The properties whose hrefs discovery reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum HrefProperty {
    CurrentUserPrincipal,
    PrincipalCollectionSet,
    CalendarHomeSet,
    CalendarUserAddressSet,
    Owner,
}

impl HrefProperty {
    fn of(space: Space, name: &str) -> Option<Self> {
        match (space, name) {
            (Space::Dav, "current-user-principal") => Some(Self::CurrentUserPrincipal),
            (Space::Dav, "principal-collection-set") => Some(Self::PrincipalCollectionSet),
            (Space::CalDav, "calendar-home-set") => Some(Self::CalendarHomeSet),
            (Space::CalDav, "calendar-user-address-set") => Some(Self::CalendarUserAddressSet),
            (Space::Dav, "owner") => Some(Self::Owner),
            _ => None,
        }
    }

    fn list(self, r: &mut DavResponse) -> &mut Vec<String> {
        match self {
            Self::CurrentUserPrincipal => &mut r.current_user_principal,
            Self::PrincipalCollectionSet => &mut r.principal_collection_set,
            Self::CalendarHomeSet => &mut r.calendar_home_set,
            Self::CalendarUserAddressSet => &mut r.calendar_user_address_set,
            Self::Owner => &mut r.owner,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Space {
    Dav,
    CalDav,
    Other,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    Href,
    Etag,
    Data,
    PropertyHref(HrefProperty),
}

fn space(ns: &ResolveResult<'_>) -> Space {
    match ns {
        ResolveResult::Bound(Namespace(DAV)) => Space::Dav,
        ResolveResult::Bound(Namespace(CALDAV)) => Space::CalDav,
        _ => Space::Other,
    }
}

/// The responses of a `DAV:multistatus` answer. Err says why it cannot be read.
pub fn multistatus(xml: &str) -> Result<Vec<DavResponse>, String> {
    let mut reader = NsReader::from_str(xml);
    let mut out = Vec::new();
    let mut current: Option<DavResponse> = None;
    let mut capture: Option<(Field, String)> = None;
    let mut in_resourcetype = false;
    let mut in_property: Option<HrefProperty> = None;
    let (mut in_privileges, mut in_privilege) = (false, false);
    loop {
        let (ns, event) = reader
            .read_resolved_event()
            .map_err(|e| format!("the server's XML cannot be read: {e}"))?;
        let space = space(&ns);
        match event {
            Event::Start(e) => {
                let Some(r) = current.as_mut() else {
                    if (space, e.local_name().as_ref()) == (Space::Dav, "response") {
                        current = Some(DavResponse::default());
                    }
                    continue;
                };
                if let Some(p) = HrefProperty::of(space, e.local_name().as_ref()) {
                    in_property = Some(p);
                    continue;
                }
                match (space, e.local_name().as_ref()) {
                    (Space::Dav, "current-user-privilege-set") => {
                        in_privileges = true;
                        r.privileges.get_or_insert_with(Vec::new);
                        continue;
                    }
                    (Space::Dav, "privilege") if in_privileges => {
                        in_privilege = true;
                        continue;
                    }
                    (Space::Dav, name) if in_privilege => {
                        push_privilege(r, name);
                        continue;
                    }
                    _ => {}
                }
                match (space, e.local_name().as_ref()) {
                    (Space::Dav, "href") if capture.is_none() => match in_property {
                        Some(p) => capture = Some((Field::PropertyHref(p), String::new())),
                        None if r.href.is_none() => capture = Some((Field::Href, String::new())),
                        None => {}
                    },
                    (Space::Dav, "getetag") if capture.is_none() => capture = Some((Field::Etag, String::new())),
                    (Space::CalDav, "calendar-data") if capture.is_none() => {
                        capture = Some((Field::Data, String::new()))
                    }
                    (Space::Dav, "resourcetype") => in_resourcetype = true,
                    (Space::CalDav, "calendar") if in_resourcetype => r.calendar = true,
                    (Space::CalDav, "schedule-inbox") if in_resourcetype => r.scheduling_inbox = true,
                    _ => {}
                }
            }
            Event::Empty(e) => {
                if let Some(r) = current.as_mut() {
                    if in_privilege && space == Space::Dav {
                        push_privilege(r, e.local_name().as_ref());
                    }
                    match (space, e.local_name().as_ref()) {
                        (Space::CalDav, "calendar") if in_resourcetype => r.calendar = true,
                        (Space::CalDav, "schedule-inbox") if in_resourcetype => r.scheduling_inbox = true,
                        _ => {}
                    }
                }
            }
            Event::End(e) => {
                if HrefProperty::of(space, e.local_name().as_ref()).is_some() {
                    in_property = None;
                    continue;
                }
                match (space, e.local_name().as_ref()) {
                    (Space::Dav, "current-user-privilege-set") => in_privileges = false,
                    (Space::Dav, "privilege") => in_privilege = false,
                    _ => {}
                }
                let name = (space, e.local_name().as_ref().to_owned());
                match (name.0, name.1.as_str()) {
                    (Space::Dav, "response") => {
                        if let Some(r) = current.take() {
                            out.push(r);
                            if out.len() >= MAX_RESPONSES {
                                break;
                            }
                        }
                    }
                    (Space::Dav, "resourcetype") => in_resourcetype = false,
                    (Space::Dav, "href") | (Space::Dav, "getetag") | (Space::CalDav, "calendar-data") => {
                        if let (Some(r), Some((field, text))) = (current.as_mut(), capture.take()) {
                            match field {
                                Field::Href if text.trim().len() <= MAX_HREF_LEN => {
                                    r.href = Some(text.trim().to_owned())
                                }
                                Field::Href => {}
                                Field::Etag => r.etag = Some(text.trim().to_owned()),
                                Field::Data => r.calendar_data = Some(text),
                                Field::PropertyHref(p) => {
                                    let list = p.list(r);
                                    if list.len() < MAX_HREFS && text.trim().len() <= MAX_HREF_LEN {
                                        list.push(text.trim().to_owned());
                                    }
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
            Event::Text(t) => {
                if let Some((_, text)) = capture.as_mut() {
                    text.push_str(&t.into_inner());
                }
            }
            Event::CData(c) => {
                if let Some((_, text)) = capture.as_mut() {
                    text.push_str(&c.into_inner());
                }
            }
            Event::GeneralRef(r) => {
                if let Some((_, text)) = capture.as_mut() {
                    match r.resolve_char_ref() {
                        Ok(Some(c)) => text.push(c),
                        _ => {
                            if let Some(s) = resolve_predefined_entity(&r.into_inner()) {
                                text.push_str(s);
                            }
                        }
                    }
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(out)
}

fn push_privilege(r: &mut DavResponse, name: &str) {
    let list = r.privileges.get_or_insert_with(Vec::new);
    if list.len() < MAX_HREFS {
        list.push(name.to_owned());
    }
}

/// The first `CALDAV:request-status` of a schedule-response (RFC 6638,
/// CalendarServer's answer to an injected reply), e.g. "2.0;Success".
pub fn request_status(xml: &str) -> Option<String> {
    let mut reader = NsReader::from_str(xml);
    let mut text: Option<String> = None;
    loop {
        let (ns, event) = reader.read_resolved_event().ok()?;
        let space = space(&ns);
        match event {
            Event::Start(e) if (space, e.local_name().as_ref()) == (Space::CalDav, "request-status") => {
                text = Some(String::new())
            }
            Event::End(e) if (space, e.local_name().as_ref()) == (Space::CalDav, "request-status") => {
                return text.map(|t| t.trim().to_owned());
            }
            Event::Text(t) => {
                if let Some(s) = text.as_mut() {
                    s.push_str(&t.into_inner());
                }
            }
            Event::GeneralRef(r) => {
                if let (Some(s), Some(v)) = (text.as_mut(), resolve_predefined_entity(&r.into_inner())) {
                    s.push_str(v);
                }
            }
            Event::Eof => return None,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn radicale_propfind_and_report_answers() {
        // As Radicale 3.1 writes them: the default namespace DAV:, C: CalDAV.
        let xml = r#"<?xml version='1.0' encoding='utf-8'?>
<multistatus xmlns="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav"><response><href>/alice/</href><propstat><prop><resourcetype><collection /></resourcetype></prop></propstat></response><response><href>/alice/work/</href><propstat><prop><resourcetype><C:calendar /><collection /></resourcetype></prop></propstat></response><response><href>/alice/cal%20b/</href><propstat><prop><resourcetype><C:calendar/><collection/></resourcetype><getetag>"e1"</getetag><C:calendar-data>BEGIN:VCALENDAR&#13;
SUMMARY:a &amp; b
END:VCALENDAR</C:calendar-data></prop></propstat></response></multistatus>"#;
        let rs = multistatus(xml).unwrap();
        assert_eq!(rs.len(), 3);
        let cals: Vec<&str> = rs
            .iter()
            .filter(|r| r.calendar)
            .filter_map(|r| r.href.as_deref())
            .collect();
        assert_eq!(cals, ["/alice/work/", "/alice/cal%20b/"]);
        assert_eq!(rs[2].etag.as_deref(), Some("\"e1\""));
        let data = rs[2].calendar_data.as_deref().unwrap();
        assert!(
            data.contains("BEGIN:VCALENDAR\r\n") && data.contains("SUMMARY:a & b"),
            "{data:?}"
        );
    }

    #[test]
    fn namespaces_not_prefixes_decide() {
        // Other prefixes, CDATA; a "calendar" element of another namespace is no calendar.
        let xml = r#"<d:multistatus xmlns:d="DAV:" xmlns:cal="urn:ietf:params:xml:ns:caldav" xmlns:x="urn:example"><d:response><d:href>/a/</d:href><d:propstat><d:prop><d:resourcetype><x:calendar/></d:resourcetype></d:prop></d:propstat></d:response><d:response><d:href>/b/ev.ics</d:href><d:propstat><d:prop><cal:calendar-data><![CDATA[BEGIN:VCALENDAR
X:<&>
END:VCALENDAR]]></cal:calendar-data></d:prop></d:propstat></d:response></d:multistatus>"#;
        let rs = multistatus(xml).unwrap();
        assert!(!rs[0].calendar);
        assert!(rs[1].calendar_data.as_deref().unwrap().contains("X:<&>"));
    }

    #[test]
    fn discovery_properties() {
        // As DAViCal answers a principal-property-search: the principal's
        // own href, then hrefs inside properties.
        let xml = r#"<multistatus xmlns="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav"><response><href>/caldav.php/alice/</href><propstat><prop><C:calendar-home-set><href>/caldav.php/alice/</href></C:calendar-home-set><C:calendar-user-address-set><href>mailto:alice@example.org</href><href>/caldav.php/alice/</href></C:calendar-user-address-set><current-user-principal><href>/caldav.php/imip/</href></current-user-principal><principal-collection-set><href>/caldav.php/</href></principal-collection-set></prop><status>HTTP/1.1 200 OK</status></propstat></response></multistatus>"#;
        let rs = multistatus(xml).unwrap();
        assert_eq!(rs.len(), 1);
        let r = &rs[0];
        assert_eq!(r.href.as_deref(), Some("/caldav.php/alice/"));
        assert_eq!(r.calendar_home_set, ["/caldav.php/alice/"]);
        assert_eq!(
            r.calendar_user_address_set,
            ["mailto:alice@example.org", "/caldav.php/alice/"]
        );
        assert_eq!(r.current_user_principal, ["/caldav.php/imip/"]);
        assert_eq!(r.principal_collection_set, ["/caldav.php/"]);
        assert_eq!(r.privileges, None);
        let xml = r#"<d:multistatus xmlns:d="DAV:"><d:response><d:href>/c/</d:href><d:propstat><d:prop><d:current-user-privilege-set><d:privilege><d:read/></d:privilege><d:privilege><d:write-content/></d:privilege></d:current-user-privilege-set></d:prop></d:propstat></d:response></d:multistatus>"#;
        let rs = multistatus(xml).unwrap();
        assert_eq!(
            rs[0].privileges.as_deref(),
            Some(&["read".to_owned(), "write-content".to_owned()][..])
        );
    }

    #[test]
    fn hostile_answers_are_read_in_one_pass_or_refused() {
        // 4 MiB of '<' took the old hand scanner minutes; now an error at once.
        let flood = "<".repeat(4 << 20);
        let started = std::time::Instant::now();
        let _ = multistatus(&flood);
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert!(multistatus("<D:multistatus xmlns:D=\"DAV:\"><D:response>").is_ok_and(|r| r.is_empty()));
        assert!(multistatus("not xml at all").is_ok_and(|r| r.is_empty()));
    }
}
