# -*- test-case-name: tests.test_backoff -*-
"""
Reconnect delays: jittered, exponential, capped, and forgiven after a healthy spell.

Jitter keeps a fleet of agents from reconnecting in lockstep after an edge
restart; resetting after C{healthy_after} seconds of a good link means one
blip an hour never grows into a thirty-second outage.
"""

from __future__ import annotations

import random


class Backoff:
    """The delay before each reconnect attempt."""

    def __init__(
        self,
        initial: float,
        maximum: float,
        healthy_after: float,
        rng: random.Random | None = None,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.healthy_after = healthy_after
        self.failures = 0
        self._rng = rng or random.Random()
        self._up_since: float | None = None

    def next_delay(self) -> float:
        """The delay before the next attempt: full-range jitter over 50–100 %."""
        ceiling = min(self.maximum, self.initial * (2 ** min(self.failures, 32)))
        self.failures += 1
        return ceiling * (0.5 + self._rng.random() / 2)

    def soon(self) -> float:
        """
        A short delay for a move that is no failure (the edge asked this
        agent to go elsewhere): anywhere in [0, initial], so that a fleet
        told at once does not dial back at once.  Failures do not grow.
        """
        return self.initial * self._rng.random()

    def link_up(self, now: float) -> None:
        """A link came up at C{now}."""
        self._up_since = now

    def link_down(self, now: float) -> None:
        """The link went down at C{now}: forgive past failures if it was up long enough."""
        if self._up_since is not None and now - self._up_since >= self.healthy_after:
            self.failures = 0
        self._up_since = None
