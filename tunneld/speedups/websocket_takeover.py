# -*- test-case-name: tests.test_websocket -*-
"""
Autobahn's WebSocket protocol, taken over once its opening handshake is done.

Autobahn does the opening handshake (HTTP Upgrade, paths, TLS, timeouts);
after it, the agent link's own framing reads and writes every frame (it
costs a fraction of Autobahn's per-message machinery).  Taking over uses
Autobahn's state as its documentation does not offer it:

  - its receive buffer, C{data}: what arrived in the same read as the
    handshake is still there when C{onOpen} runs, and Autobahn parses it
    after C{onOpen} returns.  L{take_over} empties it and hands the bytes to
    the caller, which from then on reads every byte itself (its
    C{dataReceived} no longer calls Autobahn's);
  - its close-handshake timer, C{closeHandshakeTimeoutCall}, which Autobahn
    does not cancel when the connection ends before the peer's Close:
    L{release} does (with the trick on or off; without the attribute,
    there is nothing to release).

L{TRICK} checks, on an in-memory handshake, that the bytes after a
handshake wait in C{data} when C{onOpen} runs and that Autobahn reads
nothing once it is emptied.  When it is off, L{take_over} returns None and
the caller uses Autobahn's public message API (C{sendMessage},
C{onMessage}, C{sendPing}, C{onPong}, C{sendClose}, C{onClose}).
"""

from __future__ import annotations

from typing import Any

from tunneld.speedups.switches import Trick

__all__ = ["TRICK", "release", "take_over"]


def take_over(protocol: Any) -> bytes | None:
    """
    Called from C{protocol.onOpen}: None when the trick is off (Autobahn
    goes on reading and writing frames); else the bytes Autobahn received
    after the handshake and will now never see: the caller reads them, and
    every later byte, itself.
    """
    if not TRICK.active:
        return None
    pending, protocol.data = protocol.data, b""
    return bytes(pending)


def release(protocol: Any) -> None:
    """Called from C{protocol.connectionLost}: cancel the close-handshake timer Autobahn leaves behind."""
    timer = getattr(protocol, "closeHandshakeTimeoutCall", None)
    if timer is not None:
        if getattr(timer, "active", lambda: True)():
            timer.cancel()
        protocol.closeHandshakeTimeoutCall = None


class _Transport:
    """What Autobahn's protocols need of a transport, keeping what they write."""

    disconnecting = False

    def __init__(self, peer: Any) -> None:
        self.peer = peer
        self.written: list[bytes] = []

    def value(self) -> bytes:
        return b"".join(self.written)

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writeSequence(self, data: list[bytes]) -> None:  # noqa: N802
        self.written.extend(data)

    def getPeer(self) -> Any:  # noqa: N802
        return self.peer

    def getHost(self) -> Any:  # noqa: N802
        return self.peer

    def loseConnection(self) -> None:  # noqa: N802
        self.disconnecting = True

    abortConnection = loseConnection

    def setTcpNoDelay(self, enabled: bool) -> None:  # noqa: N802
        pass


def _check() -> str | None:
    """
    On an in-memory handshake between Autobahn's own client and server: the
    server's C{onOpen} finds the client's first frame, sent with the
    handshake, in C{data}, and once that is emptied Autobahn delivers no
    message; the same on the client's side with the server's first frame.
    """
    from autobahn.twisted.websocket import (
        WebSocketClientFactory,
        WebSocketClientProtocol,
        WebSocketServerFactory,
        WebSocketServerProtocol,
    )
    from twisted.internet.address import IPv4Address
    from twisted.internet.task import Clock

    found: dict[str, Any] = {}

    class _Opened:
        side = ""

        def onOpen(self) -> None:  # noqa: N802
            found[self.side] = getattr(self, "data", None)
            self.data = b""  # type: ignore[attr-defined]

        def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803
            found[self.side + " message"] = payload

    class Server(_Opened, WebSocketServerProtocol):  # type: ignore[misc]
        side = "server"

        def onOpen(self) -> None:  # noqa: N802
            super().onOpen()
            self.sendMessage(b"from the server", isBinary=True)

    class Client(_Opened, WebSocketClientProtocol):  # type: ignore[misc]
        side = "client"

    clock = Clock()
    server_factory = WebSocketServerFactory(reactor=clock)
    server_factory.protocol = Server
    client_factory = WebSocketClientFactory("ws://127.0.0.1:9/", reactor=clock)
    client_factory.protocol = Client
    for factory in (server_factory, client_factory):
        factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)
    peer = IPv4Address("TCP", "127.0.0.1", 9)
    server: Any = server_factory.buildProtocol(peer)
    client: Any = client_factory.buildProtocol(peer)
    to_server, to_client = _Transport(peer), _Transport(peer)
    client.makeConnection(to_client)
    server.makeConnection(to_server)
    request = to_client.value()
    to_client.written.clear()
    first = b"\x82\x84\x00\x00\x00\x00ping"  # a masked binary message, all-zero key
    server.dataReceived(request + first)
    client.dataReceived(to_server.value())
    if found.get("server") != first:
        return f"Autobahn's server had {found.get('server')!r} in its buffer at onOpen, not the frame after the handshake"
    if not found.get("client", b"").startswith(b"\x82\x0ffrom the server"):
        return f"Autobahn's client had {found.get('client')!r} in its buffer at onOpen, not the frame after the handshake"
    if "server message" in found or "client message" in found:
        return "Autobahn still read a frame from the buffer emptied in onOpen"
    for protocol in (server, client):
        if not hasattr(protocol, "closeHandshakeTimeoutCall"):
            return "Autobahn's protocol has no closeHandshakeTimeoutCall"
    return None


TRICK = Trick(
    "websocket_takeover",
    touches="Autobahn's receive buffer (data) after the opening handshake",
    fallback="Autobahn's message API",
    check=_check,
    # Checked at the first WebSocket link: the check loads Autobahn, which an
    # edge or agent with no WebSocket link never needs.
    deferred=True,
)
