//! Sockets a service manager passes at start (socket activation, `sd_listen_fds(3)`: `LISTEN_FDS`,
//! `LISTEN_PID`, `LISTEN_FDNAMES`): systemd's `.socket` units, its file descriptor store giving back what
//! baton stored before a restart, `systemd-socket-activate`.
//!
//! Each passed socket is matched to a configured listen address by the socket's own address
//! (`getsockname`), not by its name: a service's `listen` and the admin `listen` take the passed socket
//! bound there instead of binding one. A configured address no socket was passed for is bound as usual; a
//! passed socket nothing in the configuration listens on is an error at start, naming it. Only a fresh
//! start looks at them: a re-exec hands the sockets over in its state.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};

use crate::endpoint::Endpoint;

/// A socket the service manager passed.
#[derive(Debug)]
pub struct Passed {
    /// Its descriptor, close-on-exec.
    pub fd: OwnedFd,
    /// Its name (`FileDescriptorName=`, `--fdname=`), or `unknown`.
    pub name: String,
    /// The address it is bound to, if it is a listening stream socket on one baton could be configured
    /// with.
    pub local: Option<Endpoint>,
}

impl Passed {
    /// The socket, for messages: its name and address.
    pub fn describe(&self) -> String {
        match &self.local {
            Some(local) => format!("{} ({local})", self.name),
            None => format!("{} (not a listening TCP or Unix stream socket)", self.name),
        }
    }
}

/// The sockets passed to this process, if `LISTEN_PID` names it. Call it once, before any thread is
/// started: the variables are removed, so that nothing started later takes them for its own.
#[allow(unsafe_code)]
pub fn take() -> io::Result<Vec<Passed>> {
    // Meant for another process (the one the manager started, which then started baton): not ours to take.
    let ours = std::env::var("LISTEN_PID").is_ok_and(|pid| pid.trim() == std::process::id().to_string());
    if !ours {
        return Ok(Vec::new());
    }
    // SAFETY: called on the main thread before the runtime (or any other thread) starts, as documented.
    let passed = unsafe { sd_notify::listen_fds_with_names_and_unset_env()? };
    let mut sockets = Vec::new();
    for (fd, name) in passed {
        // SAFETY: the service manager passed `fd` to this process (LISTEN_PID names it), and nothing else
        // in it owns it: it is taken once, here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let local = local_endpoint(&fd);
        sockets.push(Passed { fd, name, local });
    }
    Ok(sockets)
}

/// The address a passed listening stream socket is bound to.
fn local_endpoint(fd: &OwnedFd) -> Option<Endpoint> {
    let socket = socket2::SockRef::from(fd);
    if !socket.is_listener().ok()? || socket.r#type().ok()? != socket2::Type::STREAM {
        return None;
    }
    let local = socket.local_addr().ok()?;
    match local.as_socket() {
        Some(addr) => Some(Endpoint::Tcp(addr)),
        None => local.as_pathname().map(|path| Endpoint::Unix(path.to_owned())),
    }
}

/// The passed sockets, by what the configuration would name them.
#[derive(Debug, Default)]
pub struct Pool {
    sockets: HashMap<Endpoint, Passed>,
    unusable: Vec<Passed>,
}

impl Pool {
    /// The pool of `passed`.
    pub fn new(passed: Vec<Passed>) -> Pool {
        let mut pool = Pool::default();
        for socket in passed {
            match socket.local.clone() {
                Some(local) if !pool.sockets.contains_key(&local) => {
                    pool.sockets.insert(local, socket);
                }
                _ => pool.unusable.push(socket),
            }
        }
        pool
    }

    /// Takes the passed socket bound to TCP address `addr`, if there is one.
    pub fn take_tcp(&mut self, addr: SocketAddr) -> Option<Passed> {
        self.sockets.remove(&Endpoint::Tcp(addr))
    }

    /// Takes the passed socket bound to `endpoint`, if there is one.
    pub fn take(&mut self, endpoint: &Endpoint) -> Option<Passed> {
        self.sockets.remove(endpoint)
    }

    /// Fails, naming them, if any passed socket was not taken.
    pub fn check_all_taken(self) -> Result<(), String> {
        let mut left: Vec<String> = self
            .sockets
            .values()
            .chain(&self.unusable)
            .map(Passed::describe)
            .collect();
        if left.is_empty() {
            return Ok(());
        }
        left.sort();
        Err(format!(
            "the service manager passed socket(s) that nothing in the configuration listens on: {}",
            left.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passed(listener: &std::net::TcpListener, name: &str) -> Passed {
        let fd = OwnedFd::from(listener.try_clone().expect("clone"));
        let local = local_endpoint(&fd);
        Passed {
            fd,
            name: name.into(),
            local,
        }
    }

    #[test]
    fn passed_sockets_are_matched_by_their_own_address_and_one_left_over_is_named() {
        let web = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let other = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let (web_addr, other_addr) = (web.local_addr().expect("addr"), other.local_addr().expect("addr"));
        let file = OwnedFd::from(std::fs::File::open("/proc/self/exe").expect("file"));
        let mut pool = Pool::new(vec![
            passed(&web, "web"),
            passed(&other, "spare"),
            Passed {
                local: local_endpoint(&file),
                fd: file,
                name: "file".into(),
            },
        ]);
        assert!(pool.take_tcp(web_addr).is_some());
        assert!(pool.take_tcp(web_addr).is_none(), "taken once");
        let error = pool.check_all_taken().expect_err("two left");
        assert!(error.contains(&format!("spare ({other_addr})")), "{error}");
        assert!(
            error.contains("file (not a listening TCP or Unix stream socket)"),
            "{error}"
        );
    }
}
