# -*- test-case-name: tests.test_grpc_transport,tests.test_grpc_calls -*-
"""
One gRPC call (L{_Call}: an HTTP/2 stream, its queued bytes and its state)
and the tunnel stream it carries (L{GrpcStream}, the L{IStream} both ends
hand out).  A stream on the edge may wait for a call, and remembers what it
sent until the agent answers, so that an C{Open} crossing a retired call
can be replayed on another one (L{tunneld.transports.grpc.edge}).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from twisted.logger import Logger
from zope.interface import implementer

from tunneld.interfaces import IStream
from tunneld.model.messages import Headers, ReplyHead, StreamHead
from tunneld.model.reasons import Reason
from tunneld.speedups.lean_h2 import Piece
from tunneld.transports.grpc.framing import data_message, grpc_message
from tunneld.transports.linkbase import StreamBase, StreamLink
from tunneld.wire.codec import Codec

__all__ = ["CallLink", "GrpcStream"]

# Bytes an edge stream remembers so that an Open crossing a retired call can be replayed.
_REPLAY_LIMIT = 256 * 1024


class CallLink(StreamLink, Protocol):
    """What a L{GrpcStream} needs of its link (L{tunneld.transports.grpc.link.GrpcLink})."""

    codec: Codec
    log: Logger
    peer: str
    max_data: int
    max_pending: int

    def enqueue(self, call: _Call, pieces: Iterable[Piece]) -> None: ...

    def ack_call(self, call: _Call, force: bool = False) -> None: ...

    def flush(self) -> None: ...

    def forget(self, stream: GrpcStream) -> None: ...

    def stream_local_end(self, stream: GrpcStream) -> None: ...

    def stream_local_reset(self, stream: GrpcStream, reason: Reason, message: str) -> None: ...


class _Call:
    """One HTTP/2 stream carrying one gRPC call."""

    __slots__ = (
        "stream_id", "kind", "inbox", "outbox", "out_offset", "out_size", "finish",
        "end_after", "dirty", "blocked", "headers_sent", "local_closed", "remote_closed",
        "stream", "unacked", "retiring", "broken", "reuse", "data_left",
    )

    def __init__(self, stream_id: int, kind: str) -> None:
        self.stream_id = stream_id
        self.kind = kind  # "control", "forward" or "refused"
        self.inbox = bytearray()
        # Made when bytes are queued, dropped once they are sent: an empty
        # deque keeps a 64-slot block (760 bytes), a lot for each idle call.
        self.outbox: deque[Piece] | None = None
        self.out_offset = 0
        self.out_size = 0
        self.finish: Callable[[], None] | None = None
        # END_STREAM goes out with the last queued byte (the agent's half-close).
        self.end_after = False
        # Queued bytes wait for the end of the reactor turn (see GrpcLink.enqueue).
        self.dirty = False
        # The HTTP/2 window holds queued bytes back.
        self.blocked = False
        self.headers_sent = False
        self.local_closed = False
        self.remote_closed = False
        self.stream: GrpcStream | None = None
        self.unacked = 0
        self.retiring = False
        self.broken = False
        # Both ends agreed to carry one stream after another on this call.
        self.reuse = False
        # Payload bytes still to come of a Data message that spans DATA
        # frames: they are delivered as they arrive.
        self.data_left = 0

    def drop_outbox(self) -> None:
        self.outbox = None
        self.out_offset = 0
        self.out_size = 0
        self.finish = None
        self.end_after = False
        self.blocked = False


@implementer(IStream)
class GrpcStream(StreamBase):
    """One tunnel stream: one C{Forward} call (none yet while it waits for one)."""

    __slots__ = ("call", "_held", "_held_size", "_replay", "_replay_size", "answered",
                 "queue_timer", "open_ends")

    link: CallLink

    def __init__(self, link: CallLink, head: StreamHead, call: _Call | None = None) -> None:
        super().__init__(link, head)
        self.call = call
        self._held: list[Piece] = []
        self._held_size = 0
        self._replay: list[Piece] | None = None
        self._replay_size = 0
        self.answered = False
        self.queue_timer: Any = None
        # The edge's Open says end_stream itself: the request has no body.
        self.open_ends = False

    # -- IStream, outgoing -------------------------------------------------

    def send_reply(self, reply: ReplyHead) -> None:
        """IStream.send_reply"""
        if not self.closed and not self.local_ended:
            self._send((grpc_message(self.link.codec.reply_bytes(0, reply)),))

    def write(self, data: bytes) -> None:
        """IConsumer.write: send within the HTTP/2 windows, hold the rest (bounded)."""
        if self.closed or self.local_ended or not data:
            return
        limit = self.link.max_data
        if len(data) <= limit:
            self._send(data_message(data))
            return
        view = memoryview(data)
        pieces: list[Piece] = []
        for start in range(0, len(data), limit):
            pieces.extend(data_message(view[start : start + limit]))
        self._send(pieces)

    def end(self, trailers: Headers = ()) -> None:
        """IStream.end"""
        if self.closed or self.local_ended:
            return
        self._send((grpc_message(self.link.codec.end_bytes(0, trailers)),))
        if self.closed:
            return
        self.local_ended = True
        self.link.stream_local_end(self)

    def reset(self, reason: Reason, message: str) -> None:
        """IStream.reset"""
        if self.closed:
            return
        self._close()
        self.link.stream_local_reset(self, reason, message)

    # -- IPushProducer, incoming ------------------------------------------

    def resumeProducing(self) -> None:  # noqa: N802
        """IPushProducer.resumeProducing: return the window held back."""
        self.consumer_paused = False
        call = self.call
        if call is not None and call.unacked:
            self.link.ack_call(call, force=True)
            self.link.flush()

    # -- for the link ----------------------------------------------------------

    def pending(self) -> int:
        """Outgoing bytes not yet handed to HTTP/2."""
        return self._held_size + (self.call.out_size if self.call is not None else 0)

    def blocked(self) -> bool:
        """
        Whether what is written now must wait: for a call, for the socket or
        for the HTTP/2 window.  (Bytes that merely wait for the end of the
        reactor turn do not pause the source.)
        """
        if self.closed:
            return False
        call = self.call
        return call is None or call.blocked or self.link.sending_paused

    def _send(self, pieces: Sequence[Piece]) -> None:
        size = sum(map(len, pieces))
        call = self.call
        if call is None:
            self._held.extend(pieces)
            self._held_size += size
        else:
            if self._replay is not None:
                self._replay.extend(pieces)
                self._replay_size += size
                if self._replay_size > _REPLAY_LIMIT:
                    self._replay = None
            self.link.enqueue(call, pieces)
        call = self.call
        pending = self._held_size + (call.out_size if call is not None else 0)
        if pending > self.link.max_pending:
            self.link.log.warn(
                "stream on {peer} saturated: {size} bytes pending",
                peer=self.link.peer, size=pending,
            )
            self.reset(Reason.SATURATED, "sender ignored flow control")
        elif self.blocked():
            self._pause_producer()

    def take_held(self) -> list[Piece]:
        held, self._held, self._held_size = self._held, [], 0
        return held

    def start_replay_log(self, pieces: list[Piece]) -> None:
        size = sum(map(len, pieces))
        if size <= _REPLAY_LIMIT:
            self._replay, self._replay_size = list(pieces), size
        else:
            self._replay = None

    def take_replay(self) -> list[Piece] | None:
        replay, self._replay = self._replay, None
        return replay

    @property
    def replaying(self) -> bool:
        """Whether the stream still remembers what it sent, for a replay."""
        return self._replay is not None

    def hold_first(self, pieces: list[Piece]) -> None:
        """Hold C{pieces} (a replay) before what waits for a call already."""
        self._held[:0] = pieces
        self._held_size += sum(map(len, pieces))

    def answered_by_peer(self) -> None:
        if not self.answered:
            self.answered = True
            # No replay will need the Open again (edge side only); a stream
            # that may be held for hours keeps no header fields.
            if self.head.kind != "http":
                self.head = self.head.without_headers()
        self._replay = None

    def maybe_done(self) -> None:
        if self.local_ended and self.remote_ended and not self.closed:
            self._close()

    def _drop(self) -> None:
        self._held = []
        self._held_size = 0
        self._replay = None
        if self.queue_timer is not None and self.queue_timer.active():
            self.queue_timer.cancel()
        self.queue_timer = None
        self.link.forget(self)

