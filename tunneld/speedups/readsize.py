"""
Adaptive read size: read big from a socket while it streams, small otherwise.

Twisted's TCP transport reads with C{socket.recv(transport.bufferSize)}, 64 KiB
by default.  For a bulk body that is sixteen trips through the reactor, the
protocol stack and our framing per MiB; reading up to 1 MiB at a time
saves most of those trips.  But C{recv(1 MiB)} allocates a
1 MiB buffer (an mmap) on every read, even for a 100-byte request, so a
fixed large size makes small exchanges slower.

So each bulk-carrying protocol keeps a L{ReadSize} for its socket and reports
the length of every read:

  - a read that filled the current size means more was waiting: the size
    grows four-fold, up to L{LARGEST} (1 MiB);
  - a read below an eighth of a grown size means the burst is over: the
    size drops straight back to L{SMALLEST} (64 KiB, Twisted's default).

Per read this is two integer comparisons; only a change touches the
transport.

C{bufferSize} is also the write-buffer level above which a transport pauses
the producer streaming into it, so a grown socket lets up to 1 MiB (not
64 KiB) queue for writing before its producer is paused.  That stays
bounded, and it drops back with the read size.

The same sockets also send up to L{LARGEST} per system call instead of
Twisted's C{SEND_LIMIT} of 128 KiB: a 1 MiB write went out in eight sends,
each its own trip through the reactor and its own wake-up of the reader;
one or two cost less CPU per MiB at both ends of a tunnel.
The limit is only a ceiling, so small writes are unchanged.

Only a plain TCP transport is adjusted.  Under TLS the protocol sees
decrypted records (at most 16 KiB), not reads, so there is nothing to
learn from their length: such sockets keep Twisted's default.

C{bufferSize} and C{SEND_LIMIT} are attributes of Twisted's transport that
its documentation does not offer for changing: L{TRICK} checks once that
its reads and sends still obey them.  Without the trick a L{ReadSize}
notes nothing and every socket keeps Twisted's sizes.
"""

from __future__ import annotations

from typing import cast

from twisted.internet.protocol import Protocol
from twisted.internet.tcp import Connection

from tunneld.speedups.probe import probe_connection
from tunneld.speedups.switches import Trick

__all__ = ["LARGEST", "SMALLEST", "TRICK", "ReadSize"]

SMALLEST = 64 * 1024
LARGEST = 1024 * 1024


class _Reads(Protocol):
    def __init__(self) -> None:
        self.reads: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.reads.append(data)


def _check() -> str | None:
    """
    Twisted's TCP transport reads C{bufferSize} bytes at a time and sends at
    most C{SEND_LIMIT} per system call, both per instance.
    """
    for name in ("bufferSize", "SEND_LIMIT"):
        if not isinstance(getattr(Connection, name, None), int):
            return f"Twisted's TCP transport has no integer {name}"
    reads = _Reads()
    with probe_connection(reads) as (transport, theirs, _):
        theirs.sendall(b"0123456789")
        transport.bufferSize = 4
        transport.doRead()
        if reads.reads != [b"0123"]:
            return f"with bufferSize 4, Twisted read {reads.reads!r}"
        transport.SEND_LIMIT = 3
        sent = transport.writeSomeData(b"abcdef")
        if sent != 3:
            return f"with SEND_LIMIT 3, Twisted sent {sent!r} bytes of 6"
    return None


TRICK = Trick(
    "read_size",
    touches="the bufferSize and SEND_LIMIT of Twisted's TCP transport",
    fallback="Twisted's read and send sizes (64 KiB, 128 KiB)",
    check=_check,
)


class ReadSize:
    """
    The read size of one TCP socket, adapted to the lengths of its reads.
    """

    __slots__ = ("size", "_socket")

    def __init__(self, transport: object) -> None:
        """
        @param transport: the protocol's transport; only a plain TCP one
            (not TLS, not a wrapper) is ever adjusted, and only when the
            trick is on.
        """
        self.size = SMALLEST
        plain = isinstance(transport, Connection) and not transport.TLS and TRICK.active
        self._socket = cast(Connection, transport) if plain else None
        if self._socket is not None:
            self._socket.SEND_LIMIT = LARGEST

    def read(self, length: int) -> None:
        """Note one read of C{length} bytes; grow or shrink the size after it."""
        size = self.size
        if length >= size:
            if size < LARGEST and self._socket is not None:
                self.size = self._socket.bufferSize = min(size * 4, LARGEST)
        elif size > SMALLEST and length < size >> 3:
            self.size = SMALLEST
            if self._socket is not None:
                self._socket.bufferSize = SMALLEST
