"""
Real TCP peers for the TCP tunnel tests: upstream services (echo, line
responder, banner) and a client that streams, hashes and half-closes.  All
honour half-close and backpressure themselves, so that what the tests see is
the tunnel's doing.
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.internet import defer, error, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.interfaces import IHalfCloseableProtocol
from zope.interface import implementer

from tests.harness import pattern_bytes


@implementer(IHalfCloseableProtocol)
class EchoUpstream(protocol.Protocol):
    """Echoes everything; after the client's EOF, finishes writing and closes."""

    def connectionMade(self) -> None:  # noqa: N802
        # A full send buffer stops reading: the echo never buffers without bound.
        self.transport.registerProducer(self.transport, True)
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.transport.write(data)

    def readConnectionLost(self) -> None:  # noqa: N802
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:  # noqa: N802
        pass


class LineUpstream(protocol.Protocol):
    """Answers each C{ping N} line with C{pong N}, as an interactive server would."""

    def __init__(self) -> None:
        self.buffer = b""

    def connectionMade(self) -> None:  # noqa: N802
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            self.transport.write(line.replace(b"ping", b"pong") + b"\n")


@implementer(IHalfCloseableProtocol)
class BannerUpstream(protocol.Protocol):
    """Sends a banner and shuts its write side at once; then reads until EOF."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.size = 0
        self.eof: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        self.factory.connections.append(self)
        self.transport.write(b"banner\n")
        self.transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.hash.update(data)
        self.size += len(data)

    def readConnectionLost(self) -> None:  # noqa: N802
        self.eof.callback(None)
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:  # noqa: N802
        pass


async def listen_tcp_upstream(case: Any, kind: type[protocol.Protocol]) -> tuple[int, Any]:
    """Start a C{kind} server on 127.0.0.1 port 0; its port and factory (with C{connections})."""
    factory = protocol.Factory.forProtocol(kind)
    factory.connections = []  # type: ignore[attr-defined]
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
    case.addCleanup(port.stopListening)

    def abort_all() -> None:
        for connection in factory.connections:  # type: ignore[attr-defined]
            if connection.transport.connected:
                connection.transport.abortConnection()

    case.addCleanup(abort_all)
    return port.getHost().port, factory  # type: ignore[attr-defined]


class _PatternSender:
    """A pull producer writing C{total} pattern bytes, then shutting the write side."""

    def __init__(self, client: TCPClient, total: int) -> None:
        self.client = client
        self.chunks = pattern_bytes(total)

    def resumeProducing(self) -> None:  # noqa: N802
        chunk = next(self.chunks, None)
        transport = self.client.transport
        if chunk is None:
            transport.unregisterProducer()
            transport.loseWriteConnection()
            return
        transport.write(chunk)

    def stopProducing(self) -> None:  # noqa: N802
        self.chunks = iter(())


@implementer(IHalfCloseableProtocol)
class TCPClient(protocol.Protocol):
    """
    A public client: hashes what it receives, notes EOF, and closes once both
    directions are done.  C{lost} fires when it ends, C{reason} says how.
    """

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.size = 0
        self.received = b""
        self.keep = True
        self.eof = False
        self.write_closed = False
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.reason: Any = None
        self.waiting: tuple[bytes, defer.Deferred[None]] | None = None
        self.got_eof: defer.Deferred[None] = defer.Deferred()

    def send_pattern(self, total: int) -> None:
        """Send C{total} pattern bytes as fast as the connection takes them, then SHUT_WR."""
        self.keep = False
        self.transport.registerProducer(_PatternSender(self, total), False)

    def wait_for(self, data: bytes) -> defer.Deferred[None]:
        """Fires once what was received ends with C{data} (then forgets it)."""
        d: defer.Deferred[None] = defer.Deferred()
        self.waiting = (data, d)
        self._check()
        return d

    def _check(self) -> None:
        if self.waiting is not None and self.received.endswith(self.waiting[0]):
            (_, d), self.waiting = self.waiting, None
            self.received = b""
            d.callback(None)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.hash.update(data)
        self.size += len(data)
        if self.keep:
            self.received += data
            self._check()

    def readConnectionLost(self) -> None:  # noqa: N802
        self.eof = True
        self.got_eof.callback(None)
        if self.write_closed:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:  # noqa: N802
        self.write_closed = True
        if self.eof:
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = protocol.connectionDone) -> None:  # noqa: N802
        self.reason = reason
        self.lost.callback(None)

    def was_reset(self) -> bool:
        """Whether the connection ended with a reset (not a clean close)."""
        return self.reason.check(error.ConnectionLost) is not None


async def connect_tcp(case: Any, port: int, host: str = "127.0.0.1") -> TCPClient:
    """Connect a L{TCPClient} to C{host}:C{port}; it is aborted at cleanup if still open."""
    client = TCPClient()
    await TCP4ClientEndpoint(reactor, host, port).connect(
        protocol.Factory.forProtocol(lambda: client)
    )

    async def close() -> None:
        if not client.lost.called:
            client.transport.abortConnection()
            await client.lost

    case.addCleanup(lambda: defer.ensureDeferred(close()))
    return client
