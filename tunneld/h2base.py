# -*- test-case-name: tests.test_h2base,tests.test_public_h2,tests.test_grpc_transport -*-
"""
The HTTP/2 driving every HTTP/2 speaker here shares: the edge's public
listener (L{tunneld.edge.http2}), the gRPC agent link
(L{tunneld.transports.grpc.link}) and the agent's h2c upstreams
(L{tunneld.agent.upstream_h2}).  Each keeps its own protocol (what a stream
means to it, its timers, its socket); the connection under it is made,
started, fed and reset here, one way:

  - L{new_connection}: the h2 state machine (L{new_h2_connection}, the lean
    one when that speedup is on) with its local settings in force from the
    first SETTINGS frame;
  - L{start}: the preface, settings applied once the peer acknowledges them,
    and the connection's receive window raised above HTTP/2's 64 KiB (which
    would cap the whole connection at one window per round trip);
  - L{send_within_window}: a stream's queued body within its windows and the
    peer's frame size, then its end (trailers, or END_STREAM on the last
    DATA frame); whatever the window does not take waits for WINDOW_UPDATE;
  - the stream reset codes: L{rst_code} for a stream ended before it was
    answered (a peer such as a gRPC client reads it as a status),
    L{cut_code} for a response cut after it started, L{reason_for_rst} and
    L{code_name} for a reset that arrives.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, cast

from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.settings import SettingCodes, Settings

from tunneld.model.reasons import Reason
from tunneld.speedups.lean_h2 import PiecewiseH2Connection, new_h2_connection

__all__ = [
    "DEFAULT_WINDOW",
    "code_name",
    "cut_code",
    "new_connection",
    "reason_for_rst",
    "rst_code",
    "send_within_window",
    "start",
]

# HTTP/2's initial window, for streams and for the connection (RFC 9113 section 6.9.2).
DEFAULT_WINDOW = 65535


def new_connection(
    *, client_side: bool, settings: Mapping[SettingCodes | int, int] | None = None, **config: Any
) -> PiecewiseH2Connection:
    """
    An h2 connection; C{config} goes to L{H2Configuration} (C{header_encoding}
    is None: every header is bytes).  C{settings} are in force at once and
    go out in the first SETTINGS frame (L{start}).
    """
    config.setdefault("header_encoding", None)
    conn = new_h2_connection(H2Configuration(client_side=client_side, **config))
    if settings:
        conn.local_settings = Settings(client=client_side, initial_values=cast(Any, dict(settings)))
    return conn


def start(
    conn: PiecewiseH2Connection,
    connection_window: int,
    settings: Mapping[SettingCodes | int, int] | None = None,
) -> None:
    """
    Queue the preface (and the first SETTINGS frame); C{settings} follow in
    a SETTINGS frame of their own, applied when the peer acknowledges them.
    The connection's receive window is raised to C{connection_window}.
    """
    conn.initiate_connection()
    if settings:
        conn.update_settings(dict(settings))
    if connection_window > DEFAULT_WINDOW:
        conn.increment_flow_control_window(connection_window - DEFAULT_WINDOW)


def send_within_window(
    conn: PiecewiseH2Connection,
    stream_id: int,
    outbox: deque[bytes],
    end: Sequence[tuple[bytes, bytes]] | None,
) -> tuple[int, bool]:
    """
    Send what the stream's windows allow of C{outbox} (emptied from the
    left, a chunk cut where the window ends), then, once it is empty and
    C{end} is not None, end the stream: with C{end} as trailers, or with
    END_STREAM on the last DATA frame when there are none.  Returns the
    body bytes sent and whether the stream's end went out.  Raises
    L{h2.exceptions.H2Error} for a stream h2 will not send on (the peer
    reset it).
    """
    sent = 0
    while outbox:
        room = conn.send_room(stream_id)
        if room <= 0:
            return sent, False
        chunk = outbox[0]
        if len(chunk) > room:
            outbox[0] = chunk[room:]
            chunk = chunk[:room]
        else:
            outbox.popleft()
        sent += len(chunk)
        if not outbox and end is not None and not end:
            conn.send_data(stream_id, chunk, end_stream=True)
            return sent, True
        conn.send_data(stream_id, chunk)
    if end is None:
        return sent, False
    if end:
        conn.send_headers(stream_id, list(end), end_stream=True)
    else:
        conn.end_stream(stream_id)
    return sent, True


# -- stream reset codes -------------------------------------------------------------

_RST_FOR_REASON = {
    Reason.CANCELLED: ErrorCodes.CANCEL,
    Reason.CLIENT_GONE: ErrorCodes.CANCEL,
    Reason.SATURATED: ErrorCodes.FLOW_CONTROL_ERROR,
    Reason.RATE_LIMITED: ErrorCodes.ENHANCE_YOUR_CALM,
    Reason.CAP_REACHED: ErrorCodes.REFUSED_STREAM,
    Reason.AGENT_UNAVAILABLE: ErrorCodes.REFUSED_STREAM,
    Reason.PROTOCOL_ERROR: ErrorCodes.PROTOCOL_ERROR,
}

_REASON_FOR_RST = {
    ErrorCodes.CANCEL: Reason.CANCELLED,
    ErrorCodes.FLOW_CONTROL_ERROR: Reason.SATURATED,
    ErrorCodes.ENHANCE_YOUR_CALM: Reason.SATURATED,
    ErrorCodes.REFUSED_STREAM: Reason.AGENT_UNAVAILABLE,
    ErrorCodes.PROTOCOL_ERROR: Reason.PROTOCOL_ERROR,
}


def rst_code(reason: Reason) -> ErrorCodes:
    """
    The RST_STREAM code that ends a stream for C{reason} before it was
    answered, or a gRPC call (a stock gRPC peer reads it as a status):
    C{REFUSED_STREAM} says the request was not processed.
    """
    return _RST_FOR_REASON.get(reason, ErrorCodes.CANCEL)


def cut_code(reason: Reason) -> ErrorCodes:
    """
    The RST_STREAM code that cuts a response after it started, so that the
    client never takes a truncated body for a whole one: C{CANCEL} when the
    client went or cancelled, C{INTERNAL_ERROR} for anything else.
    """
    return ErrorCodes.CANCEL if reason is Reason.CLIENT_GONE else ErrorCodes.INTERNAL_ERROR


def reason_for_rst(code: int, default: Reason = Reason.AGENT_GONE) -> Reason:
    """The reason a stream the peer reset with C{code} ends with."""
    return _REASON_FOR_RST.get(cast(ErrorCodes, code), default)


def code_name(code: int) -> str:
    """An HTTP/2 error code by its name (its number if it has none)."""
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)
