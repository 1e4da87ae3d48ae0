//! The worker the integration tests run behind baton: an ordinary server with knobs to misbehave.
//!
//! It listens on `--port` (or `$PORT`) or `--socket` (or `$BATON_SOCKET`) and serves each connection by what
//! the client sends first:
//! - `GET /readyz`: 200 once ready (see `--ready-after`, `--never-ready`), else 503;
//! - `GET /whoami`: `gen=G pid=P`;
//! - `POST /echo` with a `Content-Length`: the body back, with `X-Generation` and `X-Pid` headers;
//! - `GET /env`: its environment, a `NAME=value` line each;
//! - `POST /drop`: no answer: it reads the request, says so on stderr and closes the connection;
//! - `HALF`: `half-closed\n`, a half-close, then it reads until the client half-closes and prints on stderr
//!   how many bytes it got and their FNV-1a hash;
//! - `RSET`: a reset;
//! - `SEND <n>\n`: `n` bytes, then a half-close;
//! - anything else: a raw echo of every byte, until the client half-closes, then a half-close back.
//!
//! With `--reset-every N`, every Nth connection whose request is not for `/readyz` is reset instead.
//! HTTP connections are kept alive unless the request says `Connection: close`. With `--proxy-protocol`,
//! every connection begins with a v1 PROXY protocol header, which it prints on stderr.
//!
//! By default SIGTERM ends it at once, like most servers. `--graceful` makes it stop like a server with a
//! graceful shutdown: stop accepting, finish the requests in flight, close idle keep-alive connections,
//! exit when none is left.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener};
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use socket2::SockRef;

#[derive(Debug, Parser)]
struct Args {
    /// TCP port to listen on, on 127.0.0.1.
    #[arg(long, env = "PORT")]
    port: Option<u16>,
    /// Unix socket to listen on.
    #[arg(long, env = "BATON_SOCKET")]
    socket: Option<PathBuf>,
    /// Wait this long before listening at all.
    #[arg(long, value_parser = humantime::parse_duration)]
    bind_delay: Option<Duration>,
    /// Answer /readyz with 503 until this long after start.
    #[arg(long, value_parser = humantime::parse_duration)]
    ready_after: Option<Duration>,
    /// Answer /readyz with 503 forever.
    #[arg(long)]
    never_ready: bool,
    /// Exit with code 3 this long after start.
    #[arg(long, value_parser = humantime::parse_duration)]
    exit_after: Option<Duration>,
    /// Keep running on SIGTERM (only SIGKILL stops it).
    #[arg(long)]
    ignore_sigterm: bool,
    /// Shut down gracefully on SIGTERM (TCP only).
    #[arg(long)]
    graceful: bool,
    /// Answer /readyz with 500 from this long after start.
    #[arg(long, value_parser = humantime::parse_duration)]
    unhealthy_after: Option<Duration>,
    /// Answer /readyz with 200 and 500 in turn.
    #[arg(long)]
    flap: bool,
    /// Never close an HTTP connection the client has half-closed: keep it open, silent.
    #[arg(long)]
    ignore_eof: bool,
    /// After answering this many HTTP requests on a connection, close it as soon as the next request
    /// arrives, without reading it (a reset).
    #[arg(long)]
    close_unread_after: Option<u64>,
    /// Every connection begins with a v1 PROXY protocol header: read it first and print it on stderr.
    #[arg(long)]
    proxy_protocol: bool,
    /// Reset every Nth connection whose request is not for `/readyz`, after reading it: a worker that passes
    /// its probes and fails real traffic.
    #[arg(long)]
    reset_every: Option<u64>,
}

/// Set when a graceful shutdown has begun.
static STOPPING: AtomicBool = AtomicBool::new(false);
/// Connections open now.
static OPEN: AtomicUsize = AtomicUsize::new(0);
/// How often a graceful worker's idle connections look at [`STOPPING`].
const STOP_POLL: Duration = Duration::from_millis(20);

/// Counts a connection in [`OPEN`].
struct Open;

impl Open {
    fn new() -> Open {
        OPEN.fetch_add(1, Ordering::SeqCst);
        Open
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Worker {
    generation: String,
    pid: u32,
    ready_at: Option<Instant>,
    unhealthy_at: Option<Instant>,
    flap: Option<AtomicU64>,
    ignore_eof: bool,
    close_unread_after: Option<u64>,
    proxy_protocol: bool,
    reset_every: Option<u64>,
    /// Connections counted for `reset_every`.
    requests: AtomicU64,
}

impl Worker {
    fn ready(&self) -> bool {
        let now = Instant::now();
        let ready = self.ready_at.is_some_and(|at| now >= at) && self.unhealthy_at.is_none_or(|at| now < at);
        match &self.flap {
            Some(count) => ready && count.fetch_add(1, Ordering::SeqCst) % 2 == 0,
            None => ready,
        }
    }
}

fn main() {
    // `--behaviour-file PATH`: when PATH exists, the words in it are more arguments. A test changes how the
    // next generation behaves by writing the file, as a deploy replaces files on disk.
    let mut argv: Vec<String> = std::env::args().collect();
    if let Some(i) = argv.iter().position(|a| a == "--behaviour-file") {
        let path = argv.get(i + 1).cloned().unwrap_or_default();
        argv.drain(i..(i + 2).min(argv.len()));
        if let Ok(text) = std::fs::read_to_string(&path) {
            argv.extend(text.split_whitespace().map(str::to_owned));
        }
    }
    let args = Args::parse_from(argv);
    if args.ignore_sigterm || args.graceful {
        // Blocked before any thread starts, so every thread inherits the mask and SIGTERM stays pending forever.
        let mut set = nix::sys::signal::SigSet::empty();
        set.add(nix::sys::signal::Signal::SIGTERM);
        set.thread_block().expect("block SIGTERM");
    }
    let started = Instant::now();
    let worker = Arc::new(Worker {
        generation: std::env::var("BATON_GENERATION").unwrap_or_else(|_| "0".into()),
        pid: std::process::id(),
        ready_at: (!args.never_ready).then(|| started + args.ready_after.unwrap_or_default()),
        unhealthy_at: args.unhealthy_after.map(|after| started + after),
        flap: args.flap.then(|| AtomicU64::new(0)),
        ignore_eof: args.ignore_eof,
        close_unread_after: args.close_unread_after,
        proxy_protocol: args.proxy_protocol,
        reset_every: args.reset_every,
        requests: AtomicU64::new(0),
    });
    if let Some(after) = args.exit_after {
        std::thread::spawn(move || {
            std::thread::sleep(after);
            eprintln!("test worker: exiting on purpose");
            std::process::exit(3);
        });
    }
    if let Some(delay) = args.bind_delay {
        std::thread::sleep(delay);
    }
    match (args.port, args.socket) {
        (_, Some(path)) => {
            let listener = UnixListener::bind(&path).expect("bind the Unix socket");
            for stream in listener.incoming().flatten() {
                let worker = Arc::clone(&worker);
                std::thread::spawn(move || serve(&worker, stream));
            }
        }
        (Some(port), None) => {
            let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the port");
            if args.graceful {
                std::thread::spawn(move || {
                    let mut set = nix::sys::signal::SigSet::empty();
                    set.add(nix::sys::signal::Signal::SIGTERM);
                    let _ = set.wait();
                    eprintln!("test worker: SIGTERM: shutting down gracefully");
                    STOPPING.store(true, Ordering::SeqCst);
                    // Wake the accept loop.
                    let _ = std::net::TcpStream::connect(("127.0.0.1", port));
                });
            }
            for stream in listener.incoming().flatten() {
                if STOPPING.load(Ordering::SeqCst) {
                    break;
                }
                let worker = Arc::clone(&worker);
                let open = Open::new();
                std::thread::spawn(move || {
                    let _open = open;
                    let _ = stream.set_nodelay(true);
                    if args.graceful {
                        let _ = stream.set_read_timeout(Some(STOP_POLL));
                    }
                    serve(&worker, stream);
                });
            }
        }
        (None, None) => panic!("give --port or --socket"),
    }
    // Only a graceful shutdown leaves the accept loop: wait for the open connections to finish.
    while OPEN.load(Ordering::SeqCst) > 0 {
        std::thread::sleep(STOP_POLL);
    }
    eprintln!("test worker: stopped gracefully");
}

/// Reads into `buf`, riding out the read timeout of a graceful worker. When a graceful shutdown has begun
/// and the connection is `idle` (between requests), it reports end of stream so the connection closes.
fn read<S: Read>(stream: &mut S, buf: &mut [u8], idle: bool) -> io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                if idle && STOPPING.load(Ordering::SeqCst) {
                    return Ok(0);
                }
            }
            other => return other,
        }
    }
}

/// Waits for the client's next bytes, then returns so that the connection closes with them unread.
fn close_on_next_request(stream: &impl AsFd) {
    let mut byte = [std::mem::MaybeUninit::uninit()];
    loop {
        match SockRef::from(stream).peek(&mut byte) {
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            _ => break,
        }
    }
    eprintln!("test worker: closing on an unread request");
}

fn serve<S: Read + Write + AsFd>(worker: &Worker, mut stream: S) {
    if worker.proxy_protocol {
        // A v1 line, a byte at a time so that nothing after it is taken.
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\r\n") && line.len() < 108 {
            match stream.read(&mut byte) {
                Ok(1) => line.push(byte[0]),
                _ => return,
            }
        }
        eprintln!(
            "test worker: PROXY header {}",
            String::from_utf8_lossy(&line).trim_end()
        );
    }
    if worker.close_unread_after == Some(0) {
        close_on_next_request(&stream);
        return;
    }
    let mut pending = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    while pending.len() < 4 {
        match read(&mut stream, &mut chunk, pending.is_empty()) {
            Ok(0) | Err(_) => {
                if !pending.is_empty() {
                    let _ = stream.write_all(&pending);
                }
                let _ = SockRef::from(&stream).shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
        }
    }
    match &pending[..4] {
        b"GET " | b"POST"
            if worker.reset_every.is_some_and(|n| {
                !pending.starts_with(b"GET /readyz") && worker.requests.fetch_add(1, Ordering::Relaxed) % n.max(1) == 0
            }) =>
        {
            let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        }
        b"GET " | b"POST" => {
            let _ = http(worker, &mut stream, pending);
        }
        b"HALF" => half_close_first(&mut stream, &pending[4..]),
        b"RSET" => {
            let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        }
        b"SEND" => send(&mut stream, pending),
        _ => echo(&mut stream, &pending),
    }
}

/// Echoes every byte until the client half-closes, then half-closes back.
fn echo<S: Read + Write + AsFd>(stream: &mut S, first: &[u8]) {
    let mut chunk = [0u8; 64 * 1024];
    let mut data = first.len();
    let result = (|| {
        stream.write_all(first)?;
        loop {
            let n = read(stream, &mut chunk, false)?;
            if n == 0 {
                return SockRef::from(&*stream).shutdown(Shutdown::Write);
            }
            stream.write_all(&chunk[..n])?;
            data += n;
        }
    })();
    if let Err(e) = result {
        eprintln!("test worker: echo failed after {data} bytes: {e}");
    }
}

/// Half-closes first, then reads until the client half-closes and reports what it got on stderr.
fn half_close_first<S: Read + Write + AsFd>(stream: &mut S, first: &[u8]) {
    let _ = stream.write_all(b"half-closed\n");
    let _ = SockRef::from(&*stream).shutdown(Shutdown::Write);
    let mut sum = Fnv::default();
    sum.add(first);
    let mut chunk = [0u8; 64 * 1024];
    while let Ok(n) = read(stream, &mut chunk, false) {
        if n == 0 {
            break;
        }
        sum.add(&chunk[..n]);
    }
    eprintln!(
        "test worker: after its half-close got {} bytes, fnv {:016x}",
        sum.len, sum.hash
    );
}

/// `SEND <n>\n`: writes `n` bytes, then half-closes.
fn send<S: Read + Write + AsFd>(stream: &mut S, mut pending: Vec<u8>) {
    let mut chunk = [0u8; 64 * 1024];
    while !pending.contains(&b'\n') {
        match read(stream, &mut chunk, false) {
            Ok(0) | Err(_) => return,
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
        }
    }
    let line = String::from_utf8_lossy(&pending);
    let total: u64 = line[4..].trim().parse().unwrap_or(0);
    for (i, byte) in chunk.iter_mut().enumerate() {
        *byte = (i % 251) as u8;
    }
    let mut sent = 0u64;
    while sent < total {
        let n = (total - sent).min(chunk.len() as u64) as usize;
        if stream.write_all(&chunk[..n]).is_err() {
            return;
        }
        sent += n as u64;
    }
    let _ = SockRef::from(&*stream).shutdown(Shutdown::Write);
}

/// FNV-1a over a stream.
struct Fnv {
    hash: u64,
    len: u64,
}

impl Default for Fnv {
    fn default() -> Self {
        Fnv {
            hash: 0xcbf2_9ce4_8422_2325,
            len: 0,
        }
    }
}

impl Fnv {
    fn add(&mut self, data: &[u8]) {
        for &byte in data {
            self.hash = (self.hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        self.len += data.len() as u64;
    }
}

fn http<S: Read + Write + AsFd>(worker: &Worker, stream: &mut S, mut pending: Vec<u8>) -> io::Result<()> {
    let mut chunk = [0u8; 16 * 1024];
    let mut answered = 0u64;
    loop {
        if answered > 0 && worker.close_unread_after == Some(answered) && pending.is_empty() {
            close_on_next_request(stream);
            return Ok(());
        }
        let end = loop {
            if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = read(stream, &mut chunk, pending.is_empty())?;
            if n == 0 {
                while worker.ignore_eof && !STOPPING.load(Ordering::SeqCst) {
                    std::thread::sleep(STOP_POLL);
                }
                return Ok(());
            }
            pending.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&pending[..end]).into_owned();
        pending.drain(..end);
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or_default().to_owned();
        let mut content_length = 0usize;
        let mut close = false;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
                close = true;
            }
        }
        while pending.len() < content_length {
            let n = read(stream, &mut chunk, false)?;
            if n == 0 {
                return Ok(());
            }
            pending.extend_from_slice(&chunk[..n]);
        }
        let body: Vec<u8> = pending.drain(..content_length).collect();
        let mut parts = request_line.split(' ');
        let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
        if (method, path) == ("POST", "/drop") {
            eprintln!("test worker: dropped a request");
            return Ok(());
        }
        answered += 1;
        let (status, body) = match (method, path) {
            ("GET", "/readyz") if worker.ready() => ("200 OK", b"ready\n".to_vec()),
            ("GET", "/readyz") => ("503 Service Unavailable", b"not ready\n".to_vec()),
            ("GET", "/whoami") => (
                "200 OK",
                format!("gen={} pid={}\n", worker.generation, worker.pid).into_bytes(),
            ),
            ("POST", "/echo") => ("200 OK", body),
            ("GET", "/env") => {
                let mut vars: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}\n")).collect();
                vars.sort();
                ("200 OK", vars.concat().into_bytes())
            }
            _ => ("404 Not Found", b"not found\n".to_vec()),
        };
        // A server shutting down gracefully closes the connection after the request in flight.
        let close = close || STOPPING.load(Ordering::SeqCst);
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nX-Generation: {}\r\nX-Pid: {}\r\n{}\r\n",
            body.len(),
            worker.generation,
            worker.pid,
            if close { "Connection: close\r\n" } else { "" }
        );
        stream.write_all(head.as_bytes())?;
        stream.write_all(&body)?;
        if close {
            return Ok(());
        }
    }
}
