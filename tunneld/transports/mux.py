# -*- test-case-name: tests.test_mux -*-
"""
Streams over a link that carries whole frames in order.

L{FrameLink} is the L{IAgentLink} of every frame transport (WebSocket,
streamable HTTP, third-party drop-ins): the transport only moves encoded
frames and reports its own congestion; stream ids, per-stream credit windows,
heartbeats and resets live here once.  Credit works like HTTP/2 flow control:
a receiver grants more only as its consumer takes the data, so a stalled
stream holds at most one window of memory and never stalls the others.
On links whose Welcome agreed on version 2, a direction's last Open, Reply
or Data frame can carry C{end_stream} instead of a separate End frame
(L{FrameStream.end_with_data}, L{FrameStream.end_with_reply},
C{open_stream(..., end_stream=True)}); frames carrying it are understood
whatever the version.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, cast

from twisted.logger import Logger
from zope.interface import implementer

from tunneld.interfaces import IAgentLink, IStream, IStreamReceiver
from tunneld.model.messages import (
    ControlMessage,
    GoAway,
    Headers,
    Hello,
    ReplyHead,
    StreamHead,
    Welcome,
)
from tunneld.model.reasons import Reason
from tunneld.transports.linkbase import LinkBase, StreamBase

# Named here too: frame transports, drop-ins among them, import it from here.
from tunneld.transports.linkbase import SocketCongestion as SocketCongestion
from tunneld.wire import codec
from tunneld.wire.codec import Codec, FrameError

# From this size a last Data payload is handed to a wire that takes pieces
# (send_frames) as it is; a small one is cheaper encoded into one frame.
_PIECES_FROM = 32 * 1024


class FrameWire(Protocol):
    """
    What a frame transport gives L{FrameLink}: a way to send and to hang up.

    A wire may also have C{send_frames(frames)}, taking several frames, each
    as the sequence of pieces (C{bytes} or C{memoryview}) its payload is made
    of: L{FrameLink} then sends Data that way, so a body is never joined to
    its frame head only to be copied again into the transport's own framing.
    """

    def send_frame(self, payload: bytes) -> None:
        """Send one encoded frame."""

    def close_wire(self, reason: Reason, message: str) -> None:
        """Close the underlying connection, telling the peer why if it can."""


@implementer(IStream)
class FrameStream(StreamBase):
    """One stream on a L{FrameLink}: its credit windows and what waits for credit."""

    link: FrameLink

    def __init__(self, link: FrameLink, stream_id: int, head: StreamHead, send_credit: int) -> None:
        super().__init__(link, head)
        self.stream_id = stream_id
        self.send_credit = send_credit
        self.recv_remaining = link.initial_window
        self._unacked = 0
        self._pending: list[bytes | memoryview] = []
        self._pending_size = 0

    # -- IStream, outgoing -------------------------------------------------

    def send_reply(self, reply: ReplyHead) -> None:
        """IStream.send_reply"""
        if not self.closed:
            self.link.send(self.link.codec.reply_bytes(self.stream_id, reply))

    def write(self, data: bytes | memoryview) -> None:
        """IConsumer.write: send now within credit, hold the rest (bounded)."""
        if self.closed or self.local_ended or not data:
            return
        if self._pending or len(data) > self.send_credit:
            self._pending.append(data)
            self._pending_size += len(data)
            self._flush()
            if self._pending_size > self.link.initial_window + self.link.max_pending:
                self.link.log.warn(
                    "stream {stream_id} on {peer} saturated: {size} bytes pending",
                    stream_id=self.stream_id, peer=self.link.peer, size=self._pending_size,
                )
                self._fail(Reason.SATURATED, "sender ignored flow control")
            elif self._pending:
                self._pause_producer()
            return
        self.send_credit -= len(data)
        self.link.send_data(self.stream_id, data)

    def _flush(self) -> None:
        while self._pending and self.send_credit > 0:
            chunk = self._pending[0]
            if len(chunk) <= self.send_credit:
                self._pending.pop(0)
            else:
                # Views: the held bytes are not copied to be cut at the credit.
                view = memoryview(chunk)
                chunk, self._pending[0] = view[: self.send_credit], view[self.send_credit :]
            self._pending_size -= len(chunk)
            self.send_credit -= len(chunk)
            self.link.send_data(self.stream_id, chunk)
        if not self._pending and self._pending_end is not None:
            trailers, self._pending_end = self._pending_end, None
            self.end(trailers)

    _pending_end: Headers | None = None

    def end_with_reply(self, reply: ReplyHead) -> None:
        """
        C{send_reply(reply)} then C{end()}, as one Reply frame with
        C{end_stream} when the link's version allows it.
        """
        if self.closed:
            return
        if not self.link.end_stream or self.local_ended or self._pending:
            self.send_reply(reply)
            self.end()
            return
        self.local_ended = True
        self.link.send(self.link.codec.reply_bytes(self.stream_id, reply, end_stream=True))
        if self.remote_ended:
            self._close()

    def write_with_reply(self, reply: ReplyHead, data: bytes | memoryview) -> None:
        """
        C{send_reply(reply)} then C{write(data)}, as one write to a wire that
        takes frames in pieces when the bytes fit the credit and one frame:
        the reply is not queued on its own first (a queued write costs a
        poll and two C{epoll_ctl} calls).
        """
        link = self.link
        send_frames = link._send_frames
        size = len(data)
        if (
            send_frames is None
            or self.closed
            or link.closed
            or self.local_ended
            or self._pending
            or not 0 < size <= self.send_credit
            or size > link.max_data
        ):
            self.send_reply(reply)
            self.write(data)
            return
        self.send_credit -= size
        stream_id = self.stream_id
        send_frames([
            (link.codec.reply_bytes(stream_id, reply),),
            (codec.data_frame_head(stream_id, size), data),
        ])

    def end_with_data(self, data: bytes | memoryview) -> None:
        """
        C{write(data)} then C{end()}, as one Data frame with C{end_stream}
        when the link's version allows it and the bytes fit the credit.
        """
        link = self.link
        size = len(data)
        if (
            not link.end_stream
            or self.closed
            or self.local_ended
            or self._pending
            or not 0 < size <= self.send_credit
            or size > link.max_data
        ):
            self.write(data)
            self.end()
            return
        self.send_credit -= size
        self.local_ended = True
        link.send_last_data(self.stream_id, data)
        if self.remote_ended:
            self._close()

    def end(self, trailers: Headers = ()) -> None:
        """IStream.end"""
        if self.closed or self.local_ended:
            return
        if self._pending:
            self._pending_end = tuple(trailers)
            return
        self.local_ended = True
        self.link.send(self.link.codec.end_bytes(self.stream_id, trailers))
        if self.remote_ended:
            self._close()

    def reset(self, reason: Reason, message: str) -> None:
        """IStream.reset"""
        if self.closed:
            return
        self.link.send(codec.reset_bytes(self.stream_id, reason, message))
        self._close()

    def _fail(self, reason: Reason, message: str) -> None:
        """End the stream from inside: both the peer and our own receiver hear why."""
        producer, receiver = self._producer, self.receiver
        self.reset(reason, message)
        if producer is not None:
            producer.stopProducing()
        self._tell_reset(receiver, reason, message)

    def blocked(self) -> bool:
        """Whether a write must wait: bytes wait for credit, or the socket is full."""
        return bool(self._pending) or self.link.sending_paused

    def pending(self) -> int:
        """Bytes that wait for credit."""
        return self._pending_size

    # -- IPushProducer, incoming ------------------------------------------

    def resumeProducing(self) -> None:
        """IPushProducer.resumeProducing: return the credit held back."""
        self.consumer_paused = False
        if self._unacked and not self.closed:
            self._grant()

    def _grant(self) -> None:
        increment, self._unacked = self._unacked, 0
        self.recv_remaining += increment
        self.link.send(codec.window_bytes(self.stream_id, increment))

    # -- from the link -----------------------------------------------------

    def data_arrived(self, data: bytes | memoryview) -> None:
        """
        Data for this stream: C{bytes}, or a C{memoryview} of a received
        frame, handed as it is only to a receiver that takes views
        (C{borrows_data}); anyone else gets C{bytes}.
        """
        size = len(data)
        if size > self.recv_remaining:
            raise FrameError(
                f"stream {self.stream_id}: {size} bytes sent with only "
                f"{self.recv_remaining} bytes of credit"
            )
        self.recv_remaining -= size
        receiver = self.receiver
        if receiver is not None:
            if type(data) is not bytes and not getattr(receiver, "borrows_data", False):
                data = bytes(data)
            receiver.data_received(cast(bytes, data))  # a view only for a borrower
        else:
            self.deliver("data_received", bytes(data))
        self._unacked += size
        if not self.consumer_paused and not self.closed and self._unacked >= self.link.ack_threshold:
            self._grant()

    def credit_arrived(self, increment: int) -> None:
        self.send_credit += increment
        if self.send_credit > 0x7FFFFFFF:
            raise FrameError(f"stream {self.stream_id}: credit overflow")
        self._flush()
        self.resume_source()

    def _drop(self) -> None:
        self._pending = []
        self._pending_size = 0
        self.link.forget(self.stream_id)


@implementer(IAgentLink)
class FrameLink(LinkBase[FrameStream]):
    """
    An L{IAgentLink} over any transport that moves whole frames in order.

    The transport calls L{frame_received}, L{pause_sending}, L{resume_sending}
    and L{wire_lost}; everything else is here.
    """

    log = Logger()

    def __init__(
        self,
        wire: FrameWire,
        *,
        transport_name: str,
        peer: str,
        reactor: Any,
        is_edge: bool,
        initial_window: int = 256 * 1024,
        max_frame_size: int = 1 << 20,
        max_streams: int = 10_000,
        heartbeat_interval: float = 10.0,
        heartbeat_timeout: float = 30.0,
        peer_certificate: Any = None,
        send_ping: Callable[[int], None] | None = None,
        codec: Codec | None = None,
    ) -> None:
        # A wire with a heartbeat of its own (WebSocket Ping/Pong) carries the
        # pings; otherwise they are protocol Ping frames.
        super().__init__(
            reactor=reactor,
            max_frame_size=max_frame_size,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            send_ping=send_ping,
            codec=codec,
        )
        self.wire = wire
        self.transport_name = transport_name
        self.peer = peer
        self.peer_certificate = peer_certificate
        self.is_edge = is_edge
        self.initial_window = initial_window
        self.ack_threshold = max(1, initial_window // 4)
        self.max_pending = initial_window
        self.max_streams = max_streams
        self.peer_window = initial_window
        self._next_id = 1
        self._last_remote_id = 0
        self._send_frames: Callable[[list[tuple[bytes | memoryview, ...]]], None] | None = getattr(
            wire, "send_frames", None
        )
        self.heartbeat.start()

    # -- IAgentLink -------------------------------------------------------

    def send_control_message(self, message: ControlMessage) -> None:
        """A control message as one frame."""
        self.send(codec.encode_control(message).SerializeToString())

    def open_stream(
        self, head: StreamHead, receiver: IStreamReceiver, end_stream: bool = False
    ) -> IStream:
        """
        IAgentLink.open_stream; with C{end_stream} (a request without a body)
        the stream starts ended in this direction, as after C{end()}, and on a
        version 2 link the Open frame says so itself.
        """
        stream_id = self._next_id
        self._next_id += 2
        # The Open is sent at once: a stream that may be held for hours (an
        # upgrade, TCP) keeps no header fields; a plain exchange is short.
        kept = head if head.kind == "http" else head.without_headers()
        stream = FrameStream(self, stream_id, kept, self.peer_window)
        stream.attach(receiver)
        if self.closed:
            stream.closed = True
            self.reactor.callLater(0, receiver.reset_received, Reason.AGENT_GONE, "agent link closed")
            return stream
        self.streams[stream_id] = stream
        if end_stream and self.end_stream:
            stream.local_ended = True
            self.send(self.codec.open_bytes(stream_id, head, end_stream=True))
            return stream
        self.send(self.codec.open_bytes(stream_id, head))
        if end_stream:
            stream.end()
        return stream

    def close(self, reason: Reason, message: str) -> None:
        """IAgentLink.close"""
        if self.closed:
            return
        # The peer learns why from a GoAway and the wire closing; local
        # receivers from wire_lost.
        self.send(codec.encode_control(GoAway(reason, message)).SerializeToString())
        self.wire.close_wire(reason, message)
        self.shut(reason, message)

    # -- sending ------------------------------------------------------------

    def send(self, payload: bytes) -> None:
        if not self.closed:
            self.wire.send_frame(payload)

    def send_data(self, stream_id: int, data: bytes | memoryview) -> None:
        limit = self.max_data
        send_frames = self._send_frames
        if send_frames is not None:
            # Each frame as its head and a view of its part of the data.
            size = len(data)
            if size <= limit:
                send_frames([(codec.data_frame_head(stream_id, size), data)])
                return
            view = memoryview(data)
            head = codec.data_frame_head(stream_id, limit)
            frames: list[tuple[bytes | memoryview, ...]] = [
                (head, view[start : start + limit]) for start in range(0, size - limit, limit)
            ]
            last = view[len(frames) * limit :]
            frames.append((codec.data_frame_head(stream_id, len(last)), last))
            send_frames(frames)
            return
        if len(data) <= limit:
            self.wire.send_frame(codec.encode_data(stream_id, data))
            return
        view = memoryview(data)
        for start in range(0, len(data), limit):
            self.wire.send_frame(codec.encode_data(stream_id, bytes(view[start : start + limit])))

    def send_last_data(self, stream_id: int, data: bytes | memoryview) -> None:
        """
        A stream's last Data frame (C{end_stream}); a payload of
        L{_PIECES_FROM} bytes or more goes to a wire that takes frames in
        pieces without being copied into the frame first (the last read of a
        large body ends its stream this way).
        """
        send_frames = self._send_frames
        if send_frames is not None and len(data) >= _PIECES_FROM:
            head, tail = codec.last_data_frame_parts(stream_id, len(data))
            send_frames([(head, data, tail)])
        else:
            self.send(codec.encode_data(stream_id, data, end_stream=True))

    def forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)

    # -- from the transport -------------------------------------------------

    def frame_received(self, payload: codec.Buffer) -> None:
        """
        Dispatch one frame.  A malformed or out-of-place frame closes the link
        with C{protocol_error}: the peer is broken or hostile, and nothing it
        sends afterwards can be trusted.  A C{bytearray} or C{memoryview}
        C{payload} must never be changed afterwards: a Data frame's bytes
        may be passed on as a view of it (L{FrameStream.data_arrived}).
        """
        if self.closed:
            return
        self.heartbeat.heard()
        if len(payload) > self.max_frame_size:
            self.protocol_error(f"frame of {len(payload)} bytes exceeds {self.max_frame_size}")
            return
        try:
            self._dispatch(*self.codec.read(payload, borrow=True))
        except FrameError as e:
            self.protocol_error(str(e))

    def _dispatch(self, stream_id: int, kind: int, body: Any, end_stream: bool) -> None:
        if kind == codec.DATA:
            stream = self.streams.get(stream_id)
            if stream is not None:
                stream.data_arrived(body)
                if end_stream and not stream.closed:
                    stream.remote_end(())
            elif not self._was_opened(stream_id):
                raise FrameError(f"data for stream {stream_id}, which was never opened")
        elif kind == codec.END:
            stream = self._stream_for(stream_id, "end")
            if stream is not None:
                stream.remote_end(body)
        elif kind == codec.WINDOW:
            stream = self.streams.get(stream_id)
            if body == 0:
                raise FrameError(f"stream {stream_id}: window increment of 0")
            if stream is not None:
                stream.credit_arrived(body)
        elif kind == codec.OPEN:
            self._open_arrived(stream_id, body, end_stream)
        elif kind == codec.REPLY:
            stream = self._stream_for(stream_id, "reply")
            if stream is not None:
                if stream.receiver is not None:
                    stream.receiver.reply_received(body)
                else:
                    stream.deliver("reply_received", body)
                if end_stream and not stream.closed:
                    stream.remote_end(())
        elif kind == codec.RESET:
            stream = self.streams.get(stream_id)
            if stream is not None:
                stream.remote_reset(*body)
        elif kind == codec.PING:
            self.send(codec.encode_ping(body, pong=True).SerializeToString())
        elif kind == codec.PONG:
            self.heartbeat.pong(body)
        else:
            if stream_id:
                raise FrameError(f"{codec.KIND_NAMES[kind]} frame on stream {stream_id}")
            message = body
            if isinstance(message, (Hello, Welcome)) and message.initial_window:
                # Each side announces the credit it grants per stream.
                self.peer_window = message.initial_window
            self.control_received(message)

    def _was_opened(self, stream_id: int) -> bool:
        # Frames may still arrive for a stream we reset a moment ago.
        if self.is_edge:
            return stream_id % 2 == 1 and stream_id < self._next_id
        return 0 < stream_id <= self._last_remote_id

    def _stream_for(self, stream_id: int, kind: str) -> FrameStream | None:
        stream = self.streams.get(stream_id)
        if stream is None and not self._was_opened(stream_id):
            raise FrameError(f"{kind} for stream {stream_id}, which was never opened")
        return stream

    def _open_arrived(self, stream_id: int, head: StreamHead, end_stream: bool) -> None:
        if self.is_edge:
            raise FrameError("an agent may not open streams")
        if stream_id % 2 != 1 or stream_id <= self._last_remote_id:
            raise FrameError(f"open for stream {stream_id} after {self._last_remote_id}")
        self._last_remote_id = stream_id
        stream = FrameStream(self, stream_id, head, self.peer_window)
        if len(self.streams) >= self.max_streams:
            stream.reset(Reason.CAP_REACHED, f"more than {self.max_streams} streams on one link")
            return
        self.streams[stream_id] = stream
        self.hand_over(stream, end_stream)

    def wire_lost(self, reason: Reason, message: str) -> None:
        """
        The underlying connection is gone (the transport's connectionLost):
        reset every stream, tell the handler, fire L{when_closed}.
        """
        self.shut(reason, message)
        self.fire_closed()

    # -- heartbeat -------------------------------------------------------------

    def _ping(self, opaque: int) -> None:
        self.send(codec.encode_ping(opaque).SerializeToString())

    def pong_received(self, opaque: int) -> None:
        """The wire's own heartbeat answered ping C{opaque} (see C{send_ping})."""
        self.heartbeat.heard()
        self.heartbeat.pong(opaque)


OnLink = Callable[[FrameLink], None]
