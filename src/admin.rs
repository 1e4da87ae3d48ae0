//! The admin HTTP API (hyper): `/healthz`, `/status`, `/metrics` and the reload action, on TCP or a Unix
//! socket, behind a bearer token when one is configured.
//!
//! It reads the state services publish and sends commands through [`Control`]; it never touches a worker or
//! a route itself. Every answer is JSON except `/metrics`; every error has an `error` field. Request bodies are
//! never read, so a client cannot make it hold memory.

use std::convert::Infallible;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, ORIGIN, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::oneshot;

use crate::config::AdminAddr;
use crate::control::{Command, Control, ReloadScope};

/// How long a client may take to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The admin API's listening socket.
#[derive(Debug)]
pub enum AdminListener {
    /// A TCP socket.
    Tcp(TcpListener),
    /// A Unix socket, removed when dropped.
    Unix(UnixAdmin),
}

/// A Unix admin socket and its path.
#[derive(Debug)]
pub struct UnixAdmin {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for UnixAdmin {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl AdminListener {
    /// Binds `addr`. A Unix socket is created with mode 0600 before it appears at its path, and replaces a
    /// stale socket left there (never a file of another kind).
    pub fn bind(addr: &AdminAddr) -> io::Result<AdminListener> {
        match addr {
            AdminAddr::Tcp(addr) => {
                let listener = std::net::TcpListener::bind(addr)?;
                listener.set_nonblocking(true)?;
                Ok(AdminListener::Tcp(TcpListener::from_std(listener)?))
            }
            AdminAddr::Unix(path) => {
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    if !meta.file_type().is_socket() {
                        return Err(io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            "a file that is not a socket is in the way",
                        ));
                    }
                }
                let staging = path.with_extension(format!("{}.tmp", std::process::id()));
                let _ = std::fs::remove_file(&staging);
                let listener = std::os::unix::net::UnixListener::bind(&staging)?;
                std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))?;
                std::fs::rename(&staging, path)?;
                listener.set_nonblocking(true)?;
                Ok(AdminListener::Unix(UnixAdmin {
                    listener: UnixListener::from_std(listener)?,
                    path: path.clone(),
                }))
            }
        }
    }

    /// The address actually bound, for the log.
    pub fn local(&self) -> String {
        match self {
            AdminListener::Tcp(l) => l.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
            AdminListener::Unix(u) => format!("unix:{}", u.path.display()),
        }
    }
}

/// Serves the admin API on `listener` until the task is aborted.
pub async fn serve(listener: AdminListener, control: Control) {
    loop {
        let accepted = match &listener {
            AdminListener::Tcp(l) => l.accept().await.map(|(s, _)| Connection::Tcp(s)),
            AdminListener::Unix(u) => u.listener.accept().await.map(|(s, _)| Connection::Unix(s)),
        };
        let connection = match accepted {
            Ok(connection) => connection,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(crate::listener::ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let control = control.clone();
        tokio::spawn(async move {
            match connection {
                Connection::Tcp(stream) => serve_connection(stream, control).await,
                Connection::Unix(stream) => serve_connection(stream, control).await,
            }
        });
    }
}

enum Connection {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn serve_connection<S>(stream: S, control: Control)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request| {
        let control = control.clone();
        async move { Ok::<_, Infallible>(authorized(request, &control).await) }
    });
    let _ = http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// Checks the bearer token, when one is configured, on every request but `/healthz`.
async fn authorized(request: Request<Incoming>, control: &Control) -> Response<Full<Bytes>> {
    // Browsers send Origin with every cross-site POST; scripts and the CLI do not. Refusing it keeps a web
    // page from reloading baton through a visitor's loopback.
    if request.method() == Method::POST && request.headers().contains_key(ORIGIN) {
        return error(StatusCode::FORBIDDEN, "requests from a web page are refused".into());
    }
    if request.uri().path() != "/healthz" {
        if let Some(token) = control.token.load().as_deref() {
            let presented = request
                .headers()
                .get(AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or_default();
            if !constant_time_eq(presented.as_bytes(), token.as_bytes()) {
                let mut response = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token".into());
                response
                    .headers_mut()
                    .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return response;
            }
        }
    }
    route(request, control).await
}

/// Compares two byte strings in time that depends on their length only, not on where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn route(request: Request<Incoming>, control: &Control) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    let method = request.method();
    match (path, method) {
        ("/healthz", &Method::GET) => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        ("/status" | "/v1/status", &Method::GET) => json(StatusCode::OK, &control.status()),
        ("/metrics", &Method::GET) => {
            let mut response = Response::new(Full::new(Bytes::from(control.metrics_text())));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        ("/v1/reload", &Method::POST) => match request.uri().query().unwrap_or_default() {
            "" | "upgrade=all" => reload(control, ReloadScope::All).await,
            "upgrade=changed" => reload(control, ReloadScope::Changed).await,
            other => error(
                StatusCode::BAD_REQUEST,
                format!("unknown query `{other}`: use upgrade=all or upgrade=changed"),
            ),
        },
        ("/healthz" | "/status" | "/v1/status" | "/metrics" | "/v1/reload", _) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {method} is not allowed on {path}"),
        ),
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    }
}

async fn reload(control: &Control, scope: ReloadScope) -> Response<Full<Bytes>> {
    let (reply, outcome) = oneshot::channel();
    let command = Command::Reload {
        scope,
        reply: Some(reply),
    };
    if control.commands.send(command).await.is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "baton is shutting down".into());
    }
    match outcome.await {
        Ok(Ok(())) => json(StatusCode::OK, &serde_json::json!({"result": "applied"})),
        Ok(Err(message)) => error(StatusCode::BAD_REQUEST, message),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "baton is shutting down".into()),
    }
}

fn json(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let mut text = serde_json::to_vec_pretty(body).unwrap_or_else(|_| b"{}".to_vec());
    text.push(b'\n');
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error(status: StatusCode, message: String) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": message }))
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"secret"));
    }
}
