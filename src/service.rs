//! One service's lifecycle: its workers, its route, its accept loops, and the upgrade state machine.
//!
//! A single task owns everything here and is the only one to change the service's workers or route; the
//! supervisor talks to it through [`ServiceHandle`]. An upgrade runs as a future beside the command loop:
//! spawn → wait for readiness → switch the route → drain the old worker → stop it. Several requests during
//! one upgrade coalesce into one follow-up. The decisions are in [`Service`]'s methods, which do no waiting;
//! the waiting happens in the futures they start.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use crate::config::ServiceConfig;
use crate::control::{Phase, ServiceState, Trigger, UpgradeRecord, UpgradeResult, millis};
use crate::listener::{Listener, accept_loop};
use crate::metrics::Metrics;
use crate::readiness::{ReadinessError, wait_ready};
use crate::route::{Route, SharedRoute, Upstream};
use crate::supervisor::chain;
use crate::worker::{RuntimeDir, SpawnError, Spawner, Worker};

/// The first wait before restarting a worker that exited on its own.
pub const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest wait between two restarts.
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How long a worker must run before a crash restarts it after [`RESTART_BACKOFF_MIN`] again.
pub const RESTART_STABLE_AFTER: Duration = Duration::from_secs(30);

/// What the supervisor asks of a service.
#[derive(Debug)]
pub enum ServiceCommand {
    /// Start a new worker generation and switch to it.
    Upgrade(Trigger),
    /// Use this configuration and these public sockets from now on (the next worker gets the new command).
    Reconfigure {
        /// The service's new stanza.
        config: Arc<ServiceConfig>,
        /// Its public sockets, bound already.
        listeners: Vec<Arc<Listener>>,
    },
}

/// The supervisor's side of a running service.
#[derive(Debug)]
pub struct ServiceHandle {
    commands: mpsc::UnboundedSender<ServiceCommand>,
    /// The service's published state.
    pub state: watch::Receiver<ServiceState>,
    task: tokio::task::JoinHandle<()>,
}

/// What the service needs from the daemon.
#[derive(Debug, Clone)]
pub struct Context {
    /// Forks workers on the main thread.
    pub spawner: Spawner,
    /// Where Unix sockets of workers go.
    pub runtime_dir: Arc<RuntimeDir>,
    /// The registry.
    pub metrics: Metrics,
}

impl ServiceHandle {
    /// Starts the service's task, which spawns the first worker at once. `started` is told how that went.
    pub fn start(
        config: Arc<ServiceConfig>,
        listeners: Vec<Arc<Listener>>,
        context: Context,
        started: oneshot::Sender<Result<(), String>>,
    ) -> ServiceHandle {
        let (commands, receiver) = mpsc::unbounded_channel();
        let (state_tx, state) = watch::channel(ServiceState::new(listeners.iter().map(|l| l.local).collect()));
        let service_metrics = context.metrics.service(&config.name);
        let route = Arc::new(ArcSwap::from_pointee(Route {
            upstream: None,
            connect_timeout: config.connect_timeout,
            metrics: service_metrics,
        }));
        let service = Service {
            config,
            route,
            context,
            listeners: Vec::new(),
            pending_listeners: listeners,
            accepting: false,
            active: None,
            active_exited: false,
            active_since: Instant::now(),
            last_generation: 0,
            drains: JoinSet::new(),
            draining: Vec::new(),
            state: Arc::new(state_tx),
            follow_up: None,
            started: Some(started),
            restart_backoff: RESTART_BACKOFF_MIN,
            restart_at: None,
        };
        let task = tokio::spawn(service.run(receiver));
        ServiceHandle { commands, state, task }
    }

    /// Sends `command`; a service that has stopped ignores it.
    pub fn send(&self, command: ServiceCommand) {
        let _ = self.commands.send(command);
    }

    /// Stops accepting, drains and stops every worker, and resolves once none is left.
    pub async fn shutdown(self) {
        drop(self.commands);
        let _ = self.task.await;
    }
}

/// The active worker with its data-path view.
#[derive(Debug)]
struct Active {
    worker: Worker,
    upstream: Arc<Upstream>,
}

/// Why an upgrade did not produce a ready worker.
#[derive(Debug, thiserror::Error)]
enum UpgradeError {
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error("worker pid {pid}")]
    NotReady {
        pid: u32,
        #[source]
        source: ReadinessError,
    },
}

/// An upgrade in flight: yields its trigger, generation, duration, and the ready worker or the failure.
type UpgradeFuture = Pin<Box<dyn Future<Output = (Trigger, u64, Duration, Result<Worker, UpgradeError>)> + Send>>;

struct Service {
    config: Arc<ServiceConfig>,
    route: SharedRoute,
    context: Context,
    /// Public sockets with their accept loops.
    listeners: Vec<(Arc<Listener>, AbortOnDropHandle<()>)>,
    /// Public sockets not yet accepted on, while the service has had no ready worker.
    pending_listeners: Vec<Arc<Listener>>,
    /// Whether the service has had a ready worker and so accepts connections.
    accepting: bool,
    active: Option<Active>,
    /// Whether the active worker's exit has been seen.
    active_exited: bool,
    /// When the active worker took over, for the restart backoff.
    active_since: Instant,
    last_generation: u64,
    /// One task per old worker: drain, then stop; yields the generation it stopped.
    drains: JoinSet<u64>,
    draining: Vec<Arc<Upstream>>,
    state: Arc<watch::Sender<ServiceState>>,
    /// A request that came during an upgrade, to run after it.
    follow_up: Option<Trigger>,
    /// Told how the first upgrade went.
    started: Option<oneshot::Sender<Result<(), String>>>,
    restart_backoff: Duration,
    /// When to replace a worker that exited on its own.
    restart_at: Option<Instant>,
}

impl Service {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<ServiceCommand>) {
        let mut upgrade: Option<UpgradeFuture> = Some(self.begin_upgrade(Trigger::Start));
        loop {
            let active_exit = self
                .active
                .as_ref()
                .filter(|_| !self.active_exited)
                .map(|a| a.worker.exit_watch());
            let restart_at = self.restart_at;
            tokio::select! {
                (trigger, generation, took, result) = async { upgrade.as_mut().expect("guarded").await }, if upgrade.is_some() => {
                    upgrade = None;
                    self.finish_upgrade(trigger, generation, took, result);
                    if let Some(trigger) = self.follow_up.take() {
                        upgrade = Some(self.begin_upgrade(trigger));
                    }
                }
                command = commands.recv() => match command {
                    Some(ServiceCommand::Upgrade(trigger)) => {
                        if upgrade.is_some() {
                            self.follow_up = Some(trigger);
                        } else {
                            upgrade = Some(self.begin_upgrade(trigger));
                        }
                    }
                    Some(ServiceCommand::Reconfigure { config, listeners }) => self.reconfigure(config, listeners),
                    None => break,
                },
                _status = async { active_exit.expect("guarded").await }, if active_exit.is_some() => {
                    // The worker task logged the exit; connections to it now fail until a new worker is up.
                    self.active_exited = true;
                    self.schedule_restart();
                }
                () = async { tokio::time::sleep_until(restart_at.expect("guarded")).await }, if restart_at.is_some() => {
                    self.restart_at = None;
                    if upgrade.is_some() {
                        self.follow_up = Some(Trigger::Restart);
                    } else {
                        upgrade = Some(self.begin_upgrade(Trigger::Restart));
                    }
                }
                Some(done) = self.drains.join_next() => {
                    if let Ok(generation) = done {
                        self.draining.retain(|d| d.generation != generation);
                    }
                    self.publish(None);
                }
            }
        }
        // An upgrade in flight is abandoned: dropping it kills its worker.
        drop(upgrade);
        self.shut_down().await;
    }

    /// Starts the next generation; the returned future spawns it and waits until it is ready.
    fn begin_upgrade(&mut self, trigger: Trigger) -> UpgradeFuture {
        self.last_generation += 1;
        let generation = self.last_generation;
        let config = Arc::clone(&self.config);
        let context = self.context.clone();
        let state = Arc::clone(&self.state);
        self.set_phase(Phase::Spawning);
        tracing::info!(service = %config.name, generation, trigger = trigger.label(), "upgrade started");
        Box::pin(async move {
            let started = Instant::now();
            let result = async {
                let worker = Worker::spawn(&config, generation, &context.spawner, context.runtime_dir.path()).await?;
                state.send_modify(|s| s.phase = Phase::WaitingReady);
                match wait_ready(&worker, &config.readiness).await {
                    Ok(_) => Ok(worker),
                    Err(source) => {
                        let pid = worker.pid;
                        worker.kill().await;
                        Err(UpgradeError::NotReady { pid, source })
                    }
                }
            }
            .await;
            (trigger, generation, started.elapsed(), result)
        })
    }

    /// Switches to a ready worker, or records why there is none.
    fn finish_upgrade(
        &mut self,
        trigger: Trigger,
        generation: u64,
        took: Duration,
        result: Result<Worker, UpgradeError>,
    ) {
        let name = self.config.name.clone();
        let old_generation = self.active.as_ref().map(|a| a.worker.generation);
        let record = match result {
            Ok(worker) => {
                tracing::info!(
                    service = %name, generation, pid = worker.pid,
                    ready_ms = millis(took), old_generation = ?old_generation,
                    "worker ready: switched"
                );
                let record = UpgradeRecord {
                    trigger,
                    result: UpgradeResult::Success,
                    old_generation,
                    new_generation: generation,
                    new_pid: Some(worker.pid),
                    duration_ms: millis(took),
                    error: None,
                    finished_at: 0.0,
                };
                self.switch(worker);
                record
            }
            Err(error) => {
                let new_pid = match &error {
                    UpgradeError::NotReady { pid, .. } => Some(*pid),
                    UpgradeError::Spawn(_) => None,
                };
                let error = format!(
                    "service `{name}`: upgrade to generation {generation} failed: {}",
                    chain(&error)
                );
                tracing::error!(service = %name, generation, "{error}");
                if self.active.as_ref().is_some_and(|a| a.worker.exit_status().is_some()) {
                    // The worker being replaced is dead too: keep trying, more slowly.
                    self.schedule_restart();
                }
                UpgradeRecord {
                    trigger,
                    result: UpgradeResult::Failed,
                    old_generation,
                    new_generation: generation,
                    new_pid,
                    duration_ms: millis(took),
                    error: Some(error),
                    finished_at: 0.0,
                }
            }
        };
        self.context
            .metrics
            .upgrade_finished(&name, trigger.label(), record.result.label());
        if let Some(started) = self.started.take() {
            let _ = started.send(match &record.error {
                None => Ok(()),
                Some(error) => Err(error.clone()),
            });
        }
        self.publish(Some(record.now()));
    }

    /// Points new connections at `worker` and starts draining the one it replaces.
    fn switch(&mut self, worker: Worker) {
        let upstream = Arc::new(Upstream::new(worker.generation, worker.pid, worker.addr.clone()));
        let previous = self.active.replace(Active {
            worker,
            upstream: Arc::clone(&upstream),
        });
        // The new route is stored before the old worker starts draining, so that a connection that finds the
        // old one draining sees the new one when it loads again.
        self.store_route();
        if let Some(previous) = previous {
            self.drain(previous);
        }
        if self.restart_at.is_none() && self.active_since.elapsed() >= RESTART_STABLE_AFTER {
            self.restart_backoff = RESTART_BACKOFF_MIN;
        }
        self.active_since = Instant::now();
        self.active_exited = false;
        if !self.accepting {
            self.accepting = true;
            for listener in std::mem::take(&mut self.pending_listeners) {
                self.accept_on(listener);
            }
        }
    }

    /// Lets `old` finish its connections, then stops it, on a task of its own.
    fn drain(&mut self, old: Active) {
        let Active { worker, upstream } = old;
        let config = Arc::clone(&self.config);
        self.draining.push(Arc::clone(&upstream));
        self.drains.spawn(async move {
            let started = Instant::now();
            let connections = upstream.connections();
            tracing::info!(
                service = %config.name, generation = worker.generation, pid = worker.pid, connections,
                "draining"
            );
            let cut = upstream.drain(config.drain_timeout).await;
            if cut > 0 {
                tracing::warn!(
                    service = %config.name, generation = worker.generation, pid = worker.pid, cut,
                    "drain timeout: closed the connections left"
                );
            }
            let generation = worker.generation;
            let pid = worker.pid;
            let status = worker.stop(config.stop_signal, config.stop_timeout).await;
            tracing::info!(
                service = %config.name, generation, pid, drain_ms = millis(started.elapsed()),
                status = %crate::worker::describe(status), "old worker stopped"
            );
            generation
        });
    }

    fn schedule_restart(&mut self) {
        if self.restart_at.is_some() {
            return;
        }
        if self.active_since.elapsed() >= RESTART_STABLE_AFTER {
            self.restart_backoff = RESTART_BACKOFF_MIN;
        }
        let wait = self.restart_backoff;
        self.restart_backoff = (self.restart_backoff * 2).min(RESTART_BACKOFF_MAX);
        tracing::warn!(
            service = %self.config.name, wait_ms = millis(wait),
            "active worker is gone: restarting it"
        );
        self.restart_at = Some(Instant::now() + wait);
    }

    fn reconfigure(&mut self, config: Arc<ServiceConfig>, listeners: Vec<Arc<Listener>>) {
        self.config = config;
        self.store_route();
        // Keep the accept loops of sockets still configured and start the new ones; the rest stop when `old`
        // drops.
        let mut old = std::mem::take(&mut self.listeners);
        self.pending_listeners.clear();
        for listener in listeners {
            if let Some(i) = old.iter().position(|(l, _)| Arc::ptr_eq(l, &listener)) {
                self.listeners.push(old.swap_remove(i));
            } else if self.accepting {
                self.accept_on(listener);
            } else {
                self.pending_listeners.push(listener);
            }
        }
        drop(old);
        self.publish(None);
    }

    fn accept_on(&mut self, listener: Arc<Listener>) {
        tracing::info!(service = %self.config.name, listen = %listener.local, "accepting");
        let task = tokio::spawn(accept_loop(
            Arc::clone(&listener),
            self.config.name.clone(),
            Arc::clone(&self.route),
        ));
        self.listeners.push((listener, AbortOnDropHandle::new(task)));
    }

    fn store_route(&self) {
        let current = self.route.load();
        self.route.store(Arc::new(Route {
            upstream: self.active.as_ref().map(|a| Arc::clone(&a.upstream)),
            connect_timeout: self.config.connect_timeout,
            metrics: current.metrics.clone(),
        }));
    }

    fn set_phase(&self, phase: Phase) {
        self.state.send_modify(|s| s.phase = phase);
    }

    /// Publishes the service's state; `upgrade` is the record of an upgrade that just ended.
    fn publish(&self, upgrade: Option<UpgradeRecord>) {
        self.state.send_modify(|s| {
            if let Some(record) = upgrade {
                s.phase = Phase::Idle;
                s.last_upgrade = Some(record);
            }
            s.active = self.active.as_ref().map(|a| Arc::clone(&a.upstream));
            s.draining = self.draining.clone();
            s.listen = self
                .listeners
                .iter()
                .map(|(l, _)| l.local)
                .chain(self.pending_listeners.iter().map(|l| l.local))
                .collect();
        });
    }

    /// Stops accepting, drains every worker under its deadline and stops it.
    async fn shut_down(mut self) {
        tracing::info!(service = %self.config.name, "shutting down");
        self.listeners.clear();
        self.pending_listeners.clear();
        self.set_phase(Phase::ShuttingDown);
        if let Some(active) = self.active.take() {
            self.store_route();
            self.drain(active);
        }
        self.publish(None);
        while let Some(done) = self.drains.join_next().await {
            if let Ok(generation) = done {
                self.draining.retain(|d| d.generation != generation);
            }
            self.publish(None);
        }
        self.set_phase(Phase::Stopped);
        self.context.metrics.forget_service(&self.config.name);
        tracing::info!(service = %self.config.name, "stopped");
    }
}
