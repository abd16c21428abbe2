"""
A service that listens on one endpoint string and says where it listens.

Like L{twisted.application.internet.StreamServerEndpointService}, but it logs
the address actually bound (so port 0 is usable in tests and the operator
sees the real port) and exposes it as L{ListeningService.address}.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger


class ListeningService(Service):
    """Listen on C{description} with C{factory} while running."""

    log = Logger()

    def __init__(self, reactor: Any, description: str, factory: Any, role: str) -> None:
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.role = role
        self.port: IListeningPort | None = None
        self.listening: Deferred[IListeningPort] = Deferred()

    @property
    def address(self) -> Any:
        """The bound address (with the real port), once listening."""
        return self.port.getHost() if self.port is not None else None

    def privilegedStartService(self) -> None:  # noqa: N802
        Service.privilegedStartService(self)
        endpoint = serverFromString(self.reactor, self.description)
        d = endpoint.listen(self.factory)
        d.addCallbacks(self._listening, self._failed)

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        host = port.getHost()
        self.log.info(
            "{role} listening on {host}:{port}",
            role=self.role, host=getattr(host, "host", host), port=getattr(host, "port", ""),
        )
        self.listening.callback(port)

    def _failed(self, failure: Any) -> None:
        self.log.failure("{role} cannot listen on {description}", failure,
                         role=self.role, description=self.description)
        self.listening.errback(failure)
        self.listening.addErrback(lambda _: None)
        # A listener that cannot listen is fatal at start: say so and stop.
        if self.reactor.running:
            self.reactor.stop()

    def startService(self) -> None:  # noqa: N802
        Service.startService(self)
        if self.port is None and not self.listening.called:
            # privilegedStartService was not called (e.g. added after start).
            self.privilegedStartService()

    def stopService(self) -> Deferred[Any]:  # noqa: N802
        Service.stopService(self)
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        return maybeDeferred(port.stopListening)
