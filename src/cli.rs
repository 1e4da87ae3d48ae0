//! The operator's commands (`status`, `upgrade`, `rollback`, `releases`, `reload`, `reexec`): a client of the
//! admin API.
//!
//! It finds the API from the configuration file (or `--admin`), speaks HTTP/1.1 over TCP or a Unix socket
//! with hyper, and prints what happens as it happens: on a terminal a drain countdown updates in place,
//! elsewhere every step is a plain line. It never touches the daemon's state but through the API.

use std::fmt::Write as _;
use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::endpoint::{Endpoint, Stream};

/// How long to wait for the admin API to accept a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a command could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The configuration file that names the admin API is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// `--admin` is not an address.
    #[error("--admin `{0}` is not an address like 127.0.0.1:9900 or unix:/path")]
    BadAddress(String),
    /// Nobody answers at the admin address.
    #[error("admin API not reachable at {addr}")]
    Unreachable {
        /// Where it was looked for.
        addr: Endpoint,
        /// Why the connection failed.
        #[source]
        source: io::Error,
    },
    /// The exchange failed half-way.
    #[error("admin API at {addr}: {message}")]
    Protocol {
        /// Where.
        addr: Endpoint,
        /// What went wrong.
        message: String,
    },
    /// The token file could not be read.
    #[error("token file {}", path.display())]
    Token {
        /// The file.
        path: PathBuf,
        /// What the read returned.
        #[source]
        source: io::Error,
    },
    /// The API answered with an error.
    #[error("{0}")]
    Refused(String),
}

/// A connection to the admin API.
#[derive(Debug, Clone)]
pub struct Client {
    addr: Endpoint,
    token: Option<String>,
}

impl Client {
    /// The API named by `admin` (`host:port` or `unix:/path`), else by the configuration at `config`.
    pub fn locate(
        config: &std::path::Path,
        admin: Option<&str>,
        token_file: Option<PathBuf>,
    ) -> Result<Client, CliError> {
        let (addr, configured_token) = match admin {
            Some(text) => {
                let addr = text.parse().map_err(|_| CliError::BadAddress(text.to_owned()))?;
                (addr, None)
            }
            None => {
                let config = Config::load(config)?;
                (config.admin.listen, config.admin.token_file)
            }
        };
        let token = match token_file.or(configured_token) {
            Some(path) => Some(
                std::fs::read_to_string(&path)
                    .map_err(|source| CliError::Token { path, source })?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        Ok(Client { addr, token })
    }

    /// Sends a request without a body and returns the answer, its body unread.
    async fn send(&self, method: Method, path: &str) -> Result<Response<Incoming>, CliError> {
        let unreachable = |source| CliError::Unreachable {
            addr: self.addr.clone(),
            source,
        };
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "baton");
        if let Some(token) = &self.token {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request.body(Empty::<Bytes>::new()).map_err(|e| self.protocol(e))?;
        let connect = async { handshake(self.addr.connect().await?).await };
        let mut sender = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
            .map_err(unreachable)?;
        sender.send_request(request).await.map_err(|e| self.protocol(e))
    }

    /// Sends a request and reads the whole JSON answer.
    pub async fn call(&self, method: Method, path: &str) -> Result<(StatusCode, Value), CliError> {
        let response = self.send(method, path).await?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| self.protocol(e))?
            .to_bytes();
        let value = serde_json::from_slice(&body).map_err(|e| self.protocol(format!("not JSON ({e})")))?;
        Ok((status, value))
    }

    /// Streams `/v1/events` for `service`: the events arrive on the returned channel, the first once the
    /// stream is live.
    pub async fn events(&self, service: &str) -> Result<mpsc::UnboundedReceiver<Value>, CliError> {
        let path = format!("/v1/events?service={service}");
        let response = self.send(Method::GET, &path).await?;
        if !response.status().is_success() {
            return Err(self.protocol(format!("events: status {}", response.status())));
        }
        let (events, received) = mpsc::unbounded_channel();
        let mut body = response.into_body();
        tokio::spawn(async move {
            let mut pending = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                let Ok(data) = frame.into_data() else { continue };
                pending.extend_from_slice(&data);
                while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    if let Ok(event) = serde_json::from_slice::<Value>(&line) {
                        if events.send(event).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(received)
    }

    fn protocol(&self, error: impl std::fmt::Display) -> CliError {
        CliError::Protocol {
            addr: self.addr.clone(),
            message: error.to_string(),
        }
    }
}

async fn handshake(stream: Stream) -> io::Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> {
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(connection);
    Ok(sender)
}

/// `baton status`: a table per service, or the raw JSON.
pub async fn status(client: &Client, json: bool) -> Result<(), CliError> {
    let (code, status) = client.call(Method::GET, "/v1/status").await?;
    refused(code, &status)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status).unwrap_or_default());
        return Ok(());
    }
    let mut table = vec![
        [
            "SERVICE",
            "GEN",
            "PID",
            "PHASE",
            "UPTIME",
            "ACTIVE",
            "DRAINING",
            "HEALTH",
            "LAST UPGRADE",
        ]
        .map(String::from),
    ];
    for (name, service) in status["services"].as_object().into_iter().flatten() {
        let draining: Vec<String> = service["draining"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(service["previous"].as_object().map(|_| &service["previous"]))
            .map(|d| format!("g{}:{}", d["generation"], d["active_connections"]))
            .collect();
        let last = &service["last_upgrade"];
        let last = match last["result"].as_str() {
            Some(result) => format!("{result} (g{})", last["new_generation"]),
            None => "-".into(),
        };
        let health = match (service["healthy"].as_bool(), service["restart_in_ms"].as_u64()) {
            (_, Some(ms)) => format!("restart in {ms} ms"),
            (Some(true), _) => "healthy".into(),
            _ => "unhealthy".into(),
        };
        table.push([
            name.clone(),
            text(&service["generation"]),
            text(&service["pid"]),
            text(&service["phase"]),
            service["worker_uptime_seconds"].as_f64().map_or_else(
                || "-".into(),
                |s| humantime::format_duration(Duration::from_secs(s as u64)).to_string(),
            ),
            text(&service["active_connections"]),
            if draining.is_empty() {
                "-".into()
            } else {
                draining.join(" ")
            },
            health,
            last,
        ]);
    }
    print_table(&table);
    Ok(())
}

/// Prints `table` with its columns aligned.
fn print_table<const N: usize>(table: &[[String; N]]) {
    let widths: Vec<usize> = (0..N)
        .map(|i| table.iter().map(|row| row[i].chars().count()).max().unwrap_or(0))
        .collect();
    for row in table {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        println!("{}", line.trim_end());
    }
}

/// `baton promote SERVICE`: ends the service's canary: its new worker takes every new connection now.
pub async fn promote(client: &Client, service: &str) -> Result<(), CliError> {
    let (code, record) = client
        .call(Method::POST, &format!("/v1/services/{service}/promote"))
        .await?;
    if code != StatusCode::OK {
        return Err(CliError::Refused(error_text(&record)));
    }
    println!(
        "promoted {service}: generation {} takes every new connection",
        text(&record["new_generation"])
    );
    Ok(())
}

/// `baton releases SERVICE`: the releases the service remembers, newest first.
pub async fn releases(client: &Client, service: &str, json: bool) -> Result<(), CliError> {
    let (code, answer) = client
        .call(Method::GET, &format!("/v1/services/{service}/releases"))
        .await?;
    refused(code, &answer)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&answer).unwrap_or_default());
        return Ok(());
    }
    let when = |v: &Value| {
        v.as_f64().map_or_else(
            || "-".to_owned(),
            |t| {
                let ago = (crate::control::unix_now() - t).max(0.0);
                format!("{} ago", humantime::format_duration(Duration::from_secs(ago as u64)))
            },
        )
    };
    let mut table = vec![["GEN", "RELEASE", "STARTED", "ENDED", "OUTCOME"].map(String::from)];
    for release in answer["releases"].as_array().into_iter().flatten() {
        let command: Vec<&str> = release["command"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let mut outcome = release["outcome"].as_str().unwrap_or("-").to_owned();
        if let Some(from) = release["from"].as_u64() {
            outcome = format!("{outcome} (g{from} again)");
        }
        table.push([
            text(&release["generation"]),
            command.join(" "),
            when(&release["started"]),
            if release["ended"].is_null() {
                "serving".into()
            } else {
                when(&release["ended"])
            },
            outcome,
        ]);
    }
    print_table(&table);
    Ok(())
}

/// `baton upgrade SERVICE`: starts the upgrade and follows it to its end (and the old worker's stop).
pub async fn upgrade(client: &Client, service: &str) -> Result<(), CliError> {
    follow(client, service, "upgrade").await
}

/// `baton rollback SERVICE [--to GENERATION]`: switches back to the warm previous worker, or after the
/// watchdog window starts the previous release (or `to`'s) again.
pub async fn rollback(client: &Client, service: &str, to: Option<u64>) -> Result<(), CliError> {
    match to {
        Some(to) => follow(client, service, &format!("rollback?to={to}")).await,
        None => follow(client, service, "rollback").await,
    }
}

/// Runs `action` on `service` while printing its events, until the outcome and, after a switch, the stop of
/// the worker it replaced.
async fn follow(client: &Client, service: &str, request_action: &str) -> Result<(), CliError> {
    let action = request_action.split('?').next().unwrap_or(request_action);
    let mut events = client.events(service).await?;
    // The stream is live once its first line has come: nothing of the action can be missed.
    let _ = events.recv().await;
    let request = {
        let client = client.clone();
        let path = format!("/v1/services/{service}/{request_action}");
        tokio::spawn(async move { client.call(Method::POST, &path).await })
    };
    tokio::pin!(request);
    let mut progress = Progress::new();
    let outcome = loop {
        tokio::select! {
            answer = &mut request => break answer.map_err(|e| CliError::Refused(e.to_string()))??,
            Some(event) = events.recv() => progress.show(&event),
        }
    };
    let (code, record) = outcome;
    if code == StatusCode::NOT_FOUND || code == StatusCode::CONFLICT || record["result"].is_null() {
        progress.finish();
        return Err(CliError::Refused(error_text(&record)));
    }
    let result = record["result"].as_str().unwrap_or_default().to_owned();
    // A rollback in the watchdog window switches back (`rolled_back`); one after it starts an earlier
    // release as a new generation, an upgrade like any other.
    let switched_back = result == "rolled_back" && action == "rollback";
    let succeeded = result == "success" || switched_back;
    // The worker that lost the traffic drains; follow it to its stop.
    let retired = match result.as_str() {
        "rolled_back" => record["new_generation"].as_u64(),
        "success" => record["old_generation"].as_u64(),
        // A failed worker never took traffic: it was killed at once.
        _ => None,
    };
    if let Some(retired) = retired {
        if !progress.stopped.contains(&retired) {
            while let Some(event) = events.recv().await {
                progress.show(&event);
                if progress.stopped.contains(&retired) {
                    break;
                }
            }
        }
    }
    progress.finish();
    if succeeded {
        println!(
            "{action} of {service}: {result} (generation {} serving)",
            if switched_back {
                text(&record["old_generation"])
            } else {
                text(&record["new_generation"])
            }
        );
        Ok(())
    } else {
        Err(CliError::Refused(format!(
            "{action} of {service}: {result}: {}",
            record["error"].as_str().unwrap_or("no reason given")
        )))
    }
}

/// `baton reload`: like SIGHUP, with each service's outcome.
pub async fn reload(client: &Client, changed_only: bool) -> Result<(), CliError> {
    let path = if changed_only {
        "/v1/reload?upgrade=changed"
    } else {
        "/v1/reload"
    };
    let (code, answer) = client.call(Method::POST, path).await?;
    refused(code, &answer)?;
    let mut failed = Vec::new();
    for (name, outcome) in answer["services"].as_object().into_iter().flatten() {
        let line = match outcome {
            Value::String(state) => state.clone(),
            other => {
                let record = &other["upgraded"];
                let result = record["result"].as_str().unwrap_or("?");
                if result != "success" {
                    failed.push(name.clone());
                }
                match record["error"].as_str() {
                    Some(error) => format!("{result}: {error}"),
                    None => format!("{result}, generation {}", text(&record["new_generation"])),
                }
            }
        };
        println!("{name}: {line}");
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(CliError::Refused(format!(
            "reload applied, but not every upgrade succeeded: {}",
            failed.join(", ")
        )))
    }
}

/// How long `baton reexec` waits for the new image to report, beyond the check.
const REEXEC_WAIT: Duration = Duration::from_secs(60);
/// How often it looks.
const REEXEC_POLL: Duration = Duration::from_millis(50);
/// How long the admin API may refuse connections before `baton reexec` says baton is gone.
const REEXEC_GONE: Duration = Duration::from_secs(3);

/// `baton reexec`: asks baton to re-execute itself with `binary` (or the binary at the path it was started
/// from), prints the check, what is handed over and how long connections paused; fails, with the reason, if
/// the new binary was refused or could not take over (baton then carries on unchanged).
pub async fn reexec(
    client: &Client,
    binary: Option<&std::path::Path>,
    check_timeout: Duration,
) -> Result<(), CliError> {
    let (_, before) = client.call(Method::GET, "/status").await?;
    let pid = before["pid"].as_u64();
    let mut path = format!("/v1/reexec?check_timeout={}", humantime::format_duration(check_timeout)).replace(' ', "");
    if let Some(binary) = binary {
        let absolute =
            std::path::absolute(binary).map_err(|e| CliError::Refused(format!("{}: {e}", binary.display())))?;
        let text = absolute.to_string_lossy();
        let encoded = percent_encoding::utf8_percent_encode(&text, percent_encoding::NON_ALPHANUMERIC);
        path.push_str(&format!("&binary={encoded}"));
    }
    // The answer comes once the new binary has passed its check; the connection may also close as the
    // process becomes the new image, which is no failure.
    let attempt = match client.call(Method::POST, &path).await {
        Ok((code, answer)) => {
            if !code.is_success() {
                return Err(CliError::Refused(format!(
                    "re-exec refused, nothing changed: {}",
                    error_text(&answer)
                )));
            }
            println!(
                "checking {} ({}) ... ok",
                text(&answer["binary"]),
                text(&answer["version"])
            );
            answer["attempt"].as_u64()
        }
        Err(CliError::Protocol { .. }) => None,
        Err(e) => return Err(e),
    };
    let earlier = before["last_reexec"]["attempt"].as_u64().unwrap_or(0);
    let deadline = tokio::time::Instant::now() + check_timeout + REEXEC_WAIT;
    let mut unreachable_since = None;
    let record = loop {
        let answer = client.call(Method::GET, "/status").await;
        match &answer {
            // The admin socket is the same across the exec: connections to it wait in its queue. Refused
            // means nobody holds it any more.
            Err(CliError::Unreachable { .. }) => {
                let since = *unreachable_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= REEXEC_GONE {
                    return Err(CliError::Refused(format!(
                        "the admin API stopped answering during the re-exec: baton {} may have exited; see its log",
                        text(&before["version"])
                    )));
                }
            }
            _ => unreachable_since = None,
        }
        if let Ok((_, status)) = answer {
            let last = &status["last_reexec"];
            let done = last["attempt"].as_u64().is_some_and(|a| match attempt {
                Some(attempt) => a >= attempt,
                None => a > earlier,
            });
            if done {
                break (status["pid"].as_u64(), last.clone());
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CliError::Refused(
                "no word from baton on the re-exec: see its log and `baton status`".into(),
            ));
        }
        tokio::time::sleep(REEXEC_POLL).await;
    };
    let (now_pid, record) = record;
    if record["result"].as_str() != Some("ok") {
        let error = record["error"].as_str().unwrap_or("no reason given");
        return Err(CliError::Refused(format!(
            "re-exec {}: {error}; baton {} carries on",
            text(&record["result"]),
            text(&record["from_version"])
        )));
    }
    println!(
        "handing over: {} listeners, {} workers, {} connections",
        grouped(record["listeners"].as_u64().unwrap_or(0)),
        grouped(record["workers"].as_u64().unwrap_or(0)),
        grouped(record["connections"].as_u64().unwrap_or(0)),
    );
    let same = if now_pid == pid { "unchanged" } else { "changed!" };
    let active = record["active_connections"].as_u64().unwrap_or(0);
    let first = match record["active_pause_ms"].as_f64() {
        Some(ms) if active > 0 && active < record["connections"].as_u64().unwrap_or(0) => {
            format!(" (the {} active connections in {ms:.0} ms)", grouped(active))
        }
        _ => String::new(),
    };
    println!(
        "re-executed in {:.0} ms{first}: baton {} -> {}, pid {} ({same})",
        record["pause_ms"].as_f64().unwrap_or(0.0),
        text(&record["from_version"]),
        text(&record["to_version"]),
        now_pid.map_or_else(|| "?".to_owned(), |p| p.to_string()),
    );
    Ok(())
}

/// `1204` as `1,204`.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

fn refused(code: StatusCode, answer: &Value) -> Result<(), CliError> {
    if code.is_success() {
        Ok(())
    } else {
        Err(CliError::Refused(error_text(answer)))
    }
}

fn error_text(answer: &Value) -> String {
    answer["error"]
        .as_str()
        .map_or_else(|| answer.to_string(), str::to_owned)
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Prints events as steps; on a terminal, the drain countdown rewrites its own line.
struct Progress {
    terminal: bool,
    /// Whether the last thing printed is a countdown line to overwrite.
    counting: bool,
    /// Generations seen stopped.
    stopped: Vec<u64>,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            terminal: io::stdout().is_terminal(),
            counting: false,
            stopped: Vec::new(),
        }
    }

    /// A line that counts something down or up: on a terminal it is written over the last such line (and
    /// `None` comes back); elsewhere it comes back, to be printed as any other.
    fn in_place(&mut self, line: String) -> Option<String> {
        if !self.terminal {
            return Some(line);
        }
        print!("\r\x1b[2K{line}");
        let _ = io::stdout().flush();
        self.counting = true;
        None
    }

    fn show(&mut self, event: &Value) {
        let generation = text(&event["generation"]);
        let line = match event["event"].as_str().unwrap_or_default() {
            "upgrade_started" => format!("upgrade started: generation {generation} ({})", text(&event["trigger"])),
            "spawned" => format!("spawned generation {generation}, pid {}", text(&event["pid"])),
            "ready" => format!("ready in {} ms", text(&event["ready_ms"])),
            "switched" => format!("switched: new connections go to generation {generation}"),
            "watching" => format!(
                "watching for {} ms, generation {} kept warm",
                text(&event["watchdog_ms"]),
                text(&event["previous_generation"])
            ),
            "unhealthy" => format!("generation {generation} unhealthy"),
            "canary_step" => {
                let share = event["share"].as_f64().unwrap_or(0.0) / 100.0;
                let tally =
                    |t: &Value| format!("{} connections, {} failed", text(&t["connections"]), text(&t["failed"]));
                format!(
                    "canary: generation {generation} takes {share}% of new connections (so far new: {}; previous: {})",
                    tally(&event["new"]),
                    tally(&event["previous"])
                )
            }
            "canary_progress" => {
                let tally =
                    |t: &Value| format!("{} connections, {} failed", text(&t["connections"]), text(&t["failed"]));
                let line = format!(
                    "canary at {}%: new {}; previous {}",
                    event["share"].as_f64().unwrap_or(0.0) / 100.0,
                    tally(&event["new"]),
                    tally(&event["previous"])
                );
                match self.in_place(line) {
                    Some(line) => line,
                    None => return,
                }
            }
            "deferred" => format!(
                "deferred until the maintenance window opens, in {} s",
                event["until_ms"].as_u64().unwrap_or(0).div_ceil(1000)
            ),
            "rolled_back" => format!(
                "rolled back to generation {}: {}",
                text(&event["restored_generation"]),
                text(&event["reason"])
            ),
            "drain_started" => format!(
                "draining generation {generation}: {} connections left, deadline in {} ms",
                text(&event["connections"]),
                text(&event["drain_timeout_ms"])
            ),
            "drain_progress" => {
                let line = format!(
                    "draining generation {generation}: {} connections left, deadline in {} s",
                    text(&event["connections"]),
                    event["deadline_in_ms"].as_u64().unwrap_or(0).div_ceil(1000)
                );
                match self.in_place(line) {
                    Some(line) => line,
                    None => return,
                }
            }
            "worker_stopped" => {
                if let Some(g) = event["generation"].as_u64() {
                    self.stopped.push(g);
                }
                format!(
                    "old worker stopped: generation {generation}, pid {} ({})",
                    text(&event["pid"]),
                    text(&event["status"])
                )
            }
            "upgrade_waiting" => {
                let draining: Vec<String> = event["draining"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|g| format!("g{g}"))
                    .collect();
                format!(
                    "waiting for a drain slot: {} draining (max_draining {}), the first stops within {} s",
                    draining.join(", "),
                    text(&event["max_draining"]),
                    event["until_ms"].as_u64().unwrap_or(0).div_ceil(1000)
                )
            }
            "drain_cut" => format!(
                "drain timeout of generation {generation}: {} connections closed",
                text(&event["cut"])
            ),
            "stop_timeout" => format!(
                "generation {generation} ignored {}: killed",
                event["signal"].as_str().unwrap_or("its stop signal")
            ),
            "worker_exited" => format!("generation {generation} exited: {}", text(&event["status"])),
            "restart_scheduled" => format!("restart in {} ms", text(&event["in_ms"])),
            _ => return,
        };
        self.finish();
        println!("{line}");
    }

    /// Ends a countdown line.
    fn finish(&mut self) {
        if self.counting {
            println!();
            self.counting = false;
        }
    }
}
