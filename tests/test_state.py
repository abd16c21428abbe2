"""The state backend contract over the memory backend, and its pure parts."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.state_behaviour import StateBackendBehaviour
from tunneld.interfaces import IStateBackend
from tunneld.state import make_backend
from tunneld.state.buckets import LocalBuckets, refill_and_take
from tunneld.state.ids import IdMinter, random_epoch, redis_epoch
from tunneld.state.memory import MemoryStateBackend


class MemoryBackendTests(StateBackendBehaviour, TestCase):
    """The contract, in one process on the real reactor."""

    timeout = 120

    async def backend(self) -> IStateBackend:
        if not hasattr(self, "_backend"):
            self._backend = MemoryStateBackend(reactor)
            await self._backend.start()
            self.addCleanup(self._backend.close)
        return self._backend

    async def other_edge(self) -> IStateBackend:
        # One process: every "edge" shares the one store.
        return await self.backend()


class MemoryUnitTests(SynchronousTestCase):
    """The memory backend's bookkeeping on a fake clock."""

    def test_expired_entries_leave_no_trace(self) -> None:
        """After expiry no table, index or heap keeps the entries (memory stays bounded)."""
        clock = Clock()
        backend = MemoryStateBackend(clock)
        for i in range(100):
            backend.hold_tunnels(f"e/{i}", [f"t{i % 7}"], 10)
            backend.set_count("c", f"e/{i}", 1, 10)
            backend.put_record("ns", f"k{i}", b"v", 10)
            backend.append_log("ns", f"l{i}", b"v", 3, 10)
            backend.hold_tunnels(f"e/{i}", [f"t{i % 7}"], 10)  # a refresh leaves a stale heap item
        clock.advance(11)
        self.assertEqual(self.successResultOf(backend.count_total("c")), 0)
        for table in backend._maps:
            self.assertEqual((len(table), len(table._heap)), (0, 0))
        self.assertEqual(backend._tunnels.by_left, {})
        self.assertEqual(backend._counters.by_right, {})

    def test_default_is_memory(self) -> None:
        """make_backend builds the memory backend for the default [edge.state]."""
        from tunneld.config import load_edge_config

        backend = make_backend(Clock(), load_edge_config(None).edge.state)
        self.assertIsInstance(backend, MemoryStateBackend)


class BucketTests(SynchronousTestCase):
    """The token-bucket arithmetic shared with the Redis script."""

    def test_refill_and_take(self) -> None:
        """A new bucket is full; tokens refill at the rate up to the burst; a clock going back refills nothing."""
        self.assertEqual(refill_and_take(None, 0, 100.0, 2.0, 4.0, 1), (True, 0.0, 3.0, 100.0))
        self.assertEqual(refill_and_take(0.0, 100.0, 101.0, 2.0, 4.0, 1), (True, 0.0, 1.0, 101.0))
        self.assertEqual(refill_and_take(0.0, 100.0, 200.0, 2.0, 4.0, 3), (True, 0.0, 1.0, 200.0))
        self.assertEqual(refill_and_take(0.5, 100.0, 99.0, 2.0, 4.0, 1), (False, 0.25, 0.5, 100.0))

    def test_local_buckets_are_bounded(self) -> None:
        """Past max_size the least recently used bucket goes; full ones go first."""
        clock = Clock()
        buckets = LocalBuckets(clock, max_size=3)
        for name in "abcd":
            buckets.take(name, 1, 1.0, 10, degraded=True)
        self.assertEqual(len(buckets), 3)
        clock.advance(0.5)  # none refilled yet: only the bound evicts
        buckets.take("e", 1, 1.0, 10, degraded=True)
        self.assertEqual(len(buckets), 3)
        clock.advance(10)  # all full again: indistinguishable from new ones, dropped
        verdict = buckets.take("f", 1, 1.0, 10, degraded=True)
        self.assertTrue(verdict.degraded)
        self.assertEqual(len(buckets), 1)


class IdTests(SynchronousTestCase):
    """Epoch ranges and ID shapes."""

    def test_epoch_ranges_are_disjoint(self) -> None:
        """Epochs from INCR sit below 2**62 (for 2**30 starts); random ones at or above it."""
        self.assertLess(redis_epoch(2**30 - 1), 1 << 62)
        self.assertEqual(redis_epoch(5) >> 32, 5)
        for _ in range(100):
            self.assertTrue((1 << 62) <= random_epoch() < (1 << 63))

    def test_ids(self) -> None:
        """IDs start with the epoch in hex; counters increase; secret IDs carry 128 random bits."""
        minter = IdMinter(0xABC)
        self.assertEqual([minter.next_id() for _ in range(3)], ["abc-1", "abc-2", "abc-3"])
        secret = minter.secret_id()
        self.assertTrue(secret.startswith("abc-"))
        self.assertGreaterEqual(len(secret), 4 + 22)


class MembershipStopTests(TestCase):
    """Stopping an edge whose store never answered."""

    async def test_stop_before_the_store_answers(self) -> None:
        """A membership still waiting for the store stops at once, registering nothing."""
        from tunneld.state.membership import EdgeMembership

        class NeverStarted:
            backend = MemoryStateBackend(reactor)

            def when_started(self) -> Deferred[None]:
                return Deferred()

        member = EdgeMembership(NeverStarted(), reactor, "waiting")
        member.startService()
        await member.stopService()
        self.assertEqual((member.edge_id, member.beats), ("", 0))
        self.assertEqual(self.successResultOf(NeverStarted.backend.live_edges()), [])
