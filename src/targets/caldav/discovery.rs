//! Where an organizer's events live on a CalDAV server: the calendar home
//! (from `target.calendar_home`, or the server's principals: RFC 3744
//! principal-property-search, the service account's own home, the
//! principal URL by convention), the calendars in it and those the
//! organizer shares with the service account. Hrefs are followed on the
//! origin of `target.url` only.

use super::{describe, failure, read_multistatus, transport, CalDav, Home, HOME_TTL, MAX_COLLECTIONS, MAX_HOMES};
use crate::targets::Outcome;
use reqwest::{header, Method, StatusCode};
use std::time::Instant;

impl CalDav {
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
    pub(super) fn forget_home(&self, organizer: &str) {
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
    pub(super) async fn send_xml(
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
    pub(super) async fn propfind(
        &self,
        url: &str,
        depth: &str,
        props: &str,
    ) -> Result<Vec<crate::targets::dav_xml::DavResponse>, Outcome> {
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
        let local = address.rsplit_once('@').map_or(address, |(l, _)| l);
        let mailto = format!("mailto:{address}");
        // RFC 6638's property first; SOGo searches CalendarServer's
        // email-address-set only ("unhandled key" for the others); Cyrus
        // matches its text within `userid@servername`, so the local part
        // finds her. Whatever is found must list her address
        // (search_principal_by keeps only those).
        let tries = [
            ("<C:calendar-user-address-set/>", mailto.as_str()),
            ("<CS:email-address-set/>", address),
            ("<C:calendar-user-address-set/>", local),
        ];
        let mut first = None;
        for (property, matched) in tries {
            match self.search_principal_by(collection, address, property, matched).await? {
                Search::Principals(p) if !p.is_empty() => return Ok(Search::Principals(p)),
                other => {
                    first.get_or_insert(other);
                }
            }
        }
        Ok(first.unwrap_or(Search::Principals(Vec::new())))
    }

    async fn search_principal_by(
        &self,
        collection: &str,
        address: &str,
        property: &str,
        matched: &str,
    ) -> Result<Search, Outcome> {
        let wanted = format!("mailto:{address}");
        let body = format!(
            r#"<?xml version="1.0" encoding="utf-8"?><D:principal-property-search xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav" xmlns:CS="http://calendarserver.org/ns/"><D:property-search><D:prop>{property}</D:prop><D:match>{matched}</D:match></D:property-search><D:prop><C:calendar-home-set/><C:calendar-user-address-set/></D:prop></D:principal-property-search>"#
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
        if let (Ok(mut own), Some(p)) = (self.own_principal.lock(), &principal) {
            *own = Some(p.clone());
        }
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
    /// The calendars delivery searches for the owner of `home`: those in
    /// her home, then those she shares with the service account, shown in
    /// its own home with DAV:owner her principal (SOGo's `alice_personal/`,
    /// Cyrus's `alice.Default/`). A home that is the service account's own
    /// (Cyrus answers the reader's home for anybody's calendar-home-set)
    /// holds none of hers but the shared ones.
    pub(super) async fn searched(&self, home: &Home) -> Result<Searched, Outcome> {
        let own = match self.own_home().await {
            Ok(own) => own,
            Err(o) => {
                tracing::debug!("the service account's own home is unknown: {}", describe(&o));
                None
            }
        };
        // The service account's home, and she is somebody else.
        let own_principal = self.own_principal.lock().ok().and_then(|p| p.clone());
        let someone_else = match (&own_principal, &home.principal) {
            (Some(mine), Some(hers)) => !same_url(mine, hers),
            _ => true,
        };
        let in_own = someone_else && own.as_deref().is_some_and(|o| same_url(o, &home.url));
        let mut out = Searched::default();
        if !in_own {
            out.calendars = self.calendars(&home.url).await?;
            out.hers = out.calendars.len();
        }
        if let Some(principal) = &home.principal {
            let skip = if in_own { "" } else { home.url.as_str() };
            match self.shared_by(principal, skip).await {
                Ok(shared) => {
                    for c in shared {
                        if !out.calendars.contains(&c) {
                            out.calendars.push(c);
                            out.hers += 1;
                        }
                    }
                }
                Err(o @ Outcome::Permanent(_)) => tracing::debug!("shared calendars not searched: {}", describe(&o)),
                Err(o) => out.unsearched = Some(describe(&o)),
            }
        }
        Ok(out)
    }

    pub(super) async fn shared_by(&self, principal: &str, skip: &str) -> Result<Vec<String>, Outcome> {
        let Some(own) = self.own_home().await? else {
            return Ok(Vec::new());
        };
        if same_url(&own, skip) {
            return Ok(Vec::new());
        }
        let listed = self.propfind(&own, "1", "<D:resourcetype/><D:owner/>").await?;
        Ok(listed
            .into_iter()
            .filter(|r| r.calendar && !r.scheduling_inbox)
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
        crate::targets::same_origin(base, &url).then(|| url.to_string())
    }

    /// An href from the server as a URL on target.url's origin; None for
    /// anything elsewhere (a hostile or broken server's href gets no request
    /// and no credentials).
    /// The same under `parent` (the calendar home, a calendar).
    pub(super) fn under(&self, href: &str, parent: &str) -> Option<String> {
        let base = self.origin.as_ref()?;
        let url = base.join(href).ok()?;
        let top = reqwest::Url::parse(parent).ok()?;
        let top = top.path().trim_end_matches('/');
        let path = url.path();
        let inside = path.trim_end_matches('/') == top || path.starts_with(&format!("{top}/"));
        (crate::targets::same_origin(base, &url) && inside).then(|| url.to_string())
    }

    pub(super) async fn calendars(&self, home: &str) -> Result<Vec<String>, Outcome> {
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
            .filter(|r| r.calendar && !r.scheduling_inbox)
            .filter_map(|r| r.href)
            .filter_map(|h| self.under(&h, home))
            .collect())
    }
}

/// Two URLs of one resource (a trailing slash aside).
fn same_url(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// What `searched` found: the calendars to search, how many of them are
/// the organizer's, and why the shared ones could not be listed, if so.
#[derive(Debug, Default)]
pub(super) struct Searched {
    pub calendars: Vec<String>,
    pub hers: usize,
    pub unsearched: Option<String>,
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
