"""The end-to-end suite over the gRPC transport."""

from __future__ import annotations

from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import TestCase

from tests.end_to_end import EndToEndMixin


class _Hostile(protocol.Protocol):
    """Opens Control like an agent, then sends a message that is not a Frame."""

    def connectionMade(self) -> None:  # noqa: N802
        self.closed: defer.Deferred[None] = defer.Deferred()
        conn = H2Connection(H2Configuration(client_side=True))
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [
            (":method", "POST"), (":scheme", "http"), (":path", "/tunneld.v1.TunnelAgent/Control"),
            (":authority", "edge"), ("content-type", "application/grpc"), ("te", "trailers"),
        ])
        garbage = b"\xff\xfe not a protobuf frame \x00\x01"
        conn.send_data(sid, b"\x00" + len(garbage).to_bytes(4, "big") + garbage)
        self.transport.write(conn.data_to_send())

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        self.closed.callback(None)


class GrpcEndToEnd(EndToEndMixin, TestCase):
    """Every end-to-end behaviour over the grpc (HTTP/2) transport."""

    transport = "grpc"

    def agent_table(self, address: Any) -> dict[str, Any]:
        return {"address": f"127.0.0.1:{address.port}"}

    async def send_malformed_frame(self, address: Any) -> None:
        proto = await TCP4ClientEndpoint(reactor, "127.0.0.1", address.port).connect(
            protocol.Factory.forProtocol(_Hostile)
        )
        await proto.closed
