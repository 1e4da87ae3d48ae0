//! One service's lifecycle: its workers, its route, its accept loops, and the upgrade state machine.
//!
//! A single task owns everything here and is the only one to change the service's workers or route; the
//! supervisor talks to it through [`ServiceHandle`]. The steps of an upgrade:
//!
//! 1. spawn the next generation, 2. wait until it is ready, 3. switch the route to it, 4. watch it for
//!    `watchdog` while the previous worker stays warm (a failure there rolls the route back), 5. drain the
//!    previous worker, 6. stop it.
//!
//! Steps 1–2 run as one future beside the command loop; requests during steps 1–4 coalesce into one
//! follow-up, which starts once the watchdog window has closed.
//! Health probes of the active worker run all the time, with rise/fall thresholds; a worker that dies or
//! turns unhealthy is replaced, with an exponential backoff so that a crash loop cannot spin. While there
//! is no worker to route to, new connections wait (see `proxy`). The methods of [`Service`] make the
//! decisions and do no waiting; the waiting happens in the futures they start.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use crate::config::{DrainPolicy, ServiceConfig};
use crate::control::{
    ActionError, Events, Phase, PhaseTimes, ServiceState, Trigger, UpgradeRecord, UpgradeResult, millis,
};
use crate::listener::{Listener, accept_loop};
use crate::metrics::Metrics;
use crate::readiness::{ReadinessError, probe, wait_ready};
use crate::route::{Route, Settings, Shared, SharedRoute, Upstream};
use crate::supervisor::chain;
use crate::worker::{RuntimeDir, SpawnError, Spawner, Worker, describe};

/// The first wait before replacing a worker that died or turned unhealthy.
pub const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest wait between two restarts.
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How often a draining worker's progress is published.
pub const DRAIN_PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How long a worker must run before a crash restarts it after [`RESTART_BACKOFF_MIN`] again.
pub const RESTART_STABLE_AFTER: Duration = Duration::from_secs(30);

/// What the supervisor asks of a service.
#[derive(Debug)]
pub enum ServiceCommand {
    /// Start a new worker generation and switch to it; the waiter, if any, is told the outcome.
    Upgrade(Trigger, Option<Waiter>),
    /// Switch back to the previous worker while it is warm.
    Rollback(oneshot::Sender<Result<UpgradeRecord, ActionError>>),
    /// Use this configuration and these public sockets from now on (the next worker gets the new command).
    Reconfigure {
        /// The service's new stanza.
        config: Arc<ServiceConfig>,
        /// Its public sockets, bound already.
        listeners: Vec<Arc<Listener>>,
    },
}

/// Told the outcome of an upgrade once its watchdog window is over.
pub type Waiter = oneshot::Sender<UpgradeRecord>;

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
    /// Permits for proxied connections, shared by every service (see `listener::connection_budget`).
    pub connections: Arc<tokio::sync::Semaphore>,
    /// Lifecycle events.
    pub events: Events,
}

impl ServiceHandle {
    /// Starts the service's task, which spawns the first worker at once. `started` is told how that went,
    /// and `waiter` gets its record.
    pub fn start(
        config: Arc<ServiceConfig>,
        listeners: Vec<Arc<Listener>>,
        context: Context,
        started: oneshot::Sender<Result<(), String>>,
        waiter: Option<Waiter>,
    ) -> ServiceHandle {
        let (commands, receiver) = mpsc::unbounded_channel();
        let (state_tx, state) = watch::channel(ServiceState::new(listeners.iter().map(|l| l.local).collect()));
        let shared = Arc::new(Shared::new(context.metrics.service(&config.name)));
        let route = Arc::new(ArcSwap::from_pointee(Route {
            upstream: None,
            hold: true,
            settings: Settings::of(&config),
            shared: Arc::clone(&shared),
        }));
        let service = Service {
            config,
            route,
            shared,
            context,
            listeners: Vec::new(),
            pending_listeners: listeners,
            accepting: false,
            active: None,
            watch: None,
            last_generation: 0,
            drains: JoinSet::new(),
            draining: Vec::new(),
            state: Arc::new(state_tx),
            upgrading: false,
            follow_up: None,
            waiters: waiter.into_iter().collect(),
            follow_up_waiters: Vec::new(),
            started: Some(started),
            restart_backoff: RESTART_BACKOFF_MIN,
            restart: None,
            shutting_down: false,
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

/// A worker with its data-path view and its health.
#[derive(Debug)]
struct Active {
    worker: Worker,
    upstream: Arc<Upstream>,
    /// When it took traffic.
    since: Instant,
    /// Consecutive failed health probes.
    failures: u32,
    /// Consecutive good health probes.
    successes: u32,
    /// Whether it passes its health checks (false from `failures` failures until `successes` successes).
    healthy: bool,
}

impl Active {
    fn new(worker: Worker) -> Active {
        let upstream = Arc::new(Upstream::new(worker.generation, worker.pid, worker.addr.clone()));
        Active {
            worker,
            upstream,
            since: Instant::now(),
            failures: 0,
            successes: 0,
            healthy: true,
        }
    }
}

/// The watchdog window after a switch: the previous worker is kept warm so traffic can go back to it.
#[derive(Debug)]
struct Watch {
    previous: Active,
    since: Instant,
    until: Instant,
    /// The upgrade being watched; its result is known when the window ends.
    record: UpgradeRecord,
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

/// An upgrade in flight, up to a ready worker or a failure.
type UpgradeFuture = Pin<Box<dyn Future<Output = Attempt> + Send>>;

/// How the first steps of an upgrade went.
struct Attempt {
    trigger: Trigger,
    generation: u64,
    /// From the start to a running process, if it got that far.
    spawn: Option<Duration>,
    /// From the start to ready or to the failure.
    total: Duration,
    result: Result<Worker, UpgradeError>,
}

/// A health probe in flight: yields the generation probed and whether it answered.
type ProbeFuture = Pin<Box<dyn Future<Output = (u64, bool)> + Send>>;

struct Service {
    config: Arc<ServiceConfig>,
    route: SharedRoute,
    shared: Arc<Shared>,
    context: Context,
    /// Public sockets with their accept loops.
    listeners: Vec<(Arc<Listener>, AbortOnDropHandle<()>)>,
    /// Public sockets not yet accepted on, while the service has had no ready worker.
    pending_listeners: Vec<Arc<Listener>>,
    /// Whether the service has had a ready worker and so accepts connections.
    accepting: bool,
    /// The worker new connections go to; `None` while there is none alive.
    active: Option<Active>,
    /// The watchdog window of the last switch, if it is still open.
    watch: Option<Watch>,
    last_generation: u64,
    /// One task per old worker: drain, then stop; yields the generation it stopped.
    drains: JoinSet<u64>,
    /// The old workers those tasks drain, oldest first.
    draining: Vec<Arc<Upstream>>,
    state: Arc<watch::Sender<ServiceState>>,
    /// Whether an upgrade future is in flight.
    upgrading: bool,
    /// A request that came during an upgrade, to run after it.
    follow_up: Option<Trigger>,
    /// Told the outcome of the upgrade in flight.
    waiters: Vec<Waiter>,
    /// Told the outcome of the follow-up.
    follow_up_waiters: Vec<Waiter>,
    /// Told how the first upgrade went.
    started: Option<oneshot::Sender<Result<(), String>>>,
    restart_backoff: Duration,
    /// When to replace a worker that died or turned unhealthy, and why.
    restart: Option<(Instant, Trigger)>,
    shutting_down: bool,
}

impl Service {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<ServiceCommand>) {
        let mut upgrade: Option<UpgradeFuture> = Some(self.begin_upgrade(Trigger::Start));
        let mut health: Option<ProbeFuture> = None;
        loop {
            // Requests that came during the last upgrade or its watchdog window run now, as one.
            if upgrade.is_none() && self.watch.is_none() {
                if let Some(trigger) = self.follow_up.take() {
                    self.waiters = std::mem::take(&mut self.follow_up_waiters);
                    upgrade = Some(self.begin_upgrade(trigger));
                }
            }
            if health.is_none() {
                health = self.next_probe();
            }
            let active_exit = self.active.as_ref().map(|a| a.worker.exit_watch());
            let previous_exit = self.watch.as_ref().map(|w| w.previous.worker.exit_watch());
            let watch_until = self.watch.as_ref().map(|w| w.until);
            let restart_at = self.restart.map(|(at, _)| at);
            tokio::select! {
                attempt = async { upgrade.as_mut().expect("guarded").await }, if upgrade.is_some() => {
                    upgrade = None;
                    self.upgrading = false;
                    self.finish_upgrade(attempt);
                }
                command = commands.recv() => match command {
                    // An upgrade lasts until its watchdog window closes; requests meanwhile coalesce.
                    Some(ServiceCommand::Upgrade(trigger, waiter)) => {
                        self.follow_up = Some(trigger);
                        self.follow_up_waiters.extend(waiter);
                    }
                    Some(ServiceCommand::Rollback(reply)) => {
                        let _ = reply.send(self.rollback());
                    }
                    Some(ServiceCommand::Reconfigure { config, listeners }) => self.reconfigure(config, listeners),
                    None => break,
                },
                (generation, ok) = async { health.as_mut().expect("guarded").await }, if health.is_some() => {
                    health = None;
                    self.health_result(generation, ok);
                }
                status = async { active_exit.expect("guarded").await }, if active_exit.is_some() => {
                    self.active_exited(status);
                }
                _ = async { previous_exit.expect("guarded").await }, if previous_exit.is_some() => {
                    // The warm worker died: there is nothing to roll back to any more.
                    let watch = self.watch.take().expect("guarded");
                    self.end_watch(watch, UpgradeResult::Success, None);
                }
                () = async { tokio::time::sleep_until(watch_until.expect("guarded")).await }, if watch_until.is_some() => {
                    let watch = self.watch.take().expect("guarded");
                    self.end_watch(watch, UpgradeResult::Success, None);
                }
                () = async { tokio::time::sleep_until(restart_at.expect("guarded")).await }, if restart_at.is_some() => {
                    let (_, trigger) = self.restart.take().expect("guarded");
                    // An upgrade in flight replaces the worker already; should it fail, the failure
                    // schedules the next restart.
                    if upgrade.is_none() {
                        self.context.metrics.restart(&self.config.name, trigger.label());
                        self.follow_up = Some(trigger);
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
        self.upgrading = true;
        let generation = self.last_generation;
        let config = Arc::clone(&self.config);
        let context = self.context.clone();
        let state = Arc::clone(&self.state);
        self.state.send_modify(|s| s.phase = Phase::Spawning);
        tracing::info!(service = %config.name, generation, trigger = trigger.label(), "upgrade started");
        let events = &self.context.events;
        events.emit(
            &config.name,
            "upgrade_started",
            json!({"generation": generation, "trigger": trigger}),
        );
        Box::pin(async move {
            let started = Instant::now();
            let mut spawn = None;
            let result = async {
                let worker = Worker::spawn(&config, generation, &context.spawner, context.runtime_dir.path()).await?;
                spawn = Some(started.elapsed());
                state.send_modify(|s| s.phase = Phase::WaitingReady);
                context.events.emit(
                    &config.name,
                    "spawned",
                    json!({"generation": generation, "pid": worker.pid, "worker": worker.addr.to_string()}),
                );
                match wait_ready(&worker, &config.readiness).await {
                    Ok(took) => {
                        context.events.emit(
                            &config.name,
                            "ready",
                            json!({"generation": generation, "pid": worker.pid, "ready_ms": millis(took)}),
                        );
                        Ok(worker)
                    }
                    Err(source) => {
                        let pid = worker.pid;
                        worker.kill().await;
                        Err(UpgradeError::NotReady { pid, source })
                    }
                }
            }
            .await;
            Attempt {
                trigger,
                generation,
                spawn,
                total: started.elapsed(),
                result,
            }
        })
    }

    /// Switches to a ready worker, or records why there is none.
    fn finish_upgrade(&mut self, attempt: Attempt) {
        let Attempt {
            trigger,
            generation,
            spawn,
            total: took,
            result,
        } = attempt;
        let name = self.config.name.clone();
        let old_generation = self.active.as_ref().map(|a| a.worker.generation);
        let mut record = UpgradeRecord {
            service: name.clone(),
            trigger,
            result: UpgradeResult::Success,
            old_generation,
            old_pid: self.active.as_ref().map(|a| a.worker.pid),
            new_generation: generation,
            new_pid: None,
            duration_ms: millis(took),
            phases: PhaseTimes {
                spawn_ms: spawn.map(millis),
                ready_ms: spawn.map(|s| millis(took.saturating_sub(s))),
                watch_ms: None,
            },
            error: None,
            finished_at: 0.0,
        };
        match result {
            Ok(worker) => {
                tracing::info!(
                    service = %name, generation, pid = worker.pid,
                    ready_ms = millis(took), old_generation = ?old_generation,
                    "worker ready: switched"
                );
                record.new_pid = Some(worker.pid);
                self.context.metrics.worker_ready(&name, took);
                self.switch(worker, record);
            }
            Err(error) => {
                record.phases.ready_ms = None;
                record.new_pid = match &error {
                    UpgradeError::NotReady { pid, .. } => Some(*pid),
                    UpgradeError::Spawn(_) => None,
                };
                let error = format!(
                    "service `{name}`: upgrade to generation {generation} failed: {}",
                    chain(&error)
                );
                tracing::error!(service = %name, generation, "{error}");
                record.result = UpgradeResult::Failed;
                record.error = Some(error);
                if self.active.as_ref().is_none_or(|a| !a.healthy) {
                    // Nothing good serves: keep trying, more and more slowly.
                    self.schedule_restart(match self.active {
                        None => Trigger::Restart,
                        Some(_) => Trigger::Unhealthy,
                    });
                }
                self.record(record);
            }
        }
    }

    /// Points new connections at `worker`. The worker it replaces is kept warm for the watchdog window, or
    /// drained at once when there is no window.
    fn switch(&mut self, worker: Worker, record: UpgradeRecord) {
        self.context.events.emit(
            &self.config.name,
            "switched",
            json!({"generation": worker.generation, "pid": worker.pid, "old_generation": record.old_generation}),
        );
        let previous = self.active.replace(Active::new(worker));
        // A replacement that was due is moot now.
        self.restart = None;
        // The new route is stored before the old worker starts draining, so that a connection that finds the
        // old one draining sees the new one when it loads again.
        self.store_route();
        if let Some(watch) = self.watch.take() {
            // Superseded before its window ended: the watched worker did well enough.
            self.end_watch(watch, UpgradeResult::Success, None);
        }
        match previous {
            Some(previous) if !self.config.watchdog.is_zero() => {
                self.context.events.emit(
                    &self.config.name,
                    "watching",
                    json!({"generation": record.new_generation, "previous_generation": previous.worker.generation,
                           "watchdog_ms": millis(self.config.watchdog)}),
                );
                self.watch = Some(Watch {
                    previous,
                    since: Instant::now(),
                    until: Instant::now() + self.config.watchdog,
                    record,
                });
                self.publish(None);
            }
            Some(previous) => {
                self.drain(previous);
                self.record(record);
            }
            None => {
                self.record(record);
            }
        }
        if !self.accepting {
            self.accepting = true;
            for listener in std::mem::take(&mut self.pending_listeners) {
                self.accept_on(listener);
            }
        }
    }

    /// Closes the watchdog window: keep the new worker (`Success`), or go back to the previous one.
    fn end_watch(&mut self, watch: Watch, result: UpgradeResult, reason: Option<String>) -> UpgradeRecord {
        let Watch {
            previous,
            mut record,
            since,
            ..
        } = watch;
        record.phases.watch_ms = Some(millis(since.elapsed()));
        if result == UpgradeResult::RolledBack {
            let restored = previous.worker.generation;
            let failed = self.active.replace(Active {
                since: Instant::now(),
                failures: 0,
                successes: 0,
                healthy: true,
                ..previous
            });
            self.store_route();
            let reason = reason.unwrap_or_default();
            let error = format!(
                "service `{}`: generation {} {reason}: rolled back to generation {restored}",
                self.config.name, record.new_generation
            );
            tracing::error!(service = %self.config.name, generation = record.new_generation, restored, "{error}");
            self.context.events.emit(
                &self.config.name,
                "rolled_back",
                json!({"generation": record.new_generation, "restored_generation": restored, "reason": reason}),
            );
            record.error = Some(error);
            if let Some(failed) = failed {
                self.drain(failed);
            }
        } else {
            self.drain(previous);
        }
        record.result = result;
        self.record(record)
    }

    /// Switches back to the previous worker at an operator's request, while the watchdog window is open.
    fn rollback(&mut self) -> Result<UpgradeRecord, ActionError> {
        match self.watch.take() {
            Some(watch) => Ok(self.end_watch(watch, UpgradeResult::RolledBack, Some("rollback requested".into()))),
            None => Err(ActionError::Conflict(format!(
                "service `{}`: nothing to roll back to: no previous worker is kept warm (the watchdog window \
                 is over, disabled, or no upgrade happened)",
                self.config.name
            ))),
        }
    }

    /// Records the end of an upgrade and tells whoever waits for it.
    fn record(&mut self, record: UpgradeRecord) -> UpgradeRecord {
        self.context
            .metrics
            .upgrade_finished(&self.config.name, record.trigger.label(), record.result.label());
        if let Some(started) = self.started.take() {
            let _ = started.send(match record.result {
                UpgradeResult::Failed => Err(record.error.clone().unwrap_or_default()),
                _ => Ok(()),
            });
        }
        let record = record.now();
        self.context.events.emit(
            &self.config.name,
            "upgrade_finished",
            serde_json::to_value(&record).unwrap_or_default(),
        );
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(record.clone());
        }
        self.publish(Some(record.clone()));
        record
    }

    /// The next health probe of the active worker, if there is one to probe.
    fn next_probe(&self) -> Option<ProbeFuture> {
        let active = self.active.as_ref()?;
        let generation = active.worker.generation;
        let addr = active.worker.addr.clone();
        let path = self.config.readiness.path.clone();
        let health = self.config.health.clone();
        Some(Box::pin(async move {
            tokio::time::sleep(health.interval).await;
            let ok = matches!(
                tokio::time::timeout(health.timeout, probe(&addr, path.as_deref())).await,
                Ok(Ok(()))
            );
            (generation, ok)
        }))
    }

    /// Applies one probe result with rise/fall hysteresis.
    fn health_result(&mut self, generation: u64, ok: bool) {
        let Some(active) = self.active.as_mut().filter(|a| a.worker.generation == generation) else {
            return;
        };
        let health = &self.config.health;
        let metrics = &self.shared.metrics;
        if ok {
            metrics.health_ok.inc();
            active.failures = 0;
            active.successes += 1;
            if !active.healthy && active.successes >= health.successes {
                active.healthy = true;
                tracing::info!(service = %self.config.name, generation, "worker healthy again");
                self.context
                    .events
                    .emit(&self.config.name, "healthy", json!({"generation": generation}));
                self.publish(None);
            }
            return;
        }
        metrics.health_failed.inc();
        active.successes = 0;
        active.failures += 1;
        if !active.healthy || active.failures < health.failures {
            return;
        }
        active.healthy = false;
        let failures = active.failures;
        tracing::warn!(service = %self.config.name, generation, failures, "worker unhealthy");
        self.context.events.emit(
            &self.config.name,
            "unhealthy",
            json!({"generation": generation, "failures": failures}),
        );
        match self.watch.take() {
            Some(watch) => {
                let reason = format!("failed {failures} health checks");
                self.end_watch(watch, UpgradeResult::RolledBack, Some(reason));
            }
            None => {
                self.schedule_restart(Trigger::Unhealthy);
                self.publish(None);
            }
        }
    }

    /// The active worker exited on its own.
    fn active_exited(&mut self, status: std::process::ExitStatus) {
        let Some(active) = self.active.take() else { return };
        self.context.events.emit(
            &self.config.name,
            "worker_exited",
            json!({"generation": active.worker.generation, "pid": active.worker.pid, "status": describe(status)}),
        );
        if active.since.elapsed() >= RESTART_STABLE_AFTER {
            // It ran well for long: this crash starts the backoff afresh.
            self.restart_backoff = RESTART_BACKOFF_MIN;
        }
        if let Some(watch) = self.watch.take() {
            self.active = Some(active);
            let reason = format!("exited ({})", describe(status));
            self.end_watch(watch, UpgradeResult::RolledBack, Some(reason));
            return;
        }
        // New connections wait for the replacement instead of dialling a dead socket.
        self.store_route();
        self.drain(active);
        self.schedule_restart(Trigger::Restart);
        self.publish(None);
    }

    /// Lets `old` finish its connections, then stops it, on a task of its own. Past `max_draining` old
    /// workers, the oldest has its connections cut to make room.
    fn drain(&mut self, old: Active) {
        let Active { worker, upstream, .. } = old;
        let config = Arc::clone(&self.config);
        let mut live = self.draining.iter().filter(|d| !d.is_cut());
        if !self.shutting_down && live.clone().count() >= config.max_draining as usize {
            if let Some(oldest) = live.next() {
                tracing::warn!(
                    service = %config.name, generation = oldest.generation, pid = oldest.pid,
                    connections = oldest.connections(), "too many draining workers: cutting the oldest"
                );
                oldest.cut_now();
            }
        }
        self.draining.push(Arc::clone(&upstream));
        let metrics = self.context.metrics.clone();
        let events = self.context.events.clone();
        self.drains.spawn(async move {
            let started = Instant::now();
            let (generation, pid) = (worker.generation, worker.pid);
            tracing::info!(
                service = %config.name, generation, pid,
                connections = upstream.connections(), policy = ?config.drain_policy, "draining"
            );
            events.emit(
                &config.name,
                "drain_started",
                json!({"generation": generation, "pid": pid, "connections": upstream.connections(),
                       "drain_timeout_ms": millis(config.drain_timeout)}),
            );
            if config.drain_policy == DrainPolicy::Signal {
                // No connection may pick this worker once it has been told to stop, and every connection
                // that picked it must be in its hands, not in its listen queue.
                upstream.settle(config.drain_timeout).await;
                worker.begin_stop(config.stop_signal);
            }
            let deadline = started + config.drain_timeout;
            let drained = upstream.drain(config.drain_timeout);
            tokio::pin!(drained);
            let mut progress = tokio::time::interval_at(started + DRAIN_PROGRESS_EVERY, DRAIN_PROGRESS_EVERY);
            let cut = loop {
                tokio::select! {
                    cut = &mut drained => break cut,
                    _ = progress.tick() => events.emit(
                        &config.name,
                        "drain_progress",
                        json!({"generation": generation, "connections": upstream.connections(),
                               "deadline_in_ms": millis(deadline.saturating_duration_since(Instant::now()))}),
                    ),
                }
            };
            if cut > 0 {
                tracing::warn!(
                    service = %config.name, generation = worker.generation, pid = worker.pid, cut,
                    "drain timeout: closed the connections left"
                );
            }
            let status = worker.stop(config.stop_signal, config.stop_timeout).await;
            metrics.drained(&config.name, started.elapsed());
            events.emit(
                &config.name,
                "worker_stopped",
                json!({"generation": generation, "pid": pid, "status": describe(status), "cut": cut,
                       "drain_ms": millis(started.elapsed())}),
            );
            tracing::info!(
                service = %config.name, generation, pid, drain_ms = millis(started.elapsed()),
                status = %describe(status), "old worker stopped"
            );
            generation
        });
        self.publish(None);
    }

    /// Replaces the worker after the current backoff, which doubles each time unless the worker ran long.
    fn schedule_restart(&mut self, trigger: Trigger) {
        if self.restart.is_some() || self.shutting_down {
            return;
        }
        if self
            .active
            .as_ref()
            .is_some_and(|a| a.since.elapsed() >= RESTART_STABLE_AFTER)
        {
            self.restart_backoff = RESTART_BACKOFF_MIN;
        }
        let wait = self.restart_backoff;
        self.restart_backoff = (self.restart_backoff * 2).min(RESTART_BACKOFF_MAX);
        tracing::warn!(
            service = %self.config.name, wait_ms = millis(wait), reason = trigger.label(),
            "replacing the worker"
        );
        self.context.events.emit(
            &self.config.name,
            "restart_scheduled",
            json!({"in_ms": millis(wait), "reason": trigger}),
        );
        self.restart = Some((Instant::now() + wait, trigger));
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
            Arc::clone(&self.context.connections),
        ));
        self.listeners.push((listener, AbortOnDropHandle::new(task)));
    }

    /// Publishes a new route snapshot and wakes the connections waiting for one.
    fn store_route(&self) {
        self.route.store(Arc::new(Route {
            upstream: self.active.as_ref().map(|a| Arc::clone(&a.upstream)),
            hold: !self.shutting_down,
            settings: Settings::of(&self.config),
            shared: Arc::clone(&self.shared),
        }));
        self.shared.changed.notify_waiters();
    }

    /// Publishes the service's state; `upgrade` is the record of an upgrade that just ended.
    fn publish(&self, upgrade: Option<UpgradeRecord>) {
        self.state.send_modify(|s| {
            if let Some(record) = upgrade {
                s.last_upgrade = Some(record);
            }
            s.phase = match s.phase {
                _ if self.shutting_down => Phase::ShuttingDown,
                phase @ (Phase::Spawning | Phase::WaitingReady) if self.upgrading => phase,
                _ if self.upgrading => Phase::Spawning,
                _ if self.watch.is_some() => Phase::Watching,
                _ => Phase::Idle,
            };
            s.active = self.active.as_ref().map(|a| Arc::clone(&a.upstream));
            s.healthy = self.active.as_ref().is_some_and(|a| a.healthy);
            s.previous = self.watch.as_ref().map(|w| Arc::clone(&w.previous.upstream));
            s.draining = self.draining.clone();
            s.restart_at = self.restart.map(|(at, _)| at);
            s.active_since = self.active.as_ref().map(|a| a.since);
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
        self.shutting_down = true;
        self.upgrading = false;
        self.restart = None;
        self.listeners.clear();
        self.pending_listeners.clear();
        let active = self.active.take();
        self.store_route();
        if let Some(watch) = self.watch.take() {
            self.drain(watch.previous);
        }
        if let Some(active) = active {
            self.drain(active);
        }
        self.publish(None);
        while let Some(done) = self.drains.join_next().await {
            if let Ok(generation) = done {
                self.draining.retain(|d| d.generation != generation);
            }
            self.publish(None);
        }
        self.state.send_modify(|s| s.phase = Phase::Stopped);
        self.context.metrics.forget_service(&self.config.name);
        tracing::info!(service = %self.config.name, "stopped");
    }
}
