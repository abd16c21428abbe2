# -*- test-case-name: tests.test_policy -*-
"""
Token buckets on the reactor clock.

A L{TokenBucket} holds up to C{burst} tokens and gains C{rate} tokens a
second; each request takes one.  A L{BucketTable} keeps one bucket per key
(a tunnel, or a tunnel and a client address) with a bounded number of
entries: a bucket idle long enough to have refilled is indistinguishable from
a new one, so it is dropped; past C{max_size} the least recently used bucket
goes too.  Time comes from an injected C{IReactorTime}, never the wall clock.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable

from twisted.internet.interfaces import IReactorTime

__all__ = ["BucketTable", "TokenBucket"]


class TokenBucket:
    """C{burst} tokens at most, refilled at C{rate} tokens per second."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, now: float, cost: float = 1.0) -> float:
        """
        Take C{cost} tokens: 0.0 when granted, otherwise the seconds until
        enough tokens will be there (nothing is taken then).
        """
        self._refill(now)
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        if self.rate <= 0:
            return math.inf
        return (cost - self.tokens) / self.rate

    def full_at(self) -> float:
        """The time at which this bucket will be full again."""
        if self.rate <= 0:
            return math.inf
        return self.stamp + (self.burst - self.tokens) / self.rate

    def reconfigure(self, rate: float, burst: float, now: float) -> None:
        """New rate and burst apply from C{now}; tokens in hand are kept up to the new burst."""
        self._refill(now)
        self.rate = rate
        self.burst = burst
        self.tokens = min(self.tokens, burst)


class BucketTable:
    """
    One L{TokenBucket} per key, bounded in size.

    C{rate} <= 0 means unlimited: L{take} always grants and stores nothing.
    """

    def __init__(
        self,
        clock: IReactorTime,
        rate: float,
        burst: float,
        max_size: int = 100_000,
    ) -> None:
        self._clock = clock
        self.rate = rate
        self.burst = burst
        self.max_size = max_size
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(
        self, key: Hashable, rate: float | None = None, burst: float | None = None
    ) -> float:
        """
        Take one token from C{key}'s bucket (with its own C{rate}/C{burst}
        when given, e.g. a per-tunnel override): 0.0 when granted, else the
        seconds to wait.
        """
        rate = self.rate if rate is None else rate
        burst = self.burst if burst is None else burst
        if rate <= 0:
            return 0.0
        now = self._clock.seconds()
        self._evict(now)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(rate, burst, now)
        else:
            self._buckets.move_to_end(key)
            if bucket.rate != rate or bucket.burst != burst:
                bucket.reconfigure(rate, burst, now)
        return bucket.take(now)

    def _evict(self, now: float) -> None:
        buckets = self._buckets
        # Least recently used first: stop at the first bucket still refilling.
        while buckets:
            key, bucket = next(iter(buckets.items()))
            if bucket.full_at() <= now or len(buckets) >= self.max_size:
                del buckets[key]
            else:
                break

    def reconfigure(self, rate: float, burst: float) -> None:
        """
        New defaults, in force at once: buckets on the old defaults switch
        now (keeping the tokens they hold, up to the new burst); buckets with
        their own rate switch at their next L{take}.
        """
        old_rate, old_burst = self.rate, self.burst
        self.rate = rate
        self.burst = burst
        if rate <= 0:
            self._buckets.clear()
            return
        now = self._clock.seconds()
        for bucket in self._buckets.values():
            if bucket.rate == old_rate and bucket.burst == old_burst:
                bucket.reconfigure(rate, burst, now)
