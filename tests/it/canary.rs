//! Canary upgrades: new connections are split between the new worker and the previous one step by step,
//! the new one is judged on live traffic and rolled back by itself when it fails it, and an operator can
//! promote or abort a canary, which a re-exec of baton carries on.

use std::net::{IpAddr, SocketAddr};

use serde_json::Value;

use crate::support::*;

/// `GET /whoami` on a new connection from `source`: the generation that answered, or the error.
fn whoami_from(source: IpAddr, addr: SocketAddr) -> Result<u64, String> {
    let mut stream = connect_from(source, addr).map_err(|e| e.to_string())?;
    let (code, body) = exchange_raw(&mut stream, "GET", "/whoami", &[]).map_err(|e| e.to_string())?;
    if code != 200 {
        return Err(format!("status {code}: {body}"));
    }
    body.split_whitespace()
        .find_map(|w| w.strip_prefix("gen="))
        .and_then(|g| g.parse().ok())
        .ok_or_else(|| format!("no generation in {body:?}"))
}

/// The canary step `/status` shows, if one is under way.
fn step(baton: &Baton) -> Option<u64> {
    baton.service("web")["canary"]["step"].as_u64()
}

/// Whether `observed` of `count` is within the bounds of a share `p`: four standard deviations, and one.
fn within(observed: usize, count: usize, p: f64) -> bool {
    let expected = count as f64 * p;
    let deviation = (count as f64 * p * (1.0 - p)).sqrt();
    (observed as f64 - expected).abs() <= 4.0 * deviation + 1.0
}

#[test]
fn new_connections_follow_the_canary_steps_per_connection_and_per_client_with_no_failure() {
    let baton = Baton::start(&web(
        &[],
        "watchdog = \"1s\"\ncanary = { steps = [\"20%\", \"60%\"], step_time = \"3s\", sticky = false }",
    ));
    let addr = baton.addr("web");
    let local: IpAddr = "127.0.0.1".parse().expect("ip");
    let (code, body) = http(baton.admin, "POST", "/v1/services/web/upgrade?wait=false", &[]).expect("upgrade");
    assert_eq!(code, 202, "{body}");
    wait_for("the canary's first step", || {
        step(&baton).filter(|s| *s == 0).ok_or_else(|| "not yet".into())
    });
    // Per connection: batches whose step is the same before and after count for that step.
    let mut seen = [(0usize, 0usize); 2];
    let mut failures = 0;
    while let Some(before) = step(&baton) {
        let mut batch = (0, 0);
        for _ in 0..50 {
            match whoami_from(local, addr) {
                Ok(2) => batch = (batch.0 + 1, batch.1 + 1),
                Ok(_) => batch.1 += 1,
                Err(_) => failures += 1,
            }
        }
        if step(&baton) == Some(before) && before < 2 {
            let slot = &mut seen[before as usize];
            *slot = (slot.0 + batch.0, slot.1 + batch.1);
        }
    }
    for (i, share) in [0.2, 0.6].iter().enumerate() {
        let (new, count) = seen[i];
        assert!(count >= 100, "step {i}: only {count} connections");
        assert!(
            within(new, count, *share),
            "step {i}: {new} of {count} to the new worker, share {share}"
        );
    }
    assert_eq!(failures, 0, "both workers are good");
    let record = baton.wait_upgrade("web", 2);
    assert_eq!(record["result"], "success", "{record}");
    assert_eq!(
        whoami_from(local, addr),
        Ok(2),
        "everything goes to the new worker after the canary"
    );
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn a_sticky_canary_keeps_each_client_on_one_generation_within_a_step() {
    let baton = Baton::start(&web(
        &[],
        "watchdog = \"0s\"\ncanary = { steps = [\"30%\"], step_time = \"30s\" }",
    ));
    let addr = baton.addr("web");
    let (code, body) = http(baton.admin, "POST", "/v1/services/web/upgrade?wait=false", &[]).expect("upgrade");
    assert_eq!(code, 202, "{body}");
    wait_for("the canary", || step(&baton).ok_or_else(|| "not yet".into()));
    let clients: Vec<IpAddr> = (1..=200).map(|i| IpAddr::from([127, 0, 1, i as u8])).collect();
    let mut on_new = 0;
    for client in &clients {
        let first = whoami_from(*client, addr).expect("answered");
        for _ in 0..3 {
            assert_eq!(
                whoami_from(*client, addr),
                Ok(first),
                "client {client} switched generation mid-step"
            );
        }
        on_new += usize::from(first == 2);
    }
    assert!(
        within(on_new, clients.len(), 0.3),
        "{on_new} of {} clients on the new worker",
        clients.len()
    );
    // Promoted, from the CLI: every client goes to the new worker now.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["promote", "web", "--admin", &baton.admin.to_string()])
        .output()
        .expect("baton promote");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("promoted web: generation 2 takes every new connection"),
        "{stdout}"
    );
    baton.wait_upgrade("web", 2);
    for client in clients.iter().take(20) {
        assert_eq!(whoami_from(*client, addr), Ok(2));
    }
    let (code, body) = http(baton.admin, "POST", "/v1/services/web/promote", &[]).expect("promote");
    assert_eq!(code, 409, "nothing to promote: {body}");
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn a_new_worker_that_resets_live_connections_is_rolled_back_by_the_canary_and_the_old_one_serves_on() {
    let dir = tempfile::tempdir().expect("dir");
    let behaviour = dir.path().join("behaviour");
    let path = behaviour.to_str().expect("utf-8 path");
    let baton = Baton::start(&service(
        "web",
        &["--port", "{port}", "--behaviour-file", path],
        "watchdog = \"1s\"\ncanary = { steps = [\"25%\", \"50%\"], step_time = \"20s\", sticky = false, \
         max_error_rate = \"2%\", min_connections = 20 }",
    ));
    let addr = baton.addr("web");
    let local: IpAddr = "127.0.0.1".parse().expect("ip");
    // The next worker answers its readiness probes but resets one connection in five.
    std::fs::write(&behaviour, "--reset-every 5").expect("write");
    let (code, body) = http(baton.admin, "POST", "/v1/services/web/upgrade?wait=false", &[]).expect("upgrade");
    assert_eq!(code, 202, "{body}");
    wait_for("the canary", || step(&baton).ok_or_else(|| "not yet".into()));
    let (mut answered, mut failed) = (0u64, 0u64);
    let record: Value = wait_for("the canary's verdict", || {
        for _ in 0..20 {
            match whoami_from(local, addr) {
                Ok(_) => answered += 1,
                Err(_) => failed += 1,
            }
        }
        let record = baton.service("web")["last_upgrade"].clone();
        match record["new_generation"].as_u64() {
            Some(2) => Ok(record),
            _ => Err(format!("{answered} answered, {failed} failed")),
        }
    });
    assert_eq!(record["result"], "rolled_back", "{record}");
    let error = record["error"].as_str().unwrap_or_default();
    assert!(error.contains("failed the canary"), "{error}");
    assert!(step(&baton).is_none(), "the canary is over");
    // Failures are bounded by the first step's share: a quarter of the connections, one in five of those.
    let total = answered + failed;
    assert!(
        failed as f64 <= total as f64 * 0.25 * 0.2 + 4.0 * (total as f64 * 0.05).sqrt() + 3.0,
        "{failed} of {total} failed"
    );
    assert!(baton.log_text().contains("failed the canary"), "the log says why");
    // The old worker serves on, alone.
    std::fs::remove_file(&behaviour).expect("remove");
    for _ in 0..50 {
        assert_eq!(whoami_from(local, addr), Ok(1));
    }
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn a_canary_aborted_by_a_rollback_or_carried_across_a_reexec_goes_on_where_it_was() {
    let baton = Baton::start(&web(
        &[],
        "watchdog = \"0s\"\ncanary = { steps = [\"10%\", \"40%\"], step_time = \"2s\", sticky = false }",
    ));
    let addr = baton.addr("web");
    let local: IpAddr = "127.0.0.1".parse().expect("ip");
    // Aborted: back to the previous worker, the new one drains.
    let (code, body) = http(baton.admin, "POST", "/v1/services/web/upgrade?wait=false", &[]).expect("upgrade");
    assert_eq!(code, 202, "{body}");
    wait_for("the canary", || step(&baton).ok_or_else(|| "not yet".into()));
    let (code, body) = http(baton.admin, "POST", "/v1/services/web/rollback", &[]).expect("rollback");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("rolled_back"), "{body}");
    for _ in 0..20 {
        assert_eq!(whoami_from(local, addr), Ok(1));
    }
    // Carried across a re-exec of baton: the step it was at, then the next, then the whole traffic.
    let (code, body) = http(baton.admin, "POST", "/v1/services/web/upgrade?wait=false", &[]).expect("upgrade");
    assert_eq!(code, 202, "{body}");
    wait_for("the next canary", || step(&baton).ok_or_else(|| "not yet".into()));
    let (code, body) = http(baton.admin, "POST", "/v1/reexec", &[]).expect("reexec");
    assert_eq!(code, 200, "{body}");
    wait_for("the re-exec", || {
        let status = baton.status();
        (status["reexecs"] == 1).then_some(()).ok_or(status.to_string())
    });
    wait_for("the canary's second step, in the new image", || {
        step(&baton)
            .filter(|s| *s == 1)
            .ok_or_else(|| baton.service("web").to_string())
    });
    let record = baton.wait_upgrade("web", 3);
    assert_eq!(record["result"], "success", "{record}");
    assert_eq!(whoami_from(local, addr), Ok(3));
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn baton_upgrade_shows_each_canary_step_with_both_workers_counts() {
    let baton = Baton::start(&web(
        &[],
        "watchdog = \"0s\"\ncanary = { steps = [\"50%\"], step_time = \"2s\", sticky = false }",
    ));
    let addr = baton.addr("web");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let local: IpAddr = "127.0.0.1".parse().expect("ip");
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = whoami_from(local, addr);
            }
        })
    };
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["upgrade", "web", "--admin", &baton.admin.to_string()])
        .output()
        .expect("baton upgrade");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.join().expect("load");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for line in [
        "canary: generation 2 takes 50% of new connections",
        "canary at 50%: new ",
        "canary: generation 2 takes 100% of new connections",
        "upgrade of web: success (generation 2 serving)",
    ] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn connections_that_send_nothing_do_not_count_against_the_canary() {
    let baton = Baton::start(&web(
        &[],
        "watchdog = \"0s\"\ncanary = { steps = [\"50%\"], step_time = \"3s\", min_connections = 5 }",
    ));
    let addr = baton.addr("web");
    let (code, body) = http(baton.admin, "POST", "/v1/services/web/upgrade?wait=false", &[]).expect("upgrade");
    assert_eq!(code, 202, "{body}");
    wait_for("the canary", || step(&baton).ok_or_else(|| "not yet".into()));
    // A load balancer's connect checks (connect, close, nothing sent) from an address the sticky split sends
    // to the new worker, among real requests from other clients.
    let checker = (1..=50u8)
        .map(|i| IpAddr::from([127, 0, 2, i]))
        .find(|ip| whoami_from(*ip, addr) == Ok(2))
        .expect("an address on the new worker");
    for i in 0..100u8 {
        drop(connect_from(checker, addr).expect("connect"));
        let _ = whoami_from(IpAddr::from([127, 0, 3, i % 50 + 1]), addr);
    }
    let record = baton.wait_upgrade("web", 2);
    assert_eq!(record["result"], "success", "{record}");
    assert_eq!(baton.stop().code(), Some(0));
}
