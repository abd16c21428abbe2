# -*- test-case-name: tests.test_websocket_frames -*-
"""
Just enough of RFC 6455 framing for the edge to speak up on a tunneled
WebSocket without ever terminating it.

The edge relays an upgraded WebSocket as raw bytes: permessage-deflate,
subprotocols and fragmentation stay between the client and the upstream.
Only when the tunnel itself ends the connection (agent gone, saturated,
draining, idle) does the edge add a frame of its own — a Close with the
reason's code and text — and, when configured, a Ping towards an idle
client.  A frame may only be added between two frames of the relayed
direction, so L{FrameTracker} follows where frames begin and end in a byte
stream: it reads each frame header (at most 14 bytes) and counts payload
bytes without copying them.  The RFC's facts (opcodes, limits, a Close's
payload) come from L{tunneld.wire.rfc6455}, as the WebSocket transport's do.
"""

from __future__ import annotations

import struct

from tunneld.wire.rfc6455 import (
    MAX_CLOSE_REASON,
    OP_CLOSE,
    OP_PING,
    close_payload,
    header_size,
    server_control_frame,
)

__all__ = ["FrameTracker", "close_frame", "ping_frame", "MAX_CLOSE_REASON"]


def close_frame(code: int, reason: str) -> bytes:
    """A server's (unmasked) Close frame with C{code} and C{reason}, cut to fit."""
    return server_control_frame(OP_CLOSE, close_payload(code, reason))


def ping_frame(payload: bytes = b"") -> bytes:
    """A server's (unmasked) Ping frame."""
    return server_control_frame(OP_PING, payload)


class FrameTracker:
    """
    Follows the frame boundaries of one direction of a WebSocket connection.

    Feed it every byte relayed in that direction, in order.  It keeps at
    most one incomplete frame header; payloads are only counted.
    """

    __slots__ = ("_header", "_remaining", "_opcode", "close_seen")

    def __init__(self) -> None:
        self._header = bytearray()  # an incomplete frame header
        self._remaining = 0  # payload bytes of the current frame still to come
        self._opcode = 0
        # A whole Close frame went by: the WebSocket is closing on its own.
        self.close_seen = False

    @property
    def at_boundary(self) -> bool:
        """Whether the bytes fed so far end exactly at the end of a frame."""
        return not self._header and not self._remaining

    def feed(self, data: bytes) -> None:
        """Account for C{data}, the next bytes of the stream."""
        size = len(data)
        at = 0
        while at < size:
            remaining = self._remaining
            if remaining:
                taken = min(remaining, size - at)
                at += taken
                self._remaining = remaining - taken
                if not self._remaining:
                    self._frame_done()
                continue
            header = self._header
            need = header_size(header)
            taken = min(need - len(header), size - at)
            header += data[at : at + taken]
            at += taken
            if len(header) < need:
                continue
            need = header_size(header)  # now known from the first two bytes
            if len(header) < need:
                continue
            self._start_frame()

    def _start_frame(self) -> None:
        header = self._header
        self._opcode = header[0] & 0x0F
        length = header[1] & 0x7F
        if length == 126:
            length = struct.unpack_from("!H", header, 2)[0]
        elif length == 127:
            length = struct.unpack_from("!Q", header, 2)[0]
        self._header = bytearray()
        self._remaining = length
        if not length:
            self._frame_done()

    def _frame_done(self) -> None:
        if self._opcode == OP_CLOSE:
            self.close_seen = True
