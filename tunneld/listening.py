# -*- test-case-name: tests.test_listening -*-
"""
A service that listens on one endpoint string and says where it listens.

Like L{twisted.application.internet.StreamServerEndpointService}, but it logs
the address actually bound (so port 0 is usable in tests and the operator
sees the real port), exposes it as L{ListeningService.address}, and reports a
failure to listen with the configuration key and the operating system's
reason instead of logging a traceback and carrying on.
"""

from __future__ import annotations

from typing import Any
from typing import Protocol as TypingProtocol

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python import context, log
from twisted.python.failure import Failure

from tunneld.endpoints import listen_endpoint
from tunneld.errors import ListenError
from tunneld.model.reasons import Reason


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


def address_text(address: Any) -> str:
    """C{host:port}, C{[v6]:port}, or a UNIX socket's path: as a person writes it."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None or port is None:
        name = getattr(address, "name", None) or address
        return name.decode(errors="replace") if isinstance(name, bytes) else str(name)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _quietly(listen: Any, factory: Any) -> Deferred[IListeningPort]:
    """
    C{listen(factory)} without the line Twisted's ports log as they bind
    (C{"PublicHTTPFactory starting on 8080"}): L{ListeningService} logs the
    bound address itself, with the listener's role.  That line is a legacy
    C{log.msg} event; events logged inside this context carry an empty
    C{log_format}, which Twisted's text observers (and ours) do not write.
    Nothing else logs during C{listen}: a failure arrives as the result.
    """
    return context.call({log.ILogContext: {"log_format": ""}}, maybeDeferred, listen, factory)


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
    """
    Listen on C{description} with C{factory} while running.

    C{listening} fires with the port once bound, or fails with a
    L{ListenError} naming C{key} (the configuration key the string came
    from), the endpoint and the operating system's reason.  Nothing is
    logged for a failure here: the owner of the process decides what a
    listener that cannot listen means (L{tunneld.startup.StartupGuard}: the
    process stops).  C{backlog} is added to TCP strings that set none.
    """

    log = Logger()

    def __init__(
        self, reactor: Any, description: str, factory: Any, role: str, grace: float = 5.0,
        key: str = "", backlog: int | None = None,
    ) -> None:
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.role = role
        self.grace = grace
        self.key = key
        self.backlog = backlog
        self.port: IListeningPort | None = None
        self.listening: Deferred[IListeningPort] = Deferred()

    @property
    def address(self) -> Any:
        """The bound address (with the real port), once listening."""
        return self.port.getHost() if self.port is not None else None

    def privilegedStartService(self) -> None:  # noqa: N802
        Service.privilegedStartService(self)
        if self.port is not None or self.listening.called:
            return
        description = self.description
        if self.backlog is not None:
            description = with_backlog(description, self.backlog)
        try:
            endpoint, note = listen_endpoint(self.reactor, description)
        except Exception as e:  # the string was checked when read: what changed is the system
            if description.startswith("systemd:") and isinstance(e, (IndexError, KeyError)):
                # Twisted's systemd parser looks the inherited socket up directly.
                reason = (
                    "systemd passed no such socket (no LISTEN_FDS and LISTEN_FDNAMES for this "
                    "process, or fewer ListenStream= lines in the .socket unit than the index)"
                )
            else:
                reason = str(e) or type(e).__name__
            self._failed(Failure(ListenError(self.key, self.role, self.description, reason)))
            return
        if note is not None:
            self.log.warn("{role}: {note}", role=self.role, note=note)
        d = _quietly(endpoint.listen, self.factory)
        d.addCallbacks(self._listening, self._failed)

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        host = port.getHost()
        self.log.info(
            "{role} listening on {address}",
            role=self.role, address=address_text(host),
            host=getattr(host, "host", host), port=getattr(host, "port", ""),
        )
        self.listening.callback(port)

    def _failed(self, failure: Failure) -> None:
        error = failure.value
        if not isinstance(error, ListenError):
            if isinstance(error, CannotListenError) and error.socketError is not None:
                reason = str(error.socketError)
            else:
                reason = failure.getErrorMessage()
            failure = Failure(ListenError(self.key, self.role, self.description, reason))
        self.listening.errback(failure)

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


def listeners_under(root: Any) -> list[Any]:
    """
    Every listener in C{root}'s service tree: each service with a
    C{listening} Deferred (L{ListeningService} and the like), whoever added it.
    """
    found = []
    stack = [root]
    while stack:
        service = stack.pop()
        if isinstance(getattr(service, "listening", None), Deferred):
            found.append(service)
        if isinstance(service, MultiService):
            stack.extend(reversed(list(service)))
    return found
