# -*- test-case-name: tests.test_public_h2 -*-
"""
The edge's public HTTP/2 listener, and the protocol choice in front of it.

L{PublicH2Protocol} serves HTTP/2 (the C{h2} library's state machine driven
by a Twisted protocol).  Each request is handed to the edge gateway
(L{tunneld.edge.gateway}), as an HTTP/1.1 one is, which routes, admits and
opens it as one L{IStream} or refuses it; bodies stream both ways and
trailers pass in both directions, which is what gRPC needs.  A decision the
gateway makes later leaves the request body waiting here, within the window
this side advertised.

Flow control is the backpressure, per stream:
  - request body: DATA is acknowledged (the client's window reopened) only as
    the tunnel stream takes it; while the stream is out of credit the bytes
    wait here, bounded by the window this side advertised;
  - response body: sent within the client's windows; while a stream's bytes
    wait for a WINDOW_UPDATE, or the socket is full, the tunnel stream is
    paused (the agent gets no more credit).
Windows are raised well above HTTP/2's 64 KiB default, which would otherwise
cap each stream at one window per round trip.

A client that reads nothing: while the socket is full no body is sent, so
what can still pile up is what the client provokes (answers to its PINGs
and SETTINGS, heads of new responses); past C{max_unread} bytes of those
the connection is dropped as C{saturated}.  The write that filled the socket
is not counted: its bodies were within the client's windows.  A socket that
stays full for C{idle_timeout} is dropped as C{idle_timeout}, as an HTTP/1.1
connection making no progress is.

L{PublicHTTPChooserFactory} picks the protocol per connection: by the ALPN
result on TLS (C{h2} or C{http/1.1}), else by the first bytes: the HTTP/2
connection preface (C{PRI * HTTP/2.0}, "prior knowledge") means HTTP/2,
anything else HTTP/1.1.

A refused request is answered with the L{Reason}'s status, a
C{Tunnel-Error} header and a one-line body (a refusal that closes the
connection answers, then sends GOAWAY); a stream cut after its response
started is reset (C{RST_STREAM}), so the client never takes a truncated body
for a whole one.  A client that breaks HTTP/2 is a bad request, logged and
counted as one is on HTTP/1.1.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, cast

from h2 import events as h2events
from h2.errors import ErrorCodes
from h2.exceptions import H2Error
from h2.settings import SettingCodes
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tunneld import h2base
from tunneld.edge.forwarding import HOP_BY_HOP, reply_headers
from tunneld.edge.gateway import Client, EdgeGateway, Refusal
from tunneld.interfaces import IStream, IStreamReceiver
from tunneld.model.messages import Headers, ReplyHead
from tunneld.model.reasons import Reason
from tunneld.policy.caps import Releasable

__all__ = [
    "PREFACE",
    "PublicH2Factory",
    "PublicH2Protocol",
    "PublicH2Settings",
    "PublicHTTPChooserFactory",
]

# RFC 9113 section 3.4: what a client speaking HTTP/2 with prior knowledge sends first.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# The connection window is this many stream windows, so that a few busy
# streams do not starve the others.
_CONNECTION_WINDOWS = 16
# Streams a client may reset in one second ("rapid reset", CVE-2023-44487),
# at least; or twice its concurrent-stream limit.
_RESETS_PER_SECOND = 100


@dataclass(frozen=True)
class PublicH2Settings:
    """Limits and labels of the public HTTP/2 protocol."""

    initial_window: int = 1 << 20
    max_concurrent_streams: int = 256
    max_header_bytes: int = 65536
    header_timeout: float = 30.0  # for the first request after connecting
    idle_timeout: float = 300.0  # with no stream open, or with the socket full
    # Bytes written while the socket is full (only control frames and
    # response heads go out then; bodies wait): past this the client floods
    # us with frames that each want an answer (PING, SETTINGS) and is dropped.
    max_unread: int = 1 << 20
    scheme: str = "http"
    via: str = "2 tunneld"


@implementer(IStreamReceiver, IPushProducer)
class _H2Exchange:
    """
    One HTTP/2 request carried on one tunnel stream.  It takes the stream's
    events for the client, and is the producer of the request body registered
    on the stream (the stream pauses it when out of credit).
    """

    __slots__ = (
        "protocol", "stream_id", "stream", "method", "host", "target",
        "live", "uploading", "upload_paused", "inbox", "trailers_in", "request_ended",
        "replied", "held_reply", "bodyless", "outbox", "end_pending", "sent_data",
        "stream_paused", "done", "slots", "waiting", "whole", "expect", "affinity",
    )

    def __init__(
        self, protocol: PublicH2Protocol, stream_id: int, method: bytes, target: str
    ) -> None:
        self.protocol = protocol
        self.stream_id = stream_id
        self.stream: IStream | None = None
        self.method = method
        self.host = ""  # set by the gateway once the request names one
        self.target = target
        self.live = True  # the tunnel stream is neither reset nor finished
        self.waiting = False  # the gateway's decision is still to come
        self.whole = False  # the request ended with its HEADERS: the stream opens ended
        self.expect = False  # the client waits for 100 (Continue) before its body
        self.uploading = False  # the request body still goes into the tunnel stream
        self.upload_paused = False  # the tunnel stream is out of credit
        self.inbox: deque[tuple[bytes, int]] = deque()  # (data, flow-controlled length)
        self.trailers_in: Headers = ()
        self.request_ended = False  # the client sent END_STREAM
        self.replied = False  # the response head is sent (or held)
        self.held_reply: list[tuple[bytes, bytes]] | None = None
        self.bodyless = method == b"HEAD"
        self.outbox: deque[bytes] = deque()  # response body waiting for the client's window
        self.end_pending: Headers | None = None  # the response end, waiting for the outbox
        self.sent_data = False
        self.stream_paused = False  # what we told the tunnel stream
        self.done = False  # the HTTP/2 stream is finished on our side
        self.slots: Releasable | None = None  # the policy's, released when the exchange is forgotten
        self.affinity: Any = None  # the gateway's: told the reply's headers (MCP/ACP sessions)

    # -- the gateway's exchange ----------------------------------------------

    def opened(self, stream: IStream) -> None:
        """PublicExchange.opened"""
        self.protocol.exchange_opened(self, stream)

    def refused(self, refusal: Refusal) -> None:
        """PublicExchange.refused"""
        self.protocol.exchange_refused(self, refusal)

    # -- IStreamReceiver ----------------------------------------------------

    def reply_received(self, reply: ReplyHead) -> None:
        """IStreamReceiver.reply_received"""
        if self.live and not self.replied:
            if self.affinity is not None:
                self.affinity(reply.headers)
            self.protocol.send_reply(self, reply)

    def data_received(self, data: bytes) -> None:
        """IStreamReceiver.data_received"""
        if not self.live or not self.replied or self.bodyless:
            return
        self.protocol.send_body(self, data)

    def end_received(self, trailers: Headers) -> None:
        """IStreamReceiver.end_received"""
        if not self.live:
            return
        if not self.replied:
            self.protocol.stream_reset(self, Reason.PROTOCOL_ERROR, "stream ended without a reply")
            return
        self.protocol.reply_end(self, trailers)

    def reset_received(self, reason: Reason, message: str) -> None:
        """IStreamReceiver.reset_received"""
        if self.live:
            self.protocol.stream_reset(self, reason, message)

    # -- IPushProducer (the request body into the tunnel stream) -----------

    def pauseProducing(self) -> None:
        """IPushProducer.pauseProducing: the tunnel stream is out of credit."""
        self.upload_paused = True

    def resumeProducing(self) -> None:
        """IPushProducer.resumeProducing: credit came back; pass on what waits."""
        self.upload_paused = False
        if self.uploading:
            self.protocol.upload(self)

    def stopProducing(self) -> None:
        """IPushProducer.stopProducing: the tunnel stream takes no more."""
        self.uploading = False
        self.protocol.drop_inbox(self)


class PublicH2Protocol(Protocol):
    """
    One public HTTP/2 connection.  Its exchanges (L{_H2Exchange}) tell it
    what their streams and the gateway decided through its public methods
    (C{exchange_opened}, C{exchange_refused}, C{send_reply}, C{send_body},
    C{reply_end}, C{stream_reset}, C{upload}, C{drop_inbox}).
    """

    log = Logger()

    def __init__(self, factory: PublicH2Factory) -> None:
        self._factory = factory
        self._gateway = factory.gateway
        self._stats = factory.gateway.stats
        self._settings = factory.settings
        self._clock = factory.reactor
        settings = factory.settings
        self._conn = h2base.new_connection(
            client_side=False,
            validate_inbound_headers=True,
            settings={
                SettingCodes.INITIAL_WINDOW_SIZE: settings.initial_window,
                SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
                SettingCodes.MAX_HEADER_LIST_SIZE: settings.max_header_bytes,
                SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self._conn.decoder.max_header_list_size = settings.max_header_bytes
        self._exchanges: dict[int, _H2Exchange] = {}
        self._socket: Any = None
        self._client: Client | None = None  # from connectionMade on
        self._peer = ""
        self._socket_paused = False
        self._unread = 0  # bytes written while the socket holds us paused
        self._stall_timer: IDelayedCall | None = None  # the socket stays full
        self._resets = 0  # streams the client reset since _reset_epoch
        self._reset_epoch = 0.0
        self._reset_limit = max(_RESETS_PER_SECOND, 2 * settings.max_concurrent_streams)
        self._closing = False
        self._peer_done = False  # no more streams: the client sent GOAWAY, or we did
        self._goaway_after: int | None = None  # we refuse streams after this one, then GOAWAY
        self._in_events = False
        self._timer: IDelayedCall | None = None

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        self._socket = self.transport
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        # A connection over a cap is answered on its first request (then
        # GOAWAY), so the client learns why.
        self._client = client = self._gateway.connect(
            self._socket.getPeer(), self._settings.scheme, self._factory.via
        )
        self._peer = client.peer
        h2base.start(self._conn, self._settings.initial_window * _CONNECTION_WINDOWS)
        self._socket.registerProducer(self, True)
        self._flush()
        self._arm(self._settings.header_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            events = self._conn.receive_data(data)
        except H2Error as error:
            # Logged and counted as any client breaking its protocol is.
            text = f"client broke HTTP/2: {error}"
            self._gateway.bad_request(cast(Client, self._client), text)
            self._flush()  # h2 has queued a GOAWAY
            self._close(Reason.BAD_REQUEST, text)
            return
        self._in_events = True
        try:
            for event in events:
                if self._closing:
                    break
                self._event(event)
        finally:
            self._in_events = False
        self._flush()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closing = True
        self._cancel_timer()
        self._cancel_stall_timer()
        for exchange in list(self._exchanges.values()):
            self._client_gone(exchange, "client closed the connection")
        self._exchanges.clear()
        if self._client is not None:
            self._client.close()

    # -- IPushProducer (the socket's view of us) ---------------------------

    def pauseProducing(self) -> None:
        """
        The client reads slowly: pause every stream's reply.  A TCP socket
        says so again from inside every write made while its buffer is full:
        only the first pause starts counting what waits unread.
        """
        if self._socket_paused:
            return
        self._socket_paused = True
        self._unread = 0
        if not self._closing:
            self._stall_timer = self._clock.callLater(self._settings.idle_timeout, self._stalled)
        for exchange in self._exchanges.values():
            self._update_stream_pause(exchange)

    def resumeProducing(self) -> None:
        """The socket drained."""
        self._socket_paused = False
        self._cancel_stall_timer()
        self._flush_all()
        for exchange in list(self._exchanges.values()):
            self._update_stream_pause(exchange)

    def stopProducing(self) -> None:
        """The socket is going away; connectionLost does the rest."""

    # -- events -------------------------------------------------------------

    def _event(self, event: h2events.Event) -> None:
        if isinstance(event, h2events.DataReceived):
            self._data(event)
        elif isinstance(event, h2events.RequestReceived):
            self._request(event)
        elif isinstance(event, h2events.TrailersReceived):
            exchange = self._exchanges.get(event.stream_id)
            if exchange is not None:
                exchange.trailers_in = tuple(event.headers or ())
        elif isinstance(event, h2events.StreamEnded):
            self._request_end(event.stream_id)
        elif isinstance(event, h2events.StreamReset):
            if self._count_reset():
                return
            exchange = self._exchanges.get(event.stream_id)
            if exchange is not None:
                self._client_gone(exchange, f"client reset the stream ({event.error_code!s})")
        elif isinstance(event, h2events.WindowUpdated):
            if event.stream_id:
                exchange = self._exchanges.get(event.stream_id)
                if exchange is not None:
                    self._flush_out(exchange)
            else:
                self._flush_all()
        elif isinstance(event, h2events.RemoteSettingsChanged):
            if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                self._flush_all()
        elif isinstance(event, h2events.ConnectionTerminated):
            # HTTP/2 would let the streams in flight finish, but h2 sends
            # nothing more once a GOAWAY came: they cannot be answered, so
            # they end now (and their tunnel streams with them).
            self.log.debug("client {peer} sent GOAWAY", peer=self._peer)
            self._peer_done = True
            for exchange in list(self._exchanges.values()):
                self._client_gone(exchange, "client sent GOAWAY")
            self._maybe_idle()

    def _count_reset(self) -> bool:
        """Count a stream the client reset; True if it resets too many too fast."""
        now = self._clock.seconds()
        if now - self._reset_epoch >= 1.0:
            self._reset_epoch = now
            self._resets = 0
        self._resets += 1
        if self._resets <= self._reset_limit or self._closing:
            return False
        self.log.info(
            "dropping HTTP/2 client {peer}: more than {limit} streams reset in a second",
            peer=self._peer, limit=self._reset_limit,
        )
        self._conn.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
        self._flush()
        self._close(Reason.CLIENT_GONE, "the client reset streams too fast")
        return True

    def _request(self, event: h2events.RequestReceived) -> None:
        self._cancel_timer()
        stream_id = event.stream_id
        if self._goaway_after is not None:
            # Beyond our GOAWAY's last stream: never processed, safe to retry elsewhere.
            try:
                self._conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            except H2Error:
                pass
            return
        method = path = b""
        authority: bytes | None = None
        hosts: list[bytes] = []
        cookies: list[bytes] = []
        trailers_ok = expect_continue = False
        regular: list[tuple[bytes, bytes]] = []
        for name, value in event.headers:
            if name.startswith(b":"):
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    authority = value
            elif name == b"host":
                hosts.append(value)
            elif name == b"cookie":
                cookies.append(value)
            elif name == b"te":
                trailers_ok = b"trailers" in value.lower()
            elif name == b"expect":
                expect_continue = value.lower() == b"100-continue"
            else:
                regular.append((name, value))
        if not authority:
            authority = hosts[0] if len(hosts) == 1 else None
        exchange = _H2Exchange(self, stream_id, method, path.decode("latin-1"))
        self._exchanges[stream_id] = exchange
        if event.stream_ended is not None:
            exchange.request_ended = exchange.whole = True
        exchange.expect = expect_continue
        if cookies:
            # RFC 9113 section 8.2.3: HTTP/2 may split cookies; HTTP/1.1 must not.
            regular.append((b"cookie", b"; ".join(cookies)))
        decided = self._gateway.request(
            cast(Client, self._client), exchange, authority, regular,
            bodyless=exchange.whole, trailers=trailers_ok,
        )
        if not decided:
            exchange.waiting = True  # body bytes wait in its inbox, within its window

    def exchange_opened(self, exchange: _H2Exchange, stream: IStream) -> None:
        """The gateway opened the exchange's stream."""
        exchange.waiting = False
        exchange.stream = stream
        if not exchange.live:
            return  # reset while opening; already answered
        if not exchange.whole:  # else the stream was opened ended
            exchange.uploading = True
            stream.registerProducer(exchange, True)
            if exchange.inbox or exchange.request_ended:
                self.upload(exchange)  # what came while the decision was awaited
            if exchange.expect and exchange.live and not exchange.request_ended:
                # Streams carry no interim responses; the edge invites the body itself.
                self._send_headers(exchange, [(b":status", b"100")], end=False)
        self._update_stream_pause(exchange)

    def exchange_refused(self, exchange: _H2Exchange, refusal: Refusal) -> None:
        """
        The gateway refused the exchange: answer with the reason; with
        C{close} the connection takes no new streams (draining, a connection
        over the caps) and closes once the streams it has are answered.
        """
        exchange.waiting = False
        self.drop_inbox(exchange)
        if refusal.close and self._goaway_after is None:
            # GOAWAY follows once the streams are answered (h2 sends nothing after it).
            self._goaway_after = exchange.stream_id
            self._peer_done = True
        self._answer(
            exchange, refusal.http_status, refusal.reason.value, refusal.text,
            refusal.retry_after,
        )
        if not self._in_events:
            self._flush()

    # -- the request body ---------------------------------------------------

    def _data(self, event: h2events.DataReceived) -> None:
        exchange = self._exchanges.get(event.stream_id)
        length = event.flow_controlled_length
        if exchange is None or not (exchange.uploading or exchange.waiting):
            # Answered (or unknown) already: drop the bytes, keep the windows open.
            self._conn.acknowledge_received_data(length, event.stream_id)
            return
        exchange.inbox.append((event.data, length))
        if exchange.uploading:
            self.upload(exchange)

    def upload(self, exchange: _H2Exchange) -> None:
        """Pass waiting request bytes into the tunnel stream while it has credit."""
        stream = exchange.stream
        inbox = exchange.inbox
        acked = 0
        while inbox and exchange.uploading and not exchange.upload_paused and stream is not None:
            data, length = inbox.popleft()
            acked += length
            if data:
                self._stats.bytes_in += len(data)
                stream.write(data)
        if acked:
            self._conn.acknowledge_received_data(acked, exchange.stream_id)
            if not self._in_events:
                self._flush()
        if not inbox and exchange.request_ended and exchange.uploading:
            self._finish_upload(exchange)

    def drop_inbox(self, exchange: _H2Exchange) -> None:
        """The request body waiting here is not wanted: drop it, its window goes back."""
        acked = sum(length for _, length in exchange.inbox)
        exchange.inbox.clear()
        if acked and not self._closing:
            self._conn.acknowledge_received_data(acked, exchange.stream_id)
            if not self._in_events:
                self._flush()

    def _request_end(self, stream_id: int) -> None:
        exchange = self._exchanges.get(stream_id)
        if exchange is None:
            return
        exchange.request_ended = True
        if exchange.uploading and not exchange.inbox:
            self._finish_upload(exchange)
        elif exchange.done:
            self._forget(exchange)

    def _finish_upload(self, exchange: _H2Exchange) -> None:
        exchange.uploading = False
        stream = cast(IStream, exchange.stream)
        stream.unregisterProducer()
        stream.end(exchange.trailers_in)
        if exchange.done:
            self._forget(exchange)

    # -- the response -------------------------------------------------------

    def send_reply(self, exchange: _H2Exchange, reply: ReplyHead) -> None:
        """The exchange's stream replied: send the response head (a gRPC trailers-only one waits for the end)."""
        status = reply.status
        if not 100 <= status <= 999 or status == 101:
            self._reply_broke(exchange, f"status {status} cannot go over HTTP/2")
            return
        headers, _ = reply_headers(reply.headers, self._factory.via)
        out = [(b":status", b"%d" % status)]
        grpc = False
        for name, value in headers:
            lower = name.lower()
            if lower.startswith(b":"):
                continue
            if lower == b"grpc-status":
                grpc = True
            out.append((lower, value))
        if status in (204, 304):
            exchange.bodyless = True
        exchange.replied = True
        self._stats.response(status)
        if grpc:
            # Status in the head: a gRPC "trailers-only" response.  It must
            # stay one HEADERS frame with END_STREAM, so wait for the end.
            exchange.held_reply = out
            return
        self._send_headers(exchange, out, end=False)

    def _send_held(self, exchange: _H2Exchange) -> None:
        held, exchange.held_reply = exchange.held_reply, None
        if held is not None:
            self._send_headers(exchange, held, end=False)

    def send_body(self, exchange: _H2Exchange, data: bytes) -> None:
        """Response body from the exchange's stream, sent within the client's windows."""
        if exchange.held_reply is not None:
            self._send_held(exchange)
        self._stats.bytes_out += len(data)
        exchange.outbox.append(data)
        self._flush_out(exchange)

    def reply_end(self, exchange: _H2Exchange, trailers: Headers) -> None:
        """The exchange's stream ended: end the response (with trailers) after its body."""
        clean = [
            (name.lower(), value)
            for name, value in trailers
            if not name.startswith(b":") and name.lower() not in HOP_BY_HOP
        ]
        if exchange.held_reply is not None and not exchange.outbox and not clean:
            held, exchange.held_reply = exchange.held_reply, None
            exchange.live = False
            self._send_headers(exchange, held, end=True)
            self._response_done(exchange)
            return
        self._send_held(exchange)
        exchange.end_pending = tuple(clean)
        exchange.live = False
        self._flush_out(exchange)

    def _flush_out(self, exchange: _H2Exchange) -> None:
        """Send what waits of a response within the client's windows."""
        if exchange.done or self._socket_paused:
            return  # resumeProducing flushes every stream
        try:
            sent, ended = h2base.send_within_window(
                self._conn, exchange.stream_id, exchange.outbox, exchange.end_pending
            )
            if sent:
                exchange.sent_data = True
            if ended:
                exchange.end_pending = None
                self._response_done(exchange)
        except H2Error as error:
            self._h2_refused(exchange, error)
            return
        if not self._in_events:
            self._flush()
        self._update_stream_pause(exchange)

    def _flush_all(self) -> None:
        for exchange in list(self._exchanges.values()):
            if exchange.outbox or exchange.end_pending is not None:
                self._flush_out(exchange)

    def _response_done(self, exchange: _H2Exchange) -> None:
        """Our side of the HTTP/2 stream is finished."""
        exchange.done = True
        exchange.live = False
        if exchange.uploading:
            # The upstream answered before the whole request body.
            self._stop_upload(exchange)
            cast(IStream, exchange.stream).reset(
                Reason.CANCELLED, "the reply ended before the request body"
            )
        if not exchange.request_ended:
            # RFC 9113 section 8.1: a complete response, the rest of the request is not needed.
            self._reset_h2(exchange, ErrorCodes.NO_ERROR)
        self._forget(exchange)

    def _update_stream_pause(self, exchange: _H2Exchange) -> None:
        stream = exchange.stream
        if stream is None or not exchange.live:
            return
        want = self._socket_paused or bool(exchange.outbox)
        if want is not exchange.stream_paused:
            exchange.stream_paused = want
            if want:
                stream.pauseProducing()
            else:
                stream.resumeProducing()

    # -- refusals, resets ---------------------------------------------------

    def _answer(
        self, exchange: _H2Exchange, status: int, label: str, text: str,
        retry_after: int | None = None,
    ) -> None:
        """A short plain-text answer with a C{Tunnel-Error} header."""
        exchange.live = False
        body = (text + "\n").encode("utf-8")
        headers = [
            (b":status", b"%d" % status),
            (b"content-type", b"text/plain"),
            (b"content-length", b"%d" % len(body)),
            (b"tunnel-error", label.encode("ascii")),
            (b"via", self._factory.via),
        ]
        if retry_after is not None:
            headers.append((b"retry-after", b"%d" % retry_after))
        exchange.replied = True
        self._stats.response(status)
        if not self._send_headers(exchange, headers, end=exchange.bodyless):
            return
        if exchange.bodyless:
            self._response_done(exchange)
            return
        exchange.outbox.append(body)
        exchange.end_pending = ()
        self._flush_out(exchange)

    def _send_headers(self, exchange: _H2Exchange, headers: list[tuple[bytes, bytes]], end: bool) -> bool:
        try:
            self._conn.send_headers(exchange.stream_id, headers, end_stream=end)
        except H2Error as error:
            self._h2_refused(exchange, error)
            return False
        if not self._in_events:
            self._flush()
        return True

    def _h2_refused(self, exchange: _H2Exchange, error: H2Error) -> None:
        """h2 would not send on this stream (the client reset it, or bad headers)."""
        self._gateway.bad_reply(
            cast(Client, self._client), exchange,
            f"reply cannot go over HTTP/2: {str(error) or type(error).__name__}", answered=False,
        )
        was_live = exchange.live
        exchange.done = True
        exchange.live = False
        self._stop_upload(exchange)
        if was_live and exchange.stream is not None:
            exchange.stream.reset(Reason.UPSTREAM_ERROR, f"reply cannot go over HTTP/2: {error}")
        self._reset_h2(exchange, ErrorCodes.INTERNAL_ERROR)
        self._forget(exchange)

    def _reply_broke(self, exchange: _H2Exchange, error: str) -> None:
        """The upstream's reply head cannot go over HTTP/2: answer 502 instead."""
        self._gateway.bad_reply(cast(Client, self._client), exchange, error, answered=True)
        exchange.live = False
        self._stop_upload(exchange)
        cast(IStream, exchange.stream).reset(Reason.UPSTREAM_ERROR, error)
        self._answer(exchange, 502, Reason.UPSTREAM_ERROR.value, Reason.UPSTREAM_ERROR.description)

    def stream_reset(self, exchange: _H2Exchange, reason: Reason, message: str) -> None:
        """The tunnel stream was reset: answer with the reason, or cut the HTTP/2 stream."""
        exchange.live = False
        self._stop_upload(exchange)
        if not exchange.replied or (exchange.held_reply is not None and not exchange.sent_data):
            exchange.held_reply = None
            exchange.replied = False
            self._gateway.reset_before_reply(cast(Client, self._client), exchange, reason, message)
            self._answer(exchange, reason.http_status, reason.value, reason.description)
            return
        self._gateway.cut(cast(Client, self._client), exchange, reason, message)
        exchange.outbox.clear()
        exchange.end_pending = None
        exchange.done = True
        self._reset_h2(exchange, h2base.cut_code(reason))
        self._forget(exchange)

    def _client_gone(
        self, exchange: _H2Exchange, message: str, reason: Reason = Reason.CLIENT_GONE
    ) -> None:
        """The client reset the stream or closed the connection (or we dropped it, for C{reason})."""
        exchange.done = True
        exchange.request_ended = True
        exchange.outbox.clear()
        exchange.end_pending = None
        self._discard(exchange)
        if not exchange.live:
            return
        exchange.live = False
        self._stop_upload(exchange)
        if reason is Reason.CLIENT_GONE:  # else the connection's end was logged for its reason
            self._gateway.client_gone(cast(Client, self._client), exchange)
        if exchange.stream is not None:
            exchange.stream.reset(reason, message)
        self._maybe_idle()

    def _stop_upload(self, exchange: _H2Exchange) -> None:
        if exchange.uploading:
            exchange.uploading = False
            if exchange.stream is not None:
                exchange.stream.unregisterProducer()
        self.drop_inbox(exchange)

    def _reset_h2(self, exchange: _H2Exchange, code: ErrorCodes) -> None:
        if self._closing:
            return
        try:
            self._conn.reset_stream(exchange.stream_id, code)
        except H2Error:
            pass  # already closed on the client's side
        exchange.request_ended = True
        if not self._in_events:
            self._flush()

    def _forget(self, exchange: _H2Exchange) -> None:
        if exchange.done and exchange.request_ended and not exchange.uploading:
            self._discard(exchange)
            self._maybe_idle()

    def _discard(self, exchange: _H2Exchange) -> None:
        """The exchange is over: forget it and give its policy slots back."""
        self._exchanges.pop(exchange.stream_id, None)
        slots, exchange.slots = exchange.slots, None
        if slots is not None:
            slots.release()

    # -- the connection -----------------------------------------------------

    def _flush(self) -> None:
        data = self._conn.data_to_send()
        if not data or self._socket is None:
            return
        # Only a write made while the socket already holds us paused counts
        # as unread.  The write that fills the socket pauses us from inside
        # write(); what it carries was sent within the client's windows.
        paused = self._socket_paused
        self._socket.write(data)
        if paused:
            self._unread += len(data)
            if self._unread > self._settings.max_unread and not self._closing:
                self.log.info(
                    "dropping HTTP/2 client {peer} ({reason}): {size} bytes of answers unread",
                    peer=self._peer, reason=Reason.SATURATED.value, size=self._unread,
                )
                self._abort(Reason.SATURATED, "the client reads nothing it is sent")

    def _stalled(self) -> None:
        """The socket stayed full for C{idle_timeout}: the client reads nothing."""
        self._stall_timer = None
        if self._closing:
            return
        timeout = self._settings.idle_timeout
        self.log.info(
            "dropping HTTP/2 client {peer} ({reason}): it read nothing for {timeout}s",
            peer=self._peer, reason=Reason.IDLE_TIMEOUT.value, timeout=timeout,
        )
        self._abort(Reason.IDLE_TIMEOUT, f"the client read nothing for {timeout:g}s")

    def _cancel_stall_timer(self) -> None:
        timer, self._stall_timer = self._stall_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _close(self, reason: Reason, message: str) -> None:
        """Close the connection, resetting every tunnel stream still open for C{reason}."""
        if self._closing:
            return
        self._closing = True
        self._cancel_timer()
        self._cancel_stall_timer()
        for exchange in list(self._exchanges.values()):
            self._client_gone(exchange, message, reason)
        self._socket.loseConnection()

    def _abort(self, reason: Reason, message: str) -> None:
        """Drop the connection at once, resetting every tunnel stream still open for C{reason}."""
        self._closing = True
        self._cancel_timer()
        self._cancel_stall_timer()
        for exchange in list(self._exchanges.values()):
            self._client_gone(exchange, message, reason)
        self._socket.abortConnection()

    def _maybe_idle(self) -> None:
        if self._exchanges or self._closing:
            return
        if self._peer_done:
            self._closing = True
            self._cancel_timer()
            if self._goaway_after is not None:
                self._conn.close_connection(last_stream_id=self._goaway_after)
            self._flush()
            self._socket.loseConnection()
            return
        self._arm(self._settings.idle_timeout)

    def _arm(self, delay: float) -> None:
        self._cancel_timer()
        self._timer = self._clock.callLater(delay, self._idle_expired)

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _idle_expired(self) -> None:
        self._timer = None
        if self._exchanges or self._closing:
            return
        self.log.debug("closing idle HTTP/2 connection from {peer}", peer=self._peer)
        self._conn.close_connection()
        self._flush()
        self._closing = True
        self._socket.loseConnection()


class PublicH2Factory(Factory):
    """Builds L{PublicH2Protocol}s sharing one gateway, settings and clock."""

    noisy = False  # its listener logs where it listens

    def __init__(
        self, gateway: EdgeGateway, settings: PublicH2Settings, reactor: IReactorTime
    ) -> None:
        self.gateway = gateway
        self.settings = settings
        self.reactor = reactor
        self.via = settings.via.encode("ascii")

    def buildProtocol(self, addr: Any) -> PublicH2Protocol:
        protocol = PublicH2Protocol(self)
        protocol.factory = self
        return protocol


class _Chooser(Protocol):
    """
    The first protocol of a connection that may speak either HTTP version:
    it decides on the first bytes (and the ALPN result), then hands the
    connection and those bytes to the chosen protocol and forwards to it.
    It holds at most the preface's length, for at most the header timeout.
    """

    log = Logger()

    def __init__(self, factory: PublicHTTPChooserFactory, addr: Any) -> None:
        self._factory = factory
        self._addr = addr
        self._head = b""
        self._inner: Any = None
        self._timer: IDelayedCall | None = None
        self._socket: Any = None

    def connectionMade(self) -> None:
        self._socket = self.transport
        factory = self._factory
        self._timer = factory.reactor.callLater(factory.header_timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        inner = self._inner
        if inner is not None:
            inner.dataReceived(data)
            return
        head = self._head + data
        negotiated = getattr(self._socket, "negotiatedProtocol", None)
        if negotiated == b"h2":
            h2 = True
        elif negotiated == b"http/1.1":
            h2 = False
        else:
            size = min(len(head), len(PREFACE))
            if head[:size] != PREFACE[:size]:
                h2 = False
            elif len(head) >= len(PREFACE):
                h2 = True
            else:
                self._head = head
                return
        self._head = b""
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        factory = self._factory
        chosen = (factory.h2 if h2 else factory.http1).buildProtocol(self._addr)
        if chosen is None:
            self._socket.loseConnection()
            return
        self._inner = chosen
        chosen.makeConnection(self._socket)
        chosen.dataReceived(head)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if self._inner is not None:
            self._inner.connectionLost(reason)

    def _timed_out(self) -> None:
        self._timer = None
        self.log.info(
            "no request from {peer} within {timeout}s",
            peer=str(self._socket.getPeer()), timeout=self._factory.header_timeout,
        )
        self._socket.loseConnection()


class PublicHTTPChooserFactory(Factory):
    """Serves HTTP/2 or HTTP/1.1 per connection, by ALPN or by the connection preface."""

    noisy = False  # its listener logs where it listens

    def __init__(
        self, http1: Factory, h2: Factory, reactor: IReactorTime, header_timeout: float
    ) -> None:
        self.http1 = http1
        self.h2 = h2
        self.reactor = reactor
        self.header_timeout = header_timeout

    def buildProtocol(self, addr: Any) -> _Chooser:
        protocol = _Chooser(self, addr)
        protocol.factory = self
        return protocol
