"""
A request entering the "wrong" edge (relayed) beside the "right" one.

Two edges share a local redis-server, each with a cluster certificate
(`tunneld certs edge --edge-name`); one agent, over wss with its own
certificate, is linked to edge B only.  The same static GET load (wrk,
bench/runner.py's "small" load) goes to edge B (the right edge: its own
agent) and to edge A (the wrong edge: every request relayed to B over the
relay link A accepted from B), in interleaved rounds whose order rotates.
Each row reports req/s, p50/p99 latency and the CPU the two edges and the
agent spent per request (the same three processes on both rows).

Usage: python bench/relay_cost.py [ROUNDS] [SECONDS]   (needs redis-server and wrk)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import runner  # noqa: E402

EDGE = """[edge]
public_listen = ["tcp:0:interface=127.0.0.1"]
public_h2c_listen = ["tcp:0:interface=127.0.0.1"]
public_url = "http://{{host}}/"
transports = ["websocket"]
admin_listen = "tcp:0:interface=127.0.0.1"

[edge.agent_tls]
certificate = "{cert}"
key = "{key}"
client_ca = "{ca}"

[edge.state]
backend = "redis"
redis_url = "redis://127.0.0.1:{redis}/0"
edge_name = "{name}"
edge_ttl = 5.0
heartbeat_interval = 1.0

[limits]
max_connections_per_client = 0
max_connections = 0

[transports.websocket]
listen = "tcp:0:interface=127.0.0.1"
"""

AGENT = """[agent]
transports = ["websocket"]
upstream_max_idle = 256

[agent.tls]
ca = "{ca}"
certificate = "{cert}"
key = "{key}"
server_hostname = "localhost"

[transports.websocket]
url = "wss://127.0.0.1:{link}/tunnel"

[[tunnels]]
hostname = "{vhost}"
upstream = "tcp:host=127.0.0.1:port={upstream}"
"""


def answers(port: int) -> bool:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/small", headers={"Host": runner.VHOST})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("rounds", nargs="?", type=int, default=3)
    parser.add_argument("seconds", nargs="?", type=float, default=10.0)
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is needed (scripts/setup-tests installs it)")
    sys.path.insert(0, runner.ROOT)
    from tunneld import certs

    load = runner.LOAD["small"]
    bench = runner.Bench(argparse.Namespace(smoke=False, big_mib=16, reps=1, seconds=args.seconds,
                                            window=0, argv=[]))
    if bench.load_cpu is not None:
        os.sched_setaffinity(0, {int(bench.load_cpu)})
    try:
        upstream, _ = bench.start_upstream()
        redis_port = runner.free_port()
        redis = bench.spawn("redis", [
            "redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", bench.workdir,
        ], bench.load_cpu)
        redis.wait_for(r"Ready to accept connections")
        ca = certs.make_ca()
        files = {}
        for stem, issued in (
            ("ca", ca),
            ("edge-a", certs.issue_cluster_edge(ca, "edge-a", ["localhost", "127.0.0.1"])),
            ("edge-b", certs.issue_cluster_edge(ca, "edge-b", ["localhost", "127.0.0.1"])),
            ("agent", certs.issue_agent(ca, "bench", [runner.VHOST])),
        ):
            files[stem] = (os.path.join(bench.workdir, f"{stem}.pem"),
                           os.path.join(bench.workdir, f"{stem}.key"))
            issued.write(*files[stem])
        edges = {}
        for name in ("edge-b", "edge-a"):
            conf = os.path.join(bench.workdir, f"{name}.toml")
            with open(conf, "w") as f:
                f.write(EDGE.format(cert=files[name][0], key=files[name][1], ca=files["ca"][0],
                                    redis=redis_port, name=name))
            edge = bench.spawn(name, bench.twistd("tunneld", conf, (), name), bench.sut_cpu)
            public = int(edge.wait_for(r"public HTTP listening on 127\.0\.0\.1:(\d+)").group(1))
            link = int(edge.wait_for(r"websocket agent link listening on 127\.0\.0\.1:(\d+)").group(1))
            edges[name] = (edge, public, link)
        conf = os.path.join(bench.workdir, "agent.toml")
        with open(conf, "w") as f:
            f.write(AGENT.format(ca=files["ca"][0], cert=files["agent"][0], key=files["agent"][1],
                                 link=edges["edge-b"][2], vhost=runner.VHOST, upstream=upstream))
        agent = bench.spawn("agent", bench.twistd("tunneld-agent", conf, (), "agent"), bench.sut_cpu)
        agent.wait_for(rf"tunnel ready: http://{runner.VHOST}/")
        deadline = time.monotonic() + 60
        while not answers(edges["edge-a"][1]):
            if time.monotonic() > deadline:
                raise SystemExit("edge A never relayed the tunnel")
            time.sleep(0.2)
        measured = [edges["edge-a"][0], edges["edge-b"][0], agent]
        rows = {}
        for row, name in (("right edge (B: its agent)", "edge-b"),
                          ("wrong edge (A: relayed to B)", "edge-a")):
            system = runner.System("websocket", row, tunnel=True)
            system.port = edges[name][1]
            system.procs = system.measured = measured
            rows[row] = system
        runner.interleaved_table(bench, rows, load, args.rounds, args.seconds, "edges+agent")
    finally:
        bench.stop_all()
        shutil.rmtree(bench.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
