//! The `baton` command: parses arguments, sets up logging and the runtime, maps errors to exit codes.
//!
//! The process's main thread is kept for one job: forking workers (see `baton::worker::Spawner`), so that
//! their parent-death signal is tied to a thread that lives as long as baton; and, the same thread, replacing
//! baton's image in a re-exec. An image started by a re-exec that cannot take over runs the previous binary
//! again on the same state.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use baton::cli;
use baton::config::Config;
use baton::error::chain;
use baton::handover::State;
use baton::reexec::{self, Inherited};
use baton::supervisor::{Options, Signals, Start};
use baton::worker::{FdLimit, Spawner};
use clap::{Parser, Subcommand, ValueEnum};

/// Exit code of a runtime failure.
const EXIT_FAILURE: u8 = 1;
/// Exit code of a command-line usage error (sysexits' EX_USAGE).
const EXIT_USAGE: u8 = 64;
/// Exit code of an invalid configuration (sysexits' EX_CONFIG).
const EXIT_CONFIG: u8 = 78;

/// A zero-downtime TCP front proxy: forwards connections to worker processes and upgrades them without
/// dropping one.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        /// The configuration file.
        #[arg(long, short, default_value = "conf/baton.toml")]
        config: PathBuf,
        /// Threads that carry connections (default: one per CPU). One runs the whole daemon on one thread.
        #[arg(long, env = "BATON_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
        threads: Option<u16>,
        /// Write baton's process id here once its sockets are bound (refused if it names a running baton).
        #[arg(long, env = "BATON_PID_FILE")]
        pid_file: Option<PathBuf>,
        /// Become a child subreaper: orphans of the workers' children are reaped by baton, as when it is
        /// PID 1 (which it does anyway).
        #[arg(long, env = "BATON_SUBREAPER")]
        subreaper: bool,
    },
    /// Validate a configuration file without binding or starting anything.
    Check {
        /// The configuration file.
        #[arg(long, short, default_value = "conf/baton.toml")]
        config: PathBuf,
    },
    /// Show every service: generation, pid, phase, uptime, connections, health.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print the JSON of the admin API instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Upgrade a service to a new worker and follow it to the end.
    Upgrade {
        #[command(flatten)]
        admin: AdminArgs,
        /// The service.
        service: String,
    },
    /// Switch a service back to its previous worker while it is still warm; after the watchdog window, start
    /// its previous release (or GENERATION's) again as a new generation.
    Rollback {
        #[command(flatten)]
        admin: AdminArgs,
        /// The service.
        service: String,
        /// Start this generation's release again.
        #[arg(long, value_name = "GENERATION")]
        to: Option<u64>,
    },
    /// End a service's canary: its new worker takes every new connection now.
    Promote {
        #[command(flatten)]
        admin: AdminArgs,
        /// The service.
        service: String,
    },
    /// List the releases a service remembers (the last 10): generation, command, started, ended, outcome.
    Releases {
        #[command(flatten)]
        admin: AdminArgs,
        /// The service.
        service: String,
        /// Print the JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Re-read the configuration file and upgrade the services, like SIGHUP.
    Reload {
        #[command(flatten)]
        admin: AdminArgs,
        /// Upgrade only the services whose worker settings changed.
        #[arg(long)]
        changed: bool,
    },
    /// Re-execute baton in place with the binary now on disk: same process, sockets, workers and
    /// connections. The running configuration is kept (SIGHUP re-reads it).
    Reexec {
        #[command(flatten)]
        admin: AdminArgs,
        /// The binary to run, instead of the one at the path baton was started from.
        #[arg(long)]
        binary: Option<PathBuf>,
        /// How long the new binary's check may take.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        check_timeout: std::time::Duration,
    },
    /// Check mode of a re-exec, run by the baton handing over: reads the state on standard input and says
    /// whether this binary can take over from it.
    #[command(name = "reexec-check", hide = true)]
    ReexecCheck,
}

/// Where the admin API is.
#[derive(Debug, clap::Args)]
struct AdminArgs {
    /// The configuration file that names the admin API.
    #[arg(long, short, default_value = "conf/baton.toml")]
    config: PathBuf,
    /// The admin API's address (host:port or unix:/path), instead of the configuration's.
    #[arg(long)]
    admin: Option<String>,
    /// A file holding the admin token, instead of the configuration's token_file.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

fn main() -> ExitCode {
    // Until their handlers are installed, the signals baton handles are held pending rather than fatal (and,
    // after a re-exec, the ones that came during the exec wait here).
    let handled = reexec::handled_signals();
    let _ = handled.thread_block();
    reexec::reap_holder();
    let inherited = match Inherited::take() {
        Ok(inherited) => inherited,
        Err(e) => {
            eprintln!("error: cannot read the state handed over by the previous image: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            if let Some(inherited) = &inherited {
                let message = e.to_string();
                let first = message.lines().next().unwrap_or_default().trim_start_matches("error: ");
                return fall_back(inherited, &[], &format!("the new image cannot start: {first}"));
            }
            let usage = e.use_stderr();
            let _ = e.print();
            return ExitCode::from(if usage { EXIT_USAGE } else { 0 });
        }
    };
    if !matches!(cli.command, Command::Run { .. }) {
        // Only the daemon handles these signals; a command that talks to it stops on Ctrl-C.
        let _ = handled.thread_unblock();
    }
    init_logging(cli.log_format);
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(loaded) => {
                let names: Vec<&str> = loaded.services.keys().map(String::as_str).collect();
                println!(
                    "{}: ok ({} service(s): {})",
                    config.display(),
                    names.len(),
                    names.join(", ")
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {}", chain(&e));
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Status { admin, json } => client(admin, |client| async move { cli::status(&client, json).await }),
        Command::Upgrade { admin, service } => {
            client(admin, |client| async move { cli::upgrade(&client, &service).await })
        }
        Command::Rollback { admin, service, to } => {
            client(
                admin,
                |client| async move { cli::rollback(&client, &service, to).await },
            )
        }
        Command::Promote { admin, service } => {
            client(admin, |client| async move { cli::promote(&client, &service).await })
        }
        Command::Releases { admin, service, json } => {
            client(
                admin,
                |client| async move { cli::releases(&client, &service, json).await },
            )
        }
        Command::Reload { admin, changed } => {
            client(admin, |client| async move { cli::reload(&client, changed).await })
        }
        Command::Reexec {
            admin,
            binary,
            check_timeout,
        } => client(admin, |client| async move {
            cli::reexec(&client, binary.as_deref(), check_timeout).await
        }),
        Command::ReexecCheck => {
            use std::io::Read as _;
            let mut input = Vec::new();
            let checked = std::io::stdin()
                .read_to_end(&mut input)
                .map_err(|e| format!("cannot read the state: {e}"))
                .and_then(|_| reexec::check_mode(&input));
            match checked {
                Ok(report) => {
                    println!("{}", serde_json::to_string(&report).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: cannot take over: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::Run {
            config,
            threads,
            pid_file,
            subreaper,
        } => {
            // Sockets a service manager passed belong to a fresh start; taken before any thread starts.
            let passed = match inherited {
                Some(_) => Vec::new(),
                None => match baton::activation::take() {
                    Ok(passed) => passed,
                    Err(e) => {
                        eprintln!("error: the sockets the service manager passed: {e}");
                        return ExitCode::from(EXIT_FAILURE);
                    }
                },
            };
            let options = Options {
                passed,
                pid_file,
                subreaper,
            };
            run_daemon(&config, threads, options, inherited)
        }
    }
}

/// Runs the daemon and turns how it ended into baton's exit code.
fn run_daemon(config: &Path, threads: Option<u16>, options: Options, inherited: Option<Inherited>) -> ExitCode {
    match run(config, threads, options, inherited) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Resume(why, inherited, descriptors)) => fall_back(&inherited, &descriptors, &why),
        Err(Failure::Config(e)) => {
            eprintln!("error: {}", chain(&e));
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Failure::Runtime(e)) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Runs one client command against the admin API; its errors are one line on stderr.
fn client<F, Fut>(admin: AdminArgs, command: F) -> ExitCode
where
    F: FnOnce(cli::Client) -> Fut,
    Fut: std::future::Future<Output = Result<(), cli::CliError>>,
{
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let result = runtime.block_on(async {
        let client = cli::Client::locate(&admin.config, admin.admin.as_deref(), admin.token_file)?;
        command(client).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(cli::CliError::Config(e)) => {
            eprintln!("error: {}", chain(&e));
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Why `run` failed, which decides the exit code.
enum Failure {
    Config(baton::config::ConfigError),
    Runtime(anyhow::Error),
    /// An image started by a re-exec could not take over: what it was handed, and the descriptors the state
    /// names, for the fall-back.
    Resume(String, Box<Inherited>, Vec<std::os::fd::RawFd>),
}

/// Runs the previous binary again on the state this image could not take over, telling it `why`. Returns
/// only if that is impossible: the exit code then.
fn fall_back(inherited: &Inherited, descriptors: &[std::os::fd::RawFd], why: &str) -> ExitCode {
    use std::os::fd::AsRawFd as _;
    let Some((previous, command)) = &inherited.previous else {
        eprintln!("error: {why}");
        return ExitCode::from(EXIT_FAILURE);
    };
    eprintln!("error: {why}: running the previous binary again");
    let error = reexec::fall_back(previous, command, inherited.state_fd.as_raw_fd(), descriptors, why);
    eprintln!("error: cannot run the previous binary again: {error}");
    ExitCode::from(EXIT_FAILURE)
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Runtime(e)
    }
}

/// Runs the daemon on the runtime while the main thread forks workers. With one thread, the runtime is a
/// current-thread one on a thread of its own: no work-stealing queues, no cross-thread wake-ups. With
/// `inherited`, the daemon carries on from the state a previous image handed over instead of starting.
fn run(
    config_path: &Path,
    threads: Option<u16>,
    options: Options,
    inherited: Option<Inherited>,
) -> Result<(), Failure> {
    let mut inherited = inherited;
    // Before anything is bound: a second baton on the same pid file stops here, saying why.
    if let (Some(path), None) = (&options.pid_file, &inherited) {
        baton::pidfile::PidFile::check(path).map_err(|e| Failure::Runtime(anyhow::Error::new(e)))?;
    }
    let resumed = match &inherited {
        None => None,
        Some(handed) => match resume(handed) {
            Ok(resumed) => Some(resumed),
            Err((why, descriptors)) => {
                let handed = inherited.take().expect("handed over");
                return Err(Failure::Resume(why, Box::new(handed), descriptors));
            }
        },
    };
    let (resumed, descriptors) = match resumed {
        Some(Resumption {
            state,
            config,
            descriptors,
        }) => (Some((state, config)), descriptors),
        None => (None, Vec::new()),
    };
    let single = threads == Some(1);
    let mut builder = if single {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if let Some(threads) = threads.filter(|_| !single) {
        builder.worker_threads(usize::from(threads));
    }
    let runtime = builder
        .enable_all()
        .thread_name("baton")
        .build()
        .context("cannot start the runtime")?;
    let runtime = std::sync::Arc::new(runtime);
    // The runtime's own event queues (not the previous image's, which this one closes once it runs).
    let mut known: Vec<std::os::fd::RawFd> = inherited
        .iter()
        .flat_map(|i| i.lingering.iter().map(std::os::fd::AsRawFd::as_raw_fd))
        .collect();
    known.extend_from_slice(&descriptors);
    known.sort_unstable();
    let queues = reexec::event_queues(&known);
    let raised = baton::worker::raise_fd_limit();
    let worker_fd_limit = match (&resumed, raised) {
        // The limit as it was before the first image raised it.
        (Some((state, _)), _) => state.fd_limit.map(|(soft, hard)| FdLimit { soft, hard }),
        (None, Ok(limit)) => Some(limit),
        (None, Err(e)) => {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
            None
        }
    };
    let own_binary = match reexec::open_own_binary() {
        Ok(fd) => Some(fd),
        Err(e) => {
            tracing::warn!(error = %e, "cannot open baton's own binary: a failed re-exec could not fall back to it");
            None
        }
    };
    let (spawner, spawner_loop) = Spawner::new(worker_fd_limit);
    let (done_tx, done) = std::sync::mpsc::channel();
    let driver = {
        // Signals are registered before anything else, so that a SIGHUP during start-up is queued, not fatal.
        let _context = runtime.enter();
        let signals = Signals::register().context("cannot handle signals")?;
        let (config, start) = match resumed {
            Some((state, config)) => (
                config,
                Start::Resume {
                    state: Box::new(state),
                    failure: inherited.as_ref().and_then(|i| i.failure.clone()),
                },
            ),
            None => (Config::load(config_path).map_err(Failure::Config)?, Start::Fresh),
        };
        // Ends the spawner loop on the main thread when the daemon ends, even by a panic.
        let exit_guard = SpawnerExit(spawner.clone());
        let daemon = async move {
            let _exit_guard = exit_guard;
            let result = baton::run(config, spawner, signals, start, options).await;
            let _ = done_tx.send(result);
        };
        // The runtime's threads are started with the signals blocked (they are blocked on this thread now);
        // the main thread takes them once the daemon runs.
        let driver = if single {
            let runtime = std::sync::Arc::clone(&runtime);
            let thread = std::thread::Builder::new()
                .name("baton".to_owned())
                .spawn(move || runtime.block_on(daemon))
                .context("cannot start the runtime's thread")?;
            Some(thread)
        } else {
            runtime.spawn(daemon);
            None
        };
        let _ = reexec::handled_signals().thread_unblock();
        driver
    };
    spawner_loop.run(runtime.handle(), own_binary.as_ref(), &mut inherited, &queues);
    let result = done.recv().context("the daemon task ended without a result")?;
    if let (Err(baton::supervisor::StartError::Resume(why)), Some(handed)) = (&result, inherited.take()) {
        // Nothing of what the daemon adopted may be closed before the previous binary takes it back.
        std::mem::forget(runtime);
        return Err(Failure::Resume(
            format!("the new image cannot take over: {why}"),
            Box::new(handed),
            descriptors,
        ));
    }
    if let Some(driver) = driver {
        let _ = driver.join();
    }
    if let Ok(runtime) = std::sync::Arc::try_unwrap(runtime) {
        runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    }
    result.map_err(|e| Failure::Runtime(anyhow::anyhow!(chain(&e))))
}

/// What an image started by a re-exec carries on from.
struct Resumption {
    state: State,
    config: Config,
    /// Every descriptor the state names.
    descriptors: Vec<std::os::fd::RawFd>,
}

/// The state and configuration an image started by a re-exec carries on from; or why it cannot, with the
/// descriptors the state names (as far as it could be read).
fn resume(inherited: &Inherited) -> Result<Resumption, (String, Vec<std::os::fd::RawFd>)> {
    tracing::debug!("the new image runs");
    let started = std::time::Instant::now();
    let state = State::decode(&inherited.state).map_err(|e| {
        (
            format!("the new image cannot read the state: {}", chain(&e)),
            Vec::new(),
        )
    })?;
    let descriptors = state.descriptors();
    let failed = |why: String| (format!("the new image cannot take over: {why}"), descriptors.clone());
    // Each is checked open, and made close-on-exec at once (a fall-back makes them inheritable again); the
    // sockets of watched connections are, as each connection is taken over. No child this image starts
    // inherits one meanwhile: each marks its descriptors close-on-exec first. Descriptors the state does
    // not name, such as any baton's own parent gave it, are left as they are.
    if let Err(e) = reexec::set_all_inheritable(&state.flagged_descriptors(), false) {
        return Err(failed(format!("a descriptor of the state is not open: {e}")));
    }
    let config = state.running_config().map_err(failed)?;
    tracing::debug!(
        state_bytes = inherited.state.len(),
        descriptors = descriptors.len(),
        took_ms = started.elapsed().as_secs_f64() * 1e3,
        "read the handed-over state"
    );
    Ok(Resumption {
        state,
        config,
        descriptors,
    })
}

/// Calls [`Spawner::exit`] when dropped.
struct SpawnerExit(Spawner);

impl Drop for SpawnerExit {
    fn drop(&mut self) {
        self.0.exit();
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
