//! Probes of a worker's private socket: an HTTP GET (hyper client) or a plain connect.
//!
//! [`wait_ready`] polls until the worker answers or the deadline passes; the service's lifecycle sees the
//! worker's exit on its own and fails the upgrade at once then. Nothing here changes routing.

use std::io;
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use tokio::io::AsyncWriteExt;

use crate::config::Readiness;
use crate::endpoint::{Endpoint, Stream};
use crate::proxy_protocol::Version;

/// The longest one probe may take, whatever the interval.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a worker was not found ready.
#[derive(Debug, thiserror::Error)]
pub enum ReadinessError {
    /// The deadline passed.
    #[error("not ready after {} (last probe: {last})", humantime::format_duration(*.after))]
    Timeout {
        /// The readiness timeout.
        after: Duration,
        /// What the last probe saw.
        last: String,
    },
}

/// What one probe saw, when it was not a success.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The connection failed.
    #[error("connect: {0}")]
    Connect(#[source] io::Error),
    /// The HTTP exchange failed.
    #[error("http: {0}")]
    Http(#[source] hyper::Error),
    /// The answer was not 2xx.
    #[error("status {0}")]
    Status(hyper::StatusCode),
    /// The probe took longer than [`PROBE_TIMEOUT`].
    #[error("no answer within {}", humantime::format_duration(PROBE_TIMEOUT))]
    Timeout,
}

/// Polls the worker at `addr` every `readiness.interval` until a probe succeeds, or fails at `deadline`.
/// Each probe begins with a PROXY protocol header of version `proxy` if there is one (see [`probe`]).
pub async fn wait_ready(
    addr: &Endpoint,
    readiness: &Readiness,
    proxy: Option<Version>,
    deadline: Instant,
) -> Result<(), ReadinessError> {
    let mut last = String::from("no probe yet");
    let poll = async {
        loop {
            let next = Instant::now() + readiness.interval;
            let probe_deadline = (Instant::now() + PROBE_TIMEOUT).min(deadline);
            match tokio::time::timeout_at(probe_deadline, probe(addr, readiness.path.as_deref(), proxy)).await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => last = e.to_string(),
                // A probe cut by the overall deadline says nothing new: keep what the one before saw.
                Err(_) if probe_deadline < deadline => last = ProbeError::Timeout.to_string(),
                Err(_) => {}
            }
            tokio::time::sleep_until(next).await;
        }
    };
    match tokio::time::timeout_at(deadline, poll).await {
        Ok(()) => Ok(()),
        Err(_) => Err(ReadinessError::Timeout {
            after: readiness.timeout,
            last,
        }),
    }
}

/// One probe: a connect, then a GET of `path` when there is one. A worker that reads the PROXY protocol
/// gets a header first (version `proxy`), one that names no client: v2 `LOCAL`, v1 `UNKNOWN`.
pub async fn probe(addr: &Endpoint, path: Option<&str>, proxy: Option<Version>) -> Result<(), ProbeError> {
    let mut stream = addr.connect().await.map_err(ProbeError::Connect)?;
    if let Some(version) = proxy {
        let header = crate::proxy_protocol::encode(version, None, &[]);
        stream.write_all(&header).await.map_err(ProbeError::Connect)?;
    }
    match path {
        Some(path) => http_get(stream, path).await,
        None => Ok(()),
    }
}

async fn http_get(stream: Stream, path: &str) -> Result<(), ProbeError> {
    let (mut sender, connection) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(ProbeError::Http)?;
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, "localhost")
        .header(hyper::header::USER_AGENT, concat!("baton/", env!("CARGO_PKG_VERSION")))
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::new())
        .expect("a GET of a validated path is a valid request");
    let send = sender.send_request(request);
    tokio::pin!(connection, send);
    let response = tokio::select! {
        biased;
        response = &mut send => response.map_err(ProbeError::Http)?,
        // With `Connection: close` the connection may end as the response arrives; the response is still there.
        closed = &mut connection => {
            closed.map_err(ProbeError::Http)?;
            send.await.map_err(ProbeError::Http)?
        }
    };
    if response.status().is_success() {
        Ok(())
    } else {
        Err(ProbeError::Status(response.status()))
    }
}
