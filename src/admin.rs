//! The admin HTTP API (hyper): `/healthz`, `/status`, `/metrics` and the reload action, on TCP or a Unix
//! socket, behind a bearer token when one is configured.
//!
//! It reads the state services publish and sends commands through [`Control`]; it never touches a worker or
//! a route itself. Every answer is JSON except `/metrics`; every error has an `error` field. Request bodies are
//! never read, so a client cannot make it hold memory.

use std::convert::Infallible;
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, ORIGIN, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::{oneshot, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use crate::control::{ActionError, Command, Control, ReloadScope, UpgradeResult};
use crate::endpoint::{self, Stream};

/// How long a client may take to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the admin API on `listener` until the task is aborted.
pub async fn serve(listener: endpoint::Listener, control: Control) {
    loop {
        let connection = match listener.accept().await {
            Ok(connection) => connection,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(crate::listener::ACCEPT_BACKOFF).await;
                continue;
            }
        };
        tokio::spawn(serve_connection(connection, control.clone()));
    }
}

async fn serve_connection(stream: Stream, control: Control) {
    // Dropped when the connection is over: the answer to its last request has been written.
    let (open, connection) = watch::channel(());
    let service = service_fn(move |mut request: Request<Incoming>| {
        let control = control.clone();
        request.extensions_mut().insert(Connection(connection.clone()));
        async move { Ok::<_, Infallible>(authorized(request, &control).await) }
    });
    let _ = http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    drop(open);
}

/// Closes (its sender drops) when the admin connection a request came on is over.
#[derive(Debug, Clone)]
struct Connection(watch::Receiver<()>);

/// Checks the bearer token, when one is configured, on every request but `/healthz`.
async fn authorized(request: Request<Incoming>, control: &Control) -> Response<Body> {
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

/// The body of every admin response: whole, or the event stream.
type Body = BoxBody<Bytes, Infallible>;

async fn route(request: Request<Incoming>, control: &Control) -> Response<Body> {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    let query = match Query::parse(request.uri().query()) {
        Ok(query) => query,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let bad_request = |message: String| error(StatusCode::BAD_REQUEST, message);
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (segments.as_slice(), &method) {
        (["healthz"], &Method::GET) => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        (["status"] | ["v1", "status"], &Method::GET) => json(StatusCode::OK, &control.status()),
        (["v1", "state"], &Method::GET) => state(control).await,
        (["metrics"], &Method::GET) => {
            let mut response = Response::new(Full::new(Bytes::from(control.metrics_text())).boxed());
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        (["v1", "events"], &Method::GET) => match query.only(&["service"]) {
            Ok(()) => events(control, query.get("service")),
            Err(message) => bad_request(message),
        },
        (["v1", "reload"], &Method::POST) => {
            let scope = match query.get("upgrade") {
                None | Some("all") => ReloadScope::All,
                Some("changed") => ReloadScope::Changed,
                Some(other) => {
                    return bad_request(format!(
                        "upgrade={other} is unknown: use upgrade=all or upgrade=changed"
                    ));
                }
            };
            match query.only(&["upgrade", "wait"]).and_then(|()| query.wait()) {
                Ok(_) if has_body(&request) => bad_request(format!("{path} takes no request body")),
                Ok(wait) => reload(control, scope, wait).await,
                Err(message) => bad_request(message),
            }
        }
        (["v1", "reexec"], &Method::POST) => {
            let timeout = match query.get("check_timeout").map(humantime::parse_duration) {
                None => Ok(crate::reexec::CHECK_TIMEOUT),
                Some(Ok(timeout)) if !timeout.is_zero() && timeout <= MAX_CHECK_TIMEOUT => Ok(timeout),
                Some(_) => Err(format!(
                    "check_timeout={} is not a duration between 1ms and {}",
                    query.get("check_timeout").unwrap_or_default(),
                    humantime::format_duration(MAX_CHECK_TIMEOUT)
                )),
            };
            let binary = query.get("binary").map(std::path::PathBuf::from);
            let connection = request.extensions().get::<Connection>().map(|c| c.0.clone());
            match query.only(&["binary", "check_timeout"]).and(timeout) {
                Ok(_) if has_body(&request) => bad_request(format!("{path} takes no request body")),
                Ok(_) if binary.as_ref().is_some_and(|b| !b.is_absolute()) => {
                    bad_request("binary must be an absolute path".into())
                }
                Ok(timeout) => reexec(control, binary, timeout, connection).await,
                Err(message) => bad_request(message),
            }
        }
        (["v1", "services", name, action @ ("upgrade" | "rollback" | "promote")], &Method::POST) => {
            if !control.directory.borrow().contains_key(*name) {
                return error(StatusCode::NOT_FOUND, format!("no service `{name}`"));
            }
            let allowed: &[&str] = if *action == "rollback" {
                &["wait", "to"]
            } else {
                &["wait"]
            };
            let to = match query.get("to").map(str::parse::<u64>) {
                None => None,
                Some(Ok(to)) => Some(to),
                Some(Err(_)) => return bad_request("to must be a generation number".into()),
            };
            match query.only(allowed).and_then(|()| query.wait()) {
                Ok(_) if has_body(&request) => bad_request(format!("{path} takes no request body")),
                Ok(wait) => action_on(control, name, action, to, wait).await,
                Err(message) => bad_request(message),
            }
        }
        (["v1", "services", name, "releases"], &Method::GET) => match query.only(&[]) {
            Ok(()) => releases(control, name).await,
            Err(message) => bad_request(message),
        },
        (
            ["healthz"]
            | ["status"]
            | ["v1", "status"]
            | ["metrics"]
            | ["v1", "events"]
            | ["v1", "services", _, "releases"],
            _,
        ) => not_allowed(&method, &path, "GET"),
        (["v1", "reload"] | ["v1", "reexec"] | ["v1", "services", _, "upgrade" | "rollback" | "promote"], _) => {
            not_allowed(&method, &path, "POST")
        }
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    }
}

/// The longest a new binary's check may be given.
const MAX_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// The parameters of a query string, `a=b&c=d`, percent-decoded.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: Option<&str>) -> Result<Query, String> {
        let mut pairs = Vec::new();
        for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let malformed = || {
                format!(
                    "malformed query parameter `{}`",
                    pair.chars().take(80).collect::<String>()
                )
            };
            if key.is_empty() || key.len() > 64 || value.len() > 4096 {
                return Err(malformed());
            }
            let decode = |text: &str| {
                percent_encoding::percent_decode_str(text)
                    .decode_utf8()
                    .map(|t| t.into_owned())
                    .map_err(|_| malformed())
            };
            pairs.push((decode(key)?, decode(value)?));
        }
        Ok(Query(pairs))
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Refuses parameters other than `allowed`.
    fn only(&self, allowed: &[&str]) -> Result<(), String> {
        match self.0.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
            None => Ok(()),
            Some((key, _)) => Err(format!("unknown query parameter `{key}`")),
        }
    }

    /// `wait=true` (the default) or `wait=false`.
    fn wait(&self) -> Result<bool, String> {
        match self.get("wait") {
            None | Some("true" | "1") => Ok(true),
            Some("false" | "0") => Ok(false),
            Some(other) => Err(format!("wait={other} is not a boolean: use wait=true or wait=false")),
        }
    }
}

fn has_body(request: &Request<Incoming>) -> bool {
    let headers = request.headers();
    headers.contains_key(hyper::header::TRANSFER_ENCODING)
        || headers
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}

fn not_allowed(method: &Method, path: &str, allowed: &'static str) -> Response<Body> {
    let mut response = error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed on {path}: use {allowed}"),
    );
    response
        .headers_mut()
        .insert(hyper::header::ALLOW, HeaderValue::from_static(allowed));
    response
}

/// `POST /v1/services/{name}/upgrade|rollback`: the outcome as JSON, 200 when the new worker took over (or the
/// warm rollback happened), 502 when the upgrade (or the start of an earlier release) failed or was rolled
/// back, 409 when there is nothing to roll back to.
async fn action_on(control: &Control, name: &str, action: &str, to: Option<u64>, wait: bool) -> Response<Body> {
    let (reply, outcome) = oneshot::channel();
    let service = name.to_owned();
    let command = match action {
        "upgrade" => Command::Upgrade { service, reply },
        "promote" => Command::Promote { service, reply },
        _ => Command::Rollback { service, to, reply },
    };
    if control.commands.send(command).await.is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "baton is shutting down".into());
    }
    if !wait {
        return json(
            StatusCode::ACCEPTED,
            &serde_json::json!({"service": name, "action": action, "accepted": true}),
        );
    }
    match outcome.await {
        Ok(Ok(record)) => {
            // A rollback in the watchdog window is recorded `rolled_back`; one after it is an upgrade.
            let status = match (action, record.result) {
                ("rollback", UpgradeResult::RolledBack) | ("promote", _) | (_, UpgradeResult::Success) => {
                    StatusCode::OK
                }
                _ => StatusCode::BAD_GATEWAY,
            };
            json(status, &record)
        }
        Ok(Err(ActionError::NotFound(name))) => error(StatusCode::NOT_FOUND, format!("no service `{name}`")),
        Ok(Err(e @ ActionError::Conflict(_))) => error(StatusCode::CONFLICT, e.to_string()),
        Ok(Err(ActionError::ShuttingDown)) | Err(_) => {
            error(StatusCode::SERVICE_UNAVAILABLE, "baton is shutting down".into())
        }
    }
}

/// `GET /v1/services/{name}/releases`: the releases the service remembers, newest first.
async fn releases(control: &Control, name: &str) -> Response<Body> {
    let (reply, releases) = oneshot::channel();
    let command = Command::Releases {
        service: name.to_owned(),
        reply,
    };
    if control.commands.send(command).await.is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "baton is shutting down".into());
    }
    match releases.await {
        Ok(Ok(releases)) => json(
            StatusCode::OK,
            &serde_json::json!({"service": name, "releases": releases}),
        ),
        Ok(Err(ActionError::NotFound(name))) => error(StatusCode::NOT_FOUND, format!("no service `{name}`")),
        Ok(Err(e)) => error(StatusCode::CONFLICT, e.to_string()),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "baton is shutting down".into()),
    }
}

async fn reload(control: &Control, scope: ReloadScope, wait: bool) -> Response<Body> {
    let (reply, outcome) = oneshot::channel();
    let command = Command::Reload { scope, wait, reply };
    if control.commands.send(command).await.is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "baton is shutting down".into());
    }
    match outcome.await {
        Ok(Ok(services)) => json(
            StatusCode::OK,
            &serde_json::json!({"result": "applied", "services": services}),
        ),
        Ok(Err(message)) => error(StatusCode::BAD_REQUEST, message),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "baton is shutting down".into()),
    }
}

/// `POST /v1/reexec`: 200 once the new binary has passed its check, with what the hand-over starts with (the
/// outcome is `/status`'s `last_reexec` once the new image runs); 422 with the reason when it was refused.
async fn reexec(
    control: &Control,
    binary: Option<std::path::PathBuf>,
    check_timeout: std::time::Duration,
    answered: Option<watch::Receiver<()>>,
) -> Response<Body> {
    let (reply, outcome) = oneshot::channel();
    let command = Command::Reexec {
        binary,
        check_timeout,
        reply,
        answered,
    };
    if control.commands.send(command).await.is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "baton is shutting down".into());
    }
    match outcome.await {
        Ok(Ok(accepted)) => {
            let mut response = json(StatusCode::OK, &accepted);
            // The process is about to become another image: nothing more comes on this connection.
            response
                .headers_mut()
                .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
        Ok(Err(message)) => error(StatusCode::UNPROCESSABLE_ENTITY, message),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "baton is shutting down".into()),
    }
}

/// `GET /v1/state`: the daemon's whole state, the document a handover to a new baton carries.
async fn state(control: &Control) -> Response<Body> {
    let (reply, answer) = oneshot::channel();
    if control.commands.send(Command::State { reply }).await.is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "baton is shutting down".into());
    }
    match answer.await {
        Ok(Ok(document)) => {
            let mut response = Response::new(Full::new(Bytes::from(document)).boxed());
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Ok(Err(message)) => error(StatusCode::INTERNAL_SERVER_ERROR, message),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "baton is shutting down".into()),
    }
}

/// `GET /v1/events`: newline-delimited JSON, one event a line, from now on; the first line says the stream
/// is live. A listener too slow to keep up gets a `lagged` event with the number it missed.
fn events(control: &Control, service: Option<&str>) -> Response<Body> {
    let receiver = control.events.subscribe();
    let service = service.map(|s| format!("\"service\":{}", serde_json::Value::from(s)));
    let first = serde_json::json!({"event": "subscribed", "time": crate::control::unix_now()}).to_string();
    let live = BroadcastStream::new(receiver).filter_map(move |item| match item {
        Ok(line) => match &service {
            Some(service) if !line.contains(service.as_str()) => None,
            _ => Some(line.to_string()),
        },
        Err(BroadcastStreamRecvError::Lagged(missed)) => {
            Some(serde_json::json!({"event": "lagged", "missed": missed}).to_string())
        }
    });
    let lines = tokio_stream::once(first)
        .chain(live)
        .map(|line| Ok::<_, Infallible>(Frame::data(Bytes::from(line + "\n"))));
    let mut response = Response::new(StreamBody::new(lines).boxed());
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    response
        .headers_mut()
        .insert(hyper::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn json(status: StatusCode, body: &impl serde::Serialize) -> Response<Body> {
    let mut text = serde_json::to_vec_pretty(body).unwrap_or_else(|_| b"{}".to_vec());
    text.push(b'\n');
    let mut response = Response::new(Full::new(Bytes::from(text)).boxed());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error(status: StatusCode, message: String) -> Response<Body> {
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
