# -*- test-case-name: tests.test_state -*-
"""
The state backend as a Twisted service: connected while the edge runs.

Its children (L{tunneld.state.membership.EdgeMembership}, later the router's
and the policy's users of the backend) start after it and stop before it,
so an edge deregisters itself before its connection to the store closes.
An unreachable store is not a start failure (the backend serves degraded
and says so); a store that refuses the configured credentials is, like a
listener that cannot bind: the error is logged and the process stops.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from tunneld.interfaces import IStateBackend

__all__ = ["StateService"]


class StateService(MultiService):
    """Starts C{backend} before its children and closes it after them."""

    log = Logger()

    def __init__(self, reactor: Any, backend: IStateBackend) -> None:
        super().__init__()
        self.reactor = reactor
        self.backend = backend
        self.started = False  # the backend's start has ended (connected, or degraded)
        self._waiting: list[Deferred[None]] = []

    def startService(self) -> None:  # noqa: N802
        self.backend.start().addCallbacks(self._up, self._refused)
        super().startService()

    def when_started(self) -> Deferred[None]:
        """Fires once the backend's start has ended (connected, or degraded)."""
        if self.started:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def _up(self, _: Any) -> None:
        self.started = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def _refused(self, failure: Failure) -> None:
        self.log.failure("state backend {name} cannot start", failure, name=self.backend.name)
        # Like a listener that cannot listen: fatal at start.
        if self.reactor.running:
            self.reactor.stop()

    async def _stop(self) -> None:
        await super().stopService()
        await self.backend.close()

    def stopService(self) -> Deferred[None]:  # noqa: N802
        return ensureDeferred(self._stop())
