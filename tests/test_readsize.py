"""
Tests for L{tunneld.speedups.readsize}: a socket's read size follows its reads.
"""

from __future__ import annotations

from twisted.internet.tcp import Connection
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.test.proto_helpers import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tests.switches import switch_tricks
from tunneld.speedups import readsize
from tunneld.speedups.readsize import LARGEST, SMALLEST, ReadSize
from tunneld.speedups.switches import Trick


class _Socket(Connection):
    """A plain TCP transport with no socket: only C{bufferSize} is used."""

    def __init__(self) -> None:
        pass


class ReadSizeTests(SynchronousTestCase):
    """L{ReadSize} grows on full reads and shrinks on far smaller ones."""

    def setUp(self) -> None:
        switch_tricks(self, True, "read_size")

    def test_starts_at_twisteds_default(self) -> None:
        """A new socket reads 64 KiB, Twisted's default, and is not touched."""
        sock = _Socket()
        size = ReadSize(sock)
        self.assertEqual((size.size, sock.bufferSize), (SMALLEST, SMALLEST))
        self.assertNotIn("bufferSize", vars(sock))

    def test_sends_up_to_largest(self) -> None:
        """A plain TCP socket sends up to 1 MiB per call, not Twisted's 128 KiB."""
        sock = _Socket()
        ReadSize(sock)
        self.assertEqual((sock.SEND_LIMIT, Connection.SEND_LIMIT), (LARGEST, 128 * 1024))

    def test_small_reads_change_nothing(self) -> None:
        """Reads below the size leave it at 64 KiB."""
        sock = _Socket()
        size = ReadSize(sock)
        for length in (1, 100, SMALLEST // 8, SMALLEST - 1):
            size.read(length)
        self.assertEqual((size.size, sock.bufferSize), (SMALLEST, SMALLEST))
        self.assertNotIn("bufferSize", vars(sock))

    def test_full_reads_grow_fourfold_up_to_largest(self) -> None:
        """Each read that fills the size quadruples it, up to 1 MiB."""
        sock = _Socket()
        size = ReadSize(sock)
        seen = []
        for _ in range(4):
            size.read(size.size)
            seen.append((size.size, sock.bufferSize))
        self.assertEqual(
            seen,
            [(4 * SMALLEST, 4 * SMALLEST), (LARGEST, LARGEST), (LARGEST, LARGEST), (LARGEST, LARGEST)],
        )

    def test_partly_full_reads_keep_a_grown_size(self) -> None:
        """Reads of an eighth of a grown size or more keep it."""
        sock = _Socket()
        size = ReadSize(sock)
        size.read(SMALLEST)
        size.read(4 * SMALLEST)
        size.read(LARGEST // 8)
        size.read(LARGEST - 1)
        self.assertEqual((size.size, sock.bufferSize), (LARGEST, LARGEST))

    def test_far_smaller_read_shrinks_back(self) -> None:
        """One read below an eighth of a grown size drops it back to 64 KiB."""
        sock = _Socket()
        size = ReadSize(sock)
        size.read(SMALLEST)
        size.read(4 * SMALLEST)
        size.read(LARGEST // 8 - 1)
        self.assertEqual((size.size, sock.bufferSize), (SMALLEST, SMALLEST))
        size.read(SMALLEST)
        self.assertEqual((size.size, sock.bufferSize), (4 * SMALLEST, 4 * SMALLEST))

    def test_other_transports_are_left_alone(self) -> None:
        """A TLS wrapper or a non-TCP transport keeps its size; the rule still runs."""
        wrapper = TLSMemoryBIOProtocol.__new__(TLSMemoryBIOProtocol)
        for transport in (StringTransport(), wrapper):
            size = ReadSize(transport)
            size.read(SMALLEST)
            self.assertEqual(size.size, SMALLEST)
            self.assertNotIn("bufferSize", vars(transport))
            self.assertNotIn("SEND_LIMIT", vars(transport))

    def test_tls_on_a_tcp_socket_is_left_alone(self) -> None:
        """A TCP socket that has started TLS keeps Twisted's default."""
        sock = _Socket()
        sock.TLS = True
        size = ReadSize(sock)
        size.read(SMALLEST)
        self.assertEqual(size.size, SMALLEST)
        self.assertNotIn("bufferSize", vars(sock))
        self.assertNotIn("SEND_LIMIT", vars(sock))


class FallbackTests(SynchronousTestCase):
    """With the trick off, sockets keep Twisted's sizes; the check sees a Twisted that ignores them."""

    def test_off_leaves_every_socket_alone(self) -> None:
        """Off: full reads change nothing, and the socket keeps Twisted's send limit."""
        switch_tricks(self, False, "read_size")
        sock = _Socket()
        size = ReadSize(sock)
        for _ in range(3):
            size.read(size.size)
        self.assertEqual(size.size, SMALLEST)
        self.assertNotIn("bufferSize", vars(sock))
        self.assertNotIn("SEND_LIMIT", vars(sock))

    def test_check_passes_here(self) -> None:
        """The installed Twisted reads bufferSize and sends at most SEND_LIMIT."""
        self.assertIsNone(Trick("read_size", "", "", readsize._check).problem)

    def test_check_notices_a_fixed_read_size(self) -> None:
        """A Twisted that reads a fixed size whatever bufferSize says fails the check."""
        self.patch(Connection, "doRead", lambda self: self._dataReceived(self.socket.recv(65536)))
        self.assertIn("bufferSize 4", Trick("read_size", "", "", readsize._check).problem or "")

    def test_check_notices_a_fixed_send_limit(self) -> None:
        """A Twisted that sends whatever SEND_LIMIT says fails the check."""
        self.patch(Connection, "writeSomeData", lambda self, data: self.socket.send(data))
        self.assertIn("SEND_LIMIT 3", Trick("read_size", "", "", readsize._check).problem or "")
