//! The daemon's whole state as one versioned, serialisable type: everything a new image of baton would need
//! to start again exactly where this one stands.
//!
//! [`State`] is plain data. Descriptors appear as their numbers (they are what an exec keeps); instants as
//! [`crate::clock::Time`]s on the monotonic clock, which an exec keeps too. [`State::encode`] writes it,
//! [`State::decode`] reads it back and refuses, with a clear error, a state of a format this binary does not
//! know. A fresh start is a start from [`State::fresh`]. `/v1/state` shows the state of a running daemon.
//! Parked connections ([`crate::connection`]) are carried as their records and descriptors.
//! Nothing here does I/O.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::clock::Time;
use crate::connection::ParkedRecord;
use crate::endpoint::Endpoint;
use crate::lifecycle::Machine;
use crate::reexec::{InFlight, ReexecRecord};

/// The format this binary writes, and the newest it reads. Format 2 added each parked connection's client
/// address and PROXY protocol header; format 1 is read too.
pub const VERSION: u32 = 2;

/// Why a written state cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// It is not a state document at all.
    #[error("not a baton state document")]
    Malformed(#[source] serde_json::Error),
    /// A newer baton wrote it.
    #[error("state format {found} is newer than this baton ({}) reads: at most {VERSION}", env!("CARGO_PKG_VERSION"))]
    Newer {
        /// The version found.
        found: u32,
    },
    /// A version this binary never wrote.
    #[error("unknown state format {found}: this baton ({}) reads format {VERSION}", env!("CARGO_PKG_VERSION"))]
    Unknown {
        /// The version found.
        found: u32,
    },
    /// The version is known but the document does not match it.
    #[error("state format {VERSION} document does not match the format")]
    Invalid(#[source] serde_json::Error),
}

/// Everything the daemon carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// The format, [`VERSION`] when written by this binary.
    pub version: u32,
    /// The version of the baton that wrote it.
    pub written_by: String,
    /// When the daemon started (its uptime runs on).
    pub started: Option<Time>,
    /// The running configuration, as it was loaded: not read from disk again.
    pub config: Option<ConfigSource>,
    /// The public listening sockets.
    pub listeners: Vec<ListenerState>,
    /// The admin API's listening socket.
    pub admin: Option<SocketState>,
    /// The private directory of workers' Unix sockets.
    pub runtime_dir: Option<PathBuf>,
    /// The open-file limit baton started with, which workers get.
    pub fd_limit: Option<(u64, u64)>,
    /// Every service, by name.
    pub services: BTreeMap<String, ServiceSnapshot>,
    /// Every metric's value.
    pub metrics: Vec<MetricFamily>,
    /// The path baton was first started from: a re-exec runs the binary found there now.
    #[serde(default)]
    pub binary: Option<PathBuf>,
    /// How many times this process has re-executed into a new image.
    #[serde(default)]
    pub reexecs: u64,
    /// How many re-execs were asked for, whatever came of them.
    #[serde(default)]
    pub reexec_attempts: u64,
    /// The last re-exec that ended.
    #[serde(default)]
    pub last_reexec: Option<ReexecRecord>,
    /// The re-exec that wrote this state, for the image that takes over.
    #[serde(default)]
    pub reexec: Option<InFlight>,
}

/// A configuration file's text and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigSource {
    /// The file (a reload reads it again).
    pub path: PathBuf,
    /// Its text as it was loaded.
    pub text: String,
}

/// A public listening socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerState {
    /// The service that owns it when its configured port is 0 (an ephemeral socket is per service).
    pub service: Option<String>,
    /// The address as configured.
    pub configured: SocketAddr,
    /// The address bound.
    pub local: SocketAddr,
    /// Its descriptor.
    pub fd: RawFd,
}

/// A listening socket on an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocketState {
    /// Where it listens.
    pub endpoint: Endpoint,
    /// Its descriptor.
    pub fd: RawFd,
}

/// One service: its lifecycle and the worker processes it names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSnapshot {
    /// The lifecycle machine, as it stands.
    pub machine: Machine,
    /// Every worker process the machine names.
    pub workers: Vec<WorkerState>,
    /// The service's parked connections (while it runs, none but those resting in a hand-over's watch; every open one just before an exec). Written
    /// compactly ([`compact`]): a hand-over carries thousands, and the time to write and read them is part
    /// of its pause.
    #[serde(with = "compact")]
    pub parked: Vec<ParkedState>,
    /// The watch the parked connections' sockets are in ([`crate::watch`]), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch: Option<WatchState>,
    /// The releases the service remembers, oldest first ([`crate::release::Release`]).
    #[serde(default)]
    pub releases: Vec<crate::release::Release>,
}

impl ServiceSnapshot {
    /// Each parked connection with whether its sockets are in the watch (and so inheritable).
    pub fn parked_watched(&self) -> impl Iterator<Item = (&ParkedState, bool)> {
        let unwatched: std::collections::HashSet<RawFd> =
            self.watch.iter().flat_map(|w| w.unwatched.iter().copied()).collect();
        let watching = self.watch.is_some();
        self.parked
            .iter()
            .map(move |p| (p, watching && !unwatched.contains(&p.client_fd)))
    }
}

/// A service's watch: an epoll instance holding the sockets of its parked connections, but those named.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchState {
    /// Its descriptor.
    pub fd: RawFd,
    /// The client descriptors of the parked connections whose sockets are not in it.
    pub unwatched: Vec<RawFd>,
}

/// A parked connection: everything but its sockets, and the sockets' descriptors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParkedState {
    /// Where the connection stands.
    pub record: ParkedRecord,
    /// The client socket's descriptor.
    pub client_fd: RawFd,
    /// The worker socket's descriptor.
    pub worker_fd: RawFd,
}

/// One worker process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerState {
    /// Its generation.
    pub generation: u64,
    /// Its process id (and process group).
    pub pid: u32,
    /// Its private address.
    pub addr: Endpoint,
    /// The read ends of its stdout and stderr pipes, when its output is logged.
    pub output: Option<(RawFd, RawFd)>,
    /// A pidfd of the process, where the kernel has them.
    pub pidfd: Option<RawFd>,
    /// Whether baton has asked it to stop (its exit is expected).
    pub stopping: bool,
    /// Its wait status, once it has exited and been reaped.
    #[serde(default)]
    pub exited: Option<i32>,
    /// Connections open to it.
    pub connections: usize,
    /// Connections it has not answered yet.
    pub unanswered: usize,
    /// Whether it takes no new connection.
    pub draining: bool,
    /// Its connections that ended, and those that ended badly on its side (a canary's judgement).
    #[serde(default)]
    pub tally: (u64, u64),
}

/// One metric family's values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricFamily {
    /// Its name.
    pub name: String,
    /// Its series.
    pub series: Vec<Series>,
}

/// One series of a family: its labels and its value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Series {
    /// Its labels, by name.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: Value,
}

/// A series' value, by metric type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Value {
    /// A counter.
    Counter(f64),
    /// A gauge.
    Gauge(f64),
    /// A histogram: observations, their sum, and the cumulative count per upper bound.
    Histogram {
        /// Observations.
        count: u64,
        /// Their sum.
        sum: f64,
        /// `(upper bound, cumulative count)`, in order.
        buckets: Vec<(f64, u64)>,
    },
}

impl State {
    /// The state of a daemon that has not started anything: a fresh start starts from it.
    pub fn fresh() -> State {
        State {
            version: VERSION,
            written_by: env!("CARGO_PKG_VERSION").to_owned(),
            started: None,
            config: None,
            listeners: Vec::new(),
            admin: None,
            runtime_dir: None,
            fd_limit: None,
            services: BTreeMap::new(),
            metrics: Vec::new(),
            binary: None,
            reexecs: 0,
            reexec_attempts: 0,
            last_reexec: None,
            reexec: None,
        }
    }

    /// The configuration the state carries, validated: the one a new image runs.
    pub fn running_config(&self) -> Result<crate::config::Config, String> {
        let source = self
            .config
            .as_ref()
            .ok_or_else(|| "the state carries no configuration".to_owned())?;
        crate::config::Config::parse(&source.path, &source.text).map_err(|e| crate::error::chain(&e))
    }

    /// Every descriptor the state names, in no particular order: what an exec must keep open.
    pub fn descriptors(&self) -> Vec<RawFd> {
        // A socket bound for an ephemeral port and configured by its address too is listed twice.
        let mut fds: Vec<RawFd> = self.listeners.iter().map(|l| l.fd).collect();
        fds.sort_unstable();
        fds.dedup();
        fds.extend(self.admin.iter().map(|a| a.fd));
        for service in self.services.values() {
            for worker in &service.workers {
                fds.extend(worker.pidfd);
                fds.extend(worker.output.iter().flat_map(|(out, err)| [*out, *err]));
            }
            fds.extend(service.parked.iter().flat_map(|p| [p.client_fd, p.worker_fd]));
            fds.extend(service.watch.iter().map(|w| w.fd));
        }
        fds
    }

    /// Every descriptor the state names but the sockets of the watched connections: those are inheritable
    /// already (a connection makes its sockets so as it joins its service's watch, [`crate::watch`]) and
    /// close-on-exec again in the new image as each connection is taken over. The others an exec makes
    /// inheritable just before, and the new image close-on-exec first thing.
    pub fn flagged_descriptors(&self) -> Vec<RawFd> {
        let watched: std::collections::HashSet<RawFd> = self
            .services
            .values()
            .flat_map(ServiceSnapshot::parked_watched)
            .filter(|(_, watched)| *watched)
            .flat_map(|(p, _)| [p.client_fd, p.worker_fd])
            .collect();
        let mut fds = self.descriptors();
        fds.retain(|fd| !watched.contains(fd));
        fds
    }

    /// Checks that the state names each descriptor once, so that adopting them gives each one owner.
    pub fn check_descriptors(&self) -> Result<(), String> {
        let mut fds = self.descriptors();
        fds.sort_unstable();
        match fds.windows(2).find(|pair| pair[0] == pair[1]) {
            Some(pair) => Err(format!("the state names descriptor {} twice", pair[0])),
            None => Ok(()),
        }
    }

    /// Whether nothing has been started from this state.
    pub fn is_fresh(&self) -> bool {
        self.config.is_none() && self.listeners.is_empty() && self.services.is_empty()
    }

    /// The state as a JSON document. Fails only for what JSON cannot carry back exactly (a Unix socket path
    /// that is not UTF-8), rather than writing something that would read back as something else.
    pub fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    /// Reads a document [`State::encode`] wrote, checking its version before anything else.
    pub fn decode(bytes: &[u8]) -> Result<State, HandoverError> {
        #[derive(Deserialize)]
        struct Header {
            version: u32,
        }
        // What `encode` writes starts with the version: read it there rather than parse the document twice
        // (it holds every connection); anything else is read whole for it.
        let version = match version_prefix(bytes) {
            Some(version) => version,
            None => {
                let header: Header = serde_json::from_slice(bytes).map_err(HandoverError::Malformed)?;
                header.version
            }
        };
        match version {
            1 | VERSION => {
                let mut state: State = serde_json::from_slice(bytes).map_err(HandoverError::Invalid)?;
                state.version = VERSION;
                Ok(state)
            }
            found if found > VERSION => Err(HandoverError::Newer { found }),
            found => Err(HandoverError::Unknown { found }),
        }
    }
}

/// The parked connections of a snapshot: none as `[]`; otherwise one string, [`compact::PREFIX`] and the
/// base64 of their postcard encoding, several times smaller than JSON and faster to write and read. A list
/// of records in JSON is read too.
mod compact {
    use base64::Engine as _;
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    use super::ParkedState;

    /// What the string starts with.
    pub const PREFIX: &str = "postcard2+base64:";

    /// What it started with in format 1, whose records lack the client address and PROXY header.
    pub const PREFIX_1: &str = "postcard+base64:";

    pub fn serialize<S: Serializer>(parked: &[ParkedState], serializer: S) -> Result<S::Ok, S::Error> {
        if parked.is_empty() {
            return serializer.collect_seq(parked);
        }
        let bytes = postcard::to_allocvec(parked).map_err(serde::ser::Error::custom)?;
        let mut text = String::with_capacity(PREFIX.len() + bytes.len() * 4 / 3 + 4);
        text.push_str(PREFIX);
        base64::engine::general_purpose::STANDARD.encode_string(&bytes, &mut text);
        serializer.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<ParkedState>, D::Error> {
        struct Parked;
        impl<'de> Visitor<'de> for Parked {
            type Value = Vec<ParkedState>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "a list of parked connections, or a string that starts with {PREFIX}")
            }

            fn visit_str<E: Error>(self, text: &str) -> Result<Self::Value, E> {
                let decode = |encoded: &str| {
                    base64::engine::general_purpose::STANDARD
                        .decode(encoded)
                        .map_err(|e| E::custom(format!("parked connections: {e}")))
                };
                let invalid = |e: postcard::Error| E::custom(format!("parked connections: {e}"));
                if let Some(encoded) = text.strip_prefix(PREFIX) {
                    return postcard::from_bytes(&decode(encoded)?).map_err(invalid);
                }
                if let Some(encoded) = text.strip_prefix(PREFIX_1) {
                    let parked: Vec<super::legacy::ParkedState1> =
                        postcard::from_bytes(&decode(encoded)?).map_err(invalid)?;
                    return Ok(parked.into_iter().map(ParkedState::from).collect());
                }
                Err(E::custom(format!("parked connections must start with {PREFIX}")))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut parked = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(one) = seq.next_element::<ParkedState>()? {
                    parked.push(one);
                }
                Ok(parked)
            }
        }
        deserializer.deserialize_any(Parked)
    }
}

/// Parked connections as format 1 wrote them.
mod legacy {
    use serde::Deserialize;

    use crate::clock::Time;
    use crate::connection::{Backend, FlowRecord, ParkedRecord, Tail};

    /// A format 1 [`super::ParkedState`].
    #[derive(Debug, Deserialize)]
    pub struct ParkedState1 {
        record: ParkedRecord1,
        client_fd: std::os::fd::RawFd,
        worker_fd: std::os::fd::RawFd,
    }

    /// A format 1 [`ParkedRecord`]: the same fields, in the same order, less the last three.
    #[derive(Debug, Deserialize)]
    struct ParkedRecord1 {
        generation: u64,
        backend: Backend,
        answered: bool,
        accepted: Time,
        parked_at: Time,
        last_moved: Time,
        held_until: Option<Time>,
        to_worker: FlowRecord,
        to_client: FlowRecord,
        worker_shut: bool,
        client_shut: bool,
        tail: Tail,
        answered_since_sent: bool,
        kept: bool,
        worker_ended: bool,
    }

    impl From<ParkedState1> for super::ParkedState {
        fn from(old: ParkedState1) -> super::ParkedState {
            let r = old.record;
            super::ParkedState {
                record: ParkedRecord {
                    generation: r.generation,
                    backend: r.backend,
                    answered: r.answered,
                    accepted: r.accepted,
                    parked_at: r.parked_at,
                    last_moved: r.last_moved,
                    held_until: r.held_until,
                    to_worker: r.to_worker,
                    to_client: r.to_client,
                    worker_shut: r.worker_shut,
                    client_shut: r.client_shut,
                    tail: r.tail,
                    answered_since_sent: r.answered_since_sent,
                    kept: r.kept,
                    worker_ended: r.worker_ended,
                    client: None,
                    proxy_header: None,
                    client_sent: true,
                },
                client_fd: old.client_fd,
                worker_fd: old.worker_fd,
            }
        }
    }
}

/// The version of a document that starts `{"version":N,`.
fn version_prefix(bytes: &[u8]) -> Option<u32> {
    let rest = bytes.strip_prefix(b"{\"version\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if rest.get(digits) != Some(&b',') {
        return None;
    }
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::control::Trigger;
    use crate::lifecycle::{Input, Policy};

    fn machine() -> Machine {
        let policy = Policy {
            watchdog: Duration::from_secs(10),
            readiness_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            signal_first: false,
            stop_signal: nix::sys::signal::Signal::SIGTERM,
            stop_timeout: Duration::from_secs(10),
            max_draining: 3,
            health_interval: Duration::from_secs(1),
            health_failures: 3,
            health_successes: 2,
            watch_settle: Duration::from_secs(2),
            max_lifetime: None,
            canary: None,
        };
        let mut machine = Machine::new("web".into(), policy);
        let now = Time::from_origin(Duration::from_secs(100));
        for input in [
            Input::Upgrade {
                trigger: Trigger::Start,
                waiter: None,
            },
            Input::Spawned {
                generation: 1,
                pid: 41,
                worker: "127.0.0.1:4001".into(),
            },
            Input::Ready { generation: 1 },
            Input::Upgrade {
                trigger: Trigger::Api,
                waiter: Some(1),
            },
            Input::Spawned {
                generation: 2,
                pid: 42,
                worker: "unix:/run/baton/web-2.sock".into(),
            },
            Input::Ready { generation: 2 },
        ] {
            machine.step(input, now);
        }
        machine
    }

    /// A connection parked mid-stream: bytes pending both ways, the client's end passed on, a FIN held.
    fn parked() -> ParkedState {
        use crate::connection::{Backend, FlowRecord, Tail};
        let at = |ms| Time::from_origin(Duration::from_millis(ms));
        ParkedState {
            record: ParkedRecord {
                generation: 1,
                backend: Backend::Tcp,
                answered: true,
                accepted: at(1_000),
                parked_at: at(9_000),
                last_moved: at(8_500),
                held_until: Some(at(9_020)),
                to_worker: FlowRecord {
                    pending: b"GET /next HTTP/1.1\r\n".to_vec(),
                    size: 4096,
                    ended: true,
                },
                to_client: FlowRecord {
                    pending: vec![0, 255, 7],
                    size: 65536,
                    ended: false,
                },
                worker_shut: true,
                client_shut: false,
                tail: Tail::Kept(b"GET /next".to_vec()),
                answered_since_sent: false,
                kept: true,
                worker_ended: true,
                client: Some("192.0.2.7:40000".parse().expect("address")),
                proxy_header: Some(b"PROXY TCP4 192.0.2.7 192.0.2.1 40000 80\r\n".to_vec()),
                client_sent: true,
            },
            client_fd: 21,
            worker_fd: 22,
        }
    }

    /// A state with something in every field.
    fn full() -> State {
        let worker = |generation: u64, addr: &str| WorkerState {
            generation,
            pid: 40 + u32::try_from(generation).expect("small"),
            addr: addr.parse().expect("endpoint"),
            output: Some((10, 11)),
            pidfd: Some(12),
            stopping: false,
            exited: None,
            connections: 3,
            unanswered: 1,
            draining: generation == 1,
            tally: (120, 3),
        };
        State {
            started: Some(Time::from_origin(Duration::from_millis(123_456))),
            config: Some(ConfigSource {
                path: "/etc/baton/baton.toml".into(),
                text: "[service.web]\nlisten = [\"127.0.0.1:8080\"]\n".into(),
            }),
            listeners: vec![ListenerState {
                service: Some("web".into()),
                configured: "127.0.0.1:0".parse().expect("address"),
                local: "127.0.0.1:8080".parse().expect("address"),
                fd: 7,
            }],
            admin: Some(SocketState {
                endpoint: "unix:/run/baton/admin.sock".parse().expect("endpoint"),
                fd: 8,
            }),
            runtime_dir: Some("/run/user/0/baton-x".into()),
            fd_limit: Some((1024, 524_288)),
            services: BTreeMap::from([(
                "web".into(),
                ServiceSnapshot {
                    machine: machine(),
                    workers: vec![worker(1, "127.0.0.1:4001"), worker(2, "unix:/run/baton/web-2.sock")],
                    parked: vec![parked()],
                    watch: Some(WatchState {
                        fd: 31,
                        unwatched: vec![],
                    }),
                    releases: vec![crate::release::Release {
                        generation: 2,
                        command: vec!["/srv/app/releases/41/server".into(), "{port}".into()],
                        prepare: vec![],
                        cwd: Some("/srv/app/releases/41".into()),
                        env: BTreeMap::from([("APP".into(), "/srv/app/releases/41/app.conf".into())]),
                        files: BTreeMap::from([("/srv/app/releases/41/server".into(), "ab12".into())]),
                        started: 1_700_000_000.5,
                        ended: None,
                        outcome: Some(crate::control::UpgradeResult::Success),
                        from: None,
                    }],
                },
            )]),
            metrics: vec![MetricFamily {
                name: "baton_upgrade_ready_seconds".into(),
                series: vec![Series {
                    labels: BTreeMap::from([("service".into(), "web".into())]),
                    value: Value::Histogram {
                        count: 2,
                        sum: 0.123_456_789,
                        buckets: vec![(0.1, 1), (0.25, 2)],
                    },
                }],
            }],
            ..State::fresh()
        }
    }

    #[test]
    fn what_is_written_is_what_is_read() {
        let state = full();
        assert!(state.services["web"].machine.watch.is_some(), "caught mid-upgrade");
        let read = State::decode(&state.encode().expect("encode")).expect("decode");
        assert_eq!(read, state);
        assert!(!read.is_fresh());
    }

    #[test]
    fn a_fresh_state_is_empty_and_round_trips() {
        let fresh = State::fresh();
        assert!(fresh.is_fresh());
        assert_eq!(State::decode(&fresh.encode().expect("encode")).expect("decode"), fresh);
    }

    fn with_version(version: u32) -> Vec<u8> {
        let mut document: serde_json::Value = serde_json::from_slice(&full().encode().expect("encode")).expect("JSON");
        document["version"] = version.into();
        serde_json::to_vec(&document).expect("JSON")
    }

    #[test]
    fn parked_connections_are_written_compactly_and_read_either_way() {
        let state = full();
        let written: serde_json::Value = serde_json::from_slice(&state.encode().expect("encode")).expect("JSON");
        let parked = &written["services"]["web"]["parked"];
        assert!(
            parked.as_str().is_some_and(|p| p.starts_with(compact::PREFIX)),
            "{parked}"
        );
        // The same connections as a JSON list read back the same.
        let mut listed = written.clone();
        listed["services"]["web"]["parked"] = serde_json::to_value(&state.services["web"].parked[0])
            .map(|one| vec![one].into())
            .expect("JSON");
        let back = State::decode(&serde_json::to_vec(&listed).expect("JSON")).expect("decode a list");
        assert_eq!(back, state);
        // A damaged string is an error that says what it is about, not a panic.
        let mut damaged = written;
        damaged["services"]["web"]["parked"] = format!("{}!!!", compact::PREFIX).into();
        let error = State::decode(&serde_json::to_vec(&damaged).expect("JSON")).expect_err("damaged");
        assert!(matches!(error, HandoverError::Invalid(_)), "{error}");
        assert!(
            crate::error::chain(&error).contains("parked connections"),
            "{}",
            crate::error::chain(&error)
        );
    }

    #[test]
    fn a_format_1_state_is_read_its_connections_without_client_or_header() {
        use base64::Engine as _;
        let mut state = full();
        let service = state.services.get_mut("web").expect("web");
        service.parked[0].record.client = None;
        service.parked[0].record.proxy_header = None;
        service.parked[0].record.client_sent = true;
        // Format 1 wrote each record without the last three fields: two `None`s and a `true`, a byte each,
        // just before the descriptors.
        let one = &service.parked[0];
        let new = postcard::to_allocvec(&service.parked).expect("postcard");
        let fds = postcard::to_allocvec(&(one.client_fd, one.worker_fd)).expect("postcard");
        let cut = new.len() - fds.len() - 3;
        assert_eq!(&new[cut..cut + 3], &[0, 0, 1]);
        let old = [&new[..cut], &fds[..]].concat();
        let mut written: serde_json::Value = serde_json::from_slice(&state.encode().expect("encode")).expect("JSON");
        written["version"] = 1.into();
        written["services"]["web"]["parked"] = format!(
            "{}{}",
            compact::PREFIX_1,
            base64::engine::general_purpose::STANDARD.encode(old)
        )
        .into();
        let back = State::decode(&serde_json::to_vec(&written).expect("JSON")).expect("decode format 1");
        assert_eq!(back, state);
    }

    #[test]
    fn the_version_is_read_from_the_start_of_what_encode_writes() {
        let written = full().encode().expect("encode");
        assert_eq!(version_prefix(&written), Some(VERSION));
        // Another writer's layout is read whole: the version is found wherever it is.
        assert_eq!(version_prefix(b"{ \"version\": 1, \"x\": 2}"), None);
        assert_eq!(version_prefix(b"{\"version\":12"), None);
        assert!(State::decode(&with_version(VERSION)).is_ok());
    }

    #[test]
    fn a_newer_or_unknown_format_is_a_clear_error() {
        let newer = State::decode(&with_version(VERSION + 1)).expect_err("newer");
        assert!(
            matches!(newer, HandoverError::Newer { found } if found == VERSION + 1),
            "{newer}"
        );
        assert!(
            newer
                .to_string()
                .contains(&format!("state format {} is newer", VERSION + 1)),
            "{newer}"
        );
        let unknown = State::decode(&with_version(0)).expect_err("unknown");
        assert!(matches!(unknown, HandoverError::Unknown { found: 0 }), "{unknown}");
    }

    #[test]
    fn a_document_that_is_not_a_state_is_refused_without_a_panic() {
        for bytes in [&b""[..], b"{}", b"[1,2]", b"{\"version\": \"1\"}", b"\xff\xfe"] {
            let error = State::decode(bytes).expect_err("refused");
            assert!(matches!(error, HandoverError::Malformed(_)), "{error}");
        }
        let mut document: serde_json::Value = serde_json::from_slice(&full().encode().expect("encode")).expect("JSON");
        document["surprise"] = true.into();
        let error = State::decode(&serde_json::to_vec(&document).expect("JSON")).expect_err("unknown field");
        assert!(matches!(error, HandoverError::Invalid(_)), "{error}");
    }
}
