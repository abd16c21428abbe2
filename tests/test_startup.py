"""
Start-up failures are failures: an edge whose listener cannot listen exits
non-zero, names the listener's key, the endpoint and the OS error, and never
says ready (no C{ready} log line, no C{READY=1} to systemd).
"""

from __future__ import annotations

import os
import socket

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.test_processes import TWISTD, spawn
from tests.test_systemd import listen_notify, write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EDGE = {
    "public_listen": 'public_listen = ["{public}"]',
    "admin_listen": 'admin_listen = "{admin}"',
    "health_listen": 'health_listen = "{health}"',
    "link": '[transports.websocket]\nlisten = "{link}"',
}
FREE = "tcp:0:interface=127.0.0.1"


def held_port(case: SynchronousTestCase) -> int:
    """A loopback port this test keeps bound and listening (so it is in use)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    case.addCleanup(sock.close)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return int(sock.getsockname()[1])


def edge_config(case: TestCase, **listeners: str) -> str:
    """An edge file with every listener on port 0 except those given."""
    values = {"public": FREE, "admin": FREE, "health": FREE, "link": FREE, **listeners}
    text = "[edge]\n{}\n{}\n{}\n\n{}\n".format(
        EDGE["public_listen"], EDGE["admin_listen"], EDGE["health_listen"], EDGE["link"]
    ).format(**values)
    return write_config(case, "edge.toml", text)


class PortInUseProcessTests(TestCase):
    """A real C{twistd -n tunneld} with one listener on a port already in use."""

    timeout = 120

    async def assert_refuses_to_start(self, key: str, listener: str, role: str) -> None:
        port = held_port(self)
        endpoint = f"tcp:{port}:interface=127.0.0.1"
        config = edge_config(self, **{listener: endpoint})
        notify, address = listen_notify(self)
        proto = spawn(
            self, [*TWISTD, "--nodaemon", "--pidfile=", "tunneld", "--config", config],
            env={"NOTIFY_SOCKET": address},
        )
        # Whichever comes first: the exit, or (the defect) READY=1 with a listener down.
        ready = notify.wait_for("READY")
        await defer.DeferredList([proto.ended, ready], fireOnOneCallback=True)
        if ready.called:
            self.fail(f"READY=1 sent with {key} not listening:\n{proto.output}")
        output = proto.output
        self.assertEqual(proto.end_reason.value.exitCode, 1, output)
        self.assertIn(
            f"cannot start: {config}: {key}: {role} cannot listen on {endpoint}: "
            "[Errno 98] Address already in use",
            output,
        )
        self.assertNotIn("Traceback", output)
        self.assertNotIn("] ready:", output)
        # Let any datagram sent before the exit arrive before looking.
        await let_reactor_turn(3)
        self.assertEqual([m for m in notify.messages if "READY" in m], [], notify.messages)

    async def test_public_listen_in_use(self) -> None:
        """public_listen on a port in use: exit 1, the key, endpoint and errno named, no READY=1."""
        await self.assert_refuses_to_start("edge.public_listen[0]", "public", "public HTTP")

    async def test_admin_listen_in_use(self) -> None:
        """admin_listen on a port in use: exit 1, the key, endpoint and errno named, no READY=1."""
        await self.assert_refuses_to_start("edge.admin_listen", "admin", "admin API")

    async def test_agent_link_listen_in_use(self) -> None:
        """The agent-link listener on a port in use stops the edge the same way."""
        await self.assert_refuses_to_start(
            "transports.websocket.listen", "link", "websocket agent link"
        )

    async def test_health_listen_in_use(self) -> None:
        """health_listen on a port in use stops the edge the same way."""
        await self.assert_refuses_to_start("edge.health_listen", "health", "health probes")


async def let_reactor_turn(turns: int) -> None:
    """Let the reactor turn a few times (datagrams already sent get read)."""
    for _ in range(turns):
        d: defer.Deferred[None] = defer.Deferred()
        reactor.callLater(0, d.callback, None)
        await d
