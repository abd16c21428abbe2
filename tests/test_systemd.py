"""
The edge as systemd runs it: C{Type=notify} readiness over a real
C{NOTIFY_SOCKET}, C{STOPPING=1} on SIGTERM, watchdog pings, and the shipped
unit files checked by C{systemd-analyze verify}.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from tests.harness import TunnelHarness, listen_upstream, sleep
from tests.test_processes import TWISTD, TwistdProcess, spawn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNITS = ["tunneld.service", "tunneld.socket", "tunneld-agent@.service"]

EDGE_CONFIG = """\
[edge]
public_listen = ["tcp:0:interface=127.0.0.1"]
admin_listen = "tcp:0:interface=127.0.0.1"

[transports.websocket]
listen = "tcp:0:interface=127.0.0.1"
"""


class _NotifySocket(protocol.DatagramProtocol):
    """systemd's end of NOTIFY_SOCKET: records each datagram's assignments."""

    def __init__(self) -> None:
        self.messages: list[dict[str, str]] = []
        self._waiters: list[tuple[str, defer.Deferred[dict[str, str]]]] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:  # noqa: N802
        message = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append(message)
        for key, d in list(self._waiters):
            if key in message:
                self._waiters.remove((key, d))
                d.callback(message)

    def wait_for(self, key: str) -> defer.Deferred[dict[str, str]]:
        d: defer.Deferred[dict[str, str]] = defer.Deferred()
        for message in self.messages:
            if key in message:
                d.callback(message)
                return d
        self._waiters.append((key, d))
        return d


def listen_notify(case: TestCase) -> tuple[_NotifySocket, str]:
    """systemd's end of NOTIFY_SOCKET for one test: the socket, and the variable's value."""
    notify = _NotifySocket()
    name = f"tunneld-test-{uuid.uuid4().hex}"
    port = reactor.listenUNIXDatagram("\0" + name, notify)  # type: ignore[attr-defined]
    case.addCleanup(port.stopListening)
    return notify, "@" + name


def write_config(case: TestCase, name: str, text: str) -> str:
    """C{text} as a file C{name} in a directory of the test's own."""
    directory = tempfile.mkdtemp()
    case.addCleanup(shutil.rmtree, directory)
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(text)
    return path


class _Probe(protocol.Protocol):
    pass


class NotifyProcessTests(TestCase):
    timeout = 60

    async def test_ready_after_listeners_and_stopping_on_sigterm(self) -> None:
        """READY=1 comes once every listener accepts; SIGTERM sends STOPPING=1 before exit."""
        notify, address = listen_notify(self)
        config = write_config(self, "edge.toml", EDGE_CONFIG)
        proto = spawn(
            self, [*TWISTD, "--nodaemon", "--pidfile=", "tunneld", "--config", config],
            env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": None},
        )
        process = proto.process
        ended = proto.ended
        ready = await notify.wait_for("READY")
        self.assertEqual(ready["READY"], "1")
        self.assertEqual(ready["MAINPID"], str(process.pid))
        # Nothing but READY=1 (and watchdog pings) came before it.
        self.assertEqual(
            [m for m in notify.messages if "WATCHDOG" not in m][0], ready
        )
        listening = dict(re.findall(r"(\w[\w ]*?) on 127\.0\.0\.1:(\d+)", ready["STATUS"]))
        self.assertEqual(
            sorted(listening), ["admin API", "public HTTP", "websocket agent link"], ready
        )
        # Every listener accepts at the moment READY=1 is seen.
        for number in listening.values():
            connected = await TCP4ClientEndpoint(reactor, "127.0.0.1", int(number)).connect(
                protocol.Factory.forProtocol(_Probe)
            )
            connected.transport.loseConnection()
        response = await Agent(reactor).request(
            b"GET", f"http://127.0.0.1:{listening['admin API']}/readyz".encode()
        )
        self.assertEqual(response.code, 200)
        await readBody(response)
        await notify.wait_for("WATCHDOG")

        process.signalProcess(signal.SIGTERM)
        stopping = await notify.wait_for("STOPPING")
        self.assertEqual(stopping["STOPPING"], "1")
        await ended
        self.assertIn(proto.end_reason.value.exitCode, (0, None))


class AgentNotifyProcessTests(TestCase):
    timeout = 60

    async def test_agent_ready_once_its_link_is_up(self) -> None:
        """The agent sends READY=1 (and logs ready) only after the edge welcomed it, not at start."""
        notify, address = listen_notify(self)
        upstream_port, _ = await listen_upstream(self)
        # The edge's agent-link port: free now, listened on only later.
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        link_port = probe.getsockname()[1]
        probe.close()
        with open(os.path.join(ROOT, "etc", "agent.toml")) as f:
            text = f.read()
        for old, new in {
            'url = "ws://127.0.0.1:8081/tunnel"': f'url = "ws://127.0.0.1:{link_port}/tunnel"',
            'upstream = "tcp:host=127.0.0.1:port=8000"':
                f'upstream = "tcp:host=127.0.0.1:port={upstream_port}"',
            "reconnect_initial = 0.5": "reconnect_initial = 0.1",
            "reconnect_max = 30.0": "reconnect_max = 0.5",
        }.items():
            self.assertIn(old, text)
            text = text.replace(old, new)
        config = write_config(self, "agent.toml", text)
        proto = spawn(
            self, [*TWISTD, "--nodaemon", "--pidfile=", "tunneld-agent", "--config", config],
            env={"NOTIFY_SOCKET": address},
        )
        # Started, the edge not up: a failed dial, then another.
        await proto.wait_for(r"(?s)(cannot connect to the edge|link down).*"
                             r"(cannot connect to the edge|link down)")
        for _ in range(3):
            await sleep(0)
        self.assertEqual([m for m in notify.messages if "READY" in m], [])
        self.assertNotIn("] ready:", proto.output)
        self.assertNotIn("link down", proto.output)
        # The edge comes up on that port; the agent's next dial gets in.
        harness = TunnelHarness(self, "websocket", {"listen": f"tcp:{link_port}:interface=127.0.0.1"})
        await harness.start_edge()
        ready = await notify.wait_for("READY")
        self.assertEqual(ready["READY"], "1")
        self.assertEqual(ready["STATUS"], "agent demo serving http://demo.localhost/")
        await proto.wait_for(r"\] ready: ")
        self.assertRegex(proto.output, r"(?s)tunnel ready: http://demo\.localhost/.*\] ready: agent demo")


class SocketActivationTests(TestCase):
    timeout = 60

    async def test_public_listener_from_systemd(self) -> None:
        """public_listen = systemd:domain=INET:index=0 serves on the socket handed over as fd 3."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        port = sock.getsockname()[1]
        config = write_config(self, "edge.toml", EDGE_CONFIG.replace(
            'public_listen = ["tcp:0:interface=127.0.0.1"]',
            'public_listen = ["systemd:domain=INET:index=0"]',
        ))
        # As systemd does: LISTEN_PID is the pid of the process that execs twistd.
        script = (
            f'export LISTEN_PID=$$; exec "{sys.executable}" -c '
            '"from twisted.scripts.twistd import run; run()" '
            f'--nodaemon --pidfile= tunneld --config "{config}"'
        )
        proto = spawn(
            self, ["/bin/sh", "-c", script],
            env={"LISTEN_FDS": "1", "LISTEN_FDNAMES": "tunneld.socket", "NOTIFY_SOCKET": None},
            child_fds={0: "w", 1: "r", 2: "r", 3: sock.fileno()},
        )
        process = proto.process
        sock.close()  # the child holds it now, as after systemd's fork
        await proto.wait_for(rf"public HTTP listening on 127\.0\.0\.1:{port}\b")
        response = await Agent(reactor).request(
            b"GET", f"http://127.0.0.1:{port}/".encode(),
            Headers({b"host": [b"nobody.test"]}),
        )
        self.assertEqual(response.code, 404)
        self.assertEqual(response.headers.getRawHeaders(b"tunnel-error"), [b"no_tunnel"])
        await readBody(response)
        process.signalProcess(signal.SIGTERM)
        await proto.ended


def _socket_unit() -> tuple[str, str]:
    """The shipped tunneld.socket's ListenStream= and the public_listen its comment documents."""
    with open(os.path.join(ROOT, "systemd", "tunneld.socket")) as f:
        text = f.read()
    (listen,) = re.findall(r"^ListenStream=(.*)$", text, re.M)
    (documented,) = re.findall(r'^#\s+public_listen = \["(systemd:[^"]+)"\]', text, re.M)
    return listen, documented


def _free_port() -> int:
    """A port free on every loopback address, IPv4 and IPv6 (bound dual-stack, noted, closed)."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", 0))
    port = int(sock.getsockname()[1])
    sock.close()
    return port


class SystemdSocketActivateTests(TestCase):
    """
    The edge started by systemd-socket-activate, systemd's own tool, which
    binds the socket as a .socket unit's ListenStream= would and execs the
    edge on the first connection: the addresses the edge reports for itself
    and for its clients are the real ones, for each socket family.
    """

    timeout = 90

    def setUp(self) -> None:
        for tool in ("systemd-socket-activate", "curl"):
            if shutil.which(tool) is None:
                raise SkipTest(f"{tool} is not installed (scripts/setup-tests installs it)")

    async def curl(self, address: str, port: int, path: str) -> str:
        host = f"[{address}]" if ":" in address else address
        out, err, code = await getProcessOutputAndValue("curl", [
            "-sS", "--noproxy", "*", "--max-time", "60", "-H", "Host: demo.test",
            f"http://{host}:{port}{path}",
        ], env=dict(os.environ))
        self.assertEqual(code, 0, err)
        return out.decode()

    async def activate(
        self, listen: str, public_listen: str, clients: list[str], listening_on: str,
    ) -> TwistdProcess:
        """
        Run the edge on a systemd-socket-activate socket (C{listen} as in
        ListenStream=, with the port replaced) and check that each of
        C{clients} reaches the upstream named by its own address.
        """
        port = _free_port()
        listen = re.sub(r"\d+$", str(port), listen)
        upstream_port, _ = await listen_upstream(self)
        config = write_config(self, "edge.toml", EDGE_CONFIG.replace(
            'public_listen = ["tcp:0:interface=127.0.0.1"]', f'public_listen = ["{public_listen}"]'
        ))
        # --fdname as systemd names every socket it passes (Twisted finds none unnamed).
        proto = spawn(
            self,
            ["systemd-socket-activate", "-l", listen, "--fdname=tunneld.socket",
             *TWISTD, "--nodaemon", "--pidfile=", "tunneld", "--config", config],
            env=dict.fromkeys(("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")),
        )
        process = proto.process
        await proto.wait_for(r"Listening on .* as 3\.")
        # The first client starts the edge: it waits in the socket's backlog meanwhile.
        first = defer.ensureDeferred(self.curl(clients[0], port, "/"))
        link = await proto.wait_for(r"websocket agent link listening on 127\.0\.0\.1:(\d+)")
        self.assertIn("no tunnel is registered for this host", await first)
        harness = TunnelHarness(self, "websocket", {})
        await harness.start_agent(
            {"url": f"ws://127.0.0.1:{link.group(1)}/tunnel"}, [("demo.test", upstream_port)]
        )
        for client in clients:
            body = await self.curl(client, port, "/headers")
            (forwarded,) = re.findall(r"^x-forwarded-for: (.*)$", body, re.M)
            self.assertEqual(forwarded.split(",")[-1].strip(), client, body)
        self.assertIn(f"public HTTP listening on {listening_on.format(port=port)}\n", proto.output)
        process.signalProcess(signal.SIGTERM)
        await proto.ended
        return proto

    async def test_shipped_unit_dual_stack(self) -> None:
        """tunneld.socket as shipped (dual-stack [::]) with its documented public_listen: IPv4 and IPv6 clients named right."""
        listen, documented = _socket_unit()
        edge = await self.activate(listen, documented, ["127.0.0.1", "::1"], "[::]:{port}")
        self.assertNotIn("says domain=", edge.output)

    async def test_dual_stack_socket_adopted_as_inet(self) -> None:
        """A dual-stack socket under domain=INET (the old docs): adopted as INET6, a warning, real addresses."""
        listen, _ = _socket_unit()
        edge = await self.activate(
            listen, "systemd:domain=INET:index=0", ["127.0.0.1", "::1"], "[::]:{port}"
        )
        self.assertIn(
            "'systemd:domain=INET:index=0' says domain=INET but the socket systemd passed is INET6",
            edge.output,
        )

    async def test_ipv4_socket(self) -> None:
        """ListenStream=127.0.0.1:PORT with domain=INET: the IPv4 client is named."""
        await self.activate(
            "127.0.0.1:0", "systemd:domain=INET:index=0", ["127.0.0.1"], "127.0.0.1:{port}"
        )

    async def test_ipv6_socket(self) -> None:
        """ListenStream=[::1]:PORT with domain=INET6: the IPv6 client is named."""
        await self.activate("[::1]:0", "systemd:domain=INET6:index=0", ["::1"], "[::1]:{port}")


class UnitFileTests(TestCase):
    def test_units_verify(self) -> None:
        """systemd-analyze verify accepts every shipped unit with no warnings."""
        tool = shutil.which("systemd-analyze")
        if tool is None:
            raise SkipTest("systemd-analyze is not installed (Debian package systemd; scripts/setup)")
        # ExecStart names the installed path; point it at this venv's twistd,
        # which must exist for verify to pass, and check everything else as shipped.
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        if not os.access(twistd, os.X_OK):
            twistd = shutil.which("twistd") or twistd
        work = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, work)
        for unit in UNITS:
            with open(os.path.join(ROOT, "systemd", unit)) as f:
                text = f.read()
            if unit.endswith(".service"):
                self.assertIn("/opt/tunneld/.venv/bin/twistd --nodaemon --pidfile=", text)
            with open(os.path.join(work, unit), "w") as f:
                f.write(text.replace("/opt/tunneld/.venv/bin/twistd", twistd))
        result = subprocess.run(
            [tool, "verify", "--man=no", *(os.path.join(work, u) for u in UNITS)],
            capture_output=True, text=True, timeout=60, cwd=work,
        )
        output = (result.stdout + result.stderr).strip()
        self.assertEqual((result.returncode, output), (0, ""))

    def test_units_as_documented(self) -> None:
        """The units run twistd in the foreground with notify readiness, reload and hardening."""
        for unit in ("tunneld.service", "tunneld-agent@.service"):
            with open(os.path.join(ROOT, "systemd", unit)) as f:
                text = f.read()
            for line in ("Type=notify", "NoNewPrivileges=yes", "ProtectSystem=strict",
                         "DynamicUser=yes", "LimitNOFILE=", "--nodaemon --pidfile="):
                self.assertIn(line, text, unit)
            if unit == "tunneld.service":
                self.assertIn("ExecReload=/bin/kill -HUP $MAINPID", text)
        listen, documented = _socket_unit()
        self.assertEqual((listen, documented), ("80", "systemd:domain=INET6:index=0"))
        with open(os.path.join(ROOT, "docs", "operations.md")) as f:
            self.assertIn(f'public_listen = ["{documented}"]', f.read())
