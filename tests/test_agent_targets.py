"""
Dialling an edge by URL (L{tunneld.agent.targets}) and the edge's choice of
one for a drained agent (L{tunneld.edge.cluster.reconnect_target}).
"""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from tunneld.agent.targets import retarget, transport_of
from tunneld.edge.cluster import reconnect_target
from tunneld.interfaces import EdgeRecord
from tunneld.transports.grpc import GrpcAgentOptions
from tunneld.transports.websocket import WebSocketAgentOptions


class RetargetTests(TestCase):
    def test_schemes_name_transports(self) -> None:
        """ws/wss dial over websocket, grpc/grpcs over grpc; anything else over nothing."""
        self.assertEqual(transport_of("wss://a:1/tunnel"), "websocket")
        self.assertEqual(transport_of("WS://a:1/tunnel"), "websocket")
        self.assertEqual(transport_of("grpcs://a:1"), "grpc")
        self.assertIsNone(transport_of("http://a:1/"))
        self.assertIsNone(transport_of("a:1"))

    def test_websocket_takes_the_url(self) -> None:
        """The WebSocket options keep their timeouts and take the whole URL."""
        options = WebSocketAgentOptions(url="ws://old:1/tunnel", heartbeat_interval=3.0)
        aimed = retarget("websocket", options, "wss://new.example:8443/tunnel")
        self.assertEqual(aimed, WebSocketAgentOptions(url="wss://new.example:8443/tunnel",
                                                      heartbeat_interval=3.0))
        self.assertIsNone(retarget("websocket", options, "grpc://new:1"))

    def test_grpc_takes_address_and_tls(self) -> None:
        """gRPC options take host:port, and TLS from the scheme."""
        options = GrpcAgentOptions(address="old:1", tls=False)
        aimed = retarget("grpc", options, "grpcs://[::1]:8082")
        self.assertEqual((aimed.address, aimed.tls), ("[::1]:8082", True))
        aimed = retarget("grpc", GrpcAgentOptions(tls=True), "grpc://b:2")
        self.assertEqual((aimed.address, aimed.tls), ("b:2", False))

    def test_unknown_transport_is_not_aimed(self) -> None:
        """A third-party transport dials only as its own table says."""
        self.assertIsNone(retarget("carrier-pigeon", object(), "ws://a:1/tunnel"))


class ReconnectTargetTests(TestCase):
    edges = [
        EdgeRecord("b/2", "b", agent_urls=("grpc://b:2", "ws://b:1/tunnel")),
        EdgeRecord("a/1", "a", agent_urls=("ws://a:1/tunnel",)),
        EdgeRecord("c/3", "c", agent_urls=("grpcs://c:2",)),
    ]

    def test_same_transport_taking_turns(self) -> None:
        """Agents of one transport are sent round the edges that speak it, one URL per edge."""
        targets = [reconnect_target(self.edges, "websocket", turn) for turn in range(4)]
        self.assertEqual(targets, ["ws://a:1/tunnel", "ws://b:1/tunnel"] * 2)
        targets = [reconnect_target(self.edges, "grpc", turn) for turn in range(2)]
        self.assertEqual(targets, ["grpc://b:2", "grpcs://c:2"])

    def test_none_speaks_it(self) -> None:
        """No other edge for the transport (or none at all): '' (the agent's own URLs)."""
        self.assertEqual(reconnect_target(self.edges, "streamable-http", 0), "")
        self.assertEqual(reconnect_target([], "websocket", 0), "")
