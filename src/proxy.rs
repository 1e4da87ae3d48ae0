//! One proxied connection: pick the route, dial the worker, copy both ways, pass half-closes and resets on,
//! park when asked and resume.
//!
//! A connection loads its service's route once and stays with the worker it dialled until it ends or that
//! worker's drain deadline cuts it (a resend, below, is the one exception). Everything the copy loop must
//! not lose lives in the connection's struct ([`crate::connection`]), never in a local across an await, so
//! the loop can stop at any await point when its service asks its connections to park. This module never
//! looks at configuration or processes; failures are logged at debug and counted in metrics, never raised.

use std::future::Future;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use nix::unistd::pipe2;
use prometheus::IntCounter;
use socket2::{Domain, Protocol, SockRef, Type};
use tokio::io::{AsyncRead, AsyncReadExt, Interest};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;

use crate::clock::Time;
use crate::connection::{Activity, Connection, Flow, Pipe, State, WorkerStream};
pub use crate::connection::{BUFFER_SIZE, FIRST_BUFFER_SIZE, RESEND_LIMIT};
use crate::metrics::Side;
use crate::proxy_protocol::{self, Rejected};
use crate::route::{Admission, ClientSlot, Guard, ParkedConnection, Route, Shared, WorkerAddr};

/// The pipe size asked for when splicing.
const PIPE_SIZE: i32 = 1 << 20;

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
    /// The service asked its connections to park: this one waits in its [`crate::route::Parking`] to be
    /// resumed ([`resume`]) or handed over.
    Parked,
    /// Parking failed (a splice pipe could not be read back); both sides were reset.
    ParkFailed,
    /// A trusted source sent no valid PROXY protocol header in time; the connection was closed.
    ProxyHeaderRefused,
    /// `max_connections_per_client` connections were open from the client already.
    PerClientLimit,
}

/// Serves one accepted client connection of the service whose route is `route`, from `peer`. The client
/// socket has TCP_NODELAY already, from the listening socket.
pub async fn serve(client: TcpStream, peer: SocketAddr, route: &ArcSwap<Route>) -> Outcome {
    let now = Instant::now();
    let first = route.load_full();
    let shared = &first.shared;
    let metrics = &shared.metrics;
    metrics.accepted.inc();
    let admitted = shared.admit(first.settings.max_connections);
    shared.started();
    let Some(admission) = admitted else {
        metrics.rejected_max_connections.inc();
        reset(&client);
        return Outcome::OverLimit;
    };
    let settings = &first.settings;
    // Who the client is: the peer, or the client a trusted source's PROXY protocol header names.
    let mut origin = Origin {
        client: peer,
        server: None,
        tlvs: Vec::new(),
    };
    if settings.trusts(peer.ip()) {
        let read = tokio::time::timeout(settings.proxy_protocol_timeout, proxy_protocol::read(&client));
        match read.await.unwrap_or(Err(Rejected::Timeout)) {
            Ok(received) => {
                metrics.proxy_headers[usize::from(received.version == proxy_protocol::Version::V2)].inc();
                if let Some((client, server)) = received.addresses {
                    (origin.client, origin.server) = (client, Some(server));
                }
                origin.tlvs = received.tlvs;
            }
            Err(rejected) => {
                tracing::debug!(%peer, reason = rejected.label(), error = %rejected, "PROXY protocol header refused: closing");
                let reason = Rejected::LABELS.iter().position(|label| *label == rejected.label());
                if let Some(counter) = reason.and_then(|i| metrics.proxy_rejected.get(i)) {
                    counter.inc();
                }
                metrics.rejected_proxy_header.inc();
                return Outcome::ProxyHeaderRefused;
            }
        }
    }
    let client_slot = match settings.max_connections_per_client {
        0 => None,
        max => match first.shared.client_slot(origin.client.ip(), max, false) {
            Some(slot) => Some(slot),
            None => {
                metrics.rejected_per_client.inc();
                tracing::debug!(client = %origin.client, max, "too many connections from one client: closing");
                reset(&client);
                return Outcome::PerClientLimit;
            }
        },
    };
    let deadline = now + settings.pending_timeout;
    let (snapshot, mut guard, worker) = match connect(route, &first, Some(origin.client.ip()), deadline).await {
        Ok(connected) => connected,
        Err(outcome) => {
            reset(&client);
            return outcome;
        }
    };
    let resend = snapshot.settings.resend_unanswered;
    let header = snapshot.settings.proxy_protocol.map(|version| {
        // Baton's own address as the client reached it, unless a trusted header said otherwise.
        let server = origin.server.or_else(|| client.local_addr().ok());
        proxy_protocol::encode(version, server.map(|server| (origin.client, server)), &origin.tlvs)
    });
    let coalesce = header.is_some();
    let mut connection = Connection::new(client, worker, Time::of(now), resend);
    connection.state.introduce(origin.client, header);
    if coalesce {
        connection.coalesce();
    }
    match run(&mut connection, route, shared, snapshot, &mut guard).await {
        Ran::Ended(outcome) => outcome,
        Ran::Park => park(connection, guard, client_slot, shared, admission, false),
        Ran::Rest => park(connection, guard, client_slot, shared, admission, true),
    }
}

/// Who a connection comes from, and to which address.
struct Origin {
    /// The client.
    client: SocketAddr,
    /// Baton's address as the client reached it, when a trusted header said so.
    server: Option<SocketAddr>,
    /// The TLVs of a trusted v2 header, passed on in the one sent to the worker.
    tlvs: Vec<u8>,
}

/// Serves a parked connection again, from where it stopped: the bytes it had read and not written go
/// first, ends it had passed on are not passed on again, and its timers have the time they had left.
pub async fn resume(parked: ParkedConnection, route: &ArcSwap<Route>) -> Outcome {
    resume_counted(parked, route, false).await
}

/// Serves again a connection that rested in its service's watch and has bytes or an end waiting, which
/// the service took back and counted as starting ([`Shared::accepted`]): it counts as open before it stops
/// counting as starting, so that a freeze that comes meanwhile waits for it to park again.
pub async fn wake(parked: ParkedConnection, route: &ArcSwap<Route>) -> Outcome {
    resume_counted(parked, route, true).await
}

async fn resume_counted(parked: ParkedConnection, route: &ArcSwap<Route>, starting: bool) -> Outcome {
    let first = route.load_full();
    let shared = &first.shared;
    let admission = shared.readmit();
    if starting {
        shared.started();
    }
    let ParkedConnection {
        connection,
        mut guard,
        client,
    } = parked;
    let mut connection = connection.resume();
    match run(&mut connection, route, shared, Arc::clone(&first), &mut guard).await {
        Ran::Ended(outcome) => outcome,
        Ran::Park => park(connection, guard, client, shared, admission, false),
        Ran::Rest => park(connection, guard, client, shared, admission, true),
    }
}

/// How [`run`] stopped.
enum Ran {
    /// The connection is over.
    Ended(Outcome),
    /// The service asked its connections to park: the caller parks the connection with its guard.
    Park,
    /// The connection joined its service's watch with nothing to move: the caller parks it there to rest
    /// until the watch reports its next byte or end, or the service freezes.
    Rest,
}

/// Relays `connection` until it ends or parks, resending its unanswered bytes when its worker closes on
/// them (`guard` then becomes the new worker's).
///
/// The connection and its guard stay in the caller's future and are only borrowed here: an async fn keeps
/// the arguments it owns twice over (as arguments and as locals), and this future lives as long as the
/// connection, so owning them here would cost an idle connection a second copy of its whole state.
async fn run(
    connection: &mut Connection,
    route: &ArcSwap<Route>,
    shared: &Shared,
    mut snapshot: Arc<Route>,
    guard: &mut Guard,
) -> Ran {
    let metrics = &shared.metrics;
    let outcome = loop {
        let Connection { client, worker, state } = &mut *connection;
        let relayed = match worker {
            WorkerStream::Tcp(worker) => relay(client, worker, state, &snapshot, guard).await,
            WorkerStream::Unix(worker) => relay(client, worker, state, &snapshot, guard).await,
        };
        match relayed {
            Relayed::Ended(outcome) => break outcome,
            Relayed::Park if shared.parking.is_requested() => return Ran::Park,
            // Asked to join a watch, or to leave the one it joined: it does, and rests there if it has
            // nothing to move; otherwise it relays on.
            Relayed::Park => {
                match shared.parking.current_watch() {
                    Some(watch) => match connection.join(&watch) {
                        Ok(()) if connection.is_quiet() => return Ran::Rest,
                        Ok(()) => {}
                        Err(error) => {
                            tracing::debug!(%error, "cannot watch a connection: it resumes with the active ones");
                        }
                    },
                    None => connection.leave(),
                }
                continue;
            }
            Relayed::Resend => {}
        }
        // The worker closed without reading what it was last sent, after it had answered what came before:
        // the current worker gets those bytes on a new connection, and the client never sees the close.
        let gone = guard.upstream().generation;
        let deadline = Instant::now() + snapshot.settings.pending_timeout;
        let client = connection.state.client_addr.map(|a| a.ip());
        let (next, next_guard, worker) = match connect(route, &snapshot, client, deadline).await {
            Ok(connected) => connected,
            Err(outcome) => {
                metrics.worker_resets.inc();
                reset(&connection.client);
                break outcome;
            }
        };
        (snapshot, *guard) = (next, next_guard);
        tracing::debug!(
            from = gone,
            to = guard.upstream().generation,
            bytes = connection.state.tail.bytes().len(),
            "worker closed on unread bytes: resending them"
        );
        metrics.resent.inc();
        connection.worker = worker;
        connection.state.resend();
    };
    let accepted = connection.state.accepted;
    metrics
        .connection_duration
        .observe(Time::now().since(accepted).as_secs_f64());
    // Counted against the worker for a canary's judgement: it broke the connection, or ended it without
    // answering what the client sent (a client that sent nothing, a load balancer's connect check, is not
    // the worker's failure).
    let unanswered = matches!(outcome, Outcome::Completed | Outcome::HalfCloseTimeout)
        && !guard.is_answered()
        && connection.state.client_sent;
    if matches!(outcome, Outcome::Broken(Side::Worker)) || unanswered {
        guard.fail();
    }
    Ran::Ended(outcome)
}

/// Parks `connection` in its service's [`crate::route::Parking`], with its guard, to rest in the watch it
/// has just joined if `rests`; the admission is given back only then, so that a service that counts no
/// open connection has every parked one kept.
fn park(
    mut connection: Connection,
    guard: Guard,
    client: Option<ClientSlot>,
    shared: &Shared,
    admission: Admission<'_>,
    rests: bool,
) -> Outcome {
    let from_pipes = match connection.empty_pipes() {
        Ok(moved) => moved,
        Err(error) => {
            tracing::debug!(%error, "cannot read a splice pipe back: resetting the connection");
            reset(&connection.client);
            match &connection.worker {
                WorkerStream::Tcp(worker) => reset(worker),
                WorkerStream::Unix(worker) => reset(worker),
            }
            return Outcome::ParkFailed;
        }
    };
    let upstream = guard.upstream();
    let parked = connection.park(upstream.generation, guard.is_answered(), from_pipes, rests);
    tracing::debug!(generation = upstream.generation, from_pipes, rests, "connection parked");
    shared.parking.keep(ParkedConnection {
        connection: parked,
        guard,
        client,
    });
    drop(admission);
    Outcome::Parked
}

/// Finds a worker and dials it. While the service has no ready worker, or its worker refuses (it may have
/// just died), the connection waits for the route to change, up to `deadline`: nothing has been sent yet, so
/// trying again is safe. Only a connection that waits registers for the route's change.
async fn connect(
    route: &ArcSwap<Route>,
    first: &Route,
    client: Option<std::net::IpAddr>,
    deadline: Instant,
) -> Result<(Arc<Route>, Guard, WorkerStream), Outcome> {
    let shared = &first.shared;
    let metrics = &shared.metrics;
    let mut pending = None;
    let mut outcome = Outcome::PendingTimeout;
    loop {
        let (snapshot, guard) = Route::pick(route, client);
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
                    guard.fail();
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
    /// The worker closed without reading the connection's unanswered bytes (see [`crate::connection::Tail`]);
    /// the client is untouched and the bytes can go to another worker.
    Resend,
    /// The service asked its connections to park, or to join a watch: everything is in the connection's
    /// state.
    Park,
}

async fn relay<W: Socket>(
    client: &mut TcpStream,
    worker: &mut W,
    state: &mut State,
    route: &Route,
    guard: &Guard,
) -> Relayed {
    let metrics = &route.shared.metrics;
    let settings = &route.settings;
    let State {
        to_worker: up,
        to_client: down,
        worker_shut,
        client_shut,
        held_until,
        tail,
        activity,
        joined,
        client_sent,
        ..
    } = state;
    let activity = &*activity;
    // Borrowed halves: their reads know that a short read drained the socket, so the next read waits for
    // readiness instead of probing with a system call that would only say EWOULDBLOCK.
    let (client_read, client_write) = client.halves();
    let (worker_read, worker_write) = worker.halves();
    let (client, worker): (&TcpStream, &W) = (client_write.as_ref(), worker_write.as_ref());
    let (mut to_worker_done, mut to_client_done) = (up.is_done(), down.is_done());
    if to_worker_done && to_client_done {
        return Relayed::Ended(Outcome::Completed);
    }
    // An end read before the connection parked, or before a resend, and not passed on yet.
    if to_worker_done && !*worker_shut {
        half_close(worker);
        *worker_shut = true;
    }
    if to_client_done && !*client_shut && held_until.is_none() {
        half_close(client);
        *client_shut = true;
    }
    let to_worker = copy(
        (client_read, Side::Client),
        (worker, Side::Worker),
        up,
        &metrics.bytes_to_worker,
        activity,
        |chunk| {
            let answered = activity.take_answered();
            let kept = match chunk {
                Some(chunk) => {
                    *client_sent = true;
                    tail.record(chunk, answered)
                }
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
        down,
        &metrics.bytes_to_client,
        activity,
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
    // Both wait with one registration each and take no lock when polled.
    let parking = route.shared.parking.requested(*joined);
    let cut = guard.upstream().cut();
    tokio::pin!(to_worker, to_client, parking, cut);
    let failure = loop {
        let half_closed = to_worker_done || to_client_done;
        let silence = match (half_closed, settings.idle_timeout.is_zero()) {
            (false, _) => settings.idle_timeout,
            (true, true) => settings.half_close_timeout,
            (true, false) => settings.idle_timeout.min(settings.half_close_timeout),
        };
        tokio::select! {
            biased;
            // Asked to park: the copies stop where they wait, and everything they hold is in the state.
            () = &mut parking => return Relayed::Park,
            // The client first: bytes it sent as the worker closed reach the worker (and its refusal) before
            // the worker's end is looked at.
            // The first end is passed on with a FIN; after the second, dropping the sockets closes both.
            result = &mut to_worker, if !to_worker_done => match result {
                Ok(()) if to_client_done => return Relayed::Ended(Outcome::Completed),
                Ok(()) => {
                    half_close(worker);
                    *worker_shut = true;
                    to_worker_done = true;
                }
                Err(failure) => break failure,
            },
            result = &mut to_client, if !to_client_done => match result {
                // A FIN, but the bytes sent after it were refused: the worker closed without reading them.
                Ok(()) if resendable() && matches!(SockRef::from(worker).take_error(), Ok(Some(_))) => {
                    return Relayed::Resend;
                }
                Ok(()) if to_worker_done => return Relayed::Ended(Outcome::Completed),
                Ok(()) if hold_end() => {
                    activity.end_worker();
                    *held_until = Some(Time::now() + END_HOLD);
                    to_client_done = true;
                }
                Ok(()) => {
                    half_close(client);
                    *client_shut = true;
                    to_client_done = true;
                }
                Err(failure) => break failure,
            },
            () = tokio::time::sleep_until(held_until.map_or_else(Instant::now, Time::instant)), if held_until.is_some() => {
                // The client sent nothing: it learns of the worker's end.
                half_close(client);
                *client_shut = true;
                *held_until = None;
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

/// A failed copy, tagged with the side whose socket failed.
#[derive(Debug)]
struct Failure {
    side: Side,
    error: io::Error,
}

/// Copies `src` to `dst` until `src` ends and `flow` holds nothing more; the caller passes the end on.
///
/// Everything the copy must not lose is in `flow`, updated before each await: what was read and not yet
/// written, and what sits in the splice pipe, so the copy can be dropped at any await point (to park) and
/// started again from `flow` (to resume). What `flow` holds is written before anything more is read.
///
/// A buffer is held only while data moves: it is allocated when `src` becomes readable and given back once
/// `src` is drained, so an idle connection, fresh or kept alive, holds none. `on_read` sees every chunk
/// before it is written and says whether `dst` still takes it; if not, the copy fails as if `dst` had
/// refused it.
///
/// Not an `async fn`, which would keep its arguments twice (as arguments and as the locals they are moved
/// into) in a future that every open connection holds two of: the block below keeps each once.
#[expect(clippy::manual_async_fn, reason = "an async fn would store its arguments twice")]
fn copy<H, R, W>(
    (mut half, src_side): (H, Side),
    (dst, dst_side): (&W, Side),
    flow: &mut Flow,
    counter: &IntCounter,
    activity: &Activity,
    mut on_read: impl FnMut(Option<&[u8]>) -> bool,
) -> impl Future<Output = Result<(), Failure>>
where
    H: AsyncRead + Unpin + AsRef<R>,
    R: Socket,
    W: Socket,
{
    async move {
        let read_failed = |error| Failure { side: src_side, error };
        let write_failed = |error| Failure { side: dst_side, error };
        let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
        loop {
            // What was read and not yet written.
            if let Some(buf) = &mut flow.buffer {
                if flow.written < buf.len() {
                    while flow.written < buf.len() {
                        match dst.try_write(&buf[flow.written..]) {
                            Ok(0) => return Err(write_failed(io::ErrorKind::WriteZero.into())),
                            Ok(n) => {
                                flow.written += n;
                                counter.inc_by(n as u64);
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                dst.writable().await.map_err(write_failed)?
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(write_failed(e)),
                        }
                    }
                    let (n, capacity) = (buf.len(), buf.capacity());
                    buf.clear();
                    flow.written = 0;
                    if n == flow.size && flow.size < BUFFER_SIZE {
                        // A bulk transfer: larger reads, fewer system calls.
                        flow.size = BUFFER_SIZE;
                        flow.buffer = Some(Vec::with_capacity(BUFFER_SIZE));
                    } else if n == BUFFER_SIZE {
                        // Still bulk: the kernel moves the data through a pipe, with no copy through this process.
                        flow.buffer = None;
                        flow.pipe = new_pipe();
                    } else {
                        if n < FIRST_BUFFER_SIZE {
                            flow.size = FIRST_BUFFER_SIZE;
                        }
                        if capacity < flow.size {
                            // A buffer resumed with the bytes it held only: a read gets a full one.
                            flow.buffer = None;
                        }
                    }
                }
            }
            // What sits in the pipe.
            if let Some(pipe) = &mut flow.pipe {
                while pipe.held > 0 {
                    match dst.try_io(Interest::WRITABLE, || {
                        splice(&pipe.read, None, dst, None, pipe.held, flags).map_err(io::Error::from)
                    }) {
                        Ok(0) => return Err(write_failed(io::ErrorKind::WriteZero.into())),
                        Ok(moved) => {
                            pipe.held -= moved;
                            counter.inc_by(moved as u64);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            dst.writable().await.map_err(write_failed)?
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(write_failed(e)),
                    }
                }
                if pipe.last < BUFFER_SIZE {
                    // A read moved less than a full buffer: back to plain copies.
                    flow.pipe = None;
                }
            }
            if flow.ended {
                flow.buffer = None;
                return Ok(());
            }
            let src = half.as_ref();
            if let Some(pipe) = &mut flow.pipe {
                // Bulk: socket to pipe to socket, for as long as each read moves a full BUFFER_SIZE.
                std::future::poll_fn(|cx| src.poll_read_ready(cx))
                    .await
                    .map_err(read_failed)?;
                // The pipe is empty here, so EAGAIN can only mean that `src` is drained; try_io then clears readiness.
                let n = match src.try_io(Interest::READABLE, || {
                    splice(src, None, &pipe.write, None, pipe.capacity, flags).map_err(io::Error::from)
                }) {
                    Ok(n) => n,
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => continue,
                    Err(e) => return Err(read_failed(e)),
                };
                activity.touch();
                (pipe.held, pipe.last) = (n, n);
                if n == 0 {
                    flow.ended = true;
                    flow.pipe = None;
                } else if !on_read(None) {
                    return Err(write_failed(io::ErrorKind::BrokenPipe.into()));
                }
                continue;
            }
            let buf = match &mut flow.buffer {
                Some(buf) => buf,
                None => {
                    // Waits through the task's budget too: a task that has used it up yields here.
                    std::future::poll_fn(|cx| src.poll_read_ready(cx))
                        .await
                        .map_err(read_failed)?;
                    flow.buffer.insert(Vec::with_capacity(flow.size))
                }
            };
            // One poll of the half's read: a short read tells tokio the socket is drained, so this returns
            // Pending without a system call once there is nothing left. Pending drops the buffer; the wait
            // above then either parks the task or, if the budget ran out, yields it.
            let polled = {
                let read = half.read_buf(buf);
                tokio::pin!(read);
                std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await
            };
            let n = match polled {
                Poll::Pending => {
                    flow.buffer = None;
                    continue;
                }
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Poll::Ready(Err(e)) => return Err(read_failed(e)),
            };
            activity.touch();
            if n == 0 {
                flow.ended = true;
                continue;
            }
            if !on_read(Some(&buf[..n])) {
                return Err(write_failed(io::ErrorKind::BrokenPipe.into()));
            }
        }
    }
}

/// A pipe for splicing, or none when the process cannot have one (out of descriptors, say): plain copies
/// still work.
fn new_pipe() -> Option<Box<Pipe>> {
    let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).ok()?;
    // A larger pipe moves more per call; the kernel may refuse, and the default (64 KiB) does too.
    let capacity = fcntl(write.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(PIPE_SIZE))
        .ok()
        .and_then(|size| usize::try_from(size).ok())
        .unwrap_or(BUFFER_SIZE);
    Some(Box::new(Pipe {
        read,
        write,
        capacity,
        held: 0,
        last: BUFFER_SIZE,
    }))
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
    //! Hundreds of connections through the real accept loop and [`serve`], against a worker server in this
    //! process, parked mid-stream in both directions and in every half-closed state, carried through their
    //! record and descriptors as a handover would, resumed, and finished: every byte checked at both ends.

    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpSocket;
    use tokio::sync::{Semaphore, mpsc, watch};

    use super::*;
    use crate::connection::{Parked, ParkedRecord};
    use crate::listener::{Listener, accept_loop};
    use crate::route::{Settings, Upstream};

    /// How long any one wait of these tests may take.
    const DEADLINE: Duration = Duration::from_secs(60);

    /// A small receive buffer on the test's own sockets, so that bytes back up inside baton.
    const SMALL_BUFFER: u32 = 4 * 1024;

    /// A deterministic byte stream (xorshift64*), to write and to check what is read against.
    struct Bytes {
        state: u64,
        word: [u8; 8],
        used: usize,
    }

    impl Bytes {
        fn new(seed: u64) -> Bytes {
            Bytes {
                state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
                word: [0; 8],
                used: 8,
            }
        }

        fn next_word(&mut self) -> [u8; 8] {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes()
        }

        fn fill(&mut self, buf: &mut [u8]) {
            let mut at = 0;
            while at < buf.len() {
                if self.used == 8 {
                    if buf.len() - at >= 8 {
                        buf[at..at + 8].copy_from_slice(&self.next_word());
                        at += 8;
                        continue;
                    }
                    self.word = self.next_word();
                    self.used = 0;
                }
                buf[at] = self.word[self.used];
                self.used += 1;
                at += 1;
            }
        }
    }

    /// What one connection does, by its number.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Scenario {
        /// Bulk both ways (through the splice path); both readers pause mid-stream.
        Bulk,
        /// A few kilobytes both ways; both readers pause mid-stream.
        Small,
        /// The client sends a little and shuts its side before the park; the worker's bulk is mid-stream.
        ClientShut,
        /// The worker sends a little and shuts its side before the park; the client's bulk is mid-stream.
        WorkerShut,
    }

    impl Scenario {
        fn of(id: u64) -> Scenario {
            [
                Scenario::Bulk,
                Scenario::Small,
                Scenario::ClientShut,
                Scenario::WorkerShut,
            ][(id % 4) as usize]
        }

        /// Each way (to the worker, to the client): the bytes, where the writer pauses until the resume,
        /// and where the reader pauses until the resume.
        fn plan(self) -> (Plan, Plan) {
            const BULK: Plan = Plan {
                len: 384 * 1024,
                write_pause: Some(256 * 1024),
                read_pause: Some(128 * 1024),
            };
            const SMALL: Plan = Plan {
                len: 16 * 1024,
                write_pause: Some(12 * 1024),
                read_pause: Some(4 * 1024),
            };
            const SHUT: Plan = Plan {
                len: 8 * 1024,
                write_pause: None,
                read_pause: None,
            };
            match self {
                Scenario::Bulk => (BULK, BULK),
                Scenario::Small => (SMALL, SMALL),
                Scenario::ClientShut => (SHUT, BULK),
                Scenario::WorkerShut => (BULK, SHUT),
            }
        }
    }

    /// One direction of a connection.
    #[derive(Debug, Clone, Copy)]
    struct Plan {
        /// Bytes in all.
        len: usize,
        /// Where the writer waits for the resume.
        write_pause: Option<usize>,
        /// Where the reader waits for the resume.
        read_pause: Option<usize>,
    }

    /// What the two ends of every connection report to the test.
    #[derive(Default)]
    struct Progress {
        /// Readers paused mid-stream.
        paused: AtomicUsize,
        /// Readers that read the end of a stream.
        ended: AtomicUsize,
    }

    /// Writes `len` bytes of stream `seed`, pausing after `pause` bytes until `go`, then shuts the writing
    /// side.
    async fn write_stream(
        mut writer: impl AsyncWriteExt + Unpin,
        seed: u64,
        (len, pause): (usize, Option<usize>),
        mut go: watch::Receiver<bool>,
    ) -> io::Result<()> {
        let mut bytes = Bytes::new(seed);
        let mut chunk = vec![0; 64 * 1024];
        let mut written = 0;
        while written < len {
            let mut n = (len - written).min(chunk.len());
            if let Some(at) = pause.filter(|at| written < *at) {
                n = n.min(at - written);
            }
            bytes.fill(&mut chunk[..n]);
            writer.write_all(&chunk[..n]).await?;
            written += n;
            if pause == Some(written) {
                go.wait_for(|go| *go).await.map_err(io::Error::other)?;
            }
        }
        writer.shutdown().await
    }

    /// Reads stream `seed` to its end and checks it is exactly `len` bytes of it; pauses after `pause`
    /// bytes until `go`.
    async fn read_stream(
        mut reader: impl AsyncReadExt + Unpin,
        seed: u64,
        len: usize,
        pause: Option<usize>,
        mut go: watch::Receiver<bool>,
        progress: &Progress,
    ) -> Result<(), String> {
        let mut expected = Bytes::new(seed);
        let (mut buf, mut want) = (vec![0; 64 * 1024], vec![0; 64 * 1024]);
        let mut read = 0;
        let mut pause = pause;
        loop {
            if pause.is_some_and(|at| read >= at) {
                pause = None;
                progress.paused.fetch_add(1, Ordering::SeqCst);
                go.wait_for(|go| *go).await.map_err(|e| e.to_string())?;
            }
            let n = reader
                .read(&mut buf)
                .await
                .map_err(|e| format!("after {read} bytes: {e}"))?;
            if n == 0 {
                break;
            }
            expected.fill(&mut want[..n]);
            if buf[..n] != want[..n] {
                return Err(format!("the bytes after {read} differ from what was sent"));
            }
            read += n;
        }
        progress.ended.fetch_add(1, Ordering::SeqCst);
        if read == len {
            Ok(())
        } else {
            Err(format!("{read} bytes of {len}"))
        }
    }

    /// Seeds of the two streams of connection `id`.
    fn seeds(id: u64) -> (u64, u64) {
        (2 * id + 1, 2 * id + 2)
    }

    /// A socket whose receive buffer is small.
    fn small_socket() -> TcpSocket {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(SMALL_BUFFER).expect("SO_RCVBUF");
        socket
    }

    /// The in-process worker: reads a connection's number, then sends its stream and checks the client's.
    async fn worker_server(
        progress: Arc<Progress>,
        go: watch::Receiver<bool>,
        done: mpsc::Sender<Result<(), String>>,
    ) -> SocketAddr {
        let socket = small_socket();
        socket.bind("127.0.0.1:0".parse().expect("address")).expect("bind");
        let listener = socket.listen(1024).expect("listen");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (progress, go, done) = (Arc::clone(&progress), go.clone(), done.clone());
                tokio::spawn(async move {
                    let (mut reader, writer) = stream.into_split();
                    let result = async {
                        let id = reader.read_u64().await.map_err(|e| e.to_string())?;
                        let (up, down) = Scenario::of(id).plan();
                        let (up_seed, down_seed) = seeds(id);
                        let (read, written) = tokio::join!(
                            read_stream(reader, up_seed, up.len, up.read_pause, go.clone(), &progress),
                            write_stream(writer, down_seed, (down.len, down.write_pause), go),
                        );
                        written.map_err(|e| format!("worker writing: {e}"))?;
                        read.map_err(|e| format!("worker reading connection {id}: {e}"))
                    }
                    .await;
                    let _ = done.send(result).await;
                });
            }
        });
        addr
    }

    /// One client: sends its number and stream, checks the worker's.
    async fn client(
        id: u64,
        addr: SocketAddr,
        progress: Arc<Progress>,
        go: watch::Receiver<bool>,
        addrs: Arc<Mutex<HashMap<SocketAddr, u64>>>,
    ) -> Result<(), String> {
        let stream = small_socket().connect(addr).await.map_err(|e| e.to_string())?;
        let local = stream.local_addr().map_err(|e| e.to_string())?;
        addrs.lock().expect("addresses").insert(local, id);
        let (reader, mut writer) = stream.into_split();
        let (up, down) = Scenario::of(id).plan();
        let (up_seed, down_seed) = seeds(id);
        let write_go = go.clone();
        let write = async move {
            writer.write_u64(id).await?;
            write_stream(writer, up_seed, (up.len, up.write_pause), write_go).await
        };
        let read = read_stream(reader, down_seed, down.len, down.read_pause, go, &progress);
        let (read, written) = tokio::join!(read, write);
        written.map_err(|e| format!("client writing: {e}"))?;
        read.map_err(|e| format!("client reading connection {id}: {e}"))
    }

    /// Polls `check` until it holds, or panics with what it last saw.
    async fn wait_until(what: &str, mut check: impl FnMut() -> Result<(), String>) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match check() {
                Ok(()) => return,
                Err(seen) if Instant::now() >= deadline => panic!("{what}: {seen}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// Asks the connections of `shared` to park, waits until all have, and takes them.
    async fn park_all(shared: &Shared) -> Vec<crate::route::ParkedConnection> {
        shared.parking.request();
        tokio::time::timeout(DEADLINE, shared.all_parked())
            .await
            .expect("every connection parks");
        shared.parking.take()
    }

    fn route_to(worker: SocketAddr) -> (Arc<ArcSwap<Route>>, Arc<Upstream>) {
        let upstream = Arc::new(Upstream::new(1, 0, WorkerAddr::Tcp(worker)));
        let route = Arc::new(ArcSwap::from_pointee(Route {
            upstream: Some(Arc::clone(&upstream)),
            split: None,
            hold: true,
            settings: Settings {
                connect_timeout: Duration::from_secs(5),
                pending_timeout: Duration::from_secs(5),
                max_connections: 0,
                idle_timeout: Duration::from_secs(300),
                half_close_timeout: Duration::from_secs(300),
                resend_unanswered: true,
                proxy_protocol: None,
                accept_proxy_protocol: Vec::new(),
                proxy_protocol_timeout: Duration::from_secs(3),
                max_connections_per_client: 0,
            },
            shared: Arc::new(Shared::new(crate::metrics::Metrics::new().service("park"))),
        }));
        (route, upstream)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hundreds_of_connections_park_mid_stream_and_resume_byte_exact() {
        const CONNECTIONS: u64 = 300;
        let progress = Arc::new(Progress::default());
        let (go, gate) = watch::channel(false);
        let (worker_done, mut worker_results) = mpsc::channel(CONNECTIONS as usize);
        let worker = worker_server(Arc::clone(&progress), gate.clone(), worker_done).await;
        let (route, upstream) = route_to(worker);
        let shared = Arc::clone(&route.load().shared);
        let listener = Listener::bind("127.0.0.1:0".parse().expect("address"), 1024).expect("bind");
        // Baton's client sockets inherit a small send buffer: its writes to paused clients stop early, so it
        // parks with bytes it has read and not written.
        SockRef::from(listener.socket())
            .set_send_buffer_size(SMALL_BUFFER as usize)
            .expect("SO_SNDBUF");
        let listener = Arc::new(listener);
        let public = listener.local;
        let budget = Arc::new(Semaphore::new(4 * CONNECTIONS as usize));
        let accepting = tokio::spawn(accept_loop(listener, "park".into(), Arc::clone(&route), budget));
        let addrs = Arc::new(Mutex::new(HashMap::new()));
        let clients: Vec<_> = (0..CONNECTIONS)
            .map(|id| {
                let (progress, gate, addrs) = (Arc::clone(&progress), gate.clone(), Arc::clone(&addrs));
                tokio::spawn(client(id, public, progress, gate, addrs))
            })
            .collect();

        // Every reader that pauses has paused, and every end that comes before the park has been read.
        let quarter = (CONNECTIONS / 4) as usize;
        let (paused, ended) = (6 * quarter, 2 * quarter);
        wait_until("the streams reach their pauses", || {
            let seen = (
                progress.paused.load(Ordering::SeqCst),
                progress.ended.load(Ordering::SeqCst),
            );
            (seen == (paused, ended))
                .then_some(())
                .ok_or(format!("paused, ended: {seen:?}"))
        })
        .await;
        accepting.abort();

        let parked = park_all(&shared).await;
        assert_eq!(parked.len(), CONNECTIONS as usize, "parked connections");
        assert_eq!(
            upstream.connections(),
            CONNECTIONS as usize,
            "the worker still counts them all"
        );

        // Each state a handover would find, by scenario.
        let addrs = addrs.lock().expect("addresses").clone();
        let (mut pending, mut from_pipes) = (0, 0);
        let mut resumed = Vec::new();
        for ParkedConnection { connection, guard, .. } in parked {
            let id = addrs[&connection.client_addr().expect("client address")];
            let record = &connection.record;
            match Scenario::of(id) {
                Scenario::ClientShut => assert!(
                    record.to_worker.ended && record.worker_shut && !record.to_client.ended,
                    "connection {id}: the client's end was passed on: {:?}",
                    (record.to_worker.ended, record.worker_shut, record.to_client.ended)
                ),
                Scenario::WorkerShut => assert!(
                    record.to_client.ended && record.client_shut && !record.to_worker.ended,
                    "connection {id}: the worker's end was passed on"
                ),
                Scenario::Bulk | Scenario::Small => assert!(
                    !record.to_worker.ended && !record.to_client.ended,
                    "connection {id}: mid-stream both ways"
                ),
            }
            pending += usize::from(!record.to_worker.pending.is_empty());
            pending += usize::from(!record.to_client.pending.is_empty());
            from_pipes += usize::from(connection.from_pipes > 0);
            // What a handover does: the record through JSON, the sockets as descriptors, a new guard.
            let (record, fds) = connection.into_parts().expect("into parts");
            let text = serde_json::to_string(&record).expect("serialise");
            let back: ParkedRecord = serde_json::from_str(&text).expect("deserialise");
            assert_eq!(back, record);
            let connection = Parked::from_parts(back, fds, false).expect("from parts");
            let adopted = upstream.adopt(record.answered);
            drop(guard);
            resumed.push(ParkedConnection {
                client: None,
                connection,
                guard: adopted,
            });
        }
        eprintln!("parked: {pending} directions with pending bytes, {from_pipes} connections with piped bytes");
        assert!(pending > 0, "some connections parked with bytes read and not written");
        assert!(from_pipes > 0, "some connections parked with bytes in a splice pipe");

        shared.parking.cancel();
        let outcomes: Vec<_> = resumed
            .into_iter()
            .map(|parked| {
                let route = Arc::clone(&route);
                tokio::spawn(async move { resume(parked, &route).await })
            })
            .collect();
        go.send(true).expect("open the gate");
        for (id, client) in clients.into_iter().enumerate() {
            let result = tokio::time::timeout(DEADLINE, client).await.expect("client in time");
            result
                .expect("client task")
                .unwrap_or_else(|e| panic!("client {id}: {e}"));
        }
        for _ in 0..CONNECTIONS {
            let result = tokio::time::timeout(DEADLINE, worker_results.recv())
                .await
                .expect("worker in time");
            result.expect("a result").unwrap_or_else(|e| panic!("{e}"));
        }
        for outcome in outcomes {
            assert_eq!(outcome.await.expect("relay task"), Outcome::Completed);
        }
        assert_eq!(shared.open(), 0);
        assert_eq!(upstream.connections(), 0);
    }

    #[tokio::test]
    async fn a_draining_workers_held_end_parks_and_reaches_the_client_after_the_resume() {
        let workers = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let public = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let deadline = Instant::now() + DEADLINE;
        'attempt: loop {
            assert!(
                Instant::now() < deadline,
                "the worker's end was never held when the connection parked"
            );
            // A fresh worker each attempt: the last one is draining.
            let (route, upstream) = route_to(workers.local_addr().expect("address"));
            let shared = Arc::clone(&route.load().shared);
            let mut client = TcpStream::connect(public.local_addr().expect("address"))
                .await
                .expect("connect");
            let (accepted, peer) = public.accept().await.expect("accept");
            let serving = tokio::spawn({
                let route = Arc::clone(&route);
                async move { serve(accepted, peer, &route).await }
            });
            let (mut worker, _) = workers.accept().await.expect("worker accept");
            client.write_all(b"hello").await.expect("write");
            let mut hello = [0; 5];
            worker.read_exact(&mut hello).await.expect("worker read");
            worker.write_all(b"hi").await.expect("worker write");
            let mut hi = [0; 2];
            client.read_exact(&mut hi).await.expect("client read");
            assert_eq!((&hello, &hi), (b"hello", b"hi"));
            // The worker drains and closes: baton holds its end back from the client for a moment.
            upstream.begin_drain();
            worker.shutdown().await.expect("worker shutdown");
            let parked = loop {
                shared.parking.request();
                tokio::time::timeout(DEADLINE, shared.all_parked())
                    .await
                    .expect("parks");
                let mut taken = shared.parking.take();
                let connection = taken.pop().expect("one parked connection");
                let record = &connection.connection.record;
                if record.held_until.is_some() {
                    assert!(record.to_client.ended && !record.client_shut && record.worker_ended);
                    break connection;
                }
                shared.parking.cancel();
                if record.client_shut {
                    // The hold ended before the park: try again with a new connection.
                    continue 'attempt;
                }
                // Parked before baton read the worker's end: let it run and park it again.
                let route = Arc::clone(&route);
                tokio::spawn(async move { resume(connection, &route).await });
                tokio::task::yield_now().await;
            };
            assert_eq!(serving.await.expect("serve"), Outcome::Parked);
            let ParkedConnection { connection, guard, .. } = parked;
            let (record, fds) = connection.into_parts().expect("into parts");
            let back: ParkedRecord =
                serde_json::from_str(&serde_json::to_string(&record).expect("serialise")).expect("deserialise");
            let connection = Parked::from_parts(back, fds, false).expect("from parts");
            shared.parking.cancel();
            let resumed = tokio::spawn({
                let route = Arc::clone(&route);
                async move {
                    let parked = ParkedConnection {
                        connection,
                        guard,
                        client: None,
                    };
                    resume(parked, &route).await
                }
            });
            // The held end reaches the client once the hold's remaining time has passed.
            let mut rest = Vec::new();
            tokio::time::timeout(DEADLINE, client.read_to_end(&mut rest))
                .await
                .expect("the end in time")
                .expect("no reset");
            assert!(rest.is_empty(), "nothing but the end: {rest:?}");
            client.shutdown().await.expect("client shutdown");
            let mut end = [0; 1];
            assert_eq!(worker.read(&mut end).await.expect("worker reads the end"), 0);
            assert_eq!(resumed.await.expect("resumed"), Outcome::Completed);
            return;
        }
    }

    /// Baton's sockets of the connections through `public` to `worker` that are inheritable across an exec:
    /// the client ones (bound to `public`) and the worker ones (connected to `worker`).
    fn inheritable_sockets(public: SocketAddr, worker: SocketAddr) -> Vec<i32> {
        use std::os::fd::BorrowedFd;
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc/self/fd").expect("fd directory") {
            let Some(fd) = entry.ok().and_then(|e| e.file_name().to_str()?.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(flags) = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD) else {
                continue;
            };
            if flags & nix::libc::FD_CLOEXEC != 0 {
                continue;
            }
            // SAFETY: borrowed for the two calls below only; a descriptor closed meanwhile makes them fail.
            #[allow(unsafe_code)]
            let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
            let socket = SockRef::from(&borrowed);
            let local = socket.local_addr().ok().and_then(|a| a.as_socket());
            let peer = socket.peer_addr().ok().and_then(|a| a.as_socket());
            if local == Some(public) || peer == Some(worker) {
                found.push(fd);
            }
        }
        found
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_rest_in_a_watch_inheritable_wake_on_a_byte_and_leave_it_close_on_exec() {
        const CONNECTIONS: usize = 40;
        // An echo worker.
        let worker = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind worker");
        let worker_addr = worker.local_addr().expect("worker address");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = worker.accept().await {
                tokio::spawn(async move {
                    let mut buffer = [0u8; 64];
                    while let Ok(n @ 1..) = stream.read(&mut buffer).await {
                        if stream.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let (route, _upstream) = route_to(worker_addr);
        let shared = Arc::clone(&route.load().shared);
        let listener = Arc::new(Listener::bind("127.0.0.1:0".parse().expect("address"), 1024).expect("bind"));
        let public = listener.local;
        let budget = Arc::new(Semaphore::new(CONNECTIONS));
        let accepting = tokio::spawn(accept_loop(listener, "watch".into(), Arc::clone(&route), budget));
        async fn echo(client: &mut TcpStream, byte: u8) {
            client.write_all(&[byte]).await.expect("write");
            let mut back = [0u8; 1];
            tokio::time::timeout(DEADLINE, client.read_exact(&mut back))
                .await
                .expect("in time")
                .expect("echo");
            assert_eq!(back, [byte]);
        }
        let mut clients = Vec::new();
        for _ in 0..CONNECTIONS {
            let mut client = TcpStream::connect(public).await.expect("connect");
            echo(&mut client, b'a').await;
            clients.push(client);
        }
        assert!(
            inheritable_sockets(public, worker_addr).is_empty(),
            "close-on-exec while they relay"
        );

        // Asked to join a watch, they do and, having nothing to move, rest there: inheritable, parked.
        let watch = shared.parking.watch().expect("watch");
        wait_until("every connection rests in the watch", || {
            let (joined, open) = (watch.joined(), shared.open());
            (joined == CONNECTIONS && open == 0)
                .then_some(())
                .ok_or(format!("{joined} joined, {open} open"))
        })
        .await;
        let sockets = inheritable_sockets(public, worker_addr);
        assert_eq!(sockets.len(), 2 * CONNECTIONS, "inheritable: {sockets:?}");
        let mut ready = Vec::new();
        watch.ready(&mut ready).expect("ready");
        assert!(ready.is_empty(), "nothing waits yet: {ready:?}");

        // A client sends a byte: the watch reports its socket, and its connection is woken and relays it.
        clients[7].write_all(b"b").await.expect("write");
        wait_until("the watch reports the connection that has a byte", || {
            watch.ready(&mut ready).map_err(|e| e.to_string())?;
            (!ready.is_empty()).then_some(()).ok_or("nothing reported".into())
        })
        .await;
        assert!(
            ready.iter().all(|fd| sockets.contains(fd)),
            "{ready:?} among {sockets:?}"
        );
        let woken = shared.parking.wake(&ready);
        assert_eq!(woken.len(), 1, "one connection woken");
        for connection in woken {
            shared.accepted();
            let route = Arc::clone(&route);
            tokio::spawn(async move { wake(connection, &route).await });
        }
        let mut back = [0u8; 1];
        tokio::time::timeout(DEADLINE, clients[7].read_exact(&mut back))
            .await
            .expect("in time")
            .expect("the byte sent while it rested");
        assert_eq!(back, *b"b");

        // They are frozen: the resting ones are parked already, the woken one parks, no longer watched
        // (the watch has reported it).
        accepting.abort();
        let parked = park_all(&shared).await;
        assert_eq!(parked.len(), CONNECTIONS);
        let unwatched = parked.iter().filter(|p| !p.connection.watched).count();
        assert_eq!(unwatched, 1, "only the woken connection parked unwatched");
        assert_eq!(inheritable_sockets(public, worker_addr).len(), 2 * CONNECTIONS);

        // The hand-over is given up: they resume, leave the watch, are close-on-exec again and relay.
        shared.parking.cancel();
        drop(shared.parking.unwatch());
        for connection in parked {
            let route = Arc::clone(&route);
            tokio::spawn(async move { resume(connection, &route).await });
        }
        for client in &mut clients {
            echo(client, b'c').await;
        }
        wait_until("their sockets are close-on-exec again", || {
            let left = inheritable_sockets(public, worker_addr);
            left.is_empty().then_some(()).ok_or(format!("inheritable: {left:?}"))
        })
        .await;
    }
}
