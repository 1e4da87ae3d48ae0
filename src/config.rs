//! The configuration file: TOML text in, a validated, typed [`Config`] out.
//!
//! Owns parsing, defaults and validation. It is pure: it reads the file's text and nothing else, never
//! binds or spawns, so `baton check` and a reload can run it safely. Every error names the file, the line
//! and column, and the service it belongs to.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::endpoint::{Endpoint, socket_addr};

/// Address of the admin HTTP API when `[admin].listen` is not set.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9900";
/// Seconds the old worker's connections may take to finish after a switch.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Seconds between `stop_signal` and SIGKILL.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Seconds allowed to dial the worker's private socket.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Milliseconds between two readiness probes.
pub const DEFAULT_READINESS_INTERVAL: Duration = Duration::from_millis(100);
/// Seconds a new worker has to become ready.
pub const DEFAULT_READINESS_TIMEOUT: Duration = Duration::from_secs(30);
/// Signal sent to a drained worker.
pub const DEFAULT_STOP_SIGNAL: Signal = Signal::SIGTERM;
/// Length of the kernel's queue of connections not yet accepted, per listening socket.
pub const DEFAULT_BACKLOG: u32 = 1024;
/// Seconds the previous worker is kept warm after a switch, for an automatic rollback.
pub const DEFAULT_WATCHDOG: Duration = Duration::from_secs(10);
/// Seconds a connection may be held while the service has no ready worker.
pub const DEFAULT_PENDING_TIMEOUT: Duration = Duration::from_secs(5);
/// Seconds (ten minutes) without a byte either way after which a connection is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Seconds a half-closed connection may stay silent before it is closed.
pub const DEFAULT_HALF_CLOSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Old workers that may drain at once per service; the oldest is cut to make room.
pub const DEFAULT_MAX_DRAINING: u32 = 3;
/// Seconds between two health probes of the active worker.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// Seconds one health probe may take.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Consecutive failed probes that make a worker unhealthy.
pub const DEFAULT_HEALTH_FAILURES: u32 = 3;
/// Consecutive good probes that make an unhealthy worker healthy again.
pub const DEFAULT_HEALTH_SUCCESSES: u32 = 2;
/// How long a watched path must stay unchanged before its change upgrades the service.
pub const DEFAULT_WATCH_SETTLE: Duration = Duration::from_secs(2);
/// How long a `prepare` command may run.
pub const DEFAULT_PREPARE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a trusted source has to send its whole PROXY protocol header.
pub const DEFAULT_PROXY_PROTOCOL_TIMEOUT: Duration = Duration::from_secs(3);

/// The longest duration any setting takes (a year), so that deadlines computed from it cannot overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// The placeholders a `command` argument or `env` value may hold.
const PLACEHOLDERS: [&str; 4] = ["{port}", "{socket}", "{service}", "{generation}"];

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from, for messages and reloads.
    pub path: PathBuf,
    /// The text it was read from: the running configuration as loaded, which a handover carries.
    pub text: String,
    /// The admin API.
    pub admin: AdminConfig,
    /// The services by name, in name order.
    pub services: BTreeMap<String, Arc<ServiceConfig>>,
    /// The `[daemon]` table: baton itself.
    pub daemon: DaemonConfig,
}

/// The `[daemon]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DaemonConfig {
    /// Whether baton re-executes itself when its own binary, at the path it was started from, is replaced.
    pub reexec_on_change: bool,
}

/// The `[admin]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Where the admin HTTP API listens: a TCP address (one that is not loopback needs a token) or a Unix
    /// socket, created with mode 0600.
    pub listen: Endpoint,
    /// A file holding the bearer token every request but `/healthz` must present.
    pub token_file: Option<PathBuf>,
}

/// One `[service.NAME]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    /// The stanza's name.
    pub name: String,
    /// Public addresses, at least one, none shared with another service.
    pub listen: Vec<SocketAddr>,
    /// The worker's argv, placeholders not yet substituted; never empty.
    pub command: Vec<String>,
    /// Which kind of private socket the worker listens on.
    pub backend: Backend,
    /// The worker's working directory; baton's own when unset.
    pub cwd: Option<PathBuf>,
    /// The user the worker runs as (baton must run as root); baton's own when unset.
    pub user: Option<String>,
    /// The group the worker runs as; the user's primary group when unset.
    pub group: Option<String>,
    /// Where the worker's stdout and stderr go.
    pub output: Output,
    /// Variables added to the worker's environment, placeholders not yet substituted.
    pub env: BTreeMap<String, String>,
    /// How long the old worker's connections may take to finish after a switch.
    pub drain_timeout: Duration,
    /// Signal sent to a drained worker.
    pub stop_signal: Signal,
    /// How long a signalled worker has to exit before SIGKILL.
    pub stop_timeout: Duration,
    /// How long dialling the worker's private socket may take.
    pub connect_timeout: Duration,
    /// Listen queue length of each public socket.
    pub backlog: u32,
    /// How a new worker is found ready.
    pub readiness: Readiness,
    /// How long the previous worker is kept warm after a switch (zero: no watchdog, drain at once).
    pub watchdog: Duration,
    /// How long a connection may wait for a ready worker.
    pub pending_timeout: Duration,
    /// Open connections allowed at once (zero: no limit).
    pub max_connections: u32,
    /// Silence, both ways, after which a connection is closed (zero: never).
    pub idle_timeout: Duration,
    /// Silence after one direction has closed after which the connection is closed.
    pub half_close_timeout: Duration,
    /// When the draining worker gets `stop_signal`.
    pub drain_policy: DrainPolicy,
    /// Whether bytes a worker closed on without reading go to the current worker on a new connection.
    pub resend_unanswered: bool,
    /// Old workers that may drain at once; the oldest is cut to make room.
    pub max_draining: u32,
    /// How the active worker is watched.
    pub health: Health,
    /// The PROXY protocol header sent to the worker ahead of each connection's bytes, and ahead of each
    /// probe; none when unset.
    pub proxy_protocol: Option<crate::proxy_protocol::Version>,
    /// Sources (load balancers) whose connections must begin with a PROXY protocol header, whose client
    /// address then stands for the connection's; empty: none.
    pub accept_proxy_protocol: Vec<ipnet::IpNet>,
    /// How long such a source has to send its whole header.
    pub proxy_protocol_timeout: Duration,
    /// Open connections allowed from one client address at once (zero: no limit).
    pub max_connections_per_client: u32,
    /// Paths whose change (a symlink flipped, a file replaced or rewritten) upgrades the service.
    pub watch: Vec<PathBuf>,
    /// How long the watched paths must stay unchanged before a change upgrades the service.
    pub watch_settle: Duration,
    /// How long a worker serves before it is replaced; none when unset.
    pub max_lifetime: Option<Duration>,
    /// A command run before each new worker is spawned (placeholders substituted, the worker's user, cwd
    /// and env); empty: none.
    pub prepare: Vec<String>,
    /// How long `prepare` may run before the upgrade fails.
    pub prepare_timeout: Duration,
    /// When automatic upgrades (a changed release, a recycle) may run; any time when unset.
    pub upgrade_window: Option<crate::window::Window>,
    /// How a new worker takes the traffic step by step, judged on it; all at once when unset.
    pub canary: Option<Canary>,
}

/// The `canary` table of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Canary {
    /// The new worker's share of new connections at each step, in hundredths of a percent, rising.
    pub steps: Vec<u16>,
    /// How long each step lasts.
    pub step_time: Duration,
    /// Whether one client address's connections go to one generation (else each connection draws).
    pub sticky: bool,
    /// How much the new worker's share of connections that ended badly on its side may exceed the
    /// previous one's before it is rolled back, in hundredths of a percent.
    pub max_error_rate: u16,
    /// Connections the new worker must have had before it is judged.
    pub min_connections: u64,
}

/// The new worker's share of bad connections over the previous one's that rolls a canary back, in
/// hundredths of a percent (1%).
pub const DEFAULT_CANARY_MAX_ERROR_RATE: u16 = 100;
/// Connections a canary worker must have had before it is judged.
pub const DEFAULT_CANARY_MIN_CONNECTIONS: u64 = 20;
/// How long a canary step lasts.
pub const DEFAULT_CANARY_STEP_TIME: Duration = Duration::from_secs(30);

/// Where a worker's stdout and stderr go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Into baton's log, line by line, tagged with service, generation and pid.
    Log,
    /// Straight to baton's own stdout and stderr.
    Inherit,
}

/// When a draining worker is signalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainPolicy {
    /// After its connections have closed (or at `drain_timeout`): right for servers that die at once on
    /// SIGTERM.
    Wait,
    /// As soon as it starts draining, so that a server with a graceful shutdown closes its idle keep-alive
    /// connections itself; `drain_timeout` still bounds the wait.
    Signal,
}

/// The `[service.NAME.health]` table: periodic probes of the active worker (the readiness probe).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Time between probes.
    pub interval: Duration,
    /// Time one probe may take.
    pub timeout: Duration,
    /// Consecutive failures that make the worker unhealthy (fall).
    pub failures: u32,
    /// Consecutive successes that make it healthy again (rise).
    pub successes: u32,
}

/// The private socket a worker listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A loopback TCP port picked by baton: `{port}`, `$PORT`.
    Tcp,
    /// A Unix socket in baton's private runtime directory: `{socket}`, `$BATON_SOCKET`.
    Unix,
}

/// The `[service.NAME.readiness]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// HTTP path probed with GET (2xx is ready); a plain connect when unset.
    pub path: Option<String>,
    /// Time between probes.
    pub interval: Duration,
    /// Time after which a worker that is not ready fails the upgrade.
    pub timeout: Duration,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// What the read returned.
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid TOML or does not fit the schema; toml's own message carries the position.
    #[error("{path}: {message}")]
    Syntax {
        /// The configuration file.
        path: PathBuf,
        /// toml's message, with line, column and a caret under the offending text.
        message: String,
    },
    /// A value fits the schema but not its meaning.
    #[error("{path}:{line}:{column}: {message}\n{snippet}")]
    Invalid {
        /// The configuration file.
        path: PathBuf,
        /// One-based line of the offending value.
        line: usize,
        /// One-based column of the offending value.
        column: usize,
        /// What is wrong, naming the service and key.
        message: String,
        /// The offending line with a caret under the value.
        snippet: String,
    },
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Validates `text`, read from `path` (used in messages only).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        Validator { path, text }.config(raw)
    }
}

impl ServiceConfig {
    /// Whether `other` would start its workers differently: another command, backend, directory,
    /// environment, user or group. Other settings apply to a running worker.
    pub fn worker_differs(&self, other: &ServiceConfig) -> bool {
        self.command != other.command
            || self.backend != other.backend
            || self.cwd != other.cwd
            || self.env != other.env
            || self.user != other.user
            || self.group != other.group
    }

    /// The environment variable that tells the worker its private address.
    pub fn address_variable(&self) -> &'static str {
        match self.backend {
            Backend::Tcp => "PORT",
            Backend::Unix => "BATON_SOCKET",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Tcp => "tcp",
            Backend::Unix => "unix",
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    admin: Option<RawAdmin>,
    daemon: Option<RawDaemon>,
    #[serde(default)]
    service: BTreeMap<String, Spanned<RawService>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    reexec_on_change: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<Spanned<String>>,
    token_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    listen: Spanned<Vec<Spanned<String>>>,
    command: Spanned<Vec<String>>,
    backend: Option<Spanned<String>>,
    cwd: Option<PathBuf>,
    user: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    output: Option<Spanned<String>>,
    #[serde(default)]
    env: BTreeMap<String, Spanned<String>>,
    drain_timeout: Option<Spanned<String>>,
    stop_signal: Option<Spanned<String>>,
    stop_timeout: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    backlog: Option<Spanned<u32>>,
    readiness: Option<RawReadiness>,
    watchdog: Option<Spanned<String>>,
    pending_timeout: Option<Spanned<String>>,
    max_connections: Option<u32>,
    idle_timeout: Option<Spanned<String>>,
    half_close_timeout: Option<Spanned<String>>,
    drain_policy: Option<Spanned<String>>,
    resend_unanswered: Option<bool>,
    max_draining: Option<Spanned<u32>>,
    health: Option<RawHealth>,
    proxy_protocol: Option<Spanned<String>>,
    accept_proxy_protocol: Option<Vec<Spanned<String>>>,
    proxy_protocol_timeout: Option<Spanned<String>>,
    max_connections_per_client: Option<u32>,
    watch: Option<Spanned<Vec<Spanned<String>>>>,
    watch_settle: Option<Spanned<String>>,
    max_lifetime: Option<Spanned<String>>,
    prepare: Option<Spanned<Vec<String>>>,
    prepare_timeout: Option<Spanned<String>>,
    upgrade_window: Option<Spanned<String>>,
    canary: Option<Spanned<RawCanary>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCanary {
    steps: Spanned<Vec<Spanned<String>>>,
    step_time: Option<Spanned<String>>,
    sticky: Option<bool>,
    max_error_rate: Option<Spanned<String>>,
    min_connections: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    failures: Option<Spanned<u32>>,
    successes: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReadiness {
    path: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
}

/// Turns the raw, spanned tables into a [`Config`], reporting the first problem with its position.
struct Validator<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Validator<'_> {
    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let raw_admin = raw.admin.unwrap_or(RawAdmin {
            listen: None,
            token_file: None,
        });
        let listen = match &raw_admin.listen {
            Some(listen) => listen
                .get_ref()
                .parse::<Endpoint>()
                .map_err(|e| self.error(listen.span(), format!("admin: listen {e}")))?,
            None => DEFAULT_ADMIN_LISTEN.parse().expect("the default admin address parses"),
        };
        if let (Endpoint::Tcp(addr), None) = (&listen, &raw_admin.token_file) {
            if !addr.ip().is_loopback() {
                let span = raw_admin.listen.as_ref().map_or(0..0, |l| l.span());
                return Err(self.error(
                    span,
                    format!(
                        "admin: listen `{addr}` is not a loopback address: anyone who reaches it could upgrade and \
                         reload; set [admin] token_file to require a bearer token, or listen on loopback or unix:"
                    ),
                ));
            }
        }
        let admin = AdminConfig {
            listen,
            token_file: raw_admin.token_file,
        };
        if raw.service.is_empty() {
            return Err(self.error(0..0, "no service is configured: add a [service.NAME] table".into()));
        }
        let mut services = BTreeMap::new();
        let mut owners: HashMap<SocketAddr, &str> = HashMap::new();
        for (name, spanned) in &raw.service {
            let span = spanned.span();
            let service = self.service(name, span, spanned.get_ref())?;
            for (addr, raw_addr) in service.listen.iter().zip(&spanned.get_ref().listen.get_ref()[..]) {
                // Several services may each ask for an ephemeral port on the same address.
                if addr.port() == 0 {
                    continue;
                }
                if let Some(other) = owners.insert(*addr, name) {
                    let message = if other == name {
                        format!("service `{name}`: listen `{addr}` is listed twice")
                    } else {
                        format!("service `{name}`: listen `{addr}` is already used by service `{other}`")
                    };
                    return Err(self.error(raw_addr.span(), message));
                }
            }
            services.insert(name.clone(), Arc::new(service));
        }
        Ok(Config {
            path: self.path.to_owned(),
            text: self.text.to_owned(),
            admin,
            services,
            daemon: DaemonConfig {
                reexec_on_change: raw.daemon.and_then(|d| d.reexec_on_change).unwrap_or(false),
            },
        })
    }

    fn service(&self, name: &str, span: Range<usize>, raw: &RawService) -> Result<ServiceConfig, ConfigError> {
        let at = |span: Range<usize>, message: String| self.error(span, format!("service `{name}`: {message}"));
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(at(
                span,
                "a service name may hold only ASCII letters, digits, `-` and `_`".into(),
            ));
        }
        if raw.listen.get_ref().is_empty() {
            return Err(at(
                raw.listen.span(),
                "listen is empty: give at least one address".into(),
            ));
        }
        let listen = raw
            .listen
            .get_ref()
            .iter()
            .map(|a| self.address(&format!("service `{name}`: listen"), a))
            .collect::<Result<Vec<_>, _>>()?;
        let command = raw.command.get_ref().clone();
        if command.is_empty() || command[0].is_empty() {
            return Err(at(
                raw.command.span(),
                "command is empty: give the worker's argv".into(),
            ));
        }
        let backend = choice(
            "backend",
            &raw.backend,
            &[("tcp", Backend::Tcp), ("unix", Backend::Unix)],
        )
        .map_err(|(span, message)| at(span, message))?;
        let wrong_placeholder = match backend {
            Backend::Tcp => "{socket}",
            Backend::Unix => "{port}",
        };
        if let Some(arg) = command.iter().find(|a| a.contains(wrong_placeholder)) {
            return Err(at(
                raw.command.span(),
                format!(
                    "command argument `{arg}` uses {wrong_placeholder}, which backend = \"{backend}\" does not provide"
                ),
            ));
        }
        let mut env = BTreeMap::new();
        for (key, value) in &raw.env {
            if key.is_empty() || key.contains('=') || key.contains('\0') || value.get_ref().contains('\0') {
                return Err(at(value.span(), format!("env `{key}` is not a valid variable")));
            }
            if value.get_ref().contains(wrong_placeholder) {
                return Err(at(
                    value.span(),
                    format!("env `{key}` uses {wrong_placeholder}, which backend = \"{backend}\" does not provide"),
                ));
            }
            env.insert(key.clone(), value.get_ref().clone());
        }
        let duration = |key: &str, value: &Option<Spanned<String>>, default: Duration| match value {
            None => Ok(default),
            Some(v) => match humantime::parse_duration(v.get_ref()) {
                Ok(d) if d > MAX_DURATION => {
                    Err(at(v.span(), format!("{key} `{}` is longer than a year", v.get_ref())))
                }
                Ok(d) => Ok(d),
                Err(e) => Err(at(v.span(), format!("{key} `{}` is not a duration: {e}", v.get_ref()))),
            },
        };
        let positive = |key: &str, value: &Option<Spanned<String>>, default: Duration| {
            let d = duration(key, value, default)?;
            if d.is_zero() {
                let at_value = value.as_ref().map_or(span.clone(), |v| v.span());
                return Err(at(at_value, format!("{key} must be greater than zero")));
            }
            Ok(d)
        };
        let stop_signal = match &raw.stop_signal {
            None => DEFAULT_STOP_SIGNAL,
            Some(s) => parse_signal(s.get_ref()).ok_or_else(|| {
                at(
                    s.span(),
                    format!("stop_signal `{}` is not a signal name (like \"SIGTERM\")", s.get_ref()),
                )
            })?,
        };
        let backlog = match &raw.backlog {
            None => DEFAULT_BACKLOG,
            Some(b) if *b.get_ref() == 0 || *b.get_ref() > i32::MAX as u32 => {
                return Err(at(b.span(), "backlog must be between 1 and 2147483647".into()));
            }
            Some(b) => *b.get_ref(),
        };
        let no_readiness = RawReadiness {
            path: None,
            interval: None,
            timeout: None,
        };
        let r = raw.readiness.as_ref().unwrap_or(&no_readiness);
        if let Some(p) = &r.path {
            let p_str = p.get_ref();
            if !p_str.starts_with('/') || p_str.parse::<hyper::Uri>().is_err() {
                return Err(at(
                    p.span(),
                    format!("readiness.path `{p_str}` is not an absolute URL path like \"/readyz\""),
                ));
            }
        }
        let readiness = Readiness {
            path: r.path.as_ref().map(|p| p.get_ref().clone()),
            interval: positive("readiness.interval", &r.interval, DEFAULT_READINESS_INTERVAL)?,
            timeout: duration("readiness.timeout", &r.timeout, DEFAULT_READINESS_TIMEOUT)?,
        };
        let connect_timeout = positive("connect_timeout", &raw.connect_timeout, DEFAULT_CONNECT_TIMEOUT)?;
        let output = choice(
            "output",
            &raw.output,
            &[("log", Output::Log), ("inherit", Output::Inherit)],
        )
        .map_err(|(span, message)| at(span, message))?;
        let drain_policy = choice(
            "drain_policy",
            &raw.drain_policy,
            &[("wait", DrainPolicy::Wait), ("signal", DrainPolicy::Signal)],
        )
        .map_err(|(span, message)| at(span, message))?;
        let count = |key: &str, value: &Option<Spanned<u32>>, default: u32| match value {
            None => Ok(default),
            Some(v) if *v.get_ref() == 0 => Err(at(v.span(), format!("{key} must be at least 1"))),
            Some(v) => Ok(*v.get_ref()),
        };
        let name_of = |key: &str, value: &Option<Spanned<String>>| match value {
            Some(v) if v.get_ref().is_empty() || v.get_ref().contains(['\0', ':', '/']) => {
                Err(at(v.span(), format!("{key} `{}` is not a valid name", v.get_ref())))
            }
            other => Ok(other.as_ref().map(|v| v.get_ref().clone())),
        };
        let no_health = RawHealth::default();
        let h = raw.health.as_ref().unwrap_or(&no_health);
        let health = Health {
            interval: positive("health.interval", &h.interval, DEFAULT_HEALTH_INTERVAL)?,
            timeout: positive("health.timeout", &h.timeout, DEFAULT_HEALTH_TIMEOUT)?,
            failures: count("health.failures", &h.failures, DEFAULT_HEALTH_FAILURES)?,
            successes: count("health.successes", &h.successes, DEFAULT_HEALTH_SUCCESSES)?,
        };
        let proxy_protocol = match &raw.proxy_protocol {
            None => None,
            Some(v) => Some(v.get_ref().parse().map_err(|()| {
                at(
                    v.span(),
                    format!("proxy_protocol `{}` is unknown: use \"v1\" or \"v2\"", v.get_ref()),
                )
            })?),
        };
        let mut accept_proxy_protocol: Vec<ipnet::IpNet> = Vec::new();
        for raw_net in raw.accept_proxy_protocol.iter().flatten() {
            let net =
                network(raw_net.get_ref()).map_err(|e| at(raw_net.span(), format!("accept_proxy_protocol {e}")))?;
            if accept_proxy_protocol.contains(&net) {
                return Err(at(raw_net.span(), format!("accept_proxy_protocol lists `{net}` twice")));
            }
            accept_proxy_protocol.push(net);
        }
        let mut watch: Vec<PathBuf> = Vec::new();
        for raw_path in raw.watch.iter().flat_map(|w| w.get_ref().iter()) {
            let path = PathBuf::from(raw_path.get_ref());
            if !path.is_absolute() {
                return Err(at(
                    raw_path.span(),
                    format!("watch `{}` is not an absolute path", raw_path.get_ref()),
                ));
            }
            if watch.contains(&path) {
                return Err(at(
                    raw_path.span(),
                    format!("watch lists `{}` twice", raw_path.get_ref()),
                ));
            }
            watch.push(path);
        }
        let prepare = raw.prepare.as_ref().map(|p| p.get_ref().clone()).unwrap_or_default();
        if let Some(raw_prepare) = &raw.prepare {
            if prepare.first().is_none_or(String::is_empty) {
                return Err(at(
                    raw_prepare.span(),
                    "prepare is empty: give a command's argv, or leave it out".into(),
                ));
            }
            if let Some(arg) = prepare.iter().find(|a| a.contains("{port}") || a.contains("{socket}")) {
                return Err(at(
                    raw_prepare.span(),
                    format!(
                        "prepare argument `{arg}` names the worker's address, which is chosen after prepare runs: \
                         only {{service}} and {{generation}} are replaced"
                    ),
                ));
            }
        }
        let upgrade_window = match &raw.upgrade_window {
            None => None,
            Some(w) => Some(
                crate::window::Window::parse(w.get_ref()).map_err(|e| at(w.span(), format!("upgrade_window {e}")))?,
            ),
        };
        let canary = match &raw.canary {
            None => None,
            Some(c) => {
                let c = c.get_ref();
                let mut steps: Vec<u16> = Vec::new();
                for step in c.steps.get_ref() {
                    let share = percent(step.get_ref())
                        .filter(|share| *share > 0 && *share < 10_000)
                        .ok_or_else(|| {
                            at(
                                step.span(),
                                format!(
                                    "canary step `{}` is not a share between 0% and 100% (both excluded), like \"5%\"",
                                    step.get_ref()
                                ),
                            )
                        })?;
                    if steps.last().is_some_and(|last| *last >= share) {
                        return Err(at(step.span(), "canary steps must rise".into()));
                    }
                    steps.push(share);
                }
                if steps.is_empty() {
                    return Err(at(
                        c.steps.span(),
                        "canary steps is empty: give at least one, like [\"10%\"]".into(),
                    ));
                }
                let max_error_rate = match &c.max_error_rate {
                    None => DEFAULT_CANARY_MAX_ERROR_RATE,
                    Some(rate) => percent(rate.get_ref()).ok_or_else(|| {
                        at(
                            rate.span(),
                            format!("canary max_error_rate `{}` is not a share like \"1%\"", rate.get_ref()),
                        )
                    })?,
                };
                Some(Canary {
                    steps,
                    step_time: positive("canary.step_time", &c.step_time, DEFAULT_CANARY_STEP_TIME)?,
                    sticky: c.sticky.unwrap_or(true),
                    max_error_rate,
                    min_connections: c.min_connections.unwrap_or(DEFAULT_CANARY_MIN_CONNECTIONS),
                })
            }
        };
        let max_lifetime = match &raw.max_lifetime {
            None => None,
            Some(_) => Some(positive("max_lifetime", &raw.max_lifetime, Duration::ZERO)?),
        };
        Ok(ServiceConfig {
            name: name.to_owned(),
            listen,
            command,
            backend,
            cwd: raw.cwd.clone(),
            user: name_of("user", &raw.user)?,
            group: name_of("group", &raw.group)?,
            output,
            env,
            drain_timeout: duration("drain_timeout", &raw.drain_timeout, DEFAULT_DRAIN_TIMEOUT)?,
            stop_signal,
            stop_timeout: duration("stop_timeout", &raw.stop_timeout, DEFAULT_STOP_TIMEOUT)?,
            connect_timeout,
            backlog,
            readiness,
            watchdog: duration("watchdog", &raw.watchdog, DEFAULT_WATCHDOG)?,
            pending_timeout: duration("pending_timeout", &raw.pending_timeout, DEFAULT_PENDING_TIMEOUT)?,
            max_connections: raw.max_connections.unwrap_or(0),
            idle_timeout: duration("idle_timeout", &raw.idle_timeout, DEFAULT_IDLE_TIMEOUT)?,
            half_close_timeout: duration(
                "half_close_timeout",
                &raw.half_close_timeout,
                DEFAULT_HALF_CLOSE_TIMEOUT,
            )?,
            drain_policy,
            resend_unanswered: raw.resend_unanswered.unwrap_or(true),
            max_draining: count("max_draining", &raw.max_draining, DEFAULT_MAX_DRAINING)?,
            health,
            proxy_protocol,
            accept_proxy_protocol,
            proxy_protocol_timeout: positive(
                "proxy_protocol_timeout",
                &raw.proxy_protocol_timeout,
                DEFAULT_PROXY_PROTOCOL_TIMEOUT,
            )?,
            max_connections_per_client: raw.max_connections_per_client.unwrap_or(0),
            watch,
            watch_settle: duration("watch_settle", &raw.watch_settle, DEFAULT_WATCH_SETTLE)?,
            max_lifetime,
            prepare,
            prepare_timeout: positive("prepare_timeout", &raw.prepare_timeout, DEFAULT_PREPARE_TIMEOUT)?,
            upgrade_window,
            canary,
        })
    }

    fn address(&self, what: &str, raw: &Spanned<String>) -> Result<SocketAddr, ConfigError> {
        socket_addr(raw.get_ref()).map_err(|e| self.error(raw.span(), format!("{what} {e}")))
    }

    fn error(&self, span: Range<usize>, message: String) -> ConfigError {
        let start = span.start.min(self.text.len());
        let line_start = self.text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = self.text[start..].find('\n').map_or(self.text.len(), |i| start + i);
        let line = self.text[..start].matches('\n').count() + 1;
        let column = self.text[line_start..start].chars().count() + 1;
        let source_line = &self.text[line_start..line_end];
        let width = self.text[start..span.end.clamp(start, line_end)].chars().count().max(1);
        let gutter = " ".repeat(line.to_string().len());
        let snippet = format!(
            "{gutter} |\n{line} | {source_line}\n{gutter} | {}{}",
            " ".repeat(column - 1),
            "^".repeat(width)
        );
        ConfigError::Invalid {
            path: self.path.to_owned(),
            line,
            column,
            message,
            snippet,
        }
    }
}

/// One of `options` by its name, the first option when `value` is unset; an unknown name is the error's
/// span and message.
fn choice<T: Copy>(
    key: &str,
    value: &Option<Spanned<String>>,
    options: &[(&str, T)],
) -> Result<T, (Range<usize>, String)> {
    let Some(value) = value else {
        return Ok(options[0].1);
    };
    match options.iter().find(|(name, _)| *name == value.get_ref()) {
        Some((_, choice)) => Ok(*choice),
        None => {
            let names: Vec<String> = options.iter().map(|(name, _)| format!("\"{name}\"")).collect();
            Err((
                value.span(),
                format!("{key} `{}` is unknown: use {}", value.get_ref(), names.join(" or ")),
            ))
        }
    }
}

/// `"5%"` or `"0.5%"` in hundredths of a percent (at most two decimals, at most 100%).
fn percent(text: &str) -> Option<u16> {
    let number = text.trim().strip_suffix('%')?.trim();
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() || fraction.len() > 2 || !whole.bytes().chain(fraction.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: u32 = whole.parse().ok()?;
    let fraction: u32 = format!("{fraction:0<2}").parse().ok()?;
    let share = whole.checked_mul(100)?.checked_add(fraction)?;
    u16::try_from(share).ok().filter(|s| *s <= 10_000)
}

/// Parses a network for `accept_proxy_protocol`: `ADDRESS/PREFIX`, or one address alone. Bits set past
/// the prefix are refused rather than dropped: `10.0.0.1/8` is more likely a mistake than `10.0.0.0/8`.
fn network(text: &str) -> Result<ipnet::IpNet, String> {
    let net = match text.parse::<ipnet::IpNet>() {
        Ok(net) => net,
        Err(_) => match text.parse::<std::net::IpAddr>() {
            Ok(ip) => ipnet::IpNet::from(ip),
            Err(_) => return Err(format!("`{text}` is not a network like \"10.0.0.0/8\" or an address")),
        },
    };
    if net.trunc() != net {
        return Err(format!(
            "`{text}` has bits set past its prefix: the network is `{}`",
            net.trunc()
        ));
    }
    Ok(net)
}

/// Parses "SIGTERM", "TERM" or "sigterm".
pub fn parse_signal(name: &str) -> Option<Signal> {
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse().ok()
}

/// Replaces the placeholders in `text`. `address` stands for `{port}` or `{socket}`, whichever the backend has.
pub fn substitute(text: &str, service: &ServiceConfig, address: &str, generation: u64) -> String {
    if !text.contains('{') {
        return text.to_owned();
    }
    let address_placeholder = match service.backend {
        Backend::Tcp => PLACEHOLDERS[0],
        Backend::Unix => PLACEHOLDERS[1],
    };
    text.replace(address_placeholder, address)
        .replace(PLACEHOLDERS[2], &service.name)
        .replace(PLACEHOLDERS[3], &generation.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("baton.toml"), text)
    }

    fn error(text: &str) -> String {
        parse(text).expect_err("the config is invalid").to_string()
    }

    const MINIMAL: &str = r#"
[service.web]
listen = ["127.0.0.1:8080"]
command = ["server", "{port}"]
"#;

    #[test]
    fn a_minimal_service_gets_every_default() {
        let config = parse(MINIMAL).expect("valid");
        assert_eq!(
            config.admin.listen,
            Endpoint::Tcp(DEFAULT_ADMIN_LISTEN.parse().expect("address"))
        );
        let web = &config.services["web"];
        assert_eq!(web.listen, vec!["127.0.0.1:8080".parse().expect("address")]);
        assert_eq!(web.backend, Backend::Tcp);
        assert_eq!(web.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
        assert_eq!(web.stop_signal, Signal::SIGTERM);
        assert_eq!(web.stop_timeout, DEFAULT_STOP_TIMEOUT);
        assert_eq!(web.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(web.backlog, DEFAULT_BACKLOG);
        assert_eq!(web.readiness.path, None);
        assert_eq!(web.readiness.interval, DEFAULT_READINESS_INTERVAL);
        assert_eq!(web.readiness.timeout, DEFAULT_READINESS_TIMEOUT);
        assert_eq!(web.watchdog, DEFAULT_WATCHDOG);
        assert_eq!(web.pending_timeout, DEFAULT_PENDING_TIMEOUT);
        assert_eq!(web.max_connections, 0);
        assert_eq!(web.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(web.half_close_timeout, DEFAULT_HALF_CLOSE_TIMEOUT);
        assert_eq!(web.drain_policy, DrainPolicy::Wait);
        assert!(web.resend_unanswered);
        assert_eq!(web.max_draining, DEFAULT_MAX_DRAINING);
        assert_eq!(web.health.failures, DEFAULT_HEALTH_FAILURES);
        assert_eq!(web.health.successes, DEFAULT_HEALTH_SUCCESSES);
    }

    #[test]
    fn every_documented_key_is_read() {
        let config = parse(
            r#"
[admin]
listen = "[::1]:9901"

[daemon]
reexec_on_change = true

[service.api]
listen = ["127.0.0.1:8080", "[::1]:8080"]
command = ["app", "--socket", "{socket}", "--gen", "{generation}"]
backend = "unix"
cwd = "/srv/api"
user = "www-data"
group = "www-data"
output = "inherit"
env = { APP_ENV = "prod", NAME = "{service}" }
drain_timeout = "5s"
stop_signal = "SIGINT"
stop_timeout = "250ms"
connect_timeout = "1s"
backlog = 64
watchdog = "0s"
pending_timeout = "2s"
max_connections = 100
idle_timeout = "5m"
half_close_timeout = "10s"
drain_policy = "signal"
resend_unanswered = false
max_draining = 1
proxy_protocol = "v1"
accept_proxy_protocol = ["10.0.0.0/8"]
proxy_protocol_timeout = "1s"
max_connections_per_client = 8
watch = ["/srv/api/current"]
watch_settle = "1s"
max_lifetime = "12h"
prepare = ["true"]
prepare_timeout = "10s"
upgrade_window = "02:00-04:00"
canary = { steps = ["10%", "50%"], step_time = "1m", sticky = false, max_error_rate = "2%", min_connections = 50 }

[service.api.health]
interval = "200ms"
timeout = "150ms"
failures = 2
successes = 4

[service.api.readiness]
path = "/readyz"
interval = "50ms"
timeout = "3s"
"#,
        )
        .expect("valid");
        assert_eq!(
            config.admin.listen,
            Endpoint::Tcp("[::1]:9901".parse().expect("address"))
        );
        let api = &config.services["api"];
        assert_eq!(api.listen.len(), 2);
        assert_eq!(api.backend, Backend::Unix);
        assert_eq!(api.cwd.as_deref(), Some(Path::new("/srv/api")));
        assert_eq!(api.user.as_deref(), Some("www-data"));
        assert_eq!(api.group.as_deref(), Some("www-data"));
        assert_eq!(api.output, Output::Inherit);
        assert_eq!(api.env["APP_ENV"], "prod");
        assert_eq!(api.drain_timeout, Duration::from_secs(5));
        assert_eq!(api.stop_signal, Signal::SIGINT);
        assert_eq!(api.stop_timeout, Duration::from_millis(250));
        assert_eq!(api.connect_timeout, Duration::from_secs(1));
        assert_eq!(api.backlog, 64);
        assert_eq!(api.readiness.path.as_deref(), Some("/readyz"));
        assert_eq!(api.readiness.interval, Duration::from_millis(50));
        assert_eq!(api.readiness.timeout, Duration::from_secs(3));
        assert_eq!(api.watchdog, Duration::ZERO);
        assert_eq!(api.pending_timeout, Duration::from_secs(2));
        assert_eq!(api.max_connections, 100);
        assert_eq!(api.idle_timeout, Duration::from_secs(300));
        assert_eq!(api.half_close_timeout, Duration::from_secs(10));
        assert_eq!(api.drain_policy, DrainPolicy::Signal);
        assert!(!api.resend_unanswered);
        assert_eq!(api.max_draining, 1);
        assert_eq!(api.proxy_protocol, Some(crate::proxy_protocol::Version::V1));
        assert_eq!(api.accept_proxy_protocol.len(), 1);
        assert_eq!(api.proxy_protocol_timeout, Duration::from_secs(1));
        assert_eq!(api.max_connections_per_client, 8);
        assert_eq!(
            api.health,
            Health {
                interval: Duration::from_millis(200),
                timeout: Duration::from_millis(150),
                failures: 2,
                successes: 4
            }
        );
        assert_eq!(substitute("{service}-{generation}", api, "/run/x.sock", 7), "api-7");
        assert_eq!(substitute("{socket}", api, "/run/x.sock", 7), "/run/x.sock");
    }

    #[test]
    fn an_unknown_key_is_named_with_its_position() {
        let message = error(&format!("{MINIMAL}drain_timout = \"3s\"\n"));
        assert!(message.contains("baton.toml"), "{message}");
        assert!(message.contains("line 5"), "{message}");
        assert!(message.contains("unknown field `drain_timout`"), "{message}");
    }

    #[test]
    fn a_bad_duration_names_service_key_and_position() {
        let message = error(&format!("{MINIMAL}drain_timeout = \"3 fortnights\"\n"));
        assert!(
            message.starts_with("baton.toml:5:17: service `web`: drain_timeout `3 fortnights`"),
            "{message}"
        );
        assert!(message.contains("^^^^^^^^^^^^^^"), "{message}");
    }

    #[test]
    fn a_duration_beyond_a_year_is_refused() {
        let message = error(&format!("{MINIMAL}watchdog = \"10000000000000000000s\"\n"));
        assert!(
            message.contains("service `web`: watchdog `10000000000000000000s` is longer than a year"),
            "{message}"
        );
    }

    #[test]
    fn a_bad_signal_is_refused() {
        let message = error(&format!("{MINIMAL}stop_signal = \"SIGNOPE\"\n"));
        assert!(message.contains("service `web`: stop_signal `SIGNOPE`"), "{message}");
        assert_eq!(parse_signal("term"), Some(Signal::SIGTERM));
        assert_eq!(parse_signal("SIGQUIT"), Some(Signal::SIGQUIT));
    }

    #[test]
    fn zero_counts_and_unknown_policies_are_refused() {
        let message = error(&format!("{MINIMAL}max_draining = 0\n"));
        assert!(
            message.contains("service `web`: max_draining must be at least 1"),
            "{message}"
        );
        let message = error(&format!("{MINIMAL}drain_policy = \"sometimes\"\n"));
        assert!(message.contains("drain_policy `sometimes` is unknown"), "{message}");
        let message = error(&format!("{MINIMAL}[service.web.health]\nfailures = 0\n"));
        assert!(message.contains("health.failures must be at least 1"), "{message}");
    }

    #[test]
    fn the_proxy_protocol_keys_are_read_and_checked() {
        let web = &parse(MINIMAL).expect("valid").services["web"].clone();
        assert_eq!(web.proxy_protocol, None);
        assert!(web.accept_proxy_protocol.is_empty());
        assert_eq!(web.proxy_protocol_timeout, DEFAULT_PROXY_PROTOCOL_TIMEOUT);
        assert_eq!(web.max_connections_per_client, 0);
        let config = parse(&format!(
            "{MINIMAL}proxy_protocol = \"v2\"\naccept_proxy_protocol = [\"10.0.0.0/8\", \"192.0.2.7\", \"2001:db8::/32\"]\n\
             proxy_protocol_timeout = \"500ms\"\nmax_connections_per_client = 20\n"
        ))
        .expect("valid");
        let web = &config.services["web"];
        assert_eq!(web.proxy_protocol, Some(crate::proxy_protocol::Version::V2));
        let nets: Vec<String> = web.accept_proxy_protocol.iter().map(ToString::to_string).collect();
        assert_eq!(nets, ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]);
        assert_eq!(web.proxy_protocol_timeout, Duration::from_millis(500));
        assert_eq!(web.max_connections_per_client, 20);
        for (bad, expected) in [
            (
                "proxy_protocol = \"v3\"",
                "proxy_protocol `v3` is unknown: use \"v1\" or \"v2\"",
            ),
            (
                "accept_proxy_protocol = [\"10.0.0.0/33\"]",
                "accept_proxy_protocol `10.0.0.0/33` is not a network",
            ),
            (
                "accept_proxy_protocol = [\"lb.example\"]",
                "accept_proxy_protocol `lb.example` is not a network",
            ),
            (
                "accept_proxy_protocol = [\"10.0.0.1/8\"]",
                "`10.0.0.1/8` has bits set past its prefix: the network is `10.0.0.0/8`",
            ),
            (
                "accept_proxy_protocol = [\"10.0.0.0/8\", \"10.0.0.0/8\"]",
                "accept_proxy_protocol lists `10.0.0.0/8` twice",
            ),
            (
                "proxy_protocol_timeout = \"0s\"",
                "proxy_protocol_timeout must be greater than zero",
            ),
        ] {
            let message = error(&format!("{MINIMAL}{bad}\n"));
            assert!(message.contains(expected), "{bad}: {message}");
            assert!(message.contains("service `web`"), "{bad}: {message}");
        }
    }

    #[test]
    fn the_deploy_keys_are_read_and_checked() {
        let web = parse(MINIMAL).expect("valid").services["web"].clone();
        assert!(web.watch.is_empty() && web.prepare.is_empty());
        assert_eq!(web.watch_settle, DEFAULT_WATCH_SETTLE);
        assert_eq!(web.max_lifetime, None);
        assert_eq!(web.prepare_timeout, DEFAULT_PREPARE_TIMEOUT);
        assert_eq!(web.upgrade_window, None);
        let config = parse(&format!(
            "{MINIMAL}watch = [\"/srv/app/current\"]\nwatch_settle = \"500ms\"\nmax_lifetime = \"24h\"\n\
             prepare = [\"docker\", \"pull\", \"app:{{generation}}\"]\nprepare_timeout = \"1m\"\n\
             upgrade_window = \"Sat,Sun 01:00-05:00\"\n"
        ))
        .expect("valid");
        let web = &config.services["web"];
        assert_eq!(web.watch, [PathBuf::from("/srv/app/current")]);
        assert_eq!(web.watch_settle, Duration::from_millis(500));
        assert_eq!(web.max_lifetime, Some(Duration::from_secs(24 * 3600)));
        assert_eq!(web.prepare, ["docker", "pull", "app:{generation}"]);
        assert_eq!(web.prepare_timeout, Duration::from_secs(60));
        assert_eq!(
            web.upgrade_window.map(|w| w.to_string()).as_deref(),
            Some("sat,sun 01:00:00-05:00:00")
        );
        for (bad, expected) in [
            ("watch = [\"current\"]", "watch `current` is not an absolute path"),
            ("watch = [\"/a\", \"/a\"]", "watch lists `/a` twice"),
            ("prepare = []", "prepare is empty"),
            ("prepare = [\"pull\", \"{port}\"]", "names the worker's address"),
            ("max_lifetime = \"0s\"", "max_lifetime must be greater than zero"),
            ("prepare_timeout = \"0s\"", "prepare_timeout must be greater than zero"),
            ("upgrade_window = \"2am-4am\"", "upgrade_window `2am` is not a time"),
            ("upgrade_window = \"Someday 01:00-02:00\"", "`Someday` is not a day"),
        ] {
            let message = error(&format!("{MINIMAL}{bad}\n"));
            assert!(message.contains(expected), "{bad}: {message}");
            assert!(message.contains("service `web`"), "{bad}: {message}");
        }
    }

    #[test]
    fn a_canary_is_read_and_checked() {
        let config = parse(&format!(
            "{MINIMAL}canary = {{ steps = [\"5%\", \"25.5%\", \"50%\"], step_time = \"10s\", sticky = false, \
             max_error_rate = \"0.5%\", min_connections = 100 }}\n"
        ))
        .expect("valid");
        let canary = config.services["web"].canary.clone().expect("a canary");
        assert_eq!(canary.steps, [500, 2550, 5000]);
        assert_eq!(canary.step_time, Duration::from_secs(10));
        assert!(!canary.sticky);
        assert_eq!((canary.max_error_rate, canary.min_connections), (50, 100));
        let defaults = parse(&format!("{MINIMAL}canary = {{ steps = [\"10%\"] }}\n"))
            .expect("valid")
            .services["web"]
            .canary
            .clone()
            .expect("a canary");
        assert_eq!(defaults.step_time, DEFAULT_CANARY_STEP_TIME);
        assert!(defaults.sticky);
        assert_eq!(defaults.max_error_rate, DEFAULT_CANARY_MAX_ERROR_RATE);
        for (bad, expected) in [
            ("canary = { steps = [] }", "canary steps is empty"),
            ("canary = { steps = [\"50%\", \"20%\"] }", "canary steps must rise"),
            ("canary = { steps = [\"100%\"] }", "canary step `100%` is not a share"),
            ("canary = { steps = [\"five\"] }", "canary step `five` is not a share"),
            ("canary = { steps = [\"5\"] }", "canary step `5` is not a share"),
            (
                "canary = { steps = [\"5%\"], max_error_rate = \"lots\" }",
                "max_error_rate `lots`",
            ),
            (
                "canary = { steps = [\"5%\"], step_time = \"0s\" }",
                "canary.step_time must be greater than zero",
            ),
            ("canary = { steps = [\"5%\"], steady = true }", "unknown field `steady`"),
        ] {
            let message = error(&format!("{MINIMAL}{bad}\n"));
            assert!(message.contains(expected), "{bad}: {message}");
        }
    }

    #[test]
    fn an_empty_command_is_refused() {
        let message = error("[service.web]\nlisten = [\"127.0.0.1:1\"]\ncommand = []\n");
        assert!(
            message.starts_with("baton.toml:3:11: service `web`: command is empty"),
            "{message}"
        );
    }

    #[test]
    fn a_listen_address_shared_by_two_services_is_refused() {
        let message = error(&format!(
            "{MINIMAL}\n[service.zz]\nlisten = [\"127.0.0.1:8080\"]\ncommand = [\"x\"]\n"
        ));
        assert!(
            message.contains("service `zz`: listen `127.0.0.1:8080` is already used by service `web`"),
            "{message}"
        );
        assert!(message.starts_with("baton.toml:7:11:"), "{message}");
    }

    #[test]
    fn ephemeral_ports_may_repeat() {
        let text = "[service.a]\nlisten = [\"127.0.0.1:0\"]\ncommand = [\"x\"]\n[service.b]\nlisten = [\"127.0.0.1:0\"]\ncommand = [\"x\"]\n";
        assert_eq!(parse(text).expect("valid").services.len(), 2);
    }

    #[test]
    fn a_bad_address_is_refused() {
        let message = error("[service.web]\nlisten = [\"localhost:80800\"]\ncommand = [\"x\"]\n");
        assert!(
            message.contains("service `web`: listen `localhost:80800` is not an address"),
            "{message}"
        );
    }

    #[test]
    fn a_placeholder_the_backend_lacks_is_refused() {
        let message = error("[service.web]\nlisten = [\"127.0.0.1:1\"]\ncommand = [\"x\", \"{socket}\"]\n");
        assert!(
            message.contains("uses {socket}, which backend = \"tcp\" does not provide"),
            "{message}"
        );
    }

    #[test]
    fn a_public_admin_address_needs_a_token_file() {
        let message = error(&format!("[admin]\nlisten = \"0.0.0.0:9900\"\n{MINIMAL}"));
        assert!(
            message.contains("admin: listen `0.0.0.0:9900` is not a loopback address"),
            "{message}"
        );
        let config = parse(&format!(
            "[admin]\nlisten = \"0.0.0.0:9900\"\ntoken_file = \"/etc/baton/token\"\n{MINIMAL}"
        ))
        .expect("valid with a token");
        assert_eq!(config.admin.token_file.as_deref(), Some(Path::new("/etc/baton/token")));
        let config = parse(&format!("[admin]\nlisten = \"unix:/run/baton.sock\"\n{MINIMAL}")).expect("valid");
        assert_eq!(config.admin.listen, Endpoint::Unix(PathBuf::from("/run/baton.sock")));
        assert!(error(&format!("[admin]\nlisten = \"unix:baton.sock\"\n{MINIMAL}")).contains("absolute path"));
    }

    #[test]
    fn a_bad_admin_address_is_refused_with_its_position() {
        let message = error(&format!("[admin]\nlisten = \"unix:admin.sock\"\n{MINIMAL}"));
        assert!(
            message.starts_with(
                "baton.toml:2:10: admin: listen `unix:` needs an absolute path, like \"unix:/run/baton/admin.sock\""
            ),
            "{message}"
        );
        let message = error(&format!("[admin]\nlisten = \"localhost:9900\"\n{MINIMAL}"));
        assert!(
            message.starts_with(
                "baton.toml:2:10: admin: listen `localhost:9900` is not an address like \"127.0.0.1:8080\" or \"[::1]:8080\""
            ),
            "{message}"
        );
    }

    #[test]
    fn a_file_without_services_is_refused() {
        assert!(error("[admin]\nlisten = \"127.0.0.1:1\"\n").contains("no service is configured"));
    }

    /// Fuzzing the parser: a bounded run here (256 cases a property); a longer one with
    /// `PROPTEST_CASES=100000 cargo test --lib config::tests::fuzz`.
    mod fuzz {
        use proptest::prelude::*;

        use super::parse;

        const FULL: &str = r#"[admin]
listen = "127.0.0.1:9900"
token_file = "/etc/token"

[service.web]
listen = ["127.0.0.1:8080", "[::1]:8080"]
command = ["server", "{port}", "{generation}"]
backend = "tcp"
env = { A = "{service}" }
drain_timeout = "30s"
stop_signal = "SIGTERM"
watchdog = "10s"
max_draining = 3
drain_policy = "wait"

[service.web.health]
failures = 3

[service.web.readiness]
path = "/readyz"
interval = "100ms"
"#;

        /// Keys of the schema, with and without typos, at the places they may stand.
        fn key() -> impl Strategy<Value = &'static str> {
            prop::sample::select(vec![
                "listen",
                "command",
                "backend",
                "cwd",
                "env",
                "drain_timeout",
                "stop_signal",
                "stop_timeout",
                "connect_timeout",
                "backlog",
                "watchdog",
                "pending_timeout",
                "max_connections",
                "idle_timeout",
                "half_close_timeout",
                "drain_policy",
                "resend_unanswered",
                "max_draining",
                "user",
                "group",
                "lisen",
                "path",
            ])
        }

        /// TOML values of every type, some fitting, most not.
        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("\"\"".to_owned()),
                "[a-z0-9:.{}/ \\[\\]-]{0,24}".prop_map(|s| format!("{s:?}")),
                any::<i64>().prop_map(|n| n.to_string()),
                any::<f64>().prop_map(|n| format!("{n:?}")),
                any::<bool>().prop_map(|b| b.to_string()),
                prop::collection::vec("[a-z0-9:.{}\\[\\]]{0,12}", 0..4).prop_map(|v| format!("{v:?}")),
                Just("{ X = \"{port}\" }".to_owned()),
                Just("\"-1s\"".to_owned()),
                Just("\"18446744073709551616s\"".to_owned()),
                Just("\"[::1]:0\"".to_owned()),
                Just("\"unix:/x\"".to_owned()),
            ]
        }

        proptest! {
            #[test]
            fn any_text_is_refused_or_accepted_without_a_panic(text in "\\PC{0,400}") {
                let _ = parse(&text).map_err(|e| e.to_string());
            }

            #[test]
            fn a_damaged_config_is_refused_or_accepted_without_a_panic(
                edits in prop::collection::vec((any::<prop::sample::Index>(), any::<char>()), 1..6)
            ) {
                let mut text: Vec<char> = FULL.chars().collect();
                for (at, c) in edits {
                    let i = at.index(text.len());
                    text[i] = c;
                }
                let text: String = text.into_iter().collect();
                let _ = parse(&text).map_err(|e| e.to_string());
            }

            #[test]
            fn any_keys_and_values_are_refused_or_accepted_without_a_panic(
                fields in prop::collection::vec((key(), value()), 0..10),
                readiness in prop::collection::vec((key(), value()), 0..3),
            ) {
                let mut text = String::from("[service.web]\n");
                for (key, value) in fields {
                    text.push_str(&format!("{key} = {value}\n"));
                }
                text.push_str("[service.web.readiness]\n");
                for (key, value) in readiness {
                    text.push_str(&format!("{key} = {value}\n"));
                }
                let _ = parse(&text).map_err(|e| e.to_string());
            }
        }
    }

    #[test]
    fn garbage_never_panics() {
        for text in [
            "",
            "[",
            "service = 1",
            "[service.web]\nlisten = 5",
            "\u{0}\u{1}",
            "[service.\"\"]\nlisten=[\"127.0.0.1:1\"]\ncommand=[\"x\"]",
        ] {
            let _ = parse(text);
        }
    }
}
