"""
A Twisted TCP transport on a socket pair, never run by a reactor: what the
capability checks of the tricks on Twisted's transport try the internals on.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

from twisted.internet.protocol import Protocol
from twisted.internet.tcp import Connection

__all__ = ["Probe", "probe_connection"]


class Probe:
    """
    Just enough of a reactor for a transport that is never run: it records
    whether the transport asked to be watched for writability.
    """

    def __init__(self) -> None:
        self.writing = False

    def addWriter(self, writer: object) -> None:  # noqa: N802
        self.writing = True

    def removeWriter(self, writer: object) -> None:  # noqa: N802
        self.writing = False

    def addReader(self, reader: object) -> None:  # noqa: N802
        pass

    def removeReader(self, reader: object) -> None:  # noqa: N802
        pass


@contextmanager
def probe_connection(protocol: Protocol | None = None) -> Iterator[tuple[Connection, socket.socket, Probe]]:
    """
    A connected Twisted TCP transport (on C{protocol}) over one end of a
    socket pair, the other end (blocking, with a one-second timeout), and
    the stand-in reactor; both sockets are closed afterwards.
    """
    ours, theirs = socket.socketpair()
    try:
        probe = Probe()
        transport = Connection(ours, protocol or Protocol(), probe)  # type: ignore[arg-type]
        transport.connected = True
        if protocol is not None:
            protocol.makeConnection(transport)
        theirs.settimeout(1)
        yield transport, theirs, probe
    finally:
        ours.close()
        theirs.close()
