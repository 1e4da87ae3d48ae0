//! baton under process managers: systemd's notification protocol (a test-side socket as `NOTIFY_SOCKET`),
//! the pid file, and baton as PID 1 of a PID namespace reaping orphans.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::support::*;

/// The notify socket systemd would give baton, every message it received and the descriptors that came
/// with them (`SCM_RIGHTS`), as a file descriptor store keeps them.
struct Manager {
    path: std::path::PathBuf,
    messages: Arc<Mutex<Vec<String>>>,
    stored: Arc<Mutex<Vec<(String, OwnedFd)>>>,
    _dir: tempfile::TempDir,
}

impl Manager {
    fn new() -> Manager {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        let messages = Arc::new(Mutex::new(Vec::new()));
        let stored = Arc::new(Mutex::new(Vec::new()));
        let (kept, store) = (Arc::clone(&messages), Arc::clone(&stored));
        std::thread::spawn(move || {
            use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
            let mut buffer = vec![0u8; 65536];
            loop {
                let mut space = nix::cmsg_space!([RawFd; 8]);
                let mut iov = [std::io::IoSliceMut::new(&mut buffer)];
                let Ok(message) = recvmsg::<()>(
                    socket.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                ) else {
                    break;
                };
                let mut fds = Vec::new();
                for cmsg in message.cmsgs().into_iter().flatten() {
                    if let ControlMessageOwned::ScmRights(received) = cmsg {
                        // SAFETY: the kernel just gave this process these descriptors.
                        #[allow(unsafe_code)]
                        fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                    }
                }
                let n = message.bytes;
                let text = String::from_utf8_lossy(&buffer[..n]).into_owned();
                if let Some(name) = field(&text, "FDNAME=").filter(|_| text.contains("FDSTORE=1")) {
                    store
                        .lock()
                        .expect("store")
                        .extend(fds.into_iter().map(|fd| (name.to_owned(), fd)));
                }
                kept.lock().expect("messages").push(text);
            }
        });
        Manager {
            path,
            messages,
            stored,
            _dir: dir,
        }
    }

    fn messages(&self) -> Vec<String> {
        self.messages.lock().expect("messages").clone()
    }

    /// Waits for a message after the first `after` that holds `line`, and returns its index.
    fn wait_line(&self, after: usize, line: &str) -> usize {
        wait_for(&format!("a notification with {line} after #{after}"), || {
            let messages = self.messages();
            messages
                .iter()
                .enumerate()
                .skip(after)
                .find(|(_, m)| m.lines().any(|l| l == line || l.starts_with(line)))
                .map(|(i, _)| i)
                .ok_or_else(|| format!("{messages:#?}"))
        })
    }
}

/// `/status`, or why not: a request in flight while baton re-executes may see its connection closed.
fn try_status(admin: std::net::SocketAddr) -> Result<Value, String> {
    let (_, body) = http_get(admin, "/status").map_err(|e| e.to_string())?;
    serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))
}

fn field<'a>(message: &'a str, name: &str) -> Option<&'a str> {
    message.lines().find_map(|l| l.strip_prefix(name))
}

#[test]
fn systemd_is_told_ready_reloading_rejected_reexecuted_and_stopping_with_a_status_and_a_watchdog() {
    let manager = Manager::new();
    let notify = manager.path.to_string_lossy().into_owned();
    let baton = Baton::start_with_env(
        &web(&[], ""),
        &[("NOTIFY_SOCKET", &notify), ("WATCHDOG_USEC", "400000")],
    );
    let ready = manager.wait_line(0, "READY=1");
    let first = &manager.messages()[ready];
    assert_eq!(
        field(first, "STATUS="),
        Some("1 service: web generation 1 (0 connections)"),
        "{first}"
    );
    // The watchdog, at half of WATCHDOG_USEC.
    let watchdog = manager.wait_line(0, "WATCHDOG=1");
    manager.wait_line(watchdog + 1, "WATCHDOG=1");

    // A reload: RELOADING=1 with the moment it began, then READY=1.
    let before = manager.messages().len();
    baton.signal(Signal::SIGHUP);
    let reloading = manager.wait_line(before, "RELOADING=1");
    let usec: u64 = field(&manager.messages()[reloading], "MONOTONIC_USEC=")
        .and_then(|v| v.parse().ok())
        .expect("MONOTONIC_USEC with RELOADING=1");
    assert!(usec > 0);
    let applied = manager.wait_line(reloading + 1, "READY=1");
    assert_eq!(
        field(&manager.messages()[applied], "STATUS="),
        Some("1 service: web generation 1 (0 connections)")
    );

    // A rejected reload: READY=1 all the same, and the status says why.
    let good = std::fs::read_to_string(baton.config_path()).expect("config");
    std::fs::write(baton.config_path(), "this is not toml [").expect("write");
    baton.signal(Signal::SIGHUP);
    let reloading = manager.wait_line(manager.messages().len().min(applied + 1), "RELOADING=1");
    let rejected = manager.wait_line(reloading + 1, "READY=1");
    let status = field(&manager.messages()[rejected], "STATUS=")
        .unwrap_or_default()
        .to_owned();
    assert!(status.contains("reload rejected"), "{status}");
    std::fs::write(baton.config_path(), good).expect("write");

    // A re-exec: RELOADING=1 from the old image, READY=1 from the new one, the same process.
    let before = manager.messages().len();
    let (code, body) = http(baton.admin, "POST", "/v1/reexec", &[]).expect("reexec");
    assert_eq!(code, 200, "{body}");
    let reloading = manager.wait_line(before, "RELOADING=1");
    let resumed = manager.wait_line(reloading + 1, "READY=1");
    let record = wait_for("the re-exec's record", || {
        let status = try_status(baton.admin)?;
        (status["reexecs"] == 1)
            .then(|| status["last_reexec"].clone())
            .ok_or_else(|| status.to_string())
    });
    assert_eq!(record["result"], "ok", "{record}");
    assert_eq!(baton.status()["pid"], Value::from(baton.pid()));
    // The rejected reload is behind: the re-exec went through.
    let status = field(&manager.messages()[resumed], "STATUS=")
        .unwrap_or_default()
        .to_owned();
    assert!(!status.contains("rejected"), "{status}");

    // The watchdog goes on in the new image.
    manager.wait_line(resumed + 1, "WATCHDOG=1");
    let before = manager.messages().len();
    assert_eq!(baton.stop().code(), Some(0));
    manager.wait_line(before, "STOPPING=1");
}

#[test]
fn the_pid_file_is_written_refused_to_a_second_baton_kept_across_reexecs_and_removed_at_exit() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("baton.pid");
    // A stale file (no such process) is replaced.
    std::fs::write(&path, "4194304\n").expect("write");
    let file = path.to_string_lossy().into_owned();
    let baton = Baton::start_with_env(&web(&[], ""), &[("BATON_PID_FILE", &file)]);
    let written = || std::fs::read_to_string(&path).expect("pid file");
    assert_eq!(written(), format!("{}\n", baton.pid()));

    // A second baton with the same pid file stops at once, saying why, and leaves the file alone.
    let second = Baton::launch(&web(&[], ""), &[], &[("BATON_PID_FILE", &file)]);
    let status = second.wait_exit_status();
    assert_eq!(status.0.code(), Some(1), "{}", status.1);
    assert!(
        status
            .1
            .contains(&format!("names baton process {}, which is running", baton.pid())),
        "{}",
        status.1
    );
    assert_eq!(written(), format!("{}\n", baton.pid()));

    let modified = std::fs::metadata(&path).expect("metadata").modified().expect("mtime");
    let (code, body) = http(baton.admin, "POST", "/v1/reexec", &[]).expect("reexec");
    assert_eq!(code, 200, "{body}");
    wait_for("the re-exec", || {
        let status = try_status(baton.admin)?;
        (status["reexecs"] == 1).then_some(()).ok_or_else(|| status.to_string())
    });
    assert_eq!(written(), format!("{}\n", baton.pid()));
    assert_eq!(
        std::fs::metadata(&path).expect("metadata").modified().expect("mtime"),
        modified
    );

    assert_eq!(baton.stop().code(), Some(0));
    assert!(!path.exists(), "the pid file is removed at exit");
}

/// A configuration whose worker leaves two orphans behind at start: a grandchild whose parent exits at
/// once, and a double-forked one; both outlive the shell that started them by a moment, then exit.
fn orphaning_config() -> String {
    let command = format!(
        "(sleep 0.2 &) ; sh -c '(sleep 0.3 &) &' ; exec {:?} --port $PORT",
        worker()
    );
    format!(
        "[service.web]\nlisten = [\"127.0.0.1:0\"]\ncommand = [\"sh\", \"-c\", {command:?}]\n\
         env = {{ PORT = \"{{port}}\" }}\n[service.web.readiness]\npath = \"/readyz\"\ninterval = \"10ms\"\n"
    )
}

/// Upgrades the worker once (another pair of orphans), then waits until `pid` (baton) has reaped four
/// orphans and has no zombie child left.
fn orphans_are_reaped(baton: &Baton, pid: u32) {
    kill(Pid::from_raw(pid as i32), Signal::SIGHUP).expect("SIGHUP");
    baton.wait_generation("web", 2);
    wait_for("four orphans reaped", || {
        let reaped = baton.count_log("reaped an orphan");
        (reaped >= 4).then_some(()).ok_or_else(|| format!("{reaped} reaped"))
    });
    wait_for("no zombie under baton", || {
        let zombies: Vec<_> = children(pid).into_iter().filter(|(_, state)| *state == 'Z').collect();
        zombies.is_empty().then_some(()).ok_or_else(|| format!("{zombies:?}"))
    });
}

#[test]
fn as_pid_1_baton_reaps_the_orphans_of_its_workers_and_leaves_no_zombie() {
    need("unshare", "util-linux");
    let baton = Baton::spawn_with_env(
        &orphaning_config(),
        &["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"],
        &[("RUST_LOG", "info,baton::supervisor=debug")],
    );
    // baton is PID 1 of its namespace: the child of `unshare`.
    let inner = wait_for("baton inside the namespace", || {
        children(baton.pid())
            .first()
            .map(|(pid, _)| *pid)
            .ok_or_else(|| "not yet".to_owned())
    });
    assert_eq!(baton.status()["pid"], 1, "baton is PID 1 there");
    baton.wait_idle();
    orphans_are_reaped(&baton, inner);
    // SIGTERM as elsewhere, though PID 1 has no default action for it.
    kill(Pid::from_raw(inner as i32), Signal::SIGTERM).expect("SIGTERM");
    let status = baton.wait_exit();
    assert_eq!(status.code(), Some(0));
    wait_gone([inner]);
}

#[test]
fn as_a_subreaper_baton_reaps_the_orphans_of_its_workers_too() {
    let baton = Baton::start_with_env(
        &orphaning_config(),
        &[
            ("BATON_SUBREAPER", "true"),
            ("RUST_LOG", "info,baton::supervisor=debug"),
        ],
    );
    orphans_are_reaped(&baton, baton.pid());
    assert_eq!(baton.stop().code(), Some(0));
}

/// A port free on loopback now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Sends a request that waits in `addr`'s listen queue until baton serves it, and returns its answer.
fn request_in_queue(addr: std::net::SocketAddr) -> std::thread::JoinHandle<std::io::Result<(u16, String)>> {
    let stream = std::net::TcpStream::connect(addr).expect("connect: the socket exists before baton");
    std::thread::spawn(move || {
        let mut stream = stream;
        stream.set_read_timeout(Some(DEADLINE))?;
        exchange_raw(&mut stream, "GET", "/whoami", &[])
    })
}

#[test]
fn sockets_passed_by_systemd_socket_activate_are_adopted_and_one_unused_is_refused() {
    need("systemd-socket-activate", "systemd");
    let port = free_port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let config = web(&[], "").replace("127.0.0.1:0", &addr.to_string());
    let listen = addr.to_string();
    let activate = ["systemd-socket-activate", "-l", listen.as_str(), "--fdname=web"];
    let mut baton = Baton::launch_with_admin(&config, &activate, &[]);
    // The socket is systemd-socket-activate's, and baton starts on the first connection, which waits in
    // the queue meanwhile.
    let first = wait_for("systemd-socket-activate to listen", || {
        std::net::TcpStream::connect(addr).map_err(|e| e.to_string())
    });
    drop(first);
    let queued = request_in_queue(addr);
    baton.wait_admin();
    let (code, body) = queued.join().expect("request").expect("answered");
    assert_eq!(code, 200, "{body}");
    let adopted = baton.wait_log("adopted a socket the service manager passed");
    assert_eq!(adopted["fields"]["name"], "web", "{adopted}");
    assert_eq!(
        baton.count_log("bound"),
        0,
        "baton bound nothing itself:\n{}",
        baton.log_text()
    );
    // A reload that adds an address binds it; the passed socket stays.
    let second = free_port();
    let config2 = config.replace(
        &format!("listen = [\"{addr}\"]"),
        &format!("listen = [\"{addr}\", \"127.0.0.1:{second}\"]"),
    );
    baton.write_config(&config2);
    baton.signal(Signal::SIGHUP);
    baton.wait_log("reload applied");
    for port in [port, second] {
        let (code, _) = http_get(([127, 0, 0, 1], port).into(), "/whoami").expect("answered");
        assert_eq!(code, 200);
    }
    assert_eq!(baton.stop().code(), Some(0));

    // Passed a socket that nothing listens on, baton refuses to start and names it.
    let spare = free_port();
    let spare_listen = format!("127.0.0.1:{spare}");
    let activate = [
        "systemd-socket-activate",
        "-l",
        listen.as_str(),
        "-l",
        spare_listen.as_str(),
        "--fdname=web:spare",
    ];
    let baton = Baton::launch_with_admin(&config, &activate, &[]);
    let knock = wait_for("systemd-socket-activate to listen", || {
        std::net::TcpStream::connect(addr).map_err(|e| e.to_string())
    });
    let (status, log) = baton.wait_exit_status();
    drop(knock);
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "nothing in the configuration listens on: spare ({spare_listen})"
        )),
        "{log}"
    );
}

#[test]
fn the_public_sockets_are_stored_with_the_manager_and_a_baton_started_after_a_crash_gets_them_back() {
    let manager = Manager::new();
    let notify = manager.path.to_string_lossy().into_owned();
    let port = free_port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let config = web(&[], "").replace("127.0.0.1:0", &addr.to_string());
    let env = [("NOTIFY_SOCKET", notify.as_str()), ("FDSTORE", "8")];
    let baton = Baton::start_with_env(&config, &env);
    let name = format!("tcp-127.0.0.1_{port}");
    let stored = wait_for("the public socket in the store", || {
        let stored = manager.stored.lock().expect("store");
        stored
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(n, fd)| (n.clone(), fd.try_clone().expect("dup")))
            .ok_or_else(|| format!("{:?}", manager.messages()))
    });
    // A crash: connections made meanwhile wait in the socket's queue, which the store keeps open.
    baton.signal(Signal::SIGKILL);
    let _ = baton.wait_exit();
    let queued = request_in_queue(addr);
    // The manager starts baton again, passing what it stored, as systemd does.
    let names = stored.0.clone();
    let again = Baton::launch_passing(
        &config,
        &["sh", "-c", "LISTEN_PID=$$ exec \"$0\" \"$@\""],
        &[
            ("NOTIFY_SOCKET", notify.as_str()),
            ("FDSTORE", "8"),
            ("LISTEN_FDS", "1"),
            ("LISTEN_FDNAMES", names.as_str()),
        ],
        vec![stored.1],
    );
    let (code, body) = queued.join().expect("request").expect("answered");
    assert_eq!(code, 200, "{body}");
    let adopted = again.wait_log("adopted a socket the service manager passed");
    assert_eq!(adopted["fields"]["name"], name.as_str(), "{adopted}");

    // A reload that drops the address takes it out of the store.
    let other = free_port();
    again.write_config(&config.replace(&addr.to_string(), &format!("127.0.0.1:{other}")));
    let before = manager.messages().len();
    again.signal(Signal::SIGHUP);
    let removed = manager.wait_line(before, "FDSTOREREMOVE=1");
    assert_eq!(field(&manager.messages()[removed], "FDNAME="), Some(name.as_str()));
    manager.wait_line(before, &format!("FDNAME=tcp-127.0.0.1_{other}"));
    assert_eq!(again.stop().code(), Some(0));
}

/// `sv status` of the service directory `dir`: its output, and baton's pid when it runs.
fn sv_status(dir: &std::path::Path) -> (String, Option<u32>) {
    let output = std::process::Command::new("sv")
        .arg("status")
        .arg(dir)
        .output()
        .expect("sv status");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    // `run: DIR: (pid N) 5s; run: log: (pid M) 5s`: the service's own part comes first.
    let own = text.split(';').next().unwrap_or_default();
    let pid = own
        .split("(pid ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|pid| pid.parse().ok());
    (text, pid)
}

fn sv(command: &str, dir: &std::path::Path) {
    let status = std::process::Command::new("sv")
        .arg(command)
        .arg(dir)
        .status()
        .expect("sv");
    assert!(status.success(), "sv {command}");
}

/// A `runsv` process, told to exit and reaped when dropped.
struct Runsv(std::process::Child, std::path::PathBuf);

impl Drop for Runsv {
    fn drop(&mut self) {
        let _ = std::process::Command::new("sv").arg("exit").arg(&self.1).status();
        if wait_for_exit(&mut self.0).is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn wait_for_exit(child: &mut std::process::Child) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + DEADLINE;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    None
}

#[test]
fn under_runsv_baton_keeps_its_pid_across_reexecs_upgrades_on_sv_hup_and_stops_on_sv_down() {
    need("runsv", "runit");
    need("sv", "runit");
    need("svlogd", "runit");
    let dir = tempfile::tempdir().expect("dir");
    let service = dir.path().join("baton");
    std::fs::create_dir_all(service.join("log")).expect("service dir");
    // The shipped run scripts, with this build's binary.
    let run = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/runit/baton/run"))
        .expect("conf/runit/baton/run")
        .replace("/usr/local/bin/baton", env!("CARGO_BIN_EXE_baton"));
    let log_run = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/runit/baton/log/run"))
        .expect("conf/runit/baton/log/run");
    for (path, text) in [(service.join("run"), run), (service.join("log/run"), log_run)] {
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    }
    let config = dir.path().join("baton.toml");
    std::fs::write(
        &config,
        format!("[admin]\nlisten = \"127.0.0.1:0\"\n\n{}", web(&[], "")),
    )
    .expect("config");
    let runsv = std::process::Command::new("runsv")
        .arg(&service)
        .env("BATON_CONFIG", &config)
        .env("RUST_LOG", "info")
        .env("XDG_RUNTIME_DIR", dir.path())
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("runsv");
    let _runsv = Runsv(runsv, service.clone());
    // The admin address, from the log svlogd keeps.
    let admin: std::net::SocketAddr = wait_for("the admin API address in svlogd's log", || {
        let log = std::fs::read_to_string(service.join("log/main/current")).unwrap_or_default();
        log.lines()
            .find(|l| l.contains("admin API listening"))
            .and_then(|l| l.split("addr=").nth(1))
            .and_then(|a| a.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .ok_or(log)
    });
    let status = |path: &str| -> Value {
        let (code, body) = http(admin, "GET", path, &[]).expect("admin");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("JSON")
    };
    wait_for("the first worker", || {
        let s = status("/status");
        (s["services"]["web"]["generation"] == 1)
            .then_some(())
            .ok_or(s.to_string())
    });
    let (text, pid) = sv_status(&service);
    let pid = pid.unwrap_or_else(|| panic!("sv status names no pid: {text}"));
    assert_eq!(status("/status")["pid"], pid, "runsv supervises baton itself");

    // `sv 2` (SIGUSR2) re-executes baton: runsv still sees the same process.
    for round in 1..=2 {
        sv("2", &service);
        wait_for("the re-exec", || {
            let s = try_status(admin)?;
            (s["reexecs"] == round).then_some(()).ok_or(s.to_string())
        });
        assert_eq!(status("/status")["last_reexec"]["result"], "ok");
        assert_eq!(sv_status(&service).1, Some(pid), "{}", sv_status(&service).0);
    }
    // `sv hup` reloads: the worker is upgraded.
    let worker = status("/status")["services"]["web"]["pid"]
        .as_u64()
        .expect("worker pid") as u32;
    sv("hup", &service);
    wait_for("generation 2", || {
        let s = status("/status");
        (s["services"]["web"]["generation"] == 2)
            .then_some(())
            .ok_or(s.to_string())
    });
    wait_gone([worker]);
    let worker = status("/status")["services"]["web"]["pid"]
        .as_u64()
        .expect("worker pid") as u32;
    // `sv down` stops baton cleanly, and nothing is left.
    sv("down", &service);
    wait_for("baton down", || {
        let (text, running) = sv_status(&service);
        (running.is_none() && text.starts_with("down:"))
            .then_some(())
            .ok_or(text)
    });
    wait_gone([pid, worker]);
    let log = std::fs::read_to_string(service.join("log/main/current")).unwrap_or_default();
    assert!(log.contains("SIGTERM: draining"), "{log}");
}
