"""
Tests for L{tunneld.speedups.memo}: L{ByIdentity} found by identity only, never by
equality; an entry keeps its key alive; bounded.
"""

from __future__ import annotations

import gc
import weakref

from twisted.trial.unittest import SynchronousTestCase

from tunneld.speedups.memo import Bounded, ByIdentity


class _Key:
    """A weak-referenceable key whose instances are all equal."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Key)

    def __hash__(self) -> int:
        return 0


class ByIdentityTests(SynchronousTestCase):
    def test_identity_not_equality(self) -> None:
        """What was made of one object is not found for an equal one."""
        table: ByIdentity[tuple[bytes, ...], str] = ByIdentity(4)
        key = (b"a", bytes([98]))
        self.assertEqual(table.put(key, "made"), "made")
        self.assertEqual(table.get(key), "made")
        self.assertIsNone(table.get((b"a", bytes([98]))))

    def test_entry_keeps_key(self) -> None:
        """An entry holds its key, so no later object can take its id while it is there."""
        table: ByIdentity[_Key, str] = ByIdentity(4)
        key = _Key()
        ref = weakref.ref(key)
        table.put(key, "made")
        del key
        gc.collect()
        self.assertIsNotNone(ref())
        for _ in range(100):
            self.assertIsNone(table.get(_Key()))

    def test_bounded(self) -> None:
        """Past its limit the table is emptied, then fills again."""
        table: ByIdentity[_Key, int] = ByIdentity(3)
        keys = [_Key() for _ in range(7)]
        for n, key in enumerate(keys):
            table.put(key, n)
            self.assertLessEqual(len(table), 3)
        self.assertEqual(table.get(keys[-1]), 6)
        self.assertIsNone(table.get(keys[0]))


class BoundedTests(SynchronousTestCase):
    def test_emptied_when_full(self) -> None:
        """Past its limit the table is emptied, then fills again; lookups are a dict's."""
        table: Bounded[int, str] = Bounded(3)
        for n in range(7):
            self.assertEqual(table.keep(n, str(n)), str(n))
            self.assertLessEqual(len(table), 3)
        self.assertEqual(table.get(6), "6")
        self.assertIsNone(table.get(0))

    def test_zero_keeps_nothing(self) -> None:
        """A limit of 0 remembers nothing (the codec's module functions)."""
        table: Bounded[int, str] = Bounded(0)
        self.assertEqual(table.keep(1, "one"), "one")
        self.assertEqual(len(table), 0)
        identity: ByIdentity[_Key, str] = ByIdentity(0)
        key = _Key()
        self.assertEqual(identity.put(key, "made"), "made")
        self.assertIsNone(identity.get(key))
