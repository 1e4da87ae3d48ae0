//! Drain policies against keep-alive clients. A layer-4 proxy cannot end an idle keep-alive connection by
//! itself; only the old worker can. Each case prints the requests retried and failed.

use nix::sys::signal::Signal;

use crate::support::{Baton, KeepAliveLoad, KeepAliveReport, service, wait_gone};

const CLIENTS: usize = 8;

/// Runs an upgrade under keep-alive load; returns what the clients saw and whether the drain timed out.
fn upgrade_under_keep_alive(policy: &str, graceful: bool) -> (KeepAliveReport, bool) {
    let mut args = vec!["--port", "{port}"];
    if graceful {
        args.push("--graceful");
    }
    let extra = format!("watchdog = \"0s\"\ndrain_timeout = \"2s\"\ndrain_policy = \"{policy}\"");
    let baton = Baton::start(&service("web", &args, &extra));
    let old = baton.worker_pid("web");
    let load = KeepAliveLoad::start(baton.addr("web"), CLIENTS);
    load.wait_ok(200);
    baton.signal(Signal::SIGHUP);
    baton.wait_generation("web", 2);
    wait_gone([old]);
    load.wait_ok(200);
    let report = load.stop();
    let cut = baton
        .log_entries()
        .iter()
        .any(|e| e["fields"]["message"] == "drain timeout: closed the connections left");
    assert!(
        report.generations.contains(&2),
        "clients reached the new worker: {report:?}"
    );
    eprintln!(
        "drain_policy = {policy}, {} server: {} answered, {} retried on a fresh connection, {} failed, drain {}: {:?}",
        if graceful { "graceful" } else { "abrupt" },
        report.ok,
        report.retried,
        report.failed,
        if cut { "cut at drain_timeout" } else { "finished early" },
        report.errors
    );
    assert_eq!(baton.stop().code(), Some(0));
    (report, cut)
}

#[test]
fn signal_policy_with_a_graceful_server_moves_keep_alive_clients_without_a_failure() {
    let (report, cut) = upgrade_under_keep_alive("signal", true);
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    // The worker closes idle connections with a FIN that baton holds back: the clients' next requests go to
    // the new worker on the same client connections.
    assert_eq!(report.retried, 0, "{:?}", report.errors);
    assert!(
        !cut,
        "the server closed its idle connections itself, before drain_timeout"
    );
}

#[test]
fn wait_policy_keeps_keep_alive_clients_on_the_old_worker_until_drain_timeout() {
    let (_, cut) = upgrade_under_keep_alive("wait", true);
    assert!(cut, "idle keep-alive connections never close by themselves");
}

#[test]
fn wait_policy_with_an_abrupt_server_is_bounded_by_drain_timeout() {
    let (_, cut) = upgrade_under_keep_alive("wait", false);
    assert!(cut, "idle keep-alive connections never close by themselves");
}

#[test]
fn signal_policy_with_an_abrupt_server_drains_at_once() {
    // The server dies on SIGTERM: requests in flight at that moment fail, the rest are retried.
    let (report, cut) = upgrade_under_keep_alive("signal", false);
    assert!(!cut, "the server is gone at once");
    assert!(report.ok > 0);
}
