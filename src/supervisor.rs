//! The daemon: owns the public sockets and every service, applies reloads, shuts everything down.
//!
//! Start-up follows one order: bind every public socket and the admin API (a failure stops start-up with
//! the service and address named), then start each service's first worker, then serve. A reload either
//! applies whole or not at all: the new file is validated and every new address bound before anything
//! running is touched. This module never touches a worker or a connection itself: services do.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use serde_json::json;
use tokio::signal::unix::Signal;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;

use crate::admin;
use crate::clock::Time;
use crate::config::{AdminConfig, Config, ConfigError};
use crate::control::{
    ActionError, Command, Control, Directory, Events, ReloadReport, ReloadScope, ServiceOutcome, Trigger, UpgradeRecord,
};
use crate::endpoint::{self, Endpoint};
use crate::error::chain;
use crate::handover::{ConfigSource, ListenerState, SocketState, State};
use crate::listener::{Listener, connection_budget};
use crate::metrics::Metrics;
use crate::service::{Context, ServiceCommand, ServiceHandle, Waiter};
use crate::worker::{RuntimeDir, Spawner};

/// Why baton could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
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
}

/// Runs the daemon until `shutdown` resolves: binds, starts every service, reloads on `reload` (SIGHUP) and on
/// admin requests, then drains and stops everything.
pub async fn run(
    config: Config,
    spawner: Spawner,
    mut reload: Signal,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let metrics = Metrics::new();
    let events = Events::new();
    let (fd_limit, _) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    let budget = connection_budget(fd_limit);
    tracing::info!(fd_limit, connections = budget, "connection budget");
    let runtime_dir = Arc::new(RuntimeDir::create().map_err(StartError::RuntimeDir)?);
    let pool = bind_all(&config, &HashMap::new())?;
    let admin_listener = bind_admin(&config.admin.listen)?;
    let token = Arc::new(arc_swap::ArcSwapOption::new(load_token(&config.admin)?));
    let (commands_tx, mut commands) = mpsc::channel(16);
    let (directory, directory_rx) = watch::channel(Directory::default());
    let control = Control {
        commands: commands_tx,
        directory: directory_rx,
        metrics: metrics.clone(),
        started: Time::now(),
        token,
        events: events.clone(),
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
    };
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
    tokio::pin!(shutdown);
    // A shutdown signal during start-up is obeyed at once, not after the first workers are ready.
    let started = tokio::select! {
        started = first_workers => started,
        () = &mut shutdown => {
            supervisor.shut_down().await;
            return Ok(());
        }
    };
    if let Err(error) = started {
        supervisor.shut_down().await;
        return Err(error);
    }
    tracing::info!(services = supervisor.services.len(), "baton ready");
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(()) = reload.recv() => {
                tracing::info!("SIGHUP: reloading {}", supervisor.config.path.display());
                let _ = supervisor.reload(Trigger::Signal, ReloadScope::All).await;
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
                Command::Rollback { service, reply } => match supervisor.services.get(&service) {
                    Some(handle) => handle.send(ServiceCommand::Rollback(reply)),
                    None => {
                        let _ = reply.send(Err(ActionError::NotFound(service)));
                    }
                },
                Command::State { reply } => {
                    let state = supervisor.state().await;
                    let _ = reply.send(state.encode().map_err(|e| e.to_string()));
                }
            },
            Some(_) = supervisor.retiring.join_next(), if !supervisor.retiring.is_empty() => {}
        }
    }
    supervisor.shut_down().await;
    Ok(())
}

impl Supervisor {
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
        let result = self.try_reload(trigger, scope).await;
        match &result {
            Ok(_) => {
                tracing::info!(services = self.services.len(), "reload applied");
                self.context.events.emit("", "reload", json!({"result": "applied"}));
            }
            Err(e) => {
                let error = chain(e);
                tracing::error!("reload rejected, running configuration kept: {error}");
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

fn bind_admin(addr: &Endpoint) -> Result<endpoint::Listener, StartError> {
    let listener = addr.bind().map_err(|source| StartError::AdminBind {
        addr: addr.clone(),
        source,
    })?;
    tracing::info!(addr = %listener.local(), "admin API listening");
    Ok(listener)
}

/// Reads the admin token, if the configuration names a file for it.
fn load_token(admin: &AdminConfig) -> Result<Option<Arc<String>>, StartError> {
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
