//! The Prometheus registry and every metric baton exports; the metric names live here and nowhere else.
//!
//! The data path touches only pre-resolved handles ([`ServiceMetrics`]): no label lookup, no lock per
//! connection. Gauges that describe state (generation, active connections) are set when state changes or
//! just before a scrape, never counted up and down per connection.
//!
//! A counter whose label values are known in advance is exported at 0 from the start, every combination of
//! them: the daemon's when the registry is made, a service's when its handles are ([`Metrics::service`]).
//! A dashboard then shows 0, not "No data", for what has not happened yet. The label values are the lists
//! below ([`RELOAD_RESULTS`], [`UPGRADE_TRIGGERS`], ...); recording one that is not listed is a bug, which a
//! debug assertion catches.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Connections accepted on a service's public sockets.
pub const CONNECTIONS_ACCEPTED: &str = "baton_connections_accepted_total";
/// Connections open now, by the role of the worker they go to.
pub const CONNECTIONS_ACTIVE: &str = "baton_connections_active";
/// Connections held while the service has no ready worker.
pub const CONNECTIONS_PENDING: &str = "baton_connections_pending";
/// Connections closed by baton before reaching a worker, by reason.
pub const CONNECTIONS_REJECTED: &str = "baton_connections_rejected_total";
/// Connections moved to another worker with the bytes their worker closed on without reading.
pub const CONNECTIONS_RESENT: &str = "baton_connections_resent_total";
/// Connection failures, by the side that failed and kind.
pub const CONNECTION_ERRORS: &str = "baton_connection_errors_total";
/// Bytes copied, by direction.
pub const BYTES: &str = "baton_bytes_total";
/// How long connections lasted, from accept to close.
pub const CONNECTION_DURATION: &str = "baton_connection_duration_seconds";
/// How long dialling the worker took.
pub const WORKER_CONNECT_DURATION: &str = "baton_worker_connect_duration_seconds";
/// How long new workers took from spawn to ready.
pub const UPGRADE_READY: &str = "baton_upgrade_ready_seconds";
/// How long old workers took to drain, from the start of the drain to their stop.
pub const DRAIN_DURATION: &str = "baton_drain_duration_seconds";
/// Finished upgrades, by trigger and result.
pub const UPGRADES: &str = "baton_upgrades_total";
/// 1 while an upgrade of the service runs.
pub const UPGRADE_IN_PROGRESS: &str = "baton_upgrade_in_progress";
/// The generation of the worker new connections go to.
pub const WORKER_GENERATION: &str = "baton_worker_generation";
/// 1 when the service has a running worker that new connections go to.
pub const WORKER_UP: &str = "baton_worker_up";
/// Old workers still finishing their connections.
pub const WORKERS_DRAINING: &str = "baton_workers_draining";
/// Worker restarts, by reason.
pub const WORKER_RESTARTS: &str = "baton_worker_restarts_total";
/// Health probes of active workers, by result.
pub const HEALTH_CHECKS: &str = "baton_health_checks_total";
/// Configuration reloads, by result.
pub const CONFIG_RELOADS: &str = "baton_config_reloads_total";
/// 1 when the last reload applied.
pub const CONFIG_LAST_RELOAD_SUCCESSFUL: &str = "baton_config_last_reload_successful";
/// Unix time of the last reload that applied (or of the start).
pub const CONFIG_LAST_RELOAD_SUCCESS_TIMESTAMP: &str = "baton_config_last_reload_success_timestamp_seconds";
/// Always 1, labelled with the version.
pub const BUILD_INFO: &str = "baton_build_info";
/// Re-execs of baton itself, by result ([`REEXEC_RESULTS`]).
pub const REEXECS: &str = "baton_reexecs_total";
/// How long connections went without baton moving their bytes during a re-exec.
pub const REEXEC_PAUSE: &str = "baton_reexec_pause_seconds";
/// The new worker's share of new connections during a canary, from 0 to 1 (0 with none under way).
pub const CANARY_SHARE: &str = "baton_canary_weight";
/// The connections of the canary under way (or the last one), by worker and result.
pub const CANARY_CONNECTIONS: &str = "baton_canary_connections";
/// The `generation` values of [`CANARY_CONNECTIONS`].
pub const CANARY_ROLES: [&str; 2] = ["new", "previous"];
/// The `result` values of [`CANARY_CONNECTIONS`].
pub const CANARY_RESULTS: [&str; 2] = ["ok", "failed"];
/// PROXY protocol headers read from trusted sources, by version.
pub const PROXY_HEADERS: &str = "baton_proxy_headers_total";
/// PROXY protocol headers refused from trusted sources, by reason ([`crate::proxy_protocol::Rejected::LABELS`]):
/// each closed its connection.
pub const PROXY_HEADERS_REJECTED: &str = "baton_proxy_headers_rejected_total";

/// The `result` values of [`CONFIG_RELOADS`]: the reload applied, or was rejected whole.
pub const RELOAD_RESULTS: [&str; 2] = ["success", "failed"];
/// The `result` values of [`REEXECS`].
pub const REEXEC_RESULTS: [&str; 3] = ["ok", "refused", "failed"];
/// The `trigger` values of [`UPGRADES`]: the labels of `control::Trigger`, every one of them.
pub const UPGRADE_TRIGGERS: [&str; 8] = [
    "start",
    "signal",
    "api",
    "restart",
    "unhealthy",
    "watch",
    "recycle",
    "rollback",
];
/// The `result` values of [`UPGRADES`]: the labels of `control::UpgradeResult`, every one of them.
pub const UPGRADE_RESULTS: [&str; 3] = ["success", "failed", "rolled_back"];
/// The `reason` values of [`WORKER_RESTARTS`]: the labels of the triggers that replace a worker,
/// `control::Trigger::Restart` (it exited or could not start) and `control::Trigger::Unhealthy`.
pub const RESTART_REASONS: [&str; 2] = ["restart", "unhealthy"];
/// The `result` values of [`HEALTH_CHECKS`].
pub const HEALTH_RESULTS: [&str; 2] = ["success", "failure"];
/// The `reason` values of [`CONNECTIONS_REJECTED`].
pub const REJECT_REASONS: [&str; 6] = [
    "no_worker",
    "max_connections",
    "pending_timeout",
    "drain_timeout",
    "per_client_limit",
    "proxy_header",
];
/// The `version` values of [`PROXY_HEADERS`].
pub const PROXY_VERSIONS: [&str; 2] = ["v1", "v2"];
/// The `side` and `kind` values of [`CONNECTION_ERRORS`] that occur.
pub const ERROR_KINDS: [(Side, &str); 7] = [
    (Side::Worker, "connect"),
    (Side::Worker, "reset"),
    (Side::Client, "reset"),
    (Side::Client, "accept"),
    (Side::Client, "idle_timeout"),
    (Side::Client, "half_close_timeout"),
    (Side::Worker, "half_close_timeout"),
];
/// The `direction` values of [`BYTES`].
pub const DIRECTIONS: [&str; 2] = ["to_worker", "to_client"];
/// The `role` values of [`CONNECTIONS_ACTIVE`].
pub const ROLES: [&str; 2] = ["active", "draining"];

/// Every metric of the daemon, registered in one registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    accepted: IntCounterVec,
    active: IntGaugeVec,
    pending: IntGaugeVec,
    rejected: IntCounterVec,
    proxy_headers: IntCounterVec,
    proxy_rejected: IntCounterVec,
    resent: IntCounterVec,
    errors: IntCounterVec,
    bytes: IntCounterVec,
    connection_duration: HistogramVec,
    connect_duration: HistogramVec,
    ready_duration: HistogramVec,
    drain_duration: HistogramVec,
    upgrades: IntCounterVec,
    upgrade_in_progress: IntGaugeVec,
    generation: IntGaugeVec,
    worker_up: IntGaugeVec,
    draining: IntGaugeVec,
    restarts: IntCounterVec,
    health: IntCounterVec,
    reloads: IntCounterVec,
    last_reload_ok: IntGauge,
    last_reload_time: Gauge,
    reexecs: IntCounterVec,
    reexec_pause: Histogram,
    canary_share: prometheus::GaugeVec,
    canary_connections: IntGaugeVec,
    /// Counter and histogram values a previous image of baton handed over: added to this image's own at
    /// every gather, so that nothing resets across a re-exec.
    carried: Arc<Mutex<Vec<crate::handover::MetricFamily>>>,
    /// How many live [`ServiceMetrics`] sets each service name has: a service removed by a reload may still
    /// drain while one of the same name has started again, and only the last to go removes the series.
    users: Arc<Mutex<HashMap<String, usize>>>,
}

/// The handles of one service, resolved once so the data path does no label lookup.
#[derive(Debug, Clone)]
pub struct ServiceMetrics {
    /// `baton_connections_accepted_total{service}`.
    pub accepted: IntCounter,
    /// `baton_bytes_total{direction="to_worker"}`.
    pub bytes_to_worker: IntCounter,
    /// `baton_bytes_total{direction="to_client"}`.
    pub bytes_to_client: IntCounter,
    /// Dials of the worker that failed or timed out.
    pub worker_connect_errors: IntCounter,
    /// Connections the worker reset or broke.
    pub worker_resets: IntCounter,
    /// Connections the client reset or broke.
    pub client_resets: IntCounter,
    /// Accepts that failed for want of descriptors or memory.
    pub accept_errors: IntCounter,
    /// Connections closed at once because no worker could take them.
    pub rejected_no_worker: IntCounter,
    /// Connections closed at once because `max_connections` were open.
    pub rejected_max_connections: IntCounter,
    /// Connections closed after waiting `pending_timeout` for a worker.
    pub rejected_pending_timeout: IntCounter,
    /// Connections closed at once because `max_connections_per_client` were open from their client.
    pub rejected_per_client: IntCounter,
    /// Connections closed because their PROXY protocol header was refused.
    pub rejected_proxy_header: IntCounter,
    /// PROXY protocol headers read, v1 and v2.
    pub proxy_headers: [IntCounter; 2],
    /// PROXY protocol headers refused, by the reasons of [`crate::proxy_protocol::Rejected::LABELS`].
    pub proxy_rejected: [IntCounter; 6],
    /// Connections waiting for a ready worker.
    pub pending: IntGauge,
    /// Health probes that succeeded.
    pub health_ok: IntCounter,
    /// Health probes that failed.
    pub health_failed: IntCounter,
    /// Connections cut when their worker's drain timed out.
    pub drain_cut: IntCounter,
    /// `baton_connections_resent_total{service}`.
    pub resent: IntCounter,
    /// `baton_connection_duration_seconds{service}`.
    pub connection_duration: Histogram,
    /// `baton_worker_connect_duration_seconds{service}`.
    pub worker_connect_duration: Histogram,
    errors: IntCounterVec,
    name: String,
}

/// Which side of a proxied connection failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The downstream client.
    Client,
    /// The upstream worker.
    Worker,
}

impl Side {
    /// The `side` label value.
    pub fn label(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Worker => "worker",
        }
    }
}

impl Metrics {
    /// Creates and registers every metric, including the process collector.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("metric options are valid");
            register(&registry, metric.clone());
            metric
        };
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            let metric = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), &["service"])
                .expect("metric options are valid");
            register(&registry, metric.clone());
            metric
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("metric options are valid");
            register(&registry, metric.clone());
            metric
        };
        let metrics = Metrics {
            accepted: counter(
                CONNECTIONS_ACCEPTED,
                "Connections accepted on the service's public sockets.",
                &["service"],
            ),
            active: gauge(
                CONNECTIONS_ACTIVE,
                "Connections open now, by the role of their worker (active or draining).",
                &["service", "role"],
            ),
            pending: gauge(
                CONNECTIONS_PENDING,
                "Connections held while the service has no ready worker.",
                &["service"],
            ),
            rejected: counter(
                CONNECTIONS_REJECTED,
                "Connections closed by baton before reaching a worker, by reason.",
                &["service", "reason"],
            ),
            proxy_headers: counter(
                PROXY_HEADERS,
                "PROXY protocol headers read from trusted sources, by version.",
                &["service", "version"],
            ),
            proxy_rejected: counter(
                PROXY_HEADERS_REJECTED,
                "PROXY protocol headers refused from trusted sources, by reason; each closed its connection.",
                &["service", "reason"],
            ),
            resent: counter(
                CONNECTIONS_RESENT,
                "Connections moved to the current worker with the unanswered bytes that their worker closed on \
                 without reading.",
                &["service"],
            ),
            errors: counter(
                CONNECTION_ERRORS,
                "Connection failures, by the side that failed (client or worker) and kind.",
                &["service", "side", "kind"],
            ),
            bytes: counter(
                BYTES,
                "Bytes copied between clients and workers.",
                &["service", "direction"],
            ),
            connection_duration: histogram(
                CONNECTION_DURATION,
                "How long connections lasted, from accept to close.",
                &[
                    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0,
                ],
            ),
            connect_duration: histogram(
                WORKER_CONNECT_DURATION,
                "How long dialling the worker's private socket took.",
                &[
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ],
            ),
            ready_duration: histogram(
                UPGRADE_READY,
                "How long new workers took from spawn to ready.",
                &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0],
            ),
            drain_duration: histogram(
                DRAIN_DURATION,
                "How long old workers took from the start of their drain to their stop.",
                &[0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0],
            ),
            upgrades: counter(
                UPGRADES,
                "Finished upgrades, by trigger and result.",
                &["service", "trigger", "result"],
            ),
            upgrade_in_progress: gauge(
                UPGRADE_IN_PROGRESS,
                "1 while an upgrade of the service runs.",
                &["service"],
            ),
            generation: gauge(
                WORKER_GENERATION,
                "Generation of the worker that new connections go to.",
                &["service"],
            ),
            worker_up: gauge(
                WORKER_UP,
                "1 when the service has a worker taking new connections.",
                &["service"],
            ),
            draining: gauge(
                WORKERS_DRAINING,
                "Old workers still finishing their connections.",
                &["service"],
            ),
            restarts: counter(WORKER_RESTARTS, "Worker restarts, by reason.", &["service", "reason"]),
            health: counter(
                HEALTH_CHECKS,
                "Health probes of active workers, by result.",
                &["service", "result"],
            ),
            reloads: counter(CONFIG_RELOADS, "Configuration reloads, by result.", &["result"]),
            last_reload_ok: IntGauge::new(
                CONFIG_LAST_RELOAD_SUCCESSFUL,
                "1 when the last configuration reload applied.",
            )
            .expect("metric options are valid"),
            last_reload_time: Gauge::new(
                CONFIG_LAST_RELOAD_SUCCESS_TIMESTAMP,
                "Unix time of the last configuration load that applied.",
            )
            .expect("metric options are valid"),
            reexecs: counter(REEXECS, "Re-execs of baton itself, by result.", &["result"]),
            reexec_pause: Histogram::with_opts(
                HistogramOpts::new(
                    REEXEC_PAUSE,
                    "The longest time a connection went without baton moving its bytes, per re-exec.",
                )
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
            )
            .expect("metric options are valid"),
            canary_share: {
                let metric = prometheus::GaugeVec::new(
                    Opts::new(
                        CANARY_SHARE,
                        "The new worker's share of new connections during a canary, 0 to 1.",
                    ),
                    &["service"],
                )
                .expect("metric options are valid");
                register(&registry, metric.clone());
                metric
            },
            canary_connections: gauge(
                CANARY_CONNECTIONS,
                "Connections of the canary under way (or the last one), by worker (new or previous) and result.",
                &["service", "generation", "result"],
            ),
            registry,
            carried: Arc::default(),
            users: Arc::default(),
        };
        for result in REEXEC_RESULTS {
            metrics.reexecs.with_label_values(&[result]);
        }
        register(&metrics.registry, metrics.reexec_pause.clone());
        for result in RELOAD_RESULTS {
            metrics.reloads.with_label_values(&[result]);
        }
        register(&metrics.registry, metrics.last_reload_ok.clone());
        register(&metrics.registry, metrics.last_reload_time.clone());
        let build = IntGaugeVec::new(
            Opts::new(BUILD_INFO, "Always 1, labelled with baton's version."),
            &["version"],
        )
        .expect("metric options are valid");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        register(&metrics.registry, build);
        register(
            &metrics.registry,
            prometheus::process_collector::ProcessCollector::for_self(),
        );
        metrics.config_loaded();
        metrics
    }

    /// The handles of service `name`. Every series of the service whose labels are known in advance is
    /// exported from now on, at 0 until something happens.
    pub fn service(&self, name: &str) -> ServiceMetrics {
        // Held while the series are made, so that a `forget_service` of the same name cannot interleave.
        let mut users = self.users.lock().unwrap_or_else(PoisonError::into_inner);
        *users.entry(name.to_owned()).or_default() += 1;
        for (side, kind) in ERROR_KINDS {
            self.errors.with_label_values(&[name, side.label(), kind]);
        }
        for reason in RESTART_REASONS {
            self.restarts.with_label_values(&[name, reason]);
        }
        self.canary_share.with_label_values(&[name]);
        for role in CANARY_ROLES {
            for result in CANARY_RESULTS {
                self.canary_connections.with_label_values(&[name, role, result]);
            }
        }
        for trigger in UPGRADE_TRIGGERS {
            for result in UPGRADE_RESULTS {
                self.upgrades.with_label_values(&[name, trigger, result]);
            }
        }
        // Exported empty until the first upgrade or drain, and there for values a re-exec carries.
        self.ready_duration.with_label_values(&[name]);
        self.drain_duration.with_label_values(&[name]);
        let rejected = |reason: &str| {
            debug_assert!(REJECT_REASONS.contains(&reason), "unlisted reason {reason}");
            self.rejected.with_label_values(&[name, reason])
        };
        let health = |result: &str| {
            debug_assert!(HEALTH_RESULTS.contains(&result), "unlisted result {result}");
            self.health.with_label_values(&[name, result])
        };
        let error = |side: Side, kind: &str| {
            debug_assert!(ERROR_KINDS.contains(&(side, kind)), "unlisted error {kind}");
            self.errors.with_label_values(&[name, side.label(), kind])
        };
        ServiceMetrics {
            accepted: self.accepted.with_label_values(&[name]),
            bytes_to_worker: self.bytes.with_label_values(&[name, "to_worker"]),
            bytes_to_client: self.bytes.with_label_values(&[name, "to_client"]),
            worker_connect_errors: error(Side::Worker, "connect"),
            worker_resets: error(Side::Worker, "reset"),
            client_resets: error(Side::Client, "reset"),
            accept_errors: error(Side::Client, "accept"),
            rejected_no_worker: rejected("no_worker"),
            rejected_max_connections: rejected("max_connections"),
            rejected_pending_timeout: rejected("pending_timeout"),
            rejected_per_client: rejected("per_client_limit"),
            rejected_proxy_header: rejected("proxy_header"),
            proxy_headers: PROXY_VERSIONS.map(|version| self.proxy_headers.with_label_values(&[name, version])),
            proxy_rejected: crate::proxy_protocol::Rejected::LABELS
                .map(|reason| self.proxy_rejected.with_label_values(&[name, reason])),
            pending: self.pending.with_label_values(&[name]),
            health_ok: health("success"),
            health_failed: health("failure"),
            drain_cut: rejected("drain_timeout"),
            resent: self.resent.with_label_values(&[name]),
            connection_duration: self.connection_duration.with_label_values(&[name]),
            worker_connect_duration: self.connect_duration.with_label_values(&[name]),
            errors: self.errors.clone(),
            name: name.to_owned(),
        }
    }

    /// Publishes the new worker's share of a canary of `service`, in hundredths of a percent.
    pub fn canary_share(&self, service: &str, share: u16) {
        self.canary_share
            .with_label_values(&[service])
            .set(f64::from(share) / 10_000.0);
    }

    /// Publishes the tallies of a canary of `service`: (connections, failed) of the new and previous worker.
    pub fn canary_tallies(&self, service: &str, new: (u64, u64), previous: (u64, u64)) {
        for (role, (connections, failed)) in [("new", new), ("previous", previous)] {
            let ok = connections.saturating_sub(failed);
            self.canary_connections
                .with_label_values(&[service, role, "ok"])
                .set(i64::try_from(ok).unwrap_or(i64::MAX));
            self.canary_connections
                .with_label_values(&[service, role, "failed"])
                .set(i64::try_from(failed).unwrap_or(i64::MAX));
        }
    }

    /// Records a restart of a service's worker.
    pub fn restart(&self, service: &str, reason: &str) {
        debug_assert!(RESTART_REASONS.contains(&reason), "unlisted restart reason {reason}");
        self.restarts.with_label_values(&[service, reason]).inc();
    }

    /// Records how long a new worker took to become ready.
    pub fn worker_ready(&self, service: &str, took: std::time::Duration) {
        self.ready_duration
            .with_label_values(&[service])
            .observe(took.as_secs_f64());
    }

    /// Records how long an old worker took to drain and stop.
    pub fn drained(&self, service: &str, took: std::time::Duration) {
        self.drain_duration
            .with_label_values(&[service])
            .observe(took.as_secs_f64());
    }

    /// Records the end of an upgrade.
    pub fn upgrade_finished(&self, service: &str, trigger: &str, result: &str) {
        debug_assert!(
            UPGRADE_TRIGGERS.contains(&trigger),
            "unlisted upgrade trigger {trigger}"
        );
        debug_assert!(UPGRADE_RESULTS.contains(&result), "unlisted upgrade result {result}");
        self.upgrades.with_label_values(&[service, trigger, result]).inc();
    }

    /// Publishes the state of one service.
    pub fn service_state(&self, service: &str, state: &ServiceGauges) {
        self.generation
            .with_label_values(&[service])
            .set(state.generation as i64);
        self.worker_up.with_label_values(&[service]).set(i64::from(state.up));
        self.draining.with_label_values(&[service]).set(state.draining as i64);
        self.upgrade_in_progress
            .with_label_values(&[service])
            .set(i64::from(state.upgrading));
        self.active
            .with_label_values(&[service, "active"])
            .set(state.active_connections as i64);
        self.active
            .with_label_values(&[service, "draining"])
            .set(state.draining_connections as i64);
    }

    /// Drops every series of a service that no longer exists, once the last holder of its handles (see
    /// [`Metrics::service`]) is gone.
    pub fn forget_service(&self, service: &str) {
        let mut users = self.users.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = users.get_mut(service) {
            *count -= 1;
            if *count > 0 {
                return;
            }
            users.remove(service);
        }
        for family in self.carried.lock().unwrap_or_else(PoisonError::into_inner).iter_mut() {
            family
                .series
                .retain(|series| series.labels.get("service").is_none_or(|s| s != service));
        }
        for vec in [&self.accepted, &self.resent] {
            let _ = vec.remove_label_values(&[service]);
        }
        for vec in [
            &self.generation,
            &self.worker_up,
            &self.draining,
            &self.upgrade_in_progress,
            &self.pending,
        ] {
            let _ = vec.remove_label_values(&[service]);
        }
        for vec in [
            &self.connection_duration,
            &self.connect_duration,
            &self.ready_duration,
            &self.drain_duration,
        ] {
            let _ = vec.remove_label_values(&[service]);
        }
        for role in ROLES {
            let _ = self.active.remove_label_values(&[service, role]);
        }
        for direction in DIRECTIONS {
            let _ = self.bytes.remove_label_values(&[service, direction]);
        }
        for reason in REJECT_REASONS {
            let _ = self.rejected.remove_label_values(&[service, reason]);
        }
        for version in PROXY_VERSIONS {
            let _ = self.proxy_headers.remove_label_values(&[service, version]);
        }
        for reason in crate::proxy_protocol::Rejected::LABELS {
            let _ = self.proxy_rejected.remove_label_values(&[service, reason]);
        }
        for result in HEALTH_RESULTS {
            let _ = self.health.remove_label_values(&[service, result]);
        }
        for (side, kind) in ERROR_KINDS {
            let _ = self.errors.remove_label_values(&[service, side.label(), kind]);
        }
        for reason in RESTART_REASONS {
            let _ = self.restarts.remove_label_values(&[service, reason]);
        }
        let _ = self.canary_share.remove_label_values(&[service]);
        for role in CANARY_ROLES {
            for result in CANARY_RESULTS {
                let _ = self.canary_connections.remove_label_values(&[service, role, result]);
            }
        }
        for trigger in UPGRADE_TRIGGERS {
            for result in UPGRADE_RESULTS {
                let _ = self.upgrades.remove_label_values(&[service, trigger, result]);
            }
        }
    }

    /// Records a configuration load that applied.
    pub fn config_loaded(&self) {
        self.last_reload_ok.set(1);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.last_reload_time.set(now.as_secs_f64());
    }

    /// Records a reload attempt.
    pub fn reload(&self, applied: bool) {
        let [success, failed] = RELOAD_RESULTS;
        self.reloads
            .with_label_values(&[if applied { success } else { failed }])
            .inc();
        if applied {
            self.config_loaded();
        } else {
            self.last_reload_ok.set(0);
        }
    }

    /// Records a re-exec that ended with `result` (one of [`REEXEC_RESULTS`]).
    pub fn reexec(&self, result: &str) {
        debug_assert!(REEXEC_RESULTS.contains(&result), "unlisted re-exec result {result}");
        self.reexecs.with_label_values(&[result]).inc();
    }

    /// Records the pause of a re-exec.
    pub fn reexec_pause(&self, pause: std::time::Duration) {
        self.reexec_pause.observe(pause.as_secs_f64());
    }

    /// Carries on from the values a previous image handed over ([`Metrics::snapshot`]): counters and
    /// histograms continue from them; of the gauges, those no live state sets again (the last reload's).
    pub fn restore(&self, families: &[crate::handover::MetricFamily]) {
        use crate::handover::Value;
        let mut carried = Vec::new();
        for family in families {
            let gauge = family.series.first().and_then(|s| match s.value {
                Value::Gauge(value) => Some(value),
                _ => None,
            });
            match (family.name.as_str(), gauge) {
                (CONFIG_LAST_RELOAD_SUCCESSFUL, Some(value)) => self.last_reload_ok.set(value as i64),
                (CONFIG_LAST_RELOAD_SUCCESS_TIMESTAMP, Some(value)) => self.last_reload_time.set(value),
                (_, Some(_)) => {}
                (_, None) => carried.push(family.clone()),
            }
        }
        *self.carried.lock().unwrap_or_else(PoisonError::into_inner) = carried;
    }

    /// Every family with the carried values added in.
    fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        use crate::handover::Value;
        use prometheus::proto::{Bucket, LabelPair, Metric};
        let mut families = self.registry.gather();
        let carried = self.carried.lock().unwrap_or_else(PoisonError::into_inner);
        for old in carried.iter() {
            let Some(family) = families.iter_mut().find(|f| f.name() == old.name) else {
                continue;
            };
            for series in &old.series {
                let found = family.get_metric().iter().position(|metric| {
                    metric.get_label().len() == series.labels.len()
                        && metric
                            .get_label()
                            .iter()
                            .all(|l| series.labels.get(l.name()).is_some_and(|v| v == l.value()))
                });
                let index = match found {
                    Some(index) => index,
                    None => {
                        let mut metric = Metric::default();
                        let labels = series
                            .labels
                            .iter()
                            .map(|(name, value)| {
                                let mut pair = LabelPair::default();
                                pair.set_name(name.clone());
                                pair.set_value(value.clone());
                                pair
                            })
                            .collect();
                        metric.set_label(labels);
                        family.mut_metric().push(metric);
                        family.get_metric().len() - 1
                    }
                };
                let metric = &mut family.mut_metric()[index];
                match &series.value {
                    Value::Counter(value) => {
                        let counter = metric.counter.mut_or_insert_default();
                        counter.set_value(counter.value() + value);
                    }
                    Value::Histogram { count, sum, buckets } => {
                        let histogram = metric.histogram.mut_or_insert_default();
                        histogram.set_sample_count(histogram.sample_count() + count);
                        histogram.set_sample_sum(histogram.sample_sum() + sum);
                        let live = &mut histogram.bucket;
                        if live.is_empty() {
                            for (bound, _) in buckets {
                                let mut bucket = Bucket::default();
                                bucket.set_upper_bound(*bound);
                                live.push(bucket);
                            }
                        }
                        for bucket in live.iter_mut() {
                            if let Some((_, old)) = buckets.iter().find(|(b, _)| *b == bucket.upper_bound()) {
                                bucket.set_cumulative_count(bucket.cumulative_count() + old);
                            }
                        }
                    }
                    Value::Gauge(_) => {}
                }
            }
        }
        families
    }

    /// Every series' value, for a handover; the process metrics, which the kernel keeps, are left out.
    pub fn snapshot(&self) -> Vec<crate::handover::MetricFamily> {
        use crate::handover::{MetricFamily, Series, Value};
        use prometheus::proto::MetricType;
        self.gather()
            .iter()
            .filter(|family| !family.name().starts_with("process_"))
            .map(|family| MetricFamily {
                name: family.name().to_owned(),
                series: family
                    .get_metric()
                    .iter()
                    .filter_map(|metric| {
                        let value = match family.get_field_type() {
                            MetricType::COUNTER => Value::Counter(metric.get_counter().value()),
                            MetricType::GAUGE => Value::Gauge(metric.get_gauge().value()),
                            MetricType::HISTOGRAM => {
                                let histogram = metric.get_histogram();
                                Value::Histogram {
                                    count: histogram.sample_count(),
                                    sum: histogram.sample_sum(),
                                    buckets: histogram
                                        .get_bucket()
                                        .iter()
                                        .filter(|b| b.upper_bound().is_finite())
                                        .map(|b| (b.upper_bound(), b.cumulative_count()))
                                        .collect(),
                                }
                            }
                            _ => return None,
                        };
                        let labels = metric
                            .get_label()
                            .iter()
                            .map(|l| (l.name().to_owned(), l.value().to_owned()))
                            .collect();
                        Some(Series { labels, value })
                    })
                    .collect(),
            })
            .collect()
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.gather(), &mut out)
            .expect("encoding to a Vec cannot fail");
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl ServiceMetrics {
    /// Counts a failure of `side` of kind `kind` (an uncommon path: it looks the labels up).
    pub fn error(&self, side: Side, kind: &str) {
        debug_assert!(ERROR_KINDS.contains(&(side, kind)), "unlisted error {kind}");
        self.errors.with_label_values(&[&self.name, side.label(), kind]).inc();
    }
}

/// The state gauges of one service, set together.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServiceGauges {
    /// Generation of the worker new connections go to.
    pub generation: u64,
    /// Whether that worker runs.
    pub up: bool,
    /// Number of old workers still draining.
    pub draining: usize,
    /// Whether an upgrade runs.
    pub upgrading: bool,
    /// Connections to the active worker.
    pub active_connections: usize,
    /// Connections to draining workers.
    pub draining_connections: usize,
}

fn register(registry: &Registry, collector: impl Collector + 'static) {
    registry
        .register(Box::new(collector))
        .expect("each metric is registered once");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_holds_the_documented_names() {
        let metrics = Metrics::new();
        let web = metrics.service("web");
        web.accepted.inc();
        web.error(Side::Worker, "connect");
        metrics.upgrade_finished("web", "signal", "success");
        metrics.service_state(
            "web",
            &ServiceGauges {
                generation: 3,
                up: true,
                ..ServiceGauges::default()
            },
        );
        let text = metrics.encode();
        for needle in [
            "baton_connections_accepted_total{service=\"web\"} 1",
            "baton_connections_resent_total{service=\"web\"} 0",
            "baton_worker_generation{service=\"web\"} 3",
            "baton_upgrades_total{result=\"success\",service=\"web\",trigger=\"signal\"} 1",
            "baton_connection_errors_total{kind=\"connect\",service=\"web\",side=\"worker\"} 1",
            "baton_build_info{version=",
            "baton_config_last_reload_successful 1",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        metrics.forget_service("web");
        assert!(!metrics.encode().contains("baton_worker_generation{service=\"web\"}"));
    }

    #[test]
    fn a_fresh_registry_exports_every_known_series_at_zero() {
        let metrics = Metrics::new();
        let _web = metrics.service("web");
        let text = metrics.encode();
        let mut expected = vec![
            "baton_config_reloads_total{result=\"success\"} 0".to_owned(),
            "baton_config_reloads_total{result=\"failed\"} 0".to_owned(),
        ];
        for reason in ["restart", "unhealthy"] {
            expected.push(format!(
                "baton_worker_restarts_total{{reason=\"{reason}\",service=\"web\"}} 0"
            ));
        }
        for trigger in ["start", "signal", "api", "restart", "unhealthy"] {
            for result in ["success", "failed", "rolled_back"] {
                expected.push(format!(
                    "baton_upgrades_total{{result=\"{result}\",service=\"web\",trigger=\"{trigger}\"}} 0"
                ));
            }
        }
        for result in ["success", "failure"] {
            expected.push(format!(
                "baton_health_checks_total{{result=\"{result}\",service=\"web\"}} 0"
            ));
        }
        for reason in ["no_worker", "max_connections", "pending_timeout", "drain_timeout"] {
            expected.push(format!(
                "baton_connections_rejected_total{{reason=\"{reason}\",service=\"web\"}} 0"
            ));
        }
        for (side, kind) in [
            ("worker", "connect"),
            ("worker", "reset"),
            ("client", "reset"),
            ("client", "accept"),
            ("client", "idle_timeout"),
            ("client", "half_close_timeout"),
            ("worker", "half_close_timeout"),
        ] {
            expected.push(format!(
                "baton_connection_errors_total{{kind=\"{kind}\",service=\"web\",side=\"{side}\"}} 0"
            ));
        }
        for direction in ["to_worker", "to_client"] {
            expected.push(format!(
                "baton_bytes_total{{direction=\"{direction}\",service=\"web\"}} 0"
            ));
        }
        expected.push("baton_connections_accepted_total{service=\"web\"} 0".to_owned());
        for line in &expected {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn forgetting_a_service_removes_every_series_it_had() {
        let metrics = Metrics::new();
        let web = metrics.service("web");
        let _other = metrics.service("other");
        web.accepted.inc();
        web.error(Side::Client, "idle_timeout");
        metrics.restart("web", "unhealthy");
        metrics.upgrade_finished("web", "api", "rolled_back");
        metrics.worker_ready("web", std::time::Duration::from_millis(5));
        metrics.drained("web", std::time::Duration::from_millis(5));
        metrics.service_state("web", &ServiceGauges::default());
        assert!(metrics.encode().contains("service=\"web\""));
        metrics.forget_service("web");
        let text = metrics.encode();
        let left: Vec<&str> = text.lines().filter(|l| l.contains("service=\"web\"")).collect();
        assert!(left.is_empty(), "series of a forgotten service: {left:#?}");
        assert!(text.contains("baton_upgrades_total{result=\"success\",service=\"other\",trigger=\"start\"} 0"));
    }

    #[test]
    fn carried_values_go_on_in_the_next_image_and_the_one_after() {
        use crate::handover::Value;
        let value = |families: &[crate::handover::MetricFamily], name: &str| -> Option<Value> {
            families
                .iter()
                .find(|f| f.name == name)
                .and_then(|f| {
                    f.series
                        .iter()
                        .find(|s| s.labels.get("service").is_some_and(|v| v == "web"))
                })
                .map(|s| s.value.clone())
        };
        let first = Metrics::new();
        let web = first.service("web");
        web.accepted.inc_by(5);
        first.worker_ready("web", std::time::Duration::from_millis(30));
        first.reload(true);
        let handed = first.snapshot();

        let second = Metrics::new();
        second.restore(&handed);
        let web = second.service("web");
        assert_eq!(second.snapshot(), handed, "nothing reset, nothing counted twice");
        web.accepted.inc();
        second.worker_ready("web", std::time::Duration::from_millis(300));
        let carried = second.snapshot();
        assert_eq!(value(&carried, CONNECTIONS_ACCEPTED), Some(Value::Counter(6.0)));
        let Some(Value::Histogram { count, sum, buckets }) = value(&carried, UPGRADE_READY) else {
            panic!("the ready histogram: {carried:?}");
        };
        assert_eq!(count, 2);
        assert!((sum - 0.33).abs() < 1e-9, "{sum}");
        assert_eq!(
            buckets.iter().find(|(bound, _)| *bound == 0.05).map(|(_, c)| *c),
            Some(1)
        );
        assert_eq!(
            buckets.iter().find(|(bound, _)| *bound == 0.5).map(|(_, c)| *c),
            Some(2)
        );
        assert!(
            second
                .encode()
                .contains("baton_config_reloads_total{result=\"success\"} 1")
        );

        // A third image carries the sum on, not the second image's own counts only.
        let third = Metrics::new();
        third.restore(&carried);
        let _web = third.service("web");
        assert_eq!(third.snapshot(), carried);
        third.forget_service("web");
        assert!(
            !third.encode().contains("service=\"web\""),
            "a forgotten service's carried values go too"
        );
    }

    #[test]
    fn a_service_started_again_while_the_old_one_drains_keeps_its_series() {
        let metrics = Metrics::new();
        let _retiring = metrics.service("web");
        let again = metrics.service("web");
        // The removed service finishes draining after the new one of the same name started.
        metrics.forget_service("web");
        again.accepted.inc();
        assert!(
            metrics
                .encode()
                .contains("baton_connections_accepted_total{service=\"web\"} 1")
        );
        metrics.forget_service("web");
        assert!(!metrics.encode().contains("service=\"web\""));
    }
}
