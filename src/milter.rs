//! The milter callbacks and per-session state; nothing else. What to do with
//! a message is decided in `decision`, from what `analysis` found.
//!
//! Longer than 700 lines: the callbacks of inbound and outbound sessions
//! share the session state; the outbound path at end of message is the part
//! to move out next.

use crate::clients::Clients;
use crate::{
    address::Recipient,
    decision::{self, Decision, Disposition},
    intake,
    metrics::METRICS,
    outbound,
    spool::{Envelope, Spool},
    tokens::{self, Lookup, TokenRecord},
};
use crate::{metrics::OutboundResult, settings::Settings};
use bytes::Bytes;
use futures_util::FutureExt;
use indymilter::{
    Actions, Callbacks, Context, ContextActions, EomContext, MacroStage, NegotiateContext, ProtoOpts, SetErrorReply,
    SocketInfo, Status,
};
use std::{
    ffi::{CStr, CString},
    panic::AssertUnwindSafe,
    sync::{Arc, RwLock},
};
use tracing::{info, warn};

pub use crate::settings::LocalTokens;

/// A gateway recipient refused at RCPT, and whether the journal tallies it
/// (its client is past its limit) instead of writing an event.
#[derive(Debug)]
pub struct Refusal {
    pub decision: Decision,
    pub tallied: bool,
}

/// What every session shares.
pub struct Shared {
    settings: RwLock<Arc<Settings>>,
    pub spool: Spool,
    pub budget: Arc<Budget>,
    /// What one client may cost the others; in either token mode.
    pub clients: Clients,
}

impl Shared {
    pub fn new(settings: Settings, spool: Spool) -> Self {
        let settings_budget = settings.max_buffered_bytes;
        Self {
            settings: RwLock::new(Arc::new(settings)),
            spool,
            budget: Arc::new(Budget::new(settings_budget)),
            // The defaults of [tokens]; `run` sets the configured ones.
            clients: Clients::new(10, std::time::Duration::from_secs(600), 4),
        }
    }

    /// Checks a gateway recipient's token in local mode: Ok(None) in remote
    /// mode, Ok(Some(record)) for a valid token, Err to refuse.
    ///
    /// Fairness comes before the store (DESIGN §4d): a client past its limit
    /// gets 450 without a lookup, a valid token too (450 asks it to come
    /// back later; telling valid from unknown would take the lookup), and
    /// a client gets at most `max_lookups_per_client` lookups at once.
    /// Unknown and expired tokens count toward the limit, and so do store
    /// failures and timeouts: a flood that makes the store slow pays for it.
    pub async fn check_token(&self, token: &str, client: Option<&str>) -> Result<Option<TokenRecord>, Refusal> {
        let settings = self.settings();
        let Some(local) = &settings.tokens else { return Ok(None) };
        let client = client.unwrap_or("-");
        let tallied = |decision| Refusal {
            decision,
            tallied: true,
        };
        if self.clients.over_limit(client, crate::clock::now_ms()) {
            METRICS.token_lookup_refused();
            return Err(tallied(decision::decide_too_many_unknown()));
        }
        let Some(_slot) = self.clients.start_lookup(client) else {
            METRICS.token_lookup_refused();
            return Err(tallied(decision::decide_too_many_lookups(self.clients.max_lookups())));
        };
        METRICS.token_lookup();
        let looked_up = tokens::lookup(local.store.as_ref(), token, crate::clock::now_ms(), local.days_to_live).await;
        let decision = match looked_up {
            Ok(Lookup::Valid(r)) => return Ok(Some(r)),
            Ok(l) => decision::decide_unknown_token(l == Lookup::Expired),
            Err(e) => {
                METRICS.token_store_error();
                decision::decide_store_failed(&crate::errors::chain(&e))
            }
        };
        self.clients.count_bad(client, crate::clock::now_ms());
        Err(Refusal {
            decision,
            tallied: false,
        })
    }

    /// The journal's line for a recipient refused at RCPT. A client past its
    /// limit is only counted: one summary per window says how many, so that a
    /// flood cannot push everything else out of the journal.
    pub fn journal_recipient(
        &self,
        client: &str,
        tallied: bool,
        queue_id: String,
        sender: &str,
        token: Option<&str>,
        d: &Decision,
    ) {
        let reply = d.smtp_reply.as_ref().map(ToString::to_string);
        if tallied {
            self.clients.tally(client, crate::clock::now_ms(), reply);
            return;
        }
        let event = crate::journal::Event {
            queue_id: (queue_id != "NOQUEUE").then_some(queue_id),
            sender: Some(sender.to_owned()),
            token: token.map(crate::journal::token8),
            smtp_reply: reply,
            ..crate::journal::Event::now("recipient", &self.settings().shown(d.disposition), &d.reason)
        };
        self.spool.journal_later(event);
    }

    /// Writes the journal's summaries whose window has passed (all at `end`).
    pub fn journal_summaries(&self, end: bool) {
        for event in self.clients.summaries(crate::clock::now_ms(), end) {
            self.spool.journal_later(event);
        }
    }

    /// The settings in force; a message keeps the ones it started with.
    pub fn settings(&self) -> Arc<Settings> {
        match self.settings.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn replace(&self, settings: Settings) {
        match self.settings.write() {
            Ok(mut s) => *s = Arc::new(settings),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(settings),
        }
    }
}

/// Message bytes buffered by all sessions together, against
/// `max_buffered_bytes`: past it a message gets 451 4.3.2 instead of memory.
pub struct Budget {
    limit: usize,
    used: std::sync::atomic::AtomicUsize,
}

impl Budget {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            used: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn take(&self, n: usize) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.used
            .fetch_update(Relaxed, Relaxed, |u| u.checked_add(n).filter(|t| *t <= self.limit))
            .is_ok()
    }

    fn give(&self, n: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let _ = self.used.fetch_update(Relaxed, Relaxed, |u| Some(u.saturating_sub(n)));
    }
}

/// State of one SMTP connection.
#[derive(Default)]
pub struct Session {
    client_addr: Option<String>,
    mail_from: String,
    /// The SASL login (`{auth_authen}`) of this message, if any.
    login: Option<String>,
    /// Recipients accepted at RCPT: the argument as received, and its class.
    recipients: Vec<(String, Recipient)>,
    /// Local mode: the records of the gateway recipients' tokens.
    token_records: Vec<TokenRecord>,
    message: Vec<u8>,
    too_large: bool,
    /// The host's buffer budget ran out while this message was read.
    budget_spent: bool,
    /// The steps Postfix does not wait for an answer to (negotiated).
    no_reply: ProtoOpts,
    /// A header or body step failed (a bug) where no answer could be
    /// given: end of message answers 451 for it.
    broken_at: Option<&'static str>,
    /// The shared budget and this session's part of it.
    budget: Option<Arc<Budget>>,
    reserved: usize,
    /// Observe mode, as of the last connect or RCPT: a bug's 451 is not
    /// given either.
    observe: bool,
}

impl Session {
    fn reset_message(&mut self) {
        self.mail_from.clear();
        self.recipients.clear();
        self.token_records.clear();
        self.message = Vec::new();
        self.too_large = false;
        self.budget_spent = false;
        self.broken_at = None;
        self.release();
    }

    fn release(&mut self) {
        if let Some(b) = &self.budget {
            b.give(self.reserved);
        }
        self.reserved = 0;
    }

    fn client_ip(&self) -> Option<std::net::IpAddr> {
        self.client_addr.as_deref().and_then(|a| a.parse().ok())
    }

    fn classes(&self) -> Vec<Recipient> {
        self.recipients.iter().map(|(_, r)| r.clone()).collect()
    }
}

impl Drop for Session {
    /// A connection that ends mid-message gives its bytes back.
    fn drop(&mut self) {
        self.release();
    }
}

fn text(c: &CStr) -> String {
    String::from_utf8_lossy(c.to_bytes()).into_owned()
}

fn queue_id(macros: &indymilter::Macros) -> String {
    macros
        .get(c"i")
        .map(text)
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "NOQUEUE".into())
}

/// A message refused at end of message before it was read (too large, the
/// host's buffer budget spent): the answer, one log line and its journal event.
fn refuse_message(
    shared: &Shared,
    reply: &mut impl SetErrorReply,
    queue_id: &str,
    sender: &str,
    recipients: &[(String, Recipient)],
    d: &Decision,
) -> Status {
    let settings = shared.settings();
    count(&settings, d.disposition);
    let line = format!(
        "{queue_id}: from=<{}> disposition={} reason=\"{}\"",
        crate::address::printable(sender),
        settings.shown(d.disposition),
        crate::address::quoted(&d.reason)
    );
    if d.disposition == Disposition::Tempfail {
        warn!("{line}");
    } else {
        info!("{line}");
    }
    let event = crate::journal::Event {
        queue_id: Some(queue_id.to_owned()),
        sender: Some(sender.to_owned()),
        token: intake::gateway(recipients)
            .next()
            .map(|(_, t)| crate::journal::token8(t)),
        smtp_reply: d.smtp_reply.as_ref().map(ToString::to_string),
        ..crate::journal::Event::now("message", &settings.shown(d.disposition), &d.reason)
    };
    shared.spool.journal_later(event);
    match settings.observe {
        true => Status::Accept,
        false => refuse(reply, d),
    }
}

/// Counts a decision in the metrics: as carried out, or as observed.
fn count(settings: &Settings, d: Disposition) {
    match settings.observe {
        true => METRICS.observed(&settings.shown(d)),
        false => METRICS.message(d),
    }
}

/// The answer to a recipient refused at RCPT; in observe mode Postfix goes
/// on as if the milter were not there (the recipient is not kept as a
/// gateway recipient either).
fn refuse_recipient(settings: &Settings, reply: &mut impl SetErrorReply, d: &Decision) -> Status {
    match settings.observe {
        true => Status::Continue,
        false => refuse(reply, d),
    }
}

/// A refusal's reply and status: 4xx or 5xx as decided.
fn refuse(reply: &mut impl SetErrorReply, d: &Decision) -> Status {
    set_reply(reply, d);
    match d.disposition {
        Disposition::Tempfail => Status::Tempfail,
        _ => Status::Reject,
    }
}

fn set_reply(reply: &mut impl SetErrorReply, d: &Decision) {
    if let Some(r) = &d.smtp_reply {
        if let Err(e) = reply.set_error_reply(r.code, Some(r.enhanced), [r.text.as_str()]) {
            warn!("cannot set SMTP reply \"{r}\": {e}");
        }
    }
}

/// The milter callbacks, sharing `shared`.
pub fn callbacks(shared: Arc<Shared>) -> Callbacks<Session> {
    let on_connect = shared.clone();
    let on_rcpt = shared.clone();
    let on_header = shared.clone();
    let on_body = shared.clone();
    let on_data = shared.clone();
    let on_eom = shared;
    Callbacks::new()
        .on_connect(move |cx, _host, info| {
            let s = on_connect.clone();
            Box::pin(async move { connect(&s, cx, info).await })
        })
        .on_mail(|cx, args| Box::pin(mail(cx, args)))
        .on_rcpt(move |cx, args| {
            let s = on_rcpt.clone();
            Box::pin(async move {
                // A panic here costs this recipient a 451; Postfix goes on.
                match AssertUnwindSafe(rcpt(&s, &mut *cx, args)).catch_unwind().await {
                    Ok(status) => status,
                    Err(_) => {
                        let observe = cx.data.as_ref().is_some_and(|s| s.observe);
                        panicked(&cx.macros, &mut cx.reply, "RCPT", observe)
                    }
                }
            })
        })
        .on_negotiate(|cx, _, offered| Box::pin(negotiate(cx, offered)))
        .on_data(move |cx| {
            let s = on_data.clone();
            Box::pin(async move { guarded(cx, "DATA", ProtoOpts::empty(), |cx| data(&s, cx)) })
        })
        .on_header(move |cx, name, value| {
            let s = on_header.clone();
            Box::pin(async move {
                guarded(cx, "header", ProtoOpts::NOREPLY_HEADER, |cx| {
                    header(&s, cx, name, value)
                })
            })
        })
        .on_eoh(|cx| Box::pin(async move { guarded(cx, "end of headers", ProtoOpts::NOREPLY_EOH, eoh) }))
        .on_body(move |cx, chunk| {
            let s = on_body.clone();
            Box::pin(async move { guarded(cx, "body", ProtoOpts::NOREPLY_BODY, |cx| body(&s, cx, chunk)) })
        })
        .on_eom(move |cx| {
            let s = on_eom.clone();
            Box::pin(async move {
                match AssertUnwindSafe(eom(&s, &mut *cx)).catch_unwind().await {
                    Ok(status) => status,
                    Err(_) => {
                        let observe = cx.data.as_ref().is_some_and(|s| s.observe);
                        panicked(&cx.macros, &mut cx.reply, "end of message", observe)
                    }
                }
            })
        })
        .on_abort(|cx| Box::pin(abort(cx)))
}

/// Runs one per-message step; a panic in it (a bug) costs this message a
/// 451, never the session, the daemon, or an untokenized invitation. Where
/// Postfix waits for no answer (`step` negotiated away), end of message gives it.
fn guarded(
    cx: &mut Context<Session>,
    stage: &'static str,
    step: ProtoOpts,
    run: impl FnOnce(&mut Context<Session>) -> Status,
) -> Status {
    match std::panic::catch_unwind(AssertUnwindSafe(|| run(&mut *cx))) {
        Ok(status) => status,
        Err(_) => {
            let observe = cx.data.as_ref().is_some_and(|s| s.observe);
            if let Some(s) = cx.data.as_mut() {
                if !step.is_empty() && s.no_reply.contains(step) {
                    s.reset_message();
                    s.broken_at = Some(stage);
                    return Status::Noreply;
                }
                // A 451 after RCPT ends the message.
                s.reset_message();
            }
            panicked(&cx.macros, &mut cx.reply, stage, observe)
        }
    }
}

fn panicked(macros: &indymilter::Macros, reply: &mut impl SetErrorReply, stage: &str, observe: bool) -> Status {
    let queue_id = queue_id(macros);
    if observe {
        // Observe mode changes nothing, not even for its own bug.
        tracing::error!("{queue_id}: internal error at {stage}; observe mode: the message goes on");
        return Status::Accept;
    }
    tracing::error!("{queue_id}: internal error at {stage}; answered 451, the sender retries");
    let d = decision::decide_internal_error(stage);
    set_reply(reply, &d);
    Status::Tempfail
}

/// What the milter may do at end of message.
pub const ACTIONS: Actions = Actions::DELETE_RCPT
    .union(Actions::ADD_RCPT)
    .union(Actions::CHANGE_SENDER)
    .union(Actions::CHANGE_HEADER)
    .union(Actions::ADD_HEADER)
    .union(Actions::REPLACE_BODY);

/// Steps whose answer Postfix need not wait for: the milter never refuses
/// there (size and budget are answered at end of message), so each saves a
/// round trip per message, per header line for headers.
const NO_REPLY: ProtoOpts = ProtoOpts::NOREPLY_CONNECT
    .union(ProtoOpts::NOREPLY_MAIL)
    .union(ProtoOpts::NOREPLY_HEADER)
    .union(ProtoOpts::NOREPLY_EOH)
    .union(ProtoOpts::NOREPLY_BODY);

/// Asks Postfix for no answer where none is needed, and for only the
/// macros the milter reads: the queue id and the SASL login.
async fn negotiate(cx: &mut NegotiateContext<Session>, offered: ProtoOpts) -> Status {
    // What the MTA does not offer is not asked for (a milter client without
    // them still works, with a round trip per step).
    let no_reply = offered & NO_REPLY;
    cx.requested_actions = ACTIONS;
    cx.requested_opts |= no_reply;
    for (stage, macros) in [
        (MacroStage::Connect, c""),
        (MacroStage::Helo, c""),
        // The queue id exists from the first accepted recipient on; at MAIL
        // only with smtpd_delay_open_until_valid_rcpt = no.
        (MacroStage::Mail, c"i {auth_authen}"),
        (MacroStage::Rcpt, c"i"),
        (MacroStage::Data, c"i"),
        (MacroStage::Eoh, c""),
        (MacroStage::Eom, c"i"),
    ] {
        cx.requested_macros.insert(stage, macros.to_owned());
    }
    let mut session = Session::default();
    session.no_reply = no_reply;
    cx.data = Some(session);
    Status::Continue
}

async fn connect(shared: &Shared, cx: &mut Context<Session>, info: SocketInfo) -> Status {
    let mut session = cx.data.take().unwrap_or_default();
    session.client_addr = match info {
        SocketInfo::Inet(addr) => Some(addr.ip().to_string()),
        _ => None,
    };
    session.budget = Some(shared.budget.clone());
    session.observe = shared.settings().observe;
    let status = go_on(&session, ProtoOpts::NOREPLY_CONNECT);
    cx.data = Some(session);
    status
}

/// "Go on" at a step: no answer at all when Postfix does not wait for one.
fn go_on(session: &Session, step: ProtoOpts) -> Status {
    if session.no_reply.contains(step) {
        Status::Noreply
    } else {
        Status::Continue
    }
}

async fn mail(cx: &mut Context<Session>, args: Vec<CString>) -> Status {
    let session = cx.data.get_or_insert_with(Session::default);
    session.reset_message();
    session.mail_from = args
        .first()
        .map(|a| {
            let a = text(a);
            a.trim().trim_start_matches('<').trim_end_matches('>').to_owned()
        })
        .unwrap_or_default();
    session.login = cx
        .macros
        .get(c"{auth_authen}")
        .map(text)
        .filter(|a| !a.is_empty() && a.len() <= 320);
    go_on(session, ProtoOpts::NOREPLY_MAIL)
}

async fn rcpt(shared: &Shared, cx: &mut Context<Session>, args: Vec<CString>) -> Status {
    let Some(raw) = args.first().map(|a| text(a)) else {
        return Status::Continue;
    };
    let settings = shared.settings();
    if let Some(s) = cx.data.as_mut() {
        s.observe = settings.observe;
    }
    let class = settings.gateway.classify(&raw);
    if let Some(d) = decision::decide_recipient(&class) {
        count(&settings, d.disposition);
        info!(
            "{}: {} RCPT {} from=<{}>: {}",
            queue_id(&cx.macros),
            settings.shown(d.disposition),
            settings.gateway.redact(&raw),
            cx.data.as_ref().map(|s| s.mail_from.as_str()).unwrap_or(""),
            d.reason
        );
        let sender = cx.data.as_ref().map(|s| s.mail_from.clone()).unwrap_or_default();
        let client = cx.data.as_ref().and_then(|s| s.client_addr.clone());
        let client = client.as_deref().unwrap_or("-");
        // Counted as an unknown token is. The answer stays 550 past the
        // limit: it costs no lookup, and this address never becomes valid.
        let now = crate::clock::now_ms();
        let tallied = shared.clients.over_limit(client, now);
        if !tallied {
            shared.clients.count_bad(client, now);
        }
        shared.journal_recipient(client, tallied, queue_id(&cx.macros), &sender, None, &d);
        return refuse_recipient(&settings, &mut cx.reply, &d);
    }
    if matches!(&class, Recipient::Gateway { token } if token == crate::address::CHECK_TOKEN) {
        // Not a guess: neither counted, journaled nor in the metrics.
        tracing::debug!("{}: RCPT of imip-milter check's probe", queue_id(&cx.macros));
        set_reply(&mut cx.reply, &decision::decide_check_probe());
        return Status::Reject;
    }
    let session = cx.data.get_or_insert_with(Session::default);
    let gateways = session
        .recipients
        .iter()
        .filter(|(_, c)| matches!(c, Recipient::Gateway { .. }))
        .count();
    if matches!(class, Recipient::Gateway { .. }) && gateways >= settings.max_gateway_recipients {
        // Each would be spooled: the count is the amplification bound.
        let d = decision::decide_too_many_recipients(settings.max_gateway_recipients);
        count(&settings, d.disposition);
        info!(
            "{}: {} RCPT {}: {}",
            queue_id(&cx.macros),
            settings.shown(d.disposition),
            settings.gateway.redact(&raw),
            d.reason
        );
        return refuse_recipient(&settings, &mut cx.reply, &d);
    }
    let client = session.client_addr.clone();
    if let Recipient::Gateway { token } = &class {
        let checked = shared.check_token(token, client.as_deref()).await;
        let session = cx.data.get_or_insert_with(Session::default);
        match checked {
            Ok(Some(record)) => session.token_records.push(record),
            Ok(None) => {}
            Err(Refusal { decision: d, tallied }) => {
                count(&settings, d.disposition);
                info!(
                    "{}: {} RCPT {} from=<{}> client={}: {}",
                    queue_id(&cx.macros),
                    settings.shown(d.disposition),
                    settings.gateway.redact(&raw),
                    session.mail_from,
                    session.client_addr.as_deref().unwrap_or("-"),
                    d.reason
                );
                let sender = session.mail_from.clone();
                let client = client.as_deref().unwrap_or("-");
                shared.journal_recipient(client, tallied, queue_id(&cx.macros), &sender, Some(token), &d);
                return refuse_recipient(&settings, &mut cx.reply, &d);
            }
        }
    }
    cx.data
        .get_or_insert_with(Session::default)
        .recipients
        .push((raw, class));
    Status::Continue
}

fn data(shared: &Shared, cx: &mut Context<Session>) -> Status {
    let Some(session) = cx.data.as_ref() else {
        return Status::Accept;
    };
    // No gateway recipient: Accept here, so Postfix skips us for the rest of
    // this message. (Accept at RCPT would end filtering for all recipients.)
    // A local sender's mail to external recipients may be an invitation to tokenize.
    match decision::decide_data(&session.classes()) {
        Some(_) if outbound_candidate(shared, session) => Status::Continue,
        Some(_) => {
            count(&shared.settings(), Disposition::Accept);
            Status::Accept
        }
        None => Status::Continue,
    }
}

/// Buffers part of the message. Never refuses: past max_message_bytes or
/// the host's budget it stops buffering, and end of message answers.
fn grow(shared: &Shared, cx: &mut Context<Session>, bytes: &[&[u8]], step: ProtoOpts) -> Status {
    let Some(session) = cx.data.as_mut() else {
        return Status::Continue;
    };
    let go_on = go_on(session, step);
    if session.too_large || session.budget_spent || session.broken_at.is_some() {
        return go_on;
    }
    let add: usize = bytes.iter().map(|b| b.len()).sum();
    let limit = shared.settings().max_message_bytes;
    if session.message.len() + add > limit {
        session.too_large = true;
        session.message = Vec::new();
        session.release();
        if !session
            .recipients
            .iter()
            .any(|(_, c)| matches!(c, Recipient::Gateway { .. }))
        {
            // Outgoing mail is never refused for its size; it leaves untokenized.
            warn!(
                "{}: from=<{}> outbound message larger than max_message_bytes; not inspected",
                queue_id(&cx.macros),
                crate::address::printable(&session.mail_from)
            );
        }
        return go_on;
    }
    if session.budget.as_ref().is_some_and(|b| !b.take(add)) {
        session.message = Vec::new();
        session.release();
        session.budget_spent = true;
        return go_on;
    }
    session.reserved += add;
    for b in bytes {
        session.message.extend_from_slice(b);
    }
    go_on
}

fn header(shared: &Shared, cx: &mut Context<Session>, name: CString, value: CString) -> Status {
    grow(
        shared,
        cx,
        &[name.as_bytes(), b": ", value.as_bytes(), b"\r\n"],
        ProtoOpts::NOREPLY_HEADER,
    )
}

fn eoh(cx: &mut Context<Session>) -> Status {
    let Some(s) = cx.data.as_mut() else {
        return Status::Continue;
    };
    if !(s.too_large || s.budget_spent || s.broken_at.is_some()) {
        s.message.extend_from_slice(b"\r\n");
    }
    go_on(s, ProtoOpts::NOREPLY_EOH)
}

fn body(shared: &Shared, cx: &mut Context<Session>, chunk: Bytes) -> Status {
    grow(shared, cx, &[&chunk], ProtoOpts::NOREPLY_BODY)
}

async fn abort(cx: &mut Context<Session>) -> Status {
    if let Some(s) = cx.data.as_mut() {
        s.reset_message();
    }
    Status::Continue
}

/// Mail that may carry an invitation to tokenize. Local envelope senders
/// without authentication are looked at too, only to say in the log why
/// their invitation leaves untokenized.
fn outbound_candidate(shared: &Shared, session: &Session) -> bool {
    let settings = shared.settings();
    let Some(out) = &settings.outbound else { return false };
    let trusted = session
        .client_ip()
        .is_some_and(|ip| out.trusted_clients.iter().any(|n| n.contains(ip)));
    (session.login.is_some() || trusted || out.is_local(&session.mail_from))
        && session.recipients.iter().any(|(raw, _)| out.is_external(raw))
}

async fn eom(shared: &Shared, cx: &mut EomContext<Session>) -> Status {
    let queue_id = queue_id(&cx.macros);
    let Some(session) = cx.data.as_mut() else {
        return Status::Accept;
    };
    // What headers and body found, answered here where Postfix waits.
    if let Some(stage) = session.broken_at {
        session.reset_message();
        let observe = session.observe;
        return panicked(&cx.macros, &mut cx.reply, stage, observe);
    }
    let only_gateway = !session.recipients.iter().any(|(_, c)| *c == Recipient::Other);
    let refusal = if session.budget_spent {
        Some(decision::decide_budget_spent())
    } else if session.too_large && only_gateway && !session.recipients.is_empty() {
        Some(decision::decide_too_large(shared.settings().max_message_bytes, false))
    } else {
        None
    };
    if let Some(d) = refusal {
        let (sender, recipients) = (
            std::mem::take(&mut session.mail_from),
            std::mem::take(&mut session.recipients),
        );
        session.reset_message();
        return refuse_message(shared, &mut cx.reply, &queue_id, &sender, &recipients, &d);
    }
    if !session
        .recipients
        .iter()
        .any(|(_, c)| matches!(c, Recipient::Gateway { .. }))
    {
        let message = std::mem::take(&mut session.message);
        let recipients = std::mem::take(&mut session.recipients);
        let from = std::mem::take(&mut session.mail_from);
        let submitter = Submitter {
            login: session.login.take(),
            client: session.client_ip(),
        };
        session.reset_message();
        return tokenize(shared, cx, &queue_id, &from, &submitter, &recipients, message).await;
    }
    if session.too_large {
        // Mixed recipients: the others get the message, the gateway loses it.
        let recipients = std::mem::take(&mut session.recipients);
        let from = std::mem::take(&mut session.mail_from);
        session.reset_message();
        let settings = shared.settings();
        let d = decision::decide_too_large(settings.max_message_bytes, true);
        count(&settings, d.disposition);
        for (raw, _) in intake::gateway(&recipients).filter(|_| !settings.observe) {
            if let Err(e) = cx.actions.delete_recipient(raw).await {
                warn!("{queue_id}: cannot delete recipient: {e}");
                let d = decision::decide_spool_failed(&format!("cannot delete recipient: {e}"));
                set_reply(&mut cx.reply, &d);
                return Status::Tempfail;
            }
        }
        info!(
            "{queue_id}: from=<{}> disposition={} reason=\"{}\"",
            crate::address::printable(&from),
            settings.shown(d.disposition),
            crate::address::quoted(&d.reason)
        );
        return Status::Accept;
    }
    let message = std::mem::take(&mut session.message);
    let recipients = std::mem::take(&mut session.recipients);
    let token_records = std::mem::take(&mut session.token_records);
    let envelope = Envelope {
        queue_id: Some(queue_id),
        mail_from: std::mem::take(&mut session.mail_from),
        client_addr: session.client_addr.clone(),
    };
    session.reset_message();

    let settings = shared.settings();
    if settings.observe {
        // Decided and journaled; the message goes on as it came.
        let intake = intake::observe(message, &recipients, &token_records, &settings, &envelope).await;
        intake::record(&shared.spool, &envelope, &recipients, &intake, "");
        return Status::Accept;
    }
    let store = settings.tokens.as_ref().map(|l| l.store.as_ref());
    let mut intake = intake::take(
        &shared.spool,
        store,
        message,
        &recipients,
        &token_records,
        &settings,
        &envelope,
    )
    .await;
    let status = match intake.decision.disposition {
        Disposition::Accept => Status::Accept,
        Disposition::Discard => Status::Discard,
        Disposition::DeleteRecipients | Disposition::Redirect => {
            let mut failed = None;
            if let Some(to) = &intake.decision.redirect_to {
                // Postfix delivers the message to the organizer instead,
                // saying why, with her own address as ORGANIZER again.
                let why: String = crate::address::printable(&intake.decision.reason)
                    .chars()
                    .take(300)
                    .collect();
                let body = match (intake.message.take(), intake.organizer.as_deref()) {
                    (Some(raw), Some(organizer)) => outbound::organizer_given_back(&raw, organizer),
                    _ => None,
                };
                let acted = async {
                    cx.actions.add_recipient(format!("<{to}>")).await?;
                    cx.actions.add_header(REDIRECT_HEADER, why.as_str()).await?;
                    if let Some(body) = &body {
                        cx.actions.replace_body(body).await?;
                    }
                    Ok::<(), indymilter::ActionError>(())
                }
                .await;
                if let Err(e) = acted {
                    failed = Some(e.to_string());
                }
            }
            for (raw, _) in intake::gateway(&recipients).filter(|_| failed.is_none()) {
                // The argument exactly as received: Postfix matches it literally.
                if let Err(e) = cx.actions.delete_recipient(raw).await {
                    failed = Some(e.to_string());
                    break;
                }
            }
            match failed {
                None => Status::Accept,
                Some(e) => {
                    // The reply is spooled; the sender's retry is recognised as a duplicate.
                    intake.decision = decision::decide_spool_failed(&format!("cannot delete recipient: {e}"));
                    set_reply(&mut cx.reply, &intake.decision);
                    Status::Tempfail
                }
            }
        }
        Disposition::Reject => {
            set_reply(&mut cx.reply, &intake.decision);
            Status::Reject
        }
        Disposition::Tempfail => {
            set_reply(&mut cx.reply, &intake.decision);
            Status::Tempfail
        }
    };
    intake::record(&shared.spool, &envelope, &recipients, &intake, "");
    status
}

/// The header on mail the milter sends to the organizer instead of the
/// gateway: why it came to her.
pub const REDIRECT_HEADER: &str = "X-IMIP-Milter-Redirect";

/// Who submitted an outgoing message.
struct Submitter {
    login: Option<String>,
    client: Option<std::net::IpAddr>,
}

/// Outbound: an invitation from a local organizer to external attendees leaves
/// with a tokenized ORGANIZER, Reply-To and envelope sender, when the sender
/// authenticated as that organizer.
async fn tokenize(
    shared: &Shared,
    cx: &mut EomContext<Session>,
    queue_id: &str,
    from: &str,
    submitter: &Submitter,
    recipients: &[(String, Recipient)],
    message: Vec<u8>,
) -> Status {
    let settings = shared.settings();
    let (Some(out), Some(local)) = (&settings.outbound, &settings.tokens) else {
        return Status::Accept;
    };
    let externals: Vec<String> = recipients
        .iter()
        .filter(|(raw, _)| out.is_external(raw))
        .map(|(raw, _)| format!("mailto:{}", raw.trim().trim_start_matches('<').trim_end_matches('>')))
        .collect();
    let cfg = out.clone();
    let (message, found) = match tokio::task::spawn_blocking(move || {
        let found = outbound::find(&message, &cfg);
        (message, found)
    })
    .await
    {
        Ok(v) => v,
        Err(_) => return Status::Accept,
    };
    let Some(inv) = found else { return Status::Accept };
    // Every outbound decision is journaled and counted: "did the invitation
    // get a token?" is the first question asked.
    let outcome = |result: OutboundResult, reason: &str, token: Option<&str>| {
        let mut disposition = match result {
            OutboundResult::Tokenized => "tokenized",
            OutboundResult::NotTokenized => "not-tokenized",
            OutboundResult::Tempfail => "tempfail",
        }
        .to_owned();
        if settings.observe {
            disposition = crate::journal::would(&disposition);
            METRICS.observed(&disposition);
        } else {
            METRICS.outbound(result);
        }
        shared.spool.journal_later(crate::journal::Event {
            queue_id: Some(queue_id.to_owned()),
            message_id: inv.message_id.clone(),
            sender: Some(from.to_owned()),
            organizer: Some(inv.organizer.clone()),
            attendee: Some(externals.join(", ")),
            token: token.map(crate::journal::token8),
            ..crate::journal::Event::now("outbound", &disposition, reason)
        });
    };
    let how = match out.authorize(&inv.organizer, submitter.login.as_deref(), submitter.client) {
        Ok(how) => how,
        Err(why) => {
            warn!(
                "{queue_id}: from=<{}> outbound invitation uid={} {}: {why}",
                crate::address::printable(from),
                crate::address::printable(&inv.uid),
                match settings.observe {
                    true => "would not be tokenized",
                    false => "not tokenized",
                },
            );
            outcome(OutboundResult::NotTokenized, &why, None);
            return Status::Accept;
        }
    };
    if settings.observe {
        // No token minted, nothing changed: the invitation leaves as it came.
        info!(
            "{queue_id}: from=<{}> outbound method={} uid={} organizer={} attendees={} would be tokenized, authorized-by={how}",
            crate::address::printable(from),
            inv.method,
            crate::address::printable(&inv.uid),
            crate::address::printable(&inv.organizer),
            externals.len(),
        );
        outcome(OutboundResult::Tokenized, &format!("authorized by {how}"), None);
        return Status::Accept;
    }
    let now = crate::clock::now_ms();
    let mid = inv.message_id.as_deref();
    let record = match externals.as_slice() {
        [one] => tokens::mint_or_reuse(local.store.as_ref(), &inv.organizer, one, &inv.uid, mid, now).await,
        many => tokens::mint_or_reuse_shared(local.store.as_ref(), &inv.organizer, &inv.uid, many, mid, now).await,
    };
    let record = match record {
        Ok(r) => r,
        Err(e) => {
            // Not tokenized, the invitation would leave with the organizer's
            // own address and replies would bypass the gateway: try again later.
            let e = crate::errors::chain(&e);
            METRICS.token_store_error();
            warn!("{queue_id}: outbound invitation not tokenized: {e}");
            let d = decision::decide_store_failed(&e);
            outcome(OutboundResult::Tempfail, &d.reason, None);
            set_reply(&mut cx.reply, &d);
            return Status::Tempfail;
        }
    };
    let Some(base) = settings.gateway.bases().first() else {
        return Status::Accept;
    };
    let delimiter = settings.gateway.delimiters().first().copied().unwrap_or('+');
    let address = format!("{}{delimiter}{}@{}", base.local, record.token, base.domain);
    let body_start = outbound::body_start(&message);
    let Some(body) = outbound::rewrite_body(&message, body_start, &inv, &format!("mailto:{address}")) else {
        warn!(
            "{queue_id}: outbound invitation uid={} not rewritten: calendar part unreadable",
            crate::address::printable(&inv.uid)
        );
        outcome(OutboundResult::NotTokenized, "calendar part unreadable", None);
        return Status::Accept;
    };
    let has_reply_to = message
        .get(..body_start)
        .unwrap_or_default()
        .split(|b| *b == b'\n')
        .any(|l| l.get(..9).is_some_and(|n| n.eq_ignore_ascii_case(b"reply-to:")));
    let result = async {
        cx.actions.replace_body(&body).await?;
        if has_reply_to {
            cx.actions.change_header("Reply-To", 1, Some(address.as_str())).await?;
        } else {
            cx.actions.add_header("Reply-To", address.as_str()).await?;
        }
        cx.actions.change_sender(format!("<{address}>"), None::<&str>).await
    }
    .await;
    if let Err(e) = result {
        warn!("{queue_id}: outbound invitation not tokenized: {e}");
        let d = decision::decide_spool_failed(&format!("milter action failed: {e}"));
        outcome(OutboundResult::Tempfail, &d.reason, None);
        set_reply(&mut cx.reply, &d);
        return Status::Tempfail;
    }
    info!(
        "{queue_id}: from=<{}> outbound method={} uid={} organizer={} attendees={} token={} authorized-by={how}",
        crate::address::printable(from),
        inv.method,
        crate::address::printable(&inv.uid),
        crate::address::printable(&inv.organizer),
        externals.len(),
        crate::address::token_prefix(&record.token)
    );
    outcome(
        OutboundResult::Tokenized,
        &format!("authorized by {how}"),
        Some(&record.token),
    );
    Status::Accept
}
