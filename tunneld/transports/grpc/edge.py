# -*- test-case-name: tests.test_grpc_transport,tests.test_grpc_calls,tests.test_grpc_interop -*-
"""
The edge end of the gRPC transport: the C{TunnelAgent} server for one
agent.  It answers the agent's C{Control} call, keeps the agent's idle
C{Forward} calls, binds each new stream to one (or queues it, bounded and
timed, until the agent opens one) and ends a call with trailers once both
directions are done, or takes it back as idle when both ends reuse calls.

Replay: an agent retires an idle call by half-closing it, and an C{Open}
the edge sent on it meanwhile is lost.  A stream keeps what it sent until
the agent answers (up to L{tunneld.transports.grpc.stream._REPLAY_LIMIT}
bytes) and is bound again, with all of it, to another call.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

from h2 import events as h2events
from h2.settings import SettingCodes
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.internet.protocol import Factory
from zope.interface import implementer

from tunneld.interfaces import EdgeLinkSetup, IStream, IStreamReceiver
from tunneld.model.messages import GoAway, Headers, StreamHead
from tunneld.model.reasons import Reason
from tunneld.speedups.lean_h2 import Piece
from tunneld.transports.grpc.framing import (
    _DRY,
    _RESPONSE_HEADERS,
    _REUSE,
    CONTROL_PATH,
    FORWARD_PATH,
    GRPC_CONTENT_TYPE,
    REUSE_HEADER,
    _frame_message,
    grpc_message,
)
from tunneld.transports.grpc.link import GrpcLink
from tunneld.transports.grpc.options import GrpcEdgeOptions
from tunneld.transports.grpc.status import (
    GrpcStatus,
    rst_code,
    status_for,
    status_message,
    status_text,
)
from tunneld.transports.grpc.stream import GrpcStream, _Call
from tunneld.wire import codec
from tunneld.wire.codec import FrameError

__all__ = ["EdgeGrpcFactory", "EdgeGrpcLink"]

# Calls an agent may open beyond its streams by default: the Control call, the
# pool of idle Forward calls (max_idle_forwards, 256 by default) and retiring ones.
_CALL_HEADROOM = 1024


class EdgeGrpcLink(GrpcLink):
    """The edge end: the gRPC server for one agent."""

    is_edge = True

    def __init__(self, options: GrpcEdgeOptions, setup: EdgeLinkSetup) -> None:
        super().__init__(options, setup)
        self.options = options
        self.setup = setup
        self.max_calls = options.max_concurrent_calls or setup.max_streams + _CALL_HEADROOM
        self.idle: deque[_Call] = deque()
        self.queue: deque[GrpcStream] = deque()
        self._handshake_timer: Any = None

    def local_settings(self) -> dict[SettingCodes | int, int]:
        settings = super().local_settings()
        settings[SettingCodes.MAX_CONCURRENT_STREAMS] = self.max_calls
        return settings

    def connection_started(self) -> None:
        self._handshake_timer = self.reactor.callLater(
            self.options.handshake_timeout, self._no_control
        )

    def _no_control(self) -> None:
        self._handshake_timer = None
        self.log.warn("agent link from {peer} opened no Control call in time", peer=self.peer)
        self.close(Reason.PROTOCOL_ERROR, "no Control call opened in time")

    def stop_timers(self) -> None:
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None

    def orphans(self) -> list[GrpcStream]:
        queued = list(self.queue)
        self.queue.clear()
        return queued

    # -- IAgentLink ---------------------------------------------------------------------

    def open_stream(
        self, head: StreamHead, receiver: IStreamReceiver, end_stream: bool = False
    ) -> IStream:
        """
        IAgentLink.open_stream: answer an idle Forward call, or wait for one.
        With C{end_stream} the Open says so itself on a version 2 link; on an
        older one an End follows it in the same DATA frame.
        """
        ends = end_stream and self.end_stream
        stream = self._open_stream(head, receiver, ends)
        if end_stream and not ends:
            stream.end()
        return stream

    def _open_stream(self, head: StreamHead, receiver: IStreamReceiver, ends: bool) -> GrpcStream:
        stream = GrpcStream(self, head)
        stream.attach(receiver)
        if ends:
            stream.open_ends = stream.local_ended = True
        if self.closed:
            stream.closed = True
            self.reactor.callLater(0, receiver.reset_received, Reason.AGENT_GONE, "agent link closed")
            return stream
        if self.idle:
            self._bind(stream, self.idle.popleft(), [])
        elif len(self.queue) >= self.options.max_queued_opens:
            stream.closed = True
            self.log.warn(
                "agent {peer} has no idle Forward call and {queued} opens queued: refusing",
                peer=self.peer, queued=len(self.queue),
            )
            self.reactor.callLater(
                0, receiver.reset_received, Reason.SATURATED,
                f"no idle Forward call and {len(self.queue)} streams waiting",
            )
        else:
            self.queue.append(stream)
            stream.queue_timer = self.reactor.callLater(
                self.options.queued_open_timeout, self._queued_too_long, stream
            )
        return stream

    def active_streams(self) -> int:
        """IAgentLink.active_streams"""
        return len(self.streams) + len(self.queue)

    def say_goodbye(self, reason: Reason, message: str) -> None:
        control = self.control
        if control is not None and not control.local_closed:
            # A GoAway message as on every transport, then the status that ends Control.
            self.send_now(control, [_frame_message(codec.encode_control(GoAway(reason, message)))])
            self._finish(control, status_for(reason), status_message(reason, message), now=True)

    # -- calls ------------------------------------------------------------------------

    def enqueue(self, call: _Call, pieces: Iterable[Piece]) -> None:
        """Response headers go out before a call's first message."""
        if not call.headers_sent and not call.local_closed:
            call.headers_sent = True
            self.send_headers(call, _RESPONSE_HEADERS, False)
        super().enqueue(call, pieces)

    def _bind(self, stream: GrpcStream, call: _Call, replay: list[Piece]) -> None:
        """Put a stream on an idle Forward call: response headers, then Open."""
        if stream.queue_timer is not None and stream.queue_timer.active():
            stream.queue_timer.cancel()
        stream.queue_timer = None
        stream.call = call
        call.stream = stream
        self.streams[call.stream_id] = stream
        if not call.headers_sent:
            # Initial metadata tells the agent when no idle call is left: its
            # pool ran dry and should grow.
            call.headers_sent = True
            headers: tuple[tuple[bytes, bytes], ...] = _RESPONSE_HEADERS
            if call.reuse:
                headers += _REUSE
            if not self.idle:
                headers += _DRY
            self.send_headers(call, headers, False)
        later = replay + stream.take_held()
        stream.start_replay_log(later)
        opening = grpc_message(self.codec.open_bytes(0, stream.head, stream.open_ends))
        self.ack_call(call)  # what the last stream left due goes with the Open
        self.enqueue(call, [opening, *later])
        if not stream.pending():
            stream.resume_source()

    def _queued_too_long(self, stream: GrpcStream) -> None:
        stream.queue_timer = None
        if stream in self.queue:
            self.queue.remove(stream)
            if self.conn.open_inbound_streams >= self.max_calls:
                # The agent may open no more calls: the link is full, not the agent late.
                self.log.warn(
                    "agent {peer} has {calls} calls open, max_concurrent_calls: refusing a stream",
                    peer=self.peer, calls=self.max_calls,
                )
                stream.remote_reset(
                    Reason.CAP_REACHED,
                    f"the agent link carries {self.max_calls} calls (max_concurrent_calls)",
                )
                return
            self.log.warn("agent {peer} opened no Forward call in time", peer=self.peer)
            stream.remote_reset(Reason.AGENT_UNAVAILABLE, "the agent opened no Forward call in time")

    def _dispatch_queued(self) -> None:
        while self.idle and self.queue:
            stream = self.queue.popleft()
            self._bind(stream, self.idle.popleft(), [])

    def _finish(self, call: _Call, status: int, message: bytes = b"", now: bool = False) -> None:
        """End a call's response with trailers (after queued messages if OK and not now)."""
        if call.local_closed or (call.finish is not None and not now):
            return
        if now or status != GrpcStatus.OK:
            call.drop_outbox()

        def send() -> None:
            if call.local_closed:
                return
            headers: list[tuple[bytes, bytes]] = []
            if not call.headers_sent:
                headers += _RESPONSE_HEADERS
                call.headers_sent = True
            headers.append((b"grpc-status", str(int(status)).encode()))
            if message:
                headers.append((b"grpc-message", message))
            self.send_headers(call, headers, True)

        if call.outbox:
            call.finish = send
        else:
            send()
        self.flush()

    def refuse_call(self, call: _Call, status: GrpcStatus, message: str) -> None:
        if call in self.idle:
            self.idle.remove(call)
        self._finish(call, status, status_text(message))

    def _end_idle(self, call: _Call) -> None:
        """The agent ended a call carrying no stream: out of the pool, and ended here too."""
        if call in self.idle:
            self.idle.remove(call)
        self._finish(call, GrpcStatus.OK)

    def _on_request(self, event: h2events.RequestReceived) -> None:
        headers = dict(event.headers)
        sid = event.stream_id
        call = _Call(sid, "refused")
        self.calls[sid] = call
        method = headers.get(b":method")
        path = headers.get(b":path", b"")
        if method != b"POST":
            self.send_headers(call, [(b":status", b"405")], True)
            return
        if not headers.get(b"content-type", b"").startswith(GRPC_CONTENT_TYPE):
            self.send_headers(call, [(b":status", b"415")], True)
            return
        if path == CONTROL_PATH:
            if self.control is not None:
                self.refuse_call(call, GrpcStatus.FAILED_PRECONDITION, "Control is already open")
                return
            call.kind = "control"
            self.control = call
            self.stop_timers()
            self.setup.on_link(self)
        elif path == FORWARD_PATH:
            if self.control is None:
                self.refuse_call(call, GrpcStatus.FAILED_PRECONDITION, "open Control first")
                return
            call.kind = "forward"
            call.reuse = headers.get(REUSE_HEADER) == b"1"
            self.idle.append(call)
            self._dispatch_queued()
        else:
            name = path.decode("ascii", "replace")
            self.refuse_call(call, GrpcStatus.UNIMPLEMENTED, f"unknown method {name}")

    def _on_stream_ended(self, event: h2events.StreamEnded) -> None:
        call = self.calls.get(event.stream_id)
        if call is None:
            return
        call.remote_closed = True
        if call.kind == "control":
            if not self.closed:
                self.close(Reason.AGENT_GONE, "the agent ended its Control call")
            return
        if call.kind == "forward":
            stream = call.stream
            if stream is None:
                self._end_idle(call)  # the agent retired it
            elif not stream.answered and not stream.closed:
                self._replay(stream, call)
            elif not stream.closed and not stream.remote_ended:
                stream.remote_reset(Reason.PROTOCOL_ERROR, "the agent ended the call without End")
                self._finish(call, GrpcStatus.INVALID_ARGUMENT, b"call ended without End")
            elif stream.remote_ended and stream.local_ended:
                self._finish(call, GrpcStatus.OK)
        self.maybe_forget_call(call)

    def call_reset(self, call: _Call, code: int) -> None:
        if call.kind == "control":
            self.close(Reason.AGENT_GONE, "the agent cancelled its Control call")
            return
        if call in self.idle:
            self.idle.remove(call)
        stream = call.stream
        if stream is not None and not stream.answered and not stream.closed:
            self._replay(stream, call)
            return
        super().call_reset(call, code)

    def _replay(self, stream: GrpcStream, call: _Call) -> None:
        """The agent dropped a call before it answered the Open: use another one."""
        call.stream = None
        self.streams.pop(call.stream_id, None)
        self._finish(call, GrpcStatus.OK)
        replay = stream.take_replay()
        stream.call = None
        if replay is None:
            stream.remote_reset(Reason.AGENT_UNAVAILABLE, "the agent dropped the call of this stream")
            return
        self.log.debug("replaying an open the agent did not take on {peer}", peer=self.peer)
        if self.idle:
            self._bind(stream, self.idle.popleft(), replay)
        else:
            stream.hold_first(replay)
            self.queue.appendleft(stream)
            stream.queue_timer = self.reactor.callLater(
                self.options.queued_open_timeout, self._queued_too_long, stream
            )

    # -- messages ------------------------------------------------------------------

    def _receiving(self, call: _Call, reset: bool = False) -> GrpcStream | None:
        """
        The stream a message on a Forward call is for, or None to drop it
        (closed; or a C{reset} that crossed the End of the call's last stream).
        """
        stream = call.stream
        if stream is None:
            if reset and call.reuse:
                self._end_idle(call)  # nothing left to reset, but a Reset ends the call
                return None
            raise FrameError("a message on a Forward call before its Open")
        if stream.closed:
            return None
        if not stream.answered or stream.replaying:
            stream.answered_by_peer()
        if stream.remote_ended and not reset:
            raise FrameError("a message after End")
        return stream

    def forward_data(self, call: _Call, data: bytes | memoryview) -> None:
        stream = self._receiving(call)
        if stream is not None:
            stream.deliver("data_received", data)

    def forward_frame(self, call: _Call, frame: tuple[int, int, Any, bool]) -> None:
        _, kind, body, end_stream = frame
        stream = self._receiving(call, reset=kind == codec.RESET)
        if stream is None:
            return
        if kind == codec.DATA or kind == codec.REPLY:
            stream.deliver("data_received" if kind == codec.DATA else "reply_received", body)
            if end_stream and not stream.closed:
                # Version 2: the agent's direction ends with this message, as with an End.
                self._remote_end(call, stream, ())
        elif kind == codec.END:
            self._remote_end(call, stream, body)
        elif kind == codec.RESET:
            reason, message = body
            stream.remote_reset(reason, message)
            self._finish(call, GrpcStatus.OK)
        else:
            raise FrameError(f"an agent may not send {codec.KIND_NAMES[kind]} on a Forward call")

    def forward_end(self, call: _Call, trailers: Headers) -> None:
        stream = self._receiving(call)
        if stream is not None:
            self._remote_end(call, stream, trailers)

    def _remote_end(self, call: _Call, stream: GrpcStream, trailers: Headers) -> None:
        stream.remote_end(trailers)
        if stream.local_ended:
            self._stream_done(call, stream)

    def stream_local_end(self, stream: GrpcStream) -> None:
        call = stream.call
        stream.maybe_done()
        if call is not None and stream.remote_ended:
            self._stream_done(call, stream)

    def _stream_done(self, call: _Call, stream: GrpcStream) -> None:
        """End both ways: the call takes the next stream, or ends with status OK."""
        if self.release(call, stream):
            self.idle.append(call)
            self._dispatch_queued()
        else:
            self._finish(call, GrpcStatus.OK)

    def stream_local_reset(self, stream: GrpcStream, reason: Reason, message: str) -> None:
        call = stream.call
        if call is None:
            if stream in self.queue:
                self.queue.remove(stream)
            return
        if not self.send_reset(call, reason, message):
            return  # RST_STREAM'd already
        if stream.local_ended:
            self._finish(call, status_for(reason), status_message(reason, message))
        else:
            # The request was still going to the agent, which may hold a
            # window of it unread (a grpcio agent probing the bandwidth-delay
            # product grows its window to megabytes): the Reset message, and
            # a status, would reach its code only after all of that.
            # RST_STREAM reaches it at once.
            self.rst(call, rst_code(reason))

    def forget(self, stream: GrpcStream) -> None:
        super().forget(stream)
        if stream in self.queue:
            self.queue.remove(stream)


@implementer(IProtocolNegotiationFactory)
class EdgeGrpcFactory(Factory):
    """Makes an L{EdgeGrpcLink} per agent connection; offers ALPN C{h2}."""

    noisy = False  # its listener logs where it listens

    def __init__(self, options: GrpcEdgeOptions, setup: EdgeLinkSetup) -> None:
        self.options = options
        self.setup = setup

    def acceptableProtocols(self) -> list[bytes]:  # noqa: N802
        """IProtocolNegotiationFactory.acceptableProtocols"""
        return [b"h2"]

    def buildProtocol(self, addr: Any) -> EdgeGrpcLink:  # noqa: N802
        link = EdgeGrpcLink(self.options, self.setup)
        link.factory = self
        return link
