# -*- test-case-name: tests.test_websocket,tests.test_websocket_framing -*-
"""
The WebSocket agent-link transport.

One WebSocket per agent; each binary message is one encoded C{Frame} of the
tunnel protocol, and L{tunneld.transports.mux.FrameLink} does the rest.  The TCP
transport's own backpressure is wired to the link, so when the socket is
full every stream's source pauses instead of piling bytes into memory.

Autobahn does the opening handshake (Upgrade, path, TLS, timeouts); once the
link is open, frames are read and written by
L{tunneld.transports.websocket_framing}, which costs a fraction of
Autobahn's per-message machinery, when Autobahn can be taken over
(L{tunneld.speedups.websocket_takeover}); else by Autobahn's message API.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import urlsplit

from autobahn.exception import Disconnected
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.types import ConnectionDeny
from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, wrapClientTLS
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from tunneld.config.schema import non_negative, parse_table, positive, setting
from tunneld.errors import ConfigError
from tunneld.interfaces import AgentLinkSetup, EdgeLinkSetup, IAgentLink, ITransportPlugin
from tunneld.listening import ConnectionTracker, ListeningService
from tunneld.model.reasons import Reason
from tunneld.proxyconnect import ProxyConnectEndpoint
from tunneld.speedups import bulkwrite
from tunneld.speedups.readsize import ReadSize
from tunneld.speedups.websocket_takeover import release, take_over
from tunneld.transports.mux import FrameLink, SocketCongestion
from tunneld.transports.websocket_framing import (
    CLOSE_NO_STATUS,
    FrameReader,
    FrameWriter,
    FramingError,
    Payload,
)

# Our own events (a framing violation); Autobahn's protocols keep their `log`.
_log = Logger()

# A peer that ignores our Close (or stops reading) is dropped after this long.
CLOSE_TIMEOUT = 5.0
# A heartbeat Ping's payload: the heartbeat's ping number, big-endian.
_PING_SIZE = 8


@dataclass(frozen=True)
class WebSocketEdgeOptions:
    """Edge side of the WebSocket transport."""

    listen: str = setting(
        "tcp:8081:interface=127.0.0.1", "Endpoint string the edge listens on for agents."
    )
    path: str = setting("/tunnel", "HTTP path of the WebSocket endpoint.")
    open_handshake_timeout: float = setting(
        10.0, "Seconds an agent has to complete the WebSocket handshake.", check=positive
    )
    heartbeat_interval: float = setting(
        10.0, "Seconds between heartbeat pings (0 = off).", check=non_negative
    )
    heartbeat_timeout: float = setting(
        30.0, "Seconds of silence after which the link is declared dead.", check=positive
    )


@dataclass(frozen=True)
class WebSocketAgentOptions:
    """Agent side of the WebSocket transport."""

    url: str = setting("ws://127.0.0.1:8081/tunnel", "WebSocket URL of the edge (ws:// or wss://).")
    open_handshake_timeout: float = setting(
        10.0, "Seconds allowed for connecting and the WebSocket handshake.", check=positive
    )
    heartbeat_interval: float = setting(
        10.0, "Seconds between heartbeat pings (0 = off).", check=non_negative
    )
    heartbeat_timeout: float = setting(
        30.0, "Seconds of silence after which the link is declared dead.", check=positive
    )


class _OwnFrames:
    """The link's frames written by L{FrameWriter}: Autobahn has been taken over."""

    __slots__ = ("_transport", "_writer")

    def __init__(self, transport: Any, writer: FrameWriter) -> None:
        self._transport = transport
        self._writer = writer

    def binary(self, payload: bytes) -> None:
        self._transport.write(self._writer.binary(payload))

    def binary_frames(self, frames: Sequence[Sequence[bytes | memoryview]]) -> None:
        """The frames in one write, each piece copied once; a large write goes to the socket at once."""
        bulkwrite.write(self._transport, self._writer.binary_frames(frames))

    def ping(self, payload: bytes) -> None:
        self._transport.write(self._writer.ping(payload))

    def pong(self, payload: bytes | bytearray) -> None:
        self._transport.write(self._writer.pong(payload))

    def close(self, code: int | None, text: str) -> None:
        self._transport.write(self._writer.close(code, text))


class _AutobahnFrames:
    """
    The link's frames written through Autobahn's public API: the takeover is
    off, so Autobahn frames, answers Pings and echoes Closes itself.
    """

    __slots__ = ("_protocol",)

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol

    def binary(self, payload: bytes) -> None:
        try:
            self._protocol.sendMessage(bytes(payload), isBinary=True)
        except Disconnected:
            pass  # the peer's Close came first: nothing more is sent

    def binary_frames(self, frames: Sequence[Sequence[bytes | memoryview]]) -> None:
        for parts in frames:
            self.binary(b"".join(parts))

    def ping(self, payload: bytes) -> None:
        self._protocol.sendPing(payload)

    def pong(self, payload: bytes | bytearray) -> None:
        """Autobahn answers every Ping itself."""

    def close(self, code: int | None, text: str) -> None:
        self._protocol.sendClose(code, text or None)


class _FrameWireMixin:
    """
    What both ends share: one binary message per frame.

    Until C{onOpen} Autobahn owns the connection.  From then on, when the
    takeover is on (L{tunneld.speedups.websocket_takeover}), C{_reader} and
    C{_writer} do the framing: C{dataReceived} goes to the reader (bytes
    that came with the handshake are taken over from Autobahn), and
    Autobahn sees no frame in either direction.  When it is off, Autobahn
    frames messages and its callbacks (C{onMessage}, C{onPing},
    C{onPong}, C{onClose}) feed the same handler methods.
    """

    link: FrameLink | None = None
    transport: Any
    # No `log` here: Autobahn's protocols log through their own txaio
    # logger, which honours the global level set above.  A plain twisted
    # Logger in its place wrote each frame's debug line to the log (a third
    # of the CPU of a small request; see docs/benchmarks.md).

    # How frames go out once the link is open (None before).
    _frames: _OwnFrames | _AutobahnFrames | None = None
    # Our own framing, when Autobahn is taken over (None otherwise).
    _reader: FrameReader | None = None
    # What Autobahn had received after the handshake: read at the end of onOpen.
    _pending = b""
    _read_size: ReadSize | None = None
    _reactor: Any
    # We sent a Close (or answered one): nothing more is sent or read.
    _closing = False
    # How the link ends once the connection is gone, when we know better
    # than "connection lost": the peer's Close, or its framing error.
    _ending: tuple[Reason, str] | None = None
    _drop_call: Any = None

    def send_frame(self, payload: bytes) -> None:
        """FrameWire.send_frame"""
        # Once the close handshake has begun, the peer no longer reads frames.
        if not self._closing and self._frames is not None:
            self._frames.binary(payload)

    def send_frames(self, frames: Sequence[Sequence[bytes | memoryview]]) -> None:
        """FrameWire.send_frames: the frames in one write, each piece copied once."""
        if not self._closing and self._frames is not None:
            self._frames.binary_frames(frames)

    def close_wire(self, reason: Reason, message: str) -> None:
        """FrameWire.close_wire"""
        # Applications may only send 1000 or 3000-4999: 4000 + the wire code
        # tells a peer exactly which reason ended the link.
        code = 1000 if reason in (Reason.DRAINING, Reason.CANCELLED) else 4000 + reason.wire_code
        self._close(code, f"{reason.value}: {message}"[:120])

    def _close(self, code: int | None, text: str) -> None:
        """Send a Close (unless one was already sent; no code: empty) and end the connection."""
        if self._frames is None:
            self.transport.loseConnection()
            return
        if not self._closing:
            self._closing = True
            if self._reader is not None:
                self._reader.stop()
            self._frames.close(code, text)
        # A peer that ignores the close handshake must not hold the socket:
        # the Close goes out with whatever is queued before it, then the
        # connection ends; one that will not even read is cut off.
        self.transport.loseConnection()
        if self._drop_call is None:
            self._drop_call = self._reactor.callLater(CLOSE_TIMEOUT, self.transport.abortConnection)

    def _make_link(self, *, is_edge: bool, options: Any, setup: Any) -> FrameLink:
        peer = self.transport.getPeer()
        certificate = None
        get_cert = getattr(self.transport, "getPeerCertificate", None)
        if get_cert is not None:
            certificate = get_cert()
        link = FrameLink(
            self,
            transport_name="websocket",
            peer=f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}",
            reactor=setup.reactor,
            is_edge=is_edge,
            initial_window=setup.initial_window,
            max_frame_size=setup.max_frame_size,
            heartbeat_interval=options.heartbeat_interval,
            heartbeat_timeout=options.heartbeat_timeout,
            peer_certificate=certificate,
            max_streams=getattr(setup, "max_streams", 10_000),
            send_ping=self._send_ping,
            codec=setup.codec,
        )
        self.link = link
        self._reactor = setup.reactor
        pending = take_over(self)
        if pending is None:
            self._frames = _AutobahnFrames(self)
        else:
            # From here on the framing is ours: the edge (server) reads masked
            # frames and writes plain ones, the agent (client) the other way.
            self._frames = _OwnFrames(self.transport, FrameWriter(masked=not is_edge))
            self._reader = FrameReader(self, masked=is_edge, max_message=setup.max_frame_size)
            self._pending = pending
        self._read_size = ReadSize(self.transport)
        # Autobahn's own tcpNoDelay option is never applied (its connectionMade
        # reads it before copying the options over, and swallows the error):
        # without this, Nagle and delayed ACKs stall small frames ~40 ms.
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass  # not TCP
        self.transport.registerProducer(SocketCongestion(link), True)
        return link

    def _take_over(self) -> None:
        """
        The end of C{onOpen}: read the frames that arrived in the same read
        as the handshake (when Autobahn was taken over; else Autobahn reads
        them once C{onOpen} returns).
        """
        pending, self._pending = self._pending, b""
        if pending and not self._closing:
            self.dataReceived(pending)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._read_size is not None:
            self._read_size.read(len(data))
        reader = self._reader
        if reader is None:
            # The opening handshake, or every frame when Autobahn frames them.
            super().dataReceived(data)  # type: ignore[misc]
            return
        try:
            reader.feed(data)
        except FramingError as e:
            self._framing_error(e.code, e.reason)

    def _framing_error(self, code: int, reason: str) -> None:
        link = self.link
        assert link is not None
        _log.warn(
            "{transport} link from {peer} broke the protocol: {error}",
            transport="websocket", peer=link.peer, error=reason,
        )
        if self._ending is None:
            self._ending = (Reason.PROTOCOL_ERROR, f"websocket protocol error ({code}: {reason})")
        self._close(code, reason)

    # -- FrameHandler: what the reader (or Autobahn) found -------------------

    def message_received(self, payload: Payload, binary: bool) -> None:
        """FrameHandler.message_received"""
        link = self.link
        if link is None or self._closing:
            return
        if not binary:
            link.close(Reason.PROTOCOL_ERROR, "text message on a binary link")
            return
        link.frame_received(payload)

    def ping_received(self, payload: bytes | bytearray) -> None:
        """FrameHandler.ping_received: answered, and a sign of life like any frame."""
        link = self.link
        if link is not None:
            link.heartbeat.heard()
        if not self._closing and self._frames is not None:
            self._frames.pong(payload)

    def pong_received(self, payload: bytes | bytearray) -> None:
        """FrameHandler.pong_received: the answer to a heartbeat ping of ours."""
        link = self.link
        if link is not None and len(payload) == _PING_SIZE:
            link.pong_received(int.from_bytes(payload, "big"))

    def _send_ping(self, opaque: int) -> None:
        """The link heartbeat is WebSocket Ping/Pong (design: section 3); C{opaque} is the payload."""
        if not self._closing and self._frames is not None:
            self._frames.ping(opaque.to_bytes(_PING_SIZE, "big"))

    def close_received(self, code: int, reason: str) -> None:
        """FrameHandler.close_received"""
        if self._ending is None:
            detail = f"websocket closed ({code}{': ' + reason if reason else ''})"
            self._ending = (Reason.AGENT_GONE, detail)
        # Echo the Close (with its code, as the RFC asks) and end the connection.
        self._close(None if code == CLOSE_NO_STATUS else code, "")

    # -- Autobahn's callbacks, when it frames the messages -------------------

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803
        self.message_received(payload, isBinary)

    def onPing(self, payload: bytes) -> None:  # noqa: N802
        link = self.link
        if link is not None:
            link.heartbeat.heard()
        super().onPing(payload)  # type: ignore[misc]  # Autobahn answers it

    def onPong(self, payload: bytes) -> None:  # noqa: N802
        self.pong_received(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N802, N803
        if self._reader is None and self.link is not None and wasClean and self._ending is None:
            detail = f"websocket closed ({code or CLOSE_NO_STATUS}{': ' + reason if reason else ''})"
            self._ending = (Reason.AGENT_GONE, detail)
        super().onClose(wasClean, code, reason)  # type: ignore[misc]

    # -- the connection ends -----------------------------------------------

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        super().connectionLost(reason)  # type: ignore[misc]
        release(self)
        if self._drop_call is not None:
            if self._drop_call.active():
                self._drop_call.cancel()
            self._drop_call = None
        link = self.link
        if link is not None:
            if self._reader is not None:
                self._reader.stop()
            self._closing = True
            ending = self._ending or (
                Reason.AGENT_GONE,
                f"websocket closed (1006: connection lost without a closing handshake: "
                f"{reason.getErrorMessage()})",
            )
            link.wire_lost(*ending)


class EdgeWebSocketProtocol(_FrameWireMixin, WebSocketServerProtocol):  # type: ignore[misc]
    """The edge end of one agent's WebSocket."""

    factory: EdgeWebSocketFactory

    def onConnect(self, request: Any) -> None:  # noqa: N802
        if request.path != self.factory.options.path:
            raise ConnectionDeny(404, "no agent endpoint at this path")

    def failHandshake(  # noqa: N802
        self, reason: str, code: int = 400, responseHeaders: Any = None  # noqa: N803
    ) -> None:
        """
        Refuse a request that is not an agent's WebSocket handshake as a plain
        HTTP server would: a whole response (standard reason phrase, length,
        C{Connection: close}), and no banner, where Autobahn sends its
        version.  Any other path is 404 whatever else is wrong (Autobahn
        checks the C{Upgrade} header before the path reaches L{onConnect});
        the tunnel path without C{Upgrade} is 426 Upgrade Required.
        """
        path = getattr(self, "http_request_path", None)
        headers = [("Content-Type", "text/plain; charset=utf-8"), ("X-Content-Type-Options", "nosniff")]
        if path is not None and path != self.factory.options.path:
            code, reason = 404, "no agent endpoint at this path"
        elif code == 426:
            headers.append(("Upgrade", "websocket"))
            reason = "this endpoint takes only WebSocket connections from tunneld agents"
        self.wasNotCleanReason = reason
        _log.info(
            "refused a request on the agent listener from {peer}: {code} {reason}",
            peer=self.peer, code=code, reason=reason,
        )
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "Error"
        body = (reason + "\n").encode("utf-8", "replace")
        head = f"HTTP/1.1 {code} {phrase}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers
        )
        head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        self.sendData(head.encode("latin-1") + body)
        self.dropConnection(abort=False)

    def onOpen(self) -> None:  # noqa: N802
        link = self._make_link(is_edge=True, options=self.factory.options, setup=self.factory.setup)
        self.factory.setup.on_link(link)
        self._take_over()

    def connectionMade(self) -> None:  # noqa: N802
        super().connectionMade()
        self.factory.tracker.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        super().connectionLost(reason)
        self.factory.tracker.remove(self)

    def shutdown(self, reason: Reason, message: str) -> None:
        """Closable.shutdown: the link says goodbye with the reason."""
        if self.link is not None:
            self.link.close(reason, message)
        else:
            self.transport.loseConnection()


class EdgeWebSocketFactory(WebSocketServerFactory):  # type: ignore[misc]
    protocol = EdgeWebSocketProtocol  # type: ignore[assignment]
    noisy = False  # its listener logs where it listens

    def __init__(self, options: WebSocketEdgeOptions, setup: EdgeLinkSetup) -> None:
        # No Server header (Autobahn's names its version) and no status page:
        # a request that is not a handshake gets EdgeWebSocketProtocol.failHandshake.
        super().__init__(server=None)
        self.options = options
        self.setup = setup
        self.tracker = ConnectionTracker()
        self.setProtocolOptions(
            webStatus=False,
            maxFramePayloadSize=setup.max_frame_size,
            maxMessagePayloadSize=setup.max_frame_size,
            openHandshakeTimeout=options.open_handshake_timeout,
            closeHandshakeTimeout=5,
            autoFragmentSize=0,
            tcpNoDelay=True,
            failByDrop=False,
        )


class AgentWebSocketProtocol(_FrameWireMixin, WebSocketClientProtocol):  # type: ignore[misc]
    """The agent end of its WebSocket to the edge."""

    factory: AgentWebSocketFactory

    def onOpen(self) -> None:  # noqa: N802
        link = self._make_link(is_edge=False, options=self.factory.options, setup=self.factory.setup)
        opened, self.factory.opened = self.factory.opened, None
        if opened is not None:
            opened.callback(link)
        self._take_over()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N802
        opened, self.factory.opened = self.factory.opened, None
        if opened is not None:
            opened.errback(
                Failure(ConnectionError(f"websocket handshake failed ({code}: {reason})"))
            )
        super().onClose(wasClean, code, reason)


class AgentWebSocketFactory(WebSocketClientFactory):  # type: ignore[misc]
    protocol = AgentWebSocketProtocol  # type: ignore[assignment]
    noisy = False  # the agent logs each dial itself

    def __init__(self, options: WebSocketAgentOptions, setup: AgentLinkSetup) -> None:
        super().__init__(url=options.url)
        self.options = options
        self.setup = setup
        self.opened: Deferred[FrameLink] | None = Deferred()
        self.setProtocolOptions(
            maxFramePayloadSize=setup.max_frame_size,
            maxMessagePayloadSize=setup.max_frame_size,
            openHandshakeTimeout=options.open_handshake_timeout,
            closeHandshakeTimeout=5,
            autoFragmentSize=0,
            tcpNoDelay=True,
            failByDrop=False,
        )


@implementer(ITransportPlugin)
class WebSocketTransport:
    """The C{websocket} transport plugin."""

    name = "websocket"

    def edge_options(self, table: Any, where: str) -> WebSocketEdgeOptions:
        """ITransportPlugin.edge_options"""
        return parse_table(WebSocketEdgeOptions, table, where, "transports.websocket")

    def agent_options(self, table: Any, where: str) -> WebSocketAgentOptions:
        """ITransportPlugin.agent_options"""
        options = parse_table(WebSocketAgentOptions, table, where, "transports.websocket")
        parts = urlsplit(options.url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ConfigError(
                where, "transports.websocket.url", f"expected ws://host:port/path, got {options.url!r}"
            )
        return options

    def edge_service(self, options: object, setup: EdgeLinkSetup) -> IService:
        """ITransportPlugin.edge_service"""
        assert isinstance(options, WebSocketEdgeOptions), options
        factory: Any = EdgeWebSocketFactory(options, setup)
        if setup.tls is not None:
            factory = TLSMemoryBIOFactory(setup.tls, False, factory)
        service = ListeningService(setup.reactor, options.listen, factory, "websocket agent link")
        service.setName("transport:websocket")
        return service

    def connect(self, options: object, setup: AgentLinkSetup) -> Deferred[IAgentLink]:
        """ITransportPlugin.connect"""
        assert isinstance(options, WebSocketAgentOptions), options
        parts = urlsplit(options.url)
        host = parts.hostname or "127.0.0.1"
        secure = parts.scheme == "wss"
        port = parts.port or (443 if secure else 80)
        endpoint: Any
        if setup.proxy is not None:
            endpoint = ProxyConnectEndpoint(
                setup.reactor, setup.proxy, host, port, options.open_handshake_timeout
            )
        else:
            endpoint = clientFromString(
                setup.reactor, f"tcp:host={host}:port={port}:timeout={int(options.open_handshake_timeout)}"
            )
        if secure:
            from twisted.internet.ssl import optionsForClientTLS

            creator = setup.tls_for(host) if setup.tls_for else optionsForClientTLS(host)
            endpoint = wrapClientTLS(creator, endpoint)
        factory = AgentWebSocketFactory(options, setup)
        opened = factory.opened
        assert opened is not None

        def connect_failed(failure: Failure) -> Failure:
            if factory.opened is not None:
                factory.opened = None
            return failure

        connecting = endpoint.connect(factory)
        connecting.addErrback(connect_failed)
        connecting.addErrback(lambda f: opened.errback(f) if not opened.called else None)
        return cast("Deferred[IAgentLink]", opened)  # it fires with a FrameLink
