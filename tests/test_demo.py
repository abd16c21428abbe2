"""
The quick start as a person runs it: C{scripts/demo} in a terminal of its
own (its own session and process group), stopped the way people stop it,
Ctrl-C (SIGINT to the process group) or closing the terminal (SIGHUP to it),
leaves no process behind, with or without C{--tls}; a port already taken
stops it with the reason instead of serving whatever listens there; and what
it prints is the tunnel coming up, not noise.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sys
import tempfile
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.trial.unittest import SkipTest, TestCase

from tests.harness import sleep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Start the demo as a terminal would: a new session, SIGINT at its default.
LAUNCH = (
    "import os, signal, sys; os.setsid(); signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv('/bin/bash', ['bash', *sys.argv[1:]])"
)


class _Demo(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = ""
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._waiters: list[tuple[str, defer.Deferred[None]]] = []

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self.output += data.decode(errors="replace")
        for text, d in list(self._waiters):
            if text in self.output:
                self._waiters.remove((text, d))
                d.callback(None)

    errReceived = outReceived  # noqa: N815

    def wait_for(self, text: str) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if text in self.output:
            d.callback(None)
        else:
            self._waiters.append((text, d))
        return d

    def processEnded(self, reason: Any) -> None:  # noqa: N802
        for _, d in self._waiters:
            d.errback(AssertionError(f"the demo ended first:\n{self.output}"))
        self._waiters = []
        self.exit_code = reason.value.exitCode
        if not self.ended.called:
            self.ended.callback(None)


def _free_ports(n: int) -> list[int]:
    """C{n} loopback ports nothing listens on now (bound together, noted, closed)."""
    socks = []
    for _ in range(n):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        socks.append(sock)
    ports = [int(s.getsockname()[1]) for s in socks]
    for sock in socks:
        sock.close()
    return ports


def _session(sid: int) -> list[str]:
    """The live processes of session C{sid}: pid and command line."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(f"{entry} {cmdline}")
    return found


class DemoTests(TestCase):
    timeout = 240

    def setUp(self) -> None:
        if not os.access(os.path.join(ROOT, ".venv", "bin", "twistd"), os.X_OK):
            raise SkipTest("no .venv in the checkout (scripts/setup makes it)")

    def start(self, *args: str, ports: list[int] | None = None) -> tuple[_Demo, int, list[int]]:
        ports = ports or _free_ports(4)
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        env = dict(
            os.environ,
            TUNNELD_DEMO_PORTS=" ".join(map(str, ports)),
            TUNNELD_DEMO_DIR=directory,
        )
        demo = _Demo()
        process = reactor.spawnProcess(
            demo, sys.executable, [sys.executable, "-c", LAUNCH, "scripts/demo", *args],
            env=env, path=ROOT,
        )
        sid = process.pid

        async def leftovers() -> None:
            # Whatever the test's outcome, nothing of the demo survives it
            # (the script first, so that it starts nothing more).
            for _ in range(100):
                members = _session(sid)
                if not members:
                    return
                for line in sorted(members, key=lambda m: int(m.split()[0]) != sid):
                    try:
                        os.kill(int(line.split()[0]), signal.SIGKILL)
                    except OSError:
                        pass
                await sleep(0.1)

        self.addCleanup(leftovers)
        return demo, sid, ports

    async def assert_all_gone(self, demo: _Demo, sid: int) -> None:
        """The demo exits (within a minute, however busy the machine) and leaves nothing behind."""
        for _ in range(600):
            if demo.ended.called:
                break
            await sleep(0.1)
        else:
            self.fail(f"the demo is still running, with {_session(sid)}:\n{demo.output}")
        # The demo waited for its children; their output pipes close just after.
        for _ in range(300):
            if not _session(sid):
                break
            await sleep(0.1)
        self.assertEqual(_session(sid), [], demo.output)

    async def stop_with(self, sig: signal.Signals, *args: str) -> _Demo:
        demo, sid, ports = self.start(*args)
        await demo.wait_for("(Ctrl-C to stop)")
        # Ctrl-C (SIGINT) and a closed terminal (SIGHUP) go to the whole
        # foreground process group: the script and everything it started.
        os.killpg(sid, sig)
        await self.assert_all_gone(demo, sid)
        self.assertEqual(demo.exit_code, 128 + sig, demo.output)
        self.assertNotIn("Traceback", demo.output)
        # The edge and the agent were stopped, not orphaned: they said so.
        self.assertIn("edge stopped; refusals since start: none", demo.output)
        self.assertRegex(demo.output, r"\[agent\] .*Server Shut Down\.")
        for port in ports:
            with socket.socket() as sock:
                # As a server restarting would (connections may linger in TIME_WAIT).
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", port))
        return demo

    def assert_quiet(self, output: str) -> None:
        """What the demo prints is the tunnel coming up, nothing a person must read past."""
        output = output.split("(Ctrl-C to stop)")[0]
        public = re.search(r"Public URL:  (http://demo\.localhost:\d+/)", output)
        assert public is not None, output
        self.assertIn("Hello from behind the tunnel", output)
        for noise in ("Starting factory", " starting on ", "refused", "link down", "{'",
                      "Traceback", "cannot connect"):
            self.assertNotIn(noise, output)
        # The agent is ready once its tunnel is, and says so once.
        self.assertRegex(
            output, rf"(?s)tunnel ready: {re.escape(public.group(1))}.*\] ready: agent demo serving"
        )
        self.assertEqual(len(re.findall(r"\[edge\]  .*\] ready: listening", output)), 1)

    async def test_ctrl_c(self) -> None:
        """Ctrl-C stops the demo, its edge, agent and upstream; nothing is left; the log was quiet."""
        demo = await self.stop_with(signal.SIGINT)
        self.assert_quiet(demo.output)

    async def test_ctrl_c_tls(self) -> None:
        """Ctrl-C stops the --tls demo the same way."""
        demo = await self.stop_with(signal.SIGINT, "--tls")
        self.assert_quiet(demo.output)

    async def test_terminal_closed(self) -> None:
        """Closing the terminal (SIGHUP to its processes, which the edge alone takes as reload) stops everything."""
        await self.stop_with(signal.SIGHUP)

    async def test_terminal_closed_tls(self) -> None:
        """Closing the terminal stops the --tls demo the same way."""
        await self.stop_with(signal.SIGHUP, "--tls")

    async def with_port_taken(self, index: int) -> tuple[_Demo, int]:
        """The demo with the port at C{index} of its four already taken: it must stop, failed."""
        ports = _free_ports(4)
        taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", ports[index]))
        taken.listen(1)
        demo, sid, _ = self.start(ports=ports)
        await self.assert_all_gone(demo, sid)
        self.assertEqual(demo.exit_code, 1, demo.output)
        self.assertNotIn("Public URL", demo.output)
        return demo, ports[index]

    async def test_upstream_port_taken(self) -> None:
        """With the upstream's port taken the demo stops, saying so, instead of serving what listens there."""
        demo, port = await self.with_port_taken(0)
        self.assertIn(f"!! the demo upstream (127.0.0.1:{port}) exited before it was ready",
                      demo.output)
        self.assertIn("Address already in use", demo.output)

    async def test_public_port_taken(self) -> None:
        """With the public port taken the edge stops at once and the demo with it, naming the key."""
        demo, port = await self.with_port_taken(1)
        self.assertIn("!! the edge exited before it was ready", demo.output)
        self.assertIn(
            f"edge.public_listen[0]: public HTTP cannot listen on tcp:{port}:interface=127.0.0.1: "
            "[Errno 98] Address already in use",
            demo.output,
        )
