# -*- test-case-name: tests.test_grpc_transport,tests.test_grpc_interop -*-
"""
The gRPC agent-link transport: HTTP/2 (the C{h2} library on a Twisted
protocol) in real gRPC framing, service C{tunneld.v1.TunnelAgent} of
C{proto/tunnel.proto}.

The agent is the gRPC client.  It opens one long-lived C{Control} call (hello
from the agent; welcome and goaway from the edge) and keeps a pool of idle
C{Forward} calls open.  When the edge opens a stream it answers one idle
C{Forward} call with an C{Open} message; from then on that call carries the
stream's C{Reply}/C{Data}/C{End}/C{Reset} messages with C{stream_id} 0 and no
C{Window} messages: HTTP/2 flow control is the backpressure, and a stream's
window is returned only as its consumer takes the data.  HTTP/2 PING is the
heartbeat.  A stock gRPC library can implement an agent or probe the edge.

Rules on top of plain gRPC that an agent must follow:
  - the agent retires an idle C{Forward} call by half-closing it without
    sending a message; an C{Open} that crossed it is replayed by the edge on
    another call, so the agent ignores it;
  - the edge ends a C{Forward} call (trailers) only once both directions have
    ended (C{End}, or C{end_stream} on a C{Reply} or C{Data} of version 2),
    or after a C{Reset}; the agent half-closes its request after its own end
    or C{Reset}.  A C{Reset} from the edge while it was still sending the
    request body is followed by C{RST_STREAM}: a grpcio agent sees the end of
    a call only after every message in front of it;
  - unless both ends agree to reuse the call: an agent that sends the request
    metadata C{tunneld-reuse: 1} on a C{Forward} call, answered by the same
    response metadata, keeps the call open after a stream ended cleanly
    (C{End} both ways) and both ends take it back as an idle call, ready for
    the next C{Open}.  A stream then costs two DATA frames instead of three
    HEADERS and two DATA frames; a C{Reset} still ends the call.  Peers that
    do not send the metadata (a stock gRPC agent) get one call per stream;
  - a closing edge ends C{Control} with a C{grpc-status} and a C{grpc-message}
    of the form C{"<reason>: <text>"} (e.g. C{unauthorized: wrong token}).

One concept per module: L{options<tunneld.transports.grpc.options>} (the
settings), L{status<tunneld.transports.grpc.status>} (gRPC status codes and
reasons), L{framing<tunneld.transports.grpc.framing>} (paths, metadata,
length-prefixed messages), L{stream<tunneld.transports.grpc.stream>} (a call
and the tunnel stream on it), L{link<tunneld.transports.grpc.link>} (the
HTTP/2 connection both ends share), L{edge<tunneld.transports.grpc.edge>}
(the server, with replay), L{agent<tunneld.transports.grpc.agent>} (the
client and its pool of calls) and L{plugin<tunneld.transports.grpc.plugin>}.
The names below are the transport's public ones, importable from here.
"""

from __future__ import annotations

from tunneld.transports.grpc.agent import AgentGrpcFactory, AgentGrpcLink, dial
from tunneld.transports.grpc.edge import EdgeGrpcFactory, EdgeGrpcLink
from tunneld.transports.grpc.framing import (
    _REUSE,
    CONTROL_PATH,
    FORWARD_PATH,
    GRPC_CONTENT_TYPE,
    IDLE_HEADER,
    REUSE_HEADER,
    SERVICE,
    _CallError,
    _data_head,
    _data_payload,
    data_message,
    grpc_message,
)
from tunneld.transports.grpc.link import GrpcLink
from tunneld.transports.grpc.options import GrpcAgentOptions, GrpcEdgeOptions, split_address
from tunneld.transports.grpc.plugin import GrpcTransport
from tunneld.transports.grpc.status import (
    _STATUS_FOR_REASON,
    GrpcStatus,
    reason_from_status,
    rst_code,
    status_message,
)
from tunneld.transports.grpc.stream import GrpcStream, _Call

__all__ = [
    "CONTROL_PATH",
    "FORWARD_PATH",
    "GRPC_CONTENT_TYPE",
    "IDLE_HEADER",
    "REUSE_HEADER",
    "SERVICE",
    "_REUSE",
    "_STATUS_FOR_REASON",
    "AgentGrpcFactory",
    "AgentGrpcLink",
    "EdgeGrpcFactory",
    "EdgeGrpcLink",
    "GrpcAgentOptions",
    "GrpcEdgeOptions",
    "GrpcLink",
    "GrpcStatus",
    "GrpcStream",
    "GrpcTransport",
    "_Call",
    "_CallError",
    "_data_head",
    "_data_payload",
    "data_message",
    "dial",
    "grpc_message",
    "reason_from_status",
    "rst_code",
    "split_address",
    "status_message",
]
