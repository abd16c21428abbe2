# -*- test-case-name: tests.test_memo -*-
"""
What was made of what recurs, found again: L{Bounded}, a dictionary emptied
when full, for the caches of the fast paths, each held by the object whose
work it remembers (a codec, a listener, an upstream pool), never by a module.

Only what recurs on real traffic is remembered: header names, and single
fields (a Server, a Content-Type, a client's User-Agent).  Whole heads are
not: every reply carries its own cookie and request id, and a table of them
only cost each one an insertion and, now and then, a clearing (issue 23).
"""

from __future__ import annotations

from typing import TypeVar

__all__ = ["Bounded"]

K = TypeVar("K")
V = TypeVar("V")


class Bounded(dict[K, V]):
    """
    A dictionary of at most C{limit} entries: one more empties it first, so
    memory stays bounded whatever the traffic.  A limit of 0 keeps nothing.
    Lookups are the dictionary's own (C{get}, C{in}), as fast as a dict's.
    """

    __slots__ = ("limit",)

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def keep(self, key: K, value: V) -> V:
        """Remember C{value} for C{key} (emptying the table first when full); C{value}."""
        if len(self) >= self.limit:
            self.clear()
            if not self.limit:
                return value
        self[key] = value
        return value
