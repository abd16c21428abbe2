"""
Tests for L{tunneld.edge.gateway}: one admission path for every public
protocol.

The refusal table runs the same refusals over HTTP/1.1, HTTP/2 (cleartext,
prior knowledge) and, where they apply, TCP tunnels, against a real edge, a
real agent (WebSocket link) and real upstreams on loopback port 0, and
checks that each protocol says the same thing: the status and
C{Tunnel-Error} (a TCP reset for TCP), the log event and its reason, and
the metric label (in L{EdgeStats} and in the Prometheus scrape).

The late-decision tests make the gateway's admission (and, for a tunnel
held elsewhere, its routing) answer later, as a cluster-wide token bucket
in Redis or another edge's registry would: every protocol then holds the
request, body included, until the answer, and lets go of everything when
its client leaves first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from h2.errors import ErrorCodes
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from tests.end_to_end import TCP_PORTS, EventCollector
from tests.harness import TunnelHarness, eventually, listen_upstream
from tests.tcp_peers import EchoUpstream, connect_tcp, listen_tcp_upstream
from tests.test_http1 import FakeLink, FakeRoute, FakeRouter
from tests.test_observe import admin_url, get, samples
from tests.test_public_strict import H2Request, parse_responses
from tunneld.config import AgentGrant, LimitsSection, TunnelLimits, TunnelSection
from tunneld.edge.gateway import (
    BAD_REQUEST,
    REFUSED,
    REFUSED_BY_STREAM,
    EdgeGateway,
    Refusal,
)
from tunneld.edge.service import EdgeService
from tunneld.interfaces import IStream, IStreamReceiver
from tunneld.model.reasons import Reason
from tunneld.policy.gate import PublicPolicy, Refused

# The gateway's events: what a refusal is logged as.
_EVENTS = (REFUSED, REFUSED_BY_STREAM, BAD_REQUEST)
TOKEN = "gateway-test"


@dataclass(frozen=True)
class Seen:
    """What a public client saw of one refused attempt, and what the edge said about it."""

    status: int | None  # None: no HTTP answer (a TCP reset, an HTTP/2 GOAWAY)
    tunnel_error: bytes | None
    event: tuple[str, str | None] | None  # (format, reason field) of the gateway's event
    counted: dict[str, int]  # refusals by reason label, added by this attempt
    closed: bool  # the connection took no further request (closed, GOAWAY, reset)
    goaway: int | None = None  # the HTTP/2 GOAWAY's error code


class _Reader(protocol.Protocol):
    """Writes a request, keeps what comes back, fires once a whole response is in or the edge closed."""

    def __init__(self, data: bytes) -> None:
        self.request = data
        self.data = b""
        self.answered: defer.Deferred[None] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.data += data
        if parse_responses(self.data, partial=True) and not self.answered.called:
            self.answered.callback(None)

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        if not self.answered.called:
            self.answered.callback(None)
        self.lost.callback(None)


class _Edge:
    """
    An edge with HTTP/1.1, h2c and TCP tunnel listeners; one agent serving
    every tunnel of the table but C{db-off} (another agent's, whose session
    is then taken out of service) and C{offline.test} (granted, never served).
    """

    HTTP = ("app.test", "limited.test", "capped.test", "down.test")
    TCP = ("db-limited", "db-capped")

    def __init__(self, case: TestCase) -> None:
        self.case = case
        self.log = EventCollector(case)
        self.harness = TunnelHarness(case, "websocket", {"listen": "tcp:0:interface=127.0.0.1"})
        self.held: list[Any] = []

    async def start(self) -> None:
        once = TunnelLimits(rate=0.001, burst=1)  # one request, then nothing for 1000 s
        single = TunnelLimits(max_streams=1)
        limits = LimitsSection(tunnels={
            "limited.test": once, "capped.test": single, "db-limited": once, "db-capped": single,
        })
        grants = [
            AgentGrant("agent", TOKEN, [*self.HTTP, *self.TCP]),
            AgentGrant("absent", TOKEN, ["offline.test"]),
            AgentGrant("tcp-off", TOKEN, ["db-off"]),
        ]
        edge = await self.harness.start_edge(
            grants, limits, public_h2c_listen=["tcp:0:interface=127.0.0.1"], tcp_ports=TCP_PORTS,
        )
        self.edge: EdgeService = edge
        self.h2c_port = edge.public_h2c[0].address.port
        web, self.upstream = await listen_upstream(self.case)
        echo, _ = await listen_tcp_upstream(self.case, EchoUpstream)
        tunnels: list[tuple[str, int] | TunnelSection] = [
            ("app.test", web), ("limited.test", web), ("capped.test", web),
            ("down.test", 1),  # nothing listens there: upstream_refused
        ]
        tunnels += [
            TunnelSection(hostname=name, upstream=f"tcp:host=127.0.0.1:port={echo}", protocol="tcp")
            for name in self.TCP
        ]
        table = {"url": f"ws://127.0.0.1:{self.harness.link_address().port}/tunnel"}
        agent = await self.harness.start_agent(table, tunnels, agent_id="agent", token=TOKEN)
        off = await self.harness.start_agent(
            table,
            [TunnelSection(hostname="db-off", upstream=f"tcp:host=127.0.0.1:port={echo}", protocol="tcp")],
            agent_id="tcp-off", token=TOKEN,
        )
        self.ports: dict[str | None, int] = {}
        for service in (agent, off):
            for url in service.public_urls:
                if url.startswith("tcp://"):
                    port = int(url.rsplit(":", 1)[1])
                    self.ports[edge.router.port_owner(port)] = port
        # The only session serving db-off is out of service (its upstream probe
        # failed).  (Were it draining, the router would say draining instead:
        # a tunnel whose every session is draining has its agents moving.)
        for session in edge.sessions.sessions.values():
            if session.agent_id == "tcp-off":
                session.healthy = False

    # -- one attempt per protocol ----------------------------------------------

    def _mark(self) -> tuple[int, dict[tuple[str, str], int]]:
        return len(self.log.events), dict(self.edge.stats.refusals)

    def _seen(
        self, mark: tuple[int, dict[tuple[str, str], int]], status: int | None,
        tunnel_error: bytes | None, closed: bool, goaway: int | None = None,
    ) -> Seen:
        start, before = mark
        events = [e for e in self.log.events[start:] if e.get("log_format") in _EVENTS]
        event = (events[0]["log_format"], events[0].get("reason")) if events else None
        after = self.edge.stats.refusals
        counted = {
            reason: after[key] - before.get(key, 0)
            for key in after if (reason := key[1]) and key[0] == "request"
            and after[key] != before.get(key, 0)
        }
        return Seen(status, tunnel_error, event, counted, closed, goaway)

    async def http1(self, data: bytes) -> Seen:
        """One raw HTTP/1.1 request on a fresh connection."""
        mark = self._mark()
        reader = _Reader(data)
        await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.harness.public_port), reader
        )
        await reader.answered
        responses = parse_responses(reader.data, partial=True)
        closed = reader.lost.called or (
            bool(responses) and responses[0].header(b"connection") == [b"close"]
        )
        reader.transport.loseConnection()  # type: ignore[union-attr]
        await reader.lost
        if not responses:
            return self._seen(mark, None, None, True)
        [tunnel_error] = responses[0].header(b"tunnel-error") or [None]
        return self._seen(mark, responses[0].status, tunnel_error, closed)

    async def h2(self, headers: list[tuple[bytes, bytes]], closes: bool = False) -> Seen:
        """
        One HTTP/2 request (prior knowledge) on a fresh connection; with
        C{closes}, the edge is expected to end the connection (GOAWAY, close).
        """
        mark = self._mark()
        client = H2Request(headers)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.h2c_port), client)
        try:
            await client.done
        except Exception:
            pass  # the edge closed the connection: client.goaway says how
        if not closes:
            client.transport.loseConnection()  # type: ignore[union-attr]
        await client.closed
        return self._seen(
            mark, client.status or None, client.headers.get(b"tunnel-error"),
            client.goaway is not None, client.goaway,
        )

    async def tcp(self, name: str) -> Seen:
        """One connection to the TCP tunnel C{name}; a refusal is a reset."""
        mark = self._mark()
        client = await connect_tcp(self.case, self.ports[name])
        await client.lost
        self.case.assertTrue(client.was_reset(), client.reason)
        return self._seen(mark, None, None, True)

    async def hold_tcp(self, name: str) -> None:
        """A TCP connection that stays open (and is served: its echo comes back)."""
        client = await connect_tcp(self.case, self.ports[name])
        client.transport.write(b"held")  # type: ignore[union-attr]
        await client.wait_for(b"held")
        self.held.append(client)


def h1(method: str, target: str, *fields: str, version: str = "HTTP/1.1") -> bytes:
    return ("\r\n".join([f"{method} {target} {version}", *fields]) + "\r\n\r\n").encode()


def h2(authority: bytes | None, path: bytes = b"/hello", method: bytes = b"GET") -> list[tuple[bytes, bytes]]:
    headers = [(b":method", method)]
    if method != b"CONNECT":
        headers += [(b":scheme", b"http"), (b":path", path)]
    if authority is not None:
        headers.append((b":authority", authority))
    return headers


class RefusalTableTests(TestCase):
    """The same refusal reads the same on every public protocol."""

    timeout = 120

    def assertSame(  # noqa: N802
        self, row: str, seen: dict[str, Seen], reason: Reason, status: int | None,
        event: str, closes: bool = False,
    ) -> None:
        """Every protocol of a row: the status, Tunnel-Error, event and metric the row expects."""
        for name, one in seen.items():
            where = f"{row} over {name}: {one}"
            expected_status = None if name == "tcp" else status
            self.assertEqual(one.status, expected_status, where)
            self.assertEqual(
                one.tunnel_error, None if expected_status is None else reason.value.encode(), where
            )
            self.assertEqual(one.event, (event, None if event == BAD_REQUEST else reason.value), where)
            self.assertEqual(one.counted, {reason.value: 1}, where)
            if closes:
                self.assertTrue(one.closed, where)
                if name == "h2":
                    self.assertEqual(one.goaway, ErrorCodes.NO_ERROR, where)

    def assertBroken(self, row: str, seen: dict[str, Seen]) -> None:  # noqa: N802
        """A client broke its protocol: 400 (HTTP/1.1) or GOAWAY (HTTP/2), the same event and metric."""
        http1, http2 = seen["http/1.1"], seen["h2"]
        self.assertEqual((http1.status, http1.tunnel_error, http1.closed), (400, b"bad_request", True), row)
        self.assertEqual((http2.status, http2.goaway), (None, ErrorCodes.PROTOCOL_ERROR), row)
        for name, one in seen.items():
            self.assertEqual(one.event, (BAD_REQUEST, None), f"{row} over {name}")
            self.assertEqual(one.counted, {"bad_request": 1}, f"{row} over {name}")

    async def test_refusal_table(self) -> None:
        """no_tunnel, agent_unavailable, bad hosts, CONNECT, malformed, rate_limited, cap_reached, draining, upstream_refused: alike over HTTP/1.1, HTTP/2 and TCP."""
        edge = _Edge(self)
        await edge.start()
        policy = edge.edge.policy

        self.assertSame("no_tunnel", {
            "http/1.1": await edge.http1(h1("GET", "/hello", "Host: nothing.test")),
            "h2": await edge.h2(h2(b"nothing.test")),
        }, Reason.NO_TUNNEL, 404, REFUSED)

        self.assertSame("agent_unavailable", {
            "http/1.1": await edge.http1(h1("GET", "/hello", "Host: offline.test")),
            "h2": await edge.h2(h2(b"offline.test")),
            "tcp": await edge.tcp("db-off"),
        }, Reason.AGENT_UNAVAILABLE, 503, REFUSED)

        self.assertSame("userinfo in the host", {
            "http/1.1": await edge.http1(h1("GET", "/hello", "Host: evil@app.test")),
            "h2": await edge.h2(h2(b"evil@app.test"), closes=True),
        }, Reason.BAD_REQUEST, 400, BAD_REQUEST, closes=True)

        self.assertSame("invalid host", {
            "http/1.1": await edge.http1(h1("GET", "/hello", "Host: [app.test")),
            "h2": await edge.h2(h2(b"[app.test")),
        }, Reason.BAD_REQUEST, 400, REFUSED)

        self.assertSame("CONNECT", {
            "http/1.1": await edge.http1(h1("CONNECT", "app.test:443", "Host: app.test:443")),
            "h2": await edge.h2(h2(b"app.test:443", method=b"CONNECT")),
        }, Reason.BAD_REQUEST, 501, REFUSED)

        # A client breaking its protocol: HTTP/1.1 answers 400 and closes,
        # HTTP/2 can only say GOAWAY (PROTOCOL_ERROR); logged and counted alike.
        self.assertBroken("malformed field", {
            "http/1.1": await edge.http1(b"GET /hello HTTP/1.1\r\nHost: app.test\r\nno colon\r\n\r\n"),
            "h2": await edge.h2([*h2(b"app.test"), (b"transfer-encoding", b"chunked")], closes=True),
        })
        self.assertBroken("missing host", {
            "http/1.1": await edge.http1(h1("GET", "/hello")),
            "h2": await edge.h2(h2(None), closes=True),
        })

        # One request (or connection) takes the only token; the next is refused.
        self.assertEqual((await edge.http1(h1("GET", "/hello", "Host: limited.test"))).status, 200)
        await edge.hold_tcp("db-limited")
        seen = {
            "http/1.1": await edge.http1(h1("GET", "/hello", "Host: limited.test")),
            "h2": await edge.h2(h2(b"limited.test")),
            "tcp": await edge.tcp("db-limited"),
        }
        self.assertSame("rate_limited", seen, Reason.RATE_LIMITED, 429, REFUSED)

        # One exchange (or connection) in flight holds the only slot.
        hanging = _Reader(h1("GET", "/hang", "Host: capped.test"))
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", edge.harness.public_port), hanging)
        await eventually(lambda: edge.upstream.hanging, "the held request at the upstream")
        await edge.hold_tcp("db-capped")
        self.assertSame("cap_reached", {
            "http/1.1": await edge.http1(h1("GET", "/hello", "Host: capped.test")),
            "h2": await edge.h2(h2(b"capped.test")),
            "tcp": await edge.tcp("db-capped"),
        }, Reason.CAP_REACHED, 503, REFUSED)
        hanging.transport.loseConnection()  # type: ignore[union-attr]
        await hanging.lost

        self.assertSame("upstream_refused", {
            "http/1.1": await edge.http1(h1("GET", "/hello", "Host: down.test")),
            "h2": await edge.h2(h2(b"down.test")),
        }, Reason.UPSTREAM_REFUSED, 502, REFUSED_BY_STREAM)

        policy.draining = True
        try:
            self.assertSame("draining", {
                "http/1.1": await edge.http1(h1("GET", "/hello", "Host: app.test")),
                "h2": await edge.h2(h2(b"app.test"), closes=True),
                "tcp": await edge.tcp("db-limited"),
            }, Reason.DRAINING, 503, REFUSED, closes=True)
        finally:
            policy.draining = False

        # What was counted is what Prometheus scrapes, label for label.
        code, text = await get(edge.harness, admin_url(edge.edge, "/metrics"))
        self.assertEqual(code, 200)
        scraped = samples(text.decode())
        for (kind, label), count in edge.edge.stats.refusals.items():
            key = ("tunneld_refusals_total", (("kind", kind), ("reason", label)))
            self.assertEqual(scraped.get(key), count, (kind, label))
        for client in edge.held:
            client.transport.abortConnection()
            await client.lost


# -- decisions that come later -------------------------------------------------------


class LatePolicy:
    """
    The real policy, answering later: each admission waits until the test
    lets it go, as a token bucket shared in Redis would answer after a
    round trip.  The decision is the real policy's, made when let go.
    """

    def __init__(self, policy: PublicPolicy) -> None:
        self.policy = policy
        self.waiting: list[tuple[defer.Deferred[Any], tuple[str, str, int]]] = []

    def connection_opened(self, peer_host: str) -> Any:
        return self.policy.connection_opened(peer_host)

    def trusts(self, peer_host: str) -> bool:
        return self.policy.trusts(peer_host)

    def client_of(self, peer_host: str, forwarded_for: Any) -> str:
        return self.policy.client_of(peer_host, forwarded_for)

    def admit(self, tunnel: str, client: str, session_streams: int) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.waiting.append((d, (tunnel, client, session_streams)))
        return d

    def decide(self) -> int:
        """Let every waiting admission go; how many there were."""
        waiting, self.waiting = self.waiting, []
        for d, args in waiting:
            d.callback(self.policy.admit(*args))
        return len(waiting)


class LateRoutes:
    """
    Where a tunnel no local session serves is found later (issue 20: another
    edge holding it).  Here: C{elsewhere.test} is served by the link serving
    C{app.test}, as a relay link to that edge would be.
    """

    def __init__(self, edge: EdgeService) -> None:
        self.edge = edge
        self.waiting: list[tuple[defer.Deferred[Any], str]] = []

    def route(self, host: str, path: str) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.waiting.append((d, host))
        return d

    def answer(self) -> int:
        waiting, self.waiting = self.waiting, []
        for d, host in waiting:
            if host == "elsewhere.test":
                # The tunnel as the edge holding it knows it.
                d.callback(self.edge.router.route("app.test", "/"))
            else:
                d.callback(Reason.NO_TUNNEL)
        return len(waiting)


class LateDecisionTests(TestCase):
    """Every public protocol holds a request whose admission or route comes later."""

    timeout = 60

    async def start(self) -> tuple[_Edge, LatePolicy]:
        edge = _Edge(self)
        await edge.start()
        late = LatePolicy(edge.edge.policy)
        edge.edge.gateway.admission = late
        return edge, late

    async def test_http1_bodies_wait_for_admission(self) -> None:
        """HTTP/1.1: a plain GET, then a POST whose body came with it, are each served once admitted, in order."""
        edge, late = await self.start()
        reader = _Reader(
            h1("GET", "/hello", "Host: app.test")
            + h1("POST", "/echo", "Host: app.test", "Content-Length: 5", "Connection: close")
            + b"hello"
        )
        await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", edge.harness.public_port), reader
        )
        await eventually(lambda: late.waiting, "the GET's admission")
        self.assertEqual(parse_responses(reader.data, partial=True), [])
        self.assertEqual(late.decide(), 1)
        # The GET's answer and the POST's admission come in either order on
        # a busy machine: wait for both; the POST is not answered before it
        # is admitted.
        await eventually(
            lambda: late.waiting and len(parse_responses(reader.data, partial=True)) == 1,
            "the GET's answer and the POST's admission",
        )
        self.assertEqual(len(parse_responses(reader.data, partial=True)), 1)
        self.assertEqual(late.decide(), 1)
        await reader.lost
        first, second = parse_responses(reader.data)
        self.assertEqual((first.status, first.body), (200, b"hello from upstream"))
        self.assertEqual((second.status, second.body), (200, b"hello"))
        self.assertEqual(edge.edge.policy.snapshot()["tunnel_streams"], 0)

    async def test_http1_echo_body_after_admission(self) -> None:
        """The body of a request held for admission reaches the upstream whole."""
        edge, late = await self.start()
        reader = _Reader(
            h1("POST", "/echo", "Host: app.test", "Content-Length: 11", "Connection: close")
            + b"hello world"
        )
        await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", edge.harness.public_port), reader
        )
        await eventually(lambda: late.waiting, "an admission to decide")
        late.decide()
        await reader.lost
        [response] = parse_responses(reader.data)
        self.assertEqual((response.status, response.body), (200, b"hello world"))

    async def test_h2_body_waits_for_admission(self) -> None:
        """HTTP/2: a POST's DATA waits (unacknowledged) for the admission, then reaches the upstream whole."""
        edge, late = await self.start()
        client = H2Request([*h2(b"app.test", b"/echo", b"POST")])
        client.connectionMade = lambda: _post_h2(client, b"late body")  # type: ignore[method-assign]
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", edge.h2c_port), client)
        await eventually(lambda: late.waiting, "an admission to decide")
        self.assertFalse(client.done.called)
        late.decide()
        await client.done
        self.assertEqual((client.status, client.body), (200, b"late body"))
        client.transport.loseConnection()  # type: ignore[union-attr]
        await client.closed

    async def test_refusal_that_comes_later(self) -> None:
        """A late refusal is answered as a prompt one is: status, Tunnel-Error, event and metric."""
        edge, late = await self.start()
        first = defer.ensureDeferred(edge.http1(h1("GET", "/hello", "Host: limited.test")))
        await eventually(lambda: late.waiting, "an admission to decide")
        late.decide()
        self.assertEqual((await first).status, 200)
        for name, attempt in (
            ("http/1.1", edge.http1(h1("GET", "/hello", "Host: limited.test"))),
            ("h2", edge.h2(h2(b"limited.test"))),
        ):
            pending = defer.ensureDeferred(attempt)
            await eventually(lambda: late.waiting, "an admission to decide")
            late.decide()
            seen = await pending
            self.assertEqual((seen.status, seen.tunnel_error), (429, b"rate_limited"), name)
            self.assertEqual(seen.event, (REFUSED, "rate_limited"), name)
            self.assertEqual(seen.counted, {"rate_limited": 1}, name)

    async def test_tcp_waits_for_admission(self) -> None:
        """TCP: nothing is read until the connection is admitted; then the echo comes back."""
        edge, late = await self.start()
        client = await connect_tcp(self, edge.ports["db-capped"])
        client.transport.write(b"early bytes")  # type: ignore[union-attr]
        await eventually(lambda: late.waiting, "an admission to decide")
        late.decide()
        await client.wait_for(b"early bytes")
        client.transport.abortConnection()  # type: ignore[union-attr]
        await client.lost

    async def test_client_gone_before_the_decision(self) -> None:
        """A client that leaves before its admission is decided (HTTP/1.1, HTTP/2) gets nothing opened and holds no slot."""
        edge, late = await self.start()
        policy = edge.edge.policy
        opened = edge.edge.stats.streams_opened
        reader = _Reader(h1("GET", "/hello", "Host: app.test"))
        await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", edge.harness.public_port), reader
        )
        h2client = H2Request(h2(b"app.test"))
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", edge.h2c_port), h2client)
        h2client.done.addErrback(lambda _: None)  # it ends with the connection
        await eventually(lambda: len(late.waiting) == 2, "two admissions to decide")
        for transport in (reader.transport, h2client.transport):
            transport.abortConnection()  # type: ignore[union-attr]
        await reader.lost
        await h2client.closed
        await eventually(lambda: policy.snapshot()["connections"] == 0, "the connections' slots back")
        self.assertEqual(late.decide(), 2)
        self.assertEqual(edge.edge.stats.streams_opened, opened)
        self.assertEqual(policy.snapshot()["tunnel_streams"], 0)

    async def test_tcp_client_gone_before_the_decision(self) -> None:
        """
        A TCP client that leaves before its admission is decided is noticed
        once the decision lets the edge read again (it reads nothing before):
        then every slot is given back.
        """
        edge, late = await self.start()
        policy = edge.edge.policy
        tcp = await connect_tcp(self, edge.ports["db-capped"])
        await eventually(lambda: late.waiting, "the admission to decide")
        tcp.transport.abortConnection()  # type: ignore[union-attr]
        await tcp.lost
        self.assertEqual(late.decide(), 1)
        await eventually(
            lambda: policy.snapshot()["connections"] == 0
            and policy.snapshot()["tunnel_streams"] == 0,
            "the connection's and the stream's slots back",
        )

    async def test_tunnel_found_elsewhere_later(self) -> None:
        """A host no local session serves is routed when the remote lookup answers, on both HTTP versions."""
        edge = _Edge(self)
        await edge.start()
        remote = LateRoutes(edge.edge)
        edge.edge.gateway.remote = remote
        first = defer.ensureDeferred(edge.http1(h1("GET", "/hello", "Host: elsewhere.test")))
        second = defer.ensureDeferred(edge.h2(h2(b"elsewhere.test")))
        unknown = defer.ensureDeferred(edge.http1(h1("GET", "/hello", "Host: unknown.test")))
        await eventually(lambda: len(remote.waiting) == 3, "three lookups to answer")
        self.assertEqual(remote.answer(), 3)
        self.assertEqual((await first).status, 200)
        self.assertEqual((await second).status, 200)
        seen = await unknown
        self.assertEqual((seen.status, seen.event), (404, (REFUSED, "no_tunnel")))
        self.assertEqual(edge.upstream.requests, 2)

    async def test_draining_tunnel_found_elsewhere(self) -> None:
        """A tunnel whose every local session is draining (its agent moving) asks the remote routes: served when they find it, refused draining (the local reason, not theirs) when they do not."""
        edge = _Edge(self)
        await edge.start()
        serving = [s for s in edge.edge.sessions.sessions.values() if s.agent_id == "agent"]
        found = edge.edge.router.route("app.test", "/")
        for session in serving:
            session.draining = True
        self.assertEqual(edge.edge.router.route("app.test", "/"), Reason.DRAINING)
        answers: list[Any] = [found, Reason.NO_TUNNEL]
        asked: list[str] = []

        class Remote:
            def route(self, host: str, path: str) -> Any:
                asked.append(host)
                return answers.pop(0)

        edge.edge.gateway.remote = Remote()
        moved = await edge.http1(h1("GET", "/hello", "Host: app.test"))
        self.assertEqual(moved.status, 200)
        gone = await edge.http1(h1("GET", "/hello", "Host: app.test"))
        self.assertEqual((gone.status, gone.event), (503, (REFUSED, "draining")))
        self.assertEqual(asked, ["app.test", "app.test"])


def _post_h2(client: H2Request, body: bytes) -> None:
    """Open a POST stream and send its whole body at once (the edge holds it)."""
    client.h2.initiate_connection()
    client.h2.send_headers(1, client.request_headers, end_stream=False)
    client.h2.send_data(1, body, end_stream=True)
    client.transport.write(client.h2.data_to_send())  # type: ignore[union-attr]


# -- the gateway alone ---------------------------------------------------------------


@implementer(IStreamReceiver)
class _Exchange:
    """A protocol's exchange as the gateway sees it, recording what it is told."""

    def __init__(self, method: bytes = b"GET", target: str = "/") -> None:
        self.method = method
        self.host = ""
        self.target = target
        self.live = True
        self.slots: Any = None
        self.stream: IStream | None = None
        self.refusal: Refusal | None = None

    def opened(self, stream: IStream) -> None:
        self.stream = stream

    def refused(self, refusal: Refusal) -> None:
        self.refusal = refusal

    # IStreamReceiver, never called here
    def reply_received(self, reply: Any) -> None: ...
    def data_received(self, data: Any) -> None: ...
    def end_received(self, trailers: Any) -> None: ...
    def reset_received(self, reason: Any, message: str) -> None: ...


class GatewayTests(SynchronousTestCase):
    """L{EdgeGateway} on a fake routing table and link."""

    def setUp(self) -> None:
        self.link = FakeLink()
        self.gateway = EdgeGateway(
            FakeRouter({"app.test": FakeRoute("app.test", self.link)}),
            admission=PublicPolicy(LimitsSection(), Clock()),
        )
        self.client = self.gateway.connect(_Peer(), "https", b"1.1 tunneld")

    def test_decided_at_once(self) -> None:
        """An in-memory decision opens the stream before request() returns True."""
        exchange = _Exchange(b"POST", "/x?y")
        decided = self.gateway.request(
            self.client, exchange, b"App.Test:8443", ((b"x-a", b"1"), (b"connection", b"x-a")),
            hop=frozenset({b"x-a"}), bodyless=False,
        )
        self.assertTrue(decided)
        self.assertIs(exchange.stream, self.link.streams[0])
        head = self.link.streams[0].head
        self.assertEqual((head.kind, head.tunnel, head.method, head.target, head.scheme),
                         ("http", "app.test", "POST", "/x?y", "https"))
        self.assertEqual(exchange.host, "app.test")
        fields = dict(head.headers)
        self.assertEqual(fields[b"host"], b"App.Test:8443")
        self.assertNotIn(b"x-a", fields)  # named hop-by-hop by the request
        self.assertEqual(fields[b"x-forwarded-for"], b"192.0.2.7")
        self.assertEqual(fields[b"x-forwarded-proto"], b"https")
        self.assertEqual(fields[b"via"], b"1.1 tunneld")
        self.assertFalse(self.link.streams[0].opened_ended)
        self.assertIsNotNone(exchange.slots)

    def test_upgrade_keeps_its_fields_and_opens_an_upgrade_stream(self) -> None:
        """An upgrade keeps Upgrade, says Connection: Upgrade and never opens ended."""
        exchange = _Exchange()
        self.gateway.request(
            self.client, exchange, b"app.test", ((b"upgrade", b"websocket"),), upgrade=True,
        )
        head = self.link.streams[0].head
        self.assertEqual(head.kind, "upgrade")
        self.assertIn((b"upgrade", b"websocket"), head.headers)
        self.assertIn((b"connection", b"Upgrade"), head.headers)
        self.assertFalse(self.link.streams[0].opened_ended)

    def test_refusals(self) -> None:
        """Each neutral check refuses with its reason, status and whether to close."""
        cases = [
            (b"GET", None, Reason.BAD_REQUEST, 400, False),
            (b"GET", b"evil@app.test", Reason.BAD_REQUEST, 400, True),
            (b"CONNECT", b"app.test:443", Reason.BAD_REQUEST, 501, False),
            (b"GET", b"nowhere.test", Reason.NO_TUNNEL, 404, False),
        ]
        for method, authority, reason, status, close in cases:
            exchange = _Exchange(method)
            self.assertTrue(self.gateway.request(self.client, exchange, authority, ()))
            refusal = exchange.refusal
            assert refusal is not None
            self.assertEqual(
                (refusal.reason, refusal.http_status, refusal.close), (reason, status, close),
                (method, authority),
            )
            self.assertFalse(exchange.live)
        self.assertEqual(self.link.streams, [])
        self.assertEqual(self.gateway.stats.refusal_count(Reason.BAD_REQUEST), 3)

    def test_upgrade_with_body_refused(self) -> None:
        """An upgrade request that carries a body is refused, never opened."""
        exchange = _Exchange()
        self.gateway.request(self.client, exchange, b"app.test", (), upgrade=True, bodyless=False)
        assert exchange.refusal is not None
        self.assertEqual(exchange.refusal.reason, Reason.BAD_REQUEST)

    def test_connection_over_cap_refused_and_closed(self) -> None:
        """A connection over a cap hears its refusal on its first request, with close."""
        policy = PublicPolicy(LimitsSection(max_connections=1), Clock())
        gateway = EdgeGateway(FakeRouter({}), admission=policy)
        gateway.connect(_Peer(), "http", b"v")
        over = gateway.connect(_Peer(), "http", b"v")
        exchange = _Exchange()
        gateway.request(over, exchange, b"app.test", ())
        assert exchange.refusal is not None
        self.assertEqual(
            (exchange.refusal.reason, exchange.refusal.close), (Reason.CAP_REACHED, True)
        )

    def test_late_admission_after_client_left_releases(self) -> None:
        """Slots granted after the exchange died are released at once, and nothing opens."""
        late = LatePolicy(PublicPolicy(LimitsSection(), Clock()))
        gateway = EdgeGateway(FakeRouter({"app.test": FakeRoute("app.test", self.link)}), admission=late)
        exchange = _Exchange()
        self.assertFalse(gateway.request(gateway.connect(_Peer(), "http", b"v"), exchange, b"app.test", ()))
        exchange.live = False
        late.decide()
        self.assertEqual(self.link.streams, [])
        self.assertEqual(late.policy.snapshot()["tunnel_streams"], 0)

    def test_late_admission_failure_refuses(self) -> None:
        """An admission that fails is logged and answered, never left hanging."""
        late = LatePolicy(PublicPolicy(LimitsSection(), Clock()))
        gateway = EdgeGateway(FakeRouter({"app.test": FakeRoute("app.test", self.link)}), admission=late)
        exchange = _Exchange()
        gateway.request(gateway.connect(_Peer(), "http", b"v"), exchange, b"app.test", ())
        [(d, _)] = late.waiting
        d.errback(RuntimeError("the store broke"))
        assert exchange.refusal is not None
        self.assertEqual(exchange.refusal.reason, Reason.AGENT_UNAVAILABLE)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_refused_by_policy_is_a_refused(self) -> None:
        """The policy's Refused carries its Retry-After into the refusal; draining also closes."""
        policy = PublicPolicy(LimitsSection(), Clock())
        gateway = EdgeGateway(FakeRouter({"app.test": FakeRoute("app.test", self.link)}), admission=policy)
        client = gateway.connect(_Peer(), "http", b"v")
        policy.draining = True
        exchange = _Exchange()
        gateway.request(client, exchange, b"app.test", ())
        self.assertEqual(exchange.refusal, Refusal(Reason.DRAINING, Reason.DRAINING.description, 1, True))
        self.assertIsInstance(policy.admit("app.test", "x", 0), Refused)


@dataclass(frozen=True)
class _Peer:
    host: str = "192.0.2.7"
    port: int = 5555
