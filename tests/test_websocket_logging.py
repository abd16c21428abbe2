"""
Autobahn's per-frame debug logging stays out of the log at txaio's default
level, and importing the WebSocket plugin leaves txaio's global level, which
belongs to the application, alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
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

    def test_importing_the_plugin_leaves_the_global_log_level(self) -> None:
        """An application that set txaio's global level to debug still has it after loading the plugins."""
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        result = subprocess.run(
            [sys.executable, "-c",
             "import txaio; txaio.use_twisted(); txaio.set_global_log_level('debug');"
             "from tunneld.registry import available_transports;"
             "assert 'websocket' in available_transports();"
             "print(txaio.get_global_log_level())"],
            capture_output=True, text=True, cwd=root, timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), "debug")
