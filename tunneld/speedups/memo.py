# -*- test-case-name: tests.test_memo -*-
"""
What was made of what recurs, found again: bounded tables for the caches of
the fast paths, each held by the object whose work it remembers (a codec, a
listener, an upstream pool), never by a module.

L{Bounded} is a dictionary emptied when full.  L{ByIdentity} finds what was
made of an object by the object's identity.

An upstream sends the same response head again and again, and the codec
hands equal header blocks on as the very same tuple; what each step makes of
that tuple (the end-to-end fields, the encoded block, the rendered block) can
then be found by C{id()} at the cost of one dictionary lookup, where hashing
the tuple would walk all its fields.  An entry holds its object, so the id
cannot be reused by another object while the entry is there.  The table is
emptied when full: memory stays bounded whatever the traffic.
"""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["Bounded", "ByIdentity"]

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


class ByIdentity(Generic[K, V]):
    """A bounded table from objects, by identity, to what was made of them."""

    __slots__ = ("_entries", "limit")

    def __init__(self, limit: int) -> None:
        self._entries: dict[int, tuple[K, V]] = {}
        self.limit = limit

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        """What was made of C{key} itself (not of an equal object), or None."""
        entry = self._entries.get(id(key))
        if entry is not None and entry[0] is key:
            return entry[1]
        return None

    def put(self, key: K, value: V) -> V:
        """Remember C{value} for C{key} (emptying the table first when full); C{value}."""
        entries = self._entries
        if len(entries) >= self.limit:
            entries.clear()
            if not self.limit:
                return value
        entries[id(key)] = (key, value)
        return value
