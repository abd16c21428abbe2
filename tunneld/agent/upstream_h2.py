# -*- test-case-name: tests.test_public_h2 -*-
"""
The agent's last hop to an upstream that speaks HTTP/2 in cleartext (h2c,
prior knowledge): a gRPC server, or any service whose semantics need HTTP/2
end to end (trailers, C{te: trailers}, long bidirectional streams).

L{H2UpstreamPool} has the same C{forward(stream)} and C{close()} as
L{tunneld.agent.upstream.UpstreamPool}.  All streams to one upstream share
one multiplexed connection (a new one is dialled when it is lost or the
upstream sends GOAWAY); streams beyond the upstream's
C{MAX_CONCURRENT_STREAMS} wait for a free slot.

Backpressure is HTTP/2 flow control on this hop too: response DATA is
acknowledged only as the tunnel stream takes it, and request bytes are sent
within the upstream's windows, the tunnel stream being paused while any wait.
Response trailers (C{grpc-status}) come back as the stream's end trailers; a
"trailers-only" response is a reply whose head carries them, then an end.
"""

from __future__ import annotations

import functools
from collections import deque
from typing import Any

from h2 import events as h2events
from h2.errors import ErrorCodes
from h2.exceptions import H2Error
from h2.settings import SettingCodes
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tunneld import h2base
from tunneld.agent.dialing import connect_error, connect_timed_out
from tunneld.agent.exchange import UpstreamConnection, UpstreamExchange, UpstreamSettings
from tunneld.interfaces import IStream, IStreamReceiver, IUpstream
from tunneld.model.messages import Headers, ReplyHead
from tunneld.model.reasons import Reason

__all__ = ["H2UpstreamPool"]

# Connection-specific fields HTTP/2 forbids (RFC 9113 section 8.2.2), plus
# the hop-by-hop ones of RFC 9110; C{te} is handled on its own.
_DROP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
        b"host",
    }
)
_CONNECTION_WINDOWS = 16


@implementer(IStreamReceiver, IPushProducer)
class _Call(UpstreamExchange):
    """
    One tunnel stream as one HTTP/2 stream to the upstream.  It takes the
    tunnel stream's events (the request), and is the producer registered on
    the tunnel stream (which pauses it when out of credit for the response).
    """

    _pool: H2UpstreamPool

    def __init__(self, pool: H2UpstreamPool, stream: IStream) -> None:
        super().__init__(pool, stream)
        self.pool = pool
        self.stream = stream
        self.headers: list[tuple[bytes, bytes]] = []
        self.conn: _H2Upstream | None = None
        self.stream_id = 0
        self.outbox: deque[bytes] = deque()  # request body waiting for a window
        self.request_end: Headers | None = None  # set when the edge ended the request
        self.request_sent = False
        self.inbox: deque[tuple[bytes, int]] = deque()  # response body waiting for credit
        self.response_trailers: Headers | None = None  # set on StreamEnded
        self.replied = False
        self.paused_by_stream = False  # the tunnel stream is out of credit
        self.stream_paused = False  # what we told the tunnel stream
        self.done = False
        # How the upstream stream is let go when the call ends: reset with a
        # code, or (None) left alone, as it has ended or is gone.
        self.reset_code: ErrorCodes | None = ErrorCodes.CANCEL

    # -- starting -----------------------------------------------------------

    def start(self) -> None:
        if self.done:
            return
        head = self.stream.head
        if head.kind != "http":
            self.fail(Reason.PROTOCOL_ERROR, f"stream kind {head.kind!r} cannot go to an h2c upstream")
            return
        try:
            method, path = head.method.encode("ascii"), head.target.encode("ascii")
            authority = head.tunnel.partition("/")[0].encode("ascii").removeprefix(b"*.")
        except UnicodeError as error:
            self._bad_request(error)
            return
        trailers = False
        regular: list[tuple[bytes, bytes]] = []
        for name, value in head.headers:
            lower = name.lower()
            if lower == b"host":
                authority = value
            elif lower == b"te":
                trailers = trailers or b"trailers" in value.lower()
            elif lower not in _DROP and not lower.startswith(b":"):
                regular.append((lower, value))
        self.headers = [
            (b":method", method),
            (b":scheme", b"http"),
            (b":authority", authority),
            (b":path", path or b"/"),
            *regular,
        ]
        if trailers:
            self.headers.append((b"te", b"trailers"))
        self.stream.registerProducer(self, True)
        self.update_pause()
        self.pool._enqueue(self)

    def bind(self, conn: _H2Upstream) -> None:
        """Send the request head on C{conn}, then whatever of the body is here."""
        self.conn = conn
        try:
            self.stream_id = conn.h2.get_next_available_stream_id()
            end = self.request_end is not None and not self.request_end and not self.outbox
            conn.h2.send_headers(self.stream_id, self.headers, end_stream=end)
        except H2Error as error:
            self._bad_request(error)
            return
        conn.calls[self.stream_id] = self
        if end:
            self.request_sent = True
            self.arm_timer()
        self.flush_out()
        conn.flush()

    # -- IStreamReceiver: the request from the edge --------------------------

    def reply_received(self, reply: ReplyHead) -> None:
        """L{IStreamReceiver}: never sent to the agent side; ignored."""

    def data_received(self, data: bytes) -> None:
        """L{IStreamReceiver}: request body bytes."""
        if self.done or self.request_end is not None or not data:
            return
        self.outbox.append(data)
        self.flush_out()

    def end_received(self, trailers: Headers) -> None:
        """L{IStreamReceiver}: the request is complete."""
        if self.done or self.request_end is not None:
            return
        self.request_end = tuple(
            (n.lower(), v) for n, v in trailers if n.lower() not in _DROP and not n.startswith(b":")
        )
        self.flush_out()

    def reset_received(self, reason: Reason, message: str) -> None:
        """L{IStreamReceiver}: the edge gave up; cancel the upstream stream."""
        if self.done:
            return
        self._log_edge_reset(reason, message)
        self.finish(ErrorCodes.CANCEL)

    # -- IPushProducer: the tunnel stream's view of the response -----------

    def pauseProducing(self) -> None:
        """L{IPushProducer}: the tunnel stream is out of credit; stop acknowledging DATA."""
        self.paused_by_stream = True

    def resumeProducing(self) -> None:
        """L{IPushProducer}: credit came back; pass on what waits."""
        self.paused_by_stream = False
        # The upstream's silence counts from now: it may have been out of window.
        self.last_read = self.pool._reactor.seconds()
        self.pump()

    def stopProducing(self) -> None:
        """L{IPushProducer}: the tunnel stream is gone; its reset tells us why."""

    # -- the request body ---------------------------------------------------

    def flush_out(self) -> None:
        """Send request bytes within the upstream's windows; the end after them."""
        conn = self.conn
        if conn is None or self.done or self.request_sent:
            self.update_pause()
            return
        try:
            _, ended = h2base.send_within_window(
                conn.h2, self.stream_id, self.outbox, self.request_end
            )
            if ended:
                self.request_sent = True
                self.arm_timer()
        except H2Error as error:
            if not self.replied:
                self.fail(Reason.UPSTREAM_ERROR, f"upstream stream closed: {error}")
                return
            # The upstream answered and closed its side; the rest is not needed.
            self.outbox.clear()
            self.request_sent = True
        conn.flush()
        self.update_pause()

    def update_pause(self) -> None:
        if self.done:
            return
        conn = self.conn
        want = conn is None or bool(self.outbox) or conn.socket_paused
        if want is not self.stream_paused:
            self.stream_paused = want
            if want:
                self.stream.pauseProducing()
            else:
                self.stream.resumeProducing()

    # -- the response -------------------------------------------------------

    def response(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.last_read = self.pool._reactor.seconds()
        self._body_timer()
        status = 0
        out: list[tuple[bytes, bytes]] = []
        for name, value in headers:
            if name == b":status":
                status = int(value)
            elif not name.startswith(b":"):
                out.append((name, value))
        self.replied = True
        self.stream.send_reply(ReplyHead(status, b"", tuple(out)))

    def data(self, data: bytes, length: int) -> None:
        self.last_read = self.pool._reactor.seconds()
        self.inbox.append((data, length))
        self.pump()

    def ended(self) -> None:
        if self.response_trailers is None:
            self.response_trailers = ()
        self.pump()

    def pump(self) -> None:
        """Pass response bytes to the tunnel stream while it has credit; ack them."""
        conn = self.conn
        if self.done or conn is None:
            return
        acked = 0
        while self.inbox and not self.paused_by_stream and not self.done:
            data, length = self.inbox.popleft()
            acked += length
            if data:
                self.stream.write(data)
        if acked and not conn.lost:
            conn.h2.acknowledge_received_data(acked, self.stream_id)
            conn.flush()
        if not self.inbox and self.response_trailers is not None and not self.done:
            if not self.replied:
                self.fail(Reason.UPSTREAM_ERROR, "upstream ended the stream without a response")
                return
            trailers = self.response_trailers
            self.finish(None)
            self.stream.end(trailers)

    # -- timing, failing, finishing -----------------------------------------

    def arm_timer(self) -> None:
        if not self.replied and self._timer is None and not self.done:
            self._arm_timer(self.pool.response_timeout)

    def _timed_out(self) -> None:
        if self.done:
            return
        if self.replied:
            self._watch_body(waiting=self.paused_by_stream or not self.request_sent)
        else:
            self._no_response()

    def fail(self, reason: Reason, message: str) -> None:
        """End the tunnel stream with C{reason} and cancel the upstream stream."""
        if not self.done:
            self.done = True
            self._reset(reason, message)

    _fail = fail

    def finish(self, code: ErrorCodes | None) -> None:
        """Done with both streams; C{code}: reset the upstream stream with it."""
        self.done = True
        self.reset_code = code
        self._teardown()

    def _drop_upstream(self) -> None:
        self.outbox.clear()
        self.inbox.clear()
        self.pool._unqueue(self)
        conn = self.conn
        if conn is not None:
            code = self.reset_code
            if code is not None and not conn.lost:
                try:
                    conn.h2.reset_stream(self.stream_id, code)
                except H2Error:
                    pass  # already closed
                conn.flush()
            conn.call_done(self)

    def upstream_reset(self, code: int) -> None:
        if self.done:
            return
        self.log.info(
            "upstream {endpoint} reset a stream: {code}", endpoint=self.pool.endpoint, code=code
        )
        self.finish(None)
        self.stream.reset(Reason.UPSTREAM_ERROR, f"upstream reset the stream (error code {code})")

    def upstream_lost(self, message: str) -> None:
        if self.done:
            return
        self.reset_code = None  # the upstream's stream is gone with its connection or GOAWAY
        self._closed_early("mid-response" if self.replied else "before responding", message)


class _H2Upstream(UpstreamConnection):
    """One HTTP/2 connection to the upstream, carrying many calls."""

    log = Logger()

    def __init__(self, pool: H2UpstreamPool) -> None:
        super().__init__()
        self.pool = pool
        self.h2 = h2base.new_connection(
            client_side=True,
            settings={
                SettingCodes.INITIAL_WINDOW_SIZE: pool.initial_window,
                SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self.calls: dict[int, _Call] = {}
        self.sock: Any = None
        self.draining = False  # GOAWAY received: no new streams
        self.socket_paused = False

    def upstream_made(self) -> None:
        self.sock = self.transport
        h2base.start(self.h2, self.pool.initial_window * _CONNECTION_WINDOWS)
        self.sock.registerProducer(self, True)
        self.flush()

    def capacity(self) -> int:
        if self.lost or self.draining:
            return 0
        limit = self.h2.remote_settings.max_concurrent_streams
        return max(0, limit - self.h2.open_outbound_streams)

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.lost:
            self.sock.write(data)

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except H2Error as error:
            self.log.warn(
                "upstream {endpoint} broke HTTP/2: {error}",
                endpoint=self.pool.endpoint, error=str(error),
            )
            self.flush()
            self.sock.abortConnection()
            return
        for event in events:
            call = self.calls.get(getattr(event, "stream_id", 0) or 0)
            if isinstance(event, h2events.DataReceived):
                if call is None:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                else:
                    call.data(event.data, event.flow_controlled_length)
            elif isinstance(event, h2events.ResponseReceived):
                if call is not None:
                    call.response(event.headers)
            elif isinstance(event, h2events.TrailersReceived):
                if call is not None:
                    call.response_trailers = tuple(event.headers)
            elif isinstance(event, h2events.StreamEnded):
                if call is not None:
                    call.ended()
            elif isinstance(event, h2events.StreamReset):
                if call is not None:
                    call.upstream_reset(event.error_code)
            elif isinstance(event, h2events.WindowUpdated):
                targets = [call] if call is not None else list(self.calls.values())
                for target in targets:
                    target.flush_out()
            elif isinstance(event, h2events.RemoteSettingsChanged):
                for target in list(self.calls.values()):
                    target.flush_out()
                self.pool._dispatch()
            elif isinstance(event, h2events.ConnectionTerminated):
                self.draining = True
                self.pool._drained(self)
                last = event.last_stream_id or 0
                for stream_id, target in list(self.calls.items()):
                    if stream_id > last:
                        target.upstream_lost("the upstream sent GOAWAY")
                if not self.calls:
                    self.sock.loseConnection()
        self.flush()

    def call_done(self, call: _Call) -> None:
        self.calls.pop(call.stream_id, None)
        if self.draining and not self.calls and not self.lost:
            self.sock.loseConnection()
        else:
            self.pool._dispatch()

    def upstream_closed(self, reason: Failure) -> None:
        self.pool._connection_lost(self)
        for call in list(self.calls.values()):
            call.upstream_lost(reason.getErrorMessage())
        self.calls.clear()

    # IPushProducer: the upstream socket's view of the request bodies.

    def pauseProducing(self) -> None:
        self.socket_paused = True
        for call in self.calls.values():
            call.update_pause()

    def resumeProducing(self) -> None:
        self.socket_paused = False
        for call in list(self.calls.values()):
            call.update_pause()

    def stopProducing(self) -> None:
        pass


@implementer(IUpstream)
class H2UpstreamPool(UpstreamSettings):
    """
    Forwards HTTP streams to one h2c upstream over one multiplexed connection.

    @param reactor: the reactor the endpoint needs, and the clock of every timer.
    @param endpoint: a Twisted client endpoint string, e.g. C{"tcp:host=127.0.0.1:port=50051"}.
    @param connect_timeout: seconds to wait for a connection before waiting
        streams are reset with C{upstream_refused}.
    @param response_timeout: seconds from the end of the request to the
        response head before the stream is reset with C{upstream_timeout}.
    @param body_timeout: seconds a begun response may bring nothing more
        (not counting while the tunnel stream holds it) before the stream is
        reset with C{upstream_timeout}; 0 = no limit.
    @param initial_window: the per-stream window granted to the upstream.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        endpoint: str,
        connect_timeout: float = 10.0,
        response_timeout: float = 60.0,
        initial_window: int = 1 << 20,
        body_timeout: float = 60.0,
    ) -> None:
        super().__init__(
            reactor, endpoint, functools.partial(_H2Upstream, self),
            connect_timeout, response_timeout, body_timeout,
        )
        self.initial_window = initial_window
        self._conn: _H2Upstream | None = None
        self._connecting: Deferred[Any] | None = None
        self._waiting: deque[_Call] = deque()
        self._connections: set[_H2Upstream] = set()
        self._closed = False

    def forward(self, stream: IStream) -> None:
        """Forward one stream to the upstream and its response back, end to end."""
        call = _Call(self, stream)
        stream.attach(call)
        call.start()

    def close(self) -> Deferred[None]:
        """Stop dialling; close connections with no stream open; fires once they are closed."""
        self._closed = True
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()
        waits = []
        for conn in list(self._connections):
            if not conn.calls:
                conn.h2.close_connection()
                conn.flush()
                conn.sock.loseConnection()
                waits.append(conn.when_lost())
        return gatherResults(waits).addCallback(lambda _: None)

    # -- for calls and connections -------------------------------------------

    def _enqueue(self, call: _Call) -> None:
        self._waiting.append(call)
        self._dispatch()

    def _unqueue(self, call: _Call) -> None:
        try:
            self._waiting.remove(call)
        except ValueError:
            pass

    def _dispatch(self) -> None:
        """Bind waiting calls to the connection while it has room; dial when needed."""
        waiting = self._waiting
        if not waiting:
            return
        conn = self._conn
        if conn is None or conn.lost or conn.draining:
            self._conn = None
            self._dial()
            return
        room = conn.capacity()
        while waiting and room > 0:
            waiting.popleft().bind(conn)
            room -= 1

    def _dial(self) -> None:
        if self._connecting is not None or self._closed:
            return
        connecting: Deferred[Any] = self._endpoint.connect(self._factory)
        connecting.addTimeout(self.connect_timeout, self._reactor, connect_timed_out)
        self._connecting = connecting
        connecting.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, conn: _H2Upstream) -> None:
        self._connecting = None
        self._connections.add(conn)
        if self._closed:
            conn.sock.loseConnection()
            return
        self._conn = conn
        self._dispatch()

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if isinstance(failure.value, CancelledError):
            return
        error = connect_error(failure, self.connect_timeout)
        self.log.warn("upstream {endpoint} refused: {error}", endpoint=self.endpoint, error=error)
        waiting, self._waiting = self._waiting, deque()
        for call in waiting:
            call.fail(Reason.UPSTREAM_REFUSED, f"upstream {self.endpoint} refused: {error}")

    def _drained(self, conn: _H2Upstream) -> None:
        if self._conn is conn:
            self._conn = None
        self._dispatch()

    def _connection_lost(self, conn: _H2Upstream) -> None:
        self._connections.discard(conn)
        if self._conn is conn:
            self._conn = None
        if self._waiting and not self._closed:
            self._dial()
