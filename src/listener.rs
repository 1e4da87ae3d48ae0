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
    /// Binds and listens on `addr` with SO_REUSEADDR, IPv6 sockets being IPv6-only. Must run inside the runtime.
    pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<Listener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.set_reuse_address(true)?;
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

    /// The listening socket's file descriptor, to hand to another process.
    pub fn raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

/// Accepts connections on `listener` forever, serving each with the service's current route.
pub async fn accept_loop(listener: Arc<Listener>, service: String, route: SharedRoute) {
    loop {
        match listener.socket.accept().await {
            Ok((stream, _peer)) => {
                let route = Arc::clone(&route);
                tokio::spawn(async move {
                    proxy::serve(stream, &route).await;
                });
            }
            Err(e) if is_resource_exhaustion(&e) => {
                tracing::warn!(service = %service, listen = %listener.local, error = %e, "accept failed: backing off");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
            // A connection reset while queued, or similar: the next one is fine.
            Err(e) => {
                tracing::debug!(service = %service, listen = %listener.local, error = %e, "accept failed")
            }
        }
    }
}

/// Whether an accept error means the process or system is out of something, so retrying at once would spin.
fn is_resource_exhaustion(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(nix::libc::EMFILE | nix::libc::ENFILE | nix::libc::ENOBUFS | nix::libc::ENOMEM)
    )
}
