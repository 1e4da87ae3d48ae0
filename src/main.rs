//! The `baton` command: parses arguments, sets up logging and the runtime, maps errors to exit codes.
//!
//! The process's main thread is kept for one job: forking workers (see `baton::worker::Spawner`), so that
//! their parent-death signal is tied to a thread that lives as long as baton.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use baton::cli;
use baton::config::Config;
use baton::error::chain;
use baton::worker::Spawner;
use clap::{Parser, Subcommand, ValueEnum};
use nix::sys::signal::{SigSet, Signal};
use tokio::signal::unix::{SignalKind, signal};

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
    /// Switch a service back to its previous worker, while it is still warm.
    Rollback {
        #[command(flatten)]
        admin: AdminArgs,
        /// The service.
        service: String,
    },
    /// Re-read the configuration file and upgrade the services, like SIGHUP.
    Reload {
        #[command(flatten)]
        admin: AdminArgs,
        /// Upgrade only the services whose worker settings changed.
        #[arg(long)]
        changed: bool,
    },
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
    // Until their handlers are installed, the signals baton handles are held pending rather than fatal.
    let handled = signal_set();
    let _ = handled.thread_block();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
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
        Command::Rollback { admin, service } => {
            client(admin, |client| async move { cli::rollback(&client, &service).await })
        }
        Command::Reload { admin, changed } => {
            client(admin, |client| async move { cli::reload(&client, changed).await })
        }
        Command::Run { config, threads } => match run(&config, threads) {
            Ok(()) => ExitCode::SUCCESS,
            Err(Failure::Config(e)) => {
                eprintln!("error: {}", chain(&e));
                ExitCode::from(EXIT_CONFIG)
            }
            Err(Failure::Runtime(e)) => {
                tracing::error!("{e:#}");
                eprintln!("error: {e:#}");
                ExitCode::from(EXIT_FAILURE)
            }
        },
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
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Runtime(e)
    }
}

/// Runs the daemon on the runtime while the main thread forks workers. With one thread, the runtime is a
/// current-thread one on a thread of its own: no work-stealing queues, no cross-thread wake-ups.
fn run(config_path: &Path, threads: Option<u16>) -> Result<(), Failure> {
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
    let worker_fd_limit = match baton::worker::raise_fd_limit() {
        Ok(limit) => Some(limit),
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
            None
        }
    };
    let (spawner, spawner_loop) = Spawner::new(worker_fd_limit);
    let (done_tx, done) = std::sync::mpsc::channel();
    let driver = {
        // Signals are registered before anything else, so that a SIGHUP during start-up is queued, not fatal.
        let _context = runtime.enter();
        let reload = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
        let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let config = Config::load(config_path).map_err(Failure::Config)?;
        // Ends the spawner loop on the main thread when the daemon ends, even by a panic.
        let exit_guard = SpawnerExit(spawner.clone());
        let daemon = async move {
            let _exit_guard = exit_guard;
            let shutdown = async move {
                let name = tokio::select! {
                    _ = terminate.recv() => "SIGTERM",
                    _ = interrupt.recv() => "SIGINT",
                };
                tracing::info!("{name}: draining, then exiting (send it again to exit at once)");
                tokio::spawn(async move {
                    tokio::select! {
                        _ = terminate.recv() => {},
                        _ = interrupt.recv() => {},
                    }
                    tracing::warn!("second signal: exiting now; workers are killed");
                    std::process::exit(i32::from(EXIT_FAILURE));
                });
            };
            let result = baton::run(config, spawner, reload, shutdown).await;
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
        let _ = signal_set().thread_unblock();
        driver
    };
    spawner_loop.run(runtime.handle());
    let result = done.recv().context("the daemon task ended without a result")?;
    if let Some(driver) = driver {
        let _ = driver.join();
    }
    if let Ok(runtime) = std::sync::Arc::try_unwrap(runtime) {
        runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    }
    result.map_err(|e| Failure::Runtime(anyhow::anyhow!(chain(&e))))
}

/// The signals baton handles: SIGHUP, SIGTERM, SIGINT.
fn signal_set() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [Signal::SIGHUP, Signal::SIGTERM, Signal::SIGINT] {
        set.add(signal);
    }
    set
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
