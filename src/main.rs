//! Command line: parse arguments, load the configuration, call the library.
//!
//! Longer than 700 lines: one function per subcommand, each a thin call
//! into the library, argument parsing and output formatting.

use clap::{Args, Parser, Subcommand};
use imip_milter::{
    address::{BaseAddress, GatewayAddresses},
    config::{Config, LogFormat, DEFAULT_CONFIG_PATH, EMBEDDED_DEFAULT},
    control::{self, Request},
    errors::chain,
};
use std::{io::Read, path::PathBuf, process::ExitCode};
use tracing::{error, info};

/// sysexits(3)
const EX_USAGE: u8 = 64;
const EX_NOINPUT: u8 = 66;
const EX_SOFTWARE: u8 = 70;
const EX_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "imip-milter",
    version,
    about = "Milter that takes emailed calendar replies in-line and hands them to a calendar server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct ConfigArg {
    /// Configuration file [default: /etc/imip-milter/imip-milter.toml]
    #[arg(long, short = 'c', value_name = "FILE", global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the milter (the daemon)
    Run(ConfigArg),
    /// Show the decision the milter would take for a message file
    Inspect {
        #[command(flatten)]
        config: ConfigArg,
        /// Gateway base address (instead of gateway.addresses)
        #[arg(long, value_name = "ADDR")]
        gateway: Vec<String>,
        /// Envelope recipient, as in RCPT TO
        #[arg(long, value_name = "ADDR", required = true)]
        rcpt: Vec<String>,
        /// Envelope sender, as in MAIL FROM (default: the From header's address)
        #[arg(long, value_name = "ADDR")]
        sender: Option<String>,
        /// Print one JSON object
        #[arg(long)]
        json: bool,
        /// Message file, or - for standard input
        file: String,
    },
    /// List and manage the spool
    Queue {
        #[command(flatten)]
        config: ConfigArg,
        #[command(subcommand)]
        action: QueueAction,
    },
    /// Take one message from standard input for one gateway recipient
    /// (Postfix pipe(8) safety net); exits with a sysexits(3) code
    Deliver {
        #[command(flatten)]
        config: ConfigArg,
        /// The gateway recipient, with its token
        #[arg(long, value_name = "ADDR")]
        rcpt: String,
        /// The envelope sender (empty for bounces)
        #[arg(long, value_name = "ADDR", default_value = "")]
        sender: String,
        /// Postfix queue id, for the log
        #[arg(long, value_name = "ID")]
        queue_id: Option<String>,
        /// The SMTP client's address (Postfix: ${client_address})
        #[arg(long, value_name = "ADDR")]
        client_addr: Option<String>,
    },
    /// Check the configuration, the state directory, the target and Postfix
    Check {
        #[command(flatten)]
        config: ConfigArg,
        /// Postfix configuration directory (postconf -c)
        #[arg(long, value_name = "DIR")]
        postfix_config: Option<PathBuf>,
        /// caldav: prove the target works for this organizer (finds the
        /// calendar home, lists the calendars, searches them; writes nothing)
        #[arg(long, value_name = "ADDR")]
        organizer: Option<String>,
    },
    /// What became of messages and deliveries, oldest first
    Journal {
        #[command(flatten)]
        config: ConfigArg,
        /// One JSON object per line
        #[arg(long)]
        json: bool,
        /// Envelope sender, header From, attendee or organizer
        #[arg(long, value_name = "ADDR")]
        address: Option<String>,
        #[arg(long, value_name = "ID")]
        message_id: Option<String>,
        /// Postfix queue id
        #[arg(long, value_name = "ID")]
        queue_id: Option<String>,
        /// Only this recent, e.g. 2h or 3d
        #[arg(long, value_name = "DURATION")]
        since: Option<String>,
    },
    /// Manage local tokens ([tokens] mode = "local")
    Tokens {
        #[command(flatten)]
        config: ConfigArg,
        #[command(subcommand)]
        action: TokensAction,
    },
    /// Print the built-in default configuration
    DefaultConfig,
}

#[derive(Subcommand)]
enum TokensAction {
    /// Mint a token for (organizer, attendee, event UID), or print the existing
    /// one; several --attendee make one token shared by them
    Add {
        #[arg(long, value_name = "ADDR")]
        organizer: String,
        #[arg(long, value_name = "ADDR", required = true)]
        attendee: Vec<String>,
        #[arg(long, value_name = "UID")]
        uid: String,
    },
    /// The tokens, shortened (--json: whole, one object a line); only those
    /// of an organizer, attendee or event UID when given
    List {
        #[arg(long, value_name = "ADDR")]
        organizer: Option<String>,
        #[arg(long, value_name = "ADDR")]
        attendee: Option<String>,
        #[arg(long, value_name = "UID")]
        uid: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// One token, whole, as JSON
    Show { token: String },
    /// Forget a token: replies to it are refused
    Revoke { token: String },
    /// Forget tokens unused for tokens.days_to_live days
    Purge,
    /// Read CalendarServer's IMIP_TOKENS rows (TOKEN,ORGANIZER,ATTENDEE,ICALUID,ACCESSED) from a CSV file
    Import { file: PathBuf },
}

#[derive(Subcommand)]
enum QueueAction {
    /// Pending and failed records (--all: delivered ones too)
    List {
        #[arg(long)]
        all: bool,
    },
    /// Records, whole, as JSON: by id, a prefix of one, a Postfix queue id or a Message-ID
    Show { id: String },
    /// Deliver a failed or waiting record now (--all: every waiting and failed one)
    Retry {
        id: Option<String>,
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// Remove a record from the spool
    Delete { id: String },
}

fn load_config(arg: &ConfigArg, embedded_fallback: bool) -> Result<Config, String> {
    match &arg.config {
        Some(path) => Config::load(path).map_err(|e| chain(&e)),
        None => {
            let path = PathBuf::from(DEFAULT_CONFIG_PATH);
            if !path.exists() && embedded_fallback {
                eprintln!("imip-milter: no {DEFAULT_CONFIG_PATH}; using the built-in default configuration");
                return Config::parse(EMBEDDED_DEFAULT).map_err(|e| chain(&e));
            }
            Config::load(&path).map_err(|e| chain(&e))
        }
    }
}

fn init_logging(level: tracing::Level, format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::{filter::Targets, layer::SubscriberExt, util::SubscriberInitExt};
    // Libraries' trace lines carry whole milter commands (RCPT arguments,
    // that is tokens) and HTTP internals: at most debug from them.
    let filter = Targets::new()
        .with_default(level.min(tracing::Level::DEBUG))
        .with_target("imip_milter", level);
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    // A panic message can quote the mail it choked on: log where, not what.
    std::panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!("internal error (panic) at {at}");
    }));
    // journald stamps every line itself.
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    match (format, under_journal) {
        (LogFormat::Json, _) => builder.json().flatten_event(true).finish().with(filter).init(),
        (LogFormat::Text, true) => builder.without_time().finish().with(filter).init(),
        (LogFormat::Text, false) => builder.finish().with(filter).init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(arg) => run(&arg),
        Command::Inspect {
            config,
            gateway,
            rcpt,
            sender,
            json,
            file,
        } => inspect(&config, &gateway, &rcpt, sender.as_deref(), json, &file),
        Command::Queue { config, action } => queue(&config, action),
        Command::Deliver {
            config,
            rcpt,
            sender,
            queue_id,
            client_addr,
        } => deliver(&config, &rcpt, &sender, queue_id, client_addr),
        Command::Check {
            config,
            postfix_config,
            organizer,
        } => check(&config, postfix_config.as_deref(), organizer.as_deref()),
        Command::Tokens { config, action } => tokens(&config, action),
        Command::Journal {
            config,
            json,
            address,
            message_id,
            queue_id,
            since,
        } => journal(&config, json, address, message_id, queue_id, since.as_deref()),
        Command::DefaultConfig => {
            print!("{EMBEDDED_DEFAULT}");
            ExitCode::SUCCESS
        }
    }
}

fn run(arg: &ConfigArg) -> ExitCode {
    let config = match load_config(arg, arg.config.is_none()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("imip-milter: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    init_logging(config.log_level, config.log_format);
    // The file SIGHUP reloads; None when running on the built-in default.
    let reload_path = match &arg.config {
        Some(p) => Some(p.clone()),
        None => Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| p.exists()),
    };
    // Before any thread or file: root becomes the daemon's user.
    let identity = match imip_milter::privileges::drop_to_owner(&config) {
        Ok(id) => id,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    info!(
        "configuration {}, state_dir {}, uid {} gid {}",
        reload_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "built-in default".into()),
        config.state_dir.display(),
        identity.uid,
        identity.gid
    );
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            error!("cannot start the runtime: {e}");
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    runtime.block_on(async move {
        let listener = match imip_milter::bind(&config.listen).await {
            Ok(l) => l,
            Err(e) => {
                error!("listen: cannot open {}: {e}", config.listen);
                return ExitCode::from(EX_CONFIG);
            }
        };
        use tokio::signal::unix::{signal, SignalKind};
        // Handlers in place before the spool opens: a signal that arrives
        // early is handled, not the default action (which ends the process).
        let signals = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        );
        let (term, int, hup) = match signals {
            (Ok(t), Ok(i), Ok(h)) => (t, i, h),
            _ => {
                error!("cannot install signal handlers");
                return ExitCode::from(EX_SOFTWARE);
            }
        };
        let shutdown = async move {
            let (mut term, mut int) = (term, int);
            tokio::select! {
                _ = term.recv() => info!("SIGTERM: finishing open sessions"),
                _ = int.recv() => info!("SIGINT: finishing open sessions"),
            }
        };
        let (reload_tx, reloads) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            let mut hup = hup;
            while hup.recv().await.is_some() {
                let Some(path) = &reload_path else {
                    info!("SIGHUP: running on the built-in default; no file to reload");
                    continue;
                };
                match Config::load(path) {
                    Ok(c) => {
                        let _ = reload_tx.send(c).await;
                    }
                    Err(e) => error!("SIGHUP: {}; keeping the running configuration", chain(&e)),
                }
            }
        });
        match imip_milter::run_with_reload(config, listener, shutdown, reloads).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!("{}", imip_milter::errors::chain(&*e));
                ExitCode::from(EX_CONFIG)
            }
        }
    })
}

fn inspect(
    arg: &ConfigArg,
    gateway: &[String],
    rcpts: &[String],
    sender: Option<&str>,
    json: bool,
    file: &str,
) -> ExitCode {
    let config = load_config(arg, false);
    let offline = !gateway.is_empty();
    let config = match config {
        Ok(c) => Some(c),
        Err(e) if !offline => {
            eprintln!("imip-milter: {e} (or give --gateway for the offline check)");
            return ExitCode::from(EX_CONFIG);
        }
        Err(_) => None,
    };
    let max = config.as_ref().map_or(10 * 1024 * 1024, |c| c.max_message_bytes);
    let mut raw = Vec::new();
    let read = if file == "-" {
        std::io::stdin().take(max as u64 + 1).read_to_end(&mut raw).map(|_| ())
    } else {
        std::fs::File::open(file).and_then(|f| f.take(max as u64 + 1).read_to_end(&mut raw).map(|_| ()))
    };
    if let Err(e) = read {
        eprintln!("imip-milter: {file}: {e}");
        return ExitCode::from(EX_NOINPUT);
    }
    let verdict = match (offline, config) {
        (true, config) => {
            let mut bases = Vec::new();
            for g in gateway {
                match BaseAddress::parse(g) {
                    Ok(b) => bases.push(b),
                    Err(e) => {
                        eprintln!("imip-milter: --gateway: {e}");
                        return ExitCode::from(EX_USAGE);
                    }
                }
            }
            let limits = config.as_ref().map_or(imip_milter::analysis::Limits::default(), |c| {
                imip_milter::analysis::Limits {
                    components: c.max_components,
                    attendees: c.max_attendees,
                }
            });
            let mut v = imip_milter::inspect::inspect(&GatewayAddresses::new(bases, "+"), max, limits, rcpts, &raw);
            v.inputs = "offline: --gateway only; no token store, [policy] or target kind consulted \
                        (without --gateway: the milter's decision from the configuration)"
                .into();
            v
        }
        (false, Some(config)) => match replay(arg, &config, rcpts, sender, &raw) {
            Ok(v) => v,
            Err(code) => return code,
        },
        (false, None) => return ExitCode::from(EX_CONFIG),
    };
    if json {
        match serde_json::to_string(&verdict) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("imip-milter: {e}");
                return ExitCode::from(EX_SOFTWARE);
            }
        }
    } else {
        print!("{}", verdict.to_text());
    }
    ExitCode::SUCCESS
}

/// `inspect` with the configuration: the milter's own decision. Tokens are
/// looked up read-only, through the daemon when one runs (it holds the
/// spool), else in the store itself.
fn replay(
    arg: &ConfigArg,
    config: &Config,
    rcpts: &[String],
    sender: Option<&str>,
    raw: &[u8],
) -> Result<imip_milter::inspect::Verdict, ExitCode> {
    use imip_milter::inspect::TokenAnswer;
    let settings = imip_milter::settings::Settings::from_config(config);
    let local = config.tokens.mode == imip_milter::config::TokenMode::Local;
    if local {
        if let Err(e) = imip_milter::privileges::drop_to_owner(config) {
            eprintln!("imip-milter: {e}");
            return Err(ExitCode::from(EX_CONFIG));
        }
    }
    // The envelope sender: as given, else the From header's address.
    let given = sender.is_some();
    let sender = match sender {
        Some(s) => s.trim_matches(['<', '>']).to_owned(),
        None => imip_milter::message::read(raw)
            .ok()
            .and_then(|m| m.from)
            .unwrap_or_default(),
    };
    let now = imip_milter::clock::now_ms();
    let mut lookup = |token: &str| match control::request_or_open(
        config,
        &Request::TokensShow {
            token: token.to_owned(),
        },
    ) {
        Ok(r) if r.ok => match r.tokens.and_then(|t| t.into_iter().next()) {
            Some(t) if t.expired(now, config.tokens.days_to_live) => TokenAnswer::Expired,
            Some(t) => TokenAnswer::Valid(t),
            None => TokenAnswer::Unknown,
        },
        Ok(r) if r.error.as_deref() == Some("no such token") => TokenAnswer::Unknown,
        Ok(r) => TokenAnswer::Failed(r.error.unwrap_or_default()),
        Err(e) => TokenAnswer::Failed(e),
    };
    let mut v = imip_milter::inspect::replay(&settings, &sender, rcpts, raw, local.then_some(&mut lookup as _));
    let path = arg.config.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
    let tokens = if local {
        match &config.tokens.store {
            imip_milter::config::TokenStoreConfig::Redb => "local tokens (redb, read-only)".to_owned(),
            imip_milter::config::TokenStoreConfig::Postgres { layout, .. } => {
                format!("local tokens (PostgreSQL, {layout:?} layout, read-only)").to_lowercase()
            }
        }
    } else {
        "remote tokens (the target checks them)".to_owned()
    };
    v.inputs = format!(
        "{}; {tokens}; policy.sender = {}; target.kind = {}; envelope sender <{}>{}",
        path.display(),
        match &config.policy {
            imip_milter::config::SenderPolicy::Token => "token",
            imip_milter::config::SenderPolicy::Attendee => "attendee",
            imip_milter::config::SenderPolicy::Dmarc { .. } => "dmarc",
        },
        match config.target.kind {
            imip_milter::config::TargetKind::Webhook => "webhook",
            imip_milter::config::TargetKind::CalendarServer => "calendarserver",
            imip_milter::config::TargetKind::CalDav => "caldav",
        },
        imip_milter::address::printable(&sender),
        if given {
            ""
        } else {
            " (the From header's; give --sender for MAIL FROM)"
        }
    );
    Ok(v)
}

fn journal(
    arg: &ConfigArg,
    json: bool,
    address: Option<String>,
    message_id: Option<String>,
    queue_id: Option<String>,
    since: Option<&str>,
) -> ExitCode {
    let config = match load_config(arg, false) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("imip-milter: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let since_ms = match since.map(imip_milter::config::parse_duration) {
        None => 0,
        Some(Some(d)) => imip_milter::clock::now_ms().saturating_sub(d.as_millis() as u64),
        Some(None) => {
            eprintln!(
                "imip-milter: --since {}: not a duration (30s, 10m, 2h, 3d)",
                since.unwrap_or("")
            );
            return ExitCode::from(EX_USAGE);
        }
    };
    if let Err(e) = imip_milter::privileges::drop_to_owner(&config) {
        eprintln!("imip-milter: {e}");
        return ExitCode::from(EX_CONFIG);
    }
    let filter = imip_milter::journal::Filter {
        address,
        message_id,
        queue_id,
        since_ms,
    };
    let resp = match answered(control::request_or_open(&config, &Request::Journal { filter })) {
        Ok(r) => r,
        Err(code) => return code,
    };
    for e in resp.events.unwrap_or_default() {
        if json {
            println!("{}", serde_json::to_string(&e).unwrap_or_default());
        } else {
            println!("{}", e.to_line());
        }
    }
    ExitCode::SUCCESS
}

/// A control answer that says ok; else the error printed, and the exit code.
fn answered(answer: Result<control::Response, String>) -> Result<control::Response, ExitCode> {
    match answer {
        Ok(r) if r.ok => Ok(r),
        Ok(r) => {
            eprintln!("imip-milter: {}", r.error.unwrap_or_default());
            Err(ExitCode::FAILURE)
        }
        Err(e) => {
            eprintln!("imip-milter: {e}");
            Err(ExitCode::FAILURE)
        }
    }
}

fn queue(arg: &ConfigArg, action: QueueAction) -> ExitCode {
    let config = match load_config(arg, false) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("imip-milter: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    if let Err(e) = imip_milter::privileges::drop_to_owner(&config) {
        eprintln!("imip-milter: {e}");
        return ExitCode::from(EX_CONFIG);
    }
    let (req, list) = match action {
        QueueAction::List { all } => (Request::List { all }, true),
        QueueAction::Show { id } => (Request::Show { id }, false),
        QueueAction::Retry { all: true, .. } => (Request::RetryAll, false),
        QueueAction::Retry { id: Some(id), .. } => (Request::Retry { id }, false),
        QueueAction::Retry { id: None, all: false } => {
            eprintln!("imip-milter: queue retry needs an ID or --all");
            return ExitCode::from(EX_USAGE);
        }
        QueueAction::Delete { id } => (Request::Delete { id }, false),
    };
    let resp = match answered(control::request_or_open(&config, &req)) {
        Ok(r) => r,
        Err(code) => return code,
    };
    match (list, resp.records, resp.count) {
        (true, Some(records), _) => print!("{}", control::format_list(&records, resp.target_down_since_ms)),
        (false, Some(records), _) => {
            for r in records {
                println!("{}", pretty_with_times(&r));
            }
        }
        (_, None, Some(n)) => println!("{n} record(s)"),
        _ => {}
    }
    ExitCode::SUCCESS
}

/// A record as pretty JSON; beside each `…_ms` time the same in RFC 3339
/// (`created_ms` and `created_at`), for the people who read it.
fn pretty_with_times(value: &impl serde::Serialize) -> String {
    let mut v = serde_json::to_value(value).unwrap_or_default();
    add_times(&mut v);
    if let Some(notice) = v.get_mut("notice") {
        add_times(notice);
    }
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

fn add_times(v: &mut serde_json::Value) {
    if let Some(obj) = v.as_object_mut() {
        let times: Vec<(String, String)> = obj
            .iter()
            .filter_map(|(k, v)| {
                let name = k.strip_suffix("_ms")?;
                let ms = i64::try_from(v.as_u64().filter(|ms| *ms > 0)?).ok()?;
                let at = chrono::DateTime::from_timestamp_millis(ms)?;
                Some((
                    format!("{name}_at"),
                    at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                ))
            })
            .collect();
        for (k, t) in times {
            obj.insert(k, t.into());
        }
    }
}

fn deliver(
    arg: &ConfigArg,
    rcpt: &str,
    sender: &str,
    queue_id: Option<String>,
    client_addr: Option<String>,
) -> ExitCode {
    use imip_milter::deliver::EX_TEMPFAIL;
    let fail = |msg: String| {
        // Our own trouble is never the sender's fault: try again later.
        eprintln!("imip-milter deliver: {msg}");
        ExitCode::from(EX_TEMPFAIL)
    };
    let config = match load_config(arg, false) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    if let Err(e) = imip_milter::privileges::drop_to_owner(&config) {
        return fail(e);
    }
    let mut raw = Vec::new();
    if let Err(e) = std::io::stdin()
        .take(config.max_message_bytes as u64 + 1)
        .read_to_end(&mut raw)
    {
        return fail(format!("reading the message: {e}"));
    }
    let req = Request::Deliver {
        rcpt: rcpt.to_owned(),
        sender: sender.to_owned(),
        queue_id: queue_id.clone(),
        client_addr: client_addr.clone(),
        bytes: raw.len() as u64,
    };
    let verdict = match control::request_with(&config.control_path(), &req, &raw) {
        Ok(resp) => match resp.verdict {
            Some(v) => v,
            None => return fail(resp.error.unwrap_or_else(|| "no answer".into())),
        },
        Err(control::ClientError::Other(e)) => return fail(e),
        Err(control::ClientError::NoDaemon) => {
            match deliver_without_daemon(config, rcpt, sender, queue_id, client_addr, raw) {
                Ok(v) => v,
                Err(e) => return fail(e),
            }
        }
    };
    if verdict.exit_code() != 0 {
        eprintln!("{}", verdict.message());
    }
    ExitCode::from(verdict.exit_code())
}

/// No daemon: spool the reply ourselves and try to deliver it at once; what
/// does not go through now, the daemon delivers when it is back.
fn deliver_without_daemon(
    config: Config,
    rcpt: &str,
    sender: &str,
    queue_id: Option<String>,
    client_addr: Option<String>,
    raw: Vec<u8>,
) -> Result<imip_milter::deliver::Verdict, String> {
    use imip_milter::{milter::Shared, spool::Spool, targets::Target};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        imip_milter::prepare_state_dir(&config).map_err(|e| e.to_string())?;
        let spool = Spool::open_waiting(&config.spool_path(), std::time::Duration::from_secs(10))
            .map_err(|e| imip_milter::errors::chain(&e))?;
        let mut settings = imip_milter::settings::Settings::from_config(&config);
        if config.tokens.mode == imip_milter::config::TokenMode::Local {
            settings.tokens =
                Some(imip_milter::local_tokens(&config, &spool).map_err(|e| imip_milter::errors::chain(&*e))?);
        }
        let mut shared = Shared::new(settings, spool.clone());
        shared.clients = imip_milter::client_limits(&config);
        let verdict = imip_milter::deliver::take(&shared, rcpt, sender, queue_id, client_addr, raw).await;
        if !verdict.new_ids.is_empty() {
            match Target::new(&config.target) {
                Ok(target) => {
                    let notices = imip_milter::notice::Notices::from_config(&config);
                    for id in &verdict.new_ids {
                        if let Ok(Some(rec)) = spool.get(id) {
                            let (cfg, n) = (&config.delivery, &notices);
                            imip_milter::forward::attempt(&spool, &target, cfg, n, None, rec, || {}).await;
                        }
                    }
                }
                Err(e) => eprintln!("imip-milter deliver: spooled; the daemon delivers it ({e})"),
            }
        }
        // Outcomes and the journal's events, on disk before the process ends.
        if let Err(e) = spool.flush() {
            eprintln!("imip-milter deliver: {}", imip_milter::errors::chain(&e));
        }
        Ok(verdict)
    })
}

fn check(arg: &ConfigArg, postfix_config: Option<&std::path::Path>, organizer: Option<&str>) -> ExitCode {
    let path = arg.config.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            println!("FAIL config: {}", chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            println!("FAIL runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let findings = runtime.block_on(imip_milter::check::run(&config, &path, postfix_config, organizer));
    for f in &findings {
        println!("{f}");
    }
    if findings.iter().any(|f| f.level == imip_milter::check::Level::Fail) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn tokens(arg: &ConfigArg, action: TokensAction) -> ExitCode {
    let config = match load_config(arg, false) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("imip-milter: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let req = match &action {
        TokensAction::Add {
            organizer,
            attendee,
            uid,
        } => Request::TokensAdd {
            organizer: organizer.clone(),
            attendees: attendee.clone(),
            uid: uid.clone(),
        },
        TokensAction::List { .. } => Request::TokensList,
        TokensAction::Show { token } => Request::TokensShow { token: token.clone() },
        TokensAction::Revoke { token } => Request::TokensRevoke { token: token.clone() },
        TokensAction::Purge => Request::TokensPurge {
            days_to_live: config.tokens.days_to_live,
        },
        TokensAction::Import { file } => match std::fs::read_to_string(file) {
            Ok(csv) if csv.len() as u64 > control::MAX_IMPORT => {
                eprintln!(
                    "imip-milter: {}: larger than {} bytes",
                    file.display(),
                    control::MAX_IMPORT
                );
                return ExitCode::from(EX_NOINPUT);
            }
            Ok(csv) => Request::TokensImport { csv, bytes: 0 },
            Err(e) => {
                eprintln!("imip-milter: {}: {e}", file.display());
                return ExitCode::from(EX_NOINPUT);
            }
        },
    };
    // The token file is read as the caller; the store is opened as its owner.
    if let Err(e) = imip_milter::privileges::drop_to_owner(&config) {
        eprintln!("imip-milter: {e}");
        return ExitCode::from(EX_CONFIG);
    }
    if let Err(e) = imip_milter::prepare_state_dir(&config) {
        eprintln!("imip-milter: {e}");
        return ExitCode::FAILURE;
    }
    // A token file travels after the request line, not in it.
    let sent = match &req {
        Request::TokensImport { csv, .. } => {
            let head = Request::TokensImport {
                csv: String::new(),
                bytes: csv.len() as u64,
            };
            match control::request_with(&config.control_path(), &head, csv.as_bytes()) {
                Err(control::ClientError::NoDaemon) => None,
                Err(control::ClientError::Other(e)) => Some(Err(e)),
                Ok(r) => Some(Ok(r)),
            }
        }
        _ => None,
    };
    let answer = match sent {
        Some(a) => a,
        None => control::request_or_open(&config, &req),
    };
    let resp = match answered(answer) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let tokens = resp.tokens.unwrap_or_default();
    match action {
        TokensAction::Add { .. } => {
            for t in tokens {
                println!("{}", t.token);
            }
        }
        TokensAction::Show { .. } => {
            for t in tokens {
                println!("{}", pretty_with_times(&t));
            }
        }
        TokensAction::List {
            organizer,
            attendee,
            uid,
            json,
        } => {
            let same = |a: &str, b: &str| {
                imip_milter::itip::normalise_mailto(a).eq_ignore_ascii_case(&imip_milter::itip::normalise_mailto(b))
            };
            let tokens: Vec<_> = tokens
                .into_iter()
                .filter(|t| organizer.as_deref().is_none_or(|o| same(o, &t.organizer)))
                .filter(|t| {
                    attendee
                        .as_deref()
                        .is_none_or(|a| t.allowed().iter().any(|x| same(a, x)))
                })
                .filter(|t| uid.as_deref().is_none_or(|u| u == t.uid))
                .collect();
            if json {
                for t in &tokens {
                    println!("{}", serde_json::to_string(t).unwrap_or_default());
                }
                return ExitCode::SUCCESS;
            }
            println!(
                "{:<12} {:<36} {:<36} {:<10} UID",
                "TOKEN", "ORGANIZER", "ATTENDEE", "LAST-USED"
            );
            for t in &tokens {
                let used = chrono::DateTime::from_timestamp_millis(t.last_used_ms as i64)
                    .map(|d| d.format("%Y-%m-%d").to_string())
                    .unwrap_or_default();
                let attendee = match t.attendee.is_empty() {
                    true => t.attendees.join(","),
                    false => t.attendee.clone(),
                };
                let shown = imip_milter::address::printable;
                println!(
                    "{:<12} {:<36} {:<36} {:<10} {}",
                    imip_milter::address::token_prefix(&t.token),
                    shown(&t.organizer),
                    shown(&attendee),
                    used,
                    shown(&t.uid)
                );
            }
            println!("-- {} tokens", tokens.len());
        }
        TokensAction::Revoke { .. } => println!("revoked"),
        TokensAction::Purge => println!("{} expired token(s) removed", resp.count.unwrap_or(0)),
        TokensAction::Import { .. } => {
            for p in &resp.problems {
                eprintln!("imip-milter: {p}");
            }
            println!("{} token(s) imported", resp.count.unwrap_or(0));
            if !resp.problems.is_empty() {
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
