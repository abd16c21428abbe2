# -*- test-case-name: tests.test_streamable_http -*-
"""
What the transport keeps in the edge's state backend (L{IStateBackend}), so
that an agent's requests may reach any edge of a cluster:

  - C{shttp-conn/ID}: the connection's record (its owner edge, the client
    certificate it was opened with), and once closed, why;
  - C{shttp-out/ID}: the owner's edge→agent events, in order, each with its
    event number: the replay buffer every edge reads an event stream from;
  - C{shttp-in/ID}: what other edges relay to the owner: agent frames, their
    acknowledgements, event-stream leases, the agent's DELETE.

Only the owner of a connection (the edge its initialise reached) writes its
events, so their numbers are its own; an entry written twice (a retry after
a store timeout that had in fact succeeded) is recognised by its number.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

NS_CONNECTION = "shttp-conn"
NS_EVENTS = "shttp-out"
NS_RELAY = "shttp-in"

# Events: the number (the SSE id) and the kind, then the payload.
_EVENT = struct.Struct(">QB")
FRAME, CLOSE = 0, 1
# Relayed to the owner: a kind byte, then its fields.
_FRAMES = struct.Struct(">QQ")  # first sequence number, acknowledged event (0: none)
_LEASE = struct.Struct(">Qd")  # the stream's Last-Event-ID, lease seconds


def event_entry(number: int, kind: int, payload: bytes) -> bytes:
    return _EVENT.pack(number, kind) + payload


def read_event(entry: bytes) -> tuple[int, int, bytes]:
    number, kind = _EVENT.unpack_from(entry)
    return number, kind, entry[_EVENT.size :]


def close_payload(reason: str, message: str) -> bytes:
    return f"{reason}\n{message}".encode("utf-8", "replace")


def read_close(payload: bytes) -> tuple[str, str]:
    reason, _, message = payload.decode("utf-8", "replace").partition("\n")
    return reason, message


def relayed_frames(first_seq: int, ack: int, body: bytes) -> bytes:
    return b"F" + _FRAMES.pack(first_seq, ack) + body


def relayed_lease(stream_id: str, after: int, seconds: float) -> bytes:
    return b"S" + _LEASE.pack(after, seconds) + stream_id.encode()


def relayed_release(stream_id: str) -> bytes:
    return b"U" + stream_id.encode()


RELAYED_DELETE = b"D"


@dataclass(frozen=True)
class Relayed:
    """One entry of the relay log, parsed."""

    kind: str  # "frames", "lease", "release", "delete"
    first_seq: int = 0
    ack: int = 0
    body: bytes = b""
    stream_id: str = ""
    seconds: float = 0.0


def read_relayed(entry: bytes) -> Relayed:
    """The entry's meaning; L{ValueError} for one no edge writes."""
    kind, rest = entry[:1], entry[1:]
    if kind == b"F":
        first_seq, ack = _FRAMES.unpack_from(rest)
        return Relayed("frames", first_seq=first_seq, ack=ack, body=rest[_FRAMES.size :])
    if kind == b"S":
        after, seconds = _LEASE.unpack_from(rest)
        return Relayed("lease", ack=after, seconds=seconds, stream_id=rest[_LEASE.size :].decode())
    if kind == b"U":
        return Relayed("release", stream_id=rest.decode())
    if kind == RELAYED_DELETE:
        return Relayed("delete")
    raise ValueError(f"unknown relay entry {kind!r}")


@dataclass(frozen=True)
class ConnectionRecord:
    """A connection as every edge sees it."""

    owner: str = ""  # the edge id holding its link ("" once closed)
    fingerprint: str = ""  # SHA-256 of the client certificate it was opened with ("" = none)
    closed_reason: str = ""
    closed_message: str = ""

    @property
    def closed(self) -> bool:
        return bool(self.closed_reason)

    def encode(self) -> bytes:
        return json.dumps(
            {"owner": self.owner, "fingerprint": self.fingerprint,
             "closed_reason": self.closed_reason, "closed_message": self.closed_message},
            sort_keys=True,
        ).encode()

    @classmethod
    def decode(cls, raw: bytes) -> ConnectionRecord:
        fields = json.loads(raw)
        return cls(
            str(fields.get("owner", "")), str(fields.get("fingerprint", "")),
            str(fields.get("closed_reason", "")), str(fields.get("closed_message", "")),
        )
