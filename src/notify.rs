//! The service manager's notification protocol (`sd_notify(3)`), when `NOTIFY_SOCKET` names one: systemd
//! with `Type=notify` (or `notify-reload`), and any manager that speaks it.
//!
//! The supervisor tells the [`Notifier`] what happens (ready, reloading, a reload applied or rejected, a
//! re-exec, stopping) and what its services look like; the notifier turns that into the protocol's lines
//! ([`Notifier::message`], a pure function) and sends them. `READY=1` follows every `RELOADING=1`, whether
//! the reload or re-exec went through or not; a rejected one says why in `STATUS=` until the next one
//! goes through. The variables are never removed from baton's environment: a re-exec carries them to the
//! new image, which sends its own `READY=1`. Workers never inherit them
//! ([`crate::worker::PRIVATE_VARIABLES`]).

use std::fmt::Write as _;
use std::os::fd::BorrowedFd;
use std::time::Duration;

use sd_notify::NotifyState;

/// What a service looks like in the status line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceLine {
    /// Its name.
    pub name: String,
    /// The generation of its active worker, if it has one.
    pub generation: Option<u64>,
    /// Its open connections, to every worker.
    pub connections: usize,
}

/// Something the service manager is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Every public socket is bound and every service has its first worker (or a re-exec is over).
    Ready,
    /// A reload (SIGHUP, the admin API) or a re-exec begins.
    Reloading,
    /// The reload or re-exec that began is over; with the error if it was rejected or failed.
    Reloaded(Option<String>),
    /// The services, as they stand now.
    Status,
    /// baton is shutting down.
    Stopping,
    /// The daemon's loop is alive.
    Watchdog,
}

/// The notifier: whether there is a manager to tell, and what the status line carries.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    /// Whether `NOTIFY_SOCKET` is set.
    enabled: bool,
    /// The manager's watchdog interval (`WATCHDOG_USEC`, for this process).
    watchdog: Option<Duration>,
    /// Why the last reload or re-exec was rejected, until one goes through.
    error: Option<String>,
    /// The last status line sent.
    sent: Option<String>,
    /// Whether a `RELOADING=1` waits for its `READY=1`.
    reloading: bool,
    /// Whether the manager keeps descriptors for baton (`$FDSTORE`, `FileDescriptorStoreMax=`).
    fd_store: bool,
}

impl Notifier {
    /// The notifier the environment asks for.
    pub fn from_env() -> Notifier {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty()),
            watchdog: sd_notify::watchdog_enabled(),
            error: None,
            sent: None,
            reloading: false,
            // systemd 254 and later set it to `FileDescriptorStoreMax=`; a unit for an older one sets it.
            fd_store: std::env::var("FDSTORE")
                .ok()
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|n| n > 0),
        }
    }

    /// Whether the manager keeps descriptors for baton: its public sockets are stored, and passed back
    /// (socket activation) when it starts again after a crash or a restart.
    pub fn stores_fds(&self) -> bool {
        self.enabled && self.fd_store
    }

    /// Stores `fd` under `name` ([`fd_name`]), if the manager keeps descriptors.
    pub fn store(&self, name: &str, fd: BorrowedFd<'_>) {
        if !self.stores_fds() {
            return;
        }
        let states = [NotifyState::FdStore, NotifyState::FdName(name)];
        match sd_notify::notify_with_fds(&states, &[fd]) {
            Ok(()) => tracing::info!(name, "socket stored with the service manager"),
            Err(error) => tracing::warn!(%error, name, "cannot store a socket with the service manager"),
        }
    }

    /// Removes what is stored under `name`, if the manager keeps descriptors.
    pub fn unstore(&self, name: &str) {
        if !self.stores_fds() {
            return;
        }
        let states = [NotifyState::FdStoreRemove, NotifyState::FdName(name)];
        match sd_notify::notify(&states) {
            Ok(()) => tracing::info!(name, "socket removed from the service manager's store"),
            Err(error) => tracing::warn!(%error, name, "cannot remove a socket from the service manager's store"),
        }
    }

    /// Whether a reload or re-exec was announced and its end not yet.
    pub fn is_reloading(&self) -> bool {
        self.reloading
    }

    /// Whether there is a manager to tell (`NOTIFY_SOCKET`).
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// How often to send `WATCHDOG=1`: half the manager's interval, when it asks for it.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.filter(|_| self.enabled).map(|interval| interval / 2)
    }

    /// The lines `notice` is sent as, with `services` as they stand; `None` for a status line that says
    /// what the last one sent said. Remembers what it said.
    pub fn message(&mut self, notice: &Notice, services: &[ServiceLine]) -> Option<String> {
        let mut lines = String::new();
        match notice {
            Notice::Ready => lines.push_str("READY=1\n"),
            Notice::Reloading => {
                // systemd 253 and later take a reload only with the moment it began.
                let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
                    .map(|t| t.tv_sec() * 1_000_000 + t.tv_nsec() / 1_000)
                    .unwrap_or_default();
                let _ = writeln!(lines, "RELOADING=1\nMONOTONIC_USEC={now}");
                self.reloading = true;
            }
            Notice::Reloaded(error) => {
                self.error = error.clone();
                self.reloading = false;
                lines.push_str("READY=1\n");
            }
            Notice::Status => {}
            Notice::Stopping => lines.push_str("STOPPING=1\n"),
            Notice::Watchdog => return Some("WATCHDOG=1\n".to_owned()),
        }
        let status = status_line(services, self.error.as_deref());
        if matches!(notice, Notice::Status) && self.sent.as_deref() == Some(status.as_str()) {
            return None;
        }
        let _ = writeln!(lines, "STATUS={status}");
        self.sent = Some(status);
        Some(lines)
    }

    /// Tells the manager `notice`, if there is one: a manager that cannot be told is logged, never fatal.
    pub fn notify(&mut self, notice: Notice, services: &[ServiceLine]) {
        if !self.enabled {
            return;
        }
        let Some(message) = self.message(&notice, services) else {
            return;
        };
        let states: Vec<NotifyState<'_>> = message.lines().map(NotifyState::Custom).collect();
        if let Err(error) = sd_notify::notify(&states) {
            tracing::warn!(%error, ?notice, "cannot notify the service manager");
        }
    }
}

/// The name a socket is stored under: its address, with `_` for the `:` a name may not hold.
pub fn fd_name(addr: &std::net::SocketAddr) -> String {
    format!("tcp-{addr}").replace(':', "_")
}

/// What `systemctl status` shows: every service with its generation and connections, and the last
/// rejected reload or failed re-exec, on one line.
pub fn status_line(services: &[ServiceLine], error: Option<&str>) -> String {
    let mut line = match services.len() {
        1 => "1 service: ".to_owned(),
        n => format!("{n} services: "),
    };
    for (i, service) in services.iter().enumerate() {
        if i > 0 {
            line.push_str(", ");
        }
        let _ = match service.generation {
            Some(generation) => write!(
                line,
                "{} generation {generation} ({} connections)",
                service.name, service.connections
            ),
            None => write!(line, "{} no worker ({} connections)", service.name, service.connections),
        };
    }
    if let Some(error) = error {
        let _ = write!(line, "; {error}");
    }
    // One line: the protocol is a line per variable.
    line.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web(generation: Option<u64>, connections: usize) -> Vec<ServiceLine> {
        vec![ServiceLine {
            name: "web".into(),
            generation,
            connections,
        }]
    }

    #[test]
    fn the_status_line_names_every_service_and_the_last_error() {
        let mut services = web(Some(3), 12);
        services.push(ServiceLine {
            name: "api".into(),
            generation: None,
            connections: 0,
        });
        assert_eq!(
            status_line(&services, Some("reload rejected: line 3\nbad")),
            "2 services: web generation 3 (12 connections), api no worker (0 connections); reload rejected: line 3 bad"
        );
    }

    #[test]
    fn a_reload_is_reloading_then_ready_and_a_rejected_one_says_why_until_the_next() {
        let mut notifier = Notifier::default();
        let reloading = notifier.message(&Notice::Reloading, &web(Some(1), 0)).expect("sent");
        let mut lines = reloading.lines();
        assert_eq!(lines.next(), Some("RELOADING=1"));
        let usec: i64 = lines
            .next()
            .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
            .and_then(|v| v.parse().ok())
            .expect("MONOTONIC_USEC");
        assert!(usec > 0);
        let rejected = notifier
            .message(&Notice::Reloaded(Some("reload rejected: bad".into())), &web(Some(1), 0))
            .expect("sent");
        assert_eq!(
            rejected,
            "READY=1\nSTATUS=1 service: web generation 1 (0 connections); reload rejected: bad\n"
        );
        // The status keeps saying so, and an unchanged one is not sent again.
        assert_eq!(notifier.message(&Notice::Status, &web(Some(1), 0)), None);
        let status = notifier.message(&Notice::Status, &web(Some(1), 5)).expect("changed");
        assert!(status.contains("reload rejected: bad"), "{status}");
        let applied = notifier
            .message(&Notice::Reloaded(None), &web(Some(2), 5))
            .expect("sent");
        assert_eq!(applied, "READY=1\nSTATUS=1 service: web generation 2 (5 connections)\n");
    }

    #[test]
    fn the_watchdog_is_kept_only_when_the_manager_asks_for_it() {
        let mut notifier = Notifier::default();
        assert_eq!(notifier.watchdog_interval(), None);
        notifier.enabled = true;
        notifier.watchdog = Some(Duration::from_secs(10));
        assert_eq!(notifier.watchdog_interval(), Some(Duration::from_secs(5)));
        assert_eq!(
            notifier.message(&Notice::Watchdog, &[]).as_deref(),
            Some("WATCHDOG=1\n")
        );
    }
}
