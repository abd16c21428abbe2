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

from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.interfaces import IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from tunneld.config.values import HealthCheck

__all__ = ["UpstreamProbe"]


@implementer(IAgentEndpointFactory)
class _TheUpstream:
    """Every probe request goes to the tunnel's upstream endpoint, whatever its URL names."""

    def __init__(self, reactor: Any, upstream: str) -> None:
        self.reactor = reactor
        self.upstream = upstream

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:  # noqa: N802
        """IAgentEndpointFactory.endpointForURI"""
        return clientFromString(self.reactor, self.upstream)


class _HangUp(Protocol):
    """Takes a response body by closing its connection: a probe wants the status only."""

    def connectionMade(self) -> None:  # noqa: N802
        IPushProducer(self.transport).stopProducing()


def _http_client(reactor: Any, upstream: str) -> HTTPClient:
    """treq over the upstream's endpoint, one connection per probe (C{Connection: close})."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    return HTTPClient(Agent.usingEndpointFactory(reactor, _TheUpstream(reactor, upstream), pool))


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
        self._http = _http_client(reactor, upstream) if check.kind == "http" else None

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
        check = self.check
        if check.kind == "tcp":
            endpoint = clientFromString(self.reactor, self.upstream)
            d: Deferred[Any] = connectProtocol(endpoint, Protocol())
            d.addCallback(self._tcp_connected)
        else:
            # The URL's host is never dialled (the endpoint is the upstream's);
            # the request says Host: the tunnel's hostname, as a public one would.
            assert self._http is not None
            d = self._http.get(
                f"http://upstream{check.path}",
                headers=Headers(
                    {b"Host": [self.hostname.encode("latin-1")], b"User-Agent": [b"tunneld-agent-probe"]}
                ),
                allow_redirects=False, unbuffered=True,
            )
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

    def _http_answered(self, response: IResponse) -> tuple[bool, str]:
        response.deliverBody(_HangUp())
        status = response.code
        expected = self.check.status
        ok = status == expected if expected is not None else 200 <= status < 400
        return ok, f"GET {self.check.path} answered {status}"

    def _failed(self, failure: Failure) -> None:
        if isinstance(failure.value, ResponseFailed) and failure.value.reasons:
            failure = failure.value.reasons[0]  # the connection's or the parser's own error
        self._verdict(False, f"{self.check.kind} probe failed: {failure.getErrorMessage()}")

    def _verdict(self, healthy: bool, detail: str) -> None:
        if self._stopped:
            return
        self.detail = detail
        if healthy != self.healthy:
            self.healthy = healthy
            self.report(healthy, detail)
