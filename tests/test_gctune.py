"""
Tests for L{tunneld.speedups.gctune}: the collector skips the start-up heap while the
daemon runs, still collects cycles, and is left as it was at stop.
"""

from __future__ import annotations

import gc
import os
import weakref

from twisted.application.service import IServiceCollection
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.switches import switch_tricks
from tunneld import tap
from tunneld.speedups.gctune import YOUNG_THRESHOLD, GcTuning
from tunneld.speedups.service import Speedups

_ETC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc")


class _Node:
    other: _Node | None = None


class GcTuningTests(SynchronousTestCase):
    def setUp(self) -> None:
        switch_tricks(self, True, "gc_freeze")
        self.before = gc.get_threshold()
        # Python 3.12 starts with a few hundred objects frozen; 3.11 and 3.13 with none.
        self.frozen = gc.get_freeze_count()
        self.addCleanup(self._restore)

    def _restore(self) -> None:
        gc.unfreeze()
        gc.set_threshold(*self.before)

    def test_start_freezes_and_raises_young_threshold(self) -> None:
        """Starting freezes what exists and sets the young threshold; older thresholds are kept."""
        service = GcTuning()
        service.startService()
        self.assertGreater(gc.get_freeze_count(), self.frozen + 1000)
        self.assertEqual(gc.get_threshold(), (YOUNG_THRESHOLD, *self.before[1:]))
        service.stopService()

    def test_stop_undoes(self) -> None:
        """
        Stopping unfreezes and puts the thresholds back as they were.  Unfreezing
        is all or nothing: what the interpreter froze itself is unfrozen too.
        """
        service = GcTuning()
        service.startService()
        service.stopService()
        self.assertEqual(gc.get_freeze_count(), 0)
        self.assertEqual(gc.get_threshold(), self.before)
        self.assertFalse(service.running)

    def test_switched_off(self) -> None:
        """With the gc_freeze trick off, starting and stopping change nothing."""
        switch_tricks(self, False, "gc_freeze")
        service = GcTuning()
        service.startService()
        self.assertEqual((gc.get_freeze_count(), gc.get_threshold()), (self.frozen, self.before))
        service.stopService()
        self.assertEqual((gc.get_freeze_count(), gc.get_threshold()), (self.frozen, self.before))

    def test_cycles_still_collected(self) -> None:
        """A reference cycle made while tuned is still freed by a collection: nothing leaks."""
        service = GcTuning()
        service.startService()
        self.addCleanup(service.stopService)
        a, b = _Node(), _Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        self.assertIsNotNone(gone())
        gc.collect()
        self.assertIsNone(gone())


class ServiceTreeTests(SynchronousTestCase):
    def setUp(self) -> None:
        switch_tricks(self, True)  # the trees switch them as configured

    def test_edge_tree_tunes_gc_last(self) -> None:
        """C{twistd tunneld}'s tree switches the tricks first and starts the collector's tuning after the edge."""
        options = tap.EdgeOptions()
        options.parseOptions([])
        top = IServiceCollection(tap.makeService(options, Clock()))
        children = list(top)
        self.assertIsInstance(children[0], Speedups)
        self.assertIsInstance(children[-1], GcTuning)
        self.assertEqual(len(children), 4)

    def test_agent_tree_tunes_gc_last(self) -> None:
        """C{twistd tunneld-agent}'s tree switches the tricks first and starts the collector's tuning after the agent."""
        options = tap.AgentOptions()
        options.parseOptions(["--config", os.path.join(_ETC, "agent.toml")])
        top = IServiceCollection(tap.makeAgentService(options, Clock()))
        self.assertIsInstance(list(top)[0], Speedups)
        self.assertIsInstance(list(top)[-1], GcTuning)
