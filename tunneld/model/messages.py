# -*- test-case-name: tests.test_codec -*-
"""
Transport-neutral messages of the tunnel protocol.

The edge, the agent and the router speak in these plain objects; a transport
turns them into its own wire format (see L{tunneld.wire.codec} for the protobuf
form of C{proto/tunnel.proto}).  Nothing here knows about bytes on a wire.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from tunneld.model.reasons import Reason

# 2: Open, Reply and Data frames may carry end_stream.
PROTOCOL_VERSION = 2
# The version from which frames may carry end_stream.
END_STREAM_VERSION = 2
# No peer may set its frame limit below this; one that does not say its own
# (max_frame_size 0 in Hello or Welcome) accepts frames up to this size.
MIN_FRAME_SIZE = 128 * 1024

Headers = Sequence[tuple[bytes, bytes]]

# The kinds of stream an Open may name (see L{StreamHead}); a transport
# carries every one alike, and a peer refuses an Open of any other kind.
STREAM_KINDS = frozenset(("http", "upgrade", "tcp", "terminal"))


@dataclass(frozen=True, slots=True)
class TunnelSpec:
    """A public name an agent asks to serve."""

    hostname: str
    path_prefix: str = ""
    protocol: str = "http"
    port: int = 0


@dataclass(frozen=True, slots=True)
class Hello:
    """The agent's opening message: who it is and what it serves."""

    agent_id: str
    tunnels: tuple[TunnelSpec, ...]
    token: str = ""
    version: int = PROTOCOL_VERSION
    software: str = ""
    initial_window: int = 0
    max_frame_size: int = 0  # the largest frame the agent accepts (0: not said, 131072)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A tunnel the edge would not register, and why."""

    tunnel: TunnelSpec
    reason: Reason
    message: str


@dataclass(frozen=True, slots=True)
class Welcome:
    """The edge's answer to L{Hello}: the session and its public URLs."""

    session_id: str
    public_urls: tuple[str, ...] = ()
    refused: tuple[Refusal, ...] = ()
    version: int = PROTOCOL_VERSION
    initial_window: int = 0
    heartbeat_ms: int = 0
    max_frame_size: int = 0  # the largest frame the edge accepts (0: not said, 131072)


@dataclass(frozen=True, slots=True)
class GoAway:
    """The edge asks the agent to move elsewhere; streams in flight may finish."""

    reason: Reason
    message: str = ""
    # Optional: the URL of another live edge to dial instead ('' = the agent's own URLs).
    reconnect_to: str = ""


@dataclass(frozen=True, slots=True)
class Health:
    """The agent's upstream probe for one tunnel changed its verdict."""

    tunnel: str
    healthy: bool
    detail: str = ""


ControlMessage = Hello | Welcome | GoAway | Health


def saying_limits(
    message: ControlMessage, max_frame_size: int, heartbeat_interval: float
) -> ControlMessage:
    """
    A Hello or Welcome as a link sends it: saying the largest frame this end
    accepts and (a Welcome) its heartbeat interval, unless its sender did.
    """
    if isinstance(message, Welcome) and not message.heartbeat_ms:
        message = replace(message, heartbeat_ms=round(heartbeat_interval * 1000))
    if isinstance(message, (Hello, Welcome)) and not message.max_frame_size:
        message = replace(message, max_frame_size=max_frame_size)
    return message


@dataclass(frozen=True, slots=True)
class StreamHead:
    """
    What a stream is about: one public exchange as the edge received it.

    C{kind} is C{"http"} for a request/response, C{"upgrade"} for an HTTP
    connection that switches protocols (WebSocket), C{"tcp"} for raw bytes,
    C{"terminal"} for a PTY on the agent (its bytes and control messages are
    records of L{tunneld.wire.terminal}; C{tunnel} names the allocation).
    """

    kind: str
    tunnel: str
    method: str = ""
    target: str = ""
    headers: Headers = ()
    peer: str = ""
    scheme: str = "http"

    def without_headers(self) -> StreamHead:
        """
        This head less its header fields: what the edge keeps once the
        agent has them (a WebSocket held open for hours need not hold its
        request's headers, about 1 KiB, all that time).
        """
        if not self.headers:
            return self
        return StreamHead(
            self.kind, self.tunnel, self.method, self.target, (), self.peer, self.scheme
        )


@dataclass(frozen=True, slots=True)
class ReplyHead:
    """The upstream's response head, carried back from agent to edge."""

    status: int
    reason: bytes = b""
    headers: Headers = field(default_factory=tuple)
