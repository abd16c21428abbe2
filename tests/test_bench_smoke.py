"""
The benchmark harness in smoke mode, so it cannot rot: Python pieces only
(a twisted.web upstream, the Python load loop), one second per figure, no
targets asserted — only that every code path ran and wrote its report.
"""

from __future__ import annotations

import json
import os
import sys

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BenchSmokeTests(TestCase):
    timeout = 120

    async def test_smoke_run_writes_table_and_json(self) -> None:
        """bench/runner.py --smoke measures the Python rows through real tunnels and writes both reports."""
        out = os.path.abspath(self.mktemp())
        with open(out, "w") as f:
            f.write("before\n<!-- bench:smoke:begin -->\nold\n<!-- bench:smoke:end -->\nafter\n")
        raw = os.path.abspath(self.mktemp())
        env = dict(os.environ, PYTHONPATH=ROOT)
        stdout, stderr, code = await getProcessOutputAndValue(
            sys.executable,
            [os.path.join(ROOT, "bench", "runner.py"), "--smoke", "--transports", "websocket,grpc",
             "--out", out, "--slot", "smoke", "--json", raw],
            env=env, path=ROOT, reactor=reactor)
        self.assertEqual(code, 0, (stdout + stderr).decode(errors="replace"))
        with open(raw) as f:
            results = json.load(f)
        rows = results["rows"]
        for key in ("direct", "twisted", "websocket", "grpc"):
            self.assertIsNone(rows[key]["skip"], key)
            small = rows[key]["small"][0]
            self.assertGreater(small["requests"], 0, key)
            self.assertEqual(small["error_count"], 0, key)
            self.assertGreater(rows[key]["large"][0]["bytes"], 0, key)
        for key in ("twisted", "websocket", "grpc"):
            self.assertTrue(rows[key]["transfer"]["complete"], key)
        for key in ("websocket", "grpc"):
            self.assertEqual(len(rows[key]["peak_rss_kib"]), 2)  # the edge and the agent
        self.assertGreater(rows["direct"]["ws_echo"][0]["messages"], 0)
        for key in ("websocket", "grpc"):
            # Until the edge passes WebSockets through, the probe says why; after, both figures exist.
            if rows[key]["ws"] is None:
                self.assertGreater(rows[key]["ws_echo"][0]["messages"], 0)
                self.assertEqual(rows[key]["ws_idle"][0]["opened"], 50)
            else:
                self.assertIn("no WebSocket pass-through", rows[key]["ws"])
        for key in ("websocket", "grpc"):
            soak = rows[key]["soak"]
            self.assertGreater(soak["loads"]["keep-alive"]["requests"], 0, key)
            self.assertGreater(soak["loads"]["new connection each"]["requests"], 0, key)
            self.assertEqual(len(soak["rss_kib"]), 2, key)  # the edge and the agent, sampled
        self.assertEqual(rows["nginx"]["skip"], "smoke mode: Python pieces only")
        with open(out) as f:
            report = f.read()
        self.assertTrue(report.startswith("before\n<!-- bench:smoke:begin -->\nRun of "))
        self.assertTrue(report.endswith("<!-- bench:smoke:end -->\nafter\n"))
        self.assertIn("| tunneld over websocket | small req/s ÷ twisted.web proxy |", report)
        self.assertIn("over a 0.05-minute soak", report)
        # Every system under test ran under one policy (the runner checks each process).
        if hasattr(os, "SCHED_BATCH"):
            self.assertIn("CPU scheduling: SCHED_BATCH for every system under test", report)
        self.assertNotIn("old", report)
