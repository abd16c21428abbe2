"""
Tests for L{tunneld.sendnow}: large writes go to the socket at once, and
everything else about a Twisted write (order, backpressure, closing) holds.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.tcp import Connection
from twisted.python.failure import Failure
from twisted.test.proto_helpers import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from tunneld import sendnow

reactor: Any = _reactor

BIG = 256 * 1024


def _pattern(size: int, seed: int = 0) -> bytes:
    """C{size} bytes that show any reordering or loss."""
    return bytes((seed + i * 7 + i // 251) & 0xFF for i in range(size))


class _Collect(Protocol):
    """The receiving end: keeps every byte, tells when C{expected} arrived."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.received = bytearray()
        self.done: Deferred[bytes] = Deferred()
        self.made: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        self.made.callback(None)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += data
        if len(self.received) >= self.expected and not self.done.called:
            self.done.callback(bytes(self.received))

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self.lost.callback(None)


@implementer(IPushProducer)
class _Producer:
    """Records the pauses and resumes its consumer asked for."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:  # noqa: N802
        self.events.append("pause")

    def resumeProducing(self) -> None:  # noqa: N802
        self.events.append("resume")

    def stopProducing(self) -> None:  # noqa: N802
        self.events.append("stop")


class SendNowTests(TestCase):
    """L{sendnow.write} and L{sendnow.write_sequence} on real TCP connections."""

    async def _pair(self, expected: int) -> tuple[Connection, _Collect]:
        """A connected pair: our sending transport and the peer's collecting protocol."""
        peer = _Collect(expected)
        port = reactor.listenTCP(0, Factory.forProtocol(lambda: peer), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        sender = await endpoint.connect(Factory.forProtocol(Protocol))
        await peer.made
        transport: Connection = sender.transport  # type: ignore[attr-defined]
        self.addCleanup(self._close, transport, peer)
        return transport, peer

    async def _close(self, transport: Connection, peer: _Collect) -> None:
        if transport.connected:
            transport.abortConnection()
        await peer.lost

    async def test_large_write_is_sent_at_once(self) -> None:
        """A large bytearray or memoryview with nothing queued leaves at once, nothing queued behind."""
        data = _pattern(BIG)
        transport, peer = await self._pair(2 * BIG)
        sendnow.write(transport, bytearray(data))
        self.assertEqual((transport._tempDataLen, len(transport.dataBuffer)), (0, 0))
        sendnow.write(transport, memoryview(data))
        self.assertEqual(await peer.done, data + data)

    async def test_small_write_is_queued(self) -> None:
        """A small write is an ordinary queued write (it leaves with the reactor turn's others)."""
        transport, peer = await self._pair(100)
        sendnow.write(transport, bytearray(b"x" * 100))
        self.assertEqual(transport._tempDataBuffer, [b"x" * 100])
        self.assertEqual(await peer.done, b"x" * 100)

    async def test_queued_behind_earlier_writes(self) -> None:
        """With anything queued, a large write queues behind it: order is kept."""
        data = _pattern(BIG, 3)
        transport, peer = await self._pair(5 + 2 * BIG)
        transport.write(b"first")
        sendnow.write(transport, bytearray(data))
        sendnow.write_sequence(transport, [memoryview(data)])
        self.assertEqual(transport._tempDataLen, 5 + 2 * BIG)
        self.assertEqual(await peer.done, b"first" + data + data)

    async def test_unsent_rest_is_queued_with_backpressure(self) -> None:
        """What the kernel does not take is queued, pausing the producer; all of it arrives in order."""
        size = 8 * 1024 * 1024
        data = _pattern(size, 5)
        transport, peer = await self._pair(size + 3)
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        peer.transport.pauseProducing()  # type: ignore[union-attr]
        producer = _Producer()
        transport.registerProducer(producer, True)
        sendnow.write(transport, memoryview(data))
        queued = transport._tempDataLen
        self.assertTrue(0 < queued < size)
        self.assertEqual(producer.events[:1], ["pause"])
        transport.write(b"end")
        peer.transport.resumeProducing()  # type: ignore[union-attr]
        self.assertEqual(await peer.done, data + b"end")
        self.assertNotIn("resume", producer.events[:-1])
        self.assertEqual(producer.events[-1], "resume")

    async def test_sequence_sent_at_once_and_rest_queued(self) -> None:
        """Pieces leave in one sendmsg; a partly sent piece's rest and the pieces after it are queued."""
        size = 4 * 1024 * 1024
        body = _pattern(size, 9)
        pieces: list[bytes | bytearray | memoryview] = [b"head", body, bytearray(b"tail")]
        transport, peer = await self._pair(size + 8)
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        peer.transport.pauseProducing()  # type: ignore[union-attr]
        sendnow.write_sequence(transport, pieces)
        self.assertTrue(0 < transport._tempDataLen < size)
        self.assertTrue(all(type(piece) is bytes for piece in transport._tempDataBuffer))
        peer.transport.resumeProducing()  # type: ignore[union-attr]
        self.assertEqual(await peer.done, b"head" + body + b"tail")

    async def test_disconnecting_transport_gets_an_ordinary_write(self) -> None:
        """After loseConnection a write is left to Twisted, which queues it before closing."""
        data = _pattern(BIG, 1)
        transport, peer = await self._pair(BIG)
        transport.loseConnection()
        sendnow.write(transport, bytearray(data))
        self.assertEqual(transport._tempDataLen, BIG)
        self.assertEqual(await peer.done, data)

    async def test_broken_socket_fails_as_twisted_would(self) -> None:
        """A send that fails leaves the data to Twisted's own write, which ends the connection."""
        transport, peer = await self._pair(1)
        lost: Deferred[list[Failure]] = Deferred()
        transport.protocol.connectionLost = (  # type: ignore[attr-defined,method-assign]
            lambda reason: lost.callback([reason])
        )
        transport.socket.shutdown(socket.SHUT_WR)
        sendnow.write(transport, bytearray(BIG))
        self.assertEqual(transport._tempDataLen, BIG)
        [reason] = await lost
        self.assertTrue(reason.check(ConnectionLost))


class OtherTransportTests(SynchronousTestCase):
    """Anything but a plain TCP connection gets an ordinary write of C{bytes}."""

    def test_other_transport(self) -> None:
        """A non-TCP transport (TLS, a wrapper, a test double) is written C{bytes}, in order."""
        transport = StringTransport()
        sendnow.write(transport, bytearray(b"a" * BIG))
        sendnow.write(transport, memoryview(b"b" * 10))
        sendnow.write_sequence(transport, [b"c", bytearray(b"d" * BIG)])
        self.assertEqual(transport.value(), b"a" * BIG + b"b" * 10 + b"c" + b"d" * BIG)

