//! The daemon: owns the public sockets and every service, applies reloads, shuts everything down.
//!
//! Start-up follows one order: bind every public socket and the admin API (a failure stops start-up with
//! the service and address named), then start each service's first worker, then serve. A reload either
//! applies whole or not at all: the new file is validated and every new address bound before anything
//! running is touched. This module never touches a worker or a connection itself: services do.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::signal::unix::Signal;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;

use crate::admin;
use crate::clock::Time;
use crate::config::{AdminConfig, Config, ConfigError};
use crate::control::{
    ActionError, Command, Control, Directory, Events, Phase, ReexecAccepted, ReexecProgress, ReexecView, ReloadReport,
    ReloadScope, ServiceOutcome, Trigger, UpgradeRecord,
};
use crate::endpoint::{self, Endpoint};
use crate::error::chain;
use crate::handover::{ConfigSource, ListenerState, ServiceSnapshot, SocketState, State};
use crate::listener::{Listener, connection_budget};
use crate::metrics::Metrics;
use crate::notify::{Notice, Notifier, ServiceLine};
use crate::pidfile::PidFile;
use crate::reexec::{self, CheckReport, ExecRequest, InFlight, ReexecRecord, ReexecResult, ReexecTrigger, own_fd};
use crate::service::{Context, FreezeError, Resumed, ServiceCommand, ServiceHandle, Waiter};
use crate::worker::{RuntimeDir, Spawner};

/// Why baton could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The service manager passed a socket nothing listens on.
    #[error("{0}")]
    Passed(String),
    /// `PR_SET_CHILD_SUBREAPER` failed.
    #[error("cannot become a child subreaper")]
    Subreaper(#[source] io::Error),
    /// The pid file names a running baton, or cannot be written.
    #[error(transparent)]
    PidFile(#[from] crate::pidfile::PidFileError),
    /// The private runtime directory could not be created.
    #[error("cannot create a runtime directory for worker sockets")]
    RuntimeDir(#[source] io::Error),
    /// A public address could not be bound.
    #[error("service `{service}`: listen {addr}")]
    Bind {
        /// The service that listens there.
        service: String,
        /// The address.
        addr: SocketAddr,
        /// What bind or listen returned.
        #[source]
        source: io::Error,
    },
    /// The admin address could not be bound.
    #[error("admin: listen {addr}")]
    AdminBind {
        /// The address.
        addr: Endpoint,
        /// What bind returned.
        #[source]
        source: io::Error,
    },
    /// The admin token file could not be read or is empty.
    #[error("admin: token_file {}", path.display())]
    Token {
        /// The file.
        path: std::path::PathBuf,
        /// What was wrong with it.
        #[source]
        source: io::Error,
    },
    /// A service's first worker did not become ready.
    #[error("{0}")]
    FirstWorker(String),
    /// What a previous image handed over could not be taken over.
    #[error("cannot take over from the previous image: {0}")]
    Resume(String),
}

/// Why a hand-over did not happen.
#[derive(Debug)]
enum HandOverError {
    /// A service began an upgrade meanwhile: the re-exec waits for it.
    Busy(String),
    /// It failed; everything runs on as before.
    Failed(String),
}

/// Why a reload was rejected; the running configuration is kept.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new file is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A new address could not be bound.
    #[error(transparent)]
    Bind(#[from] StartError),
}

/// Which socket of the pool a configured address maps to. A fixed address is shared by name, so it can move
/// between services; an ephemeral one (port 0) belongs to its service.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum ListenKey {
    Fixed(SocketAddr),
    Ephemeral(String, SocketAddr),
}

impl ListenKey {
    fn new(service: &str, addr: SocketAddr) -> ListenKey {
        if addr.port() == 0 {
            ListenKey::Ephemeral(service.to_owned(), addr)
        } else {
            ListenKey::Fixed(addr)
        }
    }
}

struct Supervisor {
    config: Config,
    context: Context,
    /// Every bound public socket, kept here for the daemon's life (or until a reload drops its address).
    pool: HashMap<ListenKey, Arc<Listener>>,
    services: BTreeMap<String, ServiceHandle>,
    /// Services removed by a reload, still draining.
    retiring: JoinSet<()>,
    directory: watch::Sender<Directory>,
    admin: AbortOnDropHandle<()>,
    /// The admin API's socket, as a handover names it.
    admin_socket: SocketState,
    control: Control,
    /// Re-execs of this process: what they carry on, and the one under way.
    reexec: Reexecs,
    /// The service manager, told what happens.
    notifier: Notifier,
}

/// How `baton run` was asked to run, besides its configuration.
#[derive(Debug, Default)]
pub struct Options {
    /// The sockets the service manager passed (socket activation), for a fresh start.
    pub passed: Vec<crate::activation::Passed>,
    /// Where to write the pid file.
    pub pid_file: Option<std::path::PathBuf>,
    /// Whether to be a child subreaper (`PR_SET_CHILD_SUBREAPER`) and reap orphans, as PID 1 does anyway.
    pub subreaper: bool,
}

/// The signals the daemon handles.
#[derive(Debug)]
pub struct Signals {
    /// SIGHUP: reload.
    pub hangup: Signal,
    /// SIGCHLD: a child exited (the reaper's cue, as PID 1 or a subreaper).
    pub child: Signal,
    /// SIGTERM: drain and exit.
    pub terminate: Signal,
    /// SIGINT: drain and exit.
    pub interrupt: Signal,
    /// SIGUSR2: re-exec.
    pub user2: Signal,
}

impl Signals {
    /// Registers the handlers. Until then, the signals are to be blocked (see `reexec::handled_signals`).
    pub fn register() -> io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            hangup: signal(SignalKind::hangup())?,
            child: signal(SignalKind::child())?,
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            user2: signal(SignalKind::user_defined2())?,
        })
    }

    /// Takes every signal received and not yet handled and sends it to the process again, so that, blocked
    /// now, it waits for the next image instead of being lost with this one (a SIGUSR2 of the hand-over's
    /// moment asks the new image for a re-exec of its own; one during the check joined this one).
    fn hold_received(&mut self) {
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        let pid = nix::unistd::getpid();
        for (stream, signal) in [
            (&mut self.hangup, nix::sys::signal::Signal::SIGHUP),
            (&mut self.terminate, nix::sys::signal::Signal::SIGTERM),
            (&mut self.interrupt, nix::sys::signal::Signal::SIGINT),
            (&mut self.user2, nix::sys::signal::Signal::SIGUSR2),
        ] {
            if let std::task::Poll::Ready(Some(())) = stream.poll_recv(&mut context) {
                while let std::task::Poll::Ready(Some(())) = stream.poll_recv(&mut context) {}
                let _ = nix::sys::signal::kill(pid, signal);
            }
        }
    }
}

/// Where a daemon starts from.
#[derive(Debug)]
pub enum Start {
    /// Nothing: bind, spawn, serve.
    Fresh,
    /// The state a previous image handed over by a re-exec.
    Resume {
        /// The state.
        state: Box<State>,
        /// Why the new binary could not start, when this is the previous binary run again.
        failure: Option<String>,
    },
}

/// Re-execs: the counts a new image carries on, and the one under way.
#[derive(Debug)]
struct Reexecs {
    /// The path baton was first started from.
    binary: Option<PathBuf>,
    /// How many times this process has re-executed.
    count: u64,
    /// How many re-execs were asked for.
    attempts: u64,
    /// The last one that ended.
    last: Option<ReexecRecord>,
    /// The one under way.
    job: Option<Job>,
    /// Its check, while it runs.
    check: Option<tokio::task::JoinHandle<Result<CheckReport, String>>>,
    /// What `/status` shows.
    view: watch::Sender<ReexecView>,
    /// The watch of the own binary at `binary`, with `[daemon] reexec_on_change`.
    watching: Option<AbortOnDropHandle<()>>,
    /// Where that watch sends a change.
    changes: (mpsc::UnboundedSender<PathBuf>, mpsc::UnboundedReceiver<PathBuf>),
    /// When the changed binary has settled and the re-exec it asks for is due.
    due: Option<tokio::time::Instant>,
}

/// A re-exec asked for and not ended.
#[derive(Debug)]
struct Job {
    attempt: u64,
    trigger: ReexecTrigger,
    binary: PathBuf,
    check_timeout: Duration,
    /// What it waits for before its check can start.
    waiting_for: Option<String>,
    /// The configuration text its check was given.
    checked_config: Option<String>,
    /// Told once the check has passed, or why the re-exec was refused.
    waiters: Vec<oneshot::Sender<Result<ReexecAccepted, String>>>,
    /// The admin connections of those told: the hand-over waits, a moment at most, until they are over.
    answered: Vec<watch::Receiver<()>>,
}

/// Who asked for a re-exec through the admin API: told once the check has passed, and the connection the
/// answer goes out on.
type ReexecReply = (
    oneshot::Sender<Result<ReexecAccepted, String>>,
    Option<watch::Receiver<()>>,
);

/// How long the hand-over waits for the answers to re-exec requests to go out.
const ANSWER_WAIT: Duration = Duration::from_secs(1);

/// How often a waiting re-exec looks again at what it waits for.
const REEXEC_RETRY: Duration = Duration::from_millis(50);

/// Runs the daemon until SIGTERM or SIGINT: binds (or, resuming, adopts what a previous image handed over),
/// starts every service, reloads on SIGHUP and on admin requests, re-executes on SIGUSR2 and on admin
/// requests, then drains and stops everything.
pub async fn run(
    config: Config,
    spawner: Spawner,
    mut signals: Signals,
    start: Start,
    options: Options,
) -> Result<(), StartError> {
    let Options {
        passed,
        pid_file,
        subreaper,
    } = options;
    // As PID 1, or a subreaper, the orphans of workers' children come to baton to be reaped.
    let reaping = crate::reaper::enable(subreaper).map_err(StartError::Subreaper)?;
    let metrics = Metrics::new();
    let events = Events::new();
    let (fd_limit, _) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    let budget = connection_budget(fd_limit);
    tracing::info!(fd_limit, connections = budget, "connection budget");
    let (mut state, failure) = match start {
        Start::Fresh => (None, None),
        Start::Resume { state, failure } => (Some(state), failure),
    };
    if let Some(state) = &state {
        state.check_descriptors().map_err(StartError::Resume)?;
        metrics.restore(&state.metrics);
    }
    let runtime_dir = match state.as_ref().and_then(|s| s.runtime_dir.clone()) {
        Some(path) => RuntimeDir::adopt(path),
        None => RuntimeDir::create(),
    };
    let runtime_dir = match (runtime_dir, &state) {
        (Ok(dir), _) => Arc::new(dir),
        (Err(e), Some(_)) => return Err(StartError::Resume(format!("the runtime directory: {e}"))),
        (Err(e), None) => return Err(StartError::RuntimeDir(e)),
    };
    let (pool, admin_listener) = match &state {
        Some(state) => adopt_sockets(&config, state)?,
        None => {
            let mut passed = crate::activation::Pool::new(passed);
            let pool = bind_all(&config, &adopt_passed(&config, &mut passed)?)?;
            let admin = open_admin(&config.admin.listen, passed.take(&config.admin.listen))?;
            passed.check_all_taken().map_err(StartError::Passed)?;
            (pool, admin)
        }
    };
    // Once the public sockets are bound; a re-exec keeps the file an earlier image wrote.
    let pid_file = match (&pid_file, &state) {
        (None, _) => None,
        (Some(path), Some(_)) => Some(PidFile::carried(path)),
        (Some(path), None) => Some(PidFile::write(path)?),
    };
    let token = match (load_token(&config.admin), &state) {
        (Ok(token), _) => token,
        (Err(e), Some(_)) => return Err(StartError::Resume(chain(&e))),
        (Err(e), None) => return Err(e),
    };
    let token = Arc::new(arc_swap::ArcSwapOption::new(token));
    let (commands_tx, mut commands) = mpsc::channel(16);
    let (directory, directory_rx) = watch::channel(Directory::default());
    let carried = state
        .as_ref()
        .map(|s| (s.reexecs, s.reexec_attempts, s.last_reexec.clone(), s.binary.clone()));
    let (count, attempts, last, binary) = carried.unwrap_or_default();
    let binary = binary.or_else(|| std::env::current_exe().ok());
    let (view, view_rx) = watch::channel(ReexecView::default());
    let control = Control {
        commands: commands_tx,
        directory: directory_rx,
        metrics: metrics.clone(),
        started: state.as_ref().and_then(|s| s.started).unwrap_or_else(Time::now),
        token,
        events: events.clone(),
        reexec: view_rx,
    };
    let admin_socket = socket_state(&admin_listener);
    let admin = serve_admin(admin_listener, control.clone());
    let mut supervisor = Supervisor {
        config,
        context: Context {
            spawner,
            runtime_dir,
            metrics,
            connections: Arc::new(tokio::sync::Semaphore::new(budget)),
            events,
        },
        pool,
        services: BTreeMap::new(),
        retiring: JoinSet::new(),
        directory,
        admin,
        admin_socket,
        control,
        reexec: Reexecs {
            binary,
            count,
            attempts,
            last,
            job: None,
            check: None,
            view,
            watching: None,
            changes: mpsc::unbounded_channel(),
            due: None,
        },
        notifier: Notifier::from_env(),
    };
    if let Some(state) = state.take() {
        let failed = failure.as_ref().map(|why| format!("re-exec failed: {why}"));
        supervisor.resume(*state, failure).await?;
        // The hand-over's RELOADING=1 came from the image before.
        supervisor.notify(Notice::Reloaded(failed));
    } else {
        // Kept by the service manager, if it keeps descriptors: after a crash or a restart, the next baton
        // gets the same sockets back, and connections wait in their queues meanwhile.
        supervisor.store_sockets(&HashMap::new(), &supervisor.pool);
        let names: Vec<String> = supervisor.config.services.keys().cloned().collect();
        let mut first = Vec::new();
        for name in names {
            first.push((name.clone(), supervisor.start_service(&name, None)));
        }
        supervisor.publish_directory();
        let first_workers = async {
            for (name, started) in first {
                started
                    .await
                    .unwrap_or_else(|_| Err(format!("service `{name}`: stopped while starting")))
                    .map_err(StartError::FirstWorker)?;
            }
            Ok(())
        };
        // A shutdown signal during start-up is obeyed at once, not after the first workers are ready.
        let started = tokio::select! {
            started = first_workers => started,
            _ = signals.terminate.recv() => Err(None),
            _ = signals.interrupt.recv() => Err(None),
        };
        match started {
            Ok(()) => {}
            Err(None) => {
                supervisor.notify(Notice::Stopping);
                supervisor.shut_down().await;
                pid_file.into_iter().for_each(PidFile::remove);
                return Ok(());
            }
            Err(Some(error)) => {
                supervisor.shut_down().await;
                pid_file.into_iter().for_each(PidFile::remove);
                return Err(error);
            }
        }
        tracing::info!(services = supervisor.services.len(), "baton ready");
        supervisor.notify(Notice::Ready);
    }
    supervisor.publish_reexec();
    // An orphan that exited before SIGCHLD was handled (during a re-exec, say) is reaped now.
    if reaping {
        crate::reaper::reap_orphans();
    }
    // Only this loop sends WATCHDOG=1: a daemon whose loop is stuck is not alive.
    let mut watchdog = supervisor.notifier.watchdog_interval().map(tokio::time::interval);
    let mut status = tokio::time::interval(STATUS_INTERVAL);
    supervisor.watch_binary();
    let name = loop {
        let waiting = supervisor.reexec.job.as_ref().is_some_and(|j| j.waiting_for.is_some());
        let due = supervisor.reexec.due;
        tokio::select! {
            _ = signals.terminate.recv() => break "SIGTERM",
            _ = signals.interrupt.recv() => break "SIGINT",
            Some(()) = signals.hangup.recv() => {
                tracing::info!("SIGHUP: reloading {}", supervisor.config.path.display());
                let _ = supervisor.reload(Trigger::Signal, ReloadScope::All).await;
            }
            _ = tick(&mut watchdog) => supervisor.notify(Notice::Watchdog),
            Some(()) = signals.child.recv(), if reaping => {
                for pid in crate::reaper::reap_orphans() {
                    tracing::debug!(pid, "reaped an orphan");
                }
            }
            _ = status.tick() => supervisor.notify(Notice::Status),
            Some(()) = signals.user2.recv() => {
                tracing::info!("SIGUSR2: re-executing");
                supervisor.request_reexec(ReexecTrigger::Signal, None, reexec::CHECK_TIMEOUT, None).await;
            }
            Some(command) = commands.recv() => match command {
                Command::Reload { scope, wait, reply } => {
                    match supervisor.reload(Trigger::Api, scope).await {
                        Ok(outcomes) => {
                            tokio::spawn(async move {
                                let _ = reply.send(Ok(gather(outcomes, wait).await));
                            });
                        }
                        Err(error) => {
                            let _ = reply.send(Err(chain(&error)));
                        }
                    }
                }
                Command::Upgrade { service, reply } => supervisor.upgrade(&service, reply),
                Command::Rollback { service, to, reply } => match supervisor.services.get(&service) {
                    Some(handle) => handle.send(ServiceCommand::Rollback(to, reply)),
                    None => {
                        let _ = reply.send(Err(ActionError::NotFound(service)));
                    }
                },
                Command::Promote { service, reply } => match supervisor.services.get(&service) {
                    Some(handle) => handle.send(ServiceCommand::Promote(reply)),
                    None => {
                        let _ = reply.send(Err(ActionError::NotFound(service)));
                    }
                },
                Command::Releases { service, reply } => match supervisor.services.get(&service) {
                    Some(handle) => {
                        let (told, releases) = oneshot::channel();
                        handle.send(ServiceCommand::Releases(told));
                        tokio::spawn(async move {
                            let _ = reply.send(releases.await.map_err(|_| ActionError::ShuttingDown));
                        });
                    }
                    None => {
                        let _ = reply.send(Err(ActionError::NotFound(service)));
                    }
                },
                Command::State { reply } => {
                    let state = supervisor.state().await;
                    let _ = reply.send(state.encode().map_err(|e| e.to_string()));
                }
                Command::Reexec { binary, check_timeout, reply, answered } => {
                    supervisor
                        .request_reexec(ReexecTrigger::Api, binary, check_timeout, Some((reply, answered)))
                        .await;
                }
            },
            checked = join_check(&mut supervisor.reexec.check) => {
                supervisor.reexec.check = None;
                supervisor.checked(checked, &mut signals).await;
            }
            () = tokio::time::sleep(REEXEC_RETRY), if waiting => supervisor.advance_reexec().await,
            Some(path) = supervisor.reexec.changes.1.recv() => {
                tracing::info!(binary = %path.display(), "baton's binary changed: re-executing once it settles");
                supervisor.reexec.due = Some(tokio::time::Instant::now() + crate::config::DEFAULT_WATCH_SETTLE);
            }
            () = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                supervisor.reexec.due = None;
                supervisor.request_reexec(ReexecTrigger::Watch, None, reexec::CHECK_TIMEOUT, None).await;
            }
            Some(_) = supervisor.retiring.join_next(), if !supervisor.retiring.is_empty() => {}
        }
    };
    tracing::info!("{name}: draining, then exiting (send it again to exit at once)");
    supervisor.notify(Notice::Stopping);
    // A check in flight is abandoned (its process group is killed), and whoever asked is told baton stops.
    if let Some(check) = supervisor.reexec.check.take() {
        check.abort();
    }
    supervisor.reexec.job = None;
    tokio::spawn(async move {
        tokio::select! {
            _ = signals.terminate.recv() => {},
            _ = signals.interrupt.recv() => {},
        }
        tracing::warn!("second signal: exiting now; workers are killed");
        std::process::exit(1);
    });
    supervisor.shut_down().await;
    pid_file.into_iter().for_each(PidFile::remove);
    Ok(())
}

/// How often the service manager's status line is refreshed (when it changed).
const STATUS_INTERVAL: Duration = Duration::from_secs(5);

/// The next tick of `interval`; pending when there is none.
async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// The outcome of the re-exec check in flight; pending while there is none.
async fn join_check(
    check: &mut Option<tokio::task::JoinHandle<Result<CheckReport, String>>>,
) -> Result<CheckReport, String> {
    match check {
        Some(handle) => handle
            .await
            .unwrap_or_else(|e| Err(format!("the check of the new binary failed: {e}"))),
        None => std::future::pending().await,
    }
}

/// The public sockets and the admin socket a previous image handed over, as the running configuration
/// names them.
fn adopt_sockets(
    config: &Config,
    state: &State,
) -> Result<(HashMap<ListenKey, Arc<Listener>>, endpoint::Listener), StartError> {
    let failed = |what: String, e: io::Error| StartError::Resume(format!("{what}: {e}"));
    let mut pool = HashMap::new();
    // A fixed address that an ephemeral entry bound is one socket under two keys.
    let mut adopted: HashMap<std::os::fd::RawFd, Arc<Listener>> = HashMap::new();
    for socket in &state.listeners {
        let key = match &socket.service {
            Some(service) => ListenKey::Ephemeral(service.clone(), socket.configured),
            None => ListenKey::Fixed(socket.configured),
        };
        let listener = match adopted.get(&socket.fd) {
            Some(listener) => Arc::clone(listener),
            None => {
                let listener = Listener::adopt(socket.configured, own_fd(socket.fd))
                    .map_err(|e| failed(format!("listen {} (descriptor {})", socket.local, socket.fd), e))?;
                let listener = Arc::new(listener);
                adopted.insert(socket.fd, Arc::clone(&listener));
                listener
            }
        };
        pool.insert(key, listener);
    }
    for (name, service) in &config.services {
        for addr in &service.listen {
            if !pool.contains_key(&ListenKey::new(name, *addr)) {
                return Err(StartError::Resume(format!(
                    "service `{name}`: listen {addr} was not handed over"
                )));
            }
        }
    }
    let admin = state
        .admin
        .as_ref()
        .ok_or_else(|| StartError::Resume("the admin socket was not handed over".into()))?;
    let listener = admin
        .endpoint
        .adopt(own_fd(admin.fd))
        .map_err(|e| failed(format!("admin {} (descriptor {})", admin.endpoint, admin.fd), e))?;
    Ok((pool, listener))
}

impl Supervisor {
    /// Takes over the services of a previous image's state: every service of the running configuration is
    /// adopted from its snapshot, its workers and connections with it; then the re-exec is recorded.
    /// The re-exec is recorded once every handed-over connection runs again: its pause ends there.
    async fn resume(&mut self, mut state: State, failure: Option<String>) -> Result<(), StartError> {
        let adopting = Time::now();
        let handed: usize = state.services.values().map(|s| s.parked.len()).sum();
        let active = state
            .services
            .values()
            .flat_map(|s| &s.parked)
            .filter(|p| p.record.is_active())
            .count();
        let watched = state
            .services
            .values()
            .flat_map(ServiceSnapshot::parked_watched)
            .filter(|(p, watched)| *watched && !p.record.is_active())
            .count();
        let resumed = Resumed::default();
        // Opened once every service is adopted: until then none runs.
        let (gate, opened) = watch::channel(false);
        let names: Vec<String> = self.config.services.keys().cloned().collect();
        for name in &names {
            let config = Arc::clone(&self.config.services[name]);
            let listeners = self.listeners_of(name);
            let Some(snapshot) = state.services.remove(name) else {
                tracing::warn!(service = %name, "not in the handed-over state: starting it afresh");
                let started = self.start_service(name, None);
                tokio::spawn(async move {
                    if let Ok(Err(error)) = started.await {
                        tracing::error!("{error}: retrying with a backoff");
                    }
                });
                continue;
            };
            let handle = ServiceHandle::adopt(
                config,
                listeners,
                self.context.clone(),
                snapshot,
                resumed.clone(),
                opened.clone(),
            )
            .map_err(|e| StartError::Resume(format!("service `{name}`: {e}")))?;
            self.services.insert(name.clone(), handle);
        }
        let opened_at = Time::now();
        tracing::debug!(
            took_ms = Time::now().since(adopting).as_secs_f64() * 1e3,
            "services adopted"
        );
        gate.send_replace(true);
        self.publish_directory();
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let mut resumption = reexec::Resumption {
            active_connections: active,
            watched_connections: watched,
            ..reexec::Resumption::default()
        };
        // The active connections run first; every connection is served (runs or is watched) by the end of the
        // pause; the watched ones run in the background after it.
        let wait = tokio::time::timeout(reexec::PARK_TIMEOUT, async {
            let _ = resumed.active.acquire_many(count(active)).await;
            resumption.active = (active > 0).then(Time::now);
            let _ = resumed.served.acquire_many(count(handed)).await;
            resumption.served = Some(Time::now());
            let _ = resumed.running.acquire_many(count(handed)).await;
            resumption.running = Some(Time::now());
        });
        if wait.await.is_err() {
            tracing::warn!(
                handed,
                since_ms = Time::now().since(opened_at).as_secs_f64() * 1e3,
                "not every handed-over connection runs again after {}",
                humantime::format_duration(reexec::PARK_TIMEOUT)
            );
        }
        let Some(in_flight) = state.reexec else {
            return Ok(());
        };
        let (result, error) = match failure {
            None => (ReexecResult::Ok, None),
            Some(why) => (ReexecResult::Failed, Some(why)),
        };
        let record = in_flight.record(result, error, &resumption);
        let pause = Duration::from_secs_f64(record.pause_ms.unwrap_or_default() / 1e3);
        self.context.metrics.reexec(result.label());
        match result {
            ReexecResult::Ok => {
                self.reexec.count += 1;
                self.context.metrics.reexec_pause(pause);
                tracing::info!(
                    pause_ms = record.pause_ms,
                    resumed_ms = record.resumed_ms,
                    watched = record.watched_connections,
                    listeners = record.listeners,
                    workers = record.workers,
                    connections = record.connections,
                    "re-executed: baton {} -> {}, pid {} (unchanged)",
                    record.from_version,
                    env!("CARGO_PKG_VERSION"),
                    std::process::id()
                );
            }
            _ => tracing::error!(
                binary = %record.binary.display(),
                "re-exec failed, the previous binary carries on: {}",
                record.error.as_deref().unwrap_or_default()
            ),
        }
        self.finish_reexec(record);
        self.context.spawner.adopted();
        Ok(())
    }

    /// Watches baton's own binary, at the path it was started from, when `[daemon] reexec_on_change` asks
    /// for it; stops watching when it no longer does.
    fn watch_binary(&mut self) {
        let wanted = self.config.daemon.reexec_on_change;
        match (&self.reexec.binary, wanted, self.reexec.watching.is_some()) {
            (Some(binary), true, false) => {
                let task = tokio::spawn(crate::release::watch(
                    vec![binary.clone()],
                    self.reexec.changes.0.clone(),
                ));
                self.reexec.watching = Some(AbortOnDropHandle::new(task));
            }
            (None, true, _) => tracing::warn!("reexec_on_change: the path baton was started from is unknown"),
            (_, false, true) => {
                self.reexec.watching = None;
                self.reexec.due = None;
            }
            _ => {}
        }
    }

    /// Asks for a re-exec with `binary` (or the one at the path baton was started from); joins the one under
    /// way, if there is one.
    async fn request_reexec(
        &mut self,
        trigger: ReexecTrigger,
        binary: Option<PathBuf>,
        check_timeout: Duration,
        reply: Option<ReexecReply>,
    ) {
        let (reply, answered) = reply.unzip();
        let answered = answered.flatten();
        if let Some(job) = &mut self.reexec.job {
            tracing::info!(attempt = job.attempt, "a re-exec is under way already: joining it");
            job.waiters.extend(reply);
            job.answered.extend(answered);
            return;
        }
        let Some(binary) = binary.or_else(|| self.reexec.binary.clone()) else {
            tracing::error!("cannot re-exec: the path baton was started from is unknown: name a binary");
            if let Some(reply) = reply {
                let _ = reply.send(Err("the path baton was started from is unknown: name a binary".into()));
            }
            return;
        };
        self.reexec.attempts += 1;
        self.reexec.job = Some(Job {
            attempt: self.reexec.attempts,
            trigger,
            binary,
            check_timeout,
            waiting_for: None,
            checked_config: None,
            waiters: reply.into_iter().collect(),
            answered: answered.into_iter().collect(),
        });
        self.advance_reexec().await;
    }

    /// Starts the check of the re-exec under way, unless something it must wait for is still going on.
    async fn advance_reexec(&mut self) {
        let blocker = self.reexec_blocker();
        let Some(job) = &mut self.reexec.job else {
            return;
        };
        if job.waiting_for.is_none() && blocker.is_some() {
            tracing::info!(
                attempt = job.attempt,
                "re-exec waits: {}",
                blocker.as_deref().unwrap_or_default()
            );
        }
        job.waiting_for = blocker;
        if job.waiting_for.is_none() {
            job.checked_config = Some(self.config.text.clone());
            let (binary, timeout) = (job.binary.clone(), job.check_timeout);
            tracing::info!(binary = %binary.display(), "checking the new binary");
            let state = self.state().await.encode();
            self.reexec.check = Some(tokio::spawn(async move {
                let state = state.map_err(|e| format!("cannot write the state: {e}"))?;
                reexec::check(&binary, &state, timeout).await
            }));
        }
        self.publish_reexec();
    }

    /// What a re-exec must wait for now: an upgrade in flight (until its watchdog window closes), a removed
    /// service still draining.
    fn reexec_blocker(&self) -> Option<String> {
        for (name, handle) in &self.services {
            let state = handle.state.borrow();
            let phase = state.phase;
            if state.restart_at.is_some() || (state.active.is_none() && phase == Phase::Idle) {
                // Its connections wait for the replacement, and could not park before it is up.
                return Some(format!("service `{name}`: its worker is being replaced"));
            }
            if matches!(phase, Phase::Spawning | Phase::WaitingReady | Phase::Watching) {
                return Some(format!(
                    "service `{name}`: an upgrade is in flight ({})",
                    serde_json::to_value(phase)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default()
                ));
            }
        }
        (!self.retiring.is_empty()).then(|| "a service removed by a reload is still draining".to_owned())
    }

    /// The check of the new binary has answered: refuse, or hand over.
    async fn checked(&mut self, checked: Result<CheckReport, String>, signals: &mut Signals) {
        let Some(mut job) = self.reexec.job.take() else {
            return;
        };
        let report = match checked {
            Ok(report) => report,
            Err(error) => {
                tracing::error!(binary = %job.binary.display(), "re-exec refused, nothing changed: {error}");
                for waiter in job.waiters.drain(..) {
                    let _ = waiter.send(Err(error.clone()));
                }
                self.context.metrics.reexec(ReexecResult::Refused.label());
                let record = self.record(&job, ReexecResult::Refused, None, Some(error));
                self.finish_reexec(record);
                return;
            }
        };
        tracing::info!(binary = %job.binary.display(), version = %report.version, "the new binary can take over");
        let accepted = ReexecAccepted {
            attempt: job.attempt,
            binary: job.binary.clone(),
            version: report.version.clone(),
            from_version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
        };
        for waiter in job.waiters.drain(..) {
            let _ = waiter.send(Ok(accepted.clone()));
        }
        // The answers are on their way; they must be out before this image is gone.
        let deadline = tokio::time::Instant::now() + ANSWER_WAIT;
        for mut connection in job.answered.drain(..) {
            let _ = tokio::time::timeout_at(deadline, connection.changed()).await;
        }
        self.reexec.view.send_modify(|view| {
            if let Some(progress) = &mut view.reexec {
                progress.stage = "handing_over";
            }
        });
        let outcome = self.hand_over(&job, &report, signals).await;
        if self.notifier.is_reloading() {
            let error = match &outcome {
                HandOverError::Busy(_) => None,
                HandOverError::Failed(error) => Some(format!("re-exec failed, nothing changed: {error}")),
            };
            self.notify(Notice::Reloaded(error));
        }
        match outcome {
            // Another upgrade began between the check and the hand-over: wait for it, and check again.
            HandOverError::Busy(reason) => {
                tracing::info!(attempt = job.attempt, "re-exec waits: {reason}");
                job.waiting_for = Some(reason);
                self.reexec.job = Some(job);
                self.publish_reexec();
            }
            HandOverError::Failed(error) => {
                tracing::error!(binary = %job.binary.display(), "re-exec failed, nothing changed: {error}");
                self.context.metrics.reexec(ReexecResult::Failed.label());
                let record = self.record(&job, ReexecResult::Failed, Some(report.version), Some(error));
                self.finish_reexec(record);
            }
        }
    }

    /// Parks every connection, writes the state and replaces the process's image. Returns only if that did
    /// not happen, with everything running again as it was.
    async fn hand_over(&mut self, job: &Job, report: &CheckReport, signals: &mut Signals) -> HandOverError {
        // What the check saw must still hold: no upgrade began, no reload changed the configuration.
        if let Some(reason) = self.reexec_blocker() {
            return HandOverError::Busy(reason);
        }
        if job.checked_config.as_deref() != Some(self.config.text.as_str()) {
            return HandOverError::Busy("the configuration was reloaded during the check: checking again".into());
        }
        self.notify(Notice::Reloading);
        // While they still relay, the connections add their sockets to their service's watch: the new image
        // serves the idle ones from it as their bytes come, rather than registering all before any.
        self.watch_connections().await;
        let thaw = |supervisor: &Supervisor| {
            for handle in supervisor.services.values() {
                handle.thaw();
            }
        };
        // From here, a signal waits for whichever image comes next.
        if self.context.spawner.block_signals().await.is_err() {
            thaw(self);
            return HandOverError::Failed("baton is shutting down".into());
        }
        // A signal caught before the block is in the runtime's signal pipe: one turn of its driver (which a
        // timer's expiry implies) brings it to the streams. The turn comes while the services freeze.
        let driver_turn = tokio::time::sleep(Duration::from_millis(1));
        let paused_at = Time::now();
        let mut freezing = Vec::new();
        for (name, handle) in &self.services {
            let (reply, snapshot) = oneshot::channel();
            handle.send(ServiceCommand::Freeze(reply));
            freezing.push((name.clone(), snapshot));
        }
        let mut snapshots = BTreeMap::new();
        let mut refused = None;
        for (name, snapshot) in freezing {
            match snapshot.await {
                Ok(Ok(snapshot)) => {
                    snapshots.insert(name, snapshot);
                }
                Ok(Err(FreezeError::Busy(reason))) => {
                    refused.get_or_insert(HandOverError::Busy(format!("service `{name}`: {reason}")));
                }
                Ok(Err(FreezeError::Stuck(reason))) => {
                    refused.get_or_insert(HandOverError::Failed(format!("service `{name}`: {reason}")));
                }
                Err(_) => {
                    refused.get_or_insert(HandOverError::Failed(format!("service `{name}` has stopped")));
                }
            }
        }
        let parked_in = Time::now().since(paused_at);
        // A thaw also ends the watch of a service that did not freeze.
        if let Some(refused) = refused {
            self.context.spawner.unblock_signals();
            thaw(self);
            return refused;
        }
        self.context.events.emit(
            "",
            "reexec_started",
            json!({"attempt": job.attempt, "binary": job.binary, "from_version": env!("CARGO_PKG_VERSION"),
                   "to_version": report.version}),
        );
        driver_turn.await;
        signals.hold_received();
        let mut state = self.state_of(snapshots);
        let connections = state.services.values().map(|s| s.parked.len()).sum();
        state.reexec = Some(InFlight {
            attempt: job.attempt,
            trigger: job.trigger,
            binary: job.binary.clone(),
            from_version: env!("CARGO_PKG_VERSION").to_owned(),
            to_version: report.version.clone(),
            paused_at,
            listeners: state.listeners.len() + usize::from(state.admin.is_some()),
            workers: state.services.values().map(|s| s.workers.len()).sum(),
            connections,
        });
        let written_at = Time::now();
        let error = match state
            .encode()
            .map_err(io::Error::from)
            .and_then(|bytes| Ok((reexec::carrier(&bytes)?, bytes.len())))
        {
            Ok((carrier, bytes)) => {
                tracing::info!(
                    binary = %job.binary.display(), connections, state_bytes = bytes,
                    parked_ms = parked_in.as_secs_f64() * 1e3,
                    written_ms = Time::now().since(written_at).as_secs_f64() * 1e3,
                    "handing over: the process becomes baton {}", report.version
                );
                let request = ExecRequest {
                    binary: job.binary.clone(),
                    state: carrier,
                    inherit: state.flagged_descriptors(),
                };
                self.context.spawner.exec(request).await
            }
            Err(e) => e,
        };
        self.context.spawner.unblock_signals();
        thaw(self);
        HandOverError::Failed(format!("cannot run {}: {error}", job.binary.display()))
    }

    /// Asks every service's connections to join a watch, and waits until those open have, for at most
    /// [`reexec::WATCH_TIMEOUT`]: any that has not by then is resumed with the active ones.
    async fn watch_connections(&self) {
        let mut watching = Vec::new();
        for handle in self.services.values() {
            let (reply, watch) = oneshot::channel();
            handle.send(ServiceCommand::Watch(reply));
            watching.push(watch);
        }
        let deadline = tokio::time::Instant::now() + reexec::WATCH_TIMEOUT;
        for watch in watching {
            let Ok(Some((watch, open))) = watch.await else { continue };
            while watch.joined() < open && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    /// The record of `job`, ended now with `result`.
    fn record(
        &self,
        job: &Job,
        result: ReexecResult,
        to_version: Option<String>,
        error: Option<String>,
    ) -> ReexecRecord {
        ReexecRecord {
            attempt: job.attempt,
            result,
            trigger: job.trigger,
            binary: job.binary.clone(),
            from_version: env!("CARGO_PKG_VERSION").to_owned(),
            to_version,
            pause_ms: None,
            resumed_ms: None,
            active_pause_ms: None,
            watched_connections: 0,
            active_connections: 0,
            listeners: 0,
            workers: 0,
            connections: 0,
            error,
            at: crate::control::unix_now(),
        }
    }

    /// Keeps `record` as the last re-exec, and says so on the event bus and in `/status`.
    fn finish_reexec(&mut self, record: ReexecRecord) {
        if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(&record) {
            self.context
                .events
                .emit("", "reexec_finished", serde_json::Value::Object(fields));
        }
        self.reexec.last = Some(record);
        self.publish_reexec();
    }

    fn publish_reexec(&self) {
        let progress = self.reexec.job.as_ref().map(|job| ReexecProgress {
            attempt: job.attempt,
            binary: job.binary.clone(),
            stage: if job.waiting_for.is_some() {
                "waiting"
            } else {
                "checking"
            },
            waiting_for: job.waiting_for.clone(),
        });
        self.reexec.view.send_replace(ReexecView {
            reexecs: self.reexec.count,
            last_reexec: self.reexec.last.clone(),
            reexec: progress,
        });
    }

    /// Starts service `name` of the current configuration on the sockets of the pool.
    fn start_service(&mut self, name: &str, waiter: Option<Waiter>) -> oneshot::Receiver<Result<(), String>> {
        let config = Arc::clone(&self.config.services[name]);
        let listeners = self.listeners_of(name);
        let (started, outcome) = oneshot::channel();
        let handle = ServiceHandle::start(config, listeners, self.context.clone(), started, waiter);
        self.services.insert(name.to_owned(), handle);
        outcome
    }

    fn listeners_of(&self, name: &str) -> Vec<Arc<Listener>> {
        self.config.services[name]
            .listen
            .iter()
            .map(|addr| Arc::clone(&self.pool[&ListenKey::new(name, *addr)]))
            .collect()
    }

    /// Reads the configuration file again and applies it whole, or rejects it whole.
    async fn reload(&mut self, trigger: Trigger, scope: ReloadScope) -> Result<Vec<(String, Pending)>, ReloadError> {
        self.notify(Notice::Reloading);
        let result = self.try_reload(trigger, scope).await;
        match &result {
            Ok(_) => {
                self.watch_binary();
                tracing::info!(services = self.services.len(), "reload applied");
                self.context.events.emit("", "reload", json!({"result": "applied"}));
                self.notify(Notice::Reloaded(None));
            }
            Err(e) => {
                let error = chain(e);
                tracing::error!("reload rejected, running configuration kept: {error}");
                self.notify(Notice::Reloaded(Some(format!("reload rejected: {error}"))));
                self.context
                    .events
                    .emit("", "reload", json!({"result": "rejected", "error": error}));
            }
        }
        self.context.metrics.reload(result.is_ok());
        result
    }

    async fn try_reload(
        &mut self,
        trigger: Trigger,
        scope: ReloadScope,
    ) -> Result<Vec<(String, Pending)>, ReloadError> {
        let new = Config::load(&self.config.path)?;
        // Everything that can fail happens before anything running changes.
        let pool = bind_all(&new, &self.pool)?;
        let admin_listener = match new.admin.listen != self.config.admin.listen {
            true => Some(bind_admin(&new.admin.listen)?),
            false => None,
        };
        let token = load_token(&new.admin)?;
        let old = std::mem::replace(&mut self.config, new);
        self.store_sockets(&self.pool, &pool);
        self.pool = pool;
        self.control.token.store(token);
        if let Some(listener) = admin_listener {
            self.admin_socket = socket_state(&listener);
            self.admin = serve_admin(listener, self.control.clone());
        }
        let mut outcomes = Vec::new();
        for name in old.services.keys().filter(|n| !self.config.services.contains_key(*n)) {
            let handle = self.services.remove(name).expect("a configured service runs");
            tracing::info!(service = %name, "service removed: draining");
            self.retiring.spawn(handle.shutdown());
            outcomes.push((name.clone(), Pending::Done(ServiceOutcome::Removed)));
        }
        let names: Vec<String> = self.config.services.keys().cloned().collect();
        for name in names {
            let (waiter, outcome) = oneshot::channel();
            match self.services.get(&name) {
                Some(handle) => {
                    handle.send(ServiceCommand::Reconfigure {
                        config: Arc::clone(&self.config.services[&name]),
                        listeners: self.listeners_of(&name),
                    });
                    let changed = old.services[&name].worker_differs(&self.config.services[&name]);
                    if scope == ReloadScope::All || changed {
                        handle.send(ServiceCommand::Upgrade(trigger, Some(waiter)));
                        outcomes.push((name, Pending::Waiting(outcome)));
                    } else {
                        outcomes.push((name, Pending::Done(ServiceOutcome::Unchanged)));
                    }
                }
                None => {
                    tracing::info!(service = %name, "service added");
                    let started = self.start_service(&name, Some(waiter));
                    tokio::spawn(async move {
                        if let Ok(Err(error)) = started.await {
                            tracing::error!("{error}: retrying with a backoff");
                        }
                    });
                    outcomes.push((name, Pending::Waiting(outcome)));
                }
            }
        }
        self.publish_directory();
        Ok(outcomes)
    }

    /// Upgrades service `name` at an API request; `reply` gets the outcome.
    fn upgrade(&self, name: &str, reply: oneshot::Sender<Result<UpgradeRecord, ActionError>>) {
        let Some(handle) = self.services.get(name) else {
            let _ = reply.send(Err(ActionError::NotFound(name.to_owned())));
            return;
        };
        let (waiter, outcome) = oneshot::channel();
        handle.send(ServiceCommand::Upgrade(Trigger::Api, Some(waiter)));
        tokio::spawn(async move {
            let _ = reply.send(outcome.await.map_err(|_| ActionError::ShuttingDown));
        });
    }

    /// The daemon's whole state as it stands, as a handover would carry it.
    async fn state(&self) -> State {
        let mut services = BTreeMap::new();
        for (name, handle) in &self.services {
            if let Some(snapshot) = handle.snapshot().await {
                services.insert(name.clone(), snapshot);
            }
        }
        self.state_of(services)
    }

    /// The daemon's state with these snapshots of its services.
    fn state_of(&self, services: BTreeMap<String, ServiceSnapshot>) -> State {
        let mut listeners: Vec<ListenerState> = self
            .pool
            .iter()
            .map(|(key, listener)| ListenerState {
                service: match key {
                    ListenKey::Fixed(_) => None,
                    ListenKey::Ephemeral(service, _) => Some(service.clone()),
                },
                configured: listener.configured,
                local: listener.local,
                fd: listener.raw_fd(),
            })
            .collect();
        listeners.sort_by_key(|l| (l.local, l.service.clone()));
        State {
            started: Some(self.control.started),
            config: Some(ConfigSource {
                path: self.config.path.clone(),
                text: self.config.text.clone(),
            }),
            listeners,
            admin: Some(self.admin_socket.clone()),
            runtime_dir: Some(self.context.runtime_dir.path().to_owned()),
            fd_limit: self.context.spawner.worker_fd_limit().map(|l| (l.soft, l.hard)),
            services,
            metrics: self.context.metrics.snapshot(),
            binary: self.reexec.binary.clone(),
            reexecs: self.reexec.count,
            reexec_attempts: self.reexec.attempts,
            last_reexec: self.reexec.last.clone(),
            ..State::fresh()
        }
    }

    fn publish_directory(&self) {
        let directory = self
            .services
            .iter()
            .map(|(name, handle)| (name.clone(), handle.state.clone()))
            .collect();
        self.directory.send_replace(Arc::new(directory));
    }

    /// Stores with the service manager the public sockets of `after` that `before` lacks (all of them at
    /// start), and removes those `before` has and `after` lacks (a reload).
    fn store_sockets(&self, before: &HashMap<ListenKey, Arc<Listener>>, after: &HashMap<ListenKey, Arc<Listener>>) {
        if !self.notifier.stores_fds() {
            return;
        }
        let locals = |pool: &HashMap<ListenKey, Arc<Listener>>| -> BTreeMap<SocketAddr, Arc<Listener>> {
            pool.values().map(|l| (l.local, Arc::clone(l))).collect()
        };
        let (before, after) = (locals(before), locals(after));
        for (addr, listener) in &after {
            if !before.contains_key(addr) {
                use std::os::fd::AsFd as _;
                self.notifier
                    .store(&crate::notify::fd_name(addr), listener.socket().as_fd());
            }
        }
        for addr in before.keys().filter(|addr| !after.contains_key(*addr)) {
            self.notifier.unstore(&crate::notify::fd_name(addr));
        }
    }

    /// Tells the service manager `notice`, with the services as they stand.
    fn notify(&mut self, notice: Notice) {
        if !self.notifier.is_enabled() {
            return;
        }
        let services: Vec<ServiceLine> = self
            .services
            .iter()
            .map(|(name, handle)| {
                let state = handle.state.borrow();
                let generation = state.active.as_ref().map(|active| active.generation);
                let connections = state
                    .active
                    .iter()
                    .chain(&state.previous)
                    .chain(&state.draining)
                    .map(|upstream| upstream.connections())
                    .sum();
                ServiceLine {
                    name: name.clone(),
                    generation,
                    connections,
                }
            })
            .collect();
        self.notifier.notify(notice, &services);
    }

    /// Stops accepting everywhere, then drains and stops every service at once.
    async fn shut_down(mut self) {
        tracing::info!("shutting down");
        let mut stopping = JoinSet::new();
        for (_, handle) in std::mem::take(&mut self.services) {
            stopping.spawn(handle.shutdown());
        }
        // The services drop their accept loops; dropping the pool closes the sockets.
        self.pool.clear();
        while stopping.join_next().await.is_some() {}
        while self.retiring.join_next().await.is_some() {}
        tracing::info!("all workers stopped");
    }
}

/// Binds every address of `config`, reusing the sockets of `current` for addresses it has already.
fn bind_all(
    config: &Config,
    current: &HashMap<ListenKey, Arc<Listener>>,
) -> Result<HashMap<ListenKey, Arc<Listener>>, StartError> {
    let mut pool = HashMap::new();
    for (name, service) in &config.services {
        for addr in &service.listen {
            let key = ListenKey::new(name, *addr);
            // A fixed address may be one that an ephemeral entry bound: the socket is the same.
            let bound = current.get(&key).or_else(|| {
                (addr.port() != 0)
                    .then(|| current.values().find(|l| l.local == *addr))
                    .flatten()
            });
            let listener = match bound {
                Some(listener) => Arc::clone(listener),
                None => {
                    let listener = Listener::bind(*addr, service.backlog).map_err(|source| StartError::Bind {
                        service: name.clone(),
                        addr: *addr,
                        source,
                    })?;
                    tracing::info!(service = %name, listen = %listener.local, "bound");
                    Arc::new(listener)
                }
            };
            pool.insert(key, listener);
        }
    }
    Ok(pool)
}

/// The public sockets the service manager passed for configured addresses, by the key `bind_all` looks
/// them up by.
fn adopt_passed(
    config: &Config,
    passed: &mut crate::activation::Pool,
) -> Result<HashMap<ListenKey, Arc<Listener>>, StartError> {
    let mut pool = HashMap::new();
    for (name, service) in &config.services {
        for addr in service.listen.iter().filter(|addr| addr.port() != 0) {
            let Some(socket) = passed.take_tcp(*addr) else {
                continue;
            };
            let failed = |source| StartError::Bind {
                service: name.clone(),
                addr: *addr,
                source,
            };
            // Accepted sockets inherit it, as from a socket baton binds.
            socket2::SockRef::from(&socket.fd).set_nodelay(true).map_err(failed)?;
            let listener = Listener::adopt(*addr, socket.fd).map_err(failed)?;
            tracing::info!(service = %name, listen = %listener.local, name = %socket.name, "adopted a socket the service manager passed");
            pool.insert(ListenKey::Fixed(*addr), Arc::new(listener));
        }
    }
    Ok(pool)
}

fn bind_admin(addr: &Endpoint) -> Result<endpoint::Listener, StartError> {
    open_admin(addr, None)
}

/// The admin API's socket at `addr`: `passed` if the service manager passed it, else bound now.
fn open_admin(addr: &Endpoint, passed: Option<crate::activation::Passed>) -> Result<endpoint::Listener, StartError> {
    let opened = match passed {
        Some(socket) => addr.adopt(socket.fd),
        None => addr.bind(),
    };
    let listener = opened.map_err(|source| StartError::AdminBind {
        addr: addr.clone(),
        source,
    })?;
    tracing::info!(addr = %listener.local(), "admin API listening");
    Ok(listener)
}

/// Reads the admin token, if the configuration names a file for it.
pub(crate) fn load_token(admin: &AdminConfig) -> Result<Option<Arc<String>>, StartError> {
    let Some(path) = &admin.token_file else {
        return Ok(None);
    };
    let failed = |source| StartError::Token {
        path: path.clone(),
        source,
    };
    let token = std::fs::read_to_string(path).map_err(failed)?.trim().to_owned();
    if token.is_empty() {
        return Err(failed(io::Error::new(io::ErrorKind::InvalidData, "the file is empty")));
    }
    Ok(Some(Arc::new(token)))
}

/// The admin socket as a handover names it.
fn socket_state(listener: &endpoint::Listener) -> SocketState {
    SocketState {
        endpoint: listener.local().clone(),
        fd: listener.raw_fd(),
    }
}

fn serve_admin(listener: endpoint::Listener, control: Control) -> AbortOnDropHandle<()> {
    AbortOnDropHandle::new(tokio::spawn(admin::serve(listener, control)))
}

/// A service's part of a reload: known at once, or when its upgrade ends.
#[derive(Debug)]
enum Pending {
    Done(ServiceOutcome),
    Waiting(oneshot::Receiver<UpgradeRecord>),
}

/// The report of a reload: with `wait`, each upgrade's outcome once it is known.
async fn gather(outcomes: Vec<(String, Pending)>, wait: bool) -> ReloadReport {
    let mut report = ReloadReport::new();
    for (name, pending) in outcomes {
        let outcome = match pending {
            Pending::Done(outcome) => outcome,
            Pending::Waiting(_) if !wait => ServiceOutcome::Started,
            Pending::Waiting(record) => match record.await {
                Ok(record) => ServiceOutcome::Upgraded(Box::new(record)),
                Err(_) => ServiceOutcome::Abandoned,
            },
        };
        report.insert(name, outcome);
    }
    report
}
