#!/usr/bin/env python3
"""Side-by-side benchmark of baton against HAProxy (mode tcp) and nginx (stream), with direct as the ceiling.

One upstream serves them all: nginx for small static HTTP responses and iperf3 for bulk. (baton runs its own
copies as its workers, with the same configuration, since baton starts its workers itself.) Targets are
measured interleaved, round after round, and each figure is reported as the median with the min-max of the
rounds. Everything runs on loopback; every process is stopped at the end.

    python3 benches/bench.py              # the whole run, markdown on stdout
    python3 benches/bench.py --quick      # one short round, to try the harness
    python3 benches/bench.py --reexec-only  # steady state, the re-exec window and the pause with idle connections

Needs: wrk, iperf3, haproxy, nginx with libnginx-mod-stream (Debian packages), and a release build of
baton (`cargo build --release`). Run as root so that the descriptor limits can be raised for 10,000 idle
connections.
"""

import argparse
import http.client
import json
import os
import platform
import random
import re
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATON = os.path.join(ROOT, "target", "release", "baton")
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
TICKS = os.sysconf("SC_CLK_TCK")
# Idle connections for the memory figure: 10,000, or fewer when the descriptor limit cannot hold them (a proxy
# holds two descriptors per connection).
IDLE_CONNECTIONS = 10_000
# The descriptor limit every process gets, and the connections a proxy can hold with it.
FD_LIMIT, MAX_CONNECTIONS = 20_000, 9_000
BODY = b"x" * 1024
REQUEST = b"GET /index.html HTTP/1.1\r\nHost: bench\r\n\r\n"
# Idle connections open through baton while it re-executes, for the pause figure: 10,000, or fewer when baton's
# connection budget (two descriptors per connection, under its descriptor limit) cannot hold them.
PAUSE_CONNECTIONS = 10_000
# How long one re-exec may take, from the request to its outcome in /status, before it counts as lost.
REEXEC_DEADLINE = 30.0


def free_port():
    """A port for a peer's configuration file. (Peers need fixed ports; baton itself reports what it bound.)"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, deadline=15.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port}")


def wait_path(path, deadline=15.0):
    end = time.monotonic() + deadline
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise SystemExit(f"{path} did not appear")
        time.sleep(0.05)


def children(pid):
    """`pid` and all its descendants."""
    found = [pid]
    for task in os.listdir("/proc"):
        if not task.isdigit():
            continue
        try:
            with open(f"/proc/{task}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid:
            found.extend(children(int(task)))
    return found


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / TICKS


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


class Target:
    """A proxy (or none) in front of the upstream: its web and bulk ports and the processes that make it."""

    def __init__(self, name, web_port, bulk_port, pids, with_children, unix_port=None):
        self.name, self.web_port, self.bulk_port, self.pids = name, web_port, bulk_port, pids
        # The same web service, proxied to an upstream that listens on a Unix socket.
        self.unix_port = unix_port
        # HAProxy's and nginx's work happens in child processes; baton's children are its workers, the
        # upstream, which is not counted.
        self.with_children = with_children

    def proxy_pids(self):
        if not self.with_children:
            return list(self.pids)
        return [p for pid in self.pids for p in children(pid)]


class Bench:
    def __init__(self, args):
        self.args = args
        self.dir = tempfile.mkdtemp(prefix="baton-bench-")
        # nginx's workers run as an unprivileged user and must read the page.
        os.chmod(self.dir, 0o755)
        self.processes = []

    def start(self, argv, **kwargs):
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=kwargs.pop("stderr", subprocess.DEVNULL), **kwargs)
        self.processes.append(process)
        return process

    def stop_all(self):
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()

    # --- the upstream and the targets ---------------------------------------------------------------------

    def nginx_upstream_conf(self, *listens):
        listen = "\n".join(f"        listen {address} backlog=4096;" for address in listens)
        return f"""
worker_processes 1;
worker_rlimit_nofile {FD_LIMIT};
pid {self.dir}/nginx-$$.pid;
error_log stderr error;
daemon off;
# Room to spare: nginx closes its oldest idle keep-alive connections once fewer than 1/16 of these are free.
events {{ worker_connections {FD_LIMIT}; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {{
{listen}
        location / {{ root {self.dir}/www; }}
    }}
}}
"""

    def setup(self):
        os.makedirs(f"{self.dir}/www")
        with open(f"{self.dir}/www/index.html", "wb") as f:
            f.write(BODY)
        up_web, up_bulk = free_port(), free_port()
        self.upstream_socket = f"{self.dir}/upstream.sock"
        with open(f"{self.dir}/upstream.conf", "w") as f:
            f.write(self.nginx_upstream_conf(f"127.0.0.1:{up_web}", f"unix:{self.upstream_socket}")
                    .replace("$$", "upstream"))
        self.start(["nginx", "-c", f"{self.dir}/upstream.conf"])
        self.start(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(up_bulk)])
        wait_port(up_web)
        wait_port(up_bulk)
        wait_path(self.upstream_socket)
        self.targets = {"direct": Target("direct", up_web, up_bulk, [], False)}
        self.targets["baton"] = self.start_baton()
        self.targets["haproxy"] = self.start_haproxy(up_web, up_bulk)
        self.targets["nginx"] = self.start_nginx_stream(up_web, up_bulk)

    def start_baton(self):
        # baton starts its own workers: the same nginx configuration, on the port baton gives it.
        with open(f"{self.dir}/worker.conf.in", "w") as f:
            f.write(self.nginx_upstream_conf("127.0.0.1:PORT").replace("$$", "worker-PORT"))
        worker = ["sh", "-c", f"sed s/PORT/$PORT/g {self.dir}/worker.conf.in > {self.dir}/worker-$PORT.conf && "
                              f"exec nginx -c {self.dir}/worker-$PORT.conf"]
        # The same reading the PROXY protocol, which baton sends it (proxy_protocol = "v2").
        with open(f"{self.dir}/worker-pp.conf.in", "w") as f:
            f.write(self.nginx_upstream_conf("127.0.0.1:PORT proxy_protocol").replace("$$", "worker-pp-PORT"))
        pp_worker = ["sh", "-c", f"sed s/PORT/$PORT/g {self.dir}/worker-pp.conf.in > {self.dir}/worker-pp-$PORT.conf "
                                 f"&& exec nginx -c {self.dir}/worker-pp-$PORT.conf"]
        # The same on a Unix socket baton chose (backend = "unix").
        with open(f"{self.dir}/worker-unix.conf.in", "w") as f:
            f.write(self.nginx_upstream_conf("unix:SOCKET").replace("$$", "worker-unix-GEN"))
        unix_worker = ["sh", "-c", f"sed -e s#SOCKET#$BATON_SOCKET#g -e s/GEN/$BATON_GENERATION/g "
                                   f"{self.dir}/worker-unix.conf.in > {self.dir}/worker-unix-$BATON_GENERATION.conf "
                                   f"&& exec nginx -c {self.dir}/worker-unix-$BATON_GENERATION.conf"]
        config = f"""
[admin]
listen = "127.0.0.1:0"

[service.web]
listen = ["127.0.0.1:0"]
command = {json.dumps(worker)}
watchdog = "0s"
drain_timeout = "5s"
drain_policy = "signal"
stop_signal = "SIGQUIT"
idle_timeout = "0s"

[service.web.readiness]
path = "/index.html"
interval = "10ms"

[service.web.health]
interval = "1h"

[service.web_pp]
listen = ["127.0.0.1:0"]
command = {json.dumps(pp_worker)}
proxy_protocol = "v2"
watchdog = "0s"
idle_timeout = "0s"

[service.web_pp.readiness]
path = "/index.html"
interval = "10ms"

[service.web_pp.health]
interval = "1h"

[service.web_unix]
listen = ["127.0.0.1:0"]
backend = "unix"
command = {json.dumps(unix_worker)}
watchdog = "0s"
idle_timeout = "0s"

[service.web_unix.readiness]
path = "/index.html"
interval = "10ms"

[service.web_unix.health]
interval = "1h"

[service.bulk]
listen = ["127.0.0.1:0"]
command = ["iperf3", "-s", "-B", "127.0.0.1", "-p", "{{port}}"]
watchdog = "0s"
idle_timeout = "0s"

[service.bulk.health]
interval = "1h"
"""
        with open(f"{self.dir}/baton.toml", "w") as f:
            f.write(config)
        log = open(f"{self.dir}/baton.log", "w+")
        argv = [BATON, "--log-format", "json", "run", "--config", f"{self.dir}/baton.toml"]
        if self.args.baton_threads:
            argv += ["--threads", str(self.args.baton_threads)]
        process = self.start(argv, stderr=log, env={**os.environ, "RUST_LOG": "warn,baton::supervisor=info"})
        end = time.monotonic() + 30
        admin = None
        while time.monotonic() < end and admin is None:
            log.seek(0)
            match = re.search(r'"admin API listening","addr":"([^"]+)"', log.read())
            admin = match and match.group(1)
            time.sleep(0.05)
        if not admin:
            raise SystemExit("baton did not start: see " + log.name)
        self.baton_admin = f"http://{admin}"
        while True:
            status = json.load(urllib.request.urlopen(self.baton_admin + "/status"))["services"]
            if all(s["generation"] for s in status.values()):
                break
            time.sleep(0.05)
        port = lambda name: int(status[name]["listen"][0].rsplit(":", 1)[1])
        self.baton_pp = Target("baton_pp", port("web_pp"), port("bulk"), [process.pid], False)
        return Target("baton", port("web"), port("bulk"), [process.pid], False, port("web_unix"))

    def start_haproxy(self, up_web, up_bulk):
        web, bulk, web_unix = free_port(), free_port(), free_port()
        with open(f"{self.dir}/haproxy.cfg", "w") as f:
            f.write(f"""
global
    maxconn {MAX_CONNECTIONS}
    nbthread {self.args.peer_threads}
    stats socket {self.dir}/haproxy.sock mode 600 expose-fd listeners level admin
defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend web
    bind 127.0.0.1:{web}
    default_backend web
backend web
    server up 127.0.0.1:{up_web}
frontend web_unix
    bind 127.0.0.1:{web_unix}
    default_backend web_unix
backend web_unix
    server up unix@{self.upstream_socket}
frontend bulk
    bind 127.0.0.1:{bulk}
    default_backend bulk
backend bulk
    server up 127.0.0.1:{up_bulk}
""")
        process = self.start(["haproxy", "-W", "-db", "-f", f"{self.dir}/haproxy.cfg"])
        wait_port(web)
        self.haproxy_master = process.pid
        return Target("haproxy", web, bulk, [process.pid], True, web_unix)

    def start_nginx_stream(self, up_web, up_bulk):
        web, bulk, web_unix = free_port(), free_port(), free_port()
        with open(f"{self.dir}/stream.conf", "w") as f:
            f.write(f"""
load_module {NGINX_STREAM_MODULE};
worker_processes {self.args.peer_threads};
worker_rlimit_nofile {FD_LIMIT};
pid {self.dir}/stream.pid;
error_log stderr error;
daemon off;
# A proxied connection takes two of these (client and upstream).
events {{ worker_connections {2 * MAX_CONNECTIONS}; }}
stream {{
    tcp_nodelay on;
    proxy_timeout 300s;
    server {{ listen 127.0.0.1:{web} backlog=4096; proxy_pass 127.0.0.1:{up_web}; }}
    server {{ listen 127.0.0.1:{web_unix} backlog=4096; proxy_pass unix:{self.upstream_socket}; }}
    server {{ listen 127.0.0.1:{bulk}; proxy_pass 127.0.0.1:{up_bulk}; }}
}}
""")
        process = self.start(["nginx", "-c", f"{self.dir}/stream.conf"])
        wait_port(web)
        return Target("nginx", web, bulk, [process.pid], True, web_unix)

    # --- the loads ----------------------------------------------------------------------------------------

    def wrk(self, target, extra, connections=50, script=None, port=None):
        argv = ["wrk", "-t2", f"-c{connections}", f"-d{self.args.duration}s", "--latency", "--timeout", "10s"]
        if script:
            argv += ["-s", script]
        argv += extra + [f"http://127.0.0.1:{port or target.web_port}/index.html"]
        pids = target.proxy_pids()
        cpu = cpu_seconds(pids)
        out = subprocess.run(argv, capture_output=True, text=True).stdout
        cpu = cpu_seconds(pids) - cpu
        requests = int(re.search(r"(\d+) requests in", out).group(1))
        errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        errors += int(non2xx.group(1)) if non2xx else 0
        return {
            "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50": latency_ms(re.search(r"50%\s+([\d.]+\w+)", out).group(1)),
            "p99": latency_ms(re.search(r"99%\s+([\d.]+\w+)", out).group(1)),
            "errors": errors,
            "cpu_us_per_request": 1e6 * cpu / max(requests, 1) if target.pids else None,
        }

    def iperf(self, target, streams):
        pids = target.proxy_pids()
        cpu = cpu_seconds(pids)
        out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(target.bulk_port), "-t",
                              str(self.args.duration), "-P", str(streams), "-J"], capture_output=True, text=True)
        cpu = cpu_seconds(pids) - cpu
        report = json.loads(out.stdout)
        if "error" in report:
            raise SystemExit(f"iperf3 through {target.name}: {report['error']}")
        received = report["end"]["sum_received"]
        gigabytes = received["bytes"] / 1e9
        return {
            "gbps": received["bits_per_second"] / 1e9,
            "cpu_s_per_gb": cpu / gigabytes if target.pids else None,
        }

    def idle_memory(self, target):
        """Resident memory of the proxy per idle keep-alive connection, with IDLE_CONNECTIONS open: each has
        carried one request and response, then stays open, silent."""
        pids = target.proxy_pids()
        before = rss_kib(pids)
        sockets = open_idle(target, IDLE_CONNECTIONS)
        # Let the proxy settle: wait until its resident memory stops changing.
        last, steady = -1, 0
        while steady < 5:
            time.sleep(0.2)
            now = rss_kib(target.proxy_pids())
            steady = steady + 1 if now == last else 0
            last = now
        after = rss_kib(target.proxy_pids())
        for s in sockets:
            s.close()
        return {"kib_per_idle_connection": (after - before) / IDLE_CONNECTIONS, "rss_mib": after / 1024}

    def under_upgrades(self, target, trigger):
        """The keep-alive and new-connection loads while `trigger` upgrades/reloads every second."""
        stop = threading.Event()
        count = [0]

        def upgrades():
            while not stop.wait(1.0):
                trigger()
                count[0] += 1

        thread = threading.Thread(target=upgrades, daemon=True)
        thread.start()
        keep = self.wrk(target, [])
        fresh = self.wrk(target, ["-H", "Connection: close"])
        stop.set()
        thread.join()
        return {"keepalive": keep, "newconn": fresh, "upgrades": count[0]}

    def baton_upgrade(self):
        request = urllib.request.Request(self.baton_admin + "/v1/services/web/upgrade?wait=false", method="POST")
        urllib.request.urlopen(request).read()

    def haproxy_reload(self):
        os.kill(self.haproxy_master, signal.SIGUSR2)

    # --- re-exec ------------------------------------------------------------------------------------------

    def admin(self, method, path, timeout=REEXEC_DEADLINE):
        """One request to baton's admin API on a connection of its own: (status, decoded JSON body)."""
        host, port = self.baton_admin.removeprefix("http://").rsplit(":", 1)
        connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
        try:
            connection.request(method, path)
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        try:
            return response.status, json.loads(body)
        except ValueError:
            return response.status, body.decode(errors="replace")

    def baton_reexec(self):
        """Re-executes baton (POST /v1/reexec) and waits for the outcome in /status: the `last_reexec` record,
        or a record of our own with result "lost" when none came before the deadline."""
        end = time.monotonic() + REEXEC_DEADLINE
        try:
            status, body = self.admin("POST", "/v1/reexec")
        except (OSError, http.client.HTTPException) as e:
            return {"result": "lost", "error": f"POST /v1/reexec: {e}"}
        if status != 200:
            return {"result": "refused", "error": f"{status}: {body}"}
        attempt = body["attempt"]
        while time.monotonic() < end:
            try:
                last = self.admin("GET", "/status", timeout=max(end - time.monotonic(), 0.1))[1].get("last_reexec")
            except (OSError, http.client.HTTPException, AttributeError):
                last = None
            if last and last["attempt"] >= attempt:
                return last
            time.sleep(0.01)
        return {"result": "lost", "attempt": attempt, "error": "no outcome in /status before the deadline"}

    def during(self, target, extra, trigger):
        """One wrk load with `trigger` called once a second (each call waits for its outcome) until the load
        ends: the load's figures and what the calls returned."""
        stop = threading.Event()
        outcomes = []

        def loop():
            due = time.monotonic() + 1.0
            while not stop.wait(max(due - time.monotonic(), 0)):
                outcomes.append(trigger())
                due = max(due + 1.0, time.monotonic())

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        result = self.wrk(target, extra)
        stop.set()
        thread.join()
        return result, outcomes

    def under_reexecs(self, target, trigger):
        """The keep-alive and new-connection loads, each while `trigger` re-executes (reloads) every second."""
        run = {}
        for load, extra in (("keepalive", []), ("newconn", ["-H", "Connection: close"])):
            result, outcomes = self.during(target, extra, trigger)
            run[load] = {**result, "outcomes": [o for o in outcomes if o is not None], "count": len(outcomes)}
        return run

    def connection_budget(self):
        """The connections baton said it can hold (its first "connection budget" log line)."""
        with open(f"{self.dir}/baton.log") as f:
            for line in f:
                if "connection budget" in line:
                    match = re.search(r'"connections":(\d+)', line)
                    if match:
                        return int(match.group(1))
        return None

    def pause_with_connections(self, target, reexecs):
        """Opens idle keep-alive connections through baton to its worker (each has carried one request), re-executes
        baton `reexecs` times, then sends one more request on every connection and counts those that fail."""
        budget = self.connection_budget()
        wanted = PAUSE_CONNECTIONS
        if budget is not None:
            wanted = min(wanted, (budget - 50) // 100 * 100)
        print(f"opening {wanted} idle connections through baton (its budget: {budget})", file=sys.stderr)
        sockets = open_idle(target, wanted)
        # During each re-exec, one request after another on idle connections, each used once: how long the
        # slowest waited is the pause as a client sees it.
        pool = list(sockets)
        random.Random(7).shuffle(pool)
        probes = []

        def probe(stop):
            while not stop.is_set() and pool:
                s = pool.pop()
                started = time.perf_counter()
                try:
                    s.sendall(REQUEST)
                    whole = read_response(s)
                except OSError:
                    whole = False
                probes.append(((time.perf_counter() - started) * 1e3, whole))

        try:
            time.sleep(1.0)
            outcomes = []
            for i in range(reexecs):
                stop = threading.Event()
                prober = threading.Thread(target=probe, args=(stop,))
                prober.start()
                time.sleep(0.05)
                outcomes.append(self.baton_reexec())
                stop.set()
                prober.join()
                print(f"re-exec {i + 1}/{reexecs} with {wanted} connections: {outcomes[-1].get('result')}, "
                      f"pause {outcomes[-1].get('pause_ms')} ms, {outcomes[-1].get('connections')} connections",
                      file=sys.stderr)
                time.sleep(1.0)
            failures = request_on_each(sockets)
        finally:
            for s in sockets:
                s.close()
        return {"connections": wanted, "budget": budget, "outcomes": outcomes, "failures": failures,
                "probes": [ms for ms, whole in probes if whole], "probe_failures": sum(1 for _, w in probes if not w)}


def read_response(s, response=b""):
    """Reads one response to REQUEST from `s`, after `response` already read: True when it came whole."""
    while not (b"\r\n\r\n" in response and len(response.split(b"\r\n\r\n", 1)[1]) >= len(BODY)):
        chunk = s.recv(65536)
        if not chunk:
            return False
        response += chunk
    return True


def open_idle(target, count):
    """`count` keep-alive connections to the target's web port, each having carried one request and response."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", target.web_port))
            sockets.append(s)
            s.sendall(REQUEST)
            if not read_response(s):
                raise SystemExit(f"{target.name} closed an idle connection")
    except BaseException:
        for s in sockets:
            s.close()
        raise
    return sockets


def request_on_each(sockets, deadline=60.0):
    """Sends one more request on every socket and waits for every response: how many did not come whole (the
    connection closed, failed, or stayed silent until the deadline)."""
    failed = 0
    pending = {}
    selector = selectors.DefaultSelector()
    for s in sockets:
        try:
            s.sendall(REQUEST)
        except OSError:
            failed += 1
            continue
        s.setblocking(False)
        pending[s.fileno()] = (s, bytearray())
        selector.register(s, selectors.EVENT_READ)
    end = time.monotonic() + deadline
    while pending and time.monotonic() < end:
        for key, _ in selector.select(timeout=max(end - time.monotonic(), 0)):
            s, response = pending[key.fd]
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            response += chunk
            done = b"\r\n\r\n" in response and len(response.split(b"\r\n\r\n", 1)[1]) >= len(BODY)
            if done or not chunk:
                failed += 0 if done else 1
                selector.unregister(s)
                del pending[key.fd]
                s.setblocking(True)
    failed += len(pending)
    for s, _ in pending.values():
        selector.unregister(s)
        s.setblocking(True)
    selector.close()
    return failed


def pauses(outcomes):
    """The pause of every re-exec that went through, in ms."""
    return [o["pause_ms"] for o in outcomes if o.get("result") == "ok" and o.get("pause_ms") is not None]


def results_cell(outcomes):
    """How the re-execs ended: "5 ok", or "4 ok, 1 failed"."""
    counts = {}
    for o in outcomes:
        counts[o.get("result")] = counts.get(o.get("result"), 0) + 1
    return ", ".join(f"{n} {result}" for result, n in sorted(counts.items(), key=lambda kv: kv[0] != "ok")) or "-"


def latency_ms(text):
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def summary(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def cell(stats, digits=1):
    if stats is None:
        return "-"
    median, low, high = stats
    if low == high:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"


def machine():
    def version(argv):
        try:
            out = subprocess.run(argv, capture_output=True, text=True)
            return (out.stdout + out.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "not found"

    baton_version = version([BATON, "--version"])
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return [
        f"- CPUs: {os.cpu_count()} ({cpu}), kernel {platform.release()}",
        f"- {baton_version}; {version(['haproxy', '-v'])}; {version(['nginx', '-v'])}",
        f"- {version(['wrk', '--version'])}; {version(['iperf3', '--version'])}",
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per load")
    parser.add_argument("--peer-threads", type=int, default=1, help="HAProxy nbthread, nginx worker_processes")
    parser.add_argument("--baton-threads", type=int, default=1, help="baton --threads")
    parser.add_argument("--quick", action="store_true", help="one round of 2 s loads")
    parser.add_argument("--baton", default=BATON, help="the baton binary (default: the release build)")
    parser.add_argument("--reexec-only", action="store_true",
                        help="only the re-exec parts: the steady keep-alive and new-connection loads through baton "
                             "and HAProxy, the re-exec window (HAProxy: reloads) and the pause with idle connections")
    parser.add_argument("--pause-reexecs", type=int, default=5,
                        help="re-execs with the idle connections open (default 5)")
    parser.add_argument("--proxy-protocol-only", action="store_true",
                        help="only the cost of the PROXY protocol: the keep-alive and new-connection loads through "
                             "baton with and without `proxy_protocol = \"v2\"` (to an nginx that reads it)")
    args = parser.parse_args()
    globals()["BATON"] = args.baton
    if args.quick:
        args.rounds, args.duration = 1, 2
    if not os.path.exists(BATON):
        raise SystemExit("build baton first: cargo build --release")
    global IDLE_CONNECTIONS, PAUSE_CONNECTIONS
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (200_000, 200_000))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    IDLE_CONNECTIONS = min(IDLE_CONNECTIONS, (hard - 2048) // 2 // 1000 * 1000)
    # The bench holds one descriptor per idle connection; baton, two (it also caps itself: see its budget).
    PAUSE_CONNECTIONS = min(PAUSE_CONNECTIONS, hard - 1024)
    global FD_LIMIT, MAX_CONNECTIONS
    FD_LIMIT, MAX_CONNECTIONS = hard, (hard - 1024) // 2

    bench = Bench(args)
    results = {}
    if args.proxy_protocol_only:
        try:
            bench.setup()
            print(f"working directory (logs): {bench.dir}", file=sys.stderr)
            targets = [bench.targets["baton"], bench.baton_pp]
            for round_ in range(args.rounds):
                order = targets[round_ % 2:] + targets[:round_ % 2]
                print(f"round {round_ + 1}/{args.rounds}: {', '.join(t.name for t in order)}", file=sys.stderr)
                for target in order:
                    r = results.setdefault(target.name, {})
                    r.setdefault("newconn", []).append(bench.wrk(target, ["-H", "Connection: close"]))
                    r.setdefault("keepalive", []).append(bench.wrk(target, []))
        finally:
            bench.stop_all()
        proxy_protocol_report(results, args)
        return
    try:
        bench.setup()
        print(f"working directory (logs): {bench.dir}", file=sys.stderr)
        names = ["baton", "haproxy"] if args.reexec_only else list(bench.targets)
        for round_ in range(args.rounds):
            order = names[round_ % len(names):] + names[:round_ % len(names)]
            print(f"round {round_ + 1}/{args.rounds}: {', '.join(order)}", file=sys.stderr)
            for name in order:
                target = bench.targets[name]
                r = results.setdefault(name, {})
                r.setdefault("keepalive", []).append(bench.wrk(target, []))
                r.setdefault("newconn", []).append(bench.wrk(target, ["-H", "Connection: close"]))
                if args.reexec_only:
                    continue
                r.setdefault("moderate", []).append(
                    bench.wrk(target, [], connections=20, script=f"{ROOT}/benches/paced.lua"))
                r.setdefault("bulk1", []).append(bench.iperf(target, 1))
                r.setdefault("bulk4", []).append(bench.iperf(target, 4))
                if target.unix_port:
                    r.setdefault("unix_keepalive", []).append(bench.wrk(target, [], port=target.unix_port))
                    r.setdefault("unix_newconn", []).append(
                        bench.wrk(target, ["-H", "Connection: close"], port=target.unix_port))
        for name in [] if args.reexec_only else names:
            if name != "direct":
                print(f"idle connections through {name}", file=sys.stderr)
                try:
                    results[name]["idle"] = [bench.idle_memory(bench.targets[name])]
                except OSError as e:
                    print(f"idle connections through {name} failed: {e}", file=sys.stderr)
                    results[name]["idle"] = [{"kib_per_idle_connection": None}]
        if not args.reexec_only:
            print("upgrades under load", file=sys.stderr)
            results["baton"]["upgrade"] = [bench.under_upgrades(bench.targets["baton"], bench.baton_upgrade)]
            results["haproxy"]["upgrade"] = [bench.under_upgrades(bench.targets["haproxy"], bench.haproxy_reload)]
        print("re-execs under load", file=sys.stderr)
        results["baton"]["reexec"] = [bench.under_reexecs(bench.targets["baton"], bench.baton_reexec)]
        results["haproxy"]["reexec"] = [bench.under_reexecs(bench.targets["haproxy"], bench.haproxy_reload)]
        print("re-execs with idle connections open", file=sys.stderr)
        results["baton"]["pause"] = bench.pause_with_connections(bench.targets["baton"], args.pause_reexecs)
    finally:
        bench.stop_all()
    report(results, args)


def proxy_protocol_report(results, args):
    """The loads through baton without and with the PROXY protocol v2 header to the worker, side by side."""
    print(f"Loads of {args.duration} s, {args.rounds} round(s), interleaved; median (min–max). baton on "
          f"{args.baton_threads} thread(s); upstream: nginx 1 worker, reading the PROXY protocol for `with v2`.\n")
    print("| metric | without | with v2 | with / without |")
    print("|---|---|---|---|")
    for label, load, key, digits in [
        ("new-connection requests/s", "newconn", "rps", 0),
        ("new-connection p99 ms", "newconn", "p99", 3),
        ("CPU µs per new-connection request", "newconn", "cpu_us_per_request", 2),
        ("keep-alive requests/s", "keepalive", "rps", 0),
        ("keep-alive p99 ms", "keepalive", "p99", 3),
    ]:
        got = [summary([run.get(key) for run in results.get(name, {}).get(load, [])]) for name in ("baton", "baton_pp")]
        relative = f"{got[1][0] / got[0][0]:.2f}×" if got[0] and got[1] and got[0][0] else "-"
        print(f"| {label} | {cell(got[0], digits)} | {cell(got[1], digits)} | {relative} |")
    errors = [sum(run.get("errors", 0) for load in ("newconn", "keepalive") for run in results.get(name, {}).get(load, []))
              for name in ("baton", "baton_pp")]
    print(f"| errors | {errors[0]} | {errors[1]} | |")
    print()
    print("Machine:")
    for line in machine():
        print(line)


def report(results, args):
    names = [n for n in ["direct", "baton", "haproxy", "nginx"] if n in results]

    def stat(name, load, key):
        runs = results.get(name, {}).get(load, [])
        return summary([run.get(key) if not isinstance(run.get(key), dict) else None for run in runs])

    def nested(name, load, sub, key):
        runs = results.get(name, {}).get(load, [])
        return summary([run[sub][key] for run in runs if sub in run])

    def ratio(load, key, sub=None):
        get = (lambda n: nested(n, load, sub, key)) if sub else (lambda n: stat(n, load, key))
        b, h = get("baton"), get("haproxy")
        if not b or not h or not h[0]:
            return "-"
        return f"{b[0] / h[0]:.2f}×"

    rows = [
        ("keep-alive requests/s", "keepalive", "rps", 0),
        ("keep-alive p50 ms", "keepalive", "p50", 3),
        ("keep-alive p99 ms", "keepalive", "p99", 3),
        ("new-connection requests/s", "newconn", "rps", 0),
        ("new-connection p99 ms", "newconn", "p99", 3),
        ("moderate rate p50 ms", "moderate", "p50", 3),
        ("moderate rate p99 ms", "moderate", "p99", 3),
        ("bulk 1 stream Gbit/s", "bulk1", "gbps", 2),
        ("bulk 4 streams Gbit/s", "bulk4", "gbps", 2),
        ("CPU µs per keep-alive request", "keepalive", "cpu_us_per_request", 2),
        ("CPU µs per new-connection request", "newconn", "cpu_us_per_request", 2),
        ("CPU s per GB (1 stream)", "bulk1", "cpu_s_per_gb", 3),
        (f"resident KiB per idle keep-alive connection ({IDLE_CONNECTIONS:,})", "idle", "kib_per_idle_connection", 2),
        ("errors (every web load, both backend kinds)", None, None, 0),
    ]
    if args.reexec_only:
        rows = [row for row in rows if row[1] in ("keepalive", "newconn") and row[2] != "cpu_us_per_request"]
        rows.append(("errors (both loads)", None, None, 0))
    print(f"Loads of {args.duration} s, {args.rounds} round(s), interleaved; median (min–max). "
          f"Proxies on {args.peer_threads} thread(s) (baton {args.baton_threads}); upstream: nginx 1 worker, iperf3.\n")
    print("| metric | " + " | ".join(names) + " | baton / haproxy |")
    print("|---" * (len(names) + 2) + "|")
    for label, load, key, digits in rows:
        if load is None:
            cells = []
            for name in names:
                total = sum(run.get("errors", 0) for l in ("keepalive", "newconn", "moderate", "unix_keepalive",
                                                           "unix_newconn")
                            for run in results.get(name, {}).get(l, []))
                cells.append(str(total))
            print(f"| {label} | " + " | ".join(cells) + " | |")
            continue
        cells = [cell(stat(name, load, key), digits) for name in names]
        print(f"| {label} | " + " | ".join(cells) + f" | {ratio(load, key)} |")
    print()
    if not args.reexec_only:
        other_tables(results, names, stat, ratio)
    reexec_tables(results, stat)
    print()
    print("Machine:")
    for line in machine():
        print(line)


def other_tables(results, names, stat, ratio):
    proxies = [n for n in names if n != "direct"]
    print("The same web loads with the upstream on a Unix socket instead of loopback TCP (baton: "
          "`backend = \"unix\"`; HAProxy: `server unix@`; nginx: `proxy_pass unix:`).\n")
    print("| metric | " + " | ".join(proxies) + " | baton / haproxy |")
    print("|---" * (len(proxies) + 2) + "|")
    for label, load, key, digits in [
        ("keep-alive requests/s", "unix_keepalive", "rps", 0),
        ("keep-alive p99 ms", "unix_keepalive", "p99", 3),
        ("new-connection requests/s", "unix_newconn", "rps", 0),
        ("new-connection p99 ms", "unix_newconn", "p99", 3),
        ("CPU µs per keep-alive request", "unix_keepalive", "cpu_us_per_request", 2),
        ("CPU µs per new-connection request", "unix_newconn", "cpu_us_per_request", 2),
    ]:
        cells = [cell(stat(name, load, key), digits) for name in proxies]
        print(f"| {label} | " + " | ".join(cells) + f" | {ratio(load, key)} |")
    print()
    print("Upgrade window: the same loads while baton upgrades its worker every second (HAProxy: a reload every "
          "second); errors and p99 against the steady state above.\n")
    print("| load | target | upgrades | errors | requests/s | p99 ms | p99 / steady p99 |")
    print("|---|---|---|---|---|---|---|")
    for name in ("baton", "haproxy"):
        for run in results.get(name, {}).get("upgrade", []):
            for load, label in (("keepalive", "keep-alive"), ("newconn", "new connection")):
                steady = stat(name, load, "p99")
                p99 = run[load]["p99"]
                relative = f"{p99 / steady[0]:.2f}" if steady and steady[0] else "-"
                print(f"| {label} | {name} | {run['upgrades']} | {run[load]['errors']} | "
                      f"{run[load]['rps']:.0f} | {p99:.3f} | {relative} |")
    print()


def reexec_tables(results, stat):
    print("Re-exec window: each load while baton re-executes itself every second (POST /v1/reexec, the next one once "
          "/status shows the outcome of the last; HAProxy: a reload every second); errors are wrk's socket errors "
          "and non-2xx responses, p99 against the steady state above, pause from `last_reexec.pause_ms`.\n")
    print("| load | target | re-execs | results | errors | requests/s | p99 ms | p99 / steady p99 | pause max ms "
          "| pause median ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in ("baton", "haproxy"):
        for run in results.get(name, {}).get("reexec", []):
            for load, label in (("keepalive", "keep-alive"), ("newconn", "new connection")):
                steady = stat(name, load, "p99")
                r = run[load]
                relative = f"{r['p99'] / steady[0]:.2f}" if steady and steady[0] else "-"
                paused = pauses(r["outcomes"])
                pause_max = f"{max(paused):.1f}" if paused else "-"
                pause_median = f"{statistics.median(paused):.1f}" if paused else "-"
                print(f"| {label} | {name} | {r['count']} | {results_cell(r['outcomes'])} | {r['errors']} | "
                      f"{r['rps']:.0f} | {r['p99']:.3f} | {relative} | {pause_max} | {pause_median} |")
    pause = results.get("baton", {}).get("pause")
    if pause:
        paused = pauses(pause["outcomes"])
        handed = sorted({o.get("connections") for o in pause["outcomes"] if o.get("connections") is not None})
        print()
        print(f"Pause with {pause['connections']:,} idle keep-alive connections open through baton (baton's "
              f"connection budget: {pause['budget']}): {len(pause['outcomes'])} re-execs "
              f"({results_cell(pause['outcomes'])}), pause max "
              f"{max(paused):.1f} ms, median {statistics.median(paused):.1f} ms; connections handed over: "
              f"{', '.join(map(str, handed)) or '-'}; afterwards {pause['failures']} of {pause['connections']:,} "
              f"connections failed their next request. Requests on idle connections during the re-execs: "
              f"{len(pause['probes'])} answered, {pause['probe_failures']} failed, slowest "
              f"{max(pause['probes'], default=0):.1f} ms, median {statistics.median(pause['probes'] or [0]):.1f} ms."
              if paused else
              f"Pause with {pause['connections']:,} idle connections: no re-exec went through "
              f"({results_cell(pause['outcomes'])}); {pause['failures']} connections failed afterwards.")
    errors = [o for name in ("baton",) for run in results.get(name, {}).get("reexec", [])
              for load in ("keepalive", "newconn") for o in run[load]["outcomes"] if o.get("result") != "ok"]
    errors += [o for o in (pause or {}).get("outcomes", []) if o.get("result") != "ok"]
    for o in errors:
        print(f"- re-exec {o.get('attempt', '?')}: {o.get('result')}: {o.get('error')}")


if __name__ == "__main__":
    main()
