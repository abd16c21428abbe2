# -*- test-case-name: tests.test_codec,tests.test_docs -*-
"""
The one enumeration of why tunneld refused or ended something.

Every refusal and every close in tunneld carries a L{Reason}.  Its mapping to
an HTTP status, a WebSocket close code, a log event and a metric label is made
here, once, so the public client, the operator's log and the metrics always
agree about what happened.
"""

from __future__ import annotations

import enum


class Reason(enum.Enum):
    """
    Why a stream, a registration or a link was refused or ended.

    The value is the stable label used in the C{Tunnel-Error} header, logs and
    metrics; L{wire_code} is the number in C{proto/tunnel.proto}.
    """

    NO_TUNNEL = "no_tunnel"
    AGENT_UNAVAILABLE = "agent_unavailable"
    AGENT_GONE = "agent_gone"
    UPSTREAM_REFUSED = "upstream_refused"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    RATE_LIMITED = "rate_limited"
    CAP_REACHED = "cap_reached"
    SATURATED = "saturated"
    DRAINING = "draining"
    PROTOCOL_ERROR = "protocol_error"
    UNAUTHORIZED = "unauthorized"
    BAD_REQUEST = "bad_request"
    UPSTREAM_ERROR = "upstream_error"
    CLIENT_GONE = "client_gone"
    IDLE_TIMEOUT = "idle_timeout"
    CANCELLED = "cancelled"
    SESSION_GONE = "session_gone"

    @property
    def http_status(self) -> int:
        """The HTTP status a public client sees when this refuses its request."""
        return _HTTP_STATUS[self]

    @property
    def websocket_close_code(self) -> int:
        """The WebSocket close code sent when this ends a tunneled WebSocket."""
        return _WEBSOCKET_CLOSE[self]

    @property
    def description(self) -> str:
        """A short sentence for a person, used as the body of an HTTP refusal."""
        return _DESCRIPTION[self]

    @property
    def wire_code(self) -> int:
        """The number of this reason in the wire protocol's C{Reason} enum."""
        return _WIRE_CODE[self]

    @classmethod
    def from_wire(cls, code: int) -> Reason:
        """
        The reason for a wire code; unknown codes (a newer peer) read as
        C{protocol_error} rather than failing.
        """
        return _FROM_WIRE.get(code, Reason.PROTOCOL_ERROR)


_HTTP_STATUS = {
    Reason.NO_TUNNEL: 404,
    Reason.AGENT_UNAVAILABLE: 503,
    Reason.AGENT_GONE: 502,
    Reason.UPSTREAM_REFUSED: 502,
    Reason.UPSTREAM_TIMEOUT: 504,
    Reason.RATE_LIMITED: 429,
    Reason.CAP_REACHED: 503,
    Reason.SATURATED: 503,
    Reason.DRAINING: 503,
    Reason.PROTOCOL_ERROR: 502,
    Reason.UNAUTHORIZED: 403,
    Reason.BAD_REQUEST: 400,
    Reason.UPSTREAM_ERROR: 502,
    Reason.CLIENT_GONE: 499,
    Reason.IDLE_TIMEOUT: 408,
    Reason.CANCELLED: 503,
    # What an MCP server answers for a session it does not know: the client
    # then starts a new one (with any agent).
    Reason.SESSION_GONE: 404,
}

# 1001 going away, 1008 policy violation, 1011 internal error, 1013 try again later.
_WEBSOCKET_CLOSE = {
    Reason.NO_TUNNEL: 1008,
    Reason.AGENT_UNAVAILABLE: 1013,
    Reason.AGENT_GONE: 1011,
    Reason.UPSTREAM_REFUSED: 1011,
    Reason.UPSTREAM_TIMEOUT: 1011,
    Reason.RATE_LIMITED: 1013,
    Reason.CAP_REACHED: 1013,
    Reason.SATURATED: 1013,
    Reason.DRAINING: 1001,
    Reason.PROTOCOL_ERROR: 1002,
    Reason.UNAUTHORIZED: 1008,
    Reason.BAD_REQUEST: 1008,
    Reason.UPSTREAM_ERROR: 1011,
    Reason.CLIENT_GONE: 1001,
    Reason.IDLE_TIMEOUT: 1001,
    Reason.CANCELLED: 1001,
    Reason.SESSION_GONE: 1008,
}

_DESCRIPTION = {
    Reason.NO_TUNNEL: "no tunnel is registered for this host",
    Reason.AGENT_UNAVAILABLE: "no agent is connected for this tunnel",
    Reason.AGENT_GONE: "the agent serving this tunnel went away",
    Reason.UPSTREAM_REFUSED: "the agent could not connect to its upstream service",
    Reason.UPSTREAM_TIMEOUT: "the upstream service did not answer in time",
    Reason.RATE_LIMITED: "too many requests; slow down",
    Reason.CAP_REACHED: "a connection limit is reached; try again later",
    Reason.SATURATED: "the stream could not keep up and was closed",
    Reason.DRAINING: "the server is shutting down",
    Reason.PROTOCOL_ERROR: "the tunnel link broke the protocol",
    Reason.UNAUTHORIZED: "not authorized",
    Reason.BAD_REQUEST: "the request is malformed",
    Reason.UPSTREAM_ERROR: "the upstream service sent a malformed response",
    Reason.CLIENT_GONE: "the client went away",
    Reason.IDLE_TIMEOUT: "the connection was idle too long",
    Reason.CANCELLED: "the stream was cancelled",
    Reason.SESSION_GONE: "the agent that held this session is gone; start a new session",
}

_WIRE_CODE = {reason: number for number, reason in enumerate(Reason, start=1)}
_FROM_WIRE = {number: reason for reason, number in _WIRE_CODE.items()}
