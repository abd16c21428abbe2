# -*- test-case-name: tests.test_http1,tests.test_fasthead -*-
"""
One public HTTP/1.1 connection: reading requests, writing replies with
C{h11}, the request/response cycles of a kept-alive connection, closing.

Requests are parsed with C{h11} rather than C{twisted.web}: a proxy must
start forwarding at the end of the request head, and C{twisted.web} only
renders once the whole body has arrived.  The common plain request skips
h11 (L{tunneld.edge.http1.fast}).  Each request head is checked for what
only HTTP/1.1 can get wrong (sizes, framing), then handed to the gateway
(L{tunneld.edge.gateway}), which routes, admits and opens its stream or
refuses it; this module renders the refusal.  The body streams both ways
and backpressure crosses the hop: a stream out of credit pauses the public
socket, a slow public client pauses the stream.

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

from dataclasses import dataclass
from typing import Any, cast
from typing import Protocol as TypingProtocol

import h11
from twisted.internet.interfaces import IHalfCloseableProtocol, IProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tunneld.edge.forwarding import phrase, reply_headers, tokens
from tunneld.edge.gateway import Client, EdgeGateway, Refusal
from tunneld.edge.http1.deadlines import Deadline
from tunneld.edge.http1.exchange import ADMIT, PIPELINE, UPLOAD, Exchange, Upload
from tunneld.edge.http1.fast import FastPath
from tunneld.edge.http1.fasthead import FastMemo
from tunneld.edge.upgraded import UpgradedConnection
from tunneld.interfaces import IStream
from tunneld.model.messages import Headers, ReplyHead
from tunneld.model.reasons import Reason
from tunneld.speedups import bulkwrite
from tunneld.speedups.readsize import ReadSize

__all__ = ["PublicHTTPFactory", "PublicHTTPProtocol", "PublicHTTPSettings"]


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

# RFC 9112 section 6.1.  Such a request is refused rather than served framed
# by Transfer-Encoding: behind a front proxy that frames it by Content-Length,
# whatever the two disagree about is another request (smuggled), and serving
# then closing would still hand a victim's bytes to the upstream as this
# request's body.  The connection closes, unread bytes and all.
_BOTH_LENGTHS_REFUSAL = (
    "Content-Length and Transfer-Encoding together: ambiguous framing (RFC 9112 section 6.1)"
)
_OLD_CHUNKED_REFUSAL = "Transfer-Encoding in an HTTP/1.0 request (RFC 9112 section 6.1)"
# The field a re-framed body must not carry on (its Transfer-Encoding is hop-by-hop anyway).
_REFRAMED = frozenset({b"content-length"})


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
    out, _ = reply_headers(headers, via)
    upgrades = [(name, value) for name, value in headers if name.lower() == b"upgrade"]
    return [*upgrades, (b"Connection", b"Upgrade"), *out]


@implementer(IHalfCloseableProtocol)
class PublicHTTPProtocol(Protocol):
    """
    One public HTTP/1.1 connection.  Half-closes matter only once it has
    switched protocols; before that a client's half-close ends it, as usual.

    Its methods without a leading underscore are what its exchanges and its
    fast path may ask of it (L{tunneld.edge.http1.exchange.Connection}).
    """

    # Past 29 attributes an instance's dict stops sharing its keys with the
    # class and costs 1.6 KiB instead of 0.3: per connection, with 10,000
    # idle WebSockets, 13 MiB.  (Protocol's own attributes stay in __dict__.)
    __slots__ = (
        "_between_requests", "client", "closing", "_conn", "deadline", "_drainable",
        "_exchange", "_factory", "_fast", "_gateway", "_lingering", "_method", "_paused_by",
        "_processing", "_read_size", "_settings", "_socket", "_stats", "_turn", "_upgraded",
    )

    log = Logger()

    def __init__(self, factory: PublicHTTPFactory) -> None:
        self._factory = factory
        self._gateway = factory.gateway
        self._stats = factory.gateway.stats
        self._settings = factory.settings
        self._turn = factory.end_of_turn
        self._conn = h11.Connection(
            h11.SERVER, max_incomplete_event_size=factory.settings.max_header_bytes
        )
        self._socket: _Socket  # the transport, from connectionMade on
        self.client: Client  # from connectionMade on
        self.deadline = Deadline(factory.reactor)
        self._fast: FastPath  # from connectionMade on
        self._exchange: Exchange | None = None
        self._method = b""
        self._drainable = True  # a refused request's body may be read and dropped
        self._paused_by = 0
        self._processing = False
        self.closing = False
        self._lingering = False
        self._between_requests = False
        self._upgraded: UpgradedConnection | None = None

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        self._socket = socket = cast(_Socket, self.transport)
        self._read_size = ReadSize(self.transport)
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        factory = self._factory
        self.client = self._gateway.connect(socket.getPeer(), self._settings.scheme, factory.via)
        self._fast = FastPath(
            self, socket, self._stats, self.deadline, factory.via, self._turn, factory.fast_memo
        )
        self.deadline.arm(self._settings.header_timeout, self._head_timed_out)

    def dataReceived(self, data: bytes) -> None:
        self._read_size.read(len(data))
        if self._upgraded is not None:
            self._upgraded.client_data(data)
            return
        if self._lingering:
            return
        if self._between_requests:
            self._between_requests = False
            self.deadline.arm(self._settings.header_timeout, self._head_timed_out)
        deadline = self.deadline
        deadline.last_activity = deadline.seconds()
        fast = self._fast
        if fast.active:
            # Pipelined behind an exchange in flight: it waits, unread.
            fast.pending += data
            self._pause(PIPELINE)
            return
        if fast.ok:
            fast.read(data)
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
        self.closing = True
        upgraded = self._upgraded
        if upgraded is not None:
            upgraded.connection_lost()
            self._factory.upgraded.discard(self)
        exchange = self._exchange
        if exchange is not None:
            self.client_gone(exchange)
            if exchange.slots is not None:
                exchange.slots.release()
        self.client.close()
        # The exchange, the switched connection, the fast path and the
        # deadline's function refer back to this protocol: let go of them so
        # a closed connection is freed by reference counting, not left for
        # the cyclic GC.
        self.deadline.close()
        self._exchange = None
        self._upgraded = None
        del self._fast

    # -- what the fast path and the exchanges ask for -------------------------

    def pause_reading(self, why: int) -> None:
        """Connection.pause_reading"""
        self._pause(why)

    def resume_reading(self, why: int) -> None:
        """Connection.resume_reading"""
        self._resume(why)

    def to_h11(self, data: bytes) -> None:
        """FastConnection.to_h11"""
        self._conn.receive_data(data)
        self._resume(PIPELINE)  # h11 pauses for itself if it must
        self._process()

    def await_head(self) -> None:
        """FastConnection.await_head"""
        self._exchange = None
        self._method = b""
        self.deadline.arm(self._settings.header_timeout, self._head_timed_out)

    def await_request(self) -> None:
        """FastConnection.await_request"""
        self._exchange = None
        self._method = b""
        self._between_requests = True
        self.deadline.arm(self._settings.idle_timeout, self._keep_alive_expired)

    def cycle_over(self) -> None:
        """FastConnection.cycle_over"""
        self._exchange = None
        self._method = b""

    def abort(self) -> None:
        """FastConnection.abort"""
        self._abort()

    # -- reading requests ---------------------------------------------------

    def _process(self) -> None:
        """Handle every event h11 can parse from what has arrived so far."""
        if self._processing:
            return  # the outer loop goes on with whatever a nested call would handle
        self._processing = True
        conn = self._conn
        try:
            while not self.closing and not self._paused_by & ADMIT:
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
                    self.request_head(event.method, event.target, event.headers)
                elif isinstance(event, h11.EndOfMessage):
                    self.request_end(event.headers)
                elif event is h11.PAUSED:
                    # A pipelined request (or an upgrade proposal) waits for the
                    # current exchange; stop reading until the next cycle.
                    self._pause(PIPELINE)
                    return
                else:  # ConnectionClosed: never fed to h11, Twisted reports it instead
                    return
        finally:
            self._processing = False

    def request_head(self, method: bytes, target: bytes, headers: Headers) -> None:
        """A request head (field names lower-cased), from h11 or read fast."""
        settings = self._settings
        self._between_requests = False
        self.deadline.arm(settings.idle_timeout, self._idle_check)
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
        fast = self._fast
        self._drainable = not chunked and (length is None or int(length) <= _DRAIN_LIMIT)
        if not fast.active and self._conn.they_are_waiting_for_100_continue:
            self._drainable = False
        absolute = _split_absolute(target) if not target.startswith(b"/") else None
        authority: bytes | None
        if absolute is not None:
            authority, target = absolute
            authority = authority.strip()
        elif len(hosts) == 1:
            authority = hosts[0].strip()
        else:
            authority = None  # missing or repeated
        exchange = Exchange(
            self, fast if fast.active else None, method, target.decode("latin-1")
        )
        self._exchange = exchange
        conn_tokens = tokens(connection) if connection else None
        # An offer to switch to cleartext HTTP/2 (h2c) may simply be ignored:
        # the request is served as HTTP/1.1 and its Upgrade header dropped.
        # Any other switch is the upstream's to accept or decline.
        switching = (
            bool(upgrade) and conn_tokens is not None and b"upgrade" in conn_tokens
            and tokens(upgrade) != {b"h2c"}
        )
        if switching:
            exchange.upgrade = True
            exchange.websocket = b"websocket" in tokens(upgrade)
        # The agent re-frames the body: Content-Length is kept when the request
        # had one (and no Transfer-Encoding, which overrides it), so the agent
        # knows a body follows; with neither, a body the agent receives anyway
        # is sent chunked.  Transfer-Encoding itself is hop-by-hop.
        hop: frozenset[bytes] | None = None
        if conn_tokens:
            hop = frozenset(conn_tokens | _REFRAMED) if chunked else frozenset(conn_tokens)
        elif chunked:
            hop = _REFRAMED
        # Neither Content-Length (or 0) nor Transfer-Encoding: no body, and
        # the stream opens ended (an upgrade's never does).
        bodyless = not chunked and (length is None or int(length) == 0)
        exchange.sent_whole = bodyless and not switching
        decided = self._gateway.request(
            self.client, exchange, authority, headers, hop, switching, bodyless
        )
        if not decided and not fast.active:
            # The decision comes later: h11 reads nothing more until then (a
            # body has no stream to go to yet).  A fast request has no body,
            # and what the client pipelines behind it waits anyway.
            self._pause(ADMIT)

    def opened(self, exchange: Exchange, stream: IStream) -> None:
        """Connection.opened: the gateway opened the exchange's stream."""
        exchange.stream = stream
        if exchange.live:  # else reset while opening; already answered
            exchange.producing = True
            if not exchange.sent_whole:
                exchange.uploading = True
                # Made here, not with the exchange: the two would hold each other.
                stream.registerProducer(Upload(exchange), True)
            self._socket.registerProducer(exchange, True)
            if (
                exchange.live and exchange.fast is None
                and self._conn.they_are_waiting_for_100_continue
            ):
                # Streams carry no interim responses; the edge invites the body itself.
                self._send([h11.InformationalResponse(status_code=100, headers=[])])
        if self._paused_by & ADMIT:
            self._admission_over()

    def refused(self, exchange: Exchange, refusal: Refusal) -> None:
        """Connection.refused: answer with the refusal's status and reason."""
        exchange.live = False
        if self._exchange is exchange:
            self._exchange = None
        self._answer(
            refusal.http_status, refusal.reason.value, refusal.text, refusal.close,
            refusal.retry_after,
        )
        if self._paused_by & ADMIT:
            self._admission_over()

    def _admission_over(self) -> None:
        """A decision that came later: read on."""
        self._resume(ADMIT)
        if not self._fast.active and not self.closing:
            self._process()

    def request_end(self, trailers: Headers) -> None:
        """The end of a request (its trailers), from h11 or read fast."""
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
            self._resume(UPLOAD)
            stream.end(trailers)
        elif exchange is not None and exchange.sent_whole and exchange.live:
            pass  # ended with its Open (or will be): the reply ends the exchange
        else:
            self._next_cycle_or_close()

    # -- refusals -----------------------------------------------------------

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
        if fast.active:
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
            (b"via", self.client.via),
        ]
        if retry_after is not None:
            headers.append((b"retry-after", b"%d" % retry_after))
        if not keep:
            headers.append((b"connection", b"close"))
        if fast.active:
            fast.answer(status, headers, b"" if self._method == b"HEAD" else body, keep)
            return
        events: list[h11.Event] = [
            h11.Response(status_code=status, headers=headers, reason=phrase(status))
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
        self._gateway.bad_request(self.client, text)
        exchange = self._exchange
        if exchange is not None and exchange.live:
            self.finish(exchange)
            if exchange.stream is not None:
                exchange.stream.reset(Reason.BAD_REQUEST, text)
        self._answer(status, Reason.BAD_REQUEST.value, text, close=True)

    # -- the reply ----------------------------------------------------------

    def reply(self, exchange: Exchange, reply: ReplyHead) -> None:
        """Connection.reply: the reply head of an exchange read by h11."""
        if exchange.upgrade:
            if reply.status == 101:
                self._switch(exchange, reply)
                return
            # Declined: an ordinary response; the client sends nothing more
            # on this stream.
            exchange.upgrade = False
            self.upload_done(exchange)
            cast(IStream, exchange.stream).end()
        headers, has_length = reply_headers(reply.headers, self.client.via)
        try:
            response = h11.Response(
                status_code=reply.status, headers=headers, reason=reply.reason or phrase(reply.status)
            )
        except h11.LocalProtocolError as error:
            self.bad_reply(exchange, str(error))
            return
        status = reply.status
        if status == 204 or status == 304:
            exchange.bodyless = True
        exchange.chunked = (
            not has_length and not exchange.bodyless and self._conn.their_http_version == b"1.1"
        )
        # Body bytes still to go, when known (as on the fast path).
        exchange.left = 0 if exchange.bodyless else None
        if has_length and not exchange.bodyless:
            for name, value in response.headers:  # checked by h11, duplicates merged
                if name == b"content-length":
                    exchange.left = int(value)
        exchange.response_started = True
        self._stats.response(status)
        self._send([response])
        deadline = self.deadline
        deadline.last_activity = deadline.seconds()

    def send_body(self, exchange: Exchange, data: bytes | memoryview) -> None:
        """Connection.send_body: body bytes of a reply written by h11; one event, one write."""
        try:
            # h11 only measures and passes on a body's bytes: a view goes
            # through it as it is, and out as the fast path sends it.
            pieces = self._conn.send_with_data_passthrough(h11.Data(data=data))  # type: ignore[arg-type]
        except h11.LocalProtocolError as error:
            self.reply_broke(exchange, str(error))
            return
        socket = self._socket
        turn = self._turn
        for piece in pieces or ():
            if piece is data:
                turn.forward(socket, data)
            else:
                turn.queue(socket, piece)
        if exchange.left is not None:
            exchange.left -= len(data)
        self._stats.bytes_out += len(data)
        deadline = self.deadline
        deadline.last_activity = deadline.seconds()

    def bad_reply(self, exchange: Exchange, error: str) -> None:
        """FastConnection.bad_reply: the upstream's reply head cannot be sent on; answer 502."""
        self.finish(exchange)
        cast(IStream, exchange.stream).reset(Reason.UPSTREAM_ERROR, f"bad reply: {error}")
        self._gateway.bad_reply(self.client, exchange, error, answered=True)
        reason = Reason.UPSTREAM_ERROR
        self._answer(reason.http_status, reason.value, reason.description)

    def _switch(self, exchange: Exchange, reply: ReplyHead) -> None:
        """The upstream accepted the switch: relay its 101 and go raw."""
        stream = cast(IStream, exchange.stream)
        via = self.client.via
        try:
            pieces = self._conn.send_with_data_passthrough(
                h11.InformationalResponse(
                    status_code=101,
                    headers=_switch_headers(reply.headers, via),
                    reason=reply.reason or phrase(101),
                )
            )
        except h11.LocalProtocolError as error:
            self.finish(exchange)
            stream.reset(Reason.UPSTREAM_ERROR, f"bad reply: {error}")
            self._gateway.bad_reply(self.client, exchange, str(error), answered=True)
            reason = Reason.UPSTREAM_ERROR
            self._answer(reason.http_status, reason.value, reason.description)
            return
        exchange.response_started = True
        factory = self._factory
        # The connection's deadline is not cancelled (a cancelled call stays
        # in the reactor's heap until its time): the raw phase re-arms it.
        self._upgraded = upgraded = UpgradedConnection(
            socket=self._socket,
            stream=stream,
            websocket=exchange.websocket,
            clock=factory.reactor,
            idle_timeout=self._settings.idle_timeout,
            ping_interval=self._settings.websocket_ping_interval,
            owner=exchange,
        )
        exchange.upgraded = upgraded
        factory.upgraded.add(self)
        self.log.debug(
            "switched {method} {host}{target} from {peer} to {protocol}",
            method=exchange.method.decode("latin-1"), host=exchange.host,
            target=exchange.target, peer=self.client.peer,
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
        self._resume(PIPELINE)

    def upload_done(self, exchange: Exchange) -> None:
        """Connection.upload_done: the client will send nothing more on the stream."""
        if exchange.uploading:
            exchange.uploading = False
            stream = exchange.stream
            if stream is not None:
                stream.unregisterProducer()
            self._resume(UPLOAD)

    def reply_done(self, exchange: Exchange) -> None:
        """Connection.reply_done: the stream will send nothing more."""
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

    def reply_end(self, exchange: Exchange, trailers: Headers) -> None:
        """Connection.reply_end: the end of a reply written by h11."""
        end = h11.EndOfMessage()
        if trailers and exchange.chunked:
            try:
                end = h11.EndOfMessage(headers=list(trailers))
            except h11.LocalProtocolError:
                pass  # malformed trailers are dropped, the body is still whole
        try:
            pieces = self._conn.send_with_data_passthrough(end)
        except h11.LocalProtocolError as error:
            self.reply_broke(exchange, str(error))
            return
        if pieces:
            self._socket.writeSequence(pieces)
        exchange.response_done = True
        uploading = exchange.uploading
        self.finish(exchange)
        if uploading:
            # The upstream answered before taking the whole request body.
            cast(IStream, exchange.stream).reset(
                Reason.CANCELLED, "the reply ended before the request body"
            )
            if not self._drainable:
                self.close_after_response()
                return
        self._next_cycle_or_close()

    def reply_broke(self, exchange: Exchange, error: str) -> None:
        """FastConnection.reply_broke: the reply does not fit its own framing."""
        self._gateway.bad_reply(self.client, exchange, error, answered=False)
        self.finish(exchange)
        cast(IStream, exchange.stream).reset(Reason.UPSTREAM_ERROR, error)
        self._abort()

    def stream_reset(self, exchange: Exchange, reason: Reason, message: str) -> None:
        """Connection.stream_reset: answer with the reason, or cut the reply."""
        self.finish(exchange)
        if not exchange.response_started:
            self._gateway.reset_before_reply(self.client, exchange, reason, message)
            self._answer(reason.http_status, reason.value, reason.description)
        else:
            # The client must not take a truncated body for a whole one.
            self._gateway.cut(self.client, exchange, reason, message)
            self._abort()

    def client_gone(self, exchange: Exchange) -> None:
        """Connection.client_gone: the socket is gone under the exchange."""
        if not exchange.live:
            return
        upgraded = exchange.upgraded
        if upgraded is not None:
            if not upgraded.live:
                return
            upgraded.live = False
        self.finish(exchange)
        stream = exchange.stream
        # Every byte of the response went out (its declared length) and the
        # client, done with it, closed before the agent's End came: nothing
        # was lost, and the agent is told the stream is over.
        whole = exchange.response_started and exchange.left == 0 and upgraded is None
        self._gateway.client_gone(self.client, exchange, whole)
        if stream is not None:
            stream.reset(Reason.CLIENT_GONE, "client closed the connection")

    def finish(self, exchange: Exchange) -> None:
        """Connection.finish: the stream is done with; unhook it from the socket, both ways."""
        exchange.live = False
        exchange.upgraded = None  # its callbacks hold the exchange: no cycle left behind
        slots = exchange.slots
        if slots is not None:
            slots.release()
        if exchange.uploading:
            self.upload_done(exchange)
        if exchange.producing:
            exchange.producing = False
            self._socket.unregisterProducer()

    # -- cycles, deadlines, closing -------------------------------------------

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
        fast = self._fast
        if fast.active:
            fast.next_cycle()
            return
        conn = self._conn
        ours = conn.our_state
        if ours is h11.DONE:
            if conn.their_state is h11.DONE:
                conn.start_next_cycle()
                fast.ok = not conn.trailing_data[0]
                self._exchange = None
                self._method = b""
                if self._paused_by & PIPELINE:
                    self.deadline.arm(self._settings.header_timeout, self._head_timed_out)
                    self._resume(PIPELINE)
                    self._process()
                else:
                    self._between_requests = True
                    self.deadline.arm(self._settings.idle_timeout, self._keep_alive_expired)
            # else the rest of the request body is still coming; it is dropped
        elif ours is h11.MUST_CLOSE or ours is h11.CLOSED:
            self.close_after_response()
        elif ours is h11.ERROR:
            self._abort()

    def close_after_response(self) -> None:
        """FastConnection.close_after_response: the answer is out; close."""
        if self.closing:
            return
        self.closing = True
        self.deadline.cancel()
        exchange = self._exchange
        if exchange is not None:
            self.finish(exchange)
        their = self._conn.their_state
        if self._fast.active or their is h11.DONE or their is h11.MUST_CLOSE or (
            their is h11.CLOSED
        ) or (their is h11.IDLE and self._between_requests):
            self._socket.loseConnection()
            return
        # The client may still be sending: keep reading (and dropping) for a
        # moment so that closing does not reset the connection under the answer.
        self._lingering = True
        self._paused_by = 0
        self._socket.resumeProducing()
        self.deadline.arm(_LINGER_SECONDS, self._linger_over)

    def _linger_over(self) -> None:
        self._socket.loseConnection()

    def _abort(self) -> None:
        self.closing = True
        self.deadline.cancel()
        exchange = self._exchange
        if exchange is not None:
            self.finish(exchange)
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

    def _head_timed_out(self) -> None:
        timeout = self._settings.header_timeout
        text = self._gateway.head_timed_out(self.client, timeout)
        reason = Reason.IDLE_TIMEOUT
        self._answer(reason.http_status, reason.value, text, close=True)

    def _keep_alive_expired(self) -> None:
        self.log.debug("closing idle connection from {peer}", peer=self.client.peer)
        self.closing = True
        self._socket.loseConnection()

    def _idle_check(self) -> None:
        """During an exchange: close when nothing moved either way for C{idle_timeout}."""
        idle = self._settings.idle_timeout
        deadline = self.deadline
        left = deadline.last_activity + idle - deadline.seconds()
        if left > 0:
            deadline.arm(left, self._idle_check)
            return
        self.log.debug(
            "closing connection from {peer}: no progress for {timeout}s",
            peer=self.client.peer, timeout=idle,
        )
        exchange = self._exchange
        self.closing = True
        if exchange is not None and exchange.live:
            self.finish(exchange)
            if exchange.stream is not None:
                exchange.stream.reset(Reason.IDLE_TIMEOUT, f"no progress for {idle:g}s")
            if exchange.response_started:
                self._socket.abortConnection()
                return
        self._socket.loseConnection()


class PublicHTTPFactory(Factory):
    """Builds L{PublicHTTPProtocol}s sharing one gateway, settings and clock."""

    noisy = False  # its listener logs where it listens

    def __init__(
        self, gateway: EdgeGateway, settings: PublicHTTPSettings, reactor: IReactorTime
    ) -> None:
        self.gateway = gateway
        self.settings = settings
        self.reactor = reactor
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
