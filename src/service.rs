//! The driver of one service's lifecycle: it holds what the [`Machine`] only names (worker processes, their
//! data-path views, the route, the accept loops, reply channels), carries out the machine's effects, and
//! feeds their results back as inputs.
//!
//! A single task runs it and is the only one to change the service's workers or route; the supervisor talks
//! to it through [`ServiceHandle`]. Every decision (when to spawn, switch, roll back, drain, cut, stop,
//! restart) is the machine's, in `lifecycle.rs`; nothing here decides. The waiting happens in tasks that
//! report one input each (a spawn, a readiness wait, a probe, a worker's exit, a drain's last connection),
//! and in one timer set to the machine's next deadline. After every step the state is published, from
//! this one place, so `/status`, the metrics and a waiting caller all see the same truth.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;

use arc_swap::ArcSwap;
use nix::sys::signal::Signal;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use crate::clock::Time;
use crate::config::ServiceConfig;
use crate::connection::Parked;
use crate::control::{ActionError, Events, ServiceState, Trigger, UpgradeRecord, UpgradeResult, Waiting};
use crate::endpoint::Endpoint;
use crate::error::chain;
use crate::handover::{ParkedState, ServiceSnapshot, WatchState, WorkerState};
use crate::lifecycle::{Count, Effect, Event, Input, Machine, Policy, WaiterId, WindowFacts};
use crate::listener::{Listener, accept_loop};
use crate::metrics::Metrics;
use crate::readiness::{probe, wait_ready};
use crate::reexec::{PARK_TIMEOUT, own_fd};
use crate::release::Release;
use crate::route::{ParkedConnection, Route, Settings, Shared, SharedRoute, Upstream};
use crate::worker::{RuntimeDir, SpawnError, Spawner, Worker, describe};

/// What the supervisor asks of a service.
#[derive(Debug)]
pub enum ServiceCommand {
    /// Start a new worker generation and switch to it; the waiter, if any, is told the outcome.
    Upgrade(Trigger, Option<Waiter>),
    /// Switch back to the previous worker while it is warm; after the watchdog window, start the previous
    /// release again (or generation `to`'s) as a new generation.
    Rollback(Option<u64>, oneshot::Sender<Result<UpgradeRecord, ActionError>>),
    /// Skip the rest of the canary: the new worker takes every new connection now.
    Promote(oneshot::Sender<Result<UpgradeRecord, ActionError>>),
    /// Tell the releases the service remembers, newest first.
    Releases(oneshot::Sender<Vec<crate::release::Release>>),
    /// Use this configuration and these public sockets from now on (the next worker gets the new command).
    Reconfigure {
        /// The service's new stanza.
        config: Arc<ServiceConfig>,
        /// Its public sockets, bound already.
        listeners: Vec<Arc<Listener>>,
    },
    /// Tell the service's state as a handover carries it.
    Snapshot(oneshot::Sender<ServiceSnapshot>),
    /// Stop accepting and park every connection, then tell the state with the parked connections in it. The
    /// service then does nothing until [`ServiceCommand::Thaw`]: the process is to be replaced.
    Freeze(oneshot::Sender<Result<ServiceSnapshot, FreezeError>>),
    /// Ask every connection to add its sockets to a new watch (see [`crate::watch`]) ahead of a freeze, and
    /// tell the watch and how many connections are open to join it (none if it cannot be made).
    Watch(oneshot::Sender<Option<(Arc<crate::watch::Watch>, usize)>>),
    /// Carry on after a watch or a freeze (the re-exec did not happen): end the watch, resume the
    /// connections, accept again.
    Thaw,
}

/// Why a service could not be frozen for a hand-over; it runs on as before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FreezeError {
    /// An upgrade or a replacement is in flight: try again once it is over.
    Busy(String),
    /// Its connections did not all park in time.
    Stuck(String),
}

/// Counts the handed-over connections as a new image takes them over: each adds a permit to `served` once
/// its bytes are moved as they come (it runs, or its sockets are watched: see [`crate::watch`]) and to
/// `running` once it runs; an active one ([`crate::connection::ParkedRecord::is_active`]) to `active` too
/// once it runs.
#[derive(Debug, Clone)]
pub struct Resumed {
    /// Every connection, once it runs or is watched: the pause ends when all are.
    pub served: Arc<tokio::sync::Semaphore>,
    /// The active ones, which resume first.
    pub active: Arc<tokio::sync::Semaphore>,
    /// Every connection, once it runs.
    pub running: Arc<tokio::sync::Semaphore>,
}

impl Default for Resumed {
    fn default() -> Resumed {
        Resumed {
            served: Arc::new(tokio::sync::Semaphore::new(0)),
            active: Arc::new(tokio::sync::Semaphore::new(0)),
            running: Arc::new(tokio::sync::Semaphore::new(0)),
        }
    }
}

/// How many idle handed-over connections a new image resumes between two looks at the watch.
const RESUME_STEP: usize = 32;

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
        let machine = Machine::new(config.name.clone(), Policy::of(&config));
        let shared = Arc::new(Shared::new(context.metrics.service(&config.name)));
        let (service, commands, state) = Service::new(config, listeners, context, machine, shared, Some(started));
        let task = tokio::spawn(service.run(commands.1, Start::Fresh(waiter)));
        ServiceHandle {
            commands: commands.0,
            state,
            task,
        }
    }

    /// Takes over a service that a previous image of baton ran, from its snapshot: the machine as it stood,
    /// its worker processes (still this process's children) and its parked connections, which resume at once.
    /// Fails, having started nothing, if a descriptor of the snapshot cannot be adopted.
    ///
    /// Each connection is taken over by its own task (which registers its sockets and relays again), so that
    /// they resume in parallel, the active ones first; each counts itself in `resumed` once it runs.
    pub fn adopt(
        config: Arc<ServiceConfig>,
        listeners: Vec<Arc<Listener>>,
        context: Context,
        snapshot: ServiceSnapshot,
        resumed: Resumed,
        gate: watch::Receiver<bool>,
    ) -> std::io::Result<ServiceHandle> {
        let watched: Vec<bool> = snapshot.parked_watched().map(|(_, watched)| watched).collect();
        let ServiceSnapshot {
            mut machine,
            workers,
            parked,
            watch,
            releases,
        } = snapshot;
        let watch = watch.map(|w| crate::watch::Watch::adopt(own_fd(w.fd)));
        machine.policy = Policy::of(&config);
        let mut held = HashMap::new();
        for state in &workers {
            let worker = Worker::adopt(&config.name, state)?;
            let upstream = Arc::new(Upstream::new(state.generation, state.pid, state.addr.clone()));
            upstream.add_tally(state.tally);
            if state.draining {
                upstream.begin_drain();
            }
            held.insert(
                state.generation,
                Held {
                    worker,
                    upstream,
                    tasks: Vec::new(),
                },
            );
        }
        let mut connections = Vec::with_capacity(parked.len());
        for (
            ParkedState {
                record,
                client_fd,
                worker_fd,
            },
            watched,
        ) in parked.into_iter().zip(watched)
        {
            let fds = [own_fd(client_fd), own_fd(worker_fd)];
            let upstream = match held.get(&record.generation) {
                Some(held) => Arc::clone(&held.upstream),
                // Its worker is gone already: the connection still finishes, counted against nobody live.
                None => {
                    let upstream = Arc::new(Upstream::new(
                        record.generation,
                        0,
                        Endpoint::Tcp(([0, 0, 0, 0], 0).into()),
                    ));
                    upstream.begin_drain();
                    upstream
                }
            };
            let guard = upstream.adopt(record.answered);
            connections.push(Handed {
                record,
                fds,
                guard,
                watched,
            });
        }
        let shared = Arc::new(Shared::new(context.metrics.service(&config.name)));
        let (mut service, commands, state) = Service::new(config, listeners, context, machine, shared, None);
        for (generation, held) in held {
            service.hold_worker(generation, held);
        }
        service.releases = releases.into();
        let task = tokio::spawn(service.run(commands.1, Start::Adopted(connections, watch, resumed, gate)));
        Ok(ServiceHandle {
            commands: commands.0,
            state,
            task,
        })
    }

    /// Sends `command`; a service that has stopped ignores it.
    pub fn send(&self, command: ServiceCommand) {
        let _ = self.commands.send(command);
    }

    /// The service's lifecycle and workers as they stand; `None` once it has stopped.
    pub async fn snapshot(&self) -> Option<ServiceSnapshot> {
        let (reply, snapshot) = oneshot::channel();
        self.send(ServiceCommand::Snapshot(reply));
        snapshot.await.ok()
    }

    /// Carries on after a [`ServiceCommand::Freeze`].
    pub fn thaw(&self) {
        self.send(ServiceCommand::Thaw);
    }

    /// Stops accepting, drains and stops every worker, and resolves once none is left.
    pub async fn shutdown(self) {
        drop(self.commands);
        let _ = self.task.await;
    }
}

/// A worker process with its data-path view, and the tasks that report on it.
#[derive(Debug)]
struct Held {
    worker: Worker,
    upstream: Arc<Upstream>,
    /// Its exit watcher, probes and drain watchers, aborted when it is let go of.
    tasks: Vec<AbortHandle>,
}

/// How a service's task begins.
enum Start {
    /// With its first worker, whose upgrade `Option<Waiter>` waits for.
    Fresh(Option<Waiter>),
    /// From a previous image's state, with these connections to resume (each counts itself in `Resumed`)
    /// and the watch their sockets are in, once the gate opens.
    Adopted(Vec<Handed>, Option<crate::watch::Watch>, Resumed, watch::Receiver<bool>),
}

/// A connection a previous image handed over, not yet running in this one.
struct Handed {
    record: crate::connection::ParkedRecord,
    fds: [std::os::fd::OwnedFd; 2],
    guard: crate::route::Guard,
    /// Whether its sockets are in the handed-over watch, and so came inheritable
    /// ([`crate::connection::Connection::join`]).
    watched: bool,
}

/// Serves a parked connection again, on a task of its own, with a permit of the connection budget `budget`
/// when one is left (it was counted before it parked, so it goes on even without one). `connection` makes it
/// on that task: a handed-over one registers its sockets there. `woken` if it rested in the watch and was
/// counted as starting ([`crate::proxy::wake`]).
fn spawn_resumed(
    route: SharedRoute,
    budget: Arc<tokio::sync::Semaphore>,
    woken: bool,
    connection: impl FnOnce() -> Option<ParkedConnection> + Send + 'static,
) {
    let permit = budget.try_acquire_owned().ok();
    tokio::spawn(async move {
        if let Some(connection) = connection() {
            if woken {
                crate::proxy::wake(connection, &route).await;
            } else {
                crate::proxy::resume(connection, &route).await;
            }
        }
        drop(permit);
    });
}

/// What a handed-over connection needs to run again: its service's route and connection budget, and the
/// counts it adds itself to.
#[derive(Clone)]
struct Takeover {
    route: SharedRoute,
    budget: Arc<tokio::sync::Semaphore>,
    resumed: Resumed,
}

impl Takeover {
    /// Starts `handed` on a task of its own, which registers its sockets and relays again, and counts it
    /// there: as served too unless the watch counted it so already (`counted`).
    fn start(&self, handed: Handed, counted: bool) {
        let Handed {
            record,
            fds,
            guard,
            watched,
        } = handed;
        let resumed = self.resumed.clone();
        let active = record.is_active();
        // It counts against its client again, over the limit or not: it was admitted before.
        let client = record.client.and_then(|client| {
            let route = self.route.load();
            match route.settings.max_connections_per_client {
                0 => None,
                max => route.shared.client_slot(client.ip(), max, true),
            }
        });
        spawn_resumed(Arc::clone(&self.route), Arc::clone(&self.budget), false, move || {
            let parked = Parked::from_parts(record, fds, watched);
            resumed.running.add_permits(1);
            if !counted {
                resumed.served.add_permits(1);
            }
            if active {
                resumed.active.add_permits(1);
            }
            match parked {
                Ok(connection) => Some(ParkedConnection {
                    connection,
                    guard,
                    client,
                }),
                Err(e) => {
                    tracing::error!(error = %e, "cannot take over a connection: it is lost");
                    None
                }
            }
        });
    }
}

/// Takes over the idle handed-over connections whose sockets are in `watch`, [`RESUME_STEP`] at a time, in
/// their order; before each step, those the watch reports with bytes or an end waiting go first. From its
/// first look at the watch, every one of them counts as served: its bytes are moved as they come.
async fn resume_idle(takeover: Takeover, watch: crate::watch::Watch, idle: Vec<Handed>) {
    // Which connection each descriptor belongs to: descriptors are small numbers, so an index serves.
    let top = idle.iter().flat_map(|h| h.fds.iter().map(AsRawFd::as_raw_fd)).max();
    let mut owner = vec![usize::MAX; top.map_or(0, |top| usize::try_from(top).unwrap_or(0) + 1)];
    for (i, handed) in idle.iter().enumerate() {
        for fd in &handed.fds {
            if let Ok(fd) = usize::try_from(fd.as_raw_fd()) {
                owner[fd] = i;
            }
        }
    }
    let count = idle.len();
    let mut waiting: Vec<Option<Handed>> = idle.into_iter().map(Some).collect();
    let (mut left, mut next, mut counted, mut ready) = (count, 0, false, Vec::new());
    while left > 0 {
        ready.clear();
        if let Err(e) = watch.ready(&mut ready) {
            tracing::warn!(error = %e, "cannot look at the watch: taking the idle connections over at once");
            for handed in waiting.iter_mut().filter_map(Option::take) {
                takeover.start(handed, counted);
            }
            break;
        }
        if !counted {
            takeover.resumed.served.add_permits(count);
            counted = true;
        }
        for fd in &ready {
            let handed = usize::try_from(*fd)
                .ok()
                .and_then(|fd| owner.get(fd))
                .and_then(|&i| waiting.get_mut(i))
                .and_then(Option::take);
            if let Some(handed) = handed {
                takeover.start(handed, true);
                left -= 1;
            }
        }
        let mut step = 0;
        while step < RESUME_STEP && next < waiting.len() {
            if let Some(handed) = waiting[next].take() {
                takeover.start(handed, true);
                left -= 1;
                step += 1;
            }
            next += 1;
        }
        // The connections just started run before the next step.
        tokio::task::yield_now().await;
    }
    Arc::new(watch).close();
}

/// Resolves once `waiting` may have something to report; never without one.
async fn readable(waiting: Option<&crate::watch::Waiting>) {
    match waiting {
        Some(waiting) => waiting.readable().await,
        None => std::future::pending().await,
    }
}

/// What a task of the driver reports back.
enum Report {
    /// An input for the machine.
    Input(Input),
    /// How the spawn of a generation went, how long its `prepare` command took if it ran one, and the
    /// release it was started with.
    Spawned {
        generation: u64,
        result: Result<Worker, SpawnError>,
        prepared: Option<u64>,
        release: Option<Release>,
    },
}

impl Report {
    /// A spawn that failed before it had a release.
    fn spawned(generation: u64, result: Result<Worker, SpawnError>) -> Report {
        Report::Spawned {
            generation,
            result,
            prepared: None,
            release: None,
        }
    }
}

/// Someone waiting for an outcome, by the kind of answer they take.
#[derive(Debug)]
enum Reply {
    Upgrade(Waiter),
    Rollback(oneshot::Sender<Result<UpgradeRecord, ActionError>>),
}

/// The driver of one service's [`Machine`]: holds what the machine names (workers, routes, sockets, reply
/// channels), carries out its effects and feeds their results back.
struct Service {
    /// The lifecycle: every decision is its.
    machine: Machine,
    config: Arc<ServiceConfig>,
    route: SharedRoute,
    shared: Arc<Shared>,
    context: Context,
    /// Public sockets with their accept loops.
    listeners: Vec<(Arc<Listener>, AbortOnDropHandle<()>)>,
    /// The watch the connections rest in while a hand-over is prepared, registered to serve them as their
    /// bytes come ([`crate::proxy::wake`]).
    waiting: Option<crate::watch::Waiting>,
    /// The task watching the service's `watch` paths, and the paths it watches.
    release_watch: Option<(Vec<std::path::PathBuf>, AbortOnDropHandle<()>)>,
    /// The last [`crate::release::KEPT`] releases, oldest first: what each generation was started with.
    releases: std::collections::VecDeque<crate::release::Release>,
    /// Where it sends the paths that changed; the sender goes to each such task.
    changes: (
        mpsc::UnboundedSender<std::path::PathBuf>,
        mpsc::UnboundedReceiver<std::path::PathBuf>,
    ),
    /// Public sockets not yet accepted on, while the service has had no ready worker.
    pending_listeners: Vec<Arc<Listener>>,
    /// Every worker process the machine names, by generation.
    workers: HashMap<u64, Held>,
    /// Spawns, probes, exit and drain watchers in flight.
    tasks: JoinSet<Report>,
    /// Workers let go of and killed, until they are reaped (a hand-over waits for them: no state names them).
    dying: JoinSet<std::process::ExitStatus>,
    /// Reply channels, by the id the machine knows them by.
    replies: HashMap<WaiterId, Reply>,
    next_waiter: WaiterId,
    /// Told how the first upgrade went.
    started: Option<oneshot::Sender<Result<(), String>>>,
    state: watch::Sender<ServiceState>,
}

type Commands = (
    mpsc::UnboundedSender<ServiceCommand>,
    mpsc::UnboundedReceiver<ServiceCommand>,
);

impl Service {
    fn new(
        config: Arc<ServiceConfig>,
        listeners: Vec<Arc<Listener>>,
        context: Context,
        machine: Machine,
        shared: Arc<Shared>,
        started: Option<oneshot::Sender<Result<(), String>>>,
    ) -> (Service, Commands, watch::Receiver<ServiceState>) {
        let commands = mpsc::unbounded_channel();
        let (state_tx, state) = watch::channel(ServiceState::new(listeners.iter().map(|l| l.local).collect()));
        let route = Arc::new(ArcSwap::from_pointee(Route {
            upstream: None,
            split: None,
            hold: true,
            settings: Settings::of(&config),
            shared: Arc::clone(&shared),
        }));
        let service = Service {
            machine,
            config,
            route,
            shared,
            context,
            listeners: Vec::new(),
            waiting: None,
            release_watch: None,
            releases: std::collections::VecDeque::new(),
            changes: mpsc::unbounded_channel(),
            pending_listeners: listeners,
            workers: HashMap::new(),
            tasks: JoinSet::new(),
            dying: JoinSet::new(),
            replies: HashMap::new(),
            next_waiter: 0,
            started,
            state: state_tx,
        };
        (service, commands, state)
    }

    /// Holds worker `generation`, with the task that reports its exit.
    fn hold_worker(&mut self, generation: u64, mut held: Held) {
        let exit = held.worker.exit_watch();
        let watcher = self.tasks.spawn(async move {
            let status = describe(exit.await);
            Report::Input(Input::Exited { generation, status })
        });
        held.tasks.push(watcher);
        self.workers.insert(generation, held);
    }

    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<ServiceCommand>, start: Start) {
        match start {
            Start::Fresh(waiter) => {
                let waiter = waiter.map(|w| self.hold(Reply::Upgrade(w)));
                self.feed(Input::Upgrade {
                    trigger: Trigger::Start,
                    waiter,
                });
            }
            Start::Adopted(connections, watch, resumed, mut gate) => {
                // Nothing runs until every service has been adopted: a new image that cannot adopt them all
                // falls back to the previous binary, which resumes from the state as it was written.
                if gate.wait_for(|open| *open).await.is_err() {
                    return;
                }
                let effects = self.machine.adopted(Time::now());
                for effect in effects {
                    if let Some(input) = self.perform(effect) {
                        self.feed(input);
                    }
                }
                let spawning = Time::now();
                let count = connections.len();
                // The connections that were moving bytes go first; among them, the latest first. So do those
                // whose sockets are not watched. The idle, watched ones follow in the background, in the
                // same order. The order is worked out on indices: a connection is large to move around.
                let mut order: Vec<usize> = (0..connections.len()).collect();
                order.sort_by_key(|&i| {
                    let record = &connections[i].record;
                    std::cmp::Reverse((record.is_active(), record.last_moved))
                });
                let mut connections: Vec<Option<Handed>> = connections.into_iter().map(Some).collect();
                let (mut idle, mut eager) = (Vec::new(), Vec::new());
                for handed in order.into_iter().filter_map(|i| connections[i].take()) {
                    if handed.watched && !handed.record.is_active() {
                        idle.push(handed);
                    } else {
                        eager.push(handed);
                    }
                }
                let takeover = Takeover {
                    route: Arc::clone(&self.route),
                    budget: Arc::clone(&self.context.connections),
                    resumed,
                };
                let started = eager.len();
                for handed in eager {
                    takeover.start(handed, false);
                }
                if let Some(watch) = watch {
                    tokio::spawn(resume_idle(takeover, watch, idle));
                }
                tracing::debug!(
                    service = %self.config.name, connections = count, started,
                    took_ms = Time::now().since(spawning).as_secs_f64() * 1e3,
                    "handed-over connections started, the idle ones watched"
                );
                self.feed(Input::Tick);
            }
        }
        self.watch_release();
        let mut open = true;
        while !self.machine.is_stopped() {
            let deadline = self.machine.next_deadline().map(Time::instant);
            tokio::select! {
                command = commands.recv(), if open => match command {
                    Some(ServiceCommand::Freeze(reply)) => self.freeze(reply, &mut commands).await,
                    Some(command) => self.command(command),
                    None => {
                        open = false;
                        tracing::info!(service = %self.config.name, "shutting down");
                        self.unwatch();
                        self.feed(Input::Shutdown);
                    }
                },
                () = readable(self.waiting.as_ref()), if self.waiting.is_some() => self.wake(),
                Some(path) = self.changes.1.recv() => {
                    tracing::info!(service = %self.config.name, path = %path.display(), "release changed: upgrading once it settles");
                    self.feed(Input::Changed);
                }
                Some(done) = self.tasks.join_next() => {
                    if let Ok(report) = done {
                        self.report(report);
                    }
                }
                () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    self.feed(Input::Tick);
                }
            }
        }
        self.context.metrics.forget_service(&self.config.name);
        tracing::info!(service = %self.config.name, "stopped");
    }

    fn command(&mut self, command: ServiceCommand) {
        match command {
            ServiceCommand::Upgrade(trigger, waiter) => {
                let waiter = waiter.map(|w| self.hold(Reply::Upgrade(w)));
                self.feed(Input::Upgrade { trigger, waiter });
            }
            ServiceCommand::Rollback(to, reply) => self.rollback(to, reply),
            ServiceCommand::Promote(reply) => {
                let reply = self.hold(Reply::Rollback(reply));
                self.feed(Input::Promote { reply });
            }
            ServiceCommand::Releases(reply) => {
                let _ = reply.send(self.releases.iter().rev().cloned().collect());
            }
            ServiceCommand::Reconfigure { config, listeners } => self.reconfigure(config, listeners),
            ServiceCommand::Snapshot(reply) => {
                let _ = reply.send(self.snapshot());
            }
            ServiceCommand::Freeze(reply) => {
                let _ = reply.send(Err(FreezeError::Busy("a hand-over is already under way".into())));
            }
            ServiceCommand::Watch(reply) => {
                let open = self.shared.open();
                let watch = self.shared.parking.watch().and_then(|watch| {
                    self.waiting = Some(crate::watch::Waiting::new(Arc::clone(&watch))?);
                    Ok(watch)
                });
                let watch = match watch {
                    Ok(watch) => Some((watch, open)),
                    Err(e) => {
                        tracing::warn!(service = %self.config.name, error = %e, "cannot watch the connections");
                        self.unwatch();
                        None
                    }
                };
                let _ = reply.send(watch);
            }
            ServiceCommand::Thaw => self.unwatch(),
        }
    }

    /// Parks every connection for a hand-over and answers with the snapshot; then waits, doing nothing else,
    /// for the thaw that comes if the process was not replaced. Refuses while an upgrade is in flight, and
    /// gives up (and carries on) if the connections do not park within [`PARK_TIMEOUT`].
    async fn freeze(
        &mut self,
        reply: oneshot::Sender<Result<ServiceSnapshot, FreezeError>>,
        commands: &mut mpsc::UnboundedReceiver<ServiceCommand>,
    ) {
        if let Some(busy) = self.machine.busy() {
            let _ = reply.send(Err(FreezeError::Busy(busy)));
            return;
        }
        // Workers being killed are reaped first: the state does not name them, and nobody would reap them after.
        while self.dying.join_next().await.is_some() {}
        // The accept loops stop (new connections wait in the listen queues), and are waited for: every
        // connection they accepted is counted by then.
        let mut accepting = Vec::new();
        for (listener, task) in std::mem::take(&mut self.listeners) {
            task.abort();
            let _ = task.await;
            accepting.push(listener);
        }
        self.shared.parking.reserve(self.shared.open());
        let parking = Time::now();
        self.shared.parking.request();
        if tokio::time::timeout(PARK_TIMEOUT, self.shared.all_parked())
            .await
            .is_err()
        {
            let open = self.shared.open();
            self.thaw(accepting);
            let _ = reply.send(Err(FreezeError::Stuck(format!(
                "{open} connection(s) did not park within {}",
                humantime::format_duration(PARK_TIMEOUT)
            ))));
            return;
        }
        let parked = Time::now();
        let snapshot = self.snapshot();
        tracing::debug!(
            service = %self.config.name,
            parking_ms = parked.since(parking).as_secs_f64() * 1e3,
            snapshot_ms = Time::now().since(parked).as_secs_f64() * 1e3,
            "connections parked"
        );
        if reply.send(Ok(snapshot)).is_err() {
            self.thaw(accepting);
            return;
        }
        let mut later = Vec::new();
        loop {
            match commands.recv().await {
                Some(ServiceCommand::Thaw) | None => break,
                Some(ServiceCommand::Snapshot(reply)) => {
                    let _ = reply.send(self.snapshot());
                }
                Some(command) => later.push(command),
            }
        }
        self.thaw(accepting);
        for command in later {
            self.command(command);
        }
    }

    /// Carries on after a freeze: the parked connections resume, the accept loops start again.
    fn thaw(&mut self, accepting: Vec<Arc<Listener>>) {
        self.shared.parking.cancel();
        self.unwatch();
        for listener in accepting {
            self.accept_on(listener);
        }
    }

    /// Ends the connections' watch, if there is one, and serves again every parked connection: those
    /// resting in the watch, and all of them after a freeze.
    fn unwatch(&mut self) {
        self.waiting = None;
        if let Some(watch) = self.shared.parking.unwatch() {
            watch.close();
        }
        for connection in self.shared.parking.take() {
            self.resume(move || Some(connection));
        }
    }

    /// Serves again the connections resting in the watch that it reports with bytes or an end waiting.
    fn wake(&mut self) {
        let Some(waiting) = &self.waiting else { return };
        let mut ready = Vec::new();
        if let Err(e) = waiting.watch().ready(&mut ready) {
            tracing::warn!(service = %self.config.name, error = %e, "cannot look at the watch: ending it");
            self.unwatch();
            return;
        }
        for connection in self.shared.parking.wake(&ready) {
            // Counted as starting before it leaves the parked ones, so that a freeze waits for it.
            self.shared.accepted();
            spawn_resumed(
                Arc::clone(&self.route),
                Arc::clone(&self.context.connections),
                true,
                move || Some(connection),
            );
        }
    }

    /// Serves a parked connection again, on a task of its own (see [`spawn_resumed`]).
    fn resume(&self, connection: impl FnOnce() -> Option<ParkedConnection> + Send + 'static) {
        spawn_resumed(
            Arc::clone(&self.route),
            Arc::clone(&self.context.connections),
            false,
            connection,
        );
    }

    /// The machine and every worker it names, as plain data.
    fn snapshot(&self) -> ServiceSnapshot {
        let mut workers: Vec<WorkerState> = self
            .workers
            .iter()
            .map(|(&generation, held)| WorkerState {
                generation,
                pid: held.worker.pid,
                addr: held.worker.addr.clone(),
                output: held
                    .worker
                    .output
                    .as_ref()
                    .map(|(out, err)| (out.as_raw_fd(), err.as_raw_fd())),
                pidfd: held.worker.pidfd.as_ref().map(AsRawFd::as_raw_fd),
                stopping: held.worker.is_stopping(),
                exited: held
                    .worker
                    .exit_status()
                    .map(std::os::unix::process::ExitStatusExt::into_raw),
                connections: held.upstream.connections(),
                unanswered: held.upstream.unanswered(),
                draining: held.upstream.is_draining(),
                tally: held.upstream.tally(),
            })
            .collect();
        workers.sort_by_key(|w| w.generation);
        let parked = self.shared.parking.records();
        let watch = self
            .shared
            .parking
            .current_watch()
            .filter(|_| !parked.is_empty())
            .map(|watch| WatchState {
                fd: watch.as_fd().as_raw_fd(),
                unwatched: parked
                    .iter()
                    .filter(|(_, _, watched)| !watched)
                    .map(|(_, [client_fd, _], _)| *client_fd)
                    .collect(),
            });
        let parked = parked
            .into_iter()
            .map(|(record, [client_fd, worker_fd], _)| ParkedState {
                record,
                client_fd,
                worker_fd,
            })
            .collect();
        ServiceSnapshot {
            releases: self.releases.iter().cloned().collect(),
            machine: self.machine.clone(),
            workers,
            parked,
            watch,
        }
    }

    /// Keeps a reply channel under an id the machine can carry.
    fn hold(&mut self, reply: Reply) -> WaiterId {
        self.next_waiter += 1;
        self.replies.insert(self.next_waiter, reply);
        self.next_waiter
    }

    fn report(&mut self, report: Report) {
        match report {
            Report::Input(input) => self.feed(input),
            Report::Spawned {
                generation,
                result: Ok(worker),
                prepared,
                release,
            } => {
                self.remember(release);
                if let Some(ms) = prepared {
                    self.feed(Input::Prepared { generation, ms });
                }
                let input = Input::Spawned {
                    generation,
                    pid: worker.pid,
                    worker: worker.addr.to_string(),
                };
                let upstream = Arc::new(Upstream::new(generation, worker.pid, worker.addr.clone()));
                self.hold_worker(
                    generation,
                    Held {
                        worker,
                        upstream,
                        tasks: Vec::new(),
                    },
                );
                self.feed(input);
            }
            Report::Spawned {
                generation,
                result: Err(error),
                release,
                ..
            } => {
                self.remember(release);
                self.feed(Input::SpawnFailed {
                    generation,
                    error: chain(&error),
                });
            }
        }
    }

    /// Keeps `release` in the service's history, the oldest going past [`crate::release::KEPT`].
    fn remember(&mut self, release: Option<Release>) {
        let Some(release) = release else { return };
        self.releases.retain(|r| r.generation != release.generation);
        self.releases.push_back(release);
        while self.releases.len() > crate::release::KEPT {
            self.releases.pop_front();
        }
    }

    /// Rolls back: to the warm previous worker during the watchdog window (unless `to` names a generation),
    /// else by starting an earlier release again, `to`'s or the last one that served before the active
    /// worker's, once its files are checked to be as they were.
    fn rollback(&mut self, to: Option<u64>, reply: oneshot::Sender<Result<UpgradeRecord, ActionError>>) {
        if to.is_none() && self.machine.watch.is_some() {
            let reply = self.hold(Reply::Rollback(reply));
            self.feed(Input::Rollback { reply });
            return;
        }
        let active = self.machine.active.as_ref().map(|a| a.generation);
        let target = match to {
            Some(to) => self.releases.iter().find(|r| r.generation == to),
            None => self
                .releases
                .iter()
                .rev()
                .filter(|r| Some(r.generation) < active)
                .find(|r| r.outcome == Some(UpgradeResult::Success)),
        };
        let name = &self.config.name;
        let refused = match target {
            None => Some(match to {
                Some(to) => format!("service `{name}`: no release of generation {to} is recorded"),
                None => format!(
                    "service `{name}`: nothing to roll back to: no previous worker is kept warm and no earlier release \
                     that served is recorded"
                ),
            }),
            Some(release) if Some(release.generation) == active => Some(format!(
                "service `{name}`: generation {} is the one serving",
                release.generation
            )),
            Some(release) => release.verify().err().map(|why| {
                format!(
                    "service `{name}`: cannot start generation {}'s release again: {why}",
                    release.generation
                )
            }),
        };
        if let Some(why) = refused {
            let _ = reply.send(Err(ActionError::Conflict(why)));
            return;
        }
        let from = target.map(|r| r.generation).unwrap_or_default();
        let waiter = self.hold(Reply::Rollback(reply));
        self.feed(Input::Redeploy { from, waiter });
    }

    /// Steps the machine with `input` and carries out what it asks, feeding back what that yields; then
    /// publishes the service's state, the one place it is written. Whoever waits for an outcome is told
    /// only after that, so that what they read next (`/status`) already shows it.
    fn feed(&mut self, input: Input) {
        let mut inputs = VecDeque::from([input]);
        // The maintenance window as it stands now goes first, when the machine does not see it so yet.
        let window = self.window_facts();
        let moved = |a: Time, b: Time| a.since(b).max(b.since(a)) > std::time::Duration::from_secs(1);
        let seen = match (window, self.machine.window) {
            (Some(now), Some(was)) => now.open == was.open && !moved(now.changes, was.changes),
            (now, was) => now.is_none() && was.is_none(),
        };
        if !seen {
            inputs.push_front(Input::Window(window));
        }
        let mut answers = Vec::new();
        while let Some(input) = inputs.pop_front() {
            for effect in self.machine.step(input, Time::now()) {
                match effect {
                    Effect::Reply { .. } | Effect::Abandon { .. } | Effect::Started(_) => answers.push(effect),
                    effect => inputs.extend(self.perform(effect)),
                }
            }
        }
        self.publish();
        for answer in answers {
            self.perform(answer);
        }
    }

    fn perform(&mut self, effect: Effect) -> Option<Input> {
        match effect {
            Effect::Spawn { generation } => {
                let config = Arc::clone(&self.config);
                let context = self.context.clone();
                // A rollback past the watchdog window starts an earlier release again; otherwise the
                // configured command, its paths resolved now.
                let from = self
                    .machine
                    .candidate
                    .as_ref()
                    .filter(|c| c.generation == generation)
                    .and_then(|c| c.release);
                let earlier = from.map(|from| self.releases.iter().find(|r| r.generation == from).cloned());
                self.tasks.spawn(async move {
                    let release = match earlier {
                        Some(Some(earlier)) => {
                            let again = earlier.again(generation);
                            let checked = earlier.clone();
                            match tokio::task::spawn_blocking(move || checked.verify()).await {
                                Ok(Ok(())) => again,
                                Ok(Err(why)) => return Report::spawned(generation, Err(SpawnError::Release(why))),
                                Err(e) => return Report::spawned(generation, Err(SpawnError::Release(e.to_string()))),
                            }
                        }
                        Some(None) => {
                            let why = format!("generation {}'s release is no longer recorded", from.unwrap_or(0));
                            return Report::spawned(generation, Err(SpawnError::Release(why)));
                        }
                        None => {
                            let resolving = Arc::clone(&config);
                            match tokio::task::spawn_blocking(move || Release::resolve(&resolving, generation)).await {
                                Ok(release) => release,
                                Err(e) => return Report::spawned(generation, Err(SpawnError::Release(e.to_string()))),
                            }
                        }
                    };
                    let config = release.apply(&config);
                    let mut prepared = None;
                    if !config.prepare.is_empty() {
                        let started = Time::now();
                        if let Err(error) = crate::worker::prepare(&config, generation, &context.spawner).await {
                            return Report::Spawned {
                                generation,
                                result: Err(error),
                                prepared,
                                release: Some(release),
                            };
                        }
                        prepared = Some(crate::control::millis(Time::now().since(started)));
                    }
                    let result = Worker::spawn(&config, generation, &context.spawner, context.runtime_dir.path()).await;
                    Report::Spawned {
                        generation,
                        result,
                        prepared,
                        release: Some(release),
                    }
                });
            }
            Effect::WaitReady { generation, deadline } => {
                let readiness = self.config.readiness.clone();
                let proxy = self.config.proxy_protocol;
                self.watch(generation, |held| {
                    let addr = held.worker.addr.clone();
                    async move {
                        match wait_ready(&addr, &readiness, proxy, deadline.instant()).await {
                            Ok(()) => Input::Ready { generation },
                            Err(error) => Input::NotReady {
                                generation,
                                error: chain(&error),
                            },
                        }
                    }
                });
            }
            Effect::Route => self.store_route(),
            Effect::Accept => {
                for listener in std::mem::take(&mut self.pending_listeners) {
                    self.accept_on(listener);
                }
            }
            Effect::StopAccepting => {
                self.listeners.clear();
                self.pending_listeners.clear();
            }
            Effect::Probe { generation } => {
                let path = self.config.readiness.path.clone();
                let timeout = self.config.health.timeout;
                let proxy = self.config.proxy_protocol;
                self.watch(generation, |held| {
                    let addr = held.worker.addr.clone();
                    async move {
                        let probed = tokio::time::timeout(timeout, probe(&addr, path.as_deref(), proxy)).await;
                        let ok = matches!(probed, Ok(Ok(())));
                        Input::Probed { generation, ok }
                    }
                });
            }
            Effect::Drain { generation, settle } => {
                if let Some(held) = self.workers.get(&generation) {
                    held.upstream.begin_drain();
                }
                self.watch(generation, |held| {
                    let upstream = Arc::clone(&held.upstream);
                    async move {
                        upstream.closed().await;
                        Input::Closed { generation }
                    }
                });
                if settle {
                    // No connection may pick this worker once it has been told to stop, and every
                    // connection that picked it must be in its hands, not in its listen queue.
                    self.watch(generation, |held| {
                        let upstream = Arc::clone(&held.upstream);
                        async move {
                            upstream.settled().await;
                            Input::Settled { generation }
                        }
                    });
                }
            }
            Effect::Cut { generation } => {
                let held = self.workers.get(&generation)?;
                let connections = held.upstream.connections();
                held.upstream.cut_now();
                return Some(Input::Cut {
                    generation,
                    connections,
                });
            }
            Effect::Stop { generation, signal } => {
                if let Some(held) = self.workers.get(&generation) {
                    held.worker.begin_stop(signal);
                }
            }
            Effect::Kill { generation } => {
                if let Some(held) = self.workers.get(&generation) {
                    held.worker.signal(Signal::SIGKILL);
                }
            }
            Effect::Discard { generation } => {
                if let Some(held) = self.let_go(generation) {
                    self.dying.spawn(held.worker.kill());
                }
            }
            Effect::Forget { generation } => {
                if let Some(held) = self.let_go(generation) {
                    held.worker.forget();
                }
                if let Some(release) = self.releases.iter_mut().find(|r| r.generation == generation) {
                    release.ended.get_or_insert_with(crate::control::unix_now);
                }
            }
            Effect::Reply { waiter, outcome } => match self.replies.remove(&waiter) {
                Some(Reply::Upgrade(reply)) => {
                    if let Ok(record) = outcome {
                        let _ = reply.send(record);
                    }
                }
                Some(Reply::Rollback(reply)) => {
                    let _ = reply.send(outcome);
                }
                None => {}
            },
            Effect::Abandon { waiters } => {
                for waiter in waiters {
                    self.replies.remove(&waiter);
                }
            }
            Effect::Started(result) => {
                if let Some(started) = self.started.take() {
                    let _ = started.send(result);
                }
            }
            Effect::Count(count) => self.count(count),
            Effect::Judge { new, previous } => {
                let tally = |generation| {
                    let (connections, failed) = self.upstream(generation).map_or((0, 0), |u| u.tally());
                    crate::lifecycle::Tally { connections, failed }
                };
                let (new, previous) = (tally(new), tally(previous));
                if let Some(base) = self.machine.watch.as_ref().and_then(|w| w.canary.as_ref()?.baseline) {
                    let since = |t: crate::lifecycle::Tally, b: crate::lifecycle::Tally| {
                        (
                            t.connections.saturating_sub(b.connections),
                            t.failed.saturating_sub(b.failed),
                        )
                    };
                    self.context
                        .metrics
                        .canary_tallies(&self.config.name, since(new, base.0), since(previous, base.1));
                }
                return Some(Input::Judged { new, previous });
            }
            Effect::Event(event) => {
                if let Event::UpgradeFinished(record) = &event {
                    if let Some(release) = self.releases.iter_mut().find(|r| r.generation == record.new_generation) {
                        release.outcome = Some(record.result);
                    }
                }
                self.emit(event);
            }
        }
        None
    }

    /// Runs `task` for worker `generation`, as long as the worker is held; its output goes to the machine.
    fn watch<F>(&mut self, generation: u64, task: impl FnOnce(&Held) -> F)
    where
        F: Future<Output = Input> + Send + 'static,
    {
        let Some(held) = self.workers.get_mut(&generation) else {
            return;
        };
        let task = task(held);
        held.tasks
            .push(self.tasks.spawn(async move { Report::Input(task.await) }));
    }

    /// Takes worker `generation` out of the driver's hands, with every task about it stopped.
    fn let_go(&mut self, generation: u64) -> Option<Held> {
        let held = self.workers.remove(&generation)?;
        for task in &held.tasks {
            task.abort();
        }
        Some(held)
    }

    fn count(&self, count: Count) {
        let (metrics, name) = (&self.context.metrics, &self.config.name);
        match count {
            Count::Restart(trigger) => metrics.restart(name, trigger.label()),
            Count::Ready(took) => metrics.worker_ready(name, took),
            Count::Upgrade(trigger, result) => metrics.upgrade_finished(name, trigger.label(), result.label()),
            Count::Health(true) => self.shared.metrics.health_ok.inc(),
            Count::Health(false) => self.shared.metrics.health_failed.inc(),
            Count::Drained(took) => metrics.drained(name, took),
        }
    }

    /// Logs `event` and publishes it on the event bus, with the live connection count where it has one.
    fn emit(&self, event: Event) {
        let connections = match &event {
            Event::DrainStarted { generation, .. } | Event::DrainProgress { generation, .. } => {
                self.workers.get(generation).map(|h| h.upstream.connections())
            }
            _ => None,
        };
        self.log(&event, connections.unwrap_or(0));
        let Ok(serde_json::Value::Object(mut fields)) = serde_json::to_value(&event) else {
            return;
        };
        let kind = fields.remove("event");
        if let Some(connections) = connections {
            fields.insert("connections".into(), connections.into());
        }
        let kind = kind.as_ref().and_then(|k| k.as_str()).unwrap_or_default();
        self.context
            .events
            .emit(&self.config.name, kind, serde_json::Value::Object(fields));
    }

    /// Logs `event`; `connections` is the live count of the draining worker it is about, if any.
    fn log(&self, event: &Event, connections: usize) {
        let name = &self.config.name;
        match event {
            Event::UpgradeStarted { generation, trigger } => {
                tracing::info!(service = %name, generation, trigger = trigger.label(), "upgrade started");
            }
            Event::CanaryStep {
                generation,
                step,
                share,
                new,
                previous,
            } => tracing::info!(
                service = %name, generation, step, share_percent = f64::from(*share) / 100.0,
                new_connections = new.connections, new_failed = new.failed,
                previous_connections = previous.connections, previous_failed = previous.failed,
                "canary step"
            ),
            Event::CanaryProgress {
                generation,
                share,
                new,
                previous,
            } => tracing::debug!(
                service = %name, generation, share_percent = f64::from(*share) / 100.0,
                new_connections = new.connections, new_failed = new.failed,
                previous_connections = previous.connections, previous_failed = previous.failed,
                "canary progress"
            ),
            Event::Deferred { trigger, until_ms } => tracing::info!(
                service = %name, trigger = trigger.label(), until_ms,
                "upgrade deferred until the maintenance window opens"
            ),
            Event::UpgradeWaiting {
                draining,
                max_draining,
                until_ms,
                ..
            } => tracing::info!(
                service = %name, ?draining, max_draining, until_ms,
                "upgrade waits for a drain slot"
            ),
            Event::Switched {
                generation,
                pid,
                old_generation,
            } => {
                tracing::info!(service = %name, generation, pid, old_generation = ?old_generation, "worker ready: switched")
            }
            Event::RolledBack {
                generation,
                restored_generation,
                error,
                ..
            } => tracing::error!(service = %name, generation, restored = restored_generation, "{error}"),
            Event::UpgradeFinished(record) => {
                if let (UpgradeResult::Failed, Some(error)) = (record.result, &record.error) {
                    tracing::error!(service = %name, generation = record.new_generation, "{error}");
                }
            }
            Event::Healthy { generation } => tracing::info!(service = %name, generation, "worker healthy again"),
            Event::Unhealthy { generation, failures } => {
                tracing::warn!(service = %name, generation, failures, "worker unhealthy");
            }
            Event::RestartScheduled { in_ms, reason } => {
                tracing::warn!(service = %name, wait_ms = in_ms, reason = reason.label(), "replacing the worker");
            }
            Event::DrainStarted { generation, pid, .. } => {
                tracing::info!(service = %name, generation, pid, connections, policy = ?self.config.drain_policy, "draining");
            }
            Event::DrainCut { generation, pid, cut } => {
                tracing::warn!(service = %name, generation, pid, cut, "drain timeout: closed the connections left");
            }
            Event::StopTimeout {
                generation,
                pid,
                signal,
                stop_timeout_ms,
            } => tracing::warn!(
                service = %name, generation, pid, timeout_ms = stop_timeout_ms,
                "worker ignored {signal}: sending SIGKILL"
            ),
            Event::WorkerStopped {
                generation,
                pid,
                status,
                drain_ms,
                ..
            } => tracing::info!(service = %name, generation, pid, drain_ms, status = %status, "old worker stopped"),
            Event::Spawned { .. }
            | Event::Ready { .. }
            | Event::Watching { .. }
            | Event::WorkerExited { .. }
            | Event::DrainProgress { .. } => {}
        }
    }

    fn reconfigure(&mut self, config: Arc<ServiceConfig>, listeners: Vec<Arc<Listener>>) {
        self.config = config;
        // Keep the accept loops of sockets still configured and start the new ones; the rest stop when `old`
        // drops.
        let mut old = std::mem::take(&mut self.listeners);
        self.pending_listeners.clear();
        for listener in listeners {
            if let Some(i) = old.iter().position(|(l, _)| Arc::ptr_eq(l, &listener)) {
                self.listeners.push(old.swap_remove(i));
            } else if self.machine.accepting {
                self.accept_on(listener);
            } else {
                self.pending_listeners.push(listener);
            }
        }
        drop(old);
        self.watch_release();
        self.feed(Input::Reconfigure(Policy::of(&self.config)));
    }

    /// Whether the service's maintenance window is open now, and when that changes, on the machine's clock;
    /// `None` without a window.
    fn window_facts(&self) -> Option<WindowFacts> {
        let window = self.config.upgrade_window?;
        let local = jiff::ZonedDateTime::now();
        let seen = window.at(&local);
        let until = seen.changes.timestamp().duration_since(local.timestamp());
        let until = std::time::Duration::try_from(until).unwrap_or_default();
        // Looked at again a moment after the change, so that the clock has surely passed it.
        Some(WindowFacts {
            open: seen.open,
            changes: Time::now() + until + std::time::Duration::from_millis(1),
        })
    }

    /// Watches the configured `watch` paths, unless they are watched already (or there are none).
    fn watch_release(&mut self) {
        let paths = &self.config.watch;
        if self.release_watch.as_ref().is_some_and(|(watched, _)| watched == paths) {
            return;
        }
        self.release_watch = (!paths.is_empty()).then(|| {
            let task = tokio::spawn(crate::release::watch(paths.clone(), self.changes.0.clone()));
            (paths.clone(), AbortOnDropHandle::new(task))
        });
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

    fn upstream(&self, generation: u64) -> Option<Arc<Upstream>> {
        self.workers.get(&generation).map(|h| Arc::clone(&h.upstream))
    }

    /// Publishes a new route snapshot and wakes the connections waiting for one.
    fn store_route(&self) {
        let active = self.machine.active.as_ref().filter(|a| a.exited.is_none());
        // During a canary, the previous worker takes the share the new one does not.
        let split = self.machine.watch.as_ref().and_then(|watch| {
            let canary = watch.canary.as_ref()?;
            Some(crate::route::Split {
                previous: self.upstream(watch.previous.generation)?,
                share: canary.share,
                sticky: self.config.canary.as_ref().is_none_or(|c| c.sticky),
            })
        });
        self.context
            .metrics
            .canary_share(&self.config.name, split.as_ref().map_or(0, |s| s.share));
        self.route.store(Arc::new(Route {
            upstream: active.and_then(|a| self.upstream(a.generation)),
            split,
            hold: !self.machine.shutting_down,
            settings: Settings::of(&self.config),
            shared: Arc::clone(&self.shared),
        }));
        self.shared.changed.notify_waiters();
    }

    /// Publishes the service's state as the machine has it.
    fn publish(&self) {
        let machine = &self.machine;
        let active = machine.active.as_ref();
        self.state.send_modify(|s| {
            s.phase = machine.phase();
            s.active = active.and_then(|a| self.upstream(a.generation));
            s.healthy = active.is_some_and(|a| a.healthy);
            s.previous = machine
                .watch
                .as_ref()
                .and_then(|w| self.upstream(w.previous.generation));
            s.draining = machine
                .draining
                .iter()
                .filter_map(|d| self.upstream(d.generation))
                .collect();
            s.restart_at = machine.restart.map(|r| r.at.instant());
            s.active_since = active.map(|a| a.since.instant());
            s.waiting = machine
                .follow_up
                .as_ref()
                .and_then(|f| f.waiting_since)
                .map(|since| Waiting {
                    since: since.instant(),
                    draining: machine.live_draining().map(|d| d.generation).collect(),
                    max_draining: machine.policy.max_draining,
                });
            s.last_upgrade.clone_from(&machine.last_upgrade);
            s.deferred = machine
                .deferred
                .map(|trigger| (trigger, machine.window.map(|w| w.changes.instant())));
            s.canary = machine.watch.as_ref().and_then(|watch| {
                let canary = watch.canary.as_ref()?;
                Some(crate::control::CanaryView {
                    generation: watch.record.new_generation,
                    step: canary.step,
                    share_percent: f64::from(canary.share) / 100.0,
                    next_step_in_ms: crate::control::millis(Time::now().until(canary.step_until)),
                    new: canary.seen.0,
                    previous: canary.seen.1,
                })
            });
            s.listen = self
                .listeners
                .iter()
                .map(|(l, _)| l.local)
                .chain(self.pending_listeners.iter().map(|l| l.local))
                .collect();
        });
    }
}
