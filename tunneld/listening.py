"""
A service that listens on one endpoint string and says where it listens.

Like L{twisted.application.internet.StreamServerEndpointService}, but it logs
the address actually bound (so port 0 is usable in tests and the operator
sees the real port) and exposes it as L{ListeningService.address}.
"""

from __future__ import annotations

from typing import Any
from typing import Protocol as TypingProtocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from tunneld.reasons import Reason


class Closable(TypingProtocol):
    """A connection that can be asked to close and gives up when told to."""

    def shutdown(self, reason: Reason, message: str) -> None:
        """Close gracefully, telling the peer why."""

    transport: Any


class ConnectionTracker:
    """
    The live connections of one listener, so that stopping the listener
    also closes them: first politely, then, after C{grace} seconds, abruptly.
    """

    def __init__(self) -> None:
        self.connections: set[Closable] = set()
        self._idle: list[Deferred[None]] = []

    def add(self, connection: Closable) -> None:
        self.connections.add(connection)

    def remove(self, connection: Closable) -> None:
        self.connections.discard(connection)
        if not self.connections:
            waiters, self._idle = self._idle, []
            for d in waiters:
                d.callback(None)

    def close_all(self, reactor: Any, reason: Reason, message: str, grace: float) -> Deferred[None]:
        """Close every connection; fires when all are gone."""
        if not self.connections:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        for connection in list(self.connections):
            connection.shutdown(reason, message)

        def abort() -> None:
            for connection in list(self.connections):
                connection.transport.abortConnection()

        timer = reactor.callLater(grace, abort)
        d.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])
        return d


def with_backlog(description: str, backlog: int) -> str:
    """
    C{description} with C{backlog=} added when it is a TCP endpoint string
    that sets none (other endpoint types take no backlog).
    """
    kind = description.split(":", 1)[0].strip().lower()
    if kind not in ("tcp", "tcp6", "ssl") or "backlog=" in description:
        return description
    return f"{description}:backlog={backlog}"


class ListeningService(Service):
    """Listen on C{description} with C{factory} while running."""

    log = Logger()

    def __init__(
        self, reactor: Any, description: str, factory: Any, role: str, grace: float = 5.0
    ) -> None:
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.role = role
        self.grace = grace
        self.port: IListeningPort | None = None
        self.listening: Deferred[IListeningPort] = Deferred()

    @property
    def address(self) -> Any:
        """The bound address (with the real port), once listening."""
        return self.port.getHost() if self.port is not None else None

    def privilegedStartService(self) -> None:  # noqa: N802
        Service.privilegedStartService(self)
        try:
            endpoint = serverFromString(self.reactor, self.description)
        except IndexError:
            if not self.description.startswith("systemd:"):
                raise
            # Twisted's systemd parser indexes the inherited sockets directly.
            raise ValueError(
                f"{self.role}: {self.description!r} names a socket systemd did not pass "
                "(no LISTEN_FDS for this process, or fewer ListenStream= lines in the "
                ".socket unit than the index)"
            ) from None
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

    def stop_accepting(self) -> Deferred[Any]:
        """
        Stop listening, leaving the connections already accepted alone (a
        draining edge keeps its agent links until their streams end).
        """
        port, self.port = self.port, None
        return maybeDeferred(port.stopListening) if port is not None else succeed(None)

    def stopService(self) -> Deferred[Any]:  # noqa: N802
        Service.stopService(self)
        port, self.port = self.port, None
        stopped = maybeDeferred(port.stopListening) if port is not None else succeed(None)
        tracker: ConnectionTracker | None = getattr(self.factory, "tracker", None)
        if tracker is None:
            tracker = getattr(getattr(self.factory, "wrappedFactory", None), "tracker", None)
        if tracker is not None:
            closing = tracker.close_all(
                self.reactor, Reason.DRAINING, "the edge is stopping", self.grace
            )
            stopped.addCallback(lambda _: closing)
        return stopped
