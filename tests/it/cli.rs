//! The command line: `check`, exit codes, start-up errors.

use std::process::Command;

use crate::support::service;

fn baton(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(args)
        .output()
        .expect("run baton")
}

#[test]
fn check_accepts_the_shipped_config() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/baton.toml");
    let output = baton(&["check", "--config", path]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("ok (1 service(s): web)"));
}

#[test]
fn check_names_file_line_column_and_value_of_an_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[service.web]\nlisten = [\"127.0.0.1:1\"]\ncommand = [\"x\"]\nstop_timeout = \"soon\"\n",
    )
    .expect("write");
    let output = baton(&["check", "--config", path.to_str().expect("utf-8 path")]);
    assert_eq!(output.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("bad.toml:4:16: service `web`: stop_timeout `soon`"),
        "{stderr}"
    );
}

#[test]
fn a_missing_config_file_is_a_config_error() {
    let output = baton(&["check", "--config", "/nonexistent/baton.toml"]);
    assert_eq!(output.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/baton.toml"));
}

#[test]
fn a_usage_error_exits_64_and_version_exits_0() {
    assert_eq!(baton(&["frobnicate"]).status.code(), Some(64));
    let version = baton(&["--version"]);
    assert_eq!(version.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn a_public_port_in_use_stops_start_up_naming_service_and_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("baton.toml");
    let config = service("web", &["--port", "{port}"], "").replace("127.0.0.1:0", &addr.to_string());
    std::fs::write(&path, format!("[admin]\nlisten = \"127.0.0.1:0\"\n{config}")).expect("write");
    let output = baton(&["run", "--config", path.to_str().expect("utf-8 path")]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("service `web`: listen {addr}: Address already in use")),
        "{stderr}"
    );
}

fn admin_command(daemon: &crate::support::Baton, args: &[&str]) -> std::process::Output {
    let admin = daemon.admin.to_string();
    let mut all = vec![args[0], "--admin", admin.as_str()];
    all.extend_from_slice(&args[1..]);
    baton(&all)
}

#[test]
fn status_shows_a_table_or_json() {
    let baton = crate::support::Baton::start(&service("web", &["--port", "{port}"], ""));
    let output = admin_command(&baton, &["status"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let table = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("SERVICE") && lines[0].contains("GEN") && lines[0].contains("HEALTH"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("web") && lines[1].contains("idle") && lines[1].contains("healthy"),
        "{table}"
    );
    let output = admin_command(&baton, &["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(json["services"]["web"]["generation"], 1);
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn upgrade_follows_every_step_and_exits_zero_on_success_and_one_on_failure() {
    let dir = tempfile::tempdir().expect("temp dir");
    let behaviour = dir.path().join("behaviour");
    let path = behaviour.to_str().expect("utf-8 path");
    let config = service(
        "web",
        &["--port", "{port}", "--behaviour-file", path],
        "watchdog = \"300ms\"",
    )
    .replace("interval = \"10ms\"", "interval = \"10ms\"\ntimeout = \"500ms\"");
    let baton = crate::support::Baton::start(&config);
    let output = admin_command(&baton, &["upgrade", "web"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for step in [
        "upgrade started: generation 2",
        "spawned generation 2, pid",
        "ready in",
        "switched: new connections go to generation 2",
        "watching for 300 ms, generation 1 kept warm",
        "draining generation 1",
        "old worker stopped: generation 1",
        "upgrade of web: success (generation 2 serving)",
    ] {
        assert!(stdout.contains(step), "no {step:?} in:\n{stdout}");
    }
    std::fs::write(&behaviour, "--never-ready").expect("write");
    let output = admin_command(&baton, &["upgrade", "web"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("upgrade of web: failed:") && stderr.contains("not ready after 500ms"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    // Past the watchdog window a rollback starts generation 1's release again: a worker that, like every
    // new one here now, never gets ready.
    let output = admin_command(&baton, &["rollback", "web"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("rollback of web: failed:") && stderr.contains("not ready"),
        "{stderr}"
    );
    std::fs::remove_file(&behaviour).expect("remove");
    let output = admin_command(&baton, &["reload"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("web: success, generation 5"),
        "the failed rollback was generation 4"
    );
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn an_unreachable_admin_api_is_one_clear_line() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = closed.local_addr().expect("addr").to_string();
    drop(closed);
    let output = baton(&["status", "--admin", &addr]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!("error: admin API not reachable at {addr}: ")),
        "{stderr}"
    );
    let output = baton(&["status", "--config", "/nonexistent/baton.toml"]);
    assert_eq!(output.status.code(), Some(78));
}

#[test]
fn upgrade_says_what_it_waits_for_when_the_drain_cap_is_reached() {
    let baton = crate::support::Baton::start(&service(
        "web",
        &["--port", "{port}"],
        "watchdog = \"0s\"\nmax_draining = 1",
    ));
    // Generation 1 keeps draining for as long as this connection is open.
    let mut held = crate::support::KeepAlive::connect(baton.addr("web"));
    assert_eq!(held.whoami().expect("whoami"), 1);
    baton.signal(nix::sys::signal::Signal::SIGHUP);
    baton.wait_generation("web", 2);
    let admin = baton.admin.to_string();
    let mut upgrade = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["upgrade", "--admin", &admin, "web"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run baton upgrade");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(upgrade.stdout.take().expect("stdout")));
    let waiting = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|line| line.starts_with("waiting for a drain slot"))
        .expect("a waiting line");
    assert!(waiting.contains("g1 draining (max_draining 1)"), "{waiting}");
    let status = admin_command(&baton, &["status"]);
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("waiting_for_drain"),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );
    assert_eq!(held.whoami().expect("the draining worker still serves"), 1);
    drop(held);
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(upgrade.wait().expect("wait").success(), "{rest:?}");
    assert!(
        rest.iter()
            .any(|l| l.contains("upgrade of web: success (generation 3 serving)")),
        "{rest:?}"
    );
    assert_eq!(baton.stop().code(), Some(0));
}
