# -*- test-case-name: tests.test_grpc_bulk,tests.test_grpc_transport -*-
"""
gRPC message framing on the C{TunnelAgent} service: the method paths and
metadata, length-prefixed messages, and reading them back out of a call's
DATA frames.  A C{Data} message is written and read without protobuf (its
head built by L{codec.data_frame_head}, its payload found by L{_data_head}),
so a body is copied once on each side; every other message goes through
the codec.
"""

from __future__ import annotations

from typing import Protocol

from tunneld.speedups.lean_h2 import Payload, Piece
from tunneld.transports.grpc.status import GrpcStatus
from tunneld.wire import codec

__all__ = [
    "CONTROL_PATH", "FORWARD_PATH", "GRPC_CONTENT_TYPE", "IDLE_HEADER", "REUSE_HEADER", "SERVICE",
    "CallError", "Inbox", "data_message", "grpc_message", "message_length", "split_messages",
]

SERVICE = "tunneld.v1.TunnelAgent"
CONTROL_PATH = b"/tunneld.v1.TunnelAgent/Control"
FORWARD_PATH = b"/tunneld.v1.TunnelAgent/Forward"
GRPC_CONTENT_TYPE = b"application/grpc"
# Response metadata on a Forward call: idle calls the edge has left after using this one.
IDLE_HEADER = b"tunneld-idle"
# Metadata on a Forward call's request and response: both ends reuse the call
# for the next stream once both sides have sent End (see L{tunneld.transports.grpc}).
REUSE_HEADER = b"tunneld-reuse"
_RESPONSE_HEADERS = ((b":status", b"200"), (b"content-type", GRPC_CONTENT_TYPE))
_REUSE = ((REUSE_HEADER, b"1"),)
# Sent only when it matters: the agent's pool ran dry and should grow.
_DRY = ((IDLE_HEADER, b"0"),)
# The longest head of a Data message as data_message writes it: a tag and a
# varint of the Data, a tag and a varint of its payload.
_DATA_HEAD_MAX = 12
# Frame(end=End()) of stream 0: how almost every stream ends, read without protobuf.
_BARE_END = codec.end_bytes(0)


class CallError(Exception):
    """A call broke gRPC framing; ends the call with C{status}."""

    def __init__(self, status: GrpcStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


# The name tests and older code know it by.
_CallError = CallError


class Inbox(Protocol):
    """What L{split_messages} keeps on a call between its DATA frames."""

    kind: str
    inbox: bytearray
    data_left: int


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


def split_messages(call: Inbox, data: Payload, max_message: int) -> list[memoryview | bytes]:
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
        payload = _data_pieces(call, data, max_message)
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
        missing = 5 + message_length(inbox, 0, max_message) - len(inbox)
        if missing > total - pos:
            inbox += buf[pos:]
            return out
        inbox += buf[pos : pos + missing]
        pos += missing
        out.append(memoryview(bytes(inbox))[5:])
        inbox.clear()
    while total - pos >= 5:
        length = int.from_bytes(buf[pos + 1 : pos + 5], "big")
        if buf[pos] or length > max_message:
            message_length(buf, pos, max_message)  # raises why
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


def _data_pieces(
    call: Inbox, pieces: list[bytes | bytearray | memoryview], max_message: int
) -> bytes | None:
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
    if first[0] or length > max_message or 5 + length < total:
        return None  # compressed, too long (the general path says so) or not alone
    head = _data_head(first[5 : 5 + _DATA_HEAD_MAX], length)
    if head is None:
        return None
    call.data_left = 5 + length - total
    return b"".join([first[5 + head :], *pieces[1:]])


def message_length(buf: memoryview | bytearray, pos: int, max_message: int) -> int:
    """The length in the gRPC message prefix at C{pos}, if the message is acceptable."""
    if buf[pos]:
        raise CallError(GrpcStatus.INTERNAL, "compressed messages are not supported")
    length = int.from_bytes(buf[pos + 1 : pos + 5], "big")
    if length > max_message:
        raise CallError(
            GrpcStatus.RESOURCE_EXHAUSTED,
            f"message of {length} bytes exceeds the limit of {max_message}",
        )
    return length
