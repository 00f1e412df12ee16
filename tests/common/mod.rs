//! Test support: a real HTTP webhook that enforces the delivery contract, an
//! SMTP client, the milter in-process or as the real daemon, and a private
//! Postfix instance.
#![allow(dead_code)]

pub mod cyrus;
pub mod davical;
pub mod postfix;
pub mod postgres;
pub mod proxy;
pub mod radicale;
pub mod sogo;
pub mod tls;
pub mod xandikos;

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener as StdTcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

pub const TOKEN: &str = "8e3c0d1a-5b7e-4f61-9a0c-2d4f3b6a7c81";

pub fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    StdTcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Waits until `cond` holds, up to `limit`.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    cond()
}

/// One request the webhook accepted.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub idempotency_key: String,
    pub authorization: Option<String>,
    /// The JSON document (webhook).
    pub body: serde_json::Value,
    /// The request body as text (calendarserver: the iTIP data).
    pub text: String,
    pub headers: HashMap<String, String>,
    /// When the request was accepted.
    pub at: Instant,
}

#[derive(Default)]
struct WebhookState {
    accepted: Vec<Delivery>,
    refused: Vec<String>,
    /// Answer this status to the next N well-formed requests.
    fail_next: Vec<u16>,
    /// The Authorization header every request must carry, if any.
    expected_auth: Option<String>,
    /// Play CalendarServer's injection endpoint with this shared secret.
    calendarserver_secret: Option<String>,
    /// request-status of the next schedule-responses, instead of 2.0.
    status_next: Vec<&'static str>,
    /// Serve further requests on a connection (HTTP/1.1 keep-alive), as a
    /// production web server does; otherwise close it after each answer.
    keep_alive: bool,
    /// TCP connections accepted.
    connections: usize,
}

/// A real HTTP/1.1 server on loopback playing the calendar server's webhook.
/// It refuses (400) what the contract forbids: another method or path, a
/// missing or wrong Content-Type or Idempotency-Key, a body without the
/// fields of DESIGN §3.
pub struct Webhook {
    pub port: u16,
    pub path: String,
    state: Arc<Mutex<WebhookState>>,
    stop: Arc<Mutex<bool>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Webhook {
    pub fn start() -> Self {
        // Bound here, not probed first: parallel tests race for probed ports.
        let listener = StdTcpListener::bind("127.0.0.1:0").expect("webhook bind");
        Self::serve_on(listener, Arc::new(Mutex::new(WebhookState::default())))
    }

    pub fn start_on(port: u16) -> Self {
        let state = Arc::new(Mutex::new(WebhookState::default()));
        Self::start_with(port, state)
    }

    fn start_with(port: u16, state: Arc<Mutex<WebhookState>>) -> Self {
        let listener = StdTcpListener::bind(("127.0.0.1", port)).expect("webhook bind");
        Self::serve_on(listener, state)
    }

    fn serve_on(listener: StdTcpListener, state: Arc<Mutex<WebhookState>>) -> Self {
        let port = listener.local_addr().expect("webhook port").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(Mutex::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let path = "/imip".to_owned();
        let p = path.clone();
        let thread = thread::spawn(move || loop {
            if *sp.lock().unwrap() {
                return;
            }
            match listener.accept() {
                Ok((stream, _)) => {
                    st.lock().unwrap().connections += 1;
                    let st = st.clone();
                    let p = p.clone();
                    let sp = sp.clone();
                    thread::spawn(move || {
                        // Keep-alive: requests on one connection until the
                        // client closes it, an idle minute passes or the server stops.
                        while serve(&stream, &st, &p) && !*sp.lock().unwrap() {}
                    });
                }
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        });
        Self {
            port,
            path,
            state,
            stop,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}{}", self.port, self.path)
    }

    /// Stops listening: connections are refused until `restart`.
    pub fn stop(&mut self) {
        *self.stop.lock().unwrap() = true;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        let again = Self::start_with(self.port, self.state.clone());
        *self = again;
    }

    /// Play CalendarServer's legacy injection endpoint (POST /inbox/),
    /// requiring this shared secret in x-calendarserver-internal.
    pub fn calendarserver(&self, secret: &str) {
        self.state.lock().unwrap().calendarserver_secret = Some(secret.to_owned());
    }

    /// The request-status of the next schedule-responses.
    pub fn request_status_next(&self, statuses: &[&'static str]) {
        self.state.lock().unwrap().status_next = statuses.to_vec();
    }

    /// The base URL (for calendarserver: {base}/inbox/).
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Keep connections open between requests, as a production server does.
    pub fn keep_alive(&self) {
        self.state.lock().unwrap().keep_alive = true;
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.lock().unwrap().connections
    }

    /// Refuse (401) requests without this Authorization header.
    pub fn require_auth(&self, value: &str) {
        self.state.lock().unwrap().expected_auth = Some(value.to_owned());
    }

    pub fn fail_next(&self, statuses: &[u16]) {
        self.state.lock().unwrap().fail_next = statuses.to_vec();
    }

    /// How many requests were accepted, and when the first and the last were.
    pub fn delivered(&self) -> (usize, Option<(Instant, Instant)>) {
        let st = self.state.lock().unwrap();
        let span = st.accepted.first().zip(st.accepted.last()).map(|(a, b)| (a.at, b.at));
        (st.accepted.len(), span)
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.state.lock().unwrap().accepted.clone()
    }

    pub fn refused(&self) -> Vec<String> {
        self.state.lock().unwrap().refused.clone()
    }

    pub fn wait_for(&self, n: usize, limit: Duration) -> Vec<Delivery> {
        wait_until(limit, || self.deliveries().len() >= n);
        self.deliveries()
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Answers one request; true when the connection stays open for the next.
fn serve(mut stream: &TcpStream, state: &Mutex<WebhookState>, path: &str) -> bool {
    let keep_alive = state.lock().unwrap().keep_alive;
    // Idle longer than the daemon's HTTP pool (90 s) keeps its connections:
    // the client, not the server, closes them.
    let idle = if keep_alive { 100 } else { 10 };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(idle)));
    // HTTP/1.1 clients send the next request only after this answer, so
    // the buffer holds nothing beyond this request when it is dropped.
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
        return false;
    }
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return false;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let len: usize = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
    let mut body = vec![0; len];
    if reader.read_exact(&mut body).is_err() {
        return false;
    }
    let (expected, secret) = {
        let st = state.lock().unwrap();
        (st.expected_auth.clone(), st.calendarserver_secret.clone())
    };
    let (status, why) = match (expected, &secret) {
        (Some(want), _) if headers.get("authorization") != Some(&want) => (401, "credentials refused".to_owned()),
        (_, Some(secret)) => check_injection(&request_line, &headers, &body, secret),
        _ => check(&request_line, &headers, &body, path),
    };
    let status = if status == 200 {
        let mut st = state.lock().unwrap();
        if st.fail_next.is_empty() {
            st.accepted.push(Delivery {
                idempotency_key: headers.get("idempotency-key").cloned().unwrap_or_default(),
                authorization: headers.get("authorization").cloned(),
                body: serde_json::from_slice(&body).unwrap_or_default(),
                text: String::from_utf8_lossy(&body).into_owned(),
                headers: headers.clone(),
                at: Instant::now(),
            });
            200
        } else {
            st.fail_next.remove(0)
        }
    } else {
        state.lock().unwrap().refused.push(why.clone());
        status
    };
    let why = match (&secret, status) {
        (Some(_), 200) => {
            let rs = {
                let mut st = state.lock().unwrap();
                if st.status_next.is_empty() {
                    "2.0;Success"
                } else {
                    st.status_next.remove(0)
                }
            };
            schedule_response(headers.get("recipient").map(String::as_str).unwrap_or(""), rs)
        }
        _ => why,
    };
    let connection = if keep_alive { "keep-alive" } else { "close" };
    // One write: in pieces, Nagle holds the second until the client's
    // delayed ACK (40 ms per request on a kept-alive connection).
    let answer = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{why}",
        why.len()
    );
    stream.write_all(answer.as_bytes()).is_ok() && keep_alive
}

/// CalDAV's schedule-response, as CalendarServer answers an injection.
fn schedule_response(recipient: &str, request_status: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<C:schedule-response xmlns:D=\"DAV:\" xmlns:C=\"urn:ietf:params:xml:ns:caldav\">\n  <C:response>\n    <C:recipient><D:href>{recipient}</D:href></C:recipient>\n    <C:request-status>{request_status}</C:request-status>\n  </C:response>\n</C:schedule-response>\n"
    )
}

/// CalendarServer's checks on an injected iTIP message (DESIGN §5): the
/// path, the headers, the secret, one ATTENDEE who is the Originator, and the
/// real ORGANIZER, who is the Recipient.
fn check_injection(request_line: &str, headers: &HashMap<String, String>, body: &[u8], secret: &str) -> (u16, String) {
    let mut parts = request_line.split_whitespace();
    if parts.next() != Some("POST") {
        return (405, "method must be POST".into());
    }
    if parts.next() != Some("/inbox/") {
        return (404, "injection goes to /inbox/".into());
    }
    if headers.get("x-calendarserver-internal").map(String::as_str) != Some(secret) {
        return (403, "shared secret missing or wrong".into());
    }
    if !headers
        .get("content-type")
        .is_some_and(|c| c.starts_with("text/calendar"))
    {
        return (415, "Content-Type must be text/calendar".into());
    }
    let (Some(originator), Some(recipient)) = (headers.get("originator"), headers.get("recipient")) else {
        return (400, "Originator and Recipient headers are required".into());
    };
    if !originator.starts_with("mailto:") || !recipient.starts_with("mailto:") {
        return (400, "Originator and Recipient must be mailto: URIs".into());
    }
    let text = String::from_utf8_lossy(body).replace("\r\n ", "").replace("\r\n\t", "");
    // CalendarServer's gateway injects what the attendee sent, as from the
    // attendee; its scheduler acts on an attendee's REPLY, REFRESH and COUNTER.
    let attendee_methods = ["REPLY", "COUNTER", "REFRESH"];
    if !text.lines().any(|l| {
        let l = l.trim_end();
        l.len() > 7
            && l[..7].eq_ignore_ascii_case("METHOD:")
            && attendee_methods.iter().any(|m| l[7..].eq_ignore_ascii_case(m))
    }) {
        return (
            400,
            "METHOD must be one an attendee sends (REPLY, COUNTER, REFRESH)".into(),
        );
    }
    // The value starts after the first colon outside a quoted parameter.
    let value = |l: &str| {
        let mut quoted = false;
        for (i, c) in l.char_indices() {
            match c {
                '"' => quoted = !quoted,
                ':' if !quoted => return l[i + 1..].trim().to_ascii_lowercase(),
                _ => {}
            }
        }
        String::new()
    };
    let mut in_component = false;
    let (mut attendees, mut organizers): (Vec<String>, Vec<String>) = (Vec::new(), Vec::new());
    for l in text.lines() {
        let upper = l.to_ascii_uppercase();
        if upper.starts_with("BEGIN:VEVENT") || upper.starts_with("BEGIN:VTODO") {
            in_component = true;
            attendees.clear();
            organizers.clear();
        } else if upper.starts_with("END:VEVENT") || upper.starts_with("END:VTODO") {
            if attendees.len() != 1 {
                return (
                    400,
                    format!("exactly one ATTENDEE per component, found {}", attendees.len()),
                );
            }
            if organizers.len() != 1 {
                return (400, "ORGANIZER missing".into());
            }
            if organizers[0] != recipient.to_ascii_lowercase() || organizers[0].contains("calendar+") {
                return (
                    400,
                    format!("ORGANIZER {} is not the real organizer {recipient}", organizers[0]),
                );
            }
            if attendees[0] != originator.to_ascii_lowercase() {
                return (
                    400,
                    format!("ATTENDEE {} is not the Originator {originator}", attendees[0]),
                );
            }
            in_component = false;
        } else if in_component && (upper.starts_with("ATTENDEE;") || upper.starts_with("ATTENDEE:")) {
            attendees.push(value(l));
        } else if in_component && (upper.starts_with("ORGANIZER;") || upper.starts_with("ORGANIZER:")) {
            organizers.push(value(l));
        }
    }
    (200, String::new())
}

fn check(request_line: &str, headers: &HashMap<String, String>, body: &[u8], path: &str) -> (u16, String) {
    let mut parts = request_line.split_whitespace();
    if parts.next() != Some("POST") {
        return (405, "method must be POST".into());
    }
    if parts.next() != Some(path) {
        return (404, "wrong path".into());
    }
    if headers.get("content-type").map(String::as_str) != Some("application/json") {
        return (415, "Content-Type must be application/json".into());
    }
    let Some(key) = headers.get("idempotency-key") else {
        return (400, "Idempotency-Key missing".into());
    };
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(body) else {
        return (400, "body is not JSON".into());
    };
    if doc["id"].as_str() != Some(key.as_str()) {
        return (400, "Idempotency-Key differs from id".into());
    }
    for field in [
        "id",
        "kind",
        "received_at",
        "queue_id",
        "message_id",
        "envelope",
        "from",
        "token",
        "method",
        "uid",
        "attendee",
        "partstat",
        "authentication_results",
        "icalendar",
    ] {
        if doc.get(field).is_none() {
            return (400, format!("field {field} missing"));
        }
    }
    for field in ["mail_from", "rcpt", "client_addr"] {
        if doc["envelope"].get(field).is_none() {
            return (400, format!("field envelope.{field} missing"));
        }
    }
    match doc["kind"].as_str() {
        Some("reply") => {
            let method = doc["method"].as_str().unwrap_or("");
            if !["REPLY", "COUNTER", "REFRESH"].contains(&method)
                || !doc["attendee"].as_str().is_some_and(|a| a.starts_with("mailto:"))
            {
                return (400, "a reply needs an attendee's METHOD and a mailto: attendee".into());
            }
        }
        Some("bounce") => {
            if doc["bounce"]["action"] != "failed" {
                return (400, "a bounce needs bounce.action failed".into());
            }
            if !doc["partstat"].is_null() || !doc["attendee"].as_str().is_some_and(|a| a.starts_with("mailto:")) {
                return (
                    400,
                    "a bounce names the failed attendee (mailto:) and no partstat".into(),
                );
            }
        }
        _ => return (400, "kind must be reply or bounce".into()),
    }
    if doc["received_at"]
        .as_str()
        .is_none_or(|t| !t.ends_with('Z') || t.len() < 20)
    {
        return (400, "received_at must be RFC 3339 UTC".into());
    }
    (200, "ok".into())
}

/// `imip-milter ARGS --config CONFIG`, as an administrator runs it.
pub fn cli(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_imip-milter"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("imip-milter")
}

/// `imip-milter tokens add` for one attendee; the token it prints.
pub fn add_token(config: &Path, organizer: &str, attendee: &str, uid: &str) -> String {
    let out = cli(
        config,
        &[
            "tokens",
            "add",
            "--organizer",
            organizer,
            "--attendee",
            attendee,
            "--uid",
            uid,
        ],
    );
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(token.len(), 36, "{token}{}", String::from_utf8_lossy(&out.stderr));
    token
}

/// A configuration for tests; `extra` is appended to the [target] section.
pub fn config_text(state_dir: &Path, listen: &str, webhook_url: &str, extra: &str) -> String {
    format!(
        r#"listen = "{listen}"
state_dir = "{}"
max_message_bytes = 1000000
log_level = "debug"

[gateway]
addresses = ["calendar@example.org", "replies@example.net"]
delimiters = "+"

[delivery]
initial_backoff = "200ms"
max_backoff = "1s"
probe_interval = "1s"

[target]
kind = "webhook"
url = "{webhook_url}"
timeout = "5s"
{extra}"#,
        state_dir.display()
    )
}

/// The milter in-process on an ephemeral port.
pub struct InProcess {
    pub addr: SocketAddr,
    pub state_dir: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), imip_milter::Error>>>,
}

impl InProcess {
    pub async fn start(webhook_url: &str) -> Self {
        Self::start_with(webhook_url, "").await
    }

    pub async fn start_with(webhook_url: &str, extra: &str) -> Self {
        let extra = extra.to_owned();
        Self::start_edited(webhook_url, move |c| format!("{c}{extra}")).await
    }

    /// With the configuration text passed through `edit`.
    pub async fn start_edited(webhook_url: &str, edit: impl FnOnce(String) -> String) -> Self {
        init_logs();
        let state_dir = tempfile::tempdir().expect("tempdir");
        let text = edit(config_text(state_dir.path(), "inet:127.0.0.1:0", webhook_url, ""));
        let config = imip_milter::config::Config::parse(&text).expect("config");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let control = config.control_path();
        let task = tokio::spawn(imip_milter::run(config, listener, async move {
            let _ = rx.await;
        }));
        // Ready when the control socket answers.
        for _ in 0..200 {
            if std::os::unix::net::UnixStream::connect(&control).is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Self {
            addr,
            state_dir,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// The CLI against this milter's state_dir; `extra` as given to `start_with`.
    pub fn cli(&self, extra: &str, args: &[&str]) -> std::process::Output {
        let config = self.state_dir.path().join("cli.toml");
        let text = config_text(self.state_dir.path(), "inet:127.0.0.1:1", "http://127.0.0.1:1/", extra);
        std::fs::write(&config, text).expect("cli config");
        cli(&config, args)
    }

    /// `tokens add` for Bob in alice's event `uid`, through the CLI as `cli`
    /// runs it; the token it prints.
    pub fn add_token(&self, extra: &str, uid: &str) -> String {
        let args = [
            "tokens",
            "add",
            "--organizer",
            "alice@example.org",
            "--attendee",
            "bob@example.com",
            "--uid",
            uid,
        ];
        let out = self.cli(extra, &args);
        let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert_eq!(token.len(), 36, "{}", String::from_utf8_lossy(&out.stderr));
        token
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("join").expect("milter run");
        }
    }
}

/// The real daemon, as a child process.
pub struct Daemon {
    pub port: u16,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    /// Run as this user (uid, gid) instead of root.
    pub user: Option<(u32, u32)>,
    child: Option<Child>,
}

/// uid and gid of `nobody`, the unprivileged user of these tests.
pub fn nobody() -> (u32, u32) {
    let id = |arg: &str| {
        let out = Command::new("id").args([arg, "nobody"]).output().expect("id");
        String::from_utf8_lossy(&out.stdout).trim().parse::<u32>().expect("uid")
    };
    (id("-u"), id("-g"))
}

impl Daemon {
    pub fn start(dir: &Path, webhook_url: &str) -> Self {
        Self::start_as(dir, webhook_url, None)
    }

    /// As `start`, as an unprivileged user owning the state directory.
    pub fn start_as(dir: &Path, webhook_url: &str, user: Option<(u32, u32)>) -> Self {
        Self::start_edited(dir, webhook_url, user, |c| c)
    }

    /// As `start_as`, with the configuration text passed through `edit`.
    pub fn start_edited(
        dir: &Path,
        webhook_url: &str,
        user: Option<(u32, u32)>,
        edit: impl FnOnce(String) -> String,
    ) -> Self {
        let port = free_port();
        let state = dir.join("state");
        let config_path = dir.join("imip-milter.toml");
        let text = config_text(&state, &format!("inet:127.0.0.1:{port}"), webhook_url, "");
        std::fs::write(&config_path, edit(text)).expect("config");
        if let Some((uid, gid)) = user {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
            std::fs::create_dir_all(&state).expect("state dir");
            std::os::unix::fs::chown(&state, Some(uid), Some(gid)).expect("chown state");
        }
        let mut d = Self {
            port,
            config_path,
            log_path: dir.join("milter.log"),
            user,
            child: None,
        };
        d.spawn();
        d
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_imip-milter"));
        cmd.args(["run", "--config"])
            .arg(&self.config_path)
            .stdout(Stdio::null())
            .stderr(log);
        if let Some((uid, gid)) = self.user {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid);
        }
        let child = cmd.spawn().expect("start imip-milter");
        self.child = Some(child);
        let port = self.port;
        assert!(
            wait_until(Duration::from_secs(20), || TcpStream::connect(("127.0.0.1", port))
                .is_ok()),
            "imip-milter did not start: {}",
            self.log()
        );
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    pub fn signal(&self, sig: i32) {
        let c = self.child.as_ref().expect("running");
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as libc::pid_t, sig) };
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        c.wait().expect("wait")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        cli(&self.config_path, args)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What an SMTP server answered to one transaction.
#[derive(Debug, Default)]
pub struct SmtpOutcome {
    /// When the final dot of DATA was written.
    pub data_sent_at: Option<Instant>,
    pub rcpt: Vec<String>,
    /// The answer after the final dot (None if no recipient was accepted).
    pub data: Option<String>,
}

fn read_reply(r: &mut BufReader<TcpStream>) -> String {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return all;
        }
        all.push_str(&line);
        if line.len() < 4 || line.as_bytes()[3] != b'-' {
            return all.trim_end().to_owned();
        }
    }
}

/// Sends one message over SMTP; `data` is the message with CRLF line ends.
pub fn smtp_send(port: u16, from: &str, rcpts: &[&str], data: &[u8]) -> SmtpOutcome {
    smtp_try(port, from, rcpts, data).unwrap_or_else(|e| panic!("{e}"))
}

/// As `smtp_send`; Err says at which step the server did not go on.
pub fn smtp_try(port: u16, from: &str, rcpts: &[&str], data: &[u8]) -> Result<SmtpOutcome, String> {
    let stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let mut w = stream.try_clone().map_err(|e| e.to_string())?;
    let mut r = BufReader::new(stream);
    let banner = read_reply(&mut r);
    if !banner.starts_with("220") {
        return Err(format!("banner: {banner}"));
    }
    let timing = std::env::var_os("IMIP_SMTP_TIMING").is_some();
    let cmd = |w: &mut TcpStream, r: &mut BufReader<TcpStream>, c: &str| {
        let t = Instant::now();
        let _ = w.write_all(format!("{c}\r\n").as_bytes());
        let reply = read_reply(r);
        if timing {
            eprintln!("{:>6} ms {c}", t.elapsed().as_millis());
        }
        reply
    };
    let ehlo = cmd(&mut w, &mut r, "EHLO client.test");
    if !ehlo.starts_with("250") {
        return Err(format!("EHLO: {ehlo}"));
    }
    let mail = cmd(&mut w, &mut r, &format!("MAIL FROM:<{from}>"));
    if !mail.starts_with("250") {
        return Err(format!("MAIL: {mail}"));
    }
    let mut out = SmtpOutcome::default();
    for rcpt in rcpts {
        out.rcpt.push(cmd(&mut w, &mut r, &format!("RCPT TO:<{rcpt}>")));
    }
    if out.rcpt.iter().any(|r| r.starts_with("250")) {
        let go = cmd(&mut w, &mut r, "DATA");
        if !go.starts_with("354") {
            return Err(format!("DATA: {go}"));
        }
        let mut body = Vec::new();
        for line in data.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.first() == Some(&b'.') {
                body.push(b'.');
            }
            body.extend_from_slice(line);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b".\r\n");
        w.write_all(&body).map_err(|e| format!("DATA: {e}"))?;
        out.data_sent_at = Some(Instant::now());
        out.data = Some(read_reply(&mut r));
    }
    let _ = cmd(&mut w, &mut r, "QUIT");
    Ok(out)
}

/// After DATA: the headers of `raw` (unfolded), end of headers, the body and
/// end of message with queue id `queue_id`, as Postfix hands a message to
/// the milter; the end-of-message answer.
pub async fn milter_message(
    conn: &mut indymilter_test::TestConnection,
    raw: &[u8],
    queue_id: &str,
) -> (indymilter_test::EomActions, indymilter_test::Status) {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    for line in head.replace("\r\n ", " ").replace("\r\n\t", " ").split("\r\n") {
        let (k, v) = line.split_once(':').expect("header line");
        conn.header(k, v.trim_start()).await.unwrap();
    }
    conn.eoh().await.unwrap();
    // In chunks of the protocol's size, as Postfix sends a body.
    for chunk in body.as_bytes().chunks(65_535) {
        conn.body(chunk.to_vec()).await.unwrap();
    }
    conn.macros(indymilter_test::MacroStage::Eom, [("i", queue_id)])
        .await
        .unwrap();
    conn.eom().await.unwrap()
}

/// One transaction over the milter protocol, as Postfix runs it: `sender`
/// to the gateway address with TOKEN, the message `raw`; the answer at end
/// of message.
pub async fn milter_send(
    addr: impl tokio::net::ToSocketAddrs,
    sender: &str,
    raw: &[u8],
    queue_id: &str,
) -> indymilter_test::Status {
    let rcpt = format!("<calendar+{TOKEN}@example.org>");
    milter_send_to(addr, sender, &rcpt, raw, queue_id).await
}

/// As `milter_send`, to `rcpt`; a refusal at RCPT is the answer.
pub async fn milter_send_to(
    addr: impl tokio::net::ToSocketAddrs,
    sender: &str,
    rcpt: &str,
    raw: &[u8],
    queue_id: &str,
) -> indymilter_test::Status {
    let mut conn = indymilter_test::TestConnection::configure()
        .read_timeout(Duration::from_secs(30))
        .open_tcp(addr)
        .await
        .unwrap();
    conn.connect("client.example.com", [192, 0, 2, 9]).await.unwrap();
    conn.mail([sender]).await.unwrap();
    let at_rcpt = conn.rcpt([rcpt]).await.unwrap();
    if at_rcpt != indymilter_test::Status::Continue {
        let _ = conn.close().await;
        return at_rcpt;
    }
    conn.data().await.unwrap();
    let (_, status) = milter_message(&mut conn, raw, queue_id).await;
    let _ = conn.close().await;
    status
}

/// The slowest of `n` new milter sessions (connect and MAIL, as Postfix opens
/// one per SMTP session), 100 ms apart: what other clients wait while
/// something heavy runs.
pub async fn slowest_new_session(addr: SocketAddr, n: usize) -> Duration {
    let mut slowest = Duration::ZERO;
    for _ in 0..n {
        let t = Instant::now();
        let mut conn = indymilter_test::TestConnection::configure()
            .read_timeout(Duration::from_secs(60))
            .open_tcp(addr)
            .await
            .expect("connect to milter");
        conn.connect("client.example.com", [192, 0, 2, 7]).await.unwrap();
        conn.mail(["<carol@example.com>"]).await.unwrap();
        slowest = slowest.max(t.elapsed());
        let _ = conn.close().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    slowest
}

/// A reply message (text/calendar) around the calendar text `ics`.
pub fn calendar_message(message_id: &str, ics: &str) -> Vec<u8> {
    format!(
        "From: <bob@example.com>\r\nMessage-ID: <{message_id}>\r\nContent-Type: text/calendar; method=REPLY\r\n\r\n{ics}"
    )
    .into_bytes()
}

/// A reply from an attendee, unique per `n`.
pub fn reply_message(n: usize, token: &str) -> Vec<u8> {
    format!(
        "From: Attendee {n} <attendee{n}@example.com>\r\nTo: calendar+{token}@example.org\r\nSubject: Accepted\r\nMessage-ID: <reply-{n}@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: text/calendar; charset=utf-8; method=REPLY\r\n\r\nBEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Test//EN\r\nMETHOD:REPLY\r\nBEGIN:VEVENT\r\nUID:event-{n}@example.org\r\nDTSTAMP:20261120T100000Z\r\nATTENDEE;PARTSTAT=ACCEPTED:mailto:attendee{n}@example.com\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
    )
    .into_bytes()
}

/// Logs of the in-process milter go to the test's output.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_max_level(tracing::Level::DEBUG)
        .try_init();
}

/// A token store that counts the lookups it was asked: proof that a
/// refusal came without the store. `failing` makes every lookup fail, as a
/// database that is down or does not answer in time.
pub struct CountingStore {
    inner: Arc<dyn imip_milter::tokens::TokenStore>,
    pub lookups: std::sync::atomic::AtomicUsize,
    pub failing: std::sync::atomic::AtomicBool,
}

impl CountingStore {
    pub fn new(inner: Arc<dyn imip_milter::tokens::TokenStore>) -> Self {
        Self {
            inner,
            lookups: std::sync::atomic::AtomicUsize::new(0),
            failing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn fail(&self, failing: bool) {
        self.failing.store(failing, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn lookups(&self) -> usize {
        self.lookups.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl imip_milter::tokens::TokenStore for CountingStore {
    fn get<'a>(
        &'a self,
        token: &'a str,
    ) -> imip_milter::tokens::StoreFuture<'a, Option<imip_milter::tokens::TokenRecord>> {
        self.lookups.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            return Box::pin(async {
                Err(imip_milter::tokens::StoreError::new(
                    "token database: lookup: no answer in 3s",
                ))
            });
        }
        self.inner.get(token)
    }

    fn find<'a>(
        &'a self,
        organizer: &'a str,
        attendee: &'a str,
        uid: &'a str,
    ) -> imip_milter::tokens::StoreFuture<'a, Option<imip_milter::tokens::TokenRecord>> {
        self.inner.find(organizer, attendee, uid)
    }

    fn put<'a>(&'a self, rec: &'a imip_milter::tokens::TokenRecord) -> imip_milter::tokens::StoreFuture<'a, ()> {
        self.inner.put(rec)
    }

    fn revoke<'a>(&'a self, token: &'a str) -> imip_milter::tokens::StoreFuture<'a, bool> {
        self.inner.revoke(token)
    }

    fn list(&self) -> imip_milter::tokens::StoreFuture<'_, Vec<imip_milter::tokens::TokenRecord>> {
        self.inner.list()
    }

    fn purge<'a>(&'a self, cutoff_ms: u64) -> imip_milter::tokens::StoreFuture<'a, usize> {
        self.inner.purge(cutoff_ms)
    }

    fn touch<'a>(&'a self, token: &'a str, now_ms: u64) -> imip_milter::tokens::StoreFuture<'a, ()> {
        self.inner.touch(token, now_ms)
    }
}

/// The milter's own callbacks around a `Shared` the test built (a store of
/// its choosing); served until the sender is dropped or fired.
pub async fn serve_shared(shared: imip_milter::milter::Shared) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    init_logs();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let config = indymilter::Config {
        actions: imip_milter::milter::ACTIONS,
        ..Default::default()
    };
    tokio::spawn(indymilter::run(
        listener,
        imip_milter::milter::callbacks(Arc::new(shared)),
        config,
        async move {
            let _ = rx.await;
        },
    ));
    (addr, tx)
}
