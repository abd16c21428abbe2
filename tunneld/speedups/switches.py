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
    counts as a difference.
    """

    def __init__(
        self, name: str, touches: str, fallback: str, check: Callable[[], str | None]
    ) -> None:
        self.name = name
        self.touches = touches
        self.fallback = fallback
        self._check = check
        self._checked = False
        self._problem: str | None = None
        self._active: bool | None = None  # None: not switched yet

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
    def active(self) -> bool:
        """Whether the trick is in use (switched on, and the internals passed the check)."""
        active = self._active
        if active is None:
            active = self.switch(environment_allows())
        return active

    def switch(self, on: bool) -> bool:
        """Turn the trick on (if the internals pass the check) or off; whether it is now on."""
        self._active = on and self.problem is None
        return self._active
