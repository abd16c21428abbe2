# -*- test-case-name: tests.test_state -*-
"""
IDs that no two edges of a cluster mint alike.

Every ID an edge hands out where another edge may see it (agent sessions,
streamable-HTTP connections, relayed streams, events) starts with the edge's
epoch: a number L{IStateBackend.allocate_epoch} gives no other edge.  The
rest is a counter (ordered, compact) or, for IDs that must not be guessed
(connection ids, terminal tokens), 128 random bits.  IDs of one edge are
distinct by the counter; IDs of two edges by the epoch.

With Redis the epoch is C{INCR} of one key, shifted left by 32 bits, with 32
random bits below: C{INCR} makes it unique while Redis keeps its data, and the
random bits cover the case where it did not (a Redis restarted without
persistence hands out 1 again; a failover may lose the last increment).
Without Redis (the memory backend, or Redis unreachable at start) the epoch
is L{random_epoch}: 62 random bits with bit 62 set, a range that C{INCR}
would reach only after 2**30 edge starts.
"""

from __future__ import annotations

import itertools
import secrets

from tunneld.interfaces import StateUnavailable

__all__ = ["IdMinter", "random_epoch", "redis_epoch"]


def random_epoch() -> int:
    """An epoch for an edge that cannot ask a shared store."""
    return (1 << 62) | secrets.randbits(62)


def redis_epoch(counter: int) -> int:
    """The epoch made from the C{counter}-th C{INCR} (see the module docstring)."""
    if counter <= 0:
        raise StateUnavailable(f"the epoch counter answered {counter}")
    return (counter << 32) | secrets.randbits(32)


class IdMinter:
    """Mints this edge's IDs from its epoch."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.prefix = format(epoch, "x")
        self._count = itertools.count(1)

    def next_id(self) -> str:
        """C{EPOCH-N}: unique in the cluster, increasing within this edge."""
        return f"{self.prefix}-{next(self._count):x}"

    def secret_id(self) -> str:
        """C{EPOCH-RANDOM}: unique in the cluster and not guessable."""
        return f"{self.prefix}-{secrets.token_urlsafe(16)}"
