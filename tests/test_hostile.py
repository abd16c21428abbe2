"""
Hostile input on every listener: the public HTTP/1.1 parser and the
websocket agent link are fed arbitrary and mutated bytes; nothing escapes to
the reactor, the offender is answered or closed with the reason, and other
connections keep working.

Example counts (CI): 1000 arbitrary byte sequences and 1000 mutated requests
into the public parser (two hypothesis properties), plus 60 hostile
connections against a live websocket edge; tests/test_codec.py adds 1200
frame sequences into FrameLink.  fuzz/ has atheris harnesses for long runs.
"""

from __future__ import annotations

import random
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests import test_http1 as http1_tests
from tests.end_to_end import EventCollector
from tests.harness import TunnelHarness, listen_upstream, sleep
from tests.test_http1 import HOST, FakeLink, FakeRoute, FakeRouter, request
from tunneld.edge.gateway import EdgeGateway
from tunneld.edge.http1 import PublicHTTPFactory, PublicHTTPProtocol, PublicHTTPSettings
from tunneld.model.messages import StreamHead
from tunneld.wire import codec


class HeadLimitTests(TestCase):
    """Header count and request-line limits, on real sockets."""

    timeout = 15
    # The public listener tests' fixtures, without running their tests again.
    _shared = http1_tests.PublicHTTPTests
    setUp = _shared.setUp
    serve = _shared.serve
    _close_client = _shared._close_client
    _close_server_side = _shared._close_server_side
    assertLogged = _shared.assertLogged  # noqa: N815

    async def test_too_many_header_fields_is_431(self) -> None:
        """More header fields than max_header_count is answered 431 naming the count."""
        client = await self.serve(PublicHTTPSettings(max_header_count=10))
        extra = [f"X-H{i}: v" for i in range(20)]
        client.send(request("GET", "/", HOST, *extra))
        [reply] = await client.replies()
        self.assertEqual(reply.status, 431)
        self.assertIn(b"at most 10", reply.body)
        self.assertLogged("bad request from {peer}: {error}")
        self.assertEqual(self.link.streams, [])
        self.clock.advance(5)
        await client.closed

    async def test_long_request_line_is_414(self) -> None:
        """A request line longer than max_request_line is answered 414."""
        client = await self.serve(PublicHTTPSettings(max_request_line=256))
        client.send(request("GET", "/" + "a" * 1000, HOST))
        [reply] = await client.replies()
        self.assertEqual(reply.status, 414)
        self.assertIn(b"longer than 256 bytes", reply.body)
        self.assertLogged("bad request from {peer}: {error}")
        self.clock.advance(5)
        await client.closed



_VALID = [
    request("GET", "/", HOST),
    request("POST", "/up", HOST, "Content-Length: 5") + b"hello",
    request("POST", "/up", HOST, "Transfer-Encoding: chunked") + b"5\r\nhello\r\n0\r\n\r\n",
    request("GET", "/a?b=c", HOST, "Connection: close", "Upgrade: websocket"),
]


@st.composite
def _mutated(draw: Any) -> bytes:
    data = bytearray(draw(st.sampled_from(_VALID)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "dup"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and data:
            del data[at : at + draw(st.integers(1, 8))]
        else:
            data[at:at] = data[at : at + draw(st.integers(1, 32))]
    return bytes(data)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


class PublicParserFuzzTests(SynchronousTestCase):
    """Whatever a client sends, the public parser answers, waits or closes; it never raises."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.link = FakeLink()
        self.router = FakeRouter({HOST: FakeRoute(HOST, self.link)})
        self.factory = PublicHTTPFactory(
            EdgeGateway(self.router),
            PublicHTTPSettings(max_header_bytes=2048, max_header_count=20),
            self.clock,
        )

    def connection(self) -> tuple[PublicHTTPProtocol, StringTransport]:
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def feed(self, data: bytes, cuts: list[int]) -> None:
        proto, transport = self.connection()
        for piece in _chunks(data, cuts):
            proto.dataReceived(piece)  # an exception here fails the property
        written = transport.value()
        if written:
            self.assertTrue(written.startswith(b"HTTP/1.1 "), written[:40])
        head = written.partition(b"\r\n\r\n")[0].lower()
        if head.startswith(b"http/1.1 4") and b"\r\nconnection: close" in head:
            # A malformed request is answered and the connection is closed
            # (after a short linger) with the reason in the log.
            self.clock.advance(10)
            self.assertTrue(transport.disconnecting or transport.disconnected)
        proto.connectionLost(protocol.connectionDone)  # type: ignore[arg-type]
        self.clock.advance(600)
        # Another connection on the same factory is served normally.
        other, other_transport = self.connection()
        before = len(self.link.streams)
        other.dataReceived(request("GET", "/ok", HOST))
        self.assertEqual(len(self.link.streams), before + 1)
        other.connectionLost(protocol.connectionDone)  # type: ignore[arg-type]

    @settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.binary(max_size=4096), st.lists(st.integers(0, 4096), max_size=6))
    def test_arbitrary_bytes(self, data: bytes, cuts: list[int]) -> None:
        """Arbitrary bytes, in arbitrary pieces, never raise out of dataReceived."""
        self.feed(data, cuts)

    @settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_mutated(), st.lists(st.integers(0, 4096), max_size=6))
    def test_mutated_requests(self, data: bytes, cuts: list[int]) -> None:
        """Valid requests with flipped, inserted, deleted and repeated bytes never raise."""
        self.feed(data, cuts)


class _RawGarbage(protocol.Protocol):
    """Sends bytes on connect and reports when the edge closes."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.write(self.payload)  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.closed.callback(None)


class _HostileFrames(WebSocketClientProtocol):  # type: ignore[misc]
    def onOpen(self) -> None:  # noqa: N802
        for payload in self.factory.payloads:
            self.sendMessage(payload, isBinary=True)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:  # noqa: N802
        if not self.factory.closed.called:
            self.factory.closed.callback((code, reason))


def _mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        at = rng.randrange(len(out) or 1)
        choice = rng.random()
        if choice < 0.5 and out:
            out[at] ^= rng.randint(1, 255)
        elif choice < 0.8:
            out[at:at] = rng.randbytes(rng.randint(1, 8))
        else:
            del out[at : at + rng.randint(1, 4)]
    return bytes(out)


class WebSocketHostileTests(TestCase):
    """Hostile bytes against a live websocket edge leave a working tunnel working."""

    timeout = 60

    async def test_hostile_connections_leave_other_links_working(self) -> None:
        """60 hostile connections (raw garbage, garbage and mutated frames) are closed; the tunnel keeps serving."""
        log = EventCollector(self)
        harness = TunnelHarness(self, "websocket", {"listen": "tcp:0:interface=127.0.0.1"})
        await harness.start_edge()
        port, _ = await listen_upstream(self)
        link_port = harness.link_address().port
        agent = await harness.start_agent(
            {"url": f"ws://127.0.0.1:{link_port}/tunnel"}, [("app.test", port)]
        )
        good_link = agent.link
        rng = random.Random(6)
        head = StreamHead(kind="http", method=b"GET", target=b"/", headers=(),
                          tunnel="app.test", peer="1.2.3.4:5")
        valid = [
            codec.encode_open(1, head).SerializeToString(),
            codec.encode_data(1, b"xyz"),
            codec.encode_window(1, 100).SerializeToString(),
            codec.encode_ping(7).SerializeToString(),
        ]
        waits = []
        for i in range(20):  # not even HTTP
            garbage = _RawGarbage(rng.randbytes(rng.randint(1, 2048)))
            await TCP4ClientEndpoint(reactor, "127.0.0.1", link_port).connect(
                _factory_for(garbage)
            )
            garbage.transport.loseConnection() if i % 2 else None  # type: ignore[union-attr]
            waits.append(garbage.closed)
        for i in range(40):  # a WebSocket, then garbage or mutated frames
            factory = WebSocketClientFactory(f"ws://127.0.0.1:{link_port}/tunnel")
            factory.protocol = _HostileFrames
            factory.closed = defer.Deferred()
            if i % 2:
                factory.payloads = [rng.randbytes(rng.randint(0, 512))]
            else:
                factory.payloads = [_mutate(rng, rng.choice(valid)) for _ in range(3)]
            await TCP4ClientEndpoint(reactor, "127.0.0.1", link_port).connect(factory)
            waits.append(factory.closed)
        # Each hostile peer is closed by the edge (garbage before its hello
        # is a protocol error; raw bytes fail the WebSocket handshake), or is
        # still waiting for its hello timeout, which the cleanup ends.
        status, _, body = await harness.request("app.test", "/hello")
        self.assertEqual((status, body), (200, b"hello from upstream"))
        self.assertIs(agent.link, good_link)
        for d in waits:
            d.addErrback(lambda _: None)
        await _settle(waits, 10.0)
        broke = log.matching("{transport} link from {peer} broke the protocol: {error}")
        self.assertGreater(len(broke), 0)
        status, _, body = await harness.request("app.test", "/hello")
        self.assertEqual((status, body), (200, b"hello from upstream"))
        assert harness.edge is not None
        self.assertEqual(len(harness.edge.sessions.sessions), 1)


class LinkLimitTests(TestCase):
    """Limits on agent links: streams per link from config; a silent TLS client is dropped."""

    timeout = 30

    async def test_max_streams_per_agent_reaches_the_link(self) -> None:
        """edge.max_streams_per_agent caps the streams on each agent link."""
        harness = TunnelHarness(self, "websocket", {"listen": "tcp:0:interface=127.0.0.1"})
        await harness.start_edge(max_streams_per_agent=3)
        port, _ = await listen_upstream(self)
        await harness.start_agent(
            {"url": f"ws://127.0.0.1:{harness.link_address().port}/tunnel"}, [("app.test", port)]
        )
        assert harness.edge is not None
        [session] = harness.edge.sessions.sessions.values()
        self.assertEqual(session.link.max_streams, 3)  # type: ignore[attr-defined]

    async def test_silent_client_on_tls_listener_is_dropped(self) -> None:
        """A client that connects to the agent TLS listener and never handshakes is closed by the edge."""
        from tests.test_identity import PKI

        pki = PKI(self)
        harness = TunnelHarness(
            self, "websocket",
            {"listen": "tcp:0:interface=127.0.0.1", "open_handshake_timeout": 0.5},
        )
        await harness.start_edge(agent_tls=pki.edge_tls())
        silent = _RawGarbage(b"")
        await TCP4ClientEndpoint(reactor, "127.0.0.1", harness.link_address().port).connect(
            _factory_for(silent)
        )
        await silent.closed


def _factory_for(proto: protocol.Protocol) -> protocol.Factory:
    return protocol.Factory.forProtocol(lambda: proto)  # type: ignore[arg-type]


async def _settle(waits: list[defer.Deferred[Any]], limit: float) -> None:
    for _ in range(int(limit / 0.05)):
        if all(d.called for d in waits):
            return
        await sleep(0.05)
