"""
Health on the reactor clock and over real sockets: heartbeat eviction moves
routing at once, agent caps refuse only the newcomer, upstream probes (TCP
and HTTP) and the Health reports that take an agent out of routing.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server

from tests.harness import listen_upstream
from tests.test_mux import Pair
from tunneld.agent.health import UpstreamProbe
from tunneld.config import EdgeConfig, LimitsSection
from tunneld.config.values import HealthCheck, parse_health_check
from tunneld.edge.sessions import AgentSessions
from tunneld.model.messages import GoAway, Health, Hello, TunnelSpec, Welcome
from tunneld.model.reasons import Reason
from tunneld.router import Route, Router

SPEC = TunnelSpec("app.test")


class SessionPolicyTests(SynchronousTestCase):
    """AgentSessions with FrameLink pairs on a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.router = Router()
        self.sessions = AgentSessions(
            EdgeConfig(limits=LimitsSection(max_agents=3, max_agents_per_tunnel=2)),
            self.router, self.clock,
        )

    def agent(self, name: str, *specs: TunnelSpec) -> Pair:
        pair = Pair(self.clock)
        pair.edge.peer = "127.0.0.1:1000"
        self.sessions.link_connected(pair.edge)
        pair.agent.send_control(Hello(agent_id=name, tunnels=specs or (SPEC,)))
        pair.pump()
        return pair

    def routed_to(self) -> str:
        route = self.router.route("app.test", "/")
        assert isinstance(route, Route), route
        return route.session.agent_id

    def test_heartbeat_timeout_evicts_and_routing_moves(self) -> None:
        """A silent agent is evicted when its heartbeat times out; new streams go to the other at once."""
        quiet, busy = self.agent("quiet"), self.agent("busy")
        self.assertEqual(len(self.sessions.sessions), 2)
        for _ in range(3):
            self.clock.advance(10)
            busy.pump()  # only the busy agent answers pings
        self.assertTrue(quiet.edge.closed)
        self.assertEqual([s.agent_id for s in self.sessions.sessions.values()], ["busy"])
        self.assertEqual({self.routed_to() for _ in range(20)}, {"busy"})

    def test_agents_per_tunnel_cap(self) -> None:
        """The third agent for a tunnel gets that tunnel refused with cap_reached; others keep it."""
        self.agent("a")
        self.agent("b")
        third = self.agent("c", SPEC, TunnelSpec("other.test"))
        welcome = third.agent_handler.controls[0]
        assert isinstance(welcome, Welcome)
        self.assertEqual([(r.tunnel, r.reason) for r in welcome.refused], [(SPEC, Reason.CAP_REACHED)])
        self.assertEqual(len(welcome.public_urls), 1)
        self.assertEqual(sorted(self.router.snapshot()["app.test"]), ["a", "b"])

    def test_total_agents_cap(self) -> None:
        """Past max_agents a newcomer's link is closed with cap_reached; the others stay."""
        pairs = [self.agent(name, TunnelSpec(f"{name}.test")) for name in "abc"]
        fourth = self.agent("d", TunnelSpec("d.test"))
        self.assertTrue(fourth.edge.closed)
        self.assertEqual(fourth.edge_wire.closed[0], Reason.CAP_REACHED)  # type: ignore[index]
        self.assertFalse(any(p.edge.closed for p in pairs))
        fourth.pump()
        pairs[0].edge.close(Reason.CANCELLED, "bye")
        self.assertFalse(self.agent("e", TunnelSpec("e.test")).edge.closed)

    def test_health_reports_steer_routing(self) -> None:
        """A tunnel reported unhealthy by one agent is routed to the others; back when healthy."""
        sick = self.agent("sick")
        self.agent("well")
        sick.agent.send_control(Health("app.test", False, "GET / answered 500"))
        sick.pump()
        self.assertEqual({self.routed_to() for _ in range(20)}, {"well"})
        sick.agent.send_control(Health("app.test", True, "ok"))
        sick.pump()
        self.assertEqual({self.routed_to() for _ in range(50)}, {"sick", "well"})

    def test_all_unhealthy_is_agent_unavailable(self) -> None:
        """With every agent unhealthy for a tunnel, requests get agent_unavailable."""
        pair = self.agent("only")
        pair.agent.send_control(Health("app.test", False, "down"))
        pair.pump()
        self.assertEqual(self.router.route("app.test", "/"), Reason.AGENT_UNAVAILABLE)

    def test_agent_goaway_stops_new_streams(self) -> None:
        """An agent that sends GoAway gets no new streams, keeps its link for the one in flight, and is closed once that ends."""
        leaving = self.agent("leaving")
        self.agent("staying")
        stream, _, remote, _ = leaving.open()
        leaving.agent.send_control(GoAway(Reason.CANCELLED, "agent stopping"))
        leaving.pump()
        self.clock.advance(1)
        self.assertFalse(leaving.edge.closed)
        self.assertEqual({self.routed_to() for _ in range(20)}, {"staying"})
        stream.end()
        remote.end()
        leaving.pump()
        self.clock.advance(1)
        self.assertTrue(leaving.edge.closed)
        self.assertEqual(leaving.edge_wire.closed[0], Reason.DRAINING)  # type: ignore[index]
        self.assertEqual([s.agent_id for s in self.sessions.sessions.values()], ["staying"])

    def test_draining_refuses_new_agents(self) -> None:
        """While the edge drains, a new agent is turned away with draining."""
        self.sessions.draining = True
        pair = self.agent("late")
        self.assertEqual(pair.edge_wire.closed[0], Reason.DRAINING)  # type: ignore[index]


class ParseTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """'', tcp, http:/path and http:/path:STATUS parse; anything else is an error."""
        self.assertIsNone(parse_health_check(""))
        self.assertEqual(parse_health_check("tcp"), HealthCheck("tcp"))
        self.assertEqual(parse_health_check("http:/healthz"), HealthCheck("http", "/healthz"))
        self.assertEqual(parse_health_check("http:/a:b:204"), HealthCheck("http", "/a:b", 204))
        for bad in ("udp", "http:healthz", "http:/x:999", "http:/a b"):
            self.assertRaises(ValueError, parse_health_check, bad)


class ProbeTests(TestCase):
    """Probes against real loopback services."""

    timeout = 10

    async def verdicts(self, upstream: str, check: HealthCheck) -> list[tuple[bool, str]]:
        seen: list[tuple[bool, str]] = []
        first: Deferred[None] = Deferred()

        def report(healthy: bool, detail: str) -> None:
            seen.append((healthy, detail))
            first.callback(None)

        probe = UpstreamProbe(reactor, upstream, "app.test", check, 30.0, 2.0, report)
        probe.start()
        self.addCleanup(probe.stop)
        await first
        return seen

    async def test_http_probe(self) -> None:
        """GET of a path that answers 200 is healthy; one that answers 404 is not."""
        port, _ = await listen_upstream(self)
        upstream = f"tcp:host=127.0.0.1:port={port}"
        good = await self.verdicts(upstream, HealthCheck("http", "/hello"))
        self.assertEqual(good, [(True, "GET /hello answered 200")])
        bad = await self.verdicts(upstream, HealthCheck("http", "/nope"))
        self.assertEqual(bad, [(False, "GET /nope answered 404")])
        wanted = await self.verdicts(upstream, HealthCheck("http", "/nope", 404))
        self.assertTrue(wanted[0][0])

    async def test_http_probe_takes_only_the_status(self) -> None:
        """A probe reads the status and hangs up: a body that never ends does not hold it."""
        port, upstream = await listen_upstream(self)
        verdict = await self.verdicts(f"tcp:host=127.0.0.1:port={port}", HealthCheck("http", "/stall"))
        self.assertEqual(verdict, [(True, "GET /stall answered 200")])
        finished = upstream.hanging[0].notifyFinish()
        with self.assertRaises((ConnectionDone, ConnectionLost)):
            await finished  # the probe's connection is gone, not the response finished

    async def test_http_probe_request(self) -> None:
        """The probe asks with the tunnel's Host and its own User-Agent, and follows no redirect."""
        seen: list[server.Request] = []

        class Moved(resource.Resource):
            isLeaf = True

            def render(self, request: server.Request) -> bytes:
                seen.append(request)
                request.redirect(b"/elsewhere")
                return b""

        port, _ = await listen_upstream(self, Moved())
        verdict = await self.verdicts(f"tcp:host=127.0.0.1:port={port}", HealthCheck("http", "/old"))
        self.assertEqual(verdict, [(True, "GET /old answered 302")])
        self.assertEqual(len(seen), 1)
        headers = seen[0].requestHeaders
        self.assertEqual(headers.getRawHeaders(b"host"), [b"app.test"])
        self.assertEqual(headers.getRawHeaders(b"user-agent"), [b"tunneld-agent-probe"])
        self.assertEqual(headers.getRawHeaders(b"connection"), [b"close"])

    async def test_http_probe_of_a_non_http_service(self) -> None:
        """An upstream that answers something other than HTTP is unhealthy, saying why."""

        class Garbage(protocol.Protocol):
            def dataReceived(self, data: bytes) -> None:  # noqa: N802
                self.transport.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
                self.transport.loseConnection()

        listening = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            protocol.Factory.forProtocol(Garbage)
        )
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port
        verdict = await self.verdicts(f"tcp:host=127.0.0.1:port={port}", HealthCheck("http", "/"))
        healthy, detail = verdict[0]
        self.assertFalse(healthy)
        self.assertTrue(detail.startswith("http probe failed: "), detail)
        self.assertIn("SSH-2.0", detail)

    async def test_tcp_probe(self) -> None:
        """A TCP probe is healthy while the upstream listens and unhealthy when nothing does."""
        port, _ = await listen_upstream(self)
        self.assertTrue((await self.verdicts(f"tcp:host=127.0.0.1:port={port}", HealthCheck("tcp")))[0][0])
        from twisted.internet.protocol import Factory, Protocol

        closed = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            Factory.forProtocol(Protocol)
        )
        dead = closed.getHost().port
        await closed.stopListening()
        verdict: Any = await self.verdicts(f"tcp:host=127.0.0.1:port={dead}", HealthCheck("tcp"))
        self.assertFalse(verdict[0][0])
        self.assertIn("refused", verdict[0][1])


class CodecTests(SynchronousTestCase):
    def test_health_round_trip(self) -> None:
        """A Health report survives the wire codec."""
        from tunneld.wire import codec

        report = Health("app.test/api", False, "GET / answered 503")
        frame = codec.decode(codec.encode_control(report).SerializeToString())
        self.assertEqual(codec.control_from(frame), report)
