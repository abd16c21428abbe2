"""
Keystroke round trip through the terminal bridge, beside a direct local PTY.

One keystroke is one byte written and its echo read back: through the
bridge, a WebSocket message to the edge (twistd tunneld), a terminal record
on the agent link (websocket or grpc transport) to the agent (twistd
tunneld-agent), the PTY's echo back the same way; directly, a write to a
PTY's master and the read of its echo.  Both run `cat` on the PTY, so the
echo is the line discipline's, with no program in the way.  One keystroke
in flight at a time (a person typing), p50/p99 over --count keystrokes after
--warmup.

    .venv/bin/python bench/terminal_latency.py [--count 2000] [--transports websocket,grpc]
        [--out docs/benchmarks.md]

With --out, the table replaces what is between the file's
`<!-- bench:terminal:begin -->` and `<!-- bench:terminal:end -->` markers.
A driver script: it blocks, spawns processes and prints.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from runner import Proc, free_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CREDENTIAL = "bench-operator-credential-0123"
CAT = "/bin/cat"


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000

    return {
        "p50_ms": round(at(0.50), 3), "p99_ms": round(at(0.99), 3),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 3), "n": len(ordered),
    }


def direct_pty(count: int, warmup: int) -> dict[str, float]:
    """Keystrokes to `cat` on a local PTY: the floor the bridge is measured against."""
    master, slave = os.openpty()
    child = subprocess.Popen([CAT], stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    samples = []
    try:
        for i in range(warmup + count):
            key = b"abcdefghijklmnopqrstuvwxyz"[i % 26 : i % 26 + 1]
            start = time.perf_counter()
            os.write(master, key)
            got = b""
            while key not in got:
                select.select([master], [], [], 5)
                got += os.read(master, 1024)
            if i >= warmup:
                samples.append(time.perf_counter() - start)
            if i % 64 == 63:
                os.write(master, b"\n")  # keep the line short
                _drain(master)
    finally:
        child.kill()
        child.wait()
        os.close(master)
    return percentiles(samples)


def _drain(fd: int) -> None:
    while select.select([fd], [], [], 0.05)[0]:
        try:
            os.read(fd, 65536)
        except OSError:
            return


def start_tunnel(workdir: str, transport: str) -> tuple[list[Proc], int]:
    admin = free_port()
    edge_conf = os.path.join(workdir, f"edge-{transport}.toml")
    with open(edge_conf, "w") as f:
        f.write(f"""[edge]
public_listen = ["tcp:0:interface=127.0.0.1"]
admin_listen = "tcp:{admin}:interface=127.0.0.1"
transports = ["{transport}"]

[edge.terminal]
enabled = true
operators = {{ bench = "{CREDENTIAL}" }}

[transports.{transport}]
listen = "tcp:0:interface=127.0.0.1"
""")
    python = sys.executable
    twistd = [python, "-c", "from twisted.scripts.twistd import run; run()", "--nodaemon",
              "--pidfile="]
    env = dict(os.environ, PYTHONPATH=ROOT)
    edge = Proc(f"edge-{transport}", [*twistd, "tunneld", "--config", edge_conf], workdir, env)
    link = int(edge.wait_for(rf"{transport} agent link listening on 127\.0\.0\.1:(\d+)").group(1))
    link_conf = {
        "websocket": f'url = "ws://127.0.0.1:{link}/tunnel"',
        "grpc": f'address = "127.0.0.1:{link}"',
    }[transport]
    agent_conf = os.path.join(workdir, f"agent-{transport}.toml")
    with open(agent_conf, "w") as f:
        f.write(f"""[agent]
id = "bench-node"
transports = ["{transport}"]

[agent.terminal]
enabled = true
command = ["{CAT}"]

[transports.{transport}]
{link_conf}

[[tunnels]]
hostname = "bench.localhost"
upstream = "tcp:host=127.0.0.1:port=9"
""")
    agent = Proc(f"agent-{transport}", [*twistd, "tunneld-agent", "--config", agent_conf],
                 workdir, env)
    agent.wait_for(r"tunnel ready: ")
    return [edge, agent], admin


def bridge(admin: int, count: int, warmup: int) -> dict[str, float]:
    from websockets.sync.client import connect

    request = urllib.request.Request(
        f"http://127.0.0.1:{admin}/api/v1/allocations/bench-node/terminal-token",
        method="POST", headers={"Authorization": f"Bearer {CREDENTIAL}"},
    )
    with urllib.request.urlopen(request) as response:
        token = json.load(response)["token"]
    samples = []
    with connect(f"ws://127.0.0.1:{admin}/ws/terminal/bench-node?token={token}") as ws:
        while True:
            message = ws.recv()
            if isinstance(message, str) and json.loads(message)["type"] == "ready":
                break
        for i in range(warmup + count):
            key = b"abcdefghijklmnopqrstuvwxyz"[i % 26 : i % 26 + 1]
            start = time.perf_counter()
            ws.send(key)
            got = b""
            while key not in got:
                message = ws.recv(timeout=10)
                if isinstance(message, bytes):
                    got += message
            if i >= warmup:
                samples.append(time.perf_counter() - start)
            if i % 64 == 63:
                ws.send(b"\n")
                _drain_ws(ws)
        ws.send(json.dumps({"type": "close"}))
    return percentiles(samples)


def _drain_ws(ws: Any) -> None:
    while True:
        try:
            ws.recv(timeout=0.05)
        except TimeoutError:
            return


def table(results: dict[str, dict[str, float]], meta: dict[str, Any]) -> str:
    lines = [
        f"Keystroke round trip, one in flight, {meta['count']} keystrokes after "
        f"{meta['warmup']} warm-up ({meta['when']}, {meta['machine']}, commit {meta['commit']}):",
        "",
        "| path | p50 (ms) | p99 (ms) | mean (ms) |",
        "|---|---|---|---|",
    ]
    for name, figures in results.items():
        lines.append(
            f"| {name} | {figures['p50_ms']} | {figures['p99_ms']} | {figures['mean_ms']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--transports", default="websocket,grpc")
    parser.add_argument("--out", help="a Markdown file with bench:terminal markers")
    args = parser.parse_args()
    results = {"direct local PTY": direct_pty(args.count, args.warmup)}
    with tempfile.TemporaryDirectory() as workdir:
        for transport in args.transports.split(","):
            procs, admin = start_tunnel(workdir, transport)
            try:
                results[f"through the bridge ({transport} agent link)"] = bridge(
                    admin, args.count, args.warmup
                )
            finally:
                for proc in reversed(procs):
                    proc.stop()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    meta = {
        "count": args.count, "warmup": args.warmup, "commit": commit,
        "when": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores, {platform.python_implementation()} "
                   f"{platform.python_version()}",
    }
    print(json.dumps({"results": results, "meta": meta}, indent=1))
    text = table(results, meta)
    print(text)
    if args.out:
        with open(args.out) as f:
            doc = f.read()
        begin, end = "<!-- bench:terminal:begin -->\n", "<!-- bench:terminal:end -->"
        head, _, rest = doc.partition(begin)
        _, _, tail = rest.partition(end)
        with open(args.out, "w") as f:
            f.write(head + begin + text + end + tail)


if __name__ == "__main__":
    main()
