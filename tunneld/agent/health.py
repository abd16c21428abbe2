# -*- test-case-name: tests.test_health -*-
"""
The agent's upstream probes.

A tunnel may name a health check: C{tcp} (the upstream accepts a connection)
or C{http:/path[:STATUS]} (a C{GET} of C{path} answers C{STATUS}, or any 2xx
or 3xx when none is given).  L{UpstreamProbe} runs it every C{interval}
seconds on the reactor clock and reports only changes of verdict; the agent
sends them to the edge as L{tunneld.model.messages.Health}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from tunneld.config.values import HealthCheck

__all__ = ["UpstreamProbe"]

_MAX_STATUS_LINE = 8192


class _StatusLine(Protocol):
    """Sends one GET and reads the status line of the answer."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.buffer = b""
        # Cancelled on timeout: drop the connection too.
        self.status: Deferred[int] = Deferred(lambda _: self._close())

    def connectionMade(self) -> None:  # noqa: N802
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.status.called:
            return
        self.buffer += data
        line, sep, _ = self.buffer.partition(b"\r\n")
        if not sep:
            if len(self.buffer) > _MAX_STATUS_LINE:
                self.status.errback(ValueError("no status line"))
                self._close()
            return
        parts = line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            self.status.errback(ValueError(f"not an HTTP answer: {line[:80]!r}"))
        else:
            self.status.callback(int(parts[1]))
        self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        if not self.status.called:
            self.status.errback(ConnectionError("closed before answering"))


class UpstreamProbe:
    """Probes one upstream every C{interval} seconds; calls C{report(healthy, detail)} on changes."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        upstream: str,
        hostname: str,
        check: HealthCheck,
        interval: float,
        timeout: float,
        report: Callable[[bool, str], None],
    ) -> None:
        self.reactor = reactor
        self.upstream = upstream
        self.hostname = hostname
        self.check = check
        self.timeout = timeout
        self.report = report
        self.healthy: bool | None = None
        self.detail = ""
        self._loop = LoopingCall(self._probe)
        self._loop.clock = reactor
        self._interval = interval
        self._running: Deferred[Any] | None = None
        self._stopped = False

    def start(self) -> None:
        self._loop.start(self._interval, now=True).addErrback(
            lambda f: self.log.failure("upstream probe stopped", f)
        )

    def stop(self) -> None:
        self._stopped = True
        if self._loop.running:
            self._loop.stop()
        if self._running is not None:
            self._running.cancel()

    def _probe(self) -> Deferred[Any]:
        endpoint = clientFromString(self.reactor, self.upstream)
        check = self.check
        if check.kind == "tcp":
            d: Deferred[Any] = connectProtocol(endpoint, Protocol())
            d.addCallback(self._tcp_connected)
        else:
            request = (
                f"GET {check.path} HTTP/1.1\r\nHost: {self.hostname}\r\n"
                "User-Agent: tunneld-agent-probe\r\nConnection: close\r\n\r\n"
            ).encode("latin-1")
            probe = _StatusLine(request)
            d = connectProtocol(endpoint, probe)
            d.addCallback(lambda _: probe.status)
            d.addCallback(self._http_answered)
        d.addTimeout(self.timeout, self.reactor)
        d.addCallbacks(lambda verdict: self._verdict(*verdict), self._failed)
        self._running = d
        d.addBoth(self._done)
        return d

    def _done(self, result: Any) -> None:
        self._running = None

    def _tcp_connected(self, protocol: Protocol) -> tuple[bool, str]:
        assert protocol.transport is not None
        protocol.transport.loseConnection()
        return True, "tcp connect ok"

    def _http_answered(self, status: int) -> tuple[bool, str]:
        expected = self.check.status
        ok = status == expected if expected is not None else 200 <= status < 400
        return ok, f"GET {self.check.path} answered {status}"

    def _failed(self, failure: Failure) -> None:
        self._verdict(False, f"{self.check.kind} probe failed: {failure.getErrorMessage()}")

    def _verdict(self, healthy: bool, detail: str) -> None:
        if self._stopped:
            return
        self.detail = detail
        if healthy != self.healthy:
            self.healthy = healthy
            self.report(healthy, detail)
