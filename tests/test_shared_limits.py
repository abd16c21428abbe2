"""
L{tunneld.policy.shared.SharedBuckets}: per-tunnel rates spent through local
accounts against one bank, here the memory backend on a fake clock (one
object under test; the cluster-wide figure with real edges and a real Redis
is in tests.test_cluster).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from tunneld.interfaces import TokenVerdict
from tunneld.policy.shared import SharedBuckets
from tunneld.state.memory import MemoryStateBackend


class _SlowBank:
    """A bank whose answers the test releases: a round trip that has not come back."""

    name = "slow"

    def __init__(self, backend: MemoryStateBackend) -> None:
        self.backend = backend
        self.waiting: list[tuple[Deferred[TokenVerdict], tuple[str, float, float, float]]] = []

    def take_tokens(self, bucket: str, cost: float, rate: float, burst: float) -> Deferred[TokenVerdict]:
        d: Deferred[TokenVerdict] = Deferred()
        self.waiting.append((d, (bucket, cost, rate, burst)))
        return d

    def answer_all(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d, args in waiting:
            self.backend.take_tokens(*args).chainDeferred(d)


class SharedBucketsTests(TestCase):
    def test_three_edges_hold_the_banks_rate(self) -> None:
        """Three edges' accounts on one bank, each offered 50 requests a second for 60 s at rate 20: the cluster admits the bank's burst + 20 x 60 within two tokens per edge."""
        clock = Clock()
        bank = MemoryStateBackend(clock)
        edges = [SharedBuckets(bank, clock) for _ in range(3)]
        admitted = 0
        for tick in range(60 * 50):
            clock.advance(0.02)
            edge = edges[tick % 3]
            for _ in range(3):  # 150 offered a second in all
                if edge.take("demo", 20.0, 20.0) == 0.0:
                    admitted += 1
        expected = 20 + 20 * 60 * 50 * 0.02 - 20 * 0.02  # burst + rate x elapsed
        self.assertLessEqual(abs(admitted - expected), 2 * 3, (admitted, expected))
        self.assertEqual(sum(e.degraded for e in edges), 0)

    def test_under_the_limit_never_waits_for_the_bank(self) -> None:
        """A request finds the account empty and the bank's answer not back: admitted on credit; the next, past the debt allowed, is refused until the bank answers."""
        clock = Clock()
        bank = _SlowBank(MemoryStateBackend(clock))
        shared = SharedBuckets(bank, clock)  # type: ignore[arg-type]
        self.assertEqual(shared.take("demo", 20.0, 20.0), 0.0)
        self.assertEqual(len(bank.waiting), 1)
        wait = shared.take("demo", 20.0, 20.0)
        self.assertGreater(wait, 0.0)
        self.assertEqual(len(bank.waiting), 1)  # one take on its way at a time
        bank.answer_all()
        self.assertEqual(shared.take("demo", 20.0, 20.0), 0.0)
        self.assertEqual(shared.granted, 2)  # the debt and one in hand

    def test_refusal_waits_for_the_bank(self) -> None:
        """Rate 1, burst 1: the bank's token and one on credit (the debt allowed) go, then refusals carry the bank's retry-after; a second on, the debt is paid first, then one more is admitted."""
        clock = Clock()
        bank = MemoryStateBackend(clock)
        shared = SharedBuckets(bank, clock)
        results = [shared.take("demo", 1.0, 1.0) for _ in range(4)]
        self.assertEqual(results[:2], [0.0, 0.0])
        self.assertEqual(results[2:], [1.0, 1.0])
        clock.advance(1.0)
        self.assertGreater(shared.take("demo", 1.0, 1.0), 0.0)  # pays the debt
        self.assertEqual(shared.take("demo", 1.0, 1.0), 0.0)
        self.assertGreater(shared.take("demo", 1.0, 1.0), 0.0)
        clock.advance(1.0)
        self.assertGreater(shared.take("demo", 1.0, 1.0), 0.0)
        self.assertEqual(shared.take("demo", 1.0, 1.0), 0.0)
        self.assertEqual(shared.granted, 3)

    def test_accounts_are_bounded(self) -> None:
        """At most max_size accounts, least recently used dropped first."""
        clock = Clock()
        shared = SharedBuckets(MemoryStateBackend(clock), clock, max_size=2)
        for key in ("a", "b", "c"):
            shared.take(key, 10.0, 10.0)
        self.assertEqual(list(shared.accounts), ["b", "c"])

    def test_the_bank_is_asked_in_batches(self) -> None:
        """Rate 10,000/s (a target of 500 tokens): 10,000 requests under the limit ask the bank some 40 times, not 10,000."""
        clock = Clock()
        bank = _SlowBank(MemoryStateBackend(clock))
        shared = SharedBuckets(bank, clock)  # type: ignore[arg-type]
        asked = 0
        for _ in range(10_000):
            clock.advance(0.0002)  # 5,000 requests a second: half the limit
            self.assertEqual(shared.take("demo", 10_000.0, 10_000.0), 0.0)
            asked += len(bank.waiting)
            bank.answer_all()
        self.assertLessEqual(asked, 45)
