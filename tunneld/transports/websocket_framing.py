# -*- test-case-name: tests.test_websocket_framing -*-
"""
RFC 6455 frames for an open agent link, read and written without Autobahn.

Autobahn does the opening handshake (HTTP Upgrade, paths, TLS, timeouts);
once the link is open every tunnel frame is one binary WebSocket message,
and Autobahn's general machinery per message (frame and message callbacks,
a masker object per frame, traffic statistics) cost more CPU than routing
the tunnel frame itself.  Here is the whole of what an agent link needs:

  - L{FrameReader}: incremental, whatever way the bytes are cut into reads.
    Binary messages (with continuation frames reassembled up to a bound),
    Ping, Pong, Close; everything else the RFC forbids is a L{FramingError}
    carrying the close code to send.  A payload split over many reads (its
    declared size checked against the bound first) is kept as the reads'
    pieces and copied once, when whole, into a buffer unmasked there.  A large
    message is handed over without another copy: as a C{memoryview} of the
    read when it came unmasked and whole, else as the C{bytearray} it was
    unmasked into, a new one per message; the reader never changes either
    again, so the handler may keep it (or a view of part of it).
  - L{FrameWriter}: one C{bytes} per frame, masked with a fresh random key
    when it is the client's (the agent's) end; L{FrameWriter.binary_frames}
    writes several messages, each given in pieces, into one buffer with a
    single copy of each piece.

No extension is ever negotiated on an agent link, so the RSV bits must be 0.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from tunneld.speedups.native_mask import mask, mask_in_place, mask_spans, masked
from tunneld.wire.rfc6455 import (
    CLOSE_INVALID_PAYLOAD,
    CLOSE_NO_STATUS,
    CLOSE_NORMAL,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    MAX_CONTROL_PAYLOAD,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    close_payload,
)
from tunneld.wire.rfc6455 import FIN as _FIN
from tunneld.wire.rfc6455 import MASK_BIT as _MASK_BIT
from tunneld.wire.rfc6455 import RSV as _RSV
from tunneld.wire.rfc6455 import valid_close_code as _valid_close_code

__all__ = [
    "CLOSE_NORMAL", "CLOSE_NO_STATUS", "CLOSE_PROTOCOL_ERROR", "CLOSE_INVALID_PAYLOAD",
    "CLOSE_TOO_BIG", "FrameHandler", "FrameReader", "FrameWriter", "FramingError", "Payload",
    "mask",
]

_HEAD_16 = struct.Struct("!BBH")
_HEAD_64 = struct.Struct("!BBQ")

# What a message's payload may be handed over as: only large ones come as a
# memoryview (unmasked, of the read they arrived in) or a bytearray (unmasked
# in place); smaller ones are bytes.
Payload = bytes | bytearray | memoryview
# Whole messages at least this long are handed over as a view of the read
# (unmasked) or the buffer they were unmasked into (masked).
_VIEW_FROM = 4096
# A read inside a payload is kept as it is from this length; shorter ones
# are gathered into one buffer.
_PIECE_FROM = 64 * 1024


class FramingError(Exception):
    """The peer broke RFC 6455: close the WebSocket with C{code} and C{reason}."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class FrameHandler(Protocol):
    """What a L{FrameReader} hands complete messages and control frames to."""

    def message_received(self, payload: Payload, binary: bool) -> None:
        """
        A whole data message (text only to be refused: an agent link is
        binary).  A C{memoryview} or C{bytearray} C{payload} is never
        changed by the reader afterwards: it may be kept.
        """

    def ping_received(self, payload: bytes | bytearray) -> None:
        """A Ping: answer with a Pong carrying C{payload}."""

    def pong_received(self, payload: bytes | bytearray) -> None:
        """A Pong: the answer to one of our Pings, or unsolicited (allowed, and then ignored)."""

    def close_received(self, code: int, reason: str) -> None:
        """A Close (C{CLOSE_NO_STATUS} when it had no code); the reader reads no further."""


class FrameReader:
    """
    Turns the bytes of one direction of an open WebSocket into messages.

    C{masked} says which end we are: a server requires every frame masked,
    a client requires none to be.  C{max_message} bounds a message's payload,
    fragments included: a longer one is refused (1009) as soon as its header
    says so, before any of its payload is buffered.
    """

    __slots__ = (
        "_handler", "_masked", "_max", "_partial", "_need", "_payload",
        "_fin", "_opcode", "_key", "_fragments", "_fragments_size", "_fragments_binary",
        "_stopped",
    )

    def __init__(self, handler: FrameHandler, *, masked: bool, max_message: int) -> None:
        self._handler = handler
        self._masked = masked
        self._max = max_message
        self._partial = b""  # an incomplete frame header (at most 13 bytes)
        # The current frame's payload is incomplete: bytes still to come,
        # and the pieces of the reads it came in so far.
        self._need = 0
        self._payload: list[bytes | bytearray | memoryview] = []
        self._fin = True
        self._opcode = 0
        self._key: bytes | None = None
        # A fragmented message in progress: its payloads so far.
        self._fragments: list[bytes | bytearray] | None = None
        self._fragments_size = 0
        self._fragments_binary = True
        self._stopped = False

    def stop(self) -> None:
        """Read no further (after a Close, or an error): later bytes are ignored."""
        self._stopped = True
        self._partial = b""
        self._payload = []
        self._need = 0
        self._fragments = None

    def feed(self, data: bytes) -> None:
        """
        Read C{data}, the next bytes received; hand over whatever completes.

        @raise FramingError: the peer broke the protocol; the reader stops.
        """
        try:
            self._feed(data)
        except FramingError:
            self.stop()
            raise

    def _feed(self, data: bytes) -> None:
        if self._stopped:
            return
        pos = 0
        size = len(data)
        need = self._need
        if need:
            # Inside a payload that began in an earlier read: its pieces are
            # kept until it is whole, then each byte is copied once, into
            # one buffer (no zero-filled buffer ahead), and unmasked there.
            if size < need:
                pieces = self._payload
                if size >= _PIECE_FROM:
                    pieces.append(data)
                elif type(pieces[-1]) is bytearray:
                    pieces[-1] += data  # type: ignore[operator]
                else:
                    # Short reads are gathered (a peer trickling bytes
                    # must not make a list of a million pieces).
                    pieces.append(bytearray(data))
                self._need = need - size
                return
            pieces = self._payload
            pieces.append(memoryview(data)[:need])
            buffer = bytearray().join(pieces)
            self._payload = []
            self._need = 0
            key = self._key
            if key is not None:
                mask_in_place(key, buffer)
            self._key = None
            self._frame(buffer)
            pos = need
        elif self._partial:
            data = self._partial + data
            size = len(data)
            self._partial = b""
        masked = self._masked
        mask_bit = _MASK_BIT if masked else 0
        while pos < size:
            if self._stopped:
                return
            if size - pos < 2:
                self._partial = data[pos:]
                return
            first = data[pos]
            second = data[pos + 1]
            length = second & 0x7F
            head = 2 + (2 if length == 126 else 8 if length == 127 else 0)
            if second & _MASK_BIT:
                head += 4
            if size - pos < head:
                self._partial = data[pos:]
                return
            if length == 126:
                length = (data[pos + 2] << 8) | data[pos + 3]
                if length < 126:
                    raise FramingError(CLOSE_PROTOCOL_ERROR, "frame length not minimally encoded")
            elif length == 127:
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                if length < 0x10000 or length >> 63:
                    raise FramingError(CLOSE_PROTOCOL_ERROR, "frame length not minimally encoded")
            start = pos + head
            end = start + length
            key = data[start - 4 : start] if masked else None
            if (
                first == _FIN | OP_BINARY
                and end <= size
                and (second & _MASK_BIT) == mask_bit
                and length <= self._max
                and self._fragments is None
            ):
                # The common case, checked in one go: a whole binary message
                # in this read.  A large one is copied at most once: unmasked
                # into a new buffer, or not at all.
                payload: Payload
                if key is None:
                    payload = data[start:end] if length < _VIEW_FROM else memoryview(data)[start:end]
                elif length < _VIEW_FROM:
                    payload = mask(key, data[start:end])
                else:
                    payload = bytearray(memoryview(data)[start:end])
                    mask_in_place(key, payload)
                self._handler.message_received(payload, True)
                pos = end
                continue
            self._check(first, second, length, masked)
            self._fin = bool(first & _FIN)
            self._opcode = first & 0x0F
            self._key = key
            if end > size:
                self._payload = [memoryview(data)[start:]]
                self._need = end - size
                return
            self._frame(data[start:end])
            pos = end

    def _check(self, first: int, second: int, length: int, masked: bool) -> None:
        """Refuse a frame header the RFC forbids, before reading its payload."""
        if first & _RSV:
            raise FramingError(CLOSE_PROTOCOL_ERROR, "reserved bits set without an extension")
        if bool(second & _MASK_BIT) is not masked:
            raise FramingError(
                CLOSE_PROTOCOL_ERROR,
                "unmasked frame from a client" if masked else "masked frame from a server",
            )
        opcode = first & 0x0F
        if opcode >= OP_CLOSE:
            if opcode > OP_PONG:
                raise FramingError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
            if not first & _FIN:
                raise FramingError(CLOSE_PROTOCOL_ERROR, "fragmented control frame")
            if length > MAX_CONTROL_PAYLOAD:
                raise FramingError(
                    CLOSE_PROTOCOL_ERROR, f"control frame payload of {length} bytes (max 125)"
                )
            return
        if opcode == OP_CONTINUATION:
            if self._fragments is None:
                raise FramingError(CLOSE_PROTOCOL_ERROR, "continuation frame outside a message")
            length += self._fragments_size
        elif opcode > OP_BINARY:
            raise FramingError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
        elif self._fragments is not None:
            raise FramingError(CLOSE_PROTOCOL_ERROR, "new message before the last one ended")
        if length > self._max:
            raise FramingError(
                CLOSE_TOO_BIG, f"message of {length} bytes exceeds {self._max}"
            )

    def _frame(self, payload: bytes | bytearray) -> None:
        """One whole (checked) frame with its payload (a bytearray: already unmasked)."""
        key = self._key
        if key is not None:
            payload = mask(key, payload)
        opcode = self._opcode
        if opcode == OP_BINARY or opcode == OP_TEXT:
            if self._fin:
                self._handler.message_received(payload, opcode == OP_BINARY)
            else:
                self._fragments = [payload]
                self._fragments_size = len(payload)
                self._fragments_binary = opcode == OP_BINARY
        elif opcode == OP_CONTINUATION:
            fragments = self._fragments
            assert fragments is not None  # checked with the header
            fragments.append(payload)
            self._fragments_size += len(payload)
            if self._fin:
                self._fragments = None
                self._fragments_size = 0
                self._handler.message_received(b"".join(fragments), self._fragments_binary)
        elif opcode == OP_PING:
            self._handler.ping_received(payload)
        elif opcode == OP_CLOSE:
            code, reason = self._close(payload)
            self.stop()
            self._handler.close_received(code, reason)
        else:  # OP_PONG
            self._handler.pong_received(payload)

    @staticmethod
    def _close(payload: bytes | bytearray) -> tuple[int, str]:
        if not payload:
            return CLOSE_NO_STATUS, ""
        if len(payload) == 1:
            raise FramingError(CLOSE_PROTOCOL_ERROR, "close frame with a one-byte payload")
        code = int.from_bytes(payload[:2], "big")
        if not _valid_close_code(code):
            raise FramingError(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            raise FramingError(CLOSE_INVALID_PAYLOAD, "close reason is not UTF-8") from None
        return code, reason


class FrameWriter:
    """
    Encodes frames for one end of a WebSocket: a client (C{masked}) masks
    every frame with a fresh key from C{random}, read 4 KiB at a time so a
    key costs a slice rather than a system call.
    """

    __slots__ = ("_masked", "_random", "_keys", "_at")

    _KEY_BATCH = 4096

    def __init__(self, *, masked: bool, random: Callable[[int], bytes] = os.urandom) -> None:
        self._masked = masked
        self._random = random
        self._keys = b""
        self._at = 0

    def _key(self) -> bytes:
        """A fresh masking key."""
        at = self._at
        if at >= len(self._keys):
            self._keys = self._random(self._KEY_BATCH)
            at = 0
        self._at = at + 4
        return self._keys[at : at + 4]

    @staticmethod
    def _head(first: int, mask_bit: int, size: int) -> bytes:
        if size < 126:
            return bytes((first, mask_bit | size))
        if size < 0x10000:
            return _HEAD_16.pack(first, mask_bit | 126, size)
        return _HEAD_64.pack(first, mask_bit | 127, size)

    def frame(self, opcode: int, payload: bytes | bytearray) -> bytes:
        """One final frame of C{opcode} carrying C{payload}, header and (masked) payload together."""
        size = len(payload)
        first = _FIN | opcode
        if self._masked:
            # Written out (not _key and _head): this is every small frame's path.
            at = self._at
            if at >= len(self._keys):
                self._keys = self._random(self._KEY_BATCH)
                at = 0
            key = self._keys[at : at + 4]
            self._at = at + 4
            if size < 126:
                head = bytes((first, _MASK_BIT | size))
            elif size < 0x10000:
                head = _HEAD_16.pack(first, _MASK_BIT | 126, size)
            else:
                head = _HEAD_64.pack(first, _MASK_BIT | 127, size)
            return head + key + masked(key, payload)
        if size < 126:
            return bytes((first, size)) + payload
        if size < 0x10000:
            return _HEAD_16.pack(first, 126, size) + payload
        return _HEAD_64.pack(first, 127, size) + payload

    def binary_frames(self, messages: Iterable[Sequence[bytes | memoryview]]) -> bytes | bytearray:
        """
        Binary messages, each in one frame and given as the pieces its payload
        is made of, encoded into one buffer: each piece is copied once into
        the frames (and masked there), however many pieces and messages.
        Masked frames come as the C{bytearray} they were masked in (copying
        them into C{bytes} would cost a second copy of every byte).
        """
        first = _FIN | OP_BINARY
        head = self._head
        pieces: list[bytes | memoryview] = []
        if not self._masked:
            for parts in messages:
                pieces.append(head(first, 0, sum(map(len, parts))))
                pieces.extend(parts)
            return b"".join(pieces)
        spans = []
        at = 0
        for parts in messages:
            size = sum(map(len, parts))
            key = self._key()
            frame_head = head(first, _MASK_BIT, size)
            pieces.append(frame_head)
            pieces.append(key)
            pieces.extend(parts)
            at += len(frame_head) + 4
            spans.append((key, at, size))
            at += size
        buffer = bytearray().join(pieces)
        mask_spans(buffer, spans)
        return buffer

    def binary(self, payload: bytes) -> bytes:
        """A binary message in one frame."""
        return self.frame(OP_BINARY, payload)

    def close(self, code: int | None, reason: str = "") -> bytes:
        """A Close frame with C{code} and C{reason} (cut to fit); no code: an empty Close."""
        return self.frame(OP_CLOSE, b"" if code is None else close_payload(code, reason))

    def pong(self, payload: bytes | bytearray) -> bytes:
        """A Pong answering a Ping's C{payload}."""
        return self.frame(OP_PONG, payload)

    def ping(self, payload: bytes) -> bytes:
        """A Ping carrying C{payload} (at most 125 bytes)."""
        if len(payload) > MAX_CONTROL_PAYLOAD:
            raise ValueError("a ping payload is at most 125 bytes")
        return self.frame(OP_PING, payload)
