"""
The benchmark harness in smoke mode, so it cannot rot: Python pieces only
(a twisted.web upstream, the Python load loop), half a second per figure, no
targets asserted — only that every code path ran, that the varied workloads
really varied, and that the report was written.  And the varied requests wrk
sends (bench/varied.lua) are checked byte for byte against the reference
builder the smoke mode uses (bench/workload.py).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from twisted.internet import defer, protocol, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")


class BenchSmokeTests(TestCase):
    # The smoke run starts edges, agents and load generators: a minute alone,
    # several on a busy machine.  A bound for a hang.
    timeout = 480

    async def test_smoke_run_writes_table_and_json(self) -> None:
        """bench/runner.py --smoke measures the Python rows through real tunnels and writes both reports."""
        out = os.path.abspath(self.mktemp())
        with open(out, "w") as f:
            f.write("before\n<!-- bench:smoke:begin -->\nold\n<!-- bench:smoke:end -->\nafter\n")
        raw = os.path.abspath(self.mktemp())
        env = dict(os.environ, PYTHONPATH=ROOT)
        stdout, stderr, code = await getProcessOutputAndValue(
            sys.executable,
            [os.path.join(BENCH, "runner.py"), "--smoke", "--transports", "websocket,grpc",
             "--out", out, "--slot", "smoke", "--json", raw],
            env=env, path=ROOT, reactor=reactor)
        self.assertEqual(code, 0, (stdout + stderr).decode(errors="replace"))
        with open(raw) as f:
            results = json.load(f)
        rows = results["rows"]
        for key in ("direct", "twisted", "websocket", "grpc"):
            row = rows[key]
            self.assertIsNone(row["skip"], key)
            # Before measuring, the same varied requests went through every system
            # and came back as the upstream sent them.
            self.assertTrue(row["check"]["passed"], (key, row["check"]))
            for kind in ("small", "varied", "post4k", "mixed", "up1m", "large"):
                result = row[kind][0]
                self.assertGreater(result["requests"], 0, (key, kind))
                self.assertEqual(result["error_count"], 0, (key, kind))
                self.assertEqual(result["round"], 0, (key, kind))
            self.assertGreater(row["large"][0]["bytes"], 0, key)
            self.assertGreater(row["up1m"][0]["mib_s"], 0, key)
            varied = row["varied"][0]
            # Every response had its own cookie and request id; the first fifty
            # requests of the seed hold pages (chunked) and Connection: close.
            self.assertEqual(varied["distinct_ids"], varied["requests"], key)
            self.assertGreater(varied["chunked"], 0, key)
            self.assertGreater(varied["closed"], 0, key)
        for key in ("twisted", "websocket", "grpc"):
            self.assertTrue(rows[key]["transfer"]["complete"], key)
            self.assertGreater(rows[key]["varied"][0]["cpu_us"], 0, key)
            # Peak RSS under the varied load, on processes started for it.
            (rss,) = rows[key]["rss_varied"]
            self.assertEqual(len(rss["peak_kib"]), 1 if key == "twisted" else 2, key)
            self.assertGreater(rss["rps"], 0, key)
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
        # The varied workload is the headline; the static table and its targets follow.
        self.assertLess(report.index("| system | varied GET req/s"), report.index("| system | req/s, 64 B"))
        self.assertIn("- **tunneld over websocket**: varied GET ", report)
        self.assertIn("| tunneld over websocket | varied GET req/s ÷ twisted.web proxy | ≥ 3 |", report)
        self.assertIn("| tunneld over grpc | peak RSS (edge + agent) under varied GET ÷ twisted.web proxy's "
                      "| ≤ 1.2 |", report)
        self.assertIn("| tunneld over websocket | static GET req/s ÷ pagekite |", report)
        self.assertIn("over a 0.05-minute soak", report)
        # Every system under test ran under the default policy (the runner checks each process).
        self.assertIn("CPU scheduling: the default policy for every system under test", report)
        self.assertNotIn("old", report)


class RecordingServer(protocol.Protocol):
    """Answers each request with a tiny 200 and records its bytes (closing when asked to)."""

    def __init__(self, record: bytearray) -> None:
        self.record = record
        self.buffer = b""
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionLost(self, reason: object = None) -> None:  # noqa: N802
        self.lost.callback(None)

    def close(self) -> defer.Deferred[None]:
        """Hang up (if wrk has not) and fire once the connection is gone."""
        if not self.lost.called:
            self.transport.loseConnection()
        return self.lost

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            self.record += head + b"\r\n\r\n" + rest[:length]
            self.buffer = rest[length:]
            close = b"\r\nconnection: close\r\n" in head.lower() + b"\r\n"
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                                 + (b"Connection: close\r\n" if close else b"") + b"\r\nok")
            if close:
                self.transport.loseConnection()
                return


class VariedScriptTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        if shutil.which("wrk") is None:
            raise self.skipTest("wrk is not installed (scripts/setup installs it)")
        sys.path.insert(0, BENCH)
        self.addCleanup(sys.path.remove, BENCH)

    async def wrk_requests(self, name: str) -> tuple[bytes, bytes]:
        """What wrk with bench/varied.lua sent over one connection in 1 s, and what the reference builds."""
        import workload

        record = bytearray()
        servers: list[RecordingServer] = []

        def serve() -> RecordingServer:
            servers.append(RecordingServer(record))
            return servers[-1]

        factory = protocol.Factory.forProtocol(serve)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        # wrk may exit before this side has read its connections' ends.
        self.addCleanup(lambda: defer.gatherResults([s.close() for s in servers]))
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        lua, data = workload.write_workload(directory, name, "bench.localhost")
        stdout, stderr, code = await getProcessOutputAndValue(
            "wrk", ["-t1", "-c1", "-d1s", "-s", os.path.join(BENCH, "varied.lua"),
                    f"http://127.0.0.1:{port.getHost().port}/", "--", lua],
            env=dict(os.environ), path=ROOT, reactor=reactor)
        self.assertEqual(code, 0, (stdout + stderr).decode(errors="replace"))
        self.assertIn(b"BENCH-JSON", stdout)
        generator = workload.RequestGenerator(workload.load_workload(data))
        generator.next_request()  # wrk calls request() once to check it, and never sends that one
        expected = bytearray()
        while len(expected) < len(record):
            expected += generator.next_request()[0]
        return bytes(record), bytes(expected[:len(record)])

    async def test_wrk_sends_the_reference_requests(self) -> None:
        """wrk with bench/varied.lua sends, byte for byte, what workload.RequestGenerator builds."""
        sent, expected = await self.wrk_requests("mixed")
        self.assertEqual(sent, expected)
        self.assertGreater(sent.count(b" HTTP/1.1\r\nHost: bench.localhost\r\n"), 100)
        # The requests vary: each its own trace id and cookie, several clients,
        # POSTs of several sizes, some closing their connection.
        traces = [line for line in sent.split(b"\r\n") if line.startswith(b"traceparent: ")]
        cookies = [line for line in sent.split(b"\r\n") if line.startswith(b"Cookie: ")]
        self.assertEqual(len(set(traces)), len(traces))
        self.assertEqual(len(set(cookies)), len(cookies))
        self.assertGreater(len({line for line in sent.split(b"\r\n") if line.startswith(b"User-Agent: ")}), 4)
        self.assertGreater(len({line for line in sent.split(b"\r\n") if line.startswith(b"Content-Length: ")}), 2)
        self.assertIn(b"Connection: close\r\n", sent)

    async def test_wrk_uploads_whole_bodies(self) -> None:
        """The 1 MiB POST workload's bodies reach the server whole (the upload row counts them)."""
        sent, expected = await self.wrk_requests("up1m")
        self.assertEqual(sent, expected)
        self.assertGreater(sent.count(b"Content-Length: 1048576\r\n"), 0)
