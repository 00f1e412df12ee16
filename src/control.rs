//! The admin socket in `state_dir`: redb allows one process, so the CLI asks
//! the running daemon, and opens the spool itself only when none runs.
//!
//! Protocol: one JSON request per connection, one JSON answer, both a line;
//! `deliver` sends the message's bytes right after its request line.

use crate::{
    clock::now_ms,
    deliver::{self, Verdict},
    errors,
    milter::Shared,
    spool::{Record, Spool, State},
    tokens::{self, TokenRecord, TokenStore},
};
use serde::{Deserialize, Serialize};
use std::{
    io::{self, BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::Path,
    sync::Arc,
    time::Duration,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt},
    net::UnixListener,
};
use tracing::{info, warn};

const MAX_REQUEST: u64 = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    List {
        all: bool,
    },
    Show {
        id: String,
    },
    Retry {
        id: String,
    },
    RetryAll,
    Delete {
        id: String,
    },
    TokensList,
    TokensShow {
        token: String,
    },
    TokensAdd {
        organizer: String,
        /// One attendee, or several sharing one token.
        attendees: Vec<String>,
        uid: String,
    },
    TokensRevoke {
        token: String,
    },
    /// Removes tokens unused for `days_to_live` days.
    TokensPurge {
        days_to_live: u32,
    },
    /// CalendarServer's IMIP_TOKENS as CSV.
    TokensImport {
        csv: String,
        /// Over the control socket: the CSV follows the request line, this long.
        #[serde(default)]
        bytes: u64,
    },
    /// What the journal holds that matches.
    Journal {
        filter: crate::journal::Filter,
    },
    /// Followed by `bytes` bytes of message.
    Deliver {
        rcpt: String,
        sender: String,
        queue_id: Option<String>,
        #[serde(default)]
        client_addr: Option<String>,
        bytes: u64,
    },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records: Option<Vec<Record>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Vec<TokenRecord>>,
    /// Lines an import could not read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<crate::journal::Event>>,
    /// `queue list` from the daemon: since when (ms) it takes the target as down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_down_since_ms: Option<u64>,
}

impl Response {
    fn error(e: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(e.into()),
            ..Default::default()
        }
    }
}

/// Carries out a request on an open spool.
pub fn handle(spool: &Spool, req: &Request) -> Response {
    let ok = |records: Option<Vec<Record>>, count: Option<usize>| Response {
        ok: true,
        records,
        count,
        ..Default::default()
    };
    // What the writer still holds (outcomes and journal events wait there
    // for company) is committed first, so answers are current.
    if let Err(e) = spool.settle() {
        return Response::error(errors::chain(&e));
    }
    let result = match req {
        Request::List { all } => spool.list(*all).map(|r| Response {
            target_down_since_ms: spool.target_down_since(),
            ..ok(Some(r), None)
        }),
        Request::Show { id } => spool.find(id).map(|found| match found.is_empty() {
            false => ok(Some(found), None),
            true => Response::error(no_record(id)),
        }),
        // What `show` takes: an id, a prefix of one, a queue id or a
        // Message-ID. Retry makes every record it names due; delete wants
        // exactly one.
        Request::Retry { id } => spool.find(id).and_then(|found| match found.as_slice() {
            [] => Ok(Response::error(no_record(id))),
            records => {
                let mut n = 0;
                for r in records {
                    if spool.retry(&r.id)? {
                        n += 1;
                    }
                }
                Ok(ok(None, Some(n)))
            }
        }),
        Request::RetryAll => spool.retry_all().map(|n| ok(None, Some(n))),
        Request::Delete { id } => spool.find(id).and_then(|found| match found.as_slice() {
            [] => Ok(Response::error(no_record(id))),
            [one] => spool.delete(&one.id).map(|deleted| match deleted {
                true => ok(None, Some(1)),
                false => Response::error(no_record(id)),
            }),
            many => Ok(Response::error(format!(
                "{} names {} records; give the id of one (queue show {})",
                crate::address::printable(id),
                many.len(),
                crate::address::printable(id)
            ))),
        }),
        // Events the writer holds (it lets them wait for company) first.
        Request::Journal { filter } => spool
            .settle()
            .and_then(|()| spool.journal(filter))
            .map(|events| Response {
                ok: true,
                events: Some(events),
                ..Default::default()
            }),
        Request::Deliver { .. } => Ok(Response::error("deliver needs the message")),
        _ => return Response::error("not a spool request"),
    };
    result.unwrap_or_else(|e| Response::error(errors::chain(&e)))
}

fn no_record(id: &str) -> String {
    format!(
        "no record {} (an id, a prefix of one, a queue id or a Message-ID)",
        crate::address::printable(id)
    )
}

/// Tokens a prefix must have at least: fewer would name too many to act on.
const MIN_TOKEN_PREFIX: usize = 4;

/// The token `given` names, with its record: the token itself, or the one
/// token it is a prefix of (as `tokens list` prints them, `…` and all).
async fn resolve_token(store: &dyn TokenStore, given: &str) -> Result<Result<TokenRecord, String>, tokens::StoreError> {
    if let Some(t) = store.get(given).await? {
        return Ok(Ok(t));
    }
    let prefix = given.trim_end_matches('…');
    if prefix.chars().count() < MIN_TOKEN_PREFIX {
        return Ok(Err("no such token".into()));
    }
    let mut matching: Vec<TokenRecord> = store
        .list()
        .await?
        .into_iter()
        .filter(|t| t.token.starts_with(prefix))
        .collect();
    Ok(match matching.len() {
        0 => Err("no such token".into()),
        1 => Ok(matching.remove(0)),
        n => Err(format!(
            "{} is the prefix of {n} tokens; give more of it",
            crate::address::printable(prefix)
        )),
    })
}

/// Whether `req` is about tokens (answered by `handle_tokens`).
pub fn is_token_request(req: &Request) -> bool {
    matches!(
        req,
        Request::TokensList
            | Request::TokensShow { .. }
            | Request::TokensAdd { .. }
            | Request::TokensRevoke { .. }
            | Request::TokensPurge { .. }
            | Request::TokensImport { .. }
    )
}

/// Carries out a token request on the configured store.
pub async fn handle_tokens(store: &dyn TokenStore, req: &Request) -> Response {
    let with = |tokens: Vec<TokenRecord>, count: usize| Response {
        ok: true,
        tokens: Some(tokens),
        count: Some(count),
        ..Default::default()
    };
    let now = now_ms();
    let result = match req {
        Request::TokensList => store.list().await.map(|t| {
            let n = t.len();
            with(t, n)
        }),
        Request::TokensShow { token } => resolve_token(store, token).await.map(|found| match found {
            Ok(t) => with(vec![t], 1),
            Err(why) => Response::error(why),
        }),
        Request::TokensAdd {
            organizer,
            attendees,
            uid,
        } => match attendees.as_slice() {
            [one] => tokens::mint_or_reuse(store, organizer, one, uid, None, now).await,
            many => tokens::mint_or_reuse_shared(store, organizer, uid, many, None, now).await,
        }
        .map(|t| with(vec![t], 1)),
        Request::TokensRevoke { token } => match resolve_token(store, token).await {
            Ok(Ok(t)) => store.revoke(&t.token).await.map(|found| match found {
                true => with(Vec::new(), 1),
                false => Response::error("no such token"),
            }),
            Ok(Err(why)) => Ok(Response::error(why)),
            Err(e) => Err(e),
        },
        Request::TokensPurge { days_to_live } => purge(store, now, *days_to_live).await.map(|n| with(Vec::new(), n)),
        Request::TokensImport { csv, .. } => {
            let (records, problems) = tokens::parse_csv(csv, now);
            let mut n = 0;
            let mut result = Ok(());
            for r in &records {
                if let Err(e) = store.put(r).await {
                    result = Err(e);
                    break;
                }
                n += 1;
            }
            result.map(|()| Response {
                problems,
                ..with(Vec::new(), n)
            })
        }
        _ => return Response::error("not a token request"),
    };
    result.unwrap_or_else(|e| Response::error(errors::chain(&e)))
}

/// Tokens unused for `days_to_live` go, in one statement on a database.
async fn purge(store: &dyn TokenStore, now: u64, days_to_live: u32) -> Result<usize, tokens::StoreError> {
    store
        .purge(now.saturating_sub(u64::from(days_to_live) * 86_400_000))
        .await
}

/// Binds the control socket (replacing a stale one), readable by the owner only.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    match UnixStream::connect(path) {
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("another imip-milter answers on {}", path.display()),
            ))
        }
        Err(_) => {
            let _ = std::fs::remove_file(path);
        }
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the control socket until the task is dropped.
pub async fn serve(listener: UnixListener, shared: Arc<Shared>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!("control socket: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut reader = tokio::io::BufReader::new(read);
            let Some(response) = answer(&mut reader, &shared).await else {
                return;
            };
            if let Ok(mut out) = serde_json::to_vec(&response) {
                out.push(b'\n');
                let _ = write.write_all(&out).await;
            }
        });
    }
}

async fn answer(reader: &mut (impl AsyncBufReadExt + Unpin), shared: &Shared) -> Option<Response> {
    let mut line = String::new();
    let mut limited = (&mut *reader).take(MAX_REQUEST);
    match tokio::time::timeout(Duration::from_secs(10), limited.read_line(&mut line)).await {
        Ok(Ok(n)) if n > 0 => {}
        _ => return None,
    }
    let req = match serde_json::from_str::<Request>(&line) {
        Ok(r) => r,
        Err(e) => return Some(Response::error(format!("bad request: {e}"))),
    };
    if let Request::Deliver {
        rcpt,
        sender,
        queue_id,
        client_addr,
        bytes,
    } = req
    {
        let limit = shared.settings().max_message_bytes;
        if bytes > limit as u64 {
            let verdict = deliver::too_large(limit);
            return Some(Response {
                ok: true,
                verdict: Some(verdict),
                ..Default::default()
            });
        }
        let mut raw = Vec::with_capacity(bytes as usize);
        let mut limited = (&mut *reader).take(bytes);
        match tokio::time::timeout(Duration::from_secs(60), limited.read_to_end(&mut raw)).await {
            Ok(Ok(n)) if n as u64 == bytes => {}
            _ => return Some(Response::error("message incomplete")),
        }
        let verdict = deliver::take(shared, &rcpt, &sender, queue_id, client_addr, raw).await;
        return Some(Response {
            ok: true,
            verdict: Some(verdict),
            ..Default::default()
        });
    }
    let mut req = req;
    if let Request::TokensImport { csv, bytes } = &mut req {
        if *bytes > MAX_IMPORT {
            return Some(Response::error(format!("a token file of more than {MAX_IMPORT} bytes")));
        }
        let mut raw = Vec::with_capacity(*bytes as usize);
        let mut limited = (&mut *reader).take(*bytes);
        match tokio::time::timeout(Duration::from_secs(60), limited.read_to_end(&mut raw)).await {
            Ok(Ok(n)) if n as u64 == *bytes => {}
            _ => return Some(Response::error("token file incomplete")),
        }
        csv.push_str(&String::from_utf8_lossy(&raw));
    }
    if !matches!(
        req,
        Request::List { .. } | Request::Show { .. } | Request::TokensList | Request::TokensShow { .. }
    ) {
        // The command only: arguments may hold tokens.
        let v = serde_json::to_value(&req).unwrap_or_default();
        info!("control: {}", v["cmd"].as_str().unwrap_or("?"));
    }
    if is_token_request(&req) {
        let store = match &shared.settings().tokens {
            Some(local) => local.store.clone(),
            // Remote token mode: the commands still work on this host's store.
            None => match tokens::RedbTokens::new(&shared.spool) {
                Ok(s) => Arc::new(s),
                Err(e) => return Some(Response::error(errors::chain(&e))),
            },
        };
        return Some(handle_tokens(store.as_ref(), &req).await);
    }
    let spool = shared.spool.clone();
    Some(
        tokio::task::spawn_blocking(move || handle(&spool, &req))
            .await
            .unwrap_or_else(|e| Response::error(e.to_string())),
    )
}

/// Why the CLI could not get an answer from a daemon.
#[derive(Debug)]
pub enum ClientError {
    /// No daemon listens: the caller may open the spool itself.
    NoDaemon,
    Other(String),
}

/// Sends one request to the daemon.
pub fn request(path: &Path, req: &Request) -> Result<Response, ClientError> {
    request_with(path, req, &[])
}

/// Sends one request and `payload` right after it.
pub fn request_with(path: &Path, req: &Request, payload: &[u8]) -> Result<Response, ClientError> {
    let mut stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
            return Err(ClientError::NoDaemon)
        }
        Err(e) => return Err(ClientError::Other(format!("{}: {e}", path.display()))),
    };
    let io_err = |e: io::Error| ClientError::Other(format!("control socket {}: {e}", path.display()));
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(io_err)?;
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .map_err(io_err)?;
    let mut line = serde_json::to_vec(req).map_err(|e| ClientError::Other(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io_err)?;
    stream.write_all(payload).map_err(io_err)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(io_err)?;
    serde_json::from_str(&answer).map_err(|e| ClientError::Other(format!("bad answer from daemon: {e}")))
}

/// The largest token file `tokens import` sends (CalendarServer's
/// IMIP_TOKENS of a large site is a few MB).
pub const MAX_IMPORT: u64 = 256 << 20;

/// Asks the daemon, or, when none runs, opens the spool directly.
pub fn request_or_open(config: &crate::config::Config, req: &Request) -> Result<Response, String> {
    let spool_path = config.spool_path();
    match request(&config.control_path(), req) {
        Ok(r) => Ok(r),
        Err(ClientError::Other(e)) => Err(e),
        Err(ClientError::NoDaemon) => {
            let creates = !spool_path.exists();
            let writes_tokens = matches!(req, Request::TokensAdd { .. } | Request::TokensImport { .. });
            if creates && !writes_tokens {
                return Err(format!("no spool at {} and no daemon running", spool_path.display()));
            }
            // The caller runs as state_dir's owner already (privileges).
            let spool = Spool::open_waiting(&spool_path, Duration::from_secs(10)).map_err(|e| errors::chain(&e))?;
            if !is_token_request(req) {
                return Ok(handle(&spool, req));
            }
            let store = tokens::open(&config.tokens, &spool).map_err(|e| errors::chain(&e))?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start a runtime: {e}"))?;
            Ok(runtime.block_on(handle_tokens(store.as_ref(), req)))
        }
    }
}

/// `queue list` output: one line per record; a last line when the daemon
/// takes the target as down.
pub fn format_list(records: &[Record], target_down_since_ms: Option<u64>) -> String {
    let now = now_ms();
    let mut out = format!(
        "{:<32} {:<9} {:<6} {:>8} {:>8} {:<12} {:<14} {}\n",
        "ID", "STATE", "KIND", "ATTEMPTS", "AGE", "TOKEN", "QUEUE-ID", "LAST-ERROR"
    );
    // Text from mail, Postfix and servers: escape sequences shown, not obeyed.
    let shown = crate::address::printable;
    for r in records {
        out.push_str(&format!(
            "{:<32} {:<9} {:<6} {:>8} {:>8} {:<12} {:<14} {}\n",
            shown(&r.id),
            r.state.as_str(),
            shown(&r.kind),
            r.attempts,
            human_age(now.saturating_sub(r.created_ms)),
            shown(&r.token_prefix),
            shown(r.queue_id.as_deref().unwrap_or("-")),
            shown(r.last_error.as_deref().unwrap_or(""))
        ));
    }
    // The footer counts what is listed above it.
    let count = |s: State| records.iter().filter(|r| r.state == s).count();
    let delivered = count(State::Delivered);
    out.push_str(&format!(
        "-- {} pending, {} failed{}\n",
        count(State::Pending),
        count(State::Failed),
        if delivered > 0 {
            format!(", {delivered} delivered")
        } else {
            String::new()
        }
    ));
    if let Some(since) = target_down_since_ms {
        let at =
            chrono::DateTime::from_timestamp_millis(since as i64).map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string());
        out.push_str(&format!(
            "-- target down since {} ({} ago): {} attempts in a row got no answer; one probe per delivery.probe_interval\n",
            at.unwrap_or_default(),
            human_age(now.saturating_sub(since)),
            crate::forward::DOWN_AFTER
        ));
    }
    out
}

fn human_age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}
