//! Target `calendarserver`: CalendarServer's legacy iMIP injection, as its
//! separate mail gateway (2.x–3.x) used it. `POST {url}/inbox/` with the
//! iTIP data as text/calendar, `Originator` (the attendee) and `Recipient`
//! (the organizer); authentication by a shared secret header or Digest/Basic.
//! The answer is a CalDAV schedule-response whose request-status decides.

use super::Outcome;
use crate::errors::chain;
use crate::{config::TargetConfig, findings::Finding, spool::Record};
use md5::{Digest, Md5};
use reqwest::{header, Client, RequestBuilder, StatusCode};

enum Auth {
    None,
    /// Header name and shared secret.
    Secret(String, String),
    /// User and password, Digest or Basic as the server asks.
    Password(String, String),
}

pub struct CalendarServer {
    client: Client,
    inbox: String,
    auth: Auth,
    max_response_bytes: usize,
}

impl CalendarServer {
    pub fn new(config: &TargetConfig) -> Result<Self, String> {
        let read = crate::config::read_secret;
        let auth = match (&config.secret_file, &config.username, &config.password_file) {
            (Some(f), _, _) => Auth::Secret(config.secret_header.clone(), read(f, "target.secret_file")?),
            (None, Some(u), Some(f)) => Auth::Password(u.clone(), read(f, "target.password_file")?),
            _ => Auth::None,
        };
        let client = super::http_client(config)?;
        Ok(Self {
            client,
            inbox: format!("{}/inbox/", config.url.trim_end_matches('/')),
            auth,
            max_response_bytes: config.max_response_bytes,
        })
    }

    fn request(&self, originator: &str, recipient: &str, body: &str) -> RequestBuilder {
        let req = self
            .client
            .post(&self.inbox)
            .header(header::CONTENT_TYPE, "text/calendar; charset=utf-8")
            .header("Originator", originator)
            .header("Recipient", recipient)
            .body(body.to_owned());
        match &self.auth {
            Auth::Secret(name, secret) => req.header(name.as_str(), secret.as_str()),
            _ => req,
        }
    }

    /// Sends, answering a Digest or Basic challenge once.
    async fn send(&self, originator: &str, recipient: &str, body: &str) -> Result<reqwest::Response, reqwest::Error> {
        let resp = self.request(originator, recipient, body).send().await?;
        let Auth::Password(user, password) = &self.auth else {
            return Ok(resp);
        };
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenge = resp
            .headers()
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_owned)
            .collect::<Vec<_>>();
        let path = reqwest::Url::parse(&self.inbox)
            .map(|u| u.path().to_owned())
            .unwrap_or_else(|_| "/inbox/".into());
        let authorization = match challenge
            .iter()
            .find(|c| c.trim_start().to_ascii_lowercase().starts_with("digest"))
        {
            Some(c) => digest(c, user, password, "POST", &path),
            None => format!(
                "Basic {}",
                crate::message::base64(format!("{user}:{password}").as_bytes())
            ),
        };
        self.request(originator, recipient, body)
            .header(header::AUTHORIZATION, authorization)
            .send()
            .await
    }

    pub async fn deliver(&self, record: &Record) -> Outcome {
        let p = &record.payload;
        let (Some(originator), Some(recipient), Some(body)) =
            (p["attendee"].as_str(), p["organizer"].as_str(), p["icalendar"].as_str())
        else {
            return Outcome::Permanent(
                "record lacks attendee, organizer or calendar data (calendarserver needs tokens.mode = local)".into(),
            );
        };
        match self.send(originator, recipient, body).await {
            Ok(resp) => {
                let status = resp.status();
                match super::read_capped(resp, self.max_response_bytes).await {
                    Ok(text) => classify(status, &text),
                    Err(e) => e.outcome(),
                }
            }
            Err(e) => Outcome::unreachable(&e, ""),
        }
    }

    /// An OPTIONS request with the credentials: 401/403 means they are refused.
    pub async fn check(&self) -> Finding {
        let mut req = self.client.request(reqwest::Method::OPTIONS, &self.inbox);
        let key = match &self.auth {
            Auth::Secret(name, secret) => {
                req = req.header(name.as_str(), secret.as_str());
                "target.secret_file"
            }
            Auth::Password(user, password) => {
                req = req.basic_auth(user, Some(password));
                "target.password_file"
            }
            Auth::None => "target.url",
        };
        match req.send().await {
            Ok(r) if r.status().is_success() => Finding::ok("target", format!("{} answers {}", self.inbox, r.status())),
            Ok(r) if matches!(r.status().as_u16(), 401 | 403) => Finding::fail(
                "target",
                format!("{} refuses the credentials ({}): check {key}", self.inbox, r.status()),
            ),
            Ok(r) => Finding::warn("target", format!("{} answers {}", self.inbox, r.status())),
            Err(e) => Finding::fail("target", format!("{}: {}", self.inbox, chain(&e))),
        }
    }
}

/// 2.x done; 3.x and 5.x kept as failed with the status; 4.x retried.
pub fn classify(status: StatusCode, body: &str) -> Outcome {
    let code = status.as_u16();
    match code {
        200..=299 => match super::dav_xml::request_status(body) {
            Some(s) if s.starts_with('2') => Outcome::Delivered,
            Some(s) if s.starts_with('4') => Outcome::Retry(format!("request-status {s}")),
            Some(s) => Outcome::Permanent(format!("request-status {s}")),
            None => Outcome::Permanent(format!("HTTP {status} without a schedule-response")),
        },
        _ => Outcome::from_status(status, "", "", "target.secret_file or target.password_file"),
    }
}

fn param<'a>(challenge: &'a str, name: &str) -> Option<&'a str> {
    let lower = challenge.to_ascii_lowercase();
    let mut from = 0;
    while let Some(i) = lower[from..].find(name) {
        let start = from + i;
        let before_ok = start == 0 || matches!(lower.as_bytes()[start - 1], b' ' | b',' | b'\t');
        let rest = &challenge[start + name.len()..];
        if before_ok && rest.starts_with('=') {
            let v = &rest[1..];
            return Some(match v.strip_prefix('"') {
                Some(q) => &q[..q.find('"').unwrap_or(q.len())],
                None => v.split(',').next().unwrap_or("").trim(),
            });
        }
        from = start + name.len();
    }
    None
}

fn md5_hex(s: &str) -> String {
    Md5::digest(s.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The Authorization value answering a Digest challenge (RFC 7616, MD5).
pub fn digest(challenge: &str, user: &str, password: &str, method: &str, uri: &str) -> String {
    let realm = param(challenge, "realm").unwrap_or("");
    let nonce = param(challenge, "nonce").unwrap_or("");
    let opaque = param(challenge, "opaque");
    let qop = param(challenge, "qop").map(|q| q.split(',').any(|x| x.trim() == "auth"));
    let ha1 = md5_hex(&format!("{user}:{realm}:{password}"));
    let ha2 = md5_hex(&format!("{method}:{uri}"));
    let cnonce = md5_hex(&format!("{nonce}:{}", crate::clock::now_ms()))[..16].to_owned();
    let mut out = format!("Digest username=\"{user}\", realm=\"{realm}\", nonce=\"{nonce}\", uri=\"{uri}\"");
    if qop == Some(true) {
        let response = md5_hex(&format!("{ha1}:{nonce}:00000001:{cnonce}:auth:{ha2}"));
        out.push_str(&format!(
            ", qop=auth, nc=00000001, cnonce=\"{cnonce}\", response=\"{response}\", algorithm=MD5"
        ));
    } else {
        let response = md5_hex(&format!("{ha1}:{nonce}:{ha2}"));
        out.push_str(&format!(", response=\"{response}\", algorithm=MD5"));
    }
    if let Some(o) = opaque {
        out.push_str(&format!(", opaque=\"{o}\""));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_response_statuses() {
        let ok = r#"<?xml version="1.0"?><C:schedule-response xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav"><C:response><C:recipient><D:href>mailto:alice@example.org</D:href></C:recipient><C:request-status>2.0;Success</C:request-status></C:response></C:schedule-response>"#;
        assert_eq!(
            crate::targets::dav_xml::request_status(ok).as_deref(),
            Some("2.0;Success")
        );
        assert_eq!(classify(StatusCode::OK, ok), Outcome::Delivered);
        let bad = ok.replace("2.0;Success", "3.7;Invalid calendar user");
        assert!(matches!(classify(StatusCode::OK, &bad), Outcome::Permanent(s) if s.contains("3.7")));
        let busy = ok.replace("2.0;Success", "5.3;No scheduling support");
        assert!(matches!(classify(StatusCode::OK, &busy), Outcome::Permanent(_)));
        // A proxy's 503: the server behind it does not answer.
        assert!(matches!(
            classify(StatusCode::SERVICE_UNAVAILABLE, ""),
            Outcome::Unreachable(_)
        ));
        assert!(matches!(
            classify(StatusCode::INTERNAL_SERVER_ERROR, ""),
            Outcome::Retry(_)
        ));
        assert!(matches!(classify(StatusCode::FORBIDDEN, ""), Outcome::Permanent(_)));
    }

    #[test]
    fn digest_response_matches_rfc_2617_example() {
        // RFC 2617 §3.5, with the cnonce fixed by hand below.
        let c = r#"Digest realm="testrealm@host.com", qop="auth,auth-int", nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", opaque="5ccc069c403ebaf9f0171e9517f40e41""#;
        let ha1 = md5_hex("Mufasa:testrealm@host.com:Circle Of Life");
        let ha2 = md5_hex("GET:/dir/index.html");
        let want = md5_hex(&format!(
            "{ha1}:dcd98b7102dd2f0e8b11d0f600bfb0c093:00000001:0a4f113b:auth:{ha2}"
        ));
        assert_eq!(want, "6629fae49393a05397450978507c4ef1");
        let got = digest(c, "Mufasa", "Circle Of Life", "GET", "/dir/index.html");
        assert!(got.contains("opaque=\"5ccc069c403ebaf9f0171e9517f40e41\""), "{got}");
        assert!(
            got.contains("qop=auth") && got.contains("uri=\"/dir/index.html\""),
            "{got}"
        );
    }
}
