//! `check` for the `caldav` target: whether the server answers the service
//! account, and (`check --organizer`) where an organizer's events would be
//! looked for, as the milter would look, without writing anything.

use super::{describe, CalDav};
use crate::findings::Finding;
use reqwest::Method;

impl CalDav {
    /// `check --organizer`: the home, the calendars, a search in each (for
    /// a UID that exists nowhere); nothing is written.
    pub async fn check_organizer(&self, organizer: &str) -> Vec<Finding> {
        let mut out = Vec::new();
        let home = match self.home(organizer).await {
            Ok(h) => h,
            Err(o) => return vec![Finding::fail("organizer", describe(&o))],
        };
        out.push(Finding::ok(
            "organizer",
            format!("{organizer}: calendar home {} ({})", home.url, home.how),
        ));
        // Where delivery looks: her home, and what she shares with the
        // service account.
        let searched = match self.searched(&home).await {
            Ok(s) => s,
            Err(o) => {
                out.push(Finding::fail("organizer", describe(&o)));
                return out;
            }
        };
        if let Some(why) = &searched.unsearched {
            out.push(Finding::warn(
                "organizer",
                format!("the calendars shared with the service account could not be listed: {why}"),
            ));
        }
        if searched.hers == 0 {
            out.push(Finding::fail(
                "organizer",
                format!(
                    "no calendar of {organizer} is visible to the service account: grant it write on her calendar \
                     and subscribe it (SOGo: POST <subscribe/> to her calendar as the service account; Cyrus: IMAP \
                     SUBSCRIBE \"Other Users/<her>/#calendars/Default\" as the service account; README, Calendar servers)"
                ),
            ));
            return out;
        }
        let calendars = searched.calendars;
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
            // A DAV server answers PROPFIND with a multistatus.
            Ok(r) if r.status().as_u16() == 207 => {
                Finding::ok("target", format!("{} answers {}", self.base, r.status()))
            }
            Ok(r) => {
                let status = r.status();
                let html = r
                    .headers()
                    .get(reqwest::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|t| t.to_ascii_lowercase().starts_with("text/html"));
                let location = r
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .map(|l| crate::address::printable(&l.chars().take(200).collect::<String>()));
                let what = match (html, location) {
                    (_, Some(to)) => format!("redirects to {to} (not followed)"),
                    (true, None) => "a web page (a login page?), not a DAV answer".to_owned(),
                    (false, None) => "no DAV answer".to_owned(),
                };
                Finding::fail(
                    "target",
                    format!(
                        "{} answers PROPFIND with {status}: {what}; set target.url to the server's CalDAV root \
                         (SOGo: …/SOGo/dav/, Cyrus: …/dav/, DAViCal: …/caldav.php/)",
                        self.base
                    ),
                )
            }
            Err(e) => Finding::fail("target", format!("{}: {}", self.base, crate::errors::chain(&e))),
        }
    }
}
