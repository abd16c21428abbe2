# -*- test-case-name: tests.test_websocket_frames,tests.test_websocket_framing -*-
"""
The facts of RFC 6455 that tunneld's two WebSocket users share.

The WebSocket transport (L{tunneld.transports.websocket_framing}) reads and
writes the frames of an agent link; the edge (L{tunneld.edge.websocket_frames})
only follows the frames of a public WebSocket it relays, and adds a Close or
a Ping of its own.  Both take their opcodes, bits, close codes, limits and
the shape of a Close frame's payload from here, so that the two cannot
disagree.  Pure data and arithmetic: no I/O, nothing of tunneld's imported.
"""

from __future__ import annotations

__all__ = [
    "CLOSE_INVALID_PAYLOAD",
    "CLOSE_NORMAL",
    "CLOSE_NO_STATUS",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_TOO_BIG",
    "FIN",
    "MASK_BIT",
    "MAX_CLOSE_REASON",
    "MAX_CONTROL_PAYLOAD",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONTINUATION",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "RSV",
    "close_payload",
    "header_size",
    "server_control_frame",
    "valid_close_code",
]

# Section 5.2: opcodes.
OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

# The bits of a frame header's first two bytes.
FIN = 0x80
RSV = 0x70
MASK_BIT = 0x80

# Section 7.4.1: the close codes tunneld sends or reads.
CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005  # a Close frame without a code (never sent on the wire)
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_TOO_BIG = 1009

# Section 5.5: a control frame's payload is at most 125 bytes; a Close spends two on its code.
MAX_CONTROL_PAYLOAD = 125
MAX_CLOSE_REASON = MAX_CONTROL_PAYLOAD - 2


def close_payload(code: int, reason: str) -> bytes:
    """A Close frame's payload: C{code}, then C{reason} cut to fit without splitting a character."""
    text = reason.encode("utf-8")
    if len(text) > MAX_CLOSE_REASON:
        text = text[:MAX_CLOSE_REASON].decode("utf-8", "ignore").encode("utf-8")
    return code.to_bytes(2, "big") + text


def valid_close_code(code: int) -> bool:
    """Whether a peer may send C{code} (1004-1006 and 1015 are never sent; 1012-1014 came later)."""
    return 1000 <= code <= 1014 and code not in (1004, 1005, 1006) or 3000 <= code <= 4999


def server_control_frame(opcode: int, payload: bytes) -> bytes:
    """A whole, unmasked (a server's) control frame."""
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise ValueError(f"a control frame's payload is at most {MAX_CONTROL_PAYLOAD} bytes")
    return bytes((FIN | opcode, len(payload))) + payload


def header_size(first_two: bytes | bytearray) -> int:
    """
    How long a frame header is, from its first two bytes (fewer: 2, the
    least): 2, plus 2 or 8 for an extended length, plus 4 for a mask key.
    """
    if len(first_two) < 2:
        return 2
    second = first_two[1]
    size = 2 + (4 if second & MASK_BIT else 0)
    length = second & 0x7F
    if length == 126:
        size += 2
    elif length == 127:
        size += 8
    return size
