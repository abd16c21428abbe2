# -*- test-case-name: tests.test_state -*-
"""
Token buckets of the state backends, kept on one edge.

L{refill_and_take} is the arithmetic of the Redis script in
L{tunneld.state.scripts} (C{TAKE_TOKENS}) step for step, so a bucket decides
alike whether it lives in this process or in Redis.  L{LocalBuckets} is the
memory backend's table and the Redis backend's fallback while Redis is
unreachable: bounded, dropping full (idle) buckets first.
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime

from tunneld.interfaces import TokenVerdict

__all__ = ["LocalBuckets", "refill_and_take"]


def refill_and_take(
    tokens: float | None, stamp: float, now: float, rate: float, burst: float, cost: float
) -> tuple[bool, float, float, float]:
    """
    (allowed, retry_after, tokens left, new stamp) for a bucket that held
    C{tokens} at C{stamp} (None: a new, full bucket).  A clock that went
    back (a failed-over Redis) refills nothing rather than taking tokens away.
    """
    if tokens is None:
        tokens, stamp = burst, now
    if now > stamp:
        tokens = min(burst, tokens + (now - stamp) * rate)
        stamp = now
    tokens = min(tokens, burst)
    if tokens >= cost:
        return True, 0.0, tokens - cost, stamp
    return False, (cost - tokens) / rate, tokens, stamp


class LocalBuckets:
    """Buckets in this process, at most C{max_size} of them, on C{clock}."""

    def __init__(self, clock: IReactorTime, max_size: int = 100_000) -> None:
        self._clock = clock
        self.max_size = max_size
        # name -> [tokens, stamp, rate, burst], least recently used first
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, name: str, cost: float, rate: float, burst: float, degraded: bool) -> TokenVerdict:
        """Take C{cost} tokens from bucket C{name}; C{degraded} is copied into the verdict."""
        now = self._clock.seconds()
        entry = self._buckets.pop(name, None)
        self._evict(now)
        tokens = None if entry is None else entry[0]
        stamp = now if entry is None else entry[1]
        allowed, wait, left, stamp = refill_and_take(tokens, stamp, now, rate, burst, cost)
        self._buckets[name] = [left, stamp, rate, burst]
        return TokenVerdict(allowed, wait, left, now, degraded)

    def _evict(self, now: float) -> None:
        buckets = self._buckets
        while buckets:
            name, (tokens, stamp, rate, burst) = next(iter(buckets.items()))
            full_at = stamp + (burst - tokens) / rate
            if full_at <= now or len(buckets) >= self.max_size:
                del buckets[name]
            else:
                break

    def clear(self) -> None:
        """Forget every bucket (the shared ones are back)."""
        self._buckets.clear()
