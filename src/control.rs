//! The admin socket in `state_dir`: redb allows one process, so the CLI asks
//! the running daemon, and opens the spool itself only when none runs.
//!
//! Protocol: one JSON request per connection, one JSON answer, both a line.

use crate::spool::{now_ms, Record, Spool, State};
use serde::{Deserialize, Serialize};
use std::{
    io::{self, BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::Path,
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
    List { all: bool },
    Show { id: String },
    Retry { id: String },
    RetryAll,
    Delete { id: String },
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
    let result = match req {
        Request::List { all } => spool.list(*all).map(|r| ok(Some(r), None)),
        Request::Show { id } => spool.get(id).map(|r| match r {
            Some(r) => ok(Some(vec![r]), None),
            None => Response::error(format!("no record {id}")),
        }),
        Request::Retry { id } => spool.retry(id).map(|found| match found {
            true => ok(None, Some(1)),
            false => Response::error(format!("no record {id}")),
        }),
        Request::RetryAll => spool.retry_all().map(|n| ok(None, Some(n))),
        Request::Delete { id } => spool.delete(id).map(|found| match found {
            true => ok(None, Some(1)),
            false => Response::error(format!("no record {id}")),
        }),
    };
    result.unwrap_or_else(|e| Response::error(e.0))
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
pub async fn serve(listener: UnixListener, spool: Spool) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!("control socket: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let spool = spool.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader = tokio::io::BufReader::new(read.take(MAX_REQUEST));
            let response =
                match tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
                    .await
                {
                    Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
                        Ok(req) => {
                            if !matches!(req, Request::List { .. } | Request::Show { .. }) {
                                info!(
                                    "control: {}",
                                    serde_json::to_string(&req).unwrap_or_default()
                                );
                            }
                            tokio::task::spawn_blocking(move || handle(&spool, &req))
                                .await
                                .unwrap_or_else(|e| Response::error(e.to_string()))
                        }
                        Err(e) => Response::error(format!("bad request: {e}")),
                    },
                    _ => return,
                };
            if let Ok(mut out) = serde_json::to_vec(&response) {
                out.push(b'\n');
                let _ = write.write_all(&out).await;
            }
        });
    }
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
    let mut stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ClientError::NoDaemon)
        }
        Err(e) => return Err(ClientError::Other(format!("{}: {e}", path.display()))),
    };
    let io_err =
        |e: io::Error| ClientError::Other(format!("control socket {}: {e}", path.display()));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io_err)?;
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .map_err(io_err)?;
    let mut line = serde_json::to_vec(req).map_err(|e| ClientError::Other(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io_err)?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(io_err)?;
    serde_json::from_str(&answer)
        .map_err(|e| ClientError::Other(format!("bad answer from daemon: {e}")))
}

/// Asks the daemon, or, when none runs, opens the spool directly.
pub fn request_or_open(
    control: &Path,
    spool_path: &Path,
    req: &Request,
) -> Result<Response, String> {
    match request(control, req) {
        Ok(r) => Ok(r),
        Err(ClientError::Other(e)) => Err(e),
        Err(ClientError::NoDaemon) => {
            if !spool_path.exists() {
                return Err(format!(
                    "no spool at {} and no daemon running",
                    spool_path.display()
                ));
            }
            let spool = Spool::open(spool_path).map_err(|e| e.0)?;
            Ok(handle(&spool, req))
        }
    }
}

/// `queue list` output: one line per record.
pub fn format_list(records: &[Record]) -> String {
    let now = now_ms();
    let mut out = format!(
        "{:<32} {:<9} {:<6} {:>8} {:>8} {:<12} {:<14} {}\n",
        "ID", "STATE", "KIND", "ATTEMPTS", "AGE", "TOKEN", "QUEUE-ID", "LAST-ERROR"
    );
    for r in records {
        out.push_str(&format!(
            "{:<32} {:<9} {:<6} {:>8} {:>8} {:<12} {:<14} {}\n",
            r.id,
            r.state.as_str(),
            r.kind,
            r.attempts,
            human_age(now.saturating_sub(r.created_ms)),
            r.token_prefix,
            r.queue_id.as_deref().unwrap_or("-"),
            r.last_error.as_deref().unwrap_or("")
        ));
    }
    let pending = records.iter().filter(|r| r.state == State::Pending).count();
    let failed = records.iter().filter(|r| r.state == State::Failed).count();
    out.push_str(&format!("-- {pending} pending, {failed} failed\n"));
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
