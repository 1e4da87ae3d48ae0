//! One service's lifecycle as a state machine with no I/O: [`Machine::step`] takes an [`Input`] and the
//! time, changes plain data, and returns the [`Effect`]s a driver (`service.rs`) must carry out.
//!
//! The machine never sleeps, spawns, signals or reads a socket, and it holds no handle of any kind: workers
//! are named by generation, callers waiting for an outcome by a [`WaiterId`]. Its deadlines are
//! [`Time`]s, and [`Machine::next_deadline`] tells the driver when to step it again ([`Input::Tick`]).
//! All of it serialises, so a service can be written out where it stands and read back.
//!
//! The steps of an upgrade: the follow-up (every request, coalesced) starts once no upgrade is in flight and
//! no watchdog window is open, and once a drain slot is free: with `max_draining` old workers alive and
//! draining, it waits for one of them to stop instead of cutting anyone's connections. Then: spawn the
//! next generation ([`Effect::Spawn`]), wait until it is ready ([`Effect::WaitReady`]), switch the route
//! ([`Effect::Route`]), watch it for `watchdog` while the previous worker stays warm (a failed health
//! check, an exit or an operator's rollback switches back), then drain the previous worker: no new
//! connections; once its last one closes, or at `drain_timeout` (then the rest are cut), it is told to
//! stop, killed after `stop_timeout`, and forgotten once reaped.

use std::time::Duration;

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::clock::Time;
use crate::config::{DrainPolicy, ServiceConfig};
use crate::control::{ActionError, Phase, PhaseTimes, Trigger, UpgradeRecord, UpgradeResult, millis, unix_now};

/// The first wait before replacing a worker that died or turned unhealthy.
pub const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// How long a worker past its `max_lifetime` serves on after an upgrade to replace it failed, before the
/// next try.
pub const RECYCLE_RETRY: Duration = Duration::from_secs(60);
/// The longest wait between two restarts.
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How long a worker must run before a crash restarts it after [`RESTART_BACKOFF_MIN`] again.
pub const RESTART_STABLE_AFTER: Duration = Duration::from_secs(30);
/// How often a draining worker's progress is reported.
pub const DRAIN_PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Names a caller waiting for the outcome of an upgrade or a rollback; the driver keeps the reply channel.
pub type WaiterId = u64;

/// The settings of a service that its lifecycle decides with, copied from its configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// How long the previous worker is kept warm after a switch; zero drains it at once.
    pub watchdog: Duration,
    /// How long a new worker may take to become ready.
    pub readiness_timeout: Duration,
    /// How long old connections may finish before they are cut.
    pub drain_timeout: Duration,
    /// Whether a draining worker is told to stop at the start of its drain rather than at its end.
    pub signal_first: bool,
    /// The signal that asks a worker to stop.
    #[serde(with = "signal_name")]
    pub stop_signal: Signal,
    /// How long a worker may take to stop before it is killed.
    pub stop_timeout: Duration,
    /// Old workers that may drain at once.
    pub max_draining: u32,
    /// Time between health probes of the active worker.
    pub health_interval: Duration,
    /// Consecutive failed probes that make the worker unhealthy.
    pub health_failures: u32,
    /// Consecutive good probes that make it healthy again.
    pub health_successes: u32,
    /// How long a watched path must stay unchanged before its change upgrades the service.
    #[serde(default)]
    pub watch_settle: Duration,
    /// How long a worker serves before it is replaced (plus up to a tenth of it, per generation); none
    /// when unset.
    #[serde(default)]
    pub max_lifetime: Option<Duration>,
    /// How a new worker takes the traffic step by step, judged on it; at once when unset.
    #[serde(default)]
    pub canary: Option<crate::config::Canary>,
}

impl Policy {
    /// The policy of `config`.
    pub fn of(config: &ServiceConfig) -> Policy {
        Policy {
            watchdog: config.watchdog,
            readiness_timeout: config.readiness.timeout,
            drain_timeout: config.drain_timeout,
            signal_first: config.drain_policy == DrainPolicy::Signal,
            stop_signal: config.stop_signal,
            stop_timeout: config.stop_timeout,
            max_draining: config.max_draining,
            health_interval: config.health.interval,
            health_failures: config.health.failures,
            health_successes: config.health.successes,
            watch_settle: config.watch_settle,
            max_lifetime: config.max_lifetime,
            canary: config.canary.clone(),
        }
    }

    /// When worker `generation` of `service`, serving since `since`, is due to be recycled: after
    /// `max_lifetime` and a jitter of up to a tenth of it, the same for the same service and generation,
    /// so that services started together do not recycle together.
    pub fn recycle_at(&self, service: &str, generation: u64, since: Time) -> Option<Time> {
        let lifetime = self.max_lifetime?;
        // FNV-1a of the name and generation: stable across runs and images, unlike std's hasher.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in service.bytes().chain(generation.to_le_bytes()) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        let tenth = lifetime.as_millis() / 10;
        let jitter = if tenth == 0 { 0 } else { u128::from(hash) % tenth };
        let jitter = Duration::from_millis(u64::try_from(jitter).unwrap_or(0));
        Some(since + lifetime + jitter)
    }
}

/// What happens to a service: a request, a result of an effect, or time passing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Start a new generation; `waiter` is told the outcome once the upgrade (with its watchdog window) ends.
    Upgrade {
        /// What asked for it.
        trigger: Trigger,
        /// Who waits for the record.
        waiter: Option<WaiterId>,
    },
    /// Switch back to the previous worker while it is warm; `reply` gets the record or why not.
    Rollback {
        /// Who waits for the answer.
        reply: WaiterId,
    },
    /// Start generation `from`'s release again as a new generation: a rollback once no previous worker is
    /// warm. `waiter` is told the outcome, or why it cannot start now.
    Redeploy {
        /// The generation whose release to run.
        from: u64,
        /// Who waits for the answer.
        waiter: WaiterId,
    },
    /// The service's configuration changed.
    Reconfigure(Policy),
    /// A watched path changed (a new release); the service upgrades once the paths have been still for
    /// `watch_settle`.
    Changed,
    /// The maintenance window as the driver sees it now (`None`: the service has none).
    Window(Option<WindowFacts>),
    /// Both workers' tallies, as asked for by [`Effect::Judge`].
    Judged {
        /// The new worker's.
        new: Tally,
        /// The previous worker's.
        previous: Tally,
    },
    /// Skip the rest of the canary: the new worker takes every new connection now.
    Promote {
        /// Who waits for the answer.
        reply: WaiterId,
    },
    /// The new generation's `prepare` command finished, in `ms` milliseconds; its spawn follows.
    Prepared {
        /// Its generation.
        generation: u64,
        /// How long the command took.
        ms: u64,
    },
    /// The new generation's process runs.
    Spawned {
        /// Its generation.
        generation: u64,
        /// Its process id.
        pid: u32,
        /// Its private address, as text.
        worker: String,
    },
    /// The new generation could not be started.
    SpawnFailed {
        /// Its generation.
        generation: u64,
        /// Why.
        error: String,
    },
    /// The new generation answered its readiness probe.
    Ready {
        /// Its generation.
        generation: u64,
    },
    /// The new generation did not answer in time.
    NotReady {
        /// Its generation.
        generation: u64,
        /// What the probes saw.
        error: String,
    },
    /// A health probe of the active worker ended.
    Probed {
        /// The generation probed.
        generation: u64,
        /// Whether it answered.
        ok: bool,
    },
    /// A worker exited and was reaped.
    Exited {
        /// Its generation.
        generation: u64,
        /// How it ended, as an operator reads it.
        status: String,
    },
    /// Every connection of a draining worker has had a byte from it: it holds them all.
    Settled {
        /// Its generation.
        generation: u64,
    },
    /// The last connection of a draining worker closed.
    Closed {
        /// Its generation.
        generation: u64,
    },
    /// The connections left to a draining worker were cut.
    Cut {
        /// Its generation.
        generation: u64,
        /// How many.
        connections: usize,
    },
    /// Time passed: deadlines up to now are due.
    Tick,
    /// Stop accepting, drain every worker and stop.
    Shutdown,
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Read both workers' tallies of a canary; answer with [`Input::Judged`].
    Judge {
        /// The new worker.
        new: u64,
        /// The previous worker.
        previous: u64,
    },
    /// Start a worker of this generation; answer with [`Input::Spawned`] or [`Input::SpawnFailed`].
    Spawn {
        /// Its generation.
        generation: u64,
    },
    /// Probe the new worker until it is ready or `deadline` passes; answer with [`Input::Ready`] or
    /// [`Input::NotReady`].
    WaitReady {
        /// Its generation.
        generation: u64,
        /// When to give up.
        deadline: Time,
    },
    /// Store the service's route: the active worker (if any), and whether connections wait for one.
    Route,
    /// Start accepting on the service's public sockets.
    Accept,
    /// Stop accepting.
    StopAccepting,
    /// Probe the active worker once; answer with [`Input::Probed`].
    Probe {
        /// Its generation.
        generation: u64,
    },
    /// Give this worker no new connection; answer with [`Input::Closed`] once it has none, and, if
    /// `settle`, with [`Input::Settled`] once it has answered every one.
    Drain {
        /// Its generation.
        generation: u64,
        /// Whether to report when it holds every connection.
        settle: bool,
    },
    /// Close this draining worker's remaining connections now; answer with [`Input::Cut`].
    Cut {
        /// Its generation.
        generation: u64,
    },
    /// Ask this worker to stop (its exit is expected from now on).
    Stop {
        /// Its generation.
        generation: u64,
        /// With this signal.
        signal: Signal,
    },
    /// Kill this worker with SIGKILL; its exit still comes as [`Input::Exited`].
    Kill {
        /// Its generation.
        generation: u64,
    },
    /// Kill this worker, reap it and forget it: no input about it will matter any more.
    Discard {
        /// Its generation.
        generation: u64,
    },
    /// This worker is gone and reaped: let go of everything that was its.
    Forget {
        /// Its generation.
        generation: u64,
    },
    /// Tell a waiter the outcome.
    Reply {
        /// Who.
        waiter: WaiterId,
        /// The record, or why there is none.
        outcome: Result<UpgradeRecord, ActionError>,
    },
    /// These waiters will get no outcome: baton stops.
    Abandon {
        /// Who.
        waiters: Vec<WaiterId>,
    },
    /// How the service's first upgrade went (told once).
    Started(Result<(), String>),
    /// Count something.
    Count(Count),
    /// Publish an event and log it.
    Event(Event),
}

/// A metric the driver updates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Count {
    /// A replacement of a dead or unhealthy worker starts.
    Restart(Trigger),
    /// A new worker became ready after this long.
    Ready(Duration),
    /// An upgrade ended.
    Upgrade(Trigger, UpgradeResult),
    /// A health probe ended.
    Health(bool),
    /// An old worker was drained and stopped after this long.
    Drained(Duration),
}

/// A lifecycle event; serialised with its name under `event`, the form `/v1/events` sends.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// An upgrade started.
    UpgradeStarted {
        /// The new generation.
        generation: u64,
        /// What set it off.
        trigger: Trigger,
    },
    /// A canary moved to its next step (share 10000: it is over, the new worker takes everything).
    CanaryStep {
        /// The new worker's generation.
        generation: u64,
        /// The step, from 0.
        step: usize,
        /// The new worker's share of new connections, in hundredths of a percent.
        share: u16,
        /// Connections of the new worker so far, and those that failed on its side.
        new: Tally,
        /// The same of the previous worker.
        previous: Tally,
    },
    /// A canary's counts so far, every second while it runs.
    CanaryProgress {
        /// The new worker's generation.
        generation: u64,
        /// The new worker's share of new connections, in hundredths of a percent.
        share: u16,
        /// Connections of the new worker since the canary began, and those that failed on its side.
        new: Tally,
        /// The same of the previous worker.
        previous: Tally,
    },
    /// An automatic upgrade waits for the maintenance window to open.
    Deferred {
        /// What set it off.
        trigger: Trigger,
        /// Milliseconds until the window opens.
        until_ms: u64,
    },
    /// An upgrade waits for a draining worker to finish.
    UpgradeWaiting {
        /// What set it off.
        trigger: Trigger,
        /// The generations draining.
        draining: Vec<u64>,
        /// The cap.
        max_draining: u32,
        /// Milliseconds until the first of them must be stopped (its drain and stop timeouts).
        until_ms: u64,
    },
    /// The new worker runs.
    Spawned {
        /// Its generation.
        generation: u64,
        /// Its process id.
        pid: u32,
        /// Its private address.
        worker: String,
    },
    /// The new worker is ready.
    Ready {
        /// Its generation.
        generation: u64,
        /// Its process id.
        pid: u32,
        /// From its spawn to ready.
        ready_ms: u64,
    },
    /// New connections go to the new worker.
    Switched {
        /// Its generation.
        generation: u64,
        /// Its process id.
        pid: u32,
        /// The generation before.
        old_generation: Option<u64>,
    },
    /// The watchdog window opened.
    Watching {
        /// The new generation.
        generation: u64,
        /// The generation kept warm.
        previous_generation: u64,
        /// The window.
        watchdog_ms: u64,
    },
    /// Traffic went back to the previous worker.
    RolledBack {
        /// The generation that failed.
        generation: u64,
        /// The generation serving again.
        restored_generation: u64,
        /// Why.
        reason: String,
        /// The whole message, for the log.
        #[serde(skip)]
        error: String,
    },
    /// An upgrade ended; the record carries how.
    UpgradeFinished(UpgradeRecord),
    /// The active worker passes its health checks again.
    Healthy {
        /// Its generation.
        generation: u64,
    },
    /// The active worker failed its health checks.
    Unhealthy {
        /// Its generation.
        generation: u64,
        /// Consecutive failures.
        failures: u32,
    },
    /// A serving worker exited on its own.
    WorkerExited {
        /// Its generation.
        generation: u64,
        /// Its process id.
        pid: u32,
        /// How it ended.
        status: String,
    },
    /// A dead or unhealthy worker will be replaced.
    RestartScheduled {
        /// After this long.
        in_ms: u64,
        /// Why.
        reason: Trigger,
    },
    /// An old worker takes no new connections.
    DrainStarted {
        /// Its generation.
        generation: u64,
        /// Its process id.
        pid: u32,
        /// Its deadline, from now.
        drain_timeout_ms: u64,
    },
    /// An old worker still drains.
    DrainProgress {
        /// Its generation.
        generation: u64,
        /// Milliseconds to its deadline.
        deadline_in_ms: u64,
    },
    /// The drain deadline passed: the connections left were cut.
    DrainCut {
        /// Its generation.
        generation: u64,
        /// Its process id.
        pid: u32,
        /// How many.
        cut: usize,
    },
    /// An old worker did not stop within `stop_timeout`: it is killed.
    StopTimeout {
        /// Its generation.
        generation: u64,
        /// Its process id.
        pid: u32,
        /// The signal it ignored.
        signal: String,
        /// The timeout.
        stop_timeout_ms: u64,
    },
    /// An old worker is gone.
    WorkerStopped {
        /// Its generation.
        generation: u64,
        /// Its process id.
        pid: u32,
        /// How it ended.
        status: String,
        /// Connections cut at the drain deadline.
        cut: usize,
        /// From the start of the drain to the reaping.
        drain_ms: u64,
    },
}

/// A worker that serves, or served: the active one, or the previous one kept warm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Serving {
    /// Its generation.
    pub generation: u64,
    /// Its process id.
    pub pid: u32,
    /// When it took the traffic.
    pub since: Time,
    /// Consecutive failed health probes.
    pub failures: u32,
    /// Consecutive good health probes.
    pub successes: u32,
    /// Whether it passes its health checks (false from `failures` failures until `successes` successes).
    pub healthy: bool,
    /// When the next health probe is due; `None` while one runs.
    pub next_probe: Option<Time>,
    /// How it exited, if it has.
    pub exited: Option<String>,
    /// When it is to be replaced for its age (`max_lifetime`), if it is.
    #[serde(default)]
    pub recycle_at: Option<Time>,
}

impl Serving {
    fn new(service: &str, generation: u64, pid: u32, now: Time, policy: &Policy) -> Serving {
        Serving {
            generation,
            pid,
            since: now,
            failures: 0,
            successes: 0,
            healthy: true,
            next_probe: Some(now + policy.health_interval),
            exited: None,
            recycle_at: policy.recycle_at(service, generation, now),
        }
    }
}

/// The new generation of an upgrade in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Candidate {
    /// Its generation.
    pub generation: u64,
    /// What set the upgrade off.
    pub trigger: Trigger,
    /// When the upgrade started.
    pub started: Time,
    /// Its process, once it runs.
    pub process: Option<Process>,
    /// Told the outcome.
    pub waiters: Vec<WaiterId>,
    /// How long its `prepare` command took, once it ran.
    #[serde(default)]
    pub prepare_ms: Option<u64>,
    /// The generation whose release it runs again, when it does ([`FollowUp::release`]).
    #[serde(default)]
    pub release: Option<u64>,
}

/// A candidate's running process, probed until it is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Process {
    /// Its process id.
    pub pid: u32,
    /// When it was spawned.
    pub spawned: Time,
    /// When it must be ready by.
    pub deadline: Time,
}

/// The watchdog window after a switch: the previous worker is kept warm so traffic can go back to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Watch {
    /// The worker kept warm.
    pub previous: Serving,
    /// When the window opened.
    pub since: Time,
    /// When it closes.
    pub until: Time,
    /// The upgrade being watched; its result is known when the window ends.
    pub record: UpgradeRecord,
    /// Told the outcome.
    pub waiters: Vec<WaiterId>,
    /// The canary, while the new worker takes only a share of new connections.
    #[serde(default)]
    pub canary: Option<CanaryProgress>,
}

/// A canary under way: the step it is at, and what live traffic has shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryProgress {
    /// The step, an index into the canary's steps.
    pub step: usize,
    /// The new worker's share of new connections now, in hundredths of a percent.
    pub share: u16,
    /// When this step ends.
    pub step_until: Time,
    /// When the live traffic is judged next.
    pub next_judgement: Time,
    /// Both workers' tallies when the canary began (new, previous): the rates count from there.
    pub baseline: Option<(Tally, Tally)>,
    /// Both workers' tallies since then, as last seen (new, previous).
    pub seen: (Tally, Tally),
    /// When the last [`Event::CanaryProgress`] was told.
    #[serde(default)]
    pub told: Option<Time>,
}

/// A worker's connections that ended, and those that ended badly on its side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tally {
    /// Connections (and dials) that ended.
    pub connections: u64,
    /// Those that failed on the worker's side.
    pub failed: u64,
}

impl Tally {
    fn since(self, earlier: Tally) -> Tally {
        Tally {
            connections: self.connections.saturating_sub(earlier.connections),
            failed: self.failed.saturating_sub(earlier.failed),
        }
    }

    /// The share that failed; 0 with none.
    pub fn rate(self) -> f64 {
        if self.connections == 0 {
            0.0
        } else {
            self.failed as f64 / self.connections as f64
        }
    }
}

/// How often a canary's live traffic is judged.
pub const CANARY_JUDGE_EVERY: Duration = Duration::from_millis(200);
/// How often a canary's counts are told ([`Event::CanaryProgress`]).
pub const CANARY_PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// An old worker finishing its connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Draining {
    /// Its generation.
    pub generation: u64,
    /// Its process id.
    pub pid: u32,
    /// When the drain started.
    pub since: Time,
    /// When the connections left are cut.
    pub deadline: Time,
    /// Where the drain stands.
    pub step: DrainStep,
    /// Whether it has been asked to stop.
    pub signalled: bool,
    /// The signal that asks it to stop.
    #[serde(with = "signal_name")]
    pub stop_signal: Signal,
    /// How long it may take to stop.
    pub stop_timeout: Duration,
    /// When progress is next reported.
    pub next_progress: Time,
    /// Connections cut at the deadline.
    pub cut: usize,
    /// How it exited, if it has.
    pub exited: Option<String>,
}

/// The steps of a drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DrainStep {
    /// `drain_policy = "signal"`: waiting until the worker holds every connection, so that signalling it
    /// resets nothing still in its listen queue.
    Settling,
    /// Waiting for the connections to close.
    Closing,
    /// Told to stop; killed at `kill_at`.
    Stopping {
        /// When SIGKILL follows.
        kill_at: Time,
    },
    /// Killed; waiting to reap it.
    Killed,
}

/// Upgrade requests not yet started, folded into one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FollowUp {
    /// What asked for it last.
    pub trigger: Trigger,
    /// Told the outcome.
    pub waiters: Vec<WaiterId>,
    /// Since when it waits for a drain slot, if it does.
    pub waiting_since: Option<Time>,
    /// The generation whose release it starts again, for a rollback past the watchdog window; the
    /// configured command otherwise.
    #[serde(default)]
    pub release: Option<u64>,
}

/// A replacement of a dead or unhealthy worker, due at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Restart {
    /// When.
    pub at: Time,
    /// Why.
    pub trigger: Trigger,
}

/// One service's lifecycle: everything it decides with, as plain data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    /// The service's name.
    pub service: String,
    /// Its settings.
    pub policy: Policy,
    /// The last generation started.
    pub last_generation: u64,
    /// The worker new connections go to; `None` while there is none alive.
    pub active: Option<Serving>,
    /// The upgrade in flight, up to a ready worker.
    pub candidate: Option<Candidate>,
    /// The watchdog window of the last switch, if it is open.
    pub watch: Option<Watch>,
    /// Old workers finishing their connections, oldest first.
    pub draining: Vec<Draining>,
    /// Requests to run once the upgrade in flight (and its window) is over.
    pub follow_up: Option<FollowUp>,
    /// The replacement of a dead or unhealthy worker, when one is due.
    pub restart: Option<Restart>,
    /// The wait before the next replacement.
    pub backoff: Duration,
    /// Whether the service accepts connections (it has had a ready worker).
    pub accepting: bool,
    /// Whether the first upgrade's outcome has still to be told.
    pub starting: bool,
    /// Whether the service stops.
    pub shutting_down: bool,
    /// The last finished upgrade.
    pub last_upgrade: Option<UpgradeRecord>,
    /// When a change of a watched path upgrades the service, once the paths have settled.
    #[serde(default)]
    pub changed: Option<Time>,
    /// The maintenance window, as last seen (`None`: no window, automatic upgrades run at once).
    #[serde(default)]
    pub window: Option<WindowFacts>,
    /// An automatic upgrade (a changed release, a recycle) that came while the window was closed: it runs
    /// when the window opens.
    #[serde(default)]
    pub deferred: Option<Trigger>,
}

/// Whether a service's maintenance window is open, and when that changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowFacts {
    /// Whether it is open.
    pub open: bool,
    /// When it closes, or opens.
    pub changes: Time,
}

impl Machine {
    /// A service with no worker yet; its first [`Input::Upgrade`] starts one.
    pub fn new(service: String, policy: Policy) -> Machine {
        Machine {
            service,
            policy,
            last_generation: 0,
            active: None,
            candidate: None,
            watch: None,
            draining: Vec::new(),
            follow_up: None,
            restart: None,
            backoff: RESTART_BACKOFF_MIN,
            accepting: false,
            starting: true,
            shutting_down: false,
            last_upgrade: None,
            changed: None,
            window: None,
            deferred: None,
        }
    }

    /// Applies `input` at `now`, then whatever is due by `now`; returns what the driver must do, in order.
    pub fn step(&mut self, input: Input, now: Time) -> Vec<Effect> {
        let mut out = Vec::new();
        self.apply(input, now, &mut out);
        self.advance(now, &mut out);
        out
    }

    /// What keeps this machine from being handed over now: an upgrade or a replacement in flight, whose
    /// spawn or readiness wait belongs to the driver of this image. `None` when it can be.
    pub fn busy(&self) -> Option<String> {
        if let Some(candidate) = &self.candidate {
            return Some(format!("generation {} is starting", candidate.generation));
        }
        if self.restart.is_some() || self.active.as_ref().is_some_and(|a| a.exited.is_some()) {
            // Connections wait for the replacement, and could not park before it is up.
            return Some("its worker is being replaced".into());
        }
        // A canary is data to the last tally, and lasts minutes: a re-exec carries it on where it is. The
        // watchdog window after it (or after a switch without one) is waited for.
        self.watch
            .as_ref()
            .filter(|watch| watch.canary.is_none())
            .map(|watch| format!("generation {} is in its watchdog window", watch.record.new_generation))
    }

    /// Taken over by a new driver (a new image of baton, after a re-exec), at `now`: the waits this state is
    /// in are set up again, and what only the old driver could answer is dropped. Returns the effects that
    /// re-establish them: the route, each live drain's watch, a probe that was in flight, accepting.
    pub fn adopted(&mut self, now: Time) -> Vec<Effect> {
        // The callers waiting for an outcome were the old image's; they are gone with it.
        if let Some(candidate) = &mut self.candidate {
            candidate.waiters.clear();
        }
        if let Some(watch) = &mut self.watch {
            watch.waiters.clear();
        }
        if let Some(follow_up) = &mut self.follow_up {
            follow_up.waiters.clear();
        }
        let mut out = vec![Effect::Route];
        if let Some(candidate) = &self.candidate {
            out.push(match candidate.process {
                Some(process) => Effect::WaitReady {
                    generation: candidate.generation,
                    deadline: process.deadline,
                },
                // The spawn was the old driver's: start the generation again.
                None => Effect::Spawn {
                    generation: candidate.generation,
                },
            });
        }
        // A worker that has exited may still hold connections, whose end ends its drain.
        for drain in &self.draining {
            match drain.step {
                DrainStep::Settling | DrainStep::Closing => out.push(Effect::Drain {
                    generation: drain.generation,
                    settle: drain.step == DrainStep::Settling,
                }),
                // Waiting for the exit, which the new driver watches anyway.
                DrainStep::Stopping { .. } | DrainStep::Killed => {}
            }
        }
        if let Some(active) = self.active.as_mut().filter(|a| a.exited.is_none()) {
            // A probe was running: it ran in the old image, so one is due now.
            active.next_probe.get_or_insert(now);
        }
        if self.accepting {
            out.push(Effect::Accept);
        }
        out
    }

    /// When the machine must next be stepped (with [`Input::Tick`]) if nothing else happens.
    pub fn next_deadline(&self) -> Option<Time> {
        let mut next: Option<Time> = None;
        let mut at = |t: Time| next = Some(next.map_or(t, |n| n.min(t)));
        if let Some(watch) = &self.watch {
            at(watch.until);
        }
        if let Some(restart) = &self.restart {
            at(restart.at);
        }
        if let Some(changed) = self.changed {
            at(changed);
        }
        if let Some(window) = self.window {
            at(window.changes);
        }
        if let Some(canary) = self.watch.as_ref().and_then(|w| w.canary.as_ref()) {
            at(canary.step_until);
            at(canary.next_judgement);
        }
        if let Some(recycle) = self.active.as_ref().and_then(|a| a.recycle_at) {
            at(recycle);
        }
        if let Some(probe) = self.active.as_ref().and_then(|a| a.next_probe) {
            at(probe);
        }
        for drain in &self.draining {
            match drain.step {
                DrainStep::Settling | DrainStep::Closing => {
                    at(drain.deadline);
                    at(drain.next_progress);
                }
                DrainStep::Stopping { kill_at } => at(kill_at),
                DrainStep::Killed => {}
            }
        }
        next
    }

    /// The step the service is in; the one value `/status` and the metrics show.
    pub fn phase(&self) -> Phase {
        if self.shutting_down {
            return if self.is_stopped() {
                Phase::Stopped
            } else {
                Phase::ShuttingDown
            };
        }
        match (&self.candidate, &self.watch, &self.follow_up) {
            (Some(candidate), _, _) if candidate.process.is_some() => Phase::WaitingReady,
            (Some(_), _, _) => Phase::Spawning,
            (None, Some(watch), _) if watch.canary.is_some() => Phase::Canary,
            (None, Some(_), _) => Phase::Watching,
            (None, None, Some(follow_up)) if follow_up.waiting_since.is_some() => Phase::WaitingForDrain,
            _ => Phase::Idle,
        }
    }

    /// Whether a shut-down service has nothing left to stop.
    pub fn is_stopped(&self) -> bool {
        self.shutting_down && self.active.is_none() && self.watch.is_none() && self.draining.is_empty()
    }

    /// Old workers whose process still runs: what `max_draining` bounds.
    pub fn live_draining(&self) -> impl Iterator<Item = &Draining> {
        self.draining.iter().filter(|d| d.exited.is_none())
    }

    fn apply(&mut self, input: Input, now: Time, out: &mut Vec<Effect>) {
        match input {
            Input::Upgrade { trigger, waiter } => {
                if self.shutting_down {
                    out.push(Effect::Abandon {
                        waiters: waiter.into_iter().collect(),
                    });
                    return;
                }
                // An upgrade lasts until its watchdog window closes; requests meanwhile fold into one.
                let follow_up = self.follow_up.get_or_insert(FollowUp {
                    trigger,
                    waiters: Vec::new(),
                    waiting_since: None,
                    release: None,
                });
                follow_up.trigger = trigger;
                follow_up.release = None;
                follow_up.waiters.extend(waiter);
            }
            Input::Redeploy { from, waiter } => {
                if self.shutting_down || self.candidate.is_some() || self.watch.is_some() {
                    let why = if self.shutting_down {
                        "it is shutting down".to_owned()
                    } else {
                        "an upgrade is in flight: roll back once it is over".to_owned()
                    };
                    out.push(Effect::Reply {
                        waiter,
                        outcome: Err(ActionError::Conflict(format!(
                            "service `{}`: cannot start generation {from}'s release again: {why}",
                            self.service
                        ))),
                    });
                    return;
                }
                let follow_up = self.follow_up.get_or_insert(FollowUp {
                    trigger: Trigger::Rollback,
                    waiters: Vec::new(),
                    waiting_since: None,
                    release: None,
                });
                follow_up.trigger = Trigger::Rollback;
                follow_up.release = Some(from);
                follow_up.waiters.push(waiter);
            }
            Input::Rollback { reply } => {
                let outcome = match self.watch.take() {
                    Some(watch) => {
                        Ok(self.end_watch(watch, UpgradeResult::RolledBack, "rollback requested".into(), now, out))
                    }
                    None => Err(ActionError::Conflict(format!(
                        "service `{}`: nothing to roll back to: no previous worker is kept warm (the watchdog \
                         window is over, disabled, or no upgrade happened)",
                        self.service
                    ))),
                };
                out.push(Effect::Reply { waiter: reply, outcome });
            }
            Input::Reconfigure(policy) => {
                self.policy = policy;
                out.push(Effect::Route);
            }
            Input::Changed => {
                if !self.shutting_down {
                    self.changed = Some(now + self.policy.watch_settle);
                }
            }
            Input::Judged { new, previous } => self.judge(new, previous, now, out),
            Input::Promote { reply } => {
                let outcome = match self.watch.as_mut().filter(|w| w.canary.is_some()) {
                    Some(watch) => {
                        watch.canary = None;
                        watch.until = now + self.policy.watchdog;
                        let generation = watch.record.new_generation;
                        out.push(Effect::Route);
                        out.push(Effect::Event(Event::CanaryStep {
                            generation,
                            step: self.policy.canary.as_ref().map_or(0, |c| c.steps.len()),
                            share: 10_000,
                            new: Tally::default(),
                            previous: Tally::default(),
                        }));
                        Ok(watch.record.clone())
                    }
                    None => Err(ActionError::Conflict(format!(
                        "service `{}`: no canary is under way to promote",
                        self.service
                    ))),
                };
                out.push(Effect::Reply { waiter: reply, outcome });
            }
            Input::Window(facts) => {
                self.window = facts;
                if facts.is_none_or(|w| w.open) {
                    if let Some(trigger) = self.deferred.take() {
                        self.automatic(trigger, now, out);
                    }
                }
            }
            Input::Prepared { generation, ms } => {
                if let Some(candidate) = self.candidate.as_mut().filter(|c| c.generation == generation) {
                    candidate.prepare_ms = Some(ms);
                }
            }
            Input::Spawned {
                generation,
                pid,
                worker,
            } => {
                let Some(candidate) = self.candidate.as_mut().filter(|c| c.generation == generation) else {
                    out.push(Effect::Discard { generation });
                    return;
                };
                let deadline = now + self.policy.readiness_timeout;
                candidate.process = Some(Process {
                    pid,
                    spawned: now,
                    deadline,
                });
                out.push(Effect::Event(Event::Spawned {
                    generation,
                    pid,
                    worker,
                }));
                out.push(Effect::WaitReady { generation, deadline });
            }
            Input::SpawnFailed { generation, error } => {
                if self.candidate.as_ref().is_some_and(|c| c.generation == generation) {
                    self.fail_candidate(error, now, out);
                }
            }
            Input::Ready { generation } => {
                if self
                    .candidate
                    .as_ref()
                    .is_some_and(|c| c.generation == generation && c.process.is_some())
                {
                    self.switch(now, out);
                }
            }
            Input::NotReady { generation, error } => {
                if let Some(process) = self.candidate_process(generation) {
                    let error = format!("worker pid {}: {error}", process.pid);
                    self.fail_candidate(error, now, out);
                }
            }
            Input::Probed { generation, ok } => self.probed(generation, ok, now, out),
            Input::Exited { generation, status } => self.exited(generation, status, now, out),
            Input::Settled { generation } => {
                if let Some(i) = self.draining_index(generation) {
                    if self.draining[i].step == DrainStep::Settling {
                        self.signal_drain(i, out);
                        self.draining[i].step = DrainStep::Closing;
                    }
                }
            }
            Input::Closed { generation } => {
                if let Some(i) = self.draining_index(generation) {
                    if matches!(self.draining[i].step, DrainStep::Settling | DrainStep::Closing) {
                        self.stop_drained(i, now, out);
                    }
                }
            }
            Input::Cut {
                generation,
                connections,
            } => {
                if let Some(i) = self.draining_index(generation) {
                    let drain = &mut self.draining[i];
                    drain.cut = connections;
                    if connections > 0 {
                        out.push(Effect::Event(Event::DrainCut {
                            generation,
                            pid: drain.pid,
                            cut: connections,
                        }));
                    }
                }
            }
            Input::Tick => {}
            Input::Shutdown => self.shut_down(now, out),
        }
    }

    /// Carries out whatever is due by `now`, then starts the follow-up if it can.
    fn advance(&mut self, now: Time, out: &mut Vec<Effect>) {
        self.advance_canary(now, out);
        if self
            .watch
            .as_ref()
            .is_some_and(|w| w.until <= now && w.canary.is_none())
        {
            let watch = self.watch.take().expect("checked");
            self.end_watch(watch, UpgradeResult::Success, String::new(), now, out);
        }
        if let Some(restart) = self.restart.filter(|r| r.at <= now) {
            self.restart = None;
            // An upgrade in flight replaces the worker already; should it fail, the failure schedules the
            // next restart.
            if self.candidate.is_none() {
                out.push(Effect::Count(Count::Restart(restart.trigger)));
                self.apply(
                    Input::Upgrade {
                        trigger: restart.trigger,
                        waiter: None,
                    },
                    now,
                    out,
                );
            }
        }
        // A release that changed, once the paths have settled; a worker past its lifetime. Each is an
        // upgrade like any other: one asked for during another joins it.
        if self.changed.is_some_and(|at| at <= now) {
            self.changed = None;
            self.automatic(Trigger::Watch, now, out);
        }
        let recycle = self
            .active
            .as_ref()
            .and_then(|a| a.recycle_at)
            .is_some_and(|at| at <= now);
        if recycle && !self.shutting_down {
            // Looked at again after a while if this upgrade fails and the worker keeps serving.
            if let Some(active) = self.active.as_mut() {
                active.recycle_at = Some(now + RECYCLE_RETRY);
            }
            if self.candidate.is_none() && self.restart.is_none() {
                self.automatic(Trigger::Recycle, now, out);
            }
        }
        if let Some(active) = self.active.as_mut() {
            if active.next_probe.is_some_and(|at| at <= now) {
                active.next_probe = None;
                out.push(Effect::Probe {
                    generation: active.generation,
                });
            }
        }
        // Stopping a drain may end it (a worker that had exited already), so look each one up afresh.
        let generations: Vec<u64> = self.draining.iter().map(|d| d.generation).collect();
        for generation in generations {
            let Some(i) = self.draining_index(generation) else {
                continue;
            };
            let drain = &mut self.draining[i];
            match drain.step {
                DrainStep::Settling | DrainStep::Closing if drain.deadline <= now => {
                    out.push(Effect::Cut { generation });
                    self.stop_drained(i, now, out);
                }
                DrainStep::Settling | DrainStep::Closing if drain.next_progress <= now => {
                    drain.next_progress = drain.next_progress.max(now) + DRAIN_PROGRESS_EVERY;
                    out.push(Effect::Event(Event::DrainProgress {
                        generation,
                        deadline_in_ms: millis(now.until(drain.deadline)),
                    }));
                }
                DrainStep::Stopping { kill_at } if kill_at <= now => {
                    out.push(Effect::Event(Event::StopTimeout {
                        generation,
                        pid: drain.pid,
                        signal: drain.stop_signal.to_string(),
                        stop_timeout_ms: millis(drain.stop_timeout),
                    }));
                    out.push(Effect::Kill { generation });
                    drain.step = DrainStep::Killed;
                }
                _ => {}
            }
        }
        self.start_follow_up(now, out);
    }

    /// Starts the follow-up once no upgrade is in flight, no window is open and a drain slot is free.
    fn start_follow_up(&mut self, now: Time, out: &mut Vec<Effect>) {
        if self.candidate.is_some() || self.watch.is_some() || self.shutting_down {
            return;
        }
        let Some(follow_up) = self.follow_up.as_mut() else {
            return;
        };
        // The upgrade will make the active worker drain: past the cap it waits for a slot instead of
        // cutting anyone's connections. A dead worker holds no process and takes no slot.
        let alive = usize::from(self.active.as_ref().is_some_and(|a| a.exited.is_none()));
        // `live_draining`, spelled on the field: `follow_up` is borrowed mutably here.
        let live: Vec<&Draining> = self.draining.iter().filter(|d| d.exited.is_none()).collect();
        if alive > 0 && live.len() >= self.policy.max_draining as usize {
            if follow_up.waiting_since.is_none() {
                follow_up.waiting_since = Some(now);
                let until = live
                    .iter()
                    .map(|d| match d.step {
                        DrainStep::Settling | DrainStep::Closing => d.deadline + d.stop_timeout,
                        DrainStep::Stopping { kill_at } => kill_at,
                        DrainStep::Killed => now,
                    })
                    .min()
                    .unwrap_or(now);
                out.push(Effect::Event(Event::UpgradeWaiting {
                    trigger: follow_up.trigger,
                    draining: live.iter().map(|d| d.generation).collect(),
                    max_draining: self.policy.max_draining,
                    until_ms: millis(now.until(until)),
                }));
            }
            return;
        }
        let FollowUp {
            trigger,
            waiters,
            release,
            ..
        } = self.follow_up.take().expect("checked");
        self.last_generation += 1;
        let generation = self.last_generation;
        self.candidate = Some(Candidate {
            generation,
            trigger,
            started: now,
            process: None,
            waiters,
            prepare_ms: None,
            release,
        });
        out.push(Effect::Event(Event::UpgradeStarted { generation, trigger }));
        out.push(Effect::Spawn { generation });
    }

    fn candidate_process(&self, generation: u64) -> Option<Process> {
        self.candidate
            .as_ref()
            .filter(|c| c.generation == generation)
            .and_then(|c| c.process)
    }

    fn draining_index(&self, generation: u64) -> Option<usize> {
        self.draining.iter().position(|d| d.generation == generation)
    }

    /// The record of the upgrade in flight as it stands.
    fn record_of(&self, candidate: &Candidate, now: Time) -> UpgradeRecord {
        let spawned = candidate.process.map(|p| p.spawned);
        UpgradeRecord {
            service: self.service.clone(),
            trigger: candidate.trigger,
            result: UpgradeResult::Success,
            old_generation: self.active.as_ref().map(|a| a.generation),
            old_pid: self.active.as_ref().map(|a| a.pid),
            new_generation: candidate.generation,
            new_pid: candidate.process.map(|p| p.pid),
            duration_ms: millis(now.since(candidate.started)),
            phases: PhaseTimes {
                prepare_ms: candidate.prepare_ms,
                spawn_ms: spawned.map(|s| millis(s.since(candidate.started))),
                ready_ms: spawned.map(|s| millis(now.since(s))),
                watch_ms: None,
            },
            error: None,
            finished_at: 0.0,
        }
    }

    /// Moves a canary on: to its next step when this one's time is up (to the whole traffic after the last,
    /// and then the rest of the watchdog window), and asks for the tallies when a judgement is due.
    fn advance_canary(&mut self, now: Time, out: &mut Vec<Effect>) {
        let Some(canary) = self.policy.canary.clone() else {
            if let Some(watch) = self.watch.as_mut() {
                watch.canary = None;
            }
            return;
        };
        let Some(watch) = self.watch.as_mut() else { return };
        let generation = watch.record.new_generation;
        let previous = watch.previous.generation;
        let Some(progress) = watch.canary.as_mut() else { return };
        if progress.step_until <= now {
            progress.step += 1;
            let (new, old) = progress.seen;
            match canary.steps.get(progress.step) {
                Some(&share) => {
                    progress.share = share;
                    progress.step_until = now + canary.step_time;
                }
                None => {
                    progress.share = 10_000;
                    watch.until = now + self.policy.watchdog;
                }
            }
            out.push(Effect::Event(Event::CanaryStep {
                generation,
                step: progress.step,
                share: progress.share,
                new,
                previous: old,
            }));
            if progress.share == 10_000 {
                watch.canary = None;
            }
            out.push(Effect::Route);
        }
        if let Some(progress) = watch.canary.as_mut() {
            if progress.next_judgement <= now {
                progress.next_judgement = now + CANARY_JUDGE_EVERY;
                out.push(Effect::Judge {
                    new: generation,
                    previous,
                });
            }
        }
    }

    /// Judges a canary on both workers' tallies: rolls it back at once when the new worker's share of
    /// connections that failed on its side exceeds the previous one's by more than `max_error_rate`, once it
    /// has had `min_connections`.
    fn judge(&mut self, new: Tally, previous: Tally, now: Time, out: &mut Vec<Effect>) {
        let Some(canary) = self.policy.canary.clone() else {
            return;
        };
        let Some(watch) = self.watch.as_mut() else { return };
        let generation = watch.record.new_generation;
        let Some(progress) = watch.canary.as_mut() else { return };
        let (base_new, base_old) = *progress.baseline.get_or_insert((new, previous));
        let (new, old) = (new.since(base_new), previous.since(base_old));
        progress.seen = (new, old);
        if progress
            .told
            .is_none_or(|told| now.since(told) >= CANARY_PROGRESS_EVERY)
        {
            progress.told = Some(now);
            out.push(Effect::Event(Event::CanaryProgress {
                generation,
                share: progress.share,
                new,
                previous: old,
            }));
        }
        let margin = f64::from(canary.max_error_rate) / 10_000.0;
        if new.connections < canary.min_connections || new.rate() <= old.rate() + margin {
            return;
        }
        let reason = format!(
            "failed the canary: {} of {} connections ended badly on its side ({:.1}%), against {} of {} ({:.1}%) on \
             the previous worker",
            new.failed,
            new.connections,
            new.rate() * 100.0,
            old.failed,
            old.connections,
            old.rate() * 100.0
        );
        let watch = self.watch.take().expect("checked");
        self.end_watch(watch, UpgradeResult::RolledBack, reason, now, out);
    }

    /// An upgrade nobody asked for (`trigger`: a changed release, a recycle): at once, or when the maintenance
    /// window opens. Deferred ones fold into one, which names the first trigger.
    fn automatic(&mut self, trigger: Trigger, now: Time, out: &mut Vec<Effect>) {
        if self.shutting_down {
            return;
        }
        if self.window.is_some_and(|w| !w.open) {
            if self.deferred.is_none() {
                out.push(Effect::Event(Event::Deferred {
                    trigger,
                    until_ms: self.window.map_or(0, |w| millis(w.changes.since(now))),
                }));
            }
            self.deferred.get_or_insert(trigger);
            return;
        }
        self.apply(Input::Upgrade { trigger, waiter: None }, now, out);
    }

    /// The upgrade in flight produced no ready worker: the old one keeps serving.
    fn fail_candidate(&mut self, reason: String, now: Time, out: &mut Vec<Effect>) {
        let candidate = self.candidate.take().expect("a candidate");
        let mut record = self.record_of(&candidate, now);
        if candidate.process.is_some() {
            out.push(Effect::Discard {
                generation: candidate.generation,
            });
        }
        record.phases.ready_ms = None;
        record.result = UpgradeResult::Failed;
        record.error = Some(format!(
            "service `{}`: upgrade to generation {} failed: {reason}",
            self.service, candidate.generation
        ));
        if self.active.as_ref().is_none_or(|a| !a.healthy) {
            // Nothing good serves: keep trying, more and more slowly.
            let trigger = match self.active {
                None => Trigger::Restart,
                Some(_) => Trigger::Unhealthy,
            };
            self.schedule_restart(trigger, now, out);
        }
        self.finish(record, candidate.waiters, out);
    }

    /// Points new connections at the ready candidate. The worker it replaces is kept warm for the watchdog
    /// window, or drained at once when there is no window.
    fn switch(&mut self, now: Time, out: &mut Vec<Effect>) {
        let candidate = self.candidate.take().expect("a candidate");
        let process = candidate.process.expect("a ready candidate runs");
        let record = self.record_of(&candidate, now);
        let generation = candidate.generation;
        out.push(Effect::Count(Count::Ready(now.since(candidate.started))));
        out.push(Effect::Event(Event::Ready {
            generation,
            pid: process.pid,
            ready_ms: millis(now.since(process.spawned)),
        }));
        out.push(Effect::Event(Event::Switched {
            generation,
            pid: process.pid,
            old_generation: record.old_generation,
        }));
        let previous = self
            .active
            .replace(Serving::new(&self.service, generation, process.pid, now, &self.policy));
        // A replacement that was due is moot now.
        self.restart = None;
        // The new route is stored before the old worker drains, so that a connection that finds the old one
        // draining sees the new one when it loads the route again.
        out.push(Effect::Route);
        if let Some(watch) = self.watch.take() {
            // Superseded before its window ended: the watched worker did well enough.
            self.end_watch(watch, UpgradeResult::Success, String::new(), now, out);
        }
        let canary = self
            .policy
            .canary
            .clone()
            .filter(|_| previous.as_ref().is_some_and(|p| p.exited.is_none()));
        match previous {
            Some(previous) if canary.is_some() => {
                let canary = canary.expect("checked");
                // The new worker takes the first step's share; the rest still goes to the previous one.
                let steps = u32::try_from(canary.steps.len()).unwrap_or(u32::MAX);
                let progress = CanaryProgress {
                    step: 0,
                    share: canary.steps[0],
                    step_until: now + canary.step_time,
                    next_judgement: now,
                    baseline: None,
                    seen: (Tally::default(), Tally::default()),
                    told: None,
                };
                out.push(Effect::Event(Event::CanaryStep {
                    generation,
                    step: 0,
                    share: progress.share,
                    new: Tally::default(),
                    previous: Tally::default(),
                }));
                self.watch = Some(Watch {
                    previous,
                    since: now,
                    until: now + canary.step_time * steps + self.policy.watchdog,
                    record,
                    waiters: candidate.waiters,
                    canary: Some(progress),
                });
                out.push(Effect::Route);
            }
            Some(previous) if !self.policy.watchdog.is_zero() && previous.exited.is_none() => {
                out.push(Effect::Event(Event::Watching {
                    generation,
                    previous_generation: previous.generation,
                    watchdog_ms: millis(self.policy.watchdog),
                }));
                self.watch = Some(Watch {
                    previous,
                    since: now,
                    until: now + self.policy.watchdog,
                    record,
                    waiters: candidate.waiters,
                    canary: None,
                });
            }
            Some(previous) => {
                self.drain(previous, now, out);
                self.finish(record, candidate.waiters, out);
            }
            None => {
                self.finish(record, candidate.waiters, out);
            }
        }
        if !self.accepting {
            self.accepting = true;
            out.push(Effect::Accept);
        }
    }

    /// Closes the watchdog window: keep the new worker (`Success`), or go back to the previous one.
    fn end_watch(
        &mut self,
        watch: Watch,
        result: UpgradeResult,
        reason: String,
        now: Time,
        out: &mut Vec<Effect>,
    ) -> UpgradeRecord {
        let Watch {
            previous,
            mut record,
            since,
            waiters,
            ..
        } = watch;
        record.phases.watch_ms = Some(millis(now.since(since)));
        if result == UpgradeResult::RolledBack {
            let restored = previous.generation;
            let failed = self.active.replace(Serving {
                failures: 0,
                successes: 0,
                healthy: true,
                since: now,
                next_probe: Some(now + self.policy.health_interval),
                ..previous
            });
            out.push(Effect::Route);
            let error = format!(
                "service `{}`: generation {} {reason}: rolled back to generation {restored}",
                self.service, record.new_generation
            );
            out.push(Effect::Event(Event::RolledBack {
                generation: record.new_generation,
                restored_generation: restored,
                reason,
                error: error.clone(),
            }));
            record.error = Some(error);
            if let Some(failed) = failed {
                self.drain(failed, now, out);
            }
        } else {
            self.drain(previous, now, out);
        }
        record.result = result;
        self.finish(record, waiters, out)
    }

    /// Records the end of an upgrade and tells whoever waits for it.
    fn finish(&mut self, mut record: UpgradeRecord, waiters: Vec<WaiterId>, out: &mut Vec<Effect>) -> UpgradeRecord {
        // The wall clock, read and not waited on: the record's one field that is not the machine's own time.
        record.finished_at = unix_now();
        out.push(Effect::Count(Count::Upgrade(record.trigger, record.result)));
        if self.starting {
            self.starting = false;
            out.push(Effect::Started(match record.result {
                UpgradeResult::Failed => Err(record.error.clone().unwrap_or_default()),
                _ => Ok(()),
            }));
        }
        out.push(Effect::Event(Event::UpgradeFinished(record.clone())));
        for waiter in waiters {
            out.push(Effect::Reply {
                waiter,
                outcome: Ok(record.clone()),
            });
        }
        self.last_upgrade = Some(record.clone());
        record
    }

    /// Applies one health probe result with rise/fall hysteresis.
    fn probed(&mut self, generation: u64, ok: bool, now: Time, out: &mut Vec<Effect>) {
        let policy = &self.policy;
        let Some(active) = self.active.as_mut().filter(|a| a.generation == generation) else {
            return;
        };
        out.push(Effect::Count(Count::Health(ok)));
        active.next_probe = Some(now + policy.health_interval);
        if ok {
            active.failures = 0;
            active.successes += 1;
            if !active.healthy && active.successes >= policy.health_successes {
                active.healthy = true;
                out.push(Effect::Event(Event::Healthy { generation }));
            }
            return;
        }
        active.successes = 0;
        active.failures += 1;
        if !active.healthy || active.failures < policy.health_failures {
            return;
        }
        active.healthy = false;
        let failures = active.failures;
        out.push(Effect::Event(Event::Unhealthy { generation, failures }));
        match self.watch.take() {
            Some(watch) => {
                let reason = format!("failed {failures} health checks");
                self.end_watch(watch, UpgradeResult::RolledBack, reason, now, out);
            }
            None => self.schedule_restart(Trigger::Unhealthy, now, out),
        }
    }

    /// A worker exited and was reaped.
    fn exited(&mut self, generation: u64, status: String, now: Time, out: &mut Vec<Effect>) {
        if let Some(process) = self.candidate_process(generation) {
            let reason = format!("worker pid {}: exited while starting: {status}", process.pid);
            self.fail_candidate(reason, now, out);
            return;
        }
        if self.active.as_ref().is_some_and(|a| a.generation == generation) {
            let mut active = self.active.take().expect("checked");
            out.push(Effect::Event(Event::WorkerExited {
                generation,
                pid: active.pid,
                status: status.clone(),
            }));
            if now.since(active.since) >= RESTART_STABLE_AFTER {
                // It ran well for long: this crash starts the backoff afresh.
                self.backoff = RESTART_BACKOFF_MIN;
            }
            active.exited = Some(status.clone());
            active.next_probe = None;
            if let Some(watch) = self.watch.take() {
                self.active = Some(active);
                self.end_watch(watch, UpgradeResult::RolledBack, format!("exited ({status})"), now, out);
                return;
            }
            // New connections wait for the replacement instead of dialling a dead socket.
            out.push(Effect::Route);
            self.drain(active, now, out);
            self.schedule_restart(Trigger::Restart, now, out);
            return;
        }
        if self.watch.as_ref().is_some_and(|w| w.previous.generation == generation) {
            // The warm worker died: there is nothing to roll back to any more.
            let mut watch = self.watch.take().expect("checked");
            watch.previous.exited = Some(status);
            self.end_watch(watch, UpgradeResult::Success, String::new(), now, out);
            return;
        }
        if let Some(i) = self.draining_index(generation) {
            self.draining[i].exited = Some(status);
            if matches!(self.draining[i].step, DrainStep::Stopping { .. } | DrainStep::Killed) {
                self.stopped(i, now, out);
            }
            return;
        }
        // A worker this machine has let go of already.
        out.push(Effect::Forget { generation });
    }

    /// Lets `old` finish its connections: no new ones, then a stop once they have closed or at the deadline.
    fn drain(&mut self, old: Serving, now: Time, out: &mut Vec<Effect>) {
        let settle = self.policy.signal_first && old.exited.is_none();
        out.push(Effect::Drain {
            generation: old.generation,
            settle,
        });
        out.push(Effect::Event(Event::DrainStarted {
            generation: old.generation,
            pid: old.pid,
            drain_timeout_ms: millis(self.policy.drain_timeout),
        }));
        self.draining.push(Draining {
            generation: old.generation,
            pid: old.pid,
            since: now,
            deadline: now + self.policy.drain_timeout,
            step: if settle {
                DrainStep::Settling
            } else {
                DrainStep::Closing
            },
            signalled: false,
            stop_signal: self.policy.stop_signal,
            stop_timeout: self.policy.stop_timeout,
            next_progress: now + DRAIN_PROGRESS_EVERY,
            cut: 0,
            exited: old.exited,
        });
    }

    /// Asks draining worker `i` to stop, once.
    fn signal_drain(&mut self, i: usize, out: &mut Vec<Effect>) {
        let drain = &mut self.draining[i];
        if !drain.signalled && drain.exited.is_none() {
            drain.signalled = true;
            out.push(Effect::Stop {
                generation: drain.generation,
                signal: drain.stop_signal,
            });
        }
    }

    /// Draining worker `i` has no connection left (or they were cut): stop it.
    fn stop_drained(&mut self, i: usize, now: Time, out: &mut Vec<Effect>) {
        if self.draining[i].exited.is_some() {
            self.draining[i].step = DrainStep::Killed;
            self.stopped(i, now, out);
            return;
        }
        self.signal_drain(i, out);
        let drain = &mut self.draining[i];
        drain.step = DrainStep::Stopping {
            kill_at: now + drain.stop_timeout,
        };
    }

    /// Draining worker `i` is gone: it leaves the machine.
    fn stopped(&mut self, i: usize, now: Time, out: &mut Vec<Effect>) {
        let drain = self.draining.remove(i);
        let took = now.since(drain.since);
        out.push(Effect::Forget {
            generation: drain.generation,
        });
        out.push(Effect::Count(Count::Drained(took)));
        out.push(Effect::Event(Event::WorkerStopped {
            generation: drain.generation,
            pid: drain.pid,
            status: drain.exited.unwrap_or_default(),
            cut: drain.cut,
            drain_ms: millis(took),
        }));
    }

    /// Replaces the worker after the current backoff, which doubles each time unless the worker ran long.
    fn schedule_restart(&mut self, trigger: Trigger, now: Time, out: &mut Vec<Effect>) {
        if self.restart.is_some() || self.shutting_down {
            return;
        }
        if self
            .active
            .as_ref()
            .is_some_and(|a| now.since(a.since) >= RESTART_STABLE_AFTER)
        {
            self.backoff = RESTART_BACKOFF_MIN;
        }
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(RESTART_BACKOFF_MAX);
        out.push(Effect::Event(Event::RestartScheduled {
            in_ms: millis(wait),
            reason: trigger,
        }));
        self.restart = Some(Restart {
            at: now + wait,
            trigger,
        });
    }

    /// Stops accepting, abandons the upgrade in flight and drains every worker.
    fn shut_down(&mut self, now: Time, out: &mut Vec<Effect>) {
        if self.shutting_down {
            return;
        }
        self.shutting_down = true;
        self.restart = None;
        let mut abandoned = Vec::new();
        if let Some(candidate) = self.candidate.take() {
            if candidate.process.is_some() {
                out.push(Effect::Discard {
                    generation: candidate.generation,
                });
            }
            abandoned.extend(candidate.waiters);
        }
        if let Some(follow_up) = self.follow_up.take() {
            abandoned.extend(follow_up.waiters);
        }
        out.push(Effect::StopAccepting);
        let active = self.active.take();
        out.push(Effect::Route);
        if let Some(watch) = self.watch.take() {
            abandoned.extend(watch.waiters);
            self.drain(watch.previous, now, out);
        }
        if let Some(active) = active {
            self.drain(active, now, out);
        }
        if !abandoned.is_empty() {
            out.push(Effect::Abandon { waiters: abandoned });
        }
    }
}

/// A signal as its name (`"SIGTERM"`), for serde.
mod signal_name {
    use std::str::FromStr;

    use nix::sys::signal::Signal;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(signal: &Signal, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(signal.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Signal, D::Error> {
        let name = String::deserialize(deserializer)?;
        Signal::from_str(&name).map_err(|_| serde::de::Error::custom(format!("unknown signal `{name}`")))
    }
}

#[cfg(test)]
mod tests;
