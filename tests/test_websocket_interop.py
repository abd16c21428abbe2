"""
A WebSocket agent written by a third party: examples/websocket_agent.py
(the stock C{websockets} client and aiohttp, no tunneld) through a real edge.
"""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from tests.harness import TunnelHarness
from tests.stock_agents import HOST, AgentProcess, StockAgentMixin, spawn_agent, stubs


class ExampleWebSocketAgentTests(StockAgentMixin, TestCase):
    """examples/websocket_agent.py through a real edge."""

    transport = "websocket"

    async def spawn(self, harness: TunnelHarness, token: str, upstream_port: int) -> AgentProcess:
        return spawn_agent(self, "websocket_agent.py", [
            "--stubs", await stubs(),
            "--edge", f"ws://127.0.0.1:{harness.link_address().port}/tunnel",
            "--agent-id", "example", "--token", token,
            "--tunnel", f"{HOST}=http://127.0.0.1:{upstream_port}",
        ])
