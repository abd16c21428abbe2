"""
What the Redis state backend costs one edge, against the in-memory default.

One edge and one agent (started the way bench/run starts them) per row, the
same static GET load (wrk, bench/runner.py's "small" load) on each, in
interleaved rounds whose order rotates; each row reports req/s, p50/p99
latency and the CPU the edge and the agent spent per request.  The rows:

  - memory: the default, nothing to set up;
  - redis: [edge.state] backend = "redis" on a local redis-server (heartbeats
    only: without limits nothing on the request path asks Redis);
  - memory + rate / redis + rate: a per-tunnel rate limit too high to refuse
    anything (so every request spends a token): local buckets against the
    cluster-wide ones (tunneld/policy/shared.py, tokens taken from Redis).

Usage: python bench/state_cost.py [ROUNDS] [SECONDS]   (needs redis-server and wrk)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import runner  # noqa: E402

RATE = 'rate = 1000000.0\nburst = 1000000\n'


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("rounds", nargs="?", type=int, default=3)
    parser.add_argument("seconds", nargs="?", type=float, default=10.0)
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is needed (scripts/setup-tests installs it)")
    load = runner.LOAD["small"]
    bench = runner.Bench(argparse.Namespace(smoke=False, big_mib=16, reps=1, seconds=args.seconds,
                                            window=0, argv=[]))
    if bench.load_cpu is not None:
        os.sched_setaffinity(0, {int(bench.load_cpu)})
    try:
        upstream, _ = bench.start_upstream()
        port = runner.free_port()
        redis = bench.spawn("redis", [
            "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", bench.workdir,
        ], bench.load_cpu)
        redis.wait_for(r"Ready to accept connections")
        state = f'[edge.state]\nbackend = "redis"\nredis_url = "redis://127.0.0.1:{port}/0"\n'
        rows = {
            "memory": bench.tunneld("websocket", upstream, None, tag="-memory"),
            "redis": bench.tunneld("websocket", upstream, None, tag="-redis", tables=state),
            "memory + rate": bench.tunneld("websocket", upstream, None, tag="-memory-rate",
                                           limits=RATE),
            "redis + rate": bench.tunneld("websocket", upstream, None, tag="-redis-rate",
                                          limits=RATE, tables=state),
        }
        runner.interleaved_table(bench, rows, load, args.rounds, args.seconds, "edge+agent")
    finally:
        bench.stop_all()
        shutil.rmtree(bench.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
