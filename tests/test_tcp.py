"""
TCP tunnels, one object at a time: the socket/stream splice (wiring,
half-close, resets), the edge's port listeners (range, allocation, sharing,
release) and the agent's forwarder.  The real-socket behaviour is in the
end-to-end mixin (tests/end_to_end.py), run over every transport.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.test_router import FakeLink
from tunneld.agent.tcp import TCPForwarder
from tunneld.config import EdgeSection
from tunneld.config.values import parse_port_ranges
from tunneld.edge.tcp import TCPTunnels
from tunneld.interfaces import IStream, IStreamReceiver
from tunneld.model.messages import Headers, Refusal, ReplyHead, StreamHead, TunnelSpec
from tunneld.model.reasons import Reason
from tunneld.router import AgentSession, Router
from tunneld.splice import StreamSplice


@implementer(IStream)
class FakeStream:
    """A stream that records what the splice does to it."""

    def __init__(self, kind: str = "tcp") -> None:
        self.head = StreamHead(kind=kind, tunnel="db")
        self.receiver: IStreamReceiver | None = None
        self.written: list[bytes] = []
        self.ended = False
        self.reset_with: tuple[Reason, str] | None = None
        self.producer: Any = None
        self.paused = False

    def attach(self, receiver: IStreamReceiver) -> None:
        self.receiver = receiver

    def send_reply(self, reply: ReplyHead) -> None:
        raise AssertionError("no reply on a tcp stream")

    def write(self, data: bytes) -> None:
        assert not self.ended
        self.written.append(data)

    def writeSequence(self, data: list[bytes]) -> None:  # noqa: N802
        self.written.extend(data)

    def end(self, trailers: Headers = ()) -> None:
        self.ended = True

    def reset(self, reason: Reason, message: str) -> None:
        self.reset_with = (reason, message)

    def registerProducer(self, producer: Any, streaming: bool) -> None:  # noqa: N802
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:  # noqa: N802
        self.producer = None

    def pauseProducing(self) -> None:  # noqa: N802
        self.paused = True

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused = False

    def stopProducing(self) -> None:  # noqa: N802
        self.reset(Reason.CANCELLED, "consumer stopped")


class HalfCloseTransport(StringTransport):
    """A StringTransport that also half-closes and records an abort."""

    write_closed = False
    aborted = False

    def loseWriteConnection(self) -> None:  # noqa: N802
        self.write_closed = True

    def abortConnection(self) -> None:  # noqa: N802
        self.aborted = True


def spliced() -> tuple[StreamSplice, FakeStream, HalfCloseTransport]:
    """A splice whose stream came first (the agent's way), now connected and joined."""
    splice = StreamSplice("db")
    stream = FakeStream()
    splice.hold(stream)
    transport = HalfCloseTransport()
    splice.makeConnection(transport)
    splice.splice()
    return splice, stream, transport


class SpliceTests(SynchronousTestCase):
    """L{StreamSplice}: bytes, backpressure wiring, half-close and resets."""

    def test_interfaces(self) -> None:
        """The splice is a half-closeable protocol and a stream receiver; the fake is a stream."""
        splice = StreamSplice("db")
        self.assertTrue(verifyObject(IHalfCloseableProtocol, splice))
        self.assertTrue(verifyObject(IStreamReceiver, splice))
        self.assertTrue(verifyObject(IStream, FakeStream()))

    def test_producers_both_ways(self) -> None:
        """The socket is the stream's producer and the stream the socket's."""
        splice, stream, transport = spliced()
        self.assertIs(stream.producer, transport)
        self.assertIs(transport.producer, stream)
        self.assertTrue(transport.streaming)

    def test_held_until_connected(self) -> None:
        """What arrives before the socket is up is held with the stream paused, then written."""
        splice = StreamSplice("db")
        stream = FakeStream()
        splice.hold(stream)
        self.assertTrue(stream.paused)
        splice.data_received(b"early ")
        splice.end_received(())
        transport = HalfCloseTransport()
        splice.makeConnection(transport)
        splice.splice()
        self.assertEqual(transport.value(), b"early ")
        self.assertFalse(stream.paused)
        self.assertTrue(transport.write_closed)

    def test_bytes_both_ways(self) -> None:
        """Socket bytes go to the stream and stream bytes to the socket, counted."""
        splice, stream, transport = spliced()
        splice.dataReceived(b"up")
        splice.data_received(b"down")
        self.assertEqual((stream.written, transport.value()), ([b"up"], b"down"))
        self.assertEqual((splice.bytes_in, splice.bytes_out), (2, 4))

    def test_peer_half_close(self) -> None:
        """The peer's EOF ends the stream and unhooks the socket as its producer; writing goes on."""
        splice, stream, transport = spliced()
        splice.readConnectionLost()
        self.assertTrue(stream.ended)
        self.assertIsNone(stream.producer)
        splice.data_received(b"still flowing")
        self.assertEqual(transport.value(), b"still flowing")
        self.assertFalse(transport.disconnecting)

    def test_far_end_half_close(self) -> None:
        """The stream's end shuts the socket's write side only; reading goes on."""
        splice, stream, transport = spliced()
        splice.end_received(())
        self.assertTrue(transport.write_closed)
        self.assertIsNone(transport.producer)
        splice.dataReceived(b"more")
        self.assertEqual(stream.written, [b"more"])
        self.assertIsNone(stream.reset_with)

    def test_both_closed_closes(self) -> None:
        """Once both directions are done the socket is closed cleanly, the stream not reset."""
        splice, stream, transport = spliced()
        splice.end_received(())
        splice.writeConnectionLost()
        self.assertFalse(transport.disconnecting)
        splice.readConnectionLost()
        self.assertTrue(transport.disconnecting)
        splice.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(stream.reset_with)
        self.assertFalse(transport.aborted)

    def test_reset_received_aborts(self) -> None:
        """A stream reset (the tunnel failed) aborts the socket: a TCP reset."""
        splice, stream, transport = spliced()
        splice.reset_received(Reason.AGENT_GONE, "link lost")
        self.assertTrue(transport.aborted)
        splice.connectionLost(Failure(ConnectionLost()))
        self.assertIsNone(stream.reset_with)

    def test_socket_lost_resets_stream(self) -> None:
        """A socket lost before both directions finished resets the stream with the side's reason."""
        splice, stream, transport = spliced()
        splice.readConnectionLost()
        splice.connectionLost(Failure(ConnectionLost()))
        assert stream.reset_with is not None
        self.assertEqual(stream.reset_with[0], Reason.CLIENT_GONE)
        self.assertFalse(transport.aborted)

    def test_reply_head_is_protocol_error(self) -> None:
        """A reply head on a tcp stream resets both sides with protocol_error."""
        splice, stream, transport = spliced()
        splice.reply_received(ReplyHead(200))
        assert stream.reset_with is not None
        self.assertEqual(stream.reset_with[0], Reason.PROTOCOL_ERROR)
        self.assertTrue(transport.aborted)


class BusyReactor(MemoryReactorClock):
    """A memory reactor on which some ports are already taken."""

    def __init__(self, busy: set[int]) -> None:
        super().__init__()
        self.busy = busy

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:  # noqa: N802
        if port in self.busy:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        return super().listenTCP(port, factory, backlog, interface)


class TCPTunnelsTests(SynchronousTestCase):
    """The edge's TCP listeners: range, allocation, sharing, refusals and release."""

    def make(self, ports: str = "10000-10002", busy: set[int] | None = None) -> TCPTunnels:
        self.reactor = BusyReactor(busy or set())
        self.router = Router()
        return TCPTunnels(EdgeSection(tcp_ports=ports), self.router, self.reactor)

    def session(self, name: str) -> AgentSession:
        return AgentSession("s-" + name, name, FakeLink(name))

    def spec(self, name: str = "db", port: int = 0) -> TunnelSpec:
        return TunnelSpec(name, protocol="tcp", port=port)

    def test_requested_port(self) -> None:
        """A requested port in range is listened on, on the configured interface."""
        tunnels = self.make()
        url = tunnels.register(self.session("a"), self.spec(port=10001))
        self.assertEqual(url, "tcp://127.0.0.1:10001")
        self.assertEqual(
            [(port, interface) for port, _, _, interface in self.reactor.tcpServers],
            [(10001, "127.0.0.1")],
        )

    def test_allocated_port_skips_busy(self) -> None:
        """Port 0 gets a free port from the range, skipping ports already in use."""
        tunnels = self.make("10000-10002", busy={10000, 10002})
        self.assertEqual(tunnels.register(self.session("a"), self.spec()), "tcp://127.0.0.1:10001")

    def test_range_exhausted(self) -> None:
        """With every port in the range taken, port 0 is refused with cap_reached."""
        tunnels = self.make("10000-10001", busy={10000})
        tunnels.register(self.session("a"), self.spec("one"))
        refusal = tunnels.register(self.session("b"), self.spec("two"))
        assert isinstance(refusal, Refusal)
        self.assertEqual(refusal.reason, Reason.CAP_REACHED)
        self.assertIn("no free port", refusal.message)

    def test_outside_range(self) -> None:
        """A port outside tcp_ports is refused, naming the range."""
        refusal = self.make().register(self.session("a"), self.spec(port=22))
        assert isinstance(refusal, Refusal)
        self.assertEqual(refusal.reason, Reason.UNAUTHORIZED)
        self.assertIn("port 22 is outside this edge's tcp_ports (10000-10002)", refusal.message)

    def test_port_in_use(self) -> None:
        """A requested port some other program holds is refused, saying so."""
        refusal = self.make(busy={10001}).register(self.session("a"), self.spec(port=10001))
        assert isinstance(refusal, Refusal)
        self.assertIn("cannot listen on port 10001", refusal.message)
        self.assertIn("Address already in use", refusal.message)

    def test_disabled(self) -> None:
        """With tcp_ports empty every TCP tunnel is refused."""
        tunnels = self.make("")
        for spec in (self.spec(), self.spec(port=10000)):
            refusal = tunnels.register(self.session("a"), spec)
            assert isinstance(refusal, Refusal)
            self.assertIn("tcp_ports is empty", refusal.message)

    def test_shared_and_released(self) -> None:
        """A second agent reuses the tunnel's listener; it closes only when the last one goes."""
        tunnels = self.make()
        first, second = self.session("a"), self.session("b")
        url = tunnels.register(first, self.spec())
        self.assertEqual(tunnels.register(second, self.spec()), url)
        self.assertEqual(len(self.reactor.tcpServers), 1)
        self.router.unregister(first)
        tunnels.release()
        self.assertEqual(len(tunnels.listeners), 1)
        self.router.unregister(second)
        tunnels.release()
        self.assertEqual(tunnels.listeners, {})

    def test_name_keeps_its_port(self) -> None:
        """A tunnel already served on one port cannot be registered on another."""
        tunnels = self.make()
        tunnels.register(self.session("a"), self.spec(port=10000))
        refusal = tunnels.register(self.session("b"), self.spec(port=10001))
        assert isinstance(refusal, Refusal)
        self.assertIn("already served on port 10000", refusal.message)

    def test_returning_tunnel_gets_its_port(self) -> None:
        """A tunnel that comes back after its agents left gets its previous port when free."""
        tunnels = self.make("10000-10100")
        s = self.session("a")
        url = tunnels.register(s, self.spec())
        self.router.unregister(s)
        tunnels.release()
        self.assertEqual(tunnels.register(self.session("a2"), self.spec()), url)

    def test_ipv6_url(self) -> None:
        """An IPv6 public host is bracketed in the URL."""
        tunnels = TCPTunnels(
            EdgeSection(tcp_public_host="::1"), Router(), MemoryReactorClock()
        )
        self.assertEqual(tunnels.url(10000), "tcp://[::1]:10000")

    def test_connection_without_route_is_reset(self) -> None:
        """A connection to a port no agent serves any more is aborted (a TCP reset)."""
        tunnels = self.make()
        s = self.session("a")
        tunnels.register(s, self.spec(port=10000))
        factory = self.reactor.tcpServers[0][1]
        self.router.unregister(s)
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
        transport = HalfCloseTransport()
        protocol.makeConnection(transport)
        self.assertTrue(transport.aborted)


class ParsePortRangesTests(SynchronousTestCase):
    """tcp_ports syntax."""

    def test_ranges(self) -> None:
        """Ranges and single ports, comma separated; empty is none."""
        self.assertEqual(parse_port_ranges("10000-10100, 2222"), [(10000, 10100), (2222, 2222)])
        self.assertEqual(parse_port_ranges(""), [])

    def test_bad(self) -> None:
        """Reversed, out-of-range or non-numeric ranges are refused with the offending part."""
        for text in ("10-5", "0-10", "70000", "a-b"):
            with self.assertRaises(ValueError) as raised:
                parse_port_ranges(text)
            self.assertIn(repr(text), str(raised.exception))


class ForwarderTests(SynchronousTestCase):
    """The agent's TCP forwarder."""

    def test_wrong_kind_refused(self) -> None:
        """An http stream to a tcp tunnel is reset with protocol_error."""
        forwarder = TCPForwarder(MemoryReactorClock(), "db", "tcp:host=127.0.0.1:port=1", 5.0)
        stream = FakeStream(kind="http")
        forwarder.forward(stream)
        assert stream.reset_with is not None
        self.assertEqual(stream.reset_with[0], Reason.PROTOCOL_ERROR)

    def test_connect_timeout(self) -> None:
        """An upstream that does not answer in time resets the stream with upstream_timeout."""
        reactor = MemoryReactorClock()
        forwarder = TCPForwarder(reactor, "db", "tcp:host=127.0.0.1:port=1", 5.0)
        stream = FakeStream()
        forwarder.forward(stream)
        self.assertTrue(stream.paused)
        reactor.advance(5.0)
        assert stream.reset_with is not None
        self.assertEqual(stream.reset_with[0], Reason.UPSTREAM_TIMEOUT)

    def test_reset_while_connecting(self) -> None:
        """A stream reset while the upstream connection is being made gives the attempt up."""
        reactor = MemoryReactorClock()
        forwarder = TCPForwarder(reactor, "db", "tcp:host=127.0.0.1:port=1", 5.0)
        stream = FakeStream()
        forwarder.forward(stream)
        assert stream.receiver is not None
        stream.receiver.reset_received(Reason.CLIENT_GONE, "client left")
        self.assertEqual(forwarder._connecting, set())
        self.assertIsNone(stream.reset_with)  # the edge reset it; nothing is sent back
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_close_cancels_connecting(self) -> None:
        """Stopping the agent gives up a connection attempt, resetting its stream as cancelled."""
        forwarder = TCPForwarder(MemoryReactorClock(), "db", "tcp:host=127.0.0.1:port=1", 5.0)
        stream = FakeStream()
        forwarder.forward(stream)
        self.successResultOf(forwarder.close())
        assert stream.reset_with is not None
        self.assertEqual(stream.reset_with[0], Reason.CANCELLED)
