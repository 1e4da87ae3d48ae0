//! What the supervisor and the admin API share: the commands the daemon takes and the state it publishes.
//!
//! Keeping these types here lets `admin` and `supervisor` depend on this module and never on each other.
//! Nothing here does I/O.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::metrics::{Metrics, ServiceGauges};
use crate::route::Upstream;

/// A request to the supervisor.
#[derive(Debug)]
pub enum Command {
    /// Re-read the configuration file and upgrade every service, like SIGHUP.
    Reload {
        /// Which services get a new worker.
        scope: ReloadScope,
        /// Whether the reply waits for the upgrades the reload starts.
        wait: bool,
        /// Told whether the new configuration applied (with the outcome per service), or why not.
        reply: oneshot::Sender<Result<ReloadReport, String>>,
    },
    /// Upgrade one service.
    Upgrade {
        /// The service.
        service: String,
        /// Told the outcome once the upgrade (with its watchdog window) is over.
        reply: oneshot::Sender<Result<UpgradeRecord, ActionError>>,
    },
    /// Switch one service back to its previous worker, while that one is still warm; after that, start an
    /// earlier release again (the previous one, or generation `to`'s).
    Rollback {
        /// The service.
        service: String,
        /// The generation whose release to start again, instead of the previous one.
        to: Option<u64>,
        /// Told the outcome.
        reply: oneshot::Sender<Result<UpgradeRecord, ActionError>>,
    },
    /// Skip the rest of one service's canary: its new worker takes every new connection now.
    Promote {
        /// The service.
        service: String,
        /// Told the record of the upgrade, or why not.
        reply: oneshot::Sender<Result<UpgradeRecord, ActionError>>,
    },
    /// The releases one service remembers, newest first.
    Releases {
        /// The service.
        service: String,
        /// Told them.
        reply: oneshot::Sender<Result<Vec<crate::release::Release>, ActionError>>,
    },
    /// Write out the daemon's whole state (see `handover`).
    State {
        /// Told the state document, or why it could not be written.
        reply: oneshot::Sender<Result<Vec<u8>, String>>,
    },
    /// Re-execute baton in place with a new binary (see `reexec`).
    Reexec {
        /// The binary to run, instead of the one at the path baton was started from.
        binary: Option<std::path::PathBuf>,
        /// How long the new binary's check may take.
        check_timeout: Duration,
        /// Told, once the new binary's check has passed, what the hand-over starts with; or why the re-exec
        /// was refused.
        reply: oneshot::Sender<Result<ReexecAccepted, String>>,
        /// Closes once the answer has gone out (the admin connection is over): the hand-over waits for it,
        /// a moment at most, so that the answer is not lost with this image.
        answered: Option<watch::Receiver<()>>,
    },
}

/// A re-exec whose new binary passed its check: the hand-over starts.
#[derive(Debug, Clone, Serialize)]
pub struct ReexecAccepted {
    /// Which attempt it is: `/status`'s `last_reexec.attempt` names it once it has ended.
    pub attempt: u64,
    /// The binary.
    pub binary: std::path::PathBuf,
    /// Its version, as its check told it.
    pub version: String,
    /// The version running now.
    pub from_version: String,
    /// The process, which keeps its id.
    pub pid: u32,
}

/// Re-execs of this process, as `/status` shows them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReexecView {
    /// How many times this process has re-executed into a new image.
    pub reexecs: u64,
    /// The last re-exec that ended.
    pub last_reexec: Option<crate::reexec::ReexecRecord>,
    /// A re-exec asked for and not yet ended.
    pub reexec: Option<ReexecProgress>,
}

/// A re-exec under way.
#[derive(Debug, Clone, Serialize)]
pub struct ReexecProgress {
    /// Which attempt it is.
    pub attempt: u64,
    /// The binary.
    pub binary: std::path::PathBuf,
    /// `waiting` (for an upgrade's watchdog window to close, say), `checking` (the new binary) or
    /// `handing_over` (parking the connections; the next image ends it).
    pub stage: &'static str,
    /// What it waits for, while it waits.
    pub waiting_for: Option<String>,
}

/// Why an action on a service was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// No such service.
    #[error("no service `{0}`")]
    NotFound(String),
    /// The action does not fit the service's state.
    #[error("{0}")]
    Conflict(String),
    /// baton stopped before the action ended.
    #[error("baton is shutting down")]
    ShuttingDown,
}

/// The outcome of a reload, per service.
pub type ReloadReport = BTreeMap<String, ServiceOutcome>;

/// What a reload did to one service.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceOutcome {
    /// The service was upgraded (or added); here is how that went.
    Upgraded(Box<UpgradeRecord>),
    /// An upgrade was started; the reply did not wait for it.
    Started,
    /// The service keeps its worker.
    Unchanged,
    /// The service was removed and drains.
    Removed,
    /// baton stopped before the upgrade ended.
    Abandoned,
}

/// Which services a reload upgrades.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReloadScope {
    /// Every service, as SIGHUP does: the usual deploy replaces the server's files and then reloads.
    #[default]
    All,
    /// Only services whose worker settings (command, backend, cwd, env) changed; the others keep their
    /// worker and take the rest of their new settings as they are.
    Changed,
}

/// What set an upgrade off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// The service's first worker, at start or when a reload adds the service.
    Start,
    /// SIGHUP.
    Signal,
    /// A request to the admin API.
    Api,
    /// The active worker exited on its own.
    Restart,
    /// The active worker failed its health checks.
    Unhealthy,
    /// A watched path changed: a new release.
    Watch,
    /// The active worker reached its `max_lifetime`.
    Recycle,
    /// A rollback to an earlier release, once no previous worker was warm.
    Rollback,
}

impl Trigger {
    /// Every trigger, in declaration order.
    pub const ALL: [Trigger; 8] = [
        Trigger::Start,
        Trigger::Signal,
        Trigger::Api,
        Trigger::Restart,
        Trigger::Unhealthy,
        Trigger::Watch,
        Trigger::Recycle,
        Trigger::Rollback,
    ];

    /// The `trigger` label value.
    pub fn label(self) -> &'static str {
        match self {
            Trigger::Start => "start",
            Trigger::Signal => "signal",
            Trigger::Api => "api",
            Trigger::Restart => "restart",
            Trigger::Unhealthy => "unhealthy",
            Trigger::Watch => "watch",
            Trigger::Recycle => "recycle",
            Trigger::Rollback => "rollback",
        }
    }
}

/// The step an upgrade of a service is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// No upgrade runs.
    Idle,
    /// Forking the new worker.
    Spawning,
    /// Polling the new worker until it is ready.
    WaitingReady,
    /// The new worker serves; the previous one is kept warm until the watchdog window ends.
    Watching,
    /// The new worker takes a share of new connections, the previous one the rest (a canary).
    Canary,
    /// An upgrade waits for a draining worker to finish: `max_draining` old workers drain already.
    WaitingForDrain,
    /// The service stops accepting and drains its workers.
    ShuttingDown,
    /// The service has no worker left.
    Stopped,
}

/// How an upgrade ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpgradeResult {
    /// The new worker took over.
    Success,
    /// The new worker did not become ready; the old one kept serving.
    Failed,
    /// The new worker failed during the watchdog window; traffic went back to the previous one.
    RolledBack,
}

impl UpgradeResult {
    /// Every result, in declaration order.
    pub const ALL: [UpgradeResult; 3] = [UpgradeResult::Success, UpgradeResult::Failed, UpgradeResult::RolledBack];

    /// The `result` label value.
    pub fn label(self) -> &'static str {
        match self {
            UpgradeResult::Success => "success",
            UpgradeResult::Failed => "failed",
            UpgradeResult::RolledBack => "rolled_back",
        }
    }
}

/// The record of a finished upgrade.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpgradeRecord {
    /// The service.
    pub service: String,
    /// What set it off.
    pub trigger: Trigger,
    /// How it ended.
    pub result: UpgradeResult,
    /// Generation serving before, if any.
    pub old_generation: Option<u64>,
    /// Process id of the worker serving before, if any.
    pub old_pid: Option<u32>,
    /// Generation of the new worker.
    pub new_generation: u64,
    /// Process id of the new worker, if it started.
    pub new_pid: Option<u32>,
    /// Milliseconds from the start of the upgrade to ready (or to failure).
    pub duration_ms: u64,
    /// The time of each phase.
    pub phases: PhaseTimes,
    /// Why it failed.
    pub error: Option<String>,
    /// Unix time, in seconds, of its end.
    pub finished_at: f64,
}

/// Milliseconds spent in each phase of an upgrade; a phase not reached is absent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseTimes {
    /// The `prepare` command, before the spawn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepare_ms: Option<u64>,
    /// From the start to a running process (the `prepare` command included).
    pub spawn_ms: Option<u64>,
    /// From a running process to a ready one.
    pub ready_ms: Option<u64>,
    /// The watchdog window, from the switch to its end (or the rollback).
    pub watch_ms: Option<u64>,
}

/// Lifecycle events, as lines of JSON, for `/v1/events` and whoever else listens.
#[derive(Debug, Clone)]
pub struct Events {
    sender: broadcast::Sender<Arc<str>>,
}

/// How many events a slow listener may fall behind before it misses some.
pub const EVENTS_BACKLOG: usize = 1024;

impl Events {
    /// A new, empty event bus.
    pub fn new() -> Events {
        Events {
            sender: broadcast::channel(EVENTS_BACKLOG).0,
        }
    }

    /// Publishes event `kind` about `service` (empty for the daemon itself), with `fields` (a JSON object).
    pub fn emit(&self, service: &str, kind: &str, fields: serde_json::Value) {
        if self.sender.receiver_count() == 0 {
            return;
        }
        let mut event = serde_json::Map::new();
        event.insert("time".into(), unix_now().into());
        event.insert("event".into(), kind.into());
        if !service.is_empty() {
            event.insert("service".into(), service.into());
        }
        if let serde_json::Value::Object(fields) = fields {
            event.extend(fields);
        }
        let line = serde_json::Value::Object(event).to_string();
        let _ = self.sender.send(Arc::from(line));
    }

    /// A listener that gets every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.sender.subscribe()
    }
}

impl Default for Events {
    fn default() -> Self {
        Events::new()
    }
}

/// Unix time in seconds.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl UpgradeRecord {
    /// Stamps `finished_at` with the current time.
    pub fn now(mut self) -> Self {
        self.finished_at = unix_now();
        self
    }
}

/// What a service publishes on every change; the live connection counts come through its [`Upstream`]s.
#[derive(Debug, Clone)]
pub struct ServiceState {
    /// The current step.
    pub phase: Phase,
    /// The worker new connections go to.
    pub active: Option<Arc<Upstream>>,
    /// The worker replaced by the last switch, kept warm during the watchdog window.
    pub previous: Option<Arc<Upstream>>,
    /// Old workers finishing their connections, oldest first.
    pub draining: Vec<Arc<Upstream>>,
    /// Whether the active worker passes its health checks.
    pub healthy: bool,
    /// When the next restart of a dead or unhealthy worker is due.
    pub restart_at: Option<tokio::time::Instant>,
    /// When the active worker took the traffic.
    pub active_since: Option<tokio::time::Instant>,
    /// The public addresses actually bound.
    pub listen: Vec<SocketAddr>,
    /// The last finished upgrade.
    pub last_upgrade: Option<UpgradeRecord>,
    /// What the next upgrade waits for, when it waits for a draining worker to stop.
    pub waiting: Option<Waiting>,
    /// An automatic upgrade waiting for the maintenance window, and when that opens.
    pub deferred: Option<(Trigger, Option<tokio::time::Instant>)>,
    /// The canary under way, if one is.
    pub canary: Option<CanaryView>,
}

/// A canary under way, in `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct CanaryView {
    /// The new worker's generation.
    pub generation: u64,
    /// The step, from 0.
    pub step: usize,
    /// The new worker's share of new connections, in percent.
    pub share_percent: f64,
    /// Milliseconds until the next step.
    pub next_step_in_ms: u64,
    /// The new worker's connections since the canary began, and those that failed on its side.
    pub new: crate::lifecycle::Tally,
    /// The same of the previous worker.
    pub previous: crate::lifecycle::Tally,
}

/// An upgrade that waits because `max_draining` old workers drain already.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// Since when it waits.
    pub since: tokio::time::Instant,
    /// The generations it waits for (one of them must stop).
    pub draining: Vec<u64>,
    /// The cap.
    pub max_draining: u32,
}

impl ServiceState {
    /// The state of a service that has not started its first worker.
    pub fn new(listen: Vec<SocketAddr>) -> ServiceState {
        ServiceState {
            phase: Phase::Spawning,
            active: None,
            previous: None,
            draining: Vec::new(),
            healthy: false,
            restart_at: None,
            active_since: None,
            listen,
            last_upgrade: None,
            waiting: None,
            deferred: None,
            canary: None,
        }
    }

    /// The metric gauges this state implies, with the live connection counts.
    pub fn gauges(&self) -> ServiceGauges {
        ServiceGauges {
            generation: self.active.as_ref().map_or(0, |a| a.generation),
            up: self.active.is_some(),
            draining: self.draining.len() + usize::from(self.previous.is_some()),
            upgrading: matches!(
                self.phase,
                Phase::Spawning | Phase::WaitingReady | Phase::Watching | Phase::Canary | Phase::WaitingForDrain
            ),
            active_connections: self.active.as_ref().map_or(0, |a| a.connections()),
            draining_connections: self
                .draining
                .iter()
                .chain(&self.previous)
                .map(|d| d.connections())
                .sum(),
        }
    }

    /// The JSON view of `/status`.
    pub fn view(&self) -> ServiceView {
        ServiceView {
            generation: self.active.as_ref().map(|a| a.generation),
            pid: self.active.as_ref().map(|a| a.pid),
            worker: self.active.as_ref().map(|a| a.addr.to_string()),
            phase: self.phase,
            worker_uptime_seconds: self.active_since.map(|since| since.elapsed().as_secs_f64()),
            active_connections: self.active.as_ref().map_or(0, |a| a.connections()),
            listen: self.listen.clone(),
            healthy: self.healthy,
            previous: self.previous.as_deref().map(DrainingView::of),
            draining: self.draining.iter().map(|d| DrainingView::of(d)).collect(),
            restart_in_ms: self
                .restart_at
                .map(|at| millis(at.saturating_duration_since(tokio::time::Instant::now()))),
            waiting: self.waiting.as_ref().map(|w| WaitingView {
                reason: "max_draining",
                draining: w.draining.clone(),
                max_draining: w.max_draining,
                waited_ms: millis(w.since.elapsed()),
            }),
            deferred: self.deferred.map(|(trigger, until)| {
                let in_ms = until.map_or(0, |at| {
                    millis(at.saturating_duration_since(tokio::time::Instant::now()))
                });
                DeferredView {
                    trigger,
                    in_ms,
                    until: unix_now() + in_ms as f64 / 1e3,
                }
            }),
            canary: self.canary.clone(),
            last_upgrade: self.last_upgrade.clone(),
        }
    }
}

/// An automatic upgrade waiting for the maintenance window, in `/status`.
#[derive(Debug, Serialize)]
pub struct DeferredView {
    /// What set it off.
    pub trigger: Trigger,
    /// Milliseconds until the window opens.
    pub in_ms: u64,
    /// When it opens, in Unix seconds.
    pub until: f64,
}

/// One service in `/status`.
#[derive(Debug, Serialize)]
pub struct ServiceView {
    /// Generation of the worker new connections go to.
    pub generation: Option<u64>,
    /// Its process id.
    pub pid: Option<u32>,
    /// Its private address.
    pub worker: Option<String>,
    /// The current step.
    pub phase: Phase,
    /// Seconds since the active worker took the traffic.
    pub worker_uptime_seconds: Option<f64>,
    /// Connections open to it.
    pub active_connections: usize,
    /// The public addresses actually bound.
    pub listen: Vec<SocketAddr>,
    /// Whether the active worker passes its health checks.
    pub healthy: bool,
    /// The previous worker, kept warm during the watchdog window.
    pub previous: Option<DrainingView>,
    /// Old workers still draining.
    pub draining: Vec<DrainingView>,
    /// Milliseconds until a dead or unhealthy worker is restarted.
    pub restart_in_ms: Option<u64>,
    /// What the next upgrade waits for, if it waits.
    pub waiting: Option<WaitingView>,
    /// An automatic upgrade waiting for the maintenance window, if one does.
    pub deferred: Option<DeferredView>,
    /// The canary under way, if one is.
    pub canary: Option<CanaryView>,
    /// The last finished upgrade.
    pub last_upgrade: Option<UpgradeRecord>,
}

/// An upgrade waiting for a drain slot, in `/status`.
#[derive(Debug, Serialize)]
pub struct WaitingView {
    /// Why: `max_draining` old workers drain already.
    pub reason: &'static str,
    /// The generations draining; the upgrade starts when one of them has stopped.
    pub draining: Vec<u64>,
    /// The cap.
    pub max_draining: u32,
    /// How long it has waited.
    pub waited_ms: u64,
}

/// A draining worker in `/status`.
#[derive(Debug, Serialize)]
pub struct DrainingView {
    /// Its generation.
    pub generation: u64,
    /// Its process id.
    pub pid: u32,
    /// Connections still open to it.
    pub active_connections: usize,
}

impl DrainingView {
    fn of(upstream: &Upstream) -> DrainingView {
        DrainingView {
            generation: upstream.generation,
            pid: upstream.pid,
            active_connections: upstream.connections(),
        }
    }
}

/// The document served at `/status`.
#[derive(Debug, Serialize)]
pub struct StatusView {
    /// baton's version.
    pub version: &'static str,
    /// baton's process id.
    pub pid: u32,
    /// Seconds since baton started.
    pub uptime_seconds: f64,
    /// Re-execs of this process.
    #[serde(flatten)]
    pub reexec: ReexecView,
    /// Every service by name.
    pub services: BTreeMap<String, ServiceView>,
}

/// Every service's published state, by name; replaced whole when a reload adds or removes services.
pub type Directory = Arc<BTreeMap<String, watch::Receiver<ServiceState>>>;

/// The admin API's window on the daemon.
#[derive(Debug, Clone)]
pub struct Control {
    /// Where commands go.
    pub commands: mpsc::Sender<Command>,
    /// The services' published states.
    pub directory: watch::Receiver<Directory>,
    /// The metrics registry.
    pub metrics: Metrics,
    /// When baton started.
    pub started: crate::clock::Time,
    /// The bearer token requests must present, when one is configured.
    pub token: Arc<arc_swap::ArcSwapOption<String>>,
    /// Lifecycle events.
    pub events: Events,
    /// Re-execs of this process.
    pub reexec: watch::Receiver<ReexecView>,
}

impl Control {
    /// The `/status` document.
    pub fn status(&self) -> StatusView {
        let directory = self.directory.borrow().clone();
        StatusView {
            version: env!("CARGO_PKG_VERSION"),
            pid: std::process::id(),
            uptime_seconds: crate::clock::Time::now().since(self.started).as_secs_f64(),
            reexec: self.reexec.borrow().clone(),
            services: directory
                .iter()
                .map(|(name, state)| (name.clone(), state.borrow().view()))
                .collect(),
        }
    }

    /// The metrics exposition, with the state gauges brought up to date first.
    pub fn metrics_text(&self) -> String {
        let directory = self.directory.borrow().clone();
        for (name, state) in directory.iter() {
            self.metrics.service_state(name, &state.borrow().gauges());
        }
        self.metrics.encode()
    }
}

/// Milliseconds in `duration`, saturating.
pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{RESTART_REASONS, UPGRADE_RESULTS, UPGRADE_TRIGGERS};

    /// The metrics export every label value at 0 from the start; these lists must be the enums' labels.
    #[test]
    fn the_metric_label_lists_are_the_labels_of_every_variant() {
        assert_eq!(Trigger::ALL.map(Trigger::label), UPGRADE_TRIGGERS);
        assert_eq!(UpgradeResult::ALL.map(UpgradeResult::label), UPGRADE_RESULTS);
        assert_eq!(
            [Trigger::Restart, Trigger::Unhealthy].map(Trigger::label),
            RESTART_REASONS
        );
    }
}
