# -*- test-case-name: tests.test_grpc_transport,tests.test_grpc_interop -*-
"""
The gRPC agent-link transport: HTTP/2 (the C{h2} library on a Twisted
protocol) in real gRPC framing, service C{tunneld.v1.TunnelAgent} of
C{proto/tunnel.proto}.

The agent is the gRPC client.  It opens one long-lived C{Control} call (hello
from the agent; welcome and goaway from the edge) and keeps a pool of idle
C{Forward} calls open.  When the edge opens a stream it answers one idle
C{Forward} call with an C{Open} message; from then on that call carries the
stream's C{Reply}/C{Data}/C{End}/C{Reset} messages with C{stream_id} 0 and no
C{Window} messages: HTTP/2 flow control is the backpressure, and a stream's
window is returned only as its consumer takes the data.  HTTP/2 PING is the
heartbeat.  A stock gRPC library can implement an agent or probe the edge.

Rules on top of plain gRPC that an agent must follow:
  - the agent retires an idle C{Forward} call by half-closing it without
    sending a message; an C{Open} that crossed it is replayed by the edge on
    another call, so the agent ignores it;
  - the edge ends a C{Forward} call (trailers) only once both directions have
    ended (C{End}, or C{end_stream} on a C{Reply} or C{Data} of version 2),
    or after a C{Reset}; the agent half-closes its request after its own end
    or C{Reset}.  A C{Reset} from the edge while it was still sending the
    request body is followed by C{RST_STREAM}: a grpcio agent sees the end of
    a call only after every message in front of it;
  - unless both ends agree to reuse the call: an agent that sends the request
    metadata C{tunneld-reuse: 1} on a C{Forward} call, answered by the same
    response metadata, keeps the call open after a stream ended cleanly
    (C{End} both ways) and both ends take it back as an idle call, ready for
    the next C{Open}.  A stream then costs two DATA frames instead of three
    HEADERS and two DATA frames; a C{Reset} still ends the call.  Peers that
    do not send the metadata (a stock gRPC agent) get one call per stream;
  - a closing edge ends C{Control} with a C{grpc-status} and a C{grpc-message}
    of the form C{"<reason>: <text>"} (e.g. C{unauthorized: wrong token}).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import quote, unquote

from h2 import events as h2events
from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError as H2ProtocolError
from h2.settings import SettingCodes
from twisted.application.service import IService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import clientFromString, wrapClientTLS
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IProducer,
    IProtocolNegotiationFactory,
    IPushProducer,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from tunneld.config.schema import non_negative, parse_table, positive, setting
from tunneld.errors import ConfigError
from tunneld.interfaces import (
    AgentLinkSetup,
    EdgeLinkSetup,
    IAgentLink,
    ILinkHandler,
    IStream,
    IStreamReceiver,
    ITransportPlugin,
)
from tunneld.listening import ListeningService
from tunneld.model.messages import (
    END_STREAM_VERSION,
    MIN_FRAME_SIZE,
    ControlMessage,
    GoAway,
    Headers,
    Hello,
    ReplyHead,
    StreamHead,
    Welcome,
    saying_limits,
)
from tunneld.model.reasons import Reason
from tunneld.proxyconnect import ProxyConnectEndpoint
from tunneld.speedups import bulkwrite
from tunneld.speedups.lean_h2 import Payload, Piece, new_h2_connection
from tunneld.speedups.readsize import ReadSize
from tunneld.transports.mux import SocketCongestion
from tunneld.wire import codec
from tunneld.wire.codec import Codec, FrameError
from tunneld.wire.heartbeat import Heartbeat

SERVICE = "tunneld.v1.TunnelAgent"
CONTROL_PATH = b"/tunneld.v1.TunnelAgent/Control"
FORWARD_PATH = b"/tunneld.v1.TunnelAgent/Forward"
GRPC_CONTENT_TYPE = b"application/grpc"
# Response metadata on a Forward call: idle calls the edge has left after using this one.
IDLE_HEADER = b"tunneld-idle"
# Metadata on a Forward call's request and response: both ends reuse the call
# for the next stream once both sides have sent End (see the module docstring).
REUSE_HEADER = b"tunneld-reuse"
_RESPONSE_HEADERS = ((b":status", b"200"), (b"content-type", GRPC_CONTENT_TYPE))
_REUSE = ((REUSE_HEADER, b"1"),)
# Sent only when it matters: the agent's pool ran dry and should grow.
_DRY = ((IDLE_HEADER, b"0"),)

MIB = 1024 * 1024
# Room in a message for everything but a Data payload.
_MESSAGE_OVERHEAD = 32
# Bytes an edge stream remembers so that an Open crossing a retired call can be replayed.
_REPLAY_LIMIT = 256 * 1024
# The longest head of a Data message as data_message writes it: a tag and a
# varint of the Data, a tag and a varint of its payload.
_DATA_HEAD_MAX = 12
# What one flush writes is joined here below this size (small messages):
# one copy costs less than a long iovec, or Twisted's checks of each piece.
_JOIN_BELOW = 16 * 1024
# Frame(end=End()) of stream 0: how almost every stream ends, read without protobuf.
_BARE_END = codec.end_bytes(0)
# Seconds a closing connection may take to flush before it is aborted.
_CLOSE_GRACE = 5.0
# Seconds a closing link keeps reading (and dropping) what the peer still sends.
_LINGER = 0.5
# Calls an agent may open beyond its streams by default: the Control call, the
# pool of idle Forward calls (max_idle_forwards, 256 by default) and retiring ones.
_CALL_HEADROOM = 1024


class GrpcStatus(enum.IntEnum):
    """The gRPC status codes this transport uses."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


_STATUS_FOR_REASON = {
    Reason.NO_TUNNEL: GrpcStatus.NOT_FOUND,
    Reason.AGENT_UNAVAILABLE: GrpcStatus.UNAVAILABLE,
    Reason.AGENT_GONE: GrpcStatus.UNAVAILABLE,
    Reason.UPSTREAM_REFUSED: GrpcStatus.UNAVAILABLE,
    Reason.UPSTREAM_TIMEOUT: GrpcStatus.DEADLINE_EXCEEDED,
    Reason.RATE_LIMITED: GrpcStatus.RESOURCE_EXHAUSTED,
    Reason.CAP_REACHED: GrpcStatus.RESOURCE_EXHAUSTED,
    Reason.SATURATED: GrpcStatus.RESOURCE_EXHAUSTED,
    Reason.DRAINING: GrpcStatus.UNAVAILABLE,
    Reason.PROTOCOL_ERROR: GrpcStatus.INVALID_ARGUMENT,
    Reason.UNAUTHORIZED: GrpcStatus.UNAUTHENTICATED,
    Reason.BAD_REQUEST: GrpcStatus.INVALID_ARGUMENT,
    Reason.UPSTREAM_ERROR: GrpcStatus.UNKNOWN,
    Reason.CLIENT_GONE: GrpcStatus.CANCELLED,
    Reason.IDLE_TIMEOUT: GrpcStatus.UNAVAILABLE,
    Reason.CANCELLED: GrpcStatus.CANCELLED,
    Reason.SESSION_GONE: GrpcStatus.NOT_FOUND,
}

# When a status arrives without a reason label (a stock gRPC peer).
_REASON_FOR_STATUS = {
    GrpcStatus.CANCELLED: Reason.CANCELLED,
    GrpcStatus.INVALID_ARGUMENT: Reason.PROTOCOL_ERROR,
    GrpcStatus.INTERNAL: Reason.PROTOCOL_ERROR,
    GrpcStatus.UNIMPLEMENTED: Reason.PROTOCOL_ERROR,
    GrpcStatus.RESOURCE_EXHAUSTED: Reason.SATURATED,
    GrpcStatus.UNAUTHENTICATED: Reason.UNAUTHORIZED,
    GrpcStatus.DEADLINE_EXCEEDED: Reason.UPSTREAM_TIMEOUT,
    GrpcStatus.NOT_FOUND: Reason.NO_TUNNEL,
}

_RST_FOR_REASON = {
    Reason.CANCELLED: ErrorCodes.CANCEL,
    Reason.CLIENT_GONE: ErrorCodes.CANCEL,
    Reason.SATURATED: ErrorCodes.FLOW_CONTROL_ERROR,
    Reason.RATE_LIMITED: ErrorCodes.ENHANCE_YOUR_CALM,
    Reason.CAP_REACHED: ErrorCodes.REFUSED_STREAM,
    Reason.AGENT_UNAVAILABLE: ErrorCodes.REFUSED_STREAM,
    Reason.PROTOCOL_ERROR: ErrorCodes.PROTOCOL_ERROR,
}


def rst_code(reason: Reason) -> int:
    """The RST_STREAM error code that ends a call for C{reason} (a stock peer reads it as a status)."""
    return _RST_FOR_REASON.get(reason, ErrorCodes.CANCEL)


_REASON_FOR_RST = {
    ErrorCodes.CANCEL: Reason.CANCELLED,
    ErrorCodes.FLOW_CONTROL_ERROR: Reason.SATURATED,
    ErrorCodes.ENHANCE_YOUR_CALM: Reason.SATURATED,
    ErrorCodes.REFUSED_STREAM: Reason.AGENT_UNAVAILABLE,
    ErrorCodes.PROTOCOL_ERROR: Reason.PROTOCOL_ERROR,
}

_REASONS_BY_LABEL = {reason.value: reason for reason in Reason}
# grpc-message is percent-encoded outside printable ASCII (and '%' itself).
_MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def status_message(reason: Reason, message: str) -> bytes:
    """The C{grpc-message} trailer naming C{reason}, percent-encoded."""
    return quote(f"{reason.value}: {message}"[:512], safe=_MESSAGE_SAFE).encode("ascii")


def reason_from_status(status: int, encoded: bytes) -> tuple[Reason, str]:
    """The reason and text carried by a C{grpc-status}/C{grpc-message} pair."""
    text = unquote(encoded.decode("ascii", "replace"))
    label, sep, rest = text.partition(": ")
    if sep and label in _REASONS_BY_LABEL:
        return _REASONS_BY_LABEL[label], rest
    try:
        code = GrpcStatus(status)
    except ValueError:
        code = GrpcStatus.UNKNOWN
    return _REASON_FOR_STATUS.get(code, Reason.AGENT_GONE), text or f"grpc-status {status}"


def grpc_message(payload: bytes) -> bytes:
    """One uncompressed gRPC length-prefixed message."""
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def _frame_message(frame: codec.Frame) -> bytes:
    return grpc_message(frame.SerializeToString())


def data_message(data: Piece) -> tuple[bytes, Piece]:
    """
    The gRPC message C{Frame(data=Data(data=data))} as (head, data): the
    payload is not copied here, only once when it goes into a DATA frame.
    """
    size = len(data)
    head = codec.data_frame_head(0, size)
    return b"\x00" + (len(head) + size).to_bytes(4, "big") + head, data


def _varint_at(view: memoryview, pos: int) -> tuple[int, int] | None:
    """The varint at C{pos} (at most 5 bytes) and the position after it, if there is one."""
    value = 0
    for shift in range(0, 35, 7):
        if pos >= len(view):
            return None
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
    return None


def _data_head(message: memoryview, length: int) -> int | None:
    """
    Where the payload starts in a message of C{length} bytes (of which
    C{message} holds the first ones) laid out as L{data_message} writes it:
    a C{Data} frame of stream 0 that does not end it.  None for any other
    message (protobuf reads those), or if too little of it is there to tell.
    """
    if len(message) < 2 or message[0] != 0x32:
        return None
    # Varints of one byte (small messages) are read here, longer ones by _varint_at.
    inner, pos = message[1], 2
    if inner >= 0x80:
        field = _varint_at(message, 1)
        if field is None:
            return None
        inner, pos = field
    if inner + pos != length:
        return None
    if not inner:
        return pos
    if pos >= len(message) or message[pos] != 0x0A:
        return None
    pos += 1
    if pos < len(message) and message[pos] < 0x80:
        size, pos = message[pos], pos + 1
    else:
        data = _varint_at(message, pos)
        if data is None:
            return None
        size, pos = data
    if size + pos != length:
        return None
    return pos


def _data_payload(message: memoryview) -> bytes | None:
    """The payload of a whole message read by L{_data_head}, copied once; else None."""
    head = _data_head(message, len(message))
    return None if head is None else message[head:].tobytes()


def _check_window(value: int) -> str | None:
    if not 65535 <= value <= 0x7FFFFFFF:
        return f"must be between 65535 and 2147483647, got {value}"
    return None


@dataclass(frozen=True)
class GrpcEdgeOptions:
    """Edge side of the gRPC transport."""

    listen: str = setting(
        "tcp:8082:interface=127.0.0.1", "Endpoint string the edge listens on for agents (HTTP/2)."
    )
    heartbeat_interval: float = setting(
        10.0, "Seconds between HTTP/2 PINGs (0 = off).", check=non_negative
    )
    heartbeat_timeout: float = setting(
        30.0, "Seconds of silence after which the link is declared dead.", check=positive
    )
    max_queued_opens: int = setting(
        4096,
        "Streams that may wait for the agent to open an idle Forward call; beyond this a new "
        "stream is refused with saturated.",
        check=non_negative,
    )
    queued_open_timeout: float = setting(
        10.0, "Seconds a stream may wait for an idle Forward call.", check=positive
    )
    handshake_timeout: float = setting(
        10.0, "Seconds an agent has to open its Control call after connecting.", check=positive
    )
    max_concurrent_calls: int = setting(
        0,
        "HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: calls one agent may have open; 0 = "
        "[edge] max_streams_per_agent + 1024 (its streams, its Control call and its idle "
        "Forward calls), so that max_streams_per_agent, with its reason, refuses a stream "
        "before the agent runs out of calls.",
        check=non_negative,
    )
    stream_window: int = setting(
        MIB, "HTTP/2 receive window per call in bytes (returned as the consumer reads).",
        check=_check_window,
    )
    connection_window: int = setting(
        16 * MIB, "HTTP/2 receive window of the whole connection in bytes.", check=_check_window
    )


@dataclass(frozen=True)
class GrpcAgentOptions:
    """Agent side of the gRPC transport."""

    address: str = setting("127.0.0.1:8082", "host:port of the edge's gRPC listener.")
    tls: bool = setting(False, "Use TLS (with ALPN h2) to the edge.")
    min_idle_forwards: int = setting(
        2, "Idle Forward calls kept open for the edge at least.", check=positive
    )
    max_idle_forwards: int = setting(
        256, "Idle Forward calls kept open at most (the pool grows when it runs dry).",
        check=positive,
    )
    pool_shrink_interval: float = setting(
        10.0,
        "Seconds without the pool running dry after which it shrinks by half; idle calls "
        "that ended on an error are replaced on the same tick.",
        check=positive,
    )
    connect_timeout: float = setting(
        10.0, "Seconds allowed for connecting, TLS and the HTTP/2 handshake.", check=positive
    )
    heartbeat_interval: float = setting(
        10.0, "Seconds between HTTP/2 PINGs (0 = off).", check=non_negative
    )
    heartbeat_timeout: float = setting(
        30.0, "Seconds of silence after which the link is declared dead.", check=positive
    )
    stream_window: int = setting(
        MIB, "HTTP/2 receive window per call in bytes (returned as the consumer reads).",
        check=_check_window,
    )
    connection_window: int = setting(
        16 * MIB, "HTTP/2 receive window of the whole connection in bytes.", check=_check_window
    )


def split_address(address: str) -> tuple[str, int] | None:
    """C{"host:port"} or C{"[v6]:port"} as (host, port), or None if malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class _CallError(Exception):
    """A call broke gRPC framing; ends the call with C{status}."""

    def __init__(self, status: GrpcStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


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
class GrpcStream:
    """One tunnel stream: one C{Forward} call."""

    __slots__ = (
        "link", "head", "call", "receiver", "_early", "_held", "_held_size", "_replay",
        "_replay_size", "answered", "_producer", "_producer_paused", "consumer_paused",
        "local_ended", "remote_ended", "closed", "queue_timer", "open_ends",
    )

    def __init__(self, link: GrpcLink, head: StreamHead, call: _Call | None = None) -> None:
        self.link = link
        self.head = head
        self.call = call
        self.receiver: IStreamReceiver | None = None
        self._early: list[tuple[str, tuple[Any, ...]]] | None = []
        self._held: list[Piece] = []
        self._held_size = 0
        self._replay: list[Piece] | None = None
        self._replay_size = 0
        self.answered = False
        self._producer: IPushProducer | None = None
        self._producer_paused = False
        self.consumer_paused = False
        self.local_ended = False
        self.remote_ended = False
        self.closed = False
        self.queue_timer: Any = None
        # The edge's Open says end_stream itself: the request has no body.
        self.open_ends = False

    # -- IStream, outgoing -------------------------------------------------

    def attach(self, receiver: IStreamReceiver) -> None:
        """IStream.attach"""
        early, self._early = self._early, None
        self.receiver = receiver
        for name, args in early or ():
            getattr(receiver, name)(*args)
        if self.closed:
            self.receiver = None  # it heard the last event (see _close)

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

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:  # noqa: N802
        """IConsumer.registerProducer: only push producers (all of ours are)."""
        self._producer = cast(IPushProducer, producer)
        self._producer_paused = False
        if self.blocked():
            self._pause_producer()

    def unregisterProducer(self) -> None:  # noqa: N802
        """IConsumer.unregisterProducer"""
        self._producer = None

    # -- IPushProducer, incoming ------------------------------------------

    def pauseProducing(self) -> None:  # noqa: N802
        """IPushProducer.pauseProducing: return no more window until resumed."""
        self.consumer_paused = True

    def resumeProducing(self) -> None:  # noqa: N802
        """IPushProducer.resumeProducing: return the window held back."""
        self.consumer_paused = False
        call = self.call
        if call is not None and call.unacked:
            self.link.ack_call(call, force=True)
            self.link.flush()

    def stopProducing(self) -> None:  # noqa: N802
        """
        IPushProducer.stopProducing: the consumer is gone.  The reset waits a
        turn so the consumer's own connectionLost can give a better reason.
        """
        if not self.closed:
            self.link.reactor.callLater(0, self.reset, Reason.CANCELLED, "consumer stopped")

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

    def answered_by_peer(self) -> None:
        if not self.answered:
            self.answered = True
            # No replay will need the Open again (edge side only); a stream
            # that may be held for hours keeps no header fields.
            if self.head.kind != "http":
                self.head = self.head.without_headers()
        self._replay = None

    def deliver(self, name: str, *args: Any) -> None:
        if self.receiver is not None:
            getattr(self.receiver, name)(*args)
        elif self._early is not None:
            self._early.append((name, args))

    def _pause_producer(self) -> None:
        if self._producer is not None and not self._producer_paused:
            self._producer_paused = True
            self._producer.pauseProducing()

    def pause_source(self) -> None:
        self._pause_producer()

    def resume_source(self) -> None:
        if (
            self._producer is not None
            and self._producer_paused
            and not self.pending()
            and not self.link.sending_paused
        ):
            self._producer_paused = False
            self._producer.resumeProducing()

    def remote_end(self, trailers: Headers) -> None:
        self.remote_ended = True
        self.deliver("end_received", trailers)
        self.maybe_done()

    def remote_reset(self, reason: Reason, message: str) -> None:
        if self.closed:
            return
        receiver = self.receiver
        self._close()
        if receiver is not None:
            receiver.reset_received(reason, message)
        else:
            self.deliver("reset_received", reason, message)

    def maybe_done(self) -> None:
        if self.local_ended and self.remote_ended and not self.closed:
            self._close()

    def _close(self) -> None:
        self.closed = True
        self._held = []
        self._held_size = 0
        self._replay = None
        self._producer = None
        # The receiver (which holds this stream) hears nothing more: dropping
        # it breaks the cycle, so the pair is freed now by reference counting
        # rather than piling up for the cyclic GC, whose pauses make the tail.
        self.receiver = None
        if self.queue_timer is not None and self.queue_timer.active():
            self.queue_timer.cancel()
        self.queue_timer = None
        self.link.forget(self)


@implementer(IAgentLink)
class GrpcLink(Protocol):
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
        *,
        reactor: Any,
        max_frame_size: int,
        stream_window: int,
        connection_window: int,
        heartbeat_interval: float,
        heartbeat_timeout: float,
        codec: Codec | None = None,
    ) -> None:
        self.reactor = reactor
        # The frame codec (the edge's or the agent's, shared by its links).
        self.codec = codec if codec is not None else Codec()
        self.max_message = max_frame_size
        # Data messages fit any peer's limit until the peer says its own in
        # Hello or Welcome (L{_peer_frame_limit}).
        self.max_data = min(max_frame_size, MIN_FRAME_SIZE) - _MESSAGE_OVERHEAD
        # Whether the version agreed in Hello/Welcome lets messages carry end_stream.
        self.end_stream = False
        self.stream_window = stream_window
        self.connection_window = connection_window
        self.max_pending = stream_window + max_frame_size
        # Windows go back once half is spent (not a quarter): fewer
        # WINDOW_UPDATE-only writes, each of which wakes the peer for a read.
        self.ack_threshold = max(1, stream_window // 2)
        self.conn_ack_threshold = max(1, connection_window // 2)
        self.peer = "?"
        self.handler: ILinkHandler | None = None
        self._early_control: list[ControlMessage] = []
        self.calls: dict[int, _Call] = {}
        self.streams: dict[int, GrpcStream] = {}
        self.control: _Call | None = None
        self.sending_paused = False
        self.closed = False
        self.conn = new_h2_connection(
            H2Configuration(
                client_side=not self.is_edge,
                header_encoding=None,
                # Every header we send is built here, as lowercase bytes: h2
                # need not check or rewrite them.  What arrives is checked.
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self._conn_unacked = 0
        # Calls that took DATA during this read: their windows go back once,
        # at its end, in the write that carries whatever else is due.
        self._to_ack: dict[_Call, None] = {}
        self._read_size = ReadSize(None)  # the socket's, once connected
        self._batching = False
        self._dirty: list[_Call] = []
        self._turn: Any = None
        self.heartbeat = Heartbeat(
            reactor, heartbeat_interval, heartbeat_timeout, self._ping, self._silent
        )
        self._abort_timer: Any = None
        self._linger_timer: Any = None
        self._lost_reason: tuple[Reason, str] | None = None
        self.disconnected = False
        self._disconnect_waiters: list[Deferred[None]] = []

    # -- IAgentLink -------------------------------------------------------------

    @property
    def peer_certificate(self) -> Any:
        """IAgentLink.peer_certificate"""
        get_cert = getattr(self.transport, "getPeerCertificate", None)
        return get_cert() if get_cert is not None else None

    def set_handler(self, handler: ILinkHandler) -> None:
        """IAgentLink.set_handler"""
        self.handler = handler
        early, self._early_control = self._early_control, []
        for message in early:
            handler.control_received(message)

    def send_control(self, message: ControlMessage) -> None:
        """
        IAgentLink.send_control; a Hello or Welcome says the largest message
        this end accepts, a Welcome the heartbeat interval (unless its sender
        said them).
        """
        control = self.control
        if self.closed or control is None or control.local_closed:
            return
        if isinstance(message, Welcome):
            self.end_stream = message.version >= END_STREAM_VERSION
        message = saying_limits(message, self.max_message, self.heartbeat.interval)
        self.send_now(control, [_frame_message(codec.encode_control(message))])

    def open_stream(
        self, head: StreamHead, receiver: IStreamReceiver, end_stream: bool = False
    ) -> IStream:
        """IAgentLink.open_stream"""
        raise NotImplementedError("only the edge opens streams")

    def round_trip_time(self) -> float | None:
        """IAgentLink.round_trip_time"""
        return self.heartbeat.rtt

    def active_streams(self) -> int:
        """IAgentLink.active_streams"""
        return len(self.streams)

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
        conn = self.conn
        conn.initiate_connection()
        # Applied (windows, frame size) when the peer acknowledges them.
        conn.update_settings(self.local_settings())
        if self.connection_window > 65535:
            conn.increment_flow_control_window(self.connection_window - 65535)
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
        self.disconnected = True
        waiters, self._disconnect_waiters = self._disconnect_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def when_closed(self) -> Deferred[None]:
        """IAgentLink.when_closed"""
        if self.disconnected or self.transport is None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._disconnect_waiters.append(waiter)
        return waiter

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

    def protocol_error(self, message: str) -> None:
        self.log.warn(
            "{transport} link from {peer} broke the protocol: {error}",
            transport=self.transport_name, peer=self.peer, error=message,
        )
        self.close(Reason.PROTOCOL_ERROR, message)

    def wire_lost(self, reason: Reason, message: str) -> None:
        """
        The connection is gone: reset every stream and tell the handler.  Safe
        to call more than once.
        """
        if self.closed:
            return
        self.closed = True
        self.heartbeat.stop()
        self.stop_timers()
        streams, self.streams = self.streams, {}
        for stream in list(streams.values()):
            stream.remote_reset(reason, message)
        for stream in self.orphans():
            stream.remote_reset(reason, message)
        if self.handler is not None:
            self.handler.link_lost(reason, message)

    def stop_timers(self) -> None:
        """Subclasses cancel their own timers here."""

    def orphans(self) -> list[GrpcStream]:
        """Streams not on a call yet (queued opens) that must be reset too."""
        return []

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

    def pause_sending(self) -> None:
        """The socket's send buffer is full: pause every stream's source."""
        self.sending_paused = True
        for stream in list(self.streams.values()):
            stream.pause_source()

    def resume_sending(self) -> None:
        """The socket drained: move queued bytes on and resume the sources."""
        self.sending_paused = False
        self.flush_all()
        self.flush()
        for stream in list(self.streams.values()):
            stream.resume_source()

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
            messages = self._split_messages(call, chunk)
        except _CallError as e:
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

    def _split_messages(self, call: _Call, data: Payload) -> list[memoryview | bytes]:
        """
        Whole gRPC messages out of a call's bytes, as views of them, and (as
        bytes) the pieces of a C{Data} message's payload that spans DATA
        frames: those are passed on as they arrive.  Any other partial
        message waits in the call's inbox.

        A DATA frame gathered from several reads comes as the pieces that
        carry it: if it is all payload of one C{Data} message, that payload
        is joined from them (one copy), else they are joined first.
        """
        if isinstance(data, list):
            payload = self._data_pieces(call, data)
            if payload is not None:
                return [payload]
            data = b"".join(data)
        out: list[memoryview | bytes] = []
        buf = memoryview(data)
        pos = 0
        total = len(buf)
        if call.data_left:
            pos = min(call.data_left, total)
            out.append(buf[:pos].tobytes())
            call.data_left -= pos
        inbox = call.inbox
        if inbox and pos < total:
            # Complete the message an earlier DATA frame began.
            if len(inbox) < 5:
                take = min(5 - len(inbox), total - pos)
                inbox += buf[pos : pos + take]
                pos += take
                if len(inbox) < 5:
                    return out
            missing = 5 + self._message_length(inbox, 0) - len(inbox)
            if missing > total - pos:
                inbox += buf[pos:]
                return out
            inbox += buf[pos : pos + missing]
            pos += missing
            out.append(memoryview(bytes(inbox))[5:])
            inbox.clear()
        max_message = self.max_message
        while total - pos >= 5:
            length = int.from_bytes(buf[pos + 1 : pos + 5], "big")
            if buf[pos] or length > max_message:
                self._message_length(buf, pos)  # raises why
            end = pos + 5 + length
            if end > total:
                if call.kind == "forward":
                    head = _data_head(buf[pos + 5 :], length)
                    if head is not None:
                        out.append(buf[pos + 5 + head :].tobytes())
                        call.data_left = end - total
                        return out
                break
            out.append(buf[pos + 5 : end])
            pos = end
        if pos < total:
            inbox += buf[pos:]
        return out

    def _data_pieces(self, call: _Call, pieces: list[bytes | bytearray | memoryview]) -> bytes | None:
        """
        The payload in a DATA frame's pieces, joined, if the frame holds only
        payload of one C{Data} message: the rest of one begun earlier, or the
        start of one (all of it, or more to come in the next frames).  None
        otherwise (other messages, several, an inbox to complete).
        """
        total = sum(map(len, pieces))
        left = call.data_left
        if left:
            if left < total:
                return None
            call.data_left = left - total
            return b"".join(pieces)
        first = memoryview(pieces[0])
        if call.inbox or call.kind != "forward" or len(first) < 5 + _DATA_HEAD_MAX:
            return None
        length = int.from_bytes(first[1:5], "big")
        if first[0] or length > self.max_message or 5 + length < total:
            return None  # compressed, too long (the general path says so) or not alone
        head = _data_head(first[5 : 5 + _DATA_HEAD_MAX], length)
        if head is None:
            return None
        call.data_left = 5 + length - total
        return b"".join([first[5 + head :], *pieces[1:]])

    def _message_length(self, buf: memoryview | bytearray, pos: int) -> int:
        """The length in the gRPC message prefix at C{pos}, if the message is acceptable."""
        if buf[pos]:
            raise _CallError(GrpcStatus.INTERNAL, "compressed messages are not supported")
        length = int.from_bytes(buf[pos + 1 : pos + 5], "big")
        if length > self.max_message:
            raise _CallError(
                GrpcStatus.RESOURCE_EXHAUSTED,
                f"message of {length} bytes exceeds the limit of {self.max_message}",
            )
        return length

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
        message = codec.control_from(frame)
        self.control_message(message)

    def control_message(self, message: ControlMessage) -> None:
        if isinstance(message, (Hello, Welcome)):
            self._peer_frame_limit(message.max_frame_size)
        if isinstance(message, Welcome):
            self.end_stream = message.version >= END_STREAM_VERSION
        if self.handler is not None:
            self.handler.control_received(message)
        else:
            self._early_control.append(message)

    def _peer_frame_limit(self, limit: int) -> None:
        """
        The peer accepts messages up to C{limit} bytes (0: not said, the
        protocol's minimum): Data messages grow up to that or our own limit,
        whichever is smaller.  A limit below the minimum is ignored.
        """
        limit = min(max(limit, MIN_FRAME_SIZE), self.max_message)
        self.max_data = limit - _MESSAGE_OVERHEAD

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
            try:
                name = ErrorCodes(code).name
            except ValueError:
                name = str(code)
            stream.remote_reset(
                _REASON_FOR_RST.get(cast(ErrorCodes, code), Reason.AGENT_GONE),
                f"call reset by the peer ({name})",
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

    def _silent(self, silent: float) -> None:
        self.log.warn(
            "{transport} link {peer} silent for {silent:.1f}s: closing",
            transport=self.transport_name, peer=self.peer, silent=silent,
        )
        self.close(Reason.AGENT_GONE, f"heartbeat timeout after {silent:.1f}s")

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


class EdgeGrpcLink(GrpcLink):
    """The edge end: the gRPC server for one agent."""

    is_edge = True

    def __init__(self, options: GrpcEdgeOptions, setup: EdgeLinkSetup) -> None:
        super().__init__(
            reactor=setup.reactor,
            max_frame_size=setup.max_frame_size,
            stream_window=options.stream_window,
            connection_window=options.connection_window,
            heartbeat_interval=options.heartbeat_interval,
            heartbeat_timeout=options.heartbeat_timeout,
            codec=setup.codec,
        )
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
            self._finish(control, _STATUS_FOR_REASON[reason], status_message(reason, message), now=True)

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
        self._finish(call, status, quote(message[:512], safe=_MESSAGE_SAFE).encode("ascii"))

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
            stream._held = replay + stream._held
            stream._held_size = sum(len(p) for p in stream._held)
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
        if not stream.answered or stream._replay is not None:
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
            self._finish(call, _STATUS_FOR_REASON[reason], status_message(reason, message))
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


class AgentGrpcLink(GrpcLink):
    """The agent end: the gRPC client, with its pool of idle Forward calls."""

    is_edge = False

    def __init__(
        self, options: GrpcAgentOptions, setup: AgentLinkSetup, authority: str,
        opened: Deferred[AgentGrpcLink],
    ) -> None:
        super().__init__(
            reactor=setup.reactor,
            max_frame_size=setup.max_frame_size,
            stream_window=options.stream_window,
            connection_window=options.connection_window,
            heartbeat_interval=options.heartbeat_interval,
            heartbeat_timeout=options.heartbeat_timeout,
            codec=setup.codec,
        )
        self.options = options
        self.setup = setup
        self.authority = authority.encode("ascii", "replace")
        self._forward_headers = self._request_headers(FORWARD_PATH) + _REUSE
        self.opened: Deferred[AgentGrpcLink] | None = opened
        self.idle: dict[int, _Call] = {}
        self.target = options.min_idle_forwards
        self.welcomed = False
        self.draining = False
        self._last_dry = setup.reactor.seconds()
        self._pool_timer: Any = None

    def local_settings(self) -> dict[SettingCodes | int, int]:
        settings = super().local_settings()
        settings[SettingCodes.ENABLE_PUSH] = 0
        return settings

    def _request_headers(self, path: bytes) -> tuple[tuple[bytes, bytes], ...]:
        return (
            (b":method", b"POST"),
            (b":scheme", b"https" if self.options.tls else b"http"),
            (b":path", path),
            (b":authority", self.authority),
            (b"content-type", GRPC_CONTENT_TYPE),
            (b"te", b"trailers"),
            (b"user-agent", b"tunneld-agent grpc/h2"),
        )

    def connection_started(self) -> None:
        sid = self.conn.get_next_available_stream_id()
        call = _Call(sid, "control")
        self.calls[sid] = call
        self.control = call
        self.send_headers(call, self._request_headers(CONTROL_PATH), False)
        self._pool_timer = self.reactor.callLater(self.options.pool_shrink_interval, self._tend_pool)

    def stop_timers(self) -> None:
        if self._pool_timer is not None and self._pool_timer.active():
            self._pool_timer.cancel()
        self._pool_timer = None

    def wire_lost(self, reason: Reason, message: str) -> None:
        opened, self.opened = self.opened, None
        if opened is not None and not opened.called:
            opened.errback(Failure(ConnectionError(f"gRPC link failed: {reason.value}: {message}")))
        super().wire_lost(reason, message)

    def _on_settings_changed(self, event: h2events.RemoteSettingsChanged) -> None:
        super()._on_settings_changed(event)
        opened, self.opened = self.opened, None
        if opened is not None:
            opened.callback(self)

    # -- the pool of idle Forward calls ----------------------------------------------

    def _open_forward(self) -> bool:
        conn = self.conn
        if conn.open_outbound_streams >= conn.remote_settings.max_concurrent_streams:
            return False
        try:
            sid = conn.get_next_available_stream_id()
        except H2ProtocolError:
            return False
        call = _Call(sid, "forward")
        call.headers_sent = True
        self.calls[sid] = call
        self.idle[sid] = call
        self.send_headers(call, self._forward_headers, False)
        return True

    def top_up(self) -> None:
        """Open idle Forward calls until the pool has its target size."""
        if self.closed or not self.welcomed or self.draining:
            return
        while len(self.idle) < self.target:
            if not self._open_forward():
                break
        self.flush()

    def _tend_pool(self) -> None:
        """
        Every C{pool_shrink_interval}: halve a target the edge has not needed
        lately, retire the calls beyond it, and replace calls lost since (a
        backstop: the edge can ask for calls only in a call's first headers,
        so a pool that emptied without Opens would otherwise stay empty).
        """
        self._pool_timer = None
        if self.closed:
            return
        now = self.reactor.seconds()
        interval = self.options.pool_shrink_interval
        if now - self._last_dry >= interval and self.target > self.options.min_idle_forwards:
            self.target = max(self.options.min_idle_forwards, self.target // 2)
        while len(self.idle) > self.target:
            sid = next(reversed(self.idle))
            call = self.idle.pop(sid)
            call.retiring = True
            self.end_request(call)
        self.top_up()
        self._pool_timer = self.reactor.callLater(interval, self._tend_pool)

    def _lost_idle(self, call: _Call, replace: bool) -> None:
        """
        An idle call ended without carrying an Open: replace it now if it
        ended cleanly (C{replace}); after an error the next L{_tend_pool}
        does, so that an edge refusing every call is not asked in a loop.
        """
        if self.idle.pop(call.stream_id, None) is not None and replace and not call.retiring:
            self.top_up()

    def _ran_dry(self) -> None:
        """The edge used its last idle call: grow the pool (up to max_idle_forwards)."""
        self._last_dry = self.reactor.seconds()
        self.target = min(self.options.max_idle_forwards, self.target * 2)

    def _took_idle(self, call: _Call) -> None:
        self.idle.pop(call.stream_id, None)
        if call.reuse:
            # Reused calls come back to the pool when their stream ends, so
            # new ones are opened only when the pool runs low; and the edge
            # says it ran dry only in a call's first response headers.
            if not self.idle:
                self._ran_dry()
            if len(self.idle) >= max(1, self.target // 2):
                return
        self.top_up()

    # -- responses from the edge ----------------------------------------------------

    def _on_response(self, event: h2events.ResponseReceived) -> None:
        call = self.calls.get(event.stream_id)
        if call is None:
            return
        headers = dict(event.headers)
        status = headers.get(b":status")
        if status != b"200" or not headers.get(b"content-type", b"").startswith(GRPC_CONTENT_TYPE):
            what = f"HTTP {status.decode('ascii', 'replace') if status else '?'}"
            if call.kind == "control":
                self.protocol_error(f"the edge answered Control with {what}")
            else:
                self._call_ended(call, GrpcStatus.UNKNOWN, what.encode())
            return
        if b"grpc-status" in headers:
            self._trailers(call, headers)
            return
        if call.kind == "forward":
            call.reuse = headers.get(REUSE_HEADER) == b"1"
            if headers.get(IDLE_HEADER) == b"0":
                self._ran_dry()

    def _on_trailers(self, event: h2events.TrailersReceived) -> None:
        call = self.calls.get(event.stream_id)
        if call is not None:
            self._trailers(call, dict(event.headers))

    def _trailers(self, call: _Call, headers: dict[bytes, bytes]) -> None:
        try:
            status = int(headers.get(b"grpc-status", b"2"))
        except ValueError:
            status = GrpcStatus.UNKNOWN
        self._call_ended(call, status, headers.get(b"grpc-message", b""))

    def _call_ended(self, call: _Call, status: int, message: bytes) -> None:
        """The edge finished a call (trailers, possibly trailers-only)."""
        if call.kind == "control":
            if status == GrpcStatus.OK:
                reason, text = Reason.AGENT_GONE, "the edge ended the Control call"
            else:
                reason, text = reason_from_status(status, message)
            self.log.info(
                "edge {peer} ended the link: {reason}: {message}",
                peer=self.peer, reason=reason.value, message=text,
            )
            self.close(reason, text)
            return
        self._lost_idle(call, replace=status == GrpcStatus.OK)
        stream = call.stream
        if stream is not None and not stream.closed:
            if status == GrpcStatus.OK:
                stream.remote_reset(Reason.PROTOCOL_ERROR, "the edge ended the call without End")
            else:
                stream.remote_reset(*reason_from_status(status, message))
        elif stream is None and status != GrpcStatus.OK and not call.retiring:
            reason, text = reason_from_status(status, message)
            self.log.warn(
                "edge {peer} refused a Forward call: {reason}: {message}",
                peer=self.peer, reason=reason.value, message=text,
            )
        if not call.local_closed:
            call.drop_outbox()
            self.end_request(call)

    def _on_stream_ended(self, event: h2events.StreamEnded) -> None:
        call = self.calls.get(event.stream_id)
        if call is None:
            return
        call.remote_closed = True
        if not call.local_closed:
            call.drop_outbox()
            self.end_request(call)
        self.maybe_forget_call(call)

    def call_reset(self, call: _Call, code: int) -> None:
        self._lost_idle(call, replace=False)
        if call.kind == "control":
            self._lost_reason = (Reason.AGENT_GONE, "the edge reset the Control call")
            self.close(Reason.AGENT_GONE, "the edge reset the Control call")
            return
        super().call_reset(call, code)

    # -- messages ------------------------------------------------------------------

    def control_message(self, message: ControlMessage) -> None:
        if isinstance(message, Welcome) and not self.welcomed:
            self.welcomed = True
            super().control_message(message)
            self.top_up()
            return
        if isinstance(message, GoAway):
            self.draining = True
        super().control_message(message)

    def forward_data(self, call: _Call, data: bytes | memoryview) -> None:
        stream = call.stream
        if stream is None:
            if call.retiring:
                return  # the edge replays the stream elsewhere
            raise FrameError("data on a Forward call before Open")
        if stream.closed:
            return
        if stream.remote_ended:
            raise FrameError("a message after End")
        stream.deliver("data_received", data)

    def forward_frame(self, call: _Call, frame: tuple[int, int, Any, bool]) -> None:
        stream = call.stream
        _, kind, body, end_stream = frame
        if stream is None:
            if call.retiring:
                return  # the edge replays it elsewhere
            if kind == codec.RESET and call.reuse:
                # The edge reset the last stream as it ended here (they
                # crossed): nothing to reset, but a Reset ends the call.
                self._lost_idle(call, replace=True)
                call.retiring = True
                self.end_request(call)
                return
            if kind != codec.OPEN:
                raise FrameError(f"{codec.KIND_NAMES[kind]} on a Forward call before Open")
            head = body
            stream = GrpcStream(self, head, call)
            call.stream = stream
            self.streams[call.stream_id] = stream
            self._took_idle(call)
            if self.handler is None:
                stream.reset(Reason.AGENT_UNAVAILABLE, "agent is not ready")
                return
            if end_stream:
                # A request without a body: the receiver hears the end as it
                # attaches, before it starts on the request.
                stream.remote_end(())
            self.handler.stream_opened(stream)
            return
        if stream.closed:
            return
        if kind == codec.RESET:
            # Also after End: the edge's client may go away mid-response.
            reason, message = body
            stream.remote_reset(reason, message)
            call.drop_outbox()
            self.end_request(call)
            return
        if stream.remote_ended:
            raise FrameError("a message after End")
        if kind == codec.DATA:
            stream.deliver("data_received", body)
            if end_stream and not stream.closed:
                self._remote_end(call, stream, ())
        elif kind == codec.END:
            self._remote_end(call, stream, body)
        else:
            raise FrameError(f"the edge may not send {codec.KIND_NAMES[kind]} on a Forward call")

    def forward_end(self, call: _Call, trailers: Headers) -> None:
        stream = call.stream
        if stream is None:
            if call.retiring:
                return  # the edge replays it elsewhere
            raise FrameError("end on a Forward call before Open")
        if stream.closed:
            return
        if stream.remote_ended:
            raise FrameError("a message after End")
        self._remote_end(call, stream, trailers)

    def _remote_end(self, call: _Call, stream: GrpcStream, trailers: Headers) -> None:
        stream.remote_end(trailers)
        if call.reuse and stream.local_ended:
            self._stream_done(call, stream)

    def refuse_call(self, call: _Call, status: GrpcStatus, message: str) -> None:
        self._lost_idle(call, replace=True)
        self.rst(call, ErrorCodes.PROTOCOL_ERROR)

    def stream_local_end(self, stream: GrpcStream) -> None:
        call = stream.call
        if call is not None and not call.reuse:
            self.end_request(call)
        stream.maybe_done()
        if call is not None and call.reuse and stream.remote_ended:
            self._stream_done(call, stream)

    def _stream_done(self, call: _Call, stream: GrpcStream) -> None:
        """End both ways on a reusable call: it goes back to the pool (or is half-closed)."""
        if self.release(call, stream):
            self.idle[call.stream_id] = call
        else:
            self.end_request(call)

    def stream_local_reset(self, stream: GrpcStream, reason: Reason, message: str) -> None:
        call = stream.call
        if call is None:
            return
        if call.reuse and stream.local_ended:
            # After our End the edge may count the stream done and have put
            # the next one's Open on this call already: a Reset message
            # would read as that stream's.  RST_STREAM is unambiguous (the
            # edge replays an Open not yet answered).
            self.rst(call, rst_code(reason))
            return
        if self.send_reset(call, reason, message):
            self.end_request(call)


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


@implementer(IOpenSSLClientConnectionCreator)
class _OfferingH2:
    """
    A client TLS connection creator whose connections offer ALPN C{h2}.

    Twisted before 26.4 applies a factory's C{acceptableProtocols} to the
    context after the connection is made from it, which OpenSSL ignores: the
    agent then offered no ALPN, and the edge negotiated none.  Setting it on
    each connection (pyOpenSSL's public C{set_alpn_protos}) works on every
    Twisted in range.
    """

    def __init__(self, creator: IOpenSSLClientConnectionCreator) -> None:
        self._creator = creator

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Any:  # noqa: N802, N803
        connection = self._creator.clientConnectionForTLS(tlsProtocol)
        connection.set_alpn_protos([b"h2"])
        return connection


@implementer(IProtocolNegotiationFactory)
class AgentGrpcFactory(Factory):
    """Makes the one L{AgentGrpcLink} of a dial; offers ALPN C{h2}."""

    noisy = False  # the agent logs each dial itself

    def __init__(
        self, options: GrpcAgentOptions, setup: AgentLinkSetup, authority: str,
        opened: Deferred[AgentGrpcLink],
    ) -> None:
        self.options = options
        self.setup = setup
        self.authority = authority
        self.opened = opened

    def acceptableProtocols(self) -> list[bytes]:  # noqa: N802
        """IProtocolNegotiationFactory.acceptableProtocols"""
        return [b"h2"]

    def buildProtocol(self, addr: Any) -> AgentGrpcLink:  # noqa: N802
        link = AgentGrpcLink(self.options, self.setup, self.authority, self.opened)
        link.factory = self
        return link


def _endpoint_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


@implementer(ITransportPlugin)
class GrpcTransport:
    """The C{grpc} transport plugin."""

    name = "grpc"

    def edge_options(self, table: Any, where: str) -> GrpcEdgeOptions:
        """ITransportPlugin.edge_options"""
        return parse_table(GrpcEdgeOptions, table, where, "transports.grpc")

    def agent_options(self, table: Any, where: str) -> GrpcAgentOptions:
        """ITransportPlugin.agent_options"""
        options = parse_table(GrpcAgentOptions, table, where, "transports.grpc")
        if split_address(options.address) is None:
            raise ConfigError(
                where, "transports.grpc.address", f"expected host:port, got {options.address!r}"
            )
        if options.min_idle_forwards > options.max_idle_forwards:
            raise ConfigError(
                where, "transports.grpc.min_idle_forwards",
                f"must not exceed max_idle_forwards ({options.max_idle_forwards}), "
                f"got {options.min_idle_forwards}",
            )
        return options

    def edge_service(self, options: object, setup: EdgeLinkSetup) -> IService:
        """ITransportPlugin.edge_service"""
        assert isinstance(options, GrpcEdgeOptions), options
        factory: Any = EdgeGrpcFactory(options, setup)
        if setup.tls is not None:
            factory = TLSMemoryBIOFactory(setup.tls, False, factory)
        service = ListeningService(setup.reactor, options.listen, factory, "grpc agent link")
        service.setName("transport:grpc")
        return service

    def connect(self, options: object, setup: AgentLinkSetup) -> Deferred[IAgentLink]:
        """ITransportPlugin.connect: fires once HTTP/2 is up and Control is open."""
        assert isinstance(options, GrpcAgentOptions), options
        address = split_address(options.address)
        if address is None:
            raise ValueError(f"bad gRPC address {options.address!r}")
        host, port = address
        timeout = max(1, int(options.connect_timeout + 0.999))
        endpoint: Any
        if setup.proxy is not None:
            endpoint = ProxyConnectEndpoint(setup.reactor, setup.proxy, host, port, timeout)
        else:
            endpoint = clientFromString(
                setup.reactor, f"tcp:host={_endpoint_escape(host)}:port={port}:timeout={timeout}"
            )
        if options.tls:
            from twisted.internet.ssl import optionsForClientTLS

            creator = setup.tls_for(host) if setup.tls_for else optionsForClientTLS(host)
            endpoint = wrapClientTLS(_OfferingH2(creator), endpoint)
        opened: Deferred[AgentGrpcLink] = Deferred()
        factory = AgentGrpcFactory(options, setup, options.address, opened)
        connected: list[Any] = []

        def too_slow() -> None:
            if not opened.called:
                opened.errback(
                    Failure(TimeoutError(f"no HTTP/2 connection to {options.address} in time"))
                )
                for protocol in connected:
                    if protocol.transport is not None:
                        protocol.transport.abortConnection()

        timer = setup.reactor.callLater(options.connect_timeout, too_slow)

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        opened.addBoth(done)

        def failed(failure: Failure) -> None:
            if not opened.called:
                opened.errback(failure)

        connecting = endpoint.connect(factory)
        connecting.addCallbacks(connected.append, failed)
        return cast("Deferred[IAgentLink]", opened)  # it fires with an AgentGrpcLink
