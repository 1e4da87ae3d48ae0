//! The admin API's actions with their synchronous outcomes, the event stream, and its error answers.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::mpsc;

use serde_json::Value;

use crate::support::{Baton, DEADLINE, FAST_HEALTH, http, web};

/// `POST path` on the admin API; the status code and the JSON answer.
fn post(baton: &Baton, path: &str) -> (u16, Value) {
    let (code, body) = http(baton.admin, "POST", path, &[]).expect("POST");
    (
        code,
        serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}")),
    )
}

#[test]
fn an_api_upgrade_waits_and_returns_its_outcome_with_phase_times() {
    let baton = Baton::start(&web(&[], &format!("watchdog = \"300ms\"\n{FAST_HEALTH}")));
    let old_pid = baton.worker_pid("web");
    let (code, outcome) = post(&baton, "/v1/services/web/upgrade");
    assert_eq!(code, 200, "{outcome}");
    assert_eq!(outcome["result"], "success");
    assert_eq!(outcome["trigger"], "api");
    assert_eq!(outcome["service"], "web");
    assert_eq!(outcome["old_generation"], 1);
    assert_eq!(outcome["old_pid"], old_pid);
    assert_eq!(outcome["new_generation"], 2);
    assert_eq!(outcome["new_pid"], baton.worker_pid("web"));
    for phase in ["spawn_ms", "ready_ms", "watch_ms"] {
        assert!(outcome["phases"][phase].is_u64(), "{phase} missing: {outcome}");
    }
    assert!(
        outcome["phases"]["watch_ms"].as_u64() >= Some(300),
        "the answer came after the window: {outcome}"
    );
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn an_api_upgrade_reports_a_failure_and_a_watchdog_rollback() {
    // The deploy replaces what the next worker will do (here a file the test worker reads), then upgrades.
    let dir = tempfile::tempdir().expect("temp dir");
    let behaviour = dir.path().join("behaviour");
    let path = behaviour.to_str().expect("utf-8 path");
    let extra = format!("watchdog = \"2s\"\n{FAST_HEALTH}");
    let config = web(&["--behaviour-file", path], &extra)
        .replace("interval = \"10ms\"", "interval = \"10ms\"\ntimeout = \"500ms\"");
    let baton = Baton::start(&config);
    std::fs::write(&behaviour, "--never-ready").expect("write");
    let (code, outcome) = post(&baton, "/v1/services/web/upgrade");
    assert_eq!(code, 502, "{outcome}");
    assert_eq!(outcome["result"], "failed");
    assert!(
        outcome["error"]
            .as_str()
            .unwrap_or_default()
            .contains("not ready after 500ms"),
        "{outcome}"
    );
    std::fs::write(&behaviour, "--unhealthy-after 100ms").expect("write");
    let (code, outcome) = post(&baton, "/v1/services/web/upgrade");
    assert_eq!(code, 502, "{outcome}");
    assert_eq!(outcome["result"], "rolled_back", "{outcome}");
    assert!(
        outcome["error"].as_str().unwrap_or_default().contains("health checks"),
        "{outcome}"
    );
    assert_eq!(baton.service("web")["generation"], 1);
    std::fs::remove_file(&behaviour).expect("remove");
    let (code, outcome) = post(&baton, "/v1/services/web/upgrade");
    assert_eq!(code, 200, "{outcome}");
    assert_eq!(outcome["new_generation"], 4);
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn a_rollback_request_switches_back_while_the_previous_worker_is_warm() {
    let baton = Baton::start(&web(&[], "watchdog = \"1m\""));
    let first = baton.worker_pid("web");
    let (code, accepted) = post(&baton, "/v1/services/web/upgrade?wait=false");
    assert_eq!(code, 202, "{accepted}");
    baton.wait_phase("web", "watching");
    let (code, outcome) = post(&baton, "/v1/services/web/rollback");
    assert_eq!(code, 200, "{outcome}");
    assert_eq!(outcome["result"], "rolled_back");
    assert_eq!(outcome["new_generation"], 2);
    assert_eq!(baton.worker_pid("web"), first, "back on the first worker");
    let (code, refused) = post(&baton, "/v1/services/web/rollback");
    assert_eq!(code, 409, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap_or_default()
            .contains("nothing to roll back to"),
        "{refused}"
    );
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn a_reload_request_returns_each_services_outcome_or_the_config_error() {
    let baton = Baton::start(&web(&[], "watchdog = \"0s\""));
    let (code, outcome) = post(&baton, "/v1/reload");
    assert_eq!(code, 200, "{outcome}");
    assert_eq!(outcome["result"], "applied");
    assert_eq!(outcome["services"]["web"]["upgraded"]["result"], "success", "{outcome}");
    assert_eq!(outcome["services"]["web"]["upgraded"]["new_generation"], 2, "{outcome}");
    baton.write_config("[service.web]\nlisten = [\"127.0.0.1:0\"]\ncommand = []\n");
    let (code, refused) = post(&baton, "/v1/reload");
    assert_eq!(code, 400, "{refused}");
    let message = refused["error"].as_str().unwrap_or_default();
    assert!(
        message.contains("baton.toml:6:11: service `web`: command is empty"),
        "{message}"
    );
    assert_eq!(baton.service("web")["generation"], 2, "nothing changed");
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn a_fresh_baton_exports_the_counters_of_what_has_not_happened_yet_at_zero() {
    let baton = Baton::start(&web(&[], ""));
    let (code, metrics) = http(baton.admin, "GET", "/metrics", &[]).expect("GET /metrics");
    assert_eq!(code, 200);
    for series in [
        r#"baton_config_reloads_total{result="success"} 0"#,
        r#"baton_config_reloads_total{result="failed"} 0"#,
        r#"baton_worker_restarts_total{reason="restart",service="web"} 0"#,
        r#"baton_worker_restarts_total{reason="unhealthy",service="web"} 0"#,
        r#"baton_upgrades_total{result="rolled_back",service="web",trigger="api"} 0"#,
        r#"baton_connection_errors_total{kind="idle_timeout",service="web",side="client"} 0"#,
        // The first worker's start is an upgrade that happened.
        r#"baton_upgrades_total{result="success",service="web",trigger="start"} 1"#,
    ] {
        assert!(
            metrics.lines().any(|line| line == series),
            "missing {series} in\n{metrics}"
        );
    }
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn wrong_requests_get_json_errors() {
    let baton = Baton::start(&web(&[], ""));
    let (code, body) = post(&baton, "/v1/services/nope/upgrade");
    assert_eq!(code, 404, "{body}");
    assert!(body["error"].as_str().unwrap_or_default().contains("no service `nope`"));
    let (code, body) = http(baton.admin, "GET", "/v1/services/web/upgrade", &[]).expect("GET");
    assert_eq!(code, 405, "{body}");
    let (code, body) = post(&baton, "/v1/services/web/upgrade?wait=maybe");
    assert_eq!(code, 400, "{body}");
    let (code, body) = post(&baton, "/v1/services/web/upgrade?colour=blue");
    assert_eq!(code, 400, "{body}");
    let (code, body) = http(baton.admin, "POST", "/v1/reload", &["Content-Length: 2", ""]).expect("POST");
    assert!(code == 400, "{code} {body}");
    assert_eq!(baton.service("web")["generation"], 1, "no request changed anything");
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn the_event_stream_tells_every_phase_of_an_upgrade() {
    let baton = Baton::start(&web(&[], "watchdog = \"200ms\""));
    let mut stream = TcpStream::connect(baton.admin).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    stream
        .write_all(b"GET /v1/events?service=web HTTP/1.1\r\nHost: test\r\n\r\n")
        .expect("write");
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            // Chunk-size lines of the chunked encoding are not objects.
            if let Ok(event @ Value::Object(_)) = serde_json::from_str::<Value>(line.trim()) {
                if lines_tx.send(event).is_err() {
                    return;
                }
            }
        }
    });
    let first = lines.recv_timeout(DEADLINE).expect("the stream is live");
    assert_eq!(first["event"], "subscribed");
    let (code, outcome) = post(&baton, "/v1/services/web/upgrade");
    assert_eq!(code, 200, "{outcome}");
    let mut seen = Vec::new();
    while !seen.iter().any(|e: &Value| e["event"] == "worker_stopped") {
        let event = lines
            .recv_timeout(DEADLINE)
            .unwrap_or_else(|_| panic!("events so far: {seen:?}"));
        assert_eq!(event["service"], "web", "{event}");
        seen.push(event);
    }
    let kinds: Vec<&str> = seen.iter().filter_map(|e| e["event"].as_str()).collect();
    for expected in [
        "upgrade_started",
        "spawned",
        "ready",
        "switched",
        "watching",
        "upgrade_finished",
        "drain_started",
        "worker_stopped",
    ] {
        assert!(kinds.contains(&expected), "no {expected} in {kinds:?}");
    }
    let position = |kind: &str| kinds.iter().position(|k| *k == kind).expect("present");
    assert!(
        position("spawned") < position("ready") && position("ready") < position("switched"),
        "{kinds:?}"
    );
    assert_eq!(baton.stop().code(), Some(0));
}

/// The inode of the socket listening on 127.0.0.1:`port`, from the kernel's table.
fn listening_inode(port: u16) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let local = format!("0100007F:{port:04X}");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // local_address, then the state (0A: LISTEN), then the inode in the tenth column.
        (fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A")).then(|| fields[9].to_owned())
    })
}

#[test]
fn the_state_document_names_every_socket_worker_and_counter_and_reads_back() {
    let baton = Baton::start(&web(&[], "watchdog = \"1m\""));
    let first = baton.worker_pid("web");
    let (code, _) = http(baton.admin, "POST", "/v1/services/web/upgrade?wait=false", &[]).expect("POST");
    assert_eq!(code, 202);
    // Caught in its watchdog window: two workers, the previous one kept warm.
    let service = baton.wait_phase("web", "watching");
    let (code, body) = http(baton.admin, "GET", "/v1/state", &[]).expect("GET /v1/state");
    assert_eq!(code, 200, "{body}");
    let state = baton::handover::State::decode(body.as_bytes()).expect("a state document");
    assert_eq!(state.version, baton::handover::VERSION);
    let config = state.config.as_ref().expect("the running configuration");
    assert_eq!(
        config.text,
        std::fs::read_to_string(baton.config_path()).expect("config file")
    );
    // The lifecycle as it stands, and the processes it names.
    let web = &state.services["web"];
    let machine = &web.machine;
    assert_eq!(machine.active.as_ref().map(|a| a.generation), Some(2));
    assert_eq!(machine.watch.as_ref().map(|w| w.previous.generation), Some(1));
    let pids: Vec<(u64, u32)> = web.workers.iter().map(|w| (w.generation, w.pid)).collect();
    assert_eq!(pids, [(1, first), (2, service["pid"].as_u64().expect("pid") as u32)]);
    assert_eq!(
        web.workers[1].addr.to_string(),
        service["worker"].as_str().expect("worker")
    );
    // Each worker's pidfd names that very process.
    for worker in &web.workers {
        let pidfd = worker.pidfd.expect("a pidfd");
        let target = std::fs::read_link(format!("/proc/{}/fd/{pidfd}", baton.pid())).expect("pidfd");
        assert_eq!(target.display().to_string(), "anon_inode:[pidfd]");
        let info = std::fs::read_to_string(format!("/proc/{}/fdinfo/{pidfd}", baton.pid())).expect("fdinfo");
        assert!(info.lines().any(|l| l == format!("Pid:\t{}", worker.pid)), "{info}");
    }
    // Every descriptor named is the very socket: the public one by its inode in the kernel's table.
    let fd_target = |fd: i32| std::fs::read_link(format!("/proc/{}/fd/{fd}", baton.pid())).ok();
    let listener = &state.listeners[0];
    assert_eq!(listener.local, baton.addr("web"));
    let inode = listening_inode(listener.local.port()).expect("listening socket in /proc/net/tcp");
    assert_eq!(
        fd_target(listener.fd).map(|p| p.display().to_string()),
        Some(format!("socket:[{inode}]"))
    );
    let admin = state.admin.as_ref().expect("admin socket");
    assert_eq!(admin.endpoint.to_string(), baton.admin.to_string());
    let admin_inode = listening_inode(baton.admin.port()).expect("admin socket in /proc/net/tcp");
    assert_eq!(
        fd_target(admin.fd).map(|p| p.display().to_string()),
        Some(format!("socket:[{admin_inode}]"))
    );
    assert!(state.runtime_dir.as_ref().is_some_and(|d| d.is_dir()));
    // Counters, with their labels.
    let upgrades = state
        .metrics
        .iter()
        .find(|f| f.name == "baton_upgrades_total")
        .expect("the upgrade counter");
    let started = upgrades
        .series
        .iter()
        .find(|s| s.labels.get("trigger").map(String::as_str) == Some("start") && s.labels["result"] == "success")
        .expect("the first upgrade's series");
    assert_eq!(started.value, baton::handover::Value::Counter(1.0));
    // What is read back is what was written.
    let again = baton::handover::State::decode(&state.encode().expect("encode")).expect("decode");
    assert_eq!(again, state);
    assert_eq!(baton.stop().code(), Some(0));
}
