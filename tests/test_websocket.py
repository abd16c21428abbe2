"""The end-to-end suite over the WebSocket transport, plus its own wire and framing checks."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.end_to_end import EndToEndMixin
from tests.harness import TunnelHarness
from tests.switches import TricksOff, switch_tricks
from tests.test_grpc_transport import until
from tests.test_websocket_framing import Recorder
from tunneld.interfaces import AgentLinkSetup, EdgeLinkSetup
from tunneld.model.reasons import Reason
from tunneld.transports.websocket import (
    CLOSE_TIMEOUT,
    AgentWebSocketFactory,
    EdgeWebSocketFactory,
    WebSocketAgentOptions,
    WebSocketEdgeOptions,
    WebSocketTransport,
)
from tunneld.transports.websocket_framing import FrameReader, FrameWriter

CURL = shutil.which("curl")


class _Hostile(WebSocketClientProtocol):  # type: ignore[misc]
    def onOpen(self) -> None:  # noqa: N802
        self.sendMessage(b"\xff\xfe not a protobuf frame \x00\x01", isBinary=True)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:  # noqa: N802
        self.factory.closed.callback((code, reason))


class WebSocketEndToEnd(EndToEndMixin, TestCase):
    """Every end-to-end behaviour over the websocket transport."""

    transport = "websocket"

    def agent_table(self, address: Any) -> dict[str, Any]:
        return {"url": f"ws://127.0.0.1:{address.port}/tunnel"}

    async def send_malformed_frame(self, address: Any) -> None:
        factory = WebSocketClientFactory(f"ws://127.0.0.1:{address.port}/tunnel")
        factory.protocol = _Hostile
        factory.closed = defer.Deferred()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", address.port).connect(factory)
        code, reason = await factory.closed
        self.assertEqual(code, 4000 + Reason.PROTOCOL_ERROR.wire_code)
        self.assertIn("protocol_error", reason)


class WebSocketEndToEndTricksOff(TricksOff, WebSocketEndToEnd):
    """Every end-to-end behaviour over the websocket transport with every speed trick off (Autobahn frames)."""


_HANDSHAKE = (
    b"GET /tunnel HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class _Handler:
    """An C{ILinkHandler} that records how its link ended."""

    def __init__(self) -> None:
        self.lost: list[tuple[Reason, str]] = []

    def control_received(self, message: Any) -> None:
        pass

    def stream_opened(self, stream: Any) -> None:
        stream.reset(Reason.AGENT_UNAVAILABLE, "not in this test")

    def link_lost(self, reason: Reason, message: str) -> None:
        self.lost.append((reason, message))


class _Wire:
    """One end of an agent link driven by hand: a StringTransport, a Clock, and what came out."""

    def __init__(self, protocol: Any, transport: StringTransport, clock: Clock, handler: _Handler) -> None:
        self.protocol = protocol
        self.transport = transport
        self.clock = clock
        self.handler = handler

    def frames(self, *, masked: bool) -> list[tuple[object, ...]]:
        """Everything written after the opening handshake, decoded."""
        _, _, rest = self.transport.value().partition(b"\r\n\r\n")
        recorder = Recorder()
        FrameReader(recorder, masked=masked, max_message=1 << 21).feed(rest)
        return recorder.events

    def lose(self, reason: Exception) -> None:
        self.protocol.connectionLost(Failure(reason))


def _edge(
    extra: bytes = b"", max_frame_size: int = 1 << 20, options: WebSocketEdgeOptions | None = None
) -> _Wire:
    """An edge WebSocket protocol that was sent the handshake plus C{extra} in one read."""
    clock, handler = Clock(), _Handler()
    setup = EdgeLinkSetup(
        on_link=lambda link: link.set_handler(handler), reactor=clock, max_frame_size=max_frame_size
    )
    factory = EdgeWebSocketFactory(options or WebSocketEdgeOptions(), setup)
    factory.setProtocolOptions(openHandshakeTimeout=0)  # no timer on the global reactor
    peer = IPv4Address("TCP", "127.0.0.1", 40000)
    protocol = factory.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    protocol.makeConnection(transport)
    protocol.dataReceived(_HANDSHAKE + extra)
    assert transport.value().startswith(b"HTTP/1.1 101 ")
    return _Wire(protocol, transport, clock, handler)


class EdgeFramingTests(SynchronousTestCase):
    """The edge end reads and writes its own frames once Autobahn has opened the link."""

    def test_frames_in_the_handshake_read_are_read(self) -> None:
        """A text frame sent in the same read as the handshake is read: a protocol error, as any text message."""
        wire = _edge(FrameWriter(masked=True).frame(0x1, b"hello"))
        *_, close = wire.frames(masked=False)
        self.assertEqual(close[:2], ("close", 4000 + Reason.PROTOCOL_ERROR.wire_code))
        self.assertIn("text message on a binary link", str(close[2]))
        self.assertTrue(wire.transport.disconnecting)

    def test_unmasked_frame_is_a_protocol_error(self) -> None:
        """An unmasked frame from the agent gets Close 1002 and ends the link as a protocol error."""
        wire = _edge()
        wire.protocol.dataReceived(FrameWriter(masked=False).binary(b"x"))
        self.assertEqual(wire.frames(masked=False), [("close", 1002, "unmasked frame from a client")])
        wire.lose(ConnectionDone())
        self.assertEqual(
            wire.handler.lost,
            [(Reason.PROTOCOL_ERROR, "websocket protocol error (1002: unmasked frame from a client)")],
        )

    def test_oversized_message_is_refused(self) -> None:
        """A frame longer than the link's max_frame_size gets Close 1009 from its header alone."""
        wire = _edge(max_frame_size=1000)
        wire.protocol.dataReceived(FrameWriter(masked=True).binary(b"y" * 1001)[:8])
        [close] = wire.frames(masked=False)
        self.assertEqual(close[:2], ("close", 1009))

    def test_ping_answered_and_close_echoed(self) -> None:
        """A Ping gets its Pong; a Close is echoed with its code and ends the link naming it, once."""
        wire = _edge()
        writer = FrameWriter(masked=True)
        wire.protocol.dataReceived(writer.ping(b"hb") + writer.close(4005, "draining: bye"))
        self.assertEqual(wire.transport.value().partition(b"\r\n\r\n")[2][:4], b"\x8a\x02hb")
        self.assertEqual(wire.frames(masked=False), [("pong", b"hb"), ("close", 4005, "")])
        self.assertTrue(wire.transport.disconnecting)
        wire.lose(ConnectionDone())
        wire.lose(ConnectionDone())
        self.assertEqual(wire.handler.lost, [(Reason.AGENT_GONE, "websocket closed (4005: draining: bye)")])
        self.assertEqual(wire.clock.getDelayedCalls(), [])

    def test_heartbeat_is_websocket_ping_pong(self) -> None:
        """The heartbeat is a WebSocket Ping with the ping's number; its Pong gives the round trip."""
        wire = _edge(options=WebSocketEdgeOptions(heartbeat_interval=1.0, heartbeat_timeout=5.0))
        self.assertIsNone(wire.protocol.link.round_trip_time())
        wire.clock.advance(1.0)
        [ping] = wire.frames(masked=False)
        self.assertEqual(ping, ("ping", (1).to_bytes(8, "big")))
        wire.clock.advance(0.25)
        wire.protocol.dataReceived(FrameWriter(masked=True).pong(b"unsolicited"))
        self.assertIsNone(wire.protocol.link.round_trip_time())
        wire.protocol.dataReceived(FrameWriter(masked=True).pong((1).to_bytes(8, "big")))
        self.assertEqual(wire.protocol.link.round_trip_time(), 0.25)
        wire.lose(ConnectionDone())

    def test_close_times_out(self) -> None:
        """After our Close, a peer that never lets the connection end is cut off after the close timeout."""
        wire = _edge()
        wire.protocol.link.close(Reason.DRAINING, "edge stopping")
        *_, close = wire.frames(masked=False)
        self.assertEqual(close, ("close", 1000, "draining: edge stopping"))
        wire.clock.advance(CLOSE_TIMEOUT - 0.1)
        self.assertFalse(wire.transport.disconnected)
        wire.clock.advance(0.1)
        self.assertTrue(wire.transport.disconnected)
        wire.lose(ConnectionAborted())
        self.assertEqual(wire.handler.lost, [(Reason.DRAINING, "edge stopping")])
        self.assertEqual(wire.clock.getDelayedCalls(), [])

    def test_connection_lost_without_close(self) -> None:
        """A connection lost without a Close ends the link as agent_gone, once, saying so."""
        wire = _edge()
        wire.lose(ConnectionLost("reset by peer"))
        [(reason, message)] = wire.handler.lost
        self.assertEqual(reason, Reason.AGENT_GONE)
        self.assertIn("websocket closed (1006: connection lost without a closing handshake", message)
        self.assertEqual(wire.clock.getDelayedCalls(), [])


class EdgeAutobahnFramingTests(SynchronousTestCase):
    """
    With the websocket_takeover trick off, Autobahn frames the open link
    through its public API, and the link sees the same messages, Pings,
    Pongs and Closes.
    """

    def setUp(self) -> None:
        switch_tricks(self, False, "websocket_takeover")

    def test_messages_reach_the_link(self) -> None:
        """A text message sent with the handshake is Autobahn's to read: a protocol error, as any text message."""
        wire = _edge(FrameWriter(masked=True).frame(0x1, b"hello"))
        self.assertIsNone(wire.protocol._reader)
        *_, close = wire.frames(masked=False)
        self.assertEqual(close[:2], ("close", 4000 + Reason.PROTOCOL_ERROR.wire_code))
        self.assertIn("text message on a binary link", str(close[2]))
        wire.lose(ConnectionDone())
        [(reason, _)] = wire.handler.lost
        self.assertEqual(reason, Reason.PROTOCOL_ERROR)
        self.assertIsNone(wire.protocol.closeHandshakeTimeoutCall)  # released: nothing left on the reactor

    def test_ping_answered_and_close_echoed(self) -> None:
        """Autobahn answers a Ping and a Close (its way: 1000); the link ends naming the peer's code and reason, once."""
        wire = _edge()
        writer = FrameWriter(masked=True)
        wire.protocol.dataReceived(writer.ping(b"hb") + writer.close(4005, "draining: bye"))
        self.assertEqual(wire.frames(masked=False), [("pong", b"hb"), ("close", 1000, "")])
        wire.lose(ConnectionDone())
        wire.lose(ConnectionDone())
        self.assertEqual(wire.handler.lost, [(Reason.AGENT_GONE, "websocket closed (4005: draining: bye)")])
        self.assertEqual(wire.clock.getDelayedCalls(), [])

    def test_heartbeat_is_websocket_ping_pong(self) -> None:
        """The heartbeat goes out as Autobahn's Ping; the peer's Pong gives the round trip."""
        wire = _edge(options=WebSocketEdgeOptions(heartbeat_interval=1.0, heartbeat_timeout=5.0))
        wire.clock.advance(1.0)
        [ping] = wire.frames(masked=False)
        self.assertEqual(ping, ("ping", (1).to_bytes(8, "big")))
        wire.clock.advance(0.25)
        wire.protocol.dataReceived(FrameWriter(masked=True).pong((1).to_bytes(8, "big")))
        self.assertEqual(wire.protocol.link.round_trip_time(), 0.25)
        wire.lose(ConnectionDone())

    def test_close_times_out_and_leaves_no_timer(self) -> None:
        """Our Close goes out through Autobahn; a peer that never lets go is cut off, and Autobahn's timer is cancelled."""
        wire = _edge()
        wire.protocol.link.close(Reason.DRAINING, "edge stopping")
        *_, close = wire.frames(masked=False)
        self.assertEqual(close, ("close", 1000, "draining: edge stopping"))
        self.assertIsNotNone(wire.protocol.closeHandshakeTimeoutCall)
        wire.clock.advance(CLOSE_TIMEOUT)
        self.assertTrue(wire.transport.disconnected)
        wire.lose(ConnectionAborted())
        self.assertEqual(wire.handler.lost, [(Reason.DRAINING, "edge stopping")])
        self.assertEqual(wire.clock.getDelayedCalls(), [])
        self.assertIsNone(wire.protocol.closeHandshakeTimeoutCall)

    def test_frames_go_out_through_autobahn(self) -> None:
        """The link's frames are Autobahn's binary messages, read back whole."""
        wire = _edge()
        wire.protocol.send_frames([[b"ab", memoryview(b"cd")], [b"e" * 70_000]])
        wire.protocol.send_frame(b"f")
        self.assertEqual(
            wire.frames(masked=False),
            [("message", b"abcd", True), ("message", b"e" * 70_000, True), ("message", b"f", True)],
        )
        wire.lose(ConnectionDone())


class AgentFramingTests(SynchronousTestCase):
    """The agent end masks what it sends and refuses masked frames."""

    def test_agent_masks_and_refuses_masked_frames(self) -> None:
        """The agent's frames are masked; a masked frame from the edge (sent with the 101) gets Close 1002."""
        clock = Clock()
        factory = AgentWebSocketFactory(WebSocketAgentOptions(), AgentLinkSetup(reactor=clock))
        factory.setProtocolOptions(openHandshakeTimeout=0)
        opened: list[Any] = []
        assert factory.opened is not None
        factory.opened.addCallback(opened.append)
        peer = IPv4Address("TCP", "127.0.0.1", 8081)
        protocol = factory.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        protocol.makeConnection(transport)
        request = transport.value()
        [key] = [line.split(b": ", 1)[1] for line in request.split(b"\r\n") if line.lower().startswith(b"sec-websocket-key")]
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        transport.clear()
        protocol.dataReceived(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n" + FrameWriter(masked=True).binary(b"x")
        )
        [link] = opened
        handler = _Handler()
        link.set_handler(handler)
        out = transport.value()
        self.assertEqual(out[1] & 0x80, 0x80)  # masked
        recorder = Recorder()
        FrameReader(recorder, masked=True, max_message=1 << 20).feed(out)
        self.assertEqual(recorder.events, [("close", 1002, "masked frame from a server")])
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(
            handler.lost, [(Reason.PROTOCOL_ERROR, "websocket protocol error (1002: masked frame from a server)")]
        )
        self.assertEqual(clock.getDelayedCalls(), [])


class HeartbeatOverSocketsTests(TestCase):
    """The WebSocket link heartbeat between a real edge and agent on loopback."""

    async def test_ping_pong_gives_both_ends_a_round_trip(self) -> None:
        """Both ends' WebSocket Pings are answered with Pongs over TCP, so both measure a round trip."""
        transport = WebSocketTransport()
        edge_links: list[Any] = []
        port = reactor.listenTCP(  # type: ignore[attr-defined]
            0,
            EdgeWebSocketFactory(
                WebSocketEdgeOptions(heartbeat_interval=0.05),
                EdgeLinkSetup(on_link=lambda link: (link.set_handler(_Handler()), edge_links.append(link)),
                              reactor=reactor),
            ),
            interface="127.0.0.1",
        )
        self.addCleanup(port.stopListening)
        options = transport.agent_options(
            {"url": f"ws://127.0.0.1:{port.getHost().port}/tunnel", "heartbeat_interval": 0.05}, "test"
        )
        agent = await transport.connect(options, AgentLinkSetup(reactor=reactor))
        agent.set_handler(_Handler())
        await until(lambda: bool(edge_links) and edge_links[0].round_trip_time() is not None)
        await until(lambda: agent.round_trip_time() is not None)
        for link in (edge_links[0], agent):
            self.assertLess(link.round_trip_time(), 1.0)
        agent.close(Reason.CANCELLED, "test over")
        await agent.when_closed()

    async def test_peer_pings_keep_a_link_alive(self) -> None:
        """A link that only hears its peer's WebSocket Pings is alive: it outlives its own heartbeat timeout many times over."""
        transport = WebSocketTransport()
        edge_links: list[Any] = []
        handler = _Handler()
        port = reactor.listenTCP(  # type: ignore[attr-defined]
            0,
            EdgeWebSocketFactory(
                # The edge never pings: only the agent's Pings tell it the agent is there.
                WebSocketEdgeOptions(heartbeat_interval=600.0, heartbeat_timeout=1.0),
                EdgeLinkSetup(on_link=lambda link: (link.set_handler(handler), edge_links.append(link)),
                              reactor=reactor),
            ),
            interface="127.0.0.1",
        )
        self.addCleanup(port.stopListening)
        options = transport.agent_options(
            {"url": f"ws://127.0.0.1:{port.getHost().port}/tunnel", "heartbeat_interval": 0.05}, "test"
        )
        agent = await transport.connect(options, AgentLinkSetup(reactor=reactor))
        agent.set_handler(_Handler())
        pongs: list[int] = []
        answered = agent.heartbeat.pong
        agent.heartbeat.pong = lambda opaque: (pongs.append(opaque), answered(opaque))
        # Sixty answered pings span at least three of the edge's timeouts.
        await until(lambda: len(pongs) >= 60)
        self.assertEqual(handler.lost, [])
        self.assertFalse(edge_links[0].closed)
        agent.close(Reason.CANCELLED, "test over")
        await agent.when_closed()


class _OneRequest(protocol.Protocol):
    """Sends raw bytes and keeps what comes back, until the head is whole or the server closes."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.head: defer.Deferred[bytes] = defer.Deferred()
        self.closed: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += data
        if b"\r\n\r\n" in self.received and not self.head.called:
            self.head.callback(self.received.partition(b"\r\n\r\n")[0])

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        if not self.head.called:
            self.head.errback(reason)
        self.closed.callback(self.received)


class AgentListenerHTTPTests(TestCase):
    """
    What the edge's WebSocket agent listener tells a client that is not an
    agent (issue 18: a plain GET got Autobahn's status page and version):
    plain HTTP answers, no banner, no Server header.
    """

    async def listener(self) -> int:
        harness = TunnelHarness(self, "websocket", {"listen": "tcp:0:interface=127.0.0.1"})
        await harness.start_edge()
        return int(harness.link_address().port)

    async def curl(self, url: str, *args: str) -> str:
        stdout, stderr, code = await getProcessOutputAndValue(
            CURL, ["-sS", "-i", "--max-time", "30", *args, url], env=dict(os.environ)
        )
        self.assertEqual(code, 0, stderr.decode(errors="replace"))
        return stdout.decode("latin-1")

    def assertNoBanner(self, response: str) -> None:  # noqa: N802
        self.assertNotIn("autobahn", response.lower())
        head = response.partition("\r\n\r\n")[0]
        names = [line.partition(":")[0].lower() for line in head.split("\r\n")[1:]]
        self.assertNotIn("server", names)

    async def test_plain_get_answered_404_or_426(self) -> None:
        """curl: GET / is 404, GET /tunnel without Upgrade is 426 naming websocket; whole answers, no banner."""
        if CURL is None:
            raise RuntimeError("curl is missing: scripts/setup installs the Debian package curl")
        port = await self.listener()
        response = await self.curl(f"http://127.0.0.1:{port}/")
        self.assertTrue(response.startswith("HTTP/1.1 404 Not Found\r\n"), response)
        self.assertIn("\r\nConnection: close\r\n", response)
        self.assertTrue(response.endswith("\r\n\r\nno agent endpoint at this path\n"), response)
        self.assertNoBanner(response)
        response = await self.curl(f"http://127.0.0.1:{port}/tunnel")
        self.assertTrue(response.startswith("HTTP/1.1 426 Upgrade Required\r\n"), response)
        self.assertIn("\r\nUpgrade: websocket\r\n", response)
        self.assertNoBanner(response)
        response = await self.curl(f"http://127.0.0.1:{port}/tunnel", "-X", "POST")
        self.assertTrue(response.startswith("HTTP/1.1 405 Method Not Allowed\r\n"), response)
        self.assertNoBanner(response)

    async def test_raw_requests_and_handshake(self) -> None:
        """Raw sockets: a GET without Host is 404, and an agent's handshake is answered 101 without a Server header."""
        port = await self.listener()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        plain = _OneRequest(b"GET /?redirect=http%3A%2F%2Fexample.com HTTP/1.1\r\n\r\n")
        await endpoint.connect(protocol.Factory.forProtocol(lambda: plain))
        response = (await plain.closed).decode("latin-1")
        self.assertTrue(response.startswith("HTTP/1.1 404 Not Found\r\n"), response)
        self.assertNoBanner(response)
        handshake = _OneRequest(_HANDSHAKE)
        await endpoint.connect(protocol.Factory.forProtocol(lambda: handshake))
        head = (await handshake.head).decode("latin-1")
        self.assertTrue(head.startswith("HTTP/1.1 101 "), head)
        self.assertNoBanner(head)
        handshake.transport.loseConnection()  # type: ignore[union-attr]
        await handshake.closed
