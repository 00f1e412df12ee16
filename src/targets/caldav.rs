//! Target `caldav`: applies each reply to the organizer's event on any
//! CalDAV server (RFC 4791), for servers that send invitations by mail but
//! never process the answers. Finds the organizer's calendar home (the
//! `calendar_home` template, or the server's principals), the event by UID in
//! the organizer's calendars, applies the REPLY (see `schedule`), and writes
//! it back with If-Match, fetching again when someone else changed it
//! meanwhile.
//!
//! Longer than 700 lines: discovery (home, principals, shared calendars) and
//! applying share the HTTP helpers here. Discovery is to become a file of its
//! own when it is reworked for SOGo and Cyrus (issue 22).

use super::Outcome;
use crate::{
    config::TargetConfig,
    findings::Finding,
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

    /// The organizer's calendar home from `template` ({base}, {user},
    /// {domain}, {address}).
    fn home_by_template(&self, template: &str, organizer: &str) -> Option<String> {
        let address = Self::address(organizer)?;
        let (user, domain) = address.rsplit_once('@')?;
        Some(
            template
                .replace("{base}", &self.base)
                .replace("{user}", user)
                .replace("{domain}", domain)
                .replace("{address}", address),
        )
    }

    /// The organizer's calendar home: the template when one is configured,
    /// else found on the server and remembered for an hour.
    pub async fn home(&self, organizer: &str) -> Result<Home, Outcome> {
        if let Some(t) = &self.home_template {
            return self
                .home_by_template(t, organizer)
                .map(|url| Home {
                    url,
                    principal: None,
                    how: "target.calendar_home",
                })
                .ok_or_else(|| Outcome::Permanent(format!("organizer {organizer} is no plain mailto: address")));
        }
        let Some(address) = Self::address(organizer) else {
            return Err(Outcome::Permanent(format!(
                "organizer {organizer} is no plain mailto: address"
            )));
        };
        let key = address.to_ascii_lowercase();
        if let Ok(homes) = self.homes.lock() {
            if let Some((home, when)) = homes.get(&key) {
                if when.elapsed() < HOME_TTL {
                    return Ok(Home {
                        how: "remembered",
                        ..home.clone()
                    });
                }
            }
        }
        let home = self.discover(address).await?;
        if let Ok(mut homes) = self.homes.lock() {
            if homes.len() >= MAX_HOMES {
                homes.clear();
            }
            homes.insert(key, (home.clone(), Instant::now()));
        }
        Ok(home)
    }

    /// Asks the server again next time (the remembered home answered 403 or 404).
    fn forget_home(&self, organizer: &str) {
        if let (Some(address), Ok(mut homes)) = (Self::address(organizer), self.homes.lock()) {
            homes.remove(&address.to_ascii_lowercase());
        }
    }

    /// Finds `address`'s calendar home: the one principal whose RFC 6638
    /// calendar-user-address-set holds exactly that address (RFC 3744
    /// principal-property-search in every principal collection of the
    /// server), else the principal named as the address's user part
    /// (Radicale's `/user/`) unless it lists other addresses only; then its
    /// RFC 4791 calendar-home-set.
    async fn discover(&self, address: &str) -> Result<Home, Outcome> {
        let root = format!("{}/", self.base);
        let mut tried: Vec<String> = Vec::new();
        // A server that cannot be reached now is tried again later.
        let mut passing = false;
        let mut note = |o: Outcome, tried: &mut Vec<String>| {
            passing |= !matches!(o, Outcome::Permanent(_));
            tried.push(describe(&o));
        };
        let mut collections: Vec<String> = match self.propfind(&root, "0", "<D:principal-collection-set/>").await {
            Ok(rs) => rs
                .iter()
                .flat_map(|r| r.principal_collection_set.iter())
                .filter_map(|h| self.on_origin(h))
                .take(MAX_COLLECTIONS)
                .collect(),
            Err(o @ (Outcome::Retry(_) | Outcome::Unreachable(_) | Outcome::ServerFault(_))) => return Err(o),
            Err(o) => {
                note(o, &mut tried);
                Vec::new()
            }
        };
        if collections.is_empty() {
            collections.push(root.clone());
        }
        let mut found: Vec<(String, Option<String>)> = Vec::new();
        for c in &collections {
            match self.search_principal(c, address).await {
                Ok(Search::Principals(list)) if list.is_empty() => {
                    tried.push(format!("no principal in {c} has mailto:{address}"))
                }
                Ok(Search::Principals(list)) => {
                    for f in list {
                        if !found.iter().any(|(p, _)| same_url(p, &f.0)) {
                            found.push(f);
                        }
                    }
                }
                Ok(Search::Unsupported(why)) => tried.push(why),
                Err(o @ Outcome::Permanent(_)) => return Err(o),
                Err(o) => note(o, &mut tried),
            }
        }
        match found.as_slice() {
            [(principal, home)] => {
                let url = match home {
                    Some(h) => Some(h.clone()),
                    None => self.home_set_of(principal, address).await?,
                };
                return match url {
                    Some(url) => Ok(Home {
                        url,
                        principal: Some(principal.clone()),
                        how: "principal-property-search",
                    }),
                    None => Err(Outcome::Permanent(format!(
                        "principal {principal} has mailto:{address} but names no calendar home on target.url's origin"
                    ))),
                };
            }
            [] => {}
            many => {
                return Err(Outcome::Permanent(format!(
                    "{} principals claim mailto:{address}: set target.calendar_home",
                    many.len()
                )))
            }
        }
        let user = address.rsplit_once('@').map(|(u, _)| u).unwrap_or(address);
        let principal = format!("{}/{user}/", self.base);
        match self.home_set_of(&principal, address).await {
            Ok(Some(url)) => {
                return Ok(Home {
                    url,
                    principal: Some(principal),
                    how: "the principal named as the user",
                })
            }
            Ok(None) => tried.push(format!("{principal} is not the principal of {address}")),
            Err(o) => note(o, &mut tried),
        }
        let text = format!(
            "no calendar home found for {address} ({}): set target.calendar_home",
            tried.join("; ")
        );
        Err(if passing {
            Outcome::Retry(text)
        } else {
            Outcome::Permanent(text)
        })
    }

    /// A WebDAV request with an XML body (PROPFIND, REPORT).
    async fn send_xml(
        &self,
        method: &[u8],
        url: &str,
        depth: &str,
        body: String,
    ) -> Result<reqwest::Response, Outcome> {
        self.req(Method::from_bytes(method).unwrap_or(Method::GET), url)
            .header("Depth", depth)
            .header(header::CONTENT_TYPE, "application/xml; charset=utf-8")
            .body(body)
            .send()
            .await
            .map_err(transport)
    }

    /// PROPFIND of the named properties (XML elements with prefixes D:, C:).
    async fn propfind(&self, url: &str, depth: &str, props: &str) -> Result<Vec<super::dav_xml::DavResponse>, Outcome> {
        let body = format!(
            r#"<?xml version="1.0" encoding="utf-8"?><D:propfind xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav"><D:prop>{props}</D:prop></D:propfind>"#
        );
        let resp = self.send_xml(b"PROPFIND", url, depth, body).await?;
        if resp.status().as_u16() != 207 {
            return Err(failure(resp, "PROPFIND", url, self.max_response_bytes).await);
        }
        let xml = self.body(resp).await?;
        read_multistatus(xml).await
    }

    /// RFC 3744 principal-property-search on calendar-user-address-set: the
    /// principals (and their homes, when given) that list exactly `address`
    /// (servers match by substring). A matching principal elsewhere than on
    /// target.url's origin is an error, not a miss.
    async fn search_principal(&self, collection: &str, address: &str) -> Result<Search, Outcome> {
        let wanted = format!("mailto:{address}");
        let body = format!(
            r#"<?xml version="1.0" encoding="utf-8"?><D:principal-property-search xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav"><D:property-search><D:prop><C:calendar-user-address-set/></D:prop><D:match>{wanted}</D:match></D:property-search><D:prop><C:calendar-home-set/><C:calendar-user-address-set/></D:prop></D:principal-property-search>"#
        );
        let resp = self.send_xml(b"REPORT", collection, "0", body).await?;
        let status = resp.status().as_u16();
        if status != 207 {
            let o = failure(
                resp,
                "principal-property-search in",
                collection,
                self.max_response_bytes,
            )
            .await;
            // Servers without RFC 3744 answer these: not a fault here.
            return match status {
                400 | 403 | 404 | 405 | 415 | 501 => Ok(Search::Unsupported(describe(&o))),
                _ => Err(o),
            };
        }
        let xml = self.body(resp).await?;
        let mut out = Vec::new();
        for r in read_multistatus(xml).await? {
            if !r.calendar_user_address_set.iter().any(|a| same_address(a, &wanted)) {
                continue;
            }
            let Some(principal) = r.href.as_deref().and_then(|h| self.on_origin(h)) else {
                return Err(Outcome::Permanent(format!(
                    "the principal that has {wanted} is not on target.url's origin"
                )));
            };
            let home = r.calendar_home_set.iter().find_map(|h| self.on_origin(h));
            out.push((principal, home));
        }
        Ok(Search::Principals(out))
    }

    /// A principal's calendar-home-set; None when the principal lists
    /// calendar user addresses and `address` is not among them.
    async fn home_set_of(&self, principal: &str, address: &str) -> Result<Option<String>, Outcome> {
        let responses = self
            .propfind(principal, "0", "<C:calendar-home-set/><C:calendar-user-address-set/>")
            .await?;
        let wanted = format!("mailto:{address}");
        let Some(r) = responses.first() else { return Ok(None) };
        // Addresses as servers write them: `mailto:` or not, percent-encoded.
        let addresses: Vec<String> = r
            .calendar_user_address_set
            .iter()
            .map(|a| percent_decoded(a))
            .filter(|a| a.contains('@'))
            .collect();
        if !addresses.is_empty() && !addresses.iter().any(|a| same_address(a, &wanted)) {
            return Ok(None);
        }
        Ok(r.calendar_home_set.iter().find_map(|h| self.on_origin(h)))
    }

    /// The service account's own calendar home (RFC 5397 current-user-principal,
    /// then its calendar-home-set), remembered an hour; None when the server
    /// does not say. Not remembered after an error.
    async fn own_home(&self) -> Result<Option<String>, Outcome> {
        if self.home_template.is_some() {
            return Ok(None);
        }
        if let Ok(own) = self.own.lock() {
            if let Some((home, when)) = own.as_ref() {
                if when.elapsed() < HOME_TTL {
                    return Ok(home.clone());
                }
            }
        }
        let root = format!("{}/", self.base);
        let principal = self
            .propfind(&root, "0", "<D:current-user-principal/>")
            .await?
            .into_iter()
            .flat_map(|r| r.current_user_principal)
            .find_map(|h| self.on_origin(&h));
        let home = match principal {
            Some(p) => self
                .propfind(&p, "0", "<C:calendar-home-set/>")
                .await?
                .into_iter()
                .flat_map(|r| r.calendar_home_set)
                .find_map(|h| self.on_origin(&h)),
            None => None,
        };
        if let Ok(mut own) = self.own.lock() {
            *own = Some((home.clone(), Instant::now()));
        }
        Ok(home)
    }

    /// Calendars in the service account's own home that `principal` owns
    /// (DAV:owner): calendars the organizer shared with it (Cyrus shows
    /// them as `alice.calendar`). A calendar that names no owner, or
    /// another, is not searched: anyone can share a calendar.
    async fn shared_by(&self, principal: &str, skip: &str) -> Result<Vec<String>, Outcome> {
        let Some(own) = self.own_home().await? else {
            return Ok(Vec::new());
        };
        if same_url(&own, skip) {
            return Ok(Vec::new());
        }
        let listed = self.propfind(&own, "1", "<D:resourcetype/><D:owner/>").await?;
        Ok(listed
            .into_iter()
            .filter(|r| r.calendar && !r.scheduling_box)
            .filter(|r| {
                r.owner
                    .iter()
                    .filter_map(|o| self.on_origin(o))
                    .any(|o| same_url(&o, principal))
            })
            .filter_map(|r| r.href.and_then(|h| self.under(&h, &own)))
            .collect())
    }

    /// An href as a URL on target.url's origin; None for anything elsewhere.
    fn on_origin(&self, href: &str) -> Option<String> {
        let base = self.origin.as_ref()?;
        let url = base.join(href).ok()?;
        super::same_origin(base, &url).then(|| url.to_string())
    }

    /// An href from the server as a URL on target.url's origin; None for
    /// anything elsewhere (a hostile or broken server's href gets no request
    /// and no credentials).
    /// The same under `parent` (the calendar home, a calendar).
    fn under(&self, href: &str, parent: &str) -> Option<String> {
        let base = self.origin.as_ref()?;
        let url = base.join(href).ok()?;
        let top = reqwest::Url::parse(parent).ok()?;
        let top = top.path().trim_end_matches('/');
        let path = url.path();
        let inside = path.trim_end_matches('/') == top || path.starts_with(&format!("{top}/"));
        (super::same_origin(base, &url) && inside).then(|| url.to_string())
    }

    async fn body(&self, resp: reqwest::Response) -> Result<String, Outcome> {
        super::read_capped(resp, self.max_response_bytes)
            .await
            .map_err(super::ReadError::outcome)
    }

    async fn calendars(&self, home: &str) -> Result<Vec<String>, Outcome> {
        let body = r#"<?xml version="1.0" encoding="utf-8"?><D:propfind xmlns:D="DAV:"><D:prop><D:resourcetype/></D:prop></D:propfind>"#;
        let resp = self.send_xml(b"PROPFIND", home, "1", body.to_owned()).await?;
        let status = resp.status();
        if status == StatusCode::NOT_FOUND {
            return Err(Outcome::Permanent(format!("no calendar home at {home}")));
        }
        if status == StatusCode::FORBIDDEN {
            // DAViCal answers alike for a principal that does not exist: a
            // discovered home exists, so this is a missing right.
            return Err(Outcome::Permanent(format!(
                "PROPFIND {home}: HTTP 403: the service account may not read this calendar home \
                 (grant it read and write there{})",
                if self.home_template.is_some() {
                    "; or target.calendar_home names a principal the server does not know"
                } else {
                    ""
                }
            )));
        }
        if status.as_u16() != 207 {
            return Err(failure(resp, "PROPFIND", home, self.max_response_bytes).await);
        }
        let xml = self.body(resp).await?;
        Ok(read_multistatus(xml)
            .await?
            .into_iter()
            .filter(|r| r.calendar && !r.scheduling_box)
            .filter_map(|r| r.href)
            .filter_map(|h| self.under(&h, home))
            .collect())
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
        let mut calendars = match self.calendars(&home.url).await {
            Ok(c) => c,
            Err(o) => {
                self.forget_home(organizer);
                return o;
            }
        };
        // Calendars the organizer shared with the service account, shown in
        // its own home; searched after hers. Not searched now: try later.
        let mut unsearched = None;
        if let Some(principal) = &home.principal {
            match self.shared_by(principal, &home.url).await {
                Ok(shared) => {
                    for c in shared {
                        if !calendars.contains(&c) {
                            calendars.push(c);
                        }
                    }
                }
                Err(o @ Outcome::Permanent(_)) => tracing::debug!("shared calendars not searched: {}", describe(&o)),
                Err(o) => unsearched = Some(describe(&o)),
            }
        }
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
                Ok(Applied::Unchanged(_)) => return Outcome::Delivered,
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

    /// `check --organizer`: the home, the calendars, a search in each (for
    /// a UID that exists nowhere); nothing is written.
    pub async fn check_organizer(&self, organizer: &str) -> Vec<Finding> {
        let mut out = Vec::new();
        let (home, how) = match self.home(organizer).await {
            Ok(h) => (h.url, h.how),
            Err(o) => return vec![Finding::fail("organizer", describe(&o))],
        };
        out.push(Finding::ok(
            "organizer",
            format!("{organizer}: calendar home {home} ({how})"),
        ));
        let calendars = match self.calendars(&home).await {
            Ok(c) if c.is_empty() => {
                out.push(Finding::fail(
                    "organizer",
                    format!("{home} holds no calendar the service account can see (its rights on the server)"),
                ));
                return out;
            }
            Ok(c) => c,
            Err(o) => {
                out.push(Finding::fail("organizer", describe(&o)));
                return out;
            }
        };
        let shown: Vec<&str> = calendars.iter().take(5).map(String::as_str).collect();
        out.push(Finding::ok(
            "organizer",
            format!(
                "{} calendar(s): {}{}",
                calendars.len(),
                shown.join(", "),
                if calendars.len() > 5 { ", …" } else { "" }
            ),
        ));
        let probe = "imip-milter-check-probe-no-such-event";
        for cal in &calendars {
            if let Err(o) = self.find(cal, probe, organizer).await {
                out.push(Finding::fail("organizer", format!("searching {cal}: {}", describe(&o))));
                return out;
            }
        }
        out.push(Finding::ok(
            "organizer",
            "every calendar answers a search by UID (calendar-query REPORT)",
        ));
        // RFC 3744: may the service account change the organizer's events?
        let mut unsaid = Vec::new();
        for cal in &calendars {
            match self.propfind(cal, "0", "<D:current-user-privilege-set/>").await {
                Ok(rs) => match rs.first().and_then(|r| r.privileges.as_ref()) {
                    Some(p)
                        if p.iter()
                            .any(|p| matches!(p.as_str(), "write" | "write-content" | "all")) => {}
                    Some(p) => {
                        out.push(Finding::fail(
                            "organizer",
                            format!(
                                "the service account may not change events in {cal} (it has: {}): grant it write-content there",
                                p.join(", ")
                            ),
                        ));
                        return out;
                    }
                    None => unsaid.push(cal.as_str()),
                },
                Err(_) => unsaid.push(cal.as_str()),
            }
        }
        out.push(if unsaid.is_empty() {
            Finding::ok(
                "organizer",
                "the service account may change events in every calendar; nothing was written",
            )
        } else {
            Finding::warn(
                "organizer",
                format!(
                    "{} does not say what the service account may do (RFC 3744); the first reply will tell",
                    unsaid.join(", ")
                ),
            )
        });
        out
    }

    pub async fn check(&self) -> Finding {
        let resp = self
            .req(
                Method::from_bytes(b"PROPFIND").unwrap_or(Method::GET),
                &format!("{}/", self.base),
            )
            .header("Depth", "0")
            .send()
            .await;
        match resp {
            Ok(r) if matches!(r.status().as_u16(), 401 | 403) => Finding::fail(
                "target",
                format!(
                    "{} refuses the credentials ({}): check target.username and password_file, or token_file",
                    self.base,
                    r.status()
                ),
            ),
            Ok(r) if r.status().is_success() || r.status().as_u16() == 207 => {
                Finding::ok("target", format!("{} answers {}", self.base, r.status()))
            }
            Ok(r) => Finding::warn("target", format!("{} answers {}", self.base, r.status())),
            Err(e) => Finding::fail("target", format!("{}: {}", self.base, crate::errors::chain(&e))),
        }
    }
}

/// Two URLs of one resource (a trailing slash aside).
fn same_url(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// What a principal-property-search came to.
enum Search {
    /// The principals (and their homes, when given) that list the address.
    Principals(Vec<(String, Option<String>)>),
    /// The server does not do the search (4xx or 501): why, for the record.
    Unsupported(String),
}

/// Two `mailto:` URIs for the same address (the scheme and the address
/// compared without case, as servers write them either way; Xandikos
/// percent-encodes the href: `mailto%3Aalice%40example.org`).
fn same_address(a: &str, b: &str) -> bool {
    let (a, b) = (percent_decoded(a), percent_decoded(b));
    crate::itip::normalise_mailto(&a).eq_ignore_ascii_case(&crate::itip::normalise_mailto(&b))
}

/// `%XX` sequences decoded where they make UTF-8; anything else kept.
fn percent_decoded(s: &str) -> String {
    crate::address::percent_decode(s, false).unwrap_or_else(|_| s.to_owned())
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
    fn addresses_as_servers_write_them() {
        assert!(same_address("mailto%3Aalice%40example.org", "mailto:alice@example.org"));
        assert!(same_address("MAILTO:Alice@Example.org", "mailto:alice@example.org"));
        assert!(!same_address(
            "mailto:alice@example.org.evil",
            "mailto:alice@example.org"
        ));
        assert_eq!(percent_decoded("100%"), "100%");
        assert_eq!(percent_decoded("%zz%41"), "%zzA");
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
