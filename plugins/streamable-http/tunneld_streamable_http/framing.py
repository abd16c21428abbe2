# -*- test-case-name: tests.test_streamable_http -*-
"""
What the streamable-HTTP transport puts on the wire, and nothing else.

  - agent → edge: a C{POST} body is a batch of frames, each a 32-bit
    big-endian length and the encoded C{Frame}; C{Tunnel-Seq} numbers the
    first of them (the others follow on), C{Tunnel-Ack} says the last event
    the agent has received;
  - edge → agent: a Server-Sent-Events stream, one event per frame with its
    number as the C{id:}, the frame in the C{data:} line, either as text
    (latin-1, with LF and CR replaced by two code points latin-1 never
    produces: a body that is mostly ASCII crosses nearly as it is) or in
    base64 (anything else); an C{event: close} ends the link with a reason.

Which encoding each event uses was chosen by measurement (bench/sse_encoding.py,
docs/benchmarks.md): base64 costs a third more bytes always; the text form
costs nothing for ASCII bodies and is much faster to decode, but up to half
again for binary ones, which therefore go as base64.
"""

from __future__ import annotations

import binascii
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

# Request and response headers of the transport.
CONNECTION_ID = b"Tunnel-Connection-Id"
SEQ = b"Tunnel-Seq"
ACK = b"Tunnel-Ack"
MAX_POST = b"Tunnel-Max-Post"
ERROR = b"Tunnel-Error"
LAST_EVENT_ID = b"Last-Event-ID"
FRAMES_TYPE = b"application/vnd.tunneld.frames"
EVENTS_TYPE = b"text/event-stream"

_LENGTH = struct.Struct(">I")
# The text form: LF and CR become these (latin-1 decoding never yields them).
_LF, _CR = "\u0100", "\u0101"
# A frame is sent as text when this much of its end (its payload) is ASCII.
_SAMPLE = 128


class BatchError(ValueError):
    """A POST body that is not a well-formed batch of frames."""


def encode_batch(frames: Sequence[bytes]) -> bytes:
    """A POST body carrying C{frames}."""
    parts: list[bytes] = []
    for frame in frames:
        parts.append(_LENGTH.pack(len(frame)))
        parts.append(frame)
    return b"".join(parts)


def decode_batch(body: bytes, max_frame: int) -> list[memoryview]:
    """
    The frames of a POST body, as views of it; L{BatchError} naming what is
    wrong for a truncated record or a frame over C{max_frame} bytes.
    """
    view = memoryview(body)
    frames: list[memoryview] = []
    at, end = 0, len(body)
    while at < end:
        if end - at < 4:
            raise BatchError(f"{end - at} stray bytes after frame {len(frames)}")
        (length,) = _LENGTH.unpack_from(body, at)
        at += 4
        if length > max_frame:
            raise BatchError(f"frame {len(frames)} of {length} bytes exceeds {max_frame}")
        if end - at < length:
            raise BatchError(f"frame {len(frames)} truncated: {end - at} of {length} bytes")
        frames.append(view[at : at + length])
        at += length
    return frames


def encode_data(frame: bytes) -> bytes:
    """A frame as the value of a C{data:} line: text for an ASCII payload, else base64."""
    if frame[-_SAMPLE:].isascii():
        text = frame.decode("latin-1").replace("\n", _LF).replace("\r", _CR)
        return b"t" + text.encode("utf-8")
    return b"b" + binascii.b2a_base64(frame, newline=False)


def decode_data(data: bytes) -> bytes:
    """The frame a C{data:} value carries; L{ValueError} when it is not one."""
    kind, body = data[:1], data[1:]
    if kind == b"t":
        return body.decode("utf-8").replace(_LF, "\n").replace(_CR, "\r").encode("latin-1")
    if kind == b"b":
        return binascii.a2b_base64(body, strict_mode=True)
    raise ValueError(f"unknown event encoding {kind!r}")


def frame_event(event_id: int, frame: bytes) -> bytes:
    """The SSE event for one frame."""
    return b"id: %d\ndata: %s\n\n" % (event_id, encode_data(frame))


def close_event(event_id: int, reason: str, message: str) -> bytes:
    """The SSE event that ends the link, saying why (one line: C{reason message})."""
    text = f"{reason} {message}".replace("\r", " ").replace("\n", " ")
    return b"id: %d\nevent: close\ndata: %s\n\n" % (event_id, text.encode("utf-8", "replace"))


KEEPALIVE = b": keepalive\n\n"
# Sent with the response head so that a proxy passes the head on at once.
OPENING = b": tunneld event stream\nretry: 1000\n\n"


@dataclass(frozen=True)
class Event:
    """One parsed SSE event."""

    event_id: str | None
    kind: str  # "message" unless an event: line said otherwise
    data: bytes


class EventParser:
    """
    Server-Sent Events from a byte stream (lines end with LF or CRLF; the
    edge sends LF).  A line longer than C{max_line} raises L{ValueError}:
    the buffer has a lid.
    """

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._pieces: list[bytes] = []
        self._held = 0
        self._id: str | None = None
        self._kind = "message"
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> Iterator[Event]:
        if b"\n" not in chunk:
            # Part of a long line: kept in pieces until it ends (no copy per read).
            self._pieces.append(chunk)
            self._held += len(chunk)
            if self._held > self.max_line:
                raise ValueError(f"an event line over {self.max_line} bytes")
            return
        if self._pieces:
            self._pieces.append(chunk)
            buffer = b"".join(self._pieces)
            self._pieces = []
            self._held = 0
        else:
            buffer = chunk
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = buffer[start:end]
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            event = self._line(line)
            if event is not None:
                yield event
        rest = buffer[start:]
        if rest:
            self._pieces.append(rest)
            self._held = len(rest)
            if self._held > self.max_line:
                raise ValueError(f"an event line over {self.max_line} bytes")

    def _line(self, line: bytes) -> Event | None:
        if not line:
            if not self._data and self._kind == "message":
                self._id = None
                return None  # a comment block or a blank line: nothing to dispatch
            event = Event(self._id, self._kind, b"\n".join(self._data))
            self._id, self._kind, self._data = None, "message", []
            return event
        if line.startswith(b":"):
            return None
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"id":
            self._id = value.decode("utf-8", "replace")
        elif name == b"event":
            self._kind = value.decode("utf-8", "replace")
        return None  # retry: and unknown fields are ignored, as the spec says
