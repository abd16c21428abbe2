# -*- test-case-name: tests.test_observe -*-
"""
The edge's counters: the seam between the code that decides and the code
that reports.

Listeners and the session registry call L{EdgeStats} with plain Python
arithmetic (no locks, no label lookups: the per-request cost is an attribute
add or a dict increment); the Prometheus collector in L{tunneld.observe.metrics}
and the admin API read the same object when asked.
"""

from __future__ import annotations

import bisect
from collections import deque
from typing import Any

from tunneld.model.reasons import Reason

# Link round-trip time buckets (seconds), upper bounds.
RTT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class EdgeStats:
    """What one edge counted since it started."""

    def __init__(self, clock: Any = None, recent: int = 200) -> None:
        self._clock = clock
        # Public responses sent, by HTTP status (edge answers and relayed replies).
        self.responses: dict[int, int] = {}
        # Request body bytes relayed towards agents / reply body bytes relayed to clients.
        self.bytes_in = 0
        self.bytes_out = 0
        # Streams opened towards agents.
        self.streams_opened = 0
        # Refusals: (kind, reason) -> count; kind is "request" or "agent".
        self.refusals: dict[tuple[str, str], int] = {}
        # Streams ended by a reset after the reply had started (the client saw a cut).
        self.cuts: dict[str, int] = {}
        # Agent sessions established and ended, by transport.
        self.sessions_up: dict[str, int] = {}
        self.sessions_down: dict[str, int] = {}
        # Link RTT histogram (cumulative counts per RTT_BUCKETS, plus +Inf), sum.
        self.rtt_counts = [0] * (len(RTT_BUCKETS) + 1)
        self.rtt_sum = 0.0
        self.recent_refusals: deque[dict[str, Any]] = deque(maxlen=recent)

    def _now(self) -> float:
        return float(self._clock.seconds()) if self._clock is not None else 0.0

    # -- the hot path ---------------------------------------------------------

    def response(self, status: int) -> None:
        """A response head with C{status} went to a public client."""
        responses = self.responses
        responses[status] = responses.get(status, 0) + 1

    # bytes_in / bytes_out / streams_opened are incremented in place by the listeners.

    # -- refusals and cuts ------------------------------------------------------

    def refused(
        self, reason: Reason, *, kind: str = "request", host: str = "", target: str = "",
        peer: str = "", message: str = "",
    ) -> None:
        """A request (or an agent's registration) was refused for C{reason}."""
        key = (kind, reason.value)
        self.refusals[key] = self.refusals.get(key, 0) + 1
        self.recent_refusals.append({
            "time": self._now(), "kind": kind, "reason": reason.value, "host": host,
            "target": target, "peer": peer, "message": message or reason.description,
        })

    def cut(self, reason: Reason) -> None:
        """A stream ended abnormally after its reply had started."""
        self.cuts[reason.value] = self.cuts.get(reason.value, 0) + 1

    # -- agent sessions ---------------------------------------------------------

    def session_up(self, transport: str) -> None:
        self.sessions_up[transport] = self.sessions_up.get(transport, 0) + 1

    def session_down(self, transport: str) -> None:
        self.sessions_down[transport] = self.sessions_down.get(transport, 0) + 1

    def rtt(self, seconds: float) -> None:
        """One sample of an agent link's heartbeat round trip."""
        self.rtt_counts[bisect.bisect_left(RTT_BUCKETS, seconds)] += 1
        self.rtt_sum += seconds

    def refusal_count(self, reason: Reason, kind: str = "request") -> int:
        return self.refusals.get((kind, reason.value), 0)
