"""Reconnect backoff: exponential growth, jitter bounds, the cap, and forgiveness after a healthy spell."""

from __future__ import annotations

import random

from twisted.trial.unittest import SynchronousTestCase

from tunneld.agent.backoff import Backoff


class FixedRandom(random.Random):
    """A Random whose random() always returns the same value."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


class BackoffTests(SynchronousTestCase):
    """Backoff.next_delay, link_up and link_down."""

    def test_grows_exponentially(self) -> None:
        """With jitter pinned, each delay doubles the last until the cap."""
        backoff = Backoff(0.5, 30.0, 60.0, rng=FixedRandom(0.0))
        delays = [backoff.next_delay() for _ in range(9)]
        ceilings = [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
        self.assertEqual(delays, [c / 2 for c in ceilings])

    def test_jitter_within_half_to_full_ceiling(self) -> None:
        """Every delay lies within [50%, 100%] of its ceiling, min(initial * 2**n, maximum)."""
        backoff = Backoff(0.25, 10.0, 60.0, rng=random.Random(7))
        for n in range(200):
            ceiling = min(10.0, 0.25 * 2**n)
            delay = backoff.next_delay()
            self.assertGreaterEqual(delay, ceiling / 2, n)
            self.assertLessEqual(delay, ceiling, n)

    def test_jitter_spreads(self) -> None:
        """Capped delays are not all the same: a fleet does not reconnect in lockstep."""
        backoff = Backoff(1.0, 8.0, 60.0, rng=random.Random(8))
        for _ in range(5):
            backoff.next_delay()
        delays = [backoff.next_delay() for _ in range(100)]
        self.assertGreater(max(delays) - min(delays), 2.0)

    def test_never_exceeds_maximum(self) -> None:
        """Even after very many failures (and the highest jitter) no delay exceeds maximum."""
        backoff = Backoff(0.5, 30.0, 60.0, rng=FixedRandom(0.9999999))
        delays = [backoff.next_delay() for _ in range(1000)]
        self.assertLessEqual(max(delays), 30.0)
        self.assertGreater(delays[-1], 29.9)

    def test_short_link_does_not_reset(self) -> None:
        """A link that dropped before healthy_after keeps the failure count growing."""
        backoff = Backoff(1.0, 100.0, 30.0, rng=FixedRandom(0.0))
        for _ in range(4):
            backoff.next_delay()
        backoff.link_up(100.0)
        backoff.link_down(129.9)
        self.assertEqual(backoff.next_delay(), 8.0)

    def test_healthy_link_resets(self) -> None:
        """A link that stayed up healthy_after seconds brings the next delay back to initial."""
        backoff = Backoff(1.0, 100.0, 30.0, rng=FixedRandom(0.0))
        for _ in range(4):
            backoff.next_delay()
        backoff.link_up(100.0)
        backoff.link_down(130.0)
        self.assertEqual(backoff.failures, 0)
        self.assertEqual(backoff.next_delay(), 0.5)

    def test_down_without_up(self) -> None:
        """link_down without a preceding link_up forgives nothing, and a link_up is used once."""
        backoff = Backoff(1.0, 100.0, 30.0, rng=FixedRandom(0.0))
        backoff.next_delay()
        backoff.next_delay()
        backoff.link_down(1000.0)
        self.assertEqual(backoff.failures, 2)
        backoff.link_up(0.0)
        backoff.link_down(10.0)
        backoff.link_down(1000.0)
        self.assertEqual(backoff.failures, 2)

    def test_soon_is_short_jittered_and_no_failure(self) -> None:
        """soon() (a move the edge asked for) lies within [0, initial], spreads, and does not grow the next delay."""
        backoff = Backoff(0.5, 30.0, 60.0, rng=random.Random(3))
        soons = [backoff.soon() for _ in range(100)]
        self.assertTrue(all(0 <= s <= 0.5 for s in soons))
        self.assertGreater(max(soons) - min(soons), 0.25)
        self.assertEqual(backoff.failures, 0)
