//! One proxied connection: pick the route, dial the worker, copy both ways, pass half-closes and resets on.
//!
//! A connection loads its service's route once and stays with the worker it dialled until it ends or that
//! worker's drain deadline cuts it. This module never looks at configuration or processes; failures are
//! logged at debug and counted in metrics, never raised.

use std::future::Future;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use nix::unistd::pipe2;
use prometheus::IntCounter;
use socket2::{Domain, Protocol, SockRef, Type};
use tokio::io::{AsyncRead, Interest, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;

use crate::metrics::Side;
use crate::route::{Guard, Route, WorkerAddr};

/// Bytes read from one side before they are written to the other.
pub const BUFFER_SIZE: usize = 64 * 1024;

/// The buffer a direction starts with; it grows to [`BUFFER_SIZE`] once a read fills it. Most exchanges
/// (and every close) fit, so a burst of short connections never allocates the large buffers.
pub const FIRST_BUFFER_SIZE: usize = 4 * 1024;

/// The pipe size asked for when splicing.
const PIPE_SIZE: i32 = 1 << 20;

/// The most unanswered bytes a connection keeps to resend (see [`Tail`]).
pub const RESEND_LIMIT: usize = 64 * 1024;

/// How long the FIN of a draining worker waits for a request from the client already on its way.
pub const END_HOLD: Duration = Duration::from_millis(25);

/// The longest pause between two dials of a worker that refused a connection, while the connection may
/// still wait for the route to change.
pub const REDIAL_PAUSE: Duration = Duration::from_millis(100);

/// How a proxied connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions reached end of stream.
    Completed,
    /// The service was at `max_connections`.
    OverLimit,
    /// No worker could take the connection and the service is not expecting one.
    NoWorker,
    /// No worker became ready within `pending_timeout`.
    PendingTimeout,
    /// Dialling the worker kept failing until `pending_timeout`.
    ConnectFailed,
    /// One side failed (reset, broken pipe); the other was reset too.
    Broken(Side),
    /// Nothing moved either way for `idle_timeout`.
    IdleTimeout,
    /// After one direction closed, nothing moved for `half_close_timeout`.
    HalfCloseTimeout,
    /// The worker's drain deadline passed.
    Cut,
}

/// A dialled worker connection.
enum WorkerStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Serves one accepted client connection of the service whose route is `route`. The client socket has
/// TCP_NODELAY already, from the listening socket.
pub async fn serve(mut client: TcpStream, route: &ArcSwap<Route>) -> Outcome {
    let accepted = Instant::now();
    let first = route.load_full();
    let shared = &first.shared;
    let metrics = &shared.metrics;
    metrics.accepted.inc();
    let Some(_admission) = shared.admit(first.settings.max_connections) else {
        metrics.rejected_max_connections.inc();
        reset(&client);
        return Outcome::OverLimit;
    };
    let deadline = accepted + first.settings.pending_timeout;
    let (mut snapshot, mut guard, mut worker) = match connect(route, &first, deadline).await {
        Ok(connected) => connected,
        Err(outcome) => {
            reset(&client);
            return outcome;
        }
    };
    let mut tail = Tail::new(first.settings.resend_unanswered);
    let outcome = loop {
        let relayed = match &mut worker {
            WorkerStream::Tcp(worker) => relay(&mut client, worker, &snapshot, &guard, &mut tail).await,
            WorkerStream::Unix(worker) => relay(&mut client, worker, &snapshot, &guard, &mut tail).await,
        };
        if let Relayed::Ended(outcome) = relayed {
            break outcome;
        }
        // The worker closed without reading what it was last sent, after it had answered what came before:
        // the current worker gets those bytes on a new connection, and the client never sees the close.
        let gone = guard.upstream().generation;
        (snapshot, guard, worker) =
            match connect(route, &snapshot, Instant::now() + snapshot.settings.pending_timeout).await {
                Ok(connected) => connected,
                Err(outcome) => {
                    metrics.worker_resets.inc();
                    reset(&client);
                    break outcome;
                }
            };
        tracing::debug!(
            from = gone,
            to = guard.upstream().generation,
            bytes = tail.bytes().len(),
            "worker closed on unread bytes: resending them"
        );
        metrics.resent.inc();
        let sent = match &worker {
            WorkerStream::Tcp(worker) => write_all(worker, tail.bytes()).await,
            WorkerStream::Unix(worker) => write_all(worker, tail.bytes()).await,
        };
        if let Err(error) = sent {
            tracing::debug!(%error, "connection broken while resending");
            metrics.worker_resets.inc();
            reset(&client);
            break Outcome::Broken(Side::Worker);
        }
    };
    metrics.connection_duration.observe(accepted.elapsed().as_secs_f64());
    outcome
}

/// Finds a worker and dials it. While the service has no ready worker, or its worker refuses (it may have
/// just died), the connection waits for the route to change, up to `deadline`: nothing has been sent yet, so
/// trying again is safe. Only a connection that waits registers for the route's change.
async fn connect(
    route: &ArcSwap<Route>,
    first: &Route,
    deadline: Instant,
) -> Result<(Arc<Route>, Guard, WorkerStream), Outcome> {
    let shared = &first.shared;
    let metrics = &shared.metrics;
    let mut pending = None;
    let mut outcome = Outcome::PendingTimeout;
    loop {
        let (snapshot, guard) = Route::pick(route);
        // A first dial has its whole connect_timeout; a redial must end by the deadline.
        let mut connect_timeout = snapshot.settings.connect_timeout;
        if outcome == Outcome::ConnectFailed {
            connect_timeout = connect_timeout.min(deadline.saturating_duration_since(Instant::now()));
        }
        let wait_until = match guard {
            Some(guard) => match dial(
                &guard.upstream().addr,
                connect_timeout,
                &metrics.worker_connect_duration,
            )
            .await
            {
                Ok(worker) => return Ok((snapshot, guard, worker)),
                Err(error) => {
                    let upstream = guard.upstream();
                    tracing::debug!(generation = upstream.generation, worker = %upstream.addr, %error, "cannot dial worker");
                    metrics.worker_connect_errors.inc();
                    outcome = Outcome::ConnectFailed;
                    deadline.min(Instant::now() + REDIAL_PAUSE)
                }
            },
            None if !snapshot.hold => {
                metrics.rejected_no_worker.inc();
                return Err(Outcome::NoWorker);
            }
            None => deadline,
        };
        if Instant::now() >= deadline {
            if outcome == Outcome::PendingTimeout {
                metrics.rejected_pending_timeout.inc();
            }
            return Err(outcome);
        }
        pending.get_or_insert_with(|| Pending::new(&metrics.pending));
        let changed = shared.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        // A route stored between the pick and the registration woke nobody: look again at once. (The service
        // stores a route before it notifies, and `snapshot` is held, so its address is not reused.)
        if !Arc::ptr_eq(&route.load(), &snapshot) {
            continue;
        }
        let _ = tokio::time::timeout_at(wait_until, changed).await;
    }
}

/// Counts a connection in the pending gauge while it waits for a worker.
struct Pending<'a>(&'a prometheus::IntGauge);

impl<'a> Pending<'a> {
    fn new(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        Pending(gauge)
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn dial(addr: &WorkerAddr, timeout: Duration, took: &prometheus::Histogram) -> io::Result<WorkerStream> {
    let started = Instant::now();
    let connect = async {
        match addr {
            WorkerAddr::Tcp(addr) => Ok(WorkerStream::Tcp(connect_tcp(*addr).await?)),
            WorkerAddr::Unix(path) => Ok(WorkerStream::Unix(UnixStream::connect(path).await?)),
        }
    };
    let result = tokio::time::timeout(timeout, connect)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()));
    if result.is_ok() {
        took.observe(started.elapsed().as_secs_f64());
    }
    result
}

/// Dials `addr` with TCP_NODELAY. A connection refused or reset shows in the readiness that ends the
/// handshake, so SO_ERROR is read only then.
async fn connect_tcp(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_nodelay(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(nix::libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(socket.into())?;
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if ready.is_error() || ready.is_write_closed() {
        return Err(stream
            .take_error()?
            .unwrap_or_else(|| io::ErrorKind::ConnectionReset.into()));
    }
    Ok(stream)
}

/// How a relay between a client and one worker connection ended.
enum Relayed {
    /// The connection is over.
    Ended(Outcome),
    /// The worker closed without reading the connection's unanswered bytes (see [`Tail`]); the client is
    /// untouched and the bytes can go to another worker.
    Resend,
}

async fn relay<W: Socket>(
    client: &mut TcpStream,
    worker: &mut W,
    route: &Route,
    guard: &Guard,
    tail: &mut Tail,
) -> Relayed {
    let metrics = &route.shared.metrics;
    let settings = &route.settings;
    let activity = Activity::new();
    // Borrowed halves: their reads know that a short read drained the socket, so the next read waits for
    // readiness instead of probing with a system call that would only say EWOULDBLOCK.
    let (client_read, client_write) = client.halves();
    let (worker_read, worker_write) = worker.halves();
    let (client, worker): (&TcpStream, &W) = (client_write.as_ref(), worker_write.as_ref());
    let to_worker = copy(
        (client_read, Side::Client),
        (worker, Side::Worker),
        &metrics.bytes_to_worker,
        &activity,
        |chunk| {
            let answered = activity.take_answered();
            let kept = match chunk {
                Some(chunk) => tail.record(chunk, answered),
                None => tail.lose(),
            };
            activity.sent(kept);
            !activity.worker_ended()
        },
    );
    let mut first_answer = Some(guard);
    let to_client = copy(
        (worker_read, Side::Worker),
        (client, Side::Client),
        &metrics.bytes_to_client,
        &activity,
        |_| {
            activity.answered();
            // The worker's first byte shows that it has accepted the connection.
            if let Some(guard) = first_answer.take() {
                guard.answered();
            }
            true
        },
    );
    // Whether the worker's end can be hidden from the client: it had answered this connection before, has
    // not answered the bytes it was sent since, and they are kept.
    let resendable = || activity.resendable() && guard.is_answered();
    // A draining worker that closes a connection it has answered was most likely told to stop, and the
    // client may be sending its next request already: the FIN waits a moment (END_HOLD), and a request that
    // comes meanwhile goes to the current worker instead of crossing the FIN. A client reading to the end
    // of the stream sees it that much later, during drains only. A drain cut does not reset such a
    // connection: its worker has ended cleanly already.
    let hold_end = || settings.resend_unanswered && guard.is_answered() && guard.upstream().is_draining();
    let mut held_until: Option<Instant> = None;
    // Registered once, and polled without a lock.
    let cut = guard.upstream().cut();
    tokio::pin!(to_worker, to_client, cut);
    let (mut to_worker_done, mut to_client_done) = (false, false);
    let failure = loop {
        let half_closed = to_worker_done || to_client_done;
        let silence = match (half_closed, settings.idle_timeout.is_zero()) {
            (false, _) => settings.idle_timeout,
            (true, true) => settings.half_close_timeout,
            (true, false) => settings.idle_timeout.min(settings.half_close_timeout),
        };
        tokio::select! {
            // The client first: bytes it sent as the worker closed reach the worker (and its refusal) before
            // the worker's end is looked at.
            biased;
            // The first end is passed on with a FIN; after the second, dropping the sockets closes both.
            result = &mut to_worker, if !to_worker_done => match result {
                Ok(_) if to_client_done => return Relayed::Ended(Outcome::Completed),
                Ok(_) => {
                    half_close(worker);
                    to_worker_done = true;
                }
                Err(failure) => break failure,
            },
            result = &mut to_client, if !to_client_done => match result {
                // A FIN, but the bytes sent after it were refused: the worker closed without reading them.
                Ok(_) if resendable() && matches!(SockRef::from(worker).take_error(), Ok(Some(_))) => {
                    return Relayed::Resend;
                }
                Ok(_) if to_worker_done => return Relayed::Ended(Outcome::Completed),
                Ok(_) if hold_end() => {
                    activity.end_worker();
                    held_until = Some(Instant::now() + END_HOLD);
                    to_client_done = true;
                }
                Ok(_) => {
                    half_close(client);
                    to_client_done = true;
                }
                Err(failure) => break failure,
            },
            () = tokio::time::sleep_until(held_until.unwrap_or_else(Instant::now)), if held_until.is_some() => {
                // The client sent nothing: it learns of the worker's end.
                half_close(client);
                held_until = None;
            }
            () = activity.silent_for(silence), if !silence.is_zero() => {
                if half_closed {
                    // The side still open has gone silent.
                    let side = if to_worker_done { Side::Worker } else { Side::Client };
                    metrics.error(side, "half_close_timeout");
                    return Relayed::Ended(Outcome::HalfCloseTimeout);
                }
                metrics.error(Side::Client, "idle_timeout");
                return Relayed::Ended(Outcome::IdleTimeout);
            }
            () = &mut cut, if held_until.is_none() => {
                // A reset, not a FIN, so that neither side takes the cut for a complete stream.
                metrics.drain_cut.inc();
                reset(client);
                reset(worker);
                return Relayed::Ended(Outcome::Cut);
            }
        }
    };
    let Failure { side, error } = failure;
    // A reset or broken pipe from the worker: it closed with bytes unread, or before they came.
    if side == Side::Worker && (!to_client_done || held_until.is_some()) && resendable() {
        return Relayed::Resend;
    }
    tracing::debug!(side = side.label(), %error, "connection broken");
    match side {
        Side::Client => {
            metrics.client_resets.inc();
            reset(worker);
        }
        Side::Worker => {
            metrics.worker_resets.inc();
            reset(client);
        }
    }
    Relayed::Ended(Outcome::Broken(side))
}

/// The bytes a connection sent its worker since the worker last sent any: the part of the stream the worker
/// has not answered. Should the worker close without reading them, they can go to another worker. A
/// connection that sends more than [`RESEND_LIMIT`] without an answer keeps nothing until the next answer.
#[derive(Debug)]
enum Tail {
    /// `resend_unanswered` is off.
    Off,
    Kept(Vec<u8>),
    Overflowed,
}

impl Tail {
    fn new(enabled: bool) -> Tail {
        if enabled { Tail::Kept(Vec::new()) } else { Tail::Off }
    }

    /// Notes `chunk`, about to go to the worker; `answered` says whether the worker has sent anything since
    /// the previous chunk. Returns whether the unanswered bytes are all kept.
    fn record(&mut self, chunk: &[u8], answered: bool) -> bool {
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
    fn lose(&mut self) -> bool {
        if !matches!(self, Tail::Off) {
            *self = Tail::Overflowed;
        }
        false
    }

    /// The unanswered bytes.
    fn bytes(&self) -> &[u8] {
        match self {
            Tail::Kept(bytes) => bytes,
            Tail::Off | Tail::Overflowed => &[],
        }
    }
}

/// What both directions of a connection note for each other: when a byte last moved (for the idle and
/// half-close timeouts) and where the exchange stands (for resending). They run on the same task, so the
/// atomics are never contended; relaxed loads and stores are plain moves.
struct Activity {
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
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
            answered: AtomicBool::new(false),
            kept: AtomicBool::new(false),
            worker_ended: AtomicBool::new(false),
        }
    }

    /// The worker sent bytes.
    fn answered(&self) {
        self.answered.store(true, Ordering::Relaxed);
    }

    /// Whether the worker sent bytes since the last call.
    fn take_answered(&self) -> bool {
        let answered = self.answered.load(Ordering::Relaxed);
        if answered {
            self.answered.store(false, Ordering::Relaxed);
        }
        answered
    }

    /// The client sent a chunk; `kept` says whether the tail holds every unanswered byte.
    fn sent(&self, kept: bool) {
        self.kept.store(kept, Ordering::Relaxed);
    }

    /// The worker closed its side, and the client is not told yet.
    fn end_worker(&self) {
        self.worker_ended.store(true, Ordering::Relaxed);
    }

    /// Whether the worker's end is being held back.
    fn worker_ended(&self) -> bool {
        self.worker_ended.load(Ordering::Relaxed)
    }

    /// Whether there are unanswered bytes and the tail holds them all.
    fn resendable(&self) -> bool {
        self.kept.load(Ordering::Relaxed) && !self.answered.load(Ordering::Relaxed)
    }

    fn touch(&self) {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `limit`. One timer, re-armed only when it fires early.
    async fn silent_for(&self, limit: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = last + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A failed copy, tagged with the side whose socket failed.
#[derive(Debug)]
struct Failure {
    side: Side,
    error: io::Error,
}

/// Copies `src` to `dst` until `src` ends; the caller passes the end on. A buffer is held only while data
/// moves: it is allocated when `src` becomes readable and given back once `src` is drained, so an idle
/// connection, fresh or kept alive, holds none. `on_read` sees every chunk before it is written and says
/// whether `dst` still takes it; if not, the copy fails as if `dst` had refused it.
async fn copy<H, R, W>(
    (mut half, src_side): (H, Side),
    (dst, dst_side): (&W, Side),
    counter: &IntCounter,
    activity: &Activity,
    mut on_read: impl FnMut(Option<&[u8]>) -> bool,
) -> Result<(), Failure>
where
    H: AsyncRead + Unpin + AsRef<R>,
    R: Socket,
    W: Socket,
{
    let read_failed = |error| Failure { side: src_side, error };
    let mut size = FIRST_BUFFER_SIZE;
    let mut buffer: Option<Vec<u8>> = None;
    loop {
        let buf = match &mut buffer {
            Some(buf) => buf,
            None => {
                // Waits through the task's budget too: a task that has used it up yields here.
                std::future::poll_fn(|cx| half.as_ref().poll_read_ready(cx))
                    .await
                    .map_err(read_failed)?;
                buffer.insert(Vec::with_capacity(size))
            }
        };
        // One poll of the half's read: a short read tells tokio the socket is drained, so this returns
        // Pending without a system call once there is nothing left. Pending drops the buffer; the wait
        // above then either parks the task or, if the budget ran out, yields it.
        let mut read = ReadBuf::uninit(buf.spare_capacity_mut());
        let polled = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut half).poll_read(cx, &mut read))).await;
        let n = match polled {
            Poll::Pending => {
                buffer = None;
                continue;
            }
            Poll::Ready(Ok(())) => read.filled().len(),
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
            Poll::Ready(Err(e)) => return Err(read_failed(e)),
        };
        activity.touch();
        if n == 0 {
            return Ok(());
        }
        if !on_read(Some(read.filled())) {
            return Err(Failure {
                side: dst_side,
                error: io::ErrorKind::BrokenPipe.into(),
            });
        }
        write_all(dst, read.filled())
            .await
            .map_err(|error| Failure { side: dst_side, error })?;
        counter.inc_by(n as u64);
        if n == size && size < BUFFER_SIZE {
            // A bulk transfer: larger reads, fewer system calls.
            size = BUFFER_SIZE;
            buffer = Some(Vec::with_capacity(size));
        } else if n == BUFFER_SIZE {
            // Still bulk: the kernel moves the data through a pipe, with no copy through this process.
            buffer = None;
            let sides = (src_side, dst_side);
            if splice_bulk(half.as_ref(), dst, sides, counter, activity, &mut on_read).await? == Spliced::End {
                return Ok(());
            }
        } else if n < FIRST_BUFFER_SIZE {
            size = FIRST_BUFFER_SIZE;
        }
    }
}

/// How a spliced stretch of a copy ended.
#[derive(Debug, PartialEq, Eq)]
enum Spliced {
    /// `src` ended.
    End,
    /// A read moved less than a full buffer (or no pipe could be had): back to plain copies.
    Short,
}

/// Moves `src` to `dst` through a pipe with splice(2), so the bytes never cross this process, for as long as
/// each read moves a full [`BUFFER_SIZE`]. The pipe is empty whenever this returns.
async fn splice_bulk<R: Socket, W: Socket>(
    src: &R,
    dst: &W,
    (src_side, dst_side): (Side, Side),
    counter: &IntCounter,
    activity: &Activity,
    on_read: &mut impl FnMut(Option<&[u8]>) -> bool,
) -> Result<Spliced, Failure> {
    let Ok((pipe_out, pipe_in)) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC) else {
        // Out of descriptors, say: plain copies still work.
        return Ok(Spliced::Short);
    };
    // A larger pipe moves more per call; the kernel may refuse, and the default (64 KiB) does too.
    let capacity = fcntl(pipe_in.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(PIPE_SIZE))
        .ok()
        .and_then(|size| usize::try_from(size).ok())
        .unwrap_or(BUFFER_SIZE);
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let read_failed = |error| Failure { side: src_side, error };
    loop {
        std::future::poll_fn(|cx| src.poll_read_ready(cx))
            .await
            .map_err(read_failed)?;
        // The pipe is empty here, so EAGAIN can only mean that `src` is drained; try_io then clears readiness.
        let n = match src.try_io(Interest::READABLE, || {
            splice(src, None, &pipe_in, None, capacity, flags).map_err(io::Error::from)
        }) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => continue,
            Err(e) => return Err(read_failed(e)),
        };
        activity.touch();
        if n == 0 {
            return Ok(Spliced::End);
        }
        let write_failed = |error| Failure { side: dst_side, error };
        if !on_read(None) {
            return Err(write_failed(io::ErrorKind::BrokenPipe.into()));
        }
        let mut left = n;
        while left > 0 {
            match dst.try_io(Interest::WRITABLE, || {
                splice(&pipe_out, None, dst, None, left, flags).map_err(io::Error::from)
            }) {
                Ok(0) => return Err(write_failed(io::ErrorKind::WriteZero.into())),
                Ok(moved) => left -= moved,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await.map_err(write_failed)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(write_failed(e)),
            }
        }
        counter.inc_by(n as u64);
        if n < BUFFER_SIZE {
            return Ok(Spliced::Short);
        }
    }
}

async fn write_all<W: Socket>(dst: &W, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match dst.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Shuts down writing on `socket`: its peer reads the end of the stream. A peer that is gone already does not
/// need the FIN.
fn half_close(socket: &impl AsFd) {
    let _ = SockRef::from(socket).shutdown(Shutdown::Write);
}

/// Closes `socket` with a reset when it is dropped, so its peer learns that the other side failed.
fn reset(socket: &impl AsFd) {
    let _ = SockRef::from(socket).set_linger(Some(Duration::ZERO));
}

/// The non-blocking socket operations the copy loop needs, for both TCP and Unix sockets.
trait Socket: AsFd + Sync {
    /// The borrowed read half.
    type Read<'a>: AsyncRead + Unpin + Send + AsRef<Self>
    where
        Self: 'a;
    /// The borrowed write half.
    type Write<'a>: AsRef<Self> + Send
    where
        Self: 'a;
    /// Splits the socket into halves usable at once on one task.
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>);
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn try_io<T>(&self, interest: Interest, f: impl FnOnce() -> io::Result<T>) -> io::Result<T>;
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send;
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
}

macro_rules! socket {
    ($type:ty, $module:ident) => {
        impl Socket for $type {
            type Read<'a> = tokio::net::$module::ReadHalf<'a>;
            type Write<'a> = tokio::net::$module::WriteHalf<'a>;
            fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
                self.split()
            }
            fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$type>::poll_read_ready(self, cx)
            }
            fn try_io<T>(&self, interest: Interest, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
                <$type>::try_io(self, interest, f)
            }
            fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
                <$type>::writable(self)
            }
            fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
                <$type>::try_write(self, buf)
            }
        }
    };
}

socket!(TcpStream, tcp);
socket!(UnixStream, unix);

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
}
