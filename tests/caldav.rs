//! Target caldav on a real Radicale: an invitation leaves through a real
//! Postfix tokenized, replies from Apple, Google, Outlook and Thunderbird
//! come back through Postfix, and Radicale's copy shows each attendee's
//! answer and nothing else changed. Also a concurrent edit between GET and
//! PUT, and a reply for a deleted event.

mod common;

use common::{
    postfix::Postfix,
    radicale::{self, Radicale},
    smtp_send, wait_until, Daemon,
};
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

const UID: &str = "weekly-sync-2026@example.org";
/// The calendar home as a template, where a test is not about discovery.
const HOME: &str = "calendar_home = \"{base}/{user}/\"\n";
const EVENT_PATH: &str = "/alice/calendar/weekly-sync.ics";
const ATTENDEES: [&str; 4] = [
    "bob@example.com",
    "dana@example.com",
    "erik@example.com",
    "chloe@example.com",
];

fn event() -> String {
    let attendees: String = ATTENDEES
        .iter()
        .map(|a| format!("ATTENDEE;CUTYPE=INDIVIDUAL;PARTSTAT=NEEDS-ACTION;RSVP=TRUE:mailto:{a}\r\n"))
        .collect();
    format!(
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Example Organizer Client//EN\r\nBEGIN:VEVENT\r\nUID:{UID}\r\nDTSTAMP:20261101T090000Z\r\nDTSTART:20261207T090000Z\r\nDTEND:20261207T093000Z\r\nRRULE:FREQ=WEEKLY;COUNT=8\r\nSEQUENCE:0\r\nSUMMARY:Weekly sync\r\nDESCRIPTION:Agenda: status\\, risks\\; next steps\r\nLOCATION:Room 4\r\nORGANIZER;CN=\"Doe, Alice\":mailto:alice@example.org\r\n{attendees}X-ORGANIZER-CLIENT-STATE;X-KEEP=\"yes, please\":42\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
    )
}

fn put_event(r: &Radicale) {
    let resp = r.request("alice", "MKCALENDAR", "/alice/calendar/", &[], "");
    assert!(
        matches!(resp.status, 201 | 405),
        "MKCALENDAR: {} {}",
        resp.status,
        resp.body
    );
    let resp = r.request(
        "alice",
        "PUT",
        EVENT_PATH,
        &[("Content-Type", "text/calendar")],
        &event(),
    );
    assert!(matches!(resp.status, 201 | 204), "PUT: {} {}", resp.status, resp.body);
}

fn stored(r: &Radicale) -> String {
    let resp = r.request("alice", "GET", EVENT_PATH, &[], "");
    assert_eq!(resp.status, 200, "{}", resp.body);
    resp.body
}

fn unfold(s: &str) -> String {
    s.replace("\r\n ", "").replace("\n ", "")
}

/// The ATTENDEE line for `who` in the master (None) or the override at `rid`.
fn attendee_line(ics: &str, who: &str, rid: Option<&str>) -> Option<String> {
    let text = unfold(ics);
    let mut in_block = false;
    let mut block = Vec::new();
    let mut found = None;
    for l in text.lines() {
        if l == "BEGIN:VEVENT" {
            in_block = true;
            block.clear();
        } else if l == "END:VEVENT" {
            in_block = false;
            let this_rid = block
                .iter()
                .find_map(|b: &String| b.strip_prefix("RECURRENCE-ID").map(str::to_owned));
            let matches = match (rid, &this_rid) {
                (None, None) => true,
                (Some(r), Some(t)) => t.contains(r),
                _ => false,
            };
            if matches {
                found = block
                    .iter()
                    .find(|b| b.starts_with("ATTENDEE") && b.to_ascii_lowercase().ends_with(&format!("mailto:{who}")))
                    .cloned();
            }
        } else if in_block {
            block.push(l.to_owned());
        }
    }
    found
}

fn partstat(ics: &str, who: &str, rid: Option<&str>) -> Option<String> {
    let line = attendee_line(ics, who, rid)?;
    line.split(';')
        .find_map(|p| p.strip_prefix("PARTSTAT="))
        .map(|p| p.split(':').next().unwrap_or(p).to_owned())
}

fn b64(s: &str) -> String {
    imip_milter::message::base64(s.as_bytes())
        .as_bytes()
        .chunks(76)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join("\r\n")
}

fn reply_ics(prodid: &str, components: &str) -> String {
    format!("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:{prodid}\r\nMETHOD:REPLY\r\n{components}END:VCALENDAR\r\n")
}

fn vevent(organizer: &str, attendee: &str, extra: &str) -> String {
    format!("BEGIN:VEVENT\r\nUID:{UID}\r\nDTSTAMP:20261120T100000Z\r\nSEQUENCE:0\r\n{organizer}{extra}{attendee}\r\nEND:VEVENT\r\n")
}

/// Apple Calendar: 8bit, quoted parameters, an extra invite.ics.
fn apple(gateway: &str) -> Vec<u8> {
    let ics = reply_ics(
        "-//Apple Inc.//macOS 14.5//EN",
        &vevent(
            &format!("ORGANIZER;CN=\"Doe, Alice\";EMAIL=\"alice@example.org\":mailto:{gateway}\r\n"),
            "ATTENDEE;CN=\"Bob Müller\";CUTYPE=INDIVIDUAL;EMAIL=\"bob@example.com\";PARTSTAT=ACCEPTED:mailto:bob@example.com",
            "",
        ),
    );
    format!("From: Bob <bob@example.com>\r\nTo: {gateway}\r\nSubject: Accepted\r\nMessage-Id: <apple-1@example.com>\r\nMime-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"A1\"\r\n\r\n--A1\r\nContent-Type: multipart/alternative; boundary=\"A2\"\r\n\r\n--A2\r\nContent-Type: text/plain; charset=\"utf-8\"\r\nContent-Transfer-Encoding: 8bit\r\n\r\nBob Müller has accepted.\r\n--A2\r\nContent-Type: text/calendar; charset=\"utf-8\"; method=\"REPLY\"\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{ics}\r\n--A2--\r\n--A1\r\nContent-Type: application/ics; name=\"invite.ics\"\r\nContent-Disposition: attachment; filename=\"invite.ics\"\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{ics}\r\n--A1--\r\n").into_bytes()
}

/// Google: base64 in alternative plus application/ics without method; CN
/// holding the address; a comment with commas and colons; a declined override.
fn google(gateway: &str) -> Vec<u8> {
    let attendee = |ps: &str| {
        format!("ATTENDEE;CUTYPE=INDIVIDUAL;ROLE=REQ-PARTICIPANT;PARTSTAT={ps};CN=dana@example.com;X-NUM-GUESTS=0;X-RESPONSE-COMMENT=\"Yes, mostly: not on the 14th\":mailto:dana@example.com")
    };
    let org = format!("ORGANIZER;CN=Alice Doe:mailto:{gateway}\r\n");
    let ics = reply_ics(
        "-//Google Inc//Google Calendar 70.9054//EN",
        &format!(
            "{}{}",
            vevent(&org, &attendee("ACCEPTED"), "RRULE:FREQ=WEEKLY;COUNT=8\r\n"),
            vevent(&org, &attendee("DECLINED"), "RECURRENCE-ID:20261214T090000Z\r\n")
        ),
    );
    let b = b64(&ics);
    format!("MIME-Version: 1.0\r\nMessage-ID: <google-1@google.com>\r\nSubject: Accepted: Weekly sync\r\nFrom: dana@example.com\r\nTo: {gateway}\r\nContent-Type: multipart/mixed; boundary=\"g1\"\r\n\r\n--g1\r\nContent-Type: multipart/alternative; boundary=\"g2\"\r\n\r\n--g2\r\nContent-Type: text/plain; charset=\"UTF-8\"\r\n\r\ndana@example.com has accepted this invitation.\r\n--g2\r\nContent-Type: text/calendar; charset=\"UTF-8\"; method=REPLY\r\nContent-Transfer-Encoding: base64\r\n\r\n{b}\r\n--g2--\r\n--g1\r\nContent-Type: application/ics; name=\"invite.ics\"\r\nContent-Disposition: attachment; filename=\"invite.ics\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{b}\r\n--g1--\r\n").into_bytes()
}

/// Outlook: no ORGANIZER, MAILTO: in capitals, X-MICROSOFT-*, base64.
fn outlook(gateway: &str) -> Vec<u8> {
    let ics = reply_ics(
        "Microsoft Exchange Server 2010",
        &vevent(
            "",
            "ATTENDEE;PARTSTAT=DECLINED;CN=Erik Jansen:MAILTO:Erik@example.com",
            "X-MICROSOFT-CDO-BUSYSTATUS:BUSY\r\nX-MICROSOFT-CDO-INTENDEDSTATUS:BUSY\r\n",
        ),
    );
    format!("From: Erik Jansen <Erik@example.com>\r\nTo: Alice Doe <{gateway}>\r\nSubject: Declined: Weekly sync\r\nMessage-ID: <outlook-1@example.com>\r\nContent-Type: multipart/alternative; boundary=\"_000_\"\r\nMIME-Version: 1.0\r\n\r\n--_000_\r\nContent-Type: text/plain; charset=\"us-ascii\"\r\n\r\nSorry.\r\n--_000_\r\nContent-Type: text/calendar; charset=\"utf-8\"; method=REPLY\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n--_000_--\r\n", b64(&ics)).into_bytes()
}

/// Thunderbird: 8bit in alternative plus a base64 invite.ics.
fn thunderbird(gateway: &str) -> Vec<u8> {
    let ics = reply_ics(
        "-//Mozilla.org/NONSGML Mozilla Calendar V1.1//EN",
        &vevent(
            &format!("ORGANIZER;CN=\"Alice Doe\":mailto:{gateway}\r\n"),
            "ATTENDEE;RSVP=TRUE;CN=Chloé Martin;PARTSTAT=TENTATIVE;ROLE=REQ-PARTICIPANT:mailto:chloe@example.com",
            "",
        ),
    );
    format!("From: =?UTF-8?Q?Chlo=C3=A9_Martin?= <chloe@example.com>\r\nTo: {gateway}\r\nSubject: Tentative\r\nMessage-ID: <tb-1@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"t0\"\r\n\r\n--t0\r\nContent-Type: multipart/alternative; boundary=\"t1\"\r\n\r\n--t1\r\nContent-Type: text/plain; charset=UTF-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nTentatively accepted.\r\n--t1\r\nContent-Type: text/calendar; charset=UTF-8; method=REPLY\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{ics}\r\n--t1--\r\n--t0\r\nContent-Type: application/ics; name=\"invite.ics\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n--t0--\r\n", b64(&ics)).into_bytes()
}

fn invitation() -> Vec<u8> {
    let ics = event().replace(
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\n",
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nMETHOD:REQUEST\r\n",
    );
    format!("From: Alice Doe <alice@example.org>\r\nTo: {}\r\nSubject: Invitation: Weekly sync\r\nMessage-ID: <weekly-invite@example.org>\r\nMIME-Version: 1.0\r\nContent-Type: text/calendar; charset=utf-8; method=REQUEST\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{ics}", ATTENDEES.join(", ")).into_bytes()
}

/// imip-milter's configuration for caldav against `url`.
fn caldav_config(dir: &std::path::Path, url: &str) -> impl FnOnce(String) -> String {
    let pw = dir.join("caldav.password");
    std::fs::write(&pw, "imip-pw\n").unwrap();
    let url = url.to_owned();
    move |c: String| {
        let c = c.replace("kind = \"webhook\"", "kind = \"caldav\"");
        let c = c
            .lines()
            .map(|l| {
                if l.starts_with("url = ") {
                    format!("url = \"{url}\"")
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        format!(
            "{c}\nusername = \"imip\"\npassword_file = \"{}\"\n\n[tokens]\nmode = \"local\"\n\n[outbound]\nenabled = true\norganizer_domains = [\"example.org\"]\n# The test client submits as a calendar server on a fixed host.\ntrusted_clients = [\"127.0.0.1\"]\n",
            pw.display()
        )
    }
}

#[test]
fn replies_from_four_clients_land_in_radicale() {
    let radicale = Radicale::start();
    put_event(&radicale);
    let original = stored(&radicale);
    let dir = tempfile::tempdir().unwrap();
    let milter = Daemon::start_edited(
        dir.path(),
        "http://unused.invalid/",
        None,
        caldav_config(dir.path(), &radicale.url()),
    );
    let mailboxes = [
        "alice",
        "calendar",
        "bob@example.com",
        "dana@example.com",
        "erik@example.com",
        "chloe@example.com",
    ];
    let postfix = Postfix::start_with_mailboxes(
        &format!(
            "{{ inet:127.0.0.1:{}, default_action=tempfail, command_timeout=10s }}",
            milter.port
        ),
        &mailboxes,
    );
    let diag = || {
        format!(
            "--- maillog\n{}\n--- milter\n{}\n--- radicale\n{}",
            postfix.log(),
            milter.log(),
            radicale.log()
        )
    };

    // The invitation leaves tokenized, one token bound to the four attendees.
    let out = smtp_send(postfix.port, "alice@example.org", &ATTENDEES, &invitation());
    assert!(
        out.data.as_deref().unwrap_or("").starts_with("250"),
        "{out:?}\n{}",
        diag()
    );
    let bob = postfix.wait_mailbox("bob-example.com", 1);
    assert_eq!(bob.len(), 1, "{}", diag());
    let gateway = bob[0]
        .lines()
        .find_map(|l| l.strip_prefix("Reply-To: "))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| panic!("no Reply-To:\n{}", bob[0]));
    assert!(gateway.starts_with("calendar+"), "{gateway}");

    let start = std::time::Instant::now();
    for (from, msg) in [
        ("bob@example.com", apple(&gateway)),
        ("dana@example.com", google(&gateway)),
        ("erik@example.com", outlook(&gateway)),
        ("chloe@example.com", thunderbird(&gateway)),
    ] {
        let out = smtp_send(postfix.port, from, &[&gateway], &msg);
        assert!(
            out.data.as_deref().unwrap_or("").starts_with("250"),
            "{from}: {out:?}\n{}",
            diag()
        );
    }
    let done = |ics: &str| {
        partstat(ics, "bob@example.com", None).as_deref() == Some("ACCEPTED")
            && partstat(ics, "dana@example.com", None).as_deref() == Some("ACCEPTED")
            && partstat(ics, "dana@example.com", Some("20261214T090000Z")).as_deref() == Some("DECLINED")
            && partstat(ics, "erik@example.com", None).as_deref() == Some("DECLINED")
            && partstat(ics, "chloe@example.com", None).as_deref() == Some("TENTATIVE")
    };
    assert!(
        wait_until(Duration::from_secs(30), || done(&stored(&radicale))),
        "{}\n{}",
        stored(&radicale),
        diag()
    );
    println!(
        "four replies applied {} ms after the first reached Postfix",
        start.elapsed().as_millis()
    );

    // Nothing else changed: every master line but the attendees' is as it was.
    let after = unfold(&stored(&radicale));
    let before = unfold(&original);
    let master = |t: &str| -> Vec<String> {
        let first = t.split("END:VEVENT").next().unwrap_or("").to_owned();
        first
            .lines()
            .filter(|l| !l.starts_with("ATTENDEE"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(master(&before), master(&after), "{after}");
    assert_eq!(
        after.matches("BEGIN:VEVENT").count(),
        2,
        "master and Dana's override: {after}"
    );
    assert!(after.contains("X-ORGANIZER-CLIENT-STATE;X-KEEP=\"yes, please\":42"));
    assert!(after.contains("DESCRIPTION:Agenda: status\\, risks\\; next steps"));
}

/// Sits between imip-milter and Radicale; before the first PUT passes, the
/// organizer edits the event herself, so imip-milter's If-Match fails once.
struct EditingProxy {
    port: u16,
    edited: Arc<AtomicBool>,
}

impl EditingProxy {
    fn start(radicale_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let edited = Arc::new(AtomicBool::new(false));
        let flag = edited.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let flag = flag.clone();
                std::thread::spawn(move || proxy(stream, radicale_port, &flag));
            }
        });
        Self { port, edited }
    }
}

fn proxy(mut stream: TcpStream, upstream: u16, edited: &AtomicBool) {
    let mut r = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_owned(),
        parts.next().unwrap_or("").to_owned(),
    );
    let mut headers = Vec::new();
    let mut len = 0;
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).unwrap_or(0) == 0 || l.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_owned(), v.trim().to_owned());
            if k.eq_ignore_ascii_case("content-length") {
                len = v.parse().unwrap_or(0);
            } else if !k.eq_ignore_ascii_case("host") && !k.eq_ignore_ascii_case("connection") {
                headers.push((k, v));
            }
        }
    }
    let mut body = vec![0; len];
    let _ = r.read_exact(&mut body);
    if method == "PUT" && !edited.swap(true, Ordering::SeqCst) {
        // Alice moves the room between imip-milter's GET and its PUT.
        let now = radicale::http(
            upstream,
            "GET",
            &path,
            &[("Authorization", &radicale::basic("alice", "alice-pw"))],
            "",
        );
        let changed = now.body.replace("LOCATION:Room 4", "LOCATION:Room 7");
        let put = radicale::http(
            upstream,
            "PUT",
            &path,
            &[
                ("Authorization", &radicale::basic("alice", "alice-pw")),
                ("Content-Type", "text/calendar"),
            ],
            &changed,
        );
        assert!(matches!(put.status, 201 | 204), "organizer's edit: {}", put.status);
    }
    let hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let resp = radicale::http(upstream, &method, &path, &hs, &String::from_utf8_lossy(&body));
    let mut out = format!(
        "HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n",
        resp.status,
        resp.body.len()
    );
    for (k, v) in &resp.headers {
        if k == "etag" || k == "content-type" {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    out.push_str("\r\n");
    out.push_str(&resp.body);
    let _ = stream.write_all(out.as_bytes());
}

/// `imip-milter deliver` with no daemon: it spools and delivers at once.
fn deliver(config: &std::path::Path, rcpt: &str, msg: &[u8]) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_imip-milter"))
        .args(["deliver", "--config"])
        .arg(config)
        .args(["--rcpt", rcpt, "--sender", "bob@example.com"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(msg).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn cli(config: &std::path::Path, args: &[&str]) -> String {
    let out = common::cli(config, args);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `queue list` shows one failed record, failed for `why`.
fn assert_one_failed(config: &std::path::Path, why: &str) {
    let list = cli(config, &["queue", "list"]);
    assert!(list.contains("1 failed") && list.contains(why), "{list}");
}

fn standalone(dir: &std::path::Path, url: &str) -> (std::path::PathBuf, String) {
    standalone_with(dir, url, "")
}

/// As `standalone`, with `extra` in the [target] section.
fn standalone_with(dir: &std::path::Path, url: &str, extra: &str) -> (std::path::PathBuf, String) {
    let config = dir.join("imip-milter.toml");
    let text = common::config_text(&dir.join("state"), "inet:127.0.0.1:1", "http://unused.invalid/", extra);
    std::fs::write(&config, caldav_config(dir, url)(text)).unwrap();
    let token = common::add_token(&config, "alice@example.org", "bob@example.com", UID);
    (config, format!("calendar+{token}@example.org"))
}

#[test]
fn concurrent_edit_between_get_and_put_keeps_both_changes() {
    let radicale = Radicale::start();
    put_event(&radicale);
    let proxy = EditingProxy::start(radicale.port);
    let dir = tempfile::tempdir().unwrap();
    let (config, gateway) = standalone(dir.path(), &format!("http://127.0.0.1:{}", proxy.port));
    let (code, err) = deliver(&config, &gateway, &apple(&gateway));
    assert_eq!(code, 0, "{err}");
    assert!(proxy.edited.load(Ordering::SeqCst), "the organizer's edit happened");
    let ics = stored(&radicale);
    assert!(
        ics.contains("LOCATION:Room 7"),
        "the organizer's change survives: {ics}"
    );
    assert_eq!(
        partstat(&ics, "bob@example.com", None).as_deref(),
        Some("ACCEPTED"),
        "{ics}"
    );
    assert!(cli(&config, &["queue", "list", "--all"]).contains("delivered"));
}

#[test]
fn reply_for_a_deleted_event_is_kept_as_failed() {
    let radicale = Radicale::start();
    put_event(&radicale);
    let resp = radicale.request("alice", "DELETE", EVENT_PATH, &[], "");
    assert!(matches!(resp.status, 200 | 204), "{}", resp.status);
    let dir = tempfile::tempdir().unwrap();
    let (config, gateway) = standalone(dir.path(), &radicale.url());
    let (code, err) = deliver(&config, &gateway, &apple(&gateway));
    assert_eq!(code, 0, "taken and spooled: {err}");
    assert_one_failed(&config, "not in the calendars");
}

/// A reply through Bob's token, from `from`, with these VEVENTs.
fn reply_through(gateway: &str, from: &str, components: &str) -> Vec<u8> {
    let ics = reply_ics("-//Example Attendee Client//EN", components);
    format!("From: <{from}>\r\nTo: {gateway}\r\nSubject: Answer\r\nMessage-ID: <{}@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: text/calendar; charset=utf-8; method=REPLY\r\n\r\n{ics}", components.len()).into_bytes()
}

fn answer(uid: &str, who: &str, partstat: &str, extra: &str) -> String {
    format!("BEGIN:VEVENT\r\nUID:{uid}\r\nDTSTAMP:20261120T100000Z\r\nSEQUENCE:0\r\n{extra}ATTENDEE;PARTSTAT={partstat}:mailto:{who}\r\nEND:VEVENT\r\n")
}

/// A delivery report for Bob's copy of the invitation; `quoted_uid` is the
/// event the returned invitation names.
fn bounce_for_bob(token: &str, quoted_uid: &str) -> Vec<u8> {
    String::from_utf8(common::fixture("bounce.eml"))
        .unwrap()
        .replace(common::TOKEN, token)
        .replace("nobody@gone.example", "bob@example.com")
        .replace("invite-bounce-77-msg@example.org", "unrelated@example.net")
        .replace("invite-bounce-77@example.org", quoted_uid)
        .into_bytes()
}

/// DESIGN §4c on a real CalDAV server: Bob's token changes Bob's answer in
/// the weekly sync, and nothing else: not Dana's line, not another event,
/// not an event whose UID merely contains the token's, not an attendee's
/// copy of the same UID; a bounce records the failure and keeps the answer.
#[test]
fn a_token_changes_one_answer_in_one_event_and_nothing_else() {
    let radicale = Radicale::start();
    put_event(&radicale);
    let put = |path: &str, ics: &str| {
        let resp = radicale.request("alice", "PUT", path, &[("Content-Type", "text/calendar")], ics);
        assert!(
            matches!(resp.status, 201 | 204),
            "PUT {path}: {} {}",
            resp.status,
            resp.body
        );
    };
    // Dana has accepted already.
    let weekly = event().replace(
        "PARTSTAT=NEEDS-ACTION;RSVP=TRUE:mailto:dana@example.com",
        "PARTSTAT=ACCEPTED;RSVP=TRUE:mailto:dana@example.com",
    );
    put(EVENT_PATH, &weekly);
    // Another of Alice's events, without Bob.
    let secret = weekly
        .replace(UID, "other-secret-event")
        .replace("mailto:bob@example.com", "mailto:grace@example.com");
    put("/alice/calendar/other.ics", &secret);
    // An attendee's copy of the weekly sync (another organizer), in a calendar listed first.
    let resp = radicale.request("alice", "MKCALENDAR", "/alice/aaa-copies/", &[], "");
    assert!(matches!(resp.status, 201 | 405), "{}", resp.status);
    let copy = event().replace(
        "ORGANIZER;CN=\"Doe, Alice\":mailto:alice@example.org",
        "ORGANIZER:mailto:mallory@example.net",
    );
    put("/alice/aaa-copies/copy.ics", &copy);

    let dir = tempfile::tempdir().unwrap();
    let (config, gateway) = standalone(dir.path(), &radicale.url());
    let token = gateway
        .strip_prefix("calendar+")
        .and_then(|g| g.strip_suffix("@example.org"))
        .unwrap()
        .to_owned();
    let diag = || format!("{}\n{}", cli(&config, &["queue", "list", "--all"]), radicale.log());

    // 1. Through Bob's token, an answer for Dana alone: not applied.
    let msg = reply_through(
        &gateway,
        "dana@example.com",
        &answer(UID, "dana@example.com", "DECLINED", ""),
    );
    let (code, err) = deliver(&config, &gateway, &msg);
    assert_eq!(code, 77, "refused (to the organizer): {err}");
    // 2. Bob's answer with an override that answers for Dana: Bob's applies, Dana's is dropped.
    let both = format!(
        "{}{}",
        answer(UID, "bob@example.com", "ACCEPTED", ""),
        answer(
            UID,
            "dana@example.com",
            "DECLINED",
            "RECURRENCE-ID:20261214T090000Z\r\n"
        )
    );
    let (code, err) = deliver(&config, &gateway, &reply_through(&gateway, "bob@example.com", &both));
    assert_eq!(code, 0, "{err}");
    let ics = stored(&radicale);
    assert_eq!(
        partstat(&ics, "bob@example.com", None).as_deref(),
        Some("ACCEPTED"),
        "{ics}\n{}",
        diag()
    );
    assert_eq!(
        partstat(&ics, "dana@example.com", None).as_deref(),
        Some("ACCEPTED"),
        "{ics}"
    );
    assert_eq!(
        unfold(&ics).matches("BEGIN:VEVENT").count(),
        1,
        "no override for Dana: {ics}"
    );
    assert!(
        cli(&config, &["queue", "list", "--all"]).contains("delivered"),
        "{}",
        diag()
    );
    // The attendee's copy under another organizer is not the event.
    let c = radicale
        .request("alice", "GET", "/alice/aaa-copies/copy.ics", &[], "")
        .body;
    assert_eq!(
        partstat(&c, "bob@example.com", None).as_deref(),
        Some("NEEDS-ACTION"),
        "{c}"
    );

    // 3. Another event's UID: refused, the other event unchanged.
    let msg = reply_through(
        &gateway,
        "bob@example.com",
        &answer("other-secret-event", "dana@example.com", "DECLINED", ""),
    );
    let (code, err) = deliver(&config, &gateway, &msg);
    assert_eq!(code, 77, "{err}");
    assert!(err.contains("another event"), "{err}");
    let other = radicale
        .request("alice", "GET", "/alice/calendar/other.ics", &[], "")
        .body;
    assert_eq!(
        partstat(&other, "dana@example.com", None).as_deref(),
        Some("ACCEPTED"),
        "{other}"
    );

    // 4. A token for a UID that is only a part of the weekly sync's finds nothing.
    let partial_token = common::add_token(&config, "alice@example.org", "dana@example.com", "ekly-sync-2026@exam");
    let partial = format!("calendar+{partial_token}@example.org");
    let msg = reply_through(
        &partial,
        "dana@example.com",
        &answer("ekly-sync-2026@exam", "dana@example.com", "DECLINED", ""),
    );
    let (code, err) = deliver(&config, &partial, &msg);
    assert_eq!(code, 0, "taken and spooled: {err}");
    assert_one_failed(&config, "not in the calendars");
    assert_eq!(
        partstat(&stored(&radicale), "dana@example.com", None).as_deref(),
        Some("ACCEPTED")
    );

    // 5. A bounce for Bob that quotes the invitation records the failure, keeps the answer.
    let (code, err) = deliver(&config, &gateway, &bounce_for_bob(&token, UID));
    assert_eq!(code, 0, "{err}");
    let ics = stored(&radicale);
    let bob = attendee_line(&ics, "bob@example.com", None).unwrap_or_default();
    assert!(
        bob.contains("PARTSTAT=ACCEPTED") && bob.contains("SCHEDULE-STATUS=5.1"),
        "{bob}\n{}",
        diag()
    );
    assert!(
        bob.contains("X-IMIP-MILTER-DTSTAMP=20261120T100000Z"),
        "the stamp stays: {bob}"
    );
    // A report that quotes no invitation sent with this token changes nothing.
    let (code, err) = deliver(&config, &gateway, &bounce_for_bob(&token, "made-up@evil.example"));
    assert_eq!(code, 77, "{err}");
    // Bob's later answer still counts.
    let later = answer(UID, "bob@example.com", "TENTATIVE", "").replace("20261120T100000Z", "20261121T100000Z");
    let (code, err) = deliver(&config, &gateway, &reply_through(&gateway, "bob@example.com", &later));
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        partstat(&stored(&radicale), "bob@example.com", None).as_deref(),
        Some("TENTATIVE"),
        "{}",
        diag()
    );
    assert_eq!(
        partstat(&stored(&radicale), "dana@example.com", None).as_deref(),
        Some("ACCEPTED")
    );
    // An answer older than the one on file is taken and ignored, and the
    // journal says so rather than "delivered" alone.
    let older = answer(UID, "bob@example.com", "DECLINED", "").replace("20261120T100000Z", "20261119T100000Z");
    let (code, err) = deliver(&config, &gateway, &reply_through(&gateway, "bob@example.com", &older));
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        partstat(&stored(&radicale), "bob@example.com", None).as_deref(),
        Some("TENTATIVE")
    );
    let journal = String::from_utf8_lossy(&common::cli(&config, &["journal", "--address", "bob@example.com"]).stdout)
        .into_owned();
    assert!(
        journal.contains("delivery delivered") && journal.contains("reason=\"ignored: older than the answer on file"),
        "{journal}"
    );
    comment_reaches_the_organizer(&config, &gateway, || stored(&radicale));
}

/// Bob answers again with a comment and a guest (Google's parameters), then
/// once more without: the organizer's copy carries them, then no longer.
fn comment_reaches_the_organizer(config: &std::path::Path, bob: &str, get: impl Fn() -> String) {
    let commented = answer(UID, "bob@example.com", "TENTATIVE", "")
        .replace("20261120T100000Z", "20261125T100000Z")
        .replace(
            "ATTENDEE;PARTSTAT",
            "ATTENDEE;X-RESPONSE-COMMENT=\"Running late; start without me\";X-NUM-GUESTS=1;PARTSTAT",
        );
    let (code, err) = deliver(config, bob, &reply_through(bob, "bob@example.com", &commented));
    assert_eq!(code, 0, "{err}");
    let line = attendee_line(&get(), "bob@example.com", None).unwrap_or_default();
    assert!(
        // SOGo writes the value back escaped (`late\;`) rather than quoted.
        line.contains("X-RESPONSE-COMMENT=")
            && line.contains("Running late")
            && line.contains("start without me")
            && line.contains("X-NUM-GUESTS=1")
            && line.contains("PARTSTAT=TENTATIVE"),
        "{line}"
    );
    let plain = answer(UID, "bob@example.com", "ACCEPTED", "").replace("20261120T100000Z", "20261126T100000Z");
    let (code, err) = deliver(config, bob, &reply_through(bob, "bob@example.com", &plain));
    assert_eq!(code, 0, "{err}");
    let line = attendee_line(&get(), "bob@example.com", None).unwrap_or_default();
    assert!(
        !line.contains("X-RESPONSE-COMMENT") && !line.contains("X-NUM-GUESTS") && line.contains("PARTSTAT=ACCEPTED"),
        "{line}"
    );
}

/// A CalDAV server gone bad: answers every request with `answer(port)`,
/// and counts the connections it gets.
struct HostileServer {
    port: u16,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    /// The request heads received, in order.
    heads: Arc<std::sync::Mutex<Vec<String>>>,
}

impl HostileServer {
    fn start(answer: impl Fn(&mut TcpStream) + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = connections.clone();
        let answer = Arc::new(answer);
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = heads.clone();
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                count.fetch_add(1, Ordering::SeqCst);
                let answer = answer.clone();
                let seen = seen.clone();
                std::thread::spawn(move || {
                    // Read the request head and body, then answer.
                    let mut r = BufReader::new(stream.try_clone().unwrap());
                    let mut len = 0;
                    let mut head = String::new();
                    loop {
                        let mut l = String::new();
                        if r.read_line(&mut l).unwrap_or(0) == 0 || l.trim().is_empty() {
                            seen.lock().unwrap().push(head);
                            break;
                        }
                        head.push_str(&l);
                        if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; len];
                    let _ = r.read_exact(&mut body);
                    answer(&mut stream);
                });
            }
        });
        Self {
            port,
            connections,
            heads,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// DESIGN §4c: the calendar server's answers are outside input. A huge
/// answer is not read past target.max_response_bytes; hrefs to another
/// origin get no request and no credentials.
#[test]
fn a_hostile_caldav_server_gets_no_memory_and_no_credentials() {
    // Where a foreign href points; nothing may arrive here.
    let elsewhere = HostileServer::start(|s| {
        let _ = s.write_all(b"HTTP/1.1 207 Multi-Status\r\nContent-Length: 0\r\n\r\n");
    });
    let other = elsewhere.port;
    let foreign = HostileServer::start(move |s| {
        let xml = format!(
            "<?xml version=\"1.0\"?><D:multistatus xmlns:D=\"DAV:\" xmlns:C=\"urn:ietf:params:xml:ns:caldav\">\
             <D:response><D:href>//127.0.0.1:{other}/elsewhere/</D:href><D:propstat><D:prop><D:resourcetype><C:calendar/><D:collection/></D:resourcetype></D:prop></D:propstat></D:response>\
             <D:response><D:href>http://127.0.0.1:{other}/alice/cal/</D:href><D:propstat><D:prop><D:resourcetype><C:calendar/><D:collection/></D:resourcetype></D:prop></D:propstat></D:response>\
             <D:response><D:href>/bob/calendar/</D:href><D:propstat><D:prop><D:resourcetype><C:calendar/><D:collection/></D:resourcetype></D:prop></D:propstat></D:response>\
             </D:multistatus>"
        );
        let _ = s.write_all(
            format!("HTTP/1.1 207 Multi-Status\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}", xml.len()).as_bytes(),
        );
    });
    let dir = tempfile::tempdir().unwrap();
    let (config, gateway) = standalone_with(dir.path(), &foreign.url(), HOME);
    let (code, err) = deliver(&config, &gateway, &apple(&gateway));
    assert_eq!(code, 0, "taken and spooled: {err}");
    assert_one_failed(&config, "not in the calendars");
    assert_eq!(
        elsewhere.connections.load(Ordering::SeqCst),
        0,
        "a request went to a foreign href"
    );

    // Discovery: principals and homes that the server places elsewhere.
    let misleading = HostileServer::start(move |s| {
        let xml = format!(
            "<?xml version=\"1.0\"?><D:multistatus xmlns:D=\"DAV:\" xmlns:C=\"urn:ietf:params:xml:ns:caldav\">\
             <D:response><D:href>/alice/</D:href><D:propstat><D:prop>\
             <D:principal-collection-set><D:href>//127.0.0.1:{other}/principals/</D:href></D:principal-collection-set>\
             <C:calendar-home-set><D:href>http://127.0.0.1:{other}/alice/</D:href></C:calendar-home-set>\
             <C:calendar-user-address-set><D:href>mailto:alice@example.org</D:href></C:calendar-user-address-set>\
             </D:prop></D:propstat></D:response></D:multistatus>"
        );
        let _ = s.write_all(
            format!("HTTP/1.1 207 Multi-Status\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}", xml.len()).as_bytes(),
        );
    });
    let dir = tempfile::tempdir().unwrap();
    let (config, gateway) = standalone(dir.path(), &misleading.url());
    let (code, err) = deliver(&config, &gateway, &apple(&gateway));
    assert_eq!(code, 0, "taken and spooled: {err}");
    assert_one_failed(&config, "names no calendar home on target.url's origin");
    assert_eq!(
        elsewhere.connections.load(Ordering::SeqCst),
        0,
        "a request went to a foreign href"
    );

    // 64 MiB of '<' without a length: read up to the cap, then refused.
    let huge = HostileServer::start(|s| {
        let _ = s.write_all(b"HTTP/1.1 207 Multi-Status\r\nContent-Type: application/xml\r\nConnection: close\r\n\r\n");
        let chunk = vec![b'<'; 1 << 20];
        for _ in 0..64 {
            if s.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let (config, gateway) = standalone_with(dir.path(), &huge.url(), HOME);
    let started = std::time::Instant::now();
    let (code, err) = deliver(&config, &gateway, &apple(&gateway));
    assert_eq!(code, 0, "taken and spooled: {err}");
    assert_one_failed(&config, "max_response_bytes");
    println!("huge answer refused after {} ms", started.elapsed().as_millis());

    // 3 MiB of '<' within the cap: read in one pass, not in minutes.
    let flood = HostileServer::start(|s| {
        let body = "<".repeat(3 << 20);
        let _ = s.write_all(
            format!("HTTP/1.1 207 Multi-Status\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes(),
        );
    });
    let dir = tempfile::tempdir().unwrap();
    let (config, gateway) = standalone_with(dir.path(), &flood.url(), HOME);
    let started = std::time::Instant::now();
    let (code, err) = deliver(&config, &gateway, &apple(&gateway));
    assert_eq!(code, 0, "taken and spooled: {err}");
    let took = started.elapsed();
    let list = cli(&config, &["queue", "list"]);
    assert!(list.contains("1 pending") && list.contains("XML"), "{list}");
    assert!(took < Duration::from_secs(20), "the flood took {took:?}");
}

/// `check --organizer` proves the target for one organizer, as the service
/// account: the home found on the server, the calendars, a search, the
/// right to write; and writes nothing.
#[test]
fn check_organizer_proves_the_target_and_writes_nothing() {
    let radicale = Radicale::start();
    put_event(&radicale);
    let before = stored(&radicale);
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = standalone(dir.path(), &radicale.url());
    let out = cli(&config, &["check", "--organizer", "alice@example.org"]);
    let organizer: Vec<&str> = out.lines().filter(|l| l.contains("organizer:")).collect();
    assert!(
        organizer.iter().all(|l| l.starts_with("OK")) && organizer.len() >= 3,
        "{out}"
    );
    assert!(
        out.contains(&format!("calendar home {}/alice/", radicale.url())),
        "{out}"
    );
    assert!(out.contains("1 calendar(s)"), "{out}");
    assert_eq!(stored(&radicale), before, "check wrote to the calendar");
    let out = cli(&config, &["check", "--organizer", "nobody-here@example.org"]);
    assert!(out.lines().any(|l| l.starts_with("FAIL organizer:")), "{out}");

    // A service account that may only read.
    let read_only = Radicale::start_with_rights(
        &Radicale::RIGHTS.replace("collection: .*\npermissions: RrWw", "collection: .*\npermissions: Rr"),
    );
    put_event(&read_only);
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = standalone(dir.path(), &read_only.url());
    let out = cli(&config, &["check", "--organizer", "alice@example.org"]);
    // Radicale says what the account may do (RFC 3744): read only.
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL organizer:") && l.contains("may not change") && l.contains("read")),
        "{out}"
    );
}

/// A CalDAV server with a certificate of an internal CA: refused with the
/// root cause until target.ca_file names the CA, then trusted.
#[test]
fn an_internal_ca_is_trusted_through_ca_file() {
    let (radicale, ca) = Radicale::start_tls();
    let url = format!("https://127.0.0.1:{}", radicale.port);
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = standalone(dir.path(), &url);
    let target = |out: &str| out.lines().find(|l| l.contains(" target: ")).unwrap_or("").to_owned();
    let refused = target(&cli(&config, &["check"]));
    assert!(
        refused.starts_with("FAIL") && refused.contains("UnknownIssuer"),
        "{refused}"
    );
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = standalone_with(dir.path(), &url, &format!("ca_file = \"{}\"\n", ca.display()));
    let trusted = target(&cli(&config, &["check"]));
    assert!(trusted.starts_with("OK") && trusted.contains("207"), "{trusted}");
}

/// A bearer token in target.token_file signs the service account in.
#[test]
fn caldav_signs_in_with_a_bearer_token() {
    let server = HostileServer::start(|s| {
        let _ = s.write_all(b"HTTP/1.1 207 Multi-Status\r\nContent-Type: application/xml\r\nContent-Length: 41\r\nConnection: close\r\n\r\n<multistatus xmlns=\"DAV:\"></multistatus>");
    });
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("caldav.token");
    std::fs::write(&token_file, "s3cr3t-bearer\n").unwrap();
    let config = dir.path().join("imip-milter.toml");
    let text = common::config_text(&dir.path().join("state"), "inet:127.0.0.1:1", &server.url(), "").replace(
        "kind = \"webhook\"",
        &format!("kind = \"caldav\"\ntoken_file = \"{}\"", token_file.display()),
    );
    std::fs::write(&config, format!("{text}\n[tokens]\nmode = \"local\"\n")).unwrap();
    let out = cli(&config, &["check"]);
    assert!(out.contains("OK   target:"), "{out}");
    let heads = server.heads.lock().unwrap().clone();
    assert!(
        heads.iter().any(|h| h
            .to_ascii_lowercase()
            .contains("authorization: bearer s3cr3t-bearer\r\n")),
        "{heads:?}"
    );
}

/// Xandikos answers 500 where it refuses: the same words five times in a
/// row, over 12 × max_backoff, fail the record with them, instead of
/// retrying for days.
#[test]
fn the_same_server_error_five_times_fails_the_record_with_its_words() {
    let refusing = HostileServer::start(|s| {
        let body = "<html><body><h1>500</h1><p>Access denied to /alice/calendar/</p></body></html>";
        let _ = s.write_all(
            format!("HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes(),
        );
    });
    let dir = tempfile::tempdir().unwrap();
    let url = refusing.url();
    let edit = caldav_config(dir.path(), &url);
    let daemon = common::Daemon::start_edited(dir.path(), "http://unused.invalid/", None, move |c| {
        edit(c).replace("kind = \"caldav\"", &format!("kind = \"caldav\"\n{HOME}"))
    });
    let config = dir.path().join("imip-milter.toml");
    let token = common::add_token(&config, "alice@example.org", "bob@example.com", UID);
    let gateway = format!("calendar+{token}@example.org");
    let (code, err) = deliver(&config, &gateway, &apple(&gateway));
    assert_eq!(code, 0, "taken and spooled: {err}\n{}", daemon.log());
    // Backoff 200 ms doubling to 1 s: five attempts within seconds, and the
    // same words for 12 × max_backoff (12 s here, an hour by default).
    common::wait_until(Duration::from_secs(40), || {
        cli(&config, &["queue", "list"]).contains("1 failed")
    });
    let list = cli(&config, &["queue", "list"]);
    assert!(
        list.contains("1 failed") && list.contains("HTTP 500") && list.contains("Access denied to /alice/calendar/"),
        "{list}"
    );
}

/// Calendars in the service account's own home are searched only when the
/// organizer owns them (DAV:owner, as a calendar she shared): anyone may
/// share a calendar with the service account, and a copy of her event there
/// must not take her attendees' answers.
#[test]
fn a_calendar_in_the_service_accounts_home_that_she_does_not_own_is_not_written() {
    let radicale = Radicale::start();
    // Alice's home exists, without the event.
    let resp = radicale.request("alice", "MKCALENDAR", "/alice/calendar/", &[], "");
    assert!(matches!(resp.status, 201 | 405), "{}", resp.status);
    // A calendar of the service account's own holds a copy with her ORGANIZER.
    let other = "/imip/alice.calendar/";
    let resp = radicale.request("imip", "MKCALENDAR", other, &[], "");
    assert!(matches!(resp.status, 201 | 405), "{}", resp.status);
    let path = format!("{other}weekly-sync.ics");
    let resp = radicale.request("imip", "PUT", &path, &[("Content-Type", "text/calendar")], &event());
    assert!(matches!(resp.status, 201 | 204), "{}", resp.status);
    let dir = tempfile::tempdir().unwrap();
    let (config, gateway) = standalone(dir.path(), &radicale.url());
    let (code, err) = deliver(&config, &gateway, &apple(&gateway));
    assert_eq!(code, 0, "{err}");
    assert_one_failed(&config, "not in the calendars");
    let resp = radicale.request("imip", "GET", &path, &[], "");
    assert_eq!(
        partstat(&resp.body, "bob@example.com", None).as_deref(),
        Some("NEEDS-ACTION"),
        "{}",
        resp.body
    );
}

/// Xandikos: the calendar home found by discovery (no principal search
/// there: the principal named as the user, its calendar-home-set), a plain
/// reply and one declining a single instance of the weekly event.
#[test]
fn replies_land_in_xandikos_found_by_discovery() {
    use common::xandikos::{Xandikos, CALENDAR};
    let x = Xandikos::start();
    let path = format!("{CALENDAR}weekly-sync.ics");
    let resp = x.request("PUT", &path, &[("Content-Type", "text/calendar")], &event());
    assert!(matches!(resp.status, 201 | 204), "PUT: {} {}", resp.status, resp.body);
    let dir = tempfile::tempdir().unwrap();
    let (config, bob) = standalone(dir.path(), &x.url());
    let dana = format!(
        "calendar+{}@example.org",
        common::add_token(&config, "alice@example.org", "dana@example.com", UID)
    );
    for (gateway, msg) in [(&bob, apple(&bob)), (&dana, google(&dana))] {
        let (code, err) = deliver(&config, gateway, &msg);
        assert_eq!(code, 0, "{err}\n{}", x.log());
    }
    let ics = x.request("GET", &path, &[], "").body;
    assert_eq!(
        partstat(&ics, "bob@example.com", None).as_deref(),
        Some("ACCEPTED"),
        "{ics}\n{}",
        cli(&config, &["queue", "list", "--all"])
    );
    assert_eq!(
        partstat(&ics, "dana@example.com", None).as_deref(),
        Some("ACCEPTED"),
        "{ics}"
    );
    assert_eq!(
        partstat(&ics, "dana@example.com", Some("20261214T090000Z")).as_deref(),
        Some("DECLINED"),
        "{ics}"
    );
    let list = cli(&config, &["queue", "list", "--all"]);
    assert!(!list.contains("failed   "), "{list}");
    comment_reaches_the_organizer(&config, &bob, || x.request("GET", &path, &[], "").body);
    let out = cli(&config, &["check", "--organizer", "alice@example.org"]);
    assert!(
        out.contains(&format!("calendar home {}/alice/calendars/", x.url()))
            && !out.lines().any(|l| l.starts_with("FAIL organizer")),
        "{out}"
    );
    let out = cli(&config, &["check", "--organizer", "carol@example.org"]);
    assert!(out.lines().any(|l| l.starts_with("FAIL organizer")), "{out}");
}

/// DAViCal names principals by login: the organizer's home is found by a
/// principal-property-search on her address. Without rights reading the
/// home is refused and the record fails saying so; with a principal grant a
/// plain reply and a declined instance are applied. An organizer DAViCal does
/// not know is told apart from missing rights. DAViCal schedules on the
/// writer's behalf (README): a local attendee's inbox copy is written again.
#[test]
fn replies_land_in_davical_found_by_principal_search() {
    use common::davical::Davical;
    let dav = Davical::start();
    let path = "/alice/calendar/weekly-sync.ics";
    let resp = dav.request("alice", "PUT", path, &[("Content-Type", "text/calendar")], &event());
    assert!(
        matches!(resp.status, 201 | 204),
        "PUT: {} {}\n{}",
        resp.status,
        resp.body,
        dav.log()
    );

    // No rights yet: the home is found (principal search needs none), and
    // reading it is refused.
    let dir = tempfile::tempdir().unwrap();
    let (config, bob) = standalone(dir.path(), &dav.url());
    let (code, err) = deliver(&config, &bob, &apple(&bob));
    assert_eq!(code, 0, "{err}");
    assert_one_failed(&config, "may not read this calendar home");
    let out = cli(&config, &["check", "--organizer", "nobody@example.org"]);
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL organizer") && l.contains("no principal")),
        "{out}"
    );

    dav.grant("alice", "imip");
    let dir = tempfile::tempdir().unwrap();
    let (config, bob) = standalone(dir.path(), &dav.url());
    let dana = format!(
        "calendar+{}@example.org",
        common::add_token(&config, "alice@example.org", "dana@example.com", UID)
    );
    let out = cli(&config, &["check", "--organizer", "alice@example.org"]);
    assert!(
        out.contains("principal-property-search") && !out.lines().any(|l| l.starts_with("FAIL organizer")),
        "{out}"
    );
    for (gateway, msg) in [(&bob, apple(&bob)), (&dana, google(&dana))] {
        let (code, err) = deliver(&config, gateway, &msg);
        assert_eq!(code, 0, "{err}\n{}", dav.log());
    }
    let ics = dav.request("alice", "GET", path, &[], "").body;
    let queue = cli(&config, &["queue", "list", "--all"]);
    assert_eq!(
        partstat(&ics, "bob@example.com", None).as_deref(),
        Some("ACCEPTED"),
        "{ics}\n{queue}"
    );
    assert_eq!(
        partstat(&ics, "dana@example.com", None).as_deref(),
        Some("ACCEPTED"),
        "{ics}\n{queue}"
    );
    assert_eq!(
        partstat(&ics, "dana@example.com", Some("20261214T090000Z")).as_deref(),
        Some("DECLINED"),
        "{ics}"
    );

    // An event with a local attendee: DAViCal sends her the organizer's copy
    // again after the reply is written (RFC 6638 implicit scheduling).
    let local_uid = "local-sync-2026@example.org";
    let local = event().replace(UID, local_uid).replace(
        "ORGANIZER;",
        "ATTENDEE;PARTSTAT=NEEDS-ACTION;RSVP=TRUE:mailto:bob@example.org\r\nORGANIZER;",
    );
    let local_path = "/alice/calendar/local-sync.ics";
    let resp = dav.request("alice", "PUT", local_path, &[("Content-Type", "text/calendar")], &local);
    assert!(matches!(resp.status, 201 | 204), "PUT: {} {}", resp.status, resp.body);
    let inbox = || {
        dav.pg.psql_as(
            "davical_dba",
            "davical",
            "SELECT coalesce(max(modified)::text, '-') FROM caldav_data WHERE dav_name LIKE '/bob/.in/%'",
        )
    };
    let before = inbox();
    let erik = format!(
        "calendar+{}@example.org",
        common::add_token(&config, "alice@example.org", "erik@example.com", local_uid)
    );
    let reply = reply_through(
        &erik,
        "erik@example.com",
        &answer(local_uid, "erik@example.com", "DECLINED", ""),
    );
    let (code, err) = deliver(&config, &erik, &reply);
    assert_eq!(code, 0, "{err}");
    let ics = dav.request("alice", "GET", local_path, &[], "").body;
    assert_eq!(
        partstat(&ics, "erik@example.com", None).as_deref(),
        Some("DECLINED"),
        "{ics}"
    );
    assert_ne!(inbox(), before, "DAViCal wrote the local attendee's inbox copy again");
}

/// A calendar home that redirects: the record fails saying where it points;
/// the redirect is not followed (credentials stay with target.url).
#[test]
fn a_redirecting_home_is_named_not_followed() {
    let elsewhere = HostileServer::start(|s| {
        let _ = s.write_all(b"HTTP/1.1 207 Multi-Status\r\nContent-Length: 0\r\n\r\n");
    });
    let target = format!("http://127.0.0.1:{}/dav/alice/", elsewhere.port);
    let moved = HostileServer::start(move |s| {
        let _ = s.write_all(
            format!("HTTP/1.1 301 Moved Permanently\r\nLocation: {target}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
        );
    });
    let dir = tempfile::tempdir().unwrap();
    let (config, gateway) = standalone_with(dir.path(), &moved.url(), HOME);
    let (code, err) = deliver(&config, &gateway, &apple(&gateway));
    assert_eq!(code, 0, "taken and spooled: {err}");
    assert_one_failed(
        &config,
        &format!(
            "301 Moved Permanently to http://127.0.0.1:{}/dav/alice/ (not followed)",
            elsewhere.port
        ),
    );
    assert_eq!(elsewhere.connections.load(Ordering::SeqCst), 0);
}

/// One reply may not multiply an event: answering more instances than
/// target.max_new_overrides fails with the reason in `queue show` and
/// changes nothing; within it, each new override carries what an override
/// needs (not the master's description or the organizer client's state).
#[test]
fn a_reply_answering_many_instances_creates_lean_overrides_or_none() {
    let radicale = Radicale::start();
    put_event(&radicale);
    let dir = tempfile::tempdir().unwrap();
    let (config, gateway) = standalone_with(dir.path(), &radicale.url(), "max_new_overrides = 3\n");
    let declined = |days: &[&str]| -> String {
        days.iter()
            .map(|d| {
                answer(
                    UID,
                    "bob@example.com",
                    "DECLINED",
                    &format!("RECURRENCE-ID:{d}T090000Z\r\n"),
                )
            })
            .collect()
    };
    let before = stored(&radicale);
    let five = declined(&["20261207", "20261214", "20261221", "20261228", "20270104"]);
    let (code, err) = deliver(&config, &gateway, &reply_through(&gateway, "bob@example.com", &five));
    assert_eq!(code, 0, "taken and spooled: {err}");
    assert_one_failed(&config, "target.max_new_overrides");
    assert_eq!(stored(&radicale), before, "nothing written");

    let two = declined(&["20261214", "20261221"]);
    let (code, err) = deliver(&config, &gateway, &reply_through(&gateway, "bob@example.com", &two));
    assert_eq!(code, 0, "{err}");
    let ics = unfold(&stored(&radicale));
    for rid in ["20261214T090000Z", "20261221T090000Z"] {
        assert_eq!(
            partstat(&ics, "bob@example.com", Some(rid)).as_deref(),
            Some("DECLINED"),
            "{ics}"
        );
    }
    assert_eq!(ics.matches("BEGIN:VEVENT").count(), 3, "{ics}");
    assert_eq!(ics.matches("DESCRIPTION:").count(), 1, "the master's only: {ics}");
    assert_eq!(ics.matches("X-ORGANIZER-CLIENT-STATE").count(), 1, "{ics}");
    assert_eq!(ics.matches("SUMMARY:Weekly sync").count(), 3, "{ics}");
    assert_eq!(
        ics.matches("mailto:dana@example.com").count(),
        3,
        "every attendee in each: {ics}"
    );
}

/// SOGo (Mailcow, iRedMail): `target.url` at …/SOGo/dav, no calendar_home.
/// SOGo's principal search knows CalendarServer's email-address-set only;
/// its personal calendar says schedule-outbox too and is a calendar all the
/// same. Without a grant nothing of alice's is visible and check says how
/// to fix it; with the grant (as SOGo's sharing dialog gives it) a reply and
/// a declined instance are applied, a subscription adds the same calendar
/// under the service account's home without harm, and check is quiet.
#[test]
fn replies_land_in_sogo_found_by_discovery() {
    use common::sogo::Sogo;
    let sogo = Sogo::start();
    let path = format!("{}weekly-sync.ics", Sogo::calendar("alice"));
    let resp = sogo.request("alice", "PUT", &path, &[("Content-Type", "text/calendar")], &event());
    assert!(
        matches!(resp.status, 201 | 204),
        "PUT: {} {}\n{}",
        resp.status,
        resp.body,
        sogo.log()
    );
    // The server root is SOGo's login page: named as such.
    let root = tempfile::tempdir().unwrap();
    let (at_root, _) = standalone(root.path(), &format!("http://127.0.0.1:{}/", sogo.port));
    let out = cli(&at_root, &["check"]);
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL target") && l.contains("a web page")),
        "{out}"
    );
    let dir = tempfile::tempdir().unwrap();
    let (config, bob) = standalone(dir.path(), &sogo.url());
    let out = cli(&config, &["check", "--organizer", "alice@example.org"]);
    assert!(out.contains("OK   target:"), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("FAIL organizer")),
        "no grant yet: {out}"
    );

    sogo.grant("alice", "imip");
    let dana = format!(
        "calendar+{}@example.org",
        common::add_token(&config, "alice@example.org", "dana@example.com", UID)
    );
    let out = cli(&config, &["check", "--organizer", "alice@example.org"]);
    assert!(
        !out.lines().any(|l| l.starts_with("FAIL organizer")),
        "{out}\n{}",
        sogo.log()
    );
    for (gateway, msg) in [(&bob, apple(&bob)), (&dana, google(&dana))] {
        let (code, err) = deliver(&config, gateway, &msg);
        assert_eq!(code, 0, "{err}");
    }
    let ics = sogo.request("alice", "GET", &path, &[], "").body;
    let queue = cli(&config, &["queue", "list", "--all"]);
    assert_eq!(
        partstat(&ics, "bob@example.com", None).as_deref(),
        Some("ACCEPTED"),
        "{ics}\n{queue}\n{}",
        sogo.log()
    );
    assert_eq!(
        partstat(&ics, "dana@example.com", Some("20261214T090000Z")).as_deref(),
        Some("DECLINED"),
        "{ics}\n{queue}"
    );
    // Subscribed too: one calendar under two URLs; the next answer lands once.
    sogo.subscribe("alice", "imip");
    comment_reaches_the_organizer(&config, &bob, || sogo.request("alice", "GET", &path, &[], "").body);
    let out = cli(&config, &["check", "--organizer", "alice@example.org"]);
    assert!(
        out.contains("principal-property-search")
            && !out
                .lines()
                .any(|l| l.starts_with("FAIL organizer") || l.starts_with("FAIL target")),
        "{out}"
    );
}

/// Cyrus (Fastmail, universities): principals are found by the local part
/// (its search matches within `userid@servername`), and the organizer's
/// calendar-home-set answers the reader's own home: her calendar is the
/// shared `alice.Default/` in the service account's home, there only while
/// it is subscribed. Without the subscription check says so instead of OK;
/// with it a reply and a declined instance are applied.
#[test]
fn replies_land_in_cyrus_through_the_subscribed_calendar() {
    use common::cyrus::Cyrus;
    let cyrus = Cyrus::start();
    let path = format!(
        "{}weekly-sync.ics",
        Cyrus::home("alice").replace("/user/alice/", "/user/alice/Default/")
    );
    let resp = cyrus.request("alice", "PUT", &path, &[("Content-Type", "text/calendar")], &event());
    assert!(
        matches!(resp.status, 201 | 204),
        "PUT {path}: {} {}\n{}",
        resp.status,
        resp.body,
        cyrus.log()
    );
    cyrus.grant("alice", "imip");
    cyrus.grant_home("alice", "imip");
    let dir = tempfile::tempdir().unwrap();
    let (config, bob) = standalone(dir.path(), &cyrus.url());
    let out = cli(&config, &["check", "--organizer", "alice@example.org"]);
    assert!(out.contains("OK   target:"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL organizer") && l.contains("subscribe")),
        "not subscribed: {out}"
    );

    cyrus.subscribe("alice", "imip");
    let out = cli(&config, &["check", "--organizer", "alice@example.org"]);
    assert!(
        out.contains("alice.Default") && !out.lines().any(|l| l.starts_with("FAIL organizer")),
        "{out}\n{}",
        cyrus.log()
    );
    let dana = format!(
        "calendar+{}@example.org",
        common::add_token(&config, "alice@example.org", "dana@example.com", UID)
    );
    for (gateway, msg) in [(&bob, apple(&bob)), (&dana, google(&dana))] {
        let (code, err) = deliver(&config, gateway, &msg);
        assert_eq!(code, 0, "{err}");
    }
    let ics = unfold(&cyrus.request("alice", "GET", &path, &[], "").body);
    let queue = cli(&config, &["queue", "list", "--all"]);
    assert_eq!(
        partstat(&ics, "bob@example.com", None).as_deref(),
        Some("ACCEPTED"),
        "{ics}\n{queue}\n{}",
        cyrus.log()
    );
    assert_eq!(
        partstat(&ics, "dana@example.com", Some("20261214T090000Z")).as_deref(),
        Some("DECLINED"),
        "{ics}\n{queue}"
    );
}
