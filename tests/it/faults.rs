//! The fault suite: bad deploys, crashes, stubborn workers, limits. Each case prints its figures.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::{
    Baton, DEADLINE, FAST_HEALTH, KeepAlive, Load, close_wait_sockets, cpu_seconds, http_get, service, wait_for,
    wait_gone, web,
};

/// Health probes every 50 ms; three failures in a row make a worker unhealthy.
#[test]
fn a_new_worker_that_turns_unhealthy_is_rolled_back() {
    let watched = format!("watchdog = \"10s\"\n{FAST_HEALTH}");
    let baton = Baton::start(&web(&[], &watched));
    let first = baton.worker_pid("web");
    let load = Load::start(baton.addr("web"), 8);
    load.wait_ok(50);
    baton.write_config(&web(&["--unhealthy-after", "300ms"], &watched));
    baton.signal(Signal::SIGHUP);
    baton.wait_generation("web", 2);
    let switched = Instant::now();
    let second = baton.worker_pid("web");
    let record = wait_for("the rollback", || {
        let service = baton.service("web");
        match service["last_upgrade"]["result"].as_str() {
            Some("rolled_back") => Ok(service["last_upgrade"].clone()),
            _ => Err(service.to_string()),
        }
    });
    let detected = switched.elapsed();
    assert_eq!(record["new_generation"], 2, "{record}");
    assert!(
        record["error"]
            .as_str()
            .unwrap_or_default()
            .contains("failed 3 health checks"),
        "{record}"
    );
    let service = baton.service("web");
    assert_eq!(
        service["generation"], 1,
        "traffic is back on the first worker: {service}"
    );
    assert_eq!(baton.worker_pid("web"), first, "the very same process");
    wait_gone([second]);
    load.wait_ok(50);
    let report = load.stop();
    assert_eq!(report.failures, 0, "{:?}", report.errors);
    assert_eq!(
        baton.metric(r#"baton_upgrades_total{result="rolled_back",service="web",trigger="signal"}"#),
        1.0
    );
    eprintln!(
        "rollback: detected {} ms after the switch (300 ms to turn unhealthy + 3 probes of 50 ms), {} exchanges, {} failed",
        detected.as_millis(),
        report.ok,
        report.failures
    );
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn a_new_worker_that_exits_during_the_watchdog_is_rolled_back() {
    let watched = format!("watchdog = \"10s\"\n{FAST_HEALTH}");
    let baton = Baton::start(&web(&[], &watched));
    let first = baton.worker_pid("web");
    baton.write_config(&web(&["--exit-after", "500ms"], &watched));
    baton.signal(Signal::SIGHUP);
    baton.wait_generation("web", 2);
    let record = wait_for("the rollback", || {
        let service = baton.service("web");
        match service["last_upgrade"]["result"].as_str() {
            Some("rolled_back") => Ok(service["last_upgrade"].clone()),
            _ => Err(service.to_string()),
        }
    });
    assert!(
        record["error"]
            .as_str()
            .unwrap_or_default()
            .contains("exited (exit code 3)"),
        "{record}"
    );
    assert_eq!(baton.worker_pid("web"), first);
    assert_eq!(
        http_get(baton.addr("web"), "/whoami")
            .expect("served")
            .1
            .split(' ')
            .next(),
        Some("gen=1")
    );
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn flapping_health_causes_no_rollback_and_no_upgrade_loop() {
    let watched = format!("watchdog = \"1s\"\n{FAST_HEALTH}");
    let baton = Baton::start(&web(&[], &watched));
    baton.write_config(&web(&["--flap"], &watched));
    baton.signal(Signal::SIGHUP);
    let record = baton.wait_upgrade("web", 2);
    assert_eq!(record["result"], "success", "{record}");
    // Keep watching well past the window: probes keep alternating, nothing reacts.
    let failures = baton.metric(r#"baton_health_checks_total{result="failure",service="web"}"#);
    wait_for("ten more failed probes", || {
        let now = baton.metric(r#"baton_health_checks_total{result="failure",service="web"}"#);
        if now >= failures + 10.0 {
            Ok(())
        } else {
            Err(format!("{now}"))
        }
    });
    let service = baton.service("web");
    assert_eq!(service["generation"], 2, "{service}");
    assert_eq!(service["healthy"], true, "{service}");
    assert_eq!(
        service["last_upgrade"]["new_generation"], 2,
        "no upgrade since: {service}"
    );
    assert_eq!(
        baton.metric(r#"baton_worker_restarts_total{reason="unhealthy",service="web"}"#),
        0.0
    );
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn an_active_worker_that_turns_unhealthy_is_replaced() {
    let baton = Baton::start(&web(
        &["--unhealthy-after", "300ms"],
        &format!("watchdog = \"0s\"\n{FAST_HEALTH}"),
    ));
    let first = baton.worker_pid("web");
    let record = baton.wait_upgrade("web", 2);
    assert_eq!(record["trigger"], "unhealthy", "{record}");
    assert_eq!(record["result"], "success", "{record}");
    wait_gone([first]);
    assert!(baton.metric(r#"baton_worker_restarts_total{reason="unhealthy",service="web"}"#) >= 1.0);
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn a_crash_looping_worker_backs_off_and_baton_stays_responsive() {
    // Every generation is ready at once and exits 100 ms later.
    let baton = Baton::start(&web(&["--exit-after", "100ms"], "watchdog = \"0s\""));
    let started = Instant::now();
    let cpu_before = cpu_seconds(baton.pid());
    wait_for("four restarts", || {
        let restarts = baton.metric(r#"baton_worker_restarts_total{reason="restart",service="web"}"#);
        if restarts >= 4.0 {
            Ok(())
        } else {
            Err(format!("{restarts}"))
        }
    });
    let elapsed = started.elapsed();
    let cpu = cpu_seconds(baton.pid()) - cpu_before;
    // Backoff 100 + 200 + 400 ms at least between the first four restarts, whatever the machine's speed.
    assert!(elapsed >= Duration::from_millis(700), "restarted too fast: {elapsed:?}");
    let (code, _) = http_get(baton.admin, "/healthz").expect("admin answers");
    assert_eq!(code, 200);
    wait_for("a pending restart to show in /status", || {
        let service = baton.service("web");
        if service["restart_in_ms"].is_u64() {
            Ok(())
        } else {
            Err(service.to_string())
        }
    });
    eprintln!(
        "crash loop: 4 restarts in {} ms, baton used {:.3} s of CPU",
        elapsed.as_millis(),
        cpu
    );
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn an_old_worker_ignoring_sigterm_is_killed_after_stop_timeout_and_reaped() {
    let extra = "watchdog = \"0s\"\nstop_timeout = \"300ms\"";
    let baton = Baton::start(&web(&["--ignore-sigterm"], extra));
    let stubborn = baton.worker_pid("web");
    baton.signal(Signal::SIGHUP);
    baton.wait_generation("web", 2);
    let entry = baton.wait_log("sending SIGKILL");
    assert_eq!(entry["fields"]["pid"], stubborn, "{entry}");
    wait_gone([stubborn]);
    let stopped = baton.wait_log("old worker stopped");
    assert_eq!(stopped["fields"]["status"], "killed by SIGKILL", "{stopped}");
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn past_max_draining_an_upgrade_waits_for_a_drain_slot_and_cuts_no_connection() {
    // The default cap (3), and drains that last: one long-lived connection per old generation.
    let baton = Baton::start(&web(&[], "watchdog = \"0s\""));
    let addr = baton.addr("web");
    let load = Load::start(addr, 4);
    let mut held = Vec::new();
    for generation in 1..=3 {
        let mut connection = KeepAlive::connect(addr);
        assert_eq!(connection.whoami().expect("whoami"), generation);
        held.push(connection);
        baton.signal(Signal::SIGHUP);
        baton.wait_generation("web", generation + 1);
    }
    // Generations 1, 2 and 3 drain: the next upgrade waits for one of them to stop instead of cutting it.
    baton.signal(Signal::SIGHUP);
    let service = baton.wait_phase("web", "waiting_for_drain");
    assert_eq!(
        service["waiting"]["draining"],
        serde_json::json!([1, 2, 3]),
        "{service}"
    );
    assert_eq!(service["waiting"]["max_draining"], 3, "{service}");
    assert_eq!(service["generation"], 4, "{service}");
    for (generation, connection) in (1..).zip(held.iter_mut()) {
        assert_eq!(connection.whoami().expect("a draining worker still serves"), generation);
    }
    // A request meanwhile folds into the waiting upgrade (once its reload has been applied, it is queued).
    baton.signal(Signal::SIGHUP);
    wait_for("the fifth reload", || match baton.count_log("reload applied") {
        5 => Ok(()),
        n => Err(format!("{n} reloads applied")),
    });
    // Generation 2's last connection closes: its worker stops and the waiting upgrade takes its slot.
    drop(held.remove(1));
    baton.wait_generation("web", 5);
    baton.wait_idle();
    assert_eq!(
        baton.service("web")["generation"],
        5,
        "the two requests made one upgrade"
    );
    assert_eq!(held[0].whoami().expect("generation 1 still serves"), 1);
    assert_eq!(held[1].whoami().expect("generation 3 still serves"), 3);
    let report = load.stop();
    assert_eq!(report.failures, 0, "{:?}", report.errors);
    assert_eq!(
        baton.metric(r#"baton_connections_rejected_total{reason="drain_timeout",service="web"}"#),
        0.0
    );
    drop(held);
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn connections_over_max_connections_are_closed_at_once_and_counted() {
    let baton = Baton::start(&web(&[], "max_connections = 2"));
    let addr = baton.addr("web");
    let mut first = KeepAlive::connect(addr);
    let mut second = KeepAlive::connect(addr);
    assert_eq!(first.whoami().expect("first"), 1);
    assert_eq!(second.whoami().expect("second"), 1);
    let mut third = KeepAlive::connect(addr);
    assert!(third.whoami().is_err(), "the third connection is over the limit");
    assert_eq!(
        baton.metric(r#"baton_connections_rejected_total{reason="max_connections",service="web"}"#),
        1.0
    );
    drop(first);
    wait_for("a free place", || match KeepAlive::connect(addr).whoami() {
        Ok(_) => Ok(()),
        Err(e) => Err(e.to_string()),
    });
    assert_eq!(second.whoami().expect("second still served"), 1);
    drop((second, third));
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn two_hundred_idle_connections_are_reaped_at_idle_timeout_while_a_busy_client_stays_served() {
    let baton = Baton::start(&web(&[], "idle_timeout = \"1s\""));
    let addr = baton.addr("web");
    let mut idle: Vec<TcpStream> = (0..200)
        .map(|_| {
            let stream = TcpStream::connect(addr).expect("connect");
            stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
            stream
        })
        .collect();
    let mut busy = KeepAlive::connect(addr);
    let started = Instant::now();
    let mut exchanges = 0;
    // The busy client keeps talking while the idle ones are reaped around it.
    while baton.metric(r#"baton_connection_errors_total{kind="idle_timeout",service="web",side="client"}"#) < 200.0 {
        busy.whoami().expect("the busy connection is never idle");
        exchanges += 1;
        assert!(started.elapsed() < DEADLINE, "idle connections not reaped");
        std::thread::sleep(Duration::from_millis(20));
    }
    for stream in &mut idle {
        let mut buf = [0u8; 1];
        assert_eq!(stream.read(&mut buf).unwrap_or(0), 0, "an idle connection was closed");
    }
    busy.whoami().expect("still served");
    eprintln!(
        "idle timeout: 200 idle connections reaped after {} ms while a busy client made {exchanges} exchanges",
        started.elapsed().as_millis()
    );
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn a_half_closed_connection_left_silent_is_closed_after_the_linger_bound() {
    let baton = Baton::start(&web(&["--ignore-eof"], "half_close_timeout = \"2s\""));
    let addr = baton.addr("web");
    // Raw echo: the client half-closes but never reads; the worker echoes and half-closes back, so both
    // directions end. This one must finish normally.
    let mut polite = TcpStream::connect(addr).expect("connect");
    polite.write_all(b"bye!").expect("write");
    polite.shutdown(Shutdown::Write).expect("half-close");
    let mut echoed = Vec::new();
    polite.read_to_end(&mut echoed).expect("read");
    assert_eq!(echoed, b"bye!");
    // HTTP: the client half-closes after a request; the worker answers but never closes its side. That
    // silent half-open connection must go.
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    stream
        .write_all(b"GET /whoami HTTP/1.1\r\nHost: test\r\n\r\n")
        .expect("write");
    stream.shutdown(Shutdown::Write).expect("half-close");
    let started = Instant::now();
    // Until the bound, baton's side of the client connection waits in CLOSE_WAIT.
    wait_for("baton's client socket in CLOSE_WAIT", || {
        match close_wait_sockets(baton.pid()) {
            0 => Err("none".to_owned()),
            _ => Ok(()),
        }
    });
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read until closed");
    assert!(
        String::from_utf8_lossy(&response).contains("gen=1"),
        "the answer came first"
    );
    wait_for("the half-close timeout to be counted", || {
        let count =
            baton.metric(r#"baton_connection_errors_total{kind="half_close_timeout",service="web",side="worker"}"#);
        if count >= 1.0 { Ok(()) } else { Err(format!("{count}")) }
    });
    wait_for("no socket of baton's in CLOSE_WAIT", || {
        match close_wait_sockets(baton.pid()) {
            0 => Ok(()),
            n => Err(format!("{n} in CLOSE_WAIT")),
        }
    });
    eprintln!(
        "half-closed connection closed {} ms after the client's FIN",
        started.elapsed().as_millis()
    );
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn a_public_port_in_use_rejects_the_whole_reload() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let baton = Baton::start(&web(&[], ""));
    let pid = baton.worker_pid("web");
    let other = service("other", &["--port", "{port}"], "").replace("127.0.0.1:0", &addr.to_string());
    baton.write_config(&format!("{}{other}", web(&[], "")));
    baton.signal(Signal::SIGHUP);
    let entry = baton.wait_log("reload rejected");
    let message = entry["fields"]["message"].as_str().expect("message");
    assert!(
        message.contains(&format!("service `other`: listen {addr}: Address already in use")),
        "{message}"
    );
    let status = baton.status();
    assert!(status["services"]["other"].is_null(), "{status}");
    assert_eq!(baton.worker_pid("web"), pid, "the running service was not upgraded");
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn baton_killed_with_sigkill_can_start_again_on_the_same_ports_at_once() {
    let baton = Baton::start(&web(&[], ""));
    let addr = baton.addr("web");
    let worker = baton.worker_pid("web");
    // Leave a connection in TIME_WAIT on the public port.
    assert_eq!(http_get(addr, "/whoami").expect("served").0, 200);
    baton.signal(Signal::SIGKILL);
    wait_for("the worker to die with baton", || {
        let _ = kill(Pid::from_raw(worker as i32), None);
        let stat = std::fs::read_to_string(format!("/proc/{worker}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.contains(") Z") {
            Ok(())
        } else {
            Err(stat)
        }
    });
    let again = Baton::start(&web(&[], "").replace("127.0.0.1:0", &addr.to_string()));
    assert_eq!(again.addr("web"), addr);
    assert_eq!(http_get(addr, "/whoami").expect("served again").0, 200);
    assert_eq!(again.stop().code(), Some(0));
}

#[test]
fn a_worker_killed_while_idle_is_restarted_and_gone_workers_leave_nothing_behind() {
    let baton = Baton::start(&web(&[], ""));
    let first = baton.worker_pid("web");
    kill(Pid::from_raw(first as i32), Signal::SIGKILL).expect("kill");
    let record = baton.wait_upgrade("web", 2);
    assert_eq!(record["trigger"], "restart");
    wait_gone([first]);
    assert_eq!(http_get(baton.addr("web"), "/whoami").expect("served").0, 200);
    assert_eq!(baton.stop().code(), Some(0));
}

/// The soft and hard open-file limits of process `pid`.
fn fd_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("open files line");
    let fields: Vec<&str> = line.split_whitespace().collect();
    (fields[3].to_owned(), fields[4].to_owned())
}

#[test]
fn baton_raises_its_open_file_limit_and_gives_workers_the_original() {
    let baton = Baton::spawn_under(&web(&[], ""), &["prlimit", "--nofile=512:4096"]);
    baton.wait_idle();
    assert_eq!(fd_limits(baton.pid()), ("4096".to_owned(), "4096".to_owned()));
    assert_eq!(
        fd_limits(baton.worker_pid("web")),
        ("512".to_owned(), "4096".to_owned())
    );
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn a_low_descriptor_limit_pauses_accepting_without_spinning_and_recovers() {
    // With 64 descriptors baton proxies 16 connections at once; the other clients wait in the listen queue.
    let extra = "idle_timeout = \"1s\"";
    let baton = Baton::spawn_under(&web(&[], extra), &["prlimit", "--nofile=64:64"]);
    baton.wait_idle();
    let addr = baton.addr("web");
    let clients: Vec<TcpStream> = (0..100).filter_map(|_| TcpStream::connect(addr).ok()).collect();
    assert_eq!(clients.len(), 100, "the listen queue takes every client");
    baton.wait_log("connection budget reached");
    // Idle connections are reaped every second and the queue is taken 16 by 16: two rounds take at least
    // two seconds, over which a spinning accept loop would burn a core.
    let series = r#"baton_connection_errors_total{kind="idle_timeout",service="web",side="client"}"#;
    let cpu_before = cpu_seconds(baton.pid());
    let started = Instant::now();
    wait_for("two rounds of reaped connections", || {
        let reaped = baton.metric(series);
        if reaped >= 32.0 {
            Ok(())
        } else {
            Err(format!("{reaped}"))
        }
    });
    let window = started.elapsed();
    let cpu = cpu_seconds(baton.pid()) - cpu_before;
    assert!(
        cpu < window.as_secs_f64() / 4.0,
        "baton used {cpu:.3} s of CPU in {window:?}: the accept loop spins"
    );
    let (code, _) = http_get(baton.admin, "/healthz").expect("the admin API still has descriptors");
    assert_eq!(code, 200);
    drop(clients);
    wait_for("service to recover", || match http_get(addr, "/whoami") {
        Ok((200, _)) => Ok(()),
        other => Err(format!("{other:?}")),
    });
    eprintln!(
        "descriptor limit 64, 100 clients: baton used {:.3} s of CPU over {} ms, admin answered, recovered",
        cpu,
        window.as_millis()
    );
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn fifty_upgrades_under_load_with_watchdog_rollbacks_lose_no_connection() {
    const UPGRADES: u64 = 50;
    let extra = "watchdog = \"200ms\"\n[service.web.health]\ninterval = \"20ms\"\ntimeout = \"200ms\"\nfailures = 2\n";
    let baton = Baton::start(&web(&[], extra));
    let load = Load::start(baton.addr("web"), 16);
    load.wait_ok(100);
    let mut rolled_back = 0;
    for generation in 2..=UPGRADES + 1 {
        // Every fifth deploy is bad: it turns unhealthy 50 ms after it starts.
        let bad = generation % 5 == 0;
        let args: &[&str] = if bad { &["--unhealthy-after", "50ms"] } else { &[] };
        baton.write_config(&web(args, extra));
        baton.signal(Signal::SIGHUP);
        let record = baton.wait_upgrade("web", generation);
        let expected = if bad { "rolled_back" } else { "success" };
        assert_eq!(record["result"], expected, "generation {generation}: {record}");
        rolled_back += u64::from(bad);
    }
    load.wait_ok(100);
    let report = load.stop();
    assert_eq!(report.failures, 0, "{:?}", report.errors);
    let current = baton.worker_pid("web");
    wait_gone(report.pids.iter().copied().filter(|p| *p != current));
    assert_eq!(
        baton.metric(r#"baton_upgrades_total{result="rolled_back",service="web",trigger="signal"}"#),
        rolled_back as f64
    );
    eprintln!(
        "{UPGRADES} upgrades under load, {rolled_back} rolled back by the watchdog: {} exchanges, 0 failed, {} generations answered",
        report.ok,
        report.generations.len()
    );
    assert_eq!(baton.stop().code(), Some(0));
}
