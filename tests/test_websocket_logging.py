"""The WebSocket transport keeps Autobahn's per-frame debug logging out of the log."""

from __future__ import annotations

from typing import Any

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tunneld.transports.websocket import AgentWebSocketProtocol, EdgeWebSocketProtocol


class FrameLoggingTests(SynchronousTestCase):
    def test_debug_lines_are_dropped_at_the_default_level(self) -> None:
        """Both ends log through Autobahn's level-filtered logger, so per-frame debug lines cost nothing."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for protocol in (EdgeWebSocketProtocol, AgentWebSocketProtocol):
            protocol.log.debug("sent {octets} bytes for peer {peer}", octets=64, peer="test")
        self.assertEqual(events, [])
