"""The end-to-end suite over the WebSocket transport, plus its own wire checks."""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import TestCase

from tests.end_to_end import EndToEndMixin
from tunneld.reasons import Reason


class _Hostile(WebSocketClientProtocol):  # type: ignore[misc]
    def onOpen(self) -> None:  # noqa: N802
        self.sendMessage(b"\xff\xfe not a protobuf frame \x00\x01", isBinary=True)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:  # noqa: N802
        self.factory.closed.callback((code, reason))


class WebSocketEndToEnd(EndToEndMixin, TestCase):
    """Every end-to-end behaviour over the websocket transport."""

    transport = "websocket"

    def agent_table(self, address: Any) -> dict[str, Any]:
        return {"url": f"ws://127.0.0.1:{address.port}/tunnel"}

    async def send_malformed_frame(self, address: Any) -> None:
        factory = WebSocketClientFactory(f"ws://127.0.0.1:{address.port}/tunnel")
        factory.protocol = _Hostile
        factory.closed = defer.Deferred()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", address.port).connect(factory)
        code, reason = await factory.closed
        self.assertEqual(code, 4000 + Reason.PROTOCOL_ERROR.wire_code)
        self.assertIn("protocol_error", reason)
