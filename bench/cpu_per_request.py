"""
CPU time the edge and the agent spend per request under wrk, the way bench/run starts them.

CPU time (utime + stime from /proc) rather than wall-clock figures: on a shared,
loaded machine req/s swings by tens of percent from run to run, while the CPU a
process spends per request moves much less, so an A/B of one change shows.

Usage: python bench/cpu_per_request.py [websocket|grpc] [LOAD] [ROUNDS]
LOAD is one of bench/runner.py's loads: varied, post4k, mixed, small (or
/small), large (or /1m), up1m.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import runner  # noqa: E402

SECONDS = 5


def cpu_seconds(pid: int) -> float:
    return runner.cpu_seconds([pid])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("transport", nargs="?", default="websocket")
    parser.add_argument("load", nargs="?", default="small", help="a load of bench/runner.py (or /small, /1m)")
    parser.add_argument("rounds", nargs="?", type=int, default=3)
    args = parser.parse_args()
    load = runner.LOAD[{"/small": "small", "/1m": "large"}.get(args.load, args.load)]
    bench = runner.Bench(argparse.Namespace(smoke=False, big_mib=16, reps=1, seconds=SECONDS,
                                            window=0, argv=[]))
    if bench.load_cpu is not None:
        os.sched_setaffinity(0, {int(bench.load_cpu)})
    try:
        upstream, _ = bench.start_upstream()
        system = bench.tunneld(args.transport, upstream, None)
        bench.load(system, load, 2)  # warm up
        for _ in range(args.rounds):
            before = {proc.name: cpu_seconds(proc.pid) for proc in system.measured}
            result = bench.load(system, load, SECONDS)
            after = {proc.name: cpu_seconds(proc.pid) for proc in system.measured}
            requests = max(1.0, result["rps"] * SECONDS)
            print(f"{result['rps']:.0f} req/s  " + "  ".join(
                f"{name.split('-')[0]} {1e6 * (after[name] - before[name]) / requests:.0f} us/req"
                for name in before
            ))
    finally:
        bench.stop_all()
        shutil.rmtree(bench.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
