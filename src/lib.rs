//! imip-milter: a milter for Postfix that takes emailed iMIP calendar replies
//! in-line, spools them durably and hands them to a calendar server.
//!
//! `run` starts everything on a listener the caller opened, so tests start
//! the milter in-process.

pub mod address;
pub mod analysis;
pub mod bounces;
pub mod check;
pub mod clients;
pub mod clock;
pub mod config;
pub mod control;
pub mod decision;
pub mod deliver;
pub mod errors;
pub mod findings;
pub mod forward;
pub mod inspect;
pub mod intake;
pub mod itip;
pub mod journal;
pub mod message;
pub mod metrics;
pub mod milter;
pub mod notice;
pub mod outbound;
pub mod policy;
pub mod privileges;
pub mod schedule;
pub mod settings;
pub mod spool;
pub mod targets;
pub mod tokens;

use config::{Config, ListenSocket};
use indymilter::Listener;
use std::{future::Future, io, sync::Arc};
use tokio::sync::{mpsc, watch};
use tracing::{error, info};

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// A TCP listener whose connections send small milter replies at once
/// (TCP_NODELAY): without it, Nagle's algorithm and the MTA's delayed ACKs
/// can hold each reply back for tens of milliseconds.
pub struct NoDelayListener(pub tokio::net::TcpListener);

impl Listener for NoDelayListener {
    type Io = tokio::net::TcpStream;

    fn poll_accept(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<Self::Io>> {
        self.0.poll_accept(cx).map_ok(|(stream, _)| {
            let _ = stream.set_nodelay(true);
            stream
        })
    }
}

/// A listener that survives failing accepts (EMFILE when the descriptor
/// table is full): it logs once per burst, backs off, and tries again,
/// where indymilter alone would stop serving.
pub struct Resilient<L> {
    inner: L,
    pause: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    errors: u64,
    backoff: std::time::Duration,
    /// When the last error was logged: at most one line per ten seconds.
    logged: Option<std::time::Instant>,
}

const ACCEPT_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(50);
const ACCEPT_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(1);

impl<L> Resilient<L> {
    pub fn new(inner: L) -> Self {
        Self {
            inner,
            pause: None,
            errors: 0,
            backoff: ACCEPT_BACKOFF_MIN,
            logged: None,
        }
    }
}

impl<L: Listener> Listener for Resilient<L> {
    type Io = L::Io;

    fn poll_accept(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<Self::Io>> {
        use std::task::Poll;
        loop {
            if let Some(pause) = self.pause.as_mut() {
                if pause.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.pause = None;
            }
            match self.inner.poll_accept(cx) {
                Poll::Ready(Ok(io)) => {
                    if self.errors > 0 {
                        info!("accepting connections again after {} failed accepts", self.errors);
                        self.errors = 0;
                        self.backoff = ACCEPT_BACKOFF_MIN;
                    }
                    return Poll::Ready(Ok(io));
                }
                Poll::Ready(Err(e)) => {
                    if self
                        .logged
                        .is_none_or(|t| t.elapsed() > std::time::Duration::from_secs(10))
                    {
                        self.logged = Some(std::time::Instant::now());
                        error!("cannot accept milter connections: {e}; retrying (raise LimitNOFILE?)");
                    }
                    self.errors += 1;
                    self.pause = Some(Box::pin(tokio::time::sleep(self.backoff)));
                    self.backoff = (self.backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Opens the milter socket named by `listen`. A unix socket replaces a stale
/// file and is made group-writable for Postfix.
pub async fn bind(
    listen: &ListenSocket,
) -> io::Result<indymilter::EitherListener<NoDelayListener, tokio::net::UnixListener>> {
    use indymilter::EitherListener;
    match listen {
        ListenSocket::Inet(addr) => Ok(EitherListener::Tcp(NoDelayListener(
            tokio::net::TcpListener::bind(addr).await?,
        ))),
        ListenSocket::Unix(path) => {
            if std::os::unix::net::UnixStream::connect(path).is_err() {
                let _ = std::fs::remove_file(path);
            }
            let l = tokio::net::UnixListener::bind(path)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
            Ok(EitherListener::Unix(l))
        }
    }
}

/// Creates `state_dir` if missing, private to the daemon's user.
pub fn prepare_state_dir(config: &Config) -> Result<(), Error> {
    use std::os::unix::fs::DirBuilderExt;
    if !config.state_dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.state_dir)
            .map_err(|e| format!("state_dir: cannot create {}: {e}", config.state_dir.display()))?;
    }
    Ok(())
}

/// Runs the milter, the delivery worker and the control socket until
/// `shutdown` resolves; then finishes open sessions and deliveries in flight.
pub async fn run(config: Config, listener: impl Listener, shutdown: impl Future) -> Result<(), Error> {
    let (_keep, reloads) = mpsc::channel(1);
    run_with_reload(config, listener, shutdown, reloads).await
}

/// As `run`; each configuration received on `reloads` (SIGHUP) replaces the
/// settings that can change at run time.
pub async fn run_with_reload(
    config: Config,
    listener: impl Listener,
    shutdown: impl Future,
    reloads: mpsc::Receiver<Config>,
) -> Result<(), Error> {
    prepare_state_dir(&config)?;
    // `imip-milter deliver` may hold the spool for a moment while no daemon runs.
    let spool = spool::Spool::open_waiting(&config.spool_path(), std::time::Duration::from_secs(30))?;
    spool.set_journal_limit(config.delivery.journal.max_events);
    let target = Arc::new(targets::Target::new(&config.target)?);
    let control = control::bind(&config.control_path())
        .map_err(|e| format!("control socket {}: {e}", config.control_path().display()))?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let (delivering, delivering_rx) = watch::channel(forward::Delivering {
        target,
        cfg: config.delivery.clone(),
        notices: Arc::new(notice::Notices::from_config(&config)),
    });
    let forwarder = tokio::spawn(forward::run(spool.clone(), delivering_rx, stopped(stop_rx.clone())));
    let mut settings = settings::Settings::from_config(&config);
    if config.tokens.mode == config::TokenMode::Local {
        settings.tokens = Some(local_tokens(&config, &spool)?);
    }
    let mut shared = milter::Shared::new(settings, spool.clone());
    shared.clients = client_limits(&config);
    let shared = Arc::new(shared);
    let control_task = tokio::spawn(control::serve(control, shared.clone()));
    let metrics_task = match config.metrics_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("metrics.listen: cannot open {addr}: {e}"))?;
            info!("metrics on http://{addr}/metrics");
            Some(tokio::spawn(metrics::serve(l, spool.clone())))
        }
        None => None,
    };
    let reload_task = tokio::spawn(apply_reloads(config.clone(), shared.clone(), delivering, reloads));
    // A client past its limit is summed up in the journal once per window.
    let summaries = shared.clone();
    let summary_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            summaries.journal_summaries(false);
        }
    });
    let milter_config = indymilter::Config {
        max_connections: config.max_sessions,
        actions: milter::ACTIONS,
        ..Default::default()
    };
    let (pending, oldest) = spool.pending_stats().unwrap_or((0, None));
    info!(
        "imip-milter {} listening on {}, mode {}, spool {} ({pending} pending{})",
        env!("CARGO_PKG_VERSION"),
        config.listen,
        config.mode.as_str(),
        config.spool_path().display(),
        oldest
            .map(|o| format!(", oldest {}s", clock::now_ms().saturating_sub(o) / 1000))
            .unwrap_or_default()
    );

    if let (Some(_), config::ListenSocket::Inet(addr)) = (&config.outbound, &config.listen) {
        // Every local user can reach it and claim any SASL login (DESIGN §4c).
        tracing::warn!(
            "outbound tokenization with listen = inet:{addr}: local users can connect and mint tokens; \
             listen on a unix socket that only Postfix can reach"
        );
    }
    let result = indymilter::run(
        Resilient::new(listener),
        milter::callbacks(shared.clone()),
        milter_config,
        shutdown,
    )
    .await;
    info!("milter sessions finished; stopping deliveries");
    summary_task.abort();
    shared.journal_summaries(true);
    let _ = stop_tx.send(true);
    if let Err(e) = forwarder.await {
        error!("delivery worker ended abnormally: {e}");
    }
    if let Err(e) = spool.flush() {
        error!("spool flush at stop: {}", errors::chain(&e));
    }
    control_task.abort();
    reload_task.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    let _ = std::fs::remove_file(config.control_path());
    info!("stopped");
    result.map_err(|e| format!("milter socket: {e}").into())
}

/// The token store of local token mode, remembering unknown tokens for
/// `tokens.remember_unknown`.
pub fn local_tokens(config: &Config, spool: &spool::Spool) -> Result<milter::LocalTokens, Error> {
    let mut store = tokens::open(&config.tokens, spool)?;
    if !config.tokens.remember_unknown.is_zero() {
        store = Arc::new(tokens::RememberUnknown::new(store, config.tokens.remember_unknown));
    }
    Ok(milter::LocalTokens {
        store,
        days_to_live: config.tokens.days_to_live,
    })
}

/// The per-client limits, in either token mode.
pub fn client_limits(config: &Config) -> clients::Clients {
    clients::Clients::new(
        config.tokens.max_unknown,
        config.tokens.unknown_window,
        config.tokens.max_lookups_per_client,
    )
}

/// Applies reloaded configurations, as `postfix reload` does: every key
/// but those of `config::reload::RESTART_KEYS` takes effect for the next
/// message and delivery attempt. A token store or target that cannot be
/// opened keeps the running one, and says so.
async fn apply_reloads(
    mut running: Config,
    shared: Arc<milter::Shared>,
    delivering: watch::Sender<forward::Delivering>,
    mut reloads: mpsc::Receiver<Config>,
) {
    while let Some(new) = reloads.recv().await {
        let changes = config::reload::changes(&running, &new);
        let mut now = config::reload::in_force(&running, new);
        let current = shared.settings();
        let mut settings = settings::Settings::from_config(&now);
        settings.tokens = match now.tokens.mode {
            config::TokenMode::Remote => None,
            config::TokenMode::Local
                if running.tokens.mode == config::TokenMode::Local
                    && now.tokens.store == running.tokens.store
                    && now.tokens.remember_unknown == running.tokens.remember_unknown =>
            {
                current.tokens.clone().map(|t| milter::LocalTokens {
                    days_to_live: now.tokens.days_to_live,
                    ..t
                })
            }
            config::TokenMode::Local => match local_tokens(&now, &shared.spool) {
                Ok(t) => Some(t),
                Err(e) => {
                    error!("reload: cannot open the token store: {e}; the running one stays in force");
                    now.tokens = running.tokens.clone();
                    now.outbound = running.outbound.clone();
                    settings.outbound = running.outbound.clone();
                    current.tokens.clone()
                }
            },
        };
        let notices = Arc::new(notice::Notices::from_config(&now));
        if now.target != running.target || now.delivery != running.delivery {
            match targets::Target::new(&now.target) {
                Ok(t) => {
                    let _ = delivering.send(forward::Delivering {
                        target: Arc::new(t),
                        cfg: now.delivery.clone(),
                        notices,
                    });
                }
                Err(e) => {
                    error!("reload: [target]: {e}; the running target stays in force");
                    now.target = running.target.clone();
                    settings.replies_only = running.target.kind == config::TargetKind::CalDav;
                    let cfg = now.delivery.clone();
                    delivering.send_modify(|d| {
                        d.cfg = cfg;
                        d.notices = notices;
                    });
                }
            }
        } else {
            // The gateway addresses and local domains the notices check.
            delivering.send_modify(|d| d.notices = notices);
        }
        shared.clients.set_limits(
            now.tokens.max_unknown,
            now.tokens.unknown_window,
            now.tokens.max_lookups_per_client,
        );
        shared.spool.set_journal_limit(now.delivery.journal.max_events);
        shared.replace(settings);
        if changes.applied.is_empty() {
            info!("configuration reloaded: nothing changed that applies without a restart");
        } else {
            info!("configuration reloaded: {} changed", changes.applied.join(", "));
        }
        if !changes.restart.is_empty() {
            tracing::warn!(
                "reload: {} changed but can only change with a restart; the old value stays in force",
                changes.restart.join(", ")
            );
        }
        running = now;
    }
}
