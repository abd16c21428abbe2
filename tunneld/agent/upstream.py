# -*- test-case-name: tests.test_upstream -*-
"""
The agent's last hop: forward HTTP streams to the local upstream service.

L{UpstreamPool.forward} takes one L{IStream} of kind C{"http"} that the edge
opened (kind C{"upgrade"} goes to L{tunneld.agent.upgrade}), sends its request to the upstream over HTTP/1.1 (framed by
L{tunneld.agent.http1_wire}) and streams the response back on the stream.  Bodies are never buffered
whole: the upstream TCP transport and the stream are registered as each
other's push producers, so a stream out of credit stops reading from the
upstream and a full upstream socket stops the request body.  Keep-alive
connections are kept in a small idle pool and reused.

Every failure ends the stream with a L{Reason}: C{upstream_refused} when no
connection could be made, C{upstream_timeout} when no response head came in
time or a response stalled (nothing more of it for C{body_timeout} seconds
while the client could take more), C{upstream_error} when the response is
malformed or cut short.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, cast

from automat import TypeMachineBuilder
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tunneld.agent.exchange import (
    HOP_BY_HOP,
    UpstreamConnection,
    UpstreamExchange,
    UpstreamSettings,
    UpstreamTransport,
)
from tunneld.agent.http1_wire import (
    Header,
    HeadMemo,
    RequestError,
    RequestWriter,
    ResponseError,
    ResponseParser,
)
from tunneld.agent.upgrade import UpgradeRelays
from tunneld.interfaces import IStream, IStreamReceiver, IUpstream
from tunneld.model.messages import Headers, ReplyHead, StreamHead
from tunneld.model.reasons import Reason
from tunneld.speedups import bulkwrite
from tunneld.speedups.readsize import ReadSize

__all__ = ["UpstreamPool"]

# Methods whose requests carry no body unless they say so with a framing header.
_BODYLESS_METHODS = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE", b"CONNECT"})

def _end_to_end(headers: Sequence[Header]) -> tuple[Header, ...]:
    """
    The response headers a proxy passes on: all but the hop-by-hop ones and
    those the C{Connection} header names.  Original name case is kept.
    """
    kept = []
    named: set[bytes] | None = None
    hop_by_hop = HOP_BY_HOP
    for name, value in headers:
        lower = name.lower()
        if lower in hop_by_hop:
            if lower == b"connection":
                tokens = {token.strip(b" \t").lower() for token in value.split(b",")} - hop_by_hop
                named = tokens if named is None else named | tokens
            continue
        kept.append((name, value))
    if named:  # (Connection: keep-alive names no other field)
        return tuple([(name, value) for name, value in kept if name.lower() not in named])
    return tuple(kept)


@implementer(IPushProducer)
class _UpstreamConnection(UpstreamConnection):
    """
    One HTTP/1.1 connection to the upstream, carrying one exchange at a time.

    It only moves bytes and lifecycle events; the L{_Exchange} it serves
    drives its request writer and response parser.  It is also the tunnel
    stream's producer: pausing it stops reading the response, and the
    exchange hears of it, so that a client slow to read is not taken for an
    upstream that stalled.
    """

    log = Logger()

    # The connected transport, typed for what we use of it; set on connecting.
    sock: UpstreamTransport

    def __init__(self, pool: UpstreamPool) -> None:
        super().__init__()
        self._pool = pool
        self.writer = RequestWriter(pool.memo)
        self.parser = ResponseParser()
        self.exchange: _Exchange | None = None

    def upstream_made(self) -> None:
        self.sock = cast(UpstreamTransport, self.transport)
        self.read_size = ReadSize(self.transport)
        self._pool._connection_made(self)

    def dataReceived(self, data: bytes) -> None:
        self.read_size.read(len(data))
        exchange = self.exchange
        if exchange is not None:
            exchange.upstream_data(self, data)
            return
        # Bytes while no request is outstanding: the upstream is confused
        # (or answering a request we gave up on); this connection is done.
        self.log.debug(
            "upstream {endpoint} sent {count} unexpected bytes on an idle connection",
            endpoint=self._pool.endpoint,
            count=len(data),
        )
        self.sock.abortConnection()

    def upstream_closed(self, reason: Failure) -> None:
        self._pool._connection_lost(self)
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.upstream_lost(self, reason)

    def pauseProducing(self) -> None:
        """IPushProducer: the stream is out of credit; stop reading the response."""
        exchange = self.exchange
        if exchange is not None:
            exchange.reading_paused = True
        self.sock.pauseProducing()

    def resumeProducing(self) -> None:
        """IPushProducer: read the response again."""
        exchange = self.exchange
        if exchange is not None:
            exchange.reading_paused = False
            # The upstream's silence counts from now: it could not be read.
            exchange.last_read = self._pool._reactor.seconds()
        self.sock.resumeProducing()

    def stopProducing(self) -> None:
        """IPushProducer"""
        self.sock.stopProducing()


class _Life(typing.Protocol):
    """
    The inputs of an exchange's lifecycle (L{_Exchange}).  Each is one event;
    the state it comes in decides the transition, and an input no state
    expects raises L{automat.NoTransition}: a bug, never silently ignored.
    """

    def dial(self) -> None:
        """No idle connection: dial a new one, holding the request body."""

    def bind(self, conn: _UpstreamConnection, reused: bool, extra: Header | None) -> None:
        """Send the request head (and what is here of its body) on C{conn}; more body follows."""

    def bind_whole(self, conn: _UpstreamConnection, reused: bool, extra: Header | None) -> None:
        """Send the whole request on C{conn}."""

    def request_complete(self) -> None:
        """The edge ended the request body: send its end."""

    def head_received(self, reply: ReplyHead) -> None:
        """The response head was parsed."""

    def response_complete(
        self, data: bytes | memoryview, trailers: list[Header], reusable: bool
    ) -> None:
        """The response was parsed to its end."""

    def stale(self) -> None:
        """A reused connection closed before the upstream saw the request: dial again."""

    def timer_fired(self) -> None:
        """The exchange's timer fired."""

    def fail(self, reason: Reason, message: str) -> None:
        """End the stream with C{reason}, dropping the upstream side."""

    def reset_by_edge(self, reason: Reason, message: str) -> None:
        """The edge reset the stream: drop the upstream side."""


@implementer(IStreamReceiver, IPushProducer)
class _Exchange(UpstreamExchange):
    """
    One stream forwarded to the upstream: request out, response back.

    It is the stream's receiver (the request body arrives here) and the
    producer registered on the upstream transport (a full upstream socket
    pauses the stream through it).  The transport itself is registered on the
    stream, so a stream out of credit stops reading from the upstream.

    Its lifecycle is a state machine (L{_LIFE}; every transition is listed
    in docs/architecture.md): idle, connecting, sending (the head is out,
    the body still comes), waiting (the request is out), answered_early (a
    response head before the request's end), answering, finished.  An input
    its state does not expect raises L{automat.NoTransition}.  The per-chunk
    paths (request body, response body) are no inputs: each transition sets
    the handlers they call.
    """

    __slots__ = (
        "_life",
        "_at",
        "_on_body",
        "_on_end",
        "_method",
        "_target",
        "_headers",
        "_has_length",
        "_length_zero",
        "_chunked_in",
        "_chunked",
        "_conn",
        "_reused",
        "_pending",
        "_end",
        "_progress",
        "_progress_mark",
        "_response_started",
        "_held_reply",
        "_full",
        "_paused",
        "reading_paused",
        "__weakref__",
    )

    def __init__(self, pool: UpstreamPool, stream: IStream) -> None:
        super().__init__(pool, stream)
        self._pool: UpstreamPool = pool
        # The common path runs without a machine (see _HOT), at the state _at;
        # the machine is made, in that state, for the first input off it.
        self._life: _Life | None = None
        self._at = "idle"
        # What the request body and its end go to, set by each transition.
        # (Functions of the class, not bound methods: no cycle through them.)
        self._on_body: Callable[[_Exchange, bytes], None] = _Exchange._pending_append
        self._on_end: Callable[[_Exchange, Headers], None] = _Exchange._note_end
        self._method = b""
        self._target = b""
        self._headers: list[tuple[bytes, bytes]] = []
        # The request's framing as the edge sent it, and as we send it on.
        self._has_length = False
        self._length_zero = False
        self._chunked_in = False
        self._chunked = False
        self._conn: _UpstreamConnection | None = None
        self._reused = False  # the connection bound came from the idle pool
        # Request body bytes that came before a connection existed.
        self._pending: list[bytes] = []
        # The request trailers once the edge has ended the request body.
        self._end: Headers | None = None
        # Request body writes so far, and as the timer last saw them.
        self._progress = 0
        self._progress_mark = 0
        self._response_started = False  # bytes of the response came
        # A response head not sent yet: its end may come with it.
        self._held_reply: ReplyHead | None = None
        # The upstream socket is full; what we told the stream (paused or not).
        self._full = False
        self._paused = False
        # Whether the stream holds the reading of the response.
        self.reading_paused = False

    def _pending_append(self, data: bytes) -> None:
        self._pending.append(data)

    # -- starting ---------------------------------------------------------

    def start(self) -> None:
        """Check the stream's head, then send it on a pooled or new connection."""
        if self._life is _ENDED:
            return  # reset while attaching
        head = self._stream.head
        if head.kind != "http":
            message = f"stream kind {head.kind!r} cannot go to an HTTP upstream"
            self.log.info(
                "refusing stream to upstream {endpoint}: {error}",
                endpoint=self._pool.endpoint,
                error=message,
            )
            self._fail(Reason.PROTOCOL_ERROR, message)
            return
        try:
            self._prepare(head)
        except (UnicodeError, ValueError) as error:
            self._bad_request(error)
            return
        conn = self._pool._take_idle()
        if conn is None:
            self._machine().dial()
        else:
            self._bind(conn, reused=True)

    def _prepare(self, head: StreamHead) -> None:
        """Work out the request line and the headers that do not depend on framing."""
        self._method = head.method.encode("ascii")
        self._target = head.target.encode("ascii")
        headers = []
        has_host = False
        for name, value in head.headers:
            lower = name.lower()
            if lower == b"transfer-encoding":
                # We own the framing; any transfer coding means a body of unknown size.
                self._chunked_in = True
                continue
            if lower == b"content-length":
                self._has_length = True
                self._length_zero = value.strip() == b"0"
            elif lower == b"host":
                has_host = True
            headers.append((name, value))
        if self._chunked_in and self._has_length:
            # Transfer-Encoding beats Content-Length (RFC 9112 section 6.3).
            headers = [(n, v) for n, v in headers if n.lower() != b"content-length"]
            self._has_length = False
        if not has_host:
            # HTTP/1.1 requires Host; the tunnel's public name is the honest value.
            host = head.tunnel.partition("/")[0]
            headers.insert(0, (b"Host", host.encode("ascii")))
        self._headers = headers

    def _connected(self, conn: _UpstreamConnection) -> None:
        if self._life is _ENDED:
            conn.sock.abortConnection()
            return
        self._bind(conn, reused=False)

    def _bind(self, conn: _UpstreamConnection, reused: bool) -> None:
        """Choose the body's framing, then send the request (whole, or its head first) on C{conn}."""
        extra: Header | None = None
        self._chunked = False
        if self._has_length:
            empty = self._length_zero
        elif self._end is not None and not self._end:
            # The whole body is already here: say how long it is.
            size = sum(map(len, self._pending))
            if size or self._method not in _BODYLESS_METHODS:
                extra = (b"Content-Length", b"%d" % size)
            empty = not size
        elif (
            self._chunked_in or self._pending or self._end or self._method not in _BODYLESS_METHODS
        ):
            extra = (b"Transfer-Encoding", b"chunked")
            self._chunked = True
            empty = False
        else:
            empty = True
        if empty or self._end is not None:
            self._step("bind_whole", conn, reused, extra)
        else:
            self._step("bind", conn, reused, extra)

    def _use(self, conn: _UpstreamConnection, reused: bool, extra: Header | None, whole: bool) -> None:
        """Send the request head, what we hold of the body, and (C{whole}) its end on C{conn}."""
        self._conn = conn
        self._reused = reused
        conn.exchange = self
        sock = conn.sock
        self.reading_paused = False
        self._stream.registerProducer(conn, True)
        if not whole:
            sock.registerProducer(self, True)
        try:
            headers = self._headers if extra is None else [*self._headers, extra]
            head = conn.writer.head(self._method, self._target, headers)
            conn.parser.expect(self, self._method == b"HEAD")
            pending, self._pending = self._pending, []
            if whole and not pending:
                # The whole request, the only write of this turn: sent at once.
                end = conn.writer.end(self._end if self._chunked and self._end else ())
                bulkwrite.write_now(sock, head + end if end else head)
            else:
                sock.write(head)
                for data in pending:
                    self._send_data(conn, data)
                if whole:
                    self._send_end(conn)
        except RequestError as error:
            self._bad_request(error)
            return
        self._arm_timer(self._pool.response_timeout)
        self._progress_mark = self._progress
        # (Last: resuming the stream may bring the request's body and end at once.)
        self._set_paused(self._full)

    def _send_data(self, conn: _UpstreamConnection, data: bytes) -> None:
        conn.sock.writeSequence(conn.writer.data(data))
        self._progress += 1

    def _send_end(self, conn: _UpstreamConnection) -> None:
        end = conn.writer.end(self._end if self._chunked and self._end else ())
        if end:
            conn.sock.write(end)
        self._full = False

    # -- IStreamReceiver: the request body from the edge ------------------

    def reply_received(self, reply: ReplyHead) -> None:
        """L{IStreamReceiver}: never sent to the agent side; ignored."""

    def data_received(self, data: bytes) -> None:
        """L{IStreamReceiver}: request body bytes, sent on or held until connected."""
        if data:
            self._on_body(self, data)

    def end_received(self, trailers: Headers) -> None:
        """L{IStreamReceiver}: the request body is complete."""
        self._on_end(self, trailers)

    def reset_received(self, reason: Reason, message: str) -> None:
        """L{IStreamReceiver}: the edge gave up; drop the upstream connection."""
        self._machine().reset_by_edge(reason, message)

    # What the request body goes to in each state.

    def _body_to_upstream(self, data: bytes) -> None:
        conn = self._conn
        assert conn is not None
        try:
            self._send_data(conn, data)
        except RequestError as error:
            self._bad_request(error)

    def _body_after_end(self, data: bytes) -> None:
        self._bad_request(ValueError("request body bytes where the request had no body"))

    def _note_end(self, trailers: Headers) -> None:
        self._end = tuple(trailers)

    def _end_to_upstream(self, trailers: Headers) -> None:
        self._end = tuple(trailers)
        self._step("request_complete")

    # -- IPushProducer: the upstream transport's view of the request body --

    def pauseProducing(self) -> None:
        """L{IPushProducer}: the upstream socket is full; pause the stream."""
        self._full = True
        self._set_paused(True)

    def resumeProducing(self) -> None:
        """L{IPushProducer}: the upstream socket drained; resume the stream."""
        self._full = False
        self._set_paused(False)

    def stopProducing(self) -> None:
        """
        L{IPushProducer}: the upstream connection is closing.  Ignored: its
        C{connectionLost} decides what the stream is told.
        """

    def _set_paused(self, want: bool) -> None:
        if want is not self._paused:
            self._paused = want
            if want:
                self._stream.pauseProducing()
            else:
                self._stream.resumeProducing()

    # -- the response from the upstream -----------------------------------

    def upstream_data(self, conn: _UpstreamConnection, data: bytes) -> None:
        """Bytes of the response arrived on C{conn}."""
        self._response_started = True
        self.last_read = self._pool._reactor.seconds()
        try:
            conn.parser.feed(data)
        except ResponseError as error:
            self._send_held_reply()
            if conn.exchange is self:
                self._malformed(error)
            return
        self._send_held_reply()

    def _send_held_reply(self) -> None:
        reply, self._held_reply = self._held_reply, None
        if reply is not None:
            self._stream.send_reply(reply)

    # -- ResponseSink: what the parser makes of them

    def response_head(self, status: int, reason: bytes, headers: tuple[Header, ...]) -> None:
        """L{ResponseSink}: the response head, passed on without hop-by-hop headers."""
        self._step("head_received", ReplyHead(status, reason, _end_to_end(headers)))

    def response_data(self, data: bytes | memoryview) -> None:
        """L{ResponseSink}: response body bytes."""
        if self._conn is None:
            return
        reply = self._held_reply
        if reply is not None:
            # A frame stream sends the reply and these bytes in one write.
            write_with_reply = getattr(self._stream, "write_with_reply", None)
            if write_with_reply is not None:
                self._held_reply = None
                write_with_reply(reply, data)
                return
            self._send_held_reply()
        # A view of a read (nothing changes it) goes on as one: every
        # IStream here takes views (FrameStream, the gRPC stream).
        self._stream.write(cast(bytes, data))

    def response_end(self, data: bytes | memoryview, trailers: list[Header], reusable: bool) -> None:
        """L{ResponseSink}: the response is complete: end the stream, keep or close the connection."""
        self._step("response_complete", data, trailers, reusable)

    def _unbind(self) -> _UpstreamConnection:
        """Let go of the connection (still open) and of the stream's producer."""
        conn = self._conn
        assert conn is not None
        self._conn = None
        conn.exchange = None
        self._cancel_timer()
        self._stream.unregisterProducer()
        return conn

    def _end_stream(self, data: bytes | memoryview, trailers: list[Header]) -> None:
        """The response is complete: the held reply, the last bytes and the end, in as few frames as may be."""
        reply, self._held_reply = self._held_reply, None
        if reply is not None:
            # A frame stream sends a bodiless response as one frame.
            end_with_reply = getattr(self._stream, "end_with_reply", None)
            if end_with_reply is not None and not data and not trailers:
                end_with_reply(reply)
                return
            self._stream.send_reply(reply)
        if not data:
            self._stream.end(trailers)
            return
        # A frame stream sends the last bytes and the end as one frame.
        end_with_data = getattr(self._stream, "end_with_data", None)
        if end_with_data is not None and not trailers:
            end_with_data(data)
        else:
            self._stream.write(cast(bytes, data))
            self._stream.end(trailers)

    def upstream_lost(self, conn: _UpstreamConnection, reason: Failure) -> None:
        """C{conn} closed while serving this exchange."""
        if self._reused and not self._response_started and not self._progress:
            # A stale keep-alive connection: the upstream closed it before it
            # saw our request.  Nothing is lost yet, so try once more (on a
            # new connection: never reused, so never retried again).
            self._machine().stale()
            return
        try:
            # A body delimited by the connection closing ends here.
            conn.parser.feed_eof()
        except ResponseError as error:
            detail = str(error)
        else:
            detail = reason.getErrorMessage()
        if self._life is _ENDED:
            return
        self._closed_early("mid-response" if self._response_started else "before responding", detail)

    # -- timing -----------------------------------------------------------

    def _timed_out(self) -> None:
        self._machine().timer_fired()

    # -- failing ----------------------------------------------------------

    def _fail(self, reason: Reason, message: str) -> None:
        """End the stream with C{reason} and drop the upstream connection."""
        self._machine().fail(reason, message)

    def _drop_upstream(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.exchange = None
            conn.parser.abandon()
            conn.sock.abortConnection()

    def _stop_sending(self) -> None:
        """The request body stops: this exchange is no longer the upstream socket's producer."""
        conn = self._conn
        if conn is not None:
            conn.sock.unregisterProducer()

    def _finished(self) -> None:
        """
        Entering C{finished}: late request bytes and ends (in flight when the
        upstream answered) are dropped.  Its machine (which refers back to
        it) is let go, so it leaves no cycle for the cyclic GC; the shared
        ended machine takes a late reset.
        """
        self._on_body = _dropped_late
        self._on_end = _dropped_late
        self._life = _ENDED
        self._at = "finished"

    # -- the lifecycle machine ------------------------------------------------

    def _machine(self) -> _Life:
        """This exchange's machine, made in the state the common path reached when first needed."""
        life = self._life
        if life is None:
            life = self._life = _LIFE(self, _STATES[self._at])
        return life

    def _step(self, name: str, *args: Any) -> None:
        """
        Feed the input C{name}: while the exchange has no machine and the
        input is a common-path transition from where it is (L{_HOT}), that
        transition runs directly; anything else goes to the machine, which
        raises L{automat.NoTransition} for an input its state does not expect.
        """
        if self._life is None:
            hot = _HOT.get((self._at, name))
            if hot is not None:
                self._at, transition = hot
                transition(None, self, *args)
                return
        getattr(self._machine(), name)(*args)


def _dropped_late(exchange: _Exchange, late: object) -> None:
    """Request body bytes, or its end, after the exchange finished: dropped."""


# -- the lifecycle of an exchange ----------------------------------------------

_builder = TypeMachineBuilder(_Life, _Exchange)
_IDLE = _builder.state("idle")
_CONNECTING = _builder.state("connecting")
_SENDING = _builder.state("sending")  # the request head is out; its body still comes
_WAITING = _builder.state("waiting")  # the request is out; no response head yet
_ANSWERED_EARLY = _builder.state("answered_early")  # a response head before the request's end
_ANSWERING = _builder.state("answering")  # the response head is in; the request is out
_FINISHED = _builder.state("finished")
_STATES = {
    state.name: state
    for state in (_IDLE, _CONNECTING, _SENDING, _WAITING, _ANSWERED_EARLY, _ANSWERING, _FINISHED)
}

@_IDLE.upon(_Life.dial).to(_CONNECTING)
def _dial_new(life: _Life, ex: _Exchange) -> None:
    """Hold the request body at the edge until the connection is there."""
    ex._on_body = _Exchange._pending_append
    ex._on_end = _Exchange._note_end
    if ex._end is None:
        ex._set_paused(True)
    ex._dial(ex._pool._factory)


@_SENDING.upon(_Life.stale).to(_CONNECTING)
@_WAITING.upon(_Life.stale).to(_CONNECTING)
def _redial(life: _Life, ex: _Exchange) -> None:
    """A stale keep-alive connection: nothing was lost, so dial a new one."""
    ex._cancel_timer()
    ex._conn = None
    ex._full = False
    ex._stream.unregisterProducer()
    ex.log.info(
        "upstream {endpoint} closed a reused connection before answering; retrying",
        endpoint=ex._pool.endpoint,
    )
    _dial_new(life, ex)


@_CONNECTING.upon(_Life.bind).to(_SENDING)
def _send_head(
    life: _Life, ex: _Exchange, conn: _UpstreamConnection, reused: bool, extra: Header | None
) -> None:
    """The request head (and what is here of the body) goes; the body follows as it comes."""
    ex._on_body = _Exchange._body_to_upstream
    ex._on_end = _Exchange._end_to_upstream
    ex._use(conn, reused, extra, whole=False)


@_CONNECTING.upon(_Life.bind_whole).to(_WAITING)
def _send_request(
    life: _Life, ex: _Exchange, conn: _UpstreamConnection, reused: bool, extra: Header | None
) -> None:
    """The whole request goes at once."""
    ex._on_body = _Exchange._body_after_end
    ex._on_end = _Exchange._note_end
    ex._use(conn, reused, extra, whole=True)


@_ANSWERED_EARLY.upon(_Life.request_complete).to(_ANSWERING)
def _end_request(life: _Life, ex: _Exchange) -> None:
    """The request body's end goes; the upstream socket no longer pauses the stream."""
    ex._on_body = _Exchange._body_after_end
    ex._on_end = _Exchange._note_end
    conn = ex._conn
    assert conn is not None
    try:
        ex._send_end(conn)
    except RequestError as error:
        ex._bad_request(error)
        return
    conn.sock.unregisterProducer()


@_SENDING.upon(_Life.head_received).to(_ANSWERED_EARLY)
def _take_head(life: _Life, ex: _Exchange, reply: ReplyHead) -> None:
    """Held until this read is parsed: a response without a body ends with it."""
    ex._body_timer()
    ex._held_reply = reply


def _finish_response(
    life: _Life, ex: _Exchange, data: bytes | memoryview, trailers: list[Header], reusable: bool
) -> None:
    """End the stream; keep the connection for the next request, or close it."""
    ex._finished()
    conn = ex._unbind()
    if conn.lost:
        pass
    elif reusable and conn.writer.keep_alive:
        ex._pool._release(conn)
    else:
        conn.sock.loseConnection()
    ex._end_stream(data, trailers)


@_ANSWERED_EARLY.upon(_Life.response_complete).to(_FINISHED)
def _finish_response_early(
    life: _Life, ex: _Exchange, data: bytes | memoryview, trailers: list[Header], reusable: bool
) -> None:
    """
    The upstream answered before reading the whole request body: what we
    still hold of it is of no use to anyone, so the connection goes; the
    rest drains from the edge (dropped) rather than stall it.
    """
    ex._finished()  # (first: resuming the stream may bring body bytes at once, to be dropped)
    ex._stop_sending()
    conn = ex._unbind()
    if not conn.lost:
        conn.sock.abortConnection()
    ex._full = False
    ex._set_paused(False)
    ex._end_stream(data, trailers)


@_SENDING.upon(_Life.timer_fired).loop()
def _watch_request(life: _Life, ex: _Exchange) -> None:
    """
    Still sending the body: while the upstream takes it (or the edge is slow
    to send it, which is the edge's to time out) the head may wait.
    """
    if not ex._full or ex._progress != ex._progress_mark:
        ex._progress_mark = ex._progress
        ex._arm_timer(ex._pool.response_timeout)
    else:
        ex._no_response()


@_WAITING.upon(_Life.timer_fired).loop()
def _no_head(life: _Life, ex: _Exchange) -> None:
    ex._no_response()


@_ANSWERED_EARLY.upon(_Life.timer_fired).loop()
def _watch_body_early(life: _Life, ex: _Exchange) -> None:
    ex._watch_body(waiting=True)  # the client still sends its request


@_ANSWERING.upon(_Life.timer_fired).loop()
def _watch_body(life: _Life, ex: _Exchange) -> None:
    ex._watch_body(waiting=ex.reading_paused)


@_IDLE.upon(_Life.fail).to(_FINISHED)
@_CONNECTING.upon(_Life.fail).to(_FINISHED)
@_WAITING.upon(_Life.fail).to(_FINISHED)
@_ANSWERING.upon(_Life.fail).to(_FINISHED)
def _abandon(life: _Life, ex: _Exchange, reason: Reason, message: str) -> None:
    """End the stream with C{reason}; drop the upstream side."""
    ex._finished()
    ex._reset(reason, message)


@_SENDING.upon(_Life.fail).to(_FINISHED)
@_ANSWERED_EARLY.upon(_Life.fail).to(_FINISHED)
def _abandon_sending(life: _Life, ex: _Exchange, reason: Reason, message: str) -> None:
    """The same while the request body goes: the upstream socket stops pausing the stream first."""
    ex._stop_sending()
    _abandon(life, ex, reason, message)


@_IDLE.upon(_Life.reset_by_edge).to(_FINISHED)
@_CONNECTING.upon(_Life.reset_by_edge).to(_FINISHED)
@_WAITING.upon(_Life.reset_by_edge).to(_FINISHED)
@_ANSWERING.upon(_Life.reset_by_edge).to(_FINISHED)
def _dropped(life: _Life, ex: _Exchange, reason: Reason, message: str) -> None:
    """The edge gave up: drop the upstream side (the stream is already gone)."""
    ex._log_edge_reset(reason, message)
    ex._finished()
    ex._teardown()


@_SENDING.upon(_Life.reset_by_edge).to(_FINISHED)
@_ANSWERED_EARLY.upon(_Life.reset_by_edge).to(_FINISHED)
def _dropped_sending(life: _Life, ex: _Exchange, reason: Reason, message: str) -> None:
    """The same while the request body goes: the upstream socket stops pausing the stream first."""
    ex._stop_sending()
    _dropped(life, ex, reason, message)


# A reset that crosses the stream's end on the wire finds the exchange over.
_FINISHED.upon(_Life.reset_by_edge).loop().returns(None)

# The common exchange: an idle keep-alive connection at hand, the request
# sent, the response back in order.  These transitions are the machine's
# like the others, and an exchange that has no machine yet takes them
# straight from _HOT (state and input: next state and transition, the same
# functions); any other input makes the machine, in the state reached, and
# goes to it.  Why: every input through automat (its transition lookup scans
# the whole table) cost more than the rest of the exchange's Python
# (bench/agent_exchange_micro.py; the figures are in docs/benchmarks.md).
_COMMON_PATH = (
    (_IDLE, _Life.bind, _SENDING, _send_head),
    (_IDLE, _Life.bind_whole, _WAITING, _send_request),
    (_SENDING, _Life.request_complete, _WAITING, _end_request),
    (_WAITING, _Life.head_received, _ANSWERING, _take_head),
    (_ANSWERING, _Life.response_complete, _FINISHED, _finish_response),
)
for _source, _on, _target, _transition in _COMMON_PATH:
    _source.upon(_on).to(_target)(_transition)
_HOT: Mapping[tuple[str, str], tuple[str, Callable[..., None]]] = MappingProxyType(
    {
        (source.name, on.__name__): (target.name, transition)
        for source, on, target, transition in _COMMON_PATH
    }
)

_LIFE = _builder.build()
# The machine every exchange hands over to when it finishes, so that none
# keeps a cycle (exchange ↔ its machine) alive for the cyclic GC.
_ENDED: _Life = _LIFE(cast(_Exchange, None), _FINISHED)


@implementer(IUpstream)
class UpstreamPool(UpstreamSettings):
    """
    Forwards HTTP streams to one upstream service, reusing keep-alive
    connections.

    @param reactor: provides the reactor interfaces C{endpoint} needs and
        L{IReactorTime<twisted.internet.interfaces.IReactorTime>}; every timer
        uses it.
    @param endpoint: a Twisted client endpoint string, such as
        C{"tcp:host=127.0.0.1:port=8000"}.
    @param max_idle: at most this many idle connections are kept.
    @param connect_timeout: seconds to wait for a connection before the
        stream is reset with C{upstream_refused}.
    @param response_timeout: seconds to wait for the response head (counted
        from the request head, restarted while the request body still moves)
        before the stream is reset with C{upstream_timeout}.
    @param body_timeout: seconds a begun response may bring nothing more
        (not counting while the stream holds the reading) before the stream
        is reset with C{upstream_timeout}; 0 = no limit.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        endpoint: str,
        max_idle: int = 16,
        connect_timeout: float = 10.0,
        response_timeout: float = 60.0,
        body_timeout: float = 60.0,
    ) -> None:
        super().__init__(
            reactor, endpoint, functools.partial(_UpstreamConnection, self),
            connect_timeout, response_timeout, body_timeout,
        )
        self.max_idle = max_idle
        self._idle: list[_UpstreamConnection] = []
        self._connections: set[_UpstreamConnection] = set()
        self._closed = False
        # What this upstream's connections remember of the heads and fields
        # that recur: validated request fields (the writers').
        self.memo = HeadMemo()
        self.upgrades: IUpstream = UpgradeRelays(self)

    def forward(self, stream: IStream) -> None:
        """Forward one stream to the upstream and its response back, end to end."""
        if stream.head.kind == "upgrade":
            # A protocol switch gets a connection of its own (never pooled).
            self.upgrades.forward(stream)
            return
        exchange = _Exchange(self, stream)
        stream.attach(exchange)
        exchange.start()

    def close(self) -> Deferred[None]:
        """
        Close the idle connections and stop pooling; the Deferred fires when
        every connection not serving a stream is closed.
        """
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.sock.loseConnection()
        waiting = [conn.when_lost() for conn in self._connections if conn.exchange is None]
        done: Deferred[None] = gatherResults(waiting).addCallback(lambda _: None)
        return done

    def _take_idle(self) -> _UpstreamConnection | None:
        """The most recently used idle connection, if any."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.lost:
                return conn
        return None

    def _release(self, conn: _UpstreamConnection) -> None:
        """Keep C{conn} for another request, or close it if the pool is full."""
        if self._closed or len(self._idle) >= self.max_idle:
            conn.sock.loseConnection()
            return
        # The stream may have left it paused; an idle connection must notice EOF.
        conn.sock.resumeProducing()
        self._idle.append(conn)

    def _connection_made(self, conn: _UpstreamConnection) -> None:
        self._connections.add(conn)

    def _connection_lost(self, conn: _UpstreamConnection) -> None:
        self._connections.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)
