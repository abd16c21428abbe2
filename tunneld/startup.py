# -*- test-case-name: tests.test_startup -*-
"""
A daemon that cannot start stops, and says why in one line.

twistd binds listeners in C{privilegedStartService}, before its reactor
runs, and carries on whatever a listener's Deferred says: a port in use
would leave an edge running without that listener, logging C{ready} and
telling systemd C{READY=1}.  L{StartupGuard}, the root of the edge's and the
agent's service trees, turns any listener that cannot listen (a
L{StartupError}) into the end of the process: one critical log line naming
the file, the key, the endpoint and the operating system's reason, exit
status 1, and no C{READY=1} (readiness waits for every listener, and this one
never listens).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService
from twisted.logger import Logger
from twisted.python.failure import Failure

from tunneld.errors import StartupError
from tunneld.exitstatus import exit_when_stopped
from tunneld.listening import listeners_under
from tunneld.observe import events


def _exit_now(code: int) -> None:
    """End the process before its reactor runs (as twistd does when it cannot switch user)."""
    raise SystemExit(code)


class StartupGuard(MultiService):
    """
    The root of a daemon's service tree: a L{StartupError} while starting,
    or a listener below that fails to listen, stops the process with exit
    status 1 and one critical log event (C{tunneld.start_failed}).

    A listener bound before the reactor runs (every built-in endpoint
    type) fails synchronously: the process exits at once.  One that fails
    later, with the reactor running, stops the reactor and the process exits
    1 after the usual shutdown.
    """

    log = Logger()

    def __init__(
        self,
        source: str,
        reactor: Any,
        exit_now: Callable[[int], None] = _exit_now,
        exit_when_stopped: Callable[[int], None] = exit_when_stopped,
    ) -> None:
        super().__init__()
        self.source = source
        self.reactor = reactor
        self.exit_now = exit_now
        self.exit_when_stopped = exit_when_stopped
        self.error: StartupError | None = None
        self._starting = False
        self._watching = False
        self._reported = False

    def privilegedStartService(self) -> None:  # noqa: N802
        self._watch()
        self._start(super().privilegedStartService)

    def startService(self) -> None:  # noqa: N802
        # Twisted's `twist` calls only startService; twistd calls both.
        self._watch()
        self._start(super().startService)

    def _start(self, start: Callable[[], None]) -> None:
        self._starting = True
        try:
            start()
        except StartupError as e:
            self._record(e)
        finally:
            self._starting = False
        if self.error is not None and not self._reported:
            self._report()
            self.exit_now(1)

    def _watch(self) -> None:
        """See every listener's outcome first, before readiness does."""
        if self._watching:
            return
        self._watching = True
        for listener in listeners_under(self):
            listener.listening.addErrback(self._listener_failed)

    def _listener_failed(self, failure: Failure) -> Failure:
        error = failure.value
        if not isinstance(error, StartupError):
            error = StartupError(failure.getErrorMessage())
        if self._starting:
            # Reported (once) when start-up returns.
            self._record(error)
        elif self.error is None:
            self._record(error)
            self._report()
            self.exit_when_stopped(1)
            if self.reactor.running:
                self.reactor.stop()
            else:
                self.reactor.callWhenRunning(self.reactor.stop)
        # Passed on: readiness (DeferredList) must see the failure too.
        return failure

    def _record(self, error: StartupError) -> None:
        if self.error is None:
            self.error = error

    def _report(self) -> None:
        """Log the failure (critical; once, as the process ends after it)."""
        self._reported = True
        line = f"{self.source}: {self.error}"
        self.log.critical(
            "cannot start: {error}", error=line, source=self.source, event=events.START_FAILED
        )
        for listener in listeners_under(self):
            # Nobody else will wait for these now.
            listener.listening.addErrback(lambda _: None)
