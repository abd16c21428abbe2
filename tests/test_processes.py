"""
The edge and the agent as a user runs them: separate twistd processes started
from the shipped etc/ configs (ports changed to 0), then killed.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.error import ProcessExitedAlready
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseDone

from tests.harness import TunnelHarness, listen_upstream, sleep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1024 * 1024
# twistd as a command, run by this Python with the checkout on its path.
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class TwistdProcess(protocol.ProcessProtocol):
    """A twistd child whose log lines the test can wait for."""

    def __init__(self) -> None:
        self.output = ""
        self.process: Any = None
        self.ended: defer.Deferred[Any] = defer.Deferred()
        self._waiters: list[tuple[re.Pattern[str], defer.Deferred[re.Match[str]]]] = []

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self.output += data.decode(errors="replace")
        for pattern, d in list(self._waiters):
            match = pattern.search(self.output)
            if match:
                self._waiters.remove((pattern, d))
                d.callback(match)

    errReceived = outReceived  # noqa: N815

    def wait_for(self, regex: str) -> defer.Deferred[re.Match[str]]:
        pattern = re.compile(regex)
        d: defer.Deferred[re.Match[str]] = defer.Deferred()
        match = pattern.search(self.output)
        if match:
            d.callback(match)
        else:
            self._waiters.append((pattern, d))
        return d

    def processEnded(self, reason: Any) -> None:  # noqa: N802
        for _, d in self._waiters:
            if not d.called:  # a wait the test gave up on (timeout, cancel) is already called
                d.errback(AssertionError(f"process ended before the expected line:\n{self.output}"))
        self._waiters = []
        self.end_reason = reason
        self.ended.callback(None)


def spawn(
    case: TestCase, argv: list[str], env: dict[str, str | None] | None = None,
    path: str = ROOT, child_fds: dict[int, Any] | None = None,
) -> TwistdProcess:
    """
    C{argv} as a child whose output the test can wait for, with the checkout
    on its path and C{env} on top of this environment (C{None} removes a
    variable); killed at the end of the test if it is still running.
    """
    proto = TwistdProcess()
    full_env = dict(os.environ, PYTHONPATH=ROOT)
    for name, value in (env or {}).items():
        if value is None:
            full_env.pop(name, None)
        else:
            full_env[name] = value
    extra = {"childFDs": child_fds} if child_fds is not None else {}
    proto.process = reactor.spawnProcess(proto, argv[0], argv, env=full_env, path=path, **extra)

    def stop() -> Any:
        if proto.ended.called:
            return None
        try:
            proto.process.signalProcess("KILL")
        except ProcessExitedAlready:
            pass  # exited; its end is on its way
        return proto.ended

    case.addCleanup(stop)
    return proto


class ProcessTests(TestCase):
    timeout = 120

    def spawn(self, plugin: str, config: str) -> TwistdProcess:
        return spawn(self, [*TWISTD, "--nodaemon", "--pidfile=", plugin, "--config", config])

    def shipped(self, name: str, replacements: dict[str, str]) -> str:
        with open(os.path.join(ROOT, "etc", name)) as f:
            text = f.read()
        for old, new in replacements.items():
            self.assertIn(old, text)
            text = text.replace(old, new)
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        return path

    async def start(self, extra: dict[str, str] | None = None) -> tuple[TwistdProcess, TwistdProcess, int]:
        """Edge and agent from etc/, with C{extra} replacements in both files."""
        extra = extra or {}
        upstream_port, _ = await listen_upstream(self)
        edge = self.spawn("tunneld", self.shipped("tunneld.toml", {
            **extra,
            'public_listen = ["tcp:8080:interface=127.0.0.1"]':
                'public_listen = ["tcp:0:interface=127.0.0.1"]',
            'listen = "tcp:8081:interface=127.0.0.1"': 'listen = "tcp:0:interface=127.0.0.1"',
            'admin_listen = "tcp:8090:interface=127.0.0.1"':
                'admin_listen = "tcp:0:interface=127.0.0.1"',
        }))
        public = await edge.wait_for(r"public HTTP listening on 127\.0\.0\.1:(\d+)")
        link = await edge.wait_for(r"websocket agent link listening on 127\.0\.0\.1:(\d+)")
        agent = self.spawn("tunneld-agent", self.shipped("agent.toml", {
            **extra,
            'url = "ws://127.0.0.1:8081/tunnel"': f'url = "ws://127.0.0.1:{link.group(1)}/tunnel"',
            'upstream = "tcp:host=127.0.0.1:port=8000"':
                f'upstream = "tcp:host=127.0.0.1:port={upstream_port}"',
        }))
        await agent.wait_for(r"tunnel ready: http://demo\.localhost:8080/")
        return edge, agent, int(public.group(1))

    def harness(self, public_port: int) -> TunnelHarness:
        harness = TunnelHarness(self, "websocket", {})
        harness.url = lambda path: f"http://127.0.0.1:{public_port}{path}".encode()  # type: ignore[method-assign]
        return harness

    async def test_twistd_edge_and_agent(self) -> None:
        """twistd tunneld and twistd tunneld-agent from etc/ carry a request end to end."""
        edge, agent, public_port = await self.start()
        harness = self.harness(public_port)
        code, _, body = await harness.request("demo.localhost", "/hello")
        self.assertEqual((code, body), (200, b"hello from upstream"))
        code, headers, _ = await harness.request("unknown.localhost", "/")
        self.assertEqual(code, 404)
        self.assertIn("agent demo registered demo.localhost over websocket", edge.output)

    async def test_batch_scheduling(self) -> None:
        """With cpu_scheduling = "batch", both daemons run under SCHED_BATCH and carry requests."""
        if not hasattr(os, "SCHED_BATCH"):
            raise self.skipTest("no SCHED_BATCH on this platform")
        edge, agent, public_port = await self.start(
            {'cpu_scheduling = "default"': 'cpu_scheduling = "batch"'}
        )
        for daemon in (edge, agent):
            await daemon.wait_for(r"CPU scheduling policy: SCHED_BATCH")
            pid = daemon.process.pid  # type: ignore[attr-defined]
            self.assertEqual(os.sched_getscheduler(pid), os.SCHED_BATCH)
        harness = self.harness(public_port)
        code, _, body = await harness.request("demo.localhost", "/hello")
        self.assertEqual((code, body), (200, b"hello from upstream"))

    async def test_agent_killed_mid_response(self) -> None:
        """SIGKILL of the agent mid-download cuts the client off and the edge logs agent_gone."""
        edge, agent, public_port = await self.start()
        harness = self.harness(public_port)
        response, body = await harness.stream("demo.localhost", f"/bytes/{500 * MB}")
        await body.first
        agent.process.signalProcess(signal.SIGKILL)  # type: ignore[attr-defined]
        reason = await body.done
        self.assertIsNone(reason.check(ResponseDone))
        self.assertLess(body.size, 500 * MB)
        await edge.wait_for(r"agent link from .* down \(agent_gone")
        await sleep(0.2)
        code, headers, _ = await harness.request("demo.localhost", "/hello")
        self.assertEqual(code, 503)
        self.assertEqual(headers.getRawHeaders(b"tunnel-error"), [b"agent_unavailable"])
        # The edge keeps serving: it is still alive and answering.
        self.assertFalse(edge.ended.called)
