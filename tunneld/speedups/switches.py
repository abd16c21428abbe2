# -*- test-case-name: tests.test_speedups -*-
"""
One switch per trick, and the check that decides whether it can be on.

A trick reaches into another library's private state (or tunes the
process) for speed.  Each has a capability check: the internals it uses are
there and behave as the trick expects.  The check runs once, the first time
the trick is asked whether it is on (the library does not change while the
process runs); a trick whose check fails stays off for good and its module
uses the public API instead, so an upgraded library costs speed, never
correctness.

A I{deferred} trick's check waits for the trick's first use instead: its
check loads a library that a process may never use (Autobahn, a large
share of the RSS of an edge or agent with no WebSocket link); until then it is
listed as on, and a check that fails then is warned about then.

The switches are process-wide, as the libraries they concern are: the
service maker sets them from the configuration's C{[speedups]} table at
start (L{tunneld.speedups.configure}); until then each is on unless the
environment variable C{TUNNELD_SPEEDUPS} is C{off} (for tests and for
debugging a suspected trick without editing a configuration).
"""

from __future__ import annotations

import os
from collections.abc import Callable

__all__ = ["ENVIRONMENT", "Trick", "environment_allows"]

# TUNNELD_SPEEDUPS=off turns every trick off, whatever the configuration says.
ENVIRONMENT = "TUNNELD_SPEEDUPS"


def environment_allows() -> bool:
    """Whether the environment leaves the tricks to the configuration (it does unless it says off)."""
    return os.environ.get(ENVIRONMENT, "").strip().lower() not in ("off", "0", "false", "no")


class Trick:
    """
    One trick: what it touches, what it falls back to, and whether it is on.

    C{check} returns None when the internals are as the trick expects, else
    what differs (which the start-up log names); an exception it raises
    counts as a difference.  With C{deferred}, switching it on leaves the
    check for the trick's first use (L{active}).
    """

    def __init__(
        self, name: str, touches: str, fallback: str, check: Callable[[], str | None],
        deferred: bool = False,
    ) -> None:
        self.name = name
        self.touches = touches
        self.fallback = fallback
        self.deferred = deferred
        self._check = check
        self._checked = False
        self._problem: str | None = None
        self._active: bool | None = None  # None: not switched yet, or (deferred) not used yet
        self._wanted: bool | None = None  # None: not switched yet

    def __repr__(self) -> str:
        return f"<Trick {self.name}: {'on' if self.active else 'off'}>"

    @property
    def problem(self) -> str | None:
        """What the capability check found wrong with the internals (running it if it has not run)."""
        if not self._checked:
            self._checked = True
            try:
                self._problem = self._check()
            except Exception as e:  # noqa: BLE001 - any surprise means "not as expected"
                self._problem = f"the check failed: {type(e).__name__}: {e}"
        return self._problem

    @property
    def wanted(self) -> bool:
        """Whether the switch says on (the environment's say until it is switched), check or no check."""
        return environment_allows() if self._wanted is None else self._wanted

    @property
    def pending(self) -> bool:
        """A deferred trick, wanted on, whose check waits for its first use."""
        return self.deferred and not self._checked and self.wanted

    @property
    def active(self) -> bool:
        """Whether the trick is in use (switched on, and the internals passed the check)."""
        active = self._active
        if active is None:
            active = self._decide(self.wanted)
        return active

    def switch(self, on: bool) -> bool:
        """
        Turn the trick on (if the internals pass the check) or off; whether it
        is now on (a deferred trick switched on is, until its first use says otherwise).
        """
        self._wanted = on
        if on and self.deferred and not self._checked:
            self._active = None
            return True
        return self._decide(on)

    def _decide(self, on: bool) -> bool:
        first = not self._checked
        self._active = on and self.problem is None
        if on and self.deferred and first and self._problem is not None:
            # (imported here: importing this package stays cheap, see tunneld.speedups)
            from twisted.logger import Logger

            Logger(namespace=__name__).warn(
                "speedups: {trick} is off: {problem}; using {fallback} instead",
                trick=self.name, problem=self._problem, fallback=self.fallback,
            )
        return self._active
