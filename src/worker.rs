//! Spawning and stopping one worker process: its private socket, its environment, its exit.
//!
//! Workers are forked by the process's main thread (see [`Spawner`]), each in its own process group, with a
//! parent-death signal so that none outlives baton, even a baton killed with SIGKILL. A task per worker
//! waits for its exit, reaps it at once and logs the status. This module does not decide *when* a worker
//! starts or stops: that is the service's job.

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Gid, Group, Pid, Uid, User};
use tokio::sync::{oneshot, watch};

use crate::config::{Backend, Output, ServiceConfig, substitute};
use crate::endpoint::Endpoint;

/// Variables of baton's own that a worker must never inherit (nor those of a re-exec, [`crate::reexec::VARIABLES`]).
pub const PRIVATE_VARIABLES: [&str; 10] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "FDSTORE",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "BATON_THREADS",
    "BATON_PID_FILE",
    "BATON_SUBREAPER",
];

/// The longest path a Unix socket address holds (`sun_path` less its terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Why a worker could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// No private address could be reserved.
    #[error("cannot reserve a private address")]
    Address(#[source] io::Error),
    /// The socket path would not fit a Unix socket address.
    #[error(
        "socket path {0} is longer than {MAX_SOCKET_PATH} bytes: set TMPDIR or XDG_RUNTIME_DIR to a shorter directory"
    )]
    SocketPathTooLong(PathBuf),
    /// fork or exec failed.
    #[error("cannot start `{program}`")]
    Exec {
        /// The program of the argv.
        program: String,
        /// What spawn returned.
        #[source]
        source: io::Error,
    },
    /// The configured user or group does not exist, or baton may not switch to it.
    #[error("{0}")]
    Identity(String),
    /// The main thread no longer takes spawn requests: baton is exiting.
    #[error("baton is shutting down")]
    ShuttingDown,
    /// The `prepare` command failed or did not finish in time; nothing was started.
    #[error("prepare: {0}")]
    Prepare(String),
    /// The release to start again is not as it was (a rollback); nothing was started.
    #[error("release: {0}")]
    Release(String),
}

/// How many of the last lines of a failed `prepare` command's output its error quotes.
const PREPARE_LINES: usize = 10;

/// Runs the service's `prepare` command for `generation` and waits for it, up to `prepare_timeout`: on the
/// spawning thread like a worker, with the worker's user, working directory, environment and placeholders
/// (`{service}`, `{generation}`), in a process group of its own that is killed if it runs too long. Fails
/// with the last lines of its output unless it exits 0.
pub async fn prepare(service: &ServiceConfig, generation: u64, spawner: &Spawner) -> Result<(), SpawnError> {
    let identity = identity(service)?;
    let fill = |text: &str| substitute(text, service, "", generation);
    let program = fill(&service.prepare[0]);
    let mut command = std::process::Command::new(&program);
    command
        .args(service.prepare[1..].iter().map(|a| fill(a)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for variable in PRIVATE_VARIABLES.iter().chain(crate::reexec::VARIABLES.iter()) {
        command.env_remove(variable);
    }
    command
        .envs(service.env.iter().map(|(k, v)| (k, fill(v))))
        .env("BATON_SERVICE", &service.name)
        .env("BATON_GENERATION", generation.to_string());
    if let Some(cwd) = &service.cwd {
        command.current_dir(cwd);
    }
    prepare_child(&mut command, identity, spawner.worker_fd_limit);
    let child = spawner.spawn(command).await?.map_err(|source| SpawnError::Exec {
        program: program.clone(),
        source,
    })?;
    let pid = child.id();
    // However it ends (baton shutting down included), its process group goes with it.
    let _group = KilledGroup(pid.map(|pid| Pid::from_raw(pid as i32)));
    let waited = tokio::time::timeout(service.prepare_timeout, child.wait_with_output()).await;
    if let Some(pid) = pid {
        crate::reaper::forget(pid);
    }
    let output = match waited {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => return Err(SpawnError::Prepare(format!("cannot wait for `{program}`: {e}"))),
        Err(_) => {
            return Err(SpawnError::Prepare(format!(
                "`{program}` did not finish within {} (prepare_timeout): killed",
                humantime::format_duration(service.prepare_timeout)
            )));
        }
    };
    if output.status.success() {
        return Ok(());
    }
    let text = [
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    ]
    .concat();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect();
    let last = lines[lines.len().saturating_sub(PREPARE_LINES)..].join(" | ");
    Err(SpawnError::Prepare(format!(
        "`{program}` ended: {}; its last output: {}",
        describe(output.status),
        if last.is_empty() { "none" } else { &last }
    )))
}

/// A process group killed when dropped.
struct KilledGroup(Option<Pid>);

impl Drop for KilledGroup {
    fn drop(&mut self) {
        if let Some(group) = self.0 {
            let _ = killpg(group, Signal::SIGKILL);
        }
    }
}

/// Hands spawn requests to the thread that forks the workers.
///
/// Linux sends the parent-death signal when the *thread* that forked the child exits, so workers are forked
/// by a thread that lives as long as baton: the process's main thread, which runs [`SpawnerLoop::run`]. That
/// also keeps them alive across an exec of baton itself, which ends every other thread.
#[derive(Debug, Clone)]
pub struct Spawner {
    requests: std::sync::mpsc::Sender<SpawnerMessage>,
    /// The open-file limit workers get: baton's own before [`raise_fd_limit`] raised it.
    worker_fd_limit: Option<FdLimit>,
}

/// A soft and hard `RLIMIT_NOFILE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    /// The soft limit.
    pub soft: u64,
    /// The hard limit.
    pub hard: u64,
}

/// Raises baton's open-file limit to its hard limit, so that it can hold as many connections as the system
/// allows. Returns the limit as it was, for the workers: some servers still use `select(2)` and break with
/// descriptors above 1024.
pub fn raise_fd_limit() -> io::Result<FdLimit> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(FdLimit { soft, hard })
}

/// The receiving end of a [`Spawner`], run on the main thread.
#[derive(Debug)]
pub struct SpawnerLoop {
    requests: std::sync::mpsc::Receiver<SpawnerMessage>,
}

#[derive(Debug)]
enum SpawnerMessage {
    Spawn {
        command: Box<std::process::Command>,
        reply: oneshot::Sender<io::Result<tokio::process::Child>>,
    },
    /// Block the signals baton handles on the main thread, the only one that takes them: from then on they
    /// wait, pending, for whichever image unblocks them.
    BlockSignals(oneshot::Sender<()>),
    UnblockSignals,
    /// The hand-over has been taken over: drop what a fall-back would have needed.
    Adopted,
    /// Replace the process's image; the reply comes only if that failed.
    Exec {
        request: Box<crate::reexec::ExecRequest>,
        reply: oneshot::Sender<io::Error>,
    },
    Exit,
}

impl Spawner {
    /// A spawner and the loop that serves it. Workers get `worker_fd_limit` as their open-file limit.
    pub fn new(worker_fd_limit: Option<FdLimit>) -> (Spawner, SpawnerLoop) {
        let (requests, receiver) = std::sync::mpsc::channel();
        (
            Spawner {
                requests,
                worker_fd_limit,
            },
            SpawnerLoop { requests: receiver },
        )
    }

    /// Forks and execs `command` on the spawning thread.
    async fn spawn(&self, command: std::process::Command) -> Result<io::Result<tokio::process::Child>, SpawnError> {
        let (reply, result) = oneshot::channel();
        self.requests
            .send(SpawnerMessage::Spawn {
                command: Box::new(command),
                reply,
            })
            .map_err(|_| SpawnError::ShuttingDown)?;
        result.await.map_err(|_| SpawnError::ShuttingDown)
    }

    /// The open-file limit workers get: baton's own as it started.
    pub fn worker_fd_limit(&self) -> Option<FdLimit> {
        self.worker_fd_limit
    }

    /// Blocks the signals baton handles ([`crate::reexec::handled_signals`]) until
    /// [`Spawner::unblock_signals`] (or a new image) unblocks them; resolves once they are blocked.
    pub async fn block_signals(&self) -> Result<(), SpawnError> {
        let (reply, blocked) = oneshot::channel();
        self.requests
            .send(SpawnerMessage::BlockSignals(reply))
            .map_err(|_| SpawnError::ShuttingDown)?;
        blocked.await.map_err(|_| SpawnError::ShuttingDown)
    }

    /// Lets the signals baton handles through again.
    pub fn unblock_signals(&self) {
        let _ = self.requests.send(SpawnerMessage::UnblockSignals);
    }

    /// Replaces the process's image on the main thread (see [`crate::reexec::exec`]). Resolves only if that
    /// failed, with why; the process is another program otherwise.
    pub async fn exec(&self, request: crate::reexec::ExecRequest) -> io::Error {
        let (reply, failed) = oneshot::channel();
        let message = SpawnerMessage::Exec {
            request: Box::new(request),
            reply,
        };
        if self.requests.send(message).is_err() {
            return io::Error::other("baton is shutting down");
        }
        failed
            .await
            .unwrap_or_else(|_| io::Error::other("baton is shutting down"))
    }

    /// Tells the main thread that this image has taken over what the previous one handed over: what it kept
    /// for a fall-back can go.
    pub fn adopted(&self) {
        let _ = self.requests.send(SpawnerMessage::Adopted);
    }

    /// Ends [`SpawnerLoop::run`].
    pub fn exit(&self) {
        let _ = self.requests.send(SpawnerMessage::Exit);
    }
}

impl SpawnerLoop {
    /// Serves spawn and exec requests until [`Spawner::exit`] is called or every spawner is dropped. `runtime`
    /// is the runtime whose tasks will wait for the children; `own_binary`, the binary now running, is what a
    /// new image runs again should it fail to start. `inherited`, what this image was handed, is dropped once
    /// the daemon has taken it over.
    /// `queues` are the runtime's event queues, which a re-exec hands over rather than have the exec close
    /// them ([`crate::reexec::exec`]).
    pub fn run(
        self,
        runtime: &tokio::runtime::Handle,
        own_binary: Option<&OwnedFd>,
        inherited: &mut Option<crate::reexec::Inherited>,
        queues: &[RawFd],
    ) {
        let _context = runtime.enter();
        loop {
            match self.requests.recv() {
                Ok(SpawnerMessage::Spawn { command, reply }) => {
                    // Recorded as baton's own, so that an orphan reaper never takes its status.
                    let child = crate::reaper::spawned(|| tokio::process::Command::from(*command).spawn(), |c| c.id());
                    // Nobody waits for this worker any more (its upgrade was abandoned): it must not live on.
                    if let Err(Ok(mut child)) = reply.send(child) {
                        if let Some(pid) = child.id() {
                            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                        }
                        let _ = child.start_kill();
                    }
                }
                Ok(SpawnerMessage::BlockSignals(reply)) => {
                    let _ = crate::reexec::handled_signals().thread_block();
                    let _ = reply.send(());
                }
                Ok(SpawnerMessage::UnblockSignals) => {
                    let _ = crate::reexec::handled_signals().thread_unblock();
                }
                Ok(SpawnerMessage::Adopted) => {
                    if let Some(inherited) = inherited.take() {
                        // Closing the previous image's event queues removes every registration they hold:
                        // done on a thread of its own, while the connections run. It starts with the
                        // signals blocked, as every thread but this one.
                        let handled = crate::reexec::handled_signals();
                        let _ = handled.thread_block();
                        let _ = std::thread::Builder::new()
                            .name("baton-linger".to_owned())
                            .spawn(move || drop(inherited));
                        let _ = handled.thread_unblock();
                    }
                }
                Ok(SpawnerMessage::Exec { request, reply }) => {
                    let error = crate::reexec::exec(&request, own_binary.map(AsRawFd::as_raw_fd), queues);
                    let _ = reply.send(error);
                }
                Ok(SpawnerMessage::Exit) | Err(_) => return,
            }
        }
    }
}

/// Where workers' Unix sockets live: a directory of baton's, with one subdirectory per service that only the
/// service's worker user may enter; removed when dropped.
#[derive(Debug)]
pub struct RuntimeDir {
    path: PathBuf,
}

impl RuntimeDir {
    /// Creates the directory in `$XDG_RUNTIME_DIR`, or the system's temporary directory.
    pub fn create() -> io::Result<RuntimeDir> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        // Others may pass through to a worker's own socket directory, never list or create anything.
        let dir = tempfile::Builder::new()
            .prefix("baton-")
            .permissions(std::fs::Permissions::from_mode(0o711))
            .tempdir_in(base)?;
        Ok(RuntimeDir { path: dir.keep() })
    }

    /// Takes over the directory a previous image of baton created at `path`.
    pub fn adopt(path: PathBuf) -> io::Result<RuntimeDir> {
        if !std::fs::metadata(&path)?.is_dir() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a directory"));
        }
        Ok(RuntimeDir { path })
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A running (or exited) worker process.
#[derive(Debug)]
pub struct Worker {
    /// The service it serves.
    pub service: String,
    /// Its generation within the service, from 1.
    pub generation: u64,
    /// Its process id, which is also its process group id.
    pub pid: u32,
    /// Its private address.
    pub addr: Endpoint,
    /// Copies of the read ends of its stdout and stderr pipes, when its output is logged: what a new image of
    /// baton reads the output from (the forwarding tasks own the originals, and close them at end of file).
    pub output: Option<(OwnedFd, OwnedFd)>,
    /// A pidfd of the process: it names this process and no other even once its pid is reused, and a new
    /// image of baton can wait on it. `None` where the kernel has no pidfds (before 5.3).
    pub pidfd: Option<OwnedFd>,
    exit: watch::Receiver<Option<ExitStatus>>,
    /// Set when baton asks the worker to stop, so that its exit is not reported as a crash.
    stopping: Arc<AtomicBool>,
}

impl Worker {
    /// Starts generation `generation` of `service`.
    pub async fn spawn(
        service: &ServiceConfig,
        generation: u64,
        spawner: &Spawner,
        runtime_dir: &Path,
    ) -> Result<Worker, SpawnError> {
        let identity = identity(service)?;
        let (addr, address_text) = match service.backend {
            Backend::Tcp => {
                let addr = reserve_loopback_port().map_err(SpawnError::Address)?;
                (Endpoint::Tcp(addr), addr.port().to_string())
            }
            Backend::Unix => {
                let dir = socket_dir(runtime_dir, service, identity.as_ref())?;
                let path = dir.join(format!("{}-{generation}.sock", service.name));
                if path.as_os_str().len() > MAX_SOCKET_PATH {
                    return Err(SpawnError::SocketPathTooLong(path));
                }
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(SpawnError::Address(e));
                    }
                    _ => {}
                }
                let text = path.to_string_lossy().into_owned();
                (Endpoint::Unix(path), text)
            }
        };
        let fill = |text: &str| substitute(text, service, &address_text, generation);
        let program = fill(&service.command[0]);
        let mut command = std::process::Command::new(&program);
        command
            .args(service.command[1..].iter().map(|a| fill(a)))
            .stdin(Stdio::null())
            .process_group(0);
        if service.output == Output::Log {
            command.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        for variable in PRIVATE_VARIABLES.iter().chain(crate::reexec::VARIABLES.iter()) {
            command.env_remove(variable);
        }
        command
            .envs(service.env.iter().map(|(k, v)| (k, fill(v))))
            .env(service.address_variable(), &address_text)
            .env("BATON_SERVICE", &service.name)
            .env("BATON_GENERATION", generation.to_string());
        if let Some(cwd) = &service.cwd {
            command.current_dir(cwd);
        }
        prepare_child(&mut command, identity, spawner.worker_fd_limit);
        let mut child = spawner
            .spawn(command)
            .await?
            .map_err(|source| SpawnError::Exec { program, source })?;
        let pid = child.id().expect("a child not yet waited for has a pid");
        // The child is not reaped before its wait task runs, so the pid still names it here.
        let pidfd = rustix::process::Pid::from_raw(pid as i32)
            .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok());
        let output = child
            .stdout
            .as_ref()
            .zip(child.stderr.as_ref())
            .map(|(out, err)| (out.as_fd().try_clone_to_owned(), err.as_fd().try_clone_to_owned()));
        let output = match output {
            Some((Ok(out), Ok(err))) => Some((out, err)),
            Some((Err(e), _) | (_, Err(e))) => {
                tracing::warn!(service = %service.name, generation, pid, error = %e, "cannot keep the output pipes for a re-exec");
                None
            }
            None => None,
        };
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(forward_output(stdout, service.name.clone(), generation, pid, "stdout"));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(forward_output(stderr, service.name.clone(), generation, pid, "stderr"));
        }
        let stopping = Arc::new(AtomicBool::new(false));
        let exit = watch_exit(
            service.name.clone(),
            generation,
            pid,
            Arc::clone(&stopping),
            true,
            async move { child.wait().await },
        );
        tracing::info!(service = %service.name, generation, pid, addr = %addr, "worker started");
        Ok(Worker {
            service: service.name.clone(),
            generation,
            pid,
            addr,
            output,
            pidfd,
            exit,
            stopping,
        })
    }

    /// Takes over a worker a previous image of baton started (still this process's child, across the exec):
    /// its descriptors are adopted, its exit is waited for on its pidfd (or by SIGCHLD where there is none),
    /// its output is logged again. A worker that exited and was reaped in between is reported as exited.
    pub fn adopt(service: &str, state: &crate::handover::WorkerState) -> io::Result<Worker> {
        use crate::reexec::own_fd;
        let pidfd = state.pidfd.map(own_fd);
        let output = state.output.map(|(out, err)| (own_fd(out), own_fd(err)));
        let (generation, pid) = (state.generation, state.pid);
        if state.exited.is_none() {
            crate::reaper::adopt(pid);
        }
        let stopping = Arc::new(AtomicBool::new(state.stopping));
        let exit = match state.exited {
            // Reaped by the previous image already: its status is known, and its pid no longer its own.
            Some(raw) => watch_exit(
                service.to_owned(),
                generation,
                pid,
                Arc::clone(&stopping),
                false,
                async move { Ok(ExitStatus::from_raw(raw)) },
            ),
            None => {
                let waited = pidfd.as_ref().map(OwnedFd::try_clone).transpose()?;
                watch_exit(
                    service.to_owned(),
                    generation,
                    pid,
                    Arc::clone(&stopping),
                    true,
                    async move {
                        match waited {
                            Some(pidfd) => wait_pidfd(pidfd, pid).await,
                            None => wait_pid(pid).await,
                        }
                    },
                )
            }
        };
        if let Some((out, err)) = &output {
            for (fd, name) in [(out, "stdout"), (err, "stderr")] {
                let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(fd.try_clone()?)?;
                tokio::spawn(forward_output(pipe, service.to_owned(), generation, pid, name));
            }
        }
        tracing::info!(service, generation, pid, addr = %state.addr, "worker adopted");
        Ok(Worker {
            service: service.to_owned(),
            generation,
            pid,
            addr: state.addr.clone(),
            output,
            pidfd,
            exit,
            stopping,
        })
    }

    /// Resolves with the exit status once the worker has exited and been reaped.
    pub async fn exited(&self) -> ExitStatus {
        self.exit_watch().await
    }

    /// Like [`Worker::exited`], but owning what it needs, so it can outlive a borrow of the worker.
    pub fn exit_watch(&self) -> impl Future<Output = ExitStatus> + Send + 'static {
        let mut exit = self.exit.clone();
        async move {
            match exit.wait_for(Option::is_some).await {
                Ok(status) => status.expect("waited for Some"),
                // The waiting task is gone only if the runtime is shutting down.
                Err(_) => ExitStatus::from_raw(0x7f00),
            }
        }
    }

    /// The exit status, if the worker has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// Whether baton has asked the worker to stop.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Sends `signal` to the worker's process group, unless it has exited already.
    pub fn signal(&self, signal: Signal) {
        if self.exit_status().is_none() {
            let _ = killpg(Pid::from_raw(self.pid as i32), signal);
        }
    }

    /// Asks the worker to stop with `signal`, unless it was asked already. Its exit is then expected.
    pub fn begin_stop(&self, signal: Signal) {
        if !self.stopping.swap(true, Ordering::AcqRel) {
            self.signal(signal);
        }
    }

    /// Stops the worker: `signal` (unless [`Worker::begin_stop`] sent one), then SIGKILL after `timeout`.
    /// Returns once it is reaped.
    pub async fn stop(self, signal: Signal, timeout: Duration) -> ExitStatus {
        self.begin_stop(signal);
        let status = match tokio::time::timeout(timeout, self.exited()).await {
            Ok(status) => status,
            Err(_) => {
                tracing::warn!(
                    service = %self.service, generation = self.generation, pid = self.pid,
                    timeout = %humantime::format_duration(timeout),
                    "worker ignored {signal}: sending SIGKILL"
                );
                self.signal(Signal::SIGKILL);
                self.exited().await
            }
        };
        self.remove_socket();
        status
    }

    /// Lets go of a worker that has exited and been reaped: removes its Unix socket, if it has one.
    pub fn forget(self) {
        self.remove_socket();
    }

    fn remove_socket(&self) {
        if let Some(path) = self.addr.unix_path() {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Kills the worker at once and waits until it is reaped.
    pub async fn kill(self) -> ExitStatus {
        self.stop(Signal::SIGKILL, Duration::from_secs(1)).await
    }
}

impl Drop for Worker {
    /// A worker dropped without [`Worker::stop`] (an upgrade abandoned at shutdown) is killed, never leaked.
    fn drop(&mut self) {
        if self.exit_status().is_none() {
            self.stopping.store(true, Ordering::Release);
            let _ = killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        }
    }
}

/// Waits for a worker's exit with `wait`, then (with `kill_group`) kills what it left in its process group,
/// logs the status and publishes it. `stopping` says whether the exit is expected.
fn watch_exit(
    service: String,
    generation: u64,
    pid: u32,
    stopping: Arc<AtomicBool>,
    kill_group: bool,
    wait: impl Future<Output = io::Result<ExitStatus>> + Send + 'static,
) -> watch::Receiver<Option<ExitStatus>> {
    let (exit_tx, exit) = watch::channel(None);
    tokio::spawn(async move {
        let (status, reaped_here) = match wait.await {
            Ok(status) => {
                crate::reaper::forget(pid);
                (status, true)
            }
            Err(e) => {
                tracing::error!(service = %service, generation, pid, error = %e, "cannot wait for worker");
                (ExitStatus::from_raw(0x7f00), false)
            }
        };
        // The leader is gone; whatever it left in its process group goes with it. Not when it was reaped
        // elsewhere: its pid may name another process group by now.
        if kill_group && reaped_here {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        if stopping.load(Ordering::Acquire) {
            tracing::info!(service = %service, generation, pid, status = %describe(status), "worker exited");
        } else {
            tracing::warn!(service = %service, generation, pid, status = %describe(status), "worker exited unexpectedly");
        }
        let _ = exit_tx.send(Some(status));
    });
    exit
}

/// The error of a wait for a worker that was reaped before this image could wait for it: it exited while
/// baton re-executed, and its status went with the previous image.
fn reaped_before() -> io::Error {
    io::Error::other("it exited during baton's re-exec; its exit status is lost")
}

/// Waits for the exit of the child `pidfd` (process `pid`) names and reaps it.
#[allow(unsafe_code)]
async fn wait_pidfd(pidfd: OwnedFd, pid: u32) -> io::Result<ExitStatus> {
    use rustix::process::{WaitId, WaitIdOptions, waitid};
    // SAFETY: the `OwnedFd` moves into the `AsyncFd`, which is its only owner: the descriptor stays open, and
    // names the same pidfd, until the `AsyncFd` drops.
    let pidfd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)?;
    loop {
        let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG;
        match waitid(WaitId::PidFd(std::os::fd::AsFd::as_fd(pidfd.get_ref())), options) {
            Ok(Some(status)) => {
                return Ok(wait_status(
                    status.exit_status(),
                    status.terminating_signal(),
                    status.dumped(),
                ));
            }
            // A pidfd turns readable when its process exits.
            Ok(None) => pidfd.readable().await?.clear_ready(),
            Err(rustix::io::Errno::CHILD) => return Err(reaped_before()),
            Err(rustix::io::Errno::INTR) => {}
            // A kernel with pidfds but no waitid on them (5.3): wait by pid.
            Err(rustix::io::Errno::INVAL) => return wait_pid(pid).await,
            Err(e) => return Err(e.into()),
        }
    }
}

/// The exit status of a child that exited with `code`, or was killed by `signal` (and `dumped` core).
fn wait_status(code: Option<i32>, signal: Option<i32>, dumped: bool) -> ExitStatus {
    ExitStatus::from_raw(match (code, signal) {
        (Some(code), _) => (code & 0xff) << 8,
        (None, Some(signal)) => signal | if dumped { 0x80 } else { 0 },
        (None, None) => 0x7f00,
    })
}

/// Waits for the exit of child `pid` where there are no pidfds: on every SIGCHLD, a look at that one child.
async fn wait_pid(pid: u32) -> io::Result<ExitStatus> {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let mut children = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
    loop {
        match waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(wait_status(Some(code), None, false)),
            Ok(WaitStatus::Signaled(_, signal, dumped)) => return Ok(wait_status(None, Some(signal as i32), dumped)),
            Ok(_) => {
                children.recv().await;
            }
            Err(nix::errno::Errno::ECHILD) => return Err(reaped_before()),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Who a worker runs as, when it is not baton's own user.
#[derive(Debug, Clone)]
struct Identity {
    uid: Uid,
    gid: Gid,
    /// Supplementary groups: the user's, as login would give them.
    groups: Vec<Gid>,
}

/// The user and group a worker of `service` runs as, when they are not baton's own.
fn identity(service: &ServiceConfig) -> Result<Option<Identity>, SpawnError> {
    if service.user.is_none() && service.group.is_none() {
        return Ok(None);
    }
    let failed = |message: String| SpawnError::Identity(message);
    let user = match &service.user {
        Some(name) => Some(
            User::from_name(name)
                .map_err(|e| failed(format!("cannot look up user `{name}`: {e}")))?
                .ok_or_else(|| failed(format!("no user `{name}`")))?,
        ),
        None => None,
    };
    let gid = match &service.group {
        Some(name) => {
            Group::from_name(name)
                .map_err(|e| failed(format!("cannot look up group `{name}`: {e}")))?
                .ok_or_else(|| failed(format!("no group `{name}`")))?
                .gid
        }
        None => user.as_ref().map_or_else(Gid::current, |u| u.gid),
    };
    let uid = user.as_ref().map_or_else(Uid::current, |u| u.uid);
    if !Uid::effective().is_root() {
        if uid == Uid::current() && gid == Gid::current() {
            // Already who the worker should be.
            return Ok(None);
        }
        return Err(failed(
            "running a worker as another user or group needs baton to run as root".into(),
        ));
    }
    let groups = match &user {
        Some(user) => {
            let name = std::ffi::CString::new(user.name.as_str())
                .map_err(|_| failed(format!("user name `{}` holds a NUL", user.name)))?;
            nix::unistd::getgrouplist(&name, gid)
                .map_err(|e| failed(format!("cannot list the groups of `{}`: {e}", user.name)))?
        }
        None => vec![gid],
    };
    Ok(Some(Identity { uid, gid, groups }))
}

/// The directory for the Unix sockets of `service`: a subdirectory of the runtime directory that only the
/// worker's user may enter.
fn socket_dir(runtime_dir: &Path, service: &ServiceConfig, identity: Option<&Identity>) -> Result<PathBuf, SpawnError> {
    let dir = runtime_dir.join(&service.name);
    let prepare = || -> io::Result<()> {
        match std::fs::create_dir(&dir) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        if let Some(identity) = identity {
            std::os::unix::fs::chown(&dir, Some(identity.uid.as_raw()), Some(identity.gid.as_raw()))?;
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
    };
    prepare().map_err(SpawnError::Address)?;
    Ok(dir)
}

/// The longest line of worker output logged whole; a longer one is logged in pieces of this size.
pub const MAX_OUTPUT_LINE: usize = 16 * 1024;

/// Logs what a worker writes on `stream`, line by line, tagged with its service, generation and pid.
async fn forward_output(
    stream: impl tokio::io::AsyncRead + Unpin,
    service: String,
    generation: u64,
    pid: u32,
    name: &'static str,
) {
    use tokio::io::AsyncBufReadExt;
    let mut reader = tokio::io::BufReader::new(stream);
    let mut line = Vec::new();
    let emit = |line: &[u8]| {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches(['\n', '\r']);
        tracing::info!(target: "baton::worker::output", service = %service, generation, pid, stream = name, "{text}");
    };
    loop {
        let buffer = match reader.fill_buf().await {
            Ok([]) | Err(_) => break,
            Ok(buffer) => buffer,
        };
        let newline = buffer.iter().position(|b| *b == b'\n');
        let take = newline
            .map_or(buffer.len(), |i| i + 1)
            .min(MAX_OUTPUT_LINE - line.len());
        line.extend_from_slice(&buffer[..take]);
        reader.consume(take);
        if line.ends_with(b"\n") || line.len() >= MAX_OUTPUT_LINE {
            emit(&line);
            line.clear();
        }
    }
    if !line.is_empty() {
        emit(&line);
    }
}

/// Describes an exit status the way an operator reads it: "exit code 3", "killed by SIGKILL".
pub fn describe(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        format!("exit code {code}")
    } else if let Some(signal) = status.signal() {
        match Signal::try_from(signal) {
            Ok(s) => format!("killed by {s}"),
            Err(_) => format!("killed by signal {signal}"),
        }
    } else {
        status.to_string()
    }
}

/// Asks the kernel for a free loopback port. The worker binds it a moment later; the window is small, and a
/// port taken in between shows up as a worker that never becomes ready.
fn reserve_loopback_port() -> io::Result<std::net::SocketAddr> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    listener.local_addr()
}

/// Prepares the forked child before it execs: marks every descriptor above standard error close-on-exec, switches to `identity` (supplementary groups, group, user),
/// gives it `fd_limit` back, and makes it receive SIGKILL when baton's spawning thread ends, exiting at once
/// if baton has already gone by then. The death signal is set last: a change of credentials clears it.
#[allow(unsafe_code)]
fn prepare_child(command: &mut std::process::Command, identity: Option<Identity>, fd_limit: Option<FdLimit>) {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec and calls only close_range(2) (or fcntl(2)),
    // setgroups(2), setgid(2), setuid(2), setrlimit(2), prctl(2) and getppid(2), which are async-signal-safe; everything it uses was
    // computed before the fork, it allocates nothing (errors are raw errnos) and takes no lock.
    unsafe {
        command.pre_exec(move || {
            // It inherits its standard streams, nothing else, whatever flags baton's descriptors have.
            crate::reexec::close_all_on_exec()?;
            if let Some(identity) = &identity {
                nix::unistd::setgroups(&identity.groups)?;
                nix::unistd::setgid(identity.gid)?;
                nix::unistd::setuid(identity.uid)?;
            }
            if let Some(FdLimit { soft, hard }) = fd_limit {
                nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, soft, hard)?;
            }
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // The parent died before prctl: the signal will never come.
            if nix::unistd::getppid() != parent {
                return Err(io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            Ok(())
        });
    }
}
