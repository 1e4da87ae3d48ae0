//! One proxied connection: pick the route, dial the worker, copy both ways, pass half-closes and resets on.
//!
//! A connection loads its service's route once and stays with the worker it dialled until it ends or that
//! worker's drain deadline cuts it. This module never looks at configuration or processes; failures are
//! logged at debug and counted in metrics, never raised.

use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::IntCounter;
use socket2::SockRef;
use tokio::net::{TcpStream, UnixStream};

use crate::metrics::Side;
use crate::route::{Guard, Route, WorkerAddr};

/// Bytes read from one side before they are written to the other.
pub const BUFFER_SIZE: usize = 64 * 1024;

/// How a proxied connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions reached end of stream.
    Completed,
    /// No worker could take the connection.
    NoWorker,
    /// Dialling the worker failed or timed out.
    ConnectFailed,
    /// One side failed (reset, broken pipe); the other was reset too.
    Broken(Side),
    /// The worker's drain deadline passed.
    Cut,
}

/// Serves one accepted client connection of the service whose route is `route`.
pub async fn serve(client: TcpStream, route: &ArcSwap<Route>) -> Outcome {
    let (snapshot, guard) = Route::pick(route);
    let metrics = &snapshot.metrics;
    metrics.accepted.inc();
    let Some(guard) = guard else {
        metrics.rejected_no_worker.inc();
        reset(&client);
        return Outcome::NoWorker;
    };
    let _ = client.set_nodelay(true);
    let upstream = guard.upstream();
    let outcome = match &upstream.addr {
        WorkerAddr::Tcp(addr) => match dial(TcpStream::connect(addr), snapshot.connect_timeout).await {
            Ok(worker) => {
                let _ = worker.set_nodelay(true);
                relay(&client, &worker, &snapshot, &guard).await
            }
            Err(e) => connect_failed(&client, &snapshot, &guard, e),
        },
        WorkerAddr::Unix(path) => match dial(UnixStream::connect(path), snapshot.connect_timeout).await {
            Ok(worker) => relay(&client, &worker, &snapshot, &guard).await,
            Err(e) => connect_failed(&client, &snapshot, &guard, e),
        },
    };
    drop(guard);
    outcome
}

async fn dial<S>(connect: impl Future<Output = io::Result<S>>, timeout: Duration) -> io::Result<S> {
    tokio::time::timeout(timeout, connect)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

fn connect_failed(client: &TcpStream, route: &Route, guard: &Guard, error: io::Error) -> Outcome {
    let upstream = guard.upstream();
    tracing::debug!(generation = upstream.generation, worker = %upstream.addr, %error, "cannot dial worker");
    route.metrics.worker_connect_errors.inc();
    reset(client);
    Outcome::ConnectFailed
}

async fn relay<W: Socket>(client: &TcpStream, worker: &W, route: &Route, guard: &Guard) -> Outcome {
    let metrics = &route.metrics;
    let to_worker = copy((client, Side::Client), (worker, Side::Worker), &metrics.bytes_to_worker);
    let to_client = copy((worker, Side::Worker), (client, Side::Client), &metrics.bytes_to_client);
    tokio::select! {
        result = async { tokio::try_join!(to_worker, to_client) } => match result {
            Ok(_) => Outcome::Completed,
            Err(Failure { side, error }) => {
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
                Outcome::Broken(side)
            }
        },
        () = guard.upstream().cut() => {
            metrics.drain_cut.inc();
            Outcome::Cut
        }
    }
}

/// A failed copy, tagged with the side whose socket failed.
#[derive(Debug)]
struct Failure {
    side: Side,
    error: io::Error,
}

/// Copies `src` to `dst` until `src` ends, then shuts down writing on `dst`. The buffer is allocated only
/// once `src` has something to read, so an idle connection holds none.
async fn copy<R: Socket, W: Socket>(
    (src, src_side): (&R, Side),
    (dst, dst_side): (&W, Side),
    counter: &IntCounter,
) -> Result<u64, Failure> {
    let read_failed = |error| Failure { side: src_side, error };
    let mut total = 0u64;
    let mut buffer: Option<Box<[u8]>> = None;
    loop {
        let buf = match &mut buffer {
            Some(buf) => buf,
            None => {
                src.readable().await.map_err(read_failed)?;
                buffer.insert(vec![0; BUFFER_SIZE].into_boxed_slice())
            }
        };
        match src.try_read(buf) {
            Ok(0) => {
                // A peer that is gone already does not need our FIN.
                let _ = SockRef::from(dst).shutdown(Shutdown::Write);
                return Ok(total);
            }
            Ok(n) => {
                write_all(dst, &buf[..n])
                    .await
                    .map_err(|error| Failure { side: dst_side, error })?;
                counter.inc_by(n as u64);
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => src.readable().await.map_err(read_failed)?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_failed(e)),
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

/// Closes `socket` with a reset when it is dropped, so its peer learns that the other side failed.
fn reset(socket: &impl AsFd) {
    let _ = SockRef::from(socket).set_linger(Some(Duration::ZERO));
}

/// The non-blocking socket operations the copy loop needs, for both TCP and Unix sockets.
trait Socket: AsFd + Sync {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send;
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
}

macro_rules! socket {
    ($type:ty) => {
        impl Socket for $type {
            fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
                <$type>::readable(self)
            }
            fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
                <$type>::writable(self)
            }
            fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
                <$type>::try_read(self, buf)
            }
            fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
                <$type>::try_write(self, buf)
            }
        }
    };
}

socket!(TcpStream);
socket!(UnixStream);
