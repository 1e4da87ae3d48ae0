//! Public listening sockets: binding them (socket2) and the accept loop with its error backoff.
//!
//! Sockets are bound before any worker starts and live as long as the daemon configures them; each keeps
//! its file descriptor so that a later baton can inherit it. The accept loop hands every connection to
//! [`crate::proxy::serve`] on its own task and never spins on an error.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::Semaphore;

use crate::proxy;
use crate::route::SharedRoute;

/// The pause after an accept error that a retry cannot fix at once (no file descriptor, no memory).
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A bound, listening public socket.
#[derive(Debug)]
pub struct Listener {
    /// The address as configured (its port may be 0).
    pub configured: SocketAddr,
    /// The address actually bound.
    pub local: SocketAddr,
    socket: tokio::net::TcpListener,
}

impl Listener {
    /// Binds and listens on `addr` with SO_REUSEADDR and TCP_NODELAY, IPv6 sockets being IPv6-only. Must run inside the runtime.
    pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<Listener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.set_reuse_address(true)?;
        // Accepted sockets inherit it, which saves a system call per connection.
        socket.set_nodelay(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
        let std_listener: std::net::TcpListener = socket.into();
        let local = std_listener.local_addr()?;
        Ok(Listener {
            configured: addr,
            local,
            socket: tokio::net::TcpListener::from_std(std_listener)?,
        })
    }

    /// Listens on `fd`, a TCP socket a previous image of baton bound for `configured`. Must run inside the
    /// runtime. Fails if `fd` is not a listening TCP socket.
    pub fn adopt(configured: SocketAddr, fd: std::os::fd::OwnedFd) -> io::Result<Listener> {
        let socket = Socket::from(fd);
        if !socket.is_listener()? || socket.r#type()? != Type::STREAM {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a listening TCP socket",
            ));
        }
        socket.set_nonblocking(true)?;
        let std_listener: std::net::TcpListener = socket.into();
        let local = std_listener.local_addr()?;
        Ok(Listener {
            configured,
            local,
            socket: tokio::net::TcpListener::from_std(std_listener)?,
        })
    }

    /// The listening socket's file descriptor, to hand to another process.
    pub fn raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// The listening socket, whose options accepted sockets inherit.
    pub(crate) fn socket(&self) -> &tokio::net::TcpListener {
        &self.socket
    }
}

/// Accepts connections on `listener` forever, serving each with the service's current route.
///
/// Each connection takes a permit of `budget` (see [`connection_budget`]): when none is left, accepting pauses
/// and new connections wait in the kernel's listen queue, so baton keeps descriptors for its admin API and its
/// workers. Should the process still run out of descriptors or memory, it pauses [`ACCEPT_BACKOFF`] between
/// tries instead of spinning.
pub async fn accept_loop(listener: Arc<Listener>, service: String, route: SharedRoute, budget: Arc<Semaphore>) {
    let mut exhausted = false;
    let mut saturated = false;
    // Every route of a service shares this: loaded once, not per connection.
    let shared = Arc::clone(&route.load().shared);
    loop {
        let permit = match Arc::clone(&budget).try_acquire_owned() {
            Ok(permit) => {
                if saturated {
                    saturated = false;
                    tracing::info!(service = %service, listen = %listener.local, "connection budget available again");
                }
                permit
            }
            Err(_) => {
                if !saturated {
                    saturated = true;
                    tracing::warn!(
                        service = %service, listen = %listener.local,
                        "connection budget reached: new connections wait in the listen queue"
                    );
                }
                match Arc::clone(&budget).acquire_owned().await {
                    Ok(permit) => permit,
                    Err(_) => return,
                }
            }
        };
        match listener.socket.accept().await {
            Ok((stream, peer)) => {
                if exhausted {
                    exhausted = false;
                    tracing::info!(service = %service, listen = %listener.local, "accepting again");
                }
                let route = Arc::clone(&route);
                // Counted before the task exists, so that a service parking its connections waits for it.
                shared.accepted();
                tokio::spawn(async move {
                    proxy::serve(stream, peer, &route).await;
                    drop(permit);
                });
            }
            Err(e) if is_resource_exhaustion(&e) => {
                shared.metrics.accept_errors.inc();
                if !exhausted {
                    exhausted = true;
                    tracing::warn!(service = %service, listen = %listener.local, error = %e, "accept failed: backing off");
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
            // A connection reset while queued, or similar: the next one is fine.
            Err(e) => tracing::debug!(service = %service, listen = %listener.local, error = %e, "accept failed"),
        }
    }
}

/// How many proxied connections the open-file limit `fd_limit` allows: two descriptors each (client and
/// worker), after a reserve for the admin API, probes, listeners and spawning.
pub fn connection_budget(fd_limit: u64) -> usize {
    let reserve = (fd_limit / 8).clamp(32, 1024);
    usize::try_from(fd_limit.saturating_sub(reserve) / 2)
        .unwrap_or(usize::MAX)
        .clamp(1, Semaphore::MAX_PERMITS)
}

/// Whether an accept error means the process or system is out of something, so retrying at once would spin.
fn is_resource_exhaustion(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(nix::libc::EMFILE | nix::libc::ENFILE | nix::libc::ENOBUFS | nix::libc::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_inherit_tcp_nodelay() {
        let listener = Listener::bind("127.0.0.1:0".parse().expect("address"), 16).expect("bind");
        let _client = std::net::TcpStream::connect(listener.local).expect("connect");
        let (accepted, _) = listener.socket.accept().await.expect("accept");
        assert!(
            accepted.nodelay().expect("TCP_NODELAY"),
            "baton relies on the listener's TCP_NODELAY"
        );
    }

    #[test]
    fn the_budget_leaves_a_reserve_and_counts_two_descriptors_a_connection() {
        assert_eq!(connection_budget(64), 16);
        assert_eq!(connection_budget(1024), 448);
        assert_eq!(connection_budget(1 << 20), ((1 << 20) - 1024) / 2);
        assert_eq!(connection_budget(10), 1, "never zero");
    }
}
