"""/healthz and /readyz on their own listener of a real edge."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody

from tests.harness import TunnelHarness


class ProbeTests(TestCase):
    timeout = 15

    async def get(self, port: int, path: str) -> tuple[int, bytes]:
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await Agent(reactor, pool=pool).request(
            b"GET", f"http://127.0.0.1:{port}{path}".encode()
        )
        return response.code, await readBody(response)

    async def test_healthz_and_readyz(self) -> None:
        """Both answer 200 on a running edge; while draining /readyz is 503 saying so, /healthz stays 200."""
        harness = TunnelHarness(self, "websocket", {"listen": "tcp:0:interface=127.0.0.1"})
        edge = await harness.start_edge(health_listen="tcp:0:interface=127.0.0.1")
        assert edge.probes is not None
        await edge.probes.listening
        port = edge.probes.address.port
        self.assertEqual(await self.get(port, "/healthz"), (200, b"ok\n"))
        self.assertEqual(await self.get(port, "/readyz"), (200, b"ok\n"))
        edge.policy.draining = True
        self.assertEqual(await self.get(port, "/readyz"), (503, b"draining\n"))
        self.assertEqual(await self.get(port, "/healthz"), (200, b"ok\n"))
        edge.policy.draining = False
        await edge.public[0].stopService()
        code, body = await self.get(port, "/readyz")
        self.assertEqual(code, 503)
        self.assertIn(b"is not listening", body)
