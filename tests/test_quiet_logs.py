"""
The log a person reads at start-up: each listener said once, with its role
and address; nothing about Twisted's internals (C{Starting factory <... at
0x...>}, C{PublicHTTPFactory starting on 8080}); an agent that has not reached
the edge yet says it cannot connect, not that its link is down.
"""

from __future__ import annotations

import io
import json
import socket
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger, formatEvent
from twisted.python import context, log
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.end_to_end import EventCollector
from tests.harness import TunnelHarness, listen_upstream, sleep
from tunneld.observe.console import AgentActivity, summary_line
from tunneld.observe.logging import JSONLinesObserver

NOISE = ("Starting factory", "Stopping factory", " starting on ")


def free_port() -> int:
    """A loopback port nothing listens on (bound, noted, closed)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    sock.close()
    return port


class StartupLogTests(TestCase):
    timeout = 60

    async def test_edge_and_agents_start_quietly(self) -> None:
        """An edge with every listener kind and agents over websocket and grpc: no Twisted lines, each listener once."""
        upstream_port, _ = await listen_upstream(self)
        events = EventCollector(self)
        websocket = TunnelHarness(self, "websocket", {"listen": "tcp:0:interface=127.0.0.1"})
        await websocket.start_edge(
            public_h2c_listen=["tcp:0:interface=127.0.0.1"],
            health_listen="tcp:0:interface=127.0.0.1",
        )
        await websocket.start_agent(
            {"url": f"ws://127.0.0.1:{websocket.link_address().port}/tunnel"},
            [("ws.test", upstream_port)],
        )
        grpc = TunnelHarness(self, "grpc", {"listen": "tcp:0:interface=127.0.0.1"})
        await grpc.start_edge()
        await grpc.start_agent(
            {"address": f"127.0.0.1:{grpc.link_address().port}"}, [("grpc.test", upstream_port)]
        )
        texts = [formatEvent(e) for e in events.events]
        self.assertEqual([t for t in texts if any(n in t for n in NOISE)], [])
        listening = sorted(t for t in texts if " listening on " in t)
        roles = [t.split(" listening on ")[0] for t in listening]
        self.assertEqual(roles, sorted([
            "admin API", "admin API", "grpc agent link", "health probes", "public HTTP",
            "public HTTP", "public HTTP/2 (h2c)", "websocket agent link",
        ]))
        for text in listening:
            self.assertRegex(text, r" listening on 127\.0\.0\.1:\d+$")

    async def test_first_dial_failure_is_not_a_link_down(self) -> None:
        """An agent whose edge is not up yet says it cannot connect and retries; no "link down"."""
        events = EventCollector(self)
        harness = TunnelHarness(self, "websocket", {})
        upstream_port, _ = await listen_upstream(self)
        agent = await harness.start_agent(
            {"url": f"ws://127.0.0.1:{free_port()}/tunnel"}, [("a.test", upstream_port)],
            wait=False, reconnect_initial=0.05, reconnect_max=0.1,
        )
        cannot = "cannot connect to the edge ({why}); retrying in {delay:.1f}s"
        down = "link down ({why}); reconnecting in {delay:.1f}s"
        while len(events.matching(cannot)) + len(events.matching(down)) < 2:
            await sleep(0.05)
        self.assertEqual(events.matching(down), [])
        self.assertIn("Connection refused", events.matching(cannot)[0]["why"])
        self.assertFalse(agent.ready.called)
        self.assertTrue(summary_line(agent, AgentActivity()).startswith("connecting to the edge |"))


class QuietEventTests(SynchronousTestCase):
    def test_json_lines_skip_events_without_text(self) -> None:
        """The JSON observer, like Twisted's text one, writes nothing for an event with no text."""
        out = io.StringIO()
        observer = JSONLinesObserver(out)
        observer({"log_format": "", "log_level": None, "log_namespace": "log_legacy"})
        Logger(observer=observer).info("kept {x}", x=1)
        (line,) = out.getvalue().splitlines()
        self.assertEqual(json.loads(line)["text"], "kept 1")

    def test_quiet_context_blanks_legacy_port_lines(self) -> None:
        """Inside the listeners' quiet context a legacy log.msg renders as no text at all."""
        seen: list[dict[str, Any]] = []
        log.addObserver(seen.append)
        self.addCleanup(log.removeObserver, seen.append)
        context.call({log.ILogContext: {"log_format": ""}}, log.msg, "Factory starting on 8080")
        self.assertEqual([formatEvent(e) for e in seen], [""])


class SummaryLineTests(SynchronousTestCase):
    def test_states(self) -> None:
        """The console line says connecting until the first welcome, then up, then down."""

        class _Link:
            transport_name = "grpc"

        class _Agent:
            link: Any = None
            ready: defer.Deferred[None] = defer.Deferred()

        agent = _Agent()
        activity = AgentActivity()
        self.assertTrue(summary_line(agent, activity).startswith("connecting to the edge | 0 req"))
        agent.link = _Link()
        self.assertTrue(summary_line(agent, activity).startswith("connecting to the edge | 0 req"))
        agent.ready.callback(None)
        self.assertTrue(summary_line(agent, activity).startswith("link up over grpc | 0 req"))
        agent.link = None
        self.assertTrue(summary_line(agent, activity).startswith("link down, reconnecting | 0 req"))
