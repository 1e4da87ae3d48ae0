//! The routing snapshot of a service, behind one `ArcSwap`, and the connection guards that let a worker drain.
//!
//! A connection loads the snapshot once, takes a [`Guard`] on the worker it names and keeps it until it
//! closes. Everything a connection needs is in that one snapshot, so a switch is a single pointer store and
//! no connection can see half of one.
//!
//! A connection waits for the cut of its worker's drain and for a request to park ([`Parking`]) through
//! [`Signal`]s, which register the waiting task once and take no lock on the polls in between. The only
//! lock here is the list of parked connections', taken when a connection parks and when they are taken.
//!
//! Before a hand-over parks them, a service can ask its connections to join a [`Watch`] (see
//! [`crate::watch`]) through the same signal: each adds its sockets and relays on.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio::sync::futures::Notified;

use crate::connection::Parked;
use crate::endpoint::Endpoint;
use crate::metrics::ServiceMetrics;
use crate::watch::Watch;

/// How often [`Upstream::settled`] looks at the unanswered connections.
const SETTLE_POLL: Duration = Duration::from_millis(5);

/// Bit of [`Upstream::state`] set once the worker drains: no new guard may be taken.
const DRAINING: usize = 1 << (usize::BITS - 1);

/// The shared, swappable route of one service.
pub type SharedRoute = Arc<ArcSwap<Route>>;

/// What a new connection to a service needs: where to go and how.
#[derive(Debug)]
pub struct Route {
    /// The worker new connections go to; `None` while the service has none ready.
    pub upstream: Option<Arc<Upstream>>,
    /// During a canary, the previous worker and the share of new connections the new one (`upstream`)
    /// takes.
    pub split: Option<Split>,
    /// Whether a connection finding no ready worker waits for one (up to `pending_timeout`) rather than
    /// being closed: true unless the service is shutting down.
    pub hold: bool,
    /// The service's connection settings.
    pub settings: Settings,
    /// What every snapshot of the service shares.
    pub shared: Arc<Shared>,
}

/// How new connections are split between the new worker and the previous one during a canary.
#[derive(Debug)]
pub struct Split {
    /// The previous worker.
    pub previous: Arc<Upstream>,
    /// The new worker's share, in hundredths of a percent.
    pub share: u16,
    /// Whether a client address's connections all go to one of them.
    pub sticky: bool,
}

impl Split {
    /// Whether a new connection from `client` (the `draw`th of the service) goes to the new worker.
    pub fn to_new(&self, client: Option<std::net::IpAddr>, draw: u64) -> bool {
        let point = match (self.sticky, client) {
            (true, Some(ip)) => {
                // FNV-1a of the address: the same client lands on the same side at every step it is below.
                let octets = match crate::proxy_protocol::canonical_ip(ip) {
                    std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
                    std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
                };
                octets.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
                })
            }
            // Each connection draws: a Weyl sequence, spread evenly however few there are.
            _ => draw.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        };
        ((point >> 32) % 10_000) < u64::from(self.share)
    }
}

/// The per-connection settings of a service, copied from its configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long dialling the worker may take.
    pub connect_timeout: Duration,
    /// How long a connection may wait for a ready worker.
    pub pending_timeout: Duration,
    /// Open connections allowed at once; zero for no limit.
    pub max_connections: usize,
    /// Silence after which a connection closes; zero for never.
    pub idle_timeout: Duration,
    /// Silence after a half-close after which a connection closes.
    pub half_close_timeout: Duration,
    /// Whether bytes a worker closed on without reading go to the current worker on a new connection.
    pub resend_unanswered: bool,
    /// The PROXY protocol header sent to the worker ahead of each connection, if any.
    pub proxy_protocol: Option<crate::proxy_protocol::Version>,
    /// Sources whose connections must begin with a PROXY protocol header.
    pub accept_proxy_protocol: Vec<ipnet::IpNet>,
    /// How long such a source has to send its whole header.
    pub proxy_protocol_timeout: Duration,
    /// Open connections allowed from one client address; zero for no limit.
    pub max_connections_per_client: u32,
}

impl Settings {
    /// The settings of `config`.
    pub fn of(config: &crate::config::ServiceConfig) -> Settings {
        Settings {
            connect_timeout: config.connect_timeout,
            pending_timeout: config.pending_timeout,
            max_connections: config.max_connections as usize,
            idle_timeout: config.idle_timeout,
            half_close_timeout: config.half_close_timeout,
            resend_unanswered: config.resend_unanswered,
            proxy_protocol: config.proxy_protocol,
            accept_proxy_protocol: config.accept_proxy_protocol.clone(),
            proxy_protocol_timeout: config.proxy_protocol_timeout,
            max_connections_per_client: config.max_connections_per_client,
        }
    }

    /// Whether a connection from `peer` must begin with a PROXY protocol header.
    pub fn trusts(&self, peer: std::net::IpAddr) -> bool {
        if self.accept_proxy_protocol.is_empty() {
            return false;
        }
        let peer = crate::proxy_protocol::canonical_ip(peer);
        self.accept_proxy_protocol.iter().any(|net| net.contains(&peer))
    }
}

/// What outlives every snapshot of a service's route.
#[derive(Debug)]
pub struct Shared {
    /// The service's metric handles.
    pub metrics: ServiceMetrics,
    /// Woken whenever the service stores a new route, for connections waiting for a worker.
    pub changed: Notify,
    /// Asks the service's connections to park, and keeps them once parked.
    pub parking: Parking,
    /// The service's open connections (parked ones are not open).
    open: AtomicUsize,
    /// Connections accepted whose task has not yet counted them in `open`.
    starting: AtomicUsize,
    /// Open connections per client address, for `max_connections_per_client`.
    clients: Clients,
    /// New connections that have drawn a side of a canary split ([`Split::to_new`]).
    draws: AtomicU64,
}

/// Open connections per client address: a lock-free map whose entry goes when its count falls to zero, so
/// that it holds the clients with connections open and no others, however many have come and gone.
#[derive(Debug, Default)]
struct Clients {
    counts: papaya::HashMap<std::net::IpAddr, u32>,
}

/// One open connection counted against its client address; uncounts it when dropped. It stays with the
/// connection while it is parked, so that a client's parked connections still count.
#[derive(Debug)]
pub struct ClientSlot {
    shared: Arc<Shared>,
    ip: std::net::IpAddr,
}

impl ClientSlot {
    /// The client address it counts against.
    pub fn ip(&self) -> std::net::IpAddr {
        self.ip
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let counts = &self.shared.clients.counts;
        let guard = counts.guard();
        counts.compute(
            self.ip,
            |entry| match entry {
                Some((_, &count)) if count > 1 => papaya::Operation::Insert(count - 1),
                Some(_) => papaya::Operation::Remove,
                None => papaya::Operation::Abort(()),
            },
            &guard,
        );
    }
}

/// One open connection, counted against `max_connections`; uncounts it when dropped.
#[derive(Debug)]
pub struct Admission<'a> {
    shared: &'a Shared,
}

impl Shared {
    /// The shared part of a new service's route.
    pub fn new(metrics: ServiceMetrics) -> Shared {
        Shared {
            metrics,
            changed: Notify::new(),
            parking: Parking::default(),
            open: AtomicUsize::new(0),
            starting: AtomicUsize::new(0),
            clients: Clients::default(),
            draws: AtomicU64::new(0),
        }
    }

    /// Counts a connection from `ip` unless `max` (zero: no limit) are open from it already; `max` is
    /// ignored for a connection that was counted before (`readmitted`: one handed over by a re-exec).
    pub fn client_slot(self: &Arc<Self>, ip: std::net::IpAddr, max: u32, readmitted: bool) -> Option<ClientSlot> {
        let counts = &self.clients.counts;
        let guard = counts.guard();
        let counted = counts.compute(
            ip,
            |entry| match entry {
                Some((_, &count)) if count >= max && !readmitted => papaya::Operation::Abort(()),
                Some((_, &count)) => papaya::Operation::Insert(count.saturating_add(1)),
                None => papaya::Operation::Insert(1),
            },
            &guard,
        );
        match counted {
            papaya::Compute::Aborted(()) => None,
            _ => Some(ClientSlot {
                shared: Arc::clone(self),
                ip,
            }),
        }
    }

    /// How many client addresses have connections open, counted by [`Shared::client_slot`].
    pub fn clients(&self) -> usize {
        self.clients.counts.len()
    }

    /// Notes a connection just accepted, before its task runs: until [`Shared::started`], it counts as open
    /// for [`Shared::all_parked`].
    pub fn accepted(&self) {
        self.starting.fetch_add(1, Ordering::AcqRel);
    }

    /// A connection noted by [`Shared::accepted`] has been admitted, or turned away.
    pub fn started(&self) {
        let before = self
            .starting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        if before == Ok(1) && self.open() == 0 && self.parking.is_requested() {
            self.parking.settled.notify_waiters();
        }
    }

    /// Counts a new connection unless `max` (zero: no limit) are open already.
    pub fn admit(&self, max: usize) -> Option<Admission<'_>> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= max && max != 0 {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Admission { shared: self })
    }

    /// Counts a parked connection that resumes: it was admitted before it parked, so no limit applies.
    pub fn readmit(&self) -> Admission<'_> {
        self.open.fetch_add(1, Ordering::AcqRel);
        Admission { shared: self }
    }

    /// The service's open connections: admitted, and neither ended nor parked.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Waits until no connection of the service is open: each has parked or ended. Call it after
    /// [`Parking::request`]; new connections must have stopped coming (the accept loops stopped). A
    /// connection still waiting for a worker counts as open until it has dialled one and parked.
    pub async fn all_parked(&self) {
        loop {
            let settled = self.parking.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            if self.open() == 0 && self.starting.load(Ordering::Acquire) == 0 {
                return;
            }
            settled.await;
        }
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        let shared = self.shared;
        if shared.open.fetch_sub(1, Ordering::AcqRel) == 1 && shared.parking.is_requested() {
            shared.parking.settled.notify_waiters();
        }
    }
}

/// A flag that many connections wait for: raising it wakes them all. A waiter ([`Raised`]) registers its
/// task once; its polls in between take no lock, only a load of the flag.
///
/// A `CancellationToken`'s `cancelled()` future, even pinned once per relay, would not do: every poll of
/// it takes the token's mutex (to ask whether it is cancelled) and, while it waits, the `Notify`'s
/// waiter-list mutex (to compare wakers), both shared by every connection of the worker, on every wake-up
/// of every connection's task. A bare `Notify` wait has the second of those.
#[derive(Debug, Default)]
pub struct Signal {
    /// Odd while raised; every raise and every lowering adds one, so a waiter sees any change.
    epoch: AtomicU64,
    /// Wakes the waiters at every change.
    notify: Notify,
}

impl Signal {
    /// Raises the flag: every waiter resolves.
    pub fn raise(&self) {
        self.set(true);
    }

    /// Lowers the flag again: waiters created from now on wait for the next raise.
    pub fn lower(&self) {
        self.set(false);
    }

    /// Moves the epoch on to the next odd (raised) or even (lowered) value, unless it is there already, and
    /// wakes every waiter when it moved.
    fn set(&self, raised: bool) {
        let moved = self.epoch.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |e| {
            ((e % 2 == 1) != raised).then_some(e + 1)
        });
        if moved.is_ok() {
            self.notify.notify_waiters();
        }
    }

    /// Wakes every waiter without moving the flag, for a waiter that also waits for something else
    /// ([`Parking::requested`]).
    fn nudge(&self) {
        self.notify.notify_waiters();
    }

    /// Whether the flag is up.
    pub fn is_raised(&self) -> bool {
        self.epoch.load(Ordering::SeqCst) % 2 == 1
    }

    /// Resolves once the flag is up.
    pub fn raised(&self) -> Raised<'_> {
        Raised {
            signal: self,
            notified: self.notify.notified(),
            registered: None,
            watch: None,
        }
    }
}

pin_project_lite::pin_project! {
    /// Resolves once its [`Signal`] is raised. The first poll registers the task with the signal (one lock);
    /// later polls look at the flag and return, unless the flag changed or the task's waker did.
    #[derive(Debug)]
    pub struct Raised<'a> {
        signal: &'a Signal,
        #[pin]
        notified: Notified<'a>,
        // The epoch and the waker `notified` was registered with.
        registered: Option<(u64, Waker)>,
        // Also resolves once this holds a watch other than the one given (0: none).
        watch: Option<(&'a AtomicU64, u64)>,
    }
}

impl Future for Raised<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        loop {
            // `notified` was created before this load, so a raise the load misses wakes it.
            let epoch = this.signal.epoch.load(Ordering::SeqCst);
            if epoch % 2 == 1 {
                return Poll::Ready(());
            }
            if let Some((current, joined)) = this.watch {
                if current.load(Ordering::SeqCst) != *joined {
                    return Poll::Ready(());
                }
            }
            let unchanged = this.registered.as_ref();
            if unchanged.is_some_and(|(seen, waker)| *seen == epoch && waker.will_wake(cx.waker())) {
                return Poll::Pending;
            }
            match this.notified.as_mut().poll(cx) {
                Poll::Pending => {
                    *this.registered = Some((epoch, cx.waker().clone()));
                    return Poll::Pending;
                }
                // A raise and a lowering since: wait for the next raise.
                Poll::Ready(()) => {
                    this.notified.set(this.signal.notify.notified());
                    *this.registered = None;
                }
            }
        }
    }
}

/// A service's request that its connections park, and the connections that did.
///
/// A connection relaying data parks at once when asked; one still dialling its worker, or waiting for a
/// worker to be ready, finishes that first (nothing has been sent yet) and parks before it moves a byte.
#[derive(Debug, Default)]
pub struct Parking {
    /// Up while the service's connections are to park.
    signal: Signal,
    /// Woken when the last open connection parks or ends while parking is requested.
    settled: Notify,
    /// The parked connections.
    parked: Mutex<Vec<ParkedConnection>>,
    /// The last watch's id (ids only grow), and the watch connections are to join while there is one.
    watch: Mutex<(u64, Option<Arc<Watch>>)>,
    /// The id of the watch connections are to join, or 0.
    watch_id: AtomicU64,
}

/// A parked connection, with the guard that keeps it counted against its worker meanwhile.
#[derive(Debug)]
pub struct ParkedConnection {
    /// The connection.
    pub connection: Parked,
    /// Its worker's guard: the worker does not drain away from under it.
    pub guard: Guard,
    /// Its count against its client address, under `max_connections_per_client`.
    pub client: Option<ClientSlot>,
}

impl Parking {
    /// The parked connections as a handover names them: each record with its two descriptors, and whether
    /// they are in the watch.
    pub fn records(&self) -> Vec<(crate::connection::ParkedRecord, [std::os::fd::RawFd; 2], bool)> {
        let parked = self.parked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        parked
            .iter()
            .map(|p| {
                (
                    p.connection.record.clone(),
                    p.connection.raw_fds(),
                    p.connection.watched,
                )
            })
            .collect()
    }

    /// Asks every connection of the service to park. [`Shared::all_parked`] says when they all have.
    pub fn request(&self) {
        self.signal.raise();
    }

    /// Lets connections run again: from now on, none parks (those parked stay parked until resumed).
    pub fn cancel(&self) {
        self.signal.lower();
    }

    /// Whether connections are asked to park.
    pub fn is_requested(&self) -> bool {
        self.signal.is_raised()
    }

    /// Resolves once connections are asked to park, or to join a watch other than `joined` (the id of the
    /// one the connection joined, or 0), or to leave that one (it ended).
    pub fn requested(&self, joined: u64) -> Raised<'_> {
        Raised {
            watch: Some((&self.watch_id, joined)),
            ..self.signal.raised()
        }
    }

    /// Keeps a connection that parked.
    pub fn keep(&self, parked: ParkedConnection) {
        self.parked.lock().unwrap_or_else(PoisonError::into_inner).push(parked);
    }

    /// Makes room for `more` parked connections, so that they park without the list growing as they come.
    pub fn reserve(&self, more: usize) {
        self.parked.lock().unwrap_or_else(PoisonError::into_inner).reserve(more);
    }

    /// Asks every connection to add its sockets to a new watch, and returns it. Fails if it cannot be
    /// created; connections then park unwatched.
    pub fn watch(&self) -> std::io::Result<Arc<Watch>> {
        let mut current = self.watch.lock().unwrap_or_else(PoisonError::into_inner);
        let id = current.0 + 1;
        let watch = Arc::new(Watch::new(id)?);
        *current = (id, Some(Arc::clone(&watch)));
        self.watch_id.store(id, Ordering::SeqCst);
        drop(current);
        self.signal.nudge();
        Ok(watch)
    }

    /// The watch connections are to join, if there is one.
    pub fn current_watch(&self) -> Option<Arc<Watch>> {
        self.watch.lock().unwrap_or_else(PoisonError::into_inner).1.clone()
    }

    /// Ends the watch, if there is one, and returns it: the connections that joined it leave it.
    pub fn unwatch(&self) -> Option<Arc<Watch>> {
        let mut current = self.watch.lock().unwrap_or_else(PoisonError::into_inner);
        self.watch_id.store(0, Ordering::SeqCst);
        let watch = current.1.take();
        drop(current);
        self.signal.nudge();
        watch
    }

    /// Takes back the connections resting in the watch ([`crate::connection::Parked::watched`]) that own
    /// one of the sockets `ready`, which the watch reported with bytes or an end waiting.
    pub fn wake(&self, ready: &[std::os::fd::RawFd]) -> Vec<ParkedConnection> {
        if ready.is_empty() {
            return Vec::new();
        }
        let ready: std::collections::HashSet<_> = ready.iter().copied().collect();
        let mut parked = self.parked.lock().unwrap_or_else(PoisonError::into_inner);
        let mut woken = Vec::new();
        let mut i = 0;
        while i < parked.len() {
            let p = &parked[i].connection;
            if p.watched && p.raw_fds().iter().any(|fd| ready.contains(fd)) {
                woken.push(parked.swap_remove(i));
            } else {
                i += 1;
            }
        }
        woken
    }

    /// The connections parked so far.
    pub fn take(&self) -> Vec<ParkedConnection> {
        std::mem::take(&mut *self.parked.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// The private address of a worker is an [`Endpoint`]; the name stays for the data path, which dials it.
pub use crate::endpoint::Endpoint as WorkerAddr;

/// One worker as seen by the data path: its address and the count of connections going to it.
#[derive(Debug)]
pub struct Upstream {
    /// The worker's generation.
    pub generation: u64,
    /// The worker's process id.
    pub pid: u32,
    /// Where the worker listens.
    pub addr: Endpoint,
    /// Open connections in the low bits, [`DRAINING`] in the top bit: one word, so taking a guard and
    /// starting a drain cannot race.
    state: AtomicUsize,
    /// Woken when the last guard of a draining worker drops.
    idle: Notify,
    /// Raised when the drain deadline passes: the remaining connections close.
    cut: Signal,
    /// Connections that have not yet had a byte from the worker: the worker may not have accepted them yet.
    unanswered: AtomicUsize,
    /// Connections (and dials) that have ended, for a canary's judgement.
    ended: AtomicU64,
    /// Those of them that ended badly on the worker's side ([`Guard::fail`]).
    failed: AtomicU64,
}

/// Proof that a connection counts against its worker; dropping it lets the worker drain.
#[derive(Debug)]
pub struct Guard {
    upstream: Arc<Upstream>,
    /// Whether a byte has come from the worker on this connection.
    answered: AtomicBool,
    /// Whether the connection ended badly on the worker's side.
    failed: AtomicBool,
}

impl Upstream {
    /// A worker with no connection yet.
    pub fn new(generation: u64, pid: u32, addr: Endpoint) -> Upstream {
        Upstream {
            generation,
            pid,
            addr,
            state: AtomicUsize::new(0),
            idle: Notify::new(),
            cut: Signal::default(),
            unanswered: AtomicUsize::new(0),
            ended: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    /// Connections ended so far, and those that ended badly on the worker's side.
    pub fn tally(&self) -> (u64, u64) {
        (self.ended.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }

    /// Carries on a tally a previous image counted.
    pub fn add_tally(&self, (ended, failed): (u64, u64)) {
        self.ended.fetch_add(ended, Ordering::Relaxed);
        self.failed.fetch_add(failed, Ordering::Relaxed);
    }

    /// Counts a new connection, unless the worker has started to drain.
    pub fn acquire(self: &Arc<Self>) -> Option<Guard> {
        let previous = self.state.fetch_add(1, Ordering::AcqRel);
        if previous & DRAINING != 0 {
            self.release();
            return None;
        }
        self.unanswered.fetch_add(1, Ordering::AcqRel);
        Some(Guard {
            upstream: Arc::clone(self),
            answered: AtomicBool::new(false),
            failed: AtomicBool::new(false),
        })
    }

    fn release(&self) {
        let previous = self.state.fetch_sub(1, Ordering::AcqRel);
        if previous == DRAINING | 1 {
            self.idle.notify_one();
        }
    }

    /// Open connections to this worker.
    pub fn connections(&self) -> usize {
        self.state.load(Ordering::Acquire) & !DRAINING
    }

    /// Whether the worker drains: it takes no new connection.
    pub fn is_draining(&self) -> bool {
        self.state.load(Ordering::Acquire) & DRAINING != 0
    }

    /// Refuses new guards from now on.
    pub fn begin_drain(&self) {
        self.state.fetch_or(DRAINING, Ordering::AcqRel);
    }

    /// Connections the worker has not answered yet.
    pub fn unanswered(&self) -> usize {
        self.unanswered.load(Ordering::Acquire)
    }

    /// Waits until every connection has had a byte from the worker (so the worker has accepted it). A worker
    /// told to stop closes its listening socket, which would reset the connections still in its queue.
    pub async fn settled(&self) {
        while self.unanswered() > 0 {
            tokio::time::sleep(SETTLE_POLL).await;
        }
    }

    /// Refuses new guards and waits until the open connections have closed. The drain's deadline is the
    /// caller's.
    pub async fn closed(&self) {
        self.begin_drain();
        while self.connections() > 0 {
            self.idle.notified().await;
        }
    }

    /// Closes this worker's remaining connections now.
    pub fn cut_now(&self) {
        self.cut.raise();
    }

    /// Whether this worker's connections have been cut.
    pub fn is_cut(&self) -> bool {
        self.cut.is_raised()
    }

    /// Resolves when this worker's remaining connections must close.
    pub fn cut(&self) -> Raised<'_> {
        self.cut.raised()
    }

    /// Counts a connection that was this worker's before it parked (across a handover, say), draining or
    /// not; `answered` says whether the worker had sent it a byte.
    pub fn adopt(self: &Arc<Self>, answered: bool) -> Guard {
        self.state.fetch_add(1, Ordering::AcqRel);
        self.unanswered.fetch_add(1, Ordering::AcqRel);
        let guard = Guard {
            upstream: Arc::clone(self),
            answered: AtomicBool::new(false),
            failed: AtomicBool::new(false),
        };
        if answered {
            guard.answered();
        }
        guard
    }
}

impl Guard {
    /// The worker this guard counts against.
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    /// Whether the worker has sent a byte on this connection.
    pub fn is_answered(&self) -> bool {
        self.answered.load(Ordering::Acquire)
    }

    /// Notes that the connection ended badly on the worker's side (its dial failed, the worker reset it or
    /// closed it before it sent a byte), for a canary's judgement.
    pub fn fail(&self) {
        self.failed.store(true, Ordering::Relaxed);
    }

    /// Notes that the worker has sent a byte on this connection.
    pub fn answered(&self) {
        if !self.answered.swap(true, Ordering::AcqRel) {
            self.upstream.unanswered.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.answered();
        self.upstream.ended.fetch_add(1, Ordering::Relaxed);
        if self.failed.load(Ordering::Relaxed) {
            self.upstream.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.upstream.release();
    }
}

impl Route {
    /// Takes a guard on the current worker of `route`, loading the snapshot again if that worker started to
    /// drain between the load and the guard (the switch has happened, so the next load sees the new one).
    pub fn pick(route: &ArcSwap<Route>, client: Option<std::net::IpAddr>) -> (Arc<Route>, Option<Guard>) {
        loop {
            let snapshot = route.load_full();
            let Some(upstream) = snapshot.upstream.clone() else {
                return (snapshot, None);
            };
            // During a canary, some new connections go to the previous worker.
            if let Some(split) = &snapshot.split {
                let draw = snapshot.shared.draws.fetch_add(1, Ordering::Relaxed);
                if !split.to_new(client, draw) {
                    if let Some(guard) = split.previous.acquire() {
                        return (snapshot, Some(guard));
                    }
                }
            }
            if let Some(guard) = upstream.acquire() {
                return (snapshot, Some(guard));
            }
            // Draining already: a service stores the new route before it drains the old worker, so the next
            // load sees the new one. A route still naming the draining worker has nowhere else to go.
            let current = route.load_full();
            if current.upstream.as_ref().is_none_or(|u| Arc::ptr_eq(u, &upstream)) {
                return (current, None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream() -> Arc<Upstream> {
        Arc::new(Upstream::new(
            1,
            1,
            Endpoint::Tcp("127.0.0.1:1".parse().expect("address")),
        ))
    }

    #[tokio::test]
    async fn a_worker_without_connections_drains_at_once() {
        let worker = upstream();
        worker.closed().await;
        assert!(worker.acquire().is_none(), "a drained worker takes no new connection");
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_waits_for_the_last_guard() {
        let worker = upstream();
        let first = worker.acquire().expect("guard");
        let second = worker.acquire().expect("guard");
        assert_eq!(worker.connections(), 2);
        let drain = tokio::spawn({
            let worker = Arc::clone(&worker);
            async move { worker.closed().await }
        });
        tokio::task::yield_now().await;
        drop(first);
        tokio::task::yield_now().await;
        assert!(!drain.is_finished());
        drop(second);
        drain.await.expect("drain task");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_tells_the_connections_left_to_close() {
        let worker = upstream();
        let _guard = worker.acquire().expect("guard");
        let cut = {
            let worker = Arc::clone(&worker);
            tokio::spawn(async move { worker.cut().await })
        };
        worker.begin_drain();
        assert!(!worker.is_cut());
        worker.cut_now();
        cut.await.expect("the connection was told to close");
        assert_eq!(worker.connections(), 1, "the connection closes itself");
    }

    #[tokio::test(start_paused = true)]
    async fn settled_waits_until_the_worker_has_answered_every_connection() {
        let worker = upstream();
        let guard = worker.acquire().expect("guard");
        worker.begin_drain();
        let settle = tokio::spawn({
            let worker = Arc::clone(&worker);
            async move { worker.settled().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!settle.is_finished(), "a connection is still unanswered");
        assert!(worker.acquire().is_none(), "no new connection once draining");
        guard.answered();
        settle.await.expect("settled");
        assert_eq!(worker.connections(), 1, "answered connections stay open");
    }

    #[test]
    fn pick_moves_to_the_new_worker_once_the_old_one_drains() {
        let shared = Arc::new(Shared::new(crate::metrics::Metrics::new().service("web")));
        let settings = Settings {
            connect_timeout: Duration::from_secs(1),
            pending_timeout: Duration::from_secs(1),
            max_connections: 0,
            idle_timeout: Duration::ZERO,
            half_close_timeout: Duration::from_secs(1),
            resend_unanswered: true,
            proxy_protocol: None,
            accept_proxy_protocol: Vec::new(),
            proxy_protocol_timeout: Duration::from_secs(3),
            max_connections_per_client: 0,
        };
        let old = upstream();
        let route = ArcSwap::from_pointee(Route {
            upstream: Some(Arc::clone(&old)),
            split: None,
            hold: true,
            settings: settings.clone(),
            shared: Arc::clone(&shared),
        });
        let new = Arc::new(Upstream::new(
            2,
            2,
            Endpoint::Tcp("127.0.0.1:2".parse().expect("address")),
        ));
        route.store(Arc::new(Route {
            upstream: Some(Arc::clone(&new)),
            split: None,
            hold: true,
            settings,
            shared,
        }));
        old.state.fetch_or(DRAINING, Ordering::AcqRel);
        let (_, guard) = Route::pick(&route, None);
        assert_eq!(guard.expect("guard").upstream().generation, 2);
    }

    #[tokio::test]
    async fn a_signal_wakes_every_waiter_and_can_be_lowered_and_raised_again() {
        let signal = Arc::new(Signal::default());
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let signal = Arc::clone(&signal);
                tokio::spawn(async move { signal.raised().await })
            })
            .collect();
        tokio::task::yield_now().await;
        signal.raise();
        for waiter in waiters {
            waiter.await.expect("woken");
        }
        signal.lower();
        let raised = signal.raised();
        tokio::pin!(raised);
        assert!(futures_poll(raised.as_mut()).is_pending(), "lowered");
        assert!(futures_poll(raised.as_mut()).is_pending(), "still lowered");
        signal.raise();
        assert!(futures_poll(raised.as_mut()).is_ready(), "raised again");
    }

    /// Polls `future` once with a waker that does nothing.
    fn futures_poll<F: Future>(future: Pin<&mut F>) -> Poll<F::Output> {
        future.poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn admission_stops_at_the_limit_and_frees_a_place_on_drop() {
        let shared = Shared::new(crate::metrics::Metrics::new().service("web"));
        let first = shared.admit(2).expect("first");
        let _second = shared.admit(2).expect("second");
        assert!(shared.admit(2).is_none(), "a third is over the limit");
        drop(first);
        assert!(shared.admit(2).is_some(), "a place is free again");
        assert!(shared.admit(0).is_some(), "zero means no limit");
    }
}
