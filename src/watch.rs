//! The sockets of a service's connections, watched while a hand-over moves them to a new image.
//!
//! Registering a socket with the runtime's event queue is the costliest step of taking a connection over:
//! an `epoll_ctl` for each of its two sockets, which the kernel serialises on the queue. A new image that
//! registered every handed-over connection before serving any would keep the last of ten thousand waiting
//! for all the others. So, while the old image still runs, each connection adds its sockets to a [`Watch`]:
//! an epoll instance of its service's own, whose entries carry the socket's descriptor number (which an
//! exec keeps). The watch goes across the exec with the state. The new image resumes the connections that
//! were moving bytes at once and the idle ones in the background; between two steps it asks the watch which
//! idle ones have bytes or an end waiting and resumes those next. An idle connection is served as soon as it
//! has something to serve, however many are still being registered.
//!
//! Entries are level-triggered and one-shot: a socket that is readable, or hung up, when the new image asks
//! is reported once, whenever its bytes arrived (before the connection parked or after).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

/// How many ready sockets one look at the watch takes at most.
const BATCH: usize = 256;

/// An epoll instance holding the sockets of connections, each entry carrying its socket's descriptor.
#[derive(Debug)]
pub struct Watch {
    /// Which watch of its service this is: a connection that joined an earlier one joins this one too.
    id: u64,
    queue: Epoll,
    /// Connections that joined so far, their sockets added or not.
    joined: AtomicUsize,
}

impl Watch {
    /// A new, empty watch, close-on-exec like every descriptor baton opens.
    pub fn new(id: u64) -> io::Result<Watch> {
        Ok(Watch {
            id,
            queue: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?,
            joined: AtomicUsize::new(0),
        })
    }

    /// The watch a previous image handed over, as descriptor `fd`.
    pub fn adopt(fd: OwnedFd) -> Watch {
        Watch {
            id: 0,
            queue: Epoll(fd),
            joined: AtomicUsize::new(0),
        }
    }

    /// Which watch of its service this is.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// A connection joins: its two sockets are added, or neither if either cannot be.
    pub fn add(&self, client: BorrowedFd<'_>, worker: BorrowedFd<'_>) -> io::Result<()> {
        self.joined.fetch_add(1, Ordering::Relaxed);
        self.add_one(client)?;
        if let Err(e) = self.add_one(worker) {
            let _ = self.queue.delete(client);
            return Err(e);
        }
        Ok(())
    }

    fn add_one(&self, socket: BorrowedFd<'_>) -> io::Result<()> {
        let fd = u64::try_from(socket.as_raw_fd()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let interest = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLONESHOT;
        self.queue.add(socket, EpollEvent::new(interest, fd))?;
        Ok(())
    }

    /// How many connections have joined, their sockets added or not.
    pub fn joined(&self) -> usize {
        self.joined.load(Ordering::Relaxed)
    }

    /// Appends to `ready` the descriptor of every socket with bytes or an end waiting that has not been
    /// reported before, without waiting.
    pub fn ready(&self, ready: &mut Vec<RawFd>) -> io::Result<()> {
        let mut events = [EpollEvent::empty(); BATCH];
        loop {
            let count = self.queue.wait(&mut events, EpollTimeout::ZERO)?;
            ready.extend(
                events[..count]
                    .iter()
                    .filter_map(|event| RawFd::try_from(event.data()).ok()),
            );
            if count < BATCH {
                return Ok(());
            }
        }
    }
}

impl Watch {
    /// Closes the watch on a blocking thread: closing it removes every socket from it, which takes a while
    /// with thousands.
    pub fn close(self: std::sync::Arc<Self>) {
        tokio::task::spawn_blocking(move || drop(self));
    }
}

/// A watch registered with the runtime, for the old image to serve the connections resting in it while
/// the hand-over is prepared: a task waits until it may have something to report.
#[derive(Debug)]
pub struct Waiting {
    fd: tokio::io::unix::AsyncFd<Registered>,
}

/// The watch as the runtime sees it: its descriptor.
#[derive(Debug)]
struct Registered(std::sync::Arc<Watch>);

impl AsRawFd for Registered {
    fn as_raw_fd(&self) -> RawFd {
        self.0.queue.0.as_raw_fd()
    }
}

impl Waiting {
    /// Registers `watch`. Must run inside the runtime.
    #[allow(unsafe_code)]
    pub fn new(watch: std::sync::Arc<Watch>) -> io::Result<Waiting> {
        let registered = Registered(watch);
        // SAFETY: the descriptor is the watch's epoll instance, which the `Arc` the registration owns keeps
        // open, and the same, for as long as the registration lives.
        let fd =
            unsafe { tokio::io::unix::AsyncFd::register_with_interest(registered, tokio::io::Interest::READABLE) }?;
        Ok(Waiting { fd })
    }

    /// The watch.
    pub fn watch(&self) -> &Watch {
        &self.fd.get_ref().0
    }

    /// Resolves once the watch may have something to report (perhaps nothing: [`Watch::ready`] tells).
    /// Whatever it reports after this resolved wakes the next wait.
    pub async fn readable(&self) {
        match self.fd.readable().await {
            Ok(mut ready) => ready.clear_ready(),
            // The runtime is shutting down.
            Err(_) => std::future::pending().await,
        }
    }
}

impl AsFd for Watch {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.queue.0.as_fd()
    }
}

impl From<Watch> for OwnedFd {
    fn from(watch: Watch) -> OwnedFd {
        watch.queue.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_watch_reports_each_socket_with_bytes_or_an_end_once() {
        let watch = Watch::new(1).expect("watch");
        let (client, mut client_peer) = UnixStream::pair().expect("pair");
        let (worker, worker_peer) = UnixStream::pair().expect("pair");
        let (idle, _idle_peer) = UnixStream::pair().expect("pair");
        let (idle_worker, _idle_worker_peer) = UnixStream::pair().expect("pair");
        watch.add(client.as_fd(), worker.as_fd()).expect("add");
        watch.add(idle.as_fd(), idle_worker.as_fd()).expect("add");
        assert_eq!(watch.joined(), 2);
        let mut ready = Vec::new();
        watch.ready(&mut ready).expect("ready");
        assert!(ready.is_empty(), "nothing waits yet: {ready:?}");
        client_peer.write_all(b"x").expect("write");
        drop(worker_peer);
        watch.ready(&mut ready).expect("ready");
        ready.sort_unstable();
        let mut expected = vec![client.as_raw_fd(), worker.as_raw_fd()];
        expected.sort_unstable();
        assert_eq!(ready, expected, "the socket with a byte and the one hung up");
        client_peer.write_all(b"y").expect("write");
        ready.clear();
        watch.ready(&mut ready).expect("ready");
        assert!(ready.is_empty(), "each is reported once: {ready:?}");
    }

    #[test]
    fn a_connection_whose_socket_cannot_be_added_is_not_half_added() {
        let watch = Watch::new(1).expect("watch");
        let (client, _peer) = UnixStream::pair().expect("pair");
        // A regular file cannot be watched: epoll refuses it.
        let file = std::fs::File::open("/proc/self/exe").expect("file");
        assert!(watch.add(client.as_fd(), file.as_fd()).is_err());
        assert_eq!(watch.joined(), 1, "it joined all the same");
        // The client was taken back out: it can be added again.
        let (worker, _worker_peer) = UnixStream::pair().expect("pair");
        watch.add(client.as_fd(), worker.as_fd()).expect("added after all");
    }
}
