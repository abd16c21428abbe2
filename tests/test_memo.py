"""
Tests for L{tunneld.speedups.memo}: L{Bounded} is emptied when full, and a
limit of 0 keeps nothing.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tunneld.speedups.memo import Bounded


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
