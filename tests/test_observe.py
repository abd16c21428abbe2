"""
Observability of a running edge: metrics match the traffic, the admin API,
C{tunneld status}, draining one agent, the agent's console and JSON logs.
"""

from __future__ import annotations

import io
import json
import os
import sys
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import readBody
from twisted.web.http_headers import Headers

from tests.harness import TunnelHarness, listen_upstream, sleep
from tunneld.agent.service import AgentService
from tunneld.config import (
    AgentConfig,
    AgentSection,
    EdgeConfig,
    EdgeSection,
    TunnelSection,
)
from tunneld.edge.service import EdgeService
from tunneld.interfaces import EdgeRecord
from tunneld.model.reasons import Reason
from tunneld.observe.console import AgentActivity, ConsoleSummary, summary_line
from tunneld.observe.logging import JSONLinesObserver
from tunneld.observe.stats import EdgeStats
from tunneld.observe.systemd import Notifier, SystemdNotifyService
from tunneld.registry import transport_options
from tunneld.status import render

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOPBACK = "tcp:0:interface=127.0.0.1"
HELLO = b"hello from upstream"


class _Raw(protocol.Protocol):
    """Sends bytes, collects the answer until the server closes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.received = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.write(self.data)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += data

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        self.done.callback(self.received)


async def raw_request(port: int, data: bytes) -> bytes:
    proto = _Raw(data)
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
        protocol.Factory.forProtocol(lambda: proto)
    )
    return await proto.done


def admin_url(edge: EdgeService, path: str) -> bytes:
    assert edge.observe.admin is not None
    return f"http://127.0.0.1:{edge.observe.admin.address.port}{path}".encode()


async def get(harness: TunnelHarness, url: bytes, method: bytes = b"GET") -> tuple[int, bytes]:
    response = await harness.client.request(method, url, Headers())
    return response.code, await readBody(response)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, keyed by name and sorted labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


class MetricsAndAdminTests(TestCase):
    timeout = 60

    async def start(self) -> tuple[TunnelHarness, Any]:
        harness = TunnelHarness(self, "websocket", {"listen": LOOPBACK})
        await harness.start_edge()
        port, upstream = await listen_upstream(self)
        address = harness.link_address()
        await harness.start_agent(
            {"url": f"ws://127.0.0.1:{address.port}/tunnel"}, [("app.test", port)],
        )
        return harness, upstream

    async def test_metrics_match_scripted_traffic(self) -> None:
        """A scrape after a known mix of traffic and refusals shows exactly those counts."""
        harness, _ = await self.start()
        for _ in range(5):
            code, _, body = await harness.request("app.test", "/hello")
            self.assertEqual((code, body), (200, HELLO))
        for i in range(3):
            code, _, _ = await harness.request(f"nobody{i}.test", "/")
            self.assertEqual(code, 404)
        code, _, body = await harness.request("app.test", "/echo", b"POST", b"x" * 5000)
        self.assertEqual((code, len(body)), (200, 5000))
        code, _, body = await harness.request("app.test", "/bytes/100000")
        self.assertEqual((code, len(body)), (200, 100000))
        code, _, body = await harness.request("app.test", "/missing")
        self.assertEqual((code, body), (404, b"not found"))
        for _ in range(2):
            answer = await raw_request(
                harness.public_port, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"
            )
            self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer)

        assert harness.edge is not None
        code, text = await get(harness, admin_url(harness.edge, "/metrics"))
        self.assertEqual(code, 200)
        got = samples(text.decode())

        def value(name: str, **labels: str) -> float:
            return got.get((name, tuple(sorted(labels.items()))), 0.0)

        self.assertEqual(value("tunneld_http_responses_total", code="200"), 7)
        self.assertEqual(value("tunneld_http_responses_total", code="404"), 4)
        self.assertEqual(value("tunneld_http_responses_total", code="400"), 2)
        self.assertEqual(value("tunneld_refusals_total", kind="request", reason="no_tunnel"), 3)
        self.assertEqual(value("tunneld_refusals_total", kind="request", reason="bad_request"), 2)
        self.assertEqual(value("tunneld_refusals_total", kind="request", reason="rate_limited"), 0)
        self.assertEqual(value("tunneld_policy_hits_total", policy="cap"), 0)
        self.assertEqual(value("tunneld_stream_bytes_total", direction="in"), 5000)
        self.assertEqual(
            value("tunneld_stream_bytes_total", direction="out"),
            5 * len(HELLO) + 5000 + 100000 + len(b"not found"),
        )
        self.assertEqual(value("tunneld_streams_opened_total"), 8)
        self.assertEqual(value("tunneld_streams_active"), 0)
        self.assertEqual(value("tunneld_agent_sessions", transport="websocket"), 1)
        self.assertEqual(value("tunneld_agent_sessions_established_total", transport="websocket"), 1)
        self.assertEqual(value("tunneld_tunnels"), 1)
        self.assertEqual(value("tunneld_state_backend_up", backend="memory"), 1)
        self.assertIn(("tunneld_link_rtt_seconds_count", ()), got)

        code, text = await get(harness, admin_url(harness.edge, "/api/refusals"))
        refusals = json.loads(text)
        self.assertEqual(refusals["totals"]["request"], {"no_tunnel": 3, "bad_request": 2})
        self.assertEqual([r["reason"] for r in refusals["recent"]], ["bad_request"] * 2 + ["no_tunnel"] * 3)
        self.assertEqual(refusals["recent"][-1]["host"], "nobody0.test")

    async def test_health_and_readiness(self) -> None:
        """/healthz answers alive; /readyz is 200 with every listener bound, 503 when draining or one is not."""
        harness, _ = await self.start()
        assert harness.edge is not None
        code, body = await get(harness, admin_url(harness.edge, "/healthz"))
        self.assertEqual((code, json.loads(body)["status"]), (200, "alive"))
        code, body = await get(harness, admin_url(harness.edge, "/readyz"))
        self.assertEqual((code, json.loads(body)["ready"]), (200, True))
        harness.edge.policy.draining = True  # what SIGTERM's drain sets first
        code, body = await get(harness, admin_url(harness.edge, "/readyz"))
        self.assertEqual((code, json.loads(body)["problems"]), (503, ["draining"]))
        harness.edge.policy.draining = False
        await harness.edge.public[0].stopService()
        code, body = await get(harness, admin_url(harness.edge, "/readyz"))
        self.assertEqual((code, json.loads(body)["ready"]), (503, False))

    async def test_loopback_admin_refuses_other_host_names(self) -> None:
        """On loopback the admin API refuses a request for another name (DNS rebinding)."""
        harness, _ = await self.start()
        assert harness.edge is not None
        url = admin_url(harness.edge, "/api/agents")
        response = await harness.client.request(
            b"GET", url, Headers({b"host": [b"attacker.example:8090"]})
        )
        await readBody(response)
        self.assertEqual(response.code, 421)
        for name in (b"localhost:8090", b"127.0.0.1", b"[::1]:8090"):
            response = await harness.client.request(b"GET", url, Headers({b"host": [name]}))
            await readBody(response)
            self.assertEqual(response.code, 200, name)

    async def test_drain_one_agent_names_another_edge(self) -> None:
        """With another live edge in the registry, the admin drain's GoAway names it (reconnect_to) and the agent dials it."""
        harness, _ = await self.start()
        edge = harness.edge
        assert edge is not None
        # "Another edge" whose agent URL is this edge's own link: the agent can follow it here.
        url = f"ws://127.0.0.1:{harness.link_address().port}/tunnel"
        await edge.state.backend.register_edge(EdgeRecord("other/1", "other", agent_urls=(url,)), 60)
        await edge.membership.beat()
        (old,) = edge.sessions.sessions
        code, body = await get(harness, admin_url(edge, f"/api/agents/{old}/drain"), b"POST")
        self.assertEqual(code, 200)
        for _ in range(500):
            if old not in edge.sessions.sessions and edge.sessions.sessions:
                break
            await sleep(0.02)
        self.assertNotIn(old, edge.sessions.sessions)
        self.assertEqual(harness.agents[0].redirect, url)
        code, _, body = await harness.request("app.test", "/hello")
        self.assertEqual((code, body), (200, HELLO))

    async def test_drain_one_agent(self) -> None:
        """POST drain sends GOAWAY: the session takes no new streams, closes (it has none in flight) and the agent reconnects."""
        harness, _ = await self.start()
        edge = harness.edge
        assert edge is not None
        (old,) = edge.sessions.sessions
        code, body = await get(harness, admin_url(edge, f"/api/agents/{old}/drain"), b"POST")
        self.assertEqual((code, json.loads(body)["draining"]), (200, True))
        for _ in range(500):
            if old not in edge.sessions.sessions and edge.sessions.sessions:
                break
            await sleep(0.02)
        self.assertNotIn(old, edge.sessions.sessions)
        code, _, body = await harness.request("app.test", "/hello")
        self.assertEqual((code, body), (200, HELLO))
        code, body = await get(harness, admin_url(edge, "/api/agents/nonesuch/drain"), b"POST")
        self.assertEqual(code, 404)
        code, body = await get(harness, admin_url(edge, "/api/tunnels"))
        usable = [s for t in json.loads(body)["tunnels"] for s in t["sessions"] if s["usable"]]
        self.assertEqual(len(usable), 1)
        self.assertNotEqual(usable[0]["session"], old)

    async def test_status_shows_two_agents_with_transports(self) -> None:
        """tunneld status against an edge with a websocket and a grpc agent lists both."""
        section = EdgeSection(
            public_listen=[LOOPBACK], transports=["websocket", "grpc"],
            public_url="http://{host}/", admin_listen=LOOPBACK,
        )
        config = EdgeConfig(
            section, [], {"websocket": {"listen": LOOPBACK}, "grpc": {"listen": LOOPBACK}}, "(test)"
        )
        edge = EdgeService(
            config, transport_options(section.transports, config.transports, "(test)", edge=True),
            reactor,
        )
        edge.startService()
        self.addCleanup(edge.stopService)
        await defer.gatherResults([ls.listening for ls in edge.observe._all_listeners()])
        port, _ = await listen_upstream(self)
        ws = edge.transports["websocket"].address.port
        grpc = edge.transports["grpc"].address.port
        for agent_id, name, table, host in [
            ("ws-agent", "websocket", {"url": f"ws://127.0.0.1:{ws}/tunnel"}, "a.test"),
            ("grpc-agent", "grpc", {"address": f"127.0.0.1:{grpc}"}, "b.test"),
        ]:
            agent_section = AgentSection(id=agent_id, transports=[name])
            agent_config = AgentConfig(
                agent_section, [TunnelSection(hostname=host, upstream=f"tcp:host=127.0.0.1:port={port}")],
                {name: table}, "(test)",
            )
            agent = AgentService(
                agent_config,
                transport_options([name], agent_config.transports, "(test)", edge=False), reactor,
            )
            agent.startService()
            self.addCleanup(agent.stopService)
            await agent.ready
        assert edge.observe.admin is not None
        admin = f"http://127.0.0.1:{edge.observe.admin.address.port}"
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "tunneld.cli", "status", "--admin", admin],
            env=dict(os.environ, PYTHONPATH=ROOT), path=ROOT,
        )
        self.assertEqual(code, 0, err)
        text = out.decode()
        rows = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
        self.assertEqual(rows["ws-agent"][2], "websocket")
        self.assertEqual(rows["grpc-agent"][2], "grpc")
        # The cluster of the default (memory) edge: itself, with both agents.
        self.assertIn("cluster (memory state, reachable): 1 edge(s)", text)
        self.assertIn("a.test", rows)
        self.assertIn("b.test", rows)
        self.assertIn("edge: ready, 2 agent session(s), 2 tunnel(s)", text)


class AgentConsoleTests(TestCase):
    timeout = 60

    async def test_counts_requests_and_bytes(self) -> None:
        """The console's activity counts the agent's streams and body bytes both ways."""
        harness = TunnelHarness(self, "websocket", {"listen": LOOPBACK})
        await harness.start_edge()
        port, _ = await listen_upstream(self)
        address = harness.link_address()
        agent = await harness.start_agent(
            {"url": f"ws://127.0.0.1:{address.port}/tunnel"}, [("app.test", port)],
        )
        activity = AgentActivity()
        agent.stream_hook = activity.wrap
        await harness.request("app.test", "/hello")
        await harness.request("app.test", "/echo", b"POST", b"y" * 1234)
        self.assertEqual((activity.requests, activity.active), (2, 0))
        self.assertEqual((activity.bytes_in, activity.bytes_out), (1234, len(HELLO) + 1234))
        line = summary_line(agent, activity)
        self.assertEqual(line, "link up over websocket | 2 req, 0 open | in 1.2kB out 1.3kB")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class ConsoleSummaryTests(SynchronousTestCase):
    def test_only_on_a_terminal(self) -> None:
        """The summary is drawn every interval on a TTY, and not at all otherwise."""
        clock = Clock()

        class _Agent:
            link = None

        tty, plain = _Tty(), io.StringIO()
        on = ConsoleSummary(clock, _Agent(), AgentActivity(), out=tty)
        off = ConsoleSummary(clock, _Agent(), AgentActivity(), out=plain)
        on.startService()
        off.startService()
        clock.advance(1)
        on.stopService()
        off.stopService()
        self.assertEqual(plain.getvalue(), "")
        self.assertEqual(tty.getvalue().count("connecting to the edge | 0 req"), 2)
        self.assertTrue(tty.getvalue().endswith("\x1b[K\n"))


class _Notifier(Notifier):
    def __init__(self, watchdog: float | None = None) -> None:
        super().__init__({})
        self.watchdog_interval = watchdog
        self.sent: list[tuple[str, ...]] = []

    def notify(self, *assignments: str) -> None:
        self.sent.append(assignments)


class NotifyServiceTests(SynchronousTestCase):
    def test_ready_after_every_listener(self) -> None:
        """READY=1 waits for the last listener; STOPPING=1 is the first thing on stop."""
        a: defer.Deferred[None] = defer.Deferred()
        b: defer.Deferred[None] = defer.Deferred()
        notifier = _Notifier()
        service = SystemdNotifyService(Clock(), lambda: [a, b], lambda: "up", notifier)
        service.startService()
        a.callback(None)
        self.assertEqual(notifier.sent, [])
        b.callback(None)
        self.assertEqual(notifier.sent[0][:2], ("READY=1", "STATUS=up"))
        service.stopService()
        self.assertEqual(notifier.sent[1][0], "STOPPING=1")

    def test_watchdog(self) -> None:
        """WATCHDOG=1 goes out every half WATCHDOG_USEC while running, and stops with the service."""
        clock = Clock()
        notifier = _Notifier(watchdog=5.0)
        service = SystemdNotifyService(clock, lambda: [], notifier=notifier)
        service.startService()
        clock.advance(5)
        clock.advance(5)
        service.stopService()
        clock.advance(20)
        self.assertEqual([m for m in notifier.sent if m == ("WATCHDOG=1",)], [("WATCHDOG=1",)] * 2)

    def test_environment(self) -> None:
        """NOTIFY_SOCKET paths and abstract names, and WATCHDOG_USEC/2, are read from the environment."""
        self.assertEqual(Notifier({"NOTIFY_SOCKET": "@sd/notify"}).address, b"\0sd/notify")
        self.assertEqual(Notifier({"NOTIFY_SOCKET": "/run/n"}).address, "/run/n")
        self.assertFalse(Notifier({}).enabled)
        self.assertEqual(Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval, 15.0)
        other_pid = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}
        self.assertIsNone(Notifier(other_pid).watchdog_interval)


class JSONLogTests(SynchronousTestCase):
    def test_one_json_object_per_line(self) -> None:
        """The JSON observer writes each event as one flat line: level, format, text, fields."""
        out = io.StringIO()
        log = Logger(observer=JSONLinesObserver(out), namespace="tunneld.test")
        log.info("refused {host}: {reason}", host="x.test", reason="no_tunnel", event="tunneld.x")
        log.warn("odd {thing}", thing=object())
        try:
            raise ZeroDivisionError("on purpose")
        except ZeroDivisionError:
            log.failure("broke")
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 3)
        first = json.loads(lines[0])
        self.assertEqual(
            {k: v for k, v in first.items() if k != "time"},
            {"level": "info", "namespace": "tunneld.test", "format": "refused {host}: {reason}",
             "text": "refused x.test: no_tunnel", "host": "x.test", "reason": "no_tunnel",
             "event": "tunneld.x"},
        )
        self.assertIsInstance(first["time"], float)
        second = json.loads(lines[1])
        self.assertEqual(second["level"], "warn")
        self.assertTrue(second["thing"].startswith("<object object"))
        self.assertIn("ZeroDivisionError", json.loads(lines[2])["traceback"])


class StatusRenderTests(SynchronousTestCase):
    def test_render(self) -> None:
        """The status tables line up and show RTT, state and recent refusals."""
        stats = EdgeStats()
        stats.refused(Reason.NO_TUNNEL, host="n.test", peer="127.0.0.1:1")
        agents = [{
            "agent": "a", "session": "0123456789abcdef", "transport": "grpc", "peer": "127.0.0.1:9",
            "rtt_ms": 1.25, "streams": 3, "healthy": True, "draining": True, "tunnels": ["a.test"],
            "connected_seconds": 1.0,
        }]
        tunnels = [{"tunnel": "a.test", "sessions": [{"agent": "a", "transport": "grpc"}]}]
        text = render(agents, tunnels, {"recent": list(stats.recent_refusals)}, True)
        self.assertIn("a      0123456789ab  grpc       127.0.0.1:9  1.2ms  3        draining  a.test", text)
        self.assertIn("a.test  a (grpc)", text)
        self.assertIn("request  no_tunnel  n.test", text)


class StatusCommandErrorTests(TestCase):
    """C{tunneld status} says why it cannot read an admin API, and exits 1."""

    async def status(self, admin: str) -> tuple[str, str, int]:
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "tunneld.cli", "status", "--admin", admin],
            env=dict(os.environ, PYTHONPATH=ROOT), path=ROOT,
        )
        return out.decode(), err.decode(), code

    async def test_nothing_listening(self) -> None:
        """An admin address nobody listens on: the connection's own reason, no traceback."""
        listening = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        port = listening.getHost().port
        await listening.stopListening()
        out, err, code = await self.status(f"127.0.0.1:{port}")
        self.assertEqual((out, code), ("", 1))
        self.assertIn(f"cannot read the admin API at http://127.0.0.1:{port}: ", err)
        self.assertIn("refused", err)
        self.assertNotIn("Traceback", err)

    async def test_not_the_admin_api(self) -> None:
        """An HTTP server that is not tunneld's admin API: the path and status it answered."""
        port, _ = await listen_upstream(self)
        out, err, code = await self.status(f"http://127.0.0.1:{port}")
        self.assertEqual((out, code), ("", 1))
        self.assertIn("/api/agents answered 404", err)
