# -*- test-case-name: tests.test_policy -*-
"""
Concurrency caps whose slots cannot leak.

L{Cap.acquire} and L{KeyedCap.acquire} hand out a L{Slot}, or None at the
cap.  A slot is given back by L{Slot.release}, which is idempotent: every
error path may call it without counting twice, so the owner of a piece of
work simply releases on every way out.  L{Slots} releases several at once.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Protocol

__all__ = ["Cap", "KeyedCap", "Slot", "Slots"]


class Releasable(Protocol):
    def release(self) -> None: ...


class Slot:
    """One unit of a cap in use; L{release} gives it back once, however often called."""

    __slots__ = ("_owner", "_key")

    def __init__(self, owner: Cap | KeyedCap, key: Hashable = None) -> None:
        self._owner: Cap | KeyedCap | None = owner
        self._key = key

    @property
    def held(self) -> bool:
        return self._owner is not None

    def release(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._give_back(self._key)


class Slots:
    """Several slots held and released together."""

    __slots__ = ("_slots",)

    def __init__(self, slots: Iterable[Releasable] = ()) -> None:
        # A tuple: one block, where a list takes two (held per connection
        # and per exchange, so by every idle WebSocket).
        self._slots = tuple(slots)

    def add(self, slot: Releasable) -> None:
        self._slots += (slot,)

    def release(self) -> None:
        slots, self._slots = self._slots, ()
        for slot in slots:
            slot.release()


class Cap:
    """At most C{limit} slots at once (C{limit} <= 0: no limit, still counted)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0

    def acquire(self) -> Slot | None:
        if 0 < self.limit <= self.in_use:
            return None
        self.in_use += 1
        return Slot(self)

    def _give_back(self, key: Hashable) -> None:
        self.in_use -= 1


class KeyedCap:
    """
    At most C{limit} slots per key.  Keys at zero are forgotten, so the table
    holds only keys with work in flight.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts: dict[Hashable, int] = {}

    def acquire(self, key: Hashable, limit: int | None = None) -> Slot | None:
        limit = self.limit if limit is None else limit
        count = self.counts.get(key, 0)
        if 0 < limit <= count:
            return None
        self.counts[key] = count + 1
        return Slot(self, key)

    def in_use(self, key: Hashable) -> int:
        return self.counts.get(key, 0)

    def total(self) -> int:
        return sum(self.counts.values())

    def _give_back(self, key: Hashable) -> None:
        count = self.counts[key] - 1
        if count:
            self.counts[key] = count
        else:
            del self.counts[key]

