"""
Tests for L{tunneld.speedups.bulkwrite}: large writes go to the socket at once, and
everything else about a Twisted write (order, backpressure, closing) holds.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.abstract import FileDescriptor
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

from tests.switches import switch_tricks
from tunneld.speedups import bulkwrite
from tunneld.speedups.switches import Trick

reactor: Any = _reactor

BIG = 256 * 1024
# Writes queued for the end of the turn, as a listener's connections share them.
TURN = bulkwrite.EndOfTurn()


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


async def _pair(case: TestCase, expected: int) -> tuple[Connection, _Collect]:
    """A connected pair: our sending transport and the peer's collecting protocol."""
    peer = _Collect(expected)
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: peer), interface="127.0.0.1")
    case.addCleanup(port.stopListening)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    sender = await endpoint.connect(Factory.forProtocol(Protocol))
    await peer.made
    transport: Connection = sender.transport  # type: ignore[attr-defined]
    case.addCleanup(lambda: defer.ensureDeferred(_close(transport, peer)))
    return transport, peer


async def _close(transport: Connection, peer: _Collect) -> None:
    if transport.connected:
        transport.abortConnection()
    await peer.lost


class SendNowTests(TestCase):
    """L{bulkwrite.write} and L{bulkwrite.write_sequence} on real TCP connections."""

    def setUp(self) -> None:
        switch_tricks(self, True, "bulkwrite")

    async def _pair(self, expected: int) -> tuple[Connection, _Collect]:
        return await _pair(self, expected)

    async def test_large_write_is_sent_at_once(self) -> None:
        """A large bytearray or memoryview with nothing queued leaves at once, nothing queued behind."""
        data = _pattern(BIG)
        transport, peer = await self._pair(2 * BIG)
        bulkwrite.write(transport, bytearray(data))
        self.assertEqual((transport._tempDataLen, len(transport.dataBuffer)), (0, 0))
        bulkwrite.write(transport, memoryview(data))
        self.assertEqual(await peer.done, data + data)

    async def test_small_write_is_queued(self) -> None:
        """A small write is an ordinary queued write (it leaves with the reactor turn's others)."""
        transport, peer = await self._pair(100)
        bulkwrite.write(transport, bytearray(b"x" * 100))
        self.assertEqual(transport._tempDataBuffer, [b"x" * 100])
        self.assertEqual(await peer.done, b"x" * 100)

    async def test_write_now(self) -> None:
        """A small write_now leaves at once, behind this turn's untried writes, nothing queued."""
        transport, peer = await self._pair(10)
        transport.write(b"first")
        bulkwrite.write_now(transport, b"again")
        self.assertEqual((transport._tempDataLen, transport._tempDataBuffer), (0, []))
        self.assertNotIn(transport, reactor.getWriters())
        self.assertEqual(await peer.done, b"firstagain")

    async def test_write_now_behind_queued(self) -> None:
        """Behind a large queued write, write_now queues: order is kept."""
        first = b"f" * bulkwrite.DIRECT_FROM
        transport, peer = await self._pair(len(first) + 5)
        transport.write(first)
        bulkwrite.write_now(transport, b"after")
        self.assertEqual(transport._tempDataBuffer, [first, b"after"])
        self.assertEqual(await peer.done, first + b"after")

    async def test_small_untried_writes_go_first(self) -> None:
        """Small writes queued this turn leave first, in the same system call, and nothing stays queued."""
        data = _pattern(BIG, 3)
        transport, peer = await self._pair(5 + BIG)
        transport.write(b"first")
        bulkwrite.write(transport, bytearray(data))
        self.assertEqual((transport._tempDataLen, transport._tempDataBuffer), (0, []))
        self.assertNotIn(transport, reactor.getWriters())
        self.assertEqual(await peer.done, b"first" + data)

    async def test_paused_producer_is_resumed(self) -> None:
        """Sending what was queued leaves resuming a paused producer to Twisted, which does it."""
        transport, peer = await self._pair(5 + BIG)
        producer = _Producer()
        transport.registerProducer(producer, True)
        transport.producerPaused = True
        transport.write(b"first")
        bulkwrite.write(transport, bytearray(BIG))
        await peer.done
        while producer.events != ["resume"]:
            await _turn()

    async def test_queued_behind_large_writes(self) -> None:
        """Behind a large queued write, a large write queues too: order is kept."""
        data = _pattern(BIG, 4)
        first = b"f" * bulkwrite.DIRECT_FROM
        transport, peer = await self._pair(len(first) + 2 * BIG)
        transport.write(first)
        bulkwrite.write(transport, bytearray(data))
        bulkwrite.write_sequence(transport, [memoryview(data)])
        self.assertEqual(transport._tempDataLen, len(first) + 2 * BIG)
        self.assertEqual(await peer.done, first + data + data)

    async def test_unsent_rest_is_queued_with_backpressure(self) -> None:
        """What the kernel does not take is queued, pausing the producer; all of it arrives in order."""
        size = 8 * 1024 * 1024
        data = _pattern(size, 5)
        transport, peer = await self._pair(size + 3)
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        peer.transport.pauseProducing()  # type: ignore[union-attr]
        producer = _Producer()
        transport.registerProducer(producer, True)
        bulkwrite.write(transport, memoryview(data))
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
        bulkwrite.write_sequence(transport, pieces)
        self.assertTrue(0 < transport._tempDataLen < size)
        self.assertTrue(all(type(piece) is bytes for piece in transport._tempDataBuffer))
        peer.transport.resumeProducing()  # type: ignore[union-attr]
        self.assertEqual(await peer.done, b"head" + body + b"tail")

    async def test_disconnecting_transport_gets_an_ordinary_write(self) -> None:
        """After loseConnection a write is left to Twisted, which queues it before closing."""
        data = _pattern(BIG, 1)
        transport, peer = await self._pair(BIG)
        transport.loseConnection()
        bulkwrite.write(transport, bytearray(data))
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
        bulkwrite.write(transport, bytearray(BIG))
        self.assertEqual(transport._tempDataLen, BIG)
        [reason] = await lost
        self.assertTrue(reason.check(ConnectionLost))


    async def test_queue_keeps_the_buffer_uncopied(self) -> None:
        """L{bulkwrite.EndOfTurn.queue} queues a view as it is, in order with other writes, and it all arrives."""
        data = _pattern(BIG, 6)
        view = memoryview(bytearray(data))[1:]
        transport, peer = await self._pair(BIG + 2)
        transport.write(b"<")
        TURN.queue(transport, view)
        transport.write(b">")
        TURN.queue(transport, b"!")
        self.assertIs(transport._tempDataBuffer[1], view)
        self.assertEqual(await peer.done, b"<" + data[1:] + b">!")

    async def test_queued_writes_leave_at_the_end_of_the_turn(self) -> None:
        """
        What L{bulkwrite.EndOfTurn.queue} queues on an idle socket leaves when the
        reactor turn ends, in one send, the socket never watched for writability.
        """
        transport, peer = await self._pair(8)
        TURN.queue(transport, b"head")
        TURN.queue(transport, memoryview(bytearray(b"body")))
        self.assertEqual(transport._tempDataLen, 8)
        self.assertNotIn(transport, reactor.getWriters())
        await _turn()
        self.assertEqual(transport._tempDataLen, 0)
        self.assertNotIn(transport, reactor.getWriters())
        self.assertEqual(await peer.done, b"headbody")

    async def test_queued_writes_keep_their_place(self) -> None:
        """A large write, or closing, in the same turn takes what was queued first, in order."""
        data = _pattern(BIG, 9)
        transport, peer = await self._pair(4 + BIG + 4)
        TURN.queue(transport, b"head")
        bulkwrite.write(transport, bytearray(data))
        TURN.queue(transport, b"tail")
        transport.loseConnection()
        self.assertEqual(await peer.done, b"head" + data + b"tail")
        await peer.lost

    async def test_queue_pauses_the_producer(self) -> None:
        """Queueing past the transport's bufferSize pauses its producer, as Twisted's write does."""
        transport, peer = await self._pair(2 * BIG)
        producer = _Producer()
        transport.registerProducer(producer, True)
        TURN.queue(transport, bytearray(2 * BIG))
        self.assertEqual(producer.events, ["pause"])
        await peer.done
        while producer.events[-1] != "resume":
            await _turn()

    async def test_queue_after_the_write_side_closed(self) -> None:
        """Once the write side is shut, a queued buffer is dropped, as Twisted's write drops it."""
        transport, peer = await self._pair(1)
        transport.loseWriteConnection()
        while not transport._writeDisconnected:
            await _turn()
        TURN.queue(transport, bytearray(BIG))
        self.assertEqual(transport._tempDataLen, 0)


    async def test_forward_sends_long_and_queues_short(self) -> None:
        """L{bulkwrite.EndOfTurn.forward}: a long view leaves at once, a short one is queued uncopied."""
        long = _pattern(bulkwrite.ALONE_FROM, 7)
        short = memoryview(bytearray(_pattern(bulkwrite.ALONE_FROM - 1, 8)))
        transport, peer = await self._pair(len(long) + len(short))
        TURN.forward(transport, memoryview(long))
        self.assertEqual(transport._tempDataLen, 0)
        TURN.forward(transport, short)
        self.assertIs(transport._tempDataBuffer[0], short)
        self.assertEqual(await peer.done, long + bytes(short))

    async def test_forward_queues_the_rest_uncopied(self) -> None:
        """What the kernel does not take of a forwarded view is queued as a view of it."""
        size = 8 * 1024 * 1024
        data = _pattern(size, 10)
        transport, peer = await self._pair(size)
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        peer.transport.pauseProducing()  # type: ignore[union-attr]
        view = memoryview(data)
        TURN.forward(transport, view)
        [rest] = transport._tempDataBuffer
        self.assertIs(type(rest), memoryview)
        self.assertIs(memoryview(rest).obj, data)
        peer.transport.resumeProducing()  # type: ignore[union-attr]
        self.assertEqual(await peer.done, data)

    async def test_slow_reader_holds_its_frames_not_their_reads(self) -> None:
        """Frames of many 1 MiB reads queued for a reader that does not read hold their own bytes, not the reads."""
        frame, reads = 16 * 1024, 32
        transport, peer = await self._pair(frame * reads)
        peer.transport.pauseProducing()  # type: ignore[union-attr]
        self.addCleanup(peer.transport.resumeProducing)  # type: ignore[union-attr]
        sent = []
        for i in range(reads):
            read = bytes([i]) * (1024 * 1024)
            sent.append(read[:frame])
            TURN.forward(transport, memoryview(read)[:frame])
        held = sum(
            len(piece.obj) if type(piece) is memoryview else len(piece)  # type: ignore[arg-type]
            for piece in transport._tempDataBuffer
        ) + len(transport.dataBuffer)
        self.assertLessEqual(held, 2 * frame * reads)
        peer.transport.resumeProducing()  # type: ignore[union-attr]
        self.assertEqual(await peer.done, b"".join(sent))


class OtherTransportTests(SynchronousTestCase):
    """Anything but a plain TCP connection gets an ordinary write of C{bytes}."""

    def test_other_transport(self) -> None:
        """A non-TCP transport (TLS, a wrapper, a test double) is written C{bytes}, in order."""
        transport = StringTransport()
        bulkwrite.write(transport, bytearray(b"a" * BIG))
        bulkwrite.write(transport, memoryview(b"b" * 10))
        bulkwrite.write_sequence(transport, [b"c", bytearray(b"d" * BIG)])
        TURN.queue(transport, memoryview(b"e" * 10))
        bulkwrite.write_now(transport, b"f")
        self.assertEqual(
            transport.value(), b"a" * BIG + b"b" * 10 + b"c" + b"d" * BIG + b"e" * 10 + b"f"
        )



async def _turn() -> None:
    """Let the reactor run once."""
    d: Deferred[None] = Deferred()
    reactor.callLater(0, d.callback, None)
    await d


class _ShortSocket:
    """A socket whose send and sendmsg take at most C{take} bytes, or raise C{error}."""

    def __init__(self, take: int, error: OSError | None = None) -> None:
        self.take = take
        self.error = error
        self.sent = b""

    def send(self, data: bytes) -> int:
        return self.sendmsg([data])

    def sendmsg(self, pieces: list[bytes]) -> int:
        if self.error is not None:
            raise self.error
        data = b"".join(pieces)[: self.take]
        self.sent += data
        return len(data)


def _short_transport(take: int, error: OSError | None = None) -> tuple[Any, _ShortSocket, StringTransport]:
    """
    A TCP transport over a L{_ShortSocket}; what it queues lands in a
    L{StringTransport} (for the bytes, in order).
    """
    sock = _ShortSocket(take, error)
    queued = StringTransport()
    transport: Any = Connection.__new__(Connection)
    transport.TLS = False
    transport.connected = True
    transport.disconnecting = False
    transport.socket = sock
    transport._tempDataBuffer = []
    transport._tempDataLen = 0
    transport.producer = None
    transport.writeSequence = queued.writeSequence
    transport.write = queued.write
    return transport, sock, queued


class FlushTests(SynchronousTestCase):
    """L{bulkwrite.flush}: one turn's pieces sent at once, whatever their size."""

    def setUp(self) -> None:
        switch_tricks(self, True, "bulkwrite")

    def test_what_the_socket_did_not_take_is_queued_in_order(self) -> None:
        """Wherever a partial send stops, what was sent plus what is queued is every byte, in order, as bytes."""
        pieces = [b"head", _pattern(1000), bytearray(b"x"), memoryview(_pattern(300))]
        whole = b"".join(pieces)
        for take in (1, 4, 5, 1003, 1004, 1005, 1305, len(whole)):
            transport, sock, queued = _short_transport(take)
            written: list[bytes] = []
            transport.writeSequence = written.extend
            bulkwrite.flush(transport, list(pieces))
            self.assertTrue(all(type(piece) is bytes for piece in written))
            self.assertEqual(sock.sent + b"".join(written), whole)

    def test_small_pieces_are_sent_at_once(self) -> None:
        """Unlike L{bulkwrite.write_sequence}, a few bytes leave at once too."""
        transport, sock, queued = _short_transport(100)
        bulkwrite.flush(transport, [b"ab", memoryview(b"cd")])
        self.assertEqual((sock.sent, queued.value()), (b"abcd", b""))

    def test_an_error_leaves_everything_to_the_transport(self) -> None:
        """A socket error (full, or broken) leaves every piece, as bytes, to the transport's own write."""
        for error in (BlockingIOError(), BrokenPipeError()):
            transport, sock, queued = _short_transport(9, error)
            bulkwrite.flush(transport, [b"a", memoryview(b"bc")])
            self.assertEqual((sock.sent, queued.value()), (b"", b"abc"))

    def test_too_many_pieces_for_one_sendmsg(self) -> None:
        """More pieces than one sendmsg takes are left to the transport's own write."""
        transport, sock, queued = _short_transport(10**6)
        pieces = [b"p"] * (bulkwrite.IOV_MAX + 1)
        bulkwrite.flush(transport, pieces)
        self.assertEqual((sock.sent, queued.value()), (b"", b"p" * len(pieces)))


class PinTests(SynchronousTestCase):
    """A view is queued uncopied only while it is a fair share of what it views."""

    def setUp(self) -> None:
        switch_tricks(self, True, "bulkwrite")

    def _queued(self, data: memoryview) -> Any:
        transport, sock, queued = _short_transport(0)
        transport.startWriting = lambda: None
        transport._maybePauseProducer = lambda: None
        transport._writeDisconnected = False
        transport.dataBuffer, transport.offset = b"older", 0  # so it stays queued behind that
        TURN.queue(transport, data)
        [piece] = transport._tempDataBuffer
        self.assertEqual(bytes(piece), bytes(data))
        return piece

    def test_small_view_of_a_large_read_is_copied(self) -> None:
        """A frame shorter than 1/PIN_RATIO of a read of PIN_FROM or more is copied: the read is let go."""
        read = _pattern(1024 * 1024)
        size = len(read) // bulkwrite.PIN_RATIO
        piece = self._queued(memoryview(read)[100 : 100 + size])
        self.assertIs(type(piece), bytes)

    def test_fair_share_is_not_copied(self) -> None:
        """A view longer than 1/PIN_RATIO of its read is queued as it is."""
        read = _pattern(1024 * 1024)
        view = memoryview(read)[: len(read) // bulkwrite.PIN_RATIO + 1]
        self.assertIs(self._queued(view), view)

    def test_view_of_a_small_read_is_not_copied(self) -> None:
        """A small view of a read shorter than PIN_FROM is queued as it is: that read costs little."""
        read = bytearray(_pattern(bulkwrite.PIN_FROM - 1))
        view = memoryview(read)[:10]
        self.assertIs(self._queued(view), view)

    def test_view_of_a_view_counts_the_whole_read(self) -> None:
        """A slice of a slice is measured against the read underneath both."""
        read = _pattern(1024 * 1024)
        view = memoryview(memoryview(read)[: len(read) // 2])[:1000]
        self.assertIs(type(self._queued(view)), bytes)


class FallbackTests(TestCase):
    """With the trick off (switched off, or a Twisted whose write queue is not as expected): ordinary writes."""

    async def test_ordinary_writes_when_off(self) -> None:
        """Each entry point falls back to transport.write of bytes, and every byte arrives in order."""
        switch_tricks(self, False, "bulkwrite")
        big = _pattern(BIG, 11)
        connection, peer = await _pair(self, 4 * BIG + 3)
        transport: Any = connection
        writes: list[bytes] = []
        ordinary = transport.write
        transport.write = lambda data: (writes.append(data), ordinary(data))
        sequences: list[list[bytes]] = []
        ordinary_sequence = transport.writeSequence
        transport.writeSequence = lambda data: (sequences.append(list(data)), ordinary_sequence(data))
        bulkwrite.write(transport, memoryview(big))
        TURN.queue(transport, memoryview(big))
        TURN.forward(transport, bytearray(big))
        bulkwrite.flush(transport, [b"a", memoryview(big), b"b"])
        bulkwrite.write_sequence(transport, [b"c"])
        self.assertTrue(writes and sequences)
        self.assertTrue(all(type(piece) is bytes for piece in writes + sum(sequences, [])))
        self.assertEqual(await peer.done, big * 3 + b"a" + big + b"bc")

    def test_check_passes_here(self) -> None:
        """The installed Twisted's write queue is what the trick expects."""
        self.assertIsNone(Trick("bulkwrite", "", "", bulkwrite._check).problem)

    def test_check_names_missing_state(self) -> None:
        """A Twisted without one of the private names fails the check, which names it; the trick stays off."""
        self.patch(bulkwrite, "_PRIVATE", (*bulkwrite._PRIVATE, "_noSuchQueueState"))
        trick = Trick("bulkwrite", "", "", bulkwrite._check)
        self.assertFalse(trick.switch(True))
        self.assertIn("_noSuchQueueState", trick.problem or "")

    def test_check_notices_a_changed_queue(self) -> None:
        """A Twisted whose write no longer lands in _tempDataBuffer fails the check."""
        self.patch(FileDescriptor, "write", lambda self, data: self.writeSomeData(data))
        problem = Trick("bulkwrite", "", "", bulkwrite._check).problem
        self.assertIn("_tempDataBuffer", problem or "")
