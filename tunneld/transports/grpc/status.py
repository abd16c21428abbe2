# -*- test-case-name: tests.test_grpc_transport,tests.test_docs -*-
"""
The gRPC status codes, and how a L{Reason} maps to and from them: the
C{grpc-status}/C{grpc-message} trailers a call ends with.  The
C{RST_STREAM} code of a call cut short (a stock gRPC peer reads it as a
status) is L{tunneld.h2base.rst_code}, re-exported here.  docs/protocol.md
shows both (checked by tests/test_docs.py).
"""

from __future__ import annotations

import enum
from urllib.parse import quote, unquote

from tunneld.h2base import rst_code
from tunneld.model.reasons import Reason

__all__ = [
    "GrpcStatus", "reason_from_status", "rst_code", "status_for",
    "status_message", "status_text",
]


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


def status_text(message: str) -> bytes:
    """A C{grpc-message} carrying plain text (no reason label), percent-encoded."""
    return quote(message[:512], safe=_MESSAGE_SAFE).encode("ascii")


def status_for(reason: Reason) -> GrpcStatus:
    """The C{grpc-status} a call ended for C{reason} carries."""
    return _STATUS_FOR_REASON[reason]
