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
