//! The admin HTTP API (hyper): `/healthz`, `/status`, `/metrics` and the reload action.
//!
//! It reads the state services publish and sends commands through [`Control`]; it never touches a worker or
//! a route itself. Every answer is JSON except `/metrics`; every error has an `error` field. Request bodies are
//! never read, so a client cannot make it hold memory.

use std::convert::Infallible;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::control::{Command, Control};

/// How long a client may take to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the admin API on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, control: Control) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(crate::listener::ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let control = control.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let control = control.clone();
                async move { Ok::<_, Infallible>(route(request, &control).await) }
            });
            let _ = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
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
        ("/v1/reload", &Method::POST) => reload(control).await,
        ("/healthz" | "/status" | "/v1/status" | "/metrics" | "/v1/reload", _) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {method} is not allowed on {path}"),
        ),
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    }
}

async fn reload(control: &Control) -> Response<Full<Bytes>> {
    let (reply, outcome) = oneshot::channel();
    if control
        .commands
        .send(Command::Reload { reply: Some(reply) })
        .await
        .is_err()
    {
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
