# -*- test-case-name: tests.test_bulkwrite -*-
"""
Bulk bytes written to a TCP transport without the copies Twisted makes.

Twisted's TCP transport takes only C{bytes}, queues every write and, when
the socket is writable, joins what is queued into one C{bytes} and sends
it.  For a bulk body that is two copies of each byte in user space before
the kernel's own (one into C{bytes}, one in the join), an C{epoll_ctl} to
start watching for writability and another to stop, and a producer paused
and resumed whenever the queue passes the transport's C{bufferSize}.  Two
ways around that, each for its own case:

  - L{write} (and L{write_sequence}) sends at once: when nothing is queued
    but this reactor turn's small writes (they go first, in the same
    C{sendmsg}), a large buffer (C{bytes}, C{bytearray}, C{memoryview}) goes
    straight to the kernel, and only what it did not take is copied into
    the transport's queue.  For one large write per read (the agent's
    frames of an upstream read): no copy, no queue, no producer pause.
  - L{EndOfTurn.queue} queues a buffer that will never change as it is, uncopied;
    Twisted's join before the send is then its only copy.  For many
    medium writes in one turn (128 KiB Data frames, several per link
    read): sending each at once would cost a system call each, and on
    loopback a send also runs the receiver's TCP processing, so fewer,
    larger sends are cheaper than the copy they would save.  What it
    queues on a socket with nothing else waiting is sent at the end of
    the reactor turn, in one system call per socket, without asking the
    reactor to watch the socket for writability: an edge answering fifty
    small requests per link read spared two C{epoll_ctl} calls and a
    poll per response.
  - L{EndOfTurn.forward} chooses between the two for a buffer that never changes by
    its length (the edge's Data frames, which a peer may send up to 1 MiB
    long).
  - L{flush} sends at once whatever the size: for a link that writes once
    per reactor turn (the gRPC link's HTTP/2 output), whose small writes
    would only wait for the next turn in the queue.

A buffer queued uncopied keeps alive the whole object it is a view of: a
16 KiB Data frame of a 1 MiB read keeps the 1 MiB.  Queued for a reader
that is slow, or for many readers each holding a frame of a different read,
that is many times the bytes actually waiting.  So a view is queued as it
is only while it is a fair share of its read: one shorter than
1/L{PIN_RATIO} of a read at least L{PIN_FROM} long is copied, and the read
is let go.  The copy is never more than 1/L{PIN_RATIO} of the memory it
frees; a whole frame, a large rest, or a small read is queued uncopied.

Everything else about a Twisted write holds:

  - order: with anything but small untried writes queued, data queues
    behind it;
  - backpressure: what is queued is an ordinary write, which pauses the
    transport's producer when it fills the queue;
  - closing: a transport that is disconnecting, or not a plain TCP
    connection (TLS, a wrapper), gets an ordinary write of C{bytes};
  - other Twisted versions: the write queue's private state used here
    (L{_PRIVATE}) is checked once (L{TRICK}); a Twisted without it, or
    the trick switched off, gets ordinary writes of C{bytes} throughout;
  - errors: a C{send} that fails leaves the data to an ordinary write,
    whose own C{send} fails the same way and ends the connection as it
    always would.

L{write} sends only writes of at least L{DIRECT_FROM} bytes at once.  Small
writes gain nothing from it and lose what the queue gives them: the frames
and replies written during one reactor turn leave in one system call
(sending each small write at once cost small requests more CPU: see
docs/benchmarks.md, "What the speed tricks buy").
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet.tcp import Connection

from tunneld.speedups.probe import probe_connection
from tunneld.speedups.switches import Trick

__all__ = [
    "ALONE_FROM", "DIRECT_FROM", "PIN_FROM", "PIN_RATIO", "TRICK",
    "EndOfTurn", "flush", "write", "write_now", "write_sequence",
]

# Writes at least this long are sent at once when nothing is queued.
DIRECT_FROM = 32 * 1024
# A buffer that never changes is worth a system call of its own from this
# length (a Data frame: a whole upstream read, one or two per link read now
# that frames may be 1 MiB); shorter ones are queued, to leave with the
# others of their reactor turn.
ALONE_FROM = 32 * 1024

# A view shorter than 1/PIN_RATIO of the object it views, when that is at
# least PIN_FROM long, is copied before it is queued (see the docstring).
PIN_RATIO = 16
PIN_FROM = 256 * 1024
# The most pieces one sendmsg takes (IOV_MAX is 1024 on Linux).
IOV_MAX = 1024

Buffer = bytes | bytearray | memoryview

# The private state of Twisted's FileDescriptor write queue used here.
_PRIVATE = (
    "_tempDataBuffer", "_tempDataLen", "dataBuffer", "offset",
    "_writeDisconnecting", "_writeDisconnected", "_maybePauseProducer",
)


def _check() -> str | None:
    """
    Twisted's TCP write queue is as this module uses it: the private names
    exist, a write lands in C{_tempDataBuffer}, what L{_send_now} leaves is
    what C{doWrite} expects, and C{doWrite} still sends the queue in order.
    """
    if not isinstance(getattr(Connection, "TLS", None), (bool, int)):
        return "twisted.internet.tcp.Connection has no TLS flag"
    with probe_connection() as (transport, theirs, probe):
        missing = [name for name in _PRIVATE if not hasattr(transport, name)]
        if missing:
            return f"Twisted's TCP transport lacks {', '.join(missing)}"
        transport.write(b"ab")
        if transport._tempDataBuffer != [b"ab"] or transport._tempDataLen != 2 or not probe.writing:
            return "a write does not land in Twisted's _tempDataBuffer as expected"
        if _send_now(transport, [b"cd"], 2, checked=True) != []:
            return "a direct send did not go through"
        if transport._tempDataLen or probe.writing:
            return "Twisted's write queue is not empty after a direct send"
        transport.write(b"ef")
        transport.doWrite()
        if transport._tempDataLen or transport.offset != len(transport.dataBuffer) or probe.writing:
            return "Twisted's doWrite leaves its queue in a state this module does not expect"
        received = b""
        while len(received) < 6:
            received += theirs.recv(16)
        if received != b"abcdef":
            return f"the bytes arrived as {received!r}, not b'abcdef'"
    return None


TRICK = Trick(
    "bulkwrite",
    touches="Twisted's TCP write queue (" + ", ".join(_PRIVATE) + ")",
    fallback="ordinary transport writes",
    check=_check,
)


def _plain(transport: Any) -> bool:
    """
    Whether C{transport} is a plain TCP connection (not TLS, not a wrapper)
    whose write queue this module may use: the trick is on.
    """
    return isinstance(transport, Connection) and not transport.TLS and TRICK.active


def _send_now(
    transport: Any, pieces: list[Buffer], size: int, behind: int = DIRECT_FROM,
    checked: bool = False,
) -> list[Buffer] | None:
    """
    Send C{pieces} (C{size} bytes), behind whatever writes are queued and
    not yet tried (if fewer than C{behind} bytes), in one system call; what
    the kernel did not take, or None (nothing sent, nothing changed) when
    the transport is not a plain open TCP connection or has more queued
    than that.  C{checked}: the caller knows the transport is plain (the
    capability check).
    """
    if not (
        (checked or _plain(transport))
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not transport._writeDisconnected
        and transport.offset == len(transport.dataBuffer)
    ):
        return None
    queued = transport._tempDataLen
    if queued:
        # Writes of this reactor turn (a response head, say), not tried yet:
        # they go first, in the same system call.
        if queued >= behind:
            return None
        pieces = [*transport._tempDataBuffer, *pieces]
        size += queued
    if len(pieces) > IOV_MAX:
        return None
    try:
        sent = transport.socket.sendmsg(pieces) if len(pieces) > 1 else transport.socket.send(pieces[0])
    except OSError:
        return None  # full (EAGAIN), or broken: Twisted's own send finds out
    if queued:
        transport._tempDataBuffer = []
        transport._tempDataLen = 0
        transport.dataBuffer = b""  # all of it was sent before
        transport.offset = 0
        if sent >= size and not (
            transport.producer is not None
            and (not transport.streamingProducer or transport.producerPaused)
        ):
            # As Twisted's doWrite does once all is sent (which, when there is
            # a producer to resume, it is still left to do).
            transport.stopWriting()
    if sent >= size:
        return []
    rest: list[Buffer] = []
    for piece in pieces:
        if sent >= len(piece):
            sent -= len(piece)
            continue
        rest.append(memoryview(piece)[sent:] if sent else piece)
        sent = 0
    return rest


def write(transport: Any, data: Buffer) -> None:
    """
    C{transport.write(data)}, for any buffer: sent at once when it is large
    and nothing but small untried writes is queued (they go first), else (or
    for what the kernel did not take) copied into C{bytes} and queued.
    C{data} is not used after this returns.
    """
    size = len(data)
    if size >= DIRECT_FROM:
        rest = _send_now(transport, [data], size)
        if rest is not None:
            if rest:
                _queue(transport, rest)
            return
    transport.write(data if type(data) is bytes else bytes(data))


def write_now(transport: Any, data: bytes) -> None:
    """
    C{transport.write(data)} for the only write of its reactor turn (an
    agent's bodiless request to its upstream), whatever its size: sent at
    once as by L{write}, which spares the two C{epoll_ctl} calls and the
    poll that a queued write costs.
    """
    rest = _send_now(transport, [data], len(data))
    if rest is None:
        transport.write(data)
    elif rest:
        _queue(transport, rest)


def write_sequence(transport: Any, pieces: Sequence[Buffer]) -> None:
    """
    C{transport.writeSequence(pieces)}, for any buffers, as L{write}: the
    pieces go out in one C{sendmsg} when they are large.
    """
    size = sum(map(len, pieces))
    if size >= DIRECT_FROM:
        rest = _send_now(transport, list(pieces), size)
        if rest is not None:
            if rest:
                _queue(transport, rest)
            return
    _queue(transport, pieces)


def flush(transport: Any, pieces: Sequence[Buffer]) -> None:
    """
    Write C{pieces}, one reactor turn's output, as L{write_sequence} does
    but sent at once whatever their size (when nothing but small untried
    writes is queued): a link that writes once per turn gains nothing from
    queueing it for the next.
    """
    rest = _send_now(transport, list(pieces), sum(map(len, pieces)))
    if rest is None:
        rest = list(pieces)
    if rest:
        _queue(transport, rest)


def _queue(transport: Any, pieces: Sequence[Buffer]) -> None:
    """An ordinary write of C{pieces}, each copied into C{bytes} unless it is."""
    transport.writeSequence([piece if type(piece) is bytes else bytes(piece) for piece in pieces])


def _pins(view: memoryview) -> bool:
    """Whether queueing C{view} uncopied would keep alive much more than itself."""
    base = view.obj
    whole = len(base) if type(base) is bytes or type(base) is bytearray else view.nbytes
    return whole >= PIN_FROM and view.nbytes * PIN_RATIO <= whole


class EndOfTurn:
    """
    Writes of buffers that never change, queued uncopied and sent at the end
    of the reactor turn: one system call per socket, and no writability
    watch for a socket that takes it all.  One per owner of many sockets
    (the edge's public listener), so that a turn that writes to fifty of
    them schedules one call, not fifty.
    """

    __slots__ = ("_queued", "_send_call")

    def __init__(self) -> None:
        # Transports with writes queued by queue() this turn, in order, and
        # the call that sends them when the turn is over.
        self._queued: dict[Any, None] = {}
        self._send_call: Any = None

    def queue(self, transport: Any, data: Buffer) -> None:
        """
        C{transport.write(data)} for a buffer that will never change: on a
        plain TCP connection it is queued as it is (Twisted's join before the
        send copies it once), unless it is a small view of a large object
        (L{PIN_RATIO}), which is copied, and sent at the end of the reactor
        turn (L{_send_queued}); else written as C{bytes}.
        """
        if not _plain(transport):
            transport.write(bytes(data))
            return
        # Twisted's write, less its check that data is bytes.
        if not data or not transport.connected or transport._writeDisconnected:
            return
        if type(data) is memoryview and _pins(data):
            data = data.tobytes()
        transport._tempDataBuffer.append(data)
        transport._tempDataLen += len(data)
        transport._maybePauseProducer()
        if transport.offset != len(transport.dataBuffer) or transport.disconnecting:
            # Twisted is sending (or closing) already: these go with it.
            transport.startWriting()
            return
        self._queued[transport] = None
        if self._send_call is None:
            self._send_call = transport.reactor.callLater(0, self._send_queued)

    def forward(self, transport: Any, data: Buffer) -> None:
        """
        Pass on C{data}, a buffer that will never change: at least
        L{ALONE_FROM} bytes are sent at once as by L{write} (without a copy of
        what the kernel did not take), shorter ones queued as by L{queue}.
        """
        size = len(data)
        if size >= ALONE_FROM:
            rest = _send_now(transport, [data], size)
            if rest is not None:
                for piece in rest:
                    self.queue(transport, piece)
                return
        self.queue(transport, data)

    def _send_queued(self) -> None:
        """
        The end of a reactor turn: send what L{queue} queued, one system call
        per socket; only a socket that did not take it all is watched for
        writability (Twisted's queue does the rest, with its backpressure).
        """
        self._send_call = None
        transports = list(self._queued)
        self._queued.clear()
        for transport in transports:
            if not transport._tempDataLen or not transport.connected:
                continue  # sent with a later write, or gone
            rest = _send_now(transport, [], 0, behind=sys.maxsize)
            if rest is None:
                transport.startWriting()
            elif rest:
                _queue(transport, rest)
            elif transport.producer is not None and transport.producerPaused:
                transport.startWriting()  # Twisted's doWrite resumes it, as after any drain
