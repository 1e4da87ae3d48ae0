//! One proxied connection as data, and parking it.
//!
//! A [`Connection`] is everything a proxied connection is once its worker is dialled: the two sockets, per
//! direction the bytes read but not yet written and whether the source has ended, whether each end has been
//! passed on, the resend [`Tail`], the moment its silence timers count from, whether the worker's end is
//! being held back from the client (and until when), and what the two directions note for each other. The
//! copy loop in [`crate::proxy`] keeps all of that here and nothing it cannot lose in a local across an
//! await, so it can be stopped at any await point: that is parking.
//!
//! A [`Parked`] connection is one taken off its task: the bytes in its splice pipes read back into its
//! pending bytes, its timers frozen at the moment it parked. Resuming it writes the pending bytes first,
//! does not pass on again an end already passed on, and gives each timer the time it had left.
//! [`Parked::into_parts`] splits one into a serialisable [`ParkedRecord`] and its two sockets, so that a
//! handover can carry it across an exec; [`Parked::from_parts`] is the inverse.
//!
//! This module owns no task, dials nothing and never looks at routes, workers or configuration.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;

use crate::clock::Time;

/// Bytes read from one side before they are written to the other.
pub const BUFFER_SIZE: usize = 64 * 1024;

/// The buffer a direction starts with; it grows to [`BUFFER_SIZE`] once a read fills it. Most exchanges
/// (and every close) fit, so a burst of short connections never allocates the large buffers.
pub const FIRST_BUFFER_SIZE: usize = 4 * 1024;

/// The most unanswered bytes a connection keeps to resend (see [`Tail`]).
pub const RESEND_LIMIT: usize = 64 * 1024;

/// A dialled worker connection.
#[derive(Debug)]
pub(crate) enum WorkerStream {
    /// Over loopback TCP.
    Tcp(TcpStream),
    /// Over a Unix socket.
    Unix(UnixStream),
}

impl AsFd for WorkerStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            WorkerStream::Tcp(worker) => worker.as_fd(),
            WorkerStream::Unix(worker) => worker.as_fd(),
        }
    }
}

/// How the worker socket of a parked connection is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// A TCP socket.
    Tcp,
    /// A Unix stream socket.
    Unix,
}

/// A proxied connection with a dialled worker.
#[derive(Debug)]
pub struct Connection {
    /// The accepted client socket.
    pub(crate) client: TcpStream,
    /// The worker socket.
    pub(crate) worker: WorkerStream,
    /// Everything but the sockets.
    pub(crate) state: State,
}

/// A connection's state besides its sockets.
#[derive(Debug)]
pub(crate) struct State {
    /// When the client was accepted.
    pub(crate) accepted: Time,
    /// Client to worker.
    pub(crate) to_worker: Flow,
    /// Worker to client.
    pub(crate) to_client: Flow,
    /// Whether the client's end has been passed on to the worker (a `shutdown` of the worker socket).
    pub(crate) worker_shut: bool,
    /// Whether the worker's end has been passed on to the client.
    pub(crate) client_shut: bool,
    /// Until when the worker's end is held back from the client (a draining worker's FIN; see
    /// [`crate::proxy::END_HOLD`]).
    pub(crate) held_until: Option<Time>,
    /// The client's bytes the worker has not answered, kept to resend.
    pub(crate) tail: Tail,
    /// What both directions note for each other.
    pub(crate) activity: Activity,
    /// The id of the last [`crate::watch::Watch`] of the service the connection joined, or 0.
    pub(crate) joined: u64,
    /// Whether its sockets are in that watch.
    pub(crate) watched: bool,
    /// The client's address: the connection's own, or the one a trusted PROXY protocol header carried.
    pub(crate) client_addr: Option<std::net::SocketAddr>,
    /// The PROXY protocol header that goes to each worker ahead of the client's bytes.
    pub(crate) proxy_header: Option<Vec<u8>>,
    /// Whether the client has sent a byte (a connection it ends unanswered is then the worker's failure).
    pub(crate) client_sent: bool,
}

impl State {
    /// A connection accepted at `accepted` whose worker was just dialled.
    pub(crate) fn new(accepted: Time, resend: bool) -> State {
        State {
            accepted,
            to_worker: Flow::new(),
            to_client: Flow::new(),
            worker_shut: false,
            client_shut: false,
            held_until: None,
            tail: Tail::new(resend),
            activity: Activity::new(),
            joined: 0,
            watched: false,
            client_addr: None,
            proxy_header: None,
            client_sent: false,
        }
    }

    /// Sets the client's address, and the PROXY protocol header that goes to the worker first: now, and
    /// again to each worker the connection is resent to.
    pub(crate) fn introduce(&mut self, client: std::net::SocketAddr, header: Option<Vec<u8>>) {
        self.client_addr = Some(client);
        if let Some(header) = &header {
            self.to_worker.buffer = Some(header.clone());
            self.to_worker.written = 0;
        }
        self.proxy_header = header;
    }

    /// Readies the state for a new worker connection that gets the tail: the tail becomes the bytes to
    /// send first (whatever was pending is in it), after the PROXY protocol header if the connection has
    /// one, and the old worker's direction starts over.
    pub(crate) fn resend(&mut self) {
        let mut tail = self.proxy_header.clone().unwrap_or_default();
        tail.extend_from_slice(self.tail.bytes());
        self.to_worker.buffer = (!tail.is_empty()).then_some(tail);
        self.to_worker.written = 0;
        self.to_worker.pipe = None;
        // The client's end, if it came, goes to the new worker after the tail.
        self.worker_shut = false;
        self.to_client = Flow::new();
        self.held_until = None;
        self.activity = Activity::new();
    }
}

/// One direction of a connection: the bytes read from its source and not yet written to its
/// destination, and where the source stands.
#[derive(Debug)]
pub(crate) struct Flow {
    /// The buffer, held only while data moves: `buffer[written..]` is read and not yet written.
    pub(crate) buffer: Option<Vec<u8>>,
    /// How much of `buffer` has been written.
    pub(crate) written: usize,
    /// The size of the next buffer: [`FIRST_BUFFER_SIZE`], or [`BUFFER_SIZE`] during a bulk transfer.
    pub(crate) size: usize,
    /// The splice pipe, while the direction moves bulk data: boxed, so that the many connections that
    /// never splice (and every idle one) carry a pointer instead of the pipe's state.
    pub(crate) pipe: Option<Box<Pipe>>,
    /// Whether the source's end of stream has been read.
    pub(crate) ended: bool,
}

impl Flow {
    fn new() -> Flow {
        Flow {
            buffer: None,
            written: 0,
            size: FIRST_BUFFER_SIZE,
            pipe: None,
            ended: false,
        }
    }

    /// The bytes read and not yet written, outside any pipe.
    pub(crate) fn pending(&self) -> &[u8] {
        self.buffer
            .as_deref()
            .and_then(|b| b.get(self.written..))
            .unwrap_or(&[])
    }

    /// Whether the source has ended and everything read from it is written.
    pub(crate) fn is_done(&self) -> bool {
        self.ended && self.pending().is_empty() && self.pipe.as_ref().is_none_or(|p| p.held == 0)
    }

    /// This direction as a record. Its pipe must be empty ([`Connection::empty_pipes`]).
    fn park(&mut self) -> FlowRecord {
        let mut pending = match self.buffer.take() {
            Some(mut buffer) => {
                buffer.drain(..self.written.min(buffer.len()));
                buffer
            }
            None => Vec::new(),
        };
        self.written = 0;
        pending.shrink_to_fit();
        FlowRecord {
            pending,
            size: self.size,
            ended: self.ended,
        }
    }

    /// The direction a record describes.
    fn resume(record: FlowRecord) -> Flow {
        Flow {
            buffer: (!record.pending.is_empty()).then_some(record.pending),
            written: 0,
            size: record.size.clamp(FIRST_BUFFER_SIZE, BUFFER_SIZE),
            pipe: None,
            ended: record.ended,
        }
    }
}

/// A pipe that bulk data is spliced through, and what it holds.
#[derive(Debug)]
pub(crate) struct Pipe {
    /// The end the destination is spliced from.
    pub(crate) read: OwnedFd,
    /// The end the source is spliced into.
    pub(crate) write: OwnedFd,
    /// How much the pipe holds at most.
    pub(crate) capacity: usize,
    /// Bytes spliced in and not yet out.
    pub(crate) held: usize,
    /// What the last splice from the source moved: less than [`BUFFER_SIZE`] ends the bulk transfer once
    /// the pipe is empty.
    pub(crate) last: usize,
}

impl Pipe {
    /// Appends what the pipe holds to `into`. The pipe holds `held` bytes, so the reads never wait.
    fn read_back(self, into: &mut Vec<u8>) -> io::Result<()> {
        let start = into.len();
        into.resize(start + self.held, 0);
        File::from(self.read).read_exact(&mut into[start..])
    }
}

/// The bytes a connection sent its worker since the worker last sent any: the part of the stream the worker
/// has not answered. Should the worker close without reading them, they can go to another worker. A
/// connection that sends more than [`RESEND_LIMIT`] without an answer keeps nothing until the next answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tail {
    /// `resend_unanswered` is off.
    Off,
    /// The unanswered bytes, all of them.
    Kept(Vec<u8>),
    /// Too many to keep, or some were spliced unseen: nothing can be resent until the next answer.
    Overflowed,
}

impl Tail {
    pub(crate) fn new(enabled: bool) -> Tail {
        if enabled { Tail::Kept(Vec::new()) } else { Tail::Off }
    }

    /// Notes `chunk`, about to go to the worker; `answered` says whether the worker has sent anything since
    /// the previous chunk. Returns whether the unanswered bytes are all kept.
    pub(crate) fn record(&mut self, chunk: &[u8], answered: bool) -> bool {
        match self {
            Tail::Off => return false,
            // A long unanswered run (an upload) does not leave its memory behind on an idle connection.
            Tail::Kept(bytes) if answered && bytes.capacity() > FIRST_BUFFER_SIZE => *bytes = Vec::new(),
            Tail::Kept(bytes) if answered => bytes.clear(),
            Tail::Overflowed if answered => *self = Tail::Kept(Vec::new()),
            _ => {}
        }
        match self {
            Tail::Kept(bytes) if bytes.len() + chunk.len() <= RESEND_LIMIT => {
                bytes.extend_from_slice(chunk);
                true
            }
            Tail::Kept(_) => {
                *self = Tail::Overflowed;
                false
            }
            Tail::Off | Tail::Overflowed => false,
        }
    }

    /// Notes bytes that went to the worker unseen (spliced): nothing can be resent until the next answer.
    pub(crate) fn lose(&mut self) -> bool {
        if !matches!(self, Tail::Off) {
            *self = Tail::Overflowed;
        }
        false
    }

    /// The unanswered bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Tail::Kept(bytes) => bytes,
            Tail::Off | Tail::Overflowed => &[],
        }
    }
}

/// What both directions of a connection note for each other: when a byte last moved (for the idle and
/// half-close timeouts) and where the exchange stands (for resending). They run on the same task, so the
/// atomics are never contended; relaxed loads and stores are plain moves.
#[derive(Debug)]
pub(crate) struct Activity {
    /// The moment `last` counts from.
    start: Instant,
    /// Milliseconds from `start` to the last read.
    last: AtomicU64,
    /// Whether the worker has sent bytes since the client's last chunk.
    answered: AtomicBool,
    /// Whether the client's bytes since the worker's last answer are all kept in the [`Tail`].
    kept: AtomicBool,
    /// Whether the worker's end is being held back from the client: what the client sends now cannot go to it.
    worker_ended: AtomicBool,
}

impl Activity {
    pub(crate) fn new() -> Activity {
        Activity::since(Instant::now())
    }

    /// Activity whose last byte moved at `last`.
    fn since(last: Instant) -> Activity {
        Activity {
            start: last,
            last: AtomicU64::new(0),
            answered: AtomicBool::new(false),
            kept: AtomicBool::new(false),
            worker_ended: AtomicBool::new(false),
        }
    }

    /// The worker sent bytes.
    pub(crate) fn answered(&self) {
        self.answered.store(true, Ordering::Relaxed);
    }

    /// Whether the worker sent bytes since the last call.
    pub(crate) fn take_answered(&self) -> bool {
        let answered = self.answered.load(Ordering::Relaxed);
        if answered {
            self.answered.store(false, Ordering::Relaxed);
        }
        answered
    }

    /// The client sent a chunk; `kept` says whether the tail holds every unanswered byte.
    pub(crate) fn sent(&self, kept: bool) {
        self.kept.store(kept, Ordering::Relaxed);
    }

    /// The worker closed its side, and the client is not told yet.
    pub(crate) fn end_worker(&self) {
        self.worker_ended.store(true, Ordering::Relaxed);
    }

    /// Whether the worker's end is being held back.
    pub(crate) fn worker_ended(&self) -> bool {
        self.worker_ended.load(Ordering::Relaxed)
    }

    /// Whether there are unanswered bytes and the tail holds them all.
    pub(crate) fn resendable(&self) -> bool {
        self.kept.load(Ordering::Relaxed) && !self.answered.load(Ordering::Relaxed)
    }

    /// A byte moved.
    pub(crate) fn touch(&self) {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }

    /// When a byte last moved.
    fn last_moved(&self) -> Instant {
        self.start + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }

    /// Resolves once nothing has moved for `limit`. One timer, re-armed only when it fires early.
    pub(crate) async fn silent_for(&self, limit: Duration) {
        loop {
            let deadline = self.last_moved() + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

impl Connection {
    /// A connection accepted at `accepted` whose worker was just dialled; `resend` keeps its [`Tail`].
    pub(crate) fn new(client: TcpStream, worker: WorkerStream, accepted: Time, resend: bool) -> Connection {
        Connection {
            client,
            worker,
            state: State::new(accepted, resend),
        }
    }

    /// Reads the bytes in the splice pipes back after the pending bytes, which parking needs first: after
    /// this, nothing of the connection is anywhere but in its struct and its sockets. Returns how many
    /// bytes came from the pipes.
    pub(crate) fn empty_pipes(&mut self) -> io::Result<usize> {
        let mut moved = 0;
        for flow in [&mut self.state.to_worker, &mut self.state.to_client] {
            if let Some(pipe) = flow.pipe.take() {
                moved += pipe.held;
                let mut pending = flow.buffer.take().unwrap_or_default();
                pending.drain(..flow.written.min(pending.len()));
                flow.written = 0;
                (*pipe).read_back(&mut pending)?;
                flow.buffer = (!pending.is_empty()).then_some(pending);
            }
        }
        Ok(moved)
    }

    /// Reads, without waiting, what the client has sent already onto the PROXY protocol header that is to go
    /// to the worker first, so that both go in one write (and one segment): as the relay would have read
    /// it, into the tail too. A client that waits for the server to speak first has sent nothing: the
    /// header goes alone, at once.
    pub(crate) fn coalesce(&mut self) {
        let State {
            to_worker,
            tail,
            activity,
            client_sent,
            ..
        } = &mut self.state;
        let Some(buf) = to_worker.buffer.as_mut() else { return };
        let start = buf.len();
        buf.resize(start + FIRST_BUFFER_SIZE, 0);
        let read = self.client.try_read(&mut buf[start..]).unwrap_or(0);
        buf.truncate(start + read);
        if read > 0 {
            let answered = activity.take_answered();
            let kept = tail.record(&buf[start..], answered);
            activity.sent(kept);
            activity.touch();
            *client_sent = true;
        }
    }

    /// Joins `watch`: adds the connection's sockets to it and makes them inheritable, for the exec to come
    /// (no child inherits them meanwhile: every child baton starts marks its descriptors close-on-exec
    /// first, see [`crate::reexec::close_all_on_exec`]). A connection that cannot do both joins all the
    /// same, unwatched: it is then resumed with the active ones.
    pub(crate) fn join(&mut self, watch: &crate::watch::Watch) -> io::Result<()> {
        self.state.joined = watch.id();
        self.state.watched = false;
        watch.add(self.client.as_fd(), self.worker.as_fd())?;
        let fds = self.raw_fds();
        if let Err(e) = fds.iter().try_for_each(|fd| crate::reexec::set_inheritable(*fd, true)) {
            self.close_on_exec();
            return Err(e);
        }
        self.state.watched = true;
        Ok(())
    }

    /// Leaves the watch it joined, which ended without an exec: its sockets are close-on-exec again.
    pub(crate) fn leave(&mut self) {
        if self.state.watched {
            self.close_on_exec();
        }
        self.state.joined = 0;
        self.state.watched = false;
    }

    fn raw_fds(&self) -> [RawFd; 2] {
        [self.client.as_raw_fd(), self.worker.as_fd().as_raw_fd()]
    }

    fn close_on_exec(&self) {
        for fd in self.raw_fds() {
            if let Err(error) = crate::reexec::set_inheritable(fd, false) {
                tracing::warn!(%error, fd, "cannot make a connection's socket close-on-exec again");
            }
        }
    }

    /// Whether the connection waits for bytes on both sides with nothing read and not written, no end
    /// read and none held back: a connection that can rest in its service's watch, which reports the next
    /// byte or end on either side.
    pub(crate) fn is_quiet(&self) -> bool {
        let quiet =
            |flow: &Flow| !flow.ended && flow.pending().is_empty() && flow.pipe.as_ref().is_none_or(|p| p.held == 0);
        let state = &self.state;
        quiet(&state.to_worker)
            && quiet(&state.to_client)
            && !state.worker_shut
            && !state.client_shut
            && state.held_until.is_none()
            && !state.activity.worker_ended()
    }

    /// This connection, parked now: `generation` is its worker's, `answered` whether that worker has sent
    /// it a byte, `from_pipes` what [`Connection::empty_pipes`] read back; `rests` if it parks to rest in
    /// the watch it has just joined ([`Parked::watched`]). Its pipes must be empty.
    pub(crate) fn park(self, generation: u64, answered: bool, from_pipes: usize, rests: bool) -> Parked {
        let Connection {
            client,
            worker,
            mut state,
        } = self;
        let to_worker = state.to_worker.park();
        let to_client = state.to_client.park();
        let activity = &state.activity;
        let record = ParkedRecord {
            generation,
            backend: match worker {
                WorkerStream::Tcp(_) => Backend::Tcp,
                WorkerStream::Unix(_) => Backend::Unix,
            },
            answered,
            accepted: state.accepted,
            parked_at: Time::now(),
            last_moved: Time::of(activity.last_moved()),
            held_until: state.held_until,
            to_worker,
            to_client,
            worker_shut: state.worker_shut,
            client_shut: state.client_shut,
            tail: state.tail,
            answered_since_sent: activity.answered.load(Ordering::Relaxed),
            kept: activity.kept.load(Ordering::Relaxed),
            worker_ended: activity.worker_ended(),
            client: state.client_addr,
            proxy_header: state.proxy_header,
            client_sent: state.client_sent,
        };
        Parked {
            record,
            client,
            worker,
            from_pipes,
            watched: rests && state.watched,
            joined: state.joined,
            inheritable: state.watched,
        }
    }
}

/// A connection taken off its task at a safe point: nothing half-written is anywhere but in its record.
#[derive(Debug)]
pub struct Parked {
    /// Everything but the sockets.
    pub record: ParkedRecord,
    /// The client socket.
    client: TcpStream,
    /// The worker socket.
    worker: WorkerStream,
    /// How many of the pending bytes were read back from splice pipes when the connection parked.
    pub from_pipes: usize,
    /// Whether it rests in its service's watch: its sockets are in it, inheritable ([`Connection::join`]),
    /// and their entries armed, so that the watch reports its next byte or end. A connection that joined
    /// the watch and parked only when it was frozen is not watched so: its entries may have reported
    /// already.
    pub watched: bool,
    /// The id of the watch it joined, or 0.
    joined: u64,
    /// Whether its sockets are inheritable, having joined that watch.
    inheritable: bool,
}

/// A parked connection without its sockets: what a handover writes out and reads back. Times are moments on
/// CLOCK_MONOTONIC ([`Time`]), so they mean the same after an exec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParkedRecord {
    /// The generation of the worker the connection is relayed to.
    pub generation: u64,
    /// How the worker socket is connected.
    pub backend: Backend,
    /// Whether the worker has sent a byte on this connection ([`crate::route::Guard::is_answered`]).
    pub answered: bool,
    /// When the client was accepted.
    pub accepted: Time,
    /// When the connection parked.
    pub parked_at: Time,
    /// When a byte last moved either way: the idle and half-close timeouts count from here.
    pub last_moved: Time,
    /// Until when the worker's end is held back from the client, if it is.
    pub held_until: Option<Time>,
    /// Client to worker: the bytes read and not yet written, and whether the client has ended.
    pub to_worker: FlowRecord,
    /// Worker to client: the bytes read and not yet written, and whether the worker has ended.
    pub to_client: FlowRecord,
    /// Whether the client's end has been passed on to the worker.
    pub worker_shut: bool,
    /// Whether the worker's end has been passed on to the client.
    pub client_shut: bool,
    /// The client's bytes the worker has not answered.
    pub tail: Tail,
    /// Whether the worker has sent bytes since the client's last chunk.
    pub answered_since_sent: bool,
    /// Whether the tail holds every byte the worker has not answered.
    pub kept: bool,
    /// Whether the worker's end is held back, so that what the client sends now cannot go to it.
    pub worker_ended: bool,
    /// The client's address: the connection's own, or the one a trusted PROXY protocol header carried.
    #[serde(default)]
    pub client: Option<std::net::SocketAddr>,
    /// The PROXY protocol header that goes ahead of the connection's bytes to each worker it is sent to.
    #[serde(default)]
    pub proxy_header: Option<Vec<u8>>,
    /// Whether the client has sent a byte.
    #[serde(default)]
    pub client_sent: bool,
}

/// One direction of a parked connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowRecord {
    /// Read from the source and not yet written to the destination, in order.
    pub pending: Vec<u8>,
    /// The size of the direction's next buffer.
    pub size: usize,
    /// Whether the source's end of stream has been read.
    pub ended: bool,
}

impl ParkedRecord {
    /// Whether the connection moved bytes within [`crate::reexec::ACTIVE_WINDOW`] before it parked.
    pub fn is_active(&self) -> bool {
        self.parked_at.since(self.last_moved) < crate::reexec::ACTIVE_WINDOW
    }
}

impl Parked {
    /// The descriptors of the two sockets, client first, as a handover names them.
    pub fn raw_fds(&self) -> [RawFd; 2] {
        let worker = match &self.worker {
            WorkerStream::Tcp(worker) => worker.as_raw_fd(),
            WorkerStream::Unix(worker) => worker.as_raw_fd(),
        };
        [self.client.as_raw_fd(), worker]
    }

    /// The record and the two sockets, client first, as owned descriptors (non-blocking).
    pub fn into_parts(self) -> io::Result<(ParkedRecord, [OwnedFd; 2])> {
        let client = OwnedFd::from(self.client.into_std()?);
        let worker = match self.worker {
            WorkerStream::Tcp(worker) => OwnedFd::from(worker.into_std()?),
            WorkerStream::Unix(worker) => OwnedFd::from(worker.into_std()?),
        };
        Ok((self.record, [client, worker]))
    }

    /// The parked connection `record` describes, with its sockets `client` and `worker`, non-blocking as
    /// [`Parked::into_parts`] gives them (the mode is the socket's own, and an exec keeps it); `inheritable`
    /// if the sockets were handed over so (a watched connection's), which they are no longer then. Must run
    /// inside the runtime.
    pub fn from_parts(record: ParkedRecord, [client, worker]: [OwnedFd; 2], inheritable: bool) -> io::Result<Parked> {
        if inheritable {
            for fd in [&client, &worker] {
                crate::reexec::set_inheritable(fd.as_raw_fd(), false)?;
            }
        }
        let client = std::net::TcpStream::from(client);
        let worker = match record.backend {
            Backend::Tcp => WorkerStream::Tcp(TcpStream::from_std(std::net::TcpStream::from(worker))?),
            Backend::Unix => WorkerStream::Unix(UnixStream::from_std(std::os::unix::net::UnixStream::from(worker))?),
        };
        Ok(Parked {
            record,
            client: TcpStream::from_std(client)?,
            worker,
            from_pipes: 0,
            watched: false,
            joined: 0,
            inheritable: false,
        })
    }

    /// The client's address, as the client sees its own end.
    pub fn client_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.client.peer_addr()
    }

    /// The connection, running again: its timers move on by the time it spent parked, so each keeps the
    /// time it had left (the pause was baton's, not silence of the peers). It is still in the watch it
    /// joined, if any: if that watch has ended, it leaves it as it relays again ([`Connection::leave`]).
    pub(crate) fn resume(self) -> Connection {
        let Parked {
            record,
            client,
            worker,
            joined,
            inheritable,
            ..
        } = self;
        let parked_for = Time::now().since(record.parked_at);
        let activity = Activity::since((record.last_moved + parked_for).instant());
        activity.answered.store(record.answered_since_sent, Ordering::Relaxed);
        activity.kept.store(record.kept, Ordering::Relaxed);
        activity.worker_ended.store(record.worker_ended, Ordering::Relaxed);
        Connection {
            client,
            worker,
            state: State {
                accepted: record.accepted,
                to_worker: Flow::resume(record.to_worker),
                to_client: Flow::resume(record.to_client),
                worker_shut: record.worker_shut,
                client_shut: record.client_shut,
                held_until: record.held_until.map(|until| until + parked_for),
                tail: record.tail,
                activity,
                joined,
                watched: inheritable,
                client_addr: record.client,
                proxy_header: record.proxy_header,
                client_sent: record.client_sent,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_holds_what_was_sent_since_the_last_answer() {
        let mut tail = Tail::new(true);
        assert!(tail.record(b"GET /a", false));
        assert!(tail.record(b" HTTP/1.1", false));
        assert_eq!(tail.bytes(), b"GET /a HTTP/1.1");
        // The worker answered: what came before is answered, the new chunk starts the tail.
        assert!(tail.record(b"GET /b", true));
        assert_eq!(tail.bytes(), b"GET /b");
    }

    #[test]
    fn a_tail_over_the_limit_keeps_nothing_until_the_next_answer() {
        let mut tail = Tail::new(true);
        assert!(tail.record(&vec![1; RESEND_LIMIT], false));
        assert!(!tail.record(b"x", false), "one byte over the limit");
        assert!(tail.bytes().is_empty());
        assert!(!tail.record(b"more", false), "still over until an answer");
        assert!(tail.record(b"next", true));
        assert_eq!(tail.bytes(), b"next");
    }

    #[test]
    fn an_answered_upload_gives_its_memory_back() {
        let mut tail = Tail::new(true);
        tail.record(&vec![1; 32 * 1024], false);
        tail.record(b"small", true);
        let Tail::Kept(bytes) = &tail else {
            panic!("kept: {tail:?}")
        };
        assert!(bytes.capacity() < 32 * 1024, "capacity {}", bytes.capacity());
    }

    #[test]
    fn spliced_bytes_make_the_tail_unresendable_until_the_next_answer() {
        let mut tail = Tail::new(true);
        tail.record(b"GET /", false);
        assert!(!tail.lose());
        assert!(!tail.record(b"more", false));
        assert!(tail.bytes().is_empty());
        assert!(tail.record(b"GET /b", true));
    }

    #[test]
    fn a_disabled_tail_keeps_nothing() {
        let mut tail = Tail::new(false);
        assert!(!tail.record(b"GET / HTTP/1.1", false));
        assert!(tail.bytes().is_empty());
    }

    #[test]
    fn a_record_round_trips_through_json() {
        let record = ParkedRecord {
            generation: 7,
            backend: Backend::Unix,
            answered: true,
            accepted: Time::from_origin(Duration::from_millis(1_000)),
            parked_at: Time::from_origin(Duration::from_millis(5_000)),
            last_moved: Time::from_origin(Duration::from_millis(4_990)),
            held_until: Some(Time::from_origin(Duration::from_millis(5_010))),
            to_worker: FlowRecord {
                pending: b"GET /next HTTP/1.1\r\n".to_vec(),
                size: FIRST_BUFFER_SIZE,
                ended: false,
            },
            to_client: FlowRecord {
                pending: (0..=255).collect(),
                size: BUFFER_SIZE,
                ended: true,
            },
            worker_shut: false,
            client_shut: false,
            tail: Tail::Kept(b"GET /next".to_vec()),
            answered_since_sent: false,
            kept: true,
            worker_ended: true,
            client: Some("192.0.2.7:40000".parse().expect("address")),
            proxy_header: Some(b"PROXY TCP4 192.0.2.7 192.0.2.1 40000 80\r\n".to_vec()),
            client_sent: true,
        };
        let text = serde_json::to_string(&record).expect("serialise");
        let back: ParkedRecord = serde_json::from_str(&text).expect("deserialise");
        assert_eq!(back, record);
        let unknown = text.replacen("{", "{\"surprise\":1,", 1);
        assert!(
            serde_json::from_str::<ParkedRecord>(&unknown).is_err(),
            "unknown fields are refused"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn resuming_gives_each_timer_the_time_it_had_left() {
        let (client, _peer) = socket_pair().await;
        let (worker, _worker_peer) = socket_pair().await;
        let mut connection = Connection::new(client, WorkerStream::Tcp(worker), Time::now(), true);
        connection.state.held_until = Some(Time::now() + Duration::from_millis(20));
        tokio::time::advance(Duration::from_millis(5)).await;
        let parked = connection.park(1, true, 0, false);
        let last_moved = Time::now().since(parked.record.last_moved);
        assert_eq!(last_moved, Duration::from_millis(5));
        tokio::time::advance(Duration::from_secs(60)).await;
        let resumed = parked.resume();
        let silent = Instant::now() - resumed.state.activity.last_moved();
        assert_eq!(
            silent,
            Duration::from_millis(5),
            "a minute parked is not a minute of silence"
        );
        let held = Time::now().until(resumed.state.held_until.expect("held"));
        assert_eq!(held, Duration::from_millis(15));
    }

    async fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.expect("connect"), accepted.expect("accept").0)
    }
}
