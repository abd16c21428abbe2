"""
The edge's and the agent's RSS through several 1 GiB downloads in a row, after
the loads bench/run puts on them first (small requests, 1 MiB bodies, h2load).

bench/run measures one transfer; this shows whether its growth repeats (memory
that grows with the bytes moved) or happens once (a working set laid out).

Usage: python bench/transfer_rss.py [websocket|grpc] [TRANSFERS]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import runner  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("transport", nargs="?", default="grpc")
    parser.add_argument("transfers", nargs="?", type=int, default=3)
    args = parser.parse_args()
    bench = runner.Bench(argparse.Namespace(smoke=False, big_mib=1024, reps=1, seconds=5,
                                            window=0, argv=[]))
    if bench.load_cpu is not None:
        os.sched_setaffinity(0, {int(bench.load_cpu)})
    try:
        upstream, _ = bench.start_upstream()
        system = bench.tunneld(args.transport, upstream, None)
        for _ in range(3):
            bench.load(system, runner.LOAD["small"], 5)
            bench.load(system, runner.LOAD["large"], 5)
            bench.h2load(system)
        for _ in range(args.transfers):
            transfer = bench.big_transfer(system)
            print(f"{transfer['mib_s']:.0f} MiB/s  " + "  ".join(
                f"{name.split('-')[0]} {rss['first'] / 1024:.1f} -> {rss['max'] / 1024:.1f} MiB"
                f" ({(rss['max'] - rss['first']) / 1024:+.1f})"
                for name, rss in transfer["rss_kib"].items()
            ), flush=True)
    finally:
        bench.stop_all()
        shutil.rmtree(bench.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
