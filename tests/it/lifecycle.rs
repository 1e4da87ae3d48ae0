//! The daemon's own life: shutdown with open connections, being killed, signals during upgrades.

use std::net::TcpStream;

use nix::sys::signal::Signal;

use crate::support::{Baton, KeepAlive, Load, http_get, service, wait_for, wait_gone};

#[test]
fn sigterm_stops_accepting_lets_open_connections_finish_then_exits_zero() {
    let baton = Baton::start(&service("web", &["--port", "{port}"], "drain_timeout = \"20s\""));
    let addr = baton.addr("web");
    let pid = baton.service("web")["pid"].as_u64().expect("pid") as u32;
    let mut open = KeepAlive::connect(addr);
    assert_eq!(open.whoami().expect("whoami"), 1);
    baton.signal(Signal::SIGTERM);
    wait_for("the public socket to close", || match TcpStream::connect(addr) {
        Err(_) => Ok(()),
        Ok(_) => Err("still accepting".to_owned()),
    });
    // The open connection is still served while baton drains.
    assert_eq!(open.whoami().expect("still served during shutdown"), 1);
    assert!(!crate::support::gone(pid), "the worker runs while a connection is open");
    drop(open);
    let status = baton.wait_exit();
    assert_eq!(status.code(), Some(0));
    wait_gone([pid]);
}

#[test]
fn on_one_thread_baton_serves_upgrades_and_exits_cleanly() {
    // `--threads 1` (here through BATON_THREADS) runs the daemon on a current-thread runtime of its own.
    let config = service("web", &["--port", "{port}"], "watchdog = \"0s\"");
    let baton = Baton::start_with_env(&config, &[("BATON_THREADS", "1")]);
    let tasks = std::fs::read_dir(format!("/proc/{}/task", baton.pid()))
        .expect("tasks")
        .count();
    assert!(
        tasks <= 3,
        "{tasks} threads: the main thread, the runtime's and at most one blocking one"
    );
    let load = Load::start(baton.addr("web"), 4);
    load.wait_ok(50);
    let old = baton.worker_pid("web");
    baton.signal(Signal::SIGHUP);
    baton.wait_generation("web", 2);
    wait_gone([old]);
    load.wait_ok(50);
    let report = load.stop();
    assert_eq!(report.failures, 0, "{:?}", report.errors);
    let (_, env) = http_get(baton.addr("web"), "/env").expect("GET /env");
    assert!(
        !env.contains("BATON_THREADS"),
        "baton's own setting stays out of workers: {env}"
    );
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn no_worker_survives_baton_killed_with_sigkill() {
    let config = format!(
        "{}{}",
        service("one", &["--port", "{port}"], ""),
        service("two", &["--socket", "{socket}"], "backend = \"unix\"")
    );
    let baton = Baton::start(&config);
    let pids: Vec<u32> = ["one", "two"]
        .iter()
        .map(|s| baton.service(s)["pid"].as_u64().expect("pid") as u32)
        .collect();
    baton.signal(Signal::SIGKILL);
    // The parent-death signal kills them; whoever adopts them reaps them, or they linger as zombies that
    // cannot serve: either way nothing runs.
    wait_for("the workers to be dead", || {
        let alive: Vec<u32> = pids.iter().copied().filter(|p| running(*p)).collect();
        if alive.is_empty() {
            Ok(())
        } else {
            Err(format!("{alive:?}"))
        }
    });
}

fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
    }
}

#[test]
fn sighups_during_an_upgrade_coalesce_into_one_follow_up() {
    let baton = Baton::start(&service(
        "web",
        &["--port", "{port}", "--ready-after", "300ms"],
        "watchdog = \"0s\"",
    ));
    baton.signal(Signal::SIGHUP);
    baton.wait_phase("web", "waiting_ready");
    for _ in 0..10 {
        baton.signal(Signal::SIGHUP);
        std::thread::yield_now();
    }
    // The first SIGHUP started generation 2; the ten during it make one follow-up: generation 3.
    baton.wait_upgrade("web", 3);
    baton.wait_idle();
    let service = baton.service("web");
    assert_eq!(service["generation"], 3, "{service}");
    assert_eq!(
        baton.count_log("upgrade started"),
        3,
        "the start, one upgrade, one follow-up"
    );
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn sigterm_during_start_up_stops_at_once() {
    let config = service("web", &["--port", "{port}", "--never-ready"], "");
    let baton = Baton::spawn(&config);
    let started = baton.wait_log("worker started");
    let pid = started["fields"]["pid"].as_u64().expect("pid") as u32;
    baton.signal(Signal::SIGTERM);
    // The readiness timeout is 30 s; baton must not wait for it.
    let status = baton.wait_exit();
    assert_eq!(status.code(), Some(0));
    wait_gone([pid]);
}

#[test]
fn a_sighup_during_start_up_is_neither_fatal_nor_lost() {
    let baton = Baton::spawn(&service("web", &["--port", "{port}", "--ready-after", "300ms"], ""));
    baton.wait_log("worker started");
    baton.signal(Signal::SIGHUP);
    // Start-up finishes with generation 1, then the queued SIGHUP upgrades to generation 2.
    let record = baton.wait_upgrade("web", 2);
    assert_eq!(record["trigger"], "signal", "{record}");
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn a_storm_of_sighups_under_load_makes_one_upgrade_and_one_follow_up() {
    let baton = Baton::start(&service("web", &["--port", "{port}"], "watchdog = \"2s\""));
    let load = Load::start(baton.addr("web"), 8);
    load.wait_ok(50);
    let mut most_alive = 0;
    for _ in 0..100 {
        baton.signal(Signal::SIGHUP);
        std::thread::sleep(std::time::Duration::from_millis(10));
        let service = baton.service("web");
        let alive = usize::from(service["pid"].is_u64())
            + usize::from(service["previous"].is_object())
            + service["draining"].as_array().map_or(0, Vec::len)
            + usize::from(matches!(service["phase"].as_str(), Some("spawning" | "waiting_ready")));
        most_alive = most_alive.max(alive);
    }
    // The first SIGHUP upgrades to generation 2; the 99 during its upgrade and watchdog window make one
    // follow-up, generation 3, once the window closes.
    let record = wait_for("the follow-up upgrade to finish", || {
        let service = baton.service("web");
        if service["last_upgrade"]["new_generation"] == 3 && service["phase"] == "idle" {
            Ok(service["last_upgrade"].clone())
        } else {
            Err(service.to_string())
        }
    });
    assert_eq!(record["result"], "success", "{record}");
    assert_eq!(
        baton.count_log("upgrade started"),
        3,
        "the start, one upgrade, one follow-up"
    );
    assert!(most_alive <= 3, "{most_alive} generations alive at once");
    load.wait_ok(50);
    let report = load.stop();
    assert_eq!(report.failures, 0, "{:?}", report.errors);
    eprintln!(
        "SIGHUP storm: 100 signals, 2 upgrades, at most {most_alive} generations alive, {} exchanges, 0 failed",
        report.ok
    );
    assert_eq!(baton.stop().code(), Some(0));
}
