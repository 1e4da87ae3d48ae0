//! The admin API's protections, what workers inherit, hostile admin requests, descriptor hygiene.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;

use crate::support::{Baton, DEADLINE, Load, exchange_raw, http, http_get, resident_kib, service, wait_for};

#[test]
fn a_unix_admin_socket_is_private_serves_and_is_removed_at_exit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("admin.sock");
    let config = format!(
        "[admin]\nlisten = \"unix:{}\"\n{}",
        path.display(),
        service("web", &["--port", "{port}"], "")
    );
    let baton = Baton::launch(&config, &[], &[]);
    baton.wait_log("baton ready");
    let meta = std::fs::metadata(&path).expect("the socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "only baton's user may connect"
    );
    let mut stream = UnixStream::connect(&path).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let (code, body) = exchange_raw(&mut stream, "GET", "/status", &[]).expect("GET /status");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"web\""), "{body}");
    assert_eq!(baton.stop().code(), Some(0));
    assert!(!path.exists(), "the socket is removed at exit");
}

#[test]
fn a_token_protects_every_endpoint_but_healthz() {
    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").expect("write token");
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n{}",
        token_file.display(),
        service("web", &["--port", "{port}"], "")
    );
    let mut baton = Baton::launch(&config, &[], &[]);
    baton.wait_admin();
    let admin = baton.admin;
    assert_eq!(
        http_get(admin, "/healthz").expect("healthz").0,
        200,
        "/healthz needs no token"
    );
    for path in ["/status", "/metrics", "/v1/status"] {
        let (code, body) = http_get(admin, path).expect("request");
        assert_eq!(code, 401, "{path} without a token: {body}");
        assert!(body.contains("\"error\""), "{body}");
        let (code, _) = http(admin, "GET", path, &["Authorization: Bearer wrong"]).expect("request");
        assert_eq!(code, 401, "{path} with a wrong token");
        let (code, _) = http(admin, "GET", path, &["Authorization: Bearer s3cret-token"]).expect("request");
        assert_eq!(code, 200, "{path} with the token");
    }
    let (code, _) = http(admin, "POST", "/v1/reload", &[]).expect("request");
    assert_eq!(code, 401, "actions need the token too");
    let (code, _) = http(
        admin,
        "POST",
        "/v1/reload",
        &["Authorization: Bearer s3cret-token", "Origin: https://evil.example"],
    )
    .expect("request");
    assert_eq!(code, 403, "a web page cannot drive baton");
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn workers_inherit_neither_batons_own_variables_nor_its_sockets() {
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        service(
            "web",
            &["--port", "{port}"],
            "env = { APP_LABEL = \"{service}-{generation}\" }"
        )
    );
    let pid_dir = tempfile::tempdir().expect("dir");
    let pid_file = pid_dir.path().join("baton.pid").to_string_lossy().into_owned();
    let env = [
        ("NOTIFY_SOCKET", "/nonexistent/notify"),
        ("LISTEN_FDS", "3"),
        ("LISTEN_PID", "1"),
        ("LISTEN_FDNAMES", "web"),
        ("WATCHDOG_USEC", "30000000"),
        ("FDSTORE", "8"),
        ("BATON_PID_FILE", pid_file.as_str()),
        ("UNRELATED", "kept"),
    ];
    let mut baton = Baton::launch(&config, &[], &env);
    baton.wait_admin();
    baton.wait_idle();
    let (code, body) = http_get(baton.addr("web"), "/env").expect("GET /env");
    assert_eq!(code, 200);
    for hidden in [
        "NOTIFY_SOCKET=",
        "LISTEN_FDS=",
        "LISTEN_PID=",
        "LISTEN_FDNAMES=",
        "WATCHDOG_USEC=",
        "FDSTORE=",
        "BATON_PID_FILE=",
    ] {
        assert!(!body.lines().any(|l| l.starts_with(hidden)), "{hidden} leaked:\n{body}");
    }
    for present in [
        "UNRELATED=kept",
        "APP_LABEL=web-1",
        "BATON_SERVICE=web",
        "BATON_GENERATION=1",
        "PORT=",
    ] {
        assert!(
            body.lines().any(|l| l.starts_with(present)),
            "{present} missing:\n{body}"
        );
    }
    let ours = sockets(baton.pid());
    let theirs = sockets(baton.worker_pid("web"));
    assert!(!ours.is_empty());
    let shared: Vec<_> = ours.intersection(&theirs).collect();
    assert!(shared.is_empty(), "the worker holds baton's sockets: {shared:?}");
    assert_eq!(baton.stop().code(), Some(0));
}

/// The socket inodes among the open descriptors of `pid`.
fn sockets(pid: u32) -> BTreeSet<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|t| t.to_string_lossy().into_owned())
        .filter(|t| t.starts_with("socket:"))
        .collect()
}

fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fd dir").count()
}

#[test]
fn baton_returns_to_its_descriptor_baseline_after_load_and_upgrades() {
    let baton = Baton::start(&service("web", &["--port", "{port}"], "watchdog = \"0s\""));
    let baseline = descriptors(baton.pid());
    let load = Load::start(baton.addr("web"), 8);
    load.wait_ok(200);
    baton.signal(nix::sys::signal::Signal::SIGHUP);
    baton.wait_generation("web", 2);
    load.wait_ok(200);
    let report = load.stop();
    assert_eq!(report.failures, 0, "{:?}", report.errors);
    wait_for("descriptors back to the baseline", || {
        let now = descriptors(baton.pid());
        if now <= baseline {
            Ok(())
        } else {
            Err(format!("{now} open, baseline {baseline}"))
        }
    });
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn hostile_admin_requests_get_4xx_answers_and_baton_carries_on() {
    let baton = Baton::start(&service("web", &["--port", "{port}"], ""));
    let admin = baton.admin;
    let rss_before = resident_kib(baton.pid());
    // Garbage instead of HTTP.
    let mut stream = TcpStream::connect(admin).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    stream
        .write_all(b"\x00\x01\x02 not http at all\r\n\r\n")
        .expect("write");
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    // Unknown path and wrong method.
    let (code, body) = http_get(admin, "/nope").expect("request");
    assert_eq!(code, 404);
    assert!(body.contains("\"error\""), "{body}");
    let (code, body) = http(admin, "DELETE", "/status", &[]).expect("request");
    assert_eq!(code, 405);
    assert!(body.contains("\"error\""), "{body}");
    // A header far too large.
    let huge = format!("X-Junk: {}", "a".repeat(1 << 20));
    let code = http(admin, "GET", "/status", &[&huge]).map(|(c, _)| c).unwrap_or(431);
    assert!((400..500).contains(&code), "{code}");
    // A large body nobody asked for: answered without being buffered.
    let mut stream = TcpStream::connect(admin).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let body_size = 64 << 20;
    stream
        .write_all(format!("POST /nope HTTP/1.1\r\nHost: test\r\nContent-Length: {body_size}\r\n\r\n").as_bytes())
        .expect("write");
    let chunk = vec![b'x'; 1 << 16];
    for _ in 0..64 {
        if stream.write_all(&chunk).is_err() {
            break;
        }
    }
    let mut response = [0u8; 12];
    stream
        .read_exact(&mut response)
        .expect("an answer before the body is read");
    assert_eq!(&response, b"HTTP/1.1 404");
    drop(stream);
    assert_eq!(http_get(admin, "/healthz").expect("healthz").0, 200, "still answering");
    let rss_after = resident_kib(baton.pid());
    assert!(
        rss_after < rss_before + 16 * 1024,
        "resident memory grew from {rss_before} KiB to {rss_after} KiB"
    );
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn a_worker_runs_as_the_configured_user_and_group() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let (Ok(Some(user)), Ok(Some(group))) = (
        nix::unistd::User::from_name("nobody"),
        nix::unistd::Group::from_name("nogroup"),
    ) else {
        eprintln!("skipped: no user nobody or group nogroup");
        return;
    };
    // Python's server from the system, in /, which every user may read.
    let config = r#"
[service.web]
listen = ["127.0.0.1:0"]
command = ["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
cwd = "/"
user = "nobody"
group = "nogroup"

[service.web.readiness]
path = "/"
interval = "50ms"
"#;
    let baton = Baton::start(config);
    let pid = baton.worker_pid("web");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let ids = |field: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .map(|v| v.split_whitespace().filter_map(|n| n.parse().ok()).collect())
            .unwrap_or_default()
    };
    assert!(ids("Uid:").iter().all(|u| *u == user.uid.as_raw()), "{status}");
    assert!(ids("Gid:").iter().all(|g| *g == group.gid.as_raw()), "{status}");
    // The user's own supplementary groups (nobody has none but its group), none of root's.
    assert!(ids("Groups:").iter().all(|g| *g == group.gid.as_raw()), "{status}");
    assert_eq!(http_get(baton.addr("web"), "/").expect("GET /").0, 200);
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn an_admin_client_that_never_finishes_its_headers_is_dropped() {
    let baton = Baton::start(&service("web", &["--port", "{port}"], ""));
    let mut stream = TcpStream::connect(baton.admin).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    stream.write_all(b"GET /status HTTP/1.1\r\nHost: te").expect("write");
    // baton gives up on the request after its header timeout and closes the connection.
    let mut response = Vec::new();
    if let Err(e) = stream.read_to_end(&mut response) {
        let hung = matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut);
        assert!(!hung, "the connection was never closed");
    }
    let text = String::from_utf8_lossy(&response);
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    assert_eq!(http_get(baton.admin, "/healthz").expect("healthz").0, 200);
    assert_eq!(baton.stop().code(), Some(0));
}
