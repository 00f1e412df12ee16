//! Target `webhook`: POST the record's JSON document to a URL.

use super::Outcome;
use crate::errors::chain;
use crate::{config::TargetConfig, spool::Record};
use reqwest::{header, Client, StatusCode};

pub struct Webhook {
    client: Client,
    url: String,
    auth: Option<String>,
    /// The config key the credential came from, for messages.
    auth_source: Option<&'static str>,
}

impl Webhook {
    pub fn new(config: &TargetConfig) -> Result<Self, String> {
        let auth = match (&config.token_file, &config.username, &config.password_file) {
            (Some(file), _, _) => Some(format!(
                "Bearer {}",
                crate::config::read_secret(file, "target.token_file")?
            )),
            (None, Some(user), Some(file)) => {
                let password = crate::config::read_secret(file, "target.password_file")?;
                Some(format!(
                    "Basic {}",
                    crate::message::base64(format!("{user}:{password}").as_bytes())
                ))
            }
            _ => None,
        };
        let client = super::http_client(config)?;
        let auth_source = match (&config.token_file, &config.password_file) {
            (Some(_), _) => Some("target.token_file"),
            (None, Some(_)) => Some("target.password_file"),
            _ => None,
        };
        Ok(Self {
            client,
            url: config.url.clone(),
            auth,
            auth_source,
        })
    }

    pub async fn deliver(&self, record: &Record) -> Outcome {
        let body = match serde_json::to_vec(&record.payload) {
            Ok(b) => b,
            Err(e) => return Outcome::Permanent(format!("cannot encode record: {e}")),
        };
        let mut req = self
            .client
            .post(&self.url)
            .header(header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", &record.id)
            .body(body);
        if let Some(auth) = &self.auth {
            req = req.header(header::AUTHORIZATION, auth);
        }
        match req.send().await {
            Ok(resp) => classify(resp.status()),
            Err(e) => Outcome::unreachable(&e, ""),
        }
    }
}

impl Webhook {
    /// POSTs `{"kind": "check"}`: the contract says the target answers it
    /// without side effects, 2xx or 400/422 once the credentials passed;
    /// 401/403 is a credential the target no longer accepts.
    pub async fn check(&self) -> crate::findings::Finding {
        use crate::findings::Finding;
        let mut req = self
            .client
            .post(&self.url)
            .header(header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", "check")
            .body(r#"{"id":"check","kind":"check"}"#);
        if let Some(auth) = &self.auth {
            req = req.header(header::AUTHORIZATION, auth);
        }
        let key = match (&self.auth_source, self.auth.is_some()) {
            (Some(k), _) => *k,
            (None, _) => "target.url",
        };
        match req.send().await {
            Ok(resp) => match resp.status().as_u16() {
                200..=299 | 400 | 422 => Finding::ok("target", format!("{} answers {}", self.url, resp.status())),
                401 | 403 => Finding::fail(
                    "target",
                    format!("{} refuses the credentials ({}): check {key}", self.url, resp.status()),
                ),
                404 | 405 => Finding::fail(
                    "target",
                    format!("{} answers {}: check target.url", self.url, resp.status()),
                ),
                _ => Finding::warn("target", format!("{} answers {}", self.url, resp.status())),
            },
            Err(e) => Finding::fail("target", format!("{}: {}", self.url, chain(&e))),
        }
    }
}

/// DESIGN §3: 2xx done; the rest as `Outcome::from_status` says.
pub fn classify(status: StatusCode) -> Outcome {
    if status.is_success() {
        Outcome::Delivered
    } else {
        Outcome::from_status(status, "", "", "target.secret_file")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_rules() {
        for (code, want) in [
            (200, 'd'),
            (204, 'd'),
            (408, 'r'),
            (425, 'r'),
            (429, 'r'),
            (500, 'r'),
            (503, 'r'),
            (400, 'p'),
            (401, 'p'),
            (404, 'p'),
            (409, 'p'),
            (301, 'p'),
        ] {
            let got = match classify(StatusCode::from_u16(code).unwrap()) {
                Outcome::Delivered | Outcome::Ignored(_) => 'd',
                Outcome::Retry(_) | Outcome::Unreachable(_) | Outcome::ServerFault(_) => 'r',
                Outcome::Permanent(_) => 'p',
            };
            assert_eq!(got, want, "HTTP {code}");
        }
    }
}
