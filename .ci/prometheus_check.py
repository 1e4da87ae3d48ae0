#!/usr/bin/env python3
"""Checks baton's metrics and Grafana dashboard against a real Prometheus.

Starts baton (the debug build `cargo test` made) in front of the test worker, and a Prometheus that scrapes it
every second. Drives traffic, resets, upgrades (a good one, a failed one, one rolled back by the watchdog, a
rollback on request), a killed worker and reloads through the admin API. Then every query of
grafana/baton.json must return data through Prometheus's HTTP API, and `promtool check metrics` must accept
baton's exposition. Loopback only; every process it starts is stopped at the end.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATON = os.path.join(ROOT, "target", "debug", "baton")
WORKER = os.path.join(ROOT, "target", "debug", "baton-test-worker")
DASHBOARD = os.path.join(ROOT, "grafana", "baton.json")
DEADLINE = 30.0


def wait_for(what, check, deadline=DEADLINE):
    """Polls `check` until it returns something true; fails with `what` after `deadline` seconds."""
    end = time.monotonic() + deadline
    last = None
    while time.monotonic() < end:
        try:
            value = check()
            if value:
                return value
        except Exception as error:  # the thing polled may not be up yet
            last = error
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what} (last error: {last})")


class LineReader(threading.Thread):
    """Collects the stderr lines of a process."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream = stream
        self.lines = []

    def run(self):
        for line in self.stream:
            self.lines.append(line.rstrip("\n"))

    def find(self, pattern):
        for line in list(self.lines):
            match = re.search(pattern, line)
            if match:
                return match
        return None


def http(method, url, timeout=10):
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def config(admin_listen, behaviour):
    return f"""
[admin]
listen = "{admin_listen}"

[service.web]
listen = ["127.0.0.1:0"]
command = ["{WORKER}", "--port", "{{port}}", "--behaviour-file", "{behaviour}"]
watchdog = "1s"
max_connections = 64
pending_timeout = "500ms"

[service.web.readiness]
path = "/readyz"
interval = "20ms"
timeout = "2s"

[service.web.health]
interval = "100ms"
failures = 2
"""


def traffic(address, stop, counts):
    """Keeps clients busy: requests through baton, and connections the worker resets."""
    host, port = address
    while not stop.is_set():
        try:
            with socket.create_connection((host, port), timeout=5) as conn:
                conn.sendall(b"GET /whoami HTTP/1.1\r\nHost: check\r\nConnection: close\r\n\r\n")
                while conn.recv(65536):
                    pass
            counts["ok"] += 1
        except OSError:
            counts["failed"] += 1
        if counts["ok"] % 20 == 0:
            try:
                with socket.create_connection((host, port), timeout=5) as conn:
                    conn.sendall(b"RSET")
                    conn.recv(16)
            except OSError:
                pass
        time.sleep(0.005)


def expressions(dashboard):
    """Every PromQL expression of the dashboard: panel targets at any depth and annotations."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr" and isinstance(value, str) and value.strip():
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard.get("panels", []))
    walk(dashboard.get("annotations", {}).get("list", []))
    return found


def substitute(expr):
    for variable, value in [
        ("$__rate_interval", "1m"),
        ("$__interval", "15s"),
        ("$__range", "5m"),
        ("${instance}", ".*"),
        ("$instance", ".*"),
        ("${service}", ".*"),
        ("$service", ".*"),
    ]:
        expr = expr.replace(variable, value)
    if "$" in expr:
        raise SystemExit(f"unknown variable in dashboard query: {expr}")
    return expr


def main():
    workdir = tempfile.mkdtemp(prefix="baton-prometheus-check-")
    behaviour = os.path.join(workdir, "behaviour")
    baton_config = os.path.join(workdir, "baton.toml")
    with open(baton_config, "w") as f:
        f.write(config("127.0.0.1:0", behaviour))
    processes = []
    try:
        baton = subprocess.Popen(
            [BATON, "--log-format", "json", "run", "--config", baton_config],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
            env={**os.environ, "RUST_LOG": "info"},
        )
        processes.append(baton)
        baton_log = LineReader(baton.stderr)
        baton_log.start()
        admin = wait_for("baton's admin address", lambda: baton_log.find(r'"admin API listening","addr":"([^"]+)"'))
        admin = admin.group(1)
        base = f"http://{admin}"

        def web():
            return json.loads(http("GET", base + "/status")[1])["services"]["web"]

        service = wait_for("the first worker", lambda: web()["generation"] and web())
        host, port = service["listen"][0].rsplit(":", 1)
        address = (host, int(port))

        with open(os.path.join(workdir, "prometheus.yml"), "w") as f:
            f.write(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                "scrape_configs:\n  - job_name: baton\n    static_configs:\n"
                f"      - targets: ['{admin}']\n"
            )
        prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={workdir}/prometheus.yml", f"--storage.tsdb.path={workdir}/data",
             "--web.listen-address=127.0.0.1:0"],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
        )
        processes.append(prometheus)
        prometheus_log = LineReader(prometheus.stderr)
        prometheus_log.start()
        listening = wait_for("Prometheus's address", lambda: prometheus_log.find(r'msg="Listening on" address=(\S+)'))
        prom = f"http://{listening.group(1)}"

        def query(expr):
            url = prom + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            code, body = http("GET", url)
            answer = json.loads(body)
            if code != 200 or answer.get("status") != "success":
                raise SystemExit(f"query failed: {expr}: {body}")
            return answer["data"]["result"]

        wait_for("Prometheus to scrape baton", lambda: any(r["value"][1] == "1" for r in query('up{job="baton"}')))

        stop = threading.Event()
        counts = {"ok": 0, "failed": 0}
        client = threading.Thread(target=traffic, args=(address, stop, counts), daemon=True)
        client.start()
        wait_for("traffic", lambda: counts["ok"] > 50)

        def upgrade(expected):
            code, body = http("POST", base + "/v1/services/web/upgrade", timeout=DEADLINE)
            result = json.loads(body).get("result")
            if result != expected:
                raise SystemExit(f"upgrade: expected {expected}, got {code} {body}")
            print(f"upgrade: {result}")

        upgrade("success")
        with open(behaviour, "w") as f:
            f.write("--never-ready")
        upgrade("failed")
        with open(behaviour, "w") as f:
            f.write("--unhealthy-after 200ms")
        upgrade("rolled_back")
        os.remove(behaviour)
        # A rollback on request, inside the watchdog window.
        http("POST", base + "/v1/services/web/upgrade?wait=false")
        wait_for("the watchdog window", lambda: web()["phase"] == "watching")
        code, body = http("POST", base + "/v1/services/web/rollback")
        print(f"rollback: {code}")
        # A worker that dies and is restarted.
        wait_for("the end of the watchdog window", lambda: web()["phase"] == "idle")
        pid = web()["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for("the restart", lambda: web()["pid"] not in (None, pid))
        # A reload that applies and one that is rejected.
        code, body = http("POST", base + "/v1/reload", timeout=DEADLINE)
        print(f"reload: {code}")
        with open(baton_config, "a") as f:
            f.write("\nnot valid toml [\n")
        code, body = http("POST", base + "/v1/reload")
        print(f"invalid reload: {code}")
        with open(baton_config, "w") as f:
            f.write(config("127.0.0.1:0", behaviour))
        upgrade("success")

        exprs = expressions(json.load(open(DASHBOARD)))
        passed, failed = 0, []
        for expr in exprs:
            concrete = substitute(expr)
            try:
                wait_for(f"data for {concrete}", lambda: query(concrete), deadline=20)
                passed += 1
            except SystemExit as error:
                failed.append(f"{expr}: {error}")
        stop.set()
        client.join(timeout=10)

        metrics = http("GET", base + "/metrics")[1]
        check = subprocess.run(["promtool", "check", "metrics"], input=metrics, text=True, capture_output=True)
        if check.returncode != 0:
            failed.append(f"promtool check metrics: {check.stdout}{check.stderr}")
        else:
            passed += 1

        print(f"traffic: {counts['ok']} requests answered, {counts['failed']} failed")
        for failure in failed:
            print(f"FAILED: {failure}")
        print(f"prometheus: {passed} passed, {len(failed)} failed")
        return 1 if failed else 0
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
