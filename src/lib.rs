//! baton: a zero-downtime TCP front proxy.
//!
//! baton owns public listening sockets and forwards every connection to a worker process (an ordinary
//! server listening on a private loopback port or Unix socket). To upgrade, it starts a new worker, waits
//! until it is ready, switches new connections to it in one pointer store, and lets the old one finish its
//! connections before stopping it.
//!
//! # Layout
//! - [`config`]: the TOML file to a validated [`config::Config`]; pure.
//! - [`supervisor`]: the daemon: binds, starts services, reloads, shuts down. Entry point [`run`].
//! - [`lifecycle`]: one service's lifecycle as a state machine with no I/O: `step(input, now) -> effects`.
//! - [`service`]: the driver of that machine: performs its effects; the only owner of its workers.
//! - [`worker`]: spawning (on the main thread), signalling and reaping one worker process.
//! - [`window`]: a service's maintenance window in local time.
//! - [`release`]: watching a service's release paths, whose change upgrades it.
//! - [`readiness`]: HTTP and TCP probes of a new worker.
//! - [`route`]: the per-service routing snapshot behind one `ArcSwap`, and connection guards.
//! - [`listener`]: public sockets (socket2) and the accept loop.
//! - [`proxy`]: one connection: dial, copy both ways, half-close, reset; park and resume.
//! - [`proxy_protocol`]: the PROXY protocol header sent to workers and read from trusted load balancers.
//! - [`connection`]: one proxied connection as data, parked and resumed; its serialisable record.
//! - [`control`]: commands and published state shared by the supervisor and the admin API.
//! - [`admin`]: the admin HTTP API.
//! - [`cli`]: the operator's commands, clients of the admin API.
//! - [`clock`]: [`clock::Time`], a serialisable moment on the monotonic clock.
//! - [`metrics`]: the Prometheus registry; every metric name.
//! - [`reexec`]: re-executing baton in place: the new binary's check, the exec, the fall-back.
//! - [`handover`]: the daemon's whole state as one versioned document, which a re-exec carries.
//! - [`endpoint`]: [`endpoint::Endpoint`], a TCP address or Unix socket path: parse, print, bind, connect.
//! - [`error`]: [`error::chain`], an error and its causes on one line, for every layer.

pub mod activation;
pub mod admin;
pub mod cli;
pub mod clock;
pub mod config;
pub mod connection;
pub mod control;
pub mod endpoint;
pub mod error;
pub mod handover;
pub mod lifecycle;
pub mod listener;
pub mod metrics;
pub mod notify;
pub mod pidfile;
pub mod proxy;
pub mod proxy_protocol;
pub mod readiness;
pub mod reaper;
pub mod reexec;
pub mod release;
pub mod route;
pub mod service;
pub mod supervisor;
pub mod watch;
pub mod window;
pub mod worker;

pub use supervisor::run;
