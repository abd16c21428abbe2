"""
Real WebSocket peers (Autobahn on Twisted) for end-to-end tests: an echo
upstream that accepts permessage-deflate and picks the first offered
subprotocol, and a client that records messages, pings and how it closed.
Both listen or dial on loopback port 0 and clean up every connection.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.compress import (
    PerMessageDeflateOffer,
    PerMessageDeflateOfferAccept,
    PerMessageDeflateResponse,
    PerMessageDeflateResponseAccept,
)
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from zope.interface import implementer

# Seconds a peer here waits for the other side of a closing handshake (Autobahn:
# 1 s) before it drops the connection and calls the close unclean (1006).
CLOSE_WAIT = 20.0


def accept_deflate(offers: list[Any]) -> Any:
    """Accept the first permessage-deflate offer as it stands."""
    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return PerMessageDeflateOfferAccept(offer)
    return None


class EchoServerProtocol(WebSocketServerProtocol):  # type: ignore[misc]
    """Echoes every message; remembers the opening request."""

    def onConnect(self, request: Any) -> Any:  # noqa: N802
        self.factory.requests.append(request)
        if request.protocols:
            return request.protocols[0]
        return None

    def onOpen(self) -> None:  # noqa: N802
        self.factory.open.append(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803
        self.sendMessage(payload, isBinary)

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        super().connectionLost(reason)
        self.factory.connections.discard(self)
        if not self.factory.connections:
            waiters, self.factory.idle = self.factory.idle, []
            for waiter in waiters:
                waiter.callback(None)

    def connectionMade(self) -> None:  # noqa: N802
        super().connectionMade()
        self.factory.connections.add(self)


class EchoServerFactory(WebSocketServerFactory):  # type: ignore[misc]
    protocol = EchoServerProtocol

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Any] = []
        self.open: list[EchoServerProtocol] = []
        self.connections: set[EchoServerProtocol] = set()
        self.idle: list[defer.Deferred[None]] = []
        # Autobahn gives a closing handshake 1 s, then drops the connection
        # (1006): too short on a busy machine, where tests must still pass.
        self.setProtocolOptions(
            perMessageCompressionAccept=accept_deflate, closeHandshakeTimeout=CLOSE_WAIT
        )

    def all_closed(self) -> defer.Deferred[None]:
        if not self.connections:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self.idle.append(d)
        return d


async def listen_echo(case: Any) -> tuple[int, EchoServerFactory]:
    """An Autobahn echo server on 127.0.0.1 port 0, closed (connections too) at cleanup."""
    factory = EchoServerFactory()
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)

    async def cleanup() -> None:
        await port.stopListening()
        for conn in list(factory.connections):
            conn.transport.abortConnection()
        await factory.all_closed()

    case.addCleanup(lambda: defer.ensureDeferred(cleanup()))
    return port.getHost().port, factory


class RecordingClient(WebSocketClientProtocol):  # type: ignore[misc]
    """Records messages, pings and the close; lets a test wait for the next message."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[tuple[bytes, bool]] = []
        self.pings: list[bytes] = []
        self.closed: defer.Deferred[tuple[bool, int | None, str | None]] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self._waiting: defer.Deferred[tuple[bytes, bool]] | None = None
        self.response: Any = None

    def onConnect(self, response: Any) -> None:  # noqa: N802
        self.response = response

    def onOpen(self) -> None:  # noqa: N802
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803
        self.messages.append((payload, isBinary))
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback((payload, isBinary))

    def onPing(self, payload: bytes) -> None:  # noqa: N802
        self.pings.append(payload)
        super().onPing(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N802, N803
        if not self.closed.called:
            self.closed.callback((wasClean, code, reason))
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(f"handshake failed: {code} {reason}"))

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        super().connectionLost(reason)
        self.lost.callback(None)

    def next_message(self) -> defer.Deferred[tuple[bytes, bool]]:
        d: defer.Deferred[tuple[bytes, bool]] = defer.Deferred()
        self._waiting = d
        return d

    async def echo(self, payload: bytes, binary: bool = True) -> tuple[bytes, bool]:
        waiting = self.next_message()
        self.sendMessage(payload, isBinary=binary)
        return await waiting


def _accept_deflate_response(response: Any) -> Any:
    if isinstance(response, PerMessageDeflateResponse):
        return PerMessageDeflateResponseAccept(response)
    return None


async def connect_client(
    case: Any,
    port: int,
    host: str,
    path: str = "/",
    protocols: list[str] | None = None,
    deflate: bool = False,
    headers: dict[str, str] | None = None,
) -> RecordingClient:
    """A WebSocket client to 127.0.0.1:C{port} with C{Host: host}; open when this returns."""
    factory = WebSocketClientFactory(
        f"ws://{host}:{port}{path}", protocols=protocols or [], headers=headers or {}
    )
    factory.protocol = RecordingClient
    factory.opened = defer.Deferred()
    factory.setProtocolOptions(closeHandshakeTimeout=CLOSE_WAIT)
    if deflate:
        factory.setProtocolOptions(
            perMessageCompressionOffers=[PerMessageDeflateOffer()],
            perMessageCompressionAccept=_accept_deflate_response,
        )
    client: RecordingClient = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)

    async def cleanup() -> None:
        if client.transport is not None and not client.lost.called:
            client.transport.abortConnection()
        await client.lost

    case.addCleanup(lambda: defer.ensureDeferred(cleanup()))
    await factory.opened
    return client


@implementer(IHalfCloseableProtocol)
class EchoUpgradeUpstream(protocol.Protocol):
    """
    An upstream speaking a made-up protocol after C{Upgrade: echo}: answers
    the request head with 101, then echoes; on the client's half-close it
    says C{bye} and closes.
    """

    def __init__(self) -> None:
        self.head: bytes | None = b""

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.head is None:
            self.transport.write(data)
            return
        self.head += data
        if b"\r\n\r\n" in self.head:
            head, _, rest = self.head.partition(b"\r\n\r\n")
            self.factory.heads.append(head)
            self.head = None
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n"
                + rest
            )

    def readConnectionLost(self) -> None:  # noqa: N802
        self.transport.write(b"bye")
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:  # noqa: N802
        pass

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.factory.lost.append(reason)


async def listen_echo_upgrade(case: Any) -> tuple[int, Any]:
    """An L{EchoUpgradeUpstream} server on 127.0.0.1 port 0."""
    factory = protocol.Factory.forProtocol(EchoUpgradeUpstream)
    factory.heads = []
    factory.lost = []
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
    case.addCleanup(port.stopListening)
    return port.getHost().port, factory


@implementer(IPushProducer)
class FloodUpgradeUpstream(protocol.Protocol):
    """After C{101}, writes as fast as its socket takes data; counts what it wrote."""

    def __init__(self) -> None:
        self.head = b""
        self.paused = False
        self.flooding = False

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.flooding:
            return
        self.head += data
        if b"\r\n\r\n" in self.head:
            self.flooding = True
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: flood\r\nConnection: Upgrade\r\n\r\n"
            )
            self.transport.registerProducer(self, True)
            self.factory.flooding.append(self)
            self._flood()

    def _flood(self) -> None:
        chunk = b"f" * 65536
        for _ in range(16):
            if self.paused or not self.flooding:
                return
            self.transport.write(chunk)
            self.factory.written += len(chunk)
        reactor.callLater(0, self._flood)

    def pauseProducing(self) -> None:  # noqa: N802
        self.paused = True
        self.factory.pauses += 1

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused = False
        self._flood()

    def stopProducing(self) -> None:  # noqa: N802
        self.flooding = False

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.flooding = False
        self.factory.lost.callback(None)


async def listen_flood(case: Any) -> tuple[int, Any]:
    """A L{FloodUpgradeUpstream} server on 127.0.0.1 port 0."""
    factory = protocol.Factory.forProtocol(FloodUpgradeUpstream)
    factory.flooding = []
    factory.written = 0
    factory.pauses = 0
    factory.lost = defer.Deferred()
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
    case.addCleanup(port.stopListening)
    return port.getHost().port, factory
