//! Target `caldav`: applies each reply to the organizer's event on any
//! CalDAV server (RFC 4791), for servers that send invitations by mail but
//! never process the answers. Finds the organizer's calendar home (the
//! `calendar_home` template, or the server's principals), the event by UID in
//! the organizer's calendars, applies the REPLY (see `schedule`), and writes
//! it back with If-Match, fetching again when someone else changed it
//! meanwhile.
//!
//! Finding the home and calendars is in `discovery`, `check` in `check`;
//! both use the HTTP helpers here.

mod check;
mod discovery;

use super::Outcome;
use crate::{
    config::TargetConfig,
    schedule::{self, Applied, Crashers},
    spool::Record,
};
use reqwest::{header, Client, Method, RequestBuilder, StatusCode};
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Writes tried when the event keeps changing under us.
const MAX_WRITES: usize = 5;
/// A discovered calendar home is asked for again after this long.
const HOME_TTL: Duration = Duration::from_secs(3600);
/// Organizers whose home is remembered at most.
const MAX_HOMES: usize = 10_000;
/// Principal collections searched at most.
const MAX_COLLECTIONS: usize = 4;

pub struct CalDav {
    client: Client,
    base: String,
    /// target.calendar_home; None: discovered per organizer.
    home_template: Option<String>,
    homes: Mutex<HashMap<String, (Home, Instant)>>,
    /// The service account's own home, and when it was asked for.
    own: Mutex<Option<(Option<String>, Instant)>>,
    /// The service account's principal, learnt with its home.
    own_principal: Mutex<Option<String>>,
    auth: Auth,
    crashers: Crashers,
    max_response_bytes: usize,
    max_new_overrides: usize,
    /// target.url, parsed: hrefs are followed on its origin only.
    origin: Option<reqwest::Url>,
}

/// Where an organizer's events live.
#[derive(Debug, Clone)]
pub struct Home {
    pub url: String,
    /// Her principal, when known: calendars shared with the service account
    /// count only when she owns them.
    pub principal: Option<String>,
    /// How it was found, for `check --organizer`.
    pub how: &'static str,
}

/// How the service account signs in: target.username + password_file
/// (Basic), or target.token_file (Bearer).
enum Auth {
    None,
    Basic(String, String),
    Bearer(String),
}

/// A calendar object on the server.
struct Object {
    href: String,
    etag: Option<String>,
    data: String,
}

impl CalDav {
    pub fn new(config: &TargetConfig) -> Result<Self, String> {
        let auth = match (&config.token_file, &config.username, &config.password_file) {
            (Some(f), _, _) => Auth::Bearer(crate::config::read_secret(f, "target.token_file")?),
            (None, Some(u), Some(f)) => Auth::Basic(u.clone(), crate::config::read_secret(f, "target.password_file")?),
            _ => Auth::None,
        };
        let client = super::http_client(config)?;
        Ok(Self {
            client,
            base: config.url.trim_end_matches('/').to_owned(),
            home_template: config.calendar_home.clone(),
            homes: Mutex::new(HashMap::new()),
            own: Mutex::new(None),
            own_principal: Mutex::new(None),
            auth,
            crashers: if config.party_crashers_record {
                Crashers::Record
            } else {
                Crashers::Refuse
            },
            max_response_bytes: config.max_response_bytes,
            max_new_overrides: config.max_new_overrides,
            origin: reqwest::Url::parse(&config.url).ok(),
        })
    }

    fn req(&self, method: Method, url: &str) -> RequestBuilder {
        let r = self.client.request(method, url);
        match &self.auth {
            Auth::Basic(u, p) => r.basic_auth(u, Some(p)),
            Auth::Bearer(t) => r.bearer_auth(t),
            Auth::None => r,
        }
    }

    /// The organizer's address when it is one that may be spliced into a
    /// URL path or searched for: a plain `mailto:` address.
    fn address(organizer: &str) -> Option<&str> {
        let address = organizer
            .get(7..)
            .filter(|_| organizer.get(..7).is_some_and(|m| m.eq_ignore_ascii_case("mailto:")))?;
        address.rsplit_once('@')?;
        // Nothing that leaves the organizer's home or breaks the XML.
        let clean = !address.contains(['/', '\\', '?', '#', '%', '<', '>', '&', '"', '\''])
            && !address.contains("..")
            && !address.chars().any(|c| c.is_control() || c.is_whitespace());
        clean.then_some(address)
    }

    async fn body(&self, resp: reqwest::Response) -> Result<String, Outcome> {
        super::read_capped(resp, self.max_response_bytes)
            .await
            .map_err(super::ReadError::outcome)
    }

    async fn find(&self, calendar: &str, uid: &str, organizer: &str) -> Result<Option<Object>, Outcome> {
        let uid_xml = uid.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
        let body = format!(
            r#"<?xml version="1.0" encoding="utf-8"?><C:calendar-query xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav"><D:prop><D:getetag/><C:calendar-data/></D:prop><C:filter><C:comp-filter name="VCALENDAR"><C:comp-filter name="VEVENT"><C:prop-filter name="UID"><C:text-match collation="i;octet" match-type="equals">{uid_xml}</C:text-match></C:prop-filter></C:comp-filter></C:comp-filter></C:filter></C:calendar-query>"#
        );
        let resp = self.send_xml(b"REPORT", calendar, "1", body).await?;
        if resp.status().as_u16() != 207 {
            return Err(failure(resp, "REPORT", calendar, self.max_response_bytes).await);
        }
        let xml = self.body(resp).await?;
        // Servers that ignore match-type search by substring: take only an
        // object whose UID is exactly this one and whose ORGANIZER is the
        // organizer (an attendee's copy of the same UID is not the event).
        let responses = read_multistatus(xml).await?;
        let found = responses.iter().find_map(|r| {
            let data = r.calendar_data.as_ref()?;
            let href = self.under(r.href.as_deref()?, calendar)?;
            is_organizers_event(data, uid, organizer).then(|| Object {
                href,
                etag: r.etag.clone(),
                data: data.clone(),
            })
        });
        if found.is_none()
            && responses
                .iter()
                .filter_map(|r| r.calendar_data.as_deref())
                .any(|d| is_free_busy_stub(d, uid))
        {
            // DAViCal without read rights: "Busy", no ORGANIZER, no ATTENDEE.
            return Err(Outcome::Permanent(format!(
                "{calendar} shows the service account only free/busy of event {uid}: \
                 grant it read and write on the organizer's calendars"
            )));
        }
        Ok(found)
    }

    async fn get(&self, href: &str) -> Result<Option<Object>, Outcome> {
        let resp = self.req(Method::GET, href).send().await.map_err(transport)?;
        match resp.status() {
            StatusCode::NOT_FOUND | StatusCode::GONE => Ok(None),
            s if s.is_success() => {
                let etag = resp
                    .headers()
                    .get(header::ETAG)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                Ok(Some(Object {
                    href: href.to_owned(),
                    etag,
                    data: self.body(resp).await?,
                }))
            }
            _ => Err(failure(resp, "GET", href, self.max_response_bytes).await),
        }
    }

    pub async fn deliver(&self, record: &Record) -> Outcome {
        let p = &record.payload;
        let (Some(organizer), Some(uid), Some(attendee), Some(reply)) = (
            p["organizer"].as_str(),
            p["uid"].as_str(),
            p["attendee"].as_str(),
            p["icalendar"].as_str(),
        ) else {
            return Outcome::Permanent(
                "record lacks organizer, UID, attendee or calendar data (caldav needs tokens.mode = local)".into(),
            );
        };
        let home = match self.home(organizer).await {
            Ok(home) => home,
            Err(o) => return o,
        };
        let discovery::Searched {
            calendars, unsearched, ..
        } = match self.searched(&home).await {
            Ok(s) => s,
            Err(o) => {
                self.forget_home(organizer);
                return o;
            }
        };
        let mut object = None;
        for cal in &calendars {
            match self.find(cal, uid, organizer).await {
                Ok(Some(o)) => {
                    object = Some(o);
                    break;
                }
                Ok(None) => {}
                Err(o) => return o,
            }
        }
        let Some(mut object) = object else {
            if let Some(why) = unsearched {
                return Outcome::Retry(format!(
                    "event {uid} is not in {organizer}'s calendar home; the calendars shared with the service account could not be searched: {why}"
                ));
            }
            return Outcome::Permanent(format!("event {uid} is not in the calendars of {organizer} (deleted?)"));
        };
        for _ in 0..MAX_WRITES {
            // CPU work on hostile input: off the threads that answer Postfix.
            let (data, reply_text, who, crashers) = (
                object.data.clone(),
                reply.to_owned(),
                attendee.to_owned(),
                self.crashers,
            );
            let growth = schedule::Growth::for_object(data.len(), self.max_new_overrides, self.max_response_bytes);
            let applied =
                tokio::task::spawn_blocking(move || schedule::apply_reply(&data, &reply_text, &who, crashers, growth))
                    .await;
            let applied = match applied {
                Ok(a) => a,
                Err(e) => return Outcome::Permanent(format!("applying the reply failed: {e}")),
            };
            let new = match applied {
                Ok(Applied::Changed(t)) => t,
                Ok(Applied::Unchanged(why)) => return Outcome::Ignored(why),
                Err(e) => return Outcome::Permanent(e),
            };
            let mut put = self
                .req(Method::PUT, &object.href)
                .header(header::CONTENT_TYPE, "text/calendar; charset=utf-8")
                .body(new);
            if let Some(etag) = &object.etag {
                put = put.header(header::IF_MATCH, etag);
            }
            let resp = match put.send().await {
                Ok(r) => r,
                Err(e) => return transport(e),
            };
            match resp.status() {
                s if s.is_success() => return Outcome::Delivered,
                StatusCode::PRECONDITION_FAILED => {
                    // Changed since we read it: read again, apply again.
                    match self.get(&object.href).await {
                        Ok(Some(o)) if is_organizers_event(&o.data, uid, organizer) => object = o,
                        Ok(Some(_)) => {
                            return Outcome::Permanent(format!(
                                "{} no longer holds event {uid} of {organizer}",
                                object.href
                            ))
                        }
                        Ok(None) => return Outcome::Permanent(format!("event {uid} was deleted")),
                        Err(o) => return o,
                    }
                }
                StatusCode::NOT_FOUND | StatusCode::GONE => {
                    return Outcome::Permanent(format!("event {uid} was deleted"))
                }
                _ => return failure(resp, "PUT", &object.href, self.max_response_bytes).await,
            }
        }
        Outcome::Retry(format!("event {uid} kept changing while being written"))
    }
}

/// An outcome as one line of text.
fn describe(o: &Outcome) -> String {
    o.error().unwrap_or("done").to_owned()
}

/// A component with this UID but neither ORGANIZER nor ATTENDEE: what a
/// server shows of an event to someone who may see only free/busy.
fn is_free_busy_stub(data: &str, uid: &str) -> bool {
    let Ok(cal) = calcard::icalendar::ICalendar::parse(data) else {
        return false;
    };
    use calcard::icalendar::ICalendarProperty as P;
    cal.components
        .iter()
        .any(|c| c.uid() == Some(uid) && c.property(&P::Organizer).is_none() && c.property(&P::Attendee).is_none())
}

/// Whether calendar object `data` is `organizer`'s event `uid`: some
/// component has exactly that UID and names that ORGANIZER.
fn is_organizers_event(data: &str, uid: &str, organizer: &str) -> bool {
    let Ok(cal) = calcard::icalendar::ICalendar::parse(data) else {
        return false;
    };
    let organizer = crate::itip::normalise_mailto(organizer);
    cal.components.iter().any(|c| {
        c.uid() == Some(uid)
            && c.property(&calcard::icalendar::ICalendarProperty::Organizer)
                .and_then(|e| e.values.first())
                .and_then(|v| v.as_text())
                .is_some_and(|o| crate::itip::normalise_mailto(o).eq_ignore_ascii_case(&organizer))
    })
}

fn transport(e: reqwest::Error) -> Outcome {
    Outcome::unreachable(&e, "cannot reach the CalDAV server: ")
}

/// What an unexpected answer to `what` on `url` means, with the server's
/// own words where it gave some.
async fn failure(resp: reqwest::Response, what: &str, url: &str, limit: usize) -> Outcome {
    let status = resp.status();
    if status.is_redirection() {
        let to = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(|l| crate::address::printable(&l.chars().take(200).collect::<String>()))
            .unwrap_or_else(|| "nowhere".into());
        return Outcome::Permanent(format!(
            "{what} {url}: HTTP {status} to {to} (not followed): set target.url or target.calendar_home to where it points"
        ));
    }
    let words = super::read_capped(resp, limit.min(64 * 1024))
        .await
        .map(|b| server_words(&b))
        .unwrap_or_default();
    Outcome::from_status(
        status,
        &format!("{what} {url}"),
        &words,
        "target.username and password_file, or token_file",
    )
}

/// A server's error text made short and printable: tags dropped, space
/// collapsed, at most 200 characters.
fn server_words(body: &str) -> String {
    let mut text = String::new();
    let mut in_tag = false;
    for c in body.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                text.push(' ');
            }
            _ if in_tag => {}
            c if c.is_whitespace() || c.is_control() => text.push(' '),
            c => text.push(c),
        }
    }
    let words: Vec<&str> = text.split_whitespace().collect();
    crate::address::printable(&words.join(" ").chars().take(200).collect::<String>())
}

/// Parses a multistatus answer off the async workers.
async fn read_multistatus(xml: String) -> Result<Vec<super::dav_xml::DavResponse>, Outcome> {
    match tokio::task::spawn_blocking(move || super::dav_xml::multistatus(&xml)).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(Outcome::Retry(e)),
        Err(e) => Err(Outcome::Retry(format!("reading the server's XML failed: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_organizers_event_with_exactly_that_uid() {
        let ev = |uid: &str, org: &str| {
            format!("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nBEGIN:VEVENT\r\nUID:{uid}\r\nDTSTAMP:20261101T000000Z\r\nORGANIZER:{org}\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n")
        };
        let alice = "mailto:alice@example.org";
        assert!(is_organizers_event(
            &ev("weekly@example.org", "MAILTO:Alice@example.org"),
            "weekly@example.org",
            alice
        ));
        assert!(!is_organizers_event(
            &ev("weekly@example.org", alice),
            "ekly@exam",
            alice
        ));
        assert!(!is_organizers_event(
            &ev("weekly@example.org", "mailto:mallory@example.net"),
            "weekly@example.org",
            alice
        ));
        assert!(!is_organizers_event(
            &ev("Weekly@example.org", alice),
            "weekly@example.org",
            alice
        ));
        assert!(!is_organizers_event("garbage", "weekly@example.org", alice));
    }

    #[test]
    fn server_words_are_short_and_printable() {
        assert_eq!(
            server_words("<html><body><h1>500</h1>\n<p>Access\tdenied \x1b[31m</p></body></html>"),
            "500 Access denied [31m"
        );
        assert_eq!(server_words(&"x".repeat(1000)).len(), 200);
        assert_eq!(server_words("  "), "");
    }
}
