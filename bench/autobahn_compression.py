#!/usr/bin/env python3
"""
Autobahn|Testsuite's permessage-deflate cases (12.*, 13.*) directly and then
through the tunnel (one after the other, so each run has the machine); prints the verdict counts of both runs and every
case whose verdict differs.  A quarter of an hour or more per run, so it is
not part of the test suite; its result is recorded in
docs/websocket-conformance.md.

    scripts/setup-autobahn        # once: .venv-autobahn with wstest (Python 2.7)
    .venv/bin/python bench/autobahn_compression.py [--cases '12.*' '13.*'] [--budget 3600]

Exit status 0 when every case has the same verdict both ways and none FAILED.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402

from tests.autobahn_fuzzing import COMPRESSION_CASES, WSTEST, compare, differences  # noqa: E402


async def main(reactor: object, cases: list[str], budget: float, outdir: str) -> int:
    if not os.access(WSTEST, os.X_OK):
        print(f"{WSTEST} is missing: run scripts/setup-autobahn", file=sys.stderr)
        return 2
    os.makedirs(outdir, exist_ok=True)
    print(f"running {' '.join(cases)} directly, then through the tunnel (reports in {outdir})")
    direct, tunnel = await compare(reactor, cases, outdir, budget, side_by_side=False)
    for run in (direct, tunnel):
        counts = ", ".join(f"{k} {v}" for k, v in sorted(run.counts().items()))
        print(f"{run.agent:>6}: {len(run.cases)} cases in {run.seconds:.0f}s: {counts}")
    problems = differences(direct, tunnel)
    for problem in problems:
        print("  " + problem)
    summary = {
        run.agent: {"cases": len(run.cases), "seconds": round(run.seconds), "verdicts": run.counts()}
        for run in (direct, tunnel)
    }
    summary["differences"] = problems  # type: ignore[assignment]
    with open(os.path.join(outdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("same verdicts both ways" if not problems else f"{len(problems)} cases differ")
    return 0 if not problems else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=COMPRESSION_CASES)
    parser.add_argument("--budget", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("--outdir", default=tempfile.mkdtemp(prefix="autobahn-"))
    args = parser.parse_args()

    async def run(reactor: object) -> None:
        status = await main(reactor, args.cases, args.budget, args.outdir)
        if status:
            raise SystemExit(status)

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
