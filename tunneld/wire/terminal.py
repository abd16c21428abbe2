# -*- test-case-name: tests.test_terminal_records -*-
"""
What a stream of kind C{"terminal"} carries: typed records, both ways.

A terminal stream is opened by the edge (its C{tunnel} names the
allocation, its header fields C{rows} and C{cols} the first window size)
and carries, in its Data, a sequence of records::

    record = type (1 byte) | length (4 bytes, big-endian) | payload

so the PTY's bytes and the control messages that go with them (resize,
close with a reason, heartbeat, ready) share one ordered, flow-controlled
stream on every transport: a transport moves the stream's bytes and knows
nothing of these records.  A record is bounded (L{MAX_RECORD}); an unknown
type or an oversized record is a protocol error of that stream alone.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

# The largest record payload either side sends or accepts.
MAX_RECORD = 256 * 1024

_HEAD = struct.Struct(">BI")
_SIZE = struct.Struct(">HH")
_BEAT = struct.Struct(">Q?")

_DATA, _RESIZE, _CLOSE, _HEARTBEAT, _READY = 1, 2, 3, 4, 5


@dataclass(frozen=True, slots=True)
class Output:
    """Bytes of the terminal: keystrokes toward the PTY, its output back."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Resize:
    """The window is C{rows} by C{cols} characters now (edge to agent)."""

    rows: int
    cols: int


@dataclass(frozen=True, slots=True)
class Close:
    """The session ends; C{reason} is one of the names in L{CLOSE_REASONS}."""

    reason: str
    message: str = ""


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Either side asks (C{reply} false) and the other answers with the same C{opaque}."""

    opaque: int
    reply: bool = False


@dataclass(frozen=True, slots=True)
class Ready:
    """The agent started the PTY's program (agent to edge); C{detail} is for logs."""

    detail: str = ""


Record = Output | Resize | Close | Heartbeat | Ready

# Why a terminal session ended: the names the browser, the admin API and the
# logs show.  One place, so every layer says the same thing.
CLOSE_REASONS: dict[str, str] = {
    "exited": "the program on the agent exited",
    "browser_closed": "the browser closed the session",
    "browser_gone": "the browser's connection was lost",
    "browser_silent": "the browser answered no heartbeat in time",
    "agent_gone": "the agent's link to the edge was lost (agent restarted or unreachable)",
    "agent_silent": "the agent's terminal answered no heartbeat in time",
    "agent_unavailable": "no agent of this allocation is connected to this edge",
    "agent_identity": "the connected agent's certificate is not for this allocation",
    "terminal_disabled": "the agent has no terminal service ([agent.terminal] enabled = false)",
    "agent_busy": "the agent runs as many terminals as it allows (max_sessions)",
    "spawn_failed": "the agent could not start the terminal's program",
    "agent_stopping": "the agent is stopping",
    "edge_stopping": "the edge is stopping (restart or shutdown)",
    "saturated": "a bounded queue filled (a reader that stopped reading)",
    "replaced": "a newer session for the same allocation replaced this one",
    "session_live": "the allocation has a live session already (second_session = \"refuse\")",
    "token_missing": "no token was given",
    "token_unknown": "the token was never issued (or is long gone)",
    "token_reused": "the token was used already (tokens are single-use)",
    "token_expired": "the token expired before it was used",
    "token_other_allocation": "the token was issued for another allocation",
    "protocol_error": "a message that breaks the terminal protocol",
}


def encode(record: Record) -> bytes:
    """The bytes of one record."""
    if isinstance(record, Output):
        payload = record.data
        kind = _DATA
    elif isinstance(record, Resize):
        payload = _SIZE.pack(record.rows, record.cols)
        kind = _RESIZE
    elif isinstance(record, Close):
        payload = json.dumps({"reason": record.reason, "message": record.message}).encode()
        kind = _CLOSE
    elif isinstance(record, Heartbeat):
        payload = _BEAT.pack(record.opaque, record.reply)
        kind = _HEARTBEAT
    else:
        payload = record.detail.encode()
        kind = _READY
    if len(payload) > MAX_RECORD:
        raise ValueError(f"a terminal record of {len(payload)} bytes (at most {MAX_RECORD})")
    return _HEAD.pack(kind, len(payload)) + payload


def encode_output(data: bytes) -> bytes:
    """Bytes of the terminal as records (split at L{MAX_RECORD})."""
    if len(data) <= MAX_RECORD:
        return _HEAD.pack(_DATA, len(data)) + data
    return b"".join(
        encode_output(data[i : i + MAX_RECORD]) for i in range(0, len(data), MAX_RECORD)
    )


class RecordError(Exception):
    """The stream broke the terminal protocol; the message says how."""


class RecordReader:
    """Turns a terminal stream's bytes, as they arrive, into records."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Record]:
        """The records completed by C{data}; L{RecordError} for a broken stream."""
        buffer = self._buffer
        buffer += data
        out: list[Record] = []
        pos = 0
        while len(buffer) - pos >= _HEAD.size:
            kind, length = _HEAD.unpack_from(buffer, pos)
            if length > MAX_RECORD:
                raise RecordError(f"a terminal record of {length} bytes (at most {MAX_RECORD})")
            start = pos + _HEAD.size
            if len(buffer) - start < length:
                break
            payload = bytes(buffer[start : start + length])
            pos = start + length
            out.append(_decode(kind, payload))
        del buffer[:pos]
        return out

    def pending(self) -> int:
        """Bytes held of a record not yet complete."""
        return len(self._buffer)


def _decode(kind: int, payload: bytes) -> Record:
    try:
        if kind == _DATA:
            return Output(payload)
        if kind == _RESIZE:
            rows, cols = _SIZE.unpack(payload)
            return Resize(rows, cols)
        if kind == _CLOSE:
            body = json.loads(payload)
            return Close(str(body["reason"]), str(body.get("message", "")))
        if kind == _HEARTBEAT:
            opaque, reply = _BEAT.unpack(payload)
            return Heartbeat(opaque, reply)
        if kind == _READY:
            return Ready(payload.decode())
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise RecordError(f"a malformed terminal record of type {kind}: {e}") from None
    raise RecordError(f"an unknown terminal record type {kind}")
