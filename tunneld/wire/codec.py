# -*- test-case-name: tests.test_codec -*-
"""
The protobuf form of the tunnel protocol (C{proto/tunnel.proto}).

Frame transports send one encoded C{Frame} per message; the gRPC transport
sends the same C{Frame} messages inside gRPC framing.  Data frames are the hot
path, so L{encode_data} writes their few bytes of protobuf by hand instead of
building message objects.
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.message import DecodeError

from tunneld.reasons import Reason
from tunneld.wire import tunnel_pb2 as pb
from tunneld.wire.messages import (
    ControlMessage,
    GoAway,
    Headers,
    Health,
    Hello,
    Refusal,
    ReplyHead,
    StreamHead,
    TunnelSpec,
    Welcome,
)

Frame = pb.Frame


class FrameError(Exception):
    """A frame could not be decoded or does not belong where it arrived."""


def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def data_frame_head(stream_id: int, size: int) -> bytes:
    """
    The bytes of C{Frame(stream_id=stream_id, data=Data(data=...))} that come
    before a payload of C{size} bytes: transports can then send the payload
    without copying it into a message.
    """
    inner = b"\x0a" + _varint(size) if size else b""
    head = b"\x08" + _varint(stream_id) if stream_id else b""
    return b"".join((head, b"\x32", _varint(len(inner) + size), inner))


def encode_data(stream_id: int, data: bytes) -> bytes:
    """
    C{Frame(stream_id=stream_id, data=Data(data=data))}, serialised without
    allocating protobuf objects (identical bytes to the generated encoder).
    """
    return data_frame_head(stream_id, len(data)) + data


def decode(payload: bytes) -> pb.Frame:
    """Parse one frame; a malformed one raises L{FrameError} saying why."""
    frame = pb.Frame()
    try:
        frame.ParseFromString(payload)
    except DecodeError as e:
        raise FrameError(f"undecodable frame ({len(payload)} bytes): {e}") from e
    if frame.WhichOneof("body") is None:
        raise FrameError(f"frame without a body ({len(payload)} bytes)")
    return frame


def _headers_to_pb(headers: Headers) -> list[pb.Header]:
    return [pb.Header(name=name, value=value) for name, value in headers]


def _headers_from_pb(headers: Iterable[pb.Header]) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((h.name, h.value) for h in headers)


def _spec_to_pb(spec: TunnelSpec) -> pb.TunnelSpec:
    return pb.TunnelSpec(
        hostname=spec.hostname,
        path_prefix=spec.path_prefix,
        protocol=spec.protocol,
        port=spec.port,
    )


def _spec_from_pb(spec: pb.TunnelSpec) -> TunnelSpec:
    return TunnelSpec(
        hostname=spec.hostname,
        path_prefix=spec.path_prefix,
        protocol=spec.protocol or "http",
        port=spec.port,
    )


def encode_open(stream_id: int, head: StreamHead) -> pb.Frame:
    """The frame that opens a stream."""
    return pb.Frame(
        stream_id=stream_id,
        open=pb.Open(
            kind=head.kind,
            tunnel=head.tunnel,
            method=head.method,
            target=head.target,
            headers=_headers_to_pb(head.headers),
            peer=head.peer,
            scheme=head.scheme,
        ),
    )


def head_from(frame: pb.Frame) -> StreamHead:
    """The stream head carried by an C{Open} frame."""
    o = frame.open
    if o.kind not in ("http", "upgrade", "tcp"):
        raise FrameError(f"open frame with unknown stream kind {o.kind!r}")
    return StreamHead(
        kind=o.kind,
        tunnel=o.tunnel,
        method=o.method,
        target=o.target,
        headers=_headers_from_pb(o.headers),
        peer=o.peer,
        scheme=o.scheme or "http",
    )


def encode_reply(stream_id: int, reply: ReplyHead) -> pb.Frame:
    """The frame carrying a response head."""
    return pb.Frame(
        stream_id=stream_id,
        reply=pb.Reply(
            status=reply.status, reason=reply.reason, headers=_headers_to_pb(reply.headers)
        ),
    )


def reply_from(frame: pb.Frame) -> ReplyHead:
    """The response head carried by a C{Reply} frame."""
    r = frame.reply
    if not 100 <= r.status <= 999:
        raise FrameError(f"reply frame with impossible status {r.status}")
    return ReplyHead(status=r.status, reason=r.reason, headers=_headers_from_pb(r.headers))


def encode_end(stream_id: int, trailers: Headers = ()) -> pb.Frame:
    """The frame that finishes one direction of a stream."""
    return pb.Frame(stream_id=stream_id, end=pb.End(trailers=_headers_to_pb(trailers)))


def trailers_from(frame: pb.Frame) -> tuple[tuple[bytes, bytes], ...]:
    """The trailers carried by an C{End} frame."""
    return _headers_from_pb(frame.end.trailers)


def encode_reset(stream_id: int, reason: Reason, message: str) -> pb.Frame:
    """The frame that resets a stream."""
    return pb.Frame(
        stream_id=stream_id, reset=pb.Reset(reason=reason.wire_code, message=message)  # type: ignore[arg-type]
    )


def reset_from(frame: pb.Frame) -> tuple[Reason, str]:
    """The reason and message carried by a C{Reset} frame."""
    return Reason.from_wire(frame.reset.reason), frame.reset.message


def encode_window(stream_id: int, increment: int) -> pb.Frame:
    """The frame granting C{increment} more bytes of credit on a stream."""
    return pb.Frame(stream_id=stream_id, window=pb.Window(increment=increment))


def encode_ping(opaque: int, pong: bool = False) -> pb.Frame:
    """A heartbeat ping, or the pong answering one."""
    if pong:
        return pb.Frame(pong=pb.Ping(opaque=opaque))
    return pb.Frame(ping=pb.Ping(opaque=opaque))


def encode_control(message: ControlMessage) -> pb.Frame:
    """The link-level frame for a control message."""
    if isinstance(message, Hello):
        return pb.Frame(
            hello=pb.Hello(
                version=message.version,
                agent_id=message.agent_id,
                token=message.token,
                tunnels=[_spec_to_pb(t) for t in message.tunnels],
                software=message.software,
                initial_window=message.initial_window,
            )
        )
    if isinstance(message, Welcome):
        return pb.Frame(
            welcome=pb.Welcome(
                version=message.version,
                session_id=message.session_id,
                public_urls=list(message.public_urls),
                refused=[
                    pb.Refusal(
                        tunnel=_spec_to_pb(r.tunnel),
                        reason=r.reason.wire_code,  # type: ignore[arg-type]
                        message=r.message,
                    )
                    for r in message.refused
                ],
                initial_window=message.initial_window,
                heartbeat_ms=message.heartbeat_ms,
            )
        )
    if isinstance(message, Health):
        return pb.Frame(
            health=pb.Health(tunnel=message.tunnel, healthy=message.healthy, detail=message.detail)
        )
    return pb.Frame(
        goaway=pb.GoAway(reason=message.reason.wire_code, message=message.message)  # type: ignore[arg-type]
    )


def control_from(frame: pb.Frame) -> ControlMessage:
    """The control message carried by a hello, welcome, goaway or health frame."""
    kind = frame.WhichOneof("body")
    if kind == "hello":
        h = frame.hello
        return Hello(
            agent_id=h.agent_id,
            tunnels=tuple(_spec_from_pb(t) for t in h.tunnels),
            token=h.token,
            version=h.version,
            software=h.software,
            initial_window=h.initial_window,
        )
    if kind == "welcome":
        w = frame.welcome
        return Welcome(
            session_id=w.session_id,
            public_urls=tuple(w.public_urls),
            refused=tuple(
                Refusal(_spec_from_pb(r.tunnel), Reason.from_wire(r.reason), r.message)
                for r in w.refused
            ),
            version=w.version,
            initial_window=w.initial_window,
            heartbeat_ms=w.heartbeat_ms,
        )
    if kind == "goaway":
        return GoAway(Reason.from_wire(frame.goaway.reason), frame.goaway.message)
    if kind == "health":
        return Health(frame.health.tunnel, frame.health.healthy, frame.health.detail)
    raise FrameError(f"{kind} is not a control frame")
