# -*- test-case-name: tests.test_http1,tests.test_fasthead -*-
"""
The edge's public HTTP/1.1 listener.

Requests are parsed with C{h11} rather than C{twisted.web}: a proxy must start
forwarding at the end of the request head, and C{twisted.web} only renders
once the whole body has arrived.  The common plain request (no body, no
switch) skips h11 altogether: L{tunneld.edge.fasthead} reads only heads
h11 would parse the same way and writes the reply as h11 would, and any
other bytes go to h11 as before.  Each request is routed by its host (and
path) and carried to an agent as one L{IStream}; the body streams both ways
and backpressure crosses the hop: a stream out of credit pauses the public
socket, a slow public client pauses the stream.

Every refusal answers with the L{Reason}'s HTTP status, a C{Tunnel-Error}
header naming it and a one-line body, and is logged with the same label.

A request whose framing a proxy in front could read differently
(C{Content-Length} with C{Transfer-Encoding}, or C{Transfer-Encoding} in
HTTP/1.0), a request line of another major version (505) and a host with
userinfo are answered and the connection closed, never served.  The fast
reader declines the first two, so h11's path makes those checks for both.

A request to switch protocols (WebSocket or any other C{Upgrade}) opens a
stream of kind C{"upgrade"}; the upstream's C{101} is relayed and the
connection then carries raw bytes (L{tunneld.edge.upgraded}).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from typing import Protocol as TypingProtocol

import h11
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IProducer,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tunneld.edge.fasthead import FastMemo
from tunneld.edge.fasthead import check_fields as _check_fields
from tunneld.edge.fasthead import field_block as _field_block
from tunneld.edge.fasthead import read_head as _read_head
from tunneld.edge.fasthead import response_head as _response_head
from tunneld.edge.fasthead import response_head_with as _response_head_with
from tunneld.edge.forwarding import HOP_BY_HOP as _HOP_BY_HOP
from tunneld.edge.forwarding import USERINFO_REFUSAL as _USERINFO_REFUSAL
from tunneld.edge.forwarding import forwarded_headers as _forwarded_headers
from tunneld.edge.forwarding import host_of as _host_of
from tunneld.edge.forwarding import peer_of as _peer_of
from tunneld.edge.forwarding import phrase as _phrase
from tunneld.edge.forwarding import reply_headers as _reply_headers
from tunneld.edge.forwarding import tokens as _tokens
from tunneld.edge.upgraded import UpgradedConnection
from tunneld.interfaces import IAgentLink, IStream, IStreamReceiver
from tunneld.model.messages import Headers, ReplyHead, StreamHead
from tunneld.model.reasons import Reason
from tunneld.observe.stats import EdgeStats
from tunneld.policy.gate import PublicPolicy, Refused
from tunneld.speedups import bulkwrite
from tunneld.speedups.readsize import ReadSize

__all__ = ["PublicHTTPFactory", "PublicHTTPProtocol", "PublicHTTPSettings", "RouteLike", "Routes"]


@dataclass(frozen=True)
class PublicHTTPSettings:
    """Limits and labels of one public HTTP/1.1 listener."""

    max_header_bytes: int = 65536
    header_timeout: float = 30.0  # to receive a whole request head (slowloris)
    idle_timeout: float = 300.0  # keep-alive idle, or no progress during an exchange
    max_header_count: int = 100  # header fields in one request head
    max_request_line: int = 8192  # method + target + version
    scheme: str = "http"
    via: str = "1.1 tunneld"
    websocket_ping_interval: float = 0.0  # idle seconds before pinging a WebSocket client; 0 = never


class RouteLike(TypingProtocol):
    """Where a request goes: the tunnel (hostname pattern) that matched and its link."""

    @property
    def tunnel(self) -> str: ...

    @property
    def link(self) -> IAgentLink: ...


class Routes(TypingProtocol):
    """The routing table as this listener uses it (L{tunneld.router.Router})."""

    def route(self, host: str, path: str) -> RouteLike | Reason: ...


class _Socket(TypingProtocol):
    """What this module uses of a public connection's transport."""

    def write(self, data: bytes) -> None: ...
    def writeSequence(self, data: list[bytes]) -> None: ...
    def loseConnection(self) -> None: ...
    def loseWriteConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def getPeer(self) -> Any: ...
    def registerProducer(self, producer: IProducer, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...


# A refused request's body is read and thrown away, keeping the connection,
# only when its declared length is at most this; otherwise the connection closes.
_DRAIN_LIMIT = 65536
# After answering and deciding to close while the client may still be sending,
# keep reading (and discarding) this long so that closing does not reset the
# connection before the client has read the answer.
_LINGER_SECONDS = 2.0

# Why the public socket is paused; each reason is lifted on its own.
_UPLOAD = 1  # the stream is out of credit for the request body
_PIPELINE = 2  # a pipelined request waits for the current exchange to finish

# How far the answer of a fast exchange (one read without h11) has gone.
_OUT_IDLE = 0  # nothing sent yet
_OUT_BODY = 1  # head sent, body going
_OUT_DONE = 2  # all sent; the connection stays open
_OUT_CLOSE = 3  # all sent; the connection closes

_CONNECT_REFUSAL = "CONNECT is not supported"
_UPGRADE_BODY_REFUSAL = "an upgrade request may not carry a body"
# RFC 9112 section 6.1.  Such a request is refused rather than served framed
# by Transfer-Encoding: behind a front proxy that frames it by Content-Length,
# whatever the two disagree about is another request (smuggled), and serving
# then closing would still hand a victim's bytes to the upstream as this
# request's body.  The connection closes, unread bytes and all.
_BOTH_LENGTHS_REFUSAL = (
    "Content-Length and Transfer-Encoding together: ambiguous framing (RFC 9112 section 6.1)"
)
_OLD_CHUNKED_REFUSAL = "Transfer-Encoding in an HTTP/1.0 request (RFC 9112 section 6.1)"


def _nothing_due() -> None:
    """The deadline of a connection that is gone."""


def _split_absolute(target: bytes) -> tuple[bytes, bytes] | None:
    """For an absolute-form target, its authority and origin-form target; else None."""
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return None
    cut = len(rest)
    for delimiter in (b"/", b"?", b"#"):
        at = rest.find(delimiter)
        if 0 <= at < cut:
            cut = at
    authority, path = rest[:cut], rest[cut:].partition(b"#")[0]
    if not path.startswith(b"/"):
        path = b"/" + path
    return authority, path


def _switch_headers(headers: Headers, via: bytes) -> list[tuple[bytes, bytes]]:
    """
    The headers of a relayed C{101}: the end-to-end ones (C{Sec-WebSocket-*}
    and the like, unchanged), C{Upgrade} as the upstream chose it, and
    C{Connection: Upgrade}.
    """
    out, _ = _reply_headers(headers, via)
    upgrades = [(name, value) for name, value in headers if name.lower() == b"upgrade"]
    return [*upgrades, (b"Connection", b"Upgrade"), *out]


def _fast_block(fields: Headers, via: bytes, memo: FastMemo) -> tuple[bytes, int | None] | str:
    """
    A reply's header block (end-to-end fields and Via, checked and rendered
    as h11 would) and declared length for the fast path, or what is wrong;
    remembered in C{memo} by the fields' tuple.
    """
    known = memo.blocks.get(fields)
    if known is not None and known[0] == via:
        return known[1], known[2]
    headers, _ = _reply_headers(fields, via)
    checked = _check_fields(headers, memo.names)
    if isinstance(checked, str):
        return checked
    block = _field_block(checked[0])
    if type(fields) is tuple:
        memo.blocks.put(fields, (via, block, checked[1]))
    return block, checked[1]


@implementer(IPushProducer)
class _Upload:
    """
    The public socket's read side as the producer of one request body: the
    stream pauses it when out of credit.  A wrapper rather than the transport
    itself so that its pauses are told apart from the pipelining ones.
    """

    __slots__ = ("_exchange",)

    def __init__(self, exchange: _Exchange) -> None:
        self._exchange = exchange

    def pauseProducing(self) -> None:
        """IPushProducer.pauseProducing: stop reading the request body."""
        if self._exchange.uploading:
            self._exchange.protocol._pause(_UPLOAD)

    def resumeProducing(self) -> None:
        """IPushProducer.resumeProducing: read the request body again."""
        if self._exchange.uploading:
            self._exchange.protocol._resume(_UPLOAD)

    def stopProducing(self) -> None:
        """IPushProducer.stopProducing: the stream takes no more; stop holding the socket."""
        if self._exchange.uploading:
            self._exchange.protocol._resume(_UPLOAD)


@implementer(IStreamReceiver, IPushProducer)
class _Exchange:
    """
    One request carried on one stream: takes the stream's events for the
    public client, and stands for the stream as the public socket's producer
    (pausing it when the client reads slowly).  It is registered instead of
    the stream so that the socket closing resets the stream as C{client_gone}
    rather than C{cancelled}.
    """

    __slots__ = (
        "protocol", "stream", "method", "host", "target",
        "live", "uploading", "producing", "response_started", "response_done",
        "chunked", "bodyless", "slots", "upgrade", "websocket", "upgraded", "sent_whole",
    )

    def __init__(self, protocol: PublicHTTPProtocol, method: bytes, host: str, target: str) -> None:
        self.protocol = protocol
        self.stream: IStream | None = None
        self.method = method
        self.host = host
        self.target = target
        self.live = True  # the stream is neither reset nor finished
        self.uploading = False  # the request body is still going into the stream
        self.sent_whole = False  # opened with end_stream: no request end to pass on
        self.producing = False  # registered as the public socket's producer
        self.response_started = False
        self.response_done = False
        self.chunked = False  # the reply goes out chunked, so trailers can follow it
        self.bodyless = method == b"HEAD"
        self.slots: Any = None  # the policy's slots, released when the exchange ends
        self.upgrade = False  # the client asked to switch protocols
        self.websocket = False  # ... to WebSocket
        self.upgraded: UpgradedConnection | None = None  # switched: raw bytes both ways

    # -- IStreamReceiver ----------------------------------------------------

    def reply_received(self, reply: ReplyHead) -> None:
        """IStreamReceiver.reply_received"""
        if self.live and not self.response_started:
            self.protocol._reply(self, reply)

    # data_received may be handed a view of a frame the link never changes
    # again: the body's bytes are sent or queued as they are (bulkwrite),
    # copied at most once, when the socket's queue is joined for sending.
    borrows_data = True

    def data_received(self, data: bytes | memoryview) -> None:
        """IStreamReceiver.data_received: one h11 event, one write."""
        if self.upgraded is not None:
            self.upgraded.stream_data(bytes(data))
            return
        if not self.live or self.bodyless or not self.response_started:
            return
        protocol = self.protocol
        if protocol._fast:
            left = protocol._out_left
            if left is None:
                if data:  # (an empty chunk would end the body)
                    protocol._turn.queue(protocol._socket, b"%x\r\n" % len(data))
                    protocol._turn.queue(protocol._socket, data)
                    protocol._turn.queue(protocol._socket, b"\r\n")
            else:
                left -= len(data)
                if left < 0:
                    protocol._reply_broke(self, "Too much data for declared Content-Length")
                    return
                protocol._out_left = left
                protocol._turn.forward(protocol._socket, data)
            protocol._stats.bytes_out += len(data)
            protocol._last_activity = protocol._seconds()
            return
        try:
            # h11 only measures and passes on a body's bytes: a view goes
            # through it as it is, and out as the fast path sends it.
            pieces = protocol._conn.send_with_data_passthrough(h11.Data(data=data))  # type: ignore[arg-type]
        except h11.LocalProtocolError as error:
            protocol._reply_broke(self, str(error))
            return
        for piece in pieces or ():
            if piece is data:
                protocol._turn.forward(protocol._socket, data)
            else:
                protocol._turn.queue(protocol._socket, piece)
        if protocol._out_left is not None:
            protocol._out_left -= len(data)
        protocol._stats.bytes_out += len(data)
        protocol._last_activity = protocol._seconds()

    def end_received(self, trailers: Headers) -> None:
        """IStreamReceiver.end_received"""
        if self.upgraded is not None:
            self.upgraded.stream_ended()
            return
        if not self.live:
            return
        if not self.response_started:
            self.protocol._stream_reset(self, Reason.PROTOCOL_ERROR, "stream ended without a reply")
            return
        self.protocol._reply_end(self, trailers)

    def reset_received(self, reason: Reason, message: str) -> None:
        """IStreamReceiver.reset_received"""
        if self.upgraded is not None:
            self.upgraded.stream_reset(reason, message)
            return
        if self.live:
            self.protocol._stream_reset(self, reason, message)

    # -- after a protocol switch (the owner of an UpgradedConnection) -------

    def finish(self) -> None:
        """The raw phase is over: unhook the stream from the socket, both ways."""
        self.protocol._finish(self)

    def unhook_reply(self) -> None:
        """The stream will send no more: it stops being the socket's producer."""
        self.protocol._reply_done(self)

    def unhook_upload(self) -> None:
        """The client will send no more: the socket stops being the stream's producer."""
        self.protocol._upload_done(self)

    def label(self) -> dict[str, Any]:
        """The log fields naming this request."""
        return {
            "method": self.method.decode("latin-1"), "host": self.host,
            "target": self.target, "peer": self.protocol._peer,
        }

    def arm(self, delay: float, expire: Callable[[], None]) -> None:
        """The connection's timer calls C{expire} in C{delay} seconds."""
        self.protocol._arm(delay, expire)

    def disarm(self) -> None:
        """The connection's timer is cancelled."""
        self.protocol._cancel_timer()

    # -- IPushProducer (the reply towards the public socket) ---------------

    def pauseProducing(self) -> None:
        """IPushProducer.pauseProducing: the client reads slowly; stop granting credit."""
        if self.live and self.stream is not None:
            self.stream.pauseProducing()

    def resumeProducing(self) -> None:
        """IPushProducer.resumeProducing: the client caught up."""
        if self.live and self.stream is not None:
            self.stream.resumeProducing()

    def stopProducing(self) -> None:
        """IPushProducer.stopProducing: the public socket is gone."""
        self.producing = False
        self.protocol._client_gone(self)


@implementer(IHalfCloseableProtocol)
class PublicHTTPProtocol(Protocol):
    """
    One public HTTP/1.1 connection.  Half-closes matter only once it has
    switched protocols; before that a client's half-close ends it, as usual.
    """

    # Past 29 attributes an instance's dict stops sharing its keys with the
    # class and costs 1.6 KiB instead of 0.3: per connection, with 10,000
    # idle WebSockets, 13 MiB.  (Protocol's own attributes stay in __dict__.)
    __slots__ = (
        "_between_requests", "_client_ip", "_clock", "_closing", "_conn", "_conn_refused",
        "_conn_slots", "_drainable", "_due", "_exchange", "_expire", "_fast", "_fast_ok",
        "_last_activity", "_lingering", "_method", "_out", "_out_left", "_parsing",
        "_paused_by", "_peer", "_peer_host", "_pending", "_policy", "_processing",
        "_read_size", "_router", "_seconds", "_settings", "_socket", "_stats", "_their_done",
        "_memo", "_timer", "_trusted_peer", "_turn", "_upgraded", "_upgraded_set", "_via",
    )

    log = Logger()

    def __init__(self, factory: PublicHTTPFactory) -> None:
        self._router = factory.router
        self._policy = factory.policy
        self._conn_slots: Any = None
        self._conn_refused: Refused | None = None
        self._peer_host = ""
        self._trusted_peer = False  # a trusted proxy: its X-Forwarded-For etc. are believed
        self._settings = factory.settings
        self._clock = factory.reactor
        self._seconds = factory.reactor.seconds
        self._via = factory.via
        self._stats = factory.stats
        self._turn = factory.end_of_turn
        self._memo = factory.fast_memo
        self._conn = h11.Connection(
            h11.SERVER, max_incomplete_event_size=factory.settings.max_header_bytes
        )
        self._socket: _Socket  # the transport, from connectionMade on
        self._peer = ""
        self._client_ip = b""
        self._exchange: _Exchange | None = None
        self._method = b""
        self._drainable = True  # a refused request's body may be read and dropped
        self._paused_by = 0
        self._processing = False
        self._closing = False
        self._lingering = False
        self._between_requests = False
        # One timer for the connection's deadlines (see _arm): it fires at
        # or before _due, when _expire is called if _due has come.
        self._timer: IDelayedCall | None = None
        self._due = 0.0
        self._expire: Callable[[], None] = self._linger_over
        self._last_activity = 0.0
        self._upgraded: UpgradedConnection | None = None
        self._upgraded_set = factory.upgraded
        # Plain requests skip h11 (tunneld.edge.fasthead) while h11 holds
        # nothing: _fast_ok says it may be tried, _fast that this exchange
        # is one, with its answer at _out; _pending is what the client sent
        # meanwhile.  _out_left: body bytes of the answer still to go (None
        # when its length is not known), on either path.
        self._fast_ok = True
        self._fast = False
        self._their_done = False
        self._out = _OUT_IDLE
        self._out_left: int | None = 0
        self._pending = b""
        self._parsing = False

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        self._socket = cast(_Socket, self.transport)
        self._read_size = ReadSize(self.transport)
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        self._peer, self._client_ip, host = _peer_of(self._socket.getPeer())
        self._peer_host = host or ""
        if self._policy is not None:
            self._trusted_peer = self._policy.trusts(self._peer_host)
            admitted = self._policy.connection_opened(self._peer_host or self._peer)
            if isinstance(admitted, Refused):
                # Answered on its first request, so the client learns why.
                self._conn_refused = admitted
            else:
                self._conn_slots = admitted
        self._arm(self._settings.header_timeout, self._head_timed_out)

    def dataReceived(self, data: bytes) -> None:
        self._read_size.read(len(data))
        if self._upgraded is not None:
            self._upgraded.client_data(data)
            return
        if self._lingering:
            return
        if self._between_requests:
            self._between_requests = False
            self._arm(self._settings.header_timeout, self._head_timed_out)
        self._last_activity = self._seconds()
        if self._fast:
            # Pipelined behind an exchange in flight: it waits, unread.
            self._pending += data
            self._pause(_PIPELINE)
            return
        if self._fast_ok:
            self._read_fast(data)
        else:
            self._conn.receive_data(data)
            self._process()

    def readConnectionLost(self) -> None:
        """IHalfCloseableProtocol.readConnectionLost: the client sent all it will."""
        if self._upgraded is not None:
            self._upgraded.client_ended()
        elif self._lingering:
            self._socket.loseConnection()  # the answer is complete: let it out
        else:
            # As without half-close support: the connection ends now.
            self._socket.abortConnection()

    def writeConnectionLost(self) -> None:
        """IHalfCloseableProtocol.writeConnectionLost: nothing to do."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closing = True
        self._cancel_timer()
        upgraded = self._upgraded
        if upgraded is not None:
            upgraded.connection_lost()
            self._upgraded_set.discard(self)
        exchange = self._exchange
        if exchange is not None:
            self._client_gone(exchange)
            if exchange.slots is not None:
                exchange.slots.release()
        if self._conn_slots is not None:
            self._conn_slots.release()
        # The exchange, the switched connection and the timer's bound method
        # refer back to this protocol: let go of them so a closed connection
        # is freed by reference counting, not left for the cyclic GC.
        self._exchange = None
        self._upgraded = None
        self._expire = _nothing_due

    # -- reading requests ---------------------------------------------------

    def _read_fast(self, data: bytes) -> None:
        """Serve the plain request heads C{data} starts with; hand the rest to h11."""
        self._parsing = True
        try:
            while not self._closing:
                parsed = _read_head(data)
                if parsed is None:
                    break
                method, target, fields, end = parsed
                data = data[end:]
                self._fast = True
                self._their_done = False
                self._out = _OUT_IDLE
                self._request_head(method, target, fields)
                if self._fast and not self._closing:
                    self._their_done = True  # a plain head carries no body
                    self._request_end(())
                if self._closing:
                    return
                if self._fast:  # the exchange goes on; what follows waits
                    if data:
                        self._pending = data
                        self._pause(_PIPELINE)
                    return
                if not data:
                    self._between_requests = True
                    self._arm(self._settings.idle_timeout, self._keep_alive_expired)
                    return
                self._arm(self._settings.header_timeout, self._head_timed_out)
        finally:
            self._parsing = False
        if self._closing:
            return
        self._fast_ok = False  # until h11 holds nothing again
        self._conn.receive_data(data)
        self._resume(_PIPELINE)  # h11 pauses for itself if it must
        self._process()

    def _process(self) -> None:
        """Handle every event h11 can parse from what has arrived so far."""
        if self._processing:
            return  # the outer loop goes on with whatever a nested call would handle
        self._processing = True
        conn = self._conn
        try:
            while not self._closing:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as error:
                    self._malformed(error)
                    return
                if isinstance(event, h11.Data):
                    exchange = self._exchange
                    if (
                        exchange is not None
                        and exchange.uploading
                        and (stream := exchange.stream) is not None
                    ):
                        data = event.data
                        self._stats.bytes_in += len(data)
                        # h11 hands out bytearrays; streams take bytes.
                        stream.write(data if type(data) is bytes else bytes(data))
                    # else: the request was answered already; its body is dropped
                elif event is h11.NEED_DATA:
                    return
                elif isinstance(event, h11.Request):
                    version = event.http_version
                    if version[:1] != b"1":  # h11 reads any d.d; HTTP/1.x is all we speak
                        self._method = event.method
                        self._bad_request(
                            505, f"HTTP/{version.decode('ascii')} is not supported "
                            "on this listener (HTTP/1.x only)",
                        )
                        return
                    self._request_head(event.method, event.target, event.headers)
                elif isinstance(event, h11.EndOfMessage):
                    self._request_end(event.headers)
                elif event is h11.PAUSED:
                    # A pipelined request (or an upgrade proposal) waits for the
                    # current exchange; stop reading until the next cycle.
                    self._pause(_PIPELINE)
                    return
                else:  # ConnectionClosed: never fed to h11, Twisted reports it instead
                    return
        finally:
            self._processing = False

    def _request_head(self, method: bytes, target: bytes, headers: Headers) -> None:
        """A request head (field names lower-cased), from h11 or read fast."""
        settings = self._settings
        self._between_requests = False
        self._arm(settings.idle_timeout, self._idle_check)
        self._method = method
        hosts: list[bytes] = []
        connection: list[bytes] = []
        upgrade: list[bytes] = []
        length: bytes | None = None
        chunked = False
        size = len(method) + len(target) + 12  # the request line
        for name, value in headers:
            size += len(name) + len(value) + 4
            if name == b"host":
                hosts.append(value)
            elif name == b"connection":
                connection.append(value)
            elif name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"upgrade":
                upgrade.append(value)
        if size > settings.max_header_bytes:
            # h11 bounds only a head still incomplete; this catches one that
            # arrived whole in a single read.
            self._bad_request(431, self._too_large())
            return
        if len(headers) > settings.max_header_count:
            self._bad_request(
                431, f"{len(headers)} header fields (at most {settings.max_header_count})"
            )
            return
        if len(method) + len(target) + 10 > settings.max_request_line:
            self._bad_request(
                414, f"request line longer than {settings.max_request_line} bytes"
            )
            return
        if chunked and (length is not None or self._conn.their_http_version == b"1.0"):
            # (Never on the fast path, which takes no Transfer-Encoding.)
            self._bad_request(
                400, _BOTH_LENGTHS_REFUSAL if length is not None else _OLD_CHUNKED_REFUSAL
            )
            return
        self._drainable = not chunked and (length is None or int(length) <= _DRAIN_LIMIT)
        if not self._fast and self._conn.they_are_waiting_for_100_continue:
            self._drainable = False
        absolute = _split_absolute(target) if not target.startswith(b"/") else None
        if absolute is not None:
            authority, target = absolute
        elif len(hosts) == 1:
            authority = hosts[0]
        else:
            authority = b""
        authority = authority.strip()
        host = _host_of(authority) if len(hosts) <= 1 or absolute is not None else None
        target_text = target.decode("latin-1")
        if host is None:
            if b"@" in authority:
                self._bad_request(400, _USERINFO_REFUSAL)
                return
            problem = "missing Host header" if not hosts else "invalid or repeated Host header"
            self._refuse(method, "", target_text, Reason.BAD_REQUEST, problem)
            return
        refused = self._conn_refused
        if refused is not None:  # this connection is over a cap: say so, and close
            self._refuse(method, host, target_text, refused.reason, refused.text,
                         refused.retry_after, close=True)
            return
        conn_tokens = _tokens(connection) if connection else set()
        if method == b"CONNECT":
            self._refuse_upgrade(method, host, target_text)
            return
        # An offer to switch to cleartext HTTP/2 (h2c) may simply be ignored:
        # the request is served as HTTP/1.1 and its Upgrade header dropped.
        # Any other switch is the upstream's to accept or decline.
        switching = bool(upgrade) and b"upgrade" in conn_tokens and _tokens(upgrade) != {b"h2c"}
        if switching and (chunked or (length is not None and length.strip() != b"0")):
            self._refuse(method, host, target_text, Reason.BAD_REQUEST, _UPGRADE_BODY_REFUSAL)
            return
        path = target_text.partition("?")[0] if target_text != "*" else "/"
        route = self._router.route(host, path)
        if isinstance(route, Reason):
            self._refuse(method, host, target_text, route, route.description)
            return
        slots = None
        if self._policy is not None:
            admitted = self._admit(route, headers)
            if isinstance(admitted, Refused):
                self._refuse(method, host, target_text, admitted.reason, admitted.text,
                             admitted.retry_after, close=admitted.reason is Reason.DRAINING)
                return
            slots = admitted

        # The agent re-frames the body: Content-Length is kept when the request
        # had one (and no Transfer-Encoding, which overrides it), so the agent
        # knows a body follows; with neither, a body the agent receives anyway
        # is sent chunked.  Transfer-Encoding itself is hop-by-hop.
        drop = _HOP_BY_HOP | conn_tokens if conn_tokens else _HOP_BY_HOP
        if switching:
            drop = drop - {b"upgrade"}
        if chunked:
            drop = drop | {b"content-length"}
        # Host comes first, once, from the authority actually routed.
        forwarded = _forwarded_headers(
            headers, drop, authority, self._client_ip, settings.scheme, self._via,
            self._trusted_peer,
        )
        if switching:
            forwarded.append((b"connection", b"Upgrade"))
        self._open(
            route, method, host, target_text, tuple(forwarded), slots,
            upgrade if switching else [],
            # Neither Content-Length (or 0) nor Transfer-Encoding: no body.
            bodyless=not chunked and (length is None or int(length) == 0),
        )

    def _admit(self, route: RouteLike, headers: Headers) -> Any:
        """The policy's slots for this request, or a L{Refused}."""
        policy = cast(PublicPolicy, self._policy)
        forwarded_for = [value for name, value in headers if name == b"x-forwarded-for"]
        client = policy.client_of(self._peer_host or self._peer, forwarded_for)
        return policy.admit(route.tunnel, client, route.link.active_streams())

    def _open(
        self,
        route: RouteLike,
        method: bytes,
        host: str,
        target: str,
        headers: Headers,
        slots: Any = None,
        upgrade: list[bytes] | None = None,
        bodyless: bool = False,
    ) -> None:
        """
        Carry the request on a new stream over the route's agent link; a
        C{bodyless} one (not an upgrade) is opened ended, so the Open says so.
        """
        head = StreamHead(
            kind="upgrade" if upgrade else "http",
            tunnel=route.tunnel,
            method=method.decode("latin-1"),
            target=target,
            headers=headers,
            peer=self._peer,
            scheme=self._settings.scheme,
        )
        exchange = _Exchange(self, method, host, target)
        exchange.slots = slots
        if upgrade:
            exchange.upgrade = True
            exchange.websocket = b"websocket" in _tokens(upgrade)
        self._exchange = exchange
        bodyless = bodyless and not upgrade
        try:
            stream = route.link.open_stream(head, exchange, end_stream=bodyless)
        except Exception:
            self.log.failure(
                "opening a stream for {method} {host}{target} failed",
                method=head.method, host=host, target=target,
            )
            exchange.live = False
            if slots is not None:
                slots.release()
            self._exchange = None
            self._refuse(method, host, target, Reason.AGENT_UNAVAILABLE,
                         Reason.AGENT_UNAVAILABLE.description)
            return
        exchange.stream = stream
        self._stats.streams_opened += 1
        if not exchange.live:
            return  # reset while opening; already answered
        exchange.producing = True
        if bodyless:
            exchange.sent_whole = True
        else:
            exchange.uploading = True
            # Made here, not with the exchange: the two would hold each other.
            stream.registerProducer(_Upload(exchange), True)
        self._socket.registerProducer(exchange, True)
        if exchange.live and not self._fast and self._conn.they_are_waiting_for_100_continue:
            # Streams carry no interim responses; the edge invites the body itself.
            self._send([h11.InformationalResponse(status_code=100, headers=[])])

    def _request_end(self, trailers: Headers) -> None:
        exchange = self._exchange
        if exchange is not None and exchange.upgrade and exchange.live:
            # What the client sends next belongs to the switched protocol (or
            # is the next request if the upstream declines): it waits, unread
            # (h11 pauses), and the socket stays the stream's producer.
            return
        if exchange is not None and exchange.uploading:
            exchange.uploading = False
            stream = cast(IStream, exchange.stream)
            stream.unregisterProducer()
            self._resume(_UPLOAD)
            stream.end(trailers)
        elif exchange is not None and exchange.sent_whole:
            exchange.sent_whole = False  # ended with its Open; the reply ends the exchange
        else:
            self._next_cycle_or_close()

    # -- refusals -----------------------------------------------------------

    def _refuse(
        self, method: bytes, host: str, target: str, reason: Reason, text: str,
        retry_after: int | None = None, close: bool = False,
    ) -> None:
        self.log.info(
            "refused {method} {host}{target} from {peer}: {reason}",
            method=method.decode("latin-1"), host=host, target=target, peer=self._peer,
            reason=reason.value,
        )
        self._stats.refused(reason, host=host, target=target, peer=self._peer, message=text)
        self._answer(reason.http_status, reason.value, text, close, retry_after)

    def _refuse_upgrade(self, method: bytes, host: str, target: str) -> None:
        """A CONNECT request: this edge is not a forward proxy; answer 501."""
        self.log.info(
            "refused {method} {host}{target} from {peer}: {reason}",
            method=method.decode("latin-1"), host=host, target=target, peer=self._peer,
            reason=Reason.BAD_REQUEST.value,
        )
        self._stats.refused(
            Reason.BAD_REQUEST, host=host, target=target, peer=self._peer,
            message=_CONNECT_REFUSAL,
        )
        self._answer(501, Reason.BAD_REQUEST.value, _CONNECT_REFUSAL)

    def _answer(
        self, status: int, label: str, text: str, close: bool = False,
        retry_after: int | None = None,
    ) -> None:
        """
        Send a short plain-text answer with a C{Tunnel-Error} header, then go
        on with the next request, drain the rest of this one, or close.
        """
        conn = self._conn
        fast = self._fast
        if fast:
            if self._out != _OUT_IDLE:
                self._abort()
                return
            keep = not close  # a plain request has no body left to drain
        else:
            if conn.our_state is not h11.IDLE and conn.our_state is not h11.SEND_RESPONSE:
                self._abort()
                return
            their = conn.their_state
            keep = not close and (
                their is h11.DONE or (their is h11.SEND_BODY and self._drainable
                                      and not conn.they_are_waiting_for_100_continue)
            )
        body = (text + "\n").encode("utf-8")
        headers = [
            (b"content-type", b"text/plain"),
            (b"content-length", b"%d" % len(body)),
            (b"tunnel-error", label.encode("ascii")),
            (b"via", self._via),
        ]
        if retry_after is not None:
            headers.append((b"retry-after", b"%d" % retry_after))
        if not keep:
            headers.append((b"connection", b"close"))
        if fast:
            checked = _check_fields(headers, self._memo.names)
            head = None if isinstance(checked, str) else _response_head(
                status, _phrase(status), checked[0]
            )
            if head is None:
                self._abort()
                return
            self._stats.response(status)
            self._out = _OUT_DONE if keep else _OUT_CLOSE
            self._socket.write(head if self._method == b"HEAD" else head + body)
            self._next_cycle_or_close()
            return
        events: list[h11.Event] = [
            h11.Response(status_code=status, headers=headers, reason=_phrase(status))
        ]
        self._stats.response(status)
        if self._method != b"HEAD":
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        self._send(events)
        self._next_cycle_or_close()

    def _too_large(self) -> str:
        return f"request header section larger than {self._settings.max_header_bytes} bytes"

    def _malformed(self, error: h11.RemoteProtocolError) -> None:
        status = error.error_status_hint
        if status == 431:
            self._bad_request(status, self._too_large())
        else:
            self._bad_request(status, f"malformed request: {error}")

    def _bad_request(self, status: int, text: str) -> None:
        """Answer a request that cannot be served at all, and close."""
        self.log.info("bad request from {peer}: {error}", peer=self._peer, error=text)
        self._stats.refused(Reason.BAD_REQUEST, peer=self._peer, message=text)
        exchange = self._exchange
        if exchange is not None and exchange.live:
            self._finish(exchange)
            cast(IStream, exchange.stream).reset(Reason.BAD_REQUEST, text)
        self._answer(status, Reason.BAD_REQUEST.value, text, close=True)

    # -- the reply ----------------------------------------------------------

    def _reply(self, exchange: _Exchange, reply: ReplyHead) -> None:
        if exchange.upgrade:
            if reply.status == 101:
                self._switch(exchange, reply)
                return
            # Declined: an ordinary response; the client sends nothing more
            # on this stream.
            exchange.upgrade = False
            self._upload_done(exchange)
            cast(IStream, exchange.stream).end()
        if self._fast:
            self._reply_fast(exchange, reply)
            return
        headers, has_length = _reply_headers(reply.headers, self._via)
        try:
            response = h11.Response(
                status_code=reply.status, headers=headers, reason=reply.reason or _phrase(reply.status)
            )
        except h11.LocalProtocolError as error:
            self._bad_reply(exchange, str(error))
            return
        status = reply.status
        if status == 204 or status == 304:
            exchange.bodyless = True
        exchange.chunked = (
            not has_length and not exchange.bodyless and self._conn.their_http_version == b"1.1"
        )
        # Body bytes still to go, when known (as on the fast path).
        self._out_left = 0 if exchange.bodyless else None
        if has_length and not exchange.bodyless:
            for name, value in response.headers:  # checked by h11, duplicates merged
                if name == b"content-length":
                    self._out_left = int(value)
        exchange.response_started = True
        self._stats.response(status)
        self._send([response])
        self._last_activity = self._seconds()

    def _reply_fast(self, exchange: _Exchange, reply: ReplyHead) -> None:
        """The reply of a fast exchange, framed as h11 would frame it."""
        checked = _fast_block(reply.headers, self._via, self._memo)
        if isinstance(checked, str):
            self._bad_reply(exchange, checked)
            return
        status = reply.status
        if not 200 <= status < 1000:
            self._bad_reply(
                exchange, f"Response status_code should be in range [200, 1000), not {status}"
            )
            return
        block, length = checked
        if status == 204 or status == 304:
            exchange.bodyless = True
            left: int | None = 0
        else:
            if length is None:
                block += b"Transfer-Encoding: chunked\r\n"
            left = 0 if exchange.bodyless else length
        head = _response_head_with(status, reply.reason or _phrase(status), block)
        if head is None:
            self._bad_reply(exchange, f"illegal reason phrase {reply.reason!r}")
            return
        exchange.chunked = left is None
        exchange.response_started = True
        self._out = _OUT_BODY
        self._out_left = left
        self._stats.response(status)
        self._turn.queue(self._socket, head)  # with the body's start, at the end of the turn
        self._last_activity = self._seconds()

    def _bad_reply(self, exchange: _Exchange, error: str) -> None:
        """The upstream's reply head cannot be sent on: answer 502 instead."""
        self._finish(exchange)
        cast(IStream, exchange.stream).reset(Reason.UPSTREAM_ERROR, f"bad reply: {error}")
        self.log.info(
            "bad reply for {method} {host}{target} from {peer}: {error}",
            method=exchange.method.decode("latin-1"), host=exchange.host,
            target=exchange.target, peer=self._peer, error=str(error),
        )
        self._stats.refused(
            Reason.UPSTREAM_ERROR, host=exchange.host, target=exchange.target,
            peer=self._peer, message=str(error),
        )
        self._answer(502, Reason.UPSTREAM_ERROR.value, Reason.UPSTREAM_ERROR.description)

    def _switch(self, exchange: _Exchange, reply: ReplyHead) -> None:
        """The upstream accepted the switch: relay its 101 and go raw."""
        stream = cast(IStream, exchange.stream)
        try:
            pieces = self._conn.send_with_data_passthrough(
                h11.InformationalResponse(
                    status_code=101,
                    headers=_switch_headers(reply.headers, self._via),
                    reason=reply.reason or _phrase(101),
                )
            )
        except h11.LocalProtocolError as error:
            self._finish(exchange)
            stream.reset(Reason.UPSTREAM_ERROR, f"bad reply: {error}")
            self._answer(502, Reason.UPSTREAM_ERROR.value, Reason.UPSTREAM_ERROR.description)
            return
        exchange.response_started = True
        # The connection's timer is not cancelled (a cancelled call stays in
        # the reactor's heap until its time): the raw phase re-arms it.
        self._upgraded = upgraded = UpgradedConnection(
            socket=self._socket,
            stream=stream,
            websocket=exchange.websocket,
            clock=self._clock,
            idle_timeout=self._settings.idle_timeout,
            ping_interval=self._settings.websocket_ping_interval,
            owner=exchange,
        )
        exchange.upgraded = upgraded
        self._upgraded_set.add(self)
        self.log.debug(
            "switched {method} {host}{target} from {peer} to {protocol}",
            method=exchange.method.decode("latin-1"), host=exchange.host,
            target=exchange.target, peer=self._peer,
            protocol=b", ".join(v for n, v in reply.headers if n.lower() == b"upgrade").decode(
                "latin-1"
            ),
        )
        if pieces:
            self._socket.writeSequence(pieces)
        early, _ = self._conn.trailing_data
        # HTTP is over on this connection: its parser (~0.8 KiB) goes, and
        # nothing past this point may use it.
        del self._conn
        if early:
            upgraded.client_data(bytes(early))
        self._resume(_PIPELINE)

    def _upload_done(self, exchange: _Exchange) -> None:
        """The client will send nothing more on the stream: unhook the socket as its producer."""
        if exchange.uploading:
            exchange.uploading = False
            stream = exchange.stream
            if stream is not None:
                stream.unregisterProducer()
            self._resume(_UPLOAD)

    def _reply_done(self, exchange: _Exchange) -> None:
        """The stream will send nothing more: it stops being the socket's producer."""
        if exchange.producing:
            exchange.producing = False
            self._socket.unregisterProducer()

    def shutdown_upgraded(self, reason: Reason, message: str) -> None:
        """
        End this connection if it has switched protocols, for C{reason}
        (draining, a policy): the agent hears C{reason}, a WebSocket client a
        Close frame with its code and text.
        """
        if self._upgraded is not None:
            self._upgraded.shutdown(reason, message)

    def _reply_end(self, exchange: _Exchange, trailers: Headers) -> None:
        if self._fast:
            left = self._out_left
            if left is None:
                block = b""
                if trailers:
                    checked = _check_fields(trailers, self._memo.names)
                    # malformed trailers are dropped, the body is still whole
                    if not isinstance(checked, str):
                        block = b"".join([b"%s: %s\r\n" % field for field in checked[0]])
                self._socket.write(b"0\r\n%s\r\n" % block)
            elif left:
                self._reply_broke(exchange, "Too little data for declared Content-Length")
                return
            self._out = _OUT_DONE
            exchange.response_done = True
            self._finish(exchange)
            self._next_cycle_or_close()
            return
        end = h11.EndOfMessage()
        if trailers and exchange.chunked:
            try:
                end = h11.EndOfMessage(headers=list(trailers))
            except h11.LocalProtocolError:
                pass  # malformed trailers are dropped, the body is still whole
        try:
            pieces = self._conn.send_with_data_passthrough(end)
        except h11.LocalProtocolError as error:
            self._reply_broke(exchange, str(error))
            return
        if pieces:
            self._socket.writeSequence(pieces)
        exchange.response_done = True
        uploading = exchange.uploading
        self._finish(exchange)
        if uploading:
            # The upstream answered before taking the whole request body.
            cast(IStream, exchange.stream).reset(
                Reason.CANCELLED, "the reply ended before the request body"
            )
            if not self._drainable:
                self._close_after_response()
                return
        self._next_cycle_or_close()

    def _reply_broke(self, exchange: _Exchange, error: str) -> None:
        """The reply does not fit its own framing (too much or too little body)."""
        self.log.info(
            "bad reply for {method} {host}{target} from {peer}: {error}",
            method=exchange.method.decode("latin-1"), host=exchange.host,
            target=exchange.target, peer=self._peer, error=error,
        )
        self._finish(exchange)
        cast(IStream, exchange.stream).reset(Reason.UPSTREAM_ERROR, error)
        self._abort()

    def _stream_reset(self, exchange: _Exchange, reason: Reason, message: str) -> None:
        self._finish(exchange)
        if not exchange.response_started:
            self.log.info(
                "refused {method} {host}{target} from {peer}: {reason} ({message})",
                method=exchange.method.decode("latin-1"), host=exchange.host,
                target=exchange.target, peer=self._peer, reason=reason.value, message=message,
            )
            self._stats.refused(
                reason, host=exchange.host, target=exchange.target, peer=self._peer,
                message=message,
            )
            self._answer(reason.http_status, reason.value, reason.description)
        else:
            # The client must not take a truncated body for a whole one.
            self.log.info(
                "cut {method} {host}{target} from {peer} mid-reply: {reason} ({message})",
                method=exchange.method.decode("latin-1"), host=exchange.host,
                target=exchange.target, peer=self._peer, reason=reason.value, message=message,
            )
            self._stats.cut(reason)
            self._abort()

    def _client_gone(self, exchange: _Exchange) -> None:
        if not exchange.live:
            return
        upgraded = exchange.upgraded
        if upgraded is not None:
            if not upgraded.live:
                return
            upgraded.live = False
        self._finish(exchange)
        stream = exchange.stream
        if exchange.response_started and self._out_left == 0 and upgraded is None:
            # Every byte of the response went out (its declared length) and
            # the client, done with it, closed before the agent's End came:
            # nothing was lost, and the agent is told the stream is over.
            self.log.debug(
                "client {peer} closed after the whole response to {method} {host}{target}",
                peer=self._peer, method=exchange.method.decode("latin-1"), host=exchange.host,
                target=exchange.target,
            )
        else:
            self.log.info(
                "client {peer} went away during {method} {host}{target}",
                peer=self._peer, method=exchange.method.decode("latin-1"), host=exchange.host,
                target=exchange.target,
            )
        if stream is not None:
            stream.reset(Reason.CLIENT_GONE, "client closed the connection")

    def _finish(self, exchange: _Exchange) -> None:
        """The stream is done with: unhook it from the socket, both ways."""
        exchange.live = False
        exchange.upgraded = None  # its callbacks hold the exchange: no cycle left behind
        if exchange.slots is not None:
            exchange.slots.release()
        if exchange.uploading:
            exchange.uploading = False
            stream = exchange.stream
            if stream is not None:
                stream.unregisterProducer()
            self._resume(_UPLOAD)
        if exchange.producing:
            exchange.producing = False
            self._socket.unregisterProducer()

    # -- cycles, timers, closing --------------------------------------------

    def _send(self, events: list[h11.Event]) -> None:
        """Send some (non-body-streaming) events with one write."""
        conn = self._conn
        out: list[bytes] = []
        for event in events:
            pieces = conn.send_with_data_passthrough(event)
            if pieces:
                out += pieces
        self._socket.writeSequence(out)

    def _next_cycle_or_close(self) -> None:
        """After an answer or a request end: start over, wait for the body, or close."""
        if self._fast:
            self._next_fast_cycle()
            return
        conn = self._conn
        ours = conn.our_state
        if ours is h11.DONE:
            if conn.their_state is h11.DONE:
                conn.start_next_cycle()
                self._fast_ok = not conn.trailing_data[0]
                self._exchange = None
                self._method = b""
                if self._paused_by & _PIPELINE:
                    self._arm(self._settings.header_timeout, self._head_timed_out)
                    self._resume(_PIPELINE)
                    self._process()
                else:
                    self._between_requests = True
                    self._arm(self._settings.idle_timeout, self._keep_alive_expired)
            # else the rest of the request body is still coming; it is dropped
        elif ours is h11.MUST_CLOSE or ours is h11.CLOSED:
            self._close_after_response()
        elif ours is h11.ERROR:
            self._abort()

    def _next_fast_cycle(self) -> None:
        """L{_next_cycle_or_close} for a fast exchange."""
        out = self._out
        if out == _OUT_CLOSE:
            self._close_after_response()
            return
        if out != _OUT_DONE or not self._their_done:
            return
        self._fast = False
        self._exchange = None
        self._method = b""
        if self._parsing:
            return  # _read_fast goes on with what follows
        pending, self._pending = self._pending, b""
        if pending:
            self._arm(self._settings.header_timeout, self._head_timed_out)
            # Read what waited before reading more, so nothing overtakes it.
            self._read_fast(pending)
            if self._fast_ok and not self._pending and not self._closing:
                self._resume(_PIPELINE)
        else:
            self._between_requests = True
            self._arm(self._settings.idle_timeout, self._keep_alive_expired)

    def _close_after_response(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._cancel_timer()
        exchange = self._exchange
        if exchange is not None:
            self._finish(exchange)
        their = self._conn.their_state
        if self._fast or their is h11.DONE or their is h11.MUST_CLOSE or their is h11.CLOSED or (
            their is h11.IDLE and self._between_requests
        ):
            self._socket.loseConnection()
            return
        # The client may still be sending: keep reading (and dropping) for a
        # moment so that closing does not reset the connection under the answer.
        self._lingering = True
        self._paused_by = 0
        self._socket.resumeProducing()
        self._arm(_LINGER_SECONDS, self._linger_over)

    def _linger_over(self) -> None:
        self._timer = None
        self._socket.loseConnection()

    def _abort(self) -> None:
        self._closing = True
        self._cancel_timer()
        exchange = self._exchange
        if exchange is not None:
            self._finish(exchange)
        self._socket.abortConnection()

    def _pause(self, why: int) -> None:
        if not self._paused_by:
            self._socket.pauseProducing()
        self._paused_by |= why

    def _resume(self, why: int) -> None:
        if self._paused_by & why:
            self._paused_by &= ~why
            if not self._paused_by:
                self._socket.resumeProducing()

    def _arm(self, delay: float, expire: Callable[[], None]) -> None:
        """
        Call C{expire} in C{delay} seconds, instead of whatever was armed.
        The reactor's timer only moves when the new deadline is sooner: a
        later one is found when the timer fires (so a keep-alive request
        costs no timer calls).
        """
        due = self._seconds() + delay
        self._due = due
        self._expire = expire
        timer = self._timer
        if timer is None:
            self._timer = self._clock.callLater(delay, self._deadline)
        elif timer.getTime() > due:
            timer.reset(delay)

    def _deadline(self) -> None:
        left = self._due - self._seconds()
        if left > 0:
            self._timer = self._clock.callLater(left, self._deadline)
            return
        self._timer = None
        self._expire()

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _head_timed_out(self) -> None:
        self._timer = None
        timeout = self._settings.header_timeout
        self.log.info(
            "no whole request head from {peer} within {timeout}s", peer=self._peer, timeout=timeout
        )
        reason = Reason.IDLE_TIMEOUT
        self._stats.refused(reason, peer=self._peer, message=f"no whole request head within {timeout:g}s")
        self._answer(
            reason.http_status, reason.value, f"no whole request head within {timeout:g}s",
            close=True,
        )

    def _keep_alive_expired(self) -> None:
        self._timer = None
        self.log.debug("closing idle connection from {peer}", peer=self._peer)
        self._closing = True
        self._socket.loseConnection()

    def _idle_check(self) -> None:
        """During an exchange: close when nothing moved either way for C{idle_timeout}."""
        idle = self._settings.idle_timeout
        left = self._last_activity + idle - self._seconds()
        if left > 0:
            self._arm(left, self._idle_check)
            return
        self._timer = None
        self.log.debug(
            "closing connection from {peer}: no progress for {timeout}s",
            peer=self._peer, timeout=idle,
        )
        exchange = self._exchange
        self._closing = True
        if exchange is not None and exchange.live:
            self._finish(exchange)
            cast(IStream, exchange.stream).reset(Reason.IDLE_TIMEOUT, f"no progress for {idle:g}s")
            if exchange.response_started:
                self._socket.abortConnection()
                return
        self._socket.loseConnection()


class PublicHTTPFactory(Factory):
    """Builds L{PublicHTTPProtocol}s sharing one router, settings and clock."""

    noisy = False  # its listener logs where it listens

    def __init__(
        self, router: Routes, settings: PublicHTTPSettings, reactor: IReactorTime,
        stats: EdgeStats | None = None,
        policy: PublicPolicy | None = None,
    ) -> None:
        self.router = router
        self.policy = policy
        self.settings = settings
        self.reactor = reactor
        self.stats = stats if stats is not None else EdgeStats(reactor)
        self.via = settings.via.encode("ascii")
        # Connections that switched protocols (WebSocket and the like).
        self.upgraded: set[PublicHTTPProtocol] = set()
        # Replies queued for the end of the reactor turn, on every connection.
        self.end_of_turn = bulkwrite.EndOfTurn()
        # What the fast path remembers of the replies' fields, for every connection.
        self.fast_memo = FastMemo()

    def shutdown_upgraded(self, reason: Reason, message: str) -> int:
        """
        End every switched-protocol connection for C{reason} (e.g.
        C{draining}); WebSocket clients get a Close frame with its code.
        Returns how many were ended.
        """
        connections = list(self.upgraded)
        for connection in connections:
            connection.shutdown_upgraded(reason, message)
        return len(connections)

    def buildProtocol(self, addr: Any) -> PublicHTTPProtocol:
        protocol = PublicHTTPProtocol(self)
        protocol.factory = self
        return protocol
