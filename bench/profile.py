"""
Profile tunneld's edge and agent under wrk with py-spy, the way bench/run measures them.

Usage: python bench/profile.py [websocket|grpc] [/small|/1m] [SECONDS]
Writes collapsed stacks to bench/results/profile-{edge,agent}-TRANSPORT.txt and
prints the functions with the most samples (own and inclusive) per process.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import runner  # noqa: E402


def summarise(path: str, top: int = 25) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            n = int(count)
            total += n
            frames = stack.split(";")
            own[frames[-1]] += n
            for frame in set(frames):
                inclusive[frame] += n
    lines = [f"{total} samples", "own:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines += ["inclusive:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("transport", nargs="?", default="websocket")
    parser.add_argument("path", nargs="?", default="/small")
    parser.add_argument("seconds", nargs="?", type=int, default=10)
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    bench = runner.Bench(argparse.Namespace(smoke=False, big_mib=16, reps=1, seconds=args.seconds, window=0,
                                            argv=[]))
    if bench.load_cpu is not None:
        os.sched_setaffinity(0, {int(bench.load_cpu)})
    out_dir = os.path.join(runner.BENCH, "results")
    os.makedirs(out_dir, exist_ok=True)
    try:
        upstream, _ = bench.start_upstream()
        system = bench.tunneld(args.transport, upstream, None)
        connections = 50 if args.path == "/small" else 4
        spies = []
        for proc in system.measured:
            name = proc.name.split("-")[0]
            path = os.path.join(out_dir, f"profile-{name}-{args.transport}.txt")
            spies.append((name, path, subprocess.Popen(
                [py_spy, "record", "--format", "raw", "--nonblocking", "-r", "250", "-d",
                 str(args.seconds), "-o", path, "--pid", str(proc.pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        result = bench.load(system, args.path, connections, args.seconds)
        print(f"{result['rps']:.0f} req/s, {result['mib_s']:.1f} MiB/s, p50 {result['p50_ms']:.2f} ms")
        for name, path, spy in spies:
            spy.wait()
            print(f"== {name}\n{summarise(path)}")
    finally:
        bench.stop_all()
        shutil.rmtree(bench.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
