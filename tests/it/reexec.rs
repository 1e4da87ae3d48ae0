//! baton re-executing itself in place: the same process, sockets, workers and connections before and after,
//! a bad new binary refused with nothing changed, a new image that cannot start falling back, signals in the
//! exec window handled by the new image, nothing leaked.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::support::*;

/// Asks for a re-exec through the admin API; the status code and the answer.
fn post_reexec(baton: &Baton, query: &str) -> (u16, Value) {
    let path = if query.is_empty() {
        "/v1/reexec".to_owned()
    } else {
        format!("/v1/reexec?{query}")
    };
    let (code, body) = http(baton.admin, "POST", &path, &[]).expect("POST /v1/reexec");
    (code, serde_json::from_str(&body).unwrap_or(Value::String(body)))
}

/// Waits until the re-exec `attempt` has ended and returns its record.
fn wait_reexec(baton: &Baton, attempt: u64) -> Value {
    wait_for(&format!("re-exec {attempt} to end"), || {
        let status = http_get(baton.admin, "/status")
            .map_err(|e| e.to_string())
            .and_then(|(_, body)| serde_json::from_str::<Value>(&body).map_err(|e| e.to_string()))?;
        let record = &status["last_reexec"];
        if record["attempt"].as_u64() >= Some(attempt) {
            Ok(record.clone())
        } else {
            Err(status.to_string())
        }
    })
}

/// Re-executes baton with the binary it was started from, and waits until the new image has taken over.
fn reexec_ok(baton: &Baton) -> Value {
    let (code, answer) = post_reexec(baton, "");
    assert_eq!(code, 200, "{answer}");
    let attempt = answer["attempt"].as_u64().expect("attempt");
    let record = wait_reexec(baton, attempt);
    assert_eq!(record["result"], "ok", "{record}\n{}", baton.log_text());
    record
}

/// A copy of baton's binary at another path, so that `/proc/PID/exe` shows which one runs.
fn copy_of_baton(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::copy(env!("CARGO_BIN_EXE_baton"), &path).expect("copy baton");
    path
}

/// An executable shell script in `dir`.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// The parent pid and the start time (in clock ticks since boot) of process `pid`.
fn parent_and_start(pid: u32) -> (u32, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..].split(' ').collect();
    (fields[1].parse().expect("ppid"), fields[19].parse().expect("starttime"))
}

/// The inode of the listening TCP socket on `addr`.
fn listening_inode(addr: SocketAddr) -> u64 {
    let port = format!("{:04X}", addr.port());
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table
        .lines()
        .skip(1)
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields[1].rsplit(':').next()?;
            (local_port == port && fields[3] == "0A").then(|| fields[9].parse().ok())?
        })
        .unwrap_or_else(|| panic!("no listening socket on {addr}"))
}

/// What process `pid`'s descriptors point at.
fn descriptors(pid: u32) -> Vec<String> {
    let mut links: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|l| l.to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    links.sort();
    links
}

/// Child processes of `pid` that are zombies.
fn zombie_children(pid: u32) -> Vec<u32> {
    children(pid)
        .into_iter()
        .filter(|(_, state)| *state == 'Z')
        .map(|(child, _)| child)
        .collect()
}

/// A block of the pattern streams send: its index, then a byte that depends on it. A lost, repeated or
/// reordered byte shows as a block that differs from the one expected at that offset.
const BLOCK: usize = 64 * 1024;

fn fill_block(block: &mut [u8], index: u64) {
    block[8..].fill((index.wrapping_mul(7) % 251) as u8);
    block[..8].copy_from_slice(&index.to_le_bytes());
}

/// One raw echo connection through baton: a writer sends pattern blocks until told to stop (or `limit`
/// blocks), then half-closes; a reader checks that every byte comes back in order, then the end.
struct Stream {
    stop: Arc<AtomicBool>,
    /// Bytes read back and checked so far.
    checked: Arc<AtomicU64>,
    writer: std::thread::JoinHandle<u64>,
    reader: std::thread::JoinHandle<Result<u64, String>>,
}

impl Stream {
    fn start(addr: SocketAddr, limit: u64, pace: Option<Duration>) -> Stream {
        let stream = TcpStream::connect(addr).expect("connect");
        let mut writing = stream.try_clone().expect("clone");
        let mut reading = stream;
        reading.set_read_timeout(Some(DEADLINE)).expect("timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let checked = Arc::new(AtomicU64::new(0));
        let writer = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut block = vec![0u8; BLOCK];
                let mut sent = 0u64;
                while sent < limit && !stop.load(Ordering::Relaxed) {
                    fill_block(&mut block, sent);
                    writing.write_all(&block).expect("write a block");
                    sent += 1;
                    if let Some(pace) = pace {
                        std::thread::sleep(pace);
                    }
                }
                writing.shutdown(Shutdown::Write).expect("half-close");
                sent
            })
        };
        let reader = {
            let checked = Arc::clone(&checked);
            std::thread::spawn(move || {
                let (mut got, mut expected) = (vec![0u8; BLOCK], vec![0u8; BLOCK]);
                let mut index = 0u64;
                loop {
                    let mut filled = 0;
                    while filled < BLOCK {
                        match reading.read(&mut got[filled..]) {
                            Ok(0) if filled == 0 => return Ok(index),
                            Ok(0) => return Err(format!("the stream ended inside block {index}")),
                            Ok(n) => filled += n,
                            Err(e) => return Err(format!("block {index}: {e}")),
                        }
                    }
                    fill_block(&mut expected, index);
                    if got != expected {
                        let header = u64::from_le_bytes(got[..8].try_into().expect("8 bytes"));
                        return Err(format!("block {index} differs (its header says {header})"));
                    }
                    index += 1;
                    checked.store(index * BLOCK as u64, Ordering::Relaxed);
                }
            })
        };
        Stream {
            stop,
            checked,
            writer,
            reader,
        }
    }

    fn checked(&self) -> u64 {
        self.checked.load(Ordering::Relaxed)
    }

    /// Stops writing and checks that what came back is exactly what was sent.
    fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.writer.join().expect("writer");
        let read = self.reader.join().expect("reader").expect("the echo checks out");
        assert_eq!(read, sent, "blocks echoed back");
    }
}

/// Re-executes baton while `streams` run, checks that it handed each one over, and waits until every one has
/// moved on in the new image; returns the re-exec's record.
fn reexec_while_streaming(baton: &Baton, streams: &[Stream]) -> Value {
    let before: Vec<u64> = streams.iter().map(Stream::checked).collect();
    let record = reexec_ok(baton);
    assert_eq!(record["connections"], streams.len(), "{record}");
    wait_for("every stream to move on", || {
        let stuck = streams.iter().zip(&before).filter(|(s, b)| s.checked() <= **b).count();
        if stuck == 0 {
            Ok(())
        } else {
            Err(format!("{stuck} stuck"))
        }
    });
    record
}

#[test]
fn a_reexec_keeps_the_process_its_sockets_and_its_workers() {
    let baton = Baton::start(&web(&[], "output = \"log\""));
    let pid = baton.pid();
    let addr = baton.addr("web");
    let before = parent_and_start(pid);
    let listener = listening_inode(addr);
    let admin = listening_inode(baton.admin);
    let worker = baton.worker_pid("web");
    let new = copy_of_baton(baton.dir.path(), "baton-new");

    let output = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["reexec", "--admin", &baton.admin.to_string(), "--binary"])
        .arg(&new)
        .output()
        .expect("baton reexec");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        baton.log_text()
    );
    assert!(stdout.contains(&format!("checking {} (", new.display())), "{stdout}");
    assert!(stdout.contains("handing over: 2 listeners, 1 workers"), "{stdout}");
    assert!(stdout.contains(&format!("pid {pid} (unchanged)")), "{stdout}");

    assert_eq!(parent_and_start(pid), before, "the parent and start time");
    assert_eq!(std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe"), new);
    assert_eq!(listening_inode(addr), listener, "the public socket is the same socket");
    assert_eq!(
        listening_inode(baton.admin),
        admin,
        "the admin socket is the same socket"
    );
    let status = baton.status();
    assert_eq!(status["pid"], pid);
    assert_eq!(status["reexecs"], 1);
    assert_eq!(status["last_reexec"]["result"], "ok");
    assert_eq!(
        status["services"]["web"]["pid"], worker,
        "the worker was adopted, not restarted"
    );
    assert_eq!(status["services"]["web"]["generation"], 1);
    let mut client = KeepAlive::connect(addr);
    assert_eq!(client.whoami().expect("whoami"), 1);
    // The worker's output is still logged.
    let _ = http(addr, "POST", "/drop", &["Content-Length: 0"]);
    wait_for("the adopted worker's output in the log", || {
        let after = baton.log_text();
        let adopted = after.find("worker adopted").ok_or("not adopted")?;
        after[adopted..]
            .contains("test worker: dropped a request")
            .then_some(())
            .ok_or_else(|| "not yet".to_owned())
    });

    // The adopted worker is stopped, reaped and replaced as any other (once its last connection is gone:
    // it drains).
    drop(client);
    let (code, body) = http(baton.admin, "POST", "/v1/services/web/upgrade", &[]).expect("upgrade");
    assert_eq!(code, 200, "{body}");
    assert_eq!(baton.wait_generation("web", 2), 2);
    wait_gone([worker]);
    assert!(zombie_children(pid).is_empty());
}

#[test]
fn fifty_reexecs_under_fresh_connections_refuse_or_reset_none() {
    let baton = Baton::start(&web(&[], ""));
    let load = Load::start(baton.addr("web"), 4);
    load.wait_ok(20);
    for _ in 0..50 {
        reexec_ok(&baton);
        load.wait_ok(5);
    }
    let report = load.stop();
    assert_eq!(report.failures, 0, "{:?}", report.errors);
    assert_eq!(baton.status()["reexecs"], 50);
    eprintln!("{} exchanges through 50 re-execs, none failed", report.ok);
}

#[test]
fn idle_connections_are_watched_across_a_reexec_and_answer_during_and_after_it() {
    const IDLE: usize = 150;
    let baton = Baton::start(&web(&[], ""));
    let addr = baton.addr("web");
    let mut idle: Vec<KeepAlive> = (0..IDLE).map(|_| KeepAlive::connect(addr)).collect();
    for connection in &mut idle {
        assert_eq!(connection.whoami().expect("answer"), 1);
    }
    // Once they have been silent for the active window, a re-exec watches them rather than taking them over
    // before its pause ends.
    let record = wait_for("a re-exec that finds the connections idle", || {
        let record = reexec_ok(&baton);
        (record["watched_connections"] == IDLE)
            .then(|| record.clone())
            .ok_or_else(|| record.to_string())
    });
    assert_eq!(record["active_connections"], 0, "{record}");
    assert_eq!(record["connections"], IDLE, "{record}");
    assert!(record["resumed_ms"].as_f64() >= record["pause_ms"].as_f64(), "{record}");
    // Requests on idle connections while another re-exec takes them over: each is answered.
    let asking = idle.split_off(IDLE / 2);
    let done = Arc::new(AtomicBool::new(false));
    let asker = std::thread::spawn({
        let done = Arc::clone(&done);
        move || {
            let mut asking = asking;
            // Round after round, until the re-exec is over: some ask while it runs.
            while !done.load(Ordering::SeqCst) {
                for connection in &mut asking {
                    assert_eq!(connection.whoami().expect("answered during the re-exec"), 1);
                }
            }
            asking
        }
    });
    reexec_ok(&baton);
    done.store(true, Ordering::SeqCst);
    idle.extend(asker.join().expect("asker"));
    for connection in &mut idle {
        assert_eq!(connection.whoami().expect("answered after the re-exec"), 1);
    }
}

#[test]
fn streams_both_ways_come_through_twenty_reexecs_byte_exact() {
    let baton = Baton::start(&web(&[], ""));
    let addr = baton.addr("web");
    let streams: Vec<Stream> = (0..8)
        .map(|_| Stream::start(addr, u64::MAX, Some(Duration::from_millis(2))))
        .collect();
    for _ in 0..20 {
        let record = reexec_while_streaming(&baton, &streams);
        // Every stream was moving bytes: each counts as active, and so the active ones' pause is the pause.
        assert_eq!(record["active_connections"], 8, "{record}");
        assert!(
            record["active_pause_ms"].as_f64() <= record["pause_ms"].as_f64(),
            "{record}"
        );
    }
    for stream in streams {
        stream.finish();
    }
}

#[test]
fn streams_to_a_unix_socket_worker_come_through_reexecs_byte_exact() {
    let baton = Baton::start(&service(
        "web",
        &["--socket", "{socket}"],
        "backend = \"unix\"\noutput = \"log\"",
    ));
    let worker = baton.worker_pid("web");
    let streams: Vec<Stream> = (0..4)
        .map(|_| Stream::start(baton.addr("web"), u64::MAX, Some(Duration::from_millis(2))))
        .collect();
    for _ in 0..5 {
        reexec_while_streaming(&baton, &streams);
    }
    for stream in streams {
        stream.finish();
    }
    assert_eq!(baton.worker_pid("web"), worker);
    // The socket directory was adopted: the next worker gets its socket there, as before.
    let (code, body) = http(baton.admin, "POST", "/v1/services/web/upgrade", &[]).expect("upgrade");
    assert_eq!(code, 200, "{body}");
    assert_eq!(KeepAlive::connect(baton.addr("web")).whoami().expect("whoami"), 2);
}

#[test]
fn a_gibibyte_each_way_comes_through_five_reexecs_byte_exact() {
    const TOTAL: u64 = 1 << 30;
    let baton = Baton::start(&web(&[], ""));
    let stream = Stream::start(baton.addr("web"), TOTAL / BLOCK as u64, None);
    for i in 1..=5 {
        let mark = TOTAL / 6 * i;
        wait_for(&format!("{mark} bytes echoed"), || {
            if stream.checked() >= mark {
                Ok(())
            } else {
                Err(stream.checked().to_string())
            }
        });
        reexec_ok(&baton);
    }
    stream.finish();
}

#[test]
fn a_half_closed_connection_stays_half_closed_across_a_reexec() {
    let baton = Baton::start(&web(&[], "output = \"log\""));
    let mut stream = TcpStream::connect(baton.addr("web")).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    stream.write_all(b"HALF").expect("write");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).expect("the worker's side ends");
    assert_eq!(answer, b"half-closed\n");
    let record = reexec_ok(&baton);
    assert_eq!(record["connections"], 1, "{record}");
    // The client's side is still open, and what it sends still reaches the worker.
    stream.write_all(b"after the re-exec").expect("write after");
    stream.shutdown(Shutdown::Write).expect("half-close");
    let line = baton.wait_log_text("after its half-close got");
    assert!(line.contains("got 17 bytes"), "{line}");
}

#[test]
fn deadlines_and_drains_keep_their_place_across_a_reexec() {
    let baton = Baton::start(&web(&[], "drain_timeout = \"60s\""));
    let addr = baton.addr("web");
    let mut held = KeepAlive::connect(addr);
    assert_eq!(held.whoami().expect("whoami"), 1);
    let (code, body) = http(baton.admin, "POST", "/v1/services/web/upgrade", &[]).expect("upgrade");
    assert_eq!(code, 200, "{body}");
    let state = |baton: &Baton| -> Value {
        let (_, body) = http_get(baton.admin, "/v1/state").expect("state");
        serde_json::from_str(&body).expect("state JSON")
    };
    let before = state(&baton)["services"]["web"]["machine"]["draining"].clone();
    assert_eq!(before[0]["generation"], 1, "{before}");
    reexec_ok(&baton);
    let after = state(&baton)["services"]["web"]["machine"]["draining"].clone();
    assert_eq!(
        after[0]["deadline"], before[0]["deadline"],
        "the drain deadline is where it was"
    );
    assert_eq!(after[0]["since"], before[0]["since"]);
    let status = baton.service("web");
    assert_eq!(status["draining"][0]["generation"], 1, "{status}");
    assert_eq!(status["draining"][0]["active_connections"], 1, "{status}");
    // The connection still goes to the draining worker; once it closes, the drain ends.
    assert_eq!(held.whoami().expect("whoami after"), 1);
    drop(held);
    wait_for("the drain to end", || {
        let service = baton.service("web");
        if service["draining"].as_array().is_some_and(Vec::is_empty) {
            Ok(())
        } else {
            Err(service.to_string())
        }
    });
}

#[test]
fn counters_and_histograms_carry_on_across_a_reexec() {
    let baton = Baton::start(&web(&[], ""));
    let addr = baton.addr("web");
    for _ in 0..5 {
        http_get(addr, "/whoami").expect("request");
    }
    let accepted = "baton_connections_accepted_total{service=\"web\"}";
    let durations = "baton_connection_duration_seconds_count{service=\"web\"}";
    let ready = "baton_upgrade_ready_seconds_count{service=\"web\"}";
    wait_for("five connections counted", || {
        (baton.metric(durations) >= 5.0)
            .then_some(())
            .ok_or_else(|| baton.metric(durations).to_string())
    });
    let before = (baton.metric(accepted), baton.metric(durations), baton.metric(ready));
    reexec_ok(&baton);
    reexec_ok(&baton);
    let after = (baton.metric(accepted), baton.metric(durations), baton.metric(ready));
    assert_eq!(after, before, "nothing reset, nothing counted twice");
    http_get(addr, "/whoami").expect("request");
    wait_for("the next connection counted on top", || {
        (baton.metric(accepted) == before.0 + 1.0)
            .then_some(())
            .ok_or_else(|| baton.metric(accepted).to_string())
    });
    assert_eq!(baton.metric("baton_reexecs_total{result=\"ok\"}"), 2.0);
    assert_eq!(baton.metric("baton_reexec_pause_seconds_count"), 2.0);
}

#[test]
fn a_bad_new_binary_is_refused_and_nothing_changes() {
    let baton = Baton::start(&web(&[], ""));
    let dir = baton.dir.path();
    let pid = baton.pid();
    let worker = baton.worker_pid("web");
    let hanging = script(
        dir,
        "hangs",
        &format!(
            "echo baton 9.9.9\nsleep 600 &\necho $$ $! > {}\nwait",
            dir.join("hanging.pids").display()
        ),
    );
    let cases: Vec<(PathBuf, &str, &str)> = vec![
        ("/bin/false".into(), "", "exit code 1"),
        ("/bin/true".into(), "", "is not a baton"),
        (dir.join("missing"), "", "cannot run"),
        (script(dir, "crashes", "kill -SEGV $$"), "", "crashed"),
        (
            script(dir, "fails", "echo 'no thanks' >&2; exit 7"),
            "",
            "exit code 7: no thanks",
        ),
        (hanging, "&check_timeout=500ms", "no answer within 500ms"),
    ];
    for (binary, extra, reason) in cases {
        let query = format!("binary={}{extra}", binary.display());
        let (code, answer) = post_reexec(&baton, &query);
        assert_eq!(code, 422, "{}: {answer}", binary.display());
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(reason), "{}: {error}", binary.display());
        let status = baton.status();
        assert_eq!(status["last_reexec"]["result"], "refused", "{status}");
        assert_eq!(status["reexecs"], 0);
        assert_eq!(status["services"]["web"]["pid"], worker);
    }
    // The hanging check and what it started are gone.
    let pids = std::fs::read_to_string(dir.join("hanging.pids")).expect("the script ran");
    wait_gone(pids.split_whitespace().map(|p| p.parse::<u32>().expect("pid")));
    assert_eq!(baton.pid(), pid);
    assert_eq!(baton.metric("baton_reexecs_total{result=\"refused\"}"), 6.0);
    assert_eq!(KeepAlive::connect(baton.addr("web")).whoami().expect("still serves"), 1);

    // The command says why, and exits 1.
    let output = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["reexec", "--admin", &baton.admin.to_string(), "--binary", "/bin/false"])
        .output()
        .expect("baton reexec");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("refused, nothing changed") && stderr.contains("exit code 1"),
        "{stderr}"
    );
    assert!(zombie_children(pid).is_empty());
}

#[test]
fn a_state_or_configuration_the_new_binary_rejects_is_refused_by_its_check() {
    let baton = Baton::start(&web(&[], ""));
    let (_, state) = http_get(baton.admin, "/v1/state").expect("state");
    let check = |input: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_baton"))
            .arg("reexec-check")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("check");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write the state");
        let output = child.wait_with_output().expect("wait");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, stdout, _) = check(&state);
    assert_eq!(code, Some(0));
    let report: Value = serde_json::from_str(stdout.trim()).expect("a report");
    assert_eq!(report["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(report["services"][0], "web");

    let newer = state.replacen(
        &format!("\"version\":{}", baton::handover::VERSION),
        "\"version\":99",
        1,
    );
    let (code, _, stderr) = check(&newer);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("state format 99 is newer"), "{stderr}");

    let mut document: Value = serde_json::from_str(&state).expect("JSON");
    document["config"]["text"] = Value::String("[service.web]\nlisten = 3\n".into());
    let (code, _, stderr) = check(&document.to_string());
    assert_eq!(code, Some(1));
    assert!(stderr.contains("listen"), "{stderr}");
}

/// The baton of the commit before re-exec existed, built once (and kept) under the target directory.
fn older_baton() -> PathBuf {
    const COMMIT: &str = "eaaf8e3";
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("target").join(format!("older-baton-{COMMIT}"));
    let binary = dir.join("target/debug/baton");
    if binary.exists() {
        return binary;
    }
    std::fs::create_dir_all(&dir).expect("create the older baton's directory");
    let archive = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["archive", "--format=tar", COMMIT])
        .output()
        .expect("git archive: the test builds the older baton from the repository's history");
    assert!(
        archive.status.success(),
        "git archive {COMMIT}: {}",
        String::from_utf8_lossy(&archive.stderr)
    );
    let mut untar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(&dir)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("tar");
    untar
        .stdin
        .take()
        .expect("stdin")
        .write_all(&archive.stdout)
        .expect("untar");
    assert!(untar.wait().expect("tar").success());
    let build = Command::new(env!("CARGO"))
        .args(["build", "--bin", "baton"])
        .current_dir(&dir)
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .status()
        .expect("cargo build of the older baton");
    assert!(build.success(), "cannot build the older baton");
    binary
}

#[test]
fn an_older_baton_without_a_check_mode_is_refused() {
    let older = older_baton();
    let baton = Baton::start(&web(&[], ""));
    let (code, answer) = post_reexec(&baton, &format!("binary={}", older.display()));
    assert_eq!(code, 422, "{answer}");
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("exit code 2") || error.contains("exit code 64"),
        "{error}"
    );
    assert!(
        error.contains("no re-exec check") || error.contains("unrecognized subcommand"),
        "{error}"
    );
    assert_eq!(baton.status()["reexecs"], 0);
    assert_eq!(KeepAlive::connect(baton.addr("web")).whoami().expect("still serves"), 1);
}

#[test]
fn a_new_image_that_cannot_start_falls_back_to_the_previous_binary() {
    let baton = Baton::start(&web(&[], ""));
    let pid = baton.pid();
    let real = env!("CARGO_BIN_EXE_baton");
    // It passes its check, then fails as it starts: a baton given an invalid thread count.
    let broken = script(
        baton.dir.path(),
        "broken",
        &format!(
            "case \" $* \" in *\" reexec-check \"*) exec {real} \"$@\";; esac\nBATON_THREADS=0 exec {real} \"$@\""
        ),
    );
    let mut client = KeepAlive::connect(baton.addr("web"));
    assert_eq!(client.whoami().expect("whoami"), 1);
    let (code, answer) = post_reexec(&baton, &format!("binary={}", broken.display()));
    assert_eq!(code, 200, "{answer}");
    let record = wait_reexec(&baton, answer["attempt"].as_u64().expect("attempt"));
    assert_eq!(record["result"], "failed", "{record}");
    let error = record["error"].as_str().unwrap_or_default();
    assert!(error.contains("the new image cannot start"), "{error}");
    assert_eq!(baton.pid(), pid);
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe"),
        Path::new(real),
        "the previous binary runs again"
    );
    let status = baton.status();
    assert_eq!(status["reexecs"], 0, "{status}");
    assert_eq!(client.whoami().expect("the connection carries on"), 1);
    assert_eq!(baton.metric("baton_reexecs_total{result=\"failed\"}"), 1.0);
}

#[test]
fn signals_in_the_exec_window_are_handled_by_the_new_image() {
    let baton = Baton::start(&web(&[], ""));
    let reloads = "baton_config_reloads_total{result=\"success\"}";
    let before = baton.metric(reloads);
    let (code, answer) = post_reexec(&baton, "");
    assert_eq!(code, 200, "{answer}");
    baton.signal(Signal::SIGHUP);
    baton.signal(Signal::SIGUSR2);
    let record = wait_reexec(&baton, answer["attempt"].as_u64().expect("attempt"));
    assert_eq!(record["result"], "ok", "{record}");
    // SIGUSR2 asked for another re-exec; SIGHUP for a reload: each is done once.
    wait_reexec(&baton, answer["attempt"].as_u64().expect("attempt") + 1);
    wait_for("the reload", || {
        (baton.metric(reloads) == before + 1.0)
            .then_some(())
            .ok_or_else(|| baton.metric(reloads).to_string())
    });
    baton.wait_idle();
    assert_eq!(baton.status()["reexecs"], 2);
    // SIGTERM in the window: the new image drains and exits.
    let (code, _) = post_reexec(&baton, "");
    assert_eq!(code, 200);
    baton.signal(Signal::SIGTERM);
    let status = baton.wait_exit();
    assert!(status.success(), "{status}");
}

#[test]
fn requests_join_the_reexec_under_way_and_one_waits_for_an_upgrade_window() {
    let baton = Baton::start(&web(&[], "watchdog = \"2s\""));
    let admin = baton.admin;
    let (code, body) = http(admin, "POST", "/v1/services/web/upgrade?wait=false", &[]).expect("upgrade");
    assert_eq!(code, 202, "{body}");
    baton.wait_phase("web", "watching");
    let requests: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                let (code, body) = http(admin, "POST", "/v1/reexec", &[]).expect("reexec");
                (code, serde_json::from_str::<Value>(&body).expect("JSON"))
            })
        })
        .collect();
    let waiting = wait_for("the re-exec to wait for the watchdog window", || {
        let status = baton.status();
        if status["reexec"]["stage"] == "waiting" {
            Ok(status["reexec"]["waiting_for"].as_str().unwrap_or_default().to_owned())
        } else {
            Err(status.to_string())
        }
    });
    assert!(waiting.contains("upgrade is in flight (watching)"), "{waiting}");
    let answers: Vec<(u16, Value)> = requests.into_iter().map(|r| r.join().expect("request")).collect();
    assert!(answers.iter().all(|(code, _)| *code == 200), "{answers:?}");
    assert_eq!(answers[0].1["attempt"], answers[1].1["attempt"], "one re-exec for both");
    let record = wait_reexec(&baton, answers[0].1["attempt"].as_u64().expect("attempt"));
    assert_eq!(record["result"], "ok");
    let status = baton.status();
    assert_eq!(status["reexecs"], 1);
    assert_eq!(
        status["services"]["web"]["last_upgrade"]["result"], "success",
        "{status}"
    );
}

#[test]
fn twenty_reexecs_leak_no_descriptor_and_no_process_and_workers_inherit_none() {
    let baton = Baton::start(&web(&[], "output = \"log\""));
    let pid = baton.pid();
    let baseline = descriptors(pid);
    for _ in 0..20 {
        reexec_ok(&baton);
    }
    wait_for("the descriptors back at their baseline", || {
        let now = descriptors(pid);
        if now.len() == baseline.len() {
            Ok(())
        } else {
            Err(format!("baseline {baseline:?}\nnow {now:?}"))
        }
    });
    assert!(zombie_children(pid).is_empty());
    // A worker started after the re-execs holds nothing of baton's.
    let (code, body) = http(baton.admin, "POST", "/v1/services/web/upgrade", &[]).expect("upgrade");
    assert_eq!(code, 200, "{body}");
    let worker = baton.worker_pid("web");
    let inherited: Vec<String> = descriptors(worker)
        .into_iter()
        .filter(|l| l.contains("memfd") || l.contains("pidfd") || l.contains("/proc") || l.ends_with("/baton"))
        .collect();
    assert!(inherited.is_empty(), "the worker inherited {inherited:?}");
    let listener = format!("socket:[{}]", listening_inode(baton.addr("web")));
    assert!(
        !descriptors(worker).contains(&listener),
        "the worker holds the public socket"
    );
}

#[test]
fn a_worker_that_dies_around_the_exec_is_noticed_and_replaced_by_the_new_image() {
    let baton = Baton::start(&web(&[], ""));
    let pid = baton.pid();
    let worker = baton.worker_pid("web");
    let (code, answer) = post_reexec(&baton, "");
    assert_eq!(code, 200, "{answer}");
    // The hand-over is under way: the worker dies before, during or just after the exec.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(worker as i32), Signal::SIGKILL).expect("kill the worker");
    let record = wait_reexec(&baton, answer["attempt"].as_u64().expect("attempt"));
    assert_eq!(record["result"], "ok", "{record}");
    let generation = baton.wait_generation("web", 2);
    assert!(generation >= 2);
    baton.wait_idle();
    assert_ne!(baton.worker_pid("web"), worker);
    wait_gone([worker]);
    assert!(zombie_children(pid).is_empty());
    assert_eq!(
        KeepAlive::connect(baton.addr("web")).whoami().expect("serves"),
        generation
    );
}

#[test]
fn a_kept_alive_connection_resends_unread_requests_after_a_reexec_as_before() {
    // Each worker connection answers one request, then closes on the next one without reading it: baton
    // resends it on a new connection, from the unanswered bytes the connection keeps.
    let baton = Baton::start(&web(&["--close-unread-after", "1"], ""));
    let resent = "baton_connections_resent_total{service=\"web\"}";
    let mut client = KeepAlive::connect(baton.addr("web"));
    assert_eq!(client.whoami().expect("first request"), 1);
    assert_eq!(client.whoami().expect("second request, resent"), 1);
    assert_eq!(baton.metric(resent), 1.0);
    let record = reexec_ok(&baton);
    assert_eq!(record["connections"], 1, "{record}");
    for request in 3..6 {
        assert_eq!(client.whoami().unwrap_or_else(|e| panic!("request {request}: {e}")), 1);
    }
    assert_eq!(baton.metric(resent), 4.0, "each one after the re-exec was resent too");
}

#[test]
fn a_shutdown_during_a_check_leaves_nothing_of_the_check_behind() {
    let baton = Baton::start(&web(&[], ""));
    let dir = baton.dir.path().to_owned();
    let pids = dir.join("check.pids");
    let hanging = script(
        &dir,
        "hangs",
        &format!("sleep 600 &\necho $$ $! > {}.tmp\nmv {0}.tmp {0}\nwait", pids.display()),
    );
    let admin = baton.admin;
    let request = std::thread::spawn(move || {
        http(
            admin,
            "POST",
            &format!("/v1/reexec?binary={}&check_timeout=60s", hanging.display()),
            &[],
        )
    });
    let started = wait_for("the check to run", || {
        std::fs::read_to_string(&pids).map_err(|e| e.to_string())
    });
    assert_eq!(baton.status()["reexec"]["stage"], "checking");
    let status = baton.stop();
    assert!(status.success(), "{status}");
    wait_gone(started.split_whitespace().map(|p| p.parse::<u32>().expect("pid")));
    let answer = request.join().expect("request");
    assert!(
        answer.map_or(true, |(code, _)| code == 503),
        "the caller is told baton stops, or loses the connection"
    );
}

#[test]
fn the_command_reexecs_through_a_unix_admin_socket_with_a_token_and_the_socket_is_kept() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("admin.sock");
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").expect("write the token");
    let config = format!(
        "[admin]\nlisten = \"unix:{}\"\ntoken_file = \"{}\"\n{}",
        path.display(),
        token.display(),
        web(&[], "")
    );
    let baton = Baton::launch(&config, &[], &[]);
    baton.wait_log("baton ready");
    let inode = |path: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).expect("the socket"));
    let before = inode(&path);
    let reexec = |token: &Path| {
        Command::new(env!("CARGO_BIN_EXE_baton"))
            .args(["reexec", "--admin", &format!("unix:{}", path.display()), "--token-file"])
            .arg(token)
            .output()
            .expect("baton reexec")
    };
    let output = reexec(&token);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(&format!("pid {} (unchanged)", baton.pid())), "{stdout}");
    assert_eq!(inode(&path), before, "the admin socket is the one it was");
    // The token still guards the API after the exec.
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "guess\n").expect("write a wrong token");
    let output = reexec(&wrong);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("bearer token"));
    assert_eq!(baton.stop().code(), Some(0));
    assert!(!path.exists(), "the socket is removed at exit");
}

#[test]
fn with_reexec_on_change_a_replaced_binary_reexecutes_baton_in_place() {
    let dir = tempfile::tempdir().expect("dir");
    let binary = copy_of_baton(dir.path(), "baton");
    // Started from the copy: the path baton was started from is the one it watches.
    let script = format!("shift; exec '{}' \"$@\"", binary.display());
    let config = format!("[daemon]\nreexec_on_change = true\n\n{}", web(&[], ""));
    let baton = Baton::spawn_with_env(&config, &["sh", "-c", &script, "sh"], &[]);
    baton.wait_idle();
    let pid = baton.pid();
    assert_eq!(std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe"), binary);
    let worker = baton.worker_pid("web");

    // A deploy replaces the binary the way a package manager does: a new file renamed over the old one.
    let new = copy_of_baton(dir.path(), "baton.new");
    std::fs::rename(&new, &binary).expect("replace the binary");
    let record = wait_for("the re-exec the new binary set off", || {
        let status = baton.status();
        match status["last_reexec"]["result"].as_str() {
            Some(_) => Ok(status["last_reexec"].clone()),
            None => Err(status.to_string()),
        }
    });
    assert_eq!(record["result"], "ok", "{record}\n{}", baton.log_text());
    assert_eq!(record["trigger"], "watch", "{record}");
    let status = baton.status();
    assert_eq!(status["pid"], pid);
    assert_eq!(status["reexecs"], 1);
    assert_eq!(baton.worker_pid("web"), worker, "the worker was kept");
    // The new image watches it too: the next replacement re-executes again.
    let newer = copy_of_baton(dir.path(), "baton.newer");
    std::fs::rename(&newer, &binary).expect("replace the binary again");
    wait_for("a second re-exec", || {
        let status = baton.status();
        (status["reexecs"] == 2).then_some(()).ok_or(status.to_string())
    });
    assert_eq!(baton.status()["last_reexec"]["trigger"], "watch");
    assert_eq!(baton.stop().code(), Some(0));
}
