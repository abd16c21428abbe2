"""Public listeners: the backlog the edge asks the kernel for."""

from __future__ import annotations

import shutil

from twisted.internet.utils import getProcessOutput
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.harness import TunnelHarness
from tunneld.listening import with_backlog


class WithBacklogTests(SynchronousTestCase):
    def test_added_to_tcp_only_when_unset(self) -> None:
        """TCP endpoint strings get backlog=; ones that set it, and other kinds, are left alone."""
        self.assertEqual(with_backlog("tcp:8080", 1024), "tcp:8080:backlog=1024")
        self.assertEqual(
            with_backlog("tcp6:8080:interface=\\:\\:1", 64), "tcp6:8080:interface=\\:\\:1:backlog=64"
        )
        self.assertEqual(with_backlog("tcp:0:backlog=7", 1024), "tcp:0:backlog=7")
        self.assertEqual(with_backlog("unix:/run/tunneld.sock", 1024), "unix:/run/tunneld.sock")
        self.assertEqual(with_backlog("systemd:domain=INET:index=0", 1024),
                         "systemd:domain=INET:index=0")


class ListenBacklogTests(TestCase):
    async def test_edge_listens_with_configured_backlog(self) -> None:
        """The kernel reports the configured backlog on a public listener whose string sets none."""
        if shutil.which("ss") is None:
            raise self.skipTest("ss (iproute2) is not installed")
        harness = TunnelHarness(self, "websocket", {"listen": "tcp:0:interface=127.0.0.1"})
        edge = await harness.start_edge(
            public_h2c_listen=["tcp:0:interface=127.0.0.1"], listen_backlog=321
        )
        port = edge.public_h2c[0].address.port
        out = await getProcessOutput("ss", ["-Hltn", f"sport = :{port}"])
        # For a listening socket, ss's Send-Q column is the backlog.
        fields = out.decode().split()
        self.assertEqual(fields[2], "321", out)
