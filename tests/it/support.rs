//! Test support: a real `baton` process with its config in a temp dir, a client load that checks every reply,
//! and polling with deadlines. Every address is ephemeral; baton reports what it bound through its log and
//! `/status`. A [`Baton`] is killed on drop, and its workers die with it.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// How long anything in a test may take before the test fails, printing what it last saw.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The test worker binary.
pub fn worker() -> &'static str {
    env!("CARGO_BIN_EXE_baton-test-worker")
}

/// A `[service.NAME]` stanza running the test worker with `args`, on an ephemeral public port.
pub fn service(name: &str, args: &[&str], extra: &str) -> String {
    let mut command = vec![format!("{:?}", worker())];
    command.extend(args.iter().map(|a| format!("{a:?}")));
    format!(
        "[service.{name}]\nlisten = [\"127.0.0.1:0\"]\ncommand = [{}]\n{extra}\n[service.{name}.readiness]\npath = \"/readyz\"\ninterval = \"10ms\"\n",
        command.join(", ")
    )
}

/// Health probes every 50 ms; three failures in a row make a worker unhealthy.
pub const FAST_HEALTH: &str = "[service.web.health]\ninterval = \"50ms\"\ntimeout = \"200ms\"\nfailures = 3\n";

/// Service `web` running the test worker on `{port}` with more `args`.
pub fn web(args: &[&str], extra: &str) -> String {
    let mut argv = vec!["--port", "{port}"];
    argv.extend_from_slice(args);
    service("web", &argv, extra)
}

/// Service `web` running Python's `http.server`, ready on `/`, with `extra` keys.
pub fn python_web(extra: &str) -> String {
    format!(
        "[service.web]\nlisten = [\"127.0.0.1:0\"]\n\
         command = [\"python3\", \"-m\", \"http.server\", \"{{port}}\", \"--bind\", \"127.0.0.1\"]\n{extra}\n\
         [service.web.readiness]\npath = \"/\"\ninterval = \"50ms\"\n"
    )
}

/// Polls `check` until it returns `Some`, or panics after [`DEADLINE`] with `what` and the last value seen.
pub fn wait_for<T>(what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match check() {
            Ok(value) => return value,
            Err(last) if Instant::now() >= deadline => panic!("timed out waiting for {what}; last seen: {last}"),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// A running baton.
pub struct Baton {
    child: Child,
    /// The directory holding the config file.
    pub dir: tempfile::TempDir,
    /// The admin API's address.
    pub admin: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Baton {
    /// Starts baton with `config` (the admin table is added) and waits until every service serves.
    pub fn start(config: &str) -> Baton {
        let baton = Baton::spawn(config);
        baton.wait_idle();
        baton
    }

    /// Starts baton with `config` and waits only for its admin API.
    pub fn spawn(config: &str) -> Baton {
        Baton::spawn_under(config, &[])
    }

    /// Starts baton as an argument of `wrapper` (a command such as `prlimit --nofile=64:64`), and waits
    /// only for its admin API.
    pub fn spawn_under(config: &str, wrapper: &[&str]) -> Baton {
        Baton::spawn_with(config, wrapper, &[])
    }

    /// Starts baton with `config` and `env` added to its environment, and waits until every service serves.
    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Baton {
        let baton = Baton::spawn_with(config, &[], env);
        baton.wait_idle();
        baton
    }

    /// Starts baton as an argument of `wrapper` with `env` added to its environment, and waits only for its
    /// admin API.
    pub fn spawn_with_env(config: &str, wrapper: &[&str], env: &[(&str, &str)]) -> Baton {
        Baton::spawn_with(config, wrapper, env)
    }

    fn spawn_with(config: &str, wrapper: &[&str], env: &[(&str, &str)]) -> Baton {
        let mut baton = Baton::launch(&with_admin(config), wrapper, env);
        baton.wait_admin();
        baton
    }

    /// Waits for the admin API's TCP address in the log and keeps it.
    pub fn wait_admin(&mut self) {
        self.admin = wait_for("the admin API address in baton's log", || {
            self.check_running();
            self.log_entries()
                .iter()
                .find(|e| e["fields"]["message"] == "admin API listening")
                .and_then(|e| e["fields"]["addr"].as_str().and_then(|a| a.parse().ok()))
                .ok_or_else(|| "no line yet".to_owned())
        });
    }

    /// Starts baton with `config` and an admin table on an ephemeral port, under `wrapper`, without waiting
    /// for anything.
    pub fn launch_with_admin(config: &str, wrapper: &[&str], env: &[(&str, &str)]) -> Baton {
        Baton::launch(&with_admin(config), wrapper, env)
    }

    /// Starts baton (an admin table added) under `wrapper` with `env`, passing `fds` as descriptors 3, 4...
    /// as a service manager passes sockets; waits for its admin API.
    pub fn launch_passing(config: &str, wrapper: &[&str], env: &[(&str, &str)], fds: Vec<OwnedFd>) -> Baton {
        let mut baton = Baton::launch_with(&with_admin(config), wrapper, env, fds);
        baton.wait_admin();
        baton
    }

    /// Starts baton with exactly `config` (no admin table added) and `env` added to its environment, without
    /// waiting for anything.
    pub fn launch(config: &str, wrapper: &[&str], env: &[(&str, &str)]) -> Baton {
        Baton::launch_with(config, wrapper, env, Vec::new())
    }

    fn launch_with(config: &str, wrapper: &[&str], env: &[(&str, &str)], fds: Vec<OwnedFd>) -> Baton {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("baton.toml"), config).expect("write config");
        let baton = env!("CARGO_BIN_EXE_baton");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(baton);
                command
            }
            None => Command::new(baton),
        };
        command
            .args(["--log-format", "json", "run", "--config"])
            .arg(dir.path().join("baton.toml"))
            .env("RUST_LOG", "info")
            // baton's runtime directory (workers' Unix sockets) goes in the test's directory, which is removed
            // even when a test kills baton before it can remove its own.
            .env("XDG_RUNTIME_DIR", dir.path())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if !fds.is_empty() {
            let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
            // SAFETY: between fork and exec, only dup2(2) and fcntl(2), on descriptors this process holds.
            #[allow(unsafe_code)]
            unsafe {
                command.pre_exec(move || {
                    for (i, fd) in raw.iter().enumerate() {
                        let target = 3 + i as i32;
                        if *fd == target {
                            nix::fcntl::fcntl(target, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()))?;
                        } else {
                            nix::unistd::dup2(*fd, target)?;
                        }
                    }
                    Ok(())
                });
            }
        }
        let mut child = command.spawn().expect("start baton");
        drop(fds);
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    log.lock().expect("log lock").push(line);
                }
            });
        }
        Baton {
            child,
            dir,
            admin: "0.0.0.0:0".parse().expect("address"),
            log,
        }
    }

    /// Panics, with the log, if baton has exited.
    pub fn check_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("baton exited with {status}:\n{}", self.log_text());
        }
    }

    /// baton's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("baton.toml")
    }

    /// Replaces the config file (the admin table is added).
    pub fn write_config(&self, config: &str) {
        // The admin table is the same as at start, so a reload keeps the admin API where it is.
        std::fs::write(self.config_path(), with_admin(config)).expect("write config");
    }

    /// Sends `signal` to baton.
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid() as i32), signal).expect("signal baton");
    }

    /// The log lines so far, parsed.
    pub fn log_entries(&self) -> Vec<Value> {
        let lines = self.log.lock().expect("log lock").clone();
        lines.iter().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// How many log entries have exactly `message`.
    pub fn count_log(&self, message: &str) -> usize {
        self.log_entries()
            .iter()
            .filter(|e| e["fields"]["message"] == message)
            .count()
    }

    /// The log so far, as text.
    pub fn log_text(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// Waits for a log entry whose message contains `needle`, and returns it.
    pub fn wait_log(&self, needle: &str) -> Value {
        wait_for(&format!("a log line with {needle:?}"), || {
            self.log_entries()
                .into_iter()
                .find(|e| e["fields"]["message"].as_str().is_some_and(|m| m.contains(needle)))
                .ok_or_else(|| self.log_text())
        })
    }

    /// Waits for a line of baton's stderr (its log, or a worker's output) that contains `needle`.
    pub fn wait_log_text(&self, needle: &str) -> String {
        wait_for(&format!("a line with {needle:?}"), || {
            let lines = self.log.lock().expect("log lock").clone();
            lines
                .into_iter()
                .find(|l| l.contains(needle))
                .ok_or_else(|| self.log_text())
        })
    }

    /// `GET /status`.
    pub fn status(&self) -> Value {
        let (code, body) = http_get(self.admin, "/status").expect("GET /status");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("status is JSON")
    }

    /// The status of service `name`.
    pub fn service(&self, name: &str) -> Value {
        self.status()["services"][name].clone()
    }

    /// The first public address of service `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.service(name)["listen"][0]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("service {name} has no address: {}", self.status()))
    }

    /// The value of the sample `series` (name and labels as exposed) in `/metrics`, or 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        let (_, text) = http_get(self.admin, "/metrics").expect("GET /metrics");
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// The process id of service `name`'s active worker.
    pub fn worker_pid(&self, name: &str) -> u32 {
        let service = self.service(name);
        service["pid"]
            .as_u64()
            .unwrap_or_else(|| panic!("no worker: {service}")) as u32
    }

    /// Waits until every service has a worker and no upgrade runs.
    pub fn wait_idle(&self) {
        wait_for("every service to serve", || {
            let status = self.status();
            let services = status["services"].as_object().cloned().unwrap_or_default();
            let idle = !services.is_empty()
                && services
                    .values()
                    .all(|s| s["phase"] == "idle" && s["generation"].is_u64());
            if idle { Ok(()) } else { Err(status.to_string()) }
        });
    }

    /// Waits until service `name` is in phase `phase`, and returns its status then.
    pub fn wait_phase(&self, name: &str, phase: &str) -> Value {
        wait_for(&format!("service {name} in phase {phase}"), || {
            let service = self.service(name);
            if service["phase"] == phase {
                Ok(service)
            } else {
                Err(service.to_string())
            }
        })
    }

    /// Waits until service `name` serves generation `generation` or newer, and returns the newest.
    pub fn wait_generation(&self, name: &str, generation: u64) -> u64 {
        wait_for(&format!("service {name} at generation {generation}"), || {
            let service = self.service(name);
            match service["generation"].as_u64() {
                Some(g) if g >= generation => Ok(g),
                _ => Err(service.to_string()),
            }
        })
    }

    /// Waits until the last upgrade of `name` is of generation `generation`, and returns its record.
    pub fn wait_upgrade(&self, name: &str, generation: u64) -> Value {
        wait_for(&format!("the upgrade of {name} to generation {generation}"), || {
            let service = self.service(name);
            let record = &service["last_upgrade"];
            if record["new_generation"].as_u64() == Some(generation) && service["phase"] == "idle" {
                Ok(record.clone())
            } else {
                Err(service.to_string())
            }
        })
    }

    /// Sends SIGTERM and waits for baton to exit.
    pub fn stop(self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.wait_exit()
    }

    /// Waits for a baton expected to exit by itself, and returns how it exited with its log.
    pub fn wait_exit_status(mut self) -> (ExitStatus, String) {
        let status = wait_for("baton to exit", || match self.child.try_wait() {
            Ok(Some(status)) => Ok(status),
            _ => Err(self.log_text()),
        });
        // The log's reader may still be reading its last lines.
        let text = wait_for("baton's last log line", || {
            let text = self.log_text();
            (!text.is_empty()).then_some(text).ok_or_else(String::new)
        });
        (status, text)
    }

    /// Waits for baton to exit.
    pub fn wait_exit(mut self) -> ExitStatus {
        wait_for("baton to exit", || match self.child.try_wait() {
            Ok(Some(status)) => Ok(status),
            _ => Err(self.log_text()),
        })
    }
}

impl Drop for Baton {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn with_admin(config: &str) -> String {
    format!("[admin]\nlisten = \"127.0.0.1:0\"\n\n{config}")
}

/// Whether process `pid` is gone (not even a zombie).
pub fn gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// Waits until every pid in `pids` is gone.
pub fn wait_gone(pids: impl IntoIterator<Item = u32>) {
    let pids: Vec<u32> = pids.into_iter().collect();
    wait_for("processes to be gone", || {
        let left: Vec<String> = pids
            .iter()
            .filter(|p| !gone(**p))
            .map(|p| {
                let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
                format!("{p}: {stat}")
            })
            .collect();
        if left.is_empty() { Ok(()) } else { Err(left.join("; ")) }
    });
}

/// A plain HTTP/1.1 GET with `Connection: close`; returns the status code and body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http(addr, "GET", path, &[])
}

/// An HTTP/1.1 request with `Connection: close` and extra `headers`; returns the status code and body.
pub fn http(addr: SocketAddr, method: &str, path: &str, headers: &[&str]) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    exchange_raw(&mut stream, method, path, headers)
}

/// Sends one request on `stream` and reads the whole response.
pub fn exchange_raw<S: Read + Write>(
    stream: &mut S,
    method: &str,
    path: &str,
    headers: &[&str],
) -> std::io::Result<(u16, String)> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for header in headers {
        head.push_str(header);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    parse_response(&response)
}

/// Splits a whole HTTP response into status code and body.
pub fn parse_response(response: &[u8]) -> std::io::Result<(u16, String)> {
    let text = String::from_utf8_lossy(response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("incomplete response: {text:?}")))?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head:?}")))?;
    Ok((code, body.to_owned()))
}

/// A keep-alive HTTP connection for `GET /whoami`.
pub struct KeepAlive {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    /// Whether the last answer said `Connection: close`.
    closing: bool,
}

impl KeepAlive {
    /// Connects to `addr`.
    pub fn connect(addr: SocketAddr) -> KeepAlive {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        KeepAlive {
            stream,
            reader,
            closing: false,
        }
    }

    /// Asks the worker who it is; returns its generation.
    pub fn whoami(&mut self) -> std::io::Result<u64> {
        self.exchange().map_err(|(e, _)| e)
    }

    /// Like [`KeepAlive::whoami`]; a failure tells whether any of the answer had arrived.
    pub fn exchange(&mut self) -> Result<u64, (std::io::Error, bool)> {
        let mut answered = false;
        self.ask(&mut answered).map_err(|e| (e, answered))
    }

    fn ask(&mut self, answered: &mut bool) -> std::io::Result<u64> {
        self.stream.write_all(b"GET /whoami HTTP/1.1\r\nHost: test\r\n\r\n")?;
        let mut length = None;
        let mut generation = None;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            *answered = true;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some(v) = line.strip_prefix("Content-Length: ") {
                length = v.parse::<usize>().ok();
            }
            if let Some(v) = line.strip_prefix("X-Generation: ") {
                generation = v.parse::<u64>().ok();
            }
            if line.eq_ignore_ascii_case("Connection: close") {
                self.closing = true;
            }
        }
        let mut body = vec![0; length.unwrap_or(0)];
        self.reader.read_exact(&mut body)?;
        generation.ok_or_else(|| std::io::Error::other("no X-Generation header"))
    }

    /// Whether the server said it closes the connection after its last answer, as HTTP lets it.
    pub fn closing(&self) -> bool {
        self.closing
    }

    /// The connection's socket, to send something else.
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Waits until the peer closes the connection (EOF or reset).
    pub fn wait_closed(&mut self) {
        let mut buf = [0; 64];
        match self.reader.read(&mut buf) {
            Ok(0) | Err(_) => {}
            Ok(n) => panic!("expected the connection to close, got {n} bytes"),
        }
    }
}

/// What a client load saw.
#[derive(Debug, Default)]
pub struct Report {
    /// Exchanges that completed and checked out.
    pub ok: u64,
    /// Exchanges that failed in any way.
    pub failures: u64,
    /// The first few failures, described.
    pub errors: Vec<String>,
    /// Generations that answered.
    pub generations: BTreeSet<u64>,
    /// Worker pids that answered.
    pub pids: BTreeSet<u32>,
}

/// Clients that keep opening connections, each sending a random body to `POST /echo` and checking the reply.
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
    report: Arc<Mutex<Report>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts `clients` clients against `addr`.
    pub fn start(addr: SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(AtomicU64::new(0));
        let report = Arc::new(Mutex::new(Report::default()));
        let threads = (0..clients)
            .map(|client| {
                let (stop, ok, failures, report) = (stop.clone(), ok.clone(), failures.clone(), report.clone());
                std::thread::spawn(move || {
                    let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (client as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407);
                    while !stop.load(Ordering::Relaxed) {
                        match exchange(addr, &mut rng) {
                            Ok((generation, pid)) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                let mut report = report.lock().expect("report lock");
                                report.generations.insert(generation);
                                report.pids.insert(pid);
                            }
                            Err(e) => {
                                failures.fetch_add(1, Ordering::Relaxed);
                                let mut report = report.lock().expect("report lock");
                                if report.errors.len() < 10 {
                                    report.errors.push(e.to_string());
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failures,
            report,
            threads,
        }
    }

    /// Exchanges completed so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Failures so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Whether generation `generation` has answered.
    pub fn has_seen(&self, generation: u64) -> bool {
        self.report
            .lock()
            .expect("report lock")
            .generations
            .contains(&generation)
    }

    /// Waits until `count` more exchanges have completed.
    pub fn wait_ok(&self, count: u64) {
        let target = self.ok() + count;
        wait_for(&format!("{count} more good exchanges"), || {
            if self.ok() >= target {
                Ok(())
            } else {
                Err(format!("{} ok, {} failed", self.ok(), self.failures()))
            }
        });
    }

    /// Stops every client and returns what they saw.
    pub fn stop(self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().expect("client thread");
        }
        let mut report = std::mem::take(&mut *self.report.lock().expect("report lock"));
        report.ok = self.ok.load(Ordering::Relaxed);
        report.failures = self.failures.load(Ordering::Relaxed);
        report
    }
}

/// One connection: `POST /echo` with a random body, `Connection: close`; checks the whole reply.
fn exchange(addr: SocketAddr, rng: &mut u64) -> Result<(u64, u32), String> {
    let size = (next(rng) % 4096) as usize + 1;
    let body: Vec<u8> = (0..size).map(|_| next(rng) as u8).collect();
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let head = format!("POST /echo HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {size}\r\n\r\n");
    stream.write_all(head.as_bytes()).map_err(|e| format!("write: {e}"))?;
    stream.write_all(&body).map_err(|e| format!("write: {e}"))?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(|e| format!("read: {e}"))?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("incomplete response of {} bytes", response.len()))?;
    let head = String::from_utf8_lossy(&response[..split]);
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("bad response: {head}"));
    }
    if response[split + 4..] != body[..] {
        return Err(format!(
            "body mismatch: sent {size} bytes, got {}",
            response.len() - split - 4
        ));
    }
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| format!("no {name} in {head}"))
    };
    let _ = stream.shutdown(Shutdown::Both);
    Ok((header("X-Generation:")?, header("X-Pid:")? as u32))
}

/// xorshift64*: a deterministic stream of test bytes.
pub fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// What a keep-alive load saw.
#[derive(Debug, Default, Clone)]
pub struct KeepAliveReport {
    /// Requests answered.
    pub ok: u64,
    /// Requests that found their reused connection closed before any answer, and were sent again on a new
    /// connection, as HTTP clients do for idempotent requests.
    pub retried: u64,
    /// Requests that failed for good: a retry that failed too, or an answer cut short.
    pub failed: u64,
    /// The first few failures, described.
    pub errors: Vec<String>,
    /// Generations that answered.
    pub generations: BTreeSet<u64>,
}

/// Clients that each keep one connection alive and send `GET /whoami` on it in a loop.
pub struct KeepAliveLoad {
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<KeepAliveReport>>,
    threads: Vec<JoinHandle<()>>,
}

impl KeepAliveLoad {
    /// Starts `clients` keep-alive clients against `addr`.
    pub fn start(addr: SocketAddr, clients: usize) -> KeepAliveLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(KeepAliveReport::default()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, report) = (Arc::clone(&stop), Arc::clone(&report));
                std::thread::spawn(move || {
                    let mut connection: Option<KeepAlive> = None;
                    while !stop.load(Ordering::Relaxed) {
                        let reused = connection.is_some();
                        let result = connection.get_or_insert_with(|| KeepAlive::connect(addr)).exchange();
                        let outcome = match result {
                            Ok(generation) => Ok(generation),
                            Err((error, answered)) => {
                                connection = None;
                                if reused && !answered {
                                    report.lock().expect("report lock").retried += 1;
                                    let fresh = connection.insert(KeepAlive::connect(addr));
                                    fresh.exchange().map_err(|(e, _)| format!("retry: {e}"))
                                } else {
                                    Err(error.to_string())
                                }
                            }
                        };
                        let mut report = report.lock().expect("report lock");
                        match outcome {
                            Ok(generation) => {
                                report.ok += 1;
                                report.generations.insert(generation);
                                // Like any HTTP client, it does not reuse a connection the server closes.
                                if connection.as_ref().is_some_and(KeepAlive::closing) {
                                    connection = None;
                                }
                            }
                            Err(error) => {
                                connection = None;
                                report.failed += 1;
                                if report.errors.len() < 10 {
                                    report.errors.push(error);
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        KeepAliveLoad { stop, report, threads }
    }

    /// What the clients saw so far.
    pub fn report(&self) -> KeepAliveReport {
        self.report.lock().expect("report lock").clone()
    }

    /// Waits until `count` more requests have been answered.
    pub fn wait_ok(&self, count: u64) {
        let target = self.report().ok + count;
        wait_for(&format!("{count} more answered requests"), || {
            let report = self.report();
            if report.ok >= target {
                Ok(())
            } else {
                Err(format!("{report:?}"))
            }
        });
    }

    /// Stops every client and returns what they saw.
    pub fn stop(self) -> KeepAliveReport {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().expect("client thread");
        }
        self.report.lock().expect("report lock").clone()
    }
}

/// The resident memory of process `pid`, in KiB.
pub fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .expect("VmRSS")
}

/// The CPU time process `pid` has used, user and system, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields: Vec<&str> = stat.rsplit_once(") ").expect("comm").1.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / 100.0
}

/// How many of process `pid`'s TCP sockets are in CLOSE_WAIT (the peer closed, the process has not).
pub fn close_wait_sockets(pid: u32) -> usize {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|t| {
                    let t = t.to_string_lossy().into_owned();
                    t.strip_prefix("socket:[").map(|i| i.trim_end_matches(']').to_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|text| text.lines().skip(1).map(str::to_owned).collect::<Vec<_>>())
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(3) == Some(&"08") && fields.get(9).is_some_and(|inode| inodes.contains(*inode))
        })
        .count()
}

/// The processes whose parent is `pid`, with their state letter.
pub fn children(pid: u32) -> Vec<(u32, char)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").filter_map(Result::ok) {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(1) == Some(&pid.to_string().as_str()) {
            found.push((child, fields[0].chars().next().unwrap_or('?')));
        }
    }
    found
}

/// Fails, naming the Debian package to install, if `program` is not on the PATH.
pub fn need(program: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false);
    assert!(found, "{program} is missing: install the Debian package `{package}`");
}

/// A connection to `addr` from an ephemeral port of `source` (any loopback address), reads bounded by
/// [`DEADLINE`].
pub fn connect_from(source: std::net::IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect(&addr.into())?;
    socket.set_read_timeout(Some(DEADLINE))?;
    Ok(socket.into())
}
