# -*- test-case-name: tests.test_grpc_transport,tests.test_grpc_bulk,tests.test_grpc_calls -*-
"""
L{GrpcLink}: what both ends of the gRPC transport share.  One HTTP/2
connection (the C{h2} state machine on a Twisted protocol), its calls, the
windows (a call's window goes back only as its consumer takes the data),
sending within them at the end of the reactor turn, the heartbeat (HTTP/2
PING) and teardown.  L{tunneld.transports.grpc.edge} and
L{tunneld.transports.grpc.agent} add the server and client halves of the
C{TunnelAgent} service.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote

from h2 import events as h2events
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError as H2ProtocolError
from h2.settings import SettingCodes
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tunneld import h2base
from tunneld.interfaces import AgentLinkSetup, EdgeLinkSetup, IAgentLink, IStream, IStreamReceiver
from tunneld.model.messages import (
    ControlMessage,
    Headers,
    StreamHead,
)
from tunneld.model.reasons import Reason
from tunneld.speedups import bulkwrite
from tunneld.speedups.lean_h2 import Payload, Piece
from tunneld.speedups.readsize import ReadSize
from tunneld.transports.grpc.framing import (
    _BARE_END,
    CallError,
    _data_head,
    _frame_message,
    grpc_message,
    split_messages,
)
from tunneld.transports.grpc.options import GrpcAgentOptions, GrpcEdgeOptions
from tunneld.transports.grpc.status import GrpcStatus, rst_code, status_message
from tunneld.transports.grpc.stream import GrpcStream, _Call
from tunneld.transports.linkbase import LinkBase, SocketCongestion
from tunneld.wire import codec
from tunneld.wire.codec import FrameError

__all__ = ["GrpcLink"]

# What one flush writes is joined here below this size (small messages):
# one copy costs less than a long iovec, or Twisted's checks of each piece.
_JOIN_BELOW = 16 * 1024
# Seconds a closing connection may take to flush before it is aborted.
_CLOSE_GRACE = 5.0
# Seconds a closing link keeps reading (and dropping) what the peer still sends.
_LINGER = 0.5


@implementer(IAgentLink)
class GrpcLink(LinkBase[GrpcStream], Protocol):
    """
    What both ends share: one HTTP/2 connection, its calls, flow control,
    heartbeat and teardown.  L{EdgeGrpcLink} and L{AgentGrpcLink} add the
    server and client halves of the C{TunnelAgent} service.
    """

    transport_name = "grpc"
    log = Logger()
    is_edge = False
    transport: Any

    def __init__(
        self,
        options: GrpcEdgeOptions | GrpcAgentOptions,
        setup: EdgeLinkSetup | AgentLinkSetup,
    ) -> None:
        super().__init__(
            reactor=setup.reactor,
            max_frame_size=setup.max_frame_size,
            heartbeat_interval=options.heartbeat_interval,
            heartbeat_timeout=options.heartbeat_timeout,
            codec=setup.codec,
        )
        max_frame_size = setup.max_frame_size
        stream_window = options.stream_window
        connection_window = options.connection_window
        # The largest gRPC message this end accepts.
        self.max_message = max_frame_size
        self.stream_window = stream_window
        self.connection_window = connection_window
        self.max_pending = stream_window + max_frame_size
        # Windows go back once half is spent (not a quarter): fewer
        # WINDOW_UPDATE-only writes, each of which wakes the peer for a read.
        self.ack_threshold = max(1, stream_window // 2)
        self.conn_ack_threshold = max(1, connection_window // 2)
        self.calls: dict[int, _Call] = {}
        self.control: _Call | None = None
        self.conn = h2base.new_connection(
            client_side=not self.is_edge,
            # Every header we send is built here, as lowercase bytes: h2
            # need not check or rewrite them.  What arrives is checked.
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self._conn_unacked = 0
        # Calls that took DATA during this read: their windows go back once,
        # at its end, in the write that carries whatever else is due.
        self._to_ack: dict[_Call, None] = {}
        self._read_size = ReadSize(None)  # the socket's, once connected
        self._batching = False
        self._dirty: list[_Call] = []
        self._turn: Any = None
        self._abort_timer: Any = None
        self._linger_timer: Any = None
        self._lost_reason: tuple[Reason, str] | None = None

    # -- IAgentLink -------------------------------------------------------------

    @property
    def peer_certificate(self) -> Any:
        """IAgentLink.peer_certificate"""
        get_cert = getattr(self.transport, "getPeerCertificate", None)
        return get_cert() if get_cert is not None else None

    def send_control_message(self, message: ControlMessage) -> None:
        """A control message on the Control call."""
        control = self.control
        if control is not None and not control.local_closed:
            self.send_now(control, [_frame_message(codec.encode_control(message))])

    def open_stream(
        self, head: StreamHead, receiver: IStreamReceiver, end_stream: bool = False
    ) -> IStream:
        """IAgentLink.open_stream"""
        raise NotImplementedError("only the edge opens streams")

    def close(self, reason: Reason, message: str) -> None:
        """IAgentLink.close: say why (Control status, GOAWAY), hang up, reset locally."""
        if self.closed:
            return
        self.say_goodbye(reason, message)
        # The reason already went out in Control's status and in the GOAWAY's
        # debug data; an error code here would make a stock gRPC client drop
        # the call as UNAVAILABLE before it reads that status.
        code = ErrorCodes.NO_ERROR
        try:
            self.conn.close_connection(
                error_code=code, additional_data=status_message(reason, message)[:256]
            )
        except H2ProtocolError:
            pass
        self._batching = False
        self.flush()
        self.hang_up()
        self.wire_lost(reason, message)

    def hang_up(self) -> None:
        """Close the connection after what is written; abort it if that takes too long."""
        if self.transport is None or self.disconnected or self._abort_timer is not None:
            return
        # TLS waits for a registered producer to go before it shuts down.
        self.transport.unregisterProducer()
        # Linger before closing: a peer that reads our last status and GOAWAY
        # hangs up itself; closing at once, with its last frames still unread
        # here, would make the kernel answer with a reset that can destroy
        # that status before the peer reads it.
        # (The edge's concern: the agent's peer needs no status from it.)
        linger = _LINGER if self.is_edge else 0.0
        self._linger_timer = self.reactor.callLater(linger, self.transport.loseConnection)
        self._abort_timer = self.reactor.callLater(_CLOSE_GRACE, self._abort)

    def say_goodbye(self, reason: Reason, message: str) -> None:
        """Before GOAWAY: the edge ends Control with a status."""

    def _abort(self) -> None:
        self._abort_timer = None
        if self.transport is not None:
            self.transport.abortConnection()

    # -- the connection -----------------------------------------------------------

    def local_settings(self) -> dict[SettingCodes | int, int]:
        return {
            SettingCodes.INITIAL_WINDOW_SIZE: self.stream_window,
            SettingCodes.MAX_FRAME_SIZE: min(max(self.max_message, 16384), 16777215),
            SettingCodes.MAX_HEADER_LIST_SIZE: 64 * 1024,
        }

    def connectionMade(self) -> None:  # noqa: N802
        peer = self.transport.getPeer()
        self.peer = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
        try:
            self.transport.setTcpNoDelay(True)
        except Exception:  # noqa: BLE001 -- not every transport is TCP
            pass
        self.transport.registerProducer(SocketCongestion(self), True)
        self._read_size = ReadSize(self.transport)
        # The settings (windows, frame size) apply when the peer acknowledges them.
        h2base.start(self.conn, self.connection_window, self.local_settings())
        self.heartbeat.start()
        self.connection_started()
        self.flush()

    def connection_started(self) -> None:
        """The HTTP/2 preface is queued; subclasses start their calls."""

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.closed:
            return
        self.heartbeat.heard()
        self._read_size.read(len(data))
        try:
            events = self.conn.receive_frames(data)
        except H2ProtocolError as e:
            self.protocol_error(f"HTTP/2: {e}")
            return
        self._batching = True
        try:
            for event in events:
                if self.closed:
                    break
                if type(event) is tuple:
                    self._data(*event)
                    continue
                name = self._event_handlers.get(type(event))
                if name is not None:
                    getattr(self, name)(event)
        finally:
            self._batching = False
        self._ack_read()
        self.flush()

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        for timer in (self._abort_timer, self._linger_timer, self._turn):
            if timer is not None and timer.active():
                timer.cancel()
        self._abort_timer = self._linger_timer = self._turn = None
        self._dirty = []
        if self._lost_reason is not None:
            why, detail = self._lost_reason
        else:
            why, detail = Reason.AGENT_GONE, f"connection lost: {reason.getErrorMessage()}"
        self.wire_lost(why, detail)
        self.fire_closed()

    def when_closed(self) -> Deferred[None]:
        """IAgentLink.when_closed (at once for a link that never connected)."""
        if self.transport is None:
            return succeed(None)
        return super().when_closed()

    def flush(self) -> None:
        """
        Move the turn's queued messages into HTTP/2, then write what it has:
        one write, straight to a plain TCP socket when nothing is queued
        before it (L{bulkwrite.flush}); what the socket does not take, and
        everything on other transports, is queued by Twisted as usual.
        """
        if self._batching or self.transport is None:
            return
        while self._dirty:
            dirty, self._dirty = self._dirty, []
            for call in dirty:
                call.dirty = False
                if call.outbox and not call.blocked and not self.sending_paused:
                    self.flush_call(call)
        chunks = self.conn.chunks_to_send()
        if not chunks:
            return
        if len(chunks) > 1 and sum(map(len, chunks)) <= _JOIN_BELOW:
            # Small pieces: one copy is cheaper than a long iovec.
            chunks = [b"".join(chunks)]
        bulkwrite.flush(self.transport, chunks)

    def wire_lost(self, reason: Reason, message: str) -> None:
        """
        The connection is gone: reset every stream and tell the handler.  Safe
        to call more than once.
        """
        self.shut(reason, message)

    # -- sending ------------------------------------------------------------------

    def enqueue(self, call: _Call, pieces: Iterable[Piece]) -> None:
        """
        Queue gRPC-framed bytes on a call.  They go into HTTP/2 at the end of
        the reactor turn, so that the messages of one turn (a reply, its body
        and its end) share one DATA frame; a frame's worth goes at once.
        """
        if call.local_closed or call.finish is not None or call.end_after:
            return
        outbox = call.outbox
        if outbox is None:
            outbox = call.outbox = deque()
        for piece in pieces:
            outbox.append(piece)
            call.out_size += len(piece)
        if call.blocked or self.sending_paused:
            return  # a window update or the socket draining moves it on
        if call.out_size >= self.conn.max_outbound_frame_size:
            self.flush_call(call)
            self.flush()
        elif not call.dirty:
            call.dirty = True
            self._dirty.append(call)
            if not self._batching and self._turn is None:
                self._turn = self.reactor.callLater(0, self._end_of_turn)

    def send_now(self, call: _Call, pieces: Iterable[Piece]) -> None:
        """Queue bytes on a call and hand them to HTTP/2 now (what the windows allow)."""
        self.enqueue(call, pieces)
        if call.outbox and not call.blocked and not self.sending_paused:
            self.flush_call(call)
        self.flush()

    def _end_of_turn(self) -> None:
        self._turn = None
        self.flush()

    def flush_call(self, call: _Call) -> None:
        """Move a call's queued bytes into HTTP/2 DATA frames, within the windows."""
        conn = self.conn
        sid = call.stream_id
        outbox = call.outbox
        if call.local_closed:
            call.drop_outbox()
            return
        try:
            while outbox:
                budget = conn.send_room(sid)
                if budget <= 0:
                    break
                if not call.out_offset and call.out_size <= budget:
                    # All of it fits in one frame (the usual case).
                    parts = list(outbox)
                    taken = call.out_size
                    outbox.clear()
                else:
                    parts = []
                    taken = 0
                while outbox and taken < budget:
                    piece = outbox[0]
                    offset = call.out_offset
                    available = len(piece) - offset
                    room = budget - taken
                    if available <= room:
                        parts.append(piece[offset:] if offset else piece)
                        outbox.popleft()
                        call.out_offset = 0
                        taken += available
                    else:
                        # A view: the piece is not copied, only sent.
                        parts.append(memoryview(piece)[offset : offset + room])
                        call.out_offset = offset + room
                        taken += room
                last = call.end_after and not outbox
                conn.send_data_parts(sid, parts, end_stream=last, size=taken)
                call.out_size -= taken
                if last:
                    call.end_after = False
                    call.local_closed = True
                    self.maybe_forget_call(call)
        except H2ProtocolError:
            # The stream is gone (reset by the peer): nothing more goes out on it.
            call.drop_outbox()
            call.local_closed = True
            return
        stream = call.stream
        if outbox:
            # The window is spent: the source waits for a window update.
            call.blocked = True
            if stream is not None:
                stream.pause_source()
            return
        call.outbox = None
        call.blocked = False
        finish, call.finish = call.finish, None
        if finish is not None:
            finish()
        if stream is not None and not stream.closed:
            stream.resume_source()

    def flush_all(self) -> None:
        for call in list(self.calls.values()):
            if call.outbox and not self.sending_paused:
                self.flush_call(call)

    def send_headers(self, call: _Call, headers: Iterable[tuple[bytes, bytes]], end: bool) -> None:
        try:
            self.conn.send_headers(call.stream_id, headers, end_stream=end)
        except H2ProtocolError:
            call.local_closed = True
            return
        if end:
            call.local_closed = True
            self.maybe_forget_call(call)

    def end_request(self, call: _Call) -> None:
        """Agent: half-close a call, with its last queued message if any."""
        if call.local_closed or call.finish is not None or call.end_after:
            return
        if call.outbox:
            call.end_after = True
            return
        call.local_closed = True
        try:
            self.conn.end_stream(call.stream_id)
        except H2ProtocolError:
            pass
        self.maybe_forget_call(call)
        self.flush()

    def rst(self, call: _Call, code: int) -> None:
        call.drop_outbox()
        if not (call.local_closed and call.remote_closed):
            try:
                self.conn.reset_stream(call.stream_id, code)
            except H2ProtocolError:
                pass
        call.local_closed = call.remote_closed = True
        self.maybe_forget_call(call)
        self.flush()

    def maybe_forget_call(self, call: _Call) -> None:
        if call.local_closed and call.remote_closed:
            self.calls.pop(call.stream_id, None)
            stream = call.stream
            if stream is not None and stream.closed:
                # Both are done: no cycle left for the collector (see forget).
                call.stream = None

    def forget(self, stream: GrpcStream) -> None:
        call = stream.call
        if call is None:
            return
        if self.streams.get(call.stream_id) is stream:
            del self.streams[call.stream_id]
        if call.stream is stream and self.calls.get(call.stream_id) is not call:
            # The call ended before its stream (a reset, a lost race): the
            # pair would otherwise hold each other, garbage only the cyclic
            # collector frees, in a pause over the whole heap.
            call.stream = None

    def release(self, call: _Call, stream: GrpcStream) -> bool:
        """
        A stream on a reusable call ended cleanly (End both ways): detach it,
        so that the call can carry the next stream.  False if the call cannot
        be reused (then it ends as usual).
        """
        if not call.reuse or call.local_closed or call.remote_closed or self.closed:
            return False
        if call.stream is stream:
            call.stream = None
        if self.streams.get(call.stream_id) is stream:
            del self.streams[call.stream_id]
        stream.call = None
        # What the stream's consumer took returns with the next window update
        # due on the call (the threshold is shared by its streams).
        self.ack_call(call)
        return True

    def sending_resumed(self) -> None:
        """The socket drained: move queued bytes on (the sources resume next)."""
        self.flush_all()
        self.flush()

    # -- receiving ------------------------------------------------------------------

    def ack_call(self, call: _Call, force: bool = False) -> None:
        """Return a call's window for the bytes its consumer has taken."""
        n = call.unacked
        if not n or (not force and n < self.ack_threshold):
            return
        if not force and self.is_edge and call.stream is None and call.reuse:
            # An idle reusable call: the agent sends on it only once the next
            # stream's Open came, and its window goes with that (L{_bind}).
            return
        call.unacked = 0
        if call.remote_closed or self.closed:
            return
        try:
            self.conn.increment_flow_control_window(n, call.stream_id)
        except (H2ProtocolError, KeyError):
            pass

    def _on_data(self, event: h2events.DataReceived) -> None:
        self._data(event.stream_id, event.data, event.flow_controlled_length)

    def _data(self, stream_id: int, chunk: Payload, size: int) -> None:
        """A DATA frame's payload, C{size} bytes of the windows with its padding."""
        self._conn_unacked += size
        call = self.calls.get(stream_id)
        if call is None:
            return
        call.unacked += size
        self._to_ack[call] = None
        if call.broken or call.kind == "refused" or (call.stream is not None and call.stream.closed):
            # Nobody reads this any more: its window goes back (L{_ack_read})
            # so the peer can finish writing and see our status.
            return
        try:
            messages = split_messages(call, chunk, self.max_message)
        except CallError as e:
            call.broken = True
            self.call_broken(call, e.status, str(e))
            return
        forward = call.kind == "forward"
        for payload in messages:
            if call.broken or self.closed:
                break
            try:
                if isinstance(payload, bytes):
                    self.forward_data(call, payload)
                    continue
                if forward and payload == _BARE_END:
                    self.forward_end(call, ())
                    continue
                head = _data_head(payload, len(payload)) if forward else None
                if head is not None:
                    # A receiver that borrows data gets a view of the bytes
                    # read (nothing changes them), others a copy.
                    stream = call.stream
                    borrows = stream is not None and getattr(stream.receiver, "borrows_data", False)
                    self.forward_data(call, payload[head:] if borrows else payload[head:].tobytes())
                elif forward:
                    self.forward_frame(call, self.codec.read(payload.tobytes()))
                else:
                    self.message_received(call, codec.decode(payload.tobytes()))
            except FrameError as e:
                call.broken = True
                self.call_broken(call, GrpcStatus.INVALID_ARGUMENT, str(e))
                break

    def _ack_read(self) -> None:
        """
        Return the windows of what this read's DATA frames brought: the
        connection's at once (a stalled stream holds only its own window,
        never the whole link), each call's unless its consumer paused, one
        update per window, none for a call its peer has ended since.
        """
        if self._conn_unacked >= self.conn_ack_threshold and not self.closed:
            try:
                self.conn.increment_flow_control_window(self._conn_unacked)
            except H2ProtocolError:
                pass
            self._conn_unacked = 0
        if not self._to_ack:
            return
        calls, self._to_ack = self._to_ack, {}
        for call in calls:
            stream = call.stream
            if (
                call.broken or call.kind == "refused" or stream is None or stream.closed
                or not stream.consumer_paused
            ):
                self.ack_call(call)

    def message_received(self, call: _Call, frame: codec.Frame) -> None:
        """
        One decoded message on a Control call (raise L{FrameError} to break
        the call); a Forward call's go to L{forward_frame} as L{codec.read}
        reads them, without protobuf message objects.
        """
        if call.kind == "control":
            self.control_frame(frame)

    def control_frame(self, frame: codec.Frame) -> None:
        kind = frame.WhichOneof("body")
        if kind == "ping":
            control = self.control
            if control is not None:
                self.send_now(control, [_frame_message(codec.encode_ping(frame.ping.opaque, True))])
            return
        if kind == "pong":
            return
        self.control_received(codec.control_from(frame))

    def forward_frame(self, call: _Call, frame: tuple[int, int, Any, bool]) -> None:
        """A message other than Data on a Forward call, as L{codec.read} reads it."""
        raise NotImplementedError

    def forward_data(self, call: _Call, data: bytes | memoryview) -> None:
        """A C{Data} message on a Forward call, read without protobuf (see L{_data_payload})."""
        raise NotImplementedError

    def forward_end(self, call: _Call, trailers: Headers) -> None:
        """An C{End} message on a Forward call."""
        raise NotImplementedError

    def call_broken(self, call: _Call, status: GrpcStatus, message: str) -> None:
        """A call sent something undecodable: end it (and the link, if Control)."""
        if call.kind == "control":
            self.protocol_error(f"control call: {message}")
            return
        self.log.warn(
            "{transport} call {call} from {peer} broke the protocol: {error}",
            transport=self.transport_name, call=call.stream_id, peer=self.peer, error=message,
        )
        stream = call.stream
        if stream is not None:
            stream.remote_reset(Reason.PROTOCOL_ERROR, message)
        self.refuse_call(call, status, message)

    def refuse_call(self, call: _Call, status: GrpcStatus, message: str) -> None:
        raise NotImplementedError

    def _on_stream_reset(self, event: h2events.StreamReset) -> None:
        call = self.calls.pop(event.stream_id, None)
        if call is None:
            return
        call.local_closed = call.remote_closed = True
        call.drop_outbox()
        self.call_reset(call, event.error_code)
        stream = call.stream
        if stream is not None and stream.closed:
            call.stream = None  # no cycle left (see forget)

    def call_reset(self, call: _Call, code: int) -> None:
        stream = call.stream
        if stream is not None and not stream.closed:
            stream.remote_reset(
                h2base.reason_for_rst(code), f"call reset by the peer ({h2base.code_name(code)})"
            )

    def _on_window_updated(self, event: h2events.WindowUpdated) -> None:
        if self.sending_paused:
            return
        if event.stream_id == 0:
            self.flush_all()
            return
        call = self.calls.get(event.stream_id)
        if call is not None and call.outbox:
            self.flush_call(call)

    def _on_settings_changed(self, event: h2events.RemoteSettingsChanged) -> None:
        self.flush_all()

    def _on_ping_ack(self, event: h2events.PingAckReceived) -> None:
        self.heartbeat.pong(int.from_bytes(event.ping_data, "big"))

    def _on_goaway(self, event: h2events.ConnectionTerminated) -> None:
        """The peer is hanging up: every stream is gone with it."""
        detail = unquote((event.additional_data or b"").decode("ascii", "replace"))
        code = event.error_code
        if not detail:
            detail = f"GOAWAY {getattr(code, 'name', code)}"
        if self._lost_reason is None:
            self._lost_reason = (Reason.AGENT_GONE, f"the peer closed the link ({detail})")
        self.hang_up()

    def _on_request(self, event: h2events.RequestReceived) -> None:
        pass

    def _on_response(self, event: h2events.ResponseReceived) -> None:
        pass

    def _on_trailers(self, event: h2events.TrailersReceived) -> None:
        pass

    def _on_stream_ended(self, event: h2events.StreamEnded) -> None:
        pass

    _event_handlers: dict[type, str] = {
        h2events.DataReceived: "_on_data",
        h2events.RequestReceived: "_on_request",
        h2events.ResponseReceived: "_on_response",
        h2events.TrailersReceived: "_on_trailers",
        h2events.StreamEnded: "_on_stream_ended",
        h2events.StreamReset: "_on_stream_reset",
        h2events.WindowUpdated: "_on_window_updated",
        h2events.RemoteSettingsChanged: "_on_settings_changed",
        h2events.PingAckReceived: "_on_ping_ack",
        h2events.ConnectionTerminated: "_on_goaway",
    }

    # -- heartbeat -----------------------------------------------------------------

    def _ping(self, opaque: int) -> None:
        try:
            self.conn.ping(opaque.to_bytes(8, "big"))
        except H2ProtocolError:
            return
        self.flush()

    # -- streams (both ends) -----------------------------------------------------------

    def stream_local_end(self, stream: GrpcStream) -> None:
        raise NotImplementedError

    def stream_local_reset(self, stream: GrpcStream, reason: Reason, message: str) -> None:
        raise NotImplementedError

    def send_reset(self, call: _Call, reason: Reason, message: str) -> bool:
        """
        Replace what a call still has queued by a C{Reset} message; True if it
        went out, False if it could not (then the call was RST_STREAM'd).
        """
        call.drop_outbox()
        if call.local_closed:
            if not call.remote_closed:
                self.rst(call, rst_code(reason))
            return False
        self.send_now(call, [grpc_message(codec.reset_bytes(0, reason, message))])
        if call.outbox:
            self.rst(call, rst_code(reason))
            return False
        return True
