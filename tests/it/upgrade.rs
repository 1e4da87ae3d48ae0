//! Upgrades: under load, with long-lived connections, with workers that fail, with bad reloads.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::Signal;

use crate::support::{
    Baton, DEADLINE, KeepAlive, Load, gone, http, http_get, python_web, service, wait_for, wait_gone,
};

const UPGRADES: u64 = 50;
const CLIENTS: usize = 16;

#[test]
fn fifty_upgrades_under_load_lose_no_connection() {
    let baton = Baton::start(&service(
        "web",
        &["--port", "{port}"],
        "drain_timeout = \"10s\"\nwatchdog = \"0s\"",
    ));
    let load = Load::start(baton.addr("web"), CLIENTS);
    load.wait_ok(100);
    for generation in 2..=UPGRADES + 1 {
        baton.signal(Signal::SIGHUP);
        baton.wait_generation("web", generation);
        // Each generation must really serve before the next upgrade replaces it.
        wait_for(&format!("generation {generation} to answer the load"), || {
            if load.has_seen(generation) {
                Ok(())
            } else {
                Err(format!("{} ok, {} failed", load.ok(), load.failures()))
            }
        });
    }
    load.wait_ok(100);
    let report = load.stop();
    assert_eq!(report.failures, 0, "failed exchanges: {:?}", report.errors);
    let expected: Vec<u64> = (1..=UPGRADES + 1).collect();
    assert_eq!(report.generations.iter().copied().collect::<Vec<_>>(), expected);
    let current = baton.service("web")["pid"].as_u64().expect("pid") as u32;
    let old: Vec<u32> = report.pids.iter().copied().filter(|p| *p != current).collect();
    assert_eq!(old.len() as u64, UPGRADES, "one pid per old generation");
    // Every old worker is stopped and reaped once its connections are done.
    wait_gone(old);
    wait_for("no draining worker", || {
        let service = baton.service("web");
        if service["draining"].as_array().is_some_and(Vec::is_empty) {
            Ok(())
        } else {
            Err(service.to_string())
        }
    });
    eprintln!("{} exchanges over {} upgrades, 0 failed", report.ok, UPGRADES);
    assert_eq!(baton.stop().code(), Some(0));
    wait_gone(report.pids);
}

#[test]
fn the_load_checker_sees_failures_when_no_worker_can_take_the_connections() {
    // The control case: proves the checker above can fail. The worker is killed and its replacement never
    // becomes ready, so held connections are closed at the pending timeout.
    let config = |args: &[&str]| service("web", args, "pending_timeout = \"100ms\"");
    let baton = Baton::start(&config(&["--port", "{port}"]));
    let load = Load::start(baton.addr("web"), CLIENTS);
    load.wait_ok(50);
    baton.write_config(&config(&["--port", "{port}", "--never-ready"]));
    let pid = baton.service("web")["pid"].as_u64().expect("pid") as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).expect("kill the worker");
    wait_for("the load to see failures", || {
        if load.failures() > 0 {
            Ok(())
        } else {
            Err(format!("{} ok, 0 failed", load.ok()))
        }
    });
    let report = load.stop();
    assert!(report.failures > 0);
}

#[test]
fn connections_are_held_while_a_killed_worker_restarts() {
    let baton = Baton::start(&service("web", &["--port", "{port}"], ""));
    let load = Load::start(baton.addr("web"), CLIENTS);
    load.wait_ok(50);
    let pid = baton.service("web")["pid"].as_u64().expect("pid") as u32;
    let ok_before = load.ok();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill the worker");
    baton.wait_generation("web", 2);
    wait_gone([pid]);
    load.wait_ok(100);
    let report = load.stop();
    // Only exchanges inside the killed worker at that instant may fail: at most one per client.
    assert!(
        report.failures <= CLIENTS as u64,
        "{} failures: {:?}",
        report.failures,
        report.errors
    );
    assert!(report.generations.contains(&2), "the restarted worker answers");
    let record = baton.wait_upgrade("web", 2);
    assert_eq!(record["trigger"], "restart", "{record}");
    eprintln!(
        "worker killed under load: {} exchanges ok ({} before the kill), {} failed: {:?}",
        report.ok, ok_before, report.failures, report.errors
    );
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn a_long_lived_connection_stays_with_the_old_worker_until_the_drain_timeout() {
    let baton = Baton::start(&service(
        "web",
        &["--port", "{port}"],
        "drain_timeout = \"1s\"\nwatchdog = \"0s\"",
    ));
    let addr = baton.addr("web");
    let mut old = KeepAlive::connect(addr);
    assert_eq!(old.whoami().expect("whoami"), 1);
    let old_pid = baton.service("web")["pid"].as_u64().expect("pid") as u32;
    baton.signal(Signal::SIGHUP);
    baton.wait_generation("web", 2);
    // New connections go to the new worker; the open one stays where it was.
    assert_eq!(KeepAlive::connect(addr).whoami().expect("whoami"), 2);
    assert_eq!(old.whoami().expect("the old connection still works"), 1);
    let draining = &baton.service("web")["draining"][0];
    assert_eq!(draining["generation"], 1);
    assert_eq!(draining["active_connections"], 1);
    // At the drain timeout baton closes it and stops the old worker.
    old.wait_closed();
    wait_gone([old_pid]);
    baton.wait_log("drain timeout: closed the connections left");
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn a_worker_that_never_becomes_ready_fails_the_upgrade_and_the_old_one_keeps_serving() {
    let extra = "readiness.timeout = \"1s\"";
    let config = |args: &[&str]| {
        service("web", args, "").replace(
            "interval = \"10ms\"\n",
            &format!("interval = \"10ms\"\n{}\n", extra.replace("readiness.", "")),
        )
    };
    let baton = Baton::start(&config(&["--port", "{port}"]));
    let load = Load::start(baton.addr("web"), 4);
    load.wait_ok(20);
    baton.write_config(&config(&["--port", "{port}", "--never-ready"]));
    baton.signal(Signal::SIGHUP);
    let record = baton.wait_upgrade("web", 2);
    assert_eq!(record["result"], "failed", "{record}");
    let error = record["error"].as_str().expect("error");
    assert!(error.contains("not ready after 1s"), "{error}");
    assert!(error.contains("status 503"), "{error}");
    let failed_pid = record["new_pid"].as_u64().expect("the failed worker's pid") as u32;
    wait_gone([failed_pid]);
    assert_eq!(baton.service("web")["generation"], 1);
    load.wait_ok(20);
    let report = load.stop();
    assert_eq!(report.failures, 0, "{:?}", report.errors);
    assert_eq!(report.generations.iter().copied().collect::<Vec<_>>(), vec![1]);
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn a_worker_that_crashes_while_starting_fails_the_upgrade_at_once() {
    let baton = Baton::start(&service("web", &["--port", "{port}"], ""));
    // The default readiness timeout is 30 s; the crash must be seen long before.
    baton.write_config(&service(
        "web",
        &["--port", "{port}", "--never-ready", "--exit-after", "200ms"],
        "",
    ));
    baton.signal(Signal::SIGHUP);
    let record = baton.wait_upgrade("web", 2);
    assert_eq!(record["result"], "failed", "{record}");
    let error = record["error"].as_str().expect("error");
    assert!(error.contains("exited while starting: exit code 3"), "{error}");
    let took = record["duration_ms"].as_u64().expect("duration");
    assert!(took < 10_000, "detected after {took} ms, not at once");
    eprintln!("crash during readiness detected after {took} ms");
    assert_eq!(baton.service("web")["generation"], 1);
    assert_eq!(http_get(baton.addr("web"), "/whoami").expect("still served").0, 200);
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn an_invalid_config_at_sighup_keeps_the_running_one() {
    let baton = Baton::start(&service("web", &["--port", "{port}"], ""));
    let addr = baton.addr("web");
    let pid = baton.service("web")["pid"].as_u64().expect("pid");
    baton.write_config("[service.web]\nlisten = 5\n");
    baton.signal(Signal::SIGHUP);
    let entry = baton.wait_log("reload rejected");
    let message = entry["fields"]["message"].as_str().expect("message");
    assert!(message.contains("baton.toml"), "{message}");
    assert!(message.contains("line 5, column 10"), "{message}");
    let service = baton.service("web");
    assert_eq!(service["generation"], 1);
    assert_eq!(service["pid"], pid);
    let (code, body) = http_get(addr, "/whoami").expect("still served");
    assert_eq!(code, 200);
    assert!(body.starts_with("gen=1 "), "{body}");
    let (_, metrics) = http_get(baton.admin, "/metrics").expect("metrics");
    assert!(
        metrics.contains("baton_config_reloads_total{result=\"failed\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("baton_config_last_reload_successful 0"), "{metrics}");
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn python_http_server_is_proxied_and_upgraded() {
    let baton = Baton::start(&python_web("watchdog = \"1s\""));
    let addr = baton.addr("web");
    let (code, body) = http_get(addr, "/").expect("GET /");
    assert_eq!(code, 200);
    assert!(body.contains("Directory listing"), "{body}");
    let first = baton.service("web")["pid"].as_u64().expect("pid") as u32;
    // The server's request log reaches baton's log, tagged.
    let line = wait_for("the worker's request log in baton's log", || {
        baton
            .log_entries()
            .into_iter()
            .find(|e| {
                e["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("\"GET / HTTP/1.1\" 200"))
            })
            .ok_or_else(|| baton.log_text())
    });
    assert_eq!(line["fields"]["service"], "web", "{line}");
    assert_eq!(line["fields"]["generation"], 1, "{line}");
    assert_eq!(line["fields"]["stream"], "stderr", "{line}");
    assert_eq!(line["fields"]["pid"], first, "{line}");
    baton.signal(Signal::SIGHUP);
    baton.wait_generation("web", 2);
    let (code, _) = http_get(addr, "/").expect("GET / after the upgrade");
    assert_eq!(code, 200);
    wait_gone([first]);
    let second = baton.service("web")["pid"].as_u64().expect("pid") as u32;
    assert_eq!(baton.stop().code(), Some(0));
    assert!(gone(second), "the worker is stopped with baton");
}

#[test]
fn services_are_added_and_removed_by_a_reload() {
    let one = service("one", &["--port", "{port}"], "");
    let two = service("two", &["--port", "{port}"], "");
    let baton = Baton::start(&one);
    let one_addr = baton.addr("one");
    let one_pid = baton.service("one")["pid"].as_u64().expect("pid") as u32;
    baton.write_config(&two);
    baton.signal(Signal::SIGHUP);
    wait_for("service two to serve and one to be gone", || {
        let status = baton.status();
        if status["services"]["two"]["generation"] == 1 && status["services"]["one"].is_null() {
            Ok(())
        } else {
            Err(status.to_string())
        }
    });
    let (code, _) = http_get(baton.addr("two"), "/whoami").expect("two serves");
    assert_eq!(code, 200);
    wait_gone([one_pid]);
    assert!(
        http_get(one_addr, "/whoami").is_err(),
        "the removed service's socket is closed"
    );
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn a_reload_of_changed_services_adds_removes_and_moves_and_keeps_unchanged_workers() {
    let a = service("a", &["--port", "{port}"], "");
    let b = service("b", &["--port", "{port}"], "");
    let c = service("c", &["--port", "{port}"], "");
    let baton = Baton::start(&format!("{a}{b}{c}"));
    let a_pid = baton.worker_pid("a");
    let c_pid = baton.worker_pid("c");
    let c_addr = baton.addr("c");
    // b gets a new command, c goes, d arrives on the very socket c had.
    let b2 = service("b", &["--port", "{port}", "--ready-after", "1ms"], "");
    let d = service("d", &["--port", "{port}"], "").replace("127.0.0.1:0", &c_addr.to_string());
    baton.write_config(&format!("{a}{b2}{d}"));
    let (code, body) = crate::support::http(baton.admin, "POST", "/v1/reload?upgrade=changed", &[]).expect("reload");
    assert_eq!(code, 200, "{body}");
    baton.wait_generation("b", 2);
    wait_for("d to serve and c to be gone", || {
        let status = baton.status();
        if status["services"]["d"]["generation"] == 1 && status["services"]["c"].is_null() {
            Ok(())
        } else {
            Err(status.to_string())
        }
    });
    assert_eq!(baton.worker_pid("a"), a_pid, "an unchanged service keeps its worker");
    assert_eq!(baton.service("a")["generation"], 1);
    assert_eq!(baton.addr("d"), c_addr, "the socket moved from c to d");
    let (code, _) = http_get(c_addr, "/whoami").expect("d serves on c's old address");
    assert_eq!(code, 200);
    wait_gone([c_pid]);
    let (code, body) = crate::support::http(baton.admin, "POST", "/v1/reload?upgrade=some", &[]).expect("reload");
    assert_eq!(code, 400, "{body}");
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn a_worker_that_cannot_bind_its_port_fails_the_upgrade_at_once() {
    // The worker is told a port that is taken: it exits at once, and the upgrade is reported failed
    // without waiting for the readiness timeout.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port().to_string();
    let baton = Baton::start(&service("web", &["--port", "{port}"], ""));
    baton.write_config(&service("web", &["--port", &port], ""));
    baton.signal(Signal::SIGHUP);
    let record = baton.wait_upgrade("web", 2);
    assert_eq!(record["result"], "failed", "{record}");
    assert!(
        record["error"]
            .as_str()
            .unwrap_or_default()
            .contains("exited while starting"),
        "{record}"
    );
    assert!(record["duration_ms"].as_u64().unwrap_or(u64::MAX) < 10_000, "{record}");
    assert_eq!(baton.service("web")["generation"], 1);
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn with_output_inherit_a_workers_lines_pass_through_untouched() {
    let baton = Baton::start(&python_web("output = \"inherit\""));
    assert_eq!(http_get(baton.addr("web"), "/").expect("GET /").0, 200);
    let line = baton.wait_log_text("\"GET / HTTP/1.1\" 200");
    assert!(
        serde_json::from_str::<serde_json::Value>(&line).is_err(),
        "not wrapped in the log: {line}"
    );
    assert_eq!(baton.stop().code(), Some(0));
}

/// Upgrades through the admin API, one after the other, each as soon as the last one has switched.
const RAPID_UPGRADES: u64 = 30;

/// A slow client: sends half a request and holds the connection until the service is `hold` generations
/// further (or an upgrade waits for a drain slot, which this very client may be holding up), then sends the
/// rest and checks the answer. Its worker drains all that time.
fn slow_request(addr: SocketAddr, admin: SocketAddr, hold: u64, stop: &AtomicBool) -> Result<(), String> {
    let service = |admin| {
        let (_, body) = http_get(admin, "/status").map_err(|e| format!("status: {e}"))?;
        let status: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        let service = &status["services"]["web"];
        let generation = service["generation"].as_u64().unwrap_or(0);
        Ok::<_, String>((generation, service["phase"] == "waiting_for_drain"))
    };
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    stream
        .write_all(b"GET / HTTP/1.0\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let target = service(admin)?.0 + hold;
    let deadline = std::time::Instant::now() + DEADLINE;
    while !stop.load(Ordering::Relaxed) {
        let (generation, waiting) = service(admin)?;
        if generation >= target || waiting {
            break;
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("generation {target} never came"));
        }
    }
    stream
        .write_all(b"Host: test\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(|e| format!("read: {e}"))?;
    match response.starts_with(b"HTTP/1.0 200") {
        true => Ok(()),
        false => Err(format!(
            "answer: {:?}",
            String::from_utf8_lossy(&response[..response.len().min(80)])
        )),
    }
}

#[test]
fn rapid_upgrades_faster_than_drains_lose_nothing_with_the_default_cap() {
    // Python's http.server as it ships, the default drain cap, no watchdog window. Slow clients keep old
    // workers draining across several upgrades each, so upgrades come faster than drains end and some of them
    // must wait for a drain slot; fresh-connection clients run all along.
    let baton = Baton::start(&python_web("watchdog = \"0s\""));
    let (addr, admin) = (baton.addr("web"), baton.admin);
    let stop = Arc::new(AtomicBool::new(false));
    let fast = |_| {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match http_get(addr, "/") {
                    Ok((200, _)) => ok += 1,
                    Ok((code, _)) => failed.push(format!("status {code}")),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        })
    };
    // Each holds for a different number of generations, so that they spread over the draining workers.
    let slow = |hold| {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match slow_request(addr, admin, hold, &stop) {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push(format!("slow: {e}")),
                }
            }
            (ok, failed)
        })
    };
    let clients: Vec<_> = (0..4).map(fast).chain((2..=6).map(slow)).collect();
    for _ in 0..RAPID_UPGRADES {
        let (code, body) = http(admin, "POST", "/v1/services/web/upgrade", &[]).expect("POST");
        assert_eq!(code, 200, "{body}");
        let record: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(record["result"], "success", "{record}");
    }
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for client in clients {
        let (o, f) = client.join().expect("client thread");
        ok += o;
        failed.extend(f);
    }
    let waited = baton.count_log("upgrade waits for a drain slot");
    eprintln!(
        "{RAPID_UPGRADES} upgrades ({waited} waited for a drain slot): {ok} requests ok, {} failed",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(10)]
    );
    assert!(ok > 0);
    assert!(
        waited > 0,
        "the upgrades never outran the drains: the test proves nothing"
    );
    assert_eq!(
        baton.metric(r#"baton_connections_rejected_total{reason="drain_timeout",service="web"}"#),
        0.0,
        "no connection was cut"
    );
    assert_eq!(baton.stop().code(), Some(0));
}
