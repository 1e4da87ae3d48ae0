//! Re-executing baton in place: the same process runs a new binary and carries on from the handed-over
//! [`State`].
//!
//! This module holds the pieces that touch the process itself: the pre-flight check of a new binary (run as a
//! child in check mode on the real state, with a timeout), the memfd that carries the state across the exec,
//! the exec itself (on the main thread, with only the handed-over descriptors made inheritable for that one
//! moment), what a new image finds in its environment, and the fall-back exec of the previous binary when the
//! new image cannot start. The order of a hand-over is the supervisor's; see ARCHITECTURE.md.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read as _, Seek as _, Write as _};
use std::os::fd::{AsRawFd, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::signal::{SigSet, Signal};
use serde::{Deserialize, Serialize};

use crate::handover::State;

/// The variable that names the descriptor of the state a new image starts from.
pub const STATE_FD_VAR: &str = "BATON_STATE_FD";
/// The variable that names the descriptor of the previous binary, which a new image that cannot start runs.
pub const PREVIOUS_EXE_VAR: &str = "BATON_PREVIOUS_EXE";
/// The variable that names the descriptor of the previous binary's command line and environment.
pub const PREVIOUS_COMMAND_VAR: &str = "BATON_PREVIOUS_COMMAND";
/// The variable that tells the previous binary, run again, why the new one could not start.
pub const FAILURE_VAR: &str = "BATON_REEXEC_FAILURE";
/// The variable that names the previous image's event queues, which the new image closes once it runs.
pub const LINGERING_VAR: &str = "BATON_LINGERING_FDS";
/// The variable that names the process holding the previous image's address space, which the new image reaps.
pub const HOLDER_VAR: &str = "BATON_HOLDER_PID";
/// Every variable of the hand-over: none reaches a worker or a checked binary.
pub const VARIABLES: [&str; 6] = [
    STATE_FD_VAR,
    PREVIOUS_EXE_VAR,
    PREVIOUS_COMMAND_VAR,
    FAILURE_VAR,
    LINGERING_VAR,
    HOLDER_VAR,
];

/// How long a new binary's check may take, unless the request says otherwise.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection that moved bytes this recently before it parked is active: the new image resumes it first.
pub const ACTIVE_WINDOW: Duration = Duration::from_secs(1);
/// How long the connections may take to park before the hand-over is given up.
pub const PARK_TIMEOUT: Duration = Duration::from_secs(5);
/// The subcommand of the check mode.
pub const CHECK_COMMAND: &str = "reexec-check";

/// The signals baton handles. They are blocked from just before an exec until the new image has installed
/// its handlers, so that one arriving in between waits instead of being lost or killing baton.
pub fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [Signal::SIGHUP, Signal::SIGTERM, Signal::SIGINT, Signal::SIGUSR2] {
        set.add(signal);
    }
    set
}

/// What asked for a re-exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReexecTrigger {
    /// SIGUSR2.
    Signal,
    /// The admin API (or `baton reexec`).
    Api,
    /// Its own binary was replaced (`[daemon] reexec_on_change`).
    Watch,
}

/// How a re-exec ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReexecResult {
    /// The new image took over.
    Ok,
    /// The new binary was refused before anything changed.
    Refused,
    /// The exec, or the new image's start, failed: the previous binary carries on.
    Failed,
}

impl ReexecResult {
    /// The `result` label of `baton_reexecs_total`.
    pub fn label(self) -> &'static str {
        match self {
            ReexecResult::Ok => "ok",
            ReexecResult::Refused => "refused",
            ReexecResult::Failed => "failed",
        }
    }

    /// Every result, in label order.
    pub const ALL: [ReexecResult; 3] = [ReexecResult::Ok, ReexecResult::Refused, ReexecResult::Failed];
}

/// What one re-exec did: `/status` shows the last one as `last_reexec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReexecRecord {
    /// Which attempt of this process it was, from 1.
    pub attempt: u64,
    /// How it ended.
    pub result: ReexecResult,
    /// What asked for it.
    pub trigger: ReexecTrigger,
    /// The binary it ran (or would have).
    pub binary: PathBuf,
    /// The version that handed over.
    pub from_version: String,
    /// The version of the new binary, once its check told it.
    pub to_version: Option<String>,
    /// The longest time a connection went without baton moving its bytes, in milliseconds: until every
    /// handed-over connection ran again, or was watched so that its bytes are moved as they come (an idle
    /// connection's: see [`crate::watch`]).
    pub pause_ms: Option<f64>,
    /// Until the last handed-over connection ran again, in milliseconds: the idle, watched ones are taken
    /// over in the background, after the pause.
    #[serde(default)]
    pub resumed_ms: Option<f64>,
    /// The same for the connections that had moved bytes within [`ACTIVE_WINDOW`] before the hand-over,
    /// which resume first.
    #[serde(default)]
    pub active_pause_ms: Option<f64>,
    /// How many of the connections handed over were active so.
    #[serde(default)]
    pub active_connections: usize,
    /// How many of the connections handed over were idle and watched.
    #[serde(default)]
    pub watched_connections: usize,
    /// Listening sockets handed over (public and admin).
    pub listeners: usize,
    /// Worker processes handed over.
    pub workers: usize,
    /// Connections handed over.
    pub connections: usize,
    /// Why it did not go through.
    pub error: Option<String>,
    /// When it ended, in seconds since the Unix epoch.
    pub at: f64,
}

/// A re-exec under way, as the state carries it to the new image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InFlight {
    /// Which attempt it is.
    pub attempt: u64,
    /// What asked for it.
    pub trigger: ReexecTrigger,
    /// The binary run.
    pub binary: PathBuf,
    /// The version that handed over.
    pub from_version: String,
    /// The new binary's version, as its check told it.
    pub to_version: String,
    /// When the connections were asked to park: the pause runs from here.
    pub paused_at: crate::clock::Time,
    /// Listening sockets handed over.
    pub listeners: usize,
    /// Workers handed over.
    pub workers: usize,
    /// Connections handed over.
    pub connections: usize,
}

impl InFlight {
    /// The record of this re-exec, ended with `result` now.
    pub fn record(&self, result: ReexecResult, error: Option<String>, resumed: &Resumption) -> ReexecRecord {
        let since = |at: crate::clock::Time| at.since(self.paused_at).as_secs_f64() * 1e3;
        ReexecRecord {
            attempt: self.attempt,
            result,
            trigger: self.trigger,
            binary: self.binary.clone(),
            from_version: self.from_version.clone(),
            to_version: Some(self.to_version.clone()),
            pause_ms: resumed.served.map(since),
            resumed_ms: resumed.running.map(since),
            active_pause_ms: resumed.active.map(since),
            active_connections: resumed.active_connections,
            watched_connections: resumed.watched_connections,
            listeners: self.listeners,
            workers: self.workers,
            connections: self.connections,
            error,
            at: crate::control::unix_now(),
        }
    }
}

/// How the handed-over connections were taken over: when the last of them was served (ran, or was watched),
/// when the last active one ran and when the last one ran, each if it happened in time.
#[derive(Debug, Clone, Default)]
pub struct Resumption {
    /// When the last connection was served.
    pub served: Option<crate::clock::Time>,
    /// When the last active connection ran, if there were any.
    pub active: Option<crate::clock::Time>,
    /// When the last connection ran.
    pub running: Option<crate::clock::Time>,
    /// How many were active.
    pub active_connections: usize,
    /// How many were idle and watched.
    pub watched_connections: usize,
}

/// How long a hand-over waits for the open connections to join their service's watch
/// ([`crate::watch`]): any that has not joined by then resumes with the active ones.
pub const WATCH_TIMEOUT: Duration = Duration::from_secs(1);

/// What a checked binary said about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    /// Its version.
    pub version: String,
    /// The newest state format it reads.
    pub state_format: u32,
    /// The services of the configuration it would run.
    pub services: Vec<String>,
}

/// The check mode of a new binary: reads the state document `input` and says whether this binary can take
/// over from it: the format is one it reads and the configuration one it accepts.
pub fn check_mode(input: &[u8]) -> Result<CheckReport, String> {
    let state = State::decode(input).map_err(|e| crate::error::chain(&e))?;
    let config = state.running_config()?;
    for name in state.services.keys() {
        if !config.services.contains_key(name) {
            return Err(format!(
                "the state names service `{name}`, which its configuration has not"
            ));
        }
    }
    // The new image reads the admin token again: it must be there for it.
    crate::supervisor::load_token(&config.admin).map_err(|e| crate::error::chain(&e))?;
    Ok(CheckReport {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        state_format: crate::handover::VERSION,
        services: config.services.keys().cloned().collect(),
    })
}

/// Runs `binary` in check mode on `state` (its standard input), in a process group of its own, and waits at
/// most `timeout` for its answer. Whatever happens, neither it nor a child of its is left running.
pub async fn check(binary: &Path, state: &[u8], timeout: Duration) -> Result<CheckReport, String> {
    let name = binary.display();
    let input = carrier(state).map_err(|e| format!("cannot write the state for the check: {e}"))?;
    let mut command = tokio::process::Command::new(binary);
    command
        .arg(CHECK_COMMAND)
        .stdin(Stdio::from(input))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for variable in VARIABLES.iter().chain(crate::worker::PRIVATE_VARIABLES.iter()) {
        command.env_remove(variable);
    }
    // SAFETY: the closure makes only system calls (see `close_all_on_exec`).
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(close_all_on_exec);
    }
    let child = crate::reaper::spawned(|| command.spawn(), tokio::process::Child::id)
        .map_err(|e| format!("cannot run {name}: {e}"))?;
    // Its status is its wait's (or, once abandoned, the runtime's): the orphan reaper leaves it until then.
    let _own = Own(child.id());
    // However the check ends, even abandoned (baton shutting down), its process group goes with it.
    let _group = Group(child.id().map(|pid| nix::unistd::Pid::from_raw(pid as i32)));
    let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => return Err(format!("cannot wait for {name}: {e}")),
        Err(_) => {
            // Dropping the wait killed the child; the rest of its group goes when `_group` drops.
            return Err(format!(
                "{name} gave no answer within {}: not taking over with it",
                humantime::format_duration(timeout)
            ));
        }
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines = || stderr.lines().map(str::trim).filter(|l| !l.is_empty());
    let said = lines()
        .find(|l| l.starts_with("error:"))
        .or_else(|| lines().next_back())
        .unwrap_or_default();
    if !output.status.success() {
        use std::os::unix::process::ExitStatusExt as _;
        let how = crate::worker::describe(output.status);
        let hint = match output.status.code() {
            // A usage error (EX_USAGE, or clap's own 2): it does not know the check command.
            Some(64 | 2) => " (it has no re-exec check: an older baton, or not baton at all)",
            _ if output.status.signal().is_some() => " (it crashed)",
            _ => "",
        };
        let said = if said.is_empty() {
            String::new()
        } else {
            format!(": {said}")
        };
        return Err(format!("{name} refused to take over: {how}{hint}{said}"));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str::<CheckReport>(line.trim()).ok())
        .ok_or_else(|| format!("{name} is not a baton: its check printed no report"))
}

/// The process group of a check, killed when dropped.
struct Group(Option<nix::unistd::Pid>);

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(group) = self.0 {
            let _ = nix::sys::signal::killpg(group, Signal::SIGKILL);
        }
    }
}

/// A memfd holding `bytes`, read from the start: how a state goes to a check and across an exec.
pub fn carrier(bytes: &[u8]) -> io::Result<OwnedFd> {
    let fd = nix::sys::memfd::memfd_create(c"baton-state", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)?;
    let mut file = File::from(fd);
    file.write_all(bytes)?;
    file.rewind()?;
    Ok(OwnedFd::from(file))
}

/// Makes `fd` inheritable across an exec, or not.
pub fn set_inheritable(fd: RawFd, inheritable: bool) -> io::Result<()> {
    let flags = if inheritable {
        FdFlag::empty()
    } else {
        FdFlag::FD_CLOEXEC
    };
    fcntl(fd, FcntlArg::F_SETFD(flags))?;
    Ok(())
}

/// Marks every descriptor above standard error close-on-exec: the first thing a child baton starts does
/// (in `pre_exec`), so that it inherits only what it is given as its standard streams whatever flags this
/// process's descriptors have (the sockets of connections about to be handed over are inheritable).
/// Only system calls, no allocation: safe between fork and exec.
#[allow(unsafe_code)]
pub fn close_all_on_exec() -> io::Result<()> {
    // SAFETY: close_range(2) with CLOSE_RANGE_CLOEXEC only sets flags on this process's descriptors.
    let marked = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_close_range,
            3u32,
            u32::MAX,
            nix::libc::CLOSE_RANGE_CLOEXEC as nix::libc::c_uint,
        )
    };
    if marked == 0 {
        return Ok(());
    }
    // A kernel before 5.11: each descriptor in turn, up to the limit on them.
    // SAFETY: getrlimit(2) and fcntl(2) on a number that may not be open, which fails harmlessly.
    let mut limit = nix::libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    if unsafe { nix::libc::getrlimit(nix::libc::RLIMIT_NOFILE, &raw mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let top = nix::libc::c_int::try_from(limit.rlim_cur).unwrap_or(nix::libc::c_int::MAX);
    for fd in 3..top {
        unsafe { nix::libc::fcntl(fd, nix::libc::F_SETFD, nix::libc::FD_CLOEXEC) };
    }
    Ok(())
}

/// Makes each of `fds` inheritable across an exec, or not; stops at the first that fails (one not open)
/// and returns its error. Thousands are split with a second thread: an exec handing over many connections
/// waits for this.
pub fn set_all_inheritable(fds: &[RawFd], inheritable: bool) -> io::Result<()> {
    let each = |fds: &[RawFd]| {
        fds.iter().try_for_each(|fd| {
            set_inheritable(*fd, inheritable).map_err(|e| io::Error::new(e.kind(), format!("descriptor {fd}: {e}")))
        })
    };
    if fds.len() < SPLIT_AT {
        return each(fds);
    }
    let (first, second) = fds.split_at(fds.len() / 2);
    std::thread::scope(|scope| {
        let helper = std::thread::Builder::new().spawn_scoped(scope, || each(second));
        let mine = each(first);
        match helper {
            Ok(helper) => mine.and(
                helper
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("helper thread panicked"))),
            ),
            // No thread to be had: this one does the rest.
            Err(_) => mine.and_then(|()| each(second)),
        }
    })
}

/// From how many descriptors [`set_all_inheritable`] takes a second thread.
const SPLIT_AT: usize = 2048;

/// Takes ownership of descriptor `fd`, which the previous image handed over, and makes it close-on-exec
/// again, so that no worker inherits it. Fails for a descriptor that is not open.
#[allow(unsafe_code)]
pub fn adopt_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("descriptor {fd}")));
    }
    // Fails with EBADF when nothing is open there.
    set_inheritable(fd, false)?;
    // SAFETY: `fd` is open (F_SETFD succeeded), it was named in the handed-over state, and the caller adopts
    // each descriptor of the state once (the state's descriptors are checked to be distinct first), so no
    // other owner of it exists in this image.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Takes ownership of descriptor `fd` of the handed-over state, which the caller knows to be open and
/// close-on-exec already (the image made every descriptor of the state so first).
#[allow(unsafe_code)]
pub fn own_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` is named in the handed-over state, whose descriptors are checked distinct before any is
    // adopted, and each is adopted once; an image has no other owner of it. Were it not open, its first use
    // would fail with EBADF, not touch another file.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// What the exec needs: the binary and what to hand over.
#[derive(Debug)]
pub struct ExecRequest {
    /// The binary to run.
    pub binary: PathBuf,
    /// The state, in a memfd.
    pub state: OwnedFd,
    /// Every descriptor the state names that is close-on-exec ([`State::flagged_descriptors`]).
    pub inherit: Vec<RawFd>,
}

/// Replaces this process's image: runs `request.binary` with baton's own arguments and environment, plus the
/// descriptor of the state and, when there is one, of `previous` (the binary now running) with the command
/// line it runs with, for a fall-back. Must run on the main thread, the one that forked the workers (their
/// parent-death signal belongs to it), with [`handled_signals`] blocked. Returns only if the exec failed; the
/// descriptors are close-on-exec again then.
///
/// `lingering` are the runtime's event queues (epoll instances). Closing one that holds every connection's
/// registration costs the kernel a removal per registration, which an exec would do while no connection
/// moves; they are handed over too, and the new image closes them once its connections run again.
pub fn exec(request: &ExecRequest, previous: Option<RawFd>, lingering: &[RawFd]) -> io::Error {
    let command = match Command::of_this_process() {
        Ok(command) => command,
        Err(e) => return e,
    };
    let mut variables = vec![(STATE_FD_VAR, request.state.as_raw_fd().to_string())];
    let mut inherit: Vec<RawFd> = request
        .inherit
        .iter()
        .copied()
        .chain([request.state.as_raw_fd()])
        .collect();
    // Kept open until the exec: the previous command line, which a fall-back runs again.
    let mut kept = None;
    if let Some(previous) = previous {
        match carrier(&command.encode()) {
            Ok(fd) => {
                variables.push((PREVIOUS_EXE_VAR, previous.to_string()));
                variables.push((PREVIOUS_COMMAND_VAR, fd.as_raw_fd().to_string()));
                inherit.extend([previous, fd.as_raw_fd()]);
                kept = Some(fd);
            }
            Err(e) => return e,
        }
    }
    if !lingering.is_empty() {
        let list: Vec<String> = lingering.iter().map(RawFd::to_string).collect();
        variables.push((LINGERING_VAR, list.join(",")));
        inherit.extend_from_slice(lingering);
    }
    // Without a holder, the exec frees the old address space itself: slower, not wrong.
    let holder = Holder::start()
        .inspect_err(|e| tracing::debug!(error = %e, "no process to hold the address space"))
        .ok();
    if let Some(holder) = &holder {
        variables.push((HOLDER_VAR, holder.pid.to_string()));
    }
    let error = replace_image(Image::Path(&request.binary), &command.with(&variables), &inherit);
    drop(holder);
    drop(kept);
    error
}

/// Forgets a child of baton's own when dropped ([`crate::reaper::forget`]).
struct Own(Option<u32>);

impl Drop for Own {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            crate::reaper::forget(pid);
        }
    }
}

/// A process that shares this image's address space (`CLONE_VM`) and outlives the exec, then lets the
/// address space go: the exec no longer frees the pages of every connection's memory while no connection
/// moves; the holder does, after, on its own. It does nothing but wait for the end of a close-on-exec pipe
/// to close (at the exec, or when it is dropped because the exec failed) and exit; the new image reaps it
/// ([`reap_holder`]).
struct Holder {
    pid: nix::libc::pid_t,
    /// The pipe's write end, close-on-exec: closing it ends the holder.
    release: Option<OwnedFd>,
    /// The holder's stack and its argument, which must stay put until it has exited (dropped after `drop`).
    _stack: Vec<u8>,
    _ends: Box<[nix::libc::c_int; 2]>,
}

/// The holder's whole life, on its own stack in the shared address space: only system calls, no
/// allocation, no thread-local state.
#[allow(unsafe_code)]
extern "C" fn hold(ends: *mut nix::libc::c_void) -> nix::libc::c_int {
    // SAFETY: `ends` is the holder's `[read, write]`, which stays allocated (in this address space, which
    // the holder keeps) until the holder has exited.
    unsafe {
        let [read, write] = *ends.cast::<[nix::libc::c_int; 2]>();
        // Its own copy of the write end would keep the pipe open.
        nix::libc::close(write);
        let mut byte = 0u8;
        nix::libc::read(read, (&raw mut byte).cast(), 1);
        nix::libc::_exit(0)
    }
}

impl Holder {
    #[allow(unsafe_code)]
    fn start() -> io::Result<Holder> {
        const STACK: usize = 64 * 1024;
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let mut stack = vec![0u8; STACK];
        let mut ends = Box::new([read.as_raw_fd(), write.as_raw_fd()]);
        // The stack grows down from its 16-byte aligned top.
        let top = stack
            .as_mut_ptr()
            .wrapping_add(STACK - (stack.as_ptr() as usize + STACK) % 16);
        // SAFETY: `hold` touches nothing but its argument and its stack, both kept allocated until it exits
        // (`Drop` waits for it); the flags make it a child process sharing the address space, not a thread.
        let pid = unsafe {
            nix::libc::clone(
                hold,
                top.cast(),
                nix::libc::CLONE_VM | nix::libc::SIGCHLD,
                (&raw mut *ends).cast(),
            )
        };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        crate::reaper::adopt(pid.unsigned_abs());
        // The holder has the read end (its copy of the descriptor table has it).
        drop(read);
        Ok(Holder {
            pid,
            release: Some(write),
            _stack: stack,
            _ends: ends,
        })
    }
}

impl Drop for Holder {
    /// Ends the holder and reaps it: the exec failed.
    fn drop(&mut self) {
        drop(self.release.take());
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(self.pid), None);
        crate::reaper::forget(self.pid.unsigned_abs());
    }
}

/// Reaps the process that held the previous image's address space, on a thread of its own: it exits once
/// it has freed it.
pub fn reap_holder() {
    let Some(pid) = std::env::var(HOLDER_VAR).ok().and_then(|pid| pid.parse::<i32>().ok()) else {
        return;
    };
    crate::reaper::adopt(pid.unsigned_abs());
    let reaping = std::thread::Builder::new().name("baton-reap".into()).spawn(move || {
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        crate::reaper::forget(pid.unsigned_abs());
    });
    if let Err(e) = reaping {
        tracing::warn!(error = %e, pid, "cannot reap the process that held the previous image's memory");
    }
}

/// The event queues (epoll instances) among the low descriptors, less `excluded` (sorted): call it right after the
/// runtime is built, when the new ones are its own. A new descriptor takes the lowest number free, so the
/// runtime's are among the first few; looking no further keeps this cheap however many are open.
pub fn event_queues(excluded: &[RawFd]) -> Vec<RawFd> {
    (3..256)
        .filter(|fd| excluded.binary_search(fd).is_err())
        // Whether it is open costs far less to ask than what it is.
        .filter(|fd| fcntl(*fd, FcntlArg::F_GETFD).is_ok())
        .filter(|fd| {
            std::fs::read_link(format!("/proc/self/fd/{fd}"))
                .is_ok_and(|target| target.as_os_str() == "anon_inode:[eventpoll]")
        })
        .collect()
}

/// The fall-back of a new image that cannot start: runs the previous binary `previous` again, as it ran
/// (`command`), on the same state, telling it why. Returns only if that exec failed too.
pub fn fall_back(previous: &OwnedFd, command: &Command, state: RawFd, inherit: &[RawFd], why: &str) -> io::Error {
    let variables = [(STATE_FD_VAR, state.to_string()), (FAILURE_VAR, why.to_owned())];
    let inherit: Vec<RawFd> = inherit.iter().copied().chain([state]).collect();
    replace_image(Image::Fd(previous), &command.with(&variables), &inherit)
}

/// A command line and environment, as an exec takes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    args: Vec<CString>,
    env: Vec<CString>,
}

impl Command {
    /// This process's arguments and environment, less the hand-over's variables.
    fn of_this_process() -> io::Result<Command> {
        let cstring = |bytes: Vec<u8>| CString::new(bytes).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
        let args = std::env::args_os()
            .map(|a| cstring(a.into_vec()))
            .collect::<io::Result<Vec<_>>>()?;
        let mut env = Vec::new();
        for (key, value) in std::env::vars_os() {
            if VARIABLES.iter().any(|v| key == *v) {
                continue;
            }
            let mut pair = key.into_vec();
            pair.push(b'=');
            pair.extend(value.into_vec());
            env.push(cstring(pair)?);
        }
        Ok(Command { args, env })
    }

    /// The command with `variables` added to its environment.
    fn with(&self, variables: &[(&str, String)]) -> Command {
        let mut command = self.clone();
        for (key, value) in variables {
            // A value with a NUL cannot be passed; the variables here are numbers and messages.
            if let Ok(pair) = CString::new(format!("{key}={}", value.replace('\0', " "))) {
                command.env.push(pair);
            }
        }
        command
    }

    /// The arguments, a NUL after each, an empty one, then the environment likewise.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for arg in &self.args {
            out.extend_from_slice(arg.as_bytes_with_nul());
        }
        out.push(0);
        for pair in &self.env {
            out.extend_from_slice(pair.as_bytes_with_nul());
        }
        out
    }

    /// Reads what [`Command::encode`] wrote.
    fn decode(bytes: &[u8]) -> io::Result<Command> {
        let malformed = || io::Error::new(io::ErrorKind::InvalidData, "malformed previous command line");
        let body = bytes.strip_suffix(&[0]).unwrap_or(bytes);
        let mut parts = body.split(|b| *b == 0);
        let mut args = Vec::new();
        for part in parts.by_ref() {
            if part.is_empty() {
                break;
            }
            args.push(CString::new(part).map_err(|_| malformed())?);
        }
        let env = parts
            .filter(|p| !p.is_empty())
            .map(|p| CString::new(p).map_err(|_| malformed()))
            .collect::<io::Result<Vec<_>>>()?;
        if args.is_empty() {
            return Err(malformed());
        }
        Ok(Command { args, env })
    }
}

enum Image<'a> {
    Path(&'a Path),
    Fd(&'a OwnedFd),
}

fn replace_image(image: Image<'_>, command: &Command, inherit: &[RawFd]) -> io::Error {
    // A handled signal reverts to its default action at the exec (SIGUSR2's kills): it must wait, pending,
    // until the next image has its handlers.
    let _ = handled_signals().thread_block();
    if let Err(e) = set_all_inheritable(inherit, true) {
        for fd in inherit {
            let _ = set_inheritable(*fd, false);
        }
        return e;
    }
    tracing::debug!(descriptors = inherit.len(), "descriptors inheritable: exec");
    let error = match image {
        Image::Path(path) => match CString::new(path.as_os_str().as_bytes()) {
            Ok(path) => nix::unistd::execve(&path, &command.args, &command.env)
                .map_or_else(io::Error::from, |never| match never {}),
            Err(_) => io::Error::from(io::ErrorKind::InvalidInput),
        },
        Image::Fd(fd) => nix::unistd::fexecve(fd.as_raw_fd(), &command.args, &command.env)
            .map_or_else(io::Error::from, |never| match never {}),
    };
    for fd in inherit {
        let _ = set_inheritable(*fd, false);
    }
    error
}

/// What an image started by a re-exec finds: the state, and how to fall back.
#[derive(Debug)]
pub struct Inherited {
    /// The state document.
    pub state: Vec<u8>,
    /// The memfd it came in, kept for a fall-back.
    pub state_fd: OwnedFd,
    /// The previous binary, and how it ran, to run again should this image fail to start.
    pub previous: Option<(OwnedFd, Command)>,
    /// Why the new binary could not start, when this is the previous one run again.
    pub failure: Option<String>,
    /// The previous image's event queues, to close once the connections run again.
    pub lingering: Vec<OwnedFd>,
}

impl Inherited {
    /// What the environment hands this image; `None` on a fresh start. Call it once, first thing.
    pub fn take() -> io::Result<Option<Inherited>> {
        let Some(fd) = std::env::var_os(STATE_FD_VAR) else {
            return Ok(None);
        };
        let fd = parse_fd(STATE_FD_VAR, &fd)?;
        let mut file = File::from(adopt_fd(fd)?);
        let mut state = Vec::new();
        file.rewind()?;
        file.read_to_end(&mut state)?;
        let previous = match (
            std::env::var_os(PREVIOUS_EXE_VAR),
            std::env::var_os(PREVIOUS_COMMAND_VAR),
        ) {
            (Some(exe), Some(command)) => {
                let exe = adopt_fd(parse_fd(PREVIOUS_EXE_VAR, &exe)?)?;
                let mut file = File::from(adopt_fd(parse_fd(PREVIOUS_COMMAND_VAR, &command)?)?);
                let mut bytes = Vec::new();
                file.rewind()?;
                file.read_to_end(&mut bytes)?;
                Some((exe, Command::decode(&bytes)?))
            }
            _ => None,
        };
        let failure = std::env::var(FAILURE_VAR).ok();
        let mut lingering = Vec::new();
        if let Some(list) = std::env::var_os(LINGERING_VAR) {
            for fd in list.to_string_lossy().split(',').filter(|f| !f.is_empty()) {
                lingering.push(adopt_fd(parse_fd(LINGERING_VAR, std::ffi::OsStr::new(fd))?)?);
            }
        }
        Ok(Some(Inherited {
            state,
            state_fd: OwnedFd::from(file),
            previous,
            failure,
            lingering,
        }))
    }
}

fn parse_fd(name: &str, value: &std::ffi::OsStr) -> io::Result<RawFd> {
    value.to_str().and_then(|v| v.parse().ok()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{name}={} is not a descriptor", value.to_string_lossy()),
        )
    })
}

/// This process's own binary, opened once at start (`O_PATH` is enough to exec it), so that a fall-back
/// runs this very binary whatever has since happened to the file at its path.
pub fn open_own_binary() -> io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_PATH)
        .open("/proc/self/exe")?;
    Ok(OwnedFd::from(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_carrier_reads_back_what_was_written() {
        let fd = carrier(b"{\"version\":1}").expect("memfd");
        let mut file = File::from(fd);
        let mut back = String::new();
        file.read_to_string(&mut back).expect("read");
        assert_eq!(back, "{\"version\":1}");
    }

    #[test]
    fn the_check_mode_refuses_what_is_not_a_state_with_a_reason() {
        let error = check_mode(b"#!/bin/sh").expect_err("not a state");
        assert!(error.contains("not a baton state"), "{error}");
        let fresh = State::fresh().encode().expect("encode");
        let error = check_mode(&fresh).expect_err("no configuration");
        assert!(error.contains("no configuration"), "{error}");
    }

    #[test]
    fn a_command_line_reads_back_as_written() {
        let command = Command::of_this_process().expect("this process");
        assert_eq!(Command::decode(&command.encode()).expect("decode"), command);
        assert!(Command::decode(b"").is_err());
    }

    #[test]
    fn a_child_inherits_no_descriptor_beyond_its_streams_whatever_its_flags() {
        use std::os::unix::process::CommandExt as _;
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        // An inheritable copy, numbered well above any the child opens itself (`ls` opens the directory).
        let high = fcntl(read.as_raw_fd(), FcntlArg::F_DUPFD(200)).expect("dup");
        let read = own_fd(high);
        let listing = |guarded: bool| {
            let mut command = std::process::Command::new("ls");
            command.arg("/proc/self/fd");
            if guarded {
                // SAFETY: the closure makes only system calls.
                #[allow(unsafe_code)]
                unsafe {
                    command.pre_exec(close_all_on_exec);
                }
            }
            let output = command.output().expect("ls");
            String::from_utf8(output.stdout).expect("UTF-8")
        };
        let fd = read.as_raw_fd().to_string();
        assert!(
            listing(false).lines().any(|l| l == fd),
            "without it, the child inherits {fd}"
        );
        let guarded = listing(true);
        assert!(!guarded.lines().any(|l| l == fd), "the child inherited {fd}: {guarded}");
        drop(write);
    }

    #[test]
    fn a_closed_or_negative_descriptor_is_not_adopted() {
        assert!(adopt_fd(-1).is_err());
        assert!(adopt_fd(1_000_000).is_err());
    }
}
