//! Deploys that run themselves: a watched release that changes upgrades the service, a worker past its
//! lifetime is replaced, and a `prepare` command runs before each new worker.

use std::path::Path;

use nix::sys::signal::Signal;

use crate::support::*;

/// Points `link` at `target` the way a deploy flips it: a new symlink renamed over the old one.
fn flip(link: &Path, target: &Path) {
    let next = link.with_extension("next");
    let _ = std::fs::remove_file(&next);
    std::os::unix::fs::symlink(target, &next).expect("symlink");
    std::fs::rename(&next, link).expect("flip");
}

#[test]
fn a_flipped_release_symlink_or_a_rewritten_file_upgrades_the_service_once_it_settles() {
    let dir = tempfile::tempdir().expect("dir");
    let releases = dir.path().join("releases");
    for release in ["41", "42"] {
        std::fs::create_dir_all(releases.join(release)).expect("release");
    }
    let current = dir.path().join("current");
    flip(&current, &releases.join("41"));
    let settings = dir.path().join("settings.conf");
    std::fs::write(&settings, "a = 1\n").expect("write");
    let baton = Baton::start(&web(
        &[],
        &format!(
            "watch = [{:?}, {:?}]\nwatch_settle = \"300ms\"\nwatchdog = \"0s\"",
            current.display().to_string(),
            settings.display().to_string()
        ),
    ));
    assert_eq!(baton.service("web")["generation"], 1);

    flip(&current, &releases.join("42"));
    let record = baton.wait_upgrade("web", 2);
    assert_eq!(record["trigger"], "watch", "{record}");
    assert_eq!(record["result"], "success", "{record}");

    // A file rewritten in place, twice in a row (a copy in progress): one upgrade.
    std::fs::write(&settings, "a = 2\n").expect("write");
    std::fs::write(&settings, "a = 2\nb = 3\n").expect("write");
    let record = baton.wait_upgrade("web", 3);
    assert_eq!(record["trigger"], "watch", "{record}");
    assert_eq!(
        baton.metric("baton_upgrades_total{result=\"success\",service=\"web\",trigger=\"watch\"}"),
        2.0
    );

    // A watched path that disappears is no change; it is one when it comes back different.
    std::fs::remove_file(&settings).expect("remove");
    std::fs::write(&settings, "a = 4\nchanged = true\n").expect("write");
    let record = baton.wait_upgrade("web", 4);
    assert_eq!(record["trigger"], "watch", "{record}");
    assert_eq!(
        baton.service("web")["generation"],
        4,
        "one upgrade for the removal and return"
    );
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn a_worker_past_its_max_lifetime_is_replaced_through_a_normal_upgrade() {
    let baton = Baton::start(&web(&[], "max_lifetime = \"1s\"\nwatchdog = \"0s\""));
    let first = baton.worker_pid("web");
    let record = baton.wait_upgrade("web", 2);
    assert_eq!(record["trigger"], "recycle", "{record}");
    assert_eq!(record["result"], "success", "{record}");
    wait_gone([first]);
    let record = baton.wait_upgrade("web", 3);
    assert_eq!(record["trigger"], "recycle", "{record}");
    assert!(baton.metric("baton_upgrades_total{result=\"success\",service=\"web\",trigger=\"recycle\"}") >= 2.0);
    assert_eq!(baton.stop().code(), Some(0));
}

#[test]
fn prepare_runs_before_each_worker_and_its_failure_or_timeout_fails_the_upgrade_before_anything_starts() {
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("prepared");
    let good = format!(
        "prepare = [\"sh\", \"-c\", \"echo $BATON_SERVICE {{generation}} >> {}\"]\nwatchdog = \"0s\"",
        log.display()
    );
    let baton = Baton::start(&web(&[], &good));
    let prepared = || std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(prepared(), "web 1\n");
    let record = baton.service("web")["last_upgrade"].clone();
    assert!(record["phases"]["prepare_ms"].is_u64(), "{record}");

    // A prepare that fails: the upgrade fails with its last lines, nothing is spawned, the worker serves.
    let worker = baton.worker_pid("web");
    baton.write_config(&web(
        &[],
        "prepare = [\"sh\", \"-c\", \"echo pulling registry/app:stable; echo manifest unknown >&2; exit 3\"]\n\
         watchdog = \"0s\"",
    ));
    baton.signal(Signal::SIGHUP);
    let record = baton.wait_upgrade("web", 2);
    assert_eq!(record["result"], "failed", "{record}");
    let error = record["error"].as_str().unwrap_or_default();
    assert!(error.contains("prepare"), "{error}");
    assert!(error.contains("exit code 3"), "{error}");
    assert!(
        error.contains("pulling registry/app:stable | manifest unknown"),
        "{error}"
    );
    assert!(record["new_pid"].is_null(), "nothing started: {record}");
    assert_eq!(baton.worker_pid("web"), worker, "the worker serves on");
    let (code, _) = http_get(baton.addr("web"), "/whoami").expect("served");
    assert_eq!(code, 200);

    // One that runs past prepare_timeout: killed, with what it started, and the upgrade fails.
    let marker = dir.path().join("child.pid");
    baton.write_config(&web(
        &[],
        &format!(
            "prepare = [\"sh\", \"-c\", \"sleep 30 & echo $! > {}; wait\"]\nprepare_timeout = \"300ms\"\nwatchdog = \"0s\"",
            marker.display()
        ),
    ));
    baton.signal(Signal::SIGHUP);
    let record = baton.wait_upgrade("web", 3);
    assert_eq!(record["result"], "failed", "{record}");
    let error = record["error"].as_str().unwrap_or_default();
    assert!(error.contains("did not finish within 300ms"), "{error}");
    let sleeper: u32 = wait_for("the prepare's child pid", || {
        std::fs::read_to_string(&marker)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .ok_or_else(|| "not yet".to_owned())
    });
    wait_gone([sleeper]);
    assert_eq!(baton.worker_pid("web"), worker, "the worker serves on");
    assert_eq!(baton.stop().code(), Some(0));
}

/// `HH:MM:SS` of the time of day in UTC `ahead` from now.
fn utc_time_of_day(ahead: std::time::Duration) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        + ahead;
    let seconds = now.as_secs() % 86_400;
    format!("{:02}:{:02}:{:02}", seconds / 3600, seconds / 60 % 60, seconds % 60)
}

#[test]
fn a_release_change_outside_the_maintenance_window_waits_for_it_and_an_operators_upgrade_does_not() {
    let dir = tempfile::tempdir().expect("dir");
    let release = dir.path().join("release.txt");
    std::fs::write(&release, "1\n").expect("write");
    // Local time is UTC here; the window opens a few seconds from now and lasts an hour.
    let opens_in = std::time::Duration::from_secs(5);
    let window = format!(
        "{}-{}",
        utc_time_of_day(opens_in),
        utc_time_of_day(opens_in + std::time::Duration::from_secs(3600))
    );
    // The window's start is a whole second: it opens up to a second before `opens_in` has passed.
    let opens_at = std::time::Instant::now() + opens_in - std::time::Duration::from_secs(1);
    let baton = Baton::start_with_env(
        &web(
            &[],
            &format!(
                "watch = [{:?}]\nwatch_settle = \"100ms\"\nwatchdog = \"0s\"\nupgrade_window = \"{window}\"",
                release.display().to_string()
            ),
        ),
        &[("TZ", "UTC")],
    );
    std::fs::write(&release, "2\n").expect("write");
    let deferred = wait_for("the upgrade deferred", || {
        let service = baton.service("web");
        match service["deferred"]["trigger"].as_str() {
            Some("watch") => Ok(service["deferred"].clone()),
            _ => Err(service.to_string()),
        }
    });
    assert!(deferred["in_ms"].as_u64().is_some_and(|ms| ms <= 5_000), "{deferred}");
    assert_eq!(baton.service("web")["generation"], 1, "nothing runs outside the window");

    // An operator's upgrade runs at once.
    let (code, body) = http(baton.admin, "POST", "/v1/services/web/upgrade", &[]).expect("upgrade");
    assert_eq!(code, 200, "{body}");
    assert_eq!(baton.service("web")["generation"], 2);
    assert!(
        std::time::Instant::now() < opens_at,
        "the window was still closed: make it open later"
    );

    // The window opens: the deferred upgrade runs.
    let record = baton.wait_upgrade("web", 3);
    assert!(std::time::Instant::now() >= opens_at, "not before the window opened");
    assert_eq!(record["trigger"], "watch", "{record}");
    assert!(baton.service("web")["deferred"].is_null());
    assert_eq!(baton.stop().code(), Some(0));
}

/// A server that answers every GET with its name, which `NAME` (a Python expression) gives it: a
/// release's takes the name of the directory it runs from, so a reply shows which release's files the
/// worker was started with; an image's is told its name.
const NAMED_SERVER: &str = r#"
import http.server, os, sys
name = NAME
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("%s\n" % name).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"#;

/// A release's server.
fn release_server() -> String {
    NAMED_SERVER.replace(
        "NAME",
        "\"release \" + os.path.basename(os.path.dirname(os.path.abspath(__file__)))",
    )
}

fn release_of(baton: &Baton) -> String {
    let (code, body) = http_get(baton.addr("web"), "/").expect("GET");
    assert_eq!(code, 200, "{body}");
    body.trim().to_owned()
}

#[test]
fn releases_are_recorded_resolved_and_an_earlier_one_starts_again_after_the_window() {
    let dir = tempfile::tempdir().expect("dir");
    let releases = dir.path().join("releases");
    for release in ["41", "42"] {
        std::fs::create_dir_all(releases.join(release)).expect("release");
        std::fs::write(releases.join(release).join("app.py"), release_server()).expect("app");
    }
    let current = dir.path().join("current");
    flip(&current, &releases.join("41"));
    let app = current.join("app.py");
    let config = format!(
        "[service.web]\nlisten = [\"127.0.0.1:0\"]\ncommand = [\"python3\", {app:?}, \"{{port}}\"]\n\
         watch = [{current:?}]\nwatch_settle = \"200ms\"\nwatchdog = \"0s\"\n\
         [service.web.readiness]\npath = \"/\"\ninterval = \"20ms\"\n",
        app = app.display().to_string(),
        current = current.display().to_string(),
    );
    let baton = Baton::start(&config);
    // The worker was started with the release's own path, not the symlink's.
    assert_eq!(release_of(&baton), "release 41");

    flip(&current, &releases.join("42"));
    baton.wait_upgrade("web", 2);
    assert_eq!(release_of(&baton), "release 42");

    // Past the watchdog window (none here), a rollback starts the previous release again.
    let (code, record) = http(baton.admin, "POST", "/v1/services/web/rollback", &[]).expect("rollback");
    assert_eq!(code, 200, "{record}");
    let record: serde_json::Value = serde_json::from_str(&record).expect("JSON");
    assert_eq!(record["trigger"], "rollback", "{record}");
    assert_eq!(record["new_generation"], 3, "{record}");
    assert_eq!(release_of(&baton), "release 41", "the symlink still says 42");

    // Generation 2 drains and stops: its release ends.
    let listed = wait_for("generation 2's release to end", || {
        let (code, listed) = http_get(baton.admin, "/v1/services/web/releases").map_err(|e| e.to_string())?;
        let listed: serde_json::Value = serde_json::from_str(&listed).map_err(|e| format!("{code}: {e}"))?;
        match listed["releases"][1]["ended"].is_f64() {
            true => Ok(listed),
            false => Err(listed.to_string()),
        }
    });
    let list = listed["releases"].as_array().expect("a list");
    assert_eq!(list.len(), 3);
    assert_eq!(list[0]["generation"], 3, "newest first");
    assert_eq!(list[0]["from"], 1);
    let resolved = releases.join("41").join("app.py").canonicalize().expect("real path");
    assert_eq!(list[0]["command"][1], resolved.display().to_string());
    assert!(list[0]["files"][resolved.display().to_string()].is_string(), "{listed}");
    assert_eq!(list[1]["outcome"], "success");
    // The CLI lists them too.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["releases", "web", "--admin", &baton.admin.to_string()])
        .output()
        .expect("baton releases");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("GEN") && text.contains("(g1 again)"), "{text}");

    // The history goes across a re-exec of baton.
    let (code, body) = http(baton.admin, "POST", "/v1/reexec", &[]).expect("reexec");
    assert_eq!(code, 200, "{body}");
    wait_for("the re-exec", || {
        let status = baton.status();
        (status["reexecs"] == 1).then_some(()).ok_or(status.to_string())
    });
    let (_, after) = http_get(baton.admin, "/v1/services/web/releases").expect("releases");
    let after: serde_json::Value = serde_json::from_str(&after).expect("JSON");
    assert_eq!(
        after["releases"], listed["releases"],
        "the same releases after the re-exec"
    );

    // A release whose files changed since is not started again; nor is one never recorded.
    std::fs::write(
        releases.join("42").join("app.py"),
        format!("{}\n# edited\n", release_server()),
    )
    .expect("edit");
    let (code, body) = http(baton.admin, "POST", "/v1/services/web/rollback?to=2", &[]).expect("rollback");
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("has changed since generation 2 started"), "{body}");
    let (code, body) = http(baton.admin, "POST", "/v1/services/web/rollback?to=99", &[]).expect("rollback");
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("no release of generation 99"), "{body}");
    assert_eq!(baton.service("web")["generation"], 3);
    assert_eq!(baton.stop().code(), Some(0));
}

/// A stand-in for `docker`, as no container runtime runs here: `pull IMAGE` copies the image from
/// `$FAKE_REGISTRY` into `$FAKE_STORE`, and `run --rm -p ADDR:PORT:80 IMAGE` runs the pulled image's server
/// on PORT in the foreground, as `docker run` does (and fails as it does when the image was never pulled).
const FAKE_DOCKER: &str = r#"#!/bin/sh
set -e
command=$1; shift
case "$command" in
pull)
    image=$1; name=$(echo "$image" | tr '/:' '__')
    [ -d "$FAKE_REGISTRY/$name" ] || { echo "Error response from daemon: manifest for $image not found" >&2; exit 1; }
    mkdir -p "$FAKE_STORE"; rm -rf "$FAKE_STORE/$name"; cp -r "$FAKE_REGISTRY/$name" "$FAKE_STORE/$name"
    echo "$image: Pulled";;
run)
    port=
    while [ $# -gt 1 ]; do
        case "$1" in
        --rm) shift;;
        -p) port=$(echo "$2" | cut -d: -f2); shift 2;;
        *) shift;;
        esac
    done
    image=$1; name=$(echo "$image" | tr '/:' '__')
    [ -d "$FAKE_STORE/$name" ] || { echo "Unable to find image '$image' locally" >&2; exit 125; }
    exec python3 "$FAKE_STORE/$name/server.py" "$port" "$image";;
*) echo "fake docker: unknown command $command" >&2; exit 1;;
esac
"#;

#[test]
fn a_container_worker_is_pulled_by_prepare_stopped_by_its_signal_and_rolled_back_to_its_previous_image() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("dir");
    let docker = dir.path().join("docker");
    std::fs::write(&docker, FAKE_DOCKER).expect("write");
    std::fs::set_permissions(&docker, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let registry = dir.path().join("registry");
    for tag in ["v1", "v2"] {
        let image = registry.join(format!("registry_app_{tag}"));
        std::fs::create_dir_all(&image).expect("image");
        let server = NAMED_SERVER.replace("NAME", "\"image \" + sys.argv[2]");
        std::fs::write(image.join("server.py"), server).expect("server");
    }
    let stanza = |tag: &str| {
        format!(
            "[service.web]\nlisten = [\"127.0.0.1:0\"]\n\
             command = [{docker:?}, \"run\", \"--rm\", \"-p\", \"127.0.0.1:{{port}}:80\", \"registry/app:{tag}\"]\n\
             prepare = [{docker:?}, \"pull\", \"registry/app:{tag}\"]\n\
             env = {{ FAKE_REGISTRY = {registry:?}, FAKE_STORE = {store:?} }}\n\
             watchdog = \"0s\"\nstop_signal = \"SIGTERM\"\n\
             [service.web.readiness]\npath = \"/\"\ninterval = \"20ms\"\n",
            docker = docker.display().to_string(),
            registry = registry.display().to_string(),
            store = dir.path().join("store").display().to_string(),
        )
    };
    let image_of = |baton: &Baton| http_get(baton.addr("web"), "/").expect("GET").1.trim().to_owned();
    let baton = Baton::start(&stanza("v1"));
    assert_eq!(image_of(&baton), "image registry/app:v1", "pulled by prepare, then run");
    let first = baton.worker_pid("web");

    // A new image: the reload's upgrade pulls it first; the old container gets its stop signal.
    baton.write_config(&stanza("v2"));
    baton.signal(nix::sys::signal::Signal::SIGHUP);
    let record = baton.wait_upgrade("web", 2);
    assert_eq!(record["result"], "success", "{record}");
    assert!(record["phases"]["prepare_ms"].is_u64(), "{record}");
    assert_eq!(image_of(&baton), "image registry/app:v2");
    wait_gone([first]);

    // An image the registry does not have fails in prepare, before anything runs.
    baton.write_config(&stanza("v3"));
    baton.signal(nix::sys::signal::Signal::SIGHUP);
    let record = baton.wait_upgrade("web", 3);
    assert_eq!(record["result"], "failed", "{record}");
    assert!(
        record["error"]
            .as_str()
            .unwrap_or_default()
            .contains("manifest for registry/app:v3 not found"),
        "{record}"
    );
    assert_eq!(image_of(&baton), "image registry/app:v2");

    // Rolled back after the window: the previous image runs again, by name.
    let (code, body) = http(baton.admin, "POST", "/v1/services/web/rollback?to=1", &[]).expect("rollback");
    assert_eq!(code, 200, "{body}");
    assert_eq!(image_of(&baton), "image registry/app:v1");
    let (_, listed) = http_get(baton.admin, "/v1/services/web/releases").expect("releases");
    assert!(
        listed.contains("registry/app:v1") && listed.contains("registry/app:v2"),
        "{listed}"
    );
    assert_eq!(baton.stop().code(), Some(0));
}
