"""
Real Redis servers and Sentinels for the state tests, one set per test.

Each process runs in the foreground with its log on stdout, in the test's
temporary directory, without persistence (a restart comes back empty, the
harder case for the edges).  Redis cannot listen on port 0 and say where,
so a port is picked at random below the ephemeral range (where outgoing
connections take theirs), checked free, and the start is retried on
"Address already in use".  Readiness is the server's own log line, then a
PING through redis-cli; a test waits for such events, never for a sleep.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue

REDIS_SERVER = shutil.which("redis-server")
REDIS_SENTINEL = shutil.which("redis-sentinel")
REDIS_CLI = shutil.which("redis-cli")
MISSING = (
    None if REDIS_SERVER and REDIS_SENTINEL and REDIS_CLI
    else "redis-server, redis-sentinel and redis-cli are needed (scripts/setup installs them)"
)


def candidate_port() -> int:
    """A port nothing listens on now, below the ephemeral range."""
    while True:
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


class LoggedProcess(protocol.ProcessProtocol):
    """A child process whose output lines a test can wait for."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.output = ""
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.process: Any = None
        self._waiters: list[tuple[re.Pattern[str], int, defer.Deferred[None]]] = []

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self.output += data.decode(errors="replace")
        for waiter in list(self._waiters):
            pattern, count, d = waiter
            if len(pattern.findall(self.output)) >= count:
                self._waiters.remove(waiter)
                d.callback(None)

    errReceived = outReceived  # noqa: N815

    def wait_for(self, regex: str, count: int = 1, timeout: float = 90.0) -> defer.Deferred[None]:
        """
        Fires once C{regex} has matched C{count} times in the output; fails
        after C{timeout} seconds with the output's end, saying what was awaited.
        """
        pattern = re.compile(regex)
        d: defer.Deferred[None] = defer.Deferred()
        if len(pattern.findall(self.output)) >= count:
            d.callback(None)
            return d
        waiter = (pattern, count, d)
        self._waiters.append(waiter)

        def late() -> None:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                d.errback(AssertionError(
                    f"{self.name}: no {count} x {regex!r} within {timeout}s:\n{self.output[-3000:]}"
                ))

        timer = reactor.callLater(timeout, late)  # type: ignore[attr-defined]
        d.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])
        return d

    def processEnded(self, reason: Any) -> None:  # noqa: N802
        waiters, self._waiters = self._waiters, []
        for _, _, d in waiters:
            d.errback(AssertionError(f"{self.name} ended first:\n{self.output[-3000:]}"))
        self.ended.callback(None)

    @property
    def running(self) -> bool:
        return not self.ended.called

    def signal(self, name: str) -> None:
        """Send SIGname (KILL, TERM, STOP, CONT, …) if the process still runs."""
        if self.running:
            self.process.signalProcess(signal.Signals["SIG" + name].value)

    async def stop(self) -> None:
        """SIGTERM, and SIGKILL if it has not ended within 10 seconds."""
        if not self.running:
            return
        self.signal("TERM")
        timer = reactor.callLater(10, self.signal, "KILL")  # type: ignore[attr-defined]
        await self.ended
        if timer.active():
            timer.cancel()


class RedisServer:
    """One redis-server (or redis-sentinel) the test started; restartable on its port."""

    def __init__(self, case: Any, kind: str, directory: str, extra: list[str]) -> None:
        self.case = case
        self.kind = kind
        self.directory = directory
        self.extra = extra
        self.port = 0
        self.process: LoggedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _argv(self, port: int) -> tuple[str, list[str]]:
        if self.kind == "sentinel":
            config = os.path.join(self.directory, "sentinel.conf")
            with open(config, "w") as f:
                f.write(f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n")
                f.write("".join(line + "\n" for line in self.extra))
            assert REDIS_SENTINEL
            return REDIS_SENTINEL, [REDIS_SENTINEL, config]
        assert REDIS_SERVER
        return REDIS_SERVER, [
            REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", self.directory,
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", "",
            *self.extra,
        ]

    async def start(self, port: int = 0) -> None:
        """Start on C{port} (0: a free one, retried on a collision); ready once it answers PING."""
        for _ in range(10):
            chosen = port or candidate_port()
            executable, argv = self._argv(chosen)
            proc = LoggedProcess(f"{self.kind} on {chosen}")
            proc.process = reactor.spawnProcess(  # type: ignore[attr-defined]
                proc, executable, argv, env={}, path=self.directory
            )
            ready = r"\+monitor master" if self.kind == "sentinel" else r"Ready to accept connections"
            try:
                await proc.wait_for(ready)
            except AssertionError:
                if "Address already in use" in proc.output and not port:
                    continue
                raise
            self.port = chosen
            self.process = proc
            await redis_cli(self.port, "PING")
            return
        raise AssertionError(f"no free port for {self.kind} after 10 tries")

    async def stop(self) -> None:
        if self.process is not None:
            await self.process.stop()

    async def restart(self) -> None:
        """Stopped, then started again on the same port (clients reconnect to it)."""
        await self.stop()
        await self.start(self.port)


async def start_server(case: Any, *extra: str, kind: str = "server") -> RedisServer:
    """A fresh server in its own temporary directory, stopped when the test ends."""
    directory = os.path.abspath(case.mktemp())
    os.makedirs(directory)
    server = RedisServer(case, kind, directory, list(extra))
    await server.start()
    case.addCleanup(lambda: defer.ensureDeferred(server.stop()))
    return server


async def redis_cli(port: int, *args: str) -> str:
    """Run redis-cli against C{port}; its output, or a failure naming the command."""
    assert REDIS_CLI
    out, err, code = await getProcessOutputAndValue(
        REDIS_CLI, ["-h", "127.0.0.1", "-p", str(port), *args], env={}
    )
    text = out.decode()
    if code != 0 or text.startswith("ERR") or text.startswith("(error)"):
        raise AssertionError(f"redis-cli {' '.join(args)}: {code} {text} {err.decode()}")
    return text


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float = 60.0, every: float = 0.05
) -> None:
    """
    Wait until C{check} is true (state with no event of its own, such as an
    expiry), asking every C{every} seconds; fail naming C{what} after
    C{timeout} seconds, which is generous because the machine may be busy.
    """
    deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]
    while not await check():
        if reactor.seconds() > deadline:  # type: ignore[attr-defined]
            raise AssertionError(f"timed out waiting for {what}")
        await sleep(every)
