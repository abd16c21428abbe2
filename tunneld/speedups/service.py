# -*- test-case-name: tests.test_speedups -*-
"""
The tricks switched at start, from the configuration, and said in the log.

L{Speedups} is made first when an edge's or an agent's service tree is made:
it sets every trick's switch from the C{[speedups]} table
(L{tunneld.speedups.configure}) before any other part is built (the public
TLS contexts, say, are made with the tree).  Started first, it warns once
about each trick that was wanted but whose capability check failed (naming
what differs and the fallback in use), applies the process tuning, and logs
one line with the outcome, so that an operator sees what is in use::

    speedups: bulkwrite on, read_size on, lean_h2 on, websocket_takeover on, ...
"""

from __future__ import annotations

from collections.abc import Mapping

from twisted.application.service import Service
from twisted.logger import Logger

from tunneld.speedups import configure, summary, tricks
from tunneld.speedups.heap import keep_large_buffers
from tunneld.speedups.switches import ENVIRONMENT, environment_allows

__all__ = ["Speedups"]


class Speedups(Service):
    """Switch the tricks as configured when the service tree starts."""

    name = "speedups"
    log = Logger()

    def __init__(self, switches: Mapping[str, bool]) -> None:
        """@param switches: the C{[speedups]} table: C{enabled} and a key per trick, C{True} when absent."""
        self.switches = dict(switches)
        configure(self.switches)

    def startService(self) -> None:  # noqa: N802
        super().startService()
        if not environment_allows():
            self.log.info("speedups: every trick off ({variable} says off)", variable=ENVIRONMENT)
        elif self.switches.get("enabled", True):
            for trick in tricks():
                # (a deferred trick's check waits for its first use, and warns then)
                if self.switches.get(trick.name, True) and not trick.pending and trick.problem is not None:
                    self.log.warn(
                        "speedups: {trick} is off: {problem}; using {fallback} instead",
                        trick=trick.name, problem=trick.problem, fallback=trick.fallback,
                    )
        keep_large_buffers()
        self.log.info("speedups: {summary}", summary=summary())
