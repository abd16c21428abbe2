"""
Profile tunneld's edge and agent under a load of bench/run, started the way bench/run starts them.

Usage: python bench/profile.py [--workload LOAD] [--profiler py-spy|cprofile] [--seconds N]
                               [TRANSPORT] [/small|/1m] [SECONDS]

LOAD is one of bench/runner.py's loads (default varied, the headline of
issue 23): varied, post4k, mixed, small, large, up1m; the old positional
/small and /1m still mean small and large.  The load generator is wrk with
bench/varied.lua (pyload without wrk), the upstream nginx (twisted.web
without it), as in bench/run.

py-spy (``pip install -e '.[bench]'``; the default when installed) samples
both processes while the load runs and writes collapsed stacks to
bench/results/profile-{edge,agent}-TRANSPORT-LOAD.txt; cProfile runs edge and
agent under twistd's own ``--profiler=cprofile --savestats`` and writes
bench/results/profile-{edge,agent}-TRANSPORT-LOAD.pstats (whole run, with the
warm-up; cProfile's overhead slows both several-fold, so read it for where
calls go, py-spy for where time goes).  Either way the functions with the
most time (own and inclusive) are printed per process.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import pstats
import shutil
import signal
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import runner  # noqa: E402


def summarise(path: str, top: int = 25) -> str:
    """The functions with the most py-spy samples in a collapsed-stacks file, own and inclusive."""
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
    if not total:
        return "no samples"
    lines = [f"{total} samples", "own:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines += ["inclusive:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


def summarise_pstats(path: str, top: int = 25) -> str:
    """The functions with the most own and cumulative time in a cProfile stats file."""
    out = io.StringIO()
    stats = pstats.Stats(path, stream=out)
    stats.strip_dirs()
    out.write("own (tottime):\n")
    stats.sort_stats("tottime").print_stats(top)
    out.write("inclusive (cumtime):\n")
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def stop_and_wait(proc: runner.Proc, seconds: float = 60) -> None:
    """SIGTERM, then time for twistd to write its profile before it exits."""
    if proc.popen.poll() is None:
        proc.popen.send_signal(signal.SIGTERM)
        try:
            proc.popen.wait(seconds)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("transport", nargs="?", default="websocket")
    parser.add_argument("path", nargs="?", help="/small or /1m (the older spelling of --workload)")
    parser.add_argument("positional_seconds", nargs="?", type=int, metavar="SECONDS")
    parser.add_argument("--workload", choices=list(runner.LOAD), help="the load to profile (default varied)")
    parser.add_argument("--profiler", choices=["py-spy", "cprofile"],
                        help="default py-spy when installed, else cprofile")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    args = parser.parse_args()
    key = args.workload or {"/small": "small", "/1m": "large", None: "varied"}.get(args.path, args.path)
    if key not in runner.LOAD:
        parser.error(f"unknown load {key!r}; choose from {', '.join(runner.LOAD)}")
    load = runner.LOAD[key]
    seconds = args.positional_seconds or args.seconds
    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    profiler = args.profiler or ("py-spy" if os.access(py_spy, os.X_OK) else "cprofile")
    out_dir = os.path.join(runner.BENCH, "results")
    os.makedirs(out_dir, exist_ok=True)
    stem = f"{args.transport}-{key}"
    bench = runner.Bench(argparse.Namespace(smoke=False, big_mib=16, reps=1, seconds=seconds, window=0,
                                            argv=[]))
    if bench.load_cpu is not None:
        os.sched_setaffinity(0, {int(bench.load_cpu)})
    options: tuple[str, ...] = ()
    if profiler == "cprofile":
        # "{name}" becomes edge-TRANSPORT or agent-TRANSPORT (bench/runner.py's twistd()).
        options = ("--profiler=cprofile", "--savestats",
                   f"--profile={os.path.join(out_dir, 'profile-{name}-' + key + '.pstats')}")
    try:
        upstream, _ = bench.start_upstream()
        system = bench.tunneld(args.transport, upstream, None, twistd_options=options)
        bench.load(system, load, 2)  # warm up
        spies = []
        if profiler == "py-spy":
            for proc in system.measured:
                name = proc.name.split("-")[0]
                path = os.path.join(out_dir, f"profile-{name}-{stem}.txt")
                spies.append((name, path, subprocess.Popen(
                    [py_spy, "record", "--format", "raw", "--nonblocking", "-r", str(args.rate), "-d",
                     str(seconds), "-o", path, "--pid", str(proc.pid)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        result = bench.load(system, load, seconds)
        figure = f"{result['mib_s']:.1f} MiB/s" if load.bulk else f"{result['rps']:.0f} req/s"
        print(f"{load.label} through tunneld over {args.transport}, profiled with {profiler}: {figure}, "
              f"p50 {result['p50_ms']:.2f} ms, errors {result['error_count']}")
        for name, path, spy in spies:
            spy.wait()
            print(f"== {name} ({path})\n{summarise(path)}")
        if profiler == "cprofile":
            for proc in system.measured:
                stop_and_wait(proc)
            for proc in system.measured:
                path = os.path.join(out_dir, f"profile-{proc.name}-{key}.pstats")
                if os.path.exists(path):
                    print(f"== {proc.name.split('-')[0]} ({path})\n{summarise_pstats(path)}")
                else:
                    print(f"== {proc.name}: no profile written; its log:\n{proc.output()[-2000:]}")
    finally:
        bench.stop_all()
        shutil.rmtree(bench.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
