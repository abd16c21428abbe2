"""
WebSocket conformance through the tunnel: Autobahn|Testsuite's fuzzingclient
core cases (1-10, about 300) give the same verdict through edge and agent as
directly against the same Autobahn echo upstream, and none fails.

The compression cases (12-13) take a quarter of an hour per run; they run
from C{bench/autobahn_compression.py} and are recorded in
C{docs/websocket-conformance.md}.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import SkipTest, TestCase

from tests.autobahn_fuzzing import CORE_CASES, WSTEST, compare, differences, find_python2

# Each wstest run (direct and tunnel, side by side) gets this long before it
# is killed.  Alone on a machine both take about 100 s; the budget leaves room
# for a loaded CI worker.
RUN_BUDGET = 600.0


class AutobahnConformance(TestCase):
    """The fuzzingclient's verdicts, directly and through the websocket transport."""

    timeout = 3 * RUN_BUDGET + 60

    def setUp(self) -> None:
        if not os.access(WSTEST, os.X_OK):
            if find_python2() is None:
                raise SkipTest(
                    "Autobahn|Testsuite needs Python 2.7 and none was found "
                    "(pyenv versions/2.7*, python2.7 on PATH)"
                )
            self.fail(f"{WSTEST} is missing: run scripts/setup (it runs scripts/setup-autobahn)")

    async def test_core_cases_agree(self) -> None:
        """Every core case (1-10) ends with the same verdict through the tunnel as directly, and none FAILED."""
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        direct, tunnel = await compare(reactor, CORE_CASES, workdir, RUN_BUDGET)
        self.assertGreater(len(direct.cases), 290)
        self.assertEqual(sorted(direct.cases), sorted(tunnel.cases))
        # A relay adds latency, and Autobahn grades some "fail fast" cases
        # NON-STRICT when the failure comes a moment late: that one pair of
        # verdicts (OK vs NON-STRICT) is timing, not behaviour; any other
        # difference, and any FAILED, is a failure.
        problems = [p for p in differences(direct, tunnel) if not _timing_only(p, direct, tunnel)]
        # Many cases kill the connection one second after their last frame
        # (Autobahn's killAfter(1)); on a loaded machine a relayed close can
        # miss that second.  A difference in behaviour comes back every time,
        # a missed second does not: the cases that disagreed run again, alone,
        # up to twice, and only a difference that persists is a failure.
        for attempt in range(2):
            if not problems:
                break
            again = [p.split(":", 1)[0] for p in problems]
            retry_dir = os.path.join(workdir, f"again-{attempt}")
            os.makedirs(retry_dir)
            direct, tunnel = await compare(reactor, again, retry_dir, RUN_BUDGET)
            problems = [p for p in differences(direct, tunnel) if not _timing_only(p, direct, tunnel)]
        self.assertEqual(problems, [])


def _timing_only(problem: str, direct: Any, tunnel: Any) -> bool:
    case = problem.split(":", 1)[0]
    a, b = direct.cases.get(case), tunnel.cases.get(case)
    if a is None or b is None:
        return False
    return {a[0], b[0]} == {"OK", "NON-STRICT"} and a[1] == b[1]
