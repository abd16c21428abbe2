# -*- test-case-name: tests.test_http1 -*-
"""
The one timer of a public HTTP/1.1 connection.

A connection is always waiting for something with a deadline: a whole
request head (slowloris), the next request on a kept-alive connection,
progress during an exchange, the client reading its answer before the
close, a WebSocket's idle ping.  One L{Deadline} per connection serves them
all, one at a time: arming it replaces whatever was armed.  The reactor's
timer only moves when the new deadline is sooner; a later one is found when
the timer fires, so a keep-alive request costs no timer calls.

L{Deadline.last_activity} is when bytes last moved either way: what the
progress deadline measures from.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["Deadline"]


def _nothing_due() -> None:
    """What a deadline calls once its connection is gone."""


class Deadline:
    """Call one function at one time, instead of whatever was armed before."""

    __slots__ = ("_clock", "seconds", "_timer", "_due", "_expire", "last_activity")

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.seconds = clock.seconds
        self._timer: IDelayedCall | None = None
        # The timer fires at or before _due, when _expire is called if _due has come.
        self._due = 0.0
        self._expire: Callable[[], None] = _nothing_due
        self.last_activity = 0.0

    def arm(self, delay: float, expire: Callable[[], None]) -> None:
        """Call C{expire} in C{delay} seconds, instead of whatever was armed."""
        due = self.seconds() + delay
        self._due = due
        self._expire = expire
        timer = self._timer
        if timer is None:
            self._timer = self._clock.callLater(delay, self._fire)
        elif timer.getTime() > due:
            timer.reset(delay)

    def cancel(self) -> None:
        """Call nothing (until armed again)."""
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def close(self) -> None:
        """
        The connection is gone: cancel, and let go of the function armed (a
        method of the connection, which holds this deadline), so that a
        closed connection is freed by reference counting, not left for the
        cyclic GC.
        """
        self.cancel()
        self._expire = _nothing_due

    def _fire(self) -> None:
        left = self._due - self.seconds()
        if left > 0:
            self._timer = self._clock.callLater(left, self._fire)
            return
        self._timer = None
        self._expire()
