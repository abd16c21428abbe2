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

import typing
from collections.abc import Callable, Sequence
from typing import Any, cast

from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IAddress, IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tunneld.agent.dialing import connect_error, connect_timed_out
from tunneld.agent.http1_wire import (
    Header,
    HeadMemo,
    RequestError,
    RequestWriter,
    ResponseError,
    ResponseParser,
)
from tunneld.agent.upgrade import relay_upgrade
from tunneld.interfaces import IStream, IStreamReceiver
from tunneld.model.messages import Headers, ReplyHead, StreamHead
from tunneld.model.reasons import Reason
from tunneld.speedups import bulkwrite
from tunneld.speedups.readsize import ReadSize

__all__ = ["UpstreamPool"]

# Twisted's endpoint parser is untyped; this is its signature.
_client_from_string: Callable[[Any, str], IStreamClientEndpoint] = clientFromString

# Methods whose requests carry no body unless they say so with a framing header.
_BODYLESS_METHODS = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE", b"CONNECT"})

# RFC 9110 section 7.6.1, plus the legacy Proxy-Connection.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


class _Transport(typing.Protocol):
    """What this module uses of an upstream connection's transport."""

    def write(self, data: bytes) -> None: ...
    def writeSequence(self, data: list[bytes]) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def stopProducing(self) -> None: ...


def _end_to_end(headers: Sequence[Header]) -> tuple[Header, ...]:
    """
    The response headers a proxy passes on: all but the hop-by-hop ones and
    those the C{Connection} header names.  Original name case is kept.
    """
    kept = []
    named: set[bytes] | None = None
    hop_by_hop = _HOP_BY_HOP
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
class _UpstreamConnection(Protocol):
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
    sock: _Transport

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self.writer = RequestWriter(pool.memo)
        self.parser = ResponseParser()
        self.exchange: _Exchange | None = None
        self.lost = False
        self._lost_waiters: list[Deferred[None]] = []

    def connectionMade(self) -> None:
        self.sock = cast(_Transport, self.transport)
        self.read_size = ReadSize(self.transport)
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
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

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self._pool._connection_lost(self)
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.upstream_lost(self, reason)
        waiters, self._lost_waiters = self._lost_waiters, []
        for waiter in waiters:
            waiter.callback(None)

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

    def when_lost(self) -> Deferred[None]:
        """A Deferred that fires once this connection is closed."""
        if self.lost:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._lost_waiters.append(waiter)
        return waiter


class _ConnectionFactory(ClientFactory):
    """Makes the pool's upstream connections."""

    noisy = False

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool

    def buildProtocol(self, addr: IAddress | None) -> _UpstreamConnection:
        return _UpstreamConnection(self._pool)


@implementer(IStreamReceiver, IPushProducer)
class _Exchange:
    """
    One stream forwarded to the upstream: request out, response back.

    It is the stream's receiver (the request body arrives here) and the
    producer registered on the upstream transport (a full upstream socket
    pauses the stream through it).  The transport itself is registered on the
    stream, so a stream out of credit stops reading from the upstream.
    """

    __slots__ = (
        "_pool",
        "_stream",
        "_method",
        "_target",
        "_headers",
        "_has_length",
        "_length_zero",
        "_chunked_in",
        "_chunked",
        "_conn",
        "_connecting",
        "_reused",
        "_retried",
        "_pending",
        "_end",
        "_request_done",
        "_body_sent",
        "_progress",
        "_progress_mark",
        "_response_started",
        "_replied",
        "_held_reply",
        "_done",
        "_hold",
        "_full",
        "_paused",
        "_stream_has_producer",
        "_transport_has_producer",
        "_timer",
        "last_read",
        "reading_paused",
        "__weakref__",
    )

    log = Logger()

    def __init__(self, pool: UpstreamPool, stream: IStream) -> None:
        self._pool = pool
        self._stream = stream
        self._method = b""
        self._target = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._has_length = False
        self._length_zero = False
        self._chunked_in = False
        self._chunked = False
        self._conn: _UpstreamConnection | None = None
        self._connecting: Deferred[Any] | None = None
        self._reused = False
        self._retried = False
        # Request body bytes that came before a connection existed.
        self._pending: list[bytes] = []
        # The request trailers once the edge has ended the request body.
        self._end: Headers | None = None
        self._request_done = False
        self._body_sent = False
        self._progress = 0
        self._progress_mark = 0
        self._response_started = False
        self._replied = False
        # A response head not sent yet: its end may come with it.
        self._held_reply: ReplyHead | None = None
        self._done = False
        # The stream is paused while either holds; _paused is what we told it.
        self._hold = False
        self._full = False
        self._paused = False
        self._stream_has_producer = False
        self._transport_has_producer = False
        # One timer: for the response head, then for the body's progress.
        self._timer: Any = None
        # When response bytes last came, and whether the stream holds the reading.
        self.last_read = 0.0
        self.reading_paused = False

    # -- starting ---------------------------------------------------------

    def start(self) -> None:
        """Check the stream's head, then send it on a pooled or new connection."""
        if self._done:
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
            self._connect()
        else:
            self._use(conn, reused=True)

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

    def _connect(self) -> None:
        """Open a fresh upstream connection, holding the request body meanwhile."""
        if self._end is None:
            self._hold = True
            self._update_pause()
        pool = self._pool
        connecting: Deferred[Any] = pool._endpoint.connect(pool._factory)
        connecting.addTimeout(pool.connect_timeout, pool._reactor, connect_timed_out)
        self._connecting = connecting
        connecting.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, conn: _UpstreamConnection) -> None:
        self._connecting = None
        if self._done:
            conn.sock.abortConnection()
            return
        self._use(conn, reused=False)

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if self._done or isinstance(failure.value, CancelledError):
            return
        error = connect_error(failure, self._pool.connect_timeout)
        self.log.warn(
            "upstream {endpoint} refused: {error}", endpoint=self._pool.endpoint, error=error
        )
        self._fail(Reason.UPSTREAM_REFUSED, f"upstream {self._pool.endpoint} refused: {error}")

    def _use(self, conn: _UpstreamConnection, reused: bool) -> None:
        """Send the request head and what we hold of the body on C{conn}."""
        self._conn = conn
        self._reused = reused
        conn.exchange = self
        transport = conn.sock
        self.reading_paused = False
        self._stream.registerProducer(conn, True)
        self._stream_has_producer = True
        if self._end is None:
            transport.registerProducer(self, True)
            self._transport_has_producer = True
        try:
            empty = self._send_head(conn)
            pending, self._pending = self._pending, []
            for data in pending:
                self._send_data(conn, data)
            if empty or self._end is not None:
                # Without a body the request is complete now, whenever the
                # edge gets round to saying so.
                self._send_end(conn)
        except RequestError as error:
            self._bad_request(error)
            return
        if self._done:
            return
        self._hold = False
        self._update_pause()
        self._arm_timer()

    def _send_head(self, conn: _UpstreamConnection) -> bool:
        """Send the request head, choosing the body framing; True if it has no body."""
        extra: tuple[bytes, bytes] | None = None
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
        headers = self._headers if extra is None else [*self._headers, extra]
        head = conn.writer.head(self._method, self._target, headers)
        conn.parser.expect(self, self._method == b"HEAD")
        if empty:
            # The whole request, the only write of this turn: sent at once.
            bulkwrite.write_now(conn.sock, head)
        else:
            conn.sock.write(head)
        return empty

    def _send_data(self, conn: _UpstreamConnection, data: bytes) -> None:
        conn.sock.writeSequence(conn.writer.data(data))
        self._body_sent = True
        self._progress += 1

    def _send_end(self, conn: _UpstreamConnection) -> None:
        end = conn.writer.end(self._end if self._chunked and self._end else ())
        if end:
            conn.sock.write(end)
        self._request_done = True
        self._full = False
        if self._transport_has_producer:
            self._transport_has_producer = False
            conn.sock.unregisterProducer()

    # -- IStreamReceiver: the request body from the edge ------------------

    def reply_received(self, reply: ReplyHead) -> None:
        """L{IStreamReceiver}: never sent to the agent side; ignored."""

    def data_received(self, data: bytes) -> None:
        """L{IStreamReceiver}: request body bytes, sent on or held until connected."""
        if self._done or not data:
            return
        conn = self._conn
        if conn is None:
            self._pending.append(data)
            return
        if self._request_done:
            self._bad_request(ValueError("request body bytes where the request had no body"))
            return
        try:
            self._send_data(conn, data)
        except RequestError as error:
            self._bad_request(error)

    def end_received(self, trailers: Headers) -> None:
        """L{IStreamReceiver}: the request body is complete."""
        if self._done:
            return
        self._end = tuple(trailers)
        conn = self._conn
        if conn is not None and not self._request_done:
            try:
                self._send_end(conn)
            except RequestError as error:
                self._bad_request(error)

    def reset_received(self, reason: Reason, message: str) -> None:
        """L{IStreamReceiver}: the edge gave up; drop the upstream connection."""
        if self._done:
            return
        self._done = True
        self.log.debug(
            "stream to upstream {endpoint} reset by the edge ({reason}): {message}",
            endpoint=self._pool.endpoint,
            reason=reason.value,
            message=message,
        )
        self._teardown()

    # -- IPushProducer: the upstream transport's view of the request body --

    def pauseProducing(self) -> None:
        """L{IPushProducer}: the upstream socket is full; pause the stream."""
        self._full = True
        self._update_pause()

    def resumeProducing(self) -> None:
        """L{IPushProducer}: the upstream socket drained; resume the stream."""
        self._full = False
        self._update_pause()

    def stopProducing(self) -> None:
        """
        L{IPushProducer}: the upstream connection is closing.  Ignored: its
        C{connectionLost} decides what the stream is told.
        """

    def _update_pause(self) -> None:
        want = self._hold or self._full
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
            self._malformed(error)
            return
        self._send_held_reply()

    def _send_held_reply(self) -> None:
        reply, self._held_reply = self._held_reply, None
        if reply is not None and not self._done:
            self._stream.send_reply(reply)

    # -- ResponseSink: what the parser makes of them

    def response_head(self, status: int, reason: bytes, headers: tuple[Header, ...]) -> None:
        """L{ResponseSink}: the response head, passed on without hop-by-hop headers."""
        if self._done:
            return
        self._body_timer()
        self._replied = True
        # Held until this read is parsed: a response without a body ends with it.
        self._held_reply = ReplyHead(status, reason, _end_to_end(headers))

    def response_data(self, data: bytes | memoryview) -> None:
        """L{ResponseSink}: response body bytes."""
        if not self._done:
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
        conn = self._conn
        if self._done or conn is None:
            return
        self._done = True
        self._cancel_timer()
        self._conn = None
        conn.exchange = None
        if self._stream_has_producer:
            self._stream_has_producer = False
            self._stream.unregisterProducer()
        if self._transport_has_producer:
            self._transport_has_producer = False
            conn.sock.unregisterProducer()
        if conn.lost:
            pass
        elif reusable and self._request_done and conn.writer.keep_alive:
            self._pool._release(conn)
        elif self._request_done:
            conn.sock.loseConnection()
        else:
            # What we still hold of the request body is of no use to anyone.
            conn.sock.abortConnection()
        if not self._request_done:
            # The upstream answered before reading the whole body; let the
            # rest drain from the edge (we drop it) rather than stall it.
            self._hold = self._full = False
            self._update_pause()
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
        if self._done:
            return
        self._conn = None
        self._transport_has_producer = False
        self._full = False
        if self._stream_has_producer:
            self._stream_has_producer = False
            self._stream.unregisterProducer()
        if (
            self._reused
            and not self._retried
            and not self._response_started
            and not self._body_sent
        ):
            # A stale keep-alive connection: the upstream closed it before it
            # saw our request.  Nothing is lost yet, so try once more.
            self._retried = True
            self._cancel_timer()
            self._request_done = False
            self.log.info(
                "upstream {endpoint} closed a reused connection before answering; retrying",
                endpoint=self._pool.endpoint,
            )
            self._connect()
            return
        try:
            # A body delimited by the connection closing ends here.
            conn.parser.feed_eof()
        except ResponseError as error:
            detail = str(error)
        else:
            detail = reason.getErrorMessage()
        if self._done:
            return
        when = "mid-response" if self._response_started else "before responding"
        self.log.warn(
            "upstream {endpoint} closed the connection {when}: {error}",
            endpoint=self._pool.endpoint,
            when=when,
            error=detail,
        )
        self._fail(
            Reason.UPSTREAM_ERROR,
            f"upstream {self._pool.endpoint} closed the connection {when}: {detail}",
        )

    def _malformed(self, error: ResponseError) -> None:
        self.log.warn(
            "upstream {endpoint} sent a malformed response: {error}",
            endpoint=self._pool.endpoint,
            error=str(error),
        )
        self._fail(
            Reason.UPSTREAM_ERROR,
            f"upstream {self._pool.endpoint} sent a malformed response: {error}",
        )

    # -- timing -----------------------------------------------------------

    def _arm_timer(self) -> None:
        self._progress_mark = self._progress
        self._timer = self._pool._reactor.callLater(self._pool.response_timeout, self._timed_out)

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _body_timer(self) -> None:
        """The head is here: the timer now watches the body's progress (or stops)."""
        timeout = self._pool.body_timeout
        timer = self._timer
        if timeout <= 0:
            self._cancel_timer()
        elif timer is None:
            self._timer = self._pool._reactor.callLater(timeout, self._timed_out)
        else:
            # Later only (the usual case) is a cheap reset: no new timer.
            timer.reset(timeout)

    def _body_stalled(self) -> None:
        timeout = self._pool.body_timeout
        if timeout <= 0:
            return
        reactor = self._pool._reactor
        idle = reactor.seconds() - self.last_read
        waiting = self.reading_paused or not self._request_done
        if waiting or idle + 1e-6 < timeout:
            # The client holds the stream or still sends its request (the
            # upstream may be waiting for it), or bytes came since.
            wait = timeout if waiting else timeout - idle
            self._timer = reactor.callLater(wait, self._timed_out)
            return
        self.log.warn(
            "upstream {endpoint} stalled: nothing more of its response for {timeout}s",
            endpoint=self._pool.endpoint, timeout=timeout,
        )
        self._fail(
            Reason.UPSTREAM_TIMEOUT,
            f"upstream {self._pool.endpoint} stalled: nothing more of its response for "
            f"{timeout:g}s",
        )

    def _timed_out(self) -> None:
        self._timer = None
        if self._done:
            return
        if self._replied:
            self._body_stalled()
            return
        if not self._request_done and (not self._full or self._progress != self._progress_mark):
            # Still sending the body, and the upstream is taking it (or the
            # edge is slow to send it, which is the edge's to time out).
            self._arm_timer()
            return
        timeout = self._pool.response_timeout
        self.log.warn(
            "upstream {endpoint} sent no response within {timeout}s",
            endpoint=self._pool.endpoint,
            timeout=timeout,
        )
        self._fail(
            Reason.UPSTREAM_TIMEOUT,
            f"upstream {self._pool.endpoint} sent no response within {timeout:g}s",
        )

    # -- failing ----------------------------------------------------------

    def _bad_request(self, error: Exception) -> None:
        self.log.info(
            "request cannot be sent to upstream {endpoint}: {error}",
            endpoint=self._pool.endpoint,
            error=str(error),
        )
        self._fail(Reason.BAD_REQUEST, f"request cannot be sent upstream: {error}")

    def _fail(self, reason: Reason, message: str) -> None:
        """End the stream with C{reason} and drop the upstream connection."""
        if self._done:
            return
        self._done = True
        self._teardown()
        self._stream.reset(reason, message)

    def _teardown(self) -> None:
        """Stop timers and connection attempts; abort the upstream connection."""
        self._cancel_timer()
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()
        if self._stream_has_producer:
            self._stream_has_producer = False
            self._stream.unregisterProducer()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.exchange = None
            conn.parser.abandon()
            if self._transport_has_producer:
                self._transport_has_producer = False
                conn.sock.unregisterProducer()
            conn.sock.abortConnection()


class UpstreamPool:
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
        self._reactor = reactor
        self.endpoint = endpoint
        self._endpoint = _client_from_string(reactor, endpoint)
        self._factory = _ConnectionFactory(self)
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self.response_timeout = response_timeout
        self.body_timeout = body_timeout
        self._idle: list[_UpstreamConnection] = []
        self._connections: set[_UpstreamConnection] = set()
        self._closed = False
        # What this upstream's connections remember of the heads and fields
        # that recur: validated request fields (the writers').
        self.memo = HeadMemo()

    def forward(self, stream: IStream) -> None:
        """Forward one stream to the upstream and its response back, end to end."""
        if stream.head.kind == "upgrade":
            # A protocol switch gets a connection of its own (never pooled).
            relay_upgrade(self, stream)
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
