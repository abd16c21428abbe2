# -*- test-case-name: tests.test_codec -*-
"""
The protobuf form of the tunnel protocol (C{proto/tunnel.proto}).

Frame transports send one encoded C{Frame} per message; the gRPC transport
sends the same C{Frame} messages inside gRPC framing.  Every request crosses
the link as Open, Reply and Data frames, and End frames or C{end_stream}
flags (version 2), so those, Reset and Window frames are written by hand in
the protobuf wire format (L{encode_data}, L{open_bytes}, L{reply_bytes},
L{end_bytes}, L{reset_bytes}, L{window_bytes}: the same bytes as the
generated encoder).  L{read} reads the same frames by hand when they are
laid out the way every encoder lays them out; anything else (control
frames, unknown fields, odd layouts, invalid text) goes to the generated
C{tunnel_pb2}, so odd but valid input means the same and bad input fails the
same way.  No protobuf message is made per request: besides its CPU, the
upb runtime trims the heap every ~10,000 message-arena frees (see
L{tunneld.speedups.heap}), which a bulk transfer then faults back in.  The
C{encode_*} functions build C{Frame} messages for control frames and tests.
"""

from __future__ import annotations

from collections.abc import Iterable
from sys import intern
from typing import Any

from google.protobuf.message import DecodeError

from tunneld.model.messages import (
    STREAM_KINDS,
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
from tunneld.model.reasons import Reason
from tunneld.speedups.memo import Bounded
from tunneld.wire import tunnel_pb2 as pb

Frame = pb.Frame

# What L{read} takes: a frame's bytes, or a view of them it copies out of.
Buffer = bytes | bytearray | memoryview


class FrameError(Exception):
    """A frame could not be decoded or does not belong where it arrived."""


# The one-byte varints, which are nearly all the lengths and tags we write.
_SMALL = [bytes((i,)) for i in range(0x80)]


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL[value]
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


# What follows the payload in a Data frame with end_stream (field 2, true).
_END_STREAM_TAIL = b"\x10\x01"


def last_data_frame_parts(stream_id: int, size: int) -> tuple[bytes, bytes]:
    """
    The bytes before and after a payload of C{size} bytes in C{Frame(stream_id=
    stream_id, data=Data(data=..., end_stream=True))}: as L{data_frame_head},
    for a stream's last Data.
    """
    field = b"\x0a" + _varint(size) if size else b""
    head = b"\x08" + _varint(stream_id) if stream_id else b""
    return b"".join((head, b"\x32", _varint(len(field) + size + 2), field)), _END_STREAM_TAIL


def encode_data(stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> bytes:
    """
    C{Frame(stream_id=stream_id, data=Data(data=data, end_stream=end_stream))},
    serialised without allocating protobuf objects (identical bytes to the
    generated encoder).
    """
    if not end_stream:
        return data_frame_head(stream_id, len(data)) + data
    head, tail = last_data_frame_parts(stream_id, len(data))
    return b"".join((head, data, tail))


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


# Header names repeat from stream to stream: decoded heads share one bytes
# object per name (Codec.names, at most _MAX_NAMES) instead of holding their
# own, which is a tenth of what an agent keeps per idle WebSocket.
_MAX_NAMES = 512


def _headers_from_pb(
    headers: Iterable[pb.Header], names: Bounded[bytes, bytes]
) -> tuple[tuple[bytes, bytes], ...]:
    known = names.get
    learn = names.keep
    return tuple([(known(h.name) or learn(h.name, h.name), h.value) for h in headers])


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


def encode_open(stream_id: int, head: StreamHead, end_stream: bool = False) -> pb.Frame:
    """The frame that opens a stream (with C{end_stream}: a request without a body)."""
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
            end_stream=end_stream,
        ),
    )


def _head_from(frame: pb.Frame, names: Bounded[bytes, bytes]) -> StreamHead:
    """The stream head carried by an C{Open} frame."""
    o = frame.open
    if o.kind not in STREAM_KINDS:
        raise FrameError(f"open frame with unknown stream kind {o.kind!r}")
    return StreamHead(
        kind=intern(o.kind),
        tunnel=intern(o.tunnel),
        method=intern(o.method),
        target=o.target,
        headers=_headers_from_pb(o.headers, names),
        peer=o.peer,
        scheme=intern(o.scheme or "http"),
    )


def encode_reply(stream_id: int, reply: ReplyHead, end_stream: bool = False) -> pb.Frame:
    """The frame carrying a response head (with C{end_stream}: a response without a body)."""
    return pb.Frame(
        stream_id=stream_id,
        reply=pb.Reply(
            status=reply.status,
            reason=reply.reason,
            headers=_headers_to_pb(reply.headers),
            end_stream=end_stream,
        ),
    )


def _reply_from(frame: pb.Frame, names: Bounded[bytes, bytes]) -> ReplyHead:
    """The response head carried by a C{Reply} frame."""
    r = frame.reply
    if not 100 <= r.status <= 999:
        raise FrameError(f"reply frame with impossible status {r.status}")
    return ReplyHead(status=r.status, reason=r.reason, headers=_headers_from_pb(r.headers, names))


def encode_end(stream_id: int, trailers: Headers = ()) -> pb.Frame:
    """The frame that finishes one direction of a stream."""
    return pb.Frame(stream_id=stream_id, end=pb.End(trailers=_headers_to_pb(trailers)))


def _trailers_from(frame: pb.Frame, names: Bounded[bytes, bytes]) -> tuple[tuple[bytes, bytes], ...]:
    """The trailers carried by an C{End} frame."""
    return _headers_from_pb(frame.end.trailers, names)


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
                max_frame_size=message.max_frame_size,
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
                max_frame_size=message.max_frame_size,
            )
        )
    if isinstance(message, Health):
        return pb.Frame(
            health=pb.Health(tunnel=message.tunnel, healthy=message.healthy, detail=message.detail)
        )
    return pb.Frame(
        goaway=pb.GoAway(
            reason=message.reason.wire_code,  # type: ignore[arg-type]
            message=message.message,
            reconnect_to=message.reconnect_to,
        )
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
            max_frame_size=h.max_frame_size,
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
            max_frame_size=w.max_frame_size,
        )
    if kind == "goaway":
        return GoAway(
            Reason.from_wire(frame.goaway.reason), frame.goaway.message, frame.goaway.reconnect_to
        )
    if kind == "health":
        return Health(frame.health.tunnel, frame.health.healthy, frame.health.detail)
    raise FrameError(f"{kind} is not a control frame")


# -- the hot frames by hand ----------------------------------------------------
#
# Field numbers of Frame's body oneof: L{read} names a frame's kind by them.
HELLO, WELCOME, OPEN, REPLY, DATA, END, RESET, WINDOW, PING, PONG, GOAWAY, HEALTH = range(2, 14)

KIND_NAMES = {
    number: name
    for number, name in enumerate(
        ("hello", "welcome", "open", "reply", "data", "end", "reset", "window", "ping", "pong",
         "goaway", "health"),
        start=2,
    )
}
_KIND_NUMBERS = {name: number for number, name in KIND_NAMES.items()}


# How many of each kind of encoded or decoded part a Codec remembers.
_CACHED = 512


def _header_fields(codec: Codec, tag: bytes, headers: Headers) -> list[bytes]:
    """Each header as a length-delimited C{Header} message under C{tag}."""
    small = _SMALL
    cache = codec.fields[tag]
    out = []
    for header in headers:
        try:
            field = cache.get(header)
        except TypeError:  # unhashable (a list, bytearrays): not cached
            field = None
            hashable = False
        else:
            if field is not None:
                out.append(field)
                continue
            hashable = True
        name, value = header
        n = len(name)
        v = len(value)
        if n and v and n + v < 0x7C:
            field = b"".join((tag, small[n + v + 4], b"\x0a", small[n], name, b"\x12", small[v],
                              value))
            if hashable:
                cache.keep(header, field)
            out.append(field)
            continue
        inner = b"".join(
            (
                b"\x0a" + _varint(n) + name if n else b"",
                b"\x12" + _varint(v) + value if v else b"",
            )
        )
        out.append(tag + _varint(len(inner)) + inner)
    return out


def _text_field(tag: bytes, text: str) -> bytes:
    if not text:
        return b""
    raw = text.encode("utf-8")
    return tag + _varint(len(raw)) + raw


def _frame(stream_id: int, tag: bytes, body: bytes) -> bytes:
    size = len(body)
    if stream_id:
        return b"".join(
            (b"\x08", _varint(stream_id), tag, _SMALL[size] if size < 0x80 else _varint(size), body)
        )
    return b"".join((tag, _SMALL[size] if size < 0x80 else _varint(size), body))


def _open_bytes(codec: Codec, stream_id: int, head: StreamHead, end_stream: bool = False) -> bytes:
    """L{encode_open}, serialised by hand (identical bytes)."""
    key = (head.kind, head.tunnel, head.method)
    start = codec.open_starts.get(key)
    if start is None:
        start = codec.open_starts.keep(key, b"".join(map(_text_field, (b"\x0a", b"\x12", b"\x1a"), key)))
    end_key = (head.peer, head.scheme)
    end = codec.open_ends.get(end_key)
    if end is None:
        end = codec.open_ends.keep(end_key, b"".join(map(_text_field, (b"\x32", b"\x3a"), end_key)))
    body = b"".join(
        (
            start,
            _text_field(b"\x22", head.target),
            *_header_fields(codec, b"\x2a", head.headers),
            end,
            b"\x40\x01" if end_stream else b"",
        )
    )
    return _frame(stream_id, b"\x22", body)


def _reply_bytes(codec: Codec, stream_id: int, reply: ReplyHead, end_stream: bool = False) -> bytes:
    """L{encode_reply}, serialised by hand (identical bytes)."""
    status = reply.status
    reason = reply.reason
    body = b"".join(
        (
            b"\x08" + _varint(status) if status else b"",
            b"\x12" + _varint(len(reason)) + reason if reason else b"",
            *_header_fields(codec, b"\x1a", reply.headers),
            b"\x20\x01" if end_stream else b"",
        )
    )
    return _frame(stream_id, b"\x2a", body)


def _end_bytes(codec: Codec, stream_id: int, trailers: Headers = ()) -> bytes:
    """L{encode_end}, serialised by hand (identical bytes)."""
    if not trailers:
        if stream_id:
            return b"\x08" + _varint(stream_id) + b"\x3a\x00"
        return b"\x3a\x00"
    return _frame(stream_id, b"\x3a", b"".join(_header_fields(codec, b"\x0a", trailers)))


def window_bytes(stream_id: int, increment: int) -> bytes:
    """L{encode_window}, serialised by hand (identical bytes)."""
    return _frame(stream_id, b"\x4a", b"\x08" + _varint(increment) if increment else b"")


def reset_bytes(stream_id: int, reason: Reason, message: str) -> bytes:
    """L{encode_reset}, serialised by hand (identical bytes)."""
    code = reason.wire_code
    return _frame(
        stream_id, b"\x42", (b"\x08" + _varint(code) if code else b"") + _text_field(b"\x12", message)
    )


class _Irregular(Exception):
    """The frame is not laid out as L{read} expects: let the generated parser decide."""


def _part_of(buf: Buffer, start: int, stop: int) -> bytes | memoryview:
    """C{buf[start:stop]}: C{bytes} from C{bytes}, else a view of C{buf} (not copied)."""
    if type(buf) is bytes:
        return buf[start:stop]
    return memoryview(buf)[start:stop]


def _varint_at(buf: Buffer, pos: int) -> tuple[int, int]:
    """A varint of at most 32 bits at C{pos} and the position after it."""
    value = 0
    shift = 0
    end = len(buf)
    while pos < end and shift < 35:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if value > 0xFFFFFFFF:
                raise _Irregular
            return value, pos
        shift += 7
    raise _Irregular


def _length_at(buf: Buffer, pos: int, end: int) -> tuple[int, int]:
    """The length prefix at C{pos}: (position after the field, position of its contents)."""
    if pos >= end:
        raise _Irregular
    size = buf[pos]
    if size < 0x80:
        start = pos + 1
    else:
        size, start = _varint_at(buf, pos)
    stop = start + size
    if stop > end:
        raise _Irregular
    return stop, start


def _header_at(buf: bytes, start: int, stop: int) -> tuple[bytes, bytes]:
    """The C{Header} message in C{buf[start:stop]}."""
    name = value = b""
    pos = start
    while pos < stop:
        tag = buf[pos]
        after, first = _length_at(buf, pos + 1, stop)
        if tag == 0x0A:
            name = buf[first:after]
        elif tag == 0x12:
            value = buf[first:after]
        else:
            raise _Irregular
        pos = after
    return name, value


def _headers_in(
    codec: Codec, buf: bytes, pos: int, end: int, tag: int, headers: list[tuple[bytes, bytes]]
) -> int:
    """
    Append the C{Header} messages under C{tag} from C{pos} on to C{headers}
    (names shared as L{_headers_from_pb} shares them); the position of the
    first other field (or C{end}).
    """
    known = codec.names.get
    learn = codec.names.keep
    while pos < end and buf[pos] == tag:
        size = buf[pos + 1]
        if size < 0x80:
            first = pos + 2
        else:
            size, first = _varint_at(buf, pos + 1)
        after = first + size
        if after > end:
            raise _Irregular
        # The usual layout, name then value, both shorter than 128 bytes.
        mid = first + 2 + buf[first + 1]
        if (
            buf[first] == 0x0A
            and buf[first + 1] < 0x80
            and mid + 2 + buf[mid + 1] == after
            and buf[mid] == 0x12
            and buf[mid + 1] < 0x80
        ):
            name = buf[first + 2 : mid]
            headers.append((known(name) or learn(name, name), buf[mid + 2 : after]))
        else:
            name, value = _header_at(buf, first, after)
            headers.append((known(name) or learn(name, name), value))
        pos = after
    return pos


def _text_at(buf: bytes, pos: int, end: int) -> tuple[int, str]:
    """The position after the string field whose length is at C{pos}, and its text."""
    stop, first = _length_at(buf, pos, end)
    try:
        return stop, buf[first:stop].decode()
    except UnicodeDecodeError:
        raise _Irregular from None  # the generated parser says why


_HTTP_KINDS = STREAM_KINDS


def _texts_at(buf: bytes, pos: int, end: int, tags: tuple[int, ...], texts: list[str]) -> int:
    """
    Append the string fields C{tags} from C{pos} on to C{texts} ("" for each
    one absent); the position after them.
    """
    for tag in tags:
        if pos < end and buf[pos] == tag:
            pos, first = _length_at(buf, pos + 1, end)
            try:
                texts.append(buf[first:pos].decode())
            except UnicodeDecodeError:
                raise _Irregular from None  # the generated parser says why
        else:
            texts.append("")
    return pos


def _open_at(codec: Codec, buf: bytes, pos: int, end: int) -> tuple[StreamHead, bool]:
    """The C{Open} message in C{buf[pos:end]}: its fields in order, each at most once."""
    texts: list[str] = []
    headers: list[tuple[bytes, bytes]] = []
    pos = _texts_at(buf, pos, end, (0x0A, 0x12, 0x1A, 0x22), texts)
    pos = _headers_in(codec, buf, pos, end, 0x2A, headers)
    pos = _texts_at(buf, pos, end, (0x32, 0x3A), texts)
    kind, tunnel, method, target, peer, scheme = texts
    if kind not in _HTTP_KINDS:
        raise _Irregular  # the generated parser's reading says why
    head = StreamHead(
        intern(kind),
        intern(tunnel),
        intern(method),
        target,
        tuple(headers),
        peer,
        intern(scheme) if scheme else "http",
    )
    if pos == end:
        return head, False
    if pos + 2 == end and buf[pos] == 0x40 and buf[pos + 1] == 1:
        return head, True
    raise _Irregular


def _reply_at(codec: Codec, buf: bytes, pos: int, end: int) -> tuple[ReplyHead, bool]:
    """The C{Reply} message in C{buf[pos:end]}: its fields in order, each at most once."""
    status = 0
    reason = b""
    if pos < end and buf[pos] == 0x08:
        status, pos = _varint_at(buf, pos + 1)
    if not 100 <= status <= 999:
        raise _Irregular
    if pos < end and buf[pos] == 0x12:
        stop, first = _length_at(buf, pos + 1, end)
        reason = buf[first:stop]
        pos = stop
    headers: list[tuple[bytes, bytes]] = []
    pos = _headers_in(codec, buf, pos, end, 0x1A, headers)
    if pos == end:
        return ReplyHead(status, reason, tuple(headers)), False
    if pos + 2 == end and buf[pos] == 0x20 and buf[pos + 1] == 1:
        return ReplyHead(status, reason, tuple(headers)), True
    raise _Irregular


def _reset_at(buf: bytes, pos: int, end: int) -> tuple[Reason, str]:
    """The C{Reset} message in C{buf[pos:end]}: reason, then message."""
    code = 0
    message = ""
    if pos < end and buf[pos] == 0x08:
        code, pos = _varint_at(buf, pos + 1)
    if pos < end and buf[pos] == 0x12:
        pos, message = _text_at(buf, pos + 1, end)
    if pos != end:
        raise _Irregular
    return Reason.from_wire(code), message


def _end_at(codec: Codec, buf: bytes, pos: int, end: int) -> tuple[tuple[bytes, bytes], ...]:
    trailers: list[tuple[bytes, bytes]] = []
    if _headers_in(codec, buf, pos, end, 0x0A, trailers) != end:
        raise _Irregular
    return tuple(trailers)


def _read_regular(codec: Codec, payload: Buffer) -> tuple[int, int, Any, bool] | None:
    end = len(payload)
    stream_id = 0
    pos = 0
    if end and payload[0] == 0x08:
        stream_id, pos = _varint_at(payload, 1)
    if pos >= end:
        raise _Irregular
    tag = payload[pos]
    stop, start = _length_at(payload, pos + 1, end)
    if stop != end:
        raise _Irregular
    if tag == 0x32:  # data
        if start == end:
            return stream_id, DATA, b"", False
        if payload[start] != 0x0A:
            if payload[start:] == b"\x10\x01":
                return stream_id, DATA, b"", True
            raise _Irregular
        stop, first = _length_at(payload, start + 1, end)
        if stop == end:
            return stream_id, DATA, _part_of(payload, first, end), False
        if payload[stop:] == b"\x10\x01":
            return stream_id, DATA, _part_of(payload, first, stop), True
        raise _Irregular
    if tag == 0x4A:  # window
        increment = 0
        if start != end:
            if payload[start] != 0x08:
                raise _Irregular
            increment, stop = _varint_at(payload, start + 1)
            if stop != end:
                raise _Irregular
        return stream_id, WINDOW, increment, False
    if not isinstance(payload, bytes):
        return None  # read again from bytes: heads and trailers must not be views
    if tag == 0x22:
        head, end_stream = _open_at(codec, payload, start, end)
        return stream_id, OPEN, head, end_stream
    if tag == 0x2A:
        reply, end_stream = _reply_at(codec, payload, start, end)
        return stream_id, REPLY, reply, end_stream
    if tag == 0x3A:
        return stream_id, END, _end_at(codec, payload, start, end), False
    if tag == 0x42:
        return stream_id, RESET, _reset_at(payload, start, end), False
    return None  # control frames, pings: the generated parser


def _read_generated(codec: Codec, payload: bytes) -> tuple[int, int, Any, bool]:
    """L{read} done entirely by the generated parser (the reference for L{read})."""
    frame = decode(payload)
    kind = _KIND_NUMBERS[frame.WhichOneof("body")]  # type: ignore[index]
    body: Any
    if kind == DATA:
        return frame.stream_id, kind, frame.data.data, frame.data.end_stream
    if kind == OPEN:
        return frame.stream_id, kind, _head_from(frame, codec.names), frame.open.end_stream
    if kind == REPLY:
        return frame.stream_id, kind, _reply_from(frame, codec.names), frame.reply.end_stream
    if kind == WINDOW:
        body = frame.window.increment
    elif kind == END:
        body = _trailers_from(frame, codec.names)
    elif kind == RESET:
        body = reset_from(frame)
    elif kind == PING:
        body = frame.ping.opaque
    elif kind == PONG:
        body = frame.pong.opaque
    else:
        body = control_from(frame)
    return frame.stream_id, kind, body, False


def _read(codec: Codec, payload: Buffer, borrow: bool = False) -> tuple[int, int, Any, bool]:
    """L{Codec.read}."""
    frame: tuple[int, int, Any, bool] | None
    if type(payload) is not bytes:
        try:
            frame = _read_regular(codec, payload)
        except (_Irregular, IndexError):
            frame = None
        if frame is not None and frame[1] == DATA:
            body = frame[2]
            if borrow or type(body) is bytes:
                return frame
            return frame[0], DATA, bytes(body), frame[3]
        payload = bytes(payload)
    try:
        frame = _read_regular(codec, payload)
    except (_Irregular, IndexError):
        # Unusual or truncated: the generated parser reads it or says why not.
        frame = None
    return _read_generated(codec, payload) if frame is None else frame


class Codec:
    """
    The hand-written encoder and reader, remembering what recurs from one
    head to the next: header names (decoded heads share one bytes object
    per name), encoded header fields (the Server, Content-Type, ... every
    response repeats), an Open's first fields (kind, tunnel, method) and
    last (peer, scheme).  Whole header blocks are not remembered: on real
    traffic every reply has its own (its C{Set-Cookie}, its request id).
    Each table is bounded: emptied when full.

    An edge or an agent has one, in its link setup, shared by its links; the
    module's functions (L{read}, L{open_bytes}, ...) are a codec that
    remembers nothing.
    """

    __slots__ = ("fields", "names", "open_ends", "open_starts")

    def __init__(self, cached: int = _CACHED, names: int = _MAX_NAMES) -> None:
        self.names: Bounded[bytes, bytes] = Bounded(names)
        # Encoded short fields (at most ~130 bytes each) by tag: trailers, replies, opens.
        self.fields: dict[bytes, Bounded[tuple[bytes, bytes], bytes]] = {
            tag: Bounded(cached) for tag in (b"\x0a", b"\x1a", b"\x2a")
        }
        self.open_starts: Bounded[tuple[str, str, str], bytes] = Bounded(cached)
        self.open_ends: Bounded[tuple[str, str], bytes] = Bounded(cached)

    def read(self, payload: Buffer, *, borrow: bool = False) -> tuple[int, int, Any, bool]:
        """
        Parse one frame into C{(stream_id, kind, body, end_stream)}: C{kind} is the number of
        its body field (L{DATA}, L{OPEN}, ...) and C{body} what it carries: the
        bytes of a Data frame, the increment of a Window, the L{StreamHead} of an
        Open, the L{ReplyHead} of a Reply, the trailers of an End, C{(reason,
        message)} of a Reset, the opaque value of a Ping or Pong, else the
        L{ControlMessage}; C{end_stream} is the flag of an Open, Reply or Data
        frame (version 2).  A malformed frame raises L{FrameError} saying why.
        A C{bytearray} or C{memoryview} C{payload} may be reused once this
        returns: a Data frame's bytes are copied out of it (once), any other
        frame is read from a C{bytes} copy.  With C{borrow}, a Data frame's
        bytes from such a payload come as a C{memoryview} of it instead (not
        copied), for a caller that knows the payload never changes.
        """
        return _read(self, payload, borrow)

    def read_generated(self, payload: bytes) -> tuple[int, int, Any, bool]:
        """L{read} done entirely by the generated parser (the reference for L{read})."""
        return _read_generated(self, payload)

    def open_bytes(self, stream_id: int, head: StreamHead, end_stream: bool = False) -> bytes:
        """L{encode_open}, serialised by hand (identical bytes)."""
        return _open_bytes(self, stream_id, head, end_stream)

    def reply_bytes(self, stream_id: int, reply: ReplyHead, end_stream: bool = False) -> bytes:
        """L{encode_reply}, serialised by hand (identical bytes)."""
        return _reply_bytes(self, stream_id, reply, end_stream)

    def end_bytes(self, stream_id: int, trailers: Headers = ()) -> bytes:
        """L{encode_end}, serialised by hand (identical bytes)."""
        return _end_bytes(self, stream_id, trailers)

    def head_from(self, frame: pb.Frame) -> StreamHead:
        """The stream head carried by an C{Open} frame."""
        return _head_from(frame, self.names)

    def reply_from(self, frame: pb.Frame) -> ReplyHead:
        """The response head carried by a C{Reply} frame."""
        return _reply_from(frame, self.names)

    def trailers_from(self, frame: pb.Frame) -> tuple[tuple[bytes, bytes], ...]:
        """The trailers carried by an C{End} frame."""
        return _trailers_from(frame, self.names)


# A codec that remembers nothing: the module's functions.
_PLAIN = Codec(cached=0, names=0)
read = _PLAIN.read
read_generated = _PLAIN.read_generated
open_bytes = _PLAIN.open_bytes
reply_bytes = _PLAIN.reply_bytes
end_bytes = _PLAIN.end_bytes
head_from = _PLAIN.head_from
reply_from = _PLAIN.reply_from
trailers_from = _PLAIN.trailers_from
