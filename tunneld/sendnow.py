# -*- test-case-name: tests.test_sendnow -*-
"""
Large writes sent on the socket at once, without a copy into C{bytes}.

Twisted's TCP transport takes only C{bytes}, queues every write and, when
the socket is writable, joins what is queued into one C{bytes} and sends
it.  For a bulk body that is two copies of each byte in user space before
the kernel's own (one into C{bytes}, one in the join), an C{epoll_ctl} to
start watching for writability and another to stop, and a producer paused
and resumed whenever the queue passes the transport's C{bufferSize}.

L{write} and L{write_sequence} skip all that when nothing is queued: the
data (C{bytes}, C{bytearray} or a C{memoryview}, e.g. of a buffer that is
about to be reused) goes straight to C{send}/C{sendmsg}, and only what the
kernel did not take is copied into the transport's queue, behind which it
then goes out as any other write would.  So:

  - order is kept: with anything queued, the data is queued behind it;
  - backpressure is kept: the unsent rest is an ordinary write, which
    pauses the transport's producer when it fills the queue;
  - closing is kept: a transport that is disconnecting, or not a plain
    TCP connection (TLS, a wrapper), gets an ordinary write;
  - errors are Twisted's: a C{send} that fails leaves the data to an
    ordinary write, whose own C{send} fails the same way and ends the
    connection as it always would.

Only writes of at least L{DIRECT_FROM} bytes are sent at once.  Small writes
gain nothing from it and lose what the queue gives them: the frames and
replies written during one reactor turn leave in one system call (sending
each small write at once cost small requests about a fifth more CPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.tcp import Connection

__all__ = ["DIRECT_FROM", "write", "write_sequence"]

# Writes at least this long are sent at once when nothing is queued.
DIRECT_FROM = 32 * 1024

Buffer = bytes | bytearray | memoryview


def _idle_socket(transport: Any) -> Any:
    """C{transport}'s socket if it is a plain, open TCP connection with nothing queued; else None."""
    if (
        isinstance(transport, Connection)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
    ):
        return transport.socket
    return None


def write(transport: Any, data: Buffer) -> None:
    """
    C{transport.write(data)}, for any buffer: sent at once when it is large
    and nothing is queued, else (or for what the kernel did not take)
    copied into C{bytes} and queued.  C{data} is not used after this returns.
    """
    size = len(data)
    if size >= DIRECT_FROM:
        sock = _idle_socket(transport)
        if sock is not None:
            try:
                sent = sock.send(data)
            except OSError:
                sent = 0  # full (EAGAIN), or broken: Twisted's own send finds out
            if sent >= size:
                return
            data = memoryview(data)[sent:]
    transport.write(data if type(data) is bytes else bytes(data))


def write_sequence(transport: Any, pieces: Sequence[Buffer]) -> None:
    """
    C{transport.writeSequence(pieces)}, for any buffers, as L{write}: the
    pieces go out in one C{sendmsg} when they are large and nothing is queued.
    """
    size = sum(map(len, pieces))
    if size >= DIRECT_FROM:
        sock = _idle_socket(transport)
        if sock is not None:
            try:
                sent = sock.sendmsg(pieces)
            except OSError:
                sent = 0
            if sent >= size:
                return
            rest: list[Buffer] = []
            for piece in pieces:
                if sent >= len(piece):
                    sent -= len(piece)
                    continue
                rest.append(memoryview(piece)[sent:] if sent else piece)
                sent = 0
            pieces = rest
    transport.writeSequence([piece if type(piece) is bytes else bytes(piece) for piece in pieces])
