//! A reply that failed for good goes to a person: the organizer gets the
//! message as it arrived, with a note of what was not applied and why
//! (`delivery.on_failure = "organizer"`). Never to a gateway address, never
//! to a stranger named by the reply alone, never twice for one record.

use crate::{
    address::{printable, GatewayAddresses, Recipient},
    clock::now_ms,
    config::{Config, OnFailure},
    errors,
    metrics::METRICS,
    spool::{Notice, NoticeState, Record, Spool, State},
};
use std::{
    collections::{HashMap, VecDeque},
    path::PathBuf,
    process::Stdio,
    sync::Arc,
    time::Duration,
};
use tokio::{
    io::AsyncWriteExt,
    sync::{mpsc, watch},
};
use tracing::{info, warn};

/// The largest message kept for a notice; a larger one is not kept, and
/// its notice carries the calendar text alone.
pub const MAX_KEPT: usize = 1 << 20;
/// Text from the reply (UID, answer, addresses) shown in the note at most.
const SHOWN: usize = 100;
/// Record ids waiting for the notice task; more wait in the spool for the
/// next pass.
const QUEUED: usize = 4096;

/// How long sendmail may take to accept a notice.
const SENDMAIL_TIMEOUT: Duration = Duration::from_secs(60);
/// What of sendmail's complaint is kept.
const SHOWN_STDERR: usize = 300;

/// What the delivery worker needs to hand a failed reply to its organizer.
#[derive(Debug, Clone)]
pub struct Notices {
    pub on_failure: OnFailure,
    pub sendmail: PathBuf,
    /// Envelope sender; empty: the null sender.
    pub sender: String,
    gateway: GatewayAddresses,
    /// Where an organizer named only by the reply may be: the gateway
    /// addresses' domains and outbound.organizer_domains.
    local_domains: Vec<String>,
}

impl Notices {
    pub fn from_config(c: &Config) -> Self {
        let mut local_domains: Vec<String> = c.gateway.bases().iter().map(|b| b.domain.clone()).collect();
        if let Some(out) = &c.outbound {
            local_domains.extend(out.organizer_domains.iter().cloned());
        }
        Self {
            on_failure: c.delivery.on_failure,
            sendmail: c.delivery.sendmail.clone(),
            sender: c.delivery.notice_sender.clone(),
            gateway: c.gateway.clone(),
            local_domains,
        }
    }

    /// Whether a notice is due for this record, now that it failed: a
    /// reply (a bounce holds nothing for a person to apply), none sent yet.
    pub fn wanted(&self, rec: &Record) -> bool {
        self.on_failure == OnFailure::Organizer
            && rec.kind == "reply"
            && !rec.notice.as_ref().is_some_and(|n| n.state == NoticeState::Sent)
    }

    /// Marks a reply that just failed for good for its notice, committed
    /// with the failure; the notice task sends it then. Whether it did.
    pub fn mark(&self, rec: &mut Record) -> bool {
        if rec.state != State::Failed || !self.wanted(rec) {
            return false;
        }
        rec.notice = Some(Notice {
            state: NoticeState::Pending,
            to: None,
            time_ms: now_ms(),
            reason: String::new(),
            attempts: 0,
        });
        true
    }

    /// The organizer the notice goes to, or why it goes to nobody. The
    /// token's organizer is believed; one named only by the reply (the
    /// sender wrote it) must be in a local domain, or anybody could have
    /// this host mail anything to anyone.
    pub fn recipient(&self, rec: &Record) -> Result<String, String> {
        // CalendarServer's token table may name her by a urn:uuid: then
        // the reply's ORGANIZER, as for a server's own tokens.
        let token_organizer = rec.payload["organizer"]
            .as_str()
            .filter(|o| crate::address::is_plain_address(strip_mailto(o)));
        let (named, trusted) = match token_organizer {
            Some(o) => (o.to_owned(), true),
            None => {
                let itip = rec.payload["icalendar"]
                    .as_str()
                    .and_then(|cal| crate::itip::read(cal, None).ok());
                let (value, email) = itip.map(|i| (i.organizer, i.organizer_email)).unwrap_or_default();
                // A server's own token (CalendarServer) is in the ORGANIZER
                // the invitation went out with; her address is its EMAIL.
                let value = match (value, email) {
                    (Some(v), Some(e)) if self.gateway.classify(strip_mailto(&v)) != Recipient::Other => Some(e),
                    (v, _) => v,
                };
                match value {
                    Some(o) => (o, false),
                    None => return Err("the reply names no organizer".into()),
                }
            }
        };
        let address = strip_mailto(&named);
        if !crate::address::is_plain_address(address) {
            return Err(format!("the organizer {} is not a mail address", printable(&named)));
        }
        if self.gateway.classify(address) != Recipient::Other {
            return Err(format!(
                "the organizer {} is a gateway address (a notice there would loop)",
                printable(address)
            ));
        }
        let domain = address.rsplit_once('@').map_or("", |(_, d)| d);
        if !trusted && !self.local_domains.iter().any(|d| d.eq_ignore_ascii_case(domain)) {
            return Err(format!(
                "the organizer {} is named by the reply only and is not in a local domain \
                 (the gateway addresses' or outbound.organizer_domains)",
                printable(address)
            ));
        }
        Ok(address.to_owned())
    }

    /// Hands the notice to sendmail; Err says why it was not taken.
    pub async fn send(&self, to: &str, message: &[u8]) -> Result<(), String> {
        let sender = match self.sender.as_str() {
            "" => "<>",
            s => s,
        };
        let mut child = tokio::process::Command::new(&self.sendmail)
            .args(["-i", "-f", sender, "--", to])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.sendmail.display()))?;
        let stdin = child.stdin.take();
        // Written while its output is read: a sendmail that complains
        // before it reads all of its input does not stall.
        let write = async move {
            if let Some(mut stdin) = stdin {
                stdin.write_all(message).await?;
                stdin.shutdown().await?;
            }
            Ok::<(), std::io::Error>(())
        };
        let run = async { tokio::join!(write, child.wait_with_output()) };
        let out = match tokio::time::timeout(SENDMAIL_TIMEOUT, run).await {
            Ok((_, Ok(out))) if out.status.success() => return Ok(()),
            Ok((_, Ok(out))) => out,
            Ok((Err(e), _)) | Ok((_, Err(e))) => return Err(format!("{}: {e}", self.sendmail.display())),
            Err(_) => {
                return Err(format!(
                    "{} took longer than {}s",
                    self.sendmail.display(),
                    SENDMAIL_TIMEOUT.as_secs()
                ))
            }
        };
        let said: String = printable(String::from_utf8_lossy(&out.stderr).trim())
            .chars()
            .take(SHOWN_STDERR)
            .collect();
        Err(format!("{} {}: {said}", self.sendmail.display(), out.status))
    }

    /// The From header: the configured sender, else the postmaster of the
    /// first gateway address's domain (a person can answer there).
    fn author(&self) -> String {
        match self.sender.as_str() {
            "" => {
                let domain = self.gateway.bases().first().map_or("localhost", |b| b.domain.as_str());
                format!("Calendar gateway <postmaster@{domain}>")
            }
            s => format!("Calendar gateway <{s}>"),
        }
    }
}

/// A `mailto:` URI's address; anything else (a bare address) as it is.
fn strip_mailto(uri: &str) -> &str {
    let t = uri.trim();
    crate::decision::bare_address(t).unwrap_or(t)
}

/// The ids of records whose notice is due, for the notice task.
#[derive(Clone, Debug)]
pub struct Queue(mpsc::Sender<String>);

impl Queue {
    pub fn new() -> (Self, mpsc::Receiver<String>) {
        let (tx, rx) = mpsc::channel(QUEUED);
        (Self(tx), rx)
    }

    /// Never waits: an id that does not fit stays pending in the spool,
    /// for the next pass (`pending`).
    pub fn push(&self, id: String) {
        let _ = self.0.try_send(id);
    }

    /// Queues the notices still to be sent (the hourly pass; the task
    /// finds those of the start itself).
    pub async fn pending(&self, spool: &Spool) {
        let s = spool.clone();
        match tokio::task::spawn_blocking(move || s.notices_pending()).await {
            Ok(Ok(ids)) => ids.into_iter().for_each(|id| self.push(id)),
            Ok(Err(e)) => warn!("cannot read the spool for notices: {}", errors::chain(&e)),
            Err(e) => warn!("cannot read the spool for notices: {e}"),
        }
    }
}

/// Messages remembered as noticed, for one notice per message.
const SENT_REMEMBERED: usize = 100_000;

/// What the notice task keeps between notices.
#[derive(Default)]
struct Memory {
    /// (queue id, Message-ID, organizer) of the notices sent, and the
    /// record each went with; the oldest forgotten past SENT_REMEMBERED.
    sent: HashMap<(String, String, String), String>,
    order: VecDeque<(String, String, String)>,
    /// Notices sent whose result the spool did not take: written again,
    /// never sent again.
    unwritten: HashMap<String, Notice>,
}

impl Memory {
    /// One scan, at start: the notices the spool holds as sent, and the
    /// ids of those still to be sent (a crash, sendmail failing).
    async fn load(spool: &Spool) -> (Self, Vec<String>) {
        let mut m = Self::default();
        let mut due = Vec::new();
        let s = spool.clone();
        if let Ok(Ok(records)) = tokio::task::spawn_blocking(move || s.list(false)).await {
            for r in records {
                let Some(n) = &r.notice else { continue };
                if r.notice_due() {
                    due.push(r.id.clone());
                }
                if let (Some((q, mid)), NoticeState::Sent, Some(to)) = (message_key(&r), n.state, &n.to) {
                    m.remember((q, mid, to.clone()), r.id.clone());
                }
            }
        }
        (m, due)
    }

    fn remember(&mut self, key: (String, String, String), id: String) {
        if self.sent.insert(key.clone(), id).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > SENT_REMEMBERED {
            if let Some(old) = self.order.pop_front() {
                self.sent.remove(&old);
            }
        }
    }
}

/// What makes two records one message: its queue id and Message-ID.
fn message_key(rec: &Record) -> Option<(String, String)> {
    Some((rec.queue_id.clone()?, rec.payload["message_id"].as_str()?.to_owned()))
}

/// Sends the notices queued, one at a time, with the settings `current`
/// gives (a SIGHUP may change them), until `stop` (a notice being sent is
/// finished first) or the queue closes.
pub async fn run(
    spool: Spool,
    mut ids: mpsc::Receiver<String>,
    current: impl Fn() -> Arc<Notices>,
    mut stop: watch::Receiver<bool>,
) {
    let (mut memory, due) = Memory::load(&spool).await;
    for id in due {
        if *stop.borrow() {
            return;
        }
        hand_over(&spool, &current(), &id, &mut memory).await;
    }
    loop {
        let id = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return,
            id = ids.recv() => match id {
                Some(id) => id,
                None => return,
            },
        };
        hand_over(&spool, &current(), &id, &mut memory).await;
    }
}

/// Writes what became of a notice; kept to write again if the spool fails.
async fn write_notice(spool: &Spool, id: &str, notice: Notice, memory: &mut Memory) {
    let (s, i, n) = (spool.clone(), id.to_owned(), notice.clone());
    let why = match tokio::task::spawn_blocking(move || s.set_notice(&i, &n)).await {
        Ok(Ok(_)) => {
            memory.unwritten.remove(id);
            return;
        }
        Ok(Err(e)) => errors::chain(&e),
        Err(e) => e.to_string(),
    };
    warn!("cannot record the notice of {id} (written again with the next pass): {why}");
    memory.unwritten.insert(id.to_owned(), notice);
}

/// One pending notice: sent to the organizer, or refused with why; the
/// record and the journal say which.
async fn hand_over(spool: &Spool, notices: &Notices, id: &str, memory: &mut Memory) {
    if let Some(done) = memory.unwritten.get(id).cloned() {
        return write_notice(spool, id, done, memory).await;
    }
    let (s, i) = (spool.clone(), id.to_owned());
    let rec = match tokio::task::spawn_blocking(move || s.get(&i)).await {
        Ok(Ok(Some(rec))) => rec,
        Ok(Err(e)) => return warn!("cannot read record {id} for its notice: {}", errors::chain(&e)),
        _ => return,
    };
    // Sent already (queued twice), given up, or retried since.
    if !rec.notice_due() {
        return;
    }
    let attempts = rec.notice.as_ref().map_or(0, |n| n.attempts);
    let to = match notices.on_failure {
        OnFailure::Keep => Err("delivery.on_failure is keep".to_owned()),
        OnFailure::Organizer => notices.recipient(&rec),
    };
    // One message for several gateway recipients (tokens) is several
    // records: their organizer gets it once.
    let key = message_key(&rec);
    let to = match (to, &key) {
        (Ok(to), Some((q, m))) => match memory.sent.get(&(q.clone(), m.clone(), to.clone())) {
            Some(other) => Err(format!(
                "the same message went to {to} with record {other}: one notice per message"
            )),
            None => Ok(to),
        },
        (to, _) => to,
    };
    let result = match &to {
        Err(why) => Err((NoticeState::Refused, why.clone())),
        Ok(to) => {
            // The message may be a megabyte: read and composed off the runtime.
            let (s, r, n, t) = (spool.clone(), rec.clone(), notices.clone(), to.clone());
            let composed = tokio::task::spawn_blocking(move || {
                s.original(&r).map(|original| {
                    let original = original.map(|o| attachment(o, r.payload["organizer"].as_str()));
                    let b = boundary(original.as_deref().unwrap_or_default());
                    compose(&n, &r, &t, original.as_deref(), &b, now_ms())
                })
            })
            .await;
            match composed {
                Ok(Ok(message)) => notices.send(to, &message).await.map_err(|e| (NoticeState::Failed, e)),
                Ok(Err(e)) => Err((
                    NoticeState::Failed,
                    format!("cannot read the message from the spool: {}", errors::chain(&e)),
                )),
                Err(e) => Err((NoticeState::Failed, format!("composing the notice failed: {e}"))),
            }
        }
    };
    let queue_id = rec.queue_id.clone().unwrap_or_else(|| "-".into());
    let (state, reason) = match result {
        Ok(()) => {
            info!(
                "{queue_id}: notice sent id={} to=<{}>: the reply was not applied",
                rec.id,
                to.as_deref().unwrap_or("")
            );
            (NoticeState::Sent, String::new())
        }
        Err((state, why)) => {
            warn!(
                "{queue_id}: notice {} id={}: {}",
                state.as_str(),
                rec.id,
                printable(&why)
            );
            (state, why)
        }
    };
    METRICS.notice(state);
    let notice = Notice {
        state,
        to: to.as_ref().ok().cloned(),
        time_ms: now_ms(),
        reason: reason.clone(),
        attempts: match state {
            NoticeState::Sent | NoticeState::Failed => attempts.saturating_add(1),
            _ => attempts,
        },
    };
    if let (NoticeState::Sent, Some((q, m)), Ok(to)) = (state, key, &to) {
        memory.remember((q, m, to.clone()), rec.id.clone());
    }
    write_notice(spool, &rec.id, notice, memory).await;
    let shown = match (state, &to) {
        (NoticeState::Sent, Ok(to)) => format!("to {to}: {}", rec.last_error.as_deref().unwrap_or("")),
        _ => reason,
    };
    let mut event = rec.event("notice", state.as_str(), &shown);
    if let Ok(to) = to {
        event.organizer = Some(to);
    }
    spool.journal_later(event);
}

/// A header value from outside: printable ASCII only, one line, bounded.
fn header_text(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' })
        .take(200)
        .collect()
}

/// The notice: a text part in the organizer's words, the original as it
/// arrived attached as message/rfc822. Lines end in LF (sendmail's input).
/// Without the original (larger than MAX_KEPT, or spooled before it was
/// kept), the reply's calendar text is attached instead.
pub fn compose(n: &Notices, rec: &Record, to: &str, original: Option<&[u8]>, boundary: &str, now_ms: u64) -> Vec<u8> {
    let p = &rec.payload;
    let text = |k: &str| {
        p[k].as_str()
            .map(|v| printable(v).chars().take(SHOWN).collect::<String>())
    };
    let attendee = text("attendee").map(|a| strip_mailto(&a).to_owned());
    let who = attendee
        .clone()
        .or_else(|| text("from"))
        .unwrap_or_else(|| "an attendee".into());
    let answer = text("partstat").unwrap_or_else(|| "an answer".into());
    let why: String = printable(rec.last_error.as_deref().unwrap_or("refused by the calendar server"))
        .chars()
        .take(4 * SHOWN)
        .collect();
    let date = chrono::DateTime::<chrono::Utc>::from(std::time::UNIX_EPOCH + Duration::from_millis(now_ms))
        .format("%a, %d %b %Y %H:%M:%S +0000");
    let domain = to.rsplit_once('@').map_or("localhost", |(_, d)| d);
    let mut out = String::new();
    out.push_str(&format!("From: {}\n", n.author()));
    out.push_str(&format!("To: <{}>\n", header_text(to)));
    out.push_str(&format!(
        "Subject: Not applied to your calendar: {} from {}\n",
        header_text(&answer),
        header_text(&who)
    ));
    out.push_str(&format!("Date: {date}\n"));
    out.push_str(&format!(
        "Message-ID: <imip-milter.{}.{now_ms}@{}>\n",
        rec.id,
        header_text(domain)
    ));
    // RFC 3834: no vacation program answers it.
    out.push_str("Auto-Submitted: auto-replied\n");
    out.push_str(&format!("X-IMIP-Milter-Notice: {}\n", rec.id));
    out.push_str("MIME-Version: 1.0\n");
    out.push_str(&format!("Content-Type: multipart/mixed; boundary=\"{boundary}\"\n"));
    out.push_str("Content-Transfer-Encoding: 8bit\n\n");
    out.push_str("This is a MIME message: a note and the reply it is about.\n\n");
    out.push_str(&format!("--{boundary}\n"));
    out.push_str("Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n");
    out.push_str(&format!(
        "{who} answered your invitation ({answer}), but the answer could not be\n\
         entered in your calendar.\n\n"
    ));
    out.push_str(&format!("  Attendee:  {}\n", attendee.as_deref().unwrap_or("-")));
    out.push_str(&format!("  Event UID: {}\n", text("uid").unwrap_or_else(|| "-".into())));
    out.push_str(&format!("  Answer:    {answer}\n"));
    out.push_str(&format!(
        "  Received:  {}\n",
        text("received_at").unwrap_or_else(|| "-".into())
    ));
    out.push_str(&format!("  Why:       {why}\n\n"));
    out.push_str(match original {
        Some(_) => {
            "The reply is attached as it arrived. Open it in your calendar program to\n\
             enter the answer yourself, or ask the attendee to answer again.\n\n"
        }
        None => {
            "The reply's calendar data is attached. Open it in your calendar program to\n\
             enter the answer yourself, or ask the attendee to answer again.\n\n"
        }
    });
    out.push_str(&format!(
        "-- \nimip-milter, record {} (queue id {})\n\n",
        rec.id,
        rec.queue_id.as_deref().map(printable).unwrap_or_else(|| "-".into())
    ));
    out.push_str(&format!("--{boundary}\n"));
    let attached = match original {
        Some(original) => {
            out.push_str("Content-Type: message/rfc822\nContent-Disposition: attachment\n");
            original.to_vec()
        }
        None => {
            out.push_str("Content-Type: text/calendar; charset=utf-8; method=REPLY\n");
            out.push_str("Content-Disposition: attachment; filename=\"reply.ics\"\n");
            p["icalendar"].as_str().unwrap_or_default().as_bytes().to_vec()
        }
    };
    out.push_str("Content-Transfer-Encoding: 8bit\n\n");
    let mut bytes = out.into_bytes();
    bytes.extend(unix_lines(&attached));
    if bytes.last() != Some(&b'\n') {
        bytes.push(b'\n');
    }
    bytes.extend_from_slice(format!("\n--{boundary}--\n").as_bytes());
    bytes
}

/// The original as attached: with local tokens, her own address is the
/// ORGANIZER again where the reply names the gateway, so that her calendar
/// program takes it as an answer to her event (and the token's calendar
/// text goes no further). Headers stay as they arrived.
pub fn attachment(original: Vec<u8>, organizer: Option<&str>) -> Vec<u8> {
    let Some(organizer) = organizer.filter(|o| crate::decision::bare_address(o).is_some()) else {
        return original;
    };
    match crate::outbound::organizer_given_back(&original, organizer) {
        Some(body) => {
            let start = crate::outbound::body_start(&original);
            let mut out = original.get(..start).unwrap_or_default().to_vec();
            out.extend(body);
            out
        }
        None => original,
    }
}

/// CRLF line ends as LF, as sendmail reads its input.
fn unix_lines(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.iter().peekable();
    while let Some(&b) = bytes.next() {
        if b == b'\r' && bytes.peek() == Some(&&b'\n') {
            continue;
        }
        out.push(b);
    }
    out
}

/// A MIME boundary that occurs nowhere in `original`: random, so that a
/// sender cannot plant it in the message to break the notice apart.
pub fn boundary(original: &[u8]) -> String {
    loop {
        let mut seed = [0u8; 12];
        let random = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed));
        if random.is_err() {
            // Without randomness: the clock, checked against the message below.
            seed[..8].copy_from_slice(&crate::clock::now_ms().to_be_bytes());
        }
        let b: String = seed.iter().map(|x| format!("{x:02x}")).collect();
        let b = format!("=_imip-milter_{b}");
        if !original.windows(b.len()).any(|w| w == b.as_bytes()) {
            return b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::State;

    fn notices(outbound: &str) -> Notices {
        let c = Config::parse(&format!(
            "[gateway]\naddresses = [\"calendar@example.org\"]\n[target]\nurl = \"http://127.0.0.1:9/\"\n{outbound}"
        ))
        .unwrap();
        Notices::from_config(&c)
    }

    fn record(organizer: Option<&str>, cal_organizer: &str) -> Record {
        let cal = format!(
            "BEGIN:VCALENDAR\r\nMETHOD:REPLY\r\nBEGIN:VEVENT\r\nUID:u1\r\nORGANIZER:{cal_organizer}\r\n\
             ATTENDEE;PARTSTAT=DECLINED:mailto:bob@example.com\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
        );
        let mut payload = serde_json::json!({
            "attendee": "mailto:bob@example.com", "partstat": "DECLINED", "uid": "u1",
            "received_at": "2026-12-06T03:00:00.000Z", "icalendar": cal,
        });
        if let Some(o) = organizer {
            payload["organizer"] = o.into();
        }
        Record {
            id: "abc".into(),
            state: State::Failed,
            kind: "reply".into(),
            token_prefix: "12345678…".into(),
            queue_id: Some("4QX".into()),
            created_ms: 0,
            attempts: 1,
            next_attempt_ms: 0,
            last_error: Some("HTTP 404: no such event\r\nInjected: header".into()),
            repeats: 0,
            repeats_since_ms: 0,
            finished_ms: Some(1),
            payload,
            message_ref: None,
            original: None,
            notice: None,
        }
    }

    #[test]
    fn the_organizer_is_the_tokens_or_a_local_one_and_never_a_gateway() {
        let n = notices("");
        // The token names her: believed wherever she is.
        assert_eq!(
            n.recipient(&record(Some("alice@partner.example"), "mailto:x@evil.example")),
            Ok("alice@partner.example".into())
        );
        // Named by the reply only: a local domain, or nobody.
        assert_eq!(
            n.recipient(&record(None, "mailto:alice@example.org")),
            Ok("alice@example.org".into())
        );
        let stranger = n
            .recipient(&record(None, "mailto:victim@elsewhere.example"))
            .unwrap_err();
        assert!(stranger.contains("not in a local domain"), "{stranger}");
        let with_domains = notices(
            "[tokens]\nmode = \"local\"\n[outbound]\nenabled = true\norganizer_domains = [\"elsewhere.example\"]\n",
        );
        assert!(with_domains
            .recipient(&record(None, "mailto:victim@elsewhere.example"))
            .is_ok());
        // A gateway address: the notice would come back.
        for gateway in ["mailto:calendar+12345678abc@example.org", "mailto:Calendar@Example.org"] {
            let e = n.recipient(&record(None, gateway)).unwrap_err();
            assert!(e.contains("gateway address"), "{e}");
            let e = n
                .recipient(&record(Some(gateway), "mailto:alice@example.org"))
                .unwrap_err();
            assert!(e.contains("gateway address"), "{e}");
        }
        assert!(n.recipient(&record(Some("a b@example.org"), "")).is_err());
        // A server's own token: her address is the ORGANIZER's EMAIL, local only.
        let tokenized = "ORGANIZER;EMAIL=alice@example.org:mailto:calendar+12345678abc@example.org";
        let r = record(None, "x").payload["icalendar"]
            .as_str()
            .unwrap()
            .replace("ORGANIZER:x", tokenized);
        let mut rec = record(None, "x");
        rec.payload["icalendar"] = r.clone().into();
        assert_eq!(n.recipient(&rec), Ok("alice@example.org".into()));
        rec.payload["icalendar"] = r.replace("alice@example.org:", "victim@elsewhere.example:").into();
        assert!(n.recipient(&rec).unwrap_err().contains("not in a local domain"));
    }

    #[test]
    fn a_bounce_or_a_record_noticed_before_gets_none() {
        let n = notices("");
        let mut r = record(Some("alice@example.org"), "");
        assert!(n.wanted(&r));
        r.kind = "bounce".into();
        assert!(!n.wanted(&r));
        r.kind = "reply".into();
        r.notice = Some(crate::spool::Notice {
            state: NoticeState::Sent,
            to: Some("alice@example.org".into()),
            time_ms: 1,
            reason: String::new(),
            attempts: 0,
        });
        assert!(!n.wanted(&r));
        // A notice refused or failed before is tried again with the next failure.
        r.notice.as_mut().unwrap().state = NoticeState::Failed;
        assert!(n.mark(&mut r));
        assert_eq!(r.notice.as_ref().unwrap().state, NoticeState::Pending);
        let keep = notices("[delivery]\non_failure = \"keep\"\n");
        assert!(!keep.wanted(&record(Some("alice@example.org"), "")));
    }

    #[test]
    fn the_notice_says_what_failed_and_carries_the_original() {
        let n = notices("");
        let r = record(Some("alice@example.org"), "");
        let original = b"From: Bob <bob@example.com>\r\nSubject: Declined\r\n\r\nBEGIN:VCALENDAR\r\n";
        let b = boundary(original);
        let text = String::from_utf8(compose(&n, &r, "alice@example.org", Some(original), &b, 0)).unwrap();
        assert!(text.starts_with("From: Calendar gateway <postmaster@example.org>\nTo: <alice@example.org>\n"));
        assert!(text.contains("Subject: Not applied to your calendar: DECLINED from bob@example.com\n"));
        assert!(text.contains("Auto-Submitted: auto-replied\n"));
        // What the target said stays one line of the text, never a header.
        assert!(
            text.contains("  Why:       HTTP 404: no such event\\u{d}\\u{a}Injected: header\n"),
            "{text}"
        );
        assert!(!text.contains("\nInjected:"));
        assert!(text.contains(&format!("--{b}\nContent-Type: message/rfc822\n")));
        assert!(text.contains("\n\nFrom: Bob <bob@example.com>\nSubject: Declined\n\nBEGIN:VCALENDAR\n"));
        assert!(text.ends_with(&format!("\n--{b}--\n")));
        assert!(!text.contains('\r'));
        let parsed = crate::analysis::analyse(text.as_bytes());
        assert_eq!(parsed.message_id.as_deref(), Some("<imip-milter.abc.0@example.org>"));
    }

    #[test]
    fn without_the_original_the_calendar_text_is_attached_and_reply_text_is_clipped() {
        let n = notices("");
        let mut r = record(Some("alice@example.org"), "");
        r.payload["uid"] = "u".repeat(5000).into();
        let text = String::from_utf8(compose(&n, &r, "alice@example.org", None, "B", 0)).unwrap();
        assert!(text.contains("--B\nContent-Type: text/calendar; charset=utf-8; method=REPLY\n"));
        assert!(text.contains("ATTENDEE;PARTSTAT=DECLINED:mailto:bob@example.com\n"));
        assert!(text.lines().all(|l| l.len() <= 998), "lines within RFC 5322's limit");
        assert!(text.contains(&format!("Event UID: {}\n", "u".repeat(100))));
    }

    #[tokio::test]
    async fn one_message_to_several_tokens_is_one_notice() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool.redb")).unwrap();
        let mut first = record(Some("alice@example.org"), "");
        first.payload["message_id"] = "<m@example.com>".into();
        let mut second = first.clone();
        second.id = "def".into();
        second.notice = Some(Notice {
            state: NoticeState::Pending,
            to: None,
            time_ms: 1,
            reason: String::new(),
            attempts: 0,
        });
        first.notice = Some(Notice {
            state: NoticeState::Sent,
            to: Some("alice@example.org".into()),
            time_ms: 1,
            reason: String::new(),
            attempts: 0,
        });
        spool.append(vec![first, second]).await.unwrap();
        spool.flush().unwrap();
        // Remembered from the spool at start: the second record's notice
        // is refused without sendmail (the configured one does not exist).
        let (mut memory, due) = Memory::load(&spool).await;
        assert_eq!(due, ["def"]);
        let mut n = notices("");
        n.sendmail = "/nonexistent/sendmail".into();
        hand_over(&spool, &n, "def", &mut memory).await;
        let notice = spool.get("def").unwrap().unwrap().notice.unwrap();
        assert_eq!(notice.state, NoticeState::Refused, "{notice:?}");
        assert!(notice.reason.contains("with record abc"), "{}", notice.reason);
    }

    #[tokio::test]
    async fn a_sent_notice_is_never_undone_by_an_older_copy_of_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool.redb")).unwrap();
        let mut r = record(Some("alice@example.org"), "");
        r.notice = Some(Notice {
            state: NoticeState::Pending,
            to: None,
            time_ms: 1,
            reason: String::new(),
            attempts: 0,
        });
        spool.append(vec![r.clone()]).await.unwrap();
        let sent = Notice {
            state: NoticeState::Sent,
            to: Some("alice@example.org".into()),
            time_ms: 2,
            reason: String::new(),
            attempts: 0,
        };
        assert!(spool.set_notice("abc", &sent).unwrap());
        // The worker's copy, read before, comes back with a new outcome.
        r.state = State::Pending;
        spool.update(&r).unwrap();
        assert_eq!(spool.get("abc").unwrap().unwrap().notice, Some(sent));
    }

    #[test]
    fn a_boundary_is_never_in_the_message() {
        let b = boundary(b"");
        assert!(b.starts_with("=_imip-milter_") && b.len() == 14 + 24, "{b}");
        assert_ne!(b, boundary(b""));
    }
}
