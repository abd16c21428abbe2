"""
The side-by-side benchmark: tunneld against nginx, a twisted.web proxy and
pagekite, all in front of the same upstream, measured in one run.

Run it through ``bench/run`` (see docs/benchmarks.md).  This is a driver
script, not library code: it blocks, spawns processes and prints.

Fairness: the load generator (and this script) run on core 0; the system
under test gets core 1 alone (a proxy, or a tunnel's edge and agent
together); the upstream sits on core 0.  On a one-core machine nothing is
pinned and the report says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
MIB = 1024 * 1024
SMALL_BODY = 64
VHOST = "bench.localhost"
WS_VHOST = "ws.bench.localhost"
DEBIAN_TOOLS = {"nginx": "nginx-light", "wrk": "wrk", "h2load": "nghttp2-client", "pagekite": "pagekite"}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- processes ---------------------------------------------------------------------------


def pinned(cpus: str | None, argv: list[str]) -> list[str]:
    if cpus is None or shutil.which("taskset") is None:
        return argv
    return ["taskset", "-c", cpus, *argv]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A child process whose combined output goes to a log file we can wait on."""

    def __init__(self, name: str, argv: list[str], workdir: str, env: dict[str, str] | None = None,
                 cwd: str | None = None) -> None:
        self.name = name
        self.log_path = os.path.join(workdir, f"{name}.log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=env, cwd=cwd or ROOT,
                                      start_new_session=True)
        self.pid = self.popen.pid

    def output(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_for(self, regex: str, timeout: float = 30.0) -> re.Match[str]:
        pattern = re.compile(regex)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = pattern.search(self.output())
            if match:
                return match
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: no line matching {regex!r}; output:\n{self.output()[-3000:]}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()


def rss_kib(pid: int, key: str = "VmRSS") -> int | None:
    """Resident set size (or VmHWM, the peak) of a process in KiB, None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time used so far by C{pids} and their descendants (nginx's workers)."""
    ticks = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent, seconds)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    wanted, total = set(pids), 0.0
    for pid, (_parent, seconds) in stats.items():
        ancestor, hops = pid, 0
        while ancestor not in wanted and ancestor > 1 and hops < 8:
            ancestor, hops = stats.get(ancestor, (0, 0.0))[0], hops + 1
        if ancestor in wanted:
            total += seconds
    return total


# -- the upstream and the systems under test ---------------------------------------------


def make_www(workdir: str, big: int) -> str:
    www = os.path.join(workdir, "www")
    os.makedirs(www, exist_ok=True)
    with open(os.path.join(www, "small"), "wb") as f:
        f.write(b"x" * (SMALL_BODY - 1) + b"\n")
    with open(os.path.join(www, "1m"), "wb") as f:
        f.write(os.urandom(MIB))
    with open(os.path.join(www, "big"), "wb") as f:
        f.truncate(big)  # sparse: served from the page cache, costs no disk
    os.chmod(workdir, 0o755)
    return www


def nginx_conf(workdir: str, name: str, server: str) -> str:
    temp = os.path.join(workdir, f"{name}-temp")
    os.makedirs(temp, exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""
    path = os.path.join(workdir, f"{name}.conf")
    with open(path, "w") as f:
        f.write(f"""{user}worker_processes 1;
daemon off;
pid {workdir}/{name}.pid;
error_log {workdir}/{name}.err warn;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  client_body_temp_path {temp}/body;
  proxy_temp_path {temp}/proxy;
  fastcgi_temp_path {temp}/fastcgi;
  uwsgi_temp_path {temp}/uwsgi;
  scgi_temp_path {temp}/scgi;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  default_type application/octet-stream;
{server}
}}
""")
    return path


@dataclass
class System:
    """One row: where its public port is, and which processes are the system under test."""

    key: str
    label: str
    port: int | None = None
    h2_port: int | None = None
    procs: list[Proc] = field(default_factory=list)
    measured: list[Proc] = field(default_factory=list)  # processes whose memory we report
    skip: str | None = None
    tunnel: bool = False
    ws_port: int | None = None  # where the WebSocket echo is reachable through this system
    vhost: str = VHOST

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.smoke = args.smoke
        self.workdir = tempfile.mkdtemp(prefix="tunneld-bench-")
        self.procs: list[Proc] = []
        two_cores = (os.cpu_count() or 1) >= 2
        self.load_cpu = "0" if two_cores else None
        self.sut_cpu = "1" if two_cores else None
        # Every system under test runs under one CPU scheduling policy: tunneld by its
        # cpu_scheduling setting, the others by chrt (see docs/benchmarks.md).
        batch = getattr(args, "cpu_scheduling", "batch") == "batch"
        self.batch = batch and hasattr(os, "SCHED_BATCH") and shutil.which("chrt") is not None
        self.python = sys.executable
        self.env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.big = args.big_mib * MIB
        self.tools = {tool: shutil.which(tool) for tool in DEBIAN_TOOLS}
        # Children (the edge, the agent, the echo upstream) inherit this: room for 10,000 WebSockets.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    def spawn(self, name: str, argv: list[str], cpus: str | None) -> Proc:
        proc = Proc(name, pinned(cpus, argv), self.workdir, env=self.env)
        self.procs.append(proc)
        return proc

    def spawn_baseline(self, name: str, argv: list[str]) -> Proc:
        """A system under test other than tunneld: on the SUT core, under the run's policy."""
        if self.batch:
            argv = ["chrt", "--batch", "0", *argv]
        return self.spawn(name, argv, self.sut_cpu)

    @property
    def policy(self) -> str:
        return "batch" if self.batch else "default"

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs = []

    # upstream

    def start_upstream(self) -> tuple[int, int | None]:
        www = make_www(self.workdir, self.big)
        if not self.smoke and self.tools["nginx"]:
            port, h2 = free_port(), free_port()
            conf = nginx_conf(self.workdir, "upstream", f"""  server {{
    listen 127.0.0.1:{port} backlog=4096;
    listen 127.0.0.1:{h2} http2 backlog=4096;
    root {www};
  }}""")
            proc = self.spawn("upstream-nginx", ["nginx", "-c", conf, "-p", self.workdir], self.load_cpu)
            wait_port(port, proc)
            self.upstream_kind = "nginx"
            return port, h2
        proc = self.spawn("upstream-twisted", [self.python, os.path.join(BENCH, "pyupstream.py"), www],
                          self.load_cpu)
        self.upstream_kind = "twisted.web static.File"
        return int(proc.wait_for(r"listening (\d+)").group(1)), None

    def start_ws_echo(self) -> int:
        proc = self.spawn("ws-echo", [self.python, os.path.join(BENCH, "wsecho.py")], self.load_cpu)
        return int(proc.wait_for(r"listening (\d+)").group(1))

    # systems under test

    def unavailable(self, tool: str) -> str | None:
        """Why a row that needs the Debian tool C{tool} is skipped, if it is."""
        if self.smoke:
            return "smoke mode: Python pieces only"
        return None if self.tools[tool] else f"{tool} not installed"

    def direct(self, upstream: int, h2: int | None) -> System:
        return System("direct", "direct to upstream (the limit)", port=upstream, h2_port=h2)

    def nginx_proxy(self, upstream: int) -> System:
        system = System("nginx", "nginx reverse proxy")
        system.skip = self.unavailable("nginx")
        if system.skip:
            return system
        system.port, system.h2_port = free_port(), free_port()
        conf = nginx_conf(self.workdir, "proxy", f"""  upstream up {{ server 127.0.0.1:{upstream}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{system.port} backlog=4096;
    listen 127.0.0.1:{system.h2_port} http2 backlog=4096;
    location / {{
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
    }}
  }}""")
        proc = self.spawn_baseline("proxy-nginx", ["nginx", "-c", conf, "-p", self.workdir])
        wait_port(system.port, proc)
        system.procs = [proc]
        return system

    def twisted_proxy(self, upstream: int) -> System:
        proc = self.spawn_baseline("proxy-twisted",
                                   [self.python, os.path.join(BENCH, "twproxy.py"), str(upstream)])
        port = int(proc.wait_for(r"listening (\d+)").group(1))
        return System("twisted", "twisted.web ReverseProxyResource (single hop)", port=port,
                      procs=[proc], measured=[proc])

    def pagekite(self, upstream: int) -> System:
        system = System("pagekite", "pagekite front-end + back-end")
        system.skip = self.unavailable("pagekite")
        if system.skip:
            return system
        port = free_port()
        secret = "benchsecret"
        front = self.spawn_baseline("pagekite-front", [
            "pagekite", "--clean", "--nullui", "--nocrashreport", "--isfrontend",
            f"--ports={port}", "--protos=http", f"--domain=http:{VHOST}:{secret}",
            f"--logfile={self.workdir}/pagekite-front.plog"])
        wait_port(port, front)
        back = self.spawn_baseline("pagekite-back", [
            "pagekite", "--clean", "--nullui", "--nocrashreport",
            f"--frontend=127.0.0.1:{port}",
            f"--service_on=http:{VHOST}:127.0.0.1:{upstream}:{secret}",
            f"--logfile={self.workdir}/pagekite-back.plog"])
        system.port = port
        system.procs = system.measured = [front, back]
        # The kite is live once the front-end answers for the name with the upstream's body.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status, _ = http_get(port, "/small", VHOST)
            if status == 200:
                return system
            time.sleep(0.3)
        system.skip = "pagekite tunnel did not come up in 30 s"
        return system

    def tunneld(self, transport: str, upstream: int, ws_echo: int | None, tag: str = "") -> System:
        system = System(transport, f"tunneld over {transport}", tunnel=True)
        sys.path.insert(0, ROOT)
        from twisted.plugin import getPlugins

        import tunneld.plugins
        from tunneld.interfaces import ITransportPlugin
        names = {p.name for p in getPlugins(ITransportPlugin, tunneld.plugins)}
        if transport not in names:
            system.skip = "not installed"
            return system
        window = f"initial_window = {self.args.window}\n" if self.args.window else ""
        edge_conf = os.path.join(self.workdir, f"edge-{transport}{tag}.toml")
        link_key = "listen"
        with open(edge_conf, "w") as f:
            f.write(f"""[edge]
cpu_scheduling = "{self.policy}"
public_listen = ["tcp:0:interface=127.0.0.1"]
public_h2c_listen = ["tcp:0:interface=127.0.0.1"]
public_url = "http://{{host}}/"
transports = ["{transport}"]
# Any free port: two edges run at once (and 8090 may be taken).
admin_listen = "tcp:0:interface=127.0.0.1"
{window}
# Every load generator connects from 127.0.0.1: the per-client connection cap
# (256 by default) would refuse the idle-WebSocket figure's 10,000.
[limits]
max_connections_per_client = 0
max_connections = 0

[transports.{transport}]
{link_key} = "tcp:0:interface=127.0.0.1"
""")
        edge = self.spawn(f"edge-{transport}{tag}", self.twistd("tunneld", edge_conf), self.sut_cpu)
        public = int(edge.wait_for(r"public HTTP listening on 127\.0\.0\.1:(\d+)").group(1))
        h2c = int(edge.wait_for(r"public HTTP/2 \(h2c\) listening on 127\.0\.0\.1:(\d+)").group(1))
        link = int(edge.wait_for(rf"{transport} agent link listening on 127\.0\.0\.1:(\d+)").group(1))
        link_conf = {
            "websocket": f'url = "ws://127.0.0.1:{link}/tunnel"',
            "grpc": f'address = "127.0.0.1:{link}"',
        }.get(transport, f'url = "127.0.0.1:{link}"')
        tunnels = f"""[[tunnels]]
hostname = "{VHOST}"
upstream = "tcp:host=127.0.0.1:port={upstream}"
"""
        if ws_echo is not None:
            tunnels += f"""
[[tunnels]]
hostname = "{WS_VHOST}"
upstream = "tcp:host=127.0.0.1:port={ws_echo}"
"""
        agent_conf = os.path.join(self.workdir, f"agent-{transport}{tag}.toml")
        with open(agent_conf, "w") as f:
            # Keep as many idle upstream connections as nginx's proxy row may (keepalive 256).
            f.write(f"""[agent]
cpu_scheduling = "{self.policy}"
id = "bench"
transports = ["{transport}"]
upstream_max_idle = 256
{window}
[transports.{transport}]
{link_conf}

{tunnels}""")
        agent = self.spawn(f"agent-{transport}{tag}", self.twistd("tunneld-agent", agent_conf), self.sut_cpu)
        agent.wait_for(rf"tunnel ready: http://{re.escape(VHOST)}/")
        system.port = public
        system.h2_port = h2c
        system.procs = system.measured = [edge, agent]
        return system

    def twistd(self, plugin: str, config: str) -> list[str]:
        return [self.python, "-c", "from twisted.scripts.twistd import run; run()",
                "--nodaemon", "--pidfile=", plugin, "--config", config]

    # load generators

    def load_argv(self, system: System, path: str, connections: int, seconds: float,
                  new_connections: bool = False) -> list[str]:
        """wrk (pyload in smoke mode); C{new_connections}: one connection per request."""
        if self.smoke or not self.tools["wrk"]:
            argv = [self.python, os.path.join(BENCH, "pyload.py"), system.url(path), system.vhost,
                    str(connections), str(seconds)]
            return argv + (["close"] if new_connections else [])
        close = ["-H", "Connection: close"] if new_connections else []
        return ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "10s",
                "-H", f"Host: {system.vhost}", *close, "-s", os.path.join(BENCH, "report.lua"),
                system.url(path)]

    def load(self, system: System, path: str, connections: int, seconds: float) -> dict[str, Any]:
        argv = self.load_argv(system, path, connections, seconds)
        out = subprocess.run(pinned(self.load_cpu, argv), capture_output=True, text=True,
                             timeout=seconds * 3 + 30)
        return self.load_result(out.stdout, out.stderr)

    @staticmethod
    def load_result(stdout: str, stderr: str) -> dict[str, Any]:
        match = re.search(r"BENCH-JSON (\{.*\})", stdout)
        if not match:
            raise RuntimeError(f"load generator said nothing useful:\n{stdout}\n{stderr}")
        result: dict[str, Any] = json.loads(match.group(1))
        seconds_taken = result["duration_us"] / 1e6 or 1
        result["rps"] = result["requests"] / seconds_taken
        result["mib_s"] = result["bytes"] / seconds_taken / MIB
        result["p50_ms"] = result["p50_us"] / 1000
        result["p99_ms"] = result["p99_us"] / 1000
        result["error_count"] = sum(result["errors"].values())
        return result

    def h2load(self, system: System) -> dict[str, Any] | str:
        if system.h2_port is None:
            if system.tunnel:
                # Probe: does the edge's public listener speak HTTP/2 (prior knowledge)?
                if not self.tools["h2load"]:
                    return "n/a: h2load not installed"
                probe = subprocess.run(["h2load", "-n1", "-c1", "-H", f":authority: {system.vhost}",
                                        system.url("/small")], capture_output=True, text=True, timeout=30)
                if not re.search(r"requests: 1 total, 1 started, 1 done, 1 succeeded", probe.stdout):
                    return "n/a: edge has no public h2 listener"
                port = system.port
            else:
                return "n/a"
        else:
            port = system.h2_port
        if self.smoke or not self.tools["h2load"]:
            return "n/a: smoke mode" if self.smoke else "n/a: h2load not installed"
        argv = ["h2load", "-c50", "-m10", "-t1", f"-D{max(1, round(self.args.seconds))}", "--warm-up-time=1",
                "-H", f":authority: {system.vhost}", f"http://127.0.0.1:{port}/small"]
        out = subprocess.run(pinned(self.load_cpu, argv), capture_output=True, text=True,
                             timeout=self.args.seconds * 3 + 30)
        rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out.stdout)
        done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out.stdout)
        if not rps or not done:
            return f"failed: {out.stdout[-300:]}{out.stderr[-300:]}"
        return {"rps": float(rps.group(1)), "failed": int(done.group(3)) + int(done.group(4))}

    # WebSocket pass-through

    def ws_probe(self, system: System) -> str | None:
        """None when a WebSocket upgrade reaches the echo through this system, else why not."""
        if system.ws_port is None:
            return "no WebSocket echo upstream"
        status, _ = http_get(system.ws_port, "/", WS_VHOST, upgrade=True)
        if status != 101:
            return f"no WebSocket pass-through (upgrade answered {status})"
        return None

    def ws_echo(self, port: int, vhost: str) -> dict[str, Any]:
        seconds = self.args.seconds
        argv = [self.python, os.path.join(BENCH, "wsload.py"), "echo", str(port), vhost, "50", str(seconds)]
        out = subprocess.run(pinned(self.load_cpu, argv), capture_output=True, text=True,
                             timeout=seconds * 3 + 30)
        match = re.search(r"BENCH-JSON (\{.*\})", out.stdout)
        if not match:
            raise RuntimeError(f"wsload said nothing useful:\n{out.stdout}\n{out.stderr}")
        result: dict[str, Any] = json.loads(match.group(1))
        result["msg_s"] = result["messages"] / (result["duration_us"] / 1e6 or 1)
        result["p99_ms"] = result["p99_us"] / 1000
        return result

    def ws_idle_fresh(self, transport: str, upstream: int, ws_echo: int | None, count: int) -> dict[str, Any]:
        """
        L{ws_idle} on an edge and agent started for it: in the processes that
        ran the bulk figures, heap freed by them would absorb part of the new
        connections' memory and flatter the figure.
        """
        system = self.tunneld(transport, upstream, ws_echo, tag=f"-idle-{count}")
        system.ws_port = system.port
        try:
            self.ws_idle(system, 10)  # first-use allocations (imports, caches), not per connection
            return self.ws_idle(system, count)
        finally:
            for proc in system.procs:
                proc.stop()
                self.procs.remove(proc)

    def ws_idle(self, system: System, count: int) -> dict[str, Any]:
        """RSS the edge and agent gain per idle WebSocket held through the tunnel."""
        assert system.ws_port is not None
        before = sum(rss_kib(p.pid) or 0 for p in system.measured)
        argv = [self.python, os.path.join(BENCH, "wsload.py"), "idle", str(system.ws_port), WS_VHOST,
                str(count)]
        holder = subprocess.Popen(pinned(self.load_cpu, argv), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None
            line = holder.stdout.readline()
            match = re.match(r"OPEN (\d+) FAILED (\d+)", line)
            if not match:
                raise RuntimeError(f"wsload idle said {line!r}")
            time.sleep(1.0)
            after = sum(rss_kib(p.pid) or 0 for p in system.measured)
        finally:
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(60)
        opened = int(match.group(1))
        return {"count": count, "opened": opened, "failed": int(match.group(2)),
                "kib_per_ws": (after - before) / opened if opened else None}

    # the soak

    def soak(self, systems: list[System], seconds: float) -> dict[str, dict[str, Any]]:
        """
        Every tunnel row at once for C{seconds}: keep-alive requests plus a
        stream of new connections (one request each), with the edge's and
        the agent's RSS sampled throughout.  A leak per connection or per
        request shows as growth after the first minute.
        """
        warm = min(60.0, seconds / 5)
        loads: list[tuple[System, str, subprocess.Popen[str]]] = []
        for system in systems:
            for kind, connections, new in (("keep-alive", 16, False), ("new connection each", 8, True)):
                argv = self.load_argv(system, "/small", connections, seconds, new_connections=new)
                popen = subprocess.Popen(pinned(self.load_cpu, argv), stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)
                loads.append((system, kind, popen))
        samples: dict[str, list[tuple[float, int]]] = {p.name: [] for s in systems for p in s.measured}
        start = time.monotonic()
        while any(popen.poll() is None for _, _, popen in loads):
            elapsed = time.monotonic() - start
            for system in systems:
                for p in system.measured:
                    value = rss_kib(p.pid)
                    if value is not None:
                        samples[p.name].append((elapsed, value))
            time.sleep(min(5.0, max(0.5, seconds / 100)))
        out: dict[str, dict[str, Any]] = {}
        for system, kind, popen in loads:
            stdout, stderr = popen.communicate()
            result = self.load_result(stdout, stderr)
            row = out.setdefault(system.key, {"seconds": seconds, "warm": warm, "loads": {}, "rss_kib": {}})
            row["loads"][kind] = {"requests": result["requests"], "errors": result["error_count"]}
        for system in systems:
            row = out[system.key]
            for p in system.measured:
                values = samples[p.name]
                after_warm = [v for t, v in values if t >= warm] or [v for _, v in values[-1:]]
                row["rss_kib"][p.name] = {"at_warm": after_warm[0] if after_warm else None,
                                          "end": values[-1][1] if values else None,
                                          "max": max(after_warm) if after_warm else None,
                                          "samples": len(values)}
        return out

    # the 1 GB transfer

    def big_transfer(self, system: System) -> dict[str, Any]:
        samples: dict[str, list[int]] = {p.name: [] for p in system.measured}
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                for p in system.measured:
                    value = rss_kib(p.pid)
                    if value is not None:
                        samples[p.name].append(value)
                stop.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.monotonic()
        try:
            received = http_download(system.port, "/big", system.vhost, self.big)
        finally:
            elapsed = time.monotonic() - start
            stop.set()
            sampler.join()
        result: dict[str, Any] = {"bytes": received, "seconds": elapsed,
                                  "mib_s": received / elapsed / MIB, "complete": received == self.big,
                                  "rss_kib": {}}
        for name, values in samples.items():
            if values:
                result["rss_kib"][name] = {"first": values[0], "min": min(values), "max": max(values),
                                           "samples": len(values)}
        return result

    # the run

    def check_policy(self, systems: list[System]) -> None:
        """Refuse to measure if any process under test runs under another policy than the rest."""
        if not hasattr(os, "sched_getscheduler"):
            return
        want = os.SCHED_BATCH if self.batch else os.sched_getscheduler(0)
        wrong = [f"{p.name} ({os.sched_getscheduler(p.pid)})" for system in systems for p in system.procs
                 if p.popen.poll() is None and os.sched_getscheduler(p.pid) != want]
        if wrong:
            raise RuntimeError(f"not under scheduling policy {want}: {', '.join(wrong)}")

    def run(self) -> dict[str, Any]:
        if self.load_cpu is not None:
            os.sched_setaffinity(0, {int(self.load_cpu)})
        reps, seconds = self.args.reps, self.args.seconds
        results: dict[str, Any] = {"meta": self.meta(), "rows": {}}
        try:
            upstream, upstream_h2 = self.start_upstream()
            ws_echo = self.start_ws_echo()
            results["meta"]["upstream"] = self.upstream_kind
            systems = [self.direct(upstream, upstream_h2), self.nginx_proxy(upstream),
                       self.twisted_proxy(upstream), self.pagekite(upstream)]
            for transport in self.args.transports:
                systems.append(self.tunneld(transport, upstream, ws_echo))
            for system in systems:
                if self.args.only and system.key not in self.args.only and system.skip is None:
                    system.skip = "not selected (--only)"
                if system.tunnel and system.skip is None:
                    system.ws_port = system.port
                results["rows"][system.key] = {"label": system.label, "skip": system.skip,
                                               "small": [], "large": [], "h2": []}
            live = [s for s in systems if s.skip is None]
            self.check_policy(live)
            log(f"systems: {', '.join(s.key for s in live)}; skipped: "
                f"{', '.join(f'{s.key} ({s.skip})' for s in systems if s.skip) or 'none'}")
            # Warm-up: one short pass per system so first-repetition numbers are not cold.
            for system in live:
                self.load(system, "/small", 10, min(1.0, seconds))
            for rep in range(reps):
                for system in live:
                    row = results["rows"][system.key]
                    pids = [p.pid for p in system.procs]
                    before = cpu_seconds(pids) if pids else None
                    small = self.load(system, "/small", 50, seconds)
                    if before is not None and small["requests"]:
                        # CPU of the system under test per request: robust to a busy machine.
                        small["cpu_us"] = (cpu_seconds(pids) - before) / small["requests"] * 1e6
                    before = cpu_seconds(pids) if pids else None
                    large = self.load(system, "/1m", 4, seconds)
                    if before is not None and large["bytes"] >= MIB:
                        large["cpu_ms_per_mib"] = (cpu_seconds(pids) - before) / (large["bytes"] / MIB) * 1e3
                    row["small"].append(small)
                    row["large"].append(large)
                    cpu = f", CPU {small['cpu_us']:.0f} us/req" if "cpu_us" in small else ""
                    log(f"rep {rep + 1}/{reps} {system.key}: {small['rps']:.0f} req/s{cpu} "
                        f"p50 {small['p50_ms']:.2f} ms p99 {small['p99_ms']:.2f} ms "
                        f"errors {small['error_count']}; 1 MiB: {large['mib_s']:.1f} MiB/s"
                        + (f", CPU {large['cpu_ms_per_mib']:.2f} ms/MiB" if "cpu_ms_per_mib" in large else ""))
                    h2 = self.h2load(system)
                    row["h2"].append(h2)
            for system in live:
                row = results["rows"][system.key]
                row["ws"] = self.ws_probe(system) if system.tunnel else None
                if system.tunnel or system.key in ("twisted", "nginx") or self.smoke:
                    if system.key != "direct":
                        row["transfer"] = self.big_transfer(system)
                        log(f"{system.key}: {self.big // MIB} MiB transfer at "
                            f"{row['transfer']['mib_s']:.1f} MiB/s")
            # WebSocket echo: straight to the echo upstream (the limit), and through each tunnel
            # whose edge passes WebSockets through.
            ws_rows = [s for s in live if s.key == "direct" or (s.tunnel and results["rows"][s.key]["ws"] is None)]
            for rep in range(reps):
                for system in ws_rows:
                    port, vhost = (ws_echo, "localhost") if system.key == "direct" else (system.ws_port, WS_VHOST)
                    assert port is not None
                    echo = self.ws_echo(port, vhost)
                    results["rows"][system.key].setdefault("ws_echo", []).append(echo)
                    log(f"rep {rep + 1}/{reps} {system.key}: WebSocket echo {echo['msg_s']:.0f} msg/s, "
                        f"p99 {echo['p99_ms']:.1f} ms")
            for system in ws_rows:
                if system.tunnel:
                    for count in self.args.idle_ws:
                        idle = self.ws_idle_fresh(system.key, upstream, ws_echo, count)
                        results["rows"][system.key].setdefault("ws_idle", []).append(idle)
                        log(f"{system.key}: {idle['opened']} idle WebSockets, "
                            f"{idle['kib_per_ws']} KiB each")
            tunnels = [s for s in live if s.tunnel]
            if self.args.soak and tunnels:
                log(f"soak: {', '.join(s.key for s in tunnels)} for {self.args.soak:.0f} s")
                for key, soak in self.soak(tunnels, self.args.soak).items():
                    results["rows"][key]["soak"] = soak
                    growth = ", ".join(f"{(v['max'] - v['at_warm']) / 1024:+.1f}"
                                       for v in soak["rss_kib"].values() if v["at_warm"])
                    log(f"{key}: soak requests {soak['loads']}; RSS growth after warm-up {growth} MiB")
            for system in live:
                row = results["rows"][system.key]
                row["peak_rss_kib"] = {p.name: rss_kib(p.pid, "VmHWM") for p in system.measured}
        finally:
            self.stop_all()
            shutil.rmtree(self.workdir, ignore_errors=True)
        return results

    def meta(self) -> dict[str, Any]:
        def version(argv: list[str]) -> str:
            try:
                out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                return "not installed"
            text = (out.stdout + out.stderr).strip().splitlines()
            return text[0] if text else "?"

        import twisted

        cpu = "?"
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        try:
            rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=ROOT).stdout.strip()
        except OSError:
            rev = "?"
        return {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(["bench/run", *self.args.argv]),
            "machine": f"{platform.node()}: {cpu}, {os.cpu_count()} cores, "
                       f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // (1024 ** 3)} GiB, "
                       f"Linux {platform.release()}",
            "pinning": (f"load generator + upstream on core {self.load_cpu}, system under test on core "
                        f"{self.sut_cpu}") if self.sut_cpu else "none (fewer than 2 cores)",
            "scheduling": "SCHED_BATCH for every system under test" if self.batch
            else "the default policy",
            "python": platform.python_version(),
            "twisted": twisted.__version__,
            "tunneld": rev,
            "nginx": version(["nginx", "-v"]) if self.tools["nginx"] else "not installed",
            "wrk": version(["wrk", "-v"]) if self.tools["wrk"] else "not installed",
            "h2load": version(["h2load", "--version"]) if self.tools["h2load"] else "not installed",
            "pagekite": version(["dpkg-query", "-W", "-f=${Version}", "pagekite"])
            if self.tools["pagekite"] else "not installed",
            "smoke": self.smoke, "reps": self.args.reps, "seconds": self.args.seconds,
            "big_mib": self.args.big_mib, "idle_ws": self.args.idle_ws,
            "load": "pyload (Python loop)" if self.smoke or not self.tools["wrk"] else "wrk -t1",
        }


# -- tiny blocking HTTP clients (probes and the big transfer) -----------------------------


def wait_port(port: int, proc: Proc, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.popen.poll() is not None:
                break
            time.sleep(0.05)
    raise RuntimeError(f"{proc.name} is not listening on {port}:\n{proc.output()[-2000:]}")


def http_get(port: int, path: str, host: str, upgrade: bool = False) -> tuple[int, bytes]:
    headers = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
    if upgrade:
        headers = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                   "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall((headers + "\r\n").encode())
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
            return status, data
    except (OSError, ValueError, IndexError):
        return 0, b""


def http_download(port: int, path: str, host: str, expected: int) -> int:
    """GET a body into a reused buffer; return how many body bytes arrived."""
    buffer = bytearray(MIB)
    view = memoryview(buffer)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(65536)
            if not chunk:
                return 0
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        received = len(rest)
        while received < expected:
            n = s.recv_into(view)
            if not n:
                break
            received += n
        return received


# -- the report --------------------------------------------------------------------------


def spread(values: list[float], fmt: str) -> str:
    """Median with the min–max range of the repetitions."""
    if not values:
        return "–"
    median = statistics.median(values)
    if len(values) == 1:
        return format(median, fmt)
    return f"{format(median, fmt)} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def med(row: dict[str, Any], kind: str, key: str) -> float | None:
    values = [r[key] for r in row.get(kind, [])]
    return statistics.median(values) if values else None


def targets(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows = results["rows"]
    out: list[tuple[str, str, str, str]] = []

    def ratio(name: str, value: float | None, wanted: float, higher: bool, what: str) -> None:
        if value is None:
            out.append((name, what, f"{'≥' if higher else '≤'} {wanted:g}", "not measured"))
            return
        ok = value >= wanted if higher else value <= wanted
        out.append((name, what, f"{'≥' if higher else '≤'} {wanted:g}", f"{value:.2f} **{'pass' if ok else 'short'}**"))

    for key, row in rows.items():
        if key not in ("websocket", "grpc", "streamable-http") or row["skip"]:
            continue
        name = row["label"]
        tw, pk, ng = rows.get("twisted", {}), rows.get("pagekite", {}), rows.get("nginx", {})

        def div(a: float | None, b: float | None) -> float | None:
            return a / b if a is not None and b else None

        ratio(name, div(med(row, "small", "rps"), med(tw, "small", "rps")), 1.5, True,
              "small req/s ÷ twisted.web proxy")
        ratio(name, div(med(row, "small", "rps"), med(pk, "small", "rps")), 7, True,
              "small req/s ÷ pagekite")
        ratio(name, div(med(row, "small", "p50_ms"), med(tw, "small", "p50_ms")), 0.5, False,
              "p50 ÷ twisted.web proxy")
        ratio(name, div(med(row, "small", "p99_ms"), med(tw, "small", "p99_ms")), 0.5, False,
              "p99 ÷ twisted.web proxy")
        ratio(name, div(med(row, "large", "mib_s"), med(tw, "large", "mib_s")), 1.0, True,
              "1 MiB MiB/s ÷ twisted.web proxy")
        ratio(name, div(med(row, "large", "mib_s"), med(ng, "large", "mib_s")), 0.3, True,
              "1 MiB MiB/s ÷ nginx proxy")
        transfer = row.get("transfer")
        if transfer:
            growth = max((v["max"] - v["first"]) / 1024 for v in transfer["rss_kib"].values())
            ok = growth <= 10 and transfer["complete"]
            out.append((name, f"RSS growth during {results['meta']['big_mib']} MiB transfer (edge, agent)",
                        "≤ 10 MiB", f"{growth:.1f} MiB **{'pass' if ok else 'short'}**"))
        soak = row.get("soak")
        if soak:
            growth = max((v["max"] - v["at_warm"]) / 1024 for v in soak["rss_kib"].values() if v["at_warm"])
            errors = sum(v["errors"] for v in soak["loads"].values())
            ok = growth <= 10 and not errors
            out.append((name, f"RSS growth (edge, agent) over a {soak['seconds'] / 60:g}-minute soak, "
                        "after the first minute", "≤ 10 MiB, no errors",
                        f"{growth:.1f} MiB, {errors} errors **{'pass' if ok else 'short'}**"))
        ws = row.get("ws")
        idle = {i["count"]: i for i in row.get("ws_idle", [])}
        largest = max(idle) if idle else None
        if ws:
            out.append((name, "RSS per idle tunneled WebSocket at 10,000", "≤ 12 KiB", f"skipped: {ws}"))
        elif largest is not None and idle[largest]["failed"]:
            # A figure over the few connections that got through says nothing
            # about 10,000 held at once: none dropped is part of the target.
            out.append((name, f"RSS per idle tunneled WebSocket at {largest:,}, none dropped",
                        "≤ 12 KiB", f"{idle[largest]['failed']:,} of {largest:,} failed **short**"))
        elif largest is not None and idle[largest]["kib_per_ws"] is not None:
            ratio(name, idle[largest]["kib_per_ws"], 12, False,
                  f"KiB RSS per idle tunneled WebSocket at {largest:,}")
        else:
            out.append((name, "RSS per idle tunneled WebSocket at 10,000", "≤ 12 KiB", "not measured"))
    return out


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"Run of {meta['date']}: `{meta['command']}`",
        "",
        f"- machine: {meta['machine']}; pinning: {meta['pinning']}; CPU scheduling: "
        f"{meta.get('scheduling', 'the default policy')}",
        f"- versions: Python {meta['python']}, Twisted {meta['twisted']}, tunneld {meta['tunneld']}, "
        f"{meta['nginx']}, {meta['wrk']}, {meta['h2load']}, pagekite {meta['pagekite']}",
        f"- upstream: {meta['upstream']} (64-byte body, 1 MiB file); load: {meta['load']}; "
        f"{meta['reps']} repetitions × {meta['seconds']} s per figure, median (min–max)",
        "",
        "| system | req/s, 64 B, 50 conn | CPU µs per request | p50 ms | p99 ms | errors | "
        "MiB/s, 1 MiB, 4 conn | CPU ms per MiB | h2load req/s | peak RSS MiB | "
        + f"{meta['big_mib']} MiB transfer |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"].values():
        if row["skip"]:
            lines.append(f"| {row['label']} | {row['skip']} | | | | | | | | | |")
            continue
        small, large = row["small"], row["large"]
        errors = sum(r["error_count"] for r in small + large)
        h2s = row["h2"]
        if h2s and all(isinstance(h, dict) for h in h2s):
            h2 = spread([h["rps"] for h in h2s], ".0f")
            failed = sum(h["failed"] for h in h2s)
            if failed:
                h2 += f" ({failed} failed)"
        else:
            h2 = next((h for h in h2s if isinstance(h, str)), "–")
        rss = row.get("peak_rss_kib") or {}
        rss_text = " + ".join(f"{v / 1024:.0f}" for v in rss.values() if v) or "–"
        transfer = row.get("transfer")
        if transfer:
            flat = ", ".join(f"{(v['max'] - v['first']) / 1024:+.1f}" for v in transfer["rss_kib"].values())
            t_text = f"{transfer['mib_s']:.0f} MiB/s" + ("" if transfer["complete"] else " (incomplete)")
            if flat:
                t_text += f"; RSS growth {flat} MiB"
        else:
            t_text = "–"
        lines.append(
            f"| {row['label']} | {spread([r['rps'] for r in small], '.0f')} | "
            f"{spread([r['cpu_us'] for r in small if 'cpu_us' in r], '.0f')} | "
            f"{spread([r['p50_ms'] for r in small], '.2f')} | {spread([r['p99_ms'] for r in small], '.1f')} | "
            f"{errors} | {spread([r['mib_s'] for r in large], '.0f')} | "
            f"{spread([r['cpu_ms_per_mib'] for r in large if 'cpu_ms_per_mib' in r and r['mib_s'] >= 1], '.2f')} | "
            f"{h2} | {rss_text} | {t_text} |")
    ws_lines = []
    counts = list(results["meta"].get("idle_ws", []))
    for row in results["rows"].values():
        if row["skip"] or ("ws_echo" not in row and not row.get("ws")):
            continue
        if row.get("ws"):
            ws_lines.append(f"| {row['label']} | skipped: {row['ws']} | |" + " |" * len(counts))
            continue
        echoes = row.get("ws_echo", [])
        idle = {i["count"]: i for i in row.get("ws_idle", [])}

        def per_ws(n: int, idle: dict[int, Any] = idle) -> str:
            i = idle.get(n)
            if i is None or i["kib_per_ws"] is None:
                return "–"
            return f"{i['kib_per_ws']:.1f}" + (f" ({i['failed']} failed)" if i["failed"] else "")

        ws_lines.append(
            f"| {row['label']} | {spread([e['msg_s'] for e in echoes], '.0f')} | "
            f"{spread([e['p99_ms'] for e in echoes], '.1f')} | "
            + " | ".join(per_ws(n) for n in counts) + " |")
    if ws_lines:
        lines += ["", "| WebSocket through | echo msg/s, 64 B, 50 conn | p99 ms | "
                  + " | ".join(f"KiB per idle WebSocket at {n:,}" for n in counts) + " |",
                  "|---|---|---|" + "---|" * len(counts)]
        lines += ws_lines
    soaks = [(row["label"], row["soak"]) for row in results["rows"].values() if row.get("soak")]
    if soaks:
        lines += ["", "| soak (all tunnel rows at once) | seconds | requests: keep-alive / new connection each | "
                  "errors | RSS MiB after warm-up → end (max) |", "|---|---|---|---|---|"]
        for label, soak in soaks:
            loads = soak["loads"]
            rss = "; ".join(f"{name.split('-')[0]} {v['at_warm'] / 1024:.1f} → {v['end'] / 1024:.1f} "
                            f"({v['max'] / 1024:.1f})" for name, v in soak["rss_kib"].items() if v["at_warm"])
            lines.append(f"| {label} | {soak['seconds']:.0f} | {loads['keep-alive']['requests']:,} / "
                         f"{loads['new connection each']['requests']:,} | "
                         f"{sum(v['errors'] for v in loads.values())} | {rss} |")
    checks = targets(results)
    if checks:
        lines += ["", "| target | figure | wanted | this run |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in checks]
    return "\n".join(lines) + "\n"


def write_out(path: str, slot: str, text: str) -> None:
    """Replace the block between the slot's markers in C{path}, else append it (or create C{path})."""
    begin, end = f"<!-- bench:{slot}:begin -->", f"<!-- bench:{slot}:end -->"
    block = f"{begin}\n{text}{end}"
    if os.path.exists(path):
        with open(path) as f:
            current = f.read()
        if begin in current and end in current:
            head, _, rest = current.partition(begin)
            _, _, tail = rest.partition(end)
            with open(path, "w") as f:
                f.write(head + block + tail)
            return
        # A new slot goes at the end: never write over what the file holds.
        with open(path, "a") as f:
            f.write(("" if current.endswith("\n") else "\n") + "\n" + block + "\n")
        return
    with open(path, "w") as f:
        f.write(block + "\n")


def ensure_tools(smoke: bool) -> None:
    missing = [pkg for tool, pkg in DEBIAN_TOOLS.items() if shutil.which(tool) is None]
    if smoke or not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        log(f"missing {', '.join(missing)} and cannot apt-get them; those rows are skipped")
        return
    log(f"installing {' '.join(missing)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=False, env=env)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 repetition of 3 s (a look, not a result)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds, Python pieces only (twisted.web upstream, Python load loop); for CI")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--big-mib", type=int, default=1024, help="size of the single big transfer")
    parser.add_argument("--transports", default="websocket,grpc,streamable-http",
                        help="tunneld transports to measure (comma-separated)")
    parser.add_argument("--only", default="",
                        help="measure only these rows, e.g. twisted,websocket (for A/B work)")
    parser.add_argument("--cpu-scheduling", choices=["batch", "default"], default="batch",
                        help="policy of every system under test: SCHED_BATCH (tunneld's cpu_scheduling, "
                             "chrt for the others) or the default")
    parser.add_argument("--window", type=int, default=0,
                        help="tunneld initial_window for edge and agent (default: tunneld's default)")
    parser.add_argument("--idle-ws", default="1000,10000",
                        help="idle WebSocket counts for the RSS-per-WebSocket figure")
    parser.add_argument("--soak", type=float, default=600,
                        help="seconds of the leak soak over every tunnel row (0 = skip; --quick skips it)")
    parser.add_argument("--render", metavar="JSON",
                        help="measure nothing: render an earlier run's bench/results/*.json again")
    parser.add_argument("--out", help="markdown file to write (or update between bench:SLOT markers)")
    parser.add_argument("--slot", default="latest", help="marker name used with --out")
    parser.add_argument("--json", help="where to write the raw results (default bench/results/DATE.json)")
    args = parser.parse_args(argv)
    args.argv = argv
    args.transports = [t for t in args.transports.split(",") if t]
    args.only = {t for t in args.only.split(",") if t}
    args.idle_ws = [int(n) for n in args.idle_ws.split(",") if n]
    if args.quick:
        args.reps, args.seconds, args.soak = 1, 3, 0
    if args.smoke:
        args.reps, args.seconds, args.big_mib, args.soak = 1, 1, 8, 3
        args.idle_ws = [50]
    if args.render:
        with open(args.render) as f:
            text = markdown(json.load(f))
        if args.out:
            write_out(args.out, args.slot, text)
        print(text)
        return 0
    ensure_tools(args.smoke)
    results = Bench(args).run()
    text = markdown(results)
    json_path = args.json or os.path.join(
        BENCH, "results", time.strftime("%Y%m%d-%H%M%S") + ("-smoke" if args.smoke else "") + ".json")
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1)
    if args.out:
        write_out(args.out, args.slot, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
