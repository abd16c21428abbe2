"""
An agent lists transports in order: it falls back when the first cannot
connect, says why, and returns to the first once it works again.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tests.end_to_end import EventCollector
from tests.harness import TunnelHarness, listen_upstream, sleep
from tunneld.agent.service import AgentService
from tunneld.config import AgentConfig, AgentSection, TunnelSection
from tunneld.interfaces import EdgeLinkSetup
from tunneld.registry import find_transport, transport_options


class TransportChoiceTests(TestCase):
    timeout = 60

    async def test_fallback_and_return(self) -> None:
        """grpc down → websocket used and logged; grpc back → the agent moves to it."""
        events = EventCollector(self)
        harness = TunnelHarness(self, "websocket", {"listen": "tcp:0:interface=127.0.0.1"})
        edge = await harness.start_edge()
        upstream_port, _ = await listen_upstream(self)

        # A grpc port that nothing listens on yet: bind one, remember it, close it.
        grpc = find_transport("grpc", "(test)", "transports")
        setup = EdgeLinkSetup(on_link=edge.sessions.link_connected, reactor=reactor)
        probe = grpc.edge_service(grpc.edge_options({"listen": "tcp:0:interface=127.0.0.1"}, "t"), setup)
        probe.startService()
        await probe.listening
        grpc_port = probe.address.port
        await probe.stopService()

        section = AgentSection(
            id="a", transports=["grpc", "websocket"], prefer_retry_interval=0.2,
            reconnect_initial=0.05,
        )
        tables: dict[str, dict[str, Any]] = {
            "grpc": {"address": f"127.0.0.1:{grpc_port}", "connect_timeout": 2.0},
            "websocket": {"url": f"ws://127.0.0.1:{harness.link_address().port}/tunnel"},
        }
        config = AgentConfig(
            section,
            [TunnelSection(hostname="app.test", upstream=f"tcp:host=127.0.0.1:port={upstream_port}")],
            tables, "(test)",
        )
        agent = AgentService(
            config, transport_options(section.transports, tables, "(test)", edge=False), reactor
        )
        agent.startService()
        self.addCleanup(agent.stopService)
        await agent.ready
        assert agent.link is not None
        self.assertEqual(agent.link.transport_name, "websocket")
        fallbacks = events.matching(
            "transport {transport} failed ({error}); falling back to {fallback}"
        )
        self.assertEqual((fallbacks[0]["transport"], fallbacks[0]["fallback"]), ("grpc", "websocket"))
        code, _, _ = await harness.request("app.test", "/hello")
        self.assertEqual(code, 200)

        # grpc comes back on the same port: the agent returns to it.
        options = grpc.edge_options({"listen": f"tcp:{grpc_port}:interface=127.0.0.1"}, "t")
        service = grpc.edge_service(options, setup)
        service.startService()
        self.addCleanup(service.stopService)
        await service.listening
        for _ in range(100):
            if agent.link is not None and agent.link.transport_name == "grpc":
                break
            await sleep(0.05)
        assert agent.link is not None
        self.assertEqual(agent.link.transport_name, "grpc")
        # The websocket link drains and closes; only the grpc session is left.
        def transports() -> list[str]:
            return [s.link.transport_name for s in edge.sessions.sessions.values()]

        for _ in range(100):
            if transports() == ["grpc"]:
                break
            await sleep(0.05)
        self.assertEqual(transports(), ["grpc"])
        code, _, body = await harness.request("app.test", "/hello")
        self.assertEqual((code, body), (200, b"hello from upstream"))
