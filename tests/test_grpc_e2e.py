"""The end-to-end suite over the gRPC transport."""

from __future__ import annotations

import gc
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import TestCase

from tests.end_to_end import EndToEndMixin
from tests.harness import sleep
from tests.switches import TricksOff
from tunneld.transports.grpc import GrpcStream, _Call


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

    async def test_cancelled_requests_leave_no_cyclic_garbage(self) -> None:
        """Requests whose client went away mid-request leave no gRPC stream or call for the cyclic GC."""
        harness, upstream = await self.tunnel()
        await harness.request("app.test", "/hello")  # the link and the pools are set up
        if gc.isenabled():
            gc.disable()
            self.addCleanup(gc.enable)
        gc.collect()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", harness.public_port)
        for i in range(3):
            client = await endpoint.connect(protocol.Factory.forProtocol(protocol.Protocol))
            client.transport.write(b"GET /hang HTTP/1.1\r\nHost: app.test\r\n\r\n")
            while len(upstream.hanging) <= i:
                await sleep(0.01)
            client.transport.abortConnection()
        while any(request.channel is not None for request in upstream.hanging):
            await sleep(0.01)  # the agent gave up each upstream request
        await sleep(0.05)
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            garbage = [type(o).__qualname__ for o in gc.garbage if isinstance(o, (GrpcStream, _Call))]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        self.assertEqual(garbage, [])


class GrpcEndToEndTricksOff(TricksOff, GrpcEndToEnd):
    """Every end-to-end behaviour over the grpc transport with every speed trick off (h2's public API)."""
